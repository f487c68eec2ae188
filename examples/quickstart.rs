//! A bank account, event-sourced on a SQLite file in the working directory, or on the
//! store a URL names.
//!
//! Run it twice: the second run rebuilds the account from what the first one stored and
//! carries on from there.
//!
//! ```sh
//! cargo run --example quickstart
//! cargo run --example quickstart -- postgres://postgres@127.0.0.1:5432/test
//! ```

use eventfold::prelude::*;
use eventfold::{EventSystem, StoreUrl};
use serde::{Deserialize, Serialize};

/// What can happen to an account. Each variant is one stored event type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened {
        owner: String,
    },
    #[domain_event(name = "FundsDeposited", version = 2)]
    Deposited {
        amount: u64,
    },
    Withdrawn {
        amount: u64,
    },
}

/// The account's state: the fold of its events.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: u64,
}

#[derive(Debug, Clone)]
enum AccountCommand {
    Open { owner: String },
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Debug, thiserror::Error)]
enum AccountError {
    #[error("the account is already open")]
    AlreadyOpen,
    #[error("the account is not open")]
    NotOpen,
    #[error("insufficient funds: the balance is {balance}, {asked} was asked")]
    InsufficientFunds { balance: u64, asked: u64 },
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { owner } => self.owner = Some(owner.clone()),
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }

    fn handle(&self, command: AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { .. } if self.owner.is_some() => Err(AccountError::AlreadyOpen),
            AccountCommand::Open { owner } => Ok(vec![AccountEvent::Opened { owner }]),
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            AccountCommand::Deposit(amount) => Ok(vec![AccountEvent::Deposited { amount }]),
            AccountCommand::Withdraw(asked) if asked > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    asked,
                })
            }
            AccountCommand::Withdraw(amount) => Ok(vec![AccountEvent::Withdrawn { amount }]),
        }
    }
}

/// Where the events are unless the first argument names a store URL.
const DATABASE: &str = "sqlite://eventfold-quickstart.db";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Fail fast if an event type is missing or claimed twice.
    registry().validate()?;
    registry().expect_type::<AccountEvent>()?;

    // The same program on SQLite or PostgreSQL: only the URL differs.
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DATABASE.to_owned());
    let system = EventSystem::open_url(&url).await?;
    let url: StoreUrl = url.parse()?; // shown with any password hidden
    let store = system.store();
    let repo = system.repository::<Account>().snapshot_every(10);

    let (before, version) = repo.load("acc-1").await?;
    if version == 0 {
        println!("{url}: a new store; opening account acc-1");
        repo.execute(
            "acc-1",
            AccountCommand::Open {
                owner: "Ada".into(),
            },
        )
        .await?;
    } else {
        println!(
            "{url}: found acc-1 at version {version} with balance {} from earlier runs",
            before.balance
        );
    }

    repo.execute("acc-1", AccountCommand::Deposit(100)).await?;
    repo.execute("acc-1", AccountCommand::Withdraw(30)).await?;
    match repo
        .execute("acc-1", AccountCommand::Withdraw(1_000_000))
        .await
    {
        Err(CommandError::Rejected(reason)) => println!("refused as it should be: {reason}"),
        other => return Err(format!("expected a refusal, got {other:?}").into()),
    }

    println!("\nevents of acc-1 (version, position, type, payload):");
    let stream = StreamId::new("Account", "acc-1");
    for event in store.read_stream(&stream, 1).await? {
        println!(
            "  v{:<3} @{:<4} {:<15} {}",
            event.version, event.position, event.event_type, event.payload
        );
    }

    let (account, version) = repo.load("acc-1").await?;
    println!(
        "\nacc-1 rebuilt from its events: owner {}, balance {}, version {version}",
        account.owner.as_deref().unwrap_or("-"),
        account.balance
    );
    let stats = store.statistics().await?;
    println!(
        "the store holds {} events of {} aggregates; run again to continue from here",
        stats.events, stats.aggregates
    );
    system.shutdown().await?;
    Ok(())
}
