//! The trial decision: is the new version good, bad, or not proven yet? Pure: one probe
//! sample in, a verdict out. The agent's watchdog is this function plus a timer; it trusts
//! nothing the new version says about itself except answers that can be checked (status,
//! version, a functional probe's exact output digest) and facts the agent observes itself
//! (exits, restarts, silence).

use std::time::Duration;

use fleet_proto::UnixMillis;
use fleet_proto::device::{AppStatus, RollbackReason};
use serde::{Deserialize, Serialize};

/// What the health endpoint said.
#[derive(Clone, Debug, PartialEq)]
pub enum HealthAnswer {
    Answered {
        status: AppStatus,
        version: String,
    },
    /// No answer within the timeout, connection refused, or not a health document.
    NoAnswer,
}

/// One observation of the app under trial, gathered by the driver at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Whether the process (or unit) is running right now.
    pub running: bool,
    /// Exits observed since the app was started for this trial, and the latest exit status.
    pub exits: u32,
    pub last_exit_code: Option<i32>,
    /// Restarts within the release's crash-loop window.
    pub restarts_in_window: u32,
    /// Health endpoint; `None` when it was not asked (app not running).
    pub health: Option<HealthAnswer>,
    /// Functional probe, if the release has one and it ran: `Err(detail)` when it failed.
    pub probe: Option<Result<(), String>>,
}

/// The rules of one trial, from the signed release and the agent's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rules {
    pub good_probes: u32,
    pub expected_version: String,
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
    pub failures_allowed: u32,
}

/// How far a trial has got; persisted in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Consecutive good samples.
    pub good: u32,
    /// Consecutive bad samples.
    pub failures: u32,
    /// Whether the health endpoint ever answered during this trial.
    pub answered: bool,
    /// Exits of the app seen by the previous sample: one more since then means the app went
    /// down between two samples, which ends a streak of good ones.
    #[serde(default)]
    pub exits: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Continue(Progress),
    Commit,
    RollBack(RollbackReason),
}

