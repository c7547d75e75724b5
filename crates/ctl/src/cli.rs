//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fleet_proto::release::Arch;
use fleet_proto::{DeviceId, RolloutId};

/// fleet's operator command line: plan, start, watch and roll back rollouts; sign releases.
#[derive(Debug, Parser)]
#[command(name = "fleetctl", version, about, long_about = None)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Cmd,
}

/// Connection settings: flag, then environment variable, then ~/.config/fleet/fleetctl.toml.
#[derive(Debug, Args)]
pub struct Global {
    /// The MQTT broker the coordinator uses [default: mqtt://127.0.0.1:1883]
    #[arg(long, global = true, env = "FLEET_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// Broker username (operator credentials)
    #[arg(long, global = true, env = "FLEET_USERNAME")]
    pub username: Option<String>,
    /// Broker password
    #[arg(long, global = true, env = "FLEET_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    /// Your name in the audit trail [default: your login name]
    #[arg(
        long = "as",
        global = true,
        env = "FLEET_OPERATOR",
        value_name = "NAME"
    )]
    pub operator: Option<String>,
    /// How long to wait for the broker and for each reply [default: 10s]
    #[arg(long, global = true, env = "FLEET_TIMEOUT", value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Config file [default: ~/.config/fleet/fleetctl.toml]
    #[arg(long, global = true, env = "FLEET_CTL_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The device registry: id, type, arch, region, version, status, last seen
    Devices {
        #[arg(long)]
        json: bool,
        /// Only devices of this hardware type
        #[arg(long = "type", value_name = "TYPE")]
        device_type: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// online, offline or quarantined
        #[arg(long)]
        status: Option<String>,
        /// Only devices whose active version is this
        #[arg(long)]
        version: Option<String>,
    },
    /// One device: show it, quarantine it, or release it from quarantine
    #[command(subcommand)]
    Device(DeviceCmd),
    /// The pre-deployment checklist and the wave plan for a release; deploys nothing
    Plan {
        /// A signed release (.release), or a manifest (.toml) signed beside it
        manifest: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Start, follow and steer rollouts
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// The Fleet Deployment Report of a rollout
    Report {
        rollout: RolloutId,
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: who did what, to which device or rollout, and the outcome
    Audit {
        #[arg(long)]
        device: Option<DeviceId>,
        #[arg(long)]
        rollout: Option<RolloutId>,
        /// An RFC 3339 time, or a duration back from now (e.g. 2h)
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Create a release key pair: NAME.key (secret, 0600) and NAME.pub
    Keygen {
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        #[arg(long, default_value = "release")]
        name: String,
    },
    /// Sign and verify release manifests
    #[command(subcommand)]
    Manifest(ManifestCmd),
    /// Build release artifacts
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Print a shell completion script
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    Show {
        device: DeviceId,
        #[arg(long)]
        json: bool,
    },
    /// Exclude a device from every rollout until it is released
    Quarantine {
        device: DeviceId,
        #[arg(long, default_value = "quarantined by an operator")]
        reason: String,
    },
    /// Let a quarantined device take part in rollouts again
    Release { device: DeviceId },
}

#[derive(Debug, Subcommand)]
pub enum RolloutCmd {
    /// Start a rollout; refused when any checklist item fails
    Start {
        manifest: PathBuf,
        #[arg(long)]
        json: bool,
        /// Keep watching until the rollout ends (like `rollout watch`)
        #[arg(long)]
        watch: bool,
    },
    /// Approve the waves after the canary passed
    Approve { rollout: RolloutId },
    /// Hold the rollout where it is: no new wave starts, gates keep watching
    Pause { rollout: RolloutId },
    /// Continue a paused rollout
    Resume { rollout: RolloutId },
    /// Stop where it is; deployed devices keep what they have
    Abort { rollout: RolloutId },
    /// Return every deployed device to its previous release
    Rollback { rollout: RolloutId },
    /// The state block
    Status {
        rollout: RolloutId,
        #[arg(long)]
        json: bool,
    },
    /// Every rollout with its phase and progress
    List {
        #[arg(long)]
        json: bool,
    },
    /// Live progress per wave; the exit status tells how the rollout ended
    Watch { rollout: RolloutId },
}

#[derive(Debug, Subcommand)]
pub enum ManifestCmd {
    /// Validate a manifest and sign it with a release key
    Sign {
        manifest: PathBuf,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Where to write the signed release [default: MANIFEST with extension .release]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Sign even though the counter jumps far above the previous release
        #[arg(long)]
        allow_counter_jump: bool,
    },
    /// Check a signed release against public keys, as an agent would
    Verify {
        release: PathBuf,
        /// A public key file (repeat for two during a key rotation)
        #[arg(long = "pub", value_name = "FILE", required = true)]
        public: Vec<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArtifactCmd {
    /// Pack a directory into a reproducible tar.gz and print its manifest stanza
    Pack {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        arch: Arch,
        /// [default: ./NAME-VERSION-ARCH.tar.gz]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Where devices will download it [default: file:// URL of --out]
        #[arg(long)]
        url: Option<String>,
    },
}
