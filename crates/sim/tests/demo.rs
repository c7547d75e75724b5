//! `fleet-sim demo` end to end, as README's first command runs it (with fewer devices): both
//! outcomes shown, both reports printed, nothing left behind.

#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_shows_a_good_and_a_bad_release_and_cleans_up() {
    let out = demo(&["demo", "--devices", "9"]);
    the_default_demo(&out);
}

/// Runs `fleet-sim ARGS` to its end (killed after 300 s), asserts it succeeded; its stdout.
fn demo(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleet-sim"))
        .args(args)
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
    out
}

fn the_default_demo(out: &str) {
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
            "the demo's output lacks {fact:?}:\n{out}"
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

/// `fleet-sim demo --strategy blue-green`: a first install, a good blue-green release with
/// zero failed requests through the forwarders, a bad one halted in the canary with the old
/// instances untouched.
#[test]
fn the_blue_green_demo_switches_without_a_failed_request_and_switches_back() {
    let out = demo(&["demo", "--devices", "6", "--strategy", "blue-green"]);
    for fact in [
        "6 agents online",
        "[blue_green] switch = \"forwarder\"",
        "== 1. demo-app 1.0.0: a first install",
        "== 2. a good blue-green release: demo-app 2.0.0",
        "failed (",
        "== 3. a bad blue-green release: demo-app 3.0.0",
        "halted in the canary; fleet: 6 on 2.0.0",
        "health endpoint reported",
        "kept their process (never restarted)",
        "the 2.0.0 instances of 6 of 6 devices",
        "- **Strategy**: blue-green",
        "strategy: blue-green",
        "status: halted",
        "stopped every agent and application; removed /tmp/fleet-demo-",
    ] {
        assert!(
            out.contains(fact),
            "the demo's output lacks {fact:?}:\n{out}"
        );
    }
    let completed = out
        .lines()
        .find(|l| l.contains("completed: ") && l.contains("requests through the service ports"))
        .unwrap_or_else(|| panic!("no count of requests:\n{out}"));
    assert!(completed.contains(", 0 failed ("), "{completed}");
}

/// `fleet-sim demo --strategy ab`: both arms planned by type and region and observed side by
/// side, arm B's error rate above arm A's, A promoted, every device on A at the end.
#[test]
fn the_ab_demo_compares_the_arms_promotes_a_and_ends_with_every_device_on_a() {
    let out = demo(&["demo", "--devices", "12", "--strategy", "ab"]);
    for fact in [
        "12 agents online, nothing installed yet",
        "== 1. A/B: demo-app 2.1.0 (arm A) against 2.0.0 (arm B)",
        "checklist items pass",
        "arm A (demo-app 2.1.0 (#2))",
        "arm B (demo-app 2.0.0 (#1))",
        "awaiting_approval arms",
        "== 2. the arms side by side: fleetctl report r-1",
        "| metric | arm A | arm B |",
        "| release | demo-app 2.1.0 (#2) | demo-app 2.0.0 (#1) |",
        "Winner: none yet",
        "== 3. promote arm A: fleetctl rollout promote r-1 A",
        "completed: fleet: 12 on 2.1.0",
        "- **Strategy**: ab",
        "Winner: arm A (promoted)",
        "strategy: ab",
        "status: completed",
        "deployed_count: 12",
        "arm_a: demo-app 2.1.0 (#2) devices=3 deployed=3 healthy=3 failed=0 status=promoted",
        "1 × demo-operator    promote",
        "stopped every agent and application; removed /tmp/fleet-demo-",
    ] {
        assert!(
            out.contains(fact),
            "the demo's output lacks {fact:?}:\n{out}"
        );
    }
    // Both arms hold every hardware type and both regions.
    for arm in ["arm A (", "arm B ("] {
        let line = out
            .lines()
            .find(|l| l.contains(arm) && l.contains("types: "))
            .unwrap_or_else(|| panic!("no plan line for {arm}:\n{out}"));
        for stratum in [
            "jetson-orin 1",
            "rpi4 1",
            "x86-gateway 1",
            "eu-west ",
            "us-east ",
        ] {
            assert!(line.contains(stratum), "{arm} lacks {stratum}: {line}");
        }
    }
    // The report's error rates: B's above A's.
    let rates = out
        .lines()
        .find(|l| l.starts_with("| error rate ("))
        .unwrap_or_else(|| panic!("no error-rate row:\n{out}"));
    let percent = |cell: &str| -> f64 { cell.trim().split(' ').next().unwrap().parse().unwrap() };
    let cells: Vec<&str> = rates.split('|').collect();
    let (a, b) = (percent(cells[2]), percent(cells[3]));
    assert!(b > a, "B ({b} %) is not worse than A ({a} %): {rates}");
    assert!(
        out.contains("the operator promotes A"),
        "the demo says why it promotes A:\n{out}"
    );
}
