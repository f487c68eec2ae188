//! `dlq replay` against a real bus running in the test process, on a SQLite file and on
//! PostgreSQL: the command stores a request, the bus carries it out after a lease round,
//! and `--wait` reports the outcome.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventfold::prelude::*;
use eventfold::{
    Delivery, EventBus, PostgresEventStore, PostgresOptions, RetryPolicy, SqliteEventStore,
    SqliteOptions,
};
use serde::{Deserialize, Serialize};

use common::{Run, Target, drop_schema, eventfold, pg_client, pg_url};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Invoice")]
enum InvoiceEvent {
    Issued {
        #[domain_event(aggregate_id)]
        invoice: String,
        seq: u64,
    },
}

/// A handler that fails while `broken` is set, and the events it handled.
#[derive(Clone, Default)]
struct Gate {
    broken: Arc<Mutex<bool>>,
    handled: Arc<Mutex<Vec<(String, u64)>>>,
}

impl Gate {
    fn handler(
        &self,
    ) -> impl Fn(Delivery<InvoiceEvent>) -> std::future::Ready<Result<(), String>> + Send + Sync + 'static
    {
        let gate = self.clone();
        move |d: Delivery<InvoiceEvent>| {
            let InvoiceEvent::Issued { invoice, seq } = d.event();
            if *gate.broken.lock().unwrap() {
                return std::future::ready(Err(format!("{invoice} is broken")));
            }
            gate.handled.lock().unwrap().push((invoice.clone(), *seq));
            std::future::ready(Ok(()))
        }
    }

    fn set_broken(&self, broken: bool) {
        *self.broken.lock().unwrap() = broken;
    }

    fn handled(&self) -> Vec<(String, u64)> {
        self.handled.lock().unwrap().clone()
    }
}

/// Runs the command on a blocking thread, so the bus of the test goes on meanwhile.
async fn run(store: &Target, args: &[&str]) -> Run {
    let store = Target {
        url: store.url.clone(),
        schema: store.schema.clone(),
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        eventfold(&store, &args)
    })
    .await
    .unwrap()
}

/// The outcome of the one request of a `dlq replay --wait --json`.
fn outcome(run: &Run) -> serde_json::Value {
    let json = run.json();
    assert_eq!(json["requests"].as_array().unwrap().len(), 1, "{json}");
    json["requests"][0]["finished"]["outcome"].clone()
}

