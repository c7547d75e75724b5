//! The update state machine: `step(ctx, state, input, now) -> (state, actions)`. Pure: no
//! tokio, no files, no clock. The driver (`agent.rs`) persists the returned state in the
//! journal *before* it executes the actions, so a crash at any instant leaves a journal that
//! [`Input::Boot`] resolves (the table in `README.md`, "Journal resolution", mirrors
//! [`resolve`]).
//!
//! ```text
//! Idle ─desired─▶ Downloading ─ok─▶ Installing ─ok─▶ [Snapshotting] ─▶ Swapping ─swapped─▶ Trial ─good─▶ Idle (committed)
//!   │  (standby has it) ─────────────────────────────▶ [Snapshotting] ─▶ Swapping     └─bad──▶ [Restoring] ─▶ RollingBack ─▶ Idle
//!   └─ refused / failed ─▶ Idle
//! ```
//!
//! `Snapshotting` and `Restoring` happen only for a release with data directories (its own or
//! the agent's `app.data_dirs`) or a container: the data is archived (and the container's
//! image kept as the rollback image) before the swap, and put back before the previous
//! version starts again.
//!
//! A blue-green release (`strategy = "blue-green"`) on a device that runs a committed version
//! takes its own path after the install (issue 9):
//!
//! ```text
//! Installing ─ok─▶ Warming ─good─▶ Switching ─switched─▶ Proving ─good─▶ Idle (committed; the old instance stops)
//!                    │ bad            │ failed              └─bad──▶ SwitchingBack ─switched─▶ Idle (rolled back)
//!                    └────────────────┴──▶ Idle (rolled back: the old instance never stopped serving)
//! ```
//!
//! The new version runs *beside* the committed one (its own instance, its own port) while the
//! old one keeps serving; the traffic switch and the switch back are actions whose result
//! comes back as [`Input::Switched`]. The old instance is stopped only at the commit.
//!
//! With `Desired.hold` (the coordinator has not confirmed the wave yet) the commit leaves the
//! old instance running without traffic ([`State::warm`]) until the coordinator decides:
//!
//! ```text
//! Proving ─good, hold─▶ Idle (committed; warm = previous)
//!   Idle (warm) ─same release, hold───────────────▶ Idle (warm)
//!   Idle (warm) ─same release without hold / none─▶ Idle (the old instance stops)
//!   Idle (warm) ─the warm release─▶ Returning ─switched─▶ Idle (committed: the previous version, which never stopped)
//!   Idle (warm) ─any other release─▶ (the old instance stops) as from Idle
//! ```

use std::time::Duration;

use fleet_proto::device::{
    Desired, DeviceFacts, EventKind, Failure, Installed, Outcome, OutcomeKind, RollbackReason,
    Slot, UpdatePhase,
};
use fleet_proto::hex::Hex;
use fleet_proto::hex::Sha256;
use fleet_proto::release::{Accepted, Release, StrategyKind, Trust, admit, key_id};
use fleet_proto::trust::{Pinned, TrustChain, follow, trusted_now};
use fleet_proto::{DeviceId, Refusal, RolloutId, SignedRelease, UnixMillis, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::trial::{self, HealthAnswer, Progress, Rules, Sample, Verdict};

/// What the core needs from the agent's config and the device; fixed for a run.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub keys: Vec<VerifyingKey>,
    pub skew: Duration,
    pub device: DeviceId,
    pub facts: DeviceFacts,
    pub trial_attempts: u32,
    pub failures_allowed: u32,
    pub restore_timeout: Duration,
    /// Data directories from the agent's config (`app.data_dirs`), snapshotted for every
    /// release besides the release's own `data_dirs`.
    pub data_dirs: Vec<String>,
    /// Why this device cannot run a blue-green release (its runtime, no traffic switch
    /// configured, or data directories in its config), as the refusal says it; `None`: it can.
    /// Every reported state carries it too (`Reported::blue_green`).
    pub blue_green_refusal: Option<String>,
}

/// A release that is completely installed in a slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotContent {
    pub installed: Installed,
    pub signed: SignedRelease,
    pub release: Release,
}

/// One desired release being worked on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub sequence: u64,
    pub rollout: Option<RolloutId>,
    pub retry: u32,
    pub signed: SignedRelease,
    pub release: Release,
    pub digest: Sha256,
    /// `Desired.hold` (issue 9, appended): a blue-green commit keeps the previous version's
    /// instance warm ([`State::warm`]). Meaningless for other releases.
    #[serde(default)]
    pub hold: bool,
}

/// A release that failed its trial here: refused until a desired state carries a higher retry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FailedRelease {
    pub digest: Sha256,
    pub version: String,
    pub retry: u32,
}

/// Where the device is in an update. Each variant is persisted before its actions run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    Idle,
    /// Fetching into staging (resumable). Nothing in the slots has changed.
    Downloading {
        job: Job,
    },
    /// Unpacking into `slot` (the standby), which no longer counts as holding anything.
    Installing {
        job: Job,
        slot: Slot,
    },
    /// `slot` is completely installed; the `active` link is about to point to it.
    Swapping {
        job: Job,
        slot: Slot,
        previous: Option<Slot>,
    },
    /// `slot` is active and on trial until `deadline`.
    Trial {
        job: Job,
        slot: Slot,
        previous: Option<Slot>,
        deadline: UnixMillis,
        attempts_left: u32,
        progress: Progress,
    },
    /// Going back to `to` (or to nothing) because `from` failed; the previous version must
    /// answer healthy before `deadline`.
    RollingBack {
        job: Job,
        from: Slot,
        to: Option<Slot>,
        reason: RollbackReason,
        deadline: UnixMillis,
        /// Why the data snapshot could not be restored, if it could not: reported with the
        /// rollback as `Failed{Rollback}`.
        #[serde(default)]
        restore_problem: Option<String>,
    },
    /// `slot` is completely installed; before the swap the app is stopped (when there are
    /// data directories), the data snapshotted and, for a container, the running container's
    /// image tagged as the rollback image. `active` still points to `previous`.
    Snapshotting {
        job: Job,
        slot: Slot,
        previous: Option<Slot>,
    },
    /// Rolling back from `from` to `to`: the new version is stopped and the data snapshot
    /// restored (and checked) before the previous version starts.
    Restoring {
        job: Job,
        from: Slot,
        to: Option<Slot>,
        reason: RollbackReason,
    },
    // Blue-green (issue 9), appended. `previous` keeps running and serving through all of them
    // until the commit; `active` and the `active` link stay on it until the traffic moved.
    /// `slot` runs beside `previous` on its own port, without traffic, and is probed until
    /// `deadline`.
    Warming {
        job: Job,
        slot: Slot,
        previous: Slot,
        deadline: UnixMillis,
        attempts_left: u32,
        progress: Progress,
    },
    /// `slot` proved healthy; the traffic is being switched to it.
    Switching {
        job: Job,
        slot: Slot,
        previous: Slot,
        attempts_left: u32,
    },
    /// The traffic goes to `slot` (and the `active` link points to it); `previous` stays warm
    /// until `slot` passes its trial under traffic before `deadline`.
    Proving {
        job: Job,
        slot: Slot,
        previous: Slot,
        deadline: UnixMillis,
        attempts_left: u32,
        progress: Progress,
    },
    /// `from` failed after taking traffic: the traffic goes back to `to`, which never stopped,
    /// then `from` is stopped.
    SwitchingBack {
        job: Job,
        from: Slot,
        to: Slot,
        reason: RollbackReason,
    },
    /// Blue-green hold (appended): the coordinator asked for the release still running warm in
    /// `to` (it rolls the wave back). The traffic and the `active` link go back to `to` from
    /// `from` (the committed version) without a download, an install or a restart; then
    /// `from`'s instance stops.
    Returning {
        job: Job,
        from: Slot,
        to: Slot,
    },
}

