//! fleet-sim: a fleet in one process.
//!
//! # Layout
//! - [`bench`]: `fleet-sim bench`, measured figures as a Markdown table.
//! - [`demo`]: the demo scenario: a good and a bad release through real agents.
//! - [`site`]: the coordinator and real agents in one process.
//! - [`releases`]: demo releases packed, published and signed as a release engineer would.
//! - [`load`]: protocol-level simulated devices (MQTT clients that behave like agents on the
//!   wire) for load tests and benchmarks.

pub mod bench;
pub mod demo;
pub mod load;
pub mod releases;
pub mod site;
