//! The command's error: everything that ends it with exit code 2.

use std::path::PathBuf;

/// Why a command could not run (exit code 2). Findings (damage found by `verify`) are not
/// errors: they end with exit code 1.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// No `--store` and no `EVENTFOLD_STORE`.
    #[error("no store: pass --store PATH|sqlite://PATH|postgres://URL or set EVENTFOLD_STORE")]
    NoStore,
    /// A SQLite path that is not a file.
    #[error("{}: no such SQLite file (the command only opens existing stores)", .0.display())]
    NoSuchFile(PathBuf),
    /// A wrong argument the parser could not see.
    #[error("{0}")]
    Usage(String),
    /// What this command does not do on this store, and what to do instead.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The store refused or failed.
    #[error("{}", eventfold::backend::error_chain(.0))]
    Store(#[from] eventfold::Error),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// The command's result.
pub type Result<T, E = CliError> = std::result::Result<T, E>;