impl Phase {
    pub fn wire(&self) -> UpdatePhase {
        match self {
            Phase::Idle => UpdatePhase::Idle,
            Phase::Downloading { .. } => UpdatePhase::Downloading,
            Phase::Installing { .. } => UpdatePhase::Installing,
            // Design: the wire keeps its six phases; the two new steps belong to the swap and
            // to the rollback from the coordinator's point of view. `Returning` is the
            // coordinator's own rollback, which the ordinary path reports as `Swapping` too:
            // `RollingBack` says the device is undoing a release by itself.
            Phase::Swapping { .. }
            | Phase::Snapshotting { .. }
            | Phase::Switching { .. }
            | Phase::Returning { .. } => UpdatePhase::Swapping,
            Phase::Trial { .. } | Phase::Warming { .. } | Phase::Proving { .. } => {
                UpdatePhase::Trial
            }
            Phase::RollingBack { .. } | Phase::Restoring { .. } | Phase::SwitchingBack { .. } => {
                UpdatePhase::RollingBack
            }
        }
    }

    pub fn job(&self) -> Option<&Job> {
        match self {
            Phase::Idle => None,
            Phase::Downloading { job }
            | Phase::Installing { job, .. }
            | Phase::Swapping { job, .. }
            | Phase::Trial { job, .. }
            | Phase::RollingBack { job, .. }
            | Phase::Snapshotting { job, .. }
            | Phase::Restoring { job, .. }
            | Phase::Warming { job, .. }
            | Phase::Switching { job, .. }
            | Phase::Proving { job, .. }
            | Phase::SwitchingBack { job, .. }
            | Phase::Returning { job, .. } => Some(job),
        }
    }
}

/// Everything the agent knows durably: the journal's content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The release that set the highest accepted counter; never goes down.
    pub highest: Option<Accepted>,
    pub slot_a: Option<SlotContent>,
    pub slot_b: Option<SlotContent>,
    /// The slot the `active` link points to when no update is in flight.
    pub active: Option<Slot>,
    pub phase: Phase,
    pub applied_sequence: u64,
    pub last_outcome: Option<Outcome>,
    pub failed: Vec<FailedRelease>,
    /// The latest desired state that arrived while busy.
    pub pending: Option<Desired>,
    pub report_interval: Option<Duration>,
    // Appended by issue 8; `serde(default)` reads journals written before.
    /// The release keys a signed rotation made this device pin; `None`: the config's
    /// `trust.keys` (epoch 0). Never goes back: only a rotation signed by these keys changes it.
    #[serde(default)]
    pub pinned: Option<PinnedKeys>,
    /// The trusted-time floor: the latest signed time this device accepted (a release's
    /// `not_before`, a rotation's `issued_at`). Validity windows are checked against the later
    /// of the clock and this, so a clock wound back does not revive an expired release.
    #[serde(default)]
    pub time_floor: UnixMillis,
    /// The epoch of the last rotation refused, so a retained chain re-delivered on every
    /// reconnect is reported once.
    #[serde(default)]
    pub rotation_refused: Option<u64>,
    // Appended by issue 9 (blue-green hold).
    /// The slot whose release (the version before the active one) still runs, without
    /// traffic, beside the active one: a blue-green release committed with `Desired.hold`.
    /// Only while `Idle`. In the driver the old instance is still the app and the active
    /// version the second instance, so `Action::Promote` (the wave confirmed) and
    /// `Action::StopStandby` (after `Returning`) both work as after a blue-green trial.
    #[serde(default)]
    pub warm: Option<Slot>,
}

/// Release keys pinned by a rotation, as journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedKeys {
    pub epoch: u64,
    pub keys: Vec<Hex<32>>,
}

impl State {
    /// The keys this device pins now, and the epoch that set them.
    pub fn pinned(&self, ctx: &Ctx) -> Pinned {
        match &self.pinned {
            Some(p) => Pinned {
                epoch: p.epoch,
                keys: p
                    .keys
                    .iter()
                    .filter_map(|k| VerifyingKey::from_bytes(&k.0).ok())
                    .collect(),
            },
            None => Pinned {
                epoch: 0,
                keys: ctx.keys.clone(),
            },
        }
    }

    /// Raises the trusted-time floor to a signed time just accepted.
    fn raise_floor(&mut self, signed_time: UnixMillis) {
        self.time_floor = self.time_floor.max(signed_time);
    }

    pub fn fresh() -> State {
        State {
            highest: None,
            slot_a: None,
            slot_b: None,
            active: None,
            phase: Phase::Idle,
            applied_sequence: 0,
            last_outcome: None,
            failed: Vec::new(),
            pending: None,
            report_interval: None,
            pinned: None,
            time_floor: UnixMillis(0),
            rotation_refused: None,
            warm: None,
        }
    }

    pub fn slot(&self, slot: Slot) -> Option<&SlotContent> {
        match slot {
            Slot::A => self.slot_a.as_ref(),
            Slot::B => self.slot_b.as_ref(),
        }
    }

    fn slot_mut(&mut self, slot: Slot) -> &mut Option<SlotContent> {
        match slot {
            Slot::A => &mut self.slot_a,
            Slot::B => &mut self.slot_b,
        }
    }

    /// The slot that is not active: where installs go. The active slot is never written.
    pub fn standby_slot(&self) -> Slot {
        self.active.map(Slot::other).unwrap_or(Slot::A)
    }

    /// The slot the `active` link must point to in this state.
    pub fn link_target(&self) -> Option<Slot> {
        match &self.phase {
            Phase::Trial { slot, .. }
            | Phase::Restoring { from: slot, .. }
            | Phase::Proving { slot, .. } => Some(*slot),
            Phase::RollingBack { to, .. } => *to,
            Phase::Warming { previous, .. } | Phase::Switching { previous, .. } => Some(*previous),
            Phase::SwitchingBack { to, .. } | Phase::Returning { to, .. } => Some(*to),
            _ => self.active,
        }
    }

    /// The release running (or meant to run) now.
    pub fn running(&self) -> Option<&SlotContent> {
        self.link_target().and_then(|s| self.slot(s))
    }
}

