//! `fleet-coordinator`: parses the command line, loads the configuration, installs logging, and
//! calls [`fleet_coordinator::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use fleet_coordinator::Config;
use fleet_coordinator::config::DEFAULT_CONFIG;

const USAGE: &str = "usage: fleet-coordinator [--config FILE]
       fleet-coordinator print-default-config
       fleet-coordinator credential NAME device|operator [--secret-file FILE]

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
            "credential" => return credential(args.collect()),
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
        // Colour only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
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

/// `credential NAME ROLE [--secret-file FILE]`: a new random secret for an account of the
/// embedded broker. Prints the line for `broker.credentials` on stdout; the secret goes to
/// FILE (created 0600, never overwritten), or to stderr.
fn credential(args: Vec<String>) -> ExitCode {
    use fleet_coordinator::auth::{Role, new_credential};
    let usage = || {
        eprintln!(
            "error: usage: fleet-coordinator credential NAME device|operator [--secret-file FILE]"
        );
        ExitCode::from(2)
    };
    let (name, role, file) = match args.as_slice() {
        [name, role] => (name, role, None),
        [name, role, flag, file] if flag == "--secret-file" => (name, role, Some(file)),
        _ => return usage(),
    };
    let role = match role.as_str() {
        "device" => Role::Device,
        "operator" => Role::Operator,
        _ => return usage(),
    };
    if role == Role::Device && fleet_proto::DeviceId::new(name.as_str()).is_err() {
        eprintln!("error: {name:?} is not a device id (letters, digits, '-', '_', '.')");
        return ExitCode::from(2);
    }
    let (secret, line) = new_credential(name, role);
    match file {
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(format!("{secret}\n").as_bytes()));
            if let Err(e) = written {
                eprintln!("error: cannot create {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
        None => eprintln!("secret for {name}: {secret}"),
    }
    println!("{line}");
    ExitCode::SUCCESS
}
