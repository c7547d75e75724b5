//! Release-key rotation and trusted time.
//!
//! A device pins one or two release public keys (its config's `trust.keys`). A
//! [`SignedRotation`] replaces that set: it names the keys pinned from now on and an `epoch`
//! that must be above the device's, and it is signed by **every** key the device pins now and
//! by every key it newly pins (proof that someone holds the new key, so a typo cannot lock a
//! fleet out). The device persists the new set and epoch in its journal; the epoch never goes
//! down, so an old rotation replayed later is refused.
//!
//! Design: signatures by *every* pinned key, not one. With a single pinned key this is simply
//! "signed by the current key". A fleet that pins two keys — the online release key and an
//! offline recovery key — cannot be taken over by a thief of one of them: a rotation needs both,
//! so the owner can rotate a stolen release key out (signing with both, since a stolen key is
//! copied, not lost) and the thief cannot rotate the owner out.
//!
//! The coordinator carries every rotation so far as one retained [`TrustChain`] on
//! `fleet/v1/trust`; a device that slept through several rotations applies the missing ones in
//! epoch order. Nobody on the path needs to be trusted: each link is checked against the keys
//! the previous links left pinned.
//!
//! Trusted time: a device checks a release's validity window against
//! [`trusted_now`] = the later of its clock and a persisted floor, raised by every signed time
//! it accepts (a release's `not_before`, a rotation's `issued_at`). Winding the device clock back
//! (a dead RTC battery, a forged NTP answer) does not revive an expired release.

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::frame::{Kind, Message};
use crate::hex::Hex;
use crate::release::{KeyId, key_id};
use crate::time::UnixMillis;

/// The most keys a device pins at once.
pub const MAX_KEYS: usize = 2;
/// The most signatures a rotation may carry: every old key and every new key.
pub const MAX_SIGNATURES: usize = 2 * MAX_KEYS;
/// The most rotations a [`TrustChain`] carries.
pub const MAX_CHAIN: usize = 32;

/// Prefixed to a rotation's bytes before signing, so no other signed fleet object (a release,
/// a command) can be passed off as a rotation.
const DOMAIN: &[u8] = b"fleet/v1 key rotation\0";

/// What a rotation says: from `epoch` on, pin exactly `keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRotation {
    /// Above every epoch before it; a device refuses an epoch at or below its own.
    pub epoch: u64,
    /// The release public keys pinned from now on: one, or two.
    pub keys: Vec<Hex<32>>,
    /// When it was signed; raises the device's trusted-time floor.
    pub issued_at: UnixMillis,
}

/// One signature over a rotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationSignature {
    pub key_id: KeyId,
    pub signature: Hex<64>,
}

/// A rotation with its signatures, as it travels and as it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRotation {
    /// The canonical (postcard) bytes of the [`KeyRotation`] that were signed.
    #[serde(with = "crate::bytes")]
    pub rotation: Vec<u8>,
    pub signatures: Vec<RotationSignature>,
}

/// `fleet/v1/trust` (retained): every rotation so far, in epoch order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustChain {
    pub rotations: Vec<SignedRotation>,
}

impl Message for TrustChain {
    const KIND: Kind = Kind::Trust;
}

/// The keys a device pins and the epoch of the rotation that set them (0: its config's keys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub epoch: u64,
    pub keys: Vec<VerifyingKey>,
}

/// Why a rotation is refused. The device keeps the keys it pins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RotationRefusal {
    #[error("unreadable key rotation: {detail}")]
    Malformed { detail: String },
    #[error(
        "key rotation epoch {epoch} is not above the device's {current} (an old rotation replayed)"
    )]
    Stale { epoch: u64, current: u64 },
    #[error(
        "key rotation epoch {epoch} is not signed by pinned key {key_id}; every pinned key must sign a rotation"
    )]
    MissingSignature { epoch: u64, key_id: KeyId },
    #[error(
        "key rotation epoch {epoch} is not signed by its new key {key_id}; a new key must sign the rotation that pins it"
    )]
    NoProofOfPossession { epoch: u64, key_id: KeyId },
    #[error("key rotation epoch {epoch}: bad signature by key {key_id}")]
    BadSignature { epoch: u64, key_id: KeyId },
    #[error("key rotation epoch {epoch}: {detail}")]
    BadKeySet { epoch: u64, detail: String },
}

fn signing_bytes(rotation: &[u8]) -> Vec<u8> {
    let mut bytes = DOMAIN.to_vec();
    bytes.extend_from_slice(rotation);
    bytes
}

impl KeyRotation {
    /// The canonical bytes that are signed (after the domain prefix).
    pub fn canonical_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a rotation has no unsized sequences")
    }

    /// The pinned keys it names, parsed.
    pub fn verifying_keys(&self) -> Result<Vec<VerifyingKey>, String> {
        self.keys
            .iter()
            .map(|k| {
                VerifyingKey::from_bytes(&k.0)
                    .map_err(|_| format!("key {} is not an ed25519 public key", k.short()))
            })
            .collect()
    }
}

