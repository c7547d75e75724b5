//! One site for a scenario: a broker (the coordinator's embedded rumqttd, or a real mosquitto
//! with per-device ACL), the real `fleet-coordinator`, nine real `fleet-agent` processes (three
//! device types × two regions) each running the real `fleet-demo-app`, a release engineer's
//! desk (key pair, packed demo app) and an operator's `fleetctl`.

use std::time::Duration;

use fleet_e2e::*;
use fleet_proto::operator::{AuditEntry, DeviceStatus, DeviceView};
use fleet_proto::rollout::{Report, RolloutState, RolloutStatus};

/// The broker a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// rumqttd inside the coordinator process (the default deployment): no per-client ACL.
    Embedded,
    /// A real mosquitto started by the test: username = device id, and an ACL that lets each
    /// device write only under its own id.
    Mosquitto,
}

/// The fleet: (id, hardware type, region, tags). Three types × two regions; `jetson-1` and
/// `gw-2` are high-fidelity (preferred canaries), `gw-3` is a single point of failure (never a
/// canary).
pub const FLEET: &[(&str, &str, &str, &[&str])] = &[
    ("jetson-1", "jetson-orin", "eu-west", &["high-fidelity"]),
    ("jetson-2", "jetson-orin", "us-east", &[]),
    ("jetson-3", "jetson-orin", "eu-west", &[]),
    ("rpi-1", "rpi4", "eu-west", &[]),
    ("rpi-2", "rpi4", "us-east", &[]),
    ("rpi-3", "rpi4", "us-east", &[]),
    ("gw-1", "x86-gateway", "eu-west", &[]),
    ("gw-2", "x86-gateway", "us-east", &["high-fidelity"]),
    ("gw-3", "x86-gateway", "eu-west", &["spof"]),
];

/// Operators with a broker account on mosquitto; each has their own name in the audit trail.
pub const OPERATORS: &[&str] = &["alice", "bob", "carol"];

/// The coordinator's account on mosquitto.
const COORDINATOR_USER: &str = "coordinator";

/// Bound on anything a rollout waits for (install, soak, gate) on a loaded 2-core machine.
pub const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on devices (re)connecting and reporting.
pub const DEVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// The coordinator's settings: `FAST`.
fn coordinator_settings() -> Vec<(&'static str, &'static str)> {
    FAST.to_vec()
}

/// A running site. Fields drop in order: agents (and their apps) first, then the coordinator,
/// then the broker, then the directory (kept, with every log, when the test failed).
pub struct Site {
    pub agents: Vec<Agent>,
    pub coordinator: Coordinator,
    pub mosquitto: Option<Mosquitto>,
    /// Alice's fleetctl.
    pub ctl: Ctl,
    pub releases: Releases,
    /// The `[artifacts.ARCH]` stanza of the packed demo app, served by the coordinator.
    pub artifact: String,
    pub kind: BrokerKind,
    pub dir: TestDir,
}

