//! The fleet's own processes in a test: the `fleet-coordinator` binary, `fleetctl` runs, and
//! signed releases made the way a release engineer makes them (`fleetctl keygen`, `manifest
//! sign`, `artifact pack`).

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::process::{Child, TestDir, binary, free_port, wait_for};
use crate::testbed::Lab;

/// A running `fleet-coordinator` binary with its embedded broker (or pointed at an external one).
#[derive(Debug)]
pub struct Coordinator {
    pub child: Child,
    pub mqtt_port: u16,
    pub http_port: u16,
    /// The address its listeners are bound to: 127.0.0.1, or the lab's gateway.
    pub host: IpAddr,
    /// The test-bed lab whose namespace it runs in ([`Coordinator::start_in_lab`]).
    lab: Option<Lab>,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

/// Settings that make rollouts take seconds instead of hours.
pub const FAST: &[(&str, &str)] = &[
    ("DEVICES__HEARTBEAT_INTERVAL", "300ms"),
    ("DEVICES__OFFLINE_AFTER_INTERVALS", "10"),
    ("ROLLOUT__TICK", "100ms"),
    ("ROLLOUT__SILENT_AFTER_INTERVALS", "20"),
    ("ROLLOUT__INSTALL_TIMEOUT", "60s"),
    ("GATE__MIN_SAMPLES", "6"),
    ("GATE__MIN_CONTROL_SAMPLES", "6"),
    ("GATE__Z", "1.0"),
];

impl Coordinator {
    /// Starts the coordinator with its embedded broker on free ports, its database in `dir`,
    /// trusting `release_key` (hex), with `settings` as `FLEET_COORDINATOR__KEY=value`.
    pub fn start(dir: &Path, release_key: &str, settings: &[(&str, &str)]) -> Coordinator {
        let mqtt_port = free_port();
        Self::spawn(dir, mqtt_port, release_key, settings, Vec::new())
    }

    /// Starts the coordinator with its embedded broker inside `lab`'s network namespace, on the
    /// gateway address ([`Lab::GATEWAY`], MQTT port [`Coordinator::LAB_MQTT_PORT`], HTTP
    /// [`Coordinator::LAB_HTTP_PORT`]): the test bed's devices reach it over the lab bridge and
    /// no traffic leaves namespaces the test made. Reach it from the test with
    /// [`Ctl::in_lab`] or [`Lab::in_netns`].
    pub fn start_in_lab(
        dir: &Path,
        release_key: &str,
        settings: &[(&str, &str)],
        lab: &Lab,
    ) -> Coordinator {
        Self::spawn_at(
            dir,
            Self::LAB_MQTT_PORT,
            Self::LAB_HTTP_PORT,
            IpAddr::V4(Lab::GATEWAY),
            Some(lab.clone()),
            release_key,
            settings,
            Vec::new(),
        )
    }

    /// Starts the coordinator against an external broker (e.g. mosquitto) as user `user`.
    pub fn start_external(
        dir: &Path,
        release_key: &str,
        settings: &[(&str, &str)],
        broker_url: &str,
        user: &str,
        password: &str,
        broker_port: u16,
    ) -> Coordinator {
        let extra = vec![
            ("BROKER__MODE".to_owned(), "external".to_owned()),
            ("BROKER__URL".to_owned(), broker_url.to_owned()),
            ("BROKER__USERNAME".to_owned(), user.to_owned()),
            ("BROKER__PASSWORD".to_owned(), password.to_owned()),
        ];
        Self::spawn(dir, broker_port, release_key, settings, extra)
    }

    /// The embedded broker's port in a lab (the namespace is the test's own: no clashes).
    pub const LAB_MQTT_PORT: u16 = 1883;
    /// The HTTP port (artifacts, metrics) in a lab.
    pub const LAB_HTTP_PORT: u16 = 8080;

