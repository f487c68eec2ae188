//! Faults against the real server: a session killed mid-append, a retried append whose
//! outcome was unknown, a server that does not answer, a statement timeout, a pooled
//! session that the server ended.

mod common;

use std::time::Duration;

use eventfold_core::{Error, EventLog, ExpectedVersion, StoreErrorKind};
use eventfold_postgres::{PostgresEventStore, PostgresOptions};

use common::{event, stream, until};

/// Options whose sessions carry a name of their own, so the test finds them.
fn named(schema: &common::Schema) -> (PostgresOptions, String) {
    let name = format!("{}_app", schema.name);
    let url = format!("{}?application_name={name}", common::url());
    (PostgresOptions::new(url).schema(&schema.name), name)
}

/// The backend of the store's append call once it waits for a lock.
async fn waiting_append(raw: &tokio_postgres::Client, name: &str) -> i32 {
    let mut pid = 0;
    until("the append call to wait for the lock", async || {
        let rows = raw
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 AND wait_event_type = 'Lock' AND query LIKE '%ef_append(%'",
                &[&name],
            )
            .await
            .unwrap();
        match rows.first() {
            Some(row) => {
                pid = row.get(0);
                true
            }
            None => false,
        }
    })
    .await;
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_answer_fails_the_open_as_cannot_open() {
    // No server is needed: nothing listens on port 1.
    let options = PostgresOptions::new("postgres://postgres@127.0.0.1:1/test")
        .connect_timeout(Duration::from_secs(5));
    match PostgresEventStore::open(options).await {
        Err(Error::Open { kind, location, .. }) => {
            assert_eq!(kind, StoreErrorKind::CannotOpen);
            assert!(location.contains("127.0.0.1:1"), "{location}");
        }
        other => panic!("expected CannotOpen, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_database_fails_the_open_as_cannot_open() {
    if common::no_server() {
        return;
    }
    let mut config: tokio_postgres::Config = common::url().parse().unwrap();
    config.dbname("eventfold_no_such_database");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let url = format!("postgres://{user}@{host}:{port}/eventfold_no_such_database");
    match PostgresEventStore::open(PostgresOptions::new(url)).await {
        Err(Error::Open { kind, .. }) => assert_eq!(kind, StoreErrorKind::CannotOpen),
        other => panic!("expected CannotOpen, got {other:?}"),
    }
}

/// The session is killed (`pg_terminate_backend`) while the append call waits inside the
/// server: whether the call ran is not known to the writer, so it runs it again on a new
/// session, which is safe (the appends are recognised by their event ids), and the caller
/// gets the one outcome. A second append of the same events returns it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_killed_mid_append_is_called_again_and_the_events_are_stored_once() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let (options, name) = named(&schema);
    let store = PostgresEventStore::open(options).await.unwrap();
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();

    // Another session holds the head row, so the append call waits inside the server.
    let lock = common::raw().await;
    lock.batch_execute(&format!(
        "BEGIN; SELECT position FROM {}.ef_head FOR UPDATE",
        schema.name
    ))
    .await
    .unwrap();
    let events = vec![event(2), event(3)];
    let append = {
        let store = store.clone();
        let events = events.clone();
        tokio::spawn(async move {
            store
                .append(&stream("s"), ExpectedVersion::Exact(1), events)
                .await
        })
    };
    let watcher = common::raw().await;
    let pid = waiting_append(&watcher, &name).await;
    watcher
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    // The call runs again on a new session, and waits for the lock there.
    let mut again = 0;
    until("the call to run again", async || {
        let rows = watcher
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 AND wait_event_type = 'Lock' AND query LIKE '%ef_append(%' AND pid <> $2",
                &[&name, &pid],
            )
            .await
            .unwrap();
        again = rows.len();
        again > 0
    })
    .await;
    lock.batch_execute("ROLLBACK").await.unwrap();
    let stored = append.await.unwrap().unwrap();
    assert_eq!(
        (stored.version, stored.first_position, stored.last_position),
        (3, 2, 3)
    );
    assert_eq!(store.writer_statistics().reconnects, 1);
    let repeated = store
        .append(&stream("s"), ExpectedVersion::Exact(1), events)
        .await
        .unwrap();
    assert_eq!(repeated, stored);
    let later = store
        .append(&stream("s"), ExpectedVersion::Exact(3), vec![event(4)])
        .await
        .unwrap();
    assert_eq!((later.version, later.last_position), (4, 4));
    let log = store.read_all(1, 10).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_past_the_timeout_is_a_timeout_and_stores_nothing() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let options = schema
        .options()
        .statement_timeout(Duration::from_millis(200));
    let store = PostgresEventStore::open(options).await.unwrap();
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();

    // A read waits for a table another session locked, past the timeout.
    let lock = common::raw().await;
    lock.batch_execute(&format!(
        "BEGIN; LOCK TABLE {}.ef_events IN ACCESS EXCLUSIVE MODE",
        schema.name
    ))
    .await
    .unwrap();
    let error = store.read_stream(&stream("s"), 1).await.unwrap_err();
    assert_eq!(error.store_kind(), Some(StoreErrorKind::Timeout), "{error}");
    // An append waits for the head row past its lock timeout (or the statement
    // timeout, whichever the server notices first): refused, nothing stored.
    let error = store
        .append(&stream("s"), ExpectedVersion::Exact(1), vec![event(2)])
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.store_kind(),
            Some(StoreErrorKind::Timeout | StoreErrorKind::Busy)
        ),
        "{error}"
    );
    lock.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.stream_version(&stream("s")).await.unwrap(), 1);
    let out = store
        .append(&stream("s"), ExpectedVersion::Exact(1), vec![event(2)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_after_the_server_ends_every_session_of_the_store() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let (options, name) = named(&schema);
    let store = PostgresEventStore::open(options).await.unwrap();
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    assert_eq!(store.read_stream(&stream("s"), 1).await.unwrap().len(), 1);
    let raw = common::raw().await;
    let ended: i64 = raw
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1) AS ended",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        ended >= 2,
        "the writer, the listener and a pooled session: {ended}"
    );
    // The pooled session is found broken and the read runs again on a new one.
    assert_eq!(store.read_stream(&stream("s"), 1).await.unwrap().len(), 1);
    // The writer's next group finds its session broken and reconnects, or, had it not yet
    // heard that the server ended it, meets the end during its call and calls again on a
    // new session (safe: the append is recognised by its event ids). Either way: stored.
    let out = store
        .append(&stream("s"), ExpectedVersion::Exact(1), vec![event(2)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_postgresql_cannot_hold_fails_only_its_own_append() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let mut bad = event(1);
    bad.payload = "{\"a\":\"\0\"}".to_owned();
    let refused = store
        .append(&stream("s"), ExpectedVersion::Any, vec![bad])
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidAppend { .. })),
        "{refused:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), 0);
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
}

