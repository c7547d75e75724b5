//! Messages between one device's agent and the coordinator.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::{Kind, Message};
use crate::hex::Sha256;
use crate::ids::{DeviceId, RolloutId};
use crate::release::{Arch, KeyId, Refusal, SignedRelease};
use crate::time::UnixMillis;
use crate::trust::RotationRefusal;

/// What a device is: reported by the agent from its config and the hardware, and used by the
/// coordinator to plan waves and by the agent to admit releases.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceFacts {
    /// Hardware type, e.g. `jetson-orin`, `rpi4`, `x86-gateway`.
    pub device_type: String,
    pub arch: Arch,
    pub region: String,
    pub tags: Vec<String>,
    pub agent_version: String,
    /// `process`, `systemd` or `container`.
    pub runtime: String,
    pub memory_total_bytes: u64,
    pub disk_total_bytes: u64,
}

/// One of the two application slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn dir_name(self) -> &'static str {
        match self {
            Slot::A => "slot-a",
            Slot::B => "slot-b",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir_name())
    }
}

/// `devices/{id}/desired`: the release the coordinator wants on this device. Level-triggered:
/// the agent converges to the latest one it has seen, whenever it arrives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub device: DeviceId,
    /// Per device, increasing with every new desired state; the agent reports the one it has
    /// acted on as `applied_sequence`.
    pub sequence: u64,
    pub rollout: Option<RolloutId>,
    /// `None`: keep whatever is installed.
    pub release: Option<SignedRelease>,
    /// Heartbeat interval the coordinator asks for (shortened during a worrying soak).
    pub report_interval: Duration,
    /// Raised by the coordinator to retry a release this device remembers as failed.
    pub retry: u32,
    // Appended by issue 9: an older coordinator's frame ends before it (see `frame::appended`).
    /// Blue-green: once this release commits, keep the previous version's instance running
    /// beside it, without traffic, until a desired state without `hold` arrives. The coordinator
    /// sets it until the device's wave is confirmed, so that rolling the wave back is a switch
    /// back to an instance that never stopped.
    #[serde(default, deserialize_with = "crate::frame::appended")]
    pub hold: bool,
}

/// A release installed in a slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub counter: u64,
    pub digest: Sha256,
    pub slot: Slot,
}

/// Where the device is in one update.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdatePhase {
    Idle,
    Downloading,
    Verifying,
    Installing,
    Swapping,
    Trial,
    RollingBack,
}

/// How the latest update attempt ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub rollout: Option<RolloutId>,
    pub sequence: u64,
    pub version: String,
    pub result: OutcomeKind,
    pub at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum OutcomeKind {
    Committed,
    RolledBack(RollbackReason),
    Refused(Refusal),
    Failed(Failure),
}

/// `devices/{id}/state`: what is really on the device. The device is the source of truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reported {
    pub device: DeviceId,
    /// Per device and per kind, increasing by one per report; the coordinator counts gaps.
    pub seq: u64,
    pub facts: DeviceFacts,
    pub active: Option<Installed>,
    pub standby: Option<Installed>,
    pub phase: UpdatePhase,
    /// The last desired sequence the agent has finished acting on.
    pub applied_sequence: u64,
    pub last_outcome: Option<Outcome>,
    /// The highest release counter this device has accepted (never goes down).
    pub highest_counter: u64,
    pub at: UnixMillis,
    // Appended: an older agent's frame ends before it (see `frame::appended`).
    /// Whether this device can run a blue-green release, so that the coordinator's checklist
    /// refuses a blue-green plan for the devices that cannot instead of each refusing the
    /// release when it arrives.
    #[serde(default, deserialize_with = "crate::frame::appended")]
    pub blue_green: BlueGreenSupport,
}

/// Whether a device can run a blue-green release, as its agent reports it in
/// [`Reported::blue_green`].
///
/// Design: three states, not an `Option<String>`, because an agent from before the field
/// existed says nothing, which is neither "it can" nor "it cannot". That is the default, so it
/// is also what a frame without the field, or with bytes that are not a `BlueGreenSupport`,
/// reads as (`frame::appended`); it is the safe reading because such an agent still refuses a
/// blue-green release on arrival if it cannot run one, as every agent did before the field.
/// Variants are only appended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlueGreenSupport {
    /// Not reported: an agent older than the field, or a device that has not reported yet.
    /// An agent that knows the field never sends it.
    #[default]
    Unknown,
    /// It can: the `process` runtime, a traffic switch configured (`[blue_green] switch`), and
    /// no data directories in the agent's config.
    Supported,
    /// It cannot, and why, in the words of the refusal (`Refusal::StrategyUnsupported`) it
    /// would answer a blue-green release with: its runtime, no traffic switch configured, or
    /// data directories in the agent's config that cannot be snapshotted beside two instances.
    Unsupported { why: String },
}

/// The application as the agent sees it (layer 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppStatus {
    Healthy,
    Degraded,
    Unhealthy,
    /// Running, but the health endpoint did not answer.
    Unreachable,
    /// Not running: never started, exited, or between restarts.
    Stopped,
    /// Nothing installed yet.
    NotInstalled,
}

/// Layer 2: the device itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SystemHealth {
    pub cpu_pct: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    /// Hottest thermal zone, if the device has any.
    pub temperature_c: Option<f32>,
}

impl SystemHealth {
    pub fn memory_pct(&self) -> f64 {
        if self.memory_total_bytes == 0 {
            return 0.0;
        }
        self.memory_used_bytes as f64 * 100.0 / self.memory_total_bytes as f64
    }
}

