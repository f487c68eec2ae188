//! Rows to records and back, and the queries every connection runs.
//!
//! Times are stored as nanoseconds since the Unix epoch, which round-trips a
//! `DateTime<Utc>` exactly between the years 1677 and 2262. Caller-given `u64`s that the
//! store never compares (checkpoint positions, durations) are stored bit for bit as
//! `i64`, so every value round-trips.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use eventfold_core::{
    Checkpoint, DeadLetter, Error, FailureRecord, NewDeadLetter, RecordedEvent, ReplayVisitor,
    ReplayedEvent, Result, Snapshot, StoreErrorKind, StoreStatistics, StreamId, StreamSummary,
    registry,
};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, Row, Rows, params};
use uuid::Uuid;

use crate::checksum::{
    self, LastEventType, LastStream, StoredEvent, corrupt_event, decode_metadata,
};
use crate::error::{corrupt_row, store_error};

/// Selects the columns [`stored_event`] reads, then the given SQL.
macro_rules! select_events {
    ($($rest:literal)+) => {
        concat!(
            "SELECT position, event_id, aggregate_type, aggregate_id, version, event_type, \
             schema_version, occurred_at, recorded_at, metadata, payload, checksum FROM events ",
            $($rest),+
        )
    };
}

/// Every event row, in position order, as [`stored_event`] reads them.
pub(crate) const SCAN_EVENTS: &str = select_events!("ORDER BY position");

/// Inserts one event; the parameters follow the columns' order.
pub(crate) const INSERT_EVENT: &str = "INSERT INTO events (position, event_id, aggregate_type, \
     aggregate_id, version, event_type, schema_version, occurred_at, recorded_at, metadata, \
     payload, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// The columns [`INSERT_EVENT`] binds, in order: row `r` of [`INSERT_EVENTS`] binds its
/// columns at parameters `r * EVENT_COLUMNS + 1` on.
pub(crate) const EVENT_COLUMNS: usize = 12;

/// The events [`INSERT_EVENTS`] inserts: 384 parameters, far under SQLite's limit (32,766).
pub(crate) const ROWS_PER_INSERT: usize = 32;

/// [`INSERT_EVENT`] of [`ROWS_PER_INSERT`] rows.
pub(crate) static INSERT_EVENTS: LazyLock<String> = LazyLock::new(|| {
    let (columns, _) = INSERT_EVENT
        .split_once(" VALUES ")
        .expect("the insert has its values");
    let rows: Vec<String> = (0..ROWS_PER_INSERT)
        .map(|row| {
            let parameters: Vec<String> = (1..=EVENT_COLUMNS)
                .map(|column| format!("?{}", row * EVENT_COLUMNS + column))
                .collect();
            format!("({})", parameters.join(", "))
        })
        .collect();
    format!("{columns} VALUES {}", rows.join(", "))
});

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

/// A text column of a row that is not an event (a dead letter, a failure record, a
/// snapshot), or an error naming `what` when it is not text or not UTF-8.
fn text_at(row: &Row<'_>, index: usize, what: impl Fn() -> String) -> Result<String> {
    match row.get_ref(index) {
        Ok(ValueRef::Text(bytes)) => match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(e) => Err(corrupt_row(format!("{} is not UTF-8 ({e})", what()))),
        },
        Ok(_) => Err(corrupt_row(format!("{} is not text", what()))),
        Err(e) => Err(store_error("reading a row", e)),
    }
}

