use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[serde(tag = "type", content = "data")]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened { owner: String },
}

fn main() {}
