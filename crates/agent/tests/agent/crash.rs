//! The crash matrix: kill -9 at every fault point, several runs each, then restart: the device
//! must always end on a complete, verified version with a consistent journal, and no event may
//! be lost. Needs `--features fault-points`. Every device has a data directory in its agent's
//! `app.data_dirs`, which the new versions migrate (schema 1 → 2): a device that ends on 1.0.0
//! must have its unmigrated data back.
#![cfg(feature = "fault-points")]

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_agent::fault::POINTS;
use fleet_agent::machine::Phase;
use fleet_proto::SignedRelease;
use fleet_proto::device::Slot;

use crate::support::*;

const RUNS: u32 = 5;
const WORKERS: usize = 4;

struct Fixture {
    base: Device,
    good: SignedRelease,
    bad: SignedRelease,
    versions: BTreeMap<String, Version>,
}

fn matrix_release(dir: &Path, counter: u64, v: &Version) -> SignedRelease {
    let (path, sha, size) = artifact(dir, v);
    let mut r = release(counter, v, format!("file://{}", path.display()), sha, size);
    r.trial.good_probes = 2;
    r.trial.probe_interval = Duration::from_millis(100);
    SignedRelease::sign(&r, &key())
}

/// Which points only the rollback path reaches.
fn needs_bad_release(point: &str) -> bool {
    matches!(
        point,
        "rollback-after-swap" | "restore-midway" | "restore-done"
    )
}

fn data_dir(dev: &Device) -> std::path::PathBuf {
    dev.dir.path().join("data")
}

/// The agent snapshots the device's data directory; the app (which inherits the agent's
/// environment) keeps its schema there.
fn data_env(dev: &Device) -> [(&'static str, String); 2] {
    let d = data_dir(dev).display().to_string();
    [
        ("FLEET_AGENT__APP__DATA_DIRS", d.clone()),
        ("FLEET_DEMO_DATA_DIR", d),
    ]
}

fn start_with_data(dev: &Device, extra: &[(&str, &str)]) -> Agent {
    let env = data_env(dev);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    Agent::start(dev, &all)
}

/// Points reached several times per update: vary which hit kills.
fn nth(point: &str, run: u32) -> u32 {
    match point {
        "journal-before-rename" | "outbox-after-append" => run + 1,
        // A trial here takes two good probes.
        "trial-probing" => run % 2 + 1,
        _ => 1,
    }
}

/// Whether the fault point killed the agent, and the version the device ended on.
fn one_run(fx: &Fixture, point: &str, run: u32) -> Result<(bool, String), String> {
    let dev = Device::new(&format!("crash-{run}"), fx.base.broker_port);
    copy_tree(&fx.base.root(), &dev.root());
    copy_tree(&fx.base.state_dir(), &dev.state_dir());
    copy_tree(&data_dir(&fx.base), &data_dir(&dev));
    // Events of the base device are not this device's.
    let _ = std::fs::remove_dir_all(dev.state_dir().join("outbox"));
    let _ = std::fs::remove_file(dev.state_dir().join("counters"));
    let obs = Observer::new(dev.broker_port, &dev.id);
    let release = if needs_bad_release(point) {
        &fx.bad
    } else {
        &fx.good
    };
    obs.publish_desired(&desired(&dev.id, 2, Some(release.clone()), 0));
    let spec = format!("{point}@{}", nth(point, run));
    let mut agent = start_with_data(&dev, &[("FLEET_AGENT_FAULT", &spec)]);
    // Either the agent dies at the point, or the update finishes without reaching it.
    let hit = wait_until("the fault or the end of the update", PATIENCE, || {
        if let Some(status) = agent.child.try_wait().unwrap() {
            return Some(status.signal() == Some(9));
        }
        dev.idle_at(2).map(|_| false)
    });
    let _restarted;
    if hit {
        wait_port_free(dev.app_port);
        _restarted = start_with_data(&dev, &[]);
    }
    let state = match wait_until_opt(|| dev.idle_at(2)) {
        Some(s) => s,
        None => {
            return Err(format!(
                "never converged; journal {:?}",
                dev.journal().map(|s| s.phase.wire())
            ));
        }
    };
    let ended_on = check_consistent(fx, &dev, &state)?;
    // Every event reaches the broker, none lost.
    wait_until_opt(|| {
        let pending = std::fs::read_dir(dev.state_dir().join("outbox"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".ev"))
                    .count()
            })
            .unwrap_or(0);
        (pending == 0).then_some(())
    })
    .ok_or("the outbox never drained")?;
    wait_until_opt(|| {
        let seqs: std::collections::BTreeSet<u64> = obs.events().iter().map(|e| e.seq).collect();
        let max = seqs.iter().next_back().copied().unwrap_or(0);
        (seqs.len() as u64 == max).then_some(())
    })
    .ok_or_else(|| format!("events lost: {:?}", obs.event_names()))?;
    drop(agent);
    Ok((hit, ended_on))
}

