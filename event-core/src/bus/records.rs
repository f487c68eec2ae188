//! Where the bus keeps dead letters and failure records: in the store of a durable bus,
//! in memory on a bus without one.
//!
//! In memory, failure records are bounded per subscription by its `failure_retention`
//! (newest first), there is one dead letter per (subscription, event), and the event of a
//! dead letter is kept beside it only as long as a dead letter refers to it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

use crate::error::Result;
use crate::record::{DeadLetter, FailureRecord, NewDeadLetter, RecordedEvent};
use crate::store::EventStore;

pub(crate) enum Records {
    /// A durable bus: its store keeps them, bounded by the retention it is given.
    Store(Arc<dyn EventStore>),
    /// A bus without a store.
    Memory(Mutex<MemoryRecords>),
}

#[derive(Default)]
pub(crate) struct MemoryRecords {
    dead_letters: BTreeMap<u64, DeadLetter>,
    next_id: u64,
    /// Each dead letter's id by (subscription, event).
    by_event: HashMap<(String, Uuid), u64>,
    /// Per subscription, newest last.
    failures: HashMap<String, VecDeque<FailureRecord>>,
    /// The events of dead letters, with how many dead letters refer to each.
    events: HashMap<Uuid, (RecordedEvent, usize)>,
}

impl Records {
    fn memory(&self) -> Option<MutexGuard<'_, MemoryRecords>> {
        match self {
            Records::Store(_) => None,
            Records::Memory(m) => Some(m.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Stores a dead letter. In memory, `event` (the published event, serialized) is kept
    /// beside it for a replay, and a dead letter already kept for the same subscription
    /// and event is updated rather than doubled.
    pub(crate) async fn add_dead_letter(
        &self,
        dead_letter: NewDeadLetter,
        event: Option<RecordedEvent>,
    ) -> Result<()> {
        let mut m = match self {
            Records::Store(store) => return store.add_dead_letter(dead_letter).await.map(drop),
            Records::Memory(_) => self.memory().expect("in memory"),
        };
        let key = (dead_letter.subscription.clone(), dead_letter.event_id);
        if let Some(&id) = m.by_event.get(&key) {
            if let Some(d) = m.dead_letters.get_mut(&id) {
                d.error = dead_letter.error;
                d.attempts = dead_letter.attempts;
                d.last_failed_at = dead_letter.last_failed_at;
            }
            return Ok(());
        }
        if let Some(event) = event {
            m.events
                .entry(event.event_id)
                .or_insert_with(|| (event, 0))
                .1 += 1;
        }
        m.next_id += 1;
        let id = m.next_id;
        m.by_event.insert(key, id);
        m.dead_letters.insert(
            id,
            DeadLetter {
                id,
                subscription: dead_letter.subscription,
                event_id: dead_letter.event_id,
                position: dead_letter.position,
                event_type: dead_letter.event_type,
                error: dead_letter.error,
                attempts: dead_letter.attempts,
                first_failed_at: dead_letter.first_failed_at,
                last_failed_at: dead_letter.last_failed_at,
            },
        );
        Ok(())
    }

    pub(crate) async fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        match self {
            Records::Store(store) => store.dead_letters(subscription).await,
            Records::Memory(_) => Ok(self
                .memory()
                .expect("in memory")
                .dead_letters
                .values()
                .filter(|d| subscription.is_none_or(|s| d.subscription == s))
                .cloned()
                .collect()),
        }
    }

    /// Removes a dead letter (and, in memory, its event once no dead letter refers to it).
    pub(crate) async fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        match self {
            Records::Store(store) => store.remove_dead_letter(id).await,
            Records::Memory(_) => {
                let mut m = self.memory().expect("in memory");
                let Some(dead_letter) = m.dead_letters.remove(&id) else {
                    return Ok(false);
                };
                m.by_event
                    .remove(&(dead_letter.subscription.clone(), dead_letter.event_id));
                if let Some((_, refs)) = m.events.get_mut(&dead_letter.event_id) {
                    *refs -= 1;
                    if *refs == 0 {
                        m.events.remove(&dead_letter.event_id);
                    }
                }
                Ok(true)
            }
        }
    }

