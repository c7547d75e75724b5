//! Property tests: every message survives encode → decode unchanged, and no byte string makes a
//! decoder panic.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

mod common;

use std::time::Duration;

use fleet_proto::device::*;
use fleet_proto::hex::{Hex, Sha256};
use fleet_proto::operator::*;
use fleet_proto::release::{Arch, KeyId, Refusal, SignedRelease, StrategyKind};
use fleet_proto::rollout::*;
use fleet_proto::{DeviceId, Message, RequestId, RolloutId, UnixMillis, decode, encode};
use proptest::prelude::*;

fn id_text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}"
}
fn device_id() -> impl Strategy<Value = DeviceId> {
    id_text().prop_map(|s| DeviceId::new(s).unwrap())
}
fn rollout_id() -> impl Strategy<Value = RolloutId> {
    id_text().prop_map(|s| RolloutId::new(s).unwrap())
}
fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}
fn millis() -> impl Strategy<Value = UnixMillis> {
    any::<u64>().prop_map(UnixMillis)
}
fn duration() -> impl Strategy<Value = Duration> {
    (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n))
}
fn digest() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>().prop_map(Hex)
}
fn key_id() -> impl Strategy<Value = KeyId> {
    any::<[u8; 8]>().prop_map(Hex)
}
fn arch() -> impl Strategy<Value = Arch> {
    prop_oneof![Just(Arch::X86_64), Just(Arch::Aarch64), Just(Arch::Armv7)]
}
fn slot() -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::A), Just(Slot::B)]
}
/// Floats that compare equal to themselves (NaN never round-trips through `==`).
fn f32_() -> impl Strategy<Value = f32> {
    proptest::num::f32::NORMAL | proptest::num::f32::ZERO
}

fn facts() -> impl Strategy<Value = DeviceFacts> {
    (
        text(),
        arch(),
        text(),
        proptest::collection::vec(text(), 0..4),
        text(),
        text(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(device_type, arch, region, tags, agent_version, runtime, m, d)| DeviceFacts {
                device_type,
                arch,
                region,
                tags,
                agent_version,
                runtime,
                memory_total_bytes: m,
                disk_total_bytes: d,
            },
        )
}

fn installed() -> impl Strategy<Value = Installed> {
    (text(), text(), any::<u64>(), digest(), slot()).prop_map(
        |(name, version, counter, digest, slot)| Installed {
            name,
            version,
            counter,
            digest,
            slot,
        },
    )
}

fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        key_id().prop_map(|key_id| Refusal::UnknownKey { key_id }),
        key_id().prop_map(|key_id| Refusal::BadSignature { key_id }),
        text().prop_map(|detail| Refusal::Malformed { detail }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(counter, highest)| Refusal::CounterWentDown { counter, highest }),
        any::<u64>().prop_map(|counter| Refusal::CounterReused { counter }),
        (millis(), millis()).prop_map(|(not_before, now)| Refusal::NotYetValid { not_before, now }),
        (millis(), millis()).prop_map(|(expires, now)| Refusal::Expired { expires, now }),
        (text(), proptest::collection::vec(text(), 0..3)).prop_map(|(device_type, supported)| {
            Refusal::WrongHardware {
                device_type,
                supported,
            }
        }),
        arch().prop_map(|arch| Refusal::NoArtifactForArch { arch }),
        text().prop_map(|why| Refusal::NotTargeted { why }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(needed, available)| Refusal::InsufficientDisk { needed, available }),
        text().prop_map(|version| Refusal::PreviouslyFailed { version }),
    ]
}

fn app_status() -> impl Strategy<Value = AppStatus> {
    prop_oneof![
        Just(AppStatus::Healthy),
        Just(AppStatus::Degraded),
        Just(AppStatus::Unhealthy),
        Just(AppStatus::Unreachable),
        Just(AppStatus::Stopped),
        Just(AppStatus::NotInstalled),
    ]
}

fn rollback_reason() -> impl Strategy<Value = RollbackReason> {
    prop_oneof![
        proptest::option::of(any::<i32>())
            .prop_map(|exit_code| RollbackReason::CrashAtStart { exit_code }),
        (any::<u32>(), duration())
            .prop_map(|(restarts, window)| RollbackReason::CrashLoop { restarts, window }),
        app_status().prop_map(|status| RollbackReason::Unhealthy { status }),
        (text(), text())
            .prop_map(|(expected, reported)| RollbackReason::WrongVersion { expected, reported }),
        any::<u32>().prop_map(|failures| RollbackReason::Unresponsive { failures }),
        text().prop_map(|detail| RollbackReason::ProbeFailed { detail }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(good, needed)| RollbackReason::TrialDeadline { good, needed }),
        Just(RollbackReason::AgentRestarted),
        Just(RollbackReason::Requested),
    ]
}

