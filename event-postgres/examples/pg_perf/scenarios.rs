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
//! - `pg_sub_scale`: 20,000 events on 1,000 aggregates (appended first), one subscription
//!   of 16 segments whose handler waits 1 ms per event, run by 4 processes (the store
//!   column) vs 1 (the raw column) on one schema, from `go` to every segment's checkpoint
//!   at the head; the program re-runs itself as the members (goal: a speed-up >= 3).
//!   `pg_sub_scale_pool4`: the same with the wait holding one of 4 permits of a
//!   per-process pool. The SQLite report's `sub_scale` rows run the same code.
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
    /// `pg_sub_scale`'s CPU per second of the run: of the 4 processes, of the one.
    scale_cpu: (Vec<f64>, Vec<f64>),
    /// How the last 4-process run of `pg_sub_scale` split the segments.
    scale_split: String,
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
pub const SCENARIOS: [Scenario; 8] = [
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
    Scenario {
        name: "pg_sub_scale",
        unit: "events/s",
        goal: 3.0,
        baseline: "20,000 events on 1,000 aggregates (appended before), one subscription of 16 \
                   segments whose handler waits 1 ms (tokio sleep) per event, with no other \
                   limit, run by 4 processes (eventfold column) vs 1 process (raw column) on \
                   the same schema, from `go` to every segment's checkpoint at the head; \
                   ratio = speed-up",
    },
    Scenario {
        name: "pg_sub_scale_pool4",
        unit: "events/s",
        goal: 3.0,
        baseline: "as pg_sub_scale, but the handler waits its 1 ms holding one of the 4 \
                   connections of its process's pool",
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
    /// The events of `pg_sub_scale`.
    pub scale_events: usize,
}

/// The counts of the full report.
pub const FULL: Counts = Counts {
    batch_events: 20_000,
    concurrent_events: 2_000,
    rehydrate_events: 10_000,
    many_commands: 8_000,
    long_commands: 5_000,
    bus_events: 100_000,
    scale_events: 20_000,
};

/// The counts of `--quick`.
pub const QUICK: Counts = Counts {
    batch_events: 5_000,
    concurrent_events: 800,
    rehydrate_events: 5_000,
    many_commands: 2_000,
    long_commands: 1_000,
    bus_events: 20_000,
    scale_events: 20_000,
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
            scale_cpu: (Vec::new(), Vec::new()),
            scale_split: String::new(),
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
        self.scale_cpu = (Vec::new(), Vec::new());
        for _ in 0..repeats.max(1) {
            let (o, r) = match name {
                "pg_append_batch" => append_batch(self, counts.batch_events).await?,
                "pg_append_concurrent" => append_concurrent(self, counts.concurrent_events).await?,
                "pg_rehydrate" => rehydrate(self, counts.rehydrate_events).await?,
                "pg_command_many" => command_many(self, counts.many_commands).await?,
                "pg_command_long_stream" => command_long_stream(self, counts.long_commands).await?,
                "pg_bus_durable" => bus_durable(self, counts.bus_events).await?,
                "pg_sub_scale" => sub_scale(self, counts.scale_events, 0).await?,
                "pg_sub_scale_pool4" => {
                    sub_scale(self, counts.scale_events, SCALE_POOL_SIZE).await?
                }
                other => return Err(format!("unknown scenario {other}").into()),
            };
            ours.push(o);
            raws.push(r);
            ratios.push(o / r);
        }
        let note = match name {
            "pg_sub_scale" | "pg_sub_scale_pool4" => Some(format!(
                "CPU used per second of the run (medians): 1 process {:.2}, 4 processes {:.2} in \
                 all; segments held by the 4: {}",
                median(&mut self.scale_cpu.1),
                median(&mut self.scale_cpu.0),
                self.scale_split
            )),
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

// ---------------------------------------------------------------------------------------
// `sub_scale` and `pg_sub_scale`: one subscription whose handler waits 1 ms per event,
// run by 1 process and then by 4 on the same store. The program re-runs itself as the
// members (see `SCALE_MEMBER`); this part is shared by the SQLite and PostgreSQL rows.

/// Set in a member's environment: the store it opens, `sqlite:<path>` or
/// `postgres:<schema>` (on `EVENTFOLD_PG_URL`). The program then runs [`scale_member`]
/// instead of the report.
pub const SCALE_STORE: &str = "EVENTFOLD_SUB_SCALE_STORE";
/// Set in a member's environment: its member id.
pub const SCALE_MEMBER: &str = "EVENTFOLD_SUB_SCALE_MEMBER";
/// Set in a member's environment: the connections of its handler's pool, or 0 for none.
pub const SCALE_POOL: &str = "EVENTFOLD_SUB_SCALE_POOL";
/// The connections of the pool in the `_pool4` rows: a handler waits its 1 ms holding one,
/// as a projection that writes through a pool of 4 database connections does.
pub const SCALE_POOL_SIZE: usize = 4;
/// The subscription the members share.
pub const SCALE_SUBSCRIPTION: &str = "scale";
/// Its segments: 4 per member with 4 members.
pub const SCALE_SEGMENTS: u32 = 16;
/// The members' lease time unless `EVENTFOLD_SUB_SCALE_TTL_MS` says otherwise. Nobody
/// dies in this scenario; with the pre-start heartbeat (see [`scale_member`]) it only
/// bounds how long that counts, without it a member gives up segments beyond its share
/// only at its next lease round, every third of it.
pub const SCALE_LEASE_TTL: Duration = Duration::from_secs(10);
/// Set (to anything) in the report's environment: the members skip their pre-start
/// heartbeat, so the first to start takes every segment and the others get theirs by
/// rebalancing, as processes started one after another do. To measure that cost.
pub const SCALE_NO_PREJOIN: &str = "EVENTFOLD_SUB_SCALE_NO_PREJOIN";
/// Set in the report's environment: the members' lease time in milliseconds.
pub const SCALE_TTL_MS: &str = "EVENTFOLD_SUB_SCALE_TTL_MS";
/// What the handler waits per event: an I/O-bound projection.
pub const SCALE_WAIT: Duration = Duration::from_millis(1);
/// The aggregates the events are spread over.
pub const SCALE_AGGREGATES: usize = 1_000;
/// How long the parent waits for the checkpoints before it gives up.
const SCALE_DEADLINE: Duration = Duration::from_secs(600);
/// How often the parent reads the segments' checkpoints.
const SCALE_POLL: Duration = Duration::from_millis(5);

/// Appends `events` deposits spread over [`SCALE_AGGREGATES`] aggregates in turn, by
/// `publish_batch` of one event per aggregate; returns the head.
pub async fn scale_append(store: Arc<dyn eventfold_core::EventStore>, events: usize) -> Res<u64> {
    let bus = eventfold_core::EventBus::builder()
        .store(Arc::clone(&store))
        .build()?;
    let ids: Vec<String> = (0..SCALE_AGGREGATES).map(|a| format!("acc-{a}")).collect();
    let mut left = events;
    while left > 0 {
        let n = left.min(SCALE_AGGREGATES);
        bus.publish_batch(
            (0..n).map(|a| eventfold_core::Outgoing::new(deposit(a as u64)).to(ids[a].clone())),
        )
        .await?;
        left -= n;
    }
    bus.stop().await?;
    Ok(store.head_position().await?)
}

/// A member of `sub_scale`: heartbeats its membership first (so that every member sees
/// the others at its first claim and takes only its share, instead of the first one
/// taking every segment and giving them back), prints `ready`, and on `go` (a line on
/// stdin) starts a bus that runs the subscription, split into [`SCALE_SEGMENTS`]
/// segments, with a handler that waits [`SCALE_WAIT`] per event (holding one of `pool`
/// permits of a semaphore shared by the process's deliveries, if `pool > 0`). When stdin
/// closes it stops the bus and prints `handled <events>`.
pub async fn scale_member(
    store: Arc<dyn eventfold_core::EventStore>,
    member: &str,
    pool: usize,
) -> Res<()> {
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let ttl = match std::env::var(SCALE_TTL_MS) {
        Ok(ms) => Duration::from_millis(ms.parse()?),
        Err(_) => SCALE_LEASE_TTL,
    };
    if std::env::var_os(SCALE_NO_PREJOIN).is_none() {
        store.heartbeat(SCALE_SUBSCRIPTION, member, ttl).await?;
    }
    let bus = eventfold_core::EventBus::builder()
        .store(Arc::clone(&store))
        .member_id(member)
        .lease_ttl(ttl)
        .build()?;
    let handled = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&handled);
    let connections = (pool > 0).then(|| Arc::new(tokio::sync::Semaphore::new(pool)));
    bus.subscribe(
        SCALE_SUBSCRIPTION,
        move |_: eventfold_core::Delivery<AccountEvent>| {
            let count = Arc::clone(&count);
            let connections = connections.clone();
            async move {
                let _connection = match &connections {
                    Some(pool) => Some(pool.acquire().await.map_err(|e| e.to_string())?),
                    None => None,
                };
                tokio::time::sleep(SCALE_WAIT).await;
                count.fetch_add(1, Relaxed);
                Ok::<_, String>(())
            }
        },
    )
    .segments(SCALE_SEGMENTS)
    .register()?;
    // stdin is read on a thread of its own: a line is `go`, the end is `stop`.
    let (lines, mut commands) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    println!("ready");
    std::io::stdout().flush()?;
    match commands.recv().await.as_deref() {
        Some("go") => {}
        other => return Err(format!("a member expected `go`, got {other:?}").into()),
    }
    bus.start().await?;
    while commands.recv().await.is_some() {}
    bus.stop().await?;
    println!("handled {}", handled.load(Relaxed));
    std::io::stdout().flush()?;
    Ok(())
}

/// The PostgreSQL store a member's [`SCALE_STORE`] names, if it names one.
pub async fn scale_postgres_store(spec: &str) -> Option<Res<Arc<dyn eventfold_core::EventStore>>> {
    let schema = spec.strip_prefix("postgres:")?;
    let url = std::env::var("EVENTFOLD_PG_URL")
        .unwrap_or_else(|_| eventfold_postgres::DEFAULT_URL.to_owned());
    Some(
        PostgresEventStore::open(PostgresOptions::new(&url).schema(schema))
            .await
            .map(|store| Arc::new(store) as Arc<dyn eventfold_core::EventStore>)
            .map_err(Into::into),
    )
}

/// How one run of `sub_scale` went.
#[derive(Debug, Clone)]
pub struct ScaleRun {
    /// From `go` to every segment's checkpoint at the head.
    pub elapsed: Duration,
    /// Deliveries the members handled, in all (at least the events; more are
    /// redeliveries).
    pub handled: u64,
    /// The segments each member held when the checkpoints reached the head.
    pub owners: std::collections::BTreeMap<String, Vec<u32>>,
    /// The CPU time (user + system) the members had used when the checkpoints reached the
    /// head, in all (Linux only: 0 where `/proc` cannot tell).
    pub cpu: Duration,
}

/// The CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`
/// (in clock ticks of 10 ms, the kernel's `USER_HZ` on Linux); zero where unknown.
fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields of the line.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Runs `members` processes of this program as [`scale_member`]s on the store `spec`
/// (whose log the parent filled up to `head`, and which `store` is a handle of), measures
/// from `go` until every segment's checkpoint is at the head (read from the store every
/// 5 ms), then stops them and adds up what they handled.
pub async fn scale_run(
    store: &dyn eventfold_core::EventStore,
    spec: &str,
    members: usize,
    pool: usize,
    head: u64,
) -> Res<ScaleRun> {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for m in 0..members {
        let child = Command::new(&exe)
            .env(SCALE_STORE, spec)
            .env(SCALE_MEMBER, format!("member-{m}"))
            .env(SCALE_POOL, pool.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        children.push(child);
    }
    // Killed if anything below fails, so no member outlives the report.
    struct Members(Vec<std::process::Child>);
    impl Drop for Members {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let mut members = Members(children);
    let mut outputs = Vec::new();
    for child in &mut members.0 {
        let mut out = BufReader::new(child.stdout.take().ok_or("a member's stdout")?);
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "ready" {
            return Err(format!("a member said {line:?} instead of `ready`").into());
        }
        outputs.push(out);
    }
    let started = Instant::now();
    for child in &mut members.0 {
        let stdin = child.stdin.as_mut().ok_or("a member's stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
    }
    let states = loop {
        let states = store.segment_states(SCALE_SUBSCRIPTION).await?;
        if states.len() == SCALE_SEGMENTS as usize && states.iter().all(|s| s.checkpoint >= head) {
            break states;
        }
        if started.elapsed() > SCALE_DEADLINE {
            return Err(format!("the checkpoints did not reach {head}: {states:?}").into());
        }
        tokio::time::sleep(SCALE_POLL).await;
    };
    let elapsed = started.elapsed();
    let cpu = members.0.iter().map(|child| cpu_time(child.id())).sum();
    let mut owners = std::collections::BTreeMap::<String, Vec<u32>>::new();
    for state in states {
        let owner = state.owner.unwrap_or_else(|| "(none)".to_owned());
        owners.entry(owner).or_default().push(state.segment);
    }
    let mut handled = 0;
    for (child, out) in members.0.iter_mut().zip(outputs) {
        drop(child.stdin.take());
        let report = tokio::task::spawn_blocking(move || {
            let mut last = String::new();
            for line in out.lines() {
                last = line?;
            }
            Ok::<_, std::io::Error>(last)
        })
        .await??;
        let n: u64 = report
            .strip_prefix("handled ")
            .ok_or_else(|| format!("a member said {report:?} instead of `handled N`"))?
            .parse()?;
        handled += n;
        if !child.wait()?.success() {
            return Err("a member failed".into());
        }
    }
    Ok(ScaleRun {
        elapsed,
        handled,
        owners,
        cpu,
    })
}

/// `pg_sub_scale`: the 4-process run and the 1-process run, each on a fresh schema the
/// parent filled first; events/s of each (4, 1).
async fn sub_scale(bench: &mut Bench, events: usize, pool: usize) -> Res<(f64, f64)> {
    let mut rates = [0.0; 2];
    for (i, members) in [4, 1].into_iter().enumerate() {
        let (pg, schema) = bench.fresh().await?;
        let store: Arc<dyn eventfold_core::EventStore> = Arc::new(pg.clone());
        let head = scale_append(Arc::clone(&store), events).await?;
        let run = scale_run(
            store.as_ref(),
            &format!("postgres:{schema}"),
            members,
            pool,
            head,
        )
        .await?;
        if run.handled < events as u64 {
            return Err(format!("{members} members handled {} of {events}", run.handled).into());
        }
        rates[i] = events as f64 / run.elapsed.as_secs_f64();
        let cpu = run.cpu.as_secs_f64() / run.elapsed.as_secs_f64();
        let shares: Vec<String> = run
            .owners
            .iter()
            .map(|(owner, segments)| format!("{owner}: {}", segments.len()))
            .collect();
        eprintln!(
            "  {members} process(es): {:.0} events/s in {:.2} s, {} handled, CPU {:.2} s, \
             segments {}",
            rates[i],
            run.elapsed.as_secs_f64(),
            run.handled,
            run.cpu.as_secs_f64(),
            shares.join(", ")
        );
        if members == 4 {
            bench.scale_cpu.0.push(cpu);
            bench.scale_split = shares.join(", ");
        } else {
            bench.scale_cpu.1.push(cpu);
        }
        drop(store);
        pg.close().await?;
        bench.drop_schema(&schema).await?;
    }
    Ok((rates[0], rates[1]))
}
