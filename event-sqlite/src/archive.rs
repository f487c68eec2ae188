//! The archive horizon in SQLite: the tables `archives` and `archived_streams` (schema
//! version 3), the reads that name an archive instead of skipping a pruned event, and the
//! prune and restore transactions of `eventfold::archive`.

use chrono::{DateTime, Utc};
use eventfold_core::archive::{
    ArchiveHorizon, PruneRequest, PrunedStream, StoredStream, check_readers, check_stream,
};
use eventfold_core::{Error, RecordedEvent, Result, StreamId};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OptionalExtension, params};
use uuid::Uuid;

use crate::checksum::StoredEvent;
use crate::error::{corrupt_row, store_error};
use crate::sql::{INSERT_EVENT, bound, nanos_of};

/// An archive named by the horizon: its id and its file.
pub(crate) struct Named {
    archive: Uuid,
    path: String,
}

impl Named {
    /// The error of a read of `what`, which lies in this archive.
    pub(crate) fn error(self, what: String) -> Error {
        Error::Archived {
            archive: self.archive,
            path: self.path,
            what,
        }
    }
}

fn uuid(bytes: &[u8]) -> Result<Uuid> {
    Uuid::from_slice(bytes).map_err(|_| corrupt_row("an archive id is not 16 bytes".to_owned()))
}

fn named(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Vec<u8>, String)> {
    Ok((row.get(0)?, row.get(1)?))
}

fn to_named(found: Option<(Vec<u8>, String)>) -> Result<Option<Named>> {
    found
        .map(|(archive, path)| {
            Ok(Named {
                archive: uuid(&archive)?,
                path,
            })
        })
        .transpose()
}

/// The archive that holds `position`, if a pruned archive spans it. Asked only for a
/// position missing from `events`: inside an archive's span, a missing position is pruned.
pub(crate) fn at_position(conn: &Connection, position: u64) -> Result<Option<Named>> {
    let found = conn
        .prepare_cached(
            "SELECT archive, path FROM archives WHERE last_position >= ?1 \
             AND first_position <= ?1 ORDER BY last_position LIMIT 1",
        )
        .and_then(|mut stmt| stmt.query_row([bound(position)], named).optional())
        .map_err(|e| store_error("reading the archive horizon", e))?;
    to_named(found)
}

/// The archive that holds version `from_version` of a stream or a later one: a read from
/// that version would miss events.
pub(crate) fn of_stream(
    conn: &Connection,
    stream: &StreamId,
    from_version: u64,
) -> Result<Option<Named>> {
    let found = conn
        .prepare_cached(
            "SELECT a.archive, a.path FROM archived_streams s JOIN archives a USING (archive) \
             WHERE s.aggregate_type = ?1 AND s.aggregate_id = ?2 AND s.last_version >= ?3 \
             ORDER BY s.last_version LIMIT 1",
        )
        .and_then(|mut stmt| {
            stmt.query_row(
                params![
                    stream.aggregate_type,
                    stream.aggregate_id,
                    bound(from_version)
                ],
                named,
            )
            .optional()
        })
        .map_err(|e| store_error("reading the archive horizon", e))?;
    to_named(found)
}

/// The archive whose span of ids holds `event_id` (the id of an event that is not stored:
/// it may be pruned there).
pub(crate) fn of_id(conn: &Connection, event_id: Uuid) -> Result<Option<Named>> {
    let found = conn
        .prepare_cached(
            "SELECT archive, path FROM archives WHERE first_event_id <= ?1 \
             AND last_event_id >= ?1 LIMIT 1",
        )
        .and_then(|mut stmt| stmt.query_row([&event_id.as_bytes()[..]], named).optional())
        .map_err(|e| store_error("reading the archive horizon", e))?;
    to_named(found)
}

/// The last version of a stream that was pruned (0: none).
pub(crate) fn pruned_version(conn: &Connection, stream: &StreamId) -> Result<u64> {
    conn.prepare_cached(
        "SELECT COALESCE(MAX(last_version), 0) FROM archived_streams \
         WHERE aggregate_type = ?1 AND aggregate_id = ?2",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![stream.aggregate_type, stream.aggregate_id], |row| {
            row.get::<_, i64>(0)
        })
    })
    .map(|v| v.max(0) as u64)
    .map_err(|e| store_error("reading the archive horizon", e))
}

