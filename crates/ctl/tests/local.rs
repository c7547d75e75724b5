//! fleetctl commands that need no coordinator: keys, signing, verification, packing, and what
//! an operator sees when the coordinator cannot be reached.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

use std::path::Path;
use std::process::{Command, Output};

use fleet_proto::release::SignedRelease;

fn fleetctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleetctl"))
        .args(args)
        .current_dir(dir)
        // Never pick up the developer's own config or broker.
        .env("XDG_CONFIG_HOME", dir)
        .env_remove("FLEET_BROKER")
        .output()
        .unwrap()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn ok(out: Output) -> String {
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

#[track_caller]
fn fails(out: Output, code: i32) -> String {
    let (stdout, stderr) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stderr
}

const MANIFEST: &str = r#"
[release]
name = "detector"
version = "2.4.1"
counter = 42
expires = "2099-01-01T00:00:00Z"
hardware = ["rpi4"]
rollback_to = { counter = 41, version = "2.4.0" }

[artifacts.aarch64]
url = "file:///srv/detector.tar.gz"
sha256 = "3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"
size = 10

[run]
entrypoint = "bin/detector"

[resources]
disk_mb = 10
memory_mb = 10

[health]
endpoint = "http://127.0.0.1:{port}/health"
"#;

#[test]
fn keygen_sign_verify_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(fleetctl(dir.path(), &["keygen"]));
    assert!(out.contains("wrote ./release.key"), "{out}");
    let mode = std::fs::metadata(dir.path().join("release.key")).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        mode.permissions().mode() & 0o777,
        0o600,
        "the secret key is private"
    );

    let err = fails(fleetctl(dir.path(), &["keygen"]), 1);
    assert!(err.contains("error: ./release.key already exists"), "{err}");
    assert!(err.contains("hint: a key is never overwritten"), "{err}");

    std::fs::write(dir.path().join("detector.toml"), MANIFEST).unwrap();
    let out = ok(fleetctl(
        dir.path(),
        &["manifest", "sign", "detector.toml", "--key", "release.key"],
    ));
    assert!(
        out.contains("signed detector 2.4.1 (#42) with key"),
        "{out}"
    );
    let signed = SignedRelease::from_json(
        &std::fs::read_to_string(dir.path().join("detector.release")).unwrap(),
    )
    .unwrap();

    let out = ok(fleetctl(
        dir.path(),
        &[
            "manifest",
            "verify",
            "detector.release",
            "--pub",
            "release.pub",
        ],
    ));
    assert!(
        out.contains(&format!(
            "ok: detector 2.4.1 (#42) signed by key {}",
            signed.key_id
        )),
        "{out}"
    );
    assert!(
        out.contains("rollback   may return to 2.4.0 (#41)"),
        "{out}"
    );

    // A second key pair: the release is not signed by it.
    ok(fleetctl(dir.path(), &["keygen", "--name", "other"]));
    let err = fails(
        fleetctl(
            dir.path(),
            &[
                "manifest",
                "verify",
                "detector.release",
                "--pub",
                "other.pub",
            ],
        ),
        3,
    );
    assert!(
        err.contains("error: release refused: signed by unknown key"),
        "{err}"
    );

    // One flipped byte in the signed bytes.
    let mut tampered = signed.clone();
    tampered.release[10] ^= 0x01;
    std::fs::write(dir.path().join("tampered.release"), tampered.to_json()).unwrap();
    let err = fails(
        fleetctl(
            dir.path(),
            &[
                "manifest",
                "verify",
                "tampered.release",
                "--pub",
                "release.pub",
            ],
        ),
        3,
    );
    assert!(err.contains("bad signature"), "{err}");
}

#[test]
fn signing_refuses_invalid_manifests_and_absurd_counter_jumps() {
    let dir = tempfile::tempdir().unwrap();
    ok(fleetctl(dir.path(), &["keygen"]));
    let broken = MANIFEST
        .replace("counter = 42", "counter = 0")
        .replace("disk_mb = 10", "disk_mb = -1");
    std::fs::write(dir.path().join("broken.toml"), broken).unwrap();
    let err = fails(
        fleetctl(
            dir.path(),
            &["manifest", "sign", "broken.toml", "--key", "release.key"],
        ),
        3,
    );
    assert!(err.contains("invalid manifest: 2 problems"), "{err}");
    assert!(
        err.contains("release.counter: must be at least 1, got 0"),
        "{err}"
    );
    assert!(
        err.contains("resources.disk_mb: must be above 0, got -1"),
        "{err}"
    );
    assert!(
        !dir.path().join("broken.release").exists(),
        "nothing written for a refused manifest"
    );

    let jump = MANIFEST.replace("counter = 42", "counter = 5000000");
    std::fs::write(dir.path().join("jump.toml"), jump).unwrap();
    let err = fails(
        fleetctl(
            dir.path(),
            &["manifest", "sign", "jump.toml", "--key", "release.key"],
        ),
        3,
    );
    assert!(
        err.contains(
            "release counter 5000000 is 4999959 above the release it rolls back to (2.4.0 #41)"
        ),
        "{err}"
    );
    assert!(err.contains("--allow-counter-jump"), "{err}");
    ok(fleetctl(
        dir.path(),
        &[
            "manifest",
            "sign",
            "jump.toml",
            "--key",
            "release.key",
            "--allow-counter-jump",
        ],
    ));
}

