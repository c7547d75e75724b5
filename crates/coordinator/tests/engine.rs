//! Table-driven engine tests in virtual time: every phase transition and every trigger.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_coordinator::baseline::Sample;
use fleet_coordinator::engine::{
    Action, DevState, Event, OperatorCommand, ReportedOutcome, Rollout, Settings,
};
use fleet_coordinator::gate::Trigger;
use fleet_coordinator::model::DeviceInfo;
use fleet_coordinator::testkit::{self, Behaviour, Knobs, T0, VirtualFleet};
use fleet_proto::DeviceId;
use fleet_proto::device::{AppStatus, OutcomeKind, RollbackReason};
use fleet_proto::hex::Sha256;
use fleet_proto::rollout::{FailurePattern, Phase, RolloutStatus, Verdict};

fn settings() -> Settings {
    Settings {
        report_interval: Duration::from_secs(10),
        fast_report_interval: Duration::from_secs(1),
        silent_after: Duration::from_secs(30),
        install_timeout: Duration::from_secs(300),
        ..Settings::default()
    }
}

/// A 40-device fleet on release 1.0 and a virtual fleet rolling out 2.0.
fn setup(n: usize, k: Knobs, offline: &[usize]) -> (VirtualFleet, BTreeMap<DeviceId, DeviceInfo>) {
    let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
    let k = Knobs {
        rollback_to: Some((1, "1.0".into())),
        ..k
    };
    let (r2, s2) = testkit::signed("app", "2.0", 2, &k);
    let mut devices = testkit::fleet(n, Some(testkit::installed(&r1, &s1)));
    for i in offline {
        let id = DeviceId::new(format!("dev-{i:06}")).unwrap();
        devices.get_mut(&id).unwrap().online = false;
    }
    let (r, actions) = testkit::start(&devices, &r2, &s2, settings(), T0);
    let mut f = VirtualFleet::new(&devices, r, actions, T0);
    f.heartbeat = Duration::from_secs(10);
    f.tick = Duration::from_secs(5);
    f.install_delay = Duration::from_secs(20);
    (f, devices)
}

fn fired(f: &VirtualFleet) -> Vec<Trigger> {
    f.log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Fired { trigger, .. } => Some(trigger.clone()),
            _ => None,
        })
        .collect()
}

fn transitions(f: &VirtualFleet) -> Vec<String> {
    f.log
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Transition { to, .. } => Some(to.clone()),
            _ => None,
        })
        .collect()
}

fn wave_of(r: &Rollout, wave: u32) -> Vec<DeviceId> {
    r.devices
        .iter()
        .filter(|(_, a)| a.wave == wave)
        .map(|(d, _)| d.clone())
        .collect()
}

/// A case: a fleet, a behaviour for some devices, and what must happen.
struct Case {
    name: &'static str,
    knobs: Knobs,
    /// Behaviour of the canary devices (index 0) or of wave-1 devices.
    canary: Option<Behaviour>,
    wave1: Option<Behaviour>,
    auto_approve: bool,
    expect_status: RolloutStatus,
    expect_phase: Phase,
    expect_trigger: Option<Trigger>,
}

fn check(c: Case) {
    let (mut f, _) = setup(40, c.knobs, &[]);
    f.auto_approve = c.auto_approve;
    if let Some(b) = c.canary {
        for d in wave_of(&f.rollout, 0) {
            f.behaviour.insert(d, b);
        }
    }
    if let Some(b) = c.wave1 {
        for d in wave_of(&f.rollout, 1) {
            f.behaviour.insert(d, b);
        }
    }
    let status = c.expect_status;
    let phase = c.expect_phase;
    let ok = f.run_until(Duration::from_secs(6 * 3600), |r| {
        r.status == status && r.phase == phase
    });
    assert!(
        ok,
        "{}: expected {phase}/{status}, got {}/{} ({}); transitions {:?}; fired {:?}",
        c.name,
        f.rollout.phase,
        f.rollout.status,
        f.rollout.last_action,
        transitions(&f),
        fired(&f)
    );
    let fired = fired(&f);
    match &c.expect_trigger {
        Some(t) => assert_eq!(fired.first(), Some(t), "{}: fired {fired:?}", c.name),
        None => assert!(fired.is_empty(), "{}: fired {fired:?}", c.name),
    }
    // Every trigger firing comes with rollback desires in the same step (same instant).
    for (at, a) in &f.log {
        if let Action::Fired { .. } = a {
            let rolled = f.log.iter().any(|(t, b)| {
                t == at
                    && matches!(b, Action::Desire { release, .. } if *release != Some(f.rollout.digest))
            });
            let nothing_to_roll_back = f
                .rollout
                .devices
                .values()
                .all(|a| a.state != DevState::Reverted);
            assert!(
                rolled || nothing_to_roll_back,
                "{}: trigger without rollback",
                c.name
            );
        }
    }
}