impl Site {
    /// Starts everything and waits until every device is online with a health report. `None`
    /// when mosquitto is absent (a visible skip; a failure under `FLEET_REQUIRE_E2E=1`).
    pub fn start(kind: BrokerKind, label: &str) -> Option<Site> {
        let started = std::time::Instant::now();
        let dir = TestDir::new(&format!("{label}-{}", kind.label()));
        let releases = Releases::new(&dir, "mqtt://127.0.0.1:1");
        // Packing a debug build of the demo app takes seconds of CPU: do it while the
        // broker, the coordinator and the agents start.
        let packing = {
            let releases = Releases {
                ctl: releases.ctl.clone(),
                public_key: releases.public_key.clone(),
            };
            std::thread::spawn(move || DemoArtifact::pack(&releases))
        };

        let coordinator_dir = dir.subdir("coordinator");
        let settings = coordinator_settings();
        let (mosquitto, coordinator) = match kind {
            BrokerKind::Embedded => (
                None,
                Coordinator::start(&coordinator_dir, &releases.public_key, &settings),
            ),
            BrokerKind::Mosquitto => {
                let mut users: Vec<MqttUser> =
                    FLEET.iter().map(|d| MqttUser::device(d.0)).collect();
                users.push(MqttUser::coordinator(COORDINATOR_USER));
                users.extend(OPERATORS.iter().map(|o| MqttUser::operator(o)));
                let broker = Mosquitto::start(&dir.subdir("mosquitto"), &users).or_skip()?;
                let coordinator = Coordinator::start_external(
                    &coordinator_dir,
                    &releases.public_key,
                    &settings,
                    &broker.url(),
                    COORDINATOR_USER,
                    &broker.user(COORDINATOR_USER).password,
                    broker.port(),
                );
                (Some(broker), coordinator)
            }
        };

        let devices = dir.subdir("devices");
        let agents: Vec<Agent> = FLEET
            .iter()
            .map(|(id, device_type, region, tags)| {
                let mut spec = DeviceSpec::new(id, device_type, region);
                for t in *tags {
                    spec = spec.tagged(t);
                }
                let endpoint = match &mosquitto {
                    None => MqttEndpoint::anonymous("127.0.0.1", coordinator.mqtt_port),
                    Some(m) => {
                        MqttEndpoint::with_login(&m.host(), m.port(), id, &m.user(id).password)
                    }
                };
                Agent::start(&devices, spec, &endpoint, &releases.public_key)
            })
            .collect();

        let ctl = operator_ctl(&dir, kind, &coordinator, "alice");
        let packed = match packing.join() {
            Ok(packed) => packed,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        let url = packed.serve_from(&coordinator_dir.join("artifacts"), coordinator.http_port);
        let site = Site {
            agents,
            coordinator,
            mosquitto,
            ctl,
            releases,
            artifact: packed.stanza(&url),
            kind,
            dir,
        };
        site.wait_all_online();
        visible(&format!(
            "{label} ({}): site ready in {:.1} s ({} agents online)",
            kind.label(),
            started.elapsed().as_secs_f64(),
            FLEET.len()
        ));
        Some(site)
    }

    /// `fleetctl` as another operator (their own broker account on mosquitto).
    pub fn operator(&self, name: &str) -> Ctl {
        operator_ctl(&self.dir, self.kind, &self.coordinator, name)
    }

    pub fn agent(&self, id: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.id() == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    pub fn agent_mut(&mut self, id: &str) -> &mut Agent {
        self.agents
            .iter_mut()
            .find(|a| a.id() == id)
            .unwrap_or_else(|| panic!("no agent {id}"))
    }

    pub fn ids(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.id().to_owned()).collect()
    }

    /// A demo-app release with the scenario defaults: short soaks, waves 50/100 after the
    /// canary, a 20 s trial with 3 good probes 250 ms apart, default thresholds except p95.
    ///
    /// Design: the p95-latency trigger is set to +1000 %. The demo app's p95 is the compute
    /// time of a synthetic frame, a few ms; on two shared cores running nine agents, nine
    /// apps, a coordinator and parallel tests it was seen at 28 ms against a control of 12 ms
    /// for the same good release (+131 %, past the +10 ms floor too), which rolled a good
    /// canary back. The latency trigger is covered against controlled samples by the
    /// coordinator's own tests; these scenarios are about the others.
    pub fn spec(&self, version: &str, counter: u64, knobs: &[&str]) -> ReleaseSpec {
        let mut spec = ReleaseSpec::demo_app(version, counter, &self.artifact, knobs);
        spec.canary_soak = "2s";
        spec.wave_soak = "2s";
        spec.waves = "[50, 100]";
        spec.trial = "deadline = \"20s\"\ngood_probes = 3\nprobe_interval = \"250ms\"";
        spec.extra = "\n[thresholds]\np95_latency_pct = 1000.0\n".into();
        spec
    }

    /// Installs `1.0.0` (counter 1) on every device through a quick automatic rollout and
    /// waits until every app serves it. Most scenarios start from here: a device that has run
    /// nothing has nothing to roll back to.
    pub fn install_first_release(&self) {
        let started = std::time::Instant::now();
        let mut spec = self.spec("1.0.0", 1, &[]);
        spec.approval = "auto";
        spec.canary_soak = "1s";
        spec.wave_soak = "1s";
        spec.waves = "[100]";
        let manifest = self.releases.sign("v1", &spec);
        let out = self
            .ctl
            .run(&["rollout", "start", path(&manifest), "--watch"])
            .ok();
        assert!(
            out.contains(&format!("completed: {n} of {n} deployed", n = FLEET.len())),
            "{out}"
        );
        self.wait_all_serving("1.0.0");
        visible(&format!(
            "{}: 1.0.0 installed on {} devices in {:.1} s",
            self.kind.label(),
            FLEET.len(),
            started.elapsed().as_secs_f64()
        ));
    }

    /// Waits until every running agent's app answers healthy with `version`.
    pub fn wait_all_serving(&self, version: &str) {
        for a in &self.agents {
            a.wait_serving(version, ROLLOUT_TIMEOUT);
        }
    }

    /// The registry through the coordinator's HTTP API (cheap enough to poll).
    pub fn devices(&self) -> Vec<DeviceView> {
        self.coordinator.devices()
    }

    pub fn device(&self, id: &str) -> Option<DeviceView> {
        self.coordinator.device(id)
    }

    /// The registry as the operator sees it: `fleetctl devices --json`.
    pub fn ctl_devices(&self) -> Vec<DeviceView> {
        self.ctl.run(&["devices", "--json"]).json()
    }

    /// Waits until the registry has every device of [`FLEET`] online with its facts and a
    /// recent health report.
    pub fn wait_all_online(&self) {
        let ids = self.ids();
        wait_until(DEVICE_TIMEOUT, "every device online with health", || {
            let devices = self.devices();
            ids.iter().all(|id| {
                devices.iter().any(|d| {
                    d.id.as_str() == id
                        && d.status == DeviceStatus::Online
                        && d.facts.is_some()
                        && d.last_health.is_some()
                })
            })
        });
    }

    /// Waits until the registry shows `id` with `status`.
    #[track_caller]
    pub fn wait_device_status(&self, id: &str, status: DeviceStatus) -> DeviceView {
        self.agent(id)
            .wait_registry_status(&self.coordinator, status, DEVICE_TIMEOUT)
    }

    /// `fleetctl rollout start MANIFEST --json`: the new rollout's id.
    pub fn start_rollout(&self, manifest: &std::path::Path) -> String {
        let started: RolloutState = self
            .ctl
            .run(&["rollout", "start", path(manifest), "--json"])
            .json();
        started.rollout.to_string()
    }

    /// The rollout's state block from the coordinator's HTTP API (refreshed every tick).
    pub fn rollout(&self, id: &str) -> Option<RolloutState> {
        self.coordinator.rollout(id)
    }

    /// Waits until the rollout's state satisfies `pred`.
    #[track_caller]
    pub fn wait_rollout(
        &self,
        id: &str,
        what: &str,
        mut pred: impl FnMut(&RolloutState) -> bool,
    ) -> RolloutState {
        let mut last = None;
        let found = wait_for_or_none(ROLLOUT_TIMEOUT, || {
            last = self.rollout(id);
            last.clone().filter(|s| pred(s))
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {ROLLOUT_TIMEOUT:?} waiting until rollout {id} {what}; last state:\n{}\n{}",
                last.map(|s| s.render_block()).unwrap_or_default(),
                self.coordinator.child.tails(40)
            )
        })
    }

