//! The given/when/then kit, on the shared account domain.

mod common;

use common::{Account, AccountCommand, AccountError, AccountEvent};
use eventfold::testing::AggregateTest;

fn opened() -> AccountEvent {
    AccountEvent::Opened {
        owner: "Ada".into(),
    }
}

#[test]
fn given_events_when_command_then_events() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Deposit(5))
        .then_events([AccountEvent::Deposited { amount: 5 }]);
}

#[test]
fn given_nothing_when_command_then_error() {
    AggregateTest::<Account>::given_nothing()
        .when(AccountCommand::Withdraw(1))
        .then_error(AccountError::NotOpen);
}

#[test]
fn then_state_applies_the_new_events() {
    AggregateTest::<Account>::given([opened(), AccountEvent::Deposited { amount: 9 }])
        .when(AccountCommand::Withdraw(4))
        .then_state(|account| assert_eq!((account.balance, account.applied), (5, 3)));
}

#[test]
fn then_error_matches_takes_a_predicate() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Withdraw(4))
        .then_error_matches(|e| matches!(e, AccountError::InsufficientFunds { asked: 4, .. }));
}

#[test]
#[should_panic(expected = "the command produced other events")]
fn other_events_fail_the_test() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Deposit(5))
        .then_events([AccountEvent::Deposited { amount: 6 }]);
}

#[test]
#[should_panic(expected = "but the command failed")]
fn an_error_where_events_were_expected_fails_the_test() {
    AggregateTest::<Account>::given_nothing()
        .when(AccountCommand::Deposit(5))
        .then_events([AccountEvent::Deposited { amount: 5 }]);
}

#[test]
#[should_panic(expected = "but the command produced")]
fn events_where_an_error_was_expected_fail_the_test() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Deposit(5))
        .then_error(AccountError::NotOpen);
}

#[test]
#[should_panic(expected = "the command failed otherwise")]
fn another_error_fails_the_test() {
    AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Open {
            owner: "Bob".into(),
        })
        .then_error(AccountError::NotOpen);
}

#[test]
fn into_result_hands_back_the_raw_outcome() {
    let result = AggregateTest::<Account>::given([opened()])
        .when(AccountCommand::Noop)
        .into_result();
    assert_eq!(result, Ok(vec![]));
}

mod lossy {
    use eventfold::prelude::*;
    use serde::{Deserialize, Serialize};

    /// `note` is skipped by serde, so it does not survive storage.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
    #[domain_event(aggregate = "Lossy")]
    pub enum LossyEvent {
        Noted {
            #[serde(skip)]
            note: String,
        },
    }

    #[derive(Default)]
    pub struct Lossy;

    impl Aggregate for Lossy {
        type Event = LossyEvent;
        type Command = String;
        type Error = std::convert::Infallible;
        fn apply(&mut self, _: &LossyEvent) {}
        fn handle(&self, note: String) -> Result<Vec<LossyEvent>, Self::Error> {
            Ok(vec![LossyEvent::Noted { note }])
        }
    }
}

#[test]
#[should_panic(expected = "changed through its payload")]
fn an_event_that_loses_data_in_storage_fails_the_test() {
    AggregateTest::<lossy::Lossy>::given_nothing()
        .when("keep me".into())
        .then_events([lossy::LossyEvent::Noted {
            note: "keep me".into(),
        }]);
}
