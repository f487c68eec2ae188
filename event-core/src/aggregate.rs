//! Aggregates, and the [`Repository`] that rebuilds them from their events and appends the
//! events their commands decide.

mod cache;

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::event::DomainEvent;
use crate::record::{ExpectedVersion, Metadata, NewEvent, ReplayedEvent, Snapshot, StreamId};
use crate::registry::registry;
use crate::store::{EventStore, IntoStore, ReplayVisitor};

pub use cache::CacheStatistics;
use cache::StateCache;

/// A consistency boundary whose state is the fold of its events.
///
/// `apply` folds one event into the state and must not fail: the event has happened.
/// `handle` decides which events a command causes, or refuses it with a domain error.
pub trait Aggregate: Default + Send + Sync + 'static {
    /// The aggregate type name; streams are keyed by it and an id.
    ///
    /// It is the events' aggregate type (`#[domain_event(aggregate = "..")]`), so the
    /// repository and the bus name a stream alike; leave it out. An override that differs
    /// from the events' fails to compile where a [`Repository`] of the aggregate is built
    /// or an [`AggregateTest`](crate::testing::AggregateTest) of it runs a command.
    const TYPE: &'static str = <Self::Event as DomainEvent>::AGGREGATE_TYPE;

    /// The snapshot schema version. Raise it when the state's shape changes: snapshots of
    /// another version are ignored and the aggregate is rebuilt by full replay.
    const SNAPSHOT_VERSION: u32 = 1;

    /// The events of this aggregate.
    type Event: DomainEvent;
    /// The commands it handles.
    type Command: Send;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state.
    fn apply(&mut self, event: &Self::Event);

    /// Decides the events a command causes, from the current state.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// An aggregate's asynchronous decision of commands of type `C`, which ask services before
/// they decide (a price feed, a uniqueness check): the counterpart of
/// [`Aggregate::handle`], run by [`Repository::decide`].
///
/// The decision borrows the command, so `C` need not be `Clone`: on a version conflict the
/// repository reloads the aggregate and calls `decide` again with the same command, and
/// the services are asked again about the state as it now is. An aggregate may implement
/// `Decide` for several command types, each with its own services; its pure commands stay
/// in [`Aggregate::handle`], whose path this adds nothing to.
///
/// ```
/// use eventfold_core::{Aggregate, Decide, DecisionError, InMemoryEventStore, Repository};
/// # use eventfold_macros::DomainEvent;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// # #[domain_event(aggregate = "Signup", crate = "eventfold_core")]
/// # enum SignupEvent { Registered { email: String } }
/// # #[derive(Debug, thiserror::Error)]
/// # #[error("already registered")]
/// # struct AlreadyRegistered;
/// # #[derive(Default)]
/// # struct Signup { registered: bool }
/// # impl Aggregate for Signup {
/// #     type Event = SignupEvent;
/// #     type Command = std::convert::Infallible;
/// #     type Error = AlreadyRegistered;
/// #     fn apply(&mut self, _: &SignupEvent) { self.registered = true; }
/// #     fn handle(&self, never: Self::Command) -> Result<Vec<SignupEvent>, AlreadyRegistered> {
/// #         match never {}
/// #     }
/// # }
///
/// /// Tells whether an email address is taken, by asking a directory.
/// struct Directory { taken: Vec<String> }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("the directory did not answer")]
/// struct DirectoryDown;
///
/// impl Directory {
///     async fn is_taken(&self, email: &str) -> Result<bool, DirectoryDown> {
///         Ok(self.taken.iter().any(|t| t == email))
///     }
/// }
///
/// struct Register { email: String }              // not Clone
///
/// impl Decide<Register> for Signup {
///     type Services = Directory;
///     type ServiceError = DirectoryDown;
///
///     async fn decide(
///         &self,
///         command: &Register,
///         directory: &Directory,
///     ) -> Result<Vec<SignupEvent>, DecisionError<AlreadyRegistered, DirectoryDown>> {
///         let taken = directory.is_taken(&command.email).await.map_err(DecisionError::Service)?;
///         if self.registered || taken {
///             return Err(DecisionError::Rejected(AlreadyRegistered));
///         }
///         Ok(vec![SignupEvent::Registered { email: command.email.clone() }])
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let directory = Directory { taken: vec!["bob@example.com".into()] };
/// let repo = Repository::<Signup>::new(InMemoryEventStore::new());
/// let register = |email: &str| Register { email: email.into() };
/// repo.decide("s-1", register("ada@example.com"), &directory).await?;
/// let refused = repo.decide("s-2", register("bob@example.com"), &directory).await;
/// assert!(refused.unwrap_err().rejection().is_some());
/// # Ok(())
/// # }
/// ```
pub trait Decide<C>: Aggregate {
    /// What the decision asks: a client, a read model, a `dyn` trait of your own.
    type Services: ?Sized + Sync;
    /// Why a service could not answer. It is not a refusal: the repository returns it as
    /// [`CommandError::Service`] at once, without retrying.
    type ServiceError: std::error::Error + Send + Sync + 'static;

