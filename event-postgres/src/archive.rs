//! The archive horizon in PostgreSQL: the tables `ef_archives` and `ef_archived_streams`
//! (their migration in `schema.rs`), the look-ups that name an archive where a read finds
//! events missing, and the prune and restore transactions of `eventfold::archive`.
//!
//! Prune and restore each run in one transaction that first locks the head row, the lock
//! every append takes (the writer's `ef_append` updates that row), so no append
//! interleaves with them; they also hold the checkpoints, the segment counts and the
//! snapshots in `SHARE` mode, so the rules the prune checks (`archive::check_readers`,
//! `archive::check_stream`) still hold when it commits.

use eventfold_core::archive::{
    ArchiveHorizon, PruneRequest, PrunedStream, StoredStream, check_readers, check_stream,
};
use eventfold_core::{Error, RecordedEvent, Result, StreamId};
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::error::store_error;
use crate::sql::{bound, nanos_of, time, to_i64, to_u64};

/// The archive whose span of positions holds `$1`. Asked only for a position missing from
/// a read of the log: inside an archive's span, a missing position is pruned.
pub(crate) const AT_POSITION: &str = "SELECT archive, path FROM ef_archives \
     WHERE last_position >= $1 AND first_position <= $1 ORDER BY last_position LIMIT 1";

/// The archive whose span of event ids holds `$1`, the id of an event that is not stored.
pub(crate) const OF_ID: &str = "SELECT archive, path FROM ef_archives \
     WHERE first_event_id <= $1 AND last_event_id >= $1 ORDER BY last_position LIMIT 1";

/// [`Error::Archived`] naming the archive a look-up above found, with `what` was asked for.
pub(crate) fn archived(rows: &[Row], what: impl FnOnce() -> String) -> Result<()> {
    let Some(row) = rows.first() else {
        return Ok(());
    };
    let read = |e| store_error("reading the archive horizon", e);
    Err(Error::Archived {
        archive: row.try_get(0).map_err(read)?,
        path: row.try_get(1).map_err(read)?,
        what: what(),
    })
}

/// [`Error::Archived`] if a stream read by `sql::READ_STREAM` or `sql::REPLAY_STREAM`
/// returned the row naming an archive (its id in column `archive`, its file in column
/// `path`, which is NULL in every event row); the event rows otherwise.
///
/// PostgreSQL hands a `UNION ALL`'s parts out in order, the first part in its own order,
/// so the archive's row, if any, is the last: only that row is looked at, which keeps the
/// check off the per-event path (looking at every row cost a 10,000-event replay about
/// 15%). Were the order ever different, nothing would be skipped silently: an archive row
/// among the events has a NULL position and version, which the event readers refuse as a
/// store error, and they check the versions follow each other.
pub(crate) fn stream_rows(
    rows: &[Row],
    (archive, path): (usize, usize),
    what: impl FnOnce() -> String,
) -> Result<&[Row]> {
    let read = |e| store_error("reading the archive horizon", e);
    let Some(last) = rows.last() else {
        return Ok(rows);
    };
    match last.try_get::<_, Option<String>>(path).map_err(read)? {
        Some(path) => Err(Error::Archived {
            archive: last.try_get(archive).map_err(read)?,
            path,
            what: what(),
        }),
        None => Ok(rows),
    }
}

/// The first position a read of the log from `from` (up to `limit` events) should have
/// found and did not: in the middle of what it found, or after it when it found fewer
/// than `limit`. `None` when nothing is missing.
pub(crate) fn missing_position(
    from: u64,
    limit: usize,
    positions: impl ExactSizeIterator<Item = u64>,
) -> Option<u64> {
    let found = positions.len();
    let mut expected = from.max(1);
    for position in positions {
        if position != expected {
            return Some(expected);
        }
        expected += 1;
    }
    (found < limit).then_some(expected)
}

