//! Archiving old history: export events to a compressed, self-describing file, verify it
//! against the store, prune what was exported, and restore it.
//!
//! An archive file is gzip-compressed newline-delimited JSON: its first line is the
//! [`ArchiveManifest`] (format version, store, range, count, content checksum, creation
//! time), each further line one stored event exactly as the store holds it (a
//! [`RecordedEvent`]: id, stream, version, position, type, schema version, payload,
//! metadata, both times), in position order. `gzip -dc FILE` shows it. The checksum
//! (XXH3-64, in hex) covers the event lines byte for byte.
//!
//! The rules, kept by [`prune`] and by the store in the same transaction as the removal:
//! - a prune never removes an event that a subscription has not handled (every checkpoint
//!   must be at or past the archive's last position, and so must every segment of a
//!   subscription split into segments, one that never saved a checkpoint counting as
//!   position 0, else [`Error::PruneBehindSubscription`]; see [`check_readers`]);
//! - a stream either loses all its events, or keeps its latest snapshot and the events
//!   from the snapshot's version on (a load replays from the snapshot's own version, to
//!   check that the snapshot fits), so it still loads: the last pruned version must be
//!   below the snapshot's (else [`Error::PruneBreaksStream`]);
//! - the remaining events keep their positions and versions; appends go on numbering
//!   after the pruned ones;
//! - the store records the archive in its horizon, and a read of anything pruned fails with
//!   [`Error::Archived`] naming the archive, never a silent gap;
//! - [`restore`] brings the exact rows back and removes the archive from the horizon.
//!
//! Retention settings ([`RetentionRule`]: a maximum age or count per stream type or stream)
//! go through the same export and prune ([`apply_retention`]); they archive only what the
//! rules above allow (a stream keeps its latest snapshot's event and everything after it,
//! and nothing past the slowest checkpoint goes).
//!
//! Every function takes a progress callback, called with the events done and to do.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result};
use crate::record::{RecordedEvent, StreamId};
use crate::store::ArchiveStore;

/// The `format` of every archive manifest.
pub const FORMAT: &str = "eventfold-archive";

/// The version of the archive format this library writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Events per read from the store and per batch handed between threads.
const BATCH: usize = 4_096;

/// Which events an export takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ArchiveRange {
    /// Every stored event of the streams whose last event was recorded before this time
    /// (whole streams that have gone quiet).
    StreamsIdleBefore(DateTime<Utc>),
    /// Every stored event below this position.
    BelowPosition(u64),
    /// What these retention rules select at `now` (see [`apply_retention`]).
    Retention {
        /// The rules.
        rules: Vec<RetentionRule>,
        /// The time the rules' ages count from.
        now: DateTime<Utc>,
    },
}

/// A retention setting: how much history a stream type or one stream keeps.
///
/// An event goes when it is older than `max_age` (by its recording time) or when more than
/// `max_count` newer events of its stream follow it; either limit may be left out. A rule
/// for a stream takes precedence over one for its stream type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionRule {
    /// What the rule applies to.
    pub scope: RetentionScope,
    /// Events recorded longer ago than this go.
    pub max_age: Option<Duration>,
    /// Each stream keeps at most this many of its newest events.
    pub max_count: Option<u64>,
}

/// What a [`RetentionRule`] applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionScope {
    /// Every stream of this aggregate type.
    StreamType(String),
    /// One stream.
    Stream(StreamId),
}

impl RetentionRule {
    /// A rule for every stream of an aggregate type, with no limit yet.
    pub fn stream_type(aggregate_type: impl Into<String>) -> Self {
        RetentionRule {
            scope: RetentionScope::StreamType(aggregate_type.into()),
            max_age: None,
            max_count: None,
        }
    }

    /// A rule for one stream, with no limit yet.
    pub fn stream(stream: StreamId) -> Self {
        RetentionRule {
            scope: RetentionScope::Stream(stream),
            max_age: None,
            max_count: None,
        }
    }

    /// Sets the maximum age.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Sets the maximum count per stream.
    pub fn max_count(mut self, count: u64) -> Self {
        self.max_count = Some(count);
        self
    }
}

/// The first line of an archive file: what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveManifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The format version ([`FORMAT_VERSION`] when this library wrote it).
    pub format_version: u32,
    /// The archive's id; the store's horizon names it.
    pub archive: Uuid,
    /// The store it was exported from ([`ArchiveStore::archive_store_name`]).
    pub store: String,
    /// What was asked for.
    pub range: ArchiveRange,
    /// When the export ran.
    pub created_at: DateTime<Utc>,
    /// How many events it holds.
    pub events: u64,
    /// XXH3-64 of the event lines (each with its newline), 16 hex digits.
    pub checksum: String,
    /// The lowest position in it.
    pub first_position: Option<u64>,
    /// The highest position in it.
    pub last_position: Option<u64>,
    /// The lowest event id in it.
    pub first_event_id: Option<Uuid>,
    /// The highest event id in it.
    pub last_event_id: Option<Uuid>,
}

/// What a store records of a pruned archive: its part of the archive horizon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveHorizon {
    /// The archive's id.
    pub archive: Uuid,
    /// The archive file, as given to [`prune`].
    pub path: String,
    /// How many events were pruned.
    pub events: u64,
    /// The archive's content checksum.
    pub checksum: u64,
    /// The lowest pruned position.
    pub first_position: u64,
    /// The highest pruned position.
    pub last_position: u64,
    /// The lowest pruned event id.
    pub first_event_id: Uuid,
    /// The highest pruned event id.
    pub last_event_id: Uuid,
    /// The versions each stream lost.
    pub streams: Vec<PrunedStream>,
    /// When the prune ran.
    pub pruned_at: DateTime<Utc>,
}

