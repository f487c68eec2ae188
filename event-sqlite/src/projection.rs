//! Projections whose read model lives in the store's own database file (see
//! [`SqliteProjection`]).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use chrono::Utc;
use eventfold_core::{
    BoxError, DomainEvent, Error, EventLog, NewDeadLetter, RecordedEvent, Result, RetryPolicy,
    StartFrom, StoreErrorKind, UnknownEventPolicy, error_chain, registry,
};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::error::store_error;
use crate::schema::{self, Location};
use crate::sql::{self, nanos_of};
use crate::store::SqliteEventStore;

/// A read model kept in the store's own SQLite file, written in the same transaction as
/// its checkpoint. Run it with [`SqliteEventStore::run_projection`].
///
/// Write only through the transaction you are given; the runner commits it (or rolls it
/// back, with everything `apply` wrote, when `apply` fails). State kept in the value
/// itself, outside the database, is not rolled back: keep the read model in tables.
///
/// Each batch of events is applied and the projection's checkpoint saved in one SQLite
/// transaction, so the read model holds every event exactly once, whatever crashes in
/// between.
///
/// A bus subscription is at-least-once: its handler runs, then its checkpoint is saved, and
/// a crash between the two runs the handler again. When the read model is in the same
/// database as the events, there is no "between": [`SqliteProjection::apply`] writes
/// through the very transaction that moves the checkpoint, so either both are stored or
/// neither is.
///
/// ```
/// use eventfold_core::{BoxError, DomainEvent, Metadata, NewEvent, RecordedEvent, EventLog,
///     ExpectedVersion, StreamId};
/// use eventfold_sqlite::{ProjectionOptions, SqliteEventStore, SqliteOptions, SqliteProjection};
/// use rusqlite::Transaction;
/// # use eventfold_macros::DomainEvent;
/// # use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Account", crate = "eventfold_core")]
/// enum AccountEvent {
///     Deposited { amount: u64 },
/// }
///
/// /// Each account's balance, in a table next to the events.
/// struct Balances;
///
/// impl SqliteProjection for Balances {
///     type Event = AccountEvent;
///     fn name(&self) -> &str {
///         "balances"
///     }
///     fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
///         tx.execute_batch(
///             "CREATE TABLE IF NOT EXISTS balances (id TEXT PRIMARY KEY, balance INTEGER NOT NULL)",
///         )?;
///         Ok(())
///     }
///     fn clear(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
///         tx.execute_batch("DELETE FROM balances")?;
///         Ok(())
///     }
///     fn apply(&mut self, tx: &Transaction<'_>, event: &AccountEvent, recorded: &RecordedEvent)
///         -> Result<(), BoxError>
///     {
///         let AccountEvent::Deposited { amount } = event;
///         tx.execute(
///             "INSERT INTO balances (id, balance) VALUES (?1, ?2) \
///              ON CONFLICT (id) DO UPDATE SET balance = balance + excluded.balance",
///             rusqlite::params![recorded.aggregate_id, *amount as i64],
///         )?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new()).await?;
/// let deposit = NewEvent::from_event(&AccountEvent::Deposited { amount: 30 }, Metadata::new())?;
/// store.append(&StreamId::new("Account", "a-1"), ExpectedVersion::Any, vec![deposit]).await?;
///
/// let balances = store.run_projection(Balances, ProjectionOptions::new()).await?;
/// balances.wait_idle().await?;
/// assert_eq!(balances.progress().checkpoint, 1);
///
/// // A rebuild clears the read model and replays the log, in the same way.
/// balances.rebuild().await?;
/// balances.wait_idle().await?;
/// balances.stop().await?;
/// # Ok(()) }
/// ```
///
/// # What it delivers, and what it does with failures
///
/// - Events are applied in log order, one batch ([`ProjectionOptions::batch_size`]) per
///   transaction. Events of types the projection's event type registers are decoded and
///   applied; events of types other code registers are passed over; an event of a type no
///   code registers, of the projection's aggregate type, is dead-lettered (or passed over,
///   see [`ProjectionOptions::unknown_events`]); a payload that does not decode, and a row
///   whose checksum does not match, are dead-lettered at once. Dead letters go to the
///   store's dead letters under the projection's name, in the same transaction as the
///   checkpoint that passes them.
/// - When `apply` fails (returns an error or panics), the batch is rolled back, the events
///   before the failing one are applied again and committed, and the failing event is tried
///   again after [`RetryPolicy`]'s delays (their nominal values: one runner has no one to
///   fall into lockstep with); after its last attempt it is dead-lettered and the
///   projection goes on.
/// - When the store fails (a full disk, the file locked by another process past its busy
///   timeout), nothing is applied; the runner tries again after
///   [`ProjectionOptions::store_retry`], and [`ProjectionProgress::last_error`] says why it
///   waits until a batch commits.
/// - The checkpoint is a row of the store's checkpoints, under the projection's name (so
///   `StoreStatistics` shows its lag): give it a name no bus subscription uses.
/// - Two runners of one projection (in two processes on one file) never apply an event
///   twice: each reads the checkpoint inside its write transaction, and SQLite runs one
///   write transaction at a time.
/// - While a batch runs, the projection holds the database's write lock, and appends
///   wait for it (up to [`SqliteOptions::busy_timeout`](crate::SqliteOptions::busy_timeout),
///   then fail as `Busy`): keep `apply` short and free of I/O outside the database, and
///   batches small enough.
pub trait SqliteProjection: Send + 'static {
    /// The events it applies: an enum, a struct, or a group of event structs.
    type Event: DomainEvent;

    /// A stable name; the checkpoint and the dead letters are stored under it.
    fn name(&self) -> &str;

    /// Creates what the read model needs (tables, indexes), when the runner starts. Runs
    /// every start: use `CREATE TABLE IF NOT EXISTS`, or a version table of your own.
    fn setup(&mut self, tx: &Transaction<'_>) -> std::result::Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// Removes the read model's rows, before a [rebuild](ProjectionHandle::rebuild): runs in
    /// the transaction that sets the checkpoint back to the start.
    fn clear(&mut self, tx: &Transaction<'_>) -> std::result::Result<(), BoxError>;

    /// Applies one event: the decoded value and the stored record (its stream, version,
    /// position, metadata, times).
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        event: &Self::Event,
        recorded: &RecordedEvent,
    ) -> std::result::Result<(), BoxError>;
}

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
}

