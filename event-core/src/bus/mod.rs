//! The event bus: publish events, and deliver them to subscribed handlers in order per
//! aggregate, with priorities, retries with backoff, dead letters and statistics.
//!
//! **With a store** the store is the outbox: `publish` appends the event and returns once it
//! is stored, and every subscription is *durable*: it has a stable name and a checkpoint,
//! and reads the store's global log from its checkpoint, so an event stored but not yet
//! handled when the process dies is handled after the restart (at least once). Events
//! appended by a [`Repository`](crate::Repository) reach subscribers the same way, without
//! a second publish. The store's log is the queue: `publish` never waits for handlers, and
//! the bus keeps at most `queue_capacity` events in memory however far behind a
//! subscription is.
//!
//! **Without a store** the bus is *transient*: events live in a bounded in-memory queue of
//! `queue_capacity` events until every subscription has handled them, `publish` waits for
//! room, `try_publish` fails with [`TryPublishError::Full`], and what is queued is lost if the
//! process dies. Dead letters (with their events) are kept in memory.
//!
//! **Under faults** every delivery ends: handled, or dead-lettered after its last attempt.
//! Deliveries wait for each other only per subscription and aggregate (a *lane*): a
//! failing, slow or stuck handler holds back only its own aggregate's later events for its
//! own subscription, and the deliveries waiting behind it give their queue slot back (with a
//! store they leave memory and are read again from their stream; without one they stay in
//! memory, up to `queue_capacity` per subscription). With a store, those behind a handler
//! still running keep their slots in memory while more than half the queue is free, so
//! they never hold more than about half of it. A handler's error, its panic (also
//! before it returns its future) and an attempt past its
//! [`handler_timeout`](SubscriptionBuilder::handler_timeout) are failed attempts. With a
//! store, an event that does not decode, and a row the store cannot read at all, are
//! dead-lettered at once (see [`UnknownEventPolicy`] for types no code registers).

mod admin;
mod blocking;
mod config;
mod deliver;
mod dispatch;
mod engine;
mod handler;
mod inbox;
mod leases;
mod publish;
mod records;
mod reset;
mod room;
mod routing;
mod running;
mod stats;
mod tracker;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;

pub use admin::ReplayReport;
pub use config::{Clock, RetryPolicy, SystemClock, UnknownEventPolicy};
pub use handler::{BoxFuture, Delivery, Handler, HandlerOutcome};
pub use publish::{DomainEventPublisher, IntoOutgoing, Outgoing, TryPublishError};
pub use reset::{ResetTo, StartFrom};
pub use stats::{BusStatistics, SubscriptionStatistics};

use engine::Engine;
use handler::{Blocking, Typed};
use inbox::{Inbox, Router};
use records::Records;
use room::Room;
use routing::{BusEvent, Routing, Sub};
use stats::{Counters, Histogram};
use tracker::Tracker;
use worker::Worker;

use crate::error::{Error, Result};
use crate::event::DomainEvent;
use crate::lease::DEFAULT_LEASE_TTL;
use crate::registry::registry;
use crate::store::{DEFAULT_FAILURE_RETENTION, EventStore};

/// Builds an [`EventBus`].
#[must_use = "call build() to get the bus"]
pub struct EventBusBuilder {
    store: Option<Arc<dyn EventStore>>,
    workers: usize,
    queue_capacity: usize,
    batch_size: usize,
    stop_timeout: Duration,
    clock: Arc<dyn Clock>,
    seed: Option<u64>,
    lease_ttl: Duration,
    member_id: Option<String>,
}

impl Default for EventBusBuilder {
    fn default() -> Self {
        EventBusBuilder {
            store: None,
            workers: 4,
            queue_capacity: 10_000,
            batch_size: 256,
            stop_timeout: Duration::from_secs(10),
            clock: Arc::new(SystemClock),
            seed: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            member_id: None,
        }
    }
}

