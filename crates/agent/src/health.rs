//! Health, by layer: 2 the device (`/proc`, statvfs, thermal zones), 3 the application's
//! health endpoint, 4 a functional probe whose output digest and latency are checked.
//! "Responds" is never enough: an answer counts only with the right status and version.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_proto::device::{AppStatus, SystemHealth};
use fleet_proto::hex::Sha256;
use fleet_proto::release::{Probe, ProbeCheck};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::trial::HealthAnswer;

/// Largest HTTP response read from the app.
const MAX_BODY: usize = 1 << 20;

/// A minimal HTTP/1.1 GET for `http://host:port/path` on the device: returns status and body.
pub async fn http_get(url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    tokio::time::timeout(timeout, http_get_inner(url))
        .await
        .map_err(|_| {
            format!(
                "GET {url}: no answer within {}",
                humantime::format_duration(timeout)
            )
        })?
}

async fn http_get_inner(url: &str) -> Result<(u16, Vec<u8>), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported for probes"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_BODY as u64 + 16 * 1024)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("GET {url}: no HTTP head in the answer"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {url}: bad status line"))?;
    let mut body = raw[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body).ok_or_else(|| format!("GET {url}: bad chunked body"))?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Substitutes `{port}`.
pub fn with_port(text: &str, port: u16) -> String {
    text.replace("{port}", &port.to_string())
}

/// What one look at the health endpoint found.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub answer: HealthAnswer,
    pub error_rate: Option<f32>,
    pub p95_ms: Option<f32>,
    /// The app's own count of requests handled since it started.
    pub requests_total: Option<u64>,
    /// The app's own count of those that failed.
    pub failed_total: Option<u64>,
}

impl Reading {
    fn no_answer() -> Reading {
        Reading {
            answer: HealthAnswer::NoAnswer,
            error_rate: None,
            p95_ms: None,
            requests_total: None,
            failed_total: None,
        }
    }
}

/// Asks the health endpoint. A body that is not the health document counts as no answer.
pub async fn probe_health(endpoint: &str, timeout: Duration) -> Reading {
    match http_get(endpoint, timeout).await {
        Ok((_, body)) => parse_health(&body),
        Err(e) => {
            tracing::debug!("{e}");
            Reading::no_answer()
        }
    }
}

/// `{"status":…,"version":…,"metrics":{"error_rate":…,"p95_ms":…,"requests":…}}` → a reading.
pub fn parse_health(body: &[u8]) -> Reading {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Reading::no_answer();
    };
    let status = match doc.get("status").and_then(|s| s.as_str()) {
        Some("healthy") | Some("ok") => AppStatus::Healthy,
        Some("degraded") => AppStatus::Degraded,
        Some(_) => AppStatus::Unhealthy,
        None => return Reading::no_answer(),
    };
    let version = doc
        .get("version")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let metric = |k: &str| doc.get("metrics").and_then(|m| m.get(k));
    Reading {
        answer: HealthAnswer::Answered { status, version },
        error_rate: metric("error_rate")
            .and_then(|v| v.as_f64())
            .map(|v| v as f32),
        p95_ms: metric("p95_ms").and_then(|v| v.as_f64()).map(|v| v as f32),
        requests_total: metric("requests").and_then(|v| v.as_u64()),
        failed_total: metric("failed").and_then(|v| v.as_u64()),
    }
}

/// Requests handled between two readings of the app's counter; a counter that went down means
/// the app restarted, and everything it counted since is new.
pub fn requests_since(previous: Option<u64>, now: Option<u64>) -> Option<u64> {
    match (previous, now) {
        (Some(before), Some(now)) if now >= before => Some(now - before),
        (_, now) => now,
    }
}

/// Failed requests between two readings of the app's (requests, failed) counters, paired with
/// [`requests_since`]: either counter going down means the app restarted, and everything it
/// counted since is new. `None` when the app does not count failures.
pub fn failed_since(
    previous: (Option<u64>, Option<u64>),
    now: (Option<u64>, Option<u64>),
) -> Option<u64> {
    let (Some(r1), Some(f1)) = now else {
        return None;
    };
    Some(match previous {
        (Some(r0), Some(f0)) if r1 >= r0 && f1 >= f0 => f1 - f0,
        _ => f1,
    })
}

/// Runs the functional probe: the output's sha256 must match and it must come within the
/// latency bound. `Err` says what was wrong.
pub async fn functional_probe(
    probe: &Probe,
    slot_dir: &Path,
    port: u16,
    env: &[(String, String)],
) -> Result<(), String> {
    let started = Instant::now();
    // Give a slow probe a little room past its bound so the latency is measured, not cut.
    let limit = probe.max_latency * 2 + Duration::from_secs(1);
    let output = match &probe.check {
        ProbeCheck::Request(url) => {
            let url = with_port(url, port);
            let (status, body) = http_get(&url, limit).await?;
            if status != 200 {
                return Err(format!("GET {url}: HTTP {status}"));
            }
            body
        }
        ProbeCheck::Command(argv) => {
            let Some((program, args)) = argv.split_first() else {
                return Err("empty probe command".into());
            };
            let program = if program.contains('/') {
                slot_dir.join(program)
            } else {
                program.into()
            };
            let mut cmd = tokio::process::Command::new(&program);
            cmd.args(args.iter().map(|a| with_port(a, port)))
                .current_dir(slot_dir)
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            let out = tokio::time::timeout(limit, cmd.output())
                .await
                .map_err(|_| {
                    format!(
                        "probe command did not finish within {}",
                        humantime::format_duration(limit)
                    )
                })?
                .map_err(|e| format!("cannot run probe {}: {e}", program.display()))?;
            if !out.status.success() {
                return Err(format!("probe command exited with {}", out.status));
            }
            out.stdout
        }
    };
    let took = started.elapsed();
    let got = Sha256::of(&output);
    if got != probe.expected_sha256 {
        return Err(format!(
            "output digest {} differs from the expected {}",
            got.short(),
            probe.expected_sha256.short()
        ));
    }
    if took > probe.max_latency {
        return Err(format!(
            "took {} ms, bound {} ms",
            took.as_millis(),
            probe.max_latency.as_millis()
        ));
    }
    Ok(())
}

