//! The Debian packages and `deploy/install.sh` on real systemd devices (issue 11;
//! README.md, "Deploy on real devices").
//!
//! 1. The `fleet-agent` package on a booted device: `dpkg -i` leaves it enabled but not started,
//!    and an unconfigured start is refused (exit 3, not restarted); configured, it starts and
//!    registers with a coordinator in the lab; an upgrade keeps the config and restarts the
//!    agent; `dpkg -r` stops it and keeps config and state; `dpkg -P` leaves nothing behind.
//! 2. `install.sh` from the agent tarball: refuses a binary of another architecture, installs,
//!    re-runs without changing anything, keeps a config edited on the device (a newer default
//!    goes beside it), and the agent it installed starts once configured.
//! 3. A newcomer: the gateway, device and verify blocks of the deploy section run verbatim, in
//!    that order, on a fresh gateway device and a fresh agent device, until `fleetctl devices` on
//!    the gateway lists the device online. The blocks are read from the README (by their
//!    `<!-- fleet-e2e: deploy-… -->` markers), so the test runs what a reader would type.
//!
//! The packages are built by `deploy/package-deb.sh` (the script and maintainer scripts a
//! release uses) from the debug binaries the rest of fleet-e2e runs, stripped on the way in.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fleet_e2e::prereq::REQUIRE_TESTBED;
use fleet_e2e::{
    Coordinator, Ctl, Device, FAST, Lab, Outcome, Releases, Skip, TestDir, binary, require,
    wait_for, wait_until, workspace_root,
};
use fleet_proto::operator::{DeviceStatus, DeviceView};

/// Boot to `running`.
const BOOT: Duration = Duration::from_secs(60);
/// Something that takes a device a few seconds (a connection, a registration), on a loaded box.
const SOON: Duration = Duration::from_secs(45);

/// The `.deb` files and the agent tarball one `package-deb.sh` run made.
struct Built {
    files: Vec<PathBuf>,
}

impl Built {
    /// The one file whose name starts with `prefix` and ends with `suffix`.
    #[track_caller]
    fn file(&self, prefix: &str, suffix: &str) -> &Path {
        let found: Vec<&PathBuf> = self
            .files
            .iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with(prefix) && name.ends_with(suffix)
            })
            .collect();
        assert_eq!(found.len(), 1, "{prefix}*{suffix} among {:?}", self.files);
        found[0]
    }

    #[track_caller]
    fn deb(&self, package: &str) -> &Path {
        self.file(&format!("{package}_"), ".deb")
    }
}

