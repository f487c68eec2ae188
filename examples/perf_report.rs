//! The performance report: every scenario runs on eventfold and on a raw baseline written
//! directly against rusqlite or tokio, with the same schema, settings and payloads, in the
//! same process; each is repeated, and the table shows medians and the ratio eventfold / raw.
//!
//! ```sh
//! cargo run --release --example perf_report              # the full report (about 3 minutes)
//! cargo run --release --example perf_report -- --quick   # smaller counts, under a minute
//! cargo run --release --example perf_report -- --json    # one JSON object per scenario
//! cargo run --release --example perf_report -- --only rehydrate --repeats 30   # to profile
//! cargo run --release --example perf_report -- --store postgres   # the PostgreSQL rows
//! ```
//!
//! `sub_scale` and `sub_scale_pool4` (and their PostgreSQL rows) start this program again
//! as member processes of one subscription: `EVENTFOLD_SUB_SCALE_STORE` in a child's
//! environment makes it a member instead of a report.
//!
//! `--store postgres` runs the PostgreSQL store's rows instead (`pg_append_batch` ...
//! `pg_sub_scale_pool4`, against hand-written tokio-postgres on the same server) on the server
//! at `EVENTFOLD_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`), each run in a
//! schema of its own, dropped after it. Their code is `pg_perf`'s
//! (`event-postgres/examples/pg_perf/scenarios.rs`), included here as a module.
//!
//! Databases live in a temporary directory that is deleted at the end. The raw side gets
//! its tables from the store itself (a store is opened on its file once and closed), and
//! sets the store's default settings by hand: WAL, `synchronous = FULL`, a 16 MiB page
//! cache, a 5 s busy timeout. Progress goes to stderr, the table (or JSON) to stdout.

use std::convert::Infallible;
use std::error::Error;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use eventfold::prelude::*;
use eventfold::projection::ProjectionOptions;
use eventfold::sqlite::SqliteProjection;
use eventfold::{
    BoxError, Delivery, EventBus, InMemoryEventStore, NewEvent, Outgoing, RecordedEvent,
    SqliteEventStore, SqliteOptions,
};
use rusqlite::{Connection, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// The PostgreSQL rows, the same code as `pg_perf`'s.
#[path = "../event-postgres/examples/pg_perf/scenarios.rs"]
mod pg_scenarios;

// ---------------------------------------------------------------------------------------
// The domain both sides share: an account that takes deposits.

/// The payload of a deposit, as both sides store it:
/// `{"amount":7,"currency":"EUR","memo":"perf report deposit"}` (58 bytes or so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Deposited {
        amount: u64,
        currency: String,
        memo: String,
    },
    Withdrawn {
        amount: u64,
    },
}

fn deposit(amount: u64) -> AccountEvent {
    AccountEvent::Deposited {
        amount,
        currency: "EUR".to_owned(),
        memo: "perf report deposit".to_owned(),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
    deposits: u64,
}

impl Account {
    /// The fold both sides run.
    fn fold(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Deposited { amount, .. } => {
                self.balance += amount;
                self.deposits += 1;
            }
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }

    /// The decision both sides run.
    fn decide(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, Infallible> {
        match command {
            AccountCommand::Deposit(amount) => Ok(vec![deposit(amount)]),
        }
    }
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Deposit(u64),
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = Infallible;

    fn apply(&mut self, event: &AccountEvent) {
        self.fold(event);
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, Infallible> {
        self.decide(command)
    }
}

/// What the bus scenarios' handler counts.
#[derive(Default)]
struct Tally {
    events: AtomicU64,
    amount: AtomicU64,
}

/// The handler of every bus scenario, on both sides.
async fn on_event(tally: &Tally, event: &AccountEvent) -> Result<(), Infallible> {
    if let AccountEvent::Deposited { amount, .. } = event {
        tally.amount.fetch_add(*amount, Ordering::Relaxed);
    }
    tally.events.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The slow handler of `bus_memory`: gives the thread away once per event.
async fn on_event_slowly(tally: &Tally, event: &AccountEvent) -> Result<(), Infallible> {
    tokio::task::yield_now().await;
    on_event(tally, event).await
}

fn stream_ids(aggregates: usize) -> Vec<String> {
    (0..aggregates).map(|a| format!("acc-{a}")).collect()
}

// ---------------------------------------------------------------------------------------
// The raw baseline: one rusqlite connection, the store's own tables and settings, and the
// least a correct store does per append: read the stream's version, insert, commit.

/// The raw side's metadata column, the same JSON the store writes for a correlation id.
#[derive(Serialize)]
struct RawMetadata {
    correlation_id: Uuid,
}

/// A deposit's payload as the raw side writes and reads it: the variant's own fields,
/// without serde's enum tag, as eventfold stores them.
#[derive(Serialize)]
struct DepositedRef<'a> {
    amount: u64,
    currency: &'a str,
    memo: &'a str,
}

#[derive(Deserialize)]
struct DepositedOwned {
    amount: u64,
    currency: String,
    memo: String,
}

#[derive(Serialize, Deserialize)]
struct WithdrawnFields {
    amount: u64,
}

fn raw_encode(event: &AccountEvent) -> serde_json::Result<(&'static str, String)> {
    Ok(match event {
        AccountEvent::Deposited {
            amount,
            currency,
            memo,
        } => (
            "Deposited",
            serde_json::to_string(&DepositedRef {
                amount: *amount,
                currency,
                memo,
            })?,
        ),
        AccountEvent::Withdrawn { amount } => (
            "Withdrawn",
            serde_json::to_string(&WithdrawnFields { amount: *amount })?,
        ),
    })
}

fn raw_decode(event_type: &str, payload: &str) -> Res<AccountEvent> {
    Ok(match event_type {
        "Deposited" => {
            let d: DepositedOwned = serde_json::from_str(payload)?;
            AccountEvent::Deposited {
                amount: d.amount,
                currency: d.currency,
                memo: d.memo,
            }
        }
        "Withdrawn" => {
            let w: WithdrawnFields = serde_json::from_str(payload)?;
            AccountEvent::Withdrawn { amount: w.amount }
        }
        other => return Err(format!("unknown event type {other}").into()),
    })
}

fn now_nanos() -> i64 {
    Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

const RAW_INSERT: &str = "INSERT INTO events (position, event_id, aggregate_type, aggregate_id, \
     version, event_type, schema_version, occurred_at, recorded_at, metadata, payload) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

const RAW_STREAM_VERSION: &str = "SELECT version FROM events WHERE aggregate_type = ?1 \
     AND aggregate_id = ?2 ORDER BY version DESC LIMIT 1";

const RAW_READ_STREAM: &str = "SELECT version, event_type, payload FROM events \
     WHERE aggregate_type = ?1 AND aggregate_id = ?2 ORDER BY version";

struct RawStore {
    conn: Connection,
    /// The last position; this connection is the only writer.
    head: i64,
}

impl RawStore {
    async fn create(path: &Path) -> Res<Self> {
        // The tables come from the store itself, so both sides write the same schema.
        SqliteEventStore::open(path, SqliteOptions::new())
            .await?
            .close()
            .await?;
        let conn = Connection::open(path)?;
        // The settings of `SqliteOptions::new()`.
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
        assert!(
            mode.eq_ignore_ascii_case("wal"),
            "WAL is needed, got {mode}"
        );
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -16 * 1024)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        Ok(RawStore { conn, head: 0 })
    }

    /// One transaction: check the stream's version, insert the events, commit.
    fn append(
        &mut self,
        aggregate_id: &str,
        expected: Option<u64>,
        events: &[AccountEvent],
        correlation: Option<Uuid>,
    ) -> Res<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let actual = raw_stream_version(&tx, aggregate_id)?;
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(format!("version conflict: {expected} != {actual}").into());
        }
        let metadata = match correlation {
            Some(correlation_id) => Some(serde_json::to_string(&RawMetadata { correlation_id })?),
            None => None,
        };
        raw_insert(
            &tx,
            self.head,
            aggregate_id,
            actual,
            events,
            metadata.as_deref(),
        )?;
        tx.commit()?;
        self.head += events.len() as i64;
        Ok(actual + events.len() as u64)
    }

    /// Reads a stream, decodes each event into the domain type and folds it.
    fn load(&self, aggregate_id: &str) -> Res<(Account, u64)> {
        raw_load(&self.conn, aggregate_id)
    }

    /// One command by hand: in one write transaction, load, decide, insert, commit.
    fn execute(&mut self, aggregate_id: &str, command: AccountCommand) -> Res<u64> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (account, version) = raw_load(&tx, aggregate_id)?;
        let events = account.decide(command)?;
        raw_insert(&tx, self.head, aggregate_id, version, &events, None)?;
        tx.commit()?;
        self.head += events.len() as i64;
        Ok(version + events.len() as u64)
    }
}

