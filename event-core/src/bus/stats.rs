//! The bus's counters and latency histograms, and the serializable snapshot of them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the bus has done, as [`EventBus::statistics`](crate::EventBus::statistics) reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BusStatistics {
    /// Events accepted by `publish` and its kin.
    pub published: u64,
    /// Successful handler calls.
    pub delivered: u64,
    /// Failed handler attempts (errors and panics).
    pub failed: u64,
    /// Attempts scheduled again after a failure.
    pub retried: u64,
    /// Deliveries given up and stored as dead letters.
    pub dead_lettered: u64,
    /// Events accepted but not yet handled by every subscription (with a store: the
    /// backlog behind the slowest subscription).
    pub queue_depth: u64,
    /// The queue's capacity.
    pub queue_capacity: u64,
    /// Events the bus holds in memory (accepted or read, not yet done); never above the
    /// capacity, but for what handlers publish into their own full bus.
    pub in_flight: u64,
    /// Deliveries waiting behind a busy lane (a retry or a slow handler of the same
    /// subscription and aggregate) outside the queue's capacity.
    pub waiting: u64,
    /// Times a worker's loop was restarted after a panic that escaped it (a handler's
    /// panic is a failed attempt and never counts here); the worker goes on with its
    /// deliveries, and the one it held counts as a failed attempt.
    pub worker_restarts: u64,
    /// Each subscription's figures, in priority order.
    pub subscriptions: Vec<SubscriptionStatistics>,
}

/// One subscription's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionStatistics {
    /// Its stable name.
    pub name: String,
    /// Its priority (lower runs first).
    pub priority: i32,
    /// Successful handler calls.
    pub delivered: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Attempts scheduled again after a failure.
    pub retried: u64,
    /// Deliveries stored as dead letters.
    pub dead_lettered: u64,
    /// Stored events of an unregistered type that it passed over
    /// ([`UnknownEventPolicy::Skip`](crate::UnknownEventPolicy::Skip)).
    pub skipped: u64,
    /// The last position it has fully handled (with a store; `None` before its first).
    /// With segments: the lowest checkpoint of the segments this bus holds, or, holding
    /// none, of all its segments as stored.
    pub checkpoint: Option<u64>,
    /// How many segments it is split into (1 unless set with
    /// [`SubscriptionBuilder::segments`](crate::SubscriptionBuilder::segments)).
    pub segments: u32,
    /// The segments this bus runs, by number: with a store, those whose lease it holds
    /// (none while another bus runs them, or before its first claim); without one, all.
    pub held_segments: Vec<u32>,
    /// Events behind the head of the log (with a store) or waiting for it (without).
    pub lag: u64,
    /// Median handler latency, in microseconds (bucket upper bound, within 19%).
    pub latency_p50_micros: u64,
    /// 99th percentile handler latency, in microseconds.
    pub latency_p99_micros: u64,
}

/// Counters of the whole bus or one subscription.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) worker_restarts: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
}

/// Sub-buckets per power of two; 4 keeps every bucket within 19% of its values.
const SUB: u32 = 4;
const LINEAR: u64 = 16;
const BUCKETS: usize = (LINEAR as usize) + (64 - 4) * SUB as usize;

/// A log-linear histogram of microseconds with atomic buckets: recording is one
/// `fetch_add`, and it never allocates.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("p50", &self.percentile(0.5))
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let sub = (v >> (msb - 2)) & (SUB as u64 - 1);
    LINEAR as usize + ((msb - 4) * SUB) as usize + sub as usize
}

fn upper_bound(bucket: usize) -> u64 {
    if bucket < LINEAR as usize {
        return bucket as u64;
    }
    let i = bucket - LINEAR as usize;
    let msb = (i / SUB as usize) as u32 + 4;
    let sub = (i % SUB as usize) as u64;
    let low = (1u64 << msb) | (sub << (msb - 2));
    low + ((1u64 << (msb - 2)) - 1)
}

impl Histogram {
    pub(crate) fn record(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(micros)].fetch_add(1, Relaxed);
    }

    /// The upper bound of the bucket holding the `q` quantile (0 when empty).
    pub(crate) fn percentile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return upper_bound(bucket);
            }
        }
        upper_bound(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_whose_bound_is_close_above_it() {
        for v in (0..20_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let bound = upper_bound(bucket_of(v));
            assert!(bound >= v, "{v} above its bucket bound {bound}");
            assert!(
                bound as f64 <= (v as f64) * 1.25 + 1.0,
                "{v}: bound {bound} too far"
            );
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_values() {
        let h = Histogram::default();
        assert_eq!(h.percentile(0.5), 0);
        for micros in 1..=100 {
            h.record(Duration::from_micros(micros));
        }
        let p50 = h.percentile(0.5);
        let p99 = h.percentile(0.99);
        assert!((50..=60).contains(&p50), "p50 {p50}");
        assert!((99..=120).contains(&p99), "p99 {p99}");
    }
}
