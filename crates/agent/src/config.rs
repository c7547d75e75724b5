//! The agent's configuration: one serde struct, loaded from a TOML file plus `FLEET_AGENT__…`
//! environment overrides by [`load`], typed on the way in (`Duration`, `DeviceId`, keys), so
//! nothing below `main` parses text. `deploy/agent.toml` is the commented reference and the
//! output of `fleet-agent print-default-config`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::{DeviceId, VerifyingKey};
use serde::{Deserialize, Deserializer};

/// The commented default configuration (`print-default-config`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../deploy/agent.toml");

/// Prefix of environment overrides: `FLEET_AGENT__MQTT__HOST=broker` sets `mqtt.host`.
pub const ENV_PREFIX: &str = "FLEET_AGENT";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub device: DeviceConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    pub trust: TrustConfig,
    pub paths: PathsConfig,
    #[serde(default)]
    pub app: AppConfig,
    #[serde(default)]
    pub fetch: FetchConfig,
    #[serde(default)]
    pub trial: TrialConfig,
    #[serde(default)]
    pub reports: ReportsConfig,
    /// Blue-green releases: how the traffic moves between two instances (issue 9).
    #[serde(default)]
    pub blue_green: BlueGreenConfig,
    /// `error`, `warn`, `info`, `debug` or `trace`; read by the binary only.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

/// Who this device is. Reported as `DeviceFacts` and matched against release targets.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Also the MQTT client id and the topic level.
    pub id: DeviceId,
    /// Hardware type, e.g. `rpi4`, `jetson-orin`; releases list the types they are built for.
    #[serde(rename = "type")]
    pub device_type: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The password in a file of its own (mode 0600, owned by the agent's user), instead of
    /// `password` in this config: the per-device secret `fleet-coordinator credential` makes.
    pub password_file: Option<PathBuf>,
    /// TLS: the CA that signed the broker's certificate (PEM). The only root trusted (system
    /// roots never are). Unset: plain TCP.
    pub ca: Option<PathBuf>,
    /// TLS client certificate and key (PEM), for a broker that requires one (mosquitto
    /// `require_certificate true`, `use_identity_as_username true`: its CN is the device id).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(deserialize_with = "duration")]
    pub keep_alive: Duration,
    /// Backoff between connection attempts: doubles from `reconnect_min` up to `reconnect_max`,
    /// with ±50 % jitter so a site's devices do not reconnect in lockstep after an outage.
    #[serde(deserialize_with = "duration")]
    pub reconnect_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            username: None,
            password: None,
            password_file: None,
            ca: None,
            client_cert: None,
            client_key: None,
            keep_alive: Duration::from_secs(30),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// Pinned ed25519 release keys, 64 hex digits each (two during a key rotation).
    #[serde(deserialize_with = "keys")]
    pub keys: Vec<VerifyingKey>,
    /// Clock skew tolerated at both ends of a release's validity window.
    #[serde(default = "default_skew", deserialize_with = "duration")]
    pub clock_skew: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// Holds `slot-a/`, `slot-b/`, the `active` symlink and `staging/`. Must be on one
    /// filesystem (the swap is a `rename`).
    pub root: PathBuf,
    /// Holds the journal, the event outbox and counters.
    pub state: PathBuf,
}

