//! How the application runs, behind one trait: [`Process`] (the agent starts and supervises
//! the app itself), [`Systemd`] (`systemctl restart UNIT`, state from `systemctl show`) and
//! [`Container`] (the Docker Engine API: create and start a container from the release's image,
//! state and restart count from the engine).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What to run: the active release's entrypoint, resolved by the driver.
#[derive(Clone, Debug, PartialEq)]
pub struct AppSpec {
    /// `ROOT/active/<entrypoint>`: through the link, so a swap changes what runs next.
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `ROOT/active`.
    pub dir: PathBuf,
    /// Set for a container release: what the container runtime creates.
    pub container: Option<ContainerSpec>,
}

/// A container to run, resolved by the driver from the release and the device.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    /// The image id recorded when the release was installed (or its reference).
    pub image: String,
    /// Start the rollback image `NAME:fleet-rollback` (kept before the swap) instead of
    /// `image`, when it exists: the previous version after a failed trial.
    pub rollback: bool,
    pub network: Option<String>,
    /// `{port}` already replaced.
    pub ports: Vec<fleet_proto::release::PortMapping>,
    pub volumes: Vec<String>,
    pub devices: Vec<String>,
    pub restart: fleet_proto::release::RestartPolicy,
    /// Replaces the image's entrypoint when set.
    pub entrypoint: Option<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// The tag that keeps the previous version's image: `NAME:fleet-rollback`.
pub fn rollback_image(name: &str) -> String {
    format!("{name}:{ROLLBACK_TAG}")
}

pub const ROLLBACK_TAG: &str = "fleet-rollback";

/// The runtime's view of the app.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub running: bool,
    /// Exits since the last `start`.
    pub exits: u32,
    pub last_exit_code: Option<i32>,
    /// Restarts since the last `start`, and those within `window`.
    pub restarts_total: u32,
    pub restarts_in_window: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("systemctl {args}: {detail}")]
    Systemctl { args: String, detail: String },
    #[error(transparent)]
    Docker(#[from] crate::docker::DockerError),
    #[error("{0}")]
    Spec(String),
}

