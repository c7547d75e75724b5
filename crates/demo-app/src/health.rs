//! `/health`: turns the workload's metrics and the fault knobs into a status, named checks and
//! the JSON document the agent's health probe reads.
//!
//! Status is the worst of the checks:
//!
//! | check | `ok` | degraded | unhealthy |
//! |---|---|---|---|
//! | `worker` | a frame finished recently | — | `stalled`: no frame for the stall bound |
//! | `errors` | window error rate < 5 % | `elevated`: 5 % ≤ rate < 50 % | `failing`: rate ≥ 50 % |
//! | `self_test` | always, unless `--unhealthy` | — | `failing` (`--unhealthy`) |
//!
//! `errors` says `ok` until the window holds `MIN_SAMPLES` items: one failed frame right after
//! start is not a 100 % error rate worth reporting. Unhealthy answers HTTP 503; healthy and
//! degraded answer 200 (a degraded app still serves).

use std::time::Duration;

use crate::json::Object;
use crate::metrics::Snapshot;

const ELEVATED_ERROR_RATE: f64 = 0.05;
const FAILING_ERROR_RATE: f64 = 0.5;
const MIN_SAMPLES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    pub fn http_code(self) -> u16 {
        match self {
            Status::Healthy | Status::Degraded => 200,
            Status::Unhealthy => 503,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub state: &'static str,
    pub severity: Status,
}

/// What the checks look at, gathered by the caller at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Inputs {
    pub metrics: Snapshot,
    pub since_last_frame: Duration,
    /// How long without a finished frame counts as stalled (`Workload::stall_bound`).
    pub stall_after: Duration,
    /// The `--unhealthy` knob.
    pub forced_unhealthy: bool,
}

pub fn evaluate(inputs: &Inputs) -> (Status, [Check; 3]) {
    let worker = if inputs.since_last_frame > inputs.stall_after {
        check("worker", "stalled", Status::Unhealthy)
    } else {
        check("worker", "ok", Status::Healthy)
    };
    let m = inputs.metrics;
    let errors = if m.in_window < MIN_SAMPLES || m.error_rate < ELEVATED_ERROR_RATE {
        check("errors", "ok", Status::Healthy)
    } else if m.error_rate < FAILING_ERROR_RATE {
        check("errors", "elevated", Status::Degraded)
    } else {
        check("errors", "failing", Status::Unhealthy)
    };
    let self_test = if inputs.forced_unhealthy {
        check("self_test", "failing", Status::Unhealthy)
    } else {
        check("self_test", "ok", Status::Healthy)
    };
    let checks = [worker, errors, self_test];
    let status = checks
        .iter()
        .map(|c| c.severity)
        .max()
        .unwrap_or(Status::Healthy);
    (status, checks)
}

fn check(name: &'static str, state: &'static str, severity: Status) -> Check {
    Check {
        name,
        state,
        severity,
    }
}

/// The `/health` body:
/// `{"status":…,"version":…,"checks":{name:state,…},"metrics":{"error_rate":…,"p95_ms":…,"requests":…,"failed":…},"uptime_s":…,"rss_bytes":…}`:
/// `error_rate` and `p95_ms` over the window, `requests` and `failed` counted since start.
pub fn render(
    status: Status,
    checks: &[Check],
    version: &str,
    metrics: &Snapshot,
    uptime: Duration,
    rss_bytes: Option<u64>,
) -> String {
    let checks_json = checks
        .iter()
        .fold(Object::new(), |o, c| o.string(c.name, c.state));
    let metrics_json = Object::new()
        .number("error_rate", metrics.error_rate, 4)
        .number("p95_ms", metrics.p95_ms, 3)
        .integer("requests", metrics.requests)
        .integer("failed", metrics.failed);
    Object::new()
        .string("status", status.as_str())
        .string("version", version)
        .object("checks", checks_json)
        .object("metrics", metrics_json)
        .integer("uptime_s", uptime.as_secs())
        .optional_integer("rss_bytes", rss_bytes)
        .finish()
}

/// Resident set size from `/proc/self/status`; `None` where there is no procfs.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

/// Extracts `VmRSS:   1234 kB` as bytes.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(error_rate: f64, in_window: usize) -> Snapshot {
        Snapshot {
            error_rate,
            p95_ms: 2.5,
            requests: 100,
            failed: 7,
            in_window,
        }
    }

    fn inputs(error_rate: f64, in_window: usize, idle_s: u64, forced: bool) -> Inputs {
        Inputs {
            metrics: metrics(error_rate, in_window),
            since_last_frame: Duration::from_secs(idle_s),
            stall_after: Duration::from_secs(5),
            forced_unhealthy: forced,
        }
    }

    #[test]
    fn status_is_the_worst_check() {
        use Status::*;
        // (what, inputs as (error rate, items in window, seconds since a frame, --unhealthy),
        //  status, check states)
        #[rustfmt::skip]
        let cases = [
            ("all ok", inputs(0.0, 100, 0, false), Healthy, ["ok", "ok", "ok"]),
            ("few errors", inputs(0.049, 100, 0, false), Healthy, ["ok", "ok", "ok"]),
            ("elevated", inputs(0.05, 100, 0, false), Degraded, ["ok", "elevated", "ok"]),
            ("failing", inputs(0.5, 100, 0, false), Unhealthy, ["ok", "failing", "ok"]),
            ("too few samples", inputs(1.0, 19, 0, false), Healthy, ["ok", "ok", "ok"]),
            ("stalled", inputs(0.0, 100, 6, false), Unhealthy, ["stalled", "ok", "ok"]),
            ("forced", inputs(0.0, 100, 0, true), Unhealthy, ["ok", "ok", "failing"]),
            ("forced and elevated", inputs(0.2, 100, 0, true), Unhealthy, ["ok", "elevated", "failing"]),
        ];
        for (name, inputs, want_status, want_states) in cases {
            let (status, checks) = evaluate(&inputs);
            assert_eq!(status, want_status, "{name}");
            assert_eq!(checks.map(|c| c.state), want_states, "{name}");
            assert_eq!(checks.map(|c| c.name), ["worker", "errors", "self_test"]);
        }
    }

    #[test]
    fn renders_the_documented_shape() {
        let (status, checks) = evaluate(&inputs(0.1, 100, 0, false));
        let body = render(
            status,
            &checks,
            "1.2.3",
            &metrics(0.1, 100),
            Duration::from_millis(12_900),
            Some(4096),
        );
        assert_eq!(
            body,
            r#"{"status":"degraded","version":"1.2.3","checks":{"worker":"ok","errors":"elevated","self_test":"ok"},"metrics":{"error_rate":0.1000,"p95_ms":2.500,"requests":100,"failed":7},"uptime_s":12,"rss_bytes":4096}"#
        );
    }

    #[test]
    fn http_code_follows_status() {
        assert_eq!(Status::Healthy.http_code(), 200);
        assert_eq!(Status::Degraded.http_code(), 200);
        assert_eq!(Status::Unhealthy.http_code(), 503);
    }

    #[test]
    fn parses_vm_rss() {
        let cases = [
            (
                "Name:\tx\nVmRSS:\t    1234 kB\nVmData: 9 kB\n",
                Some(1234 * 1024),
            ),
            ("VmRSS: 0 kB", Some(0)),
            ("Name: x\n", None),
            ("VmRSS: lots kB\n", None),
            ("VmRSS: 12 MB\n", None),
        ];
        for (status, want) in cases {
            assert_eq!(parse_vm_rss(status), want, "{status:?}");
        }
    }
}
