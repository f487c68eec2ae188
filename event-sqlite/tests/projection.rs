//! Projections kept in the store's file, applied in one transaction with their checkpoint:
//! exactly once through failures, panics, damaged rows, two runners on one file, a rebuild,
//! and a real process SIGKILLed while it applies.

#[path = "../../tests/common/projection_cases.rs"]
mod cases;
mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use eventfold_core::projection::{ProjectionHandle, ProjectionOptions, ProjectionProgress};
use eventfold_core::{
    BoxError, Error, EventLog, ExpectedVersion, Metadata, NewEvent, RecordedEvent, RetryPolicy,
    SubscriptionStore, UnknownEventPolicy,
};
use eventfold_sqlite::rusqlite::{self, Transaction, params};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions, SqliteProjection};

/// Keeps, per meter, the sum of its readings and a row per applied event (so an event
/// applied twice shows as two rows). Fails on readings of `fail_on` units, `failures`
/// times (or always, for `u32::MAX`), and panics on `panic_on` units.
#[derive(Default)]
struct Totals {
    fail_on: Option<u64>,
    failures: u32,
    panic_on: Option<u64>,
    cleared: u32,
}

impl SqliteProjection for Totals {
    type Event = MeterEvent;

    fn name(&self) -> &str {
        "totals"
    }

    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS totals (meter TEXT PRIMARY KEY, units INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS applied (position INTEGER NOT NULL, event_id TEXT NOT NULL);",
        )?;
        Ok(())
    }

    fn clear(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.cleared += 1;
        tx.execute_batch("DELETE FROM totals; DELETE FROM applied;")?;
        Ok(())
    }

    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        event: &MeterEvent,
        recorded: &RecordedEvent,
    ) -> Result<(), BoxError> {
        let MeterEvent::Read { units } = event else {
            return Ok(());
        };
        // Written before the failure, so a failure that did not roll back would show.
        tx.execute(
            "INSERT INTO applied (position, event_id) VALUES (?1, ?2)",
            params![recorded.position as i64, recorded.event_id.to_string()],
        )?;
        if Some(*units) == self.panic_on {
            panic!("a bug in the projection");
        }
        if Some(*units) == self.fail_on && self.failures > 0 {
            self.failures = self.failures.saturating_sub(1);
            return Err(format!("cannot apply {units}").into());
        }
        tx.execute(
            "INSERT INTO totals (meter, units) VALUES (?1, ?2) \
             ON CONFLICT (meter) DO UPDATE SET units = units + excluded.units",
            params![recorded.aggregate_id, *units as i64],
        )?;
        Ok(())
    }
}

/// What the read model holds: the totals, and how often each position was applied.
fn read_model(path: &std::path::Path) -> (BTreeMap<String, u64>, BTreeMap<u64, u32>) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut totals = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT meter, units FROM totals").unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        totals.insert(
            row.get::<_, String>(0).unwrap(),
            row.get::<_, i64>(1).unwrap() as u64,
        );
    }
    let mut applied = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT position FROM applied").unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        *applied
            .entry(row.get::<_, i64>(0).unwrap() as u64)
            .or_insert(0) += 1;
    }
    (totals, applied)
}

/// `count` readings, units 1..=count, appended ten to an append, each append to one of
/// `meters` meters; returns each meter's total.
async fn seed_meters(store: &SqliteEventStore, meters: u64, count: u64) -> BTreeMap<String, u64> {
    let mut expected = BTreeMap::new();
    let mut units = 1;
    while units <= count {
        let id = format!("m-{}", (units / 10) % meters);
        let last = (units + 9).min(count);
        let batch: Vec<NewEvent> = (units..=last).map(reading).collect();
        store
            .append(&meter(&id), ExpectedVersion::Any, batch)
            .await
            .unwrap();
        *expected.entry(id).or_insert(0) += (units..=last).sum::<u64>();
        units = last + 1;
    }
    expected
}

