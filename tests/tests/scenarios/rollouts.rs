//! Rollouts as an operator runs them: a good release all the way through, a bad canary, a
//! release that crash-loops on one device type, and a device that was offline.

use fleet_proto::operator::{DeviceStatus, DeviceView, Plan};
use fleet_proto::rollout::{FailurePattern, Phase, RolloutStatus, Verdict};

use crate::site::{BrokerKind, DEVICE_TIMEOUT, FLEET, ROLLOUT_TIMEOUT, Site, path};

/// Good rollout: canary → approval with `fleetctl rollout approve` → wave 1 → wave 2 →
/// CONFIRM → completed; every device serves the new version.
pub fn good_rollout(kind: BrokerKind) {
    let Some(site) = Site::start(kind, "good") else {
        return;
    };
    site.install_first_release();

    let mut spec = site.spec("2.0.0", 2, &[]);
    spec.rollback_to = Some((1, "1.0.0".into()));
    let v2 = site.releases.sign("v2", &spec);

    // The plan: every checklist item passes, the canary covers every type and region and
    // never takes the spof gateway, every device is in exactly one wave.
    let plan: Plan = site.ctl.run(&["plan", path(&v2), "--json"]).json();
    assert!(plan.checklist.iter().all(|i| i.ok), "{:#?}", plan.checklist);
    let canary: Vec<String> = plan.waves[0]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(plan.waves[0].by_type.len(), 3, "{:?}", plan.waves[0]);
    assert_eq!(plan.waves[0].by_region.len(), 2, "{:?}", plan.waves[0]);
    assert!(
        !canary.contains(&"gw-3".to_owned()),
        "spof in canary: {canary:?}"
    );
    assert_eq!(plan.waves.len(), 3, "canary + 2 waves: {:?}", plan.waves);
    let planned: usize = plan.waves.iter().map(|w| w.devices.len()).sum();
    assert_eq!(planned, FLEET.len());

    let id = site.start_rollout(&v2);
    let waiting = site.wait_status(&id, RolloutStatus::AwaitingApproval);
    assert_eq!(
        waiting.deployed_count as usize,
        canary.len(),
        "{}",
        waiting.render_block()
    );
    // Never the whole fleet at once: before the approval only the canary runs 2.0.0.
    let mut on_v2 = site.serving("2.0.0");
    on_v2.sort();
    let mut expected = canary.clone();
    expected.sort();
    assert_eq!(
        on_v2, expected,
        "only the canary runs 2.0.0 before approval"
    );
    assert_eq!(site.serving("1.0.0").len(), FLEET.len() - canary.len());

    let approved = site.ctl.run(&["rollout", "approve", &id]).ok();
    assert!(approved.contains("<fleet-deploy-state>"), "{approved}");
    let watched = site.ctl.run(&["rollout", "watch", &id]).ok();
    assert!(
        watched.contains(&format!(
            "rollout {id} completed: {n} of {n} deployed",
            n = FLEET.len()
        )),
        "{watched}"
    );

    site.wait_all_serving("2.0.0");
    let devices = site.ctl_devices();
    assert_eq!(devices.len(), FLEET.len());
    for d in &devices {
        assert_eq!(d.status, DeviceStatus::Online, "{d:?}");
        assert_eq!(
            d.active.as_ref().map(|a| a.version.as_str()),
            Some("2.0.0"),
            "{d:?}"
        );
        assert_eq!(
            d.standby.as_ref().map(|a| a.version.as_str()),
            Some("1.0.0"),
            "the previous release stays in the standby slot: {d:?}"
        );
    }

    let state = site.status(&id);
    assert_eq!(state.status, RolloutStatus::Completed);
    assert_eq!(state.deployed_count as usize, FLEET.len());
    assert_eq!(
        (state.skipped_count, state.quarantined_count),
        (0, 0),
        "{}",
        state.render_block()
    );
    let report = site.report(&id);
    assert_eq!(
        (report.deployed as usize, report.skipped, report.quarantined),
        (FLEET.len(), 0, 0)
    );
    assert!(report.failure_pattern.is_none(), "{}", report.markdown);
    assert_eq!(report.waves.len(), 3, "{}", report.markdown);
    for w in &report.waves {
        assert_eq!(w.verdict, Some(Verdict::Pass), "{}", report.markdown);
        assert_eq!(w.failed, 0, "{}", report.markdown);
    }
    let audit = site.audit(&id);
    assert!(
        audit
            .iter()
            .any(|e| e.actor_name == "alice" && e.action.contains("approve")),
        "{audit:#?}"
    );
    for dev in site.ids() {
        let commits = audit
            .iter()
            .filter(|e| {
                e.action == "committed" && e.device.as_ref().is_some_and(|d| d.as_str() == dev)
            })
            .count();
        assert_eq!(commits, 1, "{dev} committed 2.0.0 once: {audit:#?}");
    }

    // The harness itself: dropping the agents' guards kills every agent and, with it, its
    // app (nothing outlives a test).
    let ports: Vec<u16> = site.agents.iter().map(|a| a.app_port()).collect();
    let mut site = site;
    site.agents.clear();
    for port in ports {
        let what = format!("the app on port {port} dies with its agent");
        fleet_e2e::wait_until(DEVICE_TIMEOUT, &what, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        });
    }
}

