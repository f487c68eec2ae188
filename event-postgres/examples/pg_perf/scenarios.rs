//! The PostgreSQL rows of the performance report: the store against hand-written
//! tokio-postgres on the same server, measured in one run, interleaved (store, raw, store,
//! raw...), medians of the repeats. Shared by `pg_perf` (this example) and the facade's
//! `perf_report --store postgres`, which include this file as a module.
//!
//! - `pg_append_batch`: 20,000 events in appends of 100 vs raw `UNNEST` inserts of the
//!   same rows, 100 per transaction, on one connection (goal: >= 0.8).
//! - `pg_append_concurrent`: 8 tasks appending one event at a time, 2,000 in all, vs raw
//!   one-event transactions on one connection (goal: >= 4x).
//! - `pg_command_many`: the bank workload, 8,000 deposits over 1,000 accounts from 8 tasks
//!   (each task owns its accounts), `Repository::execute` with a cache vs a hand-written
//!   tokio-postgres handler, two round trips per command (load and fold, insert at the
//!   next version), one connection per task (goal: >= 2x).
//! - `pg_rehydrate`: replaying one stream of 10,000 events into a fold that decodes each
//!   payload with serde vs a raw `SELECT` and the same fold (goal: >= 0.8).
//! - `pg_command_long_stream`: 5,000 commands on one aggregate through a `Repository` with
//!   `snapshot_every(100)`, as the SQLite report's `command_long_stream`: the rate of the
//!   last 500 commands (the "store" column) vs the first 500 (the "raw" column); snapshots
//!   keep a load from replaying the whole stream (goal: >= 0.8).
//! - `pg_bus_durable`: 100,000 events by `publish_batch` of 100 over 1,000 aggregates to a
//!   bus with one durable subscription, handled by a handler that counts, until
//!   `wait_idle` (the checkpoint saved at the head) vs the batched raw `UNNEST` append of
//!   the same rows alone, as the SQLite report's `bus_durable` (goal: >= 0.7).
//!
//! Uses a schema of its own per run, dropped after it. The machine is shared: quote the
//! load with the figures.

// Each includer uses its own part of this module.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use eventfold_core::{EventLog, ExpectedVersion, Metadata, NewEvent, StreamId};
use eventfold_postgres::{PostgresEventStore, PostgresOptions};
use tokio_postgres::NoTls;
use uuid::Uuid;

/// What a scenario returns.
pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PAYLOAD: &str = r#"{"account":"acc-000123","amount":1250,"currency":"EUR","note":"monthly deposit from the savings plan"}"#;

fn event() -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "FundsDeposited".to_owned(),
        schema_version: 1,
        occurred_at: Utc::now(),
        metadata: Metadata::new(),
        payload: PAYLOAD.to_owned(),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The session and state the scenarios share.
pub struct Bench {
    url: String,
    schema: String,
    raw: tokio_postgres::Client,
    round: usize,
    notify: bool,
    /// Appends per writer call in the concurrent runs: group commit at work.
    appends_per_call: Vec<f64>,
    /// The share of the concurrent runs' time the writer waited for the server.
    call_share: Vec<f64>,
}

impl Bench {
    /// A fresh store schema and a raw table shaped like its events table.
    async fn fresh(&mut self) -> Res<(PostgresEventStore, String)> {
        self.round += 1;
        let schema = format!("{}_{}", self.schema, self.round);
        self.raw
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        let store = PostgresEventStore::open(
            PostgresOptions::new(&self.url)
                .schema(&schema)
                .notify(self.notify),
        )
        .await?;
        self.raw
            .batch_execute(&format!(
                "CREATE TABLE {schema}.raw_events (LIKE {schema}.ef_events INCLUDING ALL)"
            ))
            .await?;
        Ok((store, schema))
    }

    /// Keeps what the store's writer did in a run of `elapsed`: its appends per call, and
    /// the share of the run it spent waiting for the server.
    fn record_writer(&mut self, store: &PostgresEventStore, elapsed: Duration) {
        let writer = store.writer_statistics();
        self.appends_per_call
            .push(writer.appends as f64 / writer.calls.max(1) as f64);
        self.call_share
            .push(writer.call_micros as f64 / elapsed.as_micros().max(1) as f64);
    }