/// The versions `first_version..=last_version` of a stream, pruned into one archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedStream {
    /// The stream.
    pub stream: StreamId,
    /// Its first pruned version.
    pub first_version: u64,
    /// Its last pruned version.
    pub last_version: u64,
}

/// What [`ArchiveStore::prune_archive`] removes and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRequest {
    /// The horizon entry to record.
    pub horizon: ArchiveHorizon,
    /// Each event to remove: its position and id.
    pub events: Vec<(u64, Uuid)>,
}

/// How far a long archive operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Events done.
    pub done: u64,
    /// Events to do in all (an estimate during an export by position, exact otherwise).
    pub total: u64,
}

/// Where an archive's events are, as [`verify`] found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArchiveState {
    /// Every event in the archive is stored identically.
    Stored,
    /// The archive was pruned from the store: its horizon names it with the same count and
    /// checksum, and none of its events is stored.
    Pruned,
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The archive's manifest.
    pub manifest: ArchiveManifest,
    /// Where its events are.
    pub state: ArchiveState,
}

/// A progress callback.
pub type ProgressFn<'a> = &'a mut (dyn FnMut(Progress) + Send);

/// A callback for a caller that does not follow progress.
pub fn no_progress(_: Progress) {}

fn file_error(path: &Path, reason: impl Into<String>, source: Option<std::io::Error>) -> Error {
    Error::ArchiveFile {
        path: path.display().to_string(),
        reason: reason.into(),
        source,
    }
}

fn damaged(path: &Path, reason: impl Into<String>, source: Option<crate::BoxError>) -> Error {
    Error::ArchiveDamaged {
        path: path.display().to_string(),
        reason: reason.into(),
        source,
    }
}

fn mismatch(path: &Path, reason: impl Into<String>) -> Error {
    Error::ArchiveMismatch {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the runtime shut down during archive work: {e}"),
    }
}

// ----------------------------------------------------------------------------------------
// The rules a store checks in its prune transaction

/// The prune rule for the readers of the log, which a store checks in the transaction of
/// [`ArchiveStore::prune_archive`]: every checkpoint must be at or past `needed` (the
/// archive's last position), and so must every segment of a subscription split into
/// segments (`segmented`: each subscription's stored segment count), a segment whose
/// checkpoint was never saved counting as position 0 (it has handled nothing yet).
/// Otherwise [`Error::PruneBehindSubscription`] naming the first reader behind, by name.
pub fn check_readers(
    checkpoints: &[(String, u64)],
    segmented: &[(String, u32)],
    needed: u64,
) -> Result<()> {
    let saved: HashMap<&str, u64> = checkpoints
        .iter()
        .map(|(name, position)| (name.as_str(), *position))
        .collect();
    let unsaved = segmented
        .iter()
        .filter(|(_, segments)| *segments > 1)
        .flat_map(|(subscription, segments)| {
            (0..*segments).map(move |segment| {
                crate::lease::segment_checkpoint_name(subscription, segment, *segments)
            })
        })
        .filter(|name| !saved.contains_key(name.as_str()))
        .map(|name| (name, 0));
    let behind = checkpoints
        .iter()
        .cloned()
        .chain(unsaved)
        .filter(|(_, position)| *position < needed)
        .min_by(|a, b| a.0.cmp(&b.0));
    match behind {
        Some((subscription, checkpoint)) => Err(Error::PruneBehindSubscription {
            subscription,
            checkpoint,
            needed,
        }),
        None => Ok(()),
    }
}

/// What a store holds of one stream of a prune, as its prune transaction reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredStream {
    /// The lowest version stored (`None`: no event of it is stored).
    pub lowest: Option<u64>,
    /// The highest version stored (0: none).
    pub highest: u64,
    /// The version of its snapshot, if it has one.
    pub snapshot: Option<u64>,
}

