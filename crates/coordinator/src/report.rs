//! The Fleet Deployment Report: counts, per-wave table, health delta against the baseline, and
//! the failure pattern, with a Markdown rendering for `fleetctl report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fleet_proto::UnixMillis;
use fleet_proto::rollout::{
    AbReport, Arm, ArmReport, Interval, MetricDelta, Report, Verdict, WaveReport,
};

use crate::baseline::Agg;
use crate::engine::{DevState, Rollout};

fn pct(n: u32, total: u32) -> f64 {
    if total == 0 {
        0.0
    } else {
        f64::from(n) * 100.0 / f64::from(total)
    }
}

/// Builds the report for a rollout at `now`.
pub fn build(r: &Rollout, now: UnixMillis) -> Report {
    let waves: Vec<WaveReport> = r
        .waves
        .iter()
        .map(|w| WaveReport {
            name: w.name.clone(),
            devices: w.size,
            failed: w.failed,
            skipped: w.skipped,
            soak: w.soak,
            verdict: w.verdict.clone(),
        })
        .collect();
    // Current health of the devices running the release: their latest samples.
    let mut current = Agg::default();
    for a in r.devices.values() {
        if a.state == DevState::Deployed
            && let Some(s) = &a.latest
        {
            current.add(s, 1.0, 1.0);
        }
    }
    let metric = |name: &str, base: Option<f64>, cur: Option<f64>| MetricDelta {
        metric: name.to_owned(),
        baseline: base,
        current: cur,
    };
    let health = vec![
        metric("error_rate", r.baseline.error_rate, current.error_rate()),
        metric("p95_ms", r.baseline.p95_ms, current.p95_ms()),
        metric("cpu_pct", r.baseline.cpu_pct, current.cpu_pct()),
        metric("memory_pct", r.baseline.memory_pct, current.memory_pct()),
    ];
    let mut failed_by_type: BTreeMap<String, u32> = BTreeMap::new();
    for id in &r.failed_devices {
        if let Some(a) = r.devices.get(id) {
            *failed_by_type.entry(a.device_type.clone()).or_insert(0) += 1;
        }
    }
    let mut report = Report {
        rollout: r.id.clone(),
        artifact: format!("{} {}", r.release.name, r.release.version),
        strategy: r.release.strategy.kind,
        status: r.status,
        started_at: r.created_at,
        ended_at: r.ended_at,
        fleet_total: r.devices.len() as u32,
        deployed: r.deployed(),
        skipped: r.skipped(),
        quarantined: r.quarantined(),
        waves,
        health,
        failure_pattern: r.failure_pattern.clone(),
        failed_by_type,
        failed_devices: r.failed_devices.clone(),
        markdown: String::new(),
        ab: ab_report(r),
    };
    report.markdown = markdown(&report, r, now);
    if let Some(ab) = &report.ab {
        report.markdown.push_str(&ab_markdown(ab));
    }
    report
}