/// The stored fields of an event row selected by [`select_events!`], lent by SQLite, and
/// its stored checksum (`None`: there is none). A column of the wrong type (which a STRICT
/// table only holds when its file is damaged) is an [`Error::CorruptEvent`].
pub(crate) fn stored_event<'r>(row: &'r Row<'_>) -> Result<(StoredEvent<'r>, Option<i64>)> {
    use ValueRef::{Blob, Integer, Null, Text};
    // The twelve columns at once, then one match: a sound row takes no branch per column,
    // and the errors are made apart, by `misread_event`, for a row that does not fit.
    let mut values = [Null; 12];
    for (index, value) in values.iter_mut().enumerate() {
        *value = row
            .get_ref(index)
            .map_err(|e| store_error("reading an event", e))?;
    }
    match values {
        [
            Integer(position),
            Blob(event_id),
            Text(aggregate_type),
            Text(aggregate_id),
            Integer(version),
            Text(event_type),
            Integer(schema_version),
            Integer(occurred_at),
            Integer(recorded_at),
            metadata @ (Null | Text(_)),
            Text(payload),
            checksum @ (Null | Integer(_)),
        ] => Ok((
            StoredEvent {
                position,
                event_id,
                aggregate_type,
                aggregate_id,
                version,
                event_type,
                schema_version,
                occurred_at,
                recorded_at,
                metadata: match metadata {
                    Text(bytes) => Some(bytes),
                    _ => None,
                },
                payload,
            },
            match checksum {
                Integer(checksum) => Some(checksum),
                _ => None,
            },
        )),
        _ => Err(misread_event(&values)),
    }
}