impl EventBusBuilder {
    /// Makes the bus durable: `publish` appends to this store, and subscriptions read its
    /// log from their checkpoints (see [`EventBus`]). Takes a store handle, an `Arc` of
    /// one, or an `Arc<dyn EventStore>` (see [`IntoStore`](crate::IntoStore)).
    pub fn store(mut self, store: impl crate::IntoStore) -> Self {
        self.store = Some(store.into_store());
        self
    }

    /// How many workers run handlers (default 4). Events of one aggregate always go to the
    /// same worker, in order; different aggregates run in parallel.
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// How many events may wait in memory (default 10,000). Without a store, deliveries
    /// waiting behind a retry or a slow handler may keep up to as many again per
    /// subscription in memory outside the queue (see [`EventBus`]).
    pub fn queue_capacity(mut self, capacity: usize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// How many events the dispatcher takes at a time (default 256).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size;
        self
    }

    /// How long [`EventBus::stop`] waits for in-flight work (default 10 s).
    pub fn stop_timeout(mut self, timeout: Duration) -> Self {
        self.stop_timeout = timeout;
        self
    }

    /// The clock that stamps dead letters and failure records (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Seeds the retry jitter, for reproducible schedules in tests.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// How long the segment leases this bus takes in the store last without a renewal
    /// (default [`DEFAULT_LEASE_TTL`], 10 s; at most [`MAX_LEASE_TTL`](crate::lease::MAX_LEASE_TTL)).
    /// The bus renews them every third of it; when a process dies without
    /// [`stop`](EventBus::stop), its segments are taken over by the others at most this
    /// long after its last renewal. See [`SubscriptionBuilder::segments`].
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// This bus's member id in the store's lease tables (default: a fresh UUID v7 for
    /// every bus built, so two buses are two members even in one process). Give a stable
    /// id only if no two live buses can share it: buses with one id hold each other's
    /// leases.
    pub fn member_id(mut self, id: impl Into<String>) -> Self {
        self.member_id = Some(id.into());
        self
    }

    /// Builds the bus; it delivers nothing until [`EventBus::start`].
    pub fn build(self) -> Result<EventBus> {
        let invalid =
            |setting: &'static str, reason: String| Err(Error::InvalidSetting { setting, reason });
        if self.workers == 0 {
            return invalid("workers", "at least one worker is needed".into());
        }
        if self.queue_capacity == 0 || self.queue_capacity > Semaphore::MAX_PERMITS {
            return invalid(
                "queue_capacity",
                format!(
                    "{} is outside 1..={}",
                    self.queue_capacity,
                    Semaphore::MAX_PERMITS
                ),
            );
        }
        if self.batch_size == 0 {
            return invalid("batch_size", "the batch size must be at least 1".into());
        }
        if let Err(error) = crate::lease::check_ttl(self.lease_ttl) {
            return invalid("lease_ttl", error.to_string());
        }
        let member = match self.member_id {
            Some(id) if id.is_empty() => {
                return invalid("member_id", "a member id cannot be empty".into());
            }
            Some(id) => id,
            None => uuid::Uuid::now_v7().to_string(),
        };
        let records = match &self.store {
            Some(store) => Records::Store(Arc::clone(store)),
            None => Records::Memory(Mutex::default()),
        };
        let seed = self
            .seed
            .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64);
        let engine = Engine {
            store: self.store,
            records,
            clock: self.clock,
            routing: watch::channel(Arc::new(Routing::default())).0,
            batch_size: self.batch_size,
            room: Room::new(self.queue_capacity),
            read_next: AtomicU64::new(0),
            reported_head: AtomicU64::new(0),
            head_reported: Notify::new(),
            routing_seen: AtomicU64::new(0),
            progress: Notify::new(),
            counters: Counters::default(),
            published: AtomicU64::new(0),
            metrics: crate::metrics::BusMetrics::new(),
            tracker: Mutex::new(Tracker::default()),
            checkpoints_dirty: Notify::new(),
            checkpoint_gate: tokio::sync::Mutex::new(()),
            stopping: watch::channel(false).0,
            seed,
            returned: Mutex::new(Vec::new()),
            returned_len: AtomicUsize::new(0),
            member,
            lease_ttl: self.lease_ttl,
            claimed: Mutex::new(Vec::new()),
            segments_version: AtomicU64::new(0),
            segments_seen: AtomicU64::new(0),
            segments_changed: Notify::new(),
            keeper_seen: AtomicU64::new(0),
            keeper_wake: Notify::new(),
            overdue: Mutex::new(Vec::new()),
            replay_wake: Notify::new(),
            replay_gate: tokio::sync::Mutex::new(()),
            segments_stopped: AtomicU64::new(0),
            inboxes: Mutex::new(Vec::new()),
        };
        Ok(EventBus {
            inner: Arc::new(Inner {
                engine: Arc::new(engine),
                workers: self.workers,
                stop_timeout: self.stop_timeout,
                subs: Mutex::new(Vec::new()),
                next_index: AtomicUsize::new(0),
                sequence: AtomicU64::new(0),
                intake: Mutex::new(Intake::Waiting(Vec::new())),
                state: Mutex::new(Lifecycle::Built),
                lifecycle_gate: tokio::sync::Mutex::new(()),
                stopped: AtomicBool::new(false),
            }),
        })
    }
}

