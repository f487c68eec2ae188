//! # eventfold
//!
//! Event sourcing for Rust. Domain events are plain enums or structs with
//! `#[derive(DomainEvent)]`; the derive names and versions each event type and registers it,
//! so a store can turn a stored row back into the right Rust type by its name. Aggregates fold
//! their events into state and decide new events from commands; a [`Repository`] rebuilds
//! them by replay (from a snapshot when there is one) and appends with optimistic
//! concurrency.
//!
//! ```
//! use eventfold::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! #[domain_event(aggregate = "Account")]
//! enum AccountEvent {
//!     Opened { owner: String },
//!     #[domain_event(name = "FundsDeposited", version = 2)]
//!     Deposited { amount: u64 },
//!     Withdrawn { amount: u64 },
//! }
//!
//! #[derive(Debug, Default)]
//! struct Account { owner: Option<String>, balance: u64 }
//!
//! #[derive(Debug, Clone)]
//! enum AccountCommand { Open { owner: String }, Deposit(u64), Withdraw(u64) }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! enum AccountError {
//!     #[error("the account is already open")]
//!     AlreadyOpen,
//!     #[error("the account is not open")]
//!     NotOpen,
//!     #[error("insufficient funds: balance {balance}, asked {asked}")]
//!     InsufficientFunds { balance: u64, asked: u64 },
//! }
//!
//! impl Aggregate for Account {
//!     type Event = AccountEvent;
//!     type Command = AccountCommand;
//!     type Error = AccountError;
//!
//!     fn apply(&mut self, event: &AccountEvent) {
//!         match event {
//!             AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
//!             AccountEvent::Deposited { amount } => self.balance += amount,
//!             AccountEvent::Withdrawn { amount } => self.balance -= amount,
//!         }
//!     }
//!
//!     fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
//!         match command {
//!             AccountCommand::Open { .. } if self.owner.is_some() => Err(AccountError::AlreadyOpen),
//!             AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened { owner }]),
//!             _ if self.owner.is_none() => Err(AccountError::NotOpen),
//!             AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
//!             AccountCommand::Withdraw(asked) if asked > self.balance => {
//!                 Err(AccountError::InsufficientFunds { balance: self.balance, asked })
//!             }
//!             AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! registry().validate()?;
//! let repo = Repository::<Account>::new(std::sync::Arc::new(InMemoryEventStore::new()));
//! repo.execute("acc-1", AccountCommand::Open { owner: "Ada".into() }).await?;
//! repo.execute("acc-1", AccountCommand::Deposit(100)).await?;
//! repo.execute("acc-1", AccountCommand::Withdraw(30)).await?;
//! let refused = repo.execute("acc-1", AccountCommand::Withdraw(500)).await.unwrap_err();
//! assert_eq!(
//!     refused.rejection(),
//!     Some(&AccountError::InsufficientFunds { balance: 70, asked: 500 })
//! );
//!
//! let (account, version) = repo.load("acc-1").await?;
//! assert_eq!((account.balance, version), (70, 3));
//! # Ok(())
//! # }
//! ```
//!
//! ## Crates
//! `eventfold` is the one dependency an application needs (with `serde` for the events'
//! own derives). It re-exports:
//! - from `eventfold-core`: events, the registry, aggregates, repositories, the
//!   [`EventStore`] contract, the in-memory store and the event bus;
//! - from `eventfold-macros`: `#[derive(DomainEvent)]`;
//! - from `eventfold-sqlite` (feature `sqlite`, on by default): [`SqliteEventStore`];
//! - from `eventfold-postgres` (feature `postgres`, off by default): `PostgresEventStore`,
//!   the same contract on a PostgreSQL server, and its crate as `eventfold::postgres`.
//!
//! Two modules hold what not every application needs: [`backend`], what a store backend
//! implements and uses, and `testing` (feature `testing`, off by default: enable it in
//! your dev-dependencies), the given/when/then test kit and the store conformance suite.
//!
//! ## The registry and the linker
//! Registrations are collected with `inventory` at start-up. A linker may drop a crate
//! that nothing else references, and its registrations with it. Check at start-up with
//! [`Registry::validate`] and [`Registry::expect`] (or [`Registry::expect_type`]), which turn
//! a missing event type into an error before any event is read.

