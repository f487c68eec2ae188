//! What a store keeps: recorded events and their metadata, and the types of the store API.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::event::DomainEvent;
use crate::registry::registry;

/// Context stored with every event: who caused it, in which flow, and free key/values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// Groups every event of one business flow (a request, a saga).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The event or command that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// Free key/values (user id, source, trace id). Sorted, so equal metadata stores equal.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, String>,
}

impl Metadata {
    /// Empty metadata.
    pub fn new() -> Self {
        Metadata::default()
    }

    /// Sets the correlation id.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, id: Uuid) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// Adds a key/value.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.values.insert(key.into(), value.into());
        self
    }

    /// True when nothing is set.
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none() && self.causation_id.is_none() && self.values.is_empty()
    }

    /// Metadata for an event caused by `cause`: same correlation, causation = `cause`'s id.
    pub fn caused_by(cause: &RecordedEvent) -> Self {
        Metadata {
            correlation_id: cause.metadata.correlation_id.or(Some(cause.event_id)),
            causation_id: Some(cause.event_id),
            values: BTreeMap::new(),
        }
    }
}

/// Identifies one aggregate's stream: its type and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    /// The aggregate type, e.g. `"Account"`.
    pub aggregate_type: String,
    /// The aggregate's id within its type.
    pub aggregate_id: String,
}

impl StreamId {
    /// A stream id.
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: impl Into<String>) -> Self {
        StreamId {
            aggregate_type: aggregate_type.into(),
            aggregate_id: aggregate_id.into(),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.aggregate_type, self.aggregate_id)
    }
}

/// What an append expects of the stream's current version (optimistic concurrency).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the version is.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be at exactly this version (0 means the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// True when a stream at `actual` (0: none) satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(v) => v == actual,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// An event ready to append: serialized, with its id, time and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Unique id; UUID v7 by default, so ids are time-ordered and the index stays append-only.
    pub event_id: Uuid,
    /// The registered event type name.
    pub event_type: String,
    /// The schema version of the payload.
    pub schema_version: u32,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// Correlation, causation and key/values.
    pub metadata: Metadata,
    /// The event's content as JSON text.
    pub payload: String,
}

/// A new UUID v7 event id and the time it carries, from one reading of the clock.
///
/// The 74 bits after the timestamp are a per-thread random start plus a per-thread counter
/// (RFC 9562's monotonic random method): ids made on one thread strictly increase, ids of
/// different threads are ordered to the millisecond, and two threads' ids could only meet
/// if their random starts fell within the number of ids they make of each other (about
/// 1 in 2^40 after a billion ids each). Far cheaper than drawing random bits per id under
/// a shared, locked context.
pub(crate) fn fresh_id() -> (Uuid, DateTime<Utc>) {
    struct Sequence {
        next: u128,
        last_millis: u64,
    }
    const BITS_74: u128 = (1 << 74) - 1;
    thread_local! {
        static SEQUENCE: std::cell::RefCell<Sequence> = std::cell::RefCell::new(Sequence {
            next: Uuid::new_v4().as_u128() & BITS_74,
            last_millis: 0,
        });
    }
    let now = Utc::now();
    let millis = u64::try_from(now.timestamp_millis()).unwrap_or(0);
    let id = SEQUENCE.with_borrow_mut(|sequence| {
        // A clock that steps back does not make ids go back.
        sequence.last_millis = sequence.last_millis.max(millis);
        let value = sequence.next;
        sequence.next = (value + 1) & BITS_74;
        let mut bytes = [0_u8; 10];
        // rand_a: the top 12 bits; rand_b: the low 62 (the builder adds version and variant).
        bytes[..2].copy_from_slice(&((value >> 62) as u16).to_be_bytes());
        bytes[2..].copy_from_slice(&((value as u64) & ((1 << 62) - 1)).to_be_bytes());
        uuid::Builder::from_unix_timestamp_millis(sequence.last_millis, &bytes).into_uuid()
    });
    (id, now)
}