/// The checks both stores pass, with a bus running `mailer` on `store`.
async fn replay_through_the_running_bus(store: Arc<dyn EventStore>, target: &Target) {
    let gate = Gate::default();
    gate.set_broken(true);
    // A short lease time: the bus's lease rounds, after which it carries out requests,
    // come every second.
    let bus = EventBus::builder()
        .store(store)
        .workers(2)
        .lease_ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    bus.subscribe("mailer", gate.handler())
        .retry(RetryPolicy::never())
        .register()
        .unwrap();
    bus.start().await.unwrap();
    for (invoice, seq) in [("i-1", 1), ("i-2", 1), ("i-1", 2)] {
        bus.publish(InvoiceEvent::Issued {
            invoice: invoice.into(),
            seq,
        })
        .await
        .unwrap();
    }
    bus.wait_idle().await.unwrap();
    let letters = bus.dead_letters(Some("mailer")).await.unwrap();
    assert_eq!(letters.len(), 3);
    gate.set_broken(false);

    // One dead letter: delivered again by the bus, removed, and reported done.
    let id = letters[1].id.to_string();
    let one = run(target, &["dlq", "replay", &id, "--wait", "--json"]).await;
    assert_eq!(one.code, 0, "{}\n{}", one.stdout, one.stderr);
    assert_eq!(
        outcome(&one),
        serde_json::json!({"result": "done", "replayed": 1, "failed": 0, "held_back": 0})
    );
    assert_eq!(gate.handled(), [("i-2".to_owned(), 1)]);
    let left: Vec<u64> = bus
        .dead_letters(None)
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(left, [letters[0].id, letters[2].id]);

    // The same dead letter again: it is gone, so the request is refused (exit 2, as
    // `dlq show` of an unknown id).
    let again = run(target, &["dlq", "replay", &id, "--wait"]).await;
    assert_eq!(
        again.code, 2,
        "an unknown dead letter is refused when stored"
    );
    assert!(
        again
            .stderr
            .contains(&format!("no dead letter with id {id}")),
        "{}",
        again.stderr
    );

    // Every dead letter: one request for mailer, both replayed in order.
    let all = run(target, &["dlq", "replay", "--all", "--wait", "--json"]).await;
    assert_eq!(all.code, 0, "{}\n{}", all.stdout, all.stderr);
    assert_eq!(all.json()["requests"][0]["subscription"], "mailer");
    assert_eq!(
        outcome(&all),
        serde_json::json!({"result": "done", "replayed": 2, "failed": 0, "held_back": 0})
    );
    assert_eq!(
        gate.handled(),
        [
            ("i-2".to_owned(), 1),
            ("i-1".to_owned(), 1),
            ("i-1".to_owned(), 2)
        ]
    );
    assert!(bus.dead_letters(None).await.unwrap().is_empty());

    // A handler that still fails: the outcome says why (exit 1), the dead letter stays.
    gate.set_broken(true);
    bus.publish(InvoiceEvent::Issued {
        invoice: "i-3".into(),
        seq: 1,
    })
    .await
    .unwrap();
    bus.wait_idle().await.unwrap();
    let letter = bus.dead_letters(None).await.unwrap().remove(0);
    let failed = run(target, &["dlq", "replay", &letter.id.to_string(), "--wait"]).await;
    assert_eq!(failed.code, 1, "{}\n{}", failed.stdout, failed.stderr);
    assert!(failed.stdout.contains("failed"), "{}", failed.stdout);
    assert!(failed.stdout.contains("i-3 is broken"), "{}", failed.stdout);
    assert_eq!(bus.dead_letters(None).await.unwrap().len(), 1);
    let shown = run(target, &["dlq", "show", &letter.id.to_string(), "--json"]).await;
    let requests = &shown.json()["replay_requests"];
    assert_eq!(requests[0]["finished"]["outcome"]["result"], "failed");

    // A subscription no running bus has: its request stays pending, and `dlq ls` says so.
    let elsewhere = run(
        target,
        &[
            "dlq",
            "replay",
            "--all",
            "--sub",
            "elsewhere",
            "--wait",
            "--timeout",
            "2",
            "--json",
        ],
    )
    .await;
    assert_eq!(elsewhere.code, 1, "{}", elsewhere.stderr);
    let json = elsewhere.json();
    assert_eq!(json["timed_out"], true);
    let pending_id = json["requests"][0]["id"].clone();
    assert_eq!(json["requests"][0]["finished"], serde_json::Value::Null);
    // The bus has had lease rounds since; the request is still pending.
    bus.carry_out_replay_requests().await.unwrap();
    let listed = run(target, &["dlq", "ls", "--sub", "elsewhere", "--json"]).await;
    let pending = &listed.json()["pending_replay_requests"];
    assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
    assert_eq!(pending[0]["id"], pending_id);
    let human = run(target, &["dlq", "ls"]).await;
    assert!(
        human.stdout.contains("pending replay requests:"),
        "{}",
        human.stdout
    );
    bus.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_is_carried_out_by_the_running_bus_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let store = SqliteEventStore::open(&path, SqliteOptions::new())
        .await
        .unwrap();
    let target = Target {
        url: path.display().to_string(),
        schema: None,
    };
    replay_through_the_running_bus(Arc::new(store.clone()), &target).await;
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_is_carried_out_by_the_running_bus_on_postgres() {
    let Some(client) = pg_client().await else {
        return;
    };
    let name = format!("cli_replay_{}", std::process::id());
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
        .await
        .unwrap();
    let store = PostgresEventStore::open(PostgresOptions::new(pg_url()).schema(&name))
        .await
        .unwrap();
    let target = Target {
        url: pg_url(),
        schema: Some(name),
    };
    replay_through_the_running_bus(Arc::new(store.clone()), &target).await;
    store.close().await.unwrap();
    drop_schema(&client, &target).await;
}
