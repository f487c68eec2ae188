//! Group commit: appends queued together share one transaction, each keeping its own checks
//! and its own result.
//!
//! To make a group deterministic, a second connection holds the write lock while the
//! appends queue up behind the writer's first write (a blocker, waiting for the lock);
//! once the lock is released, everything queued joins the blocker's transaction.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use eventfold_core::{
    AppendOutcome, Error, EventLog, ExpectedVersion, StoreErrorKind, SubscriptionStore,
};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use tokio::task::JoinHandle;

/// Waits until `condition` holds, yielding between checks; fails after 10 s.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::task::yield_now().await;
    }
}

type Append = JoinHandle<Result<AppendOutcome, Error>>;

/// Runs `appends` in one group with a blocker append, which waits on a lock held by
/// another connection while the appends queue; then the lock is released.
async fn as_one_group<F, Fut>(
    store: &Arc<SqliteEventStore>,
    path: &std::path::Path,
    appends: F,
) -> (AppendOutcome, Vec<Append>)
where
    F: FnOnce() -> Vec<Fut>,
    Fut: Future<Output = Result<AppendOutcome, Error>> + Send + 'static,
{
    let other = raw(path);
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let blocker = {
        let store = Arc::clone(store);
        tokio::spawn(async move {
            store
                .append(&meter("blocker"), ExpectedVersion::Any, vec![reading(0)])
                .await
        })
    };
    // The writer has taken the blocker and waits for the lock.
    until("the writer takes the blocker", || {
        let stats = store.writer_statistics();
        (stats.in_progress, stats.queued) == (1, 0)
    })
    .await;
    let futures = appends();
    let n = futures.len();
    let tasks: Vec<Append> = futures.into_iter().map(tokio::spawn).collect();
    until("every append is queued", || {
        store.writer_statistics().queued == n
    })
    .await;
    other.execute_batch("COMMIT").unwrap();
    let blocked = blocker.await.unwrap().expect("the blocker append");
    (blocked, tasks)
}

