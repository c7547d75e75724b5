//! `fleet-sim`: the demo, load generation and benchmarks. See `fleet-sim --help`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use fleet_sim::load::{LoadConfig, Stats};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-sim",
    version,
    about = "A fleet in one process: demo, load, benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// A good and a bad release through a fleet of real agents and apps, in one process
    Demo {
        /// Number of devices (three hardware types, two regions)
        #[arg(long, default_value_t = 24)]
        devices: usize,
        /// Keep the working directory (registry, device disks) instead of removing it
        #[arg(long)]
        keep: bool,
        /// The releases' strategy: canary-rolling, blue-green (every agent gets the
        /// forwarder; a good release switched under load, a bad one switched back), or ab
        /// (two releases observed side by side, the better one promoted)
        #[arg(long, default_value = "canary-rolling")]
        strategy: fleet_sim::demo::Strategy,
    },
    /// Many protocol-level simulated devices against a broker (no slots, no app processes)
    Load(Box<LoadArgs>),
    /// Measured figures for the agent, the coordinator and the brokers (BENCHMARKS.md)
    Bench {
        /// Shorter windows and smaller fleets: under five minutes
        #[arg(long)]
        quick: bool,
        /// Where the Markdown table is written
        #[arg(long, default_value = "target/fleet-bench.md")]
        out: std::path::PathBuf,
        /// Measure only these sections (comma-separated: agent, coordinator, e2e, brokers)
        /// [default: all]
        #[arg(long, value_delimiter = ',', value_name = "SECTION")]
        only: Vec<fleet_sim::bench::Section>,
    },
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    #[arg(long, default_value = "127.0.0.1:1883", value_name = "HOST:PORT")]
    broker: String,
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Index of the first device, to split a fleet over several processes
    #[arg(long, default_value_t = 0)]
    first: usize,
    #[arg(long, default_value = "sim")]
    prefix: String,
    #[arg(long, default_value = "10s")]
    heartbeat: humantime_arg::Dur,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "jetson-orin,rpi4,x86-gateway"
    )]
    types: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "eu-west,us-east")]
    regions: Vec<String>,
    /// Release public key file (hex); desired releases are admitted as an agent would
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
    #[arg(long, default_value = "200ms")]
    install_delay: humantime_arg::Dur,
    /// Share (0–1) of devices that roll every new release back
    #[arg(long, default_value_t = 0.0)]
    fail_install: f64,
    /// Share (0–1) of devices that never come online
    #[arg(long, default_value_t = 0.0)]
    offline: f64,
    /// Devices of this type turn bad (30 % errors) on --bad-version
    #[arg(long)]
    bad_type: Option<String>,
    #[arg(long)]
    bad_version: Option<String>,
    /// Average disconnects per device per hour
    #[arg(long, default_value_t = 0.0)]
    churn_per_hour: f64,
    /// Stop after this long [default: run until Ctrl-C]
    #[arg(long)]
    duration: Option<humantime_arg::Dur>,
    /// Devices sharing one MQTT connection (beyond ~19,000 connections a process runs out of
    /// file descriptors here)
    #[arg(long, default_value_t = 1)]
    per_connection: usize,
}

/// Durations on the command line (`10s`, `200ms`).
mod humantime_arg {
    #[derive(Clone, Copy, Debug)]
    pub struct Dur(pub std::time::Duration);
    impl std::str::FromStr for Dur {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            fleet_proto::time::parse_duration(s).map(Dur)
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Agents and the coordinator log through tracing; the demo's own output is the story, so
    // only errors are shown unless FLEET_LOG asks for more (e.g. FLEET_LOG=info).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
                // rumqttd logs every dropped connection as an error; the coordinator reports
                // what matters about its devices itself.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,rumqttd=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    runtime.block_on(async move {
        match cli.command {
            Cmd::Bench { quick, out, only } => {
                fleet_sim::bench::run(fleet_sim::bench::Options { quick, out, only }).await
            }
            Cmd::Demo {
                devices,
                keep,
                strategy,
            } => {
                anyhow::ensure!(
                    devices >= 6,
                    "--devices must be at least 6 (three types, two regions)"
                );
                anyhow::ensure!(
                    strategy != fleet_sim::demo::Strategy::Ab || devices >= 12,
                    "--strategy ab needs at least 12 devices (two of each type and region, one for each arm)"
                );
                fleet_sim::demo::run(fleet_sim::demo::Options {
                    devices,
                    keep,
                    strategy,
                })
                .await
            }
            Cmd::Load(args) => {
                let LoadArgs {
                    broker,
                    devices,
                    first,
                    prefix,
                    heartbeat,
                    types,
                    regions,
                    key,
                    install_delay,
                    fail_install,
                    offline,
                    bad_type,
                    bad_version,
                    churn_per_hour,
                    duration,
                    per_connection,
                } = *args;
                let (host, port) = broker
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                    .with_context(|| format!("--broker {broker:?} is not HOST:PORT"))?;
                let key = match key {
                    None => None,
                    Some(path) => {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("cannot read {}", path.display()))?;
                        Some(
                            fleet_proto::release::parse_public_key(&text)
                                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                        )
                    }
                };
                let config = LoadConfig {
                    host,
                    port,
                    prefix,
                    first,
                    devices,
                    heartbeat: heartbeat.0,
                    device_types: types,
                    regions,
                    key,
                    install_delay: install_delay.0,
                    fail_install,
                    offline,
                    bad_type,
                    bad_version,
                    churn_per_hour,
                    per_connection,
                };
                load(config, duration.map(|d| d.0)).await
            }
        }
    })
}

async fn load(config: LoadConfig, duration: Option<Duration>) -> anyhow::Result<()> {
    let stats = Arc::new(Stats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let devices = config.devices;
    let runner = tokio::spawn(fleet_sim::load::run(config, stats.clone(), shutdown));
    let started = Instant::now();
    let deadline = duration.map(|d| started + d);
    let mut report = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = report.tick() => {
                println!(
                    "{:>6.0}s connected {}/{devices} heartbeats {} desired {} committed {} rolled back {} refused {} reconnects {}",
                    started.elapsed().as_secs_f64(),
                    stats.connected.load(Ordering::Relaxed),
                    stats.heartbeats.load(Ordering::Relaxed),
                    stats.desired.load(Ordering::Relaxed),
                    stats.committed.load(Ordering::Relaxed),
                    stats.rolled_back.load(Ordering::Relaxed),
                    stats.refused.load(Ordering::Relaxed),
                    stats.reconnects.load(Ordering::Relaxed),
                );
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
        }
    }
    let _ = stop.send(true);
    runner.await??;
    // One machine-readable line for `fleet-sim bench`.
    println!(
        "summary heartbeats={} committed={} rolled_back={} first_bad_heartbeat_ms={} first_rollback_desired_ms={}",
        stats.heartbeats.load(Ordering::Relaxed),
        stats.committed.load(Ordering::Relaxed),
        stats.rolled_back.load(Ordering::Relaxed),
        stats.first_bad_heartbeat_ms.load(Ordering::Relaxed),
        stats.first_rollback_desired_ms.load(Ordering::Relaxed),
    );
    Ok(())
}
