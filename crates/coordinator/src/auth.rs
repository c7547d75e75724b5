//! Who may connect to the embedded broker, and what each may publish and subscribe to.
//!
//! The credentials file (`broker.credentials`) has one account per line:
//!
//! ```text
//! # name      role      secret hash (fleet-coordinator credential NAME ROLE prints a line)
//! cam-001     device    sha256:5b1e…:9f2c…
//! alice       operator  sha256:0c44…:77aa…
//! ```
//!
//! The hash is `sha256:SALT:HEX(SHA-256(SALT ‖ SECRET))` with a random 16-byte salt. Secrets
//! are 32 random bytes (64 hex digits) made by `fleet-coordinator credential`, so a fast hash is
//! enough: there is nothing to guess. The file is re-read when its modification time changes,
//! so adding a device needs no restart.
//!
//! The rules (the same as `deploy/mosquitto/acl`):
//!
//! | role | client id | may publish | may subscribe |
//! |---|---|---|---|
//! | device `ID` | `ID` | `fleet/v1/devices/ID/{state,heartbeat,events,online}` (and its last will on `…/online`) | `fleet/v1/devices/ID/desired`, `fleet/v1/trust` |
//! | operator | anything but another account's name or the coordinator's | `fleet/v1/rollouts/commands` | filters under `fleet/v1/` |
//!
//! Pure: the guard (`guard.rs`) does the I/O and asks these functions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use fleet_proto::DeviceId;
use fleet_proto::hex::{Hex, Sha256};
use fleet_proto::topic::PREFIX;

/// What an account is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Device,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Operator => "operator",
        }
    }
}

/// One account of the credentials file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub role: Role,
    salt: Hex<16>,
    hash: Sha256,
}

/// A connected client the guard let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub role: Role,
}

fn salted(salt: &Hex<16>, secret: &str) -> Sha256 {
    let mut bytes = salt.0.to_vec();
    bytes.extend_from_slice(secret.as_bytes());
    Sha256::of(&bytes)
}

/// A new random secret (64 hex digits) and the credentials-file line for it.
pub fn new_credential(name: &str, role: Role) -> (String, String) {
    let secret: [u8; 32] = rand::random();
    let secret = hex::encode(secret);
    let salt = Hex::<16>(rand::random());
    let line = format!(
        "{name} {} sha256:{salt}:{}",
        role.as_str(),
        salted(&salt, &secret)
    );
    (secret, line)
}

/// Parses a credentials file; every problem names its line.
pub fn parse(text: &str) -> Result<HashMap<String, Account>, String> {
    let mut accounts = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, role, hash] = fields.as_slice() else {
            return Err(bad("expected `NAME ROLE sha256:SALT:HASH`"));
        };
        let role = match *role {
            "device" => Role::Device,
            "operator" => Role::Operator,
            other => {
                return Err(bad(&format!(
                    "role {other:?} must be \"device\" or \"operator\""
                )));
            }
        };
        if role == Role::Device {
            DeviceId::new(*name).map_err(|e| bad(&e.to_string()))?;
        }
        let mut parts = hash.splitn(3, ':');
        let (Some("sha256"), Some(salt), Some(digest)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("the hash must look like sha256:SALT:HASH"));
        };
        let salt = salt.parse().map_err(|e| bad(&format!("salt: {e}")))?;
        let hash = digest.parse().map_err(|e| bad(&format!("hash: {e}")))?;
        if accounts
            .insert((*name).to_owned(), Account { role, salt, hash })
            .is_some()
        {
            return Err(bad(&format!("{name} is listed twice")));
        }
    }
    Ok(accounts)
}

/// Compares two secrets without saying how much of them matched.
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    same(a, b)
}

fn same(a: &[u8], b: &[u8]) -> bool {
    // Constant time for equal lengths: a digest comparison should not say how much matched.
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a connection was refused (logged by the guard; the client only learns "not authorised").
pub type Denied = String;

/// Checks a CONNECT's client id, username and password against `accounts`. `reserved` is the
/// coordinator's own client id, which nobody else may take (MQTT would disconnect the holder).
pub fn authenticate(
    accounts: &HashMap<String, Account>,
    reserved: &str,
    client_id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> Result<Identity, Denied> {
    let (Some(username), Some(password)) = (username, password) else {
        return Err("no username or password".into());
    };
    let account = accounts
        .get(username)
        .ok_or_else(|| format!("unknown user {username:?}"))?;
    let secret = std::str::from_utf8(password).map_err(|_| "password is not UTF-8".to_owned())?;
    if !same(&salted(&account.salt, secret).0, &account.hash.0) {
        return Err(format!("wrong password for {username:?}"));
    }
    match account.role {
        Role::Device if client_id != username => {
            return Err(format!(
                "device {username:?} must connect with client id {username:?}, not {client_id:?}"
            ));
        }
        Role::Operator if client_id == reserved || accounts.contains_key(client_id) => {
            return Err(format!(
                "operator {username:?} may not use client id {client_id:?} (it belongs to another account)"
            ));
        }
        _ => {}
    }
    Ok(Identity {
        name: username.to_owned(),
        role: account.role,
    })
}

/// Whether `who` may publish on `topic` (also checked for the last will's topic).
pub fn may_publish(who: &Identity, topic: &str) -> bool {
    if topic.contains(['+', '#']) {
        return false;
    }
    match who.role {
        Role::Device => {
            let own = format!("{PREFIX}/devices/{}/", who.name);
            topic
                .strip_prefix(&own)
                .is_some_and(|leaf| matches!(leaf, "state" | "heartbeat" | "events" | "online"))
        }
        Role::Operator => topic == format!("{PREFIX}/rollouts/commands"),
    }
}

/// Whether `who` may subscribe to `filter`.
pub fn may_subscribe(who: &Identity, filter: &str) -> bool {
    match who.role {
        Role::Device => {
            filter == format!("{PREFIX}/devices/{}/desired", who.name)
                || filter == format!("{PREFIX}/trust")
        }
        Role::Operator => filter
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.starts_with('/')),
    }
}

/// The credentials file, re-read when it changes.
#[derive(Debug)]
pub struct CredentialsFile {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, HashMap<String, Account>)>,
}

