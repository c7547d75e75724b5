//! The real `fleet-agent` binary as a device: its own generated config, slot and state
//! directories, application port and log files; killed on drop, restartable on the same disk.
//!
//! The agent runs its application with the `process` runtime: the app is the agent's child in
//! a process group of its own, tied to the agent by `PR_SET_PDEATHSIG`. So killing the agent
//! (a power cut, a test's `Drop`) kills the app too; [`Agent::kill`] checks that the app's port
//! stops answering, so a test never mistakes an orphaned app for a live device.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_proto::operator::{AuditEntry, DeviceStatus, DeviceView};
use fleet_proto::rollout::RolloutState;

use crate::fleet::{Coordinator, http_get};
use crate::process::{Child, binary, free_port, wait_for};

/// Who a device is: what its agent reports as facts and what releases are matched against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Device id = MQTT client id = topic level (and the broker username on mosquitto).
    pub id: String,
    pub device_type: String,
    pub region: String,
    pub tags: Vec<String>,
}

impl DeviceSpec {
    pub fn new(id: &str, device_type: &str, region: &str) -> DeviceSpec {
        DeviceSpec {
            id: id.to_owned(),
            device_type: device_type.to_owned(),
            region: region.to_owned(),
            tags: Vec::new(),
        }
    }

    pub fn tagged(mut self, tag: &str) -> DeviceSpec {
        self.tags.push(tag.to_owned());
        self
    }
}

/// Where an agent's broker is, and the account it logs in with (none on the embedded broker).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
    /// `(username, password)`.
    pub credentials: Option<(String, String)>,
    /// TLS: the CA the agent pins, and its client certificate and key (mosquitto's mutual TLS).
    pub tls: Option<(PathBuf, Option<(PathBuf, PathBuf)>)>,
}

impl MqttEndpoint {
    pub fn anonymous(host: &str, port: u16) -> MqttEndpoint {
        MqttEndpoint {
            host: host.to_owned(),
            port,
            credentials: None,
            tls: None,
        }
    }

    pub fn with_login(host: &str, port: u16, user: &str, password: &str) -> MqttEndpoint {
        MqttEndpoint {
            host: host.to_owned(),
            port,
            credentials: Some((user.to_owned(), password.to_owned())),
            tls: None,
        }
    }

    /// TLS pinning `ca`, with a client certificate if given.
    pub fn with_tls(mut self, ca: &Path, client: Option<(&Path, &Path)>) -> MqttEndpoint {
        self.tls = Some((
            ca.to_owned(),
            client.map(|(c, k)| (c.to_owned(), k.to_owned())),
        ));
        self
    }
}

/// How long an agent may take to stop, and its app to let go of its port.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What the application's `/health` said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppHealth {
    /// HTTP status code (200 healthy or degraded, 503 unhealthy).
    pub code: u16,
    /// `healthy`, `degraded` or `unhealthy`.
    pub status: String,
    pub version: String,
}

/// A running (or stopped, between [`kill`](Agent::kill) and [`start_again`](Agent::start_again))
/// `fleet-agent`. Dropping it kills the agent and with it the app.
#[derive(Debug)]
pub struct Agent {
    spec: DeviceSpec,
    app_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// `FLEET_AGENT__…` overrides set on every run ([`Agent::start_with_env`]), e.g. the
    /// container runtime and its engine's socket.
    env: Vec<(String, String)>,
}

impl Agent {
    /// Writes `<parent>/<id>/agent.toml` and starts the agent: its device facts from `spec`,
    /// `mqtt` as its broker, `release_key` (64 hex digits) pinned, `root/` and `state/` in its
    /// directory, a free application port, the `process` runtime and timings short enough for
    /// tests (heartbeat 300 ms until a desired state sets one, reconnect 100 ms–1 s; the
    /// heartbeat's health probe keeps the default 2 s timeout, as a loaded machine needs).
    #[track_caller]
    pub fn start(parent: &Path, spec: DeviceSpec, mqtt: &MqttEndpoint, release_key: &str) -> Agent {
        Self::start_with_env(parent, spec, mqtt, release_key, &[])
    }

    /// [`Agent::start`] with `env` (`FLEET_AGENT__SECTION__KEY`, value) set on every run of
    /// the agent, over its config file: e.g. `FLEET_AGENT__APP__RUNTIME=container`. A
    /// container outlives its agent (it belongs to the engine, as on a real device), so
    /// [`Agent::kill`] and [`Agent::stop`], which check that the app is gone, are not for those.
    #[track_caller]
    pub fn start_with_env(
        parent: &Path,
        spec: DeviceSpec,
        mqtt: &MqttEndpoint,
        release_key: &str,
        env: &[(String, String)],
    ) -> Agent {
        let dir = parent.join(&spec.id);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", dir.display()));
        let app_port = free_port();
        let config = config(&spec, mqtt, release_key, &dir, app_port);
        let path = dir.join("agent.toml");
        std::fs::write(&path, config)
            .unwrap_or_else(|e| panic!("failed to write {}: {e}", path.display()));
        let mut agent = Agent {
            spec,
            app_port,
            dir,
            child: None,
            starts: 0,
            env: env.to_vec(),
        };
        agent.start_again();
        agent
    }