/// Something that happened, translated by the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// The agent started; `link` is where the `active` symlink points.
    Boot { link: Option<Slot> },
    /// A desired state arrived; `disk_free` is measured on the slots' filesystem now.
    Desired { desired: Desired, disk_free: u64 },
    /// The artifact of job `sequence` is in staging with the right size and sha256, or not.
    Downloaded {
        sequence: u64,
        result: Result<(), Failure>,
    },
    /// The artifact is unpacked into the standby slot and its hook ran, or not.
    Installed {
        sequence: u64,
        result: Result<(), Failure>,
    },
    /// The `active` link now points to the new slot.
    Swapped { sequence: u64 },
    /// A probe of the app during a trial or a rollback.
    Probe { sequence: u64, sample: Sample },
    /// The data snapshot (and rollback image) of job `sequence` is complete, or could not be made.
    Snapshotted {
        sequence: u64,
        result: Result<(), String>,
    },
    /// The data snapshot of job `sequence` is back in place and checked, or could not be.
    Restored {
        sequence: u64,
        result: Result<(), String>,
    },
    /// The chain of signed key rotations arrived (`fleet/v1/trust`).
    Trust { chain: TrustChain },
    /// Blue-green: the traffic of job `sequence` now goes where [`Action::SwitchTraffic`]
    /// asked, or the switch failed (why).
    Switched {
        sequence: u64,
        result: Result<(), String>,
    },
}

/// What the driver must do, in order, after persisting the state.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Queue an event (the driver adds device, seq and time, and stores it in the outbox).
    Emit {
        sequence: u64,
        rollout: Option<RolloutId>,
        version: String,
        kind: EventKind,
    },
    /// Publish the reported state.
    Report,
    /// Fetch the job's artifact into staging (resuming), checking size and sha256.
    Download {
        job: Box<Job>,
    },
    /// Wipe `slot`, unpack the staged artifact into it, run its post-install hook.
    Install {
        job: Box<Job>,
        slot: Slot,
    },
    /// Remove staged artifacts.
    DiscardStaging,
    /// Wipe a slot whose content the journal no longer vouches for.
    WipeSlot {
        slot: Slot,
    },
    /// Point the `active` link at `to` atomically (`None`: remove it).
    Swap {
        to: Option<Slot>,
    },
    /// (Re)start the app from the given slot's release; `rollback`: as the previous version
    /// after a failed trial (the container runtime starts its rollback image).
    StartApp {
        slot: Slot,
        rollback: bool,
    },
    StopApp,
    /// Before the swap to job `sequence`: stop the app if `dirs` is not empty, archive `dirs`
    /// (with checksums, free space checked first) into the state directory, replacing any
    /// older snapshot, and keep the running container's image as the rollback image; then
    /// answer `Input::Snapshotted`.
    Snapshot {
        sequence: u64,
        dirs: Vec<String>,
    },
    /// Put job `sequence`'s snapshot back (the app is stopped), check it, answer
    /// `Input::Restored`.
    Restore {
        sequence: u64,
    },
    /// Delete every data snapshot: the update they were for has ended.
    DropSnapshots,
    /// A desired state that waited while busy, to be fed back as `Input::Desired`.
    Redeliver(Box<Desired>),
    SetReportInterval(Duration),
    // Blue-green (issue 9), appended.
    /// Start the release in `slot` as a second instance beside the running one, on the
    /// slot's own port and from the slot's directory (not through the `active` link).
    StartStandby {
        slot: Slot,
    },
    /// Stop the second instance: the new version that failed, or (`drain`) the one the
    /// coordinator rolled back from, which had healthy traffic until the switch back: its
    /// connections finish first (as at `Promote`).
    StopStandby {
        drain: bool,
    },
    /// Send new connections to the instance of `to`; answered by [`Input::Switched`].
    SwitchTraffic {
        sequence: u64,
        to: Slot,
    },
    /// The commit: stop the old instance (once the connections it is serving have finished);
    /// the second instance, running `slot`, becomes the app.
    Promote {
        slot: Slot,
    },
}

fn emit(job: &Job, kind: EventKind) -> Action {
    Action::Emit {
        sequence: job.sequence,
        rollout: job.rollout.clone(),
        version: job.release.version.clone(),
        kind,
    }
}

/// Advances the state machine by one input.
pub fn step(ctx: &Ctx, state: State, input: Input, now: UnixMillis) -> (State, Vec<Action>) {
    let mut s = state;
    let mut actions = Vec::new();
    match input {
        Input::Boot { link } => resolve(ctx, &mut s, link, now, &mut actions),
        Input::Desired { desired, disk_free } => {
            on_desired(ctx, &mut s, desired, disk_free, now, &mut actions)
        }
        Input::Trust { chain } => on_trust(ctx, &mut s, &chain, &mut actions),
        Input::Switched { sequence, result } => {
            on_switched(ctx, &mut s, sequence, result, now, &mut actions)
        }
        Input::Downloaded { sequence, result } => {
            let Phase::Downloading { job } = &s.phase else {
                return (s, actions);
            };
            if job.sequence != sequence {
                return (s, actions);
            }
            let job = job.clone();
            match result {
                Ok(()) => {
                    accept(&mut s, &job);
                    let slot = s.standby_slot();
                    *s.slot_mut(slot) = None;
                    actions.push(emit(
                        &job,
                        EventKind::DownloadFinished {
                            size: artifact_size(ctx, &job),
                        },
                    ));
                    actions.push(emit(&job, EventKind::Verified));
                    actions.push(Action::Install {
                        job: Box::new(job.clone()),
                        slot,
                    });
                    s.phase = Phase::Installing { job, slot };
                    actions.push(Action::Report);
                }
                Err(failure) => finish_failed(&mut s, &job, failure, Vec::new(), now, &mut actions),
            }
        }
        Input::Installed { sequence, result } => {
            let Phase::Installing { job, slot } = &s.phase else {
                return (s, actions);
            };
            if job.sequence != sequence {
                return (s, actions);
            }
            let (job, slot) = (job.clone(), *slot);
            match result {
                Ok(()) => {
                    *s.slot_mut(slot) = Some(SlotContent {
                        installed: Installed {
                            name: job.release.name.clone(),
                            version: job.release.version.clone(),
                            counter: job.release.counter,
                            digest: job.digest,
                            slot,
                        },
                        signed: job.signed.clone(),
                        release: job.release.clone(),
                    });
                    actions.push(emit(&job, EventKind::Installed { slot }));
                    actions.push(Action::DiscardStaging);
                    prepare_update(ctx, &mut s, job, slot, now, &mut actions);
                }
                Err(failure) => finish_failed(
                    &mut s,
                    &job,
                    failure,
                    vec![Action::WipeSlot { slot }, Action::DiscardStaging],
                    now,
                    &mut actions,
                ),
            }
        }
        Input::Swapped { sequence } => {
            let Phase::Swapping {
                job,
                slot,
                previous,
            } = &s.phase
            else {
                return (s, actions);
            };
            if job.sequence != sequence {
                return (s, actions);
            }
            let (job, slot, previous) = (job.clone(), *slot, *previous);
            actions.push(emit(&job, EventKind::Swapped { to: slot }));
            start_trial(
                &mut s,
                job,
                slot,
                previous,
                ctx.trial_attempts,
                now,
                &mut actions,
            );
        }
        Input::Probe { sequence, sample } => {
            on_probe(ctx, &mut s, sequence, sample, now, &mut actions)
        }
        Input::Snapshotted { sequence, result } => {
            let Phase::Snapshotting {
                job,
                slot,
                previous,
            } = &s.phase
            else {
                return (s, actions);
            };
            if job.sequence != sequence {
                return (s, actions);
            }
            let (job, slot, previous) = (job.clone(), *slot, *previous);
            match result {
                Ok(()) => begin_swap(&mut s, job, slot, &mut actions),
                Err(detail) => {
                    // The committed version was stopped for the snapshot: it runs again, on
                    // data nothing has touched; the complete install stays in standby.
                    let mut then: Vec<Action> = previous
                        .map(|active| Action::StartApp {
                            slot: active,
                            rollback: false,
                        })
                        .into_iter()
                        .collect();
                    then.push(Action::DropSnapshots);
                    finish_failed(
                        &mut s,
                        &job,
                        Failure::Snapshot { detail },
                        then,
                        now,
                        &mut actions,
                    );
                }
            }
        }
        Input::Restored { sequence, result } => {
            let Phase::Restoring {
                job,
                from,
                to,
                reason,
            } = &s.phase
            else {
                return (s, actions);
            };
            if job.sequence != sequence {
                return (s, actions);
            }
            let (job, from, to, reason) = (job.clone(), *from, *to, reason.clone());
            let problem = result
                .err()
                .map(|e| format!("the data snapshot was not restored: {e}"));
            swap_back(
                ctx,
                &mut s,
                job,
                from,
                to,
                reason,
                problem,
                now,
                &mut actions,
            );
        }
    }
    (s, actions)
}

