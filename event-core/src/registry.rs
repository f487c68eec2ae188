//! The registry of event types, built once from the registrations `#[derive(DomainEvent)]`
//! submits through `inventory`, and the upcasters that lift old payloads to the current
//! schema.

use std::any::{Any, TypeId};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::event::DomainEvent;

/// The registration of one event type, submitted by the derive. Not built by hand.
#[doc(hidden)]
#[derive(Debug)]
pub struct EventRegistration {
    name: &'static str,
    aggregate_type: &'static str,
    version: u32,
    rust_type: fn() -> &'static str,
    type_id: fn() -> TypeId,
    decode: DecodeFn,
}

type DecodeFn = fn(&str, PayloadSource<'_>) -> Result<Box<dyn Any + Send>>;

/// Where a payload comes from: text at the current version, or a value lifted by upcasters.
#[doc(hidden)]
pub enum PayloadSource<'a> {
    Text(&'a str),
    Value(serde_json::Value),
}

impl EventRegistration {
    /// The registration of event type `name` of the Rust type `E`.
    pub const fn new<E: DomainEvent>(
        name: &'static str,
        aggregate_type: &'static str,
        version: u32,
    ) -> Self {
        EventRegistration {
            name,
            aggregate_type,
            version,
            rust_type: std::any::type_name::<E>,
            type_id: TypeId::of::<E>,
            decode: decode_boxed::<E>,
        }
    }
}

fn decode_boxed<E: DomainEvent>(
    name: &str,
    source: PayloadSource<'_>,
) -> Result<Box<dyn Any + Send>> {
    decode_source::<E>(name, source).map(|e| Box::new(e) as Box<dyn Any + Send>)
}

fn decode_source<E: DomainEvent>(name: &str, source: PayloadSource<'_>) -> Result<E> {
    match source {
        PayloadSource::Text(text) => decode_text(name, text),
        PayloadSource::Value(value) => {
            E::__deserialize_payload(name, value).map_err(|e| payload_error(name, e))
        }
    }
}

/// Decodes a payload at the current schema version. Inlined into the replay's and the
/// projection's loops, where it runs once per event: the calls and the copies of the
/// large `Result` between them cost about as much as the rest of a row's checks.
#[inline(always)]
fn decode_text<E: DomainEvent>(name: &str, text: &str) -> Result<E> {
    let mut de = serde_json::Deserializer::from_str(text);
    let event = E::__deserialize_payload(name, &mut de).map_err(|e| payload_error(name, e))?;
    de.end().map_err(|e| payload_error(name, e))?;
    Ok(event)
}

/// The error of a payload of event type `name` that does not decode.
#[cold]
fn payload_error(name: &str, source: serde_json::Error) -> Error {
    Error::Payload {
        event_type: name.to_owned(),
        event_id: None,
        position: None,
        source,
    }
}

inventory::collect!(EventRegistration);

/// An upcaster: lifts a stored payload of one event type from schema version `from` to
/// `from + 1`. Register it with [`upcaster!`](crate::upcaster).
#[doc(hidden)]
#[derive(Debug)]
pub struct UpcasterRegistration {
    event_type: &'static str,
    from: u32,
    upcast: UpcastFn,
}

/// The signature of an upcaster: JSON in, JSON out, or a reason it cannot.
pub type UpcastFn = fn(serde_json::Value) -> std::result::Result<serde_json::Value, String>;

impl UpcasterRegistration {
    /// An upcaster of `event_type` from version `from` to `from + 1`.
    pub const fn new(event_type: &'static str, from: u32, upcast: UpcastFn) -> Self {
        UpcasterRegistration {
            event_type,
            from,
            upcast,
        }
    }
}

inventory::collect!(UpcasterRegistration);

/// Registers an upcaster that lifts stored payloads of an event type from schema version
/// `from` to `from + 1`. Payloads are upcast step by step at read time; stored rows are
/// never rewritten.
///
/// ```
/// use eventfold_core::upcaster;
/// # use eventfold_macros::DomainEvent;
/// # use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize, DomainEvent)]
/// #[domain_event(aggregate = "Account", crate = "eventfold_core")]
/// enum AccountEvent {
///     #[domain_event(name = "FundsDeposited", version = 2)]
///     Deposited { cents: u64 },
/// }
///
/// // Version 1 stored `amount` in whole units; version 2 stores `cents`.
/// fn deposited_v1_to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
///     let amount = v["amount"].as_u64().ok_or("amount is missing")?;
///     v["cents"] = (amount * 100).into();
///     v.as_object_mut().unwrap().remove("amount");
///     Ok(v)
/// }
/// upcaster!("FundsDeposited", 1, deposited_v1_to_v2);
///
/// # fn main() {
/// let event: AccountEvent = eventfold_core::registry()
///     .decode("FundsDeposited", 1, r#"{"amount":3}"#)
///     .unwrap();
/// assert!(matches!(event, AccountEvent::Deposited { cents: 300 }));
/// # }
/// ```
#[macro_export]
macro_rules! upcaster {
    ($event_type:expr, $from:expr, $upcast:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::__private::UpcasterRegistration::new($event_type, $from, $upcast)
        }
    };
}

