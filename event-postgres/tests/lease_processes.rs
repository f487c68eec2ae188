//! Segment leases across real processes on one PostgreSQL schema: four children (this
//! test binary, started again) claim and renew the 16 segments of one subscription on the
//! server's clock; one is SIGKILLed; the others take its segments over once its leases
//! expire. Every lease the children report is checked (one owner per segment at a time,
//! one per epoch), and a save with the killed child's last lease, from this process, is
//! refused (`eventfold_core::testing::processes::kill_and_take_over`).

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use eventfold_core::testing::processes::{MemberPlan, kill_and_take_over, run_member};
use eventfold_postgres::{PostgresEventStore, PostgresOptions};

const CHILD_SCHEMA: &str = "EVENTFOLD_PG_LEASE_CHILD_SCHEMA";
const CHILD_MEMBER: &str = "EVENTFOLD_PG_LEASE_CHILD_MEMBER";

/// The child's work: a member of the subscription until killed. Does nothing in a normal
/// test run.
#[test]
fn lease_member_entry() {
    let (Ok(schema), Ok(member)) = (std::env::var(CHILD_SCHEMA), std::env::var(CHILD_MEMBER))
    else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = PostgresEventStore::open(
            PostgresOptions::new(common::url())
                .schema(&schema)
                .pool_size(2),
        )
        .await
        .expect("the child's store opens");
        run_member(&store, &MemberPlan::default(), &member).await;
    });
}

#[test]
fn four_processes_split_sixteen_segments_and_take_over_a_killed_ones() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = runtime.block_on(schema.open());
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
                .env(CHILD_SCHEMA, &schema.name)
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
