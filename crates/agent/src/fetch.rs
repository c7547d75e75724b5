//! Artifact retrieval into staging: `http://`, `https://` (rustls) and `file://`.
//!
//! - Resumes with `Range: bytes=N-` after a dropped connection (and after an agent restart:
//!   the partial file stays in staging); a server that ignores Range restarts from zero.
//! - sha256 is computed while streaming (the partial file is hashed first on resume).
//! - Stops at the declared size, whatever the server sends (endless data).
//! - A minimum rate over a window and an overall deadline per attempt (slow retrieval).
//! - Retries with capped exponential backoff and jitter.
//!
//! Blocking: run on a blocking thread.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fleet_proto::device::Failure;
use fleet_proto::hex::{Hex, Sha256};
use sha2::Digest as _;

use crate::config::FetchConfig;
use crate::fault;

#[derive(Clone, Debug)]
pub struct Spec {
    pub url: String,
    pub sha256: Sha256,
    pub size: u64,
    pub dest: PathBuf,
}

/// Why one attempt stopped.
#[derive(Debug)]
enum AttemptError {
    /// Worth another attempt (network, server error, too slow).
    Retry(String),
    /// Retrying cannot help.
    Fatal(Failure),
}

/// Fetches `spec` into `spec.dest`. `started(resume_from)` is called once, before the first
/// byte moves. On success the file holds exactly `size` bytes with the expected sha256.
pub fn fetch(spec: &Spec, cfg: &FetchConfig, mut started: impl FnMut(u64)) -> Result<(), Failure> {
    let mut announced = false;
    let mut last = String::new();
    let mut delay = cfg.retry_min;
    for attempt in 1..=cfg.attempts.max(1) {
        let have = partial_len(&spec.dest, spec.size).map_err(download_err)?;
        if !announced {
            started(have);
            announced = true;
        }
        match attempt_once(spec, cfg, have) {
            Ok(()) => return Ok(()),
            Err(AttemptError::Fatal(f)) => {
                let _ = fs::remove_file(&spec.dest);
                return Err(f);
            }
            Err(AttemptError::Retry(why)) => {
                tracing::warn!(url = %spec.url, attempt, "download attempt failed: {why}");
                last = why;
            }
        }
        if attempt < cfg.attempts {
            std::thread::sleep(jitter(delay));
            delay = (delay * 2).min(cfg.retry_max);
        }
    }
    Err(Failure::Download {
        detail: format!(
            "{} after {} attempts: {last}",
            spec.url,
            cfg.attempts.max(1)
        ),
    })
}

fn download_err(e: io::Error) -> Failure {
    Failure::Download {
        detail: format!("staging: {e}"),
    }
}

/// ±50 % jitter, so devices that failed together do not retry together.
pub fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::random::<f64>() + 0.5;
    d.mul_f64(f)
}

