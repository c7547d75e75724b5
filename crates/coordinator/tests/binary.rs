//! The real `fleet-coordinator` binary: starts with no arguments; survives kill -9 mid-wave.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command as Proc, Stdio};
use std::time::{Duration, Instant};

use common::{Behaviour, Child, Operator, free_port, http_get, spawn_device};
use fleet_coordinator::testkit::{self, Knobs};
use fleet_proto::operator::{AuditEntry, Command, ReplyBody, ReplyResult};
use fleet_proto::rollout::{Phase, RolloutState, RolloutStatus, Verdict};

const BIN: &str = env!("CARGO_BIN_EXE_fleet-coordinator");

fn spawn(dir: &Path, mqtt: u16, http: u16, extra: &[(&str, String)], args: &[&str]) -> Child {
    let mut c = Proc::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env(
            "FLEET_COORDINATOR__BROKER__LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .env(
            "FLEET_COORDINATOR__HTTP__LISTEN",
            format!("127.0.0.1:{http}"),
        )
        .env("FLEET_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr.log")).unwrap(),
        ));
    for (k, v) in extra {
        c.env(format!("FLEET_COORDINATOR__{k}"), v);
    }
    Child(c.spawn().unwrap())
}

fn wait_http(addr: SocketAddr, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} after {limit:?}");
}

