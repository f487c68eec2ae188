//! Where a new durable subscription starts (`start_from`), and resetting a subscription's
//! checkpoint (`reset_subscription`), each on the in-memory store and on a SQLite file.
//! A restart is a new bus over the same storage: the same in-memory store, or the SQLite
//! file opened again.
#[macro_use]
#[path = "common/forward.rs"]
mod forward;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use eventfold::prelude::*;
use eventfold::{Delivery, Error, EventBus, ResetTo, SqliteEventStore, SqliteOptions, StartFrom};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter")]
enum MeterEvent {
    Read {
        #[domain_event(aggregate_id)]
        meter: String,
        seq: u64,
    },
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Sqlite,
}

const KINDS: [Kind; 2] = [Kind::Memory, Kind::Sqlite];

/// The storage buses of one test share, across restarts.
struct Storage {
    kind: Kind,
    memory: Arc<InMemoryEventStore>,
    dir: tempfile::TempDir,
}

impl Storage {
    fn new(kind: Kind) -> Self {
        Storage {
            kind,
            memory: Arc::new(InMemoryEventStore::new()),
            dir: tempfile::Builder::new()
                .prefix("eventfold-bus-reset-")
                .tempdir()
                .unwrap(),
        }
    }

    /// A store handle: the same in-memory store, or the SQLite file opened anew.
    async fn open(&self) -> Arc<dyn EventStore> {
        match self.kind {
            Kind::Memory => Arc::clone(&self.memory) as Arc<dyn EventStore>,
            Kind::Sqlite => Arc::new(
                SqliteEventStore::open(self.dir.path().join("bus.db"), SqliteOptions::new())
                    .await
                    .unwrap(),
            ),
        }
    }

    /// A bus (not started) over a fresh handle of the storage.
    async fn bus(&self) -> (EventBus, Arc<dyn EventStore>) {
        let store = self.open().await;
        let bus = EventBus::builder()
            .workers(2)
            .store(Arc::clone(&store))
            .build()
            .unwrap();
        (bus, store)
    }

    /// Appends `count` readings, alternating between two meters, through a bus with no
    /// subscription; returns the head.
    async fn append(&self, first_seq: u64, count: u64) -> u64 {
        let (bus, store) = self.bus().await;
        bus.start().await.unwrap();
        for seq in first_seq..first_seq + count {
            let meter = if seq % 2 == 0 { "m-even" } else { "m-odd" };
            bus.publish(MeterEvent::Read {
                meter: meter.into(),
                seq,
            })
            .await
            .unwrap();
        }
        bus.stop().await.unwrap();
        store.head_position().await.unwrap()
    }
}

/// What a subscription received: (aggregate id, position), in delivery order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, u64)>>>);

impl Seen {
    fn subscribe(&self, bus: &EventBus, name: &str, start: StartFrom) {
        let seen = self.clone();
        bus.subscribe(name, move |d: Delivery<MeterEvent>| {
            let seen = seen.clone();
            async move {
                let MeterEvent::Read { meter, .. } = d.event();
                seen.0
                    .lock()
                    .unwrap()
                    .push((meter.clone(), d.record().position));
            }
        })
        .start_from(start)
        .register()
        .unwrap();
    }

    /// The positions received, sorted, after checking that each aggregate's came in order
    /// and none twice.
    fn positions(&self) -> Vec<u64> {
        let seen = self.0.lock().unwrap();
        for meter in ["m-even", "m-odd"] {
            let mine: Vec<u64> = seen
                .iter()
                .filter(|(m, _)| m == meter)
                .map(|&(_, p)| p)
                .collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "{meter} out of order or repeated: {mine:?}"
            );
        }
        let mut all: Vec<u64> = seen.iter().map(|&(_, p)| p).collect();
        all.sort_unstable();
        all
    }

    fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}

