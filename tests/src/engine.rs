//! A container engine per device, and container images of the real `fleet-demo-app`.
//!
//! An [`Engine`] is the Debian package docker.io's `dockerd`, started by the test with its
//! own socket, data root, exec root and pid file in a short directory under /tmp (the
//! engine's sockets must fit in `sun_path`), `--iptables=false --ip6tables=false
//! --bridge=none`: containers use the host's network and the agent's `{port}`, so devices on
//! one machine do not collide. Its log is in the test's directory. Dropping it removes every
//! container in it and stops it; if the test process dies, the kernel kills it
//! (`PR_SET_PDEATHSIG`, through [`Child`]).
//!
//! A [`DemoImage`] is the real fleet-demo-app in a minimal root filesystem (the binary and
//! the shared libraries its loader names) made with `docker import`, `docker save`d and
//! packed with `fleetctl artifact pack` as a release engineer would, then removed from the
//! engine that built it, so an agent's own load is what brings it onto a device.
//!
//! Design: `crates/agent/tests/agent/container.rs` has its own copy of the engine and image
//! helpers (it cannot depend on this crate, which runs the agent only as a binary); the two
//! could move into a small shared test-support crate.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::artifact::DemoArtifact;
use crate::fleet::{ContainerSection, ReleaseSpec, Releases};
use crate::prereq::{Outcome, REQUIRE_E2E, Skip};
use crate::process::{Child, binary, wait_for};

/// Where docker.io installs the daemon and its CLI.
const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";

/// How long an engine may take to answer after it starts (a loaded 2-core machine).
const ENGINE_START: Duration = Duration::from_secs(60);

/// A running `dockerd` of the test's own.
#[derive(Debug)]
pub struct Engine {
    name: String,
    child: Child,
    /// Socket, data root, exec root, pid file: short paths under /tmp.
    dir: tempfile::TempDir,
}

