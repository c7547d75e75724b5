//! Releases and their signatures: what a release engineer signs and what an agent admits.
//!
//! A [`Release`] is the validated manifest. Its canonical form is its postcard encoding; the
//! release key signs those exact bytes with ed25519, and the [`SignedRelease`] carries the bytes
//! themselves, so a verifier never re-encodes (re-encoding across versions could change bytes).
//! [`admit`] is the whole decision an agent makes before it downloads anything: signature by a
//! pinned key, counter, validity window, hardware, architecture and target.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::device::DeviceFacts;
use crate::hex::{Hex, Sha256};
use crate::ids::DeviceId;
use crate::time::UnixMillis;

/// A CPU architecture an artifact is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    X86_64,
    Aarch64,
    Armv7,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::X86_64, Arch::Aarch64, Arch::Armv7];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
        }
    }

    /// The architecture this program was built for, if fleet knows it.
    pub fn current() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            "arm" => Some(Arch::Armv7),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Arch::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("unknown architecture {s:?}; known: x86_64, aarch64, armv7"))
    }
}

/// One downloadable build of the release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    /// `http://`, `https://` or `file://`.
    pub url: String,
    pub sha256: Sha256,
    /// Exact size in bytes; a download stops here, whatever the server sends.
    pub size: u64,
}

/// How to start the application from its slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Path of the executable, relative to the slot.
    pub entrypoint: String,
    /// Arguments; `{port}` is replaced by the device's application port.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// What the release needs from a device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub disk_bytes: u64,
    pub memory_bytes: u64,
}

/// Layer 3 health: the application's own health endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `http://` URL; `{port}` is replaced by the device's application port.
    pub endpoint: String,
    /// The version the endpoint must report; anything else is a wrong-version failure.
    pub expected_version: String,
    pub timeout: Duration,
}

/// Layer 4 health: a functional probe on a known input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    pub check: ProbeCheck,
    /// SHA-256 of the exact output the probe must produce.
    pub expected_sha256: Sha256,
    pub max_latency: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ProbeCheck {
    /// Run this command (argv, relative paths resolved in the slot); its stdout is the output.
    Command(Vec<String>),
    /// GET this URL (`{port}` replaced); the response body is the output.
    Request(String),
}

/// How a device decides, on its own, that a new version is good.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// The new version must be proven healthy before this much time has passed since the swap.
    pub deadline: Duration,
    /// Consecutive good probes (all layers) needed to commit.
    pub good_probes: u32,
    pub probe_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    CanaryRolling,
    RollingUpdate,
    BlueGreen,
    Ab,
}

impl StrategyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::CanaryRolling => "canary-rolling",
            StrategyKind::RollingUpdate => "rolling-update",
            StrategyKind::BlueGreen => "blue-green",
            StrategyKind::Ab => "ab",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Approval {
    /// An operator approves after the canary soak (`fleetctl rollout approve`).
    Manual,
    /// The coordinator approves itself when the canary gate passes (demos, low-risk fleets).
    Auto,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    pub kind: StrategyKind,
    /// Share of the targets in the canary, 1–5 %.
    pub canary_percent: f64,
    /// Cumulative percentages of the fleet remaining after the canary, ending at 100.
    pub waves: Vec<u8>,
    pub canary_soak: Duration,
    pub wave_soak: Duration,
    pub approval: Approval,
}

/// Which devices the release is for. A device is targeted when it matches every non-empty list.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub device_types: Vec<String>,
    pub arch: Vec<Arch>,
    pub regions: Vec<String>,
    /// The device must carry all of these tags.
    pub tags: Vec<String>,
    pub devices: Vec<DeviceId>,
}

