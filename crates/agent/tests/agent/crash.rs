//! The crash matrix: kill -9 at every fault point, several runs each, then restart: the device
//! must always end on a complete, verified version with a consistent journal, and no event may
//! be lost. Needs `--features fault-points`. Every device has a data directory in its agent's
//! `app.data_dirs`, which the new versions migrate (schema 1 → 2): a device that ends on 1.0.0
//! must have its unmigrated data back.
//!
//! The hold matrix does the same for a blue-green release committed with `Desired.hold` (the
//! old version kept warm beside it): the agent is killed at each point of what the
//! coordinator's decision sets off (the switch back to the warm version, or the `Promote` that
//! stops it), and the device must end running the release the coordinator asked for, alone.
//! The stop matrix kills it while a blue-green update without hold stops an instance at its
//! end (the old one at the commit, the new one after a switch back or a warm-up rollback):
//! the device must end on the release the outcome says, alone, the outcome's event sent once.
#![cfg(feature = "fault-points")]

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fleet_agent::fault::{BLUE_GREEN_POINTS, HOLD_POINTS, POINTS, STOP_POINTS};
use fleet_agent::machine::{Phase, State};
use fleet_proto::SignedRelease;
use fleet_proto::device::{Desired, EventKind, OutcomeKind, RollbackReason, Slot, UpdatePhase};
use fleet_proto::release::{Release, RollbackTo, StrategyKind};

use crate::bluegreen::{bg_device, held, start};
use crate::support::*;

const RUNS: u32 = 5;
const WORKERS: usize = 4;

struct Fixture {
    base: Device,
    good: SignedRelease,
    bad: SignedRelease,
    versions: BTreeMap<String, Version>,
}

/// A release of `v` whose trial is short: two good probes 100 ms apart.
fn matrix_unsigned(dir: &Path, counter: u64, v: &Version) -> Release {
    let (path, sha, size) = artifact(dir, v);
    let mut r = release(counter, v, format!("file://{}", path.display()), sha, size);
    r.trial.good_probes = 2;
    r.trial.probe_interval = Duration::from_millis(100);
    r
}

fn matrix_release(dir: &Path, counter: u64, v: &Version) -> SignedRelease {
    SignedRelease::sign(&matrix_unsigned(dir, counter, v), &key())
}

/// Which points only the rollback path reaches.
fn needs_bad_release(point: &str) -> bool {
    matches!(
        point,
        "rollback-after-swap" | "restore-midway" | "restore-done"
    )
}

/// The versions a matrix installs, by their version string.
fn by_version(versions: impl IntoIterator<Item = Version>) -> BTreeMap<String, Version> {
    versions
        .into_iter()
        .map(|v| (v.version.clone(), v))
        .collect()
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
    copy_device(&fx.base, &dev);
    copy_tree(&data_dir(&fx.base), &data_dir(&dev));
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
    check_events_delivered(&dev, &obs)?;
    drop(agent);
    Ok((hit, ended_on))
}

/// A copy of `base` (its slots, `active` link and journal) under a new device's directories,
/// without the base device's events.
fn copy_device(base: &Device, dev: &Device) {
    copy_tree(&base.root(), &dev.root());
    copy_tree(&base.state_dir(), &dev.state_dir());
    let _ = std::fs::remove_dir_all(dev.state_dir().join("outbox"));
    let _ = std::fs::remove_file(dev.state_dir().join("counters"));
}

