//! Where fleetctl connects and who it says it is: flags, then `FLEET_…` variables, then
//! `~/.config/fleet/fleetctl.toml`, then defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
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

/// Parses `mqtt://host:port`, `host:port` or `host` (port 1883).
pub fn parse_broker(url: &str) -> anyhow::Result<Broker> {
    let rest = match url.split_once("://") {
        Some(("mqtt", rest)) => rest,
        Some((scheme, _)) => bail!(
            "broker URL {url:?}: scheme {scheme}:// is not supported by this build; use mqtt://host:port"
        ),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .with_context(|| format!("broker URL {url:?}: port {port:?} is not a number"))?,
        ),
        None => (rest, 1883),
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
    let file = load_file(&flags)?;
    let broker = flags
        .broker
        .or(file.broker)
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".to_owned());
    let timeout = match flags.timeout.or(file.timeout) {
        None => Duration::from_secs(10),
        Some(t) => humantime::parse_duration(&t)
            .with_context(|| format!("timeout {t:?} is not a duration such as 10s"))?,
    };
    Ok(Settings {
        broker: parse_broker(&broker)?,
        username: flags.username.or(file.username),
        password: flags.password.or(file.password),
        operator: flags.operator.or(file.operator).unwrap_or_else(login_name),
        timeout,
    })
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
            Err("broker URL \"ws://x:1\": scheme ws:// is not supported by this build; use mqtt://host:port".into())
        );
        assert_eq!(
            b("mqtt://:1883"),
            Err("broker URL \"mqtt://:1883\" has no host".into())
        );
    }
}