impl Target {
    /// Whether the device is targeted; if not, which criterion excludes it.
    pub fn matches(&self, id: &DeviceId, facts: &DeviceFacts) -> Result<(), String> {
        if !self.devices.is_empty() && !self.devices.contains(id) {
            return Err(format!("device {id} is not in the target's device list"));
        }
        if !self.device_types.is_empty() && !self.device_types.contains(&facts.device_type) {
            return Err(format!(
                "device type {} is not in the target's device types [{}]",
                facts.device_type,
                self.device_types.join(", ")
            ));
        }
        if !self.arch.is_empty() && !self.arch.contains(&facts.arch) {
            return Err(format!("architecture {} is not targeted", facts.arch));
        }
        if !self.regions.is_empty() && !self.regions.contains(&facts.region) {
            return Err(format!(
                "region {} is not in the target's regions [{}]",
                facts.region,
                self.regions.join(", ")
            ));
        }
        if let Some(missing) = self.tags.iter().find(|t| !facts.tags.contains(t)) {
            return Err(format!("the device lacks the targeted tag {missing}"));
        }
        Ok(())
    }
}

/// When the coordinator rolls a wave back automatically. Defaults are PRODUCT.md's table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Wave error rate above baseline, in percentage points.
    pub error_rate_pts: f64,
    /// Wave p95 latency above baseline, in percent.
    pub p95_latency_pct: f64,
    /// Restarts within `crash_loop_window` that make a crash loop on any device.
    pub crash_loop_restarts: u32,
    pub crash_loop_window: Duration,
    /// Memory use of any deployed device, in percent.
    pub memory_pct: f64,
    /// Share of the wave whose health endpoint is unreachable, in percent.
    pub unreachable_pct: f64,
    /// Error rate of all deployed devices above baseline, in percentage points; rolls back the
    /// whole fleet.
    pub fleet_error_rate_pts: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            error_rate_pts: 5.0,
            p95_latency_pct: 50.0,
            crash_loop_restarts: 3,
            crash_loop_window: Duration::from_secs(5 * 60),
            memory_pct: 90.0,
            unreachable_pct: 10.0,
            fleet_error_rate_pts: 10.0,
        }
    }
}

/// The release a device may return to from this one, authorised by this release's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackTo {
    pub counter: u64,
    pub version: String,
}

/// A release: the validated manifest, as signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Release {
    pub name: String,
    pub version: String,
    /// Monotonic across all releases signed with the key; agents never accept a lower one
    /// except as an explicit signed rollback.
    pub counter: u64,
    pub not_before: UnixMillis,
    pub expires: UnixMillis,
    /// Device types this release is built for.
    pub hardware: Vec<String>,
    pub rollback_to: Option<RollbackTo>,
    pub artifacts: BTreeMap<Arch, Artifact>,
    pub run: Run,
    pub resources: Resources,
    pub health: HealthCheck,
    pub probe: Option<Probe>,
    pub trial: Trial,
    pub strategy: Strategy,
    pub target: Target,
    pub thresholds: Thresholds,
    // Appended in issue 10 (postcard is positional: new fields go last). `serde(default)` lets
    // the agent read journals written before they existed; signed bytes always carry them.
    /// How the `container` runtime runs this release (manifest `[container]`); `None` for a
    /// release the `process` or `systemd` runtime runs from its slot.
    #[serde(default)]
    pub container: Option<Container>,
    /// Absolute paths of directories the application owns (manifest `[data] dirs`): the agent
    /// snapshots them before the swap, restores them on a rollback, drops the snapshot on commit.
    #[serde(default)]
    pub data_dirs: Vec<String>,
}