/// The error of an event row with a column of the wrong type (which a STRICT table only
/// holds when its file is damaged): the first such column, in the columns' order.
#[cold]
fn misread_event(values: &[ValueRef<'_>; 12]) -> Error {
    let ValueRef::Integer(position) = values[0] else {
        return corrupt_event(None, 0, &["its position is not an integer".to_owned()]);
    };
    let id = match values[1] {
        ValueRef::Blob(bytes) => Uuid::from_slice(bytes).ok(),
        _ => None,
    };
    // The store writes the id as a blob and every other field as text; a value of
    // another storage class (possible only in a damaged or hand-edited file) is damage.
    let problem = [
        (1, "event id is not a blob"),
        (2, "aggregate type is not text"),
        (3, "aggregate id is not text"),
        (4, "version is not an integer"),
        (5, "event type is not text"),
        (6, "schema version is not an integer"),
        (7, "occurrence time is not an integer"),
        (8, "recording time is not an integer"),
        (9, "metadata is not text"),
        (10, "payload is not text"),
        (11, "checksum is not an integer"),
    ]
    .into_iter()
    .find(|(index, _)| {
        !matches!(
            (*index, values[*index]),
            (1, ValueRef::Blob(_))
                | (2 | 3 | 5 | 10, ValueRef::Text(_))
                | (4 | 6 | 7 | 8, ValueRef::Integer(_))
                | (9, ValueRef::Null | ValueRef::Text(_))
                | (11, ValueRef::Null | ValueRef::Integer(_))
        )
    })
    .map_or("columns do not read back", |(_, what)| what);
    corrupt_event(id, position, &[format!("its {problem}")])
}

/// Reads an event row selected by [`select_events!`], checking it first.
/// `last`: the stream of the row before, when reading several.
fn event_from_row(row: &Row<'_>, last: Option<&mut LastStream>) -> Result<RecordedEvent> {
    let mut event = blank_record();
    event_from_row_into(row, last, &mut event)?;
    Ok(event)
}

/// A record for [`event_from_row_into`] to fill, its strings unallocated.
fn blank_record() -> RecordedEvent {
    RecordedEvent {
        event_id: Uuid::nil(),
        aggregate_type: std::borrow::Cow::Borrowed(""),
        aggregate_id: String::new(),
        version: 0,
        position: 0,
        event_type: std::borrow::Cow::Borrowed(""),
        schema_version: 0,
        occurred_at: DateTime::UNIX_EPOCH,
        recorded_at: DateTime::UNIX_EPOCH,
        metadata: eventfold_core::Metadata::default(),
        payload: String::new(),
    }
}

/// [`event_from_row`], into `into`: every field of it is set (its strings' allocations
/// reused, a reader of many rows fills one record row after row) when the row is sound;
/// on an error it is left as it was.
fn event_from_row_into(
    row: &Row<'_>,
    last: Option<&mut LastStream>,
    into: &mut RecordedEvent,
) -> Result<()> {
    let (stored, checksum) = stored_event(row)?;
    // Registered type names are borrowed from the registry rather than copied per row.
    let metadata = match (last, decode_metadata(stored.metadata)) {
        (Some(last), Ok(metadata)) => match last.check(&stored, checksum) {
            Some(known) => {
                fill(
                    into,
                    &stored,
                    &known.checked,
                    known.aggregate_type_name,
                    known.event_type_name,
                    metadata,
                );
                return Ok(());
            }
            None => Ok(metadata),
        },
        (_, metadata) => metadata,
    };
    // Without a last row, or a row refused by a check: every check, naming every problem.
    let mut problems = Vec::new();
    let checked = stored.check(checksum, &mut problems);
    let metadata = metadata.map_err(|problem| problems.push(problem));
    let (Some(event), Ok(metadata)) = (checked, metadata) else {
        return Err(stored.corrupt(&problems));
    };
    fill(
        into,
        &stored,
        &event,
        registry().aggregate_type_name(event.aggregate_type),
        registry().event_type_name(event.event_type),
        metadata,
    );
    Ok(())
}

/// Sets every field of `into` to those of a checked row.
fn fill(
    into: &mut RecordedEvent,
    stored: &StoredEvent<'_>,
    event: &checksum::CheckedEvent<'_>,
    aggregate_type: std::borrow::Cow<'static, str>,
    event_type: std::borrow::Cow<'static, str>,
    metadata: eventfold_core::Metadata,
) {
    into.event_id = event.event_id;
    into.aggregate_type = aggregate_type;
    into.aggregate_id.clear();
    into.aggregate_id.push_str(event.aggregate_id);
    into.version = event.version;
    into.position = to_u64(stored.position);
    into.event_type = event_type;
    into.schema_version = event.schema_version;
    into.occurred_at = time(stored.occurred_at);
    // One append's events share their recording time: converted once per append.
    if stored.recorded_at != nanos(into.recorded_at).unwrap_or(i64::MIN) {
        into.recorded_at = time(stored.recorded_at);
    }
    // Most events have none: an empty map replaces an empty map without a drop.
    if !(metadata.is_empty() && into.metadata.is_empty()) {
        into.metadata = metadata;
    }
    // Kept even if it is not JSON: decoding says so, and a subscriber can dead-letter it.
    into.payload.clear();
    into.payload.push_str(event.payload);
}

fn events_from_rows(mut rows: Rows<'_>, capacity: usize) -> Result<Vec<RecordedEvent>> {
    let mut events = Vec::with_capacity(capacity);
    let mut last = LastStream::default();
    while let Some(row) = rows.next().map_err(|e| store_error("reading events", e))? {
        events.push(event_from_row(row, Some(&mut last))?);
    }
    Ok(events)
}

/// The events of a stream from a version on, checking that none is missing.
/// Up to `limit` events of a stream from a version on (all of them: `usize::MAX`).
pub(crate) fn read_stream(
    conn: &Connection,
    stream: &StreamId,
    from_version: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let fail = |e| store_error("reading a stream", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version >= ?3 ORDER BY version \
             LIMIT ?4"
        ))
        .map_err(fail)?;
    // SQLite reads a negative limit as none.
    let limit = i64::try_from(limit).unwrap_or(-1);
    let rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(from_version),
            limit
        ])
        .map_err(fail)?;
    let events = events_from_rows(rows, 16)?;
    if events
        .first()
        .is_none_or(|e| e.version != from_version.max(1))
    {
        archived_stream(conn, stream, from_version)?;
    }
    for (expected, event) in (from_version.max(1)..).zip(&events) {
        if event.version != expected {
            return Err(missing_version(stream, expected, event.version)
                .at_event(event.event_id, event.position));
        }
    }
    Ok(events)
}

