//! Blue-green (issue 9) with real parts: the agent's built-in forwarder on the service port,
//! real fleet-demo-app instances side by side, and clients hammering the service port with a
//! new TCP connection per request for the whole update.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime};

use fleet_agent::machine::Phase;
use fleet_proto::device::{
    BlueGreenSupport, Desired, EventKind, RollbackReason, Slot, UpdatePhase,
};
use fleet_proto::release::{RollbackTo, StrategyKind};
use fleet_proto::{Refusal, SignedRelease};

use crate::support::*;

/// A device whose agent forwards its service port (`app_port`) to the instance with the
/// traffic; returns the device and the instance ports (slot A, slot B).
pub(crate) fn bg_device(name: &str) -> (Device, [(String, String); 4], u16, u16) {
    let dev = Device::new(name, broker());
    let (a, b) = (free_port(), free_port());
    let env = [
        ("FLEET_AGENT__BLUE_GREEN__SWITCH".into(), "forwarder".into()),
        ("FLEET_AGENT__BLUE_GREEN__PORT_A".into(), a.to_string()),
        ("FLEET_AGENT__BLUE_GREEN__PORT_B".into(), b.to_string()),
        ("FLEET_AGENT__BLUE_GREEN__BIND".into(), "127.0.0.1".into()),
    ];
    (dev, env, a, b)
}

pub(crate) fn start(dev: &Device, env: &[(String, String)]) -> Agent {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start(dev, &pairs)
}

fn bg_release(dir: &Path, counter: u64, v: &Version) -> SignedRelease {
    let (path, sha, size) = artifact(dir, v);
    let mut r = release(counter, v, format!("file://{}", path.display()), sha, size);
    r.strategy.kind = StrategyKind::BlueGreen;
    SignedRelease::sign(&r, &key())
}

/// One request through a fresh connection: the version that answered, or why it failed.
fn request(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {raw:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or("")));
    }
    let doc: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("body {body:?}: {e}"))?;
    doc.get("version")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("no version in {body}"))
}

/// Each request's outcome and when it completed.
type Log = Arc<Mutex<Vec<(SystemTime, Result<String, String>)>>>;

