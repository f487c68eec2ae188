//! Rows to records and back, and the queries the read pool runs.
//!
//! Times are stored as nanoseconds since the Unix epoch, which round-trips a
//! `DateTime<Utc>` exactly between the years 1677 and 2262. Caller-given `u64`s that the
//! store never compares (checkpoint positions, durations) are stored bit for bit as
//! `bigint`, so every value round-trips.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use eventfold_core::{
    Checkpoint, DeadLetter, Error, FailureRecord, FinishedReplay, Metadata, RecordedEvent,
    ReplayOutcome, ReplayRequest, Result, Snapshot, StoreErrorKind, StoreStatistics, StreamId,
    StreamSummary, registry,
};
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use crate::error::{corrupt_row, store_error};

/// Selects the columns [`event_from_row`] reads, then the given SQL.
macro_rules! select_events {
    ($($rest:literal)+) => {
        concat!(
            "SELECT position, event_id, stream_type, stream_id, version, event_type, \
             schema_version, occurred_at, recorded_at, metadata, payload FROM ef_events ",
            $($rest),+
        )
    };
}

/// A stream's events from a version on (column 11 NULL), and, in the same statement and
/// snapshot, one more row if an archive holds that version or a later one of the stream:
/// the archive's id in column 1 and its file in column 11, every other column NULL. (An
/// archive takes a prefix of a stream, so such a read would miss events.)
pub(crate) const READ_STREAM: &str = "(SELECT position, event_id, stream_type, stream_id, \
     version, event_type, schema_version, occurred_at, recorded_at, metadata, payload, \
     NULL::text AS archive_path FROM ef_events \
     WHERE stream_type = $1 AND stream_id = $2 AND version >= $3 ORDER BY version LIMIT $4) \
     UNION ALL \
     (SELECT NULL, a.archive, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, a.path \
     FROM ef_archived_streams s JOIN ef_archives a ON a.archive = s.archive \
     WHERE s.stream_type = $1 AND s.stream_id = $2 AND s.last_version >= $3 \
     ORDER BY s.last_version LIMIT 1)";
/// The log from a position on; each row also carries, read once per call in the same
/// snapshot, the pruned archives whose span ends at or past the read's start (columns 11
/// to 14: their first and last positions, ids and files, in span order; NULL when there is
/// none, the common case of a reader past every archive). A read that misses a position
/// finds the archive spanning it there, without another query.
pub(crate) const READ_ALL: &str = "SELECT position, event_id, stream_type, stream_id, version, \
     event_type, schema_version, occurred_at, recorded_at, metadata, payload, \
     (SELECT array_agg(first_position ORDER BY last_position, archive) FROM ef_archives \
      WHERE last_position >= $1), \
     (SELECT array_agg(last_position ORDER BY last_position, archive) FROM ef_archives \
      WHERE last_position >= $1), \
     (SELECT array_agg(archive ORDER BY last_position, archive) FROM ef_archives \
      WHERE last_position >= $1), \
     (SELECT array_agg(path ORDER BY last_position, archive) FROM ef_archives \
      WHERE last_position >= $1) \
     FROM ef_events WHERE position >= $1 ORDER BY position LIMIT $2";
pub(crate) const BY_ID: &str = select_events!("WHERE event_id = $1");
pub(crate) const BY_IDS: &str = select_events!("WHERE event_id = ANY($1) ORDER BY position");
/// A stream's version: its last stored event's, or for a stream whose events were all
/// pruned into archives, the last pruned one (appends go on numbering after it).
pub(crate) const STREAM_VERSION: &str = "SELECT COALESCE(\
     (SELECT max(version) FROM ef_events WHERE stream_type = $1 AND stream_id = $2), \
     (SELECT max(last_version) FROM ef_archived_streams WHERE stream_type = $1 AND stream_id = $2), \
     0)";
/// What a replay reads of each event of a stream from a version on: what it hands out,
/// then the id and position that name an event it refuses (column 6 NULL); and, as in
/// [`READ_STREAM`], one more row naming the archive (its id in column 5, its file in
/// column 6) if one holds that version or a later one.
pub(crate) const REPLAY_STREAM: &str = "(SELECT version, event_type, schema_version, payload, \
     position, event_id, NULL::text AS archive_path FROM ef_events \
     WHERE stream_type = $1 AND stream_id = $2 AND version >= $3 ORDER BY version) \
     UNION ALL \
     (SELECT NULL, NULL, NULL, NULL, NULL, a.archive, a.path \
     FROM ef_archived_streams s JOIN ef_archives a ON a.archive = s.archive \
     WHERE s.stream_type = $1 AND s.stream_id = $2 AND s.last_version >= $3 \
     ORDER BY s.last_version LIMIT 1)";
