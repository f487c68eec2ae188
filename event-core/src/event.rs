//! The [`DomainEvent`] trait that `#[derive(DomainEvent)]` implements.

use std::any::TypeId;

/// One event type a Rust type stands for: its stored name and current schema version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventType {
    /// The name stored with each event, unique across the program.
    pub name: &'static str,
    /// The schema version new events of this type are written with (1 or more).
    pub version: u32,
}

impl EventType {
    /// An event type descriptor.
    pub const fn new(name: &'static str, version: u32) -> Self {
        EventType { name, version }
    }
}

/// A domain event: a fact about one aggregate, stored under a registered type name.
///
/// Implement it with `#[derive(DomainEvent)]`, never by hand: the derive also registers each
/// event type so that a store can turn a stored row back into this Rust type by its name.
///
/// An enum stands for one event type per variant, a struct for one event type. The stored
/// payload is the variant's (or struct's) own fields as JSON, without the enum's tag, so a
/// variant can be renamed in Rust while its stored name stays put; such a type also
/// implements serde's `Serialize` and `Deserialize`.
///
/// A *group* (`#[domain_event(group)]` on an enum of newtype variants) stands for the event
/// types of its members, each itself a `DomainEvent`: it registers nothing of its own, and
/// each event keeps its member's name, schema version, payload and aggregate id. A stored
/// event of a member decodes into the group as well as into the member. A group needs no
/// serde impls, which is why they are not supertraits here.
pub trait DomainEvent: Send + Sync + 'static {
    /// The aggregate type the events belong to, e.g. `"Account"`.
    const AGGREGATE_TYPE: &'static str;

    /// Every event type this Rust type stands for.
    const EVENT_TYPES: &'static [EventType];

    /// The stored name of this event's type.
    fn event_type(&self) -> &'static str;

    /// The schema version this event is written with.
    fn schema_version(&self) -> u32;

    /// The aggregate id carried by a field marked `#[domain_event(aggregate_id)]`, if any.
    fn aggregate_id(&self) -> Option<String> {
        None
    }

    /// The stored payload: the event's content as compact JSON. A float that JSON cannot
    /// hold (a NaN or an infinity, which serde_json would write as `null`) is an error.
    fn to_payload(&self) -> serde_json::Result<String>;

    /// Deserializes the content of the event type `event_type` from `deserializer`.
    ///
    /// Called by the registry after the type name is checked and upcasters have run;
    /// use [`RecordedEvent::decode`](crate::RecordedEvent::decode) instead.
    #[doc(hidden)]
    fn __deserialize_payload<'de, D>(event_type: &str, deserializer: D) -> Result<Self, D::Error>
    where
        D: serde::Deserializer<'de>,
        Self: Sized;

    /// Whether the event types registered by the Rust type `registered` decode into this
    /// type: the type itself, or for a group one of its members.
    ///
    /// Called by the registry before decoding; a group's derive overrides it.
    #[doc(hidden)]
    fn __decodes_from(registered: TypeId) -> bool
    where
        Self: Sized,
    {
        registered == TypeId::of::<Self>()
    }
}

/// Helpers for the code `#[derive(DomainEvent)]` generates for a group, and for the
/// compile-time check of an aggregate's type.
pub(crate) mod group {
    use super::EventType;

    /// Whether two strings are equal, at compile time.
    pub const fn str_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The event types of a group's members, one after the other; `N` is their count.
    pub const fn concat_event_types<const N: usize>(
        members: &[&'static [EventType]],
    ) -> [EventType; N] {
        let mut out = [EventType::new("", 0); N];
        let (mut m, mut k) = (0, 0);
        while m < members.len() {
            let mut t = 0;
            while t < members[m].len() {
                out[k] = members[m][t];
                k += 1;
                t += 1;
            }
            m += 1;
        }
        assert!(k == N, "the count of a group's event types is their sum");
        out
    }

    /// Whether no two event types share a name.
    pub const fn names_are_distinct(types: &[EventType]) -> bool {
        let mut i = 0;
        while i < types.len() {
            let mut j = i + 1;
            while j < types.len() {
                if str_eq(types[i].name, types[j].name) {
                    return false;
                }
                j += 1;
            }
            i += 1;
        }
        true
    }

    /// Whether `name` is one of `types`: which member of a group an event type is.
    pub fn has_event_type(types: &[EventType], name: &str) -> bool {
        types.iter().any(|t| t.name == name)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const A: &[EventType] = &[EventType::new("Opened", 1)];
        const B: &[EventType] = &[EventType::new("Credited", 2), EventType::new("Closed", 1)];
        const BOTH: &[EventType] = &concat_event_types::<3>(&[A, B]);

        #[test]
        fn strings_compare_at_compile_time() {
            const { assert!(str_eq("Account", "Account")) };
            assert!(!str_eq("Account", "Acount"));
            assert!(!str_eq("Account", "Accounts"));
            assert!(str_eq("", ""));
        }

        #[test]
        fn members_event_types_are_concatenated_in_order() {
            assert_eq!(BOTH, [A[0], B[0], B[1]]);
            assert!(has_event_type(BOTH, "Closed"));
            assert!(!has_event_type(A, "Closed"));
        }

        #[test]
        fn a_name_twice_is_found() {
            assert!(names_are_distinct(BOTH));
            assert!(names_are_distinct(&[]));
            let twice = concat_event_types::<4>(&[BOTH, A]);
            assert!(!names_are_distinct(&twice));
        }
    }
}

/// Helpers for the code `#[derive(DomainEvent)]` generates.
pub(crate) mod payload {
    use serde::de::{self, DeserializeSeed, EnumAccess, VariantAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize};

