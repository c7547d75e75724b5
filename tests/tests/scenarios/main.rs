//! End-to-end scenarios of issue 6: the real `fleet-coordinator`, nine real `fleet-agent`
//! processes (three device types × two regions, each running the real `fleet-demo-app` from a
//! release artifact packed with `fleetctl artifact pack` and downloaded from the coordinator's
//! `/artifacts/{sha256}`), and `fleetctl` for every operator action.
//!
//! Every scenario runs twice: against the coordinator's embedded broker, and against a real
//! mosquitto started by the test with a password file and an ACL (username = device id; a
//! device may write only under its own id). Without mosquitto the second test prints a visible
//! `SKIPPED:` line (a failure under `FLEET_REQUIRE_E2E=1`, as in `.ci/run`).
//!
//! # Layout
//! - `site`: the broker, coordinator, agents, release desk and operators of one scenario.
//! - `rollouts`: good rollout; bad canary; crash loop in a wave; offline device caught up.
//! - `restarts`: coordinator kill -9 mid-wave; broker restart mid-wave.
//! - `operators`: approve / abort / rollback, audited by name; a device forging another's id.

#![allow(clippy::unwrap_used)]

mod operators;
mod restarts;
mod rollouts;
mod site;

/// Two `#[test]`s for a scenario body `fn(BrokerKind)`: `NAME::embedded` and `NAME::mosquitto`.
macro_rules! on_both_brokers {
    ($body:path => $name:ident) => {
        mod $name {
            use crate::site::BrokerKind;

            #[test]
            fn embedded() {
                $body(BrokerKind::Embedded)
            }

            #[test]
            fn mosquitto() {
                $body(BrokerKind::Mosquitto)
            }
        }
    };
}

on_both_brokers!(crate::rollouts::good_rollout => good_rollout);
on_both_brokers!(crate::rollouts::bad_canary => bad_canary);
on_both_brokers!(crate::rollouts::crash_loop_in_a_wave => crash_loop_in_a_wave);
on_both_brokers!(crate::rollouts::offline_device_caught_up => offline_device_caught_up);
on_both_brokers!(crate::restarts::coordinator_kill_mid_wave => coordinator_kill_mid_wave);
on_both_brokers!(crate::restarts::broker_restart_mid_wave => broker_restart_mid_wave);
on_both_brokers!(crate::operators::approve_abort_rollback => approve_abort_rollback);
on_both_brokers!(crate::operators::forged_device_id_is_refused => forged_device_id_is_refused);