impl CredentialsFile {
    /// Reads `path` once now, so a broken file stops the start with its line number.
    pub fn open(path: &Path) -> Result<CredentialsFile, String> {
        let file = CredentialsFile {
            path: path.to_owned(),
            cache: Mutex::new((None, HashMap::new())),
        };
        file.accounts()?;
        Ok(file)
    }

    /// The accounts as the file says now (the last good reading if it became unreadable).
    pub fn accounts(&self) -> Result<HashMap<String, Account>, String> {
        let what = |e: String| format!("credentials file {}: {e}", self.path.display());
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(|e| what(e.to_string()))?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != Some(modified) {
            let text = std::fs::read_to_string(&self.path).map_err(|e| what(e.to_string()))?;
            match parse(&text) {
                Ok(accounts) => *cache = (Some(modified), accounts),
                Err(e) if cache.0.is_some() => {
                    tracing::error!("{}; keeping the previous accounts", what(e));
                }
                Err(e) => return Err(what(e)),
            }
        }
        Ok(cache.1.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(lines: &[(&str, Role)]) -> (HashMap<String, Account>, Vec<String>) {
        let mut text = String::from("# generated\n\n");
        let mut secrets = Vec::new();
        for (name, role) in lines {
            let (secret, line) = new_credential(name, *role);
            text.push_str(&line);
            text.push('\n');
            secrets.push(secret);
        }
        (parse(&text).unwrap(), secrets)
    }

    #[test]
    fn only_the_right_secret_and_client_id_get_in() {
        let (acc, s) = file(&[("cam-1", Role::Device), ("alice", Role::Operator)]);
        let auth = |cid: &str, user: &str, pw: &str| {
            authenticate(
                &acc,
                "fleet-coordinator",
                cid,
                Some(user),
                Some(pw.as_bytes()),
            )
        };
        assert_eq!(
            auth("cam-1", "cam-1", &s[0]),
            Ok(Identity {
                name: "cam-1".into(),
                role: Role::Device
            })
        );
        assert!(
            auth("cam-1", "cam-1", &s[1])
                .unwrap_err()
                .contains("wrong password")
        );
        assert!(
            auth("cam-2", "cam-1", &s[0])
                .unwrap_err()
                .contains("client id")
        );
        assert!(
            auth("cam-1", "bob", &s[0])
                .unwrap_err()
                .contains("unknown user")
        );
        assert_eq!(
            auth("fleetctl-1", "alice", &s[1]).map(|i| i.role),
            Ok(Role::Operator)
        );
        // An operator may not take a device's or the coordinator's session.
        assert!(auth("cam-1", "alice", &s[1]).is_err());
        assert!(auth("fleet-coordinator", "alice", &s[1]).is_err());
        assert!(authenticate(&acc, "c", "cam-1", None, None).is_err());
    }

    #[test]
    fn a_device_publishes_only_its_own_reports_and_reads_only_its_desired_state() {
        let cam = Identity {
            name: "cam-1".into(),
            role: Role::Device,
        };
        for leaf in ["state", "heartbeat", "events", "online"] {
            assert!(may_publish(&cam, &format!("fleet/v1/devices/cam-1/{leaf}")));
            assert!(!may_publish(
                &cam,
                &format!("fleet/v1/devices/cam-2/{leaf}")
            ));
        }
        assert!(!may_publish(&cam, "fleet/v1/devices/cam-1/desired"));
        assert!(!may_publish(&cam, "fleet/v1/rollouts/commands"));
        assert!(!may_publish(&cam, "fleet/v1/trust"));
        assert!(!may_publish(&cam, "fleet/v1/devices/cam-1/state/x"));
        assert!(may_subscribe(&cam, "fleet/v1/devices/cam-1/desired"));
        assert!(may_subscribe(&cam, "fleet/v1/trust"));
        assert!(!may_subscribe(&cam, "fleet/v1/devices/cam-2/desired"));
        assert!(!may_subscribe(&cam, "fleet/v1/devices/+/desired"));
        assert!(!may_subscribe(&cam, "#"));
        let ops = Identity {
            name: "alice".into(),
            role: Role::Operator,
        };
        assert!(may_publish(&ops, "fleet/v1/rollouts/commands"));
        assert!(!may_publish(&ops, "fleet/v1/devices/cam-1/desired"));
        assert!(!may_publish(&ops, "fleet/v1/trust"));
        assert!(may_subscribe(&ops, "fleet/v1/rollouts/replies/q-1"));
        assert!(may_subscribe(&ops, "fleet/v1/#"));
        assert!(!may_subscribe(&ops, "#"));
        assert!(!may_subscribe(&ops, "$SYS/#"));
    }

    #[test]
    fn a_broken_file_names_the_line() {
        assert!(parse("cam-1 device").unwrap_err().starts_with("line 1:"));
        assert!(
            parse("\ncam-1 admin sha256:00:00")
                .unwrap_err()
                .contains("role")
        );
        assert!(
            parse("cam/1 device sha256:00:00")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(
            parse("cam-1 device md5:00:00")
                .unwrap_err()
                .contains("sha256:SALT:HASH")
        );
        let (_, line) = new_credential("cam-1", Role::Device);
        assert!(
            parse(&format!("{line}\n{line}\n"))
                .unwrap_err()
                .contains("line 2: cam-1 is listed twice")
        );
    }
}
