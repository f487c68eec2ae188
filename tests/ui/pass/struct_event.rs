use eventfold::{DomainEvent, EventType, registry};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order", name = "OrderFilled", version = 2)]
struct Filled {
    order_id: String,
    price: u64,
    volume: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct OrderCancelled(String);

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct OrderExpired;

fn main() {
    assert_eq!(Filled::EVENT_TYPES, &[EventType::new("OrderFilled", 2)]);
    let filled = Filled { order_id: "o-1".into(), price: 101, volume: 3 };
    let payload = filled.to_payload().unwrap();
    assert_eq!(payload, r#"{"order_id":"o-1","price":101,"volume":3}"#);
    let back: Filled = registry().decode("OrderFilled", 2, &payload).unwrap();
    assert_eq!(back, filled);

    let cancelled = OrderCancelled("late".into());
    assert_eq!(cancelled.event_type(), "OrderCancelled");
    let back: OrderCancelled = registry()
        .decode("OrderCancelled", 1, &cancelled.to_payload().unwrap())
        .unwrap();
    assert_eq!(back, cancelled);

    let back: OrderExpired = registry().decode("OrderExpired", 1, "null").unwrap();
    assert_eq!(back, OrderExpired);
}
