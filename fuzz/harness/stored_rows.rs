//! The stored-rows harness, shared by the fuzz target `stored_rows` and the integration test
//! `tests/fuzz_corpus.rs` that replays the committed corpus (issue 9).
//!
//! An input decides rows of a real SQLite store file: the columns of `events` (right or
//! wrong types, text that is not UTF-8, out-of-range numbers, NULLs; with the input's
//! choice the table is even made non-STRICT first, as a damaged or hand-edited file can
//! be), a snapshot, dead letters and a checkpoint. The harness writes them with rusqlite,
//! opens the store, and reads through every read API: `read_all`, `read_stream`, `get`,
//! `stream_version`, `head_position`, `Repository::load` (replay, with and without the
//! snapshot), `load_snapshot`, `dead_letters`, `load_checkpoint` and `statistics`.
//!
//! Any outcome is fine except a panic, a hang, or an `Ok` that differs from what was
//! written. What was written is read back with plain SQL, so the check does not rest on
//! the store's own row reading.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use eventfold::prelude::*;
use eventfold::{DeadLetter, Snapshot, SqliteEventStore, SqliteOptions};
use rusqlite::types::{Value, ValueRef};
use serde::{Deserialize, Serialize};

/// The event every well-formed row holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Fuzz", name = "FuzzAdded")]
pub struct FuzzAdded {
    /// A number the tally keeps.
    pub n: i64,
}

/// Keeps every number it is given, so a load shows exactly which events it folded.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct FuzzTally {
    /// The numbers, in the order folded.
    pub seen: Vec<i64>,
}

impl Aggregate for FuzzTally {
    const TYPE: &'static str = "Fuzz";
    type Event = FuzzAdded;
    type Command = ();
    type Error = std::convert::Infallible;
    fn apply(&mut self, event: &FuzzAdded) {
        self.seen.push(event.n);
    }
    fn handle(&self, (): ()) -> Result<Vec<FuzzAdded>, Self::Error> {
        Ok(Vec::new())
    }
}

/// Reads the input, giving zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        taken.to_vec()
    }
    fn i64(&mut self) -> i64 {
        let mut b = [0_u8; 8];
        for x in &mut b {
            *x = self.byte();
        }
        i64::from_le_bytes(b)
    }
}

/// Words the fuzzer is likely to need, so that most rows get past the first check.
const WORDS: &[&str] = &[
    "Fuzz",
    "FuzzAdded",
    "a",
    "b",
    "",
    r#"{"n":1}"#,
    r#"{"n":-9223372036854775808}"#,
    r#"{"n":1.5}"#,
    "null",
    "{}",
    "[]",
    "Unknown",
    r#"{"correlation_id":"0190a4b2-0000-7000-8000-000000000000"}"#,
    r#"{"values":{"k":"v"}}"#,
    r#"{"values":{"k":1}}"#,
    r#"{"seen":[1,2]}"#,
    "sub",
];

/// One column value the input chose: SQLite's five storage classes, text as raw bytes.
#[derive(Debug, Clone)]
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl Cell {
    /// A value for a column: the `natural` one (what the store would have written) most
    /// of the time, else one of any storage class.
    fn choose(input: &mut Input<'_>, natural: Cell) -> Cell {
        match input.byte() % 10 {
            0..=3 => natural,
            4 => Cell::Null,
            5 => Cell::Integer(input.i64()),
            6 => Cell::Integer(i64::from(input.byte() as i8)),
            7 => Cell::Real(f64::from_bits(input.i64() as u64)),
            8 => {
                let len = usize::from(input.byte() % 24);
                if input.byte().is_multiple_of(2) {
                    Cell::Text(input.bytes(len))
                } else {
                    Cell::Blob(input.bytes(len))
                }
            }
            _ => Cell::Text(WORDS[usize::from(input.byte()) % WORDS.len()].into()),
        }
    }

    /// The SQL expression that stores it, for parameter `index`: text goes in as a blob
    /// cast to text, so bytes that are not UTF-8 are stored as text.
    fn placeholder(&self, index: usize) -> String {
        match self {
            Cell::Text(_) => format!("CAST(?{index} AS TEXT)"),
            _ => format!("?{index}"),
        }
    }

    fn value(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Integer(i) => Value::Integer(*i),
            Cell::Real(f) => Value::Real(*f),
            Cell::Text(b) | Cell::Blob(b) => Value::Blob(b.clone()),
        }
    }
}

