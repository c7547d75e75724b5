//! Key rotation and operator command signatures: each attack is shown refused.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

mod common;

use common::{NOW, key};
use fleet_proto::hex::Hex;
use fleet_proto::operator::{Command, Request};
use fleet_proto::release::key_id;
use fleet_proto::trust::{
    KeyRotation, Pinned, RotationRefusal, SignedRotation, TrustChain, follow, trusted_now,
};
use fleet_proto::{RequestId, RolloutId, SigningKey, UnixMillis, decode, encode};

fn pinned(epoch: u64, keys: &[&SigningKey]) -> Pinned {
    Pinned {
        epoch,
        keys: keys.iter().map(|k| k.verifying_key()).collect(),
    }
}

fn rotation(epoch: u64, to: &[&SigningKey]) -> KeyRotation {
    KeyRotation {
        epoch,
        keys: to
            .iter()
            .map(|k| Hex(k.verifying_key().to_bytes()))
            .collect(),
        issued_at: NOW,
    }
}

#[test]
fn a_rotation_signed_by_the_pinned_key_and_the_new_key_replaces_the_pinned_key() {
    let (old, new) = (key(1), key(2));
    let signed = SignedRotation::sign(&rotation(1, &[&new]), &[&old, &new]);
    let (r, after) = signed.verify(&pinned(0, &[&old])).unwrap();
    assert_eq!(r.epoch, 1);
    assert_eq!(after, pinned(1, &[&new]));
    // Through the text form (what `fleetctl key rotate` writes) too.
    let again = SignedRotation::from_json(&signed.to_json()).unwrap();
    assert_eq!(again.verify(&pinned(0, &[&old])).unwrap().1, after);
}

#[test]
fn a_rotation_without_every_pinned_key_is_refused() {
    // Key compromise: a thief of one of two pinned keys cannot rotate the other out.
    let (release, recovery, thief) = (key(1), key(2), key(9));
    let takeover = SignedRotation::sign(&rotation(1, &[&thief]), &[&release, &thief]);
    assert_eq!(
        takeover.verify(&pinned(0, &[&release, &recovery])),
        Err(RotationRefusal::MissingSignature {
            epoch: 1,
            key_id: key_id(&recovery.verifying_key())
        })
    );
    // Signed by nobody the device pins at all.
    let forged = SignedRotation::sign(&rotation(1, &[&thief]), &[&thief]);
    assert!(matches!(
        forged.verify(&pinned(0, &[&release])),
        Err(RotationRefusal::MissingSignature { .. })
    ));
    // The owner, holding both, rotates the stolen release key out.
    let recover = SignedRotation::sign(
        &rotation(1, &[&key(3), &recovery]),
        &[&release, &recovery, &key(3)],
    );
    assert_eq!(
        recover
            .verify(&pinned(0, &[&release, &recovery]))
            .unwrap()
            .1,
        pinned(1, &[&key(3), &recovery])
    );
}

#[test]
fn a_new_key_nobody_holds_is_refused() {
    let (old, new) = (key(1), key(2));
    let unproven = SignedRotation::sign(&rotation(1, &[&new]), &[&old]);
    assert_eq!(
        unproven.verify(&pinned(0, &[&old])),
        Err(RotationRefusal::NoProofOfPossession {
            epoch: 1,
            key_id: key_id(&new.verifying_key())
        })
    );
}

#[test]
fn an_old_or_altered_rotation_is_refused() {
    let (old, new) = (key(1), key(2));
    let signed = SignedRotation::sign(&rotation(1, &[&old, &new]), &[&old, &new]);
    // Replayed after the device moved on.
    assert_eq!(
        signed.verify(&pinned(1, &[&old, &new])),
        Err(RotationRefusal::Stale {
            epoch: 1,
            current: 1
        })
    );
    // Any altered byte: unreadable, or a bad signature.
    for i in 0..signed.rotation.len() {
        let mut bad = signed.clone();
        bad.rotation[i] ^= 0x01;
        assert!(bad.verify(&pinned(0, &[&old])).is_err(), "byte {i}");
    }
    let mut bad = signed.clone();
    bad.signatures[0].signature.0[7] ^= 0x80;
    assert!(matches!(
        bad.verify(&pinned(0, &[&old])),
        Err(RotationRefusal::BadSignature { .. })
    ));
}

