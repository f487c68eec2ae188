//! Damage is detected, not returned: rows edited behind the store's back, bytes that are
//! not UTF-8, bits flipped in the file itself, and a database of schema version 1. Every
//! read API fails with `Error::CorruptEvent` naming the row, and `verify()` lists exactly
//! the damaged rows.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use eventfold_core::{
    Error, EventLog, ExpectedVersion, RecordedEvent, Repository, SnapshotStore, StreamId,
    SubscriptionStore,
};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use rusqlite::params;
use tempfile::TempDir;
use uuid::Uuid;

async fn open(dir: &TempDir) -> (SqliteEventStore, PathBuf) {
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .expect("the store opens");
    (store, path)
}

#[derive(Debug, Default)]
struct Meter {
    units: u64,
}

impl eventfold_core::Aggregate for Meter {
    const TYPE: &'static str = "Meter";
    type Event = MeterEvent;
    type Command = ();
    type Error = std::convert::Infallible;

    fn apply(&mut self, event: &MeterEvent) {
        if let MeterEvent::Read { units } = event {
            self.units += units;
        }
    }

    fn handle(&self, (): ()) -> Result<Vec<MeterEvent>, Self::Error> {
        Ok(Vec::new())
    }
}

/// Fails unless `result` is a `CorruptEvent` at `position` (and of `event_id` when given);
/// returns its reason.
#[track_caller]
fn corrupt_at<T: std::fmt::Debug>(
    result: Result<T, Error>,
    position: u64,
    event_id: Option<Uuid>,
) -> String {
    match result {
        Err(Error::CorruptEvent {
            event_id: id,
            position: at,
            reason,
        }) => {
            assert_eq!(at, Some(position), "{reason}");
            if event_id.is_some() {
                assert_eq!(id, event_id, "{reason}");
            }
            reason
        }
        other => panic!("expected a corrupt event at position {position}, got {other:?}"),
    }
}

/// Five streams of three readings each: positions 1 to 15, stream `s{k}` at 3k+1..=3k+3.
async fn five_streams(store: &SqliteEventStore) -> Vec<RecordedEvent> {
    for k in 0..5 {
        for units in 1..=3 {
            store
                .append(
                    &meter(&format!("s{k}")),
                    ExpectedVersion::Any,
                    vec![reading(units)],
                )
                .await
                .unwrap();
        }
    }
    store.read_all(1, 100).await.unwrap()
}

/// Whether the field damaged in stream `s{k}` of the bit-flip test is one a replay hands
/// out: the payload (s0) and the version (s3); not the metadata, the id or the time.
fn handed_out_by_replay(k: usize) -> bool {
    matches!(k, 0 | 3)
}