/// The rows an input decides.
#[derive(Debug)]
pub struct Rows {
    loose: bool,
    /// Whether the rows get the checksums of what they hold (most inputs), so the reads
    /// get past the checksum check; the others are read as damage.
    sealed: bool,
    events: Vec<[Cell; 11]>,
    snapshot: Option<[Cell; 3]>,
    dead_letters: Vec<[Cell; 8]>,
    checkpoint: Option<Cell>,
}

const EVENT_COLUMNS: [&str; 11] = [
    "position",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "version",
    "event_type",
    "schema_version",
    "occurred_at",
    "recorded_at",
    "metadata",
    "payload",
];

impl Rows {
    /// Decodes an input into rows.
    pub fn from_input(data: &[u8]) -> Rows {
        let mut input = Input(data);
        let flags = input.byte();
        let count = usize::from(input.byte() % 9);
        let mut versions = [0_i64; 2];
        let mut events = Vec::with_capacity(count);
        for i in 0..count {
            let stream = usize::from(input.byte() % 2);
            versions[stream] += 1;
            let mut id = [0_u8; 16];
            id[0] = i as u8;
            id[6] = 0x70;
            id[8] = 0x80;
            id[15] = input.byte();
            let natural: [Cell; 11] = [
                Cell::Integer(i as i64 + 1),
                Cell::Blob(id.to_vec()),
                Cell::Text(b"Fuzz".to_vec()),
                Cell::Text(if stream == 0 {
                    b"a".to_vec()
                } else {
                    b"b".to_vec()
                }),
                Cell::Integer(versions[stream]),
                Cell::Text(b"FuzzAdded".to_vec()),
                Cell::Integer(1),
                Cell::Integer(1_760_000_000_000_000_000 + i as i64),
                Cell::Integer(1_760_000_000_000_000_000 + i as i64),
                Cell::Null,
                Cell::Text(format!(r#"{{"n":{}}}"#, input.byte() as i8).into_bytes()),
            ];
            events.push(natural.map(|cell| Cell::choose(&mut input, cell)));
        }
        let snapshot = (flags & 2 != 0).then(|| {
            [
                Cell::choose(
                    &mut input,
                    Cell::Integer(i64::from(input_peek_version(&flags))),
                ),
                Cell::choose(&mut input, Cell::Integer(1)),
                Cell::choose(&mut input, Cell::Text(br#"{"seen":[100]}"#.to_vec())),
            ]
        });
        let dead_letters = (0..usize::from(input.byte() % 3))
            .map(|i| {
                [
                    Cell::Text(b"sub".to_vec()),
                    Cell::Blob(vec![i as u8; 16]),
                    Cell::Integer(i as i64 + 1),
                    Cell::Text(b"FuzzAdded".to_vec()),
                    Cell::Text(b"it failed".to_vec()),
                    Cell::Integer(3),
                    Cell::Integer(1_760_000_000_000_000_000),
                    Cell::Integer(1_760_000_000_000_000_001),
                ]
                .map(|cell| Cell::choose(&mut input, cell))
            })
            .collect();
        let checkpoint =
            (flags & 4 != 0).then(|| Cell::choose(&mut input, Cell::Integer(i64::from(flags))));
        Rows {
            loose: flags & 1 != 0,
            sealed: flags & 8 == 0,
            events,
            snapshot,
            dead_letters,
            checkpoint,
        }
    }
}

/// The snapshot version a natural snapshot row claims, from the input's flags.
fn input_peek_version(flags: &u8) -> u8 {
    flags >> 4
}

/// Writes `rows` into the store file at `path` (created by the store beforehand), one row
/// at a time; a row SQLite refuses (a constraint, a STRICT type) is left out. This is the
/// one place that writes rows, so a checksum column can be filled here.
fn write_rows(path: &Path, rows: &Rows) -> rusqlite::Result<()> {
    let conn = rusqlite::Connection::open(path)?;
    if rows.loose {
        // What a damaged or hand-edited file can hold: the events table without STRICT,
        // so any column takes any storage class.
        conn.execute_batch(
            "PRAGMA writable_schema = ON;
             UPDATE sqlite_schema SET sql = replace(sql, ') STRICT', ')') WHERE name = 'events';
             PRAGMA writable_schema = OFF;",
        )?;
    }
    drop(conn);
    let conn = rusqlite::Connection::open(path)?;
    // One transaction: a refused row undoes only its own statement.
    conn.execute_batch("PRAGMA synchronous = OFF; BEGIN")?;
    for row in &rows.events {
        let sql = format!(
            "INSERT INTO events ({}) VALUES ({})",
            EVENT_COLUMNS.join(", "),
            row.iter()
                .enumerate()
                .map(|(i, c)| c.placeholder(i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let values: Vec<Value> = row.iter().map(Cell::value).collect();
        let _refused = conn.execute(&sql, rusqlite::params_from_iter(values));
    }
    if let Some(snapshot) = &rows.snapshot {
        let sql = format!(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, \
             state, taken_at) VALUES ('Fuzz', 'a', {}, {}, {}, 0)",
            snapshot[0].placeholder(1),
            snapshot[1].placeholder(2),
            snapshot[2].placeholder(3)
        );
        let values: Vec<Value> = snapshot.iter().map(Cell::value).collect();
        let _refused = conn.execute(&sql, rusqlite::params_from_iter(values));
    }
    for row in &rows.dead_letters {
        let sql = format!(
            "INSERT INTO dead_letters (subscription, event_id, position, event_type, error, \
             attempts, first_failed_at, last_failed_at) VALUES ({})",
            row.iter()
                .enumerate()
                .map(|(i, c)| c.placeholder(i + 1))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let values: Vec<Value> = row.iter().map(Cell::value).collect();
        let _refused = conn.execute(&sql, rusqlite::params_from_iter(values));
    }
    if let Some(position) = &rows.checkpoint {
        let sql = format!(
            "INSERT INTO checkpoints (subscription, position, updated_at) VALUES ('sub', {}, 0)",
            position.placeholder(1)
        );
        let _refused = conn.execute(&sql, [position.value()]);
    }
    conn.execute_batch("COMMIT")
}

/// A value as SQLite holds it, read back with plain SQL.
#[derive(Debug, Clone, PartialEq)]
enum Held {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl From<ValueRef<'_>> for Held {
    fn from(v: ValueRef<'_>) -> Self {
        match v {
            ValueRef::Null => Held::Null,
            ValueRef::Integer(i) => Held::Integer(i),
            ValueRef::Real(f) => Held::Real(f),
            ValueRef::Text(t) => Held::Text(t.to_vec()),
            ValueRef::Blob(b) => Held::Blob(b.to_vec()),
        }
    }
}

impl Held {
    fn integer(&self) -> Option<i64> {
        match self {
            Held::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The text, if it is text the store may hand back as it is.
    fn text(&self) -> Option<String> {
        match self {
            Held::Text(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => Some(text.to_owned()),
                Err(_) => None,
            },
            _ => None,
        }
    }
}

fn held_rows(conn: &rusqlite::Connection, sql: &str) -> Vec<Vec<Held>> {
    let mut stmt = conn.prepare(sql).expect("the harness's own query");
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).expect("the harness's own query");
    let mut out = Vec::new();
    while let Some(row) = rows.next().expect("reading what was written") {
        out.push(
            (0..columns)
                .map(|i| Held::from(row.get_ref(i).expect("a column")))
                .collect(),
        );
    }
    out
}

/// The event a held row stands for, if every field of it can be read back exactly.
fn expected_event(row: &[Held]) -> Option<RecordedEvent> {
    let time = |held: &Held| held.integer().map(chrono::DateTime::from_timestamp_nanos);
    let metadata = match &row[9] {
        Held::Null => Metadata::default(),
        Held::Text(json) => serde_json::from_slice(json).ok()?,
        _ => return None,
    };
    Some(RecordedEvent {
        position: row[0].integer()? as u64,
        event_id: match &row[1] {
            Held::Blob(bytes) => uuid::Uuid::from_slice(bytes).ok()?,
            _ => return None,
        },
        aggregate_type: row[2].text()?.into(),
        aggregate_id: row[3].text()?,
        version: row[4].integer()? as u64,
        event_type: row[5].text()?.into(),
        schema_version: u32::try_from(row[6].integer()?).ok()?,
        occurred_at: time(&row[7])?,
        recorded_at: time(&row[8])?,
        metadata,
        payload: row[10].text()?,
    })
}

/// `text` as an SQL literal (hex, so any bytes fit).
fn sql_text(text: &str) -> String {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    format!("CAST(x'{hex}' AS TEXT)")
}

/// A finding: an `Ok` that differs from what was written.
#[track_caller]
fn differs(what: &str, got: &dyn std::fmt::Debug, written: &dyn std::fmt::Debug) -> ! {
    panic!("{what}: the store returned {got:?}, but what was written is {written:?}")
}

/// What a full replay of `Fuzz/id` from `from` must give, on top of `start`, if it may
/// succeed: the rows the stream's query selects, contiguous from `from`, each a
/// `FuzzAdded` at schema version 1. `None` when the replay must fail.
fn expected_fold(
    conn: &rusqlite::Connection,
    id: &str,
    from: i64,
    mut state: FuzzTally,
    skip_first: bool,
) -> Option<(FuzzTally, u64)> {
    let rows = held_rows(
        conn,
        &format!(
            "SELECT version, event_type, schema_version, payload FROM events \
             WHERE aggregate_type = 'Fuzz' AND aggregate_id = '{id}' AND version >= {from} \
             ORDER BY version"
        ),
    );
    let mut version = from.checked_sub(1)? as u64;
    for (i, row) in rows.iter().enumerate() {
        let at = row[0].integer()? as u64;
        if i == 0 && skip_first {
            if at != from as u64 {
                return None;
            }
            version = at;
            continue;
        }
        if at != version.checked_add(1)? {
            return None;
        }
        if row[1].text()? != "FuzzAdded" || row[2].integer()? != 1 {
            return None;
        }
        let event: FuzzAdded = serde_json::from_str(&row[3].text()?).ok()?;
        state.seen.push(event.n);
        version = at;
    }
    Some((state, version))
}

/// The store's options: reading is all the same, only quicker without syncs.
fn options() -> SqliteOptions {
    SqliteOptions::new()
        .synchronous(eventfold::Synchronous::Off)
        .read_connections(1)
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
}

/// Writes the rows an input decides into a fresh store file, reads them back through
/// every read API, and panics on an `Ok` that differs from what was written.
pub fn check(data: &[u8]) {
    let rows = Rows::from_input(data);
    // A real file, in memory where the system has a tmpfs: the harness runs thousands.
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary directory");
    let path = dir.path().join("fuzz.db");
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            // The store creates the schema (every migration), then closes.
            let store = SqliteEventStore::open(&path, options())
                .await
                .expect("a fresh store opens");
            store.close().await.expect("a fresh store closes");
        });
        write_rows(&path, &rows).expect("the rows are written");
        if rows.sealed {
            eventfold::sqlite::__reseal_checksums(&path).expect("the rows are resealed");
        }
        let conn = rusqlite::Connection::open(&path).expect("the harness reads the file");
        runtime.block_on(read_back(&path, &conn));
    });
}

async fn read_back(path: &Path, conn: &rusqlite::Connection) {
    let Ok(sqlite) = SqliteEventStore::open(path, options()).await else {
        return;
    };
    let sqlite = Arc::new(sqlite);
    let store: Arc<dyn EventStore> = sqlite.clone();
    let held = held_rows(
        conn,
        &format!(
            "SELECT {} FROM events ORDER BY position",
            EVENT_COLUMNS.join(", ")
        ),
    );
    let find = |position: u64| {
        held.iter()
            .find(|row| row[0].integer().map(|p| p as u64) == Some(position))
    };
    let check_event = |what: &str, event: &RecordedEvent| {
        let Some(row) = find(event.position) else {
            differs(what, event, &"no row at this position")
        };
        match expected_event(row) {
            Some(expected) if &expected == event => {}
            other => differs(what, event, &(row, other)),
        }
    };

    // The global log, from every start the rows suggest.
    let mut starts = BTreeSet::from([0_u64, 1, u64::MAX]);
    starts.extend(
        held.iter()
            .filter_map(|row| row[0].integer())
            .map(|p| p as u64),
    );
    for &from in &starts {
        if let Ok(events) = store.read_all(from, 1_000).await {
            for event in &events {
                check_event("read_all", event);
            }
            let expected = held
                .iter()
                .filter(|row| {
                    row[0]
                        .integer()
                        .is_some_and(|p| p >= i64::try_from(from).unwrap_or(i64::MAX))
                })
                .count();
            if events.len() != expected {
                differs("read_all's count", &events.len(), &expected);
            }
        }
    }

    // Every stream a row names, and every id.
    let mut streams = BTreeSet::from([("Fuzz".to_owned(), "a".to_owned())]);
    for row in &held {
        if let (Some(t), Some(i)) = (row[2].text(), row[3].text()) {
            streams.insert((t, i));
        }
        if let Held::Blob(bytes) = &row[1]
            && let Ok(id) = uuid::Uuid::from_slice(bytes)
            && let Ok(found) = store.get(id).await
        {
            match found {
                Some(event) => check_event("get", &event),
                None => differs("get", &found, row),
            }
        }
    }
    for (aggregate_type, aggregate_id) in &streams {
        let stream = StreamId::new(aggregate_type, aggregate_id);
        if let Ok(events) = store.read_stream(&stream, 1).await {
            for event in &events {
                check_event("read_stream", event);
                if event.stream_id() != stream {
                    differs("read_stream's stream", event, &stream);
                }
            }
        }
        if let Ok(version) = store.stream_version(&stream).await {
            let top = held_rows(
                conn,
                &format!(
                    "SELECT version FROM events WHERE aggregate_type = {} \
                     AND aggregate_id = {} ORDER BY version DESC LIMIT 1",
                    sql_text(aggregate_type),
                    sql_text(aggregate_id)
                ),
            );
            let expected = match top.first() {
                None => Some(0),
                Some(row) => row[0].integer().map(|v| v as u64),
            };
            if expected != Some(version) {
                differs("stream_version", &version, &top);
            }
        }
    }
    if let Ok(head) = store.head_position().await {
        let max = held
            .iter()
            .filter_map(|r| r[0].integer())
            .max()
            .unwrap_or(0);
        if head != max as u64 {
            differs("head_position", &head, &max);
        }
    }

    // The snapshot, as stored.
    let snapshot_rows = held_rows(
        conn,
        "SELECT version, schema_version, state FROM snapshots \
         WHERE aggregate_type = 'Fuzz' AND aggregate_id = 'a'",
    );
    let snapshot_row = snapshot_rows.first();
    if let Ok(found) = store.load_snapshot(&StreamId::new("Fuzz", "a")).await {
        let expected = snapshot_row.and_then(|row| {
            Some(Snapshot {
                aggregate_type: "Fuzz".into(),
                aggregate_id: "a".into(),
                version: row[0].integer()? as u64,
                schema_version: u32::try_from(row[1].integer()?).ok()?,
                state: row[2].text()?,
                taken_at: chrono::DateTime::from_timestamp_nanos(0),
            })
        });
        match (&found, &expected) {
            (None, None) if snapshot_row.is_none() => {}
            (Some(f), Some(e)) if f == e => {}
            _ => differs("load_snapshot", &found, &snapshot_row),
        }
    }

    // Replays: in full, then from the snapshot if it fits.
    for id in ["a", "b"] {
        let plain = Repository::<FuzzTally>::new(Arc::clone(&store));
        if let Ok(loaded) = plain.load(id).await {
            let expected = expected_fold(conn, id, 1, FuzzTally::default(), false);
            if expected.as_ref() != Some(&loaded) {
                differs("Repository::load", &loaded, &expected);
            }
        }
    }
    let with_snapshots = Repository::<FuzzTally>::new(Arc::clone(&store)).snapshot_every(3);
    // Computed before the load, which may replace a snapshot that does not fit.
    let full = expected_fold(conn, "a", 1, FuzzTally::default(), false);
    let from_snapshot = snapshot_row.and_then(|row| {
        let version = row[0].integer()?;
        if version <= 0 || row[1].integer()? != 1 {
            return None;
        }
        let state: FuzzTally = serde_json::from_str(&row[2].text()?).ok()?;
        // It fits when the stream's first event from its version on is at its version.
        let first = held_rows(
            conn,
            &format!(
                "SELECT version FROM events WHERE aggregate_type = 'Fuzz' \
                 AND aggregate_id = 'a' AND version >= {version} ORDER BY version LIMIT 1"
            ),
        );
        let fits = first
            .first()
            .is_some_and(|r| r[0] == Held::Integer(version));
        fits.then(|| expected_fold(conn, "a", version, state, true))
    });
    if let Ok(loaded) = with_snapshots.load("a").await {
        let ok = match &from_snapshot {
            // The snapshot fits: what follows its event is folded onto it (`None`: the
            // replay must fail).
            Some(expected) => expected.as_ref() == Some(&loaded),
            // It does not fit, or there is none that can be used: a full replay.
            None => full.as_ref() == Some(&loaded),
        };
        if !ok {
            differs(
                "Repository::load from a snapshot",
                &loaded,
                &(from_snapshot, full),
            );
        }
    }

    // Dead letters, the checkpoint, statistics.
    let dead = held_rows(
        conn,
        "SELECT id, subscription, event_id, position, event_type, error, attempts, \
         first_failed_at, last_failed_at FROM dead_letters ORDER BY id",
    );
    if let Ok(listed) = store.dead_letters(None).await {
        let expected: Option<Vec<DeadLetter>> = dead
            .iter()
            .map(|row| {
                Some(DeadLetter {
                    id: row[0].integer()? as u64,
                    subscription: row[1].text()?,
                    event_id: match &row[2] {
                        Held::Blob(b) => uuid::Uuid::from_slice(b).ok()?,
                        _ => return None,
                    },
                    position: row[3].integer()? as u64,
                    event_type: row[4].text()?,
                    error: row[5].text()?,
                    attempts: u32::try_from(row[6].integer()?).ok()?,
                    first_failed_at: chrono::DateTime::from_timestamp_nanos(row[7].integer()?),
                    last_failed_at: chrono::DateTime::from_timestamp_nanos(row[8].integer()?),
                })
            })
            .collect();
        if expected.as_ref() != Some(&listed) {
            differs("dead_letters", &listed, &dead);
        }
    }
    if let Ok(position) = store.load_checkpoint("sub").await {
        let held = held_rows(
            conn,
            "SELECT position FROM checkpoints WHERE subscription = 'sub'",
        );
        let expected = match held.first() {
            None => Some(None),
            Some(row) => row[0].integer().map(|p| Some(p as u64)),
        };
        if expected != Some(position) {
            differs("load_checkpoint", &position, &held);
        }
    }
    if let Ok(stats) = store.statistics().await {
        let count = |sql: &str| held_rows(conn, sql)[0][0].integer().unwrap_or(-1) as u64;
        let expected = (
            count("SELECT COUNT(*) FROM events"),
            count("SELECT COUNT(*) FROM dead_letters"),
            count("SELECT COUNT(*) FROM snapshots"),
        );
        let got = (stats.events, stats.dead_letters, stats.snapshots);
        if got != expected || stats.events_by_type.values().sum::<u64>() != stats.events {
            differs("statistics", &stats, &expected);
        }
    }
    drop(store);
    let _ = sqlite.close().await;
}
