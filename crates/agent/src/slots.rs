//! The slots on disk: `ROOT/slot-a`, `ROOT/slot-b`, the `active` symlink (relative, to one
//! of them) and `ROOT/staging`. The active slot is never written: installs go to the other one.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use fleet_proto::device::Slot;

use crate::fault;
use crate::fsutil;

#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        Layout {
            root: root.to_owned(),
        }
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.root.join(slot.dir_name())
    }

    pub fn active(&self) -> PathBuf {
        self.root.join("active")
    }

    pub fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Creates the directories that must exist.
    pub fn prepare(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.slot_dir(Slot::A),
            self.slot_dir(Slot::B),
            self.staging(),
        ] {
            fs::create_dir_all(&dir)?;
        }
        // A temp link left by a crash mid-swap is garbage.
        let _ = fs::remove_file(self.root.join("active.tmp"));
        Ok(())
    }

    /// Where `active` points, if it is a link to one of the slots.
    pub fn read_link(&self) -> io::Result<Option<Slot>> {
        match fs::read_link(self.active()) {
            Ok(target) => Ok(match target.to_str() {
                Some("slot-a") => Some(Slot::A),
                Some("slot-b") => Some(Slot::B),
                _ => None,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Points `active` at `to` atomically: a new link, renamed over the old one, then the
    /// directory is fsynced (`ln -sfn` unlinks first and is not atomic). `None` removes it.
    pub fn swap(&self, to: Option<Slot>) -> io::Result<()> {
        match to {
            Some(slot) => {
                let tmp = self.root.join("active.tmp");
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(slot.dir_name(), &tmp)?;
                fault::point("swap-before-rename");
                fs::rename(&tmp, self.active())?;
            }
            None => match fs::remove_file(self.active()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        fsutil::sync_dir(&self.root)?;
        fault::point("swap-after-rename");
        Ok(())
    }

    /// Empties a slot (never the active one: callers pass the standby).
    pub fn wipe(&self, slot: Slot) -> io::Result<()> {
        let dir = self.slot_dir(slot);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(&dir)?;
        fsutil::sync_dir(&self.root)
    }

    /// Staged artifact of a release, by digest.
    pub fn staged(&self, digest: &fleet_proto::hex::Sha256) -> PathBuf {
        self.staging().join(format!("{digest}.artifact"))
    }

    pub fn discard_staging(&self) -> io::Result<()> {
        for entry in fs::read_dir(self.staging())? {
            let path = entry?.path();
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
        Ok(())
    }
}

/// Why an artifact could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("entry {entry:?} escapes the slot ({why})")]
    Escapes { entry: String, why: &'static str },
    #[error("entry {entry:?} has an unsupported type")]
    Unsupported { entry: String },
    #[error("cannot unpack the artifact: {0}")]
    Io(#[from] io::Error),
}

/// Unpacks a tar.gz into `dest` (an empty standby slot), refusing entries that escape it:
/// absolute paths, `..`, and links whose target leaves the slot.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), InstallError> {
    let file = fs::File::open(archive)?;
    unpack_tar(flate2::read::GzDecoder::new(io::BufReader::new(file)), dest)
}

/// Unpacks an (uncompressed) tar stream into `dest`: what [`unpack`] does after gunzip. Public
/// for the fuzz target (`fuzz/fuzz_targets/unpack_tar.rs`).
///
/// Design: nothing here ever follows a link the archive made. An entry whose parent path goes
/// through a link is refused *before* any directory is created for it, a hard link's source
/// must not go through one either, and once every entry is written each symbolic link is
/// resolved the way the kernel would (following the archive's own links) and must stay inside
/// `dest`: links checked one at a time can still combine into an escape (`z -> .`,
/// `y -> z/..`). The caller wipes the slot when this fails.
pub fn unpack_tar(stream: impl Read, dest: &Path) -> Result<(), InstallError> {
    let mut tar = tar::Archive::new(stream);
    let mut count = 0u32;
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let shown = path.display().to_string();
        let rel = safe_relative(&path).ok_or(InstallError::Escapes {
            entry: shown.clone(),
            why: "absolute or '..' path",
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        // A path through a symlink written earlier could lead outside: refuse it, before
        // creating the directories it names (they would be created wherever the link leads).
        if let Some(parent) = rel.parent()
            && through_symlink(dest, parent)
        {
            return Err(InstallError::Escapes {
                entry: shown,
                why: "a parent directory is a link",
            });
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        // A later entry replaces an earlier link instead of writing through it.
        if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&target)?;
        }
        match kind {
            tar::EntryType::Directory => fs::create_dir_all(&target)?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut out = fs::File::create(&target)?;
                io::copy(&mut entry, &mut out)?;
                let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
                fs::set_permissions(&target, fs::Permissions::from_mode(mode))?;
            }
            tar::EntryType::Symlink => {
                let link = entry.link_name()?.ok_or(InstallError::Unsupported {
                    entry: shown.clone(),
                })?;
                let base = rel.parent().unwrap_or(Path::new(""));
                if link.is_absolute() || safe_relative(&base.join(&link)).is_none() {
                    return Err(InstallError::Escapes {
                        entry: shown,
                        why: "link points outside the slot",
                    });
                }
                std::os::unix::fs::symlink(&link, &target)?;
            }
            tar::EntryType::Link => {
                let link = entry.link_name()?.ok_or(InstallError::Unsupported {
                    entry: shown.clone(),
                })?;
                let inside = safe_relative(&link).ok_or(InstallError::Escapes {
                    entry: shown.clone(),
                    why: "hard link points outside the slot",
                })?;
                // Its source must not go through a link either: that would link a file from
                // outside the slot into it.
                if through_symlink(dest, &inside) {
                    return Err(InstallError::Escapes {
                        entry: shown,
                        why: "hard link source goes through a link",
                    });
                }
                fs::hard_link(dest.join(inside), &target)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            _ => return Err(InstallError::Unsupported { entry: shown }),
        }
        count += 1;
        if count == 2 {
            fault::point("install-midway");
        }
    }
    links_stay_inside(dest, Path::new(""))
}

/// Every symbolic link under `dest/rel`, resolved, stays inside `dest`.
fn links_stay_inside(dest: &Path, rel: &Path) -> Result<(), InstallError> {
    for entry in fs::read_dir(dest.join(rel))? {
        let entry = entry?;
        let rel = rel.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            if !resolves_inside(dest, &rel) {
                return Err(InstallError::Escapes {
                    entry: rel.display().to_string(),
                    why: "the link, followed through the archive's other links, leads outside the slot",
                });
            }
        } else if kind.is_dir() {
            links_stay_inside(dest, &rel)?;
        }
    }
    Ok(())
}

/// Resolves `rel` (a path inside `dest`) as the kernel would, following links found under
/// `dest`; false if it ever goes above `dest`, is absolute, or loops.
fn resolves_inside(dest: &Path, rel: &Path) -> bool {
    let mut todo: std::collections::VecDeque<std::ffi::OsString> =
        std::collections::VecDeque::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => todo.push_back(n.to_owned()),
            _ => return false,
        }
    }
    let mut at = PathBuf::new();
    let mut hops = 0;
    while let Some(next) = todo.pop_front() {
        if next == ".." {
            if !at.pop() {
                return false;
            }
            continue;
        }
        if next == "." {
            continue;
        }
        at.push(&next);
        let Ok(target) = fs::read_link(dest.join(&at)) else {
            continue;
        };
        hops += 1;
        if hops > 40 || target.is_absolute() {
            return false;
        }
        at.pop();
        let mut front: Vec<std::ffi::OsString> = Vec::new();
        for c in target.components() {
            match c {
                Component::Normal(n) => front.push(n.to_owned()),
                Component::ParentDir => front.push("..".into()),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => return false,
            }
        }
        for c in front.into_iter().rev() {
            todo.push_front(c);
        }
    }
    true
}

/// `path` normalised to a relative path without `..`, or `None` if it would leave its base.
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn through_symlink(dest: &Path, rel_parent: &Path) -> bool {
    let mut cur = dest.to_path_buf();
    for c in rel_parent.components() {
        cur.push(c);
        if fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

/// Runs `hooks/post-install` in the slot, if the artifact has one, within `timeout`.
/// Blocking: call from a blocking thread.
pub fn run_hook(
    slot_dir: &Path,
    timeout: Duration,
    env: &[(String, String)],
) -> Result<(), String> {
    let hook = slot_dir.join("hooks/post-install");
    if !hook.exists() {
        return Ok(());
    }
    fault::point("install-before-hook");
    let mut child = std::process::Command::new(&hook)
        .current_dir(slot_dir)
        .env("FLEET_SLOT_DIR", slot_dir)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", hook.display()))?;
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(4096).read_to_string(&mut text);
        }
        text
    });
    let started = std::time::Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let text = reader.join().unwrap_or_default();
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "hooks/post-install exited with {status}: {}",
                        text.trim()
                    ))
                };
            }
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "hooks/post-install did not finish within {}",
                    humantime::format_duration(timeout)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for hooks/post-install: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let tar = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let path = dir.join("a.tar.gz");
        fs::write(&path, gz.finish().unwrap()).unwrap();
        path
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Regular);
        // set_path refuses '..'; write the raw name to build hostile archives.
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn link(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::Symlink);
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }

    #[test]
    fn unpacks_and_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("slot");
        fs::create_dir(&dest).unwrap();
        let ok = archive(dir.path(), |b| {
            file(b, "bin/app", b"#!/bin/sh\n");
            link(b, "bin/alias", "app");
            link(b, "lib/up", "../bin/app");
        });
        unpack(&ok, &dest).unwrap();
        assert_eq!(fs::read(dest.join("bin/app")).unwrap(), b"#!/bin/sh\n");
        // A file entry over an earlier link replaces the link, not its target.
        let over = archive(dir.path(), |b| {
            file(b, "bin/app", b"original");
            link(b, "bin/alias", "app");
            file(b, "bin/alias", b"replaced");
        });
        let dest2 = dir.path().join("slot2");
        fs::create_dir(&dest2).unwrap();
        unpack(&over, &dest2).unwrap();
        assert_eq!(fs::read(dest2.join("bin/app")).unwrap(), b"original");
        assert_eq!(fs::read(dest2.join("bin/alias")).unwrap(), b"replaced");
        assert_eq!(
            fs::metadata(dest.join("bin/app"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );

        type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;
        let cases: [(&str, Build); 4] = [
            ("dotdot", Box::new(|b| file(b, "../evil", b"x"))),
            ("absolute", Box::new(|b| file(b, "/tmp/evil", b"x"))),
            ("link out", Box::new(|b| link(b, "out", "../../etc"))),
            ("abs link", Box::new(|b| link(b, "out", "/etc"))),
        ];
        for (name, build) in cases {
            let dest = dir.path().join(format!("slot-{name}"));
            fs::create_dir(&dest).unwrap();
            let a = archive(dir.path(), |b| build(b));
            let err = unpack(&a, &dest).unwrap_err();
            assert!(matches!(err, InstallError::Escapes { .. }), "{name}: {err}");
        }
        assert!(!dir.path().join("evil").exists());
    }

    #[test]
    fn links_that_combine_into_an_escape_are_refused_and_nothing_is_made_outside() {
        let dir = tempfile::tempdir().unwrap();
        // Each link alone stays inside; together y = z/.. = the slot's parent.
        let chained = archive(dir.path(), |b| {
            link(b, "z", ".");
            link(b, "y", "z/..");
        });
        let dest = dir.path().join("slot");
        fs::create_dir(&dest).unwrap();
        let err = unpack(&chained, &dest).unwrap_err();
        assert!(matches!(err, InstallError::Escapes { .. }), "{err}");
        // Order reversed: the escape only exists once both are there.
        let reversed = archive(dir.path(), |b| {
            link(b, "y", "z/..");
            link(b, "z", ".");
        });
        let dest = dir.path().join("slot-r");
        fs::create_dir(&dest).unwrap();
        assert!(unpack(&reversed, &dest).is_err());
        // Writing (or making directories) through the chain: refused before anything is made.
        let through = archive(dir.path(), |b| {
            link(b, "z", ".");
            link(b, "y", "z/..");
            file(b, "y/made-outside/evil", b"x");
        });
        let dest = dir.path().join("slot-t");
        fs::create_dir(&dest).unwrap();
        assert!(unpack(&through, &dest).is_err());
        assert!(!dir.path().join("made-outside").exists());
        // A hard link whose source goes through a link to outside the slot.
        fs::write(dir.path().join("secret"), b"outside").unwrap();
        let hard = archive(dir.path(), |b| {
            link(b, "z", ".");
            link(b, "up", "z/..");
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_entry_type(tar::EntryType::Link);
            h.as_old_mut().name[..4].copy_from_slice(b"copy");
            h.as_old_mut().linkname[..9].copy_from_slice(b"up/secret");
            h.set_cksum();
            b.append(&h, &[][..]).unwrap();
        });
        let dest = dir.path().join("slot-h");
        fs::create_dir(&dest).unwrap();
        let err = unpack(&hard, &dest).unwrap_err();
        assert!(err.to_string().contains("hard link"), "{err}");
        assert!(!dest.join("copy").exists());
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(
                &fs::metadata(dir.path().join("secret")).unwrap()
            ),
            1
        );
        // Links that really stay inside still work, through other links too.
        let fine = archive(dir.path(), |b| {
            file(b, "lib/real.so", b"elf");
            link(b, "lib64", "lib");
            link(b, "bin/lib", "../lib64/real.so");
        });
        let dest = dir.path().join("slot-ok");
        fs::create_dir(&dest).unwrap();
        unpack(&fine, &dest).unwrap();
        assert_eq!(fs::read(dest.join("bin/lib")).unwrap(), b"elf");
    }

    #[test]
    fn swap_is_a_rename_of_a_fresh_link() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::new(dir.path());
        l.prepare().unwrap();
        assert_eq!(l.read_link().unwrap(), None);
        l.swap(Some(Slot::A)).unwrap();
        assert_eq!(l.read_link().unwrap(), Some(Slot::A));
        l.swap(Some(Slot::B)).unwrap();
        assert_eq!(l.read_link().unwrap(), Some(Slot::B));
        assert!(!dir.path().join("active.tmp").exists());
        l.swap(None).unwrap();
        assert_eq!(l.read_link().unwrap(), None);
    }

    #[test]
    fn hooks_run_with_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        assert!(run_hook(dir.path(), Duration::from_secs(1), &[]).is_ok());
        fs::create_dir(dir.path().join("hooks")).unwrap();
        let hook = dir.path().join("hooks/post-install");
        fs::write(&hook, "#!/bin/sh\necho built > engine\n").unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
        run_hook(dir.path(), Duration::from_secs(5), &[]).unwrap();
        assert!(dir.path().join("engine").exists());
        fs::write(&hook, "#!/bin/sh\necho nope >&2\nexit 7\n").unwrap();
        let err = run_hook(dir.path(), Duration::from_secs(5), &[]).unwrap_err();
        assert!(err.contains("nope"), "{err}");
        fs::write(&hook, "#!/bin/sh\nexec sleep 10\n").unwrap();
        let err = run_hook(dir.path(), Duration::from_millis(200), &[]).unwrap_err();
        assert!(err.contains("did not finish"), "{err}");
    }
}
