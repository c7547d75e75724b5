//! Prerequisites: a missing one is a visible skip on a developer's machine and a failure in CI.
//!
//! ```no_run
//! use fleet_e2e::{Mosquitto, MqttUser, TestDir, require};
//!
//! let dir = TestDir::new("acl");
//! // Prints "SKIPPED: mosquitto not installed (apt-get install -y mosquitto)" and returns when
//! // mosquitto is absent, or panics when FLEET_REQUIRE_E2E=1.
//! let broker = require!(Mosquitto::start(dir.path(), &[MqttUser::coordinator("coordinator")]));
//! # let _ = broker;
//! ```

use std::fmt;

use crate::process::visible;

/// Turns every skip of the MQTT/process end-to-end suite into a failure (CI sets it).
pub const REQUIRE_E2E: &str = "FLEET_REQUIRE_E2E";
/// Turns every skip of the systemd test bed into a failure (CI sets it).
pub const REQUIRE_TESTBED: &str = "FLEET_REQUIRE_TESTBED";

/// What a harness constructor returns when it depends on something the machine may lack.
#[derive(Debug)]
#[must_use = "an Outcome must be checked: use require!(…) or .or_skip()"]
pub enum Outcome<T> {
    /// The prerequisite is there and the thing was started.
    Ready(T),
    /// The prerequisite is missing; the test should skip visibly (or fail, see [`Skip::require_var`]).
    Skipped(Skip),
}

/// Why a test cannot run here, and what would fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// What is missing and how to install it, e.g. `mosquitto not installed (apt-get install -y mosquitto)`.
    pub reason: String,
    /// The variable that turns this skip into a failure: [`REQUIRE_E2E`] or [`REQUIRE_TESTBED`].
    pub require_var: &'static str,
}

impl Skip {
    pub fn new(reason: impl Into<String>, require_var: &'static str) -> Skip {
        Skip {
            reason: reason.into(),
            require_var,
        }
    }

    /// True when the environment says this prerequisite must be present.
    pub fn required(&self) -> bool {
        required(self.require_var)
    }
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SKIPPED: {}", self.reason)
    }
}

/// True when `var` is set to something other than empty or `0`.
pub fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl<T> Outcome<T> {
    /// The value, or `None` after printing `SKIPPED: …` past the test harness's output capture.
    /// Panics instead when the skip's variable (`FLEET_REQUIRE_E2E` / `FLEET_REQUIRE_TESTBED`) is set.
    #[track_caller]
    pub fn or_skip(self) -> Option<T> {
        match self {
            Outcome::Ready(value) => Some(value),
            Outcome::Skipped(skip) => {
                if skip.required() {
                    panic!(
                        "{} is set, so this is a failure: {}",
                        skip.require_var, skip.reason
                    );
                }
                let test = std::thread::current()
                    .name()
                    .unwrap_or("<unnamed test>")
                    .to_owned();
                visible(&format!("{skip} [{test}]"));
                None
            }
        }
    }

    /// The value; panics with the skip's reason otherwise (for code that already checked).
    #[track_caller]
    pub fn ready(self) -> T {
        match self {
            Outcome::Ready(value) => value,
            Outcome::Skipped(skip) => panic!("prerequisite missing: {}", skip.reason),
        }
    }

    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Ready(value) => Outcome::Ready(f(value)),
            Outcome::Skipped(skip) => Outcome::Skipped(skip),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Ready(_))
    }
}

/// Unwraps an [`Outcome`], or prints `SKIPPED: …` and returns from the enclosing test.
///
/// Under `FLEET_REQUIRE_E2E=1` / `FLEET_REQUIRE_TESTBED=1` a skip panics instead.
#[macro_export]
macro_rules! require {
    ($outcome:expr) => {
        match $crate::Outcome::or_skip($outcome) {
            Some(value) => value,
            None => return,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_passes_the_value_through() {
        assert_eq!(Outcome::Ready(7).or_skip(), Some(7));
        assert_eq!(Outcome::Ready(7).map(|v| v * 2).ready(), 14);
    }

    #[test]
    fn a_skip_names_what_is_missing() {
        let skip = Skip::new(
            "mosquitto not installed (apt-get install -y mosquitto)",
            "FLEET_E2E_TEST_UNSET_VARIABLE",
        );
        assert_eq!(
            skip.to_string(),
            "SKIPPED: mosquitto not installed (apt-get install -y mosquitto)"
        );
        assert!(!skip.required());
        // `or_skip` itself (the printed line, the failure under FLEET_REQUIRE_E2E) is exercised
        // in a child process by tests/harness.rs, where its output cannot mislead anyone.
    }
}
