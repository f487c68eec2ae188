//! The workers' queues, and the router that fills them: every event of one aggregate
//! goes to the same worker, in order.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::engine::Engine;
use super::routing::{BusEvent, Job, Routing, Sub};

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
    /// The worker is to make a round of its loop even without jobs (see
    /// [`Inbox::poke`]).
    poked: bool,
}

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

    pub(crate) fn push(&self, job: Job) {
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

    /// Makes the worker's next (or current) wait for jobs return, with or without jobs,
    /// so it makes a round of its loop and sees what changed (segments stopped).
    pub(crate) fn poke(&self) {
        self.lock().poked = true;
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Waits for jobs and moves up to [`TAKE_AT_MOST`] of them into `into` (which must be
    /// empty; when all fit, the buffers are swapped), or for a [`poke`](Self::poke) (then
    /// perhaps with none); false once closed and drained.
    pub(crate) async fn take(&self, into: &mut VecDeque<Job>) -> bool {
        loop {
            {
                let mut state = self.lock();
                let poked = std::mem::take(&mut state.poked);
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
                if poked {
                    return true;
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

    pub(crate) fn push(&mut self, event: BusEvent, subs: Arc<[Arc<Sub>]>) {
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
pub(crate) fn admit(engine: &Engine, event: &mut BusEvent, subs: &[Arc<Sub>]) -> bool {
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
