//! The driver: receive → translate to [`Input`] → [`step`] → persist the journal → execute the
//! actions. All I/O lives here; every policy decision lives in `machine` and `trial`.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fleet_proto::device::{
    AppHealth, AppStatus, BlueGreenSupport, Desired, DeviceFacts, Event, EventKind, Failure,
    Heartbeat, Online, Reported, Slot,
};
use fleet_proto::release::Arch;
use fleet_proto::{Topic, UnixMillis, decode, encode};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, error, info, warn};

use crate::config::{Config, RuntimeKind, SwitchKind};
use crate::fault;
use crate::health::{self, SystemProbe, with_port};
use crate::journal::{Journal, JournalError, Loaded};
use crate::link::{Link, LinkEvent, LinkOptions};
use crate::machine::{self, Action, Ctx, Input, Job, Phase, State};
use crate::notify::Notifier;
use crate::outbox::Outbox;
use crate::runtime::{self, AnyRuntime, AppSpec, ContainerSpec, Runtime as _};
use crate::slots::{self, Layout};
use crate::snapshot;
use crate::traffic;
use crate::trial::{HealthAnswer, Sample};

/// Why the agent stopped. Each maps to an exit code in the binary (`Exit`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Process-level hooks the binary provides; fleet-sim passes `Options::default()`.
#[derive(Debug, Default)]
pub struct Options {
    /// systemd notify socket: READY, watchdog pings from the main loop, STOPPING.
    pub notifier: Option<Notifier>,
}

/// Runs one agent until `shutdown` completes. No process-global state: many agents with
/// different roots and ports can run in one runtime.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    run_with(config, shutdown, Options::default()).await
}

pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()>,
    options: Options,
) -> Result<(), Error> {
    config.check().map_err(Error::Config)?;
    let span = tracing::info_span!("agent", device = %config.device.id);
    async move {
        let mut driver = Driver::new(config, options)?;
        driver.boot().await?;
        let result = driver.main_loop(shutdown).await;
        driver.runtime.stop().await;
        if let Some((_, mut second)) = driver.standby.take() {
            second.stop().await;
        }
        if let Some(n) = &driver.notifier {
            n.send("STOPPING=1");
        }
        result
    }
    .instrument(span)
    .await
}

/// Messages from worker tasks (download, install) back to the loop.
#[derive(Debug)]
enum Work {
    Input(Input),
    DownloadStarted { job: Box<Job>, resume_from: u64 },
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counters {
    reported: u64,
    heartbeat: u64,
}

struct Driver {
    cfg: Config,
    ctx: Ctx,
    layout: Layout,
    journal: Journal,
    state: State,
    runtime: AnyRuntime,
    /// Data snapshots under `paths.state/snapshots`.
    snapshots: snapshot::Store,
    outbox: Outbox,
    link: Link,
    counters: Counters,
    counters_path: PathBuf,
    work_tx: mpsc::Sender<Work>,
    work_rx: mpsc::Receiver<Work>,
    heartbeat_every: Duration,
    next_heartbeat: Instant,
    next_probe: Instant,
    system: SystemProbe,
    started: Instant,
    last_app: AppHealth,
    /// The app's request counter at the latest health reading, and at the latest heartbeat:
    /// a heartbeat reports the difference, the evidence behind its error rate.
    app_requests: Option<u64>,
    reported_requests: Option<u64>,
    app_failed: Option<u64>,
    reported_failed: Option<u64>,
    /// Frames on the desired topic that did not decode.
    decode_errors: u64,
    notifier: Option<Notifier>,
    topic_events: String,
    /// True while the journal is resolved at start: an app already running the journal's
    /// active release may then be adopted instead of restarted (`Runtime::adopt`).
    booting: bool,
    /// Blue-green: the second instance (the new version beside the running one) and its slot.
    standby: Option<(Slot, runtime::Process)>,
    /// Blue-green with `blue_green.switch = "forwarder"`: the service port's forwarder.
    forwarder: Option<traffic::Forwarder>,
    /// When the latest trial sample was taken (wall clock and monotonic): a switch back
    /// logs how long after the failed check the traffic was on the old version again.
    last_sample: Option<(UnixMillis, Instant)>,
}

/// Which instance a sample looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Instance {
    /// The app (`self.runtime`), running the release the `active` link points to.
    Primary,
    /// Blue-green's second instance (`Driver::standby`).
    Second,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("device", &self.ctx.device)
            .finish()
    }
}

fn now() -> UnixMillis {
    UnixMillis::from_system(SystemTime::now())
}

