//! Repository: rehydration, commands, optimistic concurrency with retries, snapshots.

mod common;

#[macro_use]
#[path = "common/forward.rs"]
mod forward;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use common::{Account, AccountCommand, AccountError, AccountEvent};
use eventfold::backend::{
    EventLog, NewDeadLetter, SnapshotStore, SubscriptionStore, Utc, Uuid, async_trait, watch,
};
use eventfold::prelude::*;
use eventfold::{
    AppendOutcome, DeadLetter, Error, FailureRecord, NewEvent, Snapshot, StoreStatistics,
};

/// The real in-memory store, with two hooks: a competing writer that sneaks a deposit in
/// before each of the next `conflicts` appends, and a log of `read_stream` calls.
#[derive(Default)]
struct Hooked {
    inner: InMemoryEventStore,
    conflicts: AtomicU32,
    reads_from: Mutex<Vec<u64>>,
}

impl Hooked {
    async fn sneak_in_deposit(&self, stream: &StreamId) {
        let event =
            NewEvent::from_event(&AccountEvent::Deposited { amount: 1 }, Metadata::new()).unwrap();
        self.inner
            .append(stream, ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
}

#[async_trait]
impl EventLog for Hooked {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> eventfold::Result<AppendOutcome> {
        let take = self
            .conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if take.is_ok() {
            self.sneak_in_deposit(stream).await;
        }
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(&self, s: &StreamId, from: u64) -> eventfold::Result<Vec<RecordedEvent>> {
        self.reads_from.lock().unwrap().push(from);
        self.inner.read_stream(s, from).await
    }

    async fn read_all(&self, from: u64, limit: usize) -> eventfold::Result<Vec<RecordedEvent>> {
        self.inner.read_all(from, limit).await
    }

    async fn get(&self, id: Uuid) -> eventfold::Result<Option<RecordedEvent>> {
        self.inner.get(id).await
    }

    async fn stream_version(&self, s: &StreamId) -> eventfold::Result<u64> {
        self.inner.stream_version(s).await
    }

    async fn head_position(&self) -> eventfold::Result<u64> {
        self.inner.head_position().await
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.inner.watch_head()
    }

    async fn statistics(&self) -> eventfold::Result<StoreStatistics> {
        self.inner.statistics().await
    }
}

#[async_trait]
impl SnapshotStore for Hooked {
    async fn save_snapshot(&self, s: Snapshot) -> eventfold::Result<()> {
        self.inner.save_snapshot(s).await
    }

    async fn load_snapshot(&self, s: &StreamId) -> eventfold::Result<Option<Snapshot>> {
        self.inner.load_snapshot(s).await
    }
}

#[async_trait]
impl SubscriptionStore for Hooked {
    async fn load_checkpoint(&self, n: &str) -> eventfold::Result<Option<u64>> {
        self.inner.load_checkpoint(n).await
    }

    async fn save_checkpoint(&self, n: &str, p: u64) -> eventfold::Result<()> {
        self.inner.save_checkpoint(n, p).await
    }

    async fn add_dead_letter(&self, d: NewDeadLetter) -> eventfold::Result<u64> {
        self.inner.add_dead_letter(d).await
    }

    async fn dead_letters(&self, s: Option<&str>) -> eventfold::Result<Vec<DeadLetter>> {
        self.inner.dead_letters(s).await
    }

    async fn remove_dead_letter(&self, id: u64) -> eventfold::Result<bool> {
        self.inner.remove_dead_letter(id).await
    }

    async fn clear_dead_letters(&self, s: Option<&str>) -> eventfold::Result<u64> {
        self.inner.clear_dead_letters(s).await
    }

    async fn record_failure(&self, f: FailureRecord, retain: usize) -> eventfold::Result<()> {
        self.inner.record_failure(f, retain).await
    }

    async fn failures(&self, s: &str, limit: usize) -> eventfold::Result<Vec<FailureRecord>> {
        self.inner.failures(s, limit).await
    }

    async fn clear_failures(&self, s: Option<&str>) -> eventfold::Result<u64> {
        self.inner.clear_failures(s).await
    }
}

fn open() -> AccountCommand {
    AccountCommand::Open {
        owner: "Ada".into(),
    }
}

fn stream(id: &str) -> StreamId {
    StreamId::new("Account", id)
}

#[tokio::test]
async fn loading_an_unknown_aggregate_gives_the_default_at_version_0() {
    let repo = Repository::<Account>::new(Arc::new(InMemoryEventStore::new()));
    let (account, version) = repo.load("nobody").await.unwrap();
    assert_eq!((account, version), (Account::default(), 0));
}

#[tokio::test]
async fn execute_stores_events_and_load_replays_them() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone());
    let opened = repo.execute("a", open()).await.unwrap();
    assert_eq!(
        opened.events,
        [AccountEvent::Opened {
            owner: "Ada".into()
        }]
    );
    assert_eq!((opened.version, opened.positions), (1, Some(1..=1)));
    repo.execute("a", AccountCommand::Deposit(100))
        .await
        .unwrap();
    let last = repo
        .execute("a", AccountCommand::Withdraw(40))
        .await
        .unwrap();
    assert_eq!((last.version, last.positions), (3, Some(3..=3)));

    let (account, version) = repo.load("a").await.unwrap();
    assert_eq!((account.balance, account.applied, version), (60, 3, 3));
    let stored = store.read_stream(&stream("a"), 1).await.unwrap();
    let types: Vec<_> = stored.iter().map(|e| &*e.event_type).collect();
    assert_eq!(types, ["Opened", "FundsDeposited", "Withdrawn"]);
    assert_eq!(stored[1].schema_version, 2);
    assert_eq!(stored[1].payload, r#"{"amount":100}"#);
}

#[tokio::test]
async fn a_rejected_command_stores_nothing() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone());
    let err = repo
        .execute("a", AccountCommand::Deposit(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Rejected(AccountError::NotOpen)));
    repo.execute("a", open()).await.unwrap();
    let err = repo
        .execute("a", AccountCommand::Withdraw(5))
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&AccountError::InsufficientFunds {
            balance: 0,
            asked: 5
        })
    );
    assert_eq!(store.head_position().await.unwrap(), 1);
}

