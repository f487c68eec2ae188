//! The writer: one connection on its own thread, fed by a channel of commands, committing
//! whatever is queued in one transaction (group commit).
//!
//! Each write of a group runs inside its own `SAVEPOINT`, so a refused write (a version
//! conflict, a taken event id) undoes only itself; a write that changes the database with a
//! single statement (a one-event append, a snapshot, a checkpoint...) needs none, as SQLite
//! undoes a failed statement by itself, and neither does the first write of a transaction:
//! if it fails, the transaction is rolled back whole and the others run in a new one.
//! Writes that arrive while the transaction runs join
//! it before its `COMMIT`. Replies go out only after the `COMMIT` succeeded; if
//! the `COMMIT` fails, every write of the group fails as `OutcomeUnknown`: SQLite may have
//! written the group to the WAL before the failure (a failed sync), so it may be stored.
//! If SQLite rolls the whole transaction back on a write's failure (it does on a full
//! disk), that write fails and the others run again in a new transaction; so does a write
//! that panics (its transaction is rolled back, the panic is its error).
//!
//! After a failure that may have left the connection in a bad state (an I/O error, a failed
//! `COMMIT`, a report of corruption), the writer checks itself before the next write: it
//! rolls back, drops its prepared statements, re-reads the head and the schema, and opens
//! a new connection if that fails.
//!
//! Segment-lease work (claims, renewals, releases, heartbeats) comes on a lane of its own,
//! which the writer serves before anything else: before each command of the main queue, as
//! soon as the group under way commits (a queued lease request stops the group from taking
//! more writes), and while a group waits for another process's write lock (the lock is
//! asked for in slices of [`LOCK_SLICE`]). A bus stops a segment whose renewal has not
//! answered within most of the lease time, so a renewal that queued behind bulk appends
//! would otherwise cost redeliveries under write load.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use eventfold_core::lease::SegmentLease;
use eventfold_core::metrics::StoreMetrics;
use eventfold_core::{
    AppendOutcome, AppendRequest, Error, ExpectedVersion, FailureRecord, Metadata, NewDeadLetter,
    NewEvent, Snapshot, StreamId,
};
use rusqlite::{CachedStatement, Connection, ErrorCode, params};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checksum::{self, StoredEvent};
use crate::error::Fault;
use crate::options::SqliteOptions;
use crate::schema::{self, Location};
use crate::sql::{self, bound, nanos, nanos_of, to_i64};
use crate::versions::StreamVersions;

/// The shortest the idle writer polls for the next write (unless
/// [`SqliteOptions::idle_poll`] is shorter): what it polls after a long gap. A caller just
/// answered sends its next write about 10 to 30 µs later at the soonest; had the writer
/// parked, that write would also pay a futex wake-up and a thread switch (tens of µs on a
/// virtual machine), and the writers that trickle in behind it would miss the group.
const MIN_IDLE_POLL: Duration = Duration::from_micros(50);

/// Answered appends the writer keeps to free when idle (see [`Writer::spent`]); it hands
/// those beyond back to their callers.
const SPENT_LIMIT: usize = 64;

/// How long one attempt of a group's `BEGIN IMMEDIATE` waits for another connection's
/// write lock before the writer serves the lease lane and tries again, up to
/// [`SqliteOptions::busy_timeout`] in all.
const LOCK_SLICE: Duration = Duration::from_millis(10);

/// Work on the writer connection between transactions, which sends its own reply.
pub(crate) type Work = Box<dyn FnOnce(&Connection) + Send>;

/// Where a write's result goes.
pub(crate) type Reply<T> = oneshot::Sender<eventfold_core::Result<T>>;

/// Work for the writer thread.
pub(crate) enum Command {
    /// One append, or a batch of appends to several streams, stored all or none.
    Append {
        requests: Vec<AppendRequest>,
        /// The metadata of every event of the requests, in order, encoded by the caller
        /// (see [`encode_metadata`]).
        metadata: Vec<EncodedMetadata>,
        reply: Reply<Appended>,
    },
    SaveSnapshot {
        snapshot: Snapshot,
        reply: Reply<()>,
    },
    SaveCheckpoint {
        subscription: String,
        position: u64,
        reply: Reply<()>,
    },
    /// A segment's checkpoint, saved only while its lease holds (checked in the same
    /// transaction): grouped with the other writes like a plain checkpoint, so a bus's
    /// fenced saves cost no transaction of their own.
    SaveSegmentCheckpoint {
        lease: SegmentLease,
        position: u64,
        reply: Reply<()>,
    },
    AddDeadLetter {
        dead_letter: NewDeadLetter,
        reply: Reply<u64>,
    },
    RemoveDeadLetter {
        id: u64,
        reply: Reply<bool>,
    },
    RecordFailure {
        failure: FailureRecord,
        retain: usize,
        reply: Reply<()>,
    },
    /// Removes the dead letters (`failures: false`) or failure records of a subscription,
    /// or all.
    Clear {
        failures: bool,
        subscription: Option<String>,
        reply: Reply<u64>,
    },
    /// Runs on the writer's connection between transactions: the reads of a store without
    /// read connections, and settings. It sends its own reply.
    Run(Work),
    /// Stops the writer after the writes queued before it; replies once the connection is
    /// closed.
    Close(oneshot::Sender<()>),
    /// A write that saves the checkpoint `panic` and then panics: the unit tests' stand-in
    /// for a bug in a write.
    #[cfg(test)]
    Panic {
        reply: Reply<()>,
    },
}

