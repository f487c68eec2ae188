//! The hot paths of the facade, for developers: append, load (replay), dispatch.
//!
//! ```sh
//! cargo bench --bench hot_paths                 # about a minute
//! cargo bench --bench hot_paths -- dispatch     # one group
//! cargo bench --bench hot_paths -- routing_hash # the bus's hash: FNV-1a against foldhash
//! ```
//!
//! SQLite runs with `synchronous = NORMAL` here (in WAL mode: no disk sync per commit), so
//! the numbers show eventfold's own code path rather than the disk; the durable
//! (`FULL`) numbers, next to raw baselines, are in `cargo run --release --example perf_report`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use eventfold::prelude::*;
use eventfold::{
    Delivery, EventBus, NewEvent, Outgoing, SqliteEventStore, SqliteOptions, Synchronous,
};
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Deposited {
        amount: u64,
        currency: String,
        memo: String,
    },
}

fn deposit(amount: u64) -> AccountEvent {
    AccountEvent::Deposited {
        amount,
        currency: "EUR".to_owned(),
        memo: "bench deposit".to_owned(),
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
}

#[derive(Debug, Clone)]
struct Deposit(u64);

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = Deposit;
    type Error = Infallible;

    fn apply(&mut self, event: &AccountEvent) {
        let AccountEvent::Deposited { amount, .. } = event;
        self.balance += amount;
    }

    fn handle(&self, command: Deposit) -> Result<Vec<AccountEvent>, Infallible> {
        Ok(vec![deposit(command.0)])
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn sqlite(dir: &Path) -> Arc<SqliteEventStore> {
    let options = SqliteOptions::new().synchronous(Synchronous::Normal);
    Arc::new(
        SqliteEventStore::open(dir.join("events.db"), options)
            .await
            .expect("the store opens"),
    )
}

fn new_events(count: u64) -> Vec<NewEvent> {
    (0..count)
        .map(|n| NewEvent::from_event(&deposit(n), Metadata::default()).expect("it serializes"))
        .collect()
}

fn append(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = runtime.block_on(sqlite(dir.path()));
    let repo = Repository::<Account>::new(store.clone());
    let stream = StreamId::new(Account::TYPE, "batch");

    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(100));
    group.bench_function("sqlite_100_events", |b| {
        b.iter_batched(
            || new_events(100),
            |events| {
                runtime
                    .block_on(store.append(&stream, ExpectedVersion::Any, events))
                    .expect("it appends")
            },
            BatchSize::SmallInput,
        )
    });
    group.throughput(Throughput::Elements(1));
    // A fresh aggregate per command keeps the replay short: this is the command path.
    let mut n = 0u64;
    group.bench_function("execute_one_command", |b| {
        b.iter(|| {
            n += 1;
            runtime
                .block_on(repo.execute(&format!("acc-{n}"), Deposit(n)))
                .expect("it commits")
        })
    });
    group.finish();
}

fn load(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().expect("a temp dir");
    let stores: [(&str, Arc<dyn EventStore>); 2] = [
        ("sqlite_1000_events", runtime.block_on(sqlite(dir.path()))),
        ("in_memory_1000_events", Arc::new(InMemoryEventStore::new())),
    ];
    let mut group = c.benchmark_group("load");
    group.throughput(Throughput::Elements(1_000));
    for (name, store) in stores {
        let stream = StreamId::new(Account::TYPE, "long");
        runtime
            .block_on(store.append(&stream, ExpectedVersion::NoStream, new_events(1_000)))
            .expect("it appends");
        let repo = Repository::<Account>::new(store);
        group.bench_function(name, |b| {
            b.iter(|| {
                let (_, version) = runtime.block_on(repo.load("long")).expect("it loads");
                assert_eq!(version, 1_000);
            })
        });
    }
    group.finish();
}

/// Publishes `count` events one at a time to a started bus and waits until its one
/// handler has seen them all.
async fn publish_and_drain(bus: &EventBus, seen: &AtomicU64, count: u64) {
    let before = seen.load(Ordering::Relaxed);
    for n in 0..count {
        bus.publish(Outgoing::new(deposit(n)).to(format!("acc-{}", n % 100)))
            .await
            .expect("it publishes");
    }
    bus.wait_idle().await.expect("the bus runs");
    assert_eq!(seen.load(Ordering::Relaxed) - before, count);
}

fn counting_bus(bus: &EventBus) -> Arc<AtomicU64> {
    let seen = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&seen);
    bus.subscribe("count", move |_: Delivery<AccountEvent>| {
        counter.fetch_add(1, Ordering::Relaxed);
        async { Ok::<_, Infallible>(()) }
    })
    .register()
    .expect("it subscribes");
    seen
}

