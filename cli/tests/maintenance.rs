//! `verify` (clean and damaged stores: exit codes 0 and 1), `backup`, and the archive
//! round trip export, verify, prune (refused while a subscription lags), read below the
//! horizon, restore, run as a real process on a SQLite file and on PostgreSQL;
//! PostgreSQL's verify, and its backup refused with a pointer to pg_dump.

mod common;

use common::{Target, eventfold, pg_client, seeded_postgres, seeded_sqlite};
use eventfold::backend::{LeaseStore, SegmentLease};
use eventfold::{PostgresEventStore, PostgresOptions, SqliteEventStore, SqliteOptions};

#[tokio::test]
async fn verify_finds_a_sqlite_file_clean_and_then_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.db");
    let store = seeded_sqlite(&path).await;
    let clean = eventfold(&store, &["verify"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
    assert!(clean.stdout.contains("events:   5\n"), "{}", clean.stdout);
    assert!(
        clean.stdout.ends_with("result:   clean\n"),
        "{}",
        clean.stdout
    );

    // A payload changed behind the store's back: its checksum no longer matches.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE events SET payload = '{\"amount\":1000}' WHERE position = 2",
            [],
        )
        .unwrap();
    let damaged = eventfold(&store, &["verify"]);
    assert_eq!(damaged.code, 1, "{}{}", damaged.stdout, damaged.stderr);
    assert!(
        damaged.stdout.contains("damaged:  position 2: "),
        "{}",
        damaged.stdout
    );
    assert!(
        damaged.stdout.ends_with("result:   DAMAGED\n"),
        "{}",
        damaged.stdout
    );
    let json = eventfold(&store, &["verify", "--json"]);
    assert_eq!(json.code, 1);
    let json = json.json();
    assert_eq!(json["clean"], false);
    assert_eq!(json["damaged"][0]["position"], 2);
}

#[tokio::test]
async fn a_sqlite_backup_is_a_store_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = seeded_sqlite(&dir.path().join("events.db")).await;
    let copy = dir.path().join("copy.db");
    let copy_arg = copy.display().to_string();
    let backup = eventfold(&store, &["backup", &copy_arg]);
    assert_eq!(backup.code, 0, "{}", backup.stderr);
    assert!(
        backup
            .stdout
            .starts_with(&format!("backed up to {copy_arg} (")),
        "{}",
        backup.stdout
    );
    let copied = Target {
        url: copy_arg.clone(),
        schema: None,
    };
    assert_eq!(
        eventfold(&copied, &["status", "--json"]).json()["events"],
        5
    );
    let again = eventfold(&store, &["backup", &copy_arg, "--json"]);
    assert_eq!(again.code, 2, "an existing file is never overwritten");
}

#[tokio::test]
async fn an_archive_round_trip_on_a_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = seeded_sqlite(&dir.path().join("events.db")).await;
    archive_round_trip(&store, &dir).await;
}

#[tokio::test]
async fn an_archive_round_trip_on_postgresql() {
    let Some(client) = pg_client().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = seeded_postgres(&client, "cli_archive").await;
    archive_round_trip(&store, &dir).await;
    common::drop_schema(&client, &store).await;
}

