//! The pre-deployment checklist (PREPARE/VALIDATE), checked against the registry. Pure: the
//! driver hands in the registry snapshot, the verification result and the clock reading.
//! Every item is reported, failed ones with what to do.

use std::time::Duration;

use fleet_proto::device::BlueGreenSupport;
use fleet_proto::manifest::blue_green_refusals;
use fleet_proto::operator::CheckItem;
use fleet_proto::release::{Refusal, Release, StrategyKind};
use fleet_proto::{DeviceId, SignedRelease, UnixMillis};

use crate::model::DeviceInfo;
use crate::waves::{self, Targets, WavePlan};

/// What the checklist needs to know besides the registry.
#[derive(Clone, Copy)]
pub struct CheckContext<'a> {
    pub now: UnixMillis,
    /// A heartbeat older than this is stale.
    pub fresh_heartbeat: Duration,
    /// Whether the coordinator holds the signed release `name`/`counter`/`version` (needed to
    /// roll a device back to it).
    pub held: &'a dyn Fn(&str, u64, &str) -> bool,
}

impl std::fmt::Debug for CheckContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckContext")
            .field("now", &self.now)
            .field("fresh_heartbeat", &self.fresh_heartbeat)
            .finish_non_exhaustive()
    }
}

/// The checklist's result.
#[derive(Clone, Debug, Default)]
pub struct Validation {
    pub items: Vec<CheckItem>,
    pub targets: Targets,
    pub plan: WavePlan,
}

impl Validation {
    pub fn ok(&self) -> bool {
        self.items.iter().all(|i| i.ok)
    }

    pub fn failed(&self) -> Vec<&CheckItem> {
        self.items.iter().filter(|i| !i.ok).collect()
    }
}

fn item(name: &str, ok: bool, detail: String, fix: Option<String>) -> CheckItem {
    CheckItem {
        name: name.to_owned(),
        ok,
        detail,
        fix: if ok { None } else { fix },
    }
}

