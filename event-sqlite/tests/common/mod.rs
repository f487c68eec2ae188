//! What the SQLite store's tests share: a real event type, events, and comparisons.
#![allow(dead_code)] // Each test file uses part of it.

pub mod disk;

use std::path::Path;

use eventfold_core::{
    AppendOutcome, Error, EventStore, ExpectedVersion, Metadata, NewEvent, RecordedEvent,
    StoreErrorKind, StreamId,
};
use serde::{Deserialize, Serialize};

/// The event type the tests store and decode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventfold_macros::DomainEvent)]
#[domain_event(aggregate = "Meter", crate = "eventfold_core")]
pub enum MeterEvent {
    #[domain_event(name = "MeterRead")]
    Read { units: u64 },
    #[domain_event(name = "MeterNoted")]
    Noted { text: String },
}

pub fn meter(id: &str) -> StreamId {
    StreamId::new("Meter", id)
}

/// A new `MeterRead` event of `units`.
pub fn reading(units: u64) -> NewEvent {
    NewEvent::from_event(
        &MeterEvent::Read { units },
        Metadata::new().with("by", "test"),
    )
    .expect("the event serializes")
}

/// A new `MeterNoted` event whose payload is about `bytes` long.
pub fn note(bytes: usize) -> NewEvent {
    NewEvent::from_event(
        &MeterEvent::Noted {
            text: "x".repeat(bytes),
        },
        Metadata::new(),
    )
    .expect("the event serializes")
}

/// Appends `count` single-event appends to stream `id`; returns the whole log afterwards.
pub async fn seed(store: &dyn EventStore, id: &str, count: u64) -> Vec<RecordedEvent> {
    for units in 1..=count {
        store
            .append(&meter(id), ExpectedVersion::Any, vec![reading(units)])
            .await
            .expect("a seed append");
    }
    store.read_all(1, usize::MAX).await.expect("the log reads")
}

/// Fails unless the log still starts with exactly `before`; returns the whole log.
#[track_caller]
pub fn assert_prefix(log: &[RecordedEvent], before: &[RecordedEvent]) {
    assert!(
        log.len() >= before.len(),
        "events were lost: {} < {}",
        log.len(),
        before.len()
    );
    for (now, then) in log.iter().zip(before) {
        assert_eq!(now, then, "a stored event changed");
    }
}

/// Re-reads the log and fails unless it starts with exactly `before`.
pub async fn assert_kept(store: &dyn EventStore, before: &[RecordedEvent]) -> Vec<RecordedEvent> {
    let log = store.read_all(1, usize::MAX).await.expect("the log reads");
    assert_prefix(&log, before);
    log
}

/// The kind of a store error, failing on any other result.
#[track_caller]
pub fn store_kind<T: std::fmt::Debug>(result: Result<T, Error>) -> StoreErrorKind {
    match result {
        Err(error) => error
            .store_kind()
            .unwrap_or_else(|| panic!("expected a store error, got {error:?}")),
        Ok(value) => panic!("expected a store error, got {value:?}"),
    }
}

/// Fails unless the outcomes' positions are exactly 1..=n with none twice.
#[track_caller]
pub fn assert_gap_free(outcomes: &[AppendOutcome]) {
    let mut positions: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.first_position..=o.last_position)
        .collect();
    positions.sort_unstable();
    let n = positions.len() as u64;
    assert_eq!(
        positions,
        (1..=n).collect::<Vec<_>>(),
        "positions have gaps or repeats"
    );
}

/// A second connection to the database, as another process would have.
pub fn raw(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).expect("a raw connection");
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .expect("a busy timeout");
    conn
}
