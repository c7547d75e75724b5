//! `fleetctl artifact pack`: a directory → a reproducible tar.gz and its manifest stanza.

use std::fs::File;
use std::io::{BufWriter, Read as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use fleet_proto::hex::Sha256;
use fleet_proto::release::Arch;

#[derive(Debug)]
pub struct Packed {
    pub path: PathBuf,
    pub sha256: Sha256,
    pub size: u64,
}

/// Packs `dir` into `out`. Entries are sorted and carry no owner or time, so the same tree
/// always gives the same bytes (and the same sha256).
pub fn pack(dir: &Path, out: &Path) -> anyhow::Result<Packed> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut entries = Vec::new();
    collect(dir, Path::new(""), &mut entries)?;
    for rel in entries {
        let full = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&full)
            .with_context(|| format!("cannot read {}", full.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            tar.append_link(&mut header, &rel, target)
        } else if meta.is_dir() {
            tar.append_data(&mut header, &rel, std::io::empty())
        } else {
            let f = File::open(&full).with_context(|| format!("cannot read {}", full.display()))?;
            tar.append_data(&mut header, &rel, f)
        }
        .with_context(|| format!("cannot add {} to the archive", rel.display()))?;
    }
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot finish {}", out.display()))?;
    let (sha256, size) = digest_file(out)?;
    Ok(Packed {
        path: out.to_owned(),
        sha256,
        size,
    })
}

fn collect(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(root.join(rel))
        .with_context(|| format!("cannot list {}", root.join(rel).display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let child = rel.join(&name);
        out.push(child.clone());
        if std::fs::symlink_metadata(root.join(&child))?.is_dir() {
            collect(root, &child, out)?;
        }
    }
    Ok(())
}

pub fn digest_file(path: &Path) -> anyhow::Result<(Sha256, u64)> {
    use sha2::Digest as _;
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((fleet_proto::hex::Hex(hasher.finalize().into()), size))
}

/// The `[artifacts.ARCH]` stanza to paste into a manifest.
pub fn stanza(arch: Arch, url: &str, packed: &Packed) -> String {
    format!(
        "[artifacts.{arch}]\nurl = \"{url}\"\nsha256 = \"{}\"\nsize = {}\n",
        packed.sha256, packed.size
    )
}
