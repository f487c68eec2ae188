// A member of a group belongs to the group's aggregate: one of another aggregate is refused
// at its own tokens, whether the group names its aggregate or takes its first member's.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened;

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Order")]
struct OrderPlaced;

#[derive(DomainEvent)]
#[domain_event(aggregate = "Account", group)]
enum AccountEvent {
    Opened(Opened),
    Placed(OrderPlaced),
}

#[derive(DomainEvent)]
#[domain_event(group)]
enum Mixed {
    Opened(Opened),
    Placed(OrderPlaced),
}

fn main() {}
