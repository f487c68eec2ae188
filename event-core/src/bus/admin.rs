//! What operators use: statistics, failure records and dead letters.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::deliver;
use super::engine::Engine;
use super::handler::EventSource;
use super::records::Records;
use super::routing::Sub;
use super::{BusStatistics, EventBus, Inner, SubscriptionStatistics};
use crate::error::{Error, Result, StoreErrorKind};
use crate::record::{
    DeadLetter, FailureRecord, FinishedReplay, RecordedEvent, ReplayOutcome, ReplayRequest,
};
use crate::store::DEFAULT_REPLAY_RETENTION;

/// What [`EventBus::replay_dead_letters`] did, counted in dead letters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Delivered successfully, and so removed.
    pub replayed: u64,
    /// Failed again (the attempt is recorded as a failure record), or their event could
    /// not be read: kept.
    pub failed: u64,
    /// Not tried, because an earlier dead letter of the same aggregate in the same
    /// subscription failed: kept, so that aggregate's events stay in order.
    pub held_back: u64,
    /// Not tried, because their subscription is not registered on this bus (only when
    /// every dead letter is replayed): kept.
    pub no_subscription: u64,
}

impl EventBus {
    /// What the bus has done, and each subscription's progress.
    pub async fn statistics(&self) -> Result<BusStatistics> {
        let engine = &self.inner.engine;
        engine.catch_up_metrics();
        let routing = Arc::clone(&engine.routing.borrow());
        let head = match &engine.store {
            Some(store) => Some(store.head_position().await?),
            None => None,
        };
        let held: Vec<(Option<u64>, Vec<u32>)> = {
            let tracker = engine.lock_tracker();
            routing
                .subs
                .iter()
                .map(|s| {
                    let segments = match engine.store {
                        Some(_) => tracker
                            .leases_of(s.index)
                            .iter()
                            .map(|l| l.segment)
                            .collect(),
                        None => (0..s.segments).collect(),
                    };
                    (tracker.lowest_checkpoint(s.index), segments)
                })
                .collect()
        };
        let mut subscriptions = Vec::new();
        for (sub, (checkpoint, held_segments)) in routing.subs.iter().zip(held) {
            let checkpoint = match (&engine.store, checkpoint) {
                (Some(store), None) if sub.segments == 1 => {
                    store.load_checkpoint(&sub.name).await?
                }
                (Some(store), None) => store
                    .segment_states(&sub.name)
                    .await?
                    .iter()
                    .map(|s| s.checkpoint)
                    .min(),
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
                segments: sub.segments,
                held_segments,
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
        let dead_letter = self.find_dead_letter(id).await?;
        let sub = self.subscription(&dead_letter.subscription)?;
        let record = self.dead_letter_event(&dead_letter).await?;
        self.redeliver(&sub, &dead_letter, record).await
    }

    /// Replays the dead letters of one subscription, or every dead letter when
    /// `subscription` is `None`, one after the other in the calling task, in the order of
    /// their events' positions (so each aggregate's events arrive in order), each as
    /// [`replay_dead_letter`](Self::replay_dead_letter) does.
    ///
    /// A failed replay keeps its dead letter and the replay goes on with the next one,
    /// except that the later dead letters of the same aggregate in the same subscription
    /// are then not tried (they are *held back*, and kept), so that aggregate's events are
    /// never delivered out of order. A dead letter whose event cannot be read (damaged or
    /// missing) counts as failed. When every dead letter is replayed, those of
    /// subscriptions not registered on this bus are left as they are. See
    /// [`ReplayReport`] for the counts.
    ///
    /// # Errors
    /// [`Error::UnknownSubscription`] if `subscription` names no subscription of this bus;
    /// a store error other than a damaged or missing event ends the replay with that error
    /// (dead letters replayed until then stay removed).
    pub async fn replay_dead_letters(&self, subscription: Option<&str>) -> Result<ReplayReport> {
        let only = subscription
            .map(|name| self.subscription(name))
            .transpose()?;
        let mut dead = self.dead_letters(subscription).await?;
        // Per aggregate, positions follow its versions; ids need not (a dead letter of an
        // earlier event may have been written later).
        dead.sort_by_key(|d| (d.position, d.id));
        let mut report = ReplayReport::default();
        // (subscription, aggregate type, aggregate id) of the replays that failed.
        let mut failed: HashSet<(Arc<str>, String, String)> = HashSet::new();
        for dead_letter in dead {
            let sub = match &only {
                Some(sub) => Arc::clone(sub),
                None => match self.subscription(&dead_letter.subscription) {
                    Ok(sub) => sub,
                    Err(_) => {
                        report.no_subscription += 1;
                        continue;
                    }
                },
            };
            let record = match self.dead_letter_event(&dead_letter).await {
                Ok(record) => record,
                Err(
                    Error::CorruptEvent { .. }
                    | Error::Store {
                        kind: StoreErrorKind::Corrupt | StoreErrorKind::Other,
                        ..
                    },
                ) => {
                    // Its aggregate is not known, so nothing can be held back behind it.
                    report.failed += 1;
                    continue;
                }
                Err(error) => return Err(error),
            };
            let aggregate = (
                Arc::clone(&sub.name),
                record.aggregate_type.to_string(),
                record.aggregate_id.clone(),
            );
            if failed.contains(&aggregate) {
                report.held_back += 1;
                continue;
            }
            match self.redeliver(&sub, &dead_letter, record).await {
                Ok(()) => report.replayed += 1,
                Err(Error::HandlerFailed { .. }) => {
                    report.failed += 1;
                    failed.insert(aggregate);
                }
                Err(error) => return Err(error),
            }
        }
        Ok(report)
    }

    /// The one delivery of a dead letter's event, shared by the replays: on success the
    /// dead letter is removed, on failure the attempt is recorded and the dead letter kept.
    async fn redeliver(
        &self,
        sub: &Sub,
        dead_letter: &DeadLetter,
        record: RecordedEvent,
    ) -> Result<()> {
        let engine = &self.inner.engine;
        let event = EventSource::Stored(Arc::new(record));
        let record = event.record();
        let attempt = dead_letter.attempts.saturating_add(1);
        let outcome = deliver::begin(engine.id(), sub, &event, attempt, None).await;
        let failure = match outcome.result {
            Ok(()) => {
                deliver::delivered(engine, sub, outcome.elapsed);
                engine.records.remove_dead_letter(dead_letter.id).await?;
                return Ok(());
            }
            Err(failure) => failure,
        };
        let (failure, _) =
            deliver::failed(engine, sub, record, attempt, failure, outcome.elapsed).await;
        Err(Error::HandlerFailed {
            subscription: sub.name.to_string(),
            event_id: record.event_id,
            message: failure.message,
        })
    }

    /// Watches which segments of a subscription this bus runs now, in increasing order:
    /// with a store, those whose lease it holds (a segment joins once the dispatcher took
    /// it up at its checkpoint, and leaves when its lease is lost or given up, or the bus
    /// stops); without one, every segment, always. The same set as
    /// [`SubscriptionStatistics::held_segments`](super::SubscriptionStatistics::held_segments),
    /// without polling: wait for a condition with
    /// [`watch::Receiver::wait_for`](tokio::sync::watch::Receiver::wait_for).
    ///
    /// # Errors
    /// [`Error::UnknownSubscription`] if `subscription` names no subscription of this bus.
    pub fn watch_held_segments(
        &self,
        subscription: &str,
    ) -> Result<tokio::sync::watch::Receiver<Vec<u32>>> {
        Ok(self.subscription(subscription)?.held_watch.subscribe())
    }

    /// The registered subscription of this name.
    fn subscription(&self, name: &str) -> Result<Arc<Sub>> {
        let subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
        subs.iter()
            .find(|s| *s.name == *name)
            .cloned()
            .ok_or_else(|| Error::UnknownSubscription {
                name: name.to_string(),
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

    /// Removes the dead letters of one subscription without delivering them, or every
    /// dead letter when `subscription` is `None`; returns how many were removed. On a bus
    /// without a store, the events kept for them go with them.
    ///
    /// # Errors
    /// [`Error::UnknownSubscription`] if `subscription` names no subscription of this bus.
    pub async fn discard_dead_letters(&self, subscription: Option<&str>) -> Result<u64> {
        if let Some(name) = subscription {
            self.subscription(name)?;
        }
        self.inner
            .engine
            .records
            .clear_dead_letters(subscription)
            .await
    }

    /// Removes the failure records of one subscription, or every failure record when
    /// `subscription` is `None`; returns how many were removed. Dead letters stay.
    ///
    /// # Errors
    /// [`Error::UnknownSubscription`] if `subscription` names no subscription of this bus.
    pub async fn clear_failures(&self, subscription: Option<&str>) -> Result<u64> {
        if let Some(name) = subscription {
            self.subscription(name)?;
        }
        self.inner.engine.records.clear_failures(subscription).await
    }

    /// Carries out, now, the pending replay requests stored in the bus's store
    /// ([`SubscriptionStore::request_replay`](crate::SubscriptionStore::request_replay))
    /// for the subscriptions this bus runs (those whose segment 0 it holds), oldest first,
    /// and records each one's outcome; returns how many it finished. A running bus does
    /// this on its own after each lease round (every third of its
    /// [`lease_ttl`](super::EventBusBuilder::lease_ttl)); this call is for tests and for
    /// an application that wants a request carried out at once.
    ///
    /// A request for one dead letter replays it as
    /// [`replay_dead_letter`](Self::replay_dead_letter) does: done with 1 replayed, or
    /// failed with the reason (the handler's error; or the dead letter is gone, replayed or
    /// discarded since). A request for a subscription replays its dead letters as
    /// [`replay_dead_letters`](Self::replay_dead_letters) does, done with its counts.
    /// Requests of subscriptions this bus does not run stay pending for the bus that runs
    /// them.
    ///
    /// # Errors
    /// A store error (reading the requests, a replay, recording an outcome) ends the pass:
    /// the requests not finished stay pending, and the next pass carries them out (a
    /// request whose replay was done but whose outcome could not be recorded is replayed
    /// again then, which finds the dead letters it removed gone).
    /// [`Error::Unsupported`] if the store keeps no replay requests. Without a store
    /// there are none: `Ok(0)`.
    pub async fn carry_out_replay_requests(&self) -> Result<u64> {
        let engine = &self.inner.engine;
        let Some(store) = &engine.store else {
            return Ok(0);
        };
        let _gate = engine.replay_gate.lock().await;
        let running: Vec<Arc<Sub>> = engine
            .routing
            .borrow()
            .subs
            .iter()
            .filter(|s| s.held.first().is_some_and(|h| h.load(Ordering::Acquire)))
            .cloned()
            .collect();
        let mut finished = 0;
        for sub in running {
            for request in store.pending_replay_requests(&sub.name).await? {
                if *engine.stopping.borrow() {
                    return Ok(finished);
                }
                let outcome = self.carry_out(&request).await?;
                let done = FinishedReplay {
                    at: engine.clock.now(),
                    outcome,
                };
                if store
                    .finish_replay_request(request.id, done, DEFAULT_REPLAY_RETENTION)
                    .await?
                {
                    finished += 1;
                }
            }
        }
        Ok(finished)
    }

    /// Replays what one request asks for; an error only for what a later pass may do
    /// better (a store error other than a damaged or missing event).
    async fn carry_out(&self, request: &ReplayRequest) -> Result<ReplayOutcome> {
        let Some(id) = request.dead_letter else {
            let report = self
                .replay_dead_letters(Some(&request.subscription))
                .await?;
            return Ok(ReplayOutcome::Done {
                replayed: report.replayed,
                failed: report.failed,
                held_back: report.held_back,
            });
        };
        match self.replay_dead_letter(id).await {
            Ok(()) => Ok(ReplayOutcome::Done {
                replayed: 1,
                failed: 0,
                held_back: 0,
            }),
            Err(Error::HandlerFailed { message, .. }) => Ok(ReplayOutcome::Failed {
                reason: format!("the handler failed again: {message}"),
            }),
            Err(Error::DeadLetterNotFound { id }) => Ok(ReplayOutcome::Failed {
                reason: format!(
                    "dead letter {id} is gone (replayed or discarded since the request)"
                ),
            }),
            Err(
                error @ (Error::CorruptEvent { .. }
                | Error::Store {
                    kind: StoreErrorKind::Corrupt | StoreErrorKind::Other,
                    ..
                }),
            ) => Ok(ReplayOutcome::Failed {
                reason: format!("its event cannot be read: {error}"),
            }),
            Err(error) => Err(error),
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

/// The task of a bus with a store that carries out stored replay requests after each lease
/// round (see [`EventBus::carry_out_replay_requests`]), until the bus stops. A pass that
/// fails is logged and the requests stay pending for the next round.
pub(crate) async fn replay_requested(bus: Weak<Inner>, engine: Arc<Engine>) {
    let mut stopping = engine.stopping.subscribe();
    loop {
        tokio::select! {
            () = engine.replay_wake.notified() => {}
            _ = stopping.changed() => return,
        }
        if *stopping.borrow_and_update() {
            return;
        }
        let Some(inner) = bus.upgrade() else {
            return;
        };
        let bus = EventBus { inner };
        match bus.carry_out_replay_requests().await {
            Ok(_) => {}
            Err(Error::Unsupported { operation, store }) => {
                tracing::info!(%operation, %store, "this store keeps no replay requests; none are carried out");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot carry out replay requests; they stay pending until the next lease round");
            }
        }
    }
}
