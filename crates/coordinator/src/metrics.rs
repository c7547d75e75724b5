//! Counters and gauges behind `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use fleet_proto::frame::Kind;
use fleet_proto::rollout::RolloutState;

use crate::gate::Trigger;

/// Everything `/metrics` shows. Counters are atomics (the driver bumps them); gauges are a
/// snapshot the driver refreshes on every tick.
#[derive(Debug, Default)]
pub struct Metrics {
    pub reports: [AtomicU64; 5],
    pub decode_errors: [AtomicU64; Kind::ALL.len()],
    /// Gaps in device report sequence numbers, per kind (indexed like `decode_errors`).
    pub lost_reports: [AtomicU64; Kind::ALL.len()],
    pub id_mismatches: AtomicU64,
    pub commands: AtomicU64,
    pub publishes: AtomicU64,
    pub triggers: Mutex<BTreeMap<String, u64>>,
    pub gauges: Mutex<Gauges>,
    /// Heartbeat age when the coordinator applied it: `[bucket..., +Inf]`, then sum and count.
    pub heartbeat_latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub heartbeat_latency_sum_ms: AtomicU64,
}

/// Upper bounds of the heartbeat latency histogram, in milliseconds.
pub const LATENCY_BUCKETS_MS: [u64; 19] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 1000, 2000, 5000,
];

/// Point-in-time values.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    pub devices_by_status: BTreeMap<&'static str, u64>,
    pub rollouts: Vec<RolloutState>,
    pub reports_per_second: f64,
    pub discrepancies: u64,
}

fn kind_index(k: Kind) -> usize {
    Kind::ALL.iter().position(|x| *x == k).unwrap_or(0)
}

/// The report kinds counted in `fleet_reports_total`.
pub const REPORT_KINDS: [Kind; 5] = [
    Kind::State,
    Kind::Heartbeat,
    Kind::Event,
    Kind::Online,
    Kind::Command,
];

