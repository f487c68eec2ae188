//! [`PostgresEventStore`]: the handle, its pool, its writer and listener tasks, and its
//! store contract parts.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use eventfold_core::archive::{ArchiveHorizon, PruneRequest};
use eventfold_core::{
    AppendOutcome, AppendRequest, DeadLetter, Error, EventLog, ExpectedVersion, FailureRecord,
    FinishedReplay, NewDeadLetter, NewEvent, RecordedEvent, ReplayRequest, ReplayTarget,
    ReplayVisitor, Result, Snapshot, SnapshotStore, StoreErrorKind, StoreStatistics, StreamId,
    SubscriptionStore, check_append, check_batch, check_replay_target,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use uuid::Uuid;

use crate::error::{closed, open_failed, pool_error, store_error};
use crate::listener::{Listener, publish};
use crate::options::{PostgresOptions, redact};
use crate::sql::{self, bound, check_field, nanos_of, to_i64};
use crate::writer::{Command, Counters, Writer, connect};

/// Sessions of the pool kept for segment-lease work: a bus's keeper runs one round at a
/// time per subscription, so two serve several subscriptions without queueing behind each
/// other for long.
const LEASE_CONNECTIONS: usize = 2;

/// A pool of up to `size` sessions (opened on first use) with the options' settings.
fn build_pool(
    options: &PostgresOptions,
    size: usize,
    location: &str,
) -> Result<deadpool_postgres::Pool> {
    let manager = deadpool_postgres::Manager::from_config(
        options.config(false)?,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .create_timeout(Some(options.connect_timeout))
        .build()
        .map_err(|e| Error::Open {
            kind: StoreErrorKind::Other,
            location: location.to_owned(),
            reason: "building the connection pool".to_owned(),
            source: Some(Box::new(e)),
        })
}

/// An [`EventStore`](eventfold_core::EventStore) in a PostgreSQL database: the same
/// contract as the SQLite store, on a server that several processes and machines share.
///
/// One writer task per store, on a connection of its own, commits every append: appends
/// that arrive together go to the server in one call (group commit), each with its own
/// checks and result. Reads and the other writes (snapshots, checkpoints, dead letters,
/// failure records, projections' transactions) use a pool of connections. Segment-lease
/// work (heartbeats, claims, renewals, releases) and the listener's reads of the head have
/// a small pool of their own, so a lease is renewed, and another process's append seen, in
/// time even while reads or projections hold every connection of the main pool. The store
/// needs a Tokio runtime.
///
/// Cloning is cheap and shares the store. The writer stops once every clone is dropped
/// (after the appends already queued), or at [`close`](Self::close).
///
/// [`watch_head`](EventLog::watch_head) follows this store's own commits at once, and
/// other processes' through PostgreSQL's `LISTEN`/`NOTIFY` and a poll of the head every
/// [`PostgresOptions::poll_interval`].
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct PostgresEventStore {
    shared: Arc<Shared>,
}

struct Shared {
    pool: deadpool_postgres::Pool,
    /// Segment-lease work and the listener's head reads ([`LEASE_CONNECTIONS`] sessions,
    /// opened on first use).
    lease_pool: deadpool_postgres::Pool,
    commands: mpsc::Sender<Command>,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    options: PostgresOptions,
    location: String,
    closed: AtomicBool,
    /// Dropped (or set) to stop the listener.
    stop: watch::Sender<bool>,
}

/// What the writer has done since the store opened.
///
/// `calls` below `appends` shows group commit at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WriterStatistics {
    /// Calls of the server-side append function (one transaction each).
    pub calls: u64,
    /// Appends stored by those calls (a batch's requests counted one by one).
    pub appends: u64,
    /// Times the writer connected again after its connection broke.
    pub reconnects: u64,
    /// Microseconds the writer spent waiting for the server to answer its calls. Against
    /// the time the appends took, it tells the server's share (statements and commits)
    /// from the rest (the appenders, the writer's gathering, the driver).
    pub call_micros: u64,
    /// Appends waiting for the writer right now (not counting the call under way).
    pub queued: usize,
}

impl fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("location", &self.shared.location)
            .field("head", &*self.shared.head.borrow())
            .finish_non_exhaustive()
    }
}