impl Default for ProjectionOptions {
    fn default() -> Self {
        ProjectionOptions {
            batch_size: 256,
            retry: RetryPolicy::default(),
            start_from: StartFrom::Beginning,
            unknown_events: UnknownEventPolicy::DeadLetter,
            store_retry: Duration::from_millis(500),
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

    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::InvalidSetting {
                setting: "batch_size",
                reason: "a projection applies at least one event per transaction".to_owned(),
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
    /// Events still to go through: the head minus the checkpoint.
    pub fn remaining(&self) -> u64 {
        self.head.saturating_sub(self.checkpoint)
    }
}

/// A running projection. Dropping it stops the runner after its current batch.
pub struct ProjectionHandle<P> {
    name: String,
    store: SqliteEventStore,
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

impl SqliteEventStore {
    /// Starts a projection on this store's file: runs its [`setup`](SqliteProjection::setup)
    /// (an error there is this call's error, as [`Error::HandlerFailed`]), then applies the
    /// events after its checkpoint, and every event appended later, on a task of its own.
    ///
    /// It opens a write connection of its own to the file; an in-memory or read-only store
    /// has none to give ([`Error::InvalidSetting`]).
    pub async fn run_projection<P: SqliteProjection>(
        &self,
        projection: P,
        options: ProjectionOptions,
    ) -> Result<ProjectionHandle<P>> {
        options.validate()?;
        let Some(path) = self.path().map(ToOwned::to_owned) else {
            return Err(Error::InvalidSetting {
                setting: "run_projection",
                reason: "an in-memory store has no file for a projection to write in".to_owned(),
            });
        };
        let store_options = self.options().clone();
        if store_options.read_only {
            return Err(Error::InvalidSetting {
                setting: "run_projection",
                reason: "the store is open read-only".to_owned(),
            });
        }
        let name = projection.name().to_owned();
        if name.is_empty() {
            return Err(Error::InvalidSubscriptionName {
                name,
                reason: "a projection needs a name to store its checkpoint under".to_owned(),
            });
        }
        let head = self.watch_head();
        let start = *head.borrow();
        let setup_options = options.clone();
        let runner = tokio::task::spawn_blocking(move || {
            let conn = schema::open_writer(Location::File(&path), &store_options)?;
            let mut runner = Runner {
                name,
                conn,
                projection,
                options: setup_options,
                failing: None,
            };
            let checkpoint = runner.setup(start)?;
            Ok::<_, Error>((runner, checkpoint))
        })
        .await
        .map_err(|e| panicked("setting up the projection", e))?;
        let (runner, checkpoint) = runner?;
        let name = runner.name.clone();
        let (progress_tx, progress) = watch::channel(ProjectionProgress {
            checkpoint,
            head: start,
            ..ProjectionProgress::default()
        });
        let (requests, requests_rx) = mpsc::channel(8);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(drive(runner, head, progress_tx, requests_rx, stop_rx));
        Ok(ProjectionHandle {
            name,
            store: self.clone(),
            progress,
            requests,
            stop,
            task: Some(task),
        })
    }
}

impl<P: SqliteProjection> ProjectionHandle<P> {
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
        let head = self.store.head_position().await?;
        let mut progress = self.progress.clone();
        let done = progress
            .wait_for(|p| p.checkpoint >= head && !p.rebuilding)
            .await
            .is_ok();
        if done { Ok(()) } else { Err(self.ended()) }
    }

    /// Clears the read model ([`SqliteProjection::clear`]), its dead letters and its
    /// checkpoint in one transaction, then replays the whole log into it; returns once the
    /// clear is committed. [`watch_progress`](Self::watch_progress) shows the replay
    /// (`rebuilding`, `checkpoint` of `head`).
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
        match task.await {
            Ok(result) => result,
            Err(e) => Err(panicked("running the projection", e)),
        }
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

/// The event that failed to apply, until it is applied or dead-lettered.
#[derive(Debug, Clone)]
struct Failing {
    position: u64,
    attempts: u32,
    first_failed_at: chrono::DateTime<Utc>,
    error: String,
}

/// What a batch did.
enum Step {
    /// Committed up to `checkpoint`.
    Advanced {
        checkpoint: u64,
        applied: u64,
        dead_lettered: u64,
        skipped: u64,
    },
    /// Nothing after the checkpoint.
    Idle { checkpoint: u64 },
    /// An event failed; try again after this delay (zero: at once, to commit the events
    /// before it).
    Retry(Duration),
}

/// The projection and its connection, moved onto a blocking thread for each batch.
struct Runner<P> {
    name: String,
    conn: Connection,
    projection: P,
    options: ProjectionOptions,
    failing: Option<Failing>,
}

/// Runs `f`, turning a panic into an error.
fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, BoxError>,
) -> std::result::Result<T, BoxError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".to_owned());
            Err(format!("panicked: {message}").into())
        }
    }
}

