//! The writer: one connection on its own thread, fed by a channel of commands, committing
//! whatever is queued in one transaction (group commit).
//!
//! Each write of a group runs inside its own `SAVEPOINT`, so a refused write (a version
//! conflict, a taken event id) undoes only itself; a write that changes the database with a
//! single statement (a one-event append, a snapshot, a checkpoint...) needs none, as SQLite
//! undoes a failed statement by itself. Writes that arrive while the transaction runs join
//! it before its `COMMIT`. Replies go out only after the `COMMIT` succeeded; if
//! the `COMMIT` fails, every write of the group gets its error and nothing of the group is
//! stored. If SQLite rolls the whole transaction back on a write's failure (it does on a
//! full disk), that write fails and the others run again in a new transaction.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use eventfold_core::{
    AppendOutcome, AppendRequest, Error, ExpectedVersion, FailureRecord, NewDeadLetter, NewEvent,
    Snapshot, StreamId,
};
use rusqlite::{Connection, ErrorCode, params};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::Fault;
use crate::sql::{self, bound, nanos, nanos_of, to_i64};

/// How long the idle writer keeps polling its queue, yielding its CPU in between, before it
/// parks. A caller just answered sends its next write about 10 to 30 µs later; had the writer
/// parked, that write would also pay a futex wake-up and a thread switch (tens of µs on a
/// virtual machine), and the writers that trickle in behind it would miss the group.
const POLL_BEFORE_PARKING: Duration = Duration::from_micros(50);

/// Where a write's result goes.
pub(crate) type Reply<T> = oneshot::Sender<eventfold_core::Result<T>>;

/// Work for the writer thread.
pub(crate) enum Command {
    /// One append, or a batch of appends to several streams, stored all or none.
    Append {
        requests: Vec<AppendRequest>,
        reply: Reply<Vec<AppendOutcome>>,
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
        reply: Reply<()>,
    },
    /// Runs on the writer's connection between transactions: the reads of a store without
    /// read connections, and settings. It sends its own reply.
    Run(Box<dyn FnOnce(&Connection) + Send>),
    /// Stops the writer after the writes queued before it; replies once the connection is
    /// closed.
    Close(oneshot::Sender<()>),
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
            // append's earlier rows finds none.
            Command::Append { requests, .. } => {
                matches!(requests.as_slice(), [request] if request.events.len() == 1)
            }
            // One INSERT, upsert or DELETE each.
            Command::SaveSnapshot { .. }
            | Command::SaveCheckpoint { .. }
            | Command::AddDeadLetter { .. }
            | Command::RemoveDeadLetter { .. }
            | Command::RecordFailure { .. } => true,
            Command::Run(_) | Command::Close(_) => false,
        }
    }

    /// Sends a write its answer.
    fn answer(self, answer: Answer) {
        fn send<T>(reply: Reply<T>, result: Result<T, Failure>) {
            // The caller may have stopped waiting; its write stands all the same.
            let _ = reply.send(result.map_err(Failure::into_error));
        }
        match (self, answer) {
            (Command::Append { reply, .. }, Answer::Appended(result)) => send(reply, result),
            (
                Command::SaveSnapshot { reply, .. }
                | Command::SaveCheckpoint { reply, .. }
                | Command::RecordFailure { reply, .. },
                Answer::Done(result),
            ) => send(reply, result),
            (Command::AddDeadLetter { reply, .. }, Answer::Added(result)) => send(reply, result),
            (Command::RemoveDeadLetter { reply, .. }, Answer::Removed(result)) => {
                send(reply, result)
            }
            (command, Answer::Failed(failure)) => match command {
                Command::Append { reply, .. } => send(reply, Err(failure)),
                Command::SaveSnapshot { reply, .. }
                | Command::SaveCheckpoint { reply, .. }
                | Command::RecordFailure { reply, .. } => send(reply, Err(failure)),
                Command::AddDeadLetter { reply, .. } => send(reply, Err(failure)),
                Command::RemoveDeadLetter { reply, .. } => send(reply, Err(failure)),
                Command::Run(_) | Command::Close(_) => {}
            },
            _ => unreachable!("a write answered with another kind of result"),
        }
    }
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
    Added(Result<u64, Failure>),
    Removed(Result<bool, Failure>),
    /// Failed before or after it ran, whatever it was.
    Failed(Failure),
}