/// How the application runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// The agent starts the app from `active/` and supervises it.
    Process,
    /// `systemctl restart UNIT`; the unit runs `ROOT/app-exec`, which the agent writes.
    Systemd,
    /// A container through the Docker Engine API (`app.docker_host`); releases name an image.
    Container,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Systemd => "systemd",
            RuntimeKind::Container => "container",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    pub runtime: RuntimeKind,
    /// Given to the app as `FLEET_APP_PORT` and substituted for `{port}` in the release.
    pub port: u16,
    /// The unit the `systemd` runtime restarts.
    pub systemd_unit: String,
    /// SIGTERM, then SIGKILL after this long (process runtime).
    #[serde(deserialize_with = "duration")]
    pub stop_grace: Duration,
    /// Restart backoff of the process runtime: doubles from min to max, reset after the app
    /// has run for `restart_reset`.
    #[serde(deserialize_with = "duration")]
    pub restart_backoff_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub restart_backoff_max: Duration,
    #[serde(deserialize_with = "duration")]
    pub restart_reset: Duration,
    /// Crash-loop window used outside a trial (heartbeats); a release's thresholds win during one.
    #[serde(deserialize_with = "duration")]
    pub crash_loop_window: Duration,
    /// Process runtime: append the app's output to this file instead of the agent's stderr.
    pub log_file: Option<PathBuf>,
    /// Data directories the application owns, snapshotted before every swap and restored on a
    /// rollback, besides those a release names in `[data] dirs`. Absolute paths.
    pub data_dirs: Vec<PathBuf>,
    /// Container runtime: the engine's API socket, `unix:///PATH` (Docker, or podman's
    /// Docker-compatible service).
    pub docker_host: String,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            runtime: RuntimeKind::Process,
            port: 8080,
            systemd_unit: "fleet-app.service".into(),
            stop_grace: Duration::from_secs(10),
            restart_backoff_min: Duration::from_secs(1),
            restart_backoff_max: Duration::from_secs(30),
            restart_reset: Duration::from_secs(60),
            crash_loop_window: Duration::from_secs(300),
            log_file: None,
            data_dirs: Vec::new(),
            docker_host: "unix:///var/run/docker.sock".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// A download slower than this over `min_rate_window` is cut and retried (slow retrieval).
    pub min_rate_bytes_per_sec: u64,
    #[serde(deserialize_with = "duration")]
    pub min_rate_window: Duration,
    /// One attempt may not take longer than this.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// Attempts before the update fails with a download error (each resumes with Range).
    pub attempts: u32,
    #[serde(deserialize_with = "duration")]
    pub retry_min: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            min_rate_bytes_per_sec: 1024,
            min_rate_window: Duration::from_secs(30),
            deadline: Duration::from_secs(30 * 60),
            attempts: 5,
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrialConfig {
    /// Trials a release gets on this device, counting resumes after an agent restart: with 2,
    /// an agent that restarts mid-trial resumes once; the second restart rolls back.
    pub attempts: u32,
    /// Consecutive bad probes (no answer, unhealthy, failed functional probe) that roll back
    /// before the deadline. A wrong version rolls back at once.
    pub failures_allowed: u32,
    /// How long the previous version has to answer healthy after a rollback.
    #[serde(deserialize_with = "duration")]
    pub restore_timeout: Duration,
    /// Bound on `hooks/post-install`.
    #[serde(deserialize_with = "duration")]
    pub hook_timeout: Duration,
}

