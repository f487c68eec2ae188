use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened<'a> {
    owner: &'a str,
}

fn main() {}
