//! Projections that keep their read model in the store's own database and move their
//! checkpoint in the same transaction: exactly once for that database.
//!
//! A bus subscription is at-least-once: its handler runs, then its checkpoint is saved, and
//! a crash between the two runs the handler again. When the read model lives in the same
//! database as the events, there is no "between": the projection writes through the very
//! transaction that moves its checkpoint, so either both are stored or neither is. Each
//! backend offers it with a trait of its own, since the projection writes with that
//! database's driver: `eventfold::sqlite::SqliteProjection` and
//! `eventfold::postgres::PostgresProjection`. What they share is here: the
//! [options](ProjectionOptions), the [progress](ProjectionProgress), the
//! [handle](ProjectionHandle) of a running projection, and the runner's loop, which a
//! backend drives through [`ProjectionBackend`].
//!
//! # What a projection receives, and what it does with failures
//!
//! - Events in log order, one batch ([`ProjectionOptions::batch_size`]) per transaction.
//!   Events of the types its event type registers are decoded and applied; events of types
//!   other code registers are passed over; an event of its aggregate type that no code
//!   registers is dead-lettered (or passed over, see [`ProjectionOptions::unknown_events`]);
//!   a payload that does not decode and a stored row that is damaged are dead-lettered at
//!   once. Dead letters go to the store's dead letters under the projection's name, in the
//!   same transaction as the checkpoint that passes them.
//! - When applying an event fails (an error, a panic), the batch is rolled back, the
//!   events before the failing one are applied again and committed, and the failing event is
//!   tried again after the [`RetryPolicy`]'s nominal delays (one runner has no one to fall
//!   into lockstep with); after its last attempt it is dead-lettered and the projection
//!   goes on.
//! - When the store fails (a full disk, a lock held too long, a lost connection), nothing
//!   is applied; the runner tries again after [`ProjectionOptions::store_retry`], and
//!   [`ProjectionProgress::last_error`] says why it waits until a batch commits.
//! - The checkpoint is one of the store's checkpoints, under the projection's name (so the
//!   store's statistics show its lag): give it a name no bus subscription uses.
//! - Two runners of one projection (two processes) never apply an event twice: each reads
//!   the checkpoint inside its write transaction, locked until it commits.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::bus::{RetryPolicy, StartFrom, UnknownEventPolicy};
use crate::error::{BoxError, Error, Result, StoreErrorKind, error_chain};
use crate::event::DomainEvent;
use crate::record::{NewDeadLetter, RecordedEvent};
use crate::registry::{EventRegistration, registry};
use crate::store::EventLog;

/// How a projection runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionOptions {
    /// Events per transaction, at most (default 256).
    pub batch_size: usize,
    /// Attempts of a failing event and the delays between them (default
    /// [`RetryPolicy::default()`]: three attempts).
    pub retry: RetryPolicy,
    /// Where a projection without a checkpoint starts (default: the first event).
    pub start_from: StartFrom,
    /// What to do with an event of the projection's aggregate type that no code registers
    /// (default: dead-letter it).
    pub unknown_events: UnknownEventPolicy,
    /// How long to wait before trying again after the store failed (default 500 ms).
    pub store_retry: Duration,
    /// How long one event may take to apply before the attempt counts as failed and its
    /// batch is rolled back (default 30 s). Backends whose projections run synchronously
    /// (SQLite's, on a blocking thread) cannot interrupt them and ignore it.
    pub apply_timeout: Duration,
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        ProjectionOptions {
            batch_size: 256,
            retry: RetryPolicy::default(),
            start_from: StartFrom::Beginning,
            unknown_events: UnknownEventPolicy::DeadLetter,
            store_retry: Duration::from_millis(500),
            apply_timeout: Duration::from_secs(30),
        }
    }
}