impl Command {
    /// How much of a group's event budget it takes.
    fn events(&self) -> usize {
        match self {
            Command::Append { requests, .. } => requests.iter().map(|r| r.events.len()).sum(),
            _ => 1,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(self, Command::Run(_) | Command::Close(_))
    }

    /// True when the write changes the database with one statement at most, so that its
    /// failure leaves nothing to undo: SQLite backs out a failed statement by itself and
    /// keeps the transaction (or rolls the whole transaction back, which the group handles).
    /// Such a write runs without a savepoint of its own.
    fn single_statement(&self) -> bool {
        match self {
            // One INSERT. Everything that can refuse it (the version, the time, the metadata)
            // is checked before it runs; if the INSERT itself fails, the DELETE that undoes an
            // append's earlier rows finds none. (An insert at a known version that breaks a
            // constraint is tried again after the probe: the failed one stored nothing.)
            Command::Append { requests, .. } => {
                matches!(requests.as_slice(), [request] if request.events.len() == 1)
            }
            // One INSERT, upsert or DELETE each (a segment's checkpoint reads its lease
            // first, and writes nothing when it is lost).
            Command::SaveSnapshot { .. }
            | Command::SaveCheckpoint { .. }
            | Command::SaveSegmentCheckpoint { .. }
            | Command::AddDeadLetter { .. }
            | Command::RemoveDeadLetter { .. }
            | Command::Clear { .. } => true,
            // An INSERT, then a DELETE of the records beyond the retention.
            Command::RecordFailure { .. } => false,
            #[cfg(test)]
            Command::Panic { .. } => true,
            Command::Run(_) | Command::Close(_) => false,
        }
    }

    /// Sends a write its answer. An append's requests go back to its caller to free, or,
    /// if `keep`, are returned for the writer to free when it is idle (see
    /// [`Writer::spent`]).
    fn answer(self, answer: Answer, keep: bool) -> Option<Spent> {
        fn send<T>(reply: Reply<T>, result: Result<T, Failure>) {
            // The caller may have stopped waiting; its write stands all the same.
            let _ = reply.send(result.map_err(Failure::into_error));
        }
        match (self, answer) {
            (
                Command::Append {
                    reply,
                    requests,
                    metadata,
                },
                Answer::Appended(result),
            ) => {
                let spent = (requests, metadata);
                let (back, kept) = if keep {
                    (None, Some(spent))
                } else {
                    (Some(spent), None)
                };
                send(
                    reply,
                    result.map(|outcomes| Appended {
                        outcomes,
                        spent: back,
                    }),
                );
                return kept;
            }
            (
                Command::SaveSnapshot { reply, .. }
                | Command::SaveCheckpoint { reply, .. }
                | Command::SaveSegmentCheckpoint { reply, .. }
                | Command::RecordFailure { reply, .. },
                Answer::Done(result),
            ) => send(reply, result),
            #[cfg(test)]
            (Command::Panic { reply }, Answer::Done(result)) => send(reply, result),
            (
                Command::AddDeadLetter { reply, .. } | Command::Clear { reply, .. },
                Answer::Added(result),
            ) => send(reply, result),
            (Command::RemoveDeadLetter { reply, .. }, Answer::Removed(result)) => {
                send(reply, result)
            }
            (command, Answer::Failed(failure)) => match command {
                Command::Append {
                    reply,
                    requests,
                    metadata,
                } => {
                    send(reply, Err(failure));
                    return Some((requests, metadata));
                }
                Command::SaveSnapshot { reply, .. }
                | Command::SaveCheckpoint { reply, .. }
                | Command::SaveSegmentCheckpoint { reply, .. }
                | Command::RecordFailure { reply, .. } => send(reply, Err(failure)),
                Command::AddDeadLetter { reply, .. } | Command::Clear { reply, .. } => {
                    send(reply, Err(failure))
                }
                Command::RemoveDeadLetter { reply, .. } => send(reply, Err(failure)),
                #[cfg(test)]
                Command::Panic { reply } => send(reply, Err(failure)),
                Command::Run(_) | Command::Close(_) => {}
            },
            _ => unreachable!("a write answered with another kind of result"),
        }
        None
    }
}

/// An answered append's requests and encoded metadata (a dozen allocations per event).
pub(crate) type Spent = (Vec<AppendRequest>, Vec<EncodedMetadata>);

/// What a stored append hands back: its outcomes, and what it was made of unless the
/// writer keeps that to free it when idle.
pub(crate) struct Appended {
    pub(crate) outcomes: Vec<AppendOutcome>,
    /// The append's requests, for the caller to free: the writer hands them back when it
    /// holds [`SPENT_LIMIT`] answered appends already (it is busy), rather than free them
    /// on the thread every append waits for.
    pub(crate) spent: Option<Spent>,
}

/// An event's metadata as the writer stores it, encoded by the caller before the append is
/// queued, so that the writer thread (which every append waits for) does not.
pub(crate) enum EncodedMetadata {
    /// None: the column is NULL.
    Empty,
    Json(String),
    /// Equal to the metadata of the event before in the same request (one command's
    /// correlation, mostly): encoded once per run of equal values, not per event.
    AsBefore,
}

/// The metadata of every event of `requests`, in order; a [`Error::Serialize`] if one does
/// not serialize.
pub(crate) fn encode_metadata(
    requests: &[AppendRequest],
) -> eventfold_core::Result<Vec<EncodedMetadata>> {
    let mut encoded = Vec::with_capacity(requests.iter().map(|r| r.events.len()).sum());
    for request in requests {
        let mut before: Option<&Metadata> = None;
        for event in &request.events {
            encoded.push(if before == Some(&event.metadata) {
                EncodedMetadata::AsBefore
            } else if event.metadata.is_empty() {
                EncodedMetadata::Empty
            } else {
                EncodedMetadata::Json(serde_json::to_string(&event.metadata).map_err(|source| {
                    Error::Serialize {
                        event_type: event.event_type.clone(),
                        source,
                    }
                })?)
            });
            before = Some(&event.metadata);
        }
    }
    Ok(encoded)
}

/// The version of a stream an append goes on from.
#[derive(Debug, Clone, Copy)]
enum StreamAt {
    /// The version the writer's commits left the stream at (see [`StreamVersions`]), not
    /// checked in this transaction.
    Known(u64),
    /// The version the probe read in this transaction.
    Probed(u64),
}

/// Why a write failed: refused by the store's rules, or a backend failure.
enum Failure {
    Refused(Error),
    Backend(Fault),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::Refused(error) => error,
            Failure::Backend(fault) => fault.to_error(),
        }
    }
}

impl Failure {
    /// A core error from a query: a backend failure keeps its kind (and marks the
    /// connection for a re-check where it says so); anything else refuses the write.
    fn from_core(error: Error) -> Self {
        match error {
            Error::Store { .. } => Failure::Backend(Fault::from_core(&error)),
            error => Failure::Refused(error),
        }
    }
}

impl From<Fault> for Failure {
    fn from(fault: Fault) -> Self {
        Failure::Backend(fault)
    }
}

/// A backend failure of `doing`.
fn fault(doing: &'static str) -> impl Fn(rusqlite::Error) -> Failure {
    move |e| Failure::Backend(Fault::new(doing, e))
}

/// The result of one write, sent once its transaction committed (or failed).
enum Answer {
    Appended(Result<Vec<AppendOutcome>, Failure>),
    Done(Result<(), Failure>),
    /// A dead letter's id, or how many rows a clear removed.
    Added(Result<u64, Failure>),
    Removed(Result<bool, Failure>),
    /// Failed before or after it ran, whatever it was.
    Failed(Failure),
}

impl Answer {
    /// True when the write failed in a way that may have left the connection unusable.
    fn shakes_the_connection(&self) -> bool {
        let failure = match self {
            Answer::Appended(Err(failure))
            | Answer::Done(Err(failure))
            | Answer::Added(Err(failure))
            | Answer::Removed(Err(failure))
            | Answer::Failed(failure) => failure,
            _ => return false,
        };
        matches!(failure, Failure::Backend(fault) if shakes_the_connection(fault))
    }

    fn failed(&self) -> bool {
        match self {
            Answer::Appended(result) => result.is_err(),
            Answer::Done(result) => result.is_err(),
            Answer::Added(result) => result.is_err(),
            Answer::Removed(result) => result.is_err(),
            Answer::Failed(_) => true,
        }
    }
}

/// What the writer has done, for [`WriterStatistics`](crate::WriterStatistics).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) transactions: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) appends: AtomicU64,
    /// Checkpoints the idle writer ran that brought the WAL back to its limit.
    pub(crate) checkpoints: AtomicU64,
    /// Wakes whoever waits for the next of those checkpoints.
    pub(crate) checkpointed: tokio::sync::Notify,
    /// Writes taken into the transaction under way.
    pub(crate) in_progress: AtomicUsize,
}

/// The state of the open transaction.
struct Group<'c> {
    /// The position of the last event, committed or in this transaction.
    head: u64,
    /// The commit time stamped on the group's events.
    recorded_at: i64,
    /// The one-row event insert, prepared at the group's first append and held to its end.
    insert: Held<'c>,
    /// The insert of [`sql::ROWS_PER_INSERT`] events, for longer appends; held likewise.
    insert_chunk: Held<'c>,
}

/// A statement prepared on first use and held for the rest of a transaction: a look-up
/// in the connection's statement cache (hashing the SQL, and clearing the bindings when
/// it goes back) cost about 2k instructions per one-event append, a tenth of the
/// writer's work.
struct Held<'c> {
    conn: &'c Connection,
    sql: &'static str,
    statement: Option<CachedStatement<'c>>,
}

impl<'c> Held<'c> {
    fn new(conn: &'c Connection, sql: &'static str) -> Self {
        Held {
            conn,
            sql,
            statement: None,
        }
    }

    /// The statement, prepared (from the cache) if it was not yet.
    fn get(&mut self) -> rusqlite::Result<&mut CachedStatement<'c>> {
        if self.statement.is_none() {
            self.statement = Some(self.conn.prepare_cached(self.sql)?);
        }
        Ok(self.statement.as_mut().expect("prepared just now"))
    }
}

/// The writes of one transaction, and their events.
struct Batch {
    commands: Vec<Command>,
    events: usize,
}

/// The writer's two lanes, and the command that did not fit the last group.
struct Queue {
    commands: mpsc::Receiver<Command>,
    /// The lease lane: work the writer serves before the main queue.
    urgent: mpsc::Receiver<Work>,
    /// A command taken from the queue that did not fit the last group.
    next: Option<Command>,
    max_appends: usize,
    max_events: usize,
}

