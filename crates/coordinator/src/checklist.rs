//! The pre-deployment checklist (PREPARE/VALIDATE), checked against the registry. Pure: the
//! driver hands in the registry snapshot, the verification result and the clock reading.
//! Every item is reported, failed ones with what to do.

use std::time::Duration;

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
    match release.strategy.kind {
        StrategyKind::CanaryRolling | StrategyKind::RollingUpdate => {}
        // Blue-green rolls out in canary + waves like canary-rolling; the agents do the
        // side-by-side start and the traffic switch. What a device needs for it is checked by
        // "each device can hold two instances" below.
        StrategyKind::BlueGreen => {}
        // A/B: each arm's release is checked here like any other; the items about the pair
        // (and the refusal of an `ab` release started alone) are in `crate::ab`.
        StrategyKind::Ab => {}
    }
    if release.expires <= ctx.now {
        problems.push(format!("expired at {}", release.expires));
    }
    if release.not_before > ctx.now {
        problems.push(format!("not valid before {}", release.not_before));
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
        Some(
            "sign the release again with a validity window (not_before, expires) that includes now"
                .into(),
        ),
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

/// Blue-green starts the new version beside the running one, so each target must hold a
/// second instance: free memory in its last heartbeat (total − used, where used already
/// includes the running instance) of at least `resources.memory`, and the `process` runtime,
/// the only one where the agent runs two instances side by side.
///
/// Design: whether a device has a traffic switch configured (`blue_green.switch`) is not in
/// anything a device reports (`DeviceFacts` has no such field), so it cannot be checked here;
/// a device without one refuses the release (`Refusal::StrategyUnsupported`) when it gets it.
fn two_instances(release: &Release, eligible: &[&DeviceInfo]) -> CheckItem {
    let need = release.resources.memory_bytes;
    let mut wrong_runtime = Vec::new();
    let mut no_room = Vec::new();
    let mut unknown = 0usize;
    for d in eligible {
        if let Some(f) = &d.facts
            && f.runtime != "process"
        {
            wrong_runtime.push((&d.id, f.runtime.as_str()));
        }
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
    let ok = wrong_runtime.is_empty() && no_room.is_empty();
    let mut detail = Vec::new();
    if ok {
        detail.push(format!(
            "{} MiB free beside the running instance and the process runtime on every target that reported ({unknown} not reported yet)",
            need >> 20
        ));
    }
    if !no_room.is_empty() {
        let least = no_room.iter().map(|(_, free)| *free).min().unwrap_or(0);
        detail.push(format!(
            "{} devices have less than {} MiB free for a second instance (least: {} MiB): {}",
            no_room.len(),
            need >> 20,
            least >> 20,
            list_ids(no_room.iter().map(|(d, _)| *d), 5)
        ));
    }
    if !wrong_runtime.is_empty() {
        let mut runtimes: Vec<&str> = wrong_runtime.iter().map(|(_, r)| *r).collect();
        runtimes.sort();
        runtimes.dedup();
        detail.push(format!(
            "{} devices run the {} runtime, not process: {}",
            wrong_runtime.len(),
            runtimes.join("/"),
            list_ids(wrong_runtime.iter().map(|(d, _)| *d), 5)
        ));
    }
    item(
        "each device can hold two instances (blue-green)",
        ok,
        detail.join("; "),
        Some("lower resources.memory, free memory on these devices or exclude them from the target; devices not on the process runtime need strategy canary-rolling".into()),
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
    fn blue_green_needs_room_for_a_second_instance_and_the_process_runtime() {
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
            (
                "a container device cannot run two instances",
                |f| {
                    if let Some(d) = f.values_mut().nth(1) {
                        d.facts.as_mut().expect("facts").runtime = "container".into();
                    }
                },
                false,
                &["1 devices run the container runtime, not process: dev-000001"],
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
        let v = testkit::validate(&fleet(4), &signed, testkit::T0);
        assert!(two_instances_item(&v).is_none(), "{:#?}", v.items);
        assert!(v.ok(), "{:#?}", v.failed());
    }
}
