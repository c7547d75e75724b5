//! Blue-green hold (`Desired.hold`, issue 9): a blue-green commit keeps the previous version's
//! instance warm until the coordinator confirms the wave, and the coordinator rolling the wave
//! back is a switch back to it, admitted like any release.

use super::*;

fn desired_hold(sequence: u64, r: Option<&Release>, hold: bool) -> Input {
    desired_with(sequence, r, 0, hold)
}

/// What a device refuses when asked for 1.0 after 2.0 without a signed rollback, warm or not.
const REFUSED_DOWNGRADE: &str = "E:Refused(release counter 1 is below the highest accepted 2 and no signed rollback allows it (replayed or downgraded release))";

/// Blue-green 2.0, which authorises a rollback to 1.0 (what a coordinator's rollback needs
/// to get past the counter).
fn bg_v2() -> Release {
    let mut r = blue_green(2, "2.0");
    r.rollback_to = Some(RollbackTo {
        counter: 1,
        version: "1.0".into(),
    });
    r
}

/// v1 committed in A; `r2` (blue-green) installed in B, switched to and proving itself under
/// traffic, with the desired state's `hold`.
fn proving(r2: &Release, hold: bool) -> State {
    check(
        under_traffic(warming(desired_hold(2, Some(r2), hold))),
        vec![(
            probe(2, sample("2.0", AppStatus::Healthy)),
            UpdatePhase::Trial,
            &[],
        )],
    )
}

/// The last good probe under traffic: the commit of 2.0, with the actions `want`.
#[track_caller]
fn commit(proving: State, want: &[&str]) -> State {
    check(
        proving,
        vec![(
            probe(2, sample("2.0", AppStatus::Healthy)),
            UpdatePhase::Idle,
            want,
        )],
    )
}

/// 2.0 committed in B with `hold`: 1.0 still runs warm in A.
fn held() -> State {
    let s = commit(proving(&bg_v2(), true), &["E:Committed"]);
    assert_eq!(s.warm, Some(Slot::A));
    s
}

fn outcome_of(s: &State) -> (u64, &str, &OutcomeKind) {
    let o = s.last_outcome.as_ref().expect("an outcome");
    (o.sequence, o.version.as_str(), &o.result)
}

#[test]
fn a_commit_with_hold_keeps_the_previous_version_warm_instead_of_promoting() {
    let s = held();
    // Committed exactly as without hold, except that the old instance keeps running.
    assert_eq!(s.active, Some(Slot::B));
    assert_eq!(s.link_target(), Some(Slot::B));
    assert_eq!(s.applied_sequence, 2);
    assert_eq!(outcome_of(&s), (2, "2.0", &OutcomeKind::Committed));
    assert!(matches!(s.phase, Phase::Idle));
    assert_eq!(
        s.running().map(|c| c.installed.version.as_str()),
        Some("2.0")
    );
    assert_eq!(
        s.slot(Slot::A).map(|c| c.installed.version.as_str()),
        Some("1.0")
    );
}

#[test]
fn without_hold_the_commit_promotes_as_before() {
    // What an older coordinator sends (hold reads as false): the old instance stops at once.
    let s = commit(
        proving(&bg_v2(), false),
        &["E:Committed", "Promote(slot-b)"],
    );
    assert_eq!(s.warm, None);
    assert_eq!(s.active, Some(Slot::B));
    // And a coordinator rolling back afterwards takes the ordinary path: swap and trial.
    check(
        s,
        vec![(
            desired(3, Some(&release(1, "1.0")), 0),
            UpdatePhase::Swapping,
            &["E:Verified", "Swap(slot-a)"],
        )],
    );
}

#[test]
fn the_same_release_with_hold_again_keeps_the_previous_version_warm() {
    let s = check(
        held(),
        vec![(
            desired_hold(3, Some(&bg_v2()), true),
            UpdatePhase::Idle,
            &[],
        )],
    );
    assert_eq!(s.warm, Some(Slot::A));
    assert_eq!(s.active, Some(Slot::B));
    assert_eq!(s.applied_sequence, 3);
}

