//! Checkpoint tracking of durable subscriptions: which positions are out for delivery,
//! and the checkpoint, the last position at and below which everything is done.
//!
//! Deliveries finish out of order (different aggregates run in parallel, retries wait),
//! so a checkpoint only moves past a position once every position below it is finished
//! or was never meant for the subscription.
//!
//! A subscription is tracked per segment this bus holds (one, segment 0, unless it has
//! segments): each held segment has its own checkpoint, saved with its lease. Events of
//! segments not held are not this bus's: they are passed over without a track.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;

use crate::lease::SegmentLease;

/// A track's key: (subscription index, segment).
pub(crate) type TrackKey = (usize, u32);

/// Per durable subscription (by its index) and held segment: its routed positions and its
/// checkpoint.
#[derive(Default)]
pub(crate) struct Tracker {
    subs: HashMap<TrackKey, Track>,
    /// A draining segment finished its last delivery since this was last taken.
    drained: bool,
}

struct Track {
    name: Arc<str>,
    /// The lease under which its checkpoint is saved.
    lease: SegmentLease,
    /// Every position up to this one was routed (or passed: not of its types, skipped,
    /// or dead-lettered by the dispatcher).
    routed_upto: u64,
    /// Positions routed and where each is, in position order.
    out: VecDeque<(u64, Out)>,
    /// How many of `out` are [`Out::Open`].
    open: usize,
    checkpoint: u64,
    saved: u64,
    /// Being given up: no new positions go out to it, its deliveries not yet started are
    /// dropped, and once none is open (the attempts under way ended) its checkpoint is
    /// saved and its lease released.
    draining: bool,
    /// Past this moment (this process's clock) the bus no longer runs the segment, even
    /// if no answer from the store said its lease was lost (see
    /// [`leases`](super::leases)); `None` until set.
    run_until: Option<Instant>,
}

/// Where a routed position is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Out {
    /// Out for delivery.
    Open,
    /// Handled (or dead-lettered): the checkpoint may pass it.
    Done,
    /// Dropped before its delivery started, as its segment is being given up: the
    /// checkpoint stays below it, so the segment's next owner delivers it.
    Dropped,
}

impl Tracker {
    /// Tracks a held segment from `checkpoint` (its stored one, or where the
    /// subscription starts).
    pub(crate) fn add(
        &mut self,
        key: TrackKey,
        name: Arc<str>,
        lease: SegmentLease,
        checkpoint: u64,
    ) {
        self.subs.insert(
            key,
            Track {
                name,
                lease,
                routed_upto: checkpoint,
                out: VecDeque::new(),
                open: 0,
                checkpoint,
                saved: checkpoint,
                draining: false,
                run_until: None,
            },
        );
    }

    /// Stops tracking a segment; its lease, if it was tracked.
    pub(crate) fn remove(&mut self, key: TrackKey) -> Option<SegmentLease> {
        self.subs.remove(&key).map(|t| t.lease)
    }

    /// Stops tracking every subscription of this name (one that left the bus but is still
    /// tracked until the dispatcher sees the change), so no save moves its checkpoint.
    /// Returns the leases of the forgotten tracks.
    pub(crate) fn forget(&mut self, name: &str) -> Vec<SegmentLease> {
        let keys: Vec<TrackKey> = self
            .subs
            .iter()
            .filter(|(_, t)| *t.name == *name)
            .map(|(&k, _)| k)
            .collect();
        keys.into_iter().filter_map(|k| self.remove(k)).collect()
    }

    /// The keys of the tracked segments.
    pub(crate) fn keys(&self) -> Vec<TrackKey> {
        self.subs.keys().copied().collect()
    }

    /// A held segment's lease.
    pub(crate) fn lease(&self, key: TrackKey) -> Option<&SegmentLease> {
        self.subs.get(&key).map(|t| &t.lease)
    }

    /// The held segments of one subscription, with their leases.
    pub(crate) fn leases_of(&self, index: usize) -> Vec<SegmentLease> {
        let mut leases: Vec<SegmentLease> = self
            .subs
            .iter()
            .filter(|((i, _), _)| *i == index)
            .map(|(_, t)| t.lease.clone())
            .collect();
        leases.sort_by_key(|l| l.segment);
        leases
    }

