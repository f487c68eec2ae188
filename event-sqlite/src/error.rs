//! The errors of opening a store, and how SQLite's failures map to
//! [`StoreErrorKind`]s.

use std::sync::Arc;

use eventfold_core::{BoxError, StoreErrorKind};
use rusqlite::ErrorCode;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong opening a [`SqliteEventStore`](crate::SqliteEventStore).
///
/// Once open, the store's operations return [`eventfold_core::Error`], like every
/// backend; this error converts into it with the matching
/// [`StoreErrorKind`] (see [`Error::kind`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option is out of its range; nothing was opened.
    #[error("invalid option `{option}`: {reason}")]
    InvalidOption {
        /// The option's setter name.
        option: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// The database cannot be opened or created: its directory is missing, access is
    /// denied, or (read-only) the file does not exist.
    #[error("cannot open database `{path}`: {message}")]
    CannotOpen {
        /// The database's path.
        path: String,
        /// What SQLite or the system reported.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The file is not a SQLite database, is damaged, or is another program's database.
    #[error("`{path}` is not an eventfold database or is damaged: {message}")]
    Corrupt {
        /// The database's path.
        path: String,
        /// What is wrong.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },

    /// The database's schema was written by a newer version of this library.
    #[error(
        "database `{path}` has schema version {found}, newer than version {supported} known to this library"
    )]
    SchemaTooNew {
        /// The database's path.
        path: String,
        /// The schema version stored in the database.
        found: u32,
        /// The newest schema version this library knows.
        supported: u32,
    },

    /// Opening failed otherwise (a lock held past the busy timeout, a read-only database
    /// that needs a migration, an I/O error).
    #[error("cannot open database `{path}` ({kind}): {message}")]
    Open {
        /// The database's path.
        path: String,
        /// What kind of failure it is.
        kind: StoreErrorKind,
        /// What SQLite or the system reported.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// The [`StoreErrorKind`] this error converts to in [`eventfold_core::Error::Store`].
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            Error::InvalidOption { .. } => StoreErrorKind::Other,
            Error::CannotOpen { .. } => StoreErrorKind::CannotOpen,
            Error::Corrupt { .. } => StoreErrorKind::Corrupt,
            Error::SchemaTooNew { .. } => StoreErrorKind::SchemaTooNew,
            Error::Open { kind, .. } => *kind,
        }
    }

    /// The error of opening `path`, from what SQLite said while doing `doing`.
    pub(crate) fn from_sqlite(path: &str, doing: &str, error: rusqlite::Error) -> Self {
        let kind = kind_of(&error);
        let path = path.to_owned();
        let message = format!("{doing}: {error}");
        let source = Some(Box::new(error) as BoxError);
        match kind {
            StoreErrorKind::CannotOpen => Error::CannotOpen {
                path,
                message,
                source,
            },
            StoreErrorKind::Corrupt => Error::Corrupt {
                path,
                message,
                source,
            },
            kind => Error::Open {
                path,
                kind,
                message,
                source,
            },
        }
    }
}

impl Error {
    /// The error of opening `path`, from a core error met while doing `doing`.
    pub(crate) fn from_core(path: &str, doing: &str, error: eventfold_core::Error) -> Self {
        let kind = error.store_kind().unwrap_or(StoreErrorKind::Other);
        let path = path.to_owned();
        let message = format!("{doing}: {error}");
        let source = Some(Box::new(error) as BoxError);
        match kind {
            StoreErrorKind::Corrupt => Error::Corrupt {
                path,
                message,
                source,
            },
            kind => Error::Open {
                path,
                kind,
                message,
                source,
            },
        }
    }
}

impl From<Error> for eventfold_core::Error {
    fn from(error: Error) -> Self {
        eventfold_core::Error::Store {
            kind: error.kind(),
            message: error.to_string(),
            source: Some(Box::new(error)),
        }
    }
}

/// The kind of a SQLite failure, the same for every backend.
pub(crate) fn kind_of(error: &rusqlite::Error) -> StoreErrorKind {
    match error.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreErrorKind::Full,
        Some(ErrorCode::ReadOnly) => StoreErrorKind::ReadOnly,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreErrorKind::Busy,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => StoreErrorKind::Corrupt,
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied) => StoreErrorKind::CannotOpen,
        // SQLITE_IOERR and every extended code of its family (SQLITE_IOERR_FSYNC,
        // SQLITE_IOERR_WRITE, SQLITE_IOERR_SHORT_READ...), which rusqlite folds into one code.
        Some(ErrorCode::SystemIoFailure) => StoreErrorKind::Io,
        _ => StoreErrorKind::Other,
    }
}

