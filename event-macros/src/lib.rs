//! `#[derive(DomainEvent)]`, the procedural macro of
//! [eventfold](https://docs.rs/eventfold).
//!
//! Use it through the `eventfold` crate, which re-exports it next to the `DomainEvent`
//! trait: the code it generates names eventfold's runtime, so the two move in lockstep.

#![forbid(unsafe_code)]

mod ast;
mod attr;
mod expand;
mod fallback;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Implements `DomainEvent` for an enum (one event type per variant) or a struct (one
/// event type), and registers each event type by name so that a stored event can be read
/// back into this Rust type; or for a group of event structs (`#[domain_event(group)]`),
/// which stands for its members' event types.
///
/// The type (unless a group) must also derive (or implement) serde's `Serialize` and
/// `Deserialize`. An event
/// is stored as its type name, a schema version, and a payload: the variant's (or the
/// struct's) own content as JSON, without the enum's tag. A variant can therefore be renamed
/// in Rust while its stored name stays put, and an event reads back by its stored name.
///
/// ```
/// use eventfold::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Account")]
/// enum AccountEvent {
///     Opened {
///         #[domain_event(aggregate_id)]
///         account: String,
///         owner: String,
///     },
///     #[domain_event(name = "FundsDeposited", version = 2)]
///     Deposited { account: String, cents: u64 },
///     Closed,
/// }
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Order", name = "OrderFilled")]
/// struct Filled {
///     #[domain_event(aggregate_id)]
///     order_id: String,
///     price: u64,
/// }
///
/// let deposited = AccountEvent::Deposited { account: "acc-1".into(), cents: 500 };
/// assert_eq!(deposited.event_type(), "FundsDeposited");
/// assert_eq!(deposited.schema_version(), 2);
/// assert_eq!(deposited.aggregate_id(), None); // no field of this variant is marked
/// assert_eq!(deposited.to_payload().unwrap(), r#"{"account":"acc-1","cents":500}"#);
///
/// let filled = Filled { order_id: "o-7".into(), price: 101 };
/// assert_eq!(filled.event_type(), "OrderFilled");
/// assert_eq!(filled.aggregate_id().as_deref(), Some("o-7"));
/// assert_eq!(<Filled as DomainEvent>::AGGREGATE_TYPE, "Order");
/// ```
///
/// # Keys of `#[domain_event(...)]`
///
/// On the type:
/// - `aggregate = "Account"` (required, but optional on a group): the aggregate type the
///   events belong to. An aggregate's `Aggregate::TYPE` defaults to it.
/// - `name = "OrderFilled"` (structs only): the stored event type name; by default the
///   struct's name. An enum names its event types on its variants.
/// - `version = 2`: the schema version new events are written with, an integer of 1 or
///   more; by default 1. On an enum it is the default of every variant.
/// - `crate = "eventfold_core"`: the path of the crate the generated code names, for
///   crates that depend on `eventfold-core` instead of `eventfold`; by default
///   `::eventfold`.
///
/// - `group` (enums only): the enum is a *group* of event types that derive `DomainEvent`
///   on their own, one per newtype variant (see below).
///
/// On an enum variant:
/// - `name = "FundsDeposited"`: the stored event type name; by default the variant's name.
/// - `version = 2`: the variant's schema version; by default the enum's.
///
/// On one field of a struct or of a variant (named or tuple):
/// - `aggregate_id`: marks the field holding the aggregate id, so that
///   `aggregate_id()` returns it (with `ToString`); it returns `None` for a variant without
///   a marked field. At most one field per struct or variant.
///
/// An event type name is made of ASCII letters, digits, `_`, `-`, `.` and `:`, and starts
/// with a letter; it must be unique across the program (the registry checks this at
/// start-up, this derive within one enum).
///
/// # Groups of event structs
///
/// An aggregate's events may be structs, each its own event type. `#[domain_event(group)]`
/// on an enum whose variants each hold one of them makes the enum one `DomainEvent` standing
/// for all of them, so it can be an aggregate's `Event` and `apply` an exhaustive `match`:
///
/// ```
/// use eventfold::DomainEvent;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Account", name = "AccountOpened")]
/// struct Opened { owner: String }
///
/// #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Account", name = "CentsDeposited", version = 2)]
/// struct Deposited { cents: u64 }
///
/// #[derive(Debug, Clone, DomainEvent)]
/// #[domain_event(group)]                 // `aggregate = ".."` may be given, and is checked
/// enum AccountEvent {
///     Opened(Opened),
///     Deposited(Deposited),
/// }
///
/// let event: AccountEvent = Deposited { cents: 500 }.into();
/// assert_eq!(event.event_type(), "CentsDeposited");
/// assert_eq!(event.to_payload().unwrap(), r#"{"cents":500}"#);
/// assert_eq!(<AccountEvent as DomainEvent>::AGGREGATE_TYPE, "Account");
/// let back: AccountEvent = eventfold::registry()
///     .decode("CentsDeposited", 2, r#"{"cents":7}"#)
///     .unwrap();
/// assert!(matches!(back, AccountEvent::Deposited(Deposited { cents: 7 })));
/// ```
///
/// The group registers nothing: each event keeps its member's stored name, schema version,
/// payload, aggregate id and upcasters, and a stored event of a member decodes into the
/// group as well as into the member (`subscribe::<AccountEvent>` and `subscribe::<Opened>`
/// both receive it). The group implements `From` each member, and needs no serde derives.
/// At compile time, each member must implement `DomainEvent`, belong to the group's
/// aggregate type (the one given, or else the first member's), and be a member once.
///
/// # Not supported
/// - Generic event types: an event type is registered once, by name.
/// - Unions, and enums without variants.
/// - serde attributes that change how a variant's content is stored or which variants exist:
///   `#[serde(tag = "..")]`, `content`, `untagged`, `from`, `try_from` and `into` on the
///   enum; `skip`, `skip_serializing`, `skip_deserializing`, `other` and `untagged` on a
///   variant.
///   `rename` and `rename_all` are fine: variants are read back by position, not by
///   serde's name.
#[proc_macro_derive(DomainEvent, attributes(domain_event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
