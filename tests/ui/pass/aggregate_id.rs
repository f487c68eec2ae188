use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened {
        #[domain_event(aggregate_id)]
        account: String,
        owner: String,
    },
    Deposited(#[domain_event(aggregate_id)] u64, u64),
    Withdrawn(u64),
    Closed,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct OrderPlaced {
    price: u64,
    #[domain_event(aggregate_id)]
    order_id: char,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct OrderShipped(#[domain_event(aggregate_id)] String);

fn main() {
    let opened = AccountEvent::Opened { account: "acc-1".into(), owner: "ada".into() };
    assert_eq!(opened.aggregate_id().as_deref(), Some("acc-1"));
    assert_eq!(AccountEvent::Deposited(9, 100).aggregate_id().as_deref(), Some("9"));
    assert_eq!(AccountEvent::Withdrawn(1).aggregate_id(), None);
    assert_eq!(AccountEvent::Closed.aggregate_id(), None);
    let placed = OrderPlaced { price: 1, order_id: 'x' };
    assert_eq!(placed.aggregate_id().as_deref(), Some("x"));
    assert_eq!(OrderShipped("o-2".into()).aggregate_id().as_deref(), Some("o-2"));
}