/// Clients sending requests back to back to `port` until dropped.
struct Hammer {
    stop: Arc<AtomicBool>,
    log: Log,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Hammer {
    fn start(port: u16, clients: usize) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Log::default();
        let threads = (0..clients)
            .map(|_| {
                let (stop, log) = (Arc::clone(&stop), Arc::clone(&log));
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let r = request(port);
                        log.lock().unwrap().push((SystemTime::now(), r));
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Hammer { stop, log, threads }
    }

    fn finish(mut self) -> Vec<(SystemTime, Result<String, String>)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Hammer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// PIDs of the fleet-demo-app servers started with `--version VERSION` (not `infer` runs).
fn pids_of(version: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // Under qemu-user (binfmt_misc, the aarch64 run in CI) the interpreter comes first.
        let is_server = args.iter().take(2).any(|a| a.ends_with("fleet-demo-app"))
            && args
                .windows(2)
                .any(|w| w[0] == "--version" && w[1] == version)
            && !args.iter().any(|a| a == "infer");
        if is_server {
            out.push(pid);
        }
    }
    out
}

fn phase_is(dev: &Device, sequence: u64, want: fn(&Phase) -> bool) -> Option<()> {
    dev.journal()
        .filter(|s| s.phase.job().is_some_and(|j| j.sequence == sequence) && want(&s.phase))
        .map(|_| ())
}

#[test]
fn blue_green_good_release_switches_with_zero_failed_requests() {
    let (dev, env, port_a, port_b) = bg_device("bg-good");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = start(&dev, &env);
    // The first install has nothing to keep warm: the ordinary path, behind the forwarder.
    commit_first(&dev, &obs, &version("1.0.0-bggood", &[]), 1, 1);
    assert_eq!(request(port_a).as_deref(), Ok("1.0.0-bggood"));
    let old_pids = pids_of("1.0.0-bggood");
    assert_eq!(old_pids.len(), 1, "{old_pids:?}");
    // With a switch configured the device reports that it can run blue-green.
    let state = obs.wait_state("a reported state", |_| true);
    assert_eq!(state.blue_green, BlueGreenSupport::Supported);

    let hammer = Hammer::start(dev.app_port, 2);
    wait_until("the hammer to get answers", PATIENCE, || {
        (hammer.log.lock().unwrap().len() > 20).then_some(())
    });
    let s2 = bg_release(dev.dir.path(), 2, &version("2.0.0-bggood", &[]));
    obs.publish_desired(&desired(&dev.id, 2, Some(s2), 0));
    // While the new version warms up, the old one keeps the traffic and runs on.
    wait_until("2.0.0 warming up beside 1.0.0", PATIENCE, || {
        phase_is(&dev, 2, |p| matches!(p, Phase::Warming { .. }))
    });
    assert_eq!(pids_of("1.0.0-bggood"), old_pids);
    obs.wait_event("2.0.0 committed", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Committed { .. })
    });
    wait_until("1.0.0 stopped after the commit", PATIENCE, || {
        pids_of("1.0.0-bggood").is_empty().then_some(())
    });
    // Some requests after the old instance stopped.
    thread::sleep(Duration::from_millis(300));
    let log = hammer.finish();
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    let by_version = |v: &str| log.iter().filter(|(_, r)| r.as_deref() == Ok(v)).count();
    eprintln!(
        "blue-green good release: {} requests through the service port, {} answered by 1.0.0, {} by 2.0.0, {} failed",
        log.len(),
        by_version("1.0.0-bggood"),
        by_version("2.0.0-bggood"),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(by_version("1.0.0-bggood") > 0 && by_version("2.0.0-bggood") > 0);
    assert_eq!(request(dev.app_port).as_deref(), Ok("2.0.0-bggood"));
    assert_eq!(request(port_b).as_deref(), Ok("2.0.0-bggood"));
    let r = obs.wait_state("state says 2.0.0 active", |r| {
        r.applied_sequence == 2 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(
        r.active.as_ref().map(|i| i.version.as_str()),
        Some("2.0.0-bggood")
    );
    assert_eq!(
        std::fs::read_link(dev.root().join("active")).unwrap(),
        Path::new("slot-b")
    );
    obs.assert_no_gap();
}

#[test]
fn blue_green_bad_release_switches_back_to_the_old_instance_that_never_stopped() {
    let (dev, env, port_a, _port_b) = bg_device("bg-bad");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let agent = start(&dev, &env);
    commit_first(&dev, &obs, &version("1.0.0-bgbad", &[]), 1, 1);
    let old_pids = pids_of("1.0.0-bgbad");
    assert_eq!(old_pids.len(), 1, "{old_pids:?}");

    // The new version turns bad once it has the traffic: the test kills it after the switch,
    // and it comes back (the supervisor restarts it) reporting the wrong version.
    let flag = dev.dir.path().join("turn-bad");
    let knob = format!(
        "$(test -e {} && echo --report-version 6.6.6)",
        flag.display()
    );
    let bad = version("2.0.0-bgbad", &[&knob]);
    let hammer = Hammer::start(dev.app_port, 2);
    // Also straight at the old instance: it must answer every request, all along.
    let direct = Hammer::start(port_a, 1);
    wait_until("the hammers to get answers", PATIENCE, || {
        (hammer.log.lock().unwrap().len() > 20 && direct.log.lock().unwrap().len() > 10)
            .then_some(())
    });
    obs.publish_desired(&desired(
        &dev.id,
        2,
        Some(bg_release(dev.dir.path(), 2, &bad)),
        0,
    ));
    wait_until("the traffic on 2.0.0 (Proving)", PATIENCE, || {
        phase_is(&dev, 2, |p| matches!(p, Phase::Proving { .. }))
    });
    wait_until(
        "an answer from 2.0.0 through the service port",
        PATIENCE,
        || (request(dev.app_port).as_deref() == Ok("2.0.0-bgbad")).then_some(()),
    );
    std::fs::write(&flag, b"").unwrap();
    let new_pids = pids_of("2.0.0-bgbad");
    assert_eq!(new_pids.len(), 1, "{new_pids:?}");
    // SAFETY: kill(2) on the test's own grandchild.
    unsafe {
        libc::kill(new_pids[0], libc::SIGKILL);
    }
    let e = obs.wait_event("2.0.0 rolled back", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::RolledBack { .. })
    });
    let EventKind::RolledBack { reason, restored } = &e.kind else {
        unreachable!()
    };
    assert!(
        matches!(
            reason,
            RollbackReason::WrongVersion { .. }
                | RollbackReason::Unresponsive { .. }
                | RollbackReason::CrashAtStart { .. }
        ),
        "{reason:?}"
    );
    assert_eq!(restored.as_deref(), Some("1.0.0-bgbad"));
    wait_until("2.0.0 stopped", PATIENCE, || {
        pids_of("2.0.0-bgbad").is_empty().then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    let log = hammer.finish();
    let direct_log = direct.finish();
    // The old instance: same process, never stopped answering.
    assert_eq!(pids_of("1.0.0-bgbad"), old_pids);
    let direct_failed: Vec<_> = direct_log.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        direct_failed.is_empty(),
        "the old instance failed requests: {direct_failed:?}"
    );
    assert!(
        direct_log
            .iter()
            .all(|(_, r)| r.as_deref() == Ok("1.0.0-bgbad"))
    );
    // Through the service port, the only failures are the new version's, between its kill and
    // the switch back; once an answer of the old version came back, no request failed.
    let switched_back_at = log
        .iter()
        .filter(|(_, r)| r.as_deref() == Ok("2.0.0-bgbad"))
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let first_old_again = log
        .iter()
        .filter(|(t, r)| *t > switched_back_at && r.as_deref() == Ok("1.0.0-bgbad"))
        .map(|(t, _)| *t)
        .min()
        .expect("an answer of 1.0.0 after the switch back");
    let late_failures: Vec<_> = log
        .iter()
        .filter(|(t, r)| *t > first_old_again && r.is_err())
        .collect();
    assert!(late_failures.is_empty(), "{late_failures:?}");
    assert_eq!(request(dev.app_port).as_deref(), Ok("1.0.0-bgbad"));

    // The switch-back time: from the failed check (the agent logs when that sample was taken)
    // to the first answer of the old version through the service port.
    let stderr = agent.stderr();
    let line = stderr
        .lines()
        .find(|l| l.contains("traffic switched back to the previous version"))
        .unwrap_or_else(|| panic!("no switch-back line in the agent's log:\n{stderr}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    let failed_check_at = field("failed_check_at");
    let agent_us = field("after_us");
    let served_at = first_old_again
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let failures = log.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!(
        "blue-green switch back: {} ms from the failed check to the old instance answering through the service port \
         (agent: traffic switched {:.1} ms after the failed check); {} of {} service-port requests failed, all on the killed new instance",
        served_at.saturating_sub(failed_check_at),
        agent_us as f64 / 1000.0,
        failures,
        log.len()
    );
    let r = obs.wait_state("state says 1.0.0 active", |r| {
        r.applied_sequence == 2 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(
        r.active.as_ref().map(|i| i.version.as_str()),
        Some("1.0.0-bgbad")
    );
    assert_eq!(
        std::fs::read_link(dev.root().join("active")).unwrap(),
        Path::new("slot-a")
    );
}

#[test]
fn an_agent_killed_after_the_switch_brings_the_old_version_back_then_tries_again() {
    let (dev, env, _port_a, _port_b) = bg_device("bg-crash");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let mut agent = start(&dev, &env);
    commit_first(&dev, &obs, &version("1.0.0-bgcrash", &[]), 1, 1);
    let mut r2 = {
        let v = version("2.0.0-bgcrash", &[]);
        let (path, sha, size) = artifact(dev.dir.path(), &v);
        release(2, &v, format!("file://{}", path.display()), sha, size)
    };
    r2.strategy.kind = StrategyKind::BlueGreen;
    // Long enough under traffic for the test to catch it there.
    r2.trial.good_probes = 20;
    obs.publish_desired(&desired(
        &dev.id,
        2,
        Some(SignedRelease::sign(&r2, &key())),
        0,
    ));
    wait_until(
        "the traffic and the link on 2.0.0 (Proving)",
        PATIENCE,
        || {
            phase_is(&dev, 2, |p| matches!(p, Phase::Proving { .. }))?;
            (std::fs::read_link(dev.root().join("active")).ok()? == Path::new("slot-b"))
                .then_some(())
        },
    );
    // A power cut after the switch, before the commit.
    agent.kill();
    wait_port_free(dev.app_port);
    let j = dev.journal().unwrap();
    assert!(matches!(j.phase, Phase::Proving { .. }), "{:?}", j.phase);
    assert_eq!(
        std::fs::read_link(dev.root().join("active")).unwrap(),
        Path::new("slot-b")
    );
    let _agent = start(&dev, &env);
    // Resolution: the old version back first (link and traffic), the new one warms up again
    // with one attempt less, then switches and commits.
    wait_until("1.0.0 back behind the service port", PATIENCE, || {
        (request(dev.app_port).as_deref() == Ok("1.0.0-bgcrash")).then_some(())
    });
    wait_until("2.0.0 warming up again", PATIENCE, || {
        phase_is(&dev, 2, |p| {
            matches!(
                p,
                Phase::Warming {
                    attempts_left: 1,
                    ..
                }
            )
        })
    });
    obs.wait_event("2.0.0 committed", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Committed { .. })
    });
    assert_eq!(request(dev.app_port).as_deref(), Ok("2.0.0-bgcrash"));
    wait_until("1.0.0 stopped", PATIENCE, || {
        pids_of("1.0.0-bgcrash").is_empty().then_some(())
    });
    assert!(dev.idle_at(2).is_some_and(|s| s.active == Some(Slot::B)));
}

#[test]
fn blue_green_is_refused_without_a_traffic_switch() {
    let dev = Device::new("bg-off", broker());
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = Agent::start(&dev, &[]);
    commit_first(&dev, &obs, &version("1.0.0", &[]), 1, 1);
    let before = dev.snapshot();
    obs.publish_desired(&desired(
        &dev.id,
        2,
        Some(bg_release(dev.dir.path(), 2, &version("2.0.0", &[]))),
        0,
    ));
    let e = obs.wait_event("blue-green refused", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Refused { .. })
    });
    let EventKind::Refused { reason } = &e.kind else {
        unreachable!()
    };
    assert!(reason.to_string().contains("blue_green.switch"), "{reason}");
    assert_eq!(dev.snapshot(), before);
    assert_eq!(dev.app_version().as_deref(), Some("1.0.0"));
    // Its reported state said so before the release arrived, in the refusal's words, so that
    // the coordinator's checklist names it at plan time.
    let Refusal::StrategyUnsupported { why } = reason else {
        panic!("{reason:?}")
    };
    let state = obs.wait_state("a reported state", |_| true);
    assert_eq!(
        state.blue_green,
        BlueGreenSupport::Unsupported { why: why.clone() }
    );
}

// ---------------------------------------------------------------------------------------------
// Hold (`Desired.hold`): the old instance stays warm until the coordinator confirms the wave.

/// A desired state with `hold` set as the coordinator sets it until the wave is confirmed.
pub(crate) fn held(dev: &Device, sequence: u64, release: SignedRelease, hold: bool) -> Desired {
    Desired {
        hold,
        ..desired(&dev.id, sequence, Some(release), 0)
    }
}

/// Commits `old` the ordinary way, then blue-green `new` (allowed to roll back to `old`) with
/// `hold`; returns the signed releases (old, new) and the PIDs of the old and the new instance.
fn commit_held(
    dev: &Device,
    obs: &Observer,
    old: &str,
    new: &str,
) -> (SignedRelease, SignedRelease, i32, i32) {
    let r1 = commit_first(dev, obs, &version(old, &[]), 1, 1);
    let s1 = SignedRelease::sign(&r1, &key());
    let old_pids = pids_of(old);
    assert_eq!(old_pids.len(), 1, "{old_pids:?}");
    let v2 = version(new, &[]);
    let (path, sha, size) = artifact(dev.dir.path(), &v2);
    let mut r2 = release(2, &v2, format!("file://{}", path.display()), sha, size);
    r2.strategy.kind = StrategyKind::BlueGreen;
    r2.rollback_to = Some(RollbackTo {
        counter: 1,
        version: old.into(),
    });
    let s2 = SignedRelease::sign(&r2, &key());
    obs.publish_desired(&held(dev, 2, s2.clone(), true));
    obs.wait_event(&format!("{new} committed"), PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::Committed { .. })
    });
    let j = wait_until(
        "the journal idle with the old version warm",
        PATIENCE,
        || dev.idle_at(2),
    );
    assert_eq!(j.warm, Some(Slot::A), "{j:?}");
    assert_eq!(j.active, Some(Slot::B));
    // Both instances run: the old one is the same process as before the update.
    assert_eq!(pids_of(old), old_pids);
    let new_pids = pids_of(new);
    assert_eq!(new_pids.len(), 1, "{new_pids:?}");
    (s1, s2, old_pids[0], new_pids[0])
}

