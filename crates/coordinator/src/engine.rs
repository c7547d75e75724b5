//! The rollout engine: one rollout's lifecycle as a pure state machine.
//!
//! [`step`] takes the rollout, one [`Event`] and the current wall-clock time, and returns the
//! new rollout and the [`Action`]s to carry out. Nothing in here reads a clock, touches MQTT,
//! SQLite or tokio; the driver persists the state and the actions in one transaction before it
//! publishes anything, so a crash at any instant resumes from the last committed step.
//!
//! Lifecycle (PRODUCT.md): the checklist passes (see [`crate::checklist`]) → [`create`] starts
//! the canary (phase CANARY) → its gate passes after the soak → VERIFY, awaiting approval (or
//! straight on with `approval = "auto"`) → ROLLOUT, wave by wave, each gated → CONFIRM, a last
//! soak over every deployed device → completed. A trigger rolls back the current wave, halts
//! and returns to PREPARE; the fleet-wide trigger rolls back every deployed device.
//!
//! Blue-green: a device is sent the release with `hold` (keep the previous instance warm)
//! until its wave is confirmed (its gate passed, or an operator approved past it) or the
//! rollout ends; then it is sent the release again without `hold`. Rolling a held wave back
//! is sending the previous release, which the agent serves by switching back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleet_proto::device::{OutcomeKind, RollbackReason};
use fleet_proto::hex::Sha256;
use fleet_proto::release::{Approval, Release, StrategyKind};
use fleet_proto::rollout::{
    Arm, ArmState, FailurePattern, Phase, RolloutState, RolloutStatus, Verdict, WaveCursor,
    WaveState,
};
use fleet_proto::{DeviceId, RolloutId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::baseline::{Agg, Baseline, Sample};
use crate::gate::{self, Breach, GateSettings, GateVerdict, Reference, Trigger};
use crate::model::DeviceInfo;
use crate::waves::WavePlan;

/// Settings of the coordinator that shape every rollout (the release's own thresholds and soaks
/// come from its manifest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The report interval devices normally get in their desired state.
    pub report_interval: Duration,
    /// The report interval asked of a soaking wave while a worsening trend is watched.
    pub fast_report_interval: Duration,
    /// A device sent the release and silent this long counts as unreachable.
    pub silent_after: Duration,
    /// How long a wave's devices have to install before the stragglers count as unreachable.
    pub install_timeout: Duration,
    pub gate: GateSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            report_interval: Duration::from_secs(10),
            fast_report_interval: Duration::from_secs(1),
            silent_after: Duration::from_secs(30),
            install_timeout: Duration::from_secs(30 * 60),
            gate: GateSettings::default(),
        }
    }
}

/// Where one device is in this rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DevState {
    /// Waiting for its wave.
    Pending,
    /// Offline when its wave started (or quarantined meanwhile): not deployed, not failed.
    Skipped,
    /// The desired state with the release was published; no outcome yet.
    Sent,
    /// Committed the release.
    Deployed,
    /// Rolled back, refused or failed the release; quarantined.
    Failed,
    /// The previous release was published again.
    Reverted,
}

/// One device's part in the rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    /// 0 = canary, then waves 1…
    pub wave: u32,
    pub device_type: String,
    pub region: String,
    pub state: DevState,
    pub online: bool,
    /// The latest desired sequence this rollout published to the device (the registry's when
    /// the rollout started).
    pub sequence: u64,
    /// The first desired sequence that carried this rollout's release.
    pub release_sequence: u64,
    pub retry: u32,
    /// The release the device ran before (its digest and label), to return to on rollback.
    pub previous: Option<Sha256>,
    pub previous_label: Option<String>,
    pub sent_at: Option<UnixMillis>,
    pub last_seen: UnixMillis,
    /// Counted toward the unreachable trigger: silent after installing, or its health endpoint
    /// does not answer.
    pub unreachable: bool,
    pub failure: Option<String>,
    /// Deployed after CONFIRM, when it came back online.
    pub catch_up: bool,
    /// Quarantined by an operator during the rollout: never sent this release again.
    #[serde(default)]
    pub quarantined: bool,
    /// Strategy `ab`: the arm the device was planned into (`None`: the winner's waves).
    #[serde(default)]
    pub arm: Option<Arm>,
    /// Strategy `blue-green`: the latest desired state this rollout published to the device
    /// asked it to keep its previous instance warm (see [`Action::Desire::hold`]).
    #[serde(default)]
    pub held: bool,
    /// Latest health sample; not persisted (refilled by the next heartbeat).
    #[serde(skip)]
    pub latest: Option<Sample>,
}

impl Assignment {
    /// A target device at rollout start.
    pub fn new(d: &DeviceInfo, wave: u32, version: &str, now: UnixMillis) -> Assignment {
        Assignment {
            wave,
            device_type: d.device_type().to_owned(),
            region: d.region().to_owned(),
            state: DevState::Pending,
            online: d.online,
            sequence: d.desired_sequence,
            release_sequence: 0,
            // A device that remembers this version as failed must be asked explicitly.
            retry: crate::waves::retry_for(d, version),
            previous: d.active_digest(),
            previous_label: d
                .active
                .as_ref()
                .map(|a| format!("{} {} (#{})", a.name, a.version, a.counter)),
            sent_at: None,
            last_seen: now,
            unreachable: false,
            failure: None,
            catch_up: false,
            quarantined: false,
            arm: None,
            held: false,
            latest: None,
        }
    }

    fn healthy(&self) -> bool {
        self.state == DevState::Deployed
            && !self.unreachable
            && self
                .latest
                .as_ref()
                .is_some_and(|s| s.status == fleet_proto::device::AppStatus::Healthy)
    }
}

/// One wave (index 0 is the canary).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    pub size: u32,
    pub soak: Duration,
    pub started_at: Option<UnixMillis>,
    pub install_deadline: Option<UnixMillis>,
    pub settled_at: Option<UnixMillis>,
    pub soak_until: Option<UnixMillis>,
    pub extensions: u32,
    /// A worsening trend extended the soak and asked for fast reports.
    pub watching: bool,
    pub verdict: Option<Verdict>,
    /// The gate passed, or an operator approved past it: for blue-green, the wave's devices
    /// no longer keep their previous instance warm.
    #[serde(default)]
    pub confirmed: bool,
    /// Health samples from this wave's devices running the release.
    pub agg: Agg,
    pub sent: u32,
    pub deployed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub unreachable: u32,
    /// Sent, neither deployed nor failed.
    pub installing: u32,
}

impl Wave {
    fn new(name: String, size: usize, soak: Duration) -> Wave {
        Wave {
            name,
            size: size as u32,
            soak,
            started_at: None,
            install_deadline: None,
            settled_at: None,
            soak_until: None,
            extensions: 0,
            watching: false,
            verdict: None,
            confirmed: false,
            agg: Agg::default(),
            sent: 0,
            deployed: 0,
            failed: 0,
            skipped: 0,
            unreachable: 0,
            installing: 0,
        }
    }
}

/// A rollout: what the engine owns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: RolloutId,
    pub digest: Sha256,
    pub release: Release,
    /// The operator who started it.
    pub operator: String,
    pub phase: Phase,
    pub status: RolloutStatus,
    /// The status a paused rollout resumes to.
    pub resume_to: Option<RolloutStatus>,
    pub waves: Vec<Wave>,
    pub current: usize,
    pub baseline: Baseline,
    /// Not-yet-updated target devices, since the current wave started.
    pub control: Agg,
    /// Every deployed device running the release, since the current wave started.
    pub fleet: Agg,
    pub created_at: UnixMillis,
    pub ended_at: Option<UnixMillis>,
    pub last_action: String,
    pub next_action: String,
    pub blockers: Vec<String>,
    pub halt: Option<Breach>,
    pub failure_pattern: Option<FailurePattern>,
    pub failed_devices: Vec<DeviceId>,
    pub settings: Settings,
    /// Healthy deployed devices (kept incrementally).
    pub healthy: u32,
    /// Strategy `ab`: release B and both arms' evidence (`None` for every other strategy).
    #[serde(default)]
    pub ab: Option<Ab>,
    /// Persisted separately, one row per device.
    #[serde(skip)]
    pub devices: BTreeMap<DeviceId, Assignment>,
    /// Devices whose assignment changed since the driver last persisted.
    #[serde(skip)]
    pub dirty: BTreeSet<DeviceId>,
}

/// Strategy `ab`: the second release and what each arm showed.
///
/// Design: the arms are wave 0, soaked for the observation window; each arm is gated on its own
/// (the usual triggers, against the baseline or the not-yet-updated control). A failed arm is
/// rolled back alone and the observation goes on with the other, which is the only one that
/// may then be promoted; both failed halts the rollout. After the window the rollout waits
/// for `promote` (never automatic, whatever `approval` says: choosing is the operator's call).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ab {
    pub b_digest: Sha256,
    pub b_release: Release,
    pub a: ArmRun,
    pub b: ArmRun,
    pub winner: Option<Arm>,
}

impl Ab {
    pub fn arm(&self, arm: Arm) -> &ArmRun {
        match arm {
            Arm::A => &self.a,
            Arm::B => &self.b,
        }
    }

    fn arm_mut(&mut self, arm: Arm) -> &mut ArmRun {
        match arm {
            Arm::A => &mut self.a,
            Arm::B => &mut self.b,
        }
    }
}

/// One arm's counts and evidence over the observation window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmRun {
    pub size: u32,
    pub agg: Agg,
    pub sent: u32,
    pub deployed: u32,
    pub failed: u32,
    pub unreachable: u32,
    pub installing: u32,
    pub max_restarts: u32,
    pub verdict: Option<Verdict>,
    /// Why the arm was rolled back.
    pub rolled_back: Option<String>,
}

