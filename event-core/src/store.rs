//! The store contract every backend keeps: the parts [`EventLog`], [`SnapshotStore`] and
//! [`SubscriptionStore`], and the umbrella [`EventStore`] of a complete store.

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::lease::LeaseStore;
use crate::record::{
    AppendOutcome, AppendRequest, DeadLetter, ExpectedVersion, FailureRecord, FinishedReplay,
    NewDeadLetter, NewEvent, RecordedEvent, ReplayRequest, ReplayTarget, ReplayedEvent, Snapshot,
    StoreStatistics, StreamId,
};

/// Receives a stream's events one by one during
/// [`EventLog::replay_stream`]; it may run on a blocking thread of the store's.
pub trait ReplayVisitor: Send + 'static {
    /// Takes the next event; an error ends the replay and is returned from it.
    fn visit(&mut self, event: ReplayedEvent<'_>) -> Result<()>;

    /// Takes the next event together with `decoded`, what the registry decodes its payload
    /// into (the Rust type that registers its event type, upcast to the current schema),
    /// from a backend that keeps events decoded (the in-memory store), so the visitor can
    /// skip decoding it again. The default ignores `decoded` and calls
    /// [`visit`](Self::visit).
    fn visit_decoded(
        &mut self,
        event: ReplayedEvent<'_>,
        decoded: &dyn std::any::Any,
    ) -> Result<()> {
        let _ = decoded;
        self.visit(event)
    }

    /// The visitor as `Any`, to take it back after the replay.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}

/// How many failure records [`SubscriptionStore::record_failure`] keeps per subscription when the
/// bus records a failed attempt: the newest 1,000; older ones are removed as new ones come.
pub const DEFAULT_FAILURE_RETENTION: usize = 1_000;

/// How many finished replay requests [`SubscriptionStore::finish_replay_request`] keeps
/// when the bus records an outcome: the newest 1,000 (pending ones are always kept).
pub const DEFAULT_REPLAY_RETENTION: usize = 1_000;

/// Durable storage of event streams, the global log, snapshots, subscription checkpoints,
/// dead letters and failure records: a complete store, as applications pass it to a
/// [`Repository`](crate::Repository), an [`EventBus`](crate::EventBus) or an `EventSystem`.
///
/// The contract comes in four parts, each what one user needs: [`EventLog`] (the
/// streams and the global log, which repositories and the bus read), [`SnapshotStore`]
/// (a repository's snapshots), [`SubscriptionStore`] (a durable bus's checkpoints,
/// dead letters and failure records) and [`LeaseStore`] (the segment leases that let
/// several processes share a subscription). A backend implements the four parts;
/// `EventStore` is then implemented for it, and an `Arc<dyn EventStore>` upcasts to any
/// part (`Arc<dyn EventLog>`, `Arc<dyn LeaseStore>` and so on).
///
/// Every backend keeps the contract, and proves it by passing the conformance suite
/// (`eventfold::testing::conformance`, feature `testing`), grouped by the same parts.
pub trait EventStore: EventLog + SnapshotStore + SubscriptionStore + LeaseStore {}

impl<T: EventLog + SnapshotStore + SubscriptionStore + LeaseStore + ?Sized> EventStore for T {}

/// Anything that converts into a shared store, `Arc<dyn EventStore>`: what
/// [`Repository::new`](crate::Repository::new),
/// [`EventBusBuilder::store`](crate::EventBusBuilder::store) and `EventSystem::with_store`
/// take. A store value (the stores are cheap `Clone` handles), an `Arc` of one, or an
/// `Arc<dyn EventStore>`.
///
/// ```
/// use std::sync::Arc;
/// use eventfold_core::{EventStore, InMemoryEventStore, IntoStore};
///
/// let store = InMemoryEventStore::new();
/// let shared: Arc<dyn EventStore> = store.clone().into_store();
/// let same: Arc<dyn EventStore> = Arc::new(store).into_store();
/// let again: Arc<dyn EventStore> = Arc::clone(&shared).into_store();
/// assert!(Arc::ptr_eq(&shared, &again));
/// # drop(same);
/// ```
pub trait IntoStore {
    /// The store as a shared handle.
    fn into_store(self) -> Arc<dyn EventStore>;
}

impl<S: EventStore> IntoStore for S {
    fn into_store(self) -> Arc<dyn EventStore> {
        Arc::new(self)
    }
}

impl<S: EventStore> IntoStore for Arc<S> {
    fn into_store(self) -> Arc<dyn EventStore> {
        self
    }
}

impl IntoStore for Arc<dyn EventStore> {
    fn into_store(self) -> Arc<dyn EventStore> {
        self
    }
}

/// The event log: streams of events with versions, and the global log with positions.
///
/// - [`append`](Self::append) is atomic: all of its events are stored, or none.
///   It checks [`ExpectedVersion`] against the stream and fails with
///   [`Error::VersionConflict`](crate::Error::VersionConflict) carrying both versions.
/// - Appending events whose ids are all stored already, with identical content, in the
///   same stream, is idempotent: it returns the original outcome and stores nothing. An
///   event id stored with other content is [`Error::DuplicateEventId`](crate::Error::DuplicateEventId).
/// - Versions run 1, 2, 3 … per stream and positions 1, 2, 3 … in the global log, both
///   without gaps; positions follow commit order, so a reader that has seen position `p`
///   never later finds a new event at or below `p`.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if its version satisfies `expected`.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendOutcome>;

    /// Appends to several streams in one atomic step: every request is checked as
    /// [`append`](Self::append) checks it, and either all are stored (in request order,
    /// with consecutive positions) or none is, and the first failure is returned.
    ///
    /// A stream may appear once per batch. The default implementation takes a batch of one
    /// request; a backend that can commit several streams at once overrides it.
    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Result<Vec<AppendOutcome>> {
        check_batch(&requests)?;
        match <[AppendRequest; 1]>::try_from(requests) {
            Ok([request]) => {
                let outcome = self
                    .append(&request.stream, request.expected, request.events)
                    .await?;
                Ok(vec![outcome])
            }
            Err(_) => Err(Error::InvalidAppend {
                reason: "this store cannot append to several streams atomically".into(),
            }),
        }
    }

    /// The events of a stream from version `from_version` (inclusive, from 1), in order.
    async fn read_stream(&self, stream: &StreamId, from_version: u64)
    -> Result<Vec<RecordedEvent>>;

    /// The first `limit` events of what [`read_stream`](Self::read_stream) returns: a
    /// stream read in pages (the bus reads the deliveries it deferred so, holding no more
    /// than a page of them in memory). The default reads the rest of the stream and cuts
    /// it; the bundled stores read only the page.
    async fn read_stream_page(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        let mut events = self.read_stream(stream, from_version).await?;
        events.truncate(limit);
        Ok(events)
    }

    /// Hands the events of a stream from version `from_version` on, in order, to
    /// `visitor`, and returns it; stops at the first error it returns, adding the event's
    /// id and position to it ([`Error::at_event`](crate::Error::at_event)). This is how
    /// repositories rebuild aggregates: a backend that can lend each stored row without
    /// building a [`RecordedEvent`] overrides it. The default reads with
    /// [`read_stream`](Self::read_stream).
    async fn replay_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        mut visitor: Box<dyn ReplayVisitor>,
    ) -> Result<Box<dyn ReplayVisitor>> {
        for event in self.read_stream(stream, from_version).await? {
            visitor
                .visit(ReplayedEvent::from(&event))
                .map_err(|e| e.at_event(event.event_id, event.position))?;
        }
        Ok(visitor)
    }

    /// Up to `limit` events of the global log from position `from_position` (inclusive,
    /// from 1), in commit order.
    async fn read_all(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>>;

    /// The event with this id, if stored.
    async fn get(&self, event_id: Uuid) -> Result<Option<RecordedEvent>>;

    /// The stream's current version (0: no stream).
    async fn stream_version(&self, stream: &StreamId) -> Result<u64>;

    /// The position of the last committed event (0: empty log).
    async fn head_position(&self) -> Result<u64>;

    /// A watch on the head position, so a subscriber wakes when anything is appended. The
    /// store's own appends update it at once; appends by other processes or other handles
    /// on the same storage reach it within a delay the backend documents (SQLite polls for
    /// changes, PostgreSQL listens for notifications), which is why the bus's `wait_idle`
    /// also asks [`head_position`](Self::head_position).
    fn watch_head(&self) -> watch::Receiver<u64>;

    /// What the store holds: events, aggregates, the log's ends, and the snapshots,
    /// checkpoints, dead letters and failure records of the other parts.
    async fn statistics(&self) -> Result<StoreStatistics>;
}