/// Every archive in the horizon, oldest prune first.
pub(crate) fn horizon(conn: &Connection) -> Result<Vec<ArchiveHorizon>> {
    let fail = |e| store_error("reading the archive horizon", e);
    let mut stmt = conn
        .prepare_cached(
            "SELECT archive, path, events, checksum, first_position, last_position, \
             first_event_id, last_event_id, pruned_at FROM archives ORDER BY pruned_at, archive",
        )
        .map_err(fail)?;
    let mut streams = conn
        .prepare_cached(
            "SELECT aggregate_type, aggregate_id, first_version, last_version \
             FROM archived_streams WHERE archive = ?1 ORDER BY aggregate_type, aggregate_id",
        )
        .map_err(fail)?;
    let mut rows = stmt.query([]).map_err(fail)?;
    let mut horizon = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        let archive: Vec<u8> = row.get(0).map_err(fail)?;
        let id = |index: usize| -> Result<Uuid> {
            match row.get_ref(index).map_err(fail)? {
                ValueRef::Blob(bytes) => uuid(bytes),
                _ => Err(corrupt_row(
                    "an archive's event id is not a blob".to_owned(),
                )),
            }
        };
        let mut pruned = Vec::new();
        let mut stream_rows = streams.query([&archive]).map_err(fail)?;
        while let Some(stream) = stream_rows.next().map_err(fail)? {
            pruned.push(PrunedStream {
                stream: StreamId::new(
                    stream.get::<_, String>(0).map_err(fail)?,
                    stream.get::<_, String>(1).map_err(fail)?,
                ),
                first_version: stream.get::<_, i64>(2).map_err(fail)? as u64,
                last_version: stream.get::<_, i64>(3).map_err(fail)? as u64,
            });
        }
        horizon.push(ArchiveHorizon {
            archive: uuid(&archive)?,
            path: row.get(1).map_err(fail)?,
            events: row.get::<_, i64>(2).map_err(fail)? as u64,
            checksum: row.get::<_, i64>(3).map_err(fail)? as u64,
            first_position: row.get::<_, i64>(4).map_err(fail)? as u64,
            last_position: row.get::<_, i64>(5).map_err(fail)? as u64,
            first_event_id: id(6)?,
            last_event_id: id(7)?,
            streams: pruned,
            pruned_at: DateTime::<Utc>::from_timestamp_nanos(row.get(8).map_err(fail)?),
        });
    }
    Ok(horizon)
}

/// Runs `work` in one write transaction: committed if it succeeds, rolled back otherwise.
fn in_transaction(conn: &Connection, work: impl FnOnce() -> Result<()>) -> Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| store_error("starting an archive transaction", e))?;
    match work() {
        Ok(()) => conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            store_error("committing an archive transaction", e)
        }),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn mismatch(path: &str, reason: String) -> Error {
    Error::ArchiveMismatch {
        path: path.to_owned(),
        reason,
    }
}

