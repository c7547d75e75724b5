//! The manifest a release engineer writes (TOML), validated into a [`Release`].
//!
//! Validation reports every problem at once, each naming its field, so one round trip fixes a
//! manifest. That is why the TOML is walked by hand rather than deserialised: serde stops at the
//! first wrong type or unknown key. `deploy/manifests/example.toml` is the commented reference.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use toml::{Table, Value};

use crate::hex::Sha256;
use crate::ids::DeviceId;
use crate::release::{
    Approval, Arch, Artifact, Container, HealthCheck, Probe, ProbeCheck, Release, Resources,
    RestartPolicy, RollbackTo, Run, Strategy, StrategyKind, Target, Thresholds, Trial,
    check_device, check_volume, is_container_name, is_image_id, parse_port,
};
use crate::time::{UnixMillis, parse_duration};

/// One problem with a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// Dotted path, e.g. `strategy.canary_percent` or `artifacts.aarch64.sha256`.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Every problem found in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid manifest: {n} problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// Parses and validates a manifest. `now` is the signing time: the default `not_before`, and an
/// already expired manifest is refused.
pub fn parse(text: &str, now: UnixMillis) -> Result<Release, ManifestErrors> {
    let doc: Table = text.parse().map_err(|e: toml::de::Error| {
        ManifestErrors(vec![ManifestError {
            field: "(document)".into(),
            problem: format!("not valid TOML: {}", e.message()),
        }])
    })?;
    let mut c = Checker::default();
    let release = c.release(&doc, now);
    if c.errors.is_empty() {
        Ok(release.expect("a manifest without errors yields a release"))
    } else {
        Err(ManifestErrors(c.errors))
    }
}

/// Why every agent would refuse a blue-green release, as far as the release alone tells: its
/// own data directories (`data.dirs`), or a container (`[container]`). What a device adds (its
/// runtime, its traffic switch, its `app.data_dirs`) each agent reports for the coordinator's
/// checklist instead. Validation reports these on `strategy.kind`, so such a release is never
/// signed; the checklist repeats them for a release an older fleetctl signed.
///
/// Design: the words are those of the agent's own refusal (`on_desired` in the agent's
/// `machine.rs`), with the manifest's keys, so whoever reads either learns the same reason.
pub fn blue_green_refusals(data_dirs: &[String], container: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if !data_dirs.is_empty() {
        // The agent snapshots data.dirs before a swap and restores them on rollback; blue-green
        // has no swap to snapshot before: the old instance keeps serving, on the same data,
        // while the new one warms up, and after the commit while its wave is held.
        problems.push(format!(
            "blue-green runs the new version beside the old one on the same data, so the data directories in data.dirs ({}) cannot be snapshotted for a rollback; ship this release as canary-rolling, or take them out of data.dirs if both versions can share that data as it is (nothing then restores it on a rollback)",
            data_dirs.join(", ")
        ));
    }
    if container {
        // The container runtime refuses blue-green (only the process runtime runs two instances
        // side by side), and no other runtime installs a container release.
        problems.push(
            "blue-green needs the process runtime, and a release with a [container] section runs only on the container runtime, where every agent refuses blue-green; ship this release as canary-rolling".to_owned(),
        );
    }
    problems
}

#[derive(Default)]
struct Checker {
    errors: Vec<ManifestError>,
}

/// A table being read; remembers which keys were used so unknown keys can be reported.
struct Section<'a> {
    path: String,
    table: Option<&'a Table>,
    used: BTreeSet<&'a str>,
}

impl<'a> Section<'a> {
    fn field(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        let (k, v) = self.table?.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(v)
    }
}

impl Checker {
    fn error(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ManifestError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    fn section<'a>(&mut self, parent: &mut Section<'a>, key: &'a str) -> Section<'a> {
        let path = parent.field(key);
        let table = match parent.get(key) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(other) => {
                self.error(
                    &path,
                    format!("must be a table, found {}", other.type_str()),
                );
                None
            }
        };
        Section {
            path,
            table,
            used: BTreeSet::new(),
        }
    }

