//! Table-driven tests of the update machine: a script of inputs, and after each the phase and
//! the kinds of actions expected, through one `check` helper.

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::device::{AppStatus, Desired, DeviceFacts, EventKind, OutcomeKind, Slot};
use fleet_proto::hex::Sha256;
use fleet_proto::release::*;
use fleet_proto::{DeviceId, SigningKey, UnixMillis};

use super::*;
use crate::trial::{HealthAnswer, Sample};

const NOW: UnixMillis = UnixMillis(1_795_773_600_000);

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

fn dev() -> DeviceId {
    DeviceId::new("cam-1").unwrap()
}

fn ctx() -> Ctx {
    Ctx {
        keys: vec![key().verifying_key()],
        skew: Duration::from_secs(60),
        device: dev(),
        facts: DeviceFacts {
            device_type: "rpi4".into(),
            arch: Arch::X86_64,
            region: "eu".into(),
            tags: vec![],
            agent_version: "0".into(),
            runtime: "process".into(),
            memory_total_bytes: 1 << 30,
            disk_total_bytes: 1 << 34,
        },
        trial_attempts: 2,
        failures_allowed: 2,
        restore_timeout: Duration::from_secs(30),
        data_dirs: Vec::new(),
        blue_green_refusal: None,
    }
}

fn release(counter: u64, version: &str) -> Release {
    Release {
        name: "app".into(),
        version: version.into(),
        counter,
        not_before: UnixMillis(NOW.0 - 1000),
        expires: UnixMillis(NOW.0 + 86_400_000),
        hardware: vec!["rpi4".into()],
        rollback_to: None,
        artifacts: BTreeMap::from([(
            Arch::X86_64,
            Artifact {
                url: "file:///a".into(),
                sha256: Sha256::of(version.as_bytes()),
                size: 100,
            },
        )]),
        run: Run {
            entrypoint: "run".into(),
            args: vec![],
            env: BTreeMap::new(),
        },
        resources: Resources {
            disk_bytes: 1000,
            memory_bytes: 1,
        },
        health: HealthCheck {
            endpoint: "http://127.0.0.1:{port}/health".into(),
            expected_version: version.into(),
            timeout: Duration::from_secs(1),
        },
        probe: None,
        trial: Trial {
            deadline: Duration::from_secs(60),
            good_probes: 2,
            probe_interval: Duration::from_secs(1),
        },
        strategy: Strategy {
            kind: StrategyKind::CanaryRolling,
            canary_percent: 5.0,
            waves: vec![100],
            canary_soak: Duration::from_secs(1),
            wave_soak: Duration::from_secs(1),
            approval: Approval::Auto,
        },
        target: Target::default(),
        thresholds: Thresholds::default(),
        container: None,
        data_dirs: Vec::new(),
    }
}

fn desired(sequence: u64, r: Option<&Release>, retry: u32) -> Input {
    desired_with(sequence, r, retry, false)
}

/// A desired state with the coordinator's `hold` (blue-green: keep the previous version warm
/// until the wave is confirmed).
fn desired_with(sequence: u64, r: Option<&Release>, retry: u32, hold: bool) -> Input {
    Input::Desired {
        desired: Desired {
            device: dev(),
            sequence,
            rollout: None,
            release: r.map(|r| SignedRelease::sign(r, &key())),
            report_interval: Duration::from_secs(10),
            retry,
            hold,
        },
        disk_free: 1 << 30,
    }
}

fn sample(version: &str, status: AppStatus) -> Sample {
    Sample {
        running: true,
        exits: 0,
        last_exit_code: None,
        restarts_in_window: 0,
        health: Some(HealthAnswer::Answered {
            status,
            version: version.into(),
        }),
        probe: None,
    }
}

fn probe(sequence: u64, s: Sample) -> Input {
    Input::Probe {
        sequence,
        sample: s,
    }
}

/// A compact name for an action, so the tables read as scripts.
fn name(a: &Action) -> String {
    match a {
        Action::Emit { kind, .. } => match kind {
            EventKind::DownloadStarted { .. } => "E:DownloadStarted".into(),
            EventKind::DownloadFinished { .. } => "E:DownloadFinished".into(),
            EventKind::Verified => "E:Verified".into(),
            EventKind::Installed { .. } => "E:Installed".into(),
            EventKind::Swapped { .. } => "E:Swapped".into(),
            EventKind::TrialStarted { .. } => "E:TrialStarted".into(),
            EventKind::Committed { .. } => "E:Committed".into(),
            EventKind::RolledBack { reason, .. } => format!("E:RolledBack({reason})"),
            EventKind::Refused { reason } => format!("E:Refused({reason})"),
            EventKind::Failed { reason } => format!("E:Failed({reason})"),
            // Kinds the update machine never emits (e.g. key rotations), when there are any.
            #[allow(unreachable_patterns)]
            other => format!("E:{other:?}"),
        },
        Action::Report => "Report".into(),
        Action::Download { .. } => "Download".into(),
        Action::Install { slot, .. } => format!("Install({slot})"),
        Action::DiscardStaging => "DiscardStaging".into(),
        Action::WipeSlot { slot } => format!("Wipe({slot})"),
        Action::Swap { to } => format!(
            "Swap({})",
            to.map(|s| s.to_string()).unwrap_or("none".into())
        ),
        Action::StartApp {
            slot,
            rollback: false,
        } => format!("Start({slot})"),
        Action::StartApp {
            slot,
            rollback: true,
        } => format!("StartPrevious({slot})"),
        Action::Snapshot { dirs, .. } => format!("Snapshot({})", dirs.join(",")),
        Action::Restore { .. } => "Restore".into(),
        Action::DropSnapshots => "DropSnapshots".into(),
        Action::StopApp => "Stop".into(),
        Action::Redeliver(_) => "Redeliver".into(),
        Action::SetReportInterval(_) => "Interval".into(),
        Action::StartStandby { slot } => format!("StartBeside({slot})"),
        Action::StopStandby { drain: false } => "StopBeside".into(),
        Action::StopStandby { drain: true } => "StopBeside(drained)".into(),
        Action::SwitchTraffic { to, .. } => format!("Traffic({to})"),
        Action::Promote { slot } => format!("Promote({slot})"),
    }
}

/// Runs `script` from `state`: each row is an input, the phase after it, and the actions (by
/// name, `Report` and `Interval` left out for brevity).
#[track_caller]
fn check(mut state: State, script: Vec<(Input, UpdatePhase, &[&str])>) -> State {
    let ctx = ctx();
    for (i, (input, phase, want)) in script.into_iter().enumerate() {
        let shown = format!("{input:?}").chars().take(80).collect::<String>();
        let (next, actions) = step(&ctx, state, input, NOW);
        let got: Vec<String> = actions
            .iter()
            .map(name)
            .filter(|n| n != "Report" && n != "Interval")
            .collect();
        assert_eq!(got, want, "row {i}: {shown}");
        assert_eq!(next.phase.wire(), phase, "row {i}: {shown}");
        state = next;
    }
    state
}

