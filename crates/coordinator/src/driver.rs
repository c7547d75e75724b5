//! The driver: receives MQTT messages, operator commands and ticks, turns them into engine
//! events, runs the pure core, commits the new state with its outbox and audit rows in one
//! SQLite transaction, then publishes.
//!
//! Architecture invariant: nothing is published before the transaction that decided it has
//! committed; on start the outbox is flushed again and every desired state is republished, so
//! the coordinator restarts from SQLite alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use fleet_proto::device::{Desired, EventKind, Heartbeat, OutcomeKind, Reported};
use fleet_proto::frame::Kind;
use fleet_proto::hex::Sha256;
use fleet_proto::operator::{
    ActorKind, CheckItem, Command, DeviceStatus, DeviceView, Plan, PlannedWave, Refused, Reply,
    ReplyBody, ReplyResult, Request,
};
use fleet_proto::release::Release;
use fleet_proto::rollout::RolloutState;
use fleet_proto::trust::SignedRotation;
use fleet_proto::{DeviceId, RolloutId, SignedRelease, Topic, UnixMillis, decode, encode};
use rumqttc::{
    AsyncClient, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::baseline::Sample;
use crate::broker::{Broker, Endpoint, max_payload};
use crate::checklist::{self, CheckContext};
use crate::config::Config;
use crate::engine::{self, Action, Actor, Event, OperatorCommand, ReportedOutcome, Rollout};
use crate::http::{self, HttpState};
use crate::metrics::Metrics;
use crate::model::{DeviceInfo, reconcile_state};
use crate::operators::Operators;
use crate::registry::{AuditRow, Batch, DesiredRow, DeviceRow, OutMsg, Store};
use crate::report;
use crate::trust::Keyring;
use crate::waves::Targets;

fn now() -> UnixMillis {
    UnixMillis::from_system(SystemTime::now())
}

/// A running coordinator, as [`start`] returns it.
#[derive(Debug)]
pub struct Running {
    /// Where the broker is (the embedded broker's bound address, or the external one).
    pub broker: Endpoint,
    /// The embedded broker's address, if it is embedded.
    pub mqtt_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    /// True while the broker has acknowledged the coordinator's subscriptions.
    subscribed: watch::Receiver<bool>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the broker has acknowledged the coordinator's subscriptions: from then on
    /// no device report or operator command is lost for want of a listener. [`start`] waits
    /// for this itself with the embedded broker; with an external one it returns at once, so
    /// a broker that is down delays readiness instead of failing the start.
    pub async fn subscribed(&self) {
        let mut rx = self.subscribed.clone();
        // The sender lives as long as the MQTT loop; if that ended, there is nothing to wait for.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Stops the driver and the HTTP listener and waits for the last commit. The embedded
    /// broker keeps running until the process exits (rumqttd has no shutdown API).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.await.context("coordinator task panicked")?
    }
}

/// Runs the coordinator until `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let mut running = start(config).await?;
    info!(
        broker = %format!("{}:{}", running.broker.host, running.broker.port),
        http = %running.http_addr,
        "fleet-coordinator running"
    );
    tokio::select! {
        () = shutdown => running.stop().await,
        // Only a failure of the driver ends it before the shutdown.
        r = &mut running.task => r.context("coordinator task panicked")?,
    }
}

/// Starts the broker (embedded or external), the HTTP listener and the driver; returns once
/// all are listening.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let store = Store::open(&config.database)
        .with_context(|| format!("cannot open the registry {}", config.database.display()))?;
    let broker_cfg = config.broker.clone();
    let client_id = config.client_id.clone();
    let broker = tokio::task::spawn_blocking(move || Broker::start(&broker_cfg, &client_id))
        .await
        .context("broker start panicked")??;
    let endpoint = broker.endpoint();
    let own = broker.client_endpoint();
    let metrics = Arc::new(Metrics::default());

    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let http_addr = listener.local_addr()?;
    let app = http::router(HttpState {
        metrics: metrics.clone(),
        database: config.database.clone(),
        artifacts: config.artifacts_dir.clone(),
    });
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            error!(error = %e, "HTTP listener failed");
        }
    });

    let mut opts = MqttOptions::new(config.client_id.clone(), own.host.clone(), own.port);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_max_packet_size(max_payload(), max_payload());
    opts.set_clean_session(false);
    opts.set_inflight(1000);
    if let (Some(u), Some(p)) = (&own.username, &own.password) {
        opts.set_credentials(u.clone(), p.clone());
    } else if let Some(u) = &own.username {
        opts.set_credentials(u.clone(), String::new());
    }
    if let Some(tls) = &own.tls {
        let client = fleet_tls::client_config(
            &tls.ca,
            tls.client_cert
                .as_ref()
                .map(|(c, k)| (c.as_path(), k.as_path())),
        )
        .map_err(|e| anyhow::anyhow!("broker TLS: {e}"))?;
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(client),
        ));
    }
    let secured = match &config.broker {
        crate::config::BrokerConfig::Embedded {
            tls, credentials, ..
        } => tls.is_some() || credentials.is_some(),
        crate::config::BrokerConfig::External { tls, .. } => tls.is_some(),
    };
    if config.operators.is_empty() && secured {
        warn!(
            "no [operators] keys: operator commands are not authenticated; any client that may publish on rollouts/commands is obeyed"
        );
    }
    let (client, eventloop) = AsyncClient::new(opts, 10_000);
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = watch::channel(false);
    let mqtt_task = tokio::spawn(mqtt_loop(eventloop, client.clone(), in_tx, subscribed_tx));

    let mut driver = Driver::load(store, &config, client.clone(), metrics.clone())?;
    driver.restarted(now()).await?;

    let (stop_tx, stop_rx) = oneshot::channel();
    let tick = config.tick;
    let task = tokio::spawn(async move {
        let r = driver.main_loop(in_rx, stop_rx, tick).await;
        let _ = client.disconnect().await;
        mqtt_task.abort();
        let _ = http_stop_tx.send(());
        let _ = http_task.await;
        r
    });
    let running = Running {
        broker: endpoint,
        mqtt_addr: broker.embedded_addr(),
        http_addr,
        metrics,
        subscribed,
        shutdown: Some(stop_tx),
        task,
    };
    if running.mqtt_addr.is_some() {
        // The embedded broker runs in this process, so this takes milliseconds unless the
        // machine is very loaded; anything published before it would find no listener and be
        // dropped (a test's first command was, on a loaded CI machine).
        let wait = Duration::from_secs(30);
        if tokio::time::timeout(wait, running.subscribed())
            .await
            .is_err()
        {
            let _ = running.stop().await;
            anyhow::bail!(
                "the embedded broker did not acknowledge the coordinator's subscriptions within {wait:?}; see the log above for MQTT errors"
            );
        }
    }
    Ok(running)
}

/// What the coordinator subscribes to: every device report and the operators' commands.
const SUBSCRIBED: [Kind; 5] = [
    Kind::State,
    Kind::Heartbeat,
    Kind::Event,
    Kind::Online,
    Kind::Command,
];

enum Incoming {
    Connected,
    Publish { topic: String, payload: Vec<u8> },
}

