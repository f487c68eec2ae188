//! The workers: each runs the deliveries of the aggregates routed to it.
//!
//! Deliveries wait for each other only within a *lane*: one subscription and one
//! aggregate. A lane is busy while its first delivery runs (a handler that did not
//! finish at once keeps running beside the others) or waits for a retry; later
//! deliveries of the lane wait behind it, and every other lane goes on. So a slow, stuck
//! or retrying handler holds back only the later events of its own aggregate for its own
//! subscription.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::config::Jitter;
use super::deliver::{self, Attempt, GiveUp, Outcome};
use super::engine::Engine;
use super::handler::{EventSource, PublishedEvent, panic_message};
use super::inbox::Inbox;
use super::room::ROOM_CHUNK;
use super::routing::{BusEvent, Job, Sub};
use super::stats::Counters;

/// A lane: (subscription index, aggregate hash).
type Key = (usize, u64);

/// A delivery of one event to one subscription, with what its failures so far left.
struct Pending {
    event: BusEvent,
    sub: Arc<Sub>,
    failures: u32,
    first_failed_at: Option<DateTime<Utc>>,
    last_error: String,
    /// The last attempt was made; only the dead letter is left to store.
    give_up: bool,
}

impl Pending {
    fn new(event: BusEvent, sub: Arc<Sub>) -> Self {
        Pending {
            event,
            sub,
            failures: 0,
            first_failed_at: None,
            last_error: String::new(),
            give_up: false,
        }
    }
}

/// A busy lane: its first delivery, running or waiting for its next attempt, and the
/// deliveries behind it.
struct Lane {
    head: Pending,
    behind: VecDeque<Pending>,
}

/// Where a lane's first delivery is after a move.
enum Step {
    /// Finished: handled, dead-lettered, or dropped because its subscription left.
    Done,
    /// Its handler did not finish at once: it runs on as its own task.
    Running(Pending, Attempt),
    /// Waits until then for its next attempt (or for its dead letter to be stored).
    Wait(Pending, Instant),
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

/// The lane a worker is carrying on inline, kept in the worker (not on the stack of the
/// future) so a panic there loses nothing.
struct InHand {
    key: Key,
    /// The delivery being moved, while it is.
    head: Option<Pending>,
    behind: VecDeque<Pending>,
}

pub(crate) struct Worker {
    engine: Arc<Engine>,
    inbox: Arc<Inbox>,
    /// The busy lanes, but the one in hand.
    lanes: HashMap<Key, Lane>,
    timers: BinaryHeap<Reverse<(Instant, Key)>>,
    /// Attempts that did not finish at once.
    running: JoinSet<(Key, Outcome)>,
    /// Jobs taken from the inbox and not yet offered to their lanes.
    jobs: VecDeque<Job>,
    /// The job whose deliveries are being offered, and how many of them were.
    job_in_hand: Option<(Job, usize)>,
    in_hand: Option<InHand>,
    open: bool,
    jitter: Jitter,
    finished: Finished,
}

impl Worker {
    pub(crate) fn new(engine: Arc<Engine>, inbox: Arc<Inbox>, n: u64) -> Self {
        let jitter = Jitter::new(engine.seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        Worker {
            engine,
            inbox,
            lanes: HashMap::new(),
            timers: BinaryHeap::new(),
            running: JoinSet::new(),
            jobs: VecDeque::new(),
            job_in_hand: None,
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
                    self.recover(&message);
                }
            }
        }
    }