/// The two ways an app runs. `start` replaces whatever ran before.
pub trait Runtime: Send {
    fn start(
        &mut self,
        spec: AppSpec,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    fn stop(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// Takes over an app that already runs `spec`, instead of restarting it, when the runtime
    /// can prove that it does; returns whether it did (if not, call `start`). The agent asks
    /// once, when it starts and its journal says Idle.
    fn adopt(&mut self, spec: &AppSpec) -> impl std::future::Future<Output = bool> + Send;
    /// Current state; restarts counted within `window`.
    fn status(&mut self, window: Duration) -> impl std::future::Future<Output = Status> + Send;
    /// Before a swap: keep what a rollback to `current` (the version running now) will need
    /// that the new version could take away. Only the container runtime has something to do:
    /// it tags the running container's image as the rollback image.
    fn keep_for_rollback(
        &mut self,
        current: &AppSpec,
    ) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send {
        let _ = current;
        async { Ok(()) }
    }
}

/// The configured runtime.
#[derive(Debug)]
pub enum AnyRuntime {
    Process(Process),
    Systemd(Systemd),
    Container(Container),
}

impl Runtime for AnyRuntime {
    async fn start(&mut self, spec: AppSpec) -> Result<(), RuntimeError> {
        match self {
            AnyRuntime::Process(p) => p.start(spec).await,
            AnyRuntime::Systemd(s) => s.start(spec).await,
            AnyRuntime::Container(c) => c.start(spec).await,
        }
    }
    async fn stop(&mut self) {
        match self {
            AnyRuntime::Process(p) => p.stop().await,
            AnyRuntime::Systemd(s) => s.stop().await,
            AnyRuntime::Container(c) => c.stop().await,
        }
    }
    async fn status(&mut self, window: Duration) -> Status {
        match self {
            AnyRuntime::Process(p) => p.status(window).await,
            AnyRuntime::Systemd(s) => s.status(window).await,
            AnyRuntime::Container(c) => c.status(window).await,
        }
    }
    async fn adopt(&mut self, spec: &AppSpec) -> bool {
        match self {
            AnyRuntime::Process(p) => p.adopt(spec).await,
            AnyRuntime::Systemd(s) => s.adopt(spec).await,
            AnyRuntime::Container(c) => c.adopt(spec).await,
        }
    }
    async fn keep_for_rollback(&mut self, current: &AppSpec) -> Result<(), RuntimeError> {
        match self {
            AnyRuntime::Container(c) => c.keep_for_rollback(current).await,
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process supervisor

#[derive(Clone, Debug)]
pub struct ProcessOptions {
    pub stop_grace: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// A run this long resets the backoff.
    pub backoff_reset: Duration,
    /// Append the app's stdout and stderr here; `None`: stdout is discarded and stderr goes
    /// where the agent's goes (the journal, under systemd).
    pub log_file: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Shared {
    running: bool,
    pid: Option<i32>,
    exits: u32,
    last_exit_code: Option<i32>,
    restarts: VecDeque<Instant>,
    restarts_total: u32,
}

/// Starts the app as a child in its own process group, restarts it with backoff when it
/// exits, stops it with SIGTERM then SIGKILL. The child gets `PR_SET_PDEATHSIG(SIGKILL)`, so
/// a killed agent does not leave an orphan holding the app's port.
#[derive(Debug)]
pub struct Process {
    opts: ProcessOptions,
    shared: Arc<Mutex<Shared>>,
    stop_tx: Option<watch::Sender<bool>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Process {
    pub fn new(opts: ProcessOptions) -> Process {
        Process {
            opts,
            shared: Arc::default(),
            stop_tx: None,
            task: None,
        }
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

fn spawn_child(
    spec: &AppSpec,
    log_file: Option<&std::path::Path>,
) -> std::io::Result<tokio::process::Child> {
    let (stdout, stderr) = match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            (Stdio::from(file.try_clone()?), Stdio::from(file))
        }
        None => (Stdio::null(), Stdio::inherit()),
    };
    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .current_dir(&spec.dir)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // A script written a moment ago may still be open for writing in a forked sibling
    // (ETXTBSY); that passes in milliseconds.
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn signal_group(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our own child's process group.
    unsafe {
        libc::kill(-pid, sig);
    }
}

impl Runtime for Process {
    async fn start(&mut self, spec: AppSpec) -> Result<(), RuntimeError> {
        self.stop().await;
        {
            let mut s = lock(&self.shared);
            *s = Shared::default();
        }
        // Spawn the first child here so a missing program is reported to the caller.
        let first = match spawn_child(&spec, self.opts.log_file.as_deref()) {
            Ok(c) => c,
            Err(source) => {
                let mut s = lock(&self.shared);
                s.exits = 1;
                s.last_exit_code = None;
                return Err(RuntimeError::Spawn {
                    program: spec.program.display().to_string(),
                    source,
                });
            }
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::clone(&self.shared);
        let opts = self.opts.clone();
        self.task = Some(tokio::spawn(supervise(spec, first, shared, opts, stop_rx)));
        self.stop_tx = Some(stop_tx);
        Ok(())
    }

    /// The app is the agent's child and died with the previous agent: nothing to adopt.
    async fn adopt(&mut self, _spec: &AppSpec) -> bool {
        false
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        lock(&self.shared).running = false;
    }

    async fn status(&mut self, window: Duration) -> Status {
        let s = lock(&self.shared);
        let now = Instant::now();
        Status {
            running: s.running,
            exits: s.exits,
            last_exit_code: s.last_exit_code,
            restarts_total: s.restarts_total,
            restarts_in_window: s
                .restarts
                .iter()
                .filter(|t| now.duration_since(**t) <= window)
                .count() as u32,
        }
    }
}

async fn supervise(
    spec: AppSpec,
    first: tokio::process::Child,
    shared: Arc<Mutex<Shared>>,
    opts: ProcessOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut child = Some(first);
    let mut backoff = opts.backoff_min;
    loop {
        let Some(mut c) = child.take() else { return };
        let pid = c.id().and_then(|p| i32::try_from(p).ok());
        let started = Instant::now();
        {
            let mut s = lock(&shared);
            s.running = true;
            s.pid = pid;
        }
        tokio::select! {
            status = c.wait() => {
                let code = status.ok().and_then(|s| {
                    use std::os::unix::process::ExitStatusExt as _;
                    s.code().or(s.signal().map(|sig| 128 + sig))
                });
                {
                    let mut s = lock(&shared);
                    s.running = false;
                    s.pid = None;
                    s.exits += 1;
                    s.last_exit_code = code;
                }
                tracing::warn!(exit = ?code, "app exited; restarting in {}", humantime::format_duration(backoff));
                if started.elapsed() >= opts.backoff_reset {
                    backoff = opts.backoff_min;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(opts.backoff_max);
                match spawn_child(&spec, opts.log_file.as_deref()) {
                    Ok(next) => {
                        {
                            let mut s = lock(&shared);
                            s.restarts.push_back(Instant::now());
                            if s.restarts.len() > 1000 {
                                s.restarts.pop_front();
                            }
                            s.restarts_total += 1;
                        }
                        child = Some(next);
                    }
                    Err(e) => {
                        tracing::error!("cannot restart {}: {e}", spec.program.display());
                        {
                            let mut s = lock(&shared);
                            s.exits += 1;
                            s.restarts.push_back(Instant::now());
                            s.restarts_total += 1;
                        }
                        // Try again after the next backoff.
                        loop {
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = stop.changed() => return,
                            }
                            if let Ok(next) = spawn_child(&spec, opts.log_file.as_deref()) {
                                child = Some(next);
                                break;
                            }
                            backoff = (backoff * 2).min(opts.backoff_max);
                        }
                    }
                }
            }
            _ = stop.changed() => {
                if let Some(pid) = pid {
                    signal_group(pid, libc::SIGTERM);
                    if tokio::time::timeout(opts.stop_grace, c.wait()).await.is_err() {
                        signal_group(pid, libc::SIGKILL);
                        let _ = c.wait().await;
                    } else {
                        // The group may hold helpers the app started.
                        signal_group(pid, libc::SIGKILL);
                    }
                }
                let mut s = lock(&shared);
                s.running = false;
                s.pid = None;
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// systemd

/// Runs the app as a systemd unit the operator installed, whose `ExecStart` is the script
/// `exec_script` (`ROOT/app-exec`) that this runtime rewrites before every start.
#[derive(Debug)]
pub struct Systemd {
    pub unit: String,
    pub exec_script: PathBuf,
    /// NRestarts seen at the last `start` and the instants its increases were observed.
    base_restarts: Option<u32>,
    seen_restarts: u32,
    restarts: VecDeque<Instant>,
    /// Exits of the main process seen since the last `start`.
    exits: u32,
    last_main_pid: Option<u32>,
    /// ExecMainStartTimestampMonotonic of the run that was there when `start` asked for the
    /// restart. With --no-block the restart happens after `start` returns, and an app that
    /// takes its time to stop is still that old run for a while: observations of it say
    /// nothing about the new one and are left out.
    previous_run: Option<u64>,
}

/// The properties `systemctl show` reports that the runtime reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active_state: String,
    pub sub_state: String,
    pub n_restarts: u32,
    pub exec_main_status: Option<i32>,
    pub exec_main_pid: u32,
    /// When the current (or last) main process started, CLOCK_MONOTONIC µs; 0 = never.
    pub exec_main_started: u64,
}

pub const SHOW_PROPERTIES: &str =
    "ActiveState,SubState,NRestarts,ExecMainStatus,ExecMainPID,ExecMainStartTimestampMonotonic";

/// Parses `systemctl show -p …` output (`Key=Value` lines).
pub fn parse_show(text: &str) -> UnitState {
    let mut u = UnitState::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "ActiveState" => u.active_state = v.to_owned(),
            "SubState" => u.sub_state = v.to_owned(),
            "NRestarts" => u.n_restarts = v.parse().unwrap_or(0),
            "ExecMainStatus" => u.exec_main_status = v.parse().ok(),
            "ExecMainPID" => u.exec_main_pid = v.parse().unwrap_or(0),
            "ExecMainStartTimestampMonotonic" => u.exec_main_started = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    u
}

/// The argv of each systemctl call, kept in one place for the tests.
pub fn systemctl_args(verb: &str, unit: &str) -> Vec<String> {
    match verb {
        "show" => vec![
            "show".into(),
            unit.into(),
            "--property".into(),
            SHOW_PROPERTIES.into(),
        ],
        "reset-failed" => vec!["reset-failed".into(), unit.into()],
        other => vec![other.into(), "--no-block".into(), unit.into()],
    }
}

/// The script the unit's `ExecStart` runs: exports the env and execs the entrypoint.
pub fn exec_script(spec: &AppSpec) -> String {
    let mut out =
        String::from("#!/bin/sh\n# Written by fleet-agent before every start; do not edit.\n");
    out.push_str(&format!(
        "cd {}\n",
        shell_quote(&spec.dir.display().to_string())
    ));
    for (k, v) in &spec.env {
        out.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    out.push_str("exec ");
    out.push_str(&shell_quote(&spec.program.display().to_string()));
    for a in &spec.args {
        out.push(' ');
        out.push_str(&shell_quote(a));
    }
    out.push('\n');
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Systemd {
    pub fn new(unit: String, exec_script: PathBuf) -> Systemd {
        Systemd {
            unit,
            exec_script,
            base_restarts: None,
            seen_restarts: 0,
            restarts: VecDeque::new(),
            exits: 0,
            last_main_pid: None,
            previous_run: None,
        }
    }

    async fn systemctl(&self, verb: &str) -> Result<String, RuntimeError> {
        let args = systemctl_args(verb, &self.unit);
        let out = tokio::process::Command::new("systemctl")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| RuntimeError::Systemctl {
                args: args.join(" "),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(RuntimeError::Systemctl {
                args: args.join(" "),
                detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Why the unit cannot be left running as it is for `spec`, if it cannot.
    async fn check_adoptable(&self, spec: &AppSpec) -> Result<(), String> {
        let u = parse_show(&self.systemctl("show").await.map_err(|e| e.to_string())?);
        if u.active_state != "active" || u.sub_state != "running" || u.exec_main_pid == 0 {
            return Err(format!("it is {}/{}", u.active_state, u.sub_state));
        }
        let script = std::fs::read(&self.exec_script).unwrap_or_default();
        if script != exec_script(spec).as_bytes() {
            return Err(format!(
                "{} runs something else",
                self.exec_script.display()
            ));
        }
        // Compared by inode: stat follows the /proc magic link to the directory itself, while
        // its text (readlink) is not a usable path when the agent has its own mount namespace
        // (ProtectSystem=, PrivateTmp= in its unit).
        use std::os::unix::fs::MetadataExt as _;
        let id = |m: std::fs::Metadata| (m.dev(), m.ino());
        let cwd = std::fs::metadata(format!("/proc/{}/cwd", u.exec_main_pid))
            .map(id)
            .map_err(|e| format!("cannot tell the slot of process {}: {e}", u.exec_main_pid))?;
        let slot = std::fs::metadata(&spec.dir)
            .map(id)
            .map_err(|e| format!("cannot resolve {}: {e}", spec.dir.display()))?;
        if cwd != slot {
            return Err(format!(
                "process {} does not run in {}",
                u.exec_main_pid,
                spec.dir.display()
            ));
        }
        Ok(())
    }

    /// Counters start again from the next observation (after a start or an adoption).
    fn reset_counters(&mut self) {
        self.base_restarts = None;
        self.seen_restarts = 0;
        self.restarts.clear();
        self.exits = 0;
        self.last_main_pid = None;
        self.previous_run = None;
    }

    /// Whether `u` describes a run started since the last `start` asked for one.
    fn is_current(&self, u: &UnitState) -> bool {
        self.previous_run
            .is_none_or(|previous| u.exec_main_started > previous)
    }

    /// Folds one `systemctl show` observation into the counters.
    pub fn observe(&mut self, u: &UnitState, now: Instant) {
        if !self.is_current(u) {
            return;
        }
        let base = *self.base_restarts.get_or_insert(u.n_restarts);
        let total = u.n_restarts.saturating_sub(base);
        while self.seen_restarts < total {
            self.seen_restarts += 1;
            self.restarts.push_back(now);
        }
        if self.restarts.len() > 1000 {
            self.restarts.pop_front();
        }
        // A new main PID after one was seen, or a failed state, is an exit.
        let failed = u.active_state == "failed" || u.sub_state == "auto-restart";
        if let Some(prev) = self.last_main_pid
            && u.exec_main_pid != prev
            && prev != 0
        {
            self.exits += 1;
        } else if failed && self.exits == 0 {
            self.exits = 1;
        }
        if u.exec_main_pid != 0 {
            self.last_main_pid = Some(u.exec_main_pid);
        }
    }
}

impl Runtime for Systemd {
    async fn start(&mut self, spec: AppSpec) -> Result<(), RuntimeError> {
        let script = exec_script(&spec);
        crate::fsutil::write_atomic(&self.exec_script, script.as_bytes()).map_err(|e| {
            RuntimeError::Spawn {
                program: self.exec_script.display().to_string(),
                source: e,
            }
        })?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ =
                std::fs::set_permissions(&self.exec_script, std::fs::Permissions::from_mode(0o755));
        }
        // A release that crashed at start may have run the unit into its start limit ("Start
        // request repeated too quickly"); systemd then refuses every start, the rollback's
        // included, and with --no-block the refusal is never seen here. The agent's restart is
        // deliberate, so the limit (and a failed state) is reset first.
        if let Err(e) = self.systemctl("reset-failed").await {
            tracing::debug!("{e}");
        }
        let previous = match self.systemctl("show").await {
            Ok(text) => parse_show(&text).exec_main_started,
            Err(e) => {
                tracing::warn!("{e}");
                0
            }
        };
        self.systemctl("restart").await?;
        self.reset_counters();
        self.previous_run = Some(previous);
        Ok(())
    }

    /// The unit outlives the agent (a watchdog kill, a crash, an agent upgrade): if it is
    /// running the script this spec writes, from the slot `active` points to now, it is left
    /// running. The script starts the entrypoint through the `active` link, so the main
    /// process's working directory (`cd` resolves the link) names the slot it was started
    /// from. Anything unproven (another state, another script, another slot, an app that
    /// changed directory) is restarted as before.
    async fn adopt(&mut self, spec: &AppSpec) -> bool {
        match self.check_adoptable(spec).await {
            Ok(()) => {
                self.reset_counters();
                true
            }
            Err(why) => {
                tracing::info!(unit = %self.unit, "restarting the app unit: {why}");
                false
            }
        }
    }
    async fn stop(&mut self) {
        if let Err(e) = self.systemctl("stop").await {
            tracing::warn!("{e}");
        }
    }

    async fn status(&mut self, window: Duration) -> Status {
        let u = match self.systemctl("show").await {
            Ok(text) => parse_show(&text),
            Err(e) => {
                tracing::warn!("{e}");
                UnitState::default()
            }
        };
        let now = Instant::now();
        self.observe(&u, now);
        let current = self.is_current(&u);
        Status {
            running: current && u.active_state == "active" && u.sub_state == "running",
            exits: self.exits,
            last_exit_code: if current { u.exec_main_status } else { None },
            restarts_total: self.seen_restarts,
            restarts_in_window: self
                .restarts
                .iter()
                .filter(|t| now.duration_since(**t) <= window)
                .count() as u32,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Container

/// Runs the release's image as one container, always under the same name, through the engine's
/// API ([`crate::docker`]). `start` replaces the container (stop, remove, create, start); the
/// engine applies the release's restart policy; `status` reads `State` and `RestartCount`.
#[derive(Debug)]
pub struct Container {
    docker: crate::docker::Docker,
    stop_grace: Duration,
    /// The container this runtime started or adopted last.
    name: Option<String>,
    /// RestartCount at the start or adoption, and the instants its increases were seen.
    base_restarts: Option<u32>,
    seen_restarts: u32,
    restarts: VecDeque<Instant>,
    /// The last `start` failed before the container ran (create or start refused).
    start_failed: bool,
}

/// The label holding a digest of the create request: an adopted container must carry the
/// same one.
pub const SPEC_LABEL: &str = "io.fleet.spec";

/// The Engine API create body for `spec`, running `image`.
pub fn create_body(spec: &ContainerSpec, image: &str) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let mut exposed = Map::new();
    let mut bindings = Map::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container_port, p.protocol);
        exposed.insert(key.clone(), json!({}));
        let list = bindings
            .entry(key)
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = list {
            list.push(json!({
                "HostIp": p.host_ip.clone().unwrap_or_default(),
                "HostPort": p.host_port,
            }));
        }
    }
    let devices: Vec<Value> = spec
        .devices
        .iter()
        .map(|d| {
            let mut parts = d.splitn(3, ':');
            let host = parts.next().unwrap_or_default();
            let inside = parts.next().unwrap_or(host);
            let perms = parts.next().unwrap_or("rwm");
            json!({"PathOnHost": host, "PathInContainer": inside, "CgroupPermissions": perms})
        })
        .collect();
    let mut host_config = json!({
        "Binds": spec.volumes,
        "Devices": devices,
        "PortBindings": bindings,
        "RestartPolicy": {"Name": spec.restart.as_str(), "MaximumRetryCount": 0},
    });
    if let Some(n) = &spec.network {
        host_config["NetworkMode"] = json!(n);
    }
    let mut body = json!({
        "Image": image,
        "Env": spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "ExposedPorts": exposed,
        "HostConfig": host_config,
    });
    if !spec.args.is_empty() {
        body["Cmd"] = json!(spec.args);
    }
    if let Some(e) = &spec.entrypoint {
        body["Entrypoint"] = json!([e]);
    }
    let digest = fleet_proto::hex::Sha256::of(body.to_string().as_bytes());
    body["Labels"] = json!({ SPEC_LABEL: digest.to_string(), "io.fleet.managed": "fleet-agent" });
    body
}

impl Container {
    pub fn new(socket: PathBuf, stop_grace: Duration) -> Container {
        Container {
            docker: crate::docker::Docker::new(socket),
            stop_grace,
            name: None,
            base_restarts: None,
            seen_restarts: 0,
            restarts: VecDeque::new(),
            start_failed: false,
        }
    }

    fn spec(spec: &AppSpec) -> Result<&ContainerSpec, RuntimeError> {
        spec.container.as_ref().ok_or_else(|| {
            RuntimeError::Spec(
                "the release has no [container] section; the container runtime runs only container releases".into(),
            )
        })
    }

    /// The image to start: the rollback image when asked for and present, else the spec's.
    async fn image_for(&self, spec: &ContainerSpec) -> String {
        if spec.rollback {
            let tag = rollback_image(&spec.name);
            match self.docker.image_id(&tag).await {
                Ok(_) => return tag,
                Err(e) => tracing::warn!(
                    "rollback image {tag} unavailable ({e}); starting {} instead",
                    spec.image
                ),
            }
        }
        spec.image.clone()
    }

    /// The container to stop or inspect when this runtime has not started or adopted one yet
    /// (after an agent restart in the middle of an update).
    pub fn track(&mut self, name: &str) {
        if self.name.is_none() {
            self.name = Some(name.to_owned());
        }
    }

    fn reset_counters(&mut self, base: Option<u32>) {
        self.base_restarts = base;
        self.seen_restarts = 0;
        self.restarts.clear();
        self.start_failed = false;
    }
}

impl Runtime for Container {
    async fn start(&mut self, spec: AppSpec) -> Result<(), RuntimeError> {
        let c = Self::spec(&spec)?.clone();
        // Whatever has this name goes, even one this agent never started.
        self.name = Some(c.name.clone());
        self.stop().await;
        self.reset_counters(Some(0));
        let image = self.image_for(&c).await;
        let body = create_body(&c, &image);
        let result = async {
            let id = self.docker.create(&c.name, &body).await?;
            self.docker.start(&id).await
        }
        .await;
        if result.is_err() {
            self.start_failed = true;
        }
        tracing::info!(container = %c.name, image = %image, "container started");
        Ok(result?)
    }

    async fn stop(&mut self) {
        if let Some(name) = &self.name
            && let Err(e) = self.docker.stop_and_remove(name, self.stop_grace).await
        {
            tracing::warn!(container = %name, "{e}");
        }
    }

    /// A running container with this name whose create request had the same digest (same
    /// image id, command, environment, ports, mounts…) is left running.
    async fn adopt(&mut self, spec: &AppSpec) -> bool {
        let Ok(c) = Self::spec(spec) else {
            return false;
        };
        self.name = Some(c.name.clone());
        let want = create_body(c, &c.image)["Labels"][SPEC_LABEL].clone();
        match self.docker.inspect_container(&c.name).await {
            Ok(v) if v["State"]["Running"] == true && v["Config"]["Labels"][SPEC_LABEL] == want => {
                let base = v["RestartCount"].as_u64().unwrap_or(0) as u32;
                self.reset_counters(Some(base));
                true
            }
            Ok(_) => {
                tracing::info!(container = %c.name, "restarting the container: it is not running this release");
                false
            }
            Err(e) => {
                if !e.is_not_found() {
                    tracing::warn!("{e}");
                }
                false
            }
        }
    }

    async fn status(&mut self, window: Duration) -> Status {
        let now = Instant::now();
        let Some(name) = self.name.clone() else {
            return Status::default();
        };
        let v = match self.docker.inspect_container(&name).await {
            Ok(v) => v,
            Err(e) => {
                if !e.is_not_found() {
                    tracing::warn!("{e}");
                }
                return Status {
                    exits: u32::from(self.start_failed),
                    ..Status::default()
                };
            }
        };
        let state = &v["State"];
        let count = v["RestartCount"].as_u64().unwrap_or(0) as u32;
        let base = *self.base_restarts.get_or_insert(count);
        let total = count.saturating_sub(base);
        while self.seen_restarts < total {
            self.seen_restarts += 1;
            self.restarts.push_back(now);
        }
        if self.restarts.len() > 1000 {
            self.restarts.pop_front();
        }
        let running = state["Running"] == true && state["Restarting"] != true;
        // The engine counts a restart when it decides on it, at the exit; an exit it will not
        // restart (policy `no`, or stopped) is the status `exited`/`dead`.
        let ended = matches!(state["Status"].as_str(), Some("exited" | "dead"));
        let never_ran = state["Status"].as_str() == Some("created");
        Status {
            running,
            exits: self.seen_restarts + u32::from(ended || (never_ran && self.start_failed)),
            last_exit_code: (!running)
                .then(|| state["ExitCode"].as_i64().map(|c| c as i32))
                .flatten(),
            restarts_total: self.seen_restarts,
            restarts_in_window: self
                .restarts
                .iter()
                .filter(|t| now.duration_since(**t) <= window)
                .count() as u32,
        }
    }

    /// Tags the image of the container running `current` as `NAME:fleet-rollback`; with no
    /// such container, the image `current` would run. Nothing running and nothing installed:
    /// nothing to keep.
    async fn keep_for_rollback(&mut self, current: &AppSpec) -> Result<(), RuntimeError> {
        let c = Self::spec(current)?;
        let image = match self.docker.inspect_container(&c.name).await {
            Ok(v) => v["Image"].as_str().unwrap_or(&c.image).to_owned(),
            Err(e) if e.is_not_found() => c.image.clone(),
            Err(e) => return Err(e.into()),
        };
        self.docker.tag(&image, &c.name, ROLLBACK_TAG).await?;
        tracing::info!(image = %image, tag = %rollback_image(&c.name), "rollback image kept");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_process_runtime_appends_app_output_to_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("app.log");
        std::fs::write(&log, "earlier run\n").unwrap();
        let mut runtime = Process::new(ProcessOptions {
            stop_grace: Duration::from_secs(1),
            backoff_min: Duration::from_secs(60),
            backoff_max: Duration::from_secs(60),
            backoff_reset: Duration::from_secs(60),
            log_file: Some(log.clone()),
        });
        let spec = AppSpec {
            program: "/bin/sh".into(),
            args: vec![
                "-c".into(),
                "echo to-stdout; echo to-stderr >&2; sleep 30".into(),
            ],
            env: Vec::new(),
            dir: dir.path().to_owned(),
            container: None,
        };
        runtime.start(spec).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("to-stderr") && text.contains("to-stdout") {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "the app's output never reached {}: {text:?}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            text.starts_with("earlier run\n"),
            "appended, not truncated: {text:?}"
        );
        runtime.stop().await;
    }

    #[test]
    fn parses_systemctl_show() {
        let text = "ActiveState=activating\nSubState=auto-restart\nNRestarts=4\nExecMainStatus=3\nExecMainPID=0\nJunk\n";
        assert_eq!(
            parse_show(text),
            UnitState {
                active_state: "activating".into(),
                sub_state: "auto-restart".into(),
                n_restarts: 4,
                exec_main_status: Some(3),
                exec_main_pid: 0,
                exec_main_started: 0,
            }
        );
        assert_eq!(
            parse_show("ExecMainStartTimestampMonotonic=5004227113\n").exec_main_started,
            5_004_227_113
        );
        assert_eq!(parse_show(""), UnitState::default());
    }

    #[test]
    fn builds_systemctl_commands() {
        assert_eq!(
            systemctl_args("restart", "app.service"),
            ["restart", "--no-block", "app.service"]
        );
        assert_eq!(
            systemctl_args("reset-failed", "app.service"),
            ["reset-failed", "app.service"]
        );
        assert_eq!(
            systemctl_args("show", "app.service"),
            ["show", "app.service", "--property", SHOW_PROPERTIES]
        );
        let spec = AppSpec {
            program: "/opt/fleet/app/active/bin/app".into(),
            args: vec!["--port".into(), "80'80".into()],
            env: vec![("FLEET_DEVICE_ID".into(), "cam-1".into())],
            dir: "/opt/fleet/app/active".into(),
            container: None,
        };
        assert_eq!(
            exec_script(&spec),
            "#!/bin/sh\n# Written by fleet-agent before every start; do not edit.\ncd '/opt/fleet/app/active'\nexport FLEET_DEVICE_ID='cam-1'\nexec '/opt/fleet/app/active/bin/app' '--port' '80'\\''80'\n"
        );
    }

    #[test]
    fn counts_restarts_from_nrestarts() {
        let mut s = Systemd::new("a".into(), "/x".into());
        let t0 = Instant::now();
        let u = |n, pid| UnitState {
            active_state: "active".into(),
            sub_state: "running".into(),
            n_restarts: n,
            exec_main_status: Some(0),
            exec_main_pid: pid,
            exec_main_started: u64::from(pid),
        };
        s.observe(&u(5, 10), t0);
        assert_eq!((s.seen_restarts, s.exits), (0, 0));
        s.observe(&u(7, 11), t0);
        assert_eq!((s.seen_restarts, s.exits), (2, 1));
        s.observe(&u(7, 11), t0);
        assert_eq!((s.seen_restarts, s.exits), (2, 1));
    }

    #[test]
    fn the_previous_run_stopping_slowly_is_not_an_exit_of_the_new_one() {
        let mut s = Systemd::new("a".into(), "/x".into());
        let t0 = Instant::now();
        // The old version (started at 100, 4 automatic restarts behind it) was running when
        // the restart was asked for; it takes a while to stop.
        s.previous_run = Some(100);
        let old = UnitState {
            active_state: "deactivating".into(),
            sub_state: "stop-sigterm".into(),
            n_restarts: 4,
            exec_main_status: None,
            exec_main_pid: 10,
            exec_main_started: 100,
        };
        s.observe(&old, t0);
        s.observe(&old, t0);
        // Then the new version runs, with a new PID and NRestarts back at 0.
        let new = UnitState {
            active_state: "active".into(),
            sub_state: "running".into(),
            n_restarts: 0,
            exec_main_status: Some(0),
            exec_main_pid: 11,
            exec_main_started: 200,
        };
        s.observe(&new, t0);
        assert_eq!((s.seen_restarts, s.exits), (0, 0), "no exit, no restart");
        // Its own restarts count from there.
        let restarted = UnitState {
            n_restarts: 1,
            exec_main_pid: 12,
            exec_main_started: 300,
            ..new
        };
        s.observe(&restarted, t0);
        assert_eq!((s.seen_restarts, s.exits), (1, 1));
    }
}

#[cfg(test)]
mod container_tests {
    use super::*;
    use fleet_proto::release::{RestartPolicy, parse_port};

    #[test]
    fn builds_the_engine_create_request() {
        let spec = ContainerSpec {
            name: "detector".into(),
            image: "sha256:abc".into(),
            rollback: false,
            network: Some("bridge".into()),
            ports: vec![parse_port("127.0.0.1:18080:8080").unwrap()],
            volumes: vec!["/var/lib/d:/data:ro".into()],
            devices: vec!["/dev/video0".into(), "/dev/a:/dev/b:r".into()],
            restart: RestartPolicy::OnFailure,
            entrypoint: None,
            args: vec!["--port".into(), "8080".into()],
            env: vec![("FLEET_DEVICE_ID".into(), "cam-1".into())],
        };
        let body = create_body(&spec, "sha256:abc");
        assert_eq!(body["Image"], "sha256:abc");
        assert_eq!(body["Cmd"], serde_json::json!(["--port", "8080"]));
        assert!(body.get("Entrypoint").is_none(), "the image's entrypoint");
        assert_eq!(body["Env"], serde_json::json!(["FLEET_DEVICE_ID=cam-1"]));
        let hc = &body["HostConfig"];
        assert_eq!(hc["NetworkMode"], "bridge");
        assert_eq!(
            hc["PortBindings"]["8080/tcp"],
            serde_json::json!([{"HostIp": "127.0.0.1", "HostPort": "18080"}])
        );
        assert_eq!(hc["Binds"], serde_json::json!(["/var/lib/d:/data:ro"]));
        assert_eq!(hc["Devices"][1]["PathInContainer"], "/dev/b");
        assert_eq!(hc["Devices"][1]["CgroupPermissions"], "r");
        assert_eq!(hc["RestartPolicy"]["Name"], "on-failure");
        // The label changes with anything that changes what runs.
        let other = create_body(&spec, "sha256:def");
        assert_ne!(body["Labels"][SPEC_LABEL], other["Labels"][SPEC_LABEL]);
        assert_eq!(rollback_image("detector"), "detector:fleet-rollback");
    }
}