    async fn drop_schema(&self, schema: &str) -> Res<()> {
        self.raw
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await?;
        Ok(())
    }
}

const INSERT_RAW: &str = "INSERT INTO {s}.raw_events (position, stream_type, stream_id, version, \
     event_id, event_type, schema_version, occurred_at, recorded_at, metadata, payload) \
     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::uuid[], \
     $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[])";

/// The rows of one raw insert: `count` events of one `Account` stream, from `position`
/// and `version` on, all of one type and payload.
struct RawBatch<'a> {
    stream: &'a str,
    position: i64,
    version: i64,
    count: usize,
    event_type: &'a str,
    payload: &'a str,
}

impl<'a> RawBatch<'a> {
    /// `count` deposits (the [`PAYLOAD`]) on one stream whose positions are its versions.
    fn deposits(stream: &'a str, first: i64, count: usize) -> Self {
        RawBatch {
            stream,
            position: first,
            version: first,
            count,
            event_type: "FundsDeposited",
            payload: PAYLOAD,
        }
    }
}

/// Inserts a batch the raw way: one `UNNEST` statement in one transaction.
async fn raw_insert(
    raw: &tokio_postgres::Client,
    statement: &tokio_postgres::Statement,
    batch: &RawBatch<'_>,
) -> Res<()> {
    let count = batch.count;
    let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let positions: Vec<i64> = (batch.position..batch.position + count as i64).collect();
    let versions: Vec<i64> = (batch.version..batch.version + count as i64).collect();
    let types = vec!["Account"; count];
    let ids = vec![batch.stream; count];
    let event_ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    let event_types = vec![batch.event_type; count];
    let schema_versions = vec![1_i64; count];
    let times = vec![now; count];
    let metadata: Vec<Option<&str>> = vec![None; count];
    let payloads = vec![batch.payload; count];
    raw.execute(
        statement,
        &[
            &positions,
            &types,
            &ids,
            &versions,
            &event_ids,
            &event_types,
            &schema_versions,
            &times,
            &times,
            &metadata,
            &payloads,
        ],
    )
    .await?;
    Ok(())
}

async fn append_batch(bench: &mut Bench, events: usize) -> Res<(f64, f64)> {
    let (store, schema) = bench.fresh().await?;
    let started = Instant::now();
    let stream = StreamId::new("Account", "batch");
    for _ in 0..events / 100 {
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                (0..100).map(|_| event()).collect(),
            )
            .await?;
    }
    let ours = events as f64 / started.elapsed().as_secs_f64();
    let statement = bench
        .raw
        .prepare(&INSERT_RAW.replace("{s}", &schema))
        .await?;
    let started = Instant::now();
    for i in 0..events / 100 {
        let batch = RawBatch::deposits("batch", 1 + (i * 100) as i64, 100);
        raw_insert(&bench.raw, &statement, &batch).await?;
    }
    let raw = events as f64 / started.elapsed().as_secs_f64();
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((ours, raw))
}

async fn append_concurrent(bench: &mut Bench, events: usize) -> Res<(f64, f64)> {
    let (store, schema) = bench.fresh().await?;
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let stream = StreamId::new("Account", format!("task-{t}"));
                for _ in 0..events / 8 {
                    store
                        .append(&stream, ExpectedVersion::Any, vec![event()])
                        .await?;
                }
                Ok::<_, eventfold_core::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let ours = events as f64 / elapsed.as_secs_f64();
    bench.record_writer(&store, elapsed);
    let statement = bench
        .raw
        .prepare(&INSERT_RAW.replace("{s}", &schema))
        .await?;
    let started = Instant::now();
    for i in 0..events {
        raw_insert(
            &bench.raw,
            &statement,
            &RawBatch::deposits("single", 1 + i as i64, 1),
        )
        .await?;
    }
    let raw = events as f64 / started.elapsed().as_secs_f64();
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((ours, raw))
}

/// The payload as the fold decodes it.
#[derive(serde::Deserialize)]
struct Deposit {
    amount: u64,
    #[allow(dead_code)]
    currency: String,
}

/// Folds a replay into a balance, decoding each payload.
struct Balance(u64);