/// Bad canary: a release that exits at start on every device. The agents' watchdogs roll the
/// canary back by themselves, the coordinator halts the rollout in the canary, the canary
/// devices serve the previous version again, no other device ever received the release, and
/// the report says why.
pub fn bad_canary(kind: BrokerKind) {
    let Some(site) = Site::start(kind, "bad-canary") else {
        return;
    };
    site.install_first_release();

    let mut spec = site.spec("2.0.0", 2, &["--crash-at-start"]);
    spec.rollback_to = Some((1, "1.0.0".into()));
    let v2 = site.releases.sign("v2", &spec);
    let canary = site.canary(&v2);
    let id = site.start_rollout(&v2);

    let halted = site.wait_status(&id, RolloutStatus::Halted);
    assert_eq!(halted.phase, Phase::Prepare, "{}", halted.render_block());
    assert_eq!(
        halted.current_wave.current,
        0,
        "halted in the canary: {}",
        halted.render_block()
    );
    assert!(
        halted.blockers.iter().any(|b| b.contains("canary")),
        "{}",
        halted.render_block()
    );

    // The canary is back on 1.0.0 and serving; nobody else ever got 2.0.0.
    for dev in &canary {
        site.agent(dev).wait_serving("1.0.0", ROLLOUT_TIMEOUT);
    }
    assert_eq!(
        site.serving("1.0.0").len(),
        FLEET.len(),
        "every device serves 1.0.0"
    );
    let devices = site.ctl_devices();
    for d in &devices {
        assert_eq!(
            d.active.as_ref().map(|a| a.version.as_str()),
            Some("1.0.0"),
            "{d:?}"
        );
        if !canary.contains(&d.id.to_string()) {
            assert!(
                d.standby.is_none(),
                "{} is not in the canary, so nothing was installed beside 1.0.0: {d:?}",
                d.id
            );
            assert_ne!(d.status, DeviceStatus::Quarantined, "{d:?}");
        }
    }
    // Every canary device failed its trial and is quarantined (excluded until an operator
    // releases it), also those whose watchdog's verdict came after the halt.
    for dev in &canary {
        let d = site.wait_device_status(dev, DeviceStatus::Quarantined);
        let reason = d.quarantine_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("exited at start"), "{dev}: {reason}");
    }
    let quarantined: Vec<DeviceView> = site
        .ctl
        .run(&["devices", "--status", "quarantined", "--json"])
        .json();
    assert_eq!(quarantined.len(), canary.len(), "{quarantined:#?}");

    let report = site.report(&id);
    assert_eq!(report.status, RolloutStatus::Halted);
    assert_eq!(
        report.failure_pattern,
        Some(FailurePattern::Artifact),
        "every device that tried it failed: the artifact is bad\n{}",
        report.markdown
    );
    assert!(
        report.markdown.contains("exited at start"),
        "the report says why:\n{}",
        report.markdown
    );
    assert_eq!(
        report.waves[0].verdict,
        Some(Verdict::Fail),
        "{}",
        report.markdown
    );
    assert!(
        report.waves[1..].iter().all(|w| w.verdict.is_none()),
        "no wave after the canary ran:\n{}",
        report.markdown
    );
    let watched = site.ctl.run(&["rollout", "watch", &id]).fails(5);
    assert!(watched.stderr.contains("halted"), "{}", watched.stderr);
    let audit = site.audit(&id);
    assert!(
        audit
            .iter()
            .any(|e| e.action.starts_with("rollback canary (trial_failed)")),
        "{audit:#?}"
    );
    assert!(
        !audit.iter().any(|e| e.action.starts_with("start wave")),
        "{audit:#?}"
    );
}

