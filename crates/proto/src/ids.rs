//! Identifiers that travel inside topic names: device ids, rollout ids and request ids.
//!
//! An id becomes one level of an MQTT topic and, on the agent, part of a file path, so the
//! charset is deliberately narrow: ASCII letters, digits, `-`, `_` and `.`, starting with a
//! letter or digit, at most [`MAX_ID_LEN`] bytes. That rules out `/` (a topic level), `+` and `#`
//! (wildcards), empty levels, and `..`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid {kind}: it is empty")]
    Empty { kind: &'static str },
    #[error("invalid {kind} {value:?}: {len} bytes is longer than the {MAX_ID_LEN}-byte limit")]
    TooLong {
        kind: &'static str,
        value: String,
        len: usize,
    },
    #[error(
        "invalid {kind} {value:?}: it contains {found:?}; ids may use only ASCII letters, digits, '-', '_' and '.'"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
    },
    #[error("invalid {kind} {value:?}: it must start with a letter or a digit")]
    BadStart { kind: &'static str, value: String },
}

fn check(kind: &'static str, value: &str) -> Result<(), IdError> {
    let Some(first) = value.chars().next() else {
        return Err(IdError::Empty { kind });
    };
    if value.len() > MAX_ID_LEN {
        // Keep the message readable: a hostile id may be megabytes long.
        let shown: String = value.chars().take(MAX_ID_LEN).collect::<String>() + "…";
        return Err(IdError::TooLong {
            kind,
            value: shown,
            len: value.len(),
        });
    }
    if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found,
        });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(IdError::BadStart {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` as an id.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                check($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A device's id: its MQTT client id, username and topic level.
    DeviceId,
    "device id"
);
id_type!(
    /// A rollout's id, chosen by the coordinator (e.g. `r-42`).
    RolloutId,
    "rollout id"
);
id_type!(
    /// An operator request's id, chosen by the client; the reply topic carries it.
    RequestId,
    "request id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_id(input: &str, expect: Result<(), &str>) {
        let got = DeviceId::new(input).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(got, expect.map_err(str::to_owned), "input {input:?}");
    }

    #[test]
    fn device_ids() {
        check_id("cam-017", Ok(()));
        check_id("jetson_orin.eu-west.3", Ok(()));
        check_id(&"a".repeat(64), Ok(()));
        check_id("", Err("invalid device id: it is empty"));
        check_id(
            "a/b",
            Err(
                "invalid device id \"a/b\": it contains '/'; ids may use only ASCII letters, digits, '-', '_' and '.'",
            ),
        );
        check_id(
            "+",
            Err(
                "invalid device id \"+\": it contains '+'; ids may use only ASCII letters, digits, '-', '_' and '.'",
            ),
        );
        check_id(
            "dev#1",
            Err(
                "invalid device id \"dev#1\": it contains '#'; ids may use only ASCII letters, digits, '-', '_' and '.'",
            ),
        );
        check_id(
            "..",
            Err("invalid device id \"..\": it must start with a letter or a digit"),
        );
        check_id(
            "dév",
            Err(
                "invalid device id \"dév\": it contains 'é'; ids may use only ASCII letters, digits, '-', '_' and '.'",
            ),
        );
        let long = "a".repeat(65);
        check_id(
            &long,
            Err(&format!(
                "invalid device id \"{}…\": 65 bytes is longer than the 64-byte limit",
                "a".repeat(64)
            )),
        );
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<RolloutId>("\"r/1\"").unwrap_err();
        assert!(
            err.to_string().contains("invalid rollout id \"r/1\""),
            "{err}"
        );
        let ok: RequestId = serde_json::from_str("\"req-1\"").unwrap();
        assert_eq!(ok.as_str(), "req-1");
    }
}
