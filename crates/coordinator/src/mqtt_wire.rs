//! MQTT 3.1.1 packets as the guard (`guard.rs`) reads them: the CONNECT it checks and
//! rewrites, the topic of a PUBLISH, the filters of a SUBSCRIBE. Pure and std-only, so the fuzz
//! target `fuzz/fuzz_targets/mqtt_packets.rs` includes this file as it is: every byte here
//! comes from an unauthenticated network peer.

/// CONNACK (MQTT 3.1.1) with a return code: 1 bad protocol, 2 identifier rejected, 5 not
/// authorised.
pub fn connack(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
}

/// Where the variable header starts (after the fixed header).
pub fn body(packet: &[u8]) -> &[u8] {
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

pub fn publish_topic(packet: &[u8]) -> Result<String, String> {
    Cursor(body(packet)).string()
}

/// The size of a PUBLISH's payload: the body after the topic and, for QoS 1 and 2, the packet
/// id.
pub fn publish_payload_len(packet: &[u8]) -> Result<usize, String> {
    let body = body(packet);
    let mut c = Cursor(body);
    c.bytes()?;
    let qos = (packet.first().copied().unwrap_or(0) >> 1) & 0x03;
    if qos > 0 {
        c.u16()?;
    }
    Ok(c.0.len())
}

pub fn subscribe_filters(packet: &[u8]) -> Result<Vec<String>, String> {
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
}
