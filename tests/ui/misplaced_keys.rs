use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", aggregate_id)]
enum AccountEvent {
    #[domain_event(aggregate = "Ledger")]
    Opened {
        #[domain_event(name = "owner")]
        owner: String,
    },
    Deposited(#[domain_event(aggregate_id = true)] String),
}

fn main() {}