impl ProjectionOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`batch_size`](Self::batch_size) (1 or more).
    pub fn batch_size(mut self, events: usize) -> Self {
        self.batch_size = events;
        self
    }

    /// Sets [`retry`](Self::retry).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Sets [`start_from`](Self::start_from).
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Sets [`unknown_events`](Self::unknown_events).
    pub fn unknown_events(mut self, policy: UnknownEventPolicy) -> Self {
        self.unknown_events = policy;
        self
    }

    /// Sets [`store_retry`](Self::store_retry).
    pub fn store_retry(mut self, delay: Duration) -> Self {
        self.store_retry = delay;
        self
    }

    /// Sets [`apply_timeout`](Self::apply_timeout) (more than zero).
    pub fn apply_timeout(mut self, timeout: Duration) -> Self {
        self.apply_timeout = timeout;
        self
    }

    /// Checks the settings, and the projection's name; for backends, before they start.
    pub fn validate(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::InvalidSubscriptionName {
                name: name.to_owned(),
                reason: "a projection needs a name to store its checkpoint under".to_owned(),
            });
        }
        if self.batch_size == 0 {
            return Err(Error::InvalidSetting {
                setting: "batch_size",
                reason: "a projection applies at least one event per transaction".to_owned(),
            });
        }
        if self.apply_timeout.is_zero() {
            return Err(Error::InvalidSetting {
                setting: "apply_timeout",
                reason: "an event needs some time to apply".to_owned(),
            });
        }
        Ok(())
    }
}

/// Where a projection is, as its runner last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ProjectionProgress {
    /// Every event up to this position is applied, dead-lettered or passed over.
    pub checkpoint: u64,
    /// The head of the log when the runner last looked.
    pub head: u64,
    /// Events applied by this runner (a rebuild counts again).
    pub applied: u64,
    /// Events this runner dead-lettered.
    pub dead_lettered: u64,
    /// Events this runner passed over (other types, or unknown ones it was told to skip).
    pub skipped: u64,
    /// True from a [rebuild](ProjectionHandle::rebuild) until the projection has caught up
    /// with the head again.
    pub rebuilding: bool,
    /// Why the runner is waiting to try again, if the store failed; cleared by the next
    /// batch that commits.
    pub last_error: Option<String>,
}

impl ProjectionProgress {
    /// Events still to go through: the head minus the checkpoint (a rebuild's "to do";
    /// its "done" is the checkpoint).
    pub fn remaining(&self) -> u64 {
        self.head.saturating_sub(self.checkpoint)
    }
}

/// A running projection. Dropping it stops the runner after its current batch.
pub struct ProjectionHandle<P> {
    name: String,
    log: Arc<dyn EventLog>,
    progress: watch::Receiver<ProjectionProgress>,
    requests: mpsc::Sender<Request>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<P>>>,
}

impl<P> std::fmt::Debug for ProjectionHandle<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("name", &self.name)
            .field("progress", &*self.progress.borrow())
            .finish_non_exhaustive()
    }
}

enum Request {
    Rebuild(oneshot::Sender<Result<()>>),
}

impl<P: Send + 'static> ProjectionHandle<P> {
    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it is now.
    pub fn progress(&self) -> ProjectionProgress {
        self.progress.borrow().clone()
    }

    /// Follows its progress: a rebuild's events done and to do, say.
    pub fn watch_progress(&self) -> watch::Receiver<ProjectionProgress> {
        self.progress.clone()
    }

    /// Waits until every event stored when it is called (the head as the store reports it,
    /// other processes' appends included) is applied, dead-lettered or passed over. Fails
    /// if the runner has stopped.
    pub async fn wait_idle(&self) -> Result<()> {
        let head = self.log.head_position().await?;
        let mut progress = self.progress.clone();
        let done = progress
            .wait_for(|p| p.checkpoint >= head && !p.rebuilding)
            .await
            .is_ok();
        if done { Ok(()) } else { Err(self.ended()) }
    }

    /// Clears the read model, the projection's dead letters and its checkpoint in one
    /// transaction, then replays the whole log into it; returns once the clear is
    /// committed. [`watch_progress`](Self::watch_progress) follows the replay
    /// (`rebuilding`; `checkpoint` done of `head`).
    pub async fn rebuild(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        if self.requests.send(Request::Rebuild(reply)).await.is_err() {
            return Err(self.ended());
        }
        answer.await.map_err(|_| self.ended())?
    }

    /// Stops the runner after its current batch and gives the projection back; the error
    /// that stopped it, if one did.
    pub async fn stop(mut self) -> Result<P> {
        let _ = self.stop.send(true);
        let Some(task) = self.task.take() else {
            return Err(self.ended());
        };
        task.await
            .map_err(|e| panicked("running the projection", e))?
    }

    fn ended(&self) -> Error {
        Error::Store {
            kind: StoreErrorKind::Closed,
            message: format!(
                "the projection `{}` has stopped (its `stop` returns why)",
                self.name
            ),
            source: None,
        }
    }
}