#[test]
fn phase_transitions_and_triggers() {
    let cases = vec![
        Case {
            name: "manual approval waits after the canary",
            knobs: Knobs::default(),
            canary: None,
            wave1: None,
            auto_approve: false,
            expect_status: RolloutStatus::AwaitingApproval,
            expect_phase: Phase::Verify,
            expect_trigger: None,
        },
        Case {
            name: "a good release completes",
            knobs: Knobs::default(),
            canary: None,
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::Completed,
            expect_phase: Phase::Confirm,
            expect_trigger: None,
        },
        Case {
            name: "auto approval goes straight on",
            knobs: Knobs {
                approval: "auto",
                ..Knobs::default()
            },
            canary: None,
            wave1: None,
            auto_approve: false,
            expect_status: RolloutStatus::Completed,
            expect_phase: Phase::Confirm,
            expect_trigger: None,
        },
        Case {
            name: "rolling-update also starts with a canary and completes",
            knobs: Knobs {
                strategy: "rolling-update",
                ..Knobs::default()
            },
            canary: None,
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::Completed,
            expect_phase: Phase::Confirm,
            expect_trigger: None,
        },
        Case {
            name: "error rate in the canary rolls it back",
            knobs: Knobs::default(),
            canary: Some(Behaviour::Errors(0.5)),
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::Halted,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::ErrorRate),
        },
        Case {
            name: "error rate in wave 1 rolls wave 1 back",
            knobs: Knobs::default(),
            canary: None,
            wave1: Some(Behaviour::Errors(0.4)),
            auto_approve: true,
            expect_status: RolloutStatus::Halted,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::ErrorRate),
        },
        Case {
            name: "a failed trial rolls the wave back",
            knobs: Knobs::default(),
            canary: Some(Behaviour::FailsTrial),
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::Halted,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::TrialFailed),
        },
        Case {
            name: "devices silent after installing trip the unreachable trigger",
            knobs: Knobs::default(),
            canary: None,
            wave1: Some(Behaviour::Bricks),
            auto_approve: true,
            expect_status: RolloutStatus::Halted,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::Unreachable),
        },
        Case {
            name: "fleet-wide error rate rolls back every deployed device",
            knobs: Knobs {
                error_rate_pts: 60.0,
                ..Knobs::default()
            },
            canary: Some(Behaviour::Errors(0.3)),
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::RolledBack,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::FleetErrorRate),
        },
        Case {
            name: "a worsening trend extends the soak, then rolls back",
            knobs: Knobs::default(),
            canary: Some(Behaviour::Errors(0.045)),
            wave1: None,
            auto_approve: true,
            expect_status: RolloutStatus::Halted,
            expect_phase: Phase::Prepare,
            expect_trigger: Some(Trigger::WorseningTrend),
        },
    ];
    for c in cases {
        check(c);
    }
}

fn sample_with(f: impl FnOnce(&mut Sample)) -> Sample {
    let mut s = testkit::healthy("2.0", 0.01);
    f(&mut s);
    s
}

