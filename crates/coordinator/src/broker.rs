//! The MQTT broker devices talk to: rumqttd embedded in this process, or an external broker
//! such as mosquitto. Either way the coordinator connects to it with its own rumqttc client.
//!
//! Embedded and secured (`broker.tls_cert` and/or `broker.credentials` set): rumqttd listens on
//! a free port of 127.0.0.1 only, its auth hook accepting nothing but a secret made at start;
//! the guard (`guard.rs`: TLS, credentials, per-client topic ACL) listens on `broker.listen`
//! and forwards to it; the coordinator's own client connects to the internal port with the
//! secret. Embedded and not secured: rumqttd listens on `broker.listen` itself, anonymous, as
//! before (a closed lab network, tests, the demo).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_proto::frame::Kind;

use crate::auth::CredentialsFile;
use crate::config::{BrokerConfig, ClientTls};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot pick a free port on {addr}: {source}")]
    FreePort {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker did not start listening on {addr} within {waited:?}")]
    NotListening { addr: SocketAddr, waited: Duration },
    #[error("embedded broker cannot listen on {addr}: the address is in use")]
    InUse { addr: SocketAddr },
    #[error("embedded broker: {0}")]
    Security(String),
}

/// Where the coordinator's client (and devices) connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS with a pinned CA (and a client certificate), or plain TCP.
    pub tls: Option<ClientTls>,
}

/// The account the coordinator's own client uses on the secured embedded broker.
pub const INTERNAL_USER: &str = "fleet-coordinator";

/// A running broker.
#[derive(Debug)]
pub enum Broker {
    /// rumqttd on its own thread. It has no shutdown API: it lives as long as the process.
    Embedded {
        /// Where devices and operators connect (the guard's listener, when secured).
        addr: SocketAddr,
        /// Secured: rumqttd's internal listener and the secret its auth hook requires.
        internal: Option<(SocketAddr, String)>,
    },
    External {
        endpoint: Endpoint,
    },
}

impl Broker {
    /// Starts the embedded broker (on its own thread) or just records the external one.
    /// `client_id` is the coordinator's own, which the guard keeps anyone else from taking.
    pub fn start(cfg: &BrokerConfig, client_id: &str) -> Result<Broker, BrokerError> {
        match cfg {
            BrokerConfig::Embedded {
                listen,
                max_connections,
                tls,
                credentials,
            } => {
                if tls.is_none() && credentials.is_none() {
                    return start_embedded(*listen, *max_connections, None);
                }
                let server_tls = tls
                    .as_ref()
                    .map(|t| fleet_tls::server_config(&t.cert, &t.key, t.client_ca.as_deref()))
                    .transpose()
                    .map_err(BrokerError::Security)?;
                let credentials = credentials
                    .as_ref()
                    .map(|p| CredentialsFile::open(p).map(Arc::new))
                    .transpose()
                    .map_err(BrokerError::Security)?;
                if credentials.is_none() {
                    tracing::warn!(
                        "broker.credentials is not set: any client may connect and publish anything (TLS only encrypts)"
                    );
                }
                // The guard's listener first, so a busy address fails before anything starts.
                let public = bind_public(*listen)?;
                let addr = public
                    .local_addr()
                    .map_err(|source| BrokerError::FreePort {
                        addr: *listen,
                        source,
                    })?;
                let secret = hex::encode(rand::random::<[u8; 32]>());
                let internal_addr = free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
                start_embedded(internal_addr, *max_connections, Some(secret.clone()))?;
                let settings = crate::guard::Settings {
                    tls: server_tls,
                    credentials,
                    upstream: internal_addr,
                    secret: secret.clone(),
                    reserved_client_id: client_id.to_owned(),
                    max_packet: max_payload() + 1024,
                };
                spawn_guard(public, settings)?;
                tracing::info!(%addr, tls = tls.is_some(), "embedded broker guarded (credentials, topic ACL)");
                Ok(Broker::Embedded {
                    addr,
                    internal: Some((internal_addr, secret)),
                })
            }
            BrokerConfig::External {
                host,
                port,
                username,
                password,
                tls,
            } => Ok(Broker::External {
                endpoint: Endpoint {
                    host: host.clone(),
                    port: *port,
                    username: username.clone(),
                    password: password.clone(),
                    tls: tls.clone(),
                },
            }),
        }
    }

