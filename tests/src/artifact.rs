//! Release artifacts made the way a release engineer makes them: the real `fleet-demo-app`
//! binary in a directory, packed with `fleetctl artifact pack`, served by the coordinator's
//! content-addressed `/artifacts/{sha256}` endpoint (or as a `file://` URL).
//!
//! One artifact serves every "version" of a test: a release's version and its fault knobs are
//! command-line flags of the demo app, carried by the signed manifest's `run.args`
//! ([`ReleaseSpec::demo_app`]). Packing a debug build of the demo app takes a few seconds of
//! CPU, so a test packs it once.

use std::path::{Path, PathBuf};

use crate::fleet::{ReleaseSpec, Releases};
use crate::process::binary;

/// The entrypoint inside the artifact, relative to the slot.
pub const DEMO_ENTRYPOINT: &str = "bin/fleet-demo-app";

/// A packed `fleet-demo-app`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DemoArtifact {
    /// The tar.gz `fleetctl artifact pack` wrote.
    pub path: PathBuf,
    /// Lowercase hex, as in the manifest.
    pub sha256: String,
    pub size: u64,
    /// The architecture it was packed for (this machine's).
    pub arch: String,
}

impl DemoArtifact {
    /// Copies `target/debug/fleet-demo-app` to `<desk>/demo-app/bin/` and packs that directory
    /// with `fleetctl artifact pack` on the release engineer's desk.
    #[track_caller]
    pub fn pack(releases: &Releases) -> DemoArtifact {
        let desk = &releases.ctl.dir;
        let tree = desk.join("demo-app");
        let bin = tree.join("bin");
        std::fs::create_dir_all(&bin)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", bin.display()));
        let app = binary("fleet-demo-app");
        std::fs::copy(&app, bin.join("fleet-demo-app"))
            .unwrap_or_else(|e| panic!("failed to copy {} into the artifact: {e}", app.display()));
        let arch = std::env::consts::ARCH;
        let out = desk.join(format!("demo-app-{arch}.tar.gz"));
        Self::pack_dir(releases, &tree, "any", &out)
    }

    /// Packs the directory `tree` with `fleetctl artifact pack --name demo --version VERSION`
    /// for this machine's architecture into `out`, e.g. a container release's `docker save`
    /// tarball.
    #[track_caller]
    pub fn pack_dir(releases: &Releases, tree: &Path, version: &str, out: &Path) -> DemoArtifact {
        let arch = std::env::consts::ARCH.to_owned();
        let stanza = releases
            .ctl
            .run(&[
                "artifact",
                "pack",
                path_arg(tree),
                "--name",
                "demo",
                "--version",
                version,
                "--arch",
                &arch,
                "--out",
                path_arg(out),
            ])
            .ok();
        let field = |key: &str| -> String {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = ")))
                .map(|v| v.trim_matches('"').to_owned())
                .unwrap_or_else(|| panic!("fleetctl artifact pack printed no {key}:\n{stanza}"))
        };
        let sha256 = field("sha256");
        let size = field("size").replace('_', "").parse().unwrap_or_else(|e| {
            panic!("fleetctl artifact pack printed a size that is not a number ({e}):\n{stanza}")
        });
        DemoArtifact {
            path: out.to_owned(),
            sha256,
            size,
            arch,
        }
    }

    /// Puts the file into a coordinator's artifacts directory under its sha256 and returns the
    /// URL devices download it from (`http://127.0.0.1:PORT/artifacts/SHA256`).
    #[track_caller]
    pub fn serve_from(&self, artifacts_dir: &Path, http_port: u16) -> String {
        std::fs::create_dir_all(artifacts_dir)
            .unwrap_or_else(|e| panic!("failed to create {}: {e}", artifacts_dir.display()));
        let dest = artifacts_dir.join(&self.sha256);
        std::fs::copy(&self.path, &dest).unwrap_or_else(|e| {
            panic!(
                "failed to copy {} to {}: {e}",
                self.path.display(),
                dest.display()
            )
        });
        format!("http://127.0.0.1:{http_port}/artifacts/{}", self.sha256)
    }

    /// The `file://` URL of the packed file, for devices on this machine.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// The manifest's `[artifacts.ARCH]` stanza with `url`.
    pub fn stanza(&self, url: &str) -> String {
        format!(
            "[artifacts.{}]\nurl = \"{url}\"\nsha256 = \"{}\"\nsize = {}\n",
            self.arch, self.sha256, self.size
        )
    }
}

impl ReleaseSpec {
    /// A release of the demo app: `artifact` (a stanza from [`DemoArtifact::stanza`]) run as
    /// `bin/fleet-demo-app --port {port} --version VERSION KNOBS…`, e.g. knobs
    /// `["--crash-at-start"]` or `["--crash-after", "0.3", "--only-on-device-type", "rpi4"]`.
    pub fn demo_app(version: &str, counter: u64, artifact: &str, knobs: &[&str]) -> ReleaseSpec {
        let mut spec = ReleaseSpec::new(version, counter);
        spec.artifacts = artifact.to_owned();
        spec.entrypoint = DEMO_ENTRYPOINT.into();
        spec.args = ["--port", "{port}", "--version", version]
            .iter()
            .chain(knobs)
            .map(|s| (*s).to_owned())
            .collect();
        spec
    }
}

fn path_arg(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demo_release_runs_the_packed_binary_with_its_version_and_knobs() {
        let a = DemoArtifact {
            path: PathBuf::from("/d/demo.tar.gz"),
            sha256: "ab".repeat(32),
            size: 42,
            arch: "x86_64".into(),
        };
        let stanza = a.stanza("http://127.0.0.1:9/artifacts/x");
        assert_eq!(
            stanza,
            format!(
                "[artifacts.x86_64]\nurl = \"http://127.0.0.1:9/artifacts/x\"\nsha256 = \"{}\"\nsize = 42\n",
                "ab".repeat(32)
            )
        );
        let spec = ReleaseSpec::demo_app("2.0.0", 2, &stanza, &["--crash-at-start"]);
        let toml = spec.toml();
        assert!(
            toml.contains("entrypoint = \"bin/fleet-demo-app\""),
            "{toml}"
        );
        assert!(
            toml.contains(
                "args = [\"--port\", \"{port}\", \"--version\", \"2.0.0\", \"--crash-at-start\"]"
            ),
            "{toml}"
        );
        assert!(toml.contains(&stanza), "{toml}");
        assert_eq!(a.file_url(), "file:///d/demo.tar.gz");
    }
}
