//! Archiving on a real SQLite file: export, verify, prune, the horizon's typed errors,
//! restore, and the refusals. The cases PostgreSQL runs too are in
//! tests/common/archive_cases.rs; this file adds SQLite's own checks (its checksums, its
//! `verify`) and its particular cases.

#[path = "../../tests/common/archive_cases.rs"]
mod cases;
mod common;

use common::meter;
use eventfold_core::archive::{self, ArchiveRange, ArchiveState, RetentionRule};
use eventfold_core::{ArchiveStore, Error, EventLog, Snapshot, SnapshotStore};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

async fn open(dir: &tempfile::TempDir) -> SqliteEventStore {
    // The test is about archiving, not durability: no fsync per write.
    let options = SqliteOptions::new().synchronous(eventfold_sqlite::Synchronous::Normal);
    SqliteEventStore::open(dir.path().join("store.db"), options)
        .await
        .unwrap()
}

/// A store in a file of its own, for the shared cases.
struct File {
    store: SqliteEventStore,
    dir: tempfile::TempDir,
}

impl File {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        File {
            store: open(&dir).await,
            dir,
        }
    }
}

impl cases::Subject for File {
    fn store(&self) -> &dyn ArchiveStore {
        &self.store
    }

    fn label(&self) -> String {
        self.dir.path().join("store.db").display().to_string()
    }

    async fn check_clean(&self) {
        let report = self.store.verify().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    fn checksums(&self) -> Vec<(i64, i64)> {
        checksums(&self.dir.path().join("store.db"))
    }

    async fn close(&self) {
        self.store.close().await.unwrap();
    }
}

/// The checksums the store keeps, by position, read from the file itself.
fn checksums(path: &std::path::Path) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT position, checksum FROM events ORDER BY position")
        .unwrap();
    stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_of_100_000_events_restores_every_event_exactly() {
    cases::a_round_trip_of_100_000_events_restores_every_event_exactly(File::new().await).await;
}

#[tokio::test]
async fn a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off() {
    cases::a_prune_is_refused_while_a_subscription_lags_behind_the_cut_off(File::new().await).await;
}

#[tokio::test]
async fn a_prune_that_would_leave_a_stream_unloadable_is_refused() {
    cases::a_prune_that_would_leave_a_stream_unloadable_is_refused(File::new().await).await;
}

#[tokio::test]
async fn reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap() {
    cases::reading_the_log_across_a_pruned_stream_names_the_archive_at_each_gap(File::new().await)
        .await;
}

#[tokio::test]
async fn a_damaged_archive_fails_verify_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 200).await;
    let path = dir.path().join("a.gz");
    archive::export(
        &store,
        ArchiveRange::BelowPosition(1_000),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let error = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ArchiveDamaged { .. }), "{error:?}");
    // Nor does a prune or a restore go ahead from it.
    let error = archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ArchiveDamaged { .. }), "{error:?}");
    assert_eq!(store.read_all(1, 1_000).await.unwrap().len(), 200);
}

#[tokio::test]
async fn an_archive_of_an_empty_range_holds_no_events_and_prunes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let path = dir.path().join("empty.gz");
    let manifest = archive::export(
        &store,
        ArchiveRange::BelowPosition(100),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    assert_eq!((manifest.events, manifest.first_position), (0, None));
    common::seed(&store, "a", 3).await;
    let verified = archive::verify(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(verified.state, ArchiveState::Stored);
    archive::prune(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    archive::restore(&store, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(store.read_all(1, 10).await.unwrap().len(), 3);
    // An export never overwrites a file.
    let error = archive::export(
        &store,
        ArchiveRange::BelowPosition(100),
        &path,
        &mut archive::no_progress,
    )
    .await
    .unwrap_err();
    assert!(matches!(error, Error::ArchiveFile { .. }), "{error:?}");
}

#[tokio::test]
async fn retention_keeps_the_newest_events_a_snapshot_needs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    common::seed(&store, "a", 10).await;
    common::seed(&store, "b", 10).await;
    store
        .save_snapshot(Snapshot {
            aggregate_type: "Meter".into(),
            aggregate_id: "a".into(),
            version: 6,
            schema_version: 1,
            state: "{}".into(),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let path = dir.path().join("retention.gz");
    // Keep 3 events per Meter stream: `a` may lose 7, but keeps its snapshot's version 6
    // (a load replays from it) and what follows, so it loses 5; `b` has no snapshot and
    // keeps everything.
    let rules = vec![RetentionRule::stream_type("Meter").max_count(3)];
    let manifest = archive::apply_retention(&store, rules, &path, &mut archive::no_progress)
        .await
        .unwrap();
    assert_eq!(manifest.events, 5);
    assert_eq!(store.read_stream(&meter("a"), 6).await.unwrap().len(), 5);
    assert!(matches!(
        store.read_stream(&meter("a"), 1).await,
        Err(Error::Archived { .. })
    ));
    assert_eq!(store.read_stream(&meter("b"), 1).await.unwrap().len(), 10);
}
