use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = Account, crate = "not a path")]
struct Opened {
    owner: String,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate)]
struct Closed;

fn main() {}