/// What a replay reads of each event of a stream from a version on.
const REPLAY_STREAM: &str = "SELECT version, event_type, schema_version, payload, checksum \
     FROM events WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version >= ?3 \
     ORDER BY version";

/// Hands a stream's events from a version on to `visitor`, each borrowed from its row
/// once the core half of its checksum (over the stream, the version, the event type, the
/// schema version and the payload: all a replay hands out) matches, and checks that no
/// version is missing.
///
/// A replay rebuilds an aggregate for every command, and each column read through
/// SQLite's API costs about as much as hashing a whole row: so it reads the five columns it
/// needs, and the rest of a row (its id and position, its other fields) only when the row
/// is refused, by its checksum or by the visitor, and then checks the whole row.
pub(crate) fn replay_stream(
    conn: &Connection,
    stream: &StreamId,
    from_version: u64,
    mut visitor: Box<dyn ReplayVisitor>,
) -> Result<Box<dyn ReplayVisitor>> {
    let fail = |e| store_error("replaying a stream", e);
    let mut stmt = conn.prepare_cached(REPLAY_STREAM).map_err(fail)?;
    let mut rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(from_version)
        ])
        .map_err(fail)?;
    let stream_hash = checksum::stream_hash(
        stream.aggregate_type.as_bytes(),
        stream.aggregate_id.as_bytes(),
    );
    let mut expected = from_version.max(1);
    let mut types = LastEventType::default();
    while let Some(row) = rows.next().map_err(fail)? {
        // The five columns at once, then one match: a sound row takes no branch per column.
        let mut values = [ValueRef::Null; 5];
        for (index, value) in values.iter_mut().enumerate() {
            *value = row.get_ref(index).map_err(fail)?;
        }
        let version = match values[0] {
            ValueRef::Integer(version) => Some(version),
            _ => None,
        };
        let sound = match values {
            [
                ValueRef::Integer(version),
                ValueRef::Text(event_type),
                ValueRef::Integer(schema_version),
                ValueRef::Text(payload),
                ValueRef::Integer(sum),
            ] => match (
                types.get(event_type),
                u64::try_from(version).ok().filter(|v| *v > 0),
                u32::try_from(schema_version).ok().filter(|v| *v > 0),
            ) {
                (Some((event_type, type_hash)), Some(checked_version), Some(checked_schema))
                    if checksum::core_matches(
                        sum,
                        checksum::core_hash_of_type(
                            stream_hash,
                            version,
                            type_hash,
                            schema_version,
                            payload,
                        ),
                    ) =>
                {
                    std::str::from_utf8(payload)
                        .ok()
                        .map(|payload| ReplayedEvent {
                            version: checked_version,
                            event_type,
                            schema_version: checked_schema,
                            payload,
                        })
                }
                _ => None,
            },
            _ => None,
        };
        let Some(event) = sound else {
            return Err(damaged_at_version(conn, stream, version));
        };
        if event.version != expected {
            if expected == from_version.max(1) {
                archived_stream(conn, stream, from_version)?;
            }
            let found = event.version;
            // A row damaged further on may be why (its version changed): name it first.
            while let Some(row) = rows.next().map_err(fail)? {
                let version = row.get_ref(0).ok().and_then(|v| v.as_i64().ok());
                if let Some(error) = row_damage(conn, stream, version)? {
                    return Err(error);
                }
            }
            // Named by the event found where the missing one should be.
            return Err(match event_at_version(conn, stream, found)? {
                Ok((id, position)) => {
                    missing_version(stream, expected, found).at_event(id, position)
                }
                Err(damaged) => damaged,
            });
        }
        expected += 1;
        let version = event.version;
        if let Err(error) = visitor.visit(event) {
            // The id and position are read only now: a replay that succeeds never needs
            // them, and a row lent without them is cheaper.
            return Err(match event_at_version(conn, stream, version)? {
                Ok((id, position)) => error.at_event(id, position),
                Err(damaged) => damaged,
            });
        }
    }
    if expected == from_version.max(1) {
        archived_stream(conn, stream, from_version)?;
    }
    Ok(visitor)
}

