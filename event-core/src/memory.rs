//! An event store in memory: for tests, examples and transient set-ups.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use crate::archive::{ArchiveHorizon, PruneRequest, StoredStream, check_readers, check_stream};
use crate::error::{Error, Result};
use crate::lease::{
    LeaseStore, SegmentLease, SegmentState, check_segments, check_ttl, segment_checkpoint_name,
};
use crate::record::{
    AppendOutcome, AppendRequest, Checkpoint, DeadLetter, ExpectedVersion, FailureRecord,
    FinishedReplay, NewDeadLetter, NewEvent, RecordedEvent, ReplayRequest, ReplayTarget,
    ReplayedEvent, Snapshot, StoreStatistics, StreamId,
};
use crate::registry::registry;
use crate::store::{
    ArchiveStore, EventLog, ReplayVisitor, SnapshotStore, SubscriptionStore, check_batch,
    check_replay_target,
};

/// An [`EventStore`](crate::EventStore) that keeps everything in memory and loses it when dropped.
///
/// It keeps the whole store contract (it passes the same conformance suite as the SQLite
/// store), so code tested against it behaves the same on a durable store. Cloning is cheap
/// and shares the data.
///
/// Each event is also kept decoded, as the registry decodes its stored payload when it is
/// appended, so a repository's load folds the decoded events without cloning or parsing
/// them; every read still hands out the payload exactly as stored.
#[derive(Clone)]
pub struct InMemoryEventStore {
    inner: Arc<Mutex<Inner>>,
    head: Arc<watch::Sender<u64>>,
}

#[derive(Default)]
struct Inner {
    /// The global log; the event at position `p` is at index `p - 1`.
    log: Vec<Stored>,
    /// Each stream's positions, in version order.
    streams: HashMap<StreamId, Vec<u64>>,
    by_id: HashMap<Uuid, u64>,
    snapshots: HashMap<StreamId, Snapshot>,
    checkpoints: BTreeMap<String, u64>,
    dead_letters: BTreeMap<u64, DeadLetter>,
    /// The id of each (subscription, event)'s dead letter: there is one at most.
    dead_letter_ids: HashMap<(String, Uuid, u64), u64>,
    next_dead_letter: u64,
    /// Each subscription's failure records, oldest first.
    failures: HashMap<String, VecDeque<FailureRecord>>,
    /// Replay requests by id, pending and finished.
    replay_requests: BTreeMap<u64, ReplayRequest>,
    next_replay_request: u64,
    /// The archive horizon: the archives pruned and not restored, oldest first.
    archives: Vec<ArchiveHorizon>,
    /// Each subscription's segment leases.
    leases: HashMap<String, LeaseTable>,
    /// Each subscription's members and when their membership expires.
    members: HashMap<String, BTreeMap<String, DateTime<Utc>>>,
}

/// One subscription's segments: the count is `rows.len()`, none while it was never
/// claimed or since a reset.
#[derive(Default)]
struct LeaseTable {
    rows: Vec<LeaseRow>,
    /// The highest epoch any segment had before the last reset: new rows start from it, so
    /// epochs never repeat.
    epoch_floor: u64,
}

/// One segment's lease.
#[derive(Clone, Default)]
struct LeaseRow {
    owner: Option<String>,
    epoch: u64,
    expires_at: Option<DateTime<Utc>>,
}

impl LeaseRow {
    fn live(&self, now: DateTime<Utc>) -> bool {
        self.owner.is_some() && self.expires_at.is_some_and(|at| at > now)
    }

    /// Held by `lease`: same owner and epoch (an expired lease nobody took over still is).
    fn held_by(&self, lease: &SegmentLease) -> bool {
        self.owner.as_deref() == Some(lease.owner.as_str()) && self.epoch == lease.epoch
    }
}

