//! Data snapshots with the process runtime: the data directories named in the agent's config
//! (`app.data_dirs`, here through `FLEET_AGENT__APP__DATA_DIRS`) are snapshotted before the
//! swap, put back before the previous version starts after a failed trial, dropped on commit.

use fleet_agent::snapshot::{Store, tree_digest};
use fleet_proto::device::{EventKind, RollbackReason};

use crate::support::*;

#[test]
fn a_migration_that_fails_its_trial_is_undone_and_a_good_one_is_kept() {
    let dev = Device::new("data", broker());
    let data = dev.dir.path().join("app-data");
    let d = data.display().to_string();
    let obs = Observer::new(dev.broker_port, &dev.id);
    let _agent = Agent::start(&dev, &[("FLEET_AGENT__APP__DATA_DIRS", d.as_str())]);
    commit_first(&dev, &obs, &version("1.0.0", &["--data-dir", &d]), 1, 1);
    std::fs::write(data.join("rows"), "a,b,c\n").unwrap();
    let before = tree_digest(&data).unwrap();

    // 2.0.0 migrates to schema 2, then reports the wrong version.
    let bad = version(
        "2.0.0",
        &["--data-dir", &d, "--migrate", "--report-version", "0.0.0"],
    );
    let (_, s2) = signed_file_release(dev.dir.path(), 2, &bad);
    obs.publish_desired(&desired(&dev.id, 2, Some(s2), 0));
    let e = obs.wait_event("2.0.0 rolled back", PATIENCE, |e| {
        e.sequence == 2 && matches!(e.kind, EventKind::RolledBack { .. })
    });
    assert!(
        matches!(
            e.kind,
            EventKind::RolledBack {
                reason: RollbackReason::WrongVersion { .. },
                ..
            }
        ),
        "{:?}",
        e.kind
    );
    // 1.0.0 refuses schema-2 data: that it serves proves the data was put back first.
    dev.wait_serving("1.0.0");
    assert_eq!(
        tree_digest(&data).unwrap(),
        before,
        "the data equals its snapshot"
    );
    assert!(!data.join("migrated-by").exists());
    wait_until("idle, the snapshot dropped", PATIENCE, || {
        dev.idle_at(2)?;
        Store::new(&dev.state_dir()).list().is_empty().then_some(())
    });

    // A good migration is committed and keeps the migrated data.
    let good = version("3.0.0", &["--data-dir", &d, "--migrate"]);
    let (_, s3) = signed_file_release(dev.dir.path(), 3, &good);
    obs.publish_desired(&desired(&dev.id, 3, Some(s3), 0));
    obs.wait_event("3.0.0 committed", PATIENCE, |e| {
        e.sequence == 3 && matches!(e.kind, EventKind::Committed { .. })
    });
    dev.wait_serving("3.0.0");
    assert_eq!(std::fs::read_to_string(data.join("schema")).unwrap(), "2\n");
    assert_eq!(
        std::fs::read_to_string(data.join("rows")).unwrap(),
        "a,b,c\n"
    );
    wait_until("the snapshot dropped after the commit", PATIENCE, || {
        dev.idle_at(3)?;
        Store::new(&dev.state_dir()).list().is_empty().then_some(())
    });
    obs.assert_no_gap();
}
