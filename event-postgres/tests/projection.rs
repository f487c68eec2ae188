//! Projections in the store's own PostgreSQL schema, applied in one transaction with their
//! checkpoint: exactly once through failures, a panic, a hang, two runners, a rebuild, and
//! a real process SIGKILLed while it applies.

#[path = "../../tests/common/projection_cases.rs"]
mod cases;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Schema, stream};
use eventfold_core::projection::{ProjectionHandle, ProjectionOptions};
use eventfold_core::{
    BoxError, EventLog, ExpectedVersion, Metadata, NewEvent, RecordedEvent, RetryPolicy,
    SubscriptionStore,
};
use eventfold_postgres::tokio_postgres::Transaction;
use eventfold_postgres::{PostgresEventStore, PostgresProjection, async_trait};
use serde::{Deserialize, Serialize};

/// The tests' event: `{"n": n}` on the aggregate type `Tested`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventfold_macros::DomainEvent)]
#[domain_event(aggregate = "Tested", crate = "eventfold_core")]
struct Counted {
    n: u64,
}

fn counted(n: u64) -> NewEvent {
    NewEvent::from_event(&Counted { n }, Metadata::new()).expect("the event serializes")
}

/// Per stream the sum of `n`, and a row per applied event (an event applied twice shows as
/// two rows). Fails on `fail_on` always, panics on `panic_on`, hangs on `hang_on`.
#[derive(Default)]
struct Sums {
    fail_on: Option<u64>,
    panic_on: Option<u64>,
    hang_on: Option<u64>,
}

#[async_trait]
impl PostgresProjection for Sums {
    type Event = Counted;

    fn name(&self) -> &str {
        "sums"
    }

    async fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sums (stream text PRIMARY KEY, total bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS applied (position bigint NOT NULL);",
        )
        .await?;
        Ok(())
    }

    async fn clear(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.batch_execute("DELETE FROM sums; DELETE FROM applied;")
            .await?;
        Ok(())
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        event: &Counted,
        recorded: &RecordedEvent,
    ) -> Result<(), BoxError> {
        // Written first, so a failure that did not roll back would show.
        tx.execute(
            "INSERT INTO applied (position) VALUES ($1)",
            &[&(recorded.position as i64)],
        )
        .await?;
        if Some(event.n) == self.panic_on {
            panic!("a bug in the projection");
        }
        if Some(event.n) == self.hang_on {
            std::future::pending::<()>().await;
        }
        if Some(event.n) == self.fail_on {
            return Err(format!("cannot apply {}", event.n).into());
        }
        tx.execute(
            "INSERT INTO sums (stream, total) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET total = sums.total + excluded.total",
            &[&recorded.aggregate_id, &(event.n as i64)],
        )
        .await?;
        Ok(())
    }
}

/// The read model: the sums, and how often each position was applied.
async fn read_model(store_schema: &str) -> (BTreeMap<String, u64>, BTreeMap<u64, u32>) {
    let client = common::raw().await;
    let mut sums = BTreeMap::new();
    for row in client
        .query(
            &format!("SELECT stream, total FROM {store_schema}.sums"),
            &[],
        )
        .await
        .unwrap()
    {
        sums.insert(row.get::<_, String>(0), row.get::<_, i64>(1) as u64);
    }
    let mut applied = BTreeMap::new();
    for row in client
        .query(&format!("SELECT position FROM {store_schema}.applied"), &[])
        .await
        .unwrap()
    {
        *applied.entry(row.get::<_, i64>(0) as u64).or_insert(0) += 1;
    }
    (sums, applied)
}

/// `count` events, n = 1..=count, ten to an append, over `streams` streams; each stream's sum.
async fn seed(store: &PostgresEventStore, streams: u64, count: u64) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    let mut n = 1;
    while n <= count {
        let id = format!("s-{}", (n / 10) % streams);
        let last = (n + 9).min(count);
        store
            .append(
                &stream(&id),
                ExpectedVersion::Any,
                (n..=last).map(counted).collect(),
            )
            .await
            .unwrap();
        *expected.entry(id).or_insert(0) += (n..=last).sum::<u64>();
        n = last + 1;
    }
    expected
}