/// The data directories snapshotted for `job`: the agent's, then the release's own.
pub fn snapshot_dirs(ctx: &Ctx, job: &Job) -> Vec<String> {
    let mut dirs = ctx.data_dirs.clone();
    for d in &job.release.data_dirs {
        if !dirs.contains(d) {
            dirs.push(d.clone());
        }
    }
    dirs
}

/// Whether the swap to `job` is prepared by a `Snapshotting` step.
fn needs_snapshot(ctx: &Ctx, job: &Job) -> bool {
    job.release.container.is_some() || !snapshot_dirs(ctx, job).is_empty()
}

/// What follows a complete install: blue-green's second instance when the release asks for it
/// and a committed version runs (with nothing running there is nothing to keep warm: the
/// ordinary swap), else the swap.
fn prepare_update(
    ctx: &Ctx,
    s: &mut State,
    job: Job,
    slot: Slot,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    match s.active {
        Some(previous) if is_blue_green(&job) && previous != slot => {
            start_warming(s, job, slot, previous, ctx.trial_attempts, now, actions)
        }
        _ => prepare_swap(ctx, s, job, slot, actions),
    }
}

fn is_blue_green(job: &Job) -> bool {
    job.release.strategy.kind == StrategyKind::BlueGreen
}

/// Blue-green: starts `slot` beside `previous`, which keeps the traffic.
#[allow(clippy::too_many_arguments)]
fn start_warming(
    s: &mut State,
    job: Job,
    slot: Slot,
    previous: Slot,
    attempts_left: u32,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    actions.push(Action::StartStandby { slot });
    actions.push(emit(
        &job,
        EventKind::TrialStarted {
            deadline: job.release.trial.deadline,
        },
    ));
    s.phase = Phase::Warming {
        deadline: now.saturating_add(job.release.trial.deadline),
        job,
        slot,
        previous,
        attempts_left,
        progress: Progress::default(),
    };
    actions.push(Action::Report);
}

/// Blue-green: the traffic goes back to `to`, which kept running, and the `active` link with
/// it; `Input::Switched` then stops `from` and ends the rollback.
fn switch_back(
    s: &mut State,
    job: Job,
    from: Slot,
    to: Slot,
    reason: RollbackReason,
    actions: &mut Vec<Action>,
) {
    actions.push(Action::SwitchTraffic {
        sequence: job.sequence,
        to,
    });
    actions.push(Action::Swap { to: Some(to) });
    s.phase = Phase::SwitchingBack {
        job,
        from,
        to,
        reason,
    };
    actions.push(Action::Report);
}

fn on_switched(
    ctx: &Ctx,
    s: &mut State,
    sequence: u64,
    result: Result<(), String>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    match s.phase.clone() {
        Phase::Switching {
            job,
            slot,
            previous,
            attempts_left,
        } if job.sequence == sequence => match result {
            Ok(()) => {
                actions.push(emit(&job, EventKind::Swapped { to: slot }));
                actions.push(Action::Swap { to: Some(slot) });
                s.phase = Phase::Proving {
                    deadline: now.saturating_add(job.release.trial.deadline),
                    job,
                    slot,
                    previous,
                    attempts_left,
                    progress: Progress::default(),
                };
                actions.push(Action::Report);
            }
            // Design: a failed switch may have moved part of the traffic (a command that
            // died half-way): it is switched back explicitly, like any rollback after the switch.
            Err(detail) => switch_back(
                s,
                job,
                slot,
                previous,
                RollbackReason::SwitchFailed { detail },
                actions,
            ),
        },
        Phase::SwitchingBack {
            job,
            from: _,
            to,
            reason,
        } if job.sequence == sequence => {
            // The new instance stops once the rollback's events are queued.
            let problem = result.err().map(|e| {
                format!("the traffic could not be switched back to the previous version: {e}; it runs, fix the switch (blue_green.command) and point the service at it")
            });
            let stop = vec![Action::StopStandby { drain: false }];
            finish_rollback(ctx, s, &job, Some(to), reason, problem, stop, now, actions);
        }
        Phase::Returning { job, to, .. } if job.sequence == sequence => {
            // The new version's instance stops either way, as after `SwitchingBack`.
            let problem = result.err().map(|e| {
                format!("the traffic could not be switched back to the previous version: {e}; it runs, fix the switch (blue_green.command) and point the service at it")
            });
            let stop = vec![Action::StopStandby { drain: true }];
            finish_return(s, &job, to, problem, stop, now, actions);
        }
        _ => {}
    }
}

/// Blue-green hold: the wave is confirmed (or the coordinator moved on): the old instance
/// stops once its connections have finished, and the active one stays.
fn stop_warm(s: &mut State, actions: &mut Vec<Action>) {
    if s.warm.take().is_some()
        && let Some(slot) = s.active
    {
        actions.push(Action::Promote { slot });
    }
}

/// Blue-green hold: the coordinator asked for the release warm in `to`: the traffic and the
/// `active` link go back to it; `Input::Switched` then ends the update and stops `from`
/// (`finish_return`).
fn switch_to_warm(s: &mut State, job: Job, from: Slot, to: Slot, actions: &mut Vec<Action>) {
    // Design: the phase names both instances from here on, so `warm` is cleared now.
    s.warm = None;
    actions.push(Action::SwitchTraffic {
        sequence: job.sequence,
        to,
    });
    actions.push(Action::Swap { to: Some(to) });
    s.phase = Phase::Returning { job, from, to };
    actions.push(Action::Report);
}