/// A container release: which image, and how the container is started (manifest `[container]`).
/// `run.args` become the container's command, `run.env` its environment (plus the agent's
/// `FLEET_*`), and a non-empty `run.entrypoint` replaces the image's entrypoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Container {
    /// The image to run: `repository:tag`, or an image id `sha256:<64 hex>`.
    pub image: String,
    /// Path inside the artifact (relative, no `..`) of a `docker save` tarball the agent loads
    /// at install; `None`: the image must already be on the device, pinned by `image_id`.
    pub load: Option<String>,
    /// The image id (`sha256:<64 hex>`) `image` must resolve to; required without `load`.
    pub image_id: Option<String>,
    /// Container name, kept across versions; the rollback image is tagged `NAME:fleet-rollback`.
    pub name: String,
    /// `host`, `none`, `bridge` or a named network; `None`: the engine's default.
    pub network: Option<String>,
    /// Published ports, `[IP:]HOST:CONTAINER[/tcp|/udp]`; HOST may be `{port}`.
    pub ports: Vec<String>,
    /// Bind mounts, `/HOST:/CONTAINER[:ro|:rw]`.
    pub volumes: Vec<String>,
    /// Devices, `/dev/HOST[:/dev/CONTAINER[:PERMS]]`.
    pub devices: Vec<String>,
    pub restart: RestartPolicy,
}

/// The engine's restart policy for the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    No,
    OnFailure,
    Always,
    UnlessStopped,
}

impl RestartPolicy {
    /// The engine's name for the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::No => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }

    pub fn parse(text: &str) -> Option<RestartPolicy> {
        [
            RestartPolicy::No,
            RestartPolicy::OnFailure,
            RestartPolicy::Always,
            RestartPolicy::UnlessStopped,
        ]
        .into_iter()
        .find(|p| p.as_str() == text)
    }
}

/// One published port, parsed from `[IP:]HOST:CONTAINER[/PROTO]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortMapping {
    pub host_ip: Option<String>,
    /// A port number, or `{port}` (the device's application port).
    pub host_port: String,
    pub container_port: u16,
    pub protocol: String,
}

/// Parses a `[container] ports` entry.
pub fn parse_port(text: &str) -> Result<PortMapping, String> {
    let (spec, protocol) = match text.rsplit_once('/') {
        Some((spec, p)) if p == "tcp" || p == "udp" => (spec, p.to_owned()),
        Some((_, p)) => return Err(format!("{text:?}: protocol {p:?} must be tcp or udp")),
        None => (text, "tcp".to_owned()),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (host_ip, host, container) = match parts.as_slice() {
        [host, container] => (None, *host, *container),
        [ip, host, container] => {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(format!("{text:?}: {ip:?} is not an IP address"));
            }
            (Some((*ip).to_owned()), *host, *container)
        }
        _ => return Err(format!("{text:?} must be [IP:]HOST:CONTAINER[/tcp|/udp]")),
    };
    if host != "{port}" && host.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!(
            "{text:?}: host port {host:?} must be 1-65535 or {{port}}"
        ));
    }
    let container_port = container
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{text:?}: container port {container:?} must be 1-65535"))?;
    Ok(PortMapping {
        host_ip,
        host_port: host.to_owned(),
        container_port,
        protocol,
    })
}

/// Checks a `[container] volumes` entry: `/HOST:/CONTAINER[:ro|:rw]`.
pub fn check_volume(text: &str) -> Result<(), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let ok_mode = |m: &str| m == "ro" || m == "rw";
    match parts.as_slice() {
        [host, container] | [host, container, _]
            if host.starts_with('/') && container.starts_with('/') =>
        {
            match parts.get(2) {
                Some(m) if !ok_mode(m) => Err(format!("{text:?}: mode {m:?} must be ro or rw")),
                _ => Ok(()),
            }
        }
        _ => Err(format!(
            "{text:?} must be /HOST:/CONTAINER[:ro|:rw] with absolute paths"
        )),
    }
}

/// Checks a `[container] devices` entry: `/dev/HOST[:/dev/CONTAINER[:PERMS]]`.
pub fn check_device(text: &str) -> Result<(), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let perms_ok = |p: &str| !p.is_empty() && p.chars().all(|c| matches!(c, 'r' | 'w' | 'm'));
    let ok = match parts.as_slice() {
        [host] => host.starts_with('/'),
        [host, container] => host.starts_with('/') && container.starts_with('/'),
        [host, container, perms] => {
            host.starts_with('/') && container.starts_with('/') && perms_ok(perms)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{text:?} must be /dev/HOST[:/dev/CONTAINER[:PERMS]] (PERMS of r, w, m)"
        ))
    }
}