/// Inserts `events` after position `head` and stream version `version`, as the store
/// would: one prepared statement, one row per event.
fn raw_insert(
    conn: &Connection,
    head: i64,
    aggregate_id: &str,
    version: u64,
    events: &[AccountEvent],
    metadata: Option<&str>,
) -> Res<()> {
    let recorded_at = now_nanos();
    let mut insert = conn.prepare_cached(RAW_INSERT)?;
    for (i, event) in events.iter().enumerate() {
        let (event_type, payload) = raw_encode(event)?;
        let i = i as i64 + 1;
        insert.execute(params![
            head + i,
            &Uuid::now_v7().as_bytes()[..],
            Account::TYPE,
            aggregate_id,
            version as i64 + i,
            event_type,
            1,
            now_nanos(),
            recorded_at,
            metadata,
            payload,
        ])?;
    }
    Ok(())
}

fn raw_stream_version(conn: &Connection, aggregate_id: &str) -> Res<u64> {
    let mut stmt = conn.prepare_cached(RAW_STREAM_VERSION)?;
    let mut rows = stmt.query(params![Account::TYPE, aggregate_id])?;
    Ok(match rows.next()? {
        Some(row) => row.get::<_, i64>(0)? as u64,
        None => 0,
    })
}

fn raw_load(conn: &Connection, aggregate_id: &str) -> Res<(Account, u64)> {
    let mut stmt = conn.prepare_cached(RAW_READ_STREAM)?;
    let mut rows = stmt.query(params![Account::TYPE, aggregate_id])?;
    let mut account = Account::default();
    let mut version = 0;
    while let Some(row) = rows.next()? {
        let event = raw_decode(row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?)?;
        account.fold(&event);
        version = row.get::<_, i64>(0)? as u64;
    }
    Ok((account, version))
}

// ---------------------------------------------------------------------------------------
// Sizes, samples and the report.

/// The counts of one run: the full report, or `--quick`.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    repeats: usize,
    /// `append_batch` and `bus_durable`: events, 100 per append, over this many aggregates.
    batch_events: usize,
    batch_aggregates: usize,
    /// `append_concurrent`: tasks × one-event appends each.
    concurrent_tasks: usize,
    concurrent_appends: usize,
    /// `append_concurrent_64`: one-event appends per task, of 64 tasks.
    concurrent_64_appends: usize,
    /// `rehydrate` and `memory_rehydrate`: the aggregate's events.
    rehydrate_events: usize,
    /// `command_long_stream`: commands, and the size of the first and last windows.
    long_commands: usize,
    long_window: usize,
    /// `command_many`: commands over this many aggregates from this many tasks.
    many_commands: usize,
    many_aggregates: usize,
    many_tasks: usize,
    transient_events: usize,
    seed_events: usize,
    memory_events: usize,
    /// `sub_rebuild`: stored events the projection rebuilds from.
    rebuild_events: usize,
    /// `archive_export`: the events of the store exported.
    archive_events: usize,
    /// `sub_scale`: the events the subscription's members handle.
    scale_events: usize,
}

const FULL: Sizes = Sizes {
    repeats: 5,
    batch_events: 100_000,
    batch_aggregates: 1_000,
    concurrent_tasks: 8,
    concurrent_appends: 2_000,
    concurrent_64_appends: 250,
    rehydrate_events: 10_000,
    long_commands: 10_000,
    long_window: 1_000,
    many_commands: 100_000,
    many_aggregates: 1_000,
    many_tasks: 8,
    transient_events: 1_000_000,
    seed_events: 1_000,
    memory_events: 1_000_000,
    rebuild_events: 1_000_000,
    archive_events: 1_000_000,
    scale_events: 20_000,
};

const QUICK: Sizes = Sizes {
    repeats: 5,
    batch_events: 20_000,
    batch_aggregates: 200,
    concurrent_tasks: 8,
    concurrent_appends: 250,
    concurrent_64_appends: 32,
    rehydrate_events: 10_000,
    long_commands: 3_000,
    long_window: 1_000,
    many_commands: 10_000,
    many_aggregates: 100,
    many_tasks: 8,
    transient_events: 200_000,
    seed_events: 1_000,
    memory_events: 200_000,
    rebuild_events: 100_000,
    archive_events: 100_000,
    scale_events: 20_000,
};

/// Events (or commands) per append in `append_batch`, `bus_durable` and `seed_1000`.
const PER_APPEND: usize = 100;
/// The queue capacity of the transient bus and of the raw channel.
const QUEUE_CAPACITY: usize = 10_000;

/// The tasks of `append_concurrent_64`.
const TASKS_64: usize = 64;

/// Events per transaction of `sub_rebuild`'s projection.
const REBUILD_BATCH: usize = 4_096;

const SCENARIOS: [&str; 15] = [
    "append_batch",
    "append_concurrent",
    "append_concurrent_64",
    "rehydrate",
    "memory_rehydrate",
    "command_long_stream",
    "command_many",
    "bus_transient",
    "bus_durable",
    "seed_1000",
    "bus_memory",
    "sub_rebuild",
    "archive_export",
    "sub_scale",
    "sub_scale_pool4",
];

/// What a scenario's goal asks of its row.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// The ratio is at least this.
    RatioAtLeast(f64),
    /// eventfold's value is below this (in the row's unit).
    Below(f64),
}

impl Goal {
    fn describe(self, unit: &str) -> String {
        match self {
            Goal::RatioAtLeast(r) => format!("ratio >= {r}"),
            Goal::Below(v) => format!("< {v} {}", unit.split_whitespace().next().unwrap_or("")),
        }
    }
}

struct Row {
    scenario: &'static str,
    eventfold: f64,
    raw: f64,
    unit: &'static str,
    ratio: f64,
    goal: Goal,
    /// A further condition of the goal (e.g. nothing dropped).
    also: bool,
    /// What the raw column measures.
    baseline: String,
}

impl Row {
    fn new(scenario: &'static str, unit: &'static str, goal: Goal, samples: &Samples) -> Self {
        let eventfold = median(&samples.eventfold);
        let raw = median(&samples.raw);
        Row {
            scenario,
            eventfold,
            raw,
            unit,
            ratio: eventfold / raw,
            goal,
            also: true,
            baseline: String::new(),
        }
    }

    fn baseline(mut self, baseline: impl Into<String>) -> Self {
        self.baseline = baseline.into();
        self
    }

    fn met(&self) -> bool {
        self.also
            && match self.goal {
                Goal::RatioAtLeast(r) => self.ratio >= r,
                Goal::Below(v) => self.eventfold < v,
            }
    }
}

