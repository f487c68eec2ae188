//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: counters, gauges and
//! histograms of the stores, repositories and the bus, named after Prometheus'
//! conventions (`_total` counters, base units in the name).
//!
//! eventfold installs no recorder and forces no exporter: without one every metric is a
//! no-op. An application installs the recorder of its choice (say
//! `metrics-exporter-prometheus`) **before** it opens its store and builds its bus:
//! stores, repositories and subscriptions take their metric handles when they are
//! created, so a recorder installed later sees only what is created after it.
//! `examples/metrics.rs` serves them to Prometheus.
//!
//! [`METRICS`] lists every metric with its kind, labels and meaning, and [`describe`]
//! hands those descriptions to the recorder (Prometheus shows them as `# HELP`).
//!
//! ```
//! // With no recorder installed, describing is a no-op, as is every metric.
//! eventfold_core::metrics::describe();
//! assert!(eventfold_core::metrics::METRICS
//!     .iter()
//!     .all(|m| m.name.starts_with("eventfold_")));
//! ```
//!
//! Handler latency is not a metric: a histogram sample per delivery cost the in-memory
//! bus 13% of its throughput with the Prometheus recorder, against 5% allowed for all
//! metrics; the bus keeps its own latency histogram (p50 and p99 in
//! [`SubscriptionStatistics`](crate::SubscriptionStatistics)).
//!
//! The two per-event bus counters, [`BUS_PUBLISHED`] and the handled outcome of
//! [`DELIVERIES`], are not touched per event either: an increment of a recorder's counter
//! is shared by every worker thread, and those increments alone cost the in-memory bus
//! about 6%. The bus counts them in its own statistics anyway, and hands the recorder what
//! they grew by about once a second, when it goes idle
//! ([`wait_idle`](crate::EventBus::wait_idle)), when its statistics are read, and when it
//! stops. A scrape may so see them up to a second late; every other metric is recorded
//! when it happens.
//!
//! Spans: `tracing` spans `eventfold.append` (a store's append), `eventfold.load` and
//! `eventfold.execute` (a repository's load and command) and `eventfold.deliver` (one
//! attempt of one delivery), at debug level; a disabled span costs next to nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit};

/// What a metric measures over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// A value that moves both ways.
    Gauge,
    /// A distribution of observed values.
    Histogram,
}

/// One metric eventfold records.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Metric {
    /// Its name, as the recorder exports it.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The labels it carries.
    pub labels: &'static [&'static str],
    /// What it measures (the `# HELP` text).
    pub help: &'static str,
}

const fn metric(
    name: &'static str,
    kind: MetricKind,
    labels: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        labels,
        help,
    }
}

/// Group commits of a store (one transaction, or one server call, per group).
pub const STORE_COMMITS: &str = "eventfold_store_commits_total";
/// Group commits that failed (every write of the group got the error).
pub const STORE_FAILED_COMMITS: &str = "eventfold_store_failed_commits_total";
/// Appends a store stored (an append is one stream's events of one request).
pub const STORE_APPENDS: &str = "eventfold_store_appends_total";
/// Events a store stored.
pub const STORE_EVENTS: &str = "eventfold_store_appended_events_total";
/// Events per group commit.
pub const STORE_EVENTS_PER_COMMIT: &str = "eventfold_store_events_per_commit";
/// How long a group commit took, from its first write to its answers.
pub const STORE_COMMIT_SECONDS: &str = "eventfold_store_commit_duration_seconds";
/// How long a repository's load took (snapshot, replay and fold).
pub const LOAD_SECONDS: &str = "eventfold_load_duration_seconds";
/// Events a repository's loads replayed.
pub const REPLAYED_EVENTS: &str = "eventfold_replayed_events_total";
/// Commands a repository ran, by outcome.
pub const COMMANDS: &str = "eventfold_commands_total";
/// How long a command took: load, decide, append, and any retries.
pub const COMMAND_SECONDS: &str = "eventfold_command_duration_seconds";
/// Commands decided again after a version conflict.
pub const COMMAND_RETRIES: &str = "eventfold_command_retries_total";
/// Events published on a bus.
pub const BUS_PUBLISHED: &str = "eventfold_bus_published_events_total";
/// Workers of a bus restarted after their task ended unexpectedly.
pub const BUS_WORKER_RESTARTS: &str = "eventfold_bus_worker_restarts_total";
/// Attempts to deliver an event to a subscription, by outcome.
pub const DELIVERIES: &str = "eventfold_deliveries_total";
/// Attempts scheduled again after a failure.
pub const DELIVERY_RETRIES: &str = "eventfold_delivery_retries_total";
/// Events that became dead letters.
pub const DEAD_LETTERS: &str = "eventfold_dead_letters_total";
/// Stored events a subscription passed over by its unknown-event policy.
pub const SKIPPED_EVENTS: &str = "eventfold_skipped_events_total";
/// A subscription's saved checkpoint (its lowest segment's, when segmented).
pub const SUBSCRIPTION_CHECKPOINT: &str = "eventfold_subscription_checkpoint_position";
/// Events of the log after a subscription's saved checkpoint, as of that save.
pub const SUBSCRIPTION_LAG: &str = "eventfold_subscription_lag_events";

