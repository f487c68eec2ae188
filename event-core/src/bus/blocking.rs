//! The threads that run blocking handlers.
//!
//! Not tokio's blocking pool: a runtime waits for every task on that pool when it shuts
//! down, so one handler stuck in a blocking call kept the process from exiting after
//! `stop()`. These are plain threads the process does not wait for; a stuck one is left
//! behind (its attempt times out), and the pool starts another for the next job.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle thread waits for a job before it ends.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// The most threads at once (as many as tokio's blocking pool); beyond, jobs wait for one.
const MAX_THREADS: usize = 512;

#[derive(Default)]
struct Pool {
    state: Mutex<State>,
    ready: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads running.
    threads: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(Pool::default)
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `job` on a pool thread: an idle one, or a new one if none is idle. Fails only if
/// no thread can be started.
pub(crate) fn run(job: Job) -> std::io::Result<()> {
    let pool = pool();
    let mut state = pool.lock();
    if state.idle > state.jobs.len() || state.threads >= MAX_THREADS {
        state.jobs.push_back(job);
        drop(state);
        pool.ready.notify_one();
        return Ok(());
    }
    state.threads += 1;
    drop(state);
    let spawned = std::thread::Builder::new()
        .name("eventfold-blocking".into())
        .spawn(move || {
            job();
            serve(pool);
        });
    if spawned.is_err() {
        pool.lock().threads -= 1;
    }
    spawned.map(drop)
}

/// A pool thread: runs jobs until none comes for [`KEEP_ALIVE`].
fn serve(pool: &'static Pool) {
    let mut state = pool.lock();
    loop {
        if let Some(job) = state.jobs.pop_front() {
            drop(state);
            // A job catches its own panics (see the blocking handler); one that escapes
            // ends only this thread.
            job();
            state = pool.lock();
            continue;
        }
        state.idle += 1;
        let (next, timeout) = pool
            .ready
            .wait_timeout(state, KEEP_ALIVE)
            .unwrap_or_else(|e| e.into_inner());
        state = next;
        state.idle -= 1;
        if timeout.timed_out() && state.jobs.is_empty() {
            state.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_job_does_not_hold_back_the_next() {
        let (stuck_tx, stuck_rx) = std::sync::mpsc::channel::<()>();
        run(Box::new(move || {
            // Blocks until the test ends (the sender is dropped with the test).
            let _ = stuck_rx.recv();
        }))
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..4 {
            let tx = tx.clone();
            run(Box::new(move || tx.send(i).unwrap())).unwrap();
        }
        let mut got: Vec<i32> = (0..4).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3]);
        drop(stuck_tx);
    }
}
