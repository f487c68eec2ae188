//! The workers: each runs the deliveries of the aggregates routed to it.
//!
//! Deliveries wait for each other only within a *lane*: one subscription and one
//! aggregate. A lane is busy while its first delivery runs (a handler that did not
//! finish at once keeps running beside the others) or waits for a retry; later
//! deliveries of the lane wait behind it, and every other lane goes on. So a slow, stuck
//! or retrying handler holds back only the later events of its own aggregate for its own
//! subscription.
//!
//! Deliveries waiting behind a busy lane give their event's slot of the queue back, so a
//! retrying or slow lane never takes room from other aggregates or other subscriptions.
//! With a store they leave memory too: the lane notes the range of its stream they cover
//! and reads them again from the store when it gets to them, a page (`batch_size` events
//! of the stream) at a time, the rest of the range staying deferred. Without a store they stay
//! in memory, up to `queue_capacity` per subscription; beyond that they keep their slots.
//!
//! With a store, deliveries behind a lane whose head *runs* (a handler awaiting I/O) stay
//! in memory with their slots while more than half the queue is free: with many awaiting
//! handlers nearly every delivery waits behind its lane's last one, and reading them all
//! again (a store read per one or two deliveries, which the worker awaited) was what
//! limited one process. They never hold more than about half the room, so the other
//! lanes always have the rest; once the lane's head fails and waits for its retry, they
//! leave memory as above (see [`Worker::defer_kept`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::config::{Jitter, UnknownEventPolicy};
use super::deliver::{self, Attempt, GiveUp, Outcome};
use super::dispatch::read_page;
use super::engine::Engine;
use super::handler::{EventSource, PublishedEvent, panic_message};
use super::inbox::Inbox;
use super::room::ROOM_CHUNK;
use super::routing::{BusEvent, Job, Sub, partition_of};
use super::running::Running;
use super::stats::Counters;
use super::tracker::TrackKey;
use crate::error::StoreErrorKind;
use crate::record::{RecordedEvent, StreamId};
use crate::registry::registry;

/// A lane: (subscription index, aggregate hash).
type Key = (usize, u64);

/// The worker's map of busy lanes hashes with foldhash (fixed seed), as the routing table
/// does: SipHash cost about 650 instructions per delivery of a handler that awaits (an
/// insert, a lookup and a removal per delivery).
type Lanes = HashMap<Key, Lane, foldhash::fast::FixedState>;

/// A delivery of one event to one subscription, with what its failures so far left.
struct Pending {
    event: BusEvent,
    sub: Arc<Sub>,
    failures: u32,
    first_failed_at: Option<DateTime<Utc>>,
    last_error: String,
    /// The last attempt was made; only the dead letter is left to store.
    give_up: bool,
    /// Whether it holds its event's slot of the queue.
    hold: Hold,
    /// The epoch of the segment lease this bus held when the delivery came to the worker
    /// (`None` without a store, or if the segment was not held then): it runs only while
    /// the bus holds that lease, and finishes the position only for that hold's track.
    epoch: Option<u64>,
}

/// What keeps a delivery counted until it is done.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Its event, in flight (and in the queue's slot if the event holds one).
    Queue,
    /// It waits in memory behind a busy lane, counted as waiting and as parked for its
    /// subscription.
    Parked,
    /// It was read again from the store for its lane, counted as waiting.
    Reread,
}

/// The deliveries of a lane that left memory: its stream's events in `span`, for `sub`,
/// read again from the store when the lane gets to them.
struct Deferred {
    sub: Arc<Sub>,
    stream: StreamId,
    span: Span,
}

/// Where a lane's deferred deliveries are in its stream: from `from_version` up to
/// position `upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    from_version: u64,
    /// The position of the first of them.
    from_position: u64,
    upto: u64,
    count: u64,
    /// A delivery at or below `upto` joined (its segment was lost and claimed again by
    /// this bus, which routes it again from the stored checkpoint): positions then come
    /// back once though they were counted twice.
    rewound: bool,
    /// The lease epoch of its latest deliveries: the range's deliveries come back under
    /// it (those of an earlier hold that are still open are the later hold's too).
    epoch: Option<u64>,
}

impl Span {
    /// An empty span at the delivery of this version and position, which [`take`] takes
    /// in next.
    ///
    /// [`take`]: Self::take
    fn starting(version: u64, position: u64, epoch: Option<u64>) -> Self {
        Span {
            from_version: version,
            from_position: position,
            upto: position,
            count: 0,
            rewound: false,
            epoch,
        }
    }

    /// Takes in the deliveries of `later`, a span of the same stream that began after
    /// this one's deliveries came (or, if it reaches below this one's end, routed again:
    /// then it is rewound, as in [`take`](Self::take)).
    fn join(&mut self, later: &Span) {
        if later.from_position <= self.upto {
            self.rewound = true;
        }
        if later.from_position < self.from_position {
            self.from_position = later.from_position;
            self.from_version = later.from_version;
        }
        self.upto = self.upto.max(later.upto);
        self.count += later.count;
        self.rewound |= later.rewound;
        self.epoch = self.epoch.max(later.epoch);
    }

