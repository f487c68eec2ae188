use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    #[domain_event(version = 4294967296)]
    Opened { owner: String },
    #[domain_event(version = -1)]
    Closed,
}

fn main() {}
