//! What the coordinator says about a rollout: the state block and the deployment report.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::frame::{Kind, Message};
use crate::ids::{DeviceId, RolloutId};
use crate::release::StrategyKind;
use crate::time::UnixMillis;

/// The lifecycle phase (PRODUCT.md, "Lifecycle").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Phase {
    /// Checking the pre-deployment checklist; also where a halted rollout returns.
    Prepare,
    Validate,
    Canary,
    /// The canary gate is being judged, or its verdict awaits approval.
    Verify,
    /// Percentage waves.
    Rollout,
    /// Every wave done; final health check and catch-up of skipped devices.
    Confirm,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Prepare => "PREPARE",
            Phase::Validate => "VALIDATE",
            Phase::Canary => "CANARY",
            Phase::Verify => "VERIFY",
            Phase::Rollout => "ROLLOUT",
            Phase::Confirm => "CONFIRM",
        })
    }
}

/// Whether the rollout is moving, waiting, or over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    Running,
    AwaitingApproval,
    Paused,
    /// Every targeted device runs the release (or is skipped or quarantined).
    Completed,
    /// A gate failed; the wave was rolled back.
    Halted,
    /// Stopped by an operator; deployed devices keep what they have.
    Aborted,
    /// Every deployed device was returned to its previous release.
    RolledBack,
}

impl RolloutStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutStatus::Completed
                | RolloutStatus::Halted
                | RolloutStatus::Aborted
                | RolloutStatus::RolledBack
        )
    }
}

impl fmt::Display for RolloutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RolloutStatus::Running => "running",
            RolloutStatus::AwaitingApproval => "awaiting_approval",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Halted => "halted",
            RolloutStatus::Aborted => "aborted",
            RolloutStatus::RolledBack => "rolled_back",
        })
    }
}

/// A gate's judgement.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Not enough evidence yet: the soak is extended.
    Inconclusive,
    Fail,
}

/// One wave as the state block and `rollout watch` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveState {
    /// `canary`, `wave 1`, …
    pub name: String,
    pub devices: u32,
    pub deployed: u32,
    pub healthy: u32,
    pub failed: u32,
    pub skipped: u32,
    pub soak_until: Option<UnixMillis>,
    pub verdict: Option<Verdict>,
}

/// `current_wave: N/M` in the state block and in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct WaveCursor {
    pub current: u32,
    pub total: u32,
}

impl From<WaveCursor> for String {
    fn from(c: WaveCursor) -> String {
        format!("{}/{}", c.current, c.total)
    }
}

impl TryFrom<String> for WaveCursor {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (a, b) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not N/M"))?;
        let parse = |x: &str| {
            x.parse::<u32>()
                .map_err(|e| format!("{s:?} is not N/M: {e}"))
        };
        Ok(WaveCursor {
            current: parse(a)?,
            total: parse(b)?,
        })
    }
}

/// `rollouts/{id}/state`: the state block (PRODUCT.md), retained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub rollout: RolloutId,
    pub phase: Phase,
    pub status: RolloutStatus,
    pub strategy: StrategyKind,
    /// `NAME VERSION`.
    pub artifact: String,
    pub fleet_total: u32,
    pub deployed_count: u32,
    pub healthy_count: u32,
    pub quarantined_count: u32,
    pub skipped_count: u32,
    pub rollback_available: bool,
    pub current_wave: WaveCursor,
    pub last_action: String,
    pub next_action: String,
    pub blockers: Vec<String>,
    pub waves: Vec<WaveState>,
    pub updated_at: UnixMillis,
    /// Strategy `ab`: each arm's release and counts (appended in issue 9; absent, and not
    /// written, for every other strategy).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<ArmState>,
}

/// One arm of an A/B rollout (strategy `ab`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Arm {
    A,
    B,
}

impl Arm {
    pub fn other(self) -> Arm {
        match self {
            Arm::A => Arm::B,
            Arm::B => Arm::A,
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arm::A => "A",
            Arm::B => "B",
        })
    }
}

impl std::str::FromStr for Arm {
    type Err = String;
    fn from_str(s: &str) -> Result<Arm, String> {
        match s {
            "A" | "a" => Ok(Arm::A),
            "B" | "b" => Ok(Arm::B),
            other => Err(format!("{other:?} is not an arm; use A or B")),
        }
    }
}

/// One arm in the state block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmState {
    pub arm: Arm,
    /// `NAME VERSION` of the arm's release.
    pub release: String,
    pub devices: u32,
    pub deployed: u32,
    pub healthy: u32,
    pub failed: u32,
    /// `observing`, `rolled back: WHY`, `promoted`, `lost`.
    pub status: String,
}

impl Message for RolloutState {
    const KIND: Kind = Kind::RolloutState;
}