/// Per-device hard triggers and latency, driven directly.
#[test]
fn per_device_triggers_quarantine_and_roll_back_at_once() {
    type Mutate = fn(&mut Sample);
    let table: [(&str, Mutate, Trigger); 3] = [
        (
            "crash loop",
            |s| s.restarts_in_window = 3,
            Trigger::CrashLoop,
        ),
        ("memory", |s| s.memory_pct = 95.0, Trigger::Memory),
        (
            "p95 latency",
            |s| s.p95_ms = Some(400.0),
            Trigger::P95Latency,
        ),
    ];
    for (name, mutate, trigger) in table {
        let (mut f, _) = setup(40, Knobs::default(), &[]);
        // Let the canary install.
        f.run_until(Duration::from_secs(60), |r| {
            r.waves[0].deployed == r.waves[0].sent
        });
        let canary = wave_of(&f.rollout, 0);
        let before = f.log.len();
        for _ in 0..3 {
            for d in &canary {
                f.step(Event::Heartbeat {
                    device: d.clone(),
                    sample: sample_with(mutate),
                });
            }
        }
        let new: Vec<&Action> = f.log[before..].iter().map(|(_, a)| a).collect();
        assert!(
            new.iter()
                .any(|a| matches!(a, Action::Fired { trigger: t, .. } if *t == trigger)),
            "{name}: {new:#?}"
        );
        assert!(
            new.iter().any(|a| matches!(a, Action::Desire { release, .. } if *release != Some(f.rollout.digest))),
            "{name}: no rollback"
        );
        if trigger != Trigger::P95Latency {
            assert!(
                new.iter().any(|a| matches!(a, Action::Quarantine { .. })),
                "{name}"
            );
        }
        assert_eq!(f.rollout.status, RolloutStatus::Halted, "{name}");
    }
}

#[test]
fn inconclusive_extends_the_soak_then_holds_for_an_operator() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    let canary = wave_of(&f.rollout, 0);
    f.run_until(Duration::from_secs(60), |r| {
        r.waves[0].deployed == r.waves[0].sent
    });
    for d in &canary {
        f.offline.insert(d.clone(), true);
    }
    for d in &canary {
        f.offline.insert(d.clone(), false);
        f.behaviour.insert(d.clone(), Behaviour::Good);
    }
    // Ask for far more samples than a soak can bring: healthy, but never provably so.
    f.rollout.settings.gate.min_samples = 1_000_000;
    f.auto_approve = false;
    let held = f.run_until(Duration::from_secs(4 * 3600), |r| {
        r.status == RolloutStatus::AwaitingApproval
    });
    assert!(held, "{:?}", f.rollout.status);
    assert_eq!(f.rollout.phase, Phase::Canary);
    assert!(
        fired(&f).is_empty(),
        "no evidence of harm, no rollback: {:?}",
        fired(&f)
    );
    assert_eq!(
        f.rollout.waves[0].extensions,
        f.rollout.settings.gate.max_extensions
    );
    assert_eq!(f.rollout.waves[0].verdict, Some(Verdict::Inconclusive));
    assert!(
        f.rollout.last_action.contains("holding for an operator"),
        "{}",
        f.rollout.last_action
    );
    assert!(
        f.rollout.next_action.contains("fleetctl rollout approve"),
        "{}",
        f.rollout.next_action
    );
    assert_eq!(f.rollout.blockers.len(), 1, "{:?}", f.rollout.blockers);
    // Held, not forgotten: wave 1 waits for a person.
    let waited = f.run_until(Duration::from_secs(3600), |r| {
        r.waves[1].started_at.is_some()
    });
    assert!(!waited, "wave 1 started without an operator");
    let now = f.now;
    let actions = fleet_coordinator::engine::step_in_place(
        &mut f.rollout,
        &Event::Operator {
            operator: "alice".into(),
            command: OperatorCommand::Approve,
        },
        now,
    );
    assert!(
        actions.iter().any(|a| matches!(a, Action::Audit { outcome, .. } if outcome.contains("approved past the inconclusive canary gate"))),
        "{actions:?}"
    );
    assert!(f.rollout.waves[1].started_at.is_some());
}

