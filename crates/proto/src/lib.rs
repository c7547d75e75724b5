//! fleet's wire protocol: the messages agents, the coordinator and operators exchange, how they
//! are framed, the topics they travel on, and the signed releases they carry. No I/O: nothing
//! here knows about MQTT, sockets, files or clocks.
//!
//! # Layout
//! - [`ids`]: device, rollout and request ids, restricted to a topic-safe charset.
//! - [`topic`]: topic names under `fleet/v1/`, builders, parsers and filters.
//! - [`frame`]: version byte + postcard (JSON for operator topics), per-kind size limits, typed
//!   decode errors.
//! - [`device`]: desired state, reported state, heartbeat, events, online status.
//! - [`operator`]: operator commands and the coordinator's replies.
//! - [`rollout`]: the rollout state block and the deployment report.
//! - [`manifest`]: the TOML a release engineer writes, validated all at once.
//! - [`release`]: the signed release, its canonical bytes, and the admit decision.
//! - [`trust`]: release-key rotation (signed by every pinned key) and the trusted-time floor.
//! - [`time`]: wall-clock instants and durations on the wire.
//! - [`hex`]: fixed-size byte strings (digests, key ids, signatures).

mod bytes;
pub mod device;
pub mod frame;
pub mod hex;
pub mod ids;
pub mod manifest;
pub mod operator;
pub mod release;
pub mod rollout;
pub mod time;
pub mod topic;
pub mod trust;

pub use frame::{DecodeError, FrameProblem, Kind, Message, decode, encode};
pub use ids::{DeviceId, IdError, RequestId, RolloutId};
pub use release::{Refusal, Release, SignedRelease};
pub use time::UnixMillis;
pub use topic::Topic;

/// ed25519 keys, re-exported so callers use the same version.
pub use ed25519_dalek::{SigningKey, VerifyingKey};
