use eventfold::{DomainEvent, EventType, registry};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", version = 3)]
enum AccountEvent {
    #[domain_event(version = 1)]
    Opened { owner: String },
    #[domain_event(name = "FundsDeposited", version = 2)]
    Deposited { amount: u64 },
    #[domain_event(name = "account.closed:v-1")]
    Closed,
}

fn round_trip(event: AccountEvent, name: &str, version: u32) {
    assert_eq!(event.event_type(), name);
    assert_eq!(event.schema_version(), version);
    let payload = event.to_payload().unwrap();
    let back: AccountEvent = registry().decode(name, version, &payload).unwrap();
    assert_eq!(back, event);
}

fn main() {
    assert_eq!(
        AccountEvent::EVENT_TYPES,
        &[
            EventType::new("Opened", 1),
            EventType::new("FundsDeposited", 2),
            EventType::new("account.closed:v-1", 3),
        ]
    );
    round_trip(AccountEvent::Opened { owner: "ada".into() }, "Opened", 1);
    round_trip(AccountEvent::Deposited { amount: 5 }, "FundsDeposited", 2);
    round_trip(AccountEvent::Closed, "account.closed:v-1", 3);
    assert_eq!(registry().get("FundsDeposited").unwrap().aggregate_type, "Account");
}