impl PostgresEventStore {
    /// Connects to the database of `options`, creates the store's schema if it is missing
    /// and migrates it if it is older, then starts the writer and the listener.
    ///
    /// Fails with [`Error::InvalidSetting`] for an option out of its range or a connection
    /// string that does not parse, and otherwise with [`Error::Open`] carrying the server
    /// and schema and a [`StoreErrorKind`]: `CannotOpen` when the server is unreachable or
    /// refuses the login or the database, `SchemaTooNew` when a newer version of this
    /// library wrote the schema, `Timeout`, `Other`.
    pub async fn open(options: PostgresOptions) -> Result<Self> {
        options.validate()?;
        let location = format!("{} (schema {})", redact(&options.url), options.schema);
        let writer_config = options.config(true)?;
        let mut client = connect(&writer_config)
            .await
            .map_err(|e| open_failed(&location, "connecting to PostgreSQL", e))?;
        crate::schema::migrate(&mut client, &options.schema, &location).await?;
        let head = client
            .query_one(sql::HEAD, &[])
            .await
            .map_err(|e| open_failed(&location, "reading the head", e))?;
        let head = sql::count(head.get(0), "the head position")?;

        let pool = build_pool(&options, options.pool_size, &location)?;
        let lease_pool = build_pool(&options, LEASE_CONNECTIONS, &location)?;

        let channel = options
            .notify
            .then(|| format!("ef_events_{}", options.schema));
        let head = Arc::new(watch::channel(head).0);
        let counters = Arc::new(Counters::default());
        let (commands, queue) = mpsc::channel(options.max_batch_appends.max(256) * 4);
        let writer = Writer::new(
            writer_config.clone(),
            client,
            queue,
            Arc::clone(&head),
            Arc::clone(&counters),
            channel.clone(),
            options.max_batch_appends,
            options.max_batch_events,
        );
        tokio::spawn(writer.run());
        let (stop, stopped) = watch::channel(false);
        let listener = Listener {
            config: writer_config,
            channel,
            pool: lease_pool.clone(),
            head: Arc::clone(&head),
            poll: options.poll_interval,
            stop: stopped,
        };
        tokio::spawn(listener.run());
        tracing::debug!(%location, head = *head.borrow(), "opened the PostgreSQL event store");
        Ok(PostgresEventStore {
            shared: Arc::new(Shared {
                pool,
                lease_pool,
                commands,
                head,
                counters,
                options,
                location,
                closed: AtomicBool::new(false),
                stop,
            }),
        })
    }

    /// The server and schema, as errors name them (without a password).
    pub fn location(&self) -> &str {
        &self.shared.location
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &PostgresOptions {
        &self.shared.options
    }

    /// The streams with stored events, of one aggregate type when `aggregate_type` is
    /// given, ordered by type and id (byte-wise): each with its version, its event count
    /// and its last event's position and time, for operators (the `eventfold` command's
    /// `streams ls`). One grouped query over the stream index.
    pub async fn streams(
        &self,
        aggregate_type: Option<&str>,
    ) -> Result<Vec<eventfold_core::StreamSummary>> {
        let client = self.client("listing streams").await?;
        sql::streams(&client, aggregate_type).await
    }

    /// What the writer has done: calls, appends, reconnections.
    pub fn writer_statistics(&self) -> WriterStatistics {
        let counters = &self.shared.counters;
        WriterStatistics {
            calls: counters.calls.load(Ordering::Relaxed),
            appends: counters.appends.load(Ordering::Relaxed),
            reconnects: counters.reconnects.load(Ordering::Relaxed),
            call_micros: counters.call_micros.load(Ordering::Relaxed),
            queued: self.shared.commands.max_capacity() - self.shared.commands.capacity(),
        }
    }

    /// Stops the store: the writer commits what was queued before and disconnects, the
    /// listener stops, the pool closes. Every later call fails with
    /// [`StoreErrorKind::Closed`]. Closing twice is fine.
    ///
    /// Dropping every clone of the store does the same, without waiting for it.
    pub async fn close(&self) -> Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        let _ = self.shared.stop.send(true);
        let (reply, done) = oneshot::channel();
        if self
            .shared
            .commands
            .send(Command::Close(reply))
            .await
            .is_ok()
        {
            // An error here means the writer was gone already: closed all the same.
            let _ = done.await;
        }
        self.shared.pool.close();
        self.shared.lease_pool.close();
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        Ok(())
    }