#[test]
fn the_wave_confirmed_stops_the_previous_version() {
    // The same release without hold.
    let s = check(
        held(),
        vec![(
            desired_hold(3, Some(&bg_v2()), false),
            UpdatePhase::Idle,
            &["Promote(slot-b)"],
        )],
    );
    assert_eq!(s.warm, None);
    assert_eq!(s.active, Some(Slot::B));
    assert_eq!(s.applied_sequence, 3);
    // The committed outcome stays the release's own.
    assert_eq!(outcome_of(&s), (2, "2.0", &OutcomeKind::Committed));
    // No release at all: keep what is installed, which is the new version alone.
    let s = check(
        held(),
        vec![(
            desired_hold(3, None, true),
            UpdatePhase::Idle,
            &["Promote(slot-b)"],
        )],
    );
    assert_eq!(s.warm, None);
    assert_eq!(s.applied_sequence, 3);
    // Once promoted, nothing is promoted twice.
    check(
        s,
        vec![(
            desired_hold(4, Some(&bg_v2()), false),
            UpdatePhase::Idle,
            &[],
        )],
    );
}

#[test]
fn the_warm_release_is_switched_back_to_without_download_install_or_restart() {
    let returning = check(
        held(),
        vec![(
            desired_hold(3, Some(&release(1, "1.0")), false),
            UpdatePhase::Swapping,
            &["E:Verified", "Traffic(slot-a)", "Swap(slot-a)"],
        )],
    );
    let Phase::Returning { job, from, to } = &returning.phase else {
        panic!("{:?}", returning.phase)
    };
    assert_eq!((job.sequence, *from, *to), (3, Slot::B, Slot::A));
    assert_eq!(returning.link_target(), Some(Slot::A));
    // A desired state arriving meanwhile waits, like during any update.
    let returning = check(
        returning,
        vec![(desired_hold(4, None, false), UpdatePhase::Swapping, &[])],
    );
    let s = check(
        returning,
        vec![(
            switched(3, Ok(())),
            UpdatePhase::Idle,
            // The events before the stop: draining can take long, and the journal already
            // says committed.
            &[
                "E:Swapped",
                "E:Committed",
                "StopBeside(drained)",
                "Redeliver",
            ],
        )],
    );
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.warm, None);
    assert_eq!(s.applied_sequence, 3);
    assert_eq!(outcome_of(&s), (3, "1.0", &OutcomeKind::Committed));
    // The counter never goes down; 2.0 stays installed in standby and is not remembered as bad.
    assert_eq!(s.highest.as_ref().map(|h| h.counter), Some(2));
    assert_eq!(
        s.slot(Slot::B).map(|c| c.installed.version.as_str()),
        Some("2.0")
    );
    assert!(s.failed.is_empty(), "{:?}", s.failed);
    // A later switch result for the same job changes nothing.
    check(s, vec![(switched(3, Ok(())), UpdatePhase::Idle, &[])]);
}

#[test]
fn a_failed_switch_back_to_the_warm_version_is_reported_with_what_to_fix() {
    let (returning, _) = step(
        &ctx(),
        held(),
        desired_hold(3, Some(&release(1, "1.0")), false),
        NOW,
    );
    assert!(matches!(returning.phase, Phase::Returning { .. }));
    let detail = "the traffic could not be switched back to the previous version: exit 1; it runs, fix the switch (blue_green.command) and point the service at it";
    let failed = format!("E:Failed(rollback failed: {detail})");
    let s = check(
        returning,
        vec![(
            switched(3, Err("exit 1")),
            UpdatePhase::Idle,
            &[failed.as_str(), "StopBeside(drained)"],
        )],
    );
    // As after `SwitchingBack`: the new instance stops, the previous version is active.
    assert_eq!(s.active, Some(Slot::A));
    assert_eq!(s.warm, None);
    assert_eq!(s.applied_sequence, 3);
    assert_eq!(
        outcome_of(&s),
        (
            3,
            "1.0",
            &OutcomeKind::Failed(Failure::Rollback {
                detail: detail.into()
            })
        )
    );
}

