//! Signed releases: what an agent admits and what it refuses, with the reason a person reads.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

mod common;

use std::time::Duration;

use common::{NOW, dev, facts, key, release};
use fleet_proto::UnixMillis;
use fleet_proto::release::{Accepted, Refusal, RollbackTo, SignedRelease, Trust, admit, key_id};
use fleet_proto::{SigningKey, VerifyingKey};

struct Device {
    keys: Vec<VerifyingKey>,
    highest: Option<Accepted>,
    facts: fleet_proto::device::DeviceFacts,
    id: fleet_proto::DeviceId,
    now: UnixMillis,
}

impl Device {
    fn new() -> Self {
        Device {
            keys: vec![key(1).verifying_key()],
            highest: None,
            facts: facts("rpi4", "eu-west"),
            id: dev("cam-017"),
            now: NOW,
        }
    }

    fn admit(&self, signed: &SignedRelease) -> Result<fleet_proto::Release, Refusal> {
        admit(
            signed,
            &Trust {
                keys: &self.keys,
                now: self.now,
                skew: Duration::from_secs(300),
                highest: self.highest.as_ref(),
                device: &self.id,
                facts: &self.facts,
            },
        )
    }

    /// Admits and records the release as the agent would.
    fn accept(&mut self, signed: &SignedRelease) -> Result<(), Refusal> {
        let r = self.admit(signed)?;
        if self.highest.as_ref().is_none_or(|h| r.counter > h.counter) {
            self.highest = Some(Accepted {
                counter: r.counter,
                digest: signed.digest(),
                rollback_to: r.rollback_to,
            });
        }
        Ok(())
    }
}

fn signed(counter: u64, version: &str, key: &SigningKey) -> SignedRelease {
    SignedRelease::sign(&release(counter, version), key)
}

#[test]
fn a_good_release_is_admitted_and_decodes_to_what_was_signed() {
    let s = signed(42, "2.4.1", &key(1));
    assert_eq!(Device::new().admit(&s).unwrap(), release(42, "2.4.1"));
}

#[test]
fn flipping_any_single_bit_of_the_signed_bytes_or_signature_is_refused() {
    let device = Device::new();
    let good = signed(42, "2.4.1", &key(1));
    let bits = good.release.len() * 8;
    for bit in 0..bits {
        let mut bad = good.clone();
        bad.release[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            device.admit(&bad),
            Err(Refusal::BadSignature {
                key_id: good.key_id
            }),
            "bit {bit} of {bits} flipped in the release bytes"
        );
    }
    for bit in 0..512 {
        let mut bad = good.clone();
        bad.signature.0[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            device.admit(&bad),
            Err(Refusal::BadSignature {
                key_id: good.key_id
            }),
            "bit {bit} flipped in the signature"
        );
    }
    assert_eq!(
        Refusal::BadSignature {
            key_id: good.key_id
        }
        .to_string(),
        format!(
            "bad signature (key {}): the release was altered or not signed by the release key",
            good.key_id
        )
    );
}

#[test]
fn an_unknown_key_is_named() {
    let s = signed(42, "2.4.1", &key(9));
    let err = Device::new().admit(&s).unwrap_err();
    assert_eq!(
        err,
        Refusal::UnknownKey {
            key_id: key_id(&key(9).verifying_key())
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "signed by unknown key {}; pin the release key in the agent's config or sign with a pinned key",
            key_id(&key(9).verifying_key())
        )
    );
}

#[test]
fn two_pinned_keys_allow_rotation() {
    let mut device = Device::new();
    device.keys.push(key(2).verifying_key());
    device.accept(&signed(42, "2.4.1", &key(1))).unwrap();
    device.accept(&signed(43, "2.4.2", &key(2))).unwrap();
}

#[test]
fn an_older_counter_is_refused() {
    let mut device = Device::new();
    device.accept(&signed(42, "2.4.1", &key(1))).unwrap();
    let err = device.admit(&signed(41, "2.4.0", &key(1))).unwrap_err();
    assert_eq!(
        err,
        Refusal::CounterWentDown {
            counter: 41,
            highest: 42
        }
    );
    assert_eq!(
        err.to_string(),
        "release counter 41 is below the highest accepted 42 and no signed rollback allows it (replayed or downgraded release)"
    );
}

#[test]
fn the_same_release_again_is_admitted_but_a_reused_counter_is_not() {
    let mut device = Device::new();
    let s = signed(42, "2.4.1", &key(1));
    device.accept(&s).unwrap();
    device.accept(&s).unwrap();
    assert_eq!(
        device.admit(&signed(42, "2.4.1-hotfix", &key(1))),
        Err(Refusal::CounterReused { counter: 42 })
    );
}

