//! Strategy `ab`: two releases of one application on two disjoint, stratified subsets of the
//! targets, observed side by side; an operator promotes one, which then rolls out by
//! canary-rolling. This module holds the pure parts that are not the engine's: the arms'
//! planning, the checklist items about the pair, and the interval of a difference.
//!
//! Design: both arms are the rollout's wave 0 (the arms are its canary, the observation window
//! its canary soak); the rest of the targets are planned into the winner's waves at start. Each
//! arm's share and window come from release A's `[strategy]` (`ab_percent`, `observation`).

use std::collections::{BTreeMap, BTreeSet};

use fleet_proto::operator::CheckItem;
use fleet_proto::release::{Refusal, Release, StrategyKind};
use fleet_proto::rollout::Interval;
use fleet_proto::{DeviceId, SignedRelease};

use crate::checklist::{self, CheckContext, Validation};
use crate::gate::wilson;
use crate::model::DeviceInfo;
use crate::waves::{self, TAG_HIGH_FIDELITY, TAG_KNOWN_ISSUE, TAG_SPOF, Targets};

/// The arms and the waves the winner rolls out in afterwards.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AbPlan {
    pub a: Vec<DeviceId>,
    pub b: Vec<DeviceId>,
    /// The rest of the targets, stratified, at the release's wave percentages.
    pub waves: Vec<Vec<DeviceId>>,
    /// Hardware types and regions that the arms do not both cover.
    pub uncovered: Vec<String>,
}

/// Plans two disjoint arms of `percent` % of the eligible devices each. Devices are dealt in
/// pairs from the same (hardware type, region) stratum, one to each arm, so both arms hold the
/// same mix: first strata that cover a type or region neither arm has yet, then the stratum
/// with the most devices left. Never spof, known-issue or offline devices (like a canary);
/// high-fidelity devices first.
pub fn plan(eligible: &[&DeviceInfo], percent: f64, wave_pcts: &[u8]) -> AbPlan {
    let mut strata: BTreeMap<(&str, &str), Vec<&DeviceInfo>> = BTreeMap::new();
    let mut types: BTreeSet<&str> = BTreeSet::new();
    let mut regions: BTreeSet<&str> = BTreeSet::new();
    for d in eligible.iter().copied().filter(|d| d.online) {
        types.insert(d.device_type());
        regions.insert(d.region());
        if !d.has_tag(TAG_SPOF) && !d.has_tag(TAG_KNOWN_ISSUE) {
            strata
                .entry((d.device_type(), d.region()))
                .or_default()
                .push(d);
        }
    }
    for list in strata.values_mut() {
        // Popped from the end: the most preferred device last.
        list.sort_by_key(|d| {
            std::cmp::Reverse((
                !d.has_tag(TAG_HIGH_FIDELITY),
                waves::spread_key(&d.id),
                d.id.clone(),
            ))
        });
    }
    let wanted = ((eligible.len() as f64 * percent / 100.0).ceil() as usize).max(1);
    let mut out = AbPlan::default();
    // Coverage first, greedily by what a pair adds.
    while !types.is_empty() || !regions.is_empty() {
        let best = strata
            .iter()
            .filter(|(_, l)| l.len() >= 2)
            .map(|(k, _)| {
                let gain = usize::from(types.contains(k.0)) + usize::from(regions.contains(k.1));
                (gain, *k)
            })
            .filter(|(g, _)| *g > 0)
            .fold(None::<(usize, (&str, &str))>, |acc, (g, k)| match acc {
                Some((ag, _)) if ag >= g => acc,
                _ => Some((g, k)),
            });
        let Some((_, key)) = best else { break };
        types.remove(key.0);
        regions.remove(key.1);
        deal(&mut strata, key, &mut out);
    }
    // Then the share, from the strata with most devices left (proportional to their size).
    while out.a.len() < wanted {
        let best = strata.iter().filter(|(_, l)| l.len() >= 2).fold(
            None::<(usize, (&str, &str))>,
            |acc, (k, l)| match acc {
                Some((n, _)) if n >= l.len() => acc,
                _ => Some((l.len(), *k)),
            },
        );
        let Some((_, key)) = best else { break };
        deal(&mut strata, key, &mut out);
    }
    out.uncovered = types.iter().map(|t| format!("hardware type {t}")).collect();
    out.uncovered
        .extend(regions.iter().map(|r| format!("region {r}")));
    out.a.sort();
    out.b.sort();
    let chosen: BTreeSet<&DeviceId> = out.a.iter().chain(&out.b).collect();
    let rest: Vec<&DeviceInfo> = eligible
        .iter()
        .copied()
        .filter(|d| !chosen.contains(&d.id))
        .collect();
    out.waves = waves::split(rest, wave_pcts);
    out
}

/// Gives the next two devices of a stratum one to each arm.
fn deal<'a>(
    strata: &mut BTreeMap<(&'a str, &'a str), Vec<&'a DeviceInfo>>,
    key: (&'a str, &'a str),
    out: &mut AbPlan,
) {
    if let Some(list) = strata.get_mut(&key)
        && let (Some(x), Some(y)) = (list.pop(), list.pop())
    {
        out.a.push(x.id.clone());
        out.b.push(y.id.clone());
    }
}

/// Newcombe's hybrid score interval for `p_b − p_a` from each proportion's Wilson interval.
pub fn difference(a: (f64, f64), b: (f64, f64), z: f64) -> Interval {
    let (pa, na) = a;
    let (pb, nb) = b;
    let (la, ua) = wilson(pa, na, z);
    let (lb, ub) = wilson(pb, nb, z);
    let d = pb - pa;
    Interval {
        value: d,
        low: d - ((pb - lb).powi(2) + (ua - pa).powi(2)).sqrt(),
        high: d + ((ub - pb).powi(2) + (pa - la).powi(2)).sqrt(),
    }
}

