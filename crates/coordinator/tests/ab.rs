//! Strategy `ab` in the pure engine: two arms, an observation window, a promotion.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use fleet_coordinator::ab;
use fleet_coordinator::engine::{
    self, Action, DevState, Event, OperatorCommand, ReportedOutcome, Rollout, Settings,
};
use fleet_coordinator::model::DeviceInfo;
use fleet_coordinator::report;
use fleet_coordinator::testkit::{self, Knobs, T0};
use fleet_proto::device::{OutcomeKind, RollbackReason};
use fleet_proto::hex::Sha256;
use fleet_proto::release::Release;
use fleet_proto::rollout::{Arm, Phase, RolloutStatus};
use fleet_proto::{DeviceId, RolloutId, UnixMillis};

/// A rollout in virtual time, driven by hand: devices install what they are sent at once.
struct Run {
    r: Rollout,
    now: UnixMillis,
    /// What each device runs.
    running: HashMap<DeviceId, String>,
    versions: HashMap<Sha256, String>,
    /// Devices whose trial fails on this version.
    fails_on: Option<String>,
    error_rate: HashMap<String, f64>,
    refusals: Vec<String>,
}

impl Run {
    fn take(&mut self, actions: Vec<Action>) {
        let mut outcomes = Vec::new();
        for a in actions {
            match a {
                Action::Desire {
                    device,
                    release: Some(d),
                    sequence,
                    hold,
                    ..
                } => {
                    // Only blue-green keeps an old instance warm.
                    assert!(!hold, "an A/B rollout held {device}");
                    let v = self.versions[&d].clone();
                    let ok = self.fails_on.as_deref() != Some(v.as_str());
                    if ok {
                        self.running.insert(device.clone(), v);
                    }
                    outcomes.push((device, d, sequence, ok));
                }
                Action::Refuse { message, .. } => self.refusals.push(message),
                _ => {}
            }
        }
        for (device, d, sequence, ok) in outcomes {
            let ev = Event::Reported {
                device,
                active: ok.then_some(d),
                outcome: Some(ReportedOutcome {
                    rollout: Some(self.r.id.clone()),
                    sequence,
                    kind: if ok {
                        OutcomeKind::Committed
                    } else {
                        OutcomeKind::RolledBack(RollbackReason::CrashAtStart { exit_code: Some(1) })
                    },
                }),
            };
            self.step(ev);
        }
    }

    fn step(&mut self, ev: Event) {
        let actions = engine::step_in_place(&mut self.r, &ev, self.now);
        self.take(actions);
    }

    /// Every device reports every 10 s for `d`, with a tick after each round.
    fn run_for(&mut self, d: Duration) {
        let end = self.now.saturating_add(d);
        while self.now < end {
            self.now = self.now.saturating_add(Duration::from_secs(10));
            let ids: Vec<DeviceId> = self.running.keys().cloned().collect();
            for id in ids {
                let v = self.running[&id].clone();
                let e = self.error_rate.get(&v).copied().unwrap_or(0.01);
                self.step(Event::Heartbeat {
                    device: id,
                    sample: testkit::healthy(&v, e),
                });
            }
            self.step(Event::Tick);
        }
    }

    fn operator(&mut self, command: OperatorCommand) {
        self.step(Event::Operator {
            operator: "alice".into(),
            command,
        });
    }
}

fn release(version: &str, counter: u64) -> (Release, fleet_proto::SignedRelease) {
    let k = Knobs {
        strategy: "ab",
        rollback_to: Some((1, "1.0".into())),
        waves: vec![50, 100],
        ..Knobs::default()
    };
    testkit::signed("app", version, counter, &k)
}

/// 40 devices on 1.0; A = 2.0 and B = 2.1 with the given counters.
fn start(a_counter: u64, b_counter: u64) -> (Run, ab::AbPlan) {
    start_with(a_counter, b_counter, None)
}

