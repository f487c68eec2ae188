//! The bus under faults: damaged rows, unknown event types, handlers that panic, hang,
//! retry for long or block forever, and the bounds and promises around them.

#[macro_use]
#[path = "common/forward.rs"]
mod forward;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventfold::prelude::*;
use eventfold::{
    Delivery, Error, EventBus, NewEvent, RetryPolicy, SqliteEventStore, SqliteOptions,
    UnknownEventPolicy,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Parcel")]
enum ParcelEvent {
    Sent {
        #[domain_event(aggregate_id)]
        parcel: String,
        seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Truck")]
enum TruckEvent {
    Loaded {
        #[domain_event(aggregate_id)]
        truck: String,
    },
}

fn sent(parcel: &str, seq: u64) -> ParcelEvent {
    ParcelEvent::Sent {
        parcel: parcel.into(),
        seq,
    }
}

fn seq_of(d: &Delivery<ParcelEvent>) -> u64 {
    let ParcelEvent::Sent { seq, .. } = d.event();
    *seq
}

type Seen = Arc<Mutex<Vec<(String, u64)>>>;

/// A handler that records (aggregate, seq) of each delivery.
fn recorder(
    seen: &Seen,
) -> impl Fn(Delivery<ParcelEvent>) -> std::future::Ready<Result<(), Error>> + Send + Sync + 'static
{
    let seen = Arc::clone(seen);
    move |d: Delivery<ParcelEvent>| {
        seen.lock()
            .unwrap()
            .push((d.record().aggregate_id.clone(), seq_of(&d)));
        std::future::ready(Ok(()))
    }
}

fn seqs(seen: &Seen) -> Vec<u64> {
    seen.lock().unwrap().iter().map(|e| e.1).collect()
}

async fn append(store: &dyn EventStore, event: NewEvent, aggregate: &str, id: &str) {
    store
        .append(
            &StreamId::new(aggregate, id),
            ExpectedVersion::Any,
            vec![event],
        )
        .await
        .unwrap();
}

fn scratch_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("eventfold-{name}-"))
        .tempdir()
        .unwrap()
}

// ----- Point 4: one bad row never stops the bus -----

/// Regression: a row whose id is malformed, whose metadata is not JSON or whose schema
/// version is out of range stopped a durable subscription for good: nothing after it (nor
/// before it in the same read) was delivered, no dead letter was written, and the
/// dispatcher retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_rows_are_dead_lettered_and_every_other_event_is_delivered() {
    let dir = scratch_dir("damaged-rows");
    let path = dir.path().join("bus.db");
    let store = Arc::new(
        SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap(),
    );
    for seq in 1..=8 {
        let event = NewEvent::from_event(&sent("p", seq), Metadata::new()).unwrap();
        append(store.as_ref(), event, "Parcel", "p").await;
    }
    store.close().await.unwrap();
    {
        // Damage three rows behind the store's back, each in another way.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE events SET event_id = x'0102' WHERE position = 2",
            [],
        )
        .unwrap();
        conn.execute(
            "UPDATE events SET metadata = 'not json' WHERE position = 4",
            [],
        )
        .unwrap();
        conn.execute(
            "UPDATE events SET schema_version = 1099511627776 WHERE position = 6",
            [],
        )
        .unwrap();
    }
    let store = Arc::new(
        SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap(),
    );
    let bus = EventBus::builder()
        .store(store.clone())
        .workers(2)
        .build()
        .unwrap();
    let seen: Seen = Seen::default();
    bus.subscribe("audit", recorder(&seen)).register().unwrap();
    let trucks = Arc::new(AtomicU32::new(0));
    let counted = Arc::clone(&trucks);
    bus.subscribe("trucks", move |_: Delivery<TruckEvent>| {
        counted.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();

    let mut delivered = seqs(&seen);
    delivered.sort();
    assert_eq!(delivered, [1, 3, 5, 7, 8]);
    assert_eq!(trucks.load(Ordering::SeqCst), 0);
    // Nobody can tell whose a damaged row was: every subscription gets its dead letter.
    for name in ["audit", "trucks"] {
        let dead = bus.dead_letters(Some(name)).await.unwrap();
        let positions: Vec<u64> = dead.iter().map(|d| d.position).collect();
        assert_eq!(positions, [2, 4, 6], "{name}");
        assert!(dead.iter().all(|d| !d.error.is_empty() && d.attempts == 1));
        assert_eq!(
            store.load_checkpoint(name).await.unwrap(),
            Some(8),
            "{name}"
        );
    }
    // A replay reads the row again: still damaged, it fails and the dead letter stays.
    let first = &bus.dead_letters(Some("audit")).await.unwrap()[0];
    assert!(bus.replay_dead_letter(first.id).await.is_err());
    assert_eq!(bus.dead_letters(Some("audit")).await.unwrap().len(), 3);
    let stats = bus.statistics().await.unwrap();
    assert_eq!(stats.dead_lettered, 6);
    bus.stop().await.unwrap();

    // A restart resumes after them: nothing is delivered or dead-lettered twice.
    let again = EventBus::builder().store(store.clone()).build().unwrap();
    let seen_again: Seen = Seen::default();
    again
        .subscribe("audit", recorder(&seen_again))
        .register()
        .unwrap();
    again.start().await.unwrap();
    again.wait_idle().await.unwrap();
    assert!(seen_again.lock().unwrap().is_empty());
    assert_eq!(store.dead_letters(Some("audit")).await.unwrap().len(), 3);
    again.stop().await.unwrap();
    store.close().await.unwrap();
}

/// Regression: an event of a type no code registers was skipped in silence while the
/// checkpoint moved past it, so even an upgraded program never saw it.
#[tokio::test]
async fn an_event_of_an_unregistered_type_is_dead_lettered_unless_the_subscription_skips_it() {
    let store = InMemoryEventStore::new();
    let first = NewEvent::from_event(&sent("p", 1), Metadata::new()).unwrap();
    append(&store, first, "Parcel", "p").await;
    let mut unknown = NewEvent::from_event(&sent("p", 2), Metadata::new()).unwrap();
    unknown.event_type = "Returned".into();
    let unknown_id = unknown.event_id;
    append(&store, unknown, "Parcel", "p").await;
    let last = NewEvent::from_event(&sent("p", 3), Metadata::new()).unwrap();
    append(&store, last, "Parcel", "p").await;

    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let (kept, skipped): (Seen, Seen) = Default::default();
    bus.subscribe("keeps", recorder(&kept)).register().unwrap();
    bus.subscribe("skips", recorder(&skipped))
        .unknown_events(UnknownEventPolicy::Skip)
        .register()
        .unwrap();
    bus.subscribe("trucks", |_: Delivery<TruckEvent>| {
        std::future::ready(Ok::<_, Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();

    assert_eq!(seqs(&kept), [1, 3]);
    assert_eq!(seqs(&skipped), [1, 3]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        (
            dead[0].subscription.as_str(),
            dead[0].event_id,
            dead[0].position
        ),
        ("keeps", unknown_id, 2)
    );
    assert!(
        dead[0].error.contains("unknown event type `Returned`"),
        "{}",
        dead[0].error
    );
    let stats = bus.statistics().await.unwrap();
    let by_name = |name: &str| {
        stats
            .subscriptions
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (by_name("skips").skipped, by_name("skips").dead_lettered),
        (1, 0)
    );
    assert_eq!(
        (by_name("keeps").skipped, by_name("keeps").dead_lettered),
        (0, 1)
    );
    // Another aggregate type's subscription would not have received it.
    assert_eq!(by_name("trucks").dead_lettered, 0);
    for name in ["keeps", "skips", "trucks"] {
        assert_eq!(
            store.load_checkpoint(name).await.unwrap(),
            Some(3),
            "{name}"
        );
    }
}

/// A payload that does not decode, and one at a schema version newer than the code,
/// are dead-lettered at once (no retries) with the decoding error, and the rest goes on.
#[tokio::test(start_paused = true)]
async fn undecodable_payloads_are_dead_lettered_with_their_error() {
    let store = InMemoryEventStore::new();
    let mut bad_payload = NewEvent::from_event(&sent("p", 1), Metadata::new()).unwrap();
    bad_payload.payload = r#"{"parcel":"p","seq":-1}"#.into();
    append(&store, bad_payload, "Parcel", "p").await;
    let mut too_new = NewEvent::from_event(&sent("q", 1), Metadata::new()).unwrap();
    too_new.schema_version = 9;
    append(&store, too_new, "Parcel", "q").await;
    let good = NewEvent::from_event(&sent("p", 2), Metadata::new()).unwrap();
    append(&store, good, "Parcel", "p").await;

    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let seen = Seen::default();
    bus.subscribe("audit", recorder(&seen))
        .retry(RetryPolicy::exponential(
            5,
            Duration::from_secs(1),
            Duration::from_secs(1),
        ))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(seqs(&seen), [2]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0].error.contains("does not decode"),
        "{}",
        dead[0].error
    );
    assert!(
        dead[1].error.contains("schema version 9"),
        "{}",
        dead[1].error
    );
    assert!(dead.iter().all(|d| d.attempts == 1));
    assert_eq!(bus.statistics().await.unwrap().retried, 0);
}

// ----- Point 5: handlers cannot hold the bus hostage -----

/// Regression: a closure that panicked before it returned its future killed its worker:
/// `wait_idle` hung, later events of that worker were never delivered, and `stop()`
/// reported `drained: true`.
#[tokio::test(start_paused = true)]
async fn a_handler_that_panics_before_returning_its_future_is_a_failed_attempt() {
    let bus = EventBus::builder().workers(1).build().unwrap();
    let seen = Seen::default();
    let recorded = Arc::clone(&seen);
    bus.subscribe("fragile", move |d: Delivery<ParcelEvent>| {
        let seq = seq_of(&d);
        if seq == 1 {
            panic!("no future for you");
        }
        let recorded = Arc::clone(&recorded);
        async move {
            recorded.lock().unwrap().push(("p".into(), seq));
            Ok::<_, Error>(())
        }
    })
    .retry(RetryPolicy::exponential(
        2,
        Duration::from_millis(10),
        Duration::from_millis(10),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([sent("p", 1), sent("p", 2), sent("p", 3)])
        .await
        .unwrap();
    // Paused time: a hang would fire this guard at once instead of blocking the test.
    tokio::time::timeout(Duration::from_secs(3600), bus.wait_idle())
        .await
        .expect("wait_idle hung")
        .unwrap();
    assert_eq!(seqs(&seen), [2, 3]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.contains("no future for you"),
        "{}",
        dead[0].error
    );
    assert_eq!(dead[0].attempts, 2);
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.failed, stats.worker_restarts), (2, 0));
    let report = bus.stop().await.unwrap();
    assert!(report.drained);
    assert_eq!((report.unfinished, report.unfinished_deliveries), (0, 0));
}

/// Regression: a handler that never returned blocked every aggregate hashed to its
/// worker and the other subscriptions of the same events, and there was no timeout.
#[tokio::test(start_paused = true)]
async fn a_stuck_handler_times_out_and_holds_back_only_its_own_aggregate() {
    let bus = EventBus::builder().workers(1).build().unwrap();
    let started = tokio::time::Instant::now();
    let stuck_seen: Arc<Mutex<Vec<(String, u64, Duration)>>> = Arc::default();
    let recorded = Arc::clone(&stuck_seen);
    bus.subscribe("stuck", move |d: Delivery<ParcelEvent>| {
        let aggregate = d.record().aggregate_id.clone();
        recorded
            .lock()
            .unwrap()
            .push((aggregate.clone(), seq_of(&d), started.elapsed()));
        async move {
            if aggregate == "a" {
                std::future::pending::<()>().await;
            }
            Ok::<_, Error>(())
        }
    })
    .handler_timeout(Duration::from_secs(5))
    .retry(RetryPolicy::never())
    .register()
    .unwrap();
    let other = Seen::default();
    bus.subscribe("other", recorder(&other)).register().unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([sent("a", 1), sent("b", 1), sent("a", 2), sent("b", 2)])
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();

    // The other subscription had every event at once, and so had aggregate b.
    assert_eq!(seqs(&other), [1, 1, 2, 2]);
    let stuck = stuck_seen.lock().unwrap().clone();
    let at = |aggregate: &str, seq: u64| {
        stuck
            .iter()
            .find(|e| e.0 == aggregate && e.1 == seq)
            .map(|e| e.2)
            .unwrap()
    };
    assert_eq!(at("b", 1), Duration::ZERO);
    assert_eq!(at("b", 2), Duration::ZERO);
    // a's second event waited for its first to time out.
    assert_eq!(at("a", 2), Duration::from_secs(5));
    // Both of a's events hang: each times out in turn and is dead-lettered.
    let dead = bus.dead_letters(Some("stuck")).await.unwrap();
    let positions: Vec<u64> = dead.iter().map(|d| d.position).collect();
    assert_eq!(positions, [1, 3]);
    assert!(dead[0].error.contains("timeout"), "{}", dead[0].error);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

/// Regression: 200 retrying events of one aggregate (queue capacity 64) left other
/// aggregates and an unrelated subscription with nothing delivered until the retries
/// ended; deliveries waiting behind a retry held the queue.
#[tokio::test(start_paused = true)]
async fn retries_of_one_aggregate_take_no_room_from_others_with_a_store() {
    let store = InMemoryEventStore::new();
    let bus = EventBus::builder()
        .store(Arc::new(store.clone()))
        .queue_capacity(64)
        .workers(2)
        .build()
        .unwrap();
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky_seen = Seen::default();
    let (ok, seen) = (Arc::clone(&healthy), Arc::clone(&flaky_seen));
    bus.subscribe("flaky", move |d: Delivery<ParcelEvent>| {
        let fail = d.record().aggregate_id == "stuck" && !ok.load(Ordering::SeqCst);
        if !fail {
            seen.lock()
                .unwrap()
                .push((d.record().aggregate_id.clone(), seq_of(&d)));
        }
        std::future::ready(if fail { Err("not yet") } else { Ok(()) })
    })
    .retry(RetryPolicy::exponential(
        100,
        Duration::from_secs(10),
        Duration::from_secs(10),
    ))
    .register()
    .unwrap();
    let unrelated = Seen::default();
    bus.subscribe("unrelated", recorder(&unrelated))
        .register()
        .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=200).map(|i| sent("stuck", i)))
        .await
        .unwrap();
    bus.publish_batch((1..=100).map(|i| sent(&format!("free-{}", i % 10), i)))
        .await
        .unwrap();
    // Everything but the stuck aggregate is delivered before its first retry is due.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let free = flaky_seen.lock().unwrap().len();
        if free == 100 && unrelated.lock().unwrap().len() == 300 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{free} of 100 delivered to flaky before the first retry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Only the retrying delivery holds its event in memory; the 199 behind it wait in
    // the log.
    let stats = bus.statistics().await.unwrap();
    assert_eq!((stats.in_flight, stats.waiting), (1, 199));
    // Once the aggregate recovers, its 200 events arrive in order.
    healthy.store(true, Ordering::SeqCst);
    bus.wait_idle().await.unwrap();
    let stuck: Vec<u64> = flaky_seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == "stuck")
        .map(|e| e.1)
        .collect();
    assert_eq!(stuck, (1..=200).collect::<Vec<_>>());
    assert_eq!(store.load_checkpoint("flaky").await.unwrap(), Some(300));
    assert!(bus.dead_letters(None).await.unwrap().is_empty());
}

/// An in-memory store that tells how the bus read streams: how often it read one whole,
/// and the most events one page of a paged read brought back.
struct PageCounting {
    inner: InMemoryEventStore,
    whole_reads: std::sync::atomic::AtomicUsize,
    largest_page: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl eventfold::backend::EventLog for PageCounting {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> eventfold::Result<eventfold::AppendOutcome> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
    ) -> eventfold::Result<Vec<RecordedEvent>> {
        self.whole_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(stream, from).await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        from: u64,
        limit: usize,
    ) -> eventfold::Result<Vec<RecordedEvent>> {
        let page = self.inner.read_stream_page(stream, from, limit).await?;
        self.largest_page.fetch_max(page.len(), Ordering::SeqCst);
        Ok(page)
    }

    async fn read_all(&self, from: u64, limit: usize) -> eventfold::Result<Vec<RecordedEvent>> {
        self.inner.read_all(from, limit).await
    }

    async fn get(&self, id: uuid::Uuid) -> eventfold::Result<Option<RecordedEvent>> {
        self.inner.get(id).await
    }

    async fn stream_version(&self, stream: &StreamId) -> eventfold::Result<u64> {
        self.inner.stream_version(stream).await
    }

    async fn head_position(&self) -> eventfold::Result<u64> {
        self.inner.head_position().await
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_head()
    }

    async fn statistics(&self) -> eventfold::Result<eventfold::StoreStatistics> {
        self.inner.statistics().await
    }
}

forward_snapshot_store!(PageCounting => inner);
forward_subscription_store!(PageCounting => inner);
forward_lease_store!(PageCounting => inner);

/// Regression: once a retrying aggregate recovered, its lane read every delivery deferred
/// behind it back from the store at once (the whole rest of its stream), so a long
/// backlog sat in memory outside `queue_capacity`. Now they come back a page
/// (`batch_size`) at a time, still in order, each once.
#[tokio::test(start_paused = true)]
async fn a_recovered_aggregates_backlog_is_read_back_a_page_at_a_time() {
    let store = Arc::new(PageCounting {
        inner: InMemoryEventStore::new(),
        whole_reads: Default::default(),
        largest_page: Default::default(),
    });
    let bus = EventBus::builder()
        .store(Arc::clone(&store))
        .queue_capacity(64)
        .batch_size(8)
        .workers(1)
        .build()
        .unwrap();
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Seen::default();
    let (ok, recorded) = (Arc::clone(&healthy), Arc::clone(&seen));
    bus.subscribe("flaky", move |d: Delivery<ParcelEvent>| {
        let fail = !ok.load(Ordering::SeqCst);
        if !fail {
            recorded
                .lock()
                .unwrap()
                .push((d.record().aggregate_id.clone(), seq_of(&d)));
        }
        std::future::ready(if fail { Err("not yet") } else { Ok(()) })
    })
    .retry(RetryPolicy::exponential(
        100,
        Duration::from_secs(10),
        Duration::from_secs(10),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=200).map(|i| sent("stuck", i)))
        .await
        .unwrap();
    // Every delivery behind the first one leaves memory while it waits for its retry.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bus.statistics().await.unwrap().waiting < 199 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the backlog never left memory"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    healthy.store(true, Ordering::SeqCst);
    bus.wait_idle().await.unwrap();
    assert_eq!(seqs(&seen), (1..=200).collect::<Vec<_>>());
    assert_eq!(store.whole_reads.load(Ordering::SeqCst), 0);
    let largest = store.largest_page.load(Ordering::SeqCst);
    assert!((1..=8).contains(&largest), "a page of {largest}");
    assert_eq!(store.load_checkpoint("flaky").await.unwrap(), Some(200));
    bus.stop().await.unwrap();
}

/// Without a store the deliveries behind a retry stay in memory, but outside the queue
/// (up to its capacity per subscription): other aggregates' events still find room.
#[tokio::test(start_paused = true)]
async fn retries_of_one_aggregate_take_no_room_from_others_without_a_store() {
    let bus = EventBus::builder()
        .queue_capacity(64)
        .workers(1)
        .build()
        .unwrap();
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Seen::default();
    let (ok, recorded) = (Arc::clone(&healthy), Arc::clone(&seen));
    bus.subscribe("flaky", move |d: Delivery<ParcelEvent>| {
        let fail = d.record().aggregate_id == "stuck" && !ok.load(Ordering::SeqCst);
        if !fail {
            recorded
                .lock()
                .unwrap()
                .push((d.record().aggregate_id.clone(), seq_of(&d)));
        }
        std::future::ready(if fail { Err("not yet") } else { Ok(()) })
    })
    .retry(RetryPolicy::exponential(
        100,
        Duration::from_secs(10),
        Duration::from_secs(10),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    for i in 1..=60 {
        bus.publish(sent("stuck", i)).await.unwrap();
    }
    // The queue holds 64: the stuck aggregate's 60 would leave room for 4 more.
    for i in 1..=100 {
        tokio::time::timeout(Duration::from_secs(1), bus.publish(sent("free", i)))
            .await
            .expect("no room for another aggregate")
            .unwrap();
    }
    while seen.lock().unwrap().len() < 100 {
        tokio::task::yield_now().await;
    }
    healthy.store(true, Ordering::SeqCst);
    bus.wait_idle().await.unwrap();
    let stuck: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == "stuck")
        .map(|e| e.1)
        .collect();
    assert_eq!(stuck, (1..=60).collect::<Vec<_>>());
    assert_eq!(bus.statistics().await.unwrap().in_flight, 0);
}

/// Regression: a 100 ms handler delayed a fast subscription of the same events by up to
/// a second: both ran one after the other on the same worker.
#[tokio::test(start_paused = true)]
async fn a_slow_subscription_does_not_delay_a_fast_one() {
    let bus = EventBus::builder().workers(1).build().unwrap();
    bus.subscribe("slow", |_: Delivery<ParcelEvent>| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Error>(())
    })
    .priority(0)
    .register()
    .unwrap();
    let started = tokio::time::Instant::now();
    let fast: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let recorded = Arc::clone(&fast);
    bus.subscribe("fast", move |_: Delivery<ParcelEvent>| {
        recorded.lock().unwrap().push(started.elapsed());
        std::future::ready(Ok::<_, Error>(()))
    })
    .priority(1)
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=10).map(|i| sent("p", i)))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    let fast = fast.lock().unwrap();
    assert_eq!(fast.len(), 10);
    assert!(fast.iter().all(|t| *t == Duration::ZERO), "{fast:?}");
    // The slow one still handles its events one after the other, in order.
    assert_eq!(started.elapsed(), Duration::from_millis(1_000));
}

