//! [`SqliteEventStore`]: the handle, its read connections, and its store contract parts.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventfold_core::archive::{ArchiveHorizon, PruneRequest};
use eventfold_core::{
    AppendOutcome, AppendRequest, ArchiveStore, DeadLetter, EventLog, ExpectedVersion,
    FailureRecord, FinishedReplay, NewDeadLetter, NewEvent, RecordedEvent, ReplayRequest,
    ReplayTarget, ReplayVisitor, Snapshot, SnapshotStore, StoreStatistics, StreamId,
    SubscriptionStore, check_append, check_batch,
};
use rusqlite::Connection;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tracing::Instrument;
use uuid::Uuid;

use eventfold_core::{Error, Result};

use crate::error::{closed, open_failed_core, panicked, store_error};
use crate::follow::Follower;
use crate::options::SqliteOptions;
use crate::schema::{self, Location};
use crate::sql;
use crate::verify::VerifyReport;
use crate::writer::{
    Appended, Command, Counters, Reply, Work, Writer, checkpoint, encode_metadata,
};

/// Lease requests that may wait on the writer's lease lane: a bus has a few at a time.
const URGENT_CAPACITY: usize = 64;

/// An [`EventStore`](eventfold_core::EventStore) in a SQLite database: durable, one file, no server.
///
/// One writer connection, on its own thread, commits every write; appends that arrive
/// together are committed in one transaction (group commit), each with its own checks and
/// result. A few read connections serve reads in parallel (WAL mode). No call blocks the
/// async runtime; the store needs a Tokio runtime.
///
/// Cloning is cheap and shares the store. The writer stops once every clone is dropped
/// (after the writes already queued), or at [`close`](Self::close).
///
/// Several processes may open the same file: each append checks and numbers its events
/// inside its write transaction, so versions and positions stay gap-free across processes.
/// [`watch_head`](EventLog::watch_head) follows this store's own commits at once, and
/// those of other processes (and of other stores on the same file) within
/// [`SqliteOptions::external_change_poll`] (100 ms by default), by a cheap check that
/// runs only while someone watches; reads see them at once.
///
/// See the [crate docs](crate) for an example.
#[derive(Clone)]
pub struct SqliteEventStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// Follows other connections' commits into `head` while someone watches; `None` for
    /// an in-memory store or with polling off.
    follower: Option<Arc<Follower>>,
    /// `None`: reads go through the writer (an in-memory database, or no read connections).
    /// Declared (so dropped) before `commands`: the read connections are closed before the
    /// writer, which finds itself the last connection and leaves one complete file.
    readers: Option<Arc<ReadPool>>,
    commands: mpsc::Sender<Command>,
    /// The writer's lease lane, served before `commands` (see the `writer` module).
    urgent: mpsc::Sender<Work>,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    path: Option<PathBuf>,
    options: SqliteOptions,
    closed: AtomicBool,
}

/// What the writer has done since the store opened, and what waits for it.
///
/// `transactions` below `writes` shows group commit at work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WriterStatistics {
    /// Transactions committed.
    pub transactions: u64,
    /// Writes committed (appends, snapshots, checkpoints, dead letters, failure records).
    pub writes: u64,
    /// Appends among those writes (repeated, idempotent appends included).
    pub appends: u64,
    /// Checkpoints the idle writer ran that brought a grown WAL back to
    /// [`SqliteOptions::wal_size_limit`].
    pub checkpoints: u64,
    /// Writes in the transaction the writer is running right now.
    pub in_progress: usize,
    /// Commands waiting for the writer right now.
    pub queued: usize,
}

/// Read connections, each used by one blocking task at a time.
struct ReadPool {
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// A read connection taken from the pool, put back when dropped (even on a panic).
struct Checkout<'a> {
    pool: &'a ReadPool,
    conn: Option<Connection>,
}

impl ReadPool {
    fn new(connections: Vec<Connection>) -> Self {
        ReadPool {
            permits: Arc::new(Semaphore::new(connections.len())),
            idle: Mutex::new(connections),
        }
    }