/// Ends `Returning` on `to`: the coordinator's desired release runs, so the update is
/// committed, unless the traffic could not be switched back (`problem`): then it failed as a
/// rollback, with the message the operator needs. `then`, after the events (see
/// [`finish_rollback`]): the new version's instance stops once its connections have finished,
/// or, after an agent restart, `to` starts.
fn finish_return(
    s: &mut State,
    job: &Job,
    to: Slot,
    problem: Option<String>,
    then: Vec<Action>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    s.active = Some(to);
    s.warm = None;
    s.applied_sequence = s.applied_sequence.max(job.sequence);
    match problem {
        None => {
            s.last_outcome = Some(outcome(job, OutcomeKind::Committed, now));
            actions.push(emit(job, EventKind::Swapped { to }));
            actions.push(emit(job, EventKind::Committed { slot: to }));
        }
        Some(detail) => {
            let reason = Failure::Rollback { detail };
            s.last_outcome = Some(outcome(job, OutcomeKind::Failed(reason.clone()), now));
            actions.push(emit(job, EventKind::Failed { reason }));
        }
    }
    // Design: the outcome's events before the stop, as in `finish_rollback` (the hold crash
    // matrix found this).
    actions.extend(then);
    go_idle(s, actions);
}

/// The swap, preceded by the snapshot when the release needs one.
fn prepare_swap(ctx: &Ctx, s: &mut State, job: Job, slot: Slot, actions: &mut Vec<Action>) {
    if !needs_snapshot(ctx, &job) {
        begin_swap(s, job, slot, actions);
        return;
    }
    actions.push(Action::Snapshot {
        sequence: job.sequence,
        dirs: snapshot_dirs(ctx, &job),
    });
    s.phase = Phase::Snapshotting {
        job,
        slot,
        previous: s.active,
    };
    actions.push(Action::Report);
}

fn artifact_size(ctx: &Ctx, job: &Job) -> u64 {
    job.release
        .artifacts
        .get(&ctx.facts.arch)
        .map(|a| a.size)
        .unwrap_or(0)
}

fn begin_swap(s: &mut State, job: Job, slot: Slot, actions: &mut Vec<Action>) {
    let previous = s.active;
    actions.push(Action::Swap { to: Some(slot) });
    s.phase = Phase::Swapping {
        job,
        slot,
        previous,
    };
    actions.push(Action::Report);
}

#[allow(clippy::too_many_arguments)]
fn start_trial(
    s: &mut State,
    job: Job,
    slot: Slot,
    previous: Option<Slot>,
    attempts_left: u32,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    let deadline = now.saturating_add(job.release.trial.deadline);
    actions.push(Action::StartApp {
        slot,
        rollback: false,
    });
    actions.push(emit(
        &job,
        EventKind::TrialStarted {
            deadline: job.release.trial.deadline,
        },
    ));
    s.phase = Phase::Trial {
        job,
        slot,
        previous,
        deadline,
        attempts_left,
        progress: Progress::default(),
    };
    actions.push(Action::Report);
}

fn rules(ctx: &Ctx, release: &Release) -> Rules {
    Rules {
        good_probes: release.trial.good_probes,
        expected_version: release.health.expected_version.clone(),
        crash_loop_restarts: release.thresholds.crash_loop_restarts,
        crash_loop_window: release.thresholds.crash_loop_window,
        failures_allowed: ctx.failures_allowed,
    }
}

fn on_probe(
    ctx: &Ctx,
    s: &mut State,
    sequence: u64,
    sample: Sample,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    match &s.phase {
        Phase::Trial {
            job,
            slot,
            previous,
            deadline,
            attempts_left,
            progress,
        } if job.sequence == sequence => {
            let (job, slot, previous, deadline, attempts_left) =
                (job.clone(), *slot, *previous, *deadline, *attempts_left);
            match trial::judge(
                &rules(ctx, &job.release),
                progress.clone(),
                &sample,
                now,
                deadline,
            ) {
                Verdict::Continue(progress) => {
                    s.phase = Phase::Trial {
                        job,
                        slot,
                        previous,
                        deadline,
                        attempts_left,
                        progress,
                    };
                }
                Verdict::Commit => {
                    s.active = Some(slot);
                    s.applied_sequence = s.applied_sequence.max(job.sequence);
                    s.last_outcome = Some(outcome(&job, OutcomeKind::Committed, now));
                    actions.push(emit(&job, EventKind::Committed { slot }));
                    if needs_snapshot(ctx, &job) {
                        actions.push(Action::DropSnapshots);
                    }
                    go_idle(s, actions);
                }
                Verdict::RollBack(reason) => {
                    roll_back(ctx, s, job, slot, previous, reason, now, actions)
                }
            }
        }
        Phase::Warming {
            job,
            slot,
            previous,
            deadline,
            attempts_left,
            progress,
        } if job.sequence == sequence => {
            let (job, slot, previous, deadline, attempts_left) =
                (job.clone(), *slot, *previous, *deadline, *attempts_left);
            match trial::judge(
                &rules(ctx, &job.release),
                progress.clone(),
                &sample,
                now,
                deadline,
            ) {
                Verdict::Continue(progress) => {
                    s.phase = Phase::Warming {
                        job,
                        slot,
                        previous,
                        deadline,
                        attempts_left,
                        progress,
                    };
                }
                Verdict::Commit => {
                    actions.push(Action::SwitchTraffic {
                        sequence: job.sequence,
                        to: slot,
                    });
                    s.phase = Phase::Switching {
                        job,
                        slot,
                        previous,
                        attempts_left,
                    };
                    actions.push(Action::Report);
                }
                Verdict::RollBack(reason) => {
                    // The new version never had traffic: stopping it (after the events) is the
                    // whole rollback.
                    let stop = vec![Action::StopStandby { drain: false }];
                    finish_rollback(
                        ctx,
                        s,
                        &job,
                        Some(previous),
                        reason,
                        None,
                        stop,
                        now,
                        actions,
                    );
                }
            }
        }
        Phase::Proving {
            job,
            slot,
            previous,
            deadline,
            attempts_left,
            progress,
        } if job.sequence == sequence => {
            let (job, slot, previous, deadline, attempts_left) =
                (job.clone(), *slot, *previous, *deadline, *attempts_left);
            match trial::judge(
                &rules(ctx, &job.release),
                progress.clone(),
                &sample,
                now,
                deadline,
            ) {
                Verdict::Continue(progress) => {
                    s.phase = Phase::Proving {
                        job,
                        slot,
                        previous,
                        deadline,
                        attempts_left,
                        progress,
                    };
                }
                Verdict::Commit => {
                    s.active = Some(slot);
                    s.applied_sequence = s.applied_sequence.max(job.sequence);
                    s.last_outcome = Some(outcome(&job, OutcomeKind::Committed, now));
                    actions.push(emit(&job, EventKind::Committed { slot }));
                    if job.hold {
                        // The coordinator may still roll the wave back: the old instance
                        // stays as it is, without traffic (see `State::warm`).
                        s.warm = Some(previous);
                    } else {
                        // After the event: draining can take `blue_green.drain_timeout` (see
                        // `finish_rollback`).
                        actions.push(Action::Promote { slot });
                    }
                    go_idle(s, actions);
                }
                Verdict::RollBack(reason) => switch_back(s, job, slot, previous, reason, actions),
            }
        }
        Phase::RollingBack {
            job,
            to,
            reason,
            deadline,
            restore_problem,
            ..
        } if job.sequence == sequence => {
            let (job, to, reason, deadline) = (job.clone(), *to, reason.clone(), *deadline);
            let data_problem = restore_problem.clone();
            let expected = to
                .and_then(|t| s.slot(t))
                .map(|c| c.release.health.expected_version.clone());
            let restored_ok = matches!(
                (&sample.health, &expected),
                (Some(HealthAnswer::Answered { status, version }), Some(v))
                    if version == v && matches!(status, fleet_proto::device::AppStatus::Healthy | fleet_proto::device::AppStatus::Degraded)
            );
            if restored_ok {
                finish_rollback(ctx, s, &job, to, reason, data_problem, vec![], now, actions);
            } else if now >= deadline {
                let mut detail = format!(
                    "no healthy answer from the previous version before the deadline (last: {:?})",
                    sample.health
                );
                if let Some(p) = data_problem {
                    detail = format!("{p}; {detail}");
                }
                finish_rollback(ctx, s, &job, to, reason, Some(detail), vec![], now, actions);
            }
        }
        _ => {}
    }
}