const STUCK_CHILD: &str = "EVENTFOLD_STUCK_BLOCKING_CHILD";

/// The child of `a_stuck_blocking_handler_does_not_keep_the_process_from_exiting`: its
/// blocking handler never returns; it stops the bus, drops the runtime and returns.
#[test]
fn stuck_blocking_child_entry() {
    if std::env::var(STUCK_CHILD).is_err() {
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let report = runtime.block_on(async {
        let bus = EventBus::builder()
            .stop_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel::<()>();
        let entered_tx = Mutex::new(entered_tx);
        bus.subscribe_blocking("stuck", move |_: Delivery<ParcelEvent>| {
            entered_tx.lock().unwrap().send(()).unwrap();
            loop {
                std::thread::park();
            }
            #[allow(unreachable_code)]
            Ok::<_, Error>(())
        })
        .register()
        .unwrap();
        bus.start().await.unwrap();
        bus.publish(sent("p", 1)).await.unwrap();
        tokio::task::spawn_blocking(move || entered_rx.recv().unwrap())
            .await
            .unwrap();
        bus.stop().await.unwrap()
    });
    drop(runtime);
    println!(
        "stopped drained={} unfinished={} deliveries={}",
        report.drained, report.unfinished, report.unfinished_deliveries
    );
}

/// Regression: a `subscribe_blocking` handler stuck in a blocking call kept the process
/// from exiting after `stop()` (the runtime waited for tokio's blocking pool).
#[test]
fn a_stuck_blocking_handler_does_not_keep_the_process_from_exiting() {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stuck_blocking_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STUCK_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The child's stdout ends when it exits: read it to the end on a thread of its own.
    let mut stdout = child.stdout.take().unwrap();
    let (sent, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let read = std::io::Read::read_to_string(&mut stdout, &mut out);
        let _ = sent.send(read.map(|_| out));
    });
    // A guard against a hang, not a measurement: the child exits in well under a second.
    let out = match output.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the child did not exit after stop()");
        }
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {out}");
    assert!(
        out.contains("stopped drained=false unfinished=1 deliveries=1"),
        "{out}"
    );
}

