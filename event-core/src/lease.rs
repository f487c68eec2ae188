//! Segment leases: how several processes share one subscription.
//!
//! A subscription may be split into `S` segments ([`MAX_SEGMENTS`] at most): every stream
//! belongs to segment [`segment_of`]`(stream, S)`, a stable hash of its id, so all events of
//! one aggregate go to one segment and keep their order there. Processes (members) claim
//! segment leases in the store with [`LeaseStore::claim_segments`], renew them before they
//! expire, and save each segment's checkpoint with
//! [`LeaseStore::save_segment_checkpoint`], which the store refuses once the lease is
//! lost: every claim raises the segment's epoch by one, and the epoch is the fencing token
//! a save is checked against in the same transaction. A member that dies stops renewing,
//! its leases expire, and the others claim its segments with a higher epoch.
//!
//! `S = 1` is one active instance with standbys; its checkpoint is the subscription's plain
//! checkpoint ([`segment_checkpoint_name`]), so a subscription that never used segments goes
//! on from where it was.
//!
//! Times (expiry, liveness) are the store's clock: the system clock of the process for the
//! in-memory and SQLite stores, the server's for PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::record::StreamId;

/// The most segments a subscription may have.
pub const MAX_SEGMENTS: u32 = 1024;

/// The lease time a member asks for unless configured otherwise: a dead member's segments
/// are taken over at most this long after its last renewal.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The longest lease time a store accepts (a day); longer ones are
/// [`Error::InvalidLeaseTtl`].
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The partition hash of a stream: FNV-1a (32 bits) over the aggregate type's UTF-8 bytes,
/// one `0xFF` byte (which no UTF-8 text contains, so `("ab", "c")` and `("a", "bc")`
/// differ), then the aggregate id's bytes.
///
/// It is part of the storage format and never changes: stores may keep it with each event,
/// and a segment's events are those whose hash modulo the segment count is its number.
///
/// ```
/// use eventfold_core::StreamId;
/// use eventfold_core::lease::partition_hash;
///
/// assert_eq!(partition_hash(&StreamId::new("Account", "a-1")), 2_904_344_074);
/// ```
pub fn partition_hash(stream: &StreamId) -> u32 {
    const OFFSET: u32 = 0x811c_9dc5;
    const PRIME: u32 = 0x0100_0193;
    let step = |hash: u32, byte: u8| (hash ^ u32::from(byte)).wrapping_mul(PRIME);
    let hash = stream.aggregate_type.bytes().fold(OFFSET, step);
    let hash = step(hash, 0xFF);
    stream.aggregate_id.bytes().fold(hash, step)
}

/// The segment (`0..segments`) a stream belongs to: [`partition_hash`] modulo `segments`.
/// A count of 0 is taken as 1 (everything in segment 0); stores refuse such counts with
/// [`Error::InvalidSegments`] before any stream is routed.
pub fn segment_of(stream: &StreamId, segments: u32) -> u32 {
    partition_hash(stream) % segments.max(1)
}

/// The name a segment's checkpoint is saved under, in the same keyspace as
/// [`SubscriptionStore::load_checkpoint`](crate::SubscriptionStore::load_checkpoint): for
/// one segment the subscription's own name (so a subscription, its reset and the tools keep
/// working as before segments), otherwise `"{subscription}#{segment}/{segments}"`.
///
/// ```
/// use eventfold_core::lease::segment_checkpoint_name;
///
/// assert_eq!(segment_checkpoint_name("positions", 0, 1), "positions");
/// assert_eq!(segment_checkpoint_name("positions", 3, 16), "positions#3/16");
/// ```
pub fn segment_checkpoint_name(subscription: &str, segment: u32, segments: u32) -> String {
    if segments <= 1 {
        subscription.to_owned()
    } else {
        format!("{subscription}#{segment}/{segments}")
    }
}

/// [`Error::InvalidSegments`] unless `1 <= segments <= MAX_SEGMENTS`.
pub fn check_segments(segments: u32) -> Result<()> {
    if segments == 0 || segments > MAX_SEGMENTS {
        return Err(Error::InvalidSegments { segments });
    }
    Ok(())
}

