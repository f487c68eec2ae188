//! [`PostgresOptions`]: where the store's database is and how the store uses it.

use std::time::Duration;

use eventfold_core::{Error, Result};

/// The connection string the options start from: the local server's `test` database as
/// the `postgres` user.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Options of [`PostgresEventStore::open`](crate::PostgresEventStore::open).
///
/// Start from [`PostgresOptions::new`] with a connection string and change what you need;
/// every setter takes and returns the options. They are checked when the store opens.
///
/// ```
/// use std::time::Duration;
/// use eventfold_postgres::PostgresOptions;
///
/// let options = PostgresOptions::new("postgres://app@db.internal/orders")
///     .schema("tenant_42")
///     .pool_size(8)
///     .statement_timeout(Duration::from_secs(5));
/// # let _ = options;
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    pub(crate) url: String,
    pub(crate) pool_size: usize,
    pub(crate) schema: String,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) notify: bool,
    pub(crate) poll_interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_batch_appends: usize,
    pub(crate) max_batch_events: usize,
}

impl std::fmt::Debug for PostgresOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string may carry a password: only its shape is shown.
        f.debug_struct("PostgresOptions")
            .field("url", &redact(&self.url))
            .field("pool_size", &self.pool_size)
            .field("schema", &self.schema)
            .field("statement_timeout", &self.statement_timeout)
            .field("notify", &self.notify)
            .field("poll_interval", &self.poll_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_batch_appends", &self.max_batch_appends)
            .field("max_batch_events", &self.max_batch_events)
            .finish()
    }
}

/// A connection string without its password (`postgres://user:***@host/db`).
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self::new(DEFAULT_URL)
    }
}

/// The longest schema name the store takes: its NOTIFY channel (`ef_events_<schema>`)
/// must stay within PostgreSQL's 63-byte identifiers.
const MAX_SCHEMA_LEN: usize = 48;

