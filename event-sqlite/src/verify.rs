//! [`SqliteEventStore::verify`](crate::SqliteEventStore::verify): a scan of every stored
//! event and of the file, and its report.

use eventfold_core::archive::Progress;
use eventfold_core::{Error, Result, StoreErrorKind};
use rusqlite::Connection;
use uuid::Uuid;

use crate::checksum::decode_metadata;
use crate::error::{kind_of, store_error};
use crate::sql::{SCAN_EVENTS, stored_event};

/// What [`SqliteEventStore::verify`](crate::SqliteEventStore::verify) found: every damaged
/// event, every break in the numbering of the log and of the streams, and what SQLite's
/// `PRAGMA integrity_check` said about the file. Nothing is repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// How many event rows were scanned.
    pub events: u64,
    /// The damaged event rows, in position order: a checksum that does not match the
    /// row's fields, text that is not UTF-8, an id that is not 16 bytes, a number out of
    /// range, metadata that is not JSON.
    pub damaged: Vec<DamagedEvent>,
    /// Breaks in the numbering, one sentence each: positions missing from the log, and
    /// streams whose versions do not run 1, 2, 3 … without gaps. Positions and versions
    /// that a pruned archive holds (the archive horizon) are not breaks.
    pub gaps: Vec<String>,
    /// What `PRAGMA integrity_check` reported (it says nothing of a sound file), and any
    /// read of the scan that SQLite refused because the file is damaged.
    pub integrity: Vec<String>,
}

impl VerifyReport {
    /// True when nothing is damaged: no damaged event, no gap, no integrity message.
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.gaps.is_empty() && self.integrity.is_empty()
    }
}

/// One damaged event row.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DamagedEvent {
    /// The row's position (`None` if even that cannot be read).
    pub position: Option<u64>,
    /// Its event id, when it can be read (after damage it may not be the id it was
    /// stored with).
    pub event_id: Option<Uuid>,
    /// What is wrong with it, one sentence each.
    pub problems: Vec<String>,
}

/// Event rows scanned between two calls of the progress callback.
const PROGRESS_EVERY: u64 = 4_096;

/// Scans the store in one read transaction, so the report describes one state of it,
/// telling `progress` how many event rows of how many it has scanned.
pub(crate) fn verify(
    conn: &Connection,
    progress: &mut dyn FnMut(Progress),
) -> Result<VerifyReport> {
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| store_error("starting the verification", e))?;
    let mut report = VerifyReport::default();
    // The rows to scan, in the transaction the scan reads; a file too damaged to count is
    // scanned all the same (its damage goes into the report below).
    let total: u64 = tx
        .query_row("SELECT count(*) FROM events", [], |row| {
            row.get::<_, i64>(0)
        })
        .map_or(0, |n| u64::try_from(n).unwrap_or(0));
    progress(Progress { done: 0, total });
    // A file too damaged to read the horizon from is reported, and checked without it.
    let horizon = match Horizon::read(&tx) {
        Ok(horizon) => horizon,
        Err(e) if e.store_kind() == Some(StoreErrorKind::Corrupt) => {
            report
                .integrity
                .push(format!("reading the archive horizon stopped: {e}"));
            Horizon::default()
        }
        Err(e) => return Err(e),
    };
    let scanned = scan_events(&tx, &horizon, &mut report, &mut |done| {
        progress(Progress {
            done,
            total: total.max(done),
        })
    });
    damage(scanned, "scanning the events", &mut report)?;
    progress(Progress {
        done: report.events,
        total: total.max(report.events),
    });
    let scanned = scan_streams(&tx, &horizon, &mut report);
    damage(scanned, "scanning the stream versions", &mut report)?;
    let checked = integrity_check(&tx, &mut report);
    damage(checked, "running integrity_check", &mut report)?;
    tx.finish()
        .map_err(|e| store_error("ending the verification", e))?;
    Ok(report)
}

/// A read that SQLite refused because the file is damaged goes into the report, and the
/// verification goes on; any other failure ends it.
fn damage(
    result: rusqlite::Result<()>,
    doing: &str,
    report: &mut VerifyReport,
) -> Result<(), Error> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if kind_of(&e) == StoreErrorKind::Corrupt => {
            report.integrity.push(format!("{doing} stopped: {e}"));
            Ok(())
        }
        Err(e) => Err(store_error(doing, e)),
    }
}

/// What the archive horizon says is pruned: the span of positions of each archive, and
/// the last pruned version of each stream.
#[derive(Default)]
struct Horizon {
    spans: Vec<(i64, i64)>,
    versions: std::collections::HashMap<(Vec<u8>, Vec<u8>), i64>,
}

