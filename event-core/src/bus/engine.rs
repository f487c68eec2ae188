//! The delivery engine: one dispatcher that takes events in order (from the store's log or
//! from the in-memory intake) and routes them to workers by aggregate, the workers that run
//! handlers with retries, and the tracker that turns completions into checkpoints.
//!
//! Order: every event of one aggregate goes to the same worker, which handles a worker's
//! events in arrival order and, per event, its subscriptions in priority order. A delivery
//! waiting for a retry parks the later events of the same aggregate for that subscription
//! only, so other aggregates and other subscriptions go on.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tracing::Instrument;

use super::config::{Clock, Jitter, RetryPolicy};
use super::handler::{CatchUnwind, EventSource, Invoke, PublishedEvent};
use super::stats::{Counters, Histogram};
use crate::error::{Error, Result};
use crate::record::{FailureRecord, NewDeadLetter, RecordedEvent};
use crate::store::EventStore;

/// One subscription as the engine sees it.
pub(crate) struct Sub {
    pub(crate) index: usize,
    pub(crate) name: Arc<str>,
    pub(crate) priority: i32,
    pub(crate) retry: RetryPolicy,
    pub(crate) event_types: Vec<&'static str>,
    pub(crate) invoke: Box<dyn Invoke>,
    pub(crate) counters: Counters,
    pub(crate) latency: Histogram,
    pub(crate) active: AtomicBool,
    /// Events routed to it and not yet done (its lag on a bus without a store).
    pub(crate) queued: AtomicU64,
}

/// The subscriptions by event type, each list in priority order. Replaced whole on every
/// change, so the dispatcher reads it without locks.
#[derive(Default)]
pub(crate) struct Routing {
    /// Counts changes, so idleness can tell whether the dispatcher has seen the latest.
    pub(crate) version: u64,
    pub(crate) subs: Vec<Arc<Sub>>,
    by_type: HashMap<&'static str, Arc<[Arc<Sub>]>, BuildHasherDefault<Fnv>>,
}

/// FNV-1a, for the engine's per-event hashing of short keys (type names, aggregate ids):
/// far cheaper than SipHash there, and the keys are not attacker-chosen in bulk.
#[derive(Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // FNV's low bits mix poorly; fold the high half in before a remainder is taken.
        self.0 ^ (self.0 >> 32)
    }
}

impl Routing {
    pub(crate) fn new(version: u64, mut subs: Vec<Arc<Sub>>) -> Self {
        subs.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let mut by_type: HashMap<&'static str, Vec<Arc<Sub>>> = HashMap::new();
        for sub in &subs {
            for &event_type in &sub.event_types {
                by_type.entry(event_type).or_default().push(Arc::clone(sub));
            }
        }
        Routing {
            version,
            subs,
            by_type: by_type.into_iter().map(|(k, v)| (k, v.into())).collect(),
        }
    }

    fn route(&self, event_type: &str) -> Option<&Arc<[Arc<Sub>]>> {
        self.by_type.get(event_type)
    }
}

/// An event on its way through the engine.
#[derive(Clone)]
pub(crate) struct BusEvent {
    pub(crate) source: EventSource,
    /// Deliveries of this event still to finish, shared by its deliveries when it goes to
    /// more than one subscription (with one, its only delivery finishing finishes it).
    remaining: Option<Arc<AtomicUsize>>,
    /// Whether the event holds a slot of the queue, to give back when it is done (events
    /// that a handler published into its own full bus hold none).
    holds_room: bool,
}

