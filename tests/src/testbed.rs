//! Real systemd devices on one Linux box (../shared/design/TESTBED.md).
//!
//! A [`Lab`] is a network namespace with a bridge and the gateway address: the "site". A
//! [`Device`] boots in it with `tests/testbed/device.sh`: its own PID, mount, UTS, IPC, network
//! and cgroup namespaces, PID 1 = the rootfs's systemd, and an overlay of the shared, cached
//! debootstrap root whose upper directory is the device's disk. Its `eth0` is one end of a veth
//! pair whose other end (`v-<name>`) sits on the lab bridge, so pulling the cable is
//! `ip link set v-<name> down` on the lab side, and a power cut is SIGKILL to PID 1: every process
//! of the device dies at once and its disk stays as it was.
//!
//! Cleanup: a device's mounts live only in its own mount namespace and its `eth0` in its own
//! network namespace, so the kernel removes them when PID 1 dies; `Drop` kills PID 1, deletes the
//! lab-side veth, removes the device's cgroup, and the lab deletes its namespace. If the test
//! process is SIGKILLed instead, PID 1 dies with it (`PR_SET_PDEATHSIG` and
//! `unshare --kill-child`) and the next [`Lab::new`] removes namespaces and cgroups left by dead
//! test processes.
//!
//! ```no_run
//! use std::time::Duration;
//! use fleet_e2e::{Device, Lab, require};
//!
//! let lab = require!(Lab::new("ping")); // skips visibly without root or debootstrap
//! let mut a = Device::boot("dev-a", &lab);
//! a.wait_running(Duration::from_secs(30));
//! a.sh_ok(&format!("ping -c1 -W2 {}", Lab::GATEWAY));
//! ```

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use crate::prereq::{Outcome, REQUIRE_TESTBED, Skip};
use crate::process::{Child, TestDir, spawn_tied, visible, wait_for, wait_until, workspace_root};

/// How long a command run in a device or the lab may take unless told otherwise.
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a device may take from start to PID 1 being systemd.
const PID1_TIMEOUT: Duration = Duration::from_secs(20);
/// PATH inside devices (commands run there with a clean environment).
const DEVICE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Name prefix of every lab namespace and cgroup: `fleet-<test pid>-<n>`.
const LAB_PREFIX: &str = "fleet-";

/// The test bed's fixed pieces, checked and built once per test process.
#[derive(Debug, Clone)]
struct Bed {
    rootfs: PathBuf,
    /// `<cgroup2 mount>/fleet-testbed`: each lab gets a directory here, each device one below.
    cgroups: PathBuf,
}

/// The cached root filesystem every device boots from: built on first use by
/// `tests/testbed/build-rootfs.sh` (≈ 1 min, under a lock so parallel tests wait for one build),
/// found in `/var/cache/fleet-testbed/` afterwards. Skips without root, the tools, cgroup2, or
/// (when nothing is cached yet) debootstrap.
pub fn rootfs() -> Outcome<PathBuf> {
    bed().map(|bed| bed.rootfs)
}

fn bed() -> Outcome<Bed> {
    static BED: OnceLock<Result<Bed, Skip>> = OnceLock::new();
    match BED.get_or_init(prepare_bed) {
        Ok(bed) => Outcome::Ready(bed.clone()),
        Err(skip) => Outcome::Skipped(skip.clone()),
    }
}

