//! Faults: damaged rows, a read-only database, a full disk, a lock held by another process,
//! and files that cannot be opened. Each checks the typed error and that nothing stored
//! before is lost or changed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use eventfold_core::{Error, EventLog, ExpectedVersion, StoreErrorKind, SubscriptionStore};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use tempfile::TempDir;

async fn open(dir: &TempDir, options: SqliteOptions) -> (SqliteEventStore, PathBuf) {
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, options)
        .await
        .expect("the store opens");
    (store, path)
}

fn set(path: &Path, sql: &str) {
    raw(path).execute_batch(sql).expect("the raw update");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_json_or_does_not_fit_fails_to_decode_but_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    // A store keeps a payload as it is given (a row edited by hand is damage instead, which
    // its checksum reports: see tests/integrity.rs).
    let payloads = [
        None,
        Some(r#"{"units": 3"#),
        Some(r#"{"units": "many"}"#),
        None,
    ];
    for (units, payload) in (1..).zip(payloads) {
        let mut event = reading(units);
        if let Some(payload) = payload {
            event.payload = payload.to_owned();
        }
        store
            .append(&meter("m-1"), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    let before = store.read_all(1, 100).await.unwrap();

    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(
        log.len(),
        4,
        "damaged rows are still read, so they can be dead-lettered"
    );
    for (i, event) in log.iter().enumerate() {
        match event.position {
            2 | 3 => match event.decode::<MeterEvent>() {
                Err(error @ Error::Payload { .. }) => {
                    let Error::Payload {
                        event_type,
                        event_id,
                        position,
                        ..
                    } = &error
                    else {
                        unreachable!()
                    };
                    assert_eq!(event_type, "MeterRead");
                    assert_eq!(*event_id, Some(before[i].event_id));
                    assert_eq!(*position, Some(event.position));
                    let message = error.to_string();
                    assert!(
                        message.contains(&before[i].event_id.to_string()),
                        "{message}"
                    );
                    assert!(
                        message.contains(&format!("position {}", event.position)),
                        "{message}"
                    );
                }
                other => panic!("expected a payload error, got {other:?}"),
            },
            _ => {
                assert_eq!(event, &before[i], "undamaged rows are unchanged");
                assert_eq!(
                    event.decode::<MeterEvent>().unwrap(),
                    MeterEvent::Read {
                        units: event.position
                    }
                );
            }
        }
        // Everything but the payload is as stored.
        assert_eq!(
            (event.event_id, event.version),
            (before[i].event_id, before[i].version)
        );
    }
    assert!(
        store
            .get(before[1].event_id)
            .await
            .unwrap()
            .unwrap()
            .decode_any()
            .is_err()
    );
    // And the store goes on.
    store
        .append(&meter("m-1"), ExpectedVersion::Exact(4), vec![reading(5)])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_event_type_or_a_newer_schema_version_is_a_typed_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    let mut vanished = reading(1);
    vanished.event_type = "MeterVanished".to_owned();
    let mut newer = reading(2);
    newer.schema_version = 99;
    for event in [vanished, newer, reading(3)] {
        store
            .append(&meter("m-1"), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    let before = store.read_all(1, 100).await.unwrap();
    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(log.len(), 3);

    match log[0].decode::<MeterEvent>() {
        Err(Error::UnknownEventType {
            event_type,
            event_id,
            position,
        }) => {
            assert_eq!(event_type, "MeterVanished");
            assert_eq!((event_id, position), (Some(before[0].event_id), Some(1)));
        }
        other => panic!("expected an unknown event type, got {other:?}"),
    }
    assert!(matches!(
        log[0].decode_any(),
        Err(Error::UnknownEventType { .. })
    ));

    match log[1].decode::<MeterEvent>() {
        Err(Error::SchemaTooNew {
            event_type,
            stored,
            known,
            event_id,
            position,
        }) => {
            assert_eq!((event_type.as_str(), stored, known), ("MeterRead", 99, 1));
            assert_eq!((event_id, position), (Some(before[1].event_id), Some(2)));
        }
        other => panic!("expected a schema too new, got {other:?}"),
    }
    assert_eq!(log[2], before[2]);
    assert_eq!(
        log[2].decode::<MeterEvent>().unwrap(),
        MeterEvent::Read { units: 3 }
    );
}

/// Root ignores file permissions, so a `chmod 0444` does not stop root from writing: the
/// test opens the store with the `read_only` option (SQLITE_OPEN_READ_ONLY), which holds
/// for root too. Where the process is not privileged, it also checks a read-only file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_serves_reads_and_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir, SqliteOptions::new()).await;
    let before = seed(&store, "m-1", 3).await;
    store.save_checkpoint("projection", 2).await.unwrap();
    store.close().await.unwrap();

    let reader = SqliteEventStore::open(&path, SqliteOptions::new().read_only(true))
        .await
        .expect("a read-only open");
    assert_eq!(assert_kept(&reader, &before).await.len(), 3);
    assert_eq!(reader.stream_version(&meter("m-1")).await.unwrap(), 3);
    assert_eq!(reader.load_checkpoint("projection").await.unwrap(), Some(2));
    assert_eq!(reader.statistics().await.unwrap().events, 3);

    let append = reader
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await;
    assert_eq!(store_kind(append), StoreErrorKind::ReadOnly);
    assert_eq!(
        store_kind(reader.save_checkpoint("projection", 3).await),
        StoreErrorKind::ReadOnly
    );
    assert_kept(&reader, &before).await;
    assert_eq!(reader.load_checkpoint("projection").await.unwrap(), Some(2));
    reader.close().await.unwrap();

    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let privileged = std::fs::OpenOptions::new().write(true).open(&path).is_ok();
    if privileged {
        eprintln!("note: running privileged (root), so a 0444 file is still writable; skipped");
    } else {
        match SqliteEventStore::open(&path, SqliteOptions::new()).await {
            Ok(store) => {
                let append = store
                    .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
                    .await;
                assert_eq!(store_kind(append), StoreErrorKind::ReadOnly);
                assert_kept(&store, &before).await;
            }
            Err(error) => assert!(
                matches!(
                    error.store_kind().unwrap(),
                    StoreErrorKind::ReadOnly | StoreErrorKind::CannotOpen
                ),
                "{error}"
            ),
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();

    // Read-write again, the store goes on where it was.
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    let out = store
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (4, 4));
    assert_kept(&store, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_open_of_a_missing_file_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.db");
    let error = SqliteEventStore::open(&path, SqliteOptions::new().read_only(true))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            eventfold_sqlite::Error::Open {
                kind: StoreErrorKind::CannotOpen,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!path.exists(), "a read-only open creates nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_refuses_the_whole_append_and_works_again_with_room() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir, SqliteOptions::new().max_page_count(48)).await;
    let mut before = seed(&store, "m-1", 3).await;

    // Fill up with multi-event appends of notes until one does not fit.
    let stream = meter("notes");
    let refused = loop {
        let version = store.stream_version(&stream).await.unwrap();
        let batch: Vec<_> = (0..8).map(|_| note(2_000)).collect();
        match store
            .append(&stream, ExpectedVersion::Exact(version), batch.clone())
            .await
        {
            Ok(_) => {
                before = store.read_all(1, usize::MAX).await.unwrap();
                assert!(before.len() < 1_000, "the size cap never bit");
            }
            Err(error) => break (error, batch),
        }
    };
    let (error, batch) = refused;
    assert_eq!(error.store_kind(), Some(StoreErrorKind::Full), "{error}");
    for event in &batch {
        assert!(
            store.get(event.event_id).await.unwrap().is_none(),
            "no part is stored"
        );
    }
    let log = assert_kept(&store, &before).await;
    assert_eq!(
        log.len(),
        before.len(),
        "nothing of the refused append is stored"
    );
    let head = store.head_position().await.unwrap();
    assert_eq!(head, before.len() as u64);

    // Other writes hit the cap too, and store nothing.
    let version = store.stream_version(&stream).await.unwrap();
    let again = store
        .append(&stream, ExpectedVersion::Exact(version), batch.clone())
        .await;
    assert_eq!(store_kind(again), StoreErrorKind::Full);

    // With room, the same append goes in, right after the head.
    assert!(store.set_max_page_count(100_000).await.unwrap() >= 100_000);
    let out = store
        .append(&stream, ExpectedVersion::Exact(version), batch)
        .await
        .unwrap();
    assert_eq!(
        (out.first_position, out.last_position),
        (head + 1, head + 8)
    );
    assert_kept(&store, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_past_the_busy_timeout_is_busy_and_the_append_succeeds_after() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::new().busy_timeout(Duration::from_millis(100));
    let (store, path) = open(&dir, options).await;
    let before = seed(&store, "m-1", 3).await;

    let other = raw(&path);
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let append = store
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await;
    assert_eq!(store_kind(append), StoreErrorKind::Busy);
    // Readers are not blocked by a writer (WAL).
    assert_kept(&store, &before).await;
    other.execute_batch("ROLLBACK").unwrap();

    let out = store
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    assert_eq!((out.version, out.first_position), (4, 4));
    assert_eq!(assert_kept(&store, &before).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_cannot_open_and_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("events.db");
    let error = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            eventfold_sqlite::Error::Open {
                kind: StoreErrorKind::CannotOpen,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&path.display().to_string()),
        "{error}"
    );
    assert_eq!(error.store_kind(), Some(StoreErrorKind::CannotOpen));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_database_is_corrupt_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&path, &garbage).unwrap();

    let error = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            eventfold_sqlite::Error::Open {
                kind: StoreErrorKind::Corrupt,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.store_kind().unwrap(), StoreErrorKind::Corrupt);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        garbage,
        "the file is not touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_database_is_refused_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    set(
        &path,
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO users (name) VALUES ('ada');",
    );
    let error = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            eventfold_sqlite::Error::Open {
                kind: StoreErrorKind::Corrupt,
                ..
            }
        ),
        "{error:?}"
    );
    let tables: i64 = raw(&path)
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tables, 0, "no table was added to it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_with_a_newer_schema_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir, SqliteOptions::new()).await;
    let before = seed(&store, "m-1", 3).await;
    store.close().await.unwrap();
    set(&path, "PRAGMA user_version = 99");

    let error = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap_err();
    match &error {
        eventfold_sqlite::Error::Open {
            kind: StoreErrorKind::SchemaTooNew,
            reason,
            ..
        } => {
            assert!(
                reason.contains("99")
                    && reason.contains(&format!("version {}", eventfold_sqlite::SCHEMA_VERSION)),
                "{reason}"
            );
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    let message = error.to_string();
    let current = eventfold_sqlite::SCHEMA_VERSION;
    assert!(
        message.contains("99") && message.contains(&format!("version {current}")),
        "{message}"
    );
    assert_eq!(error.store_kind(), Some(StoreErrorKind::SchemaTooNew));

    // Nothing was changed: back at the current version, everything is there.
    set(&path, &format!("PRAGMA user_version = {current}"));
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    assert_eq!(assert_kept(&store, &before).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_refuses_everything_as_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    seed(&store, "m-1", 2).await;
    let clone = store.clone();
    store.close().await.unwrap();
    let append = clone
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(3)])
        .await;
    assert_eq!(store_kind(append), StoreErrorKind::Closed);
    assert_eq!(
        store_kind(clone.read_all(1, 10).await),
        StoreErrorKind::Closed
    );
    assert_eq!(
        store_kind(clone.save_checkpoint("p", 1).await),
        StoreErrorKind::Closed
    );
    clone.close().await.unwrap();
}

/// A meter folds its readings, for the repository's replay path.
#[derive(Debug, Default)]
struct Meter {
    units: u64,
}

impl eventfold_core::Aggregate for Meter {
    type Event = MeterEvent;
    type Command = ();
    type Error = std::convert::Infallible;

    fn apply(&mut self, event: &MeterEvent) {
        if let MeterEvent::Read { units } = event {
            self.units += units;
        }
    }

    fn handle(&self, (): ()) -> Result<Vec<MeterEvent>, Self::Error> {
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_an_aggregate_over_a_damaged_row_names_its_id_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir, SqliteOptions::new()).await;
    let mut not_units = reading(2);
    not_units.payload = r#"{"units": true}"#.to_owned();
    for event in [reading(1), not_units, reading(3)] {
        store
            .append(&meter("m-1"), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    let before = store.read_all(1, 100).await.unwrap();
    let repo = eventfold_core::Repository::<Meter>::new(std::sync::Arc::new(store.clone()));
    match repo.load("m-1").await {
        Err(Error::Payload {
            event_id, position, ..
        }) => {
            assert_eq!(event_id, Some(before[1].event_id));
            assert_eq!(position, Some(2));
        }
        other => panic!("expected a payload error, got {other:?}"),
    }
    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(
        (log[0].clone(), log[2].clone()),
        (before[0].clone(), before[2].clone())
    );
}