#[test]
fn pause_holds_the_next_wave_and_resume_continues() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    f.auto_approve = false;
    f.run_until(Duration::from_secs(3600), |r| {
        r.status == RolloutStatus::AwaitingApproval
    });
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Approve,
    });
    assert_eq!(f.rollout.phase, Phase::Rollout);
    assert_eq!(f.rollout.current, 1);
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Pause,
    });
    assert_eq!(f.rollout.status, RolloutStatus::Paused);
    // Long past the wave soak: still wave 1.
    f.run_until(Duration::from_secs(3600), |_| false);
    assert_eq!(f.rollout.current, 1);
    assert_eq!(f.rollout.status, RolloutStatus::Paused);
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Resume,
    });
    assert_eq!(f.rollout.current, 2, "{}", f.rollout.last_action);
    // Approving now is refused with a message.
    let before = f.log.len();
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Approve,
    });
    assert!(
        matches!(&f.log[before].1, Action::Refuse { message, .. } if message.contains("not awaiting approval"))
    );
}

#[test]
fn abort_keeps_devices_and_rollback_reverts_them() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    f.run_until(Duration::from_secs(3600), |r| {
        r.current == 1 && r.waves[1].deployed > 0
    });
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Abort,
    });
    assert_eq!(f.rollout.status, RolloutStatus::Aborted);
    let deployed = f.rollout.deployed();
    assert!(deployed > 0);
    let before = f.log.len();
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Abort,
    });
    assert!(matches!(&f.log[before].1, Action::Refuse { .. }));
    let before = f.log.len();
    f.step(Event::Operator {
        operator: "ana".into(),
        command: OperatorCommand::Rollback,
    });
    assert_eq!(f.rollout.status, RolloutStatus::RolledBack);
    let reverts = f.log[before..]
        .iter()
        .filter(|(_, a)| matches!(a, Action::Desire { release, .. } if *release != Some(f.rollout.digest)))
        .count();
    assert!(reverts as u32 >= deployed, "{reverts} < {deployed}");
}

#[test]
fn offline_devices_are_skipped_then_caught_up_after_confirm() {
    // Devices 1 and 2 are offline from the start.
    let (mut f, devices) = setup(40, Knobs::default(), &[1, 2]);
    let off: Vec<DeviceId> = devices
        .values()
        .filter(|d| !d.online)
        .map(|d| d.id.clone())
        .collect();
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.status
        == RolloutStatus::Completed));
    assert_eq!(f.rollout.skipped(), 2);
    assert_eq!(f.rollout.quarantined(), 0, "offline is not failed");
    for d in &off {
        assert_eq!(f.rollout.devices[d].state, DevState::Skipped);
        f.offline.insert(d.clone(), false);
        f.step(Event::Online {
            device: d.clone(),
            online: true,
        });
    }
    f.run_until(Duration::from_secs(120), |_| false);
    for d in &off {
        assert_eq!(f.rollout.devices[d].state, DevState::Deployed);
        assert!(f.rollout.devices[d].catch_up);
    }
}

#[test]
fn failure_pattern_names_the_device_type() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    for (d, a) in &f.rollout.devices.clone() {
        if a.device_type == "jetson" && a.wave == 1 {
            f.behaviour.insert(d.clone(), Behaviour::Errors(0.6));
        }
    }
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.is_final()));
    assert_eq!(f.rollout.status, RolloutStatus::Halted);
    assert_eq!(
        f.rollout.failure_pattern,
        Some(FailurePattern::Compatibility {
            device_type: "jetson".into()
        })
    );
    let report = fleet_coordinator::report::build(&f.rollout, f.now);
    assert!(
        report.markdown.contains("compatibility problem"),
        "{}",
        report.markdown
    );
    assert!(
        report.markdown.contains("| wave 1 |"),
        "{}",
        report.markdown
    );
}

#[test]
fn all_devices_failing_is_an_artifact_problem() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    for d in wave_of(&f.rollout, 0) {
        f.behaviour.insert(d, Behaviour::FailsTrial);
    }
    assert!(f.run_until(Duration::from_secs(3600), |r| r.is_final()));
    assert_eq!(f.rollout.failure_pattern, Some(FailurePattern::Artifact));
}

