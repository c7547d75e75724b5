//! The Fleet Deployment Report: counts, per-wave table, health delta against the baseline, and
//! the failure pattern, with a Markdown rendering for `fleetctl report`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use fleet_proto::UnixMillis;
use fleet_proto::rollout::{MetricDelta, Report, Verdict, WaveReport};

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
    };
    report.markdown = markdown(&report, r, now);
    report
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
