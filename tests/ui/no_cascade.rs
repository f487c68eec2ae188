// A mistake in the attribute is reported once: the derive still implements `DomainEvent`
// (as a stub), so code that uses the type as one adds no errors of its own.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account", version = 0)]
enum AccountEvent {
    Opened { owner: String },
}

fn event_type_of<E: DomainEvent>(event: &E) -> &'static str {
    event.event_type()
}

fn main() {
    let opened = AccountEvent::Opened { owner: "ada".into() };
    let _ = event_type_of(&opened);
    let _ = AccountEvent::EVENT_TYPES;
    let _ = eventfold::registry().decode::<AccountEvent>("Opened", 1, "{}");
}
