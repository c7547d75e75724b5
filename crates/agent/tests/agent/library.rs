//! The library entry point: several agents in one process and one runtime (fleet-sim's use).

use std::time::Duration;

use fleet_agent::Config;
use fleet_proto::device::EventKind;

use crate::support::*;

fn config_for(dev: &Device) -> Config {
    let mut c = Config::for_device(
        dev.id.clone(),
        "test-box",
        vec![key().verifying_key()],
        dev.root(),
        dev.state_dir(),
    );
    c.mqtt.port = dev.broker_port;
    c.mqtt.reconnect_min = Duration::from_millis(100);
    c.mqtt.reconnect_max = Duration::from_millis(500);
    c.app.port = dev.app_port;
    c.app.stop_grace = Duration::from_secs(2);
    c
}

#[test]
fn two_agents_share_a_runtime_and_stop_on_shutdown() {
    let devs = [
        Device::new("lib-a", broker()),
        Device::new("lib-b", broker()),
    ];
    let observers: Vec<Observer> = devs
        .iter()
        .map(|d| Observer::new(d.broker_port, &d.id))
        .collect();
    let configs: Vec<Config> = devs.iter().map(config_for).collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let runner = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut tasks = Vec::new();
            for config in configs {
                let mut rx = stop_rx.clone();
                tasks.push(tokio::spawn(fleet_agent::run(config, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.unwrap().map_err(|e| e.to_string()));
            }
            results
        })
    });
    for (i, (dev, obs)) in devs.iter().zip(&observers).enumerate() {
        let v = version(&format!("1.{i}.0"), &[]);
        let (_, s) = signed_file_release(dev.dir.path(), 1, &v);
        obs.publish_desired(&desired(&dev.id, 1, Some(s), 0));
    }
    for (i, (dev, obs)) in devs.iter().zip(&observers).enumerate() {
        obs.wait_event("committed", PATIENCE, |e| {
            matches!(e.kind, EventKind::Committed { .. })
        });
        dev.wait_serving(&format!("1.{i}.0"));
    }
    stop_tx.send(true).unwrap();
    let results = runner.join().unwrap();
    assert_eq!(results, vec![Ok(()), Ok(())]);
    // Shutdown stops the apps.
    for dev in &devs {
        wait_port_free(dev.app_port);
    }
}