    /// Takes in one more delivery of the stream. The span only widens: a delivery below
    /// it (routed again after its segment was claimed again) moves its start down, and one
    /// inside it is read again with it. Were `upto` set to a lower position, the
    /// deliveries above it would never be read again, and the segment's checkpoint would
    /// wait for them forever (a kill test's segment stalled at 19,999 of 20,000 so).
    fn take(&mut self, version: u64, position: u64, epoch: Option<u64>) {
        if position <= self.upto {
            self.rewound = true;
        }
        if position < self.from_position {
            self.from_position = position;
            self.from_version = version;
        }
        self.upto = self.upto.max(position);
        self.count += 1;
        self.epoch = self.epoch.max(epoch);
    }
}

impl Pending {
    /// Whether this bus runs it: its segment is held, under the lease it came under.
    fn runs(&self) -> bool {
        self.sub.runs(self.event.partition) && self.sub.epoch_of(self.event.partition) == self.epoch
    }

    fn new(event: BusEvent, sub: Arc<Sub>) -> Self {
        let epoch = sub.epoch_of(event.partition);
        Pending {
            epoch,
            event,
            sub,
            failures: 0,
            first_failed_at: None,
            last_error: String::new(),
            give_up: false,
            hold: Hold::Queue,
        }
    }
}

/// A busy lane: its first delivery, running or waiting for its next attempt, and the
/// deliveries behind it, in memory, then deferred.
#[derive(Default)]
struct Lane {
    /// None only while the lane waits to read its deferred deliveries again.
    head: Option<Pending>,
    behind: VecDeque<Pending>,
    deferred: Option<Deferred>,
    /// When the timer it waits for is due (a retry, a dead letter or a read to try again);
    /// `None` while its head runs. A timer of another moment is stale (the lane was woken
    /// earlier, see [`Worker::wake_stopped`]) and passes it by.
    waiting_until: Option<Instant>,
}

/// Where a lane's first delivery is after a move.
enum Step {
    /// Finished: handled, dead-lettered, or dropped because its subscription left.
    Done,
    /// Its handler did not finish at once: it runs on in the worker's `running` attempts.
    Running(Pending, Attempt),
    /// Waits until then for its next attempt (or for its dead letter to be stored).
    Wait(Pending, Instant),
}

/// What is left of a fresh delivery's first attempt, when it did not simply succeed.
enum First {
    /// It failed (or timed out, or did not decode).
    Outcome(Outcome),
    /// Its handler did not finish at once.
    Running(Attempt),
    /// It needs the full step (its subscription left, or only its dead letter is left).
    Step,
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
    /// (subscription and segment, lease epoch, position, handled) of finished deliveries,
    /// for the checkpoints: `handled` is false for one dropped before it started (its
    /// segment no longer runs here), which the checkpoint must not pass.
    positions: Vec<(TrackKey, u64, u64, bool)>,
    /// Finished published events, to hand back to their publisher.
    published: Vec<Arc<dyn PublishedEvent>>,
    /// Deliveries that began to wait without a slot.
    waiting: u64,
    /// Deliveries that waited without a slot and are done.
    waited_done: u64,
}

/// The lane a worker is carrying on inline, kept in the worker (not on the stack of the
/// future) so a panic there loses nothing. Its head is the delivery being moved.
struct InHand {
    key: Key,
    lane: Lane,
}

pub(crate) struct Worker {
    engine: Arc<Engine>,
    inbox: Arc<Inbox>,
    /// The busy lanes, but the one in hand.
    lanes: Lanes,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Attempts that did not finish at once, polled by this worker's task.
    running: Running<Key, Attempt>,
    /// Jobs taken from the inbox and not yet offered to their lanes.
    jobs: VecDeque<Job>,
    /// The job whose deliveries are being offered, and how many of them were.
    job_in_hand: Option<(Job, usize)>,
    /// The fresh delivery being attempted inline, kept here (not on the stack of the
    /// future) so a panic there loses nothing. It gets a lane, in `in_hand`, only if it
    /// does not simply succeed at once: most never need one.
    fresh: Option<(Key, Pending)>,
    in_hand: Option<InHand>,
    open: bool,
    jitter: Jitter,
    finished: Finished,
    /// The engine's count of segments stopped here, as this worker last saw it.
    stopped: u64,
}