    #[track_caller]
    pub fn wait_status(&self, id: &str, status: RolloutStatus) -> RolloutState {
        self.wait_rollout(id, &format!("is {status}"), |s| s.status == status)
    }

    /// `fleetctl rollout status ID --json`.
    pub fn status(&self, id: &str) -> RolloutState {
        self.ctl.run(&["rollout", "status", id, "--json"]).json()
    }

    /// `fleetctl report ID --json`.
    pub fn report(&self, id: &str) -> Report {
        self.ctl.run(&["report", id, "--json"]).json()
    }

    /// `fleetctl audit --rollout ID --json`, oldest first.
    pub fn audit(&self, id: &str) -> Vec<AuditEntry> {
        self.ctl.run(&["audit", "--rollout", id, "--json"]).json()
    }

    /// Device ids running `version` according to their apps' `/health`.
    pub fn serving(&self, version: &str) -> Vec<String> {
        self.agents
            .iter()
            .filter(|a| a.serving().as_deref() == Some(version))
            .map(|a| a.id().to_owned())
            .collect()
    }

    /// The canary `fleetctl plan` shows for a manifest (the plan is deterministic: the same
    /// registry gives the same canary at `rollout start`).
    pub fn canary(&self, manifest: &std::path::Path) -> Vec<String> {
        let plan: fleet_proto::operator::Plan =
            self.ctl.run(&["plan", path(manifest), "--json"]).json();
        plan.waves[0]
            .devices
            .iter()
            .map(|d| d.to_string())
            .collect()
    }
}

impl BrokerKind {
    pub fn label(self) -> &'static str {
        match self {
            BrokerKind::Embedded => "embedded",
            BrokerKind::Mosquitto => "mosquitto",
        }
    }
}

fn operator_ctl(dir: &TestDir, kind: BrokerKind, coordinator: &Coordinator, name: &str) -> Ctl {
    let desk = dir.subdir(&format!("operator-{name}"));
    match kind {
        BrokerKind::Embedded => Ctl::new(&desk, &coordinator.broker_url(), name),
        BrokerKind::Mosquitto => {
            // The coordinator's external broker is where operators connect too.
            let port = coordinator.mqtt_port;
            let mut ctl = Ctl::new(&desk, &format!("mqtt://127.0.0.1:{port}"), name);
            ctl.extra_env
                .push(("FLEET_USERNAME".into(), name.to_owned()));
            ctl.extra_env
                .push(("FLEET_PASSWORD".into(), format!("pw-{name}")));
            ctl
        }
    }
}

pub fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

fn wait_for_or_none<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let started = std::time::Instant::now();
    let mut interval = Duration::from_millis(20);
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if started.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(200));
    }
}