/// The server stops taking the store's sessions after it opened (its role may not log in
/// any more, and its sessions are ended): appends and reads fail with typed errors, and
/// once the server takes them again the store goes on by itself, the failed append stored
/// once when it is retried with the same ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_store_later_gives_typed_errors_and_the_store_recovers() {
    if common::no_server() {
        return;
    }
    let role = common::Role::new();
    let schema = common::Schema::new();
    let name = &role.name;
    common::run_sql(format!(
        "CREATE SCHEMA {} AUTHORIZATION {name}",
        schema.name
    ))
    .unwrap();
    let options = PostgresOptions::new(role.url())
        .schema(&schema.name)
        .connect_timeout(Duration::from_secs(5));
    let store = PostgresEventStore::open(options).await.unwrap();
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();

    let raw = common::raw().await;
    raw.batch_execute(&format!("ALTER ROLE {name} CONNECTION LIMIT 0"))
        .await
        .unwrap();
    let sessions = format!("SELECT count(*) FROM pg_stat_activity WHERE usename = '{name}'");
    raw.batch_execute(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'"
    ))
    .await
    .unwrap();
    until("the store's sessions to end", async || {
        raw.query_one(&sessions, &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    })
    .await;

    let events = vec![event(2)];
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let error = store
            .append(&stream("s"), ExpectedVersion::Exact(1), events.clone())
            .await
            .unwrap_err();
        kinds.push(error.store_kind());
    }
    assert!(
        kinds.iter().all(|kind| matches!(
            kind,
            Some(StoreErrorKind::OutcomeUnknown | StoreErrorKind::Io | StoreErrorKind::CannotOpen)
        )),
        "{kinds:?}"
    );
    assert_eq!(
        kinds.last(),
        Some(&Some(StoreErrorKind::CannotOpen)),
        "the writer cannot connect again: {kinds:?}"
    );
    let read = store.read_stream(&stream("s"), 1).await.unwrap_err();
    assert!(
        matches!(
            read.store_kind(),
            Some(StoreErrorKind::Io | StoreErrorKind::CannotOpen)
        ),
        "{read}"
    );

    raw.batch_execute(&format!("ALTER ROLE {name} CONNECTION LIMIT -1"))
        .await
        .unwrap();
    let out = store
        .append(&stream("s"), ExpectedVersion::Exact(1), events)
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (2, 2));
    assert_eq!(store.read_stream(&stream("s"), 1).await.unwrap().len(), 2);
    store.close().await.unwrap();
}