#[derive(Default)]
struct Samples {
    eventfold: Vec<f64>,
    raw: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Alternates which side runs first, so drift on a shared machine hits both alike.
fn sides(repeat: usize) -> [Side; 2] {
    if repeat.is_multiple_of(2) {
        [Side::Eventfold, Side::Raw]
    } else {
        [Side::Raw, Side::Eventfold]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Eventfold,
    Raw,
}

fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn progress(scenario: &str, repeat: usize, side: Side, value: f64, unit: &str) {
    eprintln!(
        "  {scenario} #{repeat} {side:?}: {} {unit}",
        fmt_value(value)
    );
}

async fn open_store(path: &Path) -> Res<Arc<SqliteEventStore>> {
    Ok(Arc::new(
        SqliteEventStore::open(path, SqliteOptions::new()).await?,
    ))
}

// ---------------------------------------------------------------------------------------
// The scenarios.

async fn append_batch(sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let appends = sizes.batch_events / PER_APPEND;
    let ids = stream_ids(sizes.batch_aggregates);
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let mut versions = vec![0u64; ids.len()];
            let value = match side {
                Side::Eventfold => {
                    let store = open_store(&path).await?;
                    let streams: Vec<StreamId> = ids
                        .iter()
                        .map(|id| StreamId::new(Account::TYPE, id))
                        .collect();
                    let started = Instant::now();
                    for i in 0..appends {
                        let a = i % ids.len();
                        let metadata = Metadata::new().with_correlation_id(Uuid::now_v7());
                        let events = (0..PER_APPEND as u64)
                            .map(|n| NewEvent::from_event(&deposit(n), metadata.clone()))
                            .collect::<Result<Vec<_>, _>>()?;
                        let outcome = store
                            .append(&streams[a], ExpectedVersion::Exact(versions[a]), events)
                            .await?;
                        versions[a] = outcome.version;
                    }
                    let elapsed = started.elapsed();
                    store.close().await?;
                    per_second(sizes.batch_events, elapsed)
                }
                Side::Raw => {
                    let mut raw = RawStore::create(&path).await?;
                    let started = Instant::now();
                    for i in 0..appends {
                        let a = i % ids.len();
                        let events: Vec<AccountEvent> =
                            (0..PER_APPEND as u64).map(deposit).collect();
                        versions[a] =
                            raw.append(&ids[a], Some(versions[a]), &events, Some(Uuid::now_v7()))?;
                    }
                    per_second(sizes.batch_events, started.elapsed())
                }
            };
            progress("append_batch", repeat, side, value, "events/s");
            samples.push(side, value);
        }
    }
    Ok(Row::new(
        "append_batch",
        "events/s",
        Goal::RatioAtLeast(0.8),
        &samples,
    )
    .baseline(format!(
        "{} events, {PER_APPEND} per transaction, {} aggregates; raw: rusqlite, \
                 version check + inserts + commit",
        sizes.batch_events, sizes.batch_aggregates
    )))
}

impl Samples {
    fn push(&mut self, side: Side, value: f64) {
        match side {
            Side::Eventfold => self.eventfold.push(value),
            Side::Raw => self.raw.push(value),
        }
    }
}

/// Waits for the writing tasks of a concurrent scenario, returns the time since `started`,
/// reports how the writer grouped their appends, and closes the store.
async fn join_writers<E>(
    scenario: &str,
    store: &SqliteEventStore,
    tasks: Vec<tokio::task::JoinHandle<Result<(), E>>>,
    started: Instant,
) -> Res<Duration>
where
    E: Error + Send + Sync + 'static,
{
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let stats = store.writer_statistics();
    eprintln!(
        "  {scenario}: {} appends in {} transactions",
        stats.appends, stats.transactions
    );
    store.close().await?;
    Ok(elapsed)
}

async fn append_concurrent(sizes: Sizes, dir: &Path) -> Res<Row> {
    let (tasks, appends) = (sizes.concurrent_tasks, sizes.concurrent_appends);
    let goal = Goal::RatioAtLeast(4.0);
    concurrent_appends(
        "append_concurrent",
        tasks,
        appends,
        goal,
        sizes.repeats,
        dir,
    )
    .await
}

async fn append_concurrent_64(sizes: Sizes, dir: &Path) -> Res<Row> {
    let (tasks, appends) = (TASKS_64, sizes.concurrent_64_appends);
    let goal = Goal::RatioAtLeast(16.0);
    concurrent_appends(
        "append_concurrent_64",
        tasks,
        appends,
        goal,
        sizes.repeats,
        dir,
    )
    .await
}

/// `tasks` tasks of `appends` one-event appends each, each awaiting its durable commit;
/// raw: the same appends one transaction each, in sequence, on one connection.
async fn concurrent_appends(
    scenario: &'static str,
    tasks: usize,
    appends: usize,
    goal: Goal,
    repeats: usize,
    dir: &Path,
) -> Res<Row> {
    let mut samples = Samples::default();
    let total = tasks * appends;
    for repeat in 0..repeats {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let value = match side {
                Side::Eventfold => {
                    let store = open_store(&path).await?;
                    let started = Instant::now();
                    let writers: Vec<_> = (0..tasks)
                        .map(|t| {
                            let store = Arc::clone(&store);
                            tokio::spawn(async move {
                                let stream = StreamId::new(Account::TYPE, format!("task-{t}"));
                                for n in 0..appends as u64 {
                                    let metadata =
                                        Metadata::new().with_correlation_id(Uuid::now_v7());
                                    let event = NewEvent::from_event(&deposit(n), metadata)?;
                                    store
                                        .append(&stream, ExpectedVersion::Exact(n), vec![event])
                                        .await?;
                                }
                                Ok::<_, eventfold::Error>(())
                            })
                        })
                        .collect();
                    let elapsed = join_writers(scenario, &store, writers, started).await?;
                    per_second(total, elapsed)
                }
                Side::Raw => {
                    let mut raw = RawStore::create(&path).await?;
                    let started = Instant::now();
                    for n in 0..appends as u64 {
                        for t in 0..tasks {
                            raw.append(
                                &format!("task-{t}"),
                                Some(n),
                                &[deposit(n)],
                                Some(Uuid::now_v7()),
                            )?;
                        }
                    }
                    per_second(total, started.elapsed())
                }
            };
            progress(scenario, repeat, side, value, "events/s");
            samples.push(side, value);
        }
    }
    Ok(
        Row::new(scenario, "events/s", goal, &samples).baseline(format!(
            "{tasks} tasks x {appends} one-event appends, each awaiting its commit; raw: the \
             same appends one transaction each, in sequence"
        )),
    )
}

async fn rehydrate(sizes: Sizes, dir: &Path) -> Res<Row> {
    let run = tempfile::tempdir_in(dir)?;
    let id = "acc-long";
    let store = open_store(&run.path().join("eventfold.db")).await?;
    let mut raw = RawStore::create(&run.path().join("raw.db")).await?;
    let stream = StreamId::new(Account::TYPE, id);
    let mut n = 0;
    while n < sizes.rehydrate_events {
        let count = (sizes.rehydrate_events - n).min(1_000);
        let events: Vec<AccountEvent> = (n..n + count).map(|a| deposit(a as u64)).collect();
        let new = events
            .iter()
            .map(|e| NewEvent::from_event(e, Metadata::default()))
            .collect::<Result<Vec<_>, _>>()?;
        store.append(&stream, ExpectedVersion::Any, new).await?;
        raw.append(id, None, &events, None)?;
        n += count;
    }
    let repo = Repository::<Account>::new(store.clone());
    // Warm both page caches and the statement caches.
    let (warm, version) = repo.load(id).await?;
    let (raw_warm, raw_version) = raw.load(id)?;
    assert_eq!((warm.balance, version), (raw_warm.balance, raw_version));
    assert_eq!(version, sizes.rehydrate_events as u64);

    let mut samples = Samples::default();
    // One load takes milliseconds: many repeats cost little, and spread over a second they
    // keep a burst of other work on the machine from deciding the median.
    for repeat in 0..sizes.repeats * 20 {
        for side in sides(repeat) {
            let started = Instant::now();
            let (account, version) = match side {
                Side::Eventfold => repo.load(id).await?,
                Side::Raw => raw.load(id)?,
            };
            let value = per_second(sizes.rehydrate_events, started.elapsed());
            assert_eq!(version, sizes.rehydrate_events as u64);
            assert_eq!(account.deposits, sizes.rehydrate_events as u64);
            samples.push(side, value);
        }
    }
    eprintln!(
        "  rehydrate: eventfold {} events/s, raw {} events/s",
        fmt_value(median(&samples.eventfold)),
        fmt_value(median(&samples.raw))
    );
    store.close().await?;
    Ok(
        Row::new("rehydrate", "events/s", Goal::RatioAtLeast(0.8), &samples).baseline(format!(
            "Repository::load of one aggregate of {} events; raw: SELECT + serde_json + fold",
            sizes.rehydrate_events
        )),
    )
}

