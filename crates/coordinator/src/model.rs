//! What the pure core knows about a device: a snapshot of its registry row.

use fleet_proto::device::{BlueGreenSupport, DeviceFacts, Installed, OutcomeKind};
use fleet_proto::hex::Sha256;
use fleet_proto::{DeviceId, RolloutId, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::baseline::Sample;

/// One device as the registry knows it (the device is the source of truth; this is the latest
/// it told us).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub facts: Option<DeviceFacts>,
    pub online: bool,
    pub quarantined: Option<String>,
    /// Registry and device disagreed and nobody resolved it.
    pub discrepancy: Option<String>,
    pub active: Option<Installed>,
    pub standby: Option<Installed>,
    pub highest_counter: u64,
    pub applied_sequence: u64,
    pub last_outcome: Option<LastOutcome>,
    pub last_seen: Option<UnixMillis>,
    pub last_heartbeat_at: Option<UnixMillis>,
    pub health: Option<Sample>,
    pub disk_free_bytes: Option<u64>,
    /// Memory in use and in total (bytes) from the latest heartbeat: what the blue-green
    /// checklist item needs to know whether a second instance fits beside the running one.
    #[serde(default)]
    pub memory_used_bytes: Option<u64>,
    #[serde(default)]
    pub memory_total_bytes: Option<u64>,
    /// The sequence of the latest desired state published to it (0: none yet).
    pub desired_sequence: u64,
    pub desired_retry: u32,
    /// The non-final rollout this device belongs to, if any.
    pub rollout: Option<RolloutId>,
    /// The highest event `seq` received from it, kept across coordinator restarts so that
    /// events lost while the coordinator was down still show as a gap.
    #[serde(default)]
    pub last_event_seq: Option<u64>,
    /// Whether the device can run a blue-green release, from its latest reported state: the
    /// checklist refuses a blue-green plan naming those that cannot. `Unknown` until it
    /// reports, when its agent is older than the field, and in rows written before it.
    #[serde(default)]
    pub blue_green: BlueGreenSupport,
}

/// The device's latest reported outcome, condensed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastOutcome {
    pub version: String,
    pub sequence: u64,
    pub ok: bool,
    pub detail: String,
}

impl LastOutcome {
    pub fn from_kind(version: &str, sequence: u64, kind: &OutcomeKind) -> LastOutcome {
        let (ok, detail) = match kind {
            OutcomeKind::Committed => (true, "committed".to_owned()),
            OutcomeKind::RolledBack(r) => (false, format!("rolled back: {r}")),
            OutcomeKind::Refused(r) => (false, format!("refused: {r}")),
            OutcomeKind::Failed(f) => (false, format!("failed: {f}")),
        };
        LastOutcome {
            version: version.to_owned(),
            sequence,
            ok,
            detail,
        }
    }
}

impl DeviceInfo {
    pub fn new(id: DeviceId) -> DeviceInfo {
        DeviceInfo {
            id,
            facts: None,
            online: false,
            quarantined: None,
            discrepancy: None,
            active: None,
            standby: None,
            highest_counter: 0,
            applied_sequence: 0,
            last_outcome: None,
            last_seen: None,
            last_heartbeat_at: None,
            health: None,
            disk_free_bytes: None,
            memory_used_bytes: None,
            memory_total_bytes: None,
            desired_sequence: 0,
            desired_retry: 0,
            rollout: None,
            last_event_seq: None,
            blue_green: BlueGreenSupport::Unknown,
        }
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.facts
            .as_ref()
            .is_some_and(|f| f.tags.iter().any(|t| t == tag))
    }

    pub fn device_type(&self) -> &str {
        self.facts.as_ref().map_or("unknown", |f| &f.device_type)
    }

    pub fn region(&self) -> &str {
        self.facts.as_ref().map_or("unknown", |f| &f.region)
    }

    pub fn active_digest(&self) -> Option<Sha256> {
        self.active.as_ref().map(|a| a.digest)
    }
}

/// What a reported state changed in the registry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reconciled {
    /// The device was unknown and is now registered.
    pub added: bool,
    /// A new, unresolved discrepancy (registry and device disagreed; the device wins).
    pub discrepancy: Option<String>,
}

