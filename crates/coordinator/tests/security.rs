//! The secured embedded broker, attacked: TLS with a pinned CA, per-client credentials, the
//! per-client topic ACL, signed operator commands, key rotations. Each test attacks and shows
//! the refusal, then shows the legitimate path still works.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{http_get, now, wait_for};
use fleet_coordinator::auth::{Role, new_credential};
use fleet_coordinator::config::Config;
use fleet_coordinator::testkit;
use fleet_proto::device::{Online, Reported, UpdatePhase};
use fleet_proto::hex::Hex;
use fleet_proto::operator::{Command, Reply, ReplyBody, ReplyResult, Request};
use fleet_proto::trust::{KeyRotation, SignedRotation, TrustChain};
use fleet_proto::{DeviceId, RequestId, SigningKey, Topic, decode, encode};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};

fn tls_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tls")
}

fn alice_key() -> SigningKey {
    SigningKey::from_bytes(&[41; 32])
}

/// A coordinator whose embedded broker serves TLS with the test CA's certificate, checks
/// `credentials`, and obeys only alice's signed commands.
struct Site {
    running: fleet_coordinator::Running,
    secrets: HashMap<String, String>,
    port: u16,
    _dir: tempfile::TempDir,
}

async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::from("# test accounts\n");
    let mut secrets = HashMap::new();
    for (name, role) in [
        ("cam-1", Role::Device),
        ("cam-2", Role::Device),
        ("alice", Role::Operator),
    ] {
        let (secret, line) = new_credential(name, role);
        lines.push_str(&line);
        lines.push('\n');
        secrets.insert(name.to_owned(), secret);
    }
    let creds = dir.path().join("credentials");
    std::fs::write(&creds, lines).unwrap();
    let tls = tls_dir();
    let key = hex::encode(testkit::signing_key().verifying_key().as_bytes());
    let alice = hex::encode(alice_key().verifying_key().as_bytes());
    let env: Vec<(String, String)> = [
        ("BROKER__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "BROKER__TLS_CERT",
            tls.join("server.pem").display().to_string(),
        ),
        (
            "BROKER__TLS_KEY",
            tls.join("server.key").display().to_string(),
        ),
        ("BROKER__CREDENTIALS", creds.display().to_string()),
        (
            "DATABASE__PATH",
            dir.path().join("registry.db").display().to_string(),
        ),
        ("HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        (
            "HTTP__ARTIFACTS_DIR",
            dir.path().join("artifacts").display().to_string(),
        ),
        ("RELEASE_KEYS", key),
        ("OPERATORS__KEYS__ALICE", alice),
        ("DEVICES__HEARTBEAT_INTERVAL", "500ms".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (format!("FLEET_COORDINATOR__{k}"), v))
    .collect();
    let config = Config::from_sources(None, env).unwrap();
    let running = fleet_coordinator::start(config).await.unwrap();
    let port = running.mqtt_addr.unwrap().port();
    Site {
        running,
        secrets,
        port,
        _dir: dir,
    }
}

/// A client pinning `ca` (or plain TCP with `None`).
fn client(
    port: u16,
    client_id: &str,
    login: Option<(&str, &str)>,
    ca: Option<&Path>,
) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = login {
        o.set_credentials(u, p);
    }
    if let Some(ca) = ca {
        let config = fleet_tls::client_config(ca, None).unwrap();
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    AsyncClient::new(o, 64)
}

/// Polls until the CONNACK (Ok) or the connection fails (Err with what happened).
async fn connack(el: &mut EventLoop) -> Result<(), String> {
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) if a.code == ConnectReturnCode::Success => {
                    return Ok(());
                }
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Err(format!("{:?}", a.code)),
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => return Err(format!("{code:?}")),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// Polls until the broker closes the connection; panics if it stays open for 10 s.
async fn closed(el: &mut EventLoop) {
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if el.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the broker kept the connection open");
}

fn ca() -> PathBuf {
    tls_dir().join("ca.pem")
}

