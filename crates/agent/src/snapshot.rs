//! Data snapshots: the directories an application owns (a release's `[data] dirs` and the
//! agent's `app.data_dirs`), archived before a swap and put back on a rollback, so a version
//! rolled back runs on the data it left, not on what the new version migrated.
//!
//! Layout under `paths.state/snapshots/<sequence>/`: one uncompressed tar per directory
//! (`0.tar`, `1.tar`, …; compression would cost a small device CPU time for little: the
//! snapshot lives only for one trial) and `manifest.json`, written last and atomically: a
//! snapshot without it is incomplete and is taken again. The manifest holds, per directory,
//! the archive's SHA-256 (checked before anything is restored) and a digest of the directory
//! tree itself (paths, types, permission bits, file contents, link targets), which the restored
//! tree must match.
//!
//! A restore unpacks next to the directory (`DIR.fleet-restore`), checks the tree digest,
//! moves the current directory aside (`DIR.fleet-old`), renames the restored one into place,
//! then deletes the old one: every step can be redone after a crash, and the archive stays
//! until the update ends.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use fleet_proto::hex::Sha256;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::fault;
use crate::fsutil;

/// Room left free beyond the snapshot itself, per filesystem: a full disk breaks more than
/// the update.
const MARGIN: u64 = 4 << 20;

/// The snapshots of one agent: `paths.state/snapshots`.
#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

/// What a snapshot holds: written last, atomically.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    sequence: u64,
    dirs: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    /// `None`: the directory did not exist; a restore removes it.
    archive_sha256: Option<Sha256>,
    tree: Option<Sha256>,
}

impl Store {
    pub fn new(state_dir: &Path) -> Store {
        Store {
            dir: state_dir.join("snapshots"),
        }
    }

    fn snapshot_dir(&self, sequence: u64) -> PathBuf {
        self.dir.join(sequence.to_string())
    }

    /// Archives `dirs` as job `sequence`'s snapshot, replacing every older one. Blocking.
    pub fn take(&self, sequence: u64, dirs: &[String]) -> Result<(), String> {
        self.drop_all().map_err(|e| {
            format!(
                "cannot remove older snapshots in {}: {e}",
                self.dir.display()
            )
        })?;
        let target = self.snapshot_dir(sequence);
        fs::create_dir_all(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        check_space(&self.dir, dirs)?;
        let mut entries = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let dir = PathBuf::from(d);
            let entry = match fs::symlink_metadata(&dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Entry {
                    path: dir,
                    archive_sha256: None,
                    tree: None,
                },
                Err(e) => return Err(format!("cannot read data directory {d}: {e}")),
                Ok(m) if !m.is_dir() => {
                    return Err(format!("data directory {d} is not a directory"));
                }
                Ok(_) => {
                    let archive = target.join(format!("{i}.tar"));
                    let archive_sha256 = archive_dir(&dir, &archive)
                        .map_err(|e| format!("cannot archive data directory {d}: {e}"))?;
                    let tree = tree_digest(&dir)
                        .map_err(|e| format!("cannot read data directory {d}: {e}"))?;
                    fault::point("snapshot-midway");
                    Entry {
                        path: dir,
                        archive_sha256: Some(archive_sha256),
                        tree,
                    }
                }
            };
            entries.push(entry);
        }
        fsutil::sync_fs(&target).map_err(|e| format!("cannot sync {}: {e}", target.display()))?;
        let manifest = Manifest {
            sequence,
            dirs: entries,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("a manifest has string keys");
        fsutil::write_atomic(&target.join("manifest.json"), &bytes)
            .map_err(|e| format!("cannot write the snapshot manifest: {e}"))?;
        fault::point("snapshot-done");
        Ok(())
    }

    /// Puts job `sequence`'s snapshot back and checks it. The app must be stopped. Blocking.
    pub fn restore(&self, sequence: u64) -> Result<(), String> {
        let target = self.snapshot_dir(sequence);
        let path = target.join("manifest.json");
        let bytes = fs::read(&path)
            .map_err(|e| format!("no complete snapshot ({}: {e})", path.display()))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("unreadable snapshot manifest {}: {e}", path.display()))?;
        if manifest.sequence != sequence {
            return Err(format!(
                "the snapshot in {} is for update {}, not {sequence}",
                target.display(),
                manifest.sequence
            ));
        }
        for (i, entry) in manifest.dirs.iter().enumerate() {
            restore_one(&target.join(format!("{i}.tar")), entry)?;
        }
        fault::point("restore-done");
        Ok(())
    }

    /// Deletes every snapshot.
    pub fn drop_all(&self) -> io::Result<()> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        fsutil::sync_dir(&self.dir)
    }

    /// The sequences that have a snapshot directory (complete or not), for tests and logs.
    pub fn list(&self) -> Vec<u64> {
        let mut out: Vec<u64> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable();
        out
    }
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    }
}