async fn open(path: &std::path::Path) -> SqliteEventStore {
    SqliteEventStore::open(path, SqliteOptions::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn every_event_is_applied_once_with_its_checkpoint_and_later_appends_follow() {
    let subject = File::new().await;
    cases::every_event_is_applied_once_and_later_appends_follow(&subject, 1_000).await;
    cases::Subject::close(&subject).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_event_is_retried_then_dead_lettered_and_what_follows_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path).await;
    store
        .append(
            &meter("a"),
            ExpectedVersion::Any,
            (1..=10).map(reading).collect(),
        )
        .await
        .unwrap();
    // Fails on 4 always; the retries wait an hour of paused time in all.
    let projection = Totals {
        fail_on: Some(4),
        failures: u32::MAX,
        ..Totals::default()
    };
    let retry = RetryPolicy::exponential(3, Duration::from_secs(600), Duration::from_secs(3600));
    let handle = store
        .run_projection(projection, ProjectionOptions::new().retry(retry))
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    let progress = handle.progress();
    assert_eq!(
        (
            progress.checkpoint,
            progress.applied,
            progress.dead_lettered
        ),
        (10, 9, 1)
    );
    let letters = store.dead_letters(Some("totals")).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].position, letters[0].attempts), (4, 3));
    assert!(
        letters[0].error.contains("cannot apply 4"),
        "{}",
        letters[0].error
    );
    assert_eq!(letters[0].event_type, "MeterRead");
    handle.stop().await.unwrap();
    let (totals, applied) = read_model(&path);
    assert_eq!(totals["a"], 55 - 4);
    // The failed attempts' own writes were rolled back with them.
    assert_eq!(
        applied.keys().copied().collect::<Vec<_>>(),
        vec![1, 2, 3, 5, 6, 7, 8, 9, 10]
    );
    assert!(applied.values().all(|&n| n == 1));
    store.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_event_that_succeeds_on_a_retry_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path).await;
    store
        .append(
            &meter("a"),
            ExpectedVersion::Any,
            (1..=6).map(reading).collect(),
        )
        .await
        .unwrap();
    let projection = Totals {
        fail_on: Some(5),
        failures: 2,
        ..Totals::default()
    };
    let handle = store
        .run_projection(projection, ProjectionOptions::new())
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    assert_eq!(handle.progress().dead_lettered, 0);
    handle.stop().await.unwrap();
    let (totals, applied) = read_model(&path);
    assert_eq!(totals["a"], 21);
    assert_eq!(applied.len(), 6);
    assert!(applied.values().all(|&n| n == 1));
    assert!(store.dead_letters(None).await.unwrap().is_empty());
    store.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_panicking_projection_is_an_attempt_that_failed_and_the_runner_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path).await;
    store
        .append(
            &meter("a"),
            ExpectedVersion::Any,
            (1..=5).map(reading).collect(),
        )
        .await
        .unwrap();
    let projection = Totals {
        panic_on: Some(2),
        ..Totals::default()
    };
    let handle = store
        .run_projection(
            projection,
            ProjectionOptions::new().retry(RetryPolicy::never()),
        )
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    let letters = store.dead_letters(Some("totals")).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].error.contains("a bug in the projection"),
        "{}",
        letters[0].error
    );
    // It still runs: a later event is applied.
    store
        .append(&meter("a"), ExpectedVersion::Any, vec![reading(100)])
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(read_model(&path).0["a"], 15 - 2 + 100);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_damaged_row_and_an_unknown_type_are_dead_lettered_and_other_aggregates_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path).await;
    store
        .append(
            &meter("a"),
            ExpectedVersion::Any,
            (1..=4).map(reading).collect(),
        )
        .await
        .unwrap();
    let raw = |event_type: &str, aggregate: &str| {
        NewEvent {
            event_id: uuid::Uuid::now_v7(),
            event_type: event_type.to_owned(),
            schema_version: 1,
            occurred_at: chrono::Utc::now(),
            metadata: Metadata::new(),
            payload: "{}".to_owned(),
        }
        .with_stream(aggregate)
    };
    let (unknown, stream) = raw("MeterExploded", "Meter");
    store
        .append(&stream, ExpectedVersion::Any, vec![unknown])
        .await
        .unwrap();
    let (other, stream) = raw("LampLit", "Lamp");
    store
        .append(&stream, ExpectedVersion::Any, vec![other])
        .await
        .unwrap();
    store
        .append(&meter("a"), ExpectedVersion::Any, vec![reading(10)])
        .await
        .unwrap();
    // Damage the payload of position 2 behind the store's back: its checksum no longer fits.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE events SET payload = '{\"Read\":{\"units\":999}}' WHERE position = 2",
            [],
        )
        .unwrap();
    }
    let handle = store
        .run_projection(Totals::default(), ProjectionOptions::new())
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    let progress = handle.progress();
    assert_eq!((progress.checkpoint, progress.applied), (7, 4));
    assert_eq!((progress.dead_lettered, progress.skipped), (2, 1));
    let letters = store.dead_letters(Some("totals")).await.unwrap();
    let positions: Vec<u64> = letters.iter().map(|l| l.position).collect();
    assert_eq!(positions, vec![2, 5]);
    assert!(
        letters[1].error.contains("MeterExploded"),
        "{}",
        letters[1].error
    );
    handle.stop().await.unwrap();
    assert_eq!(read_model(&path).0["a"], 1 + 3 + 4 + 10);

    // Told to pass unknown types over, a fresh projection dead-letters only the damage.
    let handle = store
        .run_projection(
            Renamed("totals-2", Totals::default()),
            ProjectionOptions::new().unknown_events(UnknownEventPolicy::Skip),
        )
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    assert_eq!(handle.progress().dead_lettered, 1);
    assert_eq!(handle.progress().skipped, 2);
    handle.stop().await.unwrap();
    store.close().await.unwrap();
}