impl BusEvent {
    pub(crate) fn new(source: EventSource) -> Self {
        BusEvent {
            source,
            remaining: None,
            holds_room: true,
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

    /// FNV-1a over the stream's type and id: it only spreads aggregates over workers and
    /// keys parked deliveries, so it needs to be fast and stable, not collision-proof.
    fn stream_hash(&self) -> u64 {
        let record = self.record();
        let mut h = Fnv::default();
        h.write(record.aggregate_type.as_bytes());
        h.write_u8(0xff);
        h.write(record.aggregate_id.as_bytes());
        h.finish()
    }
}

/// An event and the subscriptions it goes to, in priority order.
pub(crate) struct Job {
    event: BusEvent,
    subs: Arc<[Arc<Sub>]>,
    /// The aggregate's hash: picks the worker, and keys parked deliveries.
    stream_hash: u64,
}

/// State shared by the engine's tasks and the bus handle.
pub(crate) struct Engine {
    pub(crate) store: Option<Arc<dyn EventStore>>,
    /// Where dead letters and failure records go: the store, or a private in-memory one.
    pub(crate) records: Arc<dyn EventStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) routing: watch::Sender<Arc<Routing>>,
    pub(crate) capacity: usize,
    pub(crate) batch_size: usize,
    /// Free places in the queue: taken per event before it enters, given back when done.
    pub(crate) permits: Semaphore,
    /// Events accepted and not yet done.
    pub(crate) in_flight: AtomicU64,
    /// Where the dispatcher reads next, with a store.
    pub(crate) read_next: AtomicU64,
    /// The routing version the dispatcher has taken into account.
    pub(crate) routing_seen: AtomicU64,
    /// Wakes `wait_idle` and the checkpoint flusher when work finishes.
    pub(crate) progress: Notify,
    pub(crate) counters: Counters,
    pub(crate) published: AtomicU64,
    pub(crate) tracker: Mutex<Tracker>,
    pub(crate) checkpoints_dirty: Notify,
    pub(crate) stopping: watch::Sender<bool>,
    pub(crate) seed: u64,
    /// Published events whose deliveries are all done, handed back for the next publisher
    /// to drop (see [`Engine::reclaim`]).
    pub(crate) returned: Mutex<Vec<Arc<dyn PublishedEvent>>>,
    /// About how many are in `returned`, read without its lock.
    pub(crate) returned_len: AtomicUsize,
}

impl Engine {
    pub(crate) fn lock_tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when nothing is queued, in flight or waiting for a retry, and, with a store,
    /// the dispatcher has read up to the head of the log.
    pub(crate) fn is_idle(&self) -> bool {
        if self.in_flight.load(Ordering::SeqCst) != 0 {
            return false;
        }
        match &self.store {
            Some(store) => {
                let head = *store.watch_head().borrow();
                let routing = self.routing.borrow().version;
                self.routing_seen.load(Ordering::SeqCst) == routing
                    && self.read_next.load(Ordering::SeqCst) > head
            }
            None => true,
        }
    }

    /// Drops the published events that workers handed back, on the publisher's thread,
    /// once there are at least [`RECLAIM_BATCH`] of them.
    ///
    /// They were allocated on this thread: freeing them here refills its allocator cache,
    /// and spares the allocator's lock, which a worker freeing them would share with every
    /// publish (profiling found that lock in nearly every futex call the bus made).
    pub(crate) fn reclaim(&self) {
        if self.returned_len.load(Ordering::Relaxed) >= RECLAIM_BATCH {
            self.reclaim_all();
        }
    }

    /// Drops every finished event handed back (when the bus stops).
    pub(crate) fn reclaim_all(&self) {
        let returned = {
            let mut returned = self.returned.lock().unwrap_or_else(|e| e.into_inner());
            self.returned_len.store(0, Ordering::Relaxed);
            std::mem::take(&mut *returned)
        };
        drop(returned);
    }

    /// Hands finished published events back (see [`reclaim`](Self::reclaim)). What waits
    /// there is bounded like the queue: beyond its capacity, the worker drops them itself.
    fn hand_back(&self, done: &mut Vec<Arc<dyn PublishedEvent>>) {
        let mut returned = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        if returned.len() + done.len() <= self.capacity {
            returned.append(done);
            self.returned_len.store(returned.len(), Ordering::Relaxed);
        } else {
            drop(returned);
            done.clear();
        }
    }