    /// Reports keys nobody read: usually a typo of a real key.
    fn finish(&mut self, s: Section<'_>) {
        let Some(table) = s.table else { return };
        for key in table.keys() {
            if !s.used.contains(key.as_str()) {
                self.error(s.field(key), "unknown key");
            }
        }
    }

    fn string<'a>(&mut self, s: &mut Section<'a>, key: &'a str) -> Option<&'a str> {
        match s.get(key)? {
            Value::String(v) => Some(v),
            other => {
                self.error(
                    s.field(key),
                    format!("must be a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn required_string<'a>(&mut self, s: &mut Section<'a>, key: &'a str) -> Option<&'a str> {
        // A missing section is reported once, by the section, not once per key.
        let missing = s.table.is_some_and(|t| !t.contains_key(key));
        let v = self.string(s, key);
        if missing {
            self.error(s.field(key), "required");
        } else if v.is_some_and(|v| v.trim().is_empty()) {
            self.error(s.field(key), "must not be empty");
            return None;
        }
        v
    }

    fn integer(&mut self, s: &mut Section<'_>, key: &'static str) -> Option<i64> {
        match s.get(key)? {
            Value::Integer(v) => Some(*v),
            other => {
                self.error(
                    s.field(key),
                    format!("must be an integer, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn number(&mut self, s: &mut Section<'_>, key: &'static str) -> Option<f64> {
        match s.get(key)? {
            Value::Integer(v) => Some(*v as f64),
            Value::Float(v) => Some(*v),
            other => {
                self.error(
                    s.field(key),
                    format!("must be a number, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn strings<'a>(&mut self, s: &mut Section<'a>, key: &'a str) -> Option<Vec<&'a str>> {
        let field = s.field(key);
        match s.get(key)? {
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(v) => out.push(v.as_str()),
                        other => self.error(
                            format!("{field}[{i}]"),
                            format!("must be a string, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.error(
                    field,
                    format!("must be a list of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn duration(&mut self, s: &mut Section<'_>, key: &'static str, default: Duration) -> Duration {
        let field = s.field(key);
        match self.string(s, key) {
            None => default,
            Some(text) => match parse_duration(text) {
                Ok(d) if d.is_zero() => {
                    self.error(field, "must be longer than zero");
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.error(field, e);
                    default
                }
            },
        }
    }

    fn time(&mut self, s: &mut Section<'_>, key: &'static str) -> Option<UnixMillis> {
        let field = s.field(key);
        let text = match s.get(key)? {
            Value::String(v) => v.clone(),
            Value::Datetime(d) => d.to_string(),
            other => {
                self.error(field, format!("must be a time, found {}", other.type_str()));
                return None;
            }
        };
        match UnixMillis::parse_rfc3339(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(field, e);
                None
            }
        }
    }

    /// A percentage in `(0, max]`, with a default.
    fn percent(&mut self, s: &mut Section<'_>, key: &'static str, default: f64, max: f64) -> f64 {
        let field = s.field(key);
        match self.number(s, key) {
            None => default,
            Some(v) if v > 0.0 && v <= max => v,
            Some(v) => {
                self.error(field, format!("must be above 0 and at most {max}, got {v}"));
                default
            }
        }
    }

    fn release(&mut self, doc: &Table, now: UnixMillis) -> Option<Release> {
        let mut root = Section {
            path: String::new(),
            table: Some(doc),
            used: BTreeSet::new(),
        };

        let mut r = self.section(&mut root, "release");
        if r.table.is_none() && !doc.contains_key("release") {
            self.error(
                "release",
                "required: name, version, counter, expires and hardware",
            );
        }
        let name = self.required_string(&mut r, "name");
        if let Some(n) = name
            && (n.len() > 64
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            self.error(
                r.field("name"),
                format!("{n:?} must be at most 64 ASCII letters, digits, '-', '_' or '.'"),
            );
        }
        let version = self.required_string(&mut r, "version");
        if let Some(v) = version
            && (v.len() > 64 || v.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            self.error(
                r.field("version"),
                format!("{v:?} must be at most 64 characters without spaces"),
            );
        }
        let counter = match self.integer(&mut r, "counter") {
            None => {
                if r.table.is_some_and(|t| !t.contains_key("counter")) {
                    self.error(
                        r.field("counter"),
                        "required: a number higher than every earlier release's",
                    );
                }
                None
            }
            Some(c) if c >= 1 => Some(c as u64),
            Some(c) => {
                self.error(r.field("counter"), format!("must be at least 1, got {c}"));
                None
            }
        };
        let not_before = self.time(&mut r, "not_before").unwrap_or(now);
        let expires = self.time(&mut r, "expires");
        match expires {
            None if r.table.is_some_and(|t| !t.contains_key("expires")) => self.error(
                r.field("expires"),
                "required: a release that never expires can be replayed forever; e.g. expires = \"2027-06-01T00:00:00Z\"",
            ),
            Some(e) if e <= not_before => self.error(
                r.field("expires"),
                format!("{e} is not after not_before ({not_before})"),
            ),
            Some(e) if e <= now => {
                self.error(r.field("expires"), format!("{e} is already past (now {now})"))
            }
            _ => {}
        }
        let hardware = self.strings(&mut r, "hardware").unwrap_or_default();
        if hardware.is_empty() {
            self.error(
                r.field("hardware"),
                "required: the device types this release is built for, e.g. [\"rpi4\"]",
            );
        }
        let rollback_to = self.rollback_to(&mut r, counter);
        self.finish(r);

        let artifacts = self.artifacts(&mut root);
        let container = self.container(&mut root, name);
        let run = self.run(
            &mut root,
            container.is_some() || doc.contains_key("container"),
        );
        let resources = self.resources(&mut root);
        let health = self.health(&mut root, version);
        let probe = self.probe(&mut root);
        let trial = self.trial(&mut root);
        let strategy = self.strategy(&mut root);
        let target = self.target(&mut root);
        let thresholds = self.thresholds(&mut root);
        let data_dirs = self.data(&mut root);
        if strategy.kind == StrategyKind::BlueGreen {
            let in_container = container.is_some() || doc.contains_key("container");
            for problem in blue_green_refusals(&data_dirs, in_container) {
                self.error("strategy.kind", problem);
            }
        }
        self.finish(root);

        Some(Release {
            name: name?.to_owned(),
            version: version?.to_owned(),
            counter: counter?,
            not_before,
            expires: expires?,
            hardware: hardware.into_iter().map(str::to_owned).collect(),
            rollback_to,
            artifacts,
            run: run?,
            resources: resources?,
            health: health?,
            probe,
            trial,
            strategy,
            target,
            thresholds,
            container,
            data_dirs,
        })
    }

    fn rollback_to(&mut self, r: &mut Section<'_>, counter: Option<u64>) -> Option<RollbackTo> {
        let mut s = self.section(r, "rollback_to");
        s.table?;
        let to = self.integer(&mut s, "counter");
        let version = self.required_string(&mut s, "version");
        if s.table.is_some_and(|t| !t.contains_key("counter")) {
            self.error(s.field("counter"), "required");
        }
        let result = match (to, version) {
            (Some(to), Some(version)) => {
                if counter.is_some_and(|c| to < 1 || to as u64 >= c) {
                    self.error(
                        s.field("counter"),
                        format!("must be below the release's own counter, got {to}"),
                    );
                }
                Some(RollbackTo {
                    counter: to.max(0) as u64,
                    version: version.to_owned(),
                })
            }
            _ => None,
        };
        self.finish(s);
        result
    }

    fn artifacts(&mut self, root: &mut Section<'_>) -> BTreeMap<Arch, Artifact> {
        let mut s = self.section(root, "artifacts");
        let mut out = BTreeMap::new();
        let Some(table) = s.table else {
            self.error(
                "artifacts",
                "required: at least one [artifacts.ARCH] with url, sha256 and size",
            );
            return out;
        };
        if table.is_empty() {
            self.error(
                "artifacts",
                "required: at least one [artifacts.ARCH] with url, sha256 and size",
            );
        }
        for key in table.keys() {
            let mut a = self.section(&mut s, key);
            let arch = match key.parse::<Arch>() {
                Ok(arch) => Some(arch),
                Err(e) => {
                    self.error(&a.path, e);
                    None
                }
            };
            let url = self.required_string(&mut a, "url");
            if let Some(u) = url
                && !["http://", "https://", "file://"]
                    .iter()
                    .any(|p| u.starts_with(p))
            {
                self.error(
                    a.field("url"),
                    format!("{u:?} must start with http://, https:// or file://"),
                );
            }
            let sha256 = match self.required_string(&mut a, "sha256") {
                Some(text) => match text.parse::<Sha256>() {
                    Ok(d) => Some(d),
                    Err(e) => {
                        self.error(a.field("sha256"), e.to_string());
                        None
                    }
                },
                None => None,
            };
            let size = match self.integer(&mut a, "size") {
                Some(n) if n > 0 => Some(n as u64),
                Some(n) => {
                    self.error(
                        a.field("size"),
                        format!("must be the artifact's size in bytes, got {n}"),
                    );
                    None
                }
                None => {
                    if a.table.is_some_and(|t| !t.contains_key("size")) {
                        self.error(
                            a.field("size"),
                            "required: the artifact's exact size in bytes",
                        );
                    }
                    None
                }
            };
            if let (Some(arch), Some(url), Some(sha256), Some(size)) = (arch, url, sha256, size) {
                out.insert(
                    arch,
                    Artifact {
                        url: url.to_owned(),
                        sha256,
                        size,
                    },
                );
            }
            self.finish(a);
        }
        self.finish(s);
        out
    }

    /// `[run]`; for a container release (`in_container`) it is optional and every key in it
    /// too: `args` become the container's command, `env` its environment, and a non-empty
    /// `entrypoint` replaces the image's (a path inside the image, so it may be absolute).
    fn run(&mut self, root: &mut Section<'_>, in_container: bool) -> Option<Run> {
        let mut s = self.section(root, "run");
        if s.table.is_none() && !in_container {
            self.error("run", "required: entrypoint (and optional args, env)");
        }
        let entrypoint = if in_container {
            self.string(&mut s, "entrypoint").or(Some(""))
        } else {
            self.required_string(&mut s, "entrypoint")
        };
        if let Some(e) = entrypoint
            && !in_container
            && (e.starts_with('/') || e.split('/').any(|part| part == ".."))
        {
            self.error(
                s.field("entrypoint"),
                format!("{e:?} must be a path inside the slot (relative, without '..')"),
            );
        }
        let args = self.strings(&mut s, "args").unwrap_or_default();
        let mut env = BTreeMap::new();
        let mut e = self.section(&mut s, "env");
        if let Some(table) = e.table {
            for key in table.keys() {
                if let Some(v) = self.string(&mut e, key) {
                    env.insert(key.clone(), v.to_owned());
                }
            }
        }
        self.finish(e);
        self.finish(s);
        Some(Run {
            entrypoint: entrypoint?.to_owned(),
            args: args.into_iter().map(str::to_owned).collect(),
            env,
        })
    }

    /// `[container]`: present only for releases the `container` runtime runs.
    fn container(
        &mut self,
        root: &mut Section<'_>,
        release_name: Option<&str>,
    ) -> Option<Container> {
        let mut s = self.section(root, "container");
        s.table?;
        let image = self.required_string(&mut s, "image");
        if let Some(i) = image
            && (i.chars().any(|c| c.is_whitespace() || c.is_control()) || i.len() > 255)
        {
            self.error(
                s.field("image"),
                format!("{i:?} must be an image reference (repository:tag) or id (sha256:…)"),
            );
        }
        let load = self.string(&mut s, "load");
        if let Some(l) = load
            && (l.is_empty() || l.starts_with('/') || l.split('/').any(|part| part == ".."))
        {
            self.error(
                s.field("load"),
                format!("{l:?} must be a path inside the artifact (relative, without '..')"),
            );
        }
        let image_id = self.string(&mut s, "image_id");
        if let Some(id) = image_id
            && !is_image_id(id)
        {
            self.error(
                s.field("image_id"),
                format!("{id:?} must be an image id: sha256: and 64 lowercase hex digits"),
            );
        }
        if load.is_none()
            && image_id.is_none()
            && !image.is_some_and(is_image_id)
            && s.table.is_some_and(|t| !t.contains_key("image_id"))
        {
            self.error(
                s.field("image_id"),
                "required when there is no `load` tarball: the image already on the device is pinned by its id",
            );
        }
        let name = match self.string(&mut s, "name") {
            Some(n) => Some(n.to_owned()),
            None => release_name.map(str::to_ascii_lowercase),
        };
        if let Some(n) = &name
            && !is_container_name(n)
        {
            self.error(
                s.field("name"),
                format!(
                    "{n:?} must be 1-64 lowercase letters, digits, '.', '_' or '-' (it names the container and its rollback image {n}:fleet-rollback)"
                ),
            );
        }
        let network = self.string(&mut s, "network");
        if let Some(n) = network
            && (n.is_empty() || n.chars().any(|c| c.is_whitespace()))
        {
            self.error(s.field("network"), format!("{n:?} must be a network name"));
        }
        let list = |c: &mut Self,
                    s: &mut Section<'_>,
                    key: &'static str,
                    check: fn(&str) -> Result<(), String>| {
            let field = s.field(key);
            let items = c.strings(s, key).unwrap_or_default();
            for (i, item) in items.iter().enumerate() {
                if let Err(e) = check(item) {
                    c.error(format!("{field}[{i}]"), e);
                }
            }
            items.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let ports = list(self, &mut s, "ports", |p| parse_port(p).map(|_| ()));
        if network == Some("host") && !ports.is_empty() {
            self.error(
                s.field("ports"),
                "must be empty with network = \"host\": the container already uses the device's ports",
            );
        }
        let volumes = list(self, &mut s, "volumes", check_volume);
        let devices = list(self, &mut s, "devices", check_device);
        let restart = match self.string(&mut s, "restart") {
            None => RestartPolicy::UnlessStopped,
            Some(text) => RestartPolicy::parse(text).unwrap_or_else(|| {
                self.error(
                    s.field("restart"),
                    format!("{text:?} must be no, on-failure, always or unless-stopped"),
                );
                RestartPolicy::UnlessStopped
            }),
        };
        self.finish(s);
        Some(Container {
            image: image?.to_owned(),
            load: load.map(str::to_owned),
            image_id: image_id.map(str::to_owned),
            name: name?,
            network: network.map(str::to_owned),
            ports,
            volumes,
            devices,
            restart,
        })
    }

    /// `[data] dirs`: absolute, distinct, not nested in each other, never `/`.
    fn data(&mut self, root: &mut Section<'_>) -> Vec<String> {
        let mut s = self.section(root, "data");
        let field = s.field("dirs");
        let dirs = self.strings(&mut s, "dirs").unwrap_or_default();
        self.finish(s);
        let mut out: Vec<String> = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let trimmed = d.trim_end_matches('/');
            if !d.starts_with('/')
                || trimmed.is_empty()
                || d.split('/').any(|p| p == ".." || p == ".")
            {
                self.error(
                    format!("{field}[{i}]"),
                    format!("{d:?} must be an absolute directory path other than / (without '.' or '..')"),
                );
                continue;
            }
            let nested = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
            if let Some(other) = out
                .iter()
                .find(|o| nested(trimmed, o) || nested(o, trimmed))
            {
                self.error(
                    format!("{field}[{i}]"),
                    format!("{d:?} overlaps {other:?}: name each directory once"),
                );
                continue;
            }
            out.push(trimmed.to_owned());
        }
        out
    }

    fn resources(&mut self, root: &mut Section<'_>) -> Option<Resources> {
        let mut s = self.section(root, "resources");
        if s.table.is_none() {
            self.error("resources", "required: disk_mb and memory_mb");
        }
        let mut mb = |c: &mut Self, key: &'static str| match c.integer(&mut s, key) {
            Some(v) if v > 0 => Some(v as u64 * 1024 * 1024),
            Some(v) => {
                c.error(s.field(key), format!("must be above 0, got {v}"));
                None
            }
            None => {
                if s.table.is_some_and(|t| !t.contains_key(key)) {
                    c.error(s.field(key), "required");
                }
                None
            }
        };
        let disk = mb(self, "disk_mb");
        let memory = mb(self, "memory_mb");
        self.finish(s);
        Some(Resources {
            disk_bytes: disk?,
            memory_bytes: memory?,
        })
    }

    fn health(&mut self, root: &mut Section<'_>, version: Option<&str>) -> Option<HealthCheck> {
        let mut s = self.section(root, "health");
        if s.table.is_none() {
            self.error(
                "health",
                "required: an application health endpoint; \"responds to ping\" is never healthy",
            );
        }
        let endpoint = self.required_string(&mut s, "endpoint");
        if let Some(e) = endpoint
            && !e.starts_with("http://")
        {
            self.error(
                s.field("endpoint"),
                format!("{e:?} must be an http:// URL on the device"),
            );
        }
        let expected = self.string(&mut s, "expected_version").or(version);
        let timeout = self.duration(&mut s, "timeout", Duration::from_secs(2));
        self.finish(s);
        Some(HealthCheck {
            endpoint: endpoint?.to_owned(),
            expected_version: expected?.to_owned(),
            timeout,
        })
    }

    fn probe(&mut self, root: &mut Section<'_>) -> Option<Probe> {
        let mut s = self.section(root, "probe");
        s.table?;
        let command = self.strings(&mut s, "command");
        let request = self.string(&mut s, "request");
        let check = match (command, request) {
            (Some(argv), None) if !argv.is_empty() => Some(ProbeCheck::Command(
                argv.into_iter().map(str::to_owned).collect(),
            )),
            (None, Some(url)) if url.starts_with("http://") => {
                Some(ProbeCheck::Request(url.to_owned()))
            }
            (None, Some(url)) => {
                self.error(
                    s.field("request"),
                    format!("{url:?} must be an http:// URL on the device"),
                );
                None
            }
            _ => {
                self.error(
                    &s.path,
                    "needs exactly one of command (a non-empty list) or request (a URL)",
                );
                None
            }
        };
        let expected = match self.required_string(&mut s, "expected_sha256") {
            Some(t) => t
                .parse::<Sha256>()
                .map_err(|e| self.error(s.field("expected_sha256"), e.to_string()))
                .ok(),
            None => None,
        };
        let max_latency = self.duration(&mut s, "max_latency", Duration::from_secs(5));
        self.finish(s);
        Some(Probe {
            check: check?,
            expected_sha256: expected?,
            max_latency,
        })
    }

    fn trial(&mut self, root: &mut Section<'_>) -> Trial {
        let mut s = self.section(root, "trial");
        let deadline = self.duration(&mut s, "deadline", Duration::from_secs(5 * 60));
        let good_probes = match self.integer(&mut s, "good_probes") {
            None => 3,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.error(
                    s.field("good_probes"),
                    format!("must be between 1 and 1000, got {n}"),
                );
                3
            }
        };
        let probe_interval = self.duration(&mut s, "probe_interval", Duration::from_secs(5));
        if probe_interval * good_probes >= deadline {
            self.error(
                s.field("deadline"),
                format!(
                    "{} cannot fit {good_probes} probes {} apart; lengthen the deadline",
                    humantime::format_duration(deadline),
                    humantime::format_duration(probe_interval)
                ),
            );
        }
        self.finish(s);
        Trial {
            deadline,
            good_probes,
            probe_interval,
        }
    }

    fn strategy(&mut self, root: &mut Section<'_>) -> Strategy {
        let mut s = self.section(root, "strategy");
        let kind = match self.string(&mut s, "kind") {
            None | Some("canary-rolling") => StrategyKind::CanaryRolling,
            Some("rolling-update") => StrategyKind::RollingUpdate,
            Some("blue-green") => StrategyKind::BlueGreen,
            Some("ab") => StrategyKind::Ab,
            Some("big-bang") => {
                self.error(
                    s.field("kind"),
                    "big-bang (every device at once) is refused: a bad release would reach the whole fleet before any health gate could stop it; use canary-rolling",
                );
                StrategyKind::CanaryRolling
            }
            Some(other) => {
                self.error(
                    s.field("kind"),
                    format!("unknown strategy {other:?}; use canary-rolling, rolling-update, blue-green or ab"),
                );
                StrategyKind::CanaryRolling
            }
        };
        let canary_percent = match self.number(&mut s, "canary_percent") {
            None => 5.0,
            Some(p) if (1.0..=5.0).contains(&p) => p,
            Some(p) => {
                self.error(
                    s.field("canary_percent"),
                    format!("must be between 1 and 5, got {p}"),
                );
                5.0
            }
        };
        let waves = self.waves(&mut s);
        let mut canary_soak = self.duration(&mut s, "canary_soak", Duration::from_secs(15 * 60));
        // Design: strategy `ab` keeps each arm's share in `canary_percent` and the observation
        // window in `canary_soak` (the arms are the A/B rollout's canary), so `Strategy` and
        // the signed bytes every agent decodes keep their shape.
        let ab_percent = self.number(&mut s, "ab_percent");
        let observation = s
            .get("observation")
            .is_some()
            .then(|| self.duration(&mut s, "observation", canary_soak));
        let mut canary_percent = canary_percent;
        if kind == StrategyKind::Ab {
            canary_percent = match ab_percent {
                None => 10.0,
                Some(p) if (1.0..=50.0).contains(&p) => p,
                Some(p) => {
                    self.error(
                        s.field("ab_percent"),
                        format!(
                            "each arm's share must be between 1 and 50 % of the targets, got {p}"
                        ),
                    );
                    10.0
                }
            };
            if let Some(o) = observation {
                canary_soak = o;
            }
        } else {
            for (key, given) in [
                ("ab_percent", ab_percent.is_some()),
                ("observation", observation.is_some()),
            ] {
                if given {
                    self.error(
                        s.field(key),
                        format!("only for kind = \"ab\" (this strategy is {kind})"),
                    );
                }
            }
        }
        let wave_soak = self.duration(&mut s, "wave_soak", Duration::from_secs(10 * 60));
        let approval = match self.string(&mut s, "approval") {
            None | Some("manual") => Approval::Manual,
            Some("auto") => Approval::Auto,
            Some(other) => {
                self.error(
                    s.field("approval"),
                    format!("must be \"manual\" or \"auto\", got {other:?}"),
                );
                Approval::Manual
            }
        };
        self.finish(s);
        Strategy {
            kind,
            canary_percent,
            waves,
            canary_soak,
            wave_soak,
            approval,
        }
    }

    fn waves(&mut self, s: &mut Section<'_>) -> Vec<u8> {
        let default = vec![25, 50, 100];
        let field = s.field("waves");
        let Some(value) = s.get("waves") else {
            return default;
        };
        let Value::Array(items) = value else {
            self.error(
                field,
                format!("must be a list of percentages, found {}", value.type_str()),
            );
            return default;
        };
        let mut waves = Vec::new();
        for item in items {
            match item {
                Value::Integer(p) if (1..=100).contains(p) => waves.push(*p as u8),
                other => {
                    self.error(
                        field,
                        format!("each wave is a whole percentage from 1 to 100, found {other}"),
                    );
                    return default;
                }
            }
        }
        let problem = if waves.is_empty() || waves.len() > 10 {
            Some(format!("needs 1 to 10 waves, got {}", waves.len()))
        } else if waves.windows(2).any(|w| w[0] >= w[1]) {
            Some(format!(
                "{waves:?} must increase: each wave is the cumulative share of the remaining fleet"
            ))
        } else if waves.last() != Some(&100) {
            Some(format!(
                "{waves:?} must end at 100 so the whole fleet is covered"
            ))
        } else {
            None
        };
        match problem {
            Some(p) => {
                self.error(field, p);
                default
            }
            None => waves,
        }
    }

    fn target(&mut self, root: &mut Section<'_>) -> Target {
        let mut s = self.section(root, "target");
        let owned = |v: Option<Vec<&str>>| -> Vec<String> {
            v.unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect()
        };
        let device_types = owned(self.strings(&mut s, "device_types"));
        let mut arch = Vec::new();
        for (i, a) in owned(self.strings(&mut s, "arch")).iter().enumerate() {
            match a.parse::<Arch>() {
                Ok(a) => arch.push(a),
                Err(e) => self.error(format!("{}[{i}]", s.field("arch")), e),
            }
        }
        let regions = owned(self.strings(&mut s, "regions"));
        let tags = owned(self.strings(&mut s, "tags"));
        let mut devices = Vec::new();
        for (i, d) in owned(self.strings(&mut s, "devices"))
            .into_iter()
            .enumerate()
        {
            match DeviceId::new(d) {
                Ok(id) => devices.push(id),
                Err(e) => self.error(format!("{}[{i}]", s.field("devices")), e.to_string()),
            }
        }
        self.finish(s);
        Target {
            device_types,
            arch,
            regions,
            tags,
            devices,
        }
    }

    fn thresholds(&mut self, root: &mut Section<'_>) -> Thresholds {
        let d = Thresholds::default();
        let mut s = self.section(root, "thresholds");
        let error_rate_pts = self.percent(&mut s, "error_rate_pts", d.error_rate_pts, 100.0);
        let p95_latency_pct = self.percent(&mut s, "p95_latency_pct", d.p95_latency_pct, 10_000.0);
        let crash_loop_restarts = match self.integer(&mut s, "crash_loop_restarts") {
            None => d.crash_loop_restarts,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.error(
                    s.field("crash_loop_restarts"),
                    format!("must be between 1 and 1000, got {n}"),
                );
                d.crash_loop_restarts
            }
        };
        let crash_loop_window = self.duration(&mut s, "crash_loop_window", d.crash_loop_window);
        let memory_pct = self.percent(&mut s, "memory_pct", d.memory_pct, 100.0);
        let unreachable_pct = self.percent(&mut s, "unreachable_pct", d.unreachable_pct, 100.0);
        let fleet_error_rate_pts = self.percent(
            &mut s,
            "fleet_error_rate_pts",
            d.fleet_error_rate_pts,
            100.0,
        );
        self.finish(s);
        Thresholds {
            error_rate_pts,
            p95_latency_pct,
            crash_loop_restarts,
            crash_loop_window,
            memory_pct,
            unreachable_pct,
            fleet_error_rate_pts,
        }
    }
}
