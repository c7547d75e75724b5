//! Wave planning: which registry devices a release targets, which of them form the canary, and
//! how the rest split into percentage waves. Pure and deterministic: the same registry and
//! release always give the same plan.

use std::collections::{BTreeMap, BTreeSet};

use fleet_proto::operator::PlannedWave;
use fleet_proto::release::Release;
use fleet_proto::{DeviceId, RolloutId};

use crate::model::DeviceInfo;

/// Tag of devices whose failure would take something down with them: never in a canary.
pub const TAG_SPOF: &str = "spof";
/// Tag of devices with a known problem that would muddy a canary's signal.
pub const TAG_KNOWN_ISSUE: &str = "known-issue";
/// Tag of devices whose traffic is representative: preferred for canaries.
pub const TAG_HIGH_FIDELITY: &str = "high-fidelity";

/// The devices of a release, sorted out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Targets {
    /// Targeted and deployable.
    pub eligible: Vec<DeviceId>,
    /// Targeted but not deployed to now, with the reason.
    pub excluded: Vec<(DeviceId, String)>,
    /// Targeted devices that belong to another unfinished rollout.
    pub busy: Vec<(DeviceId, RolloutId)>,
}

/// Whether the release is meant for this device (its selector and its hardware list).
pub fn is_targeted(release: &Release, d: &DeviceInfo) -> bool {
    let Some(facts) = &d.facts else { return false };
    release.hardware.contains(&facts.device_type) && release.target.matches(&d.id, facts).is_ok()
}

/// Sorts the registry into eligible, excluded and busy targets.
pub fn targets<'a>(
    release: &Release,
    devices: impl IntoIterator<Item = &'a DeviceInfo>,
) -> Targets {
    let mut out = Targets::default();
    for d in devices {
        if d.facts.is_none() {
            // Explicitly listed devices that never reported are worth naming.
            if release.target.devices.contains(&d.id) {
                out.excluded
                    .push((d.id.clone(), "has not reported its facts yet".into()));
            }
            continue;
        }
        if !is_targeted(release, d) {
            continue;
        }
        if let Some(reason) = &d.quarantined {
            out.excluded
                .push((d.id.clone(), format!("quarantined: {reason}")));
        } else if let Some(what) = &d.discrepancy {
            out.excluded
                .push((d.id.clone(), format!("unresolved discrepancy: {what}")));
        } else if let Some(r) = &d.rollout {
            out.busy.push((d.id.clone(), r.clone()));
        } else {
            out.eligible.push(d.id.clone());
        }
    }
    out.eligible.sort();
    out
}