/// The intake of a bus without a store.
enum Intake {
    /// Not started: events wait here (the queue's permits bound them).
    Waiting(Vec<BusEvent>),
    /// Running: events are routed straight to the workers, in publication order.
    Routing(Router),
    /// Stopped: nothing is accepted.
    Closed,
}

enum Lifecycle {
    Built,
    Running(Vec<JoinHandle<()>>),
    Stopped,
}

struct Inner {
    engine: Arc<Engine>,
    workers: usize,
    stop_timeout: Duration,
    subs: Mutex<Vec<Arc<Sub>>>,
    next_index: AtomicUsize,
    /// The positions of a bus without a store.
    sequence: AtomicU64,
    /// Where published events go on a bus without a store.
    intake: Mutex<Intake>,
    state: Mutex<Lifecycle>,
    /// Held by `start`, and by a reset while it sets a checkpoint, so a bus does not start
    /// in the middle of a reset.
    lifecycle_gate: tokio::sync::Mutex<()>,
    stopped: AtomicBool,
}

impl Inner {
    /// Hands the dispatcher a new routing table; called with the subscription list locked,
    /// so versions follow the order of changes.
    fn publish_routing(&self, subs: &[Arc<Sub>]) {
        let version = self.engine.routing.borrow().version + 1;
        self.engine
            .routing
            .send_replace(Arc::new(Routing::new(version, subs.to_vec())));
    }
}

/// Publishes events and delivers them to subscriptions. Cheap to clone; all clones are
/// the same bus.
///
/// **With a store** the store is the outbox: `publish` appends the event and returns once it
/// is stored, and every subscription is *durable*: it has a stable name and a checkpoint,
/// and reads the store's global log from its checkpoint, so an event stored but not yet
/// handled when the process dies is handled after the restart (at least once). Events
/// appended by a [`Repository`](crate::Repository) reach subscribers the same way, without
/// a second publish. The store's log is the queue: `publish` never waits for handlers, and
/// the bus keeps at most `queue_capacity` events in memory however far behind a
/// subscription is.
///
/// **Without a store** the bus is *transient*: events live in a bounded in-memory queue of
/// `queue_capacity` events until every subscription has handled them, `publish` waits for
/// room, `try_publish` fails with [`TryPublishError::Full`], and what is queued is lost if the
/// process dies. Dead letters (with their events) are kept in memory.
///
/// **Under faults** every delivery ends: handled, or dead-lettered after its last attempt.
/// Deliveries wait for each other only per subscription and aggregate (a *lane*): a
/// failing, slow or stuck handler holds back only its own aggregate's later events for its
/// own subscription, and the deliveries waiting behind it give their queue slot back (with a
/// store they leave memory and are read again from their stream; without one they stay in
/// memory, up to `queue_capacity` per subscription). With a store, those behind a handler
/// still running keep their slots in memory while more than half the queue is free, so
/// they never hold more than about half of it. A handler's error, its panic (also
/// before it returns its future) and an attempt past its
/// [`handler_timeout`](SubscriptionBuilder::handler_timeout) are failed attempts. With a
/// store, an event that does not decode, and a row the store cannot read at all, are
/// dead-lettered at once (see [`UnknownEventPolicy`] for types no code registers).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use eventfold_core::{Delivery, EventBus};
/// # use eventfold_macros::DomainEvent;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # #[domain_event(aggregate = "Order", crate = "eventfold_core")]
/// # enum OrderEvent { Placed { #[domain_event(aggregate_id)] id: String, qty: u64 } }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> eventfold_core::Result<()> {
/// let bus = EventBus::builder().workers(2).build()?;
/// let total = Arc::new(AtomicU64::new(0));
/// let seen = Arc::clone(&total);
/// bus.subscribe("volume", move |d: Delivery<OrderEvent>| {
///     let seen = Arc::clone(&seen);
///     async move {
///         let OrderEvent::Placed { qty, .. } = d.event();
///         seen.fetch_add(*qty, Ordering::SeqCst);
///         Ok::<_, std::convert::Infallible>(())
///     }
/// })
/// .register()?;
/// bus.start().await?;
/// bus.publish(OrderEvent::Placed { id: "o-1".into(), qty: 5 }).await?;
/// bus.wait_idle().await?;
/// assert_eq!(total.load(Ordering::SeqCst), 5);
/// bus.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("durable", &self.inner.engine.store.is_some())
            .field("workers", &self.inner.workers)
            .field("queue_capacity", &self.inner.engine.room.capacity())
            .finish_non_exhaustive()
    }
}

