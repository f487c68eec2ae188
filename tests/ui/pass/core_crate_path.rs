// A crate that depends on eventfold-core (and the macro crate) directly, not on the
// facade, names the runtime with `crate = ".."`.
use eventfold_core::{DomainEvent, registry};
use eventfold_macros::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", crate = "eventfold_core")]
enum AccountEvent {
    CoreOpened { owner: String },
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", crate = "::eventfold_core")]
struct CoreClosed;

fn main() {
    assert_eq!(AccountEvent::CoreOpened { owner: "ada".into() }.event_type(), "CoreOpened");
    assert_eq!(CoreClosed.event_type(), "CoreClosed");
    assert!(registry().get("CoreOpened").is_some());
    assert!(registry().get("CoreClosed").is_some());
}