/// Strategy `ab`: each arm's metrics over its observation window, and B − A.
fn ab_report(r: &Rollout) -> Option<AbReport> {
    let ab = r.ab.as_ref()?;
    let z = r.settings.gate.z;
    let arms: Vec<ArmReport> = [Arm::A, Arm::B]
        .into_iter()
        .map(|arm| {
            let run = ab.arm(arm);
            let agg = &run.agg;
            ArmReport {
                arm,
                release: r.arm_release(Some(arm)).1.label(),
                devices: run.size,
                deployed: run.deployed,
                failed: run.failed,
                rolled_back: run.rolled_back.clone(),
                verdict: run.verdict.clone(),
                samples: agg.n,
                requests: agg.w_err,
                error_rate: agg.error_rate().map(|p| {
                    let (low, high) = crate::gate::wilson(p, agg.w_err, z);
                    Interval {
                        value: p,
                        low,
                        high,
                    }
                }),
                p95_ms: agg.p95_ms(),
                cpu_pct: agg.cpu_pct(),
                memory_pct: agg.memory_pct(),
                max_restarts: run.max_restarts,
            }
        })
        .collect();
    let error_rate_diff = match (ab.a.agg.error_rate(), ab.b.agg.error_rate()) {
        (Some(pa), Some(pb)) => Some(crate::ab::difference(
            (pa, ab.a.agg.w_err),
            (pb, ab.b.agg.w_err),
            z,
        )),
        _ => None,
    };
    let p95_diff_ms = match (ab.a.agg.p95_ms(), ab.b.agg.p95_ms()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Some(AbReport {
        arms,
        error_rate_diff,
        p95_diff_ms,
        // Two-sided level of the one-sided quantile the gates use.
        confidence_pct: (2.0 * normal_cdf(z) - 1.0) * 100.0,
        winner: ab.winner,
    })
}

/// Φ(x) (Abramowitz–Stegun 7.1.26 through erf; ample for a label).
fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

fn ab_markdown(ab: &AbReport) -> String {
    let mut m = String::new();
    let ci = ab.confidence_pct.round();
    let _ = writeln!(m);
    let _ = writeln!(m, "## A/B arms");
    let _ = writeln!(m);
    let (a, b) = (&ab.arms[0], &ab.arms[1]);
    let _ = writeln!(m, "| metric | arm A | arm B |");
    let _ = writeln!(m, "|---|---|---|");
    let row = |m: &mut String, name: &str, f: &dyn Fn(&ArmReport) -> String| {
        let _ = writeln!(m, "| {name} | {} | {} |", f(a), f(b));
    };
    let opt = |v: Option<f64>, unit: &str, digits: usize| {
        v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}{unit}"))
    };
    row(&mut m, "release", &|x| x.release.clone());
    row(&mut m, "devices (deployed / failed)", &|x| {
        format!("{} ({} / {})", x.devices, x.deployed, x.failed)
    });
    row(&mut m, &format!("error rate ({ci:.0} % CI)"), &|x| {
        x.error_rate.map_or_else(
            || "n/a".to_owned(),
            |e| {
                format!(
                    "{:.2} % [{:.2}, {:.2}]",
                    e.value * 100.0,
                    e.low * 100.0,
                    e.high * 100.0
                )
            },
        )
    });
    row(&mut m, "evidence", &|x| {
        format!("{} samples, {:.0} requests", x.samples, x.requests)
    });
    row(&mut m, "p95 latency", &|x| opt(x.p95_ms, " ms", 0));
    row(&mut m, "cpu", &|x| opt(x.cpu_pct, " %", 1));
    row(&mut m, "memory", &|x| opt(x.memory_pct, " %", 1));
    row(&mut m, "restarts (most in window)", &|x| {
        x.max_restarts.to_string()
    });
    row(&mut m, "verdict", &|x| match (&x.rolled_back, &x.verdict) {
        (Some(why), _) => format!("rolled back: {why}"),
        (None, Some(v)) => verdict_word(Some(v)).to_owned(),
        (None, None) => "observing".to_owned(),
    });
    let _ = writeln!(m);
    match &ab.error_rate_diff {
        Some(d) => {
            let _ = writeln!(
                m,
                "Error rate B − A: {:+.2} pts [{:+.2}, {:+.2}] ({ci:.0} % CI, Newcombe){}",
                d.value * 100.0,
                d.low * 100.0,
                d.high * 100.0,
                if d.low > 0.0 {
                    ": B is worse"
                } else if d.high < 0.0 {
                    ": B is better"
                } else {
                    ": no significant difference"
                }
            );
        }
        None => {
            let _ = writeln!(m, "Error rate B − A: n/a (an arm has no error rate yet)");
        }
    }
    if let Some(d) = ab.p95_diff_ms {
        let _ = writeln!(m, "p95 B − A: {d:+.0} ms");
    }
    let _ = writeln!(
        m,
        "Winner: {}",
        ab.winner
            .map_or_else(|| "none yet".to_owned(), |w| format!("arm {w} (promoted)"))
    );
    m
}

fn verdict_word(v: Option<&Verdict>) -> &'static str {
    match v {
        Some(Verdict::Pass) => "pass",
        Some(Verdict::Inconclusive) => "inconclusive",
        Some(Verdict::Fail) => "fail",
        None => "-",
    }
}

fn fmt_metric(name: &str, v: Option<f64>) -> String {
    match (name, v) {
        (_, None) => "n/a".into(),
        ("error_rate", Some(v)) => format!("{:.2} %", v * 100.0),
        ("p95_ms", Some(v)) => format!("{v:.0} ms"),
        (_, Some(v)) => format!("{v:.1} %"),
    }
}

