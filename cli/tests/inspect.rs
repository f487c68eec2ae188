//! `status`, `streams ls`, `stream show`, `log tail`: run as a real process on a seeded
//! SQLite file and a seeded PostgreSQL schema, human output and --json, and the exit codes
//! of a bad store.

mod common;

use common::{Target, eventfold, pg_client, seeded_postgres, seeded_sqlite};

/// The checks both stores pass.
fn inspect(store: &Target, backend: &str) {
    let status = eventfold(store, &["status"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    for line in [
        "head position:  5",
        "events:         5",
        "streams:        2",
        "dead letters:   1",
    ] {
        assert!(
            status.stdout.contains(line),
            "{line:?} in\n{}",
            status.stdout
        );
    }
    // The subscriptions table: columns aligned under the header.
    let table: Vec<&str> = status
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("SUBSCRIPTION"))
        .collect();
    assert_eq!(table[0], "SUBSCRIPTION  CHECKPOINT  LAG  DEAD LETTERS");
    assert_eq!(table[1], "ledger        5           0    0");
    assert_eq!(table[2], "mailer        2           3    1");

    let json = eventfold(store, &["status", "--json"]).json();
    assert_eq!(json["backend"], backend);
    assert_eq!(json["head_position"], 5);
    assert_eq!(json["events"], 5);
    assert_eq!(json["streams"], 2);
    assert_eq!(json["dead_letters"], 1);
    assert_eq!(json["failures"], 2);
    assert!(json["schema_version"].as_u64().unwrap() >= 1);
    assert_eq!(json["subscriptions"][1]["name"], "mailer");
    if let Some(schema) = &store.schema {
        let location = json["location"].as_str().unwrap();
        assert_eq!(
            location.matches(&format!("(schema {schema})")).count(),
            1,
            "{location}"
        );
    }
    // Both stores archive: nothing pruned yet.
    assert_eq!(json["archives"], serde_json::json!([]), "{json}");
    assert_eq!(json["subscriptions"][1]["lag"], 3);

    let streams = eventfold(store, &["streams", "ls"]);
    assert_eq!(streams.code, 0, "{}", streams.stderr);
    let lines: Vec<&str> = streams.stdout.lines().collect();
    assert!(
        lines[0].starts_with("STREAM       VERSION  EVENTS  LAST POSITION  LAST RECORDED"),
        "{}",
        streams.stdout
    );
    assert!(
        lines[1].starts_with("Account/a-1  3        3       3              "),
        "{}",
        streams.stdout
    );
    assert!(
        lines[2].starts_with("Order/o-1    2        2       5              "),
        "{}",
        streams.stdout
    );
    let orders = eventfold(store, &["streams", "ls", "--type", "Order", "--json"]).json();
    assert_eq!(orders.as_array().unwrap().len(), 1);
    assert_eq!(orders[0]["stream"], "Order/o-1");
    assert_eq!(orders[0]["version"], 2);

    let shown = eventfold(
        store,
        &["stream", "show", "Account/a-1", "--from", "2", "--json"],
    )
    .json();
    assert_eq!(shown.as_array().unwrap().len(), 2);
    assert_eq!(shown[0]["version"], 2);
    assert_eq!(shown[0]["event_type"], "FundsDeposited");
    // The payload is JSON, not escaped text.
    assert_eq!(shown[0]["payload"]["amount"], 100);
    let human = eventfold(store, &["stream", "show", "Account/a-1"]);
    assert!(
        human
            .stdout
            .lines()
            .nth(1)
            .unwrap()
            .ends_with(r#"Opened v1          {"owner":"Ada"}"#),
        "{}",
        human.stdout
    );
    let missing = eventfold(store, &["stream", "show", "Account/nope"]);
    assert_eq!(missing.code, 2);
    assert!(
        missing.stderr.contains("no stream `Account/nope`"),
        "{}",
        missing.stderr
    );
    assert_eq!(eventfold(store, &["stream", "show", "no-slash"]).code, 2);

    let tail = eventfold(store, &["log", "tail", "--limit", "2"]);
    assert_eq!(tail.code, 0, "{}", tail.stderr);
    let lines: Vec<&str> = tail.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", tail.stdout);
    assert!(lines[1].trim_start().starts_with("4  "), "{}", tail.stdout);
    assert!(
        lines[2].contains("Order/o-1") && lines[2].ends_with(r#"{"qty":5}"#),
        "{}",
        tail.stdout
    );
    // --json: one object a line, from a position on.
    let from = eventfold(store, &["log", "tail", "--from", "3", "--json"]);
    let positions: Vec<u64> = from
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(positions, [3, 4, 5]);
}

#[tokio::test]
async fn inspecting_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = seeded_sqlite(&dir.path().join("events.db")).await;
    inspect(&store, "sqlite");
    // A sqlite:// URL names the same file.
    let url = Target {
        url: format!("sqlite://{}", store.url),
        schema: None,
    };
    assert_eq!(eventfold(&url, &["status", "--json"]).json()["events"], 5);
}

#[tokio::test]
async fn inspecting_a_postgres_schema() {
    let Some(client) = pg_client().await else {
        return;
    };
    let store = seeded_postgres(&client, "cli_inspect").await;
    inspect(&store, "postgres");
    common::drop_schema(&client, &store).await;
}

/// `log tail --follow` prints what another process appends, as it comes: the test waits
/// for each line on the child's stdout, then stops it.
async fn follows(target: &Target, store: &dyn eventfold::EventStore) {
    use eventfold::prelude::*;
    use std::io::{BufRead, BufReader};
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_eventfold"));
    command
        .env_remove("EVENTFOLD_STORE")
        .arg("--store")
        .arg(&target.url);
    if let Some(schema) = &target.schema {
        command.arg("--schema").arg(schema);
    }
    let mut child = command
        .args(["log", "tail", "--limit", "1", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["position"], 5);
    let placed = eventfold::NewEvent {
        event_id: eventfold::backend::Uuid::now_v7(),
        event_type: "Placed".into(),
        schema_version: 1,
        occurred_at: chrono::Utc::now(),
        metadata: Default::default(),
        payload: r#"{"qty":7}"#.into(),
    };
    store
        .append(
            &StreamId::new("Order", "o-2"),
            ExpectedVersion::NoStream,
            vec![placed],
        )
        .await
        .unwrap();
    let followed: serde_json::Value =
        serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (followed["position"].as_u64(), followed["stream"].as_str()),
        (Some(6), Some("Order/o-2"))
    );
    assert_eq!(followed["payload"]["qty"], 7);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn log_tail_follows_appends_to_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let target = seeded_sqlite(&path).await;
    let store = eventfold::SqliteEventStore::open(&path, eventfold::SqliteOptions::new())
        .await
        .unwrap();
    follows(&target, &store).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn log_tail_follows_appends_to_a_postgres_schema() {
    let Some(client) = pg_client().await else {
        return;
    };
    let target = seeded_postgres(&client, "cli_follow").await;
    let store = eventfold::PostgresEventStore::open(
        eventfold::PostgresOptions::new(common::pg_url()).schema(target.schema.clone().unwrap()),
    )
    .await
    .unwrap();
    follows(&target, &store).await;
    store.close().await.unwrap();
    common::drop_schema(&client, &target).await;
}

#[test]
fn a_bad_store_is_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.db");
    let run = eventfold(
        &Target {
            url: missing.display().to_string(),
            schema: None,
        },
        &["status"],
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("no such SQLite file"), "{}", run.stderr);
    assert!(
        !missing.exists(),
        "the command created the file it was asked to read"
    );
    let run = eventfold(
        &Target {
            url: "mysql://db".into(),
            schema: None,
        },
        &["status"],
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("mysql"), "{}", run.stderr);
    // Nothing listens on port 1.
    let run = eventfold(
        &Target {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            schema: None,
        },
        &["status"],
    );
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("cannot open"), "{}", run.stderr);
    // A usage error (clap's): exit code 2 too.
    let run = eventfold(
        &Target {
            url: missing.display().to_string(),
            schema: None,
        },
        &["streams", "frobnicate"],
    );
    assert_eq!(run.code, 2);
}
