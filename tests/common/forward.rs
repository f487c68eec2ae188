//! `forward_lease_store!`: a test store that wraps another (to inject a fault into one
//! part of the contract) hands the segment leases, which it leaves alone, to the store it
//! wraps. Kept apart from `common/mod.rs`, which registers events, so any test may use it.

/// Implements `LeaseStore` for `$wrapper` by calling the same method on `self.$inner`.
macro_rules! forward_lease_store {
    ($wrapper:ty => $inner:ident) => {
        #[async_trait::async_trait]
        impl eventfold::backend::LeaseStore for $wrapper {
            async fn heartbeat(
                &self,
                subscription: &str,
                member: &str,
                ttl: std::time::Duration,
            ) -> eventfold::Result<Vec<String>> {
                self.$inner.heartbeat(subscription, member, ttl).await
            }

            async fn leave(&self, subscription: &str, member: &str) -> eventfold::Result<()> {
                self.$inner.leave(subscription, member).await
            }

            async fn claim_segments(
                &self,
                subscription: &str,
                member: &str,
                segments: u32,
                max: u32,
                ttl: std::time::Duration,
            ) -> eventfold::Result<Vec<eventfold::backend::SegmentLease>> {
                self.$inner
                    .claim_segments(subscription, member, segments, max, ttl)
                    .await
            }

            async fn renew_leases(
                &self,
                leases: &[eventfold::backend::SegmentLease],
                ttl: std::time::Duration,
            ) -> eventfold::Result<Vec<eventfold::backend::SegmentLease>> {
                self.$inner.renew_leases(leases, ttl).await
            }

            async fn release_leases(
                &self,
                leases: &[eventfold::backend::SegmentLease],
            ) -> eventfold::Result<()> {
                self.$inner.release_leases(leases).await
            }

            async fn save_segment_checkpoint(
                &self,
                lease: &eventfold::backend::SegmentLease,
                position: u64,
            ) -> eventfold::Result<()> {
                self.$inner.save_segment_checkpoint(lease, position).await
            }

            async fn segment_states(
                &self,
                subscription: &str,
            ) -> eventfold::Result<Vec<eventfold::backend::SegmentState>> {
                self.$inner.segment_states(subscription).await
            }

            async fn reset_segments(
                &self,
                subscription: &str,
                position: u64,
            ) -> eventfold::Result<()> {
                self.$inner.reset_segments(subscription, position).await
            }
        }
    };
}