/// Every metric eventfold records.
pub const METRICS: &[Metric] = &[
    metric(
        STORE_COMMITS,
        MetricKind::Counter,
        &["store"],
        "Group commits of a store",
    ),
    metric(
        STORE_FAILED_COMMITS,
        MetricKind::Counter,
        &["store"],
        "Group commits that failed",
    ),
    metric(
        STORE_APPENDS,
        MetricKind::Counter,
        &["store"],
        "Appends stored",
    ),
    metric(
        STORE_EVENTS,
        MetricKind::Counter,
        &["store"],
        "Events stored",
    ),
    metric(
        STORE_EVENTS_PER_COMMIT,
        MetricKind::Histogram,
        &["store"],
        "Events per group commit",
    ),
    metric(
        STORE_COMMIT_SECONDS,
        MetricKind::Histogram,
        &["store"],
        "Duration of a group commit",
    ),
    metric(
        LOAD_SECONDS,
        MetricKind::Histogram,
        &["aggregate_type"],
        "Duration of a repository load",
    ),
    metric(
        REPLAYED_EVENTS,
        MetricKind::Counter,
        &["aggregate_type"],
        "Events replayed by repository loads",
    ),
    metric(
        COMMANDS,
        MetricKind::Counter,
        &["aggregate_type", "outcome"],
        "Commands run, by outcome (committed, unchanged, rejected, conflict, failed)",
    ),
    metric(
        COMMAND_SECONDS,
        MetricKind::Histogram,
        &["aggregate_type"],
        "Duration of a command, retries included",
    ),
    metric(
        COMMAND_RETRIES,
        MetricKind::Counter,
        &["aggregate_type"],
        "Commands decided again after a version conflict",
    ),
    metric(
        BUS_PUBLISHED,
        MetricKind::Counter,
        &[],
        "Events published on a bus",
    ),
    metric(
        BUS_WORKER_RESTARTS,
        MetricKind::Counter,
        &[],
        "Bus workers restarted",
    ),
    metric(
        DELIVERIES,
        MetricKind::Counter,
        &["subscription", "outcome"],
        "Delivery attempts, by outcome (handled, failed)",
    ),
    metric(
        DELIVERY_RETRIES,
        MetricKind::Counter,
        &["subscription"],
        "Delivery attempts scheduled again after a failure",
    ),
    metric(
        DEAD_LETTERS,
        MetricKind::Counter,
        &["subscription"],
        "Events that became dead letters",
    ),
    metric(
        SKIPPED_EVENTS,
        MetricKind::Counter,
        &["subscription"],
        "Stored events passed over by the unknown-event policy",
    ),
    metric(
        SUBSCRIPTION_CHECKPOINT,
        MetricKind::Gauge,
        &["subscription"],
        "Saved checkpoint position of a subscription",
    ),
    metric(
        SUBSCRIPTION_LAG,
        MetricKind::Gauge,
        &["subscription"],
        "Events after the saved checkpoint, as of the save",
    ),
];

/// Hands every metric's description and unit to the installed recorder. Call it once
/// after installing the recorder; without one it does nothing.
pub fn describe() {
    for m in METRICS {
        let unit = if m.name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else {
            None
        };
        match (m.kind, unit) {
            (MetricKind::Counter, _) => metrics::describe_counter!(m.name, m.help),
            (MetricKind::Gauge, _) => metrics::describe_gauge!(m.name, m.help),
            (MetricKind::Histogram, Some(unit)) => {
                metrics::describe_histogram!(m.name, unit, m.help)
            }
            (MetricKind::Histogram, None) => metrics::describe_histogram!(m.name, m.help),
        }
    }
}

/// The metric handles of one store, taken when it opens: what a store backend records
/// ([`STORE_COMMITS`] and the other `STORE_` metrics) through one call per group commit.
#[derive(Clone)]
pub struct StoreMetrics {
    commits: Counter,
    failed_commits: Counter,
    appends: Counter,
    events: Counter,
    events_per_commit: Histogram,
    commit_seconds: Histogram,
}

impl std::fmt::Debug for StoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreMetrics").finish_non_exhaustive()
    }
}

impl StoreMetrics {
    /// The handles of a store of this kind (`"sqlite"`, `"postgres"`, `"memory"`).
    pub fn new(store: &'static str) -> Self {
        StoreMetrics {
            commits: metrics::counter!(STORE_COMMITS, "store" => store),
            failed_commits: metrics::counter!(STORE_FAILED_COMMITS, "store" => store),
            appends: metrics::counter!(STORE_APPENDS, "store" => store),
            events: metrics::counter!(STORE_EVENTS, "store" => store),
            events_per_commit: metrics::histogram!(STORE_EVENTS_PER_COMMIT, "store" => store),
            commit_seconds: metrics::histogram!(STORE_COMMIT_SECONDS, "store" => store),
        }
    }