impl Metrics {
    pub fn report(&self, k: Kind) {
        if let Some(i) = REPORT_KINDS.iter().position(|x| *x == k) {
            self.reports[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn reports_total(&self) -> u64 {
        self.reports.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn decode_error(&self, k: Kind) {
        self.decode_errors[kind_index(k)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn decode_errors(&self, k: Kind) -> u64 {
        self.decode_errors[kind_index(k)].load(Ordering::Relaxed)
    }

    pub fn lost(&self, k: Kind, n: u64) {
        self.lost_reports[kind_index(k)].fetch_add(n, Ordering::Relaxed);
    }

    pub fn lost_reports(&self, k: Kind) -> u64 {
        self.lost_reports[kind_index(k)].load(Ordering::Relaxed)
    }

    /// Records how old a heartbeat was when the registry and the gates took it in: from the
    /// device's `at` to now. On one host this is the delivery latency; across hosts it also
    /// holds the clock difference.
    pub fn heartbeat_latency(&self, age: std::time::Duration) {
        let ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_MS
            .iter()
            .position(|le| ms <= *le)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.heartbeat_latency[i].fetch_add(1, Ordering::Relaxed);
        self.heartbeat_latency_sum_ms
            .fetch_add(ms, Ordering::Relaxed);
    }

    pub fn trigger(&self, t: &Trigger) {
        if let Ok(mut m) = self.triggers.lock() {
            *m.entry(t.as_str().to_owned()).or_insert(0) += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = self.gauges.lock().map(|g| g.clone()).unwrap_or_default();
        let _ = writeln!(o, "# HELP fleet_devices Devices in the registry by status.");
        let _ = writeln!(o, "# TYPE fleet_devices gauge");
        for status in ["online", "offline", "quarantined"] {
            let n = g.devices_by_status.get(status).copied().unwrap_or(0);
            let _ = writeln!(o, "fleet_devices{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            o,
            "# HELP fleet_device_discrepancies Devices with an unresolved registry discrepancy."
        );
        let _ = writeln!(o, "# TYPE fleet_device_discrepancies gauge");
        let _ = writeln!(o, "fleet_device_discrepancies {}", g.discrepancies);
        let _ = writeln!(o, "# HELP fleet_rollouts Rollouts by phase and status.");
        let _ = writeln!(o, "# TYPE fleet_rollouts gauge");
        let mut by: BTreeMap<(String, String), u64> = BTreeMap::new();
        for r in &g.rollouts {
            *by.entry((r.phase.to_string(), r.status.to_string()))
                .or_insert(0) += 1;
        }
        for ((phase, status), n) in by {
            let _ = writeln!(
                o,
                "fleet_rollouts{{phase=\"{phase}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            o,
            "# HELP fleet_reports_total Device reports and operator commands received."
        );
        let _ = writeln!(o, "# TYPE fleet_reports_total counter");
        for (i, k) in REPORT_KINDS.iter().enumerate() {
            let _ = writeln!(
                o,
                "fleet_reports_total{{kind=\"{}\"}} {}",
                kind_label(*k),
                self.reports[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP fleet_reports_per_second Device reports per second over the last tick."
        );
        let _ = writeln!(o, "# TYPE fleet_reports_per_second gauge");
        let _ = writeln!(o, "fleet_reports_per_second {:.1}", g.reports_per_second);
        let _ = writeln!(
            o,
            "# HELP fleet_heartbeat_latency_seconds Age of a heartbeat when the coordinator applied it (device clock to coordinator clock)."
        );
        let _ = writeln!(o, "# TYPE fleet_heartbeat_latency_seconds histogram");
        let mut cumulative = 0u64;
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += self.heartbeat_latency[i].load(Ordering::Relaxed);
            let _ = writeln!(
                o,
                "fleet_heartbeat_latency_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *le as f64 / 1000.0
            );
        }
        cumulative += self.heartbeat_latency[LATENCY_BUCKETS_MS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "fleet_heartbeat_latency_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let _ = writeln!(
            o,
            "fleet_heartbeat_latency_seconds_sum {}",
            self.heartbeat_latency_sum_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let _ = writeln!(o, "fleet_heartbeat_latency_seconds_count {cumulative}");
        let _ = writeln!(
            o,
            "# HELP fleet_decode_errors_total Frames that did not decode, dropped."
        );
        let _ = writeln!(o, "# TYPE fleet_decode_errors_total counter");
        for k in Kind::ALL {
            let _ = writeln!(
                o,
                "fleet_decode_errors_total{{kind=\"{}\"}} {}",
                kind_label(k),
                self.decode_errors(k)
            );
        }
        // Per kind: an event gap is a lost step of an update, a state gap only a superseded
        // report (the latest state wins), a heartbeat gap a QoS 0 sample.
        let _ = writeln!(
            o,
            "# HELP fleet_lost_reports_total Gaps in per-device report sequence numbers, by kind."
        );
        let _ = writeln!(o, "# TYPE fleet_lost_reports_total counter");
        for k in [Kind::State, Kind::Heartbeat, Kind::Event] {
            let _ = writeln!(
                o,
                "fleet_lost_reports_total{{kind=\"{}\"}} {}",
                kind_label(k),
                self.lost_reports(k)
            );
        }
        let _ = writeln!(
            o,
            "# HELP fleet_rejected_reports_total Reports whose payload device id differs from the topic's."
        );
        let _ = writeln!(o, "# TYPE fleet_rejected_reports_total counter");
        let _ = writeln!(
            o,
            "fleet_rejected_reports_total {}",
            self.id_mismatches.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP fleet_trigger_firings_total Rollback triggers that fired."
        );
        let _ = writeln!(o, "# TYPE fleet_trigger_firings_total counter");
        let fired = self.triggers.lock().map(|m| m.clone()).unwrap_or_default();
        for t in Trigger::ALL {
            let n = fired.get(t.as_str()).copied().unwrap_or(0);
            let _ = writeln!(
                o,
                "fleet_trigger_firings_total{{trigger=\"{}\"}} {n}",
                t.as_str()
            );
        }
        let _ = writeln!(
            o,
            "# HELP fleet_publishes_total Messages the coordinator published."
        );
        let _ = writeln!(o, "# TYPE fleet_publishes_total counter");
        let _ = writeln!(
            o,
            "fleet_publishes_total {}",
            self.publishes.load(Ordering::Relaxed)
        );
        o
    }
}

pub fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Desired => "desired",
        Kind::State => "state",
        Kind::Heartbeat => "heartbeat",
        Kind::Event => "event",
        Kind::Online => "online",
        Kind::Command => "command",
        Kind::Reply => "reply",
        Kind::RolloutState => "rollout_state",
        Kind::Trust => "trust",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_reports_are_counted_per_kind() {
        let m = Metrics::default();
        m.lost(Kind::State, 2);
        m.lost(Kind::Event, 1);
        let text = m.render();
        assert!(
            text.contains("fleet_lost_reports_total{kind=\"state\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("fleet_lost_reports_total{kind=\"heartbeat\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("fleet_lost_reports_total{kind=\"event\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn heartbeat_latency_is_a_cumulative_histogram() {
        let m = Metrics::default();
        for ms in [1, 4, 4, 250, 60_000] {
            m.heartbeat_latency(std::time::Duration::from_millis(ms));
        }
        let text = m.render();
        for line in [
            "fleet_heartbeat_latency_seconds_bucket{le=\"0.001\"} 1\n",
            "fleet_heartbeat_latency_seconds_bucket{le=\"0.005\"} 3\n",
            "fleet_heartbeat_latency_seconds_bucket{le=\"0.3\"} 4\n",
            "fleet_heartbeat_latency_seconds_bucket{le=\"5\"} 4\n",
            "fleet_heartbeat_latency_seconds_bucket{le=\"+Inf\"} 5\n",
            "fleet_heartbeat_latency_seconds_count 5\n",
            "fleet_heartbeat_latency_seconds_sum 60.259\n",
        ] {
            assert!(text.contains(line), "{line:?} not in\n{text}");
        }
    }
}
