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
//! With `--split N` it instead runs a positions projection in N processes (the program
//! started again as children) on one SQLite file, `eventfold-trading-split.db` (made
//! afresh): the subscription has 8 segments, each process leases its share, and the
//! parent prints which segments each one held, which orders it projected, and checks
//! that every fill was projected once, in order per order, and that the positions the
//! processes hold add up to the trades.
//!
//! ```sh
//! cargo run --example trading      # twice
//! cargo run --example trading -- postgres://postgres@127.0.0.1:5432/test
//! cargo run --example trading -- --split 2
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
    let first = std::env::args().nth(1);
    match first.as_deref() {
        Some("--split") => {
            let processes = std::env::args()
                .nth(2)
                .ok_or("--split needs a process count")?
                .parse()?;
            return split::run(processes).await;
        }
        Some(split::MEMBER_FLAG) => {
            let member = std::env::args().nth(2).ok_or("a member needs its id")?;
            return split::member(&member).await;
        }
        _ => {}
    }
    // The same program on SQLite or PostgreSQL: only the URL differs.
    let url = first.unwrap_or_else(|| DATABASE.to_owned());
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

/// `--split N`: the positions projection in N processes on one SQLite file.
mod split {
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use eventfold::lease::segment_of;
    use eventfold::prelude::*;
    use eventfold::{Delivery, EventSystem, StreamId};

    use super::{Order, OrderCommand, OrderEvent, Side};

    /// The hidden argument that makes the program a member: `--split-member <id>`.
    pub const MEMBER_FLAG: &str = "--split-member";
    /// The file the processes share, made afresh by every `--split` run.
    const FILE: &str = "eventfold-trading-split.db";
    const SUBSCRIPTION: &str = "positions-split";
    const SEGMENTS: u32 = 8;
    /// Short leases: a member that dies is taken over within 2 s.
    const LEASE_TTL: Duration = Duration::from_secs(2);
    /// Orders stored before the members start, and as many again while they run.
    const ORDERS: usize = 6;
    const FILLS: u64 = 3;
    /// Only a hang reaches it.
    const GUARD: Duration = Duration::from_secs(60);

    type Res<T> = Result<T, Box<dyn std::error::Error>>;

    /// The parent: stores orders, starts the members, stores more orders while they run,
    /// waits until every segment's checkpoint is at the head, stops them and checks what
    /// they projected.
    pub async fn run(processes: usize) -> Res<()> {
        if processes == 0 {
            return Err("--split needs at least one process".into());
        }
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{FILE}{suffix}"));
        }
        let system = EventSystem::open(FILE).await?;
        let orders = system.repository::<Order>();
        let mut expected = BTreeMap::<String, i64>::new();
        let mut fills = 0;
        let mut trade = async |i: usize| -> Res<()> {
            let symbol = ["BTC", "ETH", "SOL"][i % 3];
            let side = if i.is_multiple_of(2) {
                Side::Buy
            } else {
                Side::Sell
            };
            let id = format!("order-{i}");
            let lot = i as u64 % 4 + 1;
            let place = OrderCommand::Place {
                strategy: "momentum".into(),
                symbol: symbol.into(),
                side,
                quantity: FILLS * lot,
                limit: 100,
            };
            orders.execute(&id, place).await?;
            for fill in 0..FILLS {
                let fill = OrderCommand::Fill {
                    quantity: lot,
                    price: 98 + fill,
                };
                orders.execute(&id, fill).await?;
            }
            let signed = if side == Side::Buy { 1 } else { -1 } * (FILLS * lot) as i64;
            *expected.entry(symbol.to_owned()).or_default() += signed;
            fills += FILLS;
            Ok(())
        };
        for i in 0..ORDERS {
            trade(i).await?;
        }
        println!(
            "{FILE}: {} order events stored; starting {processes} processes of one \
             subscription with {SEGMENTS} segments",
            system.store().head_position().await?
        );

