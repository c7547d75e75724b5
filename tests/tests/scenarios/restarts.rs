//! Restarts in the middle of a wave: the coordinator killed with SIGKILL, and the broker
//! restarted. The coordinator restarts from SQLite alone; agents reconnect on their own; the
//! rollout resumes where it was and completes, with no wave repeated or skipped and no device
//! event lost.

use fleet_proto::operator::AuditEntry;
use fleet_proto::rollout::{RolloutStatus, Verdict};

use crate::site::{BrokerKind, DEVICE_TIMEOUT, FLEET, Site};

/// Starts 2.0.0 (automatic approval) and returns its id once wave 1 has been published and
/// none of its devices has finished installing yet when possible ("mid-wave").
fn start_and_reach_wave_1(site: &Site) -> String {
    let mut spec = site.spec("2.0.0", 2, &[]);
    spec.rollback_to = Some((1, "1.0.0".into()));
    spec.approval = "auto";
    let v2 = site.releases.sign("v2", &spec);
    let id = site.start_rollout(&v2);
    site.wait_rollout(&id, "starts wave 1", |s| {
        s.current_wave.current == 1 && s.status == RolloutStatus::Running
    });
    id
}

/// The rollout completed on every device, each wave started exactly once and in order, every
/// wave passed, and every device committed 2.0.0 exactly once.
fn assert_completed_once(site: &Site, id: &str) -> Vec<AuditEntry> {
    let watched = site.ctl.run(&["rollout", "watch", id]).ok();
    assert!(
        watched.contains(&format!(
            "rollout {id} completed: {n} of {n} deployed",
            n = FLEET.len()
        )),
        "{watched}"
    );
    site.wait_all_serving("2.0.0");
    let audit = site.audit(id);
    let starts: Vec<&str> = audit
        .iter()
        .filter(|e| e.action.starts_with("start "))
        .map(|e| e.action.as_str())
        .collect();
    assert_eq!(
        starts,
        ["start canary", "start wave 1", "start wave 2"],
        "each wave started once, in order: {audit:#?}"
    );
    let report = site.report(id);
    assert_eq!(report.waves.len(), 3, "{}", report.markdown);
    for w in &report.waves {
        assert_eq!(w.verdict, Some(Verdict::Pass), "{}", report.markdown);
    }
    for dev in site.ids() {
        let commits = audit
            .iter()
            .filter(|e| {
                e.action == "committed" && e.device.as_ref().is_some_and(|d| d.as_str() == dev)
            })
            .count();
        assert_eq!(commits, 1, "{dev} committed 2.0.0 once: {audit:#?}");
    }
    audit
}

/// The seven events of one device's update, as the coordinator audits them.
const STEPS: [&str; 7] = [
    "download started 2.0.0",
    "download finished 2.0.0",
    "verified 2.0.0",
    "installed 2.0.0",
    "swapped 2.0.0",
    "trial started 2.0.0",
    "committed 2.0.0",
];

/// The update events (audited as they arrive) that never reached the coordinator, as
/// `(device: step, detectable)`: a lost event is detectable (a gap in the device's event
/// `seq`) once a later event of that device arrives.
fn missing_events(site: &Site, audit: &[AuditEntry]) -> Vec<(String, bool)> {
    let mut missing = Vec::new();
    for dev in site.ids() {
        let steps: Vec<&str> = audit
            .iter()
            .filter(|e| {
                e.device.as_ref().is_some_and(|d| d.as_str() == dev)
                    && e.actor == fleet_proto::operator::ActorKind::Device
            })
            .map(|e| e.action.as_str())
            .collect();
        let last_seen = STEPS.iter().rposition(|s| steps.contains(s));
        for (i, step) in STEPS.iter().enumerate() {
            if !steps.contains(step) {
                missing.push((format!("{dev}: {step}"), last_seen.is_some_and(|l| i < l)));
            }
        }
    }
    missing
}

/// The coordinator's own count of gaps in the devices' event sequence numbers.
fn events_lost(site: &Site) -> f64 {
    let name = r#"fleet_lost_reports_total{kind="event"}"#;
    site.coordinator
        .metric(name)
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{}", site.coordinator.metrics()))
}