fn prepare_bed() -> Result<Bed, Skip> {
    let skip = |reason: String| Skip::new(reason, REQUIRE_TESTBED);
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(skip("the systemd test bed needs root".into()));
    }
    for tool in [
        "ip", "nsenter", "unshare", "mount", "mknod", "chroot", "flock", "bash",
    ] {
        if find_in_path(tool).is_none() {
            return Err(skip(format!(
                "{tool} not found (apt-get install -y iproute2 util-linux coreutils)"
            )));
        }
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.contains("overlay") && !Path::new("/sys/module/overlay").exists() {
        // The module may still load on first mount; say so only if that fails later.
        visible("test bed: overlay is not listed in /proc/filesystems; trying anyway");
    }
    let Some(cgroup2) = cgroup2_mount() else {
        return Err(skip(
            "no cgroup2 hierarchy is mounted (devices' systemd needs one)".into(),
        ));
    };
    let cgroups = cgroup2.join("fleet-testbed");
    fs::create_dir_all(&cgroups)
        .map_err(|e| skip(format!("cannot create cgroup {}: {e}", cgroups.display())))?;

    let script = workspace_root().join("tests/testbed/build-rootfs.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| skip(format!("cannot run {}: {e}", script.display())))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let reason = if stderr.contains("debootstrap is not installed") {
            "debootstrap not installed (apt-get install -y debootstrap)".to_owned()
        } else {
            format!("building the test-bed rootfs failed:\n{stderr}")
        };
        return Err(skip(reason));
    }
    let rootfs = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if stderr.contains("built in") {
        visible(&format!(
            "test bed: rootfs built in {:.1}s at {}",
            started.elapsed().as_secs_f64(),
            rootfs.display()
        ));
    }
    Ok(Bed { rootfs, cgroups })
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEVICE_PATH.into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
/// hybrid host).
fn cgroup2_mount() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// What a command run in a device or the lab did.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The command, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Exec {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout, trimmed; panics with the whole result if the command failed.
    #[track_caller]
    pub fn ok(self) -> String {
        if !self.success() {
            panic!("{self}");
        }
        self.stdout.trim().to_owned()
    }
}

