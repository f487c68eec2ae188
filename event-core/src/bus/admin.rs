//! What operators use: statistics, failure records and dead letters.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::deliver;
use super::handler::EventSource;
use super::records::Records;
use super::{BusStatistics, EventBus, SubscriptionStatistics};
use crate::error::{Error, Result};
use crate::record::{DeadLetter, FailureRecord, RecordedEvent};

impl EventBus {
    /// What the bus has done, and each subscription's progress.
    pub async fn statistics(&self) -> Result<BusStatistics> {
        let engine = &self.inner.engine;
        let routing = Arc::clone(&engine.routing.borrow());
        let head = match &engine.store {
            Some(store) => Some(store.head_position().await?),
            None => None,
        };
        let checkpoints: Vec<Option<u64>> = {
            let tracker = engine.lock_tracker();
            routing
                .subs
                .iter()
                .map(|s| tracker.checkpoint(s.index))
                .collect()
        };
        let mut subscriptions = Vec::new();
        for (sub, checkpoint) in routing.subs.iter().zip(checkpoints) {
            let checkpoint = match (&engine.store, checkpoint) {
                (Some(store), None) => store.load_checkpoint(&sub.name).await?,
                (_, checkpoint) => checkpoint,
            };
            let lag = match head {
                Some(head) => head.saturating_sub(checkpoint.unwrap_or(0)),
                None => sub.queued.load(Ordering::Relaxed),
            };
            subscriptions.push(SubscriptionStatistics {
                name: sub.name.to_string(),
                priority: sub.priority,
                delivered: sub.counters.delivered.load(Ordering::Relaxed),
                failed: sub.counters.failed.load(Ordering::Relaxed),
                retried: sub.counters.retried.load(Ordering::Relaxed),
                dead_lettered: sub.counters.dead_lettered.load(Ordering::Relaxed),
                skipped: sub.counters.skipped.load(Ordering::Relaxed),
                checkpoint,
                lag,
                latency_p50_micros: sub.latency.percentile(0.50),
                latency_p99_micros: sub.latency.percentile(0.99),
            });
        }
        let queue_depth = match head {
            Some(_) => subscriptions.iter().map(|s| s.lag).max().unwrap_or(0),
            None => engine.room.in_flight(),
        };
        Ok(BusStatistics {
            published: engine.published.load(Ordering::Relaxed),
            delivered: engine.counters.delivered.load(Ordering::Relaxed),
            failed: engine.counters.failed.load(Ordering::Relaxed),
            retried: engine.counters.retried.load(Ordering::Relaxed),
            dead_lettered: engine.counters.dead_lettered.load(Ordering::Relaxed),
            queue_depth,
            queue_capacity: engine.room.capacity() as u64,
            in_flight: engine.room.in_flight(),
            waiting: engine.room.waiting(),
            worker_restarts: engine.counters.worker_restarts.load(Ordering::Relaxed),
            subscriptions,
        })
    }

    /// Dead letters, oldest first; one subscription's when `subscription` is given.
    pub async fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        self.inner.engine.records.dead_letters(subscription).await
    }

    /// Failed attempts recorded for a subscription, at most `limit`: on a bus without a
    /// store the newest first, at most its `failure_retention`; with a store, as the store
    /// lists them.
    pub async fn failures(&self, subscription: &str, limit: usize) -> Result<Vec<FailureRecord>> {
        self.inner
            .engine
            .records
            .failures(subscription, limit)
            .await
    }

    /// Delivers a dead letter's event to its subscription once more, now, in the calling
    /// task. On success the dead letter is removed; on failure it is kept, the attempt is
    /// recorded, and [`Error::HandlerFailed`] says why.
    pub async fn replay_dead_letter(&self, id: u64) -> Result<()> {
        let engine = &self.inner.engine;
        let dead_letter = self.find_dead_letter(id).await?;
        let sub = {
            let subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter()
                .find(|s| *s.name == *dead_letter.subscription)
                .cloned()
                .ok_or_else(|| Error::UnknownSubscription {
                    name: dead_letter.subscription.clone(),
                })?
        };
        let record = self.dead_letter_event(&dead_letter).await?;
        let event = EventSource::Stored(Arc::new(record));
        let record = event.record();
        let attempt = dead_letter.attempts + 1;
        let outcome = deliver::begin(engine.id(), &sub, &event, attempt).await;
        let failure = match outcome.result {
            Ok(()) => {
                deliver::delivered(engine, &sub, outcome.elapsed);
                engine.records.remove_dead_letter(id).await?;
                return Ok(());
            }
            Err(failure) => failure,
        };
        let (failure, _) =
            deliver::failed(engine, &sub, record, attempt, failure, outcome.elapsed).await;
        Err(Error::HandlerFailed {
            subscription: sub.name.to_string(),
            event_id: record.event_id,
            message: failure.message,
        })
    }

    /// The event of a dead letter: kept beside it without a store; in the store by its id,
    /// or by its position for a row that could not be read (its id is nil), which fails
    /// again with the store's error while the row stays damaged.
    async fn dead_letter_event(&self, dead_letter: &DeadLetter) -> Result<RecordedEvent> {
        let engine = &self.inner.engine;
        let missing = || Error::Store {
            kind: crate::error::StoreErrorKind::Other,
            message: format!(
                "event {} of dead letter {} is not stored",
                dead_letter.event_id, dead_letter.id
            ),
            source: None,
        };
        let Records::Store(store) = &engine.records else {
            return engine
                .records
                .kept_event(dead_letter.event_id)
                .ok_or_else(missing);
        };
        if dead_letter.event_id.is_nil() {
            return store
                .read_all(dead_letter.position, 1)
                .await?
                .into_iter()
                .find(|e| e.position == dead_letter.position)
                .ok_or_else(missing);
        }
        store.get(dead_letter.event_id).await?.ok_or_else(missing)
    }

    /// Removes a dead letter without delivering it.
    pub async fn discard_dead_letter(&self, id: u64) -> Result<()> {
        if self.inner.engine.records.remove_dead_letter(id).await? {
            Ok(())
        } else {
            Err(Error::DeadLetterNotFound { id })
        }
    }

    async fn find_dead_letter(&self, id: u64) -> Result<DeadLetter> {
        self.dead_letters(None)
            .await?
            .into_iter()
            .find(|d| d.id == id)
            .ok_or(Error::DeadLetterNotFound { id })
    }
}
