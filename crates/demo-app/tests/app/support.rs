//! Test support: start the real binary, talk HTTP to it with std only, wait on conditions.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Generous bound for anything to happen on a loaded 2-core machine running tests in parallel.
pub const PATIENCE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// The binary under test, with a clean `FLEET_*` environment plus `env`.
fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleet-demo-app"));
    // Knobs set in the developer's shell must not leak into a test.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLEET_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args).envs(env.iter().copied());
    cmd
}

/// A child process that is killed and reaped when dropped, so a failing assertion never leaves
/// one behind.
#[derive(Debug)]
pub struct Guard {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Guard {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> (Guard, BufReader<std::process::ChildStdout>) {
        let mut child = command(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fleet-demo-app");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        // Drain stderr on a thread: a full pipe would block the child, and the text helps
        // explain a failure.
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        (Guard { child, stderr }, stdout)
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit on its own, failing loudly after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = wait_until("the process to exit", within, || child.try_wait().unwrap());
        // Let the stderr thread catch up with the last words.
        thread::sleep(POLL);
        status
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with our own child's pid; it has not been reaped (the guard owns it),
        // so the pid cannot have been reused.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running server.
#[derive(Debug)]
pub struct App {
    pub guard: Guard,
    pub addr: SocketAddr,
}

impl App {
    /// Starts the binary with `--port 0` and `args`, and reads the port from its one stdout line.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> App {
        let mut all = vec!["--port", "0"];
        all.extend_from_slice(args);
        App::start_exact(&all, env)
    }

    /// Starts the binary with exactly `args` (the caller picks the port, e.g. by environment).
    pub fn start_exact(args: &[&str], env: &[(&str, &str)]) -> App {
        let (guard, mut stdout) = Guard::spawn(args, env);
        // read_line blocks; a thread plus a timed channel bounds the wait.
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => panic!(
                "no listening line within {PATIENCE:?}; stderr: {}",
                guard.stderr()
            ),
        };
        let addr = line
            .trim_end()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "expected `listening on ADDR`, got {line:?}; stderr: {}",
                    guard.stderr()
                )
            });
        App { guard, addr }
    }

    pub fn get(&self, path: &str) -> Reply {
        get(self.addr, path)
            .unwrap_or_else(|e| panic!("GET {path} failed: {e}; stderr: {}", self.guard.stderr()))
    }

    /// Polls `/health` until `done` holds for its body.
    pub fn health_when(&self, what: &str, done: impl Fn(&str) -> bool) -> Reply {
        wait_until(what, PATIENCE, || {
            let reply = self.get("/health");
            done(&reply.body).then_some(reply)
        })
    }
}

/// Runs the binary to completion (bounded) and returns its status, stdout and stderr.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let (mut guard, mut stdout) = Guard::spawn(args, env);
    let status = guard.wait_exit(PATIENCE);
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    (status, out, guard.stderr())
}

/// Calls `probe` every 50 ms until it returns `Some`, panicking after `within`.
pub fn wait_until<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        thread::sleep(POLL);
    }
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// The raw head, status line included.
    pub head: String,
    pub body: String,
}

pub fn get(addr: SocketAddr, path: &str) -> io::Result<Reply> {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Sends `request` as is and reads the reply to EOF.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    stream.write_all(request)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no head in {raw:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status in {head:?}"),
            )
        })?;
    Ok(Reply {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// The raw token after `"key":` in a flat-enough JSON document (our keys are unique).
pub fn json_raw<'a>(body: &'a str, key: &str) -> &'a str {
    let needle = format!("\"{key}\":");
    let start = body
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key:?} in {body}"))
        + needle.len();
    let rest = &body[start..];
    let end = match rest.strip_prefix('"') {
        Some(string) => {
            string
                .find('"')
                .unwrap_or_else(|| panic!("unterminated {key:?} in {body}"))
                + 2
        }
        None => rest.find([',', '}']).unwrap_or(rest.len()),
    };
    &rest[..end]
}

pub fn json_str(body: &str, key: &str) -> String {
    json_raw(body, key).trim_matches('"').to_string()
}

pub fn json_num(body: &str, key: &str) -> f64 {
    let raw = json_raw(body, key);
    raw.parse()
        .unwrap_or_else(|_| panic!("{key:?} is not a number: {raw:?} in {body}"))
}

/// VmRSS of `pid` in bytes, from `/proc`.
pub fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"));
    kib * 1024
}

pub const MIB: u64 = 1024 * 1024;