impl Worker {
    pub(crate) fn new(engine: Arc<Engine>, inbox: Arc<Inbox>, n: u64) -> Self {
        let jitter = Jitter::new(engine.seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let stopped = engine.segments_stopped.load(Ordering::SeqCst);
        Worker {
            stopped,
            engine,
            inbox,
            lanes: Lanes::default(),
            timers: BinaryHeap::new(),
            running: Running::default(),
            jobs: VecDeque::new(),
            job_in_hand: None,
            fresh: None,
            in_hand: None,
            open: true,
            jitter,
            finished: Finished::default(),
        }
    }

    /// Runs until the dispatcher is gone and every delivery is finished. A panic that
    /// escapes (not a handler's: those are failed attempts) restarts the loop with the
    /// worker's state intact; the restart is counted in the statistics.
    pub(crate) async fn run(mut self) {
        loop {
            let escaped = {
                let run = CatchPanic(Box::pin(self.serve()));
                run.await
            };
            match escaped {
                Ok(()) => return,
                Err(panic) => {
                    let message = panic_message(panic);
                    tracing::error!(%message, "a bus worker panicked; it goes on");
                    Counters::add(&self.engine.counters.worker_restarts, 1);
                    self.engine.metrics.worker_restarts.increment(1);
                    self.recover(&message);
                }
            }
        }
    }

    async fn serve(&mut self) {
        let inbox = Arc::clone(&self.inbox);
        // Only a bus with a store has segments that stop running here.
        let durable = self.engine.store.is_some();
        loop {
            self.offer_jobs().await;
            if durable {
                let stopped = self.engine.segments_stopped.load(Ordering::SeqCst);
                if stopped != self.stopped {
                    self.stopped = stopped;
                    self.wake_stopped();
                }
            }
            self.report_finished();
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            if !self.open && next_timer.is_none() && self.running.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                _ = sleep_until(next_timer), if next_timer.is_some() => {
                    if let Some(Reverse((at, key))) = self.timers.pop() {
                        self.resume(key, at).await;
                    }
                }
                (key, outcome) = std::future::poll_fn(|cx| self.running.poll_done(cx)),
                    if !self.running.is_empty() =>
                {
                    self.attempt_over(key, outcome).await;
                }
                received = inbox.take(&mut self.jobs), if self.open => {
                    if !received {
                        self.open = false;
                    }
                }
            }
        }
    }

    /// Offers every taken job's deliveries to their lanes.
    async fn offer_jobs(&mut self) {
        loop {
            let (job, offered) = match self.job_in_hand.take() {
                Some(in_hand) => in_hand,
                None => match self.jobs.pop_front() {
                    Some(job) => (job, 0),
                    None => return,
                },
            };
            let Some(sub) = job.subs.get(offered).cloned() else {
                continue;
            };
            let key = (sub.index, job.stream_hash);
            let pending = if offered + 1 == job.subs.len() {
                // The job's last delivery takes its event: no reference to count up and
                // down again (the event's count is shared with the publisher's thread).
                Pending::new(job.event, sub)
            } else {
                let pending = Pending::new(job.event.clone(), sub);
                self.job_in_hand = Some((job, offered + 1));
                pending
            };
            self.offer(key, pending).await;
        }
    }

    /// A new delivery: behind its lane if the lane is busy, else attempted now.
    async fn offer(&mut self, key: Key, pending: Pending) {
        // Skips hashing when no lane is busy.
        if !self.lanes.is_empty() && self.lanes.contains_key(&key) {
            self.wait_behind(key, pending);
            return;
        }
        self.fresh = Some((key, pending));
        // Most attempts finish at once and well: that path stays small. A handler still
        // running goes on beside the others while its lane waits for it (what
        // `carry_on_from(Step::Running(..))` does, without a lane in hand). The rest (a
        // failure, a subscription that left) goes on in a boxed future, so the large state
        // of retries and dead letters is neither built nor moved for every delivery.
        match self.first_attempt().await {
            None => {}
            Some(First::Running(attempt)) => {
                let (key, pending) = self.fresh.take().expect("a fresh delivery");
                self.running.push(key, attempt);
                let lane = Lane {
                    head: Some(pending),
                    ..Lane::default()
                };
                self.lanes.insert(key, lane);
            }
            Some(First::Outcome(outcome)) => {
                self.fresh_to_lane();
                Box::pin(async {
                    let step = self.after(outcome).await;
                    self.carry_on_from(step).await;
                })
                .await;
            }
            Some(First::Step) => {
                self.fresh_to_lane();
                Box::pin(self.carry_on()).await;
            }
        }
    }

    /// The fresh delivery becomes the head of its lane, in hand.
    fn fresh_to_lane(&mut self) {
        if let Some((key, pending)) = self.fresh.take() {
            self.in_hand = Some(InHand {
                key,
                lane: Lane {
                    head: Some(pending),
                    ..Lane::default()
                },
            });
        }
    }

    /// Attempts the fresh delivery once, inline. None if it was handled (its lane stays
    /// free); else what is left to carry on.
    async fn first_attempt(&mut self) -> Option<First> {
        if self.finished.events > 0 && self.engine.room.available() < ROOM_CHUNK {
            // The queue is nearly full: report the room these deliveries hold now, since
            // a handler (this one, say) may be waiting to publish into it.
            self.report_finished();
        }
        let bus = self.engine.id();
        let (_, held) = self.fresh.as_ref().expect("a fresh delivery");
        if !held.sub.active.load(Ordering::Acquire) || held.give_up || !held.runs() {
            return Some(First::Step);
        }
        let mut attempt = deliver::begin(
            bus,
            &held.sub,
            &held.event.source,
            held.failures + 1,
            held.epoch,
        );
        // Unarmed: a pending attempt goes to `running`, which polls it again at once.
        let polled = std::future::poll_fn(|cx| Poll::Ready(attempt.poll_unarmed(cx))).await;
        match polled {
            Poll::Ready(Outcome {
                result: Ok(()),
                elapsed,
            }) => {
                let (_, pending) = self.fresh.take().expect("a fresh delivery");
                deliver::delivered(&self.engine, &pending.sub, elapsed);
                self.finish(&pending);
                None
            }
            Poll::Ready(outcome) => Some(First::Outcome(outcome)),
            Poll::Pending => Some(First::Running(attempt)),
        }
    }