/// The prune rule for one stream, which a store checks in the transaction of
/// [`ArchiveStore::prune_archive`]: the archive's part of the stream is a prefix of what
/// is stored (else [`Error::ArchiveMismatch`] on `path`), and the stream either loses all
/// its events or keeps a snapshot above the last pruned version, since a load replays
/// from the snapshot's own version (else [`Error::PruneBreaksStream`]).
pub fn check_stream(path: &str, pruned: &PrunedStream, stored: StoredStream) -> Result<()> {
    let stream = &pruned.stream;
    if stored.lowest != Some(pruned.first_version) {
        return Err(Error::ArchiveMismatch {
            path: path.to_owned(),
            reason: format!(
                "{stream} holds versions from {}, not from version {} where the archive's part \
                 of it starts",
                stored
                    .lowest
                    .map_or_else(|| "none".to_owned(), |v| v.to_string()),
                pruned.first_version
            ),
        });
    }
    if pruned.last_version < stored.highest {
        let snapshot = stored.snapshot.filter(|v| *v <= stored.highest);
        if snapshot.is_none_or(|s| s <= pruned.last_version) {
            return Err(Error::PruneBreaksStream {
                aggregate_type: stream.aggregate_type.clone(),
                aggregate_id: stream.aggregate_id.clone(),
                pruned: pruned.last_version,
                snapshot,
            });
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------
// Selecting

/// Which events of a scan of the store an export takes.
enum Selector {
    /// Positions below this one.
    Below(u64),
    /// Each listed stream's versions up to its cut, at positions up to `last_position`.
    Cuts {
        cuts: HashMap<StreamId, u64>,
        first_position: u64,
        last_position: u64,
    },
}

impl Selector {
    fn first_position(&self) -> u64 {
        match self {
            Selector::Below(_) => 1,
            Selector::Cuts { first_position, .. } => *first_position,
        }
    }

    /// True past the last position it can select.
    fn beyond(&self, position: u64) -> bool {
        match self {
            Selector::Below(below) => position >= *below,
            Selector::Cuts { last_position, .. } => position > *last_position,
        }
    }

    fn selects(&self, event: &RecordedEvent) -> bool {
        match self {
            Selector::Below(below) => event.position < *below,
            Selector::Cuts { cuts, .. } => {
                // Looked up without building a `StreamId` per event.
                cuts.get(&StreamId::new(&*event.aggregate_type, &event.aggregate_id))
                    .is_some_and(|cut| event.version <= *cut)
            }
        }
    }
}

/// Per stream, what a selection scan keeps: each event's version, position and time.
#[derive(Default)]
struct StreamScan {
    events: Vec<(u64, u64, DateTime<Utc>)>,
}

/// Reads every stored event once and hands it to `see`.
async fn scan_all(
    store: &dyn ArchiveStore,
    mut see: impl FnMut(&RecordedEvent) + Send,
) -> Result<()> {
    let mut from = 1;
    loop {
        let batch = store.read_stored(from, BATCH).await?;
        let Some(last) = batch.last() else {
            return Ok(());
        };
        from = last.position + 1;
        batch.iter().for_each(&mut see);
    }
}

/// Resolves a range into a selector.
async fn select(store: &dyn ArchiveStore, range: &ArchiveRange) -> Result<(Selector, u64)> {
    match range {
        ArchiveRange::BelowPosition(below) => {
            let head = store.head_position().await?;
            let pruned: u64 = store
                .archive_horizon()
                .await?
                .iter()
                .filter(|h| h.last_position < *below)
                .map(|h| h.events)
                .sum();
            let span = below.saturating_sub(1).min(head);
            Ok((Selector::Below(*below), span.saturating_sub(pruned)))
        }
        ArchiveRange::StreamsIdleBefore(before) => {
            let mut last: HashMap<StreamId, (u64, DateTime<Utc>)> = HashMap::new();
            scan_all(store, |e| {
                last.insert(e.stream_id(), (e.version, e.recorded_at));
            })
            .await?;
            let cuts: HashMap<StreamId, u64> = last
                .into_iter()
                .filter(|(_, (_, at))| at < before)
                .map(|(stream, (version, _))| (stream, version))
                .collect();
            cuts_selector(store, cuts).await
        }
        ArchiveRange::Retention { rules, now } => {
            let rule_for = |stream: &StreamId| {
                rules
                    .iter()
                    .find(|r| matches!(&r.scope, RetentionScope::Stream(s) if s == stream))
                    .or_else(|| {
                        rules.iter().find(|r| {
                            matches!(&r.scope, RetentionScope::StreamType(t)
                                if *t == stream.aggregate_type)
                        })
                    })
            };
            let mut streams: HashMap<StreamId, StreamScan> = HashMap::new();
            scan_all(store, |e| {
                let stream = e.stream_id();
                if rule_for(&stream).is_some() {
                    streams.entry(stream).or_default().events.push((
                        e.version,
                        e.position,
                        e.recorded_at,
                    ));
                }
            })
            .await?;
            // Nothing a subscription has not handled goes.
            let slowest = store
                .statistics()
                .await?
                .checkpoints
                .iter()
                .map(|c| c.position)
                .min();
            let mut cuts = HashMap::new();
            for (stream, scan) in streams {
                let Some(rule) = rule_for(&stream) else {
                    continue;
                };
                let stored = scan.events.len() as u64;
                // The events go oldest first: how many of the first ones each limit takes.
                let by_count = rule.max_count.map_or(0, |max| stored.saturating_sub(max));
                let by_age = match rule.max_age {
                    Some(age) => {
                        let age =
                            chrono::TimeDelta::from_std(age).unwrap_or(chrono::TimeDelta::MAX);
                        let limit = now.checked_sub_signed(age);
                        scan.events
                            .iter()
                            .take_while(|(_, _, at)| limit.is_some_and(|limit| *at < limit))
                            .count() as u64
                    }
                    None => 0,
                };
                let mut take = by_count.max(by_age);
                if let Some(slowest) = slowest {
                    let handled = scan
                        .events
                        .iter()
                        .take_while(|(_, position, _)| *position <= slowest)
                        .count() as u64;
                    take = take.min(handled);
                }
                if take == 0 {
                    continue;
                }
                let mut cut = scan.events[take as usize - 1].0;
                if take < stored {
                    // Part of the stream goes: only what comes before its latest snapshot
                    // (a load replays from the snapshot's own version).
                    let snapshot = store.load_snapshot(&stream).await?.map_or(0, |s| s.version);
                    cut = cut.min(snapshot.saturating_sub(1));
                }
                if cut >= scan.events[0].0 {
                    cuts.insert(stream, cut);
                }
            }
            cuts_selector(store, cuts).await
        }
    }
}

/// A selector of stream prefixes; finds the positions they span by a second scan.
async fn cuts_selector(
    store: &dyn ArchiveStore,
    cuts: HashMap<StreamId, u64>,
) -> Result<(Selector, u64)> {
    let mut selector = Selector::Cuts {
        cuts,
        first_position: u64::MAX,
        last_position: 0,
    };
    let mut span = (u64::MAX, 0, 0);
    scan_all(store, |e| {
        if selector.selects(e) {
            span = (span.0.min(e.position), span.1.max(e.position), span.2 + 1);
        }
    })
    .await?;
    if let Selector::Cuts {
        first_position,
        last_position,
        ..
    } = &mut selector
    {
        (*first_position, *last_position) = (span.0, span.1);
    }
    Ok((selector, span.2))
}

// ----------------------------------------------------------------------------------------
// Writing

/// The part of an export that runs on a blocking thread: serializes and compresses.
struct Writing {
    path: PathBuf,
    encoder: GzEncoder<BufWriter<File>>,
    hasher: Xxh3,
    line: Vec<u8>,
    events: u64,
    positions: Option<(u64, u64)>,
    ids: Option<(Uuid, Uuid)>,
}

impl Writing {
    fn write(&mut self, batch: &[RecordedEvent]) -> Result<()> {
        for event in batch {
            self.line.clear();
            serde_json::to_writer(&mut self.line, event).map_err(|source| Error::Serialize {
                event_type: event.event_type.to_string(),
                source,
            })?;
            self.line.push(b'\n');
            self.hasher.update(&self.line);
            self.encoder
                .write_all(&self.line)
                .map_err(|e| file_error(&self.path, "writing events", Some(e)))?;
            self.events += 1;
            self.positions = Some(match self.positions {
                None => (event.position, event.position),
                Some((first, _)) => (first, event.position),
            });
            self.ids = Some(match self.ids {
                None => (event.event_id, event.event_id),
                Some((low, high)) => (low.min(event.event_id), high.max(event.event_id)),
            });
        }
        Ok(())
    }
}

/// A file next to `path` for the events while they are written.
fn partial_path(path: &Path) -> PathBuf {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    partial.into()
}

/// Exports the events `range` selects from `store` to a new archive file at `path`, and
/// returns its manifest. Nothing in the store changes; [`prune`] removes them afterwards.
///
/// The events are read in batches (appends go on meanwhile) and compressed on another
/// thread. The file is written next to `path` first (`PATH.partial`) and then completed
/// under `path` with the manifest in front. Fails with [`Error::ArchiveFile`] if `path`
/// exists (nothing is overwritten) or cannot be written; a failed export leaves no file.
/// An empty range writes an archive of no events.
pub async fn export(
    store: &dyn ArchiveStore,
    range: ArchiveRange,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let path = path.as_ref().to_owned();
    let partial = partial_path(&path);
    for file in [&path, &partial] {
        if file.exists() {
            return Err(file_error(
                file,
                "the file exists; an export never overwrites a file",
                None,
            ));
        }
    }
    let (selector, total) = select(store, &range).await?;
    let result = export_selected(store, range, &selector, total, &path, &partial, progress).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

async fn export_selected(
    store: &dyn ArchiveStore,
    range: ArchiveRange,
    selector: &Selector,
    total: u64,
    path: &Path,
    partial: &Path,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let created_at = Utc::now();
    let file =
        File::create_new(partial).map_err(|e| file_error(partial, "creating the file", Some(e)))?;
    let mut writing = Writing {
        path: partial.to_owned(),
        encoder: GzEncoder::new(BufWriter::with_capacity(1 << 16, file), compression()),
        hasher: Xxh3::new(),
        line: Vec::with_capacity(1024),
        events: 0,
        positions: None,
        ids: None,
    };
    // Two batches in flight: the store reads the next while this one is compressed.
    let (batches, mut queue) = mpsc::channel::<Vec<RecordedEvent>>(2);
    let compressor = tokio::task::spawn_blocking(move || -> Result<Writing> {
        while let Some(batch) = queue.blocking_recv() {
            writing.write(&batch)?;
        }
        Ok(writing)
    });
    let mut done = 0;
    progress(Progress { done, total });
    let mut from = selector.first_position();
    let read: Result<()> = async {
        loop {
            let mut batch = store.read_stored(from, BATCH).await?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            from = last.position + 1;
            let finished = selector.beyond(last.position);
            batch.retain(|e| selector.selects(e));
            done += batch.len() as u64;
            if !batch.is_empty() && batches.send(batch).await.is_err() {
                // The compressor stopped: its error is the one to return.
                return Ok(());
            }
            progress(Progress {
                done,
                total: total.max(done),
            });
            if finished {
                return Ok(());
            }
        }
    }
    .await;
    drop(batches);
    let writing = match compressor.await {
        Ok(written) => written,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("the runtime shut down during an export: {e}"),
    };
    read?;
    let writing = writing?;
    let manifest = ArchiveManifest {
        format: FORMAT.to_owned(),
        format_version: FORMAT_VERSION,
        archive: Uuid::now_v7(),
        store: store.archive_store_name(),
        range,
        created_at,
        events: writing.events,
        checksum: format!("{:016x}", writing.hasher.digest()),
        first_position: writing.positions.map(|p| p.0),
        last_position: writing.positions.map(|p| p.1),
        first_event_id: writing.ids.map(|i| i.0),
        last_event_id: writing.ids.map(|i| i.1),
    };
    let (path, partial) = (path.to_owned(), partial.to_owned());
    let written = manifest.clone();
    blocking(move || finish_file(writing.encoder, &written, &path, &partial)).await?;
    progress(Progress {
        done: manifest.events,
        total: manifest.events,
    });
    Ok(manifest)
}

/// gzip's fastest level: on JSON events it compresses about as well as the default
/// (a quarter of the text or less) at several times its speed, and an export is bound by
/// compression.
fn compression() -> Compression {
    Compression::fast()
}

/// Completes the events file and writes the archive: the manifest in a gzip member of its
/// own, then the events' member copied behind it (gzip readers read members one after
/// another as one stream).
fn finish_file(
    encoder: GzEncoder<BufWriter<File>>,
    manifest: &ArchiveManifest,
    path: &Path,
    partial: &Path,
) -> Result<()> {
    encoder
        .finish()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(|e| file_error(partial, "completing the events", Some(e)))?;
    let file =
        File::create_new(path).map_err(|e| file_error(path, "creating the file", Some(e)))?;
    let written = (|| -> std::io::Result<()> {
        let mut head = GzEncoder::new(BufWriter::new(file), compression());
        serde_json::to_writer(&mut head, manifest)?;
        head.write_all(b"\n")?;
        let mut out = head.finish()?;
        let mut events = File::open(partial)?;
        std::io::copy(&mut events, &mut out)?;
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    match written {
        Ok(()) => {
            let _ = std::fs::remove_file(partial);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(file_error(path, "writing the archive", Some(e)))
        }
    }
}

// ----------------------------------------------------------------------------------------
// Reading

/// Reads an archive file: its manifest, then its events, checking each line, the count and
/// the checksum.
struct Reading {
    path: PathBuf,
    lines: BufReader<MultiGzDecoder<BufReader<File>>>,
    manifest: ArchiveManifest,
    hasher: Xxh3,
    line: Vec<u8>,
    events: u64,
    last_position: u64,
}

impl Reading {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| file_error(path, "opening the file", Some(e)))?;
        let mut lines = BufReader::with_capacity(
            1 << 16,
            MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)),
        );
        let mut line = Vec::new();
        lines
            .read_until(b'\n', &mut line)
            .map_err(|e| damaged(path, "the manifest cannot be read", Some(Box::new(e))))?;
        if line.pop() != Some(b'\n') {
            return Err(damaged(
                path,
                "the file has no complete manifest line",
                None,
            ));
        }
        let manifest: ArchiveManifest = serde_json::from_slice(&line)
            .map_err(|e| damaged(path, "the manifest is not valid", Some(Box::new(e))))?;
        if manifest.format != FORMAT {
            return Err(damaged(
                path,
                format!("the format is `{}`, not `{FORMAT}`", manifest.format),
                None,
            ));
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(damaged(
                path,
                format!(
                    "format version {} is not version {FORMAT_VERSION}, the one this library reads",
                    manifest.format_version
                ),
                None,
            ));
        }
        Ok(Reading {
            path: path.to_owned(),
            lines,
            manifest,
            hasher: Xxh3::new(),
            line,
            events: 0,
            last_position: 0,
        })
    }

    /// The next up to `BATCH` events; an empty batch at the end, once the count and the
    /// checksum are checked.
    fn batch(&mut self) -> Result<Vec<RecordedEvent>> {
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH {
            self.line.clear();
            let read = self.lines.read_until(b'\n', &mut self.line).map_err(|e| {
                damaged(
                    &self.path,
                    format!("decompressing after {} events", self.events),
                    Some(Box::new(e)),
                )
            })?;
            if read == 0 {
                self.finish()?;
                break;
            }
            if self.line.last() != Some(&b'\n') {
                return Err(damaged(
                    &self.path,
                    format!("the file ends inside event line {}", self.events + 1),
                    None,
                ));
            }
            self.hasher.update(&self.line);
            let event: RecordedEvent = serde_json::from_slice(&self.line).map_err(|e| {
                damaged(
                    &self.path,
                    format!("event line {} is not a stored event", self.events + 1),
                    Some(Box::new(e)),
                )
            })?;
            if event.position <= self.last_position {
                return Err(damaged(
                    &self.path,
                    format!(
                        "event line {} has position {}, not after {}",
                        self.events + 1,
                        event.position,
                        self.last_position
                    ),
                    None,
                ));
            }
            self.last_position = event.position;
            self.events += 1;
            batch.push(event);
        }
        Ok(batch)
    }

    fn finish(&mut self) -> Result<()> {
        let manifest = &self.manifest;
        if self.events != manifest.events {
            return Err(damaged(
                &self.path,
                format!(
                    "it holds {} events; its manifest says {}",
                    self.events, manifest.events
                ),
                None,
            ));
        }
        let checksum = format!("{:016x}", self.hasher.digest());
        if checksum != manifest.checksum {
            return Err(damaged(
                &self.path,
                format!(
                    "the checksum of its events is {checksum}; its manifest says {}",
                    manifest.checksum
                ),
                None,
            ));
        }
        Ok(())
    }
}

/// Reads an archive on a blocking thread, handing its events over in batches; the last
/// item is an error if the file is damaged.
async fn open_archive(
    path: &Path,
) -> Result<(ArchiveManifest, mpsc::Receiver<Result<Vec<RecordedEvent>>>)> {
    let path = path.to_owned();
    let mut reading = blocking(move || Reading::open(&path)).await?;
    let manifest = reading.manifest.clone();
    let (batches, receiver) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        loop {
            let batch = reading.batch();
            let end = !matches!(&batch, Ok(b) if !b.is_empty());
            if batches.blocking_send(batch).is_err() || end {
                return;
            }
        }
    });
    Ok((manifest, receiver))
}