/// How an event reaches a projection.
enum Route {
    Apply,
    Skip,
    Unknown,
}

fn route<E: DomainEvent>(event: &RecordedEvent, policy: UnknownEventPolicy) -> Route {
    if E::EVENT_TYPES.iter().any(|t| t.name == event.event_type) {
        Route::Apply
    } else if registry().get(&event.event_type).is_some()
        || event.aggregate_type != E::AGGREGATE_TYPE
    {
        Route::Skip
    } else {
        match policy {
            UnknownEventPolicy::Skip => Route::Skip,
            _ => Route::Unknown,
        }
    }
}

impl<P: SqliteProjection> Runner<P> {
    /// Runs `setup` and, for a projection without a checkpoint that starts at the end,
    /// sets its checkpoint to the head; returns the checkpoint.
    fn setup(&mut self, head: u64) -> Result<u64> {
        let name = self.name.clone();
        let start_at_end = self.options.start_from == StartFrom::End;
        let Runner {
            conn, projection, ..
        } = self;
        let tx = begin(conn)?;
        guarded(|| projection.setup(&tx)).map_err(|e| failed(&name, "setting up", &e))?;
        let checkpoint = match sql::load_checkpoint(&tx, &name)? {
            Some(checkpoint) => checkpoint,
            None if start_at_end => {
                let head = sql::head(&tx)?.max(head);
                save_checkpoint(&tx, &name, head)?;
                head
            }
            None => 0,
        };
        tx.commit()
            .map_err(|e| store_error("committing a projection's setup", e))?;
        Ok(checkpoint)
    }

