//! Rows to records and back, and the queries every connection runs.
//!
//! Times are stored as nanoseconds since the Unix epoch, which round-trips a
//! `DateTime<Utc>` exactly between the years 1677 and 2262. Caller-given `u64`s that the
//! store never compares (checkpoint positions, durations) are stored bit for bit as
//! `i64`, so every value round-trips.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use eventfold_core::{
    Checkpoint, DeadLetter, Error, FailureRecord, Metadata, RecordedEvent, ReplayVisitor,
    ReplayedEvent, Result, Snapshot, StoreErrorKind, StoreStatistics, StreamId, registry,
};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, Rows, params};
use uuid::Uuid;

use crate::error::{corrupt_row, store_error};

/// Selects the columns [`event_from_row`] reads, then the given SQL.
macro_rules! select_events {
    ($($rest:literal)+) => {
        concat!(
            "SELECT position, event_id, aggregate_type, aggregate_id, version, event_type, \
             schema_version, occurred_at, recorded_at, metadata, payload FROM events ",
            $($rest),+
        )
    };
}

/// Inserts one event; the parameters follow the columns' order.
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (position, event_id, aggregate_type, \
     aggregate_id, version, event_type, schema_version, occurred_at, recorded_at, metadata, \
     payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// The oldest and newest times the store can keep exactly.
pub(crate) fn nanos(time: DateTime<Utc>) -> Option<i64> {
    time.timestamp_nanos_opt()
}

/// A time the store keeps, or an error saying which one is out of range.
pub(crate) fn nanos_of(time: DateTime<Utc>, what: &str) -> Result<i64> {
    nanos(time).ok_or_else(|| Error::Store {
        kind: StoreErrorKind::Other,
        message: format!(
            "{what} {time} is outside the years 1677 to 2262 that the SQLite store keeps exactly"
        ),
        source: None,
    })
}

fn time(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// A `u64` the store keeps bit for bit.
pub(crate) fn to_i64(value: u64) -> i64 {
    value as i64
}

/// The `u64` that [`to_i64`] stored.
fn to_u64(value: i64) -> u64 {
    value as u64
}

/// The largest version or position the store keeps (SQLite's integers are `i64`s).
pub(crate) const MAX_STORED: u64 = i64::MAX as u64;

/// A bound for a query on positions or versions, which the store keeps below `i64::MAX`.
pub(crate) fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn uuid_at(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Uuid>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Blob(bytes) => Uuid::from_slice(bytes).ok(),
        _ => None,
    })
}

/// A text column, lent as it is when it is valid UTF-8 and repaired otherwise (decoding
/// the repaired text then says what is wrong); `None` if the column is not text.
fn text_at<'r>(row: &'r Row<'_>, index: usize) -> rusqlite::Result<Option<Cow<'r, str>>> {
    Ok(match row.get_ref(index)? {
        ValueRef::Text(bytes) => Some(String::from_utf8_lossy(bytes)),
        _ => None,
    })
}

/// Reads an event row selected by [`select_events!`].
fn event_from_row(row: &Row<'_>) -> Result<RecordedEvent> {
    let read = |e| store_error("reading an event", e);
    let position = to_u64(row.get::<_, i64>(0).map_err(read)?);
    let bad = |what: &str| corrupt_row(format!("the event at position {position} has {what}"));
    let event_id = uuid_at(row, 1)
        .map_err(read)?
        .ok_or_else(|| bad("no valid event id"))?;
    let text = |index: usize, what: &str| -> Result<Cow<'_, str>> {
        text_at(row, index).map_err(read)?.ok_or_else(|| bad(what))
    };
    let metadata = match row.get_ref(9).map_err(read)? {
        ValueRef::Null => Metadata::default(),
        ValueRef::Text(json) => serde_json::from_slice(json)
            .map_err(|e| bad(&format!("metadata that does not decode ({e})")))?,
        _ => return Err(bad("metadata that is not text")),
    };
    let schema_version = u32::try_from(row.get::<_, i64>(6).map_err(read)?)
        .map_err(|_| bad("a schema version out of range"))?;
    let registry = registry();
    Ok(RecordedEvent {
        event_id,
        // Registered type names are borrowed from the registry rather than copied per row.
        aggregate_type: registry.aggregate_type_name(&text(2, "no aggregate type")?),
        aggregate_id: text(3, "no aggregate id")?.into_owned(),
        version: to_u64(row.get::<_, i64>(4).map_err(read)?),
        position,
        event_type: registry.event_type_name(&text(5, "no event type")?),
        schema_version,
        occurred_at: time(row.get(7).map_err(read)?),
        recorded_at: time(row.get(8).map_err(read)?),
        metadata,
        // Kept even if it is not JSON: decoding says so, and a subscriber can dead-letter it.
        payload: text(10, "no payload")?.into_owned(),
    })
}

