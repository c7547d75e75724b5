//! `fleet-coordinator`: parses the command line, loads the configuration, installs logging, and
//! calls [`fleet_coordinator::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use fleet_coordinator::Config;
use fleet_coordinator::config::DEFAULT_CONFIG;

const USAGE: &str = "usage: fleet-coordinator [--config FILE]
       fleet-coordinator print-default-config

With no arguments: embedded MQTT broker on 127.0.0.1:1883, registry ./fleet-coordinator.db,
HTTP (/metrics, /api/v1/…, /artifacts/…) on 127.0.0.1:8080. Environment overrides:
FLEET_COORDINATOR__SECTION__KEY (e.g. FLEET_COORDINATOR__HTTP__LISTEN=0.0.0.0:8080).";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config_path: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "print-default-config" => {
                print!("{DEFAULT_CONFIG}");
                return ExitCode::SUCCESS;
            }
            "--config" | "-c" => match args.next() {
                Some(p) => config_path = Some(PathBuf::from(p)),
                None => {
                    eprintln!("error: --config needs a file\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("error: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match runtime.block_on(fleet_coordinator::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
