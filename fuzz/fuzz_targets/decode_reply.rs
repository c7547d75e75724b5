//! Any byte string on a reply topic (what fleetctl reads): decodes or is refused with a typed
//! error, never panics, and whatever decodes re-encodes to a frame that decodes the same.
#![no_main]

use fleet_proto::operator::Reply as Msg;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| {
    if let Ok(msg) = fleet_proto::decode::<Msg>(frame) {
        let again = fleet_proto::encode(&msg);
        let back = fleet_proto::decode::<Msg>(&again).expect("a re-encoded message decodes");
        assert_eq!(fleet_proto::encode(&back), again);
    }
});
