//! Protocol-level simulated devices: many MQTT clients in one process that behave like agents
//! on the wire (online + last will, retained state, heartbeats, events, converging to the
//! desired release) without slots or application processes. For load tests and benchmarks;
//! the demo uses real agents.
//!
//! Each device admits a desired release with the real `admit` (signature, counter, target) when
//! a release key is given, "installs" it after a configurable delay, and reports health that the
//! fault mix shapes: some devices roll every new release back, devices of one type can turn bad
//! on one version, some never come online, and connections churn.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use fleet_proto::device::Desired;
use fleet_proto::device::{
    AppHealth, AppStatus, DeviceFacts, Event, EventKind, Heartbeat, Installed, Online, Outcome,
    OutcomeKind, Reported, RollbackReason, Slot, SystemHealth, UpdatePhase,
};
use fleet_proto::release::{Accepted, Arch, Trust, admit};
use fleet_proto::{DeviceId, Topic, UnixMillis, VerifyingKey, decode, encode};
use rand::Rng as _;
use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::watch;

/// How the simulated fleet looks and misbehaves.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub host: String,
    pub port: u16,
    /// Device ids are `{prefix}-{index:05}`.
    pub prefix: String,
    /// Index of the first device (several processes split one fleet).
    pub first: usize,
    pub devices: usize,
    pub heartbeat: Duration,
    pub device_types: Vec<String>,
    pub regions: Vec<String>,
    /// Pinned release key; without one, desired releases are taken as they come.
    pub key: Option<VerifyingKey>,
    pub install_delay: Duration,
    /// Share of devices (0–1) that roll back every new release (crash loop).
    pub fail_install: f64,
    /// Share of devices that never come online.
    pub offline: f64,
    /// Devices of this type report a 30 % error rate on `bad_version`.
    pub bad_type: Option<String>,
    pub bad_version: Option<String>,
    /// Average disconnects per device per hour.
    pub churn_per_hour: f64,
    /// Devices sharing one MQTT connection (1: one connection per device, as on a real fleet).
    pub per_connection: usize,
}

/// Counters shared by all simulated devices.
#[derive(Debug, Default)]
pub struct Stats {
    pub connected: AtomicU64,
    pub heartbeats: AtomicU64,
    pub desired: AtomicU64,
    pub committed: AtomicU64,
    pub rolled_back: AtomicU64,
    pub refused: AtomicU64,
    pub reconnects: AtomicU64,
    /// When the first heartbeat reporting the bad release's errors went out (Unix ms, 0 = never).
    pub first_bad_heartbeat_ms: AtomicU64,
    /// When a device running the bad release first received a different desired release: the
    /// coordinator's rollback reaching the device (Unix ms, 0 = never).
    pub first_rollback_desired_ms: AtomicU64,
}

/// A device's identity and its fault draw, fixed for the run.
#[derive(Clone, Debug)]
struct Spec {
    id: DeviceId,
    facts: DeviceFacts,
    fails_installs: bool,
    never_online: bool,
}

fn spec(config: &LoadConfig, index: usize, rng: &mut impl rand::Rng) -> anyhow::Result<Spec> {
    let pick = |list: &[String], fallback: &str| {
        list.get(index % list.len().max(1))
            .cloned()
            .unwrap_or_else(|| fallback.to_owned())
    };
    Ok(Spec {
        id: DeviceId::new(format!("{}-{index:05}", config.prefix))?,
        facts: DeviceFacts {
            device_type: pick(&config.device_types, "sim-device"),
            arch: Arch::current().unwrap_or(Arch::X86_64),
            region: pick(&config.regions, "sim-region"),
            tags: if index.is_multiple_of(10) {
                vec!["high-fidelity".into()]
            } else {
                Vec::new()
            },
            agent_version: format!("sim-{}", env!("CARGO_PKG_VERSION")),
            runtime: "simulated".into(),
            memory_total_bytes: 4 << 30,
            disk_total_bytes: 32 << 30,
        },
        fails_installs: rng.r#gen::<f64>() < config.fail_install,
        never_online: rng.r#gen::<f64>() < config.offline,
    })
}

/// What a simulated device has installed and reported.
struct Device {
    spec: Spec,
    active: Option<Installed>,
    highest: Option<Accepted>,
    applied_sequence: u64,
    last_outcome: Option<Outcome>,
    state_seq: u64,
    heartbeat_seq: u64,
    event_seq: u64,
    interval: Duration,
    started: std::time::Instant,
}

