//! Appends longer than one of the writer's multi-row inserts (32 rows): whole chunks go in
//! multi-row statements, the rest one row at a time. Each keeps the rules of a short append:
//! every field stored exactly, all or nothing, a repeat recognized.

mod common;

use common::*;
use eventfold_core::{Error, EventLog, ExpectedVersion, Metadata, NewEvent};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

/// `count` readings; the metadata changes along the way (runs of equal values, an empty
/// one), so that a chunk binds both a repeated and a changed value.
fn readings(first: u64, count: u64) -> Vec<NewEvent> {
    (first..first + count)
        .map(|units| {
            let mut event = reading(units);
            event.metadata = match units % 7 {
                0 => Metadata::new(),
                1..=3 => Metadata::new().with("by", "test"),
                _ => Metadata::new().with("run", (units / 7).to_string()),
            };
            event
        })
        .collect()
}

#[tokio::test]
async fn a_long_append_stores_every_event_exactly_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new())
        .await
        .unwrap();
    store
        .append(&meter("short"), ExpectedVersion::Any, readings(1, 3))
        .await
        .unwrap();
    // 3 chunks of 32 and 4 single rows, then at a known version 1 chunk and 1 row.
    let first = readings(1, 100);
    let outcome = store
        .append(&meter("long"), ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    assert_eq!(
        (
            outcome.version,
            outcome.first_position,
            outcome.last_position
        ),
        (100, 4, 103)
    );
    let second = readings(101, 33);
    let outcome = store
        .append(&meter("long"), ExpectedVersion::Exact(100), second.clone())
        .await
        .unwrap();
    assert_eq!(
        (
            outcome.version,
            outcome.first_position,
            outcome.last_position
        ),
        (133, 104, 136)
    );

    let stored = store.read_stream(&meter("long"), 0).await.unwrap();
    assert_eq!(stored.len(), 133);
    for (n, (new, recorded)) in first.iter().chain(&second).zip(&stored).enumerate() {
        let n = n as u64;
        assert_eq!(
            (recorded.version, recorded.position),
            (n + 1, n + 4),
            "event {n}"
        );
        assert!(new.same_content(&meter("long"), recorded), "event {n}");
        assert_eq!(recorded.metadata, new.metadata, "event {n}");
    }
    let report = store.verify().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.events, 136);
}

#[tokio::test]
async fn a_long_append_with_a_taken_id_in_a_later_chunk_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new())
        .await
        .unwrap();
    let other = reading(0);
    store
        .append(&meter("other"), ExpectedVersion::Any, vec![other.clone()])
        .await
        .unwrap();
    for taken_at in [40, 97] {
        // In the second chunk, then in the rows after the last chunk.
        let mut events = readings(1, 100);
        events[taken_at].event_id = other.event_id;
        match store
            .append(&meter("long"), ExpectedVersion::NoStream, events)
            .await
        {
            Err(Error::DuplicateEventId { event_id }) => assert_eq!(event_id, other.event_id),
            other => panic!("expected DuplicateEventId, got {other:?}"),
        }
        assert_eq!(store.stream_version(&meter("long")).await.unwrap(), 0);
        assert_eq!(store.read_all(1, usize::MAX).await.unwrap().len(), 1);
    }
    let outcome = store
        .append(&meter("long"), ExpectedVersion::NoStream, readings(1, 64))
        .await
        .unwrap();
    assert_eq!((outcome.first_position, outcome.last_position), (2, 65));
}

#[tokio::test]
async fn a_repeated_long_append_is_recognized() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new())
        .await
        .unwrap();
    let events = readings(1, 70);
    let stored = store
        .append(&meter("long"), ExpectedVersion::Exact(0), events.clone())
        .await
        .unwrap();
    for expected in [ExpectedVersion::Exact(0), ExpectedVersion::Any] {
        let again = store
            .append(&meter("long"), expected, events.clone())
            .await
            .unwrap();
        assert_eq!(again, stored, "{expected:?}");
    }
    assert_eq!(store.read_all(1, usize::MAX).await.unwrap().len(), 70);
}