    /// Takes a connection; the caller holds a permit, so one is idle.
    fn checkout(&self) -> Checkout<'_> {
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        Checkout { pool: self, conn }
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.pool.permits.is_closed() {
                // The store is closing: the connection closes now, not with the last handle.
                return;
            }
            self.pool
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

impl fmt::Debug for SqliteEventStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteEventStore")
            .field("path", &self.shared.path)
            .field("head", &*self.shared.head.borrow())
            .finish_non_exhaustive()
    }
}

impl SqliteEventStore {
    /// Opens the store in the database file at `path`, creating the file if it is missing
    /// (unless the options say read-only), and migrating its schema if it is older.
    ///
    /// Fails with [`Error::InvalidSetting`] for an option out of its range, and otherwise
    /// with [`Error::Open`] carrying the path and its
    /// [`StoreErrorKind`](eventfold_core::StoreErrorKind): `CannotOpen` when the directory
    /// is missing, `Corrupt` when the file is not a database of this store, `SchemaTooNew`
    /// when a newer version of this library wrote it.
    pub async fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self> {
        options.validate()?;
        let path = path.as_ref().to_owned();
        let runtime = tokio::runtime::Handle::current();
        spawn_blocking(move || Self::start(Some(path), options, Some(runtime))).await
    }

    /// Opens a store in a fresh in-memory database, gone when the store is dropped. Reads
    /// go through the writer connection (the option `read_connections` is ignored).
    pub async fn open_in_memory(options: SqliteOptions) -> Result<Self> {
        options.validate()?;
        spawn_blocking(move || Self::start(None, options, None)).await
    }

