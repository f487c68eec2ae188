//! Archiving through the facade on the in-memory store: the same rules as on SQLite
//! (event-sqlite/tests/archive.rs runs the 100,000-event round trip on a real file).

mod common;

use common::{Account, AccountCommand};
use eventfold::archive::{self, ArchiveRange, ArchiveState};
use eventfold::backend::{EventLog, SubscriptionStore};
use eventfold::prelude::*;
use eventfold::{
    ArchiveStore, Error, ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, RecordedEvent,
    Snapshot, StreamId,
};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, eventfold::DomainEvent)]
#[domain_event(aggregate = "Counter")]
enum CounterEvent {
    Added { by: u64 },
}

fn stream(id: &str) -> StreamId {
    StreamId::new("Counter", id)
}

async fn seed(store: &InMemoryEventStore, ids: &[&str], per_stream: u64) {
    for by in 0..per_stream {
        for id in ids {
            let event = NewEvent::from_event(
                &CounterEvent::Added { by },
                Metadata::new().with("test", "archive"),
            )
            .unwrap();
            store
                .append(&stream(id), ExpectedVersion::Any, vec![event])
                .await
                .unwrap();
        }
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

#[tokio::test]
async fn the_memory_store_exports_prunes_and_restores_every_event_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = InMemoryEventStore::new();
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

#[tokio::test]
async fn the_memory_store_refuses_a_prune_past_a_lagging_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let store = InMemoryEventStore::new();
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

#[tokio::test]
async fn a_repository_loads_a_pruned_stream_from_its_snapshot_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = InMemoryEventStore::new();
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