    fn spawn(
        dir: &Path,
        mqtt_port: u16,
        release_key: &str,
        settings: &[(&str, &str)],
        extra: Vec<(String, String)>,
    ) -> Coordinator {
        let http_port = free_port();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Self::spawn_at(
            dir,
            mqtt_port,
            http_port,
            localhost,
            None,
            release_key,
            settings,
            extra,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_at(
        dir: &Path,
        mqtt_port: u16,
        http_port: u16,
        host: IpAddr,
        lab: Option<Lab>,
        release_key: &str,
        settings: &[(&str, &str)],
        extra: Vec<(String, String)>,
    ) -> Coordinator {
        let mut env: Vec<(String, String)> = vec![
            ("BROKER__LISTEN".into(), format!("{host}:{mqtt_port}")),
            ("HTTP__LISTEN".into(), format!("{host}:{http_port}")),
            (
                "DATABASE__PATH".into(),
                dir.join("registry.db").display().to_string(),
            ),
            (
                "HTTP__ARTIFACTS_DIR".into(),
                dir.join("artifacts").display().to_string(),
            ),
            ("RELEASE_KEYS".into(), release_key.to_owned()),
        ];
        env.extend(
            settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env.extend(extra);
        let mut c = Coordinator {
            child: Self::launch(dir, &env, lab.as_ref()),
            mqtt_port,
            http_port,
            host,
            lab,
            dir: dir.to_owned(),
            env,
        };
        c.wait_ready();
        c
    }

    fn launch(dir: &Path, env: &[(String, String)], lab: Option<&Lab>) -> Child {
        let mut cmd = match lab {
            Some(lab) => lab.command(binary("fleet-coordinator")),
            None => Command::new(binary("fleet-coordinator")),
        };
        cmd.current_dir(dir)
            .env("FLEET_LOG", "info,fleet_coordinator=debug");
        for (k, v) in env {
            cmd.env(format!("FLEET_COORDINATOR__{k}"), v);
        }
        Child::spawn("coordinator", cmd, dir)
    }

    fn wait_ready(&mut self) {
        wait_for(
            Duration::from_secs(30),
            "the coordinator's /metrics",
            || self.get("/metrics").filter(|(code, _)| *code == 200),
        );
    }

    /// kill -9, then start again on the same ports and database.
    pub fn kill_and_restart(&mut self) {
        self.child.kill();
        self.child = Self::launch(&self.dir, &self.env, self.lab.as_ref());
        self.wait_ready();
    }

    /// GET `path` from the coordinator's HTTP listener (from inside its lab if it runs in one).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let addr = SocketAddr::new(self.host, self.http_port);
        match &self.lab {
            Some(lab) => lab.in_netns(|| http_get_at(addr, path)),
            None => http_get_at(addr, path),
        }
    }

    pub fn metrics(&self) -> String {
        self.get("/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// One metric's value, e.g. `fleet_decode_errors_total{kind="heartbeat"}`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok()).flatten()
        })
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://{}:{}", self.host, self.mqtt_port)
    }

    /// The URL devices download an artifact from: `http://HOST:PORT/artifacts/SHA256`.
    pub fn artifact_url(&self, sha256: &str) -> String {
        format!("http://{}:{}/artifacts/{sha256}", self.host, self.http_port)
    }

    /// Where the coordinator serves artifacts from (`http.artifacts_dir`).
    pub fn artifacts_dir(&self) -> PathBuf {
        self.dir.join("artifacts")
    }
}

/// A minimal HTTP GET on 127.0.0.1: `(status, body)`, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get_at(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port), path)
}

/// A minimal HTTP GET on `addr`: `(status, body)`, or `None` when nothing answers.
pub fn http_get_at(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        addr.ip()
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

/// What one `fleetctl` run printed.
#[derive(Debug)]
pub struct CtlRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CtlRun {
    #[track_caller]
    pub fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "fleetctl failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    #[track_caller]
    pub fn fails(self, code: i32) -> CtlRun {
        assert_eq!(
            self.code,
            Some(code),
            "fleetctl:\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn json<T: DeserializeOwned>(self) -> T {
        let out = self.ok();
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("fleetctl printed no JSON ({e}):\n{out}"))
    }
}

/// `fleetctl` as an operator runs it: in a working directory, against one broker, as one name.
#[derive(Clone, Debug)]
pub struct Ctl {
    pub dir: PathBuf,
    pub broker: String,
    pub operator: String,
    pub extra_env: Vec<(String, String)>,
    /// The network namespace fleetctl runs in ([`Ctl::in_lab`]); the host's when `None`.
    netns: Option<String>,
}

impl Ctl {
    pub fn new(dir: &Path, broker: &str, operator: &str) -> Ctl {
        Ctl {
            dir: dir.to_owned(),
            broker: broker.to_owned(),
            operator: operator.to_owned(),
            extra_env: Vec::new(),
            netns: None,
        }
    }

    /// Runs fleetctl inside `lab`'s network namespace (`ip netns exec`), where a coordinator
    /// started with [`Coordinator::start_in_lab`] listens.
    pub fn in_lab(mut self, lab: &Lab) -> Ctl {
        self.netns = Some(lab.name().to_owned());
        self
    }

    pub fn run(&self, args: &[&str]) -> CtlRun {
        self.run_with_timeout(args, Duration::from_secs(120))
    }

    pub fn run_with_timeout(&self, args: &[&str], limit: Duration) -> CtlRun {
        let mut cmd = match &self.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", netns]).arg(binary("fleetctl"));
                cmd
            }
            None => Command::new(binary("fleetctl")),
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .env("XDG_CONFIG_HOME", &self.dir)
            .env_remove("FLEET_BROKER")
            .env_remove("FLEET_OPERATOR")
            .env("FLEET_TIMEOUT", "20s");
        // Empty: left to fleetctl's config file and defaults.
        if !self.broker.is_empty() {
            cmd.env("FLEET_BROKER", &self.broker);
        }
        if !self.operator.is_empty() {
            cmd.env("FLEET_OPERATOR", &self.operator);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let out = run_bounded(cmd, limit, &format!("fleetctl {}", args.join(" ")));
        CtlRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// Runs a command to completion, killing it (and failing loudly) after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Output {
    use std::process::Stdio;
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child =
        crate::process::spawn_tied(cmd).unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_end(&mut o);
        }
        o
    });
    let err_reader = std::thread::spawn(move || {
        let mut e = Vec::new();
        if let Some(s) = err.as_mut() {
            let _ = s.read_to_end(&mut e);
        }
        e
    });
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap_or(None) {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// A release engineer's desk: a key pair made by `fleetctl keygen`, manifests signed with
/// `fleetctl manifest sign`.
#[derive(Debug)]
pub struct Releases {
    pub ctl: Ctl,
    pub public_key: String,
}

/// What changes between test releases; everything else has test defaults.
#[derive(Clone, Debug)]
pub struct ReleaseSpec {
    pub name: String,
    pub version: String,
    pub counter: u64,
    pub rollback_to: Option<(u64, String)>,
    pub hardware: Vec<String>,
    /// `[artifacts.ARCH]` stanzas (from `fleetctl artifact pack`), or a placeholder.
    pub artifacts: String,
    pub entrypoint: String,
    pub args: Vec<String>,
    pub memory_mb: u64,
    pub approval: &'static str,
    pub canary_soak: &'static str,
    pub wave_soak: &'static str,
    pub waves: &'static str,
    pub trial: &'static str,
    pub extra: String,
    /// `[container]`: a release for the agent's `container` runtime.
    pub container: Option<ContainerSection>,
}

/// A container release's `[container]` section (the keys of `deploy/manifests/container.toml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSection {
    /// `repository:tag` or an image id.
    pub image: String,
    /// The `docker save` tarball inside the artifact.
    pub load: Option<String>,
    /// The id the image must have.
    pub image_id: Option<String>,
    /// The container's name; its rollback image is `NAME:fleet-rollback`.
    pub name: String,
    pub network: Option<String>,
    /// `no`, `on-failure`, `always` or `unless-stopped`.
    pub restart: String,
}

impl ContainerSection {
    pub fn toml(&self) -> String {
        let mut t = format!("[container]\nimage = \"{}\"\n", self.image);
        let optional = [
            ("load", &self.load),
            ("image_id", &self.image_id),
            ("network", &self.network),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                t.push_str(&format!("{key} = \"{v}\"\n"));
            }
        }
        t.push_str(&format!(
            "name = \"{}\"\nrestart = \"{}\"\n",
            self.name, self.restart
        ));
        t
    }
}

