// A group is an enum whose variants each hold one event type, which keeps its own name,
// version and aggregate id; every mistake is reported at once.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened;

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Closed;

#[derive(DomainEvent)]
#[domain_event(group, version = 2)]
enum AccountEvent {
    #[domain_event(name = "AccountOpened")]
    Opened(Opened),
    Closed(#[domain_event(aggregate_id)] Closed),
    Frozen { since: u64 },
    Pair(Opened, Closed),
    Unit,
}

#[derive(DomainEvent)]
#[domain_event(group = true)]
enum Valued {
    Opened(Opened),
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", group)]
struct NotAnEnum;

#[derive(DomainEvent)]
#[domain_event(group)]
enum Empty {}

fn main() {}
