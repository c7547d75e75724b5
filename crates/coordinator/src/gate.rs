//! Health gates and triggers: pure judgements over [`Agg`]regates and samples.
//!
//! Two kinds of judgement:
//! - **Triggers** ([`breach`], [`device_breach`]) are checked on every report. A trigger that
//!   fires rolls back at once; it needs strong evidence (a Wilson *lower* bound above the limit,
//!   a minimum number of samples), because a false rollback costs a wave.
//! - **The gate** ([`verdict`]) is judged when a soak has elapsed. PASS needs a minimum sample
//!   and a Wilson *upper* bound within the limit: "not proven bad" is not "proven good". Anything
//!   between is [`Verdict::Inconclusive`], which extends the soak.
//!
//! Design: the error rate a heartbeat carries is the application's own fraction over its
//! window. We do not know how many requests stand behind it, so each heartbeat counts as one
//! Bernoulli-like observation with that probability. This underestimates the evidence (a real
//! window holds many requests), which makes both bounds wider: slower to PASS, slower to FAIL on
//! the confidence bound, never faster. The hard per-device triggers (crash loop, memory, a
//! device's own rollback) and the unreachable share do not depend on it.

use std::time::Duration;

use fleet_proto::release::Thresholds;
use serde::{Deserialize, Serialize};

use crate::baseline::{Agg, Baseline, Sample};

/// Whether `p95` is worse than `reference` by more than `pct` percent AND more than `floor_ms`.
fn p95_regressed(p95: f64, reference: f64, pct: f64, floor_ms: f64) -> bool {
    p95 > reference * (1.0 + pct / 100.0) && p95 - reference > floor_ms
}

fn default_p95_floor_ms() -> f64 {
    10.0
}

fn default_max_requests_per_sample() -> f64 {
    100.0
}

/// Gate tuning that is not part of a release's thresholds: how much evidence is enough.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateSettings {
    /// Health samples (heartbeats from devices running the new release) needed before PASS.
    pub min_samples: u64,
    /// Samples needed before an aggregate trigger (error rate, latency) may fire.
    pub min_fail_samples: u64,
    /// Control-group samples needed before the control replaces the baseline as reference.
    pub min_control_samples: u64,
    /// One-sided normal quantile for the Wilson bounds (1.645 = 95 %).
    pub z: f64,
    /// A trend is "worsening" when the recent (EWMA) value has used this share of the
    /// threshold's headroom.
    pub trend_fraction: f64,
    /// EWMA weight of the newest sample.
    pub ewma_alpha: f64,
    /// How many times an inconclusive gate may extend its soak before it counts as failed.
    pub max_extensions: u32,
    /// The most requests one report's error rate may stand for (see `Sample::weight`).
    #[serde(default = "default_max_requests_per_sample")]
    pub max_requests_per_sample: f64,
    /// A p95 regression must also exceed the reference by this much, in milliseconds.
    /// Defaulted when absent so rollouts persisted before it existed still load.
    #[serde(default = "default_p95_floor_ms")]
    pub p95_floor_ms: f64,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            min_samples: 10,
            min_fail_samples: 3,
            min_control_samples: 10,
            z: 1.645,
            trend_fraction: 0.5,
            ewma_alpha: 0.2,
            max_extensions: 3,
            max_requests_per_sample: default_max_requests_per_sample(),
            p95_floor_ms: default_p95_floor_ms(),
        }
    }
}

/// `12 samples, 2,400 requests`: the evidence behind an error rate, for messages.
fn evidence(a: &Agg) -> String {
    if a.w_err > a.n_err as f64 {
        format!("{} samples, {:.0} requests", a.n_err, a.w_err)
    } else {
        format!("{} samples", a.n_err)
    }
}

/// Wilson score interval for a proportion `p` observed over `n` trials, with quantile `z`.
/// Returns `(lower, upper)`; `(0, 1)` without observations.
pub fn wilson(p: f64, n: f64, z: f64) -> (f64, f64) {
    if n <= 0.0 {
        return (0.0, 1.0);
    }
    let p = p.clamp(0.0, 1.0);
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = z * ((p * (1.0 - p) / n) + z2 / (4.0 * n * n)).sqrt() / denom;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Why a wave (or the fleet) is rolled back.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    ErrorRate,
    P95Latency,
    CrashLoop,
    Memory,
    Unreachable,
    FleetErrorRate,
    /// A device's own watchdog rolled the release back during its trial.
    TrialFailed,
    /// The gate found a worsening trend, extended the soak, and the trend continued.
    WorseningTrend,
}