impl Queue {
    /// Takes one more queued write into the group if it has room; false when there is
    /// none (a queued command that does not fit waits in `next`).
    fn pull(&mut self, group: &mut Batch) -> bool {
        // Lease work waits: the group commits with what it has, and the work runs next.
        if self.next.is_some()
            || group.commands.len() >= self.max_appends
            || !self.urgent.is_empty()
        {
            return false;
        }
        let Ok(command) = self.commands.try_recv() else {
            return false;
        };
        let events = group.events + command.events();
        if !command.is_write() || events > self.max_events {
            self.next = Some(command);
            return false;
        }
        group.events = events;
        group.commands.push(command);
        true
    }
}

/// The writer connection and its queue.
pub(crate) struct Writer {
    conn: Connection,
    /// Kept apart from the connection, so that a group can take more writes while it
    /// holds statements prepared on the connection.
    queue: Queue,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    metrics: StoreMetrics,
    /// The last commit time given out, so recorded times never run backwards here.
    last_recorded_at: i64,
    /// The database file (`None`: in memory), to reopen the connection after an I/O error.
    path: Option<PathBuf>,
    options: SqliteOptions,
    /// The write-ahead log of a file database opened for writing, which the idle writer
    /// keeps to [`SqliteOptions::wal_size_limit`] and `close` truncates.
    wal: Option<PathBuf>,
    /// Set by a failure that may have left the connection in a bad state (an I/O error, a
    /// failed `COMMIT`, a report of corruption): the writer checks itself before the next
    /// write.
    suspect: bool,
    /// The versions committed appends left their streams at.
    versions: RefCell<StreamVersions>,
    /// Answered appends, freed while the queue is empty, one at a time: freed by their
    /// caller, they hold up a lone appender's next append (about 400 instructions per
    /// event), which the writer does while it waits for work; freed before the next
    /// group, they would hold up every append of it. Up to [`SPENT_LIMIT`]; beyond,
    /// their callers free them.
    spent: Vec<Spent>,
    /// How long the idle writer polls before it parks.
    idle: IdlePoll,
}

/// How long the idle writer polls its queue before it parks (see
/// [`SqliteOptions::idle_poll`]): twice the last gap between running out of work and the
/// next command, between [`MIN_IDLE_POLL`] and the limit; the minimum again after a gap
/// longer than the limit (a caller that writes now and then is not worth polling for).
#[derive(Debug)]
struct IdlePoll {
    window: Duration,
    limit: Duration,
}

impl IdlePoll {
    fn new(limit: Duration) -> Self {
        IdlePoll {
            window: Self::floor(limit),
            limit,
        }
    }

    /// The shortest window under `limit`.
    fn floor(limit: Duration) -> Duration {
        MIN_IDLE_POLL.min(limit)
    }

    /// How long to poll now.
    fn window(&self) -> Duration {
        self.window
    }

