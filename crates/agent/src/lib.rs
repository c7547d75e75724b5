//! fleet-agent: the device daemon. Converges the device to the coordinator's desired release
//! with atomic dual-slot updates, proves a new version healthy on a local trial before it
//! commits, rolls back by itself when it is not, and reports what is really there.
//!
//! # Layout
//! - [`config`]: the configuration struct, loading (file + `FLEET_AGENT__…` env), checks.
//! - [`machine`]: the pure update state machine `step(ctx, state, input, now)` and the
//!   journal resolution table.
//! - [`trial`]: the pure trial verdict from one probe sample.
//! - [`journal`]: the state machine's state on disk: checksummed, atomic, with a previous copy.
//! - [`slots`]: `slot-a`/`slot-b`, the atomic `active` link swap, safe tar.gz unpacking, hooks.
//! - [`fetch`]: resumable, bounded, hashed artifact download (http, https, file).
//! - [`runtime`]: the app runtime trait; process supervisor, systemd and container
//!   implementations.
//! - [`docker`]: the small Docker Engine API client the container runtime uses.
//! - [`snapshot`]: data snapshots taken before a swap and restored on a rollback.
//! - [`health`]: health layers 2–4: system, health endpoint, functional probe.
//! - [`outbox`]: the durable, ordered, bounded event outbox.
//! - [`link`]: the MQTT client driver (rumqttc), reconnects, event acknowledgements.
//! - [`tls`]: the MQTT TLS client config (pinned CA, optional client certificate; rustls +
//!   ring, no process-wide provider).
//! - [`traffic`]: blue-green traffic switching: the built-in TCP forwarder, the switch command.
//! - [`agent`]: the driver tying them together: [`run`].
//! - [`notify`]: systemd's notify protocol (used by the binary).
//! - [`fault`]: named fault points (feature `fault-points`).
//!
//! # Architecture invariants
//! - The journal is written before every action it names; the active slot is never written.
//! - Nothing here installs signal handlers, a tracing subscriber, or reads the process
//!   environment (except `FLEET_AGENT_FAULT` under the `fault-points` feature): many agents
//!   can run in one process.

pub mod agent;
pub mod config;
pub mod docker;
pub mod fault;
pub mod fetch;
pub mod fsutil;
pub mod health;
pub mod journal;
pub mod link;
pub mod machine;
pub mod notify;
pub mod outbox;
pub mod runtime;
pub mod slots;
pub mod snapshot;
pub mod traffic;
pub mod trial;

pub use agent::{Error, Options, run, run_with};
pub use config::Config;