    /// Stops tracking everything (the bus stopped); the leases that were held.
    pub(crate) fn take_all(&mut self) -> Vec<SegmentLease> {
        self.subs.drain().map(|(_, t)| t.lease).collect()
    }

    /// Whether a held segment is being given up.
    pub(crate) fn is_draining(&self, key: TrackKey) -> bool {
        self.subs.get(&key).is_some_and(|t| t.draining)
    }

    /// Replaces a held segment's lease with its renewal.
    pub(crate) fn renewed(&mut self, key: TrackKey, lease: SegmentLease) {
        if let Some(track) = self.subs.get_mut(&key)
            && track.lease.epoch == lease.epoch
        {
            track.lease = lease;
        }
    }

    /// The segment (with the lease of this epoch) runs here until `until` at most.
    pub(crate) fn run_until(&mut self, key: TrackKey, epoch: u64, until: Instant) {
        if let Some(track) = self.subs.get_mut(&key)
            && track.lease.epoch == epoch
        {
            track.run_until = Some(until);
        }
    }

    /// The earliest moment a held segment must stop by, if one has a limit.
    pub(crate) fn earliest_stop(&self) -> Option<Instant> {
        self.subs.values().filter_map(|t| t.run_until).min()
    }

    /// The held segments whose time to run ended at or before `now`, with their leases.
    pub(crate) fn overdue(&self, now: Instant) -> Vec<(TrackKey, SegmentLease)> {
        self.subs
            .iter()
            .filter(|(_, t)| t.run_until.is_some_and(|until| until <= now))
            .map(|(&k, t)| (k, t.lease.clone()))
            .collect()
    }

    /// The lowest position any held segment still has to see, minus one.
    pub(crate) fn lowest_routed(&self) -> Option<u64> {
        self.subs
            .values()
            .filter(|t| !t.draining)
            .map(|t| t.routed_upto)
            .min()
    }

    /// Whether the segment of the subscription has yet to see this position.
    pub(crate) fn wants(&self, key: TrackKey, position: u64) -> bool {
        self.subs
            .get(&key)
            .is_some_and(|t| !t.draining && position > t.routed_upto)
    }

    /// Whether the position went out to the segment and is not finished.
    pub(crate) fn is_open(&self, key: TrackKey, position: u64) -> bool {
        self.subs.get(&key).is_some_and(|t| {
            t.out
                .binary_search_by_key(&position, |&(p, _)| p)
                .is_ok_and(|i| t.out[i].1 == Out::Open)
        })
    }

    /// The position goes out for delivery to the segment.
    pub(crate) fn route(&mut self, key: TrackKey, position: u64) {
        if let Some(track) = self.subs.get_mut(&key) {
            track.out.push_back((position, Out::Open));
            track.open += 1;
            track.routed_upto = track.routed_upto.max(position);
        }
    }

    /// Everything up to `last` was read: segments that were not routed an event in
    /// between have nothing left to do there (but draining ones, which take nothing new).
    /// True if a checkpoint moved.
    pub(crate) fn routed_through(&mut self, last: u64) -> bool {
        let mut advanced = false;
        for track in self.subs.values_mut().filter(|t| !t.draining) {
            if track.routed_upto < last {
                track.routed_upto = last;
            }
            advanced |= track.settle();
        }
        advanced
    }

    /// One subscription is done with everything up to `position` that was not routed to
    /// it (the dispatcher dead-lettered a damaged row there): every held segment of it
    /// passes it. True if a checkpoint moved.
    pub(crate) fn pass(&mut self, index: usize, position: u64) -> bool {
        let mut advanced = false;
        for ((i, _), track) in self.subs.iter_mut() {
            if *i != index || track.draining {
                continue;
            }
            track.routed_upto = track.routed_upto.max(position);
            advanced |= track.settle();
        }
        advanced
    }

