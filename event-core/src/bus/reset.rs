//! Where a durable subscription starts, and resetting its checkpoint.

use chrono::{DateTime, Utc};

use crate::lease::SegmentLease;

use super::{EventBus, Lifecycle};
use crate::error::{Error, Result};
use crate::store::EventStore;

/// Where a durable subscription without a checkpoint of its own starts reading the log
/// (see [`SubscriptionBuilder::start_from`](super::SubscriptionBuilder::start_from)). A
/// stored checkpoint always wins over it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StartFrom {
    /// At the first event of the log: it receives the whole history (the default).
    #[default]
    Beginning,
    /// After the last event stored when the running bus takes the subscription up: the
    /// head then becomes its checkpoint, saved at once, so it receives only later events,
    /// also after a restart.
    End,
}

/// Where [`EventBus::reset_subscription`] puts a subscription's checkpoint; its next
/// delivery is then the first event of its types after the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetTo {
    /// Checkpoint 0: everything is delivered again, from the first event.
    Start,
    /// The head of the log: only events appended after the reset are delivered.
    End,
    /// This position (at most the head): delivery resumes with the event after it.
    Position(u64),
    /// The first event recorded at or after this time is delivered next (the checkpoint
    /// is the position before it; the head if there is none). Found by a binary search
    /// over positions, O(log n) reads of one event, which relies on recorded times
    /// following commit order. A store handle records `max(now, its previous time)`, so
    /// a clock set back while it is open does not reorder them; a clock set back between
    /// runs, or processes with skewed clocks writing one log, can, and the search then
    /// lands at some event recorded at or after the time whose predecessor was recorded
    /// before it, not necessarily the first such event.
    Time(DateTime<Utc>),
}

impl EventBus {
    /// Sets a durable subscription's checkpoint, so that its next delivery is the first
    /// event after it (see [`ResetTo`]); returns the checkpoint set. Dead letters and
    /// failure records of the subscription stay.
    ///
    /// A subscription is reset only while it is not running, so the checkpoint cannot
    /// move under deliveries in flight: on a bus not started (or stopped), whether the
    /// subscription is registered or not, or on a running bus for a name not registered
    /// on it (an operator's action on the store, say for a subscription another process
    /// runs when that process is stopped, or one unsubscribed here first). A bus does not
    /// start while a reset is under way, and a subscription registered on the running bus
    /// while its reset is under way either makes the reset fail with
    /// [`Error::SubscriptionRunning`] or starts from the reset checkpoint. A subscription
    /// with segments is reset whole: every segment starts from the checkpoint set (and the
    /// segment count may change on the next claim). Another bus (in this process or
    /// another) holding a live lease on it makes the reset fail with
    /// [`Error::SubscriptionRunning`]: stop it first (a bus that died without stopping
    /// holds its leases until they expire, see
    /// [`lease_ttl`](super::EventBusBuilder::lease_ttl)).
    ///
    /// # Errors
    /// - [`Error::NotDurable`] on a bus without a store (its subscriptions have no
    ///   checkpoint to reset);
    /// - [`Error::SubscriptionRunning`] if the subscription is registered on this bus and
    ///   the bus is running, or another bus holds a live lease on one of its segments;
    /// - [`Error::UnknownSubscription`] if the name is neither registered on this bus nor
    ///   has a checkpoint in the store (a typo, most likely);
    /// - [`Error::PositionBeyondHead`] for a [`ResetTo::Position`] past the head;
    /// - the store's error if it cannot be read or written.
    ///
    /// In every error case the checkpoint is left as it was.
    pub async fn reset_subscription(&self, name: &str, to: ResetTo) -> Result<u64> {
        let engine = &self.inner.engine;
        let Some(store) = &engine.store else {
            return Err(Error::NotDurable {
                operation: "reset_subscription",
            });
        };
        let _lifecycle = self.inner.lifecycle_gate.lock().await;
        let registered = self.registered_and_not_running(name)?;
        if !registered
            && store.load_checkpoint(name).await?.is_none()
            && store.segment_states(name).await?.is_empty()
        {
            return Err(Error::UnknownSubscription {
                name: name.to_string(),
            });
        }
        let checkpoint = reset_position(store.as_ref(), to).await?;
        // The dispatcher takes up a newly registered subscription's checkpoint under this
        // gate too: one registered from here on starts from the reset checkpoint, and one
        // registered since the check above is found by the check again.
        let _saves = engine.checkpoint_gate.lock().await;
        self.registered_and_not_running(name)?;
        // A subscription unsubscribed from a running bus may still be tracked until the
        // dispatcher sees it leave; it must not save its old checkpoint over this one.
        // Leases this bus still holds for it (it left the running bus, and the dispatcher
        // has not yet seen it go) are given up here; the store refuses the reset while
        // any other live lease exists (another bus runs it).
        let mut own = engine.lock_tracker().forget(name);
        own.extend(
            store
                .segment_states(name)
                .await?
                .into_iter()
                .filter(|s| s.owner.as_deref() == Some(engine.member.as_str()))
                .map(|s| SegmentLease {
                    subscription: name.to_string(),
                    segment: s.segment,
                    segments: s.segments,
                    owner: engine.member.clone(),
                    epoch: s.epoch,
                    expires_at: s.expires_at.unwrap_or_else(Utc::now),
                    checkpoint: s.checkpoint,
                }),
        );
        if !own.is_empty() {
            store.release_leases(&own).await?;
        }
        store.reset_segments(name, checkpoint).await?;
        Ok(checkpoint)
    }

    /// Whether the subscription is registered on this bus; an error if it is and the bus
    /// is running.
    fn registered_and_not_running(&self, name: &str) -> Result<bool> {
        let registered = {
            let subs = self.inner.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.iter().any(|s| *s.name == *name)
        };
        let running = matches!(
            *self.inner.state.lock().unwrap_or_else(|e| e.into_inner()),
            Lifecycle::Running(_)
        );
        if registered && running {
            return Err(Error::SubscriptionRunning {
                name: name.to_string(),
            });
        }
        Ok(registered)
    }
}

/// The checkpoint that `to` stands for in this store's log.
async fn reset_position(store: &dyn EventStore, to: ResetTo) -> Result<u64> {
    let head = store.head_position().await?;
    match to {
        ResetTo::Start => Ok(0),
        ResetTo::End => Ok(head),
        ResetTo::Position(position) if position > head => {
            Err(Error::PositionBeyondHead { position, head })
        }
        ResetTo::Position(position) => Ok(position),
        ResetTo::Time(time) => {
            // The first position in 1..=head recorded at or after `time`, or head + 1.
            let (mut low, mut high) = (1u64, head + 1);
            while low < high {
                let middle = low + (high - low) / 2;
                let at_or_after = match store.read_all(middle, 1).await?.first() {
                    Some(event) => event.recorded_at >= time,
                    // Nothing readable there: treat it as past the time.
                    None => true,
                };
                if at_or_after {
                    high = middle;
                } else {
                    low = middle + 1;
                }
            }
            Ok(low - 1)
        }
    }
}
