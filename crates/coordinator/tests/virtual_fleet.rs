//! 100,000 devices through a full rollout in virtual time, through the pure core only.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fleet_coordinator::engine::Settings;
use fleet_coordinator::testkit::{self, Knobs, T0, VirtualFleet};
use fleet_proto::rollout::RolloutStatus;

#[test]
fn hundred_thousand_devices_full_rollout_in_virtual_time() {
    let n = 100_000;
    let wall = Instant::now();
    let (r1, s1) = testkit::signed("app", "1.0", 1, &Knobs::default());
    let k = Knobs {
        rollback_to: Some((1, "1.0".into())),
        canary_percent: 1.0,
        canary_soak: "15m",
        wave_soak: "10m",
        ..Knobs::default()
    };
    let (r2, s2) = testkit::signed("app", "2.0", 2, &k);
    let devices = testkit::fleet(n, Some(testkit::installed(&r1, &s1)));
    let settings = Settings {
        report_interval: Duration::from_secs(60),
        silent_after: Duration::from_secs(180),
        install_timeout: Duration::from_secs(1800),
        ..Settings::default()
    };
    let (r, actions) = testkit::start(&devices, &r2, &s2, settings, T0);
    let setup = wall.elapsed();
    let mut f = VirtualFleet::new(&devices, r, actions, T0);
    f.keep_log = false;
    f.tick = Duration::from_secs(30);
    f.install_delay = Duration::from_secs(90);
    let done = f.run_until(Duration::from_secs(24 * 3600), |r| {
        r.status == RolloutStatus::Completed || r.is_final()
    });
    let took = wall.elapsed();
    let s = f.rollout.state_block(f.now);
    println!(
        "100k virtual rollout: {} devices, {} waves, {} engine steps, {} of virtual time, {:.2?} wall ({:.2?} of it checklist + planning)",
        n,
        f.rollout.waves.len(),
        f.steps,
        humantime::format_duration(Duration::from_secs(f.now.since(T0).as_secs())),
        took,
        setup
    );
    assert!(done, "{} {}", f.rollout.status, f.rollout.last_action);
    assert_eq!(s.status, RolloutStatus::Completed, "{}", s.last_action);
    assert_eq!(s.deployed_count as usize, n);
    assert_eq!(s.quarantined_count, 0);
}
