//! Key rotation and the trusted-time floor in the update machine: a rotation changes the keys
//! releases are checked against, durably; a forged one changes nothing; a clock wound back
//! does not revive an expired release.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::device::{Desired, DeviceFacts, EventKind};
use fleet_proto::hex::{Hex, Sha256};
use fleet_proto::release::*;
use fleet_proto::trust::{KeyRotation, SignedRotation, TrustChain};
use fleet_proto::{DeviceId, SigningKey, UnixMillis};

use super::*;

const NOW: UnixMillis = UnixMillis(1_795_773_600_000);
const DAY: u64 = 86_400_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn ctx() -> Ctx {
    Ctx {
        keys: vec![key(1).verifying_key()],
        skew: Duration::from_secs(60),
        device: DeviceId::new("cam-1").unwrap(),
        facts: DeviceFacts {
            device_type: "rpi4".into(),
            arch: Arch::X86_64,
            region: "eu".into(),
            tags: vec![],
            agent_version: "0".into(),
            runtime: "process".into(),
            memory_total_bytes: 1 << 30,
            disk_total_bytes: 1 << 34,
        },
        trial_attempts: 2,
        failures_allowed: 2,
        restore_timeout: Duration::from_secs(30),
        data_dirs: Vec::new(),
        blue_green_refusal: None,
    }
}

fn release(counter: u64, not_before: UnixMillis, expires: UnixMillis) -> Release {
    let version = format!("{counter}.0");
    Release {
        name: "app".into(),
        version: version.clone(),
        counter,
        not_before,
        expires,
        hardware: vec!["rpi4".into()],
        rollback_to: None,
        artifacts: BTreeMap::from([(
            Arch::X86_64,
            Artifact {
                url: "file:///a".into(),
                sha256: Sha256::of(version.as_bytes()),
                size: 100,
            },
        )]),
        run: Run {
            entrypoint: "run".into(),
            args: vec![],
            env: BTreeMap::new(),
        },
        resources: Resources {
            disk_bytes: 1000,
            memory_bytes: 1,
        },
        health: HealthCheck {
            endpoint: "http://127.0.0.1:{port}/health".into(),
            expected_version: version,
            timeout: Duration::from_secs(1),
        },
        probe: None,
        trial: Trial {
            deadline: Duration::from_secs(60),
            good_probes: 2,
            probe_interval: Duration::from_secs(1),
        },
        strategy: Strategy {
            kind: StrategyKind::CanaryRolling,
            canary_percent: 5.0,
            waves: vec![100],
            canary_soak: Duration::from_secs(1),
            wave_soak: Duration::from_secs(1),
            approval: Approval::Auto,
        },
        target: Target::default(),
        thresholds: Thresholds::default(),
        container: None,
        data_dirs: Vec::new(),
    }
}

fn desired(sequence: u64, r: &Release, by: &SigningKey) -> Input {
    Input::Desired {
        desired: Desired {
            device: DeviceId::new("cam-1").unwrap(),
            sequence,
            rollout: None,
            release: Some(SignedRelease::sign(r, by)),
            report_interval: Duration::from_secs(10),
            retry: 0,
            hold: false,
        },
        disk_free: 1 << 30,
    }
}

fn rotation(epoch: u64, to: &[&SigningKey], signers: &[&SigningKey]) -> SignedRotation {
    SignedRotation::sign(
        &KeyRotation {
            epoch,
            keys: to
                .iter()
                .map(|k| Hex(k.verifying_key().to_bytes()))
                .collect(),
            issued_at: NOW,
        },
        signers,
    )
}

fn events(actions: &[Action]) -> Vec<EventKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit { kind, .. } => Some(kind.clone()),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[Action]) -> Option<Refusal> {
    events(actions).into_iter().find_map(|e| match e {
        EventKind::Refused { reason } => Some(reason),
        _ => None,
    })
}

fn valid(counter: u64) -> Release {
    release(counter, UnixMillis(NOW.0 - 1000), UnixMillis(NOW.0 + DAY))
}

