// `Aggregate::TYPE` is the events' aggregate type; an override that differs fails where a
// repository of the aggregate is built.
use std::sync::Arc;

use eventfold::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[domain_event(aggregate = "Account")]
enum AccountEvent {
    Opened,
}

#[derive(Default)]
struct Account;

impl Aggregate for Account {
    const TYPE: &'static str = "Acount";
    type Event = AccountEvent;
    type Command = ();
    type Error = std::convert::Infallible;

    fn apply(&mut self, _: &AccountEvent) {}

    fn handle(&self, _: ()) -> Result<Vec<AccountEvent>, Self::Error> {
        Ok(vec![AccountEvent::Opened])
    }
}

fn main() {
    let _ = Repository::<Account>::new(Arc::new(InMemoryEventStore::new()));
}
