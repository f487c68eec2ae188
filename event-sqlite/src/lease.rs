//! The segment leases of the store contract ([`LeaseStore`]), in the tables of schema
//! version 4: `lease_subscriptions` (the stored segment count and the epoch new rows start
//! from), `segment_leases` (one row per segment) and `subscription_members`.
//!
//! Every write runs on the writer connection in its own `BEGIN IMMEDIATE` transaction, so
//! the check and the change of a claim or a renewal are one step for every process on the
//! file: SQLite's write lock serializes them across processes. A fenced checkpoint save,
//! which a bus makes often, is a grouped write of the writer instead (its lease check and
//! upsert inside the group's transaction, see `Command::SaveSegmentCheckpoint`): one step
//! all the same, without a transaction of its own.
//! Claims, renewals, releases and heartbeats go on the writer's lease lane, ahead of the
//! writes queued (see the `writer` module): a renewal that waited behind bulk appends
//! would answer after the bus had stopped the segment for want of it.
//! Times are the writer's clock (`Utc::now`), in nanoseconds as the rest of the schema.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventfold_core::lease::{
    LeaseStore, SegmentLease, SegmentState, check_segments, check_ttl, segment_checkpoint_name,
};
use eventfold_core::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};

use crate::SqliteEventStore;
use crate::error::store_error;
use crate::sql::{nanos_of, to_i64};
use crate::writer::Command;

/// Runs `work` in one write transaction: committed if it succeeds, rolled back otherwise.
fn in_transaction<T>(conn: &Connection, work: impl FnOnce() -> Result<T>) -> Result<T> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| store_error("starting a lease transaction", e))?;
    match work() {
        Ok(value) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(value),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                Err(store_error("committing a lease transaction", e))
            }
        },
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn fail(doing: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| store_error(doing, e)
}

/// Now and now + `ttl`, on the writer's clock, as stored.
fn times(ttl: chrono::Duration) -> Result<(i64, i64, DateTime<Utc>)> {
    let now = Utc::now();
    let expires_at = now + ttl;
    Ok((
        nanos_of(now, "the lease time")?,
        nanos_of(expires_at, "the lease expiry")?,
        expires_at,
    ))
}

fn now_nanos() -> Result<i64> {
    nanos_of(Utc::now(), "the lease time")
}

/// A segment's checkpoint (0 = none).
fn checkpoint_of(conn: &Connection, name: &str) -> Result<u64> {
    Ok(crate::sql::load_checkpoint(conn, name)?.unwrap_or(0))
}

/// Whether `lease` is still held: same owner, epoch and count.
pub(crate) fn held(conn: &Connection, lease: &SegmentLease) -> Result<bool> {
    conn.prepare_cached(
        "SELECT 1 FROM segment_leases WHERE subscription = ?1 AND segment = ?2 \
         AND segments = ?3 AND owner = ?4 AND epoch = ?5",
    )
    .and_then(|mut stmt| {
        stmt.exists(params![
            lease.subscription,
            lease.segment,
            lease.segments,
            lease.owner,
            to_i64(lease.epoch)
        ])
    })
    .map_err(fail("checking a segment lease"))
}