/// One row of a script: an input, the phase after it, the actions expected.
type Row<'a> = (Input, UpdatePhase, &'a [&'a str]);

/// The sequence and the release of a desired state (`desired`, `desired_hold`).
fn job_of(desired: &Input) -> (u64, Release) {
    let Input::Desired { desired, .. } = desired else {
        panic!("not a desired state: {desired:?}")
    };
    let release = desired
        .release
        .as_ref()
        .expect("a release")
        .decode_unverified()
        .expect("a release the tests signed");
    (desired.sequence, release)
}

/// From idle, the release of `desired` downloaded, verified and being installed into `slot`.
#[track_caller]
fn downloaded(state: State, desired: Input, slot: Slot) -> State {
    let (sequence, _) = job_of(&desired);
    let install = format!("Install({slot})");
    check(
        state,
        vec![
            (desired, UpdatePhase::Downloading, &["Download"]),
            (
                Input::Downloaded {
                    sequence,
                    result: Ok(()),
                },
                UpdatePhase::Installing,
                &["E:DownloadFinished", "E:Verified", &install],
            ),
        ],
    )
}

/// From idle, the ordinary path (no data snapshot) of `desired`'s release to its trial:
/// downloaded, installed into `slot`, swapped to and started.
#[track_caller]
fn to_trial(state: State, desired: Input, slot: Slot) -> State {
    let (sequence, _) = job_of(&desired);
    let (swap, start) = (format!("Swap({slot})"), format!("Start({slot})"));
    check(
        downloaded(state, desired, slot),
        vec![
            (
                Input::Installed {
                    sequence,
                    result: Ok(()),
                },
                UpdatePhase::Swapping,
                &["E:Installed", "DiscardStaging", &swap],
            ),
            (
                Input::Swapped { sequence },
                UpdatePhase::Trial,
                &["E:Swapped", &start, "E:TrialStarted"],
            ),
        ],
    )
}

/// The two healthy probes of `version` a trial needs (`good_probes` = 2): the first changes
/// nothing, the second leaves the machine in `phase` with the actions `then`.
fn good_probes<'a>(
    sequence: u64,
    version: &str,
    phase: UpdatePhase,
    then: &'a [&'a str],
) -> Vec<Row<'a>> {
    vec![
        (
            probe(sequence, sample(version, AppStatus::Healthy)),
            UpdatePhase::Trial,
            &[],
        ),
        (
            probe(sequence, sample(version, AppStatus::Healthy)),
            phase,
            then,
        ),
    ]
}

/// A fresh device's first install of `desired`'s release: the ordinary path into slot A,
/// committed after its trial.
#[track_caller]
fn first_install(desired: Input) -> State {
    let (sequence, release) = job_of(&desired);
    check(
        to_trial(State::fresh(), desired, Slot::A),
        good_probes(
            sequence,
            &release.version,
            UpdatePhase::Idle,
            &["E:Committed"],
        ),
    )
}

/// A device running v1 committed in slot A.
fn running_v1() -> State {
    let s = first_install(desired(1, Some(&release(1, "1.0")), 0));
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.applied_sequence, 1);
    assert_eq!(s.highest.as_ref().map(|h| h.counter), Some(1));
    s
}

/// v2 installed in B and on trial.
fn trial_v2() -> State {
    to_trial(
        running_v1(),
        desired(2, Some(&release(2, "2.0")), 0),
        Slot::B,
    )
}

#[test]
fn good_release_commits_and_keeps_the_previous_in_standby() {
    let s = check(
        trial_v2(),
        good_probes(2, "2.0", UpdatePhase::Idle, &["E:Committed"]),
    );
    assert_eq!(s.active, Some(Slot::B));
    assert_eq!(
        s.slot(Slot::A).map(|c| c.installed.version.as_str()),
        Some("1.0")
    );
    assert!(matches!(
        s.last_outcome.as_ref().map(|o| &o.result),
        Some(OutcomeKind::Committed)
    ));
}

#[test]
fn bad_release_rolls_back_and_is_remembered() {
    let s = check(
        trial_v2(),
        vec![
            (
                probe(2, sample("9.9", AppStatus::Healthy)),
                UpdatePhase::RollingBack,
                &["Swap(slot-a)", "StartPrevious(slot-a)"],
            ),
            // The old version answers: the rollback is complete.
            (
                probe(2, sample("1.0", AppStatus::Healthy)),
                UpdatePhase::Idle,
                &["E:RolledBack(health endpoint reported version 9.9, expected 2.0)"],
            ),
        ],
    );
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.applied_sequence, 2);
    assert_eq!(s.failed.len(), 1);
    // Asked again with the same retry: refused. With a higher retry: swapped back in without a
    // download, since slot B still holds it.
    let r2 = release(2, "2.0");
    check(
        s,
        vec![
            (
                desired(3, Some(&r2), 0),
                UpdatePhase::Idle,
                &[
                    "E:Refused(version 2.0 already failed its trial on this device; the coordinator must ask explicitly to retry it)",
                ],
            ),
            (
                desired(4, Some(&r2), 1),
                UpdatePhase::Swapping,
                &["E:Verified", "Swap(slot-b)"],
            ),
        ],
    );
}

#[test]
fn refusals_leave_everything_alone() {
    let s0 = running_v1();
    let mut expired = release(5, "5.0");
    expired.expires = UnixMillis(NOW.0 - 3_600_000);
    expired.not_before = UnixMillis(NOW.0 - 7_200_000);
    let mut wrong_hw = release(5, "5.0");
    wrong_hw.hardware = vec!["jetson".into()];
    let older = release(0, "0.9");
    let mut big = release(5, "5.0");
    big.resources.disk_bytes = 2 << 30;
    let other_key = SigningKey::from_bytes(&[9; 32]);
    let mut forged = SignedRelease::sign(&release(5, "5.0"), &key());
    forged.signature = SignedRelease::sign(&release(5, "5.0"), &other_key).signature;
    let cases: Vec<(Input, &str)> = vec![
        (desired(2, Some(&expired), 0), "expired at"),
        (desired(2, Some(&wrong_hw), 0), "not for device type rpi4"),
        (desired(2, Some(&older), 0), "below the highest accepted 1"),
        (
            desired(2, Some(&big), 0),
            "needs 2147483748 bytes of free disk, 1073741824 available",
        ),
        (
            Input::Desired {
                desired: Desired {
                    device: dev(),
                    sequence: 2,
                    rollout: None,
                    release: Some(forged),
                    report_interval: Duration::from_secs(10),
                    retry: 0,
                    hold: false,
                },
                disk_free: 1 << 30,
            },
            "bad signature",
        ),
    ];
    for (input, want) in cases {
        let (s, actions) = step(&ctx(), s0.clone(), input, NOW);
        let names: Vec<String> = actions.iter().map(name).collect();
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("E:Refused") && n.contains(want)),
            "{names:?} lacks {want}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("Swap")
                || n.starts_with("Download")
                || n.starts_with("Wipe"))
        );
        assert_eq!(s.active, s0.active);
        assert_eq!(
            (s.slot_a.clone(), s.slot_b.clone()),
            (s0.slot_a.clone(), s0.slot_b.clone())
        );
        assert_eq!(s.highest, s0.highest);
        assert_eq!(s.applied_sequence, 2);
    }
}