/// An event as stored, and what its payload decodes into.
struct Stored {
    record: RecordedEvent,
    /// The registry's decode of the stored payload (at the current schema), made once when
    /// it is appended; `None` when it does not decode (an unregistered type, a payload that
    /// does not fit), and replays then decode the payload and report why.
    decoded: Option<Box<dyn Any + Send>>,
    /// The archive it was pruned into: its content is gone from memory (the archive file
    /// holds it), only its place in the log and in its stream stays.
    archived: Option<Uuid>,
}

impl Stored {
    fn new(record: RecordedEvent) -> Self {
        let decoded = registry()
            .decode_any(&record.event_type, record.schema_version, &record.payload)
            .ok();
        Stored {
            record,
            decoded,
            archived: None,
        }
    }
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryEventStore")
            .field("head", &*self.head.borrow())
            .finish_non_exhaustive()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryEventStore {
            inner: Arc::new(Mutex::new(Inner::default())),
            head: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied append: appends check
        // everything before they mutate. So a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an append would do to a stream, checked before anything is stored.
enum Check {
    /// The events are stored already: the append is a repeat.
    Replayed(AppendOutcome),
    /// The events are new and the stream is at `version`.
    Fresh { version: u64 },
}

impl Inner {
    fn check(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Check> {
        if let Some(outcome) = self.replayed(stream, events)? {
            return Ok(Check::Replayed(outcome));
        }
        let actual = self.version(stream);
        if !expected.matches(actual) {
            return Err(Error::VersionConflict {
                aggregate_type: stream.aggregate_type.clone(),
                aggregate_id: stream.aggregate_id.clone(),
                expected,
                actual,
            });
        }
        Ok(Check::Fresh { version: actual })
    }

    fn store(
        &mut self,
        request: AppendRequest,
        version: u64,
        recorded_at: chrono::DateTime<Utc>,
    ) -> AppendOutcome {
        let first_position = self.log.len() as u64 + 1;
        let mut positions = Vec::with_capacity(request.events.len());
        for (i, event) in request.events.into_iter().enumerate() {
            let position = first_position + i as u64;
            self.by_id.insert(event.event_id, position);
            positions.push(position);
            self.log.push(Stored::new(RecordedEvent {
                event_id: event.event_id,
                aggregate_type: registry().aggregate_type_name(&request.stream.aggregate_type),
                aggregate_id: request.stream.aggregate_id.clone(),
                version: version + 1 + i as u64,
                position,
                event_type: registry().event_type_name(&event.event_type),
                schema_version: event.schema_version,
                occurred_at: event.occurred_at,
                recorded_at,
                metadata: event.metadata,
                payload: event.payload,
            }));
        }
        let stream = self.streams.entry(request.stream).or_default();
        stream.extend(positions);
        AppendOutcome {
            version: stream.len() as u64,
            first_position,
            last_position: self.log.len() as u64,
        }
    }

    /// [`Error::Archived`] if the event at `position` was pruned into an archive.
    fn check_stored(&self, position: u64, what: impl FnOnce() -> String) -> Result<&Stored> {
        let stored = &self.log[position as usize - 1];
        match stored.archived {
            None => Ok(stored),
            Some(archive) => Err(Error::Archived {
                archive,
                path: self
                    .archives
                    .iter()
                    .find(|h| h.archive == archive)
                    .map(|h| h.path.clone())
                    .unwrap_or_default(),
                what: what(),
            }),
        }
    }

    fn version(&self, stream: &StreamId) -> u64 {
        self.streams.get(stream).map_or(0, |s| s.len() as u64)
    }

    /// The outcome of an earlier append if `events` repeats it exactly; an error if any of
    /// their ids is taken otherwise; `None` if all ids are new.
    fn replayed(&self, stream: &StreamId, events: &[NewEvent]) -> Result<Option<AppendOutcome>> {
        let mut stored = Vec::new();
        for event in events {
            if let Some(&pos) = self.by_id.get(&event.event_id) {
                let recorded = &self
                    .check_stored(pos, || format!("event {}", event.event_id))?
                    .record;
                if !event.same_content(stream, recorded) {
                    return Err(Error::DuplicateEventId {
                        event_id: event.event_id,
                    });
                }
                stored.push(recorded);
            }
        }
        if stored.is_empty() {
            return Ok(None);
        }
        if stored.len() != events.len() {
            let new = events
                .iter()
                .find(|e| !self.by_id.contains_key(&e.event_id));
            return Err(Error::InvalidAppend {
                reason: format!(
                    "the append repeats some stored events but not all (event {} is new)",
                    new.map(|e| e.event_id).unwrap_or_default()
                ),
            });
        }
        let positions_follow = stored
            .windows(2)
            .all(|w| w[1].position == w[0].position + 1);
        if !positions_follow {
            return Err(Error::DuplicateEventId {
                event_id: events[0].event_id,
            });
        }
        Ok(Some(AppendOutcome {
            version: stored[stored.len() - 1].version,
            first_position: stored[0].position,
            last_position: stored[stored.len() - 1].position,
        }))
    }
}

#[async_trait]
impl EventLog for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome> {
        let request = AppendRequest {
            stream: stream.clone(),
            expected,
            events,
        };
        let mut outcomes = self.append_batch(vec![request]).await?;
        Ok(outcomes.remove(0))
    }

    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Result<Vec<AppendOutcome>> {
        check_batch(&requests)?;
        let mut inner = self.lock();
        // Check every request before storing any, so the batch is all or nothing.
        let checks = requests
            .iter()
            .map(|r| inner.check(&r.stream, r.expected, &r.events))
            .collect::<Result<Vec<_>>>()?;
        // Never before the last recorded time, so recorded times follow commit order
        // (a reset to a time searches by them) even if the system clock is set back.
        let now = Utc::now();
        let recorded_at = inner
            .log
            .last()
            .map_or(now, |last| last.record.recorded_at.max(now));
        let outcomes = requests
            .into_iter()
            .zip(checks)
            .map(|(request, check)| match check {
                Check::Replayed(outcome) => outcome,
                Check::Fresh { version } => inner.store(request, version, recorded_at),
            })
            .collect();
        // Published under the lock, so the watch never runs backwards.
        self.head.send_replace(inner.log.len() as u64);
        Ok(outcomes)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_stream_page(stream, from_version, usize::MAX)
            .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let inner = self.lock();
        let Some(positions) = inner.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let skip = from_version.saturating_sub(1) as usize;
        let what = || format!("stream {stream} from version {}", from_version.max(1));
        positions
            .iter()
            .skip(skip)
            .take(limit)
            .map(|&p| Ok(inner.check_stored(p, what)?.record.clone()))
            .collect()
    }

    async fn replay_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        mut visitor: Box<dyn ReplayVisitor>,
    ) -> Result<Box<dyn ReplayVisitor>> {
        // Lent under the lock, nothing cloned: appends wait for the fold, as a SQLite
        // replay's read transaction holds its snapshot of the file.
        let inner = self.lock();
        let Some(positions) = inner.streams.get(stream) else {
            return Ok(visitor);
        };
        let skip = from_version.saturating_sub(1) as usize;
        for &p in positions.iter().skip(skip) {
            let stored = inner.check_stored(p, || {
                format!("stream {stream} from version {}", from_version.max(1))
            })?;
            let event = ReplayedEvent::from(&stored.record);
            match &stored.decoded {
                Some(decoded) => visitor.visit_decoded(event, decoded.as_ref()),
                None => visitor.visit(event),
            }
            .map_err(|e| e.at_event(stored.record.event_id, stored.record.position))?;
        }
        drop(inner);
        Ok(visitor)
    }

    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let inner = self.lock();
        let start = (from_position.max(1) - 1) as usize;
        inner
            .log
            .iter()
            .skip(start)
            .take(limit)
            .map(|e| {
                let position = e.record.position;
                Ok(inner
                    .check_stored(position, || format!("position {position}"))?
                    .record
                    .clone())
            })
            .collect()
    }