    /// Identifies this bus for [`DELIVERING`].
    pub(crate) fn id(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    /// `n` events are done, `room` of which held a slot of the queue: the slots come
    /// back, and `wait_idle` wakes if nothing is left.
    fn events_done(&self, n: u64, room: u64) {
        if room > 0 {
            self.permits.add_permits(room as usize);
        }
        if self.in_flight.fetch_sub(n, Ordering::SeqCst) == n {
            self.progress.notify_waiters();
        }
    }

    fn event_done(&self, event: &BusEvent) {
        self.events_done(1, u64::from(event.holds_room));
    }
}

tokio::task_local! {
    /// Set while a worker runs a handler: the identity of the bus delivering.
    pub(crate) static DELIVERING: usize;
}

/// Deliveries a worker finished and has not yet reported: it reports them together, so
/// the counters that publishers and the dispatcher also touch change once per batch of
/// jobs rather than once per event.
#[derive(Default)]
struct Finished {
    /// Events whose last delivery finished.
    events: u64,
    /// Those of them that held a slot of the queue.
    room: u64,
    /// Finished deliveries per subscription (their `queued` counters).
    by_sub: Vec<(Arc<Sub>, u64)>,
    /// (subscription, position) of finished deliveries, for the checkpoints.
    positions: Vec<(usize, u64)>,
    /// Finished published events, to hand back to their publisher.
    published: Vec<Arc<dyn PublishedEvent>>,
}

/// Per durable subscription: which positions are out for delivery, and the checkpoint
/// (the last position below which everything is done).
#[derive(Default)]
pub(crate) struct Tracker {
    subs: HashMap<usize, Track>,
}

struct Track {
    name: Arc<str>,
    /// Every position up to this one was routed (or skipped as not of its types).
    routed_upto: u64,
    /// Positions routed and their state, in position order.
    out: VecDeque<(u64, bool)>,
    checkpoint: u64,
    saved: u64,
}

impl Tracker {
    pub(crate) fn contains(&self, index: usize) -> bool {
        self.subs.contains_key(&index)
    }

    pub(crate) fn add(&mut self, index: usize, name: Arc<str>, checkpoint: u64) {
        self.subs.insert(
            index,
            Track {
                name,
                routed_upto: checkpoint,
                out: VecDeque::new(),
                checkpoint,
                saved: checkpoint,
            },
        );
    }

    pub(crate) fn remove(&mut self, index: usize) {
        self.subs.remove(&index);
    }

    /// The lowest position any subscription still has to see, minus one.
    fn lowest_routed(&self) -> Option<u64> {
        self.subs.values().map(|t| t.routed_upto).min()
    }

    fn wants(&self, index: usize, position: u64) -> bool {
        self.subs
            .get(&index)
            .is_some_and(|t| position > t.routed_upto)
    }

    fn route(&mut self, index: usize, position: u64) {
        if let Some(track) = self.subs.get_mut(&index) {
            track.out.push_back((position, false));
        }
    }

    /// Everything up to `last` was read: subscriptions that were not routed an event in
    /// between have nothing left to do there.
    fn routed_through(&mut self, last: u64) -> bool {
        let mut advanced = false;
        for track in self.subs.values_mut() {
            if track.routed_upto < last {
                track.routed_upto = last;
                advanced |= track.settle();
            }
        }
        advanced
    }

    fn complete(&mut self, index: usize, position: u64) -> bool {
        let Some(track) = self.subs.get_mut(&index) else {
            return false;
        };
        if let Ok(i) = track.out.binary_search_by_key(&position, |&(p, _)| p) {
            track.out[i].1 = true;
        }
        track.settle()
    }

    pub(crate) fn checkpoint(&self, index: usize) -> Option<u64> {
        self.subs.get(&index).map(|t| t.checkpoint)
    }

    /// Checkpoints that moved since they were last saved.
    pub(crate) fn unsaved(&self) -> Vec<(usize, Arc<str>, u64)> {
        self.subs
            .iter()
            .filter(|(_, t)| t.checkpoint != t.saved)
            .map(|(&i, t)| (i, Arc::clone(&t.name), t.checkpoint))
            .collect()
    }

