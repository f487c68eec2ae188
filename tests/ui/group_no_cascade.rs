// A mistake in one variant of a group is reported once: the derive still implements
// `DomainEvent` (as a stub) and `From` each well-formed member, so code using them adds no
// errors of its own.
use eventfold::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Opened;

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
struct Closed;

#[derive(DomainEvent)]
#[domain_event(group)]
enum AccountEvent {
    Opened(Opened),
    #[domain_event(version = 2)]
    Closed(Closed),
}

fn event_type_of<E: DomainEvent>(event: &E) -> &'static str {
    event.event_type()
}

fn main() {
    let opened: AccountEvent = Opened.into();
    let closed: AccountEvent = Closed.into();
    let _ = (event_type_of(&opened), event_type_of(&closed));
    let _ = eventfold::registry().decode::<AccountEvent>("Opened", 1, "null");
}