/// `sub_rebuild`'s projection: folds every event into an account in memory, no I/O.
#[derive(Default)]
struct Folding {
    account: Account,
}

impl SqliteProjection for Folding {
    type Event = AccountEvent;

    fn name(&self) -> &str {
        "folding"
    }

    fn clear(&mut self, _: &eventfold::sqlite::rusqlite::Transaction<'_>) -> Result<(), BoxError> {
        self.account = Account::default();
        Ok(())
    }

    fn apply(
        &mut self,
        _: &eventfold::sqlite::rusqlite::Transaction<'_>,
        event: &AccountEvent,
        _: &RecordedEvent,
    ) -> Result<(), BoxError> {
        self.account.fold(event);
        Ok(())
    }
}

/// `sub_rebuild`: a projection's rebuild (clear, then replay of the whole log in
/// transactions of `REBUILD_BATCH` events with their checkpoint) whose `apply` does no I/O;
/// raw: one SELECT of the log with serde_json decoding each payload and the same fold.
async fn sub_rebuild(sizes: Sizes, dir: &Path) -> Res<Row> {
    let run = tempfile::tempdir_in(dir)?;
    let path = run.path().join("eventfold.db");
    let store = open_store(&path).await?;
    let ids = stream_ids(sizes.batch_aggregates);
    let appends = sizes.rebuild_events / PER_APPEND;
    for a in 0..appends {
        let events = (0..PER_APPEND)
            .map(|i| {
                NewEvent::from_event(&deposit((a * PER_APPEND + i) as u64), Metadata::default())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stream = StreamId::new(Account::TYPE, ids[a % ids.len()].clone());
        store.append(&stream, ExpectedVersion::Any, events).await?;
    }
    let events = appends * PER_APPEND;
    let options = ProjectionOptions::new().batch_size(REBUILD_BATCH);
    let handle = store.run_projection(Folding::default(), options).await?;
    handle.wait_idle().await?;
    let raw = Connection::open(&path)?;
    let mut samples = Samples::default();
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let started = Instant::now();
            let deposits = match side {
                Side::Eventfold => {
                    handle.rebuild().await?;
                    handle.wait_idle().await?;
                    handle.progress().applied
                }
                Side::Raw => {
                    // Every column a projection is handed, borrowed from the row.
                    let mut stmt = raw.prepare_cached(
                        "SELECT position, event_id, aggregate_type, aggregate_id, version, \
                         event_type, schema_version, occurred_at, recorded_at, metadata, \
                         payload FROM events ORDER BY position",
                    )?;
                    let mut rows = stmt.query([])?;
                    let mut account = Account::default();
                    let mut fields = 0usize;
                    while let Some(row) = rows.next()? {
                        let (position, version): (i64, i64) = (row.get(0)?, row.get(4)?);
                        let id = row.get_ref(1)?.as_blob()?;
                        let stream = (row.get_ref(2)?.as_str()?, row.get_ref(3)?.as_str()?);
                        let times: (i64, i64, i64) = (row.get(6)?, row.get(7)?, row.get(8)?);
                        if let Some(metadata) = row.get_ref(9)?.as_str_or_null()? {
                            let metadata: serde_json::Value = serde_json::from_str(metadata)?;
                            fields += metadata.is_object() as usize;
                        }
                        let event =
                            raw_decode(row.get_ref(5)?.as_str()?, row.get_ref(10)?.as_str()?)?;
                        account.fold(&event);
                        fields += (position + version + times.0 + times.1 + times.2) as usize % 2
                            + id.len()
                            + stream.0.len()
                            + stream.1.len();
                    }
                    std::hint::black_box(fields);
                    account.deposits
                }
            };
            let value = per_second(events, started.elapsed());
            progress("sub_rebuild", repeat, side, value, "events/s");
            assert!(
                deposits >= events as u64,
                "{side:?} folded {deposits} of {events}"
            );
            samples.push(side, value);
        }
    }
    let folded = handle.stop().await?;
    assert_eq!(folded.account.deposits, events as u64);
    store.close().await?;
    Ok(
        Row::new("sub_rebuild", "events/s", Goal::RatioAtLeast(0.7), &samples).baseline(format!(
            "a SqliteProjection's rebuild over {events} stored events, {REBUILD_BATCH} per \
             transaction, apply without I/O; raw: SELECT of every column of the log (what a \
             projection is handed), borrowed, + serde_json + fold"
        )),
    )
}

/// `memory_rehydrate`: the in-memory store's `Repository::load` of one long aggregate
/// against folding a `Vec` of the same typed events, cloned for each load as a store that
/// keeps typed events hands out copies.
async fn memory_rehydrate(sizes: Sizes) -> Res<Row> {
    let id = "acc-long";
    let store = InMemoryEventStore::new();
    let stream = StreamId::new(Account::TYPE, id);
    let events: Vec<AccountEvent> = (0..sizes.rehydrate_events)
        .map(|a| deposit(a as u64))
        .collect();
    for chunk in events.chunks(1_000) {
        let new = chunk
            .iter()
            .map(|e| NewEvent::from_event(e, Metadata::default()))
            .collect::<Result<Vec<_>, _>>()?;
        store.append(&stream, ExpectedVersion::Any, new).await?;
    }
    let repo = Repository::<Account>::new(store);
    let raw_load = |events: &Vec<AccountEvent>| {
        let copy = std::hint::black_box(events.clone());
        let mut account = Account::default();
        for event in &copy {
            account.fold(event);
        }
        (account, copy.len() as u64)
    };
    let (warm, version) = repo.load(id).await?;
    let (raw_warm, raw_version) = raw_load(&events);
    assert_eq!((warm.balance, version), (raw_warm.balance, raw_version));

    let mut samples = Samples::default();
    for repeat in 0..sizes.repeats * 20 {
        for side in sides(repeat) {
            let started = Instant::now();
            let (account, version) = match side {
                Side::Eventfold => repo.load(id).await?,
                Side::Raw => raw_load(&events),
            };
            let value = per_second(sizes.rehydrate_events, started.elapsed());
            assert_eq!(version, sizes.rehydrate_events as u64);
            assert_eq!(account.deposits, sizes.rehydrate_events as u64);
            samples.push(side, value);
        }
    }
    eprintln!(
        "  memory_rehydrate: eventfold {} events/s, raw {} events/s",
        fmt_value(median(&samples.eventfold)),
        fmt_value(median(&samples.raw))
    );
    Ok(Row::new(
        "memory_rehydrate",
        "events/s",
        Goal::RatioAtLeast(0.8),
        &samples,
    )
    .baseline(format!(
        "InMemoryEventStore, Repository::load of one aggregate of {} events; raw: a Vec of \
         the typed events cloned and folded",
        sizes.rehydrate_events
    )))
}

async fn command_long_stream(sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let window = sizes.long_window;
    for repeat in 0..sizes.repeats {
        let run = tempfile::tempdir_in(dir)?;
        let store = open_store(&run.path().join("events.db")).await?;
        let repo = Repository::<Account>::new(store.clone()).snapshot_every(100);
        let mut first = Duration::ZERO;
        let mut last = Duration::ZERO;
        for n in 0..sizes.long_commands {
            let started = Instant::now();
            repo.execute("acc-long", AccountCommand::Deposit(n as u64))
                .await?;
            let elapsed = started.elapsed();
            if n < window {
                first += elapsed;
            }
            if n >= sizes.long_commands - window {
                last += elapsed;
            }
        }
        let (account, version) = repo.load("acc-long").await?;
        assert_eq!(version, sizes.long_commands as u64);
        assert_eq!(account.deposits, sizes.long_commands as u64);
        store.close().await?;
        // The "eventfold" column is the last window, the "raw" column the first.
        let last_rate = per_second(window, last);
        let first_rate = per_second(window, first);
        eprintln!(
            "  command_long_stream #{repeat}: first {window}: {} commands/s, last {window}: {} commands/s",
            fmt_value(first_rate),
            fmt_value(last_rate)
        );
        samples.eventfold.push(last_rate);
        samples.raw.push(first_rate);
    }
    Ok(Row::new(
        "command_long_stream",
        "commands/s",
        Goal::RatioAtLeast(0.8),
        &samples,
    )
    .baseline(format!(
        "{} commands on one aggregate, snapshot_every(100): eventfold column = last {window}, \
             raw column = first {window}; ratio = first time / last time",
        sizes.long_commands
    )))
}

