//! Usage errors, `--help`, and start-up failures.

use crate::support::{App, run};

#[test]
fn bad_flags_exit_2_naming_the_flag_and_value() {
    // Arguments, environment, and what stderr must mention.
    type Case = (
        &'static [&'static str],
        &'static [(&'static str, &'static str)],
        &'static [&'static str],
    );
    #[rustfmt::skip]
    let cases: [Case; 5] = [
        (&["--bogus"], &[], &["--bogus"]),
        (&["--error-rate", "abc"], &[], &["--error-rate", "abc"]),
        (&["--crash-after", "-3"], &[], &["--crash-after", "-3"]),
        (&["--port"], &[], &["--port"]),
        (&[], &[("FLEET_DEMO_LATENCY_MS", "slow")], &["FLEET_DEMO_LATENCY_MS", "slow"]),
    ];
    for (args, env, needles) in cases {
        let (status, stdout, stderr) = run(args, env);
        assert_eq!(status.code(), Some(2), "{args:?} {env:?}: stderr {stderr}");
        assert_eq!(stdout, "", "{args:?}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: stderr {stderr:?} lacks {needle:?}"
            );
        }
    }
}

#[test]
fn help_lists_every_flag_with_its_variable() {
    let (status, stdout, _) = run(&["--help"], &[]);
    assert!(status.success());
    let expected = [
        ("--bind", "FLEET_DEMO_BIND"),
        ("--port", "FLEET_APP_PORT"),
        ("--version", "FLEET_DEMO_VERSION"),
        ("--work-interval-ms", "FLEET_DEMO_WORK_INTERVAL_MS"),
        ("--seed", "FLEET_DEMO_SEED"),
        ("--data-dir", "FLEET_DEMO_DATA_DIR"),
        ("--migrate", "FLEET_DEMO_MIGRATE"),
        ("--only-on-device-type", "FLEET_DEMO_ONLY_ON_DEVICE_TYPE"),
        ("--crash-at-start", "FLEET_DEMO_CRASH_AT_START"),
        ("--crash-after", "FLEET_DEMO_CRASH_AFTER"),
        ("--leak-mb-per-sec", "FLEET_DEMO_LEAK_MB_PER_SEC"),
        ("--leak-limit-mb", "FLEET_DEMO_LEAK_LIMIT_MB"),
        ("--error-rate", "FLEET_DEMO_ERROR_RATE"),
        ("--latency-ms", "FLEET_DEMO_LATENCY_MS"),
        ("--report-version", "FLEET_DEMO_REPORT_VERSION"),
        ("--unhealthy", "FLEET_DEMO_UNHEALTHY"),
        ("--hang", "FLEET_DEMO_HANG"),
        ("--wrong-output", "FLEET_DEMO_WRONG_OUTPUT"),
        ("--ignore-sigterm", "FLEET_DEMO_IGNORE_SIGTERM"),
    ];
    for (flag, env) in expected {
        assert!(stdout.contains(flag), "help lacks {flag}");
        assert!(stdout.contains(env), "help lacks {env}");
    }
}

#[test]
fn a_taken_port_exits_1_naming_the_address() {
    let first = App::start(&[], &[]);
    let port = first.addr.port().to_string();
    let (status, stdout, stderr) = run(&["--port", &port], &[]);
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stdout, "");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "stderr: {stderr}"
    );
}

#[test]
fn migrated_data_is_refused_by_a_version_that_does_not_migrate() {
    let dir = std::env::temp_dir().join(format!("fleet-demo-cli-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let app = App::start(&["--data-dir", d, "--migrate", "--version", "2.0.0"], &[]);
    assert_eq!(std::fs::read_to_string(dir.join("schema")).unwrap(), "2\n");
    app.guard.signal(libc::SIGKILL);
    let (status, _, stderr) = run(&["--data-dir", d, "--port", "0"], &[]);
    assert_eq!(status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("schema 2"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