/// Why this device refuses every blue-green release, whatever the release (`None`: it can run
/// one): its runtime, no traffic switch, or data directories in its own config. The core
/// refuses with it (`Ctx::blue_green_refusal`) and every reported state carries it
/// (`Reported::blue_green`), so the coordinator's checklist names the device at plan time.
fn blue_green_refusal(
    runtime: RuntimeKind,
    switch: SwitchKind,
    data_dirs: &[PathBuf],
) -> Option<String> {
    match (runtime, switch) {
        (RuntimeKind::Process, SwitchKind::Off) => Some(
            "blue-green needs a traffic switch on this device: set blue_green.switch to \"forwarder\" or \"command\" in the agent's config".into(),
        ),
        // The same words as the core's refusal of a release whose own data directories
        // cannot be snapshotted: with them in the config, every blue-green release is.
        (RuntimeKind::Process, _) if !data_dirs.is_empty() => Some(format!(
            "blue-green runs the new version beside the old one on the same data, so the data directories ({}) cannot be snapshotted for a rollback; ship this release as canary-rolling",
            data_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        (RuntimeKind::Process, _) => None,
        (other, _) => Some(format!(
            "blue-green needs the process runtime on this device (app.runtime is \"{}\"); ship this release as canary-rolling",
            other.as_str()
        )),
    }
}

impl Driver {
    fn new(cfg: Config, options: Options) -> Result<Driver, Error> {
        let layout = Layout::new(&cfg.paths.root);
        layout
            .prepare()
            .map_err(io(format!("cannot prepare {}", cfg.paths.root.display())))?;
        std::fs::create_dir_all(&cfg.paths.state)
            .map_err(io(format!("cannot create {}", cfg.paths.state.display())))?;
        let memory_total = std::fs::read_to_string("/proc/meminfo")
            .map(|t| health::parse_meminfo(&t).0)
            .unwrap_or(0);
        let disk_total = crate::fsutil::disk_space(&cfg.paths.root)
            .map(|d| d.1)
            .unwrap_or(0);
        let arch = Arch::current().ok_or_else(|| {
            Error::Config(format!(
                "architecture {} is not one fleet knows",
                std::env::consts::ARCH
            ))
        })?;
        let facts = DeviceFacts {
            device_type: cfg.device.device_type.clone(),
            arch,
            region: cfg.device.region.clone(),
            tags: cfg.device.tags.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            runtime: cfg.app.runtime.as_str().into(),
            memory_total_bytes: memory_total,
            disk_total_bytes: disk_total,
        };
        let ctx = Ctx {
            keys: cfg.trust.keys.clone(),
            skew: cfg.trust.clock_skew,
            device: cfg.device.id.clone(),
            facts,
            trial_attempts: cfg.trial.attempts,
            failures_allowed: cfg.trial.failures_allowed.max(1),
            restore_timeout: cfg.trial.restore_timeout,
            data_dirs: cfg
                .app
                .data_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect(),
            blue_green_refusal: blue_green_refusal(
                cfg.app.runtime,
                cfg.blue_green.switch,
                &cfg.app.data_dirs,
            ),
        };
        let runtime = match cfg.app.runtime {
            RuntimeKind::Process => {
                AnyRuntime::Process(runtime::Process::new(runtime::ProcessOptions {
                    stop_grace: cfg.app.stop_grace,
                    backoff_min: cfg.app.restart_backoff_min,
                    backoff_max: cfg.app.restart_backoff_max,
                    backoff_reset: cfg.app.restart_reset,
                    log_file: cfg.app.log_file.clone(),
                }))
            }
            RuntimeKind::Systemd => AnyRuntime::Systemd(runtime::Systemd::new(
                cfg.app.systemd_unit.clone(),
                cfg.paths.root.join("app-exec"),
            )),
            RuntimeKind::Container => AnyRuntime::Container(runtime::Container::new(
                crate::docker::socket_path(&cfg.app.docker_host)
                    .ok_or_else(|| Error::Config("app.docker_host: not unix:///PATH".into()))?,
                cfg.app.stop_grace,
            )),
        };
        let outbox = Outbox::open(&cfg.paths.state.join("outbox"), cfg.reports.outbox_max)
            .map_err(io("cannot open the event outbox"))?;
        let id = ctx.device.clone();
        let will = Online {
            device: id.clone(),
            online: false,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            at: now(),
        };
        let (mqtt, tls) = mqtt_security(&cfg.mqtt)?;
        let link = Link::new(LinkOptions {
            client_id: id.to_string(),
            mqtt,
            will_topic: Topic::Online(id.clone()).to_string(),
            will_payload: encode(&will),
            tls,
        });
        let counters_path = cfg.paths.state.join("counters");
        let counters = std::fs::read(&counters_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (work_tx, work_rx) = mpsc::channel(64);
        let heartbeat_every = cfg.reports.heartbeat_interval;
        Ok(Driver {
            journal: Journal::new(&cfg.paths.state),
            snapshots: snapshot::Store::new(&cfg.paths.state),
            topic_events: Topic::Events(id).to_string(),
            cfg,
            ctx,
            layout,
            state: State::fresh(),
            runtime,
            outbox,
            link,
            counters,
            counters_path,
            work_tx,
            work_rx,
            heartbeat_every,
            next_heartbeat: Instant::now() + heartbeat_every,
            next_probe: Instant::now(),
            system: SystemProbe::default(),
            started: Instant::now(),
            last_app: AppHealth {
                status: AppStatus::NotInstalled,
                version: None,
                error_rate: None,
                p95_ms: None,
                restarts_in_window: 0,
                restarts_total: 0,
                probe_ok: None,
                requests: None,
                failed: None,
            },
            app_requests: None,
            reported_requests: None,
            app_failed: None,
            reported_failed: None,
            decode_errors: 0,
            notifier: options.notifier,
            booting: false,
            standby: None,
            forwarder: None,
            last_sample: None,
        })
    }

    /// Reads the journal first and resolves it (see `machine::resolve`).
    async fn boot(&mut self) -> Result<(), Error> {
        self.state = match self.journal.load()? {
            Loaded::Fresh => State::fresh(),
            Loaded::Current(s) => s,
            Loaded::Previous(s, why) => {
                warn!(journal = %self.journal.path().display(), "journal unreadable ({why}); using the previous copy");
                s
            }
        };
        if let Some(d) = self.state.report_interval {
            self.heartbeat_every = d;
        }
        if let Some(p) = &self.state.pinned {
            let pinned = self.state.pinned(&self.ctx);
            if pinned.keys != self.ctx.keys {
                let ids: Vec<String> = pinned
                    .keys
                    .iter()
                    .map(|k| fleet_proto::release::key_id(k).to_string())
                    .collect();
                warn!(
                    epoch = p.epoch,
                    "trust.keys in the config are not used: a signed key rotation (epoch {}) pins [{}]; put them in the config, or re-provision the device to start from the config again",
                    p.epoch,
                    ids.join(", ")
                );
            }
        }
        let link = self
            .layout
            .read_link()
            .map_err(io("cannot read the active link"))?;
        if self.cfg.blue_green.switch == SwitchKind::Forwarder {
            let addr = std::net::SocketAddr::new(self.cfg.blue_green.bind, self.cfg.app.port);
            let f = traffic::Forwarder::bind(addr).await.map_err(io(format!(
                "cannot listen on the service port {addr} (blue_green.switch = \"forwarder\", app.port); free the port or change app.port"
            )))?;
            info!(%addr, "forwarding the service port to the app");
            self.forwarder = Some(f);
        }
        info!(phase = ?self.state.phase.wire(), ?link, "resolving the journal");
        self.booting = true;
        let resolved = self.apply(Input::Boot { link }).await;
        self.booting = false;
        resolved?;
        if let Some(n) = &self.notifier {
            n.send("READY=1");
        }
        Ok(())
    }

    async fn main_loop(&mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        tokio::pin!(shutdown);
        let watchdog_every = self
            .notifier
            .as_ref()
            .and_then(|n| n.watchdog_every)
            .unwrap_or(Duration::from_secs(3600));
        let mut watchdog = tokio::time::interval(watchdog_every);
        loop {
            let probing = matches!(
                self.state.phase,
                Phase::Trial { .. }
                    | Phase::RollingBack { .. }
                    | Phase::Warming { .. }
                    | Phase::Proving { .. }
            );
            tokio::select! {
                () = &mut shutdown => {
                    info!("shutting down");
                    return Ok(());
                }
                ev = self.link.next() => self.on_link(ev).await?,
                Some(work) = self.work_rx.recv() => match work {
                    Work::Input(input) => self.apply(input).await?,
                    Work::DownloadStarted { job, resume_from } => {
                        let size = job.release.artifacts.get(&self.ctx.facts.arch).map(|a| a.size).unwrap_or(0);
                        self.emit(job.sequence, job.rollout.clone(), job.release.version.clone(),
                            EventKind::DownloadStarted { size, resume_from })?;
                    }
                },
                _ = tokio::time::sleep_until(self.next_probe), if probing => {
                    self.probe_tick().await?;
                }
                _ = tokio::time::sleep_until(self.next_heartbeat) => {
                    self.heartbeat().await;
                    self.next_heartbeat = Instant::now() + self.heartbeat_every;
                }
                _ = watchdog.tick() => {
                    if let Some(n) = &self.notifier { n.send("WATCHDOG=1"); }
                }
            }
        }
    }

    /// step → persist → execute, until no follow-up input remains.
    async fn apply(&mut self, input: Input) -> Result<(), Error> {
        let mut queue = VecDeque::from([input]);
        while let Some(input) = queue.pop_front() {
            let what = input_name(&input);
            let before = self.state.clone();
            let (next, actions) = machine::step(&self.ctx, before.clone(), input, now());
            if next != before {
                if next.phase.wire() != before.phase.wire() {
                    let job = next.phase.job().or(before.phase.job());
                    info!(
                        from = ?before.phase.wire(),
                        to = ?next.phase.wire(),
                        event = what,
                        rollout = job.and_then(|j| j.rollout.as_ref()).map(|r| r.to_string()).unwrap_or_default(),
                        version = job.map(|j| j.release.version.as_str()).unwrap_or(""),
                        "update phase changed"
                    );
                }
                log_warm(&before, &next, what);
                if matches!(before.phase, Phase::Trial { .. }) && matches!(next.phase, Phase::Idle)
                {
                    fault::point("commit-before-journal");
                }
                // Persist before acting: the journal names the step about to happen.
                self.journal.store(&next)?;
            }
            self.state = next;
            for action in actions {
                self.execute(action, &mut queue).await?;
            }
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action, queue: &mut VecDeque<Input>) -> Result<(), Error> {
        match action {
            Action::Emit {
                sequence,
                rollout,
                version,
                kind,
            } => self.emit(sequence, rollout, version, kind)?,
            Action::Report => self.report(),
            Action::Download { job } => self.start_download(*job),
            Action::Install { job, slot } => self.start_install(*job, slot),
            Action::DiscardStaging => {
                if let Err(e) = self.layout.discard_staging() {
                    warn!("cannot clean staging: {e}");
                }
            }
            Action::WipeSlot { slot } => {
                self.layout
                    .wipe(slot)
                    .map_err(io(format!("cannot wipe {slot}")))?;
            }
            Action::Swap { to } => {
                self.layout
                    .swap(to)
                    .map_err(io("cannot swap the active link"))?;
                info!(slot = ?to, "active link swapped");
                match &self.state.phase {
                    Phase::Swapping { job, slot, .. } if to == Some(*slot) => {
                        queue.push_back(Input::Swapped {
                            sequence: job.sequence,
                        });
                    }
                    Phase::RollingBack { .. } => fault::point("rollback-after-swap"),
                    _ => {}
                }
            }
            Action::StartApp { slot, rollback } => {
                self.start_app(slot, rollback).await;
                if matches!(self.state.phase, Phase::Trial { .. }) {
                    fault::point("trial-started");
                }
                self.next_probe = Instant::now() + self.probe_interval();
            }
            Action::StopApp => {
                // After a restart the runtime may not know the container yet.
                let release = self
                    .state
                    .phase
                    .job()
                    .map(|j| j.release.clone())
                    .or_else(|| self.state.running().map(|c| c.release.clone()));
                if let (AnyRuntime::Container(c), Some(r)) = (&mut self.runtime, release)
                    && let Some(spec) = &r.container
                {
                    c.track(&spec.name);
                }
                self.runtime.stop().await;
            }
            Action::Snapshot { sequence, dirs } => self.snapshot(sequence, dirs).await,
            Action::Restore { sequence } => {
                let store = self.snapshots.clone();
                let tx = self.work_tx.clone();
                info!(sequence, "restoring the data snapshot");
                tokio::task::spawn_blocking(move || {
                    let result = store.restore(sequence);
                    let _ = tx.blocking_send(Work::Input(Input::Restored { sequence, result }));
                });
            }
            Action::DropSnapshots => {
                if let Err(e) = self.snapshots.drop_all() {
                    warn!("cannot remove the data snapshots: {e}");
                }
            }
            Action::Redeliver(desired) => {
                queue.push_back(Input::Desired {
                    desired: *desired,
                    disk_free: self.disk_free(),
                });
            }
            Action::SetReportInterval(d) => {
                self.heartbeat_every = d;
                let sooner = Instant::now() + d;
                if sooner < self.next_heartbeat {
                    self.next_heartbeat = sooner;
                }
            }
            Action::StartStandby { slot } => {
                self.start_second(slot).await;
                fault::point("bluegreen-warming");
                self.next_probe = Instant::now() + self.probe_interval();
            }
            Action::StopStandby { drain } => {
                if let Some((slot, mut second)) = self.standby.take() {
                    if drain && let Some(f) = &self.forwarder {
                        let port = self.instance_port(slot);
                        let open = f.drain(port, self.cfg.blue_green.drain_timeout).await;
                        if open > 0 {
                            warn!(slot = %slot, open, "stopping the new version with connections still open");
                        }
                    }
                    fault::point("bluegreen-stop-standby");
                    info!(slot = %slot, "stopping the new version's instance");
                    second.stop().await;
                }
            }
            Action::SwitchTraffic { sequence, to } => {
                if matches!(
                    self.state.phase,
                    Phase::SwitchingBack { .. } | Phase::Returning { .. }
                ) {
                    fault::point("bluegreen-before-switch-back");
                }
                let result = self.switch_traffic(to).await;
                match (&result, &self.state.phase, self.last_sample) {
                    (Ok(()), Phase::Returning { .. }, _) => warn!(
                        slot = %to,
                        port = self.instance_port(to),
                        "traffic switched back to the previous version, which never stopped"
                    ),
                    (Ok(()), Phase::SwitchingBack { .. }, Some((at, taken))) => warn!(
                        slot = %to,
                        port = self.instance_port(to),
                        failed_check_at = at.0,
                        after_us = taken.elapsed().as_micros() as u64,
                        "traffic switched back to the previous version"
                    ),
                    (Ok(()), ..) => {
                        info!(slot = %to, port = self.instance_port(to), "traffic switched")
                    }
                    (Err(e), ..) => warn!(slot = %to, "traffic switch failed: {e}"),
                }
                match self.state.phase {
                    Phase::Switching { .. } => fault::point("bluegreen-switched"),
                    Phase::SwitchingBack { .. } | Phase::Returning { .. } => {
                        fault::point("bluegreen-switched-back")
                    }
                    _ => {}
                }
                queue.push_back(Input::Switched { sequence, result });
            }
            Action::Promote { slot } => self.promote(slot).await,
        }
        Ok(())
    }

    /// The port the app running from `slot` listens on: its slot's port when blue-green
    /// switching is configured, else `app.port`.
    fn instance_port(&self, slot: Slot) -> u16 {
        match self.cfg.blue_green.switch {
            SwitchKind::Off => self.cfg.app.port,
            SwitchKind::Forwarder | SwitchKind::Command => self.cfg.blue_green.port(slot),
        }
    }

    /// Sends new connections to the instance of `to`.
    async fn switch_traffic(&mut self, to: Slot) -> Result<(), String> {
        let port = self.instance_port(to);
        match self.cfg.blue_green.switch {
            SwitchKind::Off => Err(
                "no traffic switch is configured on this device (blue_green.switch = \"off\")"
                    .into(),
            ),
            SwitchKind::Forwarder => match &self.forwarder {
                Some(f) => {
                    f.set_target(port);
                    Ok(())
                }
                None => Err("the forwarder is not listening".into()),
            },
            SwitchKind::Command => {
                let bg = &self.cfg.blue_green;
                traffic::run_command(&bg.command, bg.command_timeout, to, port, self.cfg.app.port)
                    .await
            }
        }
    }

    /// Blue-green: starts `slot`'s release as a second instance, from its slot directory on
    /// its own port, beside the app.
    async fn start_second(&mut self, slot: Slot) {
        if let Some((_, mut old)) = self.standby.take() {
            old.stop().await;
        }
        let Some(mut spec) = self.app_spec(slot, false) else {
            error!(slot = %slot, "asked to start an empty slot beside the app");
            return;
        };
        // Design: not through the `active` link, which stays on the version that serves
        // until the traffic moves.
        let dir = self.layout.slot_dir(slot);
        if let Some(release) = self.state.slot(slot).map(|c| &c.release) {
            spec.program = dir.join(&release.run.entrypoint);
        }
        spec.dir = dir;
        let mut second = runtime::Process::new(self.process_options());
        info!(slot = %slot, port = self.instance_port(slot), "starting the new version beside the app");
        if let Err(e) = second.start(spec).await {
            warn!(slot = %slot, "{e}");
        }
        self.standby = Some((slot, second));
    }

    /// Blue-green commit: the old instance stops once the forwarder's connections to it have
    /// finished; the second instance becomes the app.
    async fn promote(&mut self, slot: Slot) {
        let Some((second_slot, second)) = self.standby.take() else {
            warn!(slot = %slot, "commit without a second instance; starting the app");
            self.start_app(slot, false).await;
            return;
        };
        if second_slot != slot {
            warn!(slot = %slot, "the second instance runs {second_slot}, not {slot}");
        }
        let old_port = self.instance_port(slot.other());
        if let Some(f) = &self.forwarder {
            let open = f.drain(old_port, self.cfg.blue_green.drain_timeout).await;
            if open > 0 {
                warn!(open, "stopping the old version with connections still open");
            }
        }
        fault::point("bluegreen-promote");
        self.runtime.stop().await;
        self.runtime = AnyRuntime::Process(second);
        info!(slot = %slot, "the old version stopped; the new one is the app");
    }

    fn process_options(&self) -> runtime::ProcessOptions {
        runtime::ProcessOptions {
            stop_grace: self.cfg.app.stop_grace,
            backoff_min: self.cfg.app.restart_backoff_min,
            backoff_max: self.cfg.app.restart_backoff_max,
            backoff_reset: self.cfg.app.restart_reset,
            log_file: self.cfg.app.log_file.clone(),
        }
    }

    fn disk_free(&self) -> u64 {
        crate::fsutil::disk_space(&self.cfg.paths.root)
            .map(|d| d.0)
            .unwrap_or(0)
    }

    fn app_env(&self, release: &fleet_proto::Release, port: u16) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = release
            .run
            .env
            .iter()
            .map(|(k, v)| (k.clone(), with_port(v, port)))
            .collect();
        env.push(("FLEET_DEVICE_ID".into(), self.ctx.device.to_string()));
        env.push((
            "FLEET_DEVICE_TYPE".into(),
            self.cfg.device.device_type.clone(),
        ));
        env.push(("FLEET_DEVICE_REGION".into(), self.cfg.device.region.clone()));
        env.push(("FLEET_APP_PORT".into(), port.to_string()));
        env
    }

    /// What runs for the release in `slot`: through the `active` link for the process and
    /// systemd runtimes; for a container release, the image id recorded at install.
    fn app_spec(&self, slot: Slot, rollback: bool) -> Option<AppSpec> {
        let release = &self.state.slot(slot)?.release;
        let active = self.layout.active();
        let port = self.instance_port(slot);
        let args: Vec<String> = release
            .run
            .args
            .iter()
            .map(|a| with_port(a, port))
            .collect();
        let env = self.app_env(release, port);
        let container = release.container.as_ref().map(|c| ContainerSpec {
            name: c.name.clone(),
            image: std::fs::read_to_string(self.layout.slot_dir(slot).join(IMAGE_ID_FILE))
                .map(|t| t.trim().to_owned())
                .unwrap_or_else(|_| c.image.clone()),
            rollback,
            network: c.network.clone(),
            ports: c
                .ports
                .iter()
                .filter_map(|p| fleet_proto::release::parse_port(p).ok())
                .map(|mut p| {
                    p.host_port = with_port(&p.host_port, self.cfg.app.port);
                    p
                })
                .collect(),
            volumes: c.volumes.clone(),
            devices: c.devices.clone(),
            restart: c.restart,
            entrypoint: (!release.run.entrypoint.is_empty())
                .then(|| release.run.entrypoint.clone()),
            args: args.clone(),
            env: env.clone(),
        });
        Some(AppSpec {
            program: active.join(&release.run.entrypoint),
            args,
            env,
            dir: active,
            container,
        })
    }

    /// Before the swap: keep the rollback image, stop the app if there is data to snapshot,
    /// then archive the data on a blocking thread, which answers `Input::Snapshotted`.
    async fn snapshot(&mut self, sequence: u64, dirs: Vec<String>) {
        let previous = match &self.state.phase {
            Phase::Snapshotting { previous, .. } => *previous,
            _ => None,
        };
        if let Some(spec) = previous.and_then(|p| self.app_spec(p, false))
            && let Some(c) = &spec.container
        {
            if let AnyRuntime::Container(rt) = &mut self.runtime {
                rt.track(&c.name);
            }
            if let Err(e) = self.runtime.keep_for_rollback(&spec).await {
                let _ = self.work_tx.try_send(Work::Input(Input::Snapshotted {
                    sequence,
                    result: Err(format!("cannot keep the rollback image: {e}")),
                }));
                return;
            }
        }
        if dirs.is_empty() {
            let _ = self.work_tx.try_send(Work::Input(Input::Snapshotted {
                sequence,
                result: Ok(()),
            }));
            return;
        }
        // Design: the app is stopped first so the snapshot is consistent; the swap restarts it.
        self.runtime.stop().await;
        info!(sequence, dirs = ?dirs, "taking the data snapshot");
        let store = self.snapshots.clone();
        let tx = self.work_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = store.take(sequence, &dirs);
            let _ = tx.blocking_send(Work::Input(Input::Snapshotted { sequence, result }));
        });
    }

    async fn start_app(&mut self, slot: Slot, rollback: bool) {
        let Some(spec) = self.app_spec(slot, rollback) else {
            error!(slot = %slot, "asked to start an empty slot");
            return;
        };
        let release = self
            .state
            .slot(slot)
            .map(|c| c.release.clone())
            .expect("app_spec found the slot");
        // Design: an agent restart (watchdog, crash, upgrade) is not a reason to restart an app
        // that outlived it and runs the committed release; only the systemd and container
        // runtimes can have one, and they check what runs before saying yes.
        if self.booting
            && matches!(self.state.phase, Phase::Idle)
            && self.runtime.adopt(&spec).await
        {
            info!(slot = %slot, version = %release.version, "the app already runs this release: left running");
            return;
        }
        info!(slot = %slot, version = %release.version, "starting the app");
        if let Err(e) = self.runtime.start(spec).await {
            warn!(slot = %slot, version = %release.version, "{e}");
        }
        // Design: outside a blue-green switch the service serves whatever the app is: starting
        // it (at boot, in an ordinary trial, in a rollback) points the traffic at it.
        if self.cfg.blue_green.switch != SwitchKind::Off
            && let Err(e) = self.switch_traffic(slot).await
        {
            warn!(slot = %slot, "cannot point the traffic at the app: {e}");
        }
    }

    fn probe_interval(&self) -> Duration {
        self.state
            .phase
            .job()
            .map(|j| j.release.trial.probe_interval)
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(50))
    }

    fn start_download(&mut self, job: Job) {
        let Some(artifact) = job.release.artifacts.get(&self.ctx.facts.arch).cloned() else {
            let _ = self.work_tx.try_send(Work::Input(Input::Downloaded {
                sequence: job.sequence,
                result: Err(Failure::Download {
                    detail: "no artifact for this architecture".into(),
                }),
            }));
            return;
        };
        let spec = crate::fetch::Spec {
            url: artifact.url,
            sha256: artifact.sha256,
            size: artifact.size,
            dest: self.layout.staged(&artifact.sha256),
        };
        let cfg = self.cfg.fetch.clone();
        let tx = self.work_tx.clone();
        info!(version = %job.release.version, url = %spec.url, "downloading");
        tokio::task::spawn_blocking(move || {
            let sequence = job.sequence;
            let job_box = Box::new(job);
            let result = crate::fetch::fetch(&spec, &cfg, |resume_from| {
                let _ = tx.blocking_send(Work::DownloadStarted {
                    job: job_box.clone(),
                    resume_from,
                });
            });
            let _ = tx.blocking_send(Work::Input(Input::Downloaded { sequence, result }));
        });
    }

    fn start_install(&mut self, job: Job, slot: Slot) {
        let layout = self.layout.clone();
        let tx = self.work_tx.clone();
        let timeout = self.cfg.trial.hook_timeout;
        let env = self.app_env(&job.release, self.instance_port(slot));
        let engine = match self.cfg.app.runtime {
            RuntimeKind::Container => {
                crate::docker::socket_path(&self.cfg.app.docker_host).map(|s| {
                    Engine::Docker(
                        crate::docker::Docker::new(s),
                        tokio::runtime::Handle::current(),
                    )
                })
            }
            other => Some(Engine::None(other)),
        };
        info!(version = %job.release.version, slot = %slot, "installing");
        tokio::task::spawn_blocking(move || {
            let result = install(&layout, &job, slot, timeout, &env, engine.as_ref());
            if result.is_ok() {
                fault::point("install-done");
            }
            let _ = tx.blocking_send(Work::Input(Input::Installed {
                sequence: job.sequence,
                result,
            }));
        });
    }

    fn emit(
        &mut self,
        sequence: u64,
        rollout: Option<fleet_proto::RolloutId>,
        version: String,
        kind: EventKind,
    ) -> Result<(), Error> {
        info!(rollout = rollout.as_ref().map(|r| r.to_string()).unwrap_or_default(), version = %version, event = ?kind, "event");
        let device = self.ctx.device.clone();
        let at = now();
        self.outbox
            .append(|seq| {
                encode(&Event {
                    device,
                    seq,
                    at,
                    rollout,
                    sequence,
                    version,
                    kind,
                })
            })
            .map_err(io("cannot write the event outbox"))?;
        self.link
            .flush_events(&self.topic_events, self.outbox.pending());
        Ok(())
    }

    fn save_counters(&self) {
        if let Ok(bytes) = serde_json::to_vec(&self.counters)
            && let Err(e) = crate::fsutil::write_replace(&self.counters_path, &bytes)
        {
            debug!("cannot save counters: {e}");
        }
    }

    fn reported(&mut self) -> Reported {
        self.counters.reported += 1;
        self.save_counters();
        let running = self.state.link_target();
        let standby = running.map(Slot::other).unwrap_or(Slot::B);
        Reported {
            device: self.ctx.device.clone(),
            seq: self.counters.reported,
            facts: self.ctx.facts.clone(),
            active: running
                .and_then(|s| self.state.slot(s))
                .map(|c| c.installed.clone()),
            standby: self.state.slot(standby).map(|c| c.installed.clone()),
            phase: self.state.phase.wire(),
            applied_sequence: self.state.applied_sequence,
            last_outcome: self.state.last_outcome.clone(),
            highest_counter: self.state.highest.as_ref().map(|h| h.counter).unwrap_or(0),
            at: now(),
            blue_green: match &self.ctx.blue_green_refusal {
                None => BlueGreenSupport::Supported,
                Some(why) => BlueGreenSupport::Unsupported { why: why.clone() },
            },
        }
    }

    fn report(&mut self) {
        if !self.link.is_connected() {
            // Published on the next ConnAck.
            return;
        }
        let r = self.reported();
        self.link.publish_retained(
            Topic::State(self.ctx.device.clone()).to_string(),
            encode(&r),
        );
    }

    async fn on_link(&mut self, ev: LinkEvent) -> Result<(), Error> {
        match ev {
            LinkEvent::Connected => {
                info!("connected to the broker");
                let id = self.ctx.device.clone();
                self.link.subscribe(Topic::Desired(id.clone()).to_string());
                self.link.subscribe(Topic::Trust.to_string());
                let online = Online {
                    device: id.clone(),
                    online: true,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    at: now(),
                };
                self.link
                    .publish_retained(Topic::Online(id).to_string(), encode(&online));
                self.report();
                self.link
                    .flush_events(&self.topic_events, self.outbox.pending());
            }
            LinkEvent::Disconnected(why) => warn!("disconnected from the broker: {why}"),
            LinkEvent::Delivered(seq) => {
                self.outbox
                    .delivered(seq)
                    .map_err(io("cannot update the event outbox"))?;
                self.link
                    .flush_events(&self.topic_events, self.outbox.pending());
            }
            LinkEvent::Message { topic, payload } => self.on_message(topic, payload).await?,
        }
        Ok(())
    }

    async fn on_message(&mut self, topic: String, payload: Vec<u8>) -> Result<(), Error> {
        if topic == Topic::Trust.to_string() && !payload.is_empty() {
            // Size-checked before decoding, like every frame (`Kind::Trust.max_size()`).
            return match decode::<fleet_proto::trust::TrustChain>(&payload) {
                Ok(chain) => self.apply(Input::Trust { chain }).await,
                Err(e) => {
                    self.decode_errors += 1;
                    warn!(
                        topic,
                        count = self.decode_errors,
                        "dropping a frame: {}",
                        e.on(&topic)
                    );
                    Ok(())
                }
            };
        }
        let own = Topic::Desired(self.ctx.device.clone()).to_string();
        if topic != own {
            debug!(
                topic,
                "ignoring a message on a topic the agent did not ask for"
            );
            return Ok(());
        }
        if payload.is_empty() {
            // The coordinator cleared its retained desired state: nothing to do.
            return Ok(());
        }
        match decode::<Desired>(&payload) {
            Ok(desired) => {
                debug!(sequence = desired.sequence, "desired state");
                let disk_free = self.disk_free();
                self.apply(Input::Desired { desired, disk_free }).await
            }
            Err(e) => {
                self.decode_errors += 1;
                warn!(
                    topic,
                    count = self.decode_errors,
                    "dropping a frame: {}",
                    e.on(&topic)
                );
                Ok(())
            }
        }
    }

    /// The release whose health the probes check now.
    fn probed_release(&self) -> Option<fleet_proto::Release> {
        match &self.state.phase {
            Phase::Trial { job, .. } | Phase::Warming { job, .. } | Phase::Proving { job, .. } => {
                Some(job.release.clone())
            }
            Phase::RollingBack { to, .. } => to
                .and_then(|t| self.state.slot(t))
                .map(|c| c.release.clone()),
            _ => self.state.running().map(|c| c.release.clone()),
        }
    }

    /// Which instance the probes check now: blue-green's second one while it warms up and
    /// proves itself, else the app.
    fn probed_instance(&self) -> Instance {
        match self.state.phase {
            Phase::Warming { .. } | Phase::Proving { .. } => Instance::Second,
            _ => Instance::Primary,
        }
    }

    /// Which instance has the traffic: blue-green's second one under its trial (`Proving`)
    /// and after a commit that keeps the old one warm (`State::warm`), else the app.
    fn serving_instance(&self) -> Instance {
        match self.state.phase {
            Phase::Proving { .. } => Instance::Second,
            Phase::Idle if self.state.warm.is_some() => Instance::Second,
            _ => Instance::Primary,
        }
    }

    /// Samples an instance. In a trial the release's own window and timeout apply; outside one
    /// (heartbeats) the agent's `app.crash_loop_window` and `reports.health_timeout`. Only a
    /// sample of the instance that has the traffic becomes the heartbeat's app health.
    async fn sample(
        &mut self,
        release: &fleet_proto::Release,
        on_trial: bool,
        instance: Instance,
    ) -> Sample {
        let (window, timeout) = if on_trial {
            (release.thresholds.crash_loop_window, release.health.timeout)
        } else {
            (
                self.cfg.app.crash_loop_window,
                self.cfg.reports.health_timeout,
            )
        };
        let serving = instance == self.serving_instance();
        let (st, port, dir) = match instance {
            Instance::Primary => (
                self.runtime.status(window).await,
                self.state
                    .link_target()
                    .map(|s| self.instance_port(s))
                    .unwrap_or(self.cfg.app.port),
                self.layout.active(),
            ),
            Instance::Second => match &mut self.standby {
                Some((slot, second)) => {
                    let slot = *slot;
                    let st = second.status(window).await;
                    (st, self.instance_port(slot), self.layout.slot_dir(slot))
                }
                // Gone with a restart that the journal resolution has not replaced yet: as if
                // it had not started.
                None => (
                    runtime::Status::default(),
                    self.cfg.app.port,
                    self.layout.active(),
                ),
            },
        };
        let (health, error_rate, p95) = if st.running {
            let endpoint = with_port(&release.health.endpoint, port);
            let reading = health::probe_health(&endpoint, timeout).await;
            if serving {
                self.app_requests = reading.requests_total.or(self.app_requests);
                self.app_failed = reading.failed_total.or(self.app_failed);
            }
            (Some(reading.answer), reading.error_rate, reading.p95_ms)
        } else {
            (None, None, None)
        };
        let healthy = matches!(
            &health,
            Some(HealthAnswer::Answered {
                status: AppStatus::Healthy,
                ..
            })
        );
        let probe = match (&release.probe, healthy) {
            (Some(p), true) => {
                Some(health::functional_probe(p, &dir, port, &self.app_env(release, port)).await)
            }
            _ => None,
        };
        let sample = Sample {
            running: st.running,
            exits: st.exits,
            last_exit_code: st.last_exit_code,
            restarts_in_window: st.restarts_in_window,
            health: health.clone(),
            probe: probe.clone(),
        };
        if !serving {
            return sample;
        }
        self.last_app = AppHealth {
            status: match &health {
                Some(HealthAnswer::Answered { status, .. }) => *status,
                Some(HealthAnswer::NoAnswer) => AppStatus::Unreachable,
                None => AppStatus::Stopped,
            },
            version: match &health {
                Some(HealthAnswer::Answered { version, .. }) => Some(version.clone()),
                _ => None,
            },
            error_rate,
            p95_ms: p95,
            restarts_in_window: st.restarts_in_window,
            restarts_total: st.restarts_total,
            probe_ok: probe.as_ref().map(|r| r.is_ok()),
            requests: None,
            failed: None,
        };
        sample
    }

    async fn probe_tick(&mut self) -> Result<(), Error> {
        self.next_probe = Instant::now() + self.probe_interval();
        let Some(sequence) = self.state.phase.job().map(|j| j.sequence) else {
            return Ok(());
        };
        let Some(release) = self.probed_release() else {
            // Rolling back to nothing: the machine finished it already.
            return Ok(());
        };
        let instance = self.probed_instance();
        let sample = self.sample(&release, true, instance).await;
        self.last_sample = Some((now(), Instant::now()));
        debug!(?sample, "probe");
        fault::point("trial-probing");
        self.apply(Input::Probe { sequence, sample }).await?;
        self.next_probe = Instant::now() + self.probe_interval();
        Ok(())
    }

    async fn heartbeat(&mut self) {
        fault::point("heartbeat");
        // Outside a trial, the heartbeat takes its own look at the app.
        let probing = matches!(
            self.state.phase,
            Phase::Trial { .. } | Phase::RollingBack { .. } | Phase::Proving { .. }
        );
        if !probing {
            // While blue-green's new version warms up, the app (the old version) is what
            // serves: the heartbeat looks at it.
            let release = match &self.state.phase {
                Phase::Warming { .. } => self.state.running().map(|c| c.release.clone()),
                _ => self.probed_release(),
            };
            match release {
                Some(release) => {
                    let instance = self.serving_instance();
                    let _ = self.sample(&release, false, instance).await;
                }
                None => self.last_app.status = AppStatus::NotInstalled,
            }
        }
        if !self.link.is_connected() {
            return;
        }
        let system = self.system.sample(&self.cfg.paths.root);
        self.counters.heartbeat += 1;
        self.save_counters();
        let hb = Heartbeat {
            device: self.ctx.device.clone(),
            seq: self.counters.heartbeat,
            at: now(),
            uptime: self.started.elapsed(),
            active_version: self.state.running().map(|c| c.installed.version.clone()),
            rollout: self.state.phase.job().and_then(|j| j.rollout.clone()),
            system,
            app: AppHealth {
                requests: health::requests_since(self.reported_requests, self.app_requests),
                failed: health::failed_since(
                    (self.reported_requests, self.reported_failed),
                    (self.app_requests, self.app_failed),
                ),
                ..self.last_app.clone()
            },
        };
        self.reported_requests = self.app_requests;
        self.reported_failed = self.app_failed;
        self.link.publish_qos0(
            Topic::Heartbeat(self.ctx.device.clone()).to_string(),
            encode(&hb),
        );
    }
}

