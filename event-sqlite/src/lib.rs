//! The SQLite event store of [eventfold](https://docs.rs/eventfold): durable events,
//! snapshots, checkpoints and dead letters in one database file, with bundled SQLite.
//!
//! ```
//! use chrono::Utc;
//! use eventfold_core::{EventLog, ExpectedVersion, Metadata, NewEvent, StreamId};
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
//!   only after the transaction committed. If the `COMMIT` itself fails, every write of the
//!   group fails as `OutcomeUnknown` (see [Errors](#errors)). A write that panics fails
//!   alone, as `Other`, and the writer goes on. [`EventLog::append_batch`](eventfold_core::EventLog::append_batch)
//!   stores appends to several streams all or none.
//! - **Reads in parallel.** [`SqliteOptions::read_connections`] read connections serve
//!   reads on blocking threads; WAL mode lets them read while the writer writes. An
//!   in-memory store reads through its writer.
//! - **Positions.** The writer gives each event the next global position (head + 1), in
//!   commit order and without gaps, so a reader that has seen position `p` never later
//!   finds an event at or below `p`.
//! - **Other writers.** Other processes (and other stores on the same file) may append
//!   too. Reads see their commits at once; [`EventLog::watch_head`](eventfold_core::EventLog::watch_head),
//!   which a bus follows, sees them within [`SqliteOptions::external_change_poll`]
//!   (100 ms by default): while someone watches, a poller checks `PRAGMA data_version`
//!   on a connection of its own at that interval and reads the head when it moved.
//! - **Durability.** [`Synchronous::Full`] by default: an acknowledged append survives a
//!   crash of the process or of the machine.
//! - **Files.** While the store is open, commits go to the write-ahead log (`events.db-wal`,
//!   with its index `events.db-shm`), and SQLite copies them into `events.db` at
//!   checkpoints, every 1,000 pages or so. [`close`](SqliteEventStore::close) copies the
//!   rest (`wal_checkpoint(TRUNCATE)`) and takes the file out of WAL mode, so the `.db` file
//!   alone holds every commit: copy it, move it, or open it from read-only media. (If
//!   another process still has the file open, or a reader still holds a read transaction,
//!   the file stays in WAL mode, and what a reader pins stays in `-wal`.) The next open
//!   switches back to WAL. For a copy of a live store, use
//!   [`backup`](SqliteEventStore::backup): SQLite's online backup, one consistent moment,
//!   without stopping appends.
//! - **Long readers and the WAL.** A checkpoint cannot copy past the oldest read
//!   transaction still open on the file, and the WAL cannot start over while one is open,
//!   so a connection that holds a read transaction for long (another process's report
//!   query, a backup tool, a `sqlite3` shell left in `BEGIN`) makes the WAL grow with every
//!   commit: hundreds of MiB under heavy appends. Nothing is lost, and the store does not
//!   block. Once the reader lets go, the WAL comes back to
//!   [`SqliteOptions::wal_size_limit`] (64 MiB by default): whenever the writer runs out of
//!   work after a write and the WAL is over the limit, it runs a checkpoint that never waits
//!   for readers and truncates the WAL when nothing pins it, and a WAL restarted after a
//!   checkpoint is cut to the limit (`journal_size_limit`). With no write after the reader
//!   let go, the WAL stays as it is until the next write,
//!   [`checkpoint`](SqliteEventStore::checkpoint) (which does it on demand) or `close`.
//!   Keep external read transactions short; the store's own reads each hold one only while
//!   they run.
//! - **Read-only media.** With [`SqliteOptions::read_only`], a database on read-only
//!   media opens for reading: one closed cleanly is no longer in WAL mode, and one left
//!   in WAL mode opens as immutable as long as its WAL is empty or missing. (A WAL with
//!   commits in it needs a writable directory, or a read-write open to check it in.)
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
//! - **Projections in the same file, exactly once.** A [`SqliteProjection`] keeps its
//!   read model in tables of the store's own file; [`SqliteEventStore::run_projection`]
//!   applies each batch of events and moves the projection's checkpoint in one
//!   transaction, so a crash never applies an event twice or skips one. Failing events are
//!   retried, then dead-lettered; a [rebuild](eventfold_core::projection::ProjectionHandle::rebuild) clears the read
//!   model and replays the log, with its progress to follow.
//! - **Dead letters and failure records.** One dead letter per (subscription, event):
//!   adding it again updates it. Each failure record removes its subscription's records
//!   beyond the retention it is given, in the same write.
//! - **Schema.** Versioned with `PRAGMA user_version` and migrated on open; a database
//!   written by a newer version of this library is refused ([`Error::Open`] of kind
//!   `SchemaTooNew`), and a file that is not this store's database as [`Error::Open`] of
//!   kind `Corrupt`.
//!
//! # Errors
//!
//! Every operation returns [`eventfold_core::Error`] (re-exported as [`Error`]), like every
//! backend. Opening fails with [`Error::InvalidSetting`] for an option out of its range and
//! with [`Error::Open`] otherwise, carrying the path and a
//! [`StoreErrorKind`](eventfold_core::StoreErrorKind): `CannotOpen` (a missing directory,
//! no permission), `Corrupt` (not a database of this store), `SchemaTooNew`, `ReadOnly`
//! (a read-only store whose schema needs migrating), `Busy`, `Io`, `Other`. Once open,
//! SQLite's failures are
//! [`eventfold_core::Error::Store`] with a [`StoreErrorKind`](eventfold_core::StoreErrorKind):
//! `Full` (disk or [`SqliteOptions::max_page_count`]), `ReadOnly`, `Busy` (another process
//! held the database past [`SqliteOptions::busy_timeout`]), `Io` (the disk or file system
//! failed to read or write: SQLite's `SQLITE_IOERR` family), `OutcomeUnknown`, `Corrupt`,
//! `Closed`, `Other`. A stored row that cannot be read back (a version or position below 1,
//! say) is [`eventfold_core::Error::CorruptEvent`], naming the row; an append that would
//! take a version or position past `i64::MAX` is
//! [`eventfold_core::Error::InvalidAppend`].
//!
//! A failed write stores nothing, with one exception: when the `COMMIT` itself fails (an
//! I/O error or a full disk while SQLite writes or syncs the WAL, the connection breaking),
//! SQLite may already have written the whole group, so it may be stored, now or after the
//! next recovery. Every write of that group fails as
//! [`StoreErrorKind::OutcomeUnknown`](eventfold_core::StoreErrorKind::OutcomeUnknown). The
//! remedy is to re-append the same events with the same event ids: a repeated append is
//! recognised by its ids, so they end up stored exactly once (and the re-append's outcome
//! says where). After an I/O error, a failed `COMMIT` or a report of corruption, the writer
//! checks its connection before the next write (and reopens it if it must), so a healthy
//! database serves the next append normally.

