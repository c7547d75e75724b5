//! Property tests: the engine's safety invariants over random fleets and random report streams.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use fleet_coordinator::engine::{
    self, Action, DevState, Event, OperatorCommand, ReportedOutcome, Rollout, Settings,
};
use fleet_coordinator::model::DeviceInfo;
use fleet_coordinator::testkit::{self, Knobs, T0};
use fleet_proto::device::{OutcomeKind, RollbackReason};
use fleet_proto::rollout::{RolloutStatus, Verdict};
use fleet_proto::{DeviceId, UnixMillis};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Heartbeat {
        dev: usize,
        err: f64,
        restarts: u32,
        mem: f64,
        p95: f64,
    },
    Online {
        dev: usize,
        online: bool,
    },
    Committed {
        dev: usize,
    },
    RolledBack {
        dev: usize,
    },
    Advance {
        secs: u64,
    },
    Approve,
    Pause,
    Resume,
    Quarantine {
        dev: usize,
    },
    /// Every online device heartbeats healthily, devices installing commit, 10 s pass.
    Round,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => (0..64usize, prop_oneof![12 => Just(0.0), 1 => 0.0..1.0f64], prop_oneof![30 => Just(0u32), 1 => 0..6u32], prop_oneof![30 => Just(40.0), 1 => 0.0..100.0f64], prop_oneof![30 => Just(100.0), 1 => 50.0..500.0f64])
            .prop_map(|(dev, err, restarts, mem, p95)| Op::Heartbeat { dev, err, restarts, mem, p95 }),
        1 => (0..64usize, any::<bool>()).prop_map(|(dev, online)| Op::Online { dev, online }),
        6 => (0..64usize).prop_map(|dev| Op::Committed { dev }),
        1 => (0..64usize, 0..4u8).prop_filter_map("rare", |(dev, k)| (k == 0).then_some(Op::RolledBack { dev })),
        3 => (1..400u64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Approve),
        1 => Just(Op::Pause),
        1 => Just(Op::Resume),
        1 => (0..64usize).prop_map(|dev| Op::Quarantine { dev }),
        12 => Just(Op::Round),
    ]
}

fn fleet_strategy() -> impl Strategy<Value = Vec<(u8, u8, bool, bool)>> {
    // (type, region, online, spof) per device.
    prop::collection::vec(
        (
            0..3u8,
            0..3u8,
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.1),
        ),
        8..64,
    )
}

