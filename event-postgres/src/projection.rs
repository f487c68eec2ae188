//! Projections whose read model lives in the store's own database (see
//! [`PostgresProjection`]).

use std::sync::Arc;

use async_trait::async_trait;
use eventfold_core::projection::{
    self, Action, DecodeCache, Failures, Plan, ProjectionBackend, ProjectionHandle,
    ProjectionOptions, Step,
};
use eventfold_core::{
    BoxError, DomainEvent, Error, NewDeadLetter, RecordedEvent, Result, StartFrom, error_chain,
};
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::error::store_error;
use crate::sql::{self, bound, to_i64, to_u64};
use crate::store::{PostgresEventStore, record_time};

/// A read model kept in the store's own PostgreSQL database (in the store's schema: the
/// projection's sessions have its `search_path`), written in the same transaction as its
/// checkpoint, so it holds every event exactly once. Run it with
/// [`PostgresEventStore::run_projection`].
///
/// Write only through the transaction you are given (a [`tokio_postgres`] transaction,
/// re-exported by this crate); the runner commits it, or rolls it back, with everything
/// `apply` wrote, when `apply` fails, panics or runs past
/// [`ProjectionOptions::apply_timeout`]. State kept in the value itself is not rolled back:
/// keep the read model in tables. What it receives and what it does with failures is the
/// same on every backend: see [`eventfold_core::projection`].
///
/// ```no_run
/// use eventfold_core::projection::ProjectionOptions;
/// use eventfold_core::{BoxError, RecordedEvent};
/// use eventfold_postgres::tokio_postgres::Transaction;
/// use eventfold_postgres::{PostgresEventStore, PostgresOptions, PostgresProjection, async_trait};
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
/// #[async_trait]
/// impl PostgresProjection for Balances {
///     type Event = AccountEvent;
///     fn name(&self) -> &str {
///         "balances"
///     }
///     async fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
///         tx.batch_execute(
///             "CREATE TABLE IF NOT EXISTS balances (id text PRIMARY KEY, balance bigint NOT NULL)",
///         )
///         .await?;
///         Ok(())
///     }
///     async fn clear(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
///         tx.batch_execute("DELETE FROM balances").await?;
///         Ok(())
///     }
///     async fn apply(
///         &mut self,
///         tx: &Transaction<'_>,
///         event: &AccountEvent,
///         recorded: &RecordedEvent,
///     ) -> Result<(), BoxError> {
///         let AccountEvent::Deposited { amount } = event;
///         tx.execute(
///             "INSERT INTO balances (id, balance) VALUES ($1, $2) \
///              ON CONFLICT (id) DO UPDATE SET balance = balances.balance + excluded.balance",
///             &[&recorded.aggregate_id, &(*amount as i64)],
///         )
///         .await?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = PostgresEventStore::open(PostgresOptions::new("postgres://postgres@127.0.0.1/test")).await?;
/// let balances = store.run_projection(Balances, ProjectionOptions::new()).await?;
/// balances.wait_idle().await?;
/// balances.stop().await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait PostgresProjection: Send + 'static {
    /// The events it applies: an enum, a struct, or a group of event structs.
    type Event: DomainEvent;

    /// A stable name; the checkpoint and the dead letters are stored under it.
    fn name(&self) -> &str;

    /// Creates what the read model needs (tables, indexes), when the runner starts. Runs
    /// every start: use `CREATE TABLE IF NOT EXISTS`, or a version table of your own.
    async fn setup(&mut self, tx: &Transaction<'_>) -> std::result::Result<(), BoxError> {
        let _ = tx;
        Ok(())
    }

    /// Removes the read model's rows, before a
    /// [rebuild](eventfold_core::projection::ProjectionHandle::rebuild): runs in the
    /// transaction that sets the checkpoint back to the start.
    async fn clear(&mut self, tx: &Transaction<'_>) -> std::result::Result<(), BoxError>;

    /// Applies one event: the decoded value and the stored record (its stream, version,
    /// position, metadata, times).
    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        event: &Self::Event,
        recorded: &RecordedEvent,
    ) -> std::result::Result<(), BoxError>;
}