/// Lists ids, at most `max`, then how many more.
pub fn list_ids<'a>(ids: impl IntoIterator<Item = &'a DeviceId>, max: usize) -> String {
    let ids: Vec<&DeviceId> = ids.into_iter().collect();
    let mut s = ids
        .iter()
        .take(max)
        .map(|d| d.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > max {
        s.push_str(&format!(" and {} more", ids.len() - max));
    }
    s
}

/// Runs the checklist. `opened` is the signature check's result for `signed`.
pub fn check(
    signed: &SignedRelease,
    opened: &Result<Release, Refusal>,
    devices: &[&DeviceInfo],
    ctx: &CheckContext<'_>,
) -> Validation {
    let release = match opened {
        Ok(r) => r,
        Err(why) => {
            return Validation {
                items: vec![item(
                    "artifact checksummed and signed",
                    false,
                    format!("release signature (key {}): {why}", signed.key_id),
                    Some("sign the manifest with `fleetctl manifest sign` using a release key listed in the coordinator's release_keys".into()),
                )],
                ..Validation::default()
            };
        }
    };
    let mut items = Vec::new();
    items.push(item(
        "artifact checksummed and signed",
        true,
        format!(
            "{} signed by key {}; {} artifact(s) with sha256 and size",
            release.label(),
            signed.key_id,
            release.artifacts.len()
        ),
        None,
    ));

    // The manifest itself.
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    match release.strategy.kind {
        StrategyKind::CanaryRolling | StrategyKind::RollingUpdate => {}
        // Blue-green rolls out in canary + waves like canary-rolling; the agents do the
        // side-by-side start and the traffic switch. What a device needs for it is checked by
        // "each device can run blue-green" and "each device can hold two instances" below;
        // what the release alone makes impossible everywhere (its own data directories, a
        // container) `fleetctl manifest sign` refuses, but an older fleetctl signed it anyway.
        StrategyKind::BlueGreen => {
            let refusals = blue_green_refusals(&release.data_dirs, release.container.is_some());
            if !refusals.is_empty() {
                problems.extend(refusals);
                fixes.push("change the manifest as the detail says (usually [strategy] kind = \"canary-rolling\") and sign it again; this version of `fleetctl manifest sign` refuses such a release");
            }
        }
        // A/B: each arm's release is checked here like any other; the items about the pair
        // (and the refusal of an `ab` release started alone) are in `crate::ab`.
        StrategyKind::Ab => {}
    }
    let mut window = false;
    if release.expires <= ctx.now {
        problems.push(format!("expired at {}", release.expires));
        window = true;
    }
    if release.not_before > ctx.now {
        problems.push(format!("not valid before {}", release.not_before));
        window = true;
    }
    if window {
        fixes.push(
            "sign the release again with a validity window (not_before, expires) that includes now",
        );
    }
    items.push(item(
        "manifest valid",
        problems.is_empty(),
        if problems.is_empty() {
            format!(
                "strategy {}, valid until {}",
                release.strategy.kind, release.expires
            )
        } else {
            problems.join("; ")
        },
        Some(fixes.join("; ")),
    ));

    let targets = waves::targets(release, devices.iter().copied());
    let by_id = |id: &DeviceId| devices.iter().copied().find(|d| &d.id == id);
    let eligible: Vec<&DeviceInfo> = {
        let set: std::collections::HashMap<&DeviceId, &DeviceInfo> =
            devices.iter().map(|d| (&d.id, *d)).collect();
        targets
            .eligible
            .iter()
            .filter_map(|id| set.get(id).copied())
            .collect()
    };
    let _ = by_id;

    items.push(item(
        "targets",
        !eligible.is_empty() && targets.busy.is_empty(),
        if !targets.busy.is_empty() {
            let mut rollouts: Vec<String> =
                targets.busy.iter().map(|(_, r)| r.to_string()).collect();
            rollouts.dedup();
            format!(
                "{} targeted devices belong to unfinished rollout(s) {}: {}",
                targets.busy.len(),
                rollouts.join(", "),
                list_ids(targets.busy.iter().map(|(d, _)| d), 5)
            )
        } else {
            format!(
                "{} devices targeted and deployable, {} excluded",
                eligible.len(),
                targets.excluded.len()
            )
        },
        Some(if targets.busy.is_empty() {
            "no registered device matches the release's target and hardware; check [target] and release.hardware, or wait until devices have reported".into()
        } else {
            "wait for the other rollout to finish, or abort/roll it back first (`fleetctl rollout abort ID`)".into()
        }),
    ));

    // Counters: an agent refuses a counter at or below what it accepted (unless same digest).
    let digest = signed.digest();
    let stale: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| {
            d.highest_counter > release.counter
                || (d.highest_counter == release.counter
                    && d.active.as_ref().is_some_and(|a| a.digest != digest))
        })
        .map(|d| &d.id)
        .collect();
    items.push(item(
        "release counter above devices' highest",
        stale.is_empty(),
        if stale.is_empty() {
            format!("counter {} is new to every target", release.counter)
        } else {
            format!(
                "{} devices already accepted counter {} or higher: {}",
                stale.len(),
                release.counter,
                list_ids(stale.iter().copied(), 5)
            )
        },
        Some("sign the release with a counter higher than every earlier release's".into()),
    ));

    let missing_arch: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| {
            d.facts
                .as_ref()
                .is_some_and(|f| !release.artifacts.contains_key(&f.arch))
        })
        .map(|d| &d.id)
        .collect();
    items.push(item(
        "an artifact for every targeted arch",
        missing_arch.is_empty(),
        if missing_arch.is_empty() {
            format!(
                "artifacts for {}",
                release
                    .artifacts
                    .keys()
                    .map(|a| a.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!(
                "no artifact for the architecture of {}",
                list_ids(missing_arch.iter().copied(), 5)
            )
        },
        Some("add [artifacts.ARCH] for each targeted architecture, or narrow target.arch".into()),
    ));

    let too_small: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| {
            d.facts.as_ref().is_some_and(|f| {
                f.memory_total_bytes < release.resources.memory_bytes
                    || f.disk_total_bytes < release.resources.disk_bytes
            })
        })
        .map(|d| &d.id)
        .collect();
    items.push(item(
        "resource needs fit each device",
        too_small.is_empty(),
        if too_small.is_empty() {
            format!(
                "{} MiB memory and {} MiB disk fit every target",
                release.resources.memory_bytes >> 20,
                release.resources.disk_bytes >> 20
            )
        } else {
            format!(
                "too little memory or disk in total on {}",
                list_ids(too_small.iter().copied(), 5)
            )
        },
        Some("lower resources in the manifest or exclude these devices from the target".into()),
    ));

    let no_disk: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| {
            d.disk_free_bytes
                .is_some_and(|free| free < release.resources.disk_bytes)
        })
        .map(|d| &d.id)
        .collect();
    let unknown_disk = eligible
        .iter()
        .filter(|d| d.disk_free_bytes.is_none())
        .count();
    items.push(item(
        "disk space",
        no_disk.is_empty(),
        if no_disk.is_empty() {
            format!(
                "{} MiB free on every target that reported ({unknown_disk} not reported yet)",
                release.resources.disk_bytes >> 20
            )
        } else {
            format!(
                "less than {} MiB free on {}",
                release.resources.disk_bytes >> 20,
                list_ids(no_disk.iter().copied(), 5)
            )
        },
        Some("free disk space on these devices, or shrink the release".into()),
    ));

    if release.strategy.kind == StrategyKind::BlueGreen {
        items.push(blue_green_capable(&eligible));
        items.push(two_instances(release, &eligible));
    }

    // Rollback targets: the release must name each device's current release, and the
    // coordinator must hold that signed release to publish it again.
    let mut fresh_installs = Vec::new();
    let mut not_named = Vec::new();
    let mut not_held = Vec::new();
    for d in &eligible {
        match &d.active {
            None => fresh_installs.push(&d.id),
            Some(a) if a.digest == digest => {}
            Some(a) => match &release.rollback_to {
                Some(rb) if rb.counter == a.counter && rb.version == a.version => {
                    if !(ctx.held)(&a.name, a.counter, &a.version) {
                        not_held.push(&d.id);
                    }
                }
                _ => not_named.push((&d.id, format!("{} (#{})", a.version, a.counter))),
            },
        }
    }
    let rb_ok = not_named.is_empty() && not_held.is_empty();
    let mut detail = Vec::new();
    if let Some(rb) = &release.rollback_to {
        detail.push(format!("rollback_to {} (#{})", rb.version, rb.counter));
    } else {
        detail.push("no rollback_to".into());
    }
    if !not_named.is_empty() {
        let mut running: Vec<&str> = not_named.iter().map(|(_, v)| v.as_str()).collect();
        running.sort();
        running.dedup();
        detail.push(format!(
            "{} devices run a release the new one does not name as rollback_to ({}): {}",
            not_named.len(),
            running.join(", "),
            list_ids(not_named.iter().map(|(d, _)| *d), 5)
        ));
    }
    if !not_held.is_empty() {
        detail.push(format!(
            "the coordinator holds no signed copy of the rollback release for {}",
            list_ids(not_held.iter().copied(), 5)
        ));
    }
    if !fresh_installs.is_empty() {
        detail.push(format!(
            "{} devices run nothing yet, so a rollback has nothing to return to there: {}",
            fresh_installs.len(),
            list_ids(fresh_installs.iter().copied(), 10)
        ));
    }
    items.push(item(
        "a rollback target present on each device",
        rb_ok,
        detail.join("; "),
        Some(if !not_held.is_empty() && not_named.is_empty() {
            "send the previous signed release to the coordinator once (`fleetctl plan PREVIOUS.signed.json`) so it can publish it again on rollback".into()
        } else {
            "set release.rollback_to = { counter, version } to the release the devices run now, sign again; devices running other releases need their own rollout first".into()
        }),
    ));

    let plan = waves::plan(
        &eligible,
        release.strategy.canary_percent,
        &release.strategy.waves,
    );
    items.push(item(
        "canary covers every hardware type and region",
        plan.uncovered.is_empty() && (!plan.canary.is_empty() || eligible.is_empty()),
        if plan.uncovered.is_empty() {
            format!(
                "{} canary devices ({} % of {})",
                plan.canary.len(),
                release.strategy.canary_percent,
                eligible.len()
            )
        } else {
            format!(
                "no online canary candidate (not spof, not known-issue) for {}",
                plan.uncovered.join(", ")
            )
        },
        Some("bring a device of each listed type/region online, or tag one high-fidelity instead of spof/known-issue, or narrow the target".into()),
    ));

    items.push(item(
        "health endpoint, soak periods and thresholds defined",
        true,
        format!(
            "health {}; canary soak {}, wave soak {}; error +{} pts, p95 +{} %, crash loop {} in {}, memory {} %, unreachable {} %, fleet error +{} pts",
            release.health.endpoint,
            humantime::format_duration(release.strategy.canary_soak),
            humantime::format_duration(release.strategy.wave_soak),
            release.thresholds.error_rate_pts,
            release.thresholds.p95_latency_pct,
            release.thresholds.crash_loop_restarts,
            humantime::format_duration(release.thresholds.crash_loop_window),
            release.thresholds.memory_pct,
            release.thresholds.unreachable_pct,
            release.thresholds.fleet_error_rate_pts,
        ),
        None,
    ));

    let stale_online: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| {
            d.online
                && d.last_heartbeat_at
                    .is_none_or(|t| ctx.now.since(t) > ctx.fresh_heartbeat)
        })
        .map(|d| &d.id)
        .collect();
    let offline: Vec<&DeviceId> = eligible
        .iter()
        .filter(|d| !d.online)
        .map(|d| &d.id)
        .collect();
    let online_fresh = eligible.len() - stale_online.len() - offline.len();
    items.push(item(
        "fresh heartbeats",
        stale_online.is_empty() && (online_fresh > 0 || eligible.is_empty()),
        {
            let mut s = format!(
                "{online_fresh} of {} targets reported within {}",
                eligible.len(),
                humantime::format_duration(ctx.fresh_heartbeat)
            );
            if !offline.is_empty() {
                s.push_str(&format!(
                    "; {} offline (skipped, caught up after CONFIRM): {}",
                    offline.len(),
                    list_ids(offline.iter().copied(), 5)
                ));
            }
            if !stale_online.is_empty() {
                s.push_str(&format!(
                    "; no recent heartbeat from {}",
                    list_ids(stale_online.iter().copied(), 5)
                ));
            }
            s
        },
        Some(
            "check the agents on the listed devices (`fleetctl devices`); retry once they report"
                .into(),
        ),
    ));

    Validation {
        items,
        targets,
        plan,
    }
}

