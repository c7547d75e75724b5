//! A small blocking MQTT client for tests (rumqttc's synchronous API).
//!
//! Scenario tests use it to act as a device (e.g. one that publishes under another device's id),
//! as an operator, or as an eavesdropper that records what the broker delivers. Every call waits
//! for the broker's acknowledgement, bounded by the probe's timeout, and fails loudly.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rumqttc::{
    Client, ConnectReturnCode, Connection, Event, Incoming, MqttOptions, Publish, QoS,
    RecvTimeoutError,
};

/// How long a probe waits for an acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// A connected MQTT client. Incoming publishes are buffered until read with
/// [`recv`](MqttProbe::recv).
pub struct MqttProbe {
    client_id: String,
    client: Client,
    connection: Connection,
    received: VecDeque<Publish>,
}

/// Why a connection attempt did not give a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectError {
    /// The broker answered with a CONNACK refusal (e.g. `BadUserNamePassword`, `NotAuthorized`).
    Refused(ConnectReturnCode),
    /// Network failure or no answer in time.
    Failed(String),
}

impl std::fmt::Debug for MqttProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttProbe")
            .field("client_id", &self.client_id)
            .field("buffered", &self.received.len())
            .finish_non_exhaustive()
    }
}

impl MqttProbe {
    /// Connects with a clean session; see [`connect_with`](MqttProbe::connect_with).
    pub fn connect(
        host: &str,
        port: u16,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Result<MqttProbe, ConnectError> {
        MqttProbe::connect_with(host, port, client_id, user, password, true)
    }

    /// Connects and waits for the CONNACK. `clean_session = false` resumes a persistent session.
    pub fn connect_with(
        host: &str,
        port: u16,
        client_id: &str,
        user: &str,
        password: &str,
        clean_session: bool,
    ) -> Result<MqttProbe, ConnectError> {
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_credentials(user, password)
            .set_clean_session(clean_session)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        MqttProbe::handshake(options, client_id, host, port)
    }

    /// Connects over TLS pinning `ca`, with `login` and/or a client certificate (mosquitto's
    /// mutual TLS takes the username from the certificate's CN).
    pub fn connect_tls(
        host: &str,
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
        ca: &std::path::Path,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<MqttProbe, ConnectError> {
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(1 << 20, 1 << 20);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let config = fleet_tls::client_config(ca, client_cert).map_err(ConnectError::Failed)?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
        MqttProbe::handshake(options, client_id, host, port)
    }

    fn handshake(
        options: MqttOptions,
        client_id: &str,
        host: &str,
        port: u16,
    ) -> Result<MqttProbe, ConnectError> {
        let (client, mut connection) = Client::new(options, 64);
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Incoming::ConnAck(ack)))) => {
                    if ack.code == ConnectReturnCode::Success {
                        return Ok(MqttProbe {
                            client_id: client_id.to_owned(),
                            client,
                            connection,
                            received: VecDeque::new(),
                        });
                    }
                    return Err(ConnectError::Refused(ack.code));
                }
                Ok(Ok(_)) => {}
                Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                    return Err(ConnectError::Refused(code));
                }
                Ok(Err(e)) => return Err(ConnectError::Failed(e.to_string())),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ConnectError::Failed(format!(
                        "no CONNACK from {host}:{port} within {ACK_TIMEOUT:?}"
                    )));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ConnectError::Failed("connection closed".into()));
                }
            }
        }
    }

    /// Subscribes and returns the broker's SUBACK codes (a refused filter shows as `Failure`).
    #[track_caller]
    pub fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, qos)
            .unwrap_or_else(|e| panic!("{}: subscribe {filter}: {e}", self.client_id));
        let what = format!("SUBACK for {filter}");
        self.until(&what, |event| match event {
            Incoming::SubAck(ack) => Some(ack.return_codes.clone()),
            _ => None,
        })
    }

    /// Publishes and, for QoS 1, waits for the PUBACK. With MQTT 3.1.1 mosquitto acknowledges
    /// a publish its ACL refuses and drops it, so a PUBACK proves nothing about delivery.
    #[track_caller]
    pub fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, retain, payload.into())
            .unwrap_or_else(|e| panic!("{}: publish {topic}: {e}", self.client_id));
        match qos {
            QoS::AtMostOnce => {
                // Drive the event loop until the packet has been written.
                let what = format!("publish to {topic} to be sent");
                self.until_outgoing(&what);
            }
            QoS::AtLeastOnce => {
                let what = format!("PUBACK for {topic}");
                self.until(&what, |event| {
                    matches!(event, Incoming::PubAck(_)).then_some(())
                });
            }
            QoS::ExactlyOnce => {
                let what = format!("PUBCOMP for {topic}");
                self.until(&what, |event| {
                    matches!(event, Incoming::PubComp(_)).then_some(())
                });
            }
        }
    }

    /// Publishes at QoS 1 and tells whether the broker closed the connection instead of
    /// acknowledging (the embedded broker's guard does that to a publish its ACL refuses;
    /// mosquitto acknowledges and drops it).
    #[track_caller]
    pub fn publish_or_closed(&mut self, topic: &str, payload: impl Into<Vec<u8>>) -> bool {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .unwrap_or_else(|e| panic!("{}: publish {topic}: {e}", self.client_id));
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => return false,
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => self.received.push_back(p),
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: neither a PUBACK nor a closed connection for {topic} within {ACK_TIMEOUT:?}",
                        self.client_id
                    )
                }
            }
        }
    }

    /// The next message delivered to this client, waiting up to `timeout`.
    #[track_caller]
    pub fn recv(&mut self, timeout: Duration) -> Option<Publish> {
        if let Some(publish) = self.received.pop_front() {
            return Some(publish);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Incoming::Publish(publish)))) => return Some(publish),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: connection failed: {e}", self.client_id),
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("{}: connection closed", self.client_id)
                }
            }
        }
    }

    /// Waits for a message on `topic` and returns it, recording others on the way in `seen`.
    #[track_caller]
    pub fn recv_on(&mut self, topic: &str, timeout: Duration, seen: &mut Vec<Publish>) -> Publish {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(publish) if publish.topic == topic => return publish,
                Some(other) => seen.push(other),
                None => panic!(
                    "{}: no message on {topic} within {timeout:?} (got {:?})",
                    self.client_id,
                    seen.iter().map(|p| p.topic.as_str()).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Disconnects cleanly (a last will is not sent).
    pub fn disconnect(mut self) {
        // Already gone is fine.
        let _ = self.client.disconnect();
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Ok(Ok(_)) = self
            .connection
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {}
    }

    #[track_caller]
    fn until<T>(&mut self, what: &str, mut wanted: impl FnMut(&Incoming) -> Option<T>) -> T {
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                    self.received.push_back(publish)
                }
                Ok(Ok(Event::Incoming(incoming))) => {
                    if let Some(value) = wanted(&incoming) {
                        return value;
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => panic!("{}: waiting for {what}: {e}", self.client_id),
                Err(_) => panic!("{}: no {what} within {ACK_TIMEOUT:?}", self.client_id),
            }
        }
    }

    #[track_caller]
    fn until_outgoing(&mut self, what: &str) {
        let deadline = Instant::now() + ACK_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.connection.recv_timeout(left) {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) => return,
                Ok(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                    self.received.push_back(publish)
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{}: waiting for {what}: {e}", self.client_id),
                Err(_) => panic!("{}: no {what} within {ACK_TIMEOUT:?}", self.client_id),
            }
        }
    }
}
