//! Checkpoint tracking of durable subscriptions: which positions are out for delivery,
//! and the checkpoint, the last position at and below which everything is done.
//!
//! Deliveries finish out of order (different aggregates run in parallel, retries wait),
//! so a checkpoint only moves past a position once every position below it is finished
//! or was never meant for the subscription.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Per durable subscription (by its index): its routed positions and its checkpoint.
#[derive(Default)]
pub(crate) struct Tracker {
    subs: HashMap<usize, Track>,
}

struct Track {
    name: Arc<str>,
    /// Every position up to this one was routed (or passed: not of its types, skipped,
    /// or dead-lettered by the dispatcher).
    routed_upto: u64,
    /// Positions routed and whether each is finished, in position order.
    out: VecDeque<(u64, bool)>,
    checkpoint: u64,
    saved: u64,
}

impl Tracker {
    pub(crate) fn contains(&self, index: usize) -> bool {
        self.subs.contains_key(&index)
    }

    /// Tracks a subscription from its stored checkpoint.
    pub(crate) fn add(&mut self, index: usize, name: Arc<str>, checkpoint: u64) {
        self.subs.insert(
            index,
            Track {
                name,
                routed_upto: checkpoint,
                out: VecDeque::new(),
                checkpoint,
                saved: checkpoint,
            },
        );
    }

    pub(crate) fn remove(&mut self, index: usize) {
        self.subs.remove(&index);
    }

    /// Stops tracking every subscription of this name (one that left the bus but is still
    /// tracked until the dispatcher sees the change), so no save moves its checkpoint.
    pub(crate) fn forget(&mut self, name: &str) {
        self.subs.retain(|_, t| *t.name != *name);
    }

    /// The indexes of the tracked subscriptions.
    pub(crate) fn indexes(&self) -> Vec<usize> {
        self.subs.keys().copied().collect()
    }

    /// The lowest position any subscription still has to see, minus one.
    pub(crate) fn lowest_routed(&self) -> Option<u64> {
        self.subs.values().map(|t| t.routed_upto).min()
    }

    /// Whether the subscription has yet to see this position.
    pub(crate) fn wants(&self, index: usize, position: u64) -> bool {
        self.subs
            .get(&index)
            .is_some_and(|t| position > t.routed_upto)
    }

    /// Whether the position went out to the subscription and is not finished.
    pub(crate) fn is_open(&self, index: usize, position: u64) -> bool {
        self.subs.get(&index).is_some_and(|t| {
            t.out
                .binary_search_by_key(&position, |&(p, _)| p)
                .is_ok_and(|i| !t.out[i].1)
        })
    }

    /// The position goes out for delivery to the subscription.
    pub(crate) fn route(&mut self, index: usize, position: u64) {
        if let Some(track) = self.subs.get_mut(&index) {
            track.out.push_back((position, false));
            track.routed_upto = track.routed_upto.max(position);
        }
    }

    /// Everything up to `last` was read: subscriptions that were not routed an event in
    /// between have nothing left to do there. True if a checkpoint moved.
    pub(crate) fn routed_through(&mut self, last: u64) -> bool {
        let mut advanced = false;
        for track in self.subs.values_mut() {
            if track.routed_upto < last {
                track.routed_upto = last;
            }
            advanced |= track.settle();
        }
        advanced
    }

    /// One subscription is done with everything up to `position` that was not routed to
    /// it (the dispatcher dead-lettered a damaged row there). True if its checkpoint moved.
    pub(crate) fn pass(&mut self, index: usize, position: u64) -> bool {
        let Some(track) = self.subs.get_mut(&index) else {
            return false;
        };
        track.routed_upto = track.routed_upto.max(position);
        track.settle()
    }

    /// A routed position is finished. True if the checkpoint moved.
    pub(crate) fn complete(&mut self, index: usize, position: u64) -> bool {
        let Some(track) = self.subs.get_mut(&index) else {
            return false;
        };
        if let Ok(i) = track.out.binary_search_by_key(&position, |&(p, _)| p) {
            track.out[i].1 = true;
        }
        track.settle()
    }