    pub(crate) fn saved(&mut self, index: usize, position: u64) {
        if let Some(track) = self.subs.get_mut(&index) {
            track.saved = track.saved.max(position);
        }
    }
}

impl Track {
    /// Moves the checkpoint past finished positions; true if it moved.
    fn settle(&mut self) -> bool {
        while self.out.front().is_some_and(|&(_, done)| done) {
            self.out.pop_front();
        }
        let checkpoint = match self.out.front() {
            Some(&(position, _)) => position - 1,
            None => self.routed_upto,
        };
        let moved = checkpoint > self.checkpoint;
        self.checkpoint = self.checkpoint.max(checkpoint);
        moved
    }
}

/// A worker's queue: the router pushes jobs, the worker takes all of them at once.
///
/// Cheaper per event than a channel: one uncontended lock per push, a wake-up only when
/// the queue was empty, and buffers swapped rather than allocated.
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    ready: Notify,
}

#[derive(Default)]
struct InboxState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// How many finished events a publisher drops at once (see [`Engine::reclaim`]).
const RECLAIM_BATCH: usize = 64;

/// How much queue room a waiting publisher takes at once. Below this much free room,
/// workers report finished deliveries at once instead of once per batch, so the room a
/// publisher waits for is never held back by a worker.
pub(crate) const ROOM_CHUNK: usize = 64;

/// The most jobs a worker takes at once, so retries that come due are not held up long.
const TAKE_AT_MOST: usize = 256;

impl Inbox {
    pub(crate) fn new() -> Self {
        Inbox {
            state: Mutex::new(InboxState::default()),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, job: Job) {
        let was_empty = {
            let mut state = self.lock();
            let was_empty = state.jobs.is_empty();
            state.jobs.push_back(job);
            was_empty
        };
        if was_empty {
            // Stores a wake-up if the worker is not waiting yet, so none is lost.
            self.ready.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits for jobs and moves up to [`TAKE_AT_MOST`] of them into `into` (which must be
    /// empty; when all fit, the buffers are swapped); false once closed and drained.
    async fn take(&self, into: &mut VecDeque<Job>) -> bool {
        loop {
            {
                let mut state = self.lock();
                if state.jobs.len() > TAKE_AT_MOST {
                    into.extend(state.jobs.drain(..TAKE_AT_MOST));
                    return true;
                }
                if !state.jobs.is_empty() {
                    std::mem::swap(&mut state.jobs, into);
                    return true;
                }
                if state.closed {
                    return false;
                }
            }
            self.ready.notified().await;
        }
    }
}

/// Sends jobs to the worker that owns their aggregate. A job goes out at once; a worker
/// that is busy takes what has piled up in one go. Dropping the router closes the
/// workers' inboxes: they end once drained.
pub(crate) struct Router {
    workers: Vec<Arc<Inbox>>,
}

impl Drop for Router {
    fn drop(&mut self) {
        for inbox in &self.workers {
            inbox.close();
        }
    }
}

impl Router {
    pub(crate) fn new(workers: Vec<Arc<Inbox>>) -> Self {
        Router { workers }
    }

    fn push(&mut self, event: BusEvent, subs: Arc<[Arc<Sub>]>) {
        let stream_hash = event.stream_hash();
        let worker = (stream_hash % self.workers.len() as u64) as usize;
        self.workers[worker].push(Job {
            event,
            subs,
            stream_hash,
        });
    }
}

/// Marks an event as routed to `subs`; returns false (and finishes it) if none wants it.
fn admit(engine: &Engine, event: &mut BusEvent, subs: &[Arc<Sub>]) -> bool {
    if subs.len() > 1 {
        event.remaining = Some(Arc::new(AtomicUsize::new(subs.len())));
    }
    for sub in subs {
        sub.queued.fetch_add(1, Ordering::Relaxed);
    }
    if subs.is_empty() {
        engine.event_done(event);
        return false;
    }
    true
}

impl Router {
    /// Routes a published event of a bus without a store to its subscriptions' workers.
    /// Called in publication order, under the intake lock.
    pub(crate) fn route_published(
        &mut self,
        engine: &Engine,
        table: &Routing,
        mut event: BusEvent,
    ) {
        match table.route(&event.record().event_type) {
            Some(subs) if admit(engine, &mut event, subs) => {
                self.push(event, Arc::clone(subs));
            }
            Some(_) => {}
            None => engine.event_done(&event),
        }
    }
}

/// The dispatcher of a bus with a store: reads the global log from the lowest checkpoint
/// of its subscriptions and routes each event to the subscriptions that have not seen it.
/// A subscription added later rewinds the reader to its own checkpoint; the others skip
/// what they already had. Ends when the bus stops.
pub(crate) async fn dispatch_log(engine: Arc<Engine>, mut router: Router) {
    let store = Arc::clone(engine.store.as_ref().expect("a bus with a store"));
    let mut head = store.watch_head();
    let mut routing = engine.routing.subscribe();
    let mut stopping = engine.stopping.subscribe();
    let mut next = u64::MAX;
    let mut table = Arc::new(Routing::default());
    loop {
        if *stopping.borrow() {
            break;
        }
        let current = Arc::clone(&routing.borrow_and_update());
        if !Arc::ptr_eq(&current, &table) || next == u64::MAX {
            table = current;
            match sync_tracker(&engine, &store, &table).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::error!(%error, "cannot load subscription checkpoints; retrying");
                    if wait_or_stop(&mut stopping, std::time::Duration::from_millis(500)).await {
                        break;
                    }
                    continue;
                }
            }
            let lowest = engine.lock_tracker().lowest_routed();
            next = next.min(lowest.map_or(u64::MAX - 1, |p| p + 1));
            engine.read_next.store(next, Ordering::SeqCst);
            engine.routing_seen.store(table.version, Ordering::SeqCst);
        }
        let head_now = *head.borrow_and_update();
        if table.subs.is_empty() || next > head_now {
            let caught_up = if table.subs.is_empty() {
                head_now + 1
            } else {
                next
            };
            engine.read_next.store(caught_up, Ordering::SeqCst);
            engine.progress.notify_waiters();
            tokio::select! {
                _ = head.changed() => {}
                _ = routing.changed() => {}
                _ = stopping.changed() => {}
            }
            continue;
        }
        // Wait for room before reading, so the window of events in memory stays bounded.
        let room = tokio::select! {
            permit = engine.permits.acquire() => permit,
            _ = stopping.changed() => continue,
        };
        drop(room);
        let limit = engine
            .permits
            .available_permits()
            .clamp(1, engine.batch_size);
        let page = match store.read_all(next, limit).await {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, position = next, "cannot read the event log; retrying");
                if wait_or_stop(&mut stopping, std::time::Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
        };
        let Some(last) = page.last().map(|e| e.position) else {
            // The head moved past what the log holds (another writer's append is not
            // visible yet); wait for the next change.
            engine.read_next.store(next, Ordering::SeqCst);
            continue;
        };
        let mut admitted = Vec::new();
        {
            let mut tracker = engine.lock_tracker();
            for record in page {
                let Some(candidates) = table.route(&record.event_type) else {
                    continue;
                };
                // Usually every candidate wants the event: share the table's list then.
                let subs: Arc<[Arc<Sub>]> = if candidates
                    .iter()
                    .all(|s| tracker.wants(s.index, record.position))
                {
                    Arc::clone(candidates)
                } else {
                    candidates
                        .iter()
                        .filter(|s| tracker.wants(s.index, record.position))
                        .cloned()
                        .collect()
                };
                if subs.is_empty() {
                    continue;
                }
                for sub in subs.iter() {
                    tracker.route(sub.index, record.position);
                }
                admitted.push((BusEvent::new(EventSource::Stored(Arc::new(record))), subs));
            }
            if tracker.routed_through(last) {
                engine.checkpoints_dirty.notify_one();
            }
        }
        // Permits bound the events in memory; they come back as events finish. Taking
        // them a chunk at a time wakes the dispatcher once per chunk, not once per event.
        let chunk = (engine.capacity / 4).max(1);
        let mut admitted = admitted.into_iter();
        while admitted.len() > 0 {
            let n = admitted.len().min(chunk);
            let permits = tokio::select! {
                permits = engine.permits.acquire_many(n as u32) => permits,
                _ = stopping.changed() => {
                    // Not routed: the tracker keeps these positions open, so the
                    // checkpoint stays below them and they are read again next time.
                    break;
                }
            };
            if let Ok(permits) = permits {
                permits.forget();
            }
            engine.in_flight.fetch_add(n as u64, Ordering::SeqCst);
            for (mut event, subs) in admitted.by_ref().take(n) {
                if admit(&engine, &mut event, &subs) {
                    router.push(event, subs);
                }
            }
        }
        next = last + 1;
        engine.read_next.store(next, Ordering::SeqCst);
    }
}

/// Adds newly subscribed durable subscriptions to the tracker at their stored checkpoint,
/// and drops those that left.
async fn sync_tracker(engine: &Engine, store: &Arc<dyn EventStore>, table: &Routing) -> Result<()> {
    let missing: Vec<Arc<Sub>> = {
        let mut tracker = engine.lock_tracker();
        let live: Vec<usize> = table.subs.iter().map(|s| s.index).collect();
        let gone: Vec<usize> = tracker
            .subs
            .keys()
            .copied()
            .filter(|i| !live.contains(i))
            .collect();
        for index in gone {
            tracker.remove(index);
        }
        table
            .subs
            .iter()
            .filter(|s| !tracker.contains(s.index))
            .cloned()
            .collect()
    };
    for sub in missing {
        let checkpoint = store.load_checkpoint(&sub.name).await?.unwrap_or(0);
        engine
            .lock_tracker()
            .add(sub.index, Arc::clone(&sub.name), checkpoint);
    }
    Ok(())
}

/// Sleeps for `delay` unless the bus stops first; true if it stops.
async fn wait_or_stop(stopping: &mut watch::Receiver<bool>, delay: std::time::Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stopping.borrow(),
        _ = stopping.changed() => true,
    }
}

/// Saves moved checkpoints whenever deliveries finish; changes that arrive during a save
/// are folded into the next one. A failed save is retried: it only delays the checkpoint.
pub(crate) async fn flush_checkpoints(engine: Arc<Engine>) {
    let mut stopping = engine.stopping.subscribe();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        tokio::select! {
            _ = engine.checkpoints_dirty.notified() => {}
            _ = stopping.changed() => return,
        }
        if let Err(error) = save_checkpoints(&engine).await {
            tracing::warn!(%error, "cannot save subscription checkpoints; retrying");
            if wait_or_stop(&mut stopping, std::time::Duration::from_millis(200)).await {
                return;
            }
            engine.checkpoints_dirty.notify_one();
        }
    }
}

/// Saves every checkpoint that moved since its last save.
pub(crate) async fn save_checkpoints(engine: &Engine) -> Result<()> {
    let Some(store) = &engine.store else {
        return Ok(());
    };
    let unsaved = engine.lock_tracker().unsaved();
    for (index, name, position) in unsaved {
        store.save_checkpoint(&name, position).await?;
        engine.lock_tracker().saved(index, position);
    }
    Ok(())
}

/// A delivery that failed and waits for its next attempt, or for its dead letter to be
/// stored.
struct Pending {
    event: BusEvent,
    sub: Arc<Sub>,
    failures: u32,
    first_failed_at: Option<DateTime<Utc>>,
    last_error: String,
    /// The last attempt was made; only the dead letter is left to store.
    give_up: bool,
}

enum Outcome {
    Done,
    Wait(Pending, Instant),
}

type Key = (usize, u64);

/// Runs the deliveries of the aggregates routed to it.
pub(crate) struct Worker {
    engine: Arc<Engine>,
    inbox: Arc<Inbox>,
    /// Per (subscription, aggregate): deliveries parked behind one that waits for a retry.
    parked: HashMap<Key, VecDeque<Pending>>,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    jitter: Jitter,
    finished: Finished,
}

impl Worker {
    pub(crate) fn new(engine: Arc<Engine>, inbox: Arc<Inbox>, n: u64) -> Self {
        let jitter = Jitter::new(engine.seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Worker {
            engine,
            inbox,
            parked: HashMap::new(),
            timers: BinaryHeap::new(),
            jitter,
            finished: Finished::default(),
        }
    }

    /// Runs until the dispatcher is gone and every parked delivery is finished.
    pub(crate) async fn run(mut self) {
        let mut open = true;
        let mut jobs = VecDeque::new();
        let inbox = Arc::clone(&self.inbox);
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            if !open && next_timer.is_none() {
                return;
            }
            tokio::select! {
                biased;
                _ = sleep_until(next_timer), if next_timer.is_some() => {
                    if let Some(Reverse((_, key))) = self.timers.pop() {
                        self.resume(key).await;
                    }
                    self.report_finished();
                }
                received = inbox.take(&mut jobs), if open => {
                    if !received {
                        open = false;
                    }
                    for job in jobs.drain(..) {
                        self.run_job(job).await;
                    }
                    self.report_finished();
                }
            }
        }
    }

