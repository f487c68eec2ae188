//! The projection cases the SQLite and the PostgreSQL store both run, one body each:
//! event-sqlite/tests/projection.rs and event-postgres/tests/projection.rs name the cases
//! and give their store's projection (each keeps, per stream, the sum of its events and a
//! row per applied event) through [`Subject`].

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use eventfold_core::archive::{self, ArchiveRange};
use eventfold_core::projection::{ProjectionHandle, ProjectionOptions};
use eventfold_core::{ArchiveStore, ExpectedVersion, NewEvent, StreamId};

/// A store under test with its projection.
pub trait Subject {
    /// The store's test projection.
    type Projection: Send + 'static;
    /// The projection's name (its checkpoint's).
    const NAME: &str;
    /// The store.
    fn store(&self) -> &dyn ArchiveStore;
    /// A stream of the projection's events.
    fn stream(id: &str) -> StreamId;
    /// An event of `value` (what the projection sums).
    fn event(value: u64) -> NewEvent;
    /// Appends `count` events, ten to an append, over `streams` streams; returns each
    /// stream's sum.
    fn seed(&self, streams: u64, count: u64) -> impl Future<Output = BTreeMap<String, u64>>;
    /// As [`seed`](Self::seed), through another handle on the store if it has one that is
    /// as another process's (PostgreSQL: another store on the schema), else its own.
    fn seed_elsewhere(
        &self,
        streams: u64,
        count: u64,
    ) -> impl Future<Output = BTreeMap<String, u64>>;
    /// Runs the projection (one that never fails) with `options`.
    fn run(
        &self,
        options: ProjectionOptions,
    ) -> impl Future<Output = ProjectionHandle<Self::Projection>>;
    /// The read model: the sums, and how often each position was applied.
    fn read_model(&self) -> impl Future<Output = (BTreeMap<String, u64>, BTreeMap<u64, u32>)>;
    /// Closes the store.
    fn close(&self) -> impl Future<Output = ()>;
    /// Opens the store again, after [`close`](Self::close).
    fn reopen(&mut self) -> impl Future<Output = ()>;
}

/// `events` events on 7 streams, applied in batches of 64 with their checkpoint; 20 more
/// appended while it runs follow.
pub async fn every_event_is_applied_once_and_later_appends_follow<S: Subject>(
    subject: &S,
    events: u64,
) {
    let mut expected = subject.seed(7, events).await;
    let handle = subject.run(ProjectionOptions::new().batch_size(64)).await;
    handle.wait_idle().await.unwrap();
    let progress = handle.progress();
    assert_eq!((progress.checkpoint, progress.applied), (events, events));
    assert_eq!(
        subject.store().load_checkpoint(S::NAME).await.unwrap(),
        Some(events)
    );

    // Appended while it runs: applied as they come.
    for (id, sum) in subject.seed_elsewhere(3, 20).await {
        *expected.entry(id).or_insert(0) += sum;
    }
    handle.wait_idle().await.unwrap();
    assert_eq!(handle.progress().applied, events + 20);
    handle.stop().await.unwrap();
    let (sums, applied) = subject.read_model().await;
    assert_eq!(sums, expected);
    assert_eq!(applied.len() as u64, events + 20);
    assert!(
        applied.values().all(|&n| n == 1),
        "an event was applied twice"
    );
}

/// Started at the end, a projection applies only what is appended after.
pub async fn a_projection_starting_at_the_end_sees_only_later_events<S: Subject>(subject: &S) {
    subject.seed(2, 30).await;
    let handle = subject
        .run(ProjectionOptions::new().start_from(eventfold_core::StartFrom::End))
        .await;
    assert_eq!(handle.progress().checkpoint, 30);
    subject
        .store()
        .append(&S::stream("late"), ExpectedVersion::Any, vec![S::event(5)])
        .await
        .unwrap();
    handle.wait_idle().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(
        subject.read_model().await.0,
        BTreeMap::from([("late".to_owned(), 5)])
    );
}