#[tokio::test]
async fn a_command_without_events_appends_nothing() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone());
    repo.execute("a", open()).await.unwrap();
    let committed = repo.execute("a", AccountCommand::Noop).await.unwrap();
    assert_eq!(
        (
            committed.events.len(),
            committed.version,
            committed.positions
        ),
        (0, 1, None)
    );
    assert_eq!(store.head_position().await.unwrap(), 1);
}

#[tokio::test]
async fn metadata_is_stored_on_every_event_of_a_command() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone());
    let correlation = Uuid::now_v7();
    let metadata = Metadata::new()
        .with_correlation_id(correlation)
        .with("user", "ada");
    repo.execute_with("a", open(), metadata.clone())
        .await
        .unwrap();
    let stored = store.read_all(1, 10).await.unwrap();
    assert_eq!(stored[0].metadata, metadata);
}

#[tokio::test]
async fn a_conflict_reloads_and_retries_the_command() {
    let store = Arc::new(Hooked::default());
    let repo = Repository::<Account>::new(store.clone()).max_retries(2);
    repo.execute("a", open()).await.unwrap();
    repo.execute("a", AccountCommand::Deposit(10))
        .await
        .unwrap();

    // Two competing deposits land before our append; each time the repository reloads,
    // re-handles the withdrawal on the new state, and tries again.
    store.conflicts.store(2, Ordering::SeqCst);
    let committed = repo
        .execute("a", AccountCommand::Withdraw(10))
        .await
        .unwrap();
    assert_eq!(
        committed.version, 5,
        "open, deposit, two competing deposits, withdrawal"
    );
    let (account, _) = repo.load("a").await.unwrap();
    assert_eq!(
        (account.balance, account.applied),
        (2, 5),
        "10 + 1 + 1 - 10"
    );
}

#[tokio::test]
async fn conflicts_beyond_the_retries_return_the_conflict_with_both_versions() {
    let store = Arc::new(Hooked::default());
    let repo = Repository::<Account>::new(store.clone()).max_retries(1);
    repo.execute("a", open()).await.unwrap();
    store.conflicts.store(2, Ordering::SeqCst);
    match repo.execute("a", AccountCommand::Deposit(5)).await {
        Err(CommandError::Store(Error::VersionConflict {
            aggregate_type,
            aggregate_id,
            expected,
            actual,
        })) => {
            assert_eq!(
                (aggregate_type.as_str(), aggregate_id.as_str()),
                ("Account", "a")
            );
            assert_eq!((expected, actual), (ExpectedVersion::Exact(2), 3));
        }
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let (account, version) = repo.load("a").await.unwrap();
    assert_eq!(
        (account.balance, version),
        (2, 3),
        "only the two competing deposits"
    );
}

#[tokio::test]
async fn with_no_retries_the_first_conflict_is_returned() {
    let store = Arc::new(Hooked::default());
    let repo = Repository::<Account>::new(store.clone()).max_retries(0);
    repo.execute("a", open()).await.unwrap();
    store.conflicts.store(1, Ordering::SeqCst);
    let err = repo
        .execute("a", AccountCommand::Deposit(5))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CommandError::Store(ref e) if e.is_conflict()),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_on_one_aggregate_all_land_with_retries() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone()).max_retries(1_000);
    repo.execute("a", open()).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    repo.execute("a", AccountCommand::Deposit(1)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (account, version) = repo.load("a").await.unwrap();
    assert_eq!((account.balance, version), (160, 161));
}

