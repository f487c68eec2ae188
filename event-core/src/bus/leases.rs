//! The lease keeper of a bus with a store: which segments of each durable subscription
//! this bus runs.
//!
//! Every `lease_ttl / 3` (and whenever the subscriptions change or a segment being given up
//! finished its work) it heartbeats each subscription's membership, computes its fair
//! share, `ceil(segments / live members)`, and then:
//! - renews the leases it holds; a lease it lost (another member took it over, or it could
//!   not renew before the lease ran out) stops that segment at once: its deliveries not
//!   yet started are dropped here, and the new owner delivers them again from the saved
//!   checkpoint (at least once);
//! - gives up segments beyond its share: they take nothing new, and once their last
//!   delivery finished their checkpoint is saved and the lease released;
//! - claims free segments up to its share, for the dispatcher to take up at their
//!   checkpoints.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::engine::{Claim, Engine};
use super::reset::StartFrom;
use super::routing::{Routing, Sub};
use super::tracker::TrackKey;
use crate::error::{Error, Result};
use crate::lease::SegmentLease;
use crate::store::EventStore;

/// What the keeper remembers between rounds.
#[derive(Default)]
struct Keeper {
    /// Subscriptions it is a member of, to leave when they leave the bus.
    joined: HashSet<Arc<str>>,
    /// When each held lease runs out by this process's clock, counted from the last
    /// renewal asked for: past it, the segment is stopped even if the store could not be
    /// reached to say so.
    valid_until: HashMap<TrackKey, Instant>,
}

/// Keeps the leases of the bus's durable subscriptions until the bus stops.
pub(crate) async fn keep_leases(engine: Arc<Engine>) {
    let store = Arc::clone(engine.store.as_ref().expect("a bus with a store"));
    let mut routing = engine.routing.subscribe();
    let mut stopping = engine.stopping.subscribe();
    let interval = engine.lease_ttl / 3;
    let mut keeper = Keeper::default();
    loop {
        if *stopping.borrow_and_update() {
            return;
        }
        let table = Arc::clone(&routing.borrow_and_update());
        keeper.round(&engine, &store, &table).await;
        engine
            .keeper_seen
            .fetch_max(table.version, Ordering::SeqCst);
        // `wait_idle` may be waiting for this round.
        engine.progress.notify_waiters();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = engine.keeper_wake.notified() => {}
            _ = routing.changed() => {}
            _ = stopping.changed() => return,
        }
    }
}

impl Keeper {
    async fn round(&mut self, engine: &Engine, store: &Arc<dyn EventStore>, table: &Routing) {
        for sub in &table.subs {
            if let Err(error) = self.keep(engine, store, sub).await {
                tracing::warn!(%error, subscription = %sub.name, "cannot keep segment leases; trying again");
            }
        }
        let left: Vec<Arc<str>> = self
            .joined
            .iter()
            .filter(|name| !table.subs.iter().any(|s| s.name == **name))
            .cloned()
            .collect();
        for name in left {
            match store.leave(&name, &engine.member).await {
                Ok(()) => {
                    self.joined.remove(&name);
                }
                Err(error) => tracing::warn!(%error, subscription = %name, "cannot leave"),
            }
        }
    }