fn now() -> UnixMillis {
    UnixMillis::from_system(SystemTime::now())
}

impl Device {
    fn reported(&mut self) -> Reported {
        self.state_seq += 1;
        Reported {
            device: self.spec.id.clone(),
            seq: self.state_seq,
            facts: self.spec.facts.clone(),
            active: self.active.clone(),
            standby: None,
            phase: UpdatePhase::Idle,
            applied_sequence: self.applied_sequence,
            last_outcome: self.last_outcome.clone(),
            highest_counter: self.highest.as_ref().map_or(0, |h| h.counter),
            at: now(),
            // A simulated device commits any release it admits, blue-green included.
            blue_green: fleet_proto::device::BlueGreenSupport::Supported,
        }
    }

    /// The next heartbeat, and whether it reports the bad release's errors.
    fn heartbeat(&mut self, config: &LoadConfig, rng: &mut impl rand::Rng) -> (Heartbeat, bool) {
        self.heartbeat_seq += 1;
        let version = self.active.as_ref().map(|a| a.version.clone());
        let bad = config.bad_type.as_ref() == Some(&self.spec.facts.device_type)
            && version.is_some()
            && config.bad_version == version;
        let error_rate: f32 = if bad { 0.30 } else { 0.01 } + rng.gen_range(-0.005..0.005);
        let hb = Heartbeat {
            device: self.spec.id.clone(),
            seq: self.heartbeat_seq,
            at: now(),
            uptime: self.started.elapsed(),
            active_version: version.clone(),
            rollout: self.last_outcome.as_ref().and_then(|o| o.rollout.clone()),
            system: SystemHealth {
                cpu_pct: rng.gen_range(5.0..25.0),
                memory_used_bytes: rng.gen_range(1u64 << 30..2u64 << 30),
                memory_total_bytes: 4 << 30,
                disk_free_bytes: 20 << 30,
                disk_total_bytes: 32 << 30,
                temperature_c: Some(rng.gen_range(40.0..60.0)),
            },
            app: AppHealth {
                status: match (&self.active, bad) {
                    (None, _) => AppStatus::NotInstalled,
                    (Some(_), true) => AppStatus::Degraded,
                    (Some(_), false) => AppStatus::Healthy,
                },
                version,
                error_rate: self.active.as_ref().map(|_| error_rate.max(0.0)),
                p95_ms: self.active.as_ref().map(|_| rng.gen_range(35.0..45.0)),
                restarts_in_window: 0,
                restarts_total: 0,
                probe_ok: None,
                requests: self.active.as_ref().map(|_| 50),
                failed: None,
            },
        };
        (hb, bad)
    }

    fn event(&mut self, desired: &Desired, version: &str, kind: EventKind) -> Event {
        self.event_seq += 1;
        Event {
            device: self.spec.id.clone(),
            seq: self.event_seq,
            at: now(),
            rollout: desired.rollout.clone(),
            sequence: desired.sequence,
            version: version.to_owned(),
            kind,
        }
    }