    /// Puts a delivery behind its busy lane, giving its event's slot back: with a store
    /// it leaves memory (the lane's deferred range grows), without one it is parked in
    /// memory while its subscription has parking room (`queue_capacity` deliveries).
    fn wait_behind(&mut self, key: Key, mut pending: Pending) {
        let durable = self.engine.store.is_some();
        let capacity = self.engine.room.capacity() as u64;
        let lane = self.lanes.get_mut(&key).expect("a busy lane");
        if durable
            && pending.hold == Hold::Queue
            && matches!(pending.event.source, EventSource::Stored(_))
        {
            let record = pending.event.record();
            let same_stream = |d: &Deferred| {
                d.stream.aggregate_id == record.aggregate_id
                    && *d.stream.aggregate_type == *record.aggregate_type
            };
            // While more than half the queue's room is free, it stays in memory behind
            // the lane, keeping its slot: reading it again from the store would cost a
            // read per few deliveries when many handlers await, which the worker waits
            // for. Beyond that it leaves memory, so waiting deliveries never hold more
            // than about half the room and the other lanes always have the rest. Once the
            // lane's stream has deferred deliveries, later ones join them, in order.
            let keeps = lane.deferred.is_none()
                && lane.waiting_until.is_none()
                && self.engine.room.available() * 2 > self.engine.room.capacity();
            if keeps {
                lane.behind.push_back(pending);
                return;
            }
            // Two streams of one hash share a lane: the second one's stay in memory.
            let deferred = match &mut lane.deferred {
                None => Some(lane.deferred.insert(Deferred {
                    sub: Arc::clone(&pending.sub),
                    stream: record.stream_id(),
                    span: Span::starting(record.version, record.position, pending.epoch),
                })),
                Some(d) if same_stream(d) => Some(d),
                Some(_) => None,
            };
            if let Some(deferred) = deferred {
                deferred
                    .span
                    .take(record.version, record.position, pending.epoch);
                self.release(&pending.event);
                return;
            }
        }
        if pending.hold == Hold::Queue && pending.sub.parked.load(Ordering::Relaxed) < capacity {
            pending.sub.parked.fetch_add(1, Ordering::Relaxed);
            pending.hold = Hold::Parked;
            self.release(&pending.event);
        }
        self.lanes
            .get_mut(&key)
            .expect("a busy lane")
            .behind
            .push_back(pending);
    }

    /// The lane's head waits for a retry: the deliveries that stayed in memory behind it
    /// while it ran (keeping their slots, see [`wait_behind`](Self::wait_behind)) leave
    /// memory and join its deferred range, so a retrying lane holds no slot but its
    /// head's. Only when they are all of one stream, the deferred range's if it has one
    /// (else, two streams sharing the lane, they stay as they are).
    fn defer_kept(&mut self, lane: &mut Lane) {
        if self.engine.store.is_none() {
            return;
        }
        let Some(first) = lane.behind.front() else {
            return;
        };
        let stream = first.event.record().stream_id();
        let of_stream = |sub: &Arc<Sub>, record: &RecordedEvent| {
            Arc::ptr_eq(sub, &first.sub)
                && record.aggregate_id == stream.aggregate_id
                && *record.aggregate_type == *stream.aggregate_type
        };
        let movable = lane.behind.iter().all(|p| {
            p.hold == Hold::Queue
                && matches!(p.event.source, EventSource::Stored(_))
                && of_stream(&p.sub, p.event.record())
        }) && lane
            .deferred
            .as_ref()
            .is_none_or(|d| d.stream == stream && Arc::ptr_eq(&d.sub, &first.sub));
        if !movable {
            return;
        }
        let first = lane.behind.front().expect("not empty");
        let (sub, record) = (Arc::clone(&first.sub), first.event.record());
        let mut span = Span::starting(record.version, record.position, first.epoch);
        for pending in std::mem::take(&mut lane.behind) {
            let record = pending.event.record();
            span.take(record.version, record.position, pending.epoch);
            self.release(&pending.event);
        }
        if let Some(later) = lane.deferred.take() {
            span.join(&later.span);
        }
        lane.deferred = Some(Deferred { sub, stream, span });
    }

