//! The files a store leaves: one complete `.db` after `close()`, a WAL that comes back to
//! its limit once no reader pins it, consistent online backups, and databases on read-only
//! media.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::disk::SmallTmpfs;
use common::*;
use eventfold_core::{AppendRequest, EventLog, ExpectedVersion, StoreErrorKind, SubscriptionStore};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

fn wal_size(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    std::fs::metadata(std::path::PathBuf::from(wal)).map_or(0, |m| m.len())
}

fn assert_intact(path: &Path) {
    let check: String = raw(path)
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

/// `count` events in appends of `per_append` to `streams` streams.
async fn fill(store: &SqliteEventStore, count: usize, per_append: usize, streams: usize) {
    let mut requests = Vec::new();
    for i in 0..count / per_append {
        requests.push(AppendRequest {
            stream: meter(&format!("s-{}", i % streams)),
            expected: ExpectedVersion::Any,
            events: (0..per_append).map(|_| note(200)).collect(),
        });
        if requests.len() == 8 {
            store
                .append_batch(std::mem::take(&mut requests))
                .await
                .unwrap();
        }
    }
    if !requests.is_empty() {
        store.append_batch(requests).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lists_each_stream_with_its_version_count_and_last_event() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new())
        .await
        .unwrap();
    assert!(store.streams(None).await.unwrap().is_empty());
    let b = meter("b");
    store
        .append(&b, ExpectedVersion::NoStream, vec![note(1), note(1)])
        .await
        .unwrap();
    let other = eventfold_core::StreamId::new("Other", "x");
    store
        .append(&other, ExpectedVersion::NoStream, vec![note(1)])
        .await
        .unwrap();
    let a = meter("a");
    store
        .append(&a, ExpectedVersion::NoStream, vec![note(1)])
        .await
        .unwrap();
    let last = store
        .append(&b, ExpectedVersion::Exact(2), vec![note(1)])
        .await
        .unwrap();
    let listed = store.streams(None).await.unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|s| (s.stream.to_string(), s.version, s.events, s.last_position))
        .collect();
    assert_eq!(
        summary,
        [
            ("Meter/a".to_owned(), 1, 1, 4),
            ("Meter/b".to_owned(), 3, 3, 5),
            ("Other/x".to_owned(), 1, 1, 3),
        ]
    );
    let b_last = store.read_stream(&b, 3).await.unwrap().remove(0);
    assert_eq!(listed[1].last_recorded_at, b_last.recorded_at);
    assert_eq!(last.last_position, 5);
    let meters = store.streams(Some("Meter")).await.unwrap();
    assert_eq!(meters.len(), 2);
    assert!(store.streams(Some("None")).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_file_is_at_the_published_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let stored: u32 = raw(&path)
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored, eventfold_sqlite::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_close_the_db_file_alone_holds_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    seed(&store, "m-1", 20).await;
    fill(&store, 2_000, 10, 9).await;
    store.save_checkpoint("projection", 42).await.unwrap();
    // A read keeps a read connection busy until just before the close.
    let log = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(log.len(), 2_020);
    store.close().await.unwrap();
    assert_eq!(wal_size(&path), 0, "no commit is left in the -wal file");
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["events.db"], "no -wal or -shm file is left");

    // The .db file alone, copied elsewhere (as a backup tool or a move would).
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    let store = SqliteEventStore::open(&copy, SqliteOptions::new())
        .await
        .unwrap();
    assert_eq!(store.read_all(1, usize::MAX).await.unwrap(), log);
    assert_eq!(store.load_checkpoint("projection").await.unwrap(), Some(42));
    store.close().await.unwrap();
    assert_intact(&copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_grown_under_a_long_reader_comes_back_below_its_limit_once_the_reader_lets_go() {
    const LIMIT: u64 = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new().wal_size_limit(LIMIT))
        .await
        .unwrap();
    seed(&store, "m-1", 1).await;

    // Another process's long read transaction pins the WAL while 20,000 events go in.
    let reader = raw(&path);
    reader.execute_batch("BEGIN").unwrap();
    let seen: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(seen, 1);
    fill(&store, 20_000, 10, 16).await;
    let pinned = wal_size(&path);
    assert!(pinned > 4 * LIMIT, "the WAL grew to {pinned} bytes only");
    // While pinned, a checkpoint copies what it can but cannot truncate.
    let store_fast = SqliteEventStore::open(
        &path,
        SqliteOptions::new()
            .wal_size_limit(LIMIT)
            .busy_timeout(std::time::Duration::ZERO),
    )
    .await
    .unwrap();
    assert!(!store_fast.checkpoint().await.unwrap());
    store_fast.close().await.unwrap();
    assert!(wal_size(&path) > 4 * LIMIT);

    reader.execute_batch("COMMIT").unwrap();
    assert!(store.checkpoint().await.unwrap(), "nothing pins the WAL");
    assert!(wal_size(&path) <= LIMIT, "{} bytes", wal_size(&path));

    // Without an explicit checkpoint: the idle writer brings the WAL back by itself.
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    fill(&store, 20_000, 10, 16).await;
    assert!(wal_size(&path) > 4 * LIMIT);
    reader.execute_batch("COMMIT").unwrap();
    let before = store.writer_statistics().checkpoints;
    // One more write; when its queue is empty after it, the writer checkpoints. The
    // statistics count it, and the store wakes a waiter when it does.
    seed(&store, "m-2", 1).await;
    // The timeout only turns a writer that never checkpoints into a failure, not a hang.
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        store.__idle_checkpoints_past(before),
    )
    .await
    .expect("the idle writer never checkpointed");
    assert!(wal_size(&path) <= LIMIT, "{} bytes", wal_size(&path));
    assert_eq!(store.read_all(1, usize::MAX).await.unwrap().len(), 40_002);
    store.close().await.unwrap();
    assert_eq!(wal_size(&path), 0);
    assert_intact(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_appends_opens_as_a_store_with_every_event_committed_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = Arc::new(
        SqliteEventStore::open(&path, SqliteOptions::new())
            .await
            .unwrap(),
    );
    seed(&*store, "m-0", 10).await;
    let appenders: Vec<_> = (0..4)
        .map(|a| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..300u64 {
                    store
                        .append(
                            &meter(&format!("a-{a}")),
                            ExpectedVersion::Any,
                            vec![reading(i)],
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    // Wait until the appenders are under way.
    let mut head = store.watch_head();
    head.wait_for(|h| *h >= 200).await.unwrap();
    let committed = store.read_all(1, usize::MAX).await.unwrap();
    let target = dir.path().join("backup.db");
    store.backup(&target).await.unwrap();
    let during = store.head_position().await.unwrap();
    for appender in appenders {
        appender.await.unwrap();
    }
    let all = store.read_all(1, usize::MAX).await.unwrap();
    assert_eq!(all.len(), 1_210);
    assert!(
        (committed.len() as u64) < during && during < 1_210,
        "the backup ran while appends went on ({} .. {during})",
        committed.len()
    );

    // A backup never overwrites a file.
    let refused = store.backup(&path).await;
    assert_eq!(store_kind(refused), StoreErrorKind::CannotOpen);
    store.close().await.unwrap();
    assert_intact(&path);

    assert_intact(&target);
    let copy = SqliteEventStore::open(&target, SqliteOptions::new())
        .await
        .unwrap();
    let copied = copy.read_all(1, usize::MAX).await.unwrap();
    assert!(copied.len() >= committed.len());
    assert_eq!(
        copied,
        all[..copied.len()],
        "the copy is one moment of the log"
    );
    // And it is a store of its own.
    let version = copy.stream_version(&meter("m-0")).await.unwrap();
    copy.append(
        &meter("m-0"),
        ExpectedVersion::Exact(version),
        vec![reading(11)],
    )
    .await
    .unwrap();
    copy.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_memory_store_backs_up_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open_in_memory(SqliteOptions::new())
        .await
        .unwrap();
    let log = seed(&store, "m-1", 5).await;
    let target = dir.path().join("memory.db");
    store.backup(&target).await.unwrap();
    store.close().await.unwrap();
    let copy = SqliteEventStore::open(&target, SqliteOptions::new())
        .await
        .unwrap();
    assert_eq!(copy.read_all(1, usize::MAX).await.unwrap(), log);
    copy.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_database_on_read_only_media_opens_with_read_only() {
    let Some(media) = SmallTmpfs::mount("8M", "a_clean_database_on_read_only_media") else {
        return;
    };
    let path = media.path().join("events.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let before = seed(&store, "m-1", 30).await;
    store.save_checkpoint("projection", 3).await.unwrap();
    store.close().await.unwrap();
    // A second database left in WAL mode, as an older version of this library or a store
    // closed while another process had the file open leaves it: no -wal, no -shm.
    let wal_mode = media.path().join("wal-mode.db");
    let store = SqliteEventStore::open(&wal_mode, SqliteOptions::new())
        .await
        .unwrap();
    let wal_before = seed(&store, "m-1", 5).await;
    store.close().await.unwrap();
    let mode: String = raw(&wal_mode)
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(wal_size(&wal_mode), 0);
    if let Err(e) = media.remount_read_only() {
        eprintln!("skipped a_clean_database_on_read_only_media: cannot remount read-only ({e})");
        return;
    }
    assert!(
        std::fs::File::create(media.path().join("probe")).is_err(),
        "the media is read-only"
    );

    let reader = SqliteEventStore::open(&path, SqliteOptions::new().read_only(true))
        .await
        .expect("a clean database on read-only media opens read-only");
    assert_eq!(assert_kept(&reader, &before).await.len(), 30);
    assert_eq!(reader.stream_version(&meter("m-1")).await.unwrap(), 30);
    assert_eq!(reader.load_checkpoint("projection").await.unwrap(), Some(3));
    let append = reader
        .append(&meter("m-1"), ExpectedVersion::Exact(30), vec![reading(31)])
        .await;
    assert_eq!(store_kind(append), StoreErrorKind::ReadOnly);
    assert_eq!(
        store_kind(reader.checkpoint().await),
        StoreErrorKind::ReadOnly
    );
    reader.close().await.unwrap();

    let reader = SqliteEventStore::open(&wal_mode, SqliteOptions::new().read_only(true))
        .await
        .expect("a WAL database without a WAL on read-only media opens read-only");
    assert_eq!(assert_kept(&reader, &wal_before).await.len(), 5);
    reader.close().await.unwrap();

    // Read-write on read-only media is refused with a typed error, not a panic.
    match SqliteEventStore::open(&path, SqliteOptions::new()).await {
        Ok(store) => {
            let append = store
                .append(&meter("m-1"), ExpectedVersion::Exact(30), vec![reading(31)])
                .await;
            assert_eq!(store_kind(append), StoreErrorKind::ReadOnly);
            store.close().await.unwrap();
        }
        Err(error) => assert!(
            matches!(
                error.store_kind().unwrap(),
                StoreErrorKind::ReadOnly | StoreErrorKind::CannotOpen
            ),
            "{error}"
        ),
    }
}
