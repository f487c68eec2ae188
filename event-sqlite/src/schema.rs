//! Opening connections: identifying the database, setting it up, and migrating its schema.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use eventfold_core::{Error, Result, StoreErrorKind};

use crate::error::{open_failed, open_refused};
use crate::options::SqliteOptions;

/// Marks a database as eventfold's (`PRAGMA application_id`), so another program's SQLite
/// file is refused instead of being altered. The bytes spell "EvFd".
const APPLICATION_ID: i32 = 0x4576_4664;

/// One step of the schema: SQL, or Rust code for what SQL cannot do (computing a
/// checksum). Each runs inside the migrating transaction.
enum Migration {
    Sql(&'static str),
    Code(fn(&Connection) -> rusqlite::Result<()>),
}

/// The schema migrations, in order: migration `i` takes the schema from version `i` to
/// `i + 1`. A migration is only ever appended, never edited once released.
const MIGRATIONS: &[Migration] = &[
    // Version 1. Times are nanoseconds since the Unix epoch; ids are 16-byte UUIDs.
    // `position` is the rowid, assigned by the writer as head + 1, so the log is gap-free.
    Migration::Sql(
        "CREATE TABLE events (
        position       INTEGER PRIMARY KEY,
        event_id       BLOB    NOT NULL UNIQUE,
        aggregate_type TEXT    NOT NULL,
        aggregate_id   TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        event_type     TEXT    NOT NULL,
        schema_version INTEGER NOT NULL,
        occurred_at    INTEGER NOT NULL,
        recorded_at    INTEGER NOT NULL,
        metadata       TEXT,
        payload        TEXT    NOT NULL,
        UNIQUE (aggregate_type, aggregate_id, version)
    ) STRICT;
    CREATE TABLE snapshots (
        aggregate_type TEXT    NOT NULL,
        aggregate_id   TEXT    NOT NULL,
        version        INTEGER NOT NULL,
        schema_version INTEGER NOT NULL,
        state          TEXT    NOT NULL,
        taken_at       INTEGER NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE checkpoints (
        subscription TEXT    NOT NULL PRIMARY KEY,
        position     INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE dead_letters (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription    TEXT    NOT NULL,
        event_id        BLOB    NOT NULL,
        position        INTEGER NOT NULL,
        event_type      TEXT    NOT NULL,
        error           TEXT    NOT NULL,
        attempts        INTEGER NOT NULL,
        first_failed_at INTEGER NOT NULL,
        last_failed_at  INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX dead_letters_by_subscription ON dead_letters (subscription, id);
    CREATE TABLE failures (
        id              INTEGER PRIMARY KEY,
        subscription    TEXT    NOT NULL,
        event_id        BLOB    NOT NULL,
        position        INTEGER NOT NULL,
        attempt         INTEGER NOT NULL,
        error           TEXT    NOT NULL,
        duration_micros INTEGER NOT NULL,
        failed_at       INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX failures_by_subscription ON failures (subscription, id);",
    ),
    // Version 2: each event's checksum, and one dead letter per (subscription, event).
    Migration::Code(migrate_to_2),
    // Version 3: the archive horizon (eventfold::archive). One row per pruned archive, and
    // per stream the run of versions it lost into it; both are empty until a prune.
    Migration::Sql(
        "CREATE TABLE archives (
        archive        BLOB    NOT NULL PRIMARY KEY,
        path           TEXT    NOT NULL,
        events         INTEGER NOT NULL,
        checksum       INTEGER NOT NULL,
        first_position INTEGER NOT NULL,
        last_position  INTEGER NOT NULL,
        first_event_id BLOB    NOT NULL,
        last_event_id  BLOB    NOT NULL,
        pruned_at      INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX archives_by_position ON archives (last_position, first_position);
    CREATE TABLE archived_streams (
        aggregate_type TEXT    NOT NULL,
        aggregate_id   TEXT    NOT NULL,
        last_version   INTEGER NOT NULL,
        first_version  INTEGER NOT NULL,
        archive        BLOB    NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, last_version)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX archived_streams_by_archive ON archived_streams (archive);",
    ),
    // Version 4: segment leases (eventfold::lease). Per subscription its stored segment
    // count (0: none, never claimed or reset since) and the epoch new segment rows start
    // from; per segment its lease (owner NULL: free); per member its membership's expiry.
    // Times are nanoseconds since the Unix epoch, the writer's clock.
    Migration::Sql(
        "CREATE TABLE lease_subscriptions (
        subscription TEXT    NOT NULL PRIMARY KEY,
        segments     INTEGER NOT NULL,
        epoch_floor  INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE segment_leases (
        subscription TEXT    NOT NULL,
        segment      INTEGER NOT NULL,
        segments     INTEGER NOT NULL,
        owner        TEXT,
        epoch        INTEGER NOT NULL,
        expires_at   INTEGER,
        PRIMARY KEY (subscription, segment)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE subscription_members (
        subscription TEXT    NOT NULL,
        member       TEXT    NOT NULL,
        expires_at   INTEGER NOT NULL,
        PRIMARY KEY (subscription, member)
    ) STRICT, WITHOUT ROWID;",
    ),
    // Version 5: replay requests (`SubscriptionStore::request_replay`), which a running
    // bus carries out. `dead_letter` NULL: every dead letter of the subscription. Pending
    // while `finished_at` is NULL; then `reason` NULL: done, with the three counts; else
    // failed. Times are nanoseconds since the Unix epoch.
    Migration::Sql(
        "CREATE TABLE replay_requests (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        subscription TEXT    NOT NULL,
        dead_letter  INTEGER,
        requested_at INTEGER NOT NULL,
        finished_at  INTEGER,
        replayed     INTEGER,
        failed       INTEGER,
        held_back    INTEGER,
        reason       TEXT
    ) STRICT;
    CREATE INDEX replay_requests_pending ON replay_requests (subscription, id)
        WHERE finished_at IS NULL;",
    ),
];

/// Adds the `checksum` column and fills it for every stored event, so events written
/// before it are protected from then on too; merges the dead letters of one subscription
/// and one event into the newest of them (adding up their attempts, keeping the first
/// failure time) and makes the pair unique.
///
/// The column allows NULL because SQLite adds a NOT NULL column only with a default; the
/// store reads a row without a checksum as damaged.
fn migrate_to_2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("ALTER TABLE events ADD COLUMN checksum INTEGER")?;
    fill_checksums(conn)?;
    conn.execute_batch(
        "UPDATE dead_letters SET attempts = merged.attempts, \
             first_failed_at = merged.first_failed_at, last_failed_at = merged.last_failed_at \
         FROM (SELECT MAX(id) AS id, MIN(SUM(attempts), 4294967295) AS attempts, \
                      MIN(first_failed_at) AS first_failed_at, \
                      MAX(last_failed_at) AS last_failed_at \
               FROM dead_letters GROUP BY subscription, event_id, position HAVING COUNT(*) > 1) AS merged \
         WHERE dead_letters.id = merged.id;
         DELETE FROM dead_letters WHERE id NOT IN \
             (SELECT MAX(id) FROM dead_letters GROUP BY subscription, event_id, position);
         CREATE UNIQUE INDEX dead_letters_by_event ON dead_letters (subscription, event_id, position);",
    )
}

/// Gives every event row the checksum of what it holds (a row whose columns have the wrong
/// types cannot be hashed: it keeps none, and every read of it reports it damaged).
pub(crate) fn fill_checksums(conn: &Connection) -> rusqlite::Result<()> {
    let mut select = conn.prepare(crate::sql::SCAN_EVENTS)?;
    let mut update = conn.prepare("UPDATE events SET checksum = ?2 WHERE position = ?1")?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        match crate::sql::stored_event(row) {
            Ok((stored, _)) => {
                update.execute([stored.position, stored.checksum()])?;
            }
            Err(error) => tracing::warn!(%error, "an event row cannot be given a checksum"),
        }
    }
    Ok(())
}

/// The schema version this library writes and reads.
pub(crate) const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Prepared statements kept per connection; more than the store uses, so none is evicted.
const STATEMENT_CACHE: usize = 64;

/// Where the database lives.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Location<'a> {
    File(&'a Path),
    Memory,
}

impl Location<'_> {
    pub(crate) fn describe(self) -> String {
        match self {
            Location::File(path) => path.display().to_string(),
            Location::Memory => ":memory:".to_owned(),
        }
    }
}

/// Opens the writer connection: identifies the database, sets it up (WAL, synchronous,
/// size cap) and migrates it to [`SCHEMA_VERSION`].
pub(crate) fn open_writer(location: Location<'_>, options: &SqliteOptions) -> Result<Connection> {
    let name = location.describe();
    let fail = |doing: &str| {
        let name = name.clone();
        let doing = doing.to_owned();
        move |e| open_failed(&name, &doing, e)
    };
    let flags = if options.read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = match location {
        Location::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                && !dir.is_dir()
            {
                return Err(open_refused(
                    StoreErrorKind::CannotOpen,
                    &name,
                    format!("the directory `{}` does not exist", dir.display()),
                ));
            }
            Connection::open_with_flags(path, flags)
        }
        Location::Memory => Connection::open_in_memory_with_flags(flags),
    }
    .map_err(fail("opening"))?;
    let conn = match (configure(&conn, options), location) {
        (Err(e), Location::File(path)) if needs_immutable(path, options, &e) => {
            open_immutable(path, options).map_err(fail("opening read-only media"))?
        }
        (configured, _) => {
            configured.map_err(fail("configuring the connection"))?;
            conn
        }
    };

