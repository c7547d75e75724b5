//! fleet's end-to-end harness: real processes, a real mosquitto, and real systemd devices.
//!
//! Scenario tests in `tests/tests/` drive the real `fleet-coordinator`, `fleet-agent` and
//! `fleetctl` binaries with it. Everything a test starts is owned by a guard whose `Drop` kills
//! and cleans up, so a failing assertion in the middle of a scenario leaves no process, mount,
//! namespace or veth behind.
//!
//! # Layout
//! - [`process`]: the [`Child`] guard (own process group, logs on disk, `wait_for_line`), workspace
//!   binaries, [`free_port`], [`wait_until`] and [`TestDir`].
//! - [`prereq`]: [`Outcome`] and the [`require!`] macro: a missing prerequisite is a visible skip,
//!   or a failure when `FLEET_REQUIRE_E2E=1` / `FLEET_REQUIRE_TESTBED=1`.
//! - [`fleet`]: the `fleet-coordinator` binary, `fleetctl` runs, and releases signed with
//!   `fleetctl` as a release engineer would.
//! - [`mosquitto`]: a real mosquitto with a generated config, password file and per-device ACL,
//!   restartable on the same port and persistence directory.
//! - [`mqtt`]: a small blocking MQTT client for tests that act as a device, an operator or an
//!   eavesdropper.
//! - [`testbed`]: systemd devices booted with `unshare` + `chroot` on an overlay of a cached
//!   debootstrap root, each with its own PID 1, disk, hostname and network namespace on a lab bridge.

pub mod fleet;
pub mod mosquitto;
pub mod mqtt;
pub mod prereq;
pub mod process;
pub mod testbed;

pub use fleet::{Coordinator, Ctl, CtlRun, FAST, ReleaseSpec, Releases, http_get};
pub use mosquitto::{Mosquitto, MqttUser, Role};
pub use mqtt::MqttProbe;
pub use prereq::{Outcome, Skip};
pub use process::{
    Child, Pattern, TestDir, binary, free_port, visible, wait_for, wait_until, workspace_root,
};
pub use testbed::{Device, Exec, Lab};