/// Reconciles a registry row with what the device reports (PRODUCT.md: the device says what
/// is real). `expected` are the release digests the coordinator has asked this device to run
/// (its desired release and the one before), which explain a change of active release.
pub fn reconcile_state(
    d: &mut DeviceInfo,
    rep: &fleet_proto::device::Reported,
    expected: &[Sha256],
    now: UnixMillis,
) -> Reconciled {
    let mut out = Reconciled {
        added: d.facts.is_none() && d.last_seen.is_none(),
        discrepancy: None,
    };
    let mut notes = Vec::new();
    if let Some(old) = &d.facts {
        let f = &rep.facts;
        if old.device_type != f.device_type {
            notes.push(format!(
                "device type {} → {}",
                old.device_type, f.device_type
            ));
        }
        if old.arch != f.arch {
            notes.push(format!("arch {} → {}", old.arch, f.arch));
        }
        if old.region != f.region {
            notes.push(format!("region {} → {}", old.region, f.region));
        }
        if old.memory_total_bytes != f.memory_total_bytes {
            notes.push(format!(
                "memory {} MiB → {} MiB",
                old.memory_total_bytes >> 20,
                f.memory_total_bytes >> 20
            ));
        }
    }
    let reported_active = rep.active.as_ref().map(|a| a.digest);
    if d.facts.is_some() && d.active_digest() != reported_active {
        let explained = rep.applied_sequence > d.applied_sequence
            || reported_active.is_some_and(|r| expected.contains(&r))
            || rep
                .last_outcome
                .as_ref()
                .is_some_and(|o| o.sequence > d.applied_sequence);
        if !explained {
            let name = |a: &Option<Installed>| {
                a.as_ref().map_or_else(
                    || "nothing".to_owned(),
                    |a| format!("{} {}", a.name, a.version),
                )
            };
            notes.push(format!(
                "active release {} → {} outside any rollout",
                name(&d.active),
                name(&rep.active)
            ));
        }
    }
    if !notes.is_empty() {
        let what = notes.join("; ");
        d.discrepancy = Some(what.clone());
        out.discrepancy = Some(what);
    }
    d.facts = Some(rep.facts.clone());
    d.active = rep.active.clone();
    d.standby = rep.standby.clone();
    d.highest_counter = d.highest_counter.max(rep.highest_counter);
    // Always the latest report's: an agent downgraded to one older than the field goes back
    // to Unknown rather than keeping what a newer one said.
    d.blue_green = rep.blue_green.clone();
    d.applied_sequence = rep.applied_sequence;
    // A device that acted on a newer sequence than we remember (e.g. a restored database)
    // must still see our next desired state as newer.
    d.desired_sequence = d.desired_sequence.max(rep.applied_sequence);
    if let Some(o) = &rep.last_outcome {
        d.last_outcome = Some(LastOutcome::from_kind(&o.version, o.sequence, &o.result));
    }
    d.last_seen = Some(now);
    d.online = true;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;
    use fleet_proto::device::{Reported, UpdatePhase};

    fn report(d: &DeviceInfo, active: Option<Installed>, applied: u64, region: &str) -> Reported {
        Reported {
            device: d.id.clone(),
            seq: 1,
            facts: testkit::facts(d.device_type(), region, &[]),
            active,
            standby: None,
            phase: UpdatePhase::Idle,
            applied_sequence: applied,
            last_outcome: None,
            highest_counter: 5,
            at: UnixMillis(0),
            blue_green: BlueGreenSupport::Supported,
        }
    }

    #[test]
    fn reconciliation_trusts_the_device_and_flags_drift() {
        let (r1, s1) = testkit::signed("app", "1.0", 1, &testkit::Knobs::default());
        let (r2, s2) = testkit::signed("app", "2.0", 2, &testkit::Knobs::default());
        let one = testkit::installed(&r1, &s1);
        let two = testkit::installed(&r2, &s2);

        // Unknown device: added, no discrepancy.
        let mut d = DeviceInfo::new(DeviceId::new("n1").unwrap());
        let rep = Reported {
            facts: testkit::facts("rpi4", "eu", &[]),
            ..report(&d, Some(one.clone()), 0, "eu")
        };
        let r = reconcile_state(&mut d, &rep, &[], UnixMillis(1));
        assert!(r.added && r.discrepancy.is_none());
        assert_eq!(d.active_digest(), Some(one.digest));
        assert_eq!(d.blue_green, BlueGreenSupport::Supported);

        // An update the coordinator asked for: no discrepancy.
        let rep = report(&d, Some(two.clone()), 0, "eu");
        let r = reconcile_state(&mut d, &rep, &[two.digest], UnixMillis(2));
        assert_eq!(r.discrepancy, None);

        // The release changed outside any rollout, and the region moved: flagged, registry
        // updated from the device.
        let rep = report(&d, Some(one.clone()), 0, "us");
        let r = reconcile_state(&mut d, &rep, &[], UnixMillis(3));
        let what = r.discrepancy.unwrap();
        assert!(
            what.contains("region eu → us") && what.contains("outside any rollout"),
            "{what}"
        );
        assert_eq!(d.region(), "us");
        assert_eq!(d.active_digest(), Some(one.digest));
        assert_eq!(d.highest_counter, 5);

        // A device that applied a newer sequence than the registry knows raises ours.
        let rep = report(&d, Some(one.clone()), 42, "us");
        reconcile_state(&mut d, &rep, &[], UnixMillis(4));
        assert_eq!(d.desired_sequence, 42);

        // Whether it can run blue-green is the latest report's, Unknown included (an agent
        // downgraded to one that does not say).
        let why = "blue-green needs a traffic switch on this device".to_owned();
        for support in [
            BlueGreenSupport::Unsupported { why },
            BlueGreenSupport::Unknown,
        ] {
            let rep = Reported {
                blue_green: support.clone(),
                ..report(&d, Some(one.clone()), 42, "us")
            };
            reconcile_state(&mut d, &rep, &[], UnixMillis(5));
            assert_eq!(d.blue_green, support);
        }
    }
}