    /// A pooled connection.
    pub(crate) async fn client(&self, doing: &str) -> Result<deadpool_postgres::Object> {
        self.pooled(&self.shared.pool, doing).await
    }

    /// A connection of the lease pool, for segment-lease work: a renewal never waits behind
    /// the reads and projections that may hold every connection of the main pool.
    pub(crate) async fn lease_client(&self, doing: &str) -> Result<deadpool_postgres::Object> {
        self.pooled(&self.shared.lease_pool, doing).await
    }

    async fn pooled(
        &self,
        pool: &deadpool_postgres::Pool,
        doing: &str,
    ) -> Result<deadpool_postgres::Object> {
        self.check_open()?;
        pool.get().await.map_err(|e| pool_error(doing, e))
    }

    /// Runs a query on a pooled connection. A read whose connection turns out broken (the
    /// server ended the session, say) runs again on another, up to once per pooled
    /// connection and once on a fresh one: reads are safe to repeat, and every idle
    /// session of the pool may have been ended at once.
    async fn query(
        &self,
        doing: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let mut tries = self.shared.options.pool_size + 1;
        loop {
            let client = self.client(doing).await?;
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(|e| store_error(doing, e));
            let result = match statement {
                Ok(statement) => client
                    .query(&statement, params)
                    .await
                    .map_err(|e| store_error(doing, e)),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.store_kind() == Some(StoreErrorKind::Io) => {
                    // Not back into the pool: the session is gone.
                    drop(deadpool_postgres::Object::take(client));
                    tries -= 1;
                    if tries == 0 {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "a pooled PostgreSQL session broke; reading again");
                }
                other => return other,
            }
        }
    }

    /// Runs a write that is not an append on a pooled connection; returns the rows changed.
    async fn execute(
        &self,
        doing: &'static str,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let client = self.client(doing).await?;
        let statement = client
            .prepare_cached(sql)
            .await
            .map_err(|e| store_error(doing, e))?;
        let result = client
            .execute(&statement, params)
            .await
            .map_err(|e| store_error(doing, e));
        if let Err(e) = &result
            && e.store_kind() == Some(StoreErrorKind::Io)
        {
            // Not back into the pool: the session is gone.
            drop(deadpool_postgres::Object::take(client));
        }
        result
    }

    async fn write(&self, requests: Vec<AppendRequest>) -> Result<Vec<AppendOutcome>> {
        self.check_open()?;
        let (reply, result) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Append { requests, reply })
            .await
            .map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }
}

/// The writer answers an append with one outcome per request.
fn missing_outcome() -> Error {
    Error::Store {
        kind: StoreErrorKind::Other,
        message: "the writer returned no outcome for an append".to_owned(),
        source: None,
    }
}