    /// Learns from one wait: the time from running out of work to the next command.
    fn saw_gap(&mut self, gap: Duration) {
        let floor = Self::floor(self.limit);
        self.window = if gap > self.limit {
            floor
        } else {
            gap.saturating_mul(2).clamp(floor, self.limit)
        };
    }
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        commands: mpsc::Receiver<Command>,
        urgent: mpsc::Receiver<Work>,
        head: Arc<watch::Sender<u64>>,
        counters: Arc<Counters>,
        path: Option<PathBuf>,
        options: SqliteOptions,
    ) -> Self {
        Writer {
            conn,
            queue: Queue {
                commands,
                urgent,
                next: None,
                max_appends: options.max_batch_appends,
                max_events: options.max_batch_events,
            },
            idle: IdlePoll::new(options.idle_poll),
            head,
            counters,
            metrics: StoreMetrics::new("sqlite"),
            last_recorded_at: i64::MIN,
            wal: path
                .as_deref()
                .filter(|_| !options.read_only)
                .map(schema::wal_path),
            path,
            options,
            suspect: false,
            versions: RefCell::default(),
            spent: Vec::new(),
        }
    }

    /// Starts the writer on its own named thread.
    pub(crate) fn spawn(self) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("eventfold-sqlite-writer".to_owned())
            .spawn(move || self.run())
            .map(drop)
    }

    fn run(mut self) {
        let closed_by = loop {
            self.serve_urgent();
            let command = match self.queue.next.take() {
                Some(command) => command,
                None => match self.recv() {
                    Some(command) => command,
                    // Every handle of the store is gone.
                    None => break None,
                },
            };
            match command {
                Command::Run(work) => self.run_work(work),
                Command::Close(reply) => break Some(reply),
                write => {
                    let mut group = Batch {
                        events: write.events(),
                        commands: vec![write],
                    };
                    while self.queue.pull(&mut group) {}
                    // Each write catches its own panic (see `run_write`); should the group's
                    // own bookkeeping panic, the writer still goes on with the next command
                    // (that group's callers see their replies dropped).
                    if catch_unwind(AssertUnwindSafe(|| self.commit_group(group))).is_err() {
                        tracing::error!("the writer's group commit panicked; it goes on");
                        self.counters.in_progress.store(0, Ordering::Relaxed);
                        if !self.conn.is_autocommit() {
                            let _ = self.conn.execute_batch("ROLLBACK");
                        }
                    }
                }
            }
        };
        // Refuse what is still queued (callers see the store closed), then close the file.
        self.queue.commands.close();
        self.queue.urgent.close();
        self.queue.next = None;
        while self.queue.commands.try_recv().is_ok() {}
        while self.queue.urgent.try_recv().is_ok() {}
        self.leave_one_file();
        let Writer { conn, .. } = self;
        if let Err((_, e)) = conn.close() {
            tracing::warn!(error = %e, "closing the SQLite writer connection failed");
        }
        if let Some(reply) = closed_by {
            let _ = reply.send(());
        }
    }

    /// Runs work on the writer connection between transactions.
    fn run_work(&mut self, work: Work) {
        // The work answers its own panics (see `on_writer`); this is the last line.
        if catch_unwind(AssertUnwindSafe(|| work(&self.conn))).is_err() {
            tracing::error!("work on the writer connection panicked");
        }
        // Work runs between transactions and leaves none open for the next write.
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Runs the lease work queued on the urgent lane; the connection is between
    /// transactions.
    fn serve_urgent(&mut self) {
        while let Ok(work) = self.queue.urgent.try_recv() {
            self.run_work(work);
        }
    }

    /// Waits for the next command, of either lane (the lease lane first): polls for the
    /// [`IdlePoll`] window, then parks. `None` once every sender is gone.
    fn recv(&mut self) -> Option<Command> {
        let idle_since = Instant::now();
        let command = self.poll_then_park(idle_since);
        self.idle.saw_gap(idle_since.elapsed());
        command
    }

    fn poll_then_park(&mut self, idle_since: Instant) -> Option<Command> {
        let mut deadline = idle_since + self.idle.window();
        loop {
            if let Ok(work) = self.queue.urgent.try_recv() {
                return Some(Command::Run(work));
            }
            match self.queue.commands.try_recv() {
                Ok(command) => return Some(command),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if !self.spent.is_empty() => {
                    // One append at a time, looking at the queue in between.
                    self.spent.pop();
                    deadline = Instant::now() + self.idle.window();
                }
                Err(TryRecvError::Empty) if Instant::now() < deadline => {
                    // The callers need the CPU to send their writes: on a small machine a
                    // busy loop without yielding delays the very writes it waits for.
                    std::thread::yield_now();
                }
                Err(TryRecvError::Empty) => {
                    // Nothing to do: the moment to bring a grown WAL back to its limit.
                    self.idle_checkpoint();
                    return self.park();
                }
            }
        }
    }

    /// Parks the thread until a command comes on either lane; `None` once the main
    /// queue's senders are gone.
    fn park(&mut self) -> Option<Command> {
        let (urgent, commands) = (&mut self.queue.urgent, &mut self.queue.commands);
        block_on(std::future::poll_fn(|cx| {
            // A closed lease lane (its sender dropped) answers `None` at once: the main
            // queue decides.
            if let std::task::Poll::Ready(Some(work)) = urgent.poll_recv(cx) {
                return std::task::Poll::Ready(Some(Command::Run(work)));
            }
            commands.poll_recv(cx)
        }))
    }

    /// Copies the WAL into the database file and truncates it, if it is larger than its
    /// limit; never waits for a reader (what a reader pins stays in the WAL).
    fn idle_checkpoint(&mut self) {
        let Some(wal) = &self.wal else {
            return;
        };
        match std::fs::metadata(wal) {
            Ok(meta) if meta.len() > self.options.wal_size_limit => {}
            _ => return,
        }
        let checkpointed = self
            .conn
            .busy_timeout(Duration::ZERO)
            .and_then(|()| checkpoint(&self.conn));
        let _ = self.conn.busy_timeout(self.options.busy_timeout);
        match checkpointed {
            Ok(true) => {
                self.counters.checkpoints.fetch_add(1, Ordering::SeqCst);
                self.counters.checkpointed.notify_waiters();
                tracing::debug!("the idle SQLite writer checkpointed and truncated the WAL");
            }
            Ok(false) => {
                tracing::debug!("a reader pins the WAL; the idle checkpoint copied what it could")
            }
            Err(e) => tracing::warn!(error = %e, "the idle WAL checkpoint failed"),
        }
    }

    /// On close: copies the whole WAL into the database file and switches the file out of
    /// WAL mode (best effort, when no other connection has it open), so the `.db` file
    /// alone holds every commit and opens on read-only media; the next open switches it
    /// back to WAL.
    fn leave_one_file(&mut self) {
        if self.wal.is_none() {
            return;
        }
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        match checkpoint(&self.conn) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    "closing the SQLite store: a reader still pins the WAL, so the last \
                     commits stay in the -wal file next to the database"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "closing the SQLite store: the WAL checkpoint failed");
                return;
            }
        }
        // Another connection to the file (another process) keeps it in WAL mode: fine.
        let _ = self.conn.busy_timeout(Duration::ZERO);
        let mode = self
            .conn
            .query_row("PRAGMA journal_mode = DELETE", [], |row| {
                row.get::<_, String>(0)
            });
        tracing::debug!(?mode, "closing the SQLite store: journal mode");
    }

    /// Runs a group of writes in one transaction and answers each after the commit.
    fn commit_group(&mut self, mut group: Batch) {
        let started = Instant::now();
        self.counters
            .in_progress
            .store(group.commands.len(), Ordering::Relaxed);
        if self.suspect
            && let Err(fault) = self.recheck()
        {
            tracing::warn!(error = %fault.to_error(), "the SQLite writer is not usable yet");
            self.counters.in_progress.store(0, Ordering::Relaxed);
            for command in group.commands {
                self.spent
                    .extend(command.answer(Answer::Failed(fault.clone().into()), true));
            }
            return;
        }
        // Answers that stand whatever happens to the rest of the group.
        let mut settled: Vec<Option<Answer>> = group.commands.iter().map(|_| None).collect();
        let committed = 'attempt: loop {
            let (head, recorded_at) = match self.begin() {
                Ok(begun) => begun,
                Err(fault) => break Err(fault),
            };
            let mut state = Group {
                head,
                recorded_at,
                insert: Held::new(&self.conn, sql::INSERT_EVENT),
                insert_chunk: Held::new(&self.conn, &sql::INSERT_EVENTS),
            };
            let mut answers: Vec<Option<Answer>> = Vec::with_capacity(group.commands.len());
            // Whether a write ran in this transaction yet.
            let mut ran = false;
            let mut i = 0;
            loop {
                if i == group.commands.len() {
                    // Writes that arrived while this transaction ran join it: they cost no
                    // extra disk sync, and wait no longer than if they had waited outside.
                    if !self.queue.pull(&mut group) {
                        break;
                    }
                    settled.push(None);
                    self.counters
                        .in_progress
                        .store(group.commands.len(), Ordering::Relaxed);
                }
                if settled[i].is_some() {
                    answers.push(None);
                    i += 1;
                    continue;
                }
                let first = !ran;
                let answer = self.run_write(&group.commands[i], &mut state, first);
                if self.conn.is_autocommit() {
                    // SQLite rolled back the whole transaction (it does on some full-disk
                    // and I/O errors), or the transaction's first write failed and took it
                    // with it: this write fails, the others run again in a new one.
                    settled[i] = Some(if answer.failed() {
                        answer
                    } else {
                        Answer::Failed(Fault::from_core(&transaction_lost()).into())
                    });
                    continue 'attempt;
                }
                answers.push(Some(answer));
                ran = true;
                i += 1;
            }
            break match self.savepoint("COMMIT") {
                Ok(()) => Ok((answers, state.head)),
                Err(fault) => {
                    if !self.conn.is_autocommit() {
                        let _ = self.conn.execute_batch("ROLLBACK");
                    }
                    // Whatever the failure, SQLite may have written the whole group to the
                    // WAL before it failed (a failed sync after the commit frame, say): the
                    // outcome is not known, only that a re-append of the same events stores
                    // them exactly once.
                    Err(fault.at_commit())
                }
            };
        };
        let group = group.commands;
        let shaken = match &committed {
            Ok((answers, _)) => answers.iter().flatten().any(Answer::shakes_the_connection),
            Err(fault) => shakes_the_connection(fault),
        } || settled.iter().flatten().any(Answer::shakes_the_connection);
        self.suspect |= shaken;

        match committed {
            Ok((answers, head)) => {
                let answers: Vec<Answer> = settled
                    .into_iter()
                    .zip(answers)
                    .map(|(settled, answer)| {
                        settled.or(answer).expect("every write of the group ran")
                    })
                    .collect();
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                let (mut appends, mut events) = (0, 0);
                for answer in answers.iter().filter(|a| !a.failed()) {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                    if let Answer::Appended(Ok(outcomes)) = answer {
                        appends += outcomes.len() as u64;
                        events += outcomes
                            .iter()
                            .map(|o| o.last_position + 1 - o.first_position)
                            .sum::<u64>();
                    }
                }
                self.counters.appends.fetch_add(appends, Ordering::Relaxed);
                self.metrics.committed(appends, events, started.elapsed());
                // Published before the answers, so an appender that then looks at the
                // watch sees its own append.
                self.head.send_if_modified(|published| {
                    let moved = head > *published;
                    if moved {
                        *published = head;
                    }
                    moved
                });
                self.remember_versions(&group, &answers);
                self.counters.in_progress.store(0, Ordering::Relaxed);
                for (command, answer) in group.into_iter().zip(answers) {
                    let keep = self.spent.len() < SPENT_LIMIT;
                    self.spent.extend(command.answer(answer, keep));
                }
            }
            Err(fault) => {
                tracing::warn!(error = %fault.to_error(), writes = group.len(), "a group commit failed");
                self.metrics.failed();
                self.counters.in_progress.store(0, Ordering::Relaxed);
                for (command, settled) in group.into_iter().zip(settled) {
                    let answer = settled.unwrap_or_else(|| Answer::Failed(fault.clone().into()));
                    self.spent.extend(command.answer(answer, true));
                }
            }
        }
    }

    /// Runs one write, catching a panic: the panicking write fails with its message, and
    /// its transaction is rolled back whole (what the write did before it panicked is not
    /// known), so the group runs the other writes again in a new one.
    fn execute_caught(&self, command: &Command, state: &mut Group) -> Answer {
        match catch_unwind(AssertUnwindSafe(|| self.execute(command, state))) {
            Ok(answer) => answer,
            Err(payload) => {
                tracing::error!(
                    panic = crate::error::panic_message(&*payload),
                    "a write panicked; its transaction is rolled back"
                );
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                Answer::Failed(Fault::panicked("the write", &*payload).into())
            }
        }
    }

    /// Runs one write in its own savepoint, undoing it alone if it fails. The `first`
    /// write of a transaction needs none: if it fails, the transaction is rolled back
    /// whole (nothing else ran in it) and the group goes on in a new one.
    fn run_write(&self, command: &Command, state: &mut Group, first: bool) -> Answer {
        let head_before = state.head;
        if first && !command.single_statement() {
            // A savepoint makes SQLite copy every page the write changes to a statement
            // journal (spilled to a temporary file past 64 KiB): for a lone appender of
            // 100-event appends, about a third more page writes than its commits'.
            let answer = self.execute_caught(command, state);
            if answer.failed() {
                state.head = head_before;
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
            }
            return answer;
        }
        if command.single_statement() {
            // Two statements fewer: about a quarter of the writer's time per one-event append.
            let answer = self.execute_caught(command, state);
            if answer.failed() {
                state.head = head_before;
            }
            return answer;
        }
        if let Err(fault) = self.savepoint("SAVEPOINT write") {
            return Answer::Failed(fault.into());
        }
        let mut answer = self.execute_caught(command, state);
        if !answer.failed()
            && let Err(fault) = self.savepoint("RELEASE write")
        {
            answer = Answer::Failed(fault.into());
        }
        if answer.failed() {
            state.head = head_before;
            // A write that cannot be undone alone takes its transaction with it.
            if !self.conn.is_autocommit() && self.rollback_savepoint().is_err() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
        }
        answer
    }

    /// Checks the connection after a failure that may have broken it: rolls back what may
    /// be left of a transaction, drops the prepared statements, and reads the head and the
    /// schema. If that fails, opens a new connection to the file. Publishes the head it
    /// finds (a group whose outcome was unknown may be stored).
    fn recheck(&mut self) -> Result<(), Fault> {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.conn.flush_prepared_statement_cache();
        self.versions.get_mut().forget();
        let head = match check(&self.conn) {
            Ok(head) => head,
            Err(first) => {
                let Some(path) = &self.path else {
                    return Err(first);
                };
                tracing::warn!(error = %first.to_error(), "the SQLite writer reopens its connection");
                let conn = schema::open_writer(Location::File(path), &self.options)
                    .map_err(|e| Fault::from_core(&e))?;
                let head = check(&conn)?;
                // Keep a size cap moved since the open (`set_max_page_count`).
                let cap = self
                    .conn
                    .query_row("PRAGMA max_page_count", [], |row| row.get::<_, i64>(0));
                if let Ok(cap) = cap {
                    let _ = schema::set_max_page_count(&conn, cap.max(1) as u64);
                }
                let old = std::mem::replace(&mut self.conn, conn);
                if let Err((_, e)) = old.close() {
                    tracing::warn!(error = %e, "closing the old SQLite writer connection failed");
                }
                head
            }
        };
        self.suspect = false;
        tracing::info!(
            head,
            "the SQLite writer checked its connection after a failure"
        );
        self.head.send_if_modified(|published| {
            let moved = head > *published;
            if moved {
                *published = head;
            }
            moved
        });
        Ok(())
    }

    /// Begins a write transaction and reads the head inside it (another process may have
    /// appended since this writer's last commit); returns the head and the commit time.
    fn begin(&mut self) -> Result<(u64, i64), Fault> {
        self.lock()?;
        let head = match sql::head(&self.conn) {
            Ok(head) => head,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(Fault::from_core(&e));
            }
        };
        let data_version = self
            .conn
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)));
        match data_version {
            Ok(data_version) => self
                .versions
                .get_mut()
                .begin(data_version, self.conn.total_changes()),
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(Fault::new("reading the data version", e));
            }
        }
        let now = nanos(Utc::now()).unwrap_or(i64::MAX);
        self.last_recorded_at = self.last_recorded_at.max(now);
        Ok((head, self.last_recorded_at))
    }

    /// Starts the group's write transaction (`BEGIN IMMEDIATE`), waiting for another
    /// connection's write lock up to the busy timeout, in slices of [`LOCK_SLICE`]: between
    /// them the lease lane is served (its work waits for the same lock, but alone, not
    /// behind this group), so a renewal is not held up for the whole wait.
    fn lock(&mut self) -> Result<(), Fault> {
        let patience = self.options.busy_timeout;
        let started = Instant::now();
        let result = loop {
            let left = patience.saturating_sub(started.elapsed());
            // A failure to set the timeout leaves the one in force: only the slicing is lost.
            let _ = self.conn.busy_timeout(left.min(LOCK_SLICE));
            match self.savepoint("BEGIN IMMEDIATE") {
                Err(fault)
                    if fault.kind() == eventfold_core::StoreErrorKind::Busy
                        && started.elapsed() < patience =>
                {
                    let _ = self.conn.busy_timeout(patience);
                    self.serve_urgent();
                }
                result => break result,
            }
        };
        let _ = self.conn.busy_timeout(patience);
        result
    }

    /// Runs one transaction-control statement.
    fn savepoint(&self, statement: &'static str) -> Result<(), Fault> {
        self.conn
            .prepare_cached(statement)
            .and_then(|mut stmt| stmt.execute([]))
            .map(drop)
            .map_err(|e| Fault::new(statement, e))
    }

    /// Undoes the current write, keeping the transaction.
    fn rollback_savepoint(&self) -> Result<(), Fault> {
        self.savepoint("ROLLBACK TO write")?;
        self.savepoint("RELEASE write")
    }

    fn execute(&self, command: &Command, state: &mut Group) -> Answer {
        match command {
            Command::Append {
                requests, metadata, ..
            } => {
                let mut metadata = metadata.as_slice();
                Answer::Appended(
                    requests
                        .iter()
                        .map(|r| {
                            let (mine, rest) = metadata.split_at(r.events.len());
                            metadata = rest;
                            self.append(&r.stream, r.expected, &r.events, mine, state)
                        })
                        .collect(),
                )
            }
            Command::SaveSnapshot { snapshot, .. } => Answer::Done(self.save_snapshot(snapshot)),
            Command::SaveCheckpoint {
                subscription,
                position,
                ..
            } => Answer::Done(self.save_checkpoint(subscription, *position, state.recorded_at)),
            Command::SaveSegmentCheckpoint {
                lease, position, ..
            } => Answer::Done(self.save_segment_checkpoint(lease, *position, state.recorded_at)),
            Command::AddDeadLetter { dead_letter, .. } => {
                Answer::Added(self.add_dead_letter(dead_letter))
            }
            Command::RemoveDeadLetter { id, .. } => Answer::Removed(self.remove_dead_letter(*id)),
            Command::RecordFailure {
                failure, retain, ..
            } => Answer::Done(self.record_failure(failure, *retain)),
            Command::Clear {
                failures,
                subscription,
                ..
            } => Answer::Added(self.clear(*failures, subscription.as_deref())),
            #[cfg(test)]
            Command::Panic { .. } => {
                let _ = self.save_checkpoint("panic", 1, state.recorded_at);
                panic!("a write went wrong");
            }
            Command::Run(_) | Command::Close(_) => unreachable!("only writes are grouped"),
        }
    }

    /// Appends `events` if `expected` holds, or recognizes a repeated append. Same rules,
    /// in the same order, as the in-memory store: a repeat is recognized before the version
    /// is checked.
    fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        metadata: &[EncodedMetadata],
        state: &mut Group,
    ) -> Result<AppendOutcome, Failure> {
        let stream_hash = checksum::stream_hash(
            stream.aggregate_type.as_bytes(),
            stream.aggregate_id.as_bytes(),
        );
        // A stream expected at the version the writer knows it at needs no probe: if it
        // moved on after all, the first insert stores nothing and the append is judged
        // again below.
        let known = match expected {
            ExpectedVersion::Exact(version) => Some(version),
            ExpectedVersion::Any | ExpectedVersion::NoStream => None,
        };
        let at_known = self.versions.borrow_mut().at(stream_hash, stream, known);
        if let Some(version) = known
            && at_known
            && let Some(outcome) = self.insert(
                stream,
                stream_hash,
                StreamAt::Known(version),
                events,
                metadata,
                state,
            )?
        {
            return Ok(outcome);
        }
        let actual = sql::stream_version(&self.conn, stream).map_err(Failure::from_core)?;
        if !expected.matches(actual) {
            // A repeat of a stored append carries a stale expectation: recognize it first.
            if let Some(outcome) = self.replayed(stream, events)? {
                return Ok(outcome);
            }
            return Err(Failure::Refused(Error::VersionConflict {
                aggregate_type: stream.aggregate_type.clone(),
                aggregate_id: stream.aggregate_id.clone(),
                expected,
                actual,
            }));
        }
        let at = StreamAt::Probed(actual);
        match self.insert(stream, stream_hash, at, events, metadata, state)? {
            Some(outcome) => Ok(outcome),
            None => unreachable!("only a checked insert finds its stream at another version"),
        }
    }

    /// Inserts `events` (with their `encoded` metadata) after the version `at` of their
    /// stream (of hash `stream_hash`), or recognizes a repeated append. At a
    /// [`StreamAt::Known`] version: `None` if the first insert breaks a constraint (nothing
    /// is stored; the append is to be judged with the probe).
    fn insert(
        &self,
        stream: &StreamId,
        stream_hash: u64,
        at: StreamAt,
        events: &[NewEvent],
        encoded: &[EncodedMetadata],
        state: &mut Group,
    ) -> Result<Option<AppendOutcome>, Failure> {
        let (actual, known) = match at {
            StreamAt::Known(version) => (version, true),
            StreamAt::Probed(version) => (version, false),
        };
        // Versions and positions are stored as SQLite integers: none goes past `i64::MAX`.
        let count = events.len() as u64;
        let last_version = actual
            .checked_add(count)
            .filter(|v| *v <= sql::MAX_STORED)
            .ok_or_else(|| {
                Failure::Refused(Error::InvalidAppend {
                    reason: format!(
                        "{stream} is at version {actual}: {count} more events would take it \
                         past the last version the SQLite store keeps ({})",
                        sql::MAX_STORED
                    ),
                })
            })?;
        let last_position = state
            .head
            .checked_add(count)
            .filter(|p| *p <= sql::MAX_STORED)
            .ok_or_else(|| {
                Failure::Refused(Error::InvalidAppend {
                    reason: format!(
                        "the log is at position {}: {count} more events would take it past the \
                         last position the SQLite store keeps ({})",
                        state.head,
                        sql::MAX_STORED
                    ),
                })
            })?;
        let first_position = state.head + 1;
        let mut metadata: Option<&str> = None;
        // Whether the one-row insert holds this append's stream, time and metadata yet.
        let mut one_row_bound = false;
        let mut i = 0;
        while i < events.len() {
            // Whole chunks of a longer append go in multi-row inserts: a statement's own
            // work (opening its cursors, halting, its reset) is paid once per chunk instead
            // of once per event. A failed one stores none of its rows.
            let chunk = if events.len() - i >= sql::ROWS_PER_INSERT {
                sql::ROWS_PER_INSERT
            } else {
                1
            };
            let statement = if chunk == 1 {
                &mut state.insert
            } else {
                &mut state.insert_chunk
            };
            let insert = statement.get().map_err(fault("preparing the insert"))?;
            // SQLite keeps a statement's bindings from one execution to the next: in the
            // one-row insert, what is the same for the whole append (the stream, the commit
            // time, mostly the metadata) is bound at its first event only.
            let first_use = chunk > 1 || !one_row_bound;
            let mut bound_rows = Ok(());
            for (row, event) in events[i..i + chunk].iter().enumerate() {
                let n = i + row;
                let occurred_at = nanos(event.occurred_at).ok_or_else(|| {
                    Failure::Refused(Error::InvalidAppend {
                        reason: format!(
                            "event {} occurred at {}, outside the years 1677 to 2262 that the \
                             SQLite store keeps exactly",
                            event.event_id, event.occurred_at
                        ),
                    })
                })?;
                let metadata_moved = match &encoded[n] {
                    EncodedMetadata::Empty => {
                        metadata = None;
                        true
                    }
                    EncodedMetadata::Json(json) => {
                        metadata = Some(json);
                        true
                    }
                    EncodedMetadata::AsBefore => false,
                };
                let offset = n as u64;
                let stored = StoredEvent {
                    position: bound(first_position + offset),
                    event_id: &event.event_id.as_bytes()[..],
                    aggregate_type: stream.aggregate_type.as_bytes(),
                    aggregate_id: stream.aggregate_id.as_bytes(),
                    version: bound(actual + 1 + offset),
                    event_type: event.event_type.as_bytes(),
                    schema_version: i64::from(event.schema_version),
                    occurred_at,
                    recorded_at: state.recorded_at,
                    metadata: metadata.map(str::as_bytes),
                    payload: event.payload.as_bytes(),
                };
                let base = row * sql::EVENT_COLUMNS;
                bound_rows = (|| {
                    if first_use {
                        insert.raw_bind_parameter(base + 3, &stream.aggregate_type)?;
                        insert.raw_bind_parameter(base + 4, &stream.aggregate_id)?;
                        insert.raw_bind_parameter(base + 9, state.recorded_at)?;
                    }
                    if first_use || metadata_moved {
                        insert.raw_bind_parameter(base + 10, metadata)?;
                    }
                    insert.raw_bind_parameter(base + 1, stored.position)?;
                    insert.raw_bind_parameter(base + 2, stored.event_id)?;
                    insert.raw_bind_parameter(base + 5, stored.version)?;
                    insert.raw_bind_parameter(base + 6, &event.event_type)?;
                    insert.raw_bind_parameter(base + 7, event.schema_version)?;
                    insert.raw_bind_parameter(base + 8, occurred_at)?;
                    insert.raw_bind_parameter(base + 11, &event.payload)?;
                    insert.raw_bind_parameter(base + 12, stored.checksum_in(stream_hash))
                })();
                if bound_rows.is_err() {
                    break;
                }
            }
            let inserted = bound_rows.and_then(|()| insert.raw_execute());
            one_row_bound |= chunk == 1 && inserted.is_ok();
            if let Err(e) = inserted {
                if i == 0 && known && e.sqlite_error_code() == Some(ErrorCode::ConstraintViolation)
                {
                    // The stream moved on, or an event id is taken: nothing is stored.
                    return Ok(None);
                }
                if e.sqlite_error_code() != Some(ErrorCode::ConstraintViolation) {
                    return Err(Failure::Backend(Fault::new("inserting an event", e)));
                }
                // The writer holds the write lock and checked the version, so only an event
                // id can be taken: undo this append's rows (the last ones; a batch's earlier
                // appends stay), then judge it as a repeat.
                self.conn
                    .prepare_cached("DELETE FROM events WHERE position >= ?1")
                    .and_then(|mut stmt| stmt.execute([bound(first_position)]))
                    .map_err(fault("undoing a refused append"))?;
                return match self.replayed(stream, events)? {
                    Some(outcome) => Ok(Some(outcome)),
                    None => Err(Failure::Backend(Fault::new("inserting an event", e))),
                };
            }
            i += chunk;
        }
        state.head = last_position;
        Ok(Some(AppendOutcome {
            version: last_version,
            first_position,
            last_position,
        }))
    }

    /// After a commit: the versions its appends left their streams at.
    fn remember_versions(&mut self, commands: &[Command], answers: &[Answer]) {
        let versions = self.versions.get_mut();
        for (command, answer) in commands.iter().zip(answers) {
            if let (Command::Append { requests, .. }, Answer::Appended(Ok(outcomes))) =
                (command, answer)
            {
                for (request, outcome) in requests.iter().zip(outcomes) {
                    let stream = &request.stream;
                    let hash = checksum::stream_hash(
                        stream.aggregate_type.as_bytes(),
                        stream.aggregate_id.as_bytes(),
                    );
                    versions.committed(hash, stream, outcome.version);
                }
            }
        }
        versions.seen(self.conn.total_changes());
    }

    /// The outcome of an earlier append if `events` repeats it exactly; an error if any of
    /// their ids is taken otherwise; `None` if all ids are new.
    fn replayed(
        &self,
        stream: &StreamId,
        events: &[NewEvent],
    ) -> Result<Option<AppendOutcome>, Failure> {
        let mut stored = Vec::new();
        let mut new = None;
        for event in events {
            match sql::event_by_id(&self.conn, event.event_id).map_err(Failure::Refused)? {
                Some(recorded) => {
                    if !event.same_content(stream, &recorded) {
                        return Err(Failure::Refused(Error::DuplicateEventId {
                            event_id: event.event_id,
                        }));
                    }
                    stored.push(recorded);
                }
                None => {
                    new.get_or_insert(event.event_id);
                }
            }
        }
        let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
            return Ok(None);
        };
        if let Some(new) = new {
            return Err(Failure::Refused(Error::InvalidAppend {
                reason: format!(
                    "the append repeats some stored events but not all (event {new} is new)"
                ),
            }));
        }
        let positions_follow = stored
            .windows(2)
            .all(|w| w[0].position.checked_add(1) == Some(w[1].position));
        if !positions_follow {
            return Err(Failure::Refused(Error::DuplicateEventId {
                event_id: events[0].event_id,
            }));
        }
        Ok(Some(AppendOutcome {
            version: last.version,
            first_position: first.position,
            last_position: last.position,
        }))
    }

    /// Stores a snapshot unless a newer one that fits its stream is stored (one ahead of
    /// its stream is replaced). Versions are kept as `i64` bit patterns, so one at 2^63 or
    /// more reads as negative here: the `>= 0` terms compare them as the `u64` they are.
    fn save_snapshot(&self, snapshot: &Snapshot) -> Result<(), Failure> {
        let taken_at = nanos_of(snapshot.taken_at, "snapshot time").map_err(Failure::Refused)?;
        self.conn
            .prepare_cached(
                "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, \
                 state, taken_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                 version = excluded.version, schema_version = excluded.schema_version, \
                 state = excluded.state, taken_at = excluded.taken_at \
                 WHERE NOT (snapshots.version >= 0 AND excluded.version >= 0 \
                     AND snapshots.version > excluded.version \
                     AND snapshots.version <= (SELECT COALESCE(MAX(version), 0) FROM events \
                         WHERE aggregate_type = ?1 AND aggregate_id = ?2))",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    snapshot.aggregate_type,
                    snapshot.aggregate_id,
                    to_i64(snapshot.version),
                    snapshot.schema_version,
                    snapshot.state,
                    taken_at,
                ])
            })
            .map(drop)
            .map_err(fault("saving a snapshot"))
    }

    fn save_checkpoint(&self, subscription: &str, position: u64, now: i64) -> Result<(), Failure> {
        sql::upsert_checkpoint(&self.conn, subscription, position, now)
            .map_err(fault("saving a checkpoint"))
    }

    /// Saves a segment's checkpoint if its lease is still held with its epoch (else
    /// `LeaseLost`, writing nothing); it never moves backwards.
    fn save_segment_checkpoint(
        &self,
        lease: &SegmentLease,
        position: u64,
        now: i64,
    ) -> Result<(), Failure> {
        if !crate::lease::held(&self.conn, lease).map_err(Failure::from_core)? {
            return Err(Failure::Refused(Error::LeaseLost {
                subscription: lease.subscription.clone(),
                segment: lease.segment,
                epoch: lease.epoch,
            }));
        }
        self.conn
            .prepare_cached(
                "INSERT INTO checkpoints (subscription, position, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (subscription) DO UPDATE SET \
                 position = MAX(position, excluded.position), updated_at = excluded.updated_at",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![lease.checkpoint_name(), to_i64(position), now])
            })
            .map(drop)
            .map_err(fault("saving a segment checkpoint"))
    }

    fn add_dead_letter(&self, dead_letter: &NewDeadLetter) -> Result<u64, Failure> {
        let first = nanos_of(dead_letter.first_failed_at, "first failure time")
            .map_err(Failure::Refused)?;
        let last =
            nanos_of(dead_letter.last_failed_at, "last failure time").map_err(Failure::Refused)?;
        sql::upsert_dead_letter(&self.conn, dead_letter, first, last)
            .map_err(fault("adding a dead letter"))
    }

    fn remove_dead_letter(&self, id: u64) -> Result<bool, Failure> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        self.conn
            .prepare_cached("DELETE FROM dead_letters WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute([id]))
            .map(|removed| removed > 0)
            .map_err(fault("removing a dead letter"))
    }

    /// Stores a failure record and removes the subscription's records beyond the newest
    /// `retain`: those at or below the id of the `retain + 1`-th newest, found by walking
    /// the `(subscription, id)` index from its end.
    fn record_failure(&self, failure: &FailureRecord, retain: usize) -> Result<(), Failure> {
        let failed_at = nanos_of(failure.failed_at, "failure time").map_err(Failure::Refused)?;
        self.conn
            .prepare_cached(
                "INSERT INTO failures (subscription, event_id, position, attempt, error, \
                 duration_micros, failed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    failure.subscription,
                    &failure.event_id.as_bytes()[..],
                    to_i64(failure.position),
                    failure.attempt,
                    failure.error,
                    to_i64(failure.duration_micros),
                    failed_at,
                ])
            })
            .map_err(fault("recording a failure"))?;
        self.conn
            .prepare_cached(
                "DELETE FROM failures WHERE subscription = ?1 AND id <= \
                 (SELECT id FROM failures WHERE subscription = ?1 \
                  ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
                    failure.subscription,
                    i64::try_from(retain).unwrap_or(i64::MAX)
                ])
            })
            .map(drop)
            .map_err(fault("pruning failure records"))
    }

    /// Removes the dead letters or the failure records of one subscription, or all.
    fn clear(&self, failures: bool, subscription: Option<&str>) -> Result<u64, Failure> {
        let sql = if failures {
            "DELETE FROM failures WHERE ?1 IS NULL OR subscription = ?1"
        } else {
            "DELETE FROM dead_letters WHERE ?1 IS NULL OR subscription = ?1"
        };
        self.conn
            .prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute([subscription]))
            .map(|removed| removed as u64)
            .map_err(fault("clearing records"))
    }
}

