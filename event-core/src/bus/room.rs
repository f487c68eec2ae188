//! The queue's room: the one owner of its permits and of the count of events in flight.
//!
//! An event takes a slot before it enters the engine (a publisher without a store, or
//! the dispatcher reading the log) and gives it back when its last delivery is done.
//! Events a handler publishes into its own full bus enter without a slot (see
//! [`Room::take_for_publish`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// How much room a waiting publisher takes at once. Below this much free room, workers
/// report finished deliveries at once instead of once per batch, so the room a publisher
/// waits for is never held back by a worker.
pub(crate) const ROOM_CHUNK: usize = 64;

pub(crate) struct Room {
    capacity: usize,
    /// Free slots.
    permits: Semaphore,
    /// Slots a publisher took beyond its own events, for the next publishes (part of the
    /// capacity: in flight plus reserved never exceeds it).
    reserved: AtomicUsize,
    /// Events accepted and not yet done.
    in_flight: AtomicU64,
    /// Deliveries that gave their event's slot back while they wait behind a busy lane
    /// (see the worker), not yet done.
    waiting: AtomicU64,
}

impl Room {
    pub(crate) fn new(capacity: usize) -> Self {
        Room {
            capacity,
            permits: Semaphore::new(capacity),
            reserved: AtomicUsize::new(0),
            in_flight: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Deliveries waiting outside the queue's slots (behind a busy lane), not yet done.
    pub(crate) fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::SeqCst)
    }

    /// True when nothing is in flight and no delivery waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.in_flight() == 0 && self.waiting() == 0
    }

    /// `n` deliveries go on waiting without a slot (counted before their events' slots
    /// come back, so the bus never looks idle in between).
    pub(crate) fn wait_outside(&self, n: u64) {
        self.waiting.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` deliveries that waited without a slot are done. True if the bus is now empty.
    pub(crate) fn waited_done(&self, n: u64) -> bool {
        self.waiting.fetch_sub(n, Ordering::SeqCst) == n && self.in_flight() == 0
    }

    /// Free slots now.
    pub(crate) fn available(&self) -> usize {
        self.permits.available_permits()
    }

    fn full(&self) -> Error {
        Error::QueueFull {
            capacity: self.capacity,
        }
    }

    /// Takes slots for `n` published events: from what an earlier publisher reserved,
    /// else waiting (`wait`) or not. A publisher inside a handler of this bus never waits
    /// and never gets `QueueFull` for a batch that fits the capacity: every slot may be
    /// held by an event whose handler waits, so its events go beyond the capacity
    /// instead (the result is then false: they hold no slot). A batch larger than the
    /// capacity is refused everywhere.
    pub(crate) async fn take_for_publish(
        &self,
        n: usize,
        wait: bool,
        in_own_handler: impl Fn() -> bool,
    ) -> Result<bool> {
        if n > self.capacity {
            return Err(self.full());
        }
        if self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(n))
            .is_ok()
        {
            return Ok(true);
        }
        if wait && !in_own_handler() {
            // Room freed one event at a time would wake a waiting publisher once per
            // event a worker finishes; waiting for a chunk and reserving the surplus for
            // the next publishes wakes it once per chunk.
            let chunk = n.max((self.capacity / 16).min(ROOM_CHUNK));
            self.permits
                .acquire_many(chunk as u32)
                .await
                .map_err(|_| Error::BusStopped)?
                .forget();
            if chunk > n {
                self.reserved.fetch_add(chunk - n, Ordering::AcqRel);
            }
            return Ok(true);
        }
        match self.permits.try_acquire_many(n as u32) {
            Ok(permits) => {
                permits.forget();
                Ok(true)
            }
            Err(_) if in_own_handler() => Ok(false),
            Err(_) => Err(self.full()),
        }
    }

    /// Waits until at least one slot is free (false if the room was closed).
    pub(crate) async fn wait_for_one(&self) -> bool {
        self.permits.acquire().await.is_ok()
    }

    /// Waits for `n` slots for events read from the log.
    pub(crate) async fn take_for_read(&self, n: usize) {
        if let Ok(permits) = self.permits.acquire_many(n as u32).await {
            permits.forget();
        }
    }

    /// `n` events entered the engine.
    pub(crate) fn entered(&self, n: u64) {
        self.in_flight.fetch_add(n, Ordering::SeqCst);
    }

    /// `n` events are done (or all their deliveries wait without a slot), `room` of which
    /// held a slot: the slots come back. True if the bus is now empty.
    pub(crate) fn done(&self, n: u64, room: u64) -> bool {
        if room > 0 {
            self.permits.add_permits(room as usize);
        }
        self.in_flight.fetch_sub(n, Ordering::SeqCst) == n && self.waiting() == 0
    }

    /// Publishers waiting for room get `BusStopped` rather than wait forever.
    pub(crate) fn close(&self) {
        self.permits.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_larger_than_the_capacity_is_refused_even_inside_a_handler() {
        let room = Room::new(2);
        assert!(matches!(
            room.take_for_publish(3, true, || true).await,
            Err(Error::QueueFull { capacity: 2 })
        ));
        assert!(room.take_for_publish(2, false, || false).await.unwrap());
        assert!(matches!(
            room.take_for_publish(1, false, || false).await,
            Err(Error::QueueFull { .. })
        ));
        // Inside a handler a batch that fits the capacity goes beyond it.
        assert!(!room.take_for_publish(2, true, || true).await.unwrap());
        room.entered(2);
        assert!(room.done(2, 2));
        assert_eq!(room.available(), 2);
    }
}
