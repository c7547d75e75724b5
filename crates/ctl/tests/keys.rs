//! `fleetctl key rotate|show` and the TLS/identity flags, without a coordinator.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

use std::path::Path;
use std::process::{Command, Output};

use fleet_proto::trust::{Pinned, SignedRotation};

fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .current_dir(dir)
        .env("XDG_CONFIG_HOME", dir)
        .env_remove("FLEET_BROKER")
        .env_remove("FLEET_CA")
        .env_remove("FLEET_OPERATOR_KEY")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_rotation_is_signed_by_the_pinned_and_the_new_key_and_checked_before_it_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["release", "release2", "thief"] {
        assert!(fleetctl(d, &["keygen", "--name", name]).status.success());
    }
    // The new key did not sign: refused, nothing written.
    let o = fleetctl(
        d,
        &[
            "key",
            "rotate",
            "--epoch",
            "1",
            "--to",
            "release2.pub",
            "--sign",
            "release.key",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(out(&o).contains("did not sign"), "{}", out(&o));
    assert!(!d.join("rotation-1.json").exists());
    // Not signed by the pinned key (checked with --pinned): refused.
    let o = fleetctl(
        d,
        &[
            "key",
            "rotate",
            "--epoch",
            "1",
            "--to",
            "release2.pub",
            "--sign",
            "thief.key",
            "--sign",
            "release2.key",
            "--pinned",
            "release.pub",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(out(&o).contains("not signed by pinned key"), "{}", out(&o));
    // Both: written, and a device pinning release.pub accepts it.
    let o = fleetctl(
        d,
        &[
            "key",
            "rotate",
            "--epoch",
            "1",
            "--to",
            "release2.pub",
            "--sign",
            "release.key",
            "--sign",
            "release2.key",
            "--pinned",
            "release.pub",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let signed =
        SignedRotation::from_json(&std::fs::read_to_string(d.join("rotation-1.json")).unwrap())
            .unwrap();
    let key = |name: &str| {
        fleet_proto::release::parse_public_key(
            &std::fs::read_to_string(d.join(format!("{name}.pub"))).unwrap(),
        )
        .unwrap()
    };
    let (_, after) = signed
        .verify(&Pinned {
            epoch: 0,
            keys: vec![key("release")],
        })
        .unwrap();
    assert_eq!(after.keys, vec![key("release2")]);
    let shown = out(&fleetctl(d, &["key", "show", "rotation-1.json"]));
    assert!(shown.contains("epoch      1"), "{shown}");
}

#[test]
fn mqtts_needs_a_ca_and_a_broken_operator_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = fleetctl(d, &["--broker", "mqtts://127.0.0.1:1", "devices"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("--ca"), "{}", out(&o));
    std::fs::write(d.join("bad.key"), "not a key").unwrap();
    let o = fleetctl(
        d,
        &[
            "--broker",
            "mqtt://127.0.0.1:1",
            "--operator-key",
            "bad.key",
            "devices",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("operator key bad.key"), "{}", out(&o));
    let o = fleetctl(
        d,
        &[
            "--broker",
            "mqtts://127.0.0.1:1",
            "--ca",
            "missing.pem",
            "devices",
        ],
    );
    assert!(!o.status.success());
    assert!(out(&o).contains("missing.pem"), "{}", out(&o));
}