#[tokio::test]
async fn snapshots_are_taken_every_n_events_and_loads_start_from_them() {
    let store = Arc::new(Hooked::default());
    let repo = Repository::<Account>::new(store.clone()).snapshot_every(10);
    repo.execute("a", open()).await.unwrap();
    for _ in 0..24 {
        repo.execute("a", AccountCommand::Deposit(2)).await.unwrap();
    }
    let snapshot = store.load_snapshot(&stream("a")).await.unwrap().unwrap();
    assert_eq!((snapshot.version, snapshot.schema_version), (20, 1));

    store.reads_from.lock().unwrap().clear();
    let (account, version) = repo.load("a").await.unwrap();
    assert_eq!((account.balance, version), (48, 25));
    assert_eq!(
        account.applied, 25,
        "the snapshot carried 20 applied events"
    );
    assert_eq!(
        *store.reads_from.lock().unwrap(),
        [20],
        "replay starts at the snapshot's own event, which proves the snapshot fits"
    );

    // A repository without snapshots ignores them and replays everything.
    let plain = Repository::<Account>::new(store.clone());
    assert_eq!(plain.load("a").await.unwrap(), (account, 25));
}

#[tokio::test]
async fn an_unreadable_snapshot_falls_back_to_full_replay() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone()).snapshot_every(2);
    repo.execute("a", open()).await.unwrap();
    repo.execute("a", AccountCommand::Deposit(7)).await.unwrap();
    repo.execute("a", AccountCommand::Deposit(8)).await.unwrap();

    for (state, schema_version) in [("not json", 1), (r#"{"balance":"lots"}"#, 1), ("{}", 99)] {
        store
            .save_snapshot(Snapshot {
                aggregate_type: "Account".into(),
                aggregate_id: "a".into(),
                version: 100 + schema_version as u64,
                schema_version,
                state: state.into(),
                taken_at: Utc::now(),
            })
            .await
            .unwrap();
        let (account, version) = repo.load("a").await.unwrap();
        assert_eq!(
            (account.balance, account.applied, version),
            (15, 3, 3),
            "{state}"
        );
    }
}

#[tokio::test]
async fn loading_a_corrupt_event_names_its_id_and_position() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone());
    repo.execute("a", open()).await.unwrap();
    let mut bad =
        NewEvent::from_event(&AccountEvent::Deposited { amount: 1 }, Metadata::new()).unwrap();
    bad.payload = r#"{"amount":"one"}"#.into();
    let bad_id = bad.event_id;
    store
        .append(&stream("a"), ExpectedVersion::Exact(1), vec![bad])
        .await
        .unwrap();
    match repo.load("a").await {
        Err(Error::Payload {
            event_type,
            event_id,
            position,
            ..
        }) => {
            assert_eq!(event_type, "FundsDeposited");
            assert_eq!((event_id, position), (Some(bad_id), Some(2)));
        }
        other => panic!("expected a payload error, got {other:?}"),
    }
    let err = repo
        .execute("a", AccountCommand::Deposit(1))
        .await
        .unwrap_err();
    assert!(matches!(err, CommandError::Store(Error::Payload { .. })));
    assert_eq!(
        store.head_position().await.unwrap(),
        2,
        "nothing more was stored"
    );
}

#[tokio::test]
async fn the_cache_lets_commands_on_a_hot_aggregate_skip_the_replay() {
    let store = Arc::new(Hooked::default());
    let repo = Repository::<Account>::new(store.clone()).cache(10);
    repo.execute("a", open()).await.unwrap();
    for _ in 0..3 {
        repo.execute("a", AccountCommand::Deposit(5)).await.unwrap();
    }
    assert_eq!(
        *store.reads_from.lock().unwrap(),
        [1],
        "only the first command read the stream"
    );
    let stats = repo.cache_statistics().unwrap();
    assert_eq!(
        (stats.hits, stats.misses, stats.stale, stats.len),
        (3, 1, 0, 1)
    );
    let (account, version) = repo.load("a").await.unwrap();
    assert_eq!((account.balance, account.applied, version), (15, 4, 4));
    assert_eq!(Repository::<Account>::new(store).cache_statistics(), None);
}

#[tokio::test]
async fn a_cached_state_overtaken_by_another_writer_is_reloaded_without_using_a_retry() {
    let store = Arc::new(InMemoryEventStore::new());
    let cached = Repository::<Account>::new(store.clone())
        .cache(10)
        .max_retries(0);
    let other = Repository::<Account>::new(store.clone());
    cached.execute("a", open()).await.unwrap();
    other
        .execute("a", AccountCommand::Deposit(5))
        .await
        .unwrap();

    let committed = cached
        .execute("a", AccountCommand::Deposit(1))
        .await
        .unwrap();
    assert_eq!(committed.version, 3);
    assert_eq!(cached.cache_statistics().unwrap().stale, 1);
    // The cache now holds the reloaded state: withdrawing all 6 works from it.
    cached
        .execute("a", AccountCommand::Withdraw(6))
        .await
        .unwrap();
    let stats = cached.cache_statistics().unwrap();
    assert_eq!((stats.hits, stats.stale), (2, 1));
    let (account, version) = other.load("a").await.unwrap();
    assert_eq!((account.balance, version), (0, 4));
}

