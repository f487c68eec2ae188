//! The segment leases of the store contract ([`LeaseStore`]), in the tables of schema
//! version 2: `ef_lease_subscriptions` (the stored segment count and the epoch new rows
//! start from), `ef_segment_leases` (one row per segment) and `ef_subscription_members`.
//!
//! Times are the server's clock (`clock_timestamp()`, read once per transaction), so the
//! machines sharing a store need not agree on the time. Claims hold the subscription's row
//! `FOR SHARE` (a reset holds it `FOR UPDATE`) and take free segments with
//! `FOR UPDATE SKIP LOCKED`, so members claiming at once never wait on each other's
//! segments and never both get one; a checkpoint save holds its segment's row `FOR SHARE`
//! while it checks the lease and upserts the checkpoint, so no takeover slips in between.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventfold_core::lease::{
    LeaseStore, SegmentLease, SegmentState, check_segments, check_ttl, segment_checkpoint_name,
};
use eventfold_core::{Error, Result};
use tokio_postgres::Transaction;

use crate::PostgresEventStore;
use crate::error::store_error;
use crate::sql::{check_field, to_i64, to_u64};

/// The server's clock in microseconds since the Unix epoch.
const NOW: &str = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

fn fail(doing: &'static str) -> impl Fn(tokio_postgres::Error) -> Error {
    move |e| store_error(doing, e)
}

fn micros(ttl: chrono::Duration) -> i64 {
    ttl.num_microseconds().unwrap_or(i64::MAX)
}

fn time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

async fn now(tx: &Transaction<'_>) -> Result<i64> {
    Ok(tx
        .query_one(NOW, &[])
        .await
        .map_err(fail("reading the server's clock"))?
        .get(0))
}

/// A segment's checkpoint (0 = none).
async fn checkpoint_of(tx: &Transaction<'_>, name: &str) -> Result<u64> {
    let row = tx
        .query_opt(
            "SELECT position FROM ef_checkpoints WHERE subscription = $1",
            &[&name],
        )
        .await
        .map_err(fail("loading a segment checkpoint"))?;
    Ok(row.map_or(0, |row| to_u64(row.get(0))))
}

/// Takes up to `max` free segments for `member`, on a subscription whose count is stored.
async fn take_free(
    tx: &Transaction<'_>,
    subscription: &str,
    member: &str,
    segments: u32,
    max: u32,
    ttl: chrono::Duration,
) -> Result<Vec<SegmentLease>> {
    let now = now(tx).await?;
    let expires = now.saturating_add(micros(ttl));
    let rows = tx
        .query(
            "UPDATE ef_segment_leases AS l SET owner = $2, epoch = l.epoch + 1, expires_at = $5 \
             FROM (SELECT segment FROM ef_segment_leases WHERE subscription = $1 \
                   AND (owner IS NULL OR expires_at IS NULL OR expires_at <= $4) \
                   ORDER BY segment LIMIT $3 FOR UPDATE SKIP LOCKED) AS free \
             WHERE l.subscription = $1 AND l.segment = free.segment \
             RETURNING l.segment, l.epoch",
            &[&subscription, &member, &i64::from(max), &now, &expires],
        )
        .await
        .map_err(fail("claiming segments"))?;
    let mut taken = Vec::with_capacity(rows.len());
    for row in rows {
        let segment = row.get::<_, i32>(0) as u32;
        taken.push(SegmentLease {
            subscription: subscription.to_owned(),
            segment,
            segments,
            owner: member.to_owned(),
            epoch: to_u64(row.get(1)),
            expires_at: time(expires),
            checkpoint: checkpoint_of(
                tx,
                &segment_checkpoint_name(subscription, segment, segments),
            )
            .await?,
        });
    }
    taken.sort_by_key(|lease| lease.segment);
    Ok(taken)
}

