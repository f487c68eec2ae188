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
//! - `eventfold-core`: events, the registry, aggregates, repositories, the [`EventStore`]
//!   contract, the in-memory store and the test kit ([`testing`]);
//! - `eventfold-macros`: `#[derive(DomainEvent)]`;
//! - `eventfold-sqlite` (feature `sqlite`, on by default): [`SqliteEventStore`].
//!
//! ## The registry and the linker
//! Registrations are collected with `inventory` at start-up. A linker may drop a crate
//! that nothing else references, and its registrations with it. Check at start-up with
//! [`Registry::validate`] and [`Registry::expect`] (or [`Registry::expect_type`]), which turn
//! a missing event type into an error before any event is read.

pub use eventfold_core::*;

/// `#[derive(DomainEvent)]`: see the trait [`DomainEvent`] and the
/// [crate documentation](crate) for the attribute keys.
pub use eventfold_macros::DomainEvent;

#[cfg(feature = "sqlite")]
mod system;

#[cfg(feature = "sqlite")]
pub use system::{EventSystem, EventSystemBuilder};

/// The SQLite store: the embedded default.
#[cfg(feature = "sqlite")]
pub use eventfold_sqlite::{SqliteEventStore, SqliteOptions, Synchronous};

/// The SQLite store's crate, for its error type and the rest of its API.
#[cfg(feature = "sqlite")]
pub use eventfold_sqlite as sqlite;

/// The items most programs use, to import with `use eventfold::prelude::*`.
pub mod prelude {
    pub use eventfold_core::{
        Aggregate, CommandError, Committed, DomainEvent, EventStore, ExpectedVersion,
        InMemoryEventStore, Metadata, RecordedEvent, Repository, StreamId, registry,
    };
    pub use eventfold_macros::DomainEvent;
}