    /// Whether the subscription has a held segment that has yet to see this position.
    pub(crate) fn any_wants(&self, index: usize, position: u64) -> bool {
        self.subs
            .iter()
            .any(|((i, _), t)| *i == index && !t.draining && position > t.routed_upto)
    }

    /// A position routed to the segment under the lease of `epoch` is finished. True if
    /// the checkpoint moved. A delivery of an earlier hold of the segment (its lease lost,
    /// then claimed again by this bus) finishes nothing here: the segment's new track
    /// routes that position again, and only its own delivery may let the checkpoint pass.
    pub(crate) fn complete(&mut self, key: TrackKey, epoch: u64, position: u64) -> bool {
        let Some(track) = self.subs.get_mut(&key) else {
            return false;
        };
        if track.lease.epoch != epoch {
            return false;
        }
        track.close(position, Out::Done);
        let moved = track.settle();
        if track.draining && track.open == 0 {
            self.drained = true;
        }
        moved
    }

    /// A position routed to the segment under the lease of `epoch` was dropped before its
    /// delivery started (the segment is being given up, see [`drain`](Self::drain)): it is
    /// no longer open, but the checkpoint does not pass it.
    pub(crate) fn dropped(&mut self, key: TrackKey, epoch: u64, position: u64) {
        let Some(track) = self.subs.get_mut(&key) else {
            return;
        };
        if track.lease.epoch != epoch {
            return;
        }
        track.close(position, Out::Dropped);
        if track.draining && track.open == 0 {
            self.drained = true;
        }
    }

    /// The checkpoint of a held segment.
    #[cfg(test)]
    pub(crate) fn checkpoint(&self, key: TrackKey) -> Option<u64> {
        self.subs.get(&key).map(|t| t.checkpoint)
    }

    /// The lowest checkpoint of a subscription's held segments, if it holds any.
    pub(crate) fn lowest_checkpoint(&self, index: usize) -> Option<u64> {
        self.subs
            .iter()
            .filter(|((i, _), _)| *i == index)
            .map(|(_, t)| t.checkpoint)
            .min()
    }

    /// Checkpoints that moved since they were last saved, with their leases.
    pub(crate) fn unsaved(&self) -> Vec<(TrackKey, SegmentLease, u64)> {
        self.subs
            .iter()
            .filter(|(_, t)| t.checkpoint != t.saved)
            .map(|(&k, t)| (k, t.lease.clone(), t.checkpoint))
            .collect()
    }

    pub(crate) fn saved(&mut self, key: TrackKey, position: u64) {
        if let Some(track) = self.subs.get_mut(&key) {
            track.saved = track.saved.max(position);
        }
    }

    /// Starts giving a segment up: nothing new goes out to it, and the caller stops
    /// running it (its deliveries not yet started are then [`dropped`](Self::dropped)).
    pub(crate) fn drain(&mut self, key: TrackKey) {
        if let Some(track) = self.subs.get_mut(&key) {
            track.draining = true;
            if track.open == 0 {
                self.drained = true;
            }
        }
    }

    /// Whether a draining segment finished since the last call (and clears the flag).
    pub(crate) fn take_drained(&mut self) -> bool {
        std::mem::take(&mut self.drained)
    }

    /// The draining segments with nothing open: (key, lease, checkpoint, saved).
    pub(crate) fn drained(&self) -> Vec<(TrackKey, SegmentLease, u64, u64)> {
        self.subs
            .iter()
            .filter(|(_, t)| t.draining && t.open == 0)
            .map(|(&k, t)| (k, t.lease.clone(), t.checkpoint, t.saved))
            .collect()
    }
}

impl Track {
    /// An open position is done or dropped.
    fn close(&mut self, position: u64, to: Out) {
        if let Ok(i) = self.out.binary_search_by_key(&position, |&(p, _)| p)
            && self.out[i].1 == Out::Open
        {
            self.out[i].1 = to;
            self.open -= 1;
        }
    }