/// Starts a rollback: through `Restoring` when the data was snapshotted (the new version
/// stops, the data goes back, then the previous version starts), else straight to the swap back.
#[allow(clippy::too_many_arguments)]
fn roll_back(
    ctx: &Ctx,
    s: &mut State,
    job: Job,
    from: Slot,
    to: Option<Slot>,
    reason: RollbackReason,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    if snapshot_dirs(ctx, &job).is_empty() {
        swap_back(ctx, s, job, from, to, reason, None, now, actions);
        return;
    }
    actions.push(Action::StopApp);
    actions.push(Action::Restore {
        sequence: job.sequence,
    });
    s.phase = Phase::Restoring {
        job,
        from,
        to,
        reason,
    };
    actions.push(Action::Report);
}

/// Points `active` back at `to` and starts the previous version (or stops the app when there
/// is none); `RollingBack` then waits for it to answer healthy.
#[allow(clippy::too_many_arguments)]
fn swap_back(
    ctx: &Ctx,
    s: &mut State,
    job: Job,
    from: Slot,
    to: Option<Slot>,
    reason: RollbackReason,
    restore_problem: Option<String>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    let to = to.filter(|t| s.slot(*t).is_some());
    actions.push(Action::Swap { to });
    let Some(slot) = to else {
        // Nothing to go back to: the rollback is complete once the app is stopped, which
        // happens after its events.
        let stop = vec![Action::StopApp];
        finish_rollback(
            ctx,
            s,
            &job,
            None,
            reason,
            restore_problem,
            stop,
            now,
            actions,
        );
        return;
    };
    actions.push(Action::StartApp {
        slot,
        rollback: true,
    });
    s.phase = Phase::RollingBack {
        job,
        from,
        to,
        reason,
        deadline: now.saturating_add(ctx.restore_timeout),
        restore_problem,
    };
    actions.push(Action::Report);
}

/// Ends the update as rolled back to `to`. `then`: the instance to stop (or the previous
/// version to start again after an agent restart) once the outcome's events are queued.
///
/// Design: an update's last step journals how it ended before any of its actions run, and
/// stopping an instance can take `app.stop_grace` or `blue_green.drain_timeout` (starting one,
/// the switch command's `command_timeout`): an agent killed meanwhile comes back idle and would
/// never emit the events, so they go first (the crash matrices kill it there).
#[allow(clippy::too_many_arguments)]
fn finish_rollback(
    ctx: &Ctx,
    s: &mut State,
    job: &Job,
    to: Option<Slot>,
    reason: RollbackReason,
    restore_problem: Option<String>,
    then: Vec<Action>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    s.active = to;
    let restored = to
        .and_then(|t| s.slot(t))
        .map(|c| c.installed.version.clone());
    remember_failed(s, job);
    s.applied_sequence = s.applied_sequence.max(job.sequence);
    s.last_outcome = Some(outcome(job, OutcomeKind::RolledBack(reason.clone()), now));
    actions.push(emit(job, EventKind::RolledBack { reason, restored }));
    let keep_snapshot = restore_problem.is_some() && !snapshot_dirs(ctx, job).is_empty();
    if let Some(detail) = restore_problem {
        actions.push(emit(
            job,
            EventKind::Failed {
                reason: Failure::Rollback { detail },
            },
        ));
    }
    actions.extend(then);
    // Design: a snapshot that could not be put back (or whose version did not come back) is
    // left for a human until the next update replaces it; a good rollback drops it.
    if needs_snapshot(ctx, job) && !keep_snapshot {
        actions.push(Action::DropSnapshots);
    }
    go_idle(s, actions);
}

/// The release passed admission and its artifact checked out: it becomes the highest
/// accepted if its counter is. Design: not at admission, so a release whose artifact turns out
/// wrong cannot lock out the releases below it.
fn accept(s: &mut State, job: &Job) {
    if s.highest
        .as_ref()
        .is_none_or(|h| job.release.counter > h.counter)
    {
        s.highest = Some(Accepted {
            counter: job.release.counter,
            digest: job.digest,
            rollback_to: job.release.rollback_to.clone(),
        });
    }
}

fn remember_failed(s: &mut State, job: &Job) {
    s.failed.retain(|f| f.digest != job.digest);
    s.failed.push(FailedRelease {
        digest: job.digest,
        version: job.release.version.clone(),
        retry: job.retry,
    });
    // Bounded: the oldest memories go first.
    if s.failed.len() > 32 {
        s.failed.remove(0);
    }
}

fn outcome(job: &Job, result: OutcomeKind, now: UnixMillis) -> Outcome {
    Outcome {
        rollout: job.rollout.clone(),
        sequence: job.sequence,
        version: job.release.version.clone(),
        result,
        at: now,
    }
}

/// Ends the update as failed; `then`: what the failure leaves to clean up or restart, done
/// after the event is queued (see [`finish_rollback`]).
fn finish_failed(
    s: &mut State,
    job: &Job,
    failure: Failure,
    then: Vec<Action>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    s.applied_sequence = s.applied_sequence.max(job.sequence);
    s.last_outcome = Some(outcome(job, OutcomeKind::Failed(failure.clone()), now));
    actions.push(emit(job, EventKind::Failed { reason: failure }));
    actions.extend(then);
    go_idle(s, actions);
}

fn go_idle(s: &mut State, actions: &mut Vec<Action>) {
    s.phase = Phase::Idle;
    actions.push(Action::Report);
    if let Some(next) = s.pending.take()
        && next.sequence > s.applied_sequence
    {
        actions.push(Action::Redeliver(Box::new(next)));
    }
}