fn quick_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(attempts, Duration::from_millis(1), Duration::from_millis(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_applied_once_and_appends_of_another_handle_follow() {
    if let Some(subject) = InSchema::new().await {
        cases::every_event_is_applied_once_and_later_appends_follow(&subject, 500).await;
        cases::Subject::close(&subject).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_a_panicking_and_a_hanging_event_are_dead_lettered_and_the_rest_applied() {
    if common::no_server() {
        return;
    }
    let schema = Schema::new();
    let store = schema.open().await;
    store
        .append(
            &stream("a"),
            ExpectedVersion::Any,
            (1..=10).map(counted).collect(),
        )
        .await
        .unwrap();
    let projection = Sums {
        fail_on: Some(3),
        panic_on: Some(5),
        hang_on: Some(8),
    };
    let options = ProjectionOptions::new()
        .retry(quick_retries(2))
        .apply_timeout(Duration::from_millis(200));
    let handle = store.run_projection(projection, options).await.unwrap();
    handle.wait_idle().await.unwrap();
    let progress = handle.progress();
    assert_eq!(
        (
            progress.checkpoint,
            progress.applied,
            progress.dead_lettered
        ),
        (10, 7, 3)
    );
    let letters = store.dead_letters(Some("sums")).await.unwrap();
    let found: Vec<(u64, u32)> = letters.iter().map(|l| (l.position, l.attempts)).collect();
    assert_eq!(found, vec![(3, 2), (5, 2), (8, 2)]);
    assert!(
        letters[0].error.contains("cannot apply 3"),
        "{}",
        letters[0].error
    );
    assert!(
        letters[1].error.contains("a bug in the projection"),
        "{}",
        letters[1].error
    );
    assert!(
        letters[2].error.contains("timed out"),
        "{}",
        letters[2].error
    );
    handle.stop().await.unwrap();
    let (sums, applied) = read_model(&schema.name).await;
    assert_eq!(sums["a"], 55 - 3 - 5 - 8);
    // The failed attempts' own writes were rolled back with them.
    assert_eq!(
        applied.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 4, 6, 7, 9, 10]
    );
    assert!(applied.values().all(|&n| n == 1));
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_replays_into_a_cleared_read_model_and_two_runners_never_apply_twice() {
    if common::no_server() {
        return;
    }
    let schema = Schema::new();
    let first = schema.open().await;
    let second = schema.open().await;
    let one = first
        .run_projection(Sums::default(), ProjectionOptions::new().batch_size(16))
        .await
        .unwrap();
    let two = second
        .run_projection(Sums::default(), ProjectionOptions::new().batch_size(16))
        .await
        .unwrap();
    let expected = seed(&first, 5, 600).await;
    one.wait_idle().await.unwrap();
    two.wait_idle().await.unwrap();
    assert_eq!(one.progress().applied + two.progress().applied, 600);
    two.stop().await.unwrap();
    let (sums, applied) = read_model(&schema.name).await;
    assert_eq!(sums, expected);
    assert!(applied.len() == 600 && applied.values().all(|&n| n == 1));

    let mut progress = one.watch_progress();
    one.rebuild().await.unwrap();
    progress
        .wait_for(|p| !p.rebuilding && p.checkpoint == 600)
        .await
        .unwrap();
    one.wait_idle().await.unwrap();
    one.stop().await.unwrap();
    let (sums, applied) = read_model(&schema.name).await;
    assert_eq!(sums, expected);
    assert!(applied.len() == 600 && applied.values().all(|&n| n == 1));
    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_starting_at_the_end_sees_only_later_events() {
    if let Some(subject) = InSchema::new().await {
        cases::a_projection_starting_at_the_end_sees_only_later_events(&subject).await;
        cases::Subject::close(&subject).await;
    }
}

/// A store in a schema of its own with `Sums`, for the shared cases.
struct InSchema {
    store: PostgresEventStore,
    schema: Schema,
}

impl InSchema {
    /// `None` without a server (the case is skipped).
    async fn new() -> Option<Self> {
        if common::no_server() {
            return None;
        }
        let schema = Schema::new();
        Some(InSchema {
            store: schema.open().await,
            schema,
        })
    }
}

impl cases::Subject for InSchema {
    type Projection = Sums;
    const NAME: &str = "sums";

    fn store(&self) -> &dyn eventfold_core::ArchiveStore {
        &self.store
    }

    fn stream(id: &str) -> eventfold_core::StreamId {
        stream(id)
    }

    fn event(value: u64) -> NewEvent {
        counted(value)
    }

    /// Another store on the schema, as another process's would be.
    async fn seed_elsewhere(&self, streams: u64, count: u64) -> BTreeMap<String, u64> {
        let other = self.schema.open().await;
        let sums = seed(&other, streams, count).await;
        other.close().await.unwrap();
        sums
    }

    async fn seed(&self, streams: u64, count: u64) -> BTreeMap<String, u64> {
        seed(&self.store, streams, count).await
    }

    async fn run(&self, options: ProjectionOptions) -> ProjectionHandle<Sums> {
        self.store
            .run_projection(Sums::default(), options)
            .await
            .unwrap()
    }

    async fn read_model(&self) -> (BTreeMap<String, u64>, BTreeMap<u64, u32>) {
        read_model(&self.schema.name).await
    }

    async fn close(&self) {
        self.store.close().await.unwrap();
    }

    async fn reopen(&mut self) {
        self.store = self.schema.open().await;
    }
}

const TEST: &str =
    "a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once";
const CHILD_SCHEMA: &str = "EVENTFOLD_PG_PROJECTION_CHILD";

/// The child: runs the projection, printing its checkpoint as it moves, until killed.
async fn child(schema: &str) {
    let store = PostgresEventStore::open(
        eventfold_postgres::PostgresOptions::new(common::url()).schema(schema),
    )
    .await
    .unwrap();
    let handle = store
        .run_projection(Sums::default(), ProjectionOptions::new().batch_size(8))
        .await
        .unwrap();
    cases::print_checkpoints(handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once() {
    if let Ok(schema) = std::env::var(CHILD_SCHEMA) {
        child(&schema).await;
        return;
    }
    let Some(subject) = InSchema::new().await else {
        return;
    };
    let child = cases::KilledChild {
        test: TEST,
        env: CHILD_SCHEMA,
        value: subject.schema.name.clone(),
    };
    cases::a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once(
        subject, child, 1_500, 200, 1_000,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_after_a_prune_stops_at_the_archive_instead_of_passing_over_it() {
    if let Some(subject) = InSchema::new().await {
        cases::a_rebuild_after_a_prune_stops_at_the_archive_instead_of_passing_over_it(subject)
            .await;
    }
}

/// Holds its transaction (and so its pooled session) open in its first `apply` until told
/// to go on.
struct Holding {
    started: Option<tokio::sync::oneshot::Sender<()>>,
    go_on: std::sync::Arc<tokio::sync::Notify>,
}

#[async_trait]
impl PostgresProjection for Holding {
    type Event = Counted;

    fn name(&self) -> &str {
        "holding"
    }

    async fn clear(&mut self, _tx: &Transaction<'_>) -> Result<(), BoxError> {
        Ok(())
    }

    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        _event: &Counted,
        _recorded: &RecordedEvent,
    ) -> Result<(), BoxError> {
        tx.batch_execute("SELECT 1").await?;
        if let Some(started) = self.started.take() {
            let _ = started.send(());
            self.go_on.notified().await;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_renewed_and_the_head_polled_while_a_projection_holds_every_pooled_session() {
    use eventfold_core::lease::LeaseStore;

    if common::no_server() {
        return;
    }
    let schema = Schema::new();
    // Without notifications, so another process's append is seen through the head poll.
    let options = schema
        .options()
        .pool_size(1)
        .notify(false)
        .poll_interval(Duration::from_millis(20));
    let store = PostgresEventStore::open(options)
        .await
        .expect("the store opens");
    store
        .append(&stream("a"), ExpectedVersion::Any, vec![counted(1)])
        .await
        .unwrap();
    let (started, running) = tokio::sync::oneshot::channel();
    let go_on = std::sync::Arc::new(tokio::sync::Notify::new());
    let holding = Holding {
        started: Some(started),
        go_on: go_on.clone(),
    };
    let options = ProjectionOptions::new().apply_timeout(Duration::from_secs(60));
    let handle = store.run_projection(holding, options).await.unwrap();
    // The one session of the main pool is now inside the projection's transaction.
    running.await.unwrap();

    // A bus's keeper round, which must not wait for that session. The timeout only turns
    // a hang into a failure with a message.
    let ttl = Duration::from_secs(5);
    let round = async {
        let members = store.heartbeat("split", "m1", ttl).await?;
        let leases = store.claim_segments("split", "m1", 2, 2, ttl).await?;
        let renewed = store.renew_leases(&leases, ttl).await?;
        store.release_leases(&renewed).await?;
        store.leave("split", "m1").await?;
        Ok::<_, eventfold_core::Error>((members, leases.len(), renewed.len()))
    };
    let (members, claimed, renewed) = tokio::time::timeout(Duration::from_secs(30), round)
        .await
        .expect("lease work waited for the main pool's session")
        .unwrap();
    assert_eq!((members, claimed, renewed), (vec!["m1".to_owned()], 2, 2));

    // Another process's append reaches this store's head watch all the same.
    let other = schema.open().await;
    other
        .append(&stream("b"), ExpectedVersion::Any, vec![counted(2)])
        .await
        .unwrap();
    let mut head = store.watch_head();
    tokio::time::timeout(Duration::from_secs(30), head.wait_for(|&head| head >= 2))
        .await
        .expect("the head poll waited for the main pool's session")
        .unwrap();
    other.close().await.unwrap();

    go_on.notify_one();
    handle.wait_idle().await.unwrap();
    assert_eq!(handle.progress().applied, 2);
    handle.stop().await.unwrap();
    store.close().await.unwrap();
}