/// Layers 3 and 4: the application.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppHealth {
    pub status: AppStatus,
    /// The version the health endpoint reports.
    pub version: Option<String>,
    /// Fraction 0–1 over the app's own window.
    pub error_rate: Option<f32>,
    pub p95_ms: Option<f32>,
    /// Restarts within the crash-loop window.
    pub restarts_in_window: u32,
    /// Restarts since the current version started.
    pub restarts_total: u32,
    /// Result of the latest functional probe, if one is configured.
    pub probe_ok: Option<bool>,
    /// Requests the app handled since the previous heartbeat, by its own counter: how much
    /// evidence this heartbeat carries. `None` when the app does not count them.
    pub requests: Option<u64>,
    // Appended by issue 9's A/B work: an older agent's heartbeat ends before it (`AppHealth`
    // is the last field of `Heartbeat` and in no other message, so this ends the frame).
    /// How many of those `requests` failed, by the app's own counter: with `requests`, the
    /// error rate of exactly the requests since the previous heartbeat. `error_rate` is the
    /// app's sliding window, which repeats a failure in every heartbeat while it stays in the
    /// window (and, for an app younger than its window, weighs early requests over late ones);
    /// averaging it over heartbeats diluted a short A/B observation's 2.6 % to 0.7 %. `None`
    /// when the app does not count them: the coordinator then uses `error_rate`.
    #[serde(default, deserialize_with = "crate::frame::appended")]
    pub failed: Option<u64>,
}

/// `devices/{id}/heartbeat`: liveness and health, every report interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub device: DeviceId,
    pub seq: u64,
    pub at: UnixMillis,
    pub uptime: Duration,
    pub active_version: Option<String>,
    pub rollout: Option<RolloutId>,
    pub system: SystemHealth,
    pub app: AppHealth,
}

/// Why the agent's watchdog rolled a new version back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RollbackReason {
    #[error("the new version exited at start (exit status {exit_code:?})")]
    CrashAtStart { exit_code: Option<i32> },
    #[error("crash loop: {restarts} restarts within {}s", window.as_secs())]
    CrashLoop { restarts: u32, window: Duration },
    #[error("health endpoint reported {status:?}")]
    Unhealthy { status: AppStatus },
    #[error("health endpoint reported version {reported}, expected {expected}")]
    WrongVersion { expected: String, reported: String },
    #[error("health endpoint did not answer {failures} probes in a row")]
    Unresponsive { failures: u32 },
    #[error("functional probe failed: {detail}")]
    ProbeFailed { detail: String },
    #[error("trial deadline passed with {good} of {needed} consecutive good probes")]
    TrialDeadline { good: u32, needed: u32 },
    #[error("the agent restarted during the trial and no attempts were left")]
    AgentRestarted,
    #[error("the coordinator asked for the previous version")]
    Requested,
    /// Appended in issue 9: blue-green could not move the traffic to the new version (the
    /// configured switch command failed); the previous version kept serving.
    #[error("the traffic switch to the new version failed: {detail}")]
    SwitchFailed { detail: String },
}

/// Why an update failed before the swap. The active slot is untouched; a later desired state
/// (or a retry) may try again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    #[error("download failed: {detail}")]
    Download { detail: String },
    #[error("artifact sha256 mismatch (expected {expected}, got {got})")]
    ChecksumMismatch { expected: Sha256, got: Sha256 },
    #[error("artifact size mismatch (expected {expected} bytes, got {got})")]
    SizeMismatch { expected: u64, got: u64 },
    #[error("install failed: {detail}")]
    Install { detail: String },
    #[error("post-install hook failed: {detail}")]
    Hook { detail: String },
    #[error("rollback failed: {detail}")]
    Rollback { detail: String },
    /// Appended in issue 10: the data snapshot or the rollback image before the swap.
    #[error("cannot prepare the rollback (data snapshot, rollback image): {detail}")]
    Snapshot { detail: String },
}

/// `devices/{id}/events`: one step of an update, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub device: DeviceId,
    pub seq: u64,
    pub at: UnixMillis,
    pub rollout: Option<RolloutId>,
    /// The desired sequence this step belongs to.
    pub sequence: u64,
    /// The version being installed (or rolled back from).
    pub version: String,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    DownloadStarted {
        size: u64,
        resume_from: u64,
    },
    DownloadFinished {
        size: u64,
    },
    Verified,
    Installed {
        slot: Slot,
    },
    Swapped {
        to: Slot,
    },
    TrialStarted {
        deadline: Duration,
    },
    Committed {
        slot: Slot,
    },
    RolledBack {
        reason: RollbackReason,
        restored: Option<String>,
    },
    Refused {
        reason: Refusal,
    },
    Failed {
        reason: Failure,
    },
    /// The device applied a signed key rotation: it pins `keys` from now on.
    KeysRotated {
        epoch: u64,
        keys: Vec<KeyId>,
    },
    /// The device refused a key rotation and keeps the keys it pins.
    RotationRefused {
        reason: RotationRefusal,
    },
}

/// `devices/{id}/online`: retained; the broker publishes the offline form as the last will.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Online {
    pub device: DeviceId,
    pub online: bool,
    pub agent_version: String,
    pub at: UnixMillis,
}

impl Message for Desired {
    const KIND: Kind = Kind::Desired;
}
impl Message for Reported {
    const KIND: Kind = Kind::State;
}
impl Message for Heartbeat {
    const KIND: Kind = Kind::Heartbeat;
}
impl Message for Event {
    const KIND: Kind = Kind::Event;
}
impl Message for Online {
    const KIND: Kind = Kind::Online;
}
