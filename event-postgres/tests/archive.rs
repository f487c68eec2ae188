//! Archiving on PostgreSQL: the 100,000-event round trip (export, verify, prune, the
//! horizon's typed errors, restore, every event identical), the refusals (a subscription
//! or a segment behind, a stream left unloadable), the reads across a pruned stream's
//! gaps, a stream pruned whole numbering on, and prunes racing appends.

mod common;

use std::collections::HashMap;

use eventfold_core::archive::{self, ArchiveRange, ArchiveState, Progress};
use eventfold_core::lease::LeaseStore;
use eventfold_core::{
    AppendRequest, ArchiveStore, Error, EventLog, ExpectedVersion, Metadata, NewEvent,
    RecordedEvent, Snapshot, SnapshotStore, SubscriptionStore,
};
use eventfold_postgres::PostgresEventStore;

/// An event of the tests' type with metadata, so the round trip carries some.
fn reading(n: u64) -> NewEvent {
    NewEvent {
        metadata: Metadata::new().with("by", "archive test"),
        ..common::event(n)
    }
}

/// `streams` streams of `per_stream` events each, appended in batches of 1,000 events
/// (interleaved: each batch holds ten events of each of 100 streams).
async fn fill(store: &PostgresEventStore, streams: u64, per_stream: u64) {
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
                stream: common::stream(&format!("m-{id}")),
                expected: ExpectedVersion::Exact(*done),
                events: (0..take).map(|i| reading(*done + i)).collect(),
            });
            *done += take;
            remaining -= take;
        }
        store.append_batch(requests).await.unwrap();
    }
}

async fn all_stored(store: &PostgresEventStore) -> Vec<RecordedEvent> {
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

fn snapshot(id: &str, version: u64) -> Snapshot {
    Snapshot {
        aggregate_type: "Tested".into(),
        aggregate_id: id.into(),
        version,
        schema_version: 1,
        state: "{}".into(),
        taken_at: chrono::Utc::now(),
    }
}

#[track_caller]
fn archived<T: std::fmt::Debug>(result: Result<T, Error>, archive: uuid::Uuid, what: &str) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_of_100_000_events_restores_every_event_exactly() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    fill(&store, 1_000, 100).await;
    let before = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(before.len(), 100_000);
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
        &store,
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
    assert!(manifest.store.contains(&schema.name), "{}", manifest.store);
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
    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);
    store.close().await.unwrap();
}

