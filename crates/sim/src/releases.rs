//! Demo releases made the way a release engineer makes them: the real `fleet-demo-app` binary
//! packed into a tar.gz (`fleetctl artifact pack`'s code), a TOML manifest validated by
//! `fleet_proto::manifest`, signed with the release key. The artifact is put into the
//! coordinator's content-addressed directory, so agents download it over HTTP.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_proto::release::Arch;
use fleet_proto::{SignedRelease, SigningKey, UnixMillis, manifest};

/// What differs between the demo's releases.
#[derive(Clone, Debug)]
pub struct Spec {
    pub version: String,
    pub counter: u64,
    /// The release devices may return to (its counter and version).
    pub rollback_to: Option<(u64, String)>,
    /// Extra `fleet-demo-app` arguments: this release's faults.
    pub faults: Vec<String>,
    /// `strategy.kind`: `canary-rolling`, `blue-green` or `ab`.
    pub strategy: &'static str,
    /// The trial's consecutive good probes (for blue-green: while warming up, then again
    /// under traffic) and the time between probes.
    pub good_probes: u32,
    pub probe_interval: &'static str,
    /// Strategy `ab` only: each arm's share of the targets in percent (`ab_percent`) and the
    /// observation window before an operator promotes one (`observation`).
    pub ab: Option<(u32, &'static str)>,
}

impl Spec {
    /// A canary-rolling release with the demo's trial (3 good probes 500 ms apart).
    pub fn new(version: &str, counter: u64) -> Spec {
        Spec {
            version: version.into(),
            counter,
            rollback_to: None,
            faults: Vec::new(),
            strategy: "canary-rolling",
            good_probes: 3,
            probe_interval: "500ms",
            ab: None,
        }
    }
}

/// Finds `fleet-demo-app` beside this executable, building it when run through cargo.
pub fn demo_app_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the fleet-sim executable")?;
    let dir = exe.parent().context("fleet-sim has no parent directory")?;
    let app = dir.join("fleet-demo-app");
    if app.exists() {
        return Ok(app);
    }
    // `cargo run -p fleet-sim` builds fleet-sim only; build the app the demo deploys with the
    // same profile (cargo has released its lock by the time this runs).
    let cargo = std::env::var_os("CARGO").with_context(|| {
        format!(
            "{} is missing: build it first with `cargo build --release -p fleet-demo-app`",
            app.display()
        )
    })?;
    let release = dir.ends_with("release");
    eprintln!("building fleet-demo-app, the application the demo deploys…");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-q", "-p", "fleet-demo-app"])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"));
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build fleet-demo-app")?;
    anyhow::ensure!(
        status.success() && app.exists(),
        "building fleet-demo-app failed"
    );
    Ok(app)
}

/// Builds, publishes and signs one release; returns it with its manifest text.
pub fn build(
    spec: &Spec,
    app: &Path,
    work: &Path,
    artifacts: &Path,
    http: std::net::SocketAddr,
    key: &SigningKey,
    now: UnixMillis,
) -> anyhow::Result<(SignedRelease, String)> {
    let tree = work.join(format!("demo-app-{}", spec.version));
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::copy(app, tree.join("bin/fleet-demo-app"))
        .with_context(|| format!("cannot copy {}", app.display()))?;
    let arch = Arch::current().context("fleet has no artifact architecture for this machine")?;
    let tarball = work.join(format!("demo-app-{}-{arch}.tar.gz", spec.version));
    let packed = fleetctl::pack::pack(&tree, &tarball)?;
    // Content-addressed: the coordinator serves it at /artifacts/{sha256}.
    std::fs::copy(&tarball, artifacts.join(packed.sha256.to_string()))?;
    let url = format!("http://{http}/artifacts/{}", packed.sha256);

    let mut args = vec![
        "--port".to_owned(),
        "{port}".to_owned(),
        "--version".to_owned(),
        spec.version.clone(),
        "--work-interval-ms".to_owned(),
        "100".to_owned(),
    ];
    args.extend(spec.faults.iter().cloned());
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    let rollback = spec
        .rollback_to
        .as_ref()
        .map(|(c, v)| format!("rollback_to = {{ counter = {c}, version = \"{v}\" }}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"[release]
name = "demo-app"
version = "{version}"
counter = {counter}
expires = "{expires}"
hardware = ["jetson-orin", "rpi4", "x86-gateway"]
{rollback}
{stanza}
[run]
entrypoint = "bin/fleet-demo-app"
args = [{args}]

[resources]
disk_mb = 8
memory_mb = 64

[health]
endpoint = "http://127.0.0.1:{{port}}/health"
timeout = "1s"

[probe]
request = "http://127.0.0.1:{{port}}/infer?input=frame-0001"
expected_sha256 = "{probe}"
max_latency = "2s"

[trial]
deadline = "20s"
good_probes = {good_probes}
probe_interval = "{probe_interval}"

[strategy]
kind = "{strategy}"
canary_percent = 5
waves = [50, 100]
canary_soak = "6s"
wave_soak = "4s"
approval = "auto"
{ab}"#,
        version = spec.version,
        counter = spec.counter,
        expires = now.saturating_add(std::time::Duration::from_secs(30 * 86_400)),
        stanza = fleetctl::pack::stanza(arch, &url, &packed),
        args = quoted.join(", "),
        probe = probe_digest(app)?,
        good_probes = spec.good_probes,
        probe_interval = spec.probe_interval,
        strategy = spec.strategy,
        ab = spec
            .ab
            .map(|(percent, observation)| {
                format!("ab_percent = {percent}\nobservation = \"{observation}\"\n")
            })
            .unwrap_or_default(),
    );
    let release = manifest::parse(&text, now).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((SignedRelease::sign(&release, key), text))
}

/// The sha256 of the demo app's answer to the functional probe's test input: what a release
/// engineer records from a known-good build.
fn probe_digest(app: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(app)
        .args(["infer", "frame-0001"])
        .env_remove("FLEET_DEVICE_TYPE")
        .output()
        .with_context(|| format!("cannot run {}", app.display()))?;
    anyhow::ensure!(out.status.success(), "fleet-demo-app infer failed");
    Ok(fleet_proto::hex::Sha256::of(&out.stdout).to_string())
}
