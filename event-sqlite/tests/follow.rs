//! `watch_head` follows commits of other connections on the same file: another store
//! handle in this process here (other processes: `tests/bus_processes.rs` of the facade),
//! by the poller of `SqliteOptions::external_change_poll`, which ends at `close()`.
//!
//! The poll needs real time: the waits have a generous timeout as a guard against a
//! hang, and nothing asserts how long they took.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use eventfold_core::{EventLog, ExpectedVersion};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
use tokio::sync::watch;

/// Far beyond any poll interval: only a hang reaches it.
const GUARD: Duration = Duration::from_secs(30);

async fn open(path: &Path, options: SqliteOptions) -> SqliteEventStore {
    SqliteEventStore::open(path, options).await.unwrap()
}

/// Waits until the watch shows at least `head`.
async fn wait_for_head(watch: &mut watch::Receiver<u64>, head: u64) {
    tokio::time::timeout(GUARD, watch.wait_for(|seen| *seen >= head))
        .await
        .expect("the watch reached the head before the guard")
        .expect("the store is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_through_one_store_wakes_the_head_watch_of_another_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let options = SqliteOptions::new().external_change_poll(Duration::from_millis(10));
    let listener = open(&path, options.clone()).await;
    let writer = open(&path, options).await;
    let mut watch = listener.watch_head();
    assert_eq!(*watch.borrow_and_update(), 0);

    writer
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(1)])
        .await
        .unwrap();
    wait_for_head(&mut watch, 1).await;

    // Appends in a row: the watch ends at the last head, never beyond the store's.
    for units in 2..=50 {
        writer
            .append(&meter("m-2"), ExpectedVersion::Any, vec![reading(units)])
            .await
            .unwrap();
    }
    wait_for_head(&mut watch, 50).await;
    assert_eq!(*watch.borrow(), listener.head_position().await.unwrap());

    // A watcher that comes later (after the first one is gone, so the poller had ended or
    // is ending) is followed too.
    drop(watch);
    let mut later = listener.watch_head();
    writer
        .append(&meter("m-3"), ExpectedVersion::Any, vec![reading(51)])
        .await
        .unwrap();
    wait_for_head(&mut later, 51).await;

    // Its own appends still reach the watch directly.
    listener
        .append(&meter("m-4"), ExpectedVersion::Any, vec![reading(52)])
        .await
        .unwrap();
    assert_eq!(*later.borrow_and_update(), 52);

    listener.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stops_the_poller_and_leaves_one_complete_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let options = SqliteOptions::new().external_change_poll(Duration::from_millis(5));
    let listener = open(&path, options.clone()).await;
    let writer = open(&path, options).await;
    let mut watch = listener.watch_head();
    writer
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(1)])
        .await
        .unwrap();
    // The poller has its connection open now.
    wait_for_head(&mut watch, 1).await;

    listener.close().await.unwrap();
    // The receiver outlives the store: no poller starts again, and nothing is left open.
    let _again = listener.watch_head();
    writer.close().await.unwrap();
    // The last store to close finds itself the last connection only if the listener's
    // poller closed its own: then the `.db` file alone is left.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["events.db"], "no -wal or -shm file is left");
    drop(watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_polling_off_the_watch_follows_only_its_own_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let options = SqliteOptions::new().external_change_poll(Duration::ZERO);
    let listener = open(&path, options.clone()).await;
    let writer = open(&path, options).await;
    let watch = listener.watch_head();
    writer
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(1)])
        .await
        .unwrap();
    // Reads see the other store's append at once; the watch waits for a commit of its own.
    assert_eq!(listener.head_position().await.unwrap(), 1);
    assert_eq!(*watch.borrow(), 0);
    listener
        .append(&meter("m-1"), ExpectedVersion::Any, vec![reading(2)])
        .await
        .unwrap();
    assert_eq!(*watch.borrow(), 2);
    listener.close().await.unwrap();
    writer.close().await.unwrap();
}