    /// One delivery of `event` is finished (handled, dead-lettered or dropped because its
    /// subscription left); reported with the others by [`report_finished`](Self::report_finished).
    fn finish(&mut self, event: &BusEvent, sub: &Arc<Sub>) {
        let finished = &mut self.finished;
        match finished
            .by_sub
            .iter_mut()
            .find(|(s, _)| Arc::ptr_eq(s, sub))
        {
            Some((_, n)) => *n += 1,
            None => finished.by_sub.push((Arc::clone(sub), 1)),
        }
        if self.engine.store.is_some() {
            finished
                .positions
                .push((sub.index, event.record().position));
        }
        let last = match &event.remaining {
            Some(remaining) => remaining.fetch_sub(1, Ordering::AcqRel) == 1,
            None => true,
        };
        if last {
            finished.events += 1;
            finished.room += u64::from(event.holds_room);
            if let EventSource::Published(published) = &event.source {
                finished.published.push(Arc::clone(published));
            }
        }
    }

    /// Reports the finished deliveries: subscription counters and checkpoints first, then
    /// the events' room in the queue and idleness, so that `wait_idle` returns to settled
    /// statistics.
    fn report_finished(&mut self) {
        let engine = &self.engine;
        let finished = &mut self.finished;
        for (sub, n) in finished.by_sub.drain(..) {
            sub.queued.fetch_sub(n, Ordering::Relaxed);
        }
        if !finished.positions.is_empty() {
            let mut advanced = false;
            let mut tracker = engine.lock_tracker();
            for (index, position) in finished.positions.drain(..) {
                advanced |= tracker.complete(index, position);
            }
            drop(tracker);
            if advanced {
                engine.checkpoints_dirty.notify_one();
            }
        }
        if !finished.published.is_empty() {
            engine.hand_back(&mut finished.published);
        }
        if finished.events > 0 {
            let room = std::mem::take(&mut finished.room);
            engine.events_done(std::mem::take(&mut finished.events), room);
        }
    }

