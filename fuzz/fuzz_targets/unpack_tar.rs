//! Any bytes as the (gunzipped) tar stream of an artifact, unpacked into an empty slot the way
//! the agent installs a release: refused or unpacked, never a panic, and never anything made or
//! linked outside the slot.
#![no_main]

use std::fs;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

thread_local! {
    /// One scratch root per fuzzing process: a fresh slot per input, the same sentinel beside it.
    static ROOT: tempfile::TempDir = {
        let root = tempfile::tempdir().expect("a temporary directory");
        fs::write(root.path().join("sentinel"), b"outside").expect("the sentinel");
        root
    };
}

fuzz_target!(|tar: &[u8]| {
    ROOT.with(|root| {
        let slot = root.path().join("slot");
        let _ = fs::remove_dir_all(&slot);
        fs::create_dir(&slot).expect("the slot");
        let result = fleet_agent::slots::unpack_tar(tar, &slot);
        // Nothing appears beside the slot, whatever the archive said.
        let mut beside: Vec<String> = fs::read_dir(root.path())
            .expect("the root")
            .map(|e| {
                e.expect("an entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        beside.sort();
        assert_eq!(
            beside,
            ["sentinel", "slot"],
            "something was made outside the slot"
        );
        assert_eq!(
            fs::read(root.path().join("sentinel")).expect("the sentinel"),
            b"outside"
        );
        // An unpack that succeeded leaves no link leading out, even through other links.
        if result.is_ok() {
            check_links(&slot, &slot, Path::new(""));
        }
    });
});

fn check_links(slot: &Path, dir: &Path, rel: &Path) {
    for entry in fs::read_dir(dir).expect("a directory in the slot") {
        let entry = entry.expect("an entry");
        let rel = rel.join(entry.file_name());
        let kind = entry.file_type().expect("a file type");
        if kind.is_symlink() {
            let target = fs::read_link(slot.join(&rel)).expect("a link");
            let joined = rel.parent().unwrap_or(Path::new("")).join(&target);
            assert!(
                !target.is_absolute() && lexically_inside(&joined),
                "link {} -> {} leads outside",
                rel.display(),
                target.display()
            );
            // Followed for real: if it resolves, it resolves inside the slot.
            if let Ok(real) = fs::canonicalize(slot.join(&rel)) {
                let slot = fs::canonicalize(slot).expect("the slot");
                assert!(
                    real.starts_with(&slot),
                    "link {} resolves to {}",
                    rel.display(),
                    real.display()
                );
            }
        } else if kind.is_dir() {
            check_links(slot, &slot.join(&rel), &rel);
        }
    }
}

fn lexically_inside(p: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}
