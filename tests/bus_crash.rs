//! Crash recovery of the durable bus with a real process: a child publishes events and
//! handles them with a durable subscription that records each event in a file; it is
//! killed with SIGKILL mid-run, several times. A final restart catches up, and then every
//! stored event has been handled at least once, in order per aggregate.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use eventfold::prelude::*;
use eventfold::{Delivery, EventBus, SqliteEventStore, SqliteOptions};
use serde::{Deserialize, Serialize};

const CHILD: &str = "EVENTFOLD_BUS_CRASH_CHILD";
const AGGREGATES: u64 = 7;

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Meter")]
enum MeterEvent {
    Ticked {
        #[domain_event(aggregate_id)]
        meter: String,
        n: u64,
    },
}

/// Starts a durable bus on the database in `dir` whose subscription appends
/// `event_id aggregate version` to `handled.log` for every event it handles.
async fn open_bus(dir: &Path) -> (Arc<SqliteEventStore>, EventBus) {
    let store = Arc::new(
        SqliteEventStore::open(dir.join("bus.db"), SqliteOptions::new())
            .await
            .unwrap(),
    );
    // A killed child holds the subscription's lease until it expires: short, so the next
    // run takes over soon.
    let bus = EventBus::builder()
        .store(store.clone())
        .workers(3)
        .lease_ttl(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    let log_path = dir.join("handled.log");
    bus.subscribe_blocking("recorder", move |d: Delivery<MeterEvent>| {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        // One write per line: workers append concurrently, and a line written in pieces
        // could interleave with another.
        let line = format!(
            "{} {} {}\n",
            d.record().event_id,
            d.record().aggregate_id,
            d.record().version
        );
        file.write_all(line.as_bytes())
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    (store, bus)
}

/// The child: publishes forever, printing each acknowledged position, until killed.
#[test]
fn child_process_entry() {
    let Ok(dir) = std::env::var(CHILD) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (_store, bus) = open_bus(Path::new(&dir)).await;
        let mut stdout = std::io::stdout();
        for n in 0.. {
            let event = MeterEvent::Ticked {
                meter: format!("m-{}", n % AGGREGATES),
                n,
            };
            let position = bus.publish(event).await.unwrap();
            writeln!(stdout, "ack {position}").unwrap();
            stdout.flush().unwrap();
        }
    });
}

fn seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "eventfold-bus-crash-{}-{}",
        std::process::id(),
        seed()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the child until it has acknowledged `acks` publishes, then kills it with SIGKILL.
fn run_and_kill(dir: &Path, acks: u64) -> u64 {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_process_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut last = 0;
    let mut seen = 0;
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(position) = line.strip_prefix("ack ") {
            last = position.parse().unwrap();
            seen += 1;
            if seen == acks {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(seen, acks, "the child stopped early");
    last
}

#[test]
fn a_killed_bus_catches_up_and_every_stored_event_is_handled_in_order() {
    let dir = scratch_dir();
    let mut rng = seed();
    let mut acknowledged = 0;
    for _ in 0..4 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let acks = 30 + rng % 200;
        acknowledged = acknowledged.max(run_and_kill(&dir, acks));
    }

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stored = runtime.block_on(async {
        let (store, bus) = open_bus(&dir).await;
        // The last killed child's lease expires first; this bus then takes the
        // subscription over (a condition with a guard: only a hang reaches it).
        let mut held = bus.watch_held_segments("recorder").unwrap();
        tokio::time::timeout(
            std::time::Duration::from_secs(60),
            held.wait_for(|segments| !segments.is_empty()),
        )
        .await
        .expect("never took the lease over")
        .unwrap();
        bus.wait_idle().await.unwrap();
        bus.stop().await.unwrap();
        assert!(store.dead_letters(None).await.unwrap().is_empty());
        let stored = store.read_all(1, usize::MAX).await.unwrap();
        store.close().await.unwrap();
        stored
    });
    assert!(
        stored.len() as u64 >= acknowledged,
        "acknowledged events are stored"
    );
    assert_eq!(stored.last().unwrap().position, stored.len() as u64);

    let log = std::fs::read_to_string(dir.join("handled.log")).unwrap();
    let mut handled = HashSet::new();
    let mut first_seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in log.lines() {
        // A line cut short by the kill has fewer than three fields.
        let fields: Vec<&str> = line.split(' ').collect();
        let [id, aggregate, version] = fields[..] else {
            continue;
        };
        let Ok(version) = version.parse::<u64>() else {
            continue;
        };
        if handled.insert(id.to_owned()) {
            first_seen
                .entry(aggregate.to_owned())
                .or_default()
                .push(version);
        }
    }
    for event in &stored {
        assert!(
            handled.contains(&event.event_id.to_string()),
            "stored event at position {} was never handled",
            event.position
        );
    }
    for (aggregate, versions) in first_seen {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(
            versions, expected,
            "{aggregate} was first handled out of order"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