/// The archive commands on a seeded store: export, verify, prune (refused while a
/// subscription lags), reads below the horizon, status, restore, a damaged file.
async fn archive_round_trip(store: &Target, dir: &tempfile::TempDir) {
    let file = dir.path().join("old.archive.gz").display().to_string();

    // Positions 1..=3: the whole Account/a-1 stream.
    let export = eventfold(
        store,
        &["archive", "export", &file, "--below", "4", "--json"],
    );
    assert_eq!(export.code, 0, "{}", export.stderr);
    let manifest = export.json()["manifest"].clone();
    assert_eq!(manifest["events"], 3);
    assert_eq!(
        (
            manifest["first_position"].as_u64(),
            manifest["last_position"].as_u64()
        ),
        (Some(1), Some(3))
    );
    let verify = eventfold(store, &["archive", "verify", &file]);
    assert_eq!(verify.code, 0, "{}", verify.stderr);
    assert!(
        verify.stdout.contains("events:    3\n") && verify.stdout.contains("state:     stored\n"),
        "{}",
        verify.stdout
    );

    // `mailer` is at checkpoint 2, behind the archive's last position: refused.
    let refused = eventfold(store, &["archive", "prune", &file]);
    assert_eq!(refused.code, 2);
    assert!(refused.stderr.contains("mailer"), "{}", refused.stderr);
    assert_eq!(
        eventfold(store, &["status", "--json"]).json()["events"],
        5,
        "nothing pruned"
    );

    assert_eq!(
        eventfold(store, &["sub", "reset", "mailer", "--to", "end"]).code,
        0
    );
    // The segments of `positions` have handled nothing yet (none saved a checkpoint): still
    // refused, naming the first of them.
    let refused = eventfold(store, &["archive", "prune", &file]);
    assert_eq!(refused.code, 2);
    assert!(
        refused.stderr.contains("`positions#0/4` is at position 0"),
        "{}",
        refused.stderr
    );
    segments_reach_the_head(store).await;
    let prune = eventfold(store, &["archive", "prune", &file]);
    assert_eq!(prune.code, 0, "{}", prune.stderr);
    assert!(
        prune.stdout.starts_with("prune: done\n"),
        "{}",
        prune.stdout
    );
    let pruned = eventfold(store, &["archive", "verify", &file, "--json"]).json();
    assert_eq!(pruned["state"], "pruned");
    // Below the horizon: a typed error naming the archive, not a silent gap.
    let below = eventfold(store, &["stream", "show", "Account/a-1"]);
    assert_eq!(below.code, 2);
    assert!(
        below.stderr.contains(manifest["archive"].as_str().unwrap()),
        "{}",
        below.stderr
    );
    let status = eventfold(store, &["status"]);
    assert!(
        status
            .stdout
            .contains("archives:       1 (3 events pruned)\n"),
        "{}",
        status.stdout
    );
    assert!(
        status.stdout.contains(&format!(
            "{}  1..=3      3       ",
            manifest["archive"].as_str().unwrap()
        )),
        "{}",
        status.stdout
    );
    let streams = eventfold(store, &["streams", "ls", "--json"]).json();
    assert_eq!(
        streams.as_array().unwrap().len(),
        1,
        "Account/a-1 is archived whole: {streams}"
    );
    // The log reads across the gap.
    let tail = eventfold(store, &["log", "tail", "--from", "1", "--json"]);
    assert_eq!(tail.stdout.lines().count(), 2, "{}", tail.stdout);
    assert_eq!(
        eventfold(store, &["verify"]).code,
        0,
        "pruned positions are not gaps"
    );

    let restore = eventfold(store, &["archive", "restore", &file]);
    assert_eq!(restore.code, 0, "{}", restore.stderr);
    assert_eq!(
        eventfold(store, &["status", "--json"]).json()["archives"],
        serde_json::json!([])
    );
    let shown = eventfold(store, &["stream", "show", "Account/a-1", "--json"]).json();
    assert_eq!(shown.as_array().unwrap().len(), 3);
    assert_eq!(shown[1]["payload"]["amount"], 100);

    // A damaged archive file is a finding of `archive verify`.
    let damaged = dir.path().join("damaged.archive.gz");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&damaged, bytes).unwrap();
    let found = eventfold(
        store,
        &["archive", "verify", &damaged.display().to_string()],
    );
    assert_eq!(found.code, 1, "{}{}", found.stdout, found.stderr);
    // Exporting over an existing file is refused.
    assert_eq!(
        eventfold(store, &["archive", "export", &file, "--below", "2"]).code,
        2
    );
    assert_eq!(
        eventfold(store, &["archive", "export", &file]).code,
        2,
        "no range"
    );
}

/// Every segment of `positions` saves checkpoint 5, as the processes holding them would:
/// the two `worker-1` holds under its leases, the two free ones once claimed.
async fn segments_reach_the_head(store: &Target) {
    async fn catch_up(leases: &dyn LeaseStore) {
        let ttl = std::time::Duration::from_secs(600);
        let mut held: Vec<SegmentLease> = leases
            .segment_states("positions")
            .await
            .unwrap()
            .into_iter()
            .filter_map(|state| {
                Some(SegmentLease {
                    subscription: "positions".into(),
                    segment: state.segment,
                    segments: state.segments,
                    owner: state.owner?,
                    epoch: state.epoch,
                    expires_at: state.expires_at?,
                    checkpoint: state.checkpoint,
                })
            })
            .collect();
        held.extend(
            leases
                .claim_segments("positions", "tester", 4, 4, ttl)
                .await
                .unwrap(),
        );
        assert_eq!(held.len(), 4);
        for lease in &held {
            leases.save_segment_checkpoint(lease, 5).await.unwrap();
        }
    }
    match &store.schema {
        None => {
            let sqlite = SqliteEventStore::open(&store.url, SqliteOptions::new())
                .await
                .unwrap();
            catch_up(&sqlite).await;
            sqlite.close().await.unwrap();
        }
        Some(schema) => {
            let options = PostgresOptions::new(&store.url).schema(schema);
            let postgres = PostgresEventStore::open(options).await.unwrap();
            catch_up(&postgres).await;
            postgres.close().await.unwrap();
        }
    }
}

#[tokio::test]
async fn postgres_verify_and_its_refusals() {
    let Some(client) = pg_client().await else {
        return;
    };
    let store = seeded_postgres(&client, "cli_maintenance").await;
    let clean = eventfold(&store, &["verify", "--json"]);
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    let clean = clean.json();
    assert_eq!(
        (clean["clean"].as_bool(), clean["events"].as_u64()),
        (Some(true), Some(5))
    );
    let backup = eventfold(&store, &["backup", "/nonexistent/copy"]);
    assert_eq!(backup.code, 2);
    assert!(backup.stderr.contains("pg_dump"), "{}", backup.stderr);
    assert!(
        backup.stderr.contains(&format!(
            "pg_dump --schema={}",
            store.schema.as_deref().unwrap()
        )),
        "{}",
        backup.stderr
    );

    // A row removed behind the store's back: a gap in positions and in a stream.
    client
        .batch_execute(&format!(
            "DELETE FROM {}.ef_events WHERE position = 2",
            store.schema.as_deref().unwrap()
        ))
        .await
        .unwrap();
    let damaged = eventfold(&store, &["verify"]);
    assert_eq!(damaged.code, 1, "{}{}", damaged.stdout, damaged.stderr);
    assert!(
        damaged
            .stdout
            .contains("gap:      positions 2 to 2 are missing"),
        "{}",
        damaged.stdout
    );
    assert!(
        damaged
            .stdout
            .contains("gap:      stream Account/a-1 goes from version 1 to 3"),
        "{}",
        damaged.stdout
    );
    common::drop_schema(&client, &store).await;
}