fn build(
    spec: &[(u8, u8, bool, bool)],
    strategy: &'static str,
) -> Option<(Rollout, Vec<Action>, BTreeMap<DeviceId, DeviceInfo>)> {
    let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
    let k = Knobs {
        rollback_to: Some((1, "1.0".into())),
        canary_soak: "2m",
        error_rate_pts: 30.0,
        wave_soak: "2m",
        hardware: vec!["t0", "t1", "t2"],
        strategy,
        ..Knobs::default()
    };
    let (r2, s2) = testkit::signed("app", "2.0", 2, &k);
    let mut devices = BTreeMap::new();
    for (i, (t, r, online, spof)) in spec.iter().enumerate() {
        let mut d = testkit::device(
            &format!("d{i:02}"),
            &format!("t{t}"),
            &format!("r{r}"),
            Some(testkit::installed(&r1, &s1)),
        );
        d.online = *online;
        if *spof {
            d.facts.as_mut().unwrap().tags.push("spof".into());
        }
        devices.insert(d.id.clone(), d);
    }
    let v = testkit::validate(&devices, &s2, T0);
    if !v.ok() {
        return None; // e.g. a type whose only online devices are spof: refused, nothing to test
    }
    let settings = Settings {
        report_interval: Duration::from_secs(10),
        silent_after: Duration::from_secs(30),
        install_timeout: Duration::from_secs(120),
        ..Settings::default()
    };
    let (r, a) = testkit::start(&devices, &r2, &s2, settings, T0);
    Some((r, a, devices))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Blue-green's desired states also hold the old instance until the device's wave is
    /// confirmed (invariants 5 to 7).
    #[test]
    fn safety_invariants(spec in fleet_strategy(), ops in prop::collection::vec(op(), 1..800), blue_green in any::<bool>()) {
        let strategy = if blue_green { "blue-green" } else { "canary-rolling" };
        let Some((mut r, first, devices)) = build(&spec, strategy) else { return Ok(()) };
        let ids: Vec<DeviceId> = devices.keys().cloned().collect();
        let digest = r.digest;
        let mut now = T0;
        let mut approved = false;
        let mut quarantined: BTreeSet<DeviceId> = BTreeSet::new();
        // Each device's latest desired state: (release, hold).
        let mut last: BTreeMap<DeviceId, (Option<fleet_proto::hex::Sha256>, bool)> = BTreeMap::new();
        let mut check_desires = |actions: &[Action], r: &Rollout, approved: bool, q: &BTreeSet<DeviceId>| -> Result<(), TestCaseError> {
            for (i, a) in actions.iter().enumerate() {
                let Action::Desire { device, release, hold, .. } = a else { continue };
                let before = last.insert(device.clone(), (*release, *hold));
                // A later desire in the same step replaces this one before anyone sees it.
                let replaced = actions[i + 1..].iter().any(|b| matches!(b, Action::Desire { device: d, .. } if d == device));
                // Invariant 6: only blue-green holds, only its own release, only while the
                // device's wave is not confirmed and the rollout goes on.
                if *hold && !replaced {
                    prop_assert!(blue_green, "{} held under {}", device, strategy);
                    prop_assert_eq!(*release, Some(digest), "{} held on another release", device);
                    prop_assert!(!r.is_final(), "{} held by a {} rollout", device, r.status);
                    let wave = r.devices[device].wave as usize;
                    prop_assert!(!r.wave_confirmed(wave), "{} held in confirmed wave {}", device, wave);
                }
                if *release != Some(digest) { continue; }
                // Invariant 1: nothing outside the canary before approval.
                if !approved {
                    prop_assert_eq!(r.devices[device].wave, 0, "release sent to {} before approval", device);
                }
                // Invariant 5: quarantined devices never receive the release (blue-green: one
                // that has it under hold is only told to stop its old instance).
                let lifts_hold = !*hold && before == Some((Some(digest), true));
                prop_assert!(!q.contains(device) || lifts_hold, "release sent to quarantined {}", device);
            }
            // Invariant 7: a rollout that ended leaves no device that has the release holding
            // an old instance (one that failed its trial rolled back on its own: it holds none).
            if r.is_final() {
                for (id, a) in &r.devices {
                    let holds = last.get(id).is_some_and(|(_, h)| *h);
                    prop_assert!(
                        !(holds && matches!(a.state, DevState::Sent | DevState::Deployed | DevState::Reverted)),
                        "{} ({:?}) still held after the rollout ended {}", id, a.state, r.status
                    );
                }
            }
            Ok(())
        };
        check_desires(&first, &r, approved, &quarantined)?;
        for op in ops {
            let evs: Vec<Event> = if let Op::Round = op {
                now = now.saturating_add(Duration::from_secs(10));
                let mut v = vec![Event::Tick];
                for id in &ids {
                    let a = &r.devices[id];
                    if !a.online { continue; }
                    if a.state == DevState::Sent {
                        v.push(Event::Reported { device: id.clone(), active: Some(digest), outcome: Some(ReportedOutcome { rollout: Some(r.id.clone()), sequence: a.release_sequence, kind: OutcomeKind::Committed }) });
                    }
                    let version = if matches!(a.state, DevState::Deployed | DevState::Sent) { "2.0" } else { "1.0" };
                    v.push(Event::Heartbeat { device: id.clone(), sample: testkit::healthy(version, 0.0) });
                }
                v
            } else { vec![match op {
                Op::Heartbeat { dev, err, restarts, mem, p95 } => {
                    let id = ids[dev % ids.len()].clone();
                    let a = &r.devices[&id];
                    let version = if matches!(a.state, DevState::Deployed) { "2.0" } else { "1.0" };
                    let mut s = testkit::healthy(version, err);
                    s.restarts_in_window = restarts;
                    s.memory_pct = mem;
                    s.p95_ms = Some(p95);
                    Event::Heartbeat { device: id, sample: s }
                }
                Op::Online { dev, online } => Event::Online { device: ids[dev % ids.len()].clone(), online },
                Op::Committed { dev } | Op::RolledBack { dev } => {
                    let id = ids[dev % ids.len()].clone();
                    let a = &r.devices[&id];
                    let kind = if matches!(op, Op::Committed { .. }) {
                        OutcomeKind::Committed
                    } else {
                        OutcomeKind::RolledBack(RollbackReason::CrashLoop { restarts: 3, window: Duration::from_secs(60) })
                    };
                    Event::Reported {
                        device: id,
                        active: if matches!(kind, OutcomeKind::Committed) { Some(digest) } else { a.previous },
                        outcome: Some(ReportedOutcome { rollout: Some(r.id.clone()), sequence: a.release_sequence.max(1), kind }),
                    }
                }
                Op::Advance { secs } => {
                    now = now.saturating_add(Duration::from_secs(secs));
                    Event::Tick
                }
                Op::Approve => Event::Operator { operator: "p".into(), command: OperatorCommand::Approve },
                Op::Pause => Event::Operator { operator: "p".into(), command: OperatorCommand::Pause },
                Op::Resume => Event::Operator { operator: "p".into(), command: OperatorCommand::Resume },
                Op::Quarantine { dev } => {
                    let id = ids[dev % ids.len()].clone();
                    quarantined.insert(id.clone());
                    Event::Quarantined { device: id }
                }
                Op::Round => unreachable!("handled above"),
            }]};
            for ev in evs {
            let before = r.clone_for_test();
            let was_awaiting = r.status == RolloutStatus::AwaitingApproval;
            let actions = engine::step_in_place(&mut r, &ev, now);
            if was_awaiting && matches!(ev, Event::Operator { command: OperatorCommand::Approve, .. })
                && !actions.iter().any(|a| matches!(a, Action::Refuse { .. }))
            {
                approved = true;
            }
            for a in &actions {
                if let Action::Quarantine { device, .. } = a {
                    quarantined.insert(device.clone());
                }
            }
            check_desires(&actions, &r, approved, &quarantined)?;

            // Invariant 2: a wave starts only after the previous gate passed and its soak
            // elapsed — or after an operator approved past a gate that stayed inconclusive.
            let operator_approved = matches!(ev, Event::Operator { command: OperatorCommand::Approve, .. });
            for (i, w) in r.waves.iter().enumerate().skip(1) {
                if w.started_at.is_some() && before.waves[i].started_at.is_none() {
                    let prev = &before.waves[i - 1];
                    prop_assert!(prev.soak_until.is_some_and(|t| t <= now), "wave {} started before the soak of wave {} elapsed", i, i - 1);
                    let verdict = r.waves[i - 1].verdict.clone();
                    prop_assert!(
                        verdict == Some(Verdict::Pass) || (operator_approved && verdict == Some(Verdict::Inconclusive)),
                        "wave {} started without a pass ({:?})", i, verdict
                    );
                }
            }

            // Invariant 3: a hard per-device breach rolls back in the same step.
            if let Event::Heartbeat { device, sample } = &ev {
                let a = &before.devices[device];
                let live = !before.is_final() && before.status != RolloutStatus::Completed;
                let runs = sample.version.as_deref() == Some("2.0")
                    && matches!(a.state, DevState::Deployed | DevState::Sent);
                let breach = sample.restarts_in_window >= before.release.thresholds.crash_loop_restarts
                    || sample.memory_pct > before.release.thresholds.memory_pct;
                if live && runs && breach {
                    prop_assert!(actions.iter().any(|x| matches!(x, Action::Fired { .. })), "breach without a trigger: {:?}", sample);
                    prop_assert!(actions.iter().any(|x| matches!(x, Action::Desire { release, .. } if *release != Some(digest))), "breach without rollback actions");
                }
            }
            // Any trigger that fired rolled something back in the same step (unless nothing
            // had the release).
            if actions.iter().any(|x| matches!(x, Action::Fired { .. })) {
                let had = before.devices.values().any(|a| matches!(a.state, DevState::Sent | DevState::Deployed));
                if had {
                    let rolled = actions.iter().any(|x| matches!(x, Action::Desire { release, .. } if *release != Some(digest)));
                    prop_assert!(rolled, "a trigger fired without rollback actions");
                }
            }

            // Invariant 4: going offline (or silence) never makes a device failed.
            for (id, a) in &r.devices {
                if a.state == DevState::Failed && before.devices[id].state != DevState::Failed {
                    let about_it = match &ev {
                        Event::Heartbeat { device, .. } | Event::Reported { device, .. } => device == id,
                        _ => false,
                    };
                    prop_assert!(about_it, "{} failed on {:?}", id, ev);
                }
            }
            let _ = UnixMillis(0);
            }
        }
    }
}
