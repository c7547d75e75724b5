//! A compromised coordinator (or anyone who can publish a device's desired state) attacks the
//! real agent: every attack is refused with its reason, nothing changes on the device, and a
//! validly signed release still installs afterwards. Then the release key is rotated with a
//! signed rotation, which survives an agent restart.

use fleet_proto::device::EventKind;
use fleet_proto::hex::Hex;
use fleet_proto::trust::{KeyRotation, RotationRefusal, SignedRotation, TrustChain};
use fleet_proto::{DeviceId, Refusal, SignedRelease, SigningKey, encode};

use crate::support::*;

/// Waits for the refusal of desired `sequence` and returns its reason.
#[track_caller]
fn refusal(obs: &Observer, what: &str, sequence: u64) -> Refusal {
    let e = obs.wait_event(what, PATIENCE, |e| {
        e.sequence == sequence
            && matches!(e.kind, EventKind::Refused { .. } | EventKind::Failed { .. })
    });
    match e.kind {
        EventKind::Refused { reason } => reason,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

fn publish_trust(obs: &Observer, chain: &TrustChain) {
    obs.client
        .publish(
            "fleet/v1/trust",
            rumqttc::QoS::AtLeastOnce,
            true,
            encode(chain),
        )
        .unwrap();
}

#[test]
fn a_compromised_coordinator_can_only_choose_among_validly_signed_releases() {
    // Its own broker: this test publishes a retained key rotation no other test's agent may see.
    let port = free_port();
    start_broker_on(port);
    let dev = Device::new("compromised", port);
    let obs = Observer::new(port, &dev.id);
    let mut agent = Agent::start(&dev, &[]);
    commit_first(&dev, &obs, &version("1.0.0", &[]), 5, 1);
    let before = dev.snapshot();
    let (good, _) = signed_file_release(dev.dir.path(), 6, &version("2.0.0", &[]));

    // Replay to another device: a release signed for cam-77 only.
    let mut for_other = good.clone();
    for_other.target.devices = vec![DeviceId::new("cam-77").unwrap()];
    obs.publish_desired(&desired(
        &dev.id,
        2,
        Some(SignedRelease::sign(&for_other, &key())),
        0,
    ));
    assert!(matches!(
        refusal(&obs, "a release for another device", 2),
        Refusal::NotTargeted { .. }
    ));
    // A desired state naming another device, on this device's topic: ignored outright (no
    // event for it), as the next refusal shows.
    let mut foreign = desired(&dev.id, 3, Some(SignedRelease::sign(&good, &key())), 0);
    foreign.device = DeviceId::new("cam-77").unwrap();
    obs.publish_desired(&foreign);
    // Fast-forward: the coordinator cannot raise the counter of a signed release (the counter
    // is in the signed bytes), and a different release reusing the highest counter is refused.
    let mut reused = good.clone();
    reused.counter = 5;
    obs.publish_desired(&desired(
        &dev.id,
        4,
        Some(SignedRelease::sign(&reused, &key())),
        0,
    ));
    assert!(matches!(
        refusal(&obs, "a reused counter", 4),
        Refusal::CounterReused { counter: 5 }
    ));
    assert!(
        obs.events().iter().all(|e| e.sequence != 3),
        "the desired state for another device was acted on"
    );
    // A rotation the coordinator made up (signed by its own key): refused, keys unchanged.
    let coordinator_key = SigningKey::from_bytes(&[13; 32]);
    let forged = TrustChain {
        rotations: vec![SignedRotation::sign(
            &KeyRotation {
                epoch: 1,
                keys: vec![Hex(coordinator_key.verifying_key().to_bytes())],
                issued_at: now(),
            },
            &[&coordinator_key],
        )],
    };
    publish_trust(&obs, &forged);
    let e = obs.wait_event("the forged rotation refused", PATIENCE, |e| {
        matches!(e.kind, EventKind::RotationRefused { .. })
    });
    assert!(matches!(
        e.kind,
        EventKind::RotationRefused {
            reason: RotationRefusal::MissingSignature { epoch: 1, .. }
        }
    ));
    let mut by_coordinator = good.clone();
    by_coordinator.version = "6.6.6".into();
    obs.publish_desired(&desired(
        &dev.id,
        5,
        Some(SignedRelease::sign(&by_coordinator, &coordinator_key)),
        0,
    ));
    assert!(matches!(
        refusal(&obs, "a release signed by the coordinator's key", 5),
        Refusal::UnknownKey { .. }
    ));
    let r = obs.wait_state("the refusals applied", |r| r.applied_sequence == 5);
    assert_eq!(r.highest_counter, 5);
    assert_eq!(dev.snapshot(), before, "slots or link changed");
    assert_eq!(dev.app_version().as_deref(), Some("1.0.0"));

    // The validly signed release it may choose still installs.
    obs.publish_desired(&desired(
        &dev.id,
        6,
        Some(SignedRelease::sign(&good, &key())),
        0,
    ));
    obs.wait_event("2.0.0 committed", PATIENCE, |e| {
        e.sequence == 6 && matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving("2.0.0");

    // Key rotation, the real way: signed by the pinned key and the new one, delivered retained.
    let new_key = SigningKey::from_bytes(&[21; 32]);
    let chain = TrustChain {
        rotations: vec![SignedRotation::sign(
            &KeyRotation {
                epoch: 1,
                keys: vec![Hex(new_key.verifying_key().to_bytes())],
                issued_at: now(),
            },
            &[&key(), &new_key],
        )],
    };
    publish_trust(&obs, &chain);
    obs.wait_event("keys rotated", PATIENCE, |e| {
        matches!(e.kind, EventKind::KeysRotated { epoch: 1, .. })
    });
    // Durable: after a restart the old key is still out and the new one in.
    agent.kill();
    let _agent = Agent::start(&dev, &[]);
    let (v3, _) = signed_file_release(dev.dir.path(), 7, &version("3.0.0", &[]));
    obs.publish_desired(&desired(
        &dev.id,
        7,
        Some(SignedRelease::sign(&v3, &key())),
        0,
    ));
    assert!(matches!(
        refusal(&obs, "a release signed by the rotated-out key", 7),
        Refusal::UnknownKey { .. }
    ));
    obs.publish_desired(&desired(
        &dev.id,
        8,
        Some(SignedRelease::sign(&v3, &new_key)),
        0,
    ));
    obs.wait_event("3.0.0 committed", PATIENCE, |e| {
        e.sequence == 8 && matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving("3.0.0");
}