#[test]
fn state_block_counts() {
    let (mut f, _) = setup(40, Knobs::default(), &[3]);
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.status
        == RolloutStatus::Completed));
    let s = f.rollout.state_block(f.now);
    assert_eq!(s.fleet_total, 40);
    assert_eq!(s.deployed_count, 39);
    assert_eq!(s.skipped_count, 1);
    assert_eq!(s.quarantined_count, 0);
    assert!(s.healthy_count >= 38, "{s:?}");
    assert!(s.render_block().contains("status: completed"));
}

#[test]
fn a_worsening_trend_asks_the_wave_for_fast_reports_first() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    for d in wave_of(&f.rollout, 0) {
        f.behaviour.insert(d, Behaviour::Errors(0.045));
    }
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.is_final()));
    let fast_at = f.log.iter().position(|(_, a)| {
        matches!(a, Action::Desire { report_interval, .. } if *report_interval == Duration::from_secs(1))
    });
    let fired_at = f
        .log
        .iter()
        .position(|(_, a)| matches!(a, Action::Fired { .. }));
    assert!(
        fast_at.is_some() && fast_at < fired_at,
        "{fast_at:?} {fired_at:?}"
    );
    assert!(f.rollout.waves[0].watching);
}

/// A failed trial of a wave-1 device, reported by its agent.
fn trial_failed(f: &VirtualFleet, device: &DeviceId) -> Event {
    Event::Reported {
        device: device.clone(),
        active: None,
        outcome: Some(ReportedOutcome {
            rollout: Some(f.rollout.id.clone()),
            sequence: f.rollout.devices[device].release_sequence,
            kind: OutcomeKind::RolledBack(RollbackReason::CrashLoop {
                restarts: 3,
                window: Duration::from_secs(300),
            }),
        }),
    }
}

#[test]
fn an_app_not_answering_during_its_trial_is_left_to_the_watchdog() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    f.auto_approve = true;
    // Right after the canary was sent: every canary device is in its trial.
    assert!(f.run_until(Duration::from_secs(60), |r| r.waves[0].sent > 0));
    for d in wave_of(&f.rollout, 0) {
        // A slow start (or the gap between a crash and the restart): the agent runs 2.0 and
        // its health endpoint does not answer yet. Its watchdog decides; the wave does not.
        let mut sample = testkit::healthy("2.0", 0.0);
        sample.status = AppStatus::Unreachable;
        f.step(Event::Heartbeat { device: d, sample });
    }
    assert!(fired(&f).is_empty(), "fired {:?}", fired(&f));
    assert!(
        f.run_until(Duration::from_secs(6 * 3600), |r| r.status
            == RolloutStatus::Completed),
        "{}",
        f.rollout.last_action
    );
}

#[test]
fn a_wave_halted_by_its_first_failure_is_judged_with_the_waves_before_it() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    f.auto_approve = true;
    // Right after wave 1 was sent, before any of its devices has an outcome.
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.current == 1));
    let jetsons: Vec<DeviceId> = f
        .rollout
        .devices
        .iter()
        .filter(|(_, a)| a.wave == 1 && a.device_type == "jetson")
        .map(|(d, _)| d.clone())
        .collect();
    assert!(jetsons.len() >= 2, "{jetsons:?}");
    f.step(trial_failed(&f, &jetsons[0]));
    assert_eq!(f.rollout.status, RolloutStatus::Halted);
    // The canary ran 2.0 fine on rpi4 as well as jetson: not a bad artifact.
    assert_eq!(
        f.rollout.failure_pattern,
        Some(FailurePattern::Compatibility {
            device_type: "jetson".into()
        })
    );
}

#[test]
fn a_trial_that_fails_after_its_wave_halted_still_quarantines_the_device() {
    let (mut f, _) = setup(40, Knobs::default(), &[]);
    f.auto_approve = true;
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.current == 1));
    let jetsons: Vec<DeviceId> = f
        .rollout
        .devices
        .iter()
        .filter(|(_, a)| a.wave == 1 && a.device_type == "jetson")
        .map(|(d, _)| d.clone())
        .collect();
    f.step(trial_failed(&f, &jetsons[0]));
    assert_eq!(f.rollout.status, RolloutStatus::Halted);
    // Another jetson of the halted wave was still in its trial when the wave was rolled
    // back; its watchdog's verdict comes afterwards. It failed the release too, so it is
    // quarantined and named like the first.
    f.step(trial_failed(&f, &jetsons[1]));
    assert_eq!(f.rollout.devices[&jetsons[1]].state, DevState::Failed);
    assert!(f.rollout.failed_devices.contains(&jetsons[1]));
    assert!(
        f.log.iter().any(|(_, a)| matches!(
            a,
            Action::Quarantine { device, .. } if *device == jetsons[1]
        )),
        "no quarantine for {}",
        jetsons[1]
    );
}

