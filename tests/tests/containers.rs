//! Issue 10's end-to-end scenario: a container rollout and its rollback through the
//! coordinator. The real `fleet-coordinator` (embedded broker), four real `fleet-agent`
//! processes with `app.runtime = "container"`, each talking to a `dockerd` of its own (its own
//! socket, data root and containers, as on a real device), `fleetctl` for every operator
//! action, and releases whose artifact is the real fleet-demo-app as a `docker save`d image,
//! served by the coordinator's `/artifacts/{sha256}`.
//!
//! Without docker.io or root the test prints `SKIPPED: …` and passes; under
//! `FLEET_REQUIRE_E2E=1` (CI) it fails instead.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fleet_e2e::*;
use fleet_proto::operator::{DeviceStatus, Plan};
use fleet_proto::rollout::{FailurePattern, Phase, Report, RolloutState, RolloutStatus, Verdict};

/// Three hardware types in one region: the canary takes one device of each type, the one wave
/// after it the fourth device.
const FLEET: &[(&str, &str, &str)] = &[
    ("jetson-1", "jetson-orin", "eu-west"),
    ("rpi-1", "rpi4", "eu-west"),
    ("gw-1", "x86-gateway", "eu-west"),
    ("gw-2", "x86-gateway", "eu-west"),
];

/// Bound on anything a rollout waits for (image load, trial, soak, gate) on a loaded machine.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on devices connecting and reporting.
const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// One device: its agent, then its engine (fields drop in order: the agent goes first, the
/// engine then removes the containers).
struct Device {
    agent: Agent,
    engine: Engine,
}

impl Device {
    fn id(&self) -> &str {
        self.agent.id()
    }

    /// The demo app's container on this device's engine; panics when there is none.
    #[track_caller]
    fn container(&self) -> ContainerView {
        self.engine.container(DEMO_CONTAINER).unwrap_or_else(|| {
            panic!(
                "{}: no container {DEMO_CONTAINER} in its engine\n{}",
                self.id(),
                self.agent.tails(30)
            )
        })
    }
}