/// Bytes already staged; a file longer than the artifact is garbage and is truncated.
fn partial_len(dest: &Path, size: u64) -> io::Result<u64> {
    match fs::metadata(dest) {
        Ok(m) if m.len() <= size => Ok(m.len()),
        Ok(_) => {
            File::create(dest)?;
            Ok(0)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn attempt_once(spec: &Spec, cfg: &FetchConfig, have: u64) -> Result<(), AttemptError> {
    let io_retry = |e: io::Error| AttemptError::Retry(format!("staging: {e}"));
    let mut file = OpenOptions::new()
        .create(true)
        .append(false)
        .write(true)
        .read(true)
        .truncate(false)
        .open(&spec.dest)
        .map_err(io_retry)?;
    // Hash what is already there: the digest covers the whole artifact.
    let mut hasher = sha2::Sha256::new();
    let mut have = have;
    if have > 0 {
        file.seek(SeekFrom::Start(0)).map_err(io_retry)?;
        io::copy(&mut (&mut file).take(have), &mut HashWriter(&mut hasher)).map_err(io_retry)?;
    }
    if have < spec.size {
        let (mut body, restart) = open_source(spec, cfg, have)?;
        if restart {
            have = 0;
            hasher = sha2::Sha256::new();
            file.set_len(0).map_err(io_retry)?;
        }
        file.seek(SeekFrom::Start(have)).map_err(io_retry)?;
        copy_bounded(&mut body, &mut file, &mut hasher, have, spec, cfg)?;
        file.sync_all().map_err(io_retry)?;
    }
    let got: [u8; 32] = hasher.finalize().into();
    let got = Hex(got);
    if got != spec.sha256 {
        return Err(AttemptError::Fatal(Failure::ChecksumMismatch {
            expected: spec.sha256,
            got,
        }));
    }
    fault::point("download-done");
    Ok(())
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens the artifact at byte `from`. The flag says the source restarts at zero.
fn open_source(
    spec: &Spec,
    cfg: &FetchConfig,
    from: u64,
) -> Result<(Box<dyn Read + Send>, bool), AttemptError> {
    if let Some(path) = spec.url.strip_prefix("file://") {
        let mut f = File::open(path)
            .map_err(|e| AttemptError::Retry(format!("cannot open {path}: {e}")))?;
        f.seek(SeekFrom::Start(from))
            .map_err(|e| AttemptError::Retry(format!("cannot seek {path}: {e}")))?;
        return Ok((Box::new(f), false));
    }
    if !(spec.url.starts_with("http://") || spec.url.starts_with("https://")) {
        return Err(AttemptError::Fatal(Failure::Download {
            detail: format!("unsupported URL scheme in {}", spec.url),
        }));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(cfg.connect_timeout))
        .timeout_global(Some(cfg.deadline))
        .http_status_as_error(false)
        .build()
        .into();
    let mut req = agent.get(&spec.url);
    if from > 0 {
        req = req.header("Range", format!("bytes={from}-"));
    }
    let resp = req
        .call()
        .map_err(|e| AttemptError::Retry(format!("GET {}: {e}", spec.url)))?;
    let status = resp.status().as_u16();
    let restart = match status {
        206 if from > 0 => false,
        200 => from > 0,
        404 | 410 | 403 | 401 => {
            return Err(AttemptError::Fatal(Failure::Download {
                detail: format!("GET {}: HTTP {status}", spec.url),
            }));
        }
        // 416 with a partial file: the server's copy is shorter than declared; start over.
        _ => {
            return Err(AttemptError::Retry(format!(
                "GET {}: HTTP {status}",
                spec.url
            )));
        }
    };
    Ok((Box::new(resp.into_body().into_reader()), restart))
}

fn copy_bounded(
    body: &mut dyn Read,
    file: &mut File,
    hasher: &mut sha2::Sha256,
    mut have: u64,
    spec: &Spec,
    cfg: &FetchConfig,
) -> Result<(), AttemptError> {
    let started = Instant::now();
    let mut window_start = Instant::now();
    let mut window_bytes = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let half = spec.size / 2;
    while have < spec.size {
        let want = (spec.size - have).min(buf.len() as u64) as usize;
        let n = match body.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(AttemptError::Retry(format!(
                    "connection closed at byte {have} of {}",
                    spec.size
                )));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(AttemptError::Retry(format!("at byte {have}: {e}"))),
        };
        file.write_all(&buf[..n]).map_err(|e| {
            AttemptError::Fatal(Failure::Download {
                detail: format!("cannot write staging: {e}"),
            })
        })?;
        hasher.update(&buf[..n]);
        let before = have;
        have += n as u64;
        window_bytes += n as u64;
        if before < half && have >= half {
            let _ = file.sync_data();
            fault::point("download-midway");
        }
        if started.elapsed() > cfg.deadline {
            return Err(AttemptError::Retry(format!(
                "deadline of {} passed at byte {have}",
                humantime::format_duration(cfg.deadline)
            )));
        }
        let elapsed = window_start.elapsed();
        if elapsed >= cfg.min_rate_window {
            let rate = window_bytes as f64 / elapsed.as_secs_f64();
            if rate < cfg.min_rate_bytes_per_sec as f64 {
                return Err(AttemptError::Retry(format!(
                    "too slow: {rate:.0} B/s over {}, minimum {} B/s",
                    humantime::format_duration(elapsed),
                    cfg.min_rate_bytes_per_sec
                )));
            }
            window_start = Instant::now();
            window_bytes = 0;
        }
    }
    // Whatever else the server would send is not read: the declared size is the bound.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves one response per connection from `respond(connection index, stream)`.
    fn server(respond: impl Fn(usize, &mut std::net::TcpStream) + Send + 'static) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (i, s) in listener.incoming().enumerate() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                respond(i, &mut s);
            }
        });
        port
    }

    #[test]
    fn http_stops_at_the_declared_size_of_endless_data() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 7) as u8).collect();
        let body = data.clone();
        let port = server(move |_, s| {
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n");
            // No length, never ends on its own.
            loop {
                if s.write_all(&body).is_err() {
                    return;
                }
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a");
        let spec = Spec {
            url: format!("http://127.0.0.1:{port}/a"),
            sha256: Sha256::of(&data),
            size: data.len() as u64,
            dest: dest.clone(),
        };
        fetch(&spec, &cfg(), |_| {}).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), data);
    }

    #[test]
    fn slow_retrieval_is_cut() {
        let port = server(|_, s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
            for _ in 0..200 {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            url: format!("http://127.0.0.1:{port}/a"),
            sha256: Sha256::of(b"whatever"),
            size: 100_000,
            dest: dir.path().join("a"),
        };
        let slow = FetchConfig {
            attempts: 1,
            min_rate_bytes_per_sec: 10_000,
            min_rate_window: Duration::from_millis(300),
            ..cfg()
        };
        let started = Instant::now();
        let err = fetch(&spec, &slow, |_| {}).unwrap_err().to_string();
        assert!(err.contains("too slow"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        // The overall deadline cuts a slow transfer too.
        let deadline = FetchConfig {
            attempts: 1,
            min_rate_bytes_per_sec: 0,
            deadline: Duration::from_millis(300),
            ..cfg()
        };
        let _ = fs::remove_file(&spec.dest);
        let err = fetch(&spec, &deadline, |_| {}).unwrap_err().to_string();
        assert!(err.contains("deadline") || err.contains("imeout"), "{err}");
    }

    fn cfg() -> FetchConfig {
        FetchConfig {
            attempts: 2,
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(20),
            ..FetchConfig::default()
        }
    }

    #[test]
    fn file_urls_resume_and_check_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        let dest = dir.path().join("dest");
        fs::write(&dest, &data[..1000]).unwrap();
        let spec = Spec {
            url: format!("file://{}", src.display()),
            sha256: Sha256::of(&data),
            size: data.len() as u64,
            dest: dest.clone(),
        };
        let mut resumed = None;
        fetch(&spec, &cfg(), |from| resumed = Some(from)).unwrap();
        assert_eq!(resumed, Some(1000));
        assert_eq!(fs::read(&dest).unwrap(), data);

        // Wrong digest: refused and the staged file is gone.
        let bad = Spec {
            sha256: Sha256::of(b"other"),
            ..spec.clone()
        };
        fs::remove_file(&dest).unwrap();
        let err = fetch(&bad, &cfg(), |_| {}).unwrap_err();
        assert!(matches!(err, Failure::ChecksumMismatch { .. }), "{err}");
        assert!(!dest.exists());

        // Endless source: stops at the declared size.
        let short = Spec {
            size: 500,
            sha256: Sha256::of(&data[..500]),
            ..spec
        };
        fetch(&short, &cfg(), |_| {}).unwrap();
        assert_eq!(fs::read(&dest).unwrap().len(), 500);
    }
}
