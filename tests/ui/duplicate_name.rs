use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Deposited { amount: u64 },
    #[domain_event(name = "Deposited", version = 2)]
    DepositedV2 { cents: u64 },
}

fn main() {}