/// Stores a dead letter, or updates the one its subscription has of the event; returns
/// its id.
pub(crate) const UPSERT_DEAD_LETTER: &str = "INSERT INTO ef_dead_letters (subscription, \
     event_id, position, event_type, error, attempts, first_failed_at, last_failed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     ON CONFLICT (subscription, event_id, position) DO UPDATE SET \
     event_type = excluded.event_type, error = excluded.error, \
     attempts = LEAST(ef_dead_letters.attempts + excluded.attempts, 4294967295), \
     last_failed_at = excluded.last_failed_at \
     RETURNING id";
pub(crate) const HEAD: &str = "SELECT position FROM ef_head";

/// Nanoseconds since the epoch, if the time is within what the store keeps exactly.
pub(crate) fn nanos(time: DateTime<Utc>) -> Option<i64> {
    time.timestamp_nanos_opt()
}

/// A time the store keeps, or an error saying which one is out of range.
pub(crate) fn nanos_of(time: DateTime<Utc>, what: &str) -> Result<i64> {
    nanos(time).ok_or_else(|| Error::InvalidAppend {
        reason: format!(
            "{what} {time} is outside the years 1677 to 2262 that the PostgreSQL store keeps \
             exactly"
        ),
    })
}

pub(crate) fn time(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// A `u64` the store keeps bit for bit.
pub(crate) fn to_i64(value: u64) -> i64 {
    value as i64
}

/// The `u64` that [`to_i64`] stored.
pub(crate) fn to_u64(value: i64) -> u64 {
    value as u64
}

/// A bound for a query on positions or versions, which the store keeps below `i64::MAX`.
pub(crate) fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads an event row selected by [`select_events!`], checking what the columns' types do
/// not: numbers in range, metadata that decodes.
pub(crate) fn event_from_row(row: &Row) -> Result<RecordedEvent> {
    let read = |e| store_error("reading an event", e);
    let position: i64 = row.try_get(0).map_err(read)?;
    let event_id: Uuid = row.try_get(1).map_err(read)?;
    let damaged = |reason: String| Error::CorruptEvent {
        event_id: Some(event_id),
        position: u64::try_from(position).ok().filter(|p| *p >= 1),
        reason,
    };
    if position < 1 {
        return Err(damaged(format!("its position is {position}, not >= 1")));
    }
    let stream_type: &str = row.try_get(2).map_err(read)?;
    let stream_id: &str = row.try_get(3).map_err(read)?;
    let version: i64 = row.try_get(4).map_err(read)?;
    if version < 1 {
        return Err(damaged(format!("its version is {version}, not >= 1")));
    }
    let event_type: &str = row.try_get(5).map_err(read)?;
    let schema_version: i64 = row.try_get(6).map_err(read)?;
    let schema_version = u32::try_from(schema_version)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| {
            damaged(format!(
                "its schema version {schema_version} is out of range"
            ))
        })?;
    let occurred_at: i64 = row.try_get(7).map_err(read)?;
    let recorded_at: i64 = row.try_get(8).map_err(read)?;
    let metadata: Option<&str> = row.try_get(9).map_err(read)?;
    let metadata = match metadata {
        None => Metadata::default(),
        Some(json) => serde_json::from_str(json)
            .map_err(|e| damaged(format!("its metadata does not decode ({e})")))?,
    };
    let payload: String = row.try_get(10).map_err(read)?;
    let registry = registry();
    Ok(RecordedEvent {
        event_id,
        // Registered type names are borrowed from the registry rather than copied per row.
        aggregate_type: registry.aggregate_type_name(stream_type),
        aggregate_id: stream_id.to_owned(),
        version: version as u64,
        position: position as u64,
        event_type: registry.event_type_name(event_type),
        schema_version,
        occurred_at: time(occurred_at),
        recorded_at: time(recorded_at),
        metadata,
        // Kept even if it is not JSON: decoding says so, and a subscriber can dead-letter it.
        payload,
    })
}

