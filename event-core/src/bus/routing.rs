//! Who receives what: the subscriptions as the engine sees them, the routing table by
//! event type, and the events and jobs that travel from the intake to the workers.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::config::{RetryPolicy, UnknownEventPolicy};
use super::handler::{EventSource, Invoke};
use super::stats::{Counters, Histogram};
use crate::record::RecordedEvent;

/// One subscription as the engine sees it.
pub(crate) struct Sub {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    pub(crate) priority: i32,
    pub(crate) retry: RetryPolicy,
    /// How long one attempt may run before it counts as failed.
    pub(crate) timeout: Duration,
    /// What happens to stored events of its aggregate type that no code registers.
    pub(crate) unknown: UnknownEventPolicy,
    /// How many failure records to keep for it.
    pub(crate) failure_retention: usize,
    /// Where it starts on a store when it has no checkpoint.
    pub(crate) start_from: super::reset::StartFrom,
    /// The aggregate type of its event type.
    pub(crate) aggregate_type: &'static str,
    pub(crate) event_types: Vec<&'static str>,
    pub(crate) invoke: Box<dyn Invoke>,
    pub(crate) counters: Counters,
    pub(crate) latency: Histogram,
    /// Its metrics (`eventfold::metrics`), taken at registration.
    pub(crate) metrics: crate::metrics::SubscriptionMetrics,
    pub(crate) active: AtomicBool,
    /// Deliveries routed to it and not yet done (its lag on a bus without a store).
    pub(crate) queued: AtomicU64,
    /// Its deliveries kept in memory behind a busy lane without a slot of the queue.
    pub(crate) parked: AtomicU64,
    /// How many segments it is split into (1 unless set; see
    /// [`SubscriptionBuilder::segments`](super::SubscriptionBuilder::segments)).
    pub(crate) segments: u32,
    /// Per segment: whether this bus runs it now (always, without a store; with one, while
    /// it holds the segment's lease). A delivery of a segment not held is dropped before
    /// its next attempt.
    pub(crate) held: Box<[AtomicBool]>,
    /// Per segment: the epoch of the lease this bus holds on it (0 when none, or without a
    /// store), for [`Delivery::lease_epoch`](super::Delivery::lease_epoch).
    pub(crate) epochs: Box<[AtomicU64]>,
    /// The segments this bus runs, for
    /// [`EventBus::watch_held_segments`](super::EventBus::watch_held_segments).
    pub(crate) held_watch: tokio::sync::watch::Sender<Vec<u32>>,
    /// The segment count the store has stored for it when that is not `segments` (its
    /// claims are refused; 0: none refused), for [`EventBus::wait_idle`](super::EventBus::wait_idle)
    /// to report.
    pub(crate) refused_count: std::sync::atomic::AtomicU32,
}

impl Sub {
    /// Hands the metrics recorder what its delivered count grew by since the last time.
    pub(crate) fn catch_up_metrics(&self) {
        self.metrics
            .handled
            .catch_up(self.counters.delivered.load(Ordering::Relaxed));
    }

    /// The segment of an event with this partition hash.
    pub(crate) fn segment_of(&self, partition: u32) -> u32 {
        if self.segments == 1 {
            0
        } else {
            partition % self.segments
        }
    }

    /// Whether this bus runs the deliveries of events with this partition hash.
    pub(crate) fn runs(&self, partition: u32) -> bool {
        self.held[self.segment_of(partition) as usize].load(Ordering::Acquire)
    }

    /// The epoch of the lease under which this bus runs the events with this partition
    /// hash; `None` without one (a bus without a store).
    pub(crate) fn epoch_of(&self, partition: u32) -> Option<u64> {
        let epoch = self.epochs[self.segment_of(partition) as usize].load(Ordering::Acquire);
        (epoch != 0).then_some(epoch)
    }