#[test]
fn a_container_rollout_commits_and_a_crash_looping_release_is_rolled_back_on_every_engine() {
    let started = Instant::now();
    let dir = TestDir::new("containers");
    let ids: Vec<&str> = FLEET.iter().map(|d| d.0).collect();
    let engines = require!(Engine::start_all(&ids, &dir.subdir("engines")));
    let releases = Releases::new(&dir, "mqtt://127.0.0.1:1");
    let coordinator_dir = dir.subdir("coordinator");
    let coordinator = Coordinator::start(&coordinator_dir, &releases.public_key, FAST);
    let broker = MqttEndpoint::anonymous("127.0.0.1", coordinator.mqtt_port);
    let devices_dir = dir.subdir("devices");
    let devices: Vec<Device> = FLEET
        .iter()
        .zip(engines)
        .map(|((id, device_type, region), engine)| Device {
            agent: Agent::start_with_env(
                &devices_dir,
                DeviceSpec::new(id, device_type, region),
                &broker,
                &releases.public_key,
                &engine.agent_env(),
            ),
            engine,
        })
        .collect();
    let ctl = Ctl::new(&dir.subdir("operator"), &coordinator.broker_url(), "alice");

    // The release engineer builds both images on one engine (the first device's) and removes
    // them there again: every device gets its image from the artifact.
    let builder = &devices[0].engine;
    let v1 = builder.demo_image(&releases, "1.0.0");
    let v2 = builder.demo_image(&releases, "2.0.0");
    assert_ne!(v1.id, v2.id);
    let artifacts = coordinator_dir.join("artifacts");
    let url1 = v1.artifact.serve_from(&artifacts, coordinator.http_port);
    let url2 = v2.artifact.serve_from(&artifacts, coordinator.http_port);
    wait_all_online(&coordinator, &ids);
    visible(&format!(
        "containers: {} engines, agents and images ready in {:.1} s",
        ids.len(),
        started.elapsed().as_secs_f64()
    ));

    // 1.0.0: canary, approval, one wave, completed; every engine runs the 1.0.0 image.
    let spec1 = release(&v1, 1, &url1, &[]);
    let m1 = releases.sign("v1", &spec1);
    let plan: Plan = ctl.run(&["plan", path(&m1), "--json"]).json();
    assert!(plan.checklist.iter().all(|i| i.ok), "{:#?}", plan.checklist);
    let canary: Vec<String> = plan.waves[0]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(canary.len(), 3, "one canary per type: {:?}", plan.waves);
    let id1 = start_rollout(&ctl, &m1);
    wait_status(&coordinator, &id1, RolloutStatus::AwaitingApproval);
    for d in &devices {
        if canary.iter().any(|c| c == d.id()) {
            d.agent.wait_serving("1.0.0", ROLLOUT_TIMEOUT);
        } else {
            assert_eq!(
                d.engine.container(DEMO_CONTAINER),
                None,
                "{} is not in the canary: nothing runs before the approval",
                d.id()
            );
        }
    }
    ctl.run(&["rollout", "approve", &id1]).ok();
    let watched = ctl.run(&["rollout", "watch", &id1]).ok();
    assert!(
        watched.contains(&format!(
            "rollout {id1} completed: {n} of {n} deployed",
            n = FLEET.len()
        )),
        "{watched}"
    );
    let mut before = Vec::new();
    for d in &devices {
        d.agent.wait_serving("1.0.0", ROLLOUT_TIMEOUT);
        let c = d.container();
        assert!(c.running, "{}: {c:?}", d.id());
        assert_eq!(c.image_id, v1.id, "{}: runs the 1.0.0 image: {c:?}", d.id());
        assert_eq!(d.engine.running(), [DEMO_CONTAINER], "{}", d.id());
        let entry = wait_active(&coordinator, d.id(), "1.0.0");
        assert_eq!(entry.status, DeviceStatus::Online, "{entry:?}");
        before.push(c);
    }
    visible(&format!(
        "containers: 1.0.0 on {} engines at {:.1} s",
        FLEET.len(),
        started.elapsed().as_secs_f64()
    ));

    // 2.0.0 crash-loops: up for 0.3 s, then exit 4, restarted by the engine (on-failure). The
    // trial wants 8 good probes 250 ms apart, longer than one life. The canary's agents roll
    // back to the image they tagged before the swap; the coordinator halts in the canary.
    let mut spec2 = release(&v2, 2, &url2, &["--crash-after", "0.3"]);
    spec2.rollback_to = Some((1, "1.0.0".into()));
    spec2.trial = "deadline = \"20s\"\ngood_probes = 8\nprobe_interval = \"250ms\"";
    let m2 = releases.sign("v2", &spec2);
    let plan: Plan = ctl.run(&["plan", path(&m2), "--json"]).json();
    assert!(plan.checklist.iter().all(|i| i.ok), "{:#?}", plan.checklist);
    let canary: Vec<String> = plan.waves[0]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    let id2 = start_rollout(&ctl, &m2);
    let halted = wait_status(&coordinator, &id2, RolloutStatus::Halted);
    assert_eq!(halted.phase, Phase::Prepare, "{}", halted.render_block());
    assert_eq!(
        halted.current_wave.current,
        0,
        "halted in the canary: {}",
        halted.render_block()
    );

    // What the operator sees.
    let status = ctl.run(&["rollout", "status", &id2]).ok();
    assert!(
        status.contains("status: halted")
            && status.contains("canary rolled back: device ")
            && is_crash(&status),
        "the state block says the canary was rolled back, and why:\n{status}"
    );
    let report: Report = ctl.run(&["report", &id2, "--json"]).json();
    assert_eq!(report.status, RolloutStatus::Halted, "{}", report.markdown);
    assert_eq!(
        report.failure_pattern,
        Some(FailurePattern::Artifact),
        "every device that tried it failed: {}",
        report.markdown
    );
    assert_eq!(
        report.waves[0].verdict,
        Some(Verdict::Fail),
        "{}",
        report.markdown
    );
    assert!(
        report.markdown.contains("the artifact is bad") && is_crash(&report.markdown),
        "the report says why:\n{}",
        report.markdown
    );
    let audit: Vec<fleet_proto::operator::AuditEntry> =
        ctl.run(&["audit", "--rollout", &id2, "--json"]).json();
    assert!(
        audit
            .iter()
            .any(|e| e.action.starts_with("rollback canary")),
        "{audit:#?}"
    );

    // Every device runs 1.0.0 again, on the device (its app's /health and its engine) and in
    // the registry.
    for (d, was) in devices.iter().zip(&before) {
        d.agent.wait_serving("1.0.0", ROLLOUT_TIMEOUT);
        wait_active(&coordinator, d.id(), "1.0.0");
        let c = d.container();
        assert!(c.running && c.restarts == 0, "{}: {c:?}", d.id());
        assert_eq!(c.image_id, v1.id, "{}: runs the 1.0.0 image: {c:?}", d.id());
        assert_eq!(d.engine.running(), [DEMO_CONTAINER], "{}", d.id());
        let loaded_v2 = d.engine.inspect("{{.Id}}", &v2.id);
        if canary.iter().any(|x| x == d.id()) {
            // It loaded 2.0.0, ran it, and came back on the rollback image it kept.
            assert_eq!(loaded_v2.as_deref(), Some(v2.id.as_str()), "{}", d.id());
            assert_eq!(
                c.image,
                format!("{DEMO_CONTAINER}:fleet-rollback"),
                "{}: the rollback started the rollback image: {c:?}",
                d.id()
            );
            assert_ne!(c.id, was.id, "{}: a new container", d.id());
            assert_eq!(
                d.engine
                    .inspect("{{.Id}}", &format!("{DEMO_CONTAINER}:fleet-rollback"))
                    .as_deref(),
                Some(v1.id.as_str()),
                "{}: the rollback image is 1.0.0's",
                d.id()
            );
            let q = wait_device_status(&coordinator, d.id(), DeviceStatus::Quarantined);
            assert!(
                q.quarantine_reason.as_deref().is_some_and(is_crash),
                "{q:?}"
            );
        } else {
            // Never the whole fleet at once: 2.0.0 never reached it.
            assert_eq!(loaded_v2, None, "{}: 2.0.0 was never loaded", d.id());
            assert_eq!(c, *was, "{}: the 1.0.0 container was never touched", d.id());
        }
    }
    visible(&format!(
        "containers: 1.0.0 rolled out, 2.0.0 rolled back on the canary ({} devices) in {:.1} s",
        canary.len(),
        started.elapsed().as_secs_f64()
    ));
}

