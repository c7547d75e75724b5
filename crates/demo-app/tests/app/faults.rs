//! One test per fault knob, each observed from outside the process.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{App, MIB, PATIENCE, json_num, json_str, rss_bytes, run, wait_until};

#[test]
fn crash_at_start_exits_3_without_binding() {
    let (status, stdout, stderr) = run(&["--port", "0", "--crash-at-start"], &[]);
    assert_eq!(status.code(), Some(3), "stderr: {stderr}");
    assert_eq!(stdout, "", "it must crash before announcing a port");
    assert!(stderr.contains("crash-at-start"), "stderr: {stderr}");
}

#[test]
fn crash_after_exits_4_once_the_delay_has_passed() {
    let spawned = Instant::now();
    let mut app = App::start(&["--crash-after", "2"], &[]);
    assert_eq!(app.get("/health").status, 200, "alive before the delay");
    let status = app.guard.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(4), "stderr: {}", app.guard.stderr());
    // A lower bound only: the timer cannot fire before 2 s, however loaded the machine.
    assert!(
        spawned.elapsed() >= Duration::from_secs(2),
        "exited after {:?}",
        spawned.elapsed()
    );
    assert!(app.guard.stderr().contains("crash-after"));
}

#[test]
fn leak_grows_rss_and_stops_at_the_limit() {
    let limit_mib = 48;
    let app = App::start(
        &[
            "--leak-mb-per-sec",
            "64",
            "--leak-limit-mb",
            &limit_mib.to_string(),
        ],
        &[],
    );
    let pid = app.guard.pid();
    let before = rss_bytes(pid);
    wait_until("RSS to grow by 32 MiB", PATIENCE, || {
        (rss_bytes(pid) >= before + 32 * MIB).then_some(())
    });
    // At 64 MiB/s, another 1.5 s would add 96 MiB without the limit. The process's own
    // memory besides the leak is a few MiB, hence the slack.
    let ceiling = before + (limit_mib + 16) * MIB;
    let watch_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < watch_until {
        let rss = rss_bytes(pid);
        assert!(
            rss < ceiling,
            "RSS {} MiB is past the limit (started at {} MiB)",
            rss / MIB,
            before / MIB
        );
        thread::sleep(Duration::from_millis(100));
    }
    // /health reports the same memory the kernel does.
    let body = app.get("/health").body;
    assert!(
        json_num(&body, "rss_bytes") >= (before + 32 * MIB) as f64,
        "{body}"
    );
}

#[test]
fn error_rate_shows_in_health_and_in_work() {
    // A short interval fills the window quickly.
    let app = App::start(&["--error-rate", "0.3", "--work-interval-ms", "5"], &[]);
    let health = app.health_when("200 items", |b| json_num(b, "requests") >= 200.0);
    let rate = json_num(&health.body, "error_rate");
    assert!(
        (0.15..=0.45).contains(&rate),
        "error_rate {rate} not near 0.3: {}",
        health.body
    );
    // The totals since start: their ratio is the error rate of every item so far.
    let since_start = json_num(&health.body, "failed") / json_num(&health.body, "requests");
    assert!(
        (0.15..=0.45).contains(&since_start),
        "failed / requests {since_start} not near 0.3: {}",
        health.body
    );
    assert_eq!(
        json_str(&health.body, "status"),
        "degraded",
        "{}",
        health.body
    );
    assert_eq!(
        json_str(&health.body, "errors"),
        "elevated",
        "{}",
        health.body
    );

    let statuses: Vec<u16> = (0..40).map(|_| app.get("/work").status).collect();
    assert!(
        statuses.contains(&500),
        "no injected error in 40 requests: {statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "no success in 40 requests: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 200 | 500)),
        "{statuses:?}"
    );
}

#[test]
fn latency_shows_in_p95_and_in_work() {
    let app = App::start(&["--latency-ms", "40"], &[]);
    let health = app.health_when("5 frames", |b| json_num(b, "requests") >= 5.0);
    let p95 = json_num(&health.body, "p95_ms");
    assert!(
        p95 >= 40.0,
        "p95_ms {p95} below the configured 40 ms: {}",
        health.body
    );

    let start = Instant::now();
    assert_eq!(app.get("/work").status, 200);
    assert!(
        start.elapsed() >= Duration::from_millis(40),
        "/work took {:?}",
        start.elapsed()
    );
}

#[test]
fn report_version_differs_from_the_real_version() {
    let app = App::start(&["--version", "2.0.0", "--report-version", "1.9.9"], &[]);
    let body = app.get("/health").body;
    assert_eq!(json_str(&body, "version"), "1.9.9", "{body}");
}

