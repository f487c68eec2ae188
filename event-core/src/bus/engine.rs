//! The state the engine's tasks (dispatcher, workers, checkpoint flusher) share with the
//! bus handle.
//!
//! The engine's parts, each in its module: [`routing`](super::routing) (who receives
//! what), [`room`](super::room) (the queue's slots), [`inbox`](super::inbox) (the
//! workers' queues), [`dispatch`](super::dispatch) (reading the log, checkpoints),
//! [`tracker`](super::tracker) (checkpoint tracking), [`worker`](super::worker) (lanes,
//! retries), [`deliver`](super::deliver) (one attempt, shared with dead-letter replay)
//! and [`records`](super::records) (dead letters and failure records).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::config::Clock;
use super::handler::PublishedEvent;
use super::inbox::Inbox;
use super::records::Records;
use super::room::Room;
use super::routing::{BusEvent, Routing};
use super::stats::Counters;
use super::tracker::TrackKey;
use super::tracker::Tracker;
use crate::lease::SegmentLease;
use crate::store::EventStore;

pub(crate) struct Engine {
    pub(crate) store: Option<Arc<dyn EventStore>>,
    /// Where dead letters and failure records go: the store, or memory.
    pub(crate) records: Records,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) routing: watch::Sender<Arc<Routing>>,
    pub(crate) batch_size: usize,
    pub(crate) room: Room,
    /// Where the dispatcher reads next, with a store.
    pub(crate) read_next: AtomicU64,
    /// The highest head `wait_idle` read from the store itself (`head_position`): the
    /// dispatcher reads up to it even where the store's head watch has not reported it
    /// (another process's appends, on a store whose watch follows them late or never).
    pub(crate) reported_head: AtomicU64,
    /// Wakes the dispatcher when `reported_head` moved.
    pub(crate) head_reported: Notify,
    /// The routing version the dispatcher has taken into account.
    pub(crate) routing_seen: AtomicU64,
    /// Wakes `wait_idle` and the checkpoint flusher when work finishes.
    pub(crate) progress: Notify,
    pub(crate) counters: Counters,
    pub(crate) published: AtomicU64,
    /// The bus's own metrics (the subscriptions' are on each [`Sub`](super::routing::Sub)).
    pub(crate) metrics: crate::metrics::BusMetrics,
    pub(crate) tracker: Mutex<Tracker>,
    pub(crate) checkpoints_dirty: Notify,
    /// Held while checkpoints are saved, and by a reset while it sets one, so a save that
    /// took its list before the reset cannot write over it.
    pub(crate) checkpoint_gate: tokio::sync::Mutex<()>,
    pub(crate) stopping: watch::Sender<bool>,
    pub(crate) seed: u64,
    /// Published events whose deliveries are all done, handed back for the next publisher
    /// to drop (see [`Engine::reclaim`]).
    pub(crate) returned: Mutex<Vec<Arc<dyn PublishedEvent>>>,
    /// About how many are in `returned`, read without its lock.
    pub(crate) returned_len: AtomicUsize,
    /// This bus's member id in the stores' lease tables.
    pub(crate) member: String,
    /// How long the leases it takes last without a renewal.
    pub(crate) lease_ttl: Duration,
    /// Segments the lease keeper claimed, for the dispatcher to take up between reads.
    pub(crate) claimed: Mutex<Vec<Claim>>,
    /// Counts hand-overs to `claimed`; the dispatcher notes the count it took up in
    /// `segments_seen`, so idleness can tell whether it has.
    pub(crate) segments_version: AtomicU64,
    pub(crate) segments_seen: AtomicU64,
    /// Wakes the dispatcher when segments were claimed.
    pub(crate) segments_changed: Notify,
    /// The routing version for which the lease keeper last tried to claim segments.
    pub(crate) keeper_seen: AtomicU64,
    /// Wakes the lease keeper: a draining segment finished, or the routing changed.
    pub(crate) keeper_wake: Notify,
    /// Leases of segments stopped because their time to run ended before a renewal
    /// answered: the keeper releases them in the store (if still held), so the segment is
    /// free at once rather than when the lease expires.
    pub(crate) overdue: Mutex<Vec<SegmentLease>>,
    /// Wakes the task that carries out stored replay requests: a lease round ended.
    pub(crate) replay_wake: Notify,
    /// Held while replay requests are carried out, so the task and
    /// `EventBus::carry_out_replay_requests` never carry out one request twice at once.
    pub(crate) replay_gate: tokio::sync::Mutex<()>,
    /// Counts the segments that stopped running here (lost, or being given up): a worker
    /// that sees it move attempts at once the lanes of theirs that wait for a retry, so
    /// they are dropped now rather than when the retry is due. Read by the workers once
    /// per round of their loop; [`segment_stopped`](Self::segment_stopped) pokes their
    /// inboxes so a waiting worker makes that round. (A watch cost a registration with
    /// its notifier per round: about 450 instructions per delivery of handlers that
    /// await, 2.5% of a process's instructions in the perf report's `sub_scale`.)
    pub(crate) segments_stopped: AtomicU64,
    /// The workers' inboxes, once the bus started.
    pub(crate) inboxes: Mutex<Vec<Arc<Inbox>>>,
}