/// Copies every frame of the WAL into the database file and truncates the WAL, waiting
/// for readers up to the connection's busy timeout; false if a reader still pins part of
/// it (what can be copied is copied).
pub(crate) fn checkpoint(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0).map(|busy| busy == 0)
    })
}

/// Runs `future` to its end on this thread, parking it while the future waits: the
/// writer thread's wait on its two lanes, which tokio's `blocking_recv` offers for one
/// channel only.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake between the poll and here leaves a token: `park` returns at once.
        std::thread::park();
    }
}

/// Reads what every write needs, the head and the schema.
fn check(conn: &Connection) -> Result<u64, Fault> {
    let head = sql::head(conn).map_err(|e| Fault::from_core(&e))?;
    conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| {
        row.get::<_, i64>(0)
    })
    .map_err(|e| Fault::new("reading the schema", e))?;
    Ok(head)
}

/// True for a backend failure after which the writer checks its connection: an I/O error,
/// a failed `COMMIT`, or a report of corruption (which an I/O error can leave behind in a
/// connection's cached state although the file is healthy).
fn shakes_the_connection(fault: &Fault) -> bool {
    use eventfold_core::StoreErrorKind::{Corrupt, Io, OutcomeUnknown};
    matches!(fault.kind(), Io | OutcomeUnknown | Corrupt)
}

