//! The PostgreSQL event store of [eventfold](https://docs.rs/eventfold): the store
//! contract of the SQLite store (events, snapshots, checkpoints, dead letters, failure
//! records) on a server that several processes and machines share.
//!
//! ```no_run
//! use chrono::Utc;
//! use eventfold_core::{EventLog, ExpectedVersion, Metadata, NewEvent, StreamId};
//! use eventfold_postgres::{PostgresEventStore, PostgresOptions};
//! use uuid::Uuid;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let options = PostgresOptions::new("postgres://postgres@127.0.0.1:5432/test")
//!         .schema("orders");
//!     let store = PostgresEventStore::open(options).await?;
//!     let opened = NewEvent {
//!         event_id: Uuid::now_v7(),
//!         event_type: "AccountOpened".to_owned(),
//!         schema_version: 1,
//!         occurred_at: Utc::now(),
//!         metadata: Metadata::new(),
//!         payload: r#"{"owner":"Ada"}"#.to_owned(),
//!     };
//!     let account = StreamId::new("Account", "acc-1");
//!     store.append(&account, ExpectedVersion::NoStream, vec![opened]).await?;
//!     assert_eq!(store.read_stream(&account, 1).await?.len(), 1);
//!     store.close().await?;
//!     Ok(())
//! }
//! ```
//!
//! # How it works
//!
//! - **Everything in one schema.** The store's tables (`ef_events`, `ef_head`,
//!   `ef_snapshots`, `ef_checkpoints`, `ef_dead_letters`, `ef_failures`, the segment
//!   leases' `ef_lease_subscriptions`, `ef_segment_leases`, `ef_subscription_members`, and
//!   the archive horizon's `ef_archives`, `ef_archived_streams`) and its function
//!   `ef_append` live in [`PostgresOptions::schema`] (default `eventfold`), created at open
//!   if missing: applications or tenants share a database, each in a schema of its own.
//! - **Schema versions.** Versioned migrations run at open, in one transaction under an
//!   advisory lock, so processes that open at once do not race; a schema written by a
//!   newer version of this library is refused ([`Error::Open`] of kind `SchemaTooNew`).
//! - **Segment leases on the server's clock.** Lease expiry and membership use
//!   `clock_timestamp()` of the server, so machines need not agree on the time; claims
//!   take free segments with `FOR UPDATE SKIP LOCKED`, and a segment checkpoint is saved
//!   in one transaction with the check of its lease (`eventfold::lease`).
//! - **Positions: a counter row.** The row `ef_head` holds the head of the log. Each
//!   append call updates it first (which locks it) and holds it until it commits, so
//!   positions are dense (no holes, even after a refused or failed append) and follow
//!   commit order: a reader that has seen position `p` never later finds an event at or
//!   below `p`. No `SERIALIZABLE`, no retries: every statement after the lock sees every
//!   earlier append.
//! - **Group commit.** One writer task per store owns one connection. It takes the
//!   appends that are queued together (up to [`PostgresOptions::max_batch_appends`] and
//!   [`PostgresOptions::max_batch_events`]) into one call of `ef_append`: one round trip and
//!   one commit for all, with the events passed as arrays (`UNNEST`). Each append keeps its
//!   own version check (in queue order) and its own result: a refused append fails alone.
//!   After a call of several appends the writer waits up to 250 µs, yielding, for as many
//!   to queue again: the appenders it answered send their next appends microseconds later,
//!   and a call with the first alone would make the rest wait a whole commit.
//!   [`EventLog::append_batch`](eventfold_core::EventLog::append_batch) stores appends to
//!   several streams all or none.
//! - **Idempotent appends.** An append whose event ids are stored already is judged
//!   against what is stored: an exact repeat returns the first outcome and stores nothing;
//!   an id stored with other content is [`Error::DuplicateEventId`].
//! - **Wake-ups across processes.** Each call that stores events sends one `NOTIFY` on the
//!   channel `ef_events_<schema>` with the new head. The store listens on one connection of
//!   its own and moves its [`watch_head`](eventfold_core::EventLog::watch_head); it also
//!   reads the head every [`PostgresOptions::poll_interval`] and after reconnecting, since
//!   notifications sent while disconnected are lost. [`PostgresOptions::notify`] turns the
//!   `NOTIFY` off (polling only) for shared clusters.
//! - **Reads and other writes** go through a pool of [`PostgresOptions::pool_size`]
//!   connections (deadpool). A read whose session the server ended runs again on another
//!   (reads are safe to repeat); a broken session never goes back into the pool.
//! - **Rows written outside the store.** Another program that inserts into `ef_events`
//!   while an append call checks the same stream or event id makes the call's insert
//!   violate a unique key once it commits: the writer calls once more, and the append is
//!   judged against that row (a version conflict, say). A row put at a position past the
//!   head is damage: appends fail as `Corrupt` until it is removed.
//! - **Archiving** (`eventfold::archive`, the [`ArchiveStore`](eventfold_core::ArchiveStore)
//!   part): a prune or a restore is one transaction holding the `ef_head` row's lock, so
//!   appends wait for it and none interleaves; a read below the horizon (a stream, the
//!   log, an event by id) is [`Error::Archived`] naming the archive, never a gap.
//! - **Projections in the same database, exactly once.** A [`PostgresProjection`] keeps
//!   its read model in tables of the store's schema; [`PostgresEventStore::run_projection`]
//!   applies each batch and moves the projection's checkpoint in one transaction, holding
//!   the checkpoint's row lock, so a crash never applies an event twice and two processes
//!   running one projection take turns. The transaction is `tokio_postgres`'s (re-exported),
//!   the one driver type this crate shows, and only to projections.
//! - **Exact data.** Payloads and metadata are stored as `text`, byte for byte as
//!   appended; times as nanoseconds since the Unix epoch, exact between the years 1677 and
//!   2262. PostgreSQL's `text` cannot hold a NUL character: an append with one in a
//!   name or payload is [`Error::InvalidAppend`].
//! - **No checksums.** Unlike the SQLite store, rows carry no checksum of their own:
//!   PostgreSQL checks its pages itself (with `data_checksums` on the cluster) and its WAL
//!   records. A row whose numbers are out of range or whose metadata does not decode is
//!   [`Error::CorruptEvent`].
//!
//! # Errors
//!
//! Every operation returns [`eventfold_core::Error`] (re-exported as [`Error`]), like every
//! backend. Opening fails with [`Error::InvalidSetting`] for an option out of its range,
//! and with [`Error::Open`] otherwise: `CannotOpen` (the server is unreachable, refuses the
//! login, has no such database), `SchemaTooNew`, `Timeout`, `Other`. Once open, the
//! server's failures are [`Error::Store`] with a
//! [`StoreErrorKind`](eventfold_core::StoreErrorKind): `Timeout` (past
//! [`PostgresOptions::statement_timeout`]), `Busy` (a lock timeout, a serialization
//! failure), `Io` (the connection broke, the server ended the session), `Full`,
//! `ReadOnly`, `Corrupt`, `Closed`, `Other`.
//!
//! A failed append stores nothing, with one exception: when the session breaks while the
//! append call runs (the server restarted or ended it, the network failed), the call may
//! have committed. The writer then runs the same call once more on a new session, which is
//! safe because appends are recognised by their event ids: a group that was stored is
//! answered with its outcomes, one that was not is stored now. Only when that second call
//! cannot be made or fails too does every append of the group fail as
//! [`StoreErrorKind::OutcomeUnknown`](eventfold_core::StoreErrorKind::OutcomeUnknown):
//! re-append the same events with the same event ids, and they end up stored exactly once
//! (the re-append's outcome says where).

#![forbid(unsafe_code)]

mod archive;
mod error;
mod lease;
mod listener;
mod options;
mod projection;
mod schema;
mod sql;
mod store;
mod writer;

/// What a [`PostgresProjection`] implements its trait with.
pub use async_trait::async_trait;
/// The error of every operation, opening included: `eventfold_core`'s, so a store opened
/// directly and one opened by the facade fail alike.
pub use eventfold_core::{Error, Result};
pub use options::{DEFAULT_URL, PostgresOptions};
pub use projection::PostgresProjection;
pub use store::{PostgresEventStore, WriterStatistics};

/// The schema version this library writes (the highest `version` in its schema's `ef_schema` table).
/// [`PostgresEventStore::open`] migrates an older schema to it and refuses a newer one
/// (`StoreErrorKind::SchemaTooNew`), so every open store is at this version.
pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION as u32;
/// The PostgreSQL driver a [`PostgresProjection`] writes its read model with.
pub use tokio_postgres;