/// Packages `packages` at `version` from the debug binaries (which must be built: `binary`
/// panics naming the `cargo build` command otherwise).
#[track_caller]
fn package(dir: &TestDir, version: &str, packages: &[&str]) -> Outcome<Built> {
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        return Outcome::Skipped(Skip::new(
            "dpkg-deb not found (a Debian host: apt-get install -y dpkg-dev)",
            REQUIRE_TESTBED,
        ));
    }
    let bin_dir = packages
        .iter()
        .map(|p| binary(p).parent().unwrap().to_path_buf())
        .next()
        .expect("at least one package");
    let out = dir.subdir(&format!("deb-{version}"));
    let run = Command::new("bash")
        .arg(workspace_root().join("deploy/package-deb.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .args(["--version", version, "--out"])
        .arg(&out)
        .args(packages)
        // Debug binaries are large even stripped: gzip is 2-3 x faster to build than xz here.
        .env("FLEET_DEB_COMPRESSION", "gzip")
        .output()
        .expect("run deploy/package-deb.sh");
    assert!(
        run.status.success(),
        "deploy/package-deb.sh failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let files = String::from_utf8_lossy(&run.stdout)
        .lines()
        .map(PathBuf::from)
        .collect();
    Outcome::Ready(Built { files })
}

/// Copies a host file into the device's `/root/`; returns its path there.
#[track_caller]
fn put(device: &Device, host: &Path) -> String {
    let path = format!("/root/{}", host.file_name().unwrap().to_string_lossy());
    device.install_file(host, &path, 0o644);
    path
}

/// The registry as `fleetctl devices --json` shows it.
fn registry(ctl: &Ctl) -> Vec<DeviceView> {
    ctl.run(&["devices", "--json"]).json()
}

#[track_caller]
fn wait_status(ctl: &Ctl, id: &str, status: DeviceStatus) -> DeviceView {
    wait_for(SOON, &format!("the registry has {id} {status:?}"), || {
        registry(ctl)
            .into_iter()
            .find(|d| d.id.as_str() == id && d.status == status)
    })
}

/// What `systemctl is-active UNIT` prints (`active`, `inactive`, `failed`, …).
fn is_active(device: &Device, unit: &str) -> String {
    device
        .exec(&["systemctl", "is-active", unit])
        .stdout
        .trim()
        .to_owned()
}

/// Paths on the device's root filesystem whose name mentions fleet, apart from the test bed's
/// own files and the packages the test copied into /root.
fn fleet_leftovers(device: &Device) -> Vec<String> {
    let found = device.sh_ok(
        "find / -xdev \\( -path /root -o -path /proc -o -path /sys -o -path /dev \\) -prune \
         -o -name '*fleet*' -print",
    );
    found
        .lines()
        .filter(|p| {
            !matches!(
                *p,
                "/.fleet-testbed-complete" | "/etc/systemd/journald.conf.d/fleet-testbed.conf"
            )
        })
        .map(str::to_owned)
        .collect()
}

/// Sets what README.md tells a newcomer to set, the way its block does.
#[track_caller]
fn configure_agent(device: &Device, id: &str, release_key: &str) {
    device.sh_ok(&format!(
        "sed -i -e 's/^id = .*/id = \"{id}\"/' -e 's/^type = .*/type = \"x86-gateway\"/' \
         -e 's/^region = .*/region = \"lab\"/' -e 's/^host = .*/host = \"gateway\"/' \
         -e 's/^keys = .*/keys = [\"{release_key}\"]/' /etc/fleet/agent.toml"
    ));
}

#[test]
fn agent_package_installs_registers_upgrades_and_purges() {
    let dir = TestDir::new("packages");
    let lab = require!(Lab::new("packages"));
    let v1 = require!(package(&dir, "0.1.0-1", &["fleet-agent"]));
    let v2 = require!(package(&dir, "0.1.0-2", &["fleet-agent"]));
    let releases = Releases::new(&dir, "");
    let coordinator =
        Coordinator::start_in_lab(&dir.subdir("coordinator"), &releases.public_key, FAST, &lab);
    let ctl = Ctl::new(
        &dir.subdir("operator"),
        &coordinator.broker_url(),
        "packages",
    )
    .in_lab(&lab);
    let mut dev = Device::boot("pkg-dev", &lab);
    dev.wait_running(BOOT);

    // Installed: enabled, not started; the config is a conffile only root reads.
    let deb1 = put(&dev, v1.deb("fleet-agent"));
    dev.sh_ok(&format!("dpkg -i {deb1}"));
    assert_eq!(
        dev.exec(&["systemctl", "is-enabled", "fleet-agent"])
            .stdout
            .trim(),
        "enabled"
    );
    assert_eq!(is_active(&dev, "fleet-agent"), "inactive");
    let conffiles = dev.sh_ok("dpkg-query -W -f='${Conffiles}' fleet-agent");
    assert!(conffiles.contains("/etc/fleet/agent.toml"), "{conffiles}");
    assert_eq!(
        dev.sh_ok("stat -c '%a %U' /etc/fleet/agent.toml /var/lib/fleet-agent /opt/fleet/app"),
        "600 root\n755 root\n755 root"
    );

    // Unconfigured, it refuses to start (exit 3, invalid configuration) and is not restarted.
    assert!(!dev.sh("systemctl start fleet-agent").success());
    assert_eq!(dev.unit_property("fleet-agent", "ExecMainStatus"), "3");
    assert_eq!(dev.unit_property("fleet-agent", "NRestarts"), "0");
    let journal = dev.journal("fleet-agent");
    assert!(journal.contains("device.id"), "{journal}");
    dev.sh_ok("systemctl reset-failed fleet-agent");

    // Configured: starts and registers.
    configure_agent(&dev, "pkg-001", &releases.public_key);
    dev.sh_ok("systemctl start fleet-agent");
    let view = wait_status(&ctl, "pkg-001", DeviceStatus::Online);
    let facts = view.facts.expect("a registered device has facts");
    assert_eq!(
        (facts.device_type.as_str(), facts.region.as_str()),
        ("x86-gateway", "lab")
    );

    // Upgrade: the edited config is kept, the running agent restarts into the new binary.
    let config = dev.sh_ok("sha256sum /etc/fleet/agent.toml");
    let pid = dev.unit_property("fleet-agent", "MainPID");
    let deb2 = put(&dev, v2.deb("fleet-agent"));
    dev.sh_ok(&format!("dpkg -i {deb2}"));
    assert_eq!(
        dev.sh_ok("dpkg-query -W -f='${Version}' fleet-agent"),
        "0.1.0-2"
    );
    assert_eq!(dev.sh_ok("sha256sum /etc/fleet/agent.toml"), config);
    assert_eq!(is_active(&dev, "fleet-agent"), "active");
    assert_ne!(dev.unit_property("fleet-agent", "MainPID"), pid);
    wait_until(SOON, "the upgraded agent resolved its journal", || {
        dev.journal("fleet-agent")
            .matches("resolving the journal")
            .count()
            >= 2
    });
    wait_status(&ctl, "pkg-001", DeviceStatus::Online);

    // Remove: stopped (the coordinator sees its last will), binary and unit gone, config and
    // state kept.
    dev.sh_ok("dpkg -r fleet-agent");
    assert_ne!(is_active(&dev, "fleet-agent"), "active");
    wait_status(&ctl, "pkg-001", DeviceStatus::Offline);
    dev.sh_ok(
        "test ! -e /usr/bin/fleet-agent && test ! -e /lib/systemd/system/fleet-agent.service",
    );
    assert_eq!(dev.sh_ok("sha256sum /etc/fleet/agent.toml"), config);
    dev.sh_ok("test -d /var/lib/fleet-agent/outbox && test -d /opt/fleet/app/slot-a");

    // Purge: nothing of fleet-agent is left.
    dev.sh_ok("dpkg -P fleet-agent");
    assert_eq!(fleet_leftovers(&dev), Vec::<String>::new());
    assert!(
        !dev.sh("dpkg-query -W -f='${db:Status-Status}' fleet-agent | grep -qx installed")
            .success()
    );
    assert!(
        !dev.sh("getent passwd fleet || getent group fleet")
            .success()
    );
    let units = dev.sh_ok("systemctl list-unit-files --no-legend 'fleet*' | wc -l");
    assert_eq!(units, "0");
}

#[test]
fn install_sh_installs_keeps_a_modified_config_and_is_idempotent() {
    let dir = TestDir::new("install-sh");
    let lab = require!(Lab::new("install-sh"));
    let built = require!(package(&dir, "0.1.0-1", &["fleet-agent"]));
    let tarball = built.file("fleet-agent_", ".tar.gz");
    let bundle = format!(
        "/root/{}",
        tarball
            .file_name()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches(".tar.gz")
    );
    let mut dev = Device::boot("install-sh", &lab);
    dev.wait_running(BOOT);
    let archive = put(&dev, tarball);
    dev.sh_ok(&format!("cd /root && tar xzf {archive}"));
    let install = format!("sh {bundle}/install.sh");

    // A binary for another architecture is refused before anything is installed: a 64-byte
    // ELF header with e_machine = 183 (aarch64).
    let mut elf = vec![0u8; 64];
    elf[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf[18] = 183;
    dev.write_file("/root/fleet-agent-aarch64", &elf, 0o755);
    let wrong = dev.sh(&format!("{install} --binary /root/fleet-agent-aarch64"));
    assert_eq!(wrong.code(), Some(1), "{wrong}");
    assert!(
        wrong
            .stderr
            .contains("is built for aarch64, this device runs x86_64 binaries"),
        "{wrong}"
    );
    dev.sh_ok("test ! -e /usr/bin/fleet-agent && test ! -e /etc/fleet/agent.toml");

    // Installs binary, unit and config; enabled, not started.
    let first = dev.sh_ok(&install);
    for path in [
        "/usr/bin/fleet-agent",
        "/etc/systemd/system/fleet-agent.service",
        "/etc/fleet/agent.toml",
    ] {
        assert!(
            first.contains(&format!("install.sh: installed {path}\n")),
            "{first}"
        );
    }
    assert_eq!(
        dev.exec(&["systemctl", "is-enabled", "fleet-agent"])
            .stdout
            .trim(),
        "enabled"
    );
    assert_eq!(is_active(&dev, "fleet-agent"), "inactive");
    assert_eq!(dev.sh_ok("stat -c %a /etc/fleet/agent.toml"), "600");

    // Again: nothing changes.
    let state = "sha256sum /usr/bin/fleet-agent /etc/systemd/system/fleet-agent.service \
                 /etc/fleet/agent.toml; stat -c '%n %Y' /usr/bin/fleet-agent \
                 /etc/systemd/system/fleet-agent.service /etc/fleet/agent.toml";
    let before = dev.sh_ok(state);
    let again = dev.sh_ok(&install);
    assert!(again.contains("nothing to do"), "{again}");
    assert!(!again.contains("install.sh: installed "), "{again}");
    assert_eq!(dev.sh_ok(state), before);

    // A config edited on the device is kept; a newer default goes beside it.
    dev.sh_ok("echo '# edited on the device' >> /etc/fleet/agent.toml");
    let kept = dev.sh_ok(&install);
    assert!(kept.contains("kept /etc/fleet/agent.toml"), "{kept}");
    assert_eq!(
        dev.sh_ok("tail -n 1 /etc/fleet/agent.toml"),
        "# edited on the device"
    );
    dev.sh_ok(&format!("echo '# a newer default' >> {bundle}/agent.toml"));
    let newer = dev.sh_ok(&install);
    assert!(
        newer.contains("the new default is in /etc/fleet/agent.toml.new"),
        "{newer}"
    );
    assert_eq!(
        dev.sh_ok("tail -n 1 /etc/fleet/agent.toml; tail -n 1 /etc/fleet/agent.toml.new"),
        "# edited on the device\n# a newer default"
    );

    // What it installed runs once configured (no broker needed to start).
    let key = Releases::new(&dir, "").public_key;
    configure_agent(&dev, "install-sh-001", &key);
    dev.sh_ok("systemctl start fleet-agent");
    assert_eq!(is_active(&dev, "fleet-agent"), "active");
    // And a re-run with nothing changed leaves the running agent alone.
    let pid = dev.unit_property("fleet-agent", "MainPID");
    dev.sh_ok(&install);
    assert_eq!(dev.unit_property("fleet-agent", "MainPID"), pid);
}

/// The fenced block after the `<!-- fleet-e2e: NAME` marker in the README.
#[track_caller]
fn readme_block(name: &str) -> String {
    let marker = format!("<!-- fleet-e2e: {name} ");
    let file = "README.md";
    let text = std::fs::read_to_string(workspace_root().join(file)).unwrap();
    assert!(text.contains(&marker), "{file} has no marker {marker:?}");
    assert_eq!(
        text.matches(&marker).count(),
        1,
        "{file} has the marker {marker:?} more than once"
    );
    let after = &text[text.find(&marker).unwrap()..];
    let mut lines = after.lines().skip(1);
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "{file}: the line after {marker:?} must open a fenced block, not {fence:?}"
    );
    let block: Vec<&str> = lines.take_while(|l| !l.starts_with("```")).collect();
    assert!(!block.is_empty(), "{file}: the {name} block is empty");
    block.join("\n") + "\n"
}

/// Runs a README block as a newcomer would: as root, in the directory they copied the files to,
/// stopping at the first command that fails.
#[track_caller]
fn run_block(device: &Device, block: &str) -> fleet_e2e::Exec {
    device.sh(&format!("cd /root && set -e\n{block}"))
}

#[test]
fn a_newcomer_follows_the_deploy_section() {
    let dir = TestDir::new("newcomer");
    let lab = require!(Lab::new("newcomer"));
    let built = require!(package(
        &dir,
        "0.1.0-1",
        &["fleet-agent", "fleet-coordinator", "fleetctl"]
    ));
    let (gateway_block, device_block, verify_block) = (
        readme_block("deploy-gateway"),
        readme_block("deploy-device"),
        readme_block("deploy-verify"),
    );
    // The release engineer's key pair (`fleetctl keygen`); release.pub goes everywhere.
    let releases = Releases::new(&dir, "");
    let release_pub = releases.ctl.dir.join("release.pub");

    let mut gateway = Device::boot("gateway", &lab);
    let mut camera = Device::boot("cam-042", &lab);
    gateway.wait_running(BOOT);
    camera.wait_running(BOOT);
    put(&gateway, built.deb("fleet-coordinator"));
    put(&gateway, built.deb("fleetctl"));
    put(&gateway, &release_pub);
    put(&camera, built.deb("fleet-agent"));
    put(&camera, &release_pub);
    // The site's DNS knows the gateway by the name the README uses.
    camera.sh_ok(&format!(
        "echo '{} gateway.local' >> /etc/hosts",
        gateway.addr()
    ));

    let step = |device: &Device, what: &str, block: &str| {
        let run = run_block(device, block);
        assert!(
            run.success(),
            "the README's {what} block failed on {}:\n{run}",
            device.name()
        );
    };
    step(&gateway, "gateway", &gateway_block);
    step(&camera, "device", &device_block);
    let table = wait_for(
        SOON,
        "`fleetctl devices` on the gateway lists cam-042 online",
        || {
            let run = run_block(&gateway, &verify_block);
            let online = run
                .stdout
                .lines()
                .any(|l| l.starts_with("cam-042 ") && l.contains(" online "));
            (run.success() && online).then_some(run.stdout)
        },
    );
    assert!(table.contains("rpi4"), "{table}");
    assert_eq!(
        gateway.sh_ok("ps -o user= -p \"$(systemctl show -p MainPID --value fleet-coordinator)\""),
        "fleet",
        "the coordinator runs as the package's system user"
    );
}
