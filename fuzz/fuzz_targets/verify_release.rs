//! Any bytes as a signed release presented to a device: refused unless genuinely signed by the
//! pinned key, never a panic.
#![no_main]

use std::time::Duration;

use fleet_proto::device::DeviceFacts;
use fleet_proto::hex::Hex;
use fleet_proto::release::{Arch, SignedRelease, Trust, admit};
use fleet_proto::{DeviceId, SigningKey, UnixMillis};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&[u8], [u8; 8], [u8; 32], [u8; 32])| {
    let (release, key_id, sig_a, sig_b) = input;
    let mut signature = [0u8; 64];
    signature[..32].copy_from_slice(&sig_a);
    signature[32..].copy_from_slice(&sig_b);
    let key = SigningKey::from_bytes(&[1; 32]).verifying_key();
    // Half the inputs carry the pinned key's id so the signature check itself is exercised.
    let key_id = if key_id[0] & 1 == 0 { fleet_proto::release::key_id(&key) } else { Hex(key_id) };
    let signed = SignedRelease { key_id, signature: Hex(signature), release: release.to_vec() };
    let facts = DeviceFacts {
        device_type: "rpi4".into(),
        arch: Arch::Aarch64,
        region: "eu-west".into(),
        tags: vec![],
        agent_version: "0".into(),
        runtime: "process".into(),
        memory_total_bytes: 1 << 30,
        disk_total_bytes: 1 << 34,
    };
    let device = DeviceId::new("cam-1").expect("a valid id");
    let trust = Trust {
        keys: &[key],
        now: UnixMillis(1_795_773_600_000),
        skew: Duration::from_secs(300),
        highest: None,
        device: &device,
        facts: &facts,
    };
    assert!(admit(&signed, &trust).is_err(), "a forged release was admitted");
});
