//! The guard in front of the embedded broker: TLS termination, credentials, and a per-client
//! topic ACL — what rumqttd 0.20 does not have (no per-client ACL: rumqttd #495, #1005) or does
//! unsafely (its TLS handshake runs inline in the accept loop with no timeout, so one client
//! that never sends a ClientHello would stop every later connection).
//!
//! ```text
//! device / fleetctl ──TLS──▶ guard (broker.listen) ──plain, 127.0.0.1──▶ rumqttd (internal port)
//!                                                            coordinator ──┘ (same internal port)
//! ```
//!
//! Per connection, on its own task: the TLS handshake (bounded by [`HANDSHAKE_TIMEOUT`]), then
//! the MQTT CONNECT is read and checked against the credentials file (`auth::authenticate`),
//! including the last will's topic; a refusal is answered with CONNACK "not authorised" and the
//! connection closed. An accepted CONNECT is forwarded with its password replaced by a secret
//! only this process knows, which rumqttd's auth hook requires: a client that reaches the internal
//! port directly (it listens on 127.0.0.1 only) cannot connect without it. After that, every
//! packet from the client is framed and checked — PUBLISH topics against `auth::may_publish`,
//! SUBSCRIBE filters against `auth::may_subscribe` — and a violation closes the connection
//! (logged with the account and the topic). Packets from the broker pass through untouched.
//!
//! Only MQTT 3.1.1 (what fleet's clients speak and the v4 listener serves) is accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use crate::auth::{self, CredentialsFile, Identity};
use crate::mqtt_wire::{Connect, connack, publish_payload_len, publish_topic, subscribe_filters};

/// Bound on the TLS handshake and on the CONNECT that must follow the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest CONNECT read from a client nobody has authenticated yet: a client id, a last
/// will (an `Online` frame), a username and a password fit many times over.
pub const MAX_CONNECT: usize = 16 * 1024;

/// The largest packet an authenticated client may send: what its role may publish, plus room
/// for the topic and the header. Anonymous clients (no credentials file) get `max_packet`.
fn packet_limit(who: Option<&Identity>, anonymous: usize) -> usize {
    use fleet_proto::Kind;
    match who.map(|w| w.role) {
        Some(auth::Role::Device) => Kind::State.max_size() + 1024,
        Some(auth::Role::Operator) => Kind::Command.max_size() + 1024,
        None => anonymous,
    }
}

/// What the guard needs.
#[derive(Clone)]
pub struct Settings {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `None`: anyone may connect and publish anything (TLS only encrypts).
    pub credentials: Option<Arc<CredentialsFile>>,
    /// rumqttd's internal listener.
    pub upstream: SocketAddr,
    /// The password rumqttd's auth hook requires; replaces the client's.
    pub secret: String,
    /// The coordinator's own client id: nobody else may take it.
    pub reserved_client_id: String,
    /// The largest packet a client may send.
    pub max_packet: usize,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("tls", &self.tls.is_some())
            .field("credentials", &self.credentials.is_some())
            .field("upstream", &self.upstream)
            .finish()
    }
}