/// [`Error::Archived`] if a read of the log from `from` (up to `limit` events) by
/// `sql::READ_ALL` returned `rows` and an archive spans the first position it missed (in
/// the middle, or at the end of a short read): a read never passes over archived events
/// without a word. The rows carry the archives that may (same snapshot). A read that
/// returned no row (and so advances no reader) cannot say: the position to look up in
/// the horizon comes back for the caller's one more query ([`AT_POSITION`]).
pub(crate) fn check_rows(from: u64, limit: usize, rows: &[Row]) -> Result<Option<u64>> {
    let positions = rows.iter().map(|row| to_u64(row.get(0)));
    let Some(missing) = missing_position(from, limit, positions) else {
        return Ok(None);
    };
    let Some(row) = rows.first() else {
        return Ok(Some(missing));
    };
    let read = |e| store_error("reading the log", e);
    let firsts: Option<Vec<i64>> = row.try_get(11).map_err(read)?;
    let Some(firsts) = firsts else {
        return Ok(None);
    };
    let lasts: Vec<i64> = row.try_get(12).map_err(read)?;
    let archives: Vec<Uuid> = row.try_get(13).map_err(read)?;
    let paths: Vec<String> = row.try_get(14).map_err(read)?;
    let at = bound(missing);
    let spanning = (0..firsts.len())
        .find(|&i| firsts[i] <= at && lasts.get(i).is_some_and(|last| at <= *last));
    match spanning {
        Some(i) => Err(Error::Archived {
            archive: archives.get(i).copied().unwrap_or_default(),
            path: paths.get(i).cloned().unwrap_or_default(),
            what: format!("position {missing}"),
        }),
        None => Ok(None),
    }
}

/// [`check_rows`], with its look-up for an empty read on `client`.
pub(crate) async fn check_log_read(
    client: &impl GenericClient,
    from: u64,
    limit: usize,
    rows: &[Row],
) -> Result<()> {
    let Some(missing) = check_rows(from, limit, rows)? else {
        return Ok(());
    };
    let found = client
        .query(AT_POSITION, &[&bound(missing)])
        .await
        .map_err(|e| store_error("reading the archive horizon", e))?;
    archived(&found, || format!("position {missing}"))
}

/// Every archive in the horizon, oldest prune first.
pub(crate) async fn horizon(client: &impl GenericClient) -> Result<Vec<ArchiveHorizon>> {
    let fail = |e| store_error("reading the archive horizon", e);
    let archives = client
        .query(
            "SELECT archive, path, events, checksum, first_position, last_position, \
             first_event_id, last_event_id, pruned_at FROM ef_archives \
             ORDER BY pruned_at, archive",
            &[],
        )
        .await
        .map_err(fail)?;
    let streams = client
        .query(
            "SELECT archive, stream_type, stream_id, first_version, last_version \
             FROM ef_archived_streams \
             ORDER BY archive, stream_type COLLATE \"C\", stream_id COLLATE \"C\"",
            &[],
        )
        .await
        .map_err(fail)?;
    let mut horizon = Vec::with_capacity(archives.len());
    for row in &archives {
        let archive: Uuid = row.try_get(0).map_err(fail)?;
        let mut pruned = Vec::new();
        for stream in streams.iter().filter(|s| s.get::<_, Uuid>(0) == archive) {
            pruned.push(PrunedStream {
                stream: StreamId::new(
                    stream.try_get::<_, String>(1).map_err(fail)?,
                    stream.try_get::<_, String>(2).map_err(fail)?,
                ),
                first_version: to_u64(stream.try_get(3).map_err(fail)?),
                last_version: to_u64(stream.try_get(4).map_err(fail)?),
            });
        }
        horizon.push(ArchiveHorizon {
            archive,
            path: row.try_get(1).map_err(fail)?,
            events: to_u64(row.try_get(2).map_err(fail)?),
            checksum: to_u64(row.try_get(3).map_err(fail)?),
            first_position: to_u64(row.try_get(4).map_err(fail)?),
            last_position: to_u64(row.try_get(5).map_err(fail)?),
            first_event_id: row.try_get(6).map_err(fail)?,
            last_event_id: row.try_get(7).map_err(fail)?,
            streams: pruned,
            pruned_at: time(row.try_get(8).map_err(fail)?),
        });
    }
    Ok(horizon)
}

/// Locks what a prune or a restore must hold to its commit: the head row (every append
/// updates it, so appends wait), and in `SHARE` mode the checkpoints, the segment counts
/// and the snapshots (their writers wait; readers and lease renewals go on).
async fn lock(tx: &tokio_postgres::Transaction<'_>, doing: &'static str) -> Result<()> {
    tx.batch_execute(
        "SELECT position FROM ef_head FOR UPDATE; \
         LOCK TABLE ef_checkpoints, ef_lease_subscriptions, ef_snapshots IN SHARE MODE",
    )
    .await
    .map_err(|e| store_error(doing, e))
}

