//! Issue 12, item 5, on PostgreSQL: 4 processes on one schema run a subscription of 16
//! segments over 20,000 events while one of them is SIGKILLed and restarted 5 times (the
//! scenario and its checks: `common/segkill.rs`). Without a server it skips with one
//! line, unless `EVENTFOLD_REQUIRE_PG=1`.

#[path = "common/segkill.rs"]
mod segkill;

#[path = "../event-postgres/tests/common/mod.rs"]
mod pg;

use std::sync::Arc;

use eventfold::prelude::*;
use eventfold::{PostgresEventStore, PostgresOptions};

async fn open(schema: String) -> Arc<dyn EventStore> {
    Arc::new(
        PostgresEventStore::open(PostgresOptions::new(pg::url()).schema(&schema))
            .await
            .unwrap(),
    )
}

/// A child of the test below (does nothing unless started as one).
#[test]
fn postgres_kill_child() {
    segkill::child_entry(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_four_processes_share_sixteen_segments_while_one_is_killed_five_times() {
    if pg::no_server() {
        return;
    }
    let schema = pg::Schema::new();
    let store = open(schema.name.clone()).await;
    segkill::run("postgres_kill_child", "PostgreSQL", &schema.name, store).await;
}