impl RolloutState {
    /// The `<fleet-deploy-state>` block, as `fleetctl rollout status` prints it.
    pub fn render_block(&self) -> String {
        let blockers = if self.blockers.is_empty() {
            "none".to_owned()
        } else {
            self.blockers.join("; ")
        };
        let mut out = String::from("<fleet-deploy-state>\n");
        let mut line = |k: &str, v: &dyn fmt::Display| {
            let _ = writeln!(out, "{k}: {v}");
        };
        line("rollout", &self.rollout);
        line("phase", &self.phase);
        line("status", &self.status);
        line("strategy", &self.strategy);
        line("artifact", &self.artifact);
        line("fleet_total", &self.fleet_total);
        line("deployed_count", &self.deployed_count);
        line("healthy_count", &self.healthy_count);
        line("quarantined_count", &self.quarantined_count);
        line("skipped_count", &self.skipped_count);
        line("rollback_available", &self.rollback_available);
        line("current_wave", &String::from(self.current_wave));
        line("last_action", &self.last_action);
        line("next_action", &self.next_action);
        line("blockers", &blockers);
        for a in &self.arms {
            let key = format!("arm_{}", a.arm.to_string().to_lowercase());
            line(
                &key,
                &format_args!(
                    "{} devices={} deployed={} healthy={} failed={} status={}",
                    a.release, a.devices, a.deployed, a.healthy, a.failed, a.status
                ),
            );
        }
        out.push_str("</fleet-deploy-state>\n");
        out
    }
}

/// How a halted rollout failed (PRODUCT.md, "After a halt").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePattern {
    /// Every deployed device failed: the artifact itself is bad.
    Artifact,
    /// Failures confined to one device type: a compatibility problem.
    Compatibility { device_type: String },
    /// Failures scattered across types and regions: suspect the infrastructure.
    Infrastructure,
}

impl fmt::Display for FailurePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailurePattern::Artifact => f.write_str("all devices failed: the artifact is bad"),
            FailurePattern::Compatibility { device_type } => write!(
                f,
                "only {device_type} devices failed: a compatibility problem with that device type"
            ),
            FailurePattern::Infrastructure => f.write_str(
                "failures scattered across device types and regions: suspect the infrastructure (network, power, storage)",
            ),
        }
    }
}

/// One wave in the deployment report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaveReport {
    pub name: String,
    pub devices: u32,
    pub failed: u32,
    pub skipped: u32,
    pub soak: Duration,
    pub verdict: Option<Verdict>,
}

/// A health metric, before and during the rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricDelta {
    /// `error_rate`, `p95_ms`, `cpu_pct`, `memory_pct`.
    pub metric: String,
    pub baseline: Option<f64>,
    pub current: Option<f64>,
}

/// The Fleet Deployment Report (`fleetctl report`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub rollout: RolloutId,
    pub artifact: String,
    pub strategy: StrategyKind,
    pub status: RolloutStatus,
    pub started_at: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub fleet_total: u32,
    pub deployed: u32,
    pub skipped: u32,
    pub quarantined: u32,
    pub waves: Vec<WaveReport>,
    pub health: Vec<MetricDelta>,
    pub failure_pattern: Option<FailurePattern>,
    /// Failed devices by type, for the failure pattern's evidence.
    pub failed_by_type: BTreeMap<String, u32>,
    pub failed_devices: Vec<DeviceId>,
    /// The report as Markdown, rendered by the coordinator.
    pub markdown: String,
    /// Strategy `ab`: the arms side by side (appended in issue 9; absent for other strategies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ab: Option<AbReport>,
}

/// An A/B rollout's arms side by side, and the difference B − A.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbReport {
    pub arms: Vec<ArmReport>,
    /// Error rate of B minus A (fraction), with its interval (Newcombe's hybrid score method
    /// from the two Wilson intervals); `None` until both arms reported an error rate.
    pub error_rate_diff: Option<Interval>,
    /// p95 of B minus A, in milliseconds (means of per-device p95s: no interval).
    pub p95_diff_ms: Option<f64>,
    /// The confidence level of every interval, in percent (two-sided).
    pub confidence_pct: f64,
    pub winner: Option<Arm>,
}

/// A value with its confidence interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// One arm's metrics over its observation window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArmReport {
    pub arm: Arm,
    pub release: String,
    pub devices: u32,
    pub deployed: u32,
    pub failed: u32,
    /// Why the arm was rolled back, if it was.
    pub rolled_back: Option<String>,
    pub verdict: Option<Verdict>,
    pub samples: u64,
    /// Requests behind the error rate (capped per report, see the gates).
    pub requests: f64,
    pub error_rate: Option<Interval>,
    pub p95_ms: Option<f64>,
    pub cpu_pct: Option<f64>,
    pub memory_pct: Option<f64>,
    /// The most restarts within the crash-loop window any of its devices reported.
    pub max_restarts: u32,
}