    /// Starts the agent again on the same config and disk (after [`kill`](Agent::kill) or
    /// [`stop`](Agent::stop)). Output is appended to the same log files.
    #[track_caller]
    pub fn start_again(&mut self) {
        assert!(
            self.child.as_mut().is_none_or(|c| !c.is_running()),
            "agent {} is already running",
            self.spec.id
        );
        let mut cmd = Command::new(binary("fleet-agent"));
        // The test's own environment must not reconfigure the device.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FLEET_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--config")
            .arg(self.dir.join("agent.toml"))
            .current_dir(&self.dir);
        self.starts += 1;
        self.child = Some(Child::spawn("agent", cmd, &self.dir));
    }

    /// kill -9 (a power cut): the agent dies at once, its app with it (`PR_SET_PDEATHSIG`).
    /// Panics if the app still answers on its port afterwards.
    #[track_caller]
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            child.kill();
        }
        self.wait_app_gone();
    }

    /// SIGTERM: the agent stops its app, then exits 0.
    #[track_caller]
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let status = child.stop(STOP_TIMEOUT);
            assert!(
                status.success(),
                "agent {} did not exit cleanly on SIGTERM: {status}\n{}",
                self.spec.id,
                child.tails(30)
            );
        }
        self.wait_app_gone();
    }

    #[track_caller]
    fn wait_app_gone(&self) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.app_port));
        let what = format!(
            "the app of agent {} to stop answering on {addr} after the agent died",
            self.spec.id
        );
        wait_for(STOP_TIMEOUT, &what, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .is_err()
                .then_some(())
        });
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(Child::is_running)
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    pub fn device_type(&self) -> &str {
        &self.spec.device_type
    }

    pub fn region(&self) -> &str {
        &self.spec.region
    }

    /// The port the agent gives its application (`{port}` in a release).
    pub fn app_port(&self) -> u16 {
        self.app_port
    }

    /// The device's directory: `agent.toml`, `root/` (slots), `state/` (journal), logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many times the agent has been started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The current (or last) run's process, e.g. for `wait_for_line` on the agent's log.
    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("an Agent is started by its constructor")
    }

    /// The whole agent log across restarts (it logs to stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.stderr")).unwrap_or_default()
    }

    /// The last lines of the current run's log, for failure messages.
    pub fn tails(&self, lines: usize) -> String {
        self.child
            .as_ref()
            .map(|c| c.tails(lines))
            .unwrap_or_default()
    }

    /// What the app's `/health` says right now, or `None` when nothing answers on its port.
    pub fn app_health(&self) -> Option<AppHealth> {
        let (code, body) = http_get(self.app_port, "/health")?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(AppHealth {
            code,
            status: doc.get("status")?.as_str()?.to_owned(),
            version: doc.get("version")?.as_str()?.to_owned(),
        })
    }

    /// The version the app serves while it answers healthy.
    pub fn serving(&self) -> Option<String> {
        self.app_health()
            .filter(|h| h.code == 200 && h.status == "healthy")
            .map(|h| h.version)
    }

    /// Waits until the app answers healthy with `version` on its port.
    #[track_caller]
    pub fn wait_serving(&self, version: &str, timeout: Duration) {
        let started = Instant::now();
        let what = format!("{} serves {version} (healthy)", self.spec.id);
        let mut last = None;
        let found = wait_for_quiet(timeout, || {
            last = self.app_health();
            (last
                .as_ref()
                .is_some_and(|h| h.code == 200 && h.status == "healthy" && h.version == version))
            .then_some(())
        });
        if found.is_none() {
            panic!(
                "timed out after {:?} waiting until {what}; /health last said {last:?}\n{}",
                started.elapsed(),
                self.tails(30)
            );
        }
    }
}