#[test]
fn unhealthy_answers_503_with_a_failing_check() {
    let app = App::start(&["--unhealthy"], &[]);
    let reply = app.get("/health");
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(json_str(&reply.body, "status"), "unhealthy");
    assert_eq!(json_str(&reply.body, "self_test"), "failing");
}

#[test]
fn hang_accepts_connections_but_never_answers() {
    let mut app = App::start(&["--hang"], &[]);
    let mut stream = TcpStream::connect_timeout(&app.addr, PATIENCE).expect("connect succeeds");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected no bytes until the timeout, got {other:?}"),
    }
    assert!(app.guard.is_running(), "a hanging app is still alive");
}

#[test]
fn wrong_output_changes_http_and_cli_answers() {
    let right = App::start(&[], &[]);
    let wrong = App::start(&["--wrong-output"], &[]);
    let path = "/infer?input=frame-0001";
    let (right_http, wrong_http) = (right.get(path), wrong.get(path));
    assert_eq!((right_http.status, wrong_http.status), (200, 200));
    assert_ne!(right_http.body, wrong_http.body);

    let (status, right_cli, _) = run(&["infer", "frame-0001"], &[]);
    assert!(status.success());
    let (status, wrong_cli, _) = run(&["--wrong-output", "infer", "frame-0001"], &[]);
    assert!(status.success());
    assert_eq!(
        right_cli, right_http.body,
        "CLI and HTTP give the same bytes"
    );
    assert_eq!(wrong_cli, wrong_http.body, "and the same wrong bytes");
    assert_ne!(right_cli, wrong_cli);
}

#[test]
fn ignore_sigterm_survives_sigterm_and_dies_on_sigkill() {
    let mut app = App::start(&["--ignore-sigterm"], &[]);
    app.guard.signal(libc::SIGTERM);
    // An ignored signal is discarded when sent, so a reply after kill() returned proves that
    // it was ignored, not merely still pending.
    assert_eq!(app.get("/health").status, 200);
    assert!(app.guard.is_running());
    app.guard.signal(libc::SIGKILL);
    let status = app.guard.wait_exit(PATIENCE);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
}

#[test]
fn sigterm_ends_the_process_by_default() {
    let mut app = App::start(&[], &[]);
    assert_eq!(app.get("/health").status, 200);
    app.guard.signal(libc::SIGTERM);
    let status = app.guard.wait_exit(PATIENCE);
    assert_eq!(status.signal(), Some(libc::SIGTERM), "status {status:?}");
}

#[test]
fn only_on_device_type_gates_every_fault() {
    let broken = [
        "--only-on-device-type",
        "jetson",
        "--unhealthy",
        "--report-version",
        "6.6.6",
    ];
    type Env = &'static [(&'static str, &'static str)];
    let cases: [(Env, u16, &str); 3] = [
        (&[("FLEET_DEVICE_TYPE", "jetson")], 503, "6.6.6"),
        (
            &[("FLEET_DEVICE_TYPE", "rpi4")],
            200,
            env!("CARGO_PKG_VERSION"),
        ),
        (&[], 200, env!("CARGO_PKG_VERSION")),
    ];
    for (env, want_status, want_version) in cases {
        let app = App::start(&broken, env);
        let reply = app.get("/health");
        assert_eq!(reply.status, want_status, "{env:?}: {}", reply.body);
        assert_eq!(json_str(&reply.body, "version"), want_version, "{env:?}");
    }

    // The CLI honours the gate too.
    let infer = |env: &[(&str, &str)]| {
        run(
            &[
                "--only-on-device-type",
                "jetson",
                "--wrong-output",
                "infer",
                "x",
            ],
            env,
        )
        .1
    };
    let (_, right, _) = run(&["infer", "x"], &[]);
    assert_eq!(infer(&[("FLEET_DEVICE_TYPE", "rpi4")]), right);
    assert_ne!(infer(&[("FLEET_DEVICE_TYPE", "jetson")]), right);
}

#[test]
fn environment_sets_knobs_and_flags_win() {
    // No --port: FLEET_APP_PORT picks it.
    let app = App::start_exact(
        &[],
        &[
            ("FLEET_APP_PORT", "0"),
            ("FLEET_DEMO_UNHEALTHY", "1"),
            ("FLEET_DEMO_REPORT_VERSION", "7.7.7"),
        ],
    );
    let reply = app.get("/health");
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert_eq!(json_str(&reply.body, "version"), "7.7.7");

    let (status, _, stderr) = run(&["--port", "0"], &[("FLEET_DEMO_CRASH_AT_START", "true")]);
    assert_eq!(status.code(), Some(3), "stderr: {stderr}");

    let app = App::start(&["--error-rate", "0"], &[("FLEET_DEMO_ERROR_RATE", "1")]);
    for _ in 0..10 {
        assert_eq!(
            app.get("/work").status,
            200,
            "--error-rate 0 must win over the variable"
        );
    }
}