        let exe = std::env::current_exe()?;
        let mut members = Vec::new();
        for m in 0..processes {
            let mut child = Command::new(&exe)
                .args([MEMBER_FLAG, &format!("member-{m}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()?;
            let mut out = BufReader::new(child.stdout.take().ok_or("a member's stdout")?);
            let mut line = String::new();
            out.read_line(&mut line)?;
            if line.trim() != "ready" {
                return Err(format!("a member said {line:?} instead of `ready`").into());
            }
            members.push((child, out));
        }
        // Every member is a live member of the subscription before any claims a segment,
        // so each takes its share at once.
        for (child, _) in &mut members {
            let stdin = child.stdin.as_mut().ok_or("a member's stdin")?;
            stdin.write_all(b"go\n")?;
            stdin.flush()?;
        }
        for i in ORDERS..2 * ORDERS {
            trade(i).await?;
        }
        let head = system.store().head_position().await?;
        println!("{ORDERS} more orders stored while they run: head {head}");
        let started = std::time::Instant::now();
        let states = loop {
            let states = system.store().segment_states(SUBSCRIPTION).await?;
            if states.len() == SEGMENTS as usize && states.iter().all(|s| s.checkpoint >= head) {
                break states;
            }
            if started.elapsed() > GUARD {
                return Err(format!("the checkpoints did not reach {head}: {states:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut held = BTreeMap::<String, Vec<u32>>::new();
        for state in &states {
            let owner = state.owner.clone().unwrap_or_else(|| "(nobody)".into());
            held.entry(owner).or_default().push(state.segment);
        }

        // Stop the members (stdin closed) and read what they projected.
        let mut projected = BTreeMap::<String, Vec<(String, u64)>>::new();
        let mut net = BTreeMap::<String, i64>::new();
        let mut nets = BTreeMap::<String, BTreeMap<String, i64>>::new();
        for (m, (mut child, out)) in members.into_iter().enumerate() {
            drop(child.stdin.take());
            let member = format!("member-{m}");
            for line in out.lines() {
                let line = line?;
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["projected", order, version] => projected
                        .entry(member.clone())
                        .or_default()
                        .push(((*order).to_owned(), version.parse()?)),
                    ["net", symbol, quantity] => {
                        let quantity: i64 = quantity.parse()?;
                        *net.entry((*symbol).to_owned()).or_default() += quantity;
                        nets.entry(member.clone())
                            .or_default()
                            .insert((*symbol).to_owned(), quantity);
                    }
                    _ => return Err(format!("{member} said {line:?}").into()),
                }
            }
            if !child.wait()?.success() {
                return Err(format!("{member} failed").into());
            }
        }
        system.shutdown().await?;

        // Every order's events once, by one member, in version order, in its segment.
        let mut by_order = BTreeMap::<String, (String, Vec<u64>)>::new();
        let mut once_in_order = true;
        for (member, events) in &projected {
            for (order, version) in events {
                let entry = by_order
                    .entry(order.clone())
                    .or_insert_with(|| (member.clone(), Vec::new()));
                once_in_order &= entry.0 == *member;
                entry.1.push(*version);
            }
        }
        once_in_order &= by_order.len() == 2 * ORDERS;
        for (order, (member, versions)) in &by_order {
            let segment = segment_of(&StreamId::new(Order::TYPE, order), SEGMENTS);
            once_in_order &= versions.iter().copied().eq(1..=FILLS + 1);
            once_in_order &= held.get(member).is_some_and(|h| h.contains(&segment));
        }
        for (member, segments) in &held {
            let mut orders: Vec<u64> = by_order
                .iter()
                .filter(|(_, (m, _))| m == member)
                .filter_map(|(order, _)| order.trim_start_matches("order-").parse().ok())
                .collect();
            orders.sort_unstable();
            println!(
                "{member} held segments {segments:?}: projected {} events of orders {orders:?}, \
                 holds {:?}",
                projected.get(member).map_or(0, Vec::len),
                nets.get(member).cloned().unwrap_or_default()
            );
        }
        println!(
            "every fill projected once, in order per order: {} ({fills} fills of {} orders)",
            if once_in_order { "yes" } else { "NO" },
            by_order.len()
        );
        println!(
            "positions of the {processes} processes together: {net:?}; expected {expected:?}: {}",
            if net == expected {
                "equal"
            } else {
                "DIFFERENT"
            }
        );
        if !once_in_order || net != expected {
            return Err("the split projection went wrong".into());
        }
        Ok(())
    }

    /// What a member's projection holds: each order's symbol and side, the last version
    /// applied (a redelivery after a takeover is skipped), and the net per symbol.
    #[derive(Default)]
    struct Book {
        orders: BTreeMap<String, (String, Side, u64)>,
        net: BTreeMap<String, i64>,
    }

    /// A member: on `go` runs the positions projection on its share of the segments,
    /// printing `projected <order> <version>` for each event it applies; when stdin
    /// closes it stops and prints `net <symbol> <quantity>` for what it holds.
    pub async fn member(member: &str) -> Res<()> {
        let system = EventSystem::builder(FILE)
            .bus(|bus| bus.member_id(member).lease_ttl(LEASE_TTL))
            .open()
            .await?;
        system
            .store()
            .heartbeat(SUBSCRIPTION, member, LEASE_TTL * 5)
            .await?;
        let (lines, mut commands) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if line.map(|l| lines.send(l)).is_err() {
                    break;
                }
            }
        });
        println!("ready");
        std::io::stdout().flush()?;
        if commands.recv().await.as_deref() != Some("go") {
            return Err("a member expected `go`".into());
        }
        let book = Arc::new(Mutex::new(Book::default()));
        let projection = {
            let book = Arc::clone(&book);
            move |d: Delivery<OrderEvent>| {
                let mut book = book.lock().unwrap();
                let order = d.record().aggregate_id.clone();
                let version = d.record().version;
                let last = book.orders.get(&order).map_or(0, |o| o.2);
                if version > last {
                    match d.event() {
                        OrderEvent::Placed { symbol, side, .. } => {
                            book.orders
                                .insert(order.clone(), (symbol.clone(), *side, version));
                        }
                        OrderEvent::Filled { quantity, .. } => {
                            if let Some((symbol, side, applied)) = book.orders.get_mut(&order) {
                                *applied = version;
                                let signed = match side {
                                    Side::Buy => *quantity as i64,
                                    Side::Sell => -(*quantity as i64),
                                };
                                let symbol = symbol.clone();
                                *book.net.entry(symbol).or_default() += signed;
                            }
                        }
                    }
                    println!("projected {order} {version}");
                }
                std::future::ready(())
            }
        };
        system
            .bus()
            .subscribe(SUBSCRIPTION, projection)
            .segments(SEGMENTS)
            .register()?;
        while commands.recv().await.is_some() {}
        system.shutdown().await?;
        for (symbol, quantity) in &book.lock().unwrap().net {
            println!("net {symbol} {quantity}");
        }
        std::io::stdout().flush()?;
        Ok(())
    }
}