/// How many distinct reasons the blue-green item spells out before it only counts the rest.
const MAX_REASONS: usize = 3;

/// Blue-green needs, on each target, the `process` runtime (the only one where the agent runs
/// two instances side by side) and a traffic switch (`[blue_green] switch`). Each agent reports
/// whether it has them ([`BlueGreenSupport`], in its reported state), in the words its refusal
/// would use; the devices that cannot are named here, grouped by reason, before anything is
/// sent.
///
/// Design: an agent older than that report says nothing (`Unknown`). It is named in the detail
/// but does not fail the item: such an agent refuses a blue-green release on arrival if it
/// cannot run one, as every agent did before the report existed. Its runtime is in the facts
/// every agent reports, so one that is not on `process` still fails the item.
fn blue_green_capable(eligible: &[&DeviceInfo]) -> CheckItem {
    let mut cannot: Vec<(&DeviceId, String)> = Vec::new();
    let mut unknown: Vec<&DeviceId> = Vec::new();
    for d in eligible {
        match &d.blue_green {
            BlueGreenSupport::Supported => {}
            BlueGreenSupport::Unsupported { why } => cannot.push((&d.id, why.clone())),
            BlueGreenSupport::Unknown => match d.facts.as_ref().map(|f| f.runtime.as_str()) {
                Some(runtime) if runtime != "process" => cannot.push((
                    &d.id,
                    format!(
                        "blue-green needs the process runtime on this device (it runs the {runtime} runtime)"
                    ),
                )),
                _ => unknown.push(&d.id),
            },
        }
    }
    // Reasons by how many devices give them, most first (then by their words, for a stable
    // order); each with the first few device ids.
    let mut by_reason: std::collections::BTreeMap<&str, Vec<&DeviceId>> = Default::default();
    for (id, why) in &cannot {
        by_reason.entry(why.as_str()).or_default().push(id);
    }
    let mut reasons: Vec<(&str, Vec<&DeviceId>)> = by_reason.into_iter().collect();
    reasons.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));

    let mut detail = Vec::new();
    if cannot.is_empty() {
        detail.push(format!(
            "{} targets report the process runtime and a traffic switch",
            eligible.len() - unknown.len()
        ));
    } else {
        let mut said: Vec<String> = reasons
            .iter()
            .take(MAX_REASONS)
            .map(|(why, ids)| {
                format!(
                    "{} say \"{why}\": {}",
                    ids.len(),
                    list_ids(ids.iter().copied(), 5)
                )
            })
            .collect();
        if reasons.len() > MAX_REASONS {
            let rest: usize = reasons[MAX_REASONS..]
                .iter()
                .map(|(_, ids)| ids.len())
                .sum();
            said.push(format!(
                "{rest} more for {} other reasons: {}",
                reasons.len() - MAX_REASONS,
                list_ids(
                    reasons[MAX_REASONS..]
                        .iter()
                        .flat_map(|(_, ids)| ids.iter().copied()),
                    5
                )
            ));
        }
        detail.push(format!(
            "{} devices cannot run a blue-green release: {}",
            cannot.len(),
            said.join("; ")
        ));
    }
    if !unknown.is_empty() {
        detail.push(format!(
            "{} devices do not say whether they have a traffic switch (an agent older than this coordinator, or no state reported yet; one without a switch refuses the release when it arrives): {}",
            unknown.len(),
            list_ids(unknown.iter().copied(), 5)
        ));
    }
    item(
        "each device can run blue-green (runtime, traffic switch)",
        cannot.is_empty(),
        detail.join("; "),
        Some("configure [blue_green] switch (\"forwarder\" or \"command\") in these devices' agent config, exclude them with the release's [target] (device types, regions, tags or devices), or ship the release as strategy canary-rolling".into()),
    )
}