/// Starts a bus with these subscriptions, waits until it has handled the log, stops it.
async fn run(storage: &Storage, subs: &[(&str, &Seen, StartFrom)]) {
    let (bus, _store) = storage.bus().await;
    for (name, seen, start) in subs {
        seen.subscribe(&bus, name, *start);
    }
    bus.start().await.unwrap();
    bus.wait_idle().await.unwrap();
    bus.stop().await.unwrap();
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_end_skips_history_and_its_checkpoint_survives_a_restart() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        assert_eq!(storage.append(1, 5).await, 5);

        let (late, all) = (Seen::default(), Seen::default());
        let (bus, store) = storage.bus().await;
        late.subscribe(&bus, "late", StartFrom::End);
        all.subscribe(&bus, "all", StartFrom::Beginning);
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        assert!(late.positions().is_empty(), "{kind:?}: history skipped");
        assert_eq!(all.positions(), range(1, 5), "{kind:?}");
        assert_eq!(
            store.load_checkpoint("late").await.unwrap(),
            Some(5),
            "{kind:?}: the head became its checkpoint"
        );
        for seq in 6..=8 {
            bus.publish(MeterEvent::Read {
                meter: "m-even".into(),
                seq,
            })
            .await
            .unwrap();
        }
        bus.wait_idle().await.unwrap();
        assert_eq!(late.positions(), range(6, 8), "{kind:?}: only new events");
        bus.stop().await.unwrap();
        drop((bus, store));

        // After a restart the saved checkpoint wins over `End`: the events appended while
        // it was down are delivered, the history before its start is not.
        storage.append(9, 2).await;
        late.clear();
        run(&storage, &[("late", &late, StartFrom::End)]).await;
        assert_eq!(
            late.positions(),
            range(9, 10),
            "{kind:?}: after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_end_saves_the_head_before_anything_is_handled() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 4).await;
        let late = Seen::default();
        // Registered, started and stopped at once: nothing handled, yet the checkpoint
        // is stored, so the next run does not replay the history either.
        run(&storage, &[("late", &late, StartFrom::End)]).await;
        assert!(late.positions().is_empty(), "{kind:?}");
        let store = storage.open().await;
        assert_eq!(store.load_checkpoint("late").await.unwrap(), Some(4));
        drop(store);
        storage.append(5, 1).await;
        run(&storage, &[("late", &late, StartFrom::Beginning)]).await;
        assert_eq!(late.positions(), vec![5], "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_checkpoint_wins_over_start_from() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 6).await;
        let store = storage.open().await;
        store.save_checkpoint("resumed", 2).await.unwrap();
        drop(store);
        let resumed = Seen::default();
        run(&storage, &[("resumed", &resumed, StartFrom::End)]).await;
        assert_eq!(resumed.positions(), range(3, 6), "{kind:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_start_redelivers_everything_in_order() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 7).await;
        let seen = Seen::default();
        run(&storage, &[("projection", &seen, StartFrom::Beginning)]).await;
        assert_eq!(seen.positions(), range(1, 7), "{kind:?}");
        seen.clear();

        // Registered on a bus not started yet: allowed.
        let (bus, store) = storage.bus().await;
        seen.subscribe(&bus, "projection", StartFrom::Beginning);
        assert_eq!(
            bus.reset_subscription("projection", ResetTo::Start)
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(0));
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(seen.positions(), range(1, 7), "{kind:?}: all again");
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(7));
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_position_and_to_the_end() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 6).await;
        let seen = Seen::default();
        run(&storage, &[("projection", &seen, StartFrom::Beginning)]).await;
        seen.clear();

        // An operator's bus that does not run the subscription.
        let (operator, store) = storage.bus().await;
        assert_eq!(
            operator
                .reset_subscription("projection", ResetTo::Position(3))
                .await
                .unwrap(),
            3
        );
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(3));
        drop((operator, store));
        run(&storage, &[("projection", &seen, StartFrom::Beginning)]).await;
        assert_eq!(seen.positions(), range(4, 6), "{kind:?}: after position 3");
        seen.clear();

        let (operator, _store) = storage.bus().await;
        operator
            .reset_subscription("projection", ResetTo::Start)
            .await
            .unwrap();
        assert_eq!(
            operator
                .reset_subscription("projection", ResetTo::End)
                .await
                .unwrap(),
            6
        );
        drop(operator);
        storage.append(7, 1).await;
        run(&storage, &[("projection", &seen, StartFrom::Beginning)]).await;
        assert_eq!(seen.positions(), vec![7], "{kind:?}: after the end");
    }
}