/// A projection under another name.
struct Renamed<P>(&'static str, P);

impl<P: SqliteProjection> SqliteProjection for Renamed<P> {
    type Event = P::Event;
    fn name(&self) -> &str {
        self.0
    }
    fn setup(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.1.setup(tx)
    }
    fn clear(&mut self, tx: &Transaction<'_>) -> Result<(), BoxError> {
        self.1.clear(tx)
    }
    fn apply(
        &mut self,
        tx: &Transaction<'_>,
        event: &P::Event,
        recorded: &RecordedEvent,
    ) -> Result<(), BoxError> {
        self.1.apply(tx, event, recorded)
    }
}

trait WithStream {
    fn with_stream(self, aggregate: &str) -> (NewEvent, eventfold_core::StreamId);
}

impl WithStream for NewEvent {
    fn with_stream(self, aggregate: &str) -> (NewEvent, eventfold_core::StreamId) {
        (
            self,
            eventfold_core::StreamId::new(aggregate.to_owned(), "x"),
        )
    }
}

#[tokio::test]
async fn a_rebuild_clears_the_read_model_and_its_dead_letters_and_replays_with_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = open(&path).await;
    let expected = seed_meters(&store, 5, 500).await;
    let projection = Totals {
        fail_on: Some(7),
        failures: u32::MAX,
        ..Totals::default()
    };
    let handle = store
        .run_projection(
            projection,
            ProjectionOptions::new().retry(RetryPolicy::never()),
        )
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    assert_eq!(store.dead_letters(Some("totals")).await.unwrap().len(), 1);

    let mut progress = handle.watch_progress();
    handle.rebuild().await.unwrap();
    // Seen from outside: rebuilding, then caught up with every event done.
    let seen: ProjectionProgress = progress
        .wait_for(|p| !p.rebuilding && p.checkpoint == 500)
        .await
        .unwrap()
        .clone();
    assert_eq!(seen.remaining(), 0);
    handle.wait_idle().await.unwrap();
    let projection = handle.stop().await.unwrap();
    assert_eq!(projection.cleared, 1);
    let (totals, applied) = read_model(&path);
    assert_eq!(applied.len(), 499, "every event but the failing one, once");
    assert!(applied.values().all(|&n| n == 1));
    assert_eq!(
        totals.values().sum::<u64>(),
        expected.values().sum::<u64>() - 7
    );
    // The rebuild removed the old letter, and the replay wrote it again: one.
    assert_eq!(store.dead_letters(Some("totals")).await.unwrap().len(), 1);
    store.close().await.unwrap();
}

