//! Versions and positions that a damaged or hand-edited row, or an append at the end of the
//! number range, would overflow: each is that request's typed error, and the writer goes on
//! serving every other stream.

mod common;

use common::*;
use eventfold_core::{Error, EventLog, ExpectedVersion, SubscriptionStore};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

/// Inserts a row by hand, as a damaged file or another program would leave it.
fn insert_row(path: &std::path::Path, position: i64, id: &str, version: i64) {
    raw(path)
        .execute(
            "INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
             event_type, schema_version, occurred_at, recorded_at, metadata, payload) \
             VALUES (?1, randomblob(16), 'Meter', ?2, ?3, 'MeterRead', 1, 0, 0, NULL, \
             '{\"units\":1}')",
            rusqlite::params![position, id, version],
        )
        .expect("the raw insert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_version_minus_one_and_an_append_with_any_no_longer_kill_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    seed(&store, "m-1", 2).await;
    let before = seed(&store, "m-2", 1).await;
    insert_row(&path, 4, "bad", -1);
    let damaged_id: Vec<u8> = raw(&path)
        .query_row("SELECT event_id FROM events WHERE position = 4", [], |r| {
            r.get(0)
        })
        .unwrap();
    let damaged = store.read_all(4, 1).await;

    for attempt in 0..2 {
        let refused = store
            .append(&meter("bad"), ExpectedVersion::Any, vec![reading(9)])
            .await;
        match refused {
            Err(Error::CorruptEvent {
                position,
                reason,
                event_id,
            }) => {
                assert_eq!(position, Some(4), "attempt {attempt}");
                assert_eq!(
                    event_id.map(|id| id.as_bytes().to_vec()),
                    Some(damaged_id.clone()),
                    "the error names the damaged row"
                );
                assert!(reason.contains("version -1"), "{reason}");
            }
            other => panic!("expected a corrupt event, got {other:?}"),
        }
    }
    assert!(matches!(
        store.stream_version(&meter("bad")).await,
        Err(Error::CorruptEvent {
            position: Some(4),
            ..
        })
    ));

    // Every other stream is served, the same one and others, after the damaged row.
    let out = store
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(3)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (3, 5));
    let out = store
        .append(&meter("m-2"), ExpectedVersion::Exact(1), vec![reading(2)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (2, 6));
    let out = store
        .append(&meter("m-3"), ExpectedVersion::NoStream, vec![reading(1)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (1, 7));
    assert_eq!(store.head_position().await.unwrap(), 7);
    // The damaged row fails alone: the log reads up to it and after it.
    let log = store.read_all(1, 3).await.unwrap();
    assert_prefix(&log, &before);
    let after: Vec<u64> = store
        .read_all(5, usize::MAX)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(after, [5, 6, 7]);
    assert_eq!(
        format!("{damaged:?}"),
        format!("{:?}", store.read_all(4, 1).await),
        "the damaged row is left as it was"
    );
    store.close().await.unwrap();

    // And after a restart.
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    assert!(
        store
            .append(&meter("bad"), ExpectedVersion::Any, vec![reading(9)])
            .await
            .is_err()
    );
    store
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_version_of_zero_is_a_corrupt_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    insert_row(&path, 1, "zero", 0);
    assert!(matches!(
        store
            .append(&meter("zero"), ExpectedVersion::Exact(0), vec![reading(1)])
            .await,
        Err(Error::CorruptEvent {
            position: Some(1),
            ..
        })
    ));
    store
        .append(&meter("ok"), ExpectedVersion::NoStream, vec![reading(1)])
        .await
        .unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_the_last_storable_version_is_invalid_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    insert_row(&path, 1, "full", i64::MAX);
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::Exact(i64::MAX as u64),
    ] {
        match store
            .append(&meter("full"), expected, vec![reading(1)])
            .await
        {
            Err(Error::InvalidAppend { reason }) => {
                assert!(reason.contains(&i64::MAX.to_string()), "{reason}")
            }
            other => panic!("expected an invalid append, got {other:?}"),
        }
    }
    // Two events to a stream one below the end: one fits, two do not; none is stored.
    insert_row(&path, 2, "almost", i64::MAX - 1);
    let refused = store
        .append(
            &meter("almost"),
            ExpectedVersion::Any,
            vec![reading(1), reading(2)],
        )
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidAppend { .. })),
        "{refused:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 2);
    let out = store
        .append(&meter("almost"), ExpectedVersion::Any, vec![reading(1)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (i64::MAX as u64, 3));
    let out = store
        .append(&meter("other"), ExpectedVersion::NoStream, vec![reading(1)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (1, 4));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_the_last_storable_position_is_invalid_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    seed(&store, "m-1", 1).await;
    insert_row(&path, i64::MAX, "last", 1);
    for id in ["m-1", "m-2"] {
        let refused = store
            .append(&meter(id), ExpectedVersion::Any, vec![reading(1)])
            .await;
        match refused {
            Err(Error::InvalidAppend { reason }) => {
                assert!(reason.contains("position"), "{reason}")
            }
            other => panic!("expected an invalid append, got {other:?}"),
        }
    }
    // Other writes still go through the writer.
    store.save_checkpoint("projection", 1).await.unwrap();
    raw(&path)
        .execute("DELETE FROM events WHERE aggregate_id = 'last'", [])
        .unwrap();
    let out = store
        .append(&meter("m-1"), ExpectedVersion::Exact(1), vec![reading(2)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (2, 2));
    assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(1));
    store.close().await.unwrap();
}