impl SignedRotation {
    /// Signs `rotation` with each of `signers` (every currently pinned key and every new one).
    pub fn sign(rotation: &KeyRotation, signers: &[&SigningKey]) -> SignedRotation {
        let bytes = rotation.canonical_bytes();
        let message = signing_bytes(&bytes);
        SignedRotation {
            signatures: signers
                .iter()
                .map(|k| RotationSignature {
                    key_id: key_id(&k.verifying_key()),
                    signature: Hex(k.sign(&message).to_bytes()),
                })
                .collect(),
            rotation: bytes,
        }
    }

    /// Decodes the rotation WITHOUT checking anything: for showing a person what a file holds.
    pub fn decode_unverified(&self) -> Result<KeyRotation, String> {
        postcard::from_bytes(&self.rotation).map_err(|e| format!("unreadable key rotation: {e}"))
    }

    /// Checks this rotation against what a device pins now; returns what it pins after it.
    pub fn verify(&self, pinned: &Pinned) -> Result<(KeyRotation, Pinned), RotationRefusal> {
        let rotation = self
            .decode_unverified()
            .map_err(|detail| RotationRefusal::Malformed { detail })?;
        let epoch = rotation.epoch;
        if epoch <= pinned.epoch {
            return Err(RotationRefusal::Stale {
                epoch,
                current: pinned.epoch,
            });
        }
        let bad_set = |detail: String| RotationRefusal::BadKeySet { epoch, detail };
        if rotation.keys.is_empty() || rotation.keys.len() > MAX_KEYS {
            return Err(bad_set(format!(
                "names {} keys; a device pins one or two",
                rotation.keys.len()
            )));
        }
        if rotation.keys.len() == 2 && rotation.keys[0] == rotation.keys[1] {
            return Err(bad_set("names the same key twice".into()));
        }
        if self.signatures.len() > MAX_SIGNATURES {
            return Err(bad_set(format!(
                "carries {} signatures; at most {MAX_SIGNATURES}",
                self.signatures.len()
            )));
        }
        let new_keys = rotation.verifying_keys().map_err(bad_set)?;
        let message = signing_bytes(&self.rotation);
        let signed_by = |key: &VerifyingKey| -> Result<bool, RotationRefusal> {
            let id = key_id(key);
            let Some(sig) = self.signatures.iter().find(|s| s.key_id == id) else {
                return Ok(false);
            };
            key.verify_strict(&message, &Signature::from_bytes(&sig.signature.0))
                .map(|()| true)
                .map_err(|_| RotationRefusal::BadSignature { epoch, key_id: id })
        };
        for key in &pinned.keys {
            if !signed_by(key)? {
                return Err(RotationRefusal::MissingSignature {
                    epoch,
                    key_id: key_id(key),
                });
            }
        }
        for key in new_keys.iter().filter(|k| !pinned.keys.contains(k)) {
            if !signed_by(key)? {
                return Err(RotationRefusal::NoProofOfPossession {
                    epoch,
                    key_id: key_id(key),
                });
            }
        }
        Ok((
            rotation,
            Pinned {
                epoch,
                keys: new_keys,
            },
        ))
    }

    /// The text form kept in files (`fleetctl key rotate` writes it).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a signed rotation has string keys")
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a signed key rotation: {e}"))
    }
}

/// One rotation a device applied while following a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub rotation: KeyRotation,
    pub pinned: Pinned,
}

/// Applies, in order, every rotation of `chain` above `pinned.epoch`. Stops at the first
/// refusal: what was applied before it stands, nothing after it is looked at.
pub fn follow(chain: &TrustChain, pinned: &Pinned) -> (Vec<Applied>, Option<RotationRefusal>) {
    let mut current = pinned.clone();
    let mut applied = Vec::new();
    for signed in chain.rotations.iter().take(MAX_CHAIN) {
        // Links the device already has are skipped without a look: they were checked when
        // applied, and a device must not be stopped by a link it does not need.
        match signed.decode_unverified() {
            Ok(r) if r.epoch <= current.epoch => continue,
            _ => {}
        }
        match signed.verify(&current) {
            Ok((rotation, next)) => {
                current = next.clone();
                applied.push(Applied {
                    rotation,
                    pinned: next,
                });
            }
            Err(refusal) => return (applied, Some(refusal)),
        }
    }
    (applied, None)
}

/// The time a device checks validity windows against: the later of its clock and the floor
/// raised by the signed times it has accepted.
pub fn trusted_now(clock: UnixMillis, floor: UnixMillis) -> UnixMillis {
    clock.max(floor)
}
