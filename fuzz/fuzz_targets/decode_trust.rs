//! Any bytes on `fleet/v1/trust`: decode or a typed refusal, never a panic; a chain that decodes
//! round-trips; following it from a pinned key applies epochs in increasing order, pins exactly
//! what each applied link names, and following again from where it ended applies nothing (a
//! replayed chain changes nothing); and nothing forges a rotation of a key nobody signed with.
#![no_main]

use fleet_proto::SigningKey;
use fleet_proto::trust::{Pinned, TrustChain, follow};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(chain) = fleet_proto::decode::<TrustChain>(frame) {
        let again = fleet_proto::encode(&chain);
        let back = fleet_proto::decode::<TrustChain>(&again).expect("a re-encoded chain decodes");
        assert_eq!(back, chain);
        // The seeds are signed by [1; 32]: mutations of them exercise the real checks.
        let pinned = Pinned {
            epoch: 0,
            keys: vec![SigningKey::from_bytes(&[1; 32]).verifying_key()],
        };
        let (applied, _refused) = follow(&chain, &pinned);
        let mut epoch = 0;
        for a in &applied {
            assert!(a.rotation.epoch > epoch, "epochs must increase");
            epoch = a.rotation.epoch;
            assert_eq!(a.pinned.epoch, a.rotation.epoch);
            assert_eq!(
                a.rotation.verifying_keys().expect("applied keys parse"),
                a.pinned.keys
            );
        }
        if let Some(last) = applied.last() {
            let (more, _) = follow(&chain, &last.pinned);
            assert!(
                more.is_empty(),
                "following the same chain again applied more"
            );
        }
        // A key nothing in the input was signed with: never rotated.
        let other = Pinned {
            epoch: 0,
            keys: vec![SigningKey::from_bytes(&[9; 32]).verifying_key()],
        };
        assert!(
            follow(&chain, &other).0.is_empty(),
            "a forged rotation was applied"
        );
    }
});
