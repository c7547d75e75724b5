#![allow(dead_code)]
//! Test support: a real broker (rumqttd on its own thread), an MQTT observer, real signed
//! releases whose artifacts are tar.gz files with a launcher script that execs the real
//! fleet-demo-app, and the real fleet-agent binary as a child process killed on drop.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use fleet_agent::machine::{Phase, State};
use fleet_proto::device::{Desired, Event, EventKind, Reported};
use fleet_proto::hex::Sha256;
use fleet_proto::release::*;
use fleet_proto::{DeviceId, SignedRelease, SigningKey, Topic, UnixMillis, decode, encode};

/// Bound for anything to happen on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(40);
const POLL: Duration = Duration::from_millis(25);

/// Calls `probe` until it returns `Some`, panicking with `what` after `within`.
#[track_caller]
pub fn wait_until<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

pub fn now() -> UnixMillis {
    UnixMillis::from_system(std::time::SystemTime::now())
}

/// The demo app binary, built from the workspace if this test run has not built it.
pub fn demo_app() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let agent = PathBuf::from(env!("CARGO_BIN_EXE_fleet-agent"));
        let path = agent.with_file_name("fleet-demo-app");
        if !path.exists() {
            let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["build", "-p", "fleet-demo-app"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build -p fleet-demo-app");
            assert!(status.success(), "cargo build -p fleet-demo-app failed");
        }
        assert!(path.exists(), "no fleet-demo-app at {}", path.display());
        path
    })
    .clone()
}

// ---------------------------------------------------------------------------------------------
// Broker

