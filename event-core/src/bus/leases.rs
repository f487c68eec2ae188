//! The lease keeper of a bus with a store: which segments of each durable subscription
//! this bus runs.
//!
//! Every `lease_ttl / 3` (a quarter of that for one lease time after a subscription's
//! members changed, and whenever the subscriptions change or a segment being given up
//! finished its work) it heartbeats each subscription's membership, computes its fair
//! share, `ceil(segments / live members)`, and then:
//! - renews the leases it holds; a lease it lost (another member took it over, or it could
//!   not renew before the lease ran out) stops that segment at once: its deliveries not
//!   yet started are dropped here, and the new owner delivers them again from the saved
//!   checkpoint (at least once);
//! - gives up segments beyond its share: they take nothing new and stop running here at
//!   once (their deliveries not yet started are dropped, as for a lost lease), and once
//!   the attempts under way ended their checkpoint (below the first dropped delivery) is
//!   saved and the lease released, so the next owner starts there without waiting for
//!   this bus to work through its backlog;
//! - claims free segments up to its share, for the dispatcher to take up at their
//!   checkpoints.
//!
//! A segment runs here only while its lease surely holds by this process's clock: until
//! [`RUN_SHARE`] of the lease time after the request that claimed or last renewed it
//! (the store counts its expiry from when it handled the request, later). A renewal
//! that has not answered by then (a store slow to answer: on SQLite, a writer of another
//! process holding the write lock) stops the segment as a lost lease does, and the
//! lease is released once the store answers again. Without that, a bus whose renewal
//! was late went on delivering a segment another member had already claimed once the
//! lease expired in the store: two live processes ran one segment, the new one from the
//! older checkpoint, until the late renewal came back refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::engine::{Claim, Engine};
use super::reset::StartFrom;
use super::routing::{Routing, Sub};
use crate::error::{Error, Result};
use crate::lease::SegmentLease;
use crate::store::EventStore;

/// What share of the lease time a segment runs for after the request that claimed or
/// renewed its lease: the rest (a fifth) is for deliveries under way to end before the
/// lease can expire in the store. Renewals come every third of the lease time, so a
/// renewal may be late by nearly half the lease time before a segment stops.
const RUN_SHARE: (u32, u32) = (4, 5);

/// How many times more often than every `lease_ttl / 3` the keeper runs its rounds for
/// one lease time after it saw a subscription's members change (its own first round
/// included), so a hand-over does not wait for a whole round of the member taking over.
const QUICK_ROUNDS: u32 = 4;

/// Until when a segment whose lease was asked for (claimed or renewed) at `asked` runs.
fn run_until(asked: Instant, ttl: std::time::Duration) -> Instant {
    asked + ttl * RUN_SHARE.0 / RUN_SHARE.1
}

/// What the keeper remembers between rounds.
#[derive(Default)]
struct Keeper {
    /// Subscriptions it is a member of, to leave when they leave the bus.
    joined: HashSet<Arc<str>>,
    /// How many live members each subscription had at the last heartbeat.
    members: HashMap<Arc<str>, usize>,
    /// Rounds come [`QUICK_ROUNDS`] times as often until then.
    quick_until: Option<Instant>,
}

/// Keeps the leases of the bus's durable subscriptions until the bus stops.
pub(crate) async fn keep_leases(engine: Arc<Engine>) {
    let store = Arc::clone(engine.store.as_ref().expect("a bus with a store"));
    let mut routing = engine.routing.subscribe();
    let mut stopping = engine.stopping.subscribe();
    let interval = engine.lease_ttl / 3;
    let mut keeper = Keeper::default();
    let keep = async {
        loop {
            if *stopping.borrow_and_update() {
                return;
            }
            let table = Arc::clone(&routing.borrow_and_update());
            let quick = keeper.round(&engine, &store, &table).await;
            engine
                .keeper_seen
                .fetch_max(table.version, Ordering::SeqCst);
            // `wait_idle` may be waiting for this round.
            engine.progress.notify_waiters();
            // The pending replay requests of what it runs now (a permit if that task is
            // busy with the last round's).
            engine.replay_wake.notify_one();
            // Just after the members changed, rounds come more often: segments being given
            // up by another member come free once its attempts under way end, not at a
            // round of this one.
            let next = if quick {
                interval / QUICK_ROUNDS
            } else {
                interval
            };
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = engine.keeper_wake.notified() => {}
                _ = routing.changed() => {}
                _ = stopping.changed() => return,
            }
        }
    };
    // The segments' time to run is watched beside the rounds, so a round waiting for the
    // store cannot hold a segment past it.
    tokio::select! {
        () = keep => {}
        () = stop_overdue(&engine) => {}
    }
}

/// Stops every held segment whose time to run ended (see the module's documentation),
/// until the bus stops (the keeper's loop ends first).
async fn stop_overdue(engine: &Engine) {
    // With nothing held, it looks again this often (a claim taken up runs for most of the
    // lease time, far beyond this).
    let idle = engine.lease_ttl / 10;
    loop {
        let now = Instant::now();
        let next = engine
            .lock_tracker()
            .earliest_stop()
            .map_or(now + idle, |at| at.min(now + idle));
        tokio::time::sleep_until(next).await;
        let overdue = engine.lock_tracker().overdue(Instant::now());
        if overdue.is_empty() {
            continue;
        }
        for (key, lease) in &overdue {
            tracing::warn!(subscription = %lease.subscription, segment = lease.segment, "no lease renewal answered in time; the segment stops here");
            engine.segment_lost(*key, lease);
        }
        engine
            .overdue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(overdue.into_iter().map(|(_, lease)| lease));
        engine.keeper_wake.notify_one();
    }
}

