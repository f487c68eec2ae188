//! [`SqliteOptions`]: how a store opens its database and runs its writer.

use std::time::Duration;

use eventfold_core::{Error, Result};

/// How hard SQLite works to make each commit durable (`PRAGMA synchronous`).
///
/// The store always runs in WAL mode, where these mean:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// Never waits for the disk: the fastest. A crash of the process loses nothing, but an
    /// operating-system crash or a power loss may lose recent commits.
    Off,
    /// Waits for the disk only at WAL checkpoints: a crash of the process loses nothing; a
    /// power loss may lose the last commits but never corrupts the database.
    Normal,
    /// Waits for the WAL to reach the disk at every commit: an acknowledged append survives
    /// a power loss. The default.
    #[default]
    Full,
    /// Like [`Full`](Self::Full), and also syncs the directory when files are created or
    /// removed.
    Extra,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Off => "OFF",
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// Options of [`SqliteEventStore::open`](crate::SqliteEventStore::open).
///
/// Start from [`SqliteOptions::new`] (or `Default`) and change what you need; every setter
/// takes and returns the options. They are checked when the store opens.
///
/// ```
/// use std::time::Duration;
/// use eventfold_sqlite::{SqliteOptions, Synchronous};
///
/// let options = SqliteOptions::new()
///     .synchronous(Synchronous::Normal)
///     .busy_timeout(Duration::from_secs(2))
///     .read_connections(4);
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    pub(crate) synchronous: Synchronous,
    pub(crate) busy_timeout: Duration,
    pub(crate) read_connections: usize,
    pub(crate) max_batch_appends: usize,
    pub(crate) max_batch_events: usize,
    pub(crate) cache_size_kib: u32,
    pub(crate) read_only: bool,
    pub(crate) max_page_count: Option<u64>,
    pub(crate) wal_size_limit: u64,
    pub(crate) external_change_poll: Duration,
    pub(crate) idle_poll: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// The default of [`SqliteOptions::external_change_poll`].
const DEFAULT_EXTERNAL_CHANGE_POLL: Duration = Duration::from_millis(100);

/// The longest the idle writer polls for the next write by default (see
/// [`SqliteOptions::idle_poll`]).
const DEFAULT_IDLE_POLL: Duration = Duration::from_micros(500);

/// The longest [`SqliteOptions::idle_poll`] accepts.
const MAX_IDLE_POLL: Duration = Duration::from_millis(10);

/// The shortest poll interval [`SqliteOptions::external_change_poll`] accepts.
const MIN_EXTERNAL_CHANGE_POLL: Duration = Duration::from_millis(1);

/// The largest page count SQLite accepts for `PRAGMA max_page_count`.
const SQLITE_MAX_PAGE_COUNT: u64 = 4_294_967_294;