/// Blue-green hold: says what happens to the previous version's warm instance in a step.
fn log_warm(before: &State, next: &State, event: &str) {
    let version = |slot: Slot| {
        before
            .slot(slot)
            .map(|c| c.installed.version.clone())
            .unwrap_or_default()
    };
    match (before.warm, next.warm) {
        (None, Some(old)) => {
            let v = next
                .slot(old)
                .map(|c| c.installed.version.clone())
                .unwrap_or_default();
            info!(slot = %old, version = %v, "keeping {v} warm until the coordinator confirms the wave");
        }
        (Some(old), None) => {
            let v = version(old);
            if matches!(next.phase, Phase::Returning { .. }) {
                warn!(slot = %old, version = %v, "switching back to {v}, which never stopped");
            } else if event == "Boot" {
                info!(slot = %old, version = %v, "{v} was kept warm and stopped with the agent; a rollback to it takes the ordinary path");
            } else if matches!(next.phase, Phase::Idle)
                && next.active == before.active
                && next.last_outcome == before.last_outcome
            {
                info!(slot = %old, version = %v, "wave confirmed: stopping {v}");
            } else {
                info!(slot = %old, version = %v, "another desired state before the wave was confirmed: stopping {v}");
            }
        }
        _ => {}
    }
}

fn input_name(input: &Input) -> &'static str {
    match input {
        Input::Boot { .. } => "Boot",
        Input::Desired { .. } => "Desired",
        Input::Downloaded { .. } => "Downloaded",
        Input::Installed { .. } => "Installed",
        Input::Swapped { .. } => "Swapped",
        Input::Probe { .. } => "Probe",
        Input::Snapshotted { .. } => "Snapshotted",
        Input::Restored { .. } => "Restored",
        Input::Trust { .. } => "Trust",
        Input::Switched { .. } => "Switched",
    }
}

