use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    #[serde(skip)]
    Draft,
    Opened { owner: String },
    #[serde(rename = "closed", skip_deserializing)]
    Closed,
    #[serde(other)]
    Unknown,
}

fn main() {}