/// Reads the manifest of an archive file (its first line), without reading its events.
pub async fn read_manifest(path: impl AsRef<Path>) -> Result<ArchiveManifest> {
    let path = path.as_ref().to_owned();
    blocking(move || Reading::open(&path).map(|r| r.manifest)).await
}

// ----------------------------------------------------------------------------------------
// Verifying

/// Walks the stored events in position order alongside an archive.
struct Cursor<'s> {
    store: &'s dyn ArchiveStore,
    next: u64,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
}

impl<'s> Cursor<'s> {
    fn new(store: &'s dyn ArchiveStore, from: u64) -> Self {
        Cursor {
            store,
            next: from,
            buffer: VecDeque::new(),
            done: false,
        }
    }

    /// The stored event at `position`, if any; skips the stored events before it.
    async fn at(&mut self, position: u64) -> Result<Option<RecordedEvent>> {
        loop {
            while let Some(front) = self.buffer.front() {
                if front.position < position {
                    self.buffer.pop_front();
                } else if front.position == position {
                    return Ok(self.buffer.pop_front());
                } else {
                    return Ok(None);
                }
            }
            if self.done {
                return Ok(None);
            }
            let batch = self
                .store
                .read_stored(self.next.max(position), BATCH)
                .await?;
            match batch.last() {
                Some(last) => self.next = last.position + 1,
                None => self.done = true,
            }
            self.buffer.extend(batch);
        }
    }
}