fn fmt_delta(name: &str, base: Option<f64>, cur: Option<f64>) -> String {
    match (base, cur) {
        (Some(b), Some(c)) => match name {
            "error_rate" => format!("{:+.2} pts", (c - b) * 100.0),
            "p95_ms" if b > 0.0 => format!("{:+.0} %", (c / b - 1.0) * 100.0),
            _ => format!("{:+.1} pts", c - b),
        },
        _ => "n/a".into(),
    }
}

fn markdown(rep: &Report, r: &Rollout, now: UnixMillis) -> String {
    let mut m = String::new();
    let end = rep.ended_at.unwrap_or(now);
    let _ = writeln!(m, "# Fleet Deployment Report: {}", rep.rollout);
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "- **Release**: {} (digest {})",
        r.release.label(),
        r.digest.short()
    );
    let _ = writeln!(m, "- **Strategy**: {}", rep.strategy);
    let _ = writeln!(m, "- **Status**: {} (phase {})", rep.status, r.phase);
    let _ = writeln!(
        m,
        "- **Started**: {} by {}; **duration**: {}",
        rep.started_at,
        r.operator,
        humantime::format_duration(std::time::Duration::from_secs(
            end.since(rep.started_at).as_secs()
        ))
    );
    let _ = writeln!(m);
    let _ = writeln!(m, "## Devices");
    let _ = writeln!(m);
    let _ = writeln!(m, "| status | devices | % |");
    let _ = writeln!(m, "|---|---:|---:|");
    let total = rep.fleet_total;
    let pending = total.saturating_sub(rep.deployed + rep.skipped + rep.quarantined);
    for (name, n) in [
        ("Deployed (healthy)", rep.deployed),
        ("Skipped (unreachable)", rep.skipped),
        ("Quarantined (failed)", rep.quarantined),
        ("Not deployed (pending or rolled back)", pending),
    ] {
        let _ = writeln!(m, "| {name} | {n} | {:.1} |", pct(n, total));
    }
    let _ = writeln!(m, "| **Total** | {total} | 100.0 |");
    let _ = writeln!(m);
    let _ = writeln!(m, "## Waves");
    let _ = writeln!(m);
    let _ = writeln!(m, "| wave | devices | failed | skipped | soak | verdict |");
    let _ = writeln!(m, "|---|---:|---:|---:|---|---|");
    for w in &rep.waves {
        let verdict = match &w.verdict {
            None => "—",
            Some(Verdict::Pass) => "PASS",
            Some(Verdict::Inconclusive) => "inconclusive (soak extended)",
            Some(Verdict::Fail) => "FAIL",
        };
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {verdict} |",
            w.name,
            w.devices,
            w.failed,
            w.skipped,
            humantime::format_duration(w.soak)
        );
    }
    let _ = writeln!(m);
    let _ = writeln!(m, "## Health against baseline");
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Baseline from {} target devices before the start; current = latest samples of the deployed devices.",
        r.baseline.devices
    );
    let _ = writeln!(m);
    let _ = writeln!(m, "| metric | baseline | current | delta |");
    let _ = writeln!(m, "|---|---:|---:|---:|");
    for d in &rep.health {
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} |",
            d.metric,
            fmt_metric(&d.metric, d.baseline),
            fmt_metric(&d.metric, d.current),
            fmt_delta(&d.metric, d.baseline, d.current)
        );
    }
    if let Some(h) = &r.halt {
        let _ = writeln!(m);
        let _ = writeln!(m, "## Halt");
        let _ = writeln!(m);
        let _ = writeln!(m, "- **Trigger**: {} — {}", h.trigger.as_str(), h.detail);
        match &rep.failure_pattern {
            Some(p) => {
                let _ = writeln!(m, "- **Failure pattern**: {p}");
            }
            None => {
                let _ = writeln!(m, "- **Failure pattern**: no individual device stood out");
            }
        }
        if !rep.failed_by_type.is_empty() {
            let by: Vec<String> = rep
                .failed_by_type
                .iter()
                .map(|(t, n)| format!("{t}: {n}"))
                .collect();
            let _ = writeln!(m, "- **Failed by device type**: {}", by.join(", "));
        }
        if !rep.failed_devices.is_empty() {
            let _ = writeln!(
                m,
                "- **Failed devices**: {}",
                crate::checklist::list_ids(rep.failed_devices.iter(), 20)
            );
        }
    }
    let _ = writeln!(m);
    let _ = writeln!(
        m,
        "Last action: {}. Next: {}.",
        r.last_action, r.next_action
    );
    m
}
