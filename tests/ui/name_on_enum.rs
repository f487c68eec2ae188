use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", name = "AccountEvent")]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