/// Snapshots of aggregate states, which a [`Repository`](crate::Repository) saves and
/// loads to skip replaying a long stream's beginning.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// Stores a snapshot. It replaces the stored one unless that one is newer and still fits
    /// its stream (its version is at most the stream's); one ahead of its stream is always
    /// replaced, so it cannot keep good snapshots out. Versions compare as `u64`.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;

    /// The latest snapshot of a stream.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>>;
}

/// The state of a durable bus's subscriptions: checkpoints, dead letters and failure
/// records.
#[async_trait]
pub trait SubscriptionStore: Send + Sync + 'static {
    /// The last position a subscription has handled, if it has a checkpoint.
    async fn load_checkpoint(&self, subscription: &str) -> Result<Option<u64>>;

    /// Records that a subscription has handled everything up to `position`.
    async fn save_checkpoint(&self, subscription: &str, position: u64) -> Result<()>;

    /// Stores a dead letter and returns its id. A subscription holds one dead letter per
    /// event (its event id and position: a row too damaged to read its id is dead-lettered
    /// with the nil id, and two such rows stay two letters): if it has one of this event
    /// already, that one is updated and its id returned: the new error, event type and last
    /// failure time replace the stored ones, the attempts are added to the stored ones (up
    /// to `u32::MAX`), and the first failure time stays.
    async fn add_dead_letter(&self, dead_letter: NewDeadLetter) -> Result<u64>;

    /// Dead letters, oldest first; only one subscription's when `subscription` is given.
    async fn dead_letters(&self, subscription: Option<&str>) -> Result<Vec<DeadLetter>>;

    /// Removes a dead letter; false if there was none with this id.
    async fn remove_dead_letter(&self, id: u64) -> Result<bool>;

    /// Removes the dead letters of one subscription, or every dead letter when
    /// `subscription` is `None`; returns how many were removed.
    async fn clear_dead_letters(&self, subscription: Option<&str>) -> Result<u64>;

    /// Records one failed handler attempt and, in the same write, removes that
    /// subscription's older records beyond the newest `retain` (the new one included), so
    /// the records stay bounded. The bus passes [`DEFAULT_FAILURE_RETENTION`].
    async fn record_failure(&self, failure: FailureRecord, retain: usize) -> Result<()>;

    /// Failed attempts recorded for one subscription, newest first, at most `limit`.
    async fn failures(&self, subscription: &str, limit: usize) -> Result<Vec<FailureRecord>>;

    /// Removes the failure records of one subscription, or every record when
    /// `subscription` is `None`; returns how many were removed.
    async fn clear_failures(&self, subscription: Option<&str>) -> Result<u64>;

    /// Stores a request to replay dead letters, for a running bus to carry out (see
    /// [`EventBus`](crate::EventBus): each bus with a store carries out, after its lease
    /// rounds, the pending requests of the subscriptions whose segment 0 it holds), and
    /// returns the stored requests, pending: one for a dead letter (with its
    /// subscription) or a subscription, and for [`ReplayTarget::All`] one per subscription
    /// that has dead letters when it is stored (none if there are none), in the order of
    /// their names. Checked and stored in one write.
    ///
    /// # Errors
    /// [`Error::DeadLetterNotFound`] for a dead letter id not stored;
    /// [`Error::InvalidSubscriptionName`] for an empty subscription name. The default
    /// implementation fails with [`Error::Unsupported`].
    async fn request_replay(
        &self,
        target: ReplayTarget,
        requested_at: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<ReplayRequest>> {
        let _ = (target, requested_at);
        Err(replay_unsupported::<Self>("storing replay requests"))
    }

    /// The pending replay requests of one subscription, oldest first.
    async fn pending_replay_requests(&self, subscription: &str) -> Result<Vec<ReplayRequest>> {
        let _ = subscription;
        Err(replay_unsupported::<Self>("listing replay requests"))
    }

    /// Replay requests, pending and finished, oldest first; one subscription's when
    /// `subscription` is given.
    async fn replay_requests(&self, subscription: Option<&str>) -> Result<Vec<ReplayRequest>> {
        let _ = subscription;
        Err(replay_unsupported::<Self>("listing replay requests"))
    }

    /// The replay request with this id, if stored.
    async fn replay_request(&self, id: u64) -> Result<Option<ReplayRequest>> {
        let _ = id;
        Err(replay_unsupported::<Self>("reading a replay request"))
    }

    /// Records how a pending replay request ended, and then removes the finished requests
    /// beyond the newest `retain` (by id; at least this one is kept), so they stay bounded;
    /// false (and nothing changes) if no request has this id or it has finished already, so
    /// the first outcome stays. The bus passes [`DEFAULT_REPLAY_RETENTION`].
    async fn finish_replay_request(
        &self,
        id: u64,
        finished: FinishedReplay,
        retain: usize,
    ) -> Result<bool> {
        let _ = (id, finished, retain);
        Err(replay_unsupported::<Self>("recording a replay's outcome"))
    }
}

