//! Archiving through the facade, the same tests on every store: in memory, a SQLite file
//! and a PostgreSQL schema (skipped without a server unless `EVENTFOLD_REQUIRE_PG=1`).
//! event-sqlite/tests/archive.rs and event-postgres/tests/archive.rs run the 100,000-event
//! round trip and what is particular to each backend.

mod common;
#[path = "../event-postgres/tests/common/mod.rs"]
mod pg;

use common::{Account, AccountCommand};
use eventfold::archive::{self, ArchiveRange, ArchiveState};
use eventfold::backend::AppendRequest;
use eventfold::prelude::*;
use eventfold::{
    ArchiveStore, Error, ExpectedVersion, Metadata, NewEvent, RecordedEvent, Snapshot, StreamId,
};

/// Each test below, once per store: `memory::`, `sqlite::` and `postgres::`.
macro_rules! on_every_store {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(eventfold::InMemoryEventStore::new()).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let options = eventfold::SqliteOptions::new()
                        .synchronous(eventfold::Synchronous::Normal);
                    let store =
                        eventfold::SqliteEventStore::open(dir.path().join("store.db"), options)
                            .await
                            .unwrap();
                    super::$test(store.clone()).await;
                    store.close().await.unwrap();
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if super::pg::no_server() {
                        return;
                    }
                    let schema = super::pg::Schema::new();
                    let store = schema.open().await;
                    super::$test(store.clone()).await;
                    store.close().await.unwrap();
                }
            )*
        }
    };
}

on_every_store!(
    exports_prunes_and_restores_every_event_exactly,
    refuses_a_prune_past_a_lagging_subscription,
    refuses_a_prune_while_a_segment_has_never_saved_its_checkpoint,
    a_repository_loads_a_pruned_stream_from_its_snapshot_and_goes_on,
);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, eventfold::DomainEvent)]
#[domain_event(aggregate = "Counter")]
enum CounterEvent {
    Added { by: u64 },
}

fn stream(id: &str) -> StreamId {
    StreamId::new("Counter", id)
}

/// `per_stream` events of each stream, one of each per batch (positions interleave).
async fn seed(store: &impl ArchiveStore, ids: &[&str], per_stream: u64) {
    for by in 0..per_stream {
        let requests = ids
            .iter()
            .map(|id| AppendRequest {
                stream: stream(id),
                expected: ExpectedVersion::Any,
                events: vec![
                    NewEvent::from_event(
                        &CounterEvent::Added { by },
                        Metadata::new().with("test", "archive"),
                    )
                    .unwrap(),
                ],
            })
            .collect();
        store.append_batch(requests).await.unwrap();
    }
}

fn snapshot(id: &str, version: u64) -> Snapshot {
    Snapshot {
        aggregate_type: "Counter".into(),
        aggregate_id: id.into(),
        version,
        schema_version: 1,
        state: "{}".into(),
        taken_at: chrono::Utc::now(),
    }
}

async fn exports_prunes_and_restores_every_event_exactly(store: impl ArchiveStore) {
    let dir = tempfile::tempdir().unwrap();
    seed(&store, &["a", "b", "c"], 1_000).await;
    let before: Vec<RecordedEvent> = store.read_all(1, usize::MAX).await.unwrap();
    for id in ["a", "b", "c"] {
        eventfold::backend::SnapshotStore::save_snapshot(&store, snapshot(id, 1_000))
            .await
            .unwrap();
    }
    let path = dir.path().join("memory.gz");
    let manifest = archive::export(
        &store,
        ArchiveRange::BelowPosition(1_501),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    assert_eq!(manifest.events, 1_500);
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Pruned);
    assert_eq!(store.head_position().await.unwrap(), 3_000);
    assert_eq!(store.statistics().await.unwrap().events, 1_500);
    for result in [
        store.read_all(1, 1).await.map(drop),
        store.read_stream(&stream("a"), 1).await.map(drop),
        store.get(before[0].event_id).await.map(drop),
    ] {
        match result {
            Err(Error::Archived { archive, .. }) => assert_eq!(archive, manifest.archive),
            other => panic!("expected an Archived error, got {other:?}"),
        }
    }
    assert_eq!(
        store.read_stored(1, usize::MAX).await.unwrap(),
        before[1_500..].to_vec()
    );
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_all(1, usize::MAX).await.unwrap(), before);
    assert!(store.archive_horizon().await.unwrap().is_empty());
}

async fn refuses_a_prune_past_a_lagging_subscription(store: impl ArchiveStore) {
    let dir = tempfile::tempdir().unwrap();
    seed(&store, &["a"], 10).await;
    store.save_checkpoint("behind", 4).await.unwrap();
    let path = dir.path().join("lag.gz");
    archive::export(
        &store,
        ArchiveRange::StreamsIdleBefore(chrono::Utc::now()),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::PruneBehindSubscription { subscription, .. } if subscription == "behind"),
        "{error:?}"
    );
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 10);
}

async fn a_repository_loads_a_pruned_stream_from_its_snapshot_and_goes_on(
    store: impl ArchiveStore + Clone,
) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::<Account>::new(store.clone()).snapshot_every(10);
    repo.execute(
        "acc",
        AccountCommand::Open {
            owner: "ann".into(),
        },
    )
    .await
    .unwrap();
    for amount in 1..=24 {
        repo.execute("acc", AccountCommand::Deposit(amount))
            .await
            .unwrap();
    }
    let before = repo.load("acc").await.unwrap();
    // A tool holding any archiving store uses it as a plain store too.
    let shared: std::sync::Arc<dyn ArchiveStore> = std::sync::Arc::new(store.clone());
    let as_store: std::sync::Arc<dyn eventfold::EventStore> = shared.clone();
    assert_eq!(as_store.head_position().await.unwrap(), 25);
    let snapshot =
        eventfold::backend::SnapshotStore::load_snapshot(&store, &StreamId::new("Account", "acc"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(snapshot.version, 20);
    // Up to the snapshot's version itself: refused, a load replays from that event.
    let path = dir.path().join("to-20.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(21),
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
            error,
            Error::PruneBreaksStream {
                pruned: 20,
                snapshot: Some(20),
                ..
            }
        ),
        "{error:?}"
    );
    // Below it: the stream still loads, to the same state, and takes commands.
    let path = dir.path().join("to-19.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(20),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(repo.load("acc").await.unwrap(), before);
    repo.execute("acc", AccountCommand::Deposit(100))
        .await
        .unwrap();
    let (account, version) = repo.load("acc").await.unwrap();
    assert_eq!((account.balance, version), (before.0.balance + 100, 26));
}

/// A subscription split into segments holds a prune back until every segment has saved a
/// checkpoint past it: one that never saved has handled nothing (the SQLite and in-memory
/// stores used to let its events go).
async fn refuses_a_prune_while_a_segment_has_never_saved_its_checkpoint(store: impl ArchiveStore) {
    let dir = tempfile::tempdir().unwrap();
    seed(&store, &["a", "b", "c"], 2).await;
    let leases = store
        .claim_segments("split", "member", 2, 2, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    store.save_segment_checkpoint(&leases[0], 6).await.unwrap();
    let path = dir.path().join("segments.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(7),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::PruneBehindSubscription { subscription, checkpoint: 0, .. } if subscription == "split#1/2"),
        "{error:?}"
    );
    assert_eq!(store.read_all(1, 100).await.unwrap().len(), 6);
    store.save_segment_checkpoint(&leases[1], 6).await.unwrap();
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert!(store.read_stored(1, 100).await.unwrap().is_empty());
}