    /// A delivery gives its event's slot back and goes on waiting: the event counts as
    /// done for the queue once this was its last delivery holding it.
    fn release(&mut self, event: &BusEvent) {
        self.finished.waiting += 1;
        let last = match &event.remaining {
            Some(remaining) => remaining.fetch_sub(1, Ordering::AcqRel) == 1,
            None => true,
        };
        if last {
            self.finished.events += 1;
            self.finished.room += u64::from(event.holds_room);
        }
    }

    /// The events of a deferred range read from the log, passing over damaged rows.
    // Takes the engine, not the worker: the worker is not `Sync` (its running attempts
    // are not), so no reference to it may be held across an await.
    async fn read_log_around_damage(
        engine: &Engine,
        deferred: &Deferred,
    ) -> crate::error::Result<Vec<RecordedEvent>> {
        let store = engine.store.as_ref().expect("deferred only with a store");
        let mut events = Vec::new();
        let mut next = deferred.span.from_position;
        while next <= deferred.span.upto {
            let limit = usize::try_from(deferred.span.upto - next + 1)
                .unwrap_or(usize::MAX)
                .min(engine.batch_size);
            let page = read_page(store.as_ref(), next, limit).await?;
            let last = page.events.last().map(|e| e.position);
            next = match (&page.damaged, last) {
                (Some(damaged), _) => damaged.position + 1,
                (None, Some(last)) => last + 1,
                (None, None) => break,
            };
            events.extend(page.events.into_iter().filter(|e| {
                e.aggregate_id == deferred.stream.aggregate_id
                    && *e.aggregate_type == *deferred.stream.aggregate_type
            }));
        }
        Ok(events)
    }

    /// Reads a lane's deferred deliveries back from the store, in order, a page
    /// (`batch_size` events of the stream) at a time: returns the page's deliveries and,
    /// if the range goes on past the page, the rest of it, still deferred. A lane so holds
    /// at most a page of read-back deliveries in memory, however long its backlog.
    async fn reread(
        &mut self,
        deferred: &Deferred,
    ) -> crate::error::Result<(VecDeque<Pending>, Option<Deferred>)> {
        let store = self
            .engine
            .store
            .as_ref()
            .expect("deferred only with a store");
        let page = self.engine.batch_size.max(1);
        let (events, complete) = match store
            .read_stream_page(&deferred.stream, deferred.span.from_version, page)
            .await
        {
            Ok(events) => {
                // Past the range, or the stream's end: nothing of the range is left.
                let complete = events.len() < page
                    || events
                        .last()
                        .is_some_and(|last| last.position >= deferred.span.upto);
                (events, complete)
            }
            // A damaged row of the stream (dead-lettered by the dispatcher already) spoils
            // the stream's read: read the log around it instead.
            Err(error) if error.store_kind() == Some(StoreErrorKind::Corrupt) => (
                Self::read_log_around_damage(&self.engine, deferred).await?,
                true,
            ),
            Err(error) => return Err(error),
        };
        let rest = match (complete, events.last()) {
            (false, Some(last)) => Some(Span {
                from_version: last.version + 1,
                from_position: last.position + 1,
                ..deferred.span
            }),
            _ => None,
        };
        let sub = &deferred.sub;
        let mut reread = VecDeque::new();
        for record in events {
            if record.position > deferred.span.upto {
                break;
            }
            // The dispatcher's choice, made again: its types, or an unregistered type of
            // its aggregate type that it dead-letters.
            let for_sub = sub.event_types.contains(&&*record.event_type)
                || (sub.unknown == UnknownEventPolicy::DeadLetter
                    && *record.aggregate_type == *sub.aggregate_type
                    && registry().get(&record.event_type).is_none());
            let partition = if sub.segments > 1 {
                partition_of(&record)
            } else {
                0
            };
            let key = (sub.index, sub.segment_of(partition));
            if !for_sub || !self.engine.lock_tracker().is_open(key, record.position) {
                continue;
            }
            let mut event = BusEvent::new(EventSource::Stored(Arc::new(record))).without_room();
            event.partition = partition;
            event.remaining = None;
            let mut pending = Pending::new(event, Arc::clone(sub));
            pending.hold = Hold::Reread;
            pending.epoch = deferred.span.epoch;
            reread.push_back(pending);
        }
        let found = reread.len() as u64;
        let count = deferred.span.count;
        if let Some(mut span) = rest {
            // The rest waits for the next page; its count is what this page did not bring
            // back (a rewound range may bring back more than it counted: settled as below).
            if found > count {
                self.engine.room.wait_outside(found - count);
            }
            span.count = count.saturating_sub(found);
            let rest = Deferred {
                sub: Arc::clone(sub),
                stream: deferred.stream.clone(),
                span,
            };
            return Ok((reread, Some(rest)));
        }
        if found != count {
            // Counted as waiting when they left; settle the count with what came back (a
            // subscription that left finds none: the tracker dropped its positions).
            if sub.active.load(Ordering::Acquire) && !(deferred.span.rewound && found < count) {
                tracing::error!(
                    expected = count,
                    found,
                    "deferred deliveries read again do not match"
                );
            }
            if found > count {
                self.engine.room.wait_outside(found - count);
            } else {
                self.finished.waited_done += count - found;
            }
        }
        Ok((reread, None))
    }