#[async_trait]
impl EventLog for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        check_append(stream, &events)?;
        let span = tracing::debug_span!("eventfold.append", %stream, events = events.len());
        let requests = vec![AppendRequest {
            stream: stream.clone(),
            expected,
            events,
        }];
        let mut outcomes = self.write(requests).instrument(span).await?;
        outcomes.pop().ok_or_else(missing_outcome)
    }

    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Result<Vec<AppendOutcome>> {
        check_batch(&requests)?;
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let span = tracing::debug_span!("eventfold.append", appends = requests.len());
        self.write(requests).instrument(span).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_stream_page(stream, from_version, usize::MAX)
            .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // `LIMIT NULL` is no limit.
        let limit = i64::try_from(limit).ok();
        let rows = self
            .query(
                "reading a stream",
                sql::READ_STREAM,
                &[
                    &stream.aggregate_type,
                    &stream.aggregate_id,
                    &bound(from_version),
                    &limit,
                ],
            )
            .await?;
        let what = || format!("stream {stream} from version {}", from_version.max(1));
        let events = crate::archive::stream_rows(&rows, (1, 11), what)?
            .iter()
            .map(sql::event_from_row)
            .collect::<Result<Vec<_>>>()?;
        sql::check_versions(stream, from_version, &events)?;
        Ok(events)
    }

    async fn replay_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        visitor: Box<dyn ReplayVisitor>,
    ) -> Result<Box<dyn ReplayVisitor>> {
        let rows = self
            .query(
                "replaying a stream",
                sql::REPLAY_STREAM,
                &[
                    &stream.aggregate_type,
                    &stream.aggregate_id,
                    &bound(from_version),
                ],
            )
            .await?;
        let what = || format!("stream {stream} from version {}", from_version.max(1));
        let rows = crate::archive::stream_rows(&rows, (5, 6), what)?;
        sql::replay_rows(stream, from_version, rows, visitor)
    }

    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let wanted = limit;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "reading the log",
                sql::READ_ALL,
                &[&bound(from_position), &limit],
            )
            .await?;
        let events = sql::events_from_rows(&rows)?;
        // Where the read found a position missing: pruned, if an archive spans it.
        if let Some(missing) = crate::archive::check_rows(from_position, wanted, &rows)? {
            let rows = self
                .query(
                    "reading the archive horizon",
                    crate::archive::AT_POSITION,
                    &[&bound(missing)],
                )
                .await?;
            crate::archive::archived(&rows, || format!("position {missing}"))?;
        }
        Ok(events)
    }

    async fn get(&self, event_id: Uuid) -> Result<Option<RecordedEvent>> {
        let rows = self
            .query("reading an event by id", sql::BY_ID, &[&event_id])
            .await?;
        if rows.is_empty() {
            let rows = self
                .query(
                    "reading the archive horizon",
                    crate::archive::OF_ID,
                    &[&event_id],
                )
                .await?;
            crate::archive::archived(&rows, || format!("event {event_id}"))?;
            return Ok(None);
        }
        rows.first().map(sql::event_from_row).transpose()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64> {
        let rows = self
            .query(
                "reading a stream version",
                sql::STREAM_VERSION,
                &[&stream.aggregate_type, &stream.aggregate_id],
            )
            .await?;
        let version: i64 = rows.first().map_or(0, |row| row.get(0));
        sql::count(version, &format!("the version of {stream}"))
    }

    async fn head_position(&self) -> Result<u64> {
        let rows = self
            .query("reading the head position", sql::HEAD, &[])
            .await?;
        let head = sql::count(
            rows.first().map_or(0, |row| row.get(0)),
            "the head position",
        )?;
        // Another process may have appended: the watch hears of it now too.
        publish(&self.shared.head, head);
        Ok(head)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    async fn statistics(&self) -> Result<StoreStatistics> {
        let mut client = self.client("reading statistics").await?;
        sql::statistics(&mut client, &self.shared.options.schema).await
    }
}

#[async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let taken_at = nanos_of(snapshot.taken_at, "snapshot time").map_err(|e| Error::Store {
            kind: StoreErrorKind::Other,
            message: e.to_string(),
            source: None,
        })?;
        check_field(&snapshot.aggregate_type, "the snapshot's aggregate type")?;
        check_field(&snapshot.aggregate_id, "the snapshot's aggregate id")?;
        check_field(&snapshot.state, "the snapshot's state")?;
        // Versions are kept as `bigint` bit patterns, so one at 2^63 or more reads as
        // negative here: the `>= 0` terms compare them as the `u64` they are.
        self.execute(
            "saving a snapshot",
            "INSERT INTO ef_snapshots (stream_type, stream_id, version, schema_version, \
             state, taken_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (stream_type, stream_id) DO UPDATE SET \
             version = excluded.version, schema_version = excluded.schema_version, \
             state = excluded.state, taken_at = excluded.taken_at \
             WHERE NOT (ef_snapshots.version >= 0 AND excluded.version >= 0 \
                 AND ef_snapshots.version > excluded.version \
                 AND ef_snapshots.version <= (SELECT COALESCE(max(version), 0) FROM ef_events \
                     WHERE stream_type = $1 AND stream_id = $2))",
            &[
                &snapshot.aggregate_type,
                &snapshot.aggregate_id,
                &to_i64(snapshot.version),
                &i64::from(snapshot.schema_version),
                &snapshot.state,
                &taken_at,
            ],
        )
        .await
        .map(drop)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        let rows = self
            .query(
                "loading a snapshot",
                "SELECT version, schema_version, state, taken_at FROM ef_snapshots \
                 WHERE stream_type = $1 AND stream_id = $2",
                &[&stream.aggregate_type, &stream.aggregate_id],
            )
            .await?;
        rows.first()
            .map(|row| sql::snapshot_from_row(stream, row))
            .transpose()
    }
}