/// Whether `text` is an image id: `sha256:` and 64 lowercase hex digits.
pub fn is_image_id(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// Whether `name` can be a container name and the repository of the rollback tag
/// (`NAME:fleet-rollback`): 1–64 of lowercase letters, digits, `.`, `_`, `-`, starting with a
/// letter or digit.
pub fn is_container_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

impl Release {
    /// The canonical bytes that are signed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a release has no unsized sequences")
    }

    /// `name version (#counter)`, for messages.
    pub fn label(&self) -> String {
        format!("{} {} (#{})", self.name, self.version, self.counter)
    }
}

/// A key's short identity: the first 8 bytes of SHA-256 of the public key.
pub type KeyId = Hex<8>;

pub fn key_id(key: &VerifyingKey) -> KeyId {
    let digest = Sha256::of(key.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest.0[..8]);
    Hex(id)
}

/// Parses a public release key as written in config files and `release.pub`: 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let bytes: Hex<32> = text
        .trim()
        .parse()
        .map_err(|e| format!("not a release public key: {e}"))?;
    VerifyingKey::from_bytes(&bytes.0).map_err(|_| {
        format!(
            "not a release public key: {} is not a point on the curve",
            bytes.short()
        )
    })
}

/// Parses a release signing key as written in `release.key`: 64 hex digits of the secret seed.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, String> {
    let bytes: Hex<32> = text
        .trim()
        .parse()
        .map_err(|e| format!("not a release signing key: {e}"))?;
    Ok(SigningKey::from_bytes(&bytes.0))
}

/// A release with its signature, as it travels and as it is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRelease {
    pub key_id: KeyId,
    pub signature: Hex<64>,
    /// The canonical bytes of the [`Release`] that were signed.
    #[serde(with = "crate::bytes")]
    pub release: Vec<u8>,
}

impl SignedRelease {
    pub fn sign(release: &Release, key: &SigningKey) -> Self {
        let bytes = release.canonical_bytes();
        SignedRelease {
            key_id: key_id(&key.verifying_key()),
            signature: Hex(key.sign(&bytes).to_bytes()),
            release: bytes,
        }
    }

    /// The release's identity: SHA-256 of its signed bytes.
    pub fn digest(&self) -> Sha256 {
        Sha256::of(&self.release)
    }

    /// Checks the signature against the pinned keys and decodes the release. Says nothing about
    /// whether this device should install it: that is [`admit`].
    pub fn open(&self, keys: &[VerifyingKey]) -> Result<Release, Refusal> {
        let key = keys
            .iter()
            .find(|k| key_id(k) == self.key_id)
            .ok_or(Refusal::UnknownKey {
                key_id: self.key_id,
            })?;
        let signature = Signature::from_bytes(&self.signature.0);
        key.verify_strict(&self.release, &signature)
            .map_err(|_| Refusal::BadSignature {
                key_id: self.key_id,
            })?;
        postcard::from_bytes(&self.release).map_err(|e| Refusal::Malformed {
            detail: e.to_string(),
        })
    }

    /// Decodes the release WITHOUT checking the signature: for showing a person what a file
    /// holds, never for deciding anything.
    pub fn decode_unverified(&self) -> Result<Release, String> {
        postcard::from_bytes(&self.release).map_err(|e| format!("unreadable release bytes: {e}"))
    }

    /// The text form kept in files (`fleetctl manifest sign` writes it).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a signed release has string keys")
    }

    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a signed release: {e}"))
    }
}

/// The release that set a device's highest accepted counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub counter: u64,
    pub digest: Sha256,
    /// The downgrade that release authorises, if any.
    pub rollback_to: Option<RollbackTo>,
}