    /// Clears the read model, its dead letters and its checkpoint, in one transaction.
    fn rebuild(&mut self) -> Result<()> {
        let name = self.name.clone();
        self.failing = None;
        let Runner {
            conn, projection, ..
        } = self;
        let tx = begin(conn)?;
        guarded(|| projection.clear(&tx)).map_err(|e| failed(&name, "clearing", &e))?;
        tx.execute("DELETE FROM dead_letters WHERE subscription = ?1", [&name])
            .map_err(|e| store_error("removing a projection's dead letters", e))?;
        save_checkpoint(&tx, &name, 0)?;
        tx.commit()
            .map_err(|e| store_error("committing a projection's rebuild", e))
    }

    /// One transaction: the events after the checkpoint, up to a batch (or up to a failing
    /// event, or that event alone).
    fn batch(&mut self) -> Result<Step> {
        let name = self.name.clone();
        let max_attempts = self.options.retry.max_attempts();
        let batch_size = self.options.batch_size as u64;
        let unknown = self.options.unknown_events;
        let mut failing = self.failing.take();
        let Runner {
            conn, projection, ..
        } = self;
        let tx = begin(conn)?;
        let checkpoint = sql::load_checkpoint(&tx, &name)?.unwrap_or(0);
        // Another runner may have passed the failing event.
        failing = failing.filter(|f| f.position > checkpoint);
        let limit = match &failing {
            // Out of attempts, and next: dead-letter it.
            Some(f) if f.position == checkpoint + 1 && f.attempts >= max_attempts => {
                let dead_letter = NewDeadLetter {
                    subscription: name.clone(),
                    event_id: event_id_at(&tx, f.position)?,
                    position: f.position,
                    event_type: event_type_at(&tx, f.position)?,
                    error: f.error.clone(),
                    attempts: f.attempts,
                    first_failed_at: f.first_failed_at,
                    last_failed_at: Utc::now(),
                };
                add_dead_letter(&tx, &dead_letter)?;
                save_checkpoint(&tx, &name, f.position)?;
                commit(tx)?;
                return Ok(Step::Advanced {
                    checkpoint: f.position,
                    applied: 0,
                    dead_lettered: 1,
                    skipped: 0,
                });
            }
            // The events before it first; then it alone.
            Some(f) => (f.position - checkpoint - 1).clamp(1, batch_size),
            None => batch_size,
        };
        let rows = sql::read_all_rows(&tx, checkpoint + 1, limit as usize)?;
        let Some(last) = rows.last() else {
            return Ok(Step::Idle { checkpoint });
        };
        let last = match last {
            Ok(event) => event.position,
            Err((position, _)) => *position,
        };
        let (mut applied, mut dead_lettered, mut skipped) = (0, 0, 0);
        let now = Utc::now();
        for row in rows {
            let event = match row {
                Ok(event) => event,
                Err((position, error)) => {
                    let event_id = match &error {
                        Error::CorruptEvent { event_id, .. } => event_id.unwrap_or(Uuid::nil()),
                        _ => Uuid::nil(),
                    };
                    let letter = dead_letter(&name, event_id, position, "", &error, now);
                    add_dead_letter(&tx, &letter)?;
                    dead_lettered += 1;
                    continue;
                }
            };
            match route::<P::Event>(&event, unknown) {
                Route::Skip => skipped += 1,
                Route::Unknown => {
                    let error = Error::UnknownEventType {
                        event_type: event.event_type.to_string(),
                        event_id: Some(event.event_id),
                        position: Some(event.position),
                    };
                    let letter = dead_letter(
                        &name,
                        event.event_id,
                        event.position,
                        &event.event_type,
                        &error,
                        now,
                    );
                    add_dead_letter(&tx, &letter)?;
                    dead_lettered += 1;
                }
                Route::Apply => match event.decode::<P::Event>() {
                    Err(error) => {
                        let letter = dead_letter(
                            &name,
                            event.event_id,
                            event.position,
                            &event.event_type,
                            &error,
                            now,
                        );
                        add_dead_letter(&tx, &letter)?;
                        dead_lettered += 1;
                    }
                    Ok(decoded) => {
                        if let Err(error) = guarded(|| projection.apply(&tx, &decoded, &event)) {
                            // Undo what the batch wrote, its failed event's writes with it.
                            drop(tx);
                            let error = error_chain(&*error);
                            tracing::warn!(
                                projection = %name,
                                position = event.position,
                                %error,
                                "a projection failed to apply an event"
                            );
                            let attempts = match &failing {
                                Some(f) if f.position == event.position => {
                                    f.attempts.saturating_add(1)
                                }
                                _ => 1,
                            };
                            let first_failed_at = match &failing {
                                Some(f) if f.position == event.position => f.first_failed_at,
                                _ => now,
                            };
                            let at_head = event.position == checkpoint + 1;
                            self.failing = Some(Failing {
                                position: event.position,
                                attempts,
                                first_failed_at,
                                error,
                            });
                            return Ok(Step::Retry(if at_head && attempts < max_attempts {
                                self.options.retry.nominal_delay(attempts)
                            } else {
                                Duration::ZERO
                            }));
                        }
                        applied += 1;
                    }
                },
            }
        }
        save_checkpoint(&tx, &name, last)?;
        commit(tx)?;
        self.failing = failing.filter(|f| f.position > last);
        Ok(Step::Advanced {
            checkpoint: last,
            applied,
            dead_lettered,
            skipped,
        })
    }
}

