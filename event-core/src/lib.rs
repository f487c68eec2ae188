//! The runtime of [eventfold](https://docs.rs/eventfold): domain events and their registry,
//! recorded events, aggregates and repositories, the [`EventStore`] contract with an
//! in-memory store, and a given/when/then test kit.
//!
//! Applications depend on the `eventfold` crate, which re-exports all of this together
//! with `#[derive(DomainEvent)]` and the SQLite store. Used directly, the derive takes
//! `crate = "eventfold_core"`:
//!
//! ```
//! use std::sync::Arc;
//! use eventfold_core::{Aggregate, InMemoryEventStore, Repository, registry};
//! use eventfold_macros::DomainEvent;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! #[domain_event(aggregate = "Counter", crate = "eventfold_core")]
//! enum CounterEvent {
//!     Added { by: u64 },
//! }
//!
//! #[derive(Default)]
//! struct Counter { total: u64 }
//!
//! impl Aggregate for Counter {
//!     type Event = CounterEvent;
//!     type Command = u64;
//!     type Error = std::convert::Infallible;
//!     fn apply(&mut self, CounterEvent::Added { by }: &CounterEvent) {
//!         self.total += by;
//!     }
//!     fn handle(&self, by: u64) -> Result<Vec<CounterEvent>, Self::Error> {
//!         Ok(vec![CounterEvent::Added { by }])
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! registry().validate()?;
//! let repo = Repository::<Counter>::new(Arc::new(InMemoryEventStore::new()));
//! repo.execute("c-1", 2).await?;
//! repo.execute("c-1", 3).await?;
//! let (counter, version) = repo.load("c-1").await?;
//! assert_eq!((counter.total, version), (5, 2));
//! # Ok(())
//! # }
//! ```

mod aggregate;
pub mod archive;
mod bus;
mod error;
mod event;
mod finite;
pub mod lease;
mod memory;
pub mod metrics;
pub mod projection;
mod record;
mod registry;
mod store;
pub mod testing;

pub use aggregate::{
    Aggregate, CacheStatistics, CommandError, Committed, Decide, DecisionError, Repository,
};
pub use bus::{
    BoxFuture, BusStatistics, Clock, DEFAULT_HANDLER_TIMEOUT, Delivery, DomainEventPublisher,
    EventBus, EventBusBuilder, Handler, HandlerOutcome, IntoOutgoing, Outgoing, ReplayReport,
    ResetTo, RetryPolicy, StartFrom, StopReport, SubscriptionBuilder, SubscriptionHandle,
    SubscriptionStatistics, SystemClock, TryPublishError, UnknownEventPolicy,
};
pub use error::{BoxError, Error, Result, StoreErrorKind, error_chain};
pub use event::{DomainEvent, EventType};
pub use memory::InMemoryEventStore;
pub use record::{
    AppendOutcome, AppendRequest, Checkpoint, DeadLetter, ExpectedVersion, FailureRecord,
    FinishedReplay, Metadata, NewDeadLetter, NewEvent, RecordedEvent, ReplayOutcome, ReplayRequest,
    ReplayTarget, ReplayedEvent, Snapshot, StoreStatistics, StreamId, StreamSummary,
};
pub use registry::{EventTypeInfo, Registry, UpcastFn, registry};
pub use store::{
    ArchiveStore, DEFAULT_FAILURE_RETENTION, DEFAULT_REPLAY_RETENTION, EventLog, EventStore,
    IntoStore, ReplayVisitor, SnapshotStore, SubscriptionStore, check_append, check_batch,
    check_replay_target,
};

// Lets the derive's generated code in this crate's own tests name `::eventfold`.
#[cfg(test)]
extern crate self as eventfold;

/// What `#[derive(DomainEvent)]` and `upcaster!` expand to. Not a public API: it changes
/// without notice, in lockstep with `eventfold-macros`.
#[doc(hidden)]
pub mod __private {
    pub use crate::event::group::{concat_event_types, has_event_type, names_are_distinct, str_eq};
    pub use crate::event::payload::{deserialize_variant, enum_payload, struct_payload};
    pub use crate::event::{DomainEvent, EventType};
    pub use crate::registry::{EventRegistration, UpcasterRegistration};
    pub use core::any::TypeId;
    pub use core::convert::From;
    pub use core::result::Result;
    pub use inventory;
    pub use serde;
    pub use serde_json;
    pub use std::option::Option;
    pub use std::string::{String, ToString};
}