fn dispatch(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("dispatch");

    group.throughput(Throughput::Elements(10_000));
    let bus = EventBus::builder().build().expect("a bus");
    let seen = counting_bus(&bus);
    runtime.block_on(bus.start()).expect("it starts");
    group.bench_function("transient_10k", |b| {
        b.iter(|| runtime.block_on(publish_and_drain(&bus, &seen, 10_000)))
    });
    runtime.block_on(bus.stop()).expect("it stops");

    // A durable bus: each event is stored, read back from the log, decoded and handled.
    group.throughput(Throughput::Elements(1_000));
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = runtime.block_on(sqlite(dir.path()));
    let bus = EventBus::builder()
        .store(store as Arc<dyn EventStore>)
        .build()
        .expect("a bus");
    let seen = counting_bus(&bus);
    runtime.block_on(bus.start()).expect("it starts");
    group.bench_function("durable_1k_in_batches_of_100", |b| {
        b.iter_custom(|iterations| {
            let started = Instant::now();
            for _ in 0..iterations {
                runtime.block_on(async {
                    let before = seen.load(Ordering::Relaxed);
                    for batch in 0..10 {
                        let id = format!("acc-{batch}");
                        bus.publish_batch((0..100).map(|n| Outgoing::new(deposit(n)).to(&id)))
                            .await
                            .expect("it publishes");
                    }
                    bus.wait_idle().await.expect("the bus runs");
                    assert_eq!(seen.load(Ordering::Relaxed) - before, 1_000);
                });
            }
            started.elapsed()
        })
    });
    runtime.block_on(bus.stop()).expect("it stops");
    group.finish();
}

/// The bus's routing hash as `event-core/src/bus/routing.rs` has it (crate-private there):
/// FNV-1a with the high half folded in.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

/// The stream hash of the bus (`BusEvent::stream_hash`) with either hasher.
fn stream_hash(mut h: impl Hasher, aggregate_type: &str, aggregate_id: &str) -> u64 {
    h.write(aggregate_type.as_bytes());
    h.write_u8(0xff);
    h.write(aggregate_id.as_bytes());
    h.finish()
}

/// The two uses of the routing hash per event: the stream hash of its aggregate, and the
/// routing table's lookup by event type; FNV-1a (what the bus uses) against foldhash.
fn routing_hash(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing_hash");
    let ids: Vec<String> = (0..1_000).map(|i| format!("acc-{i}")).collect();
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("stream_fnv", |b| {
        b.iter(|| {
            ids.iter().fold(0_u64, |acc, id| {
                acc ^ stream_hash(Fnv::default(), black_box("Account"), id)
            })
        })
    });
    let fold = foldhash::fast::FixedState::with_seed(0);
    group.bench_function("stream_foldhash", |b| {
        b.iter(|| {
            ids.iter().fold(0_u64, |acc, id| {
                acc ^ stream_hash(fold.build_hasher(), black_box("Account"), id)
            })
        })
    });

    let names: Vec<&'static str> = vec![
        "Deposited",
        "Withdrawn",
        "Opened",
        "Closed",
        "OrderPlaced",
        "OrderFilled",
        "OrderCancelled",
        "StrategyStarted",
    ];
    let lookups: Vec<&str> = (0..1_000).map(|i| names[i % names.len()]).collect();
    let fnv_table: HashMap<&str, usize, BuildHasherDefault<Fnv>> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let fold_table: HashMap<&str, usize, foldhash::fast::FixedState> =
        names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    group.bench_function("route_fnv", |b| {
        b.iter(|| {
            lookups
                .iter()
                .map(|n| fnv_table[black_box(n)])
                .sum::<usize>()
        })
    });
    group.bench_function("route_foldhash", |b| {
        b.iter(|| {
            lookups
                .iter()
                .map(|n| fold_table[black_box(n)])
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group! {
    name = hot_paths;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = append, load, dispatch, routing_hash
}
criterion_main!(hot_paths);
