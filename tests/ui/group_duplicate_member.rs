// A type is a member of a group once: a second variant holding it is refused there, and
// a second name of it (an alias) by the group's check of its event type names.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened;

type AlsoOpened = Opened;

#[derive(DomainEvent)]
#[domain_event(group)]
enum AccountEvent {
    Opened(Opened),
    Reopened(Opened),
}

#[derive(DomainEvent)]
#[domain_event(group)]
enum Aliased {
    Opened(Opened),
    Again(AlsoOpened),
}

fn main() {}