impl Trigger {
    pub const ALL: [Trigger; 8] = [
        Trigger::ErrorRate,
        Trigger::P95Latency,
        Trigger::CrashLoop,
        Trigger::Memory,
        Trigger::Unreachable,
        Trigger::FleetErrorRate,
        Trigger::TrialFailed,
        Trigger::WorseningTrend,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::ErrorRate => "error_rate",
            Trigger::P95Latency => "p95_latency",
            Trigger::CrashLoop => "crash_loop",
            Trigger::Memory => "memory",
            Trigger::Unreachable => "unreachable",
            Trigger::FleetErrorRate => "fleet_error_rate",
            Trigger::TrialFailed => "trial_failed",
            Trigger::WorseningTrend => "worsening_trend",
        }
    }

    /// Whether this trigger rolls back every deployed device rather than the current wave.
    pub fn fleet_wide(&self) -> bool {
        matches!(self, Trigger::FleetErrorRate)
    }
}

/// A trigger that fired, with the evidence in words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breach {
    pub trigger: Trigger,
    pub detail: String,
}

/// What the current measurements are compared against: the not-yet-updated devices while there
/// are enough of them reporting (a concurrent control absorbs fleet-wide drift such as a network
/// problem), the pre-rollout baseline otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub error_rate: f64,
    pub p95_ms: Option<f64>,
    pub source: &'static str,
}

pub fn reference(baseline: &Baseline, control: &Agg, s: &GateSettings) -> Reference {
    if control.n_err >= s.min_control_samples {
        Reference {
            error_rate: control.error_rate().unwrap_or(0.0),
            p95_ms: control.p95_ms().or(baseline.p95_ms),
            source: "control",
        }
    } else {
        Reference {
            error_rate: baseline.error_rate.unwrap_or(0.0),
            p95_ms: baseline.p95_ms,
            source: "baseline",
        }
    }
}

fn pts(x: f64) -> f64 {
    x * 100.0
}

/// The aggregate triggers for one wave's samples. `active` devices were sent the release;
/// `unreachable` of them are silent after installing or report an unreachable health endpoint;
/// `failed` failed before the swap.
pub fn breach(
    wave: &Agg,
    active: u64,
    unreachable: u64,
    failed: u64,
    r: &Reference,
    t: &Thresholds,
    s: &GateSettings,
) -> Option<Breach> {
    if wave.n_err >= s.min_fail_samples
        && let Some(mean) = wave.error_rate()
    {
        let (lo, _) = wilson(mean, wave.w_err, s.z);
        if pts(lo - r.error_rate) > t.error_rate_pts {
            return Some(Breach {
                trigger: Trigger::ErrorRate,
                detail: format!(
                    "error rate {:.1} % (lower bound {:.1} %) is {:.1} pts above the {} {:.1} % (limit +{} pts, {})",
                    pts(mean),
                    pts(lo),
                    pts(lo - r.error_rate),
                    r.source,
                    pts(r.error_rate),
                    t.error_rate_pts,
                    evidence(wave)
                ),
            });
        }
    }
    if wave.n_p95 >= s.min_fail_samples
        && let (Some(mean), Some(reference)) = (wave.p95_ms(), r.p95_ms)
        && reference > 0.0
        && p95_regressed(mean, reference, t.p95_latency_pct, s.p95_floor_ms)
    {
        return Some(Breach {
            trigger: Trigger::P95Latency,
            detail: format!(
                "p95 latency {mean:.0} ms is {:.0} % above the {} {reference:.0} ms (limit +{} % and +{} ms, {} samples)",
                (mean / reference - 1.0) * 100.0,
                r.source,
                t.p95_latency_pct,
                s.p95_floor_ms,
                wave.n_p95
            ),
        });
    }
    if active > 0 {
        let share = (unreachable + failed) as f64 * 100.0 / active as f64;
        if share > t.unreachable_pct {
            return Some(Breach {
                trigger: Trigger::Unreachable,
                detail: format!(
                    "{unreachable} unreachable and {failed} failed of {active} wave devices ({share:.0} % > {} %)",
                    t.unreachable_pct
                ),
            });
        }
    }
    None
}

/// The fleet-wide trigger over every deployed device.
pub fn fleet_breach(all: &Agg, r: &Reference, t: &Thresholds, s: &GateSettings) -> Option<Breach> {
    if all.n_err < s.min_fail_samples {
        return None;
    }
    let mean = all.error_rate()?;
    let (lo, _) = wilson(mean, all.w_err, s.z);
    (pts(lo - r.error_rate) > t.fleet_error_rate_pts).then(|| Breach {
        trigger: Trigger::FleetErrorRate,
        detail: format!(
            "fleet error rate {:.1} % (lower bound {:.1} %) is {:.1} pts above the {} {:.1} % (limit +{} pts)",
            pts(mean),
            pts(lo),
            pts(lo - r.error_rate),
            r.source,
            pts(r.error_rate),
            t.fleet_error_rate_pts
        ),
    })
}