async fn device_ids(site: &Site) -> Vec<String> {
    let addr = site.running.http_addr;
    let (_, _, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/v1/devices", ""))
        .await
        .unwrap();
    let v: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    v.iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

fn report(id: &str, seq: u64) -> Vec<u8> {
    encode(&Reported {
        device: DeviceId::new(id).unwrap(),
        seq,
        facts: testkit::facts("rpi4", "eu", &[]),
        active: None,
        standby: None,
        phase: UpdatePhase::Idle,
        applied_sequence: 0,
        last_outcome: None,
        highest_counter: 0,
        at: now(),
        blue_green: Default::default(),
    })
}

#[tokio::test]
async fn impersonation_bad_credentials_a_foreign_ca_and_plain_tcp_are_refused() {
    let site = site().await;
    let cam1 = site.secrets["cam-1"].as_str();
    let cam2 = site.secrets["cam-2"].as_str();
    // Wrong password, unknown user, no login, another device's client id: CONNACK refused.
    for (cid, login, what) in [
        ("cam-1", Some(("cam-1", cam2)), "wrong password"),
        ("ghost", Some(("ghost", cam1)), "unknown user"),
        ("cam-1", None, "no credentials"),
        (
            "cam-1",
            Some(("cam-2", cam2)),
            "cam-2 taking cam-1's client id",
        ),
        (
            "fleet-coordinator",
            Some(("alice", site.secrets["alice"].as_str())),
            "the coordinator's client id",
        ),
    ] {
        let (_c, mut el) = client(site.port, cid, login, Some(&ca()));
        let r = connack(&mut el).await;
        assert!(
            r.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
            "{what}: {r:?}"
        );
    }
    // A client that pins another CA refuses the broker (a rogue broker looks the same).
    let (_c, mut el) = client(
        site.port,
        "cam-1",
        Some(("cam-1", cam1)),
        Some(&tls_dir().join("rogue/ca.pem")),
    );
    let r = connack(&mut el).await;
    assert!(
        r.as_ref()
            .is_err_and(|e| e.contains("certificate") || e.contains("Tls") || e.contains("TLS")),
        "{r:?}"
    );
    // Plain MQTT on the TLS port gets nowhere.
    let (_c, mut el) = client(site.port, "cam-1", Some(("cam-1", cam1)), None);
    assert!(connack(&mut el).await.is_err());
    // The right credentials over TLS get in.
    let (_c, mut el) = client(site.port, "cam-1", Some(("cam-1", cam1)), Some(&ca()));
    assert_eq!(connack(&mut el).await, Ok(()));
}

#[tokio::test]
async fn a_device_cannot_report_for_another_device_command_or_touch_desired_states() {
    let site = site().await;
    let cam2 = site.secrets["cam-2"].clone();
    let forged: [(&str, Vec<u8>); 4] = [
        // A consistent forgery (topic and payload both say cam-1): no payload check can see it.
        ("fleet/v1/devices/cam-1/state", report("cam-1", 1)),
        (
            "fleet/v1/devices/cam-1/desired",
            b"rewritten desired state".to_vec(),
        ),
        ("fleet/v1/rollouts/commands", b"{}".to_vec()),
        ("fleet/v1/trust", encode(&TrustChain::default())),
    ];
    for (topic, payload) in forged {
        let (c, mut el) = client(site.port, "cam-2", Some(("cam-2", &cam2)), Some(&ca()));
        connack(&mut el).await.unwrap();
        c.publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        closed(&mut el).await;
    }
    for filter in [
        "fleet/v1/devices/cam-1/desired",
        "fleet/v1/devices/+/desired",
        "#",
    ] {
        let (c, mut el) = client(site.port, "cam-2", Some(("cam-2", &cam2)), Some(&ca()));
        connack(&mut el).await.unwrap();
        c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
        closed(&mut el).await;
    }
    // cam-2's own report passes; once the coordinator has it, cam-1 was never registered.
    let (c, mut el) = client(site.port, "cam-2", Some(("cam-2", &cam2)), Some(&ca()));
    connack(&mut el).await.unwrap();
    c.publish(
        "fleet/v1/devices/cam-2/state",
        QoS::AtLeastOnce,
        true,
        report("cam-2", 1),
    )
    .await
    .unwrap();
    c.subscribe("fleet/v1/devices/cam-2/desired", QoS::AtLeastOnce)
        .await
        .unwrap();
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    wait_for(
        "cam-2 in the registry",
        Duration::from_secs(10),
        async || {
            device_ids(&site)
                .await
                .contains(&"cam-2".to_owned())
                .then_some(())
        },
    )
    .await;
    assert_eq!(device_ids(&site).await, vec!["cam-2".to_owned()]);
    // The last will must be the device's own online topic too.
    let mut o = MqttOptions::new("cam-2", "127.0.0.1", site.port);
    o.set_credentials("cam-2", cam2.as_str());
    o.set_last_will(rumqttc::LastWill::new(
        "fleet/v1/devices/cam-1/online",
        encode(&Online {
            device: DeviceId::new("cam-1").unwrap(),
            online: false,
            agent_version: "x".into(),
            at: now(),
        }),
        QoS::AtLeastOnce,
        true,
    ));
    let config = fleet_tls::client_config(&ca(), None).unwrap();
    o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    let (_c, mut el) = AsyncClient::new(o, 8);
    assert!(
        connack(&mut el)
            .await
            .is_err_and(|e| e.contains("NotAuthorized"))
    );
    pump.abort();
    drop(c);
}

/// An operator link that signs with `key` (or not).
async fn ask(site: &Site, req: Request) -> Reply {
    let alice = site.secrets["alice"].clone();
    let (c, mut el) = client(
        site.port,
        &format!("fleetctl-{}", req.request_id),
        Some(("alice", &alice)),
        Some(&ca()),
    );
    connack(&mut el).await.unwrap();
    let topic = Topic::Reply(req.request_id.clone()).to_string();
    c.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let sent = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_))
                    if !sent.swap(true, std::sync::atomic::Ordering::SeqCst) =>
                {
                    c.publish(
                        "fleet/v1/rollouts/commands",
                        QoS::AtLeastOnce,
                        false,
                        encode(&req),
                    )
                    .await
                    .unwrap();
                }
                Event::Incoming(Packet::Publish(p)) if p.topic == topic => {
                    return decode::<Reply>(&p.payload).unwrap();
                }
                _ => {}
            }
        }
    })
    .await;
    r.expect("a reply within 10 s")
}

