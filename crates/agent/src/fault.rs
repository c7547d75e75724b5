//! Fault points: named places in the agent where a test can make it die or hang.
//!
//! Compiled only with the `fault-points` feature. `FLEET_AGENT_FAULT=NAME` makes the agent
//! SIGKILL itself the first time it reaches point `NAME` (`NAME@N`: the N-th time), so the
//! crash-matrix test can kill it at every point and check what a restart makes of it.
//! `FLEET_AGENT_FAULT=hang:NAME[@N]` blocks the thread that reached the point forever instead:
//! at a point on the main loop (the swap, `heartbeat`) the whole agent stops, watchdog pings
//! included, which is how the systemd test bed holds an agent in the middle of a swap until it
//! cuts the power, or lets systemd's watchdog find a hung agent. Without the feature [`point`]
//! is an empty inline function.

/// Every point in the update flow, in order. The crash matrix iterates over this list.
pub const POINTS: &[&str] = &[
    "journal-before-rename",
    "download-midway",
    "download-done",
    "install-midway",
    "install-before-hook",
    "install-done",
    "snapshot-midway",
    "snapshot-done",
    "swap-before-rename",
    "swap-after-rename",
    "trial-started",
    "trial-probing",
    "commit-before-journal",
    "restore-midway",
    "restore-done",
    "rollback-after-swap",
    "outbox-after-append",
];

/// Points outside the update flow: `heartbeat` is reached on the main loop at every heartbeat
/// tick, with or without an update (a hang there is a hung agent).
pub const IDLE_POINTS: &[&str] = &["heartbeat"];

/// Points only a blue-green release reaches (issue 9), not in the canary-rolling crash matrix:
/// the new version started beside the old one; the traffic switched to it (before the
/// journal says so); the commit (or the end of a hold) about to stop the old one, its
/// connections drained; a switch back about to happen (after a failed trial, or to the version
/// a hold kept warm); the traffic switched back (before the journal says so, the `active` link
/// not moved yet); the new version's instance about to stop after a switch back (its
/// connections drained) or a warm-up rollback. At the last two the journal already says how
/// the update ended.
pub const BLUE_GREEN_POINTS: &[&str] = &[
    "bluegreen-warming",
    "bluegreen-switched",
    "bluegreen-promote",
    "bluegreen-before-switch-back",
    "bluegreen-switched-back",
    "bluegreen-stop-standby",
];

/// The blue-green points a hold reaches once the coordinator decides (the switch back to the
/// version kept warm, or the `Promote` that stops it): the hold crash matrix kills the agent at
/// each of them.
pub const HOLD_POINTS: &[&str] = &[
    "bluegreen-before-switch-back",
    "bluegreen-switched-back",
    "bluegreen-stop-standby",
    "bluegreen-promote",
];

/// The blue-green points in the middle of an update's last step, which stops an instance
/// after the journal says how the update ended (the commit's `Promote` of the old instance;
/// the `StopStandby` of the new one after a switch back or a warm-up rollback): the stop
/// crash matrix kills the agent at each.
pub const STOP_POINTS: &[&str] = &["bluegreen-promote", "bluegreen-stop-standby"];

#[cfg(feature = "fault-points")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    pub(super) struct Target {
        pub name: String,
        pub nth: u32,
        pub hang: bool,
    }

    pub(super) fn parse(spec: &str) -> Target {
        let (hang, rest) = match spec.strip_prefix("hang:") {
            Some(rest) => (true, rest),
            None => (false, spec),
        };
        let (name, nth) = match rest.split_once('@') {
            Some((name, n)) => (name, n.parse().unwrap_or(1)),
            None => (rest, 1),
        };
        Target {
            name: name.to_owned(),
            nth,
            hang,
        }
    }

    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);

    fn target() -> &'static Option<Target> {
        TARGET.get_or_init(|| std::env::var("FLEET_AGENT_FAULT").ok().map(|s| parse(&s)))
    }

    pub fn point(name: &str) {
        let Some(target) = target() else { return };
        if target.name != name || HITS.fetch_add(1, Ordering::SeqCst) + 1 != target.nth {
            return;
        }
        if target.hang {
            eprintln!("fleet-agent: fault point {name}: hanging");
            // Parked for good: only a signal ends this (systemd's watchdog, a power cut).
            loop {
                std::thread::park();
            }
        }
        eprintln!("fleet-agent: fault point {name}: SIGKILL");
        // SAFETY: raise(3) with a valid signal number.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// Dies or hangs here if the test asked for it (feature `fault-points`); otherwise does nothing.
#[inline(always)]
pub fn point(name: &str) {
    debug_assert!(
        POINTS.contains(&name) || IDLE_POINTS.contains(&name) || BLUE_GREEN_POINTS.contains(&name),
        "unknown fault point {name}"
    );
    #[cfg(feature = "fault-points")]
    imp::point(name);
}

#[cfg(all(test, feature = "fault-points"))]
mod tests {
    use super::imp::{Target, parse};

    #[test]
    fn parses_the_spec() {
        let t = |name: &str, nth, hang| Target {
            name: name.into(),
            nth,
            hang,
        };
        assert_eq!(parse("swap-after-rename"), t("swap-after-rename", 1, false));
        assert_eq!(parse("trial-probing@2"), t("trial-probing", 2, false));
        assert_eq!(parse("hang:heartbeat@3"), t("heartbeat", 3, true));
        assert_eq!(
            parse("hang:swap-before-rename"),
            t("swap-before-rename", 1, true)
        );
    }
}