/// The first field in which two records of one event differ.
fn difference(archived: &RecordedEvent, stored: &RecordedEvent) -> Option<&'static str> {
    let checks: [(&'static str, bool); 11] = [
        ("event id", archived.event_id == stored.event_id),
        (
            "aggregate type",
            archived.aggregate_type == stored.aggregate_type,
        ),
        ("aggregate id", archived.aggregate_id == stored.aggregate_id),
        ("version", archived.version == stored.version),
        ("position", archived.position == stored.position),
        ("event type", archived.event_type == stored.event_type),
        (
            "schema version",
            archived.schema_version == stored.schema_version,
        ),
        (
            "occurrence time",
            archived.occurred_at == stored.occurred_at,
        ),
        ("recording time", archived.recorded_at == stored.recorded_at),
        ("metadata", archived.metadata == stored.metadata),
        ("payload", archived.payload == stored.payload),
    ];
    checks.iter().find(|(_, same)| !same).map(|(name, _)| *name)
}

/// What a check of an archive collects for a prune.
#[derive(Default)]
struct Collected {
    events: Vec<(u64, Uuid)>,
    /// Per stream: first and last version, and how many events.
    streams: HashMap<StreamId, (u64, u64, u64)>,
}

/// Reads the whole archive and compares it with the store; returns what it found and,
/// with `collect`, the positions, ids and stream ranges of its events. A damaged file is
/// reported before a difference from the store.
async fn check(
    store: &dyn ArchiveStore,
    path: &Path,
    progress: ProgressFn<'_>,
    collect: bool,
) -> Result<(Verified, Collected)> {
    let (manifest, mut batches) = open_archive(path).await?;
    let horizon = store
        .archive_horizon()
        .await?
        .into_iter()
        .find(|h| h.archive == manifest.archive);
    let state = if horizon.is_some() {
        ArchiveState::Pruned
    } else {
        ArchiveState::Stored
    };
    let mut first_mismatch: Option<String> = None;
    if let Some(horizon) = &horizon {
        let checksum = format!("{:016x}", horizon.checksum);
        if horizon.events != manifest.events || checksum != manifest.checksum {
            first_mismatch = Some(format!(
                "the store pruned archive {} with {} events and checksum {checksum}; this file \
                 holds {} events with checksum {}",
                manifest.archive, horizon.events, manifest.events, manifest.checksum
            ));
        }
    }
    let pruned_streams: HashMap<&StreamId, (u64, u64)> = horizon
        .iter()
        .flat_map(|h| &h.streams)
        .map(|s| (&s.stream, (s.first_version, s.last_version)))
        .collect();
    let mut collected = Collected::default();
    let mut cursor = Cursor::new(store, manifest.first_position.unwrap_or(1));
    let total = manifest.events;
    let mut done = 0;
    progress(Progress { done, total });
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        if batch.is_empty() {
            break;
        }
        for event in &batch {
            let stored = cursor.at(event.position).await?;
            if first_mismatch.is_none() {
                first_mismatch = match (state, stored) {
                    (ArchiveState::Stored, None) => Some(format!(
                        "event {} at position {} is not stored",
                        event.event_id, event.position
                    )),
                    (ArchiveState::Stored, Some(stored)) => {
                        difference(event, &stored).map(|field| {
                            format!(
                                "event {} at position {} is stored with another {field}",
                                event.event_id, event.position
                            )
                        })
                    }
                    (_, Some(stored)) => Some(format!(
                        "position {} of pruned archive {} is stored (event {})",
                        event.position, manifest.archive, stored.event_id
                    )),
                    (_, None) => match pruned_streams.get(&event.stream_id()) {
                        Some((first, last)) if (*first..=*last).contains(&event.version) => None,
                        _ => Some(format!(
                            "event {} (version {} of {}) is not in the store's record of \
                             archive {}",
                            event.event_id,
                            event.version,
                            event.stream_id(),
                            manifest.archive
                        )),
                    },
                };
            }
            if collect {
                collected.events.push((event.position, event.event_id));
                let range = collected.streams.entry(event.stream_id()).or_insert((
                    event.version,
                    event.version,
                    0,
                ));
                range.0 = range.0.min(event.version);
                range.1 = range.1.max(event.version);
                range.2 += 1;
            }
        }
        done += batch.len() as u64;
        progress(Progress { done, total });
    }
    if let Some(reason) = first_mismatch {
        return Err(mismatch(path, reason));
    }
    Ok((Verified { manifest, state }, collected))
}

