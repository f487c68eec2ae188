//! Following commits of other connections (other processes, other store handles on the
//! same file) into [`watch_head`](eventfold_core::EventLog::watch_head).
//!
//! The writer publishes this store's own commits in the watch directly. Commits of other
//! connections reach it through a poller: a task that, every
//! [`SqliteOptions::external_change_poll`], asks a read connection of its own for
//! `PRAGMA data_version` (SQLite's counter of commits by other connections, read from the
//! WAL index in shared memory: no query of the tables) and reads the head only when that
//! changed. The poller runs only while someone holds a receiver of the watch: the first
//! `watch_head` starts it, and it ends at the first poll that finds no receiver left, at
//! [`close`](crate::SqliteEventStore::close), or when the store is dropped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use eventfold_core::Result;

use crate::error::store_error;
use crate::options::SqliteOptions;
use crate::schema;
use crate::sql;

/// The poller of one store, started on demand.
pub(crate) struct Follower {
    head: Arc<watch::Sender<u64>>,
    path: PathBuf,
    options: SqliteOptions,
    interval: Duration,
    runtime: tokio::runtime::Handle,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    running: Option<Running>,
    /// Set by `close`: no poller starts again.
    closed: bool,
}

struct Running {
    /// Dropped or sent to: the poller ends (before its next poll).
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Follower {
    /// The follower of a file database, or `None` when the options turn polling off.
    pub(crate) fn new(
        head: Arc<watch::Sender<u64>>,
        path: PathBuf,
        options: SqliteOptions,
        runtime: tokio::runtime::Handle,
    ) -> Option<Arc<Self>> {
        let interval = options.external_change_poll;
        if interval.is_zero() {
            return None;
        }
        Some(Arc::new(Follower {
            head,
            path,
            options,
            interval,
            runtime,
            slot: Mutex::new(Slot::default()),
        }))
    }

    /// Starts the poller unless it runs. Called after a receiver subscribed, so a poller
    /// that is ending (it saw no receiver, under the same lock) is replaced.
    pub(crate) fn ensure_running(self: &Arc<Self>) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.closed {
            return;
        }
        if let Some(running) = &slot.running
            && !running.task.is_finished()
        {
            return;
        }
        let (stop, stopped) = oneshot::channel();
        let task = self.runtime.spawn(poll(Arc::downgrade(self), stopped));
        slot.running = Some(Running { stop, task });
    }

    /// Stops the poller for good and waits until it ended, so that its read connection is
    /// closed when this returns.
    pub(crate) async fn stop(&self) {
        let running = {
            let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
            slot.closed = true;
            slot.running.take()
        };
        if let Some(running) = running {
            let _ = running.stop.send(());
            // An error: the task panicked or was cancelled with the runtime; it is gone.
            let _ = running.task.await;
        }
    }

    /// True (and the slot emptied) when nobody watches any more: the poller ends.
    fn nobody_watches(&self) -> bool {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if self.head.receiver_count() == 0 {
            slot.running = None;
            true
        } else {
            false
        }
    }

    /// Publishes a head read by the poller, if it is ahead of the watch.
    fn publish(&self, head: u64) {
        self.head.send_if_modified(|published| {
            let moved = head > *published;
            if moved {
                *published = head;
            }
            moved
        });
    }
}

/// The poller's loop. It holds the follower weakly, so a dropped store ends it.
async fn poll(follower: Weak<Follower>, mut stop: oneshot::Receiver<()>) {
    let mut conn: Option<Connection> = None;
    let mut seen: Option<i64> = None;
    let mut failing = false;
    loop {
        let interval = match follower.upgrade() {
            Some(follower) => follower.interval,
            None => return,
        };
        tokio::select! {
            biased;
            _ = &mut stop => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(follower) = follower.upgrade() else {
            return;
        };
        if follower.nobody_watches() {
            return;
        }
        let path = follower.path.clone();
        let options = follower.options.clone();
        let taken = conn.take();
        let checked =
            tokio::task::spawn_blocking(move || check(taken, &path, &options, seen)).await;
        match checked {
            Ok(Ok((connection, version, head))) => {
                conn = Some(connection);
                seen = Some(version);
                failing = false;
                if let Some(head) = head {
                    follower.publish(head);
                }
            }
            Ok(Err(error)) => {
                // The connection is dropped; the next poll opens a new one.
                seen = None;
                if !failing {
                    tracing::warn!(%error, database = %follower.path.display(), "cannot check the database for other writers' commits; retrying at every poll");
                }
                failing = true;
            }
            // The runtime is shutting down.
            Err(_) => return,
        }
    }
}

/// One poll: the connection (opened if needed), the data version, and the head when the
/// version is not `seen`.
fn check(
    conn: Option<Connection>,
    path: &std::path::Path,
    options: &SqliteOptions,
    seen: Option<i64>,
) -> Result<(Connection, i64, Option<u64>)> {
    let conn = match conn {
        Some(conn) => conn,
        None => schema::open_reader(path, options)?,
    };
    let version: i64 = conn
        .query_row("PRAGMA data_version", [], |row| row.get(0))
        .map_err(|e| store_error("reading the data version", e))?;
    let head = if seen == Some(version) {
        None
    } else {
        // Read after the version: a commit in between changes the version again, and the
        // next poll reads the head once more.
        Some(sql::head(&conn)?)
    };
    Ok((conn, version, head))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a hang reaches it.
    const GUARD: Duration = Duration::from_secs(30);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_poller_ends_once_nobody_watches_and_starts_again_for_the_next_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        // The file with the store's schema, closed again.
        crate::SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let head = Arc::new(watch::channel(0).0);
        let options = SqliteOptions::new().external_change_poll(Duration::from_millis(1));
        let follower = Follower::new(
            Arc::clone(&head),
            path,
            options,
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let watcher = head.subscribe();
        follower.ensure_running();
        // Held here, so the task can end only by itself, not by a stop.
        let running = follower.slot.lock().unwrap().running.take().unwrap();
        drop(watcher);
        tokio::time::timeout(GUARD, running.task)
            .await
            .expect("the poller ended before the guard")
            .unwrap();

        let _watcher = head.subscribe();
        follower.ensure_running();
        let started = {
            let slot = follower.slot.lock().unwrap();
            slot.running.as_ref().is_some_and(|r| !r.task.is_finished())
        };
        assert!(started, "a poller runs for the new watcher");
        follower.stop().await;
        // Closed: a watcher after this starts nothing.
        follower.ensure_running();
        assert!(follower.slot.lock().unwrap().running.is_none());
    }
}
