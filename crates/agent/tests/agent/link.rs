//! The MQTT link: offline start, late broker, malformed frames.

use fleet_proto::device::{Desired, EventKind, UpdatePhase};
use fleet_proto::encode;

use crate::support::*;

#[test]
fn broker_absent_at_start_app_keeps_running_and_converges_later() {
    // Install 1.0.0 with a broker, then kill the agent mid-trial of 2.0.0.
    let dev = Device::new("offline", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let mut agent = Agent::start(&dev, &[]);
    commit_first(&dev, &obs, &version("1.0.0", &[]), 1, 1);
    let (mut r2, _) = signed_file_release(dev.dir.path(), 2, &version("2.0.0", &[]));
    r2.trial.good_probes = 12;
    obs.publish_desired(&desired(
        &dev.id,
        2,
        Some(fleet_proto::SignedRelease::sign(&r2, &key())),
        0,
    ));
    obs.wait_event("trial of 2.0.0", PATIENCE, |e| {
        matches!(e.kind, EventKind::TrialStarted { .. }) && e.sequence == 2
    });
    agent.kill();
    wait_port_free(dev.app_port);
    let seen_before: Vec<u64> = obs.events().iter().map(|e| e.seq).collect();

    // Restart against a port where nothing listens yet: the broker is absent.
    let late = free_port();
    let dev = Device {
        broker_port: late,
        ..dev
    };
    dev.write_config();
    let agent = Agent::start(&dev, &[]);
    // The journal resolves offline: the trial resumes, commits, and the app serves.
    dev.wait_serving("2.0.0");
    wait_until("the resumed trial to commit offline", PATIENCE, || {
        dev.idle_at(2)
    });
    assert_eq!(dev.app_version().as_deref(), Some("2.0.0"));
    assert!(
        obs.events()
            .iter()
            .all(|e| !matches!(e.kind, EventKind::Committed { .. }) || e.sequence != 2)
    );

    // The broker appears on that port (a relay to the running broker, which the observer is
    // already subscribed to, so nothing published on connect can be missed).
    relay(late, broker());
    obs.wait_event("the offline Committed event", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Committed { .. })
    });
    obs.assert_no_gap();
    let late_seqs: Vec<u64> = obs
        .events()
        .iter()
        .map(|e| e.seq)
        .filter(|s| !seen_before.contains(s))
        .collect();
    assert!(
        late_seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order: {late_seqs:?}"
    );
    // And it converges to a desired state published now.
    let (_, s3) = signed_file_release(dev.dir.path(), 3, &version("3.0.0", &[]));
    obs.publish_desired(&desired(&dev.id, 3, Some(s3), 0));
    obs.wait_event("3.0.0 committed", PATIENCE, |e| {
        e.sequence == 3 && matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving("3.0.0");
    obs.wait_state("online report", |r| {
        r.applied_sequence == 3 && r.phase == UpdatePhase::Idle
    });
    drop(agent);
}

/// Listens on `port` and relays every connection to `to`.
fn relay(port: u16, to: u16) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            for (mut a, mut b) in [
                (conn.try_clone().unwrap(), upstream.try_clone().unwrap()),
                (upstream, conn),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
}

#[test]
fn malformed_and_oversized_frames_are_counted_and_ignored() {
    let dev = Device::new("garbage", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let mut agent = Agent::start(&dev, &[]);
    obs.wait_state("first report", |_| true);
    obs.publish_raw(b"\x01not postcard at all".to_vec());
    obs.publish_raw(vec![9, 1, 2, 3]);
    obs.publish_raw(vec![1; 100 * 1024]);
    let d: Desired = desired(&dev.id, 1, None, 0);
    let mut truncated = encode(&d);
    truncated.truncate(truncated.len() / 2);
    obs.publish_raw(truncated);
    wait_until("four dropped frames in the log", PATIENCE, || {
        (agent.stderr().matches("dropping a frame").count() >= 4).then_some(())
    });
    let log = agent.stderr();
    assert!(log.contains("count=4"), "the drops are counted: {log}");
    assert!(log.contains("over the 65536-byte limit"), "{log}");
    assert!(log.contains("protocol version 9"), "{log}");
    assert!(agent.is_running());
    // Still working: a valid desired state is acted on.
    commit_first(&dev, &obs, &version("1.0.0", &[]), 1, 2);
    assert!(agent.is_running());
}
