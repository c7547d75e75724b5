//! Operators steering a rollout with `fleetctl` (approve, abort, rollback), each audited with
//! the operator's own name; and a device that publishes under another device's id.

use std::time::SystemTime;

use fleet_e2e::*;
use fleet_proto::device::{
    DeviceFacts, Event, EventKind, Installed, Reported, RollbackReason, Slot,
};
use fleet_proto::hex::Sha256;
use fleet_proto::operator::{ActorKind, AuditEntry, DeviceStatus};
use fleet_proto::release::Arch;
use fleet_proto::rollout::RolloutStatus;
use fleet_proto::{DeviceId, RolloutId, UnixMillis, encode};
use rumqttc::QoS;

use crate::site::{BrokerKind, DEVICE_TIMEOUT, FLEET, ROLLOUT_TIMEOUT, Site, path};

fn by_operator<'a>(audit: &'a [AuditEntry], name: &str, action: &str) -> Option<&'a AuditEntry> {
    audit.iter().find(|e| {
        e.actor == ActorKind::Operator && e.actor_name == name && e.action.contains(action)
    })
}

/// Alice approves after the canary, Bob aborts in wave 1 (devices keep what they have), Carol
/// rolls back (every device that got 2.0.0 returns to 1.0.0). Each action is refused or
/// accepted as an operator would see it, and audited under its operator's name.
pub fn approve_abort_rollback(kind: BrokerKind) {
    let Some(site) = Site::start(kind, "operators") else {
        return;
    };
    site.install_first_release();
    let (alice, bob, carol) = (&site.ctl, site.operator("bob"), site.operator("carol"));

    let mut spec = site.spec("2.0.0", 2, &[]);
    spec.rollback_to = Some((1, "1.0.0".into()));
    // Long enough that wave 1 is still soaking when Bob aborts.
    spec.wave_soak = "30s";
    let v2 = site.releases.sign("v2", &spec);
    let plan: fleet_proto::operator::Plan = alice.run(&["plan", path(&v2), "--json"]).json();
    let id = site.start_rollout(&v2);
    site.wait_status(&id, RolloutStatus::AwaitingApproval);

    // Bob cannot abort what does not exist, nor approve twice; Alice approves.
    let unknown = bob.run(&["rollout", "abort", "r-999"]).fails(3);
    assert!(unknown.stderr.contains("r-999"), "{}", unknown.stderr);
    alice.run(&["rollout", "approve", &id]).ok();
    let again = bob.run(&["rollout", "approve", &id]).fails(3);
    assert!(again.stderr.contains("error: "), "{}", again.stderr);

    // Bob aborts once wave 1 has installed: nothing is reverted, nothing more is sent.
    let wave1: Vec<String> = plan.waves[1]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    let wave2: Vec<String> = plan.waves[2]
        .devices
        .iter()
        .map(|d| d.to_string())
        .collect();
    site.wait_rollout(&id, "soaks wave 1", |s| {
        s.current_wave.current == 1 && s.waves[1].deployed as usize == wave1.len()
    });
    let aborted = bob.run(&["rollout", "abort", &id]).ok();
    assert!(aborted.contains("status: aborted"), "{aborted}");
    let watched = alice.run(&["rollout", "watch", &id]).fails(6);
    assert!(
        watched
            .stderr
            .contains(&format!("rollout {id} was aborted")),
        "{}",
        watched.stderr
    );
    let resumed = alice.run(&["rollout", "resume", &id]).fails(3);
    assert!(resumed.stderr.contains("error: "), "{}", resumed.stderr);
    for dev in plan.waves[0].devices.iter().chain(&plan.waves[1].devices) {
        site.agent(dev.as_str())
            .wait_serving("2.0.0", ROLLOUT_TIMEOUT);
    }
    for dev in &wave2 {
        assert_eq!(site.agent(dev).serving().as_deref(), Some("1.0.0"), "{dev}");
        let d = site.device(dev).unwrap();
        assert!(
            d.standby.is_none(),
            "{dev} never got 2.0.0 after the abort: {d:?}"
        );
    }

    // Carol rolls the aborted rollout back: every device that got 2.0.0 returns to 1.0.0.
    let back = carol.run(&["rollout", "rollback", &id]).ok();
    assert!(back.contains("status: rolled_back"), "{back}");
    site.wait_all_serving("1.0.0");
    wait_until(
        DEVICE_TIMEOUT,
        "the registry shows every device on 1.0.0",
        || {
            site.devices().iter().all(|d| {
                d.active.as_ref().is_some_and(|a| a.version == "1.0.0")
                    && d.status == DeviceStatus::Online
            })
        },
    );
    let state = site.status(&id);
    assert_eq!(
        state.status,
        RolloutStatus::RolledBack,
        "{}",
        state.render_block()
    );
    assert_eq!(state.quarantined_count, 0, "{}", state.render_block());

    let audit = site.audit(&id);
    assert!(
        by_operator(&audit, "alice", "start").is_some(),
        "{audit:#?}"
    );
    assert!(
        by_operator(&audit, "alice", "approve").is_some(),
        "{audit:#?}"
    );
    assert!(by_operator(&audit, "bob", "abort").is_some(), "{audit:#?}");
    assert!(
        by_operator(&audit, "carol", "rollback").is_some(),
        "{audit:#?}"
    );
    // A refused command is audited too, with why, and changed nothing.
    let refused = by_operator(&audit, "bob", "approve").expect("bob's refused approve");
    assert!(
        refused.outcome.starts_with("refused: ")
            && refused.outcome.contains("not awaiting approval"),
        "{refused:?}"
    );
    for (name, action) in [
        ("alice", "approve"),
        ("bob", "abort"),
        ("carol", "rollback"),
    ] {
        let e = by_operator(&audit, name, action).unwrap();
        assert!(!e.outcome.starts_with("refused"), "{e:?}");
    }
    let text = carol.run(&["audit", "--rollout", &id]).ok();
    for name in ["alice", "bob", "carol"] {
        assert!(text.contains(name), "{text}");
    }
}