/// A container release of `image` with short soaks, one wave after the canary and a manual
/// approval. The p95-latency trigger is off (+1000 %) for the reason given in
/// `scenarios/site.rs`: the demo app's p95 on shared cores is noise.
fn release(image: &DemoImage, counter: u64, url: &str, knobs: &[&str]) -> ReleaseSpec {
    let mut spec = ReleaseSpec::demo_container(image, counter, url, knobs);
    spec.canary_soak = "2s";
    spec.wave_soak = "2s";
    spec.waves = "[100]";
    spec.trial = "deadline = \"30s\"\ngood_probes = 3\nprobe_interval = \"250ms\"";
    spec.extra = "\n[thresholds]\np95_latency_pct = 1000.0\n".into();
    spec
}

/// The agent's reason for rolling 2.0.0 back: a crash loop, or (when it never answered
/// healthy before its first exit) a crash at start.
fn is_crash(text: &str) -> bool {
    text.contains("crash loop") || text.contains("exited at start")
}

fn start_rollout(ctl: &Ctl, manifest: &std::path::Path) -> String {
    let started: RolloutState = ctl
        .run(&["rollout", "start", path(manifest), "--json"])
        .json();
    started.rollout.to_string()
}

#[track_caller]
fn wait_status(coordinator: &Coordinator, id: &str, status: RolloutStatus) -> RolloutState {
    let mut last = None;
    let what = format!("rollout {id} is {status}");
    let found = poll(ROLLOUT_TIMEOUT, || {
        last = coordinator.rollout(id);
        last.clone().filter(|s| s.status == status)
    });
    found.unwrap_or_else(|| {
        panic!(
            "timed out after {ROLLOUT_TIMEOUT:?} waiting until {what}; last state:\n{}\n{}",
            last.map(|s| s.render_block()).unwrap_or_default(),
            coordinator.child.tails(40)
        )
    })
}

/// Waits until the registry says `id` runs `version`.
#[track_caller]
fn wait_active(
    coordinator: &Coordinator,
    id: &str,
    version: &str,
) -> fleet_proto::operator::DeviceView {
    let what = format!("the registry to show {id} on {version}");
    wait_for(DEVICE_TIMEOUT, &what, || {
        coordinator
            .device(id)
            .filter(|d| d.active.as_ref().is_some_and(|a| a.version == version))
    })
}

#[track_caller]
fn wait_device_status(
    coordinator: &Coordinator,
    id: &str,
    status: DeviceStatus,
) -> fleet_proto::operator::DeviceView {
    let what = format!("{id} to be {status:?} in the registry");
    wait_for(DEVICE_TIMEOUT, &what, || {
        coordinator.device(id).filter(|d| d.status == status)
    })
}

fn wait_all_online(coordinator: &Coordinator, ids: &[&str]) {
    wait_until(DEVICE_TIMEOUT, "every device online with health", || {
        let devices = coordinator.devices();
        ids.iter().all(|id| {
            devices.iter().any(|d| {
                d.id.as_str() == *id
                    && d.status == DeviceStatus::Online
                    && d.facts.is_some()
                    && d.last_health.is_some()
            })
        })
    });
}

fn poll<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