/// Stores the count and its free rows from the epoch floor, under the subscription row's
/// `FOR UPDATE` lock; with more than one segment, each segment without a checkpoint starts
/// from the plain one.
async fn create(tx: &Transaction<'_>, subscription: &str, segments: u32, floor: i64) -> Result<()> {
    let fail = fail("storing a subscription's segments");
    tx.execute(
        "UPDATE ef_lease_subscriptions SET segments = $2 WHERE subscription = $1",
        &[&subscription, &(segments as i32)],
    )
    .await
    .map_err(&fail)?;
    tx.execute(
        "INSERT INTO ef_segment_leases (subscription, segment, segments, owner, epoch, expires_at) \
         SELECT $1, s, $2, NULL, $3, NULL FROM generate_series(0, $2 - 1) AS s",
        &[&subscription, &(segments as i32), &floor],
    )
    .await
    .map_err(&fail)?;
    if segments > 1 {
        let now = now(tx).await?.saturating_mul(1000);
        tx.execute(
            "INSERT INTO ef_checkpoints (subscription, position, updated_at) \
             SELECT $1 || '#' || s || '/' || $2, c.position, $3 \
             FROM ef_checkpoints AS c, generate_series(0, $2 - 1) AS s \
             WHERE c.subscription = $1 ON CONFLICT (subscription) DO NOTHING",
            &[&subscription, &(segments as i32), &now],
        )
        .await
        .map_err(&fail)?;
    }
    Ok(())
}

#[async_trait]
impl LeaseStore for PostgresEventStore {
    async fn heartbeat(
        &self,
        subscription: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<Vec<String>> {
        let ttl = check_ttl(ttl)?;
        check_field(subscription, "the subscription name")?;
        check_field(member, "the member id")?;
        let fail = fail("recording a member's heartbeat");
        let mut client = self.lease_client("recording a member's heartbeat").await?;
        let tx = client.transaction().await.map_err(&fail)?;
        let now = now(&tx).await?;
        tx.execute(
            "INSERT INTO ef_subscription_members (subscription, member, expires_at) \
             VALUES ($1, $2, $3) ON CONFLICT (subscription, member) \
             DO UPDATE SET expires_at = excluded.expires_at",
            &[&subscription, &member, &now.saturating_add(micros(ttl))],
        )
        .await
        .map_err(&fail)?;
        tx.execute(
            "DELETE FROM ef_subscription_members WHERE subscription = $1 AND expires_at <= $2",
            &[&subscription, &now],
        )
        .await
        .map_err(&fail)?;
        let members = tx
            .query(
                "SELECT member FROM ef_subscription_members WHERE subscription = $1 \
                 ORDER BY member COLLATE \"C\"",
                &[&subscription],
            )
            .await
            .map_err(&fail)?
            .iter()
            .map(|row| row.get(0))
            .collect();
        tx.commit().await.map_err(&fail)?;
        Ok(members)
    }

    async fn leave(&self, subscription: &str, member: &str) -> Result<()> {
        check_field(subscription, "the subscription name")?;
        check_field(member, "the member id")?;
        let fail = fail("removing a member");
        let mut client = self.lease_client("removing a member").await?;
        let tx = client.transaction().await.map_err(&fail)?;
        tx.execute(
            "DELETE FROM ef_subscription_members WHERE subscription = $1 AND member = $2",
            &[&subscription, &member],
        )
        .await
        .map_err(&fail)?;
        tx.execute(
            "UPDATE ef_segment_leases SET owner = NULL, expires_at = NULL \
             WHERE subscription = $1 AND owner = $2",
            &[&subscription, &member],
        )
        .await
        .map_err(&fail)?;
        tx.commit().await.map_err(&fail)
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
        check_field(subscription, "the subscription name")?;
        check_field(member, "the member id")?;
        let fail = fail("claiming segments");
        let mismatch = |stored: i32| Error::SegmentCountMismatch {
            subscription: subscription.to_owned(),
            stored: stored as u32,
            requested: segments,
        };
        let mut client = self.lease_client("claiming segments").await?;
        // The common case: the count is stored. Claims share the subscription's row.
        {
            let tx = client.transaction().await.map_err(&fail)?;
            let stored = tx
                .query_opt(
                    "SELECT segments FROM ef_lease_subscriptions WHERE subscription = $1 \
                     FOR SHARE",
                    &[&subscription],
                )
                .await
                .map_err(&fail)?
                .map(|row| row.get::<_, i32>(0));
            match stored {
                Some(count) if count == segments as i32 => {
                    let taken = take_free(&tx, subscription, member, segments, max, ttl).await?;
                    tx.commit().await.map_err(&fail)?;
                    return Ok(taken);
                }
                Some(count) if count != 0 => return Err(mismatch(count)),
                _ => {}
            }
            // Dropped: rolled back, so the row can be locked for update without a
            // share lock of ours in the way.
        }
        // First use, or after a reset: store the count under the row's update lock.
        let tx = client.transaction().await.map_err(&fail)?;
        tx.execute(
            "INSERT INTO ef_lease_subscriptions (subscription, segments, epoch_floor) \
             VALUES ($1, 0, 0) ON CONFLICT (subscription) DO NOTHING",
            &[&subscription],
        )
        .await
        .map_err(&fail)?;
        let row = tx
            .query_one(
                "SELECT segments, epoch_floor FROM ef_lease_subscriptions \
                 WHERE subscription = $1 FOR UPDATE",
                &[&subscription],
            )
            .await
            .map_err(&fail)?;
        let (count, floor): (i32, i64) = (row.get(0), row.get(1));
        if count == 0 {
            create(&tx, subscription, segments, floor).await?;
        } else if count != segments as i32 {
            return Err(mismatch(count));
        }
        let taken = take_free(&tx, subscription, member, segments, max, ttl).await?;
        tx.commit().await.map_err(&fail)?;
        Ok(taken)
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
        let fail = fail("renewing segment leases");
        let client = self.lease_client("renewing segment leases").await?;
        // One statement per lease, each its own transaction: no renewal holds one row
        // while it waits for another.
        let statement = client
            .prepare_cached(
                "UPDATE ef_segment_leases \
                 SET expires_at = (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + $6 \
                 WHERE subscription = $1 AND segment = $2 AND segments = $3 AND owner = $4 \
                 AND epoch = $5 RETURNING expires_at",
            )
            .await
            .map_err(&fail)?;
        let mut renewed = Vec::new();
        for lease in leases {
            let row = client
                .query_opt(
                    &statement,
                    &[
                        &lease.subscription,
                        &(lease.segment as i32),
                        &(lease.segments as i32),
                        &lease.owner,
                        &to_i64(lease.epoch),
                        &micros(ttl),
                    ],
                )
                .await
                .map_err(&fail)?;
            if let Some(row) = row {
                renewed.push(SegmentLease {
                    expires_at: time(row.get(0)),
                    ..lease.clone()
                });
            }
        }
        Ok(renewed)
    }

    async fn release_leases(&self, leases: &[SegmentLease]) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let fail = fail("releasing segment leases");
        let client = self.lease_client("releasing segment leases").await?;
        let statement = client
            .prepare_cached(
                "UPDATE ef_segment_leases SET owner = NULL, expires_at = NULL \
                 WHERE subscription = $1 AND segment = $2 AND segments = $3 AND owner = $4 \
                 AND epoch = $5",
            )
            .await
            .map_err(&fail)?;
        for lease in leases {
            client
                .execute(
                    &statement,
                    &[
                        &lease.subscription,
                        &(lease.segment as i32),
                        &(lease.segments as i32),
                        &lease.owner,
                        &to_i64(lease.epoch),
                    ],
                )
                .await
                .map_err(&fail)?;
        }
        Ok(())
    }