    /// One subscription's round: heartbeat, renew, give up, claim.
    async fn keep(
        &mut self,
        engine: &Engine,
        store: &Arc<dyn EventStore>,
        sub: &Sub,
    ) -> Result<()> {
        let ttl = engine.lease_ttl;
        let members = store.heartbeat(&sub.name, &engine.member, ttl).await?;
        self.joined.insert(Arc::clone(&sub.name));
        let live = u32::try_from(members.len()).unwrap_or(u32::MAX).max(1);
        let share = sub.segments.div_ceil(live);

        self.renew(engine, store, sub).await;
        give_up_drained(engine, store).await?;

        let held: Vec<u32> = {
            let tracker = engine.lock_tracker();
            tracker
                .leases_of(sub.index)
                .iter()
                .map(|l| l.segment)
                .filter(|&segment| !tracker.is_draining((sub.index, segment)))
                .collect()
        };
        let pending = engine
            .claimed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|c| c.index == sub.index)
            .count() as u32;
        let holding = held.len() as u32 + pending;
        if holding > share {
            // The highest segments go first, so members settle on the same split.
            let mut tracker = engine.lock_tracker();
            for &segment in held.iter().rev().take((holding - share) as usize) {
                tracker.drain((sub.index, segment));
            }
            if tracker.take_drained() {
                engine.keeper_wake.notify_one();
            }
        } else if holding < share {
            let leases = store
                .claim_segments(
                    &sub.name,
                    &engine.member,
                    sub.segments,
                    share - holding,
                    ttl,
                )
                .await?;
            self.take_up(engine, store, sub, leases).await?;
        }
        Ok(())
    }

    /// Renews the subscription's held leases, and stops the segments whose lease is lost.
    async fn renew(&mut self, engine: &Engine, store: &Arc<dyn EventStore>, sub: &Sub) {
        let held = engine.lock_tracker().leases_of(sub.index);
        if held.is_empty() {
            return;
        }
        let asked = Instant::now();
        match store.renew_leases(&held, engine.lease_ttl).await {
            Ok(renewed) => {
                for lease in &held {
                    let key = (sub.index, lease.segment);
                    match renewed
                        .iter()
                        .find(|r| r.segment == lease.segment && r.epoch == lease.epoch)
                    {
                        Some(renewal) => {
                            engine.lock_tracker().renewed(key, renewal.clone());
                            self.valid_until.insert(key, asked + engine.lease_ttl);
                        }
                        None => {
                            tracing::warn!(subscription = %sub.name, segment = lease.segment, "segment lease lost; its deliveries stop here");
                            self.valid_until.remove(&key);
                            engine.segment_lost(key, lease);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, subscription = %sub.name, "cannot renew segment leases");
                let now = Instant::now();
                for lease in &held {
                    let key = (sub.index, lease.segment);
                    if self
                        .valid_until
                        .get(&key)
                        .is_some_and(|&until| until <= now)
                    {
                        self.valid_until.remove(&key);
                        engine.segment_lost(key, lease);
                    }
                }
            }
        }
    }

    /// Hands claimed segments to the dispatcher, at their checkpoints (a segment without
    /// one where the subscription's [`StartFrom`] says).
    async fn take_up(
        &mut self,
        engine: &Engine,
        store: &Arc<dyn EventStore>,
        sub: &Sub,
        leases: Vec<SegmentLease>,
    ) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut claims = Vec::with_capacity(leases.len());
        let mut result = Ok(());
        for lease in leases {
            let mut checkpoint = lease.checkpoint;
            if sub.start_from == StartFrom::End && result.is_ok() {
                result = start_at_end(store.as_ref(), &lease).await.map(|c| {
                    checkpoint = c.unwrap_or(checkpoint);
                });
            }
            if result.is_err() {
                // Not taken up: given back, for this bus or another to claim again.
                if let Err(error) = store.release_leases(std::slice::from_ref(&lease)).await {
                    tracing::warn!(%error, "cannot release a segment lease");
                }
                continue;
            }
            self.valid_until
                .insert((sub.index, lease.segment), now + engine.lease_ttl);
            claims.push(Claim {
                index: sub.index,
                lease,
                checkpoint,
            });
        }
        if !claims.is_empty() {
            engine
                .claimed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(claims);
            engine.segments_version.fetch_add(1, Ordering::SeqCst);
            engine.segments_changed.notify_one();
        }
        result
    }
}

/// For a subscription that starts at the end: a segment without a stored checkpoint gets
/// the head as its checkpoint, saved at once (so a restart before it handles anything does
/// not replay the history it was told to skip). The checkpoint set, if one was.
async fn start_at_end(store: &dyn EventStore, lease: &SegmentLease) -> Result<Option<u64>> {
    // A reset sets the plain checkpoint, which segments without their own start from.
    for name in [lease.checkpoint_name(), lease.subscription.clone()] {
        if store.load_checkpoint(&name).await?.is_some() {
            return Ok(None);
        }
    }
    let head = store.head_position().await?;
    store.save_segment_checkpoint(lease, head).await?;
    Ok(Some(head))
}

/// Saves the checkpoints of the segments being given up that finished their work, and
/// releases their leases.
async fn give_up_drained(engine: &Engine, store: &Arc<dyn EventStore>) -> Result<()> {
    let _gate = engine.checkpoint_gate.lock().await;
    let drained = engine.lock_tracker().drained();
    for (key, lease, checkpoint, saved) in drained {
        if checkpoint != saved {
            match store.save_segment_checkpoint(&lease, checkpoint).await {
                Ok(()) => {}
                Err(Error::LeaseLost { .. }) => {
                    engine.segment_lost(key, &lease);
                    continue;
                }
                Err(error) => return Err(error),
            }
        }
        engine.segment_lost(key, &lease);
        store.release_leases(std::slice::from_ref(&lease)).await?;
    }
    Ok(())
}

/// Releases every lease the bus holds or claimed, and leaves the subscriptions, when it
/// stops (after its checkpoints were saved), so a standby takes over at once. A store that
/// cannot be reached then does not fail the stop: the leases expire on their own.
pub(crate) async fn release_all(engine: &Engine, names: &[Arc<str>]) {
    let Some(store) = &engine.store else {
        return;
    };
    let mut leases = engine.lock_tracker().take_all();
    leases.extend(
        std::mem::take(&mut *engine.claimed.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .map(|c| c.lease),
    );
    for sub in &engine.routing.borrow().subs {
        sub.clear_held();
    }
    if !leases.is_empty()
        && let Err(error) = store.release_leases(&leases).await
    {
        tracing::warn!(%error, "cannot release segment leases; they expire on their own");
    }
    for name in names {
        if let Err(error) = store.leave(name, &engine.member).await {
            tracing::warn!(%error, subscription = %name, "cannot leave; the membership expires on its own");
        }
    }
}