// Blue-green (issue 9): the old instance stays warm until the device's wave is confirmed.

fn blue_green() -> Knobs {
    Knobs {
        strategy: "blue-green",
        ..Knobs::default()
    }
}

/// The latest desired state the rollout published to `device`: (release, sequence, hold).
fn last_desire(f: &VirtualFleet, device: &DeviceId) -> Option<(Option<Sha256>, u64, bool)> {
    f.log.iter().rev().find_map(|(_, a)| match a {
        Action::Desire {
            device: d,
            release,
            sequence,
            hold,
            ..
        } if d == device => Some((*release, *sequence, *hold)),
        _ => None,
    })
}

/// Devices whose latest desired state asks them to keep the old instance warm.
fn held(f: &VirtualFleet) -> Vec<DeviceId> {
    f.rollout
        .devices
        .keys()
        .filter(|d| last_desire(f, d).is_some_and(|(_, _, hold)| hold))
        .cloned()
        .collect()
}

/// The desires in `actions` (device → (release, sequence, hold)).
fn desires(actions: &[Action]) -> BTreeMap<DeviceId, (Option<Sha256>, u64, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Desire {
                device,
                release,
                sequence,
                hold,
                ..
            } => Some((device.clone(), (*release, *sequence, *hold))),
            _ => None,
        })
        .collect()
}

fn audits(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Audit { outcome, .. } => Some(outcome.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn blue_green_holds_each_wave_until_its_own_gate_passes() {
    let (mut f, _) = setup(40, blue_green(), &[]);
    f.auto_approve = true;
    let digest = f.rollout.digest;
    let canary = wave_of(&f.rollout, 0);
    let wave1 = wave_of(&f.rollout, 1);
    // The canary was sent the release with hold; nobody else was sent anything.
    for d in &canary {
        assert_eq!(
            last_desire(&f, d).map(|(r, _, h)| (r, h)),
            Some((Some(digest), true))
        );
    }
    assert_eq!(held(&f), canary);
    // Committed and soaking: the state block says who keeps an old instance warm, until when.
    assert!(f.run_until(Duration::from_secs(120), |r| {
        r.waves[0].deployed == r.waves[0].sent
    }));
    let s = f.rollout.state_block(f.now);
    assert!(
        s.next_action.ends_with(&format!(
            "old instances kept warm on {} devices until canary is confirmed",
            canary.len()
        )),
        "{}",
        s.next_action
    );
    let sent_seq: BTreeMap<DeviceId, u64> = canary
        .iter()
        .map(|d| (d.clone(), last_desire(&f, d).unwrap().1))
        .collect();

    // The canary gate passes: the canary, and only the canary, is sent the release again,
    // without hold and with a higher sequence, at the same instant.
    let before = f.log.len();
    assert!(f.run_until(Duration::from_secs(3600), |r| r.waves[0].confirmed));
    let at = f.now;
    let step: Vec<Action> = f.log[before..]
        .iter()
        .filter(|(t, _)| *t == at)
        .map(|(_, a)| a.clone())
        .collect();
    let released: BTreeMap<DeviceId, (Option<Sha256>, u64, bool)> = desires(&step)
        .into_iter()
        .filter(|(d, _)| !wave1.contains(d))
        .collect();
    assert_eq!(
        released.keys().cloned().collect::<Vec<_>>(),
        canary,
        "{step:#?}"
    );
    for (d, (release, seq, hold)) in &released {
        assert_eq!(*release, Some(digest), "{d}");
        assert!(!hold, "{d}");
        assert!(*seq > sent_seq[d], "{d}: {seq} <= {}", sent_seq[d]);
    }
    assert!(
        audits(&step).contains(&format!(
            "canary confirmed: old instances released on {} devices",
            canary.len()
        )),
        "{:?}",
        audits(&step)
    );
    // Wave 1 (approved in the same step) is sent the release with hold: its own gate decides.
    assert_eq!(f.rollout.current, 1);
    assert_eq!(held(&f), wave1);
    assert!(f.run_until(Duration::from_secs(120), |r| {
        r.waves[1].deployed == r.waves[1].sent
    }));
    let s = f.rollout.state_block(f.now);
    assert!(
        s.next_action.ends_with(&format!(
            "old instances kept warm on {} devices until wave 1 is confirmed",
            wave1.len()
        )),
        "{}",
        s.next_action
    );
    assert!(f.run_until(Duration::from_secs(3600), |r| r.waves[1].confirmed));
    assert!(
        held(&f).iter().all(|d| !wave1.contains(d)),
        "{:?}",
        held(&f)
    );
    assert!(held(&f).iter().all(|d| f.rollout.devices[d].wave == 2));

    // Completed: nothing is held, nothing is said to be warm.
    assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.status
        == RolloutStatus::Completed));
    assert!(held(&f).is_empty(), "{:?}", held(&f));
    assert!(f.rollout.devices.values().all(|a| !a.held));
    let s = f.rollout.state_block(f.now);
    assert!(!s.next_action.contains("warm"), "{}", s.next_action);
    for w in &f.rollout.waves {
        assert!(w.confirmed, "{}", w.name);
    }
}