fn failure() -> impl Strategy<Value = Failure> {
    prop_oneof![
        text().prop_map(|detail| Failure::Download { detail }),
        (digest(), digest())
            .prop_map(|(expected, got)| Failure::ChecksumMismatch { expected, got }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(expected, got)| Failure::SizeMismatch { expected, got }),
        text().prop_map(|detail| Failure::Install { detail }),
        text().prop_map(|detail| Failure::Hook { detail }),
        text().prop_map(|detail| Failure::Snapshot { detail }),
        text().prop_map(|detail| Failure::Rollback { detail }),
    ]
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (any::<u64>(), any::<u64>())
            .prop_map(|(size, resume_from)| EventKind::DownloadStarted { size, resume_from }),
        any::<u64>().prop_map(|size| EventKind::DownloadFinished { size }),
        Just(EventKind::Verified),
        slot().prop_map(|slot| EventKind::Installed { slot }),
        slot().prop_map(|to| EventKind::Swapped { to }),
        duration().prop_map(|deadline| EventKind::TrialStarted { deadline }),
        slot().prop_map(|slot| EventKind::Committed { slot }),
        (rollback_reason(), proptest::option::of(text()))
            .prop_map(|(reason, restored)| EventKind::RolledBack { reason, restored }),
        refusal().prop_map(|reason| EventKind::Refused { reason }),
        failure().prop_map(|reason| EventKind::Failed { reason }),
    ]
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let result = prop_oneof![
        Just(OutcomeKind::Committed),
        rollback_reason().prop_map(OutcomeKind::RolledBack),
        refusal().prop_map(OutcomeKind::Refused),
        failure().prop_map(OutcomeKind::Failed),
    ];
    (
        proptest::option::of(rollout_id()),
        any::<u64>(),
        text(),
        result,
        millis(),
    )
        .prop_map(|(rollout, sequence, version, result, at)| Outcome {
            rollout,
            sequence,
            version,
            result,
            at,
        })
}

fn phase() -> impl Strategy<Value = UpdatePhase> {
    prop_oneof![
        Just(UpdatePhase::Idle),
        Just(UpdatePhase::Downloading),
        Just(UpdatePhase::Verifying),
        Just(UpdatePhase::Installing),
        Just(UpdatePhase::Swapping),
        Just(UpdatePhase::Trial),
        Just(UpdatePhase::RollingBack),
    ]
}

