//! Integration tests: the coordinator in-process with its real embedded broker, devices and an
//! operator played by real rumqttc clients.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Behaviour, FakeDevice, Operator, http_get, spawn_device};
use fleet_coordinator::config::Config;
use fleet_coordinator::testkit::{self, Knobs};
use fleet_proto::device::BlueGreenSupport;
use fleet_proto::operator::{CheckItem, Command, DeviceStatus, ReplyBody, ReplyResult};
use fleet_proto::release::Release;
use fleet_proto::rollout::{RolloutState, RolloutStatus};
use fleet_proto::{RolloutId, SignedRelease};

fn config(dir: &Path, extra: &[(&str, &str)]) -> Config {
    let key = hex::encode(testkit::signing_key().verifying_key().as_bytes());
    let mut env: Vec<(String, String)> = [
        ("BROKER__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "DATABASE__PATH",
            dir.join("registry.db").display().to_string(),
        ),
        ("HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "HTTP__ARTIFACTS_DIR",
            dir.join("artifacts").display().to_string(),
        ),
        ("RELEASE_KEYS", key),
        ("DEVICES__HEARTBEAT_INTERVAL", "500ms".to_owned()),
        ("ROLLOUT__TICK", "100ms".to_owned()),
        ("GATE__MIN_SAMPLES", "5".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("FLEET_COORDINATOR__{k}"), v))
    .collect();
    for (k, v) in extra {
        env.push((format!("FLEET_COORDINATOR__{k}"), (*v).to_owned()));
    }
    Config::from_sources(None, env).unwrap()
}

fn releases(k: Knobs) -> ((Release, SignedRelease), (Release, SignedRelease)) {
    let one = testkit::signed("app", "1.0", 1, &Knobs::default());
    let two = testkit::signed(
        "app",
        "2.0",
        2,
        &Knobs {
            rollback_to: Some((1, "1.0".into())),
            ..k
        },
    );
    (one, two)
}

fn fleet(port: u16, n: usize, active: &(Release, SignedRelease), b: Behaviour) -> Vec<FakeDevice> {
    (0..n)
        .map(|i| {
            spawn_device(
                port,
                &format!("cam-{i:02}"),
                if i % 2 == 0 { "rpi4" } else { "jetson" },
                if i % 3 == 0 { "eu" } else { "us" },
                Some(testkit::installed(&active.0, &active.1)),
                b.clone(),
                Duration::from_millis(100),
            )
        })
        .collect()
}

