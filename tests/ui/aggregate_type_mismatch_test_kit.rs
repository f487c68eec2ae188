// `Aggregate::TYPE` is the events' aggregate type; an override that differs fails where a
// test of the aggregate is built, as it does for a repository.
use eventfold::prelude::*;
use eventfold::testing::AggregateTest;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, DomainEvent)]
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
    AggregateTest::<Account>::given_nothing()
        .when(())
        .then_state(|_| {});
}