#[test]
fn signed_rollback_is_admitted_and_the_counter_never_goes_down() {
    // v2 authorises a rollback to v1 (counter 1).
    let mut r2 = release(2, "2.0");
    r2.rollback_to = Some(RollbackTo {
        counter: 1,
        version: "1.0".into(),
    });
    let s = check(
        to_trial(running_v1(), desired(2, Some(&r2), 0), Slot::B),
        good_probes(2, "2.0", UpdatePhase::Idle, &["E:Committed"]),
    );
    assert_eq!(s.highest.as_ref().map(|h| h.counter), Some(2));
    // A failed download of v3 does not raise the counter.
    let r3 = release(3, "3.0");
    let s = check(
        s,
        vec![
            (
                desired(3, Some(&r3), 0),
                UpdatePhase::Downloading,
                &["Download"],
            ),
            (
                Input::Downloaded {
                    sequence: 3,
                    result: Err(Failure::Download { detail: "x".into() }),
                },
                UpdatePhase::Idle,
                &["E:Failed(download failed: x)"],
            ),
        ],
    );
    assert_eq!(s.highest.as_ref().map(|h| h.counter), Some(2));
    // The coordinator republishes v1: admitted, and since slot A still holds it, swapped back
    // in without a download. The highest counter stays 2.
    let s = check(
        s,
        vec![(
            desired(4, Some(&release(1, "1.0")), 0),
            UpdatePhase::Swapping,
            &["E:Verified", "Swap(slot-a)"],
        )],
    );
    assert_eq!(s.highest.as_ref().map(|h| h.counter), Some(2));
    // Anything else below 2 is a downgrade.
    let s = check(
        s,
        vec![(
            Input::Swapped { sequence: 4 },
            UpdatePhase::Trial,
            &["E:Swapped", "Start(slot-a)", "E:TrialStarted"],
        )],
    );
    let _ = s;
}

#[test]
fn desired_is_level_triggered() {
    let s = running_v1();
    // Redelivery of the applied sequence (retained, after reconnect) does nothing.
    let r1 = release(1, "1.0");
    check(
        s.clone(),
        vec![(desired(1, Some(&r1), 0), UpdatePhase::Idle, &[])],
    );
    // None: keep what is installed.
    let s2 = check(
        s.clone(),
        vec![(desired(5, None, 0), UpdatePhase::Idle, &[])],
    );
    assert_eq!(s2.applied_sequence, 5);
    // Same release again under a new sequence: applied without work.
    let s3 = check(s, vec![(desired(6, Some(&r1), 0), UpdatePhase::Idle, &[])]);
    assert_eq!(s3.applied_sequence, 6);
    // While busy, the latest desired waits and is redelivered when the update ends.
    let s = trial_v2();
    let s = check(
        s,
        vec![
            (desired(7, None, 0), UpdatePhase::Trial, &[]),
            (desired(8, None, 0), UpdatePhase::Trial, &[]),
        ],
    );
    assert_eq!(s.pending.as_ref().map(|d| d.sequence), Some(8));
    check(
        s,
        good_probes(2, "2.0", UpdatePhase::Idle, &["E:Committed", "Redeliver"]),
    );
}

#[test]
fn journal_resolution_table() {
    let link_b = Input::Boot {
        link: Some(Slot::B),
    };
    let link_a = Input::Boot {
        link: Some(Slot::A),
    };
    // Idle: start the committed version; fix a stray link.
    check(
        running_v1(),
        vec![(
            Input::Boot {
                link: Some(Slot::A),
            },
            UpdatePhase::Idle,
            &["Wipe(slot-b)", "DropSnapshots", "Start(slot-a)"],
        )],
    );
    check(
        running_v1(),
        vec![(
            Input::Boot { link: None },
            UpdatePhase::Idle,
            &[
                "Wipe(slot-b)",
                "Swap(slot-a)",
                "DropSnapshots",
                "Start(slot-a)",
            ],
        )],
    );
    // Downloading: keep running v1, resume the download.
    let r2 = release(2, "2.0");
    let downloading = check(
        running_v1(),
        vec![(
            desired(2, Some(&r2), 0),
            UpdatePhase::Downloading,
            &["Download"],
        )],
    );
    check(
        downloading.clone(),
        vec![(
            link_a.clone(),
            UpdatePhase::Downloading,
            &["Wipe(slot-b)", "Start(slot-a)", "Download"],
        )],
    );
    // Installing: half-finished install discarded, download (re-check) again.
    let installing = check(
        downloading,
        vec![(
            Input::Downloaded {
                sequence: 2,
                result: Ok(()),
            },
            UpdatePhase::Installing,
            &["E:DownloadFinished", "E:Verified", "Install(slot-b)"],
        )],
    );
    check(
        installing.clone(),
        vec![(
            link_a.clone(),
            UpdatePhase::Downloading,
            &["Wipe(slot-b)", "Start(slot-a)", "Download"],
        )],
    );
    // Swapping: redo the swap whether or not the rename happened, then trial.
    let swapping = check(
        installing,
        vec![(
            Input::Installed {
                sequence: 2,
                result: Ok(()),
            },
            UpdatePhase::Swapping,
            &["E:Installed", "DiscardStaging", "Swap(slot-b)"],
        )],
    );
    for link in [link_a.clone(), link_b.clone()] {
        check(
            swapping.clone(),
            vec![(link, UpdatePhase::Swapping, &["Swap(slot-b)"])],
        );
    }
    // Trial with attempts left: resume with one less; then none left: roll back.
    let t = trial_v2();
    let t = check(
        t,
        vec![(
            link_b.clone(),
            UpdatePhase::Trial,
            &["Start(slot-b)", "E:TrialStarted"],
        )],
    );
    let Phase::Trial { attempts_left, .. } = &t.phase else {
        panic!()
    };
    assert_eq!(*attempts_left, 1);
    let t = check(
        t,
        vec![(
            link_b.clone(),
            UpdatePhase::RollingBack,
            &["Swap(slot-a)", "StartPrevious(slot-a)"],
        )],
    );
    // RollingBack: redo the swap back and verify again.
    let t = check(
        t,
        vec![(
            link_b,
            UpdatePhase::RollingBack,
            &["Swap(slot-a)", "StartPrevious(slot-a)"],
        )],
    );
    let t = check(
        t,
        vec![(
            probe(2, sample("1.0", AppStatus::Healthy)),
            UpdatePhase::Idle,
            &["E:RolledBack(the agent restarted during the trial and no attempts were left)"],
        )],
    );
    assert_eq!(t.active, Some(Slot::A));
    assert_eq!(t.highest.as_ref().map(|h| h.counter), Some(2));
}

