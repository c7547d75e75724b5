//! The manifest a release engineer writes: defaults, and every problem reported at once.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

mod common;

use std::time::Duration;

use common::NOW;
use fleet_proto::manifest::parse;
use fleet_proto::release::{Approval, Arch, RestartPolicy, StrategyKind};

const EXAMPLE: &str = include_str!("../../../deploy/manifests/example.toml");
const CONTAINER_EXAMPLE: &str = include_str!("../../../deploy/manifests/container.toml");

#[test]
fn the_shipped_container_example_is_valid() {
    let r = parse(CONTAINER_EXAMPLE, NOW).unwrap();
    let c = r.container.as_ref().unwrap();
    assert_eq!(c.image, "detector:2.4.1");
    assert_eq!(c.load.as_deref(), Some("image.tar"));
    assert_eq!(c.image_id, None);
    assert_eq!(c.name, "detector");
    assert_eq!(c.network.as_deref(), Some("bridge"));
    assert_eq!(c.ports, ["{port}:8080"]);
    assert_eq!(c.volumes.len(), 2);
    assert_eq!(c.devices, ["/dev/video0"]);
    assert_eq!(c.restart, RestartPolicy::UnlessStopped);
    assert_eq!(r.run.entrypoint, "", "the image's entrypoint");
    assert_eq!(r.run.args[0], "--port");
    assert_eq!(r.data_dirs, ["/var/lib/detector"]);
    // A process release has neither.
    let p = parse(EXAMPLE, NOW).unwrap();
    assert!(p.container.is_none() && p.data_dirs.is_empty());
}

#[test]
fn the_shipped_example_is_valid() {
    let r = parse(EXAMPLE, NOW).unwrap();
    assert_eq!(r.label(), "detector 2.4.1 (#42)");
    assert_eq!(r.rollback_to.as_ref().unwrap().counter, 41);
    assert_eq!(r.artifacts.len(), 2);
    assert_eq!(r.artifacts[&Arch::Aarch64].size, 48_213_504);
    assert_eq!(r.run.args, ["--port", "{port}"]);
    assert_eq!(r.resources.memory_bytes, 256 << 20);
    assert_eq!(r.strategy.kind, StrategyKind::CanaryRolling);
    assert_eq!(r.strategy.canary_soak, Duration::from_secs(1800));
    assert_eq!(r.trial.good_probes, 3);
    assert_eq!(r.target.tags, ["camera"]);
    assert!(r.probe.is_some());
}

const MINIMAL: &str = r#"
[release]
name = "detector"
version = "1.0.0"
counter = 1
expires = "2027-01-01T00:00:00Z"
hardware = ["rpi4"]

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
fn omitted_sections_take_product_defaults() {
    let r = parse(MINIMAL, NOW).unwrap();
    assert_eq!(r.not_before, NOW, "not_before defaults to the signing time");
    assert_eq!(r.health.expected_version, "1.0.0");
    assert_eq!(r.strategy.canary_percent, 5.0);
    assert_eq!(r.strategy.waves, [25, 50, 100]);
    assert_eq!(r.strategy.approval, Approval::Manual);
    let t = &r.thresholds;
    assert_eq!(
        (t.error_rate_pts, t.p95_latency_pct, t.crash_loop_restarts),
        (5.0, 50.0, 3)
    );
    assert_eq!(t.crash_loop_window, Duration::from_secs(300));
    assert_eq!(
        (t.memory_pct, t.unreachable_pct, t.fleet_error_rate_pts),
        (90.0, 10.0, 10.0)
    );
    assert!(r.probe.is_none());
}

#[track_caller]
fn check(manifest: &str, expect: &[&str]) {
    let errors = parse(manifest, NOW).unwrap_err();
    let got: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(got, expect, "\nfull message:\n{errors}");
}

#[test]
fn five_mistakes_are_reported_together_each_naming_its_field() {
    let broken = MINIMAL
        .replace("counter = 1", "counter = 0")
        .replace(
            "sha256 = \"3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29\"",
            "sha256 = \"not-a-digest\"",
        )
        .replace(
            "entrypoint = \"bin/detector\"",
            "entrypoint = \"../../bin/sh\"",
        )
        .replace("memory_mb = 10", "memory_mb = 10\ncpus = 2")
        + "\n[strategy]\ncanary_percent = 40\nwaves = [50, 25, 100]\n";
    check(
        &broken,
        &[
            "release.counter: must be at least 1, got 0",
            "artifacts.aarch64.sha256: expected 64 hex digits, got \"not-a-digest\"",
            "run.entrypoint: \"../../bin/sh\" must be a path inside the slot (relative, without '..')",
            "resources.cpus: unknown key",
            "strategy.canary_percent: must be between 1 and 5, got 40",
            "strategy.waves: [50, 25, 100] must increase: each wave is the cumulative share of the remaining fleet",
        ],
    );
    let message = parse(&broken, NOW).unwrap_err().to_string();
    assert!(
        message.starts_with("invalid manifest: 6 problems\n  - release.counter"),
        "{message}"
    );
}

