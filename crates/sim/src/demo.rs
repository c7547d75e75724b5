//! `fleet-sim demo`: a good release and a bad one through a fleet of real agents, in one
//! process, in about two minutes.
//!
//! 1. A good release rolls out: canary, (automatic) approval, waves, confirm. One device is
//!    offline during it: skipped, then caught up when it returns.
//! 2. A bad release, faulty on one device type only: the gate catches it, the wave rolls back,
//!    and the report names the failure pattern.
//! 3. Both deployment reports, the state block and an audit summary.
//!
//! `--strategy blue-green` gives every agent the forwarder on its service port and shows
//! blue-green instead: a first install, a good release switched under a hammering client
//! (zero failed requests), and a bad one caught by the canary and switched back while the
//! old instances keep running ([`blue_green`]).
//!
//! `--strategy ab` shows an A/B rollout instead: two releases on two stratified arms, observed
//! side by side, arm B with a higher error rate; the operator reads the report's arms and
//! promotes A, which rolls out by canary-rolling waves to every other device, B's included
//! ([`ab`]).
//!
//! The operator side goes through `fleetctl`'s library (MQTT requests to the coordinator), so
//! the demo drives the system exactly as a person with `fleetctl` would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use fleet_proto::operator::{AuditQuery, Command, DeviceStatus, DeviceView, ReplyBody};
use fleet_proto::release::StrategyKind;
use fleet_proto::rollout::{Arm, RolloutState, RolloutStatus};
use fleet_proto::{DeviceId, RolloutId, SignedRelease, UnixMillis};
use fleetctl::link::{Answer, Link};
use fleetctl::settings::{Broker, Settings};

use crate::releases::{self, Spec};
use crate::site::{Layout, Site};

#[derive(Clone, Debug)]
pub struct Options {
    pub devices: usize,
    /// `canary-rolling` (the default demo), `blue-green` or `ab`.
    pub strategy: Strategy,
    /// Keep the working directory (registry, device disks, logs) instead of removing it.
    pub keep: bool,
}

/// The strategy the demo's releases use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A good release with an offline device caught up, then a bad one on one device type.
    CanaryRolling,
    /// Agents with the forwarder: a first install, a good blue-green release under traffic
    /// (zero failed requests), then a bad one caught and switched back.
    BlueGreen,
    /// Two releases on two arms, observed side by side; the better one is promoted and rolls
    /// out to the rest.
    Ab,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Strategy, String> {
        match s {
            "canary-rolling" => Ok(Strategy::CanaryRolling),
            "blue-green" => Ok(Strategy::BlueGreen),
            "ab" => Ok(Strategy::Ab),
            other => Err(format!(
                "the demo shows canary-rolling, blue-green or ab, not {other:?}"
            )),
        }
    }
}

struct Clock(Instant);

impl Clock {
    fn stamp(&self) -> String {
        format!("+{:>5.1}s", self.0.elapsed().as_secs_f64())
    }
}

fn now() -> UnixMillis {
    UnixMillis::from_system(std::time::SystemTime::now())
}

async fn ask(link: &mut Link, command: Command) -> anyhow::Result<ReplyBody> {
    match link.request(command).await? {
        Answer::Accepted(body) => Ok(body),
        Answer::Refused(r) => Err(fleetctl::refused(r).into()),
    }
}

async fn devices(link: &mut Link) -> anyhow::Result<Vec<DeviceView>> {
    match ask(link, Command::ListDevices).await? {
        ReplyBody::Devices(d) => Ok(d),
        _ => bail!("the coordinator answered a device listing with something else"),
    }
}

async fn state(link: &mut Link, rollout: &RolloutId) -> anyhow::Result<RolloutState> {
    match ask(
        link,
        Command::Status {
            rollout: rollout.clone(),
        },
    )
    .await?
    {
        ReplyBody::State(s) => Ok(s),
        _ => bail!("the coordinator answered a status request with something else"),
    }
}

