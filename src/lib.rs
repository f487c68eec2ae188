//! eventfold
pub use eventfold_core::*;
pub use eventfold_macros::DomainEvent;
