//! The binary's command line and exit codes.

use std::process::Command;

use crate::support::*;

fn agent(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleet-agent"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn prints_the_commented_default_config() {
    let (code, out, _) = agent(&["print-default-config"]);
    assert_eq!(code, Some(0));
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/agent.toml"
    ))
    .unwrap();
    assert_eq!(out, shipped);
}

#[test]
fn bad_arguments_and_configs_have_distinct_exit_codes() {
    let (code, _, err) = agent(&["--frobnicate"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, _, err) = agent(&["--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");

    let dev = Device::new("cli", free_port());
    let text = std::fs::read_to_string(dev.config_path()).unwrap() + "bogus_key = 1\n";
    std::fs::write(dev.config_path(), text).unwrap();
    let (code, _, err) = agent(&["--config", dev.config_path().to_str().unwrap()]);
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("bogus_key") && err.contains("agent.toml"),
        "{err}"
    );
}