impl Engine {
    /// Why engines cannot run here, if they cannot.
    pub fn missing() -> Option<Skip> {
        let skip = |reason: &str| Some(Skip::new(reason, REQUIRE_E2E));
        if !Path::new(DOCKERD).is_file() || !Path::new(DOCKER).is_file() {
            return skip("dockerd not installed (apt-get install -y docker.io)");
        }
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return skip("a container engine needs root");
        }
        None
    }

    /// Starts an engine named `name` (its log is `<log_dir>/dockerd-NAME.stderr`) and waits
    /// until it answers. A visible skip without docker.io or root.
    #[track_caller]
    pub fn start(name: &str, log_dir: &Path) -> Outcome<Engine> {
        if let Some(skip) = Self::missing() {
            return Outcome::Skipped(skip);
        }
        let dir = tempfile::Builder::new()
            .prefix("fe-")
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("cannot create an engine directory in /tmp: {e}"));
        let p = |n: &str| dir.path().join(n);
        let mut cmd = Command::new(DOCKERD);
        cmd.arg("--host")
            .arg(format!("unix://{}", p("docker.sock").display()))
            .arg("--data-root")
            .arg(p("data"))
            .arg("--exec-root")
            .arg(p("exec"))
            .arg("--pidfile")
            .arg(p("dockerd.pid"))
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"]);
        let engine = Engine {
            name: name.to_owned(),
            child: Child::spawn(&format!("dockerd-{name}"), cmd, log_dir),
            dir,
        };
        let what = format!("the engine of {name} to answer");
        wait_for(ENGINE_START, &what, || {
            engine.docker(&["version"]).status.success().then_some(())
        });
        Outcome::Ready(engine)
    }

    /// One engine per name, started side by side.
    pub fn start_all(names: &[&str], log_dir: &Path) -> Outcome<Vec<Engine>> {
        if let Some(skip) = Self::missing() {
            return Outcome::Skipped(skip);
        }
        let starting: Vec<_> = names
            .iter()
            .map(|name| {
                let (name, log_dir) = ((*name).to_owned(), log_dir.to_owned());
                std::thread::spawn(move || Engine::start(&name, &log_dir).ready())
            })
            .collect();
        let engines = starting
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        Outcome::Ready(engines)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `unix:///…/docker.sock`: `DOCKER_HOST` for the CLI, `app.docker_host` for the agent.
    pub fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    /// The agent settings that run a device's app as a container in this engine.
    pub fn agent_env(&self) -> Vec<(String, String)> {
        vec![
            ("FLEET_AGENT__APP__RUNTIME".into(), "container".into()),
            ("FLEET_AGENT__APP__DOCKER_HOST".into(), self.host()),
        ]
    }

    /// Runs the docker CLI against this engine.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(DOCKER)
            .env("DOCKER_HOST", self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {DOCKER}: {e}"))
    }

    /// The CLI's stdout (trimmed); panics with its stderr when it fails.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {} (engine of {}): {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker inspect -f FORMAT OBJECT`, or `None` when there is no such container or image.
    pub fn inspect(&self, format: &str, object: &str) -> Option<String> {
        let out = self.docker(&["inspect", "-f", format, object]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The container called `name`, as the engine sees it.
    pub fn container(&self, name: &str) -> Option<ContainerView> {
        let line = self.inspect(
            "{{.Id}} {{.Image}} {{.Config.Image}} {{.State.Running}} {{.RestartCount}}",
            name,
        )?;
        let f: Vec<&str> = line.split_whitespace().collect();
        let [id, image_id, image, running, restarts] = f.as_slice() else {
            panic!("unexpected docker inspect output for {name}: {line:?}");
        };
        Some(ContainerView {
            id: (*id).to_owned(),
            image_id: (*image_id).to_owned(),
            image: (*image).to_owned(),
            running: *running == "true",
            restarts: restarts.parse().unwrap_or(u32::MAX),
        })
    }

    /// The names of the running containers (`docker ps`).
    pub fn running(&self) -> Vec<String> {
        self.ok(&["ps", "--format", "{{.Names}}"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Builds image `demo:VERSION` (the demo app with a `/VERSION` file, so each version has
    /// an image id of its own), saves it into `<desk>/image-VERSION/image.tar`, removes it
    /// from this engine, and packs that directory as the release's artifact.
    #[track_caller]
    pub fn demo_image(&self, releases: &Releases, version: &str) -> DemoImage {
        let desk = &releases.ctl.dir;
        let root = demo_rootfs(&desk.join("rootfs"));
        std::fs::write(root.join("VERSION"), format!("{version}\n"))
            .unwrap_or_else(|e| panic!("cannot write VERSION: {e}"));
        let rootfs_tar = desk.join(format!("rootfs-{version}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&rootfs_tar)
            .arg("."));
        let tag = format!("demo:{version}");
        self.ok(&[
            "import",
            "-c",
            "ENTRYPOINT [\"/bin/app\"]",
            path_arg(&rootfs_tar),
            &tag,
        ]);
        let id = self.ok(&["image", "inspect", "-f", "{{.Id}}", &tag]);
        let tree = desk.join(format!("image-{version}"));
        std::fs::create_dir_all(&tree)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", tree.display()));
        self.ok(&["save", "-o", path_arg(&tree.join("image.tar")), &tag]);
        self.ok(&["rmi", &tag]);
        let out = desk.join(format!("demo-image-{version}.tar.gz"));
        DemoImage {
            version: version.to_owned(),
            tag,
            id,
            artifact: DemoArtifact::pack_dir(releases, &tree, version, &out),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Nothing here may panic: this also runs while a failed test unwinds. Every container
        // goes with the engine (a container outlives a SIGKILLed dockerd in its shim), then the
        // engine stops on SIGTERM, SIGKILL after a bound.
        if let Ok(out) = Command::new(DOCKER)
            .env("DOCKER_HOST", self.host())
            .args(["ps", "-aq"])
            .stdin(Stdio::null())
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new(DOCKER)
                    .env("DOCKER_HOST", self.host())
                    .args(["rm", "-f", id])
                    .stdin(Stdio::null())
                    .output();
            }
        }
        self.child.stop(Duration::from_secs(20));
        // The daemon leaves its network namespace mounted under the exec root; the directory
        // cannot be removed while it is.
        let netns = self.dir.path().join("exec/netns/default");
        if let Ok(c) = std::ffi::CString::new(netns.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a valid NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// A container as `docker inspect` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerView {
    pub id: String,
    /// The id of the image it runs (`{{.Image}}`).
    pub image_id: String,
    /// The image reference it was created from (`{{.Config.Image}}`): an id, or e.g.
    /// `fleet-demo:fleet-rollback` after a rollback.
    pub image: String,
    pub running: bool,
    pub restarts: u32,
}

/// One version of the demo app as a container image, packed as a release artifact.
#[derive(Clone, Debug)]
pub struct DemoImage {
    pub version: String,
    /// `demo:VERSION`.
    pub tag: String,
    /// `sha256:…`; the same on every engine that loads the saved image.
    pub id: String,
    /// The tar.gz holding `image.tar` (`docker save`).
    pub artifact: DemoArtifact,
}

/// The name every version's container runs under (its rollback image is
/// `fleet-demo:fleet-rollback`).
pub const DEMO_CONTAINER: &str = "fleet-demo";

impl ReleaseSpec {
    /// A container release of `image`: the artifact at `url` (its `image.tar` loaded by the
    /// agent, the id pinned), run as container [`DEMO_CONTAINER`] on the host's network,
    /// restart policy `on-failure`, with `--port {port} --version VERSION KNOBS…`.
    pub fn demo_container(
        image: &DemoImage,
        counter: u64,
        url: &str,
        knobs: &[&str],
    ) -> ReleaseSpec {
        let mut spec =
            ReleaseSpec::demo_app(&image.version, counter, &image.artifact.stanza(url), knobs);
        // The image's own entrypoint (/bin/app).
        spec.entrypoint = String::new();
        spec.container = Some(ContainerSection {
            image: image.tag.clone(),
            load: Some("image.tar".into()),
            image_id: Some(image.id.clone()),
            name: DEMO_CONTAINER.into(),
            network: Some("host".into()),
            restart: "on-failure".into(),
        });
        spec
    }
}

/// `<root>`: the demo app as `/bin/app` and the shared libraries it links, at the paths its
/// loader looks for them (made once per desk).
#[track_caller]
fn demo_rootfs(root: &Path) -> PathBuf {
    let app_path = root.join("bin/app");
    if app_path.is_file() {
        return root.to_owned();
    }
    let app = binary("fleet-demo-app");
    for d in ["bin", "tmp"] {
        std::fs::create_dir_all(root.join(d))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.join(d).display()));
    }
    std::fs::copy(&app, &app_path).unwrap_or_else(|e| panic!("cannot copy the demo app: {e}"));
    // The app's own dynamic loader lists what it loads (`ldd` asks the host's loader, which
    // cannot read a cross build run under qemu-user).
    let mut list = if cfg!(target_arch = "aarch64") {
        let mut c = Command::new("/lib/ld-linux-aarch64.so.1");
        c.arg("--list");
        c
    } else if cfg!(target_arch = "x86_64") {
        let mut c = Command::new("/lib64/ld-linux-x86-64.so.2");
        c.arg("--list");
        c
    } else {
        Command::new("ldd")
    };
    let listed = run(list.arg(&app));
    for lib in listed
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("cannot copy {lib}: {e}"));
    }
    root.to_owned()
}

/// Runs `cmd` to completion; its stdout, or a panic with its stderr.
#[track_caller]
fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}