#[test]
fn signing_refuses_a_blue_green_release_with_data_directories() {
    let dir = tempfile::tempdir().unwrap();
    ok(fleetctl(dir.path(), &["keygen"]));
    let blue_green = MANIFEST.to_owned()
        + "\n[strategy]\nkind = \"blue-green\"\n\n[data]\ndirs = [\"/var/lib/detector\"]\n";
    std::fs::write(dir.path().join("detector.toml"), blue_green).unwrap();
    let err = fails(
        fleetctl(
            dir.path(),
            &["manifest", "sign", "detector.toml", "--key", "release.key"],
        ),
        3,
    );
    assert!(
        err.contains(
            "detector.toml: invalid manifest: 1 problem\n  - strategy.kind: blue-green runs the new version beside the old one on the same data, so the data directories in data.dirs (/var/lib/detector) cannot be snapshotted for a rollback; ship this release as canary-rolling, or take them out of data.dirs if both versions can share that data as it is (nothing then restores it on a rollback)\n"
        ),
        "{err}"
    );
    assert!(
        err.contains("hint: fix every problem listed, then sign again"),
        "{err}"
    );
    assert!(
        !dir.path().join("detector.release").exists(),
        "nothing written for a refused manifest"
    );
}

#[test]
fn rollout_commands_refuse_unsigned_or_altered_manifests_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    ok(fleetctl(dir.path(), &["keygen"]));
    std::fs::write(dir.path().join("detector.toml"), MANIFEST).unwrap();
    let err = fails(fleetctl(dir.path(), &["plan", "detector.toml"]), 3);
    assert!(
        err.contains("error: detector.toml is not signed: detector.release does not exist"),
        "{err}"
    );
    assert!(
        err.contains("hint: fleetctl manifest sign detector.toml --key release.key"),
        "{err}"
    );

    ok(fleetctl(
        dir.path(),
        &["manifest", "sign", "detector.toml", "--key", "release.key"],
    ));
    std::fs::write(
        dir.path().join("detector.toml"),
        MANIFEST.replace("memory_mb = 10", "memory_mb = 20"),
    )
    .unwrap();
    let err = fails(
        fleetctl(dir.path(), &["rollout", "start", "detector.toml"]),
        3,
    );
    assert!(
        err.contains("error: detector.toml changed after it was signed (detector.release holds detector 2.4.1 (#42))"),
        "{err}"
    );
}

#[test]
fn an_unreachable_broker_is_reported_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on: bind, read the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let broker = format!("mqtt://127.0.0.1:{port}");
    let err = fails(
        fleetctl(
            dir.path(),
            &["devices", "--broker", &broker, "--timeout", "3s"],
        ),
        4,
    );
    assert!(
        err.contains(&format!("error: cannot connect to the broker at {broker}:")),
        "{err}"
    );
    assert!(
        err.contains("hint: is fleet-coordinator (or your broker) running there?"),
        "{err}"
    );
}

#[test]
fn artifact_pack_is_reproducible_and_prints_the_stanza() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    std::fs::create_dir_all(app.join("bin")).unwrap();
    std::fs::write(app.join("bin/detector"), "#!/bin/sh\necho hi\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(
        app.join("bin/detector"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(app.join("model.bin"), vec![7u8; 4096]).unwrap();

    let args = [
        "artifact",
        "pack",
        "app",
        "--name",
        "detector",
        "--version",
        "1.0",
        "--arch",
        "aarch64",
    ];
    let first = ok(fleetctl(dir.path(), &args));
    let path = dir.path().join("detector-1.0-aarch64.tar.gz");
    let bytes = std::fs::read(&path).unwrap();
    assert!(
        first.starts_with("[artifacts.aarch64]\nurl = \"file:///"),
        "{first}"
    );
    assert!(
        first.contains(&format!("size = {}\n", bytes.len())),
        "{first}"
    );
    let sha = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert!(first.contains(&format!("sha256 = \"{sha}\"")), "{first}");

    // Touch the files: a reproducible archive ignores times.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(app.join("model.bin"), vec![7u8; 4096]).unwrap();
    let second = ok(fleetctl(dir.path(), &args));
    assert_eq!(first, second);

    let err = fails(
        fleetctl(
            dir.path(),
            &[
                "artifact",
                "pack",
                "app",
                "--name",
                "d",
                "--version",
                "1",
                "--arch",
                "sparc",
            ],
        ),
        2,
    );
    assert!(err.contains("unknown architecture \"sparc\""), "{err}");
}

#[test]
fn completions_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let out = ok(fleetctl(dir.path(), &["completions", "bash"]));
    assert!(out.contains("fleetctl") && out.contains("rollout"), "{out}");
}
