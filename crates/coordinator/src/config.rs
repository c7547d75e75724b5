//! Configuration: a TOML file (optional) plus `FLEET_COORDINATOR__SECTION__KEY` environment
//! overrides, validated into typed values. `deploy/coordinator.toml` is the commented default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_proto::VerifyingKey;
use serde::Deserialize;

use crate::engine::Settings;
use crate::gate::GateSettings;

/// The commented default configuration, as shipped in `deploy/`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../deploy/coordinator.toml");

/// Environment prefix of overrides, e.g. `FLEET_COORDINATOR__HTTP__LISTEN`.
pub const ENV_PREFIX: &str = "FLEET_COORDINATOR";

/// Why the configuration cannot be used. Names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {file}: {detail}")]
    Load { file: String, detail: String },
    #[error("configuration {file}: key {key}: {detail}")]
    Invalid {
        file: String,
        key: String,
        detail: String,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    release_keys: Vec<String>,
    broker: RawBroker,
    database: RawDatabase,
    http: RawHttp,
    devices: RawDevices,
    rollout: RawRollout,
    gate: GateSettingsRaw,
    operators: RawOperators,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperators {
    keys: BTreeMap<String, String>,
    max_age: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    mode: String,
    listen: String,
    url: String,
    username: String,
    password: String,
    client_id: String,
    max_connections: usize,
    tls_cert: String,
    tls_key: String,
    client_ca: String,
    credentials: String,
    ca: String,
    client_cert: String,
    client_key: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatabase {
    path: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: String,
    artifacts_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevices {
    heartbeat_interval: String,
    offline_after_intervals: u32,
    fast_report_interval: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    install_timeout: String,
    silent_after_intervals: u32,
    tick: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GateSettingsRaw {
    min_samples: u64,
    min_fail_samples: u64,
    min_control_samples: u64,
    z: f64,
    trend_fraction: f64,
    ewma_alpha: f64,
    max_extensions: u32,
    p95_floor_ms: f64,
    max_requests_per_sample: f64,
}

/// Where the MQTT broker is.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerConfig {
    /// rumqttd in this process. Port 0 picks a free port (reported by [`crate::Running`]).
    Embedded {
        listen: SocketAddr,
        max_connections: usize,
        /// Serve TLS (`broker.tls_cert`, `tls_key`, `client_ca`).
        tls: Option<ServerTls>,
        /// Check every connection against this credentials file and confine each client to
        /// its topics (`broker.credentials`; see `auth.rs`).
        credentials: Option<PathBuf>,
    },
    /// An external broker such as mosquitto.
    External {
        host: String,
        port: u16,
        username: Option<String>,
        password: Option<String>,
        /// `mqtts://`: TLS with a pinned CA (`broker.ca`) and an optional client certificate.
        tls: Option<ClientTls>,
    },
}

/// The embedded broker's TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate issued by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// A TLS client: the one CA it trusts, and its own certificate if the broker asks for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    /// `(certificate, key)`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub broker: BrokerConfig,
    pub client_id: String,
    pub release_keys: Vec<VerifyingKey>,
    pub database: PathBuf,
    pub http_listen: SocketAddr,
    pub artifacts_dir: PathBuf,
    pub heartbeat_interval: Duration,
    /// A device silent this long is marked offline.
    pub offline_after: Duration,
    pub tick: Duration,
    pub engine: Settings,
    /// Operators whose signed commands are obeyed, by name (empty: commands unauthenticated).
    pub operators: BTreeMap<String, VerifyingKey>,
    /// A signed command must be this fresh; request ids are remembered this long.
    pub operators_max_age: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config::from_sources(None, std::iter::empty())
            .expect("the embedded default configuration is valid")
    }
}

fn duration(file: &str, key: &str, text: &str) -> Result<Duration, ConfigError> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err(invalid(file, key, "must be longer than zero")),
        Err(e) => Err(invalid(
            file,
            key,
            &format!("{text:?} is not a duration such as \"10s\" or \"15m\" ({e})"),
        )),
    }
}

fn invalid(file: &str, key: &str, detail: &str) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_owned(),
        key: key.to_owned(),
        detail: detail.to_owned(),
    }
}

/// Parses a public key from 64 hex digits or base64.
pub fn parse_key(text: &str) -> Result<VerifyingKey, String> {
    use base64::Engine as _;
    let text = text.trim();
    let bytes = if text.len() == 64 {
        hex::decode(text).map_err(|e| format!("not hex: {e}"))?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("neither 64 hex digits nor base64: {e}"))?
    };
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "an ed25519 public key is 32 bytes".to_owned())?;
    VerifyingKey::from_bytes(&arr).map_err(|e| format!("not an ed25519 public key: {e}"))
}

