//! Human output. `--json` output is the proto types serialised as they are, so the keys are
//! the documented ones.

use std::fmt::Write as _;

use fleet_proto::UnixMillis;
use fleet_proto::operator::{AuditEntry, CheckItem, DeviceStatus, DeviceView, Plan};
use fleet_proto::rollout::RolloutState;

/// `12s ago`, `3m ago`, `2h ago`, `4d ago`.
pub fn ago(then: Option<UnixMillis>, now: UnixMillis) -> String {
    let Some(then) = then else {
        return "never".to_owned();
    };
    let s = now.since(then).as_secs();
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

fn status(s: DeviceStatus) -> &'static str {
    match s {
        DeviceStatus::Online => "online",
        DeviceStatus::Offline => "offline",
        DeviceStatus::Quarantined => "quarantined",
    }
}

/// A left-aligned table with a header row.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(l, "{cell:<w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

pub fn devices(devices: &[DeviceView], now: UnixMillis) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let facts = d.facts.as_ref();
            vec![
                d.id.to_string(),
                facts.map_or("?".into(), |f| f.device_type.clone()),
                facts.map_or("?".into(), |f| f.arch.to_string()),
                facts.map_or("?".into(), |f| f.region.clone()),
                d.active.as_ref().map_or("-".into(), |a| a.version.clone()),
                if d.discrepancy.is_some() {
                    format!("{} (discrepancy)", status(d.status))
                } else {
                    status(d.status).to_owned()
                },
                ago(d.last_seen, now),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "ID",
            "TYPE",
            "ARCH",
            "REGION",
            "VERSION",
            "STATUS",
            "LAST SEEN",
        ],
        &rows,
    );
    let _ = writeln!(out, "{} devices", devices.len());
    out
}

pub fn device(d: &DeviceView, now: UnixMillis) -> String {
    let mut out = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(out, "{k:<12} {v}");
    };
    kv("id", d.id.to_string());
    kv("status", status(d.status).to_owned());
    if let Some(f) = &d.facts {
        kv("type", f.device_type.clone());
        kv("arch", f.arch.to_string());
        kv("region", f.region.clone());
        kv("tags", f.tags.join(", "));
        kv("runtime", f.runtime.clone());
        kv("agent", f.agent_version.clone());
    }
    let slot = |i: &Option<fleet_proto::device::Installed>| {
        i.as_ref().map_or("-".to_owned(), |i| {
            format!("{} {} (#{}, {})", i.name, i.version, i.counter, i.slot)
        })
    };
    kv("active", slot(&d.active));
    kv("standby", slot(&d.standby));
    kv("last seen", ago(d.last_seen, now));
    if let Some(h) = &d.last_health {
        let app = &h.app;
        kv(
            "health",
            format!(
                "{:?}, error rate {}, p95 {}, restarts {} in window",
                app.status,
                app.error_rate
                    .map_or("-".into(), |e| format!("{:.1}%", e * 100.0)),
                app.p95_ms.map_or("-".into(), |p| format!("{p:.0} ms")),
                app.restarts_in_window
            ),
        );
        kv(
            "system",
            format!(
                "cpu {:.0}%, memory {:.0}%, disk free {} MiB{}",
                h.system.cpu_pct,
                h.system.memory_pct(),
                h.system.disk_free_bytes >> 20,
                h.system
                    .temperature_c
                    .map_or(String::new(), |t| format!(", {t:.0} °C"))
            ),
        );
    }
    if let Some(why) = &d.discrepancy {
        kv(
            "discrepancy",
            format!("{why} (not deployed to until resolved)"),
        );
    }
    if let Some(why) = &d.quarantine_reason {
        kv("quarantined", why.clone());
    }
    out
}

pub fn checklist(items: &[CheckItem]) -> String {
    let mut out = String::new();
    for item in items {
        let mark = if item.ok { "✓" } else { "✗" };
        let _ = writeln!(out, "  {mark} {}: {}", item.name, item.detail);
        if let (false, Some(fix)) = (item.ok, &item.fix) {
            let _ = writeln!(out, "      → {fix}");
        }
    }
    out
}

pub fn plan(plan: &Plan) -> String {
    let failed = plan.checklist.iter().filter(|i| !i.ok).count();
    let mut out = format!("plan for {}\n\npre-deployment checklist:\n", plan.release);
    out.push_str(&checklist(&plan.checklist));
    if failed > 0 {
        let _ = writeln!(
            out,
            "\n{failed} checklist item(s) failed: this release would be refused"
        );
        return out;
    }
    out.push_str("\nwaves:\n");
    for wave in &plan.waves {
        let counts = |m: &std::collections::BTreeMap<String, u32>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "  {:<8} {:>5} devices  types: {}  regions: {}",
            wave.name,
            wave.devices.len(),
            counts(&wave.by_type),
            counts(&wave.by_region)
        );
        let ids: Vec<&str> = wave.devices.iter().map(|d| d.as_str()).collect();
        let shown = ids.iter().take(12).copied().collect::<Vec<_>>().join(", ");
        let more = ids.len().saturating_sub(12);
        let _ = writeln!(
            out,
            "           {shown}{}",
            if more > 0 {
                format!(" … and {more} more")
            } else {
                String::new()
            }
        );
    }
    if !plan.excluded.is_empty() {
        let _ = writeln!(out, "\nnot deployed to now ({}):", plan.excluded.len());
        for (id, why) in &plan.excluded {
            let _ = writeln!(out, "  {id}: {why}");
        }
    }
    out.push_str("\nnothing was deployed (plan only)\n");
    out
}

pub fn rollouts(states: &[RolloutState]) -> String {
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|s| {
            vec![
                s.rollout.to_string(),
                s.artifact.clone(),
                s.phase.to_string(),
                s.status.to_string(),
                format!("{}/{}", s.deployed_count, s.fleet_total),
                String::from(s.current_wave),
            ]
        })
        .collect();
    table(
        &["ROLLOUT", "ARTIFACT", "PHASE", "STATUS", "DEPLOYED", "WAVE"],
        &rows,
    )
}

pub fn audit(entries: &[AuditEntry]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.at.to_string(),
                format!("{}", e.actor_name),
                e.action.clone(),
                e.device.as_ref().map_or("-".into(), ToString::to_string),
                e.rollout.as_ref().map_or("-".into(), ToString::to_string),
                e.outcome.clone(),
            ]
        })
        .collect();
    table(
        &["TIME", "ACTOR", "ACTION", "DEVICE", "ROLLOUT", "OUTCOME"],
        &rows,
    )
}

/// One progress bar: `[#########-----------]  9/20`.
pub fn bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        (done.min(total) as usize * width) / total as usize
    };
    format!(
        "[{}{}] {done:>4}/{total}",
        "#".repeat(filled),
        "-".repeat(width - filled)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_times() {
        let now = UnixMillis(10_000_000);
        assert_eq!(ago(Some(UnixMillis(9_988_000)), now), "12s ago");
        assert_eq!(ago(Some(UnixMillis(10_000_000 - 180_000)), now), "3m ago");
        assert_eq!(ago(None, now), "never");
    }

    #[test]
    fn bars() {
        assert_eq!(bar(5, 10, 10), "[#####-----]    5/10");
        assert_eq!(bar(0, 0, 4), "[####]    0/0");
        assert_eq!(bar(12, 10, 4), "[####]   12/10");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