#[test]
fn the_return_is_admitted_like_any_release_and_a_refused_one_stops_the_warm_version() {
    // The same release bytes signed by a key this device does not pin: same digest as the warm
    // slot, refused on its signature.
    let forged = Input::Desired {
        desired: Desired {
            release: Some(SignedRelease::sign(
                &release(1, "1.0"),
                &SigningKey::from_bytes(&[9; 32]),
            )),
            ..match desired(3, None, 0) {
                Input::Desired { desired, .. } => desired,
                _ => unreachable!(),
            }
        },
        disk_free: 1 << 30,
    };
    let (s, actions) = step(&ctx(), held(), forged, NOW);
    let names: Vec<String> = actions.iter().map(name).collect();
    assert!(
        names[0].starts_with("E:Refused(signed by unknown key"),
        "{names:?}"
    );
    // The refusal queued before the old instance drains and stops.
    assert_eq!(names[1], "Promote(slot-b)", "{names:?}");
    assert!(matches!(s.phase, Phase::Idle));
    assert_eq!((s.active, s.warm), (Some(Slot::B), None));

    // Without a signed rollback from 2.0, going back to 1.0 is a downgrade, warm or not: the
    // same refusal as on the ordinary path.
    let plain_v2 = blue_green(2, "2.0");
    let warm = commit(proving(&plain_v2, true), &["E:Committed"]);
    assert_eq!(warm.warm, Some(Slot::A));
    let s = check(
        warm,
        vec![(
            desired(3, Some(&release(1, "1.0")), 0),
            UpdatePhase::Idle,
            &[REFUSED_DOWNGRADE, "Promote(slot-b)"],
        )],
    );
    assert_eq!((s.active, s.warm), (Some(Slot::B), None));
    let ordinary = commit(
        proving(&plain_v2, false),
        &["E:Committed", "Promote(slot-b)"],
    );
    check(
        ordinary,
        vec![(
            desired(3, Some(&release(1, "1.0")), 0),
            UpdatePhase::Idle,
            &[REFUSED_DOWNGRADE],
        )],
    );

    // Expired since: refused at the time of the return as on the ordinary path.
    let later = UnixMillis(NOW.0 + 2 * 86_400_000);
    let (s, actions) = step(
        &ctx(),
        held(),
        desired(3, Some(&release(1, "1.0")), 0),
        later,
    );
    let names: Vec<String> = actions.iter().map(name).collect();
    assert!(names[0].starts_with("E:Refused(expired at"), "{names:?}");
    assert_eq!(names[1], "Promote(slot-b)", "{names:?}");
    assert_eq!((s.active, s.warm), (Some(Slot::B), None));
}

#[test]
fn another_release_stops_the_warm_version_first_then_goes_on_as_usual() {
    let r3 = release(3, "3.0");
    let s = check(
        held(),
        vec![
            (
                desired_hold(3, Some(&r3), true),
                UpdatePhase::Downloading,
                &["Promote(slot-b)", "Download"],
            ),
            // Installed over the slot the old instance ran from, once it has stopped.
            (
                Input::Downloaded {
                    sequence: 3,
                    result: Ok(()),
                },
                UpdatePhase::Installing,
                &["E:DownloadFinished", "E:Verified", "Install(slot-a)"],
            ),
        ],
    );
    assert_eq!(s.warm, None);
    // A refused release stops it too: the coordinator moved on.
    let mut wrong = release(3, "3.0");
    wrong.hardware = vec!["other".into()];
    let (s, actions) = step(&ctx(), held(), desired(3, Some(&wrong), 0), NOW);
    let names: Vec<String> = actions.iter().map(name).collect();
    assert!(names[0].starts_with("E:Refused(built for"), "{names:?}");
    assert_eq!(names[1], "Promote(slot-b)", "{names:?}");
    assert_eq!((s.active, s.warm), (Some(Slot::B), None));
}