// ----- Point 8: failure records stay bounded -----

/// Regression: a transient bus kept every failure record in memory (60,000 for 20,000
/// failing events) and listed the oldest.
#[tokio::test(start_paused = true)]
async fn failure_records_in_memory_are_bounded_by_the_retention_newest_first() {
    let bus = EventBus::builder().workers(2).build().unwrap();
    bus.subscribe("mailer", |_: Delivery<ParcelEvent>| {
        std::future::ready(Err::<(), _>("down"))
    })
    .retry(RetryPolicy::exponential(
        3,
        Duration::from_millis(1),
        Duration::from_millis(1),
    ))
    .failure_retention(50)
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch((1..=200).map(|i| sent(&format!("p-{}", i % 7), i)))
        .await
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(bus.statistics().await.unwrap().failed, 600);
    let failures = bus.failures("mailer", usize::MAX).await.unwrap();
    assert_eq!(failures.len(), 50);
    assert!(
        failures
            .windows(2)
            .all(|w| w[0].failed_at >= w[1].failed_at),
        "newest first"
    );
    assert_eq!(bus.failures("mailer", 5).await.unwrap().len(), 5);
    assert_eq!(bus.dead_letters(None).await.unwrap().len(), 200);
}

// ----- Point 9: the docs and the code agree -----

