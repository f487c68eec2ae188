//! Replay requests (`SubscriptionStore::request_replay` and the rest): stored by the
//! writer, each request in one transaction with the check of what it names.

use chrono::{DateTime, Utc};
use eventfold_core::{
    Error, FinishedReplay, ReplayOutcome, ReplayRequest, ReplayTarget, Result, check_replay_target,
};
use rusqlite::{Connection, OptionalExtension, Row, params};

use crate::error::{corrupt_row, store_error};
use crate::sql::{nanos_of, to_i64};

const COLUMNS: &str = "SELECT id, subscription, dead_letter, requested_at, finished_at, \
     replayed, failed, held_back, reason FROM replay_requests";

/// Stores the requests `target` asks for, pending, in one transaction.
pub(crate) fn request(
    conn: &Connection,
    target: &ReplayTarget,
    requested_at: DateTime<Utc>,
) -> Result<Vec<ReplayRequest>> {
    check_replay_target(target)?;
    let at = nanos_of(requested_at, "the request time")?;
    let fail = |e| store_error("storing a replay request", e);
    conn.execute_batch("BEGIN IMMEDIATE").map_err(fail)?;
    let stored = (|| {
        let wanted: Vec<(String, Option<u64>)> = match target {
            ReplayTarget::DeadLetter { id } => {
                let subscription: Option<String> = conn
                    .prepare_cached("SELECT subscription FROM dead_letters WHERE id = ?1")
                    .and_then(|mut s| s.query_row([to_i64(*id)], |r| r.get(0)).optional())
                    .map_err(fail)?;
                let subscription = subscription.ok_or(Error::DeadLetterNotFound { id: *id })?;
                vec![(subscription, Some(*id))]
            }
            ReplayTarget::Subscription { name } => vec![(name.clone(), None)],
            ReplayTarget::All => {
                let mut stmt = conn
                    .prepare_cached(
                        "SELECT DISTINCT subscription FROM dead_letters ORDER BY subscription",
                    )
                    .map_err(fail)?;
                let names = stmt
                    .query_map([], |r| r.get::<_, String>(0))
                    .map_err(fail)?
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map_err(fail)?;
                names.into_iter().map(|n| (n, None)).collect()
            }
        };
        let mut insert = conn
            .prepare_cached(
                "INSERT INTO replay_requests (subscription, dead_letter, requested_at) \
                 VALUES (?1, ?2, ?3) RETURNING id",
            )
            .map_err(fail)?;
        wanted
            .into_iter()
            .map(|(subscription, dead_letter)| {
                let id: i64 = insert
                    .query_row(params![subscription, dead_letter.map(to_i64), at], |r| {
                        r.get(0)
                    })
                    .map_err(fail)?;
                Ok(ReplayRequest {
                    id: id as u64,
                    subscription,
                    dead_letter,
                    requested_at,
                    finished: None,
                })
            })
            .collect::<Result<Vec<_>>>()
    })();
    match stored {
        Ok(stored) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(stored),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(fail(e))
            }
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Requests, oldest first: pending ones of one subscription (`pending`), or all of one
/// subscription or every one.
pub(crate) fn list(
    conn: &Connection,
    subscription: Option<&str>,
    pending: bool,
) -> Result<Vec<ReplayRequest>> {
    let fail = |e| store_error("listing replay requests", e);
    let sql = if pending {
        format!("{COLUMNS} WHERE subscription = ?1 AND finished_at IS NULL ORDER BY id")
    } else {
        format!("{COLUMNS} WHERE ?1 IS NULL OR subscription = ?1 ORDER BY id")
    };
    let mut stmt = conn.prepare_cached(&sql).map_err(fail)?;
    let mut rows = stmt.query([subscription]).map_err(fail)?;
    let mut requests = Vec::new();
    while let Some(row) = rows.next().map_err(fail)? {
        requests.push(from_row(row)?);
    }
    Ok(requests)
}

/// The request with this id.
pub(crate) fn get(conn: &Connection, id: u64) -> Result<Option<ReplayRequest>> {
    let fail = |e| store_error("reading a replay request", e);
    let mut stmt = conn
        .prepare_cached(&format!("{COLUMNS} WHERE id = ?1"))
        .map_err(fail)?;
    let mut rows = stmt.query([to_i64(id)]).map_err(fail)?;
    match rows.next().map_err(fail)? {
        Some(row) => from_row(row).map(Some),
        None => Ok(None),
    }
}

/// Records the outcome of a pending request, then removes the finished requests beyond the
/// newest `retain`; false if none is pending with this id.
pub(crate) fn finish(
    conn: &Connection,
    id: u64,
    finished: &FinishedReplay,
    retain: usize,
) -> Result<bool> {
    let at = nanos_of(finished.at, "the finish time")?;
    let (counts, reason) = finished.outcome.to_columns();
    let [replayed, failed, held_back] = counts.map(|c| c.map(to_i64));
    let fail = |e| store_error("recording a replay's outcome", e);
    let changed = conn
        .prepare_cached(
            "UPDATE replay_requests SET finished_at = ?2, replayed = ?3, failed = ?4, \
             held_back = ?5, reason = ?6 WHERE id = ?1 AND finished_at IS NULL",
        )
        .and_then(|mut s| s.execute(params![to_i64(id), at, replayed, failed, held_back, reason]))
        .map_err(fail)?;
    if changed == 0 {
        return Ok(false);
    }
    let retain = i64::try_from(retain.max(1)).unwrap_or(i64::MAX);
    conn.prepare_cached(
        "DELETE FROM replay_requests WHERE finished_at IS NOT NULL AND id NOT IN \
         (SELECT id FROM replay_requests WHERE finished_at IS NOT NULL \
          ORDER BY id DESC LIMIT ?1)",
    )
    .and_then(|mut s| s.execute([retain]))
    .map_err(fail)?;
    Ok(true)
}

fn from_row(row: &Row<'_>) -> Result<ReplayRequest> {
    let fail = |e| store_error("reading a replay request", e);
    let id = row.get::<_, i64>(0).map_err(fail)? as u64;
    let time = DateTime::<Utc>::from_timestamp_nanos;
    let finished_at: Option<i64> = row.get(4).map_err(fail)?;
    let finished = match finished_at {
        None => None,
        Some(at) => {
            let count = |index| -> Result<Option<u64>> {
                Ok(row
                    .get::<_, Option<i64>>(index)
                    .map_err(fail)?
                    .map(|v| v as u64))
            };
            let outcome = ReplayOutcome::from_columns(
                [count(5)?, count(6)?, count(7)?],
                row.get(8).map_err(fail)?,
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
        subscription: row.get(1).map_err(fail)?,
        dead_letter: row
            .get::<_, Option<i64>>(2)
            .map_err(fail)?
            .map(|v| v as u64),
        requested_at: time(row.get(3).map_err(fail)?),
        finished,
    })
}
