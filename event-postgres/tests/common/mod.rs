//! What every PostgreSQL test shares: the server's address, the skip rule, and a schema of
//! its own per test, dropped after it.
//!
//! The tests use `EVENTFOLD_PG_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! When no server answers there, they pass without running and say so once, on stderr;
//! with `EVENTFOLD_REQUIRE_PG=1` (as `.ci/run` sets it) they fail instead.

#![allow(dead_code)]

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventfold_postgres::{DEFAULT_URL, PostgresEventStore, PostgresOptions};

/// The server the tests use.
pub fn url() -> String {
    std::env::var("EVENTFOLD_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// Runs `work` on a runtime of its own, on a thread of its own (callable from inside a
/// runtime, and from `Drop`).
fn on_own_runtime<T: Send + 'static>(
    work: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>
    + Send
    + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
            .block_on(work())
    })
    .join()
    .expect("the helper thread")
}

/// Connects a session of the tests' own.
pub async fn raw() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), tokio_postgres::NoTls)
        .await
        .expect("the tests' own session");
    tokio::spawn(connection);
    client
}

/// True when the tests must skip: no server answers and none is required. Panics when
/// one is required (`EVENTFOLD_REQUIRE_PG=1`) and none answers.
pub fn no_server() -> bool {
    static REACHABLE: OnceLock<Result<(), String>> = OnceLock::new();
    let reachable = REACHABLE.get_or_init(|| {
        let url = url();
        on_own_runtime(move || {
            Box::pin(async move {
                let attempt = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio_postgres::connect(&url, tokio_postgres::NoTls),
                )
                .await;
                match attempt {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => {
                        let mut why = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(cause) = source {
                            why.push_str(&format!(": {cause}"));
                            source = cause.source();
                        }
                        Err(why)
                    }
                    Err(_) => Err("no answer within 5 s".to_owned()),
                }
            })
        })
    });
    let Err(why) = reachable else {
        return false;
    };
    if std::env::var("EVENTFOLD_REQUIRE_PG").as_deref() == Ok("1") {
        panic!(
            "EVENTFOLD_REQUIRE_PG=1 but no PostgreSQL answers at {} ({why})",
            url()
        );
    }
    static SAID: OnceLock<()> = OnceLock::new();
    SAID.get_or_init(|| {
        // Straight to stderr: the test harness captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "eventfold-postgres: skipping the PostgreSQL tests: no server at {} ({why}); \
             start one or set EVENTFOLD_PG_URL, and EVENTFOLD_REQUIRE_PG=1 to fail instead",
            url()
        );
    });
    true
}

/// A schema name no other test uses: the test's name, this process and a counter.
pub fn schema_name() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let test = std::thread::current()
        .name()
        .unwrap_or("test")
        .rsplit("::")
        .next()
        .unwrap_or("test")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect::<String>();
    format!(
        "eft_{test}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops its schema when dropped (after the test, even one that failed).
pub struct Schema {
    pub name: String,
}

impl Schema {
    /// A fresh schema name, dropped with the guard.
    pub fn new() -> Self {
        Schema {
            name: schema_name(),
        }
    }

    /// Options for a store in this schema.
    pub fn options(&self) -> PostgresOptions {
        PostgresOptions::new(url()).schema(&self.name)
    }

    /// Opens a store in this schema.
    pub async fn open(&self) -> PostgresEventStore {
        PostgresEventStore::open(self.options())
            .await
            .expect("the store opens")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let name = self.name.clone();
        let url = url();
        let dropped = on_own_runtime(move || {
            Box::pin(async move {
                let (client, connection) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await
            })
        });
        if let Err(e) = dropped {
            let _ = writeln!(
                std::io::stderr(),
                "could not drop schema {}: {e}",
                self.name
            );
        }
    }
}

/// Runs SQL on a session of the tests' own, from anywhere (a `Drop` included).
pub fn run_sql(sql: String) -> Result<(), tokio_postgres::Error> {
    let url = url();
    on_own_runtime(move || {
        Box::pin(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.batch_execute(&sql).await
        })
    })
}

/// A login role of the test's own, dropped when the guard is (after the schemas it owns:
/// declare it before them).
pub struct Role {
    pub name: String,
}

impl Role {
    pub fn new() -> Self {
        let name = format!("{}_role", schema_name());
        run_sql(format!("CREATE ROLE {name} LOGIN")).expect("a role of the test's own");
        Role { name }
    }

    /// The tests' server, logged in as this role.
    pub fn url(&self) -> String {
        let mut config: tokio_postgres::Config = url().parse().expect("EVENTFOLD_PG_URL parses");
        config.user(&self.name);
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let dbname = config.get_dbname().unwrap_or("test").to_owned();
        format!("postgres://{}@{host}:{port}/{dbname}", self.name)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = &self.name;
        let _ = run_sql(format!(
            "ALTER ROLE {name} CONNECTION LIMIT -1; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'; \
             DROP OWNED BY {name} CASCADE; DROP ROLE IF EXISTS {name}"
        ));
    }
}

/// A one-event append of `{"n": n}` as the type `Counted`, with a fresh id.
pub fn event(n: u64) -> eventfold_core::NewEvent {
    eventfold_core::NewEvent {
        event_id: uuid::Uuid::now_v7(),
        event_type: "Counted".to_owned(),
        schema_version: 1,
        occurred_at: chrono::Utc::now(),
        metadata: eventfold_core::Metadata::new(),
        payload: format!(r#"{{"n":{n}}}"#),
    }
}

/// The stream `id` of the tests' aggregate type.
pub fn stream(id: &str) -> eventfold_core::StreamId {
    eventfold_core::StreamId::new("Tested", id)
}

/// Waits until `condition` holds: it is checked again each time the task is polled after
/// yielding, with no timer in between, so the test goes on the moment it holds (a server
/// query in the condition paces the loop by its round trip). Fails after 30 s, a guard
/// against a hang, not a time the test relies on.
pub async fn until(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::yield_now().await;
    }
}
