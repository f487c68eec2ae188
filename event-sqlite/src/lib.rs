//! The SQLite event store of [eventfold](https://docs.rs/eventfold): durable events,
//! snapshots, checkpoints and dead letters in one database file, with bundled SQLite.
//!
//! ```
//! use chrono::Utc;
//! use eventfold_core::{EventStore, ExpectedVersion, Metadata, NewEvent, StreamId};
//! use eventfold_sqlite::{SqliteEventStore, SqliteOptions};
//! use uuid::Uuid;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let dir = tempfile::tempdir()?;
//!     let store = SqliteEventStore::open(dir.path().join("events.db"), SqliteOptions::new()).await?;
//!
//!     // Applications append through a `Repository` or the event bus, which build these
//!     // from `#[derive(DomainEvent)]` types; here they are written out by hand.
//!     let event = |event_type: &str, payload: &str| NewEvent {
//!         event_id: Uuid::now_v7(),
//!         event_type: event_type.to_owned(),
//!         schema_version: 1,
//!         occurred_at: Utc::now(),
//!         metadata: Metadata::new().with("user", "ada"),
//!         payload: payload.to_owned(),
//!     };
//!     let account = StreamId::new("Account", "acc-1");
//!     let opened = event("AccountOpened", r#"{"owner":"Ada"}"#);
//!     let outcome = store.append(&account, ExpectedVersion::NoStream, vec![opened]).await?;
//!     assert_eq!((outcome.version, outcome.last_position), (1, 1));
//!
//!     let deposited = event("FundsDeposited", r#"{"amount":100}"#);
//!     store.append(&account, ExpectedVersion::Exact(1), vec![deposited]).await?;
//!
//!     let events = store.read_stream(&account, 1).await?;
//!     assert_eq!(events.len(), 2);
//!     assert_eq!(events[1].payload, r#"{"amount":100}"#);
//!     assert_eq!(store.read_all(1, 100).await?.len(), 2);
//!
//!     // An append that expects an older version loses the race, and stores nothing.
//!     let late = event("FundsDeposited", r#"{"amount":5}"#);
//!     let refused = store.append(&account, ExpectedVersion::Exact(1), vec![late]).await;
//!     assert!(refused.unwrap_err().is_conflict());
//!
//!     store.close().await?;
//!     Ok(())
//! }
//! ```
//!
//! # How it works
//!
//! - **One writer.** A single connection on its own thread (`eventfold-sqlite-writer`)
//!   commits every write. It takes the writes that are queued together (up to
//!   [`SqliteOptions::max_batch_appends`] and [`SqliteOptions::max_batch_events`]) into one
//!   transaction, and those that arrive while it runs join it before it commits: *group
//!   commit*, one disk sync for many appends. Each write runs in its own savepoint, so a
//!   version conflict or a full disk fails only its own append, and each caller is answered
//!   only after the transaction committed. If the commit fails, every write of the group
//!   fails and none is stored. [`EventStore::append_batch`](eventfold_core::EventStore::append_batch)
//!   stores appends to several streams all or none.
//! - **Reads in parallel.** [`SqliteOptions::read_connections`] read connections serve
//!   reads on blocking threads; WAL mode lets them read while the writer writes. An
//!   in-memory store reads through its writer.
//! - **Positions.** The writer gives each event the next global position (head + 1), in
//!   commit order and without gaps, so a reader that has seen position `p` never later
//!   finds an event at or below `p`.
//! - **Durability.** [`Synchronous::Full`] by default: an acknowledged append survives a
//!   crash of the process or of the machine.
//! - **Checksums.** SQLite keeps no checksum of a row, so the writer stores one with each
//!   event: XXH3-based, over every stored field (position, event id, aggregate type and id,
//!   version, event type, schema version, both times, metadata, payload). Every read of an
//!   event (a stream, the global log, `get`) recomputes it from the stored bytes and checks
//!   that its text is UTF-8 and its numbers in range; a damaged row is
//!   [`eventfold_core::Error::CorruptEvent`] naming its id and position, never handed back
//!   as if it had been stored that way. A replay (how a repository rebuilds an aggregate)
//!   checks the half of the checksum that covers what it hands out (stream, version, event
//!   type, schema version, payload), so it reads no column it does not need; the rest of a
//!   row it reads, and checks, only to name a refused event. Stream reads and replays also
//!   fail when a version is missing.
//!   [`SqliteEventStore::verify`] scans every event, the numbering of the log and of each
//!   stream, and `PRAGMA integrity_check`, and lists all it finds in a [`VerifyReport`].
//!   Databases of schema version 1 get the checksums of their events when they migrate.
//! - **Dead letters and failure records.** One dead letter per (subscription, event):
//!   adding it again updates it. Each failure record removes its subscription's records
//!   beyond the retention it is given, in the same write.
//! - **Schema.** Versioned with `PRAGMA user_version` and migrated on open; a database
//!   written by a newer version of this library is refused ([`Error::SchemaTooNew`]), and a
//!   file that is not this store's database is refused as [`Error::Corrupt`].
//!
//! # Errors
//!
//! Opening returns this crate's [`Error`]. Once open, the store returns
//! [`eventfold_core::Error`] like every backend; SQLite's failures are
//! [`eventfold_core::Error::Store`] with a [`StoreErrorKind`](eventfold_core::StoreErrorKind):
//! `Full` (disk or [`SqliteOptions::max_page_count`]), `ReadOnly`, `Busy` (another process
//! held the database past [`SqliteOptions::busy_timeout`]), `Corrupt`, `Closed`, `Other`.
//! A failed write stores nothing.

#![forbid(unsafe_code)]

mod checksum;
mod error;
mod options;
mod schema;
mod sql;
mod store;
mod verify;
mod writer;

pub use error::{Error, Result};
pub use options::{SqliteOptions, Synchronous};
pub use store::{SqliteEventStore, WriterStatistics};
pub use verify::{DamagedEvent, VerifyReport};