    /// Converges to a desired state; returns the events to publish, in order.
    fn converge(&mut self, desired: &Desired, config: &LoadConfig, stats: &Stats) -> Vec<Event> {
        self.interval = desired.report_interval.max(Duration::from_millis(200));
        if desired.sequence <= self.applied_sequence {
            return Vec::new();
        }
        let Some(signed) = &desired.release else {
            self.applied_sequence = desired.sequence;
            return Vec::new();
        };
        let digest = signed.digest();
        if self.active.as_ref().is_some_and(|a| a.digest == digest) {
            self.applied_sequence = desired.sequence;
            return Vec::new();
        }
        let admitted = match &config.key {
            Some(key) => admit(
                signed,
                &Trust {
                    keys: std::slice::from_ref(key),
                    now: now(),
                    skew: Duration::from_secs(300),
                    highest: self.highest.as_ref(),
                    device: &self.spec.id,
                    facts: &self.spec.facts,
                },
            ),
            None => signed
                .decode_unverified()
                .map_err(|detail| fleet_proto::Refusal::Malformed { detail }),
        };
        let release = match admitted {
            Ok(r) => r,
            Err(reason) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                self.applied_sequence = desired.sequence;
                let outcome = OutcomeKind::Refused(reason.clone());
                self.record(desired, "?", outcome);
                return vec![self.event(desired, "?", EventKind::Refused { reason })];
            }
        };
        if self
            .highest
            .as_ref()
            .is_none_or(|h| release.counter > h.counter)
        {
            self.highest = Some(Accepted {
                counter: release.counter,
                digest,
                rollback_to: release.rollback_to.clone(),
            });
        }
        let version = release.version.clone();
        let size = release.artifacts.values().next().map_or(0, |a| a.size);
        let mut events = vec![
            self.event(
                desired,
                &version,
                EventKind::DownloadStarted {
                    size,
                    resume_from: 0,
                },
            ),
            self.event(desired, &version, EventKind::DownloadFinished { size }),
            self.event(desired, &version, EventKind::Verified),
        ];
        let slot = self.active.as_ref().map_or(Slot::A, |a| a.slot.other());
        events.push(self.event(desired, &version, EventKind::Swapped { to: slot }));
        self.applied_sequence = desired.sequence;
        if self.spec.fails_installs {
            stats.rolled_back.fetch_add(1, Ordering::Relaxed);
            let reason = RollbackReason::CrashLoop {
                restarts: 3,
                window: Duration::from_secs(300),
            };
            let restored = self.active.as_ref().map(|a| a.version.clone());
            self.record(desired, &version, OutcomeKind::RolledBack(reason.clone()));
            events.push(self.event(
                desired,
                &version,
                EventKind::RolledBack { reason, restored },
            ));
        } else {
            stats.committed.fetch_add(1, Ordering::Relaxed);
            self.active = Some(Installed {
                name: release.name.clone(),
                version: version.clone(),
                counter: release.counter,
                digest,
                slot,
            });
            self.record(desired, &version, OutcomeKind::Committed);
            events.push(self.event(desired, &version, EventKind::Committed { slot }));
        }
        events
    }

    fn record(&mut self, desired: &Desired, version: &str, result: OutcomeKind) {
        self.last_outcome = Some(Outcome {
            rollout: desired.rollout.clone(),
            sequence: desired.sequence,
            version: version.to_owned(),
            result,
            at: now(),
        });
    }
}

/// Runs the simulated devices until `shutdown` turns true.
pub async fn run(
    config: LoadConfig,
    stats: Arc<Stats>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_entropy();
    let mut specs = Vec::new();
    for index in config.first..config.first + config.devices {
        let spec = spec(&config, index, &mut rng)?;
        if !spec.never_online {
            specs.push(spec);
        }
    }
    let mut tasks = Vec::new();
    for group in specs.chunks(config.per_connection.max(1)) {
        let (config, stats, shutdown) = (config.clone(), stats.clone(), shutdown.clone());
        let group = group.to_vec();
        // Spread connections and heartbeats over one interval, as a real fleet's are.
        let offset = config.heartbeat.mul_f64(rng.r#gen::<f64>());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            connection_loop(group, config, stats, shutdown).await;
        }));
    }
    for task in tasks {
        task.await?;
    }
    Ok(())
}

fn device(spec: Spec, config: &LoadConfig) -> Device {
    Device {
        interval: config.heartbeat,
        spec,
        active: None,
        highest: None,
        applied_sequence: 0,
        last_outcome: None,
        state_seq: 0,
        heartbeat_seq: 0,
        event_seq: 0,
        started: std::time::Instant::now(),
    }
}

/// Milliseconds since the Unix epoch, recorded once: the first time something happened.
fn first_time(cell: &AtomicU64) {
    let _ = cell.compare_exchange(0, now().0, Ordering::Relaxed, Ordering::Relaxed);
}

