//! fleet-sim: a fleet in one process.
//!
//! # Layout
//! - [`load`]: protocol-level simulated devices (MQTT clients that behave like agents on the
//!   wire) for load tests and benchmarks.

pub mod load;