    fn start(
        path: Option<PathBuf>,
        options: SqliteOptions,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Result<Self> {
        let location = match &path {
            Some(path) => Location::File(path),
            None => Location::Memory,
        };
        let conn = schema::open_writer(location, &options)?;
        let head = sql::head(&conn)
            .map_err(|e| open_failed_core(&location.describe(), "reading the head", e))?;
        let readers = match &path {
            Some(path) if options.read_connections > 0 => {
                let connections = (0..options.read_connections)
                    .map(|_| schema::open_reader(path, &options))
                    .collect::<Result<Vec<_>>>()?;
                Some(Arc::new(ReadPool::new(connections)))
            }
            _ => None,
        };

        let head = Arc::new(watch::channel(head).0);
        let counters = Arc::new(Counters::default());
        let (commands, queue) = mpsc::channel(options.max_batch_appends.max(256) * 4);
        let (urgent, urgent_queue) = mpsc::channel(URGENT_CAPACITY);
        Writer::new(
            conn,
            queue,
            urgent_queue,
            Arc::clone(&head),
            Arc::clone(&counters),
            path.clone(),
            options.clone(),
        )
        .spawn()
        .map_err(|e| Error::Open {
            kind: eventfold_core::StoreErrorKind::Other,
            location: location.describe(),
            reason: "starting the writer thread".to_owned(),
            source: Some(Box::new(e)),
        })?;
        tracing::debug!(database = %location.describe(), head = *head.borrow(), "opened the SQLite event store");
        let follower = match (&path, runtime) {
            (Some(path), Some(runtime)) => {
                Follower::new(Arc::clone(&head), path.clone(), options.clone(), runtime)
            }
            _ => None,
        };
        Ok(SqliteEventStore {
            shared: Arc::new(Shared {
                follower,
                commands,
                urgent,
                readers,
                head,
                counters,
                path,
                options,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The options the store was opened with.
    pub(crate) fn options(&self) -> &SqliteOptions {
        &self.shared.options
    }

    /// The database file, or `None` for an in-memory store.
    pub fn path(&self) -> Option<&Path> {
        self.shared.path.as_deref()
    }

    /// Waits until the idle writer has run more than `count` of the checkpoints that
    /// [`WriterStatistics::checkpoints`] counts. For tests of the WAL's bound, which
    /// otherwise could only poll the statistics.
    #[doc(hidden)]
    pub async fn __idle_checkpoints_past(&self, count: u64) {
        let counters = &self.shared.counters;
        loop {
            let notified = counters.checkpointed.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a checkpoint in between wakes it.
            notified.as_mut().enable();
            if counters.checkpoints.load(Ordering::SeqCst) > count {
                return;
            }
            notified.await;
        }
    }

    /// What the writer has done: transactions and writes committed, commands queued.
    pub fn writer_statistics(&self) -> WriterStatistics {
        let counters = &self.shared.counters;
        let commands = &self.shared.commands;
        WriterStatistics {
            transactions: counters.transactions.load(Ordering::Relaxed),
            writes: counters.writes.load(Ordering::Relaxed),
            appends: counters.appends.load(Ordering::Relaxed),
            checkpoints: counters.checkpoints.load(Ordering::Relaxed),
            in_progress: counters.in_progress.load(Ordering::Relaxed),
            queued: commands.max_capacity() - commands.capacity(),
        }
    }

    /// Moves the database's size cap (see [`SqliteOptions::max_page_count`]) and returns
    /// the cap in force: SQLite never sets it below the database's current size.
    pub async fn set_max_page_count(&self, pages: u64) -> eventfold_core::Result<u64> {
        self.on_writer(move |conn| {
            schema::set_max_page_count(conn, pages)
                .map_err(|e| store_error("setting max_page_count", e))
        })
        .await
    }

    /// The streams with stored events, of one aggregate type when `aggregate_type` is
    /// given, ordered by type and id: each with its version, its stored events and its
    /// last event's position and time, for operators (the `eventfold` command's `streams
    /// ls`). One grouped read of the stream index; a stream whose events were all pruned
    /// into an archive is not listed.
    pub async fn streams(
        &self,
        aggregate_type: Option<&str>,
    ) -> eventfold_core::Result<Vec<eventfold_core::StreamSummary>> {
        let aggregate_type = aggregate_type.map(str::to_owned);
        self.read(move |conn| sql::streams(conn, aggregate_type.as_deref()))
            .await
    }

    /// Checks everything the store holds and reports what is damaged, without stopping at
    /// the first problem and without repairing anything: every event row (its checksum,
    /// its text, its id, its numbers, its metadata), the numbering (positions 1, 2, 3 … in
    /// the log, versions 1, 2, 3 … in each stream), and the file (SQLite's
    /// `PRAGMA integrity_check`).
    ///
    /// It reads every row in one read transaction, on a read connection: on a large store
    /// it takes a while, and appends go on meanwhile (they are not in the report). It fails
    /// only if the store cannot be read at all (closed, busy); damage, even a file SQLite
    /// refuses to read past, is in the report.
    pub async fn verify(&self) -> eventfold_core::Result<VerifyReport> {
        self.verify_with_progress(|_| {}).await
    }

    /// [`verify`](Self::verify), telling `progress` how far the scan of the event rows
    /// is: `done` of `total` rows (counted in the scan's own read transaction), from
    /// `done: 0` at the start, every 4,096 rows, to `done == total` when the rows are
    /// scanned (the stream and file checks after it take a fraction of that time). It is
    /// called on the store's read thread, so it should return quickly (update a progress
    /// bar, send on a channel). What the `eventfold` command's `verify` draws its bar with.
    pub async fn verify_with_progress(
        &self,
        mut progress: impl FnMut(eventfold_core::archive::Progress) + Send + 'static,
    ) -> eventfold_core::Result<VerifyReport> {
        self.read(move |conn| crate::verify::verify(conn, &mut progress))
            .await
    }

    /// Stops the store: the read connections close, the writer commits what was queued
    /// before, copies the whole WAL into the database file and truncates it
    /// (`wal_checkpoint(TRUNCATE)`, waiting for readers up to
    /// [`SqliteOptions::busy_timeout`]), takes the file out of WAL mode when no other
    /// connection has it open, and closes. The `.db` file alone then holds every commit
    /// (see [Files](crate#how-it-works)). Every later call fails with
    /// [`StoreErrorKind::Closed`](eventfold_core::StoreErrorKind::Closed). Closing twice
    /// is fine.
    ///
    /// Dropping every clone of the store does the same, without waiting for it.
    pub async fn close(&self) -> eventfold_core::Result<()> {
        self.shared.closed.store(true, Ordering::SeqCst);
        // The poller's connection first of all, and no poller starts after this.
        if let Some(follower) = &self.shared.follower {
            follower.stop().await;
        }
        // The read connections first, so that the writer is the last connection of this
        // store when it checkpoints (a read under way closes its connection when it ends).
        if let Some(readers) = &self.shared.readers {
            readers.permits.close();
            readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
        let (reply, closed) = oneshot::channel();
        if self
            .shared
            .commands
            .send(Command::Close(reply))
            .await
            .is_ok()
        {
            // An error here means the writer was gone already: closed all the same.
            let _ = closed.await;
        }
        Ok(())
    }

    /// Copies the whole write-ahead log into the database file and truncates it to zero
    /// bytes (`PRAGMA wal_checkpoint(TRUNCATE)`), between two write transactions.
    ///
    /// Returns `true` when it did; `false` when a read transaction (of another connection
    /// or process) still pinned part of the WAL after [`SqliteOptions::busy_timeout`]:
    /// what no reader pins is copied all the same, and the rest is copied by a later
    /// checkpoint. The writer runs such checkpoints by itself when it is idle and the WAL
    /// is over [`SqliteOptions::wal_size_limit`], and [`close`](Self::close) runs one; call
    /// this to shrink the WAL at a moment of your choosing (after a long report query let
    /// go, before copying the `.db` file). A read-only store fails with
    /// [`StoreErrorKind::ReadOnly`](eventfold_core::StoreErrorKind::ReadOnly).
    pub async fn checkpoint(&self) -> eventfold_core::Result<bool> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        self.on_writer(|conn| {
            if conn.is_readonly(rusqlite::MAIN_DB).unwrap_or(false) {
                return Err(eventfold_core::Error::Store {
                    kind: eventfold_core::StoreErrorKind::ReadOnly,
                    message: "a read-only store cannot checkpoint".to_owned(),
                    source: None,
                });
            }
            checkpoint(conn).map_err(|e| store_error("checkpointing the WAL", e))
        })
        .await
    }

    /// Writes a consistent copy of the store, as of one moment, to a new database file at
    /// `target`, with SQLite's online backup API, while the store goes on: appends are not
    /// blocked (the copy reads one snapshot, like any reader), and the copy holds every
    /// event committed before it started. The copy is a complete database that
    /// [`open`](Self::open) opens as a store.
    ///
    /// Fails with [`StoreErrorKind::CannotOpen`](eventfold_core::StoreErrorKind::CannotOpen)
    /// if `target` exists (nothing is overwritten) or cannot be created, and with the
    /// failure's kind otherwise (`Full`, `Io`...); a failed backup removes what it wrote.
    pub async fn backup(&self, target: impl AsRef<Path>) -> eventfold_core::Result<()> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        let target = target.as_ref().to_owned();
        if target.exists() {
            return Err(eventfold_core::Error::Store {
                kind: eventfold_core::StoreErrorKind::CannotOpen,
                message: format!(
                    "the backup target `{}` exists; a backup never overwrites a file",
                    target.display()
                ),
                source: None,
            });
        }
        match &self.shared.path {
            // A connection of its own: the copy takes no read connection from the pool.
            Some(path) => {
                let path = path.clone();
                let options = self.shared.options.clone();
                tokio::task::spawn_blocking(move || {
                    let source = schema::open_reader(&path, &options)?;
                    backup_to(&source, &target, options.busy_timeout)
                })
                .await
                .map_err(|_| closed())?
            }
            None => {
                let patience = self.shared.options.busy_timeout;
                self.on_writer(move |conn| backup_to(conn, &target, patience))
                    .await
            }
        }
    }

    async fn send(&self, command: Command) -> eventfold_core::Result<()> {
        self.shared
            .commands
            .send(command)
            .await
            .map_err(|_| closed())
    }

    /// Sends a write to the writer and waits for its committed result.
    pub(crate) async fn write<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> eventfold_core::Result<T> {
        let (reply, result) = oneshot::channel();
        self.send(command(reply)).await?;
        result.await.map_err(|_| closed())?
    }

    /// Runs `work` on the writer connection, between transactions.
    pub(crate) async fn on_writer<T, F>(&self, work: F) -> eventfold_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> eventfold_core::Result<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        self.send(Command::Run(Box::new(move |conn| {
            // A panic is this call's error; the writer goes on with the next command.
            let result = catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or_else(|payload| {
                Err(panicked("work on the writer connection", &*payload))
            });
            let _ = reply.send(result);
        })))
        .await?;
        result.await.map_err(|_| closed())?
    }

    /// Runs `work` on the writer connection between transactions, ahead of the writes
    /// queued (the lease lane): for segment-lease work, whose late answer stops a
    /// segment.
    pub(crate) async fn on_writer_first<T, F>(&self, work: F) -> eventfold_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> eventfold_core::Result<T> + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        self.shared
            .urgent
            .send(Box::new(move |conn| {
                // A panic is this call's error; the writer goes on with the next command.
                let result =
                    catch_unwind(AssertUnwindSafe(|| work(conn))).unwrap_or_else(|payload| {
                        Err(panicked("work on the writer connection", &*payload))
                    });
                let _ = reply.send(result);
            }))
            .await
            .map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }

    /// Runs a read on a read connection, off the async runtime (or on the writer when the
    /// store has no read connections).
    pub(crate) async fn read<T, F>(&self, work: F) -> eventfold_core::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> eventfold_core::Result<T> + Send + 'static,
    {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(closed());
        }
        let Some(pool) = &self.shared.readers else {
            return self.on_writer(work).await;
        };
        let permit = Arc::clone(&pool.permits)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let pool = Arc::clone(pool);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let checkout = pool.checkout();
            match &checkout.conn {
                Some(conn) => work(conn),
                None => Err(closed()),
            }
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(closed()),
        }
    }
}

/// Copies the database of `source` into a new file at `target`, in one step (one read
/// snapshot), trying again for up to `patience` while a lock stops it; removes the file if
/// that fails.
fn backup_to(
    source: &Connection,
    target: &Path,
    patience: std::time::Duration,
) -> eventfold_core::Result<()> {
    let fail = |doing: &'static str| move |e| store_error(doing, e);
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut copy = Connection::open_with_flags(target, flags).map_err(|e| {
        let mut error = store_error("creating the backup file", e);
        if let eventfold_core::Error::Store { kind, .. } = &mut error {
            *kind = eventfold_core::StoreErrorKind::CannotOpen;
        }
        error
    })?;
    let copied = (|| {
        let backup = rusqlite::backup::Backup::new(source, &mut copy)
            .map_err(fail("starting the backup"))?;
        let deadline = std::time::Instant::now() + patience;
        loop {
            match backup.step(-1).map_err(fail("copying the database"))? {
                rusqlite::backup::StepResult::Done => return Ok(()),
                // All pages in one step: only a lock on the copy (another program opened
                // it) or on the source makes it try again.
                _ if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                _ => {
                    return Err(eventfold_core::Error::Store {
                        kind: eventfold_core::StoreErrorKind::Busy,
                        message: format!(
                            "the backup stayed locked out for the busy timeout ({patience:?})"
                        ),
                        source: None,
                    });
                }
            }
        }
    })();
    let closed = copy
        .close()
        .map_err(|(_, e)| store_error("closing the backup file", e));
    let result = copied.and(closed);
    if result.is_err() {
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut file = target.as_os_str().to_owned();
            file.push(suffix);
            let _ = std::fs::remove_file(std::path::PathBuf::from(file));
        }
    }
    result
}

