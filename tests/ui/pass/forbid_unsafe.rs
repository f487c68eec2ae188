#![forbid(unsafe_code)]

use eventfold::{DomainEvent, registry};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened { owner: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct AccountClosed;

fn main() {
    assert!(registry().get("Opened").is_some());
    assert!(registry().get("AccountClosed").is_some());
}