/// Regression: `publish_batch` from a handler into its own full bus was refused at
/// capacity 1 and went beyond the capacity at 2. The rule now: a batch larger than the
/// capacity is refused everywhere; one that fits never waits inside a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_batch_beyond_the_capacity_is_refused_and_one_that_fits_goes_through() {
    for capacity in [1_usize, 2, 64] {
        let bus = EventBus::builder()
            .queue_capacity(capacity)
            .build()
            .unwrap();
        let outcomes: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
        let (relay, recorded) = (bus.clone(), Arc::clone(&outcomes));
        bus.subscribe("relay", move |_: Delivery<ParcelEvent>| {
            let (relay, recorded) = (relay.clone(), Arc::clone(&recorded));
            async move {
                for size in [capacity, capacity + 1] {
                    let batch = (0..size).map(|_| TruckEvent::Loaded { truck: "t".into() });
                    let result = relay.publish_batch(batch).await;
                    if let Err(error) = &result {
                        assert!(matches!(error, Error::QueueFull { .. }), "{error}");
                    }
                    recorded.lock().unwrap().push((size, result.is_ok()));
                }
                Ok::<_, Error>(())
            }
        })
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
        bus.subscribe("trucks", |_: Delivery<TruckEvent>| {
            std::future::ready(Ok::<_, Error>(()))
        })
        .register()
        .unwrap();
        bus.start().await.unwrap();
        // The relay's own event fills the queue when the capacity is 1.
        bus.publish(sent("p", 1)).await.unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(
            *outcomes.lock().unwrap(),
            [(capacity, true), (capacity + 1, false)],
            "capacity {capacity}"
        );
        let stats = bus.statistics().await.unwrap();
        assert_eq!(stats.published, 1 + capacity as u64, "capacity {capacity}");
        bus.stop().await.unwrap();
    }
}