    /// Where devices and operators connect.
    pub fn endpoint(&self) -> Endpoint {
        match self {
            Broker::Embedded { addr, .. } => Endpoint {
                host: addr.ip().to_string(),
                port: addr.port(),
                username: None,
                password: None,
                tls: None,
            },
            Broker::External { endpoint } => endpoint.clone(),
        }
    }

    /// Where the coordinator's own client connects, as whom.
    pub fn client_endpoint(&self) -> Endpoint {
        match self {
            Broker::Embedded {
                internal: Some((addr, secret)),
                ..
            } => Endpoint {
                host: addr.ip().to_string(),
                port: addr.port(),
                username: Some(INTERNAL_USER.to_owned()),
                password: Some(secret.clone()),
                tls: None,
            },
            _ => self.endpoint(),
        }
    }

    /// The embedded broker's bound address (the guard's, when secured).
    pub fn embedded_addr(&self) -> Option<SocketAddr> {
        match self {
            Broker::Embedded { addr, .. } => Some(*addr),
            Broker::External { .. } => None,
        }
    }
}

fn bind_public(listen: SocketAddr) -> Result<TcpListener, BrokerError> {
    let l = TcpListener::bind(listen).map_err(|_| BrokerError::InUse { addr: listen })?;
    l.set_nonblocking(true)
        .map_err(|source| BrokerError::FreePort {
            addr: listen,
            source,
        })?;
    Ok(l)
}

/// Runs the guard on its own thread and runtime, like rumqttd: it lives as long as the process.
fn spawn_guard(listener: TcpListener, settings: crate::guard::Settings) -> Result<(), BrokerError> {
    let addr = listener.local_addr().ok();
    std::thread::Builder::new()
        .name("mqtt-guard".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mqtt-guard")
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "mqtt guard: cannot start its runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => crate::guard::serve(l, settings).await,
                    Err(e) => tracing::error!(error = %e, "mqtt guard: cannot listen"),
                }
            });
        })
        .map(|_| ())
        .map_err(|source| BrokerError::FreePort {
            addr: addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            source,
        })
}

/// Picks a free TCP port on `ip` (rumqttd cannot report a bound port 0).
pub fn free_port(ip: std::net::IpAddr) -> Result<SocketAddr, BrokerError> {
    let probe = SocketAddr::new(ip, 0);
    let l = TcpListener::bind(probe).map_err(|source| BrokerError::FreePort {
        addr: probe,
        source,
    })?;
    l.local_addr().map_err(|source| BrokerError::FreePort {
        addr: probe,
        source,
    })
}

/// The largest frame the broker must carry: proto's largest kind (a reply listing devices).
pub fn max_payload() -> usize {
    Kind::ALL
        .iter()
        .map(|k| k.max_size())
        .max()
        .unwrap_or(1 << 20)
        + 4096
}

/// Starts rumqttd on `listen`. With `secret`, its auth hook admits only clients presenting it
/// (the guard and the coordinator itself).
fn start_embedded(
    listen: SocketAddr,
    max_connections: usize,
    secret: Option<String>,
) -> Result<Broker, BrokerError> {
    let addr = if listen.port() == 0 {
        free_port(listen.ip())?
    } else {
        listen
    };
    // rumqttd would fail inside its thread; check first so the error reaches the caller.
    match TcpListener::bind(addr) {
        Ok(l) => drop(l),
        Err(_) => return Err(BrokerError::InUse { addr }),
    }
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: max_payload(),
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut server = rumqttd::ServerSettings {
        name: "fleet-v4".into(),
        listen: addr,
        // TLS is the guard's: rumqttd's own handshake runs inline in its accept loop, unbounded.
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    if let Some(secret) = secret {
        let secret = Arc::new(secret);
        server.set_auth_handler(move |_client_id, _user, password: String| {
            let ok = crate::auth::same_secret(password.as_bytes(), secret.as_bytes());
            async move { ok }
        });
    }
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // Each device holds one connection; operators and the coordinator a few more.
            max_connections: max_connections + 64,
            max_outgoing_packet_count: 1000,
            // Segments hold in-flight messages per filter; 16 MiB × 4 is bounded memory yet
            // fits a burst of thousands of heartbeats and the largest reply.
            max_segment_size: 16 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|source| BrokerError::FreePort { addr, source })?;
    let started = Instant::now();
    let waited = Duration::from_secs(10);
    while started.elapsed() < waited {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            tracing::info!(%addr, "embedded broker listening");
            return Ok(Broker::Embedded {
                addr,
                internal: None,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening { addr, waited })
}
