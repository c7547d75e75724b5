//! Processes a test starts, and the small waiting helpers every scenario needs.
//!
//! A [`Child`] runs in its own process group with stdout and stderr in files, so its output
//! survives it and can be searched while it runs ([`Child::wait_for_line`]). Dropping the guard
//! SIGKILLs the whole group and reaps it; if the test process itself dies (a runner timeout, a
//! SIGKILL), the kernel kills the child too (`PR_SET_PDEATHSIG`), so nothing outlives a test run.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use regex::Regex;

/// Prints a line on the real stderr, past the test harness's output capture: skips and measured
/// figures must be seen even when the test passes. (`cargo test` shows it as it happens; nextest
/// shows a passing test's output only with `--success-output immediate` or `--no-capture`.)
pub fn visible(line: &str) {
    let mut err = io::stderr().lock();
    // Nothing useful can be done if stderr is gone.
    let _ = writeln!(err, "{line}");
}

/// The workspace root (the directory holding the top-level Cargo.toml).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .expect("fleet-e2e lives in the workspace's tests/ directory")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` in the workspace root.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The package that builds a workspace binary (for the "not built" hint).
fn package_of(binary: &str) -> &str {
    // Every fleet binary is named after its package; this is where an exception would go.
    binary
}

/// The path of a workspace binary in `target/debug/`; panics naming the `cargo build` command
/// when it is missing. Scenario tests run the real binaries, which `cargo test -p fleet-e2e` does
/// not build (`cargo nextest run --workspace` does).
#[track_caller]
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    if !path.is_file() {
        panic!(
            "{name} is not built ({} does not exist): run `cargo build -p {}` first \
             (or `cargo build --workspace`)",
            path.display(),
            package_of(name)
        );
    }
    path
}

/// A port on 127.0.0.1 that was free a moment ago, reserved for this test process.
///
/// A test picks ports before the processes that listen on them start, and restarts servers on
/// the same port (an app between crashes, a broker between `stop` and `start_again`). A port
/// from the kernel's ephemeral range (what binding port 0 gives) can be taken in such a gap
/// as the local port of any outgoing connection (a health probe, an MQTT client), and the
/// server then fails with "address in use". So ports come from just below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), and a lock file per port under the temporary
/// directory, held until this process exits, keeps the test processes nextest runs in
/// parallel from picking the same one. Without room below the range: port 0 as before.
pub fn free_port() -> u16 {
    reserve_port().unwrap_or_else(|| {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("binding 127.0.0.1:0 cannot fail on a working loopback");
        listener
            .local_addr()
            .expect("a bound socket has a local address")
            .port()
    })
}

/// Ports tried below the ephemeral range.
const RESERVED_PORTS: u16 = 10_000;

fn reserve_port() -> Option<u16> {
    static HELD: std::sync::Mutex<Vec<File>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let ephemeral_low: u16 = range.split_whitespace().next()?.parse().ok()?;
    let low = ephemeral_low.checked_sub(RESERVED_PORTS)?.max(1024);
    let span = u32::from(ephemeral_low - low);
    if span < 100 {
        return None;
    }
    let dir = std::env::temp_dir().join("fleet-e2e-ports");
    fs::create_dir_all(&dir).ok()?;
    // Spread the processes over the range: start from the pid and the clock, then walk.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let start = seed.wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) * 7919);
    for i in 0..span {
        let port = low + u16::try_from((start.wrapping_add(i)) % span).ok()?;
        let Ok(lock) = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        use std::os::fd::AsRawFd as _;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if locked && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            // The lock lives as long as the process: a test's ports stay its own.
            HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
            return Some(port);
        }
    }
    None
}

/// Polls `cond` until it holds; panics after `timeout` with `what` in the message.
///
/// The poll interval starts at 5 ms and backs off to 100 ms. This is waiting on a condition, not
/// sleeping for an assumed duration: the test proceeds the moment `cond` is true.
#[track_caller]
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `probe` until it returns `Some`; panics after `timeout` with `what` in the message.
#[track_caller]
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    let mut interval = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if started.elapsed() >= timeout {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(Duration::from_millis(100));
    }
}