/// Blue-green starts the new version beside the running one, so each target must hold a
/// second instance: free memory in its last heartbeat (total − used, where used already
/// includes the running instance) of at least `resources.memory`. Whether it can run two
/// instances at all (its runtime) is [`blue_green_capable`]'s.
fn two_instances(release: &Release, eligible: &[&DeviceInfo]) -> CheckItem {
    let need = release.resources.memory_bytes;
    let mut no_room = Vec::new();
    let mut unknown = 0usize;
    for d in eligible {
        match (d.memory_used_bytes, d.memory_total_bytes) {
            (Some(used), Some(total)) if total > 0 => {
                let free = total.saturating_sub(used);
                if free < need {
                    no_room.push((&d.id, free));
                }
            }
            _ => unknown += 1,
        }
    }
    let ok = no_room.is_empty();
    let detail = if ok {
        format!(
            "{} MiB free beside the running instance on every target that reported ({unknown} not reported yet)",
            need >> 20
        )
    } else {
        let least = no_room.iter().map(|(_, free)| *free).min().unwrap_or(0);
        format!(
            "{} devices have less than {} MiB free for a second instance (least: {} MiB): {}",
            no_room.len(),
            need >> 20,
            least >> 20,
            list_ids(no_room.iter().map(|(d, _)| *d), 5)
        )
    };
    item(
        "each device can hold two instances (blue-green)",
        ok,
        detail,
        Some(
            "lower resources.memory, free memory on these devices or exclude them from the target"
                .into(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::testkit::{self, Knobs};

    fn fleet(n: usize) -> BTreeMap<DeviceId, DeviceInfo> {
        let mut f = testkit::fleet(n, None);
        for d in f.values_mut() {
            d.memory_total_bytes = Some(4 << 30);
            d.memory_used_bytes = Some(1 << 30);
        }
        f
    }

    fn two_instances_item(v: &Validation) -> Option<&CheckItem> {
        v.items.iter().find(|i| i.name.contains("two instances"))
    }

    #[test]
    fn blue_green_needs_room_for_a_second_instance() {
        let bg = Knobs {
            strategy: "blue-green",
            ..Knobs::default()
        };
        let (_, signed) = testkit::signed("app", "1.0", 1, &bg);
        // (what, change to the fleet, item ok, words in the detail)
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, fn(&mut BTreeMap<DeviceId, DeviceInfo>), bool, &[&str])] = &[
            (
                "3 GiB free everywhere",
                |_| {},
                true,
                &["64 MiB free", "0 not reported"],
            ),
            (
                "the running instance already takes the memory: used counts it",
                |f| {
                    for d in f.values_mut().take(7) {
                        d.memory_used_bytes = Some((4 << 30) - (32 << 20));
                    }
                },
                false,
                &[
                    "7 devices have less than 64 MiB free",
                    "least: 32 MiB",
                    "dev-000000",
                    "and 2 more",
                ],
            ),
            (
                "exactly enough",
                |f| {
                    for d in f.values_mut() {
                        d.memory_used_bytes = Some((4 << 30) - (64 << 20));
                    }
                },
                true,
                &[],
            ),
            (
                "no heartbeat yet is not a failure",
                |f| {
                    for d in f.values_mut().take(3) {
                        d.memory_used_bytes = None;
                    }
                },
                true,
                &["3 not reported yet"],
            ),
        ];
        for (what, change, ok, words) in cases {
            let mut f = fleet(20);
            change(&mut f);
            let v = testkit::validate(&f, &signed, testkit::T0);
            let item = two_instances_item(&v).expect("a blue-green checklist has the item");
            assert_eq!(item.ok, *ok, "{what}: {item:?}");
            assert_eq!(item.fix.is_some(), !ok, "{what}: {item:?}");
            for w in *words {
                assert!(
                    item.detail.contains(w),
                    "{what}: {w:?} not in {:?}",
                    item.detail
                );
            }
            assert_eq!(v.ok(), *ok, "{what}: {:#?}", v.failed());
        }
    }

    #[test]
    fn other_strategies_have_no_two_instance_item() {
        let (_, signed) = testkit::signed("app", "1.0", 1, &Knobs::default());
        let mut f = fleet(4);
        for d in f.values_mut() {
            d.blue_green = BlueGreenSupport::Unsupported {
                why: NO_SWITCH.into(),
            };
        }
        let v = testkit::validate(&f, &signed, testkit::T0);
        assert!(two_instances_item(&v).is_none(), "{:#?}", v.items);
        assert!(capable_item(&v).is_none(), "{:#?}", v.items);
        assert!(v.ok(), "{:#?}", v.failed());
    }

    const NO_SWITCH: &str = "blue-green needs a traffic switch on this device: set blue_green.switch to \"forwarder\" or \"command\" in the agent's config";
    const CONTAINER: &str = "blue-green needs the process runtime on this device (app.runtime is \"container\"); ship this release as canary-rolling";

    fn capable_item(v: &Validation) -> Option<&CheckItem> {
        v.items
            .iter()
            .find(|i| i.name == "each device can run blue-green (runtime, traffic switch)")
    }

    /// Sets what the devices `range` (by position) report.
    fn report(
        f: &mut BTreeMap<DeviceId, DeviceInfo>,
        range: std::ops::Range<usize>,
        support: BlueGreenSupport,
    ) {
        for d in f.values_mut().skip(range.start).take(range.len()) {
            d.blue_green = support.clone();
        }
    }

    fn unsupported(why: &str) -> BlueGreenSupport {
        BlueGreenSupport::Unsupported { why: why.into() }
    }

    #[test]
    fn blue_green_refuses_devices_that_say_they_cannot_run_it_and_names_those_that_do_not_say() {
        let bg = Knobs {
            strategy: "blue-green",
            ..Knobs::default()
        };
        let (_, signed) = testkit::signed("app", "1.0", 1, &bg);
        // (what, change to a fleet of 20 that all can, item ok, words in the detail, words not)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            fn(&mut BTreeMap<DeviceId, DeviceInfo>),
            bool,
            &[&str],
            &[&str],
        )] = &[
            (
                "every device can",
                |_| {},
                true,
                &["20 targets report the process runtime and a traffic switch"],
                &["do not say", "cannot"],
            ),
            (
                "older agents do not say: named, not refused",
                |f| report(f, 0..3, BlueGreenSupport::Unknown),
                true,
                &[
                    "17 targets report",
                    "3 devices do not say whether they have a traffic switch",
                    "refuses the release when it arrives",
                    "dev-000000, dev-000001, dev-000002",
                ],
                &["cannot"],
            ),
            (
                "a fleet of older agents only",
                |f| report(f, 0..20, BlueGreenSupport::Unknown),
                true,
                &["0 targets report", "20 devices do not say", "and 15 more"],
                &[],
            ),
            (
                "devices without a switch, one container, one older agent: grouped by reason, most first",
                |f| {
                    report(f, 0..8, unsupported(NO_SWITCH));
                    report(f, 8..9, unsupported(CONTAINER));
                    report(f, 9..10, BlueGreenSupport::Unknown);
                },
                false,
                &[
                    "9 devices cannot run a blue-green release: 8 say \"blue-green needs a traffic switch on this device: set blue_green.switch",
                    "dev-000000, dev-000001, dev-000002, dev-000003, dev-000004 and 3 more; 1 say \"blue-green needs the process runtime on this device (app.runtime is \"container\"); ship this release as canary-rolling\": dev-000008; 1 devices do not say",
                    "dev-000009",
                ],
                &["targets report"],
            ),
            (
                "an older agent on the container runtime: its facts say enough",
                |f| {
                    report(f, 4..5, BlueGreenSupport::Unknown);
                    if let Some(d) = f.values_mut().nth(4) {
                        d.facts.as_mut().expect("facts").runtime = "container".into();
                    }
                },
                false,
                &[
                    "1 devices cannot run a blue-green release: 1 say \"blue-green needs the process runtime on this device (it runs the container runtime)\": dev-000004",
                ],
                &["do not say"],
            ),
            (
                "many reasons: the first few spelled out, the rest counted",
                |f| {
                    report(f, 0..3, unsupported("reason a"));
                    report(f, 3..5, unsupported("reason b"));
                    report(f, 5..7, unsupported("reason c"));
                    report(f, 7..8, unsupported("reason d"));
                    report(f, 8..9, unsupported("reason e"));
                },
                false,
                &[
                    "9 devices cannot run a blue-green release: 3 say \"reason a\"",
                    "2 say \"reason b\": dev-000003, dev-000004; 2 say \"reason c\"",
                    "2 more for 2 other reasons: dev-000007, dev-000008",
                ],
                &["reason d", "reason e"],
            ),
        ];
        for (what, change, ok, words, absent) in cases {
            let mut f = fleet(20);
            report(&mut f, 0..20, BlueGreenSupport::Supported);
            change(&mut f);
            let v = testkit::validate(&f, &signed, testkit::T0);
            let item = capable_item(&v).expect("a blue-green checklist has the item");
            assert_eq!(item.ok, *ok, "{what}: {item:?}");
            assert_eq!(v.ok(), *ok, "{what}: {:#?}", v.failed());
            for w in *words {
                assert!(
                    item.detail.contains(w),
                    "{what}: {w:?} not in {:?}",
                    item.detail
                );
            }
            for w in *absent {
                assert!(
                    !item.detail.contains(w),
                    "{what}: {w:?} in {:?}",
                    item.detail
                );
            }
            match &item.fix {
                None => assert!(ok, "{what}: {item:?}"),
                Some(fix) => {
                    for w in ["[blue_green] switch", "[target]", "canary-rolling"] {
                        assert!(fix.contains(w), "{what}: {w:?} not in {fix:?}");
                    }
                }
            }
            // The memory item is not where these devices are named.
            let two = two_instances_item(&v).expect("the memory item");
            assert!(two.ok, "{what}: {two:?}");
        }
    }

    fn manifest_item(v: &Validation) -> &CheckItem {
        v.items
            .iter()
            .find(|i| i.name == "manifest valid")
            .expect("every checklist has the item")
    }

    /// A release an older `fleetctl manifest sign` let through: the manifest parser of this
    /// version refuses it, so the test changes the validated release and signs it again.
    fn signed_by_an_older_fleetctl(
        strategy: &'static str,
        change: fn(&mut Release),
    ) -> SignedRelease {
        let k = Knobs {
            strategy,
            ..Knobs::default()
        };
        let (mut release, _) = testkit::signed("app", "1.0", 1, &k);
        change(&mut release);
        SignedRelease::sign(&release, &testkit::signing_key())
    }

    const DATA_DIRS: &str = "blue-green runs the new version beside the old one on the same data, so the data directories in data.dirs (/var/lib/app, /srv/models) cannot be snapshotted for a rollback; ship this release as canary-rolling, or take them out of data.dirs if both versions can share that data as it is (nothing then restores it on a rollback)";
    const IN_CONTAINER: &str = "blue-green needs the process runtime, and a release with a [container] section runs only on the container runtime, where every agent refuses blue-green; ship this release as canary-rolling";

    fn with_data_dirs(r: &mut Release) {
        r.data_dirs = vec!["/var/lib/app".into(), "/srv/models".into()];
    }

    fn in_a_container(r: &mut Release) {
        r.container = Some(fleet_proto::release::Container {
            image: "app:1.0".into(),
            load: Some("image.tar".into()),
            image_id: None,
            name: "app".into(),
            network: None,
            ports: Vec::new(),
            volumes: Vec::new(),
            devices: Vec::new(),
            restart: fleet_proto::release::RestartPolicy::UnlessStopped,
        });
    }

    #[test]
    fn a_blue_green_release_every_agent_would_refuse_fails_the_manifest_item() {
        // (what, strategy, change to the signed release, item ok, detail)
        #[allow(clippy::type_complexity)]
        let cases: &[(&str, &str, fn(&mut Release), bool, &str)] = &[
            (
                "blue-green with data directories: the manifest parser's words",
                "blue-green",
                with_data_dirs,
                false,
                DATA_DIRS,
            ),
            (
                "blue-green in a container",
                "blue-green",
                in_a_container,
                false,
                IN_CONTAINER,
            ),
            (
                "both, each said",
                "blue-green",
                |r| {
                    with_data_dirs(r);
                    in_a_container(r);
                },
                false,
                "blue-green runs the new version beside the old one on the same data, so the data directories in data.dirs (/var/lib/app, /srv/models) cannot be snapshotted for a rollback; ship this release as canary-rolling, or take them out of data.dirs if both versions can share that data as it is (nothing then restores it on a rollback); blue-green needs the process runtime, and a release with a [container] section runs only on the container runtime, where every agent refuses blue-green; ship this release as canary-rolling",
            ),
            (
                "canary-rolling snapshots the data directories: fine",
                "canary-rolling",
                with_data_dirs,
                true,
                "strategy canary-rolling, valid until",
            ),
            (
                "blue-green without either: fine",
                "blue-green",
                |_| {},
                true,
                "strategy blue-green, valid until",
            ),
        ];
        for (what, strategy, change, ok, detail) in cases {
            let signed = signed_by_an_older_fleetctl(strategy, *change);
            let mut f = fleet(20);
            report(&mut f, 0..20, BlueGreenSupport::Supported);
            let v = testkit::validate(&f, &signed, testkit::T0);
            let item = manifest_item(&v);
            assert_eq!(item.ok, *ok, "{what}: {item:?}");
            assert!(item.detail.starts_with(detail), "{what}: {item:?}");
            match &item.fix {
                None => assert!(ok, "{what}: {item:?}"),
                Some(fix) => assert_eq!(
                    fix,
                    "change the manifest as the detail says (usually [strategy] kind = \"canary-rolling\") and sign it again; this version of `fleetctl manifest sign` refuses such a release",
                    "{what}"
                ),
            }
            // Only this item fails: the devices themselves can run blue-green.
            assert_eq!(v.ok(), *ok, "{what}: {:#?}", v.failed());
            assert_eq!(
                v.failed().len(),
                usize::from(!ok),
                "{what}: {:#?}",
                v.failed()
            );
        }
    }

    #[test]
    fn an_expired_blue_green_release_with_data_directories_gets_both_fixes() {
        let signed = signed_by_an_older_fleetctl("blue-green", with_data_dirs);
        let mut f = fleet(4);
        report(&mut f, 0..4, BlueGreenSupport::Supported);
        let later = testkit::T0.saturating_add(Duration::from_secs(5 * 365 * 24 * 3600));
        let v = testkit::validate(&f, &signed, later);
        let item = manifest_item(&v);
        assert!(!item.ok, "{item:?}");
        assert!(
            item.detail.starts_with(DATA_DIRS) && item.detail.contains("; expired at "),
            "{item:?}"
        );
        let fix = item.fix.as_deref().expect("a failed item says what to do");
        assert!(
            fix.contains("kind = \"canary-rolling\"")
                && fix.ends_with("; sign the release again with a validity window (not_before, expires) that includes now"),
            "{fix}"
        );
    }

    #[test]
    fn devices_outside_the_target_are_not_refused_for_blue_green() {
        // The jetsons cannot, and the release targets the rpi4s only.
        let bg = Knobs {
            strategy: "blue-green",
            hardware: vec!["rpi4"],
            ..Knobs::default()
        };
        let (_, signed) = testkit::signed("app", "1.0", 1, &bg);
        let mut f = fleet(20);
        for d in f.values_mut() {
            d.blue_green = if d.device_type() == "jetson" {
                unsupported(NO_SWITCH)
            } else {
                BlueGreenSupport::Supported
            };
        }
        let v = testkit::validate(&f, &signed, testkit::T0);
        let item = capable_item(&v).expect("the item");
        assert!(item.ok, "{item:?}");
        assert!(item.detail.starts_with("15 targets report"), "{item:?}");
        assert!(v.ok(), "{:#?}", v.failed());
    }
}