fn start_with(a_counter: u64, b_counter: u64, fails_on: Option<&str>) -> (Run, ab::AbPlan) {
    let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
    let devices: BTreeMap<DeviceId, DeviceInfo> =
        testkit::fleet(40, Some(testkit::installed(&r1, &s1)));
    let (ra, sa) = release("2.0", a_counter);
    let (rb, sb) = release("2.1", b_counter);
    let keys = [testkit::signing_key().verifying_key()];
    let held = |_: &str, _: u64, _: &str| true;
    let ctx = fleet_coordinator::checklist::CheckContext {
        now: T0,
        fresh_heartbeat: Duration::from_secs(3600),
        held: &held,
    };
    let infos: Vec<&DeviceInfo> = devices.values().collect();
    let v = ab::check((&sa, &sa.open(&keys)), (&sb, &sb.open(&keys)), &infos, &ctx);
    assert!(v.ok(), "checklist failed: {:#?}", v.failed());
    let targets: BTreeMap<DeviceId, &DeviceInfo> =
        devices.iter().map(|(k, v)| (k.clone(), v)).collect();
    let settings = Settings {
        install_timeout: Duration::from_secs(300),
        ..Settings::default()
    };
    let (r, actions) = engine::create_ab(
        RolloutId::new("r-1").unwrap(),
        (sa.digest(), ra),
        (sb.digest(), rb),
        "alice",
        &v.plan,
        &targets,
        settings,
        T0,
    );
    let mut run = Run {
        r,
        now: T0,
        running: devices
            .keys()
            .map(|d| (d.clone(), "1.0".to_owned()))
            .collect(),
        versions: [
            (sa.digest(), "2.0".to_owned()),
            (sb.digest(), "2.1".to_owned()),
            (s1.digest(), "1.0".to_owned()),
        ]
        .into(),
        fails_on: fails_on.map(str::to_owned),
        error_rate: HashMap::new(),
        refusals: Vec::new(),
    };
    run.take(actions);
    (run, v.plan)
}

fn strata(r: &Rollout, arm: Arm) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for a in r.devices.values().filter(|a| a.arm == Some(arm)) {
        *m.entry((a.device_type.clone(), a.region.clone()))
            .or_default() += 1;
    }
    m
}

#[test]
fn arms_are_disjoint_and_stratified_then_the_promoted_winner_rolls_out_everywhere() {
    let (mut run, plan) = start(3, 2);
    // 10 % of 40 per arm, disjoint, the same mix of types and regions in each.
    assert_eq!((plan.a.len(), plan.b.len()), (4, 4));
    let a: BTreeSet<_> = plan.a.iter().collect();
    assert!(plan.b.iter().all(|d| !a.contains(d)));
    assert_eq!(strata(&run.r, Arm::A), strata(&run.r, Arm::B));
    let types: BTreeSet<_> = strata(&run.r, Arm::A).keys().map(|k| k.0.clone()).collect();
    let regions: BTreeSet<_> = strata(&run.r, Arm::A).keys().map(|k| k.1.clone()).collect();
    assert_eq!(types.len(), 2, "{types:?}");
    assert_eq!(regions.len(), 2, "{regions:?}");
    // Each arm runs its own release; nobody else was sent anything.
    for d in &plan.a {
        assert_eq!(run.running[d], "2.0");
    }
    for d in &plan.b {
        assert_eq!(run.running[d], "2.1");
    }
    assert_eq!(run.running.values().filter(|v| *v == "1.0").count(), 32);
    assert_eq!(run.r.phase, Phase::Canary);
    let block = run.r.state_block(run.now).render_block();
    assert!(
        block.contains("strategy: ab") && block.contains("arm_a: app 2.0"),
        "{block}"
    );

    // Promotion before the window ends is refused, with the reason.
    run.error_rate.insert("2.1".into(), 0.03);
    run.run_for(Duration::from_secs(60));
    run.operator(OperatorCommand::Promote(Arm::A));
    assert!(
        run.refusals
            .last()
            .unwrap()
            .contains("still observing its arms"),
        "{:?}",
        run.refusals
    );
    assert_eq!(run.r.status, RolloutStatus::Running);

    // After the window: awaiting a promotion, never an automatic approval.
    run.run_for(Duration::from_secs(10 * 60));
    assert_eq!(
        (run.r.phase, run.r.status),
        (Phase::Verify, RolloutStatus::AwaitingApproval)
    );
    run.operator(OperatorCommand::Approve);
    assert!(
        run.refusals.last().unwrap().contains("A/B rollout"),
        "{:?}",
        run.refusals
    );
    let rep = report::build(&run.r, run.now);
    let ab = rep.ab.as_ref().unwrap();
    let (ea, eb) = (
        ab.arms[0].error_rate.unwrap(),
        ab.arms[1].error_rate.unwrap(),
    );
    assert!((ea.value - 0.01).abs() < 1e-9 && (eb.value - 0.03).abs() < 1e-9);
    assert!(ea.low < ea.value && ea.value < ea.high);
    let diff = ab.error_rate_diff.unwrap();
    assert!((diff.value - 0.02).abs() < 1e-9 && diff.low < diff.value && diff.value < diff.high);
    assert!(
        rep.markdown.contains("| metric | arm A | arm B |"),
        "{}",
        rep.markdown
    );

    // Promote A: B's devices and the rest get A by canary-rolling waves; B never spreads.
    run.operator(OperatorCommand::Promote(Arm::A));
    assert_eq!(run.r.phase, Phase::Rollout, "{}", run.r.last_action);
    for d in &plan.b {
        assert_eq!(run.r.devices[d].wave, 1);
    }
    run.run_for(Duration::from_secs(3600));
    assert_eq!(
        run.r.status,
        RolloutStatus::Completed,
        "{}",
        run.r.last_action
    );
    assert!(
        run.running.values().all(|v| v == "2.0"),
        "{:?}",
        run.running
    );
    let block = run.r.state_block(run.now).render_block();
    assert!(
        block.contains("status=promoted") && block.contains("artifact: app 2.0\n"),
        "{block}"
    );
    run.operator(OperatorCommand::Promote(Arm::B));
    assert!(
        run.refusals.last().unwrap().contains("already promoted"),
        "{:?}",
        run.refusals
    );
}

