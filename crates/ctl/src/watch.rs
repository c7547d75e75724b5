//! `fleetctl rollout watch`: live progress per wave until the rollout ends.
//!
//! Updates come from the retained state topic; a status request every few seconds covers a
//! broker that drops the subscription (rumqttd does not redeliver retained messages on a
//! resumed session) so the watch can never hang on a rollout that already ended.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use fleet_proto::RolloutId;
use fleet_proto::operator::{Command, ReplyBody};
use fleet_proto::rollout::RolloutState;

use crate::exit::{Exit, Failure};
use crate::link::{Answer, Link};
use crate::render::bar;

/// Asks the coordinator for a rollout's state block.
pub async fn status(link: &mut Link, rollout: &RolloutId) -> Result<RolloutState, Failure> {
    match link
        .request(Command::Status {
            rollout: rollout.clone(),
        })
        .await?
    {
        Answer::Accepted(ReplyBody::State(state)) => Ok(state),
        Answer::Accepted(_) => Err(Failure::new(
            Exit::Error,
            "the coordinator answered a status request with something else",
        )),
        Answer::Refused(r) => Err(crate::refused(r)),
    }
}

/// Renders the progress view: one line for the rollout, one bar per wave.
pub fn progress(s: &RolloutState) -> String {
    let mut out = format!(
        "{} {} — {} {} — deployed {}/{}, healthy {}, skipped {}, quarantined {}\n",
        s.rollout,
        s.artifact,
        s.phase,
        s.status,
        s.deployed_count,
        s.fleet_total,
        s.healthy_count,
        s.skipped_count,
        s.quarantined_count
    );
    for w in &s.waves {
        let verdict = match &w.verdict {
            Some(v) => format!(" {v:?}").to_lowercase(),
            None => String::new(),
        };
        let failed = if w.failed > 0 {
            format!(" {} failed", w.failed)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:<8} {}{failed}{verdict}",
            w.name,
            bar(w.deployed, w.devices, 24)
        );
    }
    let _ = writeln!(out, "  last: {}", s.last_action);
    let _ = writeln!(out, "  next: {}", s.next_action);
    if !s.blockers.is_empty() {
        let _ = writeln!(out, "  blockers: {}", s.blockers.join("; "));
    }
    out
}

/// One line per change, for logs and pipes.
fn line(s: &RolloutState) -> String {
    format!(
        "{} {} {} wave {} deployed {}/{} healthy {} skipped {} quarantined {} | {}\n",
        s.updated_at,
        s.phase,
        s.status,
        String::from(s.current_wave),
        s.deployed_count,
        s.fleet_total,
        s.healthy_count,
        s.skipped_count,
        s.quarantined_count,
        s.last_action
    )
}

pub async fn watch(
    link: &mut Link,
    rollout: &RolloutId,
    tty: bool,
    poll: Duration,
) -> Result<RolloutState, Failure> {
    link.follow(rollout).await?;
    let mut state = status(link, rollout).await?;
    let mut stdout = std::io::stdout();
    let mut drawn_lines = 0usize;
    let mut last_printed = String::new();
    loop {
        if tty {
            let view = progress(&state);
            // Move up over the previous view and clear it, then draw the new one.
            if drawn_lines > 0 {
                let _ = write!(stdout, "\x1b[{drawn_lines}A\x1b[J");
            }
            let _ = write!(stdout, "{view}");
            drawn_lines = view.lines().count();
        } else {
            let l = line(&state);
            // The timestamp changes on every publish; print only real changes.
            let key = l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest);
            if key != last_printed {
                let _ = write!(stdout, "{l}");
                last_printed = key.to_owned();
            }
        }
        let _ = stdout.flush();
        if state.status.is_final() {
            return Ok(state);
        }
        let next = match link.next_state(poll).await? {
            Some(s) if s.rollout == *rollout => Some(s),
            Some(_) => None,
            None => Some(status(link, rollout).await?),
        };
        if let Some(next) = next
            && next.updated_at >= state.updated_at
        {
            state = next;
        }
    }
}