impl PostgresOptions {
    /// Options for the database at `url`, a libpq connection string
    /// (`postgres://user:password@host:port/database` or `host=... user=...`), with the
    /// defaults: a pool of 4 read connections (plus the writer's and the listener's), the
    /// schema `eventfold`, no statement timeout, NOTIFY on, a 1 s poll of the head,
    /// a 10 s connect timeout, group commits of at most 256 appends and 10,000 events.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            pool_size: 4,
            schema: "eventfold".to_owned(),
            statement_timeout: None,
            notify: true,
            poll_interval: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(10),
            max_batch_appends: 256,
            max_batch_events: 10_000,
        }
    }

    /// How many pooled connections serve reads and the writes other than appends
    /// (default 4, from 1 to 256). Appends go through the writer's own connection, and
    /// segment-lease work and the listener's polls of the head through two sessions of their
    /// own, opened on first use; the listener holds one more while notifications are on. A store uses at most
    /// `connections + 4` sessions of the server.
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections;
        self
    }

    /// The schema that holds the store's tables and function (default `eventfold`),
    /// created at open if missing, so several applications or tenants share a database,
    /// each in its own schema. Lower-case ASCII letters, digits and `_`, starting with a
    /// letter or `_`, at most 48 bytes.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Cancels any statement of the store's connections that runs longer
    /// (PostgreSQL's `statement_timeout`, and `lock_timeout` on the writer), failing it
    /// with [`StoreErrorKind::Timeout`](eventfold_core::StoreErrorKind::Timeout). Default:
    /// none (the server's setting). At least 1 ms.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Whether each commit sends a NOTIFY with the new head, so that other processes'
    /// stores wake their subscribers at once (default true). Off, they notice appends at
    /// their next poll ([`poll_interval`](Self::poll_interval)): for shared clusters where
    /// NOTIFY traffic is unwelcome.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// How often the store reads the head of the log to catch other processes' appends
    /// that no notification announced (notifications are lost while disconnected, or
    /// turned off). Default 1 s, at least 1 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long opening a connection may take before it fails (default 10 s, at least 1 ms).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The most appends the writer commits in one server call (group commit; default 256,
    /// at least 1). Every append keeps its own checks and result.
    pub fn max_batch_appends(mut self, appends: usize) -> Self {
        self.max_batch_appends = appends;
        self
    }

    /// The most events the writer commits in one server call (default 10,000, at least 1).
    /// A single append larger than this is still committed whole, alone.
    pub fn max_batch_events(mut self, events: usize) -> Self {
        self.max_batch_events = events;
        self
    }

    /// The schema the store uses.
    pub fn schema_name(&self) -> &str {
        &self.schema
    }

    /// The connection string with its password hidden (`postgres://user:***@host/db`),
    /// for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Fails with [`Error::InvalidSetting`] on the first option out of its range.
    pub(crate) fn validate(&self) -> Result<()> {
        let invalid =
            |setting: &'static str, reason: String| Err(Error::InvalidSetting { setting, reason });
        if self.pool_size == 0 || self.pool_size > 256 {
            return invalid(
                "pool_size",
                format!("{} is not between 1 and 256", self.pool_size),
            );
        }
        let schema = self.schema.as_bytes();
        let simple = matches!(schema.first(), Some(b'a'..=b'z' | b'_'))
            && schema
                .iter()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
        if !simple || schema.len() > MAX_SCHEMA_LEN || self.schema.starts_with("pg_") {
            return invalid(
                "schema",
                format!(
                    "`{}` is not a schema name the store takes: lower-case ASCII letters, \
                     digits and `_`, starting with a letter or `_`, not `pg_`, at most \
                     {MAX_SCHEMA_LEN} bytes",
                    self.schema
                ),
            );
        }
        let at_least_a_millisecond = |setting, value: Duration| {
            if value < Duration::from_millis(1) || value.as_millis() > i32::MAX as u128 {
                invalid(
                    setting,
                    format!("{value:?} is not between 1 ms and {} ms", i32::MAX),
                )
            } else {
                Ok(())
            }
        };
        if let Some(timeout) = self.statement_timeout {
            at_least_a_millisecond("statement_timeout", timeout)?;
        }
        at_least_a_millisecond("poll_interval", self.poll_interval)?;
        at_least_a_millisecond("connect_timeout", self.connect_timeout)?;
        if self.max_batch_appends == 0 {
            return invalid("max_batch_appends", "must be at least 1".into());
        }
        if self.max_batch_events == 0 {
            return invalid("max_batch_events", "must be at least 1".into());
        }
        Ok(())
    }

    /// The driver's configuration: the connection string, with the store's schema first
    /// on the search path and the timeouts as session settings.
    pub(crate) fn config(&self, writer: bool) -> Result<tokio_postgres::Config> {
        let mut config: tokio_postgres::Config =
            self.url.parse().map_err(|e| Error::InvalidSetting {
                setting: "url",
                reason: format!("`{}` is not a connection string: {e}", redact(&self.url)),
            })?;
        let mut settings = format!("-c search_path={}", self.schema);
        if let Some(timeout) = self.statement_timeout {
            settings.push_str(&format!(" -c statement_timeout={}", timeout.as_millis()));
            if writer {
                settings.push_str(&format!(" -c lock_timeout={}", timeout.as_millis()));
            }
        }
        if let Some(given) = config.get_options() {
            settings = format!("{given} {settings}");
        }
        config.options(&settings);
        config.connect_timeout(self.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("eventfold");
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let options = PostgresOptions::default();
        assert_eq!(options.schema_name(), "eventfold");
        assert!(options.validate().is_ok());
        assert!(options.config(true).is_ok());
    }

    #[test]
    fn out_of_range_options_are_refused_by_name() {
        let cases = [
            (PostgresOptions::default().pool_size(0), "pool_size"),
            (PostgresOptions::default().schema("Tenant"), "schema"),
            (PostgresOptions::default().schema("a;drop"), "schema"),
            (PostgresOptions::default().schema("pg_temp"), "schema"),
            (PostgresOptions::default().schema("x".repeat(49)), "schema"),
            (
                PostgresOptions::default().statement_timeout(Duration::ZERO),
                "statement_timeout",
            ),
            (
                PostgresOptions::default().poll_interval(Duration::ZERO),
                "poll_interval",
            ),
            (
                PostgresOptions::default().max_batch_appends(0),
                "max_batch_appends",
            ),
            (
                PostgresOptions::default().max_batch_events(0),
                "max_batch_events",
            ),
        ];
        for (options, name) in cases {
            match options.validate() {
                Err(Error::InvalidSetting { setting, .. }) => assert_eq!(setting, name),
                other => panic!("expected an invalid {name}, got {other:?}"),
            }
        }
        match PostgresOptions::new("postgres://[bad").config(false) {
            Err(Error::InvalidSetting { setting, .. }) => assert_eq!(setting, "url"),
            other => panic!("expected an invalid url, got {other:?}"),
        }
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let options = PostgresOptions::new("postgres://app:secret@db/orders");
        let shown = format!("{options:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("app:***@db/orders"), "{shown}");
    }
}
