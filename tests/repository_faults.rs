//! Stored data that does not fit the repository's expectations (issue 9, point 3).
//!
//! Snapshots that do not fit their stream: one at `u64::MAX` made
//! `Repository::load` overflow, and one ahead of its stream was trusted, so every command
//! on the aggregate conflicted for good and no snapshot could replace it. Now such a
//! snapshot is ignored (full replay) and replaced by the next good one, on every store.
//!
//! The bogus snapshots are written straight into the store: with `save_snapshot` into the
//! in-memory store, with SQL into the SQLite file.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Utc;
use common::{Account, AccountCommand};
use eventfold::prelude::*;
use eventfold::{Snapshot, SqliteEventStore, SqliteOptions};

/// A store under test, and the SQLite file behind it, if any.
struct Under {
    name: &'static str,
    store: Arc<dyn EventStore>,
    file: Option<PathBuf>,
}

async fn stores(dir: &Path) -> Vec<Under> {
    let file = dir.join("snapshots.db");
    let sqlite = SqliteEventStore::open(&file, SqliteOptions::new())
        .await
        .unwrap();
    vec![
        Under {
            name: "memory",
            store: Arc::new(InMemoryEventStore::new()),
            file: None,
        },
        Under {
            name: "sqlite",
            store: Arc::new(sqlite),
            file: Some(file),
        },
    ]
}

/// The state a bogus snapshot claims: nothing the stream holds.
fn bogus_state() -> String {
    serde_json::to_string(&Account {
        owner: Some("Mallory".into()),
        balance: 999,
        applied: 0,
    })
    .unwrap()
}