impl<P> Drop for ProjectionHandle<P> {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn panicked(doing: &str, error: tokio::task::JoinError) -> Error {
    Error::Store {
        kind: StoreErrorKind::Other,
        message: format!("{doing}: the task panicked"),
        source: Some(Box::new(error)),
    }
}

/// What one batch of a projection did; for backends.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Committed, up to `checkpoint`.
    Advanced {
        /// The checkpoint committed.
        checkpoint: u64,
        /// Events applied.
        applied: u64,
        /// Events dead-lettered.
        dead_lettered: u64,
        /// Events passed over.
        skipped: u64,
    },
    /// No event after the checkpoint.
    Idle {
        /// The checkpoint as stored.
        checkpoint: u64,
    },
    /// An event failed and its batch was rolled back: run the next batch after this delay
    /// (zero: at once, to commit the events before the failing one).
    Retry(Duration),
}

/// A store backend's side of a running projection: one transaction per call; for
/// backends.
#[async_trait]
pub trait ProjectionBackend: Send + 'static {
    /// The projection, handed back by [`ProjectionHandle::stop`].
    type Projection: Send + 'static;

    /// Runs one batch: in one transaction, reads the checkpoint (locking it), applies the
    /// events after it (see [`Failures::plan`] and [`classify`]), and commits them with the
    /// new checkpoint.
    async fn batch(&mut self) -> Result<Step>;

    /// In one transaction: clears the read model, the projection's dead letters and its
    /// checkpoint (set to 0).
    async fn rebuild(&mut self) -> Result<()>;

    /// Gives the projection back.
    fn into_projection(self) -> Self::Projection;
}

/// Starts the runner of a projection whose `setup` the backend has run; for backends.
/// `checkpoint` is where it stands, `log` the store (for its head).
pub fn spawn<B: ProjectionBackend>(
    name: String,
    backend: B,
    log: Arc<dyn EventLog>,
    checkpoint: u64,
    options: &ProjectionOptions,
) -> ProjectionHandle<B::Projection> {
    let head = log.watch_head();
    let (progress_tx, progress) = watch::channel(ProjectionProgress {
        checkpoint,
        head: *head.borrow(),
        ..ProjectionProgress::default()
    });
    let (requests, requests_rx) = mpsc::channel(8);
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(drive(
        name.clone(),
        backend,
        head,
        progress_tx,
        requests_rx,
        stop_rx,
        options.store_retry,
    ));
    ProjectionHandle {
        name,
        log,
        progress,
        requests,
        stop,
        task: Some(task),
    }
}