#[test]
fn blue_green_hold_keeps_the_old_instance_warm_and_a_rollback_switches_back_to_it() {
    let (dev, env, port_a, port_b) = bg_device("bg-hold");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let agent = start(&dev, &env);
    let (s1, _, old_pid, new_pid) = commit_held(&dev, &obs, "1.0.0-bghold", "2.0.0-bghold");
    // The new version has the traffic; the old one answers on its own port, without traffic.
    assert_eq!(request(dev.app_port).as_deref(), Ok("2.0.0-bghold"));
    assert_eq!(request(port_b).as_deref(), Ok("2.0.0-bghold"));
    assert_eq!(request(port_a).as_deref(), Ok("1.0.0-bghold"));
    // Heartbeats look at the instance with the traffic.
    let beats = obs.seen.lock().unwrap().heartbeats;
    wait_until("a heartbeat with 2.0.0's health", PATIENCE, || {
        let seen = obs.seen.lock().unwrap();
        let app = &seen.last_heartbeat.as_ref()?.app;
        (seen.heartbeats > beats + 1 && app.version.as_deref() == Some("2.0.0-bghold"))
            .then_some(())
    });
    let r = obs.wait_state("state says 2.0.0 active", |r| {
        r.applied_sequence == 2 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(
        r.active.as_ref().map(|i| i.version.as_str()),
        Some("2.0.0-bghold")
    );
    assert_eq!(pids_of("1.0.0-bghold"), [old_pid]);

    // The coordinator rolls the wave back: the previous release, under traffic.
    let hammer = Hammer::start(dev.app_port, 2);
    let direct = Hammer::start(port_a, 1);
    wait_until("the hammers to get answers", PATIENCE, || {
        (hammer.log.lock().unwrap().len() > 20 && direct.log.lock().unwrap().len() > 10)
            .then_some(())
    });
    obs.publish_desired(&held(&dev, 3, s1, false));
    obs.wait_event("1.0.0 committed again", PATIENCE, |e| {
        e.sequence == 3 && matches!(e.kind, EventKind::Committed { .. })
    });
    wait_until("2.0.0's instance gone", PATIENCE, || {
        (!pids_of("2.0.0-bghold").contains(&new_pid)).then_some(())
    });
    thread::sleep(Duration::from_millis(300));
    let log = hammer.finish();
    let direct_log = direct.finish();
    // The old version: the same process all along, and it answers through the service port.
    assert_eq!(pids_of("1.0.0-bghold"), [old_pid]);
    assert!(pids_of("2.0.0-bghold").is_empty());
    assert_eq!(request(dev.app_port).as_deref(), Ok("1.0.0-bghold"));
    let direct_failed: Vec<_> = direct_log.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        direct_failed.is_empty(),
        "the old instance failed requests: {direct_failed:?}"
    );
    // A switch, not a swap: no request through the service port failed, and it went from
    // 2.0.0 to 1.0.0.
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(
        log.first().map(|(_, r)| r.as_deref()),
        Some(Ok("2.0.0-bghold"))
    );
    assert_eq!(
        log.last().map(|(_, r)| r.as_deref()),
        Some(Ok("1.0.0-bghold"))
    );
    // Nothing downloaded, installed or started: verified, switched, committed.
    let steps = obs.kinds_at(3);
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(unique, ["Verified", "Swapped", "Committed"], "{steps:?}");
    let r = obs.wait_state("state says 1.0.0 active", |r| {
        r.applied_sequence == 3 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(
        r.active.as_ref().map(|i| i.version.as_str()),
        Some("1.0.0-bghold")
    );
    assert_eq!(
        r.standby.as_ref().map(|i| i.version.as_str()),
        Some("2.0.0-bghold")
    );
    assert_eq!(r.highest_counter, 2, "the counter went down");
    assert_eq!(
        std::fs::read_link(dev.root().join("active")).unwrap(),
        Path::new("slot-a")
    );
    let j = dev.idle_at(3).expect("the journal idle at 3");
    assert_eq!((j.active, j.warm), (Some(Slot::A), None));
    let stderr = agent.stderr();
    for line in [
        "keeping 1.0.0-bghold warm until the coordinator confirms the wave",
        "switching back to 1.0.0-bghold, which never stopped",
    ] {
        assert!(stderr.contains(line), "no {line:?} in the agent's log");
    }
    obs.assert_no_gap();
}

#[test]
fn blue_green_hold_ends_when_the_wave_is_confirmed() {
    let (dev, env, port_a, _port_b) = bg_device("bg-confirm");
    let obs = Observer::new(dev.broker_port, &dev.id);
    let agent = start(&dev, &env);
    let (_, s2, old_pid, new_pid) = commit_held(&dev, &obs, "1.0.0-bgconfirm", "2.0.0-bgconfirm");
    // Heartbeats watch the instance with the traffic, not the warm one: a crash of the new
    // version is counted (its supervisor restarts it).
    // SAFETY: kill(2) on the test's own grandchild.
    unsafe {
        libc::kill(new_pid, libc::SIGKILL);
    }
    let new_pid = wait_until("2.0.0 restarted by its supervisor", PATIENCE, || {
        let p = pids_of("2.0.0-bgconfirm");
        (p.len() == 1 && p[0] != new_pid).then(|| p[0])
    });
    wait_until("a heartbeat counting 2.0.0's restart", PATIENCE, || {
        let seen = obs.seen.lock().unwrap();
        let app = &seen.last_heartbeat.as_ref()?.app;
        (app.restarts_total >= 1 && app.version.as_deref() == Some("2.0.0-bgconfirm")).then_some(())
    });
    // The same release republished with hold (as the coordinator does when it changes the
    // report interval): still warm.
    obs.publish_desired(&held(&dev, 3, s2.clone(), true));
    obs.wait_state("sequence 3 applied", |r| {
        r.applied_sequence == 3 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(dev.journal().unwrap().warm, Some(Slot::A));
    assert_eq!(pids_of("1.0.0-bgconfirm"), [old_pid]);
    assert_eq!(request(port_a).as_deref(), Ok("1.0.0-bgconfirm"));
    // Confirmed: the same release without hold stops the old instance; the new one stays.
    obs.publish_desired(&held(&dev, 4, s2, false));
    wait_until("1.0.0's instance gone", PATIENCE, || {
        pids_of("1.0.0-bgconfirm").is_empty().then_some(())
    });
    obs.wait_state("sequence 4 applied", |r| {
        r.applied_sequence == 4 && r.phase == UpdatePhase::Idle
    });
    assert_eq!(pids_of("2.0.0-bgconfirm"), [new_pid]);
    assert_eq!(request(dev.app_port).as_deref(), Ok("2.0.0-bgconfirm"));
    let j = dev.idle_at(4).expect("the journal idle at 4");
    assert_eq!((j.active, j.warm), (Some(Slot::B), None));
    let line = "wave confirmed: stopping 1.0.0-bgconfirm";
    assert!(
        agent.stderr().contains(line),
        "no {line:?} in the agent's log"
    );
}