/// The checkpoint a reset to `time` should set: the position before the first event
/// recorded at or after it, by a linear scan of the times read back from the store.
fn expected_checkpoint(times: &[(u64, DateTime<Utc>)], time: DateTime<Utc>) -> u64 {
    times
        .iter()
        .find(|&&(_, t)| t >= time)
        .map_or(times.len() as u64, |&(p, _)| p - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_time_resumes_at_the_first_event_recorded_then() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        // Appended in several runs, so the recorded times differ between them at least.
        for run in 0..4 {
            storage.append(run * 5 + 1, 5).await;
        }
        let store = storage.open().await;
        let times: Vec<(u64, DateTime<Utc>)> = store
            .read_all(1, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| (e.position, e.recorded_at))
            .collect();
        assert_eq!(times.len(), 20);
        assert!(times.windows(2).all(|w| w[0].1 <= w[1].1), "{kind:?}");

        let (operator, _) = storage.bus().await;
        assert!(
            matches!(
                operator
                    .reset_subscription("projection", ResetTo::Time(times[3].1))
                    .await,
                Err(Error::UnknownSubscription { .. })
            ),
            "{kind:?}: neither registered nor checkpointed yet"
        );
        drop(operator);
        store.save_checkpoint("projection", 20).await.unwrap();
        drop(store);

        // Every probe, through the subscription itself: it receives exactly the events
        // from the first one recorded at or after the time.
        let mut probes: Vec<DateTime<Utc>> = times.iter().map(|&(_, t)| t).collect();
        probes.push(times[0].1 - chrono::Duration::seconds(1));
        probes.push(times[19].1 + chrono::Duration::nanoseconds(1));
        for time in probes {
            let expected = expected_checkpoint(&times, time);
            let (operator, _) = storage.bus().await;
            assert_eq!(
                operator
                    .reset_subscription("projection", ResetTo::Time(time))
                    .await
                    .unwrap(),
                expected,
                "{kind:?}: {time}"
            );
            drop(operator);
            let seen = Seen::default();
            run(&storage, &[("projection", &seen, StartFrom::Beginning)]).await;
            assert_eq!(
                seen.positions(),
                range(expected + 1, 20),
                "{kind:?}: {time}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_that_cannot_be_done_fail_and_change_nothing() {
    // Without a store there is no checkpoint to reset.
    let transient = EventBus::builder().build().unwrap();
    Seen::default().subscribe(&transient, "projection", StartFrom::Beginning);
    assert!(matches!(
        transient
            .reset_subscription("projection", ResetTo::Start)
            .await,
        Err(Error::NotDurable {
            operation: "reset_subscription"
        })
    ));

    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 4).await;
        let seen = Seen::default();
        let (bus, store) = storage.bus().await;
        seen.subscribe(&bus, "projection", StartFrom::Beginning);
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();

        // Registered on the running bus.
        let refused = bus.reset_subscription("projection", ResetTo::Start).await;
        assert!(
            matches!(&refused, Err(Error::SubscriptionRunning { name }) if name == "projection"),
            "{kind:?}: {refused:?}"
        );
        // A name that is neither registered nor has a checkpoint.
        let unknown = bus.reset_subscription("projecton", ResetTo::Start).await;
        assert!(
            matches!(&unknown, Err(Error::UnknownSubscription { name }) if name == "projecton"),
            "{kind:?}: {unknown:?}"
        );
        assert_eq!(store.load_checkpoint("projecton").await.unwrap(), None);
        bus.wait_idle().await.unwrap();
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(4));
        assert_eq!(
            seen.positions(),
            range(1, 4),
            "{kind:?}: nothing redelivered"
        );
        bus.stop().await.unwrap();

        // Past the head, on a stopped bus (where a reset is allowed).
        let beyond = bus
            .reset_subscription("projection", ResetTo::Position(5))
            .await;
        assert!(
            matches!(
                beyond,
                Err(Error::PositionBeyondHead {
                    position: 5,
                    head: 4
                })
            ),
            "{kind:?}: {beyond:?}"
        );
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(4));
        // The head itself is fine.
        assert_eq!(
            bus.reset_subscription("projection", ResetTo::Position(4))
                .await
                .unwrap(),
            4
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_unsubscribed_from_a_running_bus_can_be_reset_and_rejoin() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 5).await;
        let seen = Seen::default();
        let (bus, store) = storage.bus().await;
        seen.subscribe(&bus, "projection", StartFrom::Beginning);
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(seen.positions(), range(1, 5), "{kind:?}");

        assert!(bus.unsubscribe("projection"));
        assert_eq!(
            bus.reset_subscription("projection", ResetTo::Position(2))
                .await
                .unwrap(),
            2
        );
        // The bus goes on; its saves do not move the reset checkpoint back up.
        bus.publish(MeterEvent::Read {
            meter: "m-odd".into(),
            seq: 6,
        })
        .await
        .unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(2));

        seen.clear();
        seen.subscribe(&bus, "projection", StartFrom::Beginning);
        bus.wait_idle().await.unwrap();
        assert_eq!(seen.positions(), range(3, 6), "{kind:?}: from the reset");
        bus.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_subscription_without_a_checkpoint_can_be_reset_before_the_start() {
    for kind in KINDS {
        let storage = Storage::new(kind);
        storage.append(1, 5).await;
        let seen = Seen::default();
        let (bus, store) = storage.bus().await;
        seen.subscribe(&bus, "fresh", StartFrom::Beginning);
        assert_eq!(store.load_checkpoint("fresh").await.unwrap(), None);
        assert_eq!(
            bus.reset_subscription("fresh", ResetTo::Position(2))
                .await
                .unwrap(),
            2
        );
        bus.start().await.unwrap();
        bus.wait_idle().await.unwrap();
        assert_eq!(seen.positions(), range(3, 5), "{kind:?}");
        // Once running, the same reset is refused.
        assert!(matches!(
            bus.reset_subscription("fresh", ResetTo::Position(2)).await,
            Err(Error::SubscriptionRunning { .. })
        ));
        bus.stop().await.unwrap();
    }
}