    async fn save_segment_checkpoint(&self, lease: &SegmentLease, position: u64) -> Result<()> {
        let fail = fail("saving a segment checkpoint");
        let mut client = self.client("saving a segment checkpoint").await?;
        let tx = client.transaction().await.map_err(&fail)?;
        let held = tx
            .query_opt(
                "SELECT 1 FROM ef_segment_leases WHERE subscription = $1 AND segment = $2 \
                 AND segments = $3 AND owner = $4 AND epoch = $5 FOR SHARE",
                &[
                    &lease.subscription,
                    &(lease.segment as i32),
                    &(lease.segments as i32),
                    &lease.owner,
                    &to_i64(lease.epoch),
                ],
            )
            .await
            .map_err(&fail)?
            .is_some();
        if !held {
            return Err(Error::LeaseLost {
                subscription: lease.subscription.clone(),
                segment: lease.segment,
                epoch: lease.epoch,
            });
        }
        let now = now(&tx).await?.saturating_mul(1000);
        tx.execute(
            "INSERT INTO ef_checkpoints (subscription, position, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (subscription) DO UPDATE SET \
             position = GREATEST(ef_checkpoints.position, excluded.position), \
             updated_at = excluded.updated_at",
            &[&lease.checkpoint_name(), &to_i64(position), &now],
        )
        .await
        .map_err(&fail)?;
        tx.commit().await.map_err(&fail)
    }

