//! The repository's state cache: recently used aggregates kept in memory with the version
//! they were rebuilt at, so a command on a hot aggregate skips its replay.
//!
//! A cached state is never trusted on its own word. The append that follows a command
//! expects the cached version, so a state that another writer has overtaken fails the
//! store's version check and the command is re-run on a fresh load. A refusal or a no-op
//! decided on a cached state is confirmed against the stream's version before it is
//! returned (see [`Repository::cache`](super::Repository::cache)).
//!
//! A state is *taken* out of the cache while a command runs on it and *put* back with its
//! new version afterwards, so the aggregate type needs no `Clone`. Eviction is CLOCK
//! (second chance): an entry used since the hand last passed it survives one more pass.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a repository's state cache holds and how well it served (see
/// [`Repository::cache_statistics`](super::Repository::cache_statistics)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStatistics {
    /// The most aggregates the cache holds.
    pub capacity: usize,
    /// Aggregates it holds now (a state taken by a running command counts).
    pub len: usize,
    /// Commands that started from a cached state.
    pub hits: u64,
    /// Commands that had to load from the store.
    pub misses: u64,
    /// Cached states found out of date (a version conflict, or a refusal that the stream's
    /// version did not confirm), after which the command re-ran on a fresh load.
    pub stale: u64,
}

struct Entry<A> {
    /// `None` while a command has the state out.
    state: Option<(A, u64)>,
    /// Used since the clock hand last passed.
    referenced: bool,
}

struct Slots<A> {
    entries: HashMap<String, Entry<A>>,
    /// Every key of `entries` once, in the order the clock hand visits them.
    hand: VecDeque<String>,
}

pub(crate) struct StateCache<A> {
    capacity: usize,
    slots: Mutex<Slots<A>>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale: AtomicU64,
}

impl<A> StateCache<A> {
    pub(crate) fn new(capacity: usize) -> Self {
        StateCache {
            capacity,
            slots: Mutex::new(Slots {
                entries: HashMap::with_capacity(capacity.min(1 << 16)),
                hand: VecDeque::with_capacity(capacity.min(1 << 16)),
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale: AtomicU64::new(0),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots<A>> {
        // A panic while holding the lock leaves the map consistent (no user code runs
        // under it), so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the state of `id` out for a command, counting a hit or a miss.
    pub(crate) fn take(&self, id: &str) -> Option<(A, u64)> {
        let taken = self.slots().entries.get_mut(id).and_then(|entry| {
            entry.referenced = true;
            entry.state.take()
        });
        let counter = if taken.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        taken
    }

    /// Puts the state of `id` at `version` back, unless the cache already holds a newer one
    /// (another command on the same aggregate finished later with a higher version).
    pub(crate) fn put(&self, id: &str, state: A, version: u64) {
        let mut slots = self.slots();
        if let Some(entry) = slots.entries.get_mut(id) {
            if entry.state.as_ref().is_none_or(|(_, held)| *held < version) {
                entry.state = Some((state, version));
            }
            entry.referenced = true;
            return;
        }
        if self.capacity == 0 {
            return;
        }
        while slots.entries.len() >= self.capacity {
            slots.evict_one();
        }
        slots.entries.insert(
            id.to_owned(),
            Entry {
                state: Some((state, version)),
                referenced: false,
            },
        );
        slots.hand.push_back(id.to_owned());
    }

    /// Counts a cached state found out of date.
    pub(crate) fn stale(&self) {
        self.stale.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn statistics(&self) -> CacheStatistics {
        CacheStatistics {
            capacity: self.capacity,
            len: self.slots().entries.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            stale: self.stale.load(Ordering::Relaxed),
        }
    }
}

impl<A> Slots<A> {
    /// Advances the clock hand until it removes one entry: a referenced entry loses its
    /// mark and goes round once more. Ends within two turns of the hand.
    fn evict_one(&mut self) {
        while let Some(key) = self.hand.pop_front() {
            let entry = self
                .entries
                .get_mut(&key)
                .expect("the hand holds exactly the cached keys");
            if entry.referenced {
                entry.referenced = false;
                self.hand.push_back(key);
            } else {
                self.entries.remove(&key);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_state_is_gone_until_put_back() {
        let cache = StateCache::new(4);
        assert_eq!(cache.take("a"), None);
        cache.put("a", 'x', 3);
        assert_eq!(cache.take("a"), Some(('x', 3)));
        assert_eq!(
            cache.take("a"),
            None,
            "a second command loads from the store"
        );
        cache.put("a", 'y', 4);
        let stats = cache.statistics();
        assert_eq!((stats.hits, stats.misses, stats.len), (1, 2, 1));
    }

    #[test]
    fn an_older_version_does_not_replace_a_newer_one() {
        let cache = StateCache::new(4);
        cache.put("a", "new", 7);
        cache.put("a", "old", 5);
        assert_eq!(cache.take("a"), Some(("new", 7)));
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_keeps_what_is_used() {
        let cache = StateCache::new(3);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            cache.put(id, i, 1);
        }
        // "a" is used again (taken and put back), so the clock passes it over.
        let (state, version) = cache.take("a").unwrap();
        cache.put("a", state, version + 1);
        cache.put("d", 3, 1);
        let stats = cache.statistics();
        assert_eq!(stats.len, 3);
        assert_eq!(cache.take("b"), None, "the least recently used entry went");
        assert_eq!(cache.take("a"), Some((0, 2)));
        assert_eq!(cache.take("d"), Some((3, 1)));
        for i in 0..100 {
            cache.put(&format!("k{i}"), i, 1);
            assert!(cache.statistics().len <= 3);
        }
    }

    #[test]
    fn capacity_zero_caches_nothing() {
        let cache = StateCache::new(0);
        cache.put("a", 1, 1);
        assert_eq!(cache.take("a"), None);
        assert_eq!(cache.statistics().len, 0);
    }
}
