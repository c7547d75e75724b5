//! `fleetctl key rotate|publish|show`: signed release-key rotations.
//!
//! A rotation says "from epoch N on, pin exactly these keys". Devices accept it only if every
//! key they pin now signed it, and every new key too (`fleet_proto::trust`), so `rotate` takes
//! the signing keys of both; with `--pinned` it checks the result before writing it, as a
//! device would.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_proto::hex::Hex;
use fleet_proto::release::key_id;
use fleet_proto::trust::{KeyRotation, Pinned, SignedRotation};
use fleet_proto::{UnixMillis, VerifyingKey};

use fleetctl::exit::{Exit, Failure};

use crate::keys;

/// Signs a rotation to `to` at `epoch` with every key in `sign`.
pub fn rotate(
    epoch: u64,
    to: &[PathBuf],
    sign: &[PathBuf],
    pinned: &[PathBuf],
    now: UnixMillis,
) -> anyhow::Result<SignedRotation> {
    let new_keys = to
        .iter()
        .map(|p| keys::load_public_key(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let signers = sign
        .iter()
        .map(|p| keys::load_signing_key(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rotation = KeyRotation {
        epoch,
        keys: new_keys.iter().map(|k| Hex(k.to_bytes())).collect(),
        issued_at: now,
    };
    let refs: Vec<_> = signers.iter().collect();
    let signed = SignedRotation::sign(&rotation, &refs);
    // Every new key must have signed: a rotation to a key nobody holds locks the fleet out.
    for k in &new_keys {
        if !signers.iter().any(|s| s.verifying_key() == *k) {
            return Err(Failure::new(
                Exit::Refused,
                format!(
                    "new key {} did not sign the rotation; devices would refuse it",
                    key_id(k)
                ),
            )
            .hint("pass the new key's secret with --sign as well: it proves someone holds it")
            .into());
        }
    }
    if !pinned.is_empty() {
        let keys = pinned
            .iter()
            .map(|p| keys::load_public_key(p))
            .collect::<anyhow::Result<Vec<VerifyingKey>>>()?;
        let current = Pinned {
            epoch: epoch.saturating_sub(1),
            keys,
        };
        signed.verify(&current).map_err(|refusal| {
            Failure::new(Exit::Refused, format!("rotation refused: {refusal}"))
                .hint("--sign with the secret of every key the fleet pins now (--pinned) and of every new key (--to)")
        })?;
    }
    Ok(signed)
}

pub fn read(path: &Path) -> anyhow::Result<SignedRotation> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key rotation {}", path.display()))?;
    SignedRotation::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// What a rotation says, for a person.
pub fn describe(signed: &SignedRotation) -> anyhow::Result<String> {
    let r = signed
        .decode_unverified()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let pins: Vec<String> = r
        .keys
        .iter()
        .map(|k| {
            VerifyingKey::from_bytes(&k.0)
                .map(|k| key_id(&k).to_string())
                .unwrap_or_else(|_| format!("(not a key: {})", k.short()))
        })
        .collect();
    let signers: Vec<String> = signed
        .signatures
        .iter()
        .map(|s| s.key_id.to_string())
        .collect();
    Ok(format!(
        "epoch      {}\npins       {}\nsigned by  {}\nissued     {}\n",
        r.epoch,
        pins.join(", "),
        signers.join(", "),
        r.issued_at
    ))
}