impl eventfold_core::ReplayVisitor for Balance {
    fn visit(&mut self, event: eventfold_core::ReplayedEvent<'_>) -> eventfold_core::Result<()> {
        let deposit: Deposit = serde_json::from_str(event.payload).map_err(|source| {
            eventfold_core::Error::Payload {
                event_type: event.event_type.to_owned(),
                event_id: None,
                position: None,
                source,
            }
        })?;
        self.0 += deposit.amount;
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

async fn rehydrate(bench: &mut Bench, events: usize) -> Res<(f64, f64)> {
    let (store, schema) = bench.fresh().await?;
    let stream = StreamId::new("Account", "long");
    for _ in 0..events / 1000 {
        store
            .append(
                &stream,
                ExpectedVersion::Any,
                (0..1000).map(|_| event()).collect(),
            )
            .await?;
    }
    let started = Instant::now();
    let folded = store
        .replay_stream(&stream, 1, Box::new(Balance(0)))
        .await?
        .into_any()
        .downcast::<Balance>()
        .map_err(|_| "the visitor comes back")?;
    let ours = events as f64 / started.elapsed().as_secs_f64();
    let sql = format!(
        "SELECT version, event_type, schema_version, payload FROM {schema}.ef_events \
         WHERE stream_type = $1 AND stream_id = $2 AND version >= $3 ORDER BY version"
    );
    let statement = bench.raw.prepare(&sql).await?;
    let started = Instant::now();
    let rows = bench
        .raw
        .query(&statement, &[&"Account", &"long", &1_i64])
        .await?;
    let mut balance = 0;
    for row in &rows {
        let deposit: Deposit = serde_json::from_str(row.get(3))?;
        balance += deposit.amount;
    }
    let raw = events as f64 / started.elapsed().as_secs_f64();
    assert_eq!(folded.0, balance);
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((ours, raw))
}

// The bank workload: deposits to many accounts from 8 tasks, each task owning its accounts
// (no conflicts: this measures throughput, not retries).

#[derive(
    Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, eventfold_macros::DomainEvent,
)]
#[domain_event(aggregate = "PgAccount", crate = "eventfold_core")]
enum AccountEvent {
    // Named apart from the report's own `Deposited` (one registry per program).
    #[domain_event(name = "PgDeposited")]
    Deposited {
        amount: u64,
        currency: String,
        memo: String,
    },
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Account {
    balance: u64,
}

impl Account {
    fn fold(&mut self, event: &AccountEvent) {
        let AccountEvent::Deposited { amount, .. } = event;
        self.balance += amount;
    }

    fn decide(&self, amount: u64) -> AccountEvent {
        deposit(amount)
    }
}

/// The one event of the bank workload (and of the bus's).
fn deposit(amount: u64) -> AccountEvent {
    AccountEvent::Deposited {
        amount,
        currency: "EUR".to_owned(),
        memo: "perf deposit".to_owned(),
    }
}

impl eventfold_core::Aggregate for Account {
    type Event = AccountEvent;
    type Command = u64;
    type Error = std::convert::Infallible;

    fn apply(&mut self, event: &AccountEvent) {
        self.fold(event);
    }