/// What [`Child::wait_for_line`] looks for: a substring (from `&str`/`String`) or a [`Regex`].
#[derive(Debug, Clone)]
pub enum Pattern {
    Substring(String),
    Regex(Regex),
}

impl Pattern {
    pub fn matches(&self, line: &str) -> bool {
        match self {
            Pattern::Substring(s) => line.contains(s.as_str()),
            Pattern::Regex(re) => re.is_match(line),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::Substring(s) => write!(f, "{s:?}"),
            Pattern::Regex(re) => write!(f, "/{}/", re.as_str()),
        }
    }
}

impl From<&str> for Pattern {
    fn from(s: &str) -> Pattern {
        Pattern::Substring(s.to_owned())
    }
}

impl From<String> for Pattern {
    fn from(s: String) -> Pattern {
        Pattern::Substring(s)
    }
}

impl From<Regex> for Pattern {
    fn from(re: Regex) -> Pattern {
        Pattern::Regex(re)
    }
}

impl From<&Regex> for Pattern {
    fn from(re: &Regex) -> Pattern {
        Pattern::Regex(re.clone())
    }
}

/// A process started by a test. Dropping it SIGKILLs its process group and reaps it.
#[derive(Debug)]
pub struct Child {
    name: String,
    process: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Where this run's output starts in the log files: a restarted process appends to the
    /// same files, and searches must not match the previous run's lines.
    stdout_from: u64,
    stderr_from: u64,
    status: Option<ExitStatus>,
}

impl Child {
    /// Starts `cmd` in a new process group, stdin from /dev/null, stdout and stderr appended to
    /// `<log_dir>/<name>.stdout` and `<log_dir>/<name>.stderr`. Panics if it cannot start.
    #[track_caller]
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Child {
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        let (out, stdout_from) = open_log(&stdout);
        let (err, stderr_from) = open_log(&stderr);
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let shown = format!("{cmd:?}");
        let process =
            spawn_tied(cmd).unwrap_or_else(|e| panic!("failed to start {name} ({shown}): {e}"));
        Child {
            name: name.to_owned(),
            process,
            stdout,
            stderr,
            stdout_from,
            stderr_from,
            status: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// This run's stdout so far.
    pub fn stdout(&self) -> String {
        read_from(&self.stdout, self.stdout_from)
    }

    /// This run's stderr so far.
    pub fn stderr(&self) -> String {
        read_from(&self.stderr, self.stderr_from)
    }

    /// The exit status if the process has ended (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.process.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Waits until the first line of stdout or stderr (from this run) matching `pattern`, and
    /// returns it. Panics after `timeout`, or as soon as the process exits without printing it,
    /// showing the end of both logs.
    #[track_caller]
    pub fn wait_for_line(&mut self, pattern: impl Into<Pattern>, timeout: Duration) -> String {
        let pattern = pattern.into();
        let started = Instant::now();
        let mut interval = Duration::from_millis(5);
        loop {
            // Read the status before the logs: output written before the exit is then seen.
            let exited = self.try_status();
            if let Some(line) = self.find_line(&pattern, exited.is_some()) {
                return line;
            }
            if let Some(status) = exited {
                panic!(
                    "{} exited ({}) without printing a line matching {pattern}\n{}",
                    self.name,
                    describe(status),
                    self.tails(40)
                );
            }
            if started.elapsed() >= timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {} to print a line matching {pattern}\n{}",
                    self.name,
                    self.tails(40)
                );
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_millis(50));
        }
    }

    /// The first complete line of this run's output matching `pattern` (with the final partial
    /// line too once the process has exited).
    pub fn find_line(&self, pattern: &Pattern, include_partial: bool) -> Option<String> {
        for text in [self.stdout(), self.stderr()] {
            let complete = if include_partial || text.ends_with('\n') {
                text.as_str()
            } else {
                text.rsplit_once('\n').map_or("", |(done, _)| done)
            };
            if let Some(line) = complete.lines().find(|l| pattern.matches(l)) {
                return Some(line.to_owned());
            }
        }
        None
    }

