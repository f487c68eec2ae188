//! Testing helpers: a given/when/then kit for aggregates, and (feature `testing`) the store
//! conformance suite every [`EventStore`](crate::EventStore) backend runs.

mod kit;

#[cfg(feature = "testing")]
pub mod conformance;

#[cfg(feature = "testing")]
pub mod processes;

pub use kit::{AggregateTest, Then};