    /// Decides the events `command` causes, from the current state and what the services
    /// answer; never mutates. Write it as an `async fn`; the future must be `Send`.
    #[allow(clippy::type_complexity)] // spelled out, as an `async fn` implementing it writes it
    fn decide(
        &self,
        command: &C,
        services: &Self::Services,
    ) -> impl Future<
        Output = Result<Vec<Self::Event>, DecisionError<Self::Error, Self::ServiceError>>,
    > + Send;
}

/// Why a [`Decide::decide`] caused no events: the aggregate refused the command, or a
/// service it asked failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError<E, S> {
    /// The aggregate refused the command (a domain error).
    #[error(transparent)]
    Rejected(E),
    /// A service the decision asked failed.
    #[error(transparent)]
    Service(S),
}

/// Whether `A::TYPE` is its events' aggregate type; evaluated at compile time wherever a
/// repository of `A` is built or a test of `A` runs a command, so that the two cannot drift
/// apart.
pub(crate) const fn aggregate_type_agrees<A: Aggregate>() -> bool {
    crate::event::group::str_eq(A::TYPE, <A::Event as DomainEvent>::AGGREGATE_TYPE)
}

/// The message of a failed [`aggregate_type_agrees`].
macro_rules! aggregate_type_differs {
    () => {
        "`Aggregate::TYPE` differs from the `aggregate` of its events \
         (`DomainEvent::AGGREGATE_TYPE`); remove the `const TYPE` line, whose default is \
         the events' aggregate type, or make the two agree"
    };
}
pub(crate) use aggregate_type_differs;

/// Why a command stored nothing: the aggregate refused it, loading or storing failed, or
/// (for [`Repository::decide`]) a service it asked failed; `S` is the service's error,
/// [`Infallible`] for [`Repository::execute`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError<E, S = Infallible> {
    /// The aggregate refused the command; nothing was stored. It reads as the domain error
    /// itself (a pure wrapper: the variant says it is a refusal).
    #[error(transparent)]
    Rejected(E),
    /// Loading or storing failed, or conflicts outlasted the retries
    /// ([`Error::VersionConflict`] then carries the expected and actual versions).
    #[error(transparent)]
    Store(#[from] Error),
    /// A service the decision asked failed ([`Decide::ServiceError`]); nothing was stored.
    #[error(transparent)]
    Service(S),
}

impl<E, S> CommandError<E, S> {
    /// The domain error, if the aggregate refused the command.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            CommandError::Rejected(e) => Some(e),
            CommandError::Store(_) | CommandError::Service(_) => None,
        }
    }

    /// The service's error, if a service the decision asked failed.
    pub fn service_error(&self) -> Option<&S> {
        match self {
            CommandError::Service(e) => Some(e),
            CommandError::Rejected(_) | CommandError::Store(_) => None,
        }
    }
}

impl<E, S> From<DecisionError<E, S>> for CommandError<E, S> {
    fn from(error: DecisionError<E, S>) -> Self {
        match error {
            DecisionError::Rejected(e) => CommandError::Rejected(e),
            DecisionError::Service(e) => CommandError::Service(e),
        }
    }
}

