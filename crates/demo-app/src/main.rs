//! fleet-demo-app: the sample application that fleet rollouts deploy in demos and tests.
//!
//! It serves `/health` (status, version, named checks, and metrics from a workload that runs
//! whether or not anyone sends traffic), `/work` and a deterministic `/infer`, and it carries a
//! fault knob for each way a release can go bad, so every rollback trigger can be exercised by
//! starting this one binary with different arguments. `fleet-demo-app --help` lists them.
//!
//! # Layout
//! - `args`: flags and their environment variables → a typed `Command`; the usage text.
//! - `data`: `--data-dir` with a schema version, `--migrate` (data-snapshot demos).
//! - `faults`: the fault knobs, the `--only-on-device-type` gate, and the faults that act on the
//!   whole process (crash timer, memory leak, SIGTERM disposition).
//! - `workload`: the frame worker and `/work` processing, with a seeded PRNG for injected errors.
//! - `metrics`: the sliding window behind error rate and p95 latency.
//! - `health`: metrics and knobs → `/health`'s status, checks and JSON.
//! - `infer`: the deterministic function behind `/infer` and `infer TEXT`.
//! - `http`: bounded request reading and parsing, response writing.
//! - `server`: accept loop, one thread per connection, routing.
//! - `json`: a minimal JSON object writer.
//!
//! # Process contract
//! - Prints exactly one line to stdout, `listening on ADDR:PORT`, once the socket is bound.
//! - SIGTERM: the default disposition (set explicitly), so the process dies of the signal at
//!   once; with `--ignore-sigterm` only SIGKILL stops it.
//! - Exit status: see [`Exit`].

mod args;
mod data;
mod faults;
mod health;
mod http;
mod infer;
mod json;
mod metrics;
mod server;
mod workload;

use std::convert::Infallible;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use args::{Command, Options};
use faults::FaultKnobs;
use workload::Workload;

/// The process's exit statuses; supervisors and tests tell the outcomes apart by them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `--help` or `infer` finished.
    Ok = 0,
    /// A runtime failure, e.g. the address could not be bound.
    Failure = 1,
    /// Unknown flag or bad value.
    Usage = 2,
    /// `--crash-at-start`.
    CrashAtStart = 3,
    /// `--crash-after`.
    CrashAfter = 4,
    /// The data in `--data-dir` is at a schema this version does not read.
    DataTooNew = 5,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

fn main() -> ExitCode {
    let started = Instant::now();
    let args: Result<Vec<String>, _> = std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect();
    let Ok(args) = args else {
        eprintln!("fleet-demo-app: error: arguments must be valid UTF-8");
        return Exit::Usage.into();
    };
    // A variable that is not UTF-8 becomes U+FFFD, so parsing rejects it by name instead of
    // silently treating it as unset.
    let env = |key: &str| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned());
    let command = match args::parse(&args, env) {
        Ok(command) => command,
        Err(e) => {
            eprintln!("fleet-demo-app: error: {e}\nhint: `fleet-demo-app --help` lists every flag");
            return Exit::Usage.into();
        }
    };
    // The agent passes device facts in the environment; only the type matters here.
    let device_type = std::env::var("FLEET_DEVICE_TYPE").ok();
    match command {
        Command::Help => {
            print!("{}", args::usage());
            Exit::Ok.into()
        }
        Command::Infer { input, options } => {
            // Only the knobs that shape an answer apply here: --wrong-output and --latency-ms.
            let faults = active_faults(&options, device_type.as_deref());
            print!("{}", infer::answer(input.as_bytes(), &faults));
            Exit::Ok.into()
        }
        Command::Serve(options) => {
            let Err(stop) = serve(&options, device_type.as_deref(), started);
            eprintln!("fleet-demo-app: {}", stop.message);
            stop.exit.into()
        }
    }
}

fn active_faults(options: &Options, device_type: Option<&str>) -> FaultKnobs {
    faults::gate(
        options.faults.clone(),
        options.only_on_device_type.as_deref(),
        device_type,
    )
}

/// Why the server stopped before serving.
#[derive(Debug)]
struct Stop {
    exit: Exit,
    message: String,
}

fn failure(what: &str) -> impl FnOnce(std::io::Error) -> Stop {
    move |e| Stop {
        exit: Exit::Failure,
        message: format!("error: {what}: {e}"),
    }
}

/// Starts everything, then serves until the process is killed or a fault ends it.
fn serve(
    options: &Options,
    device_type: Option<&str>,
    started: Instant,
) -> Result<Infallible, Stop> {
    let faults = active_faults(options, device_type);
    let gate = match &options.only_on_device_type {
        Some(wanted) => format!(
            " (only on device type {wanted}; FLEET_DEVICE_TYPE is {})",
            device_type.unwrap_or("unset")
        ),
        None => String::new(),
    };
    eprintln!("fleet-demo-app {}: faults: {faults}{gate}", options.version);

    faults::set_sigterm_disposition(faults.ignore_sigterm)
        .map_err(failure("cannot set the SIGTERM disposition"))?;
    if faults.crash_at_start {
        return Err(Stop {
            exit: Exit::CrashAtStart,
            message: "crashing at start (--crash-at-start)".into(),
        });
    }
    if let Some(dir) = &options.data_dir {
        let schema =
            data::open(dir, options.migrate, &options.version).map_err(|message| Stop {
                exit: Exit::DataTooNew,
                message: format!("error: {message}"),
            })?;
        eprintln!(
            "fleet-demo-app: data in {} at schema {schema}",
            dir.display()
        );
    }
    let addr = SocketAddr::new(options.bind, options.port);
    let listener = TcpListener::bind(addr).map_err(failure(&format!("cannot listen on {addr}")))?;
    let local = listener
        .local_addr()
        .map_err(failure("cannot read the bound address"))?;

    let workload = Arc::new(Workload::new(
        faults.latency,
        faults.error_rate,
        options.seed,
        options.work_interval,
        Instant::now(),
    ));
    workload
        .spawn_worker()
        .map_err(failure("cannot start the worker thread"))?;
    if let Some(after) = faults.crash_after {
        faults::spawn_crash_timer(after).map_err(failure("cannot start the crash timer"))?;
    }
    if faults.leak_mib_per_sec > 0.0 {
        faults::spawn_leak(faults.leak_mib_per_sec, options.leak_limit_mib)
            .map_err(failure("cannot start the leak thread"))?;
    }

    announce(local);
    let app = server::App {
        version: faults
            .report_version
            .clone()
            .unwrap_or_else(|| options.version.clone()),
        faults,
        workload,
        started,
    };
    server::run(listener, Arc::new(app))
}

/// The one stdout line supervisors and tests read to learn the port (`--port 0`).
fn announce(local: SocketAddr) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "listening on {local}").and_then(|()| out.flush()) {
        // Serving is still useful to a supervisor that knows the port; say why the line is missing.
        eprintln!("fleet-demo-app: warning: cannot write the listening line to stdout: {e}");
    }
}
