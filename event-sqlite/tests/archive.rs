//! Archiving on a real SQLite file: export, verify, prune, the horizon's typed errors,
//! restore, and the refusals.

mod common;

use std::collections::HashMap;

use common::{MeterEvent, meter};
use eventfold_core::archive::{self, ArchiveRange, ArchiveState, Progress, RetentionRule};
use eventfold_core::{
    AppendRequest, ArchiveStore, Error, EventLog, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent, Snapshot, SnapshotStore, SubscriptionStore,
};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

async fn open(dir: &tempfile::TempDir) -> SqliteEventStore {
    // The test is about archiving, not durability: no fsync per write.
    let options = SqliteOptions::new().synchronous(eventfold_sqlite::Synchronous::Normal);
    SqliteEventStore::open(dir.path().join("store.db"), options)
        .await
        .unwrap()
}

/// `streams` streams of `per_stream` events each, appended in batches of 1,000 events
/// (interleaved: each batch holds ten events of each of 100 streams).
async fn fill(store: &SqliteEventStore, streams: u64, per_stream: u64) {
    let mut version = HashMap::new();
    let mut remaining: u64 = streams * per_stream;
    let mut next_stream = 0;
    while remaining > 0 {
        let mut requests: Vec<AppendRequest> = Vec::new();
        for _ in 0..100.min(streams) {
            let id = next_stream % streams;
            next_stream += 1;
            let done: &mut u64 = version.entry(id).or_default();
            let take = 10.min(per_stream - *done).min(remaining);
            if take == 0 {
                continue;
            }
            let events = (0..take)
                .map(|i| {
                    NewEvent::from_event(
                        &MeterEvent::Read { units: *done + i },
                        Metadata::new().with("by", "archive test"),
                    )
                    .unwrap()
                })
                .collect();
            requests.push(AppendRequest {
                stream: meter(&format!("m-{id}")),
                expected: ExpectedVersion::Exact(*done),
                events,
            });
            *done += take;
            remaining -= take;
        }
        store.append_batch(requests).await.unwrap();
    }
}

async fn all_stored(store: &SqliteEventStore) -> Vec<RecordedEvent> {
    let mut events = Vec::new();
    let mut from = 1;
    loop {
        let batch = store.read_stored(from, 10_000).await.unwrap();
        let Some(last) = batch.last() else {
            return events;
        };
        from = last.position + 1;
        events.extend(batch);
    }
}

