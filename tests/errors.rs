//! Errors: one type and kind for opening a store, whichever way; no message repeats its
//! source's text.

use eventfold::{Error, EventSystem, SqliteEventStore, SqliteOptions, StoreErrorKind};

/// Both ways of opening the same location, and the kind each gives.
async fn both_ways(path: &std::path::Path) -> (Error, Error) {
    let direct = SqliteEventStore::open(path, SqliteOptions::new())
        .await
        .unwrap_err();
    let system = EventSystem::open(path).await.unwrap_err();
    (direct, system)
}

/// Regression: `SqliteEventStore::open` failed with `eventfold::sqlite::Error` but
/// `EventSystem::open` with `eventfold::Error`, of other shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_fails_with_the_same_error_kind_directly_and_through_the_system() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir").join("events.db");
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a_u8; 8192]).unwrap();
    let newer = dir.path().join("newer.db");
    SqliteEventStore::open(&newer, SqliteOptions::new())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    rusqlite::Connection::open(&newer)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    for (path, kind) in [
        (&missing, StoreErrorKind::CannotOpen),
        (&garbage, StoreErrorKind::Corrupt),
        (&newer, StoreErrorKind::SchemaTooNew),
    ] {
        let (direct, system) = both_ways(path).await;
        for error in [&direct, &system] {
            assert!(
                matches!(error, Error::Open { kind: k, location, .. }
                    if *k == kind && *location == path.display().to_string()),
                "{error:?}"
            );
        }
        assert_eq!(direct.to_string(), system.to_string());
    }
}

/// Every message of an error's chain, outermost first.
fn chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut messages = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        messages.push(cause.to_string());
        source = cause.source();
    }
    messages
}

fn assert_no_repeat(error: &(dyn std::error::Error + 'static)) {
    let messages = chain(error);
    for pair in messages.windows(2) {
        assert!(
            !pair[0].contains(&pair[1]),
            "`{}` repeats its source `{}`",
            pair[0],
            pair[1]
        );
    }
}

/// Regression: the outer messages embedded `{source}`, so a `{:#}` chain printed the
/// source's text twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_error_message_repeats_its_source() {
    let json = || serde_json::from_str::<u8>("x").unwrap_err();
    let mut errors: Vec<Box<dyn std::error::Error + Send + Sync>> = vec![
        Box::new(Error::Payload {
            event_type: "T".into(),
            event_id: None,
            position: Some(1),
            source: json(),
        }),
        Box::new(Error::Serialize {
            event_type: "T".into(),
            source: json(),
        }),
        Box::new(Error::Snapshot {
            aggregate_type: "A".into(),
            source: json(),
        }),
        Box::new(Error::store(StoreErrorKind::Io, "reading", json())),
        Box::new(eventfold::CommandError::<Error>::Rejected(
            Error::Snapshot {
                aggregate_type: "A".into(),
                source: json(),
            },
        )),
    ];
    // Real failures of the SQLite store, opening and once open.
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, vec![0x5a_u8; 8192]).unwrap();
    let (direct, system) = both_ways(&garbage).await;
    errors.push(Box::new(direct));
    errors.push(Box::new(system));
    for error in &errors {
        assert!(chain(&**error).len() >= 2, "{error:?} has a source");
        assert_no_repeat(&**error);
    }
}