async fn wait_registered(op: &mut Operator, n: usize) {
    for _ in 0..200 {
        let r = op.ask(Command::ListDevices).await;
        if let ReplyResult::Accepted(b) = r.result
            && let ReplyBody::Devices(v) = *b
            && v.iter()
                .filter(|d| {
                    d.status == DeviceStatus::Online && d.last_health.is_some() && d.facts.is_some()
                })
                .count()
                == n
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("devices did not register");
}

async fn status(op: &mut Operator, id: &RolloutId) -> RolloutState {
    match op
        .ask(Command::Status {
            rollout: id.clone(),
        })
        .await
        .result
    {
        ReplyResult::Accepted(b) => match *b {
            ReplyBody::State(s) => s,
            other => panic!("{other:?}"),
        },
        ReplyResult::Refused(r) => panic!("{r:?}"),
    }
}

async fn wait_status(op: &mut Operator, id: &RolloutId, want: RolloutStatus) -> RolloutState {
    let mut last = None;
    for _ in 0..600 {
        let s = status(op, id).await;
        if s.status == want {
            return s;
        }
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("rollout never became {want}: {:#?}", last);
}

async fn start(op: &mut Operator, one: &SignedRelease, two: &SignedRelease) -> RolloutId {
    // The coordinator learns the current release (the rollback target) from a plan.
    let r = op
        .ask(Command::Plan {
            release: one.clone(),
        })
        .await;
    assert!(matches!(r.result, ReplyResult::Accepted(_)), "{r:?}");
    match op
        .ask(Command::Start {
            release: two.clone(),
        })
        .await
        .result
    {
        ReplyResult::Accepted(b) => match *b {
            ReplyBody::Started(s) => s.rollout,
            other => panic!("{other:?}"),
        },
        ReplyResult::Refused(r) => panic!("start refused: {r:#?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_rollout_completes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    let artifacts = cfg.artifacts_dir.clone();
    let running = fleet_coordinator::start(cfg).await.unwrap();
    let port = running.mqtt_addr.unwrap().port();
    let (one, two) = releases(Knobs {
        approval: "auto",
        canary_soak: "1s",
        wave_soak: "1s",
        error_rate_pts: 30.0,
        waves: vec![50, 100],
        ..Knobs::default()
    });
    let devices = fleet(port, 6, &one, Behaviour::default());
    let mut op = Operator::connect(port, "good").await;
    wait_registered(&mut op, 6).await;

    // A start without the rollback target held is refused with the checklist.
    let r = op
        .ask(Command::Start {
            release: two.1.clone(),
        })
        .await;
    let ReplyResult::Refused(refused) = r.result else {
        panic!("{r:?}")
    };
    assert!(refused.message.contains("refused"), "{}", refused.message);
    let failed: Vec<_> = refused.checklist.iter().filter(|i| !i.ok).collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].name, "a rollback target present on each device");
    assert!(failed[0].fix.is_some());

    let id = start(&mut op, &one.1, &two.1).await;
    let s = wait_status(&mut op, &id, RolloutStatus::Completed).await;
    assert_eq!(s.deployed_count, 6, "{s:#?}");
    for d in &devices {
        let log = d.log.lock().unwrap();
        assert_eq!(log.active.as_ref().unwrap().version, "2.0", "{}", d.id);
    }
    // Report, metrics, JSON API and artifacts.
    let r = op
        .ask(Command::Report {
            rollout: id.clone(),
        })
        .await;
    let ReplyResult::Accepted(b) = r.result else {
        panic!()
    };
    let ReplyBody::Report(rep) = *b else { panic!() };
    assert!(
        rep.markdown.contains("| Deployed (healthy) | 6 | 100.0 |"),
        "{}",
        rep.markdown
    );

    let http = running.http_addr;
    let (code, _, body) = tokio::task::spawn_blocking(move || http_get(http, "/metrics", ""))
        .await
        .unwrap();
    let text = String::from_utf8(body).unwrap();
    assert_eq!(code, 200);
    assert!(
        text.contains("fleet_devices{status=\"online\"} 6"),
        "{text}"
    );
    let (code, _, body) =
        tokio::task::spawn_blocking(move || http_get(http, "/api/v1/rollouts", ""))
            .await
            .unwrap();
    assert_eq!(code, 200);
    let list: Vec<RolloutState> = serde_json::from_slice(&body).unwrap();
    assert_eq!(list[0].status, RolloutStatus::Completed);
    let (code, _, body) =
        tokio::task::spawn_blocking(move || http_get(http, "/api/v1/audit?limit=5000", ""))
            .await
            .unwrap();
    assert_eq!(code, 200);
    let audit: Vec<fleet_proto::operator::AuditEntry> = serde_json::from_slice(&body).unwrap();
    assert!(audit.iter().any(|a| a.action == "complete"), "{audit:#?}");

    std::fs::create_dir_all(&artifacts).unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let sha = fleet_proto::hex::Sha256::of(&data).to_string();
    std::fs::write(artifacts.join(&sha), &data).unwrap();
    let path = format!("/artifacts/{sha}");
    let (code, head, body) =
        tokio::task::spawn_blocking(move || http_get(http, &path, "Range: bytes=100-199\r\n"))
            .await
            .unwrap();
    assert_eq!(code, 206, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-range: bytes 100-199/10000"),
        "{head}"
    );
    assert_eq!(body, data[100..200]);
    let path = format!("/artifacts/{sha}");
    let (code, _, body) = tokio::task::spawn_blocking(move || http_get(http, &path, ""))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(body, data);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_halts_and_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let running = fleet_coordinator::start(config(dir.path(), &[]))
        .await
        .unwrap();
    let port = running.mqtt_addr.unwrap().port();
    let (one, two) = releases(Knobs {
        canary_soak: "30s",
        wave_soak: "1s",
        ..Knobs::default()
    });
    let devices = fleet(
        port,
        8,
        &one,
        Behaviour {
            bad_version: Some("2.0".into()),
            error_rate_when_bad: 0.9,
            ..Behaviour::default()
        },
    );
    let mut op = Operator::connect(port, "bad").await;
    wait_registered(&mut op, 8).await;
    let id = start(&mut op, &one.1, &two.1).await;
    let s = wait_status(&mut op, &id, RolloutStatus::Halted).await;
    assert!(s.last_action.contains("error rate"), "{s:#?}");
    assert_eq!(s.phase, fleet_proto::rollout::Phase::Prepare);
    // The canary got 2.0 then 1.0 again; nobody else ever got 2.0.
    let d2 = two.1.digest();
    let d1 = one.1.digest();
    let mut canaries = 0;
    for d in &devices {
        let got_two = || {
            d.log
                .lock()
                .unwrap()
                .desired
                .iter()
                .any(|x| x.release.as_ref().map(|r| r.digest()) == Some(d2))
        };
        if got_two() {
            canaries += 1;
            for _ in 0..600 {
                let last = d
                    .log
                    .lock()
                    .unwrap()
                    .desired
                    .last()
                    .and_then(|x| x.release.as_ref().map(|r| r.digest()));
                if last == Some(d1) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let last = d
                .log
                .lock()
                .unwrap()
                .desired
                .last()
                .and_then(|x| x.release.as_ref().map(|r| r.digest()));
            assert_eq!(last, Some(d1), "{} was not rolled back", d.id);
        }
    }
    assert!(
        (2..8).contains(&canaries),
        "{canaries} devices got the release"
    );
    let r = op
        .ask(Command::Report {
            rollout: id.clone(),
        })
        .await;
    let ReplyResult::Accepted(b) = r.result else {
        panic!()
    };
    let ReplyBody::Report(rep) = *b else { panic!() };
    assert!(rep.markdown.contains("## Halt"), "{}", rep.markdown);
    assert!(rep.failure_pattern.is_some());
    // Approving a halted rollout is refused with a message that names it.
    let r = op
        .ask(Command::Approve {
            rollout: id.clone(),
        })
        .await;
    let ReplyResult::Refused(refused) = r.result else {
        panic!("{r:?}")
    };
    assert!(refused.message.contains(id.as_str()), "{}", refused.message);
    assert!(
        running
            .metrics
            .render()
            .contains("fleet_trigger_firings_total{trigger=\"error_rate\"} 1")
    );
    running.stop().await.unwrap();
}

/// The desired states a device received for `digest`: (sequence, hold).
fn received(d: &FakeDevice, digest: fleet_proto::hex::Sha256) -> Vec<(u64, bool)> {
    d.log
        .lock()
        .unwrap()
        .desired
        .iter()
        .filter(|x| x.release.as_ref().map(|r| r.digest()) == Some(digest))
        .map(|x| (x.sequence, x.hold))
        .collect()
}

/// Blue-green: the canary's desired states ask it to keep the old instance warm, a restarted
/// coordinator republishes them with the hold (it is stored with them), and an abort releases
/// the old instances with a higher sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_blue_green_holds_and_an_abort_releases_them() {
    let dir = tempfile::tempdir().unwrap();
    let running = fleet_coordinator::start(config(dir.path(), &[]))
        .await
        .unwrap();
    let port = running.mqtt_addr.unwrap().port();
    let (one, two) = releases(Knobs {
        strategy: "blue-green",
        canary_soak: "1h",
        ..Knobs::default()
    });
    let devices = fleet(port, 8, &one, Behaviour::default());
    let mut op = Operator::connect(port, "bluegreen").await;
    wait_registered(&mut op, 8).await;
    let id = start(&mut op, &one.1, &two.1).await;
    let d2 = two.1.digest();
    let mut s = status(&mut op, &id).await;
    for _ in 0..200 {
        if s.waves[0].deployed == s.waves[0].devices {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&mut op, &id).await;
    }
    let canary = s.waves[0].devices as usize;
    assert_eq!(s.waves[0].deployed as usize, canary, "{s:#?}");
    assert!(
        s.next_action.ends_with(&format!(
            "old instances kept warm on {canary} devices until canary is confirmed"
        )),
        "{}",
        s.next_action
    );
    let held: Vec<&FakeDevice> = devices
        .iter()
        .filter(|d| !received(d, d2).is_empty())
        .collect();
    assert_eq!(held.len(), canary);
    for d in &held {
        assert!(received(d, d2).iter().all(|(_, hold)| *hold), "{}", d.id);
    }

    // Restart on the same registry; the broker (and the devices on it) stay up.
    running.stop().await.unwrap();
    let seen: Vec<usize> = held
        .iter()
        .map(|d| d.log.lock().unwrap().desired.len())
        .collect();
    let url = format!("mqtt://127.0.0.1:{port}");
    let running = fleet_coordinator::start(config(
        dir.path(),
        &[("BROKER__MODE", "external"), ("BROKER__URL", &url)],
    ))
    .await
    .unwrap();
    for (d, n) in held.iter().zip(&seen) {
        let first = received(d, d2)[0];
        common::wait_for(
            "the desired state republished",
            Duration::from_secs(20),
            async || {
                let log = d.log.lock().unwrap();
                (log.desired.len() > *n).then_some(())
            },
        )
        .await;
        let log = d.log.lock().unwrap();
        let again = &log.desired[*n];
        assert_eq!(again.release.as_ref().map(|r| r.digest()), Some(d2));
        assert_eq!((again.sequence, again.hold), first, "{}", d.id);
    }

    // Aborted: the devices keep 2.0 and stop the old instance.
    let r = op
        .ask(Command::Abort {
            rollout: id.clone(),
        })
        .await;
    assert!(matches!(r.result, ReplyResult::Accepted(_)), "{r:?}");
    for d in &held {
        let first = received(d, d2)[0];
        let released = common::wait_for("hold released", Duration::from_secs(20), async || {
            received(d, d2).into_iter().find(|(_, hold)| !hold)
        })
        .await;
        assert!(
            released.0 > first.0,
            "{}: {released:?} after {first:?}",
            d.id
        );
    }
    let s = status(&mut op, &id).await;
    assert_eq!(s.status, RolloutStatus::Aborted);
    assert!(!s.next_action.contains("warm"), "{}", s.next_action);
    running.stop().await.unwrap();
}

/// Devices say in their state reports whether they can run a blue-green release. `plan`
/// refuses a blue-green release naming the devices that cannot and why, names those that do
/// not say (agents older than the report) without refusing for them, and `start` refuses it
/// without sending anything; the same release as canary-rolling passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_refuses_blue_green_naming_the_devices_that_cannot_run_it() {
    const ITEM: &str = "each device can run blue-green (runtime, traffic switch)";
    let no_switch = "blue-green needs a traffic switch on this device: set blue_green.switch to \"forwarder\" or \"command\" in the agent's config";
    let dir = tempfile::tempdir().unwrap();
    let running = fleet_coordinator::start(config(dir.path(), &[]))
        .await
        .unwrap();
    let port = running.mqtt_addr.unwrap().port();
    let (one, two) = releases(Knobs {
        strategy: "blue-green",
        ..Knobs::default()
    });
    let devices: Vec<FakeDevice> = (0..6)
        .map(|i| {
            let blue_green = match i {
                1 | 4 => BlueGreenSupport::Unsupported {
                    why: no_switch.into(),
                },
                2 => BlueGreenSupport::Unknown,
                _ => BlueGreenSupport::Supported,
            };
            spawn_device(
                port,
                &format!("cam-{i:02}"),
                if i % 2 == 0 { "rpi4" } else { "jetson" },
                if i % 3 == 0 { "eu" } else { "us" },
                Some(testkit::installed(&one.0, &one.1)),
                Behaviour {
                    blue_green,
                    ..Behaviour::default()
                },
                Duration::from_millis(100),
            )
        })
        .collect();
    let mut op = Operator::connect(port, "bg-plan").await;
    wait_registered(&mut op, 6).await;
    // The coordinator learns the current release (the rollback target) from a plan.
    let r = op
        .ask(Command::Plan {
            release: one.1.clone(),
        })
        .await;
    assert!(matches!(r.result, ReplyResult::Accepted(_)), "{r:?}");

    let plan = match op
        .ask(Command::Plan {
            release: two.1.clone(),
        })
        .await
        .result
    {
        ReplyResult::Accepted(b) => match *b {
            ReplyBody::Plan(p) => p,
            other => panic!("{other:?}"),
        },
        ReplyResult::Refused(r) => panic!("plan refused: {r:#?}"),
    };
    let failed: Vec<&CheckItem> = plan.checklist.iter().filter(|i| !i.ok).collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    let item = failed[0];
    assert_eq!(item.name, ITEM);
    for w in [
        &format!(
            "2 devices cannot run a blue-green release: 2 say \"{no_switch}\": cam-01, cam-04"
        ),
        "1 devices do not say whether they have a traffic switch",
        "cam-02",
    ] {
        assert!(item.detail.contains(w), "{w:?} not in {:?}", item.detail);
    }
    assert!(
        item.fix
            .as_deref()
            .is_some_and(|f| f.contains("[blue_green] switch") && f.contains("canary-rolling")),
        "{item:?}"
    );

    match op
        .ask(Command::Start {
            release: two.1.clone(),
        })
        .await
        .result
    {
        ReplyResult::Refused(r) => {
            assert!(r.message.contains(ITEM), "{r:#?}");
            assert!(
                r.checklist.iter().any(|i| i.name == ITEM && !i.ok),
                "{r:#?}"
            );
        }
        ReplyResult::Accepted(b) => panic!("started: {b:?}"),
    }
    let d2 = two.1.digest();
    for d in &devices {
        assert!(received(d, d2).is_empty(), "{} got the release", d.id);
    }

    // The same release as canary-rolling (signed again: another digest) has no such item.
    let (_, plain) = releases(Knobs::default());
    let plan = match op.ask(Command::Plan { release: plain.1 }).await.result {
        ReplyResult::Accepted(b) => match *b {
            ReplyBody::Plan(p) => p,
            other => panic!("{other:?}"),
        },
        ReplyResult::Refused(r) => panic!("plan refused: {r:#?}"),
    };
    assert!(plan.checklist.iter().all(|i| i.ok), "{:#?}", plan.checklist);
    assert!(plan.checklist.iter().all(|i| i.name != ITEM));
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_are_counted_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let running = fleet_coordinator::start(config(dir.path(), &[]))
        .await
        .unwrap();
    let port = running.mqtt_addr.unwrap().port();
    // `start` returned: the broker has acknowledged the coordinator's subscriptions, so none
    // of these frames can be dropped for want of a listener.
    let mut op = Operator::connect(port, "fuzz").await;
    op.publish("fleet/v1/devices/x1/heartbeat", b"\x01garbage".to_vec())
        .await;
    op.publish("fleet/v1/devices/x1/heartbeat", vec![1; 3000])
        .await;
    op.publish("fleet/v1/devices/x1/state", vec![9, 1, 2, 3])
        .await;
    op.publish("fleet/v1/devices/x1/online", vec![1]).await;
    op.publish("fleet/v1/devices/x1/events", vec![1, 200, 200, 200])
        .await;
    op.send_raw(b"{not json".to_vec()).await;
    // A well-formed heartbeat naming another device is rejected and audited.
    let (one, _) = releases(Knobs::default());
    let dev = spawn_device(
        port,
        "real-1",
        "rpi4",
        "eu",
        Some(testkit::installed(&one.0, &one.1)),
        Behaviour::default(),
        Duration::from_millis(100),
    );
    let _ = dev;
    let hb = fleet_proto::device::Heartbeat {
        device: fleet_proto::DeviceId::new("someone-else").unwrap(),
        seq: 1,
        at: common::now(),
        uptime: Duration::from_secs(1),
        active_version: None,
        rollout: None,
        system: fleet_proto::device::SystemHealth {
            cpu_pct: 1.0,
            memory_used_bytes: 1,
            memory_total_bytes: 2,
            disk_free_bytes: 1,
            disk_total_bytes: 2,
            temperature_c: None,
        },
        app: fleet_proto::device::AppHealth {
            status: fleet_proto::device::AppStatus::Healthy,
            version: None,
            error_rate: None,
            p95_ms: None,
            restarts_in_window: 0,
            restarts_total: 0,
            probe_ok: None,
            requests: None,
            failed: None,
        },
    };
    op.publish("fleet/v1/devices/x1/heartbeat", fleet_proto::encode(&hb))
        .await;
    let m = running.metrics.clone();
    let mut text = String::new();
    for _ in 0..600 {
        text = m.render();
        if text.contains("fleet_decode_errors_total{kind=\"heartbeat\"} 2")
            && text.contains("fleet_decode_errors_total{kind=\"state\"} 1")
            && text.contains("fleet_decode_errors_total{kind=\"online\"} 1")
            && text.contains("fleet_decode_errors_total{kind=\"event\"} 1")
            && text.contains("fleet_decode_errors_total{kind=\"command\"} 1")
            && text.contains("fleet_rejected_reports_total 1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"heartbeat\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"state\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"online\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"event\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fleet_decode_errors_total{kind=\"command\"} 1"),
        "{text}"
    );
    assert!(text.contains("fleet_rejected_reports_total 1"), "{text}");
    // Still alive and answering; the mismatch is in the audit trail; x1 was never registered.
    let r = op
        .ask(Command::Audit(fleet_proto::operator::AuditQuery::default()))
        .await;
    let ReplyResult::Accepted(b) = r.result else {
        panic!("{r:?}")
    };
    let ReplyBody::Audit(rows) = *b else { panic!() };
    assert!(
        rows.iter()
            .any(|a| a.action == "rejected heartbeat" && a.outcome.contains("someone-else")),
        "{rows:#?}"
    );
    let r = op
        .ask(Command::ShowDevice {
            device: fleet_proto::DeviceId::new("x1").unwrap(),
        })
        .await;
    assert!(matches!(r.result, ReplyResult::Refused(_)), "{r:?}");
    running.stop().await.unwrap();
}