    async fn get(&self, event_id: Uuid) -> Result<Option<RecordedEvent>> {
        let inner = self.lock();
        inner
            .by_id
            .get(&event_id)
            .map(|&p| {
                Ok(inner
                    .check_stored(p, || format!("event {event_id}"))?
                    .record
                    .clone())
            })
            .transpose()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64> {
        Ok(self.lock().version(stream))
    }

    async fn head_position(&self) -> Result<u64> {
        Ok(self.lock().log.len() as u64)
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    async fn statistics(&self) -> Result<StoreStatistics> {
        let inner = self.lock();
        let head = inner.log.len() as u64;
        let mut events_by_type = BTreeMap::new();
        let stored = || inner.log.iter().filter(|e| e.archived.is_none());
        let mut events = 0;
        let mut streams = std::collections::HashSet::new();
        for Stored { record: e, .. } in stored() {
            *events_by_type.entry(e.event_type.to_string()).or_insert(0) += 1;
            events += 1;
            if inner.archives.is_empty() {
                continue;
            }
            streams.insert((&e.aggregate_type, &e.aggregate_id));
        }
        let (first, last) = (stored().next(), stored().next_back());
        Ok(StoreStatistics {
            events,
            events_by_type,
            // Pruned streams do not count: as many as SQLite's `GROUP BY` finds.
            aggregates: if inner.archives.is_empty() {
                inner.streams.len() as u64
            } else {
                streams.len() as u64
            },
            first_position: first.map(|e| e.record.position),
            last_position: last.map(|e| e.record.position),
            first_recorded_at: first.map(|e| e.record.recorded_at),
            last_recorded_at: last.map(|e| e.record.recorded_at),
            checkpoints: inner
                .checkpoints
                .iter()
                .map(|(name, &position)| Checkpoint {
                    subscription: name.clone(),
                    position,
                    lag: head.saturating_sub(position),
                })
                .collect(),
            dead_letters: inner.dead_letters.len() as u64,
            failures: inner.failures.values().map(|r| r.len() as u64).sum(),
            snapshots: inner.snapshots.len() as u64,
            size_bytes: None,
        })
    }
}

#[async_trait]
impl SnapshotStore for InMemoryEventStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        let stream = StreamId::new(&snapshot.aggregate_type, &snapshot.aggregate_id);
        let mut inner = self.lock();
        // The rule every store keeps: a snapshot replaces the stored one unless that one is
        // newer and still fits its stream. One ahead of its stream (written by a bug, or by
        // hand) is replaced, so it cannot block the good ones for good.
        let stream_version = inner.version(&stream);
        let keep_stored = inner
            .snapshots
            .get(&stream)
            .is_some_and(|s| s.version > snapshot.version && s.version <= stream_version);
        if !keep_stored {
            inner.snapshots.insert(stream, snapshot);
        }
        Ok(())
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }
}