fn claim(
    conn: &Connection,
    subscription: &str,
    member: &str,
    segments: u32,
    max: u32,
    ttl: chrono::Duration,
) -> Result<Vec<SegmentLease>> {
    let (now, expires, expires_at) = times(ttl)?;
    in_transaction(conn, || {
        let stored: Option<(u32, i64)> = conn
            .prepare_cached(
                "SELECT segments, epoch_floor FROM lease_subscriptions WHERE subscription = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([subscription], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(fail("reading a subscription's segments"))?;
        match stored {
            Some((count, _)) if count != 0 && count != segments => {
                return Err(Error::SegmentCountMismatch {
                    subscription: subscription.to_owned(),
                    stored: count,
                    requested: segments,
                });
            }
            Some((count, _)) if count == segments => {}
            _ => create(
                conn,
                subscription,
                segments,
                stored.map_or(0, |(_, floor)| floor),
                now,
            )?,
        }
        let free: Vec<(u32, i64)> = conn
            .prepare_cached(
                "SELECT segment, epoch FROM segment_leases WHERE subscription = ?1 \
                 AND (owner IS NULL OR expires_at IS NULL OR expires_at <= ?2) \
                 ORDER BY segment LIMIT ?3",
            )
            .and_then(|mut stmt| {
                stmt.query_map(params![subscription, now, max], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect()
            })
            .map_err(fail("finding free segments"))?;
        let mut take = conn
            .prepare_cached(
                "UPDATE segment_leases SET owner = ?3, epoch = ?4, expires_at = ?5 \
                 WHERE subscription = ?1 AND segment = ?2",
            )
            .map_err(fail("claiming a segment"))?;
        let mut taken = Vec::with_capacity(free.len());
        for (segment, epoch) in free {
            let epoch = epoch + 1;
            take.execute(params![subscription, segment, member, epoch, expires])
                .map_err(fail("claiming a segment"))?;
            taken.push(SegmentLease {
                subscription: subscription.to_owned(),
                segment,
                segments,
                owner: member.to_owned(),
                epoch: epoch as u64,
                expires_at,
                checkpoint: checkpoint_of(
                    conn,
                    &segment_checkpoint_name(subscription, segment, segments),
                )?,
            });
        }
        Ok(taken)
    })
}

/// Stores the count and its free rows, from the epoch floor; with more than one segment,
/// each segment without a checkpoint starts from the plain one.
fn create(
    conn: &Connection,
    subscription: &str,
    segments: u32,
    floor: i64,
    now: i64,
) -> Result<()> {
    let fail = fail("storing a subscription's segments");
    conn.prepare_cached(
        "INSERT INTO lease_subscriptions (subscription, segments, epoch_floor) VALUES (?1, ?2, ?3) \
         ON CONFLICT (subscription) DO UPDATE SET segments = excluded.segments",
    )
    .and_then(|mut stmt| stmt.execute(params![subscription, segments, floor]))
    .map_err(&fail)?;
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO segment_leases (subscription, segment, segments, owner, epoch, expires_at) \
             VALUES (?1, ?2, ?3, NULL, ?4, NULL)",
        )
        .map_err(&fail)?;
    for segment in 0..segments {
        insert
            .execute(params![subscription, segment, segments, floor])
            .map_err(&fail)?;
    }
    if segments > 1
        && let Some(plain) = crate::sql::load_checkpoint(conn, subscription)?
    {
        let mut seed = conn
            .prepare_cached(
                "INSERT INTO checkpoints (subscription, position, updated_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (subscription) DO NOTHING",
            )
            .map_err(&fail)?;
        for segment in 0..segments {
            seed.execute(params![
                segment_checkpoint_name(subscription, segment, segments),
                to_i64(plain),
                now
            ])
            .map_err(&fail)?;
        }
    }
    Ok(())
}

fn renew(
    conn: &Connection,
    leases: &[SegmentLease],
    ttl: chrono::Duration,
) -> Result<Vec<SegmentLease>> {
    let (_, expires, expires_at) = times(ttl)?;
    in_transaction(conn, || {
        let mut update = conn
            .prepare_cached(
                "UPDATE segment_leases SET expires_at = ?6 WHERE subscription = ?1 \
                 AND segment = ?2 AND segments = ?3 AND owner = ?4 AND epoch = ?5",
            )
            .map_err(fail("renewing a segment lease"))?;
        let mut renewed = Vec::new();
        for lease in leases {
            let changed = update
                .execute(params![
                    lease.subscription,
                    lease.segment,
                    lease.segments,
                    lease.owner,
                    to_i64(lease.epoch),
                    expires
                ])
                .map_err(fail("renewing a segment lease"))?;
            if changed == 1 {
                renewed.push(SegmentLease {
                    expires_at,
                    ..lease.clone()
                });
            }
        }
        Ok(renewed)
    })
}

fn release(conn: &Connection, leases: &[SegmentLease]) -> Result<()> {
    in_transaction(conn, || {
        let mut update = conn
            .prepare_cached(
                "UPDATE segment_leases SET owner = NULL, expires_at = NULL WHERE subscription = ?1 \
                 AND segment = ?2 AND segments = ?3 AND owner = ?4 AND epoch = ?5",
            )
            .map_err(fail("releasing a segment lease"))?;
        for lease in leases {
            update
                .execute(params![
                    lease.subscription,
                    lease.segment,
                    lease.segments,
                    lease.owner,
                    to_i64(lease.epoch)
                ])
                .map_err(fail("releasing a segment lease"))?;
        }
        Ok(())
    })
}

fn states(conn: &Connection, subscription: &str) -> Result<Vec<SegmentState>> {
    let now = now_nanos()?;
    conn.prepare_cached(
        "SELECT l.segment, l.segments, l.owner, l.epoch, l.expires_at, c.position \
         FROM segment_leases AS l LEFT JOIN checkpoints AS c ON c.subscription = \
         CASE WHEN l.segments = 1 THEN l.subscription \
         ELSE l.subscription || '#' || l.segment || '/' || l.segments END \
         WHERE l.subscription = ?1 ORDER BY l.segment",
    )
    .and_then(|mut stmt| {
        stmt.query_map([subscription], |row| {
            let expires_at: Option<i64> = row.get(4)?;
            let owner: Option<String> = row.get(2)?;
            let live = expires_at.is_some_and(|at| at > now);
            Ok(SegmentState {
                segment: row.get(0)?,
                segments: row.get(1)?,
                owner: owner.filter(|_| live),
                epoch: row.get::<_, i64>(3)? as u64,
                expires_at: expires_at.map(DateTime::from_timestamp_nanos),
                checkpoint: row.get::<_, Option<i64>>(5)?.map_or(0, |p| p as u64),
            })
        })?
        .collect()
    })
    .map_err(fail("reading segment states"))
}

fn reset(conn: &Connection, subscription: &str, position: u64) -> Result<()> {
    let now = now_nanos()?;
    in_transaction(conn, || {
        let live = conn
            .prepare_cached(
                "SELECT 1 FROM segment_leases WHERE subscription = ?1 \
                 AND owner IS NOT NULL AND expires_at > ?2",
            )
            .and_then(|mut stmt| stmt.exists(params![subscription, now]))
            .map_err(fail("checking for live segment leases"))?;
        if live {
            return Err(Error::SubscriptionRunning {
                name: subscription.to_owned(),
            });
        }
        let fail = fail("resetting a subscription's segments");
        let stored: Option<(u32, i64)> = conn
            .prepare_cached(
                "SELECT s.segments, MAX(s.epoch_floor, COALESCE( \
                     (SELECT MAX(epoch) FROM segment_leases WHERE subscription = ?1), 0)) \
                 FROM lease_subscriptions AS s WHERE s.subscription = ?1",
            )
            .and_then(|mut stmt| {
                stmt.query_row([subscription], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
            })
            .map_err(&fail)?;
        if let Some((segments, floor)) = stored {
            if segments > 1 {
                let mut delete = conn
                    .prepare_cached("DELETE FROM checkpoints WHERE subscription = ?1")
                    .map_err(&fail)?;
                for segment in 0..segments {
                    delete
                        .execute([segment_checkpoint_name(subscription, segment, segments)])
                        .map_err(&fail)?;
                }
            }
            conn.prepare_cached("DELETE FROM segment_leases WHERE subscription = ?1")
                .and_then(|mut stmt| stmt.execute([subscription]))
                .map_err(&fail)?;
            conn.prepare_cached(
                "UPDATE lease_subscriptions SET segments = 0, epoch_floor = ?2 \
                 WHERE subscription = ?1",
            )
            .and_then(|mut stmt| stmt.execute(params![subscription, floor]))
            .map_err(&fail)?;
        }
        crate::sql::upsert_checkpoint(conn, subscription, position, now).map_err(&fail)?;
        Ok(())
    })
}

fn heartbeat(
    conn: &Connection,
    subscription: &str,
    member: &str,
    ttl: chrono::Duration,
) -> Result<Vec<String>> {
    let (now, expires, _) = times(ttl)?;
    in_transaction(conn, || {
        let fail = fail("recording a member's heartbeat");
        conn.prepare_cached(
            "INSERT INTO subscription_members (subscription, member, expires_at) \
             VALUES (?1, ?2, ?3) ON CONFLICT (subscription, member) \
             DO UPDATE SET expires_at = excluded.expires_at",
        )
        .and_then(|mut stmt| stmt.execute(params![subscription, member, expires]))
        .map_err(&fail)?;
        conn.prepare_cached(
            "DELETE FROM subscription_members WHERE subscription = ?1 AND expires_at <= ?2",
        )
        .and_then(|mut stmt| stmt.execute(params![subscription, now]))
        .map_err(&fail)?;
        conn.prepare_cached(
            "SELECT member FROM subscription_members WHERE subscription = ?1 ORDER BY member",
        )
        .and_then(|mut stmt| stmt.query_map([subscription], |row| row.get(0))?.collect())
        .map_err(&fail)
    })
}

fn leave(conn: &Connection, subscription: &str, member: &str) -> Result<()> {
    in_transaction(conn, || {
        let fail = fail("removing a member");
        conn.prepare_cached(
            "DELETE FROM subscription_members WHERE subscription = ?1 AND member = ?2",
        )
        .and_then(|mut stmt| stmt.execute(params![subscription, member]))
        .map_err(&fail)?;
        conn.prepare_cached(
            "UPDATE segment_leases SET owner = NULL, expires_at = NULL \
             WHERE subscription = ?1 AND owner = ?2",
        )
        .and_then(|mut stmt| stmt.execute(params![subscription, member]))
        .map_err(&fail)?;
        Ok(())
    })
}

#[async_trait]
impl LeaseStore for SqliteEventStore {
    async fn heartbeat(
        &self,
        subscription: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<Vec<String>> {
        let ttl = check_ttl(ttl)?;
        let (subscription, member) = (subscription.to_owned(), member.to_owned());
        self.on_writer_first(move |conn| heartbeat(conn, &subscription, &member, ttl))
            .await
    }

    async fn leave(&self, subscription: &str, member: &str) -> Result<()> {
        let (subscription, member) = (subscription.to_owned(), member.to_owned());
        self.on_writer_first(move |conn| leave(conn, &subscription, &member))
            .await
    }

    async fn claim_segments(
        &self,
        subscription: &str,
        member: &str,
        segments: u32,
        max: u32,
        ttl: Duration,
    ) -> Result<Vec<SegmentLease>> {
        check_segments(segments)?;
        let ttl = check_ttl(ttl)?;
        let (subscription, member) = (subscription.to_owned(), member.to_owned());
        self.on_writer_first(move |conn| claim(conn, &subscription, &member, segments, max, ttl))
            .await
    }

    async fn renew_leases(
        &self,
        leases: &[SegmentLease],
        ttl: Duration,
    ) -> Result<Vec<SegmentLease>> {
        let ttl = check_ttl(ttl)?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let leases = leases.to_vec();
        self.on_writer_first(move |conn| renew(conn, &leases, ttl))
            .await
    }

    async fn release_leases(&self, leases: &[SegmentLease]) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let leases = leases.to_vec();
        self.on_writer_first(move |conn| release(conn, &leases))
            .await
    }

    async fn save_segment_checkpoint(&self, lease: &SegmentLease, position: u64) -> Result<()> {
        // A grouped write (see `Command::SaveSegmentCheckpoint`): the lease check and the
        // upsert share the group's transaction, as a bus saves often.
        let lease = lease.clone();
        self.write(|reply| Command::SaveSegmentCheckpoint {
            lease,
            position,
            reply,
        })
        .await
    }

    async fn segment_states(&self, subscription: &str) -> Result<Vec<SegmentState>> {
        let subscription = subscription.to_owned();
        self.read(move |conn| states(conn, &subscription)).await
    }

    async fn reset_segments(&self, subscription: &str, position: u64) -> Result<()> {
        let subscription = subscription.to_owned();
        // Not urgent, and ordered with the writes queued before it.
        self.on_writer(move |conn| reset(conn, &subscription, position))
            .await
    }
}