/// Every event reaches the broker, none lost: the outbox drains and the seqs have no gap.
fn check_events_delivered(dev: &Device, obs: &Observer) -> Result<(), String> {
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
    .ok_or_else(|| format!("events lost: {:?}", obs.event_names()))
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

/// The journal is idle, both its copies check out, the `active` link points where it says,
/// and every slot it vouches for holds a complete install of its version; returns the active
/// slot.
fn check_idle_and_complete(
    versions: &BTreeMap<String, Version>,
    dev: &Device,
    state: &State,
) -> Result<Slot, String> {
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
        let want = versions.get(v).ok_or(format!("unknown version {v}"))?;
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
    Ok(active)
}

/// Checks the device is on a complete, verified version; returns that version.
fn check_consistent(fx: &Fixture, dev: &Device, state: &State) -> Result<String, String> {
    let active = check_idle_and_complete(&fx.versions, dev, state)?;
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
    let fx = Fixture {
        good: matrix_release(base.dir.path(), 2, &v2),
        bad: matrix_release(base.dir.path(), 3, &v2bad),
        versions: by_version([v1, v2, v2bad]),
        base,
    };
    run_matrix(POINTS, |p| p.to_string(), |p, run| one_run(&fx, p, run));
}

/// A fault point's (or a row's) results: runs, runs the agent was killed in, violations, and
/// the versions the device ended on.
type Tally = (u32, u32, Vec<String>, BTreeMap<String, u32>);

/// Runs `one(row, run)` `RUNS` times for every row on `WORKERS` threads; `one` says whether
/// the agent was killed and the version the device ended on, or what was wrong. Prints the
/// table, then fails on any violation or a row whose fault point never killed the agent.
fn run_matrix<R: Sync>(
    rows: &[R],
    label: impl Fn(&R) -> String,
    one: impl Fn(&R, u32) -> Result<(bool, String), String> + Sync,
) {
    let queue: Mutex<VecDeque<(usize, u32)>> = Mutex::new(
        (0..rows.len())
            .flat_map(|i| (0..RUNS).map(move |r| (i, r)))
            .collect(),
    );
    let results: Mutex<BTreeMap<usize, Tally>> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                loop {
                    let Some((i, run)) = queue.lock().unwrap().pop_front() else {
                        return;
                    };
                    let outcome = one(&rows[i], run);
                    let mut r = results.lock().unwrap();
                    let entry = r.entry(i).or_default();
                    entry.0 += 1;
                    match outcome {
                        Ok((hit, ended_on)) => {
                            entry.1 += u32::from(hit);
                            *entry.3.entry(ended_on).or_default() += 1;
                        }
                        Err(v) => entry.2.push(format!("run {run}: {v}")),
                    }
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    let labels: Vec<String> = rows.iter().map(label).collect();
    let w = labels.iter().map(String::len).max().unwrap_or(0).max(24);
    let mut report = format!(
        "\n{:<w$} runs  killed  violations  ended on\n",
        "fault point"
    );
    let mut violations = Vec::new();
    let mut unreached = Vec::new();
    for (i, p) in labels.iter().enumerate() {
        let (runs, hits, v, ended) = results.get(&i).cloned().unwrap_or_default();
        report += &format!("{p:<w$} {runs:>4}  {hits:>6}  {:>10}  {ended:?}\n", v.len());
        violations.extend(v.iter().map(|v| format!("{p}: {v}")));
        if hits == 0 {
            unreached.push(p.as_str());
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

// ---------------------------------------------------------------------------------------------
// Blue-green: what both blue-green matrices share. The device runs 1.0.0 committed in slot A
// (port A) behind the agent's forwarder; the agent is killed at a fault point, restarted, and
// must end on one instance of the right release with every event of the update delivered.

/// A device with 1.0.0 committed in slot A the ordinary way, its agent stopped; 1.0.0's
/// version and signed release.
fn committed_v1(name: &str) -> (Device, Version, SignedRelease) {
    let base = Device::new(name, broker());
    let obs = Observer::new(base.broker_port, &base.id);
    let mut agent = Agent::start(&base, &[]);
    let v1 = version("1.0.0", &[]);
    let s1 = matrix_release(base.dir.path(), 1, &v1);
    obs.publish_desired(&desired(&base.id, 1, Some(s1.clone()), 0));
    wait_until("1.0.0 committed", PATIENCE, || base.idle_at(1));
    base.wait_serving("1.0.0");
    agent.kill();
    wait_port_free(base.app_port);
    (base, v1, s1)
}

/// A blue-green release of `v` with the matrices' short trial.
fn blue_green_unsigned(dir: &Path, counter: u64, v: &Version) -> Release {
    let mut r = matrix_unsigned(dir, counter, v);
    r.strategy.kind = StrategyKind::BlueGreen;
    r
}

/// How a run ends, wherever the agent was killed.
struct Ending {
    /// The desired state the run is about.
    sequence: u64,
    /// The only version running, from this slot, which the `active` link points to.
    version: &'static str,
    slot: Slot,
    /// The reported last outcome: its sequence, version and result.
    outcome: (u64, &'static str, OutcomeKind),
    highest_counter: u64,
    /// The version remembered as failed, if any.
    failed: Option<&'static str>,
    /// The kinds of `sequence`'s events, in order (repeats of one kind counted once; the
    /// outcome's own event must come exactly once).
    events: &'static [&'static str],
}

/// The device's app instances as (version, port), by version.
fn running(dev: &Device) -> Vec<(String, u16)> {
    let mut v: Vec<(String, u16)> = instances_of(dev)
        .into_iter()
        .map(|i| (i.version, i.port))
        .collect();
    v.sort();
    v
}

/// Waits until the agent died at its fault point, or carried `end` out without reaching it
/// (idle at its sequence, only `alone` running); after a kill, restarts it (with `env`) once
/// its instances died with it. Whether it was killed, and the restarted agent.
fn killed_then_restarted(
    dev: &Device,
    agent: &mut Agent,
    env: &[(String, String)],
    end: &Ending,
    alone: &[(String, u16)],
) -> Result<(bool, Option<Agent>), String> {
    let exited = wait_until_opt(|| {
        let ended = dev.idle_at(end.sequence).is_some() && running(dev) == alone;
        // Asked after looking: an agent alive now was alive when the instances were counted.
        match agent.child.try_wait().unwrap() {
            Some(status) => Some(Some(status)),
            None => ended.then_some(None),
        }
    })
    .ok_or_else(|| {
        format!(
            "neither killed nor done; journal {:?}, instances {:?}",
            dev.journal().map(|s| s.phase.wire()),
            running(dev)
        )
    })?;
    match exited {
        Some(status) if status.signal() == Some(9) => {
            // Both instances die with the agent (PR_SET_PDEATHSIG).
            wait_until_opt(|| running(dev).is_empty().then_some(()))
                .ok_or_else(|| format!("instances outlived the agent: {:?}", running(dev)))?;
            wait_port_free(dev.app_port);
            Ok((true, Some(start(dev, env))))
        }
        Some(status) => Err(format!("the agent exited: {status}")),
        None => Ok((false, None)),
    }
}

/// What an operator needs at the end, killed or not: the release that should run runs alone
/// from the active slot and serves, the journal is idle on it with nothing warm, the reported
/// state and the events say so, the outcome's event delivered exactly once.
fn check_ending(
    versions: &BTreeMap<String, Version>,
    dev: &Device,
    obs: &Observer,
    end: &Ending,
    alone: &[(String, u16)],
) -> Result<(), String> {
    let sequence = end.sequence;
    wait_until_opt(|| dev.idle_at(sequence)).ok_or_else(|| {
        format!(
            "never converged; journal {:?}",
            dev.journal().map(|s| s.phase.wire())
        )
    })?;
    // A restart journals the end of an update before it moves the link and starts the app:
    // once the app runs, the link has moved.
    wait_until_opt(|| (running(dev) == alone).then_some(()))
        .ok_or_else(|| format!("instances {:?}, want only {alone:?}", running(dev)))?;
    let state = dev.journal().ok_or("no journal")?;
    let active = check_idle_and_complete(versions, dev, &state)?;
    if active != end.slot || state.warm.is_some() {
        return Err(format!(
            "journal: active {active}, warm {:?}; want active {}, nothing warm",
            state.warm, end.slot
        ));
    }
    let failed: Vec<&str> = state.failed.iter().map(|f| f.version.as_str()).collect();
    if failed != Vec::from_iter(end.failed) {
        return Err(format!(
            "remembered as failed: {failed:?}, want {:?}",
            end.failed
        ));
    }
    wait_until_opt(|| (dev.app_version().as_deref() == Some(end.version)).then_some(()))
        .ok_or_else(|| format!("the service port does not serve {}", end.version))?;
    // What the coordinator sees: the latest reported state.
    let reported = wait_until_opt(|| {
        let seen = obs.seen.lock().unwrap();
        seen.states
            .last()
            .filter(|r| r.applied_sequence >= sequence && r.phase == UpdatePhase::Idle)
            .cloned()
    })
    .ok_or_else(|| format!("no idle state reported at sequence {sequence}"))?;
    let outcome = reported
        .last_outcome
        .as_ref()
        .map(|o| (o.sequence, o.version.as_str(), &o.result));
    let (o_sequence, o_version, o_result) = &end.outcome;
    let reported_active = reported.active.as_ref().map(|i| i.version.as_str());
    if reported.applied_sequence != sequence
        || reported_active != Some(end.version)
        || outcome != Some((*o_sequence, *o_version, o_result))
        || reported.highest_counter != end.highest_counter
    {
        return Err(format!(
            "reported: applied {}, active {reported_active:?}, outcome {outcome:?}, highest counter {}",
            reported.applied_sequence, reported.highest_counter
        ));
    }
    check_events_delivered(dev, obs)?;
    let mut by_seq = BTreeMap::new();
    for e in obs.events().into_iter().filter(|e| e.sequence == sequence) {
        by_seq.insert(e.seq, e.kind);
    }
    let mut events: Vec<String> = by_seq.values().map(kind_name).collect();
    events.dedup();
    if events != end.events {
        return Err(format!(
            "sequence {sequence}'s events {events:?}, want {:?}",
            end.events
        ));
    }
    // The outcome's own event, once (a repeat would be a second emission: the outbox's
    // re-sends keep their seq).
    if *o_sequence == sequence {
        let outcomes: Vec<&EventKind> = by_seq
            .values()
            .filter(|k| {
                matches!(
                    k,
                    EventKind::Committed { .. }
                        | EventKind::RolledBack { .. }
                        | EventKind::Failed { .. }
                        | EventKind::Refused { .. }
                )
            })
            .collect();
        let right = match (o_result, outcomes.as_slice()) {
            (OutcomeKind::Committed, [EventKind::Committed { slot }]) => *slot == end.slot,
            (OutcomeKind::RolledBack(want), [EventKind::RolledBack { reason, restored }]) => {
                reason == want && restored.as_deref() == Some(end.version)
            }
            _ => false,
        };
        if !right {
            return Err(format!(
                "sequence {sequence}'s outcome events {outcomes:?}, want one for {o_result:?}"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Blue-green hold: 2.0.0 committed with 1.0.0 kept warm beside it; then the coordinator decides,
// and the agent is killed at each point of what the decision sets off.

/// What the coordinator sends (sequence 3, without hold) once 2.0.0 is committed with 1.0.0
/// kept warm.
#[derive(Clone, Copy, Debug)]
enum Decision {
    /// The wave is rolled back: 1.0.0, switched back to (`Returning`), no download.
    RollBack,
    /// The wave is confirmed: 2.0.0 again; the warm 1.0.0 stops (`Promote`).
    Confirm,
    /// Another release (3.0.0, canary-rolling) before the wave was confirmed: the warm 1.0.0
    /// stops (`Promote`), then the ordinary path installs 3.0.0 over its slot.
    Replace,
}

/// Each hold fault point under the decisions that reach it.
const HOLD_ROWS: &[(&str, Decision)] = &[
    // Returning journaled, the traffic still on 2.0.0.
    ("bluegreen-before-switch-back", Decision::RollBack),
    // The traffic on 1.0.0, the journal still Returning, the link still on 2.0.0's slot.
    ("bluegreen-switched-back", Decision::RollBack),
    // The journal Idle on 1.0.0, 2.0.0's instance drained but not stopped yet.
    ("bluegreen-stop-standby", Decision::RollBack),
    // The journal Idle without warm, 1.0.0's instance drained but not stopped yet.
    ("bluegreen-promote", Decision::Confirm),
    // The journal Downloading 3.0.0, 1.0.0's instance drained but not stopped yet.
    ("bluegreen-promote", Decision::Replace),
];

struct HoldFixture {
    /// 1.0.0 committed in slot A the ordinary way.
    base: Device,
    v1: SignedRelease,
    /// Blue-green, allowing a rollback to 1.0.0 (as a coordinator's rollback needs).
    v2: SignedRelease,
    v3: SignedRelease,
    versions: BTreeMap<String, Version>,
}

impl Decision {
    fn desired(self, fx: &HoldFixture, dev: &Device) -> Desired {
        let release = match self {
            Decision::RollBack => &fx.v1,
            Decision::Confirm => &fx.v2,
            Decision::Replace => &fx.v3,
        };
        held(dev, 3, release.clone(), false)
    }

    fn ending(self) -> Ending {
        match self {
            // Committed on the version that was kept warm: nothing downloaded or installed.
            Decision::RollBack => Ending {
                sequence: 3,
                version: "1.0.0",
                slot: Slot::A,
                outcome: (3, "1.0.0", OutcomeKind::Committed),
                highest_counter: 2,
                failed: None,
                events: &["Verified", "Swapped", "Committed"],
            },
            // Nothing to do but stop 1.0.0: no event, the outcome stays 2.0.0's commit.
            Decision::Confirm => Ending {
                sequence: 3,
                version: "2.0.0",
                slot: Slot::B,
                outcome: (2, "2.0.0", OutcomeKind::Committed),
                highest_counter: 2,
                failed: None,
                events: &[],
            },
            Decision::Replace => Ending {
                sequence: 3,
                version: "3.0.0",
                slot: Slot::A,
                outcome: (3, "3.0.0", OutcomeKind::Committed),
                highest_counter: 3,
                failed: None,
                events: ORDINARY_UPDATE_EVENTS,
            },
        }
    }
}

/// Whether the agent died at the point, and the version the device ended on.
fn hold_run(
    fx: &HoldFixture,
    point: &str,
    decision: Decision,
    run: u32,
) -> Result<(bool, String), String> {
    let (dev, env, port_a, port_b) = bg_device(&format!("hold-{run}"));
    let port = |slot: Slot| match slot {
        Slot::A => port_a,
        Slot::B => port_b,
    };
    copy_device(&fx.base, &dev);
    let obs = Observer::new(dev.broker_port, &dev.id);
    let mut faulty = env.to_vec();
    faulty.push(("FLEET_AGENT_FAULT".into(), format!("{point}@1")));
    let mut agent = start(&dev, &faulty);
    // The hold: 2.0.0 committed and serving, 1.0.0 running beside it without traffic.
    obs.publish_desired(&held(&dev, 2, fx.v2.clone(), true));
    let j = wait_until_opt(|| dev.idle_at(2)).ok_or_else(|| {
        format!(
            "2.0.0 never committed with hold; journal {:?}",
            dev.journal().map(|s| s.phase.wire())
        )
    })?;
    if (j.active, j.warm) != (Some(Slot::B), Some(Slot::A)) {
        return Err(format!(
            "after the held commit: active {:?}, warm {:?}",
            j.active, j.warm
        ));
    }
    let both = vec![("1.0.0".to_string(), port_a), ("2.0.0".to_string(), port_b)];
    wait_until_opt(|| (running(&dev) == both).then_some(()))
        .ok_or_else(|| format!("held: instances {:?}, want {both:?}", running(&dev)))?;

    obs.publish_desired(&decision.desired(fx, &dev));
    let end = decision.ending();
    let alone = vec![(end.version.to_string(), port(end.slot))];
    // Every point here comes before the instance it is about to stop has stopped.
    let (hit, _restarted) = killed_then_restarted(&dev, &mut agent, &env, &end, &alone)?;
    check_ending(&fx.versions, &dev, &obs, &end, &alone)?;
    drop(agent);
    Ok((hit, end.version.to_string()))
}

#[test]
fn kill_during_a_blue_green_hold_then_restart() {
    for p in HOLD_POINTS {
        assert!(BLUE_GREEN_POINTS.contains(p), "{p}");
        assert!(HOLD_ROWS.iter().any(|(r, _)| r == p), "{p} has no row");
    }
    let (base, v1, s1) = committed_v1("hold-base");
    let v2 = version("2.0.0", &[]);
    let mut r2 = blue_green_unsigned(base.dir.path(), 2, &v2);
    r2.rollback_to = Some(RollbackTo {
        counter: 1,
        version: "1.0.0".into(),
    });
    let v3 = version("3.0.0", &[]);
    let fx = HoldFixture {
        v1: s1,
        v2: SignedRelease::sign(&r2, &key()),
        v3: matrix_release(base.dir.path(), 3, &v3),
        versions: by_version([v1, v2, v3]),
        base,
    };
    run_matrix(
        HOLD_ROWS,
        |(p, d)| format!("{p} ({d:?})"),
        |(p, d), run| hold_run(&fx, p, *d, run),
    );
}

// ---------------------------------------------------------------------------------------------
// Blue-green without hold: the update's last step journals how it ended, then stops an
// instance (the old one at the commit, the new one after a switch back or a warm-up
// rollback), which can take up to `blue_green.drain_timeout`; the agent is killed there.

/// How a blue-green update (sequence 2, from 1.0.0 in slot A) ends.
#[derive(Clone, Copy, Debug)]
enum BlueGreenEnd {
    /// 2.0.0 proves itself under traffic: committed; 1.0.0 drains and stops (`Promote`).
    Commit,
    /// 2.0.1 stops answering once it has the traffic (the test SIGSTOPs it in `Proving`): the
    /// traffic and the link go back to 1.0.0, then 2.0.1 stops (`StopStandby`).
    SwitchBack,
    /// 2.0.2 reports the wrong version while warming up: it stops (`StopStandby`); 1.0.0 kept
    /// the traffic all along.
    WarmUpRollback,
}

/// Each stop fault point under the ends that reach it.
const STOP_ROWS: &[(&str, BlueGreenEnd)] = &[
    // The journal Idle on 2.0.0, 1.0.0's instance drained but not stopped yet.
    ("bluegreen-promote", BlueGreenEnd::Commit),
    // The journal Idle on 1.0.0 (rolled back), 2.0.1's instance not stopped yet.
    ("bluegreen-stop-standby", BlueGreenEnd::SwitchBack),
    // The journal Idle on 1.0.0 (rolled back), 2.0.2's instance not stopped yet.
    ("bluegreen-stop-standby", BlueGreenEnd::WarmUpRollback),
];

struct StopFixture {
    /// 1.0.0 committed in slot A the ordinary way.
    base: Device,
    good: SignedRelease,
    stalls: SignedRelease,
    wrong: SignedRelease,
    versions: BTreeMap<String, Version>,
}

/// The agent's trial rule (`trial.failures_allowed` in the test config).
const FAILURES_ALLOWED: u32 = 3;

impl BlueGreenEnd {
    fn release(self, fx: &StopFixture) -> &SignedRelease {
        match self {
            BlueGreenEnd::Commit => &fx.good,
            BlueGreenEnd::SwitchBack => &fx.stalls,
            BlueGreenEnd::WarmUpRollback => &fx.wrong,
        }
    }

    fn ending(self) -> Ending {
        let rolled_back = |version: &'static str, reason: RollbackReason, events| Ending {
            sequence: 2,
            version: "1.0.0",
            slot: Slot::A,
            outcome: (2, version, OutcomeKind::RolledBack(reason)),
            highest_counter: 2,
            failed: Some(version),
            events,
        };
        match self {
            BlueGreenEnd::Commit => Ending {
                sequence: 2,
                version: "2.0.0",
                slot: Slot::B,
                outcome: (2, "2.0.0", OutcomeKind::Committed),
                highest_counter: 2,
                failed: None,
                events: &[
                    "DownloadStarted",
                    "DownloadFinished",
                    "Verified",
                    "Installed",
                    "TrialStarted",
                    "Swapped",
                    "Committed",
                ],
            },
            BlueGreenEnd::SwitchBack => rolled_back(
                "2.0.1",
                RollbackReason::Unresponsive {
                    failures: FAILURES_ALLOWED,
                },
                &[
                    "DownloadStarted",
                    "DownloadFinished",
                    "Verified",
                    "Installed",
                    "TrialStarted",
                    "Swapped",
                    "RolledBack",
                ],
            ),
            BlueGreenEnd::WarmUpRollback => rolled_back(
                "2.0.2",
                RollbackReason::WrongVersion {
                    expected: "2.0.2".into(),
                    reported: "0.0.0".into(),
                },
                &[
                    "DownloadStarted",
                    "DownloadFinished",
                    "Verified",
                    "Installed",
                    "TrialStarted",
                    "RolledBack",
                ],
            ),
        }
    }
}

/// Whether the agent died at the point, and the version the device ended on.
fn stop_run(
    fx: &StopFixture,
    point: &str,
    how: BlueGreenEnd,
    run: u32,
) -> Result<(bool, String), String> {
    let (dev, env, port_a, port_b) = bg_device(&format!("bgstop-{run}"));
    copy_device(&fx.base, &dev);
    let obs = Observer::new(dev.broker_port, &dev.id);
    let mut faulty = env.to_vec();
    faulty.push(("FLEET_AGENT_FAULT".into(), format!("{point}@1")));
    let mut agent = start(&dev, &faulty);
    let old = vec![("1.0.0".to_string(), port_a)];
    wait_until_opt(|| (running(&dev) == old).then_some(()))
        .ok_or_else(|| format!("before the update: instances {:?}", running(&dev)))?;
    obs.publish_desired(&desired(&dev.id, 2, Some(how.release(fx).clone()), 0));
    if let BlueGreenEnd::SwitchBack = how {
        // Under traffic (the journal says Proving), the new instance stops answering.
        let pid = wait_until_opt(|| {
            let proving = dev.journal().is_some_and(
                |s| matches!(&s.phase, Phase::Proving { job, .. } if job.sequence == 2),
            );
            let new = instances_of(&dev)
                .into_iter()
                .find(|i| i.version == "2.0.1" && i.port == port_b);
            new.filter(|_| proving).map(|i| i.pid)
        })
        .ok_or_else(|| {
            format!(
                "2.0.1 never under traffic; journal {:?}",
                dev.journal().map(|s| s.phase.wire())
            )
        })?;
        // SAFETY: kill(2) on the test's own grandchild.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
    }
    let end = how.ending();
    let alone = vec![(
        end.version.to_string(),
        if end.slot == Slot::A { port_a } else { port_b },
    )];
    let (hit, _restarted) = killed_then_restarted(&dev, &mut agent, &env, &end, &alone)?;
    check_ending(&fx.versions, &dev, &obs, &end, &alone)?;
    drop(agent);
    Ok((hit, end.version.to_string()))
}

#[test]
fn kill_while_a_blue_green_update_stops_an_instance_then_restart() {
    for p in STOP_POINTS {
        assert!(BLUE_GREEN_POINTS.contains(p), "{p}");
        assert!(STOP_ROWS.iter().any(|(r, _)| r == p), "{p} has no row");
    }
    let (base, v1, _) = committed_v1("bgstop-base");
    let dir = base.dir.path();
    let good = version("2.0.0", &[]);
    let stalls = version("2.0.1", &[]);
    // Long enough under traffic for the test to catch it there, and a deadline that leaves
    // room for twice as many probes on a loaded machine.
    let mut r_stalls = blue_green_unsigned(dir, 2, &stalls);
    r_stalls.trial.good_probes = 10;
    r_stalls.trial.deadline = Duration::from_secs(30);
    let wrong = version("2.0.2", &["--report-version", "0.0.0"]);
    let fx = StopFixture {
        good: SignedRelease::sign(&blue_green_unsigned(dir, 2, &good), &key()),
        stalls: SignedRelease::sign(&r_stalls, &key()),
        wrong: SignedRelease::sign(&blue_green_unsigned(dir, 2, &wrong), &key()),
        versions: by_version([v1, good, stalls, wrong]),
        base,
    };
    run_matrix(
        STOP_ROWS,
        |(p, e)| format!("{p} ({e:?})"),
        |(p, e), run| stop_run(&fx, p, *e, run),
    );
}