    /// Marks a segment as run here under the lease of this epoch, or, with `None`, as not
    /// run here; the held segments' watch hears of it.
    pub(crate) fn set_held(&self, segment: u32, lease_epoch: Option<u64>) {
        if let (Some(flag), Some(epoch)) = (
            self.held.get(segment as usize),
            self.epochs.get(segment as usize),
        ) {
            epoch.store(lease_epoch.unwrap_or(0), Ordering::Release);
            flag.store(lease_epoch.is_some(), Ordering::Release);
        }
        self.held_watch.send_if_modified(|held| {
            let at = held.binary_search(&segment);
            match (at, lease_epoch.is_some()) {
                (Err(at), true) => held.insert(at, segment),
                (Ok(at), false) => {
                    held.remove(at);
                }
                _ => return false,
            }
            true
        });
    }

    /// Stops running a segment whose lease this bus still holds, as it gives it up: its
    /// deliveries not yet started are dropped, and the held segments' watch no longer
    /// lists it. The epoch stays, so deliveries that come to a worker from now on still
    /// carry the hold they were routed under (and their drop is that hold's); the lease's
    /// release clears it ([`set_held`](Self::set_held) with `None`).
    pub(crate) fn stop_running(&self, segment: u32) {
        if let Some(flag) = self.held.get(segment as usize) {
            flag.store(false, Ordering::Release);
        }
        self.held_watch
            .send_if_modified(|held| match held.binary_search(&segment) {
                Ok(at) => {
                    held.remove(at);
                    true
                }
                Err(_) => false,
            });
    }

    /// Marks every segment as not run here (the bus stopped and released its leases).
    pub(crate) fn clear_held(&self) {
        for segment in 0..self.segments {
            self.set_held(segment, None);
        }
    }
}

/// The subscriptions by event type, each list in priority order. Replaced whole on every
/// change, so the dispatcher reads it without locks.
#[derive(Default)]
pub(crate) struct Routing {
    /// Counts changes, so idleness can tell whether the dispatcher has seen the latest.
    pub(crate) version: u64,
    pub(crate) subs: Vec<Arc<Sub>>,
    by_type: HashMap<&'static str, Arc<[Arc<Sub>]>, RouteHash>,
    /// By aggregate type: the subscriptions that receive (to dead-letter them) stored
    /// events of that aggregate type whose event type no code registers.
    unknown_by_aggregate: HashMap<&'static str, Arc<[Arc<Sub>]>>,
    /// By aggregate type: the subscriptions that skip such events.
    skip_by_aggregate: HashMap<&'static str, Vec<Arc<Sub>>>,
}

/// foldhash with a fixed seed, for the engine's per-event hashing of short keys (type
/// names, aggregate ids): far cheaper than SipHash there (and about twice FNV-1a's speed,
/// `cargo bench --bench hot_paths -- routing_hash`), the same in every run, and the keys
/// are not attacker-chosen in bulk.
type RouteHash = foldhash::fast::FixedState;

/// The seeded state every stream hash starts from.
const STREAM_HASH: RouteHash = RouteHash::with_seed(0x9e37_79b9_7f4a_7c15);

impl Routing {
    pub(crate) fn new(version: u64, mut subs: Vec<Arc<Sub>>) -> Self {
        subs.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let mut by_type: HashMap<&'static str, Vec<Arc<Sub>>> = HashMap::new();
        let mut unknown: HashMap<&'static str, Vec<Arc<Sub>>> = HashMap::new();
        let mut skip_by_aggregate: HashMap<&'static str, Vec<Arc<Sub>>> = HashMap::new();
        for sub in &subs {
            for &event_type in &sub.event_types {
                by_type.entry(event_type).or_default().push(Arc::clone(sub));
            }
            let by_policy = match sub.unknown {
                UnknownEventPolicy::DeadLetter => &mut unknown,
                UnknownEventPolicy::Skip => &mut skip_by_aggregate,
            };
            by_policy
                .entry(sub.aggregate_type)
                .or_default()
                .push(Arc::clone(sub));
        }
        Routing {
            version,
            subs,
            by_type: by_type.into_iter().map(|(k, v)| (k, v.into())).collect(),
            unknown_by_aggregate: unknown.into_iter().map(|(k, v)| (k, v.into())).collect(),
            skip_by_aggregate,
        }
    }