    async fn serve(&mut self) {
        let inbox = Arc::clone(&self.inbox);
        loop {
            self.offer_jobs().await;
            self.report_finished();
            let next_timer = self.timers.peek().map(|Reverse((at, _))| *at);
            if !self.open && next_timer.is_none() && self.running.is_empty() {
                return;
            }
            tokio::select! {
                biased;
                _ = sleep_until(next_timer), if next_timer.is_some() => {
                    if let Some(Reverse((_, key))) = self.timers.pop() {
                        self.resume(key).await;
                    }
                }
                Some(done) = self.running.join_next(), if !self.running.is_empty() => {
                    match done {
                        Ok((key, outcome)) => self.attempt_over(key, outcome).await,
                        // Attempts catch their panics; a task only fails when aborted.
                        Err(error) => tracing::error!(%error, "a delivery task failed"),
                    }
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
            let pending = Pending::new(job.event.clone(), sub);
            self.job_in_hand = Some((job, offered + 1));
            self.offer(key, pending).await;
        }
    }

    /// A new delivery: behind its lane if the lane is busy, else attempted now.
    async fn offer(&mut self, key: Key, pending: Pending) {
        if let Some(lane) = self.busy_lane(key) {
            lane.behind.push_back(pending);
            return;
        }
        self.in_hand = Some(InHand {
            key,
            head: Some(pending),
            behind: VecDeque::new(),
        });
        self.carry_on().await;
    }

    /// The busy lane of `key`, if any (skips hashing when no lane is busy).
    fn busy_lane(&mut self, key: Key) -> Option<&mut Lane> {
        if self.lanes.is_empty() {
            None
        } else {
            self.lanes.get_mut(&key)
        }
    }

    /// A retry is due: the lane's first delivery is attempted again.
    async fn resume(&mut self, key: Key) {
        let Some(lane) = self.lanes.remove(&key) else {
            return;
        };
        self.in_hand = Some(InHand {
            key,
            head: Some(lane.head),
            behind: lane.behind,
        });
        self.carry_on().await;
    }

    /// An attempt that ran as its own task is over.
    async fn attempt_over(&mut self, key: Key, outcome: Outcome) {
        let Some(lane) = self.lanes.remove(&key) else {
            return;
        };
        self.in_hand = Some(InHand {
            key,
            head: Some(lane.head),
            behind: lane.behind,
        });
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
            match step {
                Step::Done => match hand.behind.pop_front() {
                    Some(next) => {
                        hand.head = Some(next);
                        step = self.step().await;
                    }
                    None => {
                        self.in_hand = None;
                        return;
                    }
                },
                Step::Running(pending, attempt) => {
                    let key = hand.key;
                    let behind = std::mem::take(&mut hand.behind);
                    self.in_hand = None;
                    self.running.spawn(async move { (key, attempt.await) });
                    self.lanes.insert(
                        key,
                        Lane {
                            head: pending,
                            behind,
                        },
                    );
                    return;
                }
                Step::Wait(pending, at) => {
                    let key = hand.key;
                    let behind = std::mem::take(&mut hand.behind);
                    self.in_hand = None;
                    self.timers.push(Reverse((at, key)));
                    self.lanes.insert(
                        key,
                        Lane {
                            head: pending,
                            behind,
                        },
                    );
                    return;
                }
            }
        }
    }

    /// The delivery in hand.
    fn held(&mut self) -> &mut Pending {
        self.in_hand
            .as_mut()
            .and_then(|h| h.head.as_mut())
            .expect("a delivery in hand")
    }

    /// Takes the delivery in hand out of the worker's keeping.
    fn take_held(&mut self) -> Pending {
        self.in_hand
            .as_mut()
            .and_then(|h| h.head.take())
            .expect("a delivery in hand")
    }

    /// One move of the delivery in hand: an attempt (or the dead letter it is left with).
    /// The delivery stays in hand while user code runs, so a panic loses nothing.
    async fn step(&mut self) -> Step {
        let held = self.held();
        if !held.sub.active.load(Ordering::Acquire) {
            let pending = self.take_held();
            self.finish(&pending.event, &pending.sub);
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
        let attempt = deliver::begin(bus, &held.sub, &held.event.source, held.failures + 1);
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
                self.finish(&pending.event, &pending.sub);
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
        if failure.retryable && attempt < sub.retry.max_attempts() {
            Counters::add(&sub.counters.retried, 1);
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
                self.finish(&pending.event, &pending.sub);
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
        let Some(hand) = self.in_hand.take() else {
            return;
        };
        let Some(mut pending) = hand.head else {
            // The attempt's outcome was lost between its task and the lane: the lane
            // starts again from the delivery behind it.
            if !hand.behind.is_empty() {
                let mut behind = hand.behind;
                if let Some(head) = behind.pop_front() {
                    self.timers.push(Reverse((Instant::now(), hand.key)));
                    self.lanes.insert(hand.key, Lane { head, behind });
                }
            }
            return;
        };
        pending.failures += 1;
        pending.first_failed_at.get_or_insert_with(Utc::now);
        pending.last_error = format!("the bus worker panicked: {message}");
        let delay = if pending.failures < pending.sub.retry.max_attempts() {
            pending
                .sub
                .retry
                .delay(pending.failures, self.jitter.next())
        } else {
            pending.give_up = true;
            std::time::Duration::from_secs(1)
        };
        self.timers
            .push(Reverse((Instant::now() + delay, hand.key)));
        self.lanes.insert(
            hand.key,
            Lane {
                head: pending,
                behind: hand.behind,
            },
        );
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
