//! One fleet over TLS with per-device credentials, on both brokers:
//!
//! - `embedded`: the coordinator's broker serves TLS (`broker.tls_cert`), checks every login
//!   against a credentials file made with `fleet-coordinator credential` (username = device id),
//!   and confines each client to its own topics; agents pin the CA and log in with their secret.
//! - `mosquitto`: mutual TLS with `require_certificate true` + `use_identity_as_username true`
//!   and the ACL of `deploy/mosquitto/acl`; certificates from `deploy/mosquitto/gen-certs.sh`
//!   (CN = device id); the coordinator connects over `mqtts://` with its own certificate.
//!
//! Both run the same script with the real binaries: a signed rollout completes; an unsigned
//! operator command is refused; a device's credentials cannot rewrite another device's desired
//! state (refused by the broker, nothing installed); the release key is rotated with
//! `fleetctl key rotate|publish`, every agent applies it, a release signed with the new key
//! rolls out, and one signed with the old key is refused.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

use std::path::Path;
use std::time::Duration;

use fleet_e2e::*;
use fleet_proto::device::Desired;
use fleet_proto::{DeviceId, SignedRelease, SigningKey, encode};

const DEVICES: &[&str] = &["tls-1", "tls-2"];
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Embedded,
    Mosquitto,
}

#[test]
fn a_rollout_over_tls_with_per_device_credentials_on_the_embedded_broker() {
    scenario(Kind::Embedded);
}

#[test]
fn a_rollout_over_tls_with_per_device_credentials_on_mosquitto() {
    scenario(Kind::Mosquitto);
}

