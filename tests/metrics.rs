//! The metrics, read back through a real Prometheus recorder: every counter counts what
//! happened (commands, appends, deliveries, retries, dead letters), the checkpoint and
//! lag gauges follow the subscription, on SQLite and on PostgreSQL; and the README's
//! table lists exactly the metrics the code records.
//!
//! One test binary, one global recorder: the tests tell their numbers apart by label
//! (each uses an aggregate type and subscription names of its own) and by store label.
mod common;
#[path = "../event-postgres/tests/common/mod.rs"]
mod pg;

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use common::{Account, AccountCommand, AccountEvent};
use eventfold::metrics::{METRICS, MetricKind};
use eventfold::{Delivery, EventSystem, RetryPolicy};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The two store tests share the Account aggregate type's labels: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The recorder, installed once for the binary before any store opens.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new().install_recorder().unwrap();
        eventfold::metrics::describe();
        handle
    })
}

/// Every sample of the rendered text: `name{labels}` to value.
fn samples() -> BTreeMap<String, f64> {
    recorder()
        .render()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn sample(name: &str, labels: &str) -> f64 {
    let key = format!("{name}{{{labels}}}");
    *samples()
        .get(&key)
        .unwrap_or_else(|| panic!("no sample {key} in\n{}", recorder().render()))
}

/// 12 commands on 3 accounts, one refused; a subscription that handles every event and
/// one that fails on every deposit of 7 until it dead-letters it (two attempts).
async fn workload(system: &EventSystem, tag: &str) {
    let bus = system.bus();
    bus.subscribe(format!("{tag}-all"), |_d: Delivery<AccountEvent>| async {})
        .register()
        .unwrap();
    bus.subscribe(
        format!("{tag}-picky"),
        |d: Delivery<AccountEvent>| async move {
            match d.event() {
                AccountEvent::Deposited { amount: 7 } => Err("sevens are refused"),
                _ => Ok(()),
            }
        },
    )
    .retry(RetryPolicy::exponential(
        2,
        Duration::from_millis(1),
        Duration::from_millis(1),
    ))
    .register()
    .unwrap();
    let repo = system.repository::<Account>();
    for n in 0..3 {
        let id = format!("{tag}-{n}");
        repo.execute(
            &id,
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
        for amount in [5, 7, 9] {
            repo.execute(&id, AccountCommand::Deposit(amount))
                .await
                .unwrap();
        }
    }
    // Refused: the account is open already. Nothing is stored.
    assert!(
        repo.execute(
            &format!("{tag}-0"),
            AccountCommand::Open {
                owner: "Bob".into()
            }
        )
        .await
        .is_err()
    );
    bus.wait_idle().await.unwrap();
}

/// What the workload must have recorded, for the store labelled `store`.
fn check(tag: &str, store: &str, before: &BTreeMap<String, f64>) {
    let delta = |name: &str, labels: &str| {
        let key = format!("{name}{{{labels}}}");
        sample(name, labels) - before.get(&key).copied().unwrap_or(0.0)
    };
    let account = "aggregate_type=\"Account\"";
    // The account type is shared by the tests: compare growth, not totals.
    assert_eq!(
        delta(
            "eventfold_commands_total",
            &format!("{account},outcome=\"committed\"")
        ),
        12.0
    );
    assert_eq!(
        delta(
            "eventfold_commands_total",
            &format!("{account},outcome=\"rejected\"")
        ),
        1.0
    );
    let store = format!("store=\"{store}\"");
    assert_eq!(delta("eventfold_store_appended_events_total", &store), 12.0);
    assert_eq!(delta("eventfold_store_appends_total", &store), 12.0);
    assert!(delta("eventfold_store_commits_total", &store) >= 1.0);
    assert_eq!(delta("eventfold_store_failed_commits_total", &store), 0.0);

    let all = format!("subscription=\"{tag}-all\"");
    let picky = format!("subscription=\"{tag}-picky\"");
    assert_eq!(
        sample(
            "eventfold_deliveries_total",
            &format!("{all},outcome=\"handled\"")
        ),
        12.0
    );
    assert_eq!(
        sample(
            "eventfold_deliveries_total",
            &format!("{all},outcome=\"failed\"")
        ),
        0.0
    );
    // 9 handled; each of the 3 sevens failed twice (one retry each), then dead-lettered.
    assert_eq!(
        sample(
            "eventfold_deliveries_total",
            &format!("{picky},outcome=\"handled\"")
        ),
        9.0
    );
    assert_eq!(
        sample(
            "eventfold_deliveries_total",
            &format!("{picky},outcome=\"failed\"")
        ),
        6.0
    );
    assert_eq!(sample("eventfold_delivery_retries_total", &picky), 3.0);
    assert_eq!(sample("eventfold_dead_letters_total", &picky), 3.0);
    assert_eq!(sample("eventfold_dead_letters_total", &all), 0.0);
}

/// After `stop` saved the checkpoints: at the head, no lag.
fn check_checkpoints(tag: &str, head: u64) {
    for sub in ["all", "picky"] {
        let labels = format!("subscription=\"{tag}-{sub}\"");
        assert_eq!(
            sample("eventfold_subscription_checkpoint_position", &labels),
            head as f64,
            "{labels}"
        );
        assert_eq!(
            sample("eventfold_subscription_lag_events", &labels),
            0.0,
            "{labels}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_the_metrics_count_commands_appends_deliveries_retries_and_dead_letters() {
    let _serial = SERIAL.lock().await;
    recorder();
    let before = samples();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("metrics.db").display());
    let system = EventSystem::open_url(&url).await.unwrap();
    workload(&system, "sqlite").await;
    check("sqlite", "sqlite", &before);
    let head = system.store().head_position().await.unwrap();
    system.shutdown().await.unwrap();
    check_checkpoints("sqlite", head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_the_metrics_count_the_same() {
    if pg::no_server() {
        return;
    }
    let _serial = SERIAL.lock().await;
    recorder();
    let before = samples();
    let schema = pg::Schema::new();
    let name = schema.name.clone();
    let system = EventSystem::builder_url(&pg::url())
        .unwrap()
        .postgres_options(move |options| options.schema(name))
        .open()
        .await
        .unwrap();
    workload(&system, "pg").await;
    check("pg", "postgres", &before);
    let head = system.store().head_position().await.unwrap();
    system.shutdown().await.unwrap();
    check_checkpoints("pg", head);
}

/// The per-event counts reach the recorder within a second on a running bus, without a
/// `wait_idle`, a statistics read or a stop (paused time: the second passes at once).
#[tokio::test(start_paused = true)]
async fn a_running_bus_hands_its_per_event_counts_to_the_recorder_within_a_second() {
    recorder();
    let bus = eventfold::EventBus::builder().build().unwrap();
    let (done, mut handled) = tokio::sync::mpsc::unbounded_channel();
    bus.subscribe("catch-up", move |_d: Delivery<AccountEvent>| {
        let done = done.clone();
        async move {
            let _ = done.send(());
        }
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();
    for amount in 0..5 {
        bus.publish(eventfold::Outgoing::new(AccountEvent::Deposited { amount }).to("catch-up-1"))
            .await
            .unwrap();
    }
    for _ in 0..5 {
        handled.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let labels = "subscription=\"catch-up\",outcome=\"handled\"";
    assert_eq!(sample("eventfold_deliveries_total", labels), 5.0);
    bus.stop().await.unwrap();
}

#[test]
fn the_readme_lists_exactly_the_metrics_the_code_records() {
    let readme = include_str!("../README.md");
    let rows: Vec<(String, String, String)> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `eventfold_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (
                format!("eventfold_{}", cells[0].trim_end_matches('`')),
                cells[1].to_owned(),
                cells[2].to_owned(),
            )
        })
        .collect();
    let code: Vec<(String, String, String)> = METRICS
        .iter()
        .map(|m| {
            let kind = match m.kind {
                MetricKind::Counter => "counter",
                MetricKind::Gauge => "gauge",
                MetricKind::Histogram => "histogram",
                _ => "other",
            };
            (m.name.to_owned(), kind.to_owned(), m.labels.join(", "))
        })
        .collect();
    assert_eq!(
        rows, code,
        "README's metrics table and eventfold::metrics::METRICS differ"
    );
}
