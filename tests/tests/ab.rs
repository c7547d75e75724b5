//! Strategy `ab` end to end (issue 9): the real `fleet-coordinator`, eight real `fleet-agent`
//! processes each running the real `fleet-demo-app`, and an operator's `fleetctl`. Arm B has a
//! higher error rate; the operator reads the arms side by side, promotes A, and every device
//! ends on A.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use fleet_e2e::*;
use fleet_proto::rollout::{Report, RolloutState, RolloutStatus};

/// Two hardware types × two regions, two devices each: one of each stratum per arm.
const FLEET: &[(&str, &str, &str)] = &[
    ("jetson-1", "jetson-orin", "eu-west"),
    ("jetson-2", "jetson-orin", "eu-west"),
    ("jetson-3", "jetson-orin", "us-east"),
    ("jetson-4", "jetson-orin", "us-east"),
    ("rpi-1", "rpi4", "eu-west"),
    ("rpi-2", "rpi4", "eu-west"),
    ("rpi-3", "rpi4", "us-east"),
    ("rpi-4", "rpi4", "us-east"),
];

const TIMEOUT: Duration = Duration::from_secs(120);

fn arg(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn status(ctl: &Ctl, id: &str) -> RolloutState {
    ctl.run(&["rollout", "status", id, "--json"]).json()
}

fn wait_status(ctl: &Ctl, id: &str, want: RolloutStatus) -> RolloutState {
    wait_for(TIMEOUT, &format!("rollout {id} to be {want}"), || {
        let s = status(ctl, id);
        (s.status == want).then_some(s)
    })
}

#[test]
fn ab_run_with_a_promoted_winner() {
    let started = std::time::Instant::now();
    let dir = TestDir::new("ab-promote");
    let releases = Releases::new(&dir, "mqtt://127.0.0.1:1");
    let coordinator_dir = dir.subdir("coordinator");
    let coordinator = Coordinator::start(&coordinator_dir, &releases.public_key, FAST);
    let endpoint = MqttEndpoint::anonymous("127.0.0.1", coordinator.mqtt_port);
    let devices = dir.subdir("devices");
    let agents: Vec<Agent> = FLEET
        .iter()
        .map(|(id, ty, region)| {
            Agent::start(
                &devices,
                DeviceSpec::new(id, ty, region),
                &endpoint,
                &releases.public_key,
            )
        })
        .collect();
    let ctl = Ctl::new(&dir.subdir("operator"), &coordinator.broker_url(), "alice");
    let packed = DemoArtifact::pack(&releases);
    let url = packed.serve_from(&coordinator_dir.join("artifacts"), coordinator.http_port);
    let artifact = packed.stanza(&url);
    wait_until(
        Duration::from_secs(60),
        "every device online with health",
        || {
            let d = coordinator.devices();
            d.len() == FLEET.len() && d.iter().all(|d| d.last_health.is_some())
        },
    );
    let spec = |version: &str, counter: u64, knobs: &[&str]| {
        let mut s = ReleaseSpec::demo_app(version, counter, &artifact, knobs);
        s.canary_soak = "1s";
        s.wave_soak = "2s";
        s.waves = "[50, 100]";
        s.trial = "deadline = \"20s\"\ngood_probes = 3\nprobe_interval = \"250ms\"";
        s.extra = "\n[thresholds]\np95_latency_pct = 1000.0\n".into();
        s
    };

    // Every device runs 1.0.0 first: something to roll back to.
    let mut v1 = spec("1.0.0", 1, &[]);
    v1.approval = "auto";
    v1.waves = "[100]";
    let out = ctl
        .run(&[
            "rollout",
            "start",
            arg(&releases.sign("v1", &v1)),
            "--watch",
        ])
        .ok();
    assert!(out.contains("completed: 8 of 8 deployed"), "{out}");

    // A (counter 3) and B (counter 2, 3 % of its requests fail), both `ab`.
    let ab = |mut s: ReleaseSpec| {
        s.rollback_to = Some((1, "1.0.0".into()));
        s.extra = format!(
            "kind = \"ab\"\nab_percent = 25\nobservation = \"8s\"\n{}",
            s.extra
        );
        s
    };
    let a = releases.sign("a", &ab(spec("2.0.0", 3, &[])));
    let b = releases.sign("b", &ab(spec("2.1.0", 2, &["--error-rate", "0.03"])));

    // The plan shows both arms' devices by type and region.
    let plan = ctl.run(&["plan", arg(&a), "--versus", arg(&b)]).ok();
    assert!(
        plan.contains("arm A (demo 2.0.0 (#3))") && plan.contains("arm B (demo 2.1.0 (#2))"),
        "{plan}"
    );
    assert!(
        plan.contains("arms cover every hardware type and region")
            && plan.contains("jetson-orin 1, rpi4 1"),
        "{plan}"
    );

    let started_state: RolloutState = ctl
        .run(&["rollout", "start", arg(&a), "--versus", arg(&b), "--json"])
        .json();
    let id = started_state.rollout.to_string();

    // Too early: the arms are still observed.
    let early = ctl.run(&["rollout", "promote", &id, "A"]).fails(3);
    assert!(
        early.stderr.contains("still observing its arms"),
        "{}",
        early.stderr
    );

    wait_status(&ctl, &id, RolloutStatus::AwaitingApproval);
    let block = ctl.run(&["rollout", "status", &id]).ok();
    assert!(block.contains("strategy: ab"), "{block}");
    assert!(
        block.contains("arm_a: demo 2.0.0 (#3) devices=2 deployed=2")
            && block.contains("arm_b: demo 2.1.0 (#2) devices=2 deployed=2"),
        "{block}"
    );
    assert!(
        block.contains(&format!("rollout promote {id} A|B")),
        "{block}"
    );

    // The report: the arms side by side, B's error rate above A's.
    let report = ctl.run(&["report", &id]).ok();
    assert!(report.contains("| metric | arm A | arm B |"), "{report}");
    // FAST sets the gates' z to 1.0: a 68 % two-sided interval.
    assert!(report.contains("| error rate (68 % CI) |"), "{report}");
    assert!(report.contains("Error rate B − A: +"), "{report}");
    let json: Report = ctl.run(&["report", &id, "--json"]).json();
    let arms = &json.ab.as_ref().unwrap().arms;
    let (ea, eb) = (
        arms[0].error_rate.unwrap().value,
        arms[1].error_rate.unwrap().value,
    );
    assert!(eb > ea, "A {ea}, B {eb}\n{report}");

    // Promote A: it rolls out to the rest, B's devices included.
    let promoted = ctl.run(&["rollout", "promote", &id, "A"]).ok();
    assert!(promoted.contains("strategy: ab"), "{promoted}");
    let done = wait_status(&ctl, &id, RolloutStatus::Completed);
    assert_eq!(done.deployed_count, 8, "{}", done.render_block());
    assert!(done.render_block().contains("status=promoted"));
    for agent in &agents {
        agent.wait_serving("2.0.0", TIMEOUT);
    }
    let again = ctl.run(&["rollout", "promote", &id, "B"]).fails(3);
    assert!(
        again.stderr.contains("already promoted arm A"),
        "{}",
        again.stderr
    );
    let audit = ctl.run(&["audit", "--rollout", &id]).ok();
    assert!(
        audit.contains("promoted arm A (demo 2.0.0 (#3)) over arm B"),
        "{audit}"
    );
    visible(&format!(
        "ab: promoted A on {} devices in {:.1} s",
        FLEET.len(),
        started.elapsed().as_secs_f64()
    ));
}
