//! Releases the device must not install: refused (or failed before the swap) with a reason,
//! both slots and the active link unchanged.

use fleet_proto::device::{EventKind, Failure};
use fleet_proto::hex::Sha256;
use fleet_proto::{Refusal, SignedRelease, SigningKey, UnixMillis};

use crate::support::*;

#[test]
fn bad_releases_are_refused_and_nothing_changes() {
    let dev = Device::new("refuse", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = Agent::start(&dev, &[]);
    commit_first(&dev, &obs, &version("1.0.0", &[]), 5, 1);
    let before = dev.snapshot();

    let v = version("2.0.0", &[]);
    let (good, _) = signed_file_release(dev.dir.path(), 6, &v);
    type Expect = Box<dyn Fn(&EventKind) -> bool>;
    let mut cases: Vec<(&str, SignedRelease, Expect)> = Vec::new();

    let mut wrong_sha = good.clone();
    for a in wrong_sha.artifacts.values_mut() {
        a.sha256 = Sha256::of(b"something else");
    }
    cases.push((
        "wrong sha256",
        SignedRelease::sign(&wrong_sha, &key()),
        Box::new(|k| {
            matches!(
                k,
                EventKind::Failed {
                    reason: Failure::ChecksumMismatch { .. }
                }
            )
        }),
    ));
    let forged = SignedRelease::sign(&good, &SigningKey::from_bytes(&[7; 32]));
    cases.push((
        "signed by an unknown key",
        forged,
        Box::new(|k| {
            matches!(
                k,
                EventKind::Refused {
                    reason: Refusal::UnknownKey { .. }
                }
            )
        }),
    ));
    let mut altered = SignedRelease::sign(&good, &key());
    let last = altered.release.len() - 1;
    altered.release[last] ^= 1;
    cases.push((
        "bad signature",
        altered,
        Box::new(|k| {
            matches!(
                k,
                EventKind::Refused {
                    reason: Refusal::BadSignature { .. }
                }
            )
        }),
    ));
    let mut older = good.clone();
    older.counter = 4;
    cases.push((
        "older counter",
        SignedRelease::sign(&older, &key()),
        Box::new(|k| {
            matches!(
                k,
                EventKind::Refused {
                    reason: Refusal::CounterWentDown {
                        counter: 4,
                        highest: 5
                    }
                }
            )
        }),
    ));
    let mut expired = good.clone();
    expired.not_before = UnixMillis(now().0 - 7_200_000);
    expired.expires = UnixMillis(now().0 - 3_600_000);
    cases.push((
        "expired",
        SignedRelease::sign(&expired, &key()),
        Box::new(|k| {
            matches!(
                k,
                EventKind::Refused {
                    reason: Refusal::Expired { .. }
                }
            )
        }),
    ));
    let mut hw = good.clone();
    hw.hardware = vec!["jetson-orin".into()];
    cases.push((
        "wrong hardware",
        SignedRelease::sign(&hw, &key()),
        Box::new(|k| {
            matches!(
                k,
                EventKind::Refused {
                    reason: Refusal::WrongHardware { .. }
                }
            )
        }),
    ));

    for (i, (name, signed, want)) in cases.into_iter().enumerate() {
        let sequence = 2 + i as u64;
        obs.publish_desired(&desired(&dev.id, sequence, Some(signed), 0));
        let e = obs.wait_event(name, PATIENCE, |e| {
            e.sequence == sequence
                && matches!(e.kind, EventKind::Refused { .. } | EventKind::Failed { .. })
        });
        assert!(want(&e.kind), "{name}: got {:?}", e.kind);
        let r = obs.wait_state(name, |r| r.applied_sequence == sequence);
        assert_eq!(
            r.active.as_ref().map(|a| a.version.as_str()),
            Some("1.0.0"),
            "{name}"
        );
        assert_eq!(r.highest_counter, 5, "{name}: the counter moved");
        assert_eq!(dev.snapshot(), before, "{name}: slots or link changed");
        assert_eq!(dev.app_version().as_deref(), Some("1.0.0"), "{name}");
    }
    obs.assert_no_gap();
}