impl ReleaseSpec {
    pub fn new(version: &str, counter: u64) -> ReleaseSpec {
        let arch = std::env::consts::ARCH;
        ReleaseSpec {
            name: "demo".into(),
            version: version.into(),
            counter,
            rollback_to: None,
            hardware: vec!["jetson-orin".into(), "rpi4".into(), "x86-gateway".into()],
            artifacts: format!(
                "[artifacts.{arch}]\nurl = \"file:///nonexistent/demo-{version}.tar.gz\"\nsha256 = \"{}\"\nsize = 1000\n",
                "ab".repeat(32)
            ),
            entrypoint: "bin/app".into(),
            args: vec!["--port".into(), "{port}".into()],
            memory_mb: 64,
            approval: "manual",
            canary_soak: "3s",
            wave_soak: "3s",
            waves: "[50, 100]",
            trial: "deadline = \"30s\"\ngood_probes = 3\nprobe_interval = \"500ms\"",
            extra: String::new(),
            container: None,
        }
    }

    pub fn toml(&self) -> String {
        let rollback = self
            .rollback_to
            .as_ref()
            .map(|(c, v)| format!("rollback_to = {{ counter = {c}, version = \"{v}\" }}\n"))
            .unwrap_or_default();
        let quote = |v: &[String]| {
            v.iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "[release]\nname = \"{name}\"\nversion = \"{version}\"\ncounter = {counter}\nexpires = \"2099-01-01T00:00:00Z\"\nhardware = [{hardware}]\n{rollback}\n{artifacts}\n{container}[run]\nentrypoint = \"{entry}\"\nargs = [{args}]\n\n[resources]\ndisk_mb = 1\nmemory_mb = {memory}\n\n[health]\nendpoint = \"http://127.0.0.1:{{port}}/health\"\ntimeout = \"1s\"\n\n[trial]\n{trial}\n\n[strategy]\napproval = \"{approval}\"\ncanary_soak = \"{canary}\"\nwave_soak = \"{wave}\"\nwaves = {waves}\n{extra}",
            name = self.name,
            version = self.version,
            counter = self.counter,
            hardware = quote(&self.hardware),
            artifacts = self.artifacts,
            container = self
                .container
                .as_ref()
                .map(|c| c.toml() + "\n")
                .unwrap_or_default(),
            entry = self.entrypoint,
            args = quote(&self.args),
            memory = self.memory_mb,
            trial = self.trial,
            approval = self.approval,
            canary = self.canary_soak,
            wave = self.wave_soak,
            waves = self.waves,
            extra = self.extra,
        )
    }
}

impl Releases {
    /// Makes a key pair with `fleetctl keygen` in `dir`.
    pub fn new(dir: &TestDir, broker: &str) -> Releases {
        let ctl = Ctl::new(&dir.subdir("releases"), broker, "release-engineer");
        ctl.run(&["keygen"]).ok();
        let public_key = std::fs::read_to_string(ctl.dir.join("release.pub"))
            .unwrap_or_else(|e| panic!("fleetctl keygen wrote no release.pub: {e}"))
            .trim()
            .to_owned();
        Releases { ctl, public_key }
    }

    /// Writes `FILE.toml` from `spec`, signs it, and returns the manifest's path.
    pub fn sign(&self, file: &str, spec: &ReleaseSpec) -> PathBuf {
        let manifest = self.ctl.dir.join(format!("{file}.toml"));
        std::fs::write(&manifest, spec.toml())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", manifest.display()));
        self.ctl
            .run(&[
                "manifest",
                "sign",
                manifest.to_str().unwrap_or_default(),
                "--key",
                "release.key",
            ])
            .ok();
        manifest
    }
}