/// Regression: after `wait_idle`, `store.load_checkpoint` lagged behind `statistics()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_wait_idle_the_stored_checkpoint_is_the_one_statistics_report() {
    for round in 0..20 {
        let store = InMemoryEventStore::new();
        let bus = EventBus::builder()
            .store(Arc::new(store.clone()))
            .build()
            .unwrap();
        bus.subscribe("audit", recorder(&Seen::default()))
            .register()
            .unwrap();
        bus.start().await.unwrap();
        bus.publish_batch((1..=50).map(|i| sent(&format!("p-{}", i % 5), i)))
            .await
            .unwrap();
        bus.wait_idle().await.unwrap();
        let reported = bus.statistics().await.unwrap().subscriptions[0].checkpoint;
        assert_eq!(reported, Some(50), "round {round}");
        assert_eq!(
            store.load_checkpoint("audit").await.unwrap(),
            reported,
            "round {round}"
        );
        bus.stop().await.unwrap();
    }
}

/// A clock that panics the first time it is read: a panic in the bus's own failure path
/// (user code the bus calls, not a handler).
struct PanicsOnce(AtomicU32);

impl eventfold::Clock for PanicsOnce {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("the clock broke");
        }
        chrono::Utc::now()
    }
}

/// A worker whose loop panics anyway goes on (it is not lost with its deliveries), the
/// delivery it held counts as a failed attempt, and the statistics report the restart.
#[tokio::test(start_paused = true)]
async fn a_worker_that_panics_outside_a_handler_goes_on_and_is_reported() {
    let bus = EventBus::builder()
        .workers(1)
        .clock(Arc::new(PanicsOnce(AtomicU32::new(0))))
        .build()
        .unwrap();
    let seen = Seen::default();
    let recorded = Arc::clone(&seen);
    bus.subscribe("flaky", move |d: Delivery<ParcelEvent>| {
        let first = d.attempt() == 1 && seq_of(&d) == 1;
        if !first {
            recorded.lock().unwrap().push(("p".into(), seq_of(&d)));
        }
        std::future::ready(if first {
            Err("first attempt fails")
        } else {
            Ok(())
        })
    })
    .retry(RetryPolicy::exponential(
        3,
        Duration::from_millis(10),
        Duration::from_millis(10),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.publish_batch([sent("p", 1), sent("p", 2)])
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(3600), bus.wait_idle())
        .await
        .expect("wait_idle hung")
        .unwrap();
    assert_eq!(seqs(&seen), [1, 2]);
    let stats = bus.statistics().await.unwrap();
    assert_eq!(stats.worker_restarts, 1);
    assert_eq!((stats.delivered, stats.failed), (2, 1));
    assert!(bus.stop().await.unwrap().drained);
}

/// A store whose rows at some positions read back damaged: with the error the SQLite
/// store is getting (`CorruptEvent` naming the position and id) or with one that names
/// nothing (a `Corrupt` store error, as the SQLite store gives today).
struct DamagedAt {
    inner: InMemoryEventStore,
    damaged: Vec<u64>,
    names_the_row: bool,
}

impl DamagedAt {
    fn damage(&self, events: &[RecordedEvent]) -> Result<(), Error> {
        match events.iter().find(|e| self.damaged.contains(&e.position)) {
            None => Ok(()),
            Some(e) if self.names_the_row => Err(Error::CorruptEvent {
                event_id: Some(e.event_id),
                position: Some(e.position),
                reason: "its checksum does not match".into(),
            }),
            Some(e) => Err(Error::Store {
                kind: eventfold::StoreErrorKind::Corrupt,
                message: format!("the event at position {} has no valid event id", e.position),
                source: None,
            }),
        }
    }
}

#[async_trait::async_trait]
impl eventfold::backend::EventLog for DamagedAt {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> eventfold::Result<eventfold::AppendOutcome> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
    ) -> eventfold::Result<Vec<RecordedEvent>> {
        let events = self.inner.read_stream(stream, from).await?;
        self.damage(&events)?;
        Ok(events)
    }

    async fn read_all(&self, from: u64, limit: usize) -> eventfold::Result<Vec<RecordedEvent>> {
        let events = self.inner.read_all(from, limit).await?;
        self.damage(&events)?;
        Ok(events)
    }

    async fn get(&self, id: uuid::Uuid) -> eventfold::Result<Option<RecordedEvent>> {
        let event = self.inner.get(id).await?;
        self.damage(event.as_slice())?;
        Ok(event)
    }

    async fn stream_version(&self, stream: &StreamId) -> eventfold::Result<u64> {
        self.inner.stream_version(stream).await
    }

    async fn head_position(&self) -> eventfold::Result<u64> {
        self.inner.head_position().await
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_head()
    }

    async fn statistics(&self) -> eventfold::Result<eventfold::StoreStatistics> {
        self.inner.statistics().await
    }
}