impl Default for TrialConfig {
    fn default() -> Self {
        TrialConfig {
            attempts: 2,
            failures_allowed: 3,
            restore_timeout: Duration::from_secs(60),
            hook_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportsConfig {
    /// Heartbeat interval until a desired state sets one.
    #[serde(deserialize_with = "duration")]
    pub heartbeat_interval: Duration,
    /// Events kept on disk while undelivered; past this the oldest is dropped (the coordinator
    /// sees the gap in `seq`).
    pub outbox_max: usize,
    /// Probe the app's health between heartbeats this often outside a trial.
    #[serde(deserialize_with = "duration")]
    pub health_timeout: Duration,
}

impl Default for ReportsConfig {
    fn default() -> Self {
        ReportsConfig {
            heartbeat_interval: Duration::from_secs(10),
            outbox_max: 1000,
            health_timeout: Duration::from_secs(2),
        }
    }
}

/// How a blue-green release's traffic moves from the old instance to the new one and back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchKind {
    /// No switch: blue-green releases are refused; the app listens on `app.port` itself.
    Off,
    /// The agent listens on `app.port` and forwards each new connection to the instance that
    /// has the traffic (`blue_green.port_a` or `port_b`).
    Forwarder,
    /// The agent runs `blue_green.command` to point the service at an instance's port.
    Command,
}

impl SwitchKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchKind::Off => "off",
            SwitchKind::Forwarder => "forwarder",
            SwitchKind::Command => "command",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlueGreenConfig {
    /// `off`, `forwarder` or `command`. Not `off`: every release's app listens on its slot's
    /// port (`port_a`, `port_b`) instead of `app.port`, which is the service's port.
    pub switch: SwitchKind,
    /// The port the instance running from `slot-a` (`slot-b`) listens on: its `FLEET_APP_PORT`
    /// and `{port}`. Two blue-green instances never share a port.
    pub port_a: u16,
    pub port_b: u16,
    /// The forwarder listens on `bind:app.port`.
    pub bind: std::net::IpAddr,
    /// The switch command and its arguments (`switch = "command"`); it runs with
    /// `FLEET_TARGET_PORT`, `FLEET_TARGET_SLOT` (`a`/`b`) and `FLEET_SERVICE_PORT` (`app.port`)
    /// in its environment and exits 0 once new connections reach the target.
    pub command: Vec<String>,
    /// A switch command still running after this long has failed (and is killed).
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// At the commit, the old instance is stopped once the connections it is serving through
    /// the forwarder have finished, or after this long.
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for BlueGreenConfig {
    fn default() -> Self {
        BlueGreenConfig {
            switch: SwitchKind::Off,
            port_a: 8081,
            port_b: 8082,
            bind: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            command: Vec::new(),
            command_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl BlueGreenConfig {
    /// The port of the instance that runs from `slot`.
    pub fn port(&self, slot: fleet_proto::device::Slot) -> u16 {
        match slot {
            fleet_proto::device::Slot::A => self.port_a,
            fleet_proto::device::Slot::B => self.port_b,
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

fn default_skew() -> Duration {
    Duration::from_secs(300)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    fleet_proto::time::parse_duration(&text).map_err(serde::de::Error::custom)
}

fn keys<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<VerifyingKey>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_key(t))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// Parses a public key written as 64 hex digits.
pub fn parse_key(text: &str) -> Result<VerifyingKey, String> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes)
        .map_err(|_| format!("release key {text:?} is not 64 hex digits"))?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| format!("release key {text:?} is not an ed25519 public key: {e}"))
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The message names the file and the key (the `config` crate's wording).
    #[error("invalid configuration {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: config::ConfigError,
    },
    #[error("invalid configuration {path}: {problem}")]
    Check { path: PathBuf, problem: String },
}

/// Loads `path` plus `FLEET_AGENT__SECTION__KEY` overrides from `env`, then checks what serde
/// cannot. `env` is passed in (not read here) so tests and fleet-sim need no process environment.
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let invalid = |source| ConfigError::Invalid {
        path: path.to_owned(),
        source,
    };
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("trust.keys")
                .with_list_parse_key("device.tags")
                .with_list_parse_key("app.data_dirs")
                .with_list_parse_key("blue_green.command")
                .try_parsing(true)
                .source(Some(env)),
        )
        .build()
        .map_err(invalid)?;
    let config: Config = built.try_deserialize().map_err(invalid)?;
    config.check().map_err(|problem| ConfigError::Check {
        path: path.to_owned(),
        problem,
    })?;
    Ok(config)
}

impl Config {
    /// A configuration with every optional key at its default: what fleet-sim builds in code
    /// (then adjusts `mqtt`, `app.port` and the timings).
    pub fn for_device(
        id: DeviceId,
        device_type: impl Into<String>,
        keys: Vec<VerifyingKey>,
        root: PathBuf,
        state: PathBuf,
    ) -> Config {
        Config {
            device: DeviceConfig {
                id,
                device_type: device_type.into(),
                region: String::new(),
                tags: Vec::new(),
            },
            mqtt: MqttConfig::default(),
            trust: TrustConfig {
                keys,
                clock_skew: default_skew(),
            },
            paths: PathsConfig { root, state },
            app: AppConfig::default(),
            fetch: FetchConfig::default(),
            trial: TrialConfig::default(),
            reports: ReportsConfig::default(),
            blue_green: BlueGreenConfig::default(),
            log_level: default_log_level(),
        }
    }

    /// Checks relations serde cannot express; each problem names its key.
    pub fn check(&self) -> Result<(), String> {
        if self.trust.keys.is_empty() {
            return Err("trust.keys: at least one release key is required".into());
        }
        if self.paths.root.is_relative() || self.paths.state.is_relative() {
            return Err("paths.root and paths.state must be absolute paths".into());
        }
        if self.device.device_type.trim().is_empty() {
            return Err("device.type must not be empty".into());
        }
        if self.trial.attempts == 0 {
            return Err("trial.attempts must be at least 1".into());
        }
        if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
            return Err("mqtt.password and mqtt.password_file: set one, not both".into());
        }
        let has_password = self.mqtt.password.is_some() || self.mqtt.password_file.is_some();
        if self.mqtt.username.is_some() != has_password {
            return Err(
                "mqtt.username and mqtt.password (or mqtt.password_file) go together: set both or neither"
                    .into(),
            );
        }
        if self.mqtt.client_cert.is_some() != self.mqtt.client_key.is_some() {
            return Err(
                "mqtt.client_cert and mqtt.client_key go together: set both or neither".into(),
            );
        }
        if self.mqtt.client_cert.is_some() && self.mqtt.ca.is_none() {
            return Err("mqtt.client_cert needs TLS: set mqtt.ca too".into());
        }
        if self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            return Err("mqtt.reconnect_min must not exceed mqtt.reconnect_max".into());
        }
        if let Some(d) = self
            .app
            .data_dirs
            .iter()
            .find(|d| d.is_relative() || d.parent().is_none())
        {
            return Err(format!(
                "app.data_dirs: {} must be an absolute directory path other than /",
                d.display()
            ));
        }
        let bg = &self.blue_green;
        if bg.switch != SwitchKind::Off {
            if self.app.runtime != RuntimeKind::Process {
                return Err(format!(
                    "blue_green.switch = \"{}\" needs app.runtime = \"process\" (the agent runs both instances); this config has app.runtime = \"{}\": set blue_green.switch = \"off\"",
                    bg.switch.as_str(),
                    self.app.runtime.as_str()
                ));
            }
            let ports = [bg.port_a, bg.port_b, self.app.port];
            if ports.contains(&0) || bg.port_a == bg.port_b || ports[..2].contains(&self.app.port) {
                return Err(format!(
                    "blue_green.port_a ({}), blue_green.port_b ({}) and app.port ({}) must be three different ports other than 0",
                    bg.port_a, bg.port_b, self.app.port
                ));
            }
        }
        if bg.switch == SwitchKind::Command && bg.command.is_empty() {
            return Err(
                "blue_green.command: set the switch command (program and arguments) for blue_green.switch = \"command\""
                    .into(),
            );
        }
        if crate::docker::socket_path(&self.app.docker_host).is_none() {
            return Err(format!(
                "app.docker_host: {:?} must be unix:///PATH (the engine's API socket)",
                self.app.docker_host
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn minimal() -> String {
        format!(
            "[device]\nid = \"cam-1\"\ntype = \"rpi4\"\n[trust]\nkeys = [\"{KEY}\"]\n[paths]\nroot = \"/tmp/r\"\nstate = \"/tmp/s\"\n"
        )
    }

    #[test]
    fn the_shipped_example_loads_once_a_release_key_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        // As shipped it names no key: an agent started from it must not run trusting nothing
        // (or, worse, a published test key).
        let path = write(dir.path(), DEFAULT_CONFIG);
        let err = load(&path, []).unwrap_err().to_string();
        assert!(
            err.contains("REPLACE-WITH-THE-CONTENT-OF-release.pub"),
            "{err}"
        );
        let path = write(
            dir.path(),
            &DEFAULT_CONFIG.replace("REPLACE-WITH-THE-CONTENT-OF-release.pub", KEY),
        );
        let c = load(&path, []).unwrap();
        assert_eq!(c.device.id.as_str(), "cam-001");
        assert_eq!(c.reports.heartbeat_interval, Duration::from_secs(10));
    }

    #[test]
    fn built_in_code_matches_the_file_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &minimal());
        let from_file = load(&path, []).unwrap();
        let key = parse_key(KEY).unwrap();
        let built = Config::for_device(
            DeviceId::new("cam-1").unwrap(),
            "rpi4",
            vec![key],
            "/tmp/r".into(),
            "/tmp/s".into(),
        );
        assert_eq!(format!("{built:?}"), format!("{from_file:?}"));
        built.check().unwrap();
    }

    #[test]
    fn env_overrides_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &minimal());
        let env = [
            ("FLEET_AGENT__MQTT__PORT".to_string(), "1999".to_string()),
            ("FLEET_AGENT__DEVICE__TAGS".into(), "a,b".into()),
            ("FLEET_AGENT__TRIAL__RESTORE_TIMEOUT".into(), "5s".into()),
            ("OTHER".into(), "x".into()),
        ];
        let c = load(&path, env).unwrap();
        assert_eq!(c.mqtt.port, 1999);
        assert_eq!(c.device.tags, ["a", "b"]);
        assert_eq!(c.trial.restore_timeout, Duration::from_secs(5));
    }

