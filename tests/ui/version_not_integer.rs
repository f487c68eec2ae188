use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order", version = "2")]
struct OrderPlaced {
    price: u64,
}

fn main() {}
