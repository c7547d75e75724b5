//! The MQTT broker devices talk to: rumqttd embedded in this process, or an external broker
//! such as mosquitto. Either way the coordinator connects to it with its own rumqttc client.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use fleet_proto::frame::Kind;

use crate::config::BrokerConfig;

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
}

/// Where the coordinator's client (and devices) connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A running broker.
#[derive(Debug)]
pub enum Broker {
    /// rumqttd on its own thread. It has no shutdown API: it lives as long as the process.
    Embedded {
        addr: SocketAddr,
    },
    External {
        endpoint: Endpoint,
    },
}

impl Broker {
    /// Starts the embedded broker (on its own thread) or just records the external one.
    pub fn start(cfg: &BrokerConfig) -> Result<Broker, BrokerError> {
        match cfg {
            BrokerConfig::Embedded {
                listen,
                max_connections,
            } => start_embedded(*listen, *max_connections),
            BrokerConfig::External {
                host,
                port,
                username,
                password,
            } => Ok(Broker::External {
                endpoint: Endpoint {
                    host: host.clone(),
                    port: *port,
                    username: username.clone(),
                    password: password.clone(),
                },
            }),
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        match self {
            Broker::Embedded { addr } => Endpoint {
                host: addr.ip().to_string(),
                port: addr.port(),
                username: None,
                password: None,
            },
            Broker::External { endpoint } => endpoint.clone(),
        }
    }

    /// The embedded broker's bound address.
    pub fn embedded_addr(&self) -> Option<SocketAddr> {
        match self {
            Broker::Embedded { addr } => Some(*addr),
            Broker::External { .. } => None,
        }
    }
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

fn start_embedded(listen: SocketAddr, max_connections: usize) -> Result<Broker, BrokerError> {
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
    let server = rumqttd::ServerSettings {
        name: "fleet-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
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
            return Ok(Broker::Embedded { addr });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening { addr, waited })
}
