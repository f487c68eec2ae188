//! A bus that only listens sees the appends of another process: a child process appends
//! 200 events to the SQLite file while this process runs nothing but a bus subscription
//! on it. Every event is delivered (the store's head watch follows the file by its
//! poll), and `wait_idle` waits for the head as the store reports it, even where the
//! head watch does not follow the other writer (polling off).
//!
//! The poll needs real time: the waits have a generous timeout as a guard against a hang,
//! and nothing asserts how long they took.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventfold::prelude::*;
use eventfold::{Delivery, EventBus, NewEvent, SqliteEventStore, SqliteOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

const CHILD: &str = "EVENTFOLD_BUS_PROCESSES_CHILD";
const EVENTS: u64 = 200;
const AGGREGATES: u64 = 7;
/// Far beyond any poll interval: only a hang reaches it.
const GUARD: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter")]
enum MeterEvent {
    Ticked {
        #[domain_event(aggregate_id)]
        meter: String,
        n: u64,
    },
}

/// The child: appends `EVENTS` events, one append each, to the database named by `CHILD`,
/// closes the store and exits. It runs no bus.
#[test]
fn child_appends() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let store = SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap();
        for n in 0..EVENTS {
            let meter = format!("m-{}", n % AGGREGATES);
            let event = NewEvent::from_event(
                &MeterEvent::Ticked {
                    meter: meter.clone(),
                    n,
                },
                Metadata::new(),
            )
            .unwrap();
            store
                .append(
                    &StreamId::new("Meter", meter),
                    ExpectedVersion::Any,
                    vec![event],
                )
                .await
                .unwrap();
        }
        store.close().await.unwrap();
    });
}

/// Runs the child on the database at `path` to its end (on a blocking thread).
async fn run_child(path: &Path) {
    let path = path.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_appends",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success(), "the child failed: {status}");
}

/// What the subscription saw: (position, aggregate, n) in delivery order, and a count.
struct Seen {
    events: Mutex<Vec<(u64, String, u64)>>,
    count: watch::Sender<u64>,
}

/// A bus on the database at `path` whose only subscription records into `Seen`.
async fn listening_bus(path: &Path) -> (Arc<SqliteEventStore>, EventBus, Arc<Seen>) {
    let store = Arc::new(
        SqliteEventStore::open(path, SqliteOptions::new())
            .await
            .unwrap(),
    );
    let bus = EventBus::builder()
        .store(store.clone())
        .workers(2)
        .build()
        .unwrap();
    let seen = Arc::new(Seen {
        events: Mutex::new(Vec::new()),
        count: watch::channel(0).0,
    });
    let recorder = Arc::clone(&seen);
    bus.subscribe("listener", move |d: Delivery<MeterEvent>| {
        let MeterEvent::Ticked { meter, n } = d.event();
        recorder
            .events
            .lock()
            .unwrap()
            .push((d.record().position, meter.clone(), *n));
        recorder.count.send_modify(|count| *count += 1);
        std::future::ready(Ok::<_, eventfold::Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    (store, bus, seen)
}

/// Every position 1..=EVENTS delivered once, and each aggregate's events in order.
fn assert_all_delivered_in_order(seen: &Seen) {
    let events = seen.events.lock().unwrap().clone();
    let mut positions: Vec<u64> = events.iter().map(|e| e.0).collect();
    positions.sort_unstable();
    assert_eq!(positions, (1..=EVENTS).collect::<Vec<_>>());
    let mut per_aggregate: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (_, meter, n) in &events {
        per_aggregate.entry(meter).or_default().push(*n);
    }
    assert_eq!(per_aggregate.len() as u64, AGGREGATES);
    for (meter, ns) in per_aggregate {
        assert!(ns.is_sorted(), "{meter} was delivered out of order: {ns:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_that_only_listens_delivers_every_event_another_process_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let (store, bus, seen) = listening_bus(&path).await;
    let mut count = seen.count.subscribe();

    run_child(&path).await;
    // No wait_idle here: the deliveries come by themselves, once the poll saw the commits.
    tokio::time::timeout(GUARD, count.wait_for(|n| *n >= EVENTS))
        .await
        .expect("every event was delivered before the guard")
        .unwrap();
    bus.wait_idle().await.unwrap();
    assert_eq!(*seen.count.borrow(), EVENTS, "no event is delivered twice");
    assert_all_delivered_in_order(&seen);
    assert_eq!(
        store.load_checkpoint("listener").await.unwrap(),
        Some(EVENTS)
    );
    bus.stop().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_waits_for_the_head_the_store_reports_after_another_process_appended() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let (store, bus, seen) = listening_bus(&path).await;

    run_child(&path).await;
    // Right after the child's last commit, this process may not have seen any of it:
    // wait_idle asks the store for its head and waits until the bus handled up to it.
    tokio::time::timeout(GUARD, bus.wait_idle())
        .await
        .expect("wait_idle returned before the guard")
        .unwrap();
    assert_eq!(*seen.count.borrow(), EVENTS);
    assert_all_delivered_in_order(&seen);
    assert_eq!(
        store.load_checkpoint("listener").await.unwrap(),
        Some(EVENTS)
    );
    bus.stop().await.unwrap();
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_idle_reads_up_to_the_stores_head_even_where_the_head_watch_does_not_follow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    // Polling off: the listener's head watch never sees the other store's appends.
    let options = SqliteOptions::new().external_change_poll(Duration::ZERO);
    let listener = Arc::new(
        SqliteEventStore::open(&path, options.clone())
            .await
            .unwrap(),
    );
    let writer = SqliteEventStore::open(&path, options).await.unwrap();
    let bus = EventBus::builder()
        .store(listener.clone())
        .workers(2)
        .build()
        .unwrap();
    let count = Arc::new(Mutex::new(0_u64));
    let counted = Arc::clone(&count);
    bus.subscribe("listener", move |_: Delivery<MeterEvent>| {
        *counted.lock().unwrap() += 1;
        std::future::ready(Ok::<_, eventfold::Error>(()))
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    for n in 0..20 {
        let event = NewEvent::from_event(
            &MeterEvent::Ticked {
                meter: "m-1".into(),
                n,
            },
            Metadata::new(),
        )
        .unwrap();
        writer
            .append(
                &StreamId::new("Meter", "m-1"),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
    }
    assert_eq!(*listener.watch_head().borrow(), 0);
    tokio::time::timeout(GUARD, bus.wait_idle())
        .await
        .expect("wait_idle returned before the guard")
        .unwrap();
    assert_eq!(*count.lock().unwrap(), 20);
    assert_eq!(
        listener.load_checkpoint("listener").await.unwrap(),
        Some(20)
    );
    bus.stop().await.unwrap();
    writer.close().await.unwrap();
    listener.close().await.unwrap();
}