fn events_from_rows(mut rows: Rows<'_>, capacity: usize) -> Result<Vec<RecordedEvent>> {
    let mut events = Vec::with_capacity(capacity);
    while let Some(row) = rows.next().map_err(|e| store_error("reading events", e))? {
        events.push(event_from_row(row)?);
    }
    Ok(events)
}

/// The events of a stream from a version on.
pub(crate) fn read_stream(
    conn: &Connection,
    stream: &StreamId,
    from_version: u64,
) -> Result<Vec<RecordedEvent>> {
    let fail = |e| store_error("reading a stream", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version >= ?3 ORDER BY version"
        ))
        .map_err(fail)?;
    let rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(from_version)
        ])
        .map_err(fail)?;
    events_from_rows(rows, 16)
}

/// Hands a stream's events from a version on to `visitor`, each borrowed from its row.
pub(crate) fn replay_stream(
    conn: &Connection,
    stream: &StreamId,
    from_version: u64,
    mut visitor: Box<dyn ReplayVisitor>,
) -> Result<Box<dyn ReplayVisitor>> {
    let fail = |e| store_error("replaying a stream", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT version, event_type, schema_version, payload \
             FROM events WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version >= ?3 \
             ORDER BY version",
        )
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(from_version)
        ])
        .map_err(fail)?;
    while let Some(row) = rows.next().map_err(fail)? {
        let version = to_u64(row.get_ref(0).and_then(|v| Ok(v.as_i64()?)).map_err(fail)?);
        let bad = |what: &str| {
            corrupt_row(format!(
                "the event at version {version} of {stream} has {what}"
            ))
        };
        let text = |index: usize, what: &str| -> Result<Cow<'_, str>> {
            text_at(row, index).map_err(fail)?.ok_or_else(|| bad(what))
        };
        let event_type = text(1, "no event type")?;
        let payload = text(3, "no payload")?;
        let schema_version = row.get_ref(2).and_then(|v| Ok(v.as_i64()?)).map_err(fail)?;
        let visited = visitor.visit(ReplayedEvent {
            version,
            event_type: &event_type,
            schema_version: u32::try_from(schema_version)
                .map_err(|_| bad("a schema version out of range"))?,
            payload: &payload,
        });
        if let Err(error) = visited {
            // The id and position are read only now: a replay that succeeds never needs
            // them, and a row lent without them is cheaper.
            return Err(match event_at_version(conn, stream, version)? {
                Some((id, position)) => error.at_event(id, position),
                None => error,
            });
        }
    }
    Ok(visitor)
}

/// The id and position of the event at a version of a stream.
fn event_at_version(
    conn: &Connection,
    stream: &StreamId,
    version: u64,
) -> Result<Option<(Uuid, u64)>> {
    let fail = |e| store_error("reading an event id", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT event_id, position FROM events \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version = ?3",
        )
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(version)
        ])
        .map_err(fail)?;
    match rows.next().map_err(fail)? {
        Some(row) => {
            let id = uuid_at(row, 0).map_err(fail)?;
            let position = to_u64(row.get::<_, i64>(1).map_err(fail)?);
            Ok(id.map(|id| (id, position)))
        }
        None => Ok(None),
    }
}

/// Up to `limit` events of the log from a position on.
pub(crate) fn read_all(
    conn: &Connection,
    from_position: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let fail = |e| store_error("reading the log", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE position >= ?1 ORDER BY position LIMIT ?2"
        ))
        .map_err(fail)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = stmt
        .query(params![bound(from_position), limit])
        .map_err(fail)?;
    events_from_rows(rows, limit.clamp(0, 1024) as usize)
}

/// The event with this id.
pub(crate) fn event_by_id(conn: &Connection, event_id: Uuid) -> Result<Option<RecordedEvent>> {
    let fail = |e| store_error("reading an event by id", e);
    let mut stmt = conn
        .prepare_cached(select_events!("WHERE event_id = ?1"))
        .map_err(fail)?;
    let mut rows = stmt.query([&event_id.as_bytes()[..]]).map_err(fail)?;
    match rows.next().map_err(fail)? {
        Some(row) => event_from_row(row).map(Some),
        None => Ok(None),
    }
}