async fn command_many(sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let ids = stream_ids(sizes.many_aggregates);
    let rounds = sizes.many_commands / ids.len();
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let value = match side {
                Side::Eventfold => {
                    let store = open_store(&path).await?;
                    let repo = Repository::<Account>::new(store.clone()).cache(ids.len());
                    let started = Instant::now();
                    // Task t owns the aggregates a with a % tasks == t: no conflicts, so
                    // this measures throughput, not retries.
                    let tasks: Vec<_> = (0..sizes.many_tasks)
                        .map(|t| {
                            let repo = repo.clone();
                            let mine: Vec<String> = ids
                                .iter()
                                .enumerate()
                                .filter(|(a, _)| a % sizes.many_tasks == t)
                                .map(|(_, id)| id.clone())
                                .collect();
                            tokio::spawn(async move {
                                for round in 0..rounds as u64 {
                                    for id in &mine {
                                        repo.execute(id, AccountCommand::Deposit(round)).await?;
                                    }
                                }
                                Ok::<_, CommandError<Infallible>>(())
                            })
                        })
                        .collect();
                    let elapsed = join_writers("command_many", &store, tasks, started).await?;
                    per_second(rounds * ids.len(), elapsed)
                }
                Side::Raw => {
                    let mut raw = RawStore::create(&path).await?;
                    let started = Instant::now();
                    for round in 0..rounds as u64 {
                        for id in &ids {
                            raw.execute(id, AccountCommand::Deposit(round))?;
                        }
                    }
                    per_second(rounds * ids.len(), started.elapsed())
                }
            };
            progress("command_many", repeat, side, value, "commands/s");
            samples.push(side, value);
        }
    }
    Ok(Row::new(
        "command_many",
        "commands/s",
        Goal::RatioAtLeast(2.0),
        &samples,
    )
    .baseline(format!(
        "{} commands over {} aggregates from {} tasks (Repository::execute, cache({})); raw: \
         one connection, load-fold-decide-insert, one transaction per command",
        rounds * ids.len(),
        ids.len(),
        sizes.many_tasks,
        ids.len()
    )))
}

async fn bus_transient(sizes: Sizes) -> Res<Row> {
    let mut samples = Samples::default();
    let ids = stream_ids(1_000);
    let n = sizes.transient_events;
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let tally = Arc::new(Tally::default());
            let value = match side {
                Side::Eventfold => {
                    let bus = EventBus::builder().queue_capacity(QUEUE_CAPACITY).build()?;
                    let seen = Arc::clone(&tally);
                    bus.subscribe("tally", move |d: Delivery<AccountEvent>| {
                        let seen = Arc::clone(&seen);
                        async move { on_event(&seen, d.event()).await }
                    })
                    .register()?;
                    bus.start().await?;
                    let started = Instant::now();
                    for i in 0..n {
                        bus.publish(
                            Outgoing::new(deposit(i as u64)).to(ids[i % ids.len()].clone()),
                        )
                        .await?;
                    }
                    bus.wait_idle().await?;
                    let elapsed = started.elapsed();
                    bus.stop().await?;
                    per_second(n, elapsed)
                }
                Side::Raw => {
                    let (tx, mut rx) = mpsc::channel::<(String, AccountEvent)>(QUEUE_CAPACITY);
                    let seen = Arc::clone(&tally);
                    let started = Instant::now();
                    let consumer = tokio::spawn(async move {
                        while let Some((_aggregate_id, event)) = rx.recv().await {
                            let _ = on_event(&seen, &event).await;
                        }
                    });
                    for i in 0..n {
                        tx.send((ids[i % ids.len()].clone(), deposit(i as u64)))
                            .await?;
                    }
                    drop(tx);
                    consumer.await?;
                    per_second(n, started.elapsed())
                }
            };
            assert_eq!(tally.events.load(Ordering::Relaxed), n as u64);
            progress("bus_transient", repeat, side, value, "events/s");
            samples.push(side, value);
        }
    }
    Ok(Row::new(
        "bus_transient",
        "events/s",
        Goal::RatioAtLeast(0.5),
        &samples,
    )
    .baseline(format!(
        "{n} events, `publish` one at a time from one task, 1,000 aggregates, one async \
             handler, 4 workers; raw: tokio mpsc({QUEUE_CAPACITY}), one consumer"
    )))
}

/// Publishes `count` events in batches of [`PER_APPEND`] (one aggregate per batch) to a
/// durable bus with one subscription, and returns once the subscription's checkpoint is
/// saved at the head.
async fn durable_run(path: &Path, count: usize, aggregates: usize) -> Res<Duration> {
    let store = open_store(path).await?;
    let bus = EventBus::builder()
        .store(store.clone() as Arc<dyn EventStore>)
        .build()?;
    let tally = Arc::new(Tally::default());
    let seen = Arc::clone(&tally);
    bus.subscribe("tally", move |d: Delivery<AccountEvent>| {
        let seen = Arc::clone(&seen);
        async move { on_event(&seen, d.event()).await }
    })
    .register()?;
    bus.start().await?;
    let ids = stream_ids(aggregates);
    let started = Instant::now();
    for batch in 0..count / PER_APPEND {
        let id = &ids[batch % ids.len()];
        bus.publish_batch((0..PER_APPEND as u64).map(|n| Outgoing::new(deposit(n)).to(id.clone())))
            .await?;
    }
    bus.wait_idle().await?;
    bus.stop().await?;
    let elapsed = started.elapsed();
    assert_eq!(tally.events.load(Ordering::Relaxed), count as u64);
    assert_eq!(store.load_checkpoint("tally").await?, Some(count as u64));
    store.close().await?;
    Ok(elapsed)
}

/// The raw side of a durable bus run: the batched appends, then (if `handle`) a reader
/// that decodes the log, hands each event to the handler and saves a checkpoint.
async fn raw_durable_run(
    path: &Path,
    count: usize,
    aggregates: usize,
    handle: bool,
) -> Res<Duration> {
    let mut raw = RawStore::create(path).await?;
    let ids = stream_ids(aggregates);
    let tally = Tally::default();
    let started = Instant::now();
    for batch in 0..count / PER_APPEND {
        let events: Vec<AccountEvent> = (0..PER_APPEND as u64).map(deposit).collect();
        raw.append(&ids[batch % ids.len()], None, &events, None)?;
    }
    if handle {
        let mut stmt = raw.conn.prepare_cached(
            "SELECT position, event_type, payload FROM events WHERE position > ?1 ORDER BY position",
        )?;
        let mut rows = stmt.query([0])?;
        let mut last = 0i64;
        while let Some(row) = rows.next()? {
            let event = raw_decode(row.get_ref(1)?.as_str()?, row.get_ref(2)?.as_str()?)?;
            let _ = on_event(&tally, &event).await;
            last = row.get(0)?;
        }
        drop(rows);
        drop(stmt);
        raw.conn.execute(
            "INSERT INTO checkpoints (subscription, position, updated_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (subscription) DO UPDATE SET position = excluded.position, \
             updated_at = excluded.updated_at",
            params!["tally", last, now_nanos()],
        )?;
        assert_eq!(tally.events.load(Ordering::Relaxed), count as u64);
    }
    Ok(started.elapsed())
}

async fn bus_durable(sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let n = sizes.batch_events;
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let elapsed = match side {
                Side::Eventfold => durable_run(&path, n, sizes.batch_aggregates).await?,
                Side::Raw => raw_durable_run(&path, n, sizes.batch_aggregates, false).await?,
            };
            let value = per_second(n, elapsed);
            progress("bus_durable", repeat, side, value, "events/s");
            samples.push(side, value);
        }
    }
    Ok(
        Row::new("bus_durable", "events/s", Goal::RatioAtLeast(0.7), &samples).baseline(format!(
            "{n} events by publish_batch({PER_APPEND}), stored and handled by one durable \
             subscription until its checkpoint is saved at the head; raw: the batched raw \
             append alone"
        )),
    )
}

