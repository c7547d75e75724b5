//! Integration tests: start the real binary on `--port 0` and observe each knob from outside,
//! the way an agent's probes and supervisor would.
//!
//! # Layout
//! - `support`: the child-process guard, a std-only HTTP client, bounded polling, JSON field
//!   lookup and `/proc` reading.
//! - `faults`: one test per fault knob, plus the device-type gate and the environment forms.
//! - `http`: `/health`'s shape and the server's behaviour under bad or slow clients.
//! - `cli`: usage errors, `--help`, and the `infer` subcommand.
//!
//! One test binary (not one per file) so the support code is compiled once and fully used.

mod cli;
mod faults;
mod http;
// `cfg(test)` is always true here; it tells clippy that this is test code, where
// `allow-unwrap-in-tests` lets helpers unwrap like the tests themselves.
#[cfg(test)]
mod support;