/// The runner's loop: batches while there is work; waits for the head, a retry's delay, a
/// request or the stop.
async fn drive<B: ProjectionBackend>(
    name: String,
    mut backend: B,
    mut head: watch::Receiver<u64>,
    progress: watch::Sender<ProjectionProgress>,
    mut requests: mpsc::Receiver<Request>,
    mut stop: watch::Receiver<bool>,
    store_retry: Duration,
) -> Result<B::Projection> {
    let mut idle = false;
    loop {
        if *stop.borrow() {
            break;
        }
        while let Ok(request) = requests.try_recv() {
            serve(&mut backend, request, &progress).await;
            idle = false;
        }
        if idle {
            // Caught up: wait for an append. The head was marked seen just before the batch
            // that found nothing, so an append made since (even while that batch read)
            // wakes it at once; marking it seen here instead would sleep through it.
            tokio::select! {
                changed = head.changed() => if changed.is_err() { break },
                request = requests.recv() => match request {
                    Some(request) => serve(&mut backend, request, &progress).await,
                    None => break,
                },
                _ = stop.changed() => break,
            }
            idle = false;
            continue;
        }
        let head_now = *head.borrow_and_update();
        let wait = match backend.batch().await {
            Ok(Step::Advanced {
                checkpoint,
                applied,
                dead_lettered,
                skipped,
            }) => {
                progress.send_modify(|p| {
                    p.checkpoint = checkpoint;
                    p.head = p.head.max(head_now).max(checkpoint);
                    p.applied += applied;
                    p.dead_lettered += dead_lettered;
                    p.skipped += skipped;
                    p.last_error = None;
                });
                None
            }
            Ok(Step::Idle { checkpoint }) => {
                idle = true;
                progress.send_modify(|p| {
                    p.checkpoint = checkpoint;
                    p.head = head_now.max(checkpoint);
                    p.last_error = None;
                    p.rebuilding = false;
                });
                None
            }
            Ok(Step::Retry(delay)) => Some(delay).filter(|d| !d.is_zero()),
            Err(error) => {
                let message = error_chain(&error);
                tracing::warn!(projection = %name, error = %message,
                    "a projection's batch failed; it tries again");
                progress.send_modify(|p| p.last_error = Some(message));
                Some(store_retry)
            }
        };
        if let Some(delay) = wait {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = stop.changed() => break,
            }
        }
    }
    Ok(backend.into_projection())
}

async fn serve<B: ProjectionBackend>(
    backend: &mut B,
    request: Request,
    progress: &watch::Sender<ProjectionProgress>,
) {
    match request {
        Request::Rebuild(reply) => {
            let result = backend.rebuild().await;
            if result.is_ok() {
                progress.send_modify(|p| {
                    p.checkpoint = 0;
                    p.rebuilding = true;
                });
            }
            let _ = reply.send(result);
        }
    }
}

/// The event that failed to apply, until it is applied or dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedEvent {
    /// Its position.
    pub position: u64,
    /// Attempts so far.
    pub attempts: u32,
    /// When the first failed.
    pub first_failed_at: DateTime<Utc>,
    /// The last error, as text.
    pub error: String,
}

/// What a batch is to do; see [`Failures::plan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Read and apply up to this many events after the checkpoint.
    Read(usize),
    /// Dead-letter this event, out of attempts and next after the checkpoint, and move the
    /// checkpoint to it.
    DeadLetter(FailedEvent),
}

/// A projection's failing event across batches; for backends.
#[derive(Debug, Default)]
pub struct Failures {
    failing: Option<FailedEvent>,
}

impl Failures {
    /// What the batch whose transaction read `checkpoint` does: the events up to the
    /// failing one, that one alone, or its dead letter once it is out of attempts.
    pub fn plan(&mut self, checkpoint: u64, options: &ProjectionOptions) -> Plan {
        // Another runner may have passed it.
        self.failing = self.failing.take().filter(|f| f.position > checkpoint);
        let batch = options.batch_size as u64;
        match &self.failing {
            Some(f) if f.position == checkpoint + 1 => {
                if f.attempts >= options.retry.max_attempts() {
                    Plan::DeadLetter(f.clone())
                } else {
                    Plan::Read(1)
                }
            }
            Some(f) => Plan::Read((f.position - checkpoint - 1).min(batch) as usize),
            None => Plan::Read(batch as usize),
        }
    }