    /// Moves the checkpoint past finished positions (up to the first open or dropped
    /// one); true if it moved.
    fn settle(&mut self) -> bool {
        while self.out.front().is_some_and(|&(_, at)| at == Out::Done) {
            self.out.pop_front();
        }
        let checkpoint = match self.out.front() {
            Some(&(position, _)) => position - 1,
            None => self.routed_upto,
        };
        let moved = checkpoint > self.checkpoint;
        self.checkpoint = self.checkpoint.max(checkpoint);
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(name: &str, segment: u32, checkpoint: u64) -> SegmentLease {
        SegmentLease {
            subscription: name.into(),
            segment,
            segments: 2,
            owner: "me".into(),
            epoch: 1,
            expires_at: chrono::Utc::now(),
            checkpoint,
        }
    }

    fn tracker_at(checkpoint: u64) -> Tracker {
        let mut tracker = Tracker::default();
        tracker.add(
            (0, 0),
            Arc::from("s"),
            lease("s", 0, checkpoint),
            checkpoint,
        );
        tracker
    }

    const S: TrackKey = (0, 0);

    #[test]
    fn the_checkpoint_waits_for_the_lowest_unfinished_position() {
        let mut t = tracker_at(0);
        for p in 1..=3 {
            t.route(S, p);
        }
        t.routed_through(3);
        assert_eq!(t.checkpoint(S), Some(0));
        assert!(!t.complete(S, 1, 3), "3 finished first: nothing moves");
        assert!(!t.complete(S, 1, 2));
        assert_eq!(t.checkpoint(S), Some(0));
        assert!(t.complete(S, 1, 1), "1 finished: the checkpoint jumps to 3");
        assert_eq!(t.checkpoint(S), Some(3));
    }

    #[test]
    fn positions_not_routed_to_a_subscription_are_passed_once_read() {
        let mut t = tracker_at(0);
        t.route(S, 2);
        assert!(t.routed_through(5));
        assert_eq!(t.checkpoint(S), Some(1), "1 was not for it; 2 is out");
        assert!(t.complete(S, 1, 2));
        assert_eq!(t.checkpoint(S), Some(5));
    }

    #[test]
    fn a_subscription_wants_only_what_it_has_not_seen() {
        let mut t = tracker_at(10);
        assert!(!t.wants(S, 10));
        assert!(t.wants(S, 11));
        assert!(
            !t.wants((1, 0), 11),
            "an untracked subscription wants nothing"
        );
        assert!(!t.wants((0, 1), 11), "a segment not held wants nothing");
        t.route(S, 11);
        assert!(!t.wants(S, 11));
        assert_eq!(t.lowest_routed(), Some(11));
    }

    #[test]
    fn a_passed_position_moves_one_subscription_only() {
        let mut t = tracker_at(0);
        t.add((1, 0), Arc::from("other"), lease("other", 0, 0), 0);
        t.route(S, 1);
        t.route((1, 0), 1);
        t.routed_through(1);
        t.complete(S, 1, 1);
        t.complete((1, 0), 1, 1);
        // Position 2 is damaged: the first subscription's dead letter is stored, the
        // second's is not yet.
        assert!(t.pass(0, 2));
        assert_eq!((t.checkpoint(S), t.checkpoint((1, 0))), (Some(2), Some(1)));
        assert!(!t.any_wants(0, 2));
        assert!(t.any_wants(1, 2));
    }

    #[test]
    fn unsaved_lists_moved_checkpoints_until_they_are_saved() {
        let mut t = tracker_at(4);
        assert!(t.unsaved().is_empty());
        t.routed_through(6);
        let unsaved = t.unsaved();
        assert_eq!(unsaved.len(), 1);
        assert_eq!((unsaved[0].0, unsaved[0].2), (S, 6));
        assert_eq!(unsaved[0].1.segment, 0);
        t.saved(S, 6);
        assert!(t.unsaved().is_empty());
        assert_eq!(t.remove(S).map(|l| l.segment), Some(0));
        assert_eq!(t.checkpoint(S), None);
    }

    #[test]
    fn a_forgotten_subscription_has_nothing_left_to_save() {
        let mut t = tracker_at(0);
        t.add((1, 0), Arc::from("other"), lease("other", 0, 0), 0);
        t.routed_through(3);
        assert_eq!(t.forget("s").len(), 1);
        let unsaved = t.unsaved();
        assert_eq!(unsaved.len(), 1);
        assert_eq!(unsaved[0].1.subscription, "other");
        assert_eq!(t.checkpoint(S), None);
    }

    #[test]
    fn segments_of_one_subscription_keep_checkpoints_of_their_own() {
        let mut t = tracker_at(0);
        t.add((0, 1), Arc::from("s"), lease("s", 1, 2), 2);
        t.route(S, 3);
        t.route((0, 1), 4);
        t.routed_through(5);
        assert_eq!((t.checkpoint(S), t.checkpoint((0, 1))), (Some(2), Some(3)));
        assert_eq!(t.lowest_checkpoint(0), Some(2));
        t.complete((0, 1), 1, 4);
        assert_eq!(t.checkpoint((0, 1)), Some(5));
        assert_eq!(t.lowest_routed(), Some(5));
        let segments: Vec<u32> = t.leases_of(0).iter().map(|l| l.segment).collect();
        assert_eq!(segments, [0, 1]);
    }

    #[test]
    fn a_delivery_of_an_earlier_hold_of_a_segment_does_not_move_the_new_holds_checkpoint() {
        let mut t = tracker_at(0);
        t.route(S, 1);
        // The lease is lost with position 1 out, and the segment claimed again (epoch 2)
        // from checkpoint 0: position 1 goes out again.
        t.remove(S);
        t.add(
            S,
            Arc::from("s"),
            SegmentLease {
                epoch: 2,
                ..lease("s", 0, 0)
            },
            0,
        );
        t.route(S, 1);
        assert!(
            !t.complete(S, 1, 1),
            "the first hold's delivery (dropped, or still running) is not the new one's"
        );
        assert_eq!(t.checkpoint(S), Some(0));
        assert!(t.complete(S, 2, 1));
        assert_eq!(t.checkpoint(S), Some(1));
    }

    #[test]
    fn a_draining_segment_takes_nothing_new_and_says_when_its_work_is_done() {
        let mut t = tracker_at(0);
        t.route(S, 1);
        t.drain(S);
        assert!(!t.take_drained(), "position 1 is still out");
        assert!(!t.wants(S, 2));
        t.routed_through(9);
        assert_eq!(
            t.checkpoint(S),
            Some(0),
            "a draining segment passes nothing unread"
        );
        assert!(t.drained().is_empty());
        assert!(t.complete(S, 1, 1));
        assert!(t.take_drained());
        assert!(!t.take_drained(), "taken once");
        let drained = t.drained();
        assert_eq!(drained.len(), 1);
        assert_eq!((drained[0].0, drained[0].2), (S, 1));
        assert_eq!(t.lowest_routed(), None, "the reader no longer waits for it");
    }

    /// A segment given up drops its deliveries not yet started: it is drained once the
    /// attempts under way ended, and its checkpoint stays below the first dropped
    /// position, so the next owner delivers it (and what follows).
    #[test]
    fn a_draining_segment_is_done_when_its_attempts_ended_and_keeps_its_checkpoint_below_what_it_dropped()
     {
        let mut t = tracker_at(0);
        for p in 1..=4 {
            t.route(S, p);
        }
        t.drain(S);
        assert!(!t.take_drained());
        assert!(t.complete(S, 1, 1), "1 was under way and ends");
        t.dropped(S, 1, 2);
        assert!(!t.complete(S, 1, 3), "3 ends behind the dropped 2");
        assert!(
            !t.is_open(S, 2),
            "a dropped position is not read again for its lane"
        );
        assert!(!t.take_drained(), "4 is still under way");
        t.dropped(S, 2, 4);
        assert!(
            !t.take_drained(),
            "a delivery of another hold changes nothing"
        );
        t.dropped(S, 1, 4);
        assert!(t.take_drained());
        let drained = t.drained();
        assert_eq!(drained.len(), 1);
        assert_eq!(
            (drained[0].0, drained[0].2),
            (S, 1),
            "saved below the first dropped position"
        );
    }
}