/// Every update event reached the coordinator, or the coordinator counted the loss: each
/// event missing from the audit and followed by a later event of its device is one in
/// `fleet_lost_reports_total{kind="event"}`. With `none_lost`, nothing may be missing.
fn assert_events_accounted(site: &Site, audit: &[AuditEntry], none_lost: bool, what: &str) {
    let missing = missing_events(site, audit);
    let detectable = missing.iter().filter(|(_, d)| *d).count();
    let counted = events_lost(site);
    fleet_e2e::visible(&format!(
        "{what} ({}): {} update events missing from the audit ({detectable} followed by a later \
         event), {counted} counted lost{}",
        site.kind.label(),
        missing.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(": {missing:?}")
        }
    ));
    if none_lost {
        assert!(
            missing.is_empty(),
            "events never reached the coordinator: {missing:?}"
        );
    }
    assert_eq!(
        detectable as f64,
        counted,
        "every lost event followed by a later one is counted, no more: missing {missing:?}\n{}",
        site.coordinator.metrics()
    );
}

/// Coordinator kill -9 mid-wave, then restart on the same database and ports.
pub fn coordinator_kill_mid_wave(kind: BrokerKind) {
    let Some(mut site) = Site::start(kind, "coordinator-kill") else {
        return;
    };
    site.install_first_release();
    let id = start_and_reach_wave_1(&site);
    site.coordinator.kill_and_restart();
    site.coordinator
        .child
        .wait_for_line("resuming rollout from the registry", DEVICE_TIMEOUT);
    let audit = assert_completed_once(&site, &id);
    // On mosquitto the coordinator's persistent session keeps what devices send while it is
    // dead; a report it had received but not committed when it was killed is gone (and
    // counted). With the embedded broker, whatever the broker had acknowledged to a device
    // but not delivered dies with the process: counted too.
    assert_events_accounted(&site, &audit, false, "coordinator kill -9");
}

/// Broker restart mid-wave. On mosquitto: a clean stop, the agents and the coordinator notice
/// they lost the broker, then it starts again on the same port and persistence. On the
/// embedded broker, the broker lives inside the coordinator process, so a broker restart *is*
/// a coordinator restart (SIGTERM, then start again); nothing else can restart rumqttd.
pub fn broker_restart_mid_wave(kind: BrokerKind) {
    let Some(mut site) = Site::start(kind, "broker-restart") else {
        return;
    };
    site.install_first_release();
    let lost = |site: &Site, kind: &str| {
        let name = format!("fleet_lost_reports_total{{kind=\"{kind}\"}}");
        site.coordinator
            .metric(&name)
            .unwrap_or_else(|| panic!("/metrics has no {name}:\n{}", site.coordinator.metrics()))
    };
    let id = start_and_reach_wave_1(&site);
    let connects = |site: &Site, id: &str| {
        site.agent(id)
            .log()
            .matches("connected to the broker")
            .count()
    };
    let before: Vec<usize> = site.ids().iter().map(|d| connects(&site, d)).collect();
    match kind {
        BrokerKind::Mosquitto => {
            let drops =
                |a: &fleet_e2e::Agent| a.log().matches("disconnected from the broker").count();
            let dropped: Vec<usize> = site.agents.iter().map(drops).collect();
            site.mosquitto.as_mut().unwrap().stop();
            for (a, before) in site.agents.iter().zip(dropped) {
                let what = format!("{} notices the broker is gone", a.id());
                fleet_e2e::wait_until(DEVICE_TIMEOUT, &what, || drops(a) > before);
            }
            site.mosquitto.as_mut().unwrap().start_again();
        }
        BrokerKind::Embedded => {
            let status = site
                .coordinator
                .child
                .stop(std::time::Duration::from_secs(10));
            assert!(
                status.success(),
                "the coordinator stops cleanly on SIGTERM: {status}\n{}",
                site.coordinator.child.tails(30)
            );
            // The process has exited: this only starts it again.
            site.coordinator.kill_and_restart();
        }
    }
    // Every agent reconnects by itself.
    for (i, dev) in site.ids().iter().enumerate() {
        let what = format!("{dev} reconnects");
        fleet_e2e::wait_until(DEVICE_TIMEOUT, &what, || connects(&site, dev) > before[i]);
    }
    let audit = assert_completed_once(&site, &id);
    // mosquitto persists the coordinator's session and the agents re-send what it did not
    // acknowledge: nothing may be lost. The embedded broker keeps messages in memory only:
    // what it acknowledged to a device just before the coordinator process stopped is gone
    // with it, and must at least be counted.
    assert_events_accounted(
        &site,
        &audit,
        kind == BrokerKind::Mosquitto,
        "broker restart",
    );
    fleet_e2e::visible(&format!(
        "broker restart ({}): lost reports by kind: state {}, heartbeat {}",
        kind.label(),
        lost(&site, "state"),
        lost(&site, "heartbeat"),
    ));
}