/// The MQTT settings with the password read from `mqtt.password_file`, and the TLS client
/// config (pinned CA, optional client certificate) built once: a bad file stops the start
/// (exit 3, invalid configuration) instead of failing every reconnect.
fn mqtt_security(
    m: &crate::config::MqttConfig,
) -> Result<
    (
        crate::config::MqttConfig,
        Option<std::sync::Arc<rustls::ClientConfig>>,
    ),
    Error,
> {
    let mut m = m.clone();
    if let Some(path) = &m.password_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("mqtt.password_file {}: {e}", path.display())))?;
        m.password = Some(text.trim().to_owned());
    }
    let tls = match &m.ca {
        None => None,
        Some(ca) => Some(
            fleet_tls::client_config(ca, m.client_cert.as_deref().zip(m.client_key.as_deref()))
                .map_err(|e| Error::Config(format!("mqtt TLS: {e}")))?,
        ),
    };
    Ok((m, tls))
}

/// In a slot of a container release: the id of the image the release runs, written at install.
pub const IMAGE_ID_FILE: &str = ".fleet-image-id";

/// Where an installed release's image goes: the container engine, or nowhere (the runtime
/// that is configured instead).
enum Engine {
    Docker(crate::docker::Docker, tokio::runtime::Handle),
    None(RuntimeKind),
}