    /// Sends `signal` to the process itself (not its group), e.g. `libc::SIGTERM`.
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() {
            let pid = libc::pid_t::try_from(self.pid()).expect("pids fit in pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Waits for the process to exit; panics after `timeout`.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("{} exits", self.name);
        wait_for(timeout, &what, || self.try_status())
    }

    /// SIGTERM, then SIGKILL to the group if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        let mut interval = Duration::from_millis(5);
        while Instant::now() < deadline {
            if let Some(status) = self.try_status() {
                return status;
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_millis(50));
        }
        self.kill()
    }

    /// SIGKILLs the whole process group and reaps the process.
    pub fn kill(&mut self) -> ExitStatus {
        let pgid = libc::pid_t::try_from(self.pid()).expect("pids fit in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions. The group outlives its leader, so
        // this also reaches grandchildren after the leader has exited.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        if let Some(status) = self.status {
            return status;
        }
        let status = self
            .process
            .wait()
            .unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
        self.status = Some(status);
        status
    }

    /// The last `lines` lines of this run's stdout and stderr, labelled, for failure messages.
    pub fn tails(&self, lines: usize) -> String {
        let tail = |text: String| {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        };
        format!(
            "--- {} stdout ({}) ---\n{}\n--- {} stderr ({}) ---\n{}\n---",
            self.name,
            self.stdout.display(),
            tail(self.stdout()),
            self.name,
            self.stderr.display(),
            tail(self.stderr())
        )
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Shown with the failing test's output (captured otherwise).
            eprintln!("{}", self.tails(30));
        }
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

#[track_caller]
fn open_log(path: &Path) -> (File, u64) {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("failed to open log {}: {e}", path.display()));
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    (file, len)
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        // A log that cannot be read reads as empty; the caller's timeout reports it.
        let _ = file.read_to_end(&mut text);
    }
    String::from_utf8_lossy(&text).into_owned()
}

type SpawnRequest = (Command, mpsc::Sender<io::Result<std::process::Child>>);

/// Spawns `cmd` so that it is SIGKILLed when the test process dies.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, and
/// test threads come and go. So every child is forked by one thread that lives as long as the
/// process: a child then dies exactly when the test process does.
pub fn spawn_tied(mut cmd: Command) -> io::Result<std::process::Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("fleet-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // The requester may have given up; nothing to do then.
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("the spawner thread starts once per test process");
        tx
    });
    let parent = libc::pid_t::try_from(std::process::id()).expect("pids fit in pid_t");
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The test process may have died between fork and prctl.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .send((cmd, reply_tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// A temporary directory for one test. Removed on drop, except after a failure: then it is kept
/// and its path printed, so the logs and device disks can be read.
///
/// Declare it before the guards that write into it (locals drop in reverse order).
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory named after `label` under the system's temporary directory.
    #[track_caller]
    pub fn new(label: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("fleet-e2e-{label}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("failed to create a temporary directory: {e}"));
        let path = dir.path().to_path_buf();
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path/name`, created as a directory.
    #[track_caller]
    pub fn subdir(&self, name: &str) -> PathBuf {
        let dir = self.path.join(name);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", dir.display()));
        dir
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take()
            && std::thread::panicking()
        {
            let kept = dir.keep();
            eprintln!("kept the failed test's directory: {}", kept.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_substrings_and_regexes() {
        let sub = Pattern::from("listening on");
        assert!(sub.matches("INFO listening on 127.0.0.1:4000"));
        assert!(!sub.matches("INFO starting"));
        let re = Pattern::from(Regex::new(r"listening on 127\.0\.0\.1:\d+$").unwrap());
        assert!(re.matches("INFO listening on 127.0.0.1:4000"));
        assert!(!re.matches("INFO listening on [::1]:4000"));
        assert_eq!(sub.to_string(), "\"listening on\"");
        assert_eq!(re.to_string(), r"/listening on 127\.0\.0\.1:\d+$/");
    }

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "{ports:?}");
        let range = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        for p in ports {
            assert!(p < low, "{p} is in the ephemeral range (from {low})");
            TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
        }
    }

    #[test]
    fn workspace_root_holds_the_workspace_manifest() {
        let manifest = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains("[workspace]"));
    }
}