#[test]
fn a_signed_rotation_changes_the_keys_releases_are_checked_against_durably() {
    let ctx = ctx();
    let (old, new) = (key(1), key(2));
    // Before: a release signed by the new key is refused.
    let (s, actions) = step(&ctx, State::fresh(), desired(1, &valid(1), &new), NOW);
    assert!(matches!(
        refusal(&actions),
        Some(Refusal::UnknownKey { .. })
    ));
    // The chain arrives: epoch 1 pins the new key.
    let chain = TrustChain {
        rotations: vec![rotation(1, &[&new], &[&old, &new])],
    };
    let (s, actions) = step(
        &ctx,
        s,
        Input::Trust {
            chain: chain.clone(),
        },
        NOW,
    );
    assert_eq!(
        events(&actions),
        vec![EventKind::KeysRotated {
            epoch: 1,
            keys: vec![key_id(&new.verifying_key())]
        }]
    );
    // Durable: the journal (JSON) keeps it, and a restart sees it.
    let s = crate::journal::decode(&crate::journal::encode(&s)).unwrap();
    assert_eq!(s.pinned(&ctx).keys, vec![new.verifying_key()]);
    // The same chain again (every reconnect): nothing happens.
    let (s, actions) = step(&ctx, s, Input::Trust { chain }, NOW);
    assert!(events(&actions).is_empty());
    // Now the old key's releases are refused and the new key's admitted.
    let (s, actions) = step(&ctx, s, desired(2, &valid(2), &old), NOW);
    assert!(matches!(
        refusal(&actions),
        Some(Refusal::UnknownKey { .. })
    ));
    let (s, actions) = step(&ctx, s, desired(3, &valid(3), &new), NOW);
    assert_eq!(refusal(&actions), None);
    assert!(matches!(s.phase, Phase::Downloading { .. }));
}

#[test]
fn a_forged_or_replayed_rotation_changes_nothing_and_is_reported_once() {
    let ctx = ctx();
    let thief = key(9);
    let forged = TrustChain {
        rotations: vec![rotation(1, &[&thief], &[&thief])],
    };
    let (s, actions) = step(
        &ctx,
        State::fresh(),
        Input::Trust {
            chain: forged.clone(),
        },
        NOW,
    );
    assert!(matches!(
        events(&actions).as_slice(),
        [EventKind::RotationRefused {
            reason: fleet_proto::trust::RotationRefusal::MissingSignature { epoch: 1, .. }
        }]
    ));
    assert_eq!(s.pinned, None);
    let (s, actions) = step(&ctx, s, Input::Trust { chain: forged }, NOW);
    assert!(events(&actions).is_empty(), "reported once");
    // The thief's release is still refused.
    let (_, actions) = step(&ctx, s, desired(1, &valid(1), &thief), NOW);
    assert!(matches!(
        refusal(&actions),
        Some(Refusal::UnknownKey { .. })
    ));
}

#[test]
fn a_clock_wound_back_does_not_revive_an_expired_release() {
    let ctx = ctx();
    let signer = key(1);
    // An old release, valid for a day from NOW; the device sees a newer one signed ten days
    // later (its not_before raises the trusted-time floor).
    let old = release(1, UnixMillis(NOW.0 - 1000), UnixMillis(NOW.0 + DAY));
    let later = UnixMillis(NOW.0 + 10 * DAY);
    let newer = release(2, UnixMillis(later.0 - 1000), UnixMillis(later.0 + DAY));
    let (s, actions) = step(&ctx, State::fresh(), desired(1, &newer, &signer), later);
    assert_eq!(refusal(&actions), None);
    assert_eq!(s.time_floor, newer.not_before);
    // The device clock is set back to NOW (a dead RTC, a forged NTP answer), and the old
    // release is offered again (a freeze attack: keep the device on something stale).
    let s = State {
        phase: Phase::Idle,
        ..s
    };
    let (s, actions) = step(&ctx, s, desired(2, &old, &signer), NOW);
    assert!(
        matches!(refusal(&actions), Some(Refusal::Expired { now, .. }) if now == newer.not_before),
        "{actions:?}"
    );
    assert_eq!(s.time_floor, newer.not_before, "the floor never goes down");
    // Without the floor, the same clock would have admitted it: the floor is what refuses it.
    let (_, actions) = step(&ctx, State::fresh(), desired(1, &old, &signer), NOW);
    assert_eq!(refusal(&actions), None);
}

#[test]
fn a_journal_from_before_rotations_reads_with_config_keys_and_no_floor() {
    let mut json = serde_json::to_value(State::fresh()).unwrap();
    let map = json.as_object_mut().unwrap();
    map.remove("pinned");
    map.remove("time_floor");
    map.remove("rotation_refused");
    let s: State = serde_json::from_value(json).unwrap();
    assert_eq!(s.pinned(&ctx()).keys, ctx().keys);
    assert_eq!(s.time_floor, UnixMillis(0));
}