async fn seed_1000(sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let n = sizes.seed_events;
    for repeat in 0..sizes.repeats * 2 {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let elapsed = match side {
                Side::Eventfold => durable_run(&path, n, 10).await?,
                Side::Raw => raw_durable_run(&path, n, 10, true).await?,
            };
            let value = elapsed.as_secs_f64() * 1e3;
            progress("seed_1000", repeat, side, value, "ms");
            samples.push(side, value);
        }
    }
    Ok(
        Row::new("seed_1000", "ms", Goal::Below(50.0), &samples).baseline(format!(
            "{n} events by publish_batch({PER_APPEND}) over 10 aggregates, handled by one durable \
         subscription, checkpoint saved; raw: the same appends, then read back, handled, \
         checkpoint committed (ratio: time, lower is better)"
        )),
    )
}

/// A stored row as the raw side of `archive_export` writes it: the columns as read, with
/// the id as text, serialized as one JSON line.
#[derive(Serialize)]
struct RawArchiveLine<'a> {
    event_id: Uuid,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    version: i64,
    position: i64,
    event_type: &'a str,
    schema_version: i64,
    occurred_at: i64,
    recorded_at: i64,
    metadata: Option<&'a str>,
    payload: &'a str,
}

/// The raw side of `archive_export`: one SELECT of every row in position order, each
/// row serialized to a JSON line and written through the same compressor at the same
/// level as `eventfold::archive::export`. Returns the events written.
fn raw_archive_export(db: &Path, target: &Path) -> Res<usize> {
    use std::io::Write;
    let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.pragma_update(None, "cache_size", -16_384)?;
    let file = std::fs::File::create_new(target)?;
    let mut out = flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(1 << 16, file),
        flate2::Compression::fast(),
    );
    let mut stmt = conn.prepare(
        "SELECT event_id, aggregate_type, aggregate_id, version, position, event_type, \
         schema_version, occurred_at, recorded_at, metadata, payload FROM events \
         ORDER BY position",
    )?;
    let mut rows = stmt.query([])?;
    let mut line = Vec::with_capacity(1024);
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let text = |i: usize| -> Res<&str> { Ok(row.get_ref(i)?.as_str()?) };
        line.clear();
        serde_json::to_writer(
            &mut line,
            &RawArchiveLine {
                event_id: Uuid::from_slice(row.get_ref(0)?.as_blob()?)?,
                aggregate_type: text(1)?,
                aggregate_id: text(2)?,
                version: row.get(3)?,
                position: row.get(4)?,
                event_type: text(5)?,
                schema_version: row.get(6)?,
                occurred_at: row.get(7)?,
                recorded_at: row.get(8)?,
                metadata: row.get_ref(9)?.as_str_or_null()?,
                payload: text(10)?,
            },
        )?;
        line.push(b'\n');
        out.write_all(&line)?;
        count += 1;
    }
    out.finish()?
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    Ok(count)
}

async fn archive_export(sizes: Sizes, dir: &Path) -> Res<Row> {
    let n = sizes.archive_events;
    let path = dir.join("archive.db");
    {
        let store = open_store(&path).await?;
        let streams: Vec<StreamId> = stream_ids(1_000)
            .iter()
            .map(|id| StreamId::new(Account::TYPE, id))
            .collect();
        // 1,000 events per transaction, ten to each of 100 streams.
        for batch in 0..n.div_ceil(1_000) {
            let metadata = Metadata::new().with_correlation_id(Uuid::now_v7());
            let mut requests = Vec::new();
            for s in 0..100 {
                let stream = &streams[(batch * 100 + s) % streams.len()];
                let events = (0..10u64)
                    .map(|n| NewEvent::from_event(&deposit(n), metadata.clone()))
                    .collect::<Result<Vec<_>, _>>()?;
                requests.push(eventfold::backend::AppendRequest {
                    stream: stream.clone(),
                    expected: ExpectedVersion::Any,
                    events,
                });
            }
            store.append_batch(requests).await?;
        }
        store.close().await?;
    }
    let mut samples = Samples::default();
    let mut sizes_written = (0, 0);
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let target = dir.join(format!("archive-{repeat}-{side:?}.gz"));
            let value = match side {
                Side::Eventfold => {
                    let store = open_store(&path).await?;
                    let started = Instant::now();
                    let manifest = eventfold::archive::export(
                        &*store,
                        eventfold::archive::ArchiveRange::BelowPosition(u64::MAX),
                        &target,
                        &mut eventfold::archive::no_progress,
                    )
                    .await?;
                    let elapsed = started.elapsed();
                    store.close().await?;
                    assert_eq!(manifest.events as usize, n.div_ceil(1_000) * 1_000);
                    sizes_written.0 = std::fs::metadata(&target)?.len();
                    per_second(manifest.events as usize, elapsed)
                }
                Side::Raw => {
                    let (db, file) = (path.clone(), target.clone());
                    let started = Instant::now();
                    let count = tokio::task::spawn_blocking(move || raw_archive_export(&db, &file))
                        .await??;
                    let elapsed = started.elapsed();
                    sizes_written.1 = std::fs::metadata(&target)?.len();
                    per_second(count, elapsed)
                }
            };
            std::fs::remove_file(&target)?;
            progress("archive_export", repeat, side, value, "events/s");
            samples.push(side, value);
        }
    }
    Ok(Row::new(
        "archive_export",
        "events/s",
        Goal::RatioAtLeast(0.5),
        &samples,
    )
    .baseline(format!(
        "export of {n} events (1,000 streams) to a gzip NDJSON archive ({} bytes); raw: \
         rusqlite SELECT of the same rows, each as a JSON line through the same gzip level \
         ({} bytes)",
        sizes_written.0, sizes_written.1
    )))
}

/// Runs `bus_memory` in child processes, one per side and repeat, so the peak RSS is the
/// scenario's own.
fn bus_memory(sizes: Sizes) -> Res<Row> {
    let mut samples = Samples::default();
    let mut nothing_dropped = true;
    let exe = std::env::current_exe()?;
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let which = match side {
                Side::Eventfold => "eventfold",
                Side::Raw => "raw",
            };
            let output = Command::new(&exe)
                .args([CHILD_FLAG, which, &sizes.memory_events.to_string()])
                .output()?;
            if !output.status.success() {
                return Err(format!(
                    "the bus_memory child failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
                .into());
            }
            let report: ChildReport = serde_json::from_slice(&output.stdout)?;
            nothing_dropped &= report.delivered == report.published;
            let mib = report.peak_rss_kib as f64 / 1024.0;
            eprintln!(
                "  bus_memory #{repeat} {side:?}: peak RSS {mib:.1} MiB, {} of {} delivered in {:.1} s",
                report.delivered, report.published, report.seconds
            );
            samples.push(side, mib);
        }
    }
    let mut row =
        Row::new("bus_memory", "MiB peak RSS", Goal::Below(64.0), &samples).baseline(format!(
            "{} events through a capacity-{QUEUE_CAPACITY} transient bus to a handler that \
             yields once per event, in a child process; delivered == published: {}; raw: \
             tokio mpsc({QUEUE_CAPACITY}) (ratio: memory, lower is better)",
            sizes.memory_events,
            if nothing_dropped { "yes" } else { "NO" }
        ));
    row.also = nothing_dropped;
    Ok(row)
}

const CHILD_FLAG: &str = "--bus-memory-child";

#[derive(Serialize, Deserialize)]
struct ChildReport {
    published: u64,
    delivered: u64,
    peak_rss_kib: u64,
    seconds: f64,
}