fn heartbeat() -> impl Strategy<Value = Heartbeat> {
    let system = (
        f32_(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(f32_()),
    )
        .prop_map(|(cpu_pct, mu, mt, df, dt, temperature_c)| SystemHealth {
            cpu_pct,
            memory_used_bytes: mu,
            memory_total_bytes: mt,
            disk_free_bytes: df,
            disk_total_bytes: dt,
            temperature_c,
        });
    let app = (
        app_status(),
        proptest::option::of(text()),
        proptest::option::of(f32_()),
        proptest::option::of(f32_()),
        any::<u32>(),
        any::<u32>(),
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(any::<u64>()),
    )
        .prop_map(
            |(status, version, error_rate, p95_ms, w, t, probe_ok, requests, failed)| AppHealth {
                status,
                version,
                error_rate,
                p95_ms,
                restarts_in_window: w,
                restarts_total: t,
                probe_ok,
                requests,
                failed,
            },
        );
    (
        device_id(),
        any::<u64>(),
        millis(),
        duration(),
        proptest::option::of(text()),
        proptest::option::of(rollout_id()),
        system,
        app,
    )
        .prop_map(
            |(device, seq, at, uptime, active_version, rollout, system, app)| Heartbeat {
                device,
                seq,
                at,
                uptime,
                active_version,
                rollout,
                system,
                app,
            },
        )
}

fn signed_release() -> impl Strategy<Value = SignedRelease> {
    (
        key_id(),
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        proptest::collection::vec(any::<u8>(), 0..512),
    )
        .prop_map(|(key_id, a, b, release)| {
            let mut signature = [0u8; 64];
            signature[..32].copy_from_slice(&a);
            signature[32..].copy_from_slice(&b);
            SignedRelease {
                key_id,
                signature: Hex(signature),
                release,
            }
        })
}

fn desired() -> impl Strategy<Value = Desired> {
    (
        device_id(),
        any::<u64>(),
        proptest::option::of(rollout_id()),
        proptest::option::of(signed_release()),
        duration(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(
            |(device, sequence, rollout, release, report_interval, retry, hold)| Desired {
                device,
                sequence,
                rollout,
                release,
                report_interval,
                retry,
                hold,
            },
        )
}

fn reported() -> impl Strategy<Value = Reported> {
    (
        device_id(),
        any::<u64>(),
        facts(),
        proptest::option::of(installed()),
        proptest::option::of(installed()),
        phase(),
        any::<u64>(),
        proptest::option::of(outcome()),
        any::<u64>(),
        millis(),
        blue_green_support(),
    )
        .prop_map(
            |(
                device,
                seq,
                facts,
                active,
                standby,
                phase,
                applied_sequence,
                last_outcome,
                highest_counter,
                at,
                blue_green,
            )| {
                Reported {
                    device,
                    seq,
                    facts,
                    active,
                    standby,
                    phase,
                    applied_sequence,
                    last_outcome,
                    highest_counter,
                    at,
                    blue_green,
                }
            },
        )
}

fn blue_green_support() -> impl Strategy<Value = BlueGreenSupport> {
    prop_oneof![
        Just(BlueGreenSupport::Unknown),
        Just(BlueGreenSupport::Supported),
        text().prop_map(|why| BlueGreenSupport::Unsupported { why }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        device_id(),
        any::<u64>(),
        millis(),
        proptest::option::of(rollout_id()),
        any::<u64>(),
        text(),
        event_kind(),
    )
        .prop_map(
            |(device, seq, at, rollout, sequence, version, kind)| Event {
                device,
                seq,
                at,
                rollout,
                sequence,
                version,
                kind,
            },
        )
}

fn online() -> impl Strategy<Value = Online> {
    (device_id(), any::<bool>(), text(), millis()).prop_map(
        |(device, online, agent_version, at)| Online {
            device,
            online,
            agent_version,
            at,
        },
    )
}

fn request() -> impl Strategy<Value = Request> {
    let command = prop_oneof![
        signed_release().prop_map(|release| Command::Plan { release }),
        signed_release().prop_map(|release| Command::Start { release }),
        rollout_id().prop_map(|rollout| Command::Approve { rollout }),
        rollout_id().prop_map(|rollout| Command::Pause { rollout }),
        rollout_id().prop_map(|rollout| Command::Resume { rollout }),
        rollout_id().prop_map(|rollout| Command::Abort { rollout }),
        rollout_id().prop_map(|rollout| Command::Rollback { rollout }),
        rollout_id().prop_map(|rollout| Command::Status { rollout }),
        Just(Command::ListRollouts),
        rollout_id().prop_map(|rollout| Command::Report { rollout }),
        Just(Command::ListDevices),
        device_id().prop_map(|device| Command::ShowDevice { device }),
        (device_id(), text()).prop_map(|(device, reason)| Command::Quarantine { device, reason }),
        device_id().prop_map(|device| Command::ReleaseDevice { device }),
        (
            proptest::option::of(device_id()),
            proptest::option::of(rollout_id()),
            proptest::option::of(millis()),
            proptest::option::of(any::<u32>())
        )
            .prop_map(
                |(device, rollout, since, limit)| Command::Audit(AuditQuery {
                    device,
                    rollout,
                    since,
                    limit
                })
            ),
    ];
    (id_text(), text(), command).prop_map(|(id, operator, command)| Request {
        request_id: RequestId::new(id).unwrap(),
        operator,
        command,
        auth: None,
    })
}

fn state_block() -> impl Strategy<Value = RolloutState> {
    let counts = (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    );
    (
        rollout_id(),
        counts,
        any::<bool>(),
        (any::<u32>(), any::<u32>()),
        text(),
        text(),
        proptest::collection::vec(text(), 0..3),
        millis(),
    )
        .prop_map(
            |(
                rollout,
                (t, d, h, q, s),
                rollback_available,
                (current, total),
                last_action,
                next_action,
                blockers,
                updated_at,
            )| {
                RolloutState {
                    rollout,
                    phase: Phase::Rollout,
                    status: RolloutStatus::Paused,
                    strategy: StrategyKind::RollingUpdate,
                    artifact: "x 1".into(),
                    fleet_total: t,
                    deployed_count: d,
                    healthy_count: h,
                    quarantined_count: q,
                    skipped_count: s,
                    rollback_available,
                    current_wave: WaveCursor { current, total },
                    last_action,
                    next_action,
                    blockers,
                    waves: vec![],
                    updated_at,
                    arms: vec![],
                }
            },
        )
}

#[track_caller]
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(msg: M) {
    let frame = encode(&msg);
    assert!(
        frame.len() <= M::KIND.max_size(),
        "{} of {} bytes",
        M::KIND,
        frame.len()
    );
    assert_eq!(decode::<M>(&frame).unwrap(), msg);
}

proptest! {
    #[test]
    fn heartbeats_round_trip(m in heartbeat()) { round_trip(m) }
    #[test]
    fn desired_states_round_trip(m in desired()) { round_trip(m) }
    #[test]
    fn reported_states_round_trip(m in reported()) { round_trip(m) }
    #[test]
    fn events_round_trip(m in event()) { round_trip(m) }
    #[test]
    fn online_round_trips(m in online()) { round_trip(m) }
    #[test]
    fn requests_round_trip_as_json_and_postcard(m in request()) {
        let postcard = fleet_proto::frame::encode_postcard(&m);
        prop_assert_eq!(decode::<Request>(&postcard).unwrap(), m.clone());
        round_trip(m)
    }
    #[test]
    fn state_blocks_round_trip(m in state_block()) { round_trip(m) }

    #[test]
    fn no_byte_string_panics_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode::<Heartbeat>(&bytes);
        let _ = decode::<Desired>(&bytes);
        let _ = decode::<Reported>(&bytes);
        let _ = decode::<Event>(&bytes);
        let _ = decode::<Online>(&bytes);
        let _ = decode::<Request>(&bytes);
        let _ = decode::<Reply>(&bytes);
        let _ = decode::<RolloutState>(&bytes);
    }
}