#[tokio::test]
async fn two_runners_on_one_file_apply_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let first = open(&path).await;
    let second = open(&path).await;
    let one = first
        .run_projection(Totals::default(), ProjectionOptions::new().batch_size(16))
        .await
        .unwrap();
    let two = second
        .run_projection(Totals::default(), ProjectionOptions::new().batch_size(16))
        .await
        .unwrap();
    let expected = seed_meters(&first, 9, 2_000).await;
    one.wait_idle().await.unwrap();
    two.wait_idle().await.unwrap();
    let applied_by = one.progress().applied + two.progress().applied;
    one.stop().await.unwrap();
    two.stop().await.unwrap();
    assert_eq!(applied_by, 2_000);
    let (totals, applied) = read_model(&path);
    assert_eq!(totals, expected);
    assert_eq!(applied.len(), 2_000);
    assert!(applied.values().all(|&n| n == 1));
    first.close().await.unwrap();
    second.close().await.unwrap();
}

#[tokio::test]
async fn a_projection_may_start_at_the_end_and_an_in_memory_store_has_none() {
    let subject = File::new().await;
    cases::a_projection_starting_at_the_end_sees_only_later_events(&subject).await;
    let store = &subject.store;

    let memory = SqliteEventStore::open_in_memory(SqliteOptions::new())
        .await
        .unwrap();
    let refused = memory
        .run_projection(Totals::default(), ProjectionOptions::new())
        .await
        .unwrap_err();
    assert!(matches!(refused, Error::InvalidSetting { .. }), "{refused}");
    let refused = store
        .run_projection(Totals::default(), ProjectionOptions::new().batch_size(0))
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        Error::InvalidSetting {
            setting: "batch_size",
            ..
        }
    ));
    store.close().await.unwrap();
}

/// A store in a file of its own with `Totals`, for the shared cases.
struct File {
    store: SqliteEventStore,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl File {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        File {
            store: open(&path).await,
            path,
            _dir: dir,
        }
    }
}

impl cases::Subject for File {
    type Projection = Totals;
    const NAME: &str = "totals";

    fn store(&self) -> &dyn eventfold_core::ArchiveStore {
        &self.store
    }

    fn stream(id: &str) -> eventfold_core::StreamId {
        meter(id)
    }

    fn event(value: u64) -> NewEvent {
        reading(value)
    }

    /// The same store: one file, appended to while the runner reads it.
    async fn seed_elsewhere(&self, streams: u64, count: u64) -> BTreeMap<String, u64> {
        seed_meters(&self.store, streams, count).await
    }

    async fn seed(&self, streams: u64, count: u64) -> BTreeMap<String, u64> {
        seed_meters(&self.store, streams, count).await
    }

    async fn run(&self, options: ProjectionOptions) -> ProjectionHandle<Totals> {
        self.store
            .run_projection(Totals::default(), options)
            .await
            .unwrap()
    }

    async fn read_model(&self) -> (BTreeMap<String, u64>, BTreeMap<u64, u32>) {
        read_model(&self.path)
    }

    async fn close(&self) {
        self.store.close().await.unwrap();
    }

    async fn reopen(&mut self) {
        self.store = open(&self.path).await;
    }
}

#[tokio::test]
async fn a_rebuild_after_a_prune_stops_at_the_archive_instead_of_passing_over_it() {
    cases::a_rebuild_after_a_prune_stops_at_the_archive_instead_of_passing_over_it(
        File::new().await,
    )
    .await;
}

const CHILD_DATABASE: &str = "EVENTFOLD_SQLITE_PROJECTION_CHILD_DATABASE";

/// The child of the kill case: runs the projection until killed, printing its checkpoint
/// as it moves. Does nothing in a normal test run.
#[test]
fn projection_child_entry() {
    let Ok(path) = std::env::var(CHILD_DATABASE) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = open(std::path::Path::new(&path)).await;
        let handle = store
            .run_projection(Totals::default(), ProjectionOptions::new().batch_size(8))
            .await
            .unwrap();
        cases::print_checkpoints(handle).await;
    });
}

#[tokio::test]
async fn a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once() {
    let subject = File::new().await;
    let child = cases::KilledChild {
        test: "projection_child_entry",
        env: CHILD_DATABASE,
        value: subject.path.display().to_string(),
    };
    cases::a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once(
        subject, child, 3_000, 400, 2_000,
    )
    .await;
}
