//! The fault knobs, the device-type gate in front of them, and the faults that act on the whole
//! process (crash timer, memory leak, SIGTERM disposition). Faults that shape answers (errors,
//! latency, wrong version or output, unhealthy, hang) are applied where the answers are made.

use std::fmt;
use std::io;
use std::thread;
use std::time::{Duration, Instant};

use crate::Exit;

/// Every fault knob. `Default` is a healthy app.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultKnobs {
    pub crash_at_start: bool,
    pub crash_after: Option<Duration>,
    pub leak_mib_per_sec: f64,
    pub error_rate: f64,
    pub latency: Duration,
    pub report_version: Option<String>,
    pub unhealthy: bool,
    pub hang: bool,
    pub wrong_output: bool,
    pub ignore_sigterm: bool,
}

/// Applies `--only-on-device-type`: with it, the knobs hold only on that device type (a
/// compatibility bug that hits one kind of hardware) and every other device runs healthy.
pub fn gate(knobs: FaultKnobs, only_on: Option<&str>, device_type: Option<&str>) -> FaultKnobs {
    match only_on {
        Some(wanted) if device_type != Some(wanted) => FaultKnobs::default(),
        _ => knobs,
    }
}

/// One line for the start-up log, so a demo's stderr says which release is the broken one.
impl fmt::Display for FaultKnobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        let mut switch = |on: bool, name: &str| {
            if on {
                parts.push(name.to_string());
            }
        };
        switch(self.crash_at_start, "crash-at-start");
        switch(self.unhealthy, "unhealthy");
        switch(self.hang, "hang");
        switch(self.wrong_output, "wrong-output");
        switch(self.ignore_sigterm, "ignore-sigterm");
        if let Some(d) = self.crash_after {
            parts.push(format!("crash-after={}", d.as_secs_f64()));
        }
        if self.leak_mib_per_sec > 0.0 {
            parts.push(format!("leak-mb-per-sec={}", self.leak_mib_per_sec));
        }
        if self.error_rate > 0.0 {
            parts.push(format!("error-rate={}", self.error_rate));
        }
        if !self.latency.is_zero() {
            parts.push(format!("latency-ms={}", self.latency.as_millis()));
        }
        if let Some(v) = &self.report_version {
            parts.push(format!("report-version={v}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// Sets SIGTERM's disposition: ignored with `--ignore-sigterm`, otherwise the default (the
/// process dies of the signal at once). The default is set explicitly because an ignored
/// disposition is inherited across exec, and a supervisor started that way would otherwise
/// leave us unkillable by SIGTERM without anyone asking for it.
pub fn set_sigterm_disposition(ignore: bool) -> io::Result<()> {
    let handler = if ignore { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: installing SIG_IGN or SIG_DFL runs no code of ours in signal context; it only
    // changes the kernel's disposition for SIGTERM.
    let previous = unsafe { libc::signal(libc::SIGTERM, handler) };
    if previous == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `--crash-after`: exits with status 4 once `after` has passed.
pub fn spawn_crash_timer(after: Duration) -> io::Result<()> {
    thread::Builder::new()
        .name("crash-timer".into())
        .spawn(move || {
            thread::sleep(after);
            eprintln!(
                "fleet-demo-app: crashing after {} s (--crash-after)",
                after.as_secs_f64()
            );
            std::process::exit(Exit::CrashAfter.code());
        })
        .map(drop)
}

/// How often the leak allocates: small steps so RSS grows smoothly rather than in jumps.
const LEAK_TICK: Duration = Duration::from_millis(100);
const MIB: u64 = 1024 * 1024;

/// `--leak-mb-per-sec`: allocates and touches memory at `mib_per_sec` until `limit_mib` MiB are
/// leaked, then stops, holding what it took.
pub fn spawn_leak(mib_per_sec: f64, limit_mib: u64) -> io::Result<()> {
    thread::Builder::new()
        .name("leak".into())
        .spawn(move || {
            let start = Instant::now();
            let mut leaked: u64 = 0;
            let limit = limit_mib.saturating_mul(MIB);
            while leaked < limit {
                thread::sleep(LEAK_TICK);
                let target = leak_target(mib_per_sec, start.elapsed(), limit_mib);
                let step = target.saturating_sub(leaked);
                if step == 0 {
                    continue;
                }
                let Ok(len) = usize::try_from(step) else {
                    break;
                };
                // A non-zero fill writes every page, so the kernel must back each one and RSS
                // really grows (zeroed memory from calloc could stay unbacked). Leaking the
                // allocation keeps it for the life of the process; black_box keeps the
                // optimizer from eliding an allocation nobody reads.
                std::hint::black_box(vec![0xA5u8; len].leak());
                leaked = target;
            }
        })
        .map(drop)
}

/// Bytes that should have been leaked `elapsed` after start.
fn leak_target(mib_per_sec: f64, elapsed: Duration, limit_mib: u64) -> u64 {
    let want = mib_per_sec * elapsed.as_secs_f64() * MIB as f64;
    // `as` saturates for floats; the limit caps it anyway.
    (want as u64).min(limit_mib.saturating_mul(MIB))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broken() -> FaultKnobs {
        FaultKnobs {
            unhealthy: true,
            error_rate: 0.5,
            ..FaultKnobs::default()
        }
    }

    #[test]
    fn gate_applies_knobs_only_on_the_named_device_type() {
        let cases = [
            (None, None, true),
            (None, Some("rpi4"), true),
            (Some("jetson"), Some("jetson"), true),
            (Some("jetson"), Some("rpi4"), false),
            (Some("jetson"), None, false),
            (Some("jetson"), Some("Jetson"), false),
        ];
        for (only_on, device_type, active) in cases {
            let got = gate(broken(), only_on, device_type);
            let want = if active {
                broken()
            } else {
                FaultKnobs::default()
            };
            assert_eq!(
                got, want,
                "only_on {only_on:?}, device type {device_type:?}"
            );
        }
    }

    #[test]
    fn leak_target_grows_with_time_up_to_the_limit() {
        let cases = [
            (10.0, 0, 512, 0),
            (10.0, 500, 512, 5 * MIB),
            (10.0, 2000, 512, 20 * MIB),
            (0.5, 1000, 512, MIB / 2),
            (100.0, 10_000, 64, 64 * MIB),
            (0.0, 10_000, 64, 0),
        ];
        for (rate, elapsed_ms, limit, want) in cases {
            let got = leak_target(rate, Duration::from_millis(elapsed_ms), limit);
            assert_eq!(
                got, want,
                "rate {rate} after {elapsed_ms} ms, limit {limit}"
            );
        }
    }

    #[test]
    fn display_lists_active_knobs() {
        assert_eq!(FaultKnobs::default().to_string(), "none");
        let knobs = FaultKnobs {
            hang: true,
            error_rate: 0.25,
            latency: Duration::from_millis(40),
            report_version: Some("9.9.9".into()),
            ..FaultKnobs::default()
        };
        assert_eq!(
            knobs.to_string(),
            "hang error-rate=0.25 latency-ms=40 report-version=9.9.9"
        );
    }
}