    // The first read of the file: a file that is not a database fails here.
    let read_header = |conn: &Connection| {
        conn.query_row(
            "SELECT (SELECT application_id FROM pragma_application_id),
                    (SELECT user_version FROM pragma_user_version),
                    (SELECT count(*) FROM sqlite_schema)",
            [],
            |row| {
                Ok((
                    row.get::<_, i32>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            },
        )
    };
    let (conn, header) = match (read_header(&conn), location) {
        (Err(e), Location::File(path)) if needs_immutable(path, options, &e) => {
            let conn = open_immutable(path, options).map_err(fail("opening read-only media"))?;
            let header = read_header(&conn);
            (conn, header)
        }
        (header, _) => (conn, header),
    };
    let (application_id, user_version, objects) =
        header.map_err(fail("reading the database header"))?;
    let fresh = application_id == 0 && user_version == 0 && objects == 0;
    if application_id != APPLICATION_ID && !fresh {
        return Err(open_refused(
            StoreErrorKind::Corrupt,
            &name,
            format!(
                "the database belongs to another program (application id \
                 {application_id:#x}, schema version {user_version}, {objects} schema objects)"
            ),
        ));
    }
    let found = u32::try_from(user_version).unwrap_or(u32::MAX);
    if found > SCHEMA_VERSION {
        return Err(schema_too_new(&name, found));
    }

    if !options.read_only {
        if let Location::File(_) = location {
            let mode: String = conn
                .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
                .map_err(fail("switching to WAL mode"))?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(database = %name, %mode, "WAL mode is unavailable; readers and the writer will block each other");
            }
        }
        conn.pragma_update(None, "synchronous", options.synchronous.pragma_value())
            .map_err(fail("setting synchronous"))?;
        // The WAL is cut back to this size when it restarts after a complete checkpoint.
        conn.pragma_update(None, "journal_size_limit", options.wal_size_limit as i64)
            .map_err(fail("setting journal_size_limit"))?;
        if let Some(pages) = options.max_page_count {
            set_max_page_count(&conn, pages).map_err(fail("setting max_page_count"))?;
        }
    }

    if found < SCHEMA_VERSION {
        if options.read_only {
            return Err(open_refused(
                StoreErrorKind::ReadOnly,
                &name,
                format!(
                    "the schema is at version {found} and needs migrating to version \
                     {SCHEMA_VERSION}, which a read-only store cannot do"
                ),
            ));
        }
        migrate(&conn).map_err(fail("migrating the schema"))?;
        // Another process may have migrated further in between.
        let now: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(fail("reading the schema version"))?;
        let now = u32::try_from(now).unwrap_or(u32::MAX);
        if now > SCHEMA_VERSION {
            return Err(schema_too_new(&name, now));
        }
    }
    Ok(conn)
}

/// The error of a database whose schema version `found` is newer than this library's.
fn schema_too_new(name: &str, found: u32) -> Error {
    open_refused(
        StoreErrorKind::SchemaTooNew,
        name,
        format!(
            "the database has schema version {found}, newer than version {SCHEMA_VERSION} \
             known to this library"
        ),
    )
}

/// The write-ahead log of the database at `path`.
pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

/// Opens a read connection to a file database that [`open_writer`] has set up.
pub(crate) fn open_reader(path: &Path, options: &SqliteOptions) -> Result<Connection> {
    let name = path.display().to_string();
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| open_failed(&name, "opening a read connection", e))?;
    let checked = configure(&conn, options).and_then(|()| {
        if options.read_only {
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        }
        Ok(())
    });
    match checked {
        Ok(()) => Ok(conn),
        Err(e) if needs_immutable(path, options, &e) => open_immutable(path, options)
            .map_err(|e| open_failed(&name, "opening read-only media", e)),
        Err(e) => Err(open_failed(&name, "configuring a read connection", e)),
    }
}