impl PostgresEventStore {
    /// Starts a projection on this store's database: runs its
    /// [`setup`](PostgresProjection::setup) (an error there is this call's error, as
    /// [`Error::HandlerFailed`]), then applies the events after its checkpoint, and every
    /// event appended later (by any process), on a task of its own. It takes a pooled
    /// session for each transaction.
    pub async fn run_projection<P: PostgresProjection>(
        &self,
        projection: P,
        options: ProjectionOptions,
    ) -> Result<ProjectionHandle<P>> {
        let name = projection.name().to_owned();
        options.validate(&name)?;
        let mut backend = Backend {
            store: self.clone(),
            name: name.clone(),
            projection,
            options: options.clone(),
            failures: Failures::default(),
            decode: DecodeCache::default(),
        };
        let checkpoint = backend.setup().await?;
        Ok(projection::spawn(
            name,
            backend,
            Arc::new(self.clone()),
            checkpoint,
            &options,
        ))
    }
}

struct Backend<P> {
    store: PostgresEventStore,
    name: String,
    projection: P,
    options: ProjectionOptions,
    failures: Failures,
    decode: DecodeCache,
}

/// Sets a projection's checkpoint.
const SAVE_CHECKPOINT: &str = "UPDATE ef_checkpoints SET position = $2, updated_at = $3 \
     WHERE subscription = $1";

fn failed(doing: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| store_error(doing, e)
}

async fn save_checkpoint(tx: &Transaction<'_>, name: &str, position: u64) -> Result<()> {
    let now = record_time(chrono::Utc::now(), "the checkpoint time")?;
    tx.execute(SAVE_CHECKPOINT, &[&name, &to_i64(position), &now])
        .await
        .map(drop)
        .map_err(failed("saving a projection's checkpoint"))
}

async fn add_dead_letter(tx: &Transaction<'_>, dead_letter: &NewDeadLetter) -> Result<()> {
    let first = record_time(dead_letter.first_failed_at, "first failure time")?;
    let last = record_time(dead_letter.last_failed_at, "last failure time")?;
    let error = dead_letter.error.replace('\0', "\u{fffd}");
    let event_type = dead_letter.event_type.replace('\0', "\u{fffd}");
    tx.query(
        sql::UPSERT_DEAD_LETTER,
        &[
            &dead_letter.subscription,
            &dead_letter.event_id,
            &to_i64(dead_letter.position),
            &event_type,
            &error,
            &i64::from(dead_letter.attempts),
            &first,
            &last,
        ],
    )
    .await
    .map(drop)
    .map_err(failed("adding a projection's dead letter"))
}

/// Locks the projection's checkpoint row (creating it at 0) until the transaction ends, so
/// two runners take turns; returns it, and whether the row was created.
async fn lock_checkpoint(tx: &Transaction<'_>, name: &str) -> Result<(u64, bool)> {
    let now = record_time(chrono::Utc::now(), "the checkpoint time")?;
    let created = tx
        .execute(
            "INSERT INTO ef_checkpoints (subscription, position, updated_at) VALUES ($1, 0, $2) \
             ON CONFLICT (subscription) DO NOTHING",
            &[&name, &now],
        )
        .await
        .map_err(failed("creating a projection's checkpoint"))?;
    let row = tx
        .query_one(
            "SELECT position FROM ef_checkpoints WHERE subscription = $1 FOR UPDATE",
            &[&name],
        )
        .await
        .map_err(failed("locking a projection's checkpoint"))?;
    Ok((to_u64(row.get(0)), created == 1))
}

impl<P: PostgresProjection> Backend<P> {
    /// Runs `setup` and, for a projection without a checkpoint that starts at the end,
    /// sets its checkpoint to the head; returns the checkpoint.
    async fn setup(&mut self) -> Result<u64> {
        let mut client = self.store.client("running a projection").await?;
        let tx = client
            .transaction()
            .await
            .map_err(failed("beginning a projection's transaction"))?;
        projection::guarded_async(self.projection.setup(&tx), self.options.apply_timeout)
            .await
            .map_err(|e| projection::failed(&self.name, "setting up", &e))?;
        let (mut checkpoint, created) = lock_checkpoint(&tx, &self.name).await?;
        if created && self.options.start_from == StartFrom::End {
            let head = tx
                .query_one(sql::HEAD, &[])
                .await
                .map_err(failed("reading the head"))?;
            checkpoint = to_u64(head.get(0));
            save_checkpoint(&tx, &self.name, checkpoint).await?;
        }
        tx.commit()
            .await
            .map_err(failed("committing a projection's setup"))?;
        Ok(checkpoint)
    }
}

#[async_trait]
impl<P: PostgresProjection> ProjectionBackend for Backend<P> {
    type Projection = P;