/// The child of `bus_memory`: one side's run, then its own peak RSS.
fn bus_memory_child(which: &str, n: usize) -> Res<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let tally = Arc::new(Tally::default());
    let ids = stream_ids(1_000);
    let started = Instant::now();
    runtime.block_on(async {
        match which {
            "eventfold" => {
                let bus = EventBus::builder().queue_capacity(QUEUE_CAPACITY).build()?;
                let seen = Arc::clone(&tally);
                bus.subscribe("slow", move |d: Delivery<AccountEvent>| {
                    let seen = Arc::clone(&seen);
                    async move { on_event_slowly(&seen, d.event()).await }
                })
                .register()?;
                bus.start().await?;
                for i in 0..n {
                    bus.publish(Outgoing::new(deposit(i as u64)).to(ids[i % ids.len()].clone()))
                        .await?;
                }
                bus.wait_idle().await?;
                bus.stop().await?;
            }
            "raw" => {
                let (tx, mut rx) = mpsc::channel::<(String, AccountEvent)>(QUEUE_CAPACITY);
                let seen = Arc::clone(&tally);
                let consumer = tokio::spawn(async move {
                    while let Some((_aggregate_id, event)) = rx.recv().await {
                        let _ = on_event_slowly(&seen, &event).await;
                    }
                });
                for i in 0..n {
                    tx.send((ids[i % ids.len()].clone(), deposit(i as u64)))
                        .await?;
                }
                drop(tx);
                consumer.await?;
            }
            other => return Err(format!("unknown side {other}").into()),
        }
        Ok::<_, Box<dyn Error + Send + Sync>>(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    drop(runtime);
    let report = ChildReport {
        published: n as u64,
        delivered: tally.events.load(Ordering::Relaxed),
        peak_rss_kib: peak_rss_kib()?,
        seconds,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// `VmHWM` of this process: its peak resident set size, in KiB.
fn peak_rss_kib() -> Res<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/self/status")?;
    Ok(line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

/// The members `sub_scale` runs the subscription on, after its run by one.
const SCALE_MEMBERS: usize = 4;

/// One subscription whose handler waits 1 ms per event, run by one process ("raw") and
/// then by [`SCALE_MEMBERS`] ("eventfold") on one SQLite file: events/s from `go` to every
/// segment's checkpoint at the head. With `pool > 0` (`sub_scale_pool4`) each process's
/// handler holds one of `pool` connections of a pool while it waits. The code is shared
/// with `pg_sub_scale` (`pg_scenarios::scale_run`).
async fn sub_scale(scenario: &'static str, pool: usize, sizes: Sizes, dir: &Path) -> Res<Row> {
    let mut samples = Samples::default();
    let n = sizes.scale_events;
    let mut handled_ok = true;
    let mut split = String::new();
    let mut cpu = Samples::default();
    for repeat in 0..sizes.repeats {
        for side in sides(repeat) {
            let run = tempfile::tempdir_in(dir)?;
            let path = run.path().join("events.db");
            let store = open_store(&path).await?;
            let head = pg_scenarios::scale_append(store.clone(), n).await?;
            let members = match side {
                Side::Eventfold => SCALE_MEMBERS,
                Side::Raw => 1,
            };
            let spec = format!("sqlite:{}", path.display());
            let outcome =
                pg_scenarios::scale_run(store.as_ref(), &spec, members, pool, head).await?;
            store.close().await?;
            handled_ok &= outcome.handled >= n as u64;
            let value = per_second(n, outcome.elapsed);
            let shares: Vec<String> = outcome
                .owners
                .iter()
                .map(|(owner, segments)| format!("{owner}: {}", segments.len()))
                .collect();
            eprintln!(
                "  {scenario} #{repeat} {members} process(es): {} events/s in {:.2} s, {} \
                 handled, CPU {:.2} s, segments {}",
                fmt_value(value),
                outcome.elapsed.as_secs_f64(),
                outcome.handled,
                outcome.cpu.as_secs_f64(),
                shares.join(", ")
            );
            if side == Side::Eventfold {
                split = shares.join(", ");
            }
            samples.push(side, value);
            cpu.push(
                side,
                outcome.cpu.as_secs_f64() / outcome.elapsed.as_secs_f64(),
            );
        }
    }
    let limit = if pool > 0 {
        format!(
            "whose handler waits 1 ms (tokio sleep) holding one of the {pool} connections of \
             its process's pool"
        )
    } else {
        "whose handler waits 1 ms (tokio sleep) per event, with no other limit".to_owned()
    };
    let mut row =
        Row::new(scenario, "events/s", Goal::RatioAtLeast(3.0), &samples).baseline(format!(
            "{} events on {} aggregates (appended before), one subscription of {} segments \
             {limit}, run by {SCALE_MEMBERS} processes on one SQLite file (segments held: \
             {split}) vs 1 process (the raw column), from `go` to every segment's checkpoint \
             at the head; ratio = speed-up. Every event handled: {}. CPU used per second of \
             the run (medians): 1 process {:.2}, {SCALE_MEMBERS} processes {:.2} in all",
            fmt_value(n as f64),
            fmt_value(pg_scenarios::SCALE_AGGREGATES as f64),
            pg_scenarios::SCALE_SEGMENTS,
            if handled_ok { "yes" } else { "NO" },
            median(&cpu.raw),
            median(&cpu.eventfold),
        ));
    row.also = handled_ok;
    Ok(row)
}

/// A member process of `sub_scale` (or `pg_sub_scale`) on the store `spec` names.
fn sub_scale_member(spec: &str) -> Res<()> {
    let member = std::env::var(pg_scenarios::SCALE_MEMBER)?;
    let pool: usize = std::env::var(pg_scenarios::SCALE_POOL)?.parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store: Arc<dyn EventStore> = match spec.strip_prefix("sqlite:") {
            Some(path) => open_store(Path::new(path)).await?,
            None => pg_scenarios::scale_postgres_store(spec)
                .await
                .ok_or_else(|| format!("unknown store {spec}"))??,
        };
        pg_scenarios::scale_member(store, &member, pool).await
    })
}

// ---------------------------------------------------------------------------------------
// The machine, the table, and main.

fn machine() -> Vec<(&'static str, String)> {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = Command::new("rustc")
        .arg("-V")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    vec![
        ("nproc", cores.to_string()),
        ("cpu", cpu),
        ("rustc", rustc),
        ("sqlite", rusqlite::version().to_owned()),
        ("os", std::env::consts::OS.to_owned()),
    ]
}

fn fmt_value(value: f64) -> String {
    if !value.is_finite() {
        return "-".to_owned();
    }
    if value >= 1_000.0 {
        // Thousands separated by commas.
        let digits = format!("{:.0}", value);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn print_table(rows: &[Row], mode: &str, repeats: usize, machine: &[(&str, String)]) {
    println!("eventfold performance report ({mode}; medians of >= {repeats} runs each)");
    for (key, value) in machine {
        println!("  {key:<7} {value}");
    }
    println!();
    println!(
        "| {:<22} | {:>12} | {:>12} | {:<12} | {:>6} | {:<12} | {:<4} |",
        "scenario", "eventfold", "raw", "unit", "ratio", "goal", "met"
    );
    println!(
        "|{:-<24}|{:->14}|{:->14}|{:-<14}|{:->8}|{:-<14}|{:-<6}|",
        "", "", "", "", "", "", ""
    );
    for row in rows {
        println!(
            "| {:<22} | {:>12} | {:>12} | {:<12} | {:>6.2} | {:<12} | {:<4} |",
            row.scenario,
            fmt_value(row.eventfold),
            fmt_value(row.raw),
            row.unit,
            row.ratio,
            row.goal.describe(row.unit),
            if row.met() { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "ratio = eventfold / raw: higher is better for events/s and commands/s, lower for ms \
         and MiB."
    );
    for row in rows {
        println!("- {}: {}", row.scenario, row.baseline);
    }
}

fn print_json(row: &Row) -> Res<()> {
    let round = |v: f64, places: i32| {
        let scale = 10f64.powi(places);
        serde_json::Value::from((v * scale).round() / scale)
    };
    // Written field by field to keep the documented order of the keys.
    println!(
        "{{\"scenario\":{},\"eventfold\":{},\"raw\":{},\"unit\":{},\"ratio\":{},\"goal\":{},\"met\":{}}}",
        serde_json::to_string(row.scenario)?,
        round(row.eventfold, 2),
        round(row.raw, 2),
        serde_json::to_string(row.unit)?,
        round(row.ratio, 3),
        serde_json::to_string(&row.goal.describe(row.unit))?,
        row.met(),
    );
    Ok(())
}

/// The store a report measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Sqlite,
    Postgres,
}

struct Args {
    quick: bool,
    json: bool,
    only: Option<String>,
    repeats: Option<usize>,
    store: StoreKind,
}

/// The names of the scenarios `--store` runs.
fn scenario_names(store: StoreKind) -> Vec<&'static str> {
    match store {
        StoreKind::Sqlite => SCENARIOS.to_vec(),
        StoreKind::Postgres => pg_scenarios::SCENARIOS.iter().map(|s| s.name).collect(),
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Res<Args> {
    let mut parsed = Args {
        quick: false,
        json: false,
        only: None,
        repeats: None,
        store: StoreKind::Sqlite,
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => parsed.quick = true,
            "--json" => parsed.json = true,
            "--only" => {
                let name = args.next().ok_or("--only needs a scenario name")?;
                parsed.only = Some(name);
            }
            "--store" => {
                parsed.store = match args.next().as_deref() {
                    Some("sqlite") => StoreKind::Sqlite,
                    Some("postgres") => StoreKind::Postgres,
                    _ => return Err("--store needs `sqlite` or `postgres`".into()),
                }
            }
            // For profiling one scenario: `--only rehydrate --repeats 100`.
            "--repeats" => {
                let n: usize = args.next().ok_or("--repeats needs a number")?.parse()?;
                parsed.repeats = Some(n.max(1));
            }
            "--help" | "-h" => {
                println!(
                    "usage: perf_report [--store sqlite|postgres] [--quick] [--json] \
                     [--only SCENARIO] [--repeats N]\n\
                     scenarios: {}\n\
                     with --store postgres (on EVENTFOLD_PG_URL): {}",
                    SCENARIOS.join(", "),
                    scenario_names(StoreKind::Postgres).join(", ")
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other} (try --help)").into()),
        }
    }
    if let Some(name) = &parsed.only {
        let names = scenario_names(parsed.store);
        if !names.contains(&name.as_str()) {
            return Err(format!(
                "unknown scenario {name}; the scenarios are {}{}",
                names.join(", "),
                if parsed.store == StoreKind::Sqlite {
                    " (the PostgreSQL ones need --store postgres)"
                } else {
                    ""
                }
            )
            .into());
        }
    }
    Ok(parsed)
}

/// The PostgreSQL rows (`--store postgres`): each scenario's runs interleave the store and
/// the raw side; the ratio is the median of the runs' ratios.
async fn postgres_report(args: &Args, repeats: usize) -> Res<()> {
    let url = std::env::var("EVENTFOLD_PG_URL")
        .unwrap_or_else(|_| eventfold::postgres::DEFAULT_URL.to_owned());
    let mut bench = pg_scenarios::Bench::connect(&url, true)
        .await
        .map_err(|e| format!("cannot reach PostgreSQL at {url} (set EVENTFOLD_PG_URL): {e}"))?;
    let mut machine = machine();
    machine.retain(|(key, _)| *key != "sqlite");
    machine.push(("postgres", bench.server_version().await?));
    if args.json {
        for (key, value) in &machine {
            eprintln!("{key}: {value}");
        }
    }
    let counts = if args.quick {
        pg_scenarios::QUICK
    } else {
        pg_scenarios::FULL
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for scenario in &pg_scenarios::SCENARIOS {
        if args
            .only
            .as_deref()
            .is_some_and(|only| only != scenario.name)
        {
            continue;
        }
        eprintln!("{} ...", scenario.name);
        let scenario_started = Instant::now();
        let measured = bench.measure(scenario.name, counts, repeats).await?;
        let baseline = match &measured.note {
            Some(note) => format!("{}; {note}", scenario.baseline),
            None => scenario.baseline.to_owned(),
        };
        let row = Row {
            scenario: scenario.name,
            eventfold: measured.store,
            raw: measured.raw,
            unit: scenario.unit,
            ratio: measured.ratio,
            goal: Goal::RatioAtLeast(scenario.goal),
            also: true,
            baseline,
        };
        eprintln!(
            "{}: eventfold {} {}, raw {} {}, ratio {:.2} ({:.1} s)",
            row.scenario,
            fmt_value(row.eventfold),
            row.unit,
            fmt_value(row.raw),
            row.unit,
            row.ratio,
            scenario_started.elapsed().as_secs_f64()
        );
        if args.json {
            print_json(&row)?;
        }
        rows.push(row);
    }
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    if !args.json {
        let mode = if args.quick {
            "--store postgres --quick"
        } else {
            "--store postgres"
        };
        print_table(&rows, mode, repeats, &machine);
    }
    Ok(())
}

async fn run(name: &str, sizes: Sizes, dir: &Path) -> Res<Row> {
    match name {
        "append_batch" => append_batch(sizes, dir).await,
        "append_concurrent" => append_concurrent(sizes, dir).await,
        "append_concurrent_64" => append_concurrent_64(sizes, dir).await,
        "rehydrate" => rehydrate(sizes, dir).await,
        "memory_rehydrate" => memory_rehydrate(sizes).await,
        "command_long_stream" => command_long_stream(sizes, dir).await,
        "command_many" => command_many(sizes, dir).await,
        "bus_transient" => bus_transient(sizes).await,
        "bus_durable" => bus_durable(sizes, dir).await,
        "seed_1000" => seed_1000(sizes, dir).await,
        "bus_memory" => bus_memory(sizes),
        "sub_rebuild" => sub_rebuild(sizes, dir).await,
        "archive_export" => archive_export(sizes, dir).await,
        "sub_scale" => sub_scale("sub_scale", 0, sizes, dir).await,
        "sub_scale_pool4" => {
            let pool = pg_scenarios::SCALE_POOL_SIZE;
            sub_scale("sub_scale_pool4", pool, sizes, dir).await
        }
        other => Err(format!("unknown scenario {other}").into()),
    }
}

/// Set (to anything) to run the report with a Prometheus recorder installed, to compare
/// with a run without one (the metrics' cost).
const METRICS_ENV: &str = "EVENTFOLD_PERF_METRICS";

fn main() -> Res<()> {
    if let Ok(spec) = std::env::var(pg_scenarios::SCALE_STORE) {
        return sub_scale_member(&spec);
    }
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some(CHILD_FLAG) {
        let which = args.next().ok_or("the child needs a side")?;
        let n = args.next().ok_or("the child needs a count")?.parse()?;
        return bus_memory_child(&which, n);
    }
    let args = parse_args(first.into_iter().chain(args))?;
    let mut sizes = if args.quick { QUICK } else { FULL };
    if let Some(repeats) = args.repeats {
        sizes.repeats = repeats;
    }
    registry().validate()?;
    registry().expect_type::<AccountEvent>()?;
    if std::env::var_os(METRICS_ENV).is_some() {
        // What the metrics cost: the same report with a real recorder taking every metric.
        metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
        eventfold::metrics::describe();
        eprintln!("{METRICS_ENV}: a Prometheus recorder takes eventfold's metrics");
    }

    // Both sides must store the very same payload text.
    let (_, raw_payload) = raw_encode(&deposit(7))?;
    assert_eq!(deposit(7).to_payload()?, raw_payload);

    if args.json {
        // stdout carries only the scenarios' JSON lines.
        for (key, value) in machine() {
            eprintln!("{key}: {value}");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.store == StoreKind::Postgres {
        return runtime.block_on(postgres_report(&args, sizes.repeats));
    }
    let dir = tempfile::Builder::new()
        .prefix("eventfold-perf-")
        .tempdir()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    for name in SCENARIOS {
        if args.only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        eprintln!("{name} ...");
        let scenario_started = Instant::now();
        let row = runtime.block_on(run(name, sizes, dir.path()))?;
        eprintln!(
            "{name}: eventfold {} {}, raw {} {}, ratio {:.2} ({:.1} s)",
            fmt_value(row.eventfold),
            row.unit,
            fmt_value(row.raw),
            row.unit,
            row.ratio,
            scenario_started.elapsed().as_secs_f64()
        );
        if args.json {
            print_json(&row)?;
        }
        rows.push(row);
    }
    drop(runtime);
    dir.close()?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    if !args.json {
        let mode = if args.quick { "--quick" } else { "full" };
        print_table(&rows, mode, sizes.repeats, &machine());
    }
    Ok(())
}