    /// The event at `position` failed to apply and its batch was rolled back: counts the
    /// attempt and says when to run the next batch.
    pub fn failed(
        &mut self,
        position: u64,
        checkpoint: u64,
        error: String,
        options: &ProjectionOptions,
    ) -> Step {
        let (attempts, first_failed_at) = match &self.failing {
            Some(f) if f.position == position => (f.attempts.saturating_add(1), f.first_failed_at),
            _ => (1, Utc::now()),
        };
        self.failing = Some(FailedEvent {
            position,
            attempts,
            first_failed_at,
            error,
        });
        let at_head = position == checkpoint + 1;
        Step::Retry(if at_head && attempts < options.retry.max_attempts() {
            options.retry.nominal_delay(attempts)
        } else {
            Duration::ZERO
        })
    }

    /// A batch committed the checkpoint `checkpoint`.
    pub fn committed(&mut self, checkpoint: u64) {
        self.failing = self.failing.take().filter(|f| f.position > checkpoint);
    }

    /// Forgets the failing event (a rebuild starts over).
    pub fn clear(&mut self) {
        self.failing = None;
    }
}

/// What a projection does with one event it reads; see [`classify`].
#[derive(Debug)]
pub enum Action<E> {
    /// Apply the decoded event.
    Apply(E),
    /// Pass over it: another type's, or an unknown one the options skip.
    Skip,
    /// Dead-letter it with this error: an unknown type of the projection's aggregate, or a
    /// payload that does not decode.
    DeadLetter(Error),
}

/// The registrations of the few event types a projection decodes, so that each event
/// costs no registry lookup; one per runner, for [`classify`].
#[derive(Debug, Default)]
pub struct DecodeCache {
    registrations: Vec<&'static EventRegistration>,
}

/// Sorts a read event for a projection of `E`: see the [module docs](self).
pub fn classify<E: DomainEvent>(
    event: &RecordedEvent,
    unknown: UnknownEventPolicy,
    cache: &mut DecodeCache,
) -> Action<E> {
    if E::EVENT_TYPES.iter().any(|t| t.name == event.event_type) {
        let decoded = registry()
            .decode_cached::<E>(
                &mut cache.registrations,
                &event.event_type,
                event.schema_version,
                &event.payload,
            )
            .map_err(|e| e.at_event(event.event_id, event.position));
        return match decoded {
            Ok(decoded) => Action::Apply(decoded),
            Err(error) => Action::DeadLetter(error),
        };
    }
    if registry().get(&event.event_type).is_some() || event.aggregate_type != E::AGGREGATE_TYPE {
        return Action::Skip;
    }
    match unknown {
        UnknownEventPolicy::Skip => Action::Skip,
        UnknownEventPolicy::DeadLetter => Action::DeadLetter(Error::UnknownEventType {
            event_type: event.event_type.to_string(),
            event_id: Some(event.event_id),
            position: Some(event.position),
        }),
    }
}

/// The dead letter of a projection for an event (the nil id for a row too damaged to
/// read one), with one attempt now; for backends.
pub fn dead_letter(
    name: &str,
    event_id: Option<Uuid>,
    position: u64,
    event_type: &str,
    error: &Error,
) -> NewDeadLetter {
    let now = Utc::now();
    NewDeadLetter {
        subscription: name.to_owned(),
        event_id: event_id.unwrap_or(Uuid::nil()),
        position,
        event_type: event_type.to_owned(),
        error: error_chain(error),
        attempts: 1,
        first_failed_at: now,
        last_failed_at: now,
    }
}

/// The dead letter of a projection for an event it read whole (a decode error, an unknown
/// type), with one attempt now; for backends.
pub fn dead_letter_of(name: &str, event: &RecordedEvent, error: &Error) -> NewDeadLetter {
    dead_letter(
        name,
        Some(event.event_id),
        event.position,
        &event.event_type,
        error,
    )
}

/// The dead letter of a failed event that is out of attempts; for backends.
pub fn exhausted(
    name: &str,
    event_id: Uuid,
    event_type: &str,
    failed: &FailedEvent,
) -> NewDeadLetter {
    NewDeadLetter {
        subscription: name.to_owned(),
        event_id,
        position: failed.position,
        event_type: event_type.to_owned(),
        error: failed.error.clone(),
        attempts: failed.attempts,
        first_failed_at: failed.first_failed_at,
        last_failed_at: Utc::now(),
    }
}