// Events and the registry.
pub use eventfold_core::{
    DomainEvent, EventType, EventTypeInfo, Registry, UpcastFn, registry, upcaster,
};
// Aggregates and repositories.
pub use eventfold_core::{
    Aggregate, CacheStatistics, CommandError, Committed, Decide, DecisionError, Repository,
};
// Stores and what they hold.
pub use eventfold_core::{
    AppendOutcome, Checkpoint, DeadLetter, EventStore, ExpectedVersion, FailureRecord,
    FinishedReplay, InMemoryEventStore, IntoStore, Metadata, NewEvent, RecordedEvent,
    ReplayOutcome, ReplayRequest, ReplayTarget, Snapshot, StoreStatistics, StreamId, StreamSummary,
};
// The event bus.
pub use eventfold_core::{
    BoxFuture, BusStatistics, Clock, DEFAULT_HANDLER_TIMEOUT, Delivery, DomainEventPublisher,
    EventBus, EventBusBuilder, Handler, HandlerOutcome, IntoOutgoing, Outgoing, ReplayReport,
    ResetTo, RetryPolicy, StartFrom, StopReport, SubscriptionBuilder, SubscriptionHandle,
    SubscriptionStatistics, SystemClock, TryPublishError, UnknownEventPolicy,
};
// Errors.
/// Projections that keep their read model in the store's own database, exactly once: the
/// options, progress and handle every backend's projections share
/// ([`sqlite::SqliteProjection`],
/// `postgres::PostgresProjection`).
pub use eventfold_core::projection;
pub use eventfold_core::{BoxError, Error, Result, StoreErrorKind};
// Archiving old history: export, verify, prune, restore, retention.
pub use eventfold_core::ArchiveStore;
pub use eventfold_core::archive;
/// Segment leases: how several processes share one subscription (segments, leases with
/// fencing epochs, members), and the [`LeaseStore`](lease::LeaseStore) part of the store
/// contract.
pub use eventfold_core::lease;
/// Metrics through the `metrics` facade: the names, kinds and labels eventfold records,
/// for the recorder (exporter) an application installs.
pub use eventfold_core::metrics;

/// The README's code blocks, compiled and run as doc tests so that it cannot drift from
/// the API. Blocks that define event types are `standalone_crate`: merged doc tests share
/// one binary, and with it one event registry.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// What `#[derive(DomainEvent)]` and `upcaster!` expand to. Not a public API.
#[doc(hidden)]
pub use eventfold_core::__private;

/// `#[derive(DomainEvent)]`: see the trait [`DomainEvent`] and the
/// [crate documentation](crate) for the attribute keys.
pub use eventfold_macros::DomainEvent;

mod system;

pub use system::{EventSystem, EventSystemBuilder, StoreUrl};

/// The SQLite store: the embedded default.
#[cfg(feature = "sqlite")]
pub use eventfold_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};

/// The SQLite store's crate, for the rest of its API: `WriterStatistics`, the
/// `VerifyReport` of `SqliteEventStore::verify`, and `SqliteProjection` (with `rusqlite`,
/// which it writes with).
#[cfg(feature = "sqlite")]
pub use eventfold_sqlite as sqlite;

/// The PostgreSQL store: a server that several processes and machines share.
#[cfg(feature = "postgres")]
pub use eventfold_postgres::{PostgresEventStore, PostgresOptions};

/// The PostgreSQL store's crate, for the rest of its API.
#[cfg(feature = "postgres")]
pub use eventfold_postgres as postgres;