#[test]
fn missing_sections_are_each_named() {
    check(
        "[release]\nname = \"x\"\nversion = \"1\"\n",
        &[
            "release.counter: required: a number higher than every earlier release's",
            "release.expires: required: a release that never expires can be replayed forever; e.g. expires = \"2027-06-01T00:00:00Z\"",
            "release.hardware: required: the device types this release is built for, e.g. [\"rpi4\"]",
            "artifacts: required: at least one [artifacts.ARCH] with url, sha256 and size",
            "run: required: entrypoint (and optional args, env)",
            "resources: required: disk_mb and memory_mb",
            "health: required: an application health endpoint; \"responds to ping\" is never healthy",
        ],
    );
}

#[test]
fn wrong_types_and_bad_values_name_their_fields() {
    let broken = MINIMAL
        .replace("[artifacts.aarch64]", "[artifacts.sparc]")
        .replace("size = 10", "size = \"big\"")
        .replace(
            "expires = \"2027-01-01T00:00:00Z\"",
            "expires = \"2020-01-01T00:00:00Z\"",
        )
        + "\n[trial]\ndeadline = \"10s\"\n[thresholds]\nmemory_pct = 120\ncrash_loop_window = \"soon\"\n";
    check(
        &broken,
        &[
            "release.expires: 2020-01-01T00:00:00Z is not after not_before (2026-11-27T10:00:00Z)",
            "artifacts.sparc: unknown architecture \"sparc\"; known: x86_64, aarch64, armv7",
            "artifacts.sparc.size: must be an integer, found string",
            "trial.deadline: 10s cannot fit 3 probes 5s apart; lengthen the deadline",
            "thresholds.crash_loop_window: \"soon\" is not a duration such as \"30s\", \"15m\" or \"1h\" (expected number at 0)",
            "thresholds.memory_pct: must be above 0 and at most 100, got 120",
        ],
    );
}

#[test]
fn big_bang_is_refused_with_an_explanation() {
    check(
        &(MINIMAL.to_owned() + "\n[strategy]\nkind = \"big-bang\"\n"),
        &[
            "strategy.kind: big-bang (every device at once) is refused: a bad release would reach the whole fleet before any health gate could stop it; use canary-rolling",
        ],
    );
}

#[test]
fn an_ab_release_keeps_its_arm_share_and_window_in_the_canary_fields() {
    let r = parse(
        &(MINIMAL.to_owned()
            + "\n[strategy]\nkind = \"ab\"\nab_percent = 20\nobservation = \"45m\"\n"),
        NOW,
    )
    .unwrap();
    assert_eq!(r.strategy.kind, StrategyKind::Ab);
    assert_eq!(r.strategy.canary_percent, 20.0);
    assert_eq!(r.strategy.canary_soak, Duration::from_secs(45 * 60));
    // Without them: 10 % per arm, observed for the canary soak.
    let r = parse(&(MINIMAL.to_owned() + "\n[strategy]\nkind = \"ab\"\n"), NOW).unwrap();
    assert_eq!(r.strategy.canary_percent, 10.0);
    assert_eq!(r.strategy.canary_soak, Duration::from_secs(15 * 60));
}

#[test]
fn ab_keys_are_refused_outside_ab_and_out_of_range_inside() {
    check(
        &(MINIMAL.to_owned() + "\n[strategy]\nab_percent = 20\nobservation = \"1h\"\n"),
        &[
            "strategy.ab_percent: only for kind = \"ab\" (this strategy is canary-rolling)",
            "strategy.observation: only for kind = \"ab\" (this strategy is canary-rolling)",
        ],
    );
    check(
        &(MINIMAL.to_owned() + "\n[strategy]\nkind = \"ab\"\nab_percent = 60\n"),
        &[
            "strategy.ab_percent: each arm's share must be between 1 and 50 % of the targets, got 60",
        ],
    );
}

#[test]
fn rollback_target_must_be_older() {
    check(
        &MINIMAL.replace(
            "hardware = [\"rpi4\"]",
            "hardware = [\"rpi4\"]\nrollback_to = { counter = 5, version = \"0.9\" }",
        ),
        &["release.rollback_to.counter: must be below the release's own counter, got 5"],
    );
}

#[test]
fn not_toml_at_all() {
    let errors = parse("[release\nname=", NOW).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].field, "(document)");
    assert!(
        errors.0[0].problem.starts_with("not valid TOML"),
        "{errors}"
    );
}

#[test]
fn a_container_release_needs_no_run_section_and_defaults_its_name() {
    let m = MINIMAL.replace("[run]\nentrypoint = \"bin/detector\"\n", "")
        + "\n[container]\nimage = \"sha256:3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29\"\n";
    let r = parse(&m, NOW).unwrap();
    let c = r.container.unwrap();
    assert_eq!(c.name, "detector");
    assert_eq!(c.restart, RestartPolicy::UnlessStopped);
    assert!(c.load.is_none() && c.ports.is_empty());
    assert_eq!(r.run.entrypoint, "");
}