/// A time of a record that is not an event, or the error of one out of range.
pub(crate) fn record_time(time: chrono::DateTime<chrono::Utc>, what: &str) -> Result<i64> {
    nanos_of(time, what).map_err(|e| Error::Store {
        kind: StoreErrorKind::Other,
        message: e.to_string(),
        source: None,
    })
}

/// Archiving (`eventfold::archive`) on PostgreSQL: the horizon lives in the store's
/// schema (`ef_archives`, `ef_archived_streams`); a prune or a restore is one transaction
/// under the head row's lock, the one every append takes.
#[async_trait]
impl eventfold_core::ArchiveStore for PostgresEventStore {
    fn archive_store_name(&self) -> String {
        format!("postgres:{}", self.shared.location)
    }

    async fn read_stored(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query(
                "reading the log",
                sql::READ_ALL,
                &[&bound(from_position), &limit],
            )
            .await?;
        sql::events_from_rows(&rows)
    }

    async fn archive_horizon(&self) -> Result<Vec<ArchiveHorizon>> {
        let client = self.client("reading the archive horizon").await?;
        crate::archive::horizon(&**client).await
    }

    async fn prune_archive(&self, request: PruneRequest) -> Result<()> {
        let mut client = self.client("pruning an archive").await?;
        crate::archive::prune(&mut client, &request).await
    }

    async fn restore_archive(&self, archive: Uuid, events: Vec<RecordedEvent>) -> Result<()> {
        let mut client = self.client("restoring an archive").await?;
        crate::archive::restore(&mut client, archive, &events).await
    }
}

#[async_trait]
impl SubscriptionStore for PostgresEventStore {
    async fn load_checkpoint(&self, subscription: &str) -> Result<Option<u64>> {
        let rows = self
            .query(
                "loading a checkpoint",
                "SELECT position FROM ef_checkpoints WHERE subscription = $1",
                &[&subscription],
            )
            .await?;
        Ok(rows.first().map(|row| sql::to_u64(row.get(0))))
    }

    async fn save_checkpoint(&self, subscription: &str, position: u64) -> Result<()> {
        check_field(subscription, "the subscription name")?;
        let now = record_time(chrono::Utc::now(), "the checkpoint time")?;
        self.execute(
            "saving a checkpoint",
            "INSERT INTO ef_checkpoints (subscription, position, updated_at) \
             VALUES ($1, $2, $3) ON CONFLICT (subscription) DO UPDATE SET \
             position = excluded.position, updated_at = excluded.updated_at",
            &[&subscription, &to_i64(position), &now],
        )
        .await
        .map(drop)
    }

    async fn add_dead_letter(&self, dead_letter: NewDeadLetter) -> Result<u64> {
        let first = record_time(dead_letter.first_failed_at, "first failure time")?;
        let last = record_time(dead_letter.last_failed_at, "last failure time")?;
        check_field(&dead_letter.subscription, "the subscription name")?;
        check_field(&dead_letter.event_type, "the dead letter's event type")?;
        let error = dead_letter.error.replace('\0', "\u{fffd}");
        let rows = self
            .query(
                "adding a dead letter",
                sql::UPSERT_DEAD_LETTER,
                &[
                    &dead_letter.subscription,
                    &dead_letter.event_id,
                    &to_i64(dead_letter.position),
                    &dead_letter.event_type,
                    &error,
                    &i64::from(dead_letter.attempts),
                    &first,
                    &last,
                ],
            )
            .await?;
        rows.first()
            .map(|row| sql::to_u64(row.get(0)))
            .ok_or_else(|| Error::Store {
                kind: StoreErrorKind::Other,
                message: "adding a dead letter returned no id".to_owned(),
                source: None,
            })
    }