/// Starts rumqttd on `port` on its own thread (it has no shutdown; it ends with the process).
pub fn start_broker_on(port: u16) {
    let listen = format!("127.0.0.1:{port}").parse().unwrap();
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5000,
            max_payload_size: 1 << 20,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 1000,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("v4".to_string(), server)])),
        ..Default::default()
    };
    thread::spawn(move || {
        let mut broker = rumqttd::Broker::new(config);
        let _ = broker.start();
    });
    wait_until("the broker to listen", PATIENCE, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

/// One broker per test process.
pub fn broker() -> u16 {
    static PORT: OnceLock<u16> = OnceLock::new();
    *PORT.get_or_init(|| {
        let port = free_port();
        start_broker_on(port);
        port
    })
}

// ---------------------------------------------------------------------------------------------
// Observer

#[derive(Debug, Default)]
pub struct Seen {
    pub events: Vec<Event>,
    pub states: Vec<Reported>,
    pub heartbeats: u32,
    pub last_heartbeat: Option<fleet_proto::device::Heartbeat>,
    pub online: Vec<bool>,
}

/// An MQTT client watching one device's topics and publishing its desired state.
pub struct Observer {
    pub client: rumqttc::Client,
    pub device: DeviceId,
    pub seen: Arc<Mutex<Seen>>,
}

impl Observer {
    pub fn new(port: u16, device: &DeviceId) -> Observer {
        let mut o =
            rumqttc::MqttOptions::new(format!("obs-{device}-{}", rand_suffix()), "127.0.0.1", port);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = rumqttc::Client::new(o, 100);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (s, c, id) = (Arc::clone(&seen), client.clone(), device.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                        let _ = c.subscribe(
                            format!("fleet/v1/devices/{id}/#"),
                            rumqttc::QoS::AtLeastOnce,
                        );
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                        let topic: Topic = match p.topic.parse() {
                            Ok(t) => t,
                            Err(_) => continue,
                        };
                        let mut s = s.lock().unwrap();
                        match topic {
                            Topic::Events(_) => {
                                if let Ok(e) = decode::<Event>(&p.payload) {
                                    s.events.push(e);
                                }
                            }
                            Topic::State(_) => {
                                if let Ok(r) = decode::<Reported>(&p.payload) {
                                    s.states.push(r);
                                }
                            }
                            Topic::Heartbeat(_) => {
                                s.heartbeats += 1;
                                s.last_heartbeat = decode(&p.payload).ok();
                            }
                            Topic::Online(_) => {
                                if let Ok(o) = decode::<fleet_proto::device::Online>(&p.payload) {
                                    s.online.push(o.online);
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        ready_rx
            .recv_timeout(PATIENCE)
            .expect("observer subscribed");
        Observer {
            client,
            device: device.clone(),
            seen,
        }
    }

    pub fn publish_desired(&self, d: &Desired) {
        self.client
            .publish(
                Topic::Desired(self.device.clone()).to_string(),
                rumqttc::QoS::AtLeastOnce,
                true,
                encode(d),
            )
            .unwrap();
    }

    pub fn publish_raw(&self, payload: Vec<u8>) {
        self.client
            .publish(
                Topic::Desired(self.device.clone()).to_string(),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .unwrap();
    }

    /// Waits for an event matching `pred` and returns it.
    #[track_caller]
    pub fn wait_event(&self, what: &str, within: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        wait_until(what, within, || {
            self.seen
                .lock()
                .unwrap()
                .events
                .iter()
                .find(|e| pred(e))
                .cloned()
        })
    }

    #[track_caller]
    pub fn wait_state(&self, what: &str, pred: impl Fn(&Reported) -> bool) -> Reported {
        wait_until(what, PATIENCE, || {
            self.seen
                .lock()
                .unwrap()
                .states
                .iter()
                .rev()
                .find(|r| pred(r))
                .cloned()
        })
    }

    pub fn events(&self) -> Vec<Event> {
        self.seen.lock().unwrap().events.clone()
    }

    /// The kinds of the events of desired `sequence` by name, as they arrived.
    pub fn kinds_at(&self, sequence: u64) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e.sequence == sequence)
            .map(|e| kind_name(&e.kind))
            .collect()
    }

    /// Event kinds by name, in seq order, duplicates (at-least-once) removed.
    pub fn event_names(&self) -> Vec<String> {
        let mut by_seq = BTreeMap::new();
        for e in self.events() {
            by_seq.insert(e.seq, kind_name(&e.kind));
        }
        by_seq.into_values().collect()
    }

    /// Asserts event seqs form 1..=max with no gap (none lost).
    #[track_caller]
    pub fn assert_no_gap(&self) {
        let seqs: std::collections::BTreeSet<u64> = self.events().iter().map(|e| e.seq).collect();
        let max = seqs.iter().next_back().copied().unwrap_or(0);
        let missing: Vec<u64> = (1..=max).filter(|s| !seqs.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "events lost: seqs {missing:?} of 1..={max} never arrived"
        );
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst) + u64::from(std::process::id()) * 1000
}

/// The kinds of event an update on the ordinary path emits, in order (download, install, swap,
/// trial, commit).
pub const ORDINARY_UPDATE_EVENTS: &[&str] = &[
    "DownloadStarted",
    "DownloadFinished",
    "Verified",
    "Installed",
    "Swapped",
    "TrialStarted",
    "Committed",
];

pub fn kind_name(k: &EventKind) -> String {
    let dbg = format!("{k:?}");
    dbg.split([' ', '{', '(']).next().unwrap_or("").to_string()
}

// ---------------------------------------------------------------------------------------------
// Releases

/// One "version" of the app: what its launcher passes to fleet-demo-app.
#[derive(Clone, Debug)]
pub struct Version {
    pub version: String,
    pub knobs: Vec<String>,
    /// A post-install hook script body, if any.
    pub hook: Option<String>,
}

pub fn version(v: &str, knobs: &[&str]) -> Version {
    Version {
        version: v.into(),
        knobs: knobs.iter().map(|s| s.to_string()).collect(),
        hook: None,
    }
}

/// The launcher script inside the artifact.
pub fn launcher(v: &Version) -> String {
    format!(
        "#!/bin/sh\nexec {} --version {} --work-interval-ms 20 {} \"$@\"\n",
        demo_app().display(),
        v.version,
        v.knobs.join(" ")
    )
}

/// Builds `dir/app-VERSION.tar.gz` and returns (path, sha256, size).
pub fn artifact(dir: &Path, v: &Version) -> (PathBuf, Sha256, u64) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("run", launcher(v).as_bytes(), 0o755);
    add("VERSION", v.version.as_bytes(), 0o644);
    // Padding so downloads have a middle.
    let pad: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    add("share/model.bin", &pad, 0o644);
    if let Some(hook) = &v.hook {
        add("hooks/post-install", hook.as_bytes(), 0o755);
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let bytes = gz.finish().unwrap();
    let path = dir.join(format!("app-{}-{}.tar.gz", v.version, rand_suffix()));
    std::fs::write(&path, &bytes).unwrap();
    (path, Sha256::of(&bytes), bytes.len() as u64)
}

/// Trial settings short enough for tests.
pub fn quick_trial() -> Trial {
    Trial {
        deadline: Duration::from_secs(10),
        good_probes: 3,
        probe_interval: Duration::from_millis(150),
    }
}

pub fn release(counter: u64, v: &Version, url: String, sha256: Sha256, size: u64) -> Release {
    let arch = Arch::current().unwrap();
    Release {
        name: "demo".into(),
        version: v.version.clone(),
        counter,
        not_before: UnixMillis(now().0 - 3_600_000),
        expires: UnixMillis(now().0 + 86_400_000),
        hardware: vec!["test-box".into()],
        rollback_to: None,
        artifacts: BTreeMap::from([(arch, Artifact { url, sha256, size })]),
        run: Run {
            entrypoint: "run".into(),
            args: vec![],
            env: BTreeMap::from([("FLEET_DEMO_SEED".into(), "7".into())]),
        },
        resources: Resources {
            disk_bytes: 1 << 20,
            memory_bytes: 1 << 20,
        },
        health: HealthCheck {
            endpoint: "http://127.0.0.1:{port}/health".into(),
            expected_version: v.version.clone(),
            timeout: Duration::from_millis(500),
        },
        probe: Some(Probe {
            check: ProbeCheck::Command(vec!["./run".into(), "infer".into(), "hello".into()]),
            expected_sha256: Sha256::of(b"label=dog score=0.518\n"),
            max_latency: Duration::from_secs(3),
        }),
        trial: quick_trial(),
        strategy: Strategy {
            kind: StrategyKind::CanaryRolling,
            canary_percent: 5.0,
            waves: vec![100],
            canary_soak: Duration::from_secs(1),
            wave_soak: Duration::from_secs(1),
            approval: Approval::Auto,
        },
        target: Target::default(),
        thresholds: Thresholds {
            crash_loop_restarts: 3,
            crash_loop_window: Duration::from_secs(60),
            ..Thresholds::default()
        },
        container: None,
        data_dirs: Vec::new(),
    }
}

/// A signed release for `v`, its artifact in `dir` behind a file:// URL.
pub fn signed_file_release(dir: &Path, counter: u64, v: &Version) -> (Release, SignedRelease) {
    let (path, sha, size) = artifact(dir, v);
    let r = release(counter, v, format!("file://{}", path.display()), sha, size);
    let s = SignedRelease::sign(&r, &key());
    (r, s)
}

pub fn desired(
    device: &DeviceId,
    sequence: u64,
    release: Option<SignedRelease>,
    retry: u32,
) -> Desired {
    Desired {
        device: device.clone(),
        sequence,
        rollout: Some(fleet_proto::RolloutId::new("r-1").unwrap()),
        release,
        report_interval: Duration::from_secs(1),
        retry,
        hold: false,
    }
}

// ---------------------------------------------------------------------------------------------
// Device + agent

/// A device's directories and config.
pub struct Device {
    pub dir: tempfile::TempDir,
    pub id: DeviceId,
    pub app_port: u16,
    pub broker_port: u16,
}

impl Device {
    pub fn new(name: &str, broker_port: u16) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let id = DeviceId::new(format!("{name}-{}", rand_suffix())).unwrap();
        let d = Device {
            dir,
            id,
            app_port: free_port(),
            broker_port,
        };
        d.write_config();
        d
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn write_config(&self) {
        let key_hex = hex::encode(key().verifying_key().as_bytes());
        let text = format!(
            r#"log_level = "debug"
[device]
id = "{id}"
type = "test-box"
region = "lab"
tags = ["test"]
[mqtt]
host = "127.0.0.1"
port = {broker}
keep_alive = "5s"
reconnect_min = "100ms"
reconnect_max = "500ms"
[trust]
keys = ["{key_hex}"]
[paths]
root = "{root}"
state = "{state}"
[app]
port = {app}
stop_grace = "2s"
restart_backoff_min = "100ms"
restart_backoff_max = "400ms"
[fetch]
attempts = 4
retry_min = "50ms"
retry_max = "200ms"
min_rate_window = "5s"
[trial]
failures_allowed = 3
restore_timeout = "15s"
hook_timeout = "10s"
[reports]
heartbeat_interval = "1s"
health_timeout = "500ms"
"#,
            id = self.id,
            broker = self.broker_port,
            root = self.root().display(),
            state = self.state_dir().display(),
            app = self.app_port,
        );
        std::fs::write(self.config_path(), text).unwrap();
    }

    /// The journal as the agent left it.
    pub fn journal(&self) -> Option<State> {
        let bytes = std::fs::read(self.state_dir().join("journal")).ok()?;
        fleet_agent::journal::decode(&bytes).ok()
    }

    pub fn idle_at(&self, sequence: u64) -> Option<State> {
        self.journal()
            .filter(|s| matches!(s.phase, Phase::Idle) && s.applied_sequence >= sequence)
    }

    /// The version /health reports, if the app answers.
    pub fn app_version(&self) -> Option<String> {
        let body = http_get(self.app_port, "/health")?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        doc.get("version")?.as_str().map(str::to_owned)
    }

    #[track_caller]
    pub fn wait_serving(&self, version: &str) {
        wait_until(&format!("the app to serve {version}"), PATIENCE, || {
            (self.app_version().as_deref() == Some(version)).then_some(())
        });
    }

    /// Files and digests of one slot directory.
    pub fn snapshot_of(&self, slot_dir: &Path) -> Vec<String> {
        let dir = self.root().join(slot_dir);
        let mut files: Vec<String> = walk(&dir)
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap_or_default();
                format!(
                    "{} {}",
                    p.strip_prefix(&dir).unwrap().display(),
                    Sha256::of(&bytes).short()
                )
            })
            .collect();
        files.sort();
        files
    }

    /// What the active link and slots look like, to compare before/after.
    pub fn snapshot(&self) -> String {
        let mut out = format!(
            "active -> {:?}\n",
            std::fs::read_link(self.root().join("active")).ok()
        );
        for slot in ["slot-a", "slot-b"] {
            let dir = self.root().join(slot);
            let mut files: Vec<String> = walk(&dir)
                .into_iter()
                .map(|p| {
                    let bytes = std::fs::read(&p).unwrap_or_default();
                    format!(
                        "{} {}",
                        p.strip_prefix(&dir).unwrap().display(),
                        Sha256::of(&bytes).short()
                    )
                })
                .collect();
            files.sort();
            out += &format!("{slot}: {files:?}\n");
        }
        out
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Copies a directory tree (symlinks as symlinks).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let src = e.path();
        let dst = to.join(e.file_name());
        let meta = std::fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The real fleet-agent binary, SIGKILLed on drop (its app dies with it: PDEATHSIG).
pub struct Agent {
    pub child: Child,
    pub stderr: Arc<Mutex<String>>,
}

impl Agent {
    pub fn start(device: &Device, env: &[(&str, &str)]) -> Agent {
        // MEASURE_AGENT_BIN points the size/RSS measurement at the release build.
        let bin = std::env::var("MEASURE_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fleet-agent").into());
        let mut cmd = Command::new(bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEET_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .arg("--config")
            .arg(device.config_path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleet-agent");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Agent { child, stderr }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the agent to exit on its own (a fault point), within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("---- fleet-agent stderr ----\n{}", self.stderr());
        }
    }
}

/// Waits until the app no longer answers on `port` (its agent was killed).
pub fn wait_port_free(port: u16) {
    wait_until("the old app to die", PATIENCE, || {
        TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    });
}

/// Installs and commits `v` on a fresh device through the real flow; returns sequence used.
pub fn commit_first(
    dev: &Device,
    obs: &Observer,
    v: &Version,
    counter: u64,
    sequence: u64,
) -> Release {
    let (r, s) = signed_file_release(dev.dir.path(), counter, v);
    obs.publish_desired(&desired(&dev.id, sequence, Some(s), 0));
    obs.wait_event(&format!("{} committed", v.version), PATIENCE, |e| {
        e.sequence == sequence && matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving(&v.version);
    r
}

/// One fleet-demo-app server a device's agent runs (not a functional probe's `infer` run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub pid: i32,
    pub version: String,
    /// Its `FLEET_APP_PORT`: with a blue-green switch, the port of the slot it runs from.
    pub port: u16,
}

/// The app servers of `dev`'s agent, found by the `FLEET_DEVICE_ID` the agent gives its app
/// (test devices of one run share versions, so a version alone does not say whose it is).
pub fn instances_of(dev: &Device) -> Vec<Instance> {
    let device = format!("FLEET_DEVICE_ID={}", dev.id);
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let (Ok(cmd), Ok(environ)) = (
            std::fs::read(e.path().join("cmdline")),
            std::fs::read(e.path().join("environ")),
        ) else {
            continue;
        };
        let split = |b: &[u8]| -> Vec<String> {
            b.split(|c| *c == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        };
        let (args, env) = (split(&cmd), split(&environ));
        // Under qemu-user (binfmt_misc) the interpreter comes first.
        if !args.iter().take(2).any(|a| a.ends_with("fleet-demo-app"))
            || args.iter().any(|a| a == "infer")
            || !env.contains(&device)
        {
            continue;
        }
        let Some(version) = args
            .windows(2)
            .find(|w| w[0] == "--version")
            .map(|w| w[1].clone())
        else {
            continue;
        };
        let port = env
            .iter()
            .find_map(|v| v.strip_prefix("FLEET_APP_PORT="))
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        out.push(Instance { pid, version, port });
    }
    out.sort_by_key(|i| i.pid);
    out
}