/// A segment the lease keeper claimed, and the checkpoint it starts from.
pub(crate) struct Claim {
    /// The subscription's index.
    pub(crate) index: usize,
    pub(crate) lease: SegmentLease,
    pub(crate) checkpoint: u64,
    /// When the bus must stop running it unless the lease is renewed first (see
    /// [`leases`](super::leases)).
    pub(crate) run_until: tokio::time::Instant,
}

tokio::task_local! {
    /// Set while a worker runs a handler: the identity of the bus delivering.
    pub(crate) static DELIVERING: usize;
}

/// How many finished events a publisher drops at once (see [`Engine::reclaim`]).
const RECLAIM_BATCH: usize = 64;

impl Engine {
    pub(crate) fn lock_tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True when nothing is queued, in flight or waiting for a retry, and, with a store,
    /// the dispatcher has read up to the head of the log.
    pub(crate) fn is_idle(&self) -> bool {
        if !self.room.is_empty() {
            return false;
        }
        match &self.store {
            Some(store) => {
                let head = self.head(*store.watch_head().borrow());
                let routing = self.routing.borrow().version;
                self.routing_seen.load(Ordering::SeqCst) == routing
                    && self.keeper_seen.load(Ordering::SeqCst) >= routing
                    && self.segments_seen.load(Ordering::SeqCst)
                        == self.segments_version.load(Ordering::SeqCst)
                    && self.read_next.load(Ordering::SeqCst) > head
            }
            None => true,
        }
    }

    /// Hands the metrics recorder what the bus's per-event counts grew by since the last
    /// time (see [`crate::metrics`] for why they are not recorded per event).
    pub(crate) fn catch_up_metrics(&self) {
        self.metrics
            .published
            .catch_up(self.published.load(Ordering::Relaxed));
        for sub in &self.routing.borrow().subs {
            sub.catch_up_metrics();
        }
    }

    /// The head the dispatcher reads up to: the watch's, or the one `wait_idle` read from
    /// the store if that is ahead.
    pub(crate) fn head(&self, watched: u64) -> u64 {
        watched.max(self.reported_head.load(Ordering::SeqCst))
    }

    /// A head read from the store: the dispatcher reads up to it.
    pub(crate) fn report_head(&self, head: u64) {
        if self.reported_head.fetch_max(head, Ordering::SeqCst) < head {
            // A permit, kept if the dispatcher is not waiting right now.
            self.head_reported.notify_one();
        }
    }

    /// This bus no longer holds the lease of a segment (lost, or given up): it stops
    /// tracking it, and deliveries of it not yet started are dropped.
    pub(crate) fn segment_lost(&self, key: TrackKey, lease: &SegmentLease) {
        let mut tracker = self.lock_tracker();
        if tracker
            .lease(key)
            .is_some_and(|held| held.epoch == lease.epoch)
        {
            tracker.remove(key);
            if let Some(sub) = self.routing.borrow().subs.iter().find(|s| s.index == key.0) {
                sub.set_held(key.1, None);
            }
            drop(tracker);
            self.segment_stopped();
        }
    }

    /// A segment stopped running here: the workers hear of it (see `segments_stopped`).
    pub(crate) fn segment_stopped(&self) {
        self.segments_stopped.fetch_add(1, Ordering::SeqCst);
        for inbox in self
            .inboxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            inbox.poke();
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
    pub(crate) fn hand_back(&self, done: &mut Vec<Arc<dyn PublishedEvent>>) {
        let mut returned = self.returned.lock().unwrap_or_else(|e| e.into_inner());
        if returned.len() + done.len() <= self.room.capacity() {
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
    pub(crate) fn events_done(&self, n: u64, room: u64) {
        if self.room.done(n, room) {
            self.progress.notify_waiters();
        }
    }

    /// `n` deliveries that waited without a slot are done.
    pub(crate) fn waited_done(&self, n: u64) {
        if self.room.waited_done(n) {
            self.progress.notify_waiters();
        }
    }

    pub(crate) fn event_done(&self, event: &BusEvent) {
        self.events_done(1, u64::from(event.holds_room));
    }
}