impl Keeper {
    /// One round over every subscription; true while the next rounds are to come quickly
    /// (the members of a subscription changed less than a lease time ago).
    async fn round(
        &mut self,
        engine: &Engine,
        store: &Arc<dyn EventStore>,
        table: &Routing,
    ) -> bool {
        let overdue =
            std::mem::take(&mut *engine.overdue.lock().unwrap_or_else(|e| e.into_inner()));
        if !overdue.is_empty()
            && let Err(error) = store.release_leases(&overdue).await
        {
            tracing::warn!(%error, "cannot release the leases of stopped segments; they expire on their own");
        }
        for sub in &table.subs {
            match self.keep(engine, store, sub).await {
                Ok(()) => sub.refused_count.store(0, Ordering::Release),
                Err(error) => {
                    if let Error::SegmentCountMismatch { stored, .. } = &error {
                        // `wait_idle` reports it; a reset lets the next claim through.
                        sub.refused_count.store(*stored, Ordering::Release);
                    }
                    tracing::warn!(%error, subscription = %sub.name, "cannot keep segment leases; trying again");
                }
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
        self.members.retain(|name, _| self.joined.contains(name));
        self.quick_until.is_some_and(|until| Instant::now() < until)
    }

    /// One subscription's round: heartbeat, renew, give up, claim.
    async fn keep(
        &mut self,
        engine: &Engine,
        store: &Arc<dyn EventStore>,
        sub: &Sub,
    ) -> Result<()> {
        let ttl = engine.lease_ttl;
        // The renewal first: it is the step a late answer costs most.
        self.renew(engine, store, sub).await;
        let members = store.heartbeat(&sub.name, &engine.member, ttl).await?;
        self.joined.insert(Arc::clone(&sub.name));
        if self.members.insert(Arc::clone(&sub.name), members.len()) != Some(members.len()) {
            self.quick_until = Some(Instant::now() + ttl);
        }
        let live = u32::try_from(members.len()).unwrap_or(u32::MAX).max(1);
        let share = sub.segments.div_ceil(live);

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
            // The highest segments go first, so members settle on the same split. A
            // segment given up stops running here at once, as a lost one does: its
            // deliveries not yet started are dropped (the next owner delivers them from
            // the checkpoint), and it is released once the attempts under way ended.
            let mut tracker = engine.lock_tracker();
            for &segment in held.iter().rev().take((holding - share) as usize) {
                tracker.drain((sub.index, segment));
                sub.stop_running(segment);
            }
            if tracker.take_drained() {
                engine.keeper_wake.notify_one();
            }
            drop(tracker);
            engine.segment_stopped();
        } else if holding < share {
            let asked = Instant::now();
            let leases = store
                .claim_segments(
                    &sub.name,
                    &engine.member,
                    sub.segments,
                    share - holding,
                    ttl,
                )
                .await?;
            self.take_up(engine, store, sub, leases, asked).await?;
        }
        Ok(())
    }

    /// Renews the subscription's held leases, and stops the segments whose lease is lost.
    /// (A renewal that fails leaves them running until their time to run ends.)
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
                            let mut tracker = engine.lock_tracker();
                            tracker.renewed(key, renewal.clone());
                            tracker.run_until(key, lease.epoch, run_until(asked, engine.lease_ttl));
                        }
                        None => {
                            tracing::warn!(subscription = %sub.name, segment = lease.segment, "segment lease lost; its deliveries stop here");
                            engine.segment_lost(key, lease);
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, subscription = %sub.name, "cannot renew segment leases");
            }
        }
    }

    /// Hands claimed segments to the dispatcher, at their checkpoints (a segment without
    /// one where the subscription's [`StartFrom`] says).
    async fn take_up(
        &self,
        engine: &Engine,
        store: &Arc<dyn EventStore>,
        sub: &Sub,
        leases: Vec<SegmentLease>,
        asked: Instant,
    ) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
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
            claims.push(Claim {
                index: sub.index,
                lease,
                checkpoint,
                run_until: run_until(asked, engine.lease_ttl),
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

/// Checks, before a bus starts, that each durable subscription asks for the segment count
/// its store has stored (if any): a bus with another count could claim nothing, and would
/// only log it round after round. [`Error::SegmentCountMismatch`] for the first that
/// differs; a reset (which clears the stored count) lets a new count be used.
pub(crate) async fn check_segment_counts(engine: &Engine) -> Result<()> {
    let Some(store) = &engine.store else {
        return Ok(());
    };
    let subs = engine.routing.borrow().subs.clone();
    for sub in subs {
        let states = store.segment_states(&sub.name).await?;
        if let Some(stored) = states.first().map(|s| s.segments)
            && stored != sub.segments
        {
            return Err(Error::SegmentCountMismatch {
                subscription: sub.name.to_string(),
                stored,
                requested: sub.segments,
            });
        }
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
