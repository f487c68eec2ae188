//! Strategies and orders of a trading system on an event bus, durable on a SQLite file
//! (or on the store a URL names, given as the first argument).
//!
//! - Strategies raise signals through a [`DomainEventPublisher`] (they never see the bus).
//! - Orders are aggregates: placed and filled through a repository; every event the
//!   repository stores reaches the subscribers without a second publish.
//! - `positions` is a projection that keeps its state in a JSON file with the last position
//!   it applied, so a redelivery after a crash is skipped (delivery is at least once).
//! - `notifier` fails its first two attempts at every event and succeeds on the third.
//! - `broker-gateway` always fails: its events end in the dead letters.
//!
//! At the end the program stores a few more orders while the bus is down. Run it again:
//! the subscriptions catch up on those first, from their checkpoints.
//!
//! ```sh
//! cargo run --example trading      # twice
//! cargo run --example trading -- postgres://postgres@127.0.0.1:5432/test
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventfold::prelude::*;
use eventfold::{Delivery, DomainEventPublisher, EventSystem, Outgoing, RetryPolicy, StoreUrl};
use serde::{Deserialize, Serialize};

/// Where the events are unless the first argument names a store URL.
const DATABASE: &str = "sqlite://eventfold-trading.db";
/// The positions projection's file, one per kind of store: the positions it holds are
/// that store's.
const POSITIONS: &str = "eventfold-trading-positions";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Side {
    Buy,
    Sell,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Strategy")]
enum StrategyEvent {
    SignalRaised {
        #[domain_event(aggregate_id)]
        strategy: String,
        symbol: String,
        side: Side,
        quantity: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
enum OrderEvent {
    #[domain_event(name = "OrderPlaced")]
    Placed {
        strategy: String,
        symbol: String,
        side: Side,
        quantity: u64,
        limit: u64,
    },
    #[domain_event(name = "OrderFilled")]
    Filled { quantity: u64, price: u64 },
}

#[derive(Debug, Default)]
struct Order {
    placed: Option<(String, Side, u64)>,
    filled: u64,
}

#[derive(Debug, Clone)]
enum OrderCommand {
    Place {
        strategy: String,
        symbol: String,
        side: Side,
        quantity: u64,
        limit: u64,
    },
    Fill {
        quantity: u64,
        price: u64,
    },
}

#[derive(Debug, thiserror::Error)]
enum OrderError {
    #[error("the order exists already")]
    AlreadyPlaced,
    #[error("no such order")]
    NotPlaced,
    #[error("a fill of {asked} exceeds the {open} still open")]
    Overfill { asked: u64, open: u64 },
}

impl Aggregate for Order {
    type Event = OrderEvent;
    type Command = OrderCommand;
    type Error = OrderError;

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed {
                symbol,
                side,
                quantity,
                ..
            } => self.placed = Some((symbol.clone(), *side, *quantity)),
            OrderEvent::Filled { quantity, .. } => self.filled += quantity,
        }
    }

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        match (command, &self.placed) {
            (OrderCommand::Place { .. }, Some(_)) => Err(OrderError::AlreadyPlaced),
            (
                OrderCommand::Place {
                    strategy,
                    symbol,
                    side,
                    quantity,
                    limit,
                },
                None,
            ) => Ok(vec![OrderEvent::Placed {
                strategy,
                symbol,
                side,
                quantity,
                limit,
            }]),
            (OrderCommand::Fill { .. }, None) => Err(OrderError::NotPlaced),
            (OrderCommand::Fill { quantity, price }, Some((_, _, ordered))) => {
                let open = ordered - self.filled;
                if quantity > open {
                    return Err(OrderError::Overfill {
                        asked: quantity,
                        open,
                    });
                }
                Ok(vec![OrderEvent::Filled { quantity, price }])
            }
        }
    }
}

/// A strategy that publishes signals, knowing only a publisher.
struct Momentum {
    name: String,
    publisher: Arc<dyn DomainEventPublisher<StrategyEvent>>,
}

impl Momentum {
    async fn signal(&self, symbol: &str, side: Side, quantity: u64) -> eventfold::Result<u64> {
        let event = StrategyEvent::SignalRaised {
            strategy: self.name.clone(),
            symbol: symbol.into(),
            side,
            quantity,
        };
        self.publisher.publish_event(Outgoing::new(event)).await
    }
}

/// Net position per symbol, kept in a file with the last log position applied.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Positions {
    applied_through: u64,
    /// Symbol -> (side, quantity) of each order, to know what a fill moves.
    orders: BTreeMap<String, (String, Side)>,
    net: BTreeMap<String, i64>,
}