fn open_options() -> SqliteOptions {
    SqliteOptions::new().busy_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_single_event_appends_share_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = Arc::new(SqliteEventStore::open(&path, open_options()).await.unwrap());

    let (blocker, tasks) = as_one_group(&store, &path, || {
        (0..64)
            .map(|i| {
                let store = Arc::clone(&store);
                async move {
                    store
                        .append(
                            &meter(&format!("m-{i}")),
                            ExpectedVersion::NoStream,
                            vec![reading(i)],
                        )
                        .await
                }
            })
            .collect()
    })
    .await;
    let mut outcomes = vec![blocker];
    for task in tasks {
        outcomes.push(task.await.unwrap().expect("every append succeeds"));
    }
    assert_gap_free(&outcomes);
    let stats = store.writer_statistics();
    assert_eq!((stats.appends, stats.writes), (65, 65));
    assert_eq!(stats.transactions, 1, "the blocker and the 64 together");

    let log = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(log.len(), 65);
    assert!(log.windows(2).all(|w| w[1].position == w[0].position + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conflicting_append_fails_alone_while_its_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = Arc::new(SqliteEventStore::open(&path, open_options()).await.unwrap());
    let before = seed(&*store, "contested", 2).await;

    let (blocker, tasks) = as_one_group(&store, &path, || {
        (0..10u64)
            .map(|i| {
                let store = Arc::clone(&store);
                // Task 4 expects a version the contested stream is not at.
                let (id, expected) = match i {
                    4 => ("contested".to_owned(), ExpectedVersion::Exact(1)),
                    _ => (format!("m-{i}"), ExpectedVersion::NoStream),
                };
                async move {
                    store
                        .append(&meter(&id), expected, vec![reading(i), reading(i + 100)])
                        .await
                }
            })
            .collect()
    })
    .await;
    let mut outcomes = vec![blocker];
    for (i, task) in tasks.into_iter().enumerate() {
        match (i, task.await.unwrap()) {
            (
                4,
                Err(Error::VersionConflict {
                    expected, actual, ..
                }),
            ) => {
                assert_eq!((expected, actual), (ExpectedVersion::Exact(1), 2));
            }
            (4, other) => panic!("expected a conflict, got {other:?}"),
            (_, result) => outcomes.push(result.expect("the others commit")),
        }
    }
    // Positions continue after the seed without a gap: the refused append took none.
    let mut positions: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.first_position..=o.last_position)
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, (3..=3 + 18).collect::<Vec<_>>());
    assert_eq!(
        store.writer_statistics().transactions,
        2 + 1,
        "the seed, then the blocker and the group"
    );
    assert_eq!(store.stream_version(&meter("contested")).await.unwrap(), 2);
    let log = assert_kept(&*store, &before).await;
    assert_eq!(log.len(), 2 + 1 + 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_that_overflows_the_size_cap_fails_alone_in_its_group() {
    overflow_in_a_group(|| (0..100).map(|_| note(4_000)).collect()).await;
}

/// A one-event append runs without a savepoint of its own (its single INSERT is undone by
/// SQLite alone); failing on a full database, it still fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_event_append_that_overflows_the_size_cap_fails_alone_in_its_group() {
    overflow_in_a_group(|| vec![note(400_000)]).await;
}

/// Five appends in one group, the middle one (`big`) far larger than the size cap allows.
async fn overflow_in_a_group(big: fn() -> Vec<eventfold_core::NewEvent>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let options = open_options().max_page_count(64);
    let store = Arc::new(SqliteEventStore::open(&path, options).await.unwrap());
    let before = seed(&*store, "m-0", 2).await;

    let (_, tasks) = as_one_group(&store, &path, || {
        (0..5u64)
            .map(|i| {
                let store = Arc::clone(&store);
                let events = if i == 2 { big() } else { vec![reading(i)] };
                async move {
                    store
                        .append(&meter(&format!("m-{i}")), ExpectedVersion::Any, events)
                        .await
                }
            })
            .collect()
    })
    .await;
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await.unwrap();
        if i == 2 {
            assert_eq!(store_kind(result), StoreErrorKind::Full);
        } else {
            result.expect("the appends that fit commit");
        }
    }
    assert_eq!(store.stream_version(&meter("m-2")).await.unwrap(), 0);
    // SQLite rolls the whole transaction back on a full database; the writer ran the
    // others again and committed them together.
    assert_eq!(
        store.writer_statistics().transactions,
        2 + 1,
        "the seed, then the blocker and the group"
    );
    let log = assert_kept(&*store, &before).await;
    assert_eq!(log.len(), 2 + 1 + 4);
    assert!(log.windows(2).all(|w| w[1].position == w[0].position + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_across_streams_and_other_writes_join_a_group() {
    let store = Arc::new(
        SqliteEventStore::open_in_memory(SqliteOptions::new())
            .await
            .unwrap(),
    );
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            store
                .append(
                    &meter(&format!("m-{}", i % 4)),
                    ExpectedVersion::Any,
                    vec![reading(i)],
                )
                .await
                .unwrap();
            store
                .save_checkpoint(&format!("sub-{}", i % 3), i)
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let stats = store.writer_statistics();
    assert_eq!((stats.appends, stats.writes), (32, 64));
    assert!(stats.transactions <= stats.writes);
    let log = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=32).collect::<Vec<_>>()
    );
    for s in 0..4 {
        let versions: Vec<u64> = store
            .read_stream(&meter(&format!("m-{s}")), 1)
            .await
            .unwrap()
            .iter()
            .map(|e| e.version)
            .collect();
        assert_eq!(versions, (1..=8).collect::<Vec<_>>());
    }
}

/// The writer knows the versions its commits left streams at and skips the version probe
/// for an append that expects one of them: an append by another store on the same file
/// moves a stream behind its back, and its next append is still judged on what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_after_another_store_moved_the_stream_is_judged_on_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, open_options()).await.unwrap();
    let other = SqliteEventStore::open(&path, open_options()).await.unwrap();
    let stream = meter("shared");
    for version in 0..2 {
        store
            .append(
                &stream,
                ExpectedVersion::Exact(version),
                vec![reading(version)],
            )
            .await
            .unwrap();
    }
    let moved = other
        .append(&stream, ExpectedVersion::Exact(2), vec![reading(2)])
        .await
        .unwrap();
    assert_eq!(moved.version, 3);

    match store
        .append(&stream, ExpectedVersion::Exact(2), vec![reading(20)])
        .await
    {
        Err(Error::VersionConflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (ExpectedVersion::Exact(2), 3)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let event = reading(3);
    let appended = store
        .append(&stream, ExpectedVersion::Exact(3), vec![event.clone()])
        .await
        .unwrap();
    assert_eq!((appended.version, appended.last_position), (4, 4));
    // A repeat of the append, with the version it now knows the stream at or the one the
    // append expected: recognized, not stored again.
    for expected in [4, 3] {
        let repeated = store
            .append(
                &stream,
                ExpectedVersion::Exact(expected),
                vec![event.clone()],
            )
            .await
            .unwrap();
        assert_eq!(repeated, appended);
    }
    let log = store.read_all(1, usize::MAX).await.unwrap();
    let versions: Vec<u64> = log.iter().map(|e| e.version).collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    other.close().await.unwrap();
    store.close().await.unwrap();
}

/// Two appends in one group expect the version the writer knows their stream at: the
/// first in the group is stored, the second is a conflict with the version the first left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_appends_in_one_group_expecting_the_same_known_version_store_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = Arc::new(SqliteEventStore::open(&path, open_options()).await.unwrap());
    let before = seed(&*store, "contested", 2).await;

    let (blocker, tasks) = as_one_group(&store, &path, || {
        (0..2u64)
            .map(|i| {
                let store = Arc::clone(&store);
                async move {
                    store
                        .append(
                            &meter("contested"),
                            ExpectedVersion::Exact(2),
                            vec![reading(i)],
                        )
                        .await
                }
            })
            .collect()
    })
    .await;
    let mut stored = vec![blocker];
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(outcome) => stored.push(outcome),
            Err(Error::VersionConflict { actual, .. }) => {
                assert_eq!(actual, 3);
                conflicts += 1;
            }
            Err(other) => panic!("expected a conflict, got {other:?}"),
        }
    }
    assert_eq!((stored.len(), conflicts), (2, 1));
    assert_eq!(stored[1].version, 3);
    let mut positions: Vec<u64> = stored.iter().map(|o| o.last_position).collect();
    positions.sort_unstable();
    assert_eq!(positions, [3, 4], "the refused append took no position");
    assert_eq!(store.stream_version(&meter("contested")).await.unwrap(), 3);
    assert_eq!(assert_kept(&*store, &before).await.len(), 2 + 2);
}