/// The error of a [`SubscriptionStore`] replay-request method that a store does not
/// implement.
fn replay_unsupported<S: ?Sized>(operation: &str) -> Error {
    Error::Unsupported {
        operation: operation.to_owned(),
        store: std::any::type_name::<S>().to_owned(),
    }
}

/// Checks a replay request's subscription name, as every backend does before it stores
/// the request.
pub fn check_replay_target(target: &ReplayTarget) -> Result<()> {
    match target {
        ReplayTarget::Subscription { name } if name.is_empty() => {
            Err(Error::InvalidSubscriptionName {
                name: name.clone(),
                reason: "a replay request needs the name of the subscription to replay".into(),
            })
        }
        _ => Ok(()),
    }
}

/// Checks what every backend checks before it stores anything: at least one event, a
/// named stream, event types and schema versions set, no event id twice in one append.
///
/// Backends call it first, so a malformed append fails the same way everywhere.
pub fn check_append(stream: &StreamId, events: &[NewEvent]) -> Result<()> {
    let invalid = |reason: String| Err(Error::InvalidAppend { reason });
    if events.is_empty() {
        return invalid("an append needs at least one event".into());
    }
    if stream.aggregate_type.is_empty() || stream.aggregate_id.is_empty() {
        return invalid(format!("stream `{stream}` needs an aggregate type and id"));
    }
    let first_repeat = first_repeated_id(events);
    for (i, event) in events.iter().enumerate() {
        if event.event_type.is_empty() {
            return invalid(format!("event {} has no event type", event.event_id));
        }
        if event.schema_version == 0 {
            return invalid(format!("event {} has schema version 0", event.event_id));
        }
        if first_repeat == Some(i) {
            return invalid(format!("event id {} appears twice", event.event_id));
        }
    }
    Ok(())
}

