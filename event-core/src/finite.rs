//! Refusing floats that JSON cannot hold.
//!
//! serde_json writes a NaN or an infinity as `null`, which reads back as something else (an
//! `Option<f64>` turns into `None`) or not at all. A stored event must read back identical,
//! so a value holding one is refused before it is stored. serde_json writes nothing else for
//! a non-finite float, so only JSON with a `null` in it can hide one: [`to_json`] walks the
//! value a second time only then, and the common payload costs one substring search.

use std::fmt;

use serde::Serialize;
use serde::ser;

/// Serializes `value` to compact JSON with serde_json, refusing a NaN or an infinity
/// anywhere in it (serde_json would write it as `null`).
pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let json = serde_json::to_string(value)?;
    check_if_null(value, &json)?;
    Ok(json)
}

/// Refuses `value` if it holds a NaN or an infinity, given `json`, its serde_json form:
/// only a `null` in the JSON can stand for one, so without one there is nothing to walk.
pub(crate) fn check_if_null<T: Serialize + ?Sized>(
    value: &T,
    json: &str,
) -> serde_json::Result<()> {
    if json.contains("null") {
        value
            .serialize(Check)
            .map_err(<serde_json::Error as ser::Error>::custom)?;
    }
    Ok(())
}

/// A float JSON cannot hold, and where it sits.
#[derive(Debug)]
struct NonFinite {
    what: String,
    /// The fields and indexes around it, innermost first.
    path: Vec<String>,
}

impl NonFinite {
    fn within(mut self, segment: impl fmt::Display) -> Self {
        self.path.push(segment.to_string());
        self
    }
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if !self.path.is_empty() {
            f.write_str(" at `")?;
            for (i, segment) in self.path.iter().rev().enumerate() {
                if i > 0 && !segment.starts_with('[') {
                    f.write_str(".")?;
                }
                f.write_str(segment)?;
            }
            f.write_str("`")?;
        }
        Ok(())
    }
}

impl std::error::Error for NonFinite {}

impl ser::Error for NonFinite {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        NonFinite {
            what: msg.to_string(),
            path: Vec::new(),
        }
    }
}

fn refuse(kind: &str, value: impl fmt::Display) -> NonFinite {
    NonFinite {
        what: format!(
            "the {kind} {value} cannot be stored: JSON has no NaN or infinity \
             (serde_json would write null)"
        ),
        path: Vec::new(),
    }
}

/// A serializer that writes nothing and fails on a non-finite float. It reports itself
/// human-readable, as serde_json does, so every type takes the same shape as when stored.
#[derive(Clone, Copy)]
struct Check;

/// The state of a sequence, tuple or map being checked: the index of the next element.
struct Compound {
    index: usize,
}

impl Compound {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NonFinite> {
        let index = self.index;
        self.index += 1;
        value
            .serialize(Check)
            .map_err(|e| e.within(format_args!("[{index}]")))
    }
}

macro_rules! accept {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Result<(), NonFinite> { Ok(()) })*
    };
}

impl ser::Serializer for Check {
    type Ok = ();
    type Error = NonFinite;
    type SerializeSeq = Compound;
    type SerializeTuple = Compound;
    type SerializeTupleStruct = Compound;
    type SerializeTupleVariant = Compound;
    type SerializeMap = Compound;
    type SerializeStruct = Compound;
    type SerializeStructVariant = Compound;

    accept!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_f32(self, v: f32) -> Result<(), NonFinite> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(refuse("f32", v))
        }
    }

    fn serialize_f64(self, v: f64) -> Result<(), NonFinite> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(refuse("f64", v))
        }
    }

    fn serialize_none(self) -> Result<(), NonFinite> {
        Ok(())
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NonFinite> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<(), NonFinite> {
        Ok(())
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), NonFinite> {
        Ok(())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(self).map_err(|e| e.within(variant))
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_tuple(self, _: usize) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Compound, NonFinite> {
        Ok(Compound { index: 0 })
    }

    fn collect_str<T: fmt::Display + ?Sized>(self, _: &T) -> Result<(), NonFinite> {
        // Written as a JSON string, whatever it shows.
        Ok(())
    }
}

/// The sequence-like compounds: each element is checked in turn.
macro_rules! check_elements {
    ($($trait:ident :: $method:ident),+ $(,)?) => {$(
        impl ser::$trait for Compound {
            type Ok = ();
            type Error = NonFinite;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NonFinite> {
                self.element(value)
            }
            fn end(self) -> Result<(), NonFinite> {
                Ok(())
            }
        }
    )+};
}

check_elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field,
);

impl ser::SerializeMap for Compound {
    type Ok = ();
    type Error = NonFinite;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), NonFinite> {
        key.serialize(Check)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NonFinite> {
        self.element(value)
    }
    fn end(self) -> Result<(), NonFinite> {
        Ok(())
    }
}

impl ser::SerializeStruct for Compound {
    type Ok = ();
    type Error = NonFinite;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(Check).map_err(|e| e.within(key))
    }
    fn end(self) -> Result<(), NonFinite> {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Compound {
    type Ok = ();
    type Error = NonFinite;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), NonFinite> {
        value.serialize(Check).map_err(|e| e.within(key))
    }
    fn end(self) -> Result<(), NonFinite> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Serialize)]
    struct Leg {
        price: f64,
        weights: Vec<f32>,
    }

    #[derive(Serialize)]
    enum Order {
        Filled { legs: Vec<Leg>, fee: Option<f64> },
    }

    #[test]
    fn finite_floats_and_nulls_pass_unchanged() {
        let order = Order::Filled {
            legs: vec![Leg {
                price: -0.0,
                weights: vec![f32::MIN_POSITIVE, f32::MAX],
            }],
            fee: None,
        };
        assert_eq!(
            to_json(&order).unwrap(),
            serde_json::to_string(&order).unwrap()
        );
        let mut map = BTreeMap::new();
        map.insert("null", f64::MIN_POSITIVE / 2.0);
        assert!(to_json(&map).is_ok());
    }

    #[test]
    fn nan_and_infinities_are_refused_with_their_place() {
        let order = Order::Filled {
            legs: vec![
                Leg {
                    price: 1.0,
                    weights: vec![],
                },
                Leg {
                    price: 2.0,
                    weights: vec![0.5, f32::NEG_INFINITY],
                },
            ],
            fee: None,
        };
        let error = to_json(&order).unwrap_err().to_string();
        assert!(error.contains("f32 -inf"), "{error}");
        assert!(error.contains("`legs[1].weights[1]`"), "{error}");

        let fee = Order::Filled {
            legs: vec![],
            fee: Some(f64::NAN),
        };
        let error = to_json(&fee).unwrap_err().to_string();
        assert!(
            error.contains("f64 NaN") && error.contains("`fee`"),
            "{error}"
        );
        assert!(to_json(&[f64::INFINITY]).is_err());
    }
}