/// The per-device hard triggers, for a device running the new release.
pub fn device_breach(sample: &Sample, t: &Thresholds) -> Option<Breach> {
    if sample.restarts_in_window >= t.crash_loop_restarts {
        return Some(Breach {
            trigger: Trigger::CrashLoop,
            detail: format!(
                "crash loop: {} restarts within {} (limit {})",
                sample.restarts_in_window,
                humantime::format_duration(t.crash_loop_window),
                t.crash_loop_restarts
            ),
        });
    }
    if sample.memory_pct > t.memory_pct {
        return Some(Breach {
            trigger: Trigger::Memory,
            detail: format!(
                "memory {:.0} % is over the {} % limit",
                sample.memory_pct, t.memory_pct
            ),
        });
    }
    None
}

/// Whether the recent direction has used `trend_fraction` of a threshold's headroom.
pub fn worsening(wave: &Agg, r: &Reference, t: &Thresholds, s: &GateSettings) -> Option<String> {
    if wave.n < s.min_fail_samples {
        return None;
    }
    if let Some(e) = wave.ewma_err
        && pts(e - r.error_rate) > s.trend_fraction * t.error_rate_pts
    {
        return Some(format!(
            "recent error rate {:.1} % is {:.1} pts above the {} (trigger at +{} pts)",
            pts(e),
            pts(e - r.error_rate),
            r.source,
            t.error_rate_pts
        ));
    }
    if let (Some(p), Some(reference)) = (wave.ewma_p95, r.p95_ms)
        && reference > 0.0
        && p95_regressed(
            p,
            reference,
            s.trend_fraction * t.p95_latency_pct,
            s.trend_fraction * s.p95_floor_ms,
        )
    {
        return Some(format!(
            "recent p95 latency {p:.0} ms is {:.0} % above the {} (trigger at +{} %)",
            (p / reference - 1.0) * 100.0,
            r.source,
            t.p95_latency_pct
        ));
    }
    None
}