fn on_desired(
    ctx: &Ctx,
    s: &mut State,
    desired: Desired,
    disk_free: u64,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    if desired.device != ctx.device || desired.sequence <= s.applied_sequence {
        return;
    }
    if s.report_interval != Some(desired.report_interval) && !desired.report_interval.is_zero() {
        s.report_interval = Some(desired.report_interval);
        actions.push(Action::SetReportInterval(desired.report_interval));
    }
    if let Some(job) = s.phase.job() {
        if job.sequence != desired.sequence
            && s.pending
                .as_ref()
                .is_none_or(|p| p.sequence < desired.sequence)
        {
            s.pending = Some(desired);
        }
        return;
    }
    let sequence = desired.sequence;
    let Some(signed) = desired.release else {
        // Keep what is installed; a warm previous version is no longer asked for.
        stop_warm(s, actions);
        s.applied_sequence = sequence;
        actions.push(Action::Report);
        return;
    };
    let digest = signed.digest();
    // Blue-green hold: only the release running now with `hold` again keeps the previous
    // version warm, and only its own release can go back to it (`Returning`, admitted below
    // like any release); anything else stops it before it is handled as from `Idle` (a
    // refusal: once its event is queued, see `finish_rollback`).
    let holds = |c: Option<&SlotContent>| c.is_some_and(|c| c.installed.digest == digest);
    let returning = s.warm.is_some_and(|w| holds(s.slot(w)));
    let held_again = desired.hold && holds(s.active.and_then(|a| s.slot(a)));
    let refuse = |s: &mut State, actions: &mut Vec<Action>, version: String, reason: Refusal| {
        s.applied_sequence = sequence;
        s.last_outcome = Some(Outcome {
            rollout: desired.rollout.clone(),
            sequence,
            version: version.clone(),
            result: OutcomeKind::Refused(reason.clone()),
            at: now,
        });
        actions.push(Action::Emit {
            sequence,
            rollout: desired.rollout.clone(),
            version,
            kind: EventKind::Refused { reason },
        });
        // A warm version the device may not go back to is of no use.
        stop_warm(s, actions);
        actions.push(Action::Report);
    };
    // Already running it: nothing to do (but stop a warm version unless held again).
    if s.active
        .and_then(|a| s.slot(a))
        .is_some_and(|c| c.installed.digest == digest)
    {
        if !held_again {
            stop_warm(s, actions);
        }
        s.applied_sequence = sequence;
        actions.push(Action::Report);
        return;
    }
    let pinned = s.pinned(ctx);
    let trust = Trust {
        keys: &pinned.keys,
        // The later of the clock and the floor: see `State::time_floor`.
        now: trusted_now(now, s.time_floor),
        skew: ctx.skew,
        highest: s.highest.as_ref(),
        device: &ctx.device,
        facts: &ctx.facts,
    };
    let release = match admit(&signed, &trust) {
        Ok(r) => {
            // Signed by a pinned key: its signing time is a lower bound on the real time.
            s.raise_floor(r.not_before);
            r
        }
        Err(reason) => {
            // The version is unknown when the signature did not check; say so.
            let version = signed
                .open(&pinned.keys)
                .map(|r| r.version)
                .unwrap_or_else(|_| "(unverified)".into());
            refuse(s, actions, version, reason);
            return;
        }
    };
    if let Some(f) = s.failed.iter().find(|f| f.digest == digest)
        && desired.retry <= f.retry
    {
        let version = release.version.clone();
        refuse(
            s,
            actions,
            version.clone(),
            Refusal::PreviouslyFailed { version },
        );
        return;
    }
    if release.strategy.kind == StrategyKind::BlueGreen {
        let why = ctx.blue_green_refusal.clone().or_else(|| {
            let dirs = snapshot_dirs(ctx, &Job {
                sequence,
                rollout: None,
                retry: 0,
                signed: signed.clone(),
                release: release.clone(),
                digest,
                hold: false,
            });
            (!dirs.is_empty()).then(|| format!(
                "blue-green runs the new version beside the old one on the same data, so the data directories ({}) cannot be snapshotted for a rollback; ship this release as canary-rolling",
                dirs.join(", ")
            ))
        });
        if let Some(why) = why {
            refuse(
                s,
                actions,
                release.version.clone(),
                Refusal::StrategyUnsupported { why },
            );
            return;
        }
    }
    let standby = s.standby_slot();
    let in_standby = s
        .slot(standby)
        .is_some_and(|c| c.installed.digest == digest);
    if !in_standby {
        let size = release
            .artifacts
            .get(&ctx.facts.arch)
            .map(|a| a.size)
            .unwrap_or(0);
        let needed = size.saturating_add(release.resources.disk_bytes);
        if needed > disk_free {
            refuse(
                s,
                actions,
                release.version.clone(),
                Refusal::InsufficientDisk {
                    needed,
                    available: disk_free,
                },
            );
            return;
        }
    }
    if !returning {
        stop_warm(s, actions);
    }
    let job = Job {
        sequence,
        rollout: desired.rollout.clone(),
        retry: desired.retry,
        signed,
        release,
        digest,
        hold: desired.hold,
    };
    if in_standby {
        accept(s, &job);
        actions.push(emit(&job, EventKind::Verified));
        match s.active {
            Some(from) if s.warm == Some(standby) => switch_to_warm(s, job, from, standby, actions),
            _ => prepare_update(ctx, s, job, standby, now, actions),
        }
    } else {
        actions.push(Action::Download {
            job: Box::new(job.clone()),
        });
        s.phase = Phase::Downloading { job };
        actions.push(Action::Report);
    }
}

/// Applies the rotations of `chain` this device does not have yet, in epoch order, each
/// checked against the keys the previous one left pinned (`fleet_proto::trust::follow`).
/// Nothing about an update in flight changes: a release already admitted goes on; the next
/// one is checked against the new keys.
fn on_trust(ctx: &Ctx, s: &mut State, chain: &TrustChain, actions: &mut Vec<Action>) {
    let (applied, refused) = follow(chain, &s.pinned(ctx));
    let event = |kind: EventKind, s: &State| Action::Emit {
        sequence: s.applied_sequence,
        rollout: None,
        version: "release keys".into(),
        kind,
    };
    for a in applied {
        s.pinned = Some(PinnedKeys {
            epoch: a.pinned.epoch,
            keys: a.pinned.keys.iter().map(|k| Hex(k.to_bytes())).collect(),
        });
        s.raise_floor(a.rotation.issued_at);
        s.rotation_refused = None;
        actions.push(event(
            EventKind::KeysRotated {
                epoch: a.pinned.epoch,
                keys: a.pinned.keys.iter().map(key_id).collect(),
            },
            s,
        ));
    }
    if let Some(reason) = refused {
        let epoch = match &reason {
            fleet_proto::trust::RotationRefusal::Stale { epoch, .. }
            | fleet_proto::trust::RotationRefusal::MissingSignature { epoch, .. }
            | fleet_proto::trust::RotationRefusal::NoProofOfPossession { epoch, .. }
            | fleet_proto::trust::RotationRefusal::BadSignature { epoch, .. }
            | fleet_proto::trust::RotationRefusal::BadKeySet { epoch, .. } => *epoch,
            fleet_proto::trust::RotationRefusal::Malformed { .. } => u64::MAX,
        };
        if s.rotation_refused != Some(epoch) {
            s.rotation_refused = Some(epoch);
            actions.push(event(EventKind::RotationRefused { reason }, s));
        }
    }
}