fn request(id: &str, operator: &str, command: Command) -> Request {
    Request {
        request_id: RequestId::new(id).unwrap(),
        operator: operator.into(),
        command,
        auth: None,
    }
}

fn refused_because(r: &Reply) -> String {
    match &r.result {
        ReplyResult::Refused(r) => r.message.clone(),
        ReplyResult::Accepted(b) => panic!("accepted: {b:?}"),
    }
}

#[tokio::test]
async fn operator_commands_are_obeyed_only_when_signed_by_that_operator_and_never_twice() {
    let site = site().await;
    // Unsigned; signed by another key under alice's name; an unknown operator: refused.
    let unsigned = request("q-1", "alice", Command::ListDevices);
    assert!(refused_because(&ask(&site, unsigned).await).contains("not signed"));
    let forged = request("q-2", "alice", Command::ListDevices)
        .sign(&SigningKey::from_bytes(&[9; 32]), now());
    assert!(refused_because(&ask(&site, forged).await).contains("bad signature"));
    let stranger = request("q-3", "mallory", Command::ListDevices)
        .sign(&SigningKey::from_bytes(&[9; 32]), now());
    assert!(refused_because(&ask(&site, stranger).await).contains("no key"));
    // Signed by alice: obeyed. The same request again (a replay): refused.
    let good = request("q-4", "alice", Command::ListDevices).sign(&alice_key(), now());
    assert!(matches!(
        ask(&site, good.clone()).await.result,
        ReplyResult::Accepted(_)
    ));
    assert!(refused_because(&ask(&site, good).await).contains("already used"));
    // The audit names what was refused and who it claimed to be.
    let audit =
        request("q-5", "alice", Command::Audit(Default::default())).sign(&alice_key(), now());
    let ReplyResult::Accepted(body) = ask(&site, audit).await.result else {
        panic!("audit refused")
    };
    let ReplyBody::Audit(rows) = *body else {
        panic!()
    };
    let refused: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "refused an unauthenticated command")
        .collect();
    assert_eq!(refused.len(), 4, "{rows:#?}");
    assert!(refused[0].outcome.contains("claiming operator \"alice\""));
    assert!(refused[2].outcome.contains("\"mallory\""));
}