#[async_trait]
impl SubscriptionStore for InMemoryEventStore {
    async fn load_checkpoint(&self, subscription: &str) -> Result<Option<u64>> {
        Ok(self.lock().checkpoints.get(subscription).copied())
    }

    async fn save_checkpoint(&self, subscription: &str, position: u64) -> Result<()> {
        self.lock()
            .checkpoints
            .insert(subscription.to_owned(), position);
        Ok(())
    }

    async fn add_dead_letter(&self, dl: NewDeadLetter) -> Result<u64> {
        let mut inner = self.lock();
        let key = (dl.subscription, dl.event_id, dl.position);
        if let Some(&id) = inner.dead_letter_ids.get(&key)
            && let Some(stored) = inner.dead_letters.get_mut(&id)
        {
            stored.event_type = dl.event_type;
            stored.error = dl.error;
            stored.attempts = stored.attempts.saturating_add(dl.attempts);
            stored.last_failed_at = dl.last_failed_at;
            return Ok(id);
        }
        let (subscription, _, _) = key;
        inner.next_dead_letter += 1;
        let id = inner.next_dead_letter;
        inner.dead_letters.insert(
            id,
            DeadLetter {
                id,
                subscription: subscription.clone(),
                event_id: dl.event_id,
                position: dl.position,
                event_type: dl.event_type,
                error: dl.error,
                attempts: dl.attempts,
                first_failed_at: dl.first_failed_at,
                last_failed_at: dl.last_failed_at,
            },
        );
        inner
            .dead_letter_ids
            .insert((subscription, dl.event_id, dl.position), id);
        Ok(id)
    }