    /// A retry is due: the lane's first delivery is attempted again.
    async fn resume(&mut self, key: Key, at: Instant) {
        if self
            .lanes
            .get(&key)
            .is_none_or(|lane| lane.waiting_until != Some(at))
        {
            // Stale: the lane was woken earlier, and runs or waits for another timer.
            return;
        }
        let Some(mut lane) = self.lanes.remove(&key) else {
            return;
        };
        lane.waiting_until = None;
        let waits_to_reread = lane.head.is_none();
        self.in_hand = Some(InHand { key, lane });
        if waits_to_reread {
            self.carry_on_from(Step::Done).await;
        } else {
            self.carry_on().await;
        }
    }

    /// Segments stopped running here: the lanes whose head waits for a retry in one of
    /// them are due now (their head is dropped at its next step), so a segment being
    /// given up does not wait for the retry delays of its failed deliveries.
    fn wake_stopped(&mut self) {
        let now = Instant::now();
        for (key, lane) in &mut self.lanes {
            let due_later = lane.waiting_until.is_some_and(|at| at > now);
            if due_later && lane.head.as_ref().is_some_and(|head| !head.runs()) {
                lane.waiting_until = Some(now);
                self.timers.push(Reverse((now, *key)));
            }
        }
    }

    /// An attempt that ran on in `running` is over.
    async fn attempt_over(&mut self, key: Key, outcome: Outcome) {
        let Some(lane) = self.lanes.remove(&key) else {
            return;
        };
        self.in_hand = Some(InHand { key, lane });
        let step = self.after(outcome).await;
        self.carry_on_from(step).await;
    }

    /// Moves the lane in hand on until it has to wait, or is empty.
    async fn carry_on(&mut self) {
        let step = self.step().await;
        self.carry_on_from(step).await;
    }

    async fn carry_on_from(&mut self, mut step: Step) {
        loop {
            let Some(hand) = self.in_hand.as_mut() else {
                return;
            };
            let (pending, wait_until) = match step {
                Step::Done => {
                    if let Some(next) = hand.lane.behind.pop_front() {
                        hand.lane.head = Some(next);
                        step = self.step().await;
                        continue;
                    }
                    let Some(deferred) = hand.lane.deferred.take() else {
                        self.in_hand = None;
                        return;
                    };
                    match self.reread(&deferred).await {
                        Ok((reread, rest)) => {
                            if let Some(hand) = self.in_hand.as_mut() {
                                hand.lane.behind = reread;
                                // Nothing joins a lane in hand (the worker awaited the
                                // read); were something there, it would come after the rest.
                                debug_assert!(hand.lane.deferred.is_none());
                                hand.lane.deferred = match (rest, hand.lane.deferred.take()) {
                                    (Some(mut rest), Some(later)) => {
                                        rest.span.join(&later.span);
                                        Some(rest)
                                    }
                                    (rest, later) => rest.or(later),
                                };
                            }
                            continue;
                        }
                        Err(error) => {
                            tracing::error!(%error, "cannot read deferred deliveries again; trying again in a second");
                            if let Some(hand) = self.in_hand.as_mut() {
                                hand.lane.deferred = Some(deferred);
                            }
                            (
                                None,
                                Some(Instant::now() + std::time::Duration::from_secs(1)),
                            )
                        }
                    }
                }
                Step::Running(pending, attempt) => {
                    let key = hand.key;
                    self.running.push(key, attempt);
                    (Some(pending), None)
                }
                Step::Wait(pending, at) => (Some(pending), Some(at)),
            };
            let Some(InHand { key, mut lane }) = self.in_hand.take() else {
                return;
            };
            lane.head = pending;
            if let Some(at) = wait_until {
                self.timers.push(Reverse((at, key)));
                self.defer_kept(&mut lane);
            }
            lane.waiting_until = wait_until;
            self.lanes.insert(key, lane);
            return;
        }
    }

    /// The delivery in hand.
    fn held(&mut self) -> &mut Pending {
        self.in_hand
            .as_mut()
            .and_then(|h| h.lane.head.as_mut())
            .expect("a delivery in hand")
    }

    /// Takes the delivery in hand out of the worker's keeping.
    fn take_held(&mut self) -> Pending {
        self.in_hand
            .as_mut()
            .and_then(|h| h.lane.head.take())
            .expect("a delivery in hand")
    }

    /// One move of the delivery in hand: an attempt (or the dead letter it is left with).
    /// The delivery stays in hand while user code runs, so a panic loses nothing.
    async fn step(&mut self) -> Step {
        let held = self.held();
        // A subscription that left, or a segment whose lease this bus lost (the new owner
        // delivers from its saved checkpoint): dropped here.
        if !held.sub.active.load(Ordering::Acquire) || !held.runs() {
            let pending = self.take_held();
            self.finish_as(&pending, false);
            return Step::Done;
        }
        if held.give_up {
            return self.dead_letter().await;
        }
        if self.finished.events > 0 && self.engine.room.available() < ROOM_CHUNK {
            // The queue is nearly full: report the room these deliveries hold now, since
            // a handler (this one, say) may be waiting to publish into it.
            self.report_finished();
        }
        let bus = self.engine.id();
        let held = self.held();
        let attempt = deliver::begin(
            bus,
            &held.sub,
            &held.event.source,
            held.failures + 1,
            held.epoch,
        );
        match deliver::poll_once(attempt).await {
            Ok(outcome) => self.after(outcome).await,
            Err(attempt) => Step::Running(self.take_held(), attempt),
        }
    }