#[tokio::test]
async fn a_refusal_or_no_op_on_a_cached_state_stands_only_if_the_stream_confirms_it() {
    let store = Arc::new(InMemoryEventStore::new());
    let cached = Repository::<Account>::new(store.clone()).cache(10);
    let other = Repository::<Account>::new(store.clone());
    cached.execute("a", open()).await.unwrap();
    other
        .execute("a", AccountCommand::Deposit(50))
        .await
        .unwrap();

    // The cached balance is 0, the stored one 50: the withdrawal is re-decided and lands.
    let committed = cached
        .execute("a", AccountCommand::Withdraw(30))
        .await
        .unwrap();
    assert_eq!(committed.version, 3);
    assert_eq!(cached.cache_statistics().unwrap().stale, 1);

    // A refusal on a current cached state stands, with no reload.
    let err = cached
        .execute("a", AccountCommand::Withdraw(100))
        .await
        .unwrap_err();
    assert_eq!(
        err.rejection(),
        Some(&AccountError::InsufficientFunds {
            balance: 20,
            asked: 100
        })
    );
    assert_eq!(cached.cache_statistics().unwrap().stale, 1);

    // A no-op reports the stored version, not the cached one.
    other
        .execute("a", AccountCommand::Deposit(1))
        .await
        .unwrap();
    let noop = cached.execute("a", AccountCommand::Noop).await.unwrap();
    assert_eq!((noop.version, noop.positions), (4, None));
    assert_eq!(cached.cache_statistics().unwrap().stale, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_through_a_shared_cache_all_land_once() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone())
        .cache(1)
        .max_retries(1_000);
    repo.execute("a", open()).await.unwrap();
    repo.execute("b", open()).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let id = if t % 2 == 0 { "a" } else { "b" };
                for _ in 0..20 {
                    repo.execute(id, AccountCommand::Deposit(1)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for id in ["a", "b"] {
        let (account, version) = repo.load(id).await.unwrap();
        assert_eq!((account.balance, version), (80, 81), "{id}");
    }
    // One entry, and whichever aggregate it holds is current: one more command on each
    // lands at the next version.
    assert_eq!(repo.cache_statistics().unwrap().len, 1);
    for id in ["a", "b"] {
        let committed = repo.execute(id, AccountCommand::Deposit(1)).await.unwrap();
        assert_eq!(committed.version, 82, "{id}");
    }
}

#[tokio::test]
async fn snapshots_are_still_taken_when_commands_run_from_the_cache() {
    let store = Arc::new(InMemoryEventStore::new());
    let repo = Repository::<Account>::new(store.clone())
        .snapshot_every(10)
        .cache(4);
    repo.execute("a", open()).await.unwrap();
    for _ in 0..24 {
        repo.execute("a", AccountCommand::Deposit(2)).await.unwrap();
    }
    let snapshot = store.load_snapshot(&stream("a")).await.unwrap().unwrap();
    assert_eq!(snapshot.version, 20);
    let state: Account = serde_json::from_str(&snapshot.state).unwrap();
    assert_eq!((state.balance, state.applied), (38, 20));
    assert_eq!(repo.cache_statistics().unwrap().hits, 24);
}

/// The README's tour: `Repository::<Account>::new(store)` with `store` straight from
/// `SqliteEventStore::open`, no `Arc::new`; the store stays usable as a handle, and the
/// bus and the repository share it by clone.
#[tokio::test]
async fn a_store_handle_from_open_builds_a_repository_and_a_bus_without_arc() {
    let dir = tempfile::tempdir().unwrap();
    let store = eventfold::SqliteEventStore::open(dir.path().join("tour.db"), Default::default())
        .await
        .unwrap();
    let bus = eventfold::EventBus::builder()
        .store(store.clone())
        .build()
        .unwrap();
    let repo = Repository::<Account>::new(store.clone()).snapshot_every(100);
    repo.execute("acc-1", open()).await.unwrap();
    repo.execute("acc-1", AccountCommand::Deposit(10))
        .await
        .unwrap();
    let (account, version) = repo.load("acc-1").await.unwrap();
    assert_eq!((account.balance, version), (10, 2));
    assert_eq!(store.head_position().await.unwrap(), 2);
    bus.stop().await.unwrap();
    store.close().await.unwrap();
}

forward_lease_store!(Hooked => inner);