#[test]
fn failed_install_wipes_the_standby_and_a_first_install_rolls_back_to_nothing() {
    check(
        downloaded(
            running_v1(),
            desired(2, Some(&release(2, "2.0")), 0),
            Slot::B,
        ),
        vec![(
            Input::Installed {
                sequence: 2,
                result: Err(Failure::Hook {
                    detail: "exit 1".into(),
                }),
            },
            UpdatePhase::Idle,
            // The outcome's event first: the journal says idle before the wipe starts.
            &[
                "E:Failed(post-install hook failed: exit 1)",
                "Wipe(slot-b)",
                "DiscardStaging",
            ],
        )],
    );
    let s = check(
        to_trial(
            State::fresh(),
            desired(1, Some(&release(1, "1.0")), 0),
            Slot::A,
        ),
        vec![(
            probe(
                1,
                Sample {
                    running: false,
                    exits: 1,
                    last_exit_code: Some(3),
                    health: None,
                    ..sample("1.0", AppStatus::Healthy)
                },
            ),
            UpdatePhase::Idle,
            &[
                "Swap(none)",
                "E:RolledBack(the new version exited at start (exit status Some(3)))",
                "Stop",
            ],
        )],
    );
    assert_eq!(s.active, None);
}

fn container(image: &str) -> Container {
    Container {
        image: image.into(),
        load: Some("image.tar".into()),
        image_id: None,
        name: "app".into(),
        network: Some("host".into()),
        ports: vec![],
        volumes: vec![],
        devices: vec![],
        restart: RestartPolicy::UnlessStopped,
    }
}

/// A device running v1 with v2 (which names a data directory, and is a container release when
/// `in_container`) installed in B, its data being snapshotted before the swap.
fn snapshotting_v2(in_container: bool) -> State {
    let mut r2 = release(2, "2.0");
    r2.data_dirs = vec!["/var/lib/app".into()];
    if in_container {
        r2.container = Some(container("app:2.0"));
    }
    let s = check(
        downloaded(running_v1(), desired(2, Some(&r2), 0), Slot::B),
        vec![(
            Input::Installed {
                sequence: 2,
                result: Ok(()),
            },
            UpdatePhase::Swapping,
            &["E:Installed", "DiscardStaging", "Snapshot(/var/lib/app)"],
        )],
    );
    assert!(matches!(
        s.phase,
        Phase::Snapshotting {
            previous: Some(Slot::A),
            ..
        }
    ));
    assert_eq!(s.link_target(), Some(Slot::A), "nothing moved yet");
    s
}

/// The same, on trial after its snapshot.
fn trial_v2_with_data(in_container: bool) -> State {
    check(
        snapshotting_v2(in_container),
        vec![
            (
                Input::Snapshotted {
                    sequence: 2,
                    result: Ok(()),
                },
                UpdatePhase::Swapping,
                &["Swap(slot-b)"],
            ),
            (
                Input::Swapped { sequence: 2 },
                UpdatePhase::Trial,
                &["E:Swapped", "Start(slot-b)", "E:TrialStarted"],
            ),
        ],
    )
}

#[test]
fn data_is_snapshotted_before_the_swap_restored_before_the_previous_version_starts() {
    // Commit: the snapshot is dropped.
    check(
        trial_v2_with_data(false),
        good_probes(
            2,
            "2.0",
            UpdatePhase::Idle,
            &["E:Committed", "DropSnapshots"],
        ),
    );
    // Rollback: stop the new version, restore, then swap back and start the previous one.
    let s = check(
        trial_v2_with_data(true),
        vec![(
            probe(2, sample("9.9", AppStatus::Healthy)),
            UpdatePhase::RollingBack,
            &["Stop", "Restore"],
        )],
    );
    assert!(matches!(s.phase, Phase::Restoring { .. }));
    assert_eq!(
        s.link_target(),
        Some(Slot::B),
        "the link moves only after the restore"
    );
    let s = check(
        s,
        vec![
            // Stale and foreign inputs change nothing.
            (
                Input::Restored {
                    sequence: 1,
                    result: Ok(()),
                },
                UpdatePhase::RollingBack,
                &[],
            ),
            (
                Input::Restored {
                    sequence: 2,
                    result: Ok(()),
                },
                UpdatePhase::RollingBack,
                &["Swap(slot-a)", "StartPrevious(slot-a)"],
            ),
            (
                probe(2, sample("1.0", AppStatus::Healthy)),
                UpdatePhase::Idle,
                &[
                    "E:RolledBack(health endpoint reported version 9.9, expected 2.0)",
                    "DropSnapshots",
                ],
            ),
        ],
    );
    assert_eq!(s.active, Some(Slot::A));
    // A restore that failed is reported with the rollback, and its snapshot kept.
    let s = check(
        trial_v2_with_data(false),
        vec![
            (
                probe(2, sample("9.9", AppStatus::Healthy)),
                UpdatePhase::RollingBack,
                &["Stop", "Restore"],
            ),
            (
                Input::Restored {
                    sequence: 2,
                    result: Err("sha256 mismatch".into()),
                },
                UpdatePhase::RollingBack,
                &["Swap(slot-a)", "StartPrevious(slot-a)"],
            ),
            (
                probe(2, sample("1.0", AppStatus::Healthy)),
                UpdatePhase::Idle,
                &[
                    "E:RolledBack(health endpoint reported version 9.9, expected 2.0)",
                    "E:Failed(rollback failed: the data snapshot was not restored: sha256 mismatch)",
                ],
            ),
        ],
    );
    assert_eq!(s.active, Some(Slot::A));
}

#[test]
fn a_snapshot_that_fails_ends_the_update_on_the_running_version() {
    let s = check(
        snapshotting_v2(false),
        vec![(
            Input::Snapshotted {
                sequence: 2,
                result: Err("not enough free space".into()),
            },
            UpdatePhase::Idle,
            &[
                "E:Failed(cannot prepare the rollback (data snapshot, rollback image): not enough free space)",
                "Start(slot-a)",
                "DropSnapshots",
            ],
        )],
    );
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.applied_sequence, 2);
}