fn path(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

struct Site {
    // Drop order: agents (and their apps), the coordinator, the broker, the directory.
    agents: Vec<Agent>,
    coordinator: Coordinator,
    mosquitto: Option<Mosquitto>,
    /// Alice's fleetctl: TLS, her broker login or certificate, her operator key.
    ctl: Ctl,
    releases: Releases,
    artifact: String,
    dir: TestDir,
}

fn scenario(kind: Kind) {
    let label = match kind {
        Kind::Embedded => "tls-embedded",
        Kind::Mosquitto => "tls-mosquitto",
    };
    let Some(mut site) = start(kind, label) else {
        return;
    };
    let started = std::time::Instant::now();

    // 1. A signed rollout over TLS completes.
    let v1 = sign(&site, "v1", "1.0.0", 1, "release.key");
    let out = site
        .ctl
        .run(&["rollout", "start", path(&v1), "--watch"])
        .ok();
    assert!(out.contains("completed: 2 of 2 deployed"), "{out}");
    for a in &site.agents {
        a.wait_serving("1.0.0", TIMEOUT);
    }

    // 2. The same operator without her operator key: the coordinator refuses, and says why.
    let mut unsigned = site.ctl.clone();
    unsigned
        .extra_env
        .retain(|(k, _)| k != "FLEET_OPERATOR_KEY");
    let refused = unsigned.run(&["rollout", "list"]).fails(3);
    assert!(refused.stderr.contains("not signed"), "{}", refused.stderr);

    // 3. tls-2's credentials try to rewrite tls-1's desired state with a release signed by an
    //    attacker: the broker refuses it, tls-1 never sees it.
    let attacker = SigningKey::from_bytes(&[66; 32]);
    let text = std::fs::read_to_string(v1.with_extension("release")).unwrap();
    let mut evil = SignedRelease::from_json(&text)
        .unwrap()
        .decode_unverified()
        .unwrap();
    evil.version = "6.6.6".into();
    evil.counter = 666;
    let forged = encode(&Desired {
        device: DeviceId::new("tls-1").unwrap(),
        sequence: 1_000_000,
        rollout: None,
        release: Some(SignedRelease::sign(&evil, &attacker)),
        report_interval: Duration::from_secs(1),
        retry: 0,
        hold: false,
    });
    let mut rogue = rogue_device(&site, kind, "tls-2");
    let closed = rogue.publish_or_closed("fleet/v1/devices/tls-1/desired", forged);
    match kind {
        Kind::Embedded => {
            assert!(
                closed,
                "the guard must close a connection that publishes a foreign topic"
            );
            site.coordinator.child.wait_for_line(
                "refused publish on fleet/v1/devices/tls-1/desired by tls-2",
                Duration::from_secs(10),
            );
        }
        Kind::Mosquitto => {
            let broker = site.mosquitto.as_ref().expect("a mosquitto site");
            wait_until(
                Duration::from_secs(10),
                "mosquitto to deny the publish",
                || {
                    broker.log().lines().any(|l| {
                        l.contains("Denied PUBLISH from tls-2-rogue")
                            && l.contains("fleet/v1/devices/tls-1/desired")
                    })
                },
            );
        }
    }

    // 4. Rotate the release key: release2 replaces release, signed by both.
    let desk = &site.releases.ctl;
    desk.run(&["keygen", "--name", "release2"]).ok();
    let rotated = desk
        .run(&[
            "key",
            "rotate",
            "--epoch",
            "1",
            "--to",
            "release2.pub",
            "--sign",
            "release.key",
            "--sign",
            "release2.key",
            "--pinned",
            "release.pub",
        ])
        .ok();
    assert!(rotated.contains("epoch      1"), "{rotated}");
    let published = site
        .ctl
        .run(&["key", "publish", path(&desk.dir.join("rotation-1.json"))])
        .ok();
    assert!(published.contains("release keys rotated"), "{published}");
    for id in DEVICES {
        wait_until(TIMEOUT, &format!("{id} to apply the key rotation"), || {
            site.coordinator
                .device_audit(id)
                .iter()
                .any(|e| e.action.starts_with("keys rotated") && e.outcome.contains("epoch 1"))
        });
    }

    // 5. A release signed with the new key rolls out; one signed with the old key is refused.
    let v2 = sign(&site, "v2", "2.0.0", 2, "release2.key");
    let out = site
        .ctl
        .run(&["rollout", "start", path(&v2), "--watch"])
        .ok();
    assert!(out.contains("completed: 2 of 2 deployed"), "{out}");
    for a in &site.agents {
        a.wait_serving("2.0.0", TIMEOUT);
    }
    let old_key = sign(&site, "v3", "3.0.0", 3, "release.key");
    let refused = site.ctl.run(&["plan", path(&old_key)]).fails(3);
    assert!(
        refused.stdout.contains("unknown key") || refused.stderr.contains("unknown key"),
        "{refused:?}"
    );

    // Nothing of the forgery reached tls-1.
    let audit = site.coordinator.device_audit("tls-1");
    assert!(
        audit
            .iter()
            .all(|e| !e.action.contains("6.6.6") && !e.outcome.contains("1000000")),
        "{audit:#?}"
    );
    visible(&format!(
        "{label}: TLS scenario in {:.1} s (dir {})",
        started.elapsed().as_secs_f64(),
        site.dir.path().display()
    ));
}

/// Writes and signs a demo-app release (automatic approval, one wave) with `key`.
fn sign(site: &Site, file: &str, version: &str, counter: u64, key: &str) -> std::path::PathBuf {
    let mut spec = ReleaseSpec::demo_app(version, counter, &site.artifact, &[]);
    spec.approval = "auto";
    spec.canary_soak = "1s";
    spec.wave_soak = "1s";
    spec.waves = "[100]";
    spec.trial = "deadline = \"20s\"\ngood_probes = 2\nprobe_interval = \"250ms\"";
    spec.extra = "\n[thresholds]\np95_latency_pct = 1000.0\n".into();
    if counter > 1 {
        // The checklist wants a rollback target on every device: the previous release.
        spec.rollback_to = Some((counter - 1, format!("{}.0.0", counter - 1)));
    }
    let desk = &site.releases.ctl;
    let manifest = desk.dir.join(format!("{file}.toml"));
    std::fs::write(&manifest, spec.toml()).unwrap();
    desk.run(&["manifest", "sign", path(&manifest), "--key", key])
        .ok();
    manifest
}

/// A client with a device's own credentials (and nothing else), as a compromised device is.
fn rogue_device(site: &Site, kind: Kind, id: &str) -> MqttProbe {
    let certs = site.dir.path().join("certs");
    let ca = certs.join("ca.pem");
    let r = match kind {
        Kind::Embedded => {
            let secret =
                std::fs::read_to_string(site.dir.path().join(format!("{id}.secret"))).unwrap();
            MqttProbe::connect_tls(
                "127.0.0.1",
                site.coordinator.mqtt_port,
                id,
                Some((id, secret.trim())),
                &ca,
                None,
            )
        }
        // Another client id, so the real agent keeps its session (mosquitto would hand it over);
        // the certificate, and so the username, is the device's.
        Kind::Mosquitto => MqttProbe::connect_tls(
            "127.0.0.1",
            site.mosquitto.as_ref().expect("mosquitto").port(),
            &format!("{id}-rogue"),
            None,
            &ca,
            Some((
                &certs.join(format!("{id}.pem")),
                &certs.join(format!("{id}.key")),
            )),
        ),
    };
    r.unwrap_or_else(|e| panic!("{id}'s own credentials must connect: {e:?}"))
}

fn start(kind: Kind, label: &str) -> Option<Site> {
    let dir = TestDir::new(label);
    let releases = Releases::new(&dir, "mqtt://127.0.0.1:1");
    // The operator's signing key, made the way an operator makes it.
    releases.ctl.run(&["keygen", "--name", "alice"]).ok();
    let alice_pub = std::fs::read_to_string(releases.ctl.dir.join("alice.pub"))
        .unwrap()
        .trim()
        .to_owned();
    let artifact = DemoArtifact::pack(&releases);

    let mut names: Vec<&str> = DEVICES.to_vec();
    if kind == Kind::Mosquitto {
        names.extend(["fleet-coordinator", "alice"]);
    }
    let certs = Certs::generate(&dir.path().join("certs"), &names).or_skip()?;
    let coordinator_dir = dir.subdir("coordinator");
    let mut settings: Vec<(String, String)> = FAST
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    settings.push(("OPERATORS__KEYS__ALICE".into(), alice_pub));
    let devices = dir.subdir("devices");
    let mut ctl = Ctl::new(&dir.subdir("operator-alice"), "", "alice");
    ctl.extra_env.extend([
        ("FLEET_CA".to_owned(), path(&certs.ca()).to_owned()),
        (
            "FLEET_OPERATOR_KEY".to_owned(),
            path(&releases.ctl.dir.join("alice.key")).to_owned(),
        ),
    ]);

    let (mosquitto, coordinator, agents) = match kind {
        Kind::Embedded => {
            let mut accounts: Vec<Credential> = DEVICES
                .iter()
                .map(|d| Credential::new(d, "device"))
                .collect();
            accounts.push(Credential::new("alice", "operator"));
            let credentials = coordinator_dir.join("credentials");
            write_credentials(&credentials, &accounts);
            for a in &accounts {
                std::fs::write(dir.path().join(format!("{}.secret", a.name)), &a.secret).unwrap();
            }
            settings.extend([
                (
                    "BROKER__TLS_CERT".to_owned(),
                    path(&certs.server_cert()).to_owned(),
                ),
                (
                    "BROKER__TLS_KEY".to_owned(),
                    path(&certs.server_key()).to_owned(),
                ),
                (
                    "BROKER__CREDENTIALS".to_owned(),
                    path(&credentials).to_owned(),
                ),
            ]);
            let borrowed: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let coordinator = Coordinator::start(&coordinator_dir, &releases.public_key, &borrowed);
            let port = coordinator.mqtt_port;
            let agents = accounts
                .iter()
                .filter(|a| DEVICES.contains(&a.name.as_str()))
                .map(|a| {
                    let endpoint = MqttEndpoint::with_login("127.0.0.1", port, &a.name, &a.secret)
                        .with_tls(&certs.ca(), None);
                    Agent::start(
                        &devices,
                        DeviceSpec::new(&a.name, "rpi4", "eu-west"),
                        &endpoint,
                        &releases.public_key,
                    )
                })
                .collect();
            ctl.broker = format!("mqtts://127.0.0.1:{port}");
            let alice = accounts
                .iter()
                .find(|a| a.name == "alice")
                .expect("alice's account");
            ctl.extra_env.extend([
                ("FLEET_USERNAME".to_owned(), "alice".to_owned()),
                ("FLEET_PASSWORD".to_owned(), alice.secret.clone()),
            ]);
            (None, coordinator, agents)
        }
        Kind::Mosquitto => {
            let mut users: Vec<MqttUser> = DEVICES.iter().map(|d| MqttUser::device(d)).collect();
            users.push(MqttUser::coordinator("fleet-coordinator"));
            users.push(MqttUser::operator("alice"));
            let broker =
                Mosquitto::start_tls(&dir.subdir("mosquitto"), &users, &certs).or_skip()?;
            settings.extend([
                ("BROKER__CA".to_owned(), path(&certs.ca()).to_owned()),
                (
                    "BROKER__CLIENT_CERT".to_owned(),
                    path(&certs.cert("fleet-coordinator")).to_owned(),
                ),
                (
                    "BROKER__CLIENT_KEY".to_owned(),
                    path(&certs.key("fleet-coordinator")).to_owned(),
                ),
            ]);
            let borrowed: Vec<(&str, &str)> = settings
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            // The username and password are unused: mosquitto takes the certificate's CN.
            let coordinator = Coordinator::start_external(
                &coordinator_dir,
                &releases.public_key,
                &borrowed,
                &broker.url(),
                "fleet-coordinator",
                "unused",
                broker.port(),
            );
            let agents = DEVICES
                .iter()
                .map(|id| {
                    let endpoint = MqttEndpoint::anonymous("127.0.0.1", broker.port())
                        .with_tls(&certs.ca(), Some((&certs.cert(id), &certs.key(id))));
                    Agent::start(
                        &devices,
                        DeviceSpec::new(id, "rpi4", "eu-west"),
                        &endpoint,
                        &releases.public_key,
                    )
                })
                .collect();
            ctl.broker = broker.url();
            ctl.extra_env.extend([
                (
                    "FLEET_CLIENT_CERT".to_owned(),
                    path(&certs.cert("alice")).to_owned(),
                ),
                (
                    "FLEET_CLIENT_KEY".to_owned(),
                    path(&certs.key("alice")).to_owned(),
                ),
            ]);
            (Some(broker), coordinator, agents)
        }
    };
    let url = artifact.serve_from(&coordinator_dir.join("artifacts"), coordinator.http_port);
    let site = Site {
        agents,
        coordinator,
        mosquitto,
        ctl,
        releases,
        artifact: artifact.stanza(&url),
        dir,
    };
    wait_until(
        Duration::from_secs(60),
        "both devices online over TLS",
        || {
            let devices = site.coordinator.devices();
            DEVICES.iter().all(|id| {
                devices.iter().any(|d| {
                    d.id.as_str() == *id
                        && d.status == fleet_proto::operator::DeviceStatus::Online
                        && d.last_health.is_some()
                })
            })
        },
    );
    Some(site)
}
