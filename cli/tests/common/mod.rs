//! What the command's tests share: a store seeded through the library, the command run as a
//! real process, and PostgreSQL's skip rule and schema of its own.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use eventfold::backend::{NewDeadLetter, Uuid};
use eventfold::prelude::*;
use eventfold::{
    FailureRecord, NewEvent, PostgresEventStore, PostgresOptions, SqliteEventStore, SqliteOptions,
};

/// What the command printed and how it ended.
pub struct Run {
    /// Its exit code.
    pub code: i32,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Run {
    /// Stdout as JSON, or a panic that shows both outputs.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `eventfold --store STORE ARGS..` (plus `--schema` for PostgreSQL) to its end.
pub fn eventfold(store: &Target, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eventfold"));
    command
        .env_remove("EVENTFOLD_STORE")
        .env_remove("EVENTFOLD_PG_SCHEMA");
    command.arg("--store").arg(&store.url);
    if let Some(schema) = &store.schema {
        command.arg("--schema").arg(schema);
    }
    let output = command
        .args(args)
        .output()
        .expect("the eventfold binary runs");
    Run {
        code: output.status.code().expect("an exit code, not a signal"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// The store a test runs the command on.
pub struct Target {
    /// `--store`.
    pub url: String,
    /// `--schema`, for PostgreSQL.
    pub schema: Option<String>,
}

fn event(event_type: &str, payload: &str, at: chrono::DateTime<chrono::Utc>) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.into(),
        schema_version: 1,
        occurred_at: at,
        metadata: Default::default(),
        payload: payload.into(),
    }
}

/// Seeds a store: `Account/a-1` with 3 events, `Order/o-1` with 2 (positions 4 and 5);
/// subscription `mailer` at checkpoint 2 with one dead letter (position 3) and two
/// failure records, subscription `ledger` at the head, and subscription `positions` of 4
/// segments, 2 of them leased by `worker-1` for 10 minutes (as a running process holds
/// them).
pub async fn seed(store: &dyn EventStore) {
    let at = chrono::Utc::now();
    let account = StreamId::new("Account", "a-1");
    store
        .append(
            &account,
            ExpectedVersion::NoStream,
            vec![
                event("Opened", r#"{"owner":"Ada"}"#, at),
                event("FundsDeposited", r#"{"amount":100}"#, at),
                event("Withdrawn", r#"{"amount":30}"#, at),
            ],
        )
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("Order", "o-1"),
            ExpectedVersion::NoStream,
            vec![
                event("Placed", r#"{"qty":5}"#, at),
                event("Filled", r#"{"qty":5}"#, at),
            ],
        )
        .await
        .unwrap();
    store.save_checkpoint("mailer", 2).await.unwrap();
    store.save_checkpoint("ledger", 5).await.unwrap();
    let third = store.read_all(3, 1).await.unwrap().remove(0);
    store
        .add_dead_letter(NewDeadLetter {
            subscription: "mailer".into(),
            event_id: third.event_id,
            position: 3,
            event_type: "Withdrawn".into(),
            error: "smtp down".into(),
            attempts: 3,
            first_failed_at: at,
            last_failed_at: at,
        })
        .await
        .unwrap();
    store
        .claim_segments(
            "positions",
            "worker-1",
            4,
            2,
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    for attempt in 1..=2 {
        store
            .record_failure(
                FailureRecord {
                    subscription: "mailer".into(),
                    event_id: third.event_id,
                    position: 3,
                    attempt,
                    error: "smtp down".into(),
                    duration_micros: 10,
                    failed_at: at,
                },
                100,
            )
            .await
            .unwrap();
    }
}

/// A seeded SQLite file at `path`, closed.
pub async fn seeded_sqlite(path: &Path) -> Target {
    let store = SqliteEventStore::open(path, SqliteOptions::new())
        .await
        .unwrap();
    seed(&store).await;
    store.close().await.unwrap();
    Target {
        url: path.display().to_string(),
        schema: None,
    }
}

/// The PostgreSQL server of the tests.
pub fn pg_url() -> String {
    std::env::var("EVENTFOLD_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A session of the test's own on the server, or `None` (after one line on stderr) when
/// none answers and none is required (`EVENTFOLD_REQUIRE_PG=1` makes that a failure).
pub async fn pg_client() -> Option<tokio_postgres::Client> {
    match tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Some(client)
        }
        Err(e) if std::env::var("EVENTFOLD_REQUIRE_PG").as_deref() != Ok("1") => {
            eprintln!("skipped: no PostgreSQL at {} ({e})", pg_url());
            None
        }
        Err(e) => panic!(
            "EVENTFOLD_REQUIRE_PG=1 and no PostgreSQL at {}: {e}",
            pg_url()
        ),
    }
}

/// A seeded PostgreSQL store in a fresh schema `PREFIX_PID` (of this test process, so
/// concurrent runs on one server keep apart; dropped first if a failed run left it),
/// closed. Drop it after the test with [`drop_schema`].
pub async fn seeded_postgres(client: &tokio_postgres::Client, prefix: &str) -> Target {
    let name = &format!("{prefix}_{}", std::process::id());
    client
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
        .await
        .unwrap();
    let store = PostgresEventStore::open(PostgresOptions::new(pg_url()).schema(name))
        .await
        .unwrap();
    seed(&store).await;
    store.close().await.unwrap();
    Target {
        url: pg_url(),
        schema: Some(name.to_owned()),
    }
}

/// Drops the schema of a [`seeded_postgres`] store.
pub async fn drop_schema(client: &tokio_postgres::Client, target: &Target) {
    let schema = target.schema.as_deref().expect("a PostgreSQL target");
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}
