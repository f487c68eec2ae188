use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
struct Wire {
    kind: String,
}

impl From<AccountEvent> for Wire {
    fn from(_: AccountEvent) -> Self {
        Wire { kind: "opened".into() }
    }
}

impl From<Wire> for AccountEvent {
    fn from(_: Wire) -> Self {
        AccountEvent::Opened
    }
}

#[derive(Clone, Serialize, Deserialize, DomainEvent)]
#[serde(into = "Wire", from = "Wire")]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened,
}

fn main() {}