/// Checks an archive file: that it is intact (every line, the count, the checksum: else
/// [`Error::ArchiveDamaged`]), and that it matches the store: every event in it is stored
/// identically ([`ArchiveState::Stored`]), or, after [`prune`], the store's horizon holds
/// this archive with the same count and checksum and none of its events is stored
/// ([`ArchiveState::Pruned`]); else [`Error::ArchiveMismatch`] naming the first difference.
pub async fn verify(
    store: &dyn ArchiveStore,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<Verified> {
    check(store, path.as_ref(), progress, false)
        .await
        .map(|(verified, _)| verified)
}

/// Removes the events of an archive from the store, after [`verify`]ing that every one of
/// them is stored identically, and records the archive in the store's horizon; returns its
/// manifest. See the [module docs](self) for the rules it keeps (checkpoints, snapshots);
/// a prune that would break one is refused with [`Error::PruneBehindSubscription`] or
/// [`Error::PruneBreaksStream`], and removes nothing. Pruning an archive again does
/// nothing; an empty archive prunes nothing.
pub async fn prune(
    store: &dyn ArchiveStore,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let path = path.as_ref();
    let (verified, collected) = check(store, path, progress, true).await?;
    let manifest = verified.manifest;
    if verified.state == ArchiveState::Pruned || manifest.events == 0 {
        return Ok(manifest);
    }
    let mut streams = Vec::with_capacity(collected.streams.len());
    for (stream, (first, last, count)) in collected.streams {
        if last - first + 1 != count {
            return Err(mismatch(
                path,
                format!(
                    "the archive holds {count} events of {stream} between versions {first} and {last}, not a run of versions"
                ),
            ));
        }
        streams.push(PrunedStream {
            stream,
            first_version: first,
            last_version: last,
        });
    }
    streams.sort_by(|a, b| a.stream.cmp(&b.stream));
    let checksum = u64::from_str_radix(&manifest.checksum, 16)
        .map_err(|_| damaged(path, "the manifest's checksum is not 16 hex digits", None))?;
    let (first_event_id, last_event_id) = collected
        .events
        .iter()
        .fold((Uuid::max(), Uuid::nil()), |(low, high), (_, id)| {
            (low.min(*id), high.max(*id))
        });
    let request = PruneRequest {
        horizon: ArchiveHorizon {
            archive: manifest.archive,
            path: path.display().to_string(),
            events: manifest.events,
            checksum,
            first_position: collected.events.first().map_or(0, |e| e.0),
            last_position: collected.events.last().map_or(0, |e| e.0),
            first_event_id,
            last_event_id,
            streams,
            pruned_at: Utc::now(),
        },
        events: collected.events,
    };
    store.prune_archive(request).await?;
    Ok(manifest)
}

/// What [`prune`] would do, without removing anything (a dry run): checks the archive as
/// [`verify`] does and the prune's rules against the store as it is now
/// ([`Error::PruneBehindSubscription`], [`Error::PruneBreaksStream`]); returns the
/// manifest if the prune would go ahead. It sees the segments of a split subscription
/// through their checkpoints' names, so one whose segments have saved no checkpoint at all
/// passes here and is refused by the prune. The store may change before a real prune,
/// which checks everything again in its own transaction.
pub async fn check_prune(
    store: &dyn ArchiveStore,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let path = path.as_ref();
    let (verified, collected) = check(store, path, progress, true).await?;
    let manifest = verified.manifest;
    if verified.state == ArchiveState::Pruned || manifest.events == 0 {
        return Ok(manifest);
    }
    let last_position = collected.events.last().map_or(0, |e| e.0);
    let checkpoints: Vec<(String, u64)> = store
        .statistics()
        .await?
        .checkpoints
        .into_iter()
        .map(|c| (c.subscription, c.position))
        .collect();
    // The segment counts the checkpoints show: a segment's name says its count, and a
    // plain name may be a subscription split since. (A split subscription none of whose
    // segments saved a checkpoint shows in none; the prune itself reads the counts.)
    let mut segmented: Vec<(String, u32)> = checkpoints
        .iter()
        .filter_map(|(name, _)| {
            let (subscription, segment) = name.rsplit_once('#')?;
            let (_, segments) = segment.split_once('/')?;
            Some((subscription.to_owned(), segments.parse().ok()?))
        })
        .collect();
    for (name, _) in &checkpoints {
        if let Some(state) = store.segment_states(name).await?.first() {
            segmented.push((name.clone(), state.segments));
        }
    }
    segmented.sort();
    segmented.dedup();
    check_readers(&checkpoints, &segmented, last_position)?;
    let mut streams: Vec<_> = collected.streams.into_iter().collect();
    streams.sort_by(|a, b| a.0.cmp(&b.0));
    for (stream, (_, last, _)) in streams {
        let version = store.stream_version(&stream).await?;
        if last < version {
            let snapshot = store
                .load_snapshot(&stream)
                .await?
                .map(|s| s.version)
                .filter(|v| *v <= version);
            if snapshot.is_none_or(|s| s <= last) {
                return Err(Error::PruneBreaksStream {
                    aggregate_type: stream.aggregate_type,
                    aggregate_id: stream.aggregate_id,
                    pruned: last,
                    snapshot,
                });
            }
        }
    }
    Ok(manifest)
}

/// Brings a pruned archive back: reads and checks the whole file first (nothing is written
/// from a damaged file), checks that the store's horizon holds this archive with the same
/// count and checksum, then stores every event again exactly (same ids, positions,
/// versions, times, content) and removes the archive from the horizon, in one step.
/// Restoring an archive whose events are all stored does nothing. It holds the archive's
/// events in memory while it runs.
pub async fn restore(
    store: &dyn ArchiveStore,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let path = path.as_ref();
    let (manifest, mut batches) = open_archive(path).await?;
    let horizon = store
        .archive_horizon()
        .await?
        .into_iter()
        .find(|h| h.archive == manifest.archive);
    let Some(horizon) = horizon else {
        drop(batches);
        // Not pruned: fine if every event is stored identically, a mismatch otherwise.
        return verify(store, path, progress).await.map(|v| v.manifest);
    };
    if horizon.events != manifest.events
        || format!("{:016x}", horizon.checksum) != manifest.checksum
    {
        return Err(mismatch(
            path,
            format!(
                "the store pruned archive {} with {} events, checksum {:016x}; this file holds \
                 {} events with checksum {}",
                manifest.archive,
                horizon.events,
                horizon.checksum,
                manifest.events,
                manifest.checksum
            ),
        ));
    }
    let total = manifest.events;
    let mut events = Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(1 << 24));
    progress(Progress { done: 0, total });
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        if batch.is_empty() {
            break;
        }
        events.extend(batch);
        progress(Progress {
            done: events.len() as u64,
            total,
        });
    }
    store.restore_archive(manifest.archive, events).await?;
    progress(Progress { done: total, total });
    Ok(manifest)
}

