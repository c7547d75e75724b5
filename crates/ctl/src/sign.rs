//! `fleetctl manifest sign|verify`, and finding the signed release behind a manifest path.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_proto::release::{Release, SignedRelease, key_id};
use fleet_proto::{SigningKey, UnixMillis, VerifyingKey, manifest};

use fleetctl::exit::{Exit, Failure};

/// A counter more than this far above the release it rolls back to (or above zero, for a first
/// release) is almost certainly a typo, and an irreversible one: agents refuse every counter
/// below the highest they have accepted.
pub const MAX_COUNTER_JUMP: u64 = 1000;

/// Where `manifest sign` writes by default: the manifest's path with the extension `.release`.
pub fn signed_path(manifest: &Path) -> PathBuf {
    manifest.with_extension("release")
}

pub fn read_manifest(path: &Path, now: UnixMillis) -> anyhow::Result<Release> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read manifest {}", path.display()))?;
    manifest::parse(&text, now).map_err(|errors| {
        Failure::new(Exit::Refused, format!("{}: {errors}", path.display()))
            .hint("fix every problem listed, then sign again")
            .into()
    })
}

pub fn sign(
    manifest: &Path,
    key: &SigningKey,
    now: UnixMillis,
    allow_counter_jump: bool,
) -> anyhow::Result<SignedRelease> {
    let release = read_manifest(manifest, now)?;
    let base = release.rollback_to.as_ref().map_or(0, |r| r.counter);
    let jump = release.counter.saturating_sub(base);
    if jump > MAX_COUNTER_JUMP && !allow_counter_jump {
        let from = match &release.rollback_to {
            Some(r) => format!(
                "the release it rolls back to ({} #{})",
                r.version, r.counter
            ),
            None => "zero (it names no rollback_to)".to_owned(),
        };
        return Err(Failure::new(
            Exit::Refused,
            format!(
                "release counter {} is {jump} above {from}; devices would then refuse every release with a counter below it",
                release.counter
            ),
        )
        .hint(format!(
            "use the next counter after your last release; if the jump is intended, pass --allow-counter-jump (limit without it: {MAX_COUNTER_JUMP})"
        ))
        .into());
    }
    Ok(SignedRelease::sign(&release, key))
}

pub fn read_signed(path: &Path) -> anyhow::Result<SignedRelease> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read signed release {}", path.display()))?;
    SignedRelease::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Checks a signed release against public keys, as an agent's first step would.
pub fn verify(signed: &SignedRelease, keys: &[VerifyingKey]) -> Result<Release, Failure> {
    signed.open(keys).map_err(|refusal| {
        let pinned: Vec<String> = keys.iter().map(|k| key_id(k).to_string()).collect();
        Failure::new(Exit::Refused, format!("release refused: {refusal}"))
            .hint(format!("checked against key ids [{}]", pinned.join(", ")))
    })
}

/// The signed release an operator means by `PATH`: a `.release` file as is, or a manifest
/// `.toml` together with the `.release` signed from it (which must still match it).
pub fn for_rollout(path: &Path) -> anyhow::Result<SignedRelease> {
    if path.extension().is_some_and(|e| e == "toml") {
        let signed_file = signed_path(path);
        if !signed_file.exists() {
            return Err(Failure::new(
                Exit::Refused,
                format!(
                    "{} is not signed: {} does not exist",
                    path.display(),
                    signed_file.display()
                ),
            )
            .hint(format!(
                "fleetctl manifest sign {} --key release.key",
                path.display()
            ))
            .into());
        }
        let signed = read_signed(&signed_file)?;
        let release = signed
            .decode_unverified()
            .map_err(|e| anyhow::anyhow!("{}: {e}", signed_file.display()))?;
        // Re-validating at the signing instant reproduces the signed release exactly, unless
        // the manifest was edited after signing.
        let current = read_manifest(path, release.not_before)?;
        if current != release {
            return Err(Failure::new(
                Exit::Refused,
                format!(
                    "{} changed after it was signed ({} holds {})",
                    path.display(),
                    signed_file.display(),
                    release.label()
                ),
            )
            .hint(format!(
                "sign it again: fleetctl manifest sign {} --key release.key",
                path.display()
            ))
            .into());
        }
        Ok(signed)
    } else {
        read_signed(path)
    }
}
