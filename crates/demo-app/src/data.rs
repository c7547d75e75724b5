//! `--data-dir DIR [--migrate]`: application data with a schema version, for the agent's
//! data-snapshot demos and tests. `DIR/schema` holds the schema number. This version reads
//! schema 1; with `--migrate` it reads schema 2 and migrates schema-1 data to it at start
//! (rewriting `schema`, adding `migrated-by` with its version). Data newer than it reads is
//! refused at start, as a real application would refuse a database a newer release migrated.

use std::fs;
use std::io;
use std::path::Path;

/// The schema this version reads.
pub fn supported(migrate: bool) -> u32 {
    if migrate { 2 } else { 1 }
}

/// Opens (creating at schema 1) the data in `dir`, migrating it when asked; returns the schema
/// it is at, or why this version cannot use it.
pub fn open(dir: &Path, migrate: bool, version: &str) -> Result<u32, String> {
    let schema_file = dir.join("schema");
    let io = |what: &str| {
        let what = format!("{what} {}", schema_file.display());
        move |e: io::Error| format!("cannot {what}: {e}")
    };
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let schema = match fs::read_to_string(&schema_file) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{} is not a schema number: {text:?}", schema_file.display()))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write(&schema_file, "1\n").map_err(io("write"))?;
            1
        }
        Err(e) => return Err(io("read")(e)),
    };
    let max = supported(migrate);
    if schema > max {
        return Err(format!(
            "data schema {schema} in {} is newer than this version reads ({max})",
            dir.display()
        ));
    }
    if migrate && schema < 2 {
        write(&dir.join("migrated-by"), &format!("{version}\n")).map_err(io("write"))?;
        write(&schema_file, "2\n").map_err(io("write"))?;
        return Ok(2);
    }
    Ok(schema)
}

fn write(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text)?;
    fs::File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_migrates_and_refuses_newer_data() {
        let tmp = std::env::temp_dir().join(format!("fleet-demo-data-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        assert_eq!(open(&tmp, false, "1.0.0"), Ok(1));
        assert_eq!(fs::read_to_string(tmp.join("schema")).unwrap(), "1\n");
        assert_eq!(open(&tmp, false, "1.0.0"), Ok(1));
        assert_eq!(open(&tmp, true, "2.0.0"), Ok(2));
        assert_eq!(
            fs::read_to_string(tmp.join("migrated-by")).unwrap(),
            "2.0.0\n"
        );
        assert_eq!(open(&tmp, true, "2.0.1"), Ok(2), "already migrated");
        let err = open(&tmp, false, "1.0.0").unwrap_err();
        assert!(
            err.contains("schema 2") && err.contains("reads (1)"),
            "{err}"
        );
        fs::write(tmp.join("schema"), "x").unwrap();
        assert!(
            open(&tmp, true, "2.0.0")
                .unwrap_err()
                .contains("not a schema number")
        );
        fs::remove_dir_all(&tmp).unwrap();
    }
}