impl Answer {
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
    /// Writes taken into the transaction under way.
    pub(crate) in_progress: AtomicUsize,
}

/// The state of the open transaction.
struct Group {
    /// The position of the last event, committed or in this transaction.
    head: u64,
    /// The commit time stamped on the group's events.
    recorded_at: i64,
}

/// The writes of one transaction, and their events.
struct Batch {
    commands: Vec<Command>,
    events: usize,
}

/// The writer connection and its queue.
pub(crate) struct Writer {
    conn: Connection,
    commands: mpsc::Receiver<Command>,
    /// A command taken from the queue that did not fit the last group.
    next: Option<Command>,
    head: Arc<watch::Sender<u64>>,
    counters: Arc<Counters>,
    max_appends: usize,
    max_events: usize,
    /// The last commit time given out, so recorded times never run backwards here.
    last_recorded_at: i64,
}

impl Writer {
    pub(crate) fn new(
        conn: Connection,
        commands: mpsc::Receiver<Command>,
        head: Arc<watch::Sender<u64>>,
        counters: Arc<Counters>,
        max_appends: usize,
        max_events: usize,
    ) -> Self {
        Writer {
            conn,
            commands,
            next: None,
            head,
            counters,
            max_appends,
            max_events,
            last_recorded_at: i64::MIN,
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
            let command = match self.next.take() {
                Some(command) => command,
                None => match self.recv() {
                    Some(command) => command,
                    // Every handle of the store is gone.
                    None => break None,
                },
            };
            match command {
                Command::Run(work) => {
                    if catch_unwind(AssertUnwindSafe(|| work(&self.conn))).is_err() {
                        tracing::error!("a read on the writer connection panicked");
                    }
                }
                Command::Close(reply) => break Some(reply),
                write => {
                    let mut group = Batch {
                        events: write.events(),
                        commands: vec![write],
                    };
                    while self.pull(&mut group) {}
                    self.commit_group(group);
                }
            }
        };
        // Refuse what is still queued (callers see the store closed), then close the file.
        self.commands.close();
        self.next = None;
        while self.commands.try_recv().is_ok() {}
        let Writer { conn, .. } = self;
        if let Err((_, e)) = conn.close() {
            tracing::warn!(error = %e, "closing the SQLite writer connection failed");
        }
        if let Some(reply) = closed_by {
            let _ = reply.send(());
        }
    }

    /// Waits for the next command: polls for [`POLL_BEFORE_PARKING`], then parks. `None`
    /// once every sender is gone.
    fn recv(&mut self) -> Option<Command> {
        let deadline = Instant::now() + POLL_BEFORE_PARKING;
        loop {
            match self.commands.try_recv() {
                Ok(command) => return Some(command),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if Instant::now() < deadline => {
                    // The callers need the CPU to send their writes: on a small machine a
                    // busy loop without yielding delays the very writes it waits for.
                    std::thread::yield_now();
                }
                Err(TryRecvError::Empty) => return self.commands.blocking_recv(),
            }
        }
    }