#[test]
fn a_container_release_keeps_its_rollback_image_and_the_agent_config_adds_data_dirs() {
    // No data anywhere: the snapshot step only keeps the rollback image, no restore later.
    let mut r2 = release(2, "2.0");
    r2.container = Some(container("app:2.0"));
    let s = check(
        downloaded(running_v1(), desired(2, Some(&r2), 0), Slot::B),
        vec![
            (
                Input::Installed {
                    sequence: 2,
                    result: Ok(()),
                },
                UpdatePhase::Swapping,
                &["E:Installed", "DiscardStaging", "Snapshot()"],
            ),
            (
                Input::Snapshotted {
                    sequence: 2,
                    result: Ok(()),
                },
                UpdatePhase::Swapping,
                &["Swap(slot-b)"],
            ),
            (
                Input::Swapped { sequence: 2 },
                UpdatePhase::Trial,
                &["E:Swapped", "Start(slot-b)", "E:TrialStarted"],
            ),
            (
                probe(2, sample("9.9", AppStatus::Healthy)),
                UpdatePhase::RollingBack,
                &["Swap(slot-a)", "StartPrevious(slot-a)"],
            ),
        ],
    );
    assert!(matches!(s.phase, Phase::RollingBack { .. }));
    // The agent's own data directories come first, the release's are added.
    let mut ctx = ctx();
    ctx.data_dirs = vec!["/srv/a".into(), "/var/lib/app".into()];
    let mut r3 = release(3, "3.0");
    r3.data_dirs = vec!["/var/lib/app".into(), "/var/lib/b".into()];
    let job = Job {
        sequence: 3,
        rollout: None,
        retry: 0,
        signed: SignedRelease::sign(&r3, &key()),
        digest: Sha256::of(b"x"),
        release: r3,
        hold: false,
    };
    assert_eq!(
        snapshot_dirs(&ctx, &job),
        ["/srv/a", "/var/lib/app", "/var/lib/b"]
    );
}

#[test]
fn snapshot_and_restore_resolve_on_restart() {
    // Snapshotting: taken again whole (nothing has moved), then the swap.
    let snapshotting = snapshotting_v2(false);
    for (link, want) in [
        (Some(Slot::A), &["Snapshot(/var/lib/app)"][..]),
        (None, &["Swap(slot-a)", "Snapshot(/var/lib/app)"][..]),
    ] {
        let s = check(
            snapshotting.clone(),
            vec![(Input::Boot { link }, UpdatePhase::Swapping, want)],
        );
        assert!(matches!(s.phase, Phase::Snapshotting { .. }));
    }
    // Restoring: stop, restore again from the start, then the swap back.
    let restoring = check(
        trial_v2_with_data(false),
        vec![(
            probe(2, sample("9.9", AppStatus::Healthy)),
            UpdatePhase::RollingBack,
            &["Stop", "Restore"],
        )],
    );
    let s = check(
        restoring,
        vec![(
            Input::Boot {
                link: Some(Slot::B),
            },
            UpdatePhase::RollingBack,
            &["Stop", "Restore"],
        )],
    );
    assert!(matches!(s.phase, Phase::Restoring { .. }));
    // Trial with no attempts left goes through the restore too.
    let mut t = trial_v2_with_data(false);
    if let Phase::Trial { attempts_left, .. } = &mut t.phase {
        *attempts_left = 1;
    }
    let t = check(
        t,
        vec![(
            Input::Boot {
                link: Some(Slot::B),
            },
            UpdatePhase::RollingBack,
            &["Stop", "Restore"],
        )],
    );
    // RollingBack after the restore: only the swap back is redone, never the restore.
    let t = check(
        t,
        vec![(
            Input::Restored {
                sequence: 2,
                result: Ok(()),
            },
            UpdatePhase::RollingBack,
            &["Swap(slot-a)", "StartPrevious(slot-a)"],
        )],
    );
    check(
        t,
        vec![(
            Input::Boot {
                link: Some(Slot::A),
            },
            UpdatePhase::RollingBack,
            &["Swap(slot-a)", "StartPrevious(slot-a)"],
        )],
    );
}

mod properties {
    //! Invariants under arbitrary input sequences: the counter never goes down, the active
    //! (and the running, and the warm) slot is never written, and no state leaves the device
    //! without a runnable slot once one was committed.