/// The checksums the store keeps, by position, read from the file itself.
fn checksums(path: &std::path::Path) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT position, checksum FROM events ORDER BY position")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_of_100_000_events_restores_every_event_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    fill(&store, 1_000, 100).await;
    let before = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(before.len(), 100_000);
    let sums_before = checksums(&dir.path().join("store.db"));
    store.save_checkpoint("projection", 100_000).await.unwrap();

    // The first 60,000 positions: whole streams and parts of others. The parts need a
    // snapshot covering them; give every stream one at version 100 (its last).
    for i in 0..1_000 {
        store
            .save_snapshot(Snapshot {
                aggregate_type: "Meter".into(),
                aggregate_id: format!("m-{i}"),
                version: 100,
                schema_version: 1,
                state: "{}".into(),
                taken_at: chrono::Utc::now(),
            })
            .await
            .unwrap();
    }
    let path = dir.path().join("old.archive.gz");
    let mut seen = Vec::new();
    let manifest = archive::export(
        &store,
        ArchiveRange::BelowPosition(60_001),
        &path,
        &mut |p: Progress| seen.push(p),
    )
    .await
    .unwrap();
    assert_eq!(manifest.events, 60_000);
    assert_eq!(manifest.first_position, Some(1));
    assert_eq!(manifest.last_position, Some(60_000));
    assert_eq!(
        seen.last(),
        Some(&Progress {
            done: 60_000,
            total: 60_000
        })
    );
    assert_eq!(archive::read_manifest(&path).await.unwrap(), manifest);

    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);

    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Pruned);
    assert_eq!(store.head_position().await.unwrap(), 100_000);
    assert_eq!(all_stored(&store).await, before[60_000..].to_vec());
    // The pruned positions and versions are no damage to the store's own check.
    let report = store.verify().await.unwrap();
    assert!(report.is_clean(), "{report:?}");

    // Reading below the horizon names the archive.
    let archived = |result: Result<_, Error>| match result {
        Err(Error::Archived { archive, .. }) => assert_eq!(archive, manifest.archive),
        other => panic!("expected an Archived error, got {other:?}"),
    };
    let first = &before[0];
    archived(store.read_all(1, 10).await.map(drop));
    archived(store.read_all(59_990, 100).await.map(drop));
    archived(store.read_stream(&first.stream_id(), 1).await.map(drop));
    archived(store.get(first.event_id).await.map(drop));
    assert_eq!(
        store.read_all(60_001, 5).await.unwrap(),
        before[60_000..60_005].to_vec()
    );
    // Each stream lost versions 1 to 60 and reads from 61 on; from 60 it names the archive.
    assert_eq!(
        store
            .read_stream(&first.stream_id(), 61)
            .await
            .unwrap()
            .len(),
        40
    );
    archived(store.read_stream(&first.stream_id(), 60).await.map(drop));
    // Streams keep their versions: appends go on after them.
    assert_eq!(store.stream_version(&first.stream_id()).await.unwrap(), 100);
    assert!(
        store
            .read_stream(&first.stream_id(), 101)
            .await
            .unwrap()
            .is_empty()
    );
    let error = store
        .append(
            &first.stream_id(),
            ExpectedVersion::NoStream,
            vec![common::reading(1)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::VersionConflict { actual: 100, .. }),
        "{error}"
    );

    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert!(store.archive_horizon().await.unwrap().is_empty());
    let after = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(after.len(), before.len());
    for (a, b) in after.iter().zip(&before) {
        // Field by field (RecordedEvent's equality compares every one of them).
        assert_eq!(a, b);
        assert_eq!(a.recorded_at, b.recorded_at);
        assert_eq!(a.metadata, b.metadata);
    }
    assert_eq!(checksums(&dir.path().join("store.db")), sums_before);
    assert!(store.verify().await.unwrap().is_clean());
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 10).await;
    store.save_checkpoint("fast", 10).await.unwrap();
    store.save_checkpoint("slow", 3).await.unwrap();
    let path = dir.path().join("a.gz");
    archive::export(
        &store,
        ArchiveRange::StreamsIdleBefore(chrono::Utc::now()),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    // The dry run finds the same refusal.
    let dry = archive::check_prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(&dry, Error::PruneBehindSubscription { subscription, .. } if subscription == "slow"),
        "{dry:?}"
    );
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    match error {
        Error::PruneBehindSubscription {
            subscription,
            checkpoint,
            needed,
        } => {
            assert_eq!((subscription.as_str(), checkpoint, needed), ("slow", 3, 10));
        }
        other => panic!("expected PruneBehindSubscription, got {other:?}"),
    }
    // Nothing was removed.
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
    assert!(store.archive_horizon().await.unwrap().is_empty());
    // Once the subscription has passed, the same archive prunes.
    store.save_checkpoint("slow", 10).await.unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert!(matches!(
        store.read_stream(&meter("a"), 1).await,
        Err(Error::Archived { .. })
    ));
    // The whole stream went; appends number on after it.
    let outcome = store
        .append(
            &meter("a"),
            ExpectedVersion::Exact(10),
            vec![common::reading(11)],
        )
        .await
        .unwrap();
    assert_eq!((outcome.version, outcome.first_position), (11, 11));
}

#[tokio::test]
async fn a_prune_that_would_leave_a_stream_unloadable_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 10).await;
    let path = dir.path().join("a.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(6),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &error,
            Error::PruneBreaksStream {
                pruned: 5,
                snapshot: None,
                ..
            }
        ),
        "{error:?}"
    );
    let dry = archive::check_prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert_eq!(dry.to_string(), error.to_string());
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
}

