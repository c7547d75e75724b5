//! Fault points: named places in the update flow where a test can make the agent die.
//!
//! Compiled only with the `fault-points` feature. `FLEET_AGENT_FAULT=NAME` makes the agent
//! SIGKILL itself the first time it reaches point `NAME` (`NAME@N`: the N-th time), so the
//! crash-matrix test can kill it at every point and check what a restart makes of it. Without
//! the feature [`point`] is an empty inline function.

/// Every point, in update-flow order. Tests iterate over this list.
pub const POINTS: &[&str] = &[
    "journal-before-rename",
    "download-midway",
    "download-done",
    "install-midway",
    "install-before-hook",
    "install-done",
    "swap-before-rename",
    "swap-after-rename",
    "trial-started",
    "trial-probing",
    "commit-before-journal",
    "rollback-after-swap",
    "outbox-after-append",
];

#[cfg(feature = "fault-points")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    static TARGET: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);

    fn target() -> &'static Option<(String, u32)> {
        TARGET.get_or_init(|| {
            let spec = std::env::var("FLEET_AGENT_FAULT").ok()?;
            match spec.split_once('@') {
                Some((name, n)) => Some((name.to_owned(), n.parse().unwrap_or(1))),
                None => Some((spec, 1)),
            }
        })
    }

    pub fn point(name: &str) {
        if let Some((want, nth)) = target()
            && want == name
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth
        {
            eprintln!("fleet-agent: fault point {name}: SIGKILL");
            // SAFETY: raise(3) with a valid signal number.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        }
    }
}

/// Dies here if the test asked for it (feature `fault-points`); otherwise does nothing.
#[inline(always)]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown fault point {name}");
    #[cfg(feature = "fault-points")]
    imp::point(name);
}