/// The in-memory store, whose first checkpoint save waits until the test releases it
/// (saying when it started), so a save can be caught in flight; it can also say when the
/// head is next asked for.
struct HeldSave {
    inner: Arc<InMemoryEventStore>,
    hold: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    head_asked: Mutex<Option<oneshot::Sender<()>>>,
}

impl HeldSave {
    /// The first checkpoint save says it started, then waits for the release.
    async fn held(&self) {
        let hold = self.hold.lock().unwrap().take();
        if let Some((entered, release)) = hold {
            let _ = entered.send(());
            let _ = release.await;
        }
    }
}

#[async_trait::async_trait]
impl eventfold::backend::EventLog for HeldSave {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<eventfold::NewEvent>,
    ) -> eventfold::Result<eventfold::AppendOutcome> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: u64,
    ) -> eventfold::Result<Vec<RecordedEvent>> {
        self.inner.read_stream(stream, from).await
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
        let head = self.inner.head_position().await;
        if let Some(asked) = self.head_asked.lock().unwrap().take() {
            let _ = asked.send(());
        }
        head
    }

    fn watch_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.watch_head()
    }

    async fn statistics(&self) -> eventfold::Result<eventfold::StoreStatistics> {
        self.inner.statistics().await
    }
}

forward_snapshot_store!(HeldSave => inner);

#[async_trait::async_trait]
impl eventfold::backend::SubscriptionStore for HeldSave {
    async fn load_checkpoint(&self, name: &str) -> eventfold::Result<Option<u64>> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> eventfold::Result<()> {
        self.held().await;
        self.inner.save_checkpoint(name, position).await
    }

    async fn add_dead_letter(
        &self,
        dead_letter: eventfold::backend::NewDeadLetter,
    ) -> eventfold::Result<u64> {
        self.inner.add_dead_letter(dead_letter).await
    }

    async fn dead_letters(
        &self,
        name: Option<&str>,
    ) -> eventfold::Result<Vec<eventfold::DeadLetter>> {
        self.inner.dead_letters(name).await
    }

    async fn remove_dead_letter(&self, id: u64) -> eventfold::Result<bool> {
        self.inner.remove_dead_letter(id).await
    }

    async fn record_failure(
        &self,
        failure: eventfold::FailureRecord,
        retain: usize,
    ) -> eventfold::Result<()> {
        self.inner.record_failure(failure, retain).await
    }

    async fn clear_dead_letters(&self, name: Option<&str>) -> eventfold::Result<u64> {
        self.inner.clear_dead_letters(name).await
    }

    async fn clear_failures(&self, name: Option<&str>) -> eventfold::Result<u64> {
        self.inner.clear_failures(name).await
    }

    async fn failures(
        &self,
        name: &str,
        limit: usize,
    ) -> eventfold::Result<Vec<eventfold::FailureRecord>> {
        self.inner.failures(name, limit).await
    }
}

/// A save of the old checkpoint that is under way when a subscription is unsubscribed and
/// reset, and the saves after it, do not write over the reset checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_in_flight_does_not_undo_a_reset() {
    let storage = Storage::new(Kind::Memory);
    storage.append(1, 3).await;
    // A checkpoint from an earlier run, so the name is known to the store.
    storage
        .memory
        .save_checkpoint("projection", 0)
        .await
        .unwrap();
    let (entered_tx, entered) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    let store = Arc::new(HeldSave {
        inner: Arc::clone(&storage.memory),
        hold: Mutex::new(Some((entered_tx, release_rx))),
        head_asked: Mutex::new(None),
    });
    let bus = EventBus::builder()
        .workers(2)
        .store(Arc::clone(&store))
        .build()
        .unwrap();
    let seen = Seen::default();
    seen.subscribe(&bus, "projection", StartFrom::Beginning);
    bus.start().await.unwrap();
    // The first save of its moved checkpoint is now under way, and held.
    entered.await.unwrap();
    assert!(bus.unsubscribe("projection"));
    let reset = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.reset_subscription("projection", ResetTo::Position(1))
                .await
        }
    });
    release.send(()).unwrap();
    assert_eq!(reset.await.unwrap().unwrap(), 1);
    bus.wait_idle().await.unwrap();
    assert_eq!(
        storage.memory.load_checkpoint("projection").await.unwrap(),
        Some(1)
    );
    bus.stop().await.unwrap();
    assert_eq!(
        storage.memory.load_checkpoint("projection").await.unwrap(),
        Some(1)
    );
}

