//! Archiving on PostgreSQL: the cases SQLite runs too (tests/common/archive_cases.rs: the
//! 100,000-event round trip, the refusals of a subscription behind and of a stream left
//! unloadable, the reads across a pruned stream's gaps), and PostgreSQL's own: a segment
//! behind, prunes racing appends, an append waiting for a prune.

#[path = "../../tests/common/archive_cases.rs"]
mod cases;
mod common;

use cases::{all_stored, archived, export_all, fill, reading};
use eventfold_core::archive::{self, ArchiveRange};
use eventfold_core::lease::LeaseStore;
use eventfold_core::{ArchiveStore, Error, EventLog, ExpectedVersion, SubscriptionStore};
use eventfold_postgres::PostgresEventStore;

/// A store in a schema of its own, for the shared cases (dropped with it).
struct InSchema {
    store: PostgresEventStore,
    schema: common::Schema,
}

impl InSchema {
    /// `None` without a server (the case is skipped).
    async fn new() -> Option<Self> {
        if common::no_server() {
            return None;
        }
        let schema = common::Schema::new();
        Some(InSchema {
            store: schema.open().await,
            schema,
        })
    }
}

impl cases::Subject for InSchema {
    fn store(&self) -> &dyn ArchiveStore {
        &self.store
    }

    fn label(&self) -> String {
        self.schema.name.clone()
    }

    /// PostgreSQL has no check of its own beyond the archive's `verify`.
    async fn check_clean(&self) {}

    /// Its rows carry no checksums.
    fn checksums(&self) -> Vec<(i64, i64)> {
        Vec::new()
    }

    async fn close(&self) {
        self.store.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_of_100_000_events_restores_every_event_exactly() {
    if let Some(subject) = InSchema::new().await {
        cases::a_round_trip_of_100_000_events_restores_every_event_exactly(subject).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off() {
    if let Some(subject) = InSchema::new().await {
        cases::a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off(subject).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_that_would_leave_a_stream_unloadable_is_refused() {
    if let Some(subject) = InSchema::new().await {
        cases::a_prune_that_would_leave_a_stream_unloadable_is_refused(subject).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap() {
    if let Some(subject) = InSchema::new().await {
        cases::reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap(subject).await;
    }
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
    let path = export_all(&store, dir.path(), "segments.gz").await;
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
    let path = export_all(&store, dir.path(), "a.gz").await;

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
