//! The MQTT link (rumqttc): one client per connection attempt.
//!
//! Design: every attempt gets a fresh `AsyncClient` + `EventLoop` with a clean session, and its
//! own forwarding task. When the connection drops, that whole generation is thrown away
//! (rumqttc would otherwise replay or drop queued requests in ways the agent cannot track), and
//! the next attempt starts after a backoff with jitter. Within one generation rumqttc turns
//! requests into `Outgoing::Publish(pkid)` strictly in order, so a FIFO of tags maps each
//! QoS 1 event to its packet id, and the broker's PUBACK to the outbox entry it confirms.
//! Events are at-least-once: one published just before a drop is sent again after the
//! reconnect (the coordinator de-duplicates by `seq`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use fleet_proto::frame::Kind;
use rumqttc::{AsyncClient, Event, Incoming, LastWill, MqttOptions, Outgoing, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::MqttConfig;

#[derive(Clone, Debug)]
pub struct LinkOptions {
    pub client_id: String,
    pub mqtt: MqttConfig,
    /// Topic and payload of the last will (retained, QoS 1).
    pub will_topic: String,
    pub will_payload: Vec<u8>,
    /// TLS with the pinned CA (and a client certificate), built once at start; `None`: TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What the link tells the driver.
#[derive(Debug)]
pub enum LinkEvent {
    /// A new session is up: subscribe, announce, report, flush the outbox.
    Connected,
    Disconnected(String),
    Message {
        topic: String,
        payload: Vec<u8>,
    },
    /// The broker acknowledged the event with this outbox seq.
    Delivered(u64),
}

type Forwarded = (u64, Result<Event, String>);

#[derive(Debug)]
pub struct Link {
    opts: LinkOptions,
    generation: u64,
    client: Option<AsyncClient>,
    tx: mpsc::Sender<Forwarded>,
    rx: mpsc::Receiver<Forwarded>,
    connected: bool,
    backoff: Duration,
    reconnect_at: Option<Instant>,
    /// Tags of publishes not yet turned into packets, in request order (`Some(seq)`: an event).
    tags: VecDeque<Option<u64>>,
    by_pkid: HashMap<u16, u64>,
    /// The highest event seq handed to this generation's client.
    sent_upto: u64,
}

/// Requests rumqttc may hold; the outbox window stays below it.
const CHANNEL: usize = 256;
pub const EVENT_WINDOW: usize = 64;

impl Link {
    pub fn new(opts: LinkOptions) -> Link {
        let (tx, rx) = mpsc::channel(1024);
        let backoff = opts.mqtt.reconnect_min;
        Link {
            opts,
            generation: 0,
            client: None,
            tx,
            rx,
            connected: false,
            backoff,
            reconnect_at: Some(Instant::now()),
            tags: VecDeque::new(),
            by_pkid: HashMap::new(),
            sent_upto: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    fn connect(&mut self) {
        self.generation += 1;
        let generation = self.generation;
        let m = &self.opts.mqtt;
        let mut o = MqttOptions::new(self.opts.client_id.clone(), m.host.clone(), m.port);
        o.set_keep_alive(m.keep_alive.max(Duration::from_secs(1)));
        o.set_clean_session(true);
        // Incoming: a desired state with its signed release; room above the protocol's limit
        // so an oversized frame reaches `decode` (counted and dropped) instead of killing the
        // connection and coming back, retained, forever.
        let incoming = Kind::Desired.max_size() * 4 + 1024;
        let outgoing = Kind::State.max_size() + 1024;
        o.set_max_packet_size(incoming, outgoing);
        o.set_request_channel_capacity(CHANNEL);
        o.set_inflight(100);
        o.set_last_will(LastWill::new(
            self.opts.will_topic.clone(),
            self.opts.will_payload.clone(),
            QoS::AtLeastOnce,
            true,
        ));
        if let (Some(u), Some(p)) = (&m.username, &m.password) {
            o.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &self.opts.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(o, CHANNEL);
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(ev) => {
                        if tx.send((generation, Ok(ev))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send((generation, Err(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        self.client = Some(client);
        self.tags.clear();
        self.by_pkid.clear();
        self.sent_upto = 0;
    }

    fn drop_generation(&mut self, why: &str) {
        self.connected = false;
        if let Some(c) = self.client.take() {
            // Ends the forwarding task's eventloop on its next poll.
            let _ = c.try_disconnect();
        }
        self.generation += 1;
        let wait = crate::fetch::jitter(self.backoff);
        self.backoff = (self.backoff * 2).min(self.opts.mqtt.reconnect_max);
        self.reconnect_at = Some(Instant::now() + wait);
        tracing::debug!("mqtt: {why}; reconnecting in {} ms", wait.as_millis());
    }

    /// Waits for the next thing worth telling the driver. Cancel-safe.
    pub async fn next(&mut self) -> LinkEvent {
        loop {
            if let Some(at) = self.reconnect_at {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {
                        self.reconnect_at = None;
                        self.connect();
                        continue;
                    }
                    Some(f) = self.rx.recv() => {
                        if let Some(ev) = self.handle(f) { return ev; }
                    }
                }
            } else if let Some(f) = self.rx.recv().await
                && let Some(ev) = self.handle(f)
            {
                return ev;
            }
        }
    }

    fn handle(&mut self, (generation, ev): Forwarded) -> Option<LinkEvent> {
        if generation != self.generation {
            return None;
        }
        match ev {
            Err(e) => {
                let was = self.connected;
                self.drop_generation(&e);
                was.then_some(LinkEvent::Disconnected(e))
            }
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                self.connected = true;
                self.backoff = self.opts.mqtt.reconnect_min;
                Some(LinkEvent::Connected)
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => Some(LinkEvent::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            }),
            Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                self.by_pkid.remove(&ack.pkid).map(LinkEvent::Delivered)
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(Some(seq)) = self.tags.pop_front()
                    && pkid != 0
                {
                    self.by_pkid.insert(pkid, seq);
                }
                None
            }
            Ok(_) => None,
        }
    }

    fn publish(
        &mut self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        tag: Option<u64>,
    ) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        if !self.connected {
            return false;
        }
        match client.try_publish(topic, qos, retain, payload) {
            Ok(()) => {
                self.tags.push_back(tag);
                true
            }
            Err(e) => {
                tracing::debug!("mqtt: publish not queued: {e}");
                false
            }
        }
    }

    pub fn publish_retained(&mut self, topic: String, payload: Vec<u8>) -> bool {
        self.publish(topic, QoS::AtLeastOnce, true, payload, None)
    }

    pub fn publish_qos0(&mut self, topic: String, payload: Vec<u8>) -> bool {
        self.publish(topic, QoS::AtMostOnce, false, payload, None)
    }

    pub fn subscribe(&mut self, topic: String) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        client.try_subscribe(topic, QoS::AtLeastOnce).is_ok()
    }

    /// Hands undelivered events to the client, in order, up to the window.
    pub fn flush_events<'a>(
        &mut self,
        topic: &str,
        pending: impl Iterator<Item = (u64, &'a [u8])>,
    ) {
        if !self.connected {
            return;
        }
        for (seq, frame) in pending {
            if seq <= self.sent_upto {
                continue;
            }
            if self.by_pkid.len() + self.tags.len() >= EVENT_WINDOW {
                return;
            }
            if !self.publish(
                topic.to_owned(),
                QoS::AtLeastOnce,
                false,
                frame.to_vec(),
                Some(seq),
            ) {
                return;
            }
            self.sent_upto = seq;
        }
    }
}