fn failed(name: &str, doing: &str, error: &BoxError) -> Error {
    Error::HandlerFailed {
        subscription: name.to_owned(),
        event_id: Uuid::nil(),
        message: format!("{doing} the projection failed: {}", error_chain(&**error)),
    }
}

fn dead_letter(
    name: &str,
    event_id: Uuid,
    position: u64,
    event_type: &str,
    error: &Error,
    now: chrono::DateTime<Utc>,
) -> NewDeadLetter {
    NewDeadLetter {
        subscription: name.to_owned(),
        event_id,
        position,
        event_type: event_type.to_owned(),
        error: error_chain(error),
        attempts: 1,
        first_failed_at: now,
        last_failed_at: now,
    }
}

fn begin(conn: &mut Connection) -> Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| store_error("beginning a projection's transaction", e))
}

fn commit(tx: Transaction<'_>) -> Result<()> {
    tx.commit()
        .map_err(|e| store_error("committing a projection's batch", e))
}

fn save_checkpoint(conn: &Connection, name: &str, position: u64) -> Result<()> {
    let now = nanos_of(Utc::now(), "checkpoint time")?;
    sql::upsert_checkpoint(conn, name, position, now)
        .map_err(|e| store_error("saving a projection's checkpoint", e))
}

fn add_dead_letter(conn: &Connection, dead_letter: &NewDeadLetter) -> Result<()> {
    let first = nanos_of(dead_letter.first_failed_at, "first failure time")?;
    let last = nanos_of(dead_letter.last_failed_at, "last failure time")?;
    sql::upsert_dead_letter(conn, dead_letter, first, last)
        .map(drop)
        .map_err(|e| store_error("adding a projection's dead letter", e))
}