    async fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>> {
        let inner = self.lock();
        Ok(inner
            .dead_letters
            .values()
            .filter(|d| subscription.is_none_or(|s| d.subscription == s))
            .cloned()
            .collect())
    }

    async fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        let mut inner = self.lock();
        let Some(removed) = inner.dead_letters.remove(&id) else {
            return Ok(false);
        };
        inner
            .dead_letter_ids
            .remove(&(removed.subscription, removed.event_id, removed.position));
        Ok(true)
    }

    async fn clear_dead_letters(&self, subscription: Option<&str>) -> Result<u64> {
        let mut inner = self.lock();
        let before = inner.dead_letters.len();
        inner
            .dead_letters
            .retain(|_, d| subscription.is_some_and(|s| d.subscription != s));
        inner
            .dead_letter_ids
            .retain(|(s, _, _), _| subscription.is_some_and(|only| s != only));
        Ok((before - inner.dead_letters.len()) as u64)
    }

    async fn record_failure(&self, failure: FailureRecord, retain: usize) -> Result<()> {
        let mut inner = self.lock();
        let records = inner
            .failures
            .entry(failure.subscription.clone())
            .or_default();
        records.push_back(failure);
        while records.len() > retain {
            records.pop_front();
        }
        Ok(())
    }

    async fn failures(&self, subscription: &str, limit: usize) -> Result<Vec<FailureRecord>> {
        let inner = self.lock();
        Ok(inner
            .failures
            .get(subscription)
            .map_or_else(Vec::new, |records| {
                records.iter().rev().take(limit).cloned().collect()
            }))
    }

    async fn clear_failures(&self, subscription: Option<&str>) -> Result<u64> {
        let mut inner = self.lock();
        let removed = match subscription {
            Some(subscription) => inner.failures.remove(subscription).map_or(0, |r| r.len()),
            None => inner.failures.drain().map(|(_, r)| r.len()).sum(),
        };
        Ok(removed as u64)
    }

    async fn request_replay(
        &self,
        target: ReplayTarget,
        requested_at: DateTime<Utc>,
    ) -> Result<Vec<ReplayRequest>> {
        check_replay_target(&target)?;
        let mut inner = self.lock();
        let wanted: Vec<(String, Option<u64>)> = match target {
            ReplayTarget::DeadLetter { id } => {
                let dead_letter = inner
                    .dead_letters
                    .get(&id)
                    .ok_or(Error::DeadLetterNotFound { id })?;
                vec![(dead_letter.subscription.clone(), Some(id))]
            }
            ReplayTarget::Subscription { name } => vec![(name, None)],
            ReplayTarget::All => inner
                .dead_letters
                .values()
                .map(|d| d.subscription.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|name| (name, None))
                .collect(),
        };
        let mut stored = Vec::with_capacity(wanted.len());
        for (subscription, dead_letter) in wanted {
            inner.next_replay_request += 1;
            let request = ReplayRequest {
                id: inner.next_replay_request,
                subscription,
                dead_letter,
                requested_at,
                finished: None,
            };
            inner.replay_requests.insert(request.id, request.clone());
            stored.push(request);
        }
        Ok(stored)
    }

    async fn pending_replay_requests(&self, subscription: &str) -> Result<Vec<ReplayRequest>> {
        Ok(self
            .lock()
            .replay_requests
            .values()
            .filter(|r| r.is_pending() && r.subscription == subscription)
            .cloned()
            .collect())
    }

    async fn replay_requests(&self, subscription: Option<&str>) -> Result<Vec<ReplayRequest>> {
        Ok(self
            .lock()
            .replay_requests
            .values()
            .filter(|r| subscription.is_none_or(|s| r.subscription == s))
            .cloned()
            .collect())
    }

    async fn replay_request(&self, id: u64) -> Result<Option<ReplayRequest>> {
        Ok(self.lock().replay_requests.get(&id).cloned())
    }

    async fn finish_replay_request(
        &self,
        id: u64,
        finished: FinishedReplay,
        retain: usize,
    ) -> Result<bool> {
        let mut inner = self.lock();
        match inner.replay_requests.get_mut(&id) {
            Some(request) if request.is_pending() => request.finished = Some(finished),
            _ => return Ok(false),
        }
        let done: Vec<u64> = inner
            .replay_requests
            .values()
            .filter(|r| !r.is_pending())
            .map(|r| r.id)
            .collect();
        let beyond = done.len().saturating_sub(retain.max(1));
        for old in &done[..beyond] {
            inner.replay_requests.remove(old);
        }
        Ok(true)
    }
}