/// One attempt's decision, made again after every reload: [`Aggregate::handle`] on a clone
/// of the command, or [`Decide::decide`] with the services. Monomorphised per path, so the
/// pure path's future is `ready` and nothing is boxed.
trait Decider<A: Aggregate> {
    type ServiceError;
    #[allow(clippy::type_complexity)] // the same type as `Decide::decide`'s
    fn decide(
        &self,
        state: &A,
    ) -> impl Future<Output = Result<Vec<A::Event>, DecisionError<A::Error, Self::ServiceError>>> + Send;
}

/// The pure path: `handle` takes the command by value, so each attempt takes a clone.
struct Handle<C>(C);

impl<A: Aggregate> Decider<A> for Handle<A::Command>
where
    A::Command: Clone,
{
    type ServiceError = Infallible;
    fn decide(
        &self,
        state: &A,
    ) -> impl Future<Output = Result<Vec<A::Event>, DecisionError<A::Error, Infallible>>> + Send
    {
        std::future::ready(
            state
                .handle(self.0.clone())
                .map_err(DecisionError::Rejected),
        )
    }
}

/// The asking path: the command is borrowed by each attempt, the services too.
struct Ask<'s, C, S: ?Sized> {
    command: C,
    services: &'s S,
}

impl<A, C> Decider<A> for Ask<'_, C, A::Services>
where
    A: Decide<C>,
{
    type ServiceError = A::ServiceError;
    fn decide(
        &self,
        state: &A,
    ) -> impl Future<Output = Result<Vec<A::Event>, DecisionError<A::Error, A::ServiceError>>> + Send
    {
        state.decide(&self.command, self.services)
    }
}

/// What a command stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed<E> {
    /// The events the command caused, in order (empty if it caused none).
    pub events: Vec<E>,
    /// The aggregate's version after the command.
    pub version: u64,
    /// The global positions of the events (`None` when the command caused none).
    pub positions: Option<std::ops::RangeInclusive<u64>>,
}

type EncodeFn<A> = fn(&A) -> serde_json::Result<String>;
type DecodeFn<A> = fn(&str) -> serde_json::Result<A>;

struct SnapshotPolicy<A> {
    every: u64,
    encode: EncodeFn<A>,
    decode: DecodeFn<A>,
}

impl<A> Clone for SnapshotPolicy<A> {
    fn clone(&self) -> Self {
        SnapshotPolicy {
            every: self.every,
            encode: self.encode,
            decode: self.decode,
        }
    }
}

/// Loads aggregates of type `A` by replaying their events, and runs commands on them with
/// optimistic concurrency.
pub struct Repository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    max_retries: u32,
    snapshots: Option<SnapshotPolicy<A>>,
    cache: Option<Arc<StateCache<A>>>,
    metrics: crate::metrics::RepositoryMetrics,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Repository {
            store: Arc::clone(&self.store),
            max_retries: self.max_retries,
            snapshots: self.snapshots.clone(),
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
            _aggregate: PhantomData,
        }
    }
}

impl<A: Aggregate> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &A::TYPE)
            .field("max_retries", &self.max_retries)
            .field("snapshot_every", &self.snapshots.as_ref().map(|s| s.every))
            .field("cache", &self.cache_statistics())
            .finish()
    }
}

/// Folds replayed events into an aggregate, wherever the store runs the replay.
struct Fold<A> {
    state: A,
    version: u64,
    /// When starting from a snapshot: its version, the event the replay starts with. That
    /// event is already in the state; finding it proves the snapshot fits the stream.
    anchor: Option<u64>,
    /// The replay did not start at the snapshot's version: the rest is skipped, and the
    /// aggregate is rebuilt by full replay.
    misfit: bool,
    registrations: Vec<&'static crate::registry::EventRegistration>,
}

impl<A: Aggregate> Fold<A> {
    fn new(state: A, version: u64, anchor: Option<u64>) -> Self {
        Fold {
            state,
            version,
            anchor,
            misfit: false,
            registrations: Vec::new(),
        }
    }

    /// True when the replay found the snapshot's own event first (or was a full replay).
    fn fits(&self) -> bool {
        self.anchor.is_none() && !self.misfit
    }
}

