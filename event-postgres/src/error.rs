//! How PostgreSQL's failures become [`eventfold_core::Error`]s: their [`StoreErrorKind`]s,
//! and the errors of opening a store. Messages say what failed; the driver's own words
//! stay in the error's `source`, so a `{:#}` chain prints them once.

use eventfold_core::{Error, StoreErrorKind};
use tokio_postgres::error::SqlState;

/// The kind of a driver failure, the same for every backend.
pub(crate) fn kind_of(error: &tokio_postgres::Error) -> StoreErrorKind {
    if let Some(db) = error.as_db_error() {
        return kind_of_state(db.code());
    }
    // No answer from the server: the connection broke, could not be made, or closed.
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    let lost = error.is_closed()
        || std::iter::from_fn(|| {
            let current = source?;
            source = current.source();
            Some(current)
        })
        .any(|e| e.is::<std::io::Error>());
    if lost {
        StoreErrorKind::Io
    } else {
        // A value that does not convert, a protocol surprise: not the connection's fault.
        StoreErrorKind::Other
    }
}

/// The kind of a failure the server reported with this SQLSTATE.
pub(crate) fn kind_of_state(code: &SqlState) -> StoreErrorKind {
    let code = code.code();
    match code {
        // statement_timeout (query_canceled).
        "57014" => StoreErrorKind::Timeout,
        // lock_not_available (lock_timeout), serialization failure, deadlock.
        "55P03" | "40001" | "40P01" => StoreErrorKind::Busy,
        "53100" => StoreErrorKind::Full,
        "25006" => StoreErrorKind::ReadOnly,
        // data_corrupted, index_corrupted.
        "XX001" | "XX002" => StoreErrorKind::Corrupt,
        // invalid_catalog_name (no such database), authorization, too many connections.
        "3D000" | "28000" | "28P01" | "53300" => StoreErrorKind::CannotOpen,
        // admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now, and
        // the connection exceptions: the session is gone.
        "57P01" | "57P02" | "57P03" => StoreErrorKind::Io,
        _ if code.starts_with("08") => StoreErrorKind::Io,
        _ => StoreErrorKind::Other,
    }
}

/// A driver failure of `doing`, as the core error.
pub(crate) fn store_error(doing: &str, error: tokio_postgres::Error) -> Error {
    Error::Store {
        kind: kind_of(&error),
        message: doing.to_owned(),
        source: Some(Box::new(error)),
    }
}

/// A pool failure of `doing` (no connection could be had), as the core error.
pub(crate) fn pool_error(doing: &str, error: deadpool_postgres::PoolError) -> Error {
    use deadpool_postgres::PoolError;
    let kind = match &error {
        PoolError::Backend(e) => kind_of(e),
        PoolError::Closed => StoreErrorKind::Closed,
        PoolError::Timeout(_) => StoreErrorKind::Busy,
        _ => StoreErrorKind::Other,
    };
    Error::Store {
        kind,
        message: format!("{doing}: no connection to PostgreSQL"),
        source: Some(Box::new(error)),
    }
}

/// The error of opening the store at `location`, from what the driver said while doing
/// `doing`.
pub(crate) fn open_failed(location: &str, doing: &str, error: tokio_postgres::Error) -> Error {
    let kind = match kind_of(&error) {
        // Nothing answered at all: the server is unreachable.
        StoreErrorKind::Io if error.as_db_error().is_none() => StoreErrorKind::CannotOpen,
        kind => kind,
    };
    Error::Open {
        kind,
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

/// The error of an operation on a closed store.
pub(crate) fn closed() -> Error {
    Error::Store {
        kind: StoreErrorKind::Closed,
        message: "the PostgreSQL store is closed".to_owned(),
        source: None,
    }
}

/// A stored row that this library cannot read back (a hand-edited row).
pub(crate) fn corrupt_row(what: String) -> Error {
    Error::Store {
        kind: StoreErrorKind::Corrupt,
        message: what,
        source: None,
    }
}

/// A backend failure shared by every append of a group (one server call fails them all).
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    kind: StoreErrorKind,
    message: String,
    source: Option<std::sync::Arc<tokio_postgres::Error>>,
}

impl Fault {
    /// The failure of the group's server call. Without an answer from the server (the
    /// connection broke, or the server ended the session) the call may or may not have
    /// committed: `OutcomeUnknown`. An error the server reported for the statement means
    /// it was rolled back: nothing is stored.
    pub(crate) fn of_call(error: tokio_postgres::Error) -> Self {
        let kind = kind_of(&error);
        if kind == StoreErrorKind::Io {
            return Fault {
                kind: StoreErrorKind::OutcomeUnknown,
                message: format!(
                    "the connection to PostgreSQL broke during the append ({kind}), so its \
                     group may or may not be stored; re-append the same events with the \
                     same event ids to store them exactly once"
                ),
                source: Some(std::sync::Arc::new(error)),
            };
        }
        let beyond_the_head = error.as_db_error().is_some_and(|db| {
            *db.code() == SqlState::UNIQUE_VIOLATION && db.constraint() == Some("ef_events_pkey")
        });
        if beyond_the_head {
            return Fault {
                kind: StoreErrorKind::Corrupt,
                message: "appending: a position past the head of the log is taken, so a row \
                          was written to ef_events outside the store; nothing of the group \
                          is stored, and no append can be until that row is removed"
                    .to_owned(),
                source: Some(std::sync::Arc::new(error)),
            };
        }
        Fault {
            kind,
            message: "appending (the server refused the group; nothing of it is stored)".to_owned(),
            source: Some(std::sync::Arc::new(error)),
        }
    }

    /// True when the session is gone (the outcome of its call is unknown).
    pub(crate) fn lost_the_session(&self) -> bool {
        self.kind == StoreErrorKind::OutcomeUnknown
    }

    /// A failure before the call was sent (no connection): nothing is stored.
    pub(crate) fn before_call(error: &Error) -> Self {
        Fault {
            kind: error.store_kind().unwrap_or(StoreErrorKind::Other),
            message: eventfold_core::error_chain(error),
            source: None,
        }
    }

    /// The core error for one caller.
    pub(crate) fn to_error(&self) -> Error {
        Error::Store {
            kind: self.kind,
            message: self.message.clone(),
            source: self
                .source
                .as_ref()
                .map(|source| Box::new(std::sync::Arc::clone(source)) as eventfold_core::BoxError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_states_map_to_the_core_kinds() {
        let cases = [
            (SqlState::QUERY_CANCELED, StoreErrorKind::Timeout),
            (SqlState::LOCK_NOT_AVAILABLE, StoreErrorKind::Busy),
            (SqlState::T_R_SERIALIZATION_FAILURE, StoreErrorKind::Busy),
            (SqlState::DISK_FULL, StoreErrorKind::Full),
            (
                SqlState::READ_ONLY_SQL_TRANSACTION,
                StoreErrorKind::ReadOnly,
            ),
            (SqlState::DATA_CORRUPTED, StoreErrorKind::Corrupt),
            (SqlState::ADMIN_SHUTDOWN, StoreErrorKind::Io),
            (SqlState::CONNECTION_FAILURE, StoreErrorKind::Io),
            (SqlState::INVALID_CATALOG_NAME, StoreErrorKind::CannotOpen),
            (SqlState::UNIQUE_VIOLATION, StoreErrorKind::Other),
        ];
        for (state, kind) in cases {
            assert_eq!(kind_of_state(&state), kind, "{}", state.code());
        }
    }
}