/// The store's clock for leases, to the microsecond as the durable stores keep times.
fn lease_now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

impl Inner {
    /// The row `lease` names, if its subscription has that many segments.
    fn lease_row(&mut self, lease: &SegmentLease) -> Option<&mut LeaseRow> {
        let table = self.leases.get_mut(&lease.subscription)?;
        if table.rows.len() != lease.segments as usize {
            return None;
        }
        table.rows.get_mut(lease.segment as usize)
    }
}

#[async_trait]
impl LeaseStore for InMemoryEventStore {
    async fn heartbeat(
        &self,
        subscription: &str,
        member: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<String>> {
        let ttl = check_ttl(ttl)?;
        let now = lease_now();
        let mut inner = self.lock();
        let members = inner.members.entry(subscription.to_owned()).or_default();
        members.insert(member.to_owned(), now + ttl);
        members.retain(|_, expires_at| *expires_at > now);
        Ok(members.keys().cloned().collect())
    }

    async fn leave(&self, subscription: &str, member: &str) -> Result<()> {
        let mut inner = self.lock();
        if let Some(members) = inner.members.get_mut(subscription) {
            members.remove(member);
        }
        if let Some(table) = inner.leases.get_mut(subscription) {
            for row in &mut table.rows {
                if row.owner.as_deref() == Some(member) {
                    row.owner = None;
                    row.expires_at = None;
                }
            }
        }
        Ok(())
    }

    async fn claim_segments(
        &self,
        subscription: &str,
        member: &str,
        segments: u32,
        max: u32,
        ttl: std::time::Duration,
    ) -> Result<Vec<SegmentLease>> {
        check_segments(segments)?;
        let ttl = check_ttl(ttl)?;
        let now = lease_now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let table = inner.leases.entry(subscription.to_owned()).or_default();
        if table.rows.is_empty() {
            let floor = table.epoch_floor;
            table.rows = vec![
                LeaseRow {
                    epoch: floor,
                    ..LeaseRow::default()
                };
                segments as usize
            ];
            // Each segment starts where the subscription's plain checkpoint is.
            if segments > 1
                && let Some(&plain) = inner.checkpoints.get(subscription)
            {
                for segment in 0..segments {
                    inner
                        .checkpoints
                        .entry(segment_checkpoint_name(subscription, segment, segments))
                        .or_insert(plain);
                }
            }
        } else if table.rows.len() != segments as usize {
            return Err(Error::SegmentCountMismatch {
                subscription: subscription.to_owned(),
                stored: table.rows.len() as u32,
                requested: segments,
            });
        }
        let expires_at = now + ttl;
        let mut taken = Vec::new();
        for (segment, row) in table.rows.iter_mut().enumerate() {
            if taken.len() as u32 >= max {
                break;
            }
            if row.live(now) {
                continue;
            }
            row.owner = Some(member.to_owned());
            row.epoch += 1;
            row.expires_at = Some(expires_at);
            let segment = segment as u32;
            taken.push(SegmentLease {
                subscription: subscription.to_owned(),
                segment,
                segments,
                owner: member.to_owned(),
                epoch: row.epoch,
                expires_at,
                checkpoint: inner
                    .checkpoints
                    .get(&segment_checkpoint_name(subscription, segment, segments))
                    .copied()
                    .unwrap_or(0),
            });
        }
        Ok(taken)
    }

    async fn renew_leases(
        &self,
        leases: &[SegmentLease],
        ttl: std::time::Duration,
    ) -> Result<Vec<SegmentLease>> {
        let ttl = check_ttl(ttl)?;
        let expires_at = lease_now() + ttl;
        let mut inner = self.lock();
        let mut renewed = Vec::new();
        for lease in leases {
            if let Some(row) = inner.lease_row(lease)
                && row.held_by(lease)
            {
                row.expires_at = Some(expires_at);
                renewed.push(SegmentLease {
                    expires_at,
                    ..lease.clone()
                });
            }
        }
        Ok(renewed)
    }

    async fn release_leases(&self, leases: &[SegmentLease]) -> Result<()> {
        let mut inner = self.lock();
        for lease in leases {
            if let Some(row) = inner.lease_row(lease)
                && row.held_by(lease)
            {
                row.owner = None;
                row.expires_at = None;
            }
        }
        Ok(())
    }

    async fn save_segment_checkpoint(&self, lease: &SegmentLease, position: u64) -> Result<()> {
        let mut inner = self.lock();
        if !inner.lease_row(lease).is_some_and(|row| row.held_by(lease)) {
            return Err(Error::LeaseLost {
                subscription: lease.subscription.clone(),
                segment: lease.segment,
                epoch: lease.epoch,
            });
        }
        let stored = inner
            .checkpoints
            .entry(lease.checkpoint_name())
            .or_insert(0);
        *stored = (*stored).max(position);
        Ok(())
    }

    async fn segment_states(&self, subscription: &str) -> Result<Vec<SegmentState>> {
        let now = lease_now();
        let inner = self.lock();
        let Some(table) = inner.leases.get(subscription) else {
            return Ok(Vec::new());
        };
        let segments = table.rows.len() as u32;
        Ok(table
            .rows
            .iter()
            .enumerate()
            .map(|(segment, row)| {
                let segment = segment as u32;
                SegmentState {
                    segment,
                    segments,
                    owner: row.owner.clone().filter(|_| row.live(now)),
                    epoch: row.epoch,
                    expires_at: row.expires_at,
                    checkpoint: inner
                        .checkpoints
                        .get(&segment_checkpoint_name(subscription, segment, segments))
                        .copied()
                        .unwrap_or(0),
                }
            })
            .collect())
    }

    async fn reset_segments(&self, subscription: &str, position: u64) -> Result<()> {
        let now = lease_now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        if let Some(table) = inner.leases.get_mut(subscription) {
            if table.rows.iter().any(|row| row.live(now)) {
                return Err(Error::SubscriptionRunning {
                    name: subscription.to_owned(),
                });
            }
            let segments = table.rows.len() as u32;
            for segment in 0..segments {
                inner
                    .checkpoints
                    .remove(&segment_checkpoint_name(subscription, segment, segments));
            }
            let highest = table.rows.iter().map(|row| row.epoch).max();
            table.epoch_floor = highest.unwrap_or(0).max(table.epoch_floor);
            table.rows.clear();
        }
        inner.checkpoints.insert(subscription.to_owned(), position);
        Ok(())
    }
}

#[async_trait]
impl ArchiveStore for InMemoryEventStore {
    fn archive_store_name(&self) -> String {
        "memory".to_owned()
    }

