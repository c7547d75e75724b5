//! `fleetctl` against a real `fleet-coordinator`: every command an operator types, with `--json`
//! parsed and the human output checked for the facts that matter. The devices are
//! protocol-level simulated devices (`fleet_sim::load`): real MQTT clients that admit signed
//! releases and report health; real agents are exercised by the scenario tests.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use fleet_e2e::*;
use fleet_proto::operator::{AuditEntry, DeviceStatus, DeviceView, Plan};
use fleet_proto::rollout::{Report, RolloutState, RolloutStatus};
use fleet_sim::load::{LoadConfig, Stats};

/// Simulated devices on their own runtime; stopped on drop.
struct SimFleet {
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SimFleet {
    fn start(config: LoadConfig) -> SimFleet {
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let _ = rt.block_on(fleet_sim::load::run(
                config,
                Arc::new(Stats::default()),
                shutdown,
            ));
        });
        SimFleet {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A coordinator, twelve simulated devices (three types × two regions) that trust the release
/// key, and an operator's fleetctl. Devices of type rpi4 turn bad on version 2.0.0.
struct Site {
    // Drop order: devices, then the coordinator, then the directory.
    _fleet: SimFleet,
    _coordinator: Coordinator,
    ctl: Ctl,
    releases: Releases,
    _dir: TestDir,
}

const DEVICES: usize = 12;

fn site(label: &str) -> Site {
    let dir = TestDir::new(label);
    let releases = Releases::new(&dir, "mqtt://127.0.0.1:1");
    let coordinator = Coordinator::start(&dir.subdir("coordinator"), &releases.public_key, FAST);
    let key = fleet_proto::release::parse_public_key(&releases.public_key).unwrap();
    let fleet = SimFleet::start(LoadConfig {
        host: "127.0.0.1".into(),
        port: coordinator.mqtt_port,
        prefix: "dev".into(),
        first: 0,
        devices: DEVICES,
        heartbeat: Duration::from_millis(300),
        device_types: vec!["jetson-orin".into(), "rpi4".into(), "x86-gateway".into()],
        regions: vec!["eu-west".into(), "us-east".into()],
        key: Some(key),
        install_delay: Duration::from_millis(100),
        fail_install: 0.0,
        offline: 0.0,
        bad_type: Some("rpi4".into()),
        bad_version: Some("2.0.0".into()),
        churn_per_hour: 0.0,
        per_connection: 1,
    });
    let ctl = Ctl::new(&dir.subdir("operator"), &coordinator.broker_url(), "alice");
    wait_until(
        Duration::from_secs(60),
        "every simulated device online with health",
        || {
            let devices: Vec<DeviceView> = ctl.run(&["devices", "--json"]).json();
            devices.len() == DEVICES
                && devices
                    .iter()
                    .all(|d| d.status == DeviceStatus::Online && d.last_health.is_some())
        },
    );
    Site {
        _fleet: fleet,
        _coordinator: coordinator,
        ctl,
        releases,
        _dir: dir,
    }
}

fn manifest_arg(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn status(ctl: &Ctl, id: &str) -> RolloutState {
    ctl.run(&["rollout", "status", id, "--json"]).json()
}

fn wait_status(ctl: &Ctl, id: &str, want: RolloutStatus) -> RolloutState {
    wait_for(
        Duration::from_secs(90),
        &format!("rollout {id} to be {want}"),
        || {
            let s = status(ctl, id);
            (s.status == want).then_some(s)
        },
    )
}

#[test]
fn operator_walkthrough_plan_start_approve_watch_report_audit() {
    let site = site("ctl-walkthrough");
    let ctl = &site.ctl;

    // The registry, as a table and as JSON, with filters.
    let table = ctl.run(&["devices"]).ok();
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains("dev-00001") && table.contains("rpi4") && table.contains("online"),
        "{table}"
    );
    assert!(table.contains(&format!("{DEVICES} devices")), "{table}");
    let rpi: Vec<DeviceView> = ctl.run(&["devices", "--type", "rpi4", "--json"]).json();
    assert_eq!(rpi.len(), 4);
    assert!(
        rpi.iter()
            .all(|d| d.facts.as_ref().unwrap().device_type == "rpi4")
    );
    let shown = ctl.run(&["device", "show", "dev-00001"]).ok();
    assert!(
        shown.contains("type         rpi4") && shown.contains("region       us-east"),
        "{shown}"
    );
    let one: DeviceView = ctl.run(&["device", "show", "dev-00001", "--json"]).json();
    assert_eq!(one.id.as_str(), "dev-00001");

    // Plan: checklist and waves, nothing deployed.
    let v1 = site.releases.sign("v1", &ReleaseSpec::new("1.0.0", 1));
    let plan_text = ctl.run(&["plan", manifest_arg(&v1)]).ok();
    assert!(
        plan_text.contains("pre-deployment checklist:"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("✓") && !plan_text.contains("✗"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("canary") && plan_text.contains("nothing was deployed"),
        "{plan_text}"
    );
    let plan: Plan = ctl.run(&["plan", manifest_arg(&v1), "--json"]).json();
    assert!(plan.checklist.iter().all(|i| i.ok), "{:?}", plan.checklist);
    let planned: usize = plan.waves.iter().map(|w| w.devices.len()).sum();
    assert_eq!(
        planned, DEVICES,
        "every device is in exactly one wave: {:?}",
        plan.waves
    );
    let canary = &plan.waves[0];
    assert_eq!(
        canary.by_type.len(),
        3,
        "the canary covers every hardware type: {canary:?}"
    );
    assert_eq!(canary.by_region.len(), 2, "and every region: {canary:?}");
    let devices: Vec<DeviceView> = ctl.run(&["devices", "--json"]).json();
    assert!(
        devices.iter().all(|d| d.active.is_none()),
        "plan deployed nothing"
    );

    // Start: the state block, same keys in JSON.
    let started: RolloutState = ctl
        .run(&["rollout", "start", manifest_arg(&v1), "--json"])
        .json();
    let id = started.rollout.to_string();
    let raw: serde_json::Value =
        serde_json::from_str(&ctl.run(&["rollout", "status", &id, "--json"]).ok()).unwrap();
    for key in [
        "phase",
        "strategy",
        "artifact",
        "fleet_total",
        "deployed_count",
        "healthy_count",
        "quarantined_count",
        "skipped_count",
        "rollback_available",
        "current_wave",
        "last_action",
        "next_action",
        "blockers",
    ] {
        assert!(raw.get(key).is_some(), "status --json lacks {key}: {raw}");
    }
    let block = ctl.run(&["rollout", "status", &id]).ok();
    assert!(block.starts_with("<fleet-deploy-state>\n"), "{block}");
    assert!(
        block.contains("artifact: demo 1.0.0") && block.contains("fleet_total: 12"),
        "{block}"
    );

    // Manual approval after the canary.
    let waiting = wait_status(ctl, &id, RolloutStatus::AwaitingApproval);
    assert!(
        waiting.deployed_count >= 3 && waiting.deployed_count < DEVICES as u32,
        "{waiting:?}"
    );
    let approved = ctl.run(&["rollout", "approve", &id]).ok();
    assert!(approved.contains("<fleet-deploy-state>"), "{approved}");

    let watched = ctl.run(&["rollout", "watch", &id]).ok();
    assert!(
        watched.contains(&format!("rollout {id} completed: 12 of 12 deployed")),
        "{watched}"
    );

    let list = ctl.run(&["rollout", "list"]).ok();
    assert!(list.contains(&id) && list.contains("completed"), "{list}");
    let listed: Vec<RolloutState> = ctl.run(&["rollout", "list", "--json"]).json();
    assert_eq!(listed.len(), 1);

    let report_md = ctl.run(&["report", &id]).ok();
    assert!(report_md.contains("demo 1.0.0"), "{report_md}");
    let report: Report = ctl.run(&["report", &id, "--json"]).json();
    assert_eq!(
        (report.deployed, report.skipped, report.quarantined),
        (12, 0, 0)
    );
    assert!(report.failure_pattern.is_none());

    let audit: Vec<AuditEntry> = ctl.run(&["audit", "--rollout", &id, "--json"]).json();
    assert!(
        audit
            .iter()
            .any(|e| e.actor_name == "alice" && e.action.contains("start")),
        "the operator's start is audited under her name: {audit:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|e| e.actor_name == "alice" && e.action.contains("approve")),
        "{audit:#?}"
    );
    let audit_text = ctl.run(&["audit", "--since", "1h"]).ok();
    assert!(
        audit_text.starts_with("TIME ") && audit_text.contains("alice"),
        "{audit_text}"
    );

    // Connection settings and the operator's name from ~/.config/fleet/fleetctl.toml.
    let mut from_file = ctl.clone();
    from_file.broker = String::new();
    from_file.operator = String::new();
    std::fs::create_dir_all(ctl.dir.join("fleet")).unwrap();
    std::fs::write(
        ctl.dir.join("fleet/fleetctl.toml"),
        format!(
            "broker = \"{}\"\noperator = \"bob\"\ntimeout = \"15s\"\n",
            ctl.broker
        ),
    )
    .unwrap();
    from_file
        .run(&[
            "device",
            "quarantine",
            "dev-00004",
            "--reason",
            "cracked case",
        ])
        .ok();
    let entries: Vec<AuditEntry> = ctl
        .run(&["audit", "--device", "dev-00004", "--json"])
        .json();
    assert!(
        entries.iter().any(|e| e.actor_name == "bob"),
        "the config file's operator: {entries:#?}"
    );
    from_file.run(&["device", "release", "dev-00004"]).ok();

    // Quarantine and release.
    let q = ctl
        .run(&[
            "device",
            "quarantine",
            "dev-00003",
            "--reason",
            "fan broken",
        ])
        .ok();
    assert!(!q.trim().is_empty());
    let quarantined: Vec<DeviceView> = ctl
        .run(&["devices", "--status", "quarantined", "--json"])
        .json();
    assert_eq!(quarantined.len(), 1);
    let reason = quarantined[0]
        .quarantine_reason
        .as_deref()
        .unwrap_or_default();
    assert!(
        reason.contains("fan broken") && reason.contains("alice"),
        "{reason}"
    );
    ctl.run(&["device", "release", "dev-00003"]).ok();
    let quarantined: Vec<DeviceView> = ctl
        .run(&["devices", "--status", "quarantined", "--json"])
        .json();
    assert!(quarantined.is_empty());
    let entries: Vec<AuditEntry> = ctl
        .run(&["audit", "--device", "dev-00003", "--json"])
        .json();
    assert!(
        entries
            .iter()
            .any(|e| e.actor_name == "alice" && e.action.contains("quarantine")),
        "{entries:#?}"
    );
}

#[test]
fn a_bad_release_is_rolled_back_and_watch_exits_non_zero_saying_why() {
    let site = site("ctl-bad");
    let ctl = &site.ctl;
    let mut good = ReleaseSpec::new("1.0.0", 1);
    good.approval = "auto";
    let v1 = site.releases.sign("v1", &good);
    let out = ctl
        .run(&["rollout", "start", manifest_arg(&v1), "--watch"])
        .ok();
    assert!(out.contains("completed: 12 of 12 deployed"), "{out}");

    let mut bad = ReleaseSpec::new("2.0.0", 2);
    bad.approval = "auto";
    bad.rollback_to = Some((1, "1.0.0".into()));
    let v2 = site.releases.sign("v2", &bad);
    let run = ctl
        .run(&["rollout", "start", manifest_arg(&v2), "--watch"])
        .fails(5);
    assert!(run.stderr.contains("error: rollout r-"), "{}", run.stderr);
    assert!(run.stderr.contains("halted"), "{}", run.stderr);
    assert!(
        run.stderr.contains("hint: `fleetctl report r-"),
        "{}",
        run.stderr
    );

    let listed: Vec<RolloutState> = ctl.run(&["rollout", "list", "--json"]).json();
    let id = listed
        .iter()
        .find(|s| s.artifact == "demo 2.0.0")
        .unwrap()
        .rollout
        .to_string();
    let report: Report = ctl.run(&["report", &id, "--json"]).json();
    assert_eq!(
        report.failure_pattern,
        Some(fleet_proto::rollout::FailurePattern::Compatibility {
            device_type: "rpi4".into()
        }),
        "{}",
        report.markdown
    );
    let md = ctl.run(&["report", &id]).ok();
    assert!(md.contains("rpi4"), "{md}");
    // Watching a rollout that already ended tells the same story.
    let again = ctl.run(&["rollout", "watch", &id]).fails(5);
    assert!(again.stderr.contains("halted"), "{}", again.stderr);
    // The wave was rolled back: no device runs 2.0.0.
    wait_until(
        Duration::from_secs(30),
        "every device back on 1.0.0",
        || {
            let devices: Vec<DeviceView> = ctl.run(&["devices", "--json"]).json();
            devices
                .iter()
                .all(|d| d.active.as_ref().is_some_and(|a| a.version == "1.0.0"))
        },
    );
}

#[test]
fn checklist_failures_are_listed_by_plan_and_start() {
    let site = site("ctl-checklist");
    let ctl = &site.ctl;
    let mut spec = ReleaseSpec::new("1.0.0", 1);
    spec.memory_mb = 100_000;
    spec.extra = "kind = \"blue-green\"\n".into();
    let m = site.releases.sign("too-big", &spec);
    let plan = ctl.run(&["plan", manifest_arg(&m)]).fails(3);
    assert!(plan.stdout.contains("✗"), "{}", plan.stdout);
    let failed: Vec<&str> = plan.stdout.lines().filter(|l| l.contains("✗")).collect();
    assert!(failed.len() >= 2, "both problems listed: {}", plan.stdout);
    assert!(
        plan.stdout.contains("→"),
        "each failed item says what to do: {}",
        plan.stdout
    );
    assert!(plan.stdout.contains("would be refused"), "{}", plan.stdout);

    let start = ctl.run(&["rollout", "start", manifest_arg(&m)]).fails(3);
    let listed: Vec<&str> = start.stderr.lines().filter(|l| l.contains("✗")).collect();
    assert_eq!(
        listed.len(),
        failed.len(),
        "start lists the same failed items:\n{}",
        start.stderr
    );
    let none: Vec<RolloutState> = ctl.run(&["rollout", "list", "--json"]).json();
    assert!(none.is_empty(), "nothing started: {none:?}");

    let unknown = ctl.run(&["rollout", "status", "r-nope"]).fails(3);
    assert!(unknown.stderr.contains("r-nope"), "{}", unknown.stderr);
}

#[test]
fn pause_resume_abort_and_rollback() {
    let site = site("ctl-steer");
    let ctl = &site.ctl;
    let v1 = site.releases.sign("v1", &ReleaseSpec::new("1.0.0", 1));
    let started: RolloutState = ctl
        .run(&["rollout", "start", manifest_arg(&v1), "--json"])
        .json();
    let id = started.rollout.to_string();
    wait_status(ctl, &id, RolloutStatus::AwaitingApproval);
    ctl.run(&["rollout", "pause", &id]).ok();
    assert_eq!(status(ctl, &id).status, RolloutStatus::Paused);
    let refused = ctl.run(&["rollout", "approve", &id]).fails(3);
    assert!(refused.stderr.contains("error: "), "{}", refused.stderr);
    ctl.run(&["rollout", "resume", &id]).ok();
    assert_eq!(status(ctl, &id).status, RolloutStatus::AwaitingApproval);
    ctl.run(&["rollout", "abort", &id]).ok();
    let aborted = ctl.run(&["rollout", "watch", &id]).fails(6);
    assert!(
        aborted
            .stderr
            .contains(&format!("rollout {id} was aborted")),
        "{}",
        aborted.stderr
    );

    // The canary of the aborted rollout kept 1.0.0, so the next release must name it.
    let mut auto = ReleaseSpec::new("1.1.0", 2);
    auto.approval = "auto";
    auto.rollback_to = Some((1, "1.0.0".into()));
    let v11 = site.releases.sign("v11", &auto);
    let started: RolloutState = ctl
        .run(&["rollout", "start", manifest_arg(&v11), "--json"])
        .json();
    let id = started.rollout.to_string();
    ctl.run(&["rollout", "watch", &id]).ok();
    let back = ctl.run(&["rollout", "rollback", &id]).ok();
    assert!(back.contains("status: rolled_back"), "{back}");
    let watched = ctl.run(&["rollout", "watch", &id]).fails(5);
    assert!(watched.stderr.contains("rolled_back"), "{}", watched.stderr);
    let audit: Vec<AuditEntry> = ctl.run(&["audit", "--rollout", &id, "--json"]).json();
    assert!(
        audit
            .iter()
            .any(|e| e.actor_name == "alice" && e.action.contains("rollback")),
        "{audit:#?}"
    );
}

/// `rollout promote` refused three ways, each telling the operator what happened and what to
/// do: a rollout that is not A/B (the coordinator refuses, exit 3, with its hint), an arm that
/// is neither A nor B (a usage error, exit 2, nothing sent), a rollout that does not exist.
#[test]
fn promote_refusals_name_the_problem_and_the_next_step() {
    let site = site("ctl-promote");
    let ctl = &site.ctl;

    // A bad arm name: clap refuses it before fleetctl connects.
    let bad_arm = ctl.run(&["rollout", "promote", "r-1", "C"]).fails(2);
    assert!(
        bad_arm.stderr.contains("\"C\" is not an arm; use A or B"),
        "{}",
        bad_arm.stderr
    );
    assert!(bad_arm.stderr.contains("<ARM>"), "{}", bad_arm.stderr);

    // An unknown rollout.
    let unknown = ctl.run(&["rollout", "promote", "r-nope", "A"]).fails(3);
    assert!(
        unknown.stderr.contains("error: no rollout r-nope"),
        "{}",
        unknown.stderr
    );
    assert!(
        unknown.stderr.contains("hint: `fleetctl rollout list`"),
        "{}",
        unknown.stderr
    );

    // A canary-rolling rollout has no arms: refused, and the hint names what continues it.
    let v1 = site.releases.sign("v1", &ReleaseSpec::new("1.0.0", 1));
    let started: RolloutState = ctl
        .run(&["rollout", "start", manifest_arg(&v1), "--json"])
        .json();
    let id = started.rollout.to_string();
    let refused = ctl.run(&["rollout", "promote", &id, "A"]).fails(3);
    assert!(
        refused.stderr.contains(&format!(
            "error: rollout {id} uses strategy canary-rolling, not ab: it has no arms to promote"
        )),
        "{}",
        refused.stderr
    );
    assert!(
        refused
            .stderr
            .contains(&format!("hint: `fleetctl rollout approve {id}`")),
        "{}",
        refused.stderr
    );
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);

    // Refused means untouched: the rollout goes on, and the refusal is audited.
    let after = status(ctl, &id);
    assert_eq!(after.strategy.to_string(), "canary-rolling");
    assert!(after.arms.is_empty(), "{after:?}");
    assert!(!after.status.is_final(), "{after:?}");
    let audit: Vec<AuditEntry> = ctl.run(&["audit", "--rollout", &id, "--json"]).json();
    assert!(
        audit.iter().any(|e| e.actor_name == "alice"
            && e.action == "promote"
            && e.outcome.starts_with("refused: ")),
        "{audit:#?}"
    );
    ctl.run(&["rollout", "abort", &id]).ok();
}