impl NewEvent {
    /// Serializes a domain event with a fresh UUID v7 id and the current time.
    ///
    /// A float that JSON cannot hold (NaN, an infinity) anywhere in the event is
    /// [`Error::Serialize`]: it would be stored as `null` and read back as something else.
    pub fn from_event<E: DomainEvent>(event: &E, metadata: Metadata) -> Result<Self> {
        let event_type = event.event_type();
        let payload = event.to_payload().map_err(|source| Error::Serialize {
            event_type: event_type.to_owned(),
            source,
        })?;
        let (event_id, occurred_at) = fresh_id();
        Ok(NewEvent {
            event_id,
            event_type: event_type.to_owned(),
            schema_version: event.schema_version(),
            occurred_at,
            metadata,
            payload,
        })
    }

    /// Replaces the event id (to make a retried append idempotent, give it the same id).
    pub fn with_event_id(mut self, event_id: Uuid) -> Self {
        self.event_id = event_id;
        self
    }

    /// True when `recorded` stores this very event (same id, stream content and metadata);
    /// an append of it again is then idempotent.
    pub fn same_content(&self, stream: &StreamId, recorded: &RecordedEvent) -> bool {
        self.event_id == recorded.event_id
            && stream.aggregate_type == recorded.aggregate_type
            && stream.aggregate_id == recorded.aggregate_id
            && self.event_type == recorded.event_type
            && self.schema_version == recorded.schema_version
            && self.occurred_at == recorded.occurred_at
            && self.metadata == recorded.metadata
            && self.payload == recorded.payload
    }
}

/// An event as stored, with its place in its stream and in the global log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// Unique, time-ordered id.
    pub event_id: Uuid,
    /// The aggregate type of its stream. Borrowed from the registry when the type is
    /// registered, so records of known types carry no copy of the name.
    pub aggregate_type: Cow<'static, str>,
    /// The aggregate id of its stream.
    pub aggregate_id: String,
    /// 1, 2, 3 ... within its stream, without gaps.
    pub version: u64,
    /// 1, 2, 3 ... in the global log, in commit order, without gaps.
    pub position: u64,
    /// The registered event type name (borrowed from the registry, like `aggregate_type`).
    pub event_type: Cow<'static, str>,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// When the fact happened.
    pub occurred_at: DateTime<Utc>,
    /// When the store committed it.
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation and key/values.
    pub metadata: Metadata,
    /// The content as JSON text, exactly as stored (it may be corrupt; decoding says so).
    pub payload: String,
}

impl RecordedEvent {
    /// Turns the stored payload back into the Rust event type `E`, upcasting older schema
    /// versions first.
    ///
    /// Errors name this event's id and position: [`Error::UnknownEventType`],
    /// [`Error::WrongEventType`], [`Error::SchemaTooNew`], [`Error::Upcast`], or
    /// [`Error::Payload`] for JSON that is invalid or does not fit the type.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        registry()
            .decode::<E>(&self.event_type, self.schema_version, &self.payload)
            .map_err(|e| e.at_event(self.event_id, self.position))
    }

    /// Turns the stored payload into whichever Rust type registers its event type.
    pub fn decode_any(&self) -> Result<Box<dyn std::any::Any + Send>> {
        registry()
            .decode_any(&self.event_type, self.schema_version, &self.payload)
            .map_err(|e| e.at_event(self.event_id, self.position))
    }

    /// The stream this event belongs to.
    pub fn stream_id(&self) -> StreamId {
        StreamId::new(&*self.aggregate_type, &self.aggregate_id)
    }
}

/// One stream's part of an [`EventLog::append_batch`](crate::EventLog::append_batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The stream to append to.
    pub stream: StreamId,
    /// What the stream's version must be.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

/// A stored event as a replay sees it: borrowed from the store, so rebuilding an aggregate
/// allocates nothing per event beyond the decoded event itself. It leaves out the event id,
/// which a replay does not need; the store adds it to an error the visitor returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayedEvent<'a> {
    /// Its version in its stream.
    pub version: u64,
    /// The registered event type name.
    pub event_type: &'a str,
    /// The schema version of the payload.
    pub schema_version: u32,
    /// The content as JSON text, exactly as stored.
    pub payload: &'a str,
}

impl ReplayedEvent<'_> {
    /// Decodes the payload into `E`, upcasting older schema versions first. The store adds
    /// the event's id and position to an error that a visitor returns.
    pub fn decode<E: DomainEvent>(&self) -> Result<E> {
        registry().decode::<E>(self.event_type, self.schema_version, self.payload)
    }
}