    /// The subscriptions of an event type, in priority order.
    pub(crate) fn route(&self, event_type: &str) -> Option<&Arc<[Arc<Sub>]>> {
        self.by_type.get(event_type)
    }

    /// The subscriptions that dead-letter an unregistered event type of this aggregate type.
    pub(crate) fn route_unknown(&self, aggregate_type: &str) -> Option<&Arc<[Arc<Sub>]>> {
        self.unknown_by_aggregate.get(aggregate_type)
    }

    /// The subscriptions that skip an unregistered event type of this aggregate type.
    pub(crate) fn skipping_unknown(&self, aggregate_type: &str) -> &[Arc<Sub>] {
        self.skip_by_aggregate
            .get(aggregate_type)
            .map_or(&[], Vec::as_slice)
    }
}

/// An event on its way through the engine.
#[derive(Clone)]
pub(crate) struct BusEvent {
    pub(crate) source: EventSource,
    /// Deliveries of this event still to finish, shared by its deliveries when it goes to
    /// more than one subscription (with one, its only delivery finishing finishes it).
    pub(crate) remaining: Option<Arc<AtomicUsize>>,
    /// Whether the event holds a slot of the queue, to give back when it is done (events
    /// that a handler published into its own full bus hold none).
    pub(crate) holds_room: bool,
    /// The stream's [`partition_hash`](crate::lease::partition_hash) when some
    /// subscription it goes to has more than one segment, else 0 (with one segment
    /// everything is segment 0).
    pub(crate) partition: u32,
}

impl BusEvent {
    pub(crate) fn new(source: EventSource) -> Self {
        BusEvent {
            source,
            remaining: None,
            holds_room: true,
            partition: 0,
        }
    }

    /// An event published beyond the queue's capacity, holding no slot of it.
    pub(crate) fn without_room(mut self) -> Self {
        self.holds_room = false;
        self
    }

    pub(crate) fn record(&self) -> &RecordedEvent {
        self.source.record()
    }

    /// A hash of the stream's type and id: it only spreads aggregates over workers and
    /// keys the deliveries that wait for each other, so it needs to be fast and stable,
    /// not collision-proof.
    pub(crate) fn stream_hash(&self) -> u64 {
        let record = self.record();
        let mut h = STREAM_HASH.build_hasher();
        h.write(record.aggregate_type.as_bytes());
        h.write_u8(0xff);
        h.write(record.aggregate_id.as_bytes());
        h.finish()
    }
}

/// The [`partition_hash`](crate::lease::partition_hash) of a record's stream.
pub(crate) fn partition_of(record: &RecordedEvent) -> u32 {
    crate::lease::partition_hash(&record.stream_id())
}

/// An event and the subscriptions it goes to, in priority order.
pub(crate) struct Job {
    pub(crate) event: BusEvent,
    pub(crate) subs: Arc<[Arc<Sub>]>,
    /// The aggregate's hash: picks the worker, and keys the deliveries that wait.
    pub(crate) stream_hash: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Metadata;
    use chrono::Utc;

    fn event_of(aggregate_id: String) -> BusEvent {
        let now = Utc::now();
        BusEvent::new(EventSource::Stored(Arc::new(RecordedEvent {
            event_id: uuid::Uuid::now_v7(),
            aggregate_type: "Account".into(),
            aggregate_id,
            version: 1,
            position: 1,
            event_type: "Opened".into(),
            schema_version: 1,
            occurred_at: now,
            recorded_at: now,
            metadata: Metadata::default(),
            payload: "{}".into(),
        })))
    }

    #[test]
    fn stream_hashes_spread_aggregates_evenly_over_workers() {
        for workers in [2_u64, 3, 4, 8] {
            let mut load = vec![0_u32; workers as usize];
            for i in 0..4_000 {
                let hash = event_of(format!("acc-{i}")).stream_hash();
                load[(hash % workers) as usize] += 1;
            }
            let fair = 4_000 / workers as u32;
            for n in &load {
                assert!(n.abs_diff(fair) < fair / 5, "{workers} workers: {load:?}");
            }
        }
        assert_eq!(
            event_of("a".into()).stream_hash(),
            event_of("a".into()).stream_hash()
        );
    }
}
