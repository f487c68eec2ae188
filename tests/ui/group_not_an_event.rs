// Every member of a group is a DomainEvent of its own.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened;

#[derive(Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(DomainEvent)]
#[domain_event(group)]
enum AccountEvent {
    Opened(Opened),
    Deposited(Deposited),
}

fn main() {}
