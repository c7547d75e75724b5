//! fleetctl: the operator's command line for fleet.
//!
//! Every rollout command is one MQTT request to the coordinator (`rollouts/commands`) and one
//! reply (`rollouts/replies/{request_id}`); signing, key generation and packing are local.
//!
//! # Layout
//! - `cli`: the commands and flags (clap).
//! - `keys`, `sign`: key pairs, manifest signing and verification.
//! - the library (`fleetctl::…`): the MQTT link, settings, watch, rendering, exit statuses.

mod cli;
mod keys;
mod rotation;
mod sign;

use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory as _, Parser as _};
use fleet_proto::UnixMillis;
use fleet_proto::operator::{AuditQuery, Command, ReplyBody};
use fleet_proto::rollout::RolloutStatus;
use serde::Serialize;

use cli::{ArtifactCmd, Cli, Cmd, DeviceCmd, KeyCmd, ManifestCmd, RolloutCmd};
use fleetctl::exit::{Exit, Failure};
use fleetctl::link::{Answer, Link};
use fleetctl::{pack, refused, render, settings, watch};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(Exit::Error as u8);
        }
    };
    let exit = match runtime.block_on(run(cli)) {
        Ok(exit) => exit,
        Err(err) => {
            if let Some(f) = err.downcast_ref::<Failure>() {
                eprintln!("error: {}", f.message);
                if let Some(hint) = &f.hint {
                    eprintln!("hint: {hint}");
                }
                f.exit
            } else {
                eprintln!("error: {err:#}");
                Exit::Error
            }
        }
    };
    ExitCode::from(exit as u8)
}

fn now() -> UnixMillis {
    UnixMillis::from_system(SystemTime::now())
}

fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn unexpected(what: &str) -> anyhow::Error {
    Failure::new(
        Exit::Error,
        format!("the coordinator answered {what} with something else"),
    )
    .hint("fleetctl and fleet-coordinator may be different versions")
    .into()
}

async fn connect(cli: &cli::Global) -> anyhow::Result<Link> {
    let (settings, secure) = settings::resolve_all(settings::Flags {
        broker: cli.broker.clone(),
        username: cli.username.clone(),
        password: cli.password.clone(),
        operator: cli.operator.clone(),
        timeout: cli.timeout.clone(),
        config: cli.config.clone(),
        ca: cli.ca.clone(),
        client_cert: cli.client_cert.clone(),
        client_key: cli.client_key.clone(),
        operator_key: cli.operator_key.clone(),
    })?;
    Ok(Link::connect_with(&settings, &secure).await?)
}

