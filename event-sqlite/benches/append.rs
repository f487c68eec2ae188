//! Appends and reads of the SQLite store, each next to a raw rusqlite loop on the same
//! schema and settings (WAL, `synchronous = FULL`, the same page cache):
//!
//! - `batch_100`: one append of 100 events, against one raw transaction of 100 inserts;
//! - `concurrent_8x25`: 8 tasks appending one event at a time (group commit), against a raw
//!   loop of one event per transaction, 200 events each;
//! - `read_stream_10k`: reading one aggregate's 10,000 events, against a raw query.
//!
//! `cargo bench -p eventfold-sqlite`; add `-- --quick` for a short run.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use eventfold_core::{EventLog, ExpectedVersion, Metadata, NewEvent, RecordedEvent, StreamId};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use rusqlite::{Connection, params};
use tokio::runtime::Runtime;
use uuid::Uuid;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn event(n: usize) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "FundsDeposited".to_owned(),
        schema_version: 1,
        occurred_at: Utc::now(),
        metadata: Metadata::default(),
        payload: format!(r#"{{"amount":{n},"currency":"EUR","memo":"benchmark deposit"}}"#),
    }
}

fn events(count: usize) -> Vec<NewEvent> {
    (0..count).map(event).collect()
}

/// A store and a raw connection to another file with the same schema and settings.
struct Pair {
    _dir: tempfile::TempDir,
    store: Arc<SqliteEventStore>,
    raw: Connection,
}

fn pair(runtime: &Runtime) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::new();
    let store = runtime
        .block_on(SqliteEventStore::open(
            dir.path().join("store.db"),
            options.clone(),
        ))
        .unwrap();
    // The raw side gets its schema from a store opened once on its own file.
    let raw_path = dir.path().join("raw.db");
    runtime.block_on(async {
        let schema = SqliteEventStore::open(&raw_path, options).await.unwrap();
        schema.close().await.unwrap();
    });
    Pair {
        _dir: dir,
        store: Arc::new(store),
        raw: raw_connection(&raw_path),
    }
}

fn raw_connection(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.pragma_update(None, "cache_size", -16 * 1024).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn nanos(time: DateTime<Utc>) -> i64 {
    time.timestamp_nanos_opt().unwrap()
}

/// The raw baseline of one append: read the version, insert, commit.
fn raw_append(conn: &Connection, stream: &StreamId, events: &[NewEvent]) {
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let head: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap();
    let version: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(MAX(version), 0) FROM events WHERE aggregate_type = ?1 AND aggregate_id = ?2",
        )
        .unwrap()
        .query_row(params![stream.aggregate_type, stream.aggregate_id], |r| {
            r.get(0)
        })
        .unwrap();
    let recorded_at = nanos(Utc::now());
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO events (position, event_id, aggregate_type, aggregate_id, version, \
             event_type, schema_version, occurred_at, recorded_at, metadata, payload) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .unwrap();
    for (i, e) in events.iter().enumerate() {
        let i = i as i64 + 1;
        insert
            .execute(params![
                head + i,
                &e.event_id.as_bytes()[..],
                stream.aggregate_type,
                stream.aggregate_id,
                version + i,
                e.event_type,
                e.schema_version,
                nanos(e.occurred_at),
                recorded_at,
                Option::<String>::None,
                e.payload,
            ])
            .unwrap();
    }
    drop(insert);
    conn.execute_batch("COMMIT").unwrap();
}

fn batch_100(c: &mut Criterion) {
    let runtime = runtime();
    let pair = pair(&runtime);
    let stream = StreamId::new("Account", "batch");
    let mut group = c.benchmark_group("batch_100");
    group.throughput(Throughput::Elements(100));
    group.bench_function("eventfold", |b| {
        b.iter_batched(
            || events(100),
            |batch| {
                runtime
                    .block_on(pair.store.append(&stream, ExpectedVersion::Any, batch))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("raw_rusqlite", |b| {
        b.iter_batched(
            || events(100),
            |batch| raw_append(&pair.raw, &stream, &batch),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

const APPENDERS: usize = 8;
const APPENDS_EACH: usize = 25;

fn concurrent_8x25(c: &mut Criterion) {
    let runtime = runtime();
    let pair = pair(&runtime);
    let mut group = c.benchmark_group("concurrent_8x25");
    group.throughput(Throughput::Elements((APPENDERS * APPENDS_EACH) as u64));
    group.bench_function("eventfold_8_tasks", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                let started = Instant::now();
                runtime.block_on(async {
                    let tasks: Vec<_> = (0..APPENDERS)
                        .map(|t| {
                            let store = Arc::clone(&pair.store);
                            tokio::spawn(async move {
                                let stream = StreamId::new("Account", format!("task-{t}"));
                                for n in 0..APPENDS_EACH {
                                    store
                                        .append(&stream, ExpectedVersion::Any, vec![event(n)])
                                        .await
                                        .unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                });
                total += started.elapsed();
            }
            total
        })
    });
    group.bench_function("raw_one_per_transaction", |b| {
        b.iter(|| {
            for t in 0..APPENDERS {
                let stream = StreamId::new("Account", format!("task-{t}"));
                for n in 0..APPENDS_EACH {
                    raw_append(&pair.raw, &stream, &[event(n)]);
                }
            }
        })
    });
    group.finish();
}

fn read_stream_10k(c: &mut Criterion) {
    let runtime = runtime();
    let pair = pair(&runtime);
    let stream = StreamId::new("Account", "long");
    for _ in 0..10 {
        let batch = events(1_000);
        raw_append(&pair.raw, &stream, &batch);
        runtime
            .block_on(pair.store.append(&stream, ExpectedVersion::Any, batch))
            .unwrap();
    }
    let mut group = c.benchmark_group("read_stream_10k");
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("eventfold", |b| {
        b.iter(|| {
            let events = runtime
                .block_on(pair.store.read_stream(&stream, 1))
                .unwrap();
            assert_eq!(events.len(), 10_000);
            events
        })
    });
    group.bench_function("raw_rusqlite", |b| {
        b.iter(|| {
            let mut stmt = pair
                .raw
                .prepare_cached(
                    "SELECT position, event_id, aggregate_type, aggregate_id, version, \
                     event_type, schema_version, occurred_at, recorded_at, metadata, payload \
                     FROM events WHERE aggregate_type = ?1 AND aggregate_id = ?2 \
                     AND version >= ?3 ORDER BY version",
                )
                .unwrap();
            let events: Vec<RecordedEvent> = stmt
                .query_map(
                    params![stream.aggregate_type, stream.aggregate_id, 1],
                    |r| {
                        let id: Vec<u8> = r.get(1)?;
                        Ok(RecordedEvent {
                            event_id: Uuid::from_slice(&id).unwrap(),
                            aggregate_type: r.get(2)?,
                            aggregate_id: r.get(3)?,
                            version: r.get::<_, i64>(4)? as u64,
                            position: r.get::<_, i64>(0)? as u64,
                            event_type: r.get(5)?,
                            schema_version: r.get(6)?,
                            occurred_at: DateTime::from_timestamp_nanos(r.get(7)?),
                            recorded_at: DateTime::from_timestamp_nanos(r.get(8)?),
                            metadata: Metadata::default(),
                            payload: r.get(10)?,
                        })
                    },
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(events.len(), 10_000);
            events
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = batch_100, concurrent_8x25, read_stream_10k
}
criterion_main!(benches);
