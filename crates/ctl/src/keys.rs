//! `fleetctl keygen`: a release key pair on disk.
//!
//! The signing key stays with the release engineer (or an offline signing host): the
//! coordinator only ever needs the public key, and so do the agents, which pin it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_proto::release::{key_id, parse_public_key, parse_signing_key};
use fleet_proto::{SigningKey, VerifyingKey};

use fleetctl::exit::{Exit, Failure};

pub struct KeyPair {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub key: VerifyingKey,
}

/// Writes `NAME.key` (mode 0600) and `NAME.pub` into `dir`; never overwrites either.
pub fn generate(dir: &Path, name: &str) -> anyhow::Result<KeyPair> {
    let secret = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    for path in [&secret, &public] {
        if path.exists() {
            return Err(Failure::new(Exit::Error, format!("{} already exists", path.display()))
                .hint("a key is never overwritten; choose another --name or --out, or move the old key away")
                .into());
        }
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    write_new(
        &secret,
        &format!("{}\n", hex::encode(key.to_bytes())),
        0o600,
    )?;
    write_new(
        &public,
        &format!("{}\n", hex::encode(key.verifying_key().to_bytes())),
        0o644,
    )?;
    Ok(KeyPair {
        secret,
        public,
        key: key.verifying_key(),
    })
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read signing key {}", path.display()))?;
    parse_signing_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn load_public_key(path: &Path) -> anyhow::Result<VerifyingKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    parse_public_key(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn describe(key: &VerifyingKey) -> String {
    format!("key id {}", key_id(key))
}
