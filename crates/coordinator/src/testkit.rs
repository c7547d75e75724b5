//! Builders for tests and simulations: signed releases from a few knobs, registry devices, and
//! [`VirtualFleet`], a whole fleet driven through the pure engine in virtual time (no clock, no
//! network). fleet-sim and the coordinator's own tests use it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;

use fleet_proto::device::{AppStatus, DeviceFacts, Installed, OutcomeKind, RollbackReason, Slot};
use fleet_proto::hex::Sha256;
use fleet_proto::release::{Arch, Release};
use fleet_proto::rollout::RolloutStatus;
use fleet_proto::{DeviceId, RolloutId, SignedRelease, SigningKey, UnixMillis};

use crate::baseline::Sample;
use crate::checklist::{self, CheckContext, Validation};
use crate::engine::{self, Action, Event, OperatorCommand, ReportedOutcome, Rollout, Settings};
use crate::model::DeviceInfo;

/// 2026-11-27T00:00:00Z: the start of virtual time.
pub const T0: UnixMillis = UnixMillis(1_795_737_600_000);

pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// The knobs of a test manifest.
#[derive(Clone, Debug)]
pub struct Knobs {
    pub strategy: &'static str,
    pub canary_percent: f64,
    pub waves: Vec<u8>,
    pub canary_soak: &'static str,
    pub wave_soak: &'static str,
    pub approval: &'static str,
    pub error_rate_pts: f64,
    pub hardware: Vec<&'static str>,
    pub rollback_to: Option<(u64, String)>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            strategy: "canary-rolling",
            canary_percent: 5.0,
            waves: vec![25, 50, 100],
            canary_soak: "10m",
            wave_soak: "5m",
            approval: "manual",
            error_rate_pts: 5.0,
            hardware: vec!["rpi4", "jetson"],
            rollback_to: None,
        }
    }
}

/// A manifest's TOML text.
pub fn manifest(name: &str, version: &str, counter: u64, k: &Knobs) -> String {
    let rollback = k
        .rollback_to
        .as_ref()
        .map(|(c, v)| format!("rollback_to = {{ counter = {c}, version = \"{v}\" }}\n"))
        .unwrap_or_default();
    let hw: Vec<String> = k.hardware.iter().map(|h| format!("\"{h}\"")).collect();
    let waves: Vec<String> = k.waves.iter().map(|w| w.to_string()).collect();
    format!(
        r#"[release]
name = "{name}"
version = "{version}"
counter = {counter}
not_before = "2026-01-01T00:00:00Z"
expires = "2030-01-01T00:00:00Z"
hardware = [{hw}]
{rollback}
[artifacts.aarch64]
url = "http://127.0.0.1:8080/artifacts/3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"
sha256 = "3f2a4c1b9e8d7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"
size = 1024
[artifacts.x86_64]
url = "http://127.0.0.1:8080/artifacts/9c01d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b"
sha256 = "9c01d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b"
size = 1024
[run]
entrypoint = "bin/app"
[resources]
disk_mb = 10
memory_mb = 64
[health]
endpoint = "http://127.0.0.1:{{port}}/health"
[trial]
deadline = "1m"
good_probes = 2
probe_interval = "1s"
[strategy]
kind = "{strategy}"
canary_percent = {cp}
waves = [{waves}]
canary_soak = "{cs}"
wave_soak = "{ws}"
approval = "{approval}"
[thresholds]
error_rate_pts = {erp}
"#,
        hw = hw.join(", "),
        strategy = k.strategy,
        cp = k.canary_percent,
        waves = waves.join(", "),
        cs = k.canary_soak,
        ws = k.wave_soak,
        approval = k.approval,
        erp = k.error_rate_pts,
    )
}

/// A signed release from a manifest.
pub fn signed(name: &str, version: &str, counter: u64, k: &Knobs) -> (Release, SignedRelease) {
    let text = manifest(name, version, counter, k);
    let release = fleet_proto::manifest::parse(&text, T0).expect("the test manifest is valid");
    let signed = SignedRelease::sign(&release, &signing_key());
    (release, signed)
}

pub fn installed(r: &Release, s: &SignedRelease) -> Installed {
    Installed {
        name: r.name.clone(),
        version: r.version.clone(),
        counter: r.counter,
        digest: s.digest(),
        slot: Slot::A,
    }
}

pub fn facts(device_type: &str, region: &str, tags: &[&str]) -> DeviceFacts {
    DeviceFacts {
        device_type: device_type.into(),
        arch: Arch::Aarch64,
        region: region.into(),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        agent_version: "0.1.0".into(),
        runtime: "process".into(),
        memory_total_bytes: 4 << 30,
        disk_total_bytes: 32 << 30,
    }
}