/// The id of the event at `position` (nil if its row cannot be read).
fn event_id_at(conn: &Connection, position: u64) -> Result<Uuid> {
    Ok(match sql::read_all_rows(conn, position, 1)?.pop() {
        Some(Ok(event)) if event.position == position => event.event_id,
        _ => Uuid::nil(),
    })
}

/// The event type of the event at `position` (empty if its row cannot be read).
fn event_type_at(conn: &Connection, position: u64) -> Result<String> {
    Ok(match sql::read_all_rows(conn, position, 1)?.pop() {
        Some(Ok(event)) if event.position == position => event.event_type.into_owned(),
        _ => String::new(),
    })
}

/// Moves the runner onto a blocking thread for `work`, and back.
async fn blocking<P: SqliteProjection, T: Send + 'static>(
    runner: Runner<P>,
    work: impl FnOnce(&mut Runner<P>) -> T + Send + 'static,
) -> Result<(Runner<P>, T)> {
    tokio::task::spawn_blocking(move || {
        let mut runner = runner;
        let out = work(&mut runner);
        (runner, out)
    })
    .await
    .map_err(|e| panicked("running the projection", e))
}

/// Serves a request between batches.
async fn serve<P: SqliteProjection>(
    runner: Runner<P>,
    request: Request,
    progress: &watch::Sender<ProjectionProgress>,
) -> Result<Runner<P>> {
    match request {
        Request::Rebuild(reply) => {
            let (runner, result) = blocking(runner, Runner::rebuild).await?;
            if result.is_ok() {
                progress.send_modify(|p| {
                    p.checkpoint = 0;
                    p.rebuilding = true;
                });
            }
            let _ = reply.send(result);
            Ok(runner)
        }
    }
}

/// The runner's loop: batches while there is work, waits for the head, for a retry's
/// delay, for a request or for the stop.
async fn drive<P: SqliteProjection>(
    mut runner: Runner<P>,
    mut head: watch::Receiver<u64>,
    progress: watch::Sender<ProjectionProgress>,
    mut requests: mpsc::Receiver<Request>,
    mut stop: watch::Receiver<bool>,
) -> Result<P> {
    let store_retry = runner.options.store_retry;
    let mut idle = false;
    loop {
        if *stop.borrow() {
            break;
        }
        // Requests first, between batches.
        while let Ok(request) = requests.try_recv() {
            runner = serve(runner, request, &progress).await?;
            idle = false;
        }
        let head_now = *head.borrow_and_update();
        if idle {
            // Caught up: wait for an append (a change after `head_now` wakes it at once).
            tokio::select! {
                changed = head.changed() => if changed.is_err() { break },
                request = requests.recv() => match request {
                    Some(request) => runner = serve(runner, request, &progress).await?,
                    None => break,
                },
                _ = stop.changed() => break,
            }
            idle = false;
            continue;
        }
        let (back, step) = blocking(runner, Runner::batch).await?;
        runner = back;
        let wait = match step {
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
                    if checkpoint >= p.head {
                        p.rebuilding = false;
                    }
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
                tracing::warn!(projection = %runner.name, error = %message,
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
    Ok(runner.projection)
}