impl Positions {
    fn load(file: &str) -> Positions {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    fn save(&self, file: &str) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        let temporary = format!("{file}.tmp");
        std::fs::write(&temporary, text)?;
        std::fs::rename(temporary, file)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    registry().expect_type::<StrategyEvent>()?;
    registry().expect_type::<OrderEvent>()?;
    // The same program on SQLite or PostgreSQL: only the URL differs.
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DATABASE.to_owned());
    let system = EventSystem::builder_url(&url)?
        .bus(|bus| bus.workers(4).queue_capacity(10_000))
        .open()
        .await?;
    let bus = system.bus();
    let head = system.store().head_position().await?;
    let shown: StoreUrl = url.parse()?; // with any password hidden
    println!("{shown}: {head} events stored by earlier runs");
    let scheme = url.split(':').next().unwrap_or("store");
    let positions_file = format!("{POSITIONS}-{scheme}.json");

    // The positions projection: idempotent by log position.
    let positions = Arc::new(std::sync::Mutex::new(Positions::load(&positions_file)));
    let caught_up = Arc::new(AtomicU64::new(0));
    let projection = {
        let positions = Arc::clone(&positions);
        let caught_up = Arc::clone(&caught_up);
        let file = positions_file.clone();
        move |d: Delivery<OrderEvent>| {
            let mut p = positions.lock().unwrap();
            if d.record().position <= p.applied_through {
                return std::future::ready(Ok(()));
            }
            if d.record().position <= head {
                caught_up.fetch_add(1, Ordering::Relaxed);
            }
            let order = d.record().aggregate_id.clone();
            match d.event() {
                OrderEvent::Placed { symbol, side, .. } => {
                    p.orders.insert(order, (symbol.clone(), *side));
                }
                OrderEvent::Filled { quantity, .. } => {
                    if let Some((symbol, side)) = p.orders.get(&order).cloned() {
                        let signed = match side {
                            Side::Buy => *quantity as i64,
                            Side::Sell => -(*quantity as i64),
                        };
                        *p.net.entry(symbol).or_default() += signed;
                    }
                }
            }
            p.applied_through = d.record().position;
            std::future::ready(p.save(&file))
        }
    };
    bus.subscribe("positions", projection).register()?;

    // A notifier whose first two attempts at every event fail.
    bus.subscribe("notifier", |d: Delivery<OrderEvent>| async move {
        if d.attempt() < 3 {
            return Err(format!("mail server busy (attempt {})", d.attempt()));
        }
        if let OrderEvent::Filled { quantity, price } = d.event() {
            println!(
                "  notifier: order {} filled {quantity} @ {price} (attempt {})",
                d.record().aggregate_id,
                d.attempt()
            );
        }
        Ok(())
    })
    .priority(1)
    .retry(RetryPolicy::exponential(
        5,
        Duration::from_millis(20),
        Duration::from_millis(200),
    ))
    .register()?;

    // A gateway that is down: every attempt fails, then the event is dead-lettered.
    bus.subscribe("broker-gateway", |_: Delivery<StrategyEvent>| async {
        Err::<(), _>("broker connection refused")
    })
    .priority(2)
    .retry(RetryPolicy::exponential(
        3,
        Duration::from_millis(10),
        Duration::from_millis(50),
    ))
    .register()?;

    bus.wait_idle().await?;
    println!(
        "caught up on {} order events stored while the bus was down",
        caught_up.load(Ordering::Relaxed)
    );

    // This run's trading.
    let run = head + 1;
    let strategy = Momentum {
        name: "momentum".into(),
        publisher: Arc::new(bus.clone()),
    };
    let orders = system.repository::<Order>();
    for (i, (symbol, side, quantity)) in [("BTC", Side::Buy, 3), ("ETH", Side::Sell, 5)]
        .into_iter()
        .enumerate()
    {
        strategy.signal(symbol, side, quantity).await?;
        let id = format!("order-{run}-{i}");
        orders
            .execute(
                &id,
                OrderCommand::Place {
                    strategy: strategy.name.clone(),
                    symbol: symbol.into(),
                    side,
                    quantity,
                    limit: 100,
                },
            )
            .await?;
        orders
            .execute(
                &id,
                OrderCommand::Fill {
                    quantity,
                    price: 99,
                },
            )
            .await?;
    }
    bus.wait_idle().await?;

    println!("positions: {:?}", positions.lock().unwrap().net);
    for dead in bus.dead_letters(None).await? {
        println!(
            "dead letter #{}: {} at position {} after {} attempts: {}",
            dead.id, dead.subscription, dead.position, dead.attempts, dead.error
        );
    }
    let stats = bus.statistics().await?;
    println!("statistics:\n{}", serde_json::to_string_pretty(&stats)?);
    system.shutdown().await?;

    // Orders stored while no bus runs: the next run's subscriptions catch up on them.
    let system = EventSystem::open_url(&url).await?;
    let offline = system.repository::<Order>();
    let id = format!("order-{run}-offline");
    offline
        .execute(
            &id,
            OrderCommand::Place {
                strategy: "manual".into(),
                symbol: "BTC".into(),
                side: Side::Sell,
                quantity: 1,
                limit: 100,
            },
        )
        .await?;
    offline
        .execute(
            &id,
            OrderCommand::Fill {
                quantity: 1,
                price: 101,
            },
        )
        .await?;
    system.shutdown().await?;
    println!("stored 2 order events with the bus down; run again to see the catch-up");
    Ok(())
}