    pub(crate) fn checkpoint(&self, index: usize) -> Option<u64> {
        self.subs.get(&index).map(|t| t.checkpoint)
    }

    /// Checkpoints that moved since they were last saved.
    pub(crate) fn unsaved(&self) -> Vec<(usize, Arc<str>, u64)> {
        self.subs
            .iter()
            .filter(|(_, t)| t.checkpoint != t.saved)
            .map(|(&i, t)| (i, Arc::clone(&t.name), t.checkpoint))
            .collect()
    }

    pub(crate) fn saved(&mut self, index: usize, position: u64) {
        if let Some(track) = self.subs.get_mut(&index) {
            track.saved = track.saved.max(position);
        }
    }
}

impl Track {
    /// Moves the checkpoint past finished positions; true if it moved.
    fn settle(&mut self) -> bool {
        while self.out.front().is_some_and(|&(_, done)| done) {
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

    fn tracker_at(checkpoint: u64) -> Tracker {
        let mut tracker = Tracker::default();
        tracker.add(0, Arc::from("s"), checkpoint);
        tracker
    }

    #[test]
    fn the_checkpoint_waits_for_the_lowest_unfinished_position() {
        let mut t = tracker_at(0);
        for p in 1..=3 {
            t.route(0, p);
        }
        t.routed_through(3);
        assert_eq!(t.checkpoint(0), Some(0));
        assert!(!t.complete(0, 3), "3 finished first: nothing moves");
        assert!(!t.complete(0, 2));
        assert_eq!(t.checkpoint(0), Some(0));
        assert!(t.complete(0, 1), "1 finished: the checkpoint jumps to 3");
        assert_eq!(t.checkpoint(0), Some(3));
    }

    #[test]
    fn positions_not_routed_to_a_subscription_are_passed_once_read() {
        let mut t = tracker_at(0);
        t.route(0, 2);
        assert!(t.routed_through(5));
        assert_eq!(t.checkpoint(0), Some(1), "1 was not for it; 2 is out");
        assert!(t.complete(0, 2));
        assert_eq!(t.checkpoint(0), Some(5));
    }

    #[test]
    fn a_subscription_wants_only_what_it_has_not_seen() {
        let mut t = tracker_at(10);
        assert!(!t.wants(0, 10));
        assert!(t.wants(0, 11));
        assert!(!t.wants(1, 11), "an untracked subscription wants nothing");
        t.route(0, 11);
        assert!(!t.wants(0, 11));
        assert_eq!(t.lowest_routed(), Some(11));
    }

    #[test]
    fn a_passed_position_moves_one_subscription_only() {
        let mut t = tracker_at(0);
        t.add(1, Arc::from("other"), 0);
        t.route(0, 1);
        t.route(1, 1);
        t.routed_through(1);
        t.complete(0, 1);
        t.complete(1, 1);
        // Position 2 is damaged: the first subscription's dead letter is stored, the
        // second's is not yet.
        assert!(t.pass(0, 2));
        assert_eq!((t.checkpoint(0), t.checkpoint(1)), (Some(2), Some(1)));
        assert!(!t.wants(0, 2));
        assert!(t.wants(1, 2));
    }

    #[test]
    fn unsaved_lists_moved_checkpoints_until_they_are_saved() {
        let mut t = tracker_at(4);
        assert!(t.unsaved().is_empty());
        t.routed_through(6);
        let unsaved = t.unsaved();
        assert_eq!(unsaved.len(), 1);
        assert_eq!((unsaved[0].0, unsaved[0].2), (0, 6));
        t.saved(0, 6);
        assert!(t.unsaved().is_empty());
        t.remove(0);
        assert_eq!(t.checkpoint(0), None);
    }

    #[test]
    fn a_forgotten_subscription_has_nothing_left_to_save() {
        let mut t = tracker_at(0);
        t.add(1, Arc::from("other"), 0);
        t.routed_through(3);
        t.forget("s");
        let unsaved = t.unsaved();
        assert_eq!(unsaved.len(), 1);
        assert_eq!(&*unsaved[0].1, "other");
        assert_eq!(t.checkpoint(0), None);
    }
}