/// A subscription being set up; [`register`](Self::register) adds it to the bus.
#[must_use = "call register() to add the subscription"]
pub struct SubscriptionBuilder<'a> {
    bus: &'a EventBus,
    name: String,
    priority: i32,
    retry: RetryPolicy,
    timeout: Duration,
    unknown: UnknownEventPolicy,
    failure_retention: usize,
    start_from: StartFrom,
    segments: u32,
    aggregate_type: &'static str,
    event_types: Vec<&'static str>,
    invoke: Box<dyn handler::Invoke>,
}

/// How long one attempt of a handler may run by default before it counts as failed.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

impl SubscriptionBuilder<'_> {
    /// Its priority: for each event, subscriptions with a lower number start first
    /// (default 0). A subscription that is slow, or waits for a retry, does not hold the
    /// others back.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Its retry policy (default: [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long one attempt may run (default [`DEFAULT_HANDLER_TIMEOUT`], 30 s): an
    /// attempt still running then is stopped (its future dropped) and counts as a failed
    /// attempt, retried by the retry policy. A blocking handler cannot be stopped: its
    /// attempt fails all the same, and its thread is left to finish on its own.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What it does with stored events of its aggregate type that no code registers
    /// (default [`UnknownEventPolicy::DeadLetter`]).
    pub fn unknown_events(mut self, policy: UnknownEventPolicy) -> Self {
        self.unknown = policy;
        self
    }

    /// How many records of failed attempts to keep for it, the newest (default
    /// [`DEFAULT_FAILURE_RETENTION`], 1,000; at least 1). The store (or, without one,
    /// the bus's memory) keeps at most these, removing the oldest as new ones come.
    pub fn failure_retention(mut self, records: usize) -> Self {
        self.failure_retention = records.max(1);
        self
    }

    /// Where it starts on a store when it has no checkpoint of its own (default
    /// [`StartFrom::Beginning`]): [`StartFrom::End`] skips the history, taking the head
    /// when the running bus first takes it up as its checkpoint, saved at once. A stored
    /// checkpoint always wins, so this matters only the first time (or after the
    /// checkpoint was removed). Without a store it changes nothing: a transient
    /// subscription receives the events published after it is registered.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Splits it into `segments` segments (default 1, at most
    /// [`MAX_SEGMENTS`](crate::lease::MAX_SEGMENTS)), so that several processes (buses)
    /// on one store share its work. Every stream belongs to one segment
    /// ([`segment_of`](crate::lease::segment_of)), so an aggregate's events stay in order.
    ///
    /// With a store, a bus runs only the segments whose lease it holds: each bus takes a
    /// fair share, `ceil(segments / live buses)`, gives up what is beyond it (at once: it
    /// drops that segment's deliveries not yet started, lets those under way end, saves
    /// its checkpoint and releases the lease; the next owner delivers the rest from that
    /// checkpoint) and takes over the
    /// segments of a bus that stopped (at once) or died (once its leases expire, see
    /// [`EventBusBuilder::lease_ttl`]). Each segment has its own checkpoint, saved only
    /// while its lease holds; after a takeover the new owner resumes from the saved
    /// checkpoint, so events are delivered at least once (some again after a crash).
    /// With one segment (the default) one bus runs the subscription and the others stand
    /// by; its checkpoint is the subscription's plain checkpoint. Every bus running the
    /// subscription must ask for the same count: [`EventBus::start`] fails with
    /// [`Error::SegmentCountMismatch`] when the store has another count stored for it,
    /// until the subscription is reset. A subscription registered on a running bus (or two
    /// buses starting with different counts at once) is refused at the claim instead:
    /// [`EventBus::wait_idle`] then fails with that error, and the bus tries again each
    /// lease round. Without a store it changes nothing.
    pub fn segments(mut self, segments: u32) -> Self {
        self.segments = segments;
        self
    }

    /// Adds the subscription. With a store it resumes from its stored checkpoint, or, if
    /// it has none, where [`start_from`](Self::start_from) says (the start of the log by
    /// default); it runs the segments whose leases it holds (see
    /// [`segments`](Self::segments)).
    ///
    /// # Errors
    /// [`Error::InvalidSubscriptionName`] for an empty name,
    /// [`Error::DuplicateSubscription`] for a name registered already, and
    /// [`Error::InvalidSegments`] for a segment count of 0 or above
    /// [`MAX_SEGMENTS`](crate::lease::MAX_SEGMENTS).
    pub fn register(self) -> Result<SubscriptionHandle> {
        crate::lease::check_segments(self.segments)?;
        let inner = &self.bus.inner;
        if self.name.is_empty() {
            return Err(Error::InvalidSubscriptionName {
                name: self.name,
                reason: "a subscription needs a name, which keys its checkpoint".into(),
            });
        }
        let mut subs = inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        if subs.iter().any(|s| *s.name == *self.name) {
            return Err(Error::DuplicateSubscription { name: self.name });
        }
        let name: Arc<str> = Arc::from(self.name);
        subs.push(Arc::new(Sub {
            index: inner.next_index.fetch_add(1, Ordering::Relaxed),
            name: Arc::clone(&name),
            priority: self.priority,
            retry: self.retry,
            timeout: self.timeout,
            unknown: self.unknown,
            failure_retention: self.failure_retention,
            start_from: self.start_from,
            aggregate_type: self.aggregate_type,
            event_types: self.event_types,
            invoke: self.invoke,
            counters: Counters::default(),
            latency: Histogram::default(),
            metrics: crate::metrics::SubscriptionMetrics::new(&name),
            active: AtomicBool::new(true),
            queued: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            segments: self.segments,
            // Without a store every segment runs here; with one, those whose lease it holds.
            held: (0..self.segments)
                .map(|_| AtomicBool::new(inner.engine.store.is_none()))
                .collect(),
            epochs: (0..self.segments).map(|_| AtomicU64::new(0)).collect(),
            held_watch: tokio::sync::watch::Sender::new(match inner.engine.store {
                Some(_) => Vec::new(),
                None => (0..self.segments).collect(),
            }),
            refused_count: std::sync::atomic::AtomicU32::new(0),
        }));
        inner.publish_routing(&subs);
        Ok(SubscriptionHandle { name })
    }
}