/// What the coordinator knows about devices and rollouts, read from its HTTP API
/// (`/api/v1/…`, the same types `fleetctl … --json` prints). Cheap enough to poll.
impl Coordinator {
    /// `GET path` parsed as JSON; `None` when nothing answers or the answer is not a 200 with
    /// a `T`.
    pub fn api<T: serde::de::DeserializeOwned>(&self, path: &str) -> Option<T> {
        let (code, body) = http_get(self.http_port, path)?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// The registry (empty when the coordinator does not answer).
    pub fn devices(&self) -> Vec<DeviceView> {
        self.api("/api/v1/devices").unwrap_or_default()
    }

    /// One device's registry entry: what it last reported, as the coordinator sees it.
    pub fn device(&self, id: &str) -> Option<DeviceView> {
        self.devices().into_iter().find(|d| d.id.as_str() == id)
    }

    /// Every rollout's state block, newest first (refreshed every engine tick).
    pub fn rollouts(&self) -> Vec<RolloutState> {
        self.api("/api/v1/rollouts").unwrap_or_default()
    }

    pub fn rollout(&self, id: &str) -> Option<RolloutState> {
        self.rollouts()
            .into_iter()
            .find(|r| r.rollout.as_str() == id)
    }

    /// The audit trail of one device, oldest first.
    pub fn device_audit(&self, id: &str) -> Vec<AuditEntry> {
        self.api(&format!("/api/v1/audit?device={id}"))
            .unwrap_or_default()
    }
}

impl Agent {
    /// This device's registry entry at `coordinator`.
    pub fn registry_entry(&self, coordinator: &Coordinator) -> Option<DeviceView> {
        coordinator.device(&self.spec.id)
    }

    /// Waits until the coordinator's registry shows this device with `status`.
    #[track_caller]
    pub fn wait_registry_status(
        &self,
        coordinator: &Coordinator,
        status: DeviceStatus,
        timeout: Duration,
    ) -> DeviceView {
        let what = format!("{} to be {status:?} in the registry", self.spec.id);
        wait_for(timeout, &what, || {
            self.registry_entry(coordinator)
                .filter(|d| d.status == status)
        })
    }
}

/// Like [`wait_for`], but returns `None` on timeout so the caller can say more.
fn wait_for_quiet<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let started = Instant::now();
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The Child guard SIGKILLs the agent's process group; its app (a process group of its
        // own) dies by PR_SET_PDEATHSIG. Nothing here may panic: this also runs while a failed
        // test unwinds.
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

/// The agent's config file.
pub fn config(
    spec: &DeviceSpec,
    mqtt: &MqttEndpoint,
    release_key: &str,
    dir: &Path,
    app_port: u16,
) -> String {
    let quote = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut login = String::new();
    if let Some((user, password)) = &mqtt.credentials {
        // Infallible: writing to a String.
        let _ = write!(login, "username = \"{user}\"\npassword = \"{password}\"\n");
    }
    if let Some((ca, client)) = &mqtt.tls {
        let _ = writeln!(login, "ca = \"{}\"", ca.display());
        if let Some((cert, key)) = client {
            let _ = write!(
                login,
                "client_cert = \"{}\"\nclient_key = \"{}\"\n",
                cert.display(),
                key.display()
            );
        }
    }
    format!(
        r#"# Generated by fleet-e2e for device {id}.
log_level = "debug"

[device]
id = "{id}"
type = "{device_type}"
region = "{region}"
tags = [{tags}]

[mqtt]
host = "{host}"
port = {port}
{login}keep_alive = "5s"
reconnect_min = "100ms"
reconnect_max = "1s"

[trust]
keys = ["{release_key}"]

[paths]
root = "{root}"
state = "{state}"

[app]
runtime = "process"
port = {app_port}
stop_grace = "2s"
restart_backoff_min = "100ms"
restart_backoff_max = "500ms"
restart_reset = "10s"
crash_loop_window = "60s"

[fetch]
attempts = 4
retry_min = "100ms"
retry_max = "500ms"
min_rate_window = "5s"
connect_timeout = "5s"

[trial]
attempts = 2
failures_allowed = 3
restore_timeout = "20s"
hook_timeout = "10s"

[reports]
heartbeat_interval = "300ms"
health_timeout = "2s"
"#,
        id = spec.id,
        device_type = spec.device_type,
        region = spec.region,
        tags = quote(&spec.tags),
        host = mqtt.host,
        port = mqtt.port,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_device_its_broker_login_and_key() {
        let spec = DeviceSpec::new("rpi-1", "rpi4", "eu-west").tagged("spof");
        let text = config(
            &spec,
            &MqttEndpoint::with_login("127.0.0.1", 1884, "rpi-1", "pw-rpi-1"),
            &"ab".repeat(32),
            Path::new("/d"),
            9000,
        );
        assert!(text.contains(
            "id = \"rpi-1\"\ntype = \"rpi4\"\nregion = \"eu-west\"\ntags = [\"spof\"]\n"
        ));
        assert!(text.contains("port = 1884\nusername = \"rpi-1\"\npassword = \"pw-rpi-1\"\n"));
        assert!(text.contains(&format!("keys = [\"{}\"]", "ab".repeat(32))));
        assert!(text.contains("root = \"/d/root\"\nstate = \"/d/state\"\n"));
        assert!(text.contains("runtime = \"process\"\nport = 9000\n"));
        let anonymous = config(
            &spec,
            &MqttEndpoint::anonymous("127.0.0.1", 1883),
            &"ab".repeat(32),
            Path::new("/d"),
            9000,
        );
        assert!(!anonymous.contains("username"));
    }
}