pub mod backend {
    //! What a store backend implements and uses; applications need none of it.
    //!
    //! A backend implements the four parts of the store contract, [`EventLog`],
    //! [`SnapshotStore`], [`SubscriptionStore`] and [`LeaseStore`], with [`async_trait`](macro@async_trait); the umbrella
    //! [`EventStore`](crate::EventStore) that applications pass around is then implemented
    //! for it. It checks appends with [`check_append`] and [`check_batch`] before it stores
    //! anything, builds its errors with [`Error::store`](crate::Error::store), and proves the
    //! contract with the conformance suite (`eventfold::testing::conformance`, feature
    //! `testing`). Everything the contract's signatures name is here or at the crate root, so
    //! a backend needs no other dependency than `eventfold`:
    //!
    //! ```
    //! use eventfold::backend::{
    //!     EventLog, ReplayVisitor, SnapshotStore, SubscriptionStore, async_trait, check_append,
    //! };
    //! use eventfold::{AppendOutcome, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
    //!
    //! /// A store that forwards its log to another and counts appends.
    //! struct Counting<S> { inner: S, appends: std::sync::atomic::AtomicU64 }
    //!
    //! #[async_trait]
    //! impl<S: EventLog> EventLog for Counting<S> {
    //!     async fn append(
    //!         &self,
    //!         stream: &StreamId,
    //!         expected: ExpectedVersion,
    //!         events: Vec<NewEvent>,
    //!     ) -> eventfold::Result<AppendOutcome> {
    //!         check_append(stream, &events)?;
    //!         self.appends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    //!         self.inner.append(stream, expected, events).await
    //!     }
    //!     async fn read_stream(&self, s: &StreamId, from: u64) -> eventfold::Result<Vec<RecordedEvent>> {
    //!         self.inner.read_stream(s, from).await
    //!     }
    //!     async fn replay_stream(
    //!         &self,
    //!         s: &StreamId,
    //!         from: u64,
    //!         visitor: Box<dyn ReplayVisitor>,
    //!     ) -> eventfold::Result<Box<dyn ReplayVisitor>> {
    //!         self.inner.replay_stream(s, from, visitor).await
    //!     }
    //!     async fn read_all(&self, from: u64, limit: usize) -> eventfold::Result<Vec<RecordedEvent>> {
    //!         self.inner.read_all(from, limit).await
    //!     }
    //!     async fn get(&self, id: eventfold::backend::Uuid) -> eventfold::Result<Option<RecordedEvent>> {
    //!         self.inner.get(id).await
    //!     }
    //!     async fn stream_version(&self, s: &StreamId) -> eventfold::Result<u64> {
    //!         self.inner.stream_version(s).await
    //!     }
    //!     async fn head_position(&self) -> eventfold::Result<u64> {
    //!         self.inner.head_position().await
    //!     }
    //!     fn watch_head(&self) -> eventfold::backend::watch::Receiver<u64> {
    //!         self.inner.watch_head()
    //!     }
    //!     async fn statistics(&self) -> eventfold::Result<eventfold::StoreStatistics> {
    //!         self.inner.statistics().await
    //!     }
    //! }
    //! ```

    pub use eventfold_core::{
        AppendRequest, DEFAULT_FAILURE_RETENTION, DEFAULT_REPLAY_RETENTION, EventLog,
        NewDeadLetter, ReplayVisitor, ReplayedEvent, SnapshotStore, SubscriptionStore,
        check_append, check_batch, check_replay_target, error_chain,
    };

    /// The metric handles a store records its group commits with.
    pub use eventfold_core::metrics::StoreMetrics;

    /// The fourth part of the store contract, and what its signatures name.
    pub use eventfold_core::lease::{LeaseStore, SegmentLease, SegmentState};

    /// The attribute the store contract's traits are written with.
    pub use async_trait::async_trait;

    /// The event and dead-letter ids of the contract.
    pub use uuid::Uuid;

    /// The timestamps of the contract.
    pub use chrono::{DateTime, Utc};

    /// The head watch of [`EventLog::watch_head`].
    pub use tokio::sync::watch;
}

/// Testing helpers (feature `testing`): a given/when/then kit for aggregates, and the store
/// conformance suite every backend runs.
///
/// ```toml
/// [dev-dependencies]
/// eventfold = { version = "0.1", features = ["testing"] }
/// ```
#[cfg(feature = "testing")]
pub mod testing {
    pub use eventfold_core::testing::{AggregateTest, Then};

    /// The store conformance suite: run it on a backend with
    /// [`store_conformance_tests!`](crate::testing::store_conformance_tests).
    pub mod conformance {
        pub use eventfold_core::testing::conformance::*;
    }

    /// Segment leases across real processes: the member a child process runs and the
    /// kill-and-take-over scenario its parent checks.
    pub mod processes {
        pub use eventfold_core::testing::processes::*;
    }

    pub use eventfold_core::{lease_conformance_tests, store_conformance_tests};
}

/// The items most programs use, to import with `use eventfold::prelude::*`.
pub mod prelude {
    pub use eventfold_core::{
        Aggregate, CommandError, Committed, Decide, DecisionError, DomainEvent, EventStore,
        ExpectedVersion, InMemoryEventStore, Metadata, RecordedEvent, Repository, StreamId,
        registry,
    };
    pub use eventfold_macros::DomainEvent;

    // The parts of the store contract, unnamed: their methods (`store.read_all(..)`,
    // `store.load_checkpoint(..)`) are then callable on any store.
    #[doc(hidden)]
    pub use eventfold_core::lease::LeaseStore as _;
    #[doc(hidden)]
    pub use eventfold_core::{EventLog as _, SnapshotStore as _, SubscriptionStore as _};
}
