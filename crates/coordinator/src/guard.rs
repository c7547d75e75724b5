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

/// Bound on the TLS handshake and on the CONNECT that must follow the connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let first = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_packet(&mut client, settings.max_packet),
    )
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
    let (mut up_read, mut up_write) = upstream.into_split();
    let (mut cl_read, mut cl_write) = tokio::io::split(client);
    let down = async {
        let _ = tokio::io::copy(&mut up_read, &mut cl_write).await;
        let _ = cl_write.shutdown().await;
    };
    let up = async {
        loop {
            let packet = read_packet(&mut cl_read, settings.max_packet).await?;
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
            if auth::may_publish(who, &topic) {
                Ok(())
            } else {
                Err(format!("refused publish on {topic} by {}", who.name))
            }
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

/// CONNACK (MQTT 3.1.1) with a return code: 1 bad protocol, 2 identifier rejected, 5 not
/// authorised.
fn connack(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
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
    let start = packet.len();
    packet.resize(start + len, 0);
    r.read_exact(&mut packet[start..])
        .await
        .map_err(|e| e.to_string())?;
    Ok(packet)
}

/// Where the variable header starts (after the fixed header).
fn body(packet: &[u8]) -> &[u8] {
    let mut i = 1;
    while i < packet.len() && packet[i] & 0x80 != 0 {
        i += 1;
    }
    packet.get(i + 1..).unwrap_or(&[])
}

/// A cursor over a packet body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("packet ends early")?;
        self.0 = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = usize::from(self.u16()?);
        if self.0.len() < n {
            return Err("packet ends early".into());
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }
}

fn publish_topic(packet: &[u8]) -> Result<String, String> {
    Cursor(body(packet)).string()
}

fn subscribe_filters(packet: &[u8]) -> Result<Vec<String>, String> {
    let mut c = Cursor(body(packet));
    c.u16()?;
    let mut filters = Vec::new();
    while !c.0.is_empty() {
        filters.push(c.string()?);
        c.u8()?;
    }
    if filters.is_empty() {
        return Err("a SUBSCRIBE without filters".into());
    }
    Ok(filters)
}

/// The parts of a CONNECT the guard checks, and what it needs to forward it.
#[derive(Debug, PartialEq, Eq)]
pub struct Connect {
    level: u8,
    flags: u8,
    keep_alive: u16,
    pub client_id: String,
    pub will_topic: Option<String>,
    will_message: Option<Vec<u8>>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

const USERNAME: u8 = 0x80;
const PASSWORD: u8 = 0x40;
const WILL: u8 = 0x04;

impl Connect {
    pub fn parse(packet: &[u8]) -> Result<Connect, String> {
        if packet.first().map(|b| b >> 4) != Some(1) {
            return Err("the first packet is not a CONNECT".into());
        }
        let mut c = Cursor(body(packet));
        let name = c.string()?;
        let level = c.u8()?;
        if name != "MQTT" || level != 4 {
            return Err(format!(
                "protocol {name:?} level {level}: only MQTT 3.1.1 is served"
            ));
        }
        let flags = c.u8()?;
        let keep_alive = c.u16()?;
        let client_id = c.string()?;
        let (will_topic, will_message) = if flags & WILL != 0 {
            (Some(c.string()?), Some(c.bytes()?.to_vec()))
        } else {
            (None, None)
        };
        let username = if flags & USERNAME != 0 {
            Some(c.string()?)
        } else {
            None
        };
        let password = if flags & PASSWORD != 0 {
            Some(c.bytes()?.to_vec())
        } else {
            None
        };
        Ok(Connect {
            level,
            flags,
            keep_alive,
            client_id,
            will_topic,
            will_message,
            username,
            password,
        })
    }

    /// The CONNECT to forward: the same, with `secret` as the password (and a username, which
    /// rumqttd's auth hook needs to be called at all).
    pub fn with_password(&self, secret: &str) -> Vec<u8> {
        fn put(out: &mut Vec<u8>, b: &[u8]) {
            let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
            out.extend_from_slice(&n.to_be_bytes());
            out.extend_from_slice(&b[..usize::from(n)]);
        }
        let mut v = Vec::new();
        put(&mut v, b"MQTT");
        v.push(self.level);
        v.push(self.flags | USERNAME | PASSWORD);
        v.extend_from_slice(&self.keep_alive.to_be_bytes());
        put(&mut v, self.client_id.as_bytes());
        if let (Some(t), Some(m)) = (&self.will_topic, &self.will_message) {
            put(&mut v, t.as_bytes());
            put(&mut v, m);
        }
        put(
            &mut v,
            self.username.as_deref().unwrap_or("anonymous").as_bytes(),
        );
        put(&mut v, secret.as_bytes());
        let mut packet = vec![0x10];
        let mut len = v.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            packet.push(b);
            if len == 0 {
                break;
            }
        }
        packet.extend_from_slice(&v);
        packet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(client: &str, user: &str, pw: &str, will: Option<&str>) -> Vec<u8> {
        Connect {
            level: 4,
            flags: 0x02 | if will.is_some() { WILL | 0x28 } else { 0 },
            keep_alive: 30,
            client_id: client.into(),
            will_topic: will.map(Into::into),
            will_message: will.map(|_| vec![1, 2, 3]),
            username: Some(user.into()),
            password: Some(pw.as_bytes().to_vec()),
        }
        .with_password(pw)
    }

    #[test]
    fn a_connect_round_trips_with_the_password_replaced() {
        let bytes = connect(
            "cam-1",
            "cam-1",
            "s3cret",
            Some("fleet/v1/devices/cam-1/online"),
        );
        let c = Connect::parse(&bytes).unwrap();
        assert_eq!(c.client_id, "cam-1");
        assert_eq!(c.username.as_deref(), Some("cam-1"));
        assert_eq!(c.password.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(
            c.will_topic.as_deref(),
            Some("fleet/v1/devices/cam-1/online")
        );
        let forwarded = Connect::parse(&c.with_password("internal")).unwrap();
        assert_eq!(forwarded.password.as_deref(), Some(&b"internal"[..]));
        assert_eq!(
            (
                forwarded.client_id,
                forwarded.will_topic,
                forwarded.will_message,
                forwarded.keep_alive
            ),
            (
                c.client_id.clone(),
                c.will_topic.clone(),
                c.will_message.clone(),
                30
            )
        );
        // rumqttc encodes the same way: its CONNECT parses.
        let mut buf = bytes::BytesMut::new();
        let mut rc = rumqttc::mqttbytes::v4::Connect::new("dev-9");
        rc.set_login("dev-9", "pw");
        rc.write(&mut buf).unwrap();
        let c = Connect::parse(&buf).unwrap();
        assert_eq!(
            (c.client_id.as_str(), c.username.as_deref()),
            ("dev-9", Some("dev-9"))
        );
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(Connect::parse(&[0x10, 0x00]).is_err());
        assert!(Connect::parse(&[0x30, 0x00]).is_err());
        let good = connect("a", "a", "b", None);
        for n in 0..good.len() {
            let _ = Connect::parse(&good[..n]);
        }
        let mut v5 = good.clone();
        v5[8] = 5;
        assert!(Connect::parse(&v5).unwrap_err().contains("3.1.1"));
        assert!(subscribe_filters(&[0x82, 0x02, 0x00, 0x01]).is_err());
        assert!(publish_topic(&[0x30, 0x01, 0x00]).is_err());
    }

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