/// One MQTT connection carrying one device (or, with `per_connection` > 1, several: a load
/// beyond the per-process file limit; the broker then sees fewer connections than devices).
async fn connection_loop(
    specs: Vec<Spec>,
    config: Arc<LoadConfig>,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut devices: Vec<Device> = specs.into_iter().map(|s| device(s, &config)).collect();
    let Some(lead) = devices.first().map(|d| d.spec.id.clone()) else {
        return;
    };
    let by_topic: std::collections::HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (Topic::Desired(d.spec.id.clone()).to_string(), i))
        .collect();
    let mut due: Vec<tokio::time::Instant> = vec![tokio::time::Instant::now(); devices.len()];
    let mut next = 0usize;
    let mut first = true;
    while !*shutdown.borrow() {
        if !first {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        let mut options = MqttOptions::new(lead.as_str(), &config.host, config.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(
            fleet_proto::Kind::Desired.max_size() + 1024,
            fleet_proto::Kind::State.max_size() + 1024,
        );
        let offline = Online {
            device: lead.clone(),
            online: false,
            agent_version: devices[0].spec.facts.agent_version.clone(),
            at: now(),
        };
        options.set_last_will(LastWill::new(
            Topic::Online(lead.clone()).to_string(),
            encode(&offline),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut events) = AsyncClient::new(options, 64 + 4 * devices.len());
        let slice = |devices: &[Device]| {
            let fastest = devices
                .iter()
                .map(|d| d.interval)
                .min()
                .unwrap_or(config.heartbeat);
            (fastest / devices.len().max(1) as u32).max(Duration::from_millis(1))
        };
        let mut step = slice(&devices);
        let mut ticker = tokio::time::interval(step);
        let mut connected = false;
        let churn_after = if config.churn_per_hour > 0.0 {
            let mean = 3600.0 / config.churn_per_hour;
            Duration::from_secs_f64(-mean * (1.0 - rand::thread_rng().r#gen::<f64>()).ln())
        } else {
            Duration::MAX / 4
        };
        let churn = tokio::time::sleep(churn_after);
        tokio::pin!(churn);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    let _ = client.disconnect().await;
                    return;
                }
                _ = &mut churn => {
                    // Drop the connection abruptly: the broker publishes the last will.
                    break;
                }
                tick = ticker.tick(), if connected => {
                    let k = next % devices.len();
                    next = next.wrapping_add(1);
                    // Scheduled tick instants, with half a step of slack: a device is visited
                    // once per interval (`step` × devices, rounded down), and comparing the
                    // wake-up time instead made every other visit land just before `due`,
                    // sending at about 5/8 of the offered rate.
                    if tick + step / 2 >= due[k] {
                        due[k] = tick + devices[k].interval;
                        let (hb, bad) = devices[k].heartbeat(&config, &mut rand::thread_rng());
                        let topic = Topic::Heartbeat(devices[k].spec.id.clone()).to_string();
                        if client.try_publish(topic, QoS::AtMostOnce, false, encode(&hb)).is_ok() {
                            stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                            if bad {
                                first_time(&stats.first_bad_heartbeat_ms);
                            }
                        }
                    }
                }
                event = events.poll() => match event {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        stats.connected.fetch_add(devices.len() as u64, Ordering::Relaxed);
                        for d in devices.iter_mut() {
                            let id = d.spec.id.clone();
                            let _ = client.subscribe(Topic::Desired(id.clone()).to_string(), QoS::AtLeastOnce).await;
                            let online = Online { device: id.clone(), online: true, at: now(), ..offline.clone() };
                            let _ = client.publish(Topic::Online(id.clone()).to_string(), QoS::AtLeastOnce, true, encode(&online)).await;
                            let state = d.reported();
                            let _ = client.publish(Topic::State(id).to_string(), QoS::AtLeastOnce, true, encode(&state)).await;
                        }
                    }
                    Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                        let Some(&k) = by_topic.get(p.topic.as_str()) else { continue };
                        let Ok(desired) = decode::<Desired>(&p.payload) else { continue };
                        stats.desired.fetch_add(1, Ordering::Relaxed);
                        let d = &mut devices[k];
                        let on_bad = config.bad_version.is_some()
                            && d.active.as_ref().map(|a| &a.version) == config.bad_version.as_ref();
                        if on_bad && desired.release.as_ref().map(|r| r.digest()) != d.active.as_ref().map(|a| a.digest) {
                            first_time(&stats.first_rollback_desired_ms);
                        }
                        let before = d.interval;
                        tokio::time::sleep(config.install_delay).await;
                        let id = d.spec.id.clone();
                        for event in d.converge(&desired, &config, &stats) {
                            let _ = client.publish(Topic::Events(id.clone()).to_string(), QoS::AtLeastOnce, false, encode(&event)).await;
                        }
                        let state = d.reported();
                        let _ = client.publish(Topic::State(id).to_string(), QoS::AtLeastOnce, true, encode(&state)).await;
                        if d.interval != before {
                            step = slice(&devices);
                            ticker = tokio::time::interval(step);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        if connected {
                            stats.connected.fetch_sub(devices.len() as u64, Ordering::Relaxed);
                        }
                        connected = false;
                        // rumqttc reconnects at once on the next poll; back off with jitter.
                        let ms = rand::thread_rng().gen_range(500..2000);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                }
            }
        }
        if connected {
            stats
                .connected
                .fetch_sub(devices.len() as u64, Ordering::Relaxed);
        }
    }
}
