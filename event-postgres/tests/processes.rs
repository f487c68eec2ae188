//! Eight processes (this test binary, run again as children) append to shared and to
//! their own streams of one schema while a ninth tails the log: no version is missing or
//! doubled, and the reader never sees a position out of order or a gap filled later (the
//! non-interleaving check).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use eventfold_core::{Error, EventLog, ExpectedVersion, Metadata, NewEvent, StreamId};
use eventfold_postgres::{PostgresEventStore, PostgresOptions};
use uuid::Uuid;

const WRITERS: usize = 8;
const ROUNDS: usize = 30;
const SHARED: usize = 3;
/// Two events per append, one append per round and writer.
const TOTAL: u64 = (WRITERS * ROUNDS * 2) as u64;
const TEST: &str = "eight_processes_append_while_a_ninth_tails_the_log";

fn event(n: usize) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: "Counted".to_owned(),
        schema_version: 1,
        occurred_at: Utc::now(),
        metadata: Metadata::new(),
        payload: format!(r#"{{"n":{n}}}"#),
    }
}

async fn child_store(schema: &str) -> PostgresEventStore {
    PostgresEventStore::open(
        PostgresOptions::new(common::url())
            .schema(schema)
            .pool_size(2),
    )
    .await
    .expect("the child's store opens")
}

/// A writer process: every other round an append to a shared stream at the version it
/// read (again after a conflict), otherwise to its own stream.
async fn writer(schema: &str, index: usize) {
    let store = child_store(schema).await;
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            let stream = StreamId::new("Shared", format!("s{}", (index + round) % SHARED));
            loop {
                let version = store.stream_version(&stream).await.unwrap();
                let events = vec![event(round), event(round)];
                match store
                    .append(&stream, ExpectedVersion::Exact(version), events)
                    .await
                {
                    Ok(out) => {
                        assert_eq!(out.version, version + 2);
                        break;
                    }
                    Err(Error::VersionConflict { actual, .. }) => assert!(actual > version),
                    Err(e) => panic!("writer {index}: {e}"),
                }
            }
        } else {
            let stream = StreamId::new("Own", format!("w{index}"));
            store
                .append(
                    &stream,
                    ExpectedVersion::Any,
                    vec![event(round), event(round)],
                )
                .await
                .unwrap();
        }
    }
    store.close().await.unwrap();
}

/// The reader process: tails the log until it has every event, checking that each page
/// continues exactly where the last one ended and each stream's versions follow.
async fn reader(schema: &str) {
    let store = child_store(schema).await;
    let mut head = store.watch_head();
    let mut next = 1;
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    while next <= TOTAL {
        let page = store.read_all(next, 100).await.unwrap();
        for e in &page {
            assert_eq!(e.position, next, "the log has a gap or runs backwards");
            let last = versions.entry(format!("{}", e.stream_id())).or_default();
            assert_eq!(
                e.version,
                *last + 1,
                "versions of {} in log order",
                e.stream_id()
            );
            *last = e.version;
            next += 1;
        }
        if page.is_empty() {
            // Woken by the other processes' NOTIFY (or the poll).
            tokio::time::timeout(Duration::from_secs(60), head.changed())
                .await
                .expect("the writers go on")
                .unwrap();
        }
    }
    println!("READER SAW {}", next - 1);
    store.close().await.unwrap();
}

fn spawn(schema: &str, role: &str) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("EVENTFOLD_PG_CHILD", role)
        .env("EVENTFOLD_PG_CHILD_SCHEMA", schema)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("a child process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_processes_append_while_a_ninth_tails_the_log() {
    if let Ok(role) = std::env::var("EVENTFOLD_PG_CHILD") {
        let schema = std::env::var("EVENTFOLD_PG_CHILD_SCHEMA").unwrap();
        match role.strip_prefix("writer-") {
            Some(index) => writer(&schema, index.parse().unwrap()).await,
            None => reader(&schema).await,
        }
        return;
    }
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    // Created before the children start, so they race on appends, not on the migration.
    schema.open().await.close().await.unwrap();
    let reader = spawn(&schema.name, "reader");
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| spawn(&schema.name, &format!("writer-{i}")))
        .collect();
    for (i, child) in writers.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "writer {i} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = reader.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains(&format!("READER SAW {TOTAL}")),
        "the reader failed:\n{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let store = schema.open().await;
    let log = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        (1..=TOTAL).collect::<Vec<_>>()
    );
    let ids: HashSet<Uuid> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len() as u64, TOTAL, "no event stored twice");
    let mut per_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in &log {
        per_stream
            .entry(e.stream_id().to_string())
            .or_default()
            .push(e.version);
    }
    for (stream, versions) in &per_stream {
        let n = versions.len() as u64;
        assert_eq!(versions, &(1..=n).collect::<Vec<_>>(), "{stream}");
    }
    let shared: u64 = per_stream
        .iter()
        .filter(|(s, _)| s.starts_with("Shared/"))
        .map(|(_, v)| v.len() as u64)
        .sum();
    assert_eq!(
        shared,
        (WRITERS * ROUNDS) as u64,
        "one winner per shared append"
    );
}