    async fn run_job(&mut self, job: Job) {
        let hash = job.stream_hash;
        for sub in job.subs.iter() {
            let pending = Pending {
                event: job.event.clone(),
                sub: Arc::clone(sub),
                failures: 0,
                first_failed_at: None,
                last_error: String::new(),
                give_up: false,
            };
            let key = (sub.index, hash);
            if let Some(queue) = self.parked_behind(key) {
                queue.push_back(pending);
                continue;
            }
            if let Outcome::Wait(pending, at) = self.attempt(pending).await {
                self.parked.insert(key, VecDeque::from([pending]));
                self.timers.push(Reverse((at, key)));
            }
        }
    }

    /// The deliveries parked for `key`, if any (skips hashing when nothing is parked).
    fn parked_behind(&mut self, key: Key) -> Option<&mut VecDeque<Pending>> {
        if self.parked.is_empty() {
            None
        } else {
            self.parked.get_mut(&key)
        }
    }

    /// A retry is due: attempt the first parked delivery, then the ones behind it, until
    /// one has to wait again.
    async fn resume(&mut self, key: Key) {
        let Some(mut queue) = self.parked.remove(&key) else {
            return;
        };
        while let Some(pending) = queue.pop_front() {
            if let Outcome::Wait(pending, at) = self.attempt(pending).await {
                queue.push_front(pending);
                self.parked.insert(key, queue);
                self.timers.push(Reverse((at, key)));
                return;
            }
        }
    }

