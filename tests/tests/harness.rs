//! The harness's own guarantees: processes are found, watched, and always cleaned up; waits fail
//! loudly; a missing prerequisite is a visible skip, or a failure when CI requires it.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_e2e::{
    Child, Mosquitto, Outcome, TestDir, binary, free_port, require, wait_for, wait_until,
};
use regex::Regex;

/// Set for the helper tests below when another test runs them in a child process.
const HELPER: &str = "FLEET_E2E_HELPER";

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

/// The message of a panic raised by `f`.
fn panic_message(f: impl FnOnce()) -> String {
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
    err.downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Whether `pid` is gone (or a zombie nobody has reaped yet: dead all the same).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn output_goes_to_files_and_wait_for_line_finds_substrings_and_regexes() {
    let dir = TestDir::new("child");
    let mut child = Child::spawn(
        "server",
        sh(
            "echo starting; echo 'warn: slow disk' >&2; echo 'listening on 127.0.0.1:4242'; exec sleep 60",
        ),
        dir.path(),
    );
    let line = child.wait_for_line("listening on", Duration::from_secs(10));
    assert_eq!(line, "listening on 127.0.0.1:4242");
    let re = Regex::new(r"listening on [\d.]+:(\d+)$").unwrap();
    let line = child.wait_for_line(&re, Duration::from_secs(10));
    assert_eq!(&re.captures(&line).unwrap()[1], "4242");
    assert_eq!(
        child.wait_for_line("warn:", Duration::from_secs(10)),
        "warn: slow disk"
    );
    assert_eq!(child.stdout_path(), dir.path().join("server.stdout"));
    assert!(child.stderr().contains("slow disk"));
    assert!(child.is_running());
}

#[test]
fn dropping_a_child_kills_its_whole_process_group() {
    let dir = TestDir::new("group");
    let child = Child::spawn(
        "parent",
        sh("sleep 600 & echo \"grandchild $!\"; wait"),
        dir.path(),
    );
    let mut child = child;
    let line = child.wait_for_line("grandchild", Duration::from_secs(10));
    let grandchild: u32 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let parent = child.pid();
    assert!(!dead(grandchild));
    drop(child);
    assert!(dead(parent), "the child itself is reaped");
    wait_until(
        Duration::from_secs(5),
        "the grandchild dies with its group",
        || dead(grandchild),
    );
}

#[test]
fn a_restarted_child_is_searched_from_its_own_start() {
    let dir = TestDir::new("restart");
    let mut first = Child::spawn("svc", sh("echo 'ready generation=1'"), dir.path());
    first.wait_exit(Duration::from_secs(10));
    drop(first);
    let mut second = Child::spawn(
        "svc",
        sh("echo booting; echo 'ready generation=2'; exec sleep 60"),
        dir.path(),
    );
    assert_eq!(
        second.wait_for_line("ready", Duration::from_secs(10)),
        "ready generation=2"
    );
    // Both runs are in the same file, for the post-mortem.
    let log = std::fs::read_to_string(second.stdout_path()).unwrap();
    assert!(log.contains("generation=1") && log.contains("generation=2"));
}

#[test]
fn wait_for_line_fails_loudly_on_exit_and_on_timeout() {
    let dir = TestDir::new("loud");
    let mut quitter = Child::spawn(
        "quitter",
        sh("echo 'config error: no broker'; exit 3"),
        dir.path(),
    );
    let msg = panic_message(|| {
        quitter.wait_for_line("listening", Duration::from_secs(10));
    });
    assert!(msg.contains("quitter exited (exit code 3)"), "{msg}");
    assert!(
        msg.contains("config error: no broker"),
        "shows the log: {msg}"
    );

    let mut silent = Child::spawn("silent", sh("exec sleep 60"), dir.path());
    let started = Instant::now();
    let msg = panic_message(|| {
        silent.wait_for_line("listening", Duration::from_millis(300));
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        msg.contains(
            "timed out after 300ms waiting for silent to print a line matching \"listening\""
        ),
        "{msg}"
    );
}

#[test]
fn stop_terminates_gracefully_and_kill_forcefully() {
    let dir = TestDir::new("stop");
    let mut polite = Child::spawn(
        "polite",
        sh("trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.05; done"),
        dir.path(),
    );
    polite.wait_for_line("up", Duration::from_secs(10));
    let status = polite.stop(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(polite.stdout().contains("bye"));

    let mut stubborn = Child::spawn(
        "stubborn",
        sh("trap '' TERM; echo up; while true; do sleep 0.05; done"),
        dir.path(),
    );
    stubborn.wait_for_line("up", Duration::from_secs(10));
    let status = stubborn.stop(Duration::from_millis(200));
    assert!(!status.success());
}

#[test]
fn wait_until_names_what_it_waited_for() {
    let msg =
        panic_message(|| wait_until(Duration::from_millis(50), "the moon turns blue", || false));
    assert_eq!(
        msg,
        "timed out after 50ms waiting until the moon turns blue"
    );
    let mut calls = 0;
    let value = wait_for(Duration::from_secs(5), "the third call", || {
        calls += 1;
        (calls == 3).then_some("done")
    });
    assert_eq!(value, "done");
}

#[test]
fn a_missing_binary_names_the_cargo_build_command() {
    let msg = panic_message(|| {
        binary("fleet-no-such-binary");
    });
    assert!(
        msg.contains("fleet-no-such-binary is not built")
            && msg.contains("run `cargo build -p fleet-no-such-binary` first"),
        "{msg}"
    );
}

#[test]
fn free_ports_can_be_bound() {
    let a = free_port();
    let b = free_port();
    assert!(a > 0 && b > 0);
    std::net::TcpListener::bind(("127.0.0.1", a)).unwrap();
}

#[test]
fn a_child_dies_with_the_test_process_even_without_drop() {
    // A test process that is SIGKILLed (a runner timeout) runs no destructors: the children are
    // tied to it by PR_SET_PDEATHSIG instead.
    let dir = TestDir::new("orphan");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "helper_spawns_a_sleeper_and_waits_to_be_killed",
        "--ignored",
        "--nocapture",
    ])
    .env(HELPER, "1");
    let mut helper = Child::spawn("helper", cmd, dir.path());
    let line = helper.wait_for_line("helper dir ", Duration::from_secs(30));
    let helper_dir = line.strip_prefix("helper dir ").unwrap().to_owned();
    let line = helper.wait_for_line("sleeper pid", Duration::from_secs(30));
    let sleeper: u32 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(!dead(sleeper));
    helper.signal(libc::SIGKILL);
    helper.wait_exit(Duration::from_secs(10));
    wait_until(
        Duration::from_secs(5),
        "the sleeper dies with the killed test process",
        || dead(sleeper),
    );
    std::fs::remove_dir_all(helper_dir).unwrap();
}

/// Run by `a_child_dies_with_the_test_process_even_without_drop` in a child process.
#[test]
#[ignore = "helper: run by another test"]
fn helper_spawns_a_sleeper_and_waits_to_be_killed() {
    if std::env::var_os(HELPER).is_none() {
        return; // run directly (--include-ignored): nothing to help with
    }
    let dir = TestDir::new("helper");
    let sleeper = Child::spawn("sleeper", sh("exec sleep 600"), dir.path());
    // This process is SIGKILLed, so its TestDir is never dropped: the caller removes it.
    fleet_e2e::visible(&format!("helper dir {}", dir.path().display()));
    fleet_e2e::visible(&format!("sleeper pid {}", sleeper.pid()));
    loop {
        std::thread::park();
    }
}

#[test]
fn a_missing_prerequisite_is_a_visible_skip_or_a_failure_when_required() {
    let run = |require: bool| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "helper_needs_mosquitto",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER, "1")
        .env("FLEET_MOSQUITTO", "/nonexistent/mosquitto")
        .env_remove("FLEET_REQUIRE_E2E");
        if require {
            cmd.env("FLEET_REQUIRE_E2E", "1");
        }
        cmd.output().unwrap()
    };
    let skipped = run(false);
    let stderr = String::from_utf8_lossy(&skipped.stderr);
    assert!(skipped.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "SKIPPED: mosquitto not installed (apt-get install -y mosquitto; looked for /nonexistent/mosquitto) [helper_needs_mosquitto]"
        ),
        "{stderr}"
    );
    let failed = run(true);
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(!failed.status.success(), "{output}");
    assert!(
        output.contains("FLEET_REQUIRE_E2E is set, so this is a failure: mosquitto not installed"),
        "{output}"
    );
}

/// Run by `a_missing_prerequisite_is_a_visible_skip_or_a_failure_when_required`.
#[test]
#[ignore = "helper: run by another test"]
fn helper_needs_mosquitto() {
    if std::env::var_os(HELPER).is_none() {
        return; // run directly (--include-ignored): nothing to help with
    }
    // Nothing is created before the prerequisite check, so no directory is needed.
    let _broker = require!(Mosquitto::start(Path::new("/nonexistent"), &[]));
    panic!("FLEET_MOSQUITTO points nowhere, so this is never reached");
}

#[test]
fn a_kept_directory_survives_a_failed_test() {
    let mut kept = None;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let dir = TestDir::new("kept");
        kept = Some(dir.path().to_path_buf());
        panic!("failure");
    }));
    let kept = kept.unwrap();
    assert!(Path::new(&kept).is_dir());
    std::fs::remove_dir_all(&kept).unwrap();

    let dir = TestDir::new("removed");
    let path = dir.path().to_path_buf();
    drop(dir);
    assert!(!path.exists());
    assert!(matches!(Outcome::Ready(1), Outcome::Ready(1)));
}
