//! `fleet-agent`: parses arguments, loads the config, installs logging, runs the agent, and
//! maps the outcome to an exit code systemd can act on.

use std::path::PathBuf;
use std::process::ExitCode;

use fleet_agent::config::{self, DEFAULT_CONFIG};
use fleet_agent::notify::Notifier;

/// The process's exit statuses (documented in README.md, "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Stopped by SIGTERM/SIGINT, or a subcommand finished.
    Ok = 0,
    /// An I/O failure on the slots or the state directory; systemd restarts the agent.
    Io = 1,
    /// Bad arguments.
    Usage = 2,
    /// The configuration is invalid; restarting will not help (`RestartPreventExitStatus`).
    Config = 3,
    /// The journal and its previous copy are unreadable; a human must look.
    Journal = 4,
}

const USAGE: &str =
    "usage: fleet-agent [--config PATH]   run the agent (default /etc/fleet/agent.toml)
       fleet-agent print-default-config   print the commented default configuration
       fleet-agent --help
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut path = PathBuf::from("/etc/fleet/agent.toml");
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "print-default-config" => {
                print!("{DEFAULT_CONFIG}");
                return exit(Exit::Ok);
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return exit(Exit::Ok);
            }
            "--config" | "-c" => match it.next() {
                Some(p) => path = PathBuf::from(p),
                None => {
                    eprintln!("fleet-agent: error: --config needs a path\n{USAGE}");
                    return exit(Exit::Usage);
                }
            },
            other => {
                eprintln!("fleet-agent: error: unknown argument {other:?}\n{USAGE}");
                return exit(Exit::Usage);
            }
        }
    }
    let config = match config::load(&path, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fleet-agent: error: {e:#}");
            return exit(Exit::Config);
        }
    };
    let level = match config.log_level.as_str() {
        "error" => tracing::Level::ERROR,
        "warn" => tracing::Level::WARN,
        "debug" => tracing::Level::DEBUG,
        "trace" => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        // The MQTT client's own debug output is per packet: keep it at warn.
        let filter = tracing_subscriber::filter::Targets::new()
            .with_default(level)
            .with_target("rumqttc", tracing::Level::WARN);
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false),
            )
            .with(filter)
            .init();
    }
    let notifier = Notifier::new(
        std::env::var("NOTIFY_SOCKET").ok().as_deref(),
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
    );
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-agent: error: cannot start the runtime: {e}");
            return exit(Exit::Io);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = async {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        fleet_agent::run_with(config, shutdown, fleet_agent::Options { notifier }).await
    });
    // A download or hook still running on a blocking thread must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => exit(Exit::Ok),
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("fleet-agent: error: {e}");
            exit(match e {
                fleet_agent::Error::Config(_) => Exit::Config,
                fleet_agent::Error::Journal(fleet_agent::journal::JournalError::Corrupt {
                    ..
                }) => Exit::Journal,
                _ => Exit::Io,
            })
        }
    }
}

fn exit(e: Exit) -> ExitCode {
    ExitCode::from(e as u8)
}