/// What the registry knows of one event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventTypeInfo {
    /// The stored name.
    pub name: &'static str,
    /// The aggregate type its events belong to.
    pub aggregate_type: &'static str,
    /// The current schema version.
    pub version: u32,
    /// The Rust type that registers it, as `std::any::type_name` spells it.
    pub rust_type: &'static str,
}

/// Every registered event type and upcaster of the program. Get it with [`registry()`].
#[derive(Debug)]
pub struct Registry {
    by_name: HashMap<&'static str, &'static EventRegistration>,
    /// Every registered aggregate type name.
    aggregate_types: HashMap<&'static str, ()>,
    upcasters: HashMap<(&'static str, u32), UpcastFn>,
    problems: Vec<String>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();

/// The program's registry, built from `inventory` on first use.
pub fn registry() -> &'static Registry {
    REGISTRY.get_or_init(Registry::build)
}

impl Registry {
    fn build() -> Registry {
        Registry::from_registrations(
            inventory::iter::<EventRegistration>,
            inventory::iter::<UpcasterRegistration>,
        )
    }

    fn from_registrations(
        events: impl IntoIterator<Item = &'static EventRegistration>,
        upcasts: impl IntoIterator<Item = &'static UpcasterRegistration>,
    ) -> Registry {
        let mut by_name: HashMap<&'static str, &'static EventRegistration> = HashMap::new();
        let mut problems = Vec::new();
        for reg in events {
            match by_name.get(reg.name) {
                Some(first) if (first.type_id)() != (reg.type_id)() => {
                    let (a, b) = sorted_pair((first.rust_type)(), (reg.rust_type)());
                    problems.push(format!(
                        "event type `{}` is registered by both `{a}` and `{b}`",
                        reg.name
                    ));
                }
                Some(_) => {}
                None => {
                    by_name.insert(reg.name, reg);
                }
            }
        }

        let mut upcasters = HashMap::new();
        for up in upcasts {
            if upcasters
                .insert((up.event_type, up.from), up.upcast)
                .is_some()
            {
                problems.push(format!(
                    "two upcasters lift `{}` from version {}",
                    up.event_type, up.from
                ));
            }
        }
        let mut steps: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for &(name, from) in upcasters.keys() {
            steps.entry(name).or_default().push(from);
        }
        for (name, mut froms) in steps {
            froms.sort_unstable();
            let Some(reg) = by_name.get(name) else {
                problems.push(format!(
                    "an upcaster is registered for `{name}`, which no event type registers"
                ));
                continue;
            };
            if let Some(&bad) = froms.iter().find(|&&f| f == 0 || f >= reg.version) {
                problems.push(format!(
                    "upcaster of `{name}` from version {bad} does not lead to current version {}",
                    reg.version
                ));
                continue;
            }
            let lowest = froms[0];
            if let Some(gap) = (lowest..reg.version).find(|f| froms.binary_search(f).is_err()) {
                problems.push(format!(
                    "upcaster chain of `{name}` is broken: no upcaster from version {gap} to {}",
                    gap + 1
                ));
            }
        }
        problems.sort();
        let aggregate_types = by_name.values().map(|r| (r.aggregate_type, ())).collect();
        Registry {
            by_name,
            aggregate_types,
            upcasters,
            problems,
        }
    }

    /// The registry's own copy of an event type name, borrowed for the program's
    /// lifetime; an unknown name is copied. Stores use it so that records of registered
    /// types do not each allocate their type name.
    #[doc(hidden)]
    pub fn event_type_name(&self, name: &str) -> Cow<'static, str> {
        match self.by_name.get_key_value(name) {
            Some((&known, _)) => Cow::Borrowed(known),
            None => Cow::Owned(name.to_owned()),
        }
    }