impl<A: Aggregate> Fold<A> {
    /// Whether the event at `version` is to be folded in: not when the replay is skipping
    /// (a misfit snapshot) or at the snapshot's own event, which the state holds already.
    #[inline]
    fn admits(&mut self, version: u64) -> Result<bool> {
        // The common case, once per event of a replay: the next version of a full replay.
        if !self.misfit && self.anchor.is_none() && self.version.checked_add(1) == Some(version) {
            return Ok(true);
        }
        self.admits_other(version)
    }

    /// [`admits`](Self::admits) past its common case.
    #[cold]
    fn admits_other(&mut self, version: u64) -> Result<bool> {
        if self.misfit {
            return Ok(false);
        }
        if let Some(anchor) = self.anchor.take() {
            self.misfit = version != anchor;
            return Ok(false);
        }
        // Versions run 1, 2, 3 ... without gaps; a stream that does not is damaged, and
        // folding it would give a state at a version the store does not have.
        if self.version.checked_add(1) != Some(version) {
            return Err(Error::CorruptEvent {
                event_id: None,
                position: None,
                reason: format!(
                    "the stream's version {version} follows version {}",
                    self.version
                ),
            });
        }
        Ok(true)
    }
}

impl<A: Aggregate> ReplayVisitor for Fold<A> {
    fn visit(&mut self, event: ReplayedEvent<'_>) -> Result<()> {
        if !self.admits(event.version)? {
            return Ok(());
        }
        let decoded: A::Event = registry().decode_cached(
            &mut self.registrations,
            event.event_type,
            event.schema_version,
            event.payload,
        )?;
        self.state.apply(&decoded);
        self.version = event.version;
        Ok(())
    }