fn restore_one(archive: &Path, entry: &Entry) -> Result<(), String> {
    let dir = &entry.path;
    let shown = dir.display();
    let staged = sibling(dir, ".fleet-restore");
    let old = sibling(dir, ".fleet-old");
    // Leftovers of a restore cut short: the archive is still there, start again.
    remove_tree(&staged).map_err(|e| format!("cannot remove {}: {e}", staged.display()))?;
    let (Some(want_sha), want_tree) = (entry.archive_sha256, entry.tree) else {
        // The directory did not exist before the update: it must not exist after a rollback.
        remove_tree(dir).map_err(|e| format!("cannot remove {shown}: {e}"))?;
        remove_tree(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
        return Ok(());
    };
    let got =
        file_sha256(archive).map_err(|e| format!("cannot read {}: {e}", archive.display()))?;
    if got != want_sha {
        return Err(format!(
            "snapshot archive {} is damaged: sha256 mismatch (expected {}, got {})",
            archive.display(),
            want_sha.short(),
            got.short()
        ));
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    unpack(archive, &staged).map_err(|e| format!("cannot unpack the snapshot of {shown}: {e}"))?;
    let tree =
        tree_digest(&staged).map_err(|e| format!("cannot read {}: {e}", staged.display()))?;
    if tree != want_tree {
        return Err(format!(
            "restored {shown} does not match its snapshot (checksum {} expected, {} found)",
            want_tree.map(|t| t.short()).unwrap_or_default(),
            tree.map(|t| t.short()).unwrap_or_default()
        ));
    }
    fsutil::sync_fs(&staged).map_err(|e| format!("cannot sync {}: {e}", staged.display()))?;
    // A previous attempt may already have moved the migrated directory aside.
    if fs::symlink_metadata(dir).is_ok() {
        remove_tree(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
        fs::rename(dir, &old).map_err(|e| format!("cannot move {shown} aside: {e}"))?;
    }
    fault::point("restore-midway");
    fs::rename(&staged, dir).map_err(|e| format!("cannot put {shown} back: {e}"))?;
    if let Some(parent) = dir.parent() {
        fsutil::sync_dir(parent).map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    }
    remove_tree(&old).map_err(|e| format!("cannot remove {}: {e}", old.display()))?;
    Ok(())
}

/// Free space for the archives (on the store's filesystem) and for each restore (beside each
/// directory), added up per filesystem, before a byte is written.
fn check_space(store: &Path, dirs: &[String]) -> Result<(), String> {
    let dev = |p: &Path| fs::metadata(p).map(|m| m.dev());
    let store_dev = dev(store).map_err(|e| format!("cannot stat {}: {e}", store.display()))?;
    // filesystem → (bytes needed, a path on it)
    let mut need: BTreeMap<u64, (u64, PathBuf)> = BTreeMap::new();
    for d in dirs {
        let dir = Path::new(d);
        if !dir.is_dir() {
            continue;
        }
        let size = tree_size(dir).map_err(|e| format!("cannot measure data directory {d}: {e}"))?;
        let e = need.entry(store_dev).or_insert((0, store.to_owned()));
        e.0 += size;
        let dir_dev = dev(dir).map_err(|e| format!("cannot stat {d}: {e}"))?;
        let e = need.entry(dir_dev).or_insert((0, dir.to_owned()));
        e.0 += size;
    }
    for (needed, path) in need.values() {
        let free = fsutil::disk_space(path)
            .map_err(|e| format!("cannot measure free space at {}: {e}", path.display()))?
            .0;
        if needed.saturating_add(MARGIN) > free {
            return Err(format!(
                "not enough free space for the data snapshot on the filesystem of {}: {} bytes needed (with {} to spare), {free} free",
                path.display(),
                needed,
                MARGIN
            ));
        }
    }
    Ok(())
}

fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let m = entry.metadata()?;
        total += if m.is_dir() {
            tree_size(&entry.path())? + 512
        } else {
            m.len() + 512
        };
    }
    Ok(total)
}

fn archive_dir(dir: &Path, archive: &Path) -> io::Result<Sha256> {
    let file = fs::File::create(archive)?;
    let mut builder = tar::Builder::new(io::BufWriter::new(file));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    builder.append_dir_all(".", dir)?;
    let mut out = builder.into_inner()?;
    io::Write::flush(&mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    file_sha256(archive)
}

fn unpack(archive: &Path, dest: &Path) -> io::Result<()> {
    fs::create_dir_all(dest)?;
    let mut a = tar::Archive::new(io::BufReader::new(fs::File::open(archive)?));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    // SAFETY: geteuid(2) has no preconditions.
    a.set_preserve_ownerships(unsafe { libc::geteuid() } == 0);
    a.set_overwrite(true);
    a.unpack(dest)?;
    // `unpack` leaves the top directory's own mode as created: set it from the archive's "./".
    let mut a = tar::Archive::new(io::BufReader::new(fs::File::open(archive)?));
    for entry in a.entries()? {
        let entry = entry?;
        let path = entry.path()?;
        if path.as_os_str() == "." || path.as_os_str() == "./" {
            if let Ok(mode) = entry.header().mode() {
                fs::set_permissions(dest, fs::Permissions::from_mode(mode & 0o7777))?;
            }
            break;
        }
    }
    Ok(())
}

fn file_sha256(path: &Path) -> io::Result<Sha256> {
    let mut f = fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(fleet_proto::hex::Hex(h.finalize().into()))
}

/// A digest of a directory tree: every entry's relative path, type, permission bits, and the
/// contents of files or targets of links, in name order. `None` when `dir` does not exist.
/// Owners and times are left out: what an application reads is what is compared.
pub fn tree_digest(dir: &Path) -> io::Result<Option<Sha256>> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    let mut h = sha2::Sha256::new();
    let mode = fs::symlink_metadata(dir)?.permissions().mode() & 0o7777;
    h.update(format!("d . {mode:o}\n"));
    walk(dir, Path::new(""), &mut h)?;
    Ok(Some(fleet_proto::hex::Hex(h.finalize().into())))
}

fn walk(base: &Path, rel: &Path, h: &mut sha2::Sha256) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(base.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = base.join(&rel);
        let m = fs::symlink_metadata(&path)?;
        let mode = m.permissions().mode() & 0o7777;
        let shown = rel.display();
        if m.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            h.update(format!("l {shown} -> {}\n", target.display()));
        } else if m.is_dir() {
            h.update(format!("d {shown} {mode:o}\n"));
            walk(base, &rel, h)?;
        } else if m.is_file() {
            let mut f = fs::File::open(&path)?;
            let mut fh = sha2::Sha256::new();
            let mut buf = [0u8; 64 * 1024];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                fh.update(&buf[..n]);
            }
            let digest = fleet_proto::hex::Hex::<32>(fh.finalize().into());
            h.update(format!("f {shown} {mode:o} {} {digest}\n", m.len()));
        } else {
            h.update(format!("o {shown} {mode:o}\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn a_snapshot_restores_the_tree_it_took_and_checks_it() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        write(&data.join("schema"), "1\n");
        write(&data.join("db/rows"), "a,b\n");
        fs::set_permissions(data.join("db/rows"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("db/rows", data.join("current")).unwrap();
        let absent = tmp.path().join("cache");
        let before = tree_digest(&data).unwrap();
        let store = Store::new(&tmp.path().join("state"));
        let dirs = [data.display().to_string(), absent.display().to_string()];
        store.take(7, &dirs).unwrap();
        assert_eq!(store.list(), [7]);

        // The new version migrates, adds, removes; and creates a directory that was absent.
        write(&data.join("schema"), "2\n");
        write(&data.join("db/new"), "x");
        fs::remove_file(data.join("current")).unwrap();
        write(&absent.join("junk"), "x");
        assert_ne!(tree_digest(&data).unwrap(), before);

        store.restore(7).unwrap();
        assert_eq!(tree_digest(&data).unwrap(), before);
        assert_eq!(fs::read_to_string(data.join("schema")).unwrap(), "1\n");
        assert!(
            !absent.exists(),
            "a directory absent before is absent after"
        );
        assert!(!sibling(&data, ".fleet-old").exists());
        assert!(!sibling(&data, ".fleet-restore").exists());
        // Restoring twice (a crash after the first) gives the same tree.
        store.restore(7).unwrap();
        assert_eq!(tree_digest(&data).unwrap(), before);

        // Another update's snapshot replaces it; dropping leaves none.
        store.take(8, &dirs).unwrap();
        assert_eq!(store.list(), [8]);
        assert!(
            store
                .restore(7)
                .unwrap_err()
                .contains("no complete snapshot")
        );
        store.drop_all().unwrap();
        assert!(store.list().is_empty());
    }

    #[test]
    fn a_damaged_archive_is_refused_before_anything_is_touched() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        write(&data.join("schema"), "1\n");
        let store = Store::new(&tmp.path().join("state"));
        store.take(3, &[data.display().to_string()]).unwrap();
        write(&data.join("schema"), "2\n");
        let archive = tmp.path().join("state/snapshots/3/0.tar");
        let mut bytes = fs::read(&archive).unwrap();
        let n = bytes.len();
        bytes[n / 3] ^= 0xff;
        fs::write(&archive, bytes).unwrap();
        let err = store.restore(3).unwrap_err();
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert_eq!(fs::read_to_string(data.join("schema")).unwrap(), "2\n");
    }

    #[test]
    fn a_resumed_restore_finishes_after_the_directory_was_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        write(&data.join("schema"), "1\n");
        let before = tree_digest(&data).unwrap();
        let store = Store::new(&tmp.path().join("state"));
        store.take(3, &[data.display().to_string()]).unwrap();
        write(&data.join("schema"), "2\n");
        // A crash between the two renames: the migrated tree aside, nothing in place.
        fs::rename(&data, sibling(&data, ".fleet-old")).unwrap();
        write(&sibling(&data, ".fleet-restore").join("half"), "x");
        store.restore(3).unwrap();
        assert_eq!(tree_digest(&data).unwrap(), before);
        assert!(!sibling(&data, ".fleet-old").exists());
    }

    #[test]
    fn not_a_directory_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("file");
        write(&file, "x");
        let store = Store::new(&tmp.path().join("state"));
        let err = store.take(1, &[file.display().to_string()]).unwrap_err();
        assert!(
            err.contains("is not a directory") && err.contains("file"),
            "{err}"
        );
    }
}