/// The error of writes whose transaction SQLite rolled back without saying why.
fn transaction_lost() -> Error {
    Error::Store {
        kind: eventfold_core::StoreErrorKind::Other,
        message: "SQLite rolled back the transaction".to_owned(),
        source: None,
    }
}

#[cfg(test)]
mod tests {
    use eventfold_core::{Metadata, StoreErrorKind};
    use uuid::Uuid;

    use super::*;

    fn event() -> NewEvent {
        NewEvent {
            event_id: Uuid::now_v7(),
            event_type: "Noted".to_owned(),
            schema_version: 1,
            occurred_at: Utc::now(),
            metadata: Metadata::new(),
            payload: "{}".to_owned(),
        }
    }

    /// Queues an append of one event to stream `id`.
    fn append(
        commands: &mpsc::Sender<Command>,
        id: &str,
    ) -> oneshot::Receiver<eventfold_core::Result<Appended>> {
        let (reply, answer) = oneshot::channel();
        let requests = vec![AppendRequest {
            stream: StreamId::new("Note", id),
            expected: ExpectedVersion::Any,
            events: vec![event()],
        }];
        let metadata = encode_metadata(&requests).unwrap();
        assert!(
            commands
                .try_send(Command::Append {
                    requests,
                    metadata,
                    reply
                })
                .is_ok()
        );
        answer
    }