    /// Counts the outcome of the attempt in hand and decides what comes next: done, a
    /// retry, or the dead letter.
    async fn after(&mut self, outcome: Outcome) -> Step {
        let engine = Arc::clone(&self.engine);
        let failure = match outcome.result {
            Ok(()) => {
                let pending = self.take_held();
                deliver::delivered(&engine, &pending.sub, outcome.elapsed);
                self.finish(&pending);
                return Step::Done;
            }
            Err(failure) => failure,
        };
        let held = self.held();
        let (sub, event, attempt) = (Arc::clone(&held.sub), held.event.clone(), held.failures + 1);
        let (failure, failed_at) = deliver::failed(
            &engine,
            &sub,
            event.record(),
            attempt,
            failure,
            outcome.elapsed,
        )
        .await;
        let held = self.held();
        held.failures = attempt;
        held.first_failed_at.get_or_insert(failed_at);
        held.last_error = failure.message;
        if !held.runs() {
            // Its segment stopped running here while the attempt ran (lost, or given up):
            // the next owner delivers it from the saved checkpoint, so it neither waits for
            // a retry (which would hold a hand-over up) nor becomes a dead letter here.
            let pending = self.take_held();
            self.finish_as(&pending, false);
            return Step::Done;
        }
        if failure.retryable && attempt < sub.retry.max_attempts() {
            Counters::add(&sub.counters.retried, 1);
            sub.metrics.retries.increment(1);
            Counters::add(&engine.counters.retried, 1);
            let delay = sub.retry.delay(attempt, self.jitter.next());
            return Step::Wait(self.take_held(), Instant::now() + delay);
        }
        held.give_up = true;
        self.dead_letter().await
    }

    /// Stores the dead letter of the delivery in hand, then counts it as finished. If the
    /// store refuses, the delivery waits and the write is tried again later: a checkpoint
    /// never passes an event whose dead letter is not stored.
    async fn dead_letter(&mut self) -> Step {
        let engine = Arc::clone(&self.engine);
        let held = self.held();
        let (sub, event) = (Arc::clone(&held.sub), held.event.clone());
        let error = held.last_error.clone();
        let give_up = GiveUp {
            attempts: held.failures,
            first_failed_at: held.first_failed_at,
            error: &error,
        };
        match deliver::dead_letter(&engine, &sub, &event.source, give_up).await {
            Ok(()) => {
                let pending = self.take_held();
                self.finish(&pending);
                Step::Done
            }
            Err(error) => {
                tracing::error!(%error, "cannot store a dead letter; trying again in a second");
                Step::Wait(
                    self.take_held(),
                    Instant::now() + std::time::Duration::from_secs(1),
                )
            }
        }
    }

    /// After a panic escaped the worker loop: the delivery in hand counts as a failed
    /// attempt (with the panic as its error), and its lane waits for the retry; the job
    /// in hand goes on from its next subscription.
    fn recover(&mut self, message: &str) {
        self.fresh_to_lane();
        let Some(InHand { key, mut lane }) = self.in_hand.take() else {
            return;
        };
        let at = match lane.head.as_mut() {
            Some(pending) => {
                pending.failures += 1;
                pending.first_failed_at.get_or_insert_with(Utc::now);
                pending.last_error = format!("the bus worker panicked: {message}");
                if pending.failures < pending.sub.retry.max_attempts() {
                    Instant::now()
                        + pending
                            .sub
                            .retry
                            .delay(pending.failures, self.jitter.next())
                } else {
                    pending.give_up = true;
                    Instant::now() + std::time::Duration::from_secs(1)
                }
            }
            // Lost between its task and the lane: the lane goes on behind it.
            None => {
                lane.head = lane.behind.pop_front();
                Instant::now()
            }
        };
        if lane.head.is_none() && lane.deferred.is_none() {
            return;
        }
        self.timers.push(Reverse((at, key)));
        lane.waiting_until = Some(at);
        self.lanes.insert(key, lane);
    }

    /// One delivery of `event` is finished (handled, dead-lettered or dropped because its
    /// subscription left); reported with the others by [`report_finished`](Self::report_finished).
    fn finish(&mut self, pending: &Pending) {
        self.finish_as(pending, true);
    }