/// The index of the first event whose id an earlier event has. Pairwise for a few events;
/// sorted for more, since a batch of 100 compared pairwise cost about 2% of an append.
fn first_repeated_id(events: &[NewEvent]) -> Option<usize> {
    if events.len() <= 16 {
        return (1..events.len())
            .find(|&i| events[..i].iter().any(|e| e.event_id == events[i].event_id));
    }
    let mut ids: Vec<(u128, usize)> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id.as_u128(), i))
        .collect();
    ids.sort_unstable();
    // Equal ids sort by index: the second of each pair is a repeat.
    ids.windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min()
}

/// Checks a batch as [`check_append`] checks one append, and that no stream appears twice
/// and no event id repeats across the batch.
pub fn check_batch(requests: &[AppendRequest]) -> Result<()> {
    if let [request] = requests {
        // One append: `check_append` already finds every repeated id.
        return check_append(&request.stream, &request.events);
    }
    let mut streams = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for request in requests {
        check_append(&request.stream, &request.events)?;
        if !streams.insert(&request.stream) {
            return Err(Error::InvalidAppend {
                reason: format!("stream `{}` appears twice in one batch", request.stream),
            });
        }
        for event in &request.events {
            if !ids.insert(event.event_id) {
                return Err(Error::InvalidAppend {
                    reason: format!("event id {} appears twice", event.event_id),
                });
            }
        }
    }
    Ok(())
}