#[test]
fn an_explicit_signed_rollback_is_accepted_and_only_to_the_named_release() {
    let mut device = Device::new();
    device.accept(&signed(41, "2.4.0", &key(1))).unwrap();
    let mut newer = release(42, "2.4.1");
    newer.rollback_to = Some(RollbackTo {
        counter: 41,
        version: "2.4.0".into(),
    });
    device
        .accept(&SignedRelease::sign(&newer, &key(1)))
        .unwrap();

    device.accept(&signed(41, "2.4.0", &key(1))).unwrap();
    assert_eq!(
        device.highest.as_ref().unwrap().counter,
        42,
        "the highest counter never goes down"
    );
    assert_eq!(
        device.admit(&signed(40, "2.3.9", &key(1))),
        Err(Refusal::CounterWentDown {
            counter: 40,
            highest: 42
        })
    );
    assert_eq!(
        device.admit(&signed(41, "2.3.0-vulnerable", &key(1))),
        Err(Refusal::CounterWentDown {
            counter: 41,
            highest: 42
        }),
        "the rollback names the version too"
    );
}

#[test]
fn validity_window_is_checked_with_skew() {
    let mut device = Device::new();
    let r = release(42, "2.4.1");
    device.now = UnixMillis(r.expires.0 + 299_000);
    device.admit(&signed(42, "2.4.1", &key(1))).unwrap();
    device.now = UnixMillis(r.expires.0 + 301_000);
    let err = device.admit(&signed(42, "2.4.1", &key(1))).unwrap_err();
    assert!(matches!(err, Refusal::Expired { .. }));
    assert_eq!(
        err.to_string(),
        "expired at 2026-12-27T10:00:00Z (device time 2026-12-27T10:05:01Z); sign a fresh release"
    );
    device.now = UnixMillis(r.not_before.0 - 301_000);
    assert!(matches!(
        device.admit(&signed(42, "2.4.1", &key(1))),
        Err(Refusal::NotYetValid { .. })
    ));
}

#[test]
fn wrong_hardware_architecture_and_target_are_refused() {
    let s = signed(42, "2.4.1", &key(1));
    let mut device = Device::new();
    device.facts.device_type = "x86-gateway".into();
    let err = device.admit(&s).unwrap_err();
    assert_eq!(
        err.to_string(),
        "built for [jetson-orin, rpi4], not for device type x86-gateway"
    );

    let mut device = Device::new();
    device.facts.arch = fleet_proto::release::Arch::Armv7;
    assert_eq!(
        device.admit(&s).unwrap_err().to_string(),
        "has no artifact for this device's architecture armv7"
    );

    let mut only_a = release(42, "2.4.1");
    only_a.target.devices = vec![dev("cam-001")];
    let for_a = SignedRelease::sign(&only_a, &key(1));
    assert_eq!(
        Device::new().admit(&for_a).unwrap_err().to_string(),
        "not targeted at this device: device cam-017 is not in the target's device list",
        "a release for device A replayed to device B"
    );

    let mut us_only = release(42, "2.4.1");
    us_only.target.regions = vec!["us-east".into()];
    assert_eq!(
        Device::new()
            .admit(&SignedRelease::sign(&us_only, &key(1)))
            .unwrap_err()
            .to_string(),
        "not targeted at this device: region eu-west is not in the target's regions [us-east]"
    );
}

#[test]
fn signed_release_text_form_round_trips() {
    let s = signed(42, "2.4.1", &key(1));
    let text = s.to_json();
    assert!(text.contains(&s.key_id.to_string()), "{text}");
    assert_eq!(SignedRelease::from_json(&text).unwrap(), s);
    assert!(
        SignedRelease::from_json("{}")
            .unwrap_err()
            .starts_with("not a signed release")
    );
}

#[test]
fn key_files_parse_and_say_what_is_wrong() {
    use fleet_proto::release::{parse_public_key, parse_signing_key};
    let secret = hex::encode(key(1).to_bytes());
    let public = hex::encode(key(1).verifying_key().to_bytes());
    assert_eq!(
        parse_signing_key(&format!("{secret}\n"))
            .unwrap()
            .to_bytes(),
        key(1).to_bytes()
    );
    assert_eq!(parse_public_key(&public).unwrap(), key(1).verifying_key());
    assert_eq!(
        parse_public_key("abc").unwrap_err(),
        "not a release public key: expected 64 hex digits, got \"abc\""
    );
}