/// Crash loop in a wave: 2.0.0 crash-loops only on rpi4 (`--only-on-device-type rpi4`). The
/// rpi4 devices are offline while the canary is chosen (a site outage), so the canary cannot
/// cover that type — the only way a release that breaks one type gets past a canary, which
/// otherwise always includes every type. They are back before the approval; the wave that
/// reaches them trips the trigger: the wave is rolled back, the rpi4 devices are quarantined,
/// and the report's failure pattern is compatibility (rpi4).
pub fn crash_loop_in_a_wave(kind: BrokerKind) {
    let Some(mut site) = Site::start(kind, "crash-loop") else {
        return;
    };
    site.install_first_release();
    let rpis = ["rpi-1", "rpi-2", "rpi-3"];
    for id in rpis {
        site.agent_mut(id).kill();
    }
    for id in rpis {
        site.wait_device_status(id, DeviceStatus::Offline);
    }

    // Up for 0.8 s, then exit 4, on rpi4 only. The trial asks for 12 good probes 200 ms
    // apart, longer than one life, so the agent's watchdog sees the restarts pile up.
    let mut spec = site.spec(
        "2.0.0",
        2,
        &["--crash-after", "0.8", "--only-on-device-type", "rpi4"],
    );
    spec.rollback_to = Some((1, "1.0.0".into()));
    spec.trial = "deadline = \"20s\"\ngood_probes = 12\nprobe_interval = \"200ms\"";
    let v2 = site.releases.sign("v2", &spec);
    let plan: Plan = site.ctl.run(&["plan", path(&v2), "--json"]).json();
    assert!(plan.checklist.iter().all(|i| i.ok), "{:#?}", plan.checklist);
    let fresh = plan
        .checklist
        .iter()
        .find(|i| i.name == "fresh heartbeats")
        .unwrap();
    assert!(fresh.detail.contains("3 offline"), "{fresh:?}");
    assert!(
        !plan.waves[0].by_type.contains_key("rpi4"),
        "no rpi4 can be in the canary: {:?}",
        plan.waves[0]
    );
    let wave_of = |dev: &str| {
        plan.waves
            .iter()
            .position(|w| w.devices.iter().any(|d| d.as_str() == dev))
            .unwrap()
    };
    let first_rpi_wave = rpis.iter().map(|d| wave_of(d)).min().unwrap();

    let id = site.start_rollout(&v2);
    site.wait_status(&id, RolloutStatus::AwaitingApproval);
    for id in rpis {
        site.agent_mut(id).start_again();
    }
    for id in rpis {
        site.wait_device_status(id, DeviceStatus::Online);
        site.agent(id).wait_serving("1.0.0", DEVICE_TIMEOUT);
    }
    site.ctl.run(&["rollout", "approve", &id]).ok();

    let halted = site.wait_status(&id, RolloutStatus::Halted);
    assert_eq!(
        halted.current_wave.current as usize,
        first_rpi_wave,
        "the first wave with an rpi4 halts: {}",
        halted.render_block()
    );
    let report = site.report(&id);
    assert_eq!(
        report.failure_pattern,
        Some(FailurePattern::Compatibility {
            device_type: "rpi4".into()
        }),
        "{}",
        report.markdown
    );
    assert!(
        report.failed_by_type.keys().all(|t| t == "rpi4") && !report.failed_by_type.is_empty(),
        "{:?}\n{}",
        report.failed_by_type,
        report.markdown
    );
    let halted_wave: Vec<String> = plan.waves[first_rpi_wave]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    // The halted wave is rolled back: every device in it serves 1.0.0 again.
    for dev in &halted_wave {
        site.agent(dev).wait_serving("1.0.0", ROLLOUT_TIMEOUT);
    }
    // The rpi4 devices that got it rolled back by themselves and are quarantined, including
    // one whose watchdog's verdict came after the halt.
    for dev in halted_wave.iter().filter(|d| d.starts_with("rpi-")) {
        let d = site.wait_device_status(dev, DeviceStatus::Quarantined);
        let reason = d.quarantine_reason.as_deref().unwrap_or_default();
        assert!(reason.contains("crash loop"), "{dev}: {reason}");
    }
    let quarantined: Vec<DeviceView> = site
        .ctl
        .run(&["devices", "--status", "quarantined", "--json"])
        .json();
    assert!(
        quarantined
            .iter()
            .all(|d| d.facts.as_ref().unwrap().device_type == "rpi4"),
        "only rpi4 devices are quarantined: {quarantined:#?}"
    );
    // Earlier waves (at least the canary) keep 2.0.0: only the failing wave is rolled back.
    for w in &plan.waves[..first_rpi_wave] {
        for dev in &w.devices {
            site.agent(dev.as_str())
                .wait_serving("2.0.0", DEVICE_TIMEOUT);
        }
    }
    let audit = site.audit(&id);
    let wave_name = if first_rpi_wave == 0 {
        "canary".to_owned()
    } else {
        format!("wave {first_rpi_wave}")
    };
    // The agent's watchdog (trial_failed) or the coordinator's crash-loop count, whichever
    // report comes first: both are this crash loop.
    assert!(
        audit.iter().any(|e| {
            e.action == format!("rollback {wave_name} (trial_failed)")
                || e.action == format!("rollback {wave_name} (crash_loop)")
        }),
        "{audit:#?}"
    );
    site.ctl.run(&["rollout", "watch", &id]).fails(5);
}

