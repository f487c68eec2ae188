//! The archive cases the SQLite and the PostgreSQL store both run, one body each:
//! event-sqlite/tests/archive.rs and event-postgres/tests/archive.rs name the cases, open
//! their store and say what only it can check ([`Subject`]), so each store runs the same
//! steps and assertions.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use eventfold_core::archive::{self, ArchiveRange, ArchiveState, Progress};
use eventfold_core::{
    AppendRequest, ArchiveStore, Error, ExpectedVersion, Metadata, NewEvent, RecordedEvent,
    Snapshot, StreamId,
};

/// A store under test, and what only it can check.
pub trait Subject {
    /// The store.
    fn store(&self) -> &dyn ArchiveStore;
    /// A part of the name its manifests give it that tells it from others (its file, its
    /// schema).
    fn label(&self) -> String;
    /// The store's own check of what it holds, where it has one: fails unless clean.
    fn check_clean(&self) -> impl Future<Output = ()>;
    /// The checksums it keeps, by position, read from its tables (none where its rows
    /// carry none).
    fn checksums(&self) -> Vec<(i64, i64)>;
    /// Closes it at the end of a case.
    fn close(&self) -> impl Future<Output = ()>;
}

/// The cases' streams.
pub fn stream(id: &str) -> StreamId {
    StreamId::new("Meter", id)
}

/// An event with metadata, so the round trip carries some.
pub fn reading(units: u64) -> NewEvent {
    NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "MeterRead".to_owned(),
        schema_version: 1,
        occurred_at: chrono::Utc::now(),
        metadata: Metadata::new().with("by", "archive test"),
        payload: format!(r#"{{"units":{units}}}"#),
    }
}

fn snapshot(id: &str, version: u64) -> Snapshot {
    Snapshot {
        aggregate_type: "Meter".into(),
        aggregate_id: id.into(),
        version,
        schema_version: 1,
        state: "{}".into(),
        taken_at: chrono::Utc::now(),
    }
}

/// `streams` streams of `per_stream` events each, appended in batches of 1,000 events
/// (interleaved: each batch holds ten events of each of 100 streams).
pub async fn fill(store: &dyn ArchiveStore, streams: u64, per_stream: u64) {
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
            requests.push(AppendRequest {
                stream: stream(&format!("m-{id}")),
                expected: ExpectedVersion::Exact(*done),
                events: (0..take).map(|i| reading(*done + i)).collect(),
            });
            *done += take;
            remaining -= take;
        }
        store.append_batch(requests).await.unwrap();
    }
}

/// Appends `count` single-event appends to stream `id`.
async fn seed(store: &dyn ArchiveStore, id: &str, count: u64) {
    for units in 1..=count {
        store
            .append(&stream(id), ExpectedVersion::Any, vec![reading(units)])
            .await
            .unwrap();
    }
}

