//! Health samples and their running aggregates: the baseline captured before a rollout, the
//! per-wave statistics the gates judge, and the concurrent control group.
//!
//! Everything here is O(1) per sample so that gates can be evaluated on every report, even for
//! waves of tens of thousands of devices.

use fleet_proto::device::{AppStatus, Heartbeat};
use serde::{Deserialize, Serialize};

/// One device's health at one instant, as the gates use it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub status: AppStatus,
    /// The version the application reports (or the agent's active version).
    pub version: Option<String>,
    /// Fraction 0–1.
    pub error_rate: Option<f64>,
    pub p95_ms: Option<f64>,
    pub cpu_pct: f64,
    pub memory_pct: f64,
    pub restarts_in_window: u32,
    pub probe_ok: Option<bool>,
    /// Requests behind `error_rate`, when the device reports them.
    #[serde(default)]
    pub requests: Option<u64>,
    #[serde(default)]
    pub failed: Option<u64>,
}

impl Sample {
    pub fn from_heartbeat(hb: &Heartbeat) -> Sample {
        Sample {
            status: hb.app.status,
            version: hb.app.version.clone().or_else(|| hb.active_version.clone()),
            error_rate: hb
                .app
                .error_rate
                .map(|e| f64::from(e).clamp(0.0, 1.0))
                .filter(|e| e.is_finite()),
            p95_ms: hb
                .app
                .p95_ms
                .map(f64::from)
                .filter(|p| p.is_finite() && *p >= 0.0),
            cpu_pct: f64::from(hb.system.cpu_pct),
            memory_pct: hb.system.memory_pct(),
            restarts_in_window: hb.app.restarts_in_window,
            probe_ok: hb.app.probe_ok,
            requests: hb.app.requests,
            failed: hb.app.failed,
        }
    }

    /// How many requests this sample's error rate stands for, from 1 to `cap`. Requests on
    /// one device within one report interval are not independent (one bad sensor fails them
    /// all), so no single report may weigh more than `cap`.
    pub fn weight(&self, cap: f64) -> f64 {
        self.requests
            .map_or(1.0, |r| (r as f64).clamp(1.0, cap.max(1.0)))
    }

    /// The health endpoint did not answer, or the application is not running.
    pub fn unreachable(&self) -> bool {
        matches!(self.status, AppStatus::Unreachable | AppStatus::Stopped)
    }
}

/// Running sums over samples; means on demand. An exponentially weighted mean tracks the
/// recent direction for the trend detector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    /// Samples of any kind.
    pub n: u64,
    /// Samples that carried an error rate.
    pub n_err: u64,
    /// The evidence behind the error rate: the samples' weights (requests, capped), summed.
    #[serde(default)]
    pub w_err: f64,
    /// Σ error rate × weight.
    #[serde(default)]
    pub sum_err_w: f64,
    pub n_p95: u64,
    pub sum_p95: f64,
    pub sum_cpu: f64,
    pub sum_mem: f64,
    pub ewma_err: Option<f64>,
    pub ewma_p95: Option<f64>,
}

impl Agg {
    /// Adds a sample; its error rate weighs the requests behind it, at most `cap` (1 weighs
    /// every sample alike).
    pub fn add(&mut self, s: &Sample, alpha: f64, cap: f64) {
        self.n += 1;
        self.sum_cpu += s.cpu_pct;
        self.sum_mem += s.memory_pct;
        if let Some(e) = s.error_rate {
            let w = s.weight(cap);
            self.n_err += 1;
            self.w_err += w;
            let ei = match (s.requests, s.failed) {
                (Some(r), Some(f)) if r > 0 => (f as f64 / r as f64).clamp(0.0, 1.0),
                _ => e,
            };
            self.sum_err_w += ei * w;
            self.ewma_err = Some(match self.ewma_err {
                None => e,
                Some(prev) => prev + alpha * (e - prev),
            });
        }
        if let Some(p) = s.p95_ms {
            self.n_p95 += 1;
            self.sum_p95 += p;
            self.ewma_p95 = Some(match self.ewma_p95 {
                None => p,
                Some(prev) => prev + alpha * (p - prev),
            });
        }
    }

    pub fn error_rate(&self) -> Option<f64> {
        (self.w_err > 0.0).then(|| self.sum_err_w / self.w_err)
    }

    pub fn p95_ms(&self) -> Option<f64> {
        (self.n_p95 > 0).then(|| self.sum_p95 / self.n_p95 as f64)
    }