/// Polls the registry until `done` holds, failing after `limit` with `what`.
async fn wait_devices(
    link: &mut Link,
    limit: Duration,
    what: &str,
    mut done: impl FnMut(&[DeviceView]) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if done(&devices(link).await?) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {}s waiting for {what}", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn progress_line(clock: &Clock, s: &RolloutState) -> String {
    // An A/B rollout's wave 0 is its two arms.
    let wave = if s.current_wave.current == 0 && s.strategy == StrategyKind::Ab {
        "arms".to_owned()
    } else if s.current_wave.current == 0 {
        "canary".to_owned()
    } else {
        format!("wave {}/{}", s.current_wave.current, s.current_wave.total)
    };
    format!(
        "  {} {:<8} {:<17} {:<9} deployed {:>2}/{} healthy {:>2} skipped {} quarantined {} | {}",
        clock.stamp(),
        s.phase.to_string(),
        s.status.to_string(),
        wave,
        s.deployed_count,
        s.fleet_total,
        s.healthy_count,
        s.skipped_count,
        s.quarantined_count,
        s.last_action
    )
}

/// Follows a rollout's state until it ends, printing each change.
async fn follow(
    link: &mut Link,
    clock: &Clock,
    rollout: &RolloutId,
    limit: Duration,
) -> anyhow::Result<RolloutState> {
    follow_until(link, clock, rollout, limit, |_| false).await
}

/// Follows a rollout's state until `stop` holds or it ends, printing each change.
async fn follow_until(
    link: &mut Link,
    clock: &Clock,
    rollout: &RolloutId,
    limit: Duration,
    stop: impl Fn(&RolloutState) -> bool,
) -> anyhow::Result<RolloutState> {
    link.follow(rollout).await?;
    let deadline = Instant::now() + limit;
    let mut current = state(link, rollout).await?;
    let mut printed = String::new();
    let mut approval_noted = false;
    loop {
        // One line per step of the rollout rather than per device: the key leaves out the
        // deployed and healthy counts, which every printed line shows anyway.
        let key = format!(
            "{}|{}|{}|{}|{}|{}",
            current.phase,
            current.status,
            String::from(current.current_wave),
            current.last_action,
            current.skipped_count,
            current.quarantined_count
        );
        if key != printed {
            println!("{}", progress_line(clock, &current));
            printed = key;
        }
        // An A/B rollout's waves start with a promotion, not an approval.
        if !approval_noted
            && current.current_wave.current >= 1
            && current.strategy != StrategyKind::Ab
        {
            approval_noted = true;
            println!(
                "  {}   canary gate passed; approval is automatic in this demo (approval = \"auto\"); an operator would run `fleetctl rollout approve {rollout}`",
                clock.stamp()
            );
        }
        if current.status.is_final() || stop(&current) {
            return Ok(current);
        }
        if Instant::now() > deadline {
            bail!("rollout {rollout} did not end within {}s", limit.as_secs());
        }
        let next = match link.next_state(Duration::from_secs(2)).await? {
            Some(s) if s.rollout == *rollout => s,
            Some(_) => continue,
            None => state(link, rollout).await?,
        };
        if next.updated_at >= current.updated_at {
            current = next;
        }
    }
}

async fn start(
    link: &mut Link,
    clock: &Clock,
    release: SignedRelease,
) -> anyhow::Result<RolloutId> {
    let plan = match ask(
        link,
        Command::Plan {
            release: release.clone(),
        },
    )
    .await?
    {
        ReplyBody::Plan(p) => p,
        _ => bail!("the coordinator answered a plan request with something else"),
    };
    let passed = plan.checklist.iter().filter(|i| i.ok).count();
    println!(
        "  {} plan: {passed}/{} checklist items pass",
        clock.stamp(),
        plan.checklist.len()
    );
    for wave in &plan.waves {
        let types: Vec<String> = wave
            .by_type
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!(
            "  {}   {:<7} {:>2} devices ({})",
            clock.stamp(),
            wave.name,
            wave.devices.len(),
            types.join(", ")
        );
    }
    for (id, why) in &plan.excluded {
        println!("  {}   not now: {id}: {why}", clock.stamp());
    }
    match ask(link, Command::Start { release }).await? {
        ReplyBody::Started(s) => {
            println!(
                "  {} started rollout {} of {}",
                clock.stamp(),
                s.rollout,
                s.artifact
            );
            Ok(s.rollout)
        }
        _ => bail!("the coordinator answered a start request with something else"),
    }
}