/// Everything a device trusts when it admits a release.
#[derive(Clone, Debug)]
pub struct Trust<'a> {
    /// One or two pinned release keys (two during a rotation).
    pub keys: &'a [VerifyingKey],
    /// The later of the device clock and its persisted trusted-time floor.
    pub now: UnixMillis,
    /// Clock skew tolerated on both ends of the validity window.
    pub skew: Duration,
    /// What the device has accepted so far; `None` on a fresh device.
    pub highest: Option<&'a Accepted>,
    pub device: &'a DeviceId,
    pub facts: &'a DeviceFacts,
}

/// Decides whether this device may install `signed`, and why not.
pub fn admit(signed: &SignedRelease, trust: &Trust<'_>) -> Result<Release, Refusal> {
    let release = signed.open(trust.keys)?;
    if let Some(highest) = trust.highest {
        if release.counter == highest.counter && signed.digest() != highest.digest {
            return Err(Refusal::CounterReused {
                counter: release.counter,
            });
        }
        if release.counter < highest.counter {
            let authorised = highest
                .rollback_to
                .as_ref()
                .is_some_and(|r| r.counter == release.counter && r.version == release.version);
            if !authorised {
                return Err(Refusal::CounterWentDown {
                    counter: release.counter,
                    highest: highest.counter,
                });
            }
        }
    }
    if trust.now.saturating_add(trust.skew) < release.not_before {
        return Err(Refusal::NotYetValid {
            not_before: release.not_before,
            now: trust.now,
        });
    }
    if trust.now.saturating_sub(trust.skew) > release.expires {
        return Err(Refusal::Expired {
            expires: release.expires,
            now: trust.now,
        });
    }
    if !release.hardware.contains(&trust.facts.device_type) {
        return Err(Refusal::WrongHardware {
            device_type: trust.facts.device_type.clone(),
            supported: release.hardware.clone(),
        });
    }
    if !release.artifacts.contains_key(&trust.facts.arch) {
        return Err(Refusal::NoArtifactForArch {
            arch: trust.facts.arch,
        });
    }
    release
        .target
        .matches(trust.device, trust.facts)
        .map_err(|why| Refusal::NotTargeted { why })?;
    Ok(release)
}

/// Why a device will not install a release. Refusals are final for that release: the agent
/// reports them and never retries on its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error(
        "signed by unknown key {key_id}; pin the release key in the agent's config or sign with a pinned key"
    )]
    UnknownKey { key_id: KeyId },
    #[error(
        "bad signature (key {key_id}): the release was altered or not signed by the release key"
    )]
    BadSignature { key_id: KeyId },
    #[error("signed but unreadable by this agent: {detail}; upgrade the agent")]
    Malformed { detail: String },
    #[error(
        "release counter {counter} is below the highest accepted {highest} and no signed rollback allows it (replayed or downgraded release)"
    )]
    CounterWentDown { counter: u64, highest: u64 },
    #[error("release counter {counter} was already used by a different release")]
    CounterReused { counter: u64 },
    #[error("not valid before {not_before} (device time {now})")]
    NotYetValid {
        not_before: UnixMillis,
        now: UnixMillis,
    },
    #[error("expired at {expires} (device time {now}); sign a fresh release")]
    Expired {
        expires: UnixMillis,
        now: UnixMillis,
    },
    #[error("built for [{}], not for device type {device_type}", supported.join(", "))]
    WrongHardware {
        device_type: String,
        supported: Vec<String>,
    },
    #[error("has no artifact for this device's architecture {arch}")]
    NoArtifactForArch { arch: Arch },
    #[error("not targeted at this device: {why}")]
    NotTargeted { why: String },
    #[error(
        "needs {needed} bytes of free disk, {available} available; free space on the device or shrink the release"
    )]
    InsufficientDisk { needed: u64, available: u64 },
    #[error(
        "version {version} already failed its trial on this device; the coordinator must ask explicitly to retry it"
    )]
    PreviouslyFailed { version: String },
    /// Appended in issue 9: the release's strategy cannot run on this device as configured
    /// (e.g. blue-green under the systemd or container runtime). `why` says what to change.
    #[error("{why}")]
    StrategyUnsupported { why: String },
}