    #[test]
    fn the_idle_poll_follows_short_gaps_and_drops_back_after_a_long_one() {
        let us = Duration::from_micros;
        let mut idle = IdlePoll::new(us(500));
        assert_eq!(idle.window(), MIN_IDLE_POLL);
        // A caller that comes back 150 µs after each answer: polled for twice that.
        idle.saw_gap(us(150));
        assert_eq!(idle.window(), us(300));
        // Never more than the limit, nor less than the minimum.
        idle.saw_gap(us(400));
        assert_eq!(idle.window(), us(500));
        idle.saw_gap(us(5));
        assert_eq!(idle.window(), MIN_IDLE_POLL);
        // A gap the limit would not have caught: back to the minimum.
        idle.saw_gap(us(300));
        idle.saw_gap(Duration::from_secs(1));
        assert_eq!(idle.window(), MIN_IDLE_POLL);
        // A limit below the minimum is the window; zero never polls.
        let mut short = IdlePoll::new(us(20));
        short.saw_gap(us(15));
        assert_eq!(short.window(), us(20));
        let mut never = IdlePoll::new(Duration::ZERO);
        never.saw_gap(us(1));
        assert_eq!(never.window(), Duration::ZERO);
    }

    /// Every command is queued before the writer starts, so the first three form one group
    /// whatever the timing: the panic happens in the middle of a transaction with other
    /// writes in it.
    #[test]
    fn a_write_that_panics_fails_alone_and_the_writer_serves_the_others() {
        let conn = schema::open_writer(Location::Memory, &SqliteOptions::new()).unwrap();
        let (commands, queue) = mpsc::channel(16);
        let head = Arc::new(watch::channel(0).0);
        let writer = Writer::new(
            conn,
            queue,
            mpsc::channel(1).1,
            Arc::clone(&head),
            Arc::default(),
            None,
            SqliteOptions::new(),
        );

        let first = append(&commands, "a");
        let (reply, panicked) = oneshot::channel();
        assert!(commands.try_send(Command::Panic { reply }).is_ok());
        let second = append(&commands, "b");
        let (reply, checkpoint) = oneshot::channel();
        let read = Command::Run(Box::new(move |conn| {
            let _ = reply.send(sql::load_checkpoint(conn, "panic"));
        }));
        assert!(commands.try_send(read).is_ok());
        let later = append(&commands, "a");
        let (reply, closed) = oneshot::channel();
        assert!(commands.try_send(Command::Close(reply)).is_ok());

        let thread = std::thread::spawn(move || writer.run());
        let error = panicked.blocking_recv().unwrap().unwrap_err();
        assert_eq!(error.store_kind(), Some(StoreErrorKind::Other), "{error}");
        assert!(
            error.to_string().contains("panicked: a write went wrong"),
            "{error}"
        );
        let first = first.blocking_recv().unwrap().unwrap().outcomes;
        let second = second.blocking_recv().unwrap().unwrap().outcomes;
        assert_eq!(
            (first[0].last_position, second[0].last_position),
            (1, 2),
            "the other writes of the group are stored, without a gap"
        );
        assert_eq!(
            checkpoint.blocking_recv().unwrap().unwrap(),
            None,
            "what the panicking write did before it panicked is rolled back"
        );
        let later = later.blocking_recv().unwrap().unwrap().outcomes;
        assert_eq!((later[0].version, later[0].last_position), (2, 3));
        assert_eq!(*head.borrow(), 3);
        closed.blocking_recv().unwrap();
        thread.join().unwrap();
    }

