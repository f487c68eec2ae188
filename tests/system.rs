//! `EventSystem` on any store: `StoreUrl`'s forms and errors, opening from a URL, a store
//! of the caller's own.

mod common;

use std::path::PathBuf;

use common::{Account, AccountCommand};
use eventfold::prelude::*;
use eventfold::{Error, EventSystem, StoreUrl};

fn parse(url: &str) -> StoreUrl {
    url.parse()
        .unwrap_or_else(|e| panic!("`{url}` should parse: {e}"))
}

#[test]
fn store_urls_of_every_form_parse() {
    let sqlite = |p: &str| StoreUrl::Sqlite(PathBuf::from(p));
    for (url, expected) in [
        ("sqlite://events.db", sqlite("events.db")),
        ("sqlite://data/events.db", sqlite("data/events.db")),
        ("sqlite:events.db", sqlite("events.db")),
        (
            "sqlite:///var/lib/app/events.db",
            sqlite("/var/lib/app/events.db"),
        ),
        ("SQLite://events.db", sqlite("events.db")),
        ("sqlite://my%20events%25.db", sqlite("my events%.db")),
        ("sqlite::memory:", StoreUrl::SqliteMemory),
        ("memory:", StoreUrl::Memory),
        ("memory://", StoreUrl::Memory),
    ] {
        assert_eq!(parse(url), expected, "{url}");
    }
}

#[test]
fn a_store_url_displays_as_a_url_that_parses_back_to_it() {
    for url in [
        "sqlite://events.db",
        "sqlite:///var/lib/app/events.db",
        "sqlite://odd%3F%23%25name.db",
        "sqlite::memory:",
        "memory:",
    ] {
        let parsed = parse(url);
        assert_eq!(parsed.to_string(), url);
        assert_eq!(parse(&parsed.to_string()), parsed);
    }
}

#[test]
fn an_unknown_scheme_is_its_own_error_naming_the_known_ones() {
    for (url, scheme) in [("mysql://db/events", "mysql"), ("C:\\events.db", "C")] {
        match url.parse::<StoreUrl>() {
            Err(Error::UnknownStoreScheme {
                url: u,
                scheme: s,
                known,
            }) => {
                assert_eq!((u.as_str(), s.as_str()), (url, scheme));
                assert!(
                    known.contains("sqlite:") && known.contains("memory:"),
                    "{known}"
                );
            }
            other => panic!("`{url}`: {other:?}"),
        }
    }
}

#[test]
fn malformed_store_urls_are_refused_with_the_reason() {
    for (url, reason) in [
        ("", "no scheme"),
        ("events.db", "no scheme"),
        ("://events.db", "scheme"),
        ("sql ite://events.db", "scheme"),
        ("sqlite://", "no path"),
        ("sqlite:", "no path"),
        ("sqlite://events.db?mode=ro", "query"),
        ("sqlite://events.db#x", "query or fragment"),
        ("sqlite://bad%zzescape.db", "hex digits"),
        ("sqlite://cut%2", "hex digits"),
        ("sqlite://%FF.db", "UTF-8"),
        ("memory:events", "nothing after"),
    ] {
        match url.parse::<StoreUrl>() {
            Err(error @ Error::InvalidStoreUrl { .. }) => {
                let Error::InvalidStoreUrl { url: u, reason: r } = &error else {
                    unreachable!()
                };
                assert_eq!(u, url);
                assert!(r.contains(reason), "`{url}`: {r}");
                assert!(error.to_string().contains(url), "{error}");
            }
            other => panic!("`{url}`: {other:?}"),
        }
    }
}

#[tokio::test]
async fn builder_url_refuses_a_bad_url_before_opening_anything() {
    assert!(matches!(
        EventSystem::builder_url("sqlite://"),
        Err(Error::InvalidStoreUrl { .. })
    ));
    assert!(matches!(
        EventSystem::open_url("mysql://localhost/app").await,
        Err(Error::UnknownStoreScheme { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_url_opens_the_sqlite_file_that_open_opens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("url.db");
    let url = format!("sqlite://{}", path.display());
    let system = EventSystem::open_url(&url).await.unwrap();
    assert!(system.sqlite_store().is_some());
    system
        .repository::<Account>()
        .execute(
            "a-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
    system.shutdown().await.unwrap();

    let again = EventSystem::open(&path).await.unwrap();
    let (account, version) = again.repository::<Account>().load("a-1").await.unwrap();
    assert_eq!((account.owner.as_deref(), version), (Some("Ada"), 1));
    again.shutdown().await.unwrap();
}

#[tokio::test]
async fn open_url_opens_the_memory_stores() {
    for url in ["memory:", "sqlite::memory:"] {
        let system = EventSystem::open_url(url).await.unwrap();
        assert_eq!(system.sqlite_store().is_some(), url.starts_with("sqlite"));
        system
            .repository::<Account>()
            .execute(
                "a-1",
                AccountCommand::Open {
                    owner: "Ada".into(),
                },
            )
            .await
            .unwrap();
        assert_eq!(system.store().head_position().await.unwrap(), 1, "{url}");
        system.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn with_store_runs_the_system_on_a_store_of_the_callers() {
    let store = InMemoryEventStore::new();
    let system = EventSystem::with_store(store.clone())
        .bus(|bus| bus.workers(2))
        .open()
        .await
        .unwrap();
    assert!(system.sqlite_store().is_none());
    system
        .repository::<Account>()
        .execute(
            "a-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await
        .unwrap();
    system.shutdown().await.unwrap();
    // The store is the caller's, and still open.
    assert_eq!(store.head_position().await.unwrap(), 1);
}
