//! README's operator walkthrough, run as a newcomer would: the fenced block under "An
//! operator's walkthrough", verbatim except for where the binaries are and which ports it uses
//! (the debug build, and free ports so it can run beside other tests).

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use fleet_e2e::*;

fn walkthrough() -> String {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split_once("## An operator's walkthrough")
        .expect("README has an operator's walkthrough")
        .1;
    let block = section.split_once("```\n").unwrap().1;
    block.split_once("\n```\n").unwrap().0.to_owned()
}

#[test]
fn the_readme_walkthrough_runs_verbatim() {
    let dir = TestDir::new("walkthrough");
    let script = walkthrough();
    let (mqtt, http, app) = (free_port(), free_port(), free_port());
    // The walkthrough's app ports are 1808N; here N is added to a free base port instead.
    let app_base = app.saturating_sub(1);
    let work = dir.subdir("scratch");
    let adapted = script
        .replace("target/release", "target/debug")
        .replace("/tmp/fleet-walkthrough", work.to_str().unwrap())
        .replace("port = 1808$i", &format!("port = $(({app_base} + i))"))
        .replace("127.0.0.1:18081", &format!("127.0.0.1:{}", app_base + 1));
    assert_ne!(
        adapted, script,
        "the walkthrough's binaries and ports moved: update this test"
    );
    let path = dir.path().join("walkthrough.sh");
    std::fs::write(
        &path,
        format!("set -eux\n{adapted}\necho WALKTHROUGH-DONE\n"),
    )
    .unwrap();

    let mut cmd = Command::new("bash");
    cmd.arg(&path)
        .current_dir(workspace_root())
        .env(
            "FLEET_COORDINATOR__BROKER__LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .env(
            "FLEET_COORDINATOR__HTTP__LISTEN",
            format!("127.0.0.1:{http}"),
        )
        .env("FLEET_AGENT__MQTT__PORT", mqtt.to_string())
        .env("FLEET_BROKER", format!("mqtt://127.0.0.1:{mqtt}"))
        .env("FLEET_OPERATOR", "newcomer")
        .env("XDG_CONFIG_HOME", dir.path());
    // The guard kills the script's whole process group (coordinator, agents, apps) on failure.
    let mut run = Child::spawn("walkthrough", cmd, dir.path());
    run.wait_for_line("WALKTHROUGH-DONE", Duration::from_secs(240));
    let out = run.stdout();
    for fact in [
        "3 devices",
        "signed demo 1.0 (#1) with key",
        "✓ fresh heartbeats",
        "started rollout r-1 of demo 1.0",
        "rollout r-1 completed: 3 of 3 deployed, 0 skipped, 0 quarantined",
        "# Fleet Deployment Report: r-1",
        "| canary | 2 | 0 | 0 | 20s | PASS |",
        "newcomer     approve",
        "\"status\":\"healthy\",\"version\":\"1.0\"",
    ] {
        assert!(
            out.contains(fact),
            "the walkthrough's output lacks {fact:?}:\n{out}\n{}",
            run.stderr()
        );
    }
    assert!(!out.contains("✗"), "{out}");
}
