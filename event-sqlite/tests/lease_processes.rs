//! Segment leases across real processes on one SQLite file: four children (this test
//! binary, started again) claim and renew the 16 segments of one subscription; one is
//! SIGKILLed; the others take its segments over once its leases expire. Every claim and
//! renewal the children report is checked: no two owners ever held one segment at once,
//! and each epoch belongs to one owner. A save with the killed child's last lease, made
//! from this (another) process, is refused
//! (`eventfold_core::testing::processes::kill_and_take_over`).

use std::process::{Command, Stdio};
use std::sync::Arc;

use eventfold_core::testing::processes::{MemberPlan, kill_and_take_over, run_member};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

const CHILD_DATABASE: &str = "EVENTFOLD_SQLITE_LEASE_CHILD_DATABASE";
const CHILD_MEMBER: &str = "EVENTFOLD_SQLITE_LEASE_CHILD_MEMBER";

/// The child's work: a member of the subscription until killed. Does nothing in a normal
/// test run.
#[test]
fn lease_member_entry() {
    let (Ok(path), Ok(member)) = (std::env::var(CHILD_DATABASE), std::env::var(CHILD_MEMBER))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap();
        run_member(&store, &MemberPlan::default(), &member).await;
    });
}

#[test]
fn four_processes_split_sixteen_segments_and_take_over_a_killed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime
        .block_on(SqliteEventStore::open(&path, SqliteOptions::new()))
        .unwrap();
    let report = kill_and_take_over(
        &MemberPlan::default(),
        &runtime,
        Arc::new(store.clone()),
        |member| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "lease_member_entry",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DATABASE, &path)
                .env(CHILD_MEMBER, format!("member-{member}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("the child starts")
        },
    );
    eprintln!("{report:?}");
    runtime.block_on(store.close()).unwrap();
}
