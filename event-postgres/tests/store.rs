//! The PostgreSQL store beyond the conformance suite: its schema, group commit with each
//! append's own result, and wake-ups across store handles (processes).

mod common;

use std::time::Duration;

use eventfold_core::{AppendRequest, Error, EventLog, ExpectedVersion, StoreErrorKind};
use eventfold_postgres::{PostgresEventStore, PostgresOptions};

use common::{event, stream, until};

/// A session of the tests' own holding the head row's lock, so the writer's next call
/// waits for it: everything queued meanwhile joins the call after it.
async fn hold_head(schema: &str) -> tokio_postgres::Client {
    let raw = common::raw().await;
    raw.batch_execute(&format!(
        "BEGIN; SELECT position FROM {schema}.ef_head FOR UPDATE"
    ))
    .await
    .unwrap();
    raw
}

/// How many of the store's append calls wait for a lock right now.
async fn waiting_appends(raw: &tokio_postgres::Client) -> i64 {
    raw.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE '%ef_append(%' AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_lists_each_stream_with_its_version_count_and_last_event() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    assert!(store.streams(None).await.unwrap().is_empty());
    let b = common::stream("b");
    store
        .append(
            &b,
            ExpectedVersion::NoStream,
            vec![common::event(1), common::event(2)],
        )
        .await
        .unwrap();
    let other = eventfold_core::StreamId::new("Other", "x");
    store
        .append(&other, ExpectedVersion::NoStream, vec![common::event(3)])
        .await
        .unwrap();
    let a = common::stream("a");
    store
        .append(&a, ExpectedVersion::NoStream, vec![common::event(4)])
        .await
        .unwrap();
    store
        .append(&b, ExpectedVersion::Exact(2), vec![common::event(5)])
        .await
        .unwrap();
    let listed = store.streams(None).await.unwrap();
    let summary: Vec<_> = listed
        .iter()
        .map(|s| (s.stream.to_string(), s.version, s.events, s.last_position))
        .collect();
    assert_eq!(
        summary,
        [
            ("Other/x".to_owned(), 1, 1, 3),
            ("Tested/a".to_owned(), 1, 1, 4),
            ("Tested/b".to_owned(), 3, 3, 5),
        ]
    );
    let b_last = store.read_stream(&b, 3).await.unwrap().remove(0);
    assert_eq!(listed[2].last_recorded_at, b_last.recorded_at);
    assert_eq!(store.streams(Some("Tested")).await.unwrap().len(), 2);
    assert!(store.streams(Some("None")).await.unwrap().is_empty());
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opened_schema_is_at_the_published_schema_version() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    schema.open().await.close().await.unwrap();
    let row = common::raw()
        .await
        .query_one(
            &format!("SELECT max(version) FROM {}.ef_schema", schema.name),
            &[],
        )
        .await
        .unwrap();
    let stored: i32 = row.get(0);
    assert_eq!(stored as u32, eventfold_postgres::SCHEMA_VERSION);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_newer_than_the_library_is_refused() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    schema.open().await.close().await.unwrap();
    common::raw()
        .await
        .batch_execute(&format!(
            "UPDATE {}.ef_schema SET version = 99",
            schema.name
        ))
        .await
        .unwrap();
    match PostgresEventStore::open(schema.options()).await {
        Err(Error::Open { kind, reason, .. }) => {
            assert_eq!(kind, StoreErrorKind::SchemaTooNew, "{reason}");
            assert!(reason.contains("99"), "{reason}");
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opening_at_once_migrate_the_schema_once() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let opens: Vec<_> = (0..4)
        .map(|_| tokio::spawn(PostgresEventStore::open(schema.options())))
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every store opens"));
    }
    let rows = common::raw()
        .await
        .query(
            &format!("SELECT version FROM {}.ef_schema", schema.name),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].get::<_, i32>(0),
        eventfold_postgres::SCHEMA_VERSION as i32
    );
    let out = stores[0]
        .append(&stream("a"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    assert_eq!(out.last_position, 1);
    assert_eq!(stores[3].head_position().await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_keep_stores_apart_in_one_database() {
    if common::no_server() {
        return;
    }
    let (one, two) = (common::Schema::new(), common::Schema::new());
    let (a, b) = (one.open().await, two.open().await);
    a.append(&stream("x"), ExpectedVersion::Any, vec![event(1), event(2)])
        .await
        .unwrap();
    assert_eq!(a.head_position().await.unwrap(), 2);
    assert_eq!(b.head_position().await.unwrap(), 0);
    assert!(b.read_all(1, 10).await.unwrap().is_empty());
    let out = b
        .append(&stream("x"), ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    assert_eq!((out.version, out.first_position), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_together_share_one_call_and_keep_their_own_results() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let stored = vec![event(1), event(2)];
    let first = store
        .append(&stream("stored"), ExpectedVersion::NoStream, stored.clone())
        .await
        .unwrap();

    let lock = hold_head(&schema.name).await;
    // Out of any transaction, so each look at pg_stat_activity is a fresh one.
    let watcher = common::raw().await;
    // The first append's call waits for the lock; each next one is queued behind it, in
    // this order.
    let mut pending = Vec::new();
    let mut queue = |requests: Vec<AppendRequest>| {
        let store = store.clone();
        pending.push(tokio::spawn(
            async move { store.append_batch(requests).await },
        ));
    };
    let one = |s: &str, expected, events| {
        vec![AppendRequest {
            stream: stream(s),
            expected,
            events,
        }]
    };
    let mut taken = event(9);
    taken.event_id = stored[0].event_id;
    let cases: Vec<Vec<AppendRequest>> = vec![
        one("blocker", ExpectedVersion::Any, vec![event(0)]),
        one("a", ExpectedVersion::NoStream, vec![event(1)]),
        // Conflicts with the append just before it in the same call.
        one("a", ExpectedVersion::NoStream, vec![event(2)]),
        one("b", ExpectedVersion::Exact(5), vec![event(1)]),
        // A stored id with other content.
        one("c", ExpectedVersion::Any, vec![taken]),
        // An exact repeat of a stored append, with a stale expectation.
        one("stored", ExpectedVersion::NoStream, stored.clone()),
        // A batch whose second request conflicts: its first is not stored either.
        vec![
            AppendRequest {
                stream: stream("d"),
                expected: ExpectedVersion::NoStream,
                events: vec![event(1)],
            },
            AppendRequest {
                stream: stream("e"),
                expected: ExpectedVersion::Exact(9),
                events: vec![event(1)],
            },
        ],
        one("a", ExpectedVersion::Exact(1), vec![event(3), event(4)]),
    ];
    for (i, requests) in cases.into_iter().enumerate() {
        queue(requests);
        if i == 0 {
            until("the first call to wait for the lock", async || {
                waiting_appends(&watcher).await > 0
            })
            .await;
        } else {
            until("the append to queue", async || {
                store.writer_statistics().queued >= i
            })
            .await;
        }
    }
    let calls_before = store.writer_statistics().calls;
    lock.batch_execute("COMMIT").await.unwrap();
    let mut results = Vec::new();
    for task in pending {
        results.push(task.await.unwrap());
    }
    assert_eq!(
        store.writer_statistics().calls,
        calls_before + 3,
        "the blocked call, then one for the four appends queued behind it up to the one \
         that repeats an event id of theirs, and one for that one and the two after it"
    );
    let outcome = |r: &eventfold_core::Result<Vec<eventfold_core::AppendOutcome>>| {
        r.as_ref()
            .map(|o| {
                o.iter()
                    .map(|o| (o.version, o.first_position, o.last_position))
                    .collect::<Vec<_>>()
            })
            .map_err(|e| e.to_string())
    };
    assert_eq!(outcome(&results[0]), Ok(vec![(1, 3, 3)]));
    assert_eq!(outcome(&results[1]), Ok(vec![(1, 4, 4)]));
    assert!(
        matches!(
            &results[2],
            Err(Error::VersionConflict {
                expected: ExpectedVersion::NoStream,
                actual: 1,
                ..
            })
        ),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(&results[3], Err(Error::VersionConflict { actual: 0, .. })),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(&results[4], Err(Error::DuplicateEventId { event_id }) if *event_id == stored[0].event_id),
        "{:?}",
        results[4]
    );
    assert_eq!(
        outcome(&results[5]),
        Ok(vec![(
            first.version,
            first.first_position,
            first.last_position
        )])
    );
    assert!(
        matches!(
            &results[6],
            Err(Error::VersionConflict {
                expected: ExpectedVersion::Exact(9),
                ..
            })
        ),
        "{:?}",
        results[6]
    );
    assert_eq!(outcome(&results[7]), Ok(vec![(3, 5, 6)]));
    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6],
        "dense positions: refused appends leave no hole"
    );
    assert_eq!(store.stream_version(&stream("d")).await.unwrap(), 0);
    assert_eq!(*store.watch_head().borrow(), 6);
}

/// A group whose expected versions all hold but which repeats stored event ids fails on
/// the unique index and runs again with the ids checked: the other appends are stored, an
/// exact repeat gets its first outcome, an id stored with other content is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_meeting_stored_ids_runs_again_and_judges_each_append() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let store = schema.open().await;
    let stored = vec![event(1), event(2)];
    let first = store
        .append(&stream("stored"), ExpectedVersion::Any, stored.clone())
        .await
        .unwrap();
    let other = event(3);
    store
        .append(&stream("other"), ExpectedVersion::Any, vec![other.clone()])
        .await
        .unwrap();

    let lock = hold_head(&schema.name).await;
    let watcher = common::raw().await;
    let mut taken = event(9);
    taken.event_id = other.event_id;
    let cases = vec![
        (stream("blocker"), vec![event(0)]),
        (stream("x"), vec![event(1)]),
        (stream("stored"), stored.clone()),
        (stream("c"), vec![taken]),
        (stream("y"), vec![event(1)]),
    ];
    let mut pending = Vec::new();
    for (i, (s, events)) in cases.into_iter().enumerate() {
        let appender = store.clone();
        pending.push(tokio::spawn(async move {
            appender.append(&s, ExpectedVersion::Any, events).await
        }));
        if i == 0 {
            until("the first call to wait for the lock", async || {
                waiting_appends(&watcher).await > 0
            })
            .await;
        } else {
            until("the append to queue", async || {
                store.writer_statistics().queued >= i
            })
            .await;
        }
    }
    let calls_before = store.writer_statistics().calls;
    lock.batch_execute("COMMIT").await.unwrap();
    let mut results = Vec::new();
    for task in pending {
        results.push(
            task.await
                .unwrap()
                .map(|o| (o.version, o.first_position, o.last_position)),
        );
    }
    assert_eq!(
        store.writer_statistics().calls,
        calls_before + 3,
        "the blocked call, the group's call that met the stored ids, and its call again"
    );
    assert_eq!(results[0].as_ref().ok(), Some(&(1, 4, 4)));
    assert_eq!(results[1].as_ref().ok(), Some(&(1, 5, 5)));
    assert_eq!(
        results[2].as_ref().ok(),
        Some(&(first.version, first.first_position, first.last_position)),
        "an exact repeat returns its first outcome"
    );
    assert!(
        matches!(&results[3], Err(Error::DuplicateEventId { event_id }) if *event_id == other.event_id),
        "{:?}",
        results[3]
    );
    assert_eq!(results[4].as_ref().ok(), Some(&(1, 6, 6)));
    let log = store.read_all(1, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|e| e.position).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6],
        "dense positions: the rolled-back call leaves no hole"
    );
    assert_eq!(*store.watch_head().borrow(), 6);
}

/// Two stores on one schema, each with its own pool, writer and listener, stand for two
/// processes: an append through one wakes a waiter on the other.
async fn wakes_the_other_store(waiting: PostgresOptions, schema: &common::Schema) {
    let writer = schema.open().await;
    let reader = PostgresEventStore::open(waiting).await.unwrap();
    let mut head = reader.watch_head();
    assert_eq!(*head.borrow_and_update(), 0);
    for n in 1..=3 {
        writer
            .append(&stream("woken"), ExpectedVersion::Any, vec![event(n)])
            .await
            .unwrap();
        while *head.borrow_and_update() < n {
            tokio::time::timeout(Duration::from_secs(30), head.changed())
                .await
                .expect("the other store wakes")
                .unwrap();
        }
    }
    reader.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_wakes_a_waiter_on_another_store() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    // A poll once an hour: only the NOTIFY can wake it within the test.
    let options = schema.options().poll_interval(Duration::from_secs(3600));
    wakes_the_other_store(options, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notify_the_poll_wakes_a_waiter_on_another_store() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    // The waiting store does not LISTEN: only its poll can wake it.
    let options = schema
        .options()
        .notify(false)
        .poll_interval(Duration::from_millis(20));
    wakes_the_other_store(options, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_whose_session_is_ended_listens_again() {
    if common::no_server() {
        return;
    }
    let schema = common::Schema::new();
    let name = format!("{}_listener", schema.name);
    let url = format!("{}?application_name={name}", common::url());
    let options = PostgresOptions::new(url)
        .schema(&schema.name)
        .poll_interval(Duration::from_secs(3600));
    let reader = PostgresEventStore::open(options.clone()).await.unwrap();
    let raw = common::raw().await;
    let listening = format!(
        "SELECT pid FROM pg_stat_activity WHERE application_name = '{name}' \
         AND query LIKE 'LISTEN%'"
    );
    let mut pid = 0;
    until("the listener to listen", async || {
        match raw.query(&listening, &[]).await.unwrap().first() {
            Some(row) => {
                pid = row.get::<_, i32>(0);
                true
            }
            None => false,
        }
    })
    .await;
    raw.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    until("the listener to listen again", async || {
        raw.query(&listening, &[])
            .await
            .unwrap()
            .first()
            .is_some_and(|row| row.get::<_, i32>(0) != pid)
    })
    .await;
    drop(reader);
    wakes_the_other_store(options, &schema).await;
}
