//! [`EventSystem`]: a store and a running bus on it, set up and shut down in one call; and
//! [`StoreUrl`], where the store is.

use std::fmt;
#[cfg(feature = "sqlite")]
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use eventfold_core::{
    Aggregate, Error, EventBus, EventBusBuilder, EventStore, InMemoryEventStore, IntoStore,
    Repository, Result, StopReport, registry,
};
#[cfg(feature = "postgres")]
use eventfold_postgres::{PostgresEventStore, PostgresOptions};
#[cfg(feature = "sqlite")]
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

/// Where a store is, as a URL: what [`EventSystem::open_url`] opens.
///
/// | URL | store |
/// |---|---|
/// | `sqlite://events.db`, `sqlite:events.db` | the SQLite file `events.db`, relative to the working directory |
/// | `sqlite:///var/lib/app/events.db` | the SQLite file at that absolute path |
/// | `sqlite::memory:` | a SQLite database in memory, gone when the system shuts down |
/// | `memory:` | an [`InMemoryEventStore`] |
/// | `postgres://user@host:5432/db`, `postgresql://...` | a PostgreSQL database (feature `postgres`) |
///
/// The scheme is case-insensitive; `%` escapes in a path are decoded (`%20` is a space).
/// A scheme no backend of this build opens is [`Error::UnknownStoreScheme`], a URL that is
/// not of these forms [`Error::InvalidStoreUrl`]. Store settings are not part of the URL:
/// set them with [`EventSystemBuilder::store_options`] (SQLite) or
/// `EventSystemBuilder::postgres_options` (PostgreSQL: schema, pool size, timeouts; the
/// URL is the connection string, passed to the server as it is).
///
/// ```
/// use eventfold::StoreUrl;
///
/// let url: StoreUrl = "sqlite:///var/lib/app/events.db".parse()?;
/// assert_eq!(url, StoreUrl::Sqlite("/var/lib/app/events.db".into()));
/// assert_eq!(url.to_string(), "sqlite:///var/lib/app/events.db");
/// assert!(matches!(
///     "mysql://db".parse::<StoreUrl>(),
///     Err(eventfold::Error::UnknownStoreScheme { .. })
/// ));
/// # Ok::<(), eventfold::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// A SQLite file, created if missing (`sqlite://path`, `sqlite:path`).
    #[cfg(feature = "sqlite")]
    Sqlite(PathBuf),
    /// A SQLite database in memory (`sqlite::memory:`).
    #[cfg(feature = "sqlite")]
    SqliteMemory,
    /// The in-memory store (`memory:`).
    Memory,
    /// A PostgreSQL database (`postgres://...`, `postgresql://...`): the whole URL is the
    /// connection string. Shown with its password hidden.
    #[cfg(feature = "postgres")]
    Postgres(String),
}

/// The schemes [`StoreUrl`] knows, for [`Error::UnknownStoreScheme`]'s message.
const KNOWN_SCHEMES: &str = match (cfg!(feature = "sqlite"), cfg!(feature = "postgres")) {
    (true, true) => "sqlite:, postgres:, memory:",
    (true, false) => "sqlite:, memory:",
    (false, true) => "postgres:, memory:",
    (false, false) => "memory:",
};

impl FromStr for StoreUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        let malformed = |reason: &str| Error::InvalidStoreUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(malformed(
                "no scheme; write `sqlite://path/to.db`, `sqlite::memory:` or `memory:`",
            ));
        };
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        {
            return Err(malformed(
                "the scheme before `:` must be letters and digits, as in `sqlite://path/to.db`",
            ));
        }
        // One arm per backend: a new backend adds its scheme here.
        match scheme.to_ascii_lowercase().as_str() {
            #[cfg(feature = "sqlite")]
            "sqlite" => parse_sqlite(rest).map_err(|reason| malformed(&reason)),
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => match rest.strip_prefix("//") {
                Some(after) if !after.is_empty() => Ok(StoreUrl::Postgres(url.to_owned())),
                _ => Err(malformed(
                    "a PostgreSQL URL names its server: `postgres://user@host:5432/database`",
                )),
            },
            "memory" => match rest {
                "" | "//" => Ok(StoreUrl::Memory),
                _ => Err(malformed(
                    "the in-memory store takes nothing after `memory:`",
                )),
            },
            _ => Err(Error::UnknownStoreScheme {
                url: url.to_owned(),
                scheme: scheme.to_owned(),
                known: KNOWN_SCHEMES,
            }),
        }
    }
}

/// The store of a `sqlite:` URL, from what follows the scheme's `:`.
#[cfg(feature = "sqlite")]
fn parse_sqlite(rest: &str) -> std::result::Result<StoreUrl, String> {
    if rest == ":memory:" {
        return Ok(StoreUrl::SqliteMemory);
    }
    if rest.contains(['?', '#']) {
        return Err("a query or fragment is not taken; set store options with \
                    `EventSystem::builder_url(..)?.store_options(..)`"
            .to_owned());
    }
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if path.is_empty() {
        return Err("no path; write `sqlite://path/to.db` or `sqlite:///absolute/path.db`".into());
    }
    Ok(StoreUrl::Sqlite(PathBuf::from(percent_decode(path)?)))
}