/// The version of a stream's last event (0: no stream).
pub(crate) fn stream_version(conn: &Connection, stream: &StreamId) -> Result<u64> {
    let fail = |e| store_error("reading a stream version", e);
    let mut stmt = conn
        .prepare_cached(
            // Both columns are in the stream index (the position is the rowid): no table read.
            "SELECT version, position FROM events \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2 ORDER BY version DESC LIMIT 1",
        )
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![stream.aggregate_type, stream.aggregate_id])
        .map_err(fail)?;
    let Some(row) = rows.next().map_err(fail)? else {
        return Ok(0);
    };
    let version: i64 = row.get(0).map_err(fail)?;
    if version >= 1 {
        return Ok(version as u64);
    }
    let position: i64 = row.get(1).map_err(fail)?;
    let event_id = conn
        .query_row(
            "SELECT event_id FROM events WHERE position = ?1",
            [position],
            |row| uuid_at(row, 0),
        )
        .ok()
        .flatten();
    Err(Error::CorruptEvent {
        event_id,
        position: u64::try_from(position).ok().filter(|p| *p >= 1),
        reason: format!("the last event of {stream} has version {version}, not a version >= 1"),
    })
}

/// The position of the last event (0: empty log).
pub(crate) fn head(conn: &Connection) -> Result<u64> {
    let fail = |e| store_error("reading the head position", e);
    let mut stmt = conn
        .prepare_cached("SELECT COALESCE(MAX(position), 0) FROM events")
        .map_err(fail)?;
    let head: i64 = stmt.query_row([], |row| row.get(0)).map_err(fail)?;
    u64::try_from(head).map_err(|_| Error::CorruptEvent {
        event_id: None,
        position: None,
        reason: format!("the last event of the log has position {head}, not a position >= 1"),
    })
}

/// A stream's snapshot.
pub(crate) fn load_snapshot(conn: &Connection, stream: &StreamId) -> Result<Option<Snapshot>> {
    let fail = |e| store_error("loading a snapshot", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT version, schema_version, state, taken_at FROM snapshots \
             WHERE aggregate_type = ?1 AND aggregate_id = ?2",
        )
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![stream.aggregate_type, stream.aggregate_id])
        .map_err(fail)?;
    let Some(row) = rows.next().map_err(fail)? else {
        return Ok(None);
    };
    let schema_version = u32::try_from(row.get::<_, i64>(1).map_err(fail)?)
        .map_err(|_| corrupt_row(format!("the snapshot of {stream} has a bad schema version")))?;
    Ok(Some(Snapshot {
        aggregate_type: stream.aggregate_type.clone(),
        aggregate_id: stream.aggregate_id.clone(),
        version: to_u64(row.get(0).map_err(fail)?),
        schema_version,
        state: row.get(2).map_err(fail)?,
        taken_at: time(row.get(3).map_err(fail)?),
    }))
}

/// A subscription's checkpoint.
pub(crate) fn load_checkpoint(conn: &Connection, subscription: &str) -> Result<Option<u64>> {
    let fail = |e| store_error("loading a checkpoint", e);
    let mut stmt = conn
        .prepare_cached("SELECT position FROM checkpoints WHERE subscription = ?1")
        .map_err(fail)?;
    let mut rows = stmt.query([subscription]).map_err(fail)?;
    match rows.next().map_err(fail)? {
        Some(row) => Ok(Some(to_u64(row.get(0).map_err(fail)?))),
        None => Ok(None),
    }
}

/// Dead letters, oldest first, of one subscription or all.
pub(crate) fn dead_letters(
    conn: &Connection,
    subscription: Option<&str>,
) -> Result<Vec<DeadLetter>> {
    let fail = |e| store_error("listing dead letters", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, subscription, event_id, position, event_type, error, attempts, \
             first_failed_at, last_failed_at FROM dead_letters \
             WHERE ?1 IS NULL OR subscription = ?1 ORDER BY id",
        )
        .map_err(fail)?;
    let mut rows = stmt.query([subscription]).map_err(fail)?;
    let mut letters = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let id = to_u64(row.get(0).map_err(fail)?);
        letters.push(DeadLetter {
            id,
            subscription: row.get(1).map_err(fail)?,
            event_id: uuid_at(row, 2)
                .map_err(fail)?
                .ok_or_else(|| corrupt_row(format!("dead letter {id} has no valid event id")))?,
            position: to_u64(row.get(3).map_err(fail)?),
            event_type: row.get(4).map_err(fail)?,
            error: row.get(5).map_err(fail)?,
            attempts: to_u64(row.get(6).map_err(fail)?) as u32,
            first_failed_at: time(row.get(7).map_err(fail)?),
            last_failed_at: time(row.get(8).map_err(fail)?),
        });
    }
    Ok(letters)
}