/// Applies retention rules: exports what they select now (see [`RetentionRule`] and the
/// [module docs](self)) to a new archive at `path`, and prunes it; returns the manifest.
/// A selection of nothing writes an empty archive and prunes nothing.
pub async fn apply_retention(
    store: &dyn ArchiveStore,
    rules: Vec<RetentionRule>,
    path: impl AsRef<Path>,
    progress: ProgressFn<'_>,
) -> Result<ArchiveManifest> {
    let path = path.as_ref();
    let range = ArchiveRange::Retention {
        rules,
        now: Utc::now(),
    };
    export(store, range, path, progress).await?;
    prune(store, path, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behind(result: Result<()>) -> (String, u64) {
        match result {
            Err(Error::PruneBehindSubscription {
                subscription,
                checkpoint,
                ..
            }) => (subscription, checkpoint),
            other => panic!("expected PruneBehindSubscription, got {other:?}"),
        }
    }

    #[test]
    fn a_prune_passes_readers_at_or_past_its_last_position() {
        let checkpoints = [("a".to_owned(), 10), ("s#0/2".to_owned(), 12)];
        let segmented = [("s".to_owned(), 2)];
        assert!(check_readers(&checkpoints, &[], 10).is_ok());
        assert_eq!(
            behind(check_readers(&checkpoints, &[], 11)),
            ("a".to_owned(), 10)
        );
        // Segment 1 never saved: it has handled nothing.
        assert_eq!(
            behind(check_readers(&checkpoints, &segmented, 5)),
            ("s#1/2".to_owned(), 0)
        );
        let saved = [("s#0/2".to_owned(), 12), ("s#1/2".to_owned(), 12)];
        assert!(check_readers(&saved, &segmented, 12).is_ok());
        // One segment is the plain checkpoint: nothing more to count.
        assert!(check_readers(&[], &[("t".to_owned(), 1)], 7).is_ok());
    }

    #[test]
    fn a_stream_keeps_what_its_latest_snapshot_needs() {
        let pruned = PrunedStream {
            stream: StreamId::new("T", "a"),
            first_version: 1,
            last_version: 5,
        };
        let stored = |lowest, highest, snapshot| StoredStream {
            lowest,
            highest,
            snapshot,
        };
        assert!(check_stream("f", &pruned, stored(Some(1), 5, None)).is_ok());
        assert!(check_stream("f", &pruned, stored(Some(1), 9, Some(6))).is_ok());
        for snapshot in [None, Some(5), Some(10)] {
            assert!(matches!(
                check_stream("f", &pruned, stored(Some(1), 9, snapshot)),
                Err(Error::PruneBreaksStream { pruned: 5, .. })
            ));
        }
        assert!(matches!(
            check_stream("f", &pruned, stored(Some(2), 9, Some(6))),
            Err(Error::ArchiveMismatch { .. })
        ));
    }
}
