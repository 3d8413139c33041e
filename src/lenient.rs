//! Lenient deserializers for config values that may arrive as strings.
//!
//! Values from the environment overlay are strings (`try_parsing` is off so
//! that a token such as `00123` stays a string), and values inside the
//! internally tagged sink enum are buffered before they reach their field, so
//! numbers, booleans and lists must also be accepted in string form. One
//! visitor reads whatever scalar or list is there; each function converts it.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use std::fmt;

/// Any value a lenient field may hold.
enum Raw {
    None,
    Str(String),
    U64(u64),
    I64(i64),
    Bool(bool),
    List(Vec<String>),
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, number, boolean or list of strings")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::U64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::I64(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut out = Vec::new();
        while let Some(s) = seq.next_element::<String>()? {
            out.push(s);
        }
        Ok(Raw::List(out))
    }
    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

fn wrong<E: de::Error>(expected: &str) -> E {
    E::custom(format!("expected {expected}"))
}

/// An optional unsigned integer, from a number or a decimal string.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match d.deserialize_any(RawVisitor)? {
        Raw::None => Ok(None),
        Raw::U64(v) => Ok(Some(v)),
        Raw::I64(v) => u64::try_from(v)
            .map(Some)
            .map_err(|_| de::Error::custom(format!("{v} is negative; expected a non-negative integer"))),
        Raw::Str(v) => {
            v.trim().parse().map(Some).map_err(|_| de::Error::custom(format!("'{v}' is not a non-negative integer")))
        }
        _ => Err(wrong("a non-negative integer")),
    }
}

/// An optional boolean, from a bool or the strings true/false/yes/no/on/off/1/0.
pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match d.deserialize_any(RawVisitor)? {
        Raw::None => Ok(None),
        Raw::Bool(v) => Ok(Some(v)),
        Raw::Str(v) => match v.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(Some(true)),
            "false" | "no" | "off" | "0" => Ok(Some(false)),
            _ => Err(de::Error::custom(format!("'{v}' is not true or false"))),
        },
        _ => Err(wrong("true or false")),
    }
}

/// An optional list of strings, from a list or a comma-separated string.
pub fn opt_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    match d.deserialize_any(RawVisitor)? {
        Raw::None => Ok(None),
        Raw::List(v) => Ok(Some(v)),
        Raw::Str(v) => Ok(Some(v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())),
        _ => Err(wrong("a list of strings or a comma-separated string")),
    }
}

/// An optional string, from a string or a number (e.g. `facility = 20`).
pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    match d.deserialize_any(RawVisitor)? {
        Raw::None => Ok(None),
        Raw::Str(v) => Ok(Some(v)),
        Raw::U64(v) => Ok(Some(v.to_string())),
        Raw::I64(v) => Ok(Some(v.to_string())),
        _ => Err(wrong("a string or a number")),
    }
}