#[test]
fn no_arguments_starts_listens_and_serves_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let mut child = spawn(dir.path(), mqtt, http, &[], &[]);
    let addr: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    wait_http(addr, Duration::from_secs(30));
    let (code, head, body) = http_get(addr, "/metrics", "");
    assert_eq!(code, 200, "{head}");
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("# TYPE fleet_devices gauge"), "{text}");
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"heartbeat\"} 0"),
        "{text}"
    );
    // The embedded broker listens, and the default registry lives in the working directory.
    std::net::TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
    assert!(dir.path().join("fleet-coordinator.db").exists());
    assert!(child.0.try_wait().unwrap().is_none(), "exited early");
    // print-default-config prints the shipped file.
    let out = Proc::new(BIN).arg("print-default-config").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        fleet_coordinator::config::DEFAULT_CONFIG
    );
    // A bad key is refused with the key named.
    let out = Proc::new(BIN)
        .current_dir(dir.path())
        .env("FLEET_COORDINATOR__GATE__Z", "-1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gate.z"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rollouts(http: SocketAddr) -> Vec<RolloutState> {
    match std::net::TcpStream::connect_timeout(&http, Duration::from_millis(200)) {
        Ok(_) => {}
        Err(_) => return Vec::new(),
    }
    let (code, _, body) = http_get(http, "/api/v1/rollouts", "");
    if code != 200 {
        return Vec::new();
    }
    serde_json::from_slice(&body).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_wave_then_restart_resumes_without_repeating_or_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http_port) = (free_port(), free_port());
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let key = hex::encode(testkit::signing_key().verifying_key().as_bytes());
    let env = vec![
        ("RELEASE_KEYS", key),
        ("DEVICES__HEARTBEAT_INTERVAL", "500ms".to_owned()),
        ("ROLLOUT__TICK", "100ms".to_owned()),
        ("GATE__MIN_SAMPLES", "5".to_owned()),
    ];
    let mut child = spawn(dir.path(), mqtt, http_port, &env, &[]);
    wait_http(http, Duration::from_secs(30));

    let one = testkit::signed("app", "1.0", 1, &Knobs::default());
    let two = testkit::signed(
        "app",
        "2.0",
        2,
        &Knobs {
            rollback_to: Some((1, "1.0".into())),
            approval: "auto",
            canary_soak: "1s",
            wave_soak: "4s",
            error_rate_pts: 30.0,
            waves: vec![34, 67, 100],
            ..Knobs::default()
        },
    );
    let devices: Vec<_> = (0..12)
        .map(|i| {
            spawn_device(
                mqtt,
                &format!("gw-{i:02}"),
                if i % 2 == 0 { "rpi4" } else { "jetson" },
                if i % 3 == 0 { "eu" } else { "us" },
                Some(testkit::installed(&one.0, &one.1)),
                Behaviour::default(),
                Duration::from_millis(100),
            )
        })
        .collect();
    let mut op = Operator::connect(mqtt, "k9").await;
    // Wait until every device registered with a heartbeat.
    for i in 0.. {
        assert!(i < 200, "devices did not register");
        if let ReplyResult::Accepted(b) = op.ask(Command::ListDevices).await.result
            && let ReplyBody::Devices(v) = *b
            && v.iter().filter(|d| d.last_health.is_some()).count() == 12
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        op.ask(Command::Plan {
            release: one.1.clone()
        })
        .await
        .result,
        ReplyResult::Accepted(_)
    ));
    let r = op
        .ask(Command::Start {
            release: two.1.clone(),
        })
        .await;
    let ReplyResult::Accepted(_) = r.result else {
        panic!("{r:?}")
    };

    // Wait until wave 1 is soaking (deployed, soak not over), then kill -9.
    let start = Instant::now();
    let before = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "never reached wave 1"
        );
        let list = tokio::task::spawn_blocking(move || rollouts(http))
            .await
            .unwrap();
        if let Some(s) = list.first()
            && s.phase == Phase::Rollout
            && s.current_wave.current == 1
            && s.waves[1].deployed == s.waves[1].devices
        {
            break s.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    unsafe_kill9(&mut child);
    drop(child);
    let mut child = spawn(dir.path(), mqtt, http_port, &env, &[]);
    wait_http(http, Duration::from_secs(30));
    let after_restart = Instant::now();

    let start = Instant::now();
    let done = loop {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "rollout did not complete after restart"
        );
        let list = tokio::task::spawn_blocking(move || rollouts(http))
            .await
            .unwrap();
        if let Some(s) = list.first()
            && s.status.is_final()
        {
            break s.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done.status, RolloutStatus::Completed, "{done:#?}");
    assert_eq!(done.deployed_count, 12);
    assert!(
        done.waves.iter().all(|w| w.verdict == Some(Verdict::Pass)),
        "{done:#?}"
    );
    // The wave-1 soak continued from its persisted deadline: wave 2 did not start before it.
    let soak_until = before.waves[1].soak_until.unwrap();
    let (_, _, body) =
        tokio::task::spawn_blocking(move || http_get(http, "/api/v1/audit?limit=100000", ""))
            .await
            .unwrap();
    let audit: Vec<AuditEntry> = serde_json::from_slice(&body).unwrap();
    for wave in ["canary", "wave 1", "wave 2", "wave 3"] {
        let n = audit
            .iter()
            .filter(|a| a.action == format!("start {wave}"))
            .count();
        assert_eq!(n, 1, "{wave} started {n} times");
    }
    let w2 = audit.iter().find(|a| a.action == "start wave 2").unwrap();
    assert!(
        w2.at >= soak_until,
        "wave 2 started at {} before wave 1's soak ended at {soak_until}",
        w2.at
    );
    let _ = after_restart;
    // No device got the release twice (one desired sequence carrying 2.0 per device).
    let d2 = two.1.digest();
    for d in &devices {
        let log = d.log.lock().unwrap();
        let mut seqs: Vec<u64> = log
            .desired
            .iter()
            .filter(|x| {
                x.release.as_ref().map(|r| r.digest()) == Some(d2)
                    && x.report_interval == Duration::from_millis(500)
            })
            .map(|x| x.sequence)
            .collect();
        seqs.sort();
        seqs.dedup();
        assert_eq!(
            seqs.len(),
            1,
            "{}: release sent with sequences {seqs:?}",
            d.id
        );
        assert_eq!(log.active.as_ref().unwrap().version, "2.0");
    }
    let _ = child.0.kill();
}