    /// Lease work queued behind a hundred appends runs before any of them.
    #[test]
    fn work_on_the_lease_lane_runs_before_the_writes_queued_ahead_of_it() {
        let conn = schema::open_writer(Location::Memory, &SqliteOptions::new()).unwrap();
        let (commands, queue) = mpsc::channel(256);
        let (urgent, urgent_queue) = mpsc::channel::<Work>(4);
        let head = Arc::new(watch::channel(0).0);
        let writer = Writer::new(
            conn,
            queue,
            urgent_queue,
            Arc::clone(&head),
            Arc::default(),
            None,
            SqliteOptions::new(),
        );
        let appends: Vec<_> = (0..100)
            .map(|i| append(&commands, &format!("n{i}")))
            .collect();
        let (reply, seen) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let _ = reply.send(sql::head(conn));
        });
        assert!(urgent.try_send(work).is_ok());
        let (reply, closed) = oneshot::channel();
        assert!(commands.try_send(Command::Close(reply)).is_ok());

        let thread = std::thread::spawn(move || writer.run());
        assert_eq!(
            seen.blocking_recv().unwrap().unwrap(),
            0,
            "the lease work ran before the appends queued ahead of it"
        );
        for appended in appends {
            appended.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(*head.borrow(), 100);
        closed.blocking_recv().unwrap();
        thread.join().unwrap();
    }

    /// An append waits for another connection's write lock (within the busy timeout);
    /// lease work queued meanwhile runs during that wait, not after it, and the append is
    /// stored once the lock is let go.
    #[test]
    fn lease_work_runs_while_a_group_waits_for_another_connections_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        // Far beyond the test: the append must not give up before the lock is let go.
        let options = SqliteOptions::new().busy_timeout(Duration::from_secs(120));
        let conn = schema::open_writer(Location::File(&path), &options).unwrap();
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let (commands, queue) = mpsc::channel(16);
        let (urgent, urgent_queue) = mpsc::channel::<Work>(4);
        let head = Arc::new(watch::channel(0).0);
        let counters = Arc::new(Counters::default());
        let writer = Writer::new(
            conn,
            queue,
            urgent_queue,
            Arc::clone(&head),
            Arc::clone(&counters),
            Some(path.clone()),
            options,
        );
        let thread = std::thread::spawn(move || writer.run());
        let appended = append(&commands, "a");
        // The append is taken into a group (which then waits for the lock).
        while counters.in_progress.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let (reply, ran) = oneshot::channel();
        let work: Work = Box::new(move |conn| {
            let _ = reply.send(conn.is_autocommit());
        });
        assert!(urgent.try_send(work).is_ok());
        assert!(
            ran.blocking_recv().unwrap(),
            "the lease work ran between two attempts at the lock, outside a transaction"
        );
        other.execute_batch("COMMIT").unwrap();
        let appended = appended.blocking_recv().unwrap().unwrap().outcomes;
        assert_eq!(appended[0].last_position, 1);
        let (reply, closed) = oneshot::channel();
        assert!(commands.try_send(Command::Close(reply)).is_ok());
        closed.blocking_recv().unwrap();
        thread.join().unwrap();
    }

    /// The writer's connection fails its check (here: it is not connected to the store's
    /// file at all), so the writer opens a new one to the file and serves the append there.
    #[test]
    fn a_writer_whose_connection_fails_its_check_reopens_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        let options = SqliteOptions::new().max_page_count(10_000);
        drop(schema::open_writer(Location::File(&path), &options).unwrap());
        let broken = Connection::open_in_memory().unwrap();
        broken.pragma_update(None, "max_page_count", 5_000).unwrap();
        let (commands, queue) = mpsc::channel(16);
        let head = Arc::new(watch::channel(0).0);
        let mut writer = Writer::new(
            broken,
            queue,
            mpsc::channel(1).1,
            Arc::clone(&head),
            Arc::default(),
            Some(path.clone()),
            options,
        );
        writer.suspect = true;

        let appended = append(&commands, "a");
        let (reply, cap) = oneshot::channel();
        let read = Command::Run(Box::new(move |conn| {
            let _ =
                reply.send(conn.query_row("PRAGMA max_page_count", [], |row| row.get::<_, i64>(0)));
        }));
        assert!(commands.try_send(read).is_ok());
        let (reply, closed) = oneshot::channel();
        assert!(commands.try_send(Command::Close(reply)).is_ok());
        let thread = std::thread::spawn(move || writer.run());

        let appended = appended.blocking_recv().unwrap().unwrap().outcomes;
        assert_eq!((appended[0].version, appended[0].last_position), (1, 1));
        assert_eq!(
            cap.blocking_recv().unwrap().unwrap(),
            5_000,
            "the size cap in force is kept"
        );
        closed.blocking_recv().unwrap();
        thread.join().unwrap();
        let stored: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stored, 1, "the append went to the file");
    }
}