/// The part of the contract that archiving needs (`eventfold::archive`): reading what is
/// stored across the gaps of pruned archives, the archive horizon, and the atomic prune and
/// restore of an archive's events. A backend without archiving implements it empty: every
/// method then fails with [`Error::Unsupported`].
///
/// A backend that implements it keeps, beyond the [`EventLog`] contract: positions and
/// versions of the events that stay never change; the head position and every stream's
/// version count pruned events too (appends go on numbering after them); and a read of
/// anything pruned ([`EventLog::read_stream`], [`EventLog::replay_stream`] from a version
/// the horizon covers, [`EventLog::read_all`] over a pruned position, [`EventLog::get`] of
/// an id in the range of an archive's ids) fails with [`Error::Archived`] naming the
/// archive, never skipping it silently.
///
/// A tool that works on any store (the `eventfold` command) can hold an
/// `Arc<dyn ArchiveStore>`: it upcasts to `Arc<dyn EventStore>` for everything else.
#[async_trait]
pub trait ArchiveStore: EventStore {
    /// How an archive manifest names this store (for SQLite, its file).
    fn archive_store_name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }

    /// Up to `limit` stored events from position `from_position` on, in position order,
    /// skipping the positions of pruned archives instead of failing on them.
    async fn read_stored(&self, from_position: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let _ = (from_position, limit);
        Err(archive_unsupported(
            self.archive_store_name(),
            "reading across the archive horizon",
        ))
    }

    /// The archive horizon: every archive pruned from this store and not restored, oldest
    /// first.
    async fn archive_horizon(&self) -> Result<Vec<crate::archive::ArchiveHorizon>> {
        Err(archive_unsupported(
            self.archive_store_name(),
            "the archive horizon",
        ))
    }

    /// Removes the events of an archive and records it in the horizon, in one atomic
    /// step, after checking in that same step that every checkpoint, and every segment of
    /// a subscription split into segments (saved or not), is at or past the archive's last
    /// position ([`Error::PruneBehindSubscription`]; `archive::check_readers`), that every stream
    /// either loses all its events or keeps a snapshot above the last pruned version
    /// ([`Error::PruneBreaksStream`]; a load replays from the snapshot's own version), that each stream loses a prefix of what it holds,
    /// and that each event is stored at its position with its id
    /// ([`Error::ArchiveMismatch`]). On any error nothing is removed.
    async fn prune_archive(&self, request: crate::archive::PruneRequest) -> Result<()> {
        let _ = request;
        Err(archive_unsupported(
            self.archive_store_name(),
            "pruning an archive",
        ))
    }

    /// Stores the events of a pruned archive again exactly (same ids, positions, versions,
    /// times and content) and removes the archive from the horizon, in one atomic step.
    /// [`Error::ArchiveMismatch`] if the archive is not in the horizon.
    async fn restore_archive(&self, archive: Uuid, events: Vec<RecordedEvent>) -> Result<()> {
        let _ = (archive, events);
        Err(archive_unsupported(
            self.archive_store_name(),
            "restoring an archive",
        ))
    }
}

/// The error of an [`ArchiveStore`] method that a store does not implement.
fn archive_unsupported(store: String, operation: &str) -> Error {
    Error::Unsupported {
        operation: operation.to_owned(),
        store,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(ids: &[u128]) -> Vec<NewEvent> {
        ids.iter()
            .map(|&id| NewEvent {
                event_id: Uuid::from_u128(id),
                event_type: "Opened".into(),
                schema_version: 1,
                occurred_at: chrono::Utc::now(),
                metadata: Default::default(),
                payload: "{}".into(),
            })
            .collect()
    }

    #[test]
    fn the_first_repeated_event_id_is_found_in_short_and_long_appends() {
        let stream = StreamId::new("Account", "a-1");
        for n in [2_u128, 15, 16, 17, 100] {
            let mut ids: Vec<u128> = (1..=n).collect();
            assert_eq!(first_repeated_id(&events(&ids)), None);
            assert!(check_append(&stream, &events(&ids)).is_ok());
            // The last id again, then the first: the repeat at index n comes first.
            ids.push(n);
            ids.push(1);
            assert_eq!(
                first_repeated_id(&events(&ids)),
                Some(n as usize),
                "{n} events"
            );
            let error = check_append(&stream, &events(&ids))
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("{} appears twice", Uuid::from_u128(n))),
                "{error}"
            );
        }
    }
}