/// What happens to a rollout.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Heartbeat {
        device: DeviceId,
        sample: Sample,
    },
    /// A reported state (or an event that carries an outcome).
    Reported {
        device: DeviceId,
        active: Option<Sha256>,
        outcome: Option<ReportedOutcome>,
    },
    Online {
        device: DeviceId,
        online: bool,
    },
    /// An operator quarantined the device.
    Quarantined {
        device: DeviceId,
    },
    /// Time passed (deadlines, silence).
    Tick,
    /// The coordinator restarted: nobody listened meanwhile, so silence is not evidence.
    Restarted,
    Operator {
        operator: String,
        command: OperatorCommand,
    },
}

/// The outcome part of a report that concerns a rollout.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportedOutcome {
    pub rollout: Option<RolloutId>,
    pub sequence: u64,
    pub kind: OutcomeKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorCommand {
    Approve,
    Pause,
    Resume,
    Abort,
    Rollback,
    /// Strategy `ab`: the arm that rolls out to every other target.
    Promote(Arm),
}

impl OperatorCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorCommand::Approve => "approve",
            OperatorCommand::Pause => "pause",
            OperatorCommand::Resume => "resume",
            OperatorCommand::Abort => "abort",
            OperatorCommand::Rollback => "rollback",
            OperatorCommand::Promote(_) => "promote",
        }
    }
}

/// Who did something, for the audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    Coordinator,
    Operator(String),
    Device(DeviceId),
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Publish a new desired state (retained) to the device. `release: None` means "keep what
    /// is installed".
    Desire {
        device: DeviceId,
        release: Option<Sha256>,
        sequence: u64,
        report_interval: Duration,
        retry: u32,
        /// Blue-green: keep the previous release's instance warm beside this one until a
        /// desired state without `hold` arrives (`Desired.hold`). Set while the device's wave
        /// is not confirmed, so that rolling it back is a switch back.
        hold: bool,
    },
    Quarantine {
        device: DeviceId,
        reason: String,
    },
    Audit {
        actor: Actor,
        device: Option<DeviceId>,
        action: String,
        outcome: String,
    },
    /// A lifecycle transition, logged once.
    Transition {
        from: String,
        to: String,
        event: String,
    },
    Fired {
        trigger: Trigger,
        wave: String,
        detail: String,
    },
    /// An operator command was refused; the state is unchanged.
    Refuse {
        message: String,
        hint: Option<String>,
    },
}

fn label(phase: Phase, status: RolloutStatus) -> String {
    format!("{phase}/{status}")
}

/// Starts a rollout whose checklist passed: records the targets and the baseline, and starts
/// the canary.
#[allow(clippy::too_many_arguments)]
pub fn create(
    id: RolloutId,
    digest: Sha256,
    release: Release,
    operator: &str,
    plan: &WavePlan,
    devices: &BTreeMap<DeviceId, &DeviceInfo>,
    settings: Settings,
    now: UnixMillis,
) -> (Rollout, Vec<Action>) {
    let mut r = build(id, digest, release, operator, plan, devices, settings, now);
    let mut out = Vec::new();
    out.push(Action::Audit {
        actor: Actor::Operator(operator.to_owned()),
        device: None,
        action: "start".into(),
        outcome: format!(
            "started {} on {} devices ({} canary, {} waves)",
            r.release.label(),
            r.devices.len(),
            plan.canary.len(),
            plan.waves.len()
        ),
    });
    r.start_wave(0, now, "checklist passed", &mut out);
    (r, out)
}

/// Starts an A/B rollout whose checklist passed: both arms are wave 0 (soaked for the
/// observation window), the rest of the targets wait in the winner's waves.
#[allow(clippy::too_many_arguments)]
pub fn create_ab(
    id: RolloutId,
    a: (Sha256, Release),
    b: (Sha256, Release),
    operator: &str,
    plan: &crate::ab::AbPlan,
    devices: &BTreeMap<DeviceId, &DeviceInfo>,
    settings: Settings,
    now: UnixMillis,
) -> (Rollout, Vec<Action>) {
    let mut arms: Vec<DeviceId> = plan.a.iter().chain(&plan.b).cloned().collect();
    arms.sort();
    let mut waves = plan.waves.clone();
    if waves.is_empty() {
        // The losing arm's devices go to the winner in wave 1, even when the arms were the
        // whole fleet.
        waves.push(Vec::new());
    }
    let wave_plan = WavePlan {
        canary: arms,
        waves,
        uncovered: Vec::new(),
    };
    let (b_digest, b_release) = b;
    let mut r = build(id, a.0, a.1, operator, &wave_plan, devices, settings, now);
    r.waves[0].name = "arms".into();
    let mut ab = Ab {
        b_digest,
        b_release,
        a: ArmRun::default(),
        b: ArmRun::default(),
        winner: None,
    };
    for (arm, list) in [(Arm::A, &plan.a), (Arm::B, &plan.b)] {
        for d in list {
            if let Some(x) = r.devices.get_mut(d) {
                x.arm = Some(arm);
                if arm == Arm::B
                    && let Some(info) = devices.get(d)
                {
                    x.retry = crate::waves::retry_for(info, &ab.b_release.version);
                }
                ab.arm_mut(arm).size += 1;
            }
        }
    }
    r.ab = Some(ab);
    let mut out = vec![Action::Audit {
        actor: Actor::Operator(operator.to_owned()),
        device: None,
        action: "start".into(),
        outcome: format!(
            "started A/B of {} (arm A, {} devices) vs {} (arm B, {} devices) on {} devices; the rest ({} waves) waits for a promotion",
            r.release.label(),
            plan.a.len(),
            r.ab.as_ref()
                .map_or_else(String::new, |ab| ab.b_release.label()),
            plan.b.len(),
            r.devices.len(),
            r.waves.len() - 1
        ),
    }];
    r.start_wave(0, now, "checklist passed", &mut out);
    (r, out)
}

/// The rollout with its assignments, before anything is sent.
#[allow(clippy::too_many_arguments)]
fn build(
    id: RolloutId,
    digest: Sha256,
    release: Release,
    operator: &str,
    plan: &WavePlan,
    devices: &BTreeMap<DeviceId, &DeviceInfo>,
    settings: Settings,
    now: UnixMillis,
) -> Rollout {
    let mut assignments = BTreeMap::new();
    let mut waves = vec![Wave::new(
        "canary".into(),
        plan.canary.len(),
        release.strategy.canary_soak,
    )];
    let waves_iter = std::iter::once(&plan.canary).chain(plan.waves.iter());
    for (i, list) in waves_iter.enumerate() {
        if i > 0 {
            waves.push(Wave::new(
                format!("wave {i}"),
                list.len(),
                release.strategy.wave_soak,
            ));
        }
        for d in list {
            if let Some(info) = devices.get(d) {
                assignments.insert(
                    d.clone(),
                    Assignment::new(info, i as u32, &release.version, now),
                );
            }
        }
    }
    let baseline = Baseline::capture(
        assignments
            .keys()
            .filter_map(|d| devices.get(d).and_then(|i| i.health.as_ref())),
    );
    let dirty = assignments.keys().cloned().collect();
    Rollout {
        id,
        digest,
        release,
        operator: operator.to_owned(),
        phase: Phase::Validate,
        status: RolloutStatus::Running,
        resume_to: None,
        waves,
        current: 0,
        baseline,
        control: Agg::default(),
        fleet: Agg::default(),
        created_at: now,
        ended_at: None,
        last_action: "checklist passed".into(),
        next_action: "start the canary".into(),
        blockers: Vec::new(),
        halt: None,
        failure_pattern: None,
        failed_devices: Vec::new(),
        settings,
        healthy: 0,
        ab: None,
        devices: assignments,
        dirty,
    }
}

/// One step of the engine.
pub fn step(mut r: Rollout, event: &Event, now: UnixMillis) -> (Rollout, Vec<Action>) {
    let out = step_in_place(&mut r, event, now);
    (r, out)
}

/// [`step`] without moving the rollout (the same function; cheaper for big fleets).
pub fn step_in_place(r: &mut Rollout, event: &Event, now: UnixMillis) -> Vec<Action> {
    let mut out = Vec::new();
    r.handle(event, now, &mut out);
    out
}

impl Rollout {
    pub fn is_final(&self) -> bool {
        self.status.is_final()
    }

    /// Whether the rollout still acts on device reports (catch-up continues after completion).
    pub fn is_live(&self) -> bool {
        !self.status.is_final() || self.status == RolloutStatus::Completed
    }

    /// Strategy `ab` before a promotion: the arms are being observed.
    pub fn ab_observing(&self) -> bool {
        self.current == 0 && self.ab.as_ref().is_some_and(|ab| ab.winner.is_none())
    }

    /// The release of an arm, or (`None`) the one the waves roll out: A until B is promoted.
    pub fn arm_release(&self, arm: Option<Arm>) -> (Sha256, &Release) {
        let arm = arm.or_else(|| self.ab.as_ref().and_then(|ab| ab.winner));
        match (arm, &self.ab) {
            (Some(Arm::B), Some(ab)) => (ab.b_digest, &ab.b_release),
            _ => (self.digest, &self.release),
        }
    }

    /// The release this device is sent.
    fn release_of(&self, id: &DeviceId) -> (Sha256, &Release) {
        self.arm_release(self.devices.get(id).and_then(|a| a.arm))
    }