/// Layer 2, from `/proc`, statvfs and `/sys/class/thermal`. Keeps the previous CPU counters
/// to compute a percentage between calls.
#[derive(Debug, Default)]
pub struct SystemProbe {
    last_cpu: Option<(u64, u64)>,
}

impl SystemProbe {
    pub fn sample(&mut self, disk_path: &Path) -> SystemHealth {
        let cpu = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_cpu(&t));
        let cpu_pct = match (cpu, self.last_cpu) {
            (Some((busy, total)), Some((b0, t0))) if total > t0 => {
                (busy.saturating_sub(b0)) as f32 * 100.0 / (total - t0) as f32
            }
            _ => 0.0,
        };
        if cpu.is_some() {
            self.last_cpu = cpu;
        }
        let (mem_total, mem_avail) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .map(|t| parse_meminfo(&t))
            .unwrap_or((0, 0));
        let (disk_free, disk_total) = crate::fsutil::disk_space(disk_path).unwrap_or((0, 0));
        SystemHealth {
            cpu_pct,
            memory_used_bytes: mem_total.saturating_sub(mem_avail),
            memory_total_bytes: mem_total,
            disk_free_bytes: disk_free,
            disk_total_bytes: disk_total,
            temperature_c: hottest_zone(Path::new("/sys/class/thermal")),
        }
    }
}

/// (busy, total) jiffies from the aggregate `cpu` line.
pub fn parse_cpu(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 4 {
        return None;
    }
    let total: u64 = v.iter().sum();
    // idle + iowait
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> (u64, u64) {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (get("MemTotal:"), get("MemAvailable:"))
}

/// The hottest `thermal_zone*/temp` (millidegrees) in °C.
pub fn hottest_zone(dir: &Path) -> Option<f32> {
    let entries = std::fs::read_dir(dir).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("temp")).ok())
        .filter_map(|t| t.trim().parse::<f32>().ok())
        .map(|m| m / 1000.0)
        .reduce(f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_between_readings() {
        assert_eq!(requests_since(Some(100), Some(160)), Some(60));
        assert_eq!(requests_since(None, Some(40)), Some(40));
        assert_eq!(
            requests_since(Some(500), Some(30)),
            Some(30),
            "the app restarted"
        );
        assert_eq!(requests_since(Some(5), None), None);
    }

    #[test]
    fn failures_between_readings_pair_with_the_requests() {
        assert_eq!(
            failed_since((Some(100), Some(3)), (Some(160), Some(5))),
            Some(2)
        );
        assert_eq!(failed_since((None, None), (Some(40), Some(1))), Some(1));
        assert_eq!(
            failed_since((Some(500), Some(20)), (Some(30), Some(2))),
            Some(2),
            "the app restarted: its counters start again"
        );
        assert_eq!(
            failed_since((Some(100), Some(3)), (Some(160), None)),
            None,
            "an app that does not count failures"
        );
    }

    #[test]
    fn parses_the_health_document() {
        let body = br#"{"status":"degraded","version":"1.2.3","checks":{},"metrics":{"error_rate":0.1000,"p95_ms":2.500,"requests":100,"failed":4}}"#;
        assert_eq!(
            parse_health(body),
            Reading {
                answer: HealthAnswer::Answered {
                    status: AppStatus::Degraded,
                    version: "1.2.3".into()
                },
                error_rate: Some(0.1),
                p95_ms: Some(2.5),
                requests_total: Some(100),
                failed_total: Some(4),
            }
        );
        assert_eq!(parse_health(b"OK").answer, HealthAnswer::NoAnswer);
        assert_eq!(
            parse_health(br#"{"status":"unhealthy","version":"x"}"#).answer,
            HealthAnswer::Answered {
                status: AppStatus::Unhealthy,
                version: "x".into()
            }
        );
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_cpu("cpu  10 0 10 70 10 0 0 0 0 0\ncpu0 1 1 1 1\n"),
            Some((20, 100))
        );
        assert_eq!(parse_cpu("intr 1"), None);
        assert_eq!(
            parse_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:   400 kB\n"),
            (1000 * 1024, 400 * 1024)
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(hottest_zone(dir.path()), None);
        for (zone, t) in [
            ("thermal_zone0", "41000\n"),
            ("thermal_zone1", "57500\n"),
            ("cooling_device0", "99000"),
        ] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), t).unwrap();
        }
        assert_eq!(hottest_zone(dir.path()), Some(57.5));
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
    }
}