/// Container releases: loads the image tarball from the slot (if the release has one), checks
/// the image is there with the expected id, and records the id in the slot.
fn install_image(
    engine: Option<&Engine>,
    release: &fleet_proto::Release,
    dir: &std::path::Path,
) -> Result<(), Failure> {
    let fail = |detail: String| Failure::Install { detail };
    let (docker, handle) = match (engine, &release.container) {
        (Some(Engine::Docker(d, h)), Some(_)) => (d, h),
        (Some(Engine::Docker(..)), None) => {
            return Err(fail(
                "the release has no [container] section; this device runs containers (app.runtime = \"container\")".into(),
            ));
        }
        (Some(Engine::None(kind)), Some(_)) => {
            return Err(fail(format!(
                "the release is a container release ([container]); this device's app.runtime is {}",
                kind.as_str()
            )));
        }
        (None, _) | (Some(Engine::None(_)), None) => return Ok(()),
    };
    let c = release.container.as_ref().expect("matched above");
    if let Some(load) = &c.load {
        let tarball = dir.join(load);
        if !tarball.is_file() {
            return Err(fail(format!("the artifact has no image tarball {load}")));
        }
        handle
            .block_on(docker.load(&tarball, Duration::from_secs(30 * 60)))
            .map_err(|e| fail(format!("cannot load image {}: {e}", c.image)))?;
    }
    let id = handle.block_on(docker.image_id(&c.image)).map_err(|e| {
        fail(if e.is_not_found() {
            format!("image {} is not on the device", c.image)
        } else {
            format!("cannot inspect image {}: {e}", c.image)
        })
    })?;
    if let Some(want) = &c.image_id
        && *want != id
    {
        return Err(fail(format!(
            "image {} has id {id}, the release pins {want}",
            c.image
        )));
    }
    crate::fsutil::write_atomic(&dir.join(IMAGE_ID_FILE), id.as_bytes())
        .map_err(|e| fail(format!("cannot record the image id: {e}")))?;
    info!(image = %c.image, id = %id, "image ready");
    Ok(())
}