/// Events of rows, in order.
pub(crate) fn events_from_rows(rows: &[Row]) -> Result<Vec<RecordedEvent>> {
    rows.iter().map(event_from_row).collect()
}

/// Checks that a stream read from `from_version` has no missing version.
pub(crate) fn check_versions(
    stream: &StreamId,
    from_version: u64,
    events: &[RecordedEvent],
) -> Result<()> {
    for (expected, event) in (from_version.max(1)..).zip(events) {
        if event.version != expected {
            return Err(Error::CorruptEvent {
                event_id: Some(event.event_id),
                position: Some(event.position),
                reason: format!(
                    "stream {stream} has no version {expected} (the next stored version is {})",
                    event.version
                ),
            });
        }
    }
    Ok(())
}

/// A head or version read back from the store.
pub(crate) fn count(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::CorruptEvent {
        event_id: None,
        position: None,
        reason: format!("{what} is {value}, not >= 0"),
    })
}

/// Events by id, in position order.
pub(crate) async fn events_by_ids(client: &Client, ids: &[Uuid]) -> Result<Vec<RecordedEvent>> {
    let rows = client
        .query(BY_IDS, &[&ids])
        .await
        .map_err(|e| store_error("reading events by id", e))?;
    events_from_rows(&rows)
}

pub(crate) fn snapshot_from_row(stream: &StreamId, row: &Row) -> Result<Snapshot> {
    let read = |e| store_error("loading a snapshot", e);
    let schema_version: i64 = row.try_get(1).map_err(read)?;
    let schema_version = u32::try_from(schema_version)
        .map_err(|_| corrupt_row(format!("the snapshot of {stream} has a bad schema version")))?;
    Ok(Snapshot {
        aggregate_type: stream.aggregate_type.clone(),
        aggregate_id: stream.aggregate_id.clone(),
        version: to_u64(row.try_get(0).map_err(read)?),
        schema_version,
        state: row.try_get(2).map_err(read)?,
        taken_at: time(row.try_get(3).map_err(read)?),
    })
}

pub(crate) const DEAD_LETTERS: &str = "SELECT id, subscription, event_id, position, event_type, \
     error, attempts, first_failed_at, last_failed_at FROM ef_dead_letters \
     WHERE $1::text IS NULL OR subscription = $1 ORDER BY id";

pub(crate) fn dead_letter_from_row(row: &Row) -> Result<DeadLetter> {
    let read = |e| store_error("listing dead letters", e);
    let id = to_u64(row.try_get(0).map_err(read)?);
    let attempts: i64 = row.try_get(6).map_err(read)?;
    Ok(DeadLetter {
        id,
        subscription: row.try_get(1).map_err(read)?,
        event_id: row.try_get(2).map_err(read)?,
        position: to_u64(row.try_get(3).map_err(read)?),
        event_type: row.try_get(4).map_err(read)?,
        error: row.try_get(5).map_err(read)?,
        attempts: u32::try_from(attempts).map_err(|_| {
            corrupt_row(format!(
                "dead letter {id} has an attempt count out of range"
            ))
        })?,
        first_failed_at: time(row.try_get(7).map_err(read)?),
        last_failed_at: time(row.try_get(8).map_err(read)?),
    })
}

/// Selects the columns [`replay_request_from_row`] reads, then the given SQL.
macro_rules! select_replay_requests {
    ($rest:literal) => {
        concat!(
            "SELECT id, subscription, dead_letter, requested_at, finished_at, replayed, \
             failed, held_back, reason FROM ef_replay_requests ",
            $rest
        )
    };
}

pub(crate) const PENDING_REPLAY_REQUESTS: &str =
    select_replay_requests!("WHERE subscription = $1 AND finished_at IS NULL ORDER BY id");

pub(crate) const REPLAY_REQUESTS: &str =
    select_replay_requests!("WHERE $1::text IS NULL OR subscription = $1 ORDER BY id");

pub(crate) const REPLAY_REQUEST: &str = select_replay_requests!("WHERE id = $1");

