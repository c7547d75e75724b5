//! Operator commands on `rollouts/commands` and the coordinator's replies on
//! `rollouts/replies/{request_id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::device::{DeviceFacts, Heartbeat, Installed};
use crate::frame::{Kind, Message};
use crate::hex::Hex;
use crate::ids::{DeviceId, RequestId, RolloutId};
use crate::release::SignedRelease;
use crate::rollout::{Arm, Report, RolloutState};
use crate::time::UnixMillis;
use crate::trust::SignedRotation;

/// One operator request. The reply arrives on `rollouts/replies/{request_id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub request_id: RequestId,
    /// Who asks: recorded in the audit trail. Only as trustworthy as `auth`: a coordinator that
    /// knows operator keys accepts the name only with a valid signature by that operator's key.
    pub operator: String,
    pub command: Command,
    /// The operator's signature (appended in protocol v1; absent in older requests).
    ///
    /// Design: absent is *not written* at all, so an unsigned request is byte-for-byte what an
    /// older fleetctl sends, and a postcard request that ends before this field reads as
    /// unsigned (the lenient reader below); a coordinator that requires signatures refuses it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_auth"
    )]
    pub auth: Option<CommandAuth>,
}

/// An operator's ed25519 signature over a request, and when it was made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAuth {
    /// When fleetctl signed it: the coordinator refuses requests older (or newer) than its
    /// `operators.max_age`, and remembers request ids inside that window (no replays).
    pub signed_at: UnixMillis,
    pub signature: Hex<64>,
}

/// Reads `auth`, treating a frame that ends before it (an older postcard writer) as unsigned.
fn lenient_auth<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<CommandAuth>, D::Error> {
    Ok(Option::<CommandAuth>::deserialize(d).unwrap_or(None))
}

/// Prefixed to a request's bytes before signing, so no other signed fleet object (a release,
/// a key rotation) can be passed off as a command.
const COMMAND_DOMAIN: &[u8] = b"fleet/v1 operator command\0";

impl Request {
    /// What the operator signs: the domain prefix, then the postcard encoding of the request
    /// id, the operator's name, the command and the signing time. Everything that decides what
    /// the coordinator does is covered; a re-encoding of the decoded request gives the same
    /// bytes (every field survives JSON exactly).
    pub fn signing_bytes(&self, signed_at: UnixMillis) -> Vec<u8> {
        let mut bytes = COMMAND_DOMAIN.to_vec();
        postcard::to_io(
            &(&self.request_id, &self.operator, &self.command, signed_at),
            &mut bytes,
        )
        .expect("a request has no unsized sequences");
        bytes
    }

    /// Signs the request as `key`'s holder at `now`.
    pub fn sign(mut self, key: &SigningKey, now: UnixMillis) -> Request {
        let signature = key.sign(&self.signing_bytes(now));
        self.auth = Some(CommandAuth {
            signed_at: now,
            signature: Hex(signature.to_bytes()),
        });
        self
    }

    /// Checks the signature against `key`; returns when it was signed.
    pub fn verify(&self, key: &VerifyingKey) -> Result<UnixMillis, String> {
        let auth = self
            .auth
            .as_ref()
            .ok_or("the request is not signed by an operator key")?;
        key.verify_strict(
            &self.signing_bytes(auth.signed_at),
            &Signature::from_bytes(&auth.signature.0),
        )
        .map(|()| auth.signed_at)
        .map_err(|_| {
            format!(
                "bad signature: the request was altered or not signed by {}'s key",
                self.operator
            )
        })
    }
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
    /// Pin new release keys on every device: the coordinator checks the rotation against the
    /// keys it pins, stores it and publishes the whole chain, retained, on `fleet/v1/trust`.
    RotateKeys {
        rotation: SignedRotation,
    },
    // Appended in issue 9 (strategy `ab`).
    /// The checklist and both arms of an A/B rollout; deploys nothing.
    PlanAb {
        a: SignedRelease,
        b: SignedRelease,
    },
    /// Starts an A/B rollout: `a` and `b` on two disjoint stratified subsets.
    StartAb {
        a: SignedRelease,
        b: SignedRelease,
    },
    /// Ends an A/B rollout's observation: `arm` rolls out by canary-rolling to every other
    /// target (the other arm's devices included); the other arm's release never spreads.
    Promote {
        rollout: RolloutId,
        arm: Arm,
    },
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
