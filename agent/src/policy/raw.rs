//! The policy file as written, before validation.
//!
//! Values whose correctness depends on more than their YAML type (modes, CIDRs, port
//! ranges, numbers with a range) are kept as written and checked in `validate`, so one
//! pass reports every such mistake instead of stopping at the first, as a typed field
//! would. Everything is [`Spanned`] where a later error needs to point at it.
#![forbid(unsafe_code)]

use std::fmt;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_saphyr::Spanned;

pub(super) use super::validate::RawMatch;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub version: Spanned<Int>,
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub interfaces: Option<RawInterfaces>,
    #[serde(default)]
    pub exempt: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub nat64: Vec<Spanned<String>>,
    #[serde(default)]
    pub include_dirs: Vec<Spanned<String>>,
    #[serde(default)]
    pub host_essentials: RawHostEssentials,
    pub regions: Spanned<IndexMap<Spanned<String>, RawRegion>>,
    pub data_classes: Spanned<IndexMap<Spanned<String>, RawClass>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInterfaces {
    #[serde(default)]
    pub egress: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub gateway: Vec<Spanned<String>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
}

/// The switches of the built-in exemptions for the host's own link traffic; each is on
/// unless written `false`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHostEssentials {
    #[serde(default)]
    pub dhcp: Option<bool>,
    #[serde(default)]
    pub neighbor_discovery: Option<bool>,
    #[serde(default)]
    pub link_multicast: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegion {
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub files: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClass {
    #[serde(rename = "match")]
    pub selectors: Spanned<RawMatch>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub unknown: Option<Spanned<String>>,
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
}

/// An integer of any size, range-checked in `validate`. A visitor of its own so a value
/// of the wrong type reads "expected an integer", not "invalid i64".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Int(pub i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(i128::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(i128::from(v)))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// A scalar that may be written as a number or a name: `443` or `"9000-9100"`, `6` or
/// `tcp`. A hand-written visitor rather than `#[serde(untagged)]`, whose failure message
/// ("data did not match any variant") says nothing useful.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum IntOrStr {
    Int(i128),
    Str(String),
}

impl<'de> Deserialize<'de> for IntOrStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(i128::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(i128::from(v)))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Int(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrStr, E> {
                Ok(IntOrStr::Str(v.to_owned()))
            }
        }
        deserializer.deserialize_any(V)
    }
}