#[test]
fn a_restart_with_a_warm_version_starts_only_the_committed_one() {
    let s = check(
        held(),
        vec![(
            Input::Boot {
                link: Some(Slot::B),
            },
            UpdatePhase::Idle,
            &["DropSnapshots", "Start(slot-b)"],
        )],
    );
    assert_eq!((s.active, s.warm), (Some(Slot::B), None));
    // A rollback asked for afterwards takes the ordinary path: swap and trial.
    check(
        s,
        vec![
            (
                desired(3, Some(&release(1, "1.0")), 0),
                UpdatePhase::Swapping,
                &["E:Verified", "Swap(slot-a)"],
            ),
            (
                Input::Swapped { sequence: 3 },
                UpdatePhase::Trial,
                &["E:Swapped", "Start(slot-a)", "E:TrialStarted"],
            ),
        ],
    );
}

#[test]
fn a_restart_while_returning_starts_the_release_the_coordinator_asked_for() {
    let (returning, _) = step(&ctx(), held(), desired(3, Some(&release(1, "1.0")), 0), NOW);
    // Whether or not the link moved before the power cut.
    for (link, want) in [
        // The events before the restart, as before a stop.
        (
            Slot::B,
            &["E:Swapped", "E:Committed", "Swap(slot-a)", "Start(slot-a)"][..],
        ),
        (Slot::A, &["E:Swapped", "E:Committed", "Start(slot-a)"][..]),
    ] {
        let s = check(
            returning.clone(),
            vec![(Input::Boot { link: Some(link) }, UpdatePhase::Idle, want)],
        );
        assert_eq!((s.active, s.warm), (Some(Slot::A), None));
        assert_eq!(s.applied_sequence, 3);
        assert_eq!(outcome_of(&s), (3, "1.0", &OutcomeKind::Committed));
    }
}

#[test]
fn hold_changes_nothing_for_a_release_that_is_not_blue_green() {
    let run = |hold: bool| {
        let committed = check(
            to_trial(
                running_v1(),
                desired_hold(2, Some(&release(2, "2.0")), hold),
                Slot::B,
            ),
            good_probes(2, "2.0", UpdatePhase::Idle, &["E:Committed"]),
        );
        // And the previous release afterwards: a downgrade without a signed rollback, refused
        // as without hold (not a switch).
        check(
            committed,
            vec![(
                desired_hold(3, Some(&release(1, "1.0")), hold),
                UpdatePhase::Idle,
                &[REFUSED_DOWNGRADE],
            )],
        )
    };
    let (with, without) = (run(true), run(false));
    assert_eq!(with, without);
    assert_eq!(with.warm, None);
    // A blue-green first install (nothing to keep warm) takes the ordinary swap: no warm.
    let s = first_install(desired_hold(1, Some(&blue_green(1, "1.0")), true));
    assert_eq!((s.active, s.warm), (Some(Slot::A), None));
}

#[test]
fn a_journal_written_before_hold_still_loads() {
    let mut json = serde_json::to_value(proving(&bg_v2(), true)).unwrap();
    let removed = json
        .as_object_mut()
        .unwrap()
        .remove("warm")
        .is_some_and(|w| w.is_null());
    assert!(removed, "the state has a warm field, null while proving");
    let job = json
        .pointer_mut("/phase/Proving/job")
        .and_then(|j| j.as_object_mut())
        .unwrap();
    assert_eq!(job.remove("hold"), Some(serde_json::Value::Bool(true)));
    let old: State = serde_json::from_value(json).unwrap();
    assert_eq!(old.warm, None);
    assert_eq!(old.phase.job().map(|j| j.hold), Some(false));
    // Such a journal commits as before: the old instance stops.
    commit(old, &["E:Committed", "Promote(slot-b)"]);
}