    use proptest::prelude::{
        Just, ProptestConfig, any, prop, prop_assert, prop_assert_eq, prop_assert_ne, prop_oneof,
        proptest,
    };
    use proptest::strategy::Strategy as Gen;
    use proptest::test_runner::TestCaseError;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Desired {
            release: u8,
            retry: u32,
            none: bool,
            hold: bool,
        },
        DownloadOk,
        DownloadErr,
        InstallOk,
        InstallErr,
        Swapped,
        ProbeGood,
        ProbeBad(u8),
        Boot {
            link: Option<bool>,
        },
        LateTime,
        /// Whatever moves the current update forward (weighted up so updates finish).
        Advance(u8),
        SnapshotOk,
        SnapshotErr,
        RestoreOk,
        RestoreErr,
        SwitchOk,
        SwitchErr,
    }

    fn op() -> impl Gen<Value = Op> {
        prop_oneof![
            (0u8..8, 0u32..2, any::<bool>(), any::<bool>()).prop_map(
                |(release, retry, none, hold)| Op::Desired {
                    release,
                    retry,
                    none: none && release == 0,
                    hold,
                }
            ),
            Just(Op::DownloadOk),
            Just(Op::DownloadErr),
            Just(Op::InstallOk),
            Just(Op::InstallErr),
            Just(Op::Swapped),
            Just(Op::ProbeGood),
            Just(Op::ProbeGood),
            (0u8..4).prop_map(Op::ProbeBad),
            prop::option::of(any::<bool>()).prop_map(|link| Op::Boot { link }),
            Just(Op::LateTime),
            Just(Op::SnapshotOk),
            Just(Op::SnapshotErr),
            Just(Op::RestoreOk),
            Just(Op::RestoreErr),
            Just(Op::SwitchOk),
            Just(Op::SwitchErr),
            // Blue-green with hold, often enough that the warm states are reached.
            Just(Op::Desired {
                release: 6,
                retry: 0,
                none: false,
                hold: true,
            }),
            Just(Op::Desired {
                release: 6,
                retry: 0,
                none: false,
                hold: true,
            }),
            (0u8..4).prop_map(Op::Advance),
            (0u8..4).prop_map(Op::Advance),
            (0u8..4).prop_map(Op::Advance),
            (0u8..4).prop_map(Op::Advance),
        ]
    }

    fn pool(i: u8) -> Release {
        let mut r = match i {
            0 => release(1, "1.0"),
            1 => release(2, "2.0"),
            // With data to snapshot, and a container release.
            2 => {
                let mut r = release(3, "3.0");
                r.data_dirs = vec!["/var/lib/app".into()];
                r
            }
            3 => {
                let mut r = release(4, "4.0");
                r.container = Some(container("app:4.0"));
                r.rollback_to = Some(RollbackTo {
                    counter: 2,
                    version: "2.0".into(),
                });
                r
            }
            4 => {
                let mut r = release(5, "5.0");
                r.hardware = vec!["other".into()];
                r
            }
            // Blue-green: beside the running version, then the traffic switch; it allows the
            // coordinator's rollback to 2.0, which (held warm) is a switch back.
            6 => {
                let mut r = blue_green(6, "6.0");
                r.rollback_to = Some(RollbackTo {
                    counter: 2,
                    version: "2.0".into(),
                });
                r
            }
            // Above every other counter: a release a warm device can move on to.
            7 => release(7, "7.0"),
            _ => release(2, "2.0-reused"),
        };
        r.trial.good_probes = 2;
        r
    }

    fn input(op: &Op, s: &State, next_seq: &mut u64, now: &mut UnixMillis) -> Input {
        let seq = s.phase.job().map(|j| j.sequence).unwrap_or(0);
        let version = match &s.phase {
            Phase::Trial { job, .. } | Phase::Warming { job, .. } | Phase::Proving { job, .. } => {
                job.release.version.clone()
            }
            Phase::RollingBack { to, .. } => to
                .and_then(|t| s.slot(t))
                .map(|c| c.installed.version.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let advanced;
        let op = match (op, &s.phase) {
            // With a version warm: the coordinator's next word (3 is another release).
            (Op::Advance(r @ 0..3), Phase::Idle) if s.warm.is_some() => {
                let running = s
                    .active
                    .and_then(|a| s.slot(a))
                    .map(|c| c.installed.version.clone());
                advanced = match r {
                    // The wave rolled back to 2.0 (the only release 6.0 allows going back to).
                    0 => Op::Desired {
                        release: 1,
                        retry: 0,
                        none: false,
                        hold: false,
                    },
                    // The same release, held again or confirmed.
                    _ => Op::Desired {
                        release: if running.as_deref() == Some("6.0") {
                            6
                        } else {
                            1
                        },
                        retry: 0,
                        none: false,
                        hold: *r == 1,
                    },
                };
                &advanced
            }
            (Op::Advance(r), Phase::Idle) => {
                advanced = Op::Desired {
                    release: *r,
                    retry: 0,
                    none: false,
                    hold: false,
                };
                &advanced
            }
            (Op::Advance(_), Phase::Downloading { .. }) => &Op::DownloadOk,
            (Op::Advance(_), Phase::Installing { .. }) => &Op::InstallOk,
            (Op::Advance(_), Phase::Swapping { .. }) => &Op::Swapped,
            (Op::Advance(_), Phase::Snapshotting { .. }) => &Op::SnapshotOk,
            (Op::Advance(_), Phase::Restoring { .. }) => &Op::RestoreOk,
            (
                Op::Advance(_),
                Phase::Switching { .. } | Phase::SwitchingBack { .. } | Phase::Returning { .. },
            ) => &Op::SwitchOk,
            (Op::Advance(_), _) => &Op::ProbeGood,
            (other, _) => other,
        };
        match op {
            Op::Desired {
                release,
                retry,
                none,
                hold,
            } => {
                *next_seq += 1;
                let r = pool(*release);
                desired_with(*next_seq, (!none).then_some(&r), *retry, *hold)
            }
            Op::DownloadOk => Input::Downloaded {
                sequence: seq,
                result: Ok(()),
            },
            Op::DownloadErr => Input::Downloaded {
                sequence: seq,
                result: Err(Failure::Download {
                    detail: "cut".into(),
                }),
            },
            Op::InstallOk => Input::Installed {
                sequence: seq,
                result: Ok(()),
            },
            Op::InstallErr => Input::Installed {
                sequence: seq,
                result: Err(Failure::Install {
                    detail: "bad".into(),
                }),
            },
            Op::Swapped => Input::Swapped { sequence: seq },
            Op::ProbeGood => probe(seq, sample(&version, AppStatus::Healthy)),
            Op::ProbeBad(k) => probe(
                seq,
                match k {
                    0 => sample("wrong", AppStatus::Healthy),
                    1 => sample(&version, AppStatus::Unhealthy),
                    2 => Sample {
                        health: Some(HealthAnswer::NoAnswer),
                        ..sample(&version, AppStatus::Healthy)
                    },
                    _ => Sample {
                        running: false,
                        exits: 1,
                        health: None,
                        ..sample(&version, AppStatus::Healthy)
                    },
                },
            ),
            Op::Boot { link } => Input::Boot {
                link: match link {
                    None => None,
                    Some(true) => s.link_target(),
                    Some(false) => s.link_target().map(Slot::other),
                },
            },
            Op::Advance(_) => unreachable!("resolved above"),
            Op::SnapshotOk => Input::Snapshotted {
                sequence: seq,
                result: Ok(()),
            },
            Op::SnapshotErr => Input::Snapshotted {
                sequence: seq,
                result: Err("no space".into()),
            },
            Op::RestoreOk => Input::Restored {
                sequence: seq,
                result: Ok(()),
            },
            Op::RestoreErr => Input::Restored {
                sequence: seq,
                result: Err("damaged".into()),
            },
            Op::SwitchOk => Input::Switched {
                sequence: seq,
                result: Ok(()),
            },
            Op::SwitchErr => Input::Switched {
                sequence: seq,
                result: Err("exit 1".into()),
            },
            Op::LateTime => {
                *now = now.saturating_add(Duration::from_secs(120));
                probe(seq, sample(&version, AppStatus::Degraded))
            }
        }
    }

    /// Runs `ops` from `start`, checking the invariants after every step.
    fn run(start: State, mut next_seq: u64, ops: &[Op]) -> Result<(), TestCaseError> {
        let ctx = ctx();
        let mut s = start;
        let mut now = NOW;
        let mut ever_committed = s.active.is_some();
        for op in ops {
            let before = s.clone();
            let inp = input(op, &s, &mut next_seq, &mut now);
            let (next, actions) = step(&ctx, s, inp, now);
            // The highest counter and the applied sequence never go down.
            let hc = |s: &State| s.highest.as_ref().map(|h| h.counter).unwrap_or(0);
            prop_assert!(hc(&next) >= hc(&before));
            prop_assert!(next.applied_sequence >= before.applied_sequence);
            // The committed, the running and the warm slot are never written.
            for a in &actions {
                if let Action::Install { slot, .. } | Action::WipeSlot { slot } = a {
                    prop_assert_ne!(Some(*slot), before.active, "{:?} after {:?}", a, op);
                    prop_assert_ne!(Some(*slot), next.active, "{:?} after {:?}", a, op);
                    prop_assert_ne!(Some(*slot), next.link_target(), "{:?} after {:?}", a, op);
                    prop_assert_ne!(Some(*slot), before.warm, "{:?} after {:?}", a, op);
                    prop_assert_ne!(Some(*slot), next.warm, "{:?} after {:?}", a, op);
                }
            }
            // A warm version is the complete install beside the committed one, only
            // while idle, and it never just disappears: the old instance is stopped
            // (`Promote`), switched back to (`Returning`), or died with the agent.
            if let Some(w) = next.warm {
                prop_assert!(
                    matches!(next.phase, Phase::Idle),
                    "warm in {:?}",
                    next.phase.wire()
                );
                prop_assert_eq!(next.active, Some(w.other()));
                prop_assert!(next.slot(w).is_some(), "warm slot {} is empty", w);
            }
            if before.warm.is_some() && next.warm.is_none() && !matches!(op, Op::Boot { .. }) {
                let promoted = actions.iter().any(|a| matches!(a, Action::Promote { .. }));
                let returning = matches!(next.phase, Phase::Returning { .. });
                prop_assert!(
                    promoted != returning,
                    "warm dropped by {:?}: {:?}",
                    op,
                    actions
                );
            }
            // A step that ends idle has journaled how the update ended: its events are queued
            // before anything that stops, drains, starts, switches or wipes, which can take
            // long (an agent killed there comes back idle and never emits them). At boot the
            // slots the journal does not vouch for are wiped first; where that boot ends an
            // update (a first install's trial, no attempts left) the slot was never written.
            if matches!(next.phase, Phase::Idle) {
                let slow = actions.iter().position(|a| match a {
                    Action::WipeSlot { .. } => !matches!(op, Op::Boot { .. }),
                    _ => matches!(
                        a,
                        Action::Promote { .. }
                            | Action::StopStandby { .. }
                            | Action::StopApp
                            | Action::StartApp { .. }
                            | Action::StartStandby { .. }
                            | Action::SwitchTraffic { .. }
                            | Action::Snapshot { .. }
                            | Action::Restore { .. }
                    ),
                });
                if let Some(i) = slow {
                    prop_assert!(
                        !actions[i..]
                            .iter()
                            .any(|a| matches!(a, Action::Emit { .. })),
                        "an event after {:?} ({:?} from {:?}): {:?}",
                        actions[i],
                        op,
                        before.phase.wire(),
                        actions.iter().map(name).collect::<Vec<_>>()
                    );
                }
            }
            // `Promote` stops an old instance only where one runs beside the new one.
            if actions.iter().any(|a| matches!(a, Action::Promote { .. })) {
                prop_assert!(
                    before.warm.is_some() || matches!(before.phase, Phase::Proving { .. }),
                    "promote from {:?} after {:?}",
                    before.phase.wire(),
                    op
                );
            }
            // Whatever the link should point to holds a complete install.
            if let Some(t) = next.link_target() {
                prop_assert!(
                    next.slot(t).is_some(),
                    "link target {t} is empty in {:?}",
                    next.phase.wire()
                );
            }
            if let Phase::Idle = next.phase {
                ever_committed |= next.active.is_some();
                if ever_committed {
                    prop_assert!(next.active.is_some(), "a device that had a version lost it");
                }
            }
            s = next;
        }
        Ok(())
    }

    /// 2.0 committed, then blue-green 6.0 committed with hold: 2.0 warm beside it.
    fn warm_start() -> (State, u64) {
        let ctx = ctx();
        let (mut s, mut next_seq, mut now) = (State::fresh(), 0, NOW);
        for r in [1, 6] {
            let mut op = Op::Desired {
                release: r,
                retry: 0,
                none: false,
                hold: true,
            };
            loop {
                let inp = input(&op, &s, &mut next_seq, &mut now);
                s = step(&ctx, s, inp, now).0;
                if matches!(s.phase, Phase::Idle) {
                    break;
                }
                op = Op::Advance(0);
            }
        }
        assert_eq!(s.warm, Some(Slot::A), "{:?}", s.last_outcome);
        (s, next_seq)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        #[test]
        fn invariants_hold_for_any_input_sequence(ops in prop::collection::vec(op(), 1..60)) {
            run(State::fresh(), 0, &ops)?;
        }

        #[test]
        fn invariants_hold_for_any_input_sequence_from_a_warm_version(
            ops in prop::collection::vec(op(), 1..40)
        ) {
            let (start, next_seq) = warm_start();
            run(start, next_seq, &ops)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Blue-green (issue 9)

fn blue_green(counter: u64, version: &str) -> Release {
    let mut r = release(counter, version);
    r.strategy.kind = StrategyKind::BlueGreen;
    r
}

fn switched(sequence: u64, result: Result<(), &str>) -> Input {
    Input::Switched {
        sequence,
        result: result.map_err(str::to_owned),
    }
}

/// The job in flight: its sequence and its release's version.
fn job_now(s: &State) -> (u64, String) {
    let job = s.phase.job().expect("an update in flight");
    (job.sequence, job.release.version.clone())
}

/// v1 committed in A; the blue-green release of `desired` installed in B and warming up
/// beside it.
#[track_caller]
fn warming(desired: Input) -> State {
    let (sequence, _) = job_of(&desired);
    let s = check(
        downloaded(running_v1(), desired, Slot::B),
        vec![(
            Input::Installed {
                sequence,
                result: Ok(()),
            },
            UpdatePhase::Trial,
            &[
                "E:Installed",
                "DiscardStaging",
                "StartBeside(slot-b)",
                "E:TrialStarted",
            ],
        )],
    );
    // The old version keeps the link, the traffic and the report's "active".
    assert_eq!(s.link_target(), Some(Slot::A));
    assert_eq!(s.active, Some(Slot::A));
    s
}

/// v1 committed in A; blue-green v2 installed in B and warming up beside it.
fn warming_v2() -> State {
    warming(desired(2, Some(&blue_green(2, "2.0")), 0))
}

/// The release warming up in B answered healthy twice: the traffic is being switched to it.
#[track_caller]
fn switching(warming: State) -> State {
    let (sequence, version) = job_now(&warming);
    let s = check(
        warming,
        good_probes(
            sequence,
            &version,
            UpdatePhase::Swapping,
            &["Traffic(slot-b)"],
        ),
    );
    assert!(matches!(s.phase, Phase::Switching { .. }));
    s
}

/// The traffic moved to the release that warmed up in B, which proves itself under it; the
/// previous version still runs in A.
#[track_caller]
fn under_traffic(warming: State) -> State {
    let (sequence, _) = job_now(&warming);
    let s = check(
        switching(warming),
        vec![(
            switched(sequence, Ok(())),
            UpdatePhase::Trial,
            &["E:Swapped", "Swap(slot-b)"],
        )],
    );
    assert!(matches!(s.phase, Phase::Proving { .. }));
    assert_eq!(s.link_target(), Some(Slot::B));
    s
}

/// The traffic moved to v2 (B); v1 still warm in A.
fn proving_v2() -> State {
    under_traffic(warming_v2())
}

#[test]
fn blue_green_switches_after_warming_up_and_stops_the_old_one_at_the_commit() {
    let s = check(
        proving_v2(),
        good_probes(
            2,
            "2.0",
            UpdatePhase::Idle,
            // The event before the old instance drains and stops (`blue_green.drain_timeout`):
            // the journal already says committed.
            &["E:Committed", "Promote(slot-b)"],
        ),
    );
    assert_eq!(s.active, Some(Slot::B));
    assert_eq!(s.applied_sequence, 2);
    assert!(matches!(
        s.last_outcome.as_ref().map(|o| &o.result),
        Some(OutcomeKind::Committed)
    ));
}

#[test]
fn blue_green_rollbacks_never_restart_the_old_version() {
    // Bad while warming up: it never had traffic; stopping it is the rollback.
    let s = check(
        warming_v2(),
        vec![(
            probe(2, sample("9.9", AppStatus::Healthy)),
            UpdatePhase::Idle,
            // As everywhere, the outcome's events before the stop.
            &[
                "E:RolledBack(health endpoint reported version 9.9, expected 2.0)",
                "StopBeside",
            ],
        )],
    );
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.failed.len(), 1);
    // Bad under traffic: the traffic and the link go back, then the new one stops.
    let s = check(
        proving_v2(),
        vec![
            (
                probe(2, sample("2.0", AppStatus::Unhealthy)),
                UpdatePhase::Trial,
                &[],
            ),
            (
                probe(2, sample("2.0", AppStatus::Unhealthy)),
                UpdatePhase::RollingBack,
                &["Traffic(slot-a)", "Swap(slot-a)"],
            ),
            (
                switched(2, Ok(())),
                UpdatePhase::Idle,
                &[
                    "E:RolledBack(health endpoint reported Unhealthy)",
                    "StopBeside",
                ],
            ),
        ],
    );
    assert_eq!(s.active, Some(Slot::A));
    // A failed switch is a rollback too (the switch is redone towards the old version); a
    // failed switch back is reported with it.
    let s = check(
        switching(warming_v2()),
        vec![
            (
                switched(2, Err("exit 1")),
                UpdatePhase::RollingBack,
                &["Traffic(slot-a)", "Swap(slot-a)"],
            ),
            (
                switched(2, Err("exit 1")),
                UpdatePhase::Idle,
                &[
                    "E:RolledBack(the traffic switch to the new version failed: exit 1)",
                    "E:Failed(rollback failed: the traffic could not be switched back to the previous version: exit 1; it runs, fix the switch (blue_green.command) and point the service at it)",
                    "StopBeside",
                ],
            ),
        ],
    );
    assert_eq!(s.active, Some(Slot::A));
}

#[test]
fn blue_green_is_refused_where_it_cannot_run() {
    let mut c = ctx();
    c.blue_green_refusal = Some("blue-green needs the process runtime on this device".into());
    let (s, actions) = step(
        &c,
        running_v1(),
        desired(2, Some(&blue_green(2, "2.0")), 0),
        NOW,
    );
    assert!(matches!(s.phase, Phase::Idle));
    assert!(
        actions
            .iter()
            .map(name)
            .any(|n| n == "E:Refused(blue-green needs the process runtime on this device)"),
        "{actions:?}"
    );
    // Data directories cannot be shared by two versions running at once.
    let mut r = blue_green(2, "2.0");
    r.data_dirs = vec!["/var/lib/app".into()];
    let (_, actions) = step(&ctx(), running_v1(), desired(2, Some(&r), 0), NOW);
    assert!(
        actions
            .iter()
            .map(name)
            .any(|n| n.starts_with("E:Refused(blue-green runs")),
        "{actions:?}"
    );
    // A first install has nothing to keep warm: the ordinary swap and trial.
    let s = to_trial(
        State::fresh(),
        desired(1, Some(&blue_green(1, "1.0")), 0),
        Slot::A,
    );
    assert!(matches!(s.phase, Phase::Trial { .. }), "{:?}", s.phase);
}

#[test]
fn blue_green_resolves_on_restart() {
    let boot = |link: Slot| Input::Boot { link: Some(link) };
    // Warming, attempts left: the old version back, the new one warms up again.
    let s = check(
        warming_v2(),
        vec![(
            boot(Slot::A),
            UpdatePhase::Trial,
            &["Start(slot-a)", "StartBeside(slot-b)", "E:TrialStarted"],
        )],
    );
    let Phase::Warming { attempts_left, .. } = s.phase else {
        panic!("{:?}", s.phase)
    };
    assert_eq!(attempts_left, 1);
    // ... and with none left it is rolled back.
    check(
        s,
        vec![(
            boot(Slot::A),
            UpdatePhase::Idle,
            // The events before the restart (the switch command can take long).
            &[
                "E:RolledBack(the agent restarted during the trial and no attempts were left)",
                "Start(slot-a)",
            ],
        )],
    );
    // Switched and under traffic (the link on B): link and traffic back to A first.
    check(
        proving_v2(),
        vec![(
            boot(Slot::B),
            UpdatePhase::Trial,
            &[
                "Swap(slot-a)",
                "Start(slot-a)",
                "StartBeside(slot-b)",
                "E:TrialStarted",
            ],
        )],
    );
    // Switching (the switch may or may not have happened): the same.
    check(
        switching(warming_v2()),
        vec![(
            boot(Slot::A),
            UpdatePhase::Trial,
            &["Start(slot-a)", "StartBeside(slot-b)", "E:TrialStarted"],
        )],
    );
    // Switching back: finish the rollback on the old version.
    let (back, _) = step(
        &ctx(),
        proving_v2(),
        probe(2, sample("7.0", AppStatus::Healthy)),
        NOW,
    );
    assert!(matches!(back.phase, Phase::SwitchingBack { .. }));
    let s = check(
        back,
        vec![(
            boot(Slot::B),
            UpdatePhase::Idle,
            &[
                "E:RolledBack(health endpoint reported version 7.0, expected 2.0)",
                "Swap(slot-a)",
                "Start(slot-a)",
            ],
        )],
    );
    assert_eq!(s.active, Some(Slot::A));
}

mod hold;