fn versions(devices: &[DeviceView]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for d in devices {
        let v = d
            .active
            .as_ref()
            .map_or("nothing".to_owned(), |a| a.version.clone());
        *out.entry(v).or_default() += 1;
    }
    out
}

fn show_versions(devices: &[DeviceView]) -> String {
    versions(devices)
        .iter()
        .map(|(v, n)| format!("{n} on {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the demo. Everything it starts is stopped and its directory removed, also on failure.
pub async fn run(options: Options) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("fleet-demo-").tempdir()?;
    let app = releases::demo_app_binary()?;
    let key = fleet_proto::SigningKey::generate(&mut rand::rngs::OsRng);
    let layout = Layout {
        devices: options.devices,
        blue_green: options.strategy == Strategy::BlueGreen,
        ..Layout::default()
    };
    let mut site = Site::create(dir.path(), &layout, key).await?;
    let result = match options.strategy {
        Strategy::CanaryRolling => scenario(&mut site, &app, &layout).await,
        Strategy::BlueGreen => blue_green(&mut site, &app, &layout).await,
        Strategy::Ab => ab(&mut site, &app, &layout).await,
    };
    let shutdown = site.shutdown().await;
    let leftovers = processes_under(dir.path());
    if options.keep {
        let kept = dir.keep();
        println!("\nkept the demo's directory: {}", kept.display());
    } else {
        let path = dir.path().to_owned();
        dir.close()
            .with_context(|| format!("cannot remove {}", path.display()))?;
        println!(
            "\nstopped every agent and application; removed {}",
            path.display()
        );
    }
    if !leftovers.is_empty() {
        bail!("processes still running from the demo's directory: {leftovers:?}");
    }
    result.and(shutdown)
}

/// Prints the site, starts every agent and waits until all are online; the operator's link.
async fn open(site: &mut Site, layout: &Layout, clock: &Clock) -> anyhow::Result<Link> {
    let total = site.devices.len();
    let by_type = layout
        .types
        .iter()
        .map(|(t, _)| {
            format!(
                "{t} ×{}",
                site.devices
                    .values()
                    .filter(|d| d.device_type == *t)
                    .count()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "fleet demo: {total} devices ({by_type}) in {}",
        layout.regions.join(" and ")
    );
    println!(
        "  coordinator: embedded MQTT broker on {}, SQLite registry in {}, HTTP on {}",
        site.broker,
        site.dir.join("registry.db").display(),
        site.http
    );
    println!(
        "  release key {} (the demo signs; the coordinator only holds the public key)",
        fleet_proto::release::key_id(&site.key.verifying_key())
    );

    for device in site.devices.values_mut() {
        device.start();
    }
    let settings = Settings {
        broker: Broker {
            host: site.broker.ip().to_string(),
            port: site.broker.port(),
        },
        username: None,
        password: None,
        operator: "demo-operator".into(),
        timeout: Duration::from_secs(20),
    };
    let mut link = Link::connect(&settings).await?;
    wait_devices(
        &mut link,
        Duration::from_secs(60),
        "every agent to register",
        |d| d.len() == total && d.iter().all(|d| d.status == DeviceStatus::Online),
    )
    .await?;
    println!(
        "  {} {total} agents online, nothing installed yet",
        clock.stamp()
    );
    Ok(link)
}

async fn scenario(site: &mut Site, app: &std::path::Path, layout: &Layout) -> anyhow::Result<()> {
    let clock = Clock(Instant::now());
    let total = site.devices.len();
    let mut link = open(site, layout, &clock).await?;

    // One device loses its connection for the first rollout.
    let offline: DeviceId = site
        .devices
        .values()
        .filter(|d| d.device_type == "rpi4")
        .map(|d| d.id.clone())
        .next_back()
        .context("the demo needs an rpi4 device")?;
    site.devices
        .get_mut(&offline)
        .context("the offline device exists")?
        .stop()
        .await?;
    wait_devices(
        &mut link,
        Duration::from_secs(30),
        "the unplugged device to be seen offline",
        |d| {
            d.iter()
                .any(|d| d.id == offline && d.status == DeviceStatus::Offline)
        },
    )
    .await?;
    println!(
        "  {} {offline} went offline (its agent stopped): it will be skipped, not failed",
        clock.stamp()
    );

    println!(
        "  {} building and signing demo-app 1.0.0 and 2.0.0",
        clock.stamp()
    );
    let work = site.dir.join("build");
    std::fs::create_dir_all(&work)?;
    let good = Spec::new("1.0.0", 1);
    let bad = Spec {
        rollback_to: Some((1, "1.0.0".into())),
        // A compatibility bug: 40 % of requests fail, on rpi4 only.
        faults: ["--only-on-device-type", "rpi4", "--error-rate", "0.4"]
            .map(str::to_owned)
            .to_vec(),
        ..Spec::new("2.0.0", 2)
    };
    let (good_release, _) = releases::build(
        &good,
        app,
        &work,
        &site.artifacts,
        site.http,
        &site.key,
        now(),
    )?;
    let (bad_release, _) = releases::build(
        &bad,
        app,
        &work,
        &site.artifacts,
        site.http,
        &site.key,
        now(),
    )?;

    println!("\n== 1. a good release: demo-app 1.0.0 (canary 5 %, waves 50 % / 100 %)");
    let first = start(&mut link, &clock, good_release).await?;
    let end = follow(&mut link, &clock, &first, Duration::from_secs(180)).await?;
    if end.status != RolloutStatus::Completed {
        bail!(
            "the good release ended {} instead of completed: {}",
            end.status,
            end.last_action
        );
    }
    println!(
        "  {} completed: {} deployed, {} skipped ({offline} was offline), {} quarantined",
        clock.stamp(),
        end.deployed_count,
        end.skipped_count,
        end.quarantined_count
    );

    println!("  {} {offline} comes back online", clock.stamp());
    site.devices
        .get_mut(&offline)
        .context("the offline device exists")?
        .start();
    // Caught up means committed after its trial: the rollout counts it as deployed.
    let deadline = Instant::now() + Duration::from_secs(90);
    while state(&mut link, &first).await?.deployed_count < total as u32 {
        if Instant::now() > deadline {
            bail!("{offline} was not caught up within 90s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  {} {offline} caught up: committed 1.0.0 after the same trial and health checks",
        clock.stamp()
    );
    println!(
        "  {} fleet: {}",
        clock.stamp(),
        show_versions(&devices(&mut link).await?)
    );

    println!("\n== 2. a bad release: demo-app 2.0.0, 40 % errors on rpi4 only");
    let second = start(&mut link, &clock, bad_release).await?;
    let end = follow(&mut link, &clock, &second, Duration::from_secs(180)).await?;
    if !matches!(
        end.status,
        RolloutStatus::Halted | RolloutStatus::RolledBack
    ) {
        bail!(
            "the bad release ended {} instead of halted: {}",
            end.status,
            end.last_action
        );
    }
    wait_devices(
        &mut link,
        Duration::from_secs(60),
        "the rolled-back devices to serve 1.0.0 again",
        |d| {
            d.iter()
                .all(|d| d.active.as_ref().is_some_and(|a| a.version == "1.0.0"))
        },
    )
    .await?;
    println!(
        "  {} halted and rolled back; fleet: {}",
        clock.stamp(),
        show_versions(&devices(&mut link).await?)
    );

    epilogue(link, &[&first, &second]).await
}

/// Clients hammering every device's service port (the agent's forwarder) with a new
/// connection per request, counting the answers by version and the failures.
struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Tally>>,
}

/// What the hammering clients saw.
#[derive(Debug, Default)]
struct Tally {
    by_version: BTreeMap<String, u64>,
    failed: u64,
}

impl Hammer {
    fn start(ports: Vec<u16>) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = ports
            .into_iter()
            .map(|port| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        match version_at(port) {
                            Some(v) => *tally.by_version.entry(v).or_default() += 1,
                            None => tally.failed += 1,
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    tally
                })
            })
            .collect();
        Hammer { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for t in self.threads {
            // A client thread does not panic; if one did, its requests are not counted.
            if let Ok(tally) = t.join() {
                for (v, n) in tally.by_version {
                    *total.by_version.entry(v).or_default() += n;
                }
                total.failed += tally.failed;
            }
        }
        total
    }
}

impl Tally {
    fn line(&self) -> String {
        let ok: u64 = self.by_version.values().sum();
        let versions: Vec<String> = self
            .by_version
            .iter()
            .map(|(v, n)| format!("{n} by {v}"))
            .collect();
        format!(
            "{} requests through the service ports, {} failed ({} answered: {})",
            ok + self.failed,
            self.failed,
            ok,
            versions.join(", ")
        )
    }
}

/// GET /health on 127.0.0.1:`port` through a fresh connection: the version that answered
/// 200, `None` for anything else.
fn version_at(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // The demo app writes `"version":"X"` (no spaces) into its /health document.
    let (_, rest) = body.split_once("\"version\":\"")?;
    let (version, _) = rest.split_once('"')?;
    Some(version.to_owned())
}

/// The demo-app processes started from `dir` (a device's slots): (pid, version).
fn apps_under(dir: &std::path::Path) -> Vec<(u32, String)> {
    processes_under(dir)
        .into_iter()
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let at = args.iter().position(|a| a == "--version")?;
            Some((pid, args.get(at + 1)?.clone()))
        })
        .collect()
}

/// `fleet-sim demo --strategy blue-green`: every agent has the forwarder on its service port.
/// 1.0.0 is a first install (nothing runs yet, so nothing to keep warm); 2.0.0 goes blue-green
/// while clients hammer every service port (zero failed requests); 3.0.0 turns unhealthy a
/// few seconds after it starts: the canary catches it, the traffic goes back to 2.0.0, whose
/// instances never stopped.
async fn blue_green(site: &mut Site, app: &std::path::Path, layout: &Layout) -> anyhow::Result<()> {
    let clock = Clock(Instant::now());
    let total = site.devices.len();
    let mut link = open(site, layout, &clock).await?;
    println!(
        "  every agent forwards its service port to the instance with the traffic ([blue_green] switch = \"forwarder\")"
    );
    println!(
        "  {} building and signing demo-app 1.0.0, 2.0.0 and 3.0.0 (strategy blue-green)",
        clock.stamp()
    );
    let work = site.dir.join("build");
    std::fs::create_dir_all(&work)?;
    let first = Spec {
        strategy: "blue-green",
        ..Spec::new("1.0.0", 1)
    };
    let good = Spec {
        rollback_to: Some((1, "1.0.0".into())),
        strategy: "blue-green",
        ..Spec::new("2.0.0", 2)
    };
    let bad = Spec {
        rollback_to: Some((2, "2.0.0".into())),
        // Healthy for its first ~3 s (the error window needs 20 frames at 150 ms), then 90 %
        // of its work fails: 8 good probes 250 ms apart take it through warming up to the
        // switch, and it turns before it can prove itself under traffic.
        faults: ["--error-rate", "0.9", "--work-interval-ms", "150"]
            .map(str::to_owned)
            .to_vec(),
        strategy: "blue-green",
        good_probes: 8,
        probe_interval: "250ms",
        ..Spec::new("3.0.0", 3)
    };
    let mut built = Vec::new();
    for spec in [&first, &good, &bad] {
        let (release, _) = releases::build(
            spec,
            app,
            &work,
            &site.artifacts,
            site.http,
            &site.key,
            now(),
        )?;
        built.push(release);
    }
    let mut built = built.into_iter();
    let mut next = || built.next().context("three releases were built");

    println!(
        "\n== 1. demo-app 1.0.0: a first install (nothing runs yet, so no old instance to keep warm)"
    );
    let r1 = start(&mut link, &clock, next()?).await?;
    let end = follow(&mut link, &clock, &r1, Duration::from_secs(180)).await?;
    if end.status != RolloutStatus::Completed {
        bail!(
            "1.0.0 ended {} instead of completed: {}",
            end.status,
            end.last_action
        );
    }
    println!(
        "  {} fleet: {}",
        clock.stamp(),
        show_versions(&devices(&mut link).await?)
    );

    let ports: Vec<u16> = site.devices.values().map(|d| d.config.app.port).collect();
    println!(
        "\n== 2. a good blue-green release: demo-app 2.0.0 beside 1.0.0, then the traffic switches ({} clients hammer the service ports)",
        ports.len()
    );
    let hammer = Hammer::start(ports.clone());
    let r2 = start(&mut link, &clock, next()?).await?;
    let end = follow(&mut link, &clock, &r2, Duration::from_secs(240)).await?;
    wait_devices(
        &mut link,
        Duration::from_secs(60),
        "every device on 2.0.0",
        |d| {
            d.len() == total
                && d.iter()
                    .all(|d| d.active.as_ref().is_some_and(|a| a.version == "2.0.0"))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = hammer.finish();
    if end.status != RolloutStatus::Completed {
        bail!(
            "2.0.0 ended {} instead of completed: {}",
            end.status,
            end.last_action
        );
    }
    println!("  {} completed: {}", clock.stamp(), tally.line());
    if tally.failed > 0 {
        bail!("the blue-green switch dropped {} requests", tally.failed);
    }

    let before: BTreeMap<DeviceId, Vec<(u32, String)>> = site
        .devices
        .values()
        .map(|d| {
            (
                d.id.clone(),
                apps_under(&site.dir.join("devices").join(d.id.as_str())),
            )
        })
        .collect();
    println!(
        "\n== 3. a bad blue-green release: demo-app 3.0.0, unhealthy a few seconds after it starts"
    );
    let hammer = Hammer::start(ports);
    let r3 = start(&mut link, &clock, next()?).await?;
    let end = follow(&mut link, &clock, &r3, Duration::from_secs(180)).await?;
    if !matches!(
        end.status,
        RolloutStatus::Halted | RolloutStatus::RolledBack
    ) {
        bail!(
            "3.0.0 ended {} instead of halted: {}",
            end.status,
            end.last_action
        );
    }
    wait_devices(
        &mut link,
        Duration::from_secs(60),
        "every device on 2.0.0 again",
        |d| {
            d.iter()
                .all(|d| d.active.as_ref().is_some_and(|a| a.version == "2.0.0"))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = hammer.finish();
    let devices_now = devices(&mut link).await?;
    let caught: Vec<&DeviceView> = devices_now
        .iter()
        .filter(|d| d.quarantine_reason.is_some())
        .collect();
    let mut kept = 0;
    for (id, apps) in &before {
        let now_running = apps_under(&site.dir.join("devices").join(id.as_str()));
        if &now_running == apps {
            kept += 1;
        }
    }
    println!(
        "  {} halted in the canary; fleet: {}",
        clock.stamp(),
        show_versions(&devices_now)
    );
    for d in &caught {
        println!(
            "  {}   {}: {}",
            clock.stamp(),
            d.id,
            d.quarantine_reason.as_deref().unwrap_or_default()
        );
    }
    println!(
        "  {} the 2.0.0 instances of {kept} of {total} devices kept their process (never restarted); {}",
        clock.stamp(),
        tally.line()
    );
    if kept != total {
        bail!(
            "{} devices restarted 2.0.0 during the bad release",
            total - kept
        );
    }

    epilogue(link, &[&r2, &r3]).await
}

/// Each arm's share of the fleet in the A/B demo, in percent: with 24 devices, six per arm.
const AB_PERCENT: u32 = 25;
/// The A/B demo's observation window: seconds instead of the hours a real comparison takes.
const OBSERVATION: &str = "10s";

/// Plans an A/B rollout (prints the checklist's verdict and both arms by hardware type and
/// region, then the winner's waves) and starts it.
async fn start_ab(
    link: &mut Link,
    clock: &Clock,
    a: SignedRelease,
    b: SignedRelease,
) -> anyhow::Result<RolloutId> {
    let plan = match ask(
        link,
        Command::PlanAb {
            a: a.clone(),
            b: b.clone(),
        },
    )
    .await?
    {
        ReplyBody::Plan(p) => p,
        _ => bail!("the coordinator answered a plan request with something else"),
    };
    let passed = plan.checklist.iter().filter(|i| i.ok).count();
    println!(
        "  {} plan {}: {passed}/{} checklist items pass",
        clock.stamp(),
        plan.release,
        plan.checklist.len()
    );
    for item in plan.checklist.iter().filter(|i| !i.ok) {
        println!("  {}   ✗ {}: {}", clock.stamp(), item.name, item.detail);
    }
    let counts = |m: &BTreeMap<String, u32>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for wave in &plan.waves {
        println!(
            "  {}   {:<30} {:>2} devices  types: {}  regions: {}",
            clock.stamp(),
            wave.name,
            wave.devices.len(),
            counts(&wave.by_type),
            counts(&wave.by_region)
        );
    }
    println!(
        "  {}   (the losing arm's devices join the winner's wave 1)",
        clock.stamp()
    );
    for (id, why) in &plan.excluded {
        println!("  {}   not now: {id}: {why}", clock.stamp());
    }
    match ask(link, Command::StartAb { a, b }).await? {
        ReplyBody::Started(s) => {
            println!(
                "  {} started rollout {}: `fleetctl rollout start a.toml --versus b.toml`",
                clock.stamp(),
                s.rollout
            );
            Ok(s.rollout)
        }
        _ => bail!("the coordinator answered a start request with something else"),
    }
}

/// `fleet-sim demo --strategy ab`: demo-app 2.1.0 (arm A) and 2.0.0 (arm B, 3 % of its work
/// fails) on two disjoint arms dealt pairwise from each hardware type and region, observed
/// side by side; the report compares them, the operator promotes A, and A rolls out by
/// canary-rolling waves to every other device, arm B's included. Nothing is installed before:
/// the arms are each device's first install.
async fn ab(site: &mut Site, app: &std::path::Path, layout: &Layout) -> anyhow::Result<()> {
    let clock = Clock(Instant::now());
    let total = site.devices.len();
    let mut link = open(site, layout, &clock).await?;
    let work = site.dir.join("build");
    std::fs::create_dir_all(&work)?;
    // Design: A carries the higher counter. An agent never accepts a counter below one it
    // accepted, so only the arm with the higher counter can take over the other arm's devices
    // when it is promoted (ARCHITECTURE.md, "Deviations").
    let arm = |version: &str, counter: u64| Spec {
        strategy: "ab",
        ab: Some((AB_PERCENT, OBSERVATION)),
        ..Spec::new(version, counter)
    };
    let a = arm("2.1.0", 2);
    let b = Spec {
        // The regression the comparison should reveal: 3 % of its work fails, below the
        // error-rate trigger (+5 pts), so only the side-by-side comparison shows it.
        faults: ["--error-rate", "0.03"].map(str::to_owned).to_vec(),
        ..arm("2.0.0", 1)
    };
    println!(
        "  {} building and signing demo-app {} (#{}) for arm A and {} (#{}, 3 % of its work fails) for arm B (strategy ab)",
        clock.stamp(),
        a.version,
        a.counter,
        b.version,
        b.counter
    );
    println!(
        "  A has the higher counter: agents never accept a lower one, so only A can take over B's devices"
    );
    let mut built = Vec::new();
    for spec in [&a, &b] {
        let (release, _) = releases::build(
            spec,
            app,
            &work,
            &site.artifacts,
            site.http,
            &site.key,
            now(),
        )?;
        built.push(release);
    }
    let [release_a, release_b]: [SignedRelease; 2] = built
        .try_into()
        .map_err(|_| anyhow::anyhow!("two releases were built"))?;

    println!(
        "\n== 1. A/B: demo-app {} (arm A) against {} (arm B), {AB_PERCENT} % of the fleet each, observed for {OBSERVATION}",
        a.version, b.version
    );
    let rollout = start_ab(&mut link, &clock, release_a, release_b).await?;
    let observed = follow_until(&mut link, &clock, &rollout, Duration::from_secs(180), |s| {
        s.status == RolloutStatus::AwaitingApproval
    })
    .await?;
    if observed.status != RolloutStatus::AwaitingApproval {
        bail!(
            "the A/B rollout ended {} instead of awaiting a promotion: {}",
            observed.status,
            observed.last_action
        );
    }
    for arm in &observed.arms {
        println!(
            "  {}   arm {}: {} on {} devices, {} healthy, {} failed, {}",
            clock.stamp(),
            arm.arm,
            arm.release,
            arm.devices,
            arm.healthy,
            arm.failed,
            arm.status
        );
    }

    println!("\n== 2. the arms side by side: fleetctl report {rollout}\n");
    let report = match ask(
        &mut link,
        Command::Report {
            rollout: rollout.clone(),
        },
    )
    .await?
    {
        ReplyBody::Report(r) => r,
        _ => bail!("the coordinator answered a report request with something else"),
    };
    // The comparison is the report's last section.
    let table = report
        .markdown
        .find("## A/B arms")
        .map_or(report.markdown.as_str(), |at| &report.markdown[at..]);
    println!("{}", table.trim_end());
    let arms = report
        .ab
        .as_ref()
        .context("the report of an A/B rollout compares its arms")?;
    let rate = |arm: Arm| {
        arms.arms
            .iter()
            .find(|x| x.arm == arm)
            .and_then(|x| x.error_rate)
            .map(|e| e.value * 100.0)
    };
    let (Some(rate_a), Some(rate_b)) = (rate(Arm::A), rate(Arm::B)) else {
        bail!("an arm reported no error rate during its observation");
    };
    if rate_b <= rate_a {
        bail!("arm B's error rate ({rate_b:.2} %) is not above arm A's ({rate_a:.2} %)");
    }
    println!(
        "\n  {} arm B fails {rate_b:.2} % of its work, arm A {rate_a:.2} %: the operator promotes A",
        clock.stamp()
    );

    println!("\n== 3. promote arm A: fleetctl rollout promote {rollout} A");
    ask(
        &mut link,
        Command::Promote {
            rollout: rollout.clone(),
            arm: Arm::A,
        },
    )
    .await?;
    let end = follow(&mut link, &clock, &rollout, Duration::from_secs(240)).await?;
    if end.status != RolloutStatus::Completed {
        bail!(
            "arm A's rollout ended {} instead of completed: {}",
            end.status,
            end.last_action
        );
    }
    wait_devices(
        &mut link,
        Duration::from_secs(60),
        "every device on arm A's release",
        |d| {
            d.len() == total
                && d.iter()
                    .all(|d| d.active.as_ref().is_some_and(|x| x.version == a.version))
        },
    )
    .await?;
    println!(
        "  {} completed: fleet: {}",
        clock.stamp(),
        show_versions(&devices(&mut link).await?)
    );

    epilogue(link, &[&rollout]).await
}

/// Both deployment reports, the last rollout's state block and an audit summary.
async fn epilogue(mut link: Link, rollouts: &[&RolloutId]) -> anyhow::Result<()> {
    for rollout in rollouts {
        match ask(
            &mut link,
            Command::Report {
                rollout: (*rollout).clone(),
            },
        )
        .await?
        {
            ReplyBody::Report(report) => {
                println!("\n== Fleet Deployment Report: {rollout}\n");
                println!("{}", report.markdown.trim_end());
            }
            _ => bail!("the coordinator answered a report request with something else"),
        }
    }
    let last = rollouts
        .last()
        .context("the demo has at least one rollout")?;
    println!("\n== state block: fleetctl rollout status {last}\n");
    print!("{}", state(&mut link, last).await?.render_block());

    let audit = match ask(
        &mut link,
        Command::Audit(AuditQuery {
            limit: Some(100_000),
            ..AuditQuery::default()
        }),
    )
    .await?
    {
        ReplyBody::Audit(a) => a,
        _ => bail!("the coordinator answered an audit query with something else"),
    };
    let mut by_actor: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in &audit {
        let who = match e.actor {
            fleet_proto::operator::ActorKind::Device => "device".to_owned(),
            _ => e.actor_name.clone(),
        };
        *by_actor.entry((who, e.action.clone())).or_default() += 1;
    }
    println!("\n== audit: {} entries (fleetctl audit)\n", audit.len());
    for ((who, action), n) in &by_actor {
        println!("  {n:>4} × {who:<16} {action}");
    }
    link.disconnect().await;
    Ok(())
}

/// Processes whose executable lives under `dir`: applications the demo failed to stop.
fn processes_under(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(dir).then_some(pid)
        })
        .collect()
}