    fn handle(&self, amount: u64) -> Result<Vec<AccountEvent>, Self::Error> {
        Ok(vec![self.decide(amount)])
    }
}

const TASKS: usize = 8;
const ACCOUNTS: usize = 1_000;

/// The accounts task `t` owns.
fn owned(t: usize) -> Vec<String> {
    (0..ACCOUNTS)
        .filter(|a| a % TASKS == t)
        .map(|a| format!("acc-{a}"))
        .collect()
}

/// One command the hand-written way, two round trips: read the stream and fold it, then
/// insert the new event with the next version (a unique violation would be a conflict).
async fn raw_command(
    client: &tokio_postgres::Client,
    load: &tokio_postgres::Statement,
    insert: &tokio_postgres::Statement,
    id: &str,
    amount: u64,
) -> Res<()> {
    let rows = client.query(load, &[&id]).await?;
    let mut account = Account::default();
    let mut version = 0_i64;
    for row in &rows {
        let event: AccountEvent = serde_json::from_str(row.get(1))?;
        account.fold(&event);
        version = row.get(0);
    }
    let event = account.decide(amount);
    let payload = serde_json::to_string(&event)?;
    let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
    client
        .execute(
            insert,
            &[&id, &(version + 1), &Uuid::now_v7(), &now, &payload],
        )
        .await?;
    Ok(())
}

async fn command_many(bench: &mut Bench, commands: usize) -> Res<(f64, f64)> {
    let (store, schema) = bench.fresh().await?;
    let rounds = commands / ACCOUNTS;
    let repo = eventfold_core::Repository::<Account>::new(store.clone()).cache(ACCOUNTS);
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for round in 0..rounds as u64 {
                    for id in &owned(t) {
                        repo.execute(id, round).await?;
                    }
                }
                Ok::<_, eventfold_core::CommandError<std::convert::Infallible>>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed();
    let ours = (rounds * ACCOUNTS) as f64 / elapsed.as_secs_f64();
    bench.record_writer(&store, elapsed);

    bench
        .raw
        .batch_execute(&format!(
            "CREATE TABLE {schema}.raw_commands (position bigserial PRIMARY KEY, \
             stream_id text NOT NULL, version bigint NOT NULL, event_id uuid NOT NULL UNIQUE, \
             event_type text NOT NULL, recorded_at bigint NOT NULL, payload text NOT NULL, \
             UNIQUE (stream_id, version))"
        ))
        .await?;
    let mut clients = Vec::new();
    for _ in 0..TASKS {
        let (client, connection) = tokio_postgres::connect(&bench.url, NoTls).await?;
        tokio::spawn(connection);
        clients.push(client);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(t, client)| {
            let schema = schema.clone();
            tokio::spawn(async move {
                let load = client
                    .prepare(&format!(
                        "SELECT version, payload FROM {schema}.raw_commands \
                         WHERE stream_id = $1 ORDER BY version"
                    ))
                    .await?;
                let insert = client
                    .prepare(&format!(
                        "INSERT INTO {schema}.raw_commands (stream_id, version, event_id, \
                         event_type, recorded_at, payload) VALUES ($1, $2, $3, 'Deposited', $4, $5)"
                    ))
                    .await?;
                for round in 0..rounds as u64 {
                    for id in &owned(t) {
                        raw_command(&client, &load, &insert, id, round).await?;
                    }
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let raw = (rounds * ACCOUNTS) as f64 / started.elapsed().as_secs_f64();
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((ours, raw))
}

/// The snapshot interval of `pg_command_long_stream`, as in the SQLite report.
const SNAPSHOT_EVERY: u64 = 100;
/// The commands of the first and of the last window of `pg_command_long_stream`.
const LONG_WINDOW: usize = 500;

/// `commands` deposits on one aggregate through a repository with snapshots, each timed:
/// returns the rate of the last [`LONG_WINDOW`] commands and of the first.
async fn command_long_stream(bench: &mut Bench, commands: usize) -> Res<(f64, f64)> {
    if commands < 2 * LONG_WINDOW {
        return Err(format!(
            "pg_command_long_stream needs at least {} commands",
            2 * LONG_WINDOW
        )
        .into());
    }
    let (store, schema) = bench.fresh().await?;
    let repo =
        eventfold_core::Repository::<Account>::new(store.clone()).snapshot_every(SNAPSHOT_EVERY);
    let (mut first, mut last) = (Duration::ZERO, Duration::ZERO);
    for n in 0..commands {
        let started = Instant::now();
        repo.execute("acc-long", n as u64).await?;
        let elapsed = started.elapsed();
        if n < LONG_WINDOW {
            first += elapsed;
        }
        if n >= commands - LONG_WINDOW {
            last += elapsed;
        }
    }
    let (account, version) = repo.load("acc-long").await?;
    assert_eq!(version, commands as u64);
    assert_eq!(account.balance, (0..commands as u64).sum::<u64>());
    let rate = |elapsed: Duration| LONG_WINDOW as f64 / elapsed.as_secs_f64();
    let (last, first) = (rate(last), rate(first));
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((last, first))
}

/// Events per `publish_batch` (and per raw insert) in `pg_bus_durable`: one aggregate's.
const BUS_BATCH: usize = 100;
/// The aggregates `pg_bus_durable` spreads its batches over, in turn.
const BUS_AGGREGATES: usize = 1_000;

/// What the durable subscription of `pg_bus_durable` counts.
#[derive(Default)]
struct Tally {
    events: std::sync::atomic::AtomicU64,
    amount: std::sync::atomic::AtomicU64,
}

impl Tally {
    fn count(&self, event: &AccountEvent) {
        use std::sync::atomic::Ordering::Relaxed;
        let AccountEvent::Deposited { amount, .. } = event;
        self.amount.fetch_add(*amount, Relaxed);
        self.events.fetch_add(1, Relaxed);
    }
}

async fn bus_durable(bench: &mut Bench, events: usize) -> Res<(f64, f64)> {
    use eventfold_core::{DomainEvent, SubscriptionStore};
    use std::sync::atomic::Ordering::Relaxed;
    if events == 0 || !events.is_multiple_of(BUS_BATCH) {
        return Err(
            format!("pg_bus_durable needs a positive multiple of {BUS_BATCH} events").into(),
        );
    }
    let batches = events / BUS_BATCH;
    let ids: Vec<String> = (0..BUS_AGGREGATES).map(|a| format!("acc-{a}")).collect();
    let (store, schema) = bench.fresh().await?;
    let bus = eventfold_core::EventBus::builder()
        .store(store.clone())
        .build()?;
    let tally = Arc::new(Tally::default());
    let seen = Arc::clone(&tally);
    bus.subscribe("tally", move |d: eventfold_core::Delivery<AccountEvent>| {
        seen.count(d.event());
        std::future::ready(Ok::<_, std::convert::Infallible>(()))
    })
    .register()?;
    bus.start().await?;
    let started = Instant::now();
    for batch in 0..batches {
        let id = &ids[batch % ids.len()];
        bus.publish_batch(
            (0..BUS_BATCH as u64).map(|n| eventfold_core::Outgoing::new(deposit(n)).to(id.clone())),
        )
        .await?;
    }
    bus.wait_idle().await?;
    bus.stop().await?;
    let elapsed = started.elapsed();
    let ours = events as f64 / elapsed.as_secs_f64();
    bench.record_writer(&store, elapsed);
    assert_eq!(tally.events.load(Relaxed), events as u64);
    assert_eq!(
        tally.amount.load(Relaxed),
        batches as u64 * (0..BUS_BATCH as u64).sum::<u64>()
    );
    assert_eq!(store.load_checkpoint("tally").await?, Some(events as u64));

    // The same rows, the raw way: one payload (the deposits differ only in amount).
    let sample = deposit(7);
    let payload = sample.to_payload()?;
    let statement = bench
        .raw
        .prepare(&INSERT_RAW.replace("{s}", &schema))
        .await?;
    let started = Instant::now();
    for batch in 0..batches {
        let raw = RawBatch {
            stream: &ids[batch % ids.len()],
            position: 1 + (batch * BUS_BATCH) as i64,
            version: 1 + (batch / ids.len() * BUS_BATCH) as i64,
            count: BUS_BATCH,
            event_type: sample.event_type(),
            payload: &payload,
        };
        raw_insert(&bench.raw, &statement, &raw).await?;
    }
    let raw = events as f64 / started.elapsed().as_secs_f64();
    store.close().await?;
    bench.drop_schema(&schema).await?;
    Ok((ours, raw))
}

/// One PostgreSQL row of the report.
pub struct Scenario {
    pub name: &'static str,
    /// What both columns count per second.
    pub unit: &'static str,
    /// The least ratio store / raw the issue asks for.
    pub goal: f64,
    /// What the raw column measures.
    pub baseline: &'static str,
}

/// The PostgreSQL rows, in the order the report runs them.
pub const SCENARIOS: [Scenario; 6] = [
    Scenario {
        name: "pg_append_batch",
        unit: "events/s",
        goal: 0.8,
        baseline: "UNNEST inserts of the same rows, 100 per transaction, one connection",
    },
    Scenario {
        name: "pg_append_concurrent",
        unit: "events/s",
        goal: 4.0,
        baseline: "one-event transactions on one connection (the store: 8 tasks, one event \
                   per append)",
    },
    Scenario {
        name: "pg_rehydrate",
        unit: "events/s",
        goal: 0.8,
        baseline: "a SELECT of the stream and the same serde fold",
    },
    Scenario {
        name: "pg_command_many",
        unit: "commands/s",
        goal: 2.0,
        baseline: "a hand-written handler from 8 tasks, one connection each: load and fold, \
                   insert at the next version (two round trips per command)",
    },
    Scenario {
        name: "pg_command_long_stream",
        unit: "commands/s",
        goal: 0.8,
        baseline: "the first 500 commands of the same run (eventfold column: the last 500 of \
                   5,000 on one snapshotted aggregate)",
    },
    Scenario {
        name: "pg_bus_durable",
        unit: "events/s",
        goal: 0.7,
        baseline: "the batched raw UNNEST append of the same rows alone (the store: published \
                   by publish_batch of 100 and handled by one durable subscription)",
    },
];

/// How much each scenario does.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub batch_events: usize,
    pub concurrent_events: usize,
    pub rehydrate_events: usize,
    /// A multiple of the 1,000 accounts.
    pub many_commands: usize,
    /// At least twice the 500 commands of a window.
    pub long_commands: usize,
    /// A multiple of the 100 events of a batch.
    pub bus_events: usize,
}

/// The counts of the full report.
pub const FULL: Counts = Counts {
    batch_events: 20_000,
    concurrent_events: 2_000,
    rehydrate_events: 10_000,
    many_commands: 8_000,
    long_commands: 5_000,
    bus_events: 100_000,
};

/// The counts of `--quick`.
pub const QUICK: Counts = Counts {
    batch_events: 5_000,
    concurrent_events: 800,
    rehydrate_events: 5_000,
    many_commands: 2_000,
    long_commands: 1_000,
    bus_events: 20_000,
};

/// The medians of one scenario's repeats (each run's store and raw sides back to back).
#[derive(Debug, Clone)]
pub struct Measured {
    pub store: f64,
    pub raw: f64,
    /// The median of the runs' ratios.
    pub ratio: f64,
    /// What else the scenario measured, if anything.
    pub note: Option<String>,
}

impl Bench {
    /// Connects the raw session; each run opens a store in a schema of its own under it.
    pub async fn connect(url: &str, notify: bool) -> Res<Bench> {
        let (raw, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(connection);
        Ok(Bench {
            url: url.to_owned(),
            schema: format!("ef_perf_{}", std::process::id()),
            raw,
            round: 0,
            notify,
            appends_per_call: Vec::new(),
            call_share: Vec::new(),
        })
    }

    /// The server's version, for the report's header.
    pub async fn server_version(&self) -> Res<String> {
        Ok(self.raw.query_one("SHOW server_version", &[]).await?.get(0))
    }

    /// Runs the scenario `name` `repeats` times.
    pub async fn measure(&mut self, name: &str, counts: Counts, repeats: usize) -> Res<Measured> {
        let (mut ours, mut raws, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        self.appends_per_call.clear();
        self.call_share.clear();
        for _ in 0..repeats.max(1) {
            let (o, r) = match name {
                "pg_append_batch" => append_batch(self, counts.batch_events).await?,
                "pg_append_concurrent" => append_concurrent(self, counts.concurrent_events).await?,
                "pg_rehydrate" => rehydrate(self, counts.rehydrate_events).await?,
                "pg_command_many" => command_many(self, counts.many_commands).await?,
                "pg_command_long_stream" => command_long_stream(self, counts.long_commands).await?,
                "pg_bus_durable" => bus_durable(self, counts.bus_events).await?,
                other => return Err(format!("unknown scenario {other}").into()),
            };
            ours.push(o);
            raws.push(r);
            ratios.push(o / r);
        }
        let note = match name {
            "pg_append_concurrent" | "pg_command_many" | "pg_bus_durable" => Some(format!(
                "{:.1} appends per call, {:.0}% of the time in calls (medians)",
                median(&mut self.appends_per_call),
                100.0 * median(&mut self.call_share)
            )),
            "pg_command_long_stream" => Some(format!(
                "store = last {LONG_WINDOW} commands, raw = first {LONG_WINDOW}"
            )),
            _ => None,
        };
        Ok(Measured {
            store: median(&mut ours),
            raw: median(&mut raws),
            ratio: median(&mut ratios),
            note,
        })
    }
}