/// Resolves the journal at start. The table (also in README.md):
///
/// | journal phase | resolution |
/// |---|---|
/// | `Idle` | point `active` at the journal's active slot if it differs; start the app |
/// | `Downloading` | resume the download (staging is kept; size + sha256 re-checked) |
/// | `Installing` | half-finished install: wipe the standby slot, download again (a complete staged file is only re-hashed) |
/// | `Snapshotting` | the install is complete: stop the app, take the snapshot again from the start (and tag the rollback image), then swap |
/// | `Swapping` | the install is complete: (re)do the swap, whether or not the rename happened |
/// | `Trial` with attempts left | resume the trial with one attempt less and a fresh deadline |
/// | `Trial`, no attempts left | roll back, reason `AgentRestarted` (through `Restoring` when there is a snapshot) |
/// | `Restoring` | stop the app, restore the snapshot again from the start and check it, then swap back |
/// | `RollingBack` | redo the swap back and restart the previous version; verify it again |
/// | `Idle` (also) | drop any data snapshot left over |
/// | `Warming`, `Switching` or `Proving`, attempts left | both instances died with the agent: link back to the previous version, start it (it takes the traffic), then warm the new one up again beside it with one attempt less |
/// | `Warming`, `Switching` or `Proving`, no attempts left | link back to the previous version and start it; rolled back, reason `AgentRestarted` |
/// | `SwitchingBack` | link back to the previous version and start it (it takes the traffic); the rollback ends with its reason |
/// | `Idle` with a warm previous version (blue-green `hold`) | both instances died with the agent: as `Idle` (the committed version starts), nothing is warm any more; a rollback the coordinator asks for later takes the ordinary path |
/// | `Returning` | both instances died with the agent, whether or not the traffic and the link had moved: link to the release the coordinator asked for (the warm one) and start it (it takes the traffic); committed |
/// | `Idle` at the end of a return or of a hold, the other instance not stopped yet | both instances died with the agent: as `Idle`, only the release the coordinator asked for starts |
/// | `Idle` at the end of a blue-green commit, switch back or warm-up rollback, the old (commit) or new (rollback) instance not stopped yet | both instances died with the agent: as `Idle`, only the version the outcome names starts; the outcome's events were queued before the stop |
///
/// In every case the highest accepted counter is kept as it is.
fn resolve(
    ctx: &Ctx,
    s: &mut State,
    link: Option<Slot>,
    now: UnixMillis,
    actions: &mut Vec<Action>,
) {
    // A slot the journal does not vouch for is wiped: never run something half-written.
    for slot in [Slot::A, Slot::B] {
        if s.slot(slot).is_none() {
            actions.push(Action::WipeSlot { slot });
        }
    }
    match s.phase.clone() {
        Phase::Idle => {
            // Both blue-green instances died with the agent: only the committed one comes back.
            s.warm = None;
            if link != s.active {
                actions.push(Action::Swap { to: s.active });
            }
            // A crash between the journal's Idle and the snapshot's removal leaves one.
            actions.push(Action::DropSnapshots);
            if let Some(slot) = s.active {
                actions.push(Action::StartApp {
                    slot,
                    rollback: false,
                });
            }
            actions.push(Action::Report);
            if let Some(next) = s.pending.take() {
                actions.push(Action::Redeliver(Box::new(next)));
            }
        }
        Phase::Downloading { job } => {
            start_current(s, link, actions);
            actions.push(Action::Download { job: Box::new(job) });
            actions.push(Action::Report);
        }
        Phase::Installing { job, slot } => {
            start_current(s, link, actions);
            *s.slot_mut(slot) = None;
            actions.push(Action::Download {
                job: Box::new(job.clone()),
            });
            s.phase = Phase::Downloading { job };
            actions.push(Action::Report);
        }
        Phase::Snapshotting { job, slot, .. } => {
            // The link was never moved in this phase; the snapshot is taken again whole.
            if link != s.active {
                actions.push(Action::Swap { to: s.active });
            }
            prepare_swap(ctx, s, job, slot, actions);
        }
        Phase::Restoring {
            job,
            from,
            to,
            reason,
        } => {
            roll_back(ctx, s, job, from, to, reason, now, actions);
        }
        Phase::Swapping {
            job,
            slot,
            previous,
        } => {
            actions.push(Action::Swap { to: Some(slot) });
            s.phase = Phase::Swapping {
                job,
                slot,
                previous,
            };
            actions.push(Action::Report);
        }
        Phase::Trial {
            job,
            slot,
            previous,
            attempts_left,
            ..
        } => {
            if attempts_left > 1 {
                if link != Some(slot) {
                    actions.push(Action::Swap { to: Some(slot) });
                }
                start_trial(s, job, slot, previous, attempts_left - 1, now, actions);
            } else {
                roll_back(
                    ctx,
                    s,
                    job,
                    slot,
                    previous,
                    RollbackReason::AgentRestarted,
                    now,
                    actions,
                );
            }
        }
        Phase::RollingBack {
            job,
            from,
            to,
            reason,
            restore_problem,
            ..
        } => {
            // The data (if any) is already back: only the swap back and the start are redone.
            swap_back(ctx, s, job, from, to, reason, restore_problem, now, actions);
        }
        Phase::Warming {
            job,
            slot,
            previous,
            attempts_left,
            ..
        }
        | Phase::Switching {
            job,
            slot,
            previous,
            attempts_left,
        }
        | Phase::Proving {
            job,
            slot,
            previous,
            attempts_left,
            ..
        } => {
            // Design: the process runtime's instances die with the agent, so nothing runs and
            // the traffic goes nowhere: the committed version comes back first (starting the
            // app points the traffic at it), and the new one must prove itself again beside it
            // before it gets any traffic.
            let restart = restart_previous(s, link, previous);
            if attempts_left > 1 {
                actions.extend(restart);
                start_warming(s, job, slot, previous, attempts_left - 1, now, actions);
            } else {
                finish_rollback(
                    ctx,
                    s,
                    &job,
                    Some(previous),
                    RollbackReason::AgentRestarted,
                    None,
                    restart,
                    now,
                    actions,
                );
            }
        }
        Phase::SwitchingBack {
            job, to, reason, ..
        } => {
            let restart = restart_previous(s, link, to);
            finish_rollback(ctx, s, &job, Some(to), reason, None, restart, now, actions);
        }
        Phase::Returning { job, to, .. } => {
            // The coordinator asked for `to`; both instances died with the agent: it starts on
            // its own, which points the traffic at it.
            let restart = restart_previous(s, link, to);
            finish_return(s, &job, to, None, restart, now, actions);
        }
    }
}

/// Blue-green after a restart: the `active` link back on `previous` and its app started.
fn restart_previous(s: &State, link: Option<Slot>, previous: Slot) -> Vec<Action> {
    let mut actions = Vec::new();
    if link != Some(previous) {
        actions.push(Action::Swap { to: Some(previous) });
    }
    if s.slot(previous).is_some() {
        actions.push(Action::StartApp {
            slot: previous,
            rollback: false,
        });
    }
    actions
}

/// Before an update reaches its swap the committed version keeps running.
fn start_current(s: &State, link: Option<Slot>, actions: &mut Vec<Action>) {
    if link != s.active {
        actions.push(Action::Swap { to: s.active });
    }
    if let Some(slot) = s.active {
        actions.push(Action::StartApp {
            slot,
            rollback: false,
        });
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod trust_tests;