/// The writer answers an append with one outcome per request.
fn missing_outcome() -> eventfold_core::Error {
    eventfold_core::Error::Store {
        kind: eventfold_core::StoreErrorKind::Other,
        message: "the writer returned no outcome for an append".to_owned(),
        source: None,
    }
}

/// Runs blocking set-up work off the async runtime.
async fn spawn_blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the runtime shut down while opening the store: {e}"),
    }
}

#[async_trait]
impl EventLog for SqliteEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> eventfold_core::Result<AppendOutcome> {
        check_append(stream, &events)?;
        let span = tracing::debug_span!("eventfold.append", %stream, events = events.len());
        let requests = vec![AppendRequest {
            stream: stream.clone(),
            expected,
            events,
        }];
        let metadata = encode_metadata(&requests)?;
        let Appended {
            mut outcomes,
            spent,
        } = self
            .write(|reply| Command::Append {
                requests,
                metadata,
                reply,
            })
            .instrument(span)
            .await?;
        // Handed back by a busy writer, freed here rather than on its thread (an idle one
        // keeps them and frees them while it waits for work).
        drop(spent);
        outcomes.pop().ok_or_else(missing_outcome)
    }

    async fn append_batch(
        &self,
        requests: Vec<AppendRequest>,
    ) -> eventfold_core::Result<Vec<AppendOutcome>> {
        check_batch(&requests)?;
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let span = tracing::debug_span!("eventfold.append", appends = requests.len());
        let metadata = encode_metadata(&requests)?;
        let Appended { outcomes, spent } = self
            .write(|reply| Command::Append {
                requests,
                metadata,
                reply,
            })
            .instrument(span)
            .await?;
        // Handed back by a busy writer, freed here rather than on its thread (an idle one
        // keeps them and frees them while it waits for work).
        drop(spent);
        Ok(outcomes)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> eventfold_core::Result<Vec<RecordedEvent>> {
        self.read_stream_page(stream, from_version, usize::MAX)
            .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> eventfold_core::Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stream = stream.clone();
        self.read(move |conn| sql::read_stream(conn, &stream, from_version, limit))
            .await
    }

    async fn replay_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        visitor: Box<dyn ReplayVisitor>,
    ) -> eventfold_core::Result<Box<dyn ReplayVisitor>> {
        let stream = stream.clone();
        self.read(move |conn| sql::replay_stream(conn, &stream, from_version, visitor))
            .await
    }

    async fn read_all(
        &self,
        from_position: u64,
        limit: usize,
    ) -> eventfold_core::Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |conn| sql::read_all(conn, from_position, limit))
            .await
    }

    async fn get(&self, event_id: Uuid) -> eventfold_core::Result<Option<RecordedEvent>> {
        self.read(move |conn| sql::event_by_id(conn, event_id))
            .await
    }

    async fn stream_version(&self, stream: &StreamId) -> eventfold_core::Result<u64> {
        let stream = stream.clone();
        self.read(move |conn| sql::stream_version(conn, &stream))
            .await
    }

    async fn head_position(&self) -> eventfold_core::Result<u64> {
        self.read(sql::head).await
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        let receiver = self.shared.head.subscribe();
        // After subscribing: a poller that finds no receiver ends only before this.
        if let Some(follower) = &self.shared.follower
            && !self.shared.closed.load(Ordering::SeqCst)
        {
            follower.ensure_running();
        }
        receiver
    }

    async fn statistics(&self) -> eventfold_core::Result<StoreStatistics> {
        let on_disk = self.shared.path.is_some();
        self.read(move |conn| sql::statistics(conn, on_disk)).await
    }
}