fn wait_until_opt<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Checks the device is on a complete, verified version; returns that version.
fn check_consistent(
    fx: &Fixture,
    dev: &Device,
    state: &fleet_agent::machine::State,
) -> Result<String, String> {
    if !matches!(state.phase, Phase::Idle) {
        return Err(format!("phase {:?}", state.phase.wire()));
    }
    // Both journal copies check out.
    let prev = std::fs::read(dev.state_dir().join("journal.prev")).map_err(|e| e.to_string())?;
    fleet_agent::journal::decode(&prev).map_err(|e| format!("journal.prev: {e}"))?;
    let active = state.active.ok_or("no active slot")?;
    let link =
        std::fs::read_link(dev.root().join("active")).map_err(|e| format!("active link: {e}"))?;
    if link != Path::new(active.dir_name()) {
        return Err(format!("link points to {link:?}, journal says {active}"));
    }
    for slot in [Slot::A, Slot::B] {
        let Some(content) = state.slot(slot) else {
            continue;
        };
        let v = &content.installed.version;
        let dir = dev.root().join(slot.dir_name());
        let want = fx.versions.get(v).ok_or(format!("unknown version {v}"))?;
        let run =
            std::fs::read_to_string(dir.join("run")).map_err(|e| format!("{slot}/run: {e}"))?;
        let ver = std::fs::read_to_string(dir.join("VERSION"))
            .map_err(|e| format!("{slot}/VERSION: {e}"))?;
        let model = std::fs::metadata(dir.join("share/model.bin"))
            .map(|m| m.len())
            .unwrap_or(0);
        if run != launcher(want) || ver != *v || model != 300_000 {
            return Err(format!("{slot} does not hold a complete {v}"));
        }
    }
    let version = state
        .slot(active)
        .map(|c| c.installed.version.clone())
        .ok_or("active slot empty")?;
    // The data matches the version: 1.0.0 on its own unmigrated data, 2.0.x on migrated data.
    let data = data_dir(dev);
    let schema =
        std::fs::read_to_string(data.join("schema")).map_err(|e| format!("schema: {e}"))?;
    let migrated = data.join("migrated-by").exists();
    let want = if version == "1.0.0" {
        ("1\n", false)
    } else {
        ("2\n", true)
    };
    if (schema.as_str(), migrated) != want {
        return Err(format!(
            "{version} runs on data at schema {schema:?} (migrated-by present: {migrated})"
        ));
    }
    if state.highest.as_ref().map(|h| h.counter) < Some(1) {
        return Err("highest counter went down".into());
    }
    wait_until_opt(|| (dev.app_version().as_deref() == Some(version.as_str())).then_some(()))
        .ok_or_else(|| format!("the app does not serve the active {version}"))?;
    Ok(version)
}

#[test]
fn kill_at_every_fault_point_then_restart() {
    assert!(POINTS.len() >= 10);
    let base = Device::new("crash-base", broker());
    let obs = Observer::new(base.broker_port, &base.id);
    let mut agent = start_with_data(&base, &[]);
    let v1 = version("1.0.0", &[]);
    let s1 = matrix_release(base.dir.path(), 1, &v1);
    obs.publish_desired(&desired(&base.id, 1, Some(s1), 0));
    wait_until("1.0.0 committed", PATIENCE, || base.idle_at(1));
    base.wait_serving("1.0.0");
    agent.kill();
    wait_port_free(base.app_port);
    assert_eq!(
        std::fs::read_to_string(data_dir(&base).join("schema")).unwrap(),
        "1\n"
    );
    let mut v2 = version("2.0.0", &["--migrate"]);
    v2.hook = Some("#!/bin/sh\necho ok > hook-ran\n".into());
    let v2bad = version("2.0.1", &["--migrate", "--report-version", "0.0.0"]);
    let fx = Arc::new(Fixture {
        good: matrix_release(base.dir.path(), 2, &v2),
        bad: matrix_release(base.dir.path(), 3, &v2bad),
        versions: BTreeMap::from([
            ("1.0.0".to_string(), v1),
            ("2.0.0".to_string(), v2),
            ("2.0.1".to_string(), v2bad),
        ]),
        base,
    });

    let queue: Arc<Mutex<VecDeque<(&str, u32)>>> = Arc::new(Mutex::new(
        POINTS
            .iter()
            .flat_map(|p| (0..RUNS).map(move |r| (*p, r)))
            .collect(),
    ));
    // point → (runs, killed, violations, versions ended on)
    type Tally = (u32, u32, Vec<String>, BTreeMap<String, u32>);
    let results: Arc<Mutex<BTreeMap<&str, Tally>>> = Arc::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let (queue, results, fx) = (Arc::clone(&queue), Arc::clone(&results), Arc::clone(&fx));
            std::thread::spawn(move || {
                loop {
                    let Some((point, run)) = queue.lock().unwrap().pop_front() else {
                        return;
                    };
                    let outcome = one_run(&fx, point, run);
                    let mut r = results.lock().unwrap();
                    let entry = r.entry(point).or_default();
                    entry.0 += 1;
                    match outcome {
                        Ok((hit, ended_on)) => {
                            entry.1 += u32::from(hit);
                            *entry.3.entry(ended_on).or_default() += 1;
                        }
                        Err(v) => entry.2.push(format!("run {run}: {v}")),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let results = results.lock().unwrap();
    let mut report =
        String::from("\nfault point              runs  killed  violations  ended on\n");
    let mut violations = Vec::new();
    let mut unreached = Vec::new();
    for p in POINTS {
        let (runs, hits, v, ended) = results.get(p).cloned().unwrap_or_default();
        report += &format!("{p:<24} {runs:>4}  {hits:>6}  {:>10}  {ended:?}\n", v.len());
        violations.extend(v.iter().map(|v| format!("{p}: {v}")));
        if hits == 0 {
            unreached.push(*p);
        }
    }
    eprintln!("{report}");
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert!(
        unreached.is_empty(),
        "fault points never reached: {unreached:?}"
    );
}
