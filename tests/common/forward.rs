//! `forward_lease_store!`, `forward_event_log!`, `forward_snapshot_store!` and
//! `forward_subscription_store!`: a test store that wraps another (to inject a fault into
//! one part of the contract) hands the parts it leaves alone to the store it wraps. Kept apart from `common/mod.rs`, which registers events, so any test may use it.

#[allow(unused_macros)]
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

#[allow(unused_macros)]
/// Implements `EventLog` for `$wrapper` by calling the same method on `self.$inner`.
macro_rules! forward_event_log {
    ($wrapper:ty => $inner:ident) => {
        #[async_trait::async_trait]
        impl eventfold::backend::EventLog for $wrapper {
            async fn append(
                &self,
                stream: &eventfold::StreamId,
                expected: eventfold::ExpectedVersion,
                events: Vec<eventfold::NewEvent>,
            ) -> eventfold::Result<eventfold::AppendOutcome> {
                self.$inner.append(stream, expected, events).await
            }

            async fn read_stream(
                &self,
                stream: &eventfold::StreamId,
                from: u64,
            ) -> eventfold::Result<Vec<eventfold::RecordedEvent>> {
                self.$inner.read_stream(stream, from).await
            }

            async fn read_stream_page(
                &self,
                stream: &eventfold::StreamId,
                from: u64,
                limit: usize,
            ) -> eventfold::Result<Vec<eventfold::RecordedEvent>> {
                self.$inner.read_stream_page(stream, from, limit).await
            }

            async fn read_all(
                &self,
                from: u64,
                limit: usize,
            ) -> eventfold::Result<Vec<eventfold::RecordedEvent>> {
                self.$inner.read_all(from, limit).await
            }

            async fn get(
                &self,
                id: eventfold::backend::Uuid,
            ) -> eventfold::Result<Option<eventfold::RecordedEvent>> {
                self.$inner.get(id).await
            }

            async fn stream_version(&self, stream: &eventfold::StreamId) -> eventfold::Result<u64> {
                self.$inner.stream_version(stream).await
            }

            async fn head_position(&self) -> eventfold::Result<u64> {
                self.$inner.head_position().await
            }

            fn watch_head(&self) -> eventfold::backend::watch::Receiver<u64> {
                self.$inner.watch_head()
            }

            async fn statistics(&self) -> eventfold::Result<eventfold::StoreStatistics> {
                self.$inner.statistics().await
            }
        }
    };
}

#[allow(unused_macros)]
/// Implements `SnapshotStore` for `$wrapper` by calling the same method on `self.$inner`.
macro_rules! forward_snapshot_store {
    ($wrapper:ty => $inner:ident) => {
        #[async_trait::async_trait]
        impl eventfold::backend::SnapshotStore for $wrapper {
            async fn save_snapshot(&self, snapshot: eventfold::Snapshot) -> eventfold::Result<()> {
                self.$inner.save_snapshot(snapshot).await
            }

            async fn load_snapshot(
                &self,
                stream: &eventfold::StreamId,
            ) -> eventfold::Result<Option<eventfold::Snapshot>> {
                self.$inner.load_snapshot(stream).await
            }
        }
    };
}

#[allow(unused_macros)]
/// Implements `SubscriptionStore` for `$wrapper` by calling the same method on
/// `self.$inner`.
macro_rules! forward_subscription_store {
    ($wrapper:ty => $inner:ident) => {
        #[async_trait::async_trait]
        impl eventfold::backend::SubscriptionStore for $wrapper {
            async fn load_checkpoint(&self, name: &str) -> eventfold::Result<Option<u64>> {
                self.$inner.load_checkpoint(name).await
            }

            async fn save_checkpoint(&self, name: &str, position: u64) -> eventfold::Result<()> {
                self.$inner.save_checkpoint(name, position).await
            }

            async fn add_dead_letter(
                &self,
                dead_letter: eventfold::backend::NewDeadLetter,
            ) -> eventfold::Result<u64> {
                self.$inner.add_dead_letter(dead_letter).await
            }

            async fn dead_letters(
                &self,
                name: Option<&str>,
            ) -> eventfold::Result<Vec<eventfold::DeadLetter>> {
                self.$inner.dead_letters(name).await
            }

            async fn remove_dead_letter(&self, id: u64) -> eventfold::Result<bool> {
                self.$inner.remove_dead_letter(id).await
            }

            async fn record_failure(
                &self,
                failure: eventfold::FailureRecord,
                retain: usize,
            ) -> eventfold::Result<()> {
                self.$inner.record_failure(failure, retain).await
            }

            async fn clear_dead_letters(&self, name: Option<&str>) -> eventfold::Result<u64> {
                self.$inner.clear_dead_letters(name).await
            }

            async fn clear_failures(&self, name: Option<&str>) -> eventfold::Result<u64> {
                self.$inner.clear_failures(name).await
            }

            async fn failures(
                &self,
                name: &str,
                limit: usize,
            ) -> eventfold::Result<Vec<eventfold::FailureRecord>> {
                self.$inner.failures(name, limit).await
            }

            async fn request_replay(
                &self,
                target: eventfold::ReplayTarget,
                at: eventfold::backend::DateTime<eventfold::backend::Utc>,
            ) -> eventfold::Result<Vec<eventfold::ReplayRequest>> {
                self.$inner.request_replay(target, at).await
            }

            async fn pending_replay_requests(
                &self,
                name: &str,
            ) -> eventfold::Result<Vec<eventfold::ReplayRequest>> {
                self.$inner.pending_replay_requests(name).await
            }

            async fn replay_requests(
                &self,
                name: Option<&str>,
            ) -> eventfold::Result<Vec<eventfold::ReplayRequest>> {
                self.$inner.replay_requests(name).await
            }

            async fn replay_request(
                &self,
                id: u64,
            ) -> eventfold::Result<Option<eventfold::ReplayRequest>> {
                self.$inner.replay_request(id).await
            }

            async fn finish_replay_request(
                &self,
                id: u64,
                finished: eventfold::FinishedReplay,
                retain: usize,
            ) -> eventfold::Result<bool> {
                self.$inner
                    .finish_replay_request(id, finished, retain)
                    .await
            }
        }
    };
}