    async fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let rows = self
            .query("listing dead letters", sql::DEAD_LETTERS, &[&subscription])
            .await?;
        rows.iter().map(sql::dead_letter_from_row).collect()
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let removed = self
            .execute(
                "removing a dead letter",
                "DELETE FROM ef_dead_letters WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(removed > 0)
    }

    async fn clear_dead_letters(&self, subscription: Option<&str>) -> Result<u64> {
        self.execute(
            "clearing dead letters",
            "DELETE FROM ef_dead_letters WHERE $1::text IS NULL OR subscription = $1",
            &[&subscription],
        )
        .await
    }

    async fn record_failure(&self, failure: FailureRecord, retain: usize) -> Result<()> {
        let failed_at = record_time(failure.failed_at, "failure time")?;
        check_field(&failure.subscription, "the subscription name")?;
        let error = failure.error.replace('\0', "\u{fffd}");
        if retain == 0 {
            // Recorded and removed at once: what stays is none of the subscription's.
            return self
                .execute(
                    "recording a failure",
                    "DELETE FROM ef_failures WHERE subscription = $1",
                    &[&failure.subscription],
                )
                .await
                .map(drop);
        }
        let retain = i64::try_from(retain).unwrap_or(i64::MAX);
        // The insert and the pruning in one statement (one transaction). The pruning does
        // not see the new record: it keeps the newest `retain - 1` older ones.
        self.execute(
            "recording a failure",
            "WITH added AS (INSERT INTO ef_failures (subscription, event_id, position, \
                 attempt, error, duration_micros, failed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id) \
             DELETE FROM ef_failures WHERE subscription = $1 AND id <= \
                 (SELECT id FROM ef_failures WHERE subscription = $1 \
                  ORDER BY id DESC LIMIT 1 OFFSET $8::bigint - 1)",
            &[
                &failure.subscription,
                &failure.event_id,
                &to_i64(failure.position),
                &i64::from(failure.attempt),
                &error,
                &to_i64(failure.duration_micros),
                &failed_at,
                &retain,
            ],
        )
        .await
        .map(drop)
    }