    /// Removes the dead letters of one subscription, or all of them when `subscription` is
    /// `None` (and, in memory, the events kept for them); returns how many were removed.
    pub(crate) async fn clear_dead_letters(&self, subscription: Option<&str>) -> Result<u64> {
        let mut m = match self {
            Records::Store(store) => return store.clear_dead_letters(subscription).await,
            Records::Memory(_) => self.memory().expect("in memory"),
        };
        let MemoryRecords {
            dead_letters,
            by_event,
            events,
            ..
        } = &mut *m;
        let before = dead_letters.len();
        dead_letters.retain(|_, d| {
            if subscription.is_some_and(|s| d.subscription != s) {
                return true;
            }
            by_event.remove(&(d.subscription.clone(), d.event_id));
            if let Some((_, refs)) = events.get_mut(&d.event_id) {
                *refs -= 1;
                if *refs == 0 {
                    events.remove(&d.event_id);
                }
            }
            false
        });
        Ok((before - dead_letters.len()) as u64)
    }

    /// The event of a dead letter kept in memory.
    pub(crate) fn kept_event(&self, event_id: Uuid) -> Option<RecordedEvent> {
        self.memory()?.events.get(&event_id).map(|(e, _)| e.clone())
    }

    /// How many events are kept in memory for dead letters.
    #[cfg(test)]
    pub(crate) fn kept_events(&self) -> usize {
        self.memory().map_or(0, |m| m.events.len())
    }

    /// Records a failed attempt, keeping at most `retain` records of its subscription.
    pub(crate) async fn record_failure(&self, failure: FailureRecord, retain: usize) -> Result<()> {
        match self {
            Records::Store(store) => store.record_failure(failure, retain).await,
            Records::Memory(_) => {
                let mut m = self.memory().expect("in memory");
                let kept = m.failures.entry(failure.subscription.clone()).or_default();
                kept.push_back(failure);
                while kept.len() > retain {
                    kept.pop_front();
                }
                Ok(())
            }
        }
    }

    /// Removes the failure records of one subscription, or all of them when `subscription`
    /// is `None`; returns how many were removed.
    pub(crate) async fn clear_failures(&self, subscription: Option<&str>) -> Result<u64> {
        let mut m = match self {
            Records::Store(store) => return store.clear_failures(subscription).await,
            Records::Memory(_) => self.memory().expect("in memory"),
        };
        let removed = match subscription {
            Some(s) => m.failures.remove(s).map_or(0, |kept| kept.len()),
            None => m.failures.drain().map(|(_, kept)| kept.len()).sum(),
        };
        Ok(removed as u64)
    }