fn flip_bit(value: i64, bit: u32) -> i64 {
    value ^ (1 << bit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_store_verifies_clean() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    let empty = store.verify().await.unwrap();
    assert!(empty.is_clean(), "{empty:?}");
    assert_eq!(empty.events, 0);
    five_streams(&store).await;
    store
        .append(&meter("big"), ExpectedVersion::Any, vec![note(10_000)])
        .await
        .unwrap();
    let report = store.verify().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.events, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_its_progress_from_none_to_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(&dir).await;
    let events = 10_000;
    for chunk in 0..10 {
        let batch = (0..events / 10).map(|_| note(10)).collect();
        store
            .append(&meter(&format!("m-{chunk}")), ExpectedVersion::Any, batch)
            .await
            .unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let report = store
        .verify_with_progress({
            let seen = Arc::clone(&seen);
            move |p| seen.lock().unwrap().push((p.done, p.total))
        })
        .await
        .unwrap();
    assert!(report.is_clean(), "{report:?}");
    let seen = seen.lock().unwrap().clone();
    // From none, every 4,096 rows, to all of them.
    assert_eq!(
        seen,
        [
            (0, events),
            (4_096, events),
            (8_192, events),
            (events, events)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_in_a_row_is_a_corrupt_event_on_every_read_path_and_in_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    let before = five_streams(&store).await;
    let repo = Repository::<Meter>::new(Arc::new(store.clone()));
    assert_eq!(repo.load("s0").await.unwrap().0.units, 6);

    // One bit flipped in the second event of each stream, each in another field.
    let raw = raw(&path);
    raw.execute_batch(
        r#"UPDATE events SET payload = replace(payload, '"units":2', '"units":3') WHERE position = 2;
           UPDATE events SET metadata = replace(metadata, 'test', 'tesu') WHERE position = 5;"#,
    )
    .unwrap();
    let mut flipped_id = *before[7].event_id.as_bytes();
    flipped_id[9] ^= 0x04;
    raw.execute(
        "UPDATE events SET event_id = ?1 WHERE position = 8",
        [&flipped_id[..]],
    )
    .unwrap();
    raw.execute(
        "UPDATE events SET version = ?1 WHERE position = 11",
        [flip_bit(2, 4)],
    )
    .unwrap();
    let recorded_at: i64 = raw
        .query_row(
            "SELECT recorded_at FROM events WHERE position = 14",
            [],
            |r| r.get(0),
        )
        .unwrap();
    raw.execute(
        "UPDATE events SET recorded_at = ?1 WHERE position = 14",
        [flip_bit(recorded_at, 0)],
    )
    .unwrap();
    drop(raw);
    let flipped_id = Uuid::from_bytes(flipped_id);
    let damaged = [
        (2, before[1].event_id),
        (5, before[4].event_id),
        (8, flipped_id),
        (11, before[10].event_id),
        (14, before[13].event_id),
    ];

    for (k, &(position, event_id)) in damaged.iter().enumerate() {
        let stream = meter(&format!("s{k}"));
        let reason = corrupt_at(
            store.read_stream(&stream, 1).await,
            position,
            Some(event_id),
        );
        assert!(reason.contains("checksum"), "{reason}");
        // A replay hands out the version, event type, schema version and payload, and
        // checks those (the core half of the checksum): damage there fails it; damage in
        // a field it never reads leaves the state it rebuilds exact.
        let replayed = repo.load(&format!("s{k}")).await;
        if handed_out_by_replay(k) {
            corrupt_at(replayed, position, Some(event_id));
        } else {
            let (meter_state, version) = replayed.unwrap();
            assert_eq!((meter_state.units, version), (6, 3));
        }
        corrupt_at(store.read_all(position, 1).await, position, Some(event_id));
        corrupt_at(
            store.read_all(position - 1, 10).await,
            position,
            Some(event_id),
        );
        corrupt_at(store.get(event_id).await, position, Some(event_id));
        // The rows around it read back as they were stored.
        assert_eq!(
            store.read_all(position + 1, 1).await.unwrap(),
            [before[position as usize].clone()]
        );
        assert_eq!(
            store
                .get(before[position as usize - 2].event_id)
                .await
                .unwrap(),
            Some(before[position as usize - 2].clone())
        );
    }
    // The event id as it was stored is gone, not handed out under another id.
    assert_eq!(store.get(before[7].event_id).await.unwrap(), None);

    let report = store.verify().await.unwrap();
    let listed: Vec<(Option<u64>, Option<Uuid>)> = report
        .damaged
        .iter()
        .map(|d| (d.position, d.event_id))
        .collect();
    let expected: Vec<(Option<u64>, Option<Uuid>)> =
        damaged.iter().map(|&(p, id)| (Some(p), Some(id))).collect();
    assert_eq!(listed, expected, "{report:?}");
    for damaged in &report.damaged {
        assert_eq!(damaged.problems, ["its checksum does not match its fields"]);
    }
    // The version flipped 2 -> 18 breaks stream s3's numbering too; the file is sound.
    assert_eq!(
        report.gaps,
        ["stream Meter/s3 has version 3 where version 2 belongs"],
        "{report:?}"
    );
    assert!(report.integrity.is_empty(), "{report:?}");
    assert_eq!(report.events, 15);
    assert!(!report.is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_is_not_utf8_is_a_corrupt_event_not_a_repaired_string() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    let before = five_streams(&store).await;
    // Stored as TEXT (a STRICT table takes nothing else), with bytes that are not UTF-8.
    raw(&path)
        .execute_batch(
            r#"UPDATE events SET payload = CAST(X'7B22756E697473223AFF7D' AS TEXT) WHERE position = 2;
               UPDATE events SET metadata = CAST(X'7B226279223A2274C3' AS TEXT) WHERE position = 5;
               UPDATE events SET event_type = CAST(X'4D65746572C0' AS TEXT) WHERE position = 8;
               UPDATE events SET aggregate_id = CAST(X'7333FE' AS TEXT) WHERE position = 11;
               UPDATE events SET aggregate_type = CAST(X'4D65FF' AS TEXT) WHERE position = 14;"#,
        )
        .unwrap();
    let damaged = [
        (2, "payload"),
        (5, "metadata"),
        (8, "event type"),
        (11, "aggregate id"),
        (14, "aggregate type"),
    ];
    for &(position, what) in &damaged {
        let id = before[position as usize - 1].event_id;
        let reason = corrupt_at(store.read_all(position, 1).await, position, Some(id));
        assert!(
            reason.contains(&format!("its {what} is not UTF-8")),
            "{reason}"
        );
        corrupt_at(store.get(id).await, position, Some(id));
    }
    // The streams whose rows are still found by their stream.
    let repo = Repository::<Meter>::new(Arc::new(store.clone()));
    for (k, &(position, _)) in damaged.iter().enumerate().take(3) {
        let stream = meter(&format!("s{k}"));
        let id = Some(before[position as usize - 1].event_id);
        corrupt_at(store.read_stream(&stream, 1).await, position, id);
        let replayed = repo.load(&format!("s{k}")).await;
        if k == 1 {
            // The metadata, which a replay never reads.
            assert_eq!(replayed.unwrap().0.units, 6);
        } else {
            corrupt_at(replayed, position, id);
        }
    }

    let report = store.verify().await.unwrap();
    let positions: Vec<Option<u64>> = report.damaged.iter().map(|d| d.position).collect();
    assert_eq!(
        positions,
        [Some(2), Some(5), Some(8), Some(11), Some(14)],
        "{report:?}"
    );
    for (damaged, (_, what)) in report.damaged.iter().zip(damaged) {
        assert!(
            damaged
                .problems
                .iter()
                .any(|p| p.contains(&format!("its {what} is not UTF-8"))),
            "{damaged:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_failures_and_snapshots_that_are_not_utf8_are_corrupt_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    let events = five_streams(&store).await;
    let event = &events[0];
    store
        .add_dead_letter(eventfold_core::NewDeadLetter {
            subscription: "mailer".into(),
            event_id: event.event_id,
            position: event.position,
            event_type: event.event_type.to_string(),
            error: "smtp down".into(),
            attempts: 3,
            first_failed_at: chrono::Utc::now(),
            last_failed_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    store
        .record_failure(
            eventfold_core::FailureRecord {
                subscription: "mailer".into(),
                event_id: event.event_id,
                position: event.position,
                attempt: 1,
                error: "smtp down".into(),
                duration_micros: 5,
                failed_at: chrono::Utc::now(),
            },
            eventfold_core::DEFAULT_FAILURE_RETENTION,
        )
        .await
        .unwrap();
    let stream = StreamId::new("Meter", "s0");
    store
        .save_snapshot(eventfold_core::Snapshot {
            aggregate_type: "Meter".into(),
            aggregate_id: "s0".into(),
            version: 3,
            schema_version: 1,
            state: r#"{"units":6}"#.into(),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    raw(&path)
        .execute_batch(
            "UPDATE dead_letters SET error = CAST(X'736D7470FF' AS TEXT);
             UPDATE failures SET error = CAST(X'736D7470FF' AS TEXT);
             UPDATE snapshots SET state = CAST(X'7BFF7D' AS TEXT);",
        )
        .unwrap();
    for result in [
        store.dead_letters(None).await.map(drop),
        store.failures("mailer", 10).await.map(drop),
        store.load_snapshot(&stream).await.map(drop),
    ] {
        let error = result.unwrap_err();
        assert_eq!(
            error.store_kind(),
            Some(eventfold_core::StoreErrorKind::Corrupt)
        );
        assert!(error.to_string().contains("not UTF-8"), "{error}");
    }
}

/// Finds `needle` in the file once, or fails.
fn find_once(bytes: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "the marker is in the file once");
    hits[0]
}

/// Closes the store and leaves the whole database in its main file.
async fn close_into_one_file(store: SqliteEventStore, path: &Path) {
    store.close().await.unwrap();
    raw(path)
        .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_in_the_file_under_a_payload_is_caught_by_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    let before = five_streams(&store).await;
    let marker = "a payload to damage on disk";
    let mut event = note(0);
    event.payload = format!(r#"{{"text":"{marker}"}}"#);
    store
        .append(&meter("n-1"), ExpectedVersion::NoStream, vec![event])
        .await
        .unwrap();
    close_into_one_file(store, &path).await;

    let mut bytes = std::fs::read(&path).unwrap();
    let at = find_once(&bytes, marker.as_bytes());
    bytes[at] ^= 0x01; // 'a' -> '`': still valid UTF-8, still a valid record for SQLite
    let copy = dir.path().join("copy.db");
    std::fs::write(&copy, &bytes).unwrap();

    let store = SqliteEventStore::open(&copy, SqliteOptions::new())
        .await
        .unwrap();
    let report = store.verify().await.unwrap();
    assert!(
        report.integrity.is_empty(),
        "SQLite sees nothing: {report:?}"
    );
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].position, Some(16));
    corrupt_at(store.read_all(16, 1).await, 16, None);
    corrupt_at(store.read_stream(&meter("n-1"), 1).await, 16, None);
    assert_eq!(store.read_all(1, 15).await.unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overwritten_pages_of_the_file_are_reported_by_verify_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    for k in 0..40 {
        let events = (0..10).map(|_| note(200)).collect();
        store
            .append(&meter(&format!("n-{k}")), ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    close_into_one_file(store, &path).await;
    let bytes = std::fs::read(&path).unwrap();
    let page_size = u16::from_be_bytes([bytes[16], bytes[17]]) as usize;
    let pages = bytes.len() / page_size;
    assert!(pages > 20, "the events span many pages ({pages})");

    // A few bytes over the header of every fourth page from the fifth, sixth, seventh or
    // eighth on (the first holds the schema): table, index and overflow pages alike. The
    // pages the open itself reads (the schema, the last events for the head) must stay
    // readable, and which those are moves with each table a schema version adds, so the
    // test takes the first of the four patterns the open survives; a pattern it does not
    // survive must fail as damage, never panic.
    let copy = dir.path().join("copy.db");
    let mut opened = None;
    for first in 4..8 {
        let mut damaged = bytes.clone();
        for page in (first..pages).step_by(4) {
            let at = page * page_size;
            damaged[at..at + 12]
                .copy_from_slice(b"\xde\xad\xbe\xef\xde\xad\xbe\xef\xde\xad\xbe\xef");
        }
        std::fs::write(&copy, &damaged).unwrap();
        match SqliteEventStore::open(&copy, SqliteOptions::new()).await {
            Ok(store) => {
                opened = Some(store);
                break;
            }
            Err(error) => assert_eq!(
                error.store_kind(),
                Some(eventfold_core::StoreErrorKind::Corrupt),
                "{error}"
            ),
        }
    }
    let store = opened.expect("one of the four patterns leaves the pages the open reads");
    let report = store.verify().await.unwrap();
    assert!(!report.is_clean());
    assert!(!report.integrity.is_empty(), "{report:?}");
    // Reads fail with a typed error, never a panic or made-up events.
    if let Err(error) = store.read_all(1, usize::MAX).await {
        assert_eq!(
            error.store_kind(),
            Some(eventfold_core::StoreErrorKind::Corrupt),
            "{error}"
        );
    }
}

/// The schema of version 1, as the first release created it.
const SCHEMA_V1: &str = "CREATE TABLE events (
        position       INTEGER PRIMARY KEY,
        event_id       BLOB    NOT NULL UNIQUE,
        aggregate_type TEXT    NOT NULL,
        aggregate_id   TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        event_type     TEXT    NOT NULL,
        schema_version INTEGER NOT NULL,
        occurred_at    INTEGER NOT NULL,
        recorded_at    INTEGER NOT NULL,
        metadata       TEXT,
        payload        TEXT    NOT NULL,
        UNIQUE (aggregate_type, aggregate_id, version)
    ) STRICT;
    CREATE TABLE snapshots (
        aggregate_type TEXT    NOT NULL,
        aggregate_id   TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        schema_version INTEGER NOT NULL,
        state          TEXT    NOT NULL,
        taken_at       INTEGER NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE checkpoints (
        subscription TEXT    NOT NULL PRIMARY KEY,
        position     INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE dead_letters (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription    TEXT    NOT NULL,
        event_id        BLOB    NOT NULL,
        position        INTEGER NOT NULL,
        event_type      TEXT    NOT NULL,
        error           TEXT    NOT NULL,
        attempts        INTEGER NOT NULL,
        first_failed_at INTEGER NOT NULL,
        last_failed_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX dead_letters_by_subscription ON dead_letters (subscription, id);
    CREATE TABLE failures (
        id              INTEGER PRIMARY KEY,
        subscription    TEXT    NOT NULL,
        event_id        BLOB    NOT NULL,
        position        INTEGER NOT NULL,
        attempt         INTEGER NOT NULL,
        error           TEXT    NOT NULL,
        duration_micros INTEGER NOT NULL,
        failed_at       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX failures_by_subscription ON failures (subscription, id);
    PRAGMA application_id = 0x45764664;
    PRAGMA user_version = 1;";

/// A version-1 database holding `events` (one stream each, metadata as given) and, for
/// the first event, three dead letters of "mailer" (as crashes left them) and one of
/// "audit".
fn version_1_database(path: &Path, events: &[(Uuid, &str, Option<&str>)]) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(SCHEMA_V1).unwrap();
    for (i, (id, payload, metadata)) in events.iter().enumerate() {
        let position = i as i64 + 1;
        conn.execute(
            "INSERT INTO events VALUES (?1, ?2, 'Meter', 'old', ?1, 'MeterRead', 1, ?3, ?4, ?5, ?6)",
            params![
                position,
                &id.as_bytes()[..],
                1_000 + position,
                2_000 + position,
                metadata,
                payload
            ],
        )
        .unwrap();
    }
    let id = &events[0].0.as_bytes()[..];
    for (subscription, error, attempts, first, last) in [
        ("mailer", "first crash", 3, 10, 11),
        ("mailer", "second crash", 2, 20, 21),
        ("audit", "audit down", 1, 30, 31),
        ("mailer", "third crash", 4, 40, 41),
    ] {
        conn.execute(
            "INSERT INTO dead_letters (subscription, event_id, position, event_type, error, \
             attempts, first_failed_at, last_failed_at) VALUES (?1, ?2, 1, 'MeterRead', ?3, ?4, ?5, ?6)",
            params![subscription, id, error, attempts, first, last],
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_migrates_with_checksums_for_its_events_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    version_1_database(
        &path,
        &[
            (ids[0], r#"{"units":1}"#, Some(r#"{"values":{"by":"v1"}}"#)),
            (ids[1], r#"{"units":2}"#, None),
            (ids[2], r#"{"units":3}"#, Some("{}")),
            (ids[3], r#"{"units":4}"#, None),
        ],
    );

    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let version: i64 = raw(&path)
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    // Migrated through every step: the checksums (2), the archive horizon (3) and the rest.
    assert_eq!(version, i64::from(eventfold_sqlite::SCHEMA_VERSION));
    let report = store.verify().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.events, 4);
    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        ids,
        "every event reads back"
    );
    assert_eq!(
        log[0].metadata.values.get("by").map(String::as_str),
        Some("v1")
    );
    let repo = Repository::<Meter>::new(Arc::new(store.clone()));
    let (meter_state, version) = repo.load("old").await.unwrap();
    assert_eq!((meter_state.units, version), (10, 4));

    // The dead letters of one (subscription, event) became one: the newest, with every
    // attempt counted and the first failure time kept.
    let letters = store.dead_letters(None).await.unwrap();
    let summary: Vec<(&str, &str, u32, i64, i64)> = letters
        .iter()
        .map(|d| {
            (
                d.subscription.as_str(),
                d.error.as_str(),
                d.attempts,
                d.first_failed_at.timestamp_nanos_opt().unwrap(),
                d.last_failed_at.timestamp_nanos_opt().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("audit", "audit down", 1, 30, 31),
            ("mailer", "third crash", 9, 10, 41)
        ]
    );

    // The old events are protected from now on, and the store appends after them.
    raw(&path)
        .execute(
            "UPDATE events SET payload = '{\"units\":5}' WHERE position = 3",
            [],
        )
        .unwrap();
    corrupt_at(repo.load("old").await, 3, Some(ids[2]));
    store
        .append(&meter("new"), ExpectedVersion::NoStream, vec![reading(1)])
        .await
        .unwrap();
    let report = store.verify().await.unwrap();
    assert_eq!(report.events, 5);
    assert_eq!(
        report
            .damaged
            .iter()
            .map(|d| d.position)
            .collect::<Vec<_>>(),
        [Some(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_refused_at_a_row_with_a_damaged_id_names_the_damage_not_a_wrong_id() {
    let dir = tempfile::tempdir().unwrap();
    let (store, path) = open(&dir).await;
    let mut not_units = reading(2);
    not_units.payload = r#"{"units": true}"#.to_owned();
    for event in [reading(1), not_units] {
        store
            .append(&meter("m-1"), ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    }
    let before = store.read_all(1, 10).await.unwrap();
    let mut id = *before[1].event_id.as_bytes();
    id[0] ^= 0x80;
    raw(&path)
        .execute(
            "UPDATE events SET event_id = ?1 WHERE position = 2",
            [&id[..]],
        )
        .unwrap();
    let repo = Repository::<Meter>::new(Arc::new(store.clone()));
    // The payload does not decode; the id the error would name is damaged, so the error
    // says that instead of naming an id that was never stored.
    let reason = corrupt_at(repo.load("m-1").await, 2, Some(Uuid::from_bytes(id)));
    assert!(reason.contains("checksum"), "{reason}");
}
