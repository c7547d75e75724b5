//! Test support: devices played by real rumqttc clients, an operator client, a tiny HTTP GET,
//! and child processes killed on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_coordinator::testkit;
use fleet_proto::device::{
    AppHealth, AppStatus, BlueGreenSupport, Desired, Heartbeat, Installed, Online, Outcome,
    OutcomeKind, Reported, Slot, SystemHealth, UpdatePhase,
};
use fleet_proto::operator::{Command, Reply, Request};
use fleet_proto::{DeviceId, RequestId, Topic, UnixMillis, decode, encode};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

pub fn now() -> UnixMillis {
    UnixMillis::from_system(std::time::SystemTime::now())
}

/// Waits for a condition, polling, failing loudly after `limit`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How a simulated device behaves once it runs the new version, and what it says about itself.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub bad_version: Option<String>,
    pub error_rate_when_bad: f32,
    /// What its reported states say about blue-green (it commits any release it gets).
    pub blue_green: BlueGreenSupport,
}

impl Default for Behaviour {
    /// A device that runs every release well and says it can run blue-green.
    fn default() -> Self {
        Behaviour {
            bad_version: None,
            error_rate_when_bad: 0.0,
            blue_green: BlueGreenSupport::Supported,
        }
    }
}

#[derive(Debug, Default)]
pub struct DeviceLog {
    pub desired: Vec<Desired>,
    pub active: Option<Installed>,
}