    /// The next instant at which a [`Event::Tick`] can change something.
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        if self.is_final() {
            return None;
        }
        let w = self.waves.get(self.current)?;
        match (w.settled_at, w.install_deadline, w.soak_until) {
            (None, Some(d), _) => Some(d),
            (Some(_), _, Some(s)) => Some(s),
            _ => None,
        }
    }

    fn reference(&self) -> Reference {
        gate::reference(&self.baseline, &self.control, &self.settings.gate)
    }

    fn set_state(&mut self, id: &DeviceId, to: DevState) {
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        let from = a.state;
        if from == to {
            return;
        }
        let was_healthy = a.healthy();
        a.state = to;
        let is_healthy = a.healthy();
        let w = &mut self.waves[a.wave as usize];
        match from {
            DevState::Sent => w.installing = w.installing.saturating_sub(1),
            DevState::Deployed => w.deployed = w.deployed.saturating_sub(1),
            DevState::Failed => w.failed = w.failed.saturating_sub(1),
            DevState::Skipped => w.skipped = w.skipped.saturating_sub(1),
            DevState::Pending | DevState::Reverted => {}
        }
        match to {
            DevState::Sent => {
                w.installing += 1;
                w.sent += 1;
            }
            DevState::Deployed => w.deployed += 1,
            DevState::Failed => w.failed += 1,
            DevState::Skipped => w.skipped += 1,
            DevState::Pending | DevState::Reverted => {}
        }
        if let (Some(arm), 0, Some(ab)) = (a.arm, a.wave, self.ab.as_mut()) {
            let run = ab.arm_mut(arm);
            match from {
                DevState::Sent => run.installing = run.installing.saturating_sub(1),
                DevState::Deployed => run.deployed = run.deployed.saturating_sub(1),
                DevState::Failed => run.failed = run.failed.saturating_sub(1),
                _ => {}
            }
            match to {
                DevState::Sent => {
                    run.installing += 1;
                    run.sent += 1;
                }
                DevState::Deployed => run.deployed += 1,
                DevState::Failed => run.failed += 1,
                _ => {}
            }
        }
        if was_healthy != is_healthy {
            if is_healthy {
                self.healthy += 1;
            } else {
                self.healthy = self.healthy.saturating_sub(1);
            }
        }
        self.dirty.insert(id.clone());
    }

    fn set_unreachable(&mut self, id: &DeviceId, flag: bool) {
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        if a.unreachable == flag {
            return;
        }
        let was_healthy = a.healthy();
        a.unreachable = flag;
        let is_healthy = a.healthy();
        let w = &mut self.waves[a.wave as usize];
        if flag {
            w.unreachable += 1;
        } else {
            w.unreachable = w.unreachable.saturating_sub(1);
        }
        if let (Some(arm), 0, Some(ab)) = (a.arm, a.wave, self.ab.as_mut()) {
            let run = ab.arm_mut(arm);
            if flag {
                run.unreachable += 1;
            } else {
                run.unreachable = run.unreachable.saturating_sub(1);
            }
        }
        if was_healthy != is_healthy {
            if is_healthy {
                self.healthy += 1;
            } else {
                self.healthy = self.healthy.saturating_sub(1);
            }
        }
        self.dirty.insert(id.clone());
    }

    fn transition(
        &mut self,
        phase: Phase,
        status: RolloutStatus,
        event: &str,
        out: &mut Vec<Action>,
    ) {
        if phase == self.phase && status == self.status {
            return;
        }
        out.push(Action::Transition {
            from: label(self.phase, self.status),
            to: label(phase, status),
            event: event.to_owned(),
        });
        self.phase = phase;
        self.status = status;
        if status.is_final() {
            // Design: every way a rollout ends (completed, aborted, halted, rolled back) comes
            // through here, so this is where no device is left holding an old instance that
            // nothing would ever release. The devices a halt or a rollback reverted were
            // already sent their previous release (without hold) and are not held any more.
            self.release_holds(None, &format!("rollout {status} ({event})"), out);
        }
    }

    /// Strategy `blue-green`: whether a device of wave `wave` sent `release` keeps its
    /// previous instance warm. Only this rollout's release is held (a return to the previous
    /// release switches back and stops the new one), and only until the wave is confirmed or
    /// the rollout is over.
    fn hold_for(&self, wave: usize, release: Option<Sha256>) -> bool {
        self.release.strategy.kind == StrategyKind::BlueGreen
            && release == Some(self.digest)
            && !self.wave_confirmed(wave)
            && !self.is_final()
    }

    /// The wave's gate passed or an operator approved past it. The waves before the current
    /// one always are (a wave starts only once the one before it was), which also covers a
    /// rollout persisted before waves recorded it.
    pub fn wave_confirmed(&self, wave: usize) -> bool {
        wave < self.current || self.waves.get(wave).is_none_or(|w| w.confirmed)
    }

    /// Devices whose previous instance is kept warm now: committed the release under hold.
    pub fn warm(&self) -> BTreeMap<usize, u32> {
        let mut n = BTreeMap::new();
        for a in self.devices.values() {
            if a.held && a.state == DevState::Deployed {
                *n.entry(a.wave as usize).or_insert(0) += 1;
            }
        }
        n
    }

    /// The wave's gate passed or an operator approved past it. Blue-green: its devices stop
    /// the previous instance, so they are sent the release again without hold. `republish`
    /// sends every device of the wave that has the release its desired state again anyway
    /// (with the normal report interval, after a watched soak).
    fn confirm_wave(&mut self, i: usize, republish: bool, out: &mut Vec<Action>) {
        let Some(w) = self.waves.get_mut(i) else {
            return;
        };
        w.confirmed = true;
        let name = w.name.clone();
        if !republish {
            self.release_holds(Some(i), &format!("{name} confirmed"), out);
            return;
        }
        let held = self
            .devices
            .values()
            .filter(|a| {
                a.held
                    && a.wave as usize == i
                    && matches!(a.state, DevState::Sent | DevState::Deployed)
            })
            .count();
        self.republish_wave(i, false, out);
        if held > 0 {
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: None,
                action: "release old instances".into(),
                outcome: format!("{name} confirmed: old instances released on {held} devices"),
            });
        }
    }

    /// Publishes the release again without hold to every device (of `wave`, or of every wave)
    /// that was last sent it with hold and still has it (sent or committed), and audits it.
    fn release_holds(&mut self, wave: Option<usize>, why: &str, out: &mut Vec<Action>) {
        let held: Vec<(DeviceId, bool)> = self
            .devices
            .iter()
            .filter(|(_, a)| {
                a.held
                    && wave.is_none_or(|w| a.wave as usize == w)
                    && matches!(a.state, DevState::Sent | DevState::Deployed)
            })
            .map(|(d, a)| (d.clone(), self.waves[a.wave as usize].watching))
            .collect();
        if held.is_empty() {
            return;
        }
        for (id, fast) in &held {
            let fast = *fast && !self.is_final();
            let digest = self.release_of(id).0;
            self.desire(id, Some(digest), fast, out);
        }
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: "release old instances".into(),
            outcome: format!("{why}: old instances released on {} devices", held.len()),
        });
    }

    fn desire(
        &mut self,
        id: &DeviceId,
        release: Option<Sha256>,
        fast: bool,
        out: &mut Vec<Action>,
    ) {
        let interval = if fast {
            self.settings.fast_report_interval
        } else {
            self.settings.report_interval
        };
        let b_digest = self.ab.as_ref().map(|ab| ab.b_digest);
        let Some(wave) = self.devices.get(id).map(|a| a.wave as usize) else {
            return;
        };
        let hold = self.hold_for(wave, release);
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        // A device an operator quarantined keeps what it runs; only a return to its previous
        // release may still be sent to it, or (blue-green) the release it has without hold,
        // which stops the old instance it keeps warm.
        let lifts_hold = a.held && !hold && release == Some(self.digest);
        if a.quarantined
            && !lifts_hold
            && (release == Some(self.digest) || (release.is_some() && release == b_digest))
        {
            return;
        }
        a.sequence += 1;
        a.held = hold;
        out.push(Action::Desire {
            device: id.clone(),
            release,
            sequence: a.sequence,
            report_interval: interval,
            retry: a.retry,
            hold,
        });
        self.dirty.insert(id.clone());
    }

    fn wave_devices(&self, wave: usize) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|(_, a)| a.wave as usize == wave)
            .map(|(d, _)| d.clone())
            .collect()
    }

    /// Sends the release to one device.
    fn send(&mut self, id: &DeviceId, now: UnixMillis, out: &mut Vec<Action>) {
        let digest = self.release_of(id).0;
        let fast = self
            .devices
            .get(id)
            .is_some_and(|a| self.waves[a.wave as usize].watching);
        self.desire(id, Some(digest), fast, out);
        if let Some(a) = self.devices.get_mut(id) {
            a.release_sequence = a.sequence;
            a.sent_at = Some(now);
            a.last_seen = now;
        }
        self.set_state(id, DevState::Sent);
    }

    fn start_wave(&mut self, i: usize, now: UnixMillis, why: &str, out: &mut Vec<Action>) {
        self.current = i;
        self.control = Agg::default();
        self.fleet = Agg::default();
        let (phase, name) = (
            if i == 0 {
                Phase::Canary
            } else {
                Phase::Rollout
            },
            self.waves[i].name.clone(),
        );
        self.transition(phase, RolloutStatus::Running, why, out);
        let ids = self.wave_devices(i);
        let mut skipped = Vec::new();
        for id in &ids {
            let online = self.devices.get(id).is_some_and(|a| a.online);
            let pending = self
                .devices
                .get(id)
                .is_some_and(|a| a.state == DevState::Pending);
            if !pending {
                continue;
            }
            if online {
                self.send(id, now, out);
            } else {
                skipped.push(id.clone());
                self.set_state(id, DevState::Skipped);
            }
        }
        let w = &mut self.waves[i];
        w.started_at = Some(now);
        w.install_deadline = Some(now.saturating_add(self.settings.install_timeout));
        let sent = w.sent;
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("start {name}"),
            outcome: format!(
                "published {} to {sent} devices, {} skipped (offline)",
                self.release.label(),
                skipped.len()
            ),
        });
        for id in skipped {
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: Some(id),
                action: format!("skip in {name}"),
                outcome: "offline at wave start: skipped, caught up after CONFIRM".into(),
            });
        }
        self.last_action = format!("started {name}: release published to {sent} devices");
        self.next_action = format!("wait for {name} to install, then soak");
        if sent == 0 {
            if i == 0 {
                let b = Breach {
                    trigger: Trigger::Unreachable,
                    detail: "every canary device was offline at canary start".into(),
                };
                self.halt(b, now, out);
                return;
            }
            self.waves[i].settled_at = Some(now);
            self.waves[i].soak_until = Some(now);
        }
        self.check_settled(now, out);
    }

    /// Starts the soak once every sent device of the current wave committed or failed (or the
    /// install deadline passed).
    fn check_settled(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        let i = self.current;
        let w = &self.waves[i];
        if w.settled_at.is_some() || self.is_final() || self.phase == Phase::Confirm {
            return;
        }
        let deadline_passed = w.install_deadline.is_some_and(|d| now >= d);
        if w.installing > 0 && !deadline_passed {
            return;
        }
        let stragglers: Vec<DeviceId> = if w.installing > 0 {
            self.devices
                .iter()
                .filter(|(_, a)| a.wave as usize == i && a.state == DevState::Sent)
                .map(|(d, _)| d.clone())
                .collect()
        } else {
            Vec::new()
        };
        for d in &stragglers {
            self.set_unreachable(d, true);
        }
        let w = &mut self.waves[i];
        w.settled_at = Some(now);
        w.soak_until = Some(now.saturating_add(w.soak));
        let name = w.name.clone();
        let soak = w.soak;
        self.last_action = if stragglers.is_empty() {
            format!("{name} installed")
        } else {
            format!(
                "{name}: install deadline passed with {} devices still installing (counted unreachable)",
                stragglers.len()
            )
        };
        self.next_action = format!(
            "soak {name} for {} until {}",
            humantime::format_duration(soak),
            now.saturating_add(soak)
        );
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("soak {name}"),
            outcome: self.last_action.clone(),
        });
        self.evaluate_triggers(now, out);
    }

    fn handle(&mut self, event: &Event, now: UnixMillis, out: &mut Vec<Action>) {
        match event {
            Event::Heartbeat { device, sample } => self.on_heartbeat(device, sample, now, out),
            Event::Reported {
                device,
                active,
                outcome,
            } => self.on_reported(device, *active, outcome.as_ref(), now, out),
            Event::Online { device, online } => self.on_online(device, *online, now, out),
            Event::Quarantined { device } => {
                if let Some(a) = self.devices.get_mut(device) {
                    a.quarantined = true;
                }
                if self
                    .devices
                    .get(device)
                    .is_some_and(|a| a.state == DevState::Pending)
                {
                    self.set_state(device, DevState::Skipped);
                    if let Some(a) = self.devices.get_mut(device) {
                        a.failure = Some("quarantined by an operator".into());
                    }
                }
            }
            Event::Tick => self.on_tick(now, out),
            Event::Restarted => {
                for a in self.devices.values_mut() {
                    a.last_seen = a.last_seen.max(now);
                }
            }
            Event::Operator { operator, command } => self.on_operator(operator, *command, now, out),
        }
    }

    fn on_heartbeat(&mut self, id: &DeviceId, s: &Sample, now: UnixMillis, out: &mut Vec<Action>) {
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        let was_healthy = a.healthy();
        a.latest = Some(s.clone());
        let is_healthy = a.healthy();
        let state = a.state;
        let wave = a.wave as usize;
        let unreachable_flag = a.unreachable;
        if was_healthy != is_healthy {
            if is_healthy {
                self.healthy += 1;
            } else {
                self.healthy = self.healthy.saturating_sub(1);
            }
        }
        let arm = self.devices.get(id).and_then(|a| a.arm);
        let (_, release) = self.arm_release(arm);
        let runs_release = s.version.as_deref() == Some(release.version.as_str());
        let thresholds = release.thresholds.clone();
        let alpha = self.settings.gate.ewma_alpha;
        let cap = self.settings.gate.max_requests_per_sample;
        // Neither arm's release counts as "not yet updated" for the control group.
        let runs_an_arm = self.ab.as_ref().is_some_and(|ab| {
            s.version.as_deref() == Some(ab.b_release.version.as_str())
                || s.version.as_deref() == Some(self.release.version.as_str())
        });
        match state {
            DevState::Pending if !runs_release && !runs_an_arm => self.control.add(s, alpha, cap),
            DevState::Deployed | DevState::Sent if runs_release => {
                self.waves[wave].agg.add(s, alpha, cap);
                self.fleet.add(s, alpha, cap);
                if let (Some(arm), 0, Some(ab)) = (arm, wave, self.ab.as_mut()) {
                    let run = ab.arm_mut(arm);
                    run.agg.add(s, alpha, cap);
                    run.max_restarts = run.max_restarts.max(s.restarts_in_window);
                }
            }
            _ => {}
        }
        // Unreachable: the health endpoint does not answer on a device that committed.
        // Design: a device still in its trial is judged by its agent's watchdog, which reports
        // `RolledBack` (the trial_failed trigger) or `Committed` within the release's trial
        // deadline; silence and the install timeout cover an agent that cannot report. During
        // a trial the app is legitimately not answering yet (a slow start) or down between a
        // crash and its restart: counting that here fired the wave's trigger before the
        // watchdog's verdict, and could halt a good release that takes a while to start.
        if state == DevState::Deployed {
            let flag = s.unreachable();
            if flag != unreachable_flag {
                self.set_unreachable(id, flag);
            }
        } else if unreachable_flag && !s.unreachable() {
            self.set_unreachable(id, false);
        }
        if self.is_final() && self.status != RolloutStatus::Completed {
            return;
        }
        if runs_release
            && matches!(state, DevState::Deployed | DevState::Sent)
            && let Some(b) = gate::device_breach(s, &thresholds)
        {
            self.device_failed(id, b, now, out);
            return;
        }
        if wave == self.current || state == DevState::Deployed {
            self.evaluate_triggers(now, out);
        }
        if wave == self.current && !self.ab_observing() {
            self.watch_trend(now, out);
        }
    }

    /// A device's own hard trigger (or its trial rollback): quarantine it and roll back the
    /// current wave; after CONFIRM only the device itself is rolled back.
    fn device_failed(&mut self, id: &DeviceId, b: Breach, now: UnixMillis, out: &mut Vec<Action>) {
        let Some(a) = self.devices.get(id) else {
            return;
        };
        if a.state == DevState::Failed {
            return;
        }
        let catch_up = a.catch_up || self.phase == Phase::Confirm || self.is_final();
        let prev_state = a.state;
        let arm = if a.wave == 0 { a.arm } else { None };
        self.set_state(id, DevState::Failed);
        if let Some(a) = self.devices.get_mut(id) {
            a.failure = Some(b.detail.clone());
        }
        out.push(Action::Quarantine {
            device: id.clone(),
            reason: format!("{}: {}", self.release_of(id).1.label(), b.detail),
        });
        if !self.failed_devices.contains(id) {
            self.failed_devices.push(id.clone());
        }
        // A device that failed its trial already returned to its previous release; one that
        // tripped a trigger while running the release is sent its previous release.
        if prev_state == DevState::Deployed || b.trigger != Trigger::TrialFailed {
            self.revert_one(id, out);
        }
        if catch_up {
            out.push(Action::Fired {
                trigger: b.trigger.clone(),
                wave: "catch-up".into(),
                detail: format!("{id}: {}", b.detail),
            });
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: Some(id.clone()),
                action: format!("rollback device ({})", b.trigger.as_str()),
                outcome: b.detail,
            });
            return;
        }
        let b = Breach {
            trigger: b.trigger,
            detail: format!("device {id}: {}", b.detail),
        };
        if let Some(arm) = arm.filter(|_| self.ab_observing()) {
            self.fail_arm(arm, b, now, out);
            return;
        }
        self.halt(b, now, out);
    }

    /// Strategy `ab`: rolls one arm back (its devices return to their previous release) and
    /// observes on with the other; both arms failed halts the rollout.
    fn fail_arm(&mut self, arm: Arm, b: Breach, now: UnixMillis, out: &mut Vec<Action>) {
        let Some(ab) = self.ab.as_mut() else {
            return self.halt(b, now, out);
        };
        if ab.arm(arm).rolled_back.is_some() {
            return;
        }
        let run = ab.arm_mut(arm);
        run.rolled_back = Some(b.detail.clone());
        run.verdict = Some(Verdict::Fail);
        let other_failed = ab.arm(arm.other()).rolled_back.clone();
        let label = self.arm_release(Some(arm)).1.label();
        out.push(Action::Fired {
            trigger: b.trigger.clone(),
            wave: format!("arm {arm}"),
            detail: b.detail.clone(),
        });
        let targets: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| {
                a.arm == Some(arm)
                    && a.wave == 0
                    && matches!(a.state, DevState::Sent | DevState::Deployed)
            })
            .map(|(d, _)| d.clone())
            .collect();
        for id in &targets {
            self.revert_one(id, out);
        }
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("rollback arm {arm} ({})", b.trigger.as_str()),
            outcome: format!(
                "{label}: {} ({} devices returned to their previous release)",
                b.detail,
                targets.len()
            ),
        });
        if let Some(first) = other_failed {
            let both = Breach {
                trigger: b.trigger,
                detail: format!(
                    "both arms failed: arm {} ({first}), arm {arm} ({})",
                    arm.other(),
                    b.detail
                ),
            };
            self.halt(both, now, out);
            return;
        }
        let other = arm.other();
        self.last_action = format!(
            "arm {arm} ({label}) rolled back: {}; arm {other} is still observed",
            b.detail
        );
        self.blockers = vec![format!(
            "arm {arm} rolled back ({} trigger): only arm {other} can be promoted",
            b.trigger.as_str()
        )];
    }

    fn on_reported(
        &mut self,
        id: &DeviceId,
        active: Option<Sha256>,
        outcome: Option<&ReportedOutcome>,
        now: UnixMillis,
        out: &mut Vec<Action>,
    ) {
        let (digest, label) = {
            let (d, r) = self.release_of(id);
            (d, r.label())
        };
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        a.last_seen = now;
        let state = a.state;
        let release_sequence = a.release_sequence;
        let Some(o) = outcome else { return };
        if o.rollout.as_ref() != Some(&self.id)
            || o.sequence < release_sequence
            || release_sequence == 0
        {
            return;
        }
        // A device whose wave was reverted while it was still in its trial reports the
        // trial's own verdict afterwards (the agent finishes a trial before it acts on a new
        // desired state): it failed the release like the device whose report halted the wave.
        let failed_after_revert = state == DevState::Reverted
            && matches!(&o.kind, OutcomeKind::RolledBack(r) if *r != RollbackReason::Requested);
        if state != DevState::Sent && !failed_after_revert {
            return;
        }
        match &o.kind {
            OutcomeKind::Committed if active == Some(digest) => {
                self.set_state(id, DevState::Deployed);
                out.push(Action::Audit {
                    actor: Actor::Device(id.clone()),
                    device: Some(id.clone()),
                    action: "committed".into(),
                    outcome: format!("runs {label}"),
                });
                if self.is_final() {
                    return;
                }
                self.check_settled(now, out);
                self.evaluate_triggers(now, out);
            }
            OutcomeKind::Committed => {}
            OutcomeKind::RolledBack(reason) => {
                let b = Breach {
                    trigger: Trigger::TrialFailed,
                    detail: format!("the agent rolled the release back: {reason}"),
                };
                if self.is_final() && self.status != RolloutStatus::Completed {
                    // Nothing left to roll back or halt, but a failed device is quarantined
                    // and named in the report whichever report arrived first.
                    self.set_state(id, DevState::Failed);
                    if let Some(a) = self.devices.get_mut(id) {
                        a.failure = Some(b.detail.clone());
                    }
                    if !self.failed_devices.contains(id) {
                        self.failed_devices.push(id.clone());
                    }
                    out.push(Action::Quarantine {
                        device: id.clone(),
                        reason: format!("{label}: {}", b.detail),
                    });
                    return;
                }
                self.device_failed(id, b, now, out);
            }
            OutcomeKind::Refused(_) | OutcomeKind::Failed(_) => {
                let detail = match &o.kind {
                    OutcomeKind::Refused(r) => format!("refused the release: {r}"),
                    OutcomeKind::Failed(f) => format!("failed before the swap: {f}"),
                    _ => String::new(),
                };
                self.set_state(id, DevState::Failed);
                if let Some(a) = self.devices.get_mut(id) {
                    a.failure = Some(detail.clone());
                }
                if !self.failed_devices.contains(id) {
                    self.failed_devices.push(id.clone());
                }
                out.push(Action::Quarantine {
                    device: id.clone(),
                    reason: format!("{label}: {detail}"),
                });
                if self.is_final() {
                    return;
                }
                self.check_settled(now, out);
                self.evaluate_triggers(now, out);
            }
        }
    }

    fn on_online(&mut self, id: &DeviceId, online: bool, now: UnixMillis, out: &mut Vec<Action>) {
        let Some(a) = self.devices.get_mut(id) else {
            return;
        };
        a.online = online;
        a.last_seen = now;
        let state = a.state;
        let wave = a.wave as usize;
        self.dirty.insert(id.clone());
        if !online {
            // Design: going offline is not yet evidence. A device that stays silent for
            // `silent_after` after it was sent the release counts toward the unreachable
            // trigger (suspected bricked, see on_tick) — but never as failed. A reconnect
            // (a last will followed by a quick return) costs nothing.
            let _ = (state, wave);
            return;
        }
        let catch_up_time = (self.phase == Phase::Confirm && !self.is_final())
            || self.status == RolloutStatus::Completed;
        let skipped_offline = self
            .devices
            .get(id)
            .is_some_and(|a| a.state == DevState::Skipped && a.failure.is_none());
        if catch_up_time && skipped_offline {
            if let Some(a) = self.devices.get_mut(id) {
                a.catch_up = true;
            }
            self.send(id, now, out);
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: Some(id.clone()),
                action: "catch up".into(),
                outcome: format!(
                    "back online after a skip: published {}",
                    self.release.label()
                ),
            });
        }
    }

    fn on_tick(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        if self.is_final() {
            return;
        }
        // Silence after installing counts toward the unreachable trigger.
        let silent_after = self.settings.silent_after;
        let current = self.current;
        let silent: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| {
                a.wave as usize == current
                    && matches!(a.state, DevState::Sent | DevState::Deployed)
                    && !a.unreachable
                    && now.since(a.last_seen) > silent_after
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in &silent {
            self.set_unreachable(d, true);
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: Some(d.clone()),
                action: "silent".into(),
                outcome: format!(
                    "no report for over {} after the release was sent: counted unreachable",
                    humantime::format_duration(silent_after)
                ),
            });
        }
        if !silent.is_empty() {
            self.evaluate_triggers(now, out);
            if self.is_final() {
                return;
            }
        }
        self.check_settled(now, out);
        self.judge(now, out);
    }

    /// Checks the wave and fleet triggers; a breach rolls back at once.
    fn evaluate_triggers(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        if self.is_final() || self.phase == Phase::Prepare {
            return;
        }
        if self.ab_observing() {
            self.evaluate_arms(now, out);
            return;
        }
        let r = self.reference();
        let t = &self.release.thresholds;
        let s = &self.settings.gate;
        // The wave's own triggers first: a wave rollback is the smaller remedy.
        if self.phase != Phase::Confirm {
            let w = &self.waves[self.current];
            if let Some(b) = gate::breach(
                &w.agg,
                u64::from(w.sent),
                u64::from(w.unreachable),
                u64::from(w.failed),
                &r,
                t,
                s,
            ) {
                self.halt(b, now, out);
                return;
            }
        }
        if let Some(b) = gate::fleet_breach(&self.fleet, &r, t, s) {
            self.rollback_fleet(b, now, out);
        }
    }

    /// Strategy `ab`: each arm's own triggers. Design: the fleet-wide trigger waits for the
    /// promotion, since both arms together are not one release's fleet; an arm bad enough for
    /// it crosses its own (smaller) error-rate trigger first.
    fn evaluate_arms(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        let r = self.reference();
        for arm in [Arm::A, Arm::B] {
            let Some(ab) = &self.ab else { return };
            let run = ab.arm(arm);
            if run.rolled_back.is_some() {
                continue;
            }
            let t = &self.arm_release(Some(arm)).1.thresholds;
            if let Some(b) = gate::breach(
                &run.agg,
                u64::from(run.sent),
                u64::from(run.unreachable),
                u64::from(run.failed),
                &r,
                t,
                &self.settings.gate,
            ) {
                let b = Breach {
                    trigger: b.trigger,
                    detail: format!("arm {arm}: {}", b.detail),
                };
                self.fail_arm(arm, b, now, out);
                if self.is_final() {
                    return;
                }
            }
        }
    }

    /// Strategy `ab`: the observation window ended; record each arm's verdict and wait for an
    /// operator to promote one.
    fn observation_ended(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        let r = self.reference();
        let mut notes = Vec::new();
        for arm in [Arm::A, Arm::B] {
            let (_, release) = self.arm_release(Some(arm));
            let (label, t) = (release.label(), release.thresholds.clone());
            let Some(ab) = self.ab.as_mut() else { return };
            let run = ab.arm_mut(arm);
            if let Some(why) = &run.rolled_back {
                notes.push(format!("arm {arm} ({label}) rolled back: {why}"));
                continue;
            }
            let (v, why) = gate::verdict(
                &run.agg,
                u64::from(run.installing),
                &r,
                &t,
                &self.settings.gate,
            );
            run.verdict = Some(match v {
                GateVerdict::Pass => Verdict::Pass,
                GateVerdict::Inconclusive => Verdict::Inconclusive,
            });
            let word = match v {
                GateVerdict::Pass => "pass",
                GateVerdict::Inconclusive => "inconclusive",
            };
            notes.push(format!("arm {arm} ({label}) {word}: {why}"));
        }
        let id = self.id.clone();
        let promotable: Vec<String> = [Arm::A, Arm::B]
            .into_iter()
            .filter(|a| {
                self.ab
                    .as_ref()
                    .is_some_and(|ab| ab.arm(*a).rolled_back.is_none())
            })
            .map(|a| a.to_string())
            .collect();
        self.waves[0].verdict = Some(Verdict::Pass);
        self.last_action = format!("observation window ended: {}", notes.join("; "));
        self.next_action = format!(
            "`fleetctl report {id}` compares the arms; `fleetctl rollout promote {id} {}` rolls the winner out to every other target",
            promotable.join("|")
        );
        self.blockers.push(format!(
            "awaiting promotion of arm {}",
            promotable.join(" or ")
        ));
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: "observation ended".into(),
            outcome: self.last_action.clone(),
        });
        let last = self.last_action.clone();
        self.transition(Phase::Verify, RolloutStatus::AwaitingApproval, &last, out);
        let _ = now;
    }

    /// Strategy `ab`: `arm` wins. Its devices keep it; the other arm's devices join wave 1
    /// and get the winner (or, when the winner's counter is below the loser's, which their
    /// agents would refuse, return to their previous release and are left out); the waves
    /// start at once, canary-rolling from here on.
    fn promote(&mut self, operator: &str, arm: Arm, now: UnixMillis, out: &mut Vec<Action>) {
        let loser = arm.other();
        let (w_label, w_counter) = {
            let r = self.arm_release(Some(arm)).1;
            (r.label(), r.counter)
        };
        let (l_label, l_counter) = {
            let r = self.arm_release(Some(loser)).1;
            (r.label(), r.counter)
        };
        if let Some(ab) = self.ab.as_mut() {
            ab.winner = Some(arm);
        }
        let losers: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| a.arm == Some(loser) && a.wave == 0 && a.state != DevState::Failed)
            .map(|(d, _)| d.clone())
            .collect();
        let reachable = w_counter > l_counter;
        let mut moved = 0usize;
        let mut left = 0usize;
        for id in &losers {
            let state = self.devices.get(id).map(|a| a.state);
            let touched = matches!(
                state,
                Some(DevState::Sent | DevState::Deployed | DevState::Reverted)
            );
            if touched && !reachable {
                if matches!(state, Some(DevState::Sent | DevState::Deployed)) {
                    self.revert_one(id, out);
                }
                if let Some(a) = self.devices.get_mut(id) {
                    a.failure = Some(format!(
                        "ran the losing arm's {l_label}; its agent refuses {w_label} below counter {l_counter}: sign it again with a higher counter to reach this device"
                    ));
                }
                left += 1;
                continue;
            }
            self.set_unreachable(id, false);
            self.set_state(id, DevState::Pending);
            if let Some(a) = self.devices.get_mut(id) {
                a.arm = None;
                a.wave = 1;
                a.failure = None;
            }
            self.waves[0].size = self.waves[0].size.saturating_sub(1);
            self.waves[1].size += 1;
            moved += 1;
        }
        self.recount();
        out.push(Action::Audit {
            actor: Actor::Operator(operator.to_owned()),
            device: None,
            action: "promote".into(),
            outcome: format!(
                "promoted arm {arm} ({w_label}) over arm {loser} ({l_label}); {moved} devices of arm {loser} join wave 1{}",
                if left > 0 {
                    format!(
                        ", {left} returned to their previous release (counter {l_counter} is above {w_counter})"
                    )
                } else {
                    String::new()
                }
            ),
        });
        self.blockers.clear();
        self.next_wave(now, &format!("arm {arm} promoted by {operator}"), out);
    }

    /// A worsening trend during a soak extends it (once) and asks the wave for fast reports.
    fn watch_trend(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        if self.is_final() || self.phase == Phase::Confirm {
            return;
        }
        let r = self.reference();
        let i = self.current;
        let w = &self.waves[i];
        if w.settled_at.is_none() || w.watching {
            return;
        }
        let Some(why) = gate::worsening(&w.agg, &r, &self.release.thresholds, &self.settings.gate)
        else {
            return;
        };
        let w = &mut self.waves[i];
        w.watching = true;
        let soak = w.soak;
        let until = w.soak_until.unwrap_or(now).max(now).saturating_add(soak);
        w.soak_until = Some(until);
        let name = w.name.clone();
        self.last_action = format!(
            "{name}: worsening trend ({why}); soak extended to {until}, fast reports requested"
        );
        self.next_action = format!("watch {name}; roll back if the trend continues");
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("extend soak {name}"),
            outcome: self.last_action.clone(),
        });
        self.republish_wave(i, true, out);
    }

    /// Publishes the wave's desired state again with the given report interval.
    fn republish_wave(&mut self, i: usize, fast: bool, out: &mut Vec<Action>) {
        for id in self.wave_devices(i) {
            let state = self.devices.get(&id).map(|a| a.state);
            let digest = self.release_of(&id).0;
            if matches!(state, Some(DevState::Sent | DevState::Deployed)) {
                self.desire(&id, Some(digest), fast, out);
            }
        }
    }

    /// Judges the current wave's gate once its soak elapsed.
    fn judge(&mut self, now: UnixMillis, out: &mut Vec<Action>) {
        if self.status != RolloutStatus::Running {
            return;
        }
        let i = self.current;
        let w = &self.waves[i];
        let Some(until) = w.soak_until else { return };
        if now < until {
            return;
        }
        if self.ab_observing() {
            self.observation_ended(now, out);
            return;
        }
        if self.phase == Phase::Confirm {
            self.ended_at = Some(now);
            self.last_action = format!(
                "confirmed: {} devices deployed, {} skipped, {} quarantined",
                self.deployed(),
                self.skipped(),
                self.quarantined()
            );
            self.next_action =
                "none; skipped devices are caught up when they come back online".into();
            self.transition(
                Phase::Confirm,
                RolloutStatus::Completed,
                "confirm soak elapsed",
                out,
            );
            out.push(Action::Audit {
                actor: Actor::Coordinator,
                device: None,
                action: "complete".into(),
                outcome: self.last_action.clone(),
            });
            return;
        }
        let r = self.reference();
        let deadline_passed = w.install_deadline.is_some_and(|d| now >= d);
        let unsettled = if deadline_passed {
            0
        } else {
            u64::from(w.installing)
        };
        let (verdict, why) = if w.sent == 0 {
            (
                GateVerdict::Pass,
                "every device was offline: skipped".to_owned(),
            )
        } else {
            gate::verdict(
                &w.agg,
                unsettled,
                &r,
                &self.release.thresholds,
                &self.settings.gate,
            )
        };
        let name = w.name.clone();
        match verdict {
            GateVerdict::Pass => {
                let watching = w.watching;
                self.waves[i].verdict = Some(Verdict::Pass);
                out.push(Action::Audit {
                    actor: Actor::Coordinator,
                    device: None,
                    action: format!("gate {name}"),
                    outcome: format!("pass: {why}"),
                });
                self.waves[i].watching = false;
                self.confirm_wave(i, watching, out);
                self.advance(now, &format!("{name} gate passed"), out);
            }
            GateVerdict::Inconclusive => {
                let still_worse =
                    gate::worsening(&w.agg, &r, &self.release.thresholds, &self.settings.gate);
                if w.watching
                    && let Some(trend) = still_worse
                {
                    let why = format!("{why}; {trend}");
                    let b = Breach {
                        trigger: Trigger::WorseningTrend,
                        detail: format!(
                            "{name}: the trend continued through the extended soak ({why})"
                        ),
                    };
                    self.halt(b, now, out);
                    return;
                }
                if w.extensions >= self.settings.gate.max_extensions {
                    // Design: no evidence of harm is no reason to roll back a release, and no
                    // evidence of health is no reason to go on: hold the rollout for a person.
                    // Triggers stay armed while it waits, so harm still rolls back at once.
                    let extensions = w.extensions;
                    let id = self.id.clone();
                    self.waves[i].verdict = Some(Verdict::Inconclusive);
                    self.last_action = format!(
                        "{name} gate still inconclusive after {extensions} soak extensions ({why}); holding for an operator"
                    );
                    self.next_action = format!(
                        "`fleetctl rollout approve {id}` continues past the {name} gate; `fleetctl rollout rollback {id}` reverts"
                    );
                    self.blockers = vec![format!(
                        "{name} gate inconclusive: too little evidence either way (longer soaks or more devices per wave give more)"
                    )];
                    out.push(Action::Audit {
                        actor: Actor::Coordinator,
                        device: None,
                        action: format!("hold {name}"),
                        outcome: self.last_action.clone(),
                    });
                    let (phase, last) = (self.phase, self.last_action.clone());
                    self.transition(phase, RolloutStatus::AwaitingApproval, &last, out);
                    return;
                }
                let ext = gate::extension(w.soak, self.settings.report_interval);
                let w = &mut self.waves[i];
                w.extensions += 1;
                w.verdict = Some(Verdict::Inconclusive);
                let until = now.saturating_add(ext);
                w.soak_until = Some(until);
                self.last_action = format!(
                    "{name} inconclusive ({why}); soak extended to {until} ({}/{})",
                    w.extensions, self.settings.gate.max_extensions
                );
                out.push(Action::Audit {
                    actor: Actor::Coordinator,
                    device: None,
                    action: format!("gate {name}"),
                    outcome: self.last_action.clone(),
                });
            }
        }
    }

    fn advance(&mut self, now: UnixMillis, why: &str, out: &mut Vec<Action>) {
        let i = self.current;
        if i == 0 && self.release.strategy.approval == Approval::Manual {
            self.last_action = format!("{why}; awaiting approval");
            self.next_action = format!("`fleetctl rollout approve {}` starts wave 1", self.id);
            self.transition(Phase::Verify, RolloutStatus::AwaitingApproval, why, out);
            return;
        }
        self.next_wave(now, why, out);
    }

    fn next_wave(&mut self, now: UnixMillis, why: &str, out: &mut Vec<Action>) {
        let next = self.current + 1;
        if next < self.waves.len() {
            self.start_wave(next, now, why, out);
            return;
        }
        // CONFIRM: a last soak over every deployed device; only triggers can stop it now.
        let soak = self.release.strategy.wave_soak;
        let w = &mut self.waves[self.current];
        w.soak_until = Some(now.saturating_add(soak));
        self.control = Agg::default();
        self.fleet = Agg::default();
        self.last_action = format!("{why}; every wave deployed");
        self.next_action = format!(
            "confirm: soak every deployed device until {}",
            now.saturating_add(soak)
        );
        self.transition(Phase::Confirm, RolloutStatus::Running, why, out);
        // Devices skipped earlier and online again are caught up now.
        let back: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| a.state == DevState::Skipped && a.online && a.failure.is_none())
            .map(|(d, _)| d.clone())
            .collect();
        for id in back {
            self.on_online(&id, true, now, out);
        }
    }

    fn revert_one(&mut self, id: &DeviceId, out: &mut Vec<Action>) {
        let Some(a) = self.devices.get(id) else {
            return;
        };
        let previous = a.previous;
        let label = a.previous_label.clone();
        let failed = a.state == DevState::Failed;
        self.desire(id, previous, false, out);
        if !failed {
            self.set_unreachable(id, false);
            self.set_state(id, DevState::Reverted);
        }
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: Some(id.clone()),
            action: "rollback device".into(),
            outcome: match label {
                Some(l) => format!("published {l} again"),
                None => "ran nothing before: nothing to return to; asked to keep what is installed"
                    .into(),
            },
        });
    }

    /// Rolls the current wave back and halts (returns to PREPARE).
    fn halt(&mut self, b: Breach, now: UnixMillis, out: &mut Vec<Action>) {
        if self.is_final() {
            return;
        }
        let i = self.current;
        let name = self.waves[i].name.clone();
        out.push(Action::Fired {
            trigger: b.trigger.clone(),
            wave: name.clone(),
            detail: b.detail.clone(),
        });
        let targets: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| {
                a.wave as usize == i && matches!(a.state, DevState::Sent | DevState::Deployed)
            })
            .map(|(d, _)| d.clone())
            .collect();
        self.classify(Some(i));
        for id in &targets {
            self.revert_one(id, out);
        }
        self.waves[i].verdict = Some(Verdict::Fail);
        self.ended_at = Some(now);
        self.last_action = format!(
            "{name} rolled back: {} ({} devices returned to their previous release)",
            b.detail,
            targets.len()
        );
        self.next_action = format!(
            "`fleetctl report {}` shows the failure pattern; `fleetctl rollout rollback {}` reverts the earlier waves too",
            self.id, self.id
        );
        self.blockers = vec![format!("{} trigger fired in {name}", b.trigger.as_str())];
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("rollback {name} ({})", b.trigger.as_str()),
            outcome: b.detail.clone(),
        });
        self.halt = Some(b);
        self.transition(Phase::Prepare, RolloutStatus::Halted, "trigger fired", out);
    }

    /// Rolls back every device that got the release.
    fn rollback_fleet(&mut self, b: Breach, now: UnixMillis, out: &mut Vec<Action>) {
        out.push(Action::Fired {
            trigger: b.trigger.clone(),
            wave: "fleet".into(),
            detail: b.detail.clone(),
        });
        let n = self.revert_all(out);
        self.classify(None);
        if let Some(w) = self.waves.get_mut(self.current) {
            w.verdict = Some(Verdict::Fail);
        }
        self.ended_at = Some(now);
        self.last_action = format!("fleet rolled back: {} ({n} devices)", b.detail);
        self.next_action = format!("`fleetctl report {}` shows the failure pattern", self.id);
        self.blockers = vec![format!("{} trigger fired", b.trigger.as_str())];
        out.push(Action::Audit {
            actor: Actor::Coordinator,
            device: None,
            action: format!("rollback fleet ({})", b.trigger.as_str()),
            outcome: b.detail.clone(),
        });
        self.halt = Some(b);
        self.transition(
            Phase::Prepare,
            RolloutStatus::RolledBack,
            "fleet trigger fired",
            out,
        );
    }

    fn revert_all(&mut self, out: &mut Vec<Action>) -> usize {
        let targets: Vec<DeviceId> = self
            .devices
            .iter()
            .filter(|(_, a)| matches!(a.state, DevState::Sent | DevState::Deployed))
            .map(|(d, _)| d.clone())
            .collect();
        for id in &targets {
            self.revert_one(id, out);
        }
        targets.len()
    }

    /// Classifies the failure pattern of a halt in `wave` (with the waves before it as
    /// evidence), or of the whole rollout.
    fn classify(&mut self, wave: Option<usize>) {
        let r = self.reference();
        let limit = r.error_rate + self.release.thresholds.error_rate_pts / 100.0;
        // The halted wave and the waves before it: devices that ran the release through
        // their own wave and soak are evidence too. With the halted wave alone, a wave halted
        // by its first failure, before its other devices had an outcome, always read as a bad
        // artifact, even when the canary had run the release fine on every other device type.
        let in_scope = |a: &Assignment| wave.is_none_or(|w| a.wave as usize <= w);
        let mut attempted = 0usize;
        let mut failed: Vec<(&DeviceId, &Assignment)> = Vec::new();
        for (id, a) in &self.devices {
            // Only devices with an outcome count: one still installing says nothing yet.
            let settled = matches!(a.state, DevState::Deployed | DevState::Failed)
                || (a.state == DevState::Sent && a.unreachable);
            if !in_scope(a) || !settled {
                continue;
            }
            attempted += 1;
            let bad = a.state == DevState::Failed
                || a.unreachable
                || a.latest.as_ref().is_some_and(|s| {
                    s.error_rate.is_some_and(|e| e > limit)
                        || gate::device_breach(s, &self.release.thresholds).is_some()
                });
            if bad {
                failed.push((id, a));
            }
        }
        let pattern = if failed.is_empty() {
            None
        } else if failed.len() == attempted {
            Some(FailurePattern::Artifact)
        } else {
            let types: BTreeSet<&str> =
                failed.iter().map(|(_, a)| a.device_type.as_str()).collect();
            let attempted_types: BTreeSet<&str> = self
                .devices
                .values()
                .filter(|a| {
                    in_scope(a) && !matches!(a.state, DevState::Pending | DevState::Skipped)
                })
                .map(|a| a.device_type.as_str())
                .collect();
            match types.iter().next() {
                Some(t) if types.len() == 1 && attempted_types.len() > 1 => {
                    Some(FailurePattern::Compatibility {
                        device_type: (*t).to_owned(),
                    })
                }
                _ => Some(FailurePattern::Infrastructure),
            }
        };
        for (id, _) in &failed {
            if !self.failed_devices.contains(id) {
                self.failed_devices.push((*id).clone());
            }
        }
        self.failure_pattern = pattern;
    }

    fn on_operator(
        &mut self,
        operator: &str,
        command: OperatorCommand,
        now: UnixMillis,
        out: &mut Vec<Action>,
    ) {
        let refuse = |out: &mut Vec<Action>, message: String, hint: Option<String>| {
            out.push(Action::Refuse { message, hint });
        };
        let id = self.id.clone();
        let status = self.status;
        let audit = |out: &mut Vec<Action>, outcome: String| {
            out.push(Action::Audit {
                actor: Actor::Operator(operator.to_owned()),
                device: None,
                action: command.as_str().into(),
                outcome,
            });
        };
        match command {
            OperatorCommand::Approve if self.ab_observing() => refuse(
                out,
                format!(
                    "rollout {id} is an A/B rollout: it is not approved, one of its arms is promoted"
                ),
                Some(format!(
                    "`fleetctl report {id}` compares the arms; `fleetctl rollout promote {id} A|B` once the observation window ended"
                )),
            ),
            OperatorCommand::Promote(arm) => {
                let Some(ab) = &self.ab else {
                    return refuse(
                        out,
                        format!(
                            "rollout {id} uses strategy {}, not ab: it has no arms to promote",
                            self.release.strategy.kind
                        ),
                        Some(format!(
                            "`fleetctl rollout approve {id}` continues a rollout that awaits approval"
                        )),
                    );
                };
                if let Some(w) = ab.winner {
                    return refuse(
                        out,
                        format!("rollout {id} already promoted arm {w}"),
                        Some(format!("`fleetctl rollout status {id}` shows its waves")),
                    );
                }
                if let Some(why) = &ab.arm(arm).rolled_back {
                    return refuse(
                        out,
                        format!(
                            "arm {arm} of rollout {id} was rolled back and cannot be promoted: {why}"
                        ),
                        Some(format!(
                            "promote arm {} or `fleetctl rollout rollback {id}`",
                            arm.other()
                        )),
                    );
                }
                if status != RolloutStatus::AwaitingApproval {
                    let (message, hint) = if self.is_final() {
                        (
                            format!("rollout {id} is {status}: nothing to promote"),
                            None,
                        )
                    } else if status == RolloutStatus::Paused {
                        (
                            format!("rollout {id} is paused"),
                            Some(format!("`fleetctl rollout resume {id}` first")),
                        )
                    } else {
                        (
                            format!(
                                "rollout {id} is still observing its arms{}: promote after the observation window ends",
                                self.waves[0].soak_until.map_or_else(
                                    || " (installing)".to_owned(),
                                    |u| format!(" until {u}")
                                )
                            ),
                            Some(format!(
                                "`fleetctl rollout status {id}` shows the window; `fleetctl report {id}` compares the arms so far"
                            )),
                        )
                    };
                    return refuse(out, message, hint);
                }
                self.promote(operator, arm, now, out);
            }
            OperatorCommand::Approve => {
                if status != RolloutStatus::AwaitingApproval {
                    let hint = if status == RolloutStatus::Paused {
                        Some(format!("`fleetctl rollout resume {id}` first"))
                    } else {
                        Some(format!("`fleetctl rollout status {id}` shows where it is"))
                    };
                    return refuse(
                        out,
                        format!(
                            "rollout {id} is not awaiting approval (it is {status}, phase {})",
                            self.phase
                        ),
                        hint,
                    );
                }
                let gate = &self.waves[self.current];
                audit(
                    out,
                    if gate.verdict == Some(Verdict::Inconclusive) {
                        format!("approved past the inconclusive {} gate", gate.name)
                    } else {
                        format!("approved after the {} gate", gate.name)
                    },
                );
                self.blockers.clear();
                let current = self.current;
                self.confirm_wave(current, false, out);
                self.next_wave(now, &format!("approved by {operator}"), out);
            }
            OperatorCommand::Pause => {
                if !matches!(
                    status,
                    RolloutStatus::Running | RolloutStatus::AwaitingApproval
                ) {
                    return refuse(
                        out,
                        format!("rollout {id} cannot be paused: it is {status}"),
                        None,
                    );
                }
                self.resume_to = Some(status);
                self.last_action = format!("paused by {operator}");
                self.next_action = format!(
                    "`fleetctl rollout resume {id}`; triggers still roll back while paused"
                );
                self.blockers = vec![format!("paused by {operator}")];
                audit(
                    out,
                    "paused; no new wave starts, triggers stay armed".into(),
                );
                let phase = self.phase;
                self.transition(
                    phase,
                    RolloutStatus::Paused,
                    &format!("paused by {operator}"),
                    out,
                );
            }
            OperatorCommand::Resume => {
                if status != RolloutStatus::Paused {
                    return refuse(
                        out,
                        format!("rollout {id} is not paused (it is {status})"),
                        None,
                    );
                }
                let to = self.resume_to.take().unwrap_or(RolloutStatus::Running);
                self.blockers.clear();
                self.last_action = format!("resumed by {operator}");
                audit(out, "resumed".into());
                let phase = self.phase;
                self.transition(phase, to, &format!("resumed by {operator}"), out);
                self.check_settled(now, out);
                self.judge(now, out);
            }
            OperatorCommand::Abort => {
                if self.is_final() {
                    return refuse(
                        out,
                        format!("rollout {id} is already {status}; nothing to abort"),
                        None,
                    );
                }
                self.ended_at = Some(now);
                self.last_action =
                    format!("aborted by {operator}; deployed devices keep what they have");
                self.next_action =
                    format!("`fleetctl rollout rollback {id}` reverts deployed devices");
                self.blockers.clear();
                audit(out, self.last_action.clone());
                let phase = self.phase;
                self.transition(
                    phase,
                    RolloutStatus::Aborted,
                    &format!("aborted by {operator}"),
                    out,
                );
            }
            OperatorCommand::Rollback => {
                if status == RolloutStatus::RolledBack {
                    return refuse(out, format!("rollout {id} is already rolled back"), None);
                }
                let n = self.revert_all(out);
                if n == 0 && self.deployed() == 0 {
                    // Nothing had the release: still record the decision.
                }
                self.ended_at = Some(now);
                self.last_action = format!(
                    "rolled back by {operator}: {n} devices returned to their previous release"
                );
                self.next_action = "none".into();
                self.blockers.clear();
                audit(out, self.last_action.clone());
                self.transition(
                    Phase::Prepare,
                    RolloutStatus::RolledBack,
                    &format!("rollback by {operator}"),
                    out,
                );
            }
        }
    }

    /// A full copy, assignments included (tests compare before and after a step).
    pub fn clone_for_test(&self) -> Rollout {
        let mut r = self.clone_core();
        r.waves = self.waves.clone();
        r.devices = self.devices.clone();
        r.phase = self.phase;
        r
    }

    /// A copy without the per-device assignments (cheap, for swapping a rollout out).
    pub fn clone_core(&self) -> Rollout {
        Rollout {
            id: self.id.clone(),
            digest: self.digest,
            release: self.release.clone(),
            operator: self.operator.clone(),
            phase: self.phase,
            status: self.status,
            resume_to: self.resume_to,
            waves: Vec::new(),
            current: self.current,
            baseline: self.baseline.clone(),
            control: Agg::default(),
            fleet: Agg::default(),
            created_at: self.created_at,
            ended_at: self.ended_at,
            last_action: String::new(),
            next_action: String::new(),
            blockers: Vec::new(),
            halt: None,
            failure_pattern: None,
            failed_devices: Vec::new(),
            settings: self.settings.clone(),
            healthy: 0,
            ab: self.ab.clone(),
            devices: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }

    /// Recomputes the wave counters from the assignments (after loading from the database).
    pub fn recount(&mut self) {
        for w in &mut self.waves {
            (
                w.sent,
                w.deployed,
                w.failed,
                w.skipped,
                w.unreachable,
                w.installing,
            ) = (0, 0, 0, 0, 0, 0);
        }
        self.healthy = self.devices.values().filter(|a| a.healthy()).count() as u32;
        if let Some(ab) = self.ab.as_mut() {
            for run in [&mut ab.a, &mut ab.b] {
                (
                    run.sent,
                    run.deployed,
                    run.failed,
                    run.unreachable,
                    run.installing,
                ) = (0, 0, 0, 0, 0);
            }
            for a in self.devices.values().filter(|a| a.wave == 0) {
                let Some(arm) = a.arm else { continue };
                let run = ab.arm_mut(arm);
                match a.state {
                    DevState::Sent => {
                        run.installing += 1;
                        run.sent += 1;
                    }
                    DevState::Deployed => {
                        run.deployed += 1;
                        run.sent += 1;
                    }
                    DevState::Failed => {
                        run.failed += 1;
                        run.sent += 1;
                    }
                    DevState::Reverted => run.sent += 1,
                    DevState::Skipped | DevState::Pending => {}
                }
                if a.unreachable {
                    run.unreachable += 1;
                }
            }
        }
        for a in self.devices.values() {
            let Some(w) = self.waves.get_mut(a.wave as usize) else {
                continue;
            };
            match a.state {
                DevState::Sent => {
                    w.installing += 1;
                    w.sent += 1;
                }
                DevState::Deployed => {
                    w.deployed += 1;
                    w.sent += 1;
                }
                DevState::Failed => {
                    w.failed += 1;
                    w.sent += 1;
                }
                DevState::Reverted => w.sent += 1,
                DevState::Skipped => w.skipped += 1,
                DevState::Pending => {}
            }
            if a.unreachable {
                w.unreachable += 1;
            }
        }
    }

    pub fn deployed(&self) -> u32 {
        self.waves.iter().map(|w| w.deployed).sum()
    }

    pub fn skipped(&self) -> u32 {
        self.waves.iter().map(|w| w.skipped).sum()
    }

    pub fn quarantined(&self) -> u32 {
        self.waves.iter().map(|w| w.failed).sum()
    }

    /// The state block.
    pub fn state_block(&self, now: UnixMillis) -> RolloutState {
        let rollback_available = self.status != RolloutStatus::RolledBack
            && self
                .waves
                .iter()
                .any(|w| w.deployed > 0 || w.installing > 0);
        RolloutState {
            rollout: self.id.clone(),
            phase: self.phase,
            status: self.status,
            strategy: self.release.strategy.kind,
            artifact: match &self.ab {
                Some(ab) if ab.winner.is_none() => format!(
                    "{} {} (A) vs {} (B)",
                    self.release.name, self.release.version, ab.b_release.version
                ),
                _ => {
                    let r = self.arm_release(None).1;
                    format!("{} {}", r.name, r.version)
                }
            },
            fleet_total: self.devices.len() as u32,
            deployed_count: self.deployed(),
            healthy_count: self.healthy,
            quarantined_count: self.quarantined(),
            skipped_count: self.skipped(),
            rollback_available,
            current_wave: WaveCursor {
                current: self.current as u32,
                total: self.waves.len().saturating_sub(1) as u32,
            },
            last_action: self.last_action.clone(),
            next_action: self.next_action_with_warm(),
            blockers: self.blockers.clone(),
            waves: self
                .waves
                .iter()
                .map(|w| WaveState {
                    name: w.name.clone(),
                    devices: w.size,
                    deployed: w.deployed,
                    healthy: 0,
                    failed: w.failed,
                    skipped: w.skipped,
                    soak_until: w.soak_until,
                    verdict: w.verdict.clone(),
                })
                .enumerate()
                .map(|(i, mut ws)| {
                    ws.healthy = self
                        .devices
                        .values()
                        .filter(|a| a.wave as usize == i && a.healthy())
                        .count() as u32;
                    ws
                })
                .collect(),
            updated_at: now,
            arms: self.arm_states(),
        }
    }

    /// The next action, and (blue-green) which devices keep their old instance warm until
    /// when: a rollback of those waves is a switch back.
    fn next_action_with_warm(&self) -> String {
        let warm: Vec<String> = self
            .warm()
            .into_iter()
            .map(|(i, n)| {
                format!(
                    "old instances kept warm on {n} devices until {} is confirmed",
                    self.waves[i].name
                )
            })
            .collect();
        if warm.is_empty() || self.is_final() {
            return self.next_action.clone();
        }
        format!("{}; {}", self.next_action, warm.join("; "))
    }

    /// Strategy `ab`: each arm in the state block.
    fn arm_states(&self) -> Vec<ArmState> {
        let Some(ab) = &self.ab else {
            return Vec::new();
        };
        [Arm::A, Arm::B]
            .into_iter()
            .map(|arm| {
                let run = ab.arm(arm);
                let status = match (&run.rolled_back, ab.winner) {
                    (Some(why), _) => format!("rolled back: {why}"),
                    (None, Some(w)) if w == arm => "promoted".to_owned(),
                    (None, Some(_)) => "not promoted".to_owned(),
                    (None, None) => "observing".to_owned(),
                };
                ArmState {
                    arm,
                    release: self.arm_release(Some(arm)).1.label(),
                    devices: run.size,
                    deployed: run.deployed,
                    healthy: self
                        .devices
                        .values()
                        .filter(|a| a.arm == Some(arm) && a.wave == 0 && a.healthy())
                        .count() as u32,
                    failed: run.failed,
                    status,
                }
            })
            .collect()
    }
}