    #[test]
    fn mqtt_credentials_and_tls_keys_go_together() {
        let dir = tempfile::tempdir().unwrap();
        let bad = [
            ("[mqtt]\nusername = \"cam-1\"\n", "go together"),
            (
                "[mqtt]\nusername = \"cam-1\"\npassword = \"x\"\npassword_file = \"/s\"\n",
                "not both",
            ),
            (
                "[mqtt]\nca = \"/ca.pem\"\nclient_cert = \"/c.pem\"\n",
                "client_key",
            ),
            (
                "[mqtt]\nclient_cert = \"/c.pem\"\nclient_key = \"/c.key\"\n",
                "needs TLS",
            ),
        ];
        for (extra, want) in bad {
            let path = write(dir.path(), &(minimal() + extra));
            let err = load(&path, []).unwrap_err().to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let good = "[mqtt]\nusername = \"cam-1\"\npassword_file = \"/s\"\nca = \"/ca.pem\"\nclient_cert = \"/c.pem\"\nclient_key = \"/c.key\"\n";
        let path = write(dir.path(), &(minimal() + good));
        let c = load(&path, []).unwrap();
        assert_eq!(c.mqtt.ca.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(c.mqtt.password_file.as_deref(), Some(Path::new("/s")));
    }

    #[test]
    fn blue_green_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let bad = [
            (
                "[app]\nruntime = \"systemd\"\n[blue_green]\nswitch = \"forwarder\"\n",
                "blue_green.switch",
            ),
            (
                "[blue_green]\nswitch = \"forwarder\"\nport_a = 8080\n",
                "blue_green.port_a",
            ),
            ("[blue_green]\nswitch = \"command\"\n", "blue_green.command"),
            ("[blue_green]\nswitch = \"sometimes\"\n", "switch"),
        ];
        for (extra, want) in bad {
            let path = write(dir.path(), &(minimal() + extra));
            let err = load(&path, []).unwrap_err().to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
        let path = write(
            dir.path(),
            &(minimal() + "[blue_green]\nswitch = \"command\"\ncommand = [\"/bin/true\"]\n"),
        );
        let env = [(
            "FLEET_AGENT__BLUE_GREEN__COMMAND".to_string(),
            "/usr/bin/switch,--to".to_string(),
        )];
        let c = load(&path, env).unwrap();
        assert_eq!(c.blue_green.command, ["/usr/bin/switch", "--to"]);
        assert_eq!(c.blue_green.port(fleet_proto::device::Slot::B), 8082);
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), &(minimal() + "[app]\nbogus = 1\n"));
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("bogus"), "{err}");

        let path = write(dir.path(), &minimal().replace("cam-1", "cam/1"));
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("device.id") || err.contains("cam/1"), "{err}");

        let path = write(dir.path(), &(minimal() + "[mqtt]\nkeep_alive = \"soon\"\n"));
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("soon") && err.contains("keep_alive"), "{err}");

        let path = write(dir.path(), &minimal().replace(KEY, "abc"));
        let err = load(&path, []).unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
    }
}