    async fn failures(&self, subscription: &str, limit: usize) -> Result<Vec<FailureRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .query("listing failures", sql::FAILURES, &[&subscription, &limit])
            .await?;
        rows.iter()
            .map(|row| sql::failure_from_row(subscription, row))
            .collect()
    }

    async fn clear_failures(&self, subscription: Option<&str>) -> Result<u64> {
        self.execute(
            "clearing failure records",
            "DELETE FROM ef_failures WHERE $1::text IS NULL OR subscription = $1",
            &[&subscription],
        )
        .await
    }

    async fn request_replay(
        &self,
        target: ReplayTarget,
        requested_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<ReplayRequest>> {
        const DOING: &str = "storing a replay request";
        check_replay_target(&target)?;
        let at = record_time(requested_at, "the request time")?;
        // One statement each, so the check of what it names and the insert are atomic;
        // not repeated on a broken session (an insert may have been done).
        let client = self.client(DOING).await?;
        let run = |sql: &'static str| async {
            let statement = client
                .prepare_cached(sql)
                .await
                .map_err(|e| store_error(DOING, e))?;
            Ok::<_, Error>(statement)
        };
        let rows = match &target {
            ReplayTarget::DeadLetter { id } => {
                let Ok(wanted) = i64::try_from(*id) else {
                    return Err(Error::DeadLetterNotFound { id: *id });
                };
                let statement = run("INSERT INTO ef_replay_requests \
                     (subscription, dead_letter, requested_at) \
                     SELECT subscription, id, $2 FROM ef_dead_letters WHERE id = $1 \
                     RETURNING id, subscription, dead_letter")
                .await?;
                let rows = client
                    .query(&statement, &[&wanted, &at])
                    .await
                    .map_err(|e| store_error(DOING, e))?;
                if rows.is_empty() {
                    return Err(Error::DeadLetterNotFound { id: *id });
                }
                rows
            }
            ReplayTarget::Subscription { name } => {
                check_field(name, "the subscription name")?;
                let statement = run("INSERT INTO ef_replay_requests \
                     (subscription, requested_at) VALUES ($1, $2) \
                     RETURNING id, subscription, dead_letter")
                .await?;
                client
                    .query(&statement, &[name, &at])
                    .await
                    .map_err(|e| store_error(DOING, e))?
            }
            ReplayTarget::All => {
                let statement = run("INSERT INTO ef_replay_requests \
                     (subscription, requested_at) \
                     SELECT name, $1 FROM (SELECT DISTINCT subscription AS name \
                     FROM ef_dead_letters) AS names ORDER BY name \
                     RETURNING id, subscription, dead_letter")
                .await?;
                client
                    .query(&statement, &[&at])
                    .await
                    .map_err(|e| store_error(DOING, e))?
            }
        };
        let read = |e| store_error(DOING, e);
        let mut stored = rows
            .iter()
            .map(|row| {
                Ok(ReplayRequest {
                    id: sql::to_u64(row.try_get(0).map_err(read)?),
                    subscription: row.try_get(1).map_err(read)?,
                    dead_letter: row
                        .try_get::<_, Option<i64>>(2)
                        .map_err(read)?
                        .map(sql::to_u64),
                    requested_at,
                    finished: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        stored.sort_by_key(|r| r.id);
        Ok(stored)
    }

    async fn pending_replay_requests(&self, subscription: &str) -> Result<Vec<ReplayRequest>> {
        let rows = self
            .query(
                "listing replay requests",
                sql::PENDING_REPLAY_REQUESTS,
                &[&subscription],
            )
            .await?;
        rows.iter().map(sql::replay_request_from_row).collect()
    }

    async fn replay_requests(&self, subscription: Option<&str>) -> Result<Vec<ReplayRequest>> {
        let rows = self
            .query(
                "listing replay requests",
                sql::REPLAY_REQUESTS,
                &[&subscription],
            )
            .await?;
        rows.iter().map(sql::replay_request_from_row).collect()
    }

    async fn replay_request(&self, id: u64) -> Result<Option<ReplayRequest>> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(None);
        };
        let rows = self
            .query("reading a replay request", sql::REPLAY_REQUEST, &[&id])
            .await?;
        rows.first().map(sql::replay_request_from_row).transpose()
    }

    async fn finish_replay_request(
        &self,
        id: u64,
        finished: FinishedReplay,
        retain: usize,
    ) -> Result<bool> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let at = record_time(finished.at, "the finish time")?;
        let (counts, reason) = finished.outcome.to_columns();
        let [replayed, failed, held_back] = counts.map(|c| c.map(to_i64));
        // PostgreSQL's text cannot hold NUL.
        let reason = reason.map(|r| r.replace('\0', "\u{fffd}"));
        let changed = self
            .execute(
                "recording a replay's outcome",
                "UPDATE ef_replay_requests SET finished_at = $2, replayed = $3, failed = $4, \
                 held_back = $5, reason = $6 WHERE id = $1 AND finished_at IS NULL",
                &[&id, &at, &replayed, &failed, &held_back, &reason],
            )
            .await?;
        if changed == 0 {
            return Ok(false);
        }
        let retain = i64::try_from(retain.max(1)).unwrap_or(i64::MAX);
        self.execute(
            "removing old replay requests",
            "DELETE FROM ef_replay_requests WHERE finished_at IS NOT NULL AND id NOT IN \
             (SELECT id FROM ef_replay_requests WHERE finished_at IS NOT NULL \
              ORDER BY id DESC LIMIT $1)",
            &[&retain],
        )
        .await?;
        Ok(true)
    }
}
