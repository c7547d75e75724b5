//! The MQTT side of fleetctl: connect, send one request, wait for its reply; follow a
//! rollout's retained state.
//!
//! Design: fleetctl subscribes to its reply topic and waits for the SubAck *before* publishing
//! the request, so a fast coordinator's reply cannot arrive before anyone listens.

use std::time::Duration;

use fleet_proto::frame::Kind;
use fleet_proto::operator::{Command, Refused, Reply, ReplyBody, ReplyResult, Request};
use fleet_proto::rollout::RolloutState;
use fleet_proto::{RequestId, RolloutId, Topic, decode, encode};
use rand::Rng as _;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
};
use tokio::time::{Instant, timeout_at};

use crate::exit::{Exit, Failure};
use crate::settings::{Secure, Settings};

pub struct Link {
    client: AsyncClient,
    events: EventLoop,
    settings: Settings,
    secure: Secure,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("broker", &self.settings.broker)
            .finish()
    }
}

/// What the coordinator answered.
#[derive(Debug)]
pub enum Answer {
    Accepted(ReplyBody),
    Refused(Refused),
}

fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::thread_rng().r#gen::<u64>())
}

impl Link {
    /// Connects over plain TCP with unsigned requests (fleet-sim, a lab network).
    pub async fn connect(settings: &Settings) -> Result<Link, Failure> {
        Link::connect_with(settings, &Secure::default()).await
    }