#[async_trait]
impl SnapshotStore for SqliteEventStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> eventfold_core::Result<()> {
        self.write(|reply| Command::SaveSnapshot { snapshot, reply })
            .await
    }

    async fn load_snapshot(&self, stream: &StreamId) -> eventfold_core::Result<Option<Snapshot>> {
        let stream = stream.clone();
        self.read(move |conn| sql::load_snapshot(conn, &stream))
            .await
    }
}

#[async_trait]
impl SubscriptionStore for SqliteEventStore {
    async fn load_checkpoint(&self, subscription: &str) -> eventfold_core::Result<Option<u64>> {
        let subscription = subscription.to_owned();
        self.read(move |conn| sql::load_checkpoint(conn, &subscription))
            .await
    }

    async fn save_checkpoint(
        &self,
        subscription: &str,
        position: u64,
    ) -> eventfold_core::Result<()> {
        let subscription = subscription.to_owned();
        self.write(|reply| Command::SaveCheckpoint {
            subscription,
            position,
            reply,
        })
        .await
    }

    async fn add_dead_letter(&self, dead_letter: NewDeadLetter) -> eventfold_core::Result<u64> {
        self.write(|reply| Command::AddDeadLetter { dead_letter, reply })
            .await
    }

    async fn dead_letters(
        &self,
        subscription: Option<&str>,
    ) -> eventfold_core::Result<Vec<DeadLetter>> {
        let subscription = subscription.map(str::to_owned);
        self.read(move |conn| sql::dead_letters(conn, subscription.as_deref()))
            .await
    }

