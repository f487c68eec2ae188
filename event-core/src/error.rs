//! The one error type of `eventfold-core`.

use uuid::Uuid;

use crate::record::ExpectedVersion;

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A boxed error from a backend or a handler, kept as the `source` of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in eventfold, short of a domain rule refusing a command
/// (that is [`CommandError::Rejected`](crate::CommandError::Rejected)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An append found the stream at another version than the one it expected.
    #[error(
        "version conflict on {aggregate_type}/{aggregate_id}: expected {expected}, found version {actual}"
    )]
    VersionConflict {
        /// The aggregate type of the stream.
        aggregate_type: String,
        /// The aggregate id of the stream.
        aggregate_id: String,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's version when the append was checked (0: no stream).
        actual: u64,
    },

    /// An event id is already stored with other content than the append carries.
    #[error("event id {event_id} is already stored with different content")]
    DuplicateEventId {
        /// The id that is taken.
        event_id: Uuid,
    },

    /// An append was malformed (no events, mixed streams, a bad field); nothing was stored.
    #[error("invalid append: {reason}")]
    InvalidAppend {
        /// What is wrong with it.
        reason: String,
    },

    /// A stored event names an event type that no Rust type in this program registers.
    #[error("unknown event type `{event_type}`{}", at(.event_id, .position))]
    UnknownEventType {
        /// The stored type name.
        event_type: String,
        /// The stored event, when the failure came from one.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
    },

    /// A stored event's type is registered, but by another Rust type than the one asked for.
    #[error("event type `{event_type}` belongs to `{registered}`, not to `{requested}`{}", at(.event_id, .position))]
    WrongEventType {
        /// The stored type name.
        event_type: String,
        /// The Rust type that registers the name.
        registered: &'static str,
        /// The Rust type the caller asked for.
        requested: &'static str,
        /// The stored event, when known.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
    },

    /// A stored payload is not valid JSON or does not fit its event type.
    #[error("payload of `{event_type}` does not decode{}", at(.event_id, .position))]
    Payload {
        /// The stored type name.
        event_type: String,
        /// The stored event, when known.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },

    /// A stored event has a newer schema version than this program knows.
    #[error(
        "`{event_type}` is stored at schema version {stored}, newer than version {known} known to this program{}",
        at(.event_id, .position)
    )]
    SchemaTooNew {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        stored: u32,
        /// The newest schema version this program knows.
        known: u32,
        /// The stored event, when known.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
    },

    /// An upcaster is missing for a step, or one failed.
    #[error("cannot upcast `{event_type}` from schema version {from}{}: {reason}", at(.event_id, .position))]
    Upcast {
        /// The stored type name.
        event_type: String,
        /// The version the failed step starts from.
        from: u32,
        /// Why it failed.
        reason: String,
        /// The stored event, when known.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
    },

    /// A stored event is damaged: its checksum does not match its fields, or a field cannot
    /// be read back as it was written (text that is not UTF-8, an id of the wrong length, a
    /// number out of range). Nothing is returned in its place; the rest of the store is
    /// unaffected.
    #[error("stored event is damaged{}: {reason}", at(.event_id, .position))]
    CorruptEvent {
        /// The damaged event's id, when it can still be read.
        event_id: Option<Uuid>,
        /// Its global position, when known.
        position: Option<u64>,
        /// What is damaged, in a sentence.
        reason: String,
    },

    /// An event could not be serialized into a payload.
    #[error("cannot serialize `{event_type}`")]
    Serialize {
        /// The event type name.
        event_type: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },

    /// The registry is inconsistent: two Rust types claim one event name, or an upcaster
    /// chain is broken. Found by [`Registry::validate`](crate::Registry::validate).
    #[error("event registry is invalid: {}", .problems.join("; "))]
    InvalidRegistry {
        /// Every problem found, one sentence each.
        problems: Vec<String>,
    },

    /// Event types the program expected at start-up are not registered (see
    /// [`Registry::expect`](crate::Registry::expect)); often a crate the linker dropped.
    #[error("event types not registered: {}", .names.join(", "))]
    MissingEventTypes {
        /// The names that are missing.
        names: Vec<String>,
    },

    /// A snapshot could not be written.
    #[error("cannot serialize snapshot of {aggregate_type}")]
    Snapshot {
        /// The aggregate type.
        aggregate_type: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },

    /// No dead letter has this id.
    #[error("no dead letter with id {id}")]
    DeadLetterNotFound {
        /// The id asked for.
        id: u64,
    },

    /// The bus queue has no room for the events, and the caller asked not to wait (or the
    /// batch is larger than the whole queue). Nothing was published.
    #[error("the bus queue is full (capacity {capacity}); nothing was published")]
    QueueFull {
        /// The queue's capacity.
        capacity: usize,
    },

    /// The bus is stopped (or stopping): it accepts no more events.
    #[error("the event bus is stopped")]
    BusStopped,

    /// The operation needs a running bus (call `start` first).
    #[error("the event bus is not running")]
    BusNotRunning,

    /// `start` was called on a bus that already started.
    #[error("the event bus was already started")]
    BusAlreadyStarted,

    /// An event was published without an aggregate id: mark a field
    /// `#[domain_event(aggregate_id)]` or give the id with `Outgoing::to`.
    #[error("`{event_type}` was published without an aggregate id")]
    MissingAggregateId {
        /// The event's type name.
        event_type: String,
    },

    /// A subscription with this name exists already.
    #[error("a subscription named `{name}` exists already")]
    DuplicateSubscription {
        /// The name.
        name: String,
    },

    /// No subscription has this name.
    #[error("no subscription named `{name}`")]
    UnknownSubscription {
        /// The name asked for.
        name: String,
    },

    /// A subscription cannot be reset while it runs: it is registered on a running bus, or
    /// a member holds a live lease on one of its segments. Stop the bus, or unsubscribe it,
    /// first (and let the leases be released or expire); nothing was changed.
    #[error(
        "subscription `{name}` is registered on a running bus or holds a live segment lease; stop it (or let its leases go) before resetting it"
    )]
    SubscriptionRunning {
        /// The subscription's name.
        name: String,
    },

    /// A position past the head of the log was asked for; nothing was changed.
    #[error("position {position} is past the head of the log ({head})")]
    PositionBeyondHead {
        /// The position asked for.
        position: u64,
        /// The head when it was checked.
        head: u64,
    },

    /// The operation needs a bus with a store (it works on durable checkpoints).
    #[error("`{operation}` needs a bus with a store")]
    NotDurable {
        /// The operation asked for.
        operation: &'static str,
    },

    /// A subscription cannot take this name (an empty one, say); nothing was registered.
    #[error("invalid subscription name `{name}`: {reason}")]
    InvalidSubscriptionName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A setting is out of its range (a bus builder's, a store's options); nothing was
    /// built or opened.
    #[error("invalid setting `{setting}`: {reason}")]
    InvalidSetting {
        /// The setter's name (`workers`, `queue_capacity`, `busy_timeout`...).
        setting: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// A store URL's scheme names no store this build opens (`sqlite:` needs the feature
    /// `sqlite`); nothing was opened.
    #[error("unknown store URL scheme `{scheme}` in `{url}`; this build opens {known}")]
    UnknownStoreScheme {
        /// The URL as given.
        url: String,
        /// Its scheme, the part before the first `:`.
        scheme: String,
        /// The schemes this build opens, for the message (`sqlite:, memory:`).
        known: &'static str,
    },

    /// A store URL is malformed: no scheme, no path, or a part its store does not take
    /// (a query, a fragment, a bad `%` escape); nothing was opened.
    #[error("malformed store URL `{url}`: {reason}")]
    InvalidStoreUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it, and the form that is expected.
        reason: String,
    },

    /// A handler failed when a dead letter was replayed; the dead letter is kept.
    #[error("subscription `{subscription}` failed on event {event_id}: {message}")]
    HandlerFailed {
        /// The subscription.
        subscription: String,
        /// The event.
        event_id: Uuid,
        /// What the handler reported.
        message: String,
    },

    /// A store could not be opened: its location is unreachable
    /// ([`StoreErrorKind::CannotOpen`]), holds no database of this store
    /// ([`StoreErrorKind::Corrupt`]), was written by a newer version of the library
    /// ([`StoreErrorKind::SchemaTooNew`]), or opening failed otherwise (`ReadOnly`, `Busy`,
    /// `Io`...). The same for every backend and every way of opening one; nothing was
    /// changed.
    #[error("cannot open the store at `{location}` ({kind}): {reason}")]
    Open {
        /// What kind of failure, the same set as [`Error::Store`]'s.
        kind: StoreErrorKind,
        /// Where the store is (a file path, for SQLite).
        location: String,
        /// What failed, in a sentence (the backend's own words are in `source`).
        reason: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },

    /// The storage backend failed (I/O, a full disk, a read-only file, a lock held too long).
    /// Nothing of the failed operation is stored.
    #[error("store error ({kind}): {message}")]
    Store {
        /// What kind of failure, to decide what to do about it.
        kind: StoreErrorKind,
        /// What failed, in a sentence (the backend's own words are in `source`).
        message: String,
        /// The backend's error.
        #[source]
        source: Option<BoxError>,
    },

    /// What was asked for lies below the archive horizon: it was exported to an archive
    /// file and pruned from the store (see `eventfold::archive`); restoring the archive
    /// brings it back. Nothing is missing silently.
    #[error("{what} is archived in archive {archive} (`{path}`); restore it to read it")]
    Archived {
        /// The archive's id, from its manifest.
        archive: Uuid,
        /// Where the archive file was written.
        path: String,
        /// What was asked for (a stream from a version, a position, an event id).
        what: String,
    },

    /// An archive file cannot be read or is damaged: its compression, its lines, or its
    /// content checksum do not hold. Nothing in the store was changed.
    #[error("archive `{path}` is damaged or unreadable: {reason}")]
    ArchiveDamaged {
        /// The archive file.
        path: String,
        /// What is wrong, in a sentence.
        reason: String,
        /// The underlying error (I/O, decompression, JSON), if any.
        #[source]
        source: Option<BoxError>,
    },

    /// An archive file cannot be created, written or opened (it exists already, for an
    /// export, which never overwrites a file; a directory is missing; the disk is full).
    #[error("archive file `{path}`: {reason}")]
    ArchiveFile {
        /// The archive file.
        path: String,
        /// What failed, in a sentence.
        reason: String,
        /// The I/O error, if any.
        #[source]
        source: Option<std::io::Error>,
    },

    /// An intact archive file does not match the store: an event in it is stored
    /// differently or is missing, or (after a prune) the store's record of what was pruned
    /// is not this archive. Nothing was changed.
    #[error("archive `{path}` does not match the store: {reason}")]
    ArchiveMismatch {
        /// The archive file.
        path: String,
        /// The first difference found.
        reason: String,
    },

    /// A prune was refused, because it would remove an event that subscription
    /// `subscription` has not handled yet (its checkpoint is below the archive's last
    /// position). Nothing was removed.
    #[error(
        "prune refused: subscription `{subscription}` is at position {checkpoint}, below \
         position {needed} of the archive"
    )]
    PruneBehindSubscription {
        /// The first such subscription, by name.
        subscription: String,
        /// Its checkpoint.
        checkpoint: u64,
        /// The last position the prune would remove.
        needed: u64,
    },

    /// A prune was refused, because stream `aggregate_type`/`aggregate_id` could no longer
    /// be loaded: the prune would remove events of it up to or past its latest snapshot's
    /// version (a load replays from the snapshot's own version on), or it has no snapshot,
    /// while later events of it stay. Nothing was removed.
    #[error(
        "prune refused: stream {aggregate_type}/{aggregate_id} would lose versions up to \
         {pruned} while its latest snapshot is at {}; it could not be loaded",
        .snapshot.map_or_else(|| "none".to_owned(), |v| format!("version {v}"))
    )]
    PruneBreaksStream {
        /// The stream's aggregate type.
        aggregate_type: String,
        /// The stream's aggregate id.
        aggregate_id: String,
        /// The last version the prune would remove.
        pruned: u64,
        /// The version of its latest snapshot.
        snapshot: Option<u64>,
    },

    /// A subscription's segment count is 0 or above
    /// [`MAX_SEGMENTS`](crate::lease::MAX_SEGMENTS); nothing was changed.
    #[error("invalid segment count {segments}: it must be 1 to {max}", max = crate::lease::MAX_SEGMENTS)]
    InvalidSegments {
        /// The count asked for.
        segments: u32,
    },

    /// A claim asked for another segment count than the subscription has stored; reset it
    /// ([`LeaseStore::reset_segments`](crate::lease::LeaseStore::reset_segments)) to change
    /// the count. Nothing was claimed.
    #[error(
        "subscription `{subscription}` has {stored} segments stored, a claim asked for {requested}"
    )]
    SegmentCountMismatch {
        /// The subscription.
        subscription: String,
        /// The count stored.
        stored: u32,
        /// The count the claim asked for.
        requested: u32,
    },

    /// A segment lease is no longer held with its epoch (another member took the segment
    /// over, or it was released or reset): its checkpoint was not saved.
    #[error("lease on segment {segment} of `{subscription}` with epoch {epoch} is lost")]
    LeaseLost {
        /// The subscription.
        subscription: String,
        /// The segment's number.
        segment: u32,
        /// The epoch of the lost lease.
        epoch: u64,
    },

    /// A lease or membership time is zero or above
    /// [`MAX_LEASE_TTL`](crate::lease::MAX_LEASE_TTL); nothing was changed.
    #[error("invalid lease time {ttl:?}: it must be above zero and at most a day")]
    InvalidLeaseTtl {
        /// The time asked for.
        ttl: std::time::Duration,
    },

    /// This store does not implement the operation (for example archiving on a backend
    /// that has no archive horizon yet).
    #[error("{operation} is not supported by {store}")]
    Unsupported {
        /// What was asked for.
        operation: String,
        /// The store that cannot do it.
        store: String,
    },
}