/// Decodes `%XX` escapes into the bytes they stand for.
#[cfg(feature = "sqlite")]
fn percent_decode(text: &str) -> std::result::Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let escape = bytes
                .get(i + 1..i + 3)
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| format!("`%` at byte {i} is not followed by two hex digits"))?;
            decoded.push(escape);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "the decoded path is not UTF-8".to_owned())
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            #[cfg(feature = "sqlite")]
            StoreUrl::SqliteMemory => f.write_str("SqliteMemory"),
            StoreUrl::Memory => f.write_str("Memory"),
            // The connection string may carry a password: shown as Display shows it.
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(_) => f.debug_tuple("Postgres").field(&self.to_string()).finish(),
        }
    }
}

impl fmt::Display for StoreUrl {
    /// The URL's canonical form, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(feature = "sqlite")]
            StoreUrl::Sqlite(path) => {
                f.write_str("sqlite://")?;
                for c in path.to_string_lossy().chars() {
                    match c {
                        '%' | '?' | '#' => write!(f, "%{:02X}", c as u32)?,
                        c => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
            #[cfg(feature = "sqlite")]
            StoreUrl::SqliteMemory => f.write_str("sqlite::memory:"),
            StoreUrl::Memory => f.write_str("memory:"),
            #[cfg(feature = "postgres")]
            StoreUrl::Postgres(url) => {
                f.write_str(&PostgresOptions::new(url.as_str()).redacted_url())
            }
        }
    }
}

/// A store and an event bus on it, for the common case of one process with one store.
///
/// [`open`](Self::open) opens (or creates) a SQLite database file, [`open_url`](Self::open_url)
/// the store a [`StoreUrl`] names, [`with_store`](Self::with_store) runs on a store you
/// opened yourself. Each validates the event registry and starts a durable bus on the
/// store; [`shutdown`](Self::shutdown) stops the bus, saves its checkpoints and closes the
/// store.
///
/// ```
/// use eventfold::prelude::*;
/// use eventfold::EventSystem;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # #[domain_event(aggregate = "Order")]
/// # enum OrderEvent { Placed { #[domain_event(aggregate_id)] id: String } }
///
/// # #[tokio::main]
/// # async fn main() -> eventfold::Result<()> {
/// # let dir = std::env::temp_dir().join(format!("eventfold-doc-{}", std::process::id()));
/// # std::fs::create_dir_all(&dir).unwrap();
/// let system = EventSystem::open(dir.join("orders.db")).await?;
/// system
///     .bus()
///     .subscribe::<OrderEvent, _>("audit", |d| async move {
///         println!("{} at position {}", d.record().event_type, d.record().position);
///     })
///     .register()?;
/// system.bus().publish(OrderEvent::Placed { id: "o-1".into() }).await?;
/// system.bus().wait_idle().await?;
/// system.shutdown().await?;
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EventSystem {
    store: Arc<dyn EventStore>,
    opened: Opened,
    bus: EventBus,
}

impl fmt::Debug for EventSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSystem")
            .field("store", &self.opened)
            .field("bus", &self.bus)
            .finish()
    }
}

/// The store as its own type, for what only it does: closing a SQLite file.
#[derive(Debug, Clone)]
enum Opened {
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteEventStore),
    #[cfg(feature = "postgres")]
    Postgres(PostgresEventStore),
    /// A store that needs no closing (the in-memory store), or one the caller opened and
    /// closes.
    Other,
}

/// Where an [`EventSystemBuilder`] gets its store.
enum Source {
    Url(StoreUrl),
    Store(Arc<dyn EventStore>),
}

/// Settings of an [`EventSystem`] before it opens.
#[must_use = "call open() to start the system"]
pub struct EventSystemBuilder {
    source: Source,
    #[cfg(feature = "sqlite")]
    options: SqliteOptions,
    #[cfg(feature = "postgres")]
    postgres: Box<dyn FnOnce(PostgresOptions) -> PostgresOptions + Send>,
    bus: EventBusBuilder,
}

impl EventSystemBuilder {
    fn new(source: Source) -> Self {
        EventSystemBuilder {
            source,
            #[cfg(feature = "sqlite")]
            options: SqliteOptions::new(),
            #[cfg(feature = "postgres")]
            postgres: Box::new(|options| options),
            bus: EventBus::builder(),
        }
    }

    /// The SQLite store's options (default: [`SqliteOptions::new`]), used when the store
    /// is a SQLite one the system opens.
    #[cfg(feature = "sqlite")]
    pub fn store_options(mut self, options: SqliteOptions) -> Self {
        self.options = options;
        self
    }

    /// Adjusts the PostgreSQL store's options (schema, pool size, statement timeout,
    /// notifications), used when the store is a PostgreSQL one the system opens from its
    /// URL: `configure` gets [`PostgresOptions::new`] of that URL.
    #[cfg(feature = "postgres")]
    pub fn postgres_options(
        mut self,
        configure: impl FnOnce(PostgresOptions) -> PostgresOptions + Send + 'static,
    ) -> Self {
        self.postgres = Box::new(configure);
        self
    }

