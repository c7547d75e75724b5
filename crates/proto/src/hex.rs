//! Fixed-size byte strings (digests, key ids, signatures): hex text in JSON and TOML, raw bytes
//! in postcard.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `N` bytes, written as `2N` lowercase hex digits where text is expected.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hex<const N: usize>(pub [u8; N]);

/// A SHA-256 digest.
pub type Sha256 = Hex<32>;

impl<const N: usize> Hex<N> {
    /// The first bytes in hex, enough for a person to tell two apart in a message.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..N.min(6)])
    }
}

impl Sha256 {
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Hex(sha2::Sha256::digest(data).into())
    }
}

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl<const N: usize> fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hex({self})")
    }
}

/// Why a string is not `N` bytes of hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected {expected} hex digits, got {got:?}")]
pub struct HexError {
    pub expected: usize,
    pub got: String,
}

impl<const N: usize> FromStr for Hex<N> {
    type Err = HexError;
    fn from_str(s: &str) -> Result<Self, HexError> {
        let mut out = [0u8; N];
        match hex::decode_to_slice(s, &mut out) {
            Ok(()) => Ok(Hex(out)),
            Err(_) => Err(HexError {
                expected: 2 * N,
                got: s.chars().take(2 * N + 8).collect(),
            }),
        }
    }
}

impl<const N: usize> Serialize for Hex<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            let mut t = s.serialize_tuple(N)?;
            for b in &self.0 {
                t.serialize_element(b)?;
            }
            t.end()
        }
    }
}

impl<'de, const N: usize> Deserialize<'de> for Hex<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            text.parse().map_err(de::Error::custom)
        } else {
            struct Bytes<const N: usize>;
            impl<'de, const N: usize> Visitor<'de> for Bytes<N> {
                type Value = Hex<N>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    write!(f, "{N} bytes")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Hex<N>, A::Error> {
                    let mut out = [0u8; N];
                    for (i, slot) in out.iter_mut().enumerate() {
                        *slot = seq
                            .next_element()?
                            .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                    }
                    Ok(Hex(out))
                }
            }
            d.deserialize_tuple(N, Bytes::<N>)
        }
    }
}