    /// Takes one more queued write into the group if it has room; false when there is
    /// none (a queued command that does not fit waits in `next`).
    fn pull(&mut self, group: &mut Batch) -> bool {
        if self.next.is_some() || group.commands.len() >= self.max_appends {
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

    /// Runs a group of writes in one transaction and answers each after the commit.
    fn commit_group(&mut self, mut group: Batch) {
        self.counters
            .in_progress
            .store(group.commands.len(), Ordering::Relaxed);
        // Answers that stand whatever happens to the rest of the group.
        let mut settled: Vec<Option<Answer>> = group.commands.iter().map(|_| None).collect();
        let committed = 'attempt: loop {
            let mut state = match self.begin() {
                Ok(state) => state,
                Err(fault) => break Err(fault),
            };
            let mut answers: Vec<Option<Answer>> = Vec::with_capacity(group.commands.len());
            let mut i = 0;
            loop {
                if i == group.commands.len() {
                    // Writes that arrived while this transaction ran join it: they cost no
                    // extra disk sync, and wait no longer than if they had waited outside.
                    if !self.pull(&mut group) {
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
                let answer = self.run_write(&group.commands[i], &mut state);
                if self.conn.is_autocommit() {
                    // SQLite rolled back the whole transaction (it does on some full-disk
                    // and I/O errors): this write fails, the others run again in a new one.
                    settled[i] = Some(if answer.failed() {
                        answer
                    } else {
                        Answer::Failed(Fault::from_core(&transaction_lost()).into())
                    });
                    continue 'attempt;
                }
                answers.push(Some(answer));
                i += 1;
            }
            break match self.savepoint("COMMIT") {
                Ok(()) => Ok((answers, state.head)),
                Err(fault) => {
                    if !self.conn.is_autocommit() {
                        let _ = self.conn.execute_batch("ROLLBACK");
                    }
                    Err(fault)
                }
            };
        };
        let group = group.commands;

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
                for answer in answers.iter().filter(|a| !a.failed()) {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                    if let Answer::Appended(Ok(outcomes)) = answer {
                        self.counters
                            .appends
                            .fetch_add(outcomes.len() as u64, Ordering::Relaxed);
                    }
                }
                // Published before the answers, so an appender that then looks at the
                // watch sees its own append.
                self.head.send_if_modified(|published| {
                    let moved = head > *published;
                    if moved {
                        *published = head;
                    }
                    moved
                });
                self.counters.in_progress.store(0, Ordering::Relaxed);
                for (command, answer) in group.into_iter().zip(answers) {
                    command.answer(answer);
                }
            }
            Err(fault) => {
                tracing::warn!(error = %fault.to_error(), writes = group.len(), "a group commit failed");
                self.counters.in_progress.store(0, Ordering::Relaxed);
                for (command, settled) in group.into_iter().zip(settled) {
                    command.answer(settled.unwrap_or_else(|| Answer::Failed(fault.clone().into())));
                }
            }
        }
    }

    /// Runs one write in its own savepoint, undoing it alone if it fails.
    fn run_write(&self, command: &Command, state: &mut Group) -> Answer {
        let head_before = state.head;
        if command.single_statement() {
            // Two statements fewer: about a quarter of the writer's time per one-event append.
            let answer = self.execute(command, state);
            if answer.failed() {
                state.head = head_before;
            }
            return answer;
        }
        if let Err(fault) = self.savepoint("SAVEPOINT write") {
            return Answer::Failed(fault.into());
        }
        let mut answer = self.execute(command, state);
        if !answer.failed() {
            if let Err(fault) = self.savepoint("RELEASE write") {
                answer = Answer::Failed(fault.into());
            }
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

    /// Begins a write transaction and reads the head inside it: another process may have
    /// appended since this writer's last commit.
    fn begin(&mut self) -> Result<Group, Fault> {
        self.savepoint("BEGIN IMMEDIATE")?;
        let head = match sql::head(&self.conn) {
            Ok(head) => head,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(Fault::new("reading the head position", e));
            }
        };
        let now = nanos(Utc::now()).unwrap_or(i64::MAX);
        self.last_recorded_at = self.last_recorded_at.max(now);
        Ok(Group {
            head,
            recorded_at: self.last_recorded_at,
        })
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
            Command::Append { requests, .. } => Answer::Appended(
                requests
                    .iter()
                    .map(|r| self.append(&r.stream, r.expected, &r.events, state))
                    .collect(),
            ),
            Command::SaveSnapshot { snapshot, .. } => Answer::Done(self.save_snapshot(snapshot)),
            Command::SaveCheckpoint {
                subscription,
                position,
                ..
            } => Answer::Done(self.save_checkpoint(subscription, *position, state.recorded_at)),
            Command::AddDeadLetter { dead_letter, .. } => {
                Answer::Added(self.add_dead_letter(dead_letter))
            }
            Command::RemoveDeadLetter { id, .. } => Answer::Removed(self.remove_dead_letter(*id)),
            Command::RecordFailure { failure, .. } => Answer::Done(self.record_failure(failure)),
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
        state: &mut Group,
    ) -> Result<AppendOutcome, Failure> {
        let actual =
            sql::stream_version(&self.conn, stream).map_err(fault("reading the stream version"))?;
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

        let first_position = state.head + 1;
        let mut insert = self
            .conn
            .prepare_cached(sql::INSERT_EVENT)
            .map_err(fault("preparing the insert"))?;
        for (i, event) in events.iter().enumerate() {
            let occurred_at = nanos(event.occurred_at).ok_or_else(|| {
                Failure::Refused(Error::InvalidAppend {
                    reason: format!(
                        "event {} occurred at {}, outside the years 1677 to 2262 that the \
                         SQLite store keeps exactly",
                        event.event_id, event.occurred_at
                    ),
                })
            })?;
            let metadata = if event.metadata.is_empty() {
                None
            } else {
                Some(serde_json::to_string(&event.metadata).map_err(|source| {
                    Failure::Refused(Error::Serialize {
                        event_type: event.event_type.clone(),
                        source,
                    })
                })?)
            };
            let offset = i as u64;
            let inserted = insert.execute(params![
                bound(first_position + offset),
                &event.event_id.as_bytes()[..],
                stream.aggregate_type,
                stream.aggregate_id,
                bound(actual + 1 + offset),
                event.event_type,
                event.schema_version,
                occurred_at,
                state.recorded_at,
                metadata,
                event.payload,
            ]);
            if let Err(e) = inserted {
                if e.sqlite_error_code() != Some(ErrorCode::ConstraintViolation) {
                    return Err(Failure::Backend(Fault::new("inserting an event", e)));
                }
                // The writer holds the write lock and checked the version, so only an event
                // id can be taken: undo this append's rows (the last ones; a batch's earlier
                // appends stay), then judge it as a repeat.
                drop(insert);
                self.conn
                    .prepare_cached("DELETE FROM events WHERE position >= ?1")
                    .and_then(|mut stmt| stmt.execute([bound(first_position)]))
                    .map_err(fault("undoing a refused append"))?;
                return match self.replayed(stream, events)? {
                    Some(outcome) => Ok(outcome),
                    None => Err(Failure::Backend(Fault::new("inserting an event", e))),
                };
            }
        }
        state.head += events.len() as u64;
        Ok(AppendOutcome {
            version: actual + events.len() as u64,
            first_position,
            last_position: state.head,
        })
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
            .all(|w| w[1].position == w[0].position + 1);
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
        self.conn
            .prepare_cached(
                "INSERT INTO checkpoints (subscription, position, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (subscription) DO UPDATE SET \
                 position = excluded.position, updated_at = excluded.updated_at",
            )
            .and_then(|mut stmt| stmt.execute(params![subscription, to_i64(position), now]))
            .map(drop)
            .map_err(fault("saving a checkpoint"))
    }

    fn add_dead_letter(&self, dead_letter: &NewDeadLetter) -> Result<u64, Failure> {
        let first = nanos_of(dead_letter.first_failed_at, "first failure time")
            .map_err(Failure::Refused)?;
        let last =
            nanos_of(dead_letter.last_failed_at, "last failure time").map_err(Failure::Refused)?;
        self.conn
            .prepare_cached(
                "INSERT INTO dead_letters (subscription, event_id, position, event_type, error, \
                 attempts, first_failed_at, last_failed_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .and_then(|mut stmt| {
                stmt.insert(params![
                    dead_letter.subscription,
                    &dead_letter.event_id.as_bytes()[..],
                    to_i64(dead_letter.position),
                    dead_letter.event_type,
                    dead_letter.error,
                    dead_letter.attempts,
                    first,
                    last,
                ])
            })
            .map(|id| id as u64)
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

    fn record_failure(&self, failure: &FailureRecord) -> Result<(), Failure> {
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
            .map(drop)
            .map_err(fault("recording a failure"))
    }
}

/// The error of writes whose transaction SQLite rolled back without saying why.
fn transaction_lost() -> Error {
    Error::Store {
        kind: eventfold_core::StoreErrorKind::Other,
        message: "SQLite rolled back the transaction".to_owned(),
        source: None,
    }
}
