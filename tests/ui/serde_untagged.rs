use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(untagged)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
