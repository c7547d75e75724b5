//! Framing: what a person reads when a frame is refused, and golden bytes that pin every
//! message's encoding (postcard is not self-describing: a changed byte breaks deployed agents).

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] fns panic on purpose.

mod common;

use std::time::Duration;

use common::*;
use fleet_proto::device::*;
use fleet_proto::frame::{VERSION, encode_postcard};
use fleet_proto::operator::*;
use fleet_proto::release::{Refusal, SignedRelease};
use fleet_proto::rollout::*;
use fleet_proto::{DecodeError, FrameProblem, Kind, Message, RequestId, Topic, decode, encode};

fn heartbeat() -> Heartbeat {
    Heartbeat {
        device: dev("cam-017"),
        seq: 7,
        at: NOW,
        uptime: Duration::from_secs(3600),
        active_version: Some("2.4.1".into()),
        rollout: Some(rollout()),
        system: SystemHealth {
            cpu_pct: 12.5,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 4 << 30,
            disk_free_bytes: 10 << 30,
            disk_total_bytes: 32 << 30,
            temperature_c: Some(51.0),
        },
        app: AppHealth {
            status: AppStatus::Healthy,
            version: Some("2.4.1".into()),
            error_rate: Some(0.01),
            p95_ms: Some(42.0),
            restarts_in_window: 0,
            restarts_total: 1,
            probe_ok: Some(true),
            requests: Some(200),
            failed: Some(6),
        },
    }
}

fn desired() -> Desired {
    Desired {
        device: dev("cam-017"),
        sequence: 3,
        rollout: Some(rollout()),
        release: Some(SignedRelease::sign(&release(42, "2.4.1"), &key(1))),
        report_interval: Duration::from_secs(10),
        retry: 0,
        hold: true,
    }
}

fn reported() -> Reported {
    Reported {
        device: dev("cam-017"),
        seq: 12,
        facts: facts("rpi4", "eu-west"),
        active: Some(installed("2.4.1", Slot::B)),
        standby: Some(installed("2.4.0", Slot::A)),
        phase: UpdatePhase::Idle,
        applied_sequence: 3,
        last_outcome: Some(Outcome {
            rollout: Some(rollout()),
            sequence: 3,
            version: "2.4.1".into(),
            result: OutcomeKind::RolledBack(RollbackReason::CrashLoop {
                restarts: 3,
                window: Duration::from_secs(300),
            }),
            at: NOW,
        }),
        highest_counter: 42,
        at: NOW,
        blue_green: BlueGreenSupport::Unsupported {
            why: "no traffic switch".into(),
        },
    }
}

fn event() -> Event {
    Event {
        device: dev("cam-017"),
        seq: 99,
        at: NOW,
        rollout: Some(rollout()),
        sequence: 3,
        version: "2.4.1".into(),
        kind: EventKind::Refused {
            reason: Refusal::InsufficientDisk {
                needed: 200 << 20,
                available: 50 << 20,
            },
        },
    }
}

fn online() -> Online {
    Online {
        device: dev("cam-017"),
        online: false,
        agent_version: "0.1.0".into(),
        at: NOW,
    }
}

fn request() -> Request {
    Request {
        request_id: RequestId::new("q-1").unwrap(),
        operator: "alice".into(),
        command: Command::Approve { rollout: rollout() },
        auth: None,
    }
}

fn state_block() -> RolloutState {
    RolloutState {
        rollout: rollout(),
        phase: Phase::Canary,
        status: RolloutStatus::Running,
        strategy: fleet_proto::release::StrategyKind::CanaryRolling,
        artifact: "detector 2.4.1".into(),
        fleet_total: 24,
        deployed_count: 2,
        healthy_count: 2,
        quarantined_count: 0,
        skipped_count: 1,
        rollback_available: true,
        current_wave: WaveCursor {
            current: 0,
            total: 3,
        },
        last_action: "deployed canary to 2 devices".into(),
        next_action: "judge the canary gate at 10:15:00".into(),
        blockers: vec![],
        waves: vec![],
        updated_at: NOW,
        arms: vec![],
    }
}

/// Compares a message's encoding with `tests/golden/NAME.hex`. A deliberate change to the
/// protocol (appending a field, bumping the version) is recorded with `FLEET_BLESS=1`.
#[track_caller]
fn golden<M: Message + PartialEq + std::fmt::Debug>(name: &str, msg: &M) {
    let path = format!("{}/tests/golden/{name}.hex", env!("CARGO_MANIFEST_DIR"));
    let bytes = encode(msg);
    let got = hex::encode(&bytes);
    if std::env::var_os("FLEET_BLESS").is_some() {
        std::fs::write(&path, format!("{got}\n")).unwrap();
    }
    let expect = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        got,
        expect.trim(),
        "encoding of {} changed ({path})",
        M::KIND
    );
    assert_eq!(&decode::<M>(&bytes).unwrap(), msg);
}