/// Exports everything and tries to prune it, for the refusals below.
async fn export_all(
    store: &PostgresEventStore,
    dir: &tempfile::TempDir,
    name: &str,
) -> std::path::PathBuf {
    let path = dir.path().join(name);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    for n in 1..=10 {
        store
            .append(&common::stream("a"), ExpectedVersion::Any, vec![reading(n)])
            .await
            .unwrap();
    }
    store.save_checkpoint("ahead", 10).await.unwrap();
    store.save_checkpoint("behind", 4).await.unwrap();
    let path = export_all(&store, &dir, "lag.gz").await;
    let dry = archive::check_prune(&store, &path, &mut archive::no_progress).await;
    assert!(
        matches!(&dry, Err(Error::PruneBehindSubscription { subscription, .. }) if subscription == "behind"),
        "{dry:?}"
    );
    let error = archive::prune(&store, &path, &mut archive::no_progress)
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
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
    assert!(store.archive_horizon().await.unwrap().is_empty());
    // Caught up, the same archive prunes.
    store.save_checkpoint("behind", 10).await.unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert!(store.read_stored(1, 100).await.unwrap().is_empty());
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_is_refused_while_a_segment_has_never_saved_its_checkpoint() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    for n in 1..=6 {
        store
            .append(
                &common::stream(&format!("s-{n}")),
                ExpectedVersion::NoStream,
                vec![reading(n)],
            )
            .await
            .unwrap();
    }
    // A subscription split in two: segment 0 is past everything, segment 1 never saved.
    let leases = store
        .claim_segments("split", "member", 2, 2, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leases.len(), 2);
    store.save_segment_checkpoint(&leases[0], 6).await.unwrap();
    let path = export_all(&store, &dir, "segments.gz").await;
    // The dry run sees it too: segment 0's checkpoint names the count.
    let dry = archive::check_prune(&store, &path, &mut archive::no_progress).await;
    assert!(
        matches!(&dry, Err(Error::PruneBehindSubscription { subscription, .. }) if subscription == "split#1/2"),
        "{dry:?}"
    );
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    match &error {
        Error::PruneBehindSubscription {
            subscription,
            checkpoint,
            ..
        } => assert_eq!((subscription.as_str(), *checkpoint), ("split#1/2", 0)),
        other => panic!("expected PruneBehindSubscription, got {other:?}"),
    }
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 6);
    store.save_segment_checkpoint(&leases[1], 6).await.unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_that_would_leave_a_stream_unloadable_is_refused() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    for n in 1..=10 {
        store
            .append(&common::stream("a"), ExpectedVersion::Any, vec![reading(n)])
            .await
            .unwrap();
    }
    let path = dir.path().join("part.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(6),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    // No snapshot: the rest of the stream could not be loaded.
    let error = archive::prune(&store, &path, &mut archive::no_progress)
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
    // A snapshot at the last pruned version: a load replays from it, still refused.
    store.save_snapshot(snapshot("a", 5)).await.unwrap();
    let error = archive::prune(&store, &path, &mut archive::no_progress)
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
    assert_eq!(
        store
            .read_stream(&common::stream("a"), 1)
            .await
            .unwrap()
            .len(),
        10
    );
    // Above it: pruned, and the stream reads from the snapshot's version on.
    store.save_snapshot(snapshot("a", 6)).await.unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(
        store
            .read_stream(&common::stream("a"), 6)
            .await
            .unwrap()
            .len(),
        5
    );
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    // a1 b1 a2 b2 a3 b3 at positions 1..6; then b goes on after the cut-off.
    for n in 1..=3 {
        for id in ["a", "b"] {
            store
                .append(&common::stream(id), ExpectedVersion::Any, vec![reading(n)])
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
            &common::stream("b"),
            ExpectedVersion::Exact(3),
            vec![reading(4)],
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
    assert_eq!(
        store
            .read_stream(&common::stream("b"), 1)
            .await
            .unwrap()
            .len(),
        4
    );
    // The stream pruned whole: its version stays, a read names the archive, and an append
    // numbers on after the pruned versions.
    let a = common::stream("a");
    assert_eq!(store.stream_version(&a).await.unwrap(), 3);
    archived(
        store.read_stream(&a, 1).await,
        id,
        "stream Tested/a from version 1",
    );
    let out = store
        .append(&a, ExpectedVersion::Exact(3), vec![reading(4)])
        .await
        .unwrap();
    assert_eq!((out.version, out.first_position), (4, 8));
    assert_eq!(store.read_stream(&a, 4).await.unwrap().len(), 1);
    // Restoring twice: the second finds every event stored and does nothing.
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(&store, &path, &mut archive::no_progress)
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
    store.close().await.unwrap();
}

/// Appends go on from several tasks while an archive is pruned and then restored: every
/// append is stored once, at dense positions after the pruned ones, none is lost or taken
/// by the prune, and the restore brings back exactly the archive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prunes_and_restores_racing_appends_lose_and_interleave_nothing() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    fill(&store, 100, 50).await;
    let before = store.read_all(1, usize::MAX).await.unwrap();
    let path = dir.path().join("race.gz");
    // Every stream so far, whole: none of them is appended to again.
    let cut_off = {
        let last = before.last().unwrap().recorded_at;
        while chrono::Utc::now() <= last {
            tokio::task::yield_now().await;
        }
        chrono::Utc::now()
    };
    let manifest = archive::export(
        &store,
        ArchiveRange::StreamsIdleBefore(cut_off),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    assert_eq!(manifest.events, 5_000);

    // Appenders on fresh streams, each a run of one-event appends that check their own
    // version, started before the prune and going on after it.
    let (go, _) = tokio::sync::watch::channel(false);
    let mut appenders = Vec::new();
    for task in 0..4 {
        let store = store.clone();
        let mut started = go.subscribe();
        appenders.push(tokio::spawn(async move {
            let stream = common::stream(&format!("live-{task}"));
            let mut outcomes = Vec::new();
            for version in 0..200u64 {
                if version == 20 {
                    // The prune starts once every appender is under way.
                    let _ = started.wait_for(|go| *go).await;
                }
                outcomes.push(
                    store
                        .append(
                            &stream,
                            ExpectedVersion::Exact(version),
                            vec![reading(version)],
                        )
                        .await
                        .unwrap(),
                );
            }
            outcomes
        }));
    }
    common::until("every appender is under way", async || {
        store.head_position().await.unwrap() >= 5_000 + 4 * 20
    })
    .await;
    go.send_replace(true);
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let mut positions = Vec::new();
    for appender in appenders {
        let outcomes = appender.await.unwrap();
        for (version, outcome) in (1..).zip(&outcomes) {
            assert_eq!(outcome.version, version);
            positions.push(outcome.first_position);
        }
    }
    positions.sort_unstable();
    let expected: Vec<u64> = (5_001..=5_800).collect();
    assert_eq!(positions, expected, "dense positions after the pruned ones");
    let stored = all_stored(&store).await;
    assert_eq!(stored.len(), 800);
    assert!(stored.iter().all(|e| e.aggregate_id.starts_with("live-")));
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let after = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(after[..5_000], before[..]);
    assert_eq!(after.len(), 5_800);
    store.close().await.unwrap();
}

/// The pid of a backend that `blocker` blocks, once there is one (waiting on it, not a
/// timer: the test goes on the moment the server reports the wait).
async fn blocked_by(client: &tokio_postgres::Client, blocker: i32, what: &str) -> i32 {
    let mut pid = None;
    common::until(what, async || {
        pid = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) LIMIT 1",
                &[&blocker],
            )
            .await
            .unwrap()
            .map(|row| row.get(0));
        pid.is_some()
    })
    .await;
    pid.unwrap()
}

