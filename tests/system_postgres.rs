//! `EventSystem` on PostgreSQL, opened from a `postgres://` URL: the same program as on
//! SQLite, only the URL differs. Runs against `EVENTFOLD_PG_URL` in a schema of its own
//! (see event-postgres/tests/common: the skip rule and the schema guard are shared).

mod common;
#[path = "../event-postgres/tests/common/mod.rs"]
mod pg;

use common::{Account, AccountCommand};
use eventfold::{Error, EventSystem, StoreUrl};

#[test]
fn postgres_urls_parse_and_show_no_password() {
    for url in [
        "postgres://app@db.internal/orders",
        "postgresql://app:secret@db.internal:5433/orders?sslmode=disable",
        "POSTGRES://app@db/orders",
    ] {
        let parsed: StoreUrl = url.parse().unwrap();
        assert_eq!(parsed, StoreUrl::Postgres(url.to_owned()));
        let shown = parsed.to_string();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!format!("{parsed:?}").contains("secret"), "{parsed:?}");
    }
    for url in ["postgres:", "postgres://", "postgres:app@db"] {
        assert!(
            matches!(url.parse::<StoreUrl>(), Err(Error::InvalidStoreUrl { .. })),
            "{url}"
        );
    }
    match "mysql://db".parse::<StoreUrl>() {
        Err(Error::UnknownStoreScheme { known, .. }) => assert!(known.contains("postgres:")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_url_runs_the_system_on_postgresql_and_a_reopened_one_continues() {
    if pg::no_server() {
        return;
    }
    let schema = pg::Schema::new();
    let name = schema.name.clone();
    let open = || {
        let name = name.clone();
        async move {
            EventSystem::builder_url(&pg::url())
                .unwrap()
                .postgres_options(move |options| options.schema(name))
                .open()
                .await
                .unwrap()
        }
    };
    let system = open().await;
    assert!(system.postgres_store().is_some());
    assert!(system.sqlite_store().is_none());
    let handled = std::sync::Arc::new(tokio::sync::Notify::new());
    let seen = std::sync::Arc::clone(&handled);
    system
        .bus()
        .subscribe::<common::AccountEvent, _>("audit", move |_| {
            let seen = std::sync::Arc::clone(&seen);
            async move { seen.notify_one() }
        })
        .register()
        .unwrap();
    let repo = system.repository::<Account>();
    repo.execute(
        "a-1",
        AccountCommand::Open {
            owner: "Ada".into(),
        },
    )
    .await
    .unwrap();
    handled.notified().await;
    system.bus().wait_idle().await.unwrap();
    system.shutdown().await.unwrap();

    let again = open().await;
    let (account, version) = again.repository::<Account>().load("a-1").await.unwrap();
    assert_eq!((account.owner.as_deref(), version), (Some("Ada"), 1));
    assert_eq!(again.store().head_position().await.unwrap(), 1);
    again.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_server_is_a_typed_open_error() {
    // A port nothing listens on: the connection is refused at once.
    let result = EventSystem::builder_url("postgres://postgres@127.0.0.1:1/test")
        .unwrap()
        .postgres_options(|options| options.connect_timeout(std::time::Duration::from_secs(2)))
        .open()
        .await;
    match result {
        Err(error) => assert!(
            matches!(error, Error::Open { .. } | Error::Store { .. }),
            "{error:?}"
        ),
        Ok(_) => panic!("nothing listens on port 1"),
    }
}