/// Every event the store holds (not what it archived), in order.
pub async fn all_stored(store: &dyn ArchiveStore) -> Vec<RecordedEvent> {
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

/// Fails unless `result` is an `Archived` error naming `archive` and `what`.
#[track_caller]
pub fn archived<T: std::fmt::Debug>(result: Result<T, Error>, archive: uuid::Uuid, what: &str) {
    match result {
        Err(Error::Archived {
            archive: named,
            what: asked,
            ..
        }) => {
            assert_eq!(named, archive);
            assert_eq!(asked, what);
        }
        other => panic!("expected an Archived error for {what}, got {other:?}"),
    }
}

/// Exports everything into `dir/name`.
pub async fn export_all(store: &dyn ArchiveStore, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    archive::export(
        store,
        ArchiveRange::BelowPosition(u64::MAX),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    path
}

/// The 100,000-event round trip: export, verify, prune, the horizon's typed errors,
/// restore, every event identical.
pub async fn a_round_trip_of_100_000_events_restores_every_event_exactly(subject: impl Subject) {
    let store = subject.store();
    let dir = tempfile::tempdir().unwrap();
    fill(store, 1_000, 100).await;
    let before = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(before.len(), 100_000);
    let sums_before = subject.checksums();
    store.save_checkpoint("projection", 100_000).await.unwrap();
    // The first 60,000 positions: whole streams and parts of others. The parts need a
    // snapshot covering them; give every stream one at version 100 (its last).
    for i in 0..1_000 {
        store
            .save_snapshot(snapshot(&format!("m-{i}"), 100))
            .await
            .unwrap();
    }
    let path = dir.path().join("old.archive.gz");
    let mut seen = Vec::new();
    let manifest = archive::export(
        store,
        ArchiveRange::BelowPosition(60_001),
        &path,
        &mut |p: Progress| seen.push(p),
    )
    .await
    .unwrap();
    assert_eq!(manifest.events, 60_000);
    assert_eq!(
        (manifest.first_position, manifest.last_position),
        (Some(1), Some(60_000))
    );
    assert_eq!(
        seen.last(),
        Some(&Progress {
            done: 60_000,
            total: 60_000
        })
    );
    assert_eq!(manifest.store, store.archive_store_name());
    assert!(
        manifest.store.contains(&subject.label()),
        "{}",
        manifest.store
    );
    assert_eq!(archive::read_manifest(&path).await.unwrap(), manifest);
    let verified = archive::verify(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);

    archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let verified = archive::verify(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Pruned);
    assert_eq!(store.head_position().await.unwrap(), 100_000);
    assert_eq!(all_stored(store).await, before[60_000..].to_vec());
    assert_eq!(store.statistics().await.unwrap().events, 40_000);
    let horizon = store.archive_horizon().await.unwrap();
    assert_eq!(horizon.len(), 1);
    assert_eq!(
        (
            horizon[0].archive,
            horizon[0].events,
            horizon[0].streams.len()
        ),
        (manifest.archive, 60_000, 1_000)
    );
    // The pruned positions and versions are no damage to the store's own check.
    subject.check_clean().await;

    // Reading below the horizon names the archive: the log, a stream, an event by id.
    let first = &before[0];
    let id = manifest.archive;
    archived(store.read_all(1, 10).await, id, "position 1");
    archived(store.read_all(59_990, 100).await, id, "position 59990");
    archived(
        store.read_stream(&first.stream_id(), 1).await,
        id,
        &format!("stream {} from version 1", first.stream_id()),
    );
    archived(
        store.get(first.event_id).await,
        id,
        &format!("event {}", first.event_id),
    );
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
    archived(
        store.read_stream(&first.stream_id(), 60).await,
        id,
        &format!("stream {} from version 60", first.stream_id()),
    );
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
            vec![reading(1)],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::VersionConflict { actual: 100, .. }),
        "{error}"
    );

    archive::restore(store, &path, &mut archive::no_progress)
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
    assert_eq!(subject.checksums(), sums_before);
    subject.check_clean().await;
    let verified = archive::verify(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);
    subject.close().await;
}

pub async fn a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off(
    subject: impl Subject,
) {
    let store = subject.store();
    let dir = tempfile::tempdir().unwrap();
    seed(store, "a", 10).await;
    store.save_checkpoint("ahead", 10).await.unwrap();
    store.save_checkpoint("behind", 4).await.unwrap();
    let path = export_all(store, dir.path(), "lag.gz").await;
    // The dry run finds the same refusal.
    let dry = archive::check_prune(store, &path, &mut archive::no_progress).await;
    assert!(
        matches!(&dry, Err(Error::PruneBehindSubscription { subscription, .. }) if subscription == "behind"),
        "{dry:?}"
    );
    let error = archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    match &error {
        Error::PruneBehindSubscription {
            subscription,
            checkpoint,
            needed,
        } => assert_eq!(
            (subscription.as_str(), *checkpoint, *needed),
            ("behind", 4, 10)
        ),
        other => panic!("expected PruneBehindSubscription, got {other:?}"),
    }
    // Nothing was removed.
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
    assert!(store.archive_horizon().await.unwrap().is_empty());
    // Caught up, the same archive prunes.
    store.save_checkpoint("behind", 10).await.unwrap();
    archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert!(store.read_stored(1, 100).await.unwrap().is_empty());
    assert!(matches!(
        store.read_stream(&stream("a"), 1).await,
        Err(Error::Archived { .. })
    ));
    // The whole stream went; appends number on after it.
    let outcome = store
        .append(&stream("a"), ExpectedVersion::Exact(10), vec![reading(11)])
        .await
        .unwrap();
    assert_eq!((outcome.version, outcome.first_position), (11, 11));
    subject.close().await;
}

