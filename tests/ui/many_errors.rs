use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "", versoin = 2)]
enum AccountEvent {
    #[domain_event(version = 0)]
    Opened { owner: String },
    #[domain_event(name = "funds deposited")]
    Deposited { amount: u64 },
    #[domain_event(name = "Opened")]
    Reopened,
    #[domain_event(version = 1, version = 2)]
    Closed,
}

fn main() {}