/// Writes a snapshot of `Account/id` at `version` straight into the store, past any rule
/// `save_snapshot` keeps.
async fn write_snapshot(under: &Under, id: &str, version: u64, state: &str) {
    match &under.file {
        None => under
            .store
            .save_snapshot(Snapshot {
                aggregate_type: "Account".into(),
                aggregate_id: id.into(),
                version,
                schema_version: 1,
                state: state.into(),
                taken_at: Utc::now(),
            })
            .await
            .unwrap(),
        Some(file) => {
            let conn = rusqlite::Connection::open(file).unwrap();
            conn.busy_timeout(std::time::Duration::from_secs(10))
                .unwrap();
            // The store keeps a u64 as the i64 of the same bits.
            conn.execute(
                "INSERT INTO snapshots (aggregate_type, aggregate_id, version, schema_version, \
                 state, taken_at) VALUES ('Account', ?1, ?2, 1, ?3, 0) \
                 ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                 version = excluded.version, state = excluded.state",
                rusqlite::params![id, version as i64, state],
            )
            .unwrap();
        }
    }
    let stored = under
        .store
        .load_snapshot(&StreamId::new("Account", id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.version, version,
        "{}: the bogus snapshot is in",
        under.name
    );
}

/// Opens the account and makes two deposits (version 3, balance 30), plants a snapshot at
/// `version` with `state`, then checks that loads and commands ignore it and that it is
/// replaced: at once if it is ahead of the stream, else by the command reaching version 5
/// (`snapshot_every(5)`).
async fn a_bogus_snapshot_is_ignored_then_replaced(
    under: &Under,
    id: &str,
    version: u64,
    state: &str,
) {
    let name = under.name;
    let repo = Repository::<Account>::new(Arc::clone(&under.store)).snapshot_every(5);
    repo.execute(
        id,
        AccountCommand::Open {
            owner: "Ada".into(),
        },
    )
    .await
    .unwrap();
    repo.execute(id, AccountCommand::Deposit(10)).await.unwrap();
    repo.execute(id, AccountCommand::Deposit(20)).await.unwrap();
    write_snapshot(under, id, version, state).await;

    let (account, loaded) = repo.load(id).await.unwrap();
    assert_eq!(
        (
            account.owner.as_deref(),
            account.balance,
            account.applied,
            loaded
        ),
        (Some("Ada"), 30, 3, 3),
        "{name}: the snapshot at {version} is ignored and the stream replayed in full"
    );
    let after_load = under
        .store
        .load_snapshot(&StreamId::new("Account", id))
        .await
        .unwrap()
        .unwrap();
    if version > 3 {
        // Ahead of the stream: replaced at once, or it would seem to fit once the stream
        // reached its version.
        let state: Account = serde_json::from_str(&after_load.state).unwrap();
        assert_eq!(
            (after_load.version, state.balance, state.applied),
            (3, 30, 3),
            "{name}: the snapshot at {version} is replaced by one of the replayed state"
        );
    } else {
        assert_eq!(
            after_load.version, version,
            "{name}: kept until the next is due"
        );
    }
    let committed = repo.execute(id, AccountCommand::Deposit(1)).await.unwrap();
    assert_eq!(
        committed.version, 4,
        "{name}: a command no longer conflicts"
    );

    let committed = repo.execute(id, AccountCommand::Deposit(1)).await.unwrap();
    assert_eq!(committed.version, 5);
    let replaced = under
        .store
        .load_snapshot(&StreamId::new("Account", id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        replaced.version, 5,
        "{name}: the snapshot at {version} is replaced by the next good one"
    );
    let state: Account = serde_json::from_str(&replaced.state).unwrap();
    assert_eq!((state.balance, state.applied), (32, 5), "{name}");
    let (account, loaded) = repo.load(id).await.unwrap();
    assert_eq!(
        (account.balance, account.applied, loaded),
        (32, 5, 5),
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_at_u64_max_no_longer_overflows_load() {
    let dir = tempfile::tempdir().unwrap();
    for under in stores(dir.path()).await {
        a_bogus_snapshot_is_ignored_then_replaced(&under, "max", u64::MAX, &bogus_state()).await;
        a_bogus_snapshot_is_ignored_then_replaced(&under, "high", 1 << 63, &bogus_state()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_ahead_of_its_stream_no_longer_makes_every_command_conflict() {
    let dir = tempfile::tempdir().unwrap();
    for under in stores(dir.path()).await {
        a_bogus_snapshot_is_ignored_then_replaced(&under, "ahead", 50, &bogus_state()).await;
        // Just one ahead: the stream is at 3.
        a_bogus_snapshot_is_ignored_then_replaced(&under, "next", 4, &bogus_state()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_at_version_0_or_that_does_not_decode_is_replayed_past() {
    let dir = tempfile::tempdir().unwrap();
    for under in stores(dir.path()).await {
        // Version 0 used to be trusted: the stream was folded onto the bogus state.
        a_bogus_snapshot_is_ignored_then_replaced(&under, "zero", 0, &bogus_state()).await;
        a_bogus_snapshot_is_ignored_then_replaced(&under, "garbled", 2, "{not json").await;
    }
}

/// A snapshot that fits (its version's event is there) is still used: the replay starts at
/// its own event and folds only what follows.
#[tokio::test]
async fn a_snapshot_that_fits_is_used() {
    let dir = tempfile::tempdir().unwrap();
    for under in stores(dir.path()).await {
        let repo = Repository::<Account>::new(Arc::clone(&under.store)).snapshot_every(100);
        repo.execute(
            "fits",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
        for _ in 0..3 {
            repo.execute("fits", AccountCommand::Deposit(10))
                .await
                .unwrap();
        }
        // A state that says so: 2 applied, balance 500, at version 2.
        let state = serde_json::to_string(&Account {
            owner: Some("Ada".into()),
            balance: 500,
            applied: 2,
        })
        .unwrap();
        write_snapshot(&under, "fits", 2, &state).await;
        let (account, version) = repo.load("fits").await.unwrap();
        assert_eq!(
            (account.balance, account.applied, version),
            (520, 4, 4),
            "{}: the snapshot at 2 plus events 3 and 4",
            under.name
        );
    }
}

/// A stream whose versions jump (a row lost or damaged in the file) used to be folded as
/// if whole: the state missed an event and carried the last version. Now the load fails
/// with `CorruptEvent` naming the event after the gap.
#[tokio::test]
async fn a_stream_whose_versions_jump_is_corrupt_not_folded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gap.db");
    let store = SqliteEventStore::open(&file, SqliteOptions::new())
        .await
        .unwrap();
    let repo = Repository::<Account>::new(Arc::new(store.clone()));
    for id in ["gap", "headless"] {
        repo.execute(
            id,
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
        repo.execute(id, AccountCommand::Deposit(10)).await.unwrap();
        repo.execute(id, AccountCommand::Deposit(20)).await.unwrap();
    }
    store.close().await.unwrap();
    let conn = rusqlite::Connection::open(&file).unwrap();
    conn.execute_batch(
        "DELETE FROM events WHERE aggregate_id = 'gap' AND version = 2;
         DELETE FROM events WHERE aggregate_id = 'headless' AND version = 1;",
    )
    .unwrap();
    drop(conn);

    let store = SqliteEventStore::open(&file, SqliteOptions::new())
        .await
        .unwrap();
    let repo = Repository::<Account>::new(Arc::new(store.clone()));
    for (id, after_gap) in [("gap", 3), ("headless", 2)] {
        let stream = StreamId::new("Account", id);
        let expected = store.read_stream(&stream, after_gap).await.unwrap()[0].clone();
        match repo.load(id).await {
            Err(eventfold::Error::CorruptEvent {
                event_id, position, ..
            }) => {
                assert_eq!(
                    (event_id, position),
                    (Some(expected.event_id), Some(expected.position)),
                    "{id}: the error names the event after the gap"
                );
            }
            other => panic!("{id}: expected CorruptEvent, got {other:?}"),
        }
    }
    store.close().await.unwrap();
}