/// The first write of a transaction runs without a savepoint: a multi-event append that
/// fails there takes the transaction with it, and the writes queued behind it run in a
/// new one, stored; nothing of the failed one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_append_failing_first_in_its_transaction_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = Arc::new(SqliteEventStore::open(&path, open_options()).await.unwrap());
    let before = seed(&*store, "m-0", 2).await;
    let taken = before[1].event_id;

    let other = raw(&path);
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let failing = {
        let store = Arc::clone(&store);
        // 40 events: a chunk of 32 rows, then rows one by one; the last one's id is taken.
        let mut events: Vec<_> = (0..40).map(reading).collect();
        events[39].event_id = taken;
        tokio::spawn(async move {
            store
                .append(&meter("long"), ExpectedVersion::NoStream, events)
                .await
        })
    };
    until("the writer takes the failing append", || {
        let stats = store.writer_statistics();
        (stats.in_progress, stats.queued) == (1, 0)
    })
    .await;
    let queued: Vec<Append> = (1..4u64)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .append(
                        &meter(&format!("m-{i}")),
                        ExpectedVersion::Any,
                        vec![reading(i)],
                    )
                    .await
            })
        })
        .collect();
    until("every append is queued", || {
        store.writer_statistics().queued == 3
    })
    .await;
    other.execute_batch("COMMIT").unwrap();

    match failing.await.unwrap() {
        Err(Error::DuplicateEventId { event_id }) => assert_eq!(event_id, taken),
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    let outcomes: Vec<AppendOutcome> = {
        let mut outcomes = Vec::new();
        for task in queued {
            outcomes.push(task.await.unwrap().expect("the appends behind it commit"));
        }
        outcomes
    };
    let mut positions: Vec<u64> = outcomes.iter().map(|o| o.last_position).collect();
    positions.sort_unstable();
    assert_eq!(positions, [3, 4, 5], "the failed append took no position");
    assert_eq!(store.stream_version(&meter("long")).await.unwrap(), 0);
    assert_eq!(
        store.writer_statistics().transactions,
        2 + 1,
        "the seed, then the appends behind the failed one, together"
    );
    let log = assert_kept(&*store, &before).await;
    assert_eq!(log.len(), 2 + 3);
}