    async fn remove_dead_letter(&self, id: u64) -> eventfold_core::Result<bool> {
        self.write(|reply| Command::RemoveDeadLetter { id, reply })
            .await
    }

    async fn clear_dead_letters(&self, subscription: Option<&str>) -> eventfold_core::Result<u64> {
        let subscription = subscription.map(str::to_owned);
        self.write(|reply| Command::Clear {
            failures: false,
            subscription,
            reply,
        })
        .await
    }

    async fn record_failure(
        &self,
        failure: FailureRecord,
        retain: usize,
    ) -> eventfold_core::Result<()> {
        self.write(|reply| Command::RecordFailure {
            failure,
            retain,
            reply,
        })
        .await
    }

    async fn clear_failures(&self, subscription: Option<&str>) -> eventfold_core::Result<u64> {
        let subscription = subscription.map(str::to_owned);
        self.write(|reply| Command::Clear {
            failures: true,
            subscription,
            reply,
        })
        .await
    }

    async fn failures(
        &self,
        subscription: &str,
        limit: usize,
    ) -> eventfold_core::Result<Vec<FailureRecord>> {
        let subscription = subscription.to_owned();
        self.read(move |conn| sql::failures(conn, &subscription, limit))
            .await
    }
    async fn request_replay(
        &self,
        target: ReplayTarget,
        requested_at: DateTime<Utc>,
    ) -> eventfold_core::Result<Vec<ReplayRequest>> {
        self.on_writer(move |conn| crate::replay::request(conn, &target, requested_at))
            .await
    }