/// Checks the rules of a prune and removes the archive's events, recording it in the
/// horizon, in one transaction.
pub(crate) fn prune(conn: &Connection, request: &PruneRequest) -> Result<()> {
    let fail = |e| store_error("pruning an archive", e);
    let horizon = &request.horizon;
    in_transaction(conn, || {
        // No reader may lose an event it has not handled: checkpoints, and every segment
        // of a subscription split into segments, saved or not.
        let checkpoints: Vec<(String, u64)> = conn
            .prepare_cached("SELECT subscription, position FROM checkpoints")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok((row.get(0)?, row.get::<_, i64>(1)? as u64)))?
                    .collect()
            })
            .map_err(fail)?;
        let segmented: Vec<(String, u32)> = conn
            .prepare_cached(
                "SELECT subscription, segments FROM lease_subscriptions WHERE segments > 1",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], |row| {
                    Ok((
                        row.get(0)?,
                        row.get::<_, i64>(1)?.clamp(0, u32::MAX.into()) as u32,
                    ))
                })?
                .collect()
            })
            .map_err(fail)?;
        check_readers(&checkpoints, &segmented, horizon.last_position)?;
        // Each stream loses a prefix of what it holds, and still loads afterwards.
        for pruned in &horizon.streams {
            let stream = &pruned.stream;
            let (lowest, highest): (Option<i64>, Option<i64>) = conn
                .prepare_cached(
                    "SELECT MIN(version), MAX(version) FROM events \
                     WHERE aggregate_type = ?1 AND aggregate_id = ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![stream.aggregate_type, stream.aggregate_id], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })
                })
                .map_err(fail)?;
            let snapshot: Option<i64> = conn
                .prepare_cached(
                    "SELECT version FROM snapshots WHERE aggregate_type = ?1 \
                     AND aggregate_id = ?2",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![stream.aggregate_type, stream.aggregate_id], |row| {
                        row.get(0)
                    })
                    .optional()
                })
                .map_err(fail)?;
            let stored = StoredStream {
                lowest: lowest.map(|v| v.max(0) as u64),
                highest: highest.unwrap_or(0).max(0) as u64,
                snapshot: snapshot.map(|v| v as u64),
            };
            check_stream(&horizon.path, pruned, stored)?;
        }
        let mut delete = conn
            .prepare_cached("DELETE FROM events WHERE position = ?1 AND event_id = ?2")
            .map_err(fail)?;
        for (position, event_id) in &request.events {
            if delete
                .execute(params![bound(*position), &event_id.as_bytes()[..]])
                .map_err(fail)?
                != 1
            {
                return Err(mismatch(
                    &horizon.path,
                    format!("event {event_id} is not stored at position {position}"),
                ));
            }
        }
        conn.prepare_cached(
            "INSERT INTO archives (archive, path, events, checksum, first_position, \
             last_position, first_event_id, last_event_id, pruned_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                &horizon.archive.as_bytes()[..],
                horizon.path,
                bound(horizon.events),
                horizon.checksum as i64,
                bound(horizon.first_position),
                bound(horizon.last_position),
                &horizon.first_event_id.as_bytes()[..],
                &horizon.last_event_id.as_bytes()[..],
                horizon.pruned_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
            ])
        })
        .map_err(fail)?;
        let mut insert = conn
            .prepare_cached(
                "INSERT INTO archived_streams (aggregate_type, aggregate_id, last_version, \
                 first_version, archive) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(fail)?;
        for pruned in &horizon.streams {
            insert
                .execute(params![
                    pruned.stream.aggregate_type,
                    pruned.stream.aggregate_id,
                    bound(pruned.last_version),
                    bound(pruned.first_version),
                    &horizon.archive.as_bytes()[..],
                ])
                .map_err(fail)?;
        }
        Ok(())
    })
}

/// Stores an archive's events again as they were and removes it from the horizon, in one
/// transaction.
pub(crate) fn restore(conn: &Connection, archive: Uuid, events: &[RecordedEvent]) -> Result<()> {
    let fail = |e| store_error("restoring an archive", e);
    in_transaction(conn, || {
        let removed = conn
            .prepare_cached("DELETE FROM archives WHERE archive = ?1")
            .and_then(|mut stmt| stmt.execute([&archive.as_bytes()[..]]))
            .map_err(fail)?;
        if removed != 1 {
            return Err(Error::ArchiveMismatch {
                path: archive.to_string(),
                reason: format!("archive {archive} is not in the store's horizon"),
            });
        }
        conn.prepare_cached("DELETE FROM archived_streams WHERE archive = ?1")
            .and_then(|mut stmt| stmt.execute([&archive.as_bytes()[..]]))
            .map_err(fail)?;
        let mut insert = conn.prepare_cached(INSERT_EVENT).map_err(fail)?;
        for event in events {
            // The metadata as the writer stores it: none when empty, else its JSON.
            let metadata = if event.metadata.is_empty() {
                None
            } else {
                Some(
                    serde_json::to_string(&event.metadata).map_err(|source| Error::Serialize {
                        event_type: event.event_type.to_string(),
                        source,
                    })?,
                )
            };
            let occurred_at = nanos_of(event.occurred_at, "the occurrence time")?;
            let recorded_at = nanos_of(event.recorded_at, "the recording time")?;
            let stored = StoredEvent {
                position: bound(event.position),
                event_id: &event.event_id.as_bytes()[..],
                aggregate_type: event.aggregate_type.as_bytes(),
                aggregate_id: event.aggregate_id.as_bytes(),
                version: bound(event.version),
                event_type: event.event_type.as_bytes(),
                schema_version: i64::from(event.schema_version),
                occurred_at,
                recorded_at,
                metadata: metadata.as_deref().map(str::as_bytes),
                payload: event.payload.as_bytes(),
            };
            insert
                .execute(params![
                    stored.position,
                    stored.event_id,
                    &*event.aggregate_type,
                    event.aggregate_id,
                    stored.version,
                    &*event.event_type,
                    event.schema_version,
                    occurred_at,
                    recorded_at,
                    metadata,
                    event.payload,
                    stored.checksum(),
                ])
                .map_err(fail)?;
        }
        Ok(())
    })
}