/// Reads the row at `version` of a stream in full and checks it: the error naming what is
/// damaged in it, `None` if it is sound (or gone).
fn row_damage(conn: &Connection, stream: &StreamId, version: Option<i64>) -> Result<Option<Error>> {
    let Some(version) = version else {
        return Ok(Some(unreadable_row(stream)));
    };
    let fail = |e| store_error("reading an event", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version = ?3"
        ))
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![stream.aggregate_type, stream.aggregate_id, version])
        .map_err(fail)?;
    let Some(row) = rows.next().map_err(fail)? else {
        return Ok(None);
    };
    let (stored, checksum) = match stored_event(row) {
        Ok(read) => read,
        Err(error) => return Ok(Some(error)),
    };
    let mut problems = Vec::new();
    stored.check(checksum, &mut problems);
    Ok((!problems.is_empty()).then(|| stored.corrupt(&problems)))
}

/// The error of a row of a stream that cannot be read back at all.
fn unreadable_row(stream: &StreamId) -> Error {
    Error::CorruptEvent {
        event_id: None,
        position: None,
        reason: format!("a row of stream {stream} has no version that can be read"),
    }
}

/// The error of the row at `version` of a stream that a replay refused.
fn damaged_at_version(conn: &Connection, stream: &StreamId, version: Option<i64>) -> Error {
    match row_damage(conn, stream, version) {
        Ok(Some(error)) | Err(error) => error,
        // Sound when read again in full: it changed while the replay ran.
        Ok(None) => Error::CorruptEvent {
            event_id: None,
            position: None,
            reason: format!(
                "the event at version {} of stream {stream} read back damaged once",
                version.unwrap_or_default()
            ),
        },
    }
}

/// The id and position of the sound event at a version of a stream, or the error naming
/// its damage.
fn event_at_version(
    conn: &Connection,
    stream: &StreamId,
    version: u64,
) -> Result<Result<(Uuid, u64), Error>> {
    let fail = |e| store_error("reading an event", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE aggregate_type = ?1 AND aggregate_id = ?2 AND version = ?3"
        ))
        .map_err(fail)?;
    let mut rows = stmt
        .query(params![
            stream.aggregate_type,
            stream.aggregate_id,
            bound(version)
        ])
        .map_err(fail)?;
    let Some(row) = rows.next().map_err(fail)? else {
        return Ok(Err(unreadable_row(stream)));
    };
    let (stored, checksum) = match stored_event(row) {
        Ok(read) => read,
        Err(error) => return Ok(Err(error)),
    };
    let mut problems = Vec::new();
    Ok(match stored.check(checksum, &mut problems) {
        Some(event) => Ok((event.event_id, to_u64(stored.position))),
        None => Err(stored.corrupt(&problems)),
    })
}

/// The error of a stream whose next stored version is not the one expected: an event of
/// it is missing (damaged into another stream, or deleted behind the store's back). The
/// caller names the event found in its place.
fn missing_version(stream: &StreamId, expected: u64, found: u64) -> Error {
    Error::CorruptEvent {
        event_id: None,
        position: None,
        reason: format!(
            "stream {stream} has no version {expected} (the next stored version is {found})"
        ),
    }
}

/// The error naming the archive that holds version `from_version` of a stream or a later
/// one, if one does: a read of the stream from there would miss events.
fn archived_stream(conn: &Connection, stream: &StreamId, from_version: u64) -> Result<()> {
    match crate::archive::of_stream(conn, stream, from_version.max(1))? {
        Some(archive) => Err(archive.error(format!(
            "stream {stream} from version {}",
            from_version.max(1)
        ))),
        None => Ok(()),
    }
}