    /// Adjusts the bus (workers, queue capacity, batch size, stop timeout, clock); the
    /// store is set by the system.
    pub fn bus(mut self, configure: impl FnOnce(EventBusBuilder) -> EventBusBuilder) -> Self {
        self.bus = configure(self.bus);
        self
    }

    /// Validates the registry, opens the store and starts the bus.
    pub async fn open(self) -> Result<EventSystem> {
        registry().validate()?;
        let (store, opened) = match self.source {
            Source::Store(store) => (store, Opened::Other),
            #[cfg(feature = "sqlite")]
            Source::Url(StoreUrl::Sqlite(path)) => {
                sqlite(SqliteEventStore::open(&path, self.options).await?)
            }
            #[cfg(feature = "sqlite")]
            Source::Url(StoreUrl::SqliteMemory) => {
                sqlite(SqliteEventStore::open_in_memory(self.options).await?)
            }
            Source::Url(StoreUrl::Memory) => {
                (InMemoryEventStore::new().into_store(), Opened::Other)
            }
            #[cfg(feature = "postgres")]
            Source::Url(StoreUrl::Postgres(url)) => {
                let store =
                    PostgresEventStore::open((self.postgres)(PostgresOptions::new(url))).await?;
                (store.clone().into_store(), Opened::Postgres(store))
            }
        };
        let bus = self.bus.store(Arc::clone(&store)).build()?;
        bus.start().await?;
        Ok(EventSystem { store, opened, bus })
    }
}

#[cfg(feature = "sqlite")]
fn sqlite(store: SqliteEventStore) -> (Arc<dyn EventStore>, Opened) {
    (store.clone().into_store(), Opened::Sqlite(store))
}

impl EventSystem {
    /// Settings for a system on the SQLite database at `path`.
    #[cfg(feature = "sqlite")]
    pub fn builder(path: impl AsRef<Path>) -> EventSystemBuilder {
        EventSystemBuilder::new(Source::Url(StoreUrl::Sqlite(path.as_ref().to_path_buf())))
    }

    /// Opens the SQLite database at `path` (creating it if missing) with the default
    /// settings, and starts the bus on it.
    #[cfg(feature = "sqlite")]
    pub async fn open(path: impl AsRef<Path>) -> Result<EventSystem> {
        Self::builder(path).open().await
    }

    /// Settings for a system on the store `url` names (see [`StoreUrl`]); fails at once
    /// if the URL is malformed or its scheme unknown.
    pub fn builder_url(url: &str) -> Result<EventSystemBuilder> {
        Ok(EventSystemBuilder::new(Source::Url(url.parse()?)))
    }

    /// Opens the store `url` names (see [`StoreUrl`]) with the default settings, and
    /// starts the bus on it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> eventfold::Result<()> {
    /// let system = eventfold::EventSystem::open_url("sqlite::memory:").await?;
    /// system.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn open_url(url: &str) -> Result<EventSystem> {
        Self::builder_url(url)?.open().await
    }

    /// Settings for a system on a store you opened yourself: a store handle, an `Arc` of
    /// one or an `Arc<dyn EventStore>` (see [`IntoStore`]). [`shutdown`](Self::shutdown)
    /// stops the bus and leaves closing the store to you.
    pub fn with_store(store: impl IntoStore) -> EventSystemBuilder {
        EventSystemBuilder::new(Source::Store(store.into_store()))
    }

    /// The store, whichever backend it is.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The SQLite store, if the system opened one, for what only it does (`backup`,
    /// `verify`, `checkpoint`).
    #[cfg(feature = "sqlite")]
    pub fn sqlite_store(&self) -> Option<&SqliteEventStore> {
        match &self.opened {
            Opened::Sqlite(store) => Some(store),
            _ => None,
        }
    }

    /// The PostgreSQL store, if the system opened one, for what only it does.
    #[cfg(feature = "postgres")]
    pub fn postgres_store(&self) -> Option<&PostgresEventStore> {
        match &self.opened {
            Opened::Postgres(store) => Some(store),
            _ => None,
        }
    }

    /// The bus: subscribe to it and publish on it.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// A repository of aggregates of type `A` on the store; what it appends reaches the
    /// bus's subscribers.
    pub fn repository<A: Aggregate>(&self) -> Repository<A> {
        Repository::new(Arc::clone(&self.store))
    }

    /// Stops the bus (draining in-flight work, saving checkpoints) and closes the store
    /// if the system opened it.
    pub async fn shutdown(self) -> Result<StopReport> {
        let report = self.bus.stop().await?;
        match self.opened {
            #[cfg(feature = "sqlite")]
            Opened::Sqlite(store) => store.close().await?,
            #[cfg(feature = "postgres")]
            Opened::Postgres(store) => store.close().await?,
            Opened::Other => {}
        }
        Ok(report)
    }
}