/// Wipes the standby slot, unpacks the staged artifact (re-checking its digest first: the
/// staged file may be from before a restart), syncs, runs the post-install hook, and for a
/// container release loads and checks its image.
fn install(
    layout: &Layout,
    job: &Job,
    slot: Slot,
    hook_timeout: Duration,
    env: &[(String, String)],
    engine: Option<&Engine>,
) -> Result<(), Failure> {
    let fail = |detail: String| Failure::Install { detail };
    let arch = Arch::current().ok_or_else(|| fail("unknown architecture".into()))?;
    let artifact = job
        .release
        .artifacts
        .get(&arch)
        .ok_or_else(|| fail("no artifact for this architecture".into()))?;
    let staged = layout.staged(&artifact.sha256);
    let bytes_ok = std::fs::File::open(&staged)
        .and_then(|mut f| {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            std::io::copy(&mut f, &mut h)?;
            Ok(fleet_proto::hex::Hex::<32>(h.finalize().into()))
        })
        .map_err(|e| fail(format!("cannot read the staged artifact: {e}")))?;
    if bytes_ok != artifact.sha256 {
        return Err(Failure::ChecksumMismatch {
            expected: artifact.sha256,
            got: bytes_ok,
        });
    }
    layout
        .wipe(slot)
        .map_err(|e| fail(format!("cannot wipe {slot}: {e}")))?;
    let dir = layout.slot_dir(slot);
    slots::unpack(&staged, &dir).map_err(|e| fail(e.to_string()))?;
    crate::fsutil::sync_fs(&dir).map_err(|e| fail(format!("cannot sync {slot}: {e}")))?;
    slots::run_hook(&dir, hook_timeout, env).map_err(|detail| Failure::Hook { detail })?;
    install_image(engine, &job.release, &dir)?;
    crate::fsutil::sync_fs(&dir).map_err(|e| fail(format!("cannot sync {slot}: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the core refuses blue-green with, and every reported state carries.
    #[test]
    fn blue_green_refusal_names_what_stops_this_device() {
        let dirs = [PathBuf::from("/var/lib/app")];
        // (runtime, switch, config data dirs, words in the refusal; none: it can)
        let cases: &[(RuntimeKind, SwitchKind, &[PathBuf], Option<&str>)] = &[
            (RuntimeKind::Process, SwitchKind::Forwarder, &[], None),
            (RuntimeKind::Process, SwitchKind::Command, &[], None),
            (
                RuntimeKind::Process,
                SwitchKind::Off,
                &[],
                Some("set blue_green.switch"),
            ),
            (
                RuntimeKind::Process,
                SwitchKind::Forwarder,
                &dirs,
                Some("data directories (/var/lib/app) cannot be snapshotted"),
            ),
            (
                RuntimeKind::Container,
                SwitchKind::Forwarder,
                &[],
                Some("needs the process runtime on this device (app.runtime is \"container\")"),
            ),
            (
                RuntimeKind::Systemd,
                SwitchKind::Off,
                &dirs,
                Some("app.runtime is \"systemd\""),
            ),
        ];
        for (runtime, switch, dirs, words) in cases {
            let got = blue_green_refusal(*runtime, *switch, dirs);
            match (words, &got) {
                (None, None) => {}
                (Some(w), Some(why)) => assert!(why.contains(w), "{w:?} not in {why:?}"),
                _ => panic!("{runtime:?} {switch:?} {dirs:?}: {got:?}"),
            }
        }
    }
}