impl SqliteOptions {
    /// The defaults: [`Synchronous::Full`], a 5 s busy timeout, 2 read connections, group
    /// commits of at most 256 appends and 10,000 events, a 16 MiB page cache per
    /// connection, read-write, no size limit, a WAL kept to 64 MiB once no reader pins it,
    /// other writers' commits followed every 100 ms, an idle writer that polls for at most
    /// 500 µs before it sleeps.
    pub fn new() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            read_connections: 2,
            max_batch_appends: 256,
            max_batch_events: 10_000,
            cache_size_kib: 16 * 1024,
            read_only: false,
            max_page_count: None,
            wal_size_limit: 64 * 1024 * 1024,
            external_change_poll: DEFAULT_EXTERNAL_CHANGE_POLL,
            idle_poll: DEFAULT_IDLE_POLL,
        }
    }

    /// How durable each commit is (default [`Synchronous::Full`]).
    pub fn synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// How long an operation waits for a lock held by another connection or process before
    /// it fails with [`StoreErrorKind::Busy`](eventfold_core::StoreErrorKind::Busy)
    /// (default 5 s, at most `i32::MAX` milliseconds).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How many connections serve reads in parallel with the writer (default 2, at most
    /// 64). With 0, reads queue behind writes on the writer connection.
    ///
    /// An in-memory store always reads through its writer: it has no file to share.
    pub fn read_connections(mut self, connections: usize) -> Self {
        self.read_connections = connections;
        self
    }

    /// The most appends and other writes committed together in one transaction (group
    /// commit; default 256, at least 1). Every append keeps its own checks and result.
    pub fn max_batch_appends(mut self, appends: usize) -> Self {
        self.max_batch_appends = appends;
        self
    }

    /// The most events committed together in one transaction (default 10,000, at least 1).
    /// A single append larger than this is still committed whole, alone.
    pub fn max_batch_events(mut self, events: usize) -> Self {
        self.max_batch_events = events;
        self
    }

    /// The page cache of each connection, in KiB (default 16 MiB).
    pub fn cache_size_kib(mut self, kib: u32) -> Self {
        self.cache_size_kib = kib;
        self
    }

    /// Opens the database read-only (default false): reads work, every write fails with
    /// [`StoreErrorKind::ReadOnly`](eventfold_core::StoreErrorKind::ReadOnly). The database
    /// must exist and be at this library's schema version.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Caps the database at this many pages (`PRAGMA max_page_count`; a page is 4 KiB),
    /// so writes past it fail with [`StoreErrorKind::Full`](eventfold_core::StoreErrorKind::Full)
    /// and store nothing. Default: no cap but SQLite's own.
    ///
    /// The cap can be moved later with
    /// [`SqliteEventStore::set_max_page_count`](crate::SqliteEventStore::set_max_page_count).
    pub fn max_page_count(mut self, pages: u64) -> Self {
        self.max_page_count = Some(pages);
        self
    }

    /// The size, in bytes, the write-ahead log (the `-wal` file) returns to once no reader
    /// pins it (default 64 MiB; at most `i64::MAX`).
    ///
    /// SQLite copies the WAL into the database file at checkpoints (after every 1,000 pages
    /// or so) and then writes the WAL again from its start, so it normally stays a few MiB
    /// large. A checkpoint cannot go past the oldest read transaction still open, though,
    /// so while a reader holds one (another process's long query, a backup tool) the WAL
    /// grows with every commit. This limit brings it back: it is the store's
    /// `PRAGMA journal_size_limit` (a WAL restarted after a complete checkpoint is cut to
    /// it), and when the writer has nothing queued and the WAL is larger, the writer runs a
    /// checkpoint that copies what no reader pins and truncates the WAL, without waiting for
    /// any reader. [`SqliteEventStore::checkpoint`](crate::SqliteEventStore::checkpoint)
    /// runs one on demand.
    pub fn wal_size_limit(mut self, bytes: u64) -> Self {
        self.wal_size_limit = bytes;
        self
    }

    /// How long at most the writer thread, once it has answered every write, keeps looking
    /// for the next one before it sleeps (default 500 µs, at most 10 ms; `Duration::ZERO`:
    /// it sleeps at once).
    ///
    /// Waking a sleeping thread costs a futex call and a thread switch: 30 to 50 µs on the
    /// virtual machines this was measured on, paid by every append of a caller that
    /// appends in a loop. So the idle writer first polls its queue, yielding its CPU
    /// between looks (a process with other work to run loses nothing but the looks). How
    /// long it polls follows the gaps it sees: twice the last gap between an answer and
    /// the next write, up to this limit, and only 50 µs (or this limit, if lower) after a
    /// gap longer than the limit. A steady stream of appends is caught at once, and a
    /// writer that sees one write now and then spends 50 µs of CPU after each. On the
    /// perf report's `append_batch` (one caller, 100 events per append) the default took
    /// the ratio to the raw baseline from 0.76 to about 0.88 on one 2-vCPU machine.
    pub fn idle_poll(mut self, limit: Duration) -> Self {
        self.idle_poll = limit;
        self
    }

    /// How often the store checks the file for commits of other connections (other
    /// processes, other [`SqliteEventStore`](crate::SqliteEventStore)s on the same file)
    /// while someone watches the head (default 100 ms; at least 1 ms; `Duration::ZERO`
    /// turns it off).
    ///
    /// [`watch_head`](eventfold_core::EventLog::watch_head) sees this store's own appends
    /// at once. Another connection's appends are in every read at once, and reach the
    /// watch (so a bus's subscriptions) within this interval plus the time of one check:
    /// a `PRAGMA data_version` on a read connection of the poller's own, which reads
    /// SQLite's commit counter in the WAL index (shared memory) and touches no table; the
    /// head is read only when the counter moved. A check costs about 60 µs of CPU, most of
    /// it the hop to a blocking thread: 0.06% of a core at 100 ms. The poller runs only
    /// while a receiver of the watch lives (a running bus holds one), so a store nobody
    /// watches does no work, and the append path never waits for it. It stops at
    /// [`close`](crate::SqliteEventStore::close). An in-memory store has no other
    /// connection and never polls.
    pub fn external_change_poll(mut self, interval: Duration) -> Self {
        self.external_change_poll = interval;
        self
    }

    /// Fails with [`Error::InvalidSetting`] on the first option out of its range.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid =
            |setting: &'static str, reason: String| Err(Error::InvalidSetting { setting, reason });
        if self.busy_timeout.as_millis() > i32::MAX as u128 {
            return invalid(
                "busy_timeout",
                format!(
                    "{:?} is longer than SQLite's limit of {} ms",
                    self.busy_timeout,
                    i32::MAX
                ),
            );
        }
        if self.read_connections > 64 {
            return invalid(
                "read_connections",
                format!("{} is more than 64", self.read_connections),
            );
        }
        if self.wal_size_limit > i64::MAX as u64 {
            return invalid(
                "wal_size_limit",
                format!("{} is more than {}", self.wal_size_limit, i64::MAX),
            );
        }
        if self.idle_poll > MAX_IDLE_POLL {
            return invalid(
                "idle_poll",
                format!("{:?} is longer than {MAX_IDLE_POLL:?}", self.idle_poll),
            );
        }
        if !self.external_change_poll.is_zero()
            && self.external_change_poll < MIN_EXTERNAL_CHANGE_POLL
        {
            return invalid(
                "external_change_poll",
                format!(
                    "{:?} is shorter than {MIN_EXTERNAL_CHANGE_POLL:?} (Duration::ZERO turns polling off)",
                    self.external_change_poll
                ),
            );
        }
        if self.max_batch_appends == 0 {
            return invalid("max_batch_appends", "must be at least 1".into());
        }
        if self.max_batch_events == 0 {
            return invalid("max_batch_events", "must be at least 1".into());
        }
        if let Some(pages) = self.max_page_count
            && (pages == 0 || pages > SQLITE_MAX_PAGE_COUNT)
        {
            return invalid(
                "max_page_count",
                format!("{pages} is not between 1 and {SQLITE_MAX_PAGE_COUNT}"),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_durable() {
        let options = SqliteOptions::default();
        assert_eq!(options, SqliteOptions::new());
        assert_eq!(options.synchronous, Synchronous::Full);
        assert!(options.validate().is_ok());
        assert!(
            SqliteOptions::new()
                .external_change_poll(Duration::ZERO)
                .idle_poll(Duration::ZERO)
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn out_of_range_options_are_refused_by_name() {
        let cases = [
            (
                SqliteOptions::new().max_batch_appends(0),
                "max_batch_appends",
            ),
            (SqliteOptions::new().max_batch_events(0), "max_batch_events"),
            (
                SqliteOptions::new().read_connections(65),
                "read_connections",
            ),
            (SqliteOptions::new().max_page_count(0), "max_page_count"),
            (
                SqliteOptions::new().wal_size_limit(u64::MAX),
                "wal_size_limit",
            ),
            (
                SqliteOptions::new().external_change_poll(Duration::from_micros(10)),
                "external_change_poll",
            ),
            (
                SqliteOptions::new().idle_poll(Duration::from_millis(11)),
                "idle_poll",
            ),
            (
                SqliteOptions::new().busy_timeout(Duration::from_secs(u64::MAX / 2)),
                "busy_timeout",
            ),
        ];
        for (options, name) in cases {
            match options.validate() {
                Err(Error::InvalidSetting { setting, .. }) => assert_eq!(setting, name),
                other => panic!("expected an invalid {name}, got {other:?}"),
            }
        }
    }
}