#![forbid(unsafe_code)]

mod archive;
mod checksum;
mod error;
mod follow;
mod lease;
mod options;
mod projection;
mod replay;
mod schema;
mod sql;
mod store;
mod verify;
mod versions;
mod writer;

/// The error of every operation, opening included: `eventfold_core`'s, so a store opened
/// directly and one opened by the facade's `EventSystem` fail alike.
pub use eventfold_core::{Error, Result};
pub use options::{SqliteOptions, Synchronous};
pub use projection::SqliteProjection;
/// The SQLite driver a [`SqliteProjection`] writes its read model with.
pub use rusqlite;
pub use store::{SqliteEventStore, WriterStatistics};
pub use verify::{DamagedEvent, VerifyReport};

/// The schema version of the database files this library writes (`PRAGMA user_version`).
/// [`SqliteEventStore::open`] migrates an older file to it and refuses a newer one
/// (`StoreErrorKind::SchemaTooNew`), so every open store is at this version.
pub const SCHEMA_VERSION: u32 = schema::SCHEMA_VERSION;

/// Gives every event row of the database file at `path` the checksum of what it now holds,
/// as if the store had written it. Only for the fuzz harness, which writes rows by hand to
/// reach the code behind the checksum check: on a real store it would hide damage.
#[doc(hidden)]
pub fn __reseal_checksums(path: &std::path::Path) -> eventfold_core::Result<()> {
    let conn = rusqlite::Connection::open(path)
        .map_err(|e| error::store_error("opening the file to reseal", e))?;
    schema::fill_checksums(&conn).map_err(|e| error::store_error("resealing checksums", e))
}