impl Horizon {
    fn read(conn: &Connection) -> Result<Self> {
        let fail = |e| store_error("reading the archive horizon", e);
        let mut spans: Vec<(i64, i64)> = conn
            .prepare("SELECT first_position, last_position FROM archives")
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .map_err(fail)?;
        spans.sort_unstable();
        let versions = conn
            .prepare(
                "SELECT CAST(aggregate_type AS BLOB), CAST(aggregate_id AS BLOB), \
                 MAX(last_version) FROM archived_streams GROUP BY aggregate_type, aggregate_id",
            )
            .and_then(|mut stmt| {
                stmt.query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))?
                    .collect()
            })
            .map_err(fail)?;
        Ok(Horizon { spans, versions })
    }

    /// True when every position of `first..=last` lies in an archive's span.
    fn covers(&self, first: i64, last: i64) -> bool {
        let mut next = first;
        for &(from, to) in &self.spans {
            if from > next {
                break;
            }
            next = next.max(to.saturating_add(1));
            if next > last {
                return true;
            }
        }
        next > last
    }
}

/// Checks every event row in position order, and that positions run 1, 2, 3 ….
/// Calls `scanned` with the rows scanned so far every [`PROGRESS_EVERY`] rows.
fn scan_events(
    conn: &Connection,
    horizon: &Horizon,
    report: &mut VerifyReport,
    scanned: &mut dyn FnMut(u64),
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(SCAN_EVENTS)?;
    let mut rows = stmt.query([])?;
    let mut expected = 1i64;
    while let Some(row) = rows.next()? {
        report.events += 1;
        if report.events.is_multiple_of(PROGRESS_EVERY) {
            scanned(report.events);
        }
        let mut problems = Vec::new();
        let (position, event_id) = match stored_event(row) {
            Ok((stored, checksum)) => {
                stored.check(checksum, &mut problems);
                if let Err(problem) = decode_metadata(stored.metadata) {
                    problems.push(problem);
                }
                (stored.position, stored.id())
            }
            Err(Error::CorruptEvent {
                event_id,
                position,
                reason,
            }) => {
                problems.push(reason);
                (position.map_or(0, |p| p as i64), event_id)
            }
            // Reading a column fails only on a column that is not selected.
            Err(other) => {
                problems.push(other.to_string());
                (0, None)
            }
        };
        if !problems.is_empty() {
            report.damaged.push(DamagedEvent {
                position: u64::try_from(position).ok().filter(|p| *p > 0),
                event_id,
                problems,
            });
        }
        if position > expected && !horizon.covers(expected, position - 1) {
            report.gaps.push(if position == expected + 1 {
                format!("position {expected} is missing from the log")
            } else {
                format!(
                    "positions {expected} to {} are missing from the log",
                    position - 1
                )
            });
        }
        expected = expected.max(position.saturating_add(1));
    }
    Ok(())
}

/// Checks that each stream's versions run 1, 2, 3 … (after its pruned versions), reading
/// the stream index in order.
fn scan_streams(
    conn: &Connection,
    horizon: &Horizon,
    report: &mut VerifyReport,
) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare(
        "SELECT aggregate_type, aggregate_id, version FROM events \
         ORDER BY aggregate_type, aggregate_id, version",
    )?;
    let mut rows = stmt.query([])?;
    // The stream being read, the version expected next, and whether it was reported.
    let mut current: Option<(Vec<u8>, Vec<u8>, i64, bool)> = None;
    while let Some(row) = rows.next()? {
        let bytes = |index: usize| -> rusqlite::Result<Vec<u8>> {
            Ok(match row.get_ref(index)? {
                rusqlite::types::ValueRef::Text(b) | rusqlite::types::ValueRef::Blob(b) => {
                    b.to_vec()
                }
                _ => Vec::new(),
            })
        };
        let version = match row.get_ref(2)? {
            rusqlite::types::ValueRef::Integer(v) => v,
            _ => i64::MIN,
        };
        let (aggregate_type, aggregate_id) = (bytes(0)?, bytes(1)?);
        let same =
            matches!(&current, Some((t, i, _, _)) if *t == aggregate_type && *i == aggregate_id);
        if !same {
            let pruned = horizon
                .versions
                .get(&(aggregate_type.clone(), aggregate_id.clone()))
                .copied()
                .unwrap_or(0);
            current = Some((
                aggregate_type,
                aggregate_id,
                pruned.saturating_add(1),
                false,
            ));
        }
        let Some((t, i, expected, reported)) = &mut current else {
            unreachable!("set above")
        };
        if version != *expected && !*reported {
            *reported = true;
            report.gaps.push(format!(
                "stream {}/{} has version {version} where version {expected} belongs",
                String::from_utf8_lossy(t),
                String::from_utf8_lossy(i)
            ));
        }
        *expected = version.saturating_add(1);
    }
    Ok(())
}

/// Runs SQLite's own check of the file: its pages, its b-trees, its indexes.
fn integrity_check(conn: &Connection, report: &mut VerifyReport) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let message = match row.get_ref(0)? {
            rusqlite::types::ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
            other => format!("{other:?}"),
        };
        if message != "ok" {
            report.integrity.push(message);
        }
    }
    Ok(())
}