    async fn attempt(&mut self, mut pending: Pending) -> Outcome {
        let engine = Arc::clone(&self.engine);
        let sub = Arc::clone(&pending.sub);
        if !sub.active.load(Ordering::Acquire) {
            self.finish(&pending.event, &sub);
            return Outcome::Done;
        }
        if pending.give_up {
            return self.dead_letter(pending).await;
        }
        if self.finished.events > 0 && engine.permits.available_permits() < ROOM_CHUNK {
            // The queue is nearly full: report the room these deliveries hold now, since
            // a handler (this one, say) may be waiting to publish into it.
            self.report_finished();
        }
        let attempt = pending.failures + 1;
        // The wall clock, not tokio's (which paused time stops, and which takes a lock per
        // reading when tokio's test-util is on): latency is real time.
        let started = std::time::Instant::now();
        let result = match sub.invoke.invoke(&pending.event.source, attempt) {
            Ok(handler) => {
                let record = pending.event.record();
                let span = tracing::debug_span!(
                    "eventfold.deliver",
                    subscription = %sub.name,
                    event_type = %record.event_type,
                    position = record.position,
                    attempt,
                );
                // A disabled span costs nothing to create, but entering it around every
                // poll and drop does: instrument only when a subscriber wants it.
                // Marks the handler's task as delivering for this bus (see `publish`).
                let delivery = DELIVERING.scope(engine.id(), CatchUnwind(handler));
                let outcome = if span.is_disabled() {
                    delivery.await
                } else {
                    delivery.instrument(span).await
                };
                outcome.map_err(|e| (e.to_string(), true))
            }
            // An event that does not decode will not decode on a retry either.
            Err(error) => Err((error.to_string(), false)),
        };
        let elapsed = started.elapsed();
        sub.latency.record(elapsed);
        let (error, retryable) = match result {
            Ok(()) => {
                Counters::add(&sub.counters.delivered, 1);
                Counters::add(&engine.counters.delivered, 1);
                self.finish(&pending.event, &sub);
                return Outcome::Done;
            }
            Err(failure) => failure,
        };
        Counters::add(&sub.counters.failed, 1);
        Counters::add(&engine.counters.failed, 1);
        pending.failures = attempt;
        let now = engine.clock.now();
        pending.first_failed_at.get_or_insert(now);
        let record = pending.event.record();
        tracing::warn!(
            subscription = %sub.name,
            event_id = %record.event_id,
            position = record.position,
            attempt,
            %error,
            "delivery failed"
        );
        let failure = FailureRecord {
            subscription: sub.name.to_string(),
            event_id: record.event_id,
            position: record.position,
            attempt,
            error: error.clone(),
            duration_micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            failed_at: now,
        };
        if let Err(store_error) = engine
            .records
            .record_failure(failure, crate::store::DEFAULT_FAILURE_RETENTION)
            .await
        {
            tracing::error!(%store_error, "cannot store a failure record");
        }
        pending.last_error = error;
        if retryable && attempt < sub.retry.max_attempts() {
            Counters::add(&sub.counters.retried, 1);
            Counters::add(&engine.counters.retried, 1);
            let delay = sub.retry.delay(attempt, self.jitter.next());
            return Outcome::Wait(pending, Instant::now() + delay);
        }
        pending.give_up = true;
        self.dead_letter(pending).await
    }

