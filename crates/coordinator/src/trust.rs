//! The coordinator's side of release-key rotation: the chain of signed rotations it stores,
//! follows from its configured `release_keys`, and publishes, retained, on `fleet/v1/trust`.
//!
//! The coordinator holds no signing key and decides nothing here that a device does not check
//! again: every device follows the chain from its own pinned keys (`fleet_proto::trust`). The
//! coordinator checks each rotation anyway, so that an operator's mistake is refused at once
//! with a reason, and so that it verifies later releases with the keys devices will pin.

use fleet_proto::trust::{
    KeyRotation, MAX_CHAIN, Pinned, RotationRefusal, SignedRotation, TrustChain, follow,
};
use fleet_proto::{Topic, VerifyingKey, encode};

use crate::registry::OutMsg;

/// What the coordinator pins, and the rotations that led there.
#[derive(Clone, Debug)]
pub struct Keyring {
    pub pinned: Pinned,
    pub chain: TrustChain,
}

impl Keyring {
    /// Follows the stored rotations from the configured keys. A stored rotation that no longer
    /// follows (the configured keys were changed by hand) ends the chain there, with a warning.
    pub fn load(config_keys: &[VerifyingKey], stored: Vec<SignedRotation>) -> Keyring {
        let start = Pinned {
            epoch: 0,
            keys: config_keys.to_vec(),
        };
        let chain = TrustChain { rotations: stored };
        let (applied, refused) = follow(&chain, &start);
        if let Some(why) = refused {
            tracing::warn!(
                "a stored key rotation does not follow from release_keys ({why}); pinning the keys of epoch {}",
                applied.last().map_or(0, |a| a.pinned.epoch)
            );
        }
        let kept = applied.len();
        let pinned = applied.last().map_or(start, |a| a.pinned.clone());
        Keyring {
            pinned,
            chain: TrustChain {
                rotations: chain.rotations.into_iter().take(kept).collect(),
            },
        }
    }

    /// Checks `signed` against the pinned keys and appends it to the chain.
    pub fn rotate(&mut self, signed: SignedRotation) -> Result<KeyRotation, RotationRefusal> {
        let (rotation, next) = signed.verify(&self.pinned)?;
        if self.chain.rotations.len() >= MAX_CHAIN {
            return Err(RotationRefusal::BadKeySet {
                epoch: rotation.epoch,
                detail: format!(
                    "the chain already holds {MAX_CHAIN} rotations; devices this far behind must be re-provisioned"
                ),
            });
        }
        self.chain.rotations.push(signed);
        self.pinned = next;
        Ok(rotation)
    }

    /// The retained chain for `fleet/v1/trust`, if any rotation was ever made.
    pub fn message(&self) -> Option<OutMsg> {
        (!self.chain.rotations.is_empty()).then(|| OutMsg {
            topic: Topic::Trust.to_string(),
            payload: encode(&self.chain),
            retain: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use fleet_proto::hex::Hex;
    use fleet_proto::{SigningKey, UnixMillis};

    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn rotation(epoch: u64, to: &SigningKey, signers: &[&SigningKey]) -> SignedRotation {
        SignedRotation::sign(
            &KeyRotation {
                epoch,
                keys: vec![Hex(to.verifying_key().to_bytes())],
                issued_at: UnixMillis(1),
            },
            signers,
        )
    }

    #[test]
    fn rotations_follow_from_the_configured_keys_and_a_broken_link_ends_the_chain() {
        let (k1, k2, k3) = (key(1), key(2), key(3));
        let mut ring = Keyring::load(&[k1.verifying_key()], Vec::new());
        assert!(ring.message().is_none());
        ring.rotate(rotation(1, &k2, &[&k1, &k2])).unwrap();
        assert_eq!(ring.pinned.keys, vec![k2.verifying_key()]);
        // Replayed, or signed by the key rotated out: refused, nothing changes.
        assert!(ring.rotate(rotation(1, &k2, &[&k1, &k2])).is_err());
        assert!(ring.rotate(rotation(2, &k3, &[&k1, &k3])).is_err());
        assert_eq!(ring.chain.rotations.len(), 1);
        let m = ring.message().unwrap();
        assert_eq!(m.topic, "fleet/v1/trust");
        assert!(m.retain);

        // Restart: the stored chain is followed again.
        let stored = vec![rotation(1, &k2, &[&k1, &k2]), rotation(2, &k3, &[&k2, &k3])];
        let ring = Keyring::load(&[k1.verifying_key()], stored.clone());
        assert_eq!((ring.pinned.epoch, ring.chain.rotations.len()), (2, 2));
        // Configured keys changed by hand: the chain ends where it stops following.
        let ring = Keyring::load(&[key(9).verifying_key()], stored);
        assert_eq!(ring.pinned.keys, vec![key(9).verifying_key()]);
        assert!(ring.chain.rotations.is_empty());
    }
}