    async fn segment_states(&self, subscription: &str) -> Result<Vec<SegmentState>> {
        let fail = fail("reading segment states");
        let client = self.client("reading segment states").await?;
        let rows = client
            .query(
                "SELECT l.segment, l.segments, l.owner, l.epoch, l.expires_at, c.position, \
                 (extract(epoch FROM clock_timestamp()) * 1000000)::bigint \
                 FROM ef_segment_leases AS l LEFT JOIN ef_checkpoints AS c ON c.subscription = \
                 CASE WHEN l.segments = 1 THEN l.subscription \
                 ELSE l.subscription || '#' || l.segment || '/' || l.segments END \
                 WHERE l.subscription = $1 ORDER BY l.segment",
                &[&subscription],
            )
            .await
            .map_err(&fail)?;
        Ok(rows
            .iter()
            .map(|row| {
                let expires_at: Option<i64> = row.get(4);
                let now: i64 = row.get(6);
                let live = expires_at.is_some_and(|at| at > now);
                SegmentState {
                    segment: row.get::<_, i32>(0) as u32,
                    segments: row.get::<_, i32>(1) as u32,
                    owner: row.get::<_, Option<String>>(2).filter(|_| live),
                    epoch: to_u64(row.get(3)),
                    expires_at: expires_at.map(time),
                    checkpoint: row.get::<_, Option<i64>>(5).map_or(0, to_u64),
                }
            })
            .collect())
    }

    async fn reset_segments(&self, subscription: &str, position: u64) -> Result<()> {
        check_field(subscription, "the subscription name")?;
        let fail = fail("resetting a subscription's segments");
        let mut client = self.client("resetting a subscription's segments").await?;
        let tx = client.transaction().await.map_err(&fail)?;
        let stored = tx
            .query_opt(
                "SELECT segments, epoch_floor FROM ef_lease_subscriptions \
                 WHERE subscription = $1 FOR UPDATE",
                &[&subscription],
            )
            .await
            .map_err(&fail)?
            .map(|row| (row.get::<_, i32>(0), row.get::<_, i64>(1)));
        let now = now(&tx).await?;
        if let Some((segments, floor)) = stored {
            let rows = tx
                .query(
                    "SELECT owner IS NOT NULL AND expires_at > $2, epoch FROM ef_segment_leases \
                     WHERE subscription = $1 ORDER BY segment FOR UPDATE",
                    &[&subscription, &now],
                )
                .await
                .map_err(&fail)?;
            if rows.iter().any(|row| row.get::<_, bool>(0)) {
                return Err(Error::SubscriptionRunning {
                    name: subscription.to_owned(),
                });
            }
            let highest = rows.iter().map(|row| row.get::<_, i64>(1)).max();
            let floor = highest.unwrap_or(0).max(floor);
            if segments > 1 {
                tx.execute(
                    "DELETE FROM ef_checkpoints WHERE subscription IN \
                     (SELECT $1 || '#' || s || '/' || $2 FROM generate_series(0, $2 - 1) AS s)",
                    &[&subscription, &segments],
                )
                .await
                .map_err(&fail)?;
            }
            tx.execute(
                "DELETE FROM ef_segment_leases WHERE subscription = $1",
                &[&subscription],
            )
            .await
            .map_err(&fail)?;
            tx.execute(
                "UPDATE ef_lease_subscriptions SET segments = 0, epoch_floor = $2 \
                 WHERE subscription = $1",
                &[&subscription, &floor],
            )
            .await
            .map_err(&fail)?;
        }
        tx.execute(
            "INSERT INTO ef_checkpoints (subscription, position, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (subscription) DO UPDATE SET \
             position = excluded.position, updated_at = excluded.updated_at",
            &[&subscription, &to_i64(position), &now.saturating_mul(1000)],
        )
        .await
        .map_err(&fail)?;
        tx.commit().await.map_err(&fail)
    }
}
