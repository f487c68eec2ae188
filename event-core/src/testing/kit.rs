//! Given/when/then tests for aggregates, with no store involved.

use std::convert::Infallible;
use std::fmt::Debug;

use crate::aggregate::{Aggregate, Decide, DecisionError};
use crate::event::DomainEvent;
use crate::registry::registry;

/// A given/when/then test of one aggregate: given past events, when a command is handled,
/// then these events (or this error) follow.
///
/// Besides comparing, [`Then::then_events`] checks that every produced event survives the trip
/// through its stored form (payload out, registry decode back), so a serde attribute that
/// would lose data fails here rather than in production.
///
/// ```
/// use eventfold_core::Aggregate;
/// use eventfold_core::testing::AggregateTest;
/// use eventfold_macros::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Counter", crate = "eventfold_core")]
/// enum CounterEvent {
///     Incremented { by: u32 },
/// }
///
/// #[derive(Debug, Default)]
/// struct Counter { total: u32 }
///
/// #[derive(Debug, PartialEq, thiserror::Error)]
/// #[error("the counter would overflow")]
/// struct Overflow;
///
/// impl Aggregate for Counter {
///     type Event = CounterEvent;
///     type Command = u32;
///     type Error = Overflow;
///     fn apply(&mut self, CounterEvent::Incremented { by }: &CounterEvent) {
///         self.total += by;
///     }
///     fn handle(&self, by: u32) -> Result<Vec<CounterEvent>, Overflow> {
///         self.total.checked_add(by).ok_or(Overflow)?;
///         Ok(vec![CounterEvent::Incremented { by }])
///     }
/// }
///
/// AggregateTest::<Counter>::given(vec![CounterEvent::Incremented { by: u32::MAX }])
///     .when(1)
///     .then_error(Overflow);
/// AggregateTest::<Counter>::given_nothing()
///     .when(2)
///     .then_state(|c| assert_eq!(c.total, 2));
/// ```
pub struct AggregateTest<A: Aggregate> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts from the state these events fold into.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        let mut state = A::default();
        for event in events {
            state.apply(&event);
        }
        AggregateTest { state }
    }

    /// Starts from a new aggregate.
    pub fn given_nothing() -> Self {
        Self::given([])
    }

    /// Handles the command.
    pub fn when(self, command: A::Command) -> Then<A> {
        // Here, not in `given`, which `given_nothing` calls: the error then names the
        // test's own call.
        const {
            assert!(
                crate::aggregate::aggregate_type_agrees::<A>(),
                crate::aggregate::aggregate_type_differs!()
            )
        };
        let result = self.state.handle(command).map_err(DecisionError::Rejected);
        Then {
            state: self.state,
            result,
        }
    }

    /// Decides a command that asks services (see [`Decide`]), with the services given:
    /// your real ones, or test doubles of the same type.
    pub async fn when_deciding<C>(
        self,
        command: C,
        services: &A::Services,
    ) -> Then<A, A::ServiceError>
    where
        A: Decide<C>,
    {
        const {
            assert!(
                crate::aggregate::aggregate_type_agrees::<A>(),
                crate::aggregate::aggregate_type_differs!()
            )
        };
        let result = self.state.decide(&command, services).await;
        Then {
            state: self.state,
            result,
        }
    }
}

/// What a command led to, to check with the `then_*` methods. `S` is the error of the
/// services a [`when_deciding`](AggregateTest::when_deciding) asked.
pub struct Then<A: Aggregate, S = Infallible> {
    state: A,
    result: Result<Vec<A::Event>, DecisionError<A::Error, S>>,
}

impl<A: Aggregate, S: Debug> Then<A, S>
where
    A::Event: Debug,
    A::Error: Debug,
{
    /// Asserts the command produced exactly these events, and that each survives its stored
    /// form unchanged.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = A::Event>)
    where
        A::Event: PartialEq,
    {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        let events = match self.result {
            Ok(events) => events,
            Err(error) => panic!("expected events {expected:?}, but the command failed: {error:?}"),
        };
        assert_eq!(events, expected, "the command produced other events");
        for event in &events {
            let payload = event
                .to_payload()
                .unwrap_or_else(|e| panic!("{event:?} does not serialize: {e}"));
            let back: A::Event = registry()
                .decode(event.event_type(), event.schema_version(), &payload)
                .unwrap_or_else(|e| panic!("{event:?} does not decode from {payload}: {e}"));
            assert_eq!(
                &back, event,
                "{event:?} changed through its payload {payload}"
            );
        }
    }

    /// Asserts the command failed with exactly this error.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq,
    {
        match self.result {
            Ok(events) => {
                panic!("expected error {expected:?}, but the command produced {events:?}")
            }
            Err(DecisionError::Rejected(error)) => {
                assert_eq!(error, expected, "the command failed otherwise")
            }
            Err(DecisionError::Service(error)) => {
                panic!("expected error {expected:?}, but a service failed: {error:?}")
            }
        }
    }

    /// Asserts the command failed, and hands the error to `check`.
    #[track_caller]
    pub fn then_error_matches(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.result {
            Ok(events) => panic!("expected an error, but the command produced {events:?}"),
            Err(DecisionError::Rejected(error)) => {
                assert!(check(&error), "unexpected error {error:?}")
            }
            Err(DecisionError::Service(error)) => {
                panic!("expected a refusal, but a service failed: {error:?}")
            }
        }
    }

    /// Asserts a service the decision asked failed, and hands its error to `check`.
    #[track_caller]
    pub fn then_service_error_matches(self, check: impl FnOnce(&S) -> bool) {
        match self.result {
            Ok(events) => {
                panic!("expected a service error, but the command produced {events:?}")
            }
            Err(DecisionError::Rejected(error)) => {
                panic!("expected a service error, but the command was refused: {error:?}")
            }
            Err(DecisionError::Service(error)) => {
                assert!(check(&error), "unexpected service error {error:?}")
            }
        }
    }

    /// Asserts the command succeeded, applies its events, and hands the new state to `check`.
    #[track_caller]
    pub fn then_state(self, check: impl FnOnce(&A)) {
        let mut state = self.state;
        match self.result {
            Ok(events) => events.iter().for_each(|e| state.apply(e)),
            Err(error) => panic!("expected a new state, but the command failed: {error:?}"),
        }
        check(&state);
    }

    /// The raw result of a decision, for checks of your own.
    pub fn into_decision(self) -> Result<Vec<A::Event>, DecisionError<A::Error, S>> {
        self.result
    }
}

impl<A: Aggregate> Then<A> {
    /// The raw result, for checks of your own.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result.map_err(|error| match error {
            DecisionError::Rejected(error) => error,
            DecisionError::Service(never) => match never {},
        })
    }
}