/// A 64-bit FNV-1a hash: spreads devices over waves deterministically.
pub fn spread_key(id: &DeviceId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The canary and the waves, as device lists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WavePlan {
    pub canary: Vec<DeviceId>,
    pub waves: Vec<Vec<DeviceId>>,
    /// Hardware types and regions among the eligible online devices that no canary candidate
    /// covers (every device there is spof, known-issue, or offline).
    pub uncovered: Vec<String>,
}

impl WavePlan {
    /// The plan as `fleetctl plan` shows it.
    pub fn planned_waves(
        &self,
        lookup: &dyn Fn(&DeviceId) -> (String, String),
    ) -> Vec<PlannedWave> {
        let mut out = Vec::new();
        let mut push = |name: String, devices: &[DeviceId]| {
            let mut by_type = BTreeMap::new();
            let mut by_region = BTreeMap::new();
            for d in devices {
                let (t, r) = lookup(d);
                *by_type.entry(t).or_insert(0u32) += 1;
                *by_region.entry(r).or_insert(0u32) += 1;
            }
            out.push(PlannedWave {
                name,
                devices: devices.to_vec(),
                by_type,
                by_region,
            });
        };
        push("canary".into(), &self.canary);
        for (i, w) in self.waves.iter().enumerate() {
            push(format!("wave {}", i + 1), w);
        }
        out
    }
}

fn canary_candidate(d: &DeviceInfo) -> bool {
    d.online && !d.has_tag(TAG_SPOF) && !d.has_tag(TAG_KNOWN_ISSUE)
}

/// Plans the canary (`canary_percent` of the eligible devices, at least one per hardware type
/// and per region, high-fidelity first, never spof/known-issue/offline) and the waves
/// (cumulative percentages of the remainder).
pub fn plan(eligible: &[&DeviceInfo], canary_percent: f64, waves: &[u8]) -> WavePlan {
    let mut candidates: Vec<&DeviceInfo> = eligible
        .iter()
        .copied()
        .filter(|d| canary_candidate(d))
        .collect();
    candidates.sort_by_key(|d| {
        (
            !d.has_tag(TAG_HIGH_FIDELITY),
            spread_key(&d.id),
            d.id.clone(),
        )
    });

    let mut types: BTreeSet<&str> = BTreeSet::new();
    let mut regions: BTreeSet<&str> = BTreeSet::new();
    for d in eligible.iter().filter(|d| d.online) {
        types.insert(d.device_type());
        regions.insert(d.region());
    }
    let mut chosen: BTreeSet<&DeviceId> = BTreeSet::new();
    let mut canary: Vec<DeviceId> = Vec::new();
    // Cover every type and region, greedily taking the candidate that covers most.
    while !types.is_empty() || !regions.is_empty() {
        let best = candidates
            .iter()
            .filter(|d| !chosen.contains(&d.id))
            .map(|d| {
                let gain = usize::from(types.contains(d.device_type()))
                    + usize::from(regions.contains(d.region()));
                (gain, *d)
            })
            .filter(|(gain, _)| *gain > 0)
            // Candidates are in preference order; max_by_key keeps the last maximum, so
            // compare on (gain, reverse position) through a stable scan instead.
            .fold(None::<(usize, &DeviceInfo)>, |acc, (g, d)| match acc {
                Some((ag, _)) if ag >= g => acc,
                _ => Some((g, d)),
            });
        let Some((_, d)) = best else { break };
        types.remove(d.device_type());
        regions.remove(d.region());
        chosen.insert(&d.id);
        canary.push(d.id.clone());
    }
    let mut uncovered: Vec<String> = types.iter().map(|t| format!("hardware type {t}")).collect();
    uncovered.extend(regions.iter().map(|r| format!("region {r}")));

    let wanted = ((eligible.len() as f64 * canary_percent / 100.0).ceil() as usize).max(1);
    for d in &candidates {
        if canary.len() >= wanted {
            break;
        }
        if chosen.insert(&d.id) {
            canary.push(d.id.clone());
        }
    }
    canary.sort();

    let rest = stratified(
        eligible
            .iter()
            .copied()
            .filter(|d| !chosen.contains(&d.id))
            .collect(),
    );
    let total = rest.len();
    let mut planned = Vec::new();
    let mut start = 0usize;
    for &pct in waves {
        let end = ((total as f64 * f64::from(pct) / 100.0).ceil() as usize).min(total);
        if end > start {
            let mut wave: Vec<DeviceId> = rest[start..end].iter().map(|d| d.id.clone()).collect();
            wave.sort();
            planned.push(wave);
            start = end;
        }
    }
    WavePlan {
        canary,
        waves: planned,
        uncovered,
    }
}

/// Splits `devices` into waves at cumulative percentages, stratified like [`plan`]'s waves.
pub fn split(devices: Vec<&DeviceInfo>, waves: &[u8]) -> Vec<Vec<DeviceId>> {
    let rest = stratified(devices);
    let total = rest.len();
    let mut planned = Vec::new();
    let mut start = 0usize;
    for &pct in waves {
        let end = ((total as f64 * f64::from(pct) / 100.0).ceil() as usize).min(total);
        if end > start {
            let mut wave: Vec<DeviceId> = rest[start..end].iter().map(|d| d.id.clone()).collect();
            wave.sort();
            planned.push(wave);
            start = end;
        }
    }
    planned
}

/// Orders devices so that every prefix of the list holds each (hardware type, region) stratum
/// in proportion to its size: cutting it at the wave percentages gives each wave a
/// representative mix, instead of one wave of rpi4s and the next of gateways.
fn stratified(mut devices: Vec<&DeviceInfo>) -> Vec<&DeviceInfo> {
    devices.sort_by_key(|d| {
        (
            d.device_type(),
            d.region(),
            mix(spread_key(&d.id)),
            d.id.clone(),
        )
    });
    let mut sizes: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for d in &devices {
        *sizes.entry((d.device_type(), d.region())).or_default() += 1;
    }
    let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut keyed: Vec<(u64, u64, &DeviceInfo)> = devices
        .into_iter()
        .map(|d| {
            let stratum = (d.device_type(), d.region());
            let index = seen.entry(stratum).or_default();
            // The device's position within its stratum, as a fraction in fixed point.
            let position = ((2 * *index + 1) as u64 * (1 << 32)) / (2 * sizes[&stratum]) as u64;
            *index += 1;
            (position, mix(spread_key(&d.id)), d)
        })
        .collect();
    keyed.sort_by_key(|(position, hash, d)| (*position, *hash, d.id.clone()));
    keyed.into_iter().map(|(_, _, d)| d).collect()
}

/// splitmix64's finaliser: FNV-1a alone leaves ids with a common prefix close together.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `retry` a desired state for this release should carry: one more than last time when the
/// device remembers this version as failed, so that it tries again.
pub fn retry_for(d: &DeviceInfo, version: &str) -> u32 {
    match &d.last_outcome {
        Some(o) if !o.ok && o.version == version => d.desired_retry.saturating_add(1),
        _ => d.desired_retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_proto::device::DeviceFacts;
    use fleet_proto::release::Arch;

    fn dev(id: &str, ty: &str, region: &str, tags: &[&str], online: bool) -> DeviceInfo {
        let mut d = DeviceInfo::new(DeviceId::new(id).unwrap());
        d.online = online;
        d.facts = Some(DeviceFacts {
            device_type: ty.into(),
            arch: Arch::Aarch64,
            region: region.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            agent_version: "0.1.0".into(),
            runtime: "process".into(),
            memory_total_bytes: 1 << 30,
            disk_total_bytes: 1 << 34,
        });
        d
    }

    #[test]
    fn every_wave_holds_each_type_and_region_in_proportion() {
        // Ids that share prefixes per type: a plain hash order put whole types in one wave.
        let mut fleet = Vec::new();
        for (ty, prefix) in [
            ("jetson-orin", "orin"),
            ("rpi4", "rpi4"),
            ("x86-gateway", "gw"),
        ] {
            for n in 1..=20 {
                let region = if n % 2 == 0 { "eu-west" } else { "us-east" };
                fleet.push(dev(&format!("{prefix}-{n:02}"), ty, region, &[], true));
            }
        }
        let refs: Vec<&DeviceInfo> = fleet.iter().collect();
        let p = plan(&refs, 5.0, &[25, 50, 100]);
        for (i, wave) in p.waves.iter().enumerate() {
            let members: Vec<&DeviceInfo> = fleet.iter().filter(|d| wave.contains(&d.id)).collect();
            for ty in ["jetson-orin", "rpi4", "x86-gateway"] {
                let n = members.iter().filter(|d| d.device_type() == ty).count() as f64;
                let share = n / members.len() as f64;
                assert!(
                    (share - 1.0 / 3.0).abs() < 0.15,
                    "wave {} has {n} {ty} of {}",
                    i + 1,
                    members.len()
                );
            }
            let eu = members.iter().filter(|d| d.region() == "eu-west").count() as f64;
            assert!(
                (eu / members.len() as f64 - 0.5).abs() < 0.2,
                "wave {} region mix",
                i + 1
            );
        }
    }

    #[test]
    fn canary_covers_types_and_regions_and_avoids_spof() {
        let mut fleet = Vec::new();
        for i in 0..100 {
            let ty = if i % 10 == 0 { "jetson" } else { "rpi4" };
            let region = if i % 7 == 0 { "eu" } else { "us" };
            let tags: &[&str] = if i < 5 { &["spof"] } else { &[] };
            fleet.push(dev(&format!("d{i:03}"), ty, region, tags, true));
        }
        fleet.push(dev("hf-1", "rpi4", "us", &["high-fidelity"], true));
        let refs: Vec<&DeviceInfo> = fleet.iter().collect();
        let p = plan(&refs, 2.0, &[25, 50, 100]);
        assert!(p.uncovered.is_empty(), "{:?}", p.uncovered);
        let canary: Vec<&DeviceInfo> = fleet.iter().filter(|d| p.canary.contains(&d.id)).collect();
        assert!(canary.iter().any(|d| d.device_type() == "jetson"));
        assert!(canary.iter().any(|d| d.region() == "eu"));
        assert!(canary.iter().all(|d| !d.has_tag(TAG_SPOF)));
        assert!(
            p.canary.iter().any(|d| d.as_str() == "hf-1"),
            "{:?}",
            p.canary
        );
        assert!(p.canary.len() >= 3 && p.canary.len() <= 5, "{:?}", p.canary);
        // Waves: cumulative shares of the remainder, covering it exactly once.
        let sizes: Vec<usize> = p.waves.iter().map(Vec::len).collect();
        let rest = fleet.len() - p.canary.len();
        assert_eq!(sizes.iter().sum::<usize>(), rest);
        assert_eq!(sizes[0], (rest as f64 * 0.25).ceil() as usize);
        let all: BTreeSet<&DeviceId> = p.canary.iter().chain(p.waves.iter().flatten()).collect();
        assert_eq!(all.len(), fleet.len());
    }

    #[test]
    fn a_type_with_only_spof_devices_is_uncovered() {
        let fleet = [
            dev("a", "rpi4", "us", &[], true),
            dev("b", "jetson", "us", &["spof"], true),
        ];
        let refs: Vec<&DeviceInfo> = fleet.iter().collect();
        let p = plan(&refs, 5.0, &[100]);
        assert_eq!(p.uncovered, vec!["hardware type jetson".to_owned()]);
        assert_eq!(p.canary.len(), 1);
        assert_eq!(p.waves, vec![vec![DeviceId::new("b").unwrap()]]);
    }
}