/// A backend failure during a write, shared by every write it fails (a failed commit fails
/// the whole group).
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    kind: StoreErrorKind,
    message: String,
    source: Option<Arc<rusqlite::Error>>,
}

impl Fault {
    /// A failure of `doing`.
    pub(crate) fn new(doing: &str, error: rusqlite::Error) -> Self {
        Fault {
            kind: kind_of(&error),
            message: format!("{doing}: {error}"),
            source: Some(Arc::new(error)),
        }
    }

    /// The kind of failure.
    pub(crate) fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// A write that panicked; `payload` is what it panicked with.
    pub(crate) fn panicked(doing: &str, payload: &(dyn std::any::Any + Send)) -> Self {
        Fault {
            kind: StoreErrorKind::Other,
            message: format!("{doing} panicked: {}", panic_message(payload)),
            source: None,
        }
    }

    /// This failure, met by the `COMMIT` of a group: the writes may or may not be stored.
    pub(crate) fn at_commit(self) -> Self {
        Fault {
            kind: StoreErrorKind::OutcomeUnknown,
            message: format!(
                "the COMMIT failed ({}: {}), so the writes of its group may or may not be \
                 stored; re-append the same events with the same event ids to store them \
                 exactly once",
                self.kind, self.message
            ),
            source: self.source,
        }
    }

    /// The failure a core error describes (a store error keeps its kind).
    pub(crate) fn from_core(error: &eventfold_core::Error) -> Self {
        Fault {
            kind: error.store_kind().unwrap_or(StoreErrorKind::Other),
            message: error.to_string(),
            source: None,
        }
    }

    /// The core error for one caller.
    pub(crate) fn to_error(&self) -> eventfold_core::Error {
        eventfold_core::Error::Store {
            kind: self.kind,
            message: self.message.clone(),
            source: self
                .source
                .as_ref()
                .map(|source| Box::new(Arc::clone(source)) as BoxError),
        }
    }
}

/// What a panic payload says, when it is a string.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "a value that is not a string"
    }
}

/// The error of work on the writer connection that panicked.
pub(crate) fn panicked(doing: &str, payload: &(dyn std::any::Any + Send)) -> eventfold_core::Error {
    Fault::panicked(doing, payload).to_error()
}

/// A [`Fault`] turned straight into the core error.
pub(crate) fn store_error(doing: &str, error: rusqlite::Error) -> eventfold_core::Error {
    let kind = kind_of(&error);
    eventfold_core::Error::Store {
        kind,
        message: format!("{doing}: {error}"),
        source: Some(Box::new(error)),
    }
}

/// The error of an operation on a closed store.
pub(crate) fn closed() -> eventfold_core::Error {
    eventfold_core::Error::Store {
        kind: StoreErrorKind::Closed,
        message: "the SQLite store is closed".to_owned(),
        source: None,
    }
}

/// A stored row that this library cannot read back (a damaged or hand-edited row).
pub(crate) fn corrupt_row(what: String) -> eventfold_core::Error {
    eventfold_core::Error::Store {
        kind: StoreErrorKind::Corrupt,
        message: what,
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(extended_code: std::ffi::c_int) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(extended_code), None)
    }

    #[test]
    fn every_sqlite_io_error_is_the_io_kind_not_corrupt_or_other() {
        use rusqlite::ffi;
        for code in [
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_READ,
            ffi::SQLITE_IOERR_SHORT_READ,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_IOERR_TRUNCATE,
            ffi::SQLITE_IOERR_SHMMAP,
        ] {
            assert_eq!(kind_of(&failure(code)), StoreErrorKind::Io, "code {code}");
        }
        assert_eq!(kind_of(&failure(ffi::SQLITE_FULL)), StoreErrorKind::Full);
        assert_eq!(
            kind_of(&failure(ffi::SQLITE_CORRUPT)),
            StoreErrorKind::Corrupt
        );
    }

    #[test]
    fn a_failed_commit_is_an_unknown_outcome_that_names_its_cause_and_the_remedy() {
        let fault = Fault::new("COMMIT", failure(rusqlite::ffi::SQLITE_IOERR_FSYNC)).at_commit();
        let error = fault.to_error();
        assert_eq!(error.store_kind(), Some(StoreErrorKind::OutcomeUnknown));
        let message = error.to_string();
        assert!(message.contains("I/O error"), "{message}");
        assert!(message.contains("same event ids"), "{message}");
    }
}