    /// The payload of a struct event: its compact JSON, refusing a float JSON cannot hold.
    pub fn struct_payload<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
        crate::finite::to_json(value)
    }

    /// The payload of an enum event: serde's externally tagged form with the tag cut off.
    ///
    /// `{"Deposited":{"amount":5}}` becomes `{"amount":5}`, and a unit variant's `"Closed"`
    /// becomes `null`. Serializing once and slicing costs one pass, not two.
    pub fn enum_payload<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
        let mut json = serde_json::to_string(value)?;
        crate::finite::check_if_null(value, &json)?;
        if json.starts_with('"') {
            return Ok("null".to_owned());
        }
        let content_start = tagged_content_start(&json).ok_or_else(|| {
            <serde_json::Error as serde::ser::Error>::custom(
                "a DomainEvent enum must serialize in serde's externally tagged form",
            )
        })?;
        json.truncate(json.len() - 1);
        json.drain(..content_start);
        Ok(json)
    }

    /// The byte index where the content starts in `{"Tag":content}`.
    fn tagged_content_start(json: &str) -> Option<usize> {
        let bytes = json.as_bytes();
        if bytes.first() != Some(&b'{') || bytes.get(1) != Some(&b'"') || !json.ends_with('}') {
            return None;
        }
        let mut i = 2;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    return (bytes.get(i + 1) == Some(&b':')).then_some(i + 2);
                }
                _ => i += 1,
            }
        }
        None
    }

    /// Deserializes the enum `T` as its variant number `index`, with `content` holding the
    /// variant's fields: the inverse of [`enum_payload`], whatever serde names the variant.
    pub fn deserialize_variant<'de, T, D>(content: D, index: u32) -> Result<T, D::Error>
    where
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        T::deserialize(VariantDeserializer { index, content })
    }

    struct VariantDeserializer<D> {
        index: u32,
        content: D,
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for VariantDeserializer<D> {
        type Error = D::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, D::Error> {
            Err(de::Error::custom(
                "a DomainEvent enum deserializes only as an enum",
            ))
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            visitor.visit_enum(self)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }

    impl<'de, D: Deserializer<'de>> EnumAccess<'de> for VariantDeserializer<D> {
        type Error = D::Error;
        type Variant = VariantContent<D>;

        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), D::Error> {
            let tag = seed.deserialize(de::value::U32Deserializer::<D::Error>::new(self.index))?;
            Ok((tag, VariantContent(self.content)))
        }
    }

    struct VariantContent<D>(D);

    impl<'de, D: Deserializer<'de>> VariantAccess<'de> for VariantContent<D> {
        type Error = D::Error;

        fn unit_variant(self) -> Result<(), D::Error> {
            <()>::deserialize(self.0)
        }

        fn newtype_variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<S::Value, D::Error> {
            seed.deserialize(self.0)
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple(len, visitor)
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_struct("", fields, visitor)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Sample {
            Unit,
            Newtype(u32),
            Tuple(u8, String),
            Struct {
                #[serde(rename = "a\"b")]
                field: i64,
            },
            #[serde(rename = "we\"ird")]
            Renamed {
                x: bool,
            },
        }

        fn round_trip(value: Sample, index: u32, expected: &str) {
            let payload = enum_payload(&value).unwrap();
            assert_eq!(payload, expected);
            let mut de = serde_json::Deserializer::from_str(&payload);
            let back: Sample = deserialize_variant(&mut de, index).unwrap();
            de.end().unwrap();
            assert_eq!(back, value);
        }

        #[test]
        fn every_variant_shape_round_trips_without_its_tag() {
            round_trip(Sample::Unit, 0, "null");
            round_trip(Sample::Newtype(7), 1, "7");
            round_trip(Sample::Tuple(1, "x".into()), 2, r#"[1,"x"]"#);
            round_trip(Sample::Struct { field: -3 }, 3, r#"{"a\"b":-3}"#);
            round_trip(Sample::Renamed { x: true }, 4, r#"{"x":true}"#);
        }

        #[test]
        fn content_of_another_variant_is_refused() {
            let payload = r#"{"x":true}"#;
            let result: Result<Sample, _> =
                deserialize_variant(&mut serde_json::Deserializer::from_str(payload), 3);
            assert!(result.is_err());
        }
    }
}