    /// Stores the dead letter, then counts the delivery as finished. If the store refuses,
    /// the delivery stays parked and the write is tried again later: a checkpoint never
    /// passes an event whose dead letter is not stored.
    async fn dead_letter(&mut self, pending: Pending) -> Outcome {
        let engine = Arc::clone(&self.engine);
        let record = pending.event.record();
        let now = engine.clock.now();
        let dead_letter = NewDeadLetter {
            subscription: pending.sub.name.to_string(),
            event_id: record.event_id,
            position: record.position,
            event_type: record.event_type.to_string(),
            error: pending.last_error.clone(),
            attempts: pending.failures,
            first_failed_at: pending.first_failed_at.unwrap_or(now),
            last_failed_at: now,
        };
        let kept = match &pending.event.source {
            // Without a store the event itself is kept beside its dead letter, so it can
            // be replayed.
            EventSource::Published(published) => {
                keep_transient_event(&engine, &pending.sub, published.as_ref()).await
            }
            EventSource::Stored(_) => Ok(()),
        };
        let stored = match kept {
            Ok(()) => engine.records.add_dead_letter(dead_letter).await.map(drop),
            Err(error) => Err(error),
        };
        match stored {
            Ok(()) => {
                Counters::add(&pending.sub.counters.dead_lettered, 1);
                Counters::add(&engine.counters.dead_lettered, 1);
                self.finish(&pending.event, &pending.sub);
                Outcome::Done
            }
            Err(error) => {
                tracing::error!(%error, "cannot store a dead letter; trying again in a second");
                Outcome::Wait(pending, Instant::now() + std::time::Duration::from_secs(1))
            }
        }
    }
}

/// Appends a transient event, serialized now, to the bus's private record store, so a
/// dead letter of it can be replayed.
async fn keep_transient_event(
    engine: &Engine,
    sub: &Sub,
    published: &dyn PublishedEvent,
) -> Result<()> {
    let record = published.record();
    if engine.records.get(record.event_id).await?.is_some() {
        return Ok(());
    }
    let stream = record.stream_id();
    let event = crate::record::NewEvent {
        event_id: record.event_id,
        event_type: record.event_type.to_string(),
        schema_version: record.schema_version,
        occurred_at: record.occurred_at,
        metadata: record.metadata.clone(),
        payload: sub.invoke.encode(published)?,
    };
    match engine
        .records
        .append(&stream, crate::record::ExpectedVersion::Any, vec![event])
        .await
    {
        Ok(_) | Err(Error::DuplicateEventId { .. }) => Ok(()),
        Err(error) => Err(error),
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Metadata;

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
