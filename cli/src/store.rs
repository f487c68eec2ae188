//! Opening the store a `--store` argument names, through the facade's public API only.

use std::path::PathBuf;
use std::sync::Arc;

use eventfold::{
    ArchiveStore, EventStore, PostgresEventStore, PostgresOptions, SqliteEventStore, SqliteOptions,
    StoreUrl,
};

use crate::error::{CliError, Result};

/// An open store: the two backends the command works on.
pub enum Store {
    /// A SQLite file.
    Sqlite(SqliteEventStore),
    /// A PostgreSQL database.
    Postgres(PostgresEventStore),
}

impl Store {
    /// Opens the store of `target`: a path (a SQLite file), `sqlite://path` or a
    /// `postgres://` URL, with `schema` as the PostgreSQL schema. A SQLite file must exist:
    /// the command never creates a store by mistyping its path.
    pub async fn open(target: &str, schema: Option<&str>) -> Result<Store> {
        let url = if target.contains("://") || target.starts_with("sqlite:") {
            target.parse::<StoreUrl>()?
        } else {
            StoreUrl::Sqlite(PathBuf::from(target))
        };
        match url {
            StoreUrl::Sqlite(path) => {
                if !path.is_file() {
                    return Err(CliError::NoSuchFile(path));
                }
                Ok(Store::Sqlite(
                    SqliteEventStore::open(&path, SqliteOptions::new()).await?,
                ))
            }
            StoreUrl::Postgres(url) => {
                let mut options = PostgresOptions::new(url);
                if let Some(schema) = schema {
                    options = options.schema(schema);
                }
                Ok(Store::Postgres(PostgresEventStore::open(options).await?))
            }
            other => Err(CliError::Usage(format!(
                "`{other}` is not a store this command inspects: give a SQLite file or a postgres:// URL"
            ))),
        }
    }

    /// The store for every part of the contract.
    pub fn events(&self) -> Arc<dyn EventStore> {
        match self {
            Store::Sqlite(s) => Arc::new(s.clone()),
            Store::Postgres(s) => Arc::new(s.clone()),
        }
    }

    /// The store as an archive store (both backends archive).
    pub fn archive(&self) -> &dyn ArchiveStore {
        match self {
            Store::Sqlite(s) => s,
            Store::Postgres(s) => s,
        }
    }

    /// Which backend, for `status`.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Where it is: the file, or the URL with its password hidden and the schema.
    pub fn location(&self) -> String {
        match self {
            Store::Sqlite(s) => s
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| ":memory:".to_owned()),
            // The store's location names the schema already.
            Store::Postgres(s) => s.location().to_owned(),
        }
    }

    /// The schema version the store is at: opening migrates it to the library's.
    pub fn schema_version(&self) -> u32 {
        match self {
            Store::Sqlite(_) => eventfold::sqlite::SCHEMA_VERSION,
            Store::Postgres(_) => eventfold::postgres::SCHEMA_VERSION,
        }
    }

    /// Closes the store, so a SQLite file is left with its WAL folded in.
    pub async fn close(self) -> Result<()> {
        match self {
            Store::Sqlite(s) => s.close().await?,
            Store::Postgres(s) => s.close().await?,
        }
        Ok(())
    }
}
