//! A site in one process: the coordinator with its embedded broker and a temporary SQLite
//! registry, and real agents (the agent library), each with its own slot directories, its own
//! application port and a real `fleet-demo-app` child process once a release is installed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use fleet_proto::{DeviceId, SigningKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running agent: the sender that stops it and its task.
type Running = (
    oneshot::Sender<()>,
    JoinHandle<Result<(), fleet_agent::Error>>,
);

/// One simulated device: an agent task and what it needs to be restarted on the same disk.
#[derive(Debug)]
pub struct Device {
    pub id: DeviceId,
    pub device_type: String,
    pub region: String,
    pub config: fleet_agent::Config,
    running: Option<Running>,
}

impl Device {
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts (or restarts) the agent on its existing directories.
    pub fn start(&mut self) {
        if self.running.is_some() {
            return;
        }
        let (tx, rx) = oneshot::channel::<()>();
        let config = self.config.clone();
        let task = tokio::spawn(async move {
            fleet_agent::run(config, async {
                let _ = rx.await;
            })
            .await
        });
        self.running = Some((tx, task));
    }

    /// Stops the agent (and with it the application it supervises).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some((tx, task)) = self.running.take() {
            let _ = tx.send(());
            task.await
                .context("agent task panicked")?
                .with_context(|| format!("agent {} failed", self.id))?;
        }
        Ok(())
    }
}

/// How the site's devices look.
#[derive(Clone, Debug)]
pub struct Layout {
    pub devices: usize,
    pub types: Vec<(&'static str, &'static str)>,
    pub regions: Vec<&'static str>,
    pub report_interval: Duration,
    /// Give every agent a blue-green traffic switch: the built-in forwarder on its service
    /// port (`app.port`), its two instances on ports of their own.
    pub blue_green: bool,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            devices: 24,
            // (device type, id prefix)
            types: vec![
                ("jetson-orin", "orin"),
                ("rpi4", "rpi4"),
                ("x86-gateway", "gw"),
            ],
            regions: vec!["eu-west", "us-east"],
            report_interval: Duration::from_millis(500),
            blue_green: false,
        }
    }
}

/// The coordinator and the devices.
pub struct Site {
    pub dir: PathBuf,
    pub coordinator: fleet_coordinator::Running,
    pub broker: SocketAddr,
    pub http: SocketAddr,
    pub artifacts: PathBuf,
    pub key: SigningKey,
    pub devices: BTreeMap<DeviceId, Device>,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("dir", &self.dir)
            .field("broker", &self.broker)
            .field("devices", &self.devices.len())
            .finish()
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Site {
    /// Starts the coordinator in `dir` and creates (but does not start) the devices.
    pub async fn create(dir: &Path, layout: &Layout, key: SigningKey) -> anyhow::Result<Site> {
        let artifacts = dir.join("artifacts");
        std::fs::create_dir_all(&artifacts)?;
        let public = hex::encode(key.verifying_key().to_bytes());
        let interval = humantime::format_duration(layout.report_interval).to_string();
        let settings: Vec<(&str, String)> = vec![
            ("BROKER__LISTEN", "127.0.0.1:0".into()),
            ("HTTP__LISTEN", "127.0.0.1:0".into()),
            (
                "DATABASE__PATH",
                dir.join("registry.db").display().to_string(),
            ),
            ("HTTP__ARTIFACTS_DIR", artifacts.display().to_string()),
            ("RELEASE_KEYS", public),
            // Seconds instead of minutes, so the demo fits in two.
            ("DEVICES__HEARTBEAT_INTERVAL", interval),
            ("DEVICES__OFFLINE_AFTER_INTERVALS", "4".into()),
            ("ROLLOUT__TICK", "100ms".into()),
            ("ROLLOUT__SILENT_AFTER_INTERVALS", "20".into()),
            ("ROLLOUT__INSTALL_TIMEOUT", "60s".into()),
            ("GATE__MIN_SAMPLES", "8".into()),
            ("GATE__MIN_CONTROL_SAMPLES", "8".into()),
            ("GATE__Z", "1.0".into()),
        ];
        let env = settings
            .into_iter()
            .map(|(k, v)| (format!("FLEET_COORDINATOR__{k}"), v));
        let config = fleet_coordinator::Config::from_sources(None, env)?;
        let coordinator = fleet_coordinator::start(config).await?;
        let broker = coordinator
            .mqtt_addr
            .context("the demo's coordinator runs the embedded broker")?;
        let http = coordinator.http_addr;

        let mut devices = BTreeMap::new();
        let per_type = layout.devices.div_ceil(layout.types.len());
        for i in 0..layout.devices {
            let (device_type, prefix) = layout.types[i % layout.types.len()];
            let n = i / layout.types.len() + 1;
            let id = DeviceId::new(format!("{prefix}-{n:02}"))?;
            let region = layout.regions[n % layout.regions.len()];
            let mut tags = vec!["camera".to_owned()];
            // A few devices are closest to production traffic: the canary prefers them.
            if n == 1 || n == per_type {
                tags.push("high-fidelity".into());
            }
            // One device is a single point of failure: never in a canary.
            if i == 4 {
                tags.push("spof".into());
            }
            let home = dir.join("devices").join(id.as_str());
            let mut config = fleet_agent::Config::for_device(
                id.clone(),
                device_type,
                vec![key.verifying_key()],
                home.join("app"),
                home.join("state"),
            );
            config.device.region = region.into();
            config.device.tags = tags;
            config.mqtt.host = broker.ip().to_string();
            config.mqtt.port = broker.port();
            config.mqtt.reconnect_min = Duration::from_millis(200);
            config.mqtt.reconnect_max = Duration::from_secs(2);
            config.app.port = free_port()?;
            config.app.stop_grace = Duration::from_secs(2);
            // Twenty-four apps writing to one terminal would bury the story.
            config.app.log_file = Some(home.join("app.log"));
            config.app.restart_backoff_min = Duration::from_millis(200);
            config.app.restart_backoff_max = Duration::from_secs(2);
            config.reports.heartbeat_interval = layout.report_interval;
            config.reports.health_timeout = Duration::from_millis(500);
            config.trial.restore_timeout = Duration::from_secs(20);
            config.fetch.retry_min = Duration::from_millis(200);
            config.fetch.retry_max = Duration::from_secs(2);
            if layout.blue_green {
                config.blue_green.switch = fleet_agent::config::SwitchKind::Forwarder;
                config.blue_green.port_a = free_port()?;
                config.blue_green.port_b = free_port()?;
                config.blue_green.bind = std::net::Ipv4Addr::LOCALHOST.into();
                config.blue_green.drain_timeout = Duration::from_secs(5);
            }
            devices.insert(
                id.clone(),
                Device {
                    id,
                    device_type: device_type.into(),
                    region: region.into(),
                    config,
                    running: None,
                },
            );
        }
        Ok(Site {
            dir: dir.to_owned(),
            coordinator,
            broker,
            http,
            artifacts,
            key,
            devices,
        })
    }

    /// Stops every agent (their applications stop with them), then the coordinator.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for device in self.devices.values_mut() {
            device.stop().await?;
        }
        self.coordinator.stop().await
    }
}