impl<'a> From<&'a RecordedEvent> for ReplayedEvent<'a> {
    fn from(e: &'a RecordedEvent) -> Self {
        ReplayedEvent {
            version: e.version,
            event_type: &e.event_type,
            schema_version: e.schema_version,
            payload: &e.payload,
        }
    }
}

/// What an append stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendOutcome {
    /// The stream's version after the append (the version of its last event).
    pub version: u64,
    /// The position of the first appended event.
    pub first_position: u64,
    /// The position of the last appended event.
    pub last_position: u64,
}

/// A serialized aggregate state at a version, to start a replay from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The stream version the state includes.
    pub version: u64,
    /// The aggregate's snapshot schema version; another version is ignored on load.
    pub schema_version: u32,
    /// The state as JSON text.
    pub state: String,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

/// An event a subscription gave up on after its last attempt, kept until replayed or
/// discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The store's id for this dead letter.
    pub id: u64,
    /// The subscription that failed.
    pub subscription: String,
    /// The event that failed.
    pub event_id: Uuid,
    /// Its global position.
    pub position: u64,
    /// Its event type name.
    pub event_type: String,
    /// The last error, as text.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
}

/// A dead letter to store; the store gives it an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDeadLetter {
    /// The subscription that failed.
    pub subscription: String,
    /// The event that failed.
    pub event_id: Uuid,
    /// Its global position.
    pub position: u64,
    /// Its event type name.
    pub event_type: String,
    /// The last error, as text.
    pub error: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
}

/// What a replay request asks for: which dead letters a running bus should deliver again
/// (see [`SubscriptionStore::request_replay`](crate::SubscriptionStore::request_replay)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplayTarget {
    /// One dead letter, by its id.
    DeadLetter {
        /// The dead letter's id.
        id: u64,
    },
    /// Every dead letter of one subscription, as they are when a bus carries it out.
    Subscription {
        /// The subscription's name.
        name: String,
    },
    /// Every dead letter stored: one request per subscription that has dead letters now.
    All,
}

/// A stored request to replay dead letters, carried out by a running bus that runs its
/// subscription (one that holds the lease of its segment 0), which then records its
/// outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// The store's id for this request.
    pub id: u64,
    /// The subscription whose dead letters it replays.
    pub subscription: String,
    /// The one dead letter it replays; `None`: every dead letter of the subscription.
    pub dead_letter: Option<u64>,
    /// When it was requested.
    pub requested_at: DateTime<Utc>,
    /// How it ended; `None` while it is pending.
    pub finished: Option<FinishedReplay>,
}

impl ReplayRequest {
    /// True while no bus has recorded its outcome.
    pub fn is_pending(&self) -> bool {
        self.finished.is_none()
    }
}

/// When and how a replay request ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedReplay {
    /// When the bus recorded the outcome.
    pub at: DateTime<Utc>,
    /// What the replay did.
    pub outcome: ReplayOutcome,
}

/// What carrying out a replay request did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// The replay ran: counts of dead letters as in [`ReplayReport`](crate::ReplayReport)
    /// (those failed or held back are kept).
    Done {
        /// Delivered successfully, and so removed.
        replayed: u64,
        /// Failed again, and kept.
        failed: u64,
        /// Not tried behind a failed one of the same aggregate, and kept.
        held_back: u64,
    },
    /// The replay could not be done: the dead letter failed again, or was gone.
    Failed {
        /// Why, as text.
        reason: String,
    },
}

impl ReplayOutcome {
    /// The outcome as a store keeps it, in four nullable columns: the counts replayed,
    /// failed and held back (all set when done), and the reason (set when failed). For
    /// store backends; [`from_columns`](Self::from_columns) reads them back.
    pub fn to_columns(&self) -> ([Option<u64>; 3], Option<&str>) {
        match self {
            ReplayOutcome::Done {
                replayed,
                failed,
                held_back,
            } => ([Some(*replayed), Some(*failed), Some(*held_back)], None),
            ReplayOutcome::Failed { reason } => ([None; 3], Some(reason)),
        }
    }