pub async fn a_rebuild_after_a_prune_stops_at_the_archive_instead_of_passing_over_it(
    subject: impl Subject,
) {
    let dir = tempfile::tempdir().unwrap();
    let expected = subject.seed(3, 30).await;
    let handle = subject.run(ProjectionOptions::new()).await;
    handle.wait_idle().await.unwrap();
    let archive_path = dir.path().join("old.ndjson.gz");
    let manifest = archive::export(
        subject.store(),
        ArchiveRange::BelowPosition(21),
        &archive_path,
        &mut archive::no_progress,
    )
    .await
    .unwrap();
    archive::prune(subject.store(), &archive_path, &mut archive::no_progress)
        .await
        .unwrap();

    // Rebuilt from the start, the runner meets the pruned positions 1..=20: it names the
    // archive and waits there, and applies none of the events behind it.
    handle.rebuild().await.unwrap();
    let mut watch = handle.watch_progress();
    let stuck = tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|p| p.last_error.is_some() || p.checkpoint >= 30),
    )
    .await
    .expect("the runner either stops at the archive or passes it")
    .unwrap()
    .clone();
    let message = stuck.last_error.unwrap();
    assert!(
        message.contains(&manifest.archive.to_string()) && message.contains("position 1"),
        "{message}"
    );
    assert_eq!(stuck.checkpoint, 0);
    handle.stop().await.unwrap();
    assert!(
        subject.read_model().await.0.is_empty(),
        "nothing past the gap was applied"
    );

    // Restored, the same rebuild goes through every event.
    archive::restore(subject.store(), &archive_path, &mut archive::no_progress)
        .await
        .unwrap();
    let handle = subject.run(ProjectionOptions::new()).await;
    handle.wait_idle().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(subject.read_model().await.0, expected);
    subject.close().await;
}

/// How a store's kill case runs its child: the test binary re-run with `--exact test`
/// and `env=value` set; the test then calls [`print_checkpoints`] and nothing else.
pub struct KilledChild {
    pub test: &'static str,
    pub env: &'static str,
    pub value: String,
}

/// The child's work: prints the projection's checkpoint as it moves, until killed.
pub async fn print_checkpoints<P: Send + 'static>(handle: ProjectionHandle<P>) {
    let mut progress = handle.watch_progress();
    loop {
        println!("checkpoint {}", progress.borrow_and_update().checkpoint);
        if progress.changed().await.is_err() {
            break;
        }
    }
}

/// Starts the child and SIGKILLs it once its checkpoint passed `past`.
fn run_child_and_kill(child: &KilledChild, past: u64) {
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", child.test, "--nocapture", "--test-threads=1"])
        .env(child.env, &child.value)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the child starts");
    let stdout = BufReader::new(process.stdout.take().unwrap());
    for line in stdout.lines() {
        let line = line.expect("the child's output");
        if let Some(checkpoint) = line.strip_prefix("checkpoint ")
            && checkpoint.parse::<u64>().unwrap() > past
        {
            break;
        }
    }
    process.kill().expect("SIGKILL");
    process.wait().unwrap();
}

/// `events` events on 11 streams; a child runs the projection (in batches of 8) and is
/// killed five times, each after its checkpoint passed another `step`; then a runner
/// here finishes. Every event is applied exactly once, and the children applied more than
/// `children_applied_more_than`.
pub async fn a_projection_killed_while_it_applies_resumes_with_every_event_applied_exactly_once(
    mut subject: impl Subject,
    child: KilledChild,
    events: u64,
    step: u64,
    children_applied_more_than: u64,
) {
    let expected = subject.seed(11, events).await;
    // The children have the store to themselves.
    subject.close().await;
    let child = std::sync::Arc::new(child);
    // Killed five times, each after it has gone further; the batches are small, so most
    // kills land with a batch under way.
    for round in 1..=5u64 {
        let child = std::sync::Arc::clone(&child);
        tokio::task::spawn_blocking(move || run_child_and_kill(&child, round * step))
            .await
            .unwrap();
    }
    subject.reopen().await;
    let handle = subject.run(ProjectionOptions::new()).await;
    handle.wait_idle().await.unwrap();
    let children_applied = events - handle.progress().applied;
    assert!(
        children_applied > children_applied_more_than,
        "the children applied {children_applied}"
    );
    handle.stop().await.unwrap();
    let (sums, applied) = subject.read_model().await;
    assert_eq!(sums, expected);
    assert_eq!(applied.len() as u64, events);
    assert!(
        applied.values().all(|&n| n == 1),
        "an event was applied twice"
    );
    subject.close().await;
}
