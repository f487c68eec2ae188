//! `subs`, `sub show|reset`, `dlq`, `failures`: run as a real process on a seeded SQLite
//! file and a seeded PostgreSQL schema.

mod common;

use common::{Target, eventfold, pg_client, seeded_postgres, seeded_sqlite};

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// The checks both stores pass; they change the store, in this order.
fn administer(store: &Target) {
    let subs = eventfold(store, &["subs", "ls"]);
    assert_eq!(subs.code, 0, "{}", subs.stderr);
    assert_eq!(
        lines(&subs.stdout),
        [
            "SUBSCRIPTION  CHECKPOINT  LAG  DEAD LETTERS",
            "ledger        5           0    0",
            "mailer        2           3    1",
        ]
    );
    let json = eventfold(store, &["subs", "ls", "--json"]).json();
    assert_eq!(json[0]["name"], "ledger");
    assert_eq!(json[1]["checkpoint"], 2);

    let show = eventfold(store, &["sub", "show", "mailer"]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    let shown = lines(&show.stdout);
    assert_eq!(
        shown[..4],
        [
            "subscription:  mailer",
            "checkpoint:    2",
            "head position: 5",
            "lag:           3"
        ]
    );
    assert!(
        shown
            .iter()
            .any(|l| l.starts_with("ID  SUBSCRIPTION  POSITION  EVENT TYPE  ATTEMPTS")),
        "{}",
        show.stdout
    );
    assert_eq!(
        shown.iter().filter(|l| l.ends_with("smtp down")).count(),
        3,
        "{}",
        show.stdout
    );
    let detail = eventfold(
        store,
        &["sub", "show", "mailer", "--json", "--failures", "1"],
    )
    .json();
    assert_eq!(detail["lag"], 3);
    assert_eq!(detail["recent_failures"].as_array().unwrap().len(), 1);
    assert_eq!(detail["recent_failures"][0]["attempt"], 2, "newest first");
    // A subscription several processes share: its segments, two held by a live member,
    // and a reset refused while they are.
    let shared = eventfold(store, &["sub", "show", "positions"]);
    assert_eq!(shared.code, 0, "{}", shared.stderr);
    let segments: Vec<&str> = shared
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("SEGMENT"))
        .take(5)
        .collect();
    assert!(
        segments[0].starts_with("SEGMENT  OWNER     EPOCH  EXPIRES"),
        "{}",
        shared.stdout
    );
    assert!(
        segments[1].starts_with("0/4      worker-1  1      "),
        "{}",
        shared.stdout
    );
    assert!(
        segments[3].starts_with("2/4      -         0      -"),
        "{}",
        shared.stdout
    );
    let json = eventfold(store, &["sub", "show", "positions", "--json"]).json();
    assert_eq!(json["segments"].as_array().unwrap().len(), 4);
    assert_eq!(json["segments"][1]["owner"], "worker-1");
    let running = eventfold(store, &["sub", "reset", "positions", "--to", "start"]);
    assert_eq!(running.code, 2);
    assert!(running.stderr.contains("positions"), "{}", running.stderr);
    let unknown = eventfold(store, &["sub", "show", "nobody"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.contains("no subscription `nobody`"),
        "{}",
        unknown.stderr
    );

    // Dead letters: list, show with the event's payload.
    let dlq = eventfold(store, &["dlq", "ls", "--sub", "mailer", "--json"]).json();
    let letters = &dlq["dead_letters"];
    assert_eq!(letters.as_array().unwrap().len(), 1);
    let id = letters[0]["id"].as_u64().unwrap().to_string();
    assert_eq!(letters[0]["position"], 3);
    assert_eq!(
        eventfold(store, &["dlq", "ls", "--sub", "ledger", "--json"]).json(),
        serde_json::json!({"dead_letters": [], "pending_replay_requests": []})
    );
    let letter = eventfold(store, &["dlq", "show", &id, "--json"]).json();
    assert_eq!(letter["dead_letter"]["error"], "smtp down");
    assert_eq!(letter["event"]["stream"], "Account/a-1");
    assert_eq!(letter["event"]["payload"]["amount"], 30);
    let human = eventfold(store, &["dlq", "show", &id]);
    assert!(
        human.stdout.contains("payload:      {\"amount\":30}"),
        "{}",
        human.stdout
    );
    assert_eq!(eventfold(store, &["dlq", "show", "999"]).code, 2);
    // A replay is a stored request; no service runs `mailer` here, so it stays pending,
    // and the dead letter with it.
    let replay = eventfold(store, &["dlq", "replay", &id]);
    assert_eq!(replay.code, 0, "{}", replay.stderr);
    assert!(replay.stdout.contains("pending"), "{}", replay.stdout);
    let requested = eventfold(store, &["dlq", "replay", &id, "--json"]).json();
    let request = &requested["requests"][0];
    assert_eq!(request["subscription"], "mailer");
    assert_eq!(request["dead_letter"].to_string(), id);
    assert_eq!(request["finished"], serde_json::Value::Null);
    let request_id = request["id"].as_u64().unwrap().to_string();
    let listed = eventfold(store, &["dlq", "ls", "--sub", "mailer", "--json"]).json();
    assert_eq!(
        listed["pending_replay_requests"].as_array().unwrap().len(),
        2
    );
    assert_eq!(listed["dead_letters"].as_array().unwrap().len(), 1);
    let human = eventfold(store, &["dlq", "ls"]);
    assert!(
        human.stdout.contains("pending replay requests:"),
        "{}",
        human.stdout
    );
    let shown = eventfold(store, &["dlq", "show", "--request", &request_id, "--json"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    assert_eq!(shown.json()["subscription"], "mailer");
    let shown = eventfold(store, &["dlq", "show", "--request", &request_id]);
    assert!(
        shown.stdout.contains("status:         pending"),
        "{}",
        shown.stdout
    );
    assert_eq!(
        eventfold(store, &["dlq", "show", "--request", "999"]).code,
        2
    );
    // An unknown dead letter is refused as in `dlq show`, storing nothing.
    let unknown = eventfold(store, &["dlq", "replay", "999"]);
    assert_eq!(unknown.code, 2);
    assert!(
        unknown.stderr.contains("no dead letter with id 999"),
        "{}",
        unknown.stderr
    );
    assert_eq!(
        eventfold(store, &["dlq", "replay", &id, "--timeout", "1"]).code,
        2,
        "--timeout without --wait"
    );
    assert_eq!(
        eventfold(store, &["dlq", "replay"]).code,
        2,
        "neither an id nor --all"
    );

    // Failures: list, clear.
    let failures = eventfold(store, &["failures", "ls"]);
    assert_eq!(lines(&failures.stdout).len(), 3, "{}", failures.stdout);
    assert!(
        failures
            .stdout
            .starts_with("SUBSCRIPTION  POSITION  ATTEMPT  FAILED AT"),
        "{}",
        failures.stdout
    );
    let cleared = eventfold(store, &["failures", "clear", "--sub", "mailer", "--json"]).json();
    assert_eq!(cleared["removed"], 2);
    assert_eq!(
        eventfold(store, &["failures", "ls", "--json"]).json(),
        serde_json::json!([])
    );

    // Resets: end, a position, a time, start; refused past the head and for a bad --to.
    let reset = eventfold(store, &["sub", "reset", "mailer", "--to", "end"]);
    assert_eq!(reset.code, 0, "{}", reset.stderr);
    assert_eq!(reset.stdout, "mailer: checkpoint 2 -> 5\n");
    let to_position = eventfold(store, &["sub", "reset", "mailer", "--to", "4", "--json"]).json();
    assert_eq!(
        (
            to_position["previous"].as_u64(),
            to_position["checkpoint"].as_u64()
        ),
        (Some(5), Some(4))
    );
    let to_time = eventfold(
        store,
        &[
            "sub",
            "reset",
            "mailer",
            "--to",
            "2000-01-01T00:00:00Z",
            "--json",
        ],
    )
    .json();
    assert_eq!(
        to_time["checkpoint"], 0,
        "every event was recorded after 2000"
    );
    let beyond = eventfold(store, &["sub", "reset", "mailer", "--to", "99"]);
    assert_eq!(beyond.code, 2);
    assert_eq!(
        eventfold(store, &["sub", "reset", "mailer", "--to", "yesterday"]).code,
        2
    );
    assert_eq!(
        eventfold(store, &["sub", "reset", "nobody", "--to", "start"]).code,
        2
    );
    assert_eq!(
        eventfold(store, &["subs", "ls", "--json"]).json()[1]["checkpoint"],
        0
    );

    // Discard: one, then none left.
    let discarded = eventfold(store, &["dlq", "discard", &id]);
    assert_eq!(discarded.code, 0, "{}", discarded.stderr);
    assert_eq!(discarded.stdout, "discarded 1 dead letter(s)\n");
    assert_eq!(
        eventfold(store, &["dlq", "discard", &id]).code,
        2,
        "discarded already"
    );
    let all = eventfold(store, &["dlq", "discard", "--all", "--json"]).json();
    assert_eq!(all["removed"], 0);
    assert_eq!(
        eventfold(store, &["status", "--json"]).json()["dead_letters"],
        0
    );
}

#[tokio::test]
async fn administering_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    administer(&seeded_sqlite(&dir.path().join("events.db")).await);
}

#[tokio::test]
async fn administering_a_postgres_schema() {
    let Some(client) = pg_client().await else {
        return;
    };
    let store = seeded_postgres(&client, "cli_administer").await;
    administer(&store);
    common::drop_schema(&client, &store).await;
}