forward_snapshot_store!(DamagedAt => inner);

forward_subscription_store!(DamagedAt => inner);

/// The bus finds a damaged row both ways: by the position a `CorruptEvent` names (and
/// then keeps its event id), and by reading fewer rows at a time when the error names
/// none (then the dead letter's event id is nil).
#[tokio::test]
async fn a_damaged_row_is_found_whether_or_not_the_error_names_it() {
    for names_the_row in [true, false] {
        let inner = InMemoryEventStore::new();
        let mut ids = Vec::new();
        for seq in 1..=6 {
            let event = NewEvent::from_event(&sent("p", seq), Metadata::new()).unwrap();
            ids.push(event.event_id);
            append(&inner, event, "Parcel", "p").await;
        }
        let store = Arc::new(DamagedAt {
            inner: inner.clone(),
            damaged: vec![2, 5],
            names_the_row,
        });
        let bus = EventBus::builder().store(store).build().unwrap();
        let seen = Seen::default();
        bus.subscribe("audit", recorder(&seen)).register().unwrap();
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(seqs(&seen), [1, 3, 4, 6], "names the row: {names_the_row}");
        let dead = bus.dead_letters(None).await.unwrap();
        let found: Vec<(u64, uuid::Uuid)> = dead.iter().map(|d| (d.position, d.event_id)).collect();
        let expected = if names_the_row {
            vec![(2, ids[1]), (5, ids[4])]
        } else {
            vec![(2, uuid::Uuid::nil()), (5, uuid::Uuid::nil())]
        };
        assert_eq!(found, expected);
        assert!(
            dead.iter()
                .all(|d| d.error.contains("damaged") || d.error.contains("no valid event id"))
        );
        assert_eq!(inner.load_checkpoint("audit").await.unwrap(), Some(6));
        bus.stop().await.unwrap();
    }
}