/// The gate's judgement at the end of a soak. `unsettled` devices were sent the release and
/// have neither committed nor failed.
pub fn verdict(
    wave: &Agg,
    unsettled: u64,
    r: &Reference,
    t: &Thresholds,
    s: &GateSettings,
) -> (GateVerdict, String) {
    if unsettled > 0 {
        return (
            GateVerdict::Inconclusive,
            format!("{unsettled} devices are still installing"),
        );
    }
    if wave.n < s.min_samples {
        return (
            GateVerdict::Inconclusive,
            format!(
                "{} of the {} health samples needed before a pass",
                wave.n, s.min_samples
            ),
        );
    }
    if let Some(mean) = wave.error_rate() {
        let (_, hi) = wilson(mean, wave.w_err, s.z);
        if pts(hi - r.error_rate) > t.error_rate_pts {
            return (
                GateVerdict::Inconclusive,
                format!(
                    "error rate {:.1} % could still be up to {:.1} % ({}; limit {} + {} pts)",
                    pts(mean),
                    pts(hi),
                    evidence(wave),
                    r.source,
                    t.error_rate_pts
                ),
            );
        }
    }
    if let (Some(mean), Some(reference)) = (wave.p95_ms(), r.p95_ms)
        && reference > 0.0
        && p95_regressed(mean, reference, t.p95_latency_pct, s.p95_floor_ms)
    {
        return (
            GateVerdict::Inconclusive,
            format!("p95 latency {mean:.0} ms is over the limit"),
        );
    }
    if let Some(why) = worsening(wave, r, t, s) {
        return (GateVerdict::Inconclusive, format!("worsening: {why}"));
    }
    (
        GateVerdict::Pass,
        format!(
            "{} samples; error rate {} vs {} {:.1} %",
            wave.n,
            wave.error_rate()
                .map(|e| format!("{:.2} %", pts(e)))
                .unwrap_or_else(|| "not reported".into()),
            r.source,
            pts(r.error_rate)
        ),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateVerdict {
    Pass,
    Inconclusive,
}

/// How long an inconclusive gate waits for more evidence: half a soak, but at least two report
/// intervals, or a soak shorter than the heartbeat would be extended past without a sample.
pub fn extension(soak: Duration, report_interval: Duration) -> Duration {
    (soak / 2)
        .max(report_interval * 2)
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::device::AppStatus;

    #[test]
    fn wilson_matches_known_values() {
        // p = 0.5, n = 100, z = 1.96: the textbook interval is about 0.404–0.596.
        let (lo, hi) = wilson(0.5, 100.0, 1.96);
        assert!((lo - 0.4038).abs() < 1e-3, "{lo}");
        assert!((hi - 0.5962).abs() < 1e-3, "{hi}");
        // Zero observed errors still leaves an upper bound above zero.
        let (lo, hi) = wilson(0.0, 10.0, 1.645);
        assert_eq!(lo, 0.0);
        assert!(hi > 0.2 && hi < 0.22, "{hi}");
        assert_eq!(wilson(0.3, 0.0, 1.645), (0.0, 1.0));
    }

    fn agg(errs: &[f64]) -> Agg {
        let mut a = Agg::default();
        for &e in errs {
            a.add(
                &Sample {
                    status: AppStatus::Healthy,
                    version: None,
                    error_rate: Some(e),
                    p95_ms: Some(100.0),
                    cpu_pct: 1.0,
                    memory_pct: 10.0,
                    restarts_in_window: 0,
                    probe_ok: None,
                    requests: None,
                    failed: None,
                },
                0.2,
                100.0,
            );
        }
        a
    }

    fn base() -> Reference {
        Reference {
            error_rate: 0.01,
            p95_ms: Some(100.0),
            source: "baseline",
        }
    }

    #[test]
    fn small_samples_are_inconclusive_not_pass() {
        let t = Thresholds::default();
        let s = GateSettings::default();
        let (v, why) = verdict(&agg(&[0.0; 5]), 0, &base(), &t, &s);
        assert_eq!(v, GateVerdict::Inconclusive, "{why}");
        // Clean samples need enough of them to pull the upper bound within +5 pts.
        let (v, why) = verdict(&agg(&[0.0; 20]), 0, &base(), &t, &s);
        assert_eq!(v, GateVerdict::Inconclusive, "{why}");
        let (v, why) = verdict(&agg(&[0.0; 60]), 0, &base(), &t, &s);
        assert_eq!(v, GateVerdict::Pass, "{why}");
        let (v, _) = verdict(&agg(&[0.0; 60]), 1, &base(), &t, &s);
        assert_eq!(v, GateVerdict::Inconclusive);
    }

    fn latency(p95s: &[f64]) -> Agg {
        let mut a = Agg::default();
        for &p in p95s {
            a.add(
                &Sample {
                    status: AppStatus::Healthy,
                    version: None,
                    error_rate: Some(0.0),
                    p95_ms: Some(p),
                    cpu_pct: 1.0,
                    memory_pct: 10.0,
                    restarts_in_window: 0,
                    probe_ok: None,
                    requests: None,
                    failed: None,
                },
                0.2,
                100.0,
            );
        }
        a
    }

    #[test]
    fn a_latency_regression_must_be_relative_and_absolute() {
        let t = Thresholds::default();
        let s = GateSettings::default();
        let fast = Reference {
            error_rate: 0.0,
            p95_ms: Some(3.0),
            source: "control",
        };
        // 3 ms → 5 ms is +67 %, and scheduling noise: no trigger.
        assert_eq!(breach(&latency(&[5.0; 6]), 1, 0, 0, &fast, &t, &s), None);
        // 3 ms → 40 ms is a regression by either measure.
        let b = breach(&latency(&[40.0; 6]), 1, 0, 0, &fast, &t, &s).unwrap();
        assert_eq!(b.trigger, Trigger::P95Latency);
        assert!(b.detail.contains("limit +50 % and +10 ms"), "{}", b.detail);
        // At 100 ms the relative limit is the binding one.
        assert_eq!(
            breach(&latency(&[140.0; 6]), 1, 0, 0, &base(), &t, &s),
            None
        );
        assert!(breach(&latency(&[160.0; 6]), 1, 0, 0, &base(), &t, &s).is_some());
    }

    #[test]
    fn a_clear_error_rate_breach_fires_after_a_few_samples() {
        let t = Thresholds::default();
        let s = GateSettings::default();
        assert_eq!(breach(&agg(&[0.5, 0.5]), 1, 0, 0, &base(), &t, &s), None);
        let b = breach(&agg(&[0.5, 0.5, 0.5]), 1, 0, 0, &base(), &t, &s).unwrap();
        assert_eq!(b.trigger, Trigger::ErrorRate);
        // Just over the point threshold but not provably: no trigger.
        assert_eq!(
            breach(&agg(&[0.07; 5]), 1, 0, 0, &base(), &t, &s).map(|b| b.trigger),
            None
        );
    }

    #[test]
    fn an_extension_outlasts_two_report_intervals() {
        let second = Duration::from_secs(1);
        assert_eq!(
            extension(Duration::from_secs(600), 10 * second),
            300 * second
        );
        assert_eq!(
            extension(second, 10 * second),
            20 * second,
            "a soak shorter than a heartbeat"
        );
        assert_eq!(extension(Duration::ZERO, Duration::ZERO), second);
    }
}
