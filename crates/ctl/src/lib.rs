//! fleetctl's library half: the MQTT request/reply link to the coordinator and the pieces of
//! output other tools reuse (`fleet-sim` drives its demo through it, as an operator would).
//!
//! # Layout
//! - [`link`]: connect, send one request and wait for its reply; follow a rollout's state.
//! - [`settings`]: connection settings from flags, `FLEET_…` variables and the config file.
//! - [`tls`]: the TLS client config (pinned CA, optional client certificate; rustls + ring).
//! - [`watch`]: the `rollout watch` loop and progress view.
//! - [`pack`]: a directory → a reproducible tar.gz and its manifest stanza.
//! - [`render`]: human output (tables, checklist, progress bars).
//! - [`exit`]: documented exit statuses and the failure type that carries them.

pub mod exit;
pub mod link;
pub mod pack;
pub mod render;
pub mod settings;
pub mod watch;

use fleet_proto::operator::Refused;

use exit::{Exit, Failure};

/// A coordinator refusal as a failure: the message, every failed checklist item, the hint.
pub fn refused(r: Refused) -> Failure {
    let mut message = r.message;
    let failed: Vec<_> = r.checklist.iter().filter(|i| !i.ok).cloned().collect();
    if !failed.is_empty() {
        message.push('\n');
        message.push_str(render::checklist(&failed).trim_end());
    }
    Failure {
        exit: Exit::Refused,
        message,
        hint: r.hint,
    }
}