/// Sends one command; a refusal becomes a failure (and is printed as JSON too with `--json`).
async fn ask(link: &mut Link, command: Command, json: bool) -> anyhow::Result<ReplyBody> {
    match link.request(command).await? {
        Answer::Accepted(body) => Ok(body),
        Answer::Refused(r) => {
            if json {
                print_json(&r)?;
            }
            Err(refused(r).into())
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Cmd::Keygen { out, name } => {
            let pair = keys::generate(&out, &name)?;
            println!(
                "wrote {} (secret: keep it off the coordinator and the devices)",
                pair.secret.display()
            );
            println!(
                "wrote {} ({})",
                pair.public.display(),
                keys::describe(&pair.key)
            );
            println!(
                "pin the public key in each agent's config: [trust] keys = [\"{}\"]",
                hex::encode(pair.key.to_bytes())
            );
            Ok(Exit::Ok)
        }
        Cmd::Manifest(ManifestCmd::Sign {
            manifest,
            key,
            out,
            allow_counter_jump,
        }) => {
            let key = keys::load_signing_key(&key)?;
            let signed = sign::sign(&manifest, &key, now(), allow_counter_jump)?;
            let out = out.unwrap_or_else(|| sign::signed_path(&manifest));
            std::fs::write(&out, signed.to_json() + "\n")
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            let release = signed.decode_unverified().map_err(anyhow::Error::msg)?;
            println!(
                "signed {} with key {} → {}",
                release.label(),
                signed.key_id,
                out.display()
            );
            println!("release digest {}", signed.digest());
            Ok(Exit::Ok)
        }
        Cmd::Key(KeyCmd::Rotate {
            epoch,
            to,
            sign,
            out,
            pinned,
        }) => {
            let signed = rotation::rotate(epoch, &to, &sign, &pinned, now())?;
            let out = out.unwrap_or_else(|| format!("rotation-{epoch}.json").into());
            std::fs::write(&out, signed.to_json() + "\n")
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
            print!("{}", rotation::describe(&signed)?);
            println!(
                "wrote {}; send it with `fleetctl key publish {}`",
                out.display(),
                out.display()
            );
            Ok(Exit::Ok)
        }
        Cmd::Key(KeyCmd::Show { rotation: path }) => {
            print!("{}", rotation::describe(&rotation::read(&path)?)?);
            Ok(Exit::Ok)
        }
        Cmd::Key(KeyCmd::Publish { rotation: path }) => {
            let signed = rotation::read(&path)?;
            let mut link = connect(&cli.global).await?;
            let body = ask(&mut link, Command::RotateKeys { rotation: signed }, false).await?;
            link.disconnect().await;
            match body {
                ReplyBody::Done { message } => println!("{message}"),
                _ => return Err(unexpected("a key rotation")),
            }
            Ok(Exit::Ok)
        }
        Cmd::Manifest(ManifestCmd::Verify { release, public }) => {
            let keys = public
                .iter()
                .map(|p| keys::load_public_key(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let signed = sign::read_signed(&release)?;
            let r = sign::verify(&signed, &keys)?;
            println!("ok: {} signed by key {}", r.label(), signed.key_id);
            println!("digest     {}", signed.digest());
            println!("valid      {} → {}", r.not_before, r.expires);
            println!("hardware   {}", r.hardware.join(", "));
            let arches: Vec<String> = r.artifacts.keys().map(ToString::to_string).collect();
            println!("artifacts  {}", arches.join(", "));
            if let Some(to) = &r.rollback_to {
                println!("rollback   may return to {} (#{})", to.version, to.counter);
            }
            Ok(Exit::Ok)
        }
        Cmd::Artifact(ArtifactCmd::Pack {
            dir,
            name,
            version,
            arch,
            out,
            url,
        }) => {
            let out = out.unwrap_or_else(|| format!("{name}-{version}-{arch}.tar.gz").into());
            let packed = pack::pack(&dir, &out)?;
            let url = match url {
                Some(u) => u,
                None => format!(
                    "file://{}",
                    std::fs::canonicalize(&out)
                        .map_err(|e| anyhow::anyhow!("cannot resolve {}: {e}", out.display()))?
                        .display()
                ),
            };
            eprintln!("packed {} ({} bytes)", packed.path.display(), packed.size);
            print!("{}", pack::stanza(arch, &url, &packed));
            Ok(Exit::Ok)
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "fleetctl",
                &mut std::io::stdout(),
            );
            Ok(Exit::Ok)
        }
        Cmd::Devices {
            json,
            device_type,
            region,
            status,
            version,
        } => {
            let mut link = connect(&cli.global).await?;
            let body = ask(&mut link, Command::ListDevices, json).await?;
            link.disconnect().await;
            let ReplyBody::Devices(mut devices) = body else {
                return Err(unexpected("a device listing"));
            };
            devices.retain(|d| {
                let facts = d.facts.as_ref();
                device_type
                    .as_ref()
                    .is_none_or(|t| facts.is_some_and(|f| &f.device_type == t))
                    && region
                        .as_ref()
                        .is_none_or(|r| facts.is_some_and(|f| &f.region == r))
                    && status.as_ref().is_none_or(|s| {
                        serde_json::to_value(d.status).is_ok_and(|v| v.as_str() == Some(s.as_str()))
                    })
                    && version
                        .as_ref()
                        .is_none_or(|v| d.active.as_ref().is_some_and(|a| &a.version == v))
            });
            if json {
                print_json(&devices)?;
            } else {
                print!("{}", render::devices(&devices, now()));
            }
            Ok(Exit::Ok)
        }
        Cmd::Device(cmd) => {
            let mut link = connect(&cli.global).await?;
            let (command, json) = match cmd {
                DeviceCmd::Show { device, json } => (Command::ShowDevice { device }, json),
                DeviceCmd::Quarantine { device, reason } => {
                    (Command::Quarantine { device, reason }, false)
                }
                DeviceCmd::Release { device } => (Command::ReleaseDevice { device }, false),
            };
            let body = ask(&mut link, command, json).await?;
            link.disconnect().await;
            match body {
                ReplyBody::Device(d) if json => print_json(&d)?,
                ReplyBody::Device(d) => print!("{}", render::device(&d, now())),
                ReplyBody::Done { message } => println!("{message}"),
                _ => return Err(unexpected("a device command")),
            }
            Ok(Exit::Ok)
        }
        Cmd::Plan {
            manifest,
            versus,
            json,
        } => {
            let release = sign::for_rollout(&manifest)?;
            let command = match versus {
                Some(b) => Command::PlanAb {
                    a: release,
                    b: sign::for_rollout(&b)?,
                },
                None => Command::Plan { release },
            };
            let mut link = connect(&cli.global).await?;
            let body = ask(&mut link, command, json).await?;
            link.disconnect().await;
            let ReplyBody::Plan(plan) = body else {
                return Err(unexpected("a plan request"));
            };
            if json {
                print_json(&plan)?;
            } else {
                print!("{}", render::plan(&plan));
            }
            Ok(if plan.checklist.iter().all(|i| i.ok) {
                Exit::Ok
            } else {
                Exit::Refused
            })
        }
        Cmd::Rollout(cmd) => rollout(&cli.global, cmd).await,
        Cmd::Report { rollout, json } => {
            let mut link = connect(&cli.global).await?;
            let body = ask(&mut link, Command::Report { rollout }, json).await?;
            link.disconnect().await;
            let ReplyBody::Report(report) = body else {
                return Err(unexpected("a report request"));
            };
            if json {
                print_json(&report)?;
            } else {
                print!("{}", report.markdown);
            }
            Ok(Exit::Ok)
        }
        Cmd::Audit {
            device,
            rollout,
            since,
            limit,
            json,
        } => {
            let since = match since {
                None => None,
                Some(text) => Some(parse_since(&text, now())?),
            };
            let mut link = connect(&cli.global).await?;
            let query = AuditQuery {
                device,
                rollout,
                since,
                limit,
            };
            let body = ask(&mut link, Command::Audit(query), json).await?;
            link.disconnect().await;
            let ReplyBody::Audit(entries) = body else {
                return Err(unexpected("an audit query"));
            };
            if json {
                print_json(&entries)?;
            } else {
                print!("{}", render::audit(&entries));
            }
            Ok(Exit::Ok)
        }
    }
}

/// `--since`: an RFC 3339 time, or a duration back from now.
fn parse_since(text: &str, now: UnixMillis) -> anyhow::Result<UnixMillis> {
    if let Ok(t) = UnixMillis::parse_rfc3339(text) {
        return Ok(t);
    }
    humantime::parse_duration(text)
        .map(|d| now.saturating_sub(d))
        .map_err(|_| {
            anyhow::anyhow!(
                "--since {text:?} is neither an RFC 3339 time nor a duration such as 2h"
            )
        })
}

/// How a finished rollout maps to an exit status, with what to say about it.
fn outcome(state: &fleet_proto::rollout::RolloutState) -> anyhow::Result<Exit> {
    let id = &state.rollout;
    match state.status {
        RolloutStatus::Completed => {
            println!(
                "rollout {id} completed: {} of {} deployed, {} skipped, {} quarantined",
                state.deployed_count,
                state.fleet_total,
                state.skipped_count,
                state.quarantined_count
            );
            Ok(Exit::Ok)
        }
        RolloutStatus::Halted | RolloutStatus::RolledBack => {
            let mut message = format!("rollout {id} {}: {}", state.status, state.last_action);
            if !state.blockers.is_empty() {
                message.push_str(&format!(" ({})", state.blockers.join("; ")));
            }
            Err(Failure {
                exit: Exit::RolledBack,
                message,
                hint: Some(format!("`fleetctl report {id}` shows the failure pattern")),
            }
            .into())
        }
        RolloutStatus::Aborted => Err(Failure::new(
            Exit::Aborted,
            format!("rollout {id} was aborted: {}", state.last_action),
        )
        .into()),
        _ => Ok(Exit::Ok),
    }
}

async fn rollout(global: &cli::Global, cmd: RolloutCmd) -> anyhow::Result<Exit> {
    // Read and check the manifest before touching the network.
    let start = match &cmd {
        RolloutCmd::Start {
            manifest, versus, ..
        } => Some((
            sign::for_rollout(manifest)?,
            versus.as_deref().map(sign::for_rollout).transpose()?,
        )),
        _ => None,
    };
    let mut link = connect(global).await?;
    let tty = std::io::stdout().is_terminal();
    let result = match cmd {
        RolloutCmd::Start { json, watch, .. } => {
            let (release, versus) = start.expect("read above for Start");
            let command = match versus {
                Some(b) => Command::StartAb { a: release, b },
                None => Command::Start { release },
            };
            let body = ask(&mut link, command, json).await?;
            let ReplyBody::Started(state) = body else {
                return Err(unexpected("a start request"));
            };
            if json {
                print_json(&state)?;
            } else {
                println!("started rollout {} of {}", state.rollout, state.artifact);
                print!("{}", state.render_block());
            }
            if watch {
                let end =
                    watch::watch(&mut link, &state.rollout, tty, Duration::from_secs(5)).await?;
                outcome(&end)
            } else {
                Ok(Exit::Ok)
            }
        }
        RolloutCmd::Approve { rollout } => done(&mut link, Command::Approve { rollout }).await,
        RolloutCmd::Promote { rollout, arm } => {
            done(&mut link, Command::Promote { rollout, arm }).await
        }
        RolloutCmd::Pause { rollout } => done(&mut link, Command::Pause { rollout }).await,
        RolloutCmd::Resume { rollout } => done(&mut link, Command::Resume { rollout }).await,
        RolloutCmd::Abort { rollout } => done(&mut link, Command::Abort { rollout }).await,
        RolloutCmd::Rollback { rollout } => done(&mut link, Command::Rollback { rollout }).await,
        RolloutCmd::Status { rollout, json } => {
            let body = ask(&mut link, Command::Status { rollout }, json).await?;
            let ReplyBody::State(state) = body else {
                return Err(unexpected("a status request"));
            };
            if json {
                print_json(&state)?;
            } else {
                print!("{}", state.render_block());
            }
            Ok(Exit::Ok)
        }
        RolloutCmd::List { json } => {
            let body = ask(&mut link, Command::ListRollouts, json).await?;
            let ReplyBody::Rollouts(states) = body else {
                return Err(unexpected("a rollout listing"));
            };
            if json {
                print_json(&states)?;
            } else {
                print!("{}", render::rollouts(&states));
            }
            Ok(Exit::Ok)
        }
        RolloutCmd::Watch { rollout } => {
            let end = watch::watch(&mut link, &rollout, tty, Duration::from_secs(5)).await?;
            outcome(&end)
        }
    };
    link.disconnect().await;
    result
}

/// A command that changes something: print what the coordinator says it did.
async fn done(link: &mut Link, command: Command) -> anyhow::Result<Exit> {
    match ask(link, command, false).await? {
        ReplyBody::Done { message } => println!("{message}"),
        ReplyBody::State(state) | ReplyBody::Started(state) => {
            println!("{}", state.last_action);
            print!("{}", state.render_block());
        }
        _ => return Err(unexpected("a rollout command")),
    }
    Ok(Exit::Ok)
}