/// An error and its sources, one after another (`outer: inner: innermost`), as dead
/// letters and failure records keep it, and as a backend writes a failure whose source it
/// cannot keep.
///
/// ```
/// use eventfold_core::{Error, StoreErrorKind, error_chain};
///
/// let io = std::io::Error::other("disk full");
/// let error = Error::store(StoreErrorKind::Io, "writing", io);
/// assert_eq!(error_chain(&error), "store error (I/O error): writing: disk full");
/// ```
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn at(event_id: &Option<Uuid>, position: &Option<u64>) -> String {
    match (event_id, position) {
        (Some(id), Some(p)) => format!(" (event {id} at position {p})"),
        (Some(id), None) => format!(" (event {id})"),
        (None, Some(p)) => format!(" (at position {p})"),
        (None, None) => String::new(),
    }
}

impl Error {
    /// A backend error of a kind, with a message and its source.
    pub fn store(
        kind: StoreErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Store {
            kind,
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The kind of a [`Error::Store`] or [`Error::Open`] failure
    /// ([`StoreErrorKind::Corrupt`] for an [`Error::CorruptEvent`]).
    pub fn store_kind(&self) -> Option<StoreErrorKind> {
        match self {
            Error::Store { kind, .. } | Error::Open { kind, .. } => Some(*kind),
            Error::CorruptEvent { .. } => Some(StoreErrorKind::Corrupt),
            _ => None,
        }
    }

    /// Attaches the stored event's id and position to a decoding error; other errors pass
    /// through unchanged. For store backends.
    #[doc(hidden)]
    pub fn at_event(self, id: Uuid, pos: u64) -> Self {
        self.locate(Some(id), pos)
    }

    /// Attaches the stored event's position to a decoding error, keeping an id it has. For
    /// store backends.
    #[doc(hidden)]
    pub fn at_position(self, pos: u64) -> Self {
        self.locate(None, pos)
    }

    /// The stored event the error names, as (its id when known, its position), if it names
    /// one: the variants [`locate`](Self::locate) fills.
    pub(crate) fn stored_event(&self) -> Option<(Option<Uuid>, u64)> {
        match self {
            Error::CorruptEvent {
                event_id, position, ..
            }
            | Error::UnknownEventType {
                event_id, position, ..
            }
            | Error::WrongEventType {
                event_id, position, ..
            }
            | Error::Payload {
                event_id, position, ..
            }
            | Error::SchemaTooNew {
                event_id, position, ..
            }
            | Error::Upcast {
                event_id, position, ..
            } => position.map(|p| (*event_id, p)),
            _ => None,
        }
    }

    fn locate(mut self, id: Option<Uuid>, pos: u64) -> Self {
        match &mut self {
            Error::UnknownEventType {
                event_id, position, ..
            }
            | Error::WrongEventType {
                event_id, position, ..
            }
            | Error::Payload {
                event_id, position, ..
            }
            | Error::SchemaTooNew {
                event_id, position, ..
            }
            | Error::Upcast {
                event_id, position, ..
            }
            | Error::CorruptEvent {
                event_id, position, ..
            } => {
                if id.is_some() {
                    *event_id = id;
                }
                *position = Some(pos);
            }
            _ => {}
        }
        self
    }

    /// True for a version conflict, the error [`Repository::execute`](crate::Repository::execute)
    /// retries on.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::VersionConflict { .. })
    }
}

/// What kind of backend failure an [`Error::Store`] is, the same for every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreErrorKind {
    /// No room left: the disk or the database's size limit is full. Retry once room is made.
    Full,
    /// The database is read-only (file permissions, a read-only mount or open mode);
    /// reads still work.
    ReadOnly,
    /// Another connection or process held a lock past the busy timeout. Retry later.
    Busy,
    /// The file is not a database of this store, or is damaged.
    Corrupt,
    /// The database was written by a newer version of this library (its schema is newer).
    SchemaTooNew,
    /// The database cannot be opened at all (missing directory, no permission).
    CannotOpen,
    /// The store was closed or its worker stopped.
    Closed,
    /// The disk or file system failed to read or write (`EIO`, a vanished file), or the
    /// connection to a database server was lost. The store checks itself (or reconnects)
    /// before it takes the next write.
    Io,
    /// A commit failed in a way that leaves unknown whether it was stored (the connection
    /// broke, or the file system failed, during `COMMIT`). Re-append the same events with
    /// the same event ids: the append is idempotent, so it is stored exactly once.
    OutcomeUnknown,
    /// The operation ran past a time limit the store was given (a server's statement
    /// timeout, say) and was cancelled; nothing of it is stored. Retry, or raise the limit.
    Timeout,
    /// Any other I/O or backend failure.
    Other,
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Full => "storage full",
            StoreErrorKind::ReadOnly => "read-only",
            StoreErrorKind::Busy => "busy",
            StoreErrorKind::Corrupt => "corrupt or not a database",
            StoreErrorKind::SchemaTooNew => "schema too new",
            StoreErrorKind::CannotOpen => "cannot open",
            StoreErrorKind::Closed => "closed",
            StoreErrorKind::Io => "I/O error",
            StoreErrorKind::OutcomeUnknown => "outcome unknown",
            StoreErrorKind::Timeout => "timed out",
            StoreErrorKind::Other => "backend failure",
        })
    }
}