impl Config {
    /// Loads the file (if any) over the defaults, then the environment over both.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::from_sources(file, std::env::vars())
    }

    /// Like [`Config::load`], with the environment given explicitly (tests).
    pub fn from_sources(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let name = file.map_or_else(
            || "(defaults and environment)".to_owned(),
            |p| p.display().to_string(),
        );
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}__")))
            .collect();
        let mut b = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some(p) = file {
            if !p.exists() {
                return Err(ConfigError::Load {
                    file: name,
                    detail: "no such file".into(),
                });
            }
            b = b.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("release_keys")
                .try_parsing(true)
                .source(Some(env)),
        );
        let raw: Raw =
            b.build()
                .and_then(|c| c.try_deserialize())
                .map_err(|e| ConfigError::Load {
                    file: name.clone(),
                    detail: e.to_string(),
                })?;
        Config::validate(&name, raw)
    }

    fn validate(file: &str, raw: Raw) -> Result<Config, ConfigError> {
        let path = |s: &str| (!s.trim().is_empty()).then(|| PathBuf::from(s.trim()));
        let b = &raw.broker;
        let pair = |a: &str, ka: &str, bb: &str, kb: &str| match (path(a), path(bb)) {
            (Some(x), Some(y)) => Ok(Some((x, y))),
            (None, None) => Ok(None),
            _ => Err(invalid(
                file,
                &format!("broker.{ka}"),
                &format!("broker.{ka} and broker.{kb} go together: set both or neither"),
            )),
        };
        let server_pair = pair(&b.tls_cert, "tls_cert", &b.tls_key, "tls_key")?;
        let client_pair = pair(&b.client_cert, "client_cert", &b.client_key, "client_key")?;
        let broker = match raw.broker.mode.as_str() {
            "embedded" => {
                if server_pair.is_none() && path(&b.client_ca).is_some() {
                    return Err(invalid(
                        file,
                        "broker.client_ca",
                        "client certificates need TLS: set broker.tls_cert and broker.tls_key too",
                    ));
                }
                BrokerConfig::Embedded {
                    listen: raw.broker.listen.parse().map_err(|e| {
                        invalid(
                            file,
                            "broker.listen",
                            &format!(
                                "{:?} is not an address such as 127.0.0.1:1883 ({e})",
                                raw.broker.listen
                            ),
                        )
                    })?,
                    max_connections: raw.broker.max_connections.max(1),
                    tls: server_pair.map(|(cert, key)| ServerTls {
                        cert,
                        key,
                        client_ca: path(&b.client_ca),
                    }),
                    credentials: path(&b.credentials),
                }
            }
            "external" => {
                let url = raw.broker.url.trim();
                let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
                    (r, None, 1883)
                } else if let Some(r) = url.strip_prefix("mqtts://") {
                    let Some(ca) = path(&b.ca) else {
                        return Err(invalid(
                            file,
                            "broker.ca",
                            "mqtts:// needs the CA that signed the broker's certificate (PEM); system roots are never trusted",
                        ));
                    };
                    (
                        r,
                        Some(ClientTls {
                            ca,
                            client_cert: client_pair.clone(),
                        }),
                        8883,
                    )
                } else {
                    return Err(invalid(
                        file,
                        "broker.url",
                        &format!("{url:?} must look like mqtt://host:port or mqtts://host:port"),
                    ));
                };
                let rest = rest.trim_end_matches('/');
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) => (
                        h.to_owned(),
                        p.parse::<u16>().map_err(|e| {
                            invalid(file, "broker.url", &format!("port {p:?}: {e}"))
                        })?,
                    ),
                    None => (rest.to_owned(), default_port),
                };
                if host.is_empty() {
                    return Err(invalid(file, "broker.url", "no host"));
                }
                let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
                BrokerConfig::External {
                    host,
                    port,
                    username: opt(&raw.broker.username),
                    password: opt(&raw.broker.password),
                    tls,
                }
            }
            other => {
                return Err(invalid(
                    file,
                    "broker.mode",
                    &format!("{other:?} must be \"embedded\" or \"external\""),
                ));
            }
        };
        if raw.broker.client_id.is_empty() {
            return Err(invalid(file, "broker.client_id", "must not be empty"));
        }
        let mut release_keys = Vec::new();
        for (i, k) in raw.release_keys.iter().enumerate() {
            release_keys
                .push(parse_key(k).map_err(|e| invalid(file, &format!("release_keys[{i}]"), &e))?);
        }
        let mut operators = BTreeMap::new();
        for (name, k) in &raw.operators.keys {
            operators.insert(
                name.clone(),
                parse_key(k).map_err(|e| invalid(file, &format!("operators.keys.{name}"), &e))?,
            );
        }
        let operators_max_age = duration(file, "operators.max_age", &raw.operators.max_age)?;
        let http_listen = raw.http.listen.parse().map_err(|e| {
            invalid(
                file,
                "http.listen",
                &format!(
                    "{:?} is not an address such as 127.0.0.1:8080 ({e})",
                    raw.http.listen
                ),
            )
        })?;
        let heartbeat_interval = duration(
            file,
            "devices.heartbeat_interval",
            &raw.devices.heartbeat_interval,
        )?;
        let fast = duration(
            file,
            "devices.fast_report_interval",
            &raw.devices.fast_report_interval,
        )?;
        if raw.devices.offline_after_intervals == 0 {
            return Err(invalid(
                file,
                "devices.offline_after_intervals",
                "must be at least 1",
            ));
        }
        if raw.rollout.silent_after_intervals == 0 {
            return Err(invalid(
                file,
                "rollout.silent_after_intervals",
                "must be at least 1",
            ));
        }
        let g = raw.gate;
        if !(g.z > 0.0 && g.z.is_finite()) {
            return Err(invalid(
                file,
                "gate.z",
                "must be a positive number such as 1.645",
            ));
        }
        if !(g.trend_fraction > 0.0 && g.trend_fraction < 1.0) {
            return Err(invalid(
                file,
                "gate.trend_fraction",
                "must be between 0 and 1",
            ));
        }
        if !(g.ewma_alpha > 0.0 && g.ewma_alpha <= 1.0) {
            return Err(invalid(
                file,
                "gate.ewma_alpha",
                "must be above 0 and at most 1",
            ));
        }
        if g.min_samples == 0 {
            return Err(invalid(file, "gate.min_samples", "must be at least 1"));
        }
        Ok(Config {
            broker,
            client_id: raw.broker.client_id,
            release_keys,
            database: raw.database.path,
            http_listen,
            artifacts_dir: raw.http.artifacts_dir,
            heartbeat_interval,
            offline_after: heartbeat_interval * raw.devices.offline_after_intervals,
            tick: duration(file, "rollout.tick", &raw.rollout.tick)?,
            operators,
            operators_max_age,
            engine: Settings {
                report_interval: heartbeat_interval,
                fast_report_interval: fast,
                silent_after: heartbeat_interval * raw.rollout.silent_after_intervals,
                install_timeout: duration(
                    file,
                    "rollout.install_timeout",
                    &raw.rollout.install_timeout,
                )?,
                gate: GateSettings {
                    min_samples: g.min_samples,
                    min_fail_samples: g.min_fail_samples.max(1),
                    min_control_samples: g.min_control_samples,
                    z: g.z,
                    trend_fraction: g.trend_fraction,
                    ewma_alpha: g.ewma_alpha,
                    max_extensions: g.max_extensions,
                    p95_floor_ms: g.p95_floor_ms.max(0.0),
                    max_requests_per_sample: g.max_requests_per_sample.max(1.0),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_shipped_file() {
        let c = Config::from_sources(None, env(&[])).unwrap();
        assert_eq!(
            c.broker,
            BrokerConfig::Embedded {
                listen: "127.0.0.1:1883".parse().unwrap(),
                max_connections: 10000,
                tls: None,
                credentials: None,
            }
        );
        assert_eq!(c.http_listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.engine.gate, GateSettings::default());
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
        assert_eq!(c.offline_after, Duration::from_secs(30));
    }

    #[test]
    fn environment_overrides_and_errors_name_the_key() {
        let c = Config::from_sources(
            None,
            env(&[
                ("FLEET_COORDINATOR__HTTP__LISTEN", "127.0.0.1:9999"),
                ("FLEET_COORDINATOR__GATE__MIN_SAMPLES", "4"),
                ("FLEET_COORDINATOR__BROKER__MODE", "external"),
                ("FLEET_COORDINATOR__BROKER__URL", "mqtt://broker.lan:1884"),
            ]),
        )
        .unwrap();
        assert_eq!(c.http_listen.port(), 9999);
        assert_eq!(c.engine.gate.min_samples, 4);
        assert!(matches!(
            c.broker,
            BrokerConfig::External { port: 1884, .. }
        ));

        let e = Config::from_sources(
            None,
            env(&[("FLEET_COORDINATOR__DEVICES__HEARTBEAT_INTERVAL", "soon")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("devices.heartbeat_interval"), "{e}");
        let e = Config::from_sources(None, env(&[("FLEET_COORDINATOR__HTTP__LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
    }

    #[test]
    fn a_file_overrides_defaults_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[rollout]\ninstall_timeout = \"5m\"\n").unwrap();
        let c = Config::from_sources(Some(&p), env(&[])).unwrap();
        assert_eq!(c.engine.install_timeout, Duration::from_secs(300));
        std::fs::write(&p, "[rollout]\ninstall_timeuot = \"5m\"\n").unwrap();
        let e = Config::from_sources(Some(&p), env(&[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml") && e.contains("install_timeuot"), "{e}");
    }
}