fn unsafe_kill9(child: &mut Child) {
    // std's kill() sends SIGKILL on Unix.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

/// Publishes `events` as device `dev-1` to the embedded broker at `mqtt` and waits for every
/// PUBACK.
async fn publish_events(mqtt: u16, events: &[fleet_proto::device::Event]) {
    use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
    let mut opts = MqttOptions::new("dev-1", "127.0.0.1", mqtt);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 16);
    for ev in events {
        client
            .publish(
                "fleet/v1/devices/dev-1/events",
                QoS::AtLeastOnce,
                false,
                fleet_proto::encode(ev),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked < events.len() {
        assert!(Instant::now() < deadline, "no PUBACK for every event");
        if let Ok(MqttEvent::Incoming(Packet::PubAck(_))) = el.poll().await {
            acked += 1;
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}

fn event(seq: u64) -> fleet_proto::device::Event {
    fleet_proto::device::Event {
        device: fleet_proto::DeviceId::new("dev-1").unwrap(),
        seq,
        at: fleet_proto::UnixMillis(1_700_000_000_000 + seq),
        rollout: None,
        sequence: 1,
        version: format!("1.{seq}"),
        kind: fleet_proto::device::EventKind::Verified,
    }
}

/// Waits until the coordinator has subscribed on its broker (a device event published before
/// that is delivered to no one): publishes `online` until the coordinator counts one.
async fn wait_subscribed(mqtt: u16, http: SocketAddr) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let name = r#"fleet_reports_total{kind="online"}"#;
    let before = metric(http, name).unwrap_or(0.0);
    let (client, mut el) = AsyncClient::new(MqttOptions::new("dev-1", "127.0.0.1", mqtt), 16);
    let online = fleet_proto::device::Online {
        device: fleet_proto::DeviceId::new("dev-1").unwrap(),
        online: true,
        agent_version: "test".into(),
        at: fleet_proto::UnixMillis(1_700_000_000_000),
    };
    let start = Instant::now();
    while metric(http, name).unwrap_or(0.0) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the coordinator never subscribed"
        );
        client
            .publish(
                "fleet/v1/devices/dev-1/online",
                QoS::AtLeastOnce,
                false,
                fleet_proto::encode(&online),
            )
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                if el.poll().await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
}

fn metric(http: SocketAddr, name: &str) -> Option<f64> {
    let (code, _, body) = http_get(http, "/metrics", "");
    if code != 200 {
        return None;
    }
    String::from_utf8(body).ok()?.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_sequence_gaps_are_counted_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (mqtt, http_port) = (free_port(), free_port());
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    let env = vec![("ROLLOUT__TICK", "100ms".to_owned())];
    let lost = r#"fleet_lost_reports_total{kind="event"}"#;
    let mut child = spawn(dir.path(), mqtt, http_port, &env, &[]);
    wait_http(http, Duration::from_secs(30));
    wait_subscribed(mqtt, http).await;
    // Seq 1 and 2, then 2 again (re-sent after a reconnect, at-least-once) and 3: no gap.
    publish_events(mqtt, &[event(1), event(2), event(2), event(3)]).await;
    let audited = |n: usize| {
        let (_, _, body) = http_get(http, "/api/v1/audit?device=dev-1", "");
        let entries: Vec<AuditEntry> = serde_json::from_slice(&body).unwrap_or_default();
        entries
            .iter()
            .filter(|e| e.action.starts_with("verified"))
            .count()
            >= n
    };
    let start = Instant::now();
    while !audited(4) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "events not audited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(http, lost),
        Some(0.0),
        "a re-sent event is not a gap"
    );

    // The coordinator dies; seq 4 and 5 never reach it (lost with it); seq 6 comes after
    // the restart: the gap is counted although this run never saw seq 3.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let _child = spawn(dir.path(), mqtt, http_port, &env, &[]);
    wait_http(http, Duration::from_secs(30));
    wait_subscribed(mqtt, http).await;
    publish_events(mqtt, &[event(6)]).await;
    let start = Instant::now();
    while metric(http, lost) != Some(2.0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "gap not counted: {:?}",
            metric(http, lost)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