/// Judges one sample. `deadline` is the wall-clock instant by which the version must be proven.
pub fn judge(
    rules: &Rules,
    mut progress: Progress,
    sample: &Sample,
    now: UnixMillis,
    deadline: UnixMillis,
) -> Verdict {
    // Exiting before ever answering is a crash at start, whatever the supervisor does next.
    if sample.exits > 0 && !progress.answered {
        return Verdict::RollBack(RollbackReason::CrashAtStart {
            exit_code: sample.last_exit_code,
        });
    }
    if sample.restarts_in_window >= rules.crash_loop_restarts {
        return Verdict::RollBack(RollbackReason::CrashLoop {
            restarts: sample.restarts_in_window,
            window: rules.crash_loop_window,
        });
    }
    // Good probes must be consecutive for one run of the app: healthy answers on both sides of
    // an exit (a supervisor that restarts quickly, such as systemd with a short RestartSec) are
    // two short runs, not a proof. The new run may start a new streak.
    if sample.exits > progress.exits {
        progress.good = 0;
    }
    progress.exits = sample.exits;
    let mut bad: Option<RollbackReason> = None;
    let mut good = false;
    match &sample.health {
        None => {}
        Some(HealthAnswer::NoAnswer) => {
            bad = Some(RollbackReason::Unresponsive {
                failures: progress.failures + 1,
            });
        }
        Some(HealthAnswer::Answered { status, version }) => {
            progress.answered = true;
            if *version != rules.expected_version {
                return Verdict::RollBack(RollbackReason::WrongVersion {
                    expected: rules.expected_version.clone(),
                    reported: version.clone(),
                });
            }
            match status {
                AppStatus::Healthy => match &sample.probe {
                    Some(Err(detail)) => {
                        bad = Some(RollbackReason::ProbeFailed {
                            detail: detail.clone(),
                        })
                    }
                    _ => good = true,
                },
                // Degraded serves: neither proof nor failure.
                AppStatus::Degraded => {}
                other => bad = Some(RollbackReason::Unhealthy { status: *other }),
            }
        }
    }
    if let Some(reason) = bad {
        progress.good = 0;
        progress.failures += 1;
        if progress.failures >= rules.failures_allowed {
            return Verdict::RollBack(reason);
        }
    } else if good {
        progress.failures = 0;
        progress.good += 1;
        if progress.good >= rules.good_probes {
            return Verdict::Commit;
        }
    } else {
        progress.good = 0;
    }
    if now >= deadline {
        return Verdict::RollBack(RollbackReason::TrialDeadline {
            good: progress.good,
            needed: rules.good_probes,
        });
    }
    Verdict::Continue(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            good_probes: 2,
            expected_version: "2.0".into(),
            crash_loop_restarts: 3,
            crash_loop_window: Duration::from_secs(300),
            failures_allowed: 2,
        }
    }

    fn healthy(version: &str) -> Sample {
        Sample {
            running: true,
            exits: 0,
            last_exit_code: None,
            restarts_in_window: 0,
            health: Some(HealthAnswer::Answered {
                status: AppStatus::Healthy,
                version: version.into(),
            }),
            probe: Some(Ok(())),
        }
    }

    fn p(good: u32, failures: u32, answered: bool) -> Progress {
        Progress {
            good,
            failures,
            answered,
            exits: 0,
        }
    }

    fn exited(progress: Progress, exits: u32) -> Progress {
        Progress { exits, ..progress }
    }

    const NOW: UnixMillis = UnixMillis(1_000_000);
    const LATER: UnixMillis = UnixMillis(2_000_000);

    #[track_caller]
    fn check(progress: Progress, sample: Sample, deadline: UnixMillis, want: Verdict) {
        assert_eq!(judge(&rules(), progress, &sample, NOW, deadline), want);
    }

    #[test]
    fn verdicts() {
        use RollbackReason as R;
        let ok = healthy("2.0");
        // (progress before, sample, deadline, verdict)
        check(
            p(0, 0, false),
            ok.clone(),
            LATER,
            Verdict::Continue(p(1, 0, true)),
        );
        check(p(1, 0, true), ok.clone(), LATER, Verdict::Commit);
        check(p(1, 1, true), ok.clone(), LATER, Verdict::Commit);
        check(
            p(0, 0, false),
            Sample {
                exits: 1,
                last_exit_code: Some(3),
                running: false,
                health: None,
                ..ok.clone()
            },
            LATER,
            Verdict::RollBack(R::CrashAtStart { exit_code: Some(3) }),
        );
        check(
            p(1, 0, true),
            Sample {
                exits: 3,
                restarts_in_window: 3,
                ..ok.clone()
            },
            LATER,
            Verdict::RollBack(R::CrashLoop {
                restarts: 3,
                window: Duration::from_secs(300),
            }),
        );
        // One exit after answering is not yet a crash loop.
        check(
            p(1, 0, true),
            Sample {
                exits: 1,
                restarts_in_window: 1,
                running: false,
                health: None,
                ..ok.clone()
            },
            LATER,
            Verdict::Continue(exited(p(0, 0, true), 1)),
        );
        // Restarted between two healthy samples (systemd restarts within the probe interval):
        // the streak starts again with the new run instead of reaching a commit.
        check(
            p(1, 0, true),
            Sample {
                exits: 1,
                restarts_in_window: 1,
                ..ok.clone()
            },
            LATER,
            Verdict::Continue(exited(p(1, 0, true), 1)),
        );
        // No exit since the previous sample: the streak goes on.
        check(
            exited(p(1, 0, true), 1),
            Sample {
                exits: 1,
                restarts_in_window: 1,
                ..ok.clone()
            },
            LATER,
            Verdict::Commit,
        );
        check(
            p(0, 0, false),
            healthy("1.0"),
            LATER,
            Verdict::RollBack(R::WrongVersion {
                expected: "2.0".into(),
                reported: "1.0".into(),
            }),
        );
        let unhealthy = Sample {
            health: Some(HealthAnswer::Answered {
                status: AppStatus::Unhealthy,
                version: "2.0".into(),
            }),
            ..ok.clone()
        };
        check(
            p(1, 0, true),
            unhealthy.clone(),
            LATER,
            Verdict::Continue(p(0, 1, true)),
        );
        check(
            p(0, 1, true),
            unhealthy,
            LATER,
            Verdict::RollBack(R::Unhealthy {
                status: AppStatus::Unhealthy,
            }),
        );
        let silent = Sample {
            health: Some(HealthAnswer::NoAnswer),
            ..ok.clone()
        };
        check(
            p(0, 0, false),
            silent.clone(),
            LATER,
            Verdict::Continue(p(0, 1, false)),
        );
        check(
            p(0, 1, false),
            silent,
            LATER,
            Verdict::RollBack(R::Unresponsive { failures: 2 }),
        );
        let wrong = Sample {
            probe: Some(Err("digest differs".into())),
            ..ok.clone()
        };
        check(
            p(0, 1, true),
            wrong,
            LATER,
            Verdict::RollBack(R::ProbeFailed {
                detail: "digest differs".into(),
            }),
        );
        let degraded = Sample {
            health: Some(HealthAnswer::Answered {
                status: AppStatus::Degraded,
                version: "2.0".into(),
            }),
            ..ok.clone()
        };
        check(
            p(1, 1, true),
            degraded.clone(),
            LATER,
            Verdict::Continue(p(0, 1, true)),
        );
        check(
            p(0, 0, true),
            degraded,
            NOW,
            Verdict::RollBack(R::TrialDeadline { good: 0, needed: 2 }),
        );
        // A good sample on the deadline still counts.
        check(p(1, 0, true), ok, NOW, Verdict::Commit);
    }
}