/// Up to `limit` events of the log from a position on; a position missing in between
/// (or at the end, short of `limit`) that a pruned archive spans is [`Error::Archived`].
pub(crate) fn read_all(
    conn: &Connection,
    from_position: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>> {
    let events = read_stored(conn, from_position, limit)?;
    let mut expected = from_position.max(1);
    for event in &events {
        if event.position != expected {
            break;
        }
        expected += 1;
    }
    // Checked only where a position is missing: in the middle, or at the end of a short
    // read (the common read at the head), where it costs one look-up in a small table.
    if (expected - from_position.max(1)) < events.len() as u64 || events.len() < limit {
        archived_gap(conn, expected)?;
    }
    Ok(events)
}

/// Up to `limit` stored events from a position on, across the gaps of pruned archives.
pub(crate) fn read_stored(
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

/// Hands `visit` up to `limit` rows of the log from a position on, in order, each read
/// and checked on its own: a damaged row comes as its position and error, and the rows
/// after it still come (for a reader that sets damaged rows aside, as a projection does).
/// The records are lent, one at a time, their allocations reused from row to row; `visit`
/// returns false to stop. A position missing before a row (or at the end of a read short
/// of `limit`) that a pruned archive spans is [`Error::Archived`], as in [`read_all`]:
/// a reader never passes over archived events without a word.
pub(crate) fn visit_log(
    conn: &Connection,
    from_position: u64,
    limit: usize,
    mut visit: impl FnMut(std::result::Result<&RecordedEvent, (u64, Error)>) -> Result<bool>,
) -> Result<()> {
    let fail = |e| store_error("reading the log", e);
    let mut stmt = conn
        .prepare_cached(select_events!(
            "WHERE position >= ?1 ORDER BY position LIMIT ?2"
        ))
        .map_err(fail)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows = stmt
        .query(params![bound(from_position), limit])
        .map_err(fail)?;
    let mut last = LastStream::default();
    let mut record = blank_record();
    let mut expected = from_position.max(1);
    let mut seen = 0_i64;
    while let Some(row) = rows.next().map_err(fail)? {
        seen += 1;
        // The position is the rowid: an integer in every row SQLite can read.
        let position = row
            .get_ref(0)
            .ok()
            .and_then(|v| v.as_i64().ok())
            .map_or(0, to_u64);
        if position != expected {
            archived_gap(conn, expected)?;
        }
        expected = position.saturating_add(1);
        let go_on = match event_from_row_into(row, Some(&mut last), &mut record) {
            Ok(()) => visit(Ok(&record))?,
            Err(error) => visit(Err((position, error)))?,
        };
        if !go_on {
            return Ok(());
        }
    }
    if seen < limit {
        archived_gap(conn, expected)?;
    }
    Ok(())
}

/// [`Error::Archived`] if a pruned archive spans `position`, a position missing from a read.
fn archived_gap(conn: &Connection, position: u64) -> Result<()> {
    match crate::archive::at_position(conn, position)? {
        Some(archive) => Err(archive.error(format!("position {position}"))),
        None => Ok(()),
    }
}

/// Sets a subscription's checkpoint (inserting it if it has none).
pub(crate) fn upsert_checkpoint(
    conn: &Connection,
    subscription: &str,
    position: u64,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO checkpoints (subscription, position, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT (subscription) DO UPDATE SET \
         position = excluded.position, updated_at = excluded.updated_at",
    )?
    .execute(params![subscription, to_i64(position), now])
    .map(drop)
}

/// Stores a dead letter, or updates the one the subscription has of this event (see
/// `SubscriptionStore::add_dead_letter`); returns its id. The times are in nanoseconds.
pub(crate) fn upsert_dead_letter(
    conn: &Connection,
    dead_letter: &NewDeadLetter,
    first_failed_at: i64,
    last_failed_at: i64,
) -> rusqlite::Result<u64> {
    conn.prepare_cached(
        "INSERT INTO dead_letters (subscription, event_id, position, event_type, error, \
         attempts, first_failed_at, last_failed_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (subscription, event_id, position) DO UPDATE SET \
         event_type = excluded.event_type, \
         error = excluded.error, \
         attempts = MIN(attempts + excluded.attempts, 4294967295), \
         last_failed_at = excluded.last_failed_at \
         RETURNING id",
    )?
    .query_row(
        params![
            dead_letter.subscription,
            &dead_letter.event_id.as_bytes()[..],
            to_i64(dead_letter.position),
            dead_letter.event_type,
            dead_letter.error,
            dead_letter.attempts,
            first_failed_at,
            last_failed_at,
        ],
        |row| row.get::<_, i64>(0),
    )
    .map(|id| id as u64)
}

/// The event with this id.
pub(crate) fn event_by_id(conn: &Connection, event_id: Uuid) -> Result<Option<RecordedEvent>> {
    let fail = |e| store_error("reading an event by id", e);
    let mut stmt = conn
        .prepare_cached(select_events!("WHERE event_id = ?1"))
        .map_err(fail)?;
    let mut rows = stmt.query([&event_id.as_bytes()[..]]).map_err(fail)?;
    match rows.next().map_err(fail)? {
        Some(row) => event_from_row(row, None).map(Some),
        None => match crate::archive::of_id(conn, event_id)? {
            Some(archive) => Err(archive.error(format!("event {event_id}"))),
            None => Ok(None),
        },
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
        // A stream whose events were all pruned goes on from its last version.
        return crate::archive::pruned_version(conn, stream);
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

/// The position of the last event (0: empty log), pruned ones included: a log whose
/// newest events were archived goes on numbering after them.
pub(crate) fn head(conn: &Connection) -> Result<u64> {
    let fail = |e| store_error("reading the head position", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT COALESCE((SELECT MAX(position) FROM events), 0), \
             COALESCE((SELECT MAX(last_position) FROM archives), 0)",
        )
        .map_err(fail)?;
    let (head, archived): (i64, i64) = stmt
        .query_row([], |row| Ok((row.get(0)?, row.get(1)?)))
        .map_err(fail)?;
    let head = u64::try_from(head).map_err(|_| Error::CorruptEvent {
        event_id: None,
        position: None,
        reason: format!("the last event of the log has position {head}, not a position >= 1"),
    })?;
    Ok(head.max(archived.max(0) as u64))
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
        state: text_at(row, 2, || format!("the state of the snapshot of {stream}"))?,
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
            subscription: text_at(row, 1, || format!("the subscription of dead letter {id}"))?,
            event_id: uuid_at(row, 2)
                .map_err(fail)?
                .ok_or_else(|| corrupt_row(format!("dead letter {id} has no valid event id")))?,
            position: to_u64(row.get(3).map_err(fail)?),
            event_type: text_at(row, 4, || format!("the event type of dead letter {id}"))?,
            error: text_at(row, 5, || format!("the error of dead letter {id}"))?,
            attempts: u32::try_from(row.get::<_, i64>(6).map_err(fail)?).map_err(|_| {
                corrupt_row(format!(
                    "dead letter {id} has an attempt count out of range"
                ))
            })?,
            first_failed_at: time(row.get(7).map_err(fail)?),
            last_failed_at: time(row.get(8).map_err(fail)?),
        });
    }
    Ok(letters)
}

/// One subscription's failure records, newest first.
pub(crate) fn failures(
    conn: &Connection,
    subscription: &str,
    limit: usize,
) -> Result<Vec<FailureRecord>> {
    let fail = |e| store_error("listing failures", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT event_id, position, attempt, error, duration_micros, failed_at \
             FROM failures WHERE subscription = ?1 ORDER BY id DESC LIMIT ?2",
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
            attempt: u32::try_from(row.get::<_, i64>(2).map_err(fail)?).map_err(|_| {
                corrupt_row(format!(
                    "a failure record of `{subscription}` has an attempt number out of range"
                ))
            })?,
            error: text_at(row, 3, || {
                format!("the error of a failure record of `{subscription}`")
            })?,
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
            events_by_type.insert(text_at(row, 0, || "an event type".to_owned())?, n);
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
                subscription: text_at(row, 0, || "a checkpoint's subscription".to_owned())?,
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

/// The streams with stored events (of one aggregate type, if given), ordered by type and
/// id, each with its version, count and last event, from the stream index in one query.
pub(crate) fn streams(
    conn: &Connection,
    aggregate_type: Option<&str>,
) -> Result<Vec<StreamSummary>> {
    let fail = |e| store_error("listing streams", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT aggregate_type, aggregate_id, MAX(version), COUNT(*), MAX(position), \
             MAX(recorded_at) FROM events WHERE ?1 IS NULL OR aggregate_type = ?1 \
             GROUP BY aggregate_type, aggregate_id ORDER BY aggregate_type, aggregate_id",
        )
        .map_err(fail)?;
    let mut rows = stmt.query([aggregate_type]).map_err(fail)?;
    let mut streams = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        streams.push(StreamSummary {
            stream: StreamId::new(
                text_at(row, 0, || "a stream's aggregate type".to_owned())?,
                text_at(row, 1, || "a stream's aggregate id".to_owned())?,
            ),
            version: to_u64(row.get(2).map_err(fail)?),
            events: to_u64(row.get(3).map_err(fail)?),
            last_position: to_u64(row.get(4).map_err(fail)?),
            last_recorded_at: time(row.get(5).map_err(fail)?),
        });
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The columns of a sound row, as [`stored_event`] reads them.
    fn sound() -> [ValueRef<'static>; 12] {
        use ValueRef::{Blob, Integer, Null, Text};
        [
            Integer(7),
            Blob(&[1; 16]),
            Text(b"Meter"),
            Text(b"m-1"),
            Integer(3),
            Text(b"MeterRead"),
            Integer(1),
            Integer(10),
            Integer(11),
            Null,
            Text(b"{}"),
            Integer(5),
        ]
    }

    fn reason(values: &[ValueRef<'_>; 12]) -> (Option<Uuid>, Option<u64>, String) {
        match misread_event(values) {
            Error::CorruptEvent {
                event_id,
                position,
                reason,
            } => (event_id, position, reason),
            other => panic!("not a corrupt event: {other:?}"),
        }
    }

    #[test]
    fn a_column_of_the_wrong_type_is_named_first_in_the_columns_order() {
        let id = Uuid::from_bytes([1; 16]);
        let mut values = sound();
        values[0] = ValueRef::Text(b"7");
        assert_eq!(
            reason(&values),
            (None, None, "its position is not an integer".to_owned())
        );
        let cases = [
            (1, ValueRef::Text(b"x"), "its event id is not a blob"),
            (2, ValueRef::Null, "its aggregate type is not text"),
            (4, ValueRef::Real(3.0), "its version is not an integer"),
            (9, ValueRef::Integer(1), "its metadata is not text"),
            (10, ValueRef::Blob(b"{}"), "its payload is not text"),
            (11, ValueRef::Text(b"5"), "its checksum is not an integer"),
        ];
        for (index, value, expected) in cases {
            let mut values = sound();
            values[index] = value;
            let id = (index != 1).then_some(id);
            assert_eq!(reason(&values), (id, Some(7), expected.to_owned()));
        }
        // Two wrong columns: the first is named.
        let mut values = sound();
        values[6] = ValueRef::Null;
        values[3] = ValueRef::Integer(1);
        assert_eq!(reason(&values).2, "its aggregate id is not text".to_owned());
    }
}