impl std::fmt::Display for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` → {}\n--- stdout ---\n{}--- stderr ---\n{}---",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// What a bounded command reads on stdin.
enum Input<'a> {
    Null,
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// Runs `cmd` to completion in its own process group; kills the group after `timeout`.
fn run_bounded(mut cmd: Command, input: Input<'_>, timeout: Duration) -> io::Result<Exec> {
    let command = format!("{cmd:?}");
    let mut feed = None;
    match input {
        Input::Null => {
            cmd.stdin(Stdio::null());
        }
        Input::File(path) => {
            cmd.stdin(File::open(path)?);
        }
        Input::Bytes(bytes) => {
            cmd.stdin(Stdio::piped());
            feed = Some(bytes.to_vec());
        }
    }
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = spawn_tied(cmd)?;
    let pgid = libc::pid_t::try_from(child.id()).expect("pids fit in pid_t");
    let feeder = match (feed, child.stdin.take()) {
        (Some(bytes), Some(mut stdin)) => Some(std::thread::spawn(move || {
            // A command that exits without reading its input is its own business.
            let _ = stdin.write_all(&bytes);
        })),
        _ => None,
    };
    // Readers report through a channel so that a background process still holding the pipes
    // open cannot block us past the deadline.
    let (tx, rx) = mpsc::channel::<(usize, String)>();
    for (slot, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            let _ = tx.send((slot, String::from_utf8_lossy(&text).into_owned()));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let timed_out = |command: &str| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{command} did not finish within {timeout:?}"),
        )
    };
    let mut interval = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(timed_out(&command));
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(20));
    };
    let mut output = [String::new(), String::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_secs(1))) {
            Ok((slot, text)) => output[slot] = text,
            Err(_) => {
                // Something the command started in the background still holds its output.
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                return Err(timed_out(&command));
            }
        }
    }
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    let [stdout, stderr] = output;
    Ok(Exec {
        command,
        status,
        stdout,
        stderr,
    })
}

#[track_caller]
fn run_ok(cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    run_bounded(cmd, Input::Null, EXEC_TIMEOUT)
        .unwrap_or_else(|e| panic!("failed to run {shown}: {e}"))
        .ok()
}

fn ip(args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    cmd
}

/// A site network: a namespace with bridge `br0` holding the gateway address. Devices booted in
/// it get `10.77.0.<10 + n>/24`. Dropping the lab (after its devices) deletes the namespace.
#[derive(Debug, Clone)]
pub struct Lab {
    inner: Arc<LabInner>,
}

#[derive(Debug)]
struct LabInner {
    name: String,
    bed: Bed,
    cgroup: PathBuf,
    next_index: AtomicU32,
    /// Device disks and logs. Dropped last (kept if the test failed).
    dir: TestDir,
}

impl Lab {
    /// The gateway's address on the lab bridge: run brokers and coordinators here.
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    /// The lab subnet's prefix length.
    pub const PREFIX_LEN: u8 = 24;

    /// Creates a lab (namespace `fleet-<pid>-<n>`, bridge, gateway). Skips visibly without
    /// root, the tools, or a root filesystem (see [`rootfs`]); `label` names its directory.
    #[track_caller]
    pub fn new(label: &str) -> Outcome<Lab> {
        let bed = match bed() {
            Outcome::Ready(bed) => bed,
            Outcome::Skipped(skip) => return Outcome::Skipped(skip),
        };
        remove_stale(&bed);
        static LABS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{LAB_PREFIX}{}-{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = bed.cgroups.join(&name);
        let lab = Lab {
            inner: Arc::new(LabInner {
                name: name.clone(),
                bed,
                cgroup: cgroup.clone(),
                next_index: AtomicU32::new(0),
                dir: TestDir::new(&format!("lab-{label}")),
            }),
        };
        // From here on, Drop cleans up whatever was created.
        run_ok(ip(&["netns", "add", &name]));
        let gw = format!("{}/{}", Lab::GATEWAY, Lab::PREFIX_LEN);
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", &gw, "dev", "br0"],
            vec!["link", "set", "br0", "up"],
        ] {
            let mut full = vec!["-n", name.as_str()];
            full.extend(args);
            run_ok(ip(&full));
        }
        fs::create_dir_all(&cgroup)
            .unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", cgroup.display()));
        Outcome::Ready(lab)
    }

    /// The namespace name, for `ip netns exec NAME …` / `ip -n NAME …`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The lab's directory (device disks, logs of processes started in the lab).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The root filesystem devices boot from (read-only lower layer).
    pub fn rootfs(&self) -> &Path {
        &self.inner.bed.rootfs
    }

    /// A command that runs `program` inside the lab namespace (`ip netns exec LAB program`);
    /// start it with [`Child::spawn`] to run a broker or coordinator at [`Lab::GATEWAY`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.inner.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the lab namespace to completion (bounded); never panics on a non-zero
    /// exit (see [`Exec::ok`]).
    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> Exec {
        let (program, rest) = args.split_first().expect("a command to run in the lab");
        let mut cmd = self.command(program);
        cmd.args(rest);
        let shown = format!("{cmd:?}");
        run_bounded(cmd, Input::Null, EXEC_TIMEOUT)
            .unwrap_or_else(|e| panic!("failed to run {shown}: {e}"))
    }

    /// Runs `f` on a thread that has joined the lab's network namespace, so sockets it opens
    /// (an [`MqttProbe`](crate::MqttProbe) acting as the coordinator, an HTTP client) live in the
    /// lab and reach [`Lab::GATEWAY`] and the devices. Keep such clients inside `f`: a socket
    /// opened later on another thread would be in the host's namespace.
    #[track_caller]
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/run/netns").join(&self.inner.name);
        let result = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path)
                        .unwrap_or_else(|e| panic!("failed to open {}: {e}", path.display()));
                    // SAFETY: setns(2) on a valid namespace fd; it changes only this thread's
                    // network namespace, and the thread ends with `f`.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        rc,
                        0,
                        "setns into {}: {}",
                        path.display(),
                        io::Error::last_os_error()
                    );
                    f()
                })
                .join()
        });
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// Whether interface `name` exists in the lab namespace.
    pub fn has_link(&self, name: &str) -> bool {
        run_bounded(
            ip(&["-n", &self.inner.name, "link", "show", name]),
            Input::Null,
            EXEC_TIMEOUT,
        )
        .is_ok_and(|e| e.success())
    }
}

impl Drop for LabInner {
    fn drop(&mut self) {
        // Devices hold the lab alive, so they are gone by now.
        let _ = run_bounded(ip(&["netns", "del", &self.name]), Input::Null, EXEC_TIMEOUT);
        remove_cgroup(&self.cgroup);
    }
}

/// Removes namespaces and cgroups of labs whose test process no longer exists (one killed
/// before its guards could run).
fn remove_stale(bed: &Bed) {
    let dead = |name: &str| {
        name.strip_prefix(LAB_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if dead(&name) {
                visible(&format!(
                    "test bed: removing namespace {name} left by a dead test"
                ));
                let _ = run_bounded(ip(&["netns", "del", &name]), Input::Null, EXEC_TIMEOUT);
            }
        }
    }
    if let Ok(entries) = fs::read_dir(&bed.cgroups) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir() && dead(&name) {
                remove_cgroup(&entry.path());
            }
        }
    }
}

/// Kills whatever is left in a cgroup tree and removes it, deepest directories first.
fn remove_cgroup(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    // cgroup.kill (Linux 5.14+) SIGKILLs every process in the subtree.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    // Deepest first. A just-killed process may take a moment to leave its cgroup.
    for d in dirs.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// A systemd device in a [`Lab`]. Dropping it powers it off hard and removes its veth and cgroup.
#[derive(Debug)]
pub struct Device {
    lab: Lab,
    name: String,
    addr: Ipv4Addr,
    /// `upper/` (the disk), `work/`, `merged/` and the boot logs.
    dir: PathBuf,
    /// The lab-side end of the device's cable.
    veth: String,
    cgroup: PathBuf,
    /// `device.sh boot`, i.e. the `unshare` process owning the device's namespaces.
    boot: Option<Child>,
    /// The host's pid of the device's PID 1 (systemd).
    pid1: Option<u32>,
    boots: u32,
    started: Instant,
    boot_time: Option<Duration>,
}

impl Device {
    /// Boots device `name` (lowercase letters, digits and `-`; it becomes the hostname) in `lab`
    /// on a fresh disk, and plugs its cable in. Returns once PID 1 is systemd and the network is
    /// configured; [`wait_running`](Device::wait_running) waits for the boot to finish.
    #[track_caller]
    pub fn boot(name: &str, lab: &Lab) -> Device {
        assert!(
            !name.is_empty()
                && name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "device name {name:?}: use 1-63 lowercase letters, digits and '-'"
        );
        let index = lab.inner.next_index.fetch_add(1, Ordering::Relaxed);
        let host = u8::try_from(10 + index)
            .ok()
            .filter(|h| *h < 255)
            .expect("a lab holds at most 244 devices");
        let veth = if name.len() + 2 <= 15 {
            format!("v-{name}")
        } else {
            let short: String = format!("v{index}-{name}").chars().take(15).collect();
            short
        };
        let dir = lab.dir().join(name);
        assert!(
            !dir.exists(),
            "device {name} already exists in lab {}",
            lab.name()
        );
        for sub in ["upper/etc", "work", "merged"] {
            fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("failed to create {}/{sub}: {e}", dir.display()));
        }
        let upper = dir.join("upper");
        write(
            &upper.join("etc/hostname"),
            format!("{name}\n").as_bytes(),
            0o644,
        );
        write(
            &upper.join("etc/machine-id"),
            format!("{}\n", machine_id()).as_bytes(),
            0o444,
        );
        let hosts = format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n{}\tgateway\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            Lab::GATEWAY
        );
        write(&upper.join("etc/hosts"), hosts.as_bytes(), 0o644);
        let mut device = Device {
            lab: lab.clone(),
            name: name.to_owned(),
            addr: Ipv4Addr::new(10, 77, 0, host),
            dir,
            veth,
            cgroup: lab.inner.cgroup.join(name),
            boot: None,
            pid1: None,
            boots: 0,
            started: Instant::now(),
            boot_time: None,
        };
        device.start();
        device
    }

    #[track_caller]
    fn start(&mut self) {
        fs::create_dir_all(&self.cgroup)
            .unwrap_or_else(|e| panic!("failed to create cgroup {}: {e}", self.cgroup.display()));
        self.boots += 1;
        self.boot_time = None;
        self.started = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("tests/testbed/device.sh"))
            .arg("boot")
            .arg(self.lab.rootfs())
            .arg(&self.dir)
            .arg(&self.name)
            .arg(&self.cgroup);
        let name = self.name.clone();
        let boot = self.boot.insert(Child::spawn("boot", cmd, &self.dir));
        let unshare = boot.pid();
        let what = format!("PID 1 of device {name} is systemd");
        let pid1 = wait_for(PID1_TIMEOUT, &what, || {
            if let Some(status) = boot.try_status() {
                panic!(
                    "device {name} failed to boot ({status}):\n{}",
                    boot.tails(30)
                );
            }
            let children =
                fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
            let pid: u32 = children.split_whitespace().next()?.parse().ok()?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        self.pid1 = Some(pid1);
        self.plug_in(pid1);
    }

    /// Creates the veth pair (eth0 in the device, `v-<name>` on the lab bridge) and addresses.
    #[track_caller]
    fn plug_in(&self, pid1: u32) {
        let lab = self.lab.name();
        let pid = pid1.to_string();
        // A previous boot's veth disappears with its namespace, asynchronously.
        let what = format!("the previous veth {} of {} is gone", self.veth, self.name);
        wait_until(Duration::from_secs(10), &what, || {
            !self.lab.has_link(&self.veth)
        });
        run_ok(ip(&[
            "link", "add", &self.veth, "netns", lab, "type", "veth", "peer", "name", "eth0",
            "netns", &pid,
        ]));
        run_ok(ip(&["-n", lab, "link", "set", &self.veth, "master", "br0"]));
        run_ok(ip(&["-n", lab, "link", "set", &self.veth, "up"]));
        let addr = format!("{}/{}", self.addr, Lab::PREFIX_LEN);
        let gw = Lab::GATEWAY.to_string();
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", addr.as_str(), "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
            vec!["route", "add", "default", "via", gw.as_str()],
        ] {
            let mut cmd = Command::new("nsenter");
            cmd.args(["-t", &pid, "-n", "ip"]).args(args);
            run_ok(cmd);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's address on the lab bridge.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// The lab-side veth name (`v-<name>`, shortened for long names).
    pub fn veth(&self) -> &str {
        &self.veth
    }

    /// The host's pid of PID 1 while the device is up.
    pub fn pid1(&self) -> Option<u32> {
        self.pid1
    }

    /// The device's disk: the overlay's upper directory.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// How many times the device has booted.
    pub fn boots(&self) -> u32 {
        self.boots
    }

    /// Time from the start of the last boot to `running`, once [`wait_running`](Device::wait_running) saw it.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// Whether PID 1 is alive.
    pub fn is_up(&mut self) -> bool {
        self.pid1.is_some() && self.boot.as_mut().is_some_and(|b| b.is_running())
    }

    /// Waits until `systemctl is-system-running` says `running` or `degraded` and returns which;
    /// for `degraded`, the failed units are printed. Panics after `timeout` or if PID 1 dies.
    #[track_caller]
    pub fn wait_running(&mut self, timeout: Duration) -> String {
        let what = format!(
            "device {} finishes booting (running or degraded)",
            self.name
        );
        let state = wait_for(timeout, &what, || {
            assert!(
                self.is_up(),
                "device {} died while booting:\n{}",
                self.name,
                self.boot.as_ref().map(|b| b.tails(30)).unwrap_or_default()
            );
            let state = self.try_exec(&["systemctl", "is-system-running"], Duration::from_secs(10));
            let state = state.ok()?.stdout.trim().to_owned();
            matches!(state.as_str(), "running" | "degraded").then_some(state)
        });
        self.boot_time = Some(self.started.elapsed());
        if state == "degraded" {
            let failed = self.sh("systemctl --failed --no-legend --plain");
            eprintln!(
                "device {} is degraded; failed units:\n{}",
                self.name, failed.stdout
            );
        }
        state
    }

    /// Runs `args` inside the device (`nsenter -t PID1 -a -r -w`, clean environment), bounded by
    /// 60 s; a non-zero exit is returned, not a panic (see [`Exec::ok`]).
    #[track_caller]
    pub fn exec(&self, args: &[&str]) -> Exec {
        self.try_exec(args, EXEC_TIMEOUT)
            .unwrap_or_else(|e| panic!("device {}: {e}", self.name))
    }

    /// Runs `script` with `sh -c` inside the device.
    #[track_caller]
    pub fn sh(&self, script: &str) -> Exec {
        self.exec(&["sh", "-c", script])
    }

    /// Runs `script` with `sh -c` inside the device and returns its trimmed stdout; panics
    /// (showing the output) if it fails.
    #[track_caller]
    pub fn sh_ok(&self, script: &str) -> String {
        self.sh(script).ok()
    }

    /// Like [`exec`](Device::exec) with an explicit bound; errors instead of panicking.
    pub fn try_exec(&self, args: &[&str], timeout: Duration) -> io::Result<Exec> {
        self.exec_input(args, Input::Null, timeout)
    }

    fn exec_input(&self, args: &[&str], input: Input<'_>, timeout: Duration) -> io::Result<Exec> {
        let pid1 = self.pid1.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("device {} is down", self.name),
            )
        })?;
        let mut cmd = Command::new(find_in_path("nsenter").unwrap_or_else(|| "nsenter".into()));
        cmd.env_clear()
            .env("PATH", DEVICE_PATH)
            .env("LANG", "C.UTF-8")
            .args(["-t", &pid1.to_string(), "-a", "-r", "-w", "--"])
            .args(args);
        let mut exec = run_bounded(cmd, input, timeout)?;
        exec.command = format!("{}: {}", self.name, args.join(" "));
        Ok(exec)
    }

    /// Copies a host file to `device_path` with `mode`, creating parent directories. On a running
    /// device it goes through the device's own filesystem (atomically: temp file + rename);
    /// on a device that is down, straight into its disk.
    #[track_caller]
    pub fn install_file(&self, host_path: &Path, device_path: &str, mode: u32) {
        if self.pid1.is_some() {
            self.write_through(device_path, Input::File(host_path), mode);
        } else {
            let bytes = fs::read(host_path)
                .unwrap_or_else(|e| panic!("failed to read {}: {e}", host_path.display()));
            write(&self.disk_path(device_path), &bytes, mode);
        }
    }

    /// Writes `contents` to `device_path` with `mode` (see [`install_file`](Device::install_file)).
    #[track_caller]
    pub fn write_file(&self, device_path: &str, contents: &[u8], mode: u32) {
        if self.pid1.is_some() {
            self.write_through(device_path, Input::Bytes(contents), mode);
        } else {
            write(&self.disk_path(device_path), contents, mode);
        }
    }

    /// Installs a unit file in `/etc/systemd/system/` and reloads systemd (start it with
    /// `systemctl start` / `enable --now`).
    #[track_caller]
    pub fn install_unit(&self, name: &str, contents: &str) {
        self.write_file(
            &format!("/etc/systemd/system/{name}"),
            contents.as_bytes(),
            0o644,
        );
        if self.pid1.is_some() {
            self.sh_ok("systemctl daemon-reload");
        }
    }

    /// `systemctl show -p PROPERTY --value UNIT`.
    #[track_caller]
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.exec(&["systemctl", "show", "-p", property, "--value", unit])
            .ok()
    }

    /// The unit's journal (`journalctl -u UNIT -o cat`); the journal is in memory, so it covers
    /// the current boot only.
    #[track_caller]
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
            .stdout
    }

    #[track_caller]
    fn write_through(&self, device_path: &str, input: Input<'_>, mode: u32) {
        assert!(
            device_path.starts_with('/'),
            "{device_path:?}: use an absolute device path"
        );
        let script = format!(
            "set -e; mkdir -p \"$(dirname \"$1\")\"; cat > \"$1.fleet-e2e-tmp\"; \
             chmod {mode:o} \"$1.fleet-e2e-tmp\"; mv -f \"$1.fleet-e2e-tmp\" \"$1\""
        );
        let exec = self
            .exec_input(
                &["sh", "-c", &script, "sh", device_path],
                input,
                EXEC_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("device {}: writing {device_path}: {e}", self.name));
        exec.ok();
    }

    fn disk_path(&self, device_path: &str) -> PathBuf {
        assert!(
            device_path.starts_with('/'),
            "{device_path:?}: use an absolute device path"
        );
        self.disk().join(device_path.trim_start_matches('/'))
    }

    /// Plugs the network cable in (`true`) or pulls it (`false`): the lab-side veth goes up or
    /// down. The device keeps running, offline.
    #[track_caller]
    pub fn cable(&self, plugged: bool) {
        let state = if plugged { "up" } else { "down" };
        run_ok(ip(&[
            "-n",
            self.lab.name(),
            "link",
            "set",
            &self.veth,
            state,
        ]));
    }

    /// Cuts the power: SIGKILL to PID 1, so every process of the device dies at once. Returns
    /// when the device is fully down (namespaces gone, veth removed); its disk stays as it was.
    #[track_caller]
    pub fn power_cut(&mut self) {
        let pid1 = self
            .pid1
            .take()
            .expect("power_cut on a device that is down");
        let pid = libc::pid_t::try_from(pid1).expect("pids fit in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        if let Some(boot) = self.boot.as_mut() {
            // unshare exits as soon as its child, PID 1, is gone.
            boot.wait_exit(Duration::from_secs(20));
        }
        self.unplug();
        let what = format!(
            "the veth {} of powered-off {} is gone",
            self.veth, self.name
        );
        wait_until(Duration::from_secs(10), &what, || {
            !self.lab.has_link(&self.veth)
        });
    }

    /// Boots again on the same disk after [`power_cut`](Device::power_cut).
    #[track_caller]
    pub fn boot_again(&mut self) {
        assert!(
            self.pid1.is_none(),
            "boot_again on device {} that is up",
            self.name
        );
        self.start();
    }

    /// Bytes the device's disk takes on the host (allocated blocks of the overlay's upper dir).
    pub fn disk_usage(&self) -> u64 {
        fn walk(path: &Path) -> u64 {
            let Ok(meta) = fs::symlink_metadata(path) else {
                return 0;
            };
            let mut total = meta.blocks() * 512;
            if meta.is_dir()
                && let Ok(entries) = fs::read_dir(path)
            {
                total += entries.flatten().map(|e| walk(&e.path())).sum::<u64>();
            }
            total
        }
        walk(&self.disk())
    }

    /// Removes the lab-side veth (it also goes with the device's namespace) and the cgroup.
    fn unplug(&mut self) {
        let _ = run_bounded(
            ip(&["-n", self.lab.name(), "link", "del", &self.veth]),
            Input::Null,
            Duration::from_secs(10),
        );
        remove_cgroup(&self.cgroup);
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if std::thread::panicking() && self.pid1.is_some() {
            // The device's journal is in memory: show it before the device goes.
            if let Ok(journal) = self.try_exec(
                &[
                    "journalctl",
                    "--no-pager",
                    "-n",
                    "60",
                    "-o",
                    "short-monotonic",
                ],
                Duration::from_secs(5),
            ) {
                eprintln!(
                    "--- journal of device {} ---\n{}---",
                    self.name, journal.stdout
                );
            }
        }
        if let Some(pid1) = self.pid1.take()
            && let Ok(pid) = libc::pid_t::try_from(pid1)
        {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if let Some(mut boot) = self.boot.take() {
            // unshare reaps PID 1 once every process of the device has died: then the device's
            // mounts and namespaces are gone. Bounded; Drop must not hang or panic.
            let deadline = Instant::now() + Duration::from_secs(10);
            while boot.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            boot.kill();
        }
        self.unplug();
    }
}

/// A random 128-bit id in /etc/machine-id format (32 lowercase hex digits).
fn machine_id() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut urandom) = File::open("/dev/urandom") {
        // A short read leaves zeros; systemd then still boots with a fixed id.
        let _ = urandom.read_exact(&mut bytes);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[track_caller]
fn write(path: &Path, contents: &[u8], mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", parent.display()));
    }
    fs::write(path, contents).unwrap_or_else(|e| panic!("failed to write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("failed to chmod {}: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_are_32_hex_digits() {
        let id = machine_id();
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(id, machine_id());
    }

    #[test]
    fn bounded_commands_report_output_and_time_out() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "cat; echo err >&2; exit 3"]);
        let exec = run_bounded(cmd, Input::Bytes(b"hello"), Duration::from_secs(10)).unwrap();
        assert_eq!(exec.stdout, "hello");
        assert_eq!(exec.stderr, "err\n");
        assert_eq!(exec.code(), Some(3));

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 30 & wait"]);
        let started = Instant::now();
        let err = run_bounded(cmd, Input::Null, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the whole group was killed"
        );
    }
}