/// The error of a projection's `setup` or `clear` that failed; for backends.
pub fn failed(name: &str, doing: &str, error: &BoxError) -> Error {
    Error::HandlerFailed {
        subscription: name.to_owned(),
        event_id: Uuid::nil(),
        message: format!("{doing} the projection failed: {}", error_chain(&**error)),
    }
}

/// Runs `f`, turning a panic into an error; for backends.
pub fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, BoxError>,
) -> std::result::Result<T, BoxError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| Err(panic_error(&*panic)))
}

/// Polls `future`, turning a panic into an error, and gives up after `timeout`; for
/// backends whose projections are async.
pub async fn guarded_async<T>(
    mut future: Pin<Box<dyn Future<Output = std::result::Result<T, BoxError>> + Send + '_>>,
    timeout: Duration,
) -> std::result::Result<T, BoxError> {
    let guarded = std::future::poll_fn(move |cx| {
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panic_error(&*panic))),
        }
    });
    match tokio::time::timeout(timeout, guarded).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {timeout:?}").into()),
    }
}

fn panic_error(panic: &(dyn std::any::Any + Send)) -> BoxError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned());
    format!("panicked: {message}").into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExpectedVersion, InMemoryEventStore, Metadata, NewEvent, StreamId};

    /// A projection over the in-memory store that counts the events it applies. Armed, its
    /// first batch that finds nothing has an event appended before it answers `Idle`: an
    /// append that lands while the batch reads.
    struct Counting {
        store: InMemoryEventStore,
        checkpoint: u64,
        applied: u64,
        late: Option<NewEvent>,
    }

    #[async_trait]
    impl ProjectionBackend for Counting {
        type Projection = u64;

        async fn batch(&mut self) -> Result<Step> {
            let events = self.store.read_all(self.checkpoint + 1, 64).await?;
            let Some(last) = events.last() else {
                if let Some(event) = self.late.take() {
                    let stream = StreamId::new("Tested", "late");
                    self.store
                        .append(&stream, ExpectedVersion::Any, vec![event])
                        .await?;
                }
                return Ok(Step::Idle {
                    checkpoint: self.checkpoint,
                });
            };
            self.checkpoint = last.position;
            self.applied += events.len() as u64;
            Ok(Step::Advanced {
                checkpoint: self.checkpoint,
                applied: events.len() as u64,
                dead_lettered: 0,
                skipped: 0,
            })
        }

        async fn rebuild(&mut self) -> Result<()> {
            self.checkpoint = 0;
            Ok(())
        }

        fn into_projection(self) -> u64 {
            self.applied
        }
    }

    // Paused time: had the runner slept through the append, every task would wait and the
    // timeout would fire at once (as a failure), not hang the test.
    #[tokio::test(start_paused = true)]
    async fn an_append_made_while_an_idle_batch_reads_wakes_the_runner() {
        let store = InMemoryEventStore::new();
        let late = NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Late".to_owned(),
            schema_version: 1,
            occurred_at: Utc::now(),
            metadata: Metadata::new(),
            payload: "{}".to_owned(),
        };
        let backend = Counting {
            store: store.clone(),
            checkpoint: 0,
            applied: 0,
            late: Some(late),
        };
        let log: Arc<dyn EventLog> = Arc::new(store.clone());
        let handle = spawn(
            "counting".to_owned(),
            backend,
            log,
            0,
            &ProjectionOptions::new(),
        );
        store
            .watch_head()
            .wait_for(|head| *head == 1)
            .await
            .expect("the store is open");
        tokio::time::timeout(Duration::from_secs(3600), handle.wait_idle())
            .await
            .expect("the runner sleeps through an append made while its batch read")
            .unwrap();
        assert_eq!(handle.progress().checkpoint, 1);
        assert_eq!(handle.stop().await.unwrap(), 1);
    }
}