pub async fn a_prune_that_would_leave_a_stream_unloadable_is_refused(subject: impl Subject) {
    let store = subject.store();
    let dir = tempfile::tempdir().unwrap();
    seed(store, "a", 10).await;
    let path = dir.path().join("part.gz");
    archive::export(
        store,
        ArchiveRange::BelowPosition(6),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    // No snapshot: the rest of the stream could not be loaded.
    let error = archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::PruneBreaksStream {
                pruned: 5,
                snapshot: None,
                ..
            }
        ),
        "{error:?}"
    );
    let dry = archive::check_prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert_eq!(dry.to_string(), error.to_string());
    // A snapshot at the last pruned version: a load replays from it, still refused.
    store.save_snapshot(snapshot("a", 5)).await.unwrap();
    let error = archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::PruneBreaksStream {
                pruned: 5,
                snapshot: Some(5),
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
    assert_eq!(store.read_stream(&stream("a"), 1).await.unwrap().len(), 10);
    // Above it: pruned, and the stream reads from the snapshot's version on.
    store.save_snapshot(snapshot("a", 6)).await.unwrap();
    archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_stream(&stream("a"), 6).await.unwrap().len(), 5);
    subject.close().await;
}

pub async fn reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap(
    subject: impl Subject,
) {
    let store = subject.store();
    let dir = tempfile::tempdir().unwrap();
    // a1 b1 a2 b2 a3 b3 at positions 1..6; then b goes on after the cut-off.
    for n in 1..=3 {
        for id in ["a", "b"] {
            store
                .append(&stream(id), ExpectedVersion::Any, vec![reading(n)])
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
        .append(&stream("b"), ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    let path = dir.path().join("a.gz");
    let manifest = archive::export(
        store,
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
    archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    // Pruning again does nothing.
    archive::prune(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let id = manifest.archive;
    archived(store.read_all(1, 10).await, id, "position 1");
    archived(store.read_all(2, 2).await, id, "position 3");
    archived(store.read_all(4, 10).await, id, "position 5");
    let b: Vec<u64> = store
        .read_all(2, 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(b, [2]);
    assert_eq!(store.read_all(6, 10).await.unwrap().len(), 2);
    assert_eq!(store.read_stream(&stream("b"), 1).await.unwrap().len(), 4);
    assert_eq!(store.statistics().await.unwrap().events, 4);
    // The stream pruned whole: its version stays, a read names the archive, and an append
    // numbers on after the pruned versions.
    let a = stream("a");
    assert_eq!(store.stream_version(&a).await.unwrap(), 3);
    archived(
        store.read_stream(&a, 1).await,
        id,
        "stream Meter/a from version 1",
    );
    let out = store
        .append(&a, ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    assert_eq!((out.version, out.first_position), (4, 8));
    assert_eq!(store.read_stream(&a, 4).await.unwrap().len(), 1);
    // Restoring twice: the second finds every event stored and does nothing.
    archive::restore(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 8);
    let versions: Vec<u64> = store
        .read_stream(&a, 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    subject.close().await;
}
