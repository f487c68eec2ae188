//! The segment leases of the store contract ([`LeaseStore`]).
//!
//! Temporary: every method returns [`Error::Unsupported`] until the lease tables land.

use std::time::Duration;

use async_trait::async_trait;
use eventfold_core::lease::{LeaseStore, SegmentLease, SegmentState};
use eventfold_core::{Error, Result};

use crate::PostgresEventStore;

fn unsupported(operation: &str) -> Error {
    Error::Unsupported {
        operation: operation.to_owned(),
        store: "PostgresEventStore".to_owned(),
    }
}

#[async_trait]
impl LeaseStore for PostgresEventStore {
    async fn heartbeat(&self, _: &str, _: &str, _: Duration) -> Result<Vec<String>> {
        Err(unsupported("segment membership"))
    }

    async fn leave(&self, _: &str, _: &str) -> Result<()> {
        Err(unsupported("segment membership"))
    }

    async fn claim_segments(
        &self,
        _: &str,
        _: &str,
        _: u32,
        _: u32,
        _: Duration,
    ) -> Result<Vec<SegmentLease>> {
        Err(unsupported("segment leases"))
    }

    async fn renew_leases(&self, _: &[SegmentLease], _: Duration) -> Result<Vec<SegmentLease>> {
        Err(unsupported("segment leases"))
    }

    async fn release_leases(&self, _: &[SegmentLease]) -> Result<()> {
        Err(unsupported("segment leases"))
    }

    async fn save_segment_checkpoint(&self, _: &SegmentLease, _: u64) -> Result<()> {
        Err(unsupported("segment leases"))
    }

    async fn segment_states(&self, _: &str) -> Result<Vec<SegmentState>> {
        Err(unsupported("segment leases"))
    }

    async fn reset_segments(&self, _: &str, _: u64) -> Result<()> {
        Err(unsupported("segment leases"))
    }
}