/// Polls the MQTT event loop: re-subscribes on every ConnAck (rumqttc does not restore
/// subscriptions) and says when the broker acknowledged them, forwards publishes, and backs
/// off with jitter between errors.
async fn mqtt_loop(
    mut el: EventLoop,
    client: AsyncClient,
    tx: mpsc::UnboundedSender<Incoming>,
    subscribed: watch::Sender<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match el.poll().await {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                subscribed.send_replace(false);
                let filters = SUBSCRIBED
                    .map(|kind| SubscribeFilter::new(Topic::filter(kind), QoS::AtLeastOnce));
                if let Err(e) = client.subscribe_many(filters).await {
                    warn!(error = %e, "cannot subscribe");
                }
                if tx.send(Incoming::Connected).is_err() {
                    return;
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::SubAck(ack))) => {
                let refused: Vec<String> = SUBSCRIBED
                    .iter()
                    .zip(&ack.return_codes)
                    .filter(|(_, code)| matches!(code, SubscribeReasonCode::Failure))
                    .map(|(kind, _)| Topic::filter(*kind))
                    .collect();
                if refused.is_empty() {
                    info!("subscribed to device reports and operator commands");
                    subscribed.send_replace(true);
                } else {
                    error!(
                        refused = %refused.join(", "),
                        "the broker refused the coordinator's subscriptions; check its ACL for the coordinator's user"
                    );
                }
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic.clone();
                if tx
                    .send(Incoming::Publish {
                        topic,
                        payload: p.payload.to_vec(),
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                let wait = backoff.mul_f64(jitter);
                warn!(error = %e, retry_in = ?wait, "MQTT connection error");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Builds the registry view of a device.
pub fn device_view(row: &DeviceRow) -> DeviceView {
    let d = &row.info;
    DeviceView {
        id: d.id.clone(),
        status: if d.quarantined.is_some() {
            DeviceStatus::Quarantined
        } else if d.online {
            DeviceStatus::Online
        } else {
            DeviceStatus::Offline
        },
        facts: d.facts.clone(),
        active: d.active.clone(),
        standby: d.standby.clone(),
        last_seen: d.last_seen,
        last_health: row.heartbeat.clone(),
        discrepancy: d.discrepancy.clone(),
        quarantine_reason: d.quarantined.clone(),
    }
}

struct Driver {
    store: Store,
    client: AsyncClient,
    metrics: Arc<Metrics>,
    /// The release keys the coordinator pins: `release_keys`, then every stored rotation.
    keyring: Keyring,
    /// Rotations accepted since the last commit.
    new_rotations: Vec<(u64, SignedRotation)>,
    /// Operators' keys and the replay window: who sent a command.
    operators: Operators,
    settings: engine::Settings,
    offline_after: Duration,
    devices: HashMap<DeviceId, DeviceRow>,
    /// Devices whose row must be written at the next commit.
    dirty_devices: HashSet<DeviceId>,
    /// Devices whose row changed only in heartbeat data: written on the next tick.
    slow_dirty: HashSet<DeviceId>,
    releases: HashMap<Sha256, (Release, SignedRelease)>,
    new_releases: Vec<Sha256>,
    held: HashSet<(String, u64, String)>,
    desired: HashMap<DeviceId, DesiredRow>,
    pending_desired: Vec<DesiredRow>,
    rollouts: BTreeMap<RolloutId, Rollout>,
    /// The live rollout each device's reports go to.
    by_device: HashMap<DeviceId, RolloutId>,
    /// Rollouts to persist (and whose state to publish) at the next commit.
    touched: HashSet<RolloutId>,
    audit: Vec<AuditRow>,
    outbox: Vec<OutMsg>,
    published: Vec<i64>,
    published_state: HashMap<RolloutId, RolloutState>,
    last_seq: HashMap<(DeviceId, u8), u64>,
    next_rollout: u64,
    reports_at_last_tick: (u64, UnixMillis),
}

fn kind_byte(k: Kind) -> u8 {
    Kind::ALL.iter().position(|x| *x == k).unwrap_or(0) as u8
}

impl Driver {
    fn load(
        store: Store,
        config: &Config,
        client: AsyncClient,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Driver> {
        let devices = store.device_rows()?;
        let mut releases = HashMap::new();
        let mut held = HashSet::new();
        for (digest, signed) in store.load_releases()? {
            // Stored releases were verified when they arrived; decode without the keys in
            // case a key was rotated out since.
            match postcard_release(&signed) {
                Some(r) => {
                    held.insert((r.name.clone(), r.counter, r.version.clone()));
                    releases.insert(digest, (r, signed));
                }
                None => warn!(%digest, "stored release does not decode; ignored"),
            }
        }
        let desired = store
            .load_desired()?
            .into_iter()
            .map(|d| (d.device.clone(), d))
            .collect();
        let mut rollouts = BTreeMap::new();
        let mut by_device = HashMap::new();
        for mut r in store.load_rollouts()? {
            r.settings = config.engine.clone();
            if r.is_live() {
                for d in r.devices.keys() {
                    by_device.insert(d.clone(), r.id.clone());
                }
            }
            rollouts.insert(r.id.clone(), r);
        }
        let next_rollout = store.next_rollout_seq()?;
        let rotations = store.load_rotations()?;
        Ok(Driver {
            store,
            client,
            metrics,
            keyring: Keyring::load(&config.release_keys, rotations),
            new_rotations: Vec::new(),
            operators: Operators::new(config.operators.clone(), config.operators_max_age),
            settings: config.engine.clone(),
            offline_after: config.offline_after,
            devices,
            dirty_devices: HashSet::new(),
            slow_dirty: HashSet::new(),
            releases,
            new_releases: Vec::new(),
            held,
            desired,
            pending_desired: Vec::new(),
            rollouts,
            by_device,
            touched: HashSet::new(),
            audit: Vec::new(),
            outbox: Vec::new(),
            published: Vec::new(),
            published_state: HashMap::new(),
            last_seq: HashMap::new(),
            next_rollout,
            reports_at_last_tick: (0, now()),
        })
    }

    /// After a (re)start: publish what the outbox still holds, give every live rollout a
    /// grace period for silence, and resume.
    async fn restarted(&mut self, now: UnixMillis) -> anyhow::Result<()> {
        let pending = self.store.pending_outbox()?;
        if !pending.is_empty() {
            info!(
                messages = pending.len(),
                "publishing the outbox left by the previous run"
            );
        }
        for (id, m) in pending {
            self.publish(&m).await;
            self.published.push(id);
        }
        // Nobody listened while we were down: silence is measured from now on.
        for d in self.devices.values_mut() {
            if d.info.online {
                d.info.last_seen = Some(now);
            }
        }
        let live: Vec<RolloutId> = self
            .rollouts
            .values()
            .filter(|r| !r.is_final())
            .map(|r| r.id.clone())
            .collect();
        for id in live {
            info!(rollout = %id, "resuming rollout from the registry");
            self.apply(&id, Event::Restarted, now);
            self.touched.insert(id);
        }
        self.refresh_gauges(now);
        self.commit_and_publish(now, true).await
    }

    async fn main_loop(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Incoming>,
        mut stop: oneshot::Receiver<()>,
        tick: Duration,
    ) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut is_tick = false;
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => {
                    is_tick = true;
                    self.on_tick(now());
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let t = now();
                    self.on_incoming(msg, t).await;
                    // Group commit: take what else is waiting, up to a bound.
                    for _ in 0..2000 {
                        match rx.try_recv() {
                            Ok(m) => self.on_incoming(m, t).await,
                            Err(_) => break,
                        }
                    }
                }
            }
            self.commit_and_publish(now(), is_tick).await?;
        }
        self.commit_and_publish(now(), true).await?;
        Ok(())
    }

    async fn on_incoming(&mut self, msg: Incoming, now: UnixMillis) {
        match msg {
            Incoming::Connected => {
                // Level-triggered desired state: the broker may have lost retained messages
                // (embedded rumqttd keeps them in memory only).
                let rows: Vec<DesiredRow> = self.desired.values().cloned().collect();
                for d in rows {
                    if let Some(m) = self.desired_msg(&d) {
                        self.publish(&m).await;
                    }
                }
                let states: Vec<RolloutState> =
                    self.rollouts.values().map(|r| r.state_block(now)).collect();
                for s in states {
                    let m = state_msg(&s);
                    self.publish(&m).await;
                }
                if let Some(m) = self.keyring.message() {
                    self.publish(&m).await;
                }
                info!(
                    desired = self.desired.len(),
                    "connected to the broker; desired states republished"
                );
            }
            Incoming::Publish { topic, payload } => self.on_publish(&topic, &payload, now).await,
        }
    }

    /// Publishes one message (QoS 1). The future does not borrow the driver, whose SQLite
    /// connection is not `Sync`.
    fn publish(&self, m: &OutMsg) -> impl Future<Output = ()> + Send + 'static {
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let m = m.clone();
        async move {
            metrics.publishes.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = client
                .publish(m.topic.clone(), QoS::AtLeastOnce, m.retain, m.payload)
                .await
            {
                warn!(topic = %m.topic, error = %e, "cannot publish");
            }
        }
    }

    fn desired_msg(&self, d: &DesiredRow) -> Option<OutMsg> {
        let release = match d.release {
            Some(digest) => Some(self.releases.get(&digest)?.1.clone()),
            None => None,
        };
        let msg = Desired {
            device: d.device.clone(),
            sequence: d.sequence,
            rollout: d.rollout.clone(),
            release,
            report_interval: d.report_interval,
            retry: d.retry,
            hold: d.hold,
        };
        Some(OutMsg {
            topic: Topic::Desired(d.device.clone()).to_string(),
            payload: encode(&msg),
            retain: true,
        })
    }

    /// The answer to `plan`: the checklist, the waves and the devices left out with the reason;
    /// audited, since an operator looked at the fleet with it.
    fn plan_reply(
        &mut self,
        now: UnixMillis,
        operator: &str,
        label: String,
        items: Vec<CheckItem>,
        targets: &Targets,
        waves: Vec<PlannedWave>,
    ) -> ReplyResult {
        let failed = items.iter().filter(|i| !i.ok).count();
        self.audit_row(
            now,
            Actor::Operator(operator.to_owned()),
            None,
            None,
            format!("plan {label}"),
            format!(
                "{} of {} checklist items passed",
                items.len() - failed,
                items.len()
            ),
        );
        let mut excluded = targets.excluded.clone();
        excluded.extend(
            targets
                .busy
                .iter()
                .map(|(d, r)| (d.clone(), format!("in unfinished rollout {r}"))),
        );
        Driver::accepted(ReplyBody::Plan(Plan {
            release: label,
            checklist: items,
            waves,
            excluded,
        }))
    }

    /// A start refused because checklist items failed: audited, every failed item named.
    fn refuse_failed_checklist(
        &mut self,
        now: UnixMillis,
        operator: &str,
        what: &str,
        label: &str,
        items: Vec<CheckItem>,
        plan_command: &str,
    ) -> ReplyResult {
        let failed: Vec<String> = items
            .iter()
            .filter(|i| !i.ok)
            .map(|i| i.name.clone())
            .collect();
        self.audit_row(
            now,
            Actor::Operator(operator.to_owned()),
            None,
            None,
            format!("start {label}"),
            format!("refused: checklist failed: {}", failed.join(", ")),
        );
        ReplyResult::Refused(Refused {
            message: format!(
                "{what} of {label} refused: {} of {} checklist items failed: {}",
                failed.len(),
                items.len(),
                failed.join("; ")
            ),
            hint: Some(format!(
                "fix each failed item (see its fix), then start again; `{plan_command}` re-checks without deploying"
            )),
            checklist: items,
        })
    }

    fn audit_row(
        &mut self,
        now: UnixMillis,
        actor: Actor,
        device: Option<DeviceId>,
        rollout: Option<RolloutId>,
        action: impl Into<String>,
        outcome: impl Into<String>,
    ) {
        let (kind, name) = match actor {
            Actor::Coordinator => (ActorKind::Coordinator, "coordinator".to_owned()),
            Actor::Operator(o) => (ActorKind::Operator, o),
            Actor::Device(d) => (ActorKind::Device, d.to_string()),
        };
        self.audit.push(AuditRow {
            at: now,
            actor: kind,
            actor_name: name,
            action: action.into(),
            device,
            rollout,
            outcome: outcome.into(),
        });
    }

    /// Counts gaps in a device's per-kind report sequence. A re-sent report (at-least-once:
    /// an agent re-sends unacknowledged events after reconnecting) is not a step back: the
    /// highest `seq` seen is kept, or its successor would be counted as a gap.
    fn track_seq(&mut self, id: &DeviceId, kind: Kind, seq: u64) {
        let key = (id.clone(), kind_byte(kind));
        let last = match self.last_seq.get(&key) {
            Some(&last) => Some(last),
            // Events are the steps of an update: their gaps are tracked across restarts.
            None if kind == Kind::Event => self.devices.get(id).and_then(|d| d.info.last_event_seq),
            None => None,
        };
        if let Some(last) = last
            && seq > last + 1
        {
            let lost = seq - last - 1;
            self.metrics.lost(kind, lost);
            if kind == Kind::Event {
                warn!(device = %id, lost, "event sequence gap: update steps lost");
            } else {
                debug!(device = %id, kind = %kind, lost, "report sequence gap");
            }
        }
        if last.is_none_or(|last| seq > last) {
            self.last_seq.insert(key, seq);
            if kind == Kind::Event
                && let Some(row) = self.devices.get_mut(id)
            {
                row.info.last_event_seq = Some(seq);
                self.dirty_devices.insert(id.clone());
            }
        }
    }

    /// The registry row of a device, added (and audited) if unknown.
    fn ensure_device(&mut self, id: &DeviceId, now: UnixMillis) -> &mut DeviceRow {
        if !self.devices.contains_key(id) {
            info!(device = %id, "unknown device reported: added to the registry");
            self.audit.push(AuditRow {
                at: now,
                actor: ActorKind::Device,
                actor_name: id.to_string(),
                action: "register".into(),
                device: Some(id.clone()),
                rollout: None,
                outcome: "unknown device reported: added to the registry".into(),
            });
            self.devices.insert(
                id.clone(),
                DeviceRow {
                    info: DeviceInfo::new(id.clone()),
                    heartbeat: None,
                },
            );
            self.dirty_devices.insert(id.clone());
        }
        self.devices
            .get_mut(id)
            .expect("the device was inserted just above")
    }

    fn reject_mismatch(
        &mut self,
        topic_id: &DeviceId,
        payload_id: &DeviceId,
        kind: Kind,
        now: UnixMillis,
    ) {
        self.metrics.id_mismatches.fetch_add(1, Ordering::Relaxed);
        warn!(device = %topic_id, payload_device = %payload_id, kind = %kind, "report rejected: payload device id differs from the topic's");
        self.audit_row(
            now,
            Actor::Device(topic_id.clone()),
            Some(topic_id.clone()),
            None,
            format!("rejected {kind}"),
            format!("payload names device {payload_id}, topic names {topic_id}: rejected"),
        );
    }

    async fn on_publish(&mut self, topic: &str, payload: &[u8], now: UnixMillis) {
        let t: Topic = match topic.parse() {
            Ok(t) => t,
            Err(e) => {
                debug!(%topic, error = %e, "ignoring a message on an unknown topic");
                return;
            }
        };
        macro_rules! frame {
            ($ty:ty) => {
                match decode::<$ty>(payload) {
                    Ok(m) => m,
                    Err(e) => {
                        let e = e.on(topic);
                        self.metrics.decode_error(e.kind);
                        warn!(%topic, error = %e, "dropped a frame that does not decode");
                        return;
                    }
                }
            };
        }
        if payload.is_empty() {
            // A cleared retained message (e.g. an agent resetting its state): nothing to do.
            return;
        }
        match t {
            Topic::State(id) => {
                let rep = frame!(Reported);
                self.metrics.report(Kind::State);
                if rep.device != id {
                    return self.reject_mismatch(&id, &rep.device, Kind::State, now);
                }
                self.track_seq(&id, Kind::State, rep.seq);
                self.on_state(&id, &rep, now);
            }
            Topic::Heartbeat(id) => {
                let hb = frame!(Heartbeat);
                self.metrics.report(Kind::Heartbeat);
                if hb.device != id {
                    return self.reject_mismatch(&id, &hb.device, Kind::Heartbeat, now);
                }
                self.track_seq(&id, Kind::Heartbeat, hb.seq);
                self.on_heartbeat(&id, hb, now).await;
            }
            Topic::Events(id) => {
                let ev = frame!(fleet_proto::device::Event);
                self.metrics.report(Kind::Event);
                if ev.device != id {
                    return self.reject_mismatch(&id, &ev.device, Kind::Event, now);
                }
                self.ensure_device(&id, now);
                self.track_seq(&id, Kind::Event, ev.seq);
                self.on_event(&id, &ev, now);
            }
            Topic::Online(id) => {
                let o = frame!(fleet_proto::device::Online);
                self.metrics.report(Kind::Online);
                if o.device != id {
                    return self.reject_mismatch(&id, &o.device, Kind::Online, now);
                }
                self.on_online(&id, o.online, now).await;
            }
            Topic::Commands => {
                let req = frame!(Request);
                self.metrics.report(Kind::Command);
                self.on_command(req, now);
            }
            Topic::Desired(_) | Topic::Reply(_) | Topic::RolloutState(_) | Topic::Trust => {}
        }
    }

    fn on_state(&mut self, id: &DeviceId, rep: &Reported, now: UnixMillis) {
        let mut expected: Vec<Sha256> = Vec::new();
        if let Some(d) = self.desired.get(id).and_then(|d| d.release) {
            expected.push(d);
        }
        if let Some(r) = self.by_device.get(id).and_then(|r| self.rollouts.get(r))
            && let Some(a) = r.devices.get(id)
        {
            expected.push(r.digest);
            expected.extend(a.previous);
        }
        let row = self.ensure_device(id, now);
        let was_online = row.info.online;
        let rec = reconcile_state(&mut row.info, rep, &expected, now);
        self.dirty_devices.insert(id.clone());
        if let Some(what) = &rec.discrepancy {
            warn!(device = %id, discrepancy = %what, "registry updated from the device; flagged as a discrepancy");
            self.audit_row(now, Actor::Device(id.clone()), Some(id.clone()), None, "discrepancy", format!("{what}; registry updated from the device; not deployed to until `fleetctl device release {id}`"));
        }
        let _ = was_online;
        let outcome = rep.last_outcome.as_ref().map(|o| ReportedOutcome {
            rollout: o.rollout.clone(),
            sequence: o.sequence,
            kind: o.result.clone(),
        });
        let active = rep.active.as_ref().map(|a| a.digest);
        self.late_outcome(id, active, outcome.as_ref(), now);
        if let Some(rid) = self.by_device.get(id).cloned() {
            self.apply(
                &rid,
                Event::Reported {
                    device: id.clone(),
                    active,
                    outcome,
                },
                now,
            );
        }
    }

    /// An outcome for a rollout that has ended (halted, aborted, rolled back) still reaches
    /// it: a device whose trial was running when its wave was rolled back reports the trial's
    /// verdict afterwards, and the engine records that device as failed there. Other reports
    /// go only to the device's live rollout.
    fn late_outcome(
        &mut self,
        id: &DeviceId,
        active: Option<Sha256>,
        outcome: Option<&ReportedOutcome>,
        now: UnixMillis,
    ) {
        let Some(rid) = outcome.and_then(|o| o.rollout.clone()) else {
            return;
        };
        let ended = self
            .rollouts
            .get(&rid)
            .is_some_and(|r| !r.is_live() && r.devices.contains_key(id));
        if !ended || self.by_device.get(id) == Some(&rid) {
            return;
        }
        self.apply(
            &rid,
            Event::Reported {
                device: id.clone(),
                active,
                outcome: outcome.cloned(),
            },
            now,
        );
    }

    async fn on_heartbeat(&mut self, id: &DeviceId, hb: Heartbeat, now: UnixMillis) {
        self.metrics.heartbeat_latency(now.since(hb.at));
        let sample = Sample::from_heartbeat(&hb);
        let row = self.ensure_device(id, now);
        let came_back = !row.info.online;
        row.info.last_seen = Some(now);
        row.info.last_heartbeat_at = Some(now);
        row.info.disk_free_bytes = Some(hb.system.disk_free_bytes);
        row.info.memory_used_bytes = Some(hb.system.memory_used_bytes);
        row.info.memory_total_bytes = Some(hb.system.memory_total_bytes);
        row.info.health = Some(sample.clone());
        row.info.online = true;
        row.heartbeat = Some(hb);
        if came_back {
            self.dirty_devices.insert(id.clone());
            self.came_online(id, now).await;
        } else {
            self.slow_dirty.insert(id.clone());
        }
        if let Some(rid) = self.by_device.get(id).cloned() {
            self.apply(
                &rid,
                Event::Heartbeat {
                    device: id.clone(),
                    sample,
                },
                now,
            );
        }
    }

    fn on_event(&mut self, id: &DeviceId, ev: &fleet_proto::device::Event, now: UnixMillis) {
        let (what, outcome) = match &ev.kind {
            EventKind::DownloadStarted { size, resume_from } => (
                "download started",
                format!("{size} bytes from {resume_from}"),
            ),
            EventKind::DownloadFinished { size } => ("download finished", format!("{size} bytes")),
            EventKind::Verified => ("verified", String::new()),
            EventKind::Installed { slot } => ("installed", format!("into {slot}")),
            EventKind::Swapped { to } => ("swapped", format!("to {to}")),
            EventKind::TrialStarted { deadline } => (
                "trial started",
                format!("deadline {}", humantime::format_duration(*deadline)),
            ),
            EventKind::Committed { slot } => ("committed", format!("in {slot}")),
            EventKind::RolledBack { reason, restored } => (
                "rolled back",
                format!(
                    "{reason}; restored {}",
                    restored.as_deref().unwrap_or("nothing")
                ),
            ),
            EventKind::Refused { reason } => ("refused", reason.to_string()),
            EventKind::Failed { reason } => ("failed", reason.to_string()),
            EventKind::KeysRotated { epoch, keys } => (
                "keys rotated",
                format!(
                    "epoch {epoch}: pins [{}]",
                    keys.iter()
                        .map(|k| k.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            EventKind::RotationRefused { reason } => ("key rotation refused", reason.to_string()),
        };
        let _ = self.ensure_device(id, now);
        self.audit_row(
            now,
            Actor::Device(id.clone()),
            Some(id.clone()),
            ev.rollout.clone(),
            format!("{what} {}", ev.version),
            if outcome.is_empty() {
                format!("sequence {}", ev.sequence)
            } else {
                format!("{outcome} (sequence {})", ev.sequence)
            },
        );
        // Failures reach the engine at once (the retained state report follows).
        let kind = match &ev.kind {
            EventKind::RolledBack { reason, .. } => OutcomeKind::RolledBack(reason.clone()),
            EventKind::Refused { reason } => OutcomeKind::Refused(reason.clone()),
            EventKind::Failed { reason } => OutcomeKind::Failed(reason.clone()),
            _ => return,
        };
        let active = self.devices.get(id).and_then(|d| d.info.active_digest());
        let outcome = ReportedOutcome {
            rollout: ev.rollout.clone(),
            sequence: ev.sequence,
            kind,
        };
        self.late_outcome(id, active, Some(&outcome), now);
        if let Some(rid) = self.by_device.get(id).cloned() {
            self.apply(
                &rid,
                Event::Reported {
                    device: id.clone(),
                    active,
                    outcome: Some(outcome),
                },
                now,
            );
        }
    }

    async fn on_online(&mut self, id: &DeviceId, online: bool, now: UnixMillis) {
        let row = self.ensure_device(id, now);
        let was = row.info.online;
        row.info.online = online;
        if online {
            row.info.last_seen = Some(now);
        }
        self.dirty_devices.insert(id.clone());
        if online {
            self.came_online(id, now).await;
        } else if was {
            info!(device = %id, "device offline");
            if let Some(rid) = self.by_device.get(id).cloned() {
                self.apply(
                    &rid,
                    Event::Online {
                        device: id.clone(),
                        online: false,
                    },
                    now,
                );
            }
        }
    }

    /// A device is (back) online: republish its desired state (the broker does not redeliver
    /// retained messages on a resumed session) and tell its rollout.
    async fn came_online(&mut self, id: &DeviceId, now: UnixMillis) {
        if let Some(d) = self.desired.get(id).cloned()
            && let Some(m) = self.desired_msg(&d)
        {
            self.publish(&m).await;
        }
        if let Some(rid) = self.by_device.get(id).cloned() {
            self.apply(
                &rid,
                Event::Online {
                    device: id.clone(),
                    online: true,
                },
                now,
            );
        }
    }

    fn on_tick(&mut self, now: UnixMillis) {
        // Registry reconciliation: silent for N heartbeat intervals → offline.
        let silent: Vec<DeviceId> = self
            .devices
            .values()
            .filter(|d| {
                d.info.online
                    && d.info
                        .last_seen
                        .is_some_and(|t| now.since(t) > self.offline_after)
            })
            .map(|d| d.info.id.clone())
            .collect();
        for id in silent {
            if let Some(d) = self.devices.get_mut(&id) {
                d.info.online = false;
            }
            self.dirty_devices.insert(id.clone());
            info!(device = %id, "silent for {} heartbeat intervals: offline", self.offline_after.as_secs());
            self.audit_row(
                now,
                Actor::Coordinator,
                Some(id.clone()),
                None,
                "offline",
                format!(
                    "no report for {}",
                    humantime::format_duration(self.offline_after)
                ),
            );
            if let Some(rid) = self.by_device.get(&id).cloned() {
                self.apply(
                    &rid,
                    Event::Online {
                        device: id,
                        online: false,
                    },
                    now,
                );
            }
        }
        let live: Vec<RolloutId> = self
            .rollouts
            .values()
            .filter(|r| !r.is_final())
            .map(|r| r.id.clone())
            .collect();
        for id in live {
            self.apply(&id, Event::Tick, now);
            self.touched.insert(id);
        }
        for id in self.slow_dirty.drain() {
            self.dirty_devices.insert(id);
        }
        self.refresh_gauges(now);
    }

    fn refresh_gauges(&mut self, now: UnixMillis) {
        let mut by: BTreeMap<&'static str, u64> = BTreeMap::new();
        let mut discrepancies = 0;
        for d in self.devices.values() {
            let k = if d.info.quarantined.is_some() {
                "quarantined"
            } else if d.info.online {
                "online"
            } else {
                "offline"
            };
            *by.entry(k).or_insert(0) += 1;
            discrepancies += u64::from(d.info.discrepancy.is_some());
        }
        let total = self.metrics.reports_total();
        let (last_total, last_at) = self.reports_at_last_tick;
        let secs = now.since(last_at).as_secs_f64();
        let rate = if secs > 0.0 {
            (total - last_total) as f64 / secs
        } else {
            0.0
        };
        self.reports_at_last_tick = (total, now);
        let mut rollouts: Vec<RolloutState> =
            self.rollouts.values().map(|r| r.state_block(now)).collect();
        rollouts.reverse();
        if let Ok(mut g) = self.metrics.gauges.lock() {
            g.devices_by_status = by;
            g.discrepancies = discrepancies;
            g.reports_per_second = rate;
            g.rollouts = rollouts;
        }
    }

    /// Runs one engine step for a rollout and turns its actions into pending writes.
    /// Returns the refusal, if the step refused an operator command.
    fn apply(
        &mut self,
        rid: &RolloutId,
        ev: Event,
        now: UnixMillis,
    ) -> Option<(String, Option<String>)> {
        let r = self.rollouts.remove(rid)?;
        let was_final = r.is_final();
        let was_live = r.is_live();
        let (r, actions) = engine::step(r, &ev, now);
        let became_final = !was_final && r.is_final();
        let still_live = r.is_live();
        let devices: Vec<DeviceId> = if became_final || (was_live && !still_live) {
            r.devices.keys().cloned().collect()
        } else {
            Vec::new()
        };
        self.rollouts.insert(rid.clone(), r);
        if !actions.is_empty() {
            self.touched.insert(rid.clone());
        }
        let refusal = self.execute(rid, actions, now);
        if became_final {
            for d in &devices {
                if let Some(row) = self.devices.get_mut(d)
                    && row.info.rollout.as_ref() == Some(rid)
                {
                    row.info.rollout = None;
                    self.dirty_devices.insert(d.clone());
                }
            }
        }
        if was_live && !still_live {
            for d in &devices {
                if self.by_device.get(d) == Some(rid) {
                    self.by_device.remove(d);
                }
            }
        }
        refusal
    }

    fn execute(
        &mut self,
        rid: &RolloutId,
        actions: Vec<Action>,
        now: UnixMillis,
    ) -> Option<(String, Option<String>)> {
        let mut refusal = None;
        for a in actions {
            match a {
                Action::Desire {
                    device,
                    release,
                    sequence,
                    report_interval,
                    retry,
                    hold,
                } => {
                    let row = DesiredRow {
                        device: device.clone(),
                        sequence,
                        rollout: Some(rid.clone()),
                        release,
                        report_interval,
                        retry,
                        hold,
                    };
                    if let Some(m) = self.desired_msg(&row) {
                        self.outbox.push(m);
                    } else {
                        error!(device = %device, rollout = %rid, "desired release is not in the registry; not published");
                    }
                    if let Some(d) = self.devices.get_mut(&device) {
                        d.info.desired_sequence = sequence;
                        d.info.desired_retry = retry;
                        self.dirty_devices.insert(device.clone());
                    }
                    self.desired.insert(device, row.clone());
                    self.pending_desired.push(row);
                }
                Action::Quarantine { device, reason } => {
                    warn!(device = %device, rollout = %rid, %reason, "device quarantined");
                    if let Some(d) = self.devices.get_mut(&device) {
                        d.info.quarantined = Some(reason.clone());
                        self.dirty_devices.insert(device.clone());
                    }
                    self.audit_row(
                        now,
                        Actor::Coordinator,
                        Some(device),
                        Some(rid.clone()),
                        "quarantine",
                        reason,
                    );
                }
                Action::Audit {
                    actor,
                    device,
                    action,
                    outcome,
                } => {
                    self.audit_row(now, actor, device, Some(rid.clone()), action, outcome);
                }
                Action::Transition { from, to, event } => {
                    let wave = self.rollouts.get(rid).map_or(0, |r| r.current);
                    info!(rollout = %rid, wave, %from, %to, %event, "rollout transition");
                }
                Action::Fired {
                    trigger,
                    wave,
                    detail,
                } => {
                    self.metrics.trigger(&trigger);
                    warn!(rollout = %rid, %wave, trigger = trigger.as_str(), %detail, "rollback trigger fired");
                }
                Action::Refuse { message, hint } => refusal = Some((message, hint)),
            }
        }
        refusal
    }

    async fn commit_and_publish(
        &mut self,
        now: UnixMillis,
        force_state: bool,
    ) -> anyhow::Result<()> {
        // Rollout state blocks to publish: touched ones (and every live one on a tick).
        let mut states = Vec::new();
        let ids: Vec<RolloutId> = if force_state {
            self.rollouts.keys().cloned().collect()
        } else {
            self.touched.iter().cloned().collect()
        };
        for id in ids {
            let Some(r) = self.rollouts.get(&id) else {
                continue;
            };
            let s = r.state_block(now);
            let changed = self.published_state.get(&id).is_none_or(|p| {
                let mut p = p.clone();
                p.updated_at = s.updated_at;
                p != s
            });
            if changed {
                self.outbox.push(state_msg(&s));
                states.push(s);
            }
        }
        if self.dirty_devices.is_empty()
            && self.touched.is_empty()
            && self.pending_desired.is_empty()
            && self.audit.is_empty()
            && self.outbox.is_empty()
            && self.published.is_empty()
            && self.new_releases.is_empty()
            && self.new_rotations.is_empty()
        {
            return Ok(());
        }
        let dirty: Vec<DeviceId> = self.dirty_devices.drain().collect();
        let touched: Vec<RolloutId> = self.touched.drain().collect();
        let mut dirty_assign: Vec<(RolloutId, Vec<DeviceId>)> = Vec::new();
        for id in &touched {
            if let Some(r) = self.rollouts.get_mut(id) {
                let d: Vec<DeviceId> = std::mem::take(&mut r.dirty).into_iter().collect();
                dirty_assign.push((id.clone(), d));
            }
        }
        let outbox = std::mem::take(&mut self.outbox);
        let ids = {
            let mut batch = Batch {
                devices: dirty.iter().filter_map(|d| self.devices.get(d)).collect(),
                releases: self
                    .new_releases
                    .iter()
                    .filter_map(|d| self.releases.get(d).map(|(r, s)| (*d, r, s)))
                    .collect(),
                desired: std::mem::take(&mut self.pending_desired),
                rollouts: touched
                    .iter()
                    .filter_map(|id| self.rollouts.get(id))
                    .collect(),
                assignments: Vec::new(),
                audit: std::mem::take(&mut self.audit),
                outbox,
                published: std::mem::take(&mut self.published),
                rotations: std::mem::take(&mut self.new_rotations),
            };
            for (rid, devs) in &dirty_assign {
                if let Some(r) = self.rollouts.get(rid) {
                    for d in devs {
                        if let Some((k, a)) = r.devices.get_key_value(d) {
                            batch.assignments.push((&r.id, k, a));
                        }
                    }
                }
            }
            let ids = self
                .store
                .commit(&batch, now)
                .context("cannot commit to the registry")?;
            ids.into_iter().zip(batch.outbox).collect::<Vec<_>>()
        };
        self.new_releases.clear();
        for s in states {
            self.published_state.insert(s.rollout.clone(), s);
        }
        for (id, m) in ids {
            self.publish(&m).await;
            self.published.push(id);
        }
        Ok(())
    }

    fn reply(&mut self, req: &Request, result: ReplyResult) {
        let reply = Reply {
            request_id: req.request_id.clone(),
            result,
        };
        self.outbox.push(OutMsg {
            topic: Topic::Reply(req.request_id.clone()).to_string(),
            payload: encode(&reply),
            retain: false,
        });
    }

    fn refused(message: String, hint: Option<String>) -> ReplyResult {
        ReplyResult::Refused(Refused {
            message,
            hint,
            checklist: Vec::new(),
        })
    }

    fn accepted(body: ReplyBody) -> ReplyResult {
        ReplyResult::Accepted(Box::new(body))
    }

    fn unknown_rollout(id: &RolloutId) -> ReplyResult {
        Driver::refused(
            format!("no rollout {id}"),
            Some("`fleetctl rollout list` shows the known rollouts".into()),
        )
    }

    fn on_command(&mut self, req: Request, now: UnixMillis) {
        info!(request = %req.request_id, operator = %req.operator, command = ?std::mem::discriminant(&req.command), "operator command");
        // Who sent it, before anything else: see `operators.rs`.
        if let Err(why) = self.operators.check(&req, now) {
            warn!(request = %req.request_id, operator = %req.operator, "command refused: {why}");
            self.audit_row(
                now,
                Actor::Coordinator,
                None,
                None,
                "refused an unauthenticated command",
                format!(
                    "request {} claiming operator {:?}: {why}",
                    req.request_id, req.operator
                ),
            );
            let result = Driver::refused(
                format!("command refused: {why}"),
                Some("sign commands with your operator key (fleetctl --operator-key FILE); the coordinator's [operators] keys must list your name and public key".into()),
            );
            self.reply(&req, result);
            return;
        }
        let result = match &req.command {
            Command::Plan { release } => self.cmd_plan(&req, release, now, false),
            Command::Start { release } => self.cmd_plan(&req, release, now, true),
            Command::PlanAb { a, b } => self.cmd_plan_ab(&req, a, b, now, false),
            Command::StartAb { a, b } => self.cmd_plan_ab(&req, a, b, now, true),
            Command::Promote { rollout, arm } => self.cmd_engine(&req, rollout, OperatorCommand::Promote(*arm), now),
            Command::Approve { rollout } => self.cmd_engine(&req, rollout, OperatorCommand::Approve, now),
            Command::Pause { rollout } => self.cmd_engine(&req, rollout, OperatorCommand::Pause, now),
            Command::Resume { rollout } => self.cmd_engine(&req, rollout, OperatorCommand::Resume, now),
            Command::Abort { rollout } => self.cmd_engine(&req, rollout, OperatorCommand::Abort, now),
            Command::Rollback { rollout } => self.cmd_engine(&req, rollout, OperatorCommand::Rollback, now),
            Command::Status { rollout } => match self.rollouts.get(rollout) {
                Some(r) => Driver::accepted(ReplyBody::State(r.state_block(now))),
                None => Driver::unknown_rollout(rollout),
            },
            Command::ListRollouts => {
                let mut list: Vec<RolloutState> = self.rollouts.values().map(|r| r.state_block(now)).collect();
                list.reverse();
                Driver::accepted(ReplyBody::Rollouts(list))
            }
            Command::Report { rollout } => match self.rollouts.get(rollout) {
                Some(r) => Driver::accepted(ReplyBody::Report(Box::new(report::build(r, now)))),
                None => Driver::unknown_rollout(rollout),
            },
            Command::ListDevices => {
                let mut views: Vec<DeviceView> = self.devices.values().map(device_view).collect();
                views.sort_by(|a, b| a.id.cmp(&b.id));
                Driver::accepted(ReplyBody::Devices(views))
            }
            Command::ShowDevice { device } => match self.devices.get(device) {
                Some(row) => Driver::accepted(ReplyBody::Device(Box::new(device_view(row)))),
                None => Driver::refused(
                    format!("no device {device} in the registry"),
                    Some("`fleetctl devices` lists the registered devices; a device registers itself when its agent first reports".into()),
                ),
            },
            Command::Quarantine { device, reason } => self.cmd_quarantine(&req, device, reason, now),
            Command::ReleaseDevice { device } => self.cmd_release(&req, device, now),
            Command::RotateKeys { rotation } => self.cmd_rotate(&req, rotation, now),
            Command::Audit(q) => {
                // Pending rows first, so an audit query sees everything decided so far.
                if let Err(e) = self.flush_audit(now) {
                    Driver::refused(format!("cannot read the audit trail: {e:#}"), None)
                } else {
                    match self.store.audit(q) {
                        Ok(rows) => Driver::accepted(ReplyBody::Audit(rows)),
                        Err(e) => Driver::refused(format!("cannot read the audit trail: {e}"), None),
                    }
                }
            }
        };
        if let ReplyResult::Refused(r) = &result {
            info!(request = %req.request_id, message = %r.message, "command refused");
        }
        self.reply(&req, result);
    }

    fn flush_audit(&mut self, now: UnixMillis) -> anyhow::Result<()> {
        let batch = Batch {
            audit: std::mem::take(&mut self.audit),
            ..Batch::default()
        };
        self.store.commit(&batch, now)?;
        Ok(())
    }

    fn cmd_rotate(
        &mut self,
        req: &Request,
        signed: &SignedRotation,
        now: UnixMillis,
    ) -> ReplyResult {
        match self.keyring.rotate(signed.clone()) {
            Ok(rotation) => {
                let ids: Vec<String> = self
                    .keyring
                    .pinned
                    .keys
                    .iter()
                    .map(|k| fleet_proto::release::key_id(k).to_string())
                    .collect();
                let what = format!("epoch {}: pins [{}]", rotation.epoch, ids.join(", "));
                info!(operator = %req.operator, "release keys rotated, {what}");
                self.new_rotations.push((rotation.epoch, signed.clone()));
                if let Some(m) = self.keyring.message() {
                    self.outbox.push(m);
                }
                self.audit_row(
                    now,
                    Actor::Operator(req.operator.clone()),
                    None,
                    None,
                    "rotate release keys",
                    format!("{what}; published on fleet/v1/trust"),
                );
                Driver::accepted(ReplyBody::Done {
                    message: format!(
                        "release keys rotated ({what}); devices apply it from fleet/v1/trust"
                    ),
                })
            }
            Err(refusal) => {
                self.audit_row(
                    now,
                    Actor::Operator(req.operator.clone()),
                    None,
                    None,
                    "rotate release keys",
                    format!("refused: {refusal}"),
                );
                Driver::refused(
                    format!("key rotation refused: {refusal}"),
                    Some("sign it with every key the fleet pins now and every new key (fleetctl key rotate); `fleetctl key show-rotation FILE` shows what it says".into()),
                )
            }
        }
    }

    fn cmd_plan(
        &mut self,
        req: &Request,
        signed: &SignedRelease,
        now: UnixMillis,
        start: bool,
    ) -> ReplyResult {
        let opened = signed.open(&self.keyring.pinned.keys);
        let digest = signed.digest();
        if let Ok(r) = &opened
            && !self.releases.contains_key(&digest)
        {
            // Every verified release is kept: it may be a rollback target later.
            self.held
                .insert((r.name.clone(), r.counter, r.version.clone()));
            self.releases.insert(digest, (r.clone(), signed.clone()));
            self.new_releases.push(digest);
        }
        let held = &self.held;
        let held_fn = |name: &str, counter: u64, version: &str| {
            held.contains(&(name.to_owned(), counter, version.to_owned()))
        };
        let ctx = CheckContext {
            now,
            fresh_heartbeat: self.settings.report_interval * 3,
            held: &held_fn,
        };
        let infos: Vec<&DeviceInfo> = self.devices.values().map(|d| &d.info).collect();
        let mut v = checklist::check(signed, &opened, &infos, &ctx);
        if let Ok(r) = &opened {
            v.items.extend(crate::ab::alone(r));
        }
        let label = opened
            .as_ref()
            .map_or_else(|_| format!("release {}", digest.short()), |r| r.label());
        let Ok(release) = opened else {
            return ReplyResult::Refused(Refused {
                message: format!("{label} refused: its signature does not verify"),
                hint: Some(
                    "sign it with a release key listed in the coordinator's release_keys".into(),
                ),
                checklist: v.items,
            });
        };
        let lookup = |d: &DeviceId| {
            self.devices.get(d).map_or_else(
                || ("unknown".to_owned(), "unknown".to_owned()),
                |r| (r.info.device_type().to_owned(), r.info.region().to_owned()),
            )
        };
        if !start {
            let waves = v.plan.planned_waves(&lookup);
            return self.plan_reply(now, &req.operator, label, v.items, &v.targets, waves);
        }
        if !v.ok() {
            return self.refuse_failed_checklist(
                now,
                &req.operator,
                "rollout",
                &label,
                v.items,
                "fleetctl plan",
            );
        }
        let id = match RolloutId::new(format!("r-{}", self.next_rollout)) {
            Ok(id) => id,
            Err(e) => return Driver::refused(format!("cannot name the rollout: {e}"), None),
        };
        self.next_rollout += 1;
        let targets: BTreeMap<DeviceId, &DeviceInfo> = v
            .plan
            .canary
            .iter()
            .chain(v.plan.waves.iter().flatten())
            .filter_map(|d| self.devices.get(d).map(|r| (d.clone(), &r.info)))
            .collect();
        let (r, actions) = engine::create(
            id.clone(),
            digest,
            release,
            &req.operator,
            &v.plan,
            &targets,
            self.settings.clone(),
            now,
        );
        for d in r.devices.keys() {
            self.by_device.insert(d.clone(), id.clone());
            if let Some(row) = self.devices.get_mut(d) {
                row.info.rollout = Some(id.clone());
                self.dirty_devices.insert(d.clone());
            }
        }
        let state = r.state_block(now);
        self.rollouts.insert(id.clone(), r);
        self.touched.insert(id.clone());
        self.execute(&id, actions, now);
        info!(rollout = %id, operator = %req.operator, "rollout started");
        Driver::accepted(ReplyBody::Started(state))
    }

    /// Verifies a signed release and keeps it (it may be a rollback target later).
    fn hold(&mut self, signed: &SignedRelease) -> Result<Release, fleet_proto::release::Refusal> {
        let opened = signed.open(&self.keyring.pinned.keys);
        let digest = signed.digest();
        if let Ok(r) = &opened
            && !self.releases.contains_key(&digest)
        {
            self.held
                .insert((r.name.clone(), r.counter, r.version.clone()));
            self.releases.insert(digest, (r.clone(), signed.clone()));
            self.new_releases.push(digest);
        }
        opened
    }

    /// `plan`/`start` of an A/B pair: both checklists, the pair's items, the arms.
    fn cmd_plan_ab(
        &mut self,
        req: &Request,
        a: &SignedRelease,
        b: &SignedRelease,
        now: UnixMillis,
        start: bool,
    ) -> ReplyResult {
        let (opened_a, opened_b) = (self.hold(a), self.hold(b));
        let held = &self.held;
        let held_fn = |name: &str, counter: u64, version: &str| {
            held.contains(&(name.to_owned(), counter, version.to_owned()))
        };
        let ctx = CheckContext {
            now,
            fresh_heartbeat: self.settings.report_interval * 3,
            held: &held_fn,
        };
        let infos: Vec<&DeviceInfo> = self.devices.values().map(|d| &d.info).collect();
        let v = crate::ab::check((a, &opened_a), (b, &opened_b), &infos, &ctx);
        let label_of = |o: &Result<Release, _>, s: &SignedRelease| {
            o.as_ref().map_or_else(
                |_| format!("release {}", s.digest().short()),
                Release::label,
            )
        };
        let label = format!(
            "{} (A) vs {} (B)",
            label_of(&opened_a, a),
            label_of(&opened_b, b)
        );
        let (Ok(ra), Ok(rb)) = (opened_a, opened_b) else {
            return ReplyResult::Refused(Refused {
                message: format!("A/B {label} refused: a signature does not verify"),
                hint: Some(
                    "sign both with a release key listed in the coordinator's release_keys".into(),
                ),
                checklist: v.items,
            });
        };
        let lookup = |d: &DeviceId| {
            self.devices.get(d).map_or_else(
                || ("unknown".to_owned(), "unknown".to_owned()),
                |r| (r.info.device_type().to_owned(), r.info.region().to_owned()),
            )
        };
        if !start {
            let mut waves = crate::waves::WavePlan {
                canary: v.plan.a.clone(),
                waves: std::iter::once(v.plan.b.clone())
                    .chain(v.plan.waves.iter().cloned())
                    .collect(),
                uncovered: Vec::new(),
            }
            .planned_waves(&lookup);
            if let [arm_a, arm_b, rest @ ..] = waves.as_mut_slice() {
                arm_a.name = format!("arm A ({})", ra.label());
                arm_b.name = format!("arm B ({})", rb.label());
                for (i, w) in rest.iter_mut().enumerate() {
                    w.name = format!("wave {} (the promoted arm)", i + 1);
                }
            }
            return self.plan_reply(now, &req.operator, label, v.items, &v.targets, waves);
        }
        if !v.ok() {
            return self.refuse_failed_checklist(
                now,
                &req.operator,
                "A/B rollout",
                &label,
                v.items,
                "fleetctl plan A.toml --versus B.toml",
            );
        }
        let id = match RolloutId::new(format!("r-{}", self.next_rollout)) {
            Ok(id) => id,
            Err(e) => return Driver::refused(format!("cannot name the rollout: {e}"), None),
        };
        self.next_rollout += 1;
        let targets: BTreeMap<DeviceId, &DeviceInfo> = v
            .plan
            .a
            .iter()
            .chain(&v.plan.b)
            .chain(v.plan.waves.iter().flatten())
            .filter_map(|d| self.devices.get(d).map(|r| (d.clone(), &r.info)))
            .collect();
        let (r, actions) = engine::create_ab(
            id.clone(),
            (a.digest(), ra),
            (b.digest(), rb),
            &req.operator,
            &v.plan,
            &targets,
            self.settings.clone(),
            now,
        );
        for d in r.devices.keys() {
            self.by_device.insert(d.clone(), id.clone());
            if let Some(row) = self.devices.get_mut(d) {
                row.info.rollout = Some(id.clone());
                self.dirty_devices.insert(d.clone());
            }
        }
        let state = r.state_block(now);
        self.rollouts.insert(id.clone(), r);
        self.touched.insert(id.clone());
        self.execute(&id, actions, now);
        info!(rollout = %id, operator = %req.operator, "A/B rollout started");
        Driver::accepted(ReplyBody::Started(state))
    }

    fn cmd_engine(
        &mut self,
        req: &Request,
        rollout: &RolloutId,
        cmd: OperatorCommand,
        now: UnixMillis,
    ) -> ReplyResult {
        if !self.rollouts.contains_key(rollout) {
            return Driver::unknown_rollout(rollout);
        }
        let ev = Event::Operator {
            operator: req.operator.clone(),
            command: cmd,
        };
        match self.apply(rollout, ev, now) {
            Some((message, hint)) => {
                self.audit_row(
                    now,
                    Actor::Operator(req.operator.clone()),
                    None,
                    Some(rollout.clone()),
                    cmd.as_str(),
                    format!("refused: {message}"),
                );
                Driver::refused(message, hint)
            }
            None => match self.rollouts.get(rollout) {
                Some(r) => Driver::accepted(ReplyBody::State(r.state_block(now))),
                None => Driver::unknown_rollout(rollout),
            },
        }
    }

    fn cmd_quarantine(
        &mut self,
        req: &Request,
        device: &DeviceId,
        reason: &str,
        now: UnixMillis,
    ) -> ReplyResult {
        let Some(row) = self.devices.get_mut(device) else {
            return Driver::refused(
                format!("no device {device} in the registry"),
                Some("`fleetctl devices` lists the registered devices".into()),
            );
        };
        if let Some(r) = &row.info.quarantined {
            return Driver::refused(
                format!("device {device} is already quarantined: {r}"),
                Some(format!("`fleetctl device release {device}` releases it")),
            );
        }
        let why = format!("by {}: {reason}", req.operator);
        row.info.quarantined = Some(why.clone());
        self.dirty_devices.insert(device.clone());
        self.audit_row(
            now,
            Actor::Operator(req.operator.clone()),
            Some(device.clone()),
            None,
            "quarantine",
            why,
        );
        if let Some(rid) = self.by_device.get(device).cloned() {
            self.apply(
                &rid,
                Event::Quarantined {
                    device: device.clone(),
                },
                now,
            );
        }
        Driver::accepted(ReplyBody::Done {
            message: format!(
                "device {device} quarantined: no rollout deploys to it until `fleetctl device release {device}`"
            ),
        })
    }

    fn cmd_release(&mut self, req: &Request, device: &DeviceId, now: UnixMillis) -> ReplyResult {
        let Some(row) = self.devices.get_mut(device) else {
            return Driver::refused(
                format!("no device {device} in the registry"),
                Some("`fleetctl devices` lists the registered devices".into()),
            );
        };
        if row.info.quarantined.is_none() && row.info.discrepancy.is_none() {
            return Driver::refused(
                format!("device {device} is neither quarantined nor flagged with a discrepancy"),
                None,
            );
        }
        let what = match (row.info.quarantined.take(), row.info.discrepancy.take()) {
            (Some(q), Some(d)) => format!("quarantine ({q}) and discrepancy ({d}) cleared"),
            (Some(q), None) => format!("quarantine ({q}) cleared"),
            (None, Some(d)) => {
                format!("discrepancy ({d}) resolved: the registry keeps what the device reported")
            }
            (None, None) => String::new(),
        };
        self.dirty_devices.insert(device.clone());
        self.audit_row(
            now,
            Actor::Operator(req.operator.clone()),
            Some(device.clone()),
            None,
            "release",
            what.clone(),
        );
        Driver::accepted(ReplyBody::Done {
            message: format!("device {device}: {what}; later rollouts may deploy to it"),
        })
    }
}

fn state_msg(s: &RolloutState) -> OutMsg {
    OutMsg {
        topic: Topic::RolloutState(s.rollout.clone()).to_string(),
        payload: encode(s),
        retain: true,
    }
}

fn postcard_release(signed: &SignedRelease) -> Option<Release> {
    // The canonical bytes are the release's postcard encoding (see fleet_proto::release).
    postcard::from_bytes(&signed.release).ok()
}