fn mismatch(path: &str, reason: String) -> Error {
    Error::ArchiveMismatch {
        path: path.to_owned(),
        reason,
    }
}

/// Checks the rules of a prune and removes the archive's events, recording it in the
/// horizon, in one transaction; on any error nothing changes.
pub(crate) async fn prune(
    client: &mut tokio_postgres::Client,
    request: &PruneRequest,
) -> Result<()> {
    let fail = |e| store_error("pruning an archive", e);
    let horizon = &request.horizon;
    let tx = client.transaction().await.map_err(fail)?;
    lock(&tx, "locking the store for a prune").await?;

    // No reader may lose an event it has not handled: checkpoints, and every segment of a
    // subscription split into segments, saved or not.
    let checkpoints: Vec<(String, u64)> = tx
        .query("SELECT subscription, position FROM ef_checkpoints", &[])
        .await
        .map_err(fail)?
        .iter()
        .map(|row| (row.get(0), to_u64(row.get(1))))
        .collect();
    let segmented: Vec<(String, u32)> = tx
        .query(
            "SELECT subscription, segments FROM ef_lease_subscriptions WHERE segments > 1",
            &[],
        )
        .await
        .map_err(fail)?
        .iter()
        .map(|row| (row.get(0), row.get::<_, i32>(1).max(0) as u32))
        .collect();
    check_readers(&checkpoints, &segmented, horizon.last_position)?;

    // Each stream loses a prefix of what it holds, and still loads afterwards.
    let types: Vec<&str> = horizon
        .streams
        .iter()
        .map(|s| s.stream.aggregate_type.as_str())
        .collect();
    let ids: Vec<&str> = horizon
        .streams
        .iter()
        .map(|s| s.stream.aggregate_id.as_str())
        .collect();
    let stored = tx
        .query(
            "SELECT (SELECT min(e.version) FROM ef_events e \
                      WHERE e.stream_type = t.st AND e.stream_id = t.si), \
                    (SELECT max(e.version) FROM ef_events e \
                      WHERE e.stream_type = t.st AND e.stream_id = t.si), \
                    (SELECT s.version FROM ef_snapshots s \
                      WHERE s.stream_type = t.st AND s.stream_id = t.si) \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS t(st, si, ord) \
             ORDER BY t.ord",
            &[&types, &ids],
        )
        .await
        .map_err(fail)?;
    for (pruned, row) in horizon.streams.iter().zip(&stored) {
        let lowest: Option<i64> = row.try_get(0).map_err(fail)?;
        let highest: Option<i64> = row.try_get(1).map_err(fail)?;
        let snapshot: Option<i64> = row.try_get(2).map_err(fail)?;
        let stored = StoredStream {
            lowest: lowest.map(|v| v.max(0) as u64),
            highest: highest.map_or(0, |v| v.max(0) as u64),
            snapshot: snapshot.map(to_u64),
        };
        check_stream(&horizon.path, pruned, stored)?;
    }

    // Every event is stored where the archive says.
    let positions: Vec<i64> = request.events.iter().map(|e| bound(e.0)).collect();
    let event_ids: Vec<Uuid> = request.events.iter().map(|e| e.1).collect();
    let absent = tx
        .query(
            "SELECT t.p, t.id FROM unnest($1::bigint[], $2::uuid[]) AS t(p, id) \
             WHERE NOT EXISTS (SELECT 1 FROM ef_events e \
                               WHERE e.position = t.p AND e.event_id = t.id) \
             ORDER BY t.p LIMIT 1",
            &[&positions, &event_ids],
        )
        .await
        .map_err(fail)?;
    if let Some(row) = absent.first() {
        let (position, event_id): (i64, Uuid) = (row.get(0), row.get(1));
        return Err(mismatch(
            &horizon.path,
            format!("event {event_id} is not stored at position {position}"),
        ));
    }
    let removed = tx
        .execute(
            "DELETE FROM ef_events e USING unnest($1::bigint[], $2::uuid[]) AS t(p, id) \
             WHERE e.position = t.p AND e.event_id = t.id",
            &[&positions, &event_ids],
        )
        .await
        .map_err(fail)?;
    if removed != request.events.len() as u64 {
        return Err(mismatch(
            &horizon.path,
            format!(
                "the prune removed {removed} events, not the archive's {}",
                request.events.len()
            ),
        ));
    }

    tx.execute(
        "INSERT INTO ef_archives (archive, path, events, checksum, first_position, \
         last_position, first_event_id, last_event_id, pruned_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &horizon.archive,
            &horizon.path,
            &bound(horizon.events),
            &to_i64(horizon.checksum),
            &bound(horizon.first_position),
            &bound(horizon.last_position),
            &horizon.first_event_id,
            &horizon.last_event_id,
            &horizon.pruned_at.timestamp_nanos_opt().unwrap_or(i64::MAX),
        ],
    )
    .await
    .map_err(fail)?;
    let firsts: Vec<i64> = horizon
        .streams
        .iter()
        .map(|s| bound(s.first_version))
        .collect();
    let lasts: Vec<i64> = horizon
        .streams
        .iter()
        .map(|s| bound(s.last_version))
        .collect();
    tx.execute(
        "INSERT INTO ef_archived_streams (stream_type, stream_id, first_version, \
         last_version, archive) \
         SELECT t.st, t.si, t.fv, t.lv, $5 \
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[]) AS t(st, si, fv, lv)",
        &[&types, &ids, &firsts, &lasts, &horizon.archive],
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)
}

