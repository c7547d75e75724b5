//! `fleet-sim demo` end to end, as README's first command runs it (with fewer devices): both
//! outcomes shown, both reports printed, nothing left behind.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_shows_a_good_and_a_bad_release_and_cleans_up() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(["demo", "--devices", "9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the demo if it overruns, so a hang fails this test instead of the whole run.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(300) {
            std::thread::sleep(Duration::from_millis(200));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    let _ = watchdog.join();
    assert!(
        status.success(),
        "demo failed ({status})\nstdout:\n{out}\nstderr:\n{err}"
    );

    for fact in [
        "9 agents online",
        "rpi4-03 went offline",
        "== 1. a good release: demo-app 1.0.0",
        "canary gate passed; approval is automatic in this demo",
        "completed: 8 deployed, 1 skipped (rpi4-03 was offline)",
        "rpi4-03 caught up: committed 1.0.0",
        "fleet: 9 on 1.0.0",
        "== 2. a bad release: demo-app 2.0.0",
        "halted and rolled back; fleet: 9 on 1.0.0",
        "== Fleet Deployment Report: r-1",
        "== Fleet Deployment Report: r-2",
        "only rpi4 devices failed: a compatibility problem with that device type",
        "<fleet-deploy-state>",
        "status: halted",
        "== audit:",
        "stopped every agent and application; removed /tmp/fleet-demo-",
    ] {
        assert!(
            out.contains(fact),
            "the demo's output lacks {fact:?}:\n{out}\nstderr:\n{err}"
        );
    }
    let removed = out
        .lines()
        .find_map(|l| l.strip_prefix("stopped every agent and application; removed "))
        .unwrap();
    assert!(
        !std::path::Path::new(removed).exists(),
        "{removed} is still there"
    );
}