#[test]
fn a_halted_blue_green_wave_is_sent_its_previous_release_without_hold() {
    for (name, canary_b, wave1_b, halted_wave) in [
        ("canary", Some(Behaviour::Errors(0.5)), None, 0u32),
        ("wave 1", None, Some(Behaviour::Errors(0.4)), 1),
    ] {
        let (mut f, devices) = setup(40, blue_green(), &[]);
        for (w, b) in [(0, canary_b), (1, wave1_b)] {
            if let Some(b) = b {
                for d in wave_of(&f.rollout, w) {
                    f.behaviour.insert(d, b);
                }
            }
        }
        assert!(
            f.run_until(Duration::from_secs(6 * 3600), |r| r.is_final()),
            "{name}"
        );
        assert_eq!(f.rollout.status, RolloutStatus::Halted, "{name}");
        assert_eq!(f.rollout.current as u32, halted_wave, "{name}");
        for d in wave_of(&f.rollout, halted_wave) {
            let previous = devices[&d].active.as_ref().map(|a| a.digest);
            assert_eq!(
                last_desire(&f, &d).map(|(r, _, h)| (r, h)),
                Some((previous, false)),
                "{name}: {d}"
            );
            // It was held until then: the rollback is a switch back to the warm instance.
            assert!(
                f.log.iter().any(
                    |(_, a)| matches!(a, Action::Desire { device, hold: true, .. } if *device == d)
                ),
                "{name}: {d}"
            );
        }
        assert!(held(&f).is_empty(), "{name}: {:?}", held(&f));
    }
}

#[test]
fn approving_past_an_inconclusive_blue_green_gate_releases_the_wave() {
    let (mut f, _) = setup(40, blue_green(), &[]);
    let digest = f.rollout.digest;
    let canary = wave_of(&f.rollout, 0);
    f.rollout.settings.gate.min_samples = 1_000_000;
    f.auto_approve = false;
    assert!(f.run_until(Duration::from_secs(4 * 3600), |r| {
        r.status == RolloutStatus::AwaitingApproval
    }));
    assert_eq!(f.rollout.waves[0].verdict, Some(Verdict::Inconclusive));
    // Held for an operator: the canary still keeps its old instances.
    assert_eq!(held(&f), canary);
    assert!(!f.rollout.waves[0].confirmed);
    let before = f.log.len();
    f.step(Event::Operator {
        operator: "alice".into(),
        command: OperatorCommand::Approve,
    });
    let step: Vec<Action> = f.log[before..].iter().map(|(_, a)| a.clone()).collect();
    let d = desires(&step);
    for c in &canary {
        assert_eq!(
            d.get(c).map(|(r, _, h)| (*r, *h)),
            Some((Some(digest), false))
        );
    }
    assert!(
        audits(&step)
            .iter()
            .any(|a| a.starts_with("canary confirmed: old instances released")),
        "{:?}",
        audits(&step)
    );
    assert_eq!(held(&f), wave_of(&f.rollout, 1));
}

