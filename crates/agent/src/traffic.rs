//! Blue-green traffic switching (issue 9): the built-in TCP [`Forwarder`] and the configured
//! switch command ([`run_command`]). The driver owns them; the state machine only says where
//! the traffic must go (`Action::SwitchTraffic`) and hears back (`Input::Switched`).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_proto::device::Slot;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Connections in flight per backend port.
type InFlight = Arc<Mutex<HashMap<u16, usize>>>;

/// Listens on the service port and forwards each new connection to the backend port that is
/// the target *when the connection is accepted*; a connection stays on that backend until it
/// ends, so a switch (an atomic store) never cuts a request in flight.
#[derive(Debug)]
pub struct Forwarder {
    /// The backend port on 127.0.0.1; 0 = nowhere yet (connections are closed at once).
    target: Arc<AtomicU16>,
    in_flight: InFlight,
    local: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

/// Counts one forwarded connection on its backend port while it lives.
struct Counted {
    in_flight: InFlight,
    port: u16,
}

impl Counted {
    fn new(in_flight: &InFlight, port: u16) -> Counted {
        *lock(in_flight).entry(port).or_default() += 1;
        Counted {
            in_flight: Arc::clone(in_flight),
            port,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut m = lock(&self.in_flight);
        if let Some(n) = m.get_mut(&self.port) {
            *n = n.saturating_sub(1);
        }
    }
}

fn lock(m: &Mutex<HashMap<u16, usize>>) -> std::sync::MutexGuard<'_, HashMap<u16, usize>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Forwarder {
    /// Binds `addr` and starts accepting (inside a tokio runtime).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Forwarder> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let target = Arc::new(AtomicU16::new(0));
        let in_flight = InFlight::default();
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&target),
            Arc::clone(&in_flight),
        ));
        Ok(Forwarder {
            target,
            in_flight,
            local,
            accept,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// New connections go to 127.0.0.1:`port` from now on.
    pub fn set_target(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    pub fn target(&self) -> u16 {
        self.target.load(Ordering::SeqCst)
    }

    /// Connections to `port` still open.
    pub fn in_flight(&self, port: u16) -> usize {
        lock(&self.in_flight).get(&port).copied().unwrap_or(0)
    }

    /// Waits until no forwarded connection to `port` is open, at most `within`; returns how
    /// many were still open.
    pub async fn drain(&self, port: u16, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let open = self.in_flight(port);
            if open == 0 || tokio::time::Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: Arc<AtomicU16>, in_flight: InFlight) {
    loop {
        let (inbound, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("forwarder: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let port = target.load(Ordering::SeqCst);
        if port == 0 {
            debug!(%peer, "forwarder: no instance has the traffic yet; connection closed");
            continue;
        }
        let counted = Counted::new(&in_flight, port);
        tokio::spawn(async move {
            let _counted = counted;
            forward(inbound, peer, port).await;
        });
    }
}

async fn forward(mut inbound: TcpStream, peer: SocketAddr, port: u16) {
    let mut outbound = match TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%peer, port, "forwarder: the instance on port {port} refused the connection: {e}");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
        debug!(%peer, port, "forwarder: connection ended: {e}");
    }
}

/// Runs the switch command `argv` to send the service's traffic (`service_port`) to the
/// instance of `to` on `target_port`. Exit 0 within `timeout` = switched.
pub async fn run_command(
    argv: &[String],
    timeout: Duration,
    to: Slot,
    target_port: u16,
    service_port: u16,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no switch command is configured (blue_green.command)".into());
    };
    let slot = match to {
        Slot::A => "a",
        Slot::B => "b",
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("FLEET_TARGET_PORT", target_port.to_string())
        .env("FLEET_TARGET_SLOT", slot)
        .env("FLEET_SERVICE_PORT", service_port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!("cannot start the switch command {program} (blue_green.command): {e}")
        })?;
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return Err(format!("switch command {program}: {e}")),
        Err(_) => {
            return Err(format!(
                "switch command {program} did not finish within {} (killed; blue_green.command_timeout)",
                humantime::format_duration(timeout)
            ));
        }
    };
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(format!(
        "switch command {program} to port {target_port} exited with {}{}",
        output.status,
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// An echo server that prefixes its answers with `tag`.
    async fn backend(tag: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        let answer = [tag.as_bytes(), &buf[..n]].concat();
                        let _ = s.write_all(&answer).await;
                    }
                });
            }
        });
        port
    }

    async fn ask(s: &mut TcpStream, what: &str) -> String {
        s.write_all(what.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_switch_moves_new_connections_and_leaves_open_ones_where_they_are() {
        let (blue, green) = (backend("blue:").await, backend("green:").await);
        let f = Forwarder::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        f.set_target(blue);
        let mut first = TcpStream::connect(f.local_addr()).await.unwrap();
        assert_eq!(ask(&mut first, "1").await, "blue:1");
        assert_eq!(f.in_flight(blue), 1);
        f.set_target(green);
        let mut second = TcpStream::connect(f.local_addr()).await.unwrap();
        assert_eq!(ask(&mut second, "2").await, "green:2");
        // The connection opened before the switch still talks to blue.
        assert_eq!(ask(&mut first, "3").await, "blue:3");
        drop(first);
        assert_eq!(f.drain(blue, Duration::from_secs(5)).await, 0);
        assert_eq!(f.in_flight(green), 1);
    }

    #[tokio::test]
    async fn the_switch_command_gets_the_target_and_its_failure_is_reported() {
        let sh = |script: &str| vec!["/bin/sh".to_string(), "-c".into(), script.into()];
        run_command(
            &sh("test \"$FLEET_TARGET_PORT/$FLEET_TARGET_SLOT/$FLEET_SERVICE_PORT\" = 9002/b/9000"),
            Duration::from_secs(5),
            Slot::B,
            9002,
            9000,
        )
        .await
        .unwrap();
        let err = run_command(
            &sh("echo 'proxy reload failed' >&2; exit 3"),
            Duration::from_secs(5),
            Slot::A,
            9001,
            9000,
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("exit status: 3") && err.contains("proxy reload failed"),
            "{err}"
        );
        let err = run_command(
            &sh("sleep 5"),
            Duration::from_millis(100),
            Slot::A,
            9001,
            9000,
        )
        .await
        .unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }
}