/// An append that arrives while a prune runs waits for the prune's commit (the head row's
/// lock) and then numbers on after the pruned versions: it can neither slip an event into
/// a stream the prune takes whole nor take a version the archive holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_during_a_prune_waits_for_it_and_numbers_on_after_it() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let dir = tempfile::tempdir().unwrap();
    let a = common::stream("a");
    for n in 1..=3 {
        store
            .append(&a, ExpectedVersion::Any, vec![reading(n)])
            .await
            .unwrap();
    }
    store.save_checkpoint("reader", 3).await.unwrap();
    let path = export_all(&store, &dir, "a.gz").await;

    // A checkpoint save of the tests' own, left open: the prune takes the head row's lock,
    // then waits for it at the checkpoints' lock.
    let holder = common::raw().await;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    holder
        .batch_execute(&format!(
            "BEGIN; UPDATE {}.ef_checkpoints SET position = 3 WHERE subscription = 'reader'",
            schema.name
        ))
        .await
        .unwrap();
    let pruning = {
        let store = store.clone();
        let path = path.clone();
        tokio::spawn(async move { archive::prune(&store, &path, &mut archive::no_progress).await })
    };
    let watcher = common::raw().await;
    let prune_pid = blocked_by(&watcher, holder_pid, "the prune to wait for the checkpoint").await;
    // The append arrives now, and waits for the prune's head row lock.
    let appending = {
        let store = store.clone();
        let a = a.clone();
        tokio::spawn(async move {
            store
                .append(&a, ExpectedVersion::Exact(3), vec![reading(4)])
                .await
        })
    };
    blocked_by(&watcher, prune_pid, "the append to wait for the prune").await;
    assert!(!appending.is_finished() && !pruning.is_finished());
    assert_eq!(store.read_stream(&a, 1).await.unwrap().len(), 3);

    holder.batch_execute("COMMIT").await.unwrap();
    pruning.await.unwrap().unwrap();
    let out = appending.await.unwrap().unwrap();
    assert_eq!((out.version, out.first_position), (4, 4));
    let horizon = store.archive_horizon().await.unwrap();
    assert_eq!(horizon.len(), 1);
    archived(
        store.read_stream(&a, 1).await,
        horizon[0].archive,
        "stream Tested/a from version 1",
    );
    let rest = store.read_stream(&a, 4).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].version, 4);
    store.close().await.unwrap();
}