/// What a compromised `gw-3` sends about `rpi-1`: a state report claiming another type,
/// region and release, and a rolled-back event.
fn forged(payload_id: &str) -> (Vec<u8>, Vec<u8>) {
    let now = UnixMillis::from_system(SystemTime::now());
    let id = DeviceId::new(payload_id).unwrap();
    let state = Reported {
        device: id.clone(),
        seq: 1_000_000,
        facts: DeviceFacts {
            device_type: "x86-gateway".into(),
            arch: Arch::current().unwrap(),
            region: "mars".into(),
            tags: vec![],
            agent_version: "6.6.6".into(),
            runtime: "process".into(),
            memory_total_bytes: 1 << 30,
            disk_total_bytes: 1 << 30,
        },
        active: Some(Installed {
            name: "demo".into(),
            version: "6.6.6".into(),
            counter: 666,
            digest: Sha256::of(b"forged"),
            slot: Slot::A,
        }),
        standby: None,
        phase: fleet_proto::device::UpdatePhase::Idle,
        applied_sequence: 0,
        last_outcome: None,
        highest_counter: 666,
        at: now,
        blue_green: Default::default(),
    };
    let event = Event {
        device: id,
        seq: 1_000_000,
        at: now,
        rollout: Some(RolloutId::new("r-666").unwrap()),
        sequence: 666,
        version: "6.6.6".into(),
        kind: EventKind::RolledBack {
            reason: RollbackReason::Requested,
            restored: Some("forged".into()),
        },
    };
    (encode(&state), encode(&event))
}

