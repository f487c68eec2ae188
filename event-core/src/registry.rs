//! The registry of event types, built once from the registrations `#[derive(DomainEvent)]`
//! submits through `inventory`, and the upcasters that lift old payloads to the current
//! schema.

use std::any::{Any, TypeId};
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

fn decode_boxed<E: DomainEvent>(name: &str, source: PayloadSource<'_>) -> Result<Box<dyn Any + Send>> {
    decode_source::<E>(name, source).map(|e| Box::new(e) as Box<dyn Any + Send>)
}

fn decode_source<E: DomainEvent>(name: &str, source: PayloadSource<'_>) -> Result<E> {
    let payload_error = |source| Error::Payload {
        event_type: name.to_owned(),
        event_id: None,
        position: None,
        source,
    };
    match source {
        PayloadSource::Text(text) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let event = E::__deserialize_payload(name, &mut de).map_err(payload_error)?;
            de.end().map_err(payload_error)?;
            Ok(event)
        }
        PayloadSource::Value(value) => {
            E::__deserialize_payload(name, value).map_err(payload_error)
        }
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
///
/// // Version 1 stored `amount` in whole units; version 2 stores `cents`.
/// fn deposited_v1_to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
///     let amount = v["amount"].as_u64().ok_or("amount is missing")?;
///     v["cents"] = (amount * 100).into();
///     v.as_object_mut().unwrap().remove("amount");
///     Ok(v)
/// }
/// upcaster!("FundsDeposited", 1, deposited_v1_to_v2);
/// # fn main() {}
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
        let mut by_name: HashMap<&'static str, &'static EventRegistration> = HashMap::new();
        let mut problems = Vec::new();
        for reg in inventory::iter::<EventRegistration> {
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
        for up in inventory::iter::<UpcasterRegistration> {
            if upcasters.insert((up.event_type, up.from), up.upcast).is_some() {
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
        Registry {
            by_name,
            upcasters,
            problems,
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

    /// Decodes a stored payload of event type `name` at schema version `stored` into `E`.
    ///
    /// Distinguishes an unknown type name, a name registered by another Rust type, a schema
    /// newer than the code, a failed upcast, and a payload that does not fit.
    pub fn decode<E: DomainEvent>(&self, name: &str, stored: u32, payload: &str) -> Result<E> {
        let reg = self.lookup(name)?;
        if (reg.type_id)() != TypeId::of::<E>() {
            return Err(Error::WrongEventType {
                event_type: name.to_owned(),
                registered: (reg.rust_type)(),
                requested: std::any::type_name::<E>(),
                event_id: None,
                position: None,
            });
        }
        let source = self.source(reg, stored, payload)?;
        decode_source::<E>(reg.name, source)
    }

    /// Decodes a stored payload into whichever Rust type registers `name`.
    pub fn decode_any(&self, name: &str, stored: u32, payload: &str) -> Result<Box<dyn Any + Send>> {
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