/// Serves `listener` until the process ends (like rumqttd, the guard has no shutdown).
pub async fn serve(listener: TcpListener, settings: Settings) {
    let settings = Arc::new(settings);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "mqtt guard: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let settings = settings.clone();
        tokio::spawn(async move {
            if let Err(why) = connection(stream, &settings).await {
                debug!(%peer, "mqtt guard: connection ended: {why}");
            }
        });
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connection(stream: TcpStream, settings: &Settings) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    let mut client: Box<dyn Io> = match &settings.tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => {
                    warn!(%peer, "mqtt guard: TLS handshake failed: {e}");
                    return Err(format!("TLS handshake: {e}"));
                }
                Err(_) => return Err("TLS handshake timed out".into()),
            }
        }
        None => Box::new(stream),
    };
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_packet(&mut client, MAX_CONNECT))
        .await
        .map_err(|_| "no CONNECT in time".to_owned())??;
    let connect = match Connect::parse(&first) {
        Ok(c) => c,
        Err(why) => {
            warn!(%peer, "mqtt guard: refused a connection: {why}");
            let _ = client.write_all(&connack(1)).await;
            return Err(why);
        }
    };
    let who = match &settings.credentials {
        None => None,
        Some(file) => {
            let checked = file.accounts().and_then(|accounts| {
                let who = auth::authenticate(
                    &accounts,
                    &settings.reserved_client_id,
                    &connect.client_id,
                    connect.username.as_deref(),
                    connect.password.as_deref(),
                )?;
                if let Some(will) = &connect.will_topic
                    && !auth::may_publish(&who, will)
                {
                    return Err(format!("{} may not set a last will on {will}", who.name));
                }
                Ok(who)
            });
            match checked {
                Ok(who) => Some(who),
                Err(why) => {
                    warn!(%peer, client_id = %connect.client_id, "mqtt guard: refused a connection: {why}");
                    let _ = client.write_all(&connack(5)).await;
                    return Err(why);
                }
            }
        }
    };
    if settings.credentials.is_none() && connect.client_id == settings.reserved_client_id {
        let _ = client.write_all(&connack(2)).await;
        return Err("a client tried the coordinator's client id".into());
    }
    if let Some(w) = &who {
        info!(%peer, user = %w.name, role = w.role.as_str(), "mqtt guard: client authenticated");
    }
    let mut upstream = TcpStream::connect(settings.upstream)
        .await
        .map_err(|e| format!("cannot reach the internal broker: {e}"))?;
    let _ = upstream.set_nodelay(true);
    upstream
        .write_all(&connect.with_password(&settings.secret))
        .await
        .map_err(|e| e.to_string())?;
    let limit = packet_limit(who.as_ref(), settings.max_packet);
    let (mut up_read, mut up_write) = upstream.into_split();
    let (mut cl_read, mut cl_write) = tokio::io::split(client);
    let down = async {
        let _ = tokio::io::copy(&mut up_read, &mut cl_write).await;
        let _ = cl_write.shutdown().await;
    };
    let up = async {
        loop {
            let packet = read_packet(&mut cl_read, limit).await?;
            if let Some(who) = &who {
                check(who, &packet)?;
            }
            up_write
                .write_all(&packet)
                .await
                .map_err(|e| e.to_string())?;
        }
    };
    tokio::select! {
        () = down => Ok(()),
        r = up => {
            let r: Result<(), String> = r;
            if let Err(why) = &r
                && let Some(who) = &who
                && why.starts_with("refused")
            {
                warn!(%peer, user = %who.name, "mqtt guard: {why}; connection closed");
            }
            r
        }
    }
}

/// Checks one packet from an authenticated client.
fn check(who: &Identity, packet: &[u8]) -> Result<(), String> {
    match packet[0] >> 4 {
        1 => Err("refused: a second CONNECT".into()),
        3 => {
            let topic = publish_topic(packet)?;
            if !auth::may_publish(who, &topic) {
                return Err(format!("refused publish on {topic} by {}", who.name));
            }
            // Each kind's frame cap, here at the edge too: an oversized report never reaches
            // the broker's memory or the coordinator.
            if let Ok(t) = topic.parse::<fleet_proto::Topic>() {
                let (len, max) = (publish_payload_len(packet)?, t.kind().max_size());
                if len > max {
                    return Err(format!(
                        "refused publish on {topic} by {}: {len} bytes is over the {max}-byte cap for a {}",
                        who.name,
                        t.kind()
                    ));
                }
            }
            Ok(())
        }
        8 => {
            for filter in subscribe_filters(packet)? {
                if !auth::may_subscribe(who, &filter) {
                    return Err(format!("refused subscription to {filter} by {}", who.name));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Reads one whole MQTT packet (fixed header included), refusing more than `max` bytes.
pub async fn read_packet<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut packet = vec![r.read_u8().await.map_err(|e| e.to_string())?];
    let mut len: usize = 0;
    for i in 0..4 {
        let b = r.read_u8().await.map_err(|e| e.to_string())?;
        packet.push(b);
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err("malformed remaining length".into());
        }
    }
    if len > max {
        return Err(format!(
            "refused: a {len}-byte packet is over the {max}-byte limit"
        ));
    }
    // Read as it arrives, not allocated up front: a peer that announces a large packet and
    // sends nothing holds no memory for it.
    let got = r
        .take(len as u64)
        .read_to_end(&mut packet)
        .await
        .map_err(|e| e.to_string())?;
    if got != len {
        return Err(format!("the packet ends early ({got} of {len} bytes)"));
    }
    Ok(packet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_are_framed_and_oversized_ones_refused() {
        let mut two: &[u8] = &[0xc0, 0x00, 0x30, 0x05, 0x00, 0x01, b't', b'h', b'i'];
        assert_eq!(read_packet(&mut two, 100).await.unwrap(), vec![0xc0, 0x00]);
        let p = read_packet(&mut two, 100).await.unwrap();
        assert_eq!(publish_topic(&p).unwrap(), "t");
        let mut big: &[u8] = &[0x30, 0xff, 0xff, 0x03];
        assert!(
            read_packet(&mut big, 1000)
                .await
                .unwrap_err()
                .contains("limit")
        );
        let mut endless: &[u8] = &[0x30, 0xff, 0xff, 0xff, 0xff];
        assert!(read_packet(&mut endless, usize::MAX).await.is_err());
    }
}