/// Offline device: rpi-3 loses power before the rollout. It is skipped (not failed) in its
/// wave; after CONFIRM it comes back with 1.0.0 and is caught up through the same install and
/// health check, and ends on 2.0.0 like every other device.
pub fn offline_device_caught_up(kind: BrokerKind) {
    let Some(mut site) = Site::start(kind, "offline") else {
        return;
    };
    site.install_first_release();
    site.agent_mut("rpi-3").kill();
    site.wait_device_status("rpi-3", DeviceStatus::Offline);

    let mut spec = site.spec("2.0.0", 2, &[]);
    spec.rollback_to = Some((1, "1.0.0".into()));
    spec.approval = "auto";
    let v2 = site.releases.sign("v2", &spec);
    let id = site.start_rollout(&v2);
    let done = site.wait_status(&id, RolloutStatus::Completed);
    assert_eq!(done.skipped_count, 1, "{}", done.render_block());
    assert_eq!(
        done.deployed_count as usize,
        FLEET.len() - 1,
        "{}",
        done.render_block()
    );
    assert_eq!(
        done.quarantined_count,
        0,
        "offline is not failed: {}",
        done.render_block()
    );
    let report = site.report(&id);
    assert_eq!(report.skipped, 1, "{}", report.markdown);
    let audit = site.audit(&id);
    assert!(
        audit.iter().any(|e| e.action.starts_with("skip in")
            && e.device.as_ref().is_some_and(|d| d.as_str() == "rpi-3")),
        "{audit:#?}"
    );
    assert_eq!(
        site.device("rpi-3").unwrap().active.unwrap().version,
        "1.0.0"
    );

    site.agent_mut("rpi-3").start_again();
    site.agent("rpi-3").wait_serving("2.0.0", ROLLOUT_TIMEOUT);
    let caught_up = site.wait_rollout(&id, "has caught rpi-3 up", |s| {
        s.deployed_count as usize == FLEET.len()
    });
    assert_eq!(caught_up.status, RolloutStatus::Completed);
    assert_eq!(caught_up.skipped_count, 0, "{}", caught_up.render_block());
    let audit = site.audit(&id);
    let on_rpi3: Vec<&str> = audit
        .iter()
        .filter(|e| e.device.as_ref().is_some_and(|d| d.as_str() == "rpi-3"))
        .map(|e| e.action.as_str())
        .collect();
    let pos = |a: &str| on_rpi3.iter().position(|x| x.starts_with(a));
    assert!(
        matches!((pos("skip in"), pos("catch up"), pos("committed")), (Some(s), Some(c), Some(k)) if s < c && c < k),
        "skipped, then caught up, then committed after its trial: {on_rpi3:?}"
    );
    site.wait_all_serving("2.0.0");
    let d = site
        .ctl_devices()
        .into_iter()
        .find(|d| d.id.as_str() == "rpi-3")
        .unwrap();
    assert_eq!(d.status, DeviceStatus::Online);
    assert_eq!(d.active.unwrap().version, "2.0.0");
}
