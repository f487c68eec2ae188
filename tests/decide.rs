//! Commands that ask services before they decide (`Decide`, `Repository::decide`): through
//! the repository on both stores, the retry that asks again, a service's error, the test kit.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use eventfold::prelude::*;
use eventfold::testing::AggregateTest;
use eventfold::{SqliteEventStore, SqliteOptions};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Portfolio")]
enum PortfolioEvent {
    #[domain_event(name = "PortfolioFunded")]
    Funded { cents: u64 },
    #[domain_event(name = "SharesBought")]
    Bought {
        symbol: String,
        shares: u64,
        cents: u64,
    },
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum PortfolioError {
    #[error("{cost} cents needed, {cash} in cash")]
    NotEnoughCash { cash: u64, cost: u64 },
}

/// The pure commands.
#[derive(Debug, Clone)]
enum PortfolioCommand {
    Fund(u64),
}

/// A command that must ask the price feed before it decides; deliberately not `Clone`.
#[derive(Debug)]
struct Buy {
    symbol: String,
    shares: u64,
}

fn buy(shares: u64) -> Buy {
    Buy {
        symbol: "ACME".into(),
        shares,
    }
}

#[derive(Debug, Default)]
struct Portfolio {
    cash: u64,
    shares: u64,
}

impl Aggregate for Portfolio {
    type Event = PortfolioEvent;
    type Command = PortfolioCommand;
    type Error = PortfolioError;

    fn apply(&mut self, event: &PortfolioEvent) {
        match event {
            PortfolioEvent::Funded { cents } => self.cash += cents,
            PortfolioEvent::Bought { shares, cents, .. } => {
                self.cash -= cents;
                self.shares += shares;
            }
        }
    }

    fn handle(&self, command: PortfolioCommand) -> Result<Vec<PortfolioEvent>, PortfolioError> {
        match command {
            PortfolioCommand::Fund(cents) => Ok(vec![PortfolioEvent::Funded { cents }]),
        }
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("no price for {symbol}")]
struct NoPrice {
    symbol: String,
}

/// A price feed: a fixed price per share, a count of the questions asked, and a hook run
/// on the first question (to make another writer overtake the decision).
#[derive(Default)]
struct Prices {
    cents_per_share: u64,
    asked: AtomicU32,
    cash_seen: Mutex<Vec<u64>>,
    overtake: Option<Repository<Portfolio>>,
}

impl Prices {
    fn at(cents_per_share: u64) -> Self {
        Prices {
            cents_per_share,
            ..Prices::default()
        }
    }

    async fn quote(&self, symbol: &str, cash: u64) -> Result<u64, NoPrice> {
        let first = self.asked.fetch_add(1, Ordering::SeqCst) == 0;
        self.cash_seen.lock().unwrap().push(cash);
        if first && let Some(other) = &self.overtake {
            // Another writer funds the portfolio between this decision's load and append.
            other
                .execute("p-1", PortfolioCommand::Fund(1))
                .await
                .unwrap();
        }
        match symbol {
            "ACME" => Ok(self.cents_per_share),
            _ => Err(NoPrice {
                symbol: symbol.into(),
            }),
        }
    }
}

impl Decide<Buy> for Portfolio {
    type Services = Prices;
    type ServiceError = NoPrice;