    async fn rebuild(&mut self) -> Result<()> {
        let mut client = self.store.client("running a projection").await?;
        let tx = client
            .transaction()
            .await
            .map_err(failed("beginning a projection's transaction"))?;
        lock_checkpoint(&tx, &self.name).await?;
        projection::guarded_async(self.projection.clear(&tx), self.options.apply_timeout)
            .await
            .map_err(|e| projection::failed(&self.name, "clearing", &e))?;
        tx.execute(
            "DELETE FROM ef_dead_letters WHERE subscription = $1",
            &[&self.name],
        )
        .await
        .map_err(failed("removing a projection's dead letters"))?;
        save_checkpoint(&tx, &self.name, 0).await?;
        tx.commit()
            .await
            .map_err(failed("committing a projection's rebuild"))?;
        self.failures.clear();
        Ok(())
    }

    async fn batch(&mut self) -> Result<Step> {
        let mut client = self.store.client("running a projection").await?;
        let tx = client
            .transaction()
            .await
            .map_err(failed("beginning a projection's transaction"))?;
        let (checkpoint, _) = lock_checkpoint(&tx, &self.name).await?;
        let limit = match self.failures.plan(checkpoint, &self.options) {
            Plan::DeadLetter(failed_event) => {
                let rows = tx
                    .query(sql::READ_ALL, &[&bound(failed_event.position), &1i64])
                    .await
                    .map_err(failed("reading the failed event"))?;
                let (event_id, event_type) = match rows.first().map(sql::event_from_row) {
                    Some(Ok(event)) if event.position == failed_event.position => {
                        (event.event_id, event.event_type.into_owned())
                    }
                    _ => (Uuid::nil(), String::new()),
                };
                let letter =
                    projection::exhausted(&self.name, event_id, &event_type, &failed_event);
                add_dead_letter(&tx, &letter).await?;
                save_checkpoint(&tx, &self.name, failed_event.position).await?;
                tx.commit()
                    .await
                    .map_err(failed("committing a projection's batch"))?;
                self.failures.committed(failed_event.position);
                return Ok(Step::Advanced {
                    checkpoint: failed_event.position,
                    applied: 0,
                    dead_lettered: 1,
                    skipped: 0,
                });
            }
            Plan::Read(limit) => limit,
        };
        let wanted = limit;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = tx
            .query(sql::READ_ALL, &[&bound(checkpoint + 1), &limit])
            .await
            .map_err(failed("reading the log"))?;
        // A projection never passes over a pruned archive: it stops there, named.
        crate::archive::check_log_read(&*tx, checkpoint + 1, wanted, &rows).await?;
        let Some(last) = rows.last() else {
            return Ok(Step::Idle { checkpoint });
        };
        let last = to_u64(last.get(0));
        let (mut applied, mut dead_lettered, mut skipped) = (0, 0, 0);
        for row in &rows {
            let event = match sql::event_from_row(row) {
                Ok(event) => event,
                Err(error) => {
                    let position = to_u64(row.get(0));
                    let event_id = row.try_get::<_, Uuid>(1).ok();
                    let letter =
                        projection::dead_letter(&self.name, event_id, position, "", &error);
                    add_dead_letter(&tx, &letter).await?;
                    dead_lettered += 1;
                    continue;
                }
            };
            match projection::classify::<P::Event>(
                &event,
                self.options.unknown_events,
                &mut self.decode,
            ) {
                Action::Skip => skipped += 1,
                Action::DeadLetter(error) => {
                    let letter = projection::dead_letter_of(&self.name, &event, &error);
                    add_dead_letter(&tx, &letter).await?;
                    dead_lettered += 1;
                }
                Action::Apply(decoded) => {
                    let applying = self.projection.apply(&tx, &decoded, &event);
                    if let Err(error) =
                        projection::guarded_async(applying, self.options.apply_timeout).await
                    {
                        // Undo what the batch wrote, the failed event's writes with it.
                        drop(tx);
                        let error = error_chain(&*error);
                        tracing::warn!(projection = %self.name, position = event.position, %error,
                            "a projection failed to apply an event");
                        return Ok(self.failures.failed(
                            event.position,
                            checkpoint,
                            error,
                            &self.options,
                        ));
                    }
                    applied += 1;
                }
            }
        }
        save_checkpoint(&tx, &self.name, last).await?;
        tx.commit()
            .await
            .map_err(failed("committing a projection's batch"))?;
        self.failures.committed(last);
        Ok(Step::Advanced {
            checkpoint: last,
            applied,
            dead_lettered,
            skipped,
        })
    }

    fn into_projection(self) -> P {
        self.projection
    }
}
