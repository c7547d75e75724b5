//! `fleet-sim bench`: measured figures for the agent, the coordinator and the brokers, printed
//! as a Markdown table and written to a file.
//!
//! Every figure runs its real parts: release binaries of `fleet-agent` and `fleet-coordinator`
//! as their own processes (so their CPU and memory are theirs alone, read from `/proc`), the
//! embedded broker or a real mosquitto, and `fleet-sim load` processes playing the devices.
//! Each figure is measured several times; the table gives the median and the min–max spread.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fleet_proto::device::{Event, EventKind};
use fleet_proto::operator::{Command as Op, ReplyBody};
use fleet_proto::rollout::RolloutStatus;
use fleet_proto::{RolloutId, SignedRelease, SigningKey, Topic, UnixMillis, decode};
use fleetctl::link::{Answer, Link};
use fleetctl::settings::{Broker, Settings};

use crate::releases::{self, Spec};

#[derive(Clone, Debug)]
pub struct Options {
    /// Shorter windows, fewer runs, smaller fleets: under five minutes.
    pub quick: bool,
    /// Where the Markdown table is written.
    pub out: PathBuf,
    /// The sections to measure; empty measures them all. Re-measuring one figure need not
    /// take the full run's half hour.
    pub only: Vec<Section>,
}

/// A part of the table, named as `--only` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Binary size, swap latency, idle cost, trial and crash-at-start rollbacks, blue-green
    /// switch back.
    Agent,
    /// Heartbeat ingestion and the engine at scale.
    Coordinator,
    /// A rollout and a rollback over simulated devices.
    EndToEnd,
    /// The embedded broker and mosquitto side by side.
    Brokers,
}

impl Section {
    pub const ALL: [Section; 4] = [
        Section::Agent,
        Section::Coordinator,
        Section::EndToEnd,
        Section::Brokers,
    ];

    /// The name `--only` takes.
    pub fn name(self) -> &'static str {
        match self {
            Section::Agent => "agent",
            Section::Coordinator => "coordinator",
            Section::EndToEnd => "e2e",
            Section::Brokers => "brokers",
        }
    }
}

impl std::str::FromStr for Section {
    type Err = String;

    fn from_str(s: &str) -> Result<Section, String> {
        Section::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                format!("unknown bench section {s:?}: expected agent, coordinator, e2e or brokers")
            })
    }
}

impl Options {
    fn measures(&self, section: Section) -> bool {
        self.only.is_empty() || self.only.contains(&section)
    }

    /// The command line that produced the table, as the file's header gives it.
    fn command(&self) -> String {
        let mut c = "cargo run --release -p fleet-sim -- bench".to_owned();
        if self.quick {
            c.push_str(" --quick");
        }
        if !self.only.is_empty() {
            let names: Vec<&str> = self.only.iter().map(|s| s.name()).collect();
            let _ = write!(c, " --only {}", names.join(","));
        }
        c
    }
}

/// The sizes and durations a run uses.
#[derive(Clone, Copy, Debug)]
struct Plan {
    runs: usize,
    idle_window: Duration,
    ingest_window: Duration,
    ingest_fleets: &'static [usize],
    swap_iterations: usize,
    e2e_devices: usize,
    broker_devices: usize,
}

const QUICK: Plan = Plan {
    runs: 1,
    idle_window: Duration::from_secs(15),
    ingest_window: Duration::from_secs(15),
    ingest_fleets: &[1_000, 10_000],
    swap_iterations: 100,
    e2e_devices: 1_000,
    broker_devices: 2_000,
};

const FULL: Plan = Plan {
    runs: 5,
    idle_window: Duration::from_secs(60),
    ingest_window: Duration::from_secs(60),
    ingest_fleets: &[1_000, 10_000, 50_000],
    swap_iterations: 500,
    e2e_devices: 1_000,
    broker_devices: 2_000,
};

/// One figure: its runs, and how to read them.
#[derive(Clone, Debug)]
struct Figure {
    section: &'static str,
    name: String,
    unit: &'static str,
    values: Vec<f64>,
    target: &'static str,
    how: String,
}

impl Figure {
    fn new(section: &'static str, name: impl Into<String>, unit: &'static str) -> Figure {
        Figure {
            section,
            name: name.into(),
            unit,
            values: Vec::new(),
            target: "",
            how: String::new(),
        }
    }

    fn target(mut self, t: &'static str) -> Self {
        self.target = t;
        self
    }

    fn how(mut self, h: impl Into<String>) -> Self {
        self.how = h.into();
        self
    }

    fn median(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    fn row(&self) -> String {
        let fmt = |x: f64| {
            if x.abs() >= 100.0 || x == x.trunc() {
                format!("{x:.0}")
            } else if x.abs() >= 1.0 {
                format!("{x:.2}")
            } else {
                format!("{x:.3}")
            }
        };
        let (min, max) = self
            .values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(*x), b.max(*x))
            });
        let spread = if self.values.len() > 1 {
            format!("{}–{}", fmt(min), fmt(max))
        } else {
            "(1 run)".to_owned()
        };
        format!(
            "| {} | {} | {} {} | {} | {} | {} | {} |",
            self.section,
            self.name,
            fmt(self.median()),
            self.unit,
            spread,
            self.values.len(),
            self.target,
            self.how
        )
    }
}

/// A child process that is killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn now() -> UnixMillis {
    UnixMillis::from_system(std::time::SystemTime::now())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields start after its closing parenthesis.
    let rest = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / ticks_per_second())
}

/// Resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// CPU share (% of one core) and peak RSS of processes over a window.
fn watch_processes(pids: &[u32], window: Duration) -> anyhow::Result<(f64, f64)> {
    let cpu0: f64 = pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .sum::<anyhow::Result<f64>>()?;
    let start = Instant::now();
    let mut peak = 0.0f64;
    while start.elapsed() < window {
        let rss: f64 = pids
            .iter()
            .map(|p| rss_mib(*p))
            .sum::<anyhow::Result<f64>>()?;
        peak = peak.max(rss);
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu1: f64 = pids
        .iter()
        .map(|p| cpu_seconds(*p))
        .sum::<anyhow::Result<f64>>()?;
    Ok(((cpu1 - cpu0) * 100.0 / start.elapsed().as_secs_f64(), peak))
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// One sample of a Prometheus metric from the coordinator.
fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")?.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

/// p50 and p99 from the coordinator's heartbeat latency histogram, in milliseconds,
/// interpolated within buckets. `before` is an earlier scrape to subtract.
fn latency_quantiles(text: &str, before: &str) -> Option<(f64, f64)> {
    let buckets = |t: &str| -> Vec<(f64, f64)> {
        t.lines()
            .filter_map(|l| l.strip_prefix("fleet_heartbeat_latency_seconds_bucket{le=\""))
            .filter_map(|l| {
                let (le, rest) = l.split_once("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le * 1000.0, rest.trim().parse().ok()?))
            })
            .collect()
    };
    let now = buckets(text);
    let then = buckets(before);
    let counts: Vec<(f64, f64)> = now
        .iter()
        .map(|(le, c)| {
            let b = then.iter().find(|(l, _)| l == le).map_or(0.0, |(_, c)| *c);
            (*le, c - b)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let q = |p: f64| {
        let want = total * p;
        let mut lower = (0.0, 0.0);
        for (le, c) in &counts {
            if *c >= want {
                if le.is_infinite() {
                    return lower.0;
                }
                let span = c - lower.1;
                let frac = if span > 0.0 {
                    (want - lower.1) / span
                } else {
                    1.0
                };
                return lower.0 + (le - lower.0) * frac;
            }
            lower = (*le, *c);
        }
        lower.0
    };
    Some((q(0.50), q(0.99)))
}

/// Finds a workspace binary beside this executable, building it when run through cargo.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("fleet-sim has no parent directory")?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let cargo = std::env::var_os("CARGO").with_context(|| {
        format!(
            "{} is missing: `cargo build --release -p {name}` first",
            path.display()
        )
    })?;
    eprintln!("building {name}…");
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", name])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml"));
    if dir.ends_with("release") {
        cmd.arg("--release");
    }
    anyhow::ensure!(
        cmd.status()?.success() && path.exists(),
        "building {name} failed"
    );
    Ok(path)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores ({cpu}), {mem} RAM, {} {}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// The coordinator binary on free ports with its own registry, trusting `key`.
struct Coordinator {
    guard: Guard,
    mqtt: u16,
    http: u16,
}

impl Coordinator {
    fn start(
        dir: &Path,
        key: &SigningKey,
        interval: &str,
        extra: &[(&str, String)],
    ) -> anyhow::Result<Coordinator> {
        let (mqtt, http) = (free_port()?, free_port()?);
        std::fs::create_dir_all(dir.join("artifacts"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("coordinator.log"))?;
        let mut cmd = Command::new(binary("fleet-coordinator")?);
        cmd.current_dir(dir)
            .env("FLEET_LOG", "warn")
            .env(
                "FLEET_COORDINATOR__BROKER__LISTEN",
                format!("127.0.0.1:{mqtt}"),
            )
            .env("FLEET_COORDINATOR__BROKER__MAX_CONNECTIONS", "20000")
            .env(
                "FLEET_COORDINATOR__HTTP__LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .env("FLEET_COORDINATOR__DATABASE__PATH", dir.join("registry.db"))
            .env(
                "FLEET_COORDINATOR__HTTP__ARTIFACTS_DIR",
                dir.join("artifacts"),
            )
            .env(
                "FLEET_COORDINATOR__RELEASE_KEYS",
                hex::encode(key.verifying_key().to_bytes()),
            )
            .env("FLEET_COORDINATOR__DEVICES__HEARTBEAT_INTERVAL", interval)
            .env("FLEET_COORDINATOR__ROLLOUT__TICK", "100ms")
            .env("FLEET_COORDINATOR__GATE__Z", "1.0")
            .env("FLEET_COORDINATOR__GATE__MIN_SAMPLES", "6")
            .env("FLEET_COORDINATOR__GATE__MIN_CONTROL_SAMPLES", "6")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in extra {
            cmd.env(format!("FLEET_COORDINATOR__{k}"), v);
        }
        let guard = Guard(cmd.spawn().context("cannot start fleet-coordinator")?);
        let start = Instant::now();
        while http_get(http, "/metrics").is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "fleet-coordinator did not serve /metrics within 30 s (log: {})",
                    dir.join("coordinator.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Coordinator { guard, mqtt, http })
    }

    fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    fn online(&self) -> f64 {
        metric(self.http, "fleet_devices{status=\"online\"}").unwrap_or(0.0)
    }

    fn wait_online(&self, n: usize, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while self.online() < n as f64 {
            if start.elapsed() > limit {
                bail!(
                    "only {} of {n} devices online after {}s",
                    self.online(),
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    }
}

/// Which broker the devices and the coordinator meet on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BrokerKind {
    /// rumqttd inside the coordinator process.
    Embedded,
    /// A mosquitto process the coordinator connects to.
    Mosquitto,
}

fn mosquitto_binary() -> Option<PathBuf> {
    ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A coordinator and, for `Mosquitto`, its broker: the processes whose cost is measured and
/// the port devices connect to.
struct Site {
    coord: Coordinator,
    broker: Option<Guard>,
    device_port: u16,
}

impl Site {
    fn start(
        dir: &Path,
        kind: BrokerKind,
        key: &SigningKey,
        interval: &str,
    ) -> anyhow::Result<Site> {
        std::fs::create_dir_all(dir)?;
        match kind {
            BrokerKind::Embedded => {
                let coord = Coordinator::start(dir, key, interval, &[])?;
                let device_port = coord.mqtt;
                Ok(Site {
                    coord,
                    broker: None,
                    device_port,
                })
            }
            BrokerKind::Mosquitto => {
                let bin = mosquitto_binary()
                    .context("mosquitto is not installed (apt-get install -y mosquitto)")?;
                let port = free_port()?;
                std::fs::write(
                    dir.join("mosquitto.conf"),
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
                         max_queued_messages 100000\nmax_inflight_messages 1000\npersistence false\n"
                    ),
                )?;
                let broker = Guard(
                    Command::new(bin)
                        .args(["-c", &dir.join("mosquitto.conf").display().to_string()])
                        .stdout(Stdio::null())
                        .stderr(std::fs::File::create(dir.join("mosquitto.log"))?)
                        .spawn()?,
                );
                let start = Instant::now();
                while TcpStream::connect(("127.0.0.1", port)).is_err() {
                    anyhow::ensure!(
                        start.elapsed() < Duration::from_secs(10),
                        "mosquitto did not listen"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                let coord = Coordinator::start(
                    dir,
                    key,
                    interval,
                    &[
                        ("BROKER__MODE", "external".into()),
                        ("BROKER__URL", format!("mqtt://127.0.0.1:{port}")),
                    ],
                )?;
                Ok(Site {
                    coord,
                    broker: Some(broker),
                    device_port: port,
                })
            }
        }
    }

    /// The coordinator's pid, and the broker's when it is a process of its own.
    fn pids(&self) -> Vec<u32> {
        let mut p = vec![self.coord.pid()];
        p.extend(self.broker.as_ref().map(|b| b.0.id()));
        p
    }
}

/// `fleet-sim load` processes playing `devices` devices against `port`, split so no process
/// holds more than 10,000 connections.
fn load(
    port: u16,
    devices: usize,
    per_connection: usize,
    args: &[&str],
) -> anyhow::Result<Vec<Guard>> {
    let exe = std::env::current_exe()?;
    let chunk = 10_000 * per_connection;
    let mut guards = Vec::new();
    let mut first = 0;
    while first < devices {
        let n = chunk.min(devices - first);
        let child = Command::new(&exe)
            .args(["load", "--broker", &format!("127.0.0.1:{port}")])
            .args(["--devices", &n.to_string(), "--first", &first.to_string()])
            .args(["--per-connection", &per_connection.to_string()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        guards.push(Guard(child));
        first += n;
    }
    Ok(guards)
}

/// Asks `fleet-sim load` to stop (SIGINT) and reads its summary line.
fn stop_load(mut g: Guard) -> anyhow::Result<String> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(g.0.id() as i32, libc::SIGINT) };
    let mut out = String::new();
    if let Some(mut s) = g.0.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    let _ = g.0.wait();
    Ok(out
        .lines()
        .rev()
        .find(|l| l.starts_with("summary "))
        .unwrap_or_default()
        .to_owned())
}

fn summary_field(summary: &str, key: &str) -> Option<u64> {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok())
}

/// An operator connected to a coordinator.
async fn operator(port: u16) -> anyhow::Result<Link> {
    Ok(Link::connect(&Settings {
        broker: Broker {
            host: "127.0.0.1".into(),
            port,
        },
        username: None,
        password: None,
        operator: "bench".into(),
        timeout: Duration::from_secs(30),
    })
    .await?)
}

async fn ask(link: &mut Link, command: Op) -> anyhow::Result<ReplyBody> {
    match link.request(command).await? {
        Answer::Accepted(body) => Ok(body),
        Answer::Refused(r) => Err(fleetctl::refused(r).into()),
    }
}

async fn start_rollout(link: &mut Link, release: SignedRelease) -> anyhow::Result<RolloutId> {
    match ask(link, Op::Start { release }).await? {
        ReplyBody::Started(s) => Ok(s.rollout),
        _ => bail!("unexpected answer to start"),
    }
}

async fn wait_final(
    link: &mut Link,
    id: &RolloutId,
    limit: Duration,
) -> anyhow::Result<RolloutStatus> {
    let start = Instant::now();
    loop {
        if let ReplyBody::State(s) = ask(
            link,
            Op::Status {
                rollout: id.clone(),
            },
        )
        .await?
            && s.status.is_final()
        {
            return Ok(s.status);
        }
        if start.elapsed() > limit {
            bail!("rollout {id} did not end within {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A release of the demo app for the benchmarks: fast soaks, automatic approval.
fn bench_release(
    work: &Path,
    artifacts: &Path,
    http: u16,
    key: &SigningKey,
    spec: &Spec,
    strategy: &str,
) -> anyhow::Result<SignedRelease> {
    let app = releases::demo_app_binary()?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{http}").parse()?;
    let (_, text) = releases::build(spec, &app, work, artifacts, addr, key, now())?;
    // Replace the demo's strategy with this benchmark's.
    let text = match text.split_once("[strategy]") {
        Some((head, _)) => format!("{head}[strategy]\n{strategy}\n"),
        None => text,
    };
    let release = fleet_proto::manifest::parse(&text, now()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(SignedRelease::sign(&release, key))
}

// ---------------------------------------------------------------------------------------------
// Agent

fn agent_size() -> anyhow::Result<Figure> {
    let bin = binary("fleet-agent")?;
    let size = std::fs::metadata(&bin)?.len() as f64 / 1024.0 / 1024.0;
    let mut f = Figure::new("agent", "release binary, stripped", "MiB")
        .target("≤ 5.7 MiB (6 MB)")
        .how(format!("`ls -l {}`", bin.display()));
    f.values.push(size);
    Ok(f)
}

fn swap_latency(plan: &Plan) -> anyhow::Result<Figure> {
    let mut f = Figure::new(
        "agent",
        "swap: temp symlink + rename + fsync(dir), median of each run",
        "ms",
    )
    .how(format!(
        "{} swaps per run in a directory on the machine's disk",
        plan.swap_iterations
    ));
    // On the disk the agent's slots would live on, not tmpfs: the fsync is the cost.
    let base = std::env::current_dir()?.join("target");
    std::fs::create_dir_all(&base)?;
    // Cheap enough to repeat even in a quick run.
    for _ in 0..plan.runs.max(3) {
        let dir = tempfile::Builder::new()
            .prefix("fleet-bench-swap-")
            .tempdir_in(&base)?;
        let layout = fleet_agent::slots::Layout::new(dir.path());
        layout.prepare()?;
        let mut times = Vec::with_capacity(plan.swap_iterations);
        for i in 0..plan.swap_iterations {
            let to = if i % 2 == 0 {
                fleet_proto::device::Slot::A
            } else {
                fleet_proto::device::Slot::B
            };
            let t = Instant::now();
            layout.swap(Some(to))?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        f.values.push(times[times.len() / 2]);
    }
    Ok(f)
}

/// The release `fleet-agent` binary as device `bench-1` of `coord`, its disk under `home`, its
/// app's (or forwarder's) service port `app_port`, with `extra` appended to its config; returns
/// once the coordinator has its first heartbeat (the checklist wants a fresh one).
async fn start_agent(
    coord: &Coordinator,
    key: &SigningKey,
    home: &Path,
    app_port: u16,
    heartbeat: &str,
    extra: &str,
) -> anyhow::Result<Guard> {
    std::fs::create_dir_all(home)?;
    let config = format!(
        "[device]\nid = \"bench-1\"\ntype = \"rpi4\"\nregion = \"eu-west\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {}\nreconnect_min = \"200ms\"\n\
         [trust]\nkeys = [\"{}\"]\n[paths]\nroot = \"{}\"\nstate = \"{}\"\n\
         [app]\nport = {app_port}\nlog_file = \"{}\"\nrestart_backoff_min = \"200ms\"\n\
         [trial]\nrestore_timeout = \"20s\"\n[reports]\nheartbeat_interval = \"{heartbeat}\"\n{extra}",
        coord.mqtt,
        hex::encode(key.verifying_key().to_bytes()),
        home.join("app").display(),
        home.join("state").display(),
        home.join("app.log").display(),
    );
    std::fs::write(home.join("agent.toml"), config)?;
    let agent = Guard(
        Command::new(binary("fleet-agent")?)
            .args(["--config", &home.join("agent.toml").display().to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("agent.log"))?)
            .spawn()?,
    );
    coord.wait_online(1, Duration::from_secs(30))?;
    // The first heartbeat comes one interval after connecting.
    let start = Instant::now();
    while metric(coord.http, "fleet_reports_total{kind=\"heartbeat\"}").unwrap_or(0.0) < 1.0 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the agent sent no heartbeat (log: {})",
            home.join("agent.log").display()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(agent)
}

/// One agent process, a coordinator, and the demo app: idle cost, and how fast a bad
/// release is undone.
async fn agent_live(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    // Heartbeats every 10 s as in production; two samples suffice for the gate here so that
    // each bad release is judged within half a minute.
    let coord = Coordinator::start(dir, &key, "10s", &[("GATE__MIN_SAMPLES", "2".into())])?;
    let app_port = free_port()?;
    let agent = start_agent(&coord, &key, &dir.join("device"), app_port, "10s", "").await?;
    let mut link = operator(coord.mqtt).await?;
    let work = dir.join("build");
    std::fs::create_dir_all(&work)?;
    let artifacts = dir.join("artifacts");
    // Two 10 s heartbeats fit in the canary soak.
    let strategy = "canary_soak = \"20s\"\nwave_soak = \"1s\"\nwaves = [100]\napproval = \"auto\"";
    let good = Spec {
        version: "1.0.0".into(),
        counter: 1,
        rollback_to: None,
        faults: vec![],
        ..Spec::new("1.0.0", 1)
    };
    let v1 = bench_release(&work, &artifacts, coord.http, &key, &good, strategy)?;
    let id = start_rollout(&mut link, v1).await?;
    let status = wait_final(&mut link, &id, Duration::from_secs(300)).await?;
    anyhow::ensure!(
        status == RolloutStatus::Completed,
        "the first release ended {status}"
    );

    // Idle: committed app, connected, heartbeats every 10 s.
    let mut rss = Figure::new("agent", "idle RSS (app committed, 10 s heartbeats)", "MiB")
        .target("≤ 10 MiB")
        .how(format!(
            "peak VmRSS over {}s windows",
            plan.idle_window.as_secs()
        ));
    let mut cpu = Figure::new(
        "agent",
        "idle CPU (app committed, 10 s heartbeats)",
        "% of a core",
    )
    .how("utime+stime from /proc over the same windows");
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..plan.runs {
        let (c, r) = watch_processes(&[agent.0.id()], plan.idle_window)?;
        cpu.values.push(c);
        rss.values.push(r);
    }

    // Events from the device, for the crash-at-start timings.
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let mqtt = coord.mqtt;
    let observer = tokio::spawn(async move {
        let mut o = rumqttc::MqttOptions::new("bench-observer", "127.0.0.1", mqtt);
        o.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(o, 64);
        let filter = Topic::filter(fleet_proto::Kind::Event);
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client
                        .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                        .await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if let Ok(e) = decode::<Event>(&p.payload) {
                        let _ = events_tx.send(e);
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut unhealthy = Figure::new("agent", "failed trial probe → previous version serving", "s")
        .how("release answering unhealthy; from the first unhealthy answer to 1.0.0 answering healthy (3 bad probes 500 ms apart decide)");
    let mut crash = Figure::new(
        "agent",
        "crash at start → rolled back (previous serving)",
        "s",
    )
    .how("release exiting at start; event Swapped → event RolledBack (agent clock)");
    let mut counter = 1;
    for run in 0..plan.runs * 2 {
        let crashing = run % 2 == 1;
        counter += 1;
        let faults = if crashing {
            vec!["--crash-at-start".to_owned()]
        } else {
            vec!["--unhealthy".to_owned()]
        };
        let spec = Spec {
            version: format!("2.0.{counter}"),
            counter,
            rollback_to: Some((1, "1.0.0".into())),
            faults,
            ..Spec::new("2.0.0", counter)
        };
        let bad = bench_release(&work, &artifacts, coord.http, &key, &spec, strategy)?;
        // A device whose trial failed is quarantined: let it take part again.
        let _ = ask(
            &mut link,
            Op::ReleaseDevice {
                device: fleet_proto::DeviceId::new("bench-1")?,
            },
        )
        .await;
        while events.try_recv().is_ok() {}
        let id = start_rollout(&mut link, bad).await?;
        if crashing {
            let (mut swapped, mut rolled) = (None, None);
            let deadline = Instant::now() + Duration::from_secs(60);
            while rolled.is_none() && Instant::now() < deadline {
                if let Ok(Some(e)) =
                    tokio::time::timeout(Duration::from_secs(1), events.recv()).await
                    && e.version == spec.version
                {
                    match e.kind {
                        EventKind::Swapped { .. } => swapped = Some(e.at),
                        EventKind::RolledBack { .. } => rolled = Some(e.at),
                        _ => {}
                    }
                }
            }
            let (Some(s), Some(r)) = (swapped, rolled) else {
                bail!("no Swapped/RolledBack events for the crashing release");
            };
            crash.values.push(r.since(s).as_secs_f64());
        } else {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut first_bad = None;
            loop {
                if Instant::now() > deadline {
                    bail!("the unhealthy release was not undone within 60 s");
                }
                let body = http_get(app_port, "/health").unwrap_or_default();
                let t = Instant::now();
                if first_bad.is_none() && body.contains(&spec.version) {
                    first_bad = Some(t);
                }
                if let Some(b) = first_bad
                    && body.contains("\"status\":\"healthy\"")
                    && body.contains("\"1.0.0\"")
                {
                    unhealthy.values.push(t.duration_since(b).as_secs_f64());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = wait_final(&mut link, &id, Duration::from_secs(60)).await;
    }
    observer.abort();
    link.disconnect().await;
    drop(agent);
    Ok(vec![rss, cpu, unhealthy, crash])
}

/// A bad blue-green release on an agent whose built-in forwarder holds the service port: how
/// long the service port answers with the new version's failures before the old instance,
/// which never stopped, answers again.
async fn agent_blue_green(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    // 1 s heartbeats: this agent's idle cost is not measured, and the checklist and the gate
    // then take seconds rather than half-minutes.
    let coord = Coordinator::start(dir, &key, "1s", &[("GATE__MIN_SAMPLES", "2".into())])?;
    let (service, port_a, port_b) = (free_port()?, free_port()?, free_port()?);
    let home = dir.join("device");
    let agent = start_agent(
        &coord,
        &key,
        &home,
        service,
        "1s",
        &format!(
            "[blue_green]\nswitch = \"forwarder\"\nport_a = {port_a}\nport_b = {port_b}\nbind = \"127.0.0.1\"\n"
        ),
    )
    .await?;
    // /proc gives the apps' executables with symlinks resolved.
    let home = home.canonicalize()?;
    let mut link = operator(coord.mqtt).await?;
    let work = dir.join("build");
    std::fs::create_dir_all(&work)?;
    let artifacts = dir.join("artifacts");
    let soaks = "canary_soak = \"3s\"\nwave_soak = \"1s\"\nwaves = [100]\napproval = \"auto\"";
    // The first install has nothing to keep warm: it goes the ordinary way, behind the forwarder.
    let v1 = bench_release(
        &work,
        &artifacts,
        coord.http,
        &key,
        &Spec::new("1.0.0", 1),
        soaks,
    )?;
    let id = start_rollout(&mut link, v1).await?;
    let status = wait_final(&mut link, &id, Duration::from_secs(120)).await?;
    anyhow::ensure!(
        status == RolloutStatus::Completed,
        "the first release ended {status}"
    );
    let start = Instant::now();
    while json_field(&http_get(service, "/health").unwrap_or_default(), "version") != Some("1.0.0")
    {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "1.0.0 does not answer through the service port {service}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = app_pids(&home, "1.0.0");
    let [old] = old[..] else {
        bail!(
            "expected one 1.0.0 instance under {}, found PIDs {old:?}",
            home.display()
        );
    };

    // Design: the new version must turn bad after the switch, not while it warms up beside
    // the old one (that rollback is only stopping it) nor after it proved itself. 8 good
    // probes 500 ms apart switch the traffic ~4 s after it starts and would commit it at ~8 s;
    // its error window holds the 20 items `/health` waits for after 20 frames 300 ms apart,
    // ~6 s, from when 90 % of them fail: unhealthy with 2 s to spare on either side.
    let strategy = format!("kind = \"blue-green\"\n{soaks}");
    let faults = ["--error-rate", "0.9", "--work-interval-ms", "300"];
    let mut back = Figure::new(
        "agent",
        "blue-green: failed check → old version serving again through the service port",
        "s",
    )
    .how(format!(
        "agent with [blue_green] switch = \"forwarder\"; a blue-green release ({}) unhealthy ~6 s after it starts, after the switch; \
         from its first unhealthy answer to the first answer of 1.0.0, both through the service port polled every 10 ms (3 bad probes 500 ms apart decide); \
         the 1.0.0 instance kept its PID through every run (checked after each switch back; a new PID fails the bench)",
        faults.join(" ")
    ));
    let mut switch = Figure::new(
        "agent",
        "blue-green: deciding failed check → traffic switched back",
        "ms",
    )
    .how("the agent's log: after_us of \"traffic switched back to the previous version\" (its forwarder retargeted)");
    for run in 0..plan.runs {
        let counter = 2 + run as u64;
        let version = format!("2.0.{counter}");
        let spec = Spec {
            rollback_to: Some((1, "1.0.0".into())),
            faults: faults.map(str::to_owned).to_vec(),
            strategy: "blue-green",
            good_probes: 8,
            probe_interval: "500ms",
            ..Spec::new(&version, counter)
        };
        let bad = bench_release(&work, &artifacts, coord.http, &key, &spec, &strategy)?;
        // A device whose trial failed is quarantined: let it take part again.
        let _ = ask(
            &mut link,
            Op::ReleaseDevice {
                device: fleet_proto::DeviceId::new("bench-1")?,
            },
        )
        .await;
        let id = start_rollout(&mut link, bad).await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut had_traffic, mut first_bad) = (false, None);
        loop {
            if Instant::now() > deadline {
                bail!(
                    "{version} was not switched back within 90 s ({}; agent log: {})",
                    if had_traffic {
                        "it had the traffic"
                    } else {
                        "it never answered through the service port: caught while warming up?"
                    },
                    home.join("agent.log").display()
                );
            }
            let body = http_get(service, "/health").unwrap_or_default();
            let t = Instant::now();
            match json_field(&body, "version") {
                Some(v) if v == version => {
                    had_traffic = true;
                    if first_bad.is_none() && json_field(&body, "status") == Some("unhealthy") {
                        first_bad = Some(t);
                    }
                }
                Some("1.0.0") if had_traffic => {
                    let Some(b) = first_bad else {
                        bail!(
                            "{version} was switched back before it answered unhealthy through the service port (agent log: {})",
                            home.join("agent.log").display()
                        );
                    };
                    back.values.push(t.duration_since(b).as_secs_f64());
                    break;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let check_old = |when: &str| -> anyhow::Result<()> {
            let now = app_pids(&home, "1.0.0");
            if now != [old] {
                bail!(
                    "the old instance did not survive the blue-green switch back ({when}): 1.0.0 ran as PID {old} before {version}, now as {now:?}"
                );
            }
            Ok(())
        };
        check_old("at the switch back")?;
        let status = wait_final(&mut link, &id, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            matches!(status, RolloutStatus::Halted | RolloutStatus::RolledBack),
            "the bad blue-green release ended {status}"
        );
        check_old("once the rollout ended")?;
        let log = std::fs::read_to_string(home.join("agent.log"))?;
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("traffic switched back to the previous version"))
            .collect();
        if lines.len() == run + 1
            && let Some(us) = lines[run]
                .split_whitespace()
                .find_map(|w| w.strip_prefix("after_us="))
                .and_then(|v| v.parse::<f64>().ok())
        {
            switch.values.push(us / 1000.0);
        }
    }
    link.disconnect().await;
    drop(agent);
    let mut figures = vec![back];
    if !switch.values.is_empty() {
        figures.push(switch);
    }
    Ok(figures)
}

/// A string field of a flat JSON document such as the demo app's `/health` answer.
fn json_field<'a>(body: &'a str, key: &str) -> Option<&'a str> {
    let start = body.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

/// PIDs of the `fleet-demo-app` servers started with `--version VERSION` from under `dir`
/// (other benchmarks may run the same version elsewhere on the machine).
fn app_pids(dir: &Path, version: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            (exe.starts_with(dir)
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--version" && w[1] == version.as_bytes()))
            .then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

// ---------------------------------------------------------------------------------------------
// Coordinator

async fn ingestion(plan: &Plan, dir: &Path, devices: usize) -> anyhow::Result<Vec<Figure>> {
    // Design: the embedded rumqttd serves all connections on one thread and slowed to ~30
    // connections/s past ~5,000 subscribed devices here (BENCHMARKS.md); fleets that size go
    // to mosquitto, as README advises, so that is what is measured for them.
    let kind = if devices > 5_000 {
        BrokerKind::Mosquitto
    } else {
        BrokerKind::Embedded
    };
    let broker = match kind {
        BrokerKind::Embedded => "embedded rumqttd (in the coordinator's process)",
        BrokerKind::Mosquitto => "mosquitto (its CPU not included)",
    };
    let label = format!("{devices} devices, 10 s heartbeats");
    let per_connection = if devices > 15_000 { 10 } else { 1 };
    let mut how = format!("{label}; broker: {broker}");
    if per_connection > 1 {
        how.push_str(&format!(
            "; {per_connection} devices per MQTT connection (a process holds < 20,000 file descriptors here)"
        ));
    }
    let mut cpu = Figure::new("coordinator", format!("CPU, {label}"), "% of a core")
        .target(if devices == 10_000 {
            "< 25 % at 10,000"
        } else {
            ""
        })
        .how(format!("{how}; {}s windows", plan.ingest_window.as_secs()));
    let mut rss = Figure::new("coordinator", format!("RSS, {label}"), "MiB").how(how.clone());
    let mut p50 = Figure::new(
        "coordinator",
        format!("heartbeat → registry p50, {label}"),
        "ms",
    )
    .how("fleet_heartbeat_latency_seconds histogram (device clock → applied)");
    let mut p99 = Figure::new(
        "coordinator",
        format!("heartbeat → registry p99, {label}"),
        "ms",
    );
    let mut lost = Figure::new("coordinator", format!("reports lost, {label}"), "")
        .target("0")
        .how("fleet_lost_reports_total{kind=\"heartbeat\"} (per-device sequence gaps)");
    let runs = if devices >= 50_000 {
        1
    } else {
        plan.runs.min(3)
    };
    for run in 0..runs {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let site = Site::start(
            &dir.join(format!("ingest-{devices}-{run}")),
            kind,
            &key,
            "10s",
        )?;
        let coord = &site.coord;
        let loads = load(
            site.device_port,
            devices,
            per_connection,
            &["--heartbeat", "10s"],
        )?;
        coord.wait_online(devices, Duration::from_secs(300))?;
        // Let every device send its first heartbeats before measuring.
        std::thread::sleep(Duration::from_secs(12));
        let before = http_get(coord.http, "/metrics").unwrap_or_default();
        let lost0 =
            metric(coord.http, "fleet_lost_reports_total{kind=\"heartbeat\"}").unwrap_or(0.0);
        let (c, r) = watch_processes(&[coord.pid()], plan.ingest_window)?;
        let after = http_get(coord.http, "/metrics").unwrap_or_default();
        let lost1 =
            metric(coord.http, "fleet_lost_reports_total{kind=\"heartbeat\"}").unwrap_or(0.0);
        cpu.values.push(c);
        rss.values.push(r);
        lost.values.push(lost1 - lost0);
        if let Some((a, b)) = latency_quantiles(&after, &before) {
            p50.values.push(a);
            p99.values.push(b);
        }
        drop(loads);
        drop(site);
    }
    Ok(vec![cpu, rss, p50, p99, lost])
}

/// One gate decision, and a whole rollout, over 100,000 devices through the pure engine.
fn engine_at_scale(plan: &Plan) -> anyhow::Result<Vec<Figure>> {
    use fleet_coordinator::engine::{self, Event as Ev, Settings};
    use fleet_coordinator::testkit::{self, Knobs, T0, VirtualFleet};
    let n = 100_000;
    let mut step = Figure::new(
        "coordinator",
        "one heartbeat through gates + triggers, 100,000-device rollout",
        "µs",
    )
    .how("engine::step on a Heartbeat event, median of 10,000");
    let mut rollout = Figure::new(
        "coordinator",
        "full rollout of 100,000 devices in virtual time",
        "s",
    )
    .how("canary 1 % + waves 25/50/100, 15/10 min soaks, 60 s heartbeats: ≈ 6 M engine steps");
    for _ in 0..plan.runs.min(3) {
        let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
        let k = Knobs {
            rollback_to: Some((1, "1.0".into())),
            canary_percent: 1.0,
            canary_soak: "15m",
            wave_soak: "10m",
            ..Knobs::default()
        };
        let (r2, s2) = testkit::signed("app", "2.0", 2, &k);
        let devices = testkit::fleet(n, Some(testkit::installed(&r1, &s1)));
        let settings = Settings {
            report_interval: Duration::from_secs(60),
            silent_after: Duration::from_secs(180),
            install_timeout: Duration::from_secs(1800),
            ..Settings::default()
        };
        let wall = Instant::now();
        let (r, actions) = testkit::start(&devices, &r2, &s2, settings, T0);
        let mut f = VirtualFleet::new(&devices, r, actions, T0);
        f.keep_log = false;
        f.tick = Duration::from_secs(30);
        f.install_delay = Duration::from_secs(90);
        let done = f.run_until(Duration::from_secs(24 * 3600), |r| r.is_final());
        anyhow::ensure!(done, "the virtual rollout did not finish");
        rollout.values.push(wall.elapsed().as_secs_f64());

        // The finished rollout holds every device deployed: each heartbeat runs the per-device
        // triggers and updates the wave and fleet aggregates.
        let ids: Vec<_> = devices.keys().cloned().collect();
        let sample = testkit::healthy("2.0", 0.01);
        let mut r = f.rollout;
        let mut times = Vec::with_capacity(10_000);
        for i in 0..10_000 {
            let ev = Ev::Heartbeat {
                device: ids[i * 7 % n].clone(),
                sample: sample.clone(),
            };
            let t = Instant::now();
            let _ = engine::step_in_place(&mut r, &ev, f.now);
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        step.values.push(times[times.len() / 2]);
    }
    Ok(vec![step, rollout])
}

// ---------------------------------------------------------------------------------------------
// End to end

async fn end_to_end(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let devices = plan.e2e_devices;
    let mut wall = Figure::new("end to end", format!("rollout across {devices} simulated devices"), "s")
        .how("canary 5 % + waves 25/50/100, 2 s soaks, 1 s heartbeats, automatic approval: start → completed");
    let mut detect = Figure::new("end to end", "first bad report in a wave → rollback at the device", "s")
        .target("≤ 1 heartbeat interval (1 s)")
        .how("a release bad on one device type; first bad heartbeat published → rollback desired state received");
    for run in 0..plan.runs.min(3) {
        let run_dir = dir.join(format!("e2e-{run}"));
        std::fs::create_dir_all(&run_dir)?;
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let coord = Coordinator::start(
            &run_dir,
            &key,
            "1s",
            &[("ROLLOUT__SILENT_AFTER_INTERVALS", "20".into())],
        )?;
        let key_file = run_dir.join("release.pub");
        std::fs::write(&key_file, hex::encode(key.verifying_key().to_bytes()))?;
        let mut loads = load(
            coord.mqtt,
            devices,
            1,
            &[
                "--heartbeat",
                "1s",
                "--key",
                &key_file.display().to_string(),
                "--types",
                "jetson-orin,rpi4,x86-gateway",
                "--bad-type",
                "rpi4",
                "--bad-version",
                "2.0.0",
            ],
        )?;
        coord.wait_online(devices, Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_secs(3));
        let mut link = operator(coord.mqtt).await?;
        let work = run_dir.join("build");
        std::fs::create_dir_all(&work)?;
        let artifacts = run_dir.join("artifacts");
        let strategy =
            "canary_soak = \"2s\"\nwave_soak = \"2s\"\nwaves = [25, 50, 100]\napproval = \"auto\"";
        let good = Spec {
            version: "1.0.0".into(),
            counter: 1,
            rollback_to: None,
            faults: vec![],
            ..Spec::new("1.0.0", 1)
        };
        let v1 = bench_release(&work, &artifacts, coord.http, &key, &good, strategy)?;
        let t = Instant::now();
        let id = start_rollout(&mut link, v1).await?;
        let status = wait_final(&mut link, &id, Duration::from_secs(600)).await?;
        anyhow::ensure!(
            status == RolloutStatus::Completed,
            "the good release ended {status}"
        );
        wall.values.push(t.elapsed().as_secs_f64());

        let bad = Spec {
            version: "2.0.0".into(),
            counter: 2,
            rollback_to: Some((1, "1.0.0".into())),
            faults: vec![],
            ..Spec::new("2.0.0", 2)
        };
        let v2 = bench_release(&work, &artifacts, coord.http, &key, &bad, strategy)?;
        let id = start_rollout(&mut link, v2).await?;
        let status = wait_final(&mut link, &id, Duration::from_secs(300)).await?;
        anyhow::ensure!(
            matches!(status, RolloutStatus::Halted | RolloutStatus::RolledBack),
            "the bad release ended {status}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        link.disconnect().await;
        let summary = stop_load(loads.remove(0))?;
        let bad_at = summary_field(&summary, "first_bad_heartbeat_ms").unwrap_or(0);
        let back_at = summary_field(&summary, "first_rollback_desired_ms").unwrap_or(0);
        if bad_at > 0 && back_at >= bad_at {
            detect.values.push((back_at - bad_at) as f64 / 1000.0);
        }
        drop(coord);
    }
    Ok(vec![wall, detect])
}

async fn brokers(plan: &Plan, dir: &Path) -> anyhow::Result<Vec<Figure>> {
    let devices = plan.broker_devices;
    if mosquitto_binary().is_none() {
        eprintln!(
            "SKIPPED brokers side by side: mosquitto is not installed (apt-get install -y mosquitto)"
        );
        return Ok(Vec::new());
    }
    let label = format!("{devices} devices, 1 s heartbeats");
    let mut cpu = [
        Figure::new(
            "brokers",
            format!("embedded rumqttd: coordinator CPU, {label}"),
            "% of a core",
        ),
        Figure::new(
            "brokers",
            format!("mosquitto: coordinator + mosquitto CPU, {label}"),
            "% of a core",
        ),
    ];
    let mut rss = [
        Figure::new(
            "brokers",
            format!("embedded rumqttd: coordinator RSS, {label}"),
            "MiB",
        ),
        Figure::new(
            "brokers",
            format!("mosquitto: coordinator + mosquitto RSS, {label}"),
            "MiB",
        ),
    ];
    let mut rate = [
        Figure::new("brokers", "embedded rumqttd: heartbeats applied", "/s")
            .how(format!("{devices} devices × 1/s offered")),
        Figure::new("brokers", "mosquitto: heartbeats applied", "/s")
            .how(format!("{devices} devices × 1/s offered")),
    ];
    let mut ratio_cpu = Figure::new("brokers", "CPU ratio embedded / mosquitto", "×");
    let mut ratio_rss = Figure::new("brokers", "RSS ratio embedded / mosquitto", "×");
    for run in 0..plan.runs.min(3) {
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        for (i, kind) in [BrokerKind::Embedded, BrokerKind::Mosquitto]
            .into_iter()
            .enumerate()
        {
            let site = Site::start(&dir.join(format!("brokers-{run}-{i}")), kind, &key, "1s")?;
            let loads = load(site.device_port, devices, 1, &["--heartbeat", "1s"])?;
            site.coord.wait_online(devices, Duration::from_secs(300))?;
            std::thread::sleep(Duration::from_secs(3));
            let http = site.coord.http;
            let n0 = metric(http, "fleet_reports_total{kind=\"heartbeat\"}").unwrap_or(0.0);
            let (c, r) = watch_processes(&site.pids(), plan.ingest_window)?;
            let n1 = metric(http, "fleet_reports_total{kind=\"heartbeat\"}").unwrap_or(0.0);
            cpu[i].values.push(c);
            rss[i].values.push(r);
            rate[i]
                .values
                .push((n1 - n0) / plan.ingest_window.as_secs_f64());
            drop(loads);
            drop(site);
        }
        if let (Some(ce), Some(cm), Some(re), Some(rm)) = (
            cpu[0].values.last(),
            cpu[1].values.last(),
            rss[0].values.last(),
            rss[1].values.last(),
        ) {
            ratio_cpu.values.push(ce / cm.max(0.01));
            ratio_rss.values.push(re / rm.max(0.01));
        }
    }
    let [cpu_e, cpu_m] = cpu;
    let [rss_e, rss_m] = rss;
    let [rate_e, rate_m] = rate;
    Ok(vec![
        cpu_e, cpu_m, rss_e, rss_m, rate_e, rate_m, ratio_cpu, ratio_rss,
    ])
}

// ---------------------------------------------------------------------------------------------

/// Runs every benchmark, prints the table and writes it to `options.out`. On failure the
/// working directory (logs of every process) is kept and named.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("fleet-bench-").tempdir()?;
    let result = measure(&options, dir.path()).await;
    if result.is_err() {
        eprintln!(
            "kept the benchmark's directory for its logs: {}",
            dir.keep().display()
        );
    }
    result
}

async fn measure(options: &Options, dir: &Path) -> anyhow::Result<()> {
    let plan = if options.quick { QUICK } else { FULL };
    let started = Instant::now();
    let mut figures = Vec::new();
    let step = |name: &str| eprintln!("[{:>4.0}s] {name}…", started.elapsed().as_secs_f64());

    if options.measures(Section::Agent) {
        step("agent: binary size and swap latency");
        figures.push(agent_size()?);
        figures.push(swap_latency(&plan)?);
        step("agent: idle cost, trial failure and crash-at-start rollbacks");
        figures.extend(agent_live(&plan, &dir.join("agent")).await?);
        step("agent: blue-green switch back through the forwarder");
        figures.extend(agent_blue_green(&plan, &dir.join("agent-blue-green")).await?);
    }
    if options.measures(Section::Coordinator) {
        for &n in plan.ingest_fleets {
            step(&format!("coordinator: heartbeat ingestion, {n} devices"));
            figures.extend(ingestion(&plan, dir, n).await?);
        }
        step("coordinator: the engine at 100,000 devices");
        figures.extend(tokio::task::block_in_place(|| engine_at_scale(&plan))?);
    }
    if options.measures(Section::EndToEnd) {
        step("end to end: rollout and rollback over simulated devices");
        figures.extend(end_to_end(&plan, dir).await?);
    }
    if options.measures(Section::Brokers) {
        step("brokers side by side");
        figures.extend(brokers(&plan, dir).await?);
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "Measured {} with `{}` ({:.0} s).\n\nMachine: {}.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        options.command(),
        started.elapsed().as_secs_f64(),
        machine()
    );
    let _ = writeln!(
        out,
        "| section | figure | median | min–max | runs | target | how |"
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---|---|");
    for f in &figures {
        let _ = writeln!(out, "{}", f.row());
    }
    print!("{out}");
    if let Some(parent) = options.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&options.out, &out)
        .with_context(|| format!("cannot write {}", options.out.display()))?;
    eprintln!("wrote {}", options.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(quick: bool, only: &[Section]) -> Options {
        Options {
            quick,
            out: PathBuf::from("bench.md"),
            only: only.to_vec(),
        }
    }

    #[test]
    fn sections_parse_by_their_names() {
        for s in Section::ALL {
            assert_eq!(s.name().parse::<Section>(), Ok(s));
        }
        let e = "e2e ".parse::<Section>().unwrap_err();
        assert!(e.contains("\"e2e \"") && e.contains("coordinator"), "{e}");
    }

    #[test]
    fn the_header_names_the_command_and_its_sections() {
        let cases: &[(bool, &[Section], &str, &[Section])] = &[
            (false, &[], "bench", &Section::ALL),
            (true, &[], "bench --quick", &Section::ALL),
            (
                true,
                &[Section::Agent],
                "bench --quick --only agent",
                &[Section::Agent],
            ),
            (
                false,
                &[Section::EndToEnd, Section::Brokers],
                "bench --only e2e,brokers",
                &[Section::EndToEnd, Section::Brokers],
            ),
        ];
        for (quick, only, command, measured) in cases {
            let o = options(*quick, only);
            assert_eq!(
                o.command(),
                format!("cargo run --release -p fleet-sim -- {command}")
            );
            for s in Section::ALL {
                assert_eq!(o.measures(s), measured.contains(&s), "{command}: {s:?}");
            }
        }
    }

    #[test]
    fn json_fields_of_a_health_answer() {
        let body = r#"{"status":"unhealthy","version":"2.0.3","checks":{"errors":"failing"}}"#;
        assert_eq!(json_field(body, "status"), Some("unhealthy"));
        assert_eq!(json_field(body, "version"), Some("2.0.3"));
        assert_eq!(json_field(body, "missing"), None);
        assert_eq!(json_field("", "version"), None);
    }
}
