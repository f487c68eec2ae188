//! Real disk faults: a full tmpfs, and a block device that fails with I/O errors. Each
//! checks the typed error, that nothing stored before is lost, that a re-append of the
//! events whose outcome was not known stores them exactly once, and that the store serves
//! the next appends once the disk is healthy again.

mod common;

use std::collections::BTreeMap;

use common::disk::{FailingDisk, SmallTmpfs};
use common::*;
use eventfold_core::{Error, EventLog, ExpectedVersion, NewEvent, StoreErrorKind};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

/// Appends notes of `bytes` to one stream until an append fails (at most `attempts`);
/// returns the failed append's events and its error.
async fn append_until_failure(
    store: &SqliteEventStore,
    bytes: usize,
    attempts: usize,
) -> (Vec<NewEvent>, Error) {
    let stream = meter("notes");
    for _ in 0..attempts {
        let events: Vec<_> = (0..4).map(|_| note(bytes)).collect();
        match store
            .append(&stream, ExpectedVersion::Any, events.clone())
            .await
        {
            Ok(_) => {}
            Err(error) => return (events, error),
        }
    }
    panic!("{attempts} appends went through on a disk that fails");
}

/// How many times each event id is stored; fails on any stored twice.
async fn assert_stored_once(store: &SqliteEventStore) -> BTreeMap<Uuid, u64> {
    let log = store.read_all(1, usize::MAX).await.expect("the log reads");
    let mut seen = BTreeMap::new();
    for event in &log {
        *seen.entry(event.event_id).or_insert(0) += 1;
    }
    assert!(seen.values().all(|n| *n == 1), "an event is stored twice");
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "positions have gaps"
    );
    seen
}

fn assert_intact(path: &std::path::Path) {
    let check: String = raw(path)
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_full_disk_is_full_or_unknown_and_a_re_append_stores_exactly_once() {
    let Some(mut disk) = SmallTmpfs::mount("2M", "a_real_full_disk") else {
        return;
    };
    let path = disk.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let before = seed(&store, "m-1", 3).await;
    disk.fill();

    let (refused, error) = append_until_failure(&store, 20_000, 200).await;
    eprintln!("first failure: {error}");
    let kind = error.store_kind();
    assert!(
        matches!(
            kind,
            Some(StoreErrorKind::Full | StoreErrorKind::OutcomeUnknown)
        ),
        "{error}"
    );
    assert!(error.to_string().contains("full"), "{error}");
    // Reads go on, and nothing stored before is lost.
    let kept = assert_kept(&store, &before).await;

    disk.free();
    // The same events again, with the same ids: stored once, whatever the failed attempt did.
    let out = store
        .append(&meter("notes"), ExpectedVersion::Any, refused.clone())
        .await
        .expect("the re-append");
    let again = store
        .append(&meter("notes"), ExpectedVersion::Any, refused.clone())
        .await
        .expect("a second re-append is idempotent");
    assert_eq!(out, again);
    let seen = assert_stored_once(&store).await;
    for event in &refused {
        assert_eq!(seen.get(&event.event_id), Some(&1));
    }
    assert!(store.read_all(1, usize::MAX).await.unwrap().len() > kept.len());
    // And the store serves the next appends as usual.
    let version = store.stream_version(&meter("m-1")).await.unwrap();
    store
        .append(
            &meter("m-1"),
            ExpectedVersion::Exact(version),
            vec![reading(4)],
        )
        .await
        .unwrap();
    assert_kept(&store, &before).await;
    store.close().await.unwrap();
    assert_intact(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_real_io_error_a_healthy_disk_serves_the_next_append_and_a_re_append_stores_once() {
    let Some(mut disk) = FailingDisk::new("after_a_real_io_error") else {
        return;
    };
    let path = disk.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let before = seed(&store, "m-1", 3).await;
    disk.break_writes();

    let (refused, error) = append_until_failure(&store, 4_000, 200).await;
    eprintln!("first failure: {error}");
    assert!(
        matches!(
            error.store_kind(),
            Some(StoreErrorKind::Io | StoreErrorKind::OutcomeUnknown)
        ),
        "an I/O error is not {:?}: {error}",
        error.store_kind()
    );
    assert!(error.to_string().contains("I/O error"), "{error}");
    // While the device fails, writes keep failing as I/O errors, never as corruption.
    for _ in 0..3 {
        let failed = store
            .append(&meter("other"), ExpectedVersion::Any, vec![note(4_000)])
            .await;
        if let Err(error) = failed {
            assert!(
                matches!(
                    error.store_kind(),
                    Some(StoreErrorKind::Io | StoreErrorKind::OutcomeUnknown)
                ),
                "{error}"
            );
        }
    }

    disk.mend();
    // A healthy disk: the next append is served normally, right after the head.
    let version = store.stream_version(&meter("m-1")).await.unwrap();
    assert_eq!(version, 3);
    let head = store.head_position().await.unwrap();
    let out = store
        .append(&meter("m-1"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .expect("the next append on a healthy disk");
    assert_eq!((out.version, out.last_position), (4, head + 1));
    // The events of the failed append, re-appended with their ids: stored exactly once.
    store
        .append(&meter("notes"), ExpectedVersion::Any, refused.clone())
        .await
        .expect("the re-append");
    let seen = assert_stored_once(&store).await;
    for event in &refused {
        assert_eq!(seen.get(&event.event_id), Some(&1));
    }
    assert_kept(&store, &before).await;
    store.close().await.unwrap();

    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let seen_after = assert_stored_once(&store).await;
    assert_eq!(seen, seen_after, "what was stored survives a reopen");
    store.close().await.unwrap();
    assert_intact(&path);
}