#[test]
fn every_end_of_a_blue_green_rollout_leaves_nothing_held() {
    type Finish = fn(&mut VirtualFleet);
    fn operator(f: &mut VirtualFleet, command: OperatorCommand) {
        f.step(Event::Operator {
            operator: "ana".into(),
            command,
        });
    }
    let table: [(&str, Finish, RolloutStatus); 4] = [
        (
            "abort",
            |f| operator(f, OperatorCommand::Abort),
            RolloutStatus::Aborted,
        ),
        (
            "pause then abort",
            |f| {
                operator(f, OperatorCommand::Pause);
                operator(f, OperatorCommand::Abort);
            },
            RolloutStatus::Aborted,
        ),
        (
            "rollback",
            |f| operator(f, OperatorCommand::Rollback),
            RolloutStatus::RolledBack,
        ),
        (
            "fleet trigger",
            |f| {
                for d in f.rollout.devices.keys().cloned().collect::<Vec<_>>() {
                    if f.rollout.devices[&d].state == DevState::Deployed {
                        f.step(Event::Heartbeat {
                            device: d,
                            sample: testkit::healthy("2.0", 0.9),
                        });
                    }
                    if f.rollout.is_final() {
                        break;
                    }
                }
            },
            RolloutStatus::RolledBack,
        ),
    ];
    for (name, finish, status) in table {
        let (mut f, _) = setup(
            40,
            Knobs {
                // The fleet trigger before any wave trigger.
                error_rate_pts: if name == "fleet trigger" { 95.0 } else { 5.0 },
                ..blue_green()
            },
            &[],
        );
        f.auto_approve = true;
        // Wave 1 committed and soaking: held, the canary released.
        assert!(f.run_until(Duration::from_secs(6 * 3600), |r| {
            r.current == 1 && r.waves[1].deployed > 0 && r.waves[1].installing == 0
        }));
        assert_eq!(held(&f), wave_of(&f.rollout, 1), "{name}");
        let before = f.log.len();
        finish(&mut f);
        assert_eq!(
            f.rollout.status, status,
            "{name}: {}",
            f.rollout.last_action
        );
        assert!(held(&f).is_empty(), "{name}: {:?}", held(&f));
        assert!(f.rollout.devices.values().all(|a| !a.held), "{name}");
        if status == RolloutStatus::Aborted {
            // Aborted: the devices keep the release, and stop the old instance.
            let step: Vec<Action> = f.log[before..].iter().map(|(_, a)| a.clone()).collect();
            for d in wave_of(&f.rollout, 1) {
                assert_eq!(
                    desires(&step).get(&d).map(|(r, _, h)| (*r, *h)),
                    Some((Some(f.rollout.digest), false)),
                    "{name}: {d}"
                );
            }
            assert!(
                audits(&step)
                    .iter()
                    .any(|a| a.contains("old instances released on")),
                "{name}: {:?}",
                audits(&step)
            );
        }
    }
}

#[test]
fn canary_rolling_and_rolling_update_never_hold() {
    for strategy in ["canary-rolling", "rolling-update"] {
        let (mut f, _) = setup(
            40,
            Knobs {
                strategy,
                ..Knobs::default()
            },
            &[],
        );
        f.auto_approve = true;
        assert!(f.run_until(Duration::from_secs(6 * 3600), |r| r.status
            == RolloutStatus::Completed));
        assert!(
            !f.log
                .iter()
                .any(|(_, a)| matches!(a, Action::Desire { hold: true, .. })),
            "{strategy}"
        );
        assert!(
            !f.log.iter().any(|(_, a)| matches!(a, Action::Audit { outcome, .. } if outcome.contains("old instances"))),
            "{strategy}"
        );
    }
}
