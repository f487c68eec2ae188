//! The attempts a worker runs on: handlers that did not finish at their first poll.
//!
//! They are polled by the worker's own task, each with a waker of its own slot, so a
//! wake-up polls only the attempt that can move. A task per attempt cost a spawn, a
//! scheduling round, a join and a wake-up of the worker for every delivery of a handler
//! that awaits anything (twice the time and memory of the perf report's `bus_memory`).
//! A handler still never holds its worker: an attempt that is pending is left for later,
//! and a future that keeps waking itself is polled once per round.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// Futures of `F`, each with a tag `T`, polled when woken; yields each one's output with
/// its tag once it is ready.
pub(crate) struct Running<T, F> {
    slots: Vec<Slot<T, F>>,
    /// Slots without a future.
    free: Vec<usize>,
    len: usize,
    ready: Arc<Ready>,
    /// Woken slots taken from `ready`, not yet polled.
    woken: Vec<usize>,
}

struct Slot<T, F> {
    running: Option<(T, F)>,
    flag: Arc<SlotWaker>,
    waker: Waker,
}

/// The slots woken since the worker last looked, and the worker's waker.
#[derive(Default)]
struct Ready {
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    woken: Vec<usize>,
    worker: Option<Waker>,
}

impl Ready {
    fn lock(&self) -> MutexGuard<'_, ReadyState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct SlotWaker {
    index: usize,
    /// In `ready` already (each slot is queued once until it is polled).
    queued: AtomicBool,
    ready: Arc<Ready>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let worker = {
            let mut state = self.ready.lock();
            state.woken.push(self.index);
            state.worker.take()
        };
        if let Some(worker) = worker {
            worker.wake();
        }
    }
}

impl<T, F> Default for Running<T, F> {
    fn default() -> Self {
        Running {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            ready: Arc::default(),
            woken: Vec::new(),
        }
    }
}

impl<T, F: Future + Unpin> Running<T, F> {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a future; it is polled on the next [`poll_done`](Self::poll_done) (it may
    /// have been polled with another waker before).
    pub(crate) fn push(&mut self, tag: T, future: F) {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = self.slots.len();
                let flag = Arc::new(SlotWaker {
                    index,
                    queued: AtomicBool::new(false),
                    ready: Arc::clone(&self.ready),
                });
                let waker = Waker::from(Arc::clone(&flag));
                self.slots.push(Slot {
                    running: None,
                    flag,
                    waker,
                });
                index
            }
        };
        let slot = &mut self.slots[index];
        slot.running = Some((tag, future));
        self.len += 1;
        // Queued for the next poll directly: the worker polls its running attempts next
        // anyway, so waking its task (and taking the lock) would be a spurious round.
        if !slot.flag.queued.swap(true, Ordering::AcqRel) {
            self.woken.push(index);
        }
    }

    /// Polls the futures woken since the last call (each once) and returns the first
    /// that is ready, with its tag. Pending when none is: `cx` is woken when one is.
    pub(crate) fn poll_done(&mut self, cx: &mut Context<'_>) -> Poll<(T, F::Output)> {
        if self.woken.is_empty() {
            let mut state = self.ready.lock();
            std::mem::swap(&mut state.woken, &mut self.woken);
            if self.woken.is_empty() {
                state.worker = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        while let Some(index) = self.woken.pop() {
            let slot = &mut self.slots[index];
            // Cleared before the poll, so a wake-up during it queues the slot again.
            slot.flag.queued.store(false, Ordering::Release);
            // A wake-up that came after its future finished (or for the next one).
            let Some((_, future)) = slot.running.as_mut() else {
                continue;
            };
            let mut slot_cx = Context::from_waker(&slot.waker);
            if let Poll::Ready(output) = Pin::new(future).poll(&mut slot_cx) {
                let Some((tag, _)) = slot.running.take() else {
                    unreachable!("polled above");
                };
                self.free.push(index);
                self.len -= 1;
                return Poll::Ready((tag, output));
            }
        }
        // None was ready: wait for the next wake-up, or come back at once for those that
        // came during this round.
        let mut state = self.ready.lock();
        if state.woken.is_empty() {
            state.worker = Some(cx.waker().clone());
        } else {
            drop(state);
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    async fn next<T, F: Future + Unpin>(running: &mut Running<T, F>) -> (T, F::Output) {
        std::future::poll_fn(|cx| running.poll_done(cx)).await
    }

    #[tokio::test]
    async fn each_future_is_yielded_with_its_tag_once_it_is_ready() {
        let mut running = Running::default();
        let (tx_a, rx_a) = oneshot::channel::<u32>();
        let (tx_b, rx_b) = oneshot::channel::<u32>();
        running.push("a", rx_a);
        running.push("b", rx_b);
        assert!(!running.is_empty());
        // Nothing is ready: the waiter is parked until a sender wakes its slot.
        let waiting = tokio::spawn(async move {
            let first = next(&mut running).await;
            let second = next(&mut running).await;
            assert!(running.is_empty());
            (first, second)
        });
        tokio::task::yield_now().await;
        tx_b.send(2).unwrap();
        tokio::task::yield_now().await;
        tx_a.send(1).unwrap();
        let ((first, one), (second, two)) = waiting.await.unwrap();
        assert_eq!((first, one.unwrap()), ("b", 2));
        assert_eq!((second, two.unwrap()), ("a", 1));
    }

    #[tokio::test]
    async fn a_future_that_keeps_waking_itself_does_not_hold_the_poller() {
        /// Wakes itself and stays pending forever.
        struct Spinner;
        impl Future for Spinner {
            type Output = ();
            fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
        let mut running: Running<u8, Spinner> = Running::default();
        running.push(1, Spinner);
        let polled = std::future::poll_fn(|cx| Poll::Ready(running.poll_done(cx))).await;
        assert!(polled.is_pending());
        // Slots are reused once free.
        let mut running: Running<u8, std::future::Ready<u8>> = Running::default();
        for i in 0..3 {
            running.push(i, std::future::ready(i * 10));
            assert_eq!(next(&mut running).await, (i, i * 10));
        }
        assert_eq!(running.slots.len(), 1);
    }
}
