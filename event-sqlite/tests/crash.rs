//! Crash safety with a real process: a child appends in a loop and prints each
//! acknowledged append; the parent kills it with SIGKILL at a random moment, reopens the
//! database and checks that every acknowledged event is there, that versions and
//! positions have no gaps, and that SQLite finds the file intact. Several rounds, each
//! going on from the last.
//!
//! The child is this very test binary, run again with `--exact child_entry` and an
//! environment variable naming the database.
//!
//! SIGKILL ends the process, not the machine: it checks that nothing acknowledged lives
//! only in the process (a lost reply, a half-written group), not what survives a power loss.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use eventfold_core::{EventLog, ExpectedVersion};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use uuid::Uuid;

const CHILD_DATABASE: &str = "EVENTFOLD_SQLITE_CRASH_CHILD_DATABASE";
const APPENDERS: usize = 4;

/// The child's work; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Ok(path) = std::env::var(CHILD_DATABASE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(
            SqliteEventStore::open(&path, SqliteOptions::new())
                .await
                .unwrap(),
        );
        let appenders: Vec<_> = (0..APPENDERS)
            .map(|a| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let stream = meter(&format!("crash-{a}"));
                    // Bounded, in case the parent never kills it; a closed stdout ends it
                    // sooner (println! panics).
                    for i in 0..100_000u64 {
                        let version = store.stream_version(&stream).await.unwrap();
                        let events: Vec<_> = (0..1 + i % 3).map(reading).collect();
                        let ids: Vec<String> =
                            events.iter().map(|e| e.event_id.to_string()).collect();
                        let out = store
                            .append(&stream, ExpectedVersion::Exact(version), events)
                            .await
                            .unwrap();
                        println!(
                            "ack {} {} {} {} {}",
                            stream.aggregate_id,
                            out.version,
                            out.first_position,
                            out.last_position,
                            ids.join(",")
                        );
                    }
                })
            })
            .collect();
        for appender in appenders {
            appender.await.unwrap();
        }
    });
}

/// An acknowledged append, as the child printed it.
#[derive(Debug)]
struct Ack {
    stream: String,
    version: u64,
    first_position: u64,
    last_position: u64,
    ids: Vec<Uuid>,
}

fn parse(line: &str) -> Option<Ack> {
    let mut fields = line.strip_prefix("ack ")?.split(' ');
    let stream = fields.next()?.to_owned();
    let version = fields.next()?.parse().ok()?;
    let first_position = fields.next()?.parse().ok()?;
    let last_position = fields.next()?.parse().ok()?;
    let ids = fields
        .next()?
        .split(',')
        .map(|id| id.parse().ok())
        .collect::<Option<_>>()?;
    Some(Ack {
        stream,
        version,
        first_position,
        last_position,
        ids,
    })
}

/// A small xorshift generator: random enough to vary where the kill lands.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the child until it has acknowledged `acks` appends, then kills it.
fn run_child_and_kill(path: &std::path::Path, acks: usize) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_DATABASE, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    while acked.len() < acks {
        match received.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => acked.extend(parse(&line)),
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "the child went quiet after {} acknowledged appends",
                    acked.len()
                );
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                panic!(
                    "the child ended ({status}) after {} acknowledged appends",
                    acked.len()
                );
            }
        }
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
    drop(received);
    reader.join().unwrap();
    acked
}

/// Reopens the database and checks it against every append acknowledged so far.
async fn verify(path: &std::path::Path, acked: &[Ack]) {
    let store = SqliteEventStore::open(path, SqliteOptions::new())
        .await
        .expect("the store reopens");
    let log = store.read_all(1, usize::MAX).await.unwrap();
    let positions: Vec<u64> = log.iter().map(|e| e.position).collect();
    assert_eq!(
        positions,
        (1..=log.len() as u64).collect::<Vec<_>>(),
        "positions have a gap"
    );
    assert_eq!(store.head_position().await.unwrap(), log.len() as u64);

    let mut versions: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for event in &log {
        versions
            .entry(&event.aggregate_id)
            .or_default()
            .push(event.version);
    }
    for (stream, versions) in &versions {
        let n = versions.len() as u64;
        assert_eq!(
            versions,
            &(1..=n).collect::<Vec<_>>(),
            "stream {stream} has a version gap"
        );
    }

    let by_id: BTreeMap<Uuid, _> = log.iter().map(|e| (e.event_id, e)).collect();
    for ack in acked {
        let count = ack.ids.len() as u64;
        for (i, id) in ack.ids.iter().enumerate() {
            let event = by_id
                .get(id)
                .unwrap_or_else(|| panic!("acknowledged event {id} is lost ({ack:?})"));
            let i = i as u64;
            assert_eq!(event.aggregate_id, ack.stream);
            assert_eq!(event.position, ack.first_position + i);
            assert_eq!(event.version, ack.version - count + 1 + i);
        }
        assert_eq!(ack.last_position, ack.first_position + count - 1);
    }
    store.close().await.unwrap();

    let integrity: String = raw(path)
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut random = XorShift(seed | 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut acked = Vec::new();
    for round in 0..4 {
        let acks = 20 + (random.next() % 281) as usize;
        acked.extend(run_child_and_kill(&path, acks));
        runtime.block_on(verify(&path, &acked));
        eprintln!(
            "round {round}: killed after {acks} acknowledged appends (seed {seed}); all kept"
        );
    }
}