#[test]
fn a_failing_arm_is_rolled_back_alone_and_cannot_be_promoted() {
    // Every device of arm B fails its trial: B is rolled back, A observed on.
    let (mut run, plan) = start_with(3, 2, Some("2.1"));
    let b = &run.r.ab.as_ref().unwrap().b;
    assert!(b.rolled_back.is_some(), "{}", run.r.last_action);
    assert_eq!(run.r.status, RolloutStatus::Running);
    for d in &plan.b {
        assert_eq!(run.r.devices[d].state, DevState::Failed);
        assert_eq!(run.running[d], "1.0");
    }
    let block = run.r.state_block(run.now).render_block();
    assert!(block.contains("status=rolled back"), "{block}");
    run.run_for(Duration::from_secs(11 * 60));
    assert_eq!(
        run.r.status,
        RolloutStatus::AwaitingApproval,
        "{}",
        run.r.last_action
    );
    run.operator(OperatorCommand::Promote(Arm::B));
    assert!(
        run.refusals.last().unwrap().contains("was rolled back"),
        "{:?}",
        run.refusals
    );
    run.operator(OperatorCommand::Promote(Arm::A));
    assert_eq!(run.r.phase, Phase::Rollout);
    run.run_for(Duration::from_secs(3600));
    assert_eq!(
        run.r.status,
        RolloutStatus::Completed,
        "{}",
        run.r.last_action
    );
    // The failed (quarantined) devices of arm B were not sent the winner.
    for d in &plan.b {
        assert_eq!(run.running[d], "1.0");
    }
}

#[test]
fn the_loser_with_the_higher_counter_returns_to_its_previous_release() {
    let (mut run, plan) = start(2, 3);
    run.run_for(Duration::from_secs(11 * 60));
    run.operator(OperatorCommand::Promote(Arm::A));
    assert_eq!(run.r.phase, Phase::Rollout);
    run.run_for(Duration::from_secs(3600));
    assert_eq!(
        run.r.status,
        RolloutStatus::Completed,
        "{}",
        run.r.last_action
    );
    for d in &plan.b {
        assert_eq!(run.running[d], "1.0", "{d}");
        assert!(
            run.r.devices[d]
                .failure
                .as_deref()
                .unwrap()
                .contains("higher counter")
        );
    }
    assert_eq!(run.running.values().filter(|v| *v == "2.0").count(), 36);
}

#[test]
fn promote_is_refused_on_a_rollout_that_is_not_ab() {
    let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
    let devices = testkit::fleet(20, Some(testkit::installed(&r1, &s1)));
    let k = Knobs {
        rollback_to: Some((1, "1.0".into())),
        ..Knobs::default()
    };
    let (r2, s2) = testkit::signed("app", "2.0", 2, &k);
    let (mut r, _) = testkit::start(&devices, &r2, &s2, Settings::default(), T0);
    let out = engine::step_in_place(
        &mut r,
        &Event::Operator {
            operator: "alice".into(),
            command: OperatorCommand::Promote(Arm::A),
        },
        T0,
    );
    let msg = out.iter().find_map(|a| match a {
        Action::Refuse { message, hint } => Some(format!("{message} / {hint:?}")),
        _ => None,
    });
    let msg = msg.unwrap();
    assert!(
        msg.contains("uses strategy canary-rolling, not ab") && msg.contains("approve"),
        "{msg}"
    );
}

#[test]
fn an_ab_release_alone_is_refused_by_the_checklist() {
    let (ra, _) = release("2.0", 3);
    let item = ab::alone(&ra).unwrap();
    assert!(!item.ok && item.fix.unwrap().contains("--versus"));
}