/// Stores an archive's events again as they were and removes it from the horizon, in one
/// transaction.
pub(crate) async fn restore(
    client: &mut tokio_postgres::Client,
    archive: Uuid,
    events: &[RecordedEvent],
) -> Result<()> {
    let fail = |e| store_error("restoring an archive", e);
    let mut positions = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut stream_ids = Vec::with_capacity(events.len());
    let mut versions = Vec::with_capacity(events.len());
    let mut event_ids = Vec::with_capacity(events.len());
    let mut event_types = Vec::with_capacity(events.len());
    let mut schema_versions = Vec::with_capacity(events.len());
    let mut occurred = Vec::with_capacity(events.len());
    let mut recorded = Vec::with_capacity(events.len());
    let mut metadata = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    for event in events {
        positions.push(bound(event.position));
        types.push(&*event.aggregate_type);
        stream_ids.push(event.aggregate_id.as_str());
        versions.push(bound(event.version));
        event_ids.push(event.event_id);
        event_types.push(&*event.event_type);
        schema_versions.push(i64::from(event.schema_version));
        occurred.push(nanos_of(event.occurred_at, "the occurrence time")?);
        recorded.push(nanos_of(event.recorded_at, "the recording time")?);
        // The metadata as the writer stores it: none when empty, else its JSON.
        metadata.push(if event.metadata.is_empty() {
            None
        } else {
            Some(
                serde_json::to_string(&event.metadata).map_err(|source| Error::Serialize {
                    event_type: event.event_type.to_string(),
                    source,
                })?,
            )
        });
        payloads.push(event.payload.as_str());
    }
    let tx = client.transaction().await.map_err(fail)?;
    lock(&tx, "locking the store for a restore").await?;
    let removed = tx
        .execute("DELETE FROM ef_archives WHERE archive = $1", &[&archive])
        .await
        .map_err(fail)?;
    if removed != 1 {
        return Err(mismatch(
            &archive.to_string(),
            format!("archive {archive} is not in the store's horizon"),
        ));
    }
    tx.execute(
        "INSERT INTO ef_events (position, stream_type, stream_id, version, event_id, \
         event_type, schema_version, occurred_at, recorded_at, metadata, payload) \
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], \
             $5::uuid[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], \
             $11::text[])",
        &[
            &positions,
            &types,
            &stream_ids,
            &versions,
            &event_ids,
            &event_types,
            &schema_versions,
            &occurred,
            &recorded,
            &metadata,
            &payloads,
        ],
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::missing_position;

    #[test]
    fn a_missing_position_is_found_in_the_middle_and_after_a_short_read() {
        assert_eq!(missing_position(1, 3, [1, 2, 3].into_iter()), None);
        assert_eq!(missing_position(1, 5, [1, 2, 3].into_iter()), Some(4));
        assert_eq!(missing_position(1, 5, [1, 3].into_iter()), Some(2));
        assert_eq!(missing_position(0, 5, [].into_iter()), Some(1));
        assert_eq!(missing_position(7, 2, [9, 10].into_iter()), Some(7));
    }
}