/// One subscription's failure records, oldest first.
pub(crate) fn failures(
    conn: &Connection,
    subscription: &str,
    limit: usize,
) -> Result<Vec<FailureRecord>> {
    let fail = |e| store_error("listing failures", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT event_id, position, attempt, error, duration_micros, failed_at \
             FROM failures WHERE subscription = ?1 ORDER BY id LIMIT ?2",
        )
        .map_err(fail)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = stmt.query(params![subscription, limit]).map_err(fail)?;
    let mut failures = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        failures.push(FailureRecord {
            subscription: subscription.to_owned(),
            event_id: uuid_at(row, 0)
                .map_err(fail)?
                .ok_or_else(|| corrupt_row("a failure record has no valid event id".into()))?,
            position: to_u64(row.get(1).map_err(fail)?),
            attempt: to_u64(row.get(2).map_err(fail)?) as u32,
            error: row.get(3).map_err(fail)?,
            duration_micros: to_u64(row.get(4).map_err(fail)?),
            failed_at: time(row.get(5).map_err(fail)?),
        });
    }
    Ok(failures)
}

/// What the store holds, read in one transaction so the numbers agree.
pub(crate) fn statistics(conn: &Connection, on_disk: bool) -> Result<StoreStatistics> {
    let fail = |e| store_error("reading statistics", e);
    let tx = conn.unchecked_transaction().map_err(fail)?;
    let count = |sql: &str| -> Result<u64> {
        tx.prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_row([], |row| row.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(fail)
    };

    let mut events_by_type = BTreeMap::new();
    let mut events = 0;
    {
        let mut stmt = tx
            .prepare_cached("SELECT event_type, COUNT(*) FROM events GROUP BY event_type")
            .map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            let n = to_u64(row.get(1).map_err(fail)?);
            events += n;
            events_by_type.insert(row.get(0).map_err(fail)?, n);
        }
    }
    let aggregates =
        count("SELECT COUNT(*) FROM (SELECT 1 FROM events GROUP BY aggregate_type, aggregate_id)")?;
    let end = |order: &str| -> Result<Option<(u64, DateTime<Utc>)>> {
        let sql =
            format!("SELECT position, recorded_at FROM events ORDER BY position {order} LIMIT 1");
        let mut stmt = tx.prepare_cached(&sql).map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        match rows.next().map_err(fail)? {
            Some(row) => Ok(Some((
                to_u64(row.get(0).map_err(fail)?),
                time(row.get(1).map_err(fail)?),
            ))),
            None => Ok(None),
        }
    };
    let first = end("ASC")?;
    let last = end("DESC")?;
    let head = last.map_or(0, |(position, _)| position);

    let mut checkpoints = Vec::new();
    {
        let mut stmt = tx
            .prepare_cached("SELECT subscription, position FROM checkpoints ORDER BY subscription")
            .map_err(fail)?;
        let mut rows = stmt.query([]).map_err(fail)?;
        while let Some(row) = rows.next().map_err(fail)? {
            let position = to_u64(row.get(1).map_err(fail)?);
            checkpoints.push(Checkpoint {
                subscription: row.get(0).map_err(fail)?,
                position,
                lag: head.saturating_sub(position),
            });
        }
    }
    let size_bytes = if on_disk {
        Some(count(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
        )?)
    } else {
        None
    };

    let stats = StoreStatistics {
        events,
        events_by_type,
        aggregates,
        first_position: first.map(|(p, _)| p),
        last_position: last.map(|(p, _)| p),
        first_recorded_at: first.map(|(_, t)| t),
        last_recorded_at: last.map(|(_, t)| t),
        checkpoints,
        dead_letters: count("SELECT COUNT(*) FROM dead_letters")?,
        failures: count("SELECT COUNT(*) FROM failures")?,
        snapshots: count("SELECT COUNT(*) FROM snapshots")?,
        size_bytes,
    };
    tx.finish().map_err(fail)?;
    Ok(stats)
}
