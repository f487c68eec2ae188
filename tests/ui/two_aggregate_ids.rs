use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Transfer")]
enum TransferEvent {
    Sent {
        #[domain_event(aggregate_id)]
        from: String,
        #[domain_event(aggregate_id)]
        to: String,
    },
}

fn main() {}