/// Deliveries waiting behind a retry are read again from their stream; a damaged row in
/// that stream (dead-lettered already) does not keep the others from coming back.
#[tokio::test(start_paused = true)]
async fn waiting_deliveries_come_back_around_a_damaged_row_of_their_stream() {
    let inner = InMemoryEventStore::new();
    for seq in 1..=5 {
        let event = NewEvent::from_event(&sent("p", seq), Metadata::new()).unwrap();
        append(&inner, event, "Parcel", "p").await;
    }
    let store = Arc::new(DamagedAt {
        inner: inner.clone(),
        damaged: vec![3],
        names_the_row: false,
    });
    let bus = EventBus::builder().store(store).build().unwrap();
    let seen = Seen::default();
    let recorded = Arc::clone(&seen);
    bus.subscribe("flaky", move |d: Delivery<ParcelEvent>| {
        let fail = seq_of(&d) == 1 && d.attempt() == 1;
        if !fail {
            recorded.lock().unwrap().push(("p".into(), seq_of(&d)));
        }
        std::future::ready(if fail { Err("not yet") } else { Ok(()) })
    })
    .retry(RetryPolicy::exponential(
        3,
        Duration::from_secs(1),
        Duration::from_secs(1),
    ))
    .register()
    .unwrap();
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(seqs(&seen), [1, 2, 4, 5]);
    let dead = bus.dead_letters(None).await.unwrap();
    assert_eq!(dead.iter().map(|d| d.position).collect::<Vec<_>>(), [3]);
    assert_eq!(inner.load_checkpoint("flaky").await.unwrap(), Some(5));
}

forward_lease_store!(DamagedAt => inner);