#[tokio::test]
async fn a_key_rotation_is_checked_stored_and_published_retained_to_devices() {
    let site = site().await;
    let old = testkit::signing_key();
    let new = SigningKey::from_bytes(&[77; 32]);
    let rotation = |epoch, signers: &[&SigningKey]| {
        SignedRotation::sign(
            &KeyRotation {
                epoch,
                keys: vec![Hex(new.verifying_key().to_bytes())],
                issued_at: now(),
            },
            signers,
        )
    };
    // Not signed by the pinned key: refused.
    let bad = request(
        "q-1",
        "alice",
        Command::RotateKeys {
            rotation: rotation(1, &[&new]),
        },
    )
    .sign(&alice_key(), now());
    assert!(refused_because(&ask(&site, bad).await).contains("not signed by pinned key"));
    let good = request(
        "q-2",
        "alice",
        Command::RotateKeys {
            rotation: rotation(1, &[&old, &new]),
        },
    )
    .sign(&alice_key(), now());
    assert!(matches!(
        ask(&site, good).await.result,
        ReplyResult::Accepted(_)
    ));
    // A device subscribing later gets the retained chain and can check it against its keys.
    let cam1 = site.secrets["cam-1"].clone();
    let (c, mut el) = client(site.port, "cam-1", Some(("cam-1", &cam1)), Some(&ca()));
    connack(&mut el).await.unwrap();
    c.subscribe("fleet/v1/trust", QoS::AtLeastOnce)
        .await
        .unwrap();
    let chain = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap()
                && p.topic == "fleet/v1/trust"
            {
                return decode::<TrustChain>(&p.payload).unwrap();
            }
        }
    })
    .await
    .unwrap();
    let pinned = fleet_proto::trust::Pinned {
        epoch: 0,
        keys: vec![old.verifying_key()],
    };
    let (applied, refused) = fleet_proto::trust::follow(&chain, &pinned);
    assert_eq!((applied.len(), refused), (1, None));
    assert_eq!(applied[0].pinned.keys, vec![new.verifying_key()]);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_blocks_nobody() {
    // rumqttd's own TLS listener handshakes inline in its accept loop: one silent client would
    // stop every later connection. The guard handshakes on a task per connection.
    let site = site().await;
    let _silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", site.port)).unwrap())
        .collect();
    let cam1 = site.secrets["cam-1"].clone();
    let (_c, mut el) = client(site.port, "cam-1", Some(("cam-1", &cam1)), Some(&ca()));
    let started = std::time::Instant::now();
    assert_eq!(connack(&mut el).await, Ok(()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_oversized_report_is_refused_at_the_guard() {
    let site = site().await;
    let cam1 = site.secrets["cam-1"].clone();
    let (c, mut el) = client(site.port, "cam-1", Some(("cam-1", &cam1)), Some(&ca()));
    connack(&mut el).await.unwrap();
    // A heartbeat may be 2 KiB: 64 KiB on the heartbeat topic closes the connection.
    let cap = fleet_proto::Kind::Heartbeat.max_size();
    c.publish(
        "fleet/v1/devices/cam-1/heartbeat",
        QoS::AtLeastOnce,
        false,
        vec![1u8; 32 * cap],
    )
    .await
    .unwrap();
    closed(&mut el).await;
    // At the cap it passes the guard (and is then refused by the decoder as malformed).
    let (c, mut el) = client(site.port, "cam-1", Some(("cam-1", &cam1)), Some(&ca()));
    connack(&mut el).await.unwrap();
    c.publish(
        "fleet/v1/devices/cam-1/heartbeat",
        QoS::AtLeastOnce,
        false,
        vec![1u8; cap],
    )
    .await
    .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap();
    assert!(acked, "a report at the cap must pass the guard");
}
