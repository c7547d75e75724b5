//! fleetctl's exit statuses and the one error type that carries them.
//!
//! Scripts and CI jobs branch on the status, so each outcome has its own number (README,
//! "Exit codes"). Every failure prints `error: what happened` and, when there is something to
//! do about it, `hint: what to do`.

use std::fmt;

/// Process exit statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// Anything not covered below: a file could not be read, a key is malformed, …
    Error = 1,
    /// The command line itself is wrong (clap's own status).
    Usage = 2,
    /// The coordinator refused the request (e.g. a checklist item failed), or a local check
    /// refused it before sending (an unsigned or altered manifest).
    Refused = 3,
    /// The broker could not be reached or the coordinator did not answer in time.
    Unreachable = 4,
    /// `rollout watch`: the rollout halted and rolled back, or was rolled back.
    RolledBack = 5,
    /// `rollout watch`: an operator aborted the rollout.
    Aborted = 6,
}

/// A failure with its exit status and an optional hint.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}