/// A registered subscription. Its id is its stable name, which keys its checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscriptionHandle {
    name: Arc<str>,
}

impl SubscriptionHandle {
    /// The subscription's stable name.
    pub fn id(&self) -> &str {
        &self.name
    }
}

/// How [`EventBus::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// True if every accepted event was handled (or dead-lettered) by every
    /// subscription before the timeout.
    pub drained: bool,
    /// Events left unfinished (with a store they are delivered again after a restart).
    pub unfinished: u64,
    /// Deliveries left unfinished, one per (event, subscription): running, waiting for a
    /// retry, or not started.
    pub unfinished_deliveries: u64,
}

impl EventBus {
    /// A builder with the defaults: no store (transient), 4 workers, capacity 10,000.
    pub fn builder() -> EventBusBuilder {
        EventBusBuilder::default()
    }

    /// Subscribes an async handler to the events of type `E` (every event type of `E`).
    /// The name must be unique on this bus, and stable across restarts.
    ///
    /// The handler is a closure `|delivery| async move { .. }` that returns `()` or
    /// `Result<(), Err>` for any `Err: Into<BoxError>` (see [`HandlerOutcome`]). Name the
    /// event type once, on the subscription (`subscribe::<OrderEvent, _>`, the `_` being
    /// the handler's future) or on the closure's argument (`|d: Delivery<OrderEvent>|`):
    ///
    /// ```
    /// # use eventfold_core::EventBus;
    /// # use eventfold_macros::DomainEvent;
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
    /// # #[domain_event(aggregate = "Order", crate = "eventfold_core")]
    /// # enum OrderEvent { Shipped { #[domain_event(aggregate_id)] id: String } }
    /// # async fn send_mail(_: &OrderEvent) -> std::io::Result<()> { Ok(()) }
    /// # fn main() -> eventfold_core::Result<()> {
    /// let bus = EventBus::builder().build()?;
    /// bus.subscribe::<OrderEvent, _>("mailer", |d| async move { send_mail(d.event()).await })
    ///     .register()?;
    /// bus.subscribe::<OrderEvent, _>("log", |d| async move {
    ///     println!("{:?} at {}", d.event(), d.record().position);
    /// })
    /// .register()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A type that implements [`Handler`] itself subscribes with
    /// [`subscribe_handler`](Self::subscribe_handler).
    pub fn subscribe<E, Fut>(
        &self,
        name: impl Into<String>,
        handler: impl Fn(Delivery<E>) -> Fut + Send + Sync + 'static,
    ) -> SubscriptionBuilder<'_>
    where
        E: DomainEvent,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: HandlerOutcome,
    {
        self.subscribe_handler::<E>(name, handler)
    }

