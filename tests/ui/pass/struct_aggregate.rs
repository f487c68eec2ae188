// An aggregate whose events are structs only, grouped: through the repository, the bus and
// the test kit, without `const TYPE` and without serde on the group.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use eventfold::prelude::*;
use eventfold::testing::AggregateTest;
use eventfold::{Delivery, EventBus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Cart", name = "CartItemAdded")]
struct ItemAdded {
    #[domain_event(aggregate_id)]
    cart: String,
    sku: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Cart", name = "CartCheckedOut", version = 2)]
struct CheckedOut {
    #[domain_event(aggregate_id)]
    cart: String,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[domain_event(aggregate = "Cart", group)]
enum CartEvent {
    ItemAdded(ItemAdded),
    CheckedOut(CheckedOut),
}

#[derive(Debug, Default)]
struct Cart {
    items: usize,
    done: bool,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("the cart is checked out")]
struct Done;

#[derive(Clone)]
enum CartCommand {
    Add(String),
    CheckOut,
}

impl Aggregate for Cart {
    type Event = CartEvent;
    type Command = (String, CartCommand);
    type Error = Done;

    fn apply(&mut self, event: &CartEvent) {
        match event {
            CartEvent::ItemAdded(_) => self.items += 1,
            CartEvent::CheckedOut(_) => self.done = true,
        }
    }

    fn handle(&self, (cart, command): (String, CartCommand)) -> Result<Vec<CartEvent>, Done> {
        if self.done {
            return Err(Done);
        }
        Ok(vec![match command {
            CartCommand::Add(sku) => ItemAdded { cart, sku }.into(),
            CartCommand::CheckOut => CheckedOut { cart }.into(),
        }])
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    registry().validate().unwrap();
    assert_eq!(<Cart as Aggregate>::TYPE, "Cart");

    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let bus = EventBus::builder().store(Arc::clone(&store)).build().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    bus.subscribe("cart-log", move |d: Delivery<CartEvent>| {
        log.lock().unwrap().push(d.event().event_type());
        async { Ok::<_, eventfold::Error>(()) }
    })
    .register()
    .unwrap();
    let checkouts = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&checkouts);
    bus.subscribe("checkouts", move |d: Delivery<CheckedOut>| {
        log.lock().unwrap().push(d.event().cart.clone());
        async { Ok::<_, eventfold::Error>(()) }
    })
    .register()
    .unwrap();
    bus.start().await.unwrap();

    let repo = Repository::<Cart>::new(Arc::clone(&store));
    let add = |sku: &str| ("c-1".to_owned(), CartCommand::Add(sku.into()));
    repo.execute("c-1", add("apple")).await.unwrap();
    repo.execute("c-1", add("pear")).await.unwrap();
    repo.execute("c-1", ("c-1".to_owned(), CartCommand::CheckOut)).await.unwrap();
    let (cart, version) = repo.load("c-1").await.unwrap();
    assert_eq!((cart.items, cart.done, version), (2, true, 3));

    bus.wait_idle().await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        ["CartItemAdded", "CartItemAdded", "CartCheckedOut"]
    );
    assert_eq!(*checkouts.lock().unwrap(), ["c-1"]);
    bus.stop().await.unwrap();

    AggregateTest::<Cart>::given([ItemAdded { cart: "c-2".into(), sku: "fig".into() }.into()])
        .when(("c-2".into(), CartCommand::CheckOut))
        .then_events([CheckedOut { cart: "c-2".into() }.into()]);
    AggregateTest::<Cart>::given([CheckedOut { cart: "c-2".into() }.into()])
        .when(("c-2".into(), CartCommand::Add("fig".into())))
        .then_error(Done);
}