#[test]
fn golden_bytes() {
    golden("heartbeat", &heartbeat());
    golden("desired", &desired());
    golden("state", &reported());
    golden("event", &event());
    golden("online", &online());
}

#[test]
fn golden_json() {
    assert_eq!(
        String::from_utf8(encode(&request())).unwrap(),
        r#"{"request_id":"q-1","operator":"alice","command":{"approve":{"rollout":"r-42"}}}"#
    );
    let json = String::from_utf8(encode(&state_block())).unwrap();
    assert!(json.starts_with(r#"{"rollout":"r-42","phase":"CANARY","status":"running","strategy":"canary-rolling","artifact":"detector 2.4.1","fleet_total":24"#), "{json}");
    assert!(json.contains(r#""current_wave":"0/3""#), "{json}");
}

#[test]
fn commands_are_accepted_as_json_or_postcard() {
    let from_json: Request = decode(&encode(&request())).unwrap();
    let from_postcard: Request = decode(&encode_postcard(&request())).unwrap();
    assert_eq!(from_json, request());
    assert_eq!(from_postcard, request());
    let typed: Request = decode(
        br#"{"request_id":"q-2","operator":"bob","command":{"quarantine":{"device":"cam-3","reason":"smoke"}}}"#,
    )
    .unwrap();
    assert_eq!(
        typed.command,
        Command::Quarantine {
            device: dev("cam-3"),
            reason: "smoke".into()
        }
    );
}

#[track_caller]
fn refused<M: Message + std::fmt::Debug>(frame: &[u8], topic: &str, expect: &str) -> DecodeError {
    let err = decode::<M>(frame).unwrap_err().on(topic);
    assert_eq!(err.to_string(), expect);
    err
}

#[test]
fn a_frame_of_the_wrong_version_is_refused() {
    let mut frame = encode(&heartbeat());
    frame[0] = 2;
    let err = refused::<Heartbeat>(
        &frame,
        "fleet/v1/devices/cam-017/heartbeat",
        "cannot decode heartbeat frame on fleet/v1/devices/cam-017/heartbeat: protocol version 2 is not supported (this build speaks version 1); upgrade the older side",
    );
    assert_eq!(err.problem, FrameProblem::UnsupportedVersion { got: 2 });
}

#[test]
fn an_oversized_frame_is_refused_before_decoding() {
    let mut frame = vec![VERSION];
    frame.resize(Kind::Heartbeat.max_size() + 1, 0xff);
    refused::<Heartbeat>(
        &frame,
        "fleet/v1/devices/cam-017/heartbeat",
        "cannot decode heartbeat frame on fleet/v1/devices/cam-017/heartbeat: 2049 bytes is over the 2048-byte limit for this kind",
    );
    let huge = vec![b'{'; Kind::Command.max_size() + 1];
    refused::<Request>(
        &huge,
        "fleet/v1/rollouts/commands",
        "cannot decode operator command frame on fleet/v1/rollouts/commands: 262145 bytes is over the 262144-byte limit for this kind",
    );
}

#[test]
fn every_truncation_of_every_frame_is_refused_as_truncated() {
    /// `appended`: bytes of fields read with `frame::appended` at the end of the frame; a cut
    /// before them reads as an older writer's frame (`a_newer_reader_…` below).
    fn all_prefixes<M: Message + std::fmt::Debug>(msg: &M, appended: usize) {
        let frame = encode(msg);
        for len in 1..frame.len() - appended {
            let err = decode::<M>(&frame[..len]).unwrap_err();
            assert!(
                matches!(
                    err.problem,
                    FrameProblem::Truncated | FrameProblem::Malformed(_)
                ),
                "{} cut at {len}: {err}",
                M::KIND
            );
        }
    }
    all_prefixes(&heartbeat(), 2);
    all_prefixes(&desired(), 1);
    // `blue_green`: the variant's index, the string's length and its 17 bytes.
    all_prefixes(&reported(), 1 + 1 + "no traffic switch".len());
    all_prefixes(&event(), 0);
    all_prefixes(&online(), 0);
    all_prefixes(&request(), 0);

    let frame = encode(&heartbeat());
    refused::<Heartbeat>(
        &frame[..frame.len() / 2],
        "fleet/v1/devices/cam-017/heartbeat",
        "cannot decode heartbeat frame on fleet/v1/devices/cam-017/heartbeat: the frame ends early (truncated)",
    );
    refused::<Online>(
        &[],
        "fleet/v1/devices/cam-017/online",
        "cannot decode online status frame on fleet/v1/devices/cam-017/online: the frame is empty",
    );
    refused::<Request>(
        br#"{"request_id":"q-1","operator":"#,
        "fleet/v1/rollouts/commands",
        "cannot decode operator command frame on fleet/v1/rollouts/commands: the frame ends early (truncated)",
    );
}

#[test]
fn garbage_and_invalid_ids_are_malformed_not_panics() {
    refused::<Request>(
        br#"{"request_id":"q/1","operator":"x","command":"list_devices"}"#,
        "fleet/v1/rollouts/commands",
        "cannot decode operator command frame on fleet/v1/rollouts/commands: malformed: invalid request id \"q/1\": it contains '/'; ids may use only ASCII letters, digits, '-', '_' and '.' at line 1 column 19",
    );
    let mut frame = encode(&online());
    frame[1] = 3; // device id length
    frame[2] = b'#';
    let err = decode::<Online>(&frame).unwrap_err();
    assert!(matches!(err.problem, FrameProblem::Malformed(_)), "{err}");
}

#[test]
fn an_older_reader_ignores_fields_appended_by_a_newer_writer() {
    let mut frame = encode(&online());
    frame.extend_from_slice(&[1, 2, 3]);
    assert_eq!(decode::<Online>(&frame).unwrap(), online());
}

#[test]
fn a_newer_reader_reads_an_older_writers_frame_without_the_appended_fields() {
    // A coordinator from before issue 9 wrote desired states without `hold`: its frame is
    // today's minus the last byte, and reads as "do not hold" (stop the old instance at the
    // commit, as that coordinator expected).
    let frame = encode(&desired());
    let older = decode::<Desired>(&frame[..frame.len() - 1]).unwrap();
    assert_eq!(
        older,
        Desired {
            hold: false,
            ..desired()
        }
    );
    // An agent from before `AppHealth.failed` ends its heartbeat after `requests` (today's
    // frame minus `Some(6)`, two bytes): no count, and the coordinator uses the window rate.
    let frame = encode(&heartbeat());
    let older = decode::<Heartbeat>(&frame[..frame.len() - 2]).unwrap();
    assert_eq!(older.app.failed, None);
    assert_eq!(older.app.requests, Some(200));
    // And a journal written before `hold` (JSON, no `hold` key) reads the same way.
    let mut json = serde_json::to_value(desired()).unwrap();
    json.as_object_mut().unwrap().remove("hold");
    let from_json: Desired = serde_json::from_value(json).unwrap();
    assert!(!from_json.hold);
}

#[test]
fn an_older_agents_state_reads_as_not_saying_whether_it_can_run_blue_green() {
    // An agent from before `blue_green` wrote states without it: its frame is today's minus
    // the field's bytes, and reads as Unknown (neither "can" nor "cannot": the checklist names
    // such devices without refusing the plan, and the agent still refuses on arrival).
    let frame = encode(&reported());
    let field = 1 + 1 + "no traffic switch".len();
    let older = decode::<Reported>(&frame[..frame.len() - field]).unwrap();
    assert_eq!(
        older,
        Reported {
            blue_green: BlueGreenSupport::Unknown,
            ..reported()
        }
    );
    // A field cut short, or bytes that are no `BlueGreenSupport`, read the same way: never as
    // "it can".
    for len in frame.len() - field + 1..frame.len() {
        let cut = decode::<Reported>(&frame[..len]).unwrap();
        assert_eq!(cut.blue_green, BlueGreenSupport::Unknown, "cut at {len}");
    }
    let mut bad = frame[..frame.len() - field].to_vec();
    bad.push(0x7f);
    assert_eq!(
        decode::<Reported>(&bad).unwrap().blue_green,
        BlueGreenSupport::Unknown
    );
    // Each variant as a newer agent sends it.
    for support in [
        BlueGreenSupport::Supported,
        BlueGreenSupport::Unsupported {
            why: "blue-green needs the process runtime on this device".into(),
        },
    ] {
        let msg = Reported {
            blue_green: support,
            ..reported()
        };
        assert_eq!(decode::<Reported>(&encode(&msg)).unwrap(), msg);
    }
}

#[test]
fn state_block_renders_as_documented() {
    assert_eq!(
        state_block().render_block(),
        "<fleet-deploy-state>
rollout: r-42
phase: CANARY
status: running
strategy: canary-rolling
artifact: detector 2.4.1
fleet_total: 24
deployed_count: 2
healthy_count: 2
quarantined_count: 0
skipped_count: 1
rollback_available: true
current_wave: 0/3
last_action: deployed canary to 2 devices
next_action: judge the canary gate at 10:15:00
blockers: none
</fleet-deploy-state>
"
    );
}

#[test]
fn topic_kind_matches_message_kind() {
    assert_eq!(Topic::Heartbeat(dev("a")).kind(), Heartbeat::KIND);
    assert_eq!(Topic::Desired(dev("a")).kind(), Desired::KIND);
    assert_eq!(Topic::State(dev("a")).kind(), Reported::KIND);
    assert_eq!(Topic::Events(dev("a")).kind(), Event::KIND);
    assert_eq!(Topic::Online(dev("a")).kind(), Online::KIND);
    assert_eq!(Topic::Commands.kind(), Request::KIND);
    assert_eq!(Topic::RolloutState(rollout()).kind(), RolloutState::KIND);
}