/// [`Error::InvalidLeaseTtl`] unless `0 < ttl <= MAX_LEASE_TTL`; the ttl as a chrono
/// duration otherwise.
pub fn check_ttl(ttl: Duration) -> Result<chrono::Duration> {
    if ttl.is_zero() || ttl > MAX_LEASE_TTL {
        return Err(Error::InvalidLeaseTtl { ttl });
    }
    chrono::Duration::from_std(ttl).map_err(|_| Error::InvalidLeaseTtl { ttl })
}

/// A lease on one segment of a subscription, as [`LeaseStore::claim_segments`] hands it
/// out and [`LeaseStore::renew_leases`] extends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLease {
    /// The subscription.
    pub subscription: String,
    /// The segment's number, `0..segments`.
    pub segment: u32,
    /// The subscription's segment count.
    pub segments: u32,
    /// The member holding it.
    pub owner: String,
    /// The fencing token: the segment's epoch when this lease was claimed. Every claim
    /// raises it, so a lease from before a takeover has a lower one and its saves are
    /// refused.
    pub epoch: u64,
    /// When it expires unless renewed (the store's clock).
    pub expires_at: DateTime<Utc>,
    /// The segment's stored checkpoint when claimed (0 = none).
    pub checkpoint: u64,
}

impl SegmentLease {
    /// The name its checkpoint is saved under ([`segment_checkpoint_name`]).
    pub fn checkpoint_name(&self) -> String {
        segment_checkpoint_name(&self.subscription, self.segment, self.segments)
    }
}

/// One segment of a subscription as [`LeaseStore::segment_states`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentState {
    /// The segment's number, `0..segments`.
    pub segment: u32,
    /// The subscription's segment count.
    pub segments: u32,
    /// The member holding a live lease on it; `None` when it is free (never leased,
    /// released, or expired).
    pub owner: Option<String>,
    /// Its epoch: how many times it was claimed (plus the epochs before a reset).
    pub epoch: u64,
    /// When its last lease expires or expired; `None` if never leased or released.
    pub expires_at: Option<DateTime<Utc>>,
    /// Its stored checkpoint (0 = none).
    pub checkpoint: u64,
}

