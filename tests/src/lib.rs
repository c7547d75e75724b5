//! fleet's end-to-end harness: real processes, a real mosquitto, and real systemd devices.
//!
//! Scenario tests in `tests/tests/` drive the real `fleet-coordinator`, `fleet-agent` and
//! `fleetctl` binaries with it. Everything a test starts is owned by a guard whose `Drop` kills
//! and cleans up, so a failing assertion in the middle of a scenario leaves no process, mount,
//! namespace or veth behind.
//!
//! # Layout
//! - [`agent`]: the real `fleet-agent` binary as a device ([`Agent`]): generated config, own
//!   slots, state and app port, killed on drop (its app with it), restartable on the same disk.
//! - [`artifact`]: the real `fleet-demo-app` packed with `fleetctl artifact pack` ([`DemoArtifact`]),
//!   served by the coordinator's `/artifacts/{sha256}`, and [`ReleaseSpec::demo_app`].
//! - [`process`]: the [`Child`] guard (own process group, logs on disk, `wait_for_line`), workspace
//!   binaries, [`free_port`], [`wait_until`] and [`TestDir`].
//! - [`engine`]: a `dockerd` of a device's own ([`Engine`], killed on drop with its
//!   containers) and the demo app as a container image packed as a release ([`DemoImage`]).
//! - [`prereq`]: [`Outcome`] and the [`require!`] macro: a missing prerequisite is a visible skip,
//!   or a failure when `FLEET_REQUIRE_E2E=1` / `FLEET_REQUIRE_TESTBED=1`.
//! - [`fleet`]: the `fleet-coordinator` binary, `fleetctl` runs, and releases signed with
//!   `fleetctl` as a release engineer would.
//! - [`mosquitto`]: a real mosquitto with a generated config, password file and per-device ACL,
//!   restartable on the same port and persistence directory.
//! - [`mqtt`]: a small blocking MQTT client for tests that act as a device, an operator or an
//!   eavesdropper.
//! - [`tls`]: certificates made with `deploy/mosquitto/gen-certs.sh` and embedded-broker
//!   accounts made with `fleet-coordinator credential`.
//! - [`testbed`]: systemd devices booted with `unshare` + `chroot` on an overlay of a cached
//!   debootstrap root, each with its own PID 1, disk, hostname and network namespace on a lab bridge.

pub mod agent;
pub mod artifact;
pub mod engine;
pub mod fleet;
pub mod mosquitto;
pub mod mqtt;
pub mod prereq;
pub mod process;
pub mod testbed;
pub mod tls;

pub use agent::{Agent, AppHealth, DeviceSpec, MqttEndpoint};
pub use artifact::DemoArtifact;
pub use engine::{ContainerView, DEMO_CONTAINER, DemoImage, Engine};
pub use fleet::{
    ContainerSection, Coordinator, Ctl, CtlRun, FAST, ReleaseSpec, Releases, http_get, http_get_at,
};
pub use mosquitto::{Mosquitto, MqttUser, Role};
pub use mqtt::MqttProbe;
pub use prereq::{Outcome, Skip};
pub use process::{
    Child, Pattern, TestDir, binary, free_port, visible, wait_for, wait_until, workspace_root,
};
pub use testbed::{Device, Exec, Lab};
pub use tls::{Certs, Credential, write_credentials};
