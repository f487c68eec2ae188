//! [`EventSystem`]: a SQLite store and a running bus on it, set up and shut down in one call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use eventfold_core::{
    Aggregate, EventBus, EventBusBuilder, EventStore, Repository, Result, StopReport, registry,
};
use eventfold_sqlite::{SqliteEventStore, SqliteOptions};

/// A SQLite event store and an event bus on it, for the common case of one process with
/// one database file.
///
/// [`open`](Self::open) opens (or creates) the database, validates the event registry,
/// and starts a durable bus on the store; [`shutdown`](Self::shutdown) stops the bus,
/// saves its checkpoints and closes the database.
///
/// ```
/// use eventfold::prelude::*;
/// use eventfold::{Delivery, EventSystem};
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
///     .subscribe("audit", |d: Delivery<OrderEvent>| async move {
///         println!("{} at position {}", d.record().event_type, d.record().position);
///         Ok::<_, std::convert::Infallible>(())
///     })
///     .register()?;
/// system.bus().publish(OrderEvent::Placed { id: "o-1".into() }).await?;
/// system.bus().wait_idle().await?;
/// system.shutdown().await?;
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct EventSystem {
    store: Arc<SqliteEventStore>,
    bus: EventBus,
}

/// Settings of an [`EventSystem`] before it opens.
#[must_use = "call open() to start the system"]
pub struct EventSystemBuilder {
    path: PathBuf,
    options: SqliteOptions,
    bus: EventBusBuilder,
}

impl EventSystemBuilder {
    /// The SQLite store's options (default: [`SqliteOptions::new`]).
    pub fn store_options(mut self, options: SqliteOptions) -> Self {
        self.options = options;
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
        let store = Arc::new(SqliteEventStore::open(&self.path, self.options).await?);
        let bus = self
            .bus
            .store(Arc::clone(&store) as Arc<dyn EventStore>)
            .build()?;
        bus.start().await?;
        Ok(EventSystem { store, bus })
    }
}

impl EventSystem {
    /// Settings for a system on the database at `path`.
    pub fn builder(path: impl AsRef<Path>) -> EventSystemBuilder {
        EventSystemBuilder {
            path: path.as_ref().to_path_buf(),
            options: SqliteOptions::new(),
            bus: EventBus::builder(),
        }
    }

    /// Opens the database at `path` (creating it if missing) with the default settings,
    /// and starts the bus on it.
    pub async fn open(path: impl AsRef<Path>) -> Result<EventSystem> {
        Self::builder(path).open().await
    }

    /// The store.
    pub fn store(&self) -> &Arc<SqliteEventStore> {
        &self.store
    }

    /// The bus: subscribe to it and publish on it.
    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// A repository of aggregates of type `A` on the store; what it appends reaches the
    /// bus's subscribers.
    pub fn repository<A: Aggregate>(&self) -> Repository<A> {
        Repository::new(Arc::clone(&self.store) as Arc<dyn EventStore>)
    }

    /// Stops the bus (draining in-flight work, saving checkpoints) and closes the store.
    pub async fn shutdown(self) -> Result<StopReport> {
        let report = self.bus.stop().await?;
        self.store.close().await?;
        Ok(report)
    }
}