    pub fn cpu_pct(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum_cpu / self.n as f64)
    }

    pub fn memory_pct(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum_mem / self.n as f64)
    }
}

/// Metrics captured from the target devices before the rollout starts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Devices that contributed a sample.
    pub devices: u64,
    pub error_rate: Option<f64>,
    pub p95_ms: Option<f64>,
    pub cpu_pct: Option<f64>,
    pub memory_pct: Option<f64>,
}

impl Baseline {
    /// The baseline of the given latest samples, one per device.
    pub fn capture<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Baseline {
        let mut agg = Agg::default();
        for s in samples {
            // One vote per device: the baseline is the typical device, not the busiest.
            agg.add(s, 1.0, 1.0);
        }
        Baseline {
            devices: agg.n,
            error_rate: agg.error_rate(),
            p95_ms: agg.p95_ms(),
            cpu_pct: agg.cpu_pct(),
            memory_pct: agg.memory_pct(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(err: f64, p95: f64) -> Sample {
        Sample {
            status: AppStatus::Healthy,
            version: Some("1".into()),
            error_rate: Some(err),
            p95_ms: Some(p95),
            cpu_pct: 10.0,
            memory_pct: 50.0,
            restarts_in_window: 0,
            probe_ok: None,
            requests: None,
            failed: None,
        }
    }

    #[test]
    fn a_sample_weighs_the_requests_behind_it_up_to_the_cap() {
        let mut busy = sample(0.5, 100.0);
        busy.requests = Some(1000);
        let mut idle = sample(0.0, 100.0);
        idle.requests = Some(0);
        assert_eq!(busy.weight(100.0), 100.0);
        assert_eq!(
            idle.weight(100.0),
            1.0,
            "no requests still counts as one observation"
        );
        assert_eq!(
            sample(0.1, 1.0).weight(100.0),
            1.0,
            "no counter: one observation"
        );
        let mut a = Agg::default();
        a.add(&busy, 0.2, 100.0);
        a.add(&idle, 0.2, 100.0);
        assert_eq!(a.n_err, 2);
        assert_eq!(a.w_err, 101.0);
        assert!((a.error_rate().unwrap() - 50.0 / 101.0).abs() < 1e-12);
    }

    /// Heartbeats every 0.5 s from a device whose app started with the arm: 5 frames per
    /// interval, frames 67, 98 and 107 fail (demo-app seed 1 at --error-rate 0.03), and the
    /// app's 30 s window, younger than its process, is the rate since start.
    fn demo_arm_heartbeats(with_failed: bool) -> Vec<Sample> {
        let failing = [67u64, 98, 107];
        (1..=23u64)
            .map(|i| {
                let (done, before) = (i * 5, (i - 1) * 5);
                let failed_total = failing.iter().filter(|&&f| f < done).count() as u64;
                let failed_before = failing.iter().filter(|&&f| f < before).count() as u64;
                let mut s = sample(failed_total as f64 / done as f64, 2.0);
                s.requests = Some(5);
                s.failed = with_failed.then_some(failed_total - failed_before);
                s
            })
            .collect()
    }

    #[test]
    fn failed_counts_make_the_error_rate_that_of_the_requests() {
        let rate = |with_failed| {
            let mut a = Agg::default();
            for s in demo_arm_heartbeats(with_failed) {
                a.add(&s, 0.2, 100.0);
            }
            (a.error_rate().unwrap(), a.w_err)
        };
        assert_eq!(
            rate(true),
            (3.0 / 115.0, 115.0),
            "3 of the 115 frames failed"
        );
        let (diluted, _) = rate(false);
        assert!(
            diluted < 0.01,
            "window rates weighed by interval requests: {diluted}"
        );
    }

    #[test]
    fn baseline_is_the_mean_of_the_latest_samples() {
        let b = Baseline::capture(&[sample(0.01, 100.0), sample(0.03, 300.0)]);
        assert_eq!(b.devices, 2);
        assert!((b.error_rate.unwrap() - 0.02).abs() < 1e-12);
        assert!((b.p95_ms.unwrap() - 200.0).abs() < 1e-9);
        assert_eq!(Baseline::capture(&[]).error_rate, None);
    }

    #[test]
    fn ewma_follows_the_recent_direction() {
        let mut a = Agg::default();
        for e in [0.0, 0.0, 0.1, 0.2, 0.3] {
            a.add(&sample(e, 100.0), 0.5, 1.0);
        }
        assert!(a.ewma_err.unwrap() > a.error_rate().unwrap());
    }
}
