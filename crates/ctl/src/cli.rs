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
    /// The CA (PEM) that signed the broker's certificate; required with an mqtts:// broker
    #[arg(long, global = true, env = "FLEET_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (PEM), when the broker requires one
    #[arg(long, global = true, env = "FLEET_CLIENT_CERT", value_name = "FILE")]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM)
    #[arg(long, global = true, env = "FLEET_CLIENT_KEY", value_name = "FILE")]
    pub client_key: Option<PathBuf>,
    /// Your operator signing key (`fleetctl keygen --name NAME`): signs every request
    #[arg(long, global = true, env = "FLEET_OPERATOR_KEY", value_name = "FILE")]
    pub operator_key: Option<PathBuf>,
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
        /// Strategy ab: the release to compare with (arm B; MANIFEST is arm A)
        #[arg(long, value_name = "MANIFEST")]
        versus: Option<PathBuf>,
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
    /// Rotate the release keys devices pin: sign a rotation, publish it, show one
    #[command(subcommand)]
    Key(KeyCmd),
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
        /// Strategy ab: the release to compare with (arm B; MANIFEST is arm A)
        #[arg(long, value_name = "MANIFEST")]
        versus: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Keep watching until the rollout ends (like `rollout watch`)
        #[arg(long)]
        watch: bool,
    },
    /// Approve the waves after the canary passed
    Approve { rollout: RolloutId },
    /// Strategy ab: roll arm A or B out to every other target once the observation ended
    Promote {
        rollout: RolloutId,
        /// A or B
        arm: fleet_proto::rollout::Arm,
    },
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
pub enum KeyCmd {
    /// Sign a key rotation: from epoch N on, devices pin the --to keys. Sign it with every key
    /// the fleet pins now and every new key (--sign, repeated)
    Rotate {
        /// Above the fleet's current epoch (the first rotation is 1)
        #[arg(long)]
        epoch: u64,
        /// A public key file devices pin from now on (once or twice)
        #[arg(long = "to", value_name = "FILE", required = true)]
        to: Vec<PathBuf>,
        /// A signing key file: every currently pinned key and every new one
        #[arg(long = "sign", value_name = "FILE", required = true)]
        sign: Vec<PathBuf>,
        /// Where to write the signed rotation [default: rotation-EPOCH.json]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// The keys pinned now (public key files), to check the rotation before writing it
        #[arg(long = "pinned", value_name = "FILE")]
        pinned: Vec<PathBuf>,
    },
    /// Send a signed rotation to the coordinator, which publishes it to every device
    Publish { rotation: PathBuf },
    /// What a signed rotation says (epoch, keys, signers), unverified
    Show { rotation: PathBuf },
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
