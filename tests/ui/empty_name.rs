use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    #[domain_event(name = "")]
    Opened { owner: String },
}

fn main() {}