    /// Connects with TLS (pinned CA, optional client certificate) if `secure.tls` says so, and
    /// signs every request with `secure.operator_key` if given.
    pub async fn connect_with(settings: &Settings, secure: &Secure) -> Result<Link, Failure> {
        let broker = &settings.broker;
        let mut options = MqttOptions::new(random_id("fleetctl"), &broker.host, broker.port);
        if let Some(tls) = &secure.tls {
            let config = fleet_tls::client_config(
                &tls.ca,
                tls.client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )
            .map_err(|e| {
                Failure::new(Exit::Error, format!("TLS settings: {e}"))
                    .hint("--ca names the CA (PEM) that signed the broker's certificate; --client-cert/--client-key your certificate")
            })?;
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        // Replies can list a whole fleet; the defaults (10 KiB) cannot.
        options.set_max_packet_size(
            Kind::Reply.max_size() + 1024,
            Kind::Command.max_size() + 1024,
        );
        if let Some(user) = &settings.username {
            options.set_credentials(user, settings.password.clone().unwrap_or_default());
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let deadline = Instant::now() + settings.timeout;
        let unreachable = |why: String| {
            Failure::new(
                Exit::Unreachable,
                format!("cannot connect to the broker at {broker}: {why}"),
            )
            .hint(
                "is fleet-coordinator (or your broker) running there? set --broker or FLEET_BROKER",
            )
        };
        loop {
            match timeout_at(deadline, events.poll()).await {
                Err(_) => {
                    return Err(unreachable(format!(
                        "no answer within {}",
                        humantime::format_duration(settings.timeout)
                    )));
                }
                Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
                    if ack.code == ConnectReturnCode::Success {
                        break;
                    }
                    return Err(Failure::new(
                        Exit::Unreachable,
                        format!(
                            "the broker at {broker} refused the connection: {:?}",
                            ack.code
                        ),
                    )
                    .hint("check --username/--password (FLEET_USERNAME/FLEET_PASSWORD)"));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    let why = match &e {
                        rumqttc::ConnectionError::Io(io) => io.to_string(),
                        rumqttc::ConnectionError::ConnectionRefused(code) => {
                            format!("refused ({code:?})")
                        }
                        other => format!(
                            "{other} (wrong credentials are dropped without an answer by some brokers)"
                        ),
                    };
                    return Err(unreachable(why));
                }
            }
        }
        Ok(Link {
            client,
            events,
            settings: settings.clone(),
            secure: secure.clone(),
        })
    }

    /// Drives the event loop until `want` returns a value or the deadline passes.
    async fn until<T>(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
        mut want: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, Failure> {
        loop {
            match timeout_at(deadline, self.events.poll()).await {
                Err(_) => {
                    return Err(Failure::new(
                        Exit::Unreachable,
                        format!(
                            "no {waiting_for} from the coordinator via {} within {}",
                            self.settings.broker,
                            humantime::format_duration(self.settings.timeout)
                        ),
                    )
                    .hint("is fleet-coordinator running and connected to this broker? raise --timeout on a slow link"));
                }
                Ok(Ok(Event::Incoming(packet))) => {
                    if let Some(v) = want(&packet) {
                        return Ok(v);
                    }
                }
                Ok(Ok(Event::Outgoing(_))) => {}
                Ok(Err(e)) => {
                    return Err(Failure::new(
                        Exit::Unreachable,
                        format!(
                            "lost the connection to the broker at {}: {e}",
                            self.settings.broker
                        ),
                    ));
                }
            }
        }
    }

    async fn subscribe(&mut self, topic: &str, deadline: Instant) -> Result<(), Failure> {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .map_err(|e| {
                Failure::new(
                    Exit::Unreachable,
                    format!("cannot subscribe to {topic}: {e}"),
                )
            })?;
        self.until(deadline, "subscription acknowledgement", |p| {
            matches!(p, Packet::SubAck(_)).then_some(())
        })
        .await
    }

    /// Sends one command and waits for its reply.
    pub async fn request(&mut self, command: Command) -> Result<Answer, Failure> {
        let request_id = RequestId::new(random_id("q")).expect("a hex id is a valid request id");
        let reply_topic = Topic::Reply(request_id.clone()).to_string();
        let deadline = Instant::now() + self.settings.timeout;
        self.subscribe(&reply_topic, deadline).await?;
        let mut request = Request {
            request_id: request_id.clone(),
            operator: self.settings.operator.clone(),
            command,
            auth: None,
        };
        if let Some(key) = &self.secure.operator_key {
            let now = fleet_proto::UnixMillis::from_system(std::time::SystemTime::now());
            request = request.sign(key, now);
        }
        self.client
            .publish(
                Topic::Commands.to_string(),
                QoS::AtLeastOnce,
                false,
                encode(&request),
            )
            .await
            .map_err(|e| {
                Failure::new(Exit::Unreachable, format!("cannot send the request: {e}"))
            })?;
        let reply: Result<Reply, String> = self
            .until(deadline, "reply", |p| match p {
                Packet::Publish(Publish { topic, payload, .. }) if *topic == reply_topic => {
                    Some(decode::<Reply>(payload).map_err(|e| e.on(topic).to_string()))
                }
                _ => None,
            })
            .await?;
        let reply = reply.map_err(|e| {
            Failure::new(
                Exit::Error,
                format!("the coordinator's reply is unreadable: {e}"),
            )
            .hint("fleetctl and fleet-coordinator may be different versions")
        })?;
        // Best effort: the session is clean, the subscription dies with the connection anyway.
        let _ = self.client.unsubscribe(&reply_topic).await;
        Ok(match reply.result {
            ReplyResult::Accepted(body) => Answer::Accepted(*body),
            ReplyResult::Refused(refused) => Answer::Refused(refused),
        })
    }

    /// Subscribes to a rollout's retained state topic.
    pub async fn follow(&mut self, rollout: &RolloutId) -> Result<(), Failure> {
        let deadline = Instant::now() + self.settings.timeout;
        self.subscribe(&Topic::RolloutState(rollout.clone()).to_string(), deadline)
            .await
    }

    /// The next state published for a followed rollout, or `None` when `wait` passes first.
    pub async fn next_state(&mut self, wait: Duration) -> Result<Option<RolloutState>, Failure> {
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, self.events.poll()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    if let Ok(Topic::RolloutState(_)) = p.topic.parse::<Topic>() {
                        match decode::<RolloutState>(&p.payload) {
                            Ok(state) => return Ok(Some(state)),
                            Err(e) => eprintln!("warning: {}", e.on(&p.topic)),
                        }
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(Failure::new(
                        Exit::Unreachable,
                        format!(
                            "lost the connection to the broker at {}: {e}",
                            self.settings.broker
                        ),
                    ));
                }
            }
        }
    }

    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        // Let the DISCONNECT go out; a broker otherwise logs an abrupt drop.
        let _ = tokio::time::timeout(Duration::from_millis(200), self.events.poll()).await;
    }
}
