use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", aggregat_type = "Account")]
enum AccountEvent {
    #[domain_event(rename = "AccountOpened")]
    Opened { owner: String },
}

fn main() {}
