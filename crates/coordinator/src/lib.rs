//! fleet's coordinator: device registry, health-gated rollouts in waves, automatic rollback,
//! and the MQTT broker devices talk to.
//!
//! # Layout
//! Pure core (no I/O, no clock, no tokio):
//! - [`baseline`]: health samples, running aggregates, the pre-rollout baseline.
//! - [`gate`]: Wilson bounds, triggers, the gate verdict, trend detection.
//! - [`waves`]: target selection, canary selection, percentage waves.
//! - [`checklist`]: the pre-deployment checklist against the registry.
//! - [`ab`]: strategy `ab`: the arms' plan, the pair's checklist items, difference intervals.
//! - [`engine`]: one rollout's lifecycle, `(state, event, now) -> (state, actions)`.
//! - [`report`]: the deployment report and its Markdown.
//! - [`model`]: what the core knows about a device.
//! - [`operators`]: who sent a command (operators' signatures, replay window).
//! - [`trust`]: the chain of signed release-key rotations.
//! - [`auth`]: the embedded broker's accounts (credentials file) and per-client topic rules.
//!
//! Drivers and I/O:
//! - [`config`]: the configuration file and environment overrides.
//! - [`registry`]: SQLite: devices, releases, desired states, rollouts, waves, assignments,
//!   baselines, the outbox and the append-only audit trail; migrations.
//! - [`broker`]: the embedded rumqttd (behind the guard when secured; its auth hook admits only
//!   the guard and the coordinator) or an external broker, and the coordinator's MQTT link.
//! - [`guard`]: TLS termination, login and the per-client topic ACL in front of the embedded
//!   rumqttd; [`mqtt_wire`]: the MQTT packets it reads (pure, fuzzed).
//! - [`tls`]: TLS client settings for every MQTT client (pinned CA, optional client cert).
//! - [`driver`]: receive → event → step → commit → publish.
//! - [`http`]: `/metrics`, `/api/v1/…`, `/artifacts/{sha256}`.
//! - [`metrics`]: counters behind `/metrics`.
//! - `testkit`: signed test releases, test fleets, and a virtual-time fleet over the engine.

pub mod ab;
pub mod auth;
pub mod baseline;
pub mod broker;
pub mod checklist;
pub mod config;
pub mod driver;
pub mod engine;
pub mod gate;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod model;
pub mod mqtt_wire;
pub mod operators;
pub mod registry;
pub mod report;
#[doc(hidden)]
pub mod testkit;
pub mod trust;
pub mod waves;

pub use config::Config;
pub use driver::{Running, run, start};