    /// [`event_type_name`](Self::event_type_name) for aggregate type names.
    #[doc(hidden)]
    pub fn aggregate_type_name(&self, name: &str) -> Cow<'static, str> {
        match self.aggregate_types.get_key_value(name) {
            Some((&known, _)) => Cow::Borrowed(known),
            None => Cow::Owned(name.to_owned()),
        }
    }

    /// Checks the registry: fails if two Rust types register one event name (naming both)
    /// or an upcaster chain is broken. Stores and the bus call it at start-up.
    pub fn validate(&self) -> Result<()> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::InvalidRegistry {
                problems: self.problems.clone(),
            })
        }
    }

    /// Fails with [`Error::MissingEventTypes`] unless every name is registered.
    ///
    /// Call it at start-up with the event types your program must decode: a linker may
    /// drop the registrations of a crate that nothing else references, and this turns that
    /// silent loss into an error before any event is read.
    pub fn expect<I, S>(&self, names: I) -> Result<()>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let missing: Vec<String> = names
            .into_iter()
            .filter(|n| !self.by_name.contains_key(n.as_ref()))
            .map(|n| n.as_ref().to_owned())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::MissingEventTypes { names: missing })
        }
    }

    /// Fails unless every event type of `E` is registered (see [`expect`](Self::expect)).
    pub fn expect_type<E: DomainEvent>(&self) -> Result<()> {
        self.expect(E::EVENT_TYPES.iter().map(|t| t.name))
    }

    /// Every registered event type name, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.by_name.keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// What the registry knows of an event type.
    pub fn get(&self, name: &str) -> Option<EventTypeInfo> {
        self.by_name.get(name).map(|reg| EventTypeInfo {
            name: reg.name,
            aggregate_type: reg.aggregate_type,
            version: reg.version,
            rust_type: (reg.rust_type)(),
        })
    }

    fn lookup(&self, name: &str) -> Result<&'static EventRegistration> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownEventType {
                event_type: name.to_owned(),
                event_id: None,
                position: None,
            })
    }

    /// Decodes a stored payload of event type `name` at schema version `stored` into `E`:
    /// the Rust type that registers `name`, or a group with that type among its members.
    /// Upcasters run by the stored name, whichever of the two `E` is.
    ///
    /// Distinguishes an unknown type name, a name registered by another Rust type, a schema
    /// newer than the code, a failed upcast, and a payload that does not fit.
    pub fn decode<E: DomainEvent>(&self, name: &str, stored: u32, payload: &str) -> Result<E> {
        let reg = self.checked::<E>(name)?;
        let source = self.source(reg, stored, payload)?;
        decode_source::<E>(reg.name, source)
    }

    /// [`decode`](Self::decode) for a replay: remembers the registrations of the few event
    /// types of one aggregate, so a long stream pays one hash lookup per type, not per event.
    #[inline]
    pub(crate) fn decode_cached<E: DomainEvent>(
        &self,
        cache: &mut Vec<&'static EventRegistration>,
        name: &str,
        stored: u32,
        payload: &str,
    ) -> Result<E> {
        let reg = match cache.iter().find(|r| r.name == name) {
            Some(reg) => *reg,
            None => {
                let reg = self.checked::<E>(name)?;
                cache.push(reg);
                reg
            }
        };
        if stored == reg.version {
            // What `source` would lend, without the call: the common case of a replay.
            return decode_text::<E>(reg.name, payload);
        }
        let source = self.source(reg, stored, payload)?;
        decode_source::<E>(reg.name, source)
    }

    /// The registration of `name`, if it decodes into the Rust type `E`: `E` registers it,
    /// or `E` is a group and one of its members does.
    fn checked<E: DomainEvent>(&self, name: &str) -> Result<&'static EventRegistration> {
        let reg = self.lookup(name)?;
        if !E::__decodes_from((reg.type_id)()) {
            return Err(Error::WrongEventType {
                event_type: name.to_owned(),
                registered: (reg.rust_type)(),
                requested: std::any::type_name::<E>(),
                event_id: None,
                position: None,
            });
        }
        Ok(reg)
    }

    /// Decodes a stored payload into whichever Rust type registers `name` (a group's member,
    /// never the group: a group registers nothing).
    pub fn decode_any(
        &self,
        name: &str,
        stored: u32,
        payload: &str,
    ) -> Result<Box<dyn Any + Send>> {
        let reg = self.lookup(name)?;
        (reg.decode)(reg.name, self.source(reg, stored, payload)?)
    }

    /// The payload at the current version: the text itself, or the text upcast step by step.
    fn source<'a>(
        &self,
        reg: &EventRegistration,
        stored: u32,
        payload: &'a str,
    ) -> Result<PayloadSource<'a>> {
        if stored == reg.version {
            return Ok(PayloadSource::Text(payload));
        }
        if stored > reg.version {
            return Err(Error::SchemaTooNew {
                event_type: reg.name.to_owned(),
                stored,
                known: reg.version,
                event_id: None,
                position: None,
            });
        }
        let mut value: serde_json::Value =
            serde_json::from_str(payload).map_err(|source| Error::Payload {
                event_type: reg.name.to_owned(),
                event_id: None,
                position: None,
                source,
            })?;
        for from in stored..reg.version {
            let upcast = self
                .upcasters
                .get(&(reg.name, from))
                .ok_or_else(|| Error::Upcast {
                    event_type: reg.name.to_owned(),
                    from,
                    reason: format!("no upcaster from version {from} to {}", from + 1),
                    event_id: None,
                    position: None,
                })?;
            value = upcast(value).map_err(|reason| Error::Upcast {
                event_type: reg.name.to_owned(),
                from,
                reason,
                event_id: None,
                position: None,
            })?;
        }
        Ok(PayloadSource::Value(value))
    }
}

