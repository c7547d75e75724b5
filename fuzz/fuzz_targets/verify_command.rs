//! Any bytes as an operator command on a coordinator that requires signatures: a request that
//! decodes is never accepted as signed by the operator's key unless it really is (random bytes
//! cannot be), and checking never panics.
#![no_main]

use fleet_proto::SigningKey;
use fleet_proto::operator::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(req) = fleet_proto::decode::<Request>(frame) {
        let key = SigningKey::from_bytes(&[3; 32]);
        assert!(
            req.verify(&key.verifying_key()).is_err(),
            "a forged command verified"
        );
        // Signing it for real makes it verify, and only with that key.
        let signed = req.sign(&key, fleet_proto::UnixMillis(1_795_773_600_000));
        assert!(signed.verify(&key.verifying_key()).is_ok());
        assert!(
            signed
                .verify(&SigningKey::from_bytes(&[4; 32]).verifying_key())
                .is_err()
        );
    }
});