pub(crate) fn replay_request_from_row(row: &Row) -> Result<ReplayRequest> {
    let read = |e| store_error("reading a replay request", e);
    let id = to_u64(row.try_get(0).map_err(read)?);
    let finished = match row.try_get::<_, Option<i64>>(4).map_err(read)? {
        None => None,
        Some(at) => {
            let count = |index| -> Result<Option<u64>> {
                Ok(row
                    .try_get::<_, Option<i64>>(index)
                    .map_err(read)?
                    .map(to_u64))
            };
            let outcome = ReplayOutcome::from_columns(
                [count(5)?, count(6)?, count(7)?],
                row.try_get(8).map_err(read)?,
            )
            .ok_or_else(|| corrupt_row(format!("replay request {id} has a count missing")))?;
            Some(FinishedReplay {
                at: time(at),
                outcome,
            })
        }
    };
    Ok(ReplayRequest {
        id,
        subscription: row.try_get(1).map_err(read)?,
        dead_letter: row.try_get::<_, Option<i64>>(2).map_err(read)?.map(to_u64),
        requested_at: time(row.try_get(3).map_err(read)?),
        finished,
    })
}

pub(crate) const FAILURES: &str = "SELECT event_id, position, attempt, error, duration_micros, \
     failed_at FROM ef_failures WHERE subscription = $1 ORDER BY id DESC LIMIT $2";

pub(crate) fn failure_from_row(subscription: &str, row: &Row) -> Result<FailureRecord> {
    let read = |e| store_error("listing failures", e);
    let attempt: i64 = row.try_get(2).map_err(read)?;
    Ok(FailureRecord {
        subscription: subscription.to_owned(),
        event_id: row.try_get(0).map_err(read)?,
        position: to_u64(row.try_get(1).map_err(read)?),
        attempt: u32::try_from(attempt).map_err(|_| {
            corrupt_row(format!(
                "a failure record of `{subscription}` has an attempt number out of range"
            ))
        })?,
        error: row.try_get(3).map_err(read)?,
        duration_micros: to_u64(row.try_get(4).map_err(read)?),
        failed_at: time(row.try_get(5).map_err(read)?),
    })
}

/// What the store holds, read in one repeatable-read transaction so the numbers agree.
pub(crate) async fn statistics(
    client: &mut deadpool_postgres::Object,
    schema: &str,
) -> Result<StoreStatistics> {
    let fail = |e| store_error("reading statistics", e);
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(fail)?;
    let mut events_by_type = BTreeMap::new();
    let mut events = 0;
    for row in tx
        .query(
            "SELECT event_type, count(*) FROM ef_events GROUP BY event_type",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let n = to_u64(row.try_get(1).map_err(fail)?);
        events += n;
        events_by_type.insert(row.try_get::<_, String>(0).map_err(fail)?, n);
    }
    let totals = tx
        .query_one(
            "SELECT \
               (SELECT count(*) FROM (SELECT 1 FROM ef_events \
                  GROUP BY stream_type, stream_id) AS streams), \
               (SELECT count(*) FROM ef_dead_letters), \
               (SELECT count(*) FROM ef_failures), \
               (SELECT count(*) FROM ef_snapshots), \
               (SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::bigint \
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE n.nspname = $1 AND c.relkind IN ('r', 'p'))",
            &[&schema],
        )
        .await
        .map_err(fail)?;
    let end = |order: &'static str| {
        let tx = &tx;
        async move {
            let sql = format!(
                "SELECT position, recorded_at FROM ef_events ORDER BY position {order} LIMIT 1"
            );
            let row = tx.query_opt(&sql, &[]).await.map_err(fail)?;
            row.map(|row| -> Result<(u64, DateTime<Utc>)> {
                Ok((
                    to_u64(row.try_get(0).map_err(fail)?),
                    time(row.try_get(1).map_err(fail)?),
                ))
            })
            .transpose()
        }
    };
    let first = end("ASC").await?;
    let last = end("DESC").await?;
    let head = last.map_or(0, |(position, _)| position);
    let mut checkpoints = Vec::new();
    for row in tx
        .query(
            "SELECT subscription, position FROM ef_checkpoints ORDER BY subscription",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let position = to_u64(row.try_get(1).map_err(fail)?);
        checkpoints.push(Checkpoint {
            subscription: row.try_get(0).map_err(fail)?,
            position,
            lag: head.saturating_sub(position),
        });
    }
    tx.commit().await.map_err(fail)?;
    let total = |i: usize| -> Result<u64> { Ok(to_u64(totals.try_get(i).map_err(fail)?)) };
    Ok(StoreStatistics {
        events,
        events_by_type,
        aggregates: total(0)?,
        first_position: first.map(|(p, _)| p),
        last_position: last.map(|(p, _)| p),
        first_recorded_at: first.map(|(_, t)| t),
        last_recorded_at: last.map(|(_, t)| t),
        checkpoints,
        dead_letters: total(1)?,
        failures: total(2)?,
        snapshots: total(3)?,
        size_bytes: Some(total(4)?),
    })
}