pub fn healthy(version: &str, error_rate: f64) -> Sample {
    Sample {
        status: AppStatus::Healthy,
        version: Some(version.into()),
        error_rate: Some(error_rate),
        p95_ms: Some(100.0),
        cpu_pct: 20.0,
        memory_pct: 40.0,
        restarts_in_window: 0,
        probe_ok: Some(true),
        // Virtual devices report no request counts: each sample is one observation, the
        // most conservative weighting.
        requests: None,
        failed: None,
    }
}

/// A registered, online device running `active`.
pub fn device(id: &str, device_type: &str, region: &str, active: Option<Installed>) -> DeviceInfo {
    let mut d = DeviceInfo::new(DeviceId::new(id).expect("test ids are valid"));
    d.facts = Some(facts(device_type, region, &[]));
    d.online = true;
    d.health = Some(healthy(
        active.as_ref().map_or("none", |a| a.version.as_str()),
        0.01,
    ));
    d.highest_counter = active.as_ref().map_or(0, |a| a.counter);
    d.active = active;
    d.last_seen = Some(T0);
    d.last_heartbeat_at = Some(T0);
    d.disk_free_bytes = Some(16 << 30);
    d
}

/// `n` devices over two types and two regions, all running `active`.
pub fn fleet(n: usize, active: Option<Installed>) -> BTreeMap<DeviceId, DeviceInfo> {
    (0..n)
        .map(|i| {
            let ty = if i % 4 == 0 { "jetson" } else { "rpi4" };
            let region = if i % 3 == 0 { "eu" } else { "us" };
            let d = device(&format!("dev-{i:06}"), ty, region, active.clone());
            (d.id.clone(), d)
        })
        .collect()
}

/// Runs the checklist over a fleet (every release held).
pub fn validate(
    devices: &BTreeMap<DeviceId, DeviceInfo>,
    signed: &SignedRelease,
    now: UnixMillis,
) -> Validation {
    let keys = [signing_key().verifying_key()];
    let opened = signed.open(&keys);
    let held = |_: &str, _: u64, _: &str| true;
    let ctx = CheckContext {
        now,
        fresh_heartbeat: Duration::from_secs(3600),
        held: &held,
    };
    let infos: Vec<&DeviceInfo> = devices.values().collect();
    checklist::check(signed, &opened, &infos, &ctx)
}

/// Validates and starts a rollout; panics when the checklist fails (a test bug).
pub fn start(
    devices: &BTreeMap<DeviceId, DeviceInfo>,
    release: &Release,
    signed: &SignedRelease,
    settings: Settings,
    now: UnixMillis,
) -> (Rollout, Vec<Action>) {
    let v = validate(devices, signed, now);
    assert!(v.ok(), "checklist failed: {:#?}", v.failed());
    let targets: BTreeMap<DeviceId, &DeviceInfo> =
        devices.iter().map(|(k, v)| (k.clone(), v)).collect();
    engine::create(
        RolloutId::new("r-1").expect("valid"),
        signed.digest(),
        release.clone(),
        "tester",
        &v.plan,
        &targets,
        settings,
        now,
    )
}

/// How a simulated device behaves on the new release.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Behaviour {
    Good,
    /// Reports this error rate (fraction) once it runs the release.
    Errors(f64),
    /// The agent's trial fails: it rolls back on its own.
    FailsTrial,
    /// Goes silent after installing.
    Bricks,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SimEv {
    Tick,
    Heartbeat(DeviceId),
    Outcome(DeviceId, u64),
}

/// A whole fleet in virtual time through the pure engine: devices install what the desired
/// state says after `install_delay`, heartbeat every `heartbeat`, and the engine ticks every
/// `tick`.
#[derive(Debug)]
pub struct VirtualFleet {
    pub now: UnixMillis,
    pub rollout: Rollout,
    pub heartbeat: Duration,
    pub tick: Duration,
    pub install_delay: Duration,
    pub behaviour: HashMap<DeviceId, Behaviour>,
    /// What each device runs (digest), and its version.
    pub running: HashMap<DeviceId, Option<(Sha256, String)>>,
    pub offline: HashMap<DeviceId, bool>,
    /// Every action, in order, with the time it was returned.
    pub log: Vec<(UnixMillis, Action)>,
    pub keep_log: bool,
    pub auto_approve: bool,
    pub steps: u64,
    previous: HashMap<DeviceId, Option<(Sha256, String)>>,
    new_version: String,
    queue: BinaryHeap<Reverse<(UnixMillis, u64, SimEv)>>,
    seq: u64,
}

