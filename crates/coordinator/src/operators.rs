//! Who sent an operator command.
//!
//! MQTT does not tell a subscriber who published a message, and the embedded broker (rumqttd)
//! has no per-client ACL (rumqttd #495, #1005): any client that may connect may publish on
//! `rollouts/commands`, including a device. So the coordinator does not take the broker's word
//! for it: when operator keys are configured (`[operators] keys`), a command is obeyed only if
//! it carries an ed25519 signature by the key of the operator it names (fleetctl signs with
//! `--operator-key`), signed within `operators.max_age` of the coordinator's clock, and with a
//! request id not seen in that window (no replays). The name audited is then the verified one.
//!
//! Without configured keys, commands are not authenticated (the name is whatever the sender
//! wrote): acceptable on a closed lab network only; the coordinator warns at start.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use fleet_proto::operator::Request;
use fleet_proto::{RequestId, UnixMillis, VerifyingKey};

/// Operators' public keys and the replay window.
#[derive(Clone, Debug, Default)]
pub struct Operators {
    keys: BTreeMap<String, VerifyingKey>,
    max_age: Duration,
    /// Request ids accepted within the window, with their signing time.
    seen: HashMap<RequestId, UnixMillis>,
}

impl Operators {
    pub fn new(keys: BTreeMap<String, VerifyingKey>, max_age: Duration) -> Operators {
        Operators {
            keys,
            max_age,
            seen: HashMap::new(),
        }
    }

    /// Whether commands must be signed.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Decides whether `req` really comes from the operator it names. `Err` says why not.
    pub fn check(&mut self, req: &Request, now: UnixMillis) -> Result<(), String> {
        if !self.required() {
            return Ok(());
        }
        let key = self.keys.get(&req.operator).ok_or_else(|| {
            format!(
                "operator {:?} has no key in the coordinator's [operators] keys",
                req.operator
            )
        })?;
        let signed_at = req.verify(key)?;
        let (earliest, latest) = (
            now.saturating_sub(self.max_age),
            now.saturating_add(self.max_age),
        );
        if signed_at < earliest || signed_at > latest {
            return Err(format!(
                "signed at {signed_at}, more than {} from the coordinator's time {now} (a replayed command, or a wrong clock)",
                humantime::format_duration(self.max_age)
            ));
        }
        self.seen.retain(|_, at| *at >= earliest);
        if self.seen.contains_key(&req.request_id) {
            return Err(format!(
                "request id {} was already used (a replayed command)",
                req.request_id
            ));
        }
        self.seen.insert(req.request_id.clone(), signed_at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use fleet_proto::operator::Command;
    use fleet_proto::{RolloutId, SigningKey};

    use super::*;

    const NOW: UnixMillis = UnixMillis(1_800_000_000_000);

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn req(id: &str, operator: &str) -> Request {
        Request {
            request_id: RequestId::new(id).unwrap(),
            operator: operator.into(),
            command: Command::Abort {
                rollout: RolloutId::new("r-1").unwrap(),
            },
            auth: None,
        }
    }

    #[test]
    fn only_signed_fresh_unreplayed_commands_by_known_operators_pass() {
        let alice = key(1);
        let mut ops = Operators::new(
            BTreeMap::from([("alice".to_owned(), alice.verifying_key())]),
            Duration::from_secs(300),
        );
        assert!(ops.required());
        let good = req("q-1", "alice").sign(&alice, NOW);
        assert_eq!(ops.check(&good, NOW), Ok(()));
        // The same request again: a replay.
        assert!(ops.check(&good, NOW).unwrap_err().contains("already used"));
        // Unsigned, a stranger, a device claiming alice's name with its own key, a stale one.
        assert!(
            ops.check(&req("q-2", "alice"), NOW)
                .unwrap_err()
                .contains("not signed")
        );
        let mallory = req("q-3", "mallory").sign(&key(2), NOW);
        assert!(ops.check(&mallory, NOW).unwrap_err().contains("no key"));
        let forged = req("q-4", "alice").sign(&key(2), NOW);
        assert!(
            ops.check(&forged, NOW)
                .unwrap_err()
                .contains("bad signature")
        );
        let old = req("q-5", "alice").sign(&alice, UnixMillis(NOW.0 - 301_000));
        assert!(ops.check(&old, NOW).unwrap_err().contains("more than 5m"));
        // Without keys nothing is required.
        let mut open = Operators::default();
        assert_eq!(open.check(&req("q-6", "anyone"), NOW), Ok(()));
    }
}