/// `gw-3` (its own credentials on mosquitto, another client id) publishes under `rpi-1`'s id.
/// On mosquitto the ACL drops it before anyone sees it; on the embedded broker (no per-client
/// ACL) it reaches the coordinator, which rejects a report whose payload names another device
/// than its topic, counts it in /metrics and audits it. Either way rpi-1's registry entry is
/// untouched.
pub fn forged_device_id_is_refused(kind: BrokerKind) {
    let Some(site) = Site::start(kind, "forged-id") else {
        return;
    };
    let victim_before = site.device("rpi-1").unwrap();
    let (host, port, user, password) = match &site.mosquitto {
        Some(m) => (
            m.host(),
            m.port(),
            "gw-3".to_owned(),
            m.user("gw-3").password.clone(),
        ),
        None => (
            "127.0.0.1".to_owned(),
            site.coordinator.mqtt_port,
            "gw-3".to_owned(),
            String::new(),
        ),
    };
    let mut forger = MqttProbe::connect(&host, port, "gw-3-forger", &user, &password)
        .unwrap_or_else(|e| panic!("gw-3's credentials connect: {e:?}"));
    let rejected = |site: &Site| {
        site.coordinator
            .metric("fleet_rejected_reports_total")
            .unwrap()
    };
    let online_reports = |site: &Site| {
        site.coordinator
            .metric("fleet_reports_total{kind=\"online\"}")
            .unwrap()
    };
    let rejected_before = rejected(&site);

    // gw-3's own report, published to rpi-1's topics.
    let (state, event) = forged("gw-3");
    forger.publish(
        "fleet/v1/devices/rpi-1/state",
        QoS::AtLeastOnce,
        true,
        state,
    );
    forger.publish(
        "fleet/v1/devices/rpi-1/events",
        QoS::AtLeastOnce,
        false,
        event,
    );
    let mut forged_frames = 2.0;
    if kind == BrokerKind::Mosquitto {
        // A full impersonation (payload naming rpi-1 too): only an ACL can stop that.
        let (state, event) = forged("rpi-1");
        forger.publish(
            "fleet/v1/devices/rpi-1/state",
            QoS::AtLeastOnce,
            true,
            state,
        );
        forger.publish(
            "fleet/v1/devices/rpi-1/events",
            QoS::AtLeastOnce,
            false,
            event,
        );
        forged_frames += 2.0;
    }

    match kind {
        BrokerKind::Embedded => {
            // The coordinator saw them and rejected them: counted, and audited.
            wait_until(
                DEVICE_TIMEOUT,
                "the coordinator rejects the forged frames",
                || rejected(&site) >= rejected_before + forged_frames,
            );
            let audit: Vec<AuditEntry> = site
                .ctl
                .run(&["audit", "--device", "rpi-1", "--json"])
                .json();
            let rejections: Vec<&AuditEntry> = audit
                .iter()
                .filter(|e| e.action.starts_with("rejected"))
                .collect();
            assert_eq!(rejections.len(), 2, "{audit:#?}");
            for e in rejections {
                assert!(
                    e.outcome.contains("payload names device gw-3")
                        && e.outcome.contains("topic names rpi-1"),
                    "{e:?}"
                );
            }
        }
        BrokerKind::Mosquitto => {
            // The ACL dropped them: the broker says so, and the coordinator never saw them.
            // Proof that it would have by now: gw-3's own (allowed) message published after
            // the forged ones on the same connection reaches the coordinator.
            let marker = online_reports(&site);
            let online = fleet_proto::device::Online {
                device: DeviceId::new("gw-3").unwrap(),
                online: true,
                agent_version: "0.1.0".into(),
                at: UnixMillis::from_system(SystemTime::now()),
            };
            forger.publish(
                "fleet/v1/devices/gw-3/online",
                QoS::AtLeastOnce,
                true,
                encode(&online),
            );
            wait_until(
                DEVICE_TIMEOUT,
                "gw-3's own message reaches the coordinator",
                || online_reports(&site) > marker,
            );
            let log = site.mosquitto.as_ref().unwrap().log();
            let denied = log
                .lines()
                .filter(|l| l.contains("Denied PUBLISH from gw-3-forger"))
                .count();
            assert_eq!(denied as f64, forged_frames, "mosquitto log:\n{log}");
            assert_eq!(
                rejected(&site),
                rejected_before,
                "nothing reached the coordinator"
            );
            let audit: Vec<AuditEntry> = site
                .ctl
                .run(&["audit", "--device", "rpi-1", "--json"])
                .json();
            assert!(
                !audit.iter().any(|e| e.action.starts_with("rejected")),
                "{audit:#?}"
            );
        }
    }

    // rpi-1's registry entry is untouched: same facts, release, no discrepancy, no forged
    // event in its audit trail, still online and reporting.
    let victim = site.device("rpi-1").unwrap();
    assert_eq!(victim.facts, victim_before.facts, "{victim:?}");
    assert_eq!(victim.active, victim_before.active, "{victim:?}");
    assert_eq!(victim.discrepancy, None, "{victim:?}");
    assert_eq!(victim.status, DeviceStatus::Online, "{victim:?}");
    let audit: Vec<AuditEntry> = site
        .ctl
        .run(&["audit", "--device", "rpi-1", "--json"])
        .json();
    assert!(
        !audit
            .iter()
            .any(|e| e.action.contains("6.6.6") || e.outcome.contains("6.6.6")),
        "{audit:#?}"
    );
    assert_eq!(
        site.ctl_devices().len(),
        FLEET.len(),
        "no device was added or lost"
    );
    forger.disconnect();
    // The real rpi-1 still reports as itself.
    let seen = victim.last_seen;
    wait_until(DEVICE_TIMEOUT, "rpi-1 keeps reporting", || {
        site.device("rpi-1").is_some_and(|d| d.last_seen > seen)
    });
}