    fn visit_decoded(
        &mut self,
        event: ReplayedEvent<'_>,
        decoded: &dyn std::any::Any,
    ) -> Result<()> {
        // The registered type is the aggregate's event type (not, say, a member of its
        // group): fold it as it is, the very value a decode of the payload gives.
        let Some(decoded) = decoded.downcast_ref::<A::Event>() else {
            return self.visit(event);
        };
        if self.admits(event.version)? {
            self.state.apply(decoded);
            self.version = event.version;
        }
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A loaded aggregate with the version it was rebuilt at.
type Loaded<A> = (A, u64);

impl<A: Aggregate> Repository<A> {
    /// How many times [`execute`](Self::execute) reloads and retries after a version
    /// conflict, unless changed with [`max_retries`](Self::max_retries).
    pub const DEFAULT_MAX_RETRIES: u32 = 3;

    /// A repository over `store`: a store handle (`SqliteEventStore`,
    /// [`InMemoryEventStore`](crate::InMemoryEventStore)), an `Arc` of one, or an
    /// `Arc<dyn EventStore>` (see [`IntoStore`]).
    pub fn new(store: impl IntoStore) -> Self {
        const { assert!(aggregate_type_agrees::<A>(), aggregate_type_differs!()) };
        Repository {
            store: store.into_store(),
            max_retries: Self::DEFAULT_MAX_RETRIES,
            snapshots: None,
            cache: None,
            metrics: crate::metrics::RepositoryMetrics::new(A::TYPE),
            _aggregate: PhantomData,
        }
    }

    /// Sets how many times a conflicting command is reloaded and retried (0: never).
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = retries;
        self
    }

    /// Takes a snapshot whenever a command carries the aggregate across a multiple of
    /// `every` events, so loads replay at most about `every` events. `0` turns snapshots off.
    pub fn snapshot_every(mut self, every: u64) -> Self
    where
        A: Serialize + DeserializeOwned,
    {
        self.snapshots = (every > 0).then_some(SnapshotPolicy {
            every,
            encode: |a| crate::finite::to_json(a),
            decode: |s| serde_json::from_str(s),
        });
        self
    }

    /// Keeps the states of up to `capacity` recently used aggregates in memory, with their
    /// versions, so that [`execute`](Self::execute) on a hot aggregate skips its replay.
    /// Clones of this repository share the cache; `0` turns it off (the default).
    ///
    /// The cache never lets a command act on an out-of-date state:
    /// - the append expects the cached version, so if another writer (another process, or
    ///   a repository without this cache) appended in between, the store refuses it and
    ///   the command re-runs on a fresh load, without using up a conflict retry;
    /// - a refusal or a no-op decided on a cached state is returned only once the stream's
    ///   version confirms the state is current; otherwise the command re-runs on a fresh
    ///   load.
    ///
    /// [`load`](Self::load) always reads the store. Memory grows with `capacity` times the
    /// size of a state; eviction is least-recently-used, approximated by CLOCK.
    pub fn cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| Arc::new(StateCache::new(capacity)));
        self
    }

    /// How the state cache is doing, if [`cache`](Self::cache) turned it on.
    pub fn cache_statistics(&self) -> Option<CacheStatistics> {
        self.cache.as_ref().map(|c| c.statistics())
    }

    /// The store this repository uses.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    fn stream(id: &str) -> StreamId {
        StreamId::new(A::TYPE, id)
    }

    /// Rebuilds the aggregate `id`: from its latest readable snapshot if there is one, then
    /// by replaying the events after it. Returns the state and its version (0: no events).
    ///
    /// A snapshot is used only if it fits the stream: the replay starts at the snapshot's
    /// own version and must find that event. A snapshot at version 0, of another schema
    /// version, or whose state does not decode is ignored (full replay) until the next
    /// snapshot the repository takes replaces it. One ahead of its stream is replaced at
    /// once by a snapshot of the replayed state (the store takes it, see
    /// [`SnapshotStore::save_snapshot`](crate::SnapshotStore::save_snapshot)), or it would seem to fit once the stream caught up.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>> {
        let started = std::time::Instant::now();
        let loaded = self
            .load_traced(id)
            .instrument(tracing::debug_span!(
                "eventfold.load",
                aggregate_type = A::TYPE,
                id
            ))
            .await;
        self.metrics.load_seconds.record(started.elapsed());
        loaded
    }

    async fn load_traced(&self, id: &str) -> Result<Loaded<A>> {
        let stream = Self::stream(id);
        let Some((state, version)) = self.load_snapshot(&stream).await else {
            return self.replay_in_full(&stream).await;
        };
        let fold = self
            .replay(&stream, Fold::new(state, version, Some(version)))
            .await?;
        if fold.fits() {
            return Ok((fold.state, fold.version));
        }
        tracing::warn!(
            %stream,
            snapshot_version = version,
            "snapshot does not fit its stream; replaying in full and replacing it"
        );
        let (state, version) = self.replay_in_full(&stream).await?;
        self.save_snapshot(&stream, &state, version).await;
        Ok((state, version))
    }

    async fn replay_in_full(&self, stream: &StreamId) -> Result<Loaded<A>> {
        let fold = self
            .replay(stream, Fold::new(A::default(), 0, None))
            .await?;
        Ok((fold.state, fold.version))
    }

    /// Hands the stream from the fold's start on to the store and takes the fold back.
    async fn replay(&self, stream: &StreamId, fold: Fold<A>) -> Result<Fold<A>> {
        // From the snapshot's own event (see `Fold::anchor`), or from the first.
        let from = fold.anchor.unwrap_or(1);
        let before = fold.version;
        let visitor = self
            .store
            .replay_stream(stream, from, Box::new(fold))
            .await?;
        visitor
            .into_any()
            .downcast::<Fold<A>>()
            .map(|fold| {
                self.metrics
                    .replayed
                    .increment(fold.version.saturating_sub(before));
                *fold
            })
            .map_err(|_| Error::Store {
                kind: crate::error::StoreErrorKind::Other,
                message: "the store's replay handed back another visitor than it was given"
                    .to_owned(),
                source: None,
            })
    }

    /// The snapshot's state and version, if there is one that can be used. A snapshot that
    /// cannot be read (store error, other schema version, version 0, state that does not
    /// decode) only costs a full replay, so it is reported to `tracing` and skipped, never
    /// fatal.
    async fn load_snapshot(&self, stream: &StreamId) -> Option<Loaded<A>> {
        let policy = self.snapshots.as_ref()?;
        let snapshot = match self.store.load_snapshot(stream).await {
            Ok(snapshot) => snapshot?,
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot unreadable; replaying in full");
                return None;
            }
        };
        if snapshot.schema_version != A::SNAPSHOT_VERSION {
            tracing::info!(
                %stream,
                stored = snapshot.schema_version,
                current = A::SNAPSHOT_VERSION,
                "snapshot of another schema version; replaying in full"
            );
            return None;
        }
        if snapshot.version == 0 {
            // Version 0 is the empty stream, which no snapshot is taken of.
            tracing::warn!(%stream, "snapshot at version 0; replaying in full");
            return None;
        }
        match (policy.decode)(&snapshot.state) {
            Ok(state) => Some((state, snapshot.version)),
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot does not decode; replaying in full");
                None
            }
        }
    }

    /// Runs `command` on the aggregate `id`: load, handle, append the events expecting the
    /// loaded version. On a version conflict it reloads and retries up to
    /// [`max_retries`](Self::max_retries) times, then returns the conflict.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.execute_with(id, command, Metadata::default()).await
    }

    /// [`execute`](Self::execute) with metadata stored on every event the command causes.
    pub async fn execute_with(
        &self,
        id: &str,
        command: A::Command,
        metadata: Metadata,
    ) -> Result<Committed<A::Event>, CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        self.run(id, Handle(command), metadata).await
    }

    /// Runs a command that asks `services` before it decides (see [`Decide`]): load,
    /// decide, append expecting the loaded version. On a version conflict it reloads and
    /// decides again (asking the services again) up to [`max_retries`](Self::max_retries)
    /// times. A service's failure is [`CommandError::Service`], returned at once. The
    /// command is borrowed by every attempt, so it need not be `Clone`.
    pub async fn decide<C>(
        &self,
        id: &str,
        command: C,
        services: &A::Services,
    ) -> Result<Committed<A::Event>, CommandError<A::Error, A::ServiceError>>
    where
        A: Decide<C>,
        C: Send,
    {
        self.decide_with(id, command, services, Metadata::default())
            .await
    }

    /// [`decide`](Self::decide) with metadata stored on every event the command causes.
    pub async fn decide_with<C>(
        &self,
        id: &str,
        command: C,
        services: &A::Services,
        metadata: Metadata,
    ) -> Result<Committed<A::Event>, CommandError<A::Error, A::ServiceError>>
    where
        A: Decide<C>,
        C: Send,
    {
        self.run(id, Ask { command, services }, metadata).await
    }

    /// Load, decide, append, and on a conflict reload and decide again: the one loop of
    /// both [`execute_with`](Self::execute_with) and [`decide_with`](Self::decide_with).
    async fn run<D: Decider<A> + Send>(
        &self,
        id: &str,
        decider: D,
        metadata: Metadata,
    ) -> Result<Committed<A::Event>, CommandError<A::Error, D::ServiceError>> {
        use crate::metrics::CommandOutcome;
        let started = std::time::Instant::now();
        let result = self
            .run_traced(id, decider, metadata)
            .instrument(tracing::debug_span!(
                "eventfold.execute",
                aggregate_type = A::TYPE,
                id
            ))
            .await;
        let outcome = match &result {
            Ok(Committed {
                positions: Some(_), ..
            }) => CommandOutcome::Committed,
            Ok(_) => CommandOutcome::Unchanged,
            Err(CommandError::Rejected(_)) => CommandOutcome::Rejected,
            Err(CommandError::Store(e)) if e.is_conflict() => CommandOutcome::Conflict,
            Err(_) => CommandOutcome::Failed,
        };
        self.metrics.command(outcome, started.elapsed());
        result
    }

    async fn run_traced<D: Decider<A> + Send>(
        &self,
        id: &str,
        decider: D,
        metadata: Metadata,
    ) -> Result<Committed<A::Event>, CommandError<A::Error, D::ServiceError>> {
        let stream = Self::stream(id);
        let mut retries_left = self.max_retries;
        // Cleared once the cache has been found out of date for this command: from then on
        // only fresh loads decide it.
        let mut trust_cache = true;
        loop {
            let cached = match (&self.cache, trust_cache) {
                (Some(cache), true) => cache.take(id),
                _ => None,
            };
            let from_cache = cached.is_some();
            let (mut aggregate, version) = match cached {
                Some(entry) => entry,
                None => self.load(id).await?,
            };
            let decided = decider.decide(&aggregate).await;
            let events = match decided {
                Ok(events) if !events.is_empty() => events,
                // Not a decision about the state: returned as it is, the state kept.
                Err(DecisionError::Service(error)) => {
                    self.keep(id, aggregate, version);
                    return Err(CommandError::Service(error));
                }
                // A refusal or a no-op stands only if the state it was decided on is current.
                outcome => {
                    if from_cache && self.store.stream_version(&stream).await? != version {
                        self.note_stale();
                        trust_cache = false;
                        continue;
                    }
                    self.keep(id, aggregate, version);
                    return match outcome {
                        Ok(events) => Ok(Committed {
                            events,
                            version,
                            positions: None,
                        }),
                        Err(rejection) => Err(CommandError::from(rejection)),
                    };
                }
            };
            let new_events = events
                .iter()
                .map(|e| NewEvent::from_event(e, metadata.clone()))
                .collect::<Result<Vec<_>>>()?;
            let expected = ExpectedVersion::Exact(version);
            match self.store.append(&stream, expected, new_events).await {
                Ok(outcome) => {
                    if self.cache.is_some() || self.snapshot_due(version, outcome.version) {
                        for event in &events {
                            aggregate.apply(event);
                        }
                        self.maybe_snapshot(&stream, &aggregate, version, outcome.version)
                            .await;
                        self.keep(id, aggregate, outcome.version);
                    }
                    return Ok(Committed {
                        events,
                        version: outcome.version,
                        positions: Some(outcome.first_position..=outcome.last_position),
                    });
                }
                Err(e) if e.is_conflict() && from_cache => {
                    // The cached state was overtaken; that is not a conflict of this
                    // command's, so it costs no retry.
                    self.note_stale();
                    trust_cache = false;
                    tracing::debug!(%stream, "cached state out of date; reloading");
                }
                Err(e) if e.is_conflict() && retries_left > 0 => {
                    retries_left -= 1;
                    self.metrics.retries.increment(1);
                    trust_cache = false;
                    tracing::debug!(%stream, retries_left, "version conflict; reloading");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Puts a state known to be current at `version` into the cache, if there is one.
    fn keep(&self, id: &str, state: A, version: u64) {
        if let Some(cache) = &self.cache {
            cache.put(id, state, version);
        }
    }

    fn note_stale(&self) {
        if let Some(cache) = &self.cache {
            cache.stale();
        }
    }

    /// Whether a command that took the aggregate from `before` to `after` crosses a
    /// multiple of the snapshot interval.
    fn snapshot_due(&self, before: u64, after: u64) -> bool {
        self.snapshots
            .as_ref()
            .is_some_and(|policy| before / policy.every != after / policy.every)
    }

    /// Saves a snapshot of `aggregate` (the state after the command) if this command
    /// crossed a multiple of the snapshot interval. A failed snapshot write is only
    /// logged: the events are stored, and the next load replays a little more.
    async fn maybe_snapshot(&self, stream: &StreamId, aggregate: &A, before: u64, after: u64) {
        if self.snapshot_due(before, after) {
            self.save_snapshot(stream, aggregate, after).await;
        }
    }

    /// Saves a snapshot of `aggregate` at `version`; a failure is only logged.
    async fn save_snapshot(&self, stream: &StreamId, aggregate: &A, version: u64) {
        let Some(policy) = &self.snapshots else {
            return;
        };
        let state = match (policy.encode)(aggregate) {
            Ok(state) => state,
            Err(source) => {
                let error = Error::Snapshot {
                    aggregate_type: A::TYPE.to_owned(),
                    source,
                };
                tracing::warn!(%stream, %error, "snapshot not taken");
                return;
            }
        };
        let snapshot = Snapshot {
            aggregate_type: stream.aggregate_type.clone(),
            aggregate_id: stream.aggregate_id.clone(),
            version,
            schema_version: A::SNAPSHOT_VERSION,
            state,
            taken_at: Utc::now(),
        };
        if let Err(error) = self.store.save_snapshot(snapshot).await {
            tracing::warn!(%stream, %error, "snapshot not saved");
        }
    }
}
