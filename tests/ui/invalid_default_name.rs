use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct _OrderFilled {
    price: u64,
}

fn main() {}
