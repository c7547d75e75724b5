//! Operator commands on `rollouts/commands` and the coordinator's replies on
//! `rollouts/replies/{request_id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::device::{DeviceFacts, Heartbeat, Installed};
use crate::frame::{Kind, Message};
use crate::ids::{DeviceId, RequestId, RolloutId};
use crate::release::SignedRelease;
use crate::rollout::{Report, RolloutState};
use crate::time::UnixMillis;

/// One operator request. The reply arrives on `rollouts/replies/{request_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: RequestId,
    /// Who asks: recorded in the audit trail.
    pub operator: String,
    pub command: Command,
}

impl Message for Request {
    const KIND: Kind = Kind::Command;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The checklist and the wave plan; deploys nothing.
    Plan {
        release: SignedRelease,
    },
    Start {
        release: SignedRelease,
    },
    Approve {
        rollout: RolloutId,
    },
    Pause {
        rollout: RolloutId,
    },
    Resume {
        rollout: RolloutId,
    },
    /// Stop where it is; deployed devices keep what they have.
    Abort {
        rollout: RolloutId,
    },
    /// Return every deployed device to its previous release.
    Rollback {
        rollout: RolloutId,
    },
    Status {
        rollout: RolloutId,
    },
    ListRollouts,
    Report {
        rollout: RolloutId,
    },
    ListDevices,
    ShowDevice {
        device: DeviceId,
    },
    Quarantine {
        device: DeviceId,
        reason: String,
    },
    ReleaseDevice {
        device: DeviceId,
    },
    Audit(AuditQuery),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditQuery {
    pub device: Option<DeviceId>,
    pub rollout: Option<RolloutId>,
    pub since: Option<UnixMillis>,
    pub limit: Option<u32>,
}

/// The coordinator's answer to one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: RequestId,
    pub result: ReplyResult,
}

impl Message for Reply {
    const KIND: Kind = Kind::Reply;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyResult {
    Accepted(Box<ReplyBody>),
    Refused(Refused),
}

/// A refusal a person can act on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refused {
    /// What happened, to what.
    pub message: String,
    /// What to do next.
    pub hint: Option<String>,
    /// For `plan`/`start`: every checklist item, failed ones included.
    pub checklist: Vec<CheckItem>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyBody {
    Started(RolloutState),
    Plan(Plan),
    State(RolloutState),
    Rollouts(Vec<RolloutState>),
    Report(Box<Report>),
    Devices(Vec<DeviceView>),
    Device(Box<DeviceView>),
    Audit(Vec<AuditEntry>),
    /// A command that changes something and has nothing else to return.
    Done {
        message: String,
    },
}

/// One item of the pre-deployment checklist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckItem {
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

/// The devices of one planned wave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedWave {
    pub name: String,
    pub devices: Vec<DeviceId>,
    pub by_type: BTreeMap<String, u32>,
    pub by_region: BTreeMap<String, u32>,
}

/// `fleetctl plan`: the checklist and, when it passes, the waves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub release: String,
    pub checklist: Vec<CheckItem>,
    pub waves: Vec<PlannedWave>,
    /// Targeted devices that will not be deployed to now, with the reason.
    pub excluded: Vec<(DeviceId, String)>,
}

/// A device as the registry knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    Online,
    Offline,
    Quarantined,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: DeviceId,
    pub status: DeviceStatus,
    pub facts: Option<DeviceFacts>,
    pub active: Option<Installed>,
    pub standby: Option<Installed>,
    pub last_seen: Option<UnixMillis>,
    pub last_health: Option<Heartbeat>,
    /// Registry and device disagree and nobody has resolved it: not deployed to.
    pub discrepancy: Option<String>,
    pub quarantine_reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorKind {
    Operator,
    Coordinator,
    Device,
}

/// One row of the append-only audit trail.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: u64,
    pub at: UnixMillis,
    pub actor: ActorKind,
    /// Operator name, `coordinator`, or the device id.
    pub actor_name: String,
    pub action: String,
    pub device: Option<DeviceId>,
    pub rollout: Option<RolloutId>,
    pub outcome: String,
}