    async fn pending_replay_requests(
        &self,
        subscription: &str,
    ) -> eventfold_core::Result<Vec<ReplayRequest>> {
        let subscription = subscription.to_owned();
        self.read(move |conn| crate::replay::list(conn, Some(&subscription), true))
            .await
    }

    async fn replay_requests(
        &self,
        subscription: Option<&str>,
    ) -> eventfold_core::Result<Vec<ReplayRequest>> {
        let subscription = subscription.map(str::to_owned);
        self.read(move |conn| crate::replay::list(conn, subscription.as_deref(), false))
            .await
    }

    async fn replay_request(&self, id: u64) -> eventfold_core::Result<Option<ReplayRequest>> {
        self.read(move |conn| crate::replay::get(conn, id)).await
    }

    async fn finish_replay_request(
        &self,
        id: u64,
        finished: FinishedReplay,
        retain: usize,
    ) -> eventfold_core::Result<bool> {
        self.on_writer(move |conn| crate::replay::finish(conn, id, &finished, retain))
            .await
    }
}

#[async_trait]
impl ArchiveStore for SqliteEventStore {
    fn archive_store_name(&self) -> String {
        match &self.shared.path {
            Some(path) => format!("sqlite:{}", path.display()),
            None => "sqlite::memory:".to_owned(),
        }
    }

    async fn read_stored(
        &self,
        from_position: u64,
        limit: usize,
    ) -> eventfold_core::Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(move |conn| sql::read_stored(conn, from_position, limit))
            .await
    }

    async fn archive_horizon(&self) -> eventfold_core::Result<Vec<ArchiveHorizon>> {
        self.read(crate::archive::horizon).await
    }

    async fn prune_archive(&self, request: PruneRequest) -> eventfold_core::Result<()> {
        self.on_writer(move |conn| crate::archive::prune(conn, &request))
            .await
    }

    async fn restore_archive(
        &self,
        archive: Uuid,
        events: Vec<RecordedEvent>,
    ) -> eventfold_core::Result<()> {
        self.on_writer(move |conn| crate::archive::restore(conn, archive, &events))
            .await
    }
}

#[cfg(test)]
mod tests {
    use eventfold_core::StoreErrorKind;

    use super::*;

    #[tokio::test]
    async fn work_on_the_writer_that_panics_is_its_error_and_the_store_goes_on() {
        let store = SqliteEventStore::open_in_memory(SqliteOptions::new())
            .await
            .unwrap();
        let error = store
            .on_writer(|_| -> eventfold_core::Result<()> { panic!("the work went wrong") })
            .await
            .unwrap_err();
        assert_eq!(error.store_kind(), Some(StoreErrorKind::Other), "{error}");
        assert!(
            error.to_string().contains("panicked: the work went wrong"),
            "{error}"
        );
        // Reads of an in-memory store run on the writer: they still work, and so do writes.
        assert_eq!(store.head_position().await.unwrap(), 0);
        store.save_checkpoint("after", 7).await.unwrap();
        assert_eq!(store.load_checkpoint("after").await.unwrap(), Some(7));
        store.close().await.unwrap();
    }
}