/// A device played by a real MQTT client.
#[derive(Debug)]
pub struct FakeDevice {
    pub id: DeviceId,
    pub log: Arc<Mutex<DeviceLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct DevState {
    id: DeviceId,
    device_type: String,
    region: String,
    active: Option<Installed>,
    applied: u64,
    outcome: Option<Outcome>,
    seq_state: u64,
    seq_hb: u64,
    highest: u64,
    blue_green: BlueGreenSupport,
}

impl DevState {
    fn reported(&mut self) -> Reported {
        self.seq_state += 1;
        Reported {
            device: self.id.clone(),
            seq: self.seq_state,
            facts: testkit::facts(&self.device_type, &self.region, &[]),
            active: self.active.clone(),
            standby: None,
            phase: UpdatePhase::Idle,
            applied_sequence: self.applied,
            last_outcome: self.outcome.clone(),
            highest_counter: self.highest,
            at: now(),
            blue_green: self.blue_green.clone(),
        }
    }
}

pub fn spawn_device(
    port: u16,
    id: &str,
    device_type: &str,
    region: &str,
    active: Option<Installed>,
    behaviour: Behaviour,
    heartbeat: Duration,
) -> FakeDevice {
    let id = DeviceId::new(id).unwrap();
    let log = Arc::new(Mutex::new(DeviceLog {
        desired: Vec::new(),
        active: active.clone(),
    }));
    let mut st = DevState {
        id: id.clone(),
        device_type: device_type.into(),
        region: region.into(),
        highest: active.as_ref().map_or(0, |a| a.counter),
        active,
        applied: 0,
        outcome: None,
        seq_state: 0,
        seq_hb: 0,
        blue_green: behaviour.blue_green.clone(),
    };
    let log2 = log.clone();
    let task = tokio::spawn(async move {
        let mut opts = MqttOptions::new(st.id.to_string(), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_clean_session(false);
        let will = Online {
            device: st.id.clone(),
            online: false,
            agent_version: "test".into(),
            at: now(),
        };
        opts.set_last_will(LastWill::new(
            Topic::Online(st.id.clone()).to_string(),
            encode(&will),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut el) = AsyncClient::new(opts, 100);
        let mut tick = tokio::time::interval(heartbeat);
        let mut install: Option<(tokio::time::Instant, Desired)> = None;
        let keys = [testkit::signing_key().verifying_key()];
        loop {
            let install_due = install.as_ref().map(|(t, _)| *t);
            tokio::select! {
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(Topic::Desired(st.id.clone()).to_string(), QoS::AtLeastOnce).await;
                        let on = Online { device: st.id.clone(), online: true, agent_version: "test".into(), at: now() };
                        let _ = client.publish(Topic::Online(st.id.clone()).to_string(), QoS::AtLeastOnce, true, encode(&on)).await;
                        let rep = st.reported();
                        let _ = client.publish(Topic::State(st.id.clone()).to_string(), QoS::AtLeastOnce, true, encode(&rep)).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(d) = decode::<Desired>(&p.payload) else { continue };
                        log2.lock().unwrap().desired.push(d.clone());
                        if d.sequence <= st.applied { continue; }
                        match &d.release {
                            Some(s) if Some(s.digest()) != st.active.as_ref().map(|a| a.digest) => {
                                install = Some((tokio::time::Instant::now() + Duration::from_millis(150), d));
                            }
                            _ => {
                                st.applied = d.sequence;
                                let rep = st.reported();
                                let _ = client.publish(Topic::State(st.id.clone()).to_string(), QoS::AtLeastOnce, true, encode(&rep)).await;
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                () = async { if let Some(t) = install_due { tokio::time::sleep_until(t).await } else { std::future::pending::<()>().await } } => {
                    let (_, d) = install.take().unwrap();
                    let s = d.release.clone().unwrap();
                    let r = s.open(&keys).unwrap();
                    st.active = Some(Installed { name: r.name.clone(), version: r.version.clone(), counter: r.counter, digest: s.digest(), slot: Slot::B });
                    st.highest = st.highest.max(r.counter);
                    st.applied = d.sequence;
                    st.outcome = Some(Outcome { rollout: d.rollout.clone(), sequence: d.sequence, version: r.version.clone(), result: OutcomeKind::Committed, at: now() });
                    log2.lock().unwrap().active = st.active.clone();
                    let rep = st.reported();
                    let _ = client.publish(Topic::State(st.id.clone()).to_string(), QoS::AtLeastOnce, true, encode(&rep)).await;
                }
                _ = tick.tick() => {
                    st.seq_hb += 1;
                    let version = st.active.as_ref().map(|a| a.version.clone());
                    let bad = version.is_some() && version == behaviour.bad_version;
                    let hb = Heartbeat {
                        device: st.id.clone(),
                        seq: st.seq_hb,
                        at: now(),
                        uptime: Duration::from_secs(1),
                        active_version: version.clone(),
                        rollout: None,
                        system: SystemHealth { cpu_pct: 10.0, memory_used_bytes: 1 << 30, memory_total_bytes: 4 << 30, disk_free_bytes: 16 << 30, disk_total_bytes: 32 << 30, temperature_c: None },
                        app: AppHealth { status: AppStatus::Healthy, version, error_rate: Some(if bad { behaviour.error_rate_when_bad } else { 0.0 }), p95_ms: Some(50.0), restarts_in_window: 0, restarts_total: 0, probe_ok: Some(true), requests: Some(100), failed: None },
                    };
                    let _ = client.try_publish(Topic::Heartbeat(st.id.clone()).to_string(), QoS::AtMostOnce, false, encode(&hb));
                }
            }
        }
    });
    FakeDevice { id, log, task }
}

/// An operator's MQTT client: sends requests, waits for replies.
pub struct Operator {
    client: AsyncClient,
    replies: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pending: HashMap<String, Vec<u8>>,
    n: u64,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Operator {
    pub async fn connect(port: u16, name: &str) -> Operator {
        let mut opts = MqttOptions::new(format!("op-{name}"), "127.0.0.1", port);
        opts.set_max_packet_size(16 << 20, 1 << 20);
        let (client, mut el) = AsyncClient::new(opts, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
        let c2 = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2
                            .subscribe("fleet/v1/rollouts/replies/+", QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx.recv())
            .await
            .expect("operator subscribed");
        Operator {
            client,
            replies: rx,
            pending: HashMap::new(),
            n: 0,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    pub async fn send_raw(&self, payload: Vec<u8>) {
        self.client
            .publish(
                "fleet/v1/rollouts/commands",
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    pub async fn ask(&mut self, command: Command) -> Reply {
        self.n += 1;
        let request_id = RequestId::new(format!("q-{}-{}", std::process::id(), self.n)).unwrap();
        let req = Request {
            request_id: request_id.clone(),
            operator: "tester".into(),
            command,
            auth: None,
        };
        self.send_raw(encode(&req)).await;
        let topic = Topic::Reply(request_id.clone()).to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = self.pending.remove(&topic) {
                return decode::<Reply>(&p).unwrap();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.replies.recv()).await {
                Ok(Some((t, p))) => {
                    self.pending.insert(t, p);
                }
                _ => panic!("no reply to {request_id} within 20 s"),
            }
        }
    }
}

/// GET over plain HTTP/1.1: (status, headers, body).
pub fn http_get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + n]);
        b = &b[nl + 2 + n + 2..];
    }
    out
}

/// A child process killed (SIGKILL) on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
