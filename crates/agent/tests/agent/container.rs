//! The `container` runtime against a real engine: the Debian package docker.io's `dockerd`,
//! started by each test with its own socket, data root and exec root under the test's temp
//! dir (`--iptables=false --bridge=none`: containers use the host's network), stopped on drop
//! with every container in it. Images are the real fleet-demo-app in a minimal root filesystem
//! (the binary and the glibc files `ldd` names, ≈ 8 MB) made with `docker import`, one per
//! version, `docker save`d into the release artifact and removed from the engine again, so
//! the agent's own load is what brings them back.
//!
//! Without dockerd these tests print `SKIPPED: …` and pass; under `FLEET_REQUIRE_E2E=1` they fail.

#[cfg(feature = "fault-points")]
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fleet_agent::snapshot::tree_digest;
use fleet_proto::SignedRelease;
use fleet_proto::device::{EventKind, Failure, RollbackReason};
use fleet_proto::hex::Sha256;
use fleet_proto::release::{Container, Release, RestartPolicy};

use crate::support::*;

/// A dockerd of the test's own.
struct Engine {
    child: Child,
    dir: tempfile::TempDir,
}

/// Why the engine is not there, or the engine.
fn engine() -> Option<Engine> {
    let skip = |why: &str| {
        assert!(
            !std::env::var("FLEET_REQUIRE_E2E").is_ok_and(|v| !v.is_empty() && v != "0"),
            "FLEET_REQUIRE_E2E is set, so this is a failure: {why}"
        );
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        // Past the harness's capture, like fleet-e2e's skips.
        let line = format!("SKIPPED: {why} [{test}]\n");
        if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
            let _ = std::io::Write::write_all(&mut tty, line.as_bytes());
        }
        eprint!("{line}");
        None
    };
    if !Path::new("/usr/sbin/dockerd").exists() || !Path::new("/usr/bin/docker").exists() {
        return skip("dockerd not installed (apt-get install -y docker.io)");
    }
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("the container engine needs root");
    }
    // Short paths: the engine's sockets must fit in sun_path.
    let dir = tempfile::Builder::new()
        .prefix("fd")
        .tempdir_in("/tmp")
        .unwrap();
    let p = |n: &str| dir.path().join(n);
    let log = std::fs::File::create(p("dockerd.log")).unwrap();
    let mut cmd = Command::new("/usr/sbin/dockerd");
    cmd.arg("--host")
        .arg(format!("unix://{}", p("docker.sock").display()))
        .arg("--data-root")
        .arg(p("data"))
        .arg("--exec-root")
        .arg(p("exec"))
        .arg("--pidfile")
        .arg(p("dockerd.pid"))
        .args(["--iptables=false", "--bridge=none", "--ip6tables=false"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    // SAFETY: prctl in the child before exec; only async-signal-safe calls.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn dockerd");
    let engine = Engine { child, dir };
    let ok = wait_until_opt(Duration::from_secs(60), || {
        engine.docker(&["version"]).status.success().then_some(())
    });
    if ok.is_none() {
        let log =
            std::fs::read_to_string(engine.dir.path().join("dockerd.log")).unwrap_or_default();
        panic!("dockerd did not come up; its log:\n{log}");
    }
    Some(engine)
}

fn wait_until_opt<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Engine {
    fn host(&self) -> String {
        format!("unix://{}", self.dir.path().join("docker.sock").display())
    }

    fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/docker")
            .env("DOCKER_HOST", self.host())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run docker")
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `docker inspect -f FORMAT NAME`, or `None` when there is no such object.
    fn inspect(&self, format: &str, name: &str) -> Option<String> {
        let out = self.docker(&["inspect", "-f", format, name]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The base root filesystem as a tarball: fleet-demo-app as /bin/app and the shared
    /// libraries it links, at the paths the loader looks for them.
    fn rootfs_tar(&self) -> PathBuf {
        let root = self.dir.path().join("rootfs");
        let app = demo_app();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        std::fs::copy(&app, root.join("bin/app")).unwrap();
        // The app's own dynamic loader lists what it loads. `ldd` asks the host's loader,
        // which cannot read an aarch64 build run under qemu-user (.ci/cross).
        let (lister, flag) = if cfg!(target_arch = "aarch64") {
            ("/lib/ld-linux-aarch64.so.1", Some("--list"))
        } else if cfg!(target_arch = "x86_64") {
            ("/lib64/ld-linux-x86-64.so.2", Some("--list"))
        } else {
            ("ldd", None)
        };
        let ldd = Command::new(lister)
            .args(flag)
            .arg(&app)
            .output()
            .expect("list the app's shared libraries");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let Some(lib) = line.split_whitespace().find(|w| w.starts_with('/')) else {
                continue;
            };
            let dest = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(lib, &dest).unwrap();
        }
        let tar = self.dir.path().join("rootfs.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success());
        tar
    }

    /// Makes image `demo:TAG` from the root filesystem.
    fn image(&self, rootfs: &Path, tag: &str) -> String {
        let name = format!("demo:{tag}");
        self.ok(&[
            "import",
            "-c",
            "ENTRYPOINT [\"/bin/app\"]",
            rootfs.to_str().unwrap(),
            &name,
        ]);
        self.ok(&["image", "inspect", "-f", "{{.Id}}", &name])
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Every container goes with the engine: remove them, then stop it (SIGTERM, bounded).
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
        // The daemon leaves its network namespace mounted under the exec root: without this
        // the temp dir cannot be removed.
        let netns = self.dir.path().join("exec/netns/default");
        if let Ok(c) = std::ffi::CString::new(netns.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a valid NUL-terminated path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("---- dockerd log (last lines) ----");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// One container version: the image it ships (saved into the artifact, or a broken tarball)
/// and the demo app's knobs.
struct Spec<'a> {
    version: &'a str,
    knobs: &'a [&'a str],
    /// Replace the image tarball with bytes the engine cannot load.
    broken_image: bool,
    entrypoint: &'a str,
    data_dir: Option<&'a Path>,
}

fn spec(version: &str) -> Spec<'_> {
    Spec {
        version,
        knobs: &[],
        broken_image: false,
        entrypoint: "",
        data_dir: None,
    }
}

/// Builds the image for `s`, saves it into a tar.gz artifact, removes it from the engine, and
/// signs a container release for it.
fn container_release(
    engine: &Engine,
    rootfs: &Path,
    dir: &Path,
    counter: u64,
    s: &Spec<'_>,
) -> (Release, SignedRelease, String) {
    let id = engine.image(rootfs, s.version);
    let image_tar = dir.join(format!("image-{}.tar", s.version));
    engine.ok(&[
        "save",
        "-o",
        image_tar.to_str().unwrap(),
        &format!("demo:{}", s.version),
    ]);
    engine.ok(&["rmi", &format!("demo:{}", s.version)]);
    let image_bytes = if s.broken_image {
        b"this is not a docker save tarball".to_vec()
    } else {
        std::fs::read(&image_tar).unwrap()
    };
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("image.tar", image_bytes),
        ("VERSION", s.version.as_bytes().to_vec()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data.as_slice()).unwrap();
    }
    let tar = b.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let bytes = gz.finish().unwrap();
    let path = dir.join(format!("release-{}.tar.gz", s.version));
    std::fs::write(&path, &bytes).unwrap();
    let v = version(s.version, &[]);
    let mut r = release(
        counter,
        &v,
        format!("file://{}", path.display()),
        Sha256::of(&bytes),
        bytes.len() as u64,
    );
    let mut args: Vec<String> = [
        "--port",
        "{port}",
        "--version",
        s.version,
        "--work-interval-ms",
        "20",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let mut volumes = Vec::new();
    if let Some(d) = s.data_dir {
        args.extend(["--data-dir".into(), "/data".into()]);
        volumes.push(format!("{}:/data", d.display()));
        r.data_dirs = vec![d.display().to_string()];
    }
    args.extend(s.knobs.iter().map(|k| k.to_string()));
    // The functional probe of the process releases runs a file of the slot; an image has none.
    r.probe = None;
    r.run.entrypoint = s.entrypoint.into();
    r.run.args = args;
    r.resources.disk_bytes = 1 << 20;
    r.trial.deadline = Duration::from_secs(20);
    // Long enough to outlive a run of the crash-looping version (it exits 0.3 s after binding).
    r.trial.good_probes = 8;
    r.container = Some(Container {
        image: format!("demo:{}", s.version),
        load: Some("image.tar".into()),
        image_id: (!s.broken_image).then(|| id.clone()),
        name: "fleet-demo".into(),
        network: Some("host".into()),
        ports: vec![],
        volumes,
        devices: vec![],
        restart: RestartPolicy::OnFailure,
    });
    let signed = SignedRelease::sign(&r, &key());
    (r, signed, id)
}

/// A device whose agent runs containers in `engine`.
fn container_agent(dev: &Device, engine: &Engine, extra: &[(&str, &str)]) -> Agent {
    let host = engine.host();
    let mut env = vec![
        ("FLEET_AGENT__APP__RUNTIME", "container"),
        ("FLEET_AGENT__APP__DOCKER_HOST", host.as_str()),
    ];
    env.extend_from_slice(extra);
    Agent::start(dev, &env)
}

fn committed(obs: &Observer, sequence: u64, what: &str) {
    obs.wait_event(what, PATIENCE, |e| {
        e.sequence == sequence && matches!(e.kind, EventKind::Committed { .. })
    });
}

fn rolled_back(obs: &Observer, sequence: u64) -> RollbackReason {
    let e = obs.wait_event("rolled back", PATIENCE, |e| {
        e.sequence == sequence && matches!(e.kind, EventKind::RolledBack { .. })
    });
    let EventKind::RolledBack { reason, restored } = e.kind else {
        unreachable!()
    };
    assert!(restored.is_some(), "a previous version was restored");
    reason
}

#[test]
fn container_releases_commit_and_a_crash_loop_rolls_back_to_the_tagged_image() {
    let started = Instant::now();
    let Some(engine) = engine() else { return };
    let rootfs = engine.rootfs_tar();
    let dev = Device::new("ctr", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = container_agent(&dev, &engine, &[]);

    // 1.0.0 then 2.0.0: loaded by the agent, run under one name, committed.
    let (_, s1, id1) = container_release(&engine, &rootfs, dev.dir.path(), 1, &spec("1.0.0"));
    obs.publish_desired(&desired(&dev.id, 1, Some(s1), 0));
    committed(&obs, 1, "1.0.0 committed");
    dev.wait_serving("1.0.0");
    assert_eq!(
        engine.inspect("{{.Image}}", "fleet-demo").as_deref(),
        Some(id1.as_str())
    );
    let (_, s2, id2) = container_release(&engine, &rootfs, dev.dir.path(), 2, &spec("2.0.0"));
    obs.publish_desired(&desired(&dev.id, 2, Some(s2), 0));
    committed(&obs, 2, "2.0.0 committed");
    dev.wait_serving("2.0.0");
    assert_eq!(
        engine.inspect("{{.Image}}", "fleet-demo").as_deref(),
        Some(id2.as_str())
    );
    assert_eq!(
        engine
            .inspect("{{.Id}}", "fleet-demo:fleet-rollback")
            .as_deref(),
        Some(id1.as_str()),
        "before the swap the running container's image was kept as the rollback image"
    );
    assert_eq!(
        engine
            .inspect("{{.HostConfig.RestartPolicy.Name}}", "fleet-demo")
            .as_deref(),
        Some("on-failure")
    );

    // 3.0.0 crash-loops under the engine's restart policy: the agent rolls back to the image
    // it tagged. 2.0.0's own tag is gone first: only the rollback tag can bring it back.
    let crash = Spec {
        knobs: &["--crash-after", "0.3"],
        ..spec("3.0.0")
    };
    let (_, s3, _) = container_release(&engine, &rootfs, dev.dir.path(), 3, &crash);
    // Untagged only (a running container holds the image itself).
    engine.ok(&["rmi", "-f", "demo:2.0.0"]);
    assert_eq!(engine.inspect("{{.Id}}", "demo:2.0.0"), None);
    obs.publish_desired(&desired(&dev.id, 3, Some(s3), 0));
    let reason = rolled_back(&obs, 3);
    assert!(
        matches!(
            reason,
            RollbackReason::CrashLoop { .. } | RollbackReason::CrashAtStart { .. }
        ),
        "{reason:?}"
    );
    dev.wait_serving("2.0.0");
    assert_eq!(
        engine.inspect("{{.Config.Image}}", "fleet-demo").as_deref(),
        Some("fleet-demo:fleet-rollback"),
        "the rollback started the rollback image"
    );
    assert_eq!(
        engine.inspect("{{.Image}}", "fleet-demo").as_deref(),
        Some(id2.as_str())
    );
    let state = wait_until("idle after the rollback", PATIENCE, || dev.idle_at(3));
    assert_eq!(
        state.running().map(|c| c.installed.version.as_str()),
        Some("2.0.0")
    );
    eprintln!(
        "container commit + crash-loop rollback: {:?}",
        started.elapsed()
    );
}

#[test]
fn images_that_fail_to_load_or_to_start_are_rolled_back() {
    let started = Instant::now();
    let Some(engine) = engine() else { return };
    let rootfs = engine.rootfs_tar();
    let dev = Device::new("ctr-bad", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = container_agent(&dev, &engine, &[]);
    let (_, s1, id1) = container_release(&engine, &rootfs, dev.dir.path(), 1, &spec("1.0.0"));
    obs.publish_desired(&desired(&dev.id, 1, Some(s1), 0));
    committed(&obs, 1, "1.0.0 committed");
    dev.wait_serving("1.0.0");
    let container = engine.inspect("{{.Id}}", "fleet-demo").unwrap();

    // An image the engine cannot load: the install fails, nothing is swapped, the running
    // container is never touched.
    let broken = Spec {
        broken_image: true,
        ..spec("2.0.0")
    };
    let (_, s2, _) = container_release(&engine, &rootfs, dev.dir.path(), 2, &broken);
    obs.publish_desired(&desired(&dev.id, 2, Some(s2), 0));
    let e = obs.wait_event("the load to fail", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Failed { .. })
    });
    let EventKind::Failed {
        reason: Failure::Install { detail },
    } = &e.kind
    else {
        panic!("{:?}", e.kind)
    };
    assert!(detail.contains("cannot load image demo:2.0.0"), "{detail}");
    assert_eq!(
        engine.inspect("{{.Id}}", "fleet-demo").as_deref(),
        Some(container.as_str())
    );
    dev.wait_serving("1.0.0");

    // An image whose entrypoint does not exist: the engine refuses to start it; the agent
    // rolls back and 1.0.0 runs again from the rollback image.
    let no_start = Spec {
        entrypoint: "/bin/missing",
        ..spec("3.0.0")
    };
    let (_, s3, _) = container_release(&engine, &rootfs, dev.dir.path(), 3, &no_start);
    obs.publish_desired(&desired(&dev.id, 3, Some(s3), 0));
    let reason = rolled_back(&obs, 3);
    assert!(
        matches!(reason, RollbackReason::CrashAtStart { .. }),
        "{reason:?}"
    );
    dev.wait_serving("1.0.0");
    assert_eq!(
        engine.inspect("{{.Image}}", "fleet-demo").as_deref(),
        Some(id1.as_str())
    );
    eprintln!("load failure + start failure: {:?}", started.elapsed());
}

#[test]
fn a_migration_rolled_back_leaves_the_previous_version_on_its_own_data() {
    let started = Instant::now();
    let Some(engine) = engine() else { return };
    let rootfs = engine.rootfs_tar();
    let dev = Device::new("ctr-data", broker());
    let data = dev.dir.path().join("app-data");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = container_agent(&dev, &engine, &[]);
    let v1 = Spec {
        data_dir: Some(&data),
        ..spec("1.0.0")
    };
    let (_, s1, _) = container_release(&engine, &rootfs, dev.dir.path(), 1, &v1);
    obs.publish_desired(&desired(&dev.id, 1, Some(s1), 0));
    committed(&obs, 1, "1.0.0 committed");
    dev.wait_serving("1.0.0");
    assert_eq!(std::fs::read_to_string(data.join("schema")).unwrap(), "1\n");
    std::fs::write(data.join("rows"), "a,b,c\n").unwrap();
    let before = tree_digest(&data).unwrap();

    // 2.0.0 migrates the data to schema 2, then fails its trial (wrong version).
    let v2 = Spec {
        data_dir: Some(&data),
        knobs: &["--migrate", "--report-version", "0.0.0"],
        ..spec("2.0.0")
    };
    let (_, s2, _) = container_release(&engine, &rootfs, dev.dir.path(), 2, &v2);
    obs.publish_desired(&desired(&dev.id, 2, Some(s2), 0));
    let reason = rolled_back(&obs, 2);
    assert!(
        matches!(reason, RollbackReason::WrongVersion { .. }),
        "{reason:?}"
    );
    // 1.0.0 (which refuses schema-2 data at start) serves again, on the data it left.
    dev.wait_serving("1.0.0");
    assert_eq!(
        tree_digest(&data).unwrap(),
        before,
        "the data equals its snapshot"
    );
    assert_eq!(std::fs::read_to_string(data.join("schema")).unwrap(), "1\n");
    assert!(!data.join("migrated-by").exists());
    wait_until("the snapshot dropped", PATIENCE, || {
        dev.idle_at(2)?;
        fleet_agent::snapshot::Store::new(&dev.state_dir())
            .list()
            .is_empty()
            .then_some(())
    });
    assert!(
        !obs.event_names().iter().any(|n| n == "Failed"),
        "{:?}",
        obs.event_names()
    );
    eprintln!("container data rollback: {:?}", started.elapsed());
}

/// kill -9 of the agent in the middle of a container swap: the restart resolves the journal
/// and ends on the complete new version.
#[cfg(feature = "fault-points")]
#[test]
fn a_power_cut_mid_swap_resolves_on_restart() {
    let started = Instant::now();
    let Some(engine) = engine() else { return };
    let rootfs = engine.rootfs_tar();
    let dev = Device::new("ctr-cut", broker());
    let data = dev.dir.path().join("app-data");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let v1 = Spec {
        data_dir: Some(&data),
        ..spec("1.0.0")
    };
    let (_, s1, _) = container_release(&engine, &rootfs, dev.dir.path(), 1, &v1);
    let agent = container_agent(&dev, &engine, &[]);
    obs.publish_desired(&desired(&dev.id, 1, Some(s1), 0));
    committed(&obs, 1, "1.0.0 committed");
    dev.wait_serving("1.0.0");
    drop(agent);
    let mut counter = 1;
    for (point, v) in [
        ("snapshot-done", "2.0.0"),
        ("swap-after-rename", "3.0.0"),
        ("trial-started", "4.0.0"),
    ] {
        counter += 1;
        let s = Spec {
            data_dir: Some(&data),
            knobs: &["--migrate"],
            ..spec(v)
        };
        let (_, signed, id) = container_release(&engine, &rootfs, dev.dir.path(), counter, &s);
        obs.publish_desired(&desired(&dev.id, counter, Some(signed), 0));
        let mut agent = container_agent(&dev, &engine, &[("FLEET_AGENT_FAULT", point)]);
        let status = agent
            .wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("the agent never reached {point}"));
        assert_eq!(status.signal(), Some(9), "{point}");
        let _again = container_agent(&dev, &engine, &[]);
        committed(
            &obs,
            counter,
            &format!("{v} committed after the cut at {point}"),
        );
        dev.wait_serving(v);
        assert_eq!(
            engine.inspect("{{.Image}}", "fleet-demo").as_deref(),
            Some(id.as_str())
        );
        assert_eq!(std::fs::read_to_string(data.join("schema")).unwrap(), "2\n");
        let state = wait_until("idle", PATIENCE, || dev.idle_at(counter));
        assert!(state.running().is_some());
    }
    eprintln!("container power cuts: {:?}", started.elapsed());
}