/// A subscription registered on the running bus while its reset waits for the checkpoint
/// gate is found by the reset's second check: the reset fails and the checkpoint the
/// subscription took up stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_during_a_reset_makes_the_reset_fail_rather_than_race_it() {
    let storage = Storage::new(Kind::Memory);
    storage.append(1, 3).await;
    storage
        .memory
        .save_checkpoint("projection", 0)
        .await
        .unwrap();
    let (entered_tx, entered) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    let store = Arc::new(HeldSave {
        inner: Arc::clone(&storage.memory),
        hold: Mutex::new(Some((entered_tx, release_rx))),
        head_asked: Mutex::new(None),
    });
    let bus = EventBus::builder()
        .workers(2)
        .store(Arc::clone(&store))
        .build()
        .unwrap();
    let other = Seen::default();
    other.subscribe(&bus, "other", StartFrom::Beginning);
    bus.start().await.unwrap();
    // A save of the other subscription's checkpoint holds the gate.
    entered.await.unwrap();
    let (asked_tx, asked) = oneshot::channel();
    *store.head_asked.lock().unwrap() = Some(asked_tx);
    let reset = tokio::spawn({
        let bus = bus.clone();
        async move {
            bus.reset_subscription("projection", ResetTo::Position(1))
                .await
        }
    });
    // The reset passed its first check and reads the head; then it waits for the gate.
    asked.await.unwrap();
    let seen = Seen::default();
    seen.subscribe(&bus, "projection", StartFrom::Beginning);
    release.send(()).unwrap();
    let refused = reset.await.unwrap();
    assert!(
        matches!(&refused, Err(Error::SubscriptionRunning { name }) if name == "projection"),
        "{refused:?}"
    );
    bus.wait_idle().await.unwrap();
    assert_eq!(seen.positions(), range(1, 3));
    assert_eq!(
        storage.memory.load_checkpoint("projection").await.unwrap(),
        Some(3)
    );
    bus.stop().await.unwrap();
}

#[async_trait::async_trait]
impl eventfold::backend::LeaseStore for HeldSave {
    async fn heartbeat(
        &self,
        subscription: &str,
        member: &str,
        ttl: std::time::Duration,
    ) -> eventfold::Result<Vec<String>> {
        self.inner.heartbeat(subscription, member, ttl).await
    }

    async fn leave(&self, subscription: &str, member: &str) -> eventfold::Result<()> {
        self.inner.leave(subscription, member).await
    }

    async fn claim_segments(
        &self,
        subscription: &str,
        member: &str,
        segments: u32,
        max: u32,
        ttl: std::time::Duration,
    ) -> eventfold::Result<Vec<eventfold::backend::SegmentLease>> {
        self.inner
            .claim_segments(subscription, member, segments, max, ttl)
            .await
    }

    async fn renew_leases(
        &self,
        leases: &[eventfold::backend::SegmentLease],
        ttl: std::time::Duration,
    ) -> eventfold::Result<Vec<eventfold::backend::SegmentLease>> {
        self.inner.renew_leases(leases, ttl).await
    }

    async fn release_leases(
        &self,
        leases: &[eventfold::backend::SegmentLease],
    ) -> eventfold::Result<()> {
        self.inner.release_leases(leases).await
    }

    async fn save_segment_checkpoint(
        &self,
        lease: &eventfold::backend::SegmentLease,
        position: u64,
    ) -> eventfold::Result<()> {
        // The bus saves its checkpoints here, under its segment leases.
        self.held().await;
        self.inner.save_segment_checkpoint(lease, position).await
    }

    async fn segment_states(
        &self,
        subscription: &str,
    ) -> eventfold::Result<Vec<eventfold::backend::SegmentState>> {
        self.inner.segment_states(subscription).await
    }

    async fn reset_segments(&self, subscription: &str, position: u64) -> eventfold::Result<()> {
        self.inner.reset_segments(subscription, position).await
    }
}