#[test]
fn container_and_data_mistakes_are_reported_together_each_naming_its_field() {
    let broken = MINIMAL.to_owned()
        + r#"
[container]
image = "detector:2.0"
name = "Detector"
ports = ["{port}:80", "80", "1.2.3:80:80", "80:99999/sctp"]
volumes = ["data:/data", "/a:/b:rx"]
devices = ["video0"]
restart = "sometimes"
cpus = 2

[data]
dirs = ["/var/lib/d", "relative", "/var/lib/d/sub", "/"]
"#;
    check(
        &broken,
        &[
            "container.image_id: required when there is no `load` tarball: the image already on the device is pinned by its id",
            "container.name: \"Detector\" must be 1-64 lowercase letters, digits, '.', '_' or '-' (it names the container and its rollback image Detector:fleet-rollback)",
            "container.ports[1]: \"80\" must be [IP:]HOST:CONTAINER[/tcp|/udp]",
            "container.ports[2]: \"1.2.3:80:80\": \"1.2.3\" is not an IP address",
            "container.ports[3]: \"80:99999/sctp\": protocol \"sctp\" must be tcp or udp",
            "container.volumes[0]: \"data:/data\" must be /HOST:/CONTAINER[:ro|:rw] with absolute paths",
            "container.volumes[1]: \"/a:/b:rx\": mode \"rx\" must be ro or rw",
            "container.devices[0]: \"video0\" must be /dev/HOST[:/dev/CONTAINER[:PERMS]] (PERMS of r, w, m)",
            "container.restart: \"sometimes\" must be no, on-failure, always or unless-stopped",
            "container.cpus: unknown key",
            "data.dirs[1]: \"relative\" must be an absolute directory path other than / (without '.' or '..')",
            "data.dirs[2]: \"/var/lib/d/sub\" overlaps \"/var/lib/d\": name each directory once",
            "data.dirs[3]: \"/\" must be an absolute directory path other than / (without '.' or '..')",
        ],
    );
    // Host networking publishes nothing; a bad load path and image id are named too.
    let host = MINIMAL.to_owned()
        + "[container]\nimage = \"d:1\"\nload = \"../image.tar\"\nimage_id = \"sha256:abc\"\nnetwork = \"host\"\nports = [\"{port}:80\"]\n";
    check(
        &host,
        &[
            "container.load: \"../image.tar\" must be a path inside the artifact (relative, without '..')",
            "container.image_id: \"sha256:abc\" must be an image id: sha256: and 64 lowercase hex digits",
            "container.ports: must be empty with network = \"host\": the container already uses the device's ports",
        ],
    );
}

#[test]
fn blue_green_with_data_directories_or_a_container_is_refused_naming_both_fields() {
    let bg = "\n[strategy]\nkind = \"blue-green\"\n";
    let data = "\n[data]\ndirs = [\"/var/lib/detector\", \"/srv/models/\"]\n";
    check(
        &(MINIMAL.to_owned() + bg + data),
        &[
            "strategy.kind: blue-green runs the new version beside the old one on the same data, so the data directories in data.dirs (/var/lib/detector, /srv/models) cannot be snapshotted for a rollback; ship this release as canary-rolling, or take them out of data.dirs if both versions can share that data as it is (nothing then restores it on a rollback)",
        ],
    );
    // A container release: the container runtime refuses blue-green, no other runtime runs
    // the container; with data directories both reasons are given, beside any other problem.
    let container = MINIMAL.replace("[run]\nentrypoint = \"bin/detector\"\n", "")
        + "\n[container]\nimage = \"sha256:3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29\"\n";
    check(
        &(container.clone() + bg),
        &[
            "strategy.kind: blue-green needs the process runtime, and a release with a [container] section runs only on the container runtime, where every agent refuses blue-green; ship this release as canary-rolling",
        ],
    );
    let errors = parse(
        &(container.replace("counter = 1", "counter = 0") + bg + data),
        NOW,
    )
    .unwrap_err();
    let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["release.counter", "strategy.kind", "strategy.kind"],
        "{errors}"
    );
    assert!(
        errors.0[1]
            .problem
            .contains("data.dirs (/var/lib/detector, /srv/models)")
    );
    assert!(errors.0[2].problem.contains("[container]"));

    // Either alone is fine: blue-green without data directories, data directories under the
    // default strategy.
    let r = parse(&(MINIMAL.to_owned() + bg), NOW).unwrap();
    assert_eq!(r.strategy.kind, StrategyKind::BlueGreen);
    assert!(r.data_dirs.is_empty() && r.container.is_none());
    let r = parse(&(MINIMAL.to_owned() + data), NOW).unwrap();
    assert_eq!(r.data_dirs, ["/var/lib/detector", "/srv/models"]);
    // The shipped container example (default strategy) has both.
    let errors = parse(&(CONTAINER_EXAMPLE.to_owned() + bg), NOW).unwrap_err();
    assert_eq!(errors.0.len(), 2, "{errors}");
}