    /// The outcome kept in the columns of [`to_columns`](Self::to_columns); `None` if they
    /// hold neither a reason nor all three counts (a damaged row).
    ///
    /// ```
    /// use eventfold_core::ReplayOutcome;
    ///
    /// let done = ReplayOutcome::Done { replayed: 2, failed: 1, held_back: 0 };
    /// let (counts, reason) = done.to_columns();
    /// assert_eq!(ReplayOutcome::from_columns(counts, reason.map(str::to_owned)), Some(done));
    /// assert_eq!(ReplayOutcome::from_columns([Some(1), None, Some(0)], None), None);
    /// ```
    pub fn from_columns(counts: [Option<u64>; 3], reason: Option<String>) -> Option<Self> {
        match (reason, counts) {
            (Some(reason), _) => Some(ReplayOutcome::Failed { reason }),
            (None, [Some(replayed), Some(failed), Some(held_back)]) => Some(ReplayOutcome::Done {
                replayed,
                failed,
                held_back,
            }),
            (None, _) => None,
        }
    }

    /// True if every dead letter asked for was delivered (nothing failed or held back).
    pub fn is_success(&self) -> bool {
        matches!(
            self,
            ReplayOutcome::Done {
                failed: 0,
                held_back: 0,
                ..
            }
        )
    }
}

/// One failed handler attempt, kept for operators (which subscription, which event, why, how long).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The subscription whose handler failed.
    pub subscription: String,
    /// The event it was handling.
    pub event_id: Uuid,
    /// Its global position.
    pub position: u64,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// The error, as text.
    pub error: String,
    /// How long the attempt ran, in microseconds.
    pub duration_micros: u64,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
}

/// A subscription's checkpoint: the last global position it has handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The subscription's stable name.
    pub subscription: String,
    /// The last position handled (every event at or below it is done).
    pub position: u64,
    /// How far the subscription is behind the head of the log.
    pub lag: u64,
}

/// One stream as a store lists it for operators (`SqliteEventStore::streams`,
/// `PostgresEventStore::streams`): a stream with stored events, and what they span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    /// The stream.
    pub stream: StreamId,
    /// Its current version (its last event's; pruned events count, as in
    /// [`EventLog::stream_version`](crate::EventLog::stream_version)).
    pub version: u64,
    /// Its events stored (not those pruned into an archive).
    pub events: u64,
    /// The position of its last event.
    pub last_position: u64,
    /// When its last event was recorded.
    pub last_recorded_at: DateTime<Utc>,
}

/// What a store holds, for operators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStatistics {
    /// Stored events in all.
    pub events: u64,
    /// Stored events by event type name.
    pub events_by_type: BTreeMap<String, u64>,
    /// Distinct streams (aggregates).
    pub aggregates: u64,
    /// The first position in the log, if any event is stored.
    pub first_position: Option<u64>,
    /// The last position in the log (the head), if any event is stored.
    pub last_position: Option<u64>,
    /// When the first event was recorded.
    pub first_recorded_at: Option<DateTime<Utc>>,
    /// When the last event was recorded.
    pub last_recorded_at: Option<DateTime<Utc>>,
    /// Every subscription's checkpoint and lag.
    pub checkpoints: Vec<Checkpoint>,
    /// Dead letters waiting.
    pub dead_letters: u64,
    /// Failed attempts recorded.
    pub failures: u64,
    /// Snapshots stored.
    pub snapshots: u64,
    /// Size on disk in bytes, for a backend that has one.
    pub size_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_ids_increase_on_a_thread_and_carry_their_time() {
        let mut last = Uuid::nil();
        for _ in 0..10_000 {
            let (id, at) = fresh_id();
            assert!(id > last, "{id} after {last}");
            assert_eq!(id.get_version_num(), 7);
            let (seconds, nanos) = id.get_timestamp().unwrap().to_unix();
            assert_eq!(
                seconds * 1_000 + u64::from(nanos) / 1_000_000,
                at.timestamp_millis() as u64
            );
            last = id;
        }
        assert_eq!(last.get_variant(), uuid::Variant::RFC4122);
        // Threads start at unrelated random points: no id is made twice.
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| fresh_id().0).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for thread in threads {
            for id in thread.join().unwrap() {
                assert!(all.insert(id), "{id} made twice");
            }
        }
    }
}