/// Segment leases and the members of a subscription: the part of the store contract that
/// lets several processes share a subscription. Every [`EventStore`](crate::EventStore)
/// implements it; the conformance suite's
/// `lease_conformance_tests!` (feature `testing`) checks it.
///
/// Times are the store's clock. A ttl must be in `(0, MAX_LEASE_TTL]`, else
/// [`Error::InvalidLeaseTtl`].
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// `member` is alive for `ttl` from now (store's clock). Returns the live members of the
    /// subscription (expiry in the future), ids sorted, itself included.
    async fn heartbeat(
        &self,
        subscription: &str,
        member: &str,
        ttl: Duration,
    ) -> Result<Vec<String>>;

    /// `member` leaves: its membership row goes and every lease it holds is released.
    async fn leave(&self, subscription: &str, member: &str) -> Result<()>;

    /// Takes up to `max` segments that are free (never leased, released, or expired),
    /// lowest number first, for `member` until now+ttl; each taken segment's epoch goes up
    /// by one (the fencing token). Creates the subscription's `segments` rows on first use
    /// (each segment then starts from the subscription's plain checkpoint, if it has one and
    /// `segments > 1`; otherwise a segment has no checkpoint until its first save, which a
    /// bus starting at the end relies on); [`Error::SegmentCountMismatch`] if another count is stored;
    /// [`Error::InvalidSegments`] if segments is 0 or > [`MAX_SEGMENTS`]. Segments `member`
    /// already holds are not returned. Atomic: two members racing never both get a segment.
    async fn claim_segments(
        &self,
        subscription: &str,
        member: &str,
        segments: u32,
        max: u32,
        ttl: Duration,
    ) -> Result<Vec<SegmentLease>>;

    /// Extends the leases still held (same owner and epoch; an expired lease nobody took
    /// over counts as held) to now+ttl; returns the renewed ones (new `expires_at`); lost
    /// ones are absent.
    async fn renew_leases(
        &self,
        leases: &[SegmentLease],
        ttl: Duration,
    ) -> Result<Vec<SegmentLease>>;

    /// Gives leases up (owner cleared) if still held with that epoch; others are ignored.
    async fn release_leases(&self, leases: &[SegmentLease]) -> Result<()>;

    /// Saves the segment's checkpoint (under [`segment_checkpoint_name`]) only if the lease
    /// is still held with its epoch (as [`renew_leases`](Self::renew_leases) decides), in
    /// one transaction with that check: else [`Error::LeaseLost`] and nothing changes. A
    /// checkpoint never moves backwards here: a lower position than the stored one leaves
    /// it.
    async fn save_segment_checkpoint(&self, lease: &SegmentLease, position: u64) -> Result<()>;

    /// Every segment of the subscription by number, with its checkpoint; empty if it was
    /// never leased (or reset since).
    async fn segment_states(&self, subscription: &str) -> Result<Vec<SegmentState>>;

    /// Resets the subscription to `position`: [`Error::SubscriptionRunning`] if a live
    /// (unexpired) lease exists; otherwise removes the checkpoints of its stored segment
    /// count, forgets that count (so a later claim may choose another count) and sets its
    /// plain checkpoint to `position`, which every segment of the next claim starts from.
    /// Epochs keep rising across a reset, so a lease from before it stays lost.
    async fn reset_segments(&self, subscription: &str, position: u64) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_partition_hash_is_fnv1a_over_type_separator_and_id() {
        assert_eq!(partition_hash(&StreamId::new("", "")), 2_047_574_606);
        assert_eq!(
            partition_hash(&StreamId::new("Account", "a-1")),
            2_904_344_074
        );
        assert_eq!(partition_hash(&StreamId::new("Order", "42")), 1_176_962_946);
        assert_eq!(partition_hash(&StreamId::new("Tested", "x")), 2_815_464_291);
        // The separator keeps the boundary between type and id.
        assert_ne!(
            partition_hash(&StreamId::new("ab", "c")),
            partition_hash(&StreamId::new("a", "bc"))
        );
    }

    #[test]
    fn segments_are_the_hash_modulo_the_count() {
        let stream = StreamId::new("Account", "a-1");
        assert_eq!(segment_of(&stream, 16), 10);
        assert_eq!(segment_of(&stream, 1), 0);
        assert_eq!(segment_of(&stream, 0), 0);
        let spread: std::collections::BTreeSet<u32> = (0..1000)
            .map(|i| segment_of(&StreamId::new("Account", format!("a-{i}")), 16))
            .collect();
        assert_eq!(
            spread.len(),
            16,
            "1,000 streams reach every one of 16 segments"
        );
    }

    #[test]
    fn checkpoint_names_keep_one_segment_plain() {
        assert_eq!(segment_checkpoint_name("s", 0, 1), "s");
        assert_eq!(segment_checkpoint_name("s", 0, 2), "s#0/2");
        assert_eq!(segment_checkpoint_name("s", 1023, 1024), "s#1023/1024");
    }

    #[test]
    fn counts_and_ttls_out_of_range_are_refused() {
        assert!(matches!(
            check_segments(0),
            Err(Error::InvalidSegments { segments: 0 })
        ));
        assert!(matches!(
            check_segments(MAX_SEGMENTS + 1),
            Err(Error::InvalidSegments { segments: 1025 })
        ));
        assert!(check_segments(1).is_ok() && check_segments(MAX_SEGMENTS).is_ok());
        assert!(matches!(
            check_ttl(Duration::ZERO),
            Err(Error::InvalidLeaseTtl { .. })
        ));
        assert!(matches!(
            check_ttl(MAX_LEASE_TTL + Duration::from_secs(1)),
            Err(Error::InvalidLeaseTtl { .. })
        ));
        assert_eq!(
            check_ttl(DEFAULT_LEASE_TTL).unwrap(),
            chrono::Duration::seconds(10)
        );
    }
}