    async fn read_stored(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let inner = self.lock();
        let start = (from_position.max(1) - 1) as usize;
        Ok(inner
            .log
            .iter()
            .skip(start)
            .filter(|e| e.archived.is_none())
            .take(limit)
            .map(|e| e.record.clone())
            .collect())
    }

    async fn archive_horizon(&self) -> Result<Vec<ArchiveHorizon>> {
        Ok(self.lock().archives.clone())
    }

    async fn prune_archive(&self, request: PruneRequest) -> Result<()> {
        let mut inner = self.lock();
        let horizon = &request.horizon;
        let mismatch = |reason: String| Error::ArchiveMismatch {
            path: horizon.path.clone(),
            reason,
        };
        // Every check first: on an error nothing changes. No reader may lose an event it
        // has not handled: checkpoints, and every segment of a subscription split into
        // segments, saved or not.
        let checkpoints: Vec<(String, u64)> = inner
            .checkpoints
            .iter()
            .map(|(name, position)| (name.clone(), *position))
            .collect();
        let segmented: Vec<(String, u32)> = inner
            .leases
            .iter()
            .map(|(name, table)| (name.clone(), table.rows.len() as u32))
            .collect();
        check_readers(&checkpoints, &segmented, horizon.last_position)?;
        for pruned in &horizon.streams {
            let positions = inner
                .streams
                .get(&pruned.stream)
                .map_or(&[][..], Vec::as_slice);
            let lowest = positions
                .iter()
                .position(|&p| inner.log[p as usize - 1].archived.is_none())
                .map(|i| i as u64 + 1);
            let stored = StoredStream {
                lowest,
                highest: positions.len() as u64,
                snapshot: inner.snapshots.get(&pruned.stream).map(|s| s.version),
            };
            check_stream(&horizon.path, pruned, stored)?;
        }
        for &(position, event_id) in &request.events {
            let stored = position
                .checked_sub(1)
                .and_then(|i| inner.log.get(i as usize));
            if !stored.is_some_and(|s| s.archived.is_none() && s.record.event_id == event_id) {
                return Err(mismatch(format!(
                    "event {event_id} is not stored at position {position}"
                )));
            }
        }
        for &(position, _) in &request.events {
            let stored = &mut inner.log[position as usize - 1];
            stored.archived = Some(horizon.archive);
            stored.decoded = None;
            stored.record.payload = String::new();
            stored.record.metadata = Default::default();
        }
        inner.archives.push(request.horizon);
        Ok(())
    }

