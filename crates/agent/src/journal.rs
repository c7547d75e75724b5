//! The journal: the update state machine's [`State`], persisted before every action.
//!
//! Format: one header line `fleet-journal 1 sha256=<hex of the body>` and a JSON body. A write
//! goes to a temp file, is fsynced, the current journal is renamed to `journal.prev`, the temp
//! is renamed over `journal`, and the directory is fsynced. A torn or altered file fails its
//! checksum; then `journal.prev` (the state before the last step, whose actions had not run
//! yet) is used, which resolves the same way as a crash just before that step.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use fleet_proto::hex::Sha256;

use crate::fsutil;
use crate::machine::State;

const MAGIC: &str = "fleet-journal 1 sha256=";

/// Why the journal could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot write journal {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read journal {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "journal {path} and its previous copy are both unreadable ({problem}); move them aside to start fresh (the device forgets its highest accepted counter)"
    )]
    Corrupt { path: PathBuf, problem: String },
}

#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    prev: PathBuf,
}

/// What [`Journal::load`] found.
#[derive(Debug)]
pub enum Loaded {
    Fresh,
    Current(State),
    /// The current file was torn or altered; the previous one was used.
    Previous(State, String),
}

impl Journal {
    pub fn new(state_dir: &Path) -> Journal {
        Journal {
            path: state_dir.join("journal"),
            prev: state_dir.join("journal.prev"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Loaded, JournalError> {
        let current = read(&self.path).map_err(|source| JournalError::Read {
            path: self.path.clone(),
            source,
        })?;
        let previous = read(&self.prev).map_err(|source| JournalError::Read {
            path: self.prev.clone(),
            source,
        })?;
        match (current, previous) {
            (None, None) => Ok(Loaded::Fresh),
            (Some(bytes), prev) => match decode(&bytes) {
                Ok(state) => Ok(Loaded::Current(state)),
                Err(problem) => match prev.map(|b| decode(&b)) {
                    Some(Ok(state)) => Ok(Loaded::Previous(state, problem)),
                    _ => Err(JournalError::Corrupt {
                        path: self.path.clone(),
                        problem,
                    }),
                },
            },
            // Crash between the two renames: `prev` is the state before the step in flight.
            (None, Some(bytes)) => decode(&bytes)
                .map(|s| Loaded::Previous(s, "the journal was missing".into()))
                .map_err(|problem| JournalError::Corrupt {
                    path: self.prev.clone(),
                    problem,
                }),
        }
    }

    pub fn store(&self, state: &State) -> Result<(), JournalError> {
        let wrap = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        let bytes = encode(state);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let tmp = self.path.with_file_name("journal.tmp");
        {
            use std::io::Write as _;
            let mut f = fs::File::create(&tmp).map_err(wrap)?;
            f.write_all(&bytes).map_err(wrap)?;
            f.sync_all().map_err(wrap)?;
        }
        crate::fault::point("journal-before-rename");
        match fs::rename(&self.path, &self.prev) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(wrap(e)),
        }
        fs::rename(&tmp, &self.path).map_err(wrap)?;
        fsutil::sync_dir(dir).map_err(wrap)
    }
}

fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn encode(state: &State) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(state).expect("the state has string map keys");
    let mut out = format!("{MAGIC}{}\n", Sha256::of(&body)).into_bytes();
    out.extend_from_slice(&body);
    out
}

pub fn decode(bytes: &[u8]) -> Result<State, String> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no header line (torn write?)")?;
    let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| "header is not text")?;
    let want = header
        .strip_prefix(MAGIC)
        .ok_or_else(|| format!("unknown header {header:?}"))?;
    let body = &bytes[newline + 1..];
    let got = Sha256::of(body).to_string();
    if got != want {
        return Err(format!(
            "checksum mismatch (header {want}, body {got}): torn or altered write"
        ));
    }
    serde_json::from_slice(body).map_err(|e| format!("checksum ok but unreadable: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_writes_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::new(dir.path());
        assert!(matches!(j.load().unwrap(), Loaded::Fresh));
        let mut s = State::fresh();
        s.applied_sequence = 1;
        j.store(&s).unwrap();
        s.applied_sequence = 2;
        j.store(&s).unwrap();
        match j.load().unwrap() {
            Loaded::Current(got) => assert_eq!(got.applied_sequence, 2),
            other => panic!("{other:?}"),
        }
        // Tear the current file: the previous state is used.
        let bytes = fs::read(j.path()).unwrap();
        fs::write(j.path(), &bytes[..bytes.len() / 2]).unwrap();
        match j.load().unwrap() {
            Loaded::Previous(got, why) => {
                assert_eq!(got.applied_sequence, 1);
                assert!(why.contains("checksum"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // Both torn: an error that says what to do.
        fs::write(dir.path().join("journal.prev"), b"garbage").unwrap();
        let err = j.load().unwrap_err().to_string();
        assert!(err.contains("move them aside"), "{err}");
        // Missing current (crash between renames): previous is used.
        fs::remove_file(j.path()).unwrap();
        j.store(&s).unwrap();
        fs::rename(j.path(), dir.path().join("journal.prev")).unwrap();
        assert!(matches!(j.load().unwrap(), Loaded::Previous(..)));
    }
}