    /// Subscribes a [`Handler`] to the events of type `E`; see [`subscribe`](Self::subscribe).
    pub fn subscribe_handler<E: DomainEvent>(
        &self,
        name: impl Into<String>,
        handler: impl Handler<E>,
    ) -> SubscriptionBuilder<'_> {
        SubscriptionBuilder {
            bus: self,
            name: name.into(),
            priority: 0,
            retry: RetryPolicy::default(),
            timeout: DEFAULT_HANDLER_TIMEOUT,
            unknown: UnknownEventPolicy::default(),
            failure_retention: DEFAULT_FAILURE_RETENTION,
            start_from: StartFrom::default(),
            segments: 1,
            aggregate_type: E::AGGREGATE_TYPE,
            event_types: E::EVENT_TYPES.iter().map(|t| t.name).collect(),
            invoke: Box::new(Typed {
                handler,
                _event: std::marker::PhantomData,
            }),
        }
    }

    /// Subscribes a blocking handler (synchronous I/O, heavy work): it runs on a thread
    /// of the bus's own blocking pool, so it never stalls the workers, and a handler stuck
    /// in a blocking call never keeps the process from exiting (tokio's blocking pool
    /// would: a runtime waits for its blocking tasks when it shuts down).
    ///
    /// Like [`subscribe`](Self::subscribe), the handler returns `()` or `Result<(), Err>`,
    /// and the event type is named once: `subscribe_blocking::<OrderEvent, _>("n", |d| ..)`
    /// (the `_` being what the handler returns) or `|d: Delivery<OrderEvent>|`.
    pub fn subscribe_blocking<E, Out>(
        &self,
        name: impl Into<String>,
        handler: impl Fn(Delivery<E>) -> Out + Send + Sync + 'static,
    ) -> SubscriptionBuilder<'_>
    where
        E: DomainEvent,
        Out: HandlerOutcome,
    {
        self.subscribe_handler::<E>(name, Blocking(Arc::new(handler)))
    }

    /// Removes a subscription; deliveries to it that are queued or waiting for a retry are
    /// dropped. Its checkpoint stays in the store, so subscribing again under the same name
    /// resumes there. False if there was none of this name.
    pub fn unsubscribe(&self, id: &str) -> bool {
        let inner = &self.inner;
        let mut subs = inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = subs.iter().position(|s| &*s.name == id) else {
            return false;
        };
        let sub = subs.remove(i);
        sub.active.store(false, Ordering::Release);
        sub.catch_up_metrics();
        inner.publish_routing(&subs);
        true
    }

    /// Starts delivering: validates the event registry, then starts the dispatcher and the
    /// workers. Durable subscriptions catch up from their checkpoints.
    ///
    /// With a store, fails with [`Error::SegmentCountMismatch`] (starting nothing) if a
    /// subscription asks for another segment count than the store has stored for it (see
    /// [`SubscriptionBuilder::segments`]), or with the store's error if it cannot read the
    /// stored counts.
    pub async fn start(&self) -> Result<()> {
        registry().validate()?;
        let _gate = self.inner.lifecycle_gate.lock().await;
        if matches!(
            *self.inner.state.lock().unwrap_or_else(|e| e.into_inner()),
            Lifecycle::Built
        ) {
            leases::check_segment_counts(&self.inner.engine).await?;
        }
        let mut state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
        match *state {
            Lifecycle::Built => {}
            Lifecycle::Running(_) => return Err(Error::BusAlreadyStarted),
            Lifecycle::Stopped => return Err(Error::BusStopped),
        }
        let engine = &self.inner.engine;
        let mut tasks = Vec::new();
        let mut inboxes = Vec::new();
        for n in 0..self.inner.workers {
            let inbox = Arc::new(Inbox::new());
            inboxes.push(Arc::clone(&inbox));
            let worker = Worker::new(Arc::clone(engine), inbox, n as u64);
            tasks.push(tokio::spawn(worker.run()));
        }
        *engine.inboxes.lock().unwrap_or_else(|e| e.into_inner()) = inboxes.clone();
        let mut router = Router::new(inboxes);
        tasks.push(tokio::spawn(dispatch::catch_up_metrics(Arc::clone(engine))));
        if engine.store.is_some() {
            tasks.push(tokio::spawn(dispatch::dispatch_log(
                Arc::clone(engine),
                router,
            )));
            tasks.push(tokio::spawn(dispatch::flush_checkpoints(Arc::clone(
                engine,
            ))));
            tasks.push(tokio::spawn(leases::keep_leases(Arc::clone(engine))));
            tasks.push(tokio::spawn(admin::replay_requested(
                Arc::downgrade(&self.inner),
                Arc::clone(engine),
            )));
        } else {
            let mut intake = self.inner.intake.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = match std::mem::replace(&mut *intake, Intake::Closed) {
                Intake::Waiting(waiting) => waiting,
                Intake::Routing(_) | Intake::Closed => return Err(Error::BusStopped),
            };
            let table = Arc::clone(&engine.routing.borrow());
            for event in waiting {
                router.route_published(engine, &table, event);
            }
            *intake = Intake::Routing(router);
        }
        *state = Lifecycle::Running(tasks);
        Ok(())
    }

    /// Stops the bus: refuses new events at once, lets in-flight deliveries (and, without
    /// a store, the queued events) finish for up to the stop timeout, then saves the
    /// checkpoints and releases the segment leases it holds, so another bus running the
    /// same subscriptions takes them over at once (see [`SubscriptionBuilder::segments`]). Retries still waiting, and attempts still running, at the timeout are
    /// abandoned (the attempts' futures dropped); with a store they are delivered again
    /// after a restart. The report counts what was left unfinished.
    pub async fn stop(&self) -> Result<StopReport> {
        let inner = &self.inner;
        inner.stopped.store(true, Ordering::SeqCst);
        // Dropping the router closes the workers' inboxes once they are drained.
        *inner.intake.lock().unwrap_or_else(|e| e.into_inner()) = Intake::Closed;
        let tasks = {
            let mut state = inner.state.lock().unwrap_or_else(|e| e.into_inner());
            match std::mem::replace(&mut *state, Lifecycle::Stopped) {
                Lifecycle::Running(tasks) => tasks,
                Lifecycle::Built | Lifecycle::Stopped => Vec::new(),
            }
        };
        let engine = &inner.engine;
        engine.stopping.send_replace(true);
        // Publishers still waiting for room get `BusStopped` rather than wait forever.
        engine.room.close();
        let deadline = tokio::time::Instant::now() + inner.stop_timeout;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                // Aborting a worker drops the attempts it still runs.
                task.abort();
                let _ = task.await;
            }
        }
        engine.catch_up_metrics();
        dispatch::save_checkpoints(engine).await?;
        let names: Vec<Arc<str>> = {
            let subs = inner.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter().map(|s| Arc::clone(&s.name)).collect()
        };
        leases::release_all(engine, &names).await;
        // Finished events still waiting for a publisher to drop them.
        engine.reclaim_all();
        // Counted, not taken from how the tasks ended: a task that ended early (or was
        // aborted) leaves its deliveries unfinished all the same.
        let unfinished = engine.room.in_flight() + engine.room.waiting();
        let unfinished_deliveries = {
            let subs = inner.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter().map(|s| s.queued.load(Ordering::Relaxed)).sum()
        };
        Ok(StopReport {
            drained: unfinished == 0 && unfinished_deliveries == 0,
            unfinished,
            unfinished_deliveries,
        })
    }

    /// The first subscription whose claims the store refused for its segment count, as
    /// the error.
    fn refused_segment_count(&self) -> Result<()> {
        let subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        for sub in subs.iter() {
            let stored = sub.refused_count.load(Ordering::Acquire);
            if stored != 0 {
                return Err(Error::SegmentCountMismatch {
                    subscription: sub.name.to_string(),
                    stored,
                    requested: sub.segments,
                });
            }
        }
        Ok(())
    }

    /// Waits until every published event is handled (or dead-lettered) by every
    /// subscription and, with a store, the bus has read the log up to its head and saved
    /// every checkpoint that moved: once it returns, `store.load_checkpoint` agrees with
    /// [`statistics`](Self::statistics). For tests and orderly shutdowns.
    ///
    /// With a store it waits for the segments this bus holds (see
    /// [`SubscriptionBuilder::segments`]): their checkpoints reach the head. For a
    /// subscription of which it holds no segment (another bus runs it, this one stands by)
    /// it returns once it has tried to claim segments since the subscription was
    /// registered; events another bus handles are not waited for.
    ///
    /// The head is the store's ([`EventLog::head_position`](crate::EventLog::head_position)
    /// when the call starts), so events other processes appended before it count too; the
    /// bus reads up to it even if the store's head watch has not reported it yet. Fails
    /// with the store's error if the head cannot be read.
    ///
    /// Fails with [`Error::SegmentCountMismatch`] when a subscription registered on the
    /// running bus asks for another segment count than the store has stored for it (its
    /// claims are refused, so it runs nothing here; the bus tries again each round, which
    /// succeeds once the subscription is reset).
    pub async fn wait_idle(&self) -> Result<()> {
        let mut head_read = false;
        loop {
            {
                let state = self.inner.state.lock().unwrap_or_else(|e| e.into_inner());
                if !matches!(*state, Lifecycle::Running(_)) {
                    return Err(Error::BusNotRunning);
                }
            }
            let engine = &self.inner.engine;
            if !head_read && let Some(store) = &engine.store {
                engine.report_head(store.head_position().await?);
                head_read = true;
            }
            let progress = engine.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            if engine.is_idle() {
                engine.catch_up_metrics();
                dispatch::save_checkpoints(engine).await?;
                return self.refused_segment_count();
            }
            // The head can move without a notification from the bus (another writer);
            // look again now and then.
            let _ = tokio::time::timeout(Duration::from_millis(50), progress).await;
        }
    }
}