fn sorted_pair<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
    if a <= b { (a, b) } else { (b, a) }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use serde_json::json;

    use super::*;
    use crate::DomainEvent;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventfold_macros::DomainEvent)]
    #[domain_event(aggregate = "Ledger")]
    enum LedgerEvent {
        #[domain_event(name = "LedgerOpened")]
        Opened { owner: String },
        /// Version 1 stored `amount` in whole units, version 2 `cents`, version 3 adds a memo.
        #[domain_event(name = "LedgerCredited", version = 3)]
        Credited { cents: u64, memo: String },
        #[domain_event(name = "LedgerClosed")]
        Closed,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventfold_macros::DomainEvent)]
    #[domain_event(aggregate = "Ledger", name = "LedgerAudited")]
    struct Audited {
        by: String,
    }

    fn credited_v1_to_v2(
        mut v: serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        let amount = v["amount"].as_u64().ok_or("`amount` is missing")?;
        let object = v.as_object_mut().ok_or("not an object")?;
        object.remove("amount");
        object.insert("cents".into(), json!(amount * 100));
        Ok(v)
    }

    fn credited_v2_to_v3(
        mut v: serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        v["memo"] = json!("");
        Ok(v)
    }

    crate::upcaster!("LedgerCredited", 1, credited_v1_to_v2);
    crate::upcaster!("LedgerCredited", 2, credited_v2_to_v3);

    #[test]
    fn the_global_registry_is_valid_and_lists_derived_types() {
        registry().validate().unwrap();
        let names = registry().names();
        for name in [
            "LedgerOpened",
            "LedgerCredited",
            "LedgerClosed",
            "LedgerAudited",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        let info = registry().get("LedgerCredited").unwrap();
        assert_eq!((info.aggregate_type, info.version), ("Ledger", 3));
        assert!(
            info.rust_type.ends_with("LedgerEvent"),
            "{}",
            info.rust_type
        );
        registry().expect_type::<LedgerEvent>().unwrap();
    }

    #[test]
    fn expect_names_every_missing_type() {
        match registry().expect(["LedgerOpened", "NoSuchEvent", "NorThis"]) {
            Err(Error::MissingEventTypes { names }) => {
                assert_eq!(names, ["NoSuchEvent", "NorThis"])
            }
            other => panic!("expected MissingEventTypes, got {other:?}"),
        }
    }

    #[test]
    fn decode_round_trips_current_versions() {
        for event in [
            LedgerEvent::Opened {
                owner: "ada".into(),
            },
            LedgerEvent::Credited {
                cents: 5,
                memo: "tip".into(),
            },
            LedgerEvent::Closed,
        ] {
            let payload = event.to_payload().unwrap();
            let back: LedgerEvent = registry()
                .decode(event.event_type(), event.schema_version(), &payload)
                .unwrap();
            assert_eq!(back, event);
            let any = registry()
                .decode_any(event.event_type(), event.schema_version(), &payload)
                .unwrap();
            assert_eq!(any.downcast_ref::<LedgerEvent>(), Some(&event));
        }
        let audited: Audited = registry()
            .decode("LedgerAudited", 1, r#"{"by":"eve"}"#)
            .unwrap();
        assert_eq!(audited.by, "eve");
    }

    #[test]
    fn old_payloads_are_upcast_step_by_step() {
        let v1: LedgerEvent = registry()
            .decode("LedgerCredited", 1, r#"{"amount":7}"#)
            .unwrap();
        assert_eq!(
            v1,
            LedgerEvent::Credited {
                cents: 700,
                memo: String::new()
            }
        );
        let v2: LedgerEvent = registry()
            .decode("LedgerCredited", 2, r#"{"cents":7}"#)
            .unwrap();
        assert_eq!(
            v2,
            LedgerEvent::Credited {
                cents: 7,
                memo: String::new()
            }
        );
    }

    #[test]
    fn decode_tells_each_failure_apart() {
        let r = registry();
        assert!(matches!(
            r.decode::<LedgerEvent>("Nope", 1, "{}"),
            Err(Error::UnknownEventType { event_type, .. }) if event_type == "Nope"
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerAudited", 1, r#"{"by":"x"}"#),
            Err(Error::WrongEventType { registered, .. }) if registered.ends_with("Audited")
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerCredited", 4, "{}"),
            Err(Error::SchemaTooNew {
                stored: 4,
                known: 3,
                ..
            })
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerCredited", 3, r#"{"cents":"many"}"#),
            Err(Error::Payload { .. })
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerCredited", 3, r#"{"cents":1,"memo":""} trailing"#),
            Err(Error::Payload { .. })
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerOpened", 1, "not json"),
            Err(Error::Payload { .. })
        ));
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerCredited", 1, r#"{"cents":1}"#),
            Err(Error::Upcast { from: 1, reason, .. }) if reason.contains("amount")
        ));
        // A payload of another variant's shape does not pass as this one.
        assert!(matches!(
            r.decode::<LedgerEvent>("LedgerOpened", 1, r#"{"cents":1,"memo":""}"#),
            Err(Error::Payload { .. })
        ));
    }

    #[test]
    fn schema_version_zero_has_no_upcaster() {
        assert!(matches!(
            registry().decode::<LedgerEvent>("LedgerCredited", 0, "{}"),
            Err(Error::Upcast { from: 0, .. })
        ));
    }

    static OPENED: EventRegistration = EventRegistration::new::<LedgerEvent>("Shared", "Ledger", 1);
    static AUDITED: EventRegistration = EventRegistration::new::<Audited>("Shared", "Ledger", 1);
    static CREDITED: EventRegistration =
        EventRegistration::new::<LedgerEvent>("Credited", "Ledger", 4);

    fn noop(v: serde_json::Value) -> std::result::Result<serde_json::Value, String> {
        Ok(v)
    }

    fn problems(
        events: &[&'static EventRegistration],
        upcasts: &[&'static UpcasterRegistration],
    ) -> Vec<String> {
        match Registry::from_registrations(events.iter().copied(), upcasts.iter().copied())
            .validate()
        {
            Ok(()) => Vec::new(),
            Err(Error::InvalidRegistry { problems }) => problems,
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn validate_names_both_types_of_a_shared_name() {
        let found = problems(&[&OPENED, &AUDITED], &[]);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("`Shared`"), "{}", found[0]);
        assert!(
            found[0].contains("LedgerEvent") && found[0].contains("Audited"),
            "{}",
            found[0]
        );
        // The same type registered twice (two codegen units, say) is no conflict.
        assert!(problems(&[&OPENED, &OPENED], &[]).is_empty());
    }

    #[test]
    fn validate_finds_broken_upcaster_chains() {
        static FROM_1: UpcasterRegistration = UpcasterRegistration::new("Credited", 1, noop);
        static FROM_2: UpcasterRegistration = UpcasterRegistration::new("Credited", 2, noop);
        static FROM_3: UpcasterRegistration = UpcasterRegistration::new("Credited", 3, noop);
        static FROM_3_AGAIN: UpcasterRegistration = UpcasterRegistration::new("Credited", 3, noop);
        static TOO_HIGH: UpcasterRegistration = UpcasterRegistration::new("Credited", 4, noop);
        static UNKNOWN: UpcasterRegistration = UpcasterRegistration::new("Ghost", 1, noop);

        assert!(problems(&[&CREDITED], &[&FROM_1, &FROM_2, &FROM_3]).is_empty());
        assert!(
            problems(&[&CREDITED], &[&FROM_2, &FROM_3]).is_empty(),
            "may start later"
        );
        let gap = problems(&[&CREDITED], &[&FROM_1, &FROM_3]);
        assert!(
            gap[0].contains("no upcaster from version 2 to 3"),
            "{gap:?}"
        );
        let dup = problems(&[&CREDITED], &[&FROM_3, &FROM_3_AGAIN]);
        assert!(dup.iter().any(|p| p.contains("two upcasters")), "{dup:?}");
        let high = problems(&[&CREDITED], &[&FROM_3, &TOO_HIGH]);
        assert!(
            high.iter().any(|p| p.contains("from version 4")),
            "{high:?}"
        );
        let ghost = problems(&[&CREDITED], &[&UNKNOWN]);
        assert!(ghost[0].contains("`Ghost`"), "{ghost:?}");
    }
}