    /// Failure records of a subscription, at most `limit` (in memory: newest first).
    pub(crate) async fn failures(
        &self,
        subscription: &str,
        limit: usize,
    ) -> Result<Vec<FailureRecord>> {
        match self {
            Records::Store(store) => store.failures(subscription, limit).await,
            Records::Memory(_) => Ok(self
                .memory()
                .expect("in memory")
                .failures
                .get(subscription)
                .map(|kept| kept.iter().rev().take(limit).cloned().collect())
                .unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Metadata;
    use chrono::Utc;

    fn event() -> RecordedEvent {
        let now = Utc::now();
        RecordedEvent {
            event_id: Uuid::now_v7(),
            aggregate_type: "Parcel".into(),
            aggregate_id: "p".into(),
            version: 0,
            position: 1,
            event_type: "Sent".into(),
            schema_version: 1,
            occurred_at: now,
            recorded_at: now,
            metadata: Metadata::default(),
            payload: "{}".into(),
        }
    }

    fn dead_letter(subscription: &str, event: &RecordedEvent, attempts: u32) -> NewDeadLetter {
        NewDeadLetter {
            subscription: subscription.into(),
            event_id: event.event_id,
            position: event.position,
            event_type: event.event_type.to_string(),
            error: format!("failed {attempts} times"),
            attempts,
            first_failed_at: event.recorded_at,
            last_failed_at: event.recorded_at,
        }
    }

    /// Regression: the transient bus kept the events of discarded or replayed dead
    /// letters forever, and one (subscription, event) could be dead-lettered twice.
    #[tokio::test]
    async fn an_event_kept_for_dead_letters_is_freed_with_the_last_of_them() {
        let records = Records::Memory(Mutex::default());
        let e = event();
        for sub in ["a", "b"] {
            records
                .add_dead_letter(dead_letter(sub, &e, 3), Some(e.clone()))
                .await
                .unwrap();
        }
        // The same (subscription, event) again updates its dead letter.
        records
            .add_dead_letter(dead_letter("a", &e, 4), Some(e.clone()))
            .await
            .unwrap();
        let dead = records.dead_letters(None).await.unwrap();
        assert_eq!(dead.len(), 2);
        assert_eq!((dead[0].subscription.as_str(), dead[0].attempts), ("a", 4));
        assert_eq!(records.kept_events(), 1);
        assert!(records.remove_dead_letter(dead[0].id).await.unwrap());
        assert_eq!(
            records.kept_event(e.event_id).map(|k| k.event_id),
            Some(e.event_id)
        );
        assert!(records.remove_dead_letter(dead[1].id).await.unwrap());
        assert_eq!(records.kept_events(), 0);
        assert!(records.kept_event(e.event_id).is_none());
        // A new dead letter of the same event after the removal keeps it again.
        records
            .add_dead_letter(dead_letter("a", &e, 1), Some(e.clone()))
            .await
            .unwrap();
        assert_eq!(records.kept_events(), 1);
    }

    #[tokio::test]
    async fn clearing_one_subscriptions_dead_letters_frees_the_events_only_they_kept() {
        let records = Records::Memory(Mutex::default());
        let (shared, own) = (event(), event());
        for (sub, e) in [("a", &shared), ("b", &shared), ("a", &own)] {
            records
                .add_dead_letter(dead_letter(sub, e, 1), Some(e.clone()))
                .await
                .unwrap();
        }
        assert_eq!(records.kept_events(), 2);
        assert_eq!(records.clear_dead_letters(Some("a")).await.unwrap(), 2);
        // `b` still refers to the shared event; `a`'s own event is gone.
        assert_eq!(records.kept_events(), 1);
        assert!(records.kept_event(own.event_id).is_none());
        let left = records.dead_letters(None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].subscription, "b");
        // A cleared (subscription, event) can be dead-lettered anew.
        records
            .add_dead_letter(dead_letter("a", &own, 1), Some(own.clone()))
            .await
            .unwrap();
        assert_eq!(records.dead_letters(Some("a")).await.unwrap().len(), 1);
        assert_eq!(records.clear_dead_letters(None).await.unwrap(), 2);
        assert_eq!(records.kept_events(), 0);
        assert_eq!(records.clear_dead_letters(None).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn failure_records_keep_the_newest_up_to_the_retention() {
        let records = Records::Memory(Mutex::default());
        let e = event();
        for attempt in 1..=10 {
            let failure = FailureRecord {
                subscription: "a".into(),
                event_id: e.event_id,
                position: 1,
                attempt,
                error: String::new(),
                duration_micros: 0,
                failed_at: e.recorded_at,
            };
            records.record_failure(failure, 4).await.unwrap();
        }
        let kept: Vec<u32> = records
            .failures("a", 100)
            .await
            .unwrap()
            .iter()
            .map(|f| f.attempt)
            .collect();
        assert_eq!(kept, [10, 9, 8, 7]);
        assert!(records.failures("b", 100).await.unwrap().is_empty());
    }
}