    async fn restore_archive(&self, archive: Uuid, events: Vec<RecordedEvent>) -> Result<()> {
        let mut inner = self.lock();
        let Some(index) = inner.archives.iter().position(|h| h.archive == archive) else {
            return Err(Error::ArchiveMismatch {
                path: archive.to_string(),
                reason: format!("archive {archive} is not in the store's horizon"),
            });
        };
        let path = inner.archives[index].path.clone();
        for event in &events {
            let stored = event
                .position
                .checked_sub(1)
                .and_then(|i| inner.log.get(i as usize));
            let fits = stored.is_some_and(|s| {
                s.archived == Some(archive)
                    && s.record.event_id == event.event_id
                    && s.record.version == event.version
                    && s.record.aggregate_id == event.aggregate_id
                    && s.record.aggregate_type == event.aggregate_type
            });
            if !fits {
                return Err(Error::ArchiveMismatch {
                    path,
                    reason: format!(
                        "event {} at position {} was not pruned into archive {archive}",
                        event.event_id, event.position
                    ),
                });
            }
        }
        for event in events {
            let position = event.position;
            let record = RecordedEvent {
                aggregate_type: registry().aggregate_type_name(&event.aggregate_type),
                event_type: registry().event_type_name(&event.event_type),
                ..event
            };
            inner.log[position as usize - 1] = Stored::new(record);
        }
        inner.archives.remove(index);
        Ok(())
    }
}
