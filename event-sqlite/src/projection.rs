//! Projections whose read model lives in the store's own database file (see
//! [`SqliteProjection`]).

use std::sync::Arc;

use async_trait::async_trait;
use eventfold_core::projection::{
    self, Action, DecodeCache, Failures, Plan, ProjectionBackend, ProjectionHandle,
    ProjectionOptions, Step,
};
use eventfold_core::{
    BoxError, DomainEvent, Error, NewDeadLetter, RecordedEvent, Result, StartFrom, StoreErrorKind,
    error_chain,
};
use rusqlite::{Connection, Transaction, TransactionBehavior};
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
/// use eventfold_core::projection::ProjectionOptions;
/// use eventfold_sqlite::{SqliteEventStore, SqliteOptions, SqliteProjection};
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
/// What it receives and what it does with failures is the same on every backend: see
/// [`eventfold_core::projection`]. On SQLite, while a batch runs the projection holds the
/// database's write lock and appends wait for it (up to
/// [`SqliteOptions::busy_timeout`](crate::SqliteOptions::busy_timeout), then fail as
/// `Busy`); `apply` runs on a blocking thread and cannot be interrupted
/// ([`ProjectionOptions::apply_timeout`](eventfold_core::projection::ProjectionOptions::apply_timeout)
/// does not apply): keep it short, free of I/O outside the database, and batches small
/// enough. Its connection commits with `synchronous = NORMAL` (unless the store's is
/// weaker): a batch survives a crash of the process; a power loss may undo the last
/// batches, read model and checkpoint together, which are then applied again.
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
        let name = projection.name().to_owned();
        options.validate(&name)?;
        let Some(path) = self.path().map(ToOwned::to_owned) else {
            return Err(Error::InvalidSetting {
                setting: "run_projection",
                reason: "an in-memory store has no file for a projection to write in".to_owned(),
            });
        };
        let mut store_options = self.options().clone();
        // The read model is derived from the events: a batch lost to a power loss (read
        // model, dead letters and checkpoint together, as one transaction) is applied
        // again. So the projection's commits wait for the disk only at WAL checkpoints;
        // they survive a crash of the process either way.
        if matches!(
            store_options.synchronous,
            crate::Synchronous::Full | crate::Synchronous::Extra
        ) {
            store_options.synchronous = crate::Synchronous::Normal;
        }
        if store_options.read_only {
            return Err(Error::InvalidSetting {
                setting: "run_projection",
                reason: "the store is open read-only".to_owned(),
            });
        }
        let setup_name = name.clone();
        let setup_options = options.clone();
        let (runner, checkpoint) = tokio::task::spawn_blocking(move || {
            let conn = schema::open_writer(Location::File(&path), &store_options)?;
            let mut runner = Runner {
                name: setup_name,
                conn,
                projection,
                options: setup_options,
                failures: Failures::default(),
                decode: DecodeCache::default(),
            };
            let checkpoint = runner.setup()?;
            Ok::<_, Error>((runner, checkpoint))
        })
        .await
        .map_err(|e| lost("setting up the projection", e))??;
        let backend = Backend {
            runner: Some(runner),
        };
        Ok(projection::spawn(
            name,
            backend,
            Arc::new(self.clone()),
            checkpoint,
            &options,
        ))
    }
}

fn lost(doing: &str, error: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Store {
        kind: StoreErrorKind::Other,
        message: format!("{doing}: the blocking task failed"),
        source: Some(Box::new(error)),
    }
}

/// The projection and its connection, moved onto a blocking thread for each transaction.
struct Runner<P> {
    name: String,
    conn: Connection,
    projection: P,
    options: ProjectionOptions,
    failures: Failures,
    decode: DecodeCache,
}

/// The runner between transactions (`None` only while one runs).
struct Backend<P> {
    runner: Option<Runner<P>>,
}

impl<P: SqliteProjection> Backend<P> {
    async fn on_thread<T: Send + 'static>(
        &mut self,
        work: fn(&mut Runner<P>) -> Result<T>,
    ) -> Result<T> {
        let Some(mut runner) = self.runner.take() else {
            return Err(Error::Store {
                kind: StoreErrorKind::Closed,
                message: "the projection's connection was lost with a failed task".to_owned(),
                source: None,
            });
        };
        let (runner, out) = tokio::task::spawn_blocking(move || {
            let out = work(&mut runner);
            (runner, out)
        })
        .await
        .map_err(|e| lost("running the projection", e))?;
        self.runner = Some(runner);
        out
    }
}

#[async_trait]
impl<P: SqliteProjection> ProjectionBackend for Backend<P> {
    type Projection = P;

    async fn batch(&mut self) -> Result<Step> {
        self.on_thread(Runner::batch).await
    }

    async fn rebuild(&mut self) -> Result<()> {
        self.on_thread(Runner::rebuild).await
    }

    fn into_projection(self) -> P {
        let runner = self
            .runner
            .expect("a projection's runner is back between transactions");
        runner.projection
    }
}

fn begin(conn: &mut Connection) -> Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| store_error("beginning a projection's transaction", e))
}