impl VirtualFleet {
    pub fn new(
        devices: &BTreeMap<DeviceId, DeviceInfo>,
        rollout: Rollout,
        actions: Vec<Action>,
        now: UnixMillis,
    ) -> VirtualFleet {
        let running: HashMap<DeviceId, Option<(Sha256, String)>> = devices
            .values()
            .map(|d| {
                (
                    d.id.clone(),
                    d.active.as_ref().map(|a| (a.digest, a.version.clone())),
                )
            })
            .collect();
        let heartbeat = rollout.settings.report_interval;
        let mut f = VirtualFleet {
            now,
            new_version: rollout.release.version.clone(),
            rollout,
            heartbeat,
            tick: heartbeat,
            install_delay: Duration::from_secs(30),
            behaviour: HashMap::new(),
            previous: running.clone(),
            running,
            offline: devices
                .values()
                .map(|d| (d.id.clone(), !d.online))
                .collect(),
            log: Vec::new(),
            keep_log: true,
            auto_approve: true,
            steps: 0,
            queue: BinaryHeap::new(),
            seq: 0,
        };
        // Spread the heartbeats over one interval, deterministically.
        let n = devices.len().max(1) as u64;
        let ms = heartbeat.as_millis() as u64;
        for (i, id) in devices.keys().enumerate() {
            let at = UnixMillis(now.0 + (i as u64 * ms) / n);
            f.schedule(at, SimEv::Heartbeat(id.clone()));
        }
        f.schedule(now.saturating_add(f.tick), SimEv::Tick);
        f.take(actions);
        f
    }

    fn schedule(&mut self, at: UnixMillis, ev: SimEv) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn take(&mut self, actions: Vec<Action>) {
        for a in actions {
            if let Action::Desire {
                device,
                release,
                sequence,
                ..
            } = &a
            {
                if *release == Some(self.rollout.digest) {
                    let already = self
                        .running
                        .get(device)
                        .and_then(|r| r.as_ref())
                        .is_some_and(|(d, _)| *d == self.rollout.digest);
                    if !already && !self.offline.get(device).copied().unwrap_or(false) {
                        let at = self.now.saturating_add(self.install_delay);
                        self.schedule(at, SimEv::Outcome(device.clone(), *sequence));
                    }
                } else {
                    // A rollback to the previous release (or "keep what is installed").
                    if release.is_some() {
                        let prev = self.previous.get(device).cloned().flatten();
                        self.running.insert(device.clone(), prev);
                    }
                }
            }
            if self.keep_log {
                self.log.push((self.now, a));
            }
        }
    }

    pub fn step(&mut self, ev: Event) {
        let actions = engine::step_in_place(&mut self.rollout, &ev, self.now);
        self.steps += 1;
        self.take(actions);
    }

    fn sample(&self, id: &DeviceId) -> Sample {
        let running = self.running.get(id).cloned().flatten();
        let version = running
            .as_ref()
            .map_or("none".to_owned(), |(_, v)| v.clone());
        let on_new = version == self.new_version;
        let err = match self.behaviour.get(id) {
            Some(Behaviour::Errors(e)) if on_new => *e,
            _ => 0.01,
        };
        healthy(&version, err)
    }

    /// Processes events until `done` holds or virtual time passes `limit`.
    pub fn run_until(&mut self, limit: Duration, done: impl Fn(&Rollout) -> bool) -> bool {
        let end = self.now.saturating_add(limit);
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            if at > end {
                self.queue.push(Reverse((at, 0, ev)));
                self.now = end;
                return done(&self.rollout);
            }
            self.now = at;
            match ev {
                SimEv::Tick => {
                    self.step(Event::Tick);
                    let next = self.now.saturating_add(self.tick);
                    self.schedule(next, SimEv::Tick);
                }
                SimEv::Heartbeat(id) => {
                    let silent = self.offline.get(&id).copied().unwrap_or(false)
                        || (self.behaviour.get(&id) == Some(&Behaviour::Bricks)
                            && self
                                .running
                                .get(&id)
                                .and_then(|r| r.as_ref())
                                .is_some_and(|(_, v)| *v == self.new_version));
                    if !silent {
                        let sample = self.sample(&id);
                        self.step(Event::Heartbeat {
                            device: id.clone(),
                            sample,
                        });
                    }
                    let next = self.now.saturating_add(self.heartbeat);
                    self.schedule(next, SimEv::Heartbeat(id));
                }
                SimEv::Outcome(id, sequence) => {
                    let rollout = Some(self.rollout.id.clone());
                    let (active, kind) = if self.behaviour.get(&id) == Some(&Behaviour::FailsTrial)
                    {
                        (
                            self.running.get(&id).cloned().flatten().map(|(d, _)| d),
                            OutcomeKind::RolledBack(RollbackReason::CrashAtStart {
                                exit_code: Some(1),
                            }),
                        )
                    } else {
                        self.running.insert(
                            id.clone(),
                            Some((self.rollout.digest, self.new_version.clone())),
                        );
                        (Some(self.rollout.digest), OutcomeKind::Committed)
                    };
                    self.step(Event::Reported {
                        device: id,
                        active,
                        outcome: Some(ReportedOutcome {
                            rollout,
                            sequence,
                            kind,
                        }),
                    });
                }
            }
            if self.auto_approve && self.rollout.status == RolloutStatus::AwaitingApproval {
                self.step(Event::Operator {
                    operator: "sim".into(),
                    command: OperatorCommand::Approve,
                });
            }
            if done(&self.rollout) {
                return true;
            }
        }
        done(&self.rollout)
    }
}
