//! systemd's notify protocol (`sd_notify`): `READY=1`, `WATCHDOG=1`, `STOPPING=1` as datagrams
//! to `$NOTIFY_SOCKET`. The binary builds a [`Notifier`] from its environment; the library
//! never reads it, so many agents can share a process (fleet-sim).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
    /// Half of `WatchdogSec`, when systemd asked for watchdog pings.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` values; `None` when not under systemd.
    pub fn new(notify_socket: Option<&str>, watchdog_usec: Option<&str>) -> Option<Notifier> {
        let path = notify_socket?;
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt as _;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
        } else {
            std::os::unix::net::SocketAddr::from_pathname(path).ok()?
        };
        let socket = UnixDatagram::unbound().ok()?;
        let watchdog_every = watchdog_usec
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0)
            .map(|u| Duration::from_micros(u / 2));
        Some(Notifier {
            socket,
            addr,
            watchdog_every,
        })
    }

    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!("sd_notify {state}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str(), Some("4000000")).unwrap();
        assert_eq!(n.watchdog_every, Some(Duration::from_secs(2)));
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
        assert!(Notifier::new(None, None).is_none());
    }
}