fn commit(tx: Transaction<'_>) -> Result<()> {
    tx.commit()
        .map_err(|e| store_error("committing a projection's transaction", e))
}

fn save_checkpoint(conn: &Connection, name: &str, position: u64) -> Result<()> {
    let now = nanos_of(chrono::Utc::now(), "checkpoint time")?;
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

impl<P: SqliteProjection> Runner<P> {
    /// Runs `setup` and, for a projection without a checkpoint that starts at the end,
    /// sets its checkpoint to the head; returns the checkpoint.
    fn setup(&mut self) -> Result<u64> {
        let Runner {
            name,
            conn,
            projection,
            options,
            ..
        } = self;
        let tx = begin(conn)?;
        projection::guarded(|| projection.setup(&tx))
            .map_err(|e| projection::failed(name, "setting up", &e))?;
        let checkpoint = match sql::load_checkpoint(&tx, name)? {
            Some(checkpoint) => checkpoint,
            None if options.start_from == StartFrom::End => {
                let head = sql::head(&tx)?;
                save_checkpoint(&tx, name, head)?;
                head
            }
            None => 0,
        };
        commit(tx)?;
        Ok(checkpoint)
    }

    /// Clears the read model, its dead letters and its checkpoint, in one transaction.
    fn rebuild(&mut self) -> Result<()> {
        let Runner {
            name,
            conn,
            projection,
            failures,
            ..
        } = self;
        let tx = begin(conn)?;
        projection::guarded(|| projection.clear(&tx))
            .map_err(|e| projection::failed(name, "clearing", &e))?;
        tx.execute("DELETE FROM dead_letters WHERE subscription = ?1", [&*name])
            .map_err(|e| store_error("removing a projection's dead letters", e))?;
        save_checkpoint(&tx, name, 0)?;
        commit(tx)?;
        failures.clear();
        Ok(())
    }

    /// One transaction: the events after the checkpoint, up to a batch (or up to a failing
    /// event, or that event alone, or its dead letter).
    fn batch(&mut self) -> Result<Step> {
        let Runner {
            name,
            conn,
            projection,
            options,
            failures,
            decode,
        } = self;
        let tx = begin(conn)?;
        let checkpoint = sql::load_checkpoint(&tx, name)?.unwrap_or(0);
        let limit = match failures.plan(checkpoint, options) {
            Plan::DeadLetter(failed) => {
                let (mut event_id, mut event_type) = (Uuid::nil(), String::new());
                sql::visit_log(&tx, failed.position, 1, |row| {
                    if let Ok(event) = row
                        && event.position == failed.position
                    {
                        (event_id, event_type) = (event.event_id, event.event_type.to_string());
                    }
                    Ok(false)
                })?;
                add_dead_letter(
                    &tx,
                    &projection::exhausted(name, event_id, &event_type, &failed),
                )?;
                save_checkpoint(&tx, name, failed.position)?;
                commit(tx)?;
                failures.committed(failed.position);
                return Ok(Step::Advanced {
                    checkpoint: failed.position,
                    applied: 0,
                    dead_lettered: 1,
                    skipped: 0,
                });
            }
            Plan::Read(limit) => limit,
        };
        let (mut last, mut applied, mut dead_lettered, mut skipped) = (checkpoint, 0, 0, 0);
        let mut failure = None;
        sql::visit_log(&tx, checkpoint + 1, limit, |row| {
            let event = match row {
                Ok(event) => event,
                Err((position, error)) => {
                    let event_id = match &error {
                        Error::CorruptEvent { event_id, .. } => *event_id,
                        _ => None,
                    };
                    let letter = projection::dead_letter(name, event_id, position, "", &error);
                    add_dead_letter(&tx, &letter)?;
                    dead_lettered += 1;
                    last = position;
                    return Ok(true);
                }
            };
            match projection::classify::<P::Event>(event, options.unknown_events, decode) {
                Action::Skip => skipped += 1,
                Action::DeadLetter(error) => {
                    let letter = projection::dead_letter_of(name, event, &error);
                    add_dead_letter(&tx, &letter)?;
                    dead_lettered += 1;
                }
                Action::Apply(decoded) => {
                    if let Err(error) =
                        projection::guarded(|| projection.apply(&tx, &decoded, event))
                    {
                        failure = Some((event.position, error_chain(&*error)));
                        return Ok(false);
                    }
                    applied += 1;
                }
            }
            last = event.position;
            Ok(true)
        })?;
        if let Some((position, error)) = failure {
            // Undo what the batch wrote, the failed event's writes with it.
            drop(tx);
            tracing::warn!(projection = %name, position, %error,
                "a projection failed to apply an event");
            return Ok(failures.failed(position, checkpoint, error, options));
        }
        if last == checkpoint {
            return Ok(Step::Idle { checkpoint });
        }
        save_checkpoint(&tx, name, last)?;
        commit(tx)?;
        failures.committed(last);
        Ok(Step::Advanced {
            checkpoint: last,
            applied,
            dead_lettered,
            skipped,
        })
    }
}
