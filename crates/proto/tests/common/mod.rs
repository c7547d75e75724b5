//! Sample values shared by the proto tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use fleet_proto::device::*;
use fleet_proto::hex::{Hex, Sha256};
use fleet_proto::release::*;
use fleet_proto::{DeviceId, RolloutId, SigningKey, UnixMillis};

pub const NOW: UnixMillis = UnixMillis(1_795_773_600_000); // 2026-11-27T10:00:00Z

pub fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

pub fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

pub fn facts(device_type: &str, region: &str) -> DeviceFacts {
    DeviceFacts {
        device_type: device_type.into(),
        arch: Arch::Aarch64,
        region: region.into(),
        tags: vec!["camera".into()],
        agent_version: "0.1.0".into(),
        runtime: "process".into(),
        memory_total_bytes: 4 << 30,
        disk_total_bytes: 32 << 30,
    }
}

pub fn release(counter: u64, version: &str) -> Release {
    Release {
        name: "detector".into(),
        version: version.into(),
        counter,
        not_before: UnixMillis(NOW.0 - 3_600_000),
        expires: UnixMillis(NOW.0 + 30 * 86_400_000),
        hardware: vec!["jetson-orin".into(), "rpi4".into()],
        rollback_to: None,
        artifacts: BTreeMap::from([(
            Arch::Aarch64,
            Artifact {
                url: format!("https://artifacts.example/detector-{version}-aarch64.tar.gz"),
                sha256: Sha256::of(version.as_bytes()),
                size: 1_234_567,
            },
        )]),
        run: Run {
            entrypoint: "bin/detector".into(),
            args: vec!["--port".into(), "{port}".into()],
            env: BTreeMap::from([("RUST_LOG".into(), "info".into())]),
        },
        resources: Resources {
            disk_bytes: 200 << 20,
            memory_bytes: 256 << 20,
        },
        health: HealthCheck {
            endpoint: "http://127.0.0.1:{port}/health".into(),
            expected_version: version.into(),
            timeout: Duration::from_secs(2),
        },
        probe: Some(Probe {
            check: ProbeCheck::Command(vec!["bin/detector".into(), "infer".into(), "x".into()]),
            expected_sha256: Sha256::of(b"label=x"),
            max_latency: Duration::from_millis(500),
        }),
        trial: Trial {
            deadline: Duration::from_secs(120),
            good_probes: 3,
            probe_interval: Duration::from_secs(5),
        },
        strategy: Strategy {
            kind: StrategyKind::CanaryRolling,
            canary_percent: 5.0,
            waves: vec![25, 50, 100],
            canary_soak: Duration::from_secs(900),
            wave_soak: Duration::from_secs(600),
            approval: Approval::Manual,
        },
        target: Target {
            device_types: vec![],
            arch: vec![],
            regions: vec![],
            tags: vec![],
            devices: vec![],
        },
        thresholds: Thresholds::default(),
        // Pinned by the golden desired frame: the fields appended for container releases.
        container: Some(Container {
            image: format!("detector:{version}"),
            load: Some("image.tar".into()),
            image_id: None,
            name: "detector".into(),
            network: Some("host".into()),
            ports: vec![],
            volumes: vec!["/var/lib/detector:/data".into()],
            devices: vec!["/dev/video0".into()],
            restart: RestartPolicy::OnFailure,
        }),
        data_dirs: vec!["/var/lib/detector".into()],
    }
}

pub fn installed(version: &str, slot: Slot) -> Installed {
    Installed {
        name: "detector".into(),
        version: version.into(),
        counter: 41,
        digest: Hex([7; 32]),
        slot,
    }
}

pub fn rollout() -> RolloutId {
    RolloutId::new("r-42").unwrap()
}