/// A writer outside the store (another program, by hand) inserts a row of a stream while
/// the store's append call checks that stream: the insert waits for the other's commit and
/// then violates the stream's unique version. The call runs again, sees the row, and the
/// append fails as the version conflict it is; one expecting any version is stored after
/// it. A row put at a position past the head is refused as damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_written_outside_the_store_meanwhile_is_judged_not_a_failure() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let (options, name) = named(&schema);
    let store = PostgresEventStore::open(options).await.unwrap();
    store
        .append(&stream("s"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    let foreign = common::raw().await;
    let insert = |position: i64, version: i64| {
        format!(
            "INSERT INTO {}.ef_events (position, stream_type, stream_id, version, event_id, \
             event_type, schema_version, occurred_at, recorded_at, payload) VALUES \
             ({position}, 'Tested', 's', {version}, gen_random_uuid(), 'Foreign', 1, 0, 0, '{{}}')",
            schema.name
        )
    };
    foreign
        .batch_execute(&format!("BEGIN; {}", insert(1_000_000, 2)))
        .await
        .unwrap();
    let append = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .append(&stream("s"), ExpectedVersion::Exact(1), vec![event(2)])
                .await
        })
    };
    let watcher = common::raw().await;
    waiting_append(&watcher, &name).await;
    foreign.batch_execute("COMMIT").await.unwrap();
    match append.await.unwrap() {
        Err(Error::VersionConflict { actual, .. }) => assert_eq!(actual, 2),
        other => panic!("expected a version conflict, got {other:?}"),
    }
    let out = store
        .append(&stream("s"), ExpectedVersion::Any, vec![event(3)])
        .await
        .unwrap();
    assert_eq!((out.version, out.last_position), (3, 2));

    // A row where the next position would go: every append is refused, as damage.
    foreign.batch_execute(&insert(3, 99)).await.unwrap();
    let error = store
        .append(&stream("t"), ExpectedVersion::Any, vec![event(1)])
        .await
        .unwrap_err();
    assert_eq!(error.store_kind(), Some(StoreErrorKind::Corrupt), "{error}");
    assert!(error.to_string().contains("outside the store"), "{error}");
    assert_eq!(store.stream_version(&stream("t")).await.unwrap(), 0);
}
