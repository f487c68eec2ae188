//! Issue 12, item 5, on SQLite: 4 processes on one database file run a subscription of 16
//! segments over 20,000 events while one of them is SIGKILLed and restarted 5 times (the
//! scenario and its checks: `common/segkill.rs`).

#[path = "common/segkill.rs"]
mod segkill;

use std::sync::Arc;

use eventfold::prelude::*;
use eventfold::{SqliteEventStore, SqliteOptions};

async fn open(path: String) -> Arc<dyn EventStore> {
    Arc::new(
        SqliteEventStore::open(path, SqliteOptions::new())
            .await
            .unwrap(),
    )
}

/// A child of the test below (does nothing unless started as one).
#[test]
fn sqlite_kill_child() {
    segkill::child_entry(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_four_processes_share_sixteen_segments_while_one_is_killed_five_times() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db").display().to_string();
    let store = open(path.clone()).await;
    segkill::run("sqlite_kill_child", "SQLite", &path, store).await;
}
