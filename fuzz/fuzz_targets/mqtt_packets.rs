//! Any bytes as the first packet (CONNECT) or a later PUBLISH/SUBSCRIBE from a client of the
//! embedded broker's guard, before any authentication: refused or parsed, never a panic; a
//! CONNECT that parses is rewritten (password replaced) into one that parses to the same client
//! id, username, will topic and will message.
#![no_main]

// The coordinator's parser, included as it is (std only), so this target does not build the
// whole coordinator (SQLite, rumqttd, axum) with coverage instrumentation.
#[path = "../../crates/coordinator/src/mqtt_wire.rs"]
#[allow(dead_code)]
mod mqtt_wire;

use libfuzzer_sys::fuzz_target;
use mqtt_wire::{Connect, publish_payload_len, publish_topic, subscribe_filters};

fuzz_target!(|packet: &[u8]| {
    let _ = publish_topic(packet);
    let _ = publish_payload_len(packet);
    let _ = subscribe_filters(packet);
    if let Ok(c) = Connect::parse(packet) {
        let again = Connect::parse(&c.with_password("secret")).expect("a rewritten CONNECT parses");
        assert_eq!(again.client_id, c.client_id);
        assert_eq!(again.will_topic, c.will_topic);
        assert_eq!(again.password.as_deref(), Some(&b"secret"[..]));
        if c.username.is_some() {
            assert_eq!(again.username, c.username);
        }
    }
});