#[test]
fn a_rotation_to_no_keys_or_too_many_is_refused() {
    let (a, b, c) = (key(1), key(2), key(3));
    let none = SignedRotation::sign(&rotation(1, &[]), &[&a]);
    assert!(matches!(
        none.verify(&pinned(0, &[&a])),
        Err(RotationRefusal::BadKeySet { .. })
    ));
    let three = SignedRotation::sign(&rotation(1, &[&a, &b, &c]), &[&a, &b, &c]);
    assert!(matches!(
        three.verify(&pinned(0, &[&a])),
        Err(RotationRefusal::BadKeySet { .. })
    ));
    let twice = SignedRotation::sign(&rotation(1, &[&a, &a]), &[&a]);
    assert!(matches!(
        twice.verify(&pinned(0, &[&a])),
        Err(RotationRefusal::BadKeySet { .. })
    ));
}

#[test]
fn a_device_that_slept_through_rotations_follows_the_chain_in_order() {
    let (k1, k2, k3) = (key(1), key(2), key(3));
    let chain = TrustChain {
        rotations: vec![
            // Transition: both keys, then the old one dropped, then another new one.
            SignedRotation::sign(&rotation(1, &[&k1, &k2]), &[&k1, &k2]),
            SignedRotation::sign(&rotation(2, &[&k2]), &[&k1, &k2]),
            SignedRotation::sign(&rotation(3, &[&k3]), &[&k2, &k3]),
        ],
    };
    let frame = encode(&chain);
    let chain: TrustChain = decode(&frame).unwrap();
    let (applied, refused) = follow(&chain, &pinned(0, &[&k1]));
    assert_eq!(refused, None);
    assert_eq!(applied.len(), 3);
    assert_eq!(applied[2].pinned, pinned(3, &[&k3]));
    // A device that has epoch 2 applies only the last link.
    let (applied, refused) = follow(&chain, &pinned(2, &[&k2]));
    assert_eq!((applied.len(), refused), (1, None));
    // A device pinning another key stops at the first link it cannot check.
    let (applied, refused) = follow(&chain, &pinned(0, &[&key(7)]));
    assert!(applied.is_empty());
    assert!(matches!(
        refused,
        Some(RotationRefusal::MissingSignature { epoch: 1, .. })
    ));
}

#[test]
fn trusted_time_is_the_later_of_the_clock_and_the_floor() {
    assert_eq!(trusted_now(UnixMillis(5), UnixMillis(9)), UnixMillis(9));
    assert_eq!(trusted_now(UnixMillis(12), UnixMillis(9)), UnixMillis(12));
}

fn request(operator: &str) -> Request {
    Request {
        request_id: RequestId::new("q-9").unwrap(),
        operator: operator.into(),
        command: Command::Abort {
            rollout: RolloutId::new("r-1").unwrap(),
        },
        auth: None,
    }
}

#[test]
fn a_signed_command_verifies_only_unaltered_and_only_with_its_operators_key() {
    let (alice, bob) = (key(11), key(12));
    let signed = request("alice").sign(&alice, NOW);
    // JSON and postcard both carry the signature.
    let json: Request = decode(&encode(&signed)).unwrap();
    assert_eq!(json.verify(&alice.verifying_key()), Ok(NOW));
    let postcard: Request = decode(&fleet_proto::frame::encode_postcard(&signed)).unwrap();
    assert_eq!(postcard.verify(&alice.verifying_key()), Ok(NOW));
    // Another operator's key, another name, another command, another time: refused.
    assert!(signed.verify(&bob.verifying_key()).is_err());
    let mut renamed = signed.clone();
    renamed.operator = "bob".into();
    assert!(renamed.verify(&alice.verifying_key()).is_err());
    let mut changed = signed.clone();
    changed.command = Command::Rollback {
        rollout: RolloutId::new("r-1").unwrap(),
    };
    assert!(changed.verify(&alice.verifying_key()).is_err());
    let mut later = signed.clone();
    if let Some(a) = later.auth.as_mut() {
        a.signed_at = UnixMillis(NOW.0 + 1);
    }
    assert!(later.verify(&alice.verifying_key()).is_err());
    // Unsigned: refused with the reason.
    assert!(
        request("alice")
            .verify(&alice.verifying_key())
            .unwrap_err()
            .contains("not signed")
    );
}

#[test]
fn an_unsigned_command_keeps_the_older_encoding() {
    let json = String::from_utf8(encode(&request("alice"))).unwrap();
    assert!(!json.contains("auth"), "{json}");
    // A postcard request from an older writer (no trailing auth) still reads, as unsigned.
    let postcard = fleet_proto::frame::encode_postcard(&request("alice"));
    let back: Request = decode(&postcard).unwrap();
    assert_eq!(back, request("alice"));
}