/// The checklist of an A/B pair and its plan.
#[derive(Clone, Debug, Default)]
pub struct AbValidation {
    pub items: Vec<CheckItem>,
    pub targets: Targets,
    pub plan: AbPlan,
}

impl AbValidation {
    pub fn ok(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }

    pub fn failed(&self) -> Vec<&CheckItem> {
        self.items.iter().filter(|i| !i.ok).collect()
    }
}

fn item(name: &str, ok: bool, detail: String, fix: &str) -> CheckItem {
    CheckItem {
        name: name.to_owned(),
        ok,
        detail,
        fix: (!ok).then(|| fix.to_owned()),
    }
}

/// The canary item of the single-release checklist: an A/B rollout has arms instead.
const CANARY_ITEM: &str = "canary covers every hardware type and region";

/// Runs the checklist on each release (every item for each, named `A: …`/`B: …`), then the
/// items about the pair, and plans the arms.
pub fn check(
    a: (&SignedRelease, &Result<Release, Refusal>),
    b: (&SignedRelease, &Result<Release, Refusal>),
    devices: &[&DeviceInfo],
    ctx: &CheckContext<'_>,
) -> AbValidation {
    let va: Validation = checklist::check(a.0, a.1, devices, ctx);
    let vb: Validation = checklist::check(b.0, b.1, devices, ctx);
    let mut items = Vec::new();
    for (arm, v) in [("A", &va), ("B", &vb)] {
        for i in v.items.iter().filter(|i| i.name != CANARY_ITEM) {
            items.push(CheckItem {
                name: format!("{arm}: {}", i.name),
                ..i.clone()
            });
        }
    }
    let (Ok(ra), Ok(rb)) = (a.1, b.1) else {
        return AbValidation {
            items,
            targets: va.targets,
            plan: AbPlan::default(),
        };
    };
    let fix = "sign both releases of the same application with kind = \"ab\" and the same [target], then plan again";
    let both_ab = ra.strategy.kind == StrategyKind::Ab && rb.strategy.kind == StrategyKind::Ab;
    items.push(item(
        "arms: both releases use strategy ab",
        both_ab,
        format!("A: {}, B: {}", ra.strategy.kind, rb.strategy.kind),
        "set [strategy] kind = \"ab\" in both manifests and sign them again",
    ));
    let same = ra.name == rb.name && ra.target == rb.target;
    items.push(item(
        "arms: same application and target",
        same,
        if same {
            format!("both {} with the same target", ra.name)
        } else {
            format!(
                "A is {} with target {:?}, B is {} with target {:?}",
                ra.name, ra.target, rb.name, rb.target
            )
        },
        fix,
    ));
    let differ = ra.version != rb.version && ra.counter != rb.counter;
    let (hi, lo) = if ra.counter > rb.counter {
        ("A", "B")
    } else {
        ("B", "A")
    };
    items.push(item(
        "arms: different versions and counters",
        differ,
        if differ {
            format!(
                "A {} (#{}), B {} (#{}); promoting {lo} reaches only devices outside arm {hi} (an agent never accepts a counter below one it accepted): arm {hi}'s devices return to their previous release",
                ra.version, ra.counter, rb.version, rb.counter
            )
        } else {
            format!(
                "A {} (#{}) and B {} (#{}) must differ in version and counter",
                ra.version, ra.counter, rb.version, rb.counter
            )
        },
        "sign the two versions with distinct versions and counters",
    ));
    let same_targets = va.targets.eligible == vb.targets.eligible;
    let eligible: Vec<&DeviceInfo> = devices
        .iter()
        .copied()
        .filter(|d| va.targets.eligible.binary_search(&d.id).is_ok())
        .collect();
    let plan = plan(&eligible, ra.strategy.canary_percent, &ra.strategy.waves);
    let covered = plan.uncovered.is_empty() && !plan.a.is_empty() && same_targets;
    items.push(item(
        "arms cover every hardware type and region",
        covered,
        if !same_targets {
            "A and B are admissible on different devices (hardware lists or targets differ)".into()
        } else if covered {
            format!(
                "{} devices per arm ({} % of {} each; A: {}; B: {}), observed for {}",
                plan.a.len(),
                ra.strategy.canary_percent,
                eligible.len(),
                checklist::list_ids(&plan.a, 5),
                checklist::list_ids(&plan.b, 5),
                humantime::format_duration(ra.strategy.canary_soak)
            )
        } else if plan.a.is_empty() {
            "no two online devices (not spof, not known-issue) share a hardware type and region".into()
        } else {
            format!(
                "no pair of online devices (not spof, not known-issue) for {}",
                plan.uncovered.join(", ")
            )
        },
        "bring two devices of each hardware type and region online (each arm needs one), or narrow the target",
    ));
    AbValidation {
        items,
        targets: va.targets,
        plan,
    }
}

/// The item that refuses an `ab` release started on its own.
pub fn alone(release: &Release) -> Option<CheckItem> {
    (release.strategy.kind == StrategyKind::Ab).then(|| {
        item(
            "arms: a second release to compare",
            false,
            format!("{} uses strategy ab, which compares two releases", release.label()),
            "start it with the release to compare: `fleetctl rollout start A.toml --versus B.toml` (or `fleetctl plan A.toml --versus B.toml`)",
        )
    })
}
