//! Where fleetctl connects and who it says it is: flags, then `FLEET_…` variables, then
//! `~/.config/fleet/fleetctl.toml`, then defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use fleet_proto::SigningKey;
use serde::Deserialize;

/// The optional config file; every key mirrors a global flag.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub broker: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub operator: Option<String>,
    pub timeout: Option<String>,
    /// The CA that signed the broker's certificate (PEM), for `mqtts://`.
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), when the broker requires one.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// The operator's ed25519 signing key (`fleetctl keygen --name NAME`): signs every request.
    pub operator_key: Option<PathBuf>,
}

/// The resolved connection settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub broker: Broker,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Recorded in the coordinator's audit trail.
    pub operator: String,
    /// How long to wait for the broker and for each reply.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// TLS and the operator's identity: what `--ca`, `--client-cert`/`--client-key` and
/// `--operator-key` say. Kept apart from [`Settings`] so that code building a `Settings` by
/// hand (fleet-sim) is unaffected.
#[derive(Clone, Default)]
pub struct Secure {
    /// `mqtts://`: the pinned CA and an optional client certificate.
    pub tls: Option<Tls>,
    /// Signs every request; the coordinator's `[operators] keys` must list it under `--as`.
    pub operator_key: Option<SigningKey>,
}

impl std::fmt::Debug for Secure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secure")
            .field("tls", &self.tls)
            .field("operator_key", &self.operator_key.is_some())
            .finish()
    }
}

/// A TLS client: the one CA it trusts (never the system roots), and its certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub ca: PathBuf,
    /// `(certificate, key)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Whether a broker URL asks for TLS (`mqtts://`).
pub fn wants_tls(url: &str) -> bool {
    url.starts_with("mqtts://")
}

/// Parses `mqtt://host:port`, `mqtts://host:port` (TLS, port 8883 by default), `host:port` or
/// `host` (port 1883).
pub fn parse_broker(url: &str) -> anyhow::Result<Broker> {
    let (rest, default_port) = match url.split_once("://") {
        Some(("mqtt", rest)) => (rest, 1883),
        Some(("mqtts", rest)) => (rest, 8883),
        Some((scheme, _)) => bail!(
            "broker URL {url:?}: scheme {scheme}:// is not supported by this build; use mqtt://host:port or mqtts://host:port"
        ),
        None => (url, 1883),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("broker URL {url:?}: port {port:?} is not a number"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() {
        bail!("broker URL {url:?} has no host");
    }
    Ok(Broker {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned(),
        port,
    })
}

/// What the global flags (already merged with their environment variables) said.
#[derive(Debug, Default)]
pub struct Flags {
    pub broker: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub operator: Option<String>,
    pub timeout: Option<String>,
    pub config: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub operator_key: Option<PathBuf>,
}

pub fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(Path::new(&dir).join("fleet/fleetctl.toml"));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".config/fleet/fleetctl.toml"))
}

fn load_file(flags: &Flags) -> anyhow::Result<File> {
    let (path, explicit) = match &flags.config {
        Some(p) => (p.clone(), true),
        None => match default_config_path() {
            Some(p) => (p, false),
            None => return Ok(File::default()),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .with_context(|| format!("invalid fleetctl config {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(File::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read fleetctl config {}", path.display())),
    }
}

/// The operator's login name, for the audit trail when `--as` is not given.
fn login_name() -> String {
    ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "operator".to_owned())
}

pub fn resolve(flags: Flags) -> anyhow::Result<Settings> {
    resolve_all(flags).map(|(settings, _)| settings)
}

/// The connection settings and the TLS/identity ones, from the same flags and file.
pub fn resolve_all(flags: Flags) -> anyhow::Result<(Settings, Secure)> {
    let file = load_file(&flags)?;
    let ca = flags.ca.clone().or(file.ca.clone());
    let cert = flags.client_cert.clone().or(file.client_cert.clone());
    let key = flags.client_key.clone().or(file.client_key.clone());
    let operator_key = match flags.operator_key.clone().or(file.operator_key.clone()) {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read operator key {}", p.display()))?;
            Some(
                fleet_proto::release::parse_signing_key(&text)
                    .map_err(|e| anyhow::anyhow!("operator key {}: {e}", p.display()))?,
            )
        }
    };
    let client_cert = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("--client-cert and --client-key go together: give both or neither"),
    };
    let broker = flags
        .broker
        .or(file.broker)
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_owned());
    let timeout = match flags.timeout.or(file.timeout) {
        None => Duration::from_secs(10),
        Some(t) => humantime::parse_duration(&t)
            .with_context(|| format!("timeout {t:?} is not a duration such as 10s"))?,
    };
    let tls = if wants_tls(&broker) {
        let Some(ca) = ca else {
            bail!(
                "broker URL {broker:?} is mqtts:// but no --ca (FLEET_CA) names the CA that signed the broker's certificate; system roots are never trusted"
            );
        };
        Some(Tls { ca, client_cert })
    } else {
        None
    };
    Ok((
        Settings {
            broker: parse_broker(&broker)?,
            username: flags.username.or(file.username),
            password: flags.password.or(file.password),
            operator: flags.operator.or(file.operator).unwrap_or_else(login_name),
            timeout,
        },
        Secure { tls, operator_key },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b = |s| {
            parse_broker(s)
                .map(|b| b.to_string())
                .map_err(|e| e.to_string())
        };
        assert_eq!(b("mqtt://10.0.0.2:1884"), Ok("mqtt://10.0.0.2:1884".into()));
        assert_eq!(b("gateway.local"), Ok("mqtt://gateway.local:1883".into()));
        assert_eq!(b("127.0.0.1:9"), Ok("mqtt://127.0.0.1:9".into()));
        assert_eq!(
            b("ws://x:1"),
            Err("broker URL \"ws://x:1\": scheme ws:// is not supported by this build; use mqtt://host:port or mqtts://host:port".into())
        );
        assert_eq!(b("mqtts://gw"), Ok("mqtt://gw:8883".into()));
        assert!(wants_tls("mqtts://gw") && !wants_tls("mqtt://gw"));
        assert_eq!(
            b("mqtt://:1883"),
            Err("broker URL \"mqtt://:1883\" has no host".into())
        );
    }
}