/// True when a read-only open failed only because SQLite cannot create the `-shm` file
/// that a WAL database needs (read-only media) while the WAL holds nothing: the database
/// file is then complete, and opens as an immutable file.
fn needs_immutable(path: &Path, options: &SqliteOptions, error: &rusqlite::Error) -> bool {
    let wal_is_empty = std::fs::metadata(wal_path(path)).map_or(true, |m| m.len() == 0);
    options.read_only
        && wal_is_empty
        && matches!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
        )
}

/// Opens a database on read-only media as immutable (`?immutable=1`): no locks, no
/// `-shm`; nobody can change the file there.
fn open_immutable(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    let Some(text) = path.to_str() else {
        return Err(rusqlite::Error::InvalidPath(path.to_owned()));
    };
    let mut uri = String::from("file:");
    for c in text.chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(uri, flags)?;
    configure(&conn, options)?;
    tracing::info!(database = %path.display(), "opened a WAL database on read-only media as immutable");
    Ok(conn)
}

/// What every connection sets: the busy timeout, the page cache, the statement cache.
fn configure(conn: &Connection, options: &SqliteOptions) -> rusqlite::Result<()> {
    conn.busy_timeout(options.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // rusqlite clears a cached statement's bindings when it goes back to the cache, and
    // without the query planner stability guarantee SQLite then re-prepares the stream
    // queries (`WHERE aggregate_type = ?1 AND aggregate_id = ?2 ...`) on nearly every run:
    // 40% of the CPU of a command. Their plan never depends on the values bound.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // A negative cache_size is in KiB.
    conn.pragma_update(None, "cache_size", -i64::from(options.cache_size_kib))?;
    Ok(())
}

/// Sets the size cap of the writer connection; returns the cap in force (SQLite never
/// sets it below the current size).
pub(crate) fn set_max_page_count(conn: &Connection, pages: u64) -> rusqlite::Result<u64> {
    let pages = pages.min(i64::MAX as u64) as i64;
    let now: i64 = conn.pragma_update_and_check(None, "max_page_count", pages, |row| row.get(0))?;
    Ok(now.max(0) as u64)
}

/// Applies the pending migrations in one transaction.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let current: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let current = usize::try_from(current).unwrap_or(usize::MAX);
        if current >= MIGRATIONS.len() {
            return Ok(());
        }
        for (version, migration) in MIGRATIONS.iter().enumerate().skip(current) {
            tracing::info!(
                from = version,
                to = version + 1,
                "migrating the event store schema"
            );
            match migration {
                Migration::Sql(sql) => conn.execute_batch(sql)?,
                Migration::Code(code) => code(conn)?,
            }
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            Err(e)
        }
    }
}