    /// A group commit that stored `appends` appends of `events` events in `took`.
    /// Commits that stored no events (checkpoints, dead letters) count as commits, not
    /// in the events-per-commit histogram.
    pub fn committed(&self, appends: u64, events: u64, took: Duration) {
        self.commits.increment(1);
        self.commit_seconds.record(took);
        if events > 0 {
            self.appends.increment(appends);
            self.events.increment(events);
            self.events_per_commit.record(events as f64);
        }
    }

    /// A group commit that failed whole.
    pub fn failed(&self) {
        self.failed_commits.increment(1);
    }
}

/// The metric handles of one repository, by its aggregate type.
#[derive(Clone)]
pub(crate) struct RepositoryMetrics {
    pub(crate) load_seconds: Histogram,
    pub(crate) replayed: Counter,
    pub(crate) command_seconds: Histogram,
    pub(crate) retries: Counter,
    aggregate_type: &'static str,
}

/// What became of a command, for [`COMMANDS`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum CommandOutcome {
    Committed,
    Unchanged,
    Rejected,
    Conflict,
    Failed,
}

impl RepositoryMetrics {
    pub(crate) fn new(aggregate_type: &'static str) -> Self {
        RepositoryMetrics {
            load_seconds: metrics::histogram!(LOAD_SECONDS, "aggregate_type" => aggregate_type),
            replayed: metrics::counter!(REPLAYED_EVENTS, "aggregate_type" => aggregate_type),
            command_seconds: metrics::histogram!(
                COMMAND_SECONDS,
                "aggregate_type" => aggregate_type
            ),
            retries: metrics::counter!(COMMAND_RETRIES, "aggregate_type" => aggregate_type),
            aggregate_type,
        }
    }

    /// Counts one command (a registry lookup per command: commands are far rarer than the
    /// events they load).
    pub(crate) fn command(&self, outcome: CommandOutcome, took: Duration) {
        let outcome = match outcome {
            CommandOutcome::Committed => "committed",
            CommandOutcome::Unchanged => "unchanged",
            CommandOutcome::Rejected => "rejected",
            CommandOutcome::Conflict => "conflict",
            CommandOutcome::Failed => "failed",
        };
        metrics::counter!(
            COMMANDS,
            "aggregate_type" => self.aggregate_type,
            "outcome" => outcome
        )
        .increment(1);
        self.command_seconds.record(took);
    }
}

/// A counter the bus feeds from a running total it keeps anyway, by what the total grew
/// since the last catch-up (see the module's docs for why and when).
pub(crate) struct Totalled {
    counter: Counter,
    /// How much of the total the counter has been given.
    given: AtomicU64,
}

impl Totalled {
    fn new(counter: Counter) -> Self {
        Totalled {
            counter,
            given: AtomicU64::new(0),
        }
    }

    /// Gives the counter what `total` grew by since the last catch-up. Callers may race:
    /// `fetch_max` hands each unit of growth to exactly one of them, and a total older
    /// than one given already adds nothing.
    pub(crate) fn catch_up(&self, total: u64) {
        let given = self.given.fetch_max(total, Ordering::Relaxed);
        if total > given {
            self.counter.increment(total - given);
        }
    }
}

/// The metric handles of one subscription, taken when it is registered.
pub(crate) struct SubscriptionMetrics {
    /// Caught up from the subscription's delivered count.
    pub(crate) handled: Totalled,
    pub(crate) failed: Counter,
    pub(crate) retries: Counter,
    pub(crate) dead_letters: Counter,
    pub(crate) skipped: Counter,
    pub(crate) checkpoint: Gauge,
    pub(crate) lag: Gauge,
}

impl SubscriptionMetrics {
    pub(crate) fn new(subscription: &str) -> Self {
        let name = subscription.to_owned();
        SubscriptionMetrics {
            handled: Totalled::new(metrics::counter!(
                DELIVERIES,
                "subscription" => name.clone(),
                "outcome" => "handled"
            )),
            failed: metrics::counter!(
                DELIVERIES,
                "subscription" => name.clone(),
                "outcome" => "failed"
            ),
            retries: metrics::counter!(DELIVERY_RETRIES, "subscription" => name.clone()),
            dead_letters: metrics::counter!(DEAD_LETTERS, "subscription" => name.clone()),
            skipped: metrics::counter!(SKIPPED_EVENTS, "subscription" => name.clone()),
            checkpoint: metrics::gauge!(SUBSCRIPTION_CHECKPOINT, "subscription" => name.clone()),
            lag: metrics::gauge!(SUBSCRIPTION_LAG, "subscription" => name),
        }
    }
}

impl std::fmt::Debug for SubscriptionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionMetrics")
            .finish_non_exhaustive()
    }
}

/// The metric handles of a bus as a whole.
pub(crate) struct BusMetrics {
    /// Caught up from the bus's published count.
    pub(crate) published: Totalled,
    pub(crate) worker_restarts: Counter,
}

impl BusMetrics {
    pub(crate) fn new() -> Self {
        BusMetrics {
            published: Totalled::new(metrics::counter!(BUS_PUBLISHED)),
            worker_restarts: metrics::counter!(BUS_WORKER_RESTARTS),
        }
    }
}

impl std::fmt::Debug for BusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusMetrics").finish_non_exhaustive()
    }
}