/// The error of a text the store cannot keep: PostgreSQL's `text` holds no NUL character.
pub(crate) fn check_text(text: &str, what: impl FnOnce() -> String) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::InvalidAppend {
            reason: format!(
                "{} contains a NUL character, which PostgreSQL text cannot hold",
                what()
            ),
        });
    }
    Ok(())
}

/// Like [`check_text`], for a write that is not an append.
pub(crate) fn check_field(text: &str, what: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::Store {
            kind: StoreErrorKind::Other,
            message: format!("{what} contains a NUL character, which PostgreSQL text cannot hold"),
            source: None,
        });
    }
    Ok(())
}

/// Hands the rows of [`REPLAY_STREAM`] to `visitor`, borrowed from the rows, checking that
/// no version is missing; an error names its event's id and position.
pub(crate) fn replay_rows<'r>(
    stream: &StreamId,
    from_version: u64,
    rows: impl IntoIterator<Item = &'r Row>,
    mut visitor: Box<dyn eventfold_core::ReplayVisitor>,
) -> Result<Box<dyn eventfold_core::ReplayVisitor>> {
    let read = |e| store_error("replaying a stream", e);
    for (expected, row) in (from_version.max(1)..).zip(rows) {
        let version: i64 = row.try_get(0).map_err(read)?;
        let event_type: &str = row.try_get(1).map_err(read)?;
        let schema_version: i64 = row.try_get(2).map_err(read)?;
        let payload: &str = row.try_get(3).map_err(read)?;
        let position: i64 = row.try_get(4).map_err(read)?;
        let event_id: Uuid = row.try_get(5).map_err(read)?;
        let position = position.max(0) as u64;
        let damaged = |reason: String| Error::CorruptEvent {
            event_id: Some(event_id),
            position: Some(position),
            reason,
        };
        let schema_version = u32::try_from(schema_version)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| {
                damaged(format!(
                    "its schema version {schema_version} is out of range"
                ))
            })?;
        if version != expected as i64 {
            return Err(damaged(format!(
                "stream {stream} has no version {expected} (the next stored version is {version})"
            )));
        }
        visitor
            .visit(eventfold_core::ReplayedEvent {
                version: expected,
                event_type,
                schema_version,
                payload,
            })
            .map_err(|e| e.at_event(event_id, position))?;
    }
    Ok(visitor)
}

/// The streams with stored events (of one aggregate type, if given), ordered by type and
/// id byte-wise, each with its version, count and last event, in one grouped query.
pub(crate) async fn streams(
    client: &Client,
    aggregate_type: Option<&str>,
) -> Result<Vec<StreamSummary>> {
    let fail = |e| store_error("listing streams", e);
    let rows = client
        .query(
            "SELECT stream_type, stream_id, max(version), count(*), max(position), \
             max(recorded_at) FROM ef_events WHERE $1::text IS NULL OR stream_type = $1 \
             GROUP BY stream_type, stream_id \
             ORDER BY stream_type COLLATE \"C\", stream_id COLLATE \"C\"",
            &[&aggregate_type],
        )
        .await
        .map_err(fail)?;
    rows.iter()
        .map(|row| {
            Ok(StreamSummary {
                stream: StreamId::new(
                    row.try_get::<_, String>(0).map_err(fail)?,
                    row.try_get::<_, String>(1).map_err(fail)?,
                ),
                version: to_u64(row.try_get(2).map_err(fail)?),
                events: to_u64(row.try_get(3).map_err(fail)?),
                last_position: to_u64(row.try_get(4).map_err(fail)?),
                last_recorded_at: time(row.try_get(5).map_err(fail)?),
            })
        })
        .collect()
}
