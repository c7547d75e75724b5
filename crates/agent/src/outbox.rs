//! The event outbox: every event is written to disk (fsynced) before it is published, and
//! removed only when the broker has acknowledged it, so events produced offline or before a
//! crash are delivered later, in order.
//!
//! Layout: `STATE/outbox/<seq, 20 digits>.ev` holds one encoded event frame;
//! `STATE/outbox/next-seq` the next sequence number. Bounded: past `max` entries the oldest is
//! dropped (logged; the coordinator sees the gap in `seq`).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max: usize,
    next_seq: u64,
    /// seq → frame, mirrors the files.
    pending: BTreeMap<u64, Vec<u8>>,
}

impl Outbox {
    pub fn open(dir: &Path, max: usize) -> io::Result<Outbox> {
        fs::create_dir_all(dir)?;
        let mut pending = BTreeMap::new();
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(seq) = name.strip_suffix(".ev").and_then(|s| s.parse::<u64>().ok()) {
                let frame = fs::read(entry.path())?;
                pending.insert(seq, frame);
            } else if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let stored = fs::read_to_string(dir.join("next-seq"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(1);
        let after_pending = pending.keys().next_back().map(|s| s + 1).unwrap_or(1);
        Ok(Outbox {
            dir: dir.to_owned(),
            max: max.max(1),
            next_seq: stored.max(after_pending),
            pending,
        })
    }

    /// The sequence number the next event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Stores an event frame under the next sequence number (durably) and returns that number.
    /// `frame` builds the encoded event from its seq.
    pub fn append(&mut self, frame: impl FnOnce(u64) -> Vec<u8>) -> io::Result<u64> {
        let seq = self.next_seq;
        let bytes = frame(seq);
        // The event first: a crash between the two writes leaves the event, and `open` derives
        // the next seq from it; the other order would burn a seq (a false gap).
        fsutil::write_atomic(&self.path(seq), &bytes)?;
        fsutil::write_atomic(&self.dir.join("next-seq"), (seq + 1).to_string().as_bytes())?;
        self.next_seq = seq + 1;
        self.pending.insert(seq, bytes);
        while self.pending.len() > self.max {
            if let Some((old, _)) = self.pending.pop_first() {
                tracing::warn!(
                    seq = old,
                    "event outbox full; dropping the oldest undelivered event"
                );
                let _ = fs::remove_file(self.path(old));
            }
        }
        crate::fault::point("outbox-after-append");
        Ok(seq)
    }

    /// Undelivered events, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.pending.iter().map(|(s, f)| (*s, f.as_slice()))
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The broker has the event: forget it.
    pub fn delivered(&mut self, seq: u64) -> io::Result<()> {
        if self.pending.remove(&seq).is_some() {
            match fs::remove_file(self.path(seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.ev"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_in_order_and_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        for i in 0..4u8 {
            o.append(|seq| vec![i, seq as u8]).unwrap();
        }
        // Bounded: seq 1 dropped.
        let seqs: Vec<u64> = o.pending().map(|(s, _)| s).collect();
        assert_eq!(seqs, [2, 3, 4]);
        o.delivered(2).unwrap();
        drop(o);
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        let got: Vec<(u64, Vec<u8>)> = o.pending().map(|(s, f)| (s, f.to_vec())).collect();
        assert_eq!(got, [(3, vec![2, 3]), (4, vec![3, 4])]);
        o.delivered(3).unwrap();
        o.delivered(4).unwrap();
        drop(o);
        // Sequence numbers never repeat, even with an empty outbox.
        let o = Outbox::open(dir.path(), 3).unwrap();
        assert_eq!(o.next_seq(), 5);
    }
}
