//! How SQLite's failures become [`eventfold_core::Error`]s: their [`StoreErrorKind`]s, and
//! the errors of opening a store. Messages say what failed; SQLite's own words stay in the
//! error's `source`, so a `{:#}` chain prints them once.

use std::sync::Arc;

use eventfold_core::{BoxError, Error, StoreErrorKind};
use rusqlite::ErrorCode;

/// The error of opening the store at `location`, from what SQLite said while doing `doing`.
pub(crate) fn open_failed(location: &str, doing: &str, error: rusqlite::Error) -> Error {
    Error::Open {
        kind: kind_of(&error),
        location: location.to_owned(),
        reason: doing.to_owned(),
        source: Some(Box::new(error)),
    }
}

/// The error of opening the store at `location`, from a core error met while doing `doing`.
pub(crate) fn open_failed_core(location: &str, doing: &str, error: Error) -> Error {
    Error::Open {
        kind: error.store_kind().unwrap_or(StoreErrorKind::Other),
        location: location.to_owned(),
        reason: doing.to_owned(),
        source: Some(Box::new(error)),
    }
}

/// The error of opening the store at `location`, refused for `reason` (no lower error).
pub(crate) fn open_refused(kind: StoreErrorKind, location: &str, reason: String) -> Error {
    Error::Open {
        kind,
        location: location.to_owned(),
        reason,
        source: None,
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
            message: doing.to_owned(),
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
            message: eventfold_core::error_chain(error),
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
        message: doing.to_owned(),
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