    async fn decide(
        &self,
        command: &Buy,
        prices: &Prices,
    ) -> Result<Vec<PortfolioEvent>, DecisionError<PortfolioError, NoPrice>> {
        let price = prices
            .quote(&command.symbol, self.cash)
            .await
            .map_err(DecisionError::Service)?;
        let cost = price * command.shares;
        if cost > self.cash {
            return Err(DecisionError::Rejected(PortfolioError::NotEnoughCash {
                cash: self.cash,
                cost,
            }));
        }
        Ok(vec![PortfolioEvent::Bought {
            symbol: command.symbol.clone(),
            shares: command.shares,
            cents: cost,
        }])
    }
}

async fn buys_through_the_repository(repo: Repository<Portfolio>) {
    repo.execute("p-1", PortfolioCommand::Fund(1_000))
        .await
        .unwrap();
    let prices = Prices::at(30);
    let committed = repo.decide("p-1", buy(10), &prices).await.unwrap();
    assert_eq!(committed.version, 2);
    assert_eq!(
        committed.events,
        [PortfolioEvent::Bought {
            symbol: "ACME".into(),
            shares: 10,
            cents: 300
        }]
    );
    let refused = repo.decide("p-1", buy(100), &prices).await.unwrap_err();
    assert_eq!(
        refused.rejection(),
        Some(&PortfolioError::NotEnoughCash {
            cash: 700,
            cost: 3_000
        })
    );
    let (portfolio, version) = repo.load("p-1").await.unwrap();
    assert_eq!((portfolio.cash, portfolio.shares, version), (700, 10, 2));
    assert_eq!(prices.asked.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_service_backed_command_runs_through_the_repository_on_the_memory_store() {
    buys_through_the_repository(Repository::new(InMemoryEventStore::new())).await;
}

#[tokio::test]
async fn a_service_backed_command_runs_through_the_repository_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteEventStore::open(dir.path().join("decide.db"), SqliteOptions::new())
        .await
        .unwrap();
    buys_through_the_repository(Repository::new(store.clone())).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_service_backed_command_runs_from_the_state_cache() {
    let repo = Repository::<Portfolio>::new(InMemoryEventStore::new()).cache(8);
    buys_through_the_repository(repo.clone()).await;
    assert!(repo.cache_statistics().unwrap().hits > 0);
}

#[tokio::test]
async fn a_conflict_reloads_and_asks_the_services_again() {
    let store = InMemoryEventStore::new();
    let repo = Repository::<Portfolio>::new(store.clone());
    repo.execute("p-1", PortfolioCommand::Fund(1_000))
        .await
        .unwrap();
    let prices = Prices {
        overtake: Some(Repository::new(store)),
        ..Prices::at(30)
    };
    let committed = repo.decide("p-1", buy(10), &prices).await.unwrap();
    // Asked on the first load (1,000 cents), overtaken by a deposit of 1, asked again on
    // the reloaded state.
    assert_eq!(prices.asked.load(Ordering::SeqCst), 2);
    assert_eq!(*prices.cash_seen.lock().unwrap(), [1_000, 1_001]);
    assert_eq!(committed.version, 3);
    let (portfolio, _) = repo.load("p-1").await.unwrap();
    assert_eq!(portfolio.cash, 701);
}

#[tokio::test]
async fn a_conflict_beyond_the_retries_is_the_conflict() {
    let store = InMemoryEventStore::new();
    let repo = Repository::<Portfolio>::new(store.clone()).max_retries(0);
    let prices = Prices {
        overtake: Some(Repository::new(store)),
        ..Prices::at(0)
    };
    let error = repo.decide("p-1", buy(1), &prices).await.unwrap_err();
    assert!(
        matches!(&error, CommandError::Store(e) if e.is_conflict()),
        "{error:?}"
    );
    assert_eq!(prices.asked.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_service_error_is_its_own_typed_error_and_stores_nothing() {
    let store = InMemoryEventStore::new();
    let repo = Repository::<Portfolio>::new(store.clone());
    repo.execute("p-1", PortfolioCommand::Fund(1_000))
        .await
        .unwrap();
    let prices = Prices::at(30);
    let unknown = Buy {
        symbol: "NOPE".into(),
        shares: 1,
    };
    let error = repo.decide("p-1", unknown, &prices).await.unwrap_err();
    assert_eq!(
        error.service_error(),
        Some(&NoPrice {
            symbol: "NOPE".into()
        })
    );
    assert!(error.rejection().is_none());
    assert_eq!(error.to_string(), "no price for NOPE");
    // Not retried: one question, and the stream is as it was.
    assert_eq!(prices.asked.load(Ordering::SeqCst), 1);
    let stream = StreamId::new("Portfolio", "p-1");
    assert_eq!(store.stream_version(&stream).await.unwrap(), 1);
}

#[tokio::test]
async fn decide_with_stores_the_metadata_and_its_future_is_send() {
    let store = InMemoryEventStore::new();
    let repo = Repository::<Portfolio>::new(store.clone());
    repo.execute("p-1", PortfolioCommand::Fund(100))
        .await
        .unwrap();
    let correlation = eventfold::backend::Uuid::new_v4();
    let metadata = Metadata::new().with_correlation_id(correlation);
    let task = tokio::spawn(async move {
        let prices = Prices::at(10);
        repo.decide_with("p-1", buy(2), &prices, metadata).await
    });
    task.await.unwrap().unwrap();
    let stored = store
        .read_stream(&StreamId::new("Portfolio", "p-1"), 2)
        .await
        .unwrap();
    assert_eq!(stored[0].metadata.correlation_id, Some(correlation));
}

#[tokio::test]
async fn the_test_kit_decides_with_the_services_given() {
    let funded = || PortfolioEvent::Funded { cents: 100 };
    AggregateTest::<Portfolio>::given([funded()])
        .when_deciding(buy(3), &Prices::at(20))
        .await
        .then_events([PortfolioEvent::Bought {
            symbol: "ACME".into(),
            shares: 3,
            cents: 60,
        }]);
    AggregateTest::<Portfolio>::given([funded()])
        .when_deciding(buy(6), &Prices::at(20))
        .await
        .then_error(PortfolioError::NotEnoughCash {
            cash: 100,
            cost: 120,
        });
    let unknown = Buy {
        symbol: "NOPE".into(),
        shares: 1,
    };
    AggregateTest::<Portfolio>::given([funded()])
        .when_deciding(unknown, &Prices::at(20))
        .await
        .then_service_error_matches(|e| e.symbol == "NOPE");
}

#[tokio::test]
#[should_panic(expected = "a service failed")]
async fn the_test_kit_reports_a_service_error_where_a_refusal_was_expected() {
    let unknown = Buy {
        symbol: "NOPE".into(),
        shares: 1,
    };
    AggregateTest::<Portfolio>::given_nothing()
        .when_deciding(unknown, &Prices::at(20))
        .await
        .then_error(PortfolioError::NotEnoughCash { cash: 0, cost: 0 });
}