    /// [`finish`](Self::finish), saying whether the delivery was handled (or
    /// dead-lettered) or dropped before it started.
    fn finish_as(&mut self, pending: &Pending, handled: bool) {
        let (event, sub) = (&pending.event, &pending.sub);
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
            let key = (sub.index, sub.segment_of(event.partition));
            finished.positions.push((
                key,
                pending.epoch.unwrap_or(0),
                event.record().position,
                handled,
            ));
        }
        if pending.hold != Hold::Queue {
            // Its event left the queue when it began to wait.
            finished.waited_done += 1;
            if pending.hold == Hold::Parked {
                sub.parked.fetch_sub(1, Ordering::Relaxed);
            }
            if let EventSource::Published(published) = &event.source {
                finished.published.push(Arc::clone(published));
            }
            return;
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
            for (key, epoch, position, handled) in finished.positions.drain(..) {
                if handled {
                    advanced |= tracker.complete(key, epoch, position);
                } else {
                    tracker.dropped(key, epoch, position);
                }
            }
            let drained = tracker.take_drained();
            drop(tracker);
            if advanced {
                engine.checkpoints_dirty.notify_one();
            }
            if drained {
                engine.keeper_wake.notify_one();
            }
        }
        if !finished.published.is_empty() {
            engine.hand_back(&mut finished.published);
        }
        // Waiting deliveries are counted before their events' slots come back, so the
        // bus never looks idle in between.
        if finished.waiting > 0 {
            engine
                .room
                .wait_outside(std::mem::take(&mut finished.waiting));
        }
        if finished.events > 0 {
            let room = std::mem::take(&mut finished.room);
            engine.events_done(std::mem::take(&mut finished.events), room);
        }
        if finished.waited_done > 0 {
            engine.waited_done(std::mem::take(&mut finished.waited_done));
        }
    }
}

/// Catches a panic of the worker loop, so the worker can go on.
struct CatchPanic<F>(std::pin::Pin<Box<F>>);

impl<F: std::future::Future<Output = ()>> std::future::Future for CatchPanic<F> {
    type Output = std::result::Result<(), Box<dyn std::any::Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let inner = &mut self.0;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(poll) => poll.map(Ok),
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
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
    use super::Span;

    /// A lane's span after deliveries at (version, position), the first starting it.
    fn span_of(deliveries: &[(u64, u64)], epoch: Option<u64>) -> Span {
        let (version, position) = deliveries[0];
        let mut span = Span::starting(version, position, epoch);
        for &(version, position) in deliveries {
            span.take(version, position, epoch);
        }
        span
    }

    #[test]
    fn a_span_grows_with_the_deliveries_of_its_stream() {
        let span = span_of(&[(3, 10), (4, 12), (5, 20)], Some(1));
        assert_eq!(
            (span.from_version, span.from_position, span.upto, span.count),
            (3, 10, 20, 3)
        );
    }

    /// Deliveries that waited in memory behind a lane whose head then waits for a retry
    /// join the deferred range that began after them.
    #[test]
    fn a_span_joins_the_later_span_of_its_stream() {
        let mut kept = span_of(&[(2, 10), (3, 20)], Some(1));
        kept.join(&span_of(&[(4, 30), (5, 40)], Some(1)));
        assert_eq!(
            (kept.from_version, kept.from_position, kept.upto, kept.count),
            (2, 10, 40, 4)
        );
        // A later span reaching below its end (routed again after a claim) widens it.
        let mut kept = span_of(&[(2, 10), (3, 20)], Some(1));
        kept.join(&span_of(&[(1, 5), (4, 30)], Some(2)));
        assert!(kept.rewound);
        assert_eq!(
            (kept.from_position, kept.upto, kept.count, kept.epoch),
            (5, 30, 4, Some(2))
        );
    }

    /// The kill tests' stall at 19,999 of 20,000: the segment was lost and claimed again
    /// by this bus, whose dispatcher routed the lane's positions again from the saved
    /// checkpoint, below and inside the span. The span must only widen: had its end moved
    /// down to the re-routed position, the deliveries above it would never be read again,
    /// and the segment's checkpoint would wait for them forever.
    #[test]
    fn a_delivery_routed_again_below_or_inside_a_span_only_widens_it() {
        let mut span = span_of(&[(5, 20), (6, 25), (7, 30)], Some(1));
        // Claimed again (epoch 2) from an older checkpoint: 15 (below) comes again first.
        span.take(4, 15, Some(2));
        assert_eq!((span.from_version, span.from_position), (4, 15));
        assert_eq!(span.upto, 30, "the end stays where it was");
        assert!(span.rewound);
        // Then 20 and 25, inside it: nothing moves.
        span.take(5, 20, Some(2));
        span.take(6, 25, Some(2));
        assert_eq!(
            (span.from_version, span.from_position, span.upto),
            (4, 15, 30)
        );
        assert_eq!(span.epoch, Some(2), "read again under the latest hold");
        assert_eq!(
            span.count, 6,
            "every delivery counted, those routed twice too"
        );
        // And past the old end: it widens up.
        span.take(8, 31, Some(2));
        assert_eq!((span.from_position, span.upto), (15, 31));
        // A delivery of the earlier hold coming late leaves the epoch at the later one.
        span.take(8, 31, Some(1));
        assert_eq!(span.epoch, Some(2));
    }
}