#[tokio::test]
async fn a_damaged_archive_fails_verify_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 200).await;
    let path = dir.path().join("a.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(1_000),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let error = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ArchiveDamaged { .. }), "{error:?}");
    // Nor does a prune or a restore go ahead from it.
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ArchiveDamaged { .. }), "{error:?}");
    assert_eq!(store.read_all(1, 1_000).await.unwrap().len(), 200);
}

#[tokio::test]
async fn an_archive_of_an_empty_range_holds_no_events_and_prunes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let path = dir.path().join("empty.gz");
    let manifest = archive::export(
        &store,
        ArchiveRange::BelowPosition(100),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    assert_eq!((manifest.events, manifest.first_position), (0, None));
    common::seed(&store, "a", 3).await;
    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 3);
    // An export never overwrites a file.
    let error = archive::export(
        &store,
        ArchiveRange::BelowPosition(100),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::ArchiveFile { .. }), "{error:?}");
}

#[tokio::test]
async fn retention_keeps_the_newest_events_a_snapshot_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 10).await;
    common::seed(&store, "b", 10).await;
    store
        .save_snapshot(Snapshot {
            aggregate_type: "Meter".into(),
            aggregate_id: "a".into(),
            version: 6,
            schema_version: 1,
            state: "{}".into(),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let path = dir.path().join("retention.gz");
    // Keep 3 events per Meter stream: `a` may lose 7, but keeps its snapshot's version 6
    // (a load replays from it) and what follows, so it loses 5; `b` has no snapshot and
    // keeps everything.
    let rules = vec![RetentionRule::stream_type("Meter").max_count(3)];
    let manifest = archive::apply_retention(&store, rules, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(manifest.events, 5);
    assert_eq!(store.read_stream(&meter("a"), 6).await.unwrap().len(), 5);
    assert!(matches!(
        store.read_stream(&meter("a"), 1).await,
        Err(Error::Archived { .. })
    ));
    assert_eq!(store.read_stream(&meter("b"), 1).await.unwrap().len(), 10);
}

#[tokio::test]
async fn reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    // a1 b1 a2 b2 a3 b3 at positions 1..6; then b goes on after the cut-off.
    for units in 1..=3 {
        for id in ["a", "b"] {
            store
                .append(
                    &meter(id),
                    ExpectedVersion::Any,
                    vec![common::reading(units)],
                )
                .await
                .unwrap();
        }
    }
    let last = store.read_all(1, 10).await.unwrap().pop().unwrap();
    while chrono::Utc::now() <= last.recorded_at {
        tokio::task::yield_now().await;
    }
    let cut_off = chrono::Utc::now();
    store
        .append(
            &meter("b"),
            ExpectedVersion::Exact(3),
            vec![common::reading(4)],
        )
        .await
        .unwrap();
    let path = dir.path().join("a.gz");
    let manifest = archive::export(
        &store,
        ArchiveRange::StreamsIdleBefore(cut_off),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    assert_eq!(
        (
            manifest.events,
            manifest.first_position,
            manifest.last_position
        ),
        (3, Some(1), Some(5))
    );
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    // Pruning again does nothing.
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let gap_at = |result: Result<Vec<RecordedEvent>, Error>, position: u64| match result {
        Err(Error::Archived { archive, what, .. }) => {
            assert_eq!(archive, manifest.archive);
            assert_eq!(what, format!("position {position}"));
        }
        other => panic!("expected an Archived error at {position}, got {other:?}"),
    };
    gap_at(store.read_all(1, 10).await, 1);
    gap_at(store.read_all(2, 2).await, 3);
    gap_at(store.read_all(4, 10).await, 5);
    let b: Vec<u64> = store
        .read_all(2, 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(b, [2]);
    assert_eq!(store.read_all(6, 10).await.unwrap().len(), 2);
    assert_eq!(store.read_stream(&meter("b"), 1).await.unwrap().len(), 4);
    assert_eq!(store.statistics().await.unwrap().events, 4);
    // Restoring twice: the second finds every event stored and does nothing.
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 7);
}
