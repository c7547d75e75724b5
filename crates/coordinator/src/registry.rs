//! The registry in SQLite: devices, signed releases, desired states, rollouts with their waves,
//! assignments and baselines, the outbox of publishes, and the append-only audit trail.
//!
//! Durability contract: the driver writes one step's new state, its outbox messages and its
//! audit rows in one transaction ([`Store::commit`]) and publishes only after it committed.
//! On start the outbox is published again and every desired state is republished, so a crash
//! at any instant loses nothing that was decided.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use fleet_proto::device::Heartbeat;
use fleet_proto::hex::Sha256;
use fleet_proto::operator::{ActorKind, AuditEntry, AuditQuery};
use fleet_proto::release::Release;
use fleet_proto::trust::SignedRotation;
use fleet_proto::{DeviceId, RolloutId, SignedRelease, UnixMillis};
use rusqlite::{Connection, OptionalExtension, params};

use crate::baseline::Baseline;
use crate::engine::{Assignment, Rollout, Wave};
use crate::model::DeviceInfo;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("database row {what}: {detail}")]
    Corrupt { what: String, detail: String },
}

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
///
/// A device row keeps the core's view of the device ([`DeviceInfo`]) as JSON in `devices.info`:
/// a field added there with `#[serde(default)]` (e.g. `blue_green`, whether it can run a
/// blue-green release) needs no migration, and rows written before it read as its default.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        online INTEGER NOT NULL,
        quarantined INTEGER NOT NULL,
        last_seen INTEGER,
        info TEXT NOT NULL,
        heartbeat TEXT
    );
    CREATE TABLE releases (
        digest TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        counter INTEGER NOT NULL,
        signed TEXT NOT NULL,
        first_seen INTEGER NOT NULL
    );
    CREATE INDEX releases_by_counter ON releases(name, counter, version);
    CREATE TABLE desired (
        device TEXT PRIMARY KEY,
        sequence INTEGER NOT NULL,
        rollout TEXT,
        release_digest TEXT,
        report_interval_ms INTEGER NOT NULL,
        retry INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        release_digest TEXT NOT NULL,
        phase TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        core TEXT NOT NULL
    );
    CREATE TABLE waves (
        rollout TEXT NOT NULL,
        idx INTEGER NOT NULL,
        wave TEXT NOT NULL,
        PRIMARY KEY (rollout, idx)
    );
    CREATE TABLE baselines (
        rollout TEXT PRIMARY KEY,
        baseline TEXT NOT NULL
    );
    CREATE TABLE assignments (
        rollout TEXT NOT NULL,
        device TEXT NOT NULL,
        wave INTEGER NOT NULL,
        state TEXT NOT NULL,
        assignment TEXT NOT NULL,
        PRIMARY KEY (rollout, device)
    );
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        retain INTEGER NOT NULL
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at INTEGER NOT NULL,
        actor_kind TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        device TEXT,
        rollout TEXT,
        outcome TEXT NOT NULL
    );
    CREATE INDEX audit_by_device ON audit(device, id);
    CREATE INDEX audit_by_rollout ON audit(rollout, id);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    ",
    // 2: signed release-key rotations, in epoch order (published as the chain on fleet/v1/trust).
    "
    CREATE TABLE rotations (
        epoch INTEGER PRIMARY KEY,
        signed TEXT NOT NULL,
        added_at INTEGER NOT NULL
    );
    ",
    // 3: blue-green's hold in the desired state (republished on every start and reconnect, so
    // a restart must not drop it: the device would stop the old instance a rollback needs).
    "
    ALTER TABLE desired ADD COLUMN hold INTEGER NOT NULL DEFAULT 0;
    ",
];

/// One audit row to append.
#[derive(Clone, Debug)]
pub struct AuditRow {
    pub at: UnixMillis,
    pub actor: ActorKind,
    pub actor_name: String,
    pub action: String,
    pub device: Option<DeviceId>,
    pub rollout: Option<RolloutId>,
    pub outcome: String,
}

/// One message to publish after the commit.
#[derive(Clone, Debug)]
pub struct OutMsg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// A desired state as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredRow {
    pub device: DeviceId,
    pub sequence: u64,
    pub rollout: Option<RolloutId>,
    pub release: Option<Sha256>,
    pub report_interval: Duration,
    pub retry: u32,
    /// Blue-green: keep the previous instance warm (`Desired.hold`).
    pub hold: bool,
}

/// A device row: the core's view plus the latest full heartbeat.
#[derive(Clone, Debug)]
pub struct DeviceRow {
    pub info: DeviceInfo,
    pub heartbeat: Option<Heartbeat>,
}

/// Everything one commit writes.
#[derive(Debug, Default)]
pub struct Batch<'a> {
    pub devices: Vec<&'a DeviceRow>,
    pub releases: Vec<(Sha256, &'a Release, &'a SignedRelease)>,
    pub desired: Vec<DesiredRow>,
    pub rollouts: Vec<&'a Rollout>,
    /// `(rollout, device, assignment)` rows that changed.
    pub assignments: Vec<(&'a RolloutId, &'a DeviceId, &'a Assignment)>,
    pub audit: Vec<AuditRow>,
    pub outbox: Vec<OutMsg>,
    /// Outbox rows published since the last commit.
    pub published: Vec<i64>,
    /// Key rotations accepted since the last commit: `(epoch, signed)`.
    pub rotations: Vec<(u64, SignedRotation)>,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("registry rows serialise to JSON")
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

fn actor_str(a: ActorKind) -> &'static str {
    match a {
        ActorKind::Operator => "operator",
        ActorKind::Coordinator => "coordinator",
        ActorKind::Device => "device",
    }
}

/// The SQLite store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) and migrates the database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(open)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(open)?;
        let mut store = Store { conn };
        store.migrate()?;
        Ok(store)
    }

    /// A second, read-only connection (HTTP handlers).
    pub fn open_reader(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(Store { conn })
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let done: usize = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(done) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn load_devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, info, heartbeat FROM devices ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, info, hb) = row?;
            out.push(DeviceRow {
                info: parse(&format!("devices/{id}"), &info)?,
                heartbeat: match hb {
                    Some(h) => parse(&format!("devices/{id}/heartbeat"), &h)?,
                    None => None,
                },
            });
        }
        Ok(out)
    }

    pub fn load_releases(&self) -> Result<Vec<(Sha256, SignedRelease)>, StoreError> {
        let mut st = self.conn.prepare("SELECT digest, signed FROM releases")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (d, s) = row?;
            let digest: Sha256 =
                d.parse()
                    .map_err(|e: fleet_proto::hex::HexError| StoreError::Corrupt {
                        what: format!("releases/{d}"),
                        detail: e.to_string(),
                    })?;
            out.push((digest, parse(&format!("releases/{d}"), &s)?));
        }
        Ok(out)
    }

    /// Every stored key rotation, in epoch order.
    pub fn load_rotations(&self) -> Result<Vec<SignedRotation>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT epoch, signed FROM rotations ORDER BY epoch")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (epoch, s) = row?;
            out.push(parse(&format!("rotations/{epoch}"), &s)?);
        }
        Ok(out)
    }

    pub fn load_desired(&self) -> Result<Vec<DesiredRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT device, sequence, rollout, release_digest, report_interval_ms, retry, hold FROM desired",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, Option<String>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, bool>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (d, seq, rollout, digest, ms, retry, hold) = row?;
            let corrupt = |detail: String| StoreError::Corrupt {
                what: format!("desired/{d}"),
                detail,
            };
            out.push(DesiredRow {
                device: DeviceId::new(d.clone()).map_err(|e| corrupt(e.to_string()))?,
                sequence: seq as u64,
                rollout: rollout
                    .map(RolloutId::new)
                    .transpose()
                    .map_err(|e| corrupt(e.to_string()))?,
                release: digest
                    .map(|t| t.parse::<Sha256>())
                    .transpose()
                    .map_err(|e| corrupt(e.to_string()))?,
                report_interval: Duration::from_millis(ms as u64),
                retry: retry as u32,
                hold,
            });
        }
        Ok(out)
    }

    /// Every rollout with its waves, baseline and assignments.
    pub fn load_rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, core FROM rollouts ORDER BY seq")?;
        let rows: Vec<(String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for (id, core) in rows {
            let mut r: Rollout = parse(&format!("rollouts/{id}"), &core)?;
            let mut st = self
                .conn
                .prepare("SELECT wave FROM waves WHERE rollout = ?1 ORDER BY idx")?;
            let waves: Vec<String> = st
                .query_map([&id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            r.waves = waves
                .iter()
                .map(|w| parse::<Wave>(&format!("waves/{id}"), w))
                .collect::<Result<_, _>>()?;
            if let Some(b) = self
                .conn
                .query_row(
                    "SELECT baseline FROM baselines WHERE rollout = ?1",
                    [&id],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
            {
                r.baseline = parse::<Baseline>(&format!("baselines/{id}"), &b)?;
            }
            let mut st = self
                .conn
                .prepare("SELECT device, assignment FROM assignments WHERE rollout = ?1")?;
            let rows = st.query_map([&id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?;
            for row in rows {
                let (d, a) = row?;
                let dev = DeviceId::new(d.clone()).map_err(|e| StoreError::Corrupt {
                    what: format!("assignments/{id}/{d}"),
                    detail: e.to_string(),
                })?;
                r.devices
                    .insert(dev, parse(&format!("assignments/{id}/{d}"), &a)?);
            }
            // Counters are derived from the assignments; recompute them so they can never
            // disagree after a crash.
            r.recount();
            out.push(r);
        }
        Ok(out)
    }

    pub fn next_rollout_seq(&self) -> Result<u64, StoreError> {
        let n: Option<i64> = self
            .conn
            .query_row("SELECT MAX(seq) FROM rollouts", [], |r| r.get(0))?;
        Ok(n.unwrap_or(0) as u64 + 1)
    }

    pub fn pending_outbox(&self) -> Result<Vec<(i64, OutMsg)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT id, topic, payload, retain FROM outbox ORDER BY id")?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                OutMsg {
                    topic: r.get(1)?,
                    payload: r.get(2)?,
                    retain: r.get::<_, i64>(3)? != 0,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes one batch atomically; returns the outbox ids of the new messages, in order.
    pub fn commit(&mut self, b: &Batch<'_>, now: UnixMillis) -> Result<Vec<i64>, StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO devices (id, online, quarantined, last_seen, info, heartbeat)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET online = ?2, quarantined = ?3, last_seen = ?4,
                   info = ?5, heartbeat = ?6",
            )?;
            for d in &b.devices {
                st.execute(params![
                    d.info.id.as_str(),
                    d.info.online,
                    d.info.quarantined.is_some(),
                    d.info.last_seen.map(|t| t.0 as i64),
                    json(&d.info),
                    d.heartbeat.as_ref().map(json),
                ])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO rotations (epoch, signed, added_at) VALUES (?1, ?2, ?3)",
            )?;
            for (epoch, signed) in &b.rotations {
                st.execute(params![*epoch as i64, json(signed), now.0 as i64])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO releases (digest, name, version, counter, signed, first_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for (digest, r, s) in &b.releases {
                st.execute(params![
                    digest.to_string(),
                    r.name,
                    r.version,
                    r.counter as i64,
                    json(s),
                    now.0 as i64
                ])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO desired (device, sequence, rollout, release_digest, report_interval_ms, retry, updated_at, hold)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(device) DO UPDATE SET sequence = ?2, rollout = ?3, release_digest = ?4,
                   report_interval_ms = ?5, retry = ?6, updated_at = ?7, hold = ?8",
            )?;
            for d in &b.desired {
                st.execute(params![
                    d.device.as_str(),
                    d.sequence as i64,
                    d.rollout.as_ref().map(|r| r.to_string()),
                    d.release.map(|r| r.to_string()),
                    d.report_interval.as_millis() as i64,
                    i64::from(d.retry),
                    now.0 as i64,
                    d.hold
                ])?;
            }
            for r in &b.rollouts {
                let id = r.id.as_str();
                let seq: i64 = id
                    .strip_prefix("r-")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                tx.execute(
                    "INSERT INTO rollouts (id, seq, release_digest, phase, status, created_at, updated_at, core)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT(id) DO UPDATE SET phase = ?4, status = ?5, updated_at = ?7, core = ?8",
                    params![
                        id,
                        seq,
                        r.digest.to_string(),
                        r.phase.to_string(),
                        r.status.to_string(),
                        r.created_at.0 as i64,
                        now.0 as i64,
                        json(r)
                    ],
                )?;
                tx.execute(
                    "INSERT OR IGNORE INTO baselines (rollout, baseline) VALUES (?1, ?2)",
                    params![id, json(&r.baseline)],
                )?;
                let mut st = tx.prepare_cached(
                    "INSERT INTO waves (rollout, idx, wave) VALUES (?1, ?2, ?3)
                     ON CONFLICT(rollout, idx) DO UPDATE SET wave = ?3",
                )?;
                for (i, w) in r.waves.iter().enumerate() {
                    st.execute(params![id, i as i64, json(w)])?;
                }
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO assignments (rollout, device, wave, state, assignment) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(rollout, device) DO UPDATE SET state = ?4, assignment = ?5",
            )?;
            for (r, d, a) in &b.assignments {
                st.execute(params![
                    r.as_str(),
                    d.as_str(),
                    i64::from(a.wave),
                    json(&a.state),
                    json(a)
                ])?;
            }
            let mut st = tx.prepare_cached(
                "INSERT INTO audit (at, actor_kind, actor, action, device, rollout, outcome)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for a in &b.audit {
                st.execute(params![
                    a.at.0 as i64,
                    actor_str(a.actor),
                    a.actor_name,
                    a.action,
                    a.device.as_ref().map(|d| d.to_string()),
                    a.rollout.as_ref().map(|r| r.to_string()),
                    a.outcome
                ])?;
            }
            let mut st = tx.prepare_cached("DELETE FROM outbox WHERE id = ?1")?;
            for id in &b.published {
                st.execute([id])?;
            }
        }
        let mut ids = Vec::with_capacity(b.outbox.len());
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO outbox (topic, payload, retain) VALUES (?1, ?2, ?3)",
            )?;
            for m in &b.outbox {
                st.execute(params![m.topic, m.payload, m.retain])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    pub fn audit(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = i64::from(q.limit.unwrap_or(1000).min(100_000));
        let mut st = self.conn.prepare(
            "SELECT id, at, actor_kind, actor, action, device, rollout, outcome FROM audit
             WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR rollout = ?2) AND at >= ?3
             ORDER BY id DESC LIMIT ?4",
        )?;
        let rows = st.query_map(
            params![
                q.device.as_ref().map(|d| d.to_string()),
                q.rollout.as_ref().map(|r| r.to_string()),
                q.since.map_or(0, |t| t.0 as i64),
                limit
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                    r.get::<_, String>(7)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, at, kind, actor, action, device, rollout, outcome) = row?;
            out.push(AuditEntry {
                id: id as u64,
                at: UnixMillis(at as u64),
                actor: match kind.as_str() {
                    "operator" => ActorKind::Operator,
                    "device" => ActorKind::Device,
                    _ => ActorKind::Coordinator,
                },
                actor_name: actor,
                action,
                device: device.and_then(|d| DeviceId::new(d).ok()),
                rollout: rollout.and_then(|r| RolloutId::new(r).ok()),
                outcome,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Executes raw SQL (tests: proving the audit trail is append-only).
    pub fn execute_raw(&self, sql: &str) -> Result<usize, StoreError> {
        Ok(self.conn.execute(sql, [])?)
    }

    pub fn device_rows(&self) -> Result<HashMap<DeviceId, DeviceRow>, StoreError> {
        Ok(self
            .load_devices()?
            .into_iter()
            .map(|d| (d.info.id.clone(), d))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_keeps_audit_append_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        let b = Batch {
            audit: vec![AuditRow {
                at: UnixMillis(1),
                actor: ActorKind::Operator,
                actor_name: "ana".into(),
                action: "quarantine".into(),
                device: Some(DeviceId::new("d1").unwrap()),
                rollout: None,
                outcome: "done".into(),
            }],
            ..Batch::default()
        };
        s.commit(&b, UnixMillis(1)).unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        let rows = s
            .audit(&AuditQuery {
                device: Some(DeviceId::new("d1").unwrap()),
                ..AuditQuery::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].actor_name, "ana");
        let e = s.execute_raw("DELETE FROM audit").unwrap_err().to_string();
        assert!(e.contains("append-only"), "{e}");
        let e = s
            .execute_raw("UPDATE audit SET outcome = 'x'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("append-only"), "{e}");
    }

    /// Whether a device can run blue-green survives a restart in each of its three states, and
    /// a device row written before the field existed (here by a schema-1 registry, then
    /// migrated) reads as Unknown: the checklist names it without refusing the plan.
    #[test]
    fn devices_keep_whether_they_can_run_blue_green_and_older_rows_read_as_unknown() {
        use fleet_proto::device::BlueGreenSupport;

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        let mut old = DeviceInfo::new(DeviceId::new("old").unwrap());
        old.highest_counter = 7;
        {
            let conn = Connection::open(&p).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            let mut info = serde_json::to_value(&old).unwrap();
            assert!(info.as_object_mut().unwrap().remove("blue_green").is_some());
            conn.execute(
                "INSERT INTO devices (id, online, quarantined, last_seen, info, heartbeat)
                 VALUES ('old', 0, 0, NULL, ?1, NULL)",
                [info.to_string()],
            )
            .unwrap();
        }
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        let rows = s.device_rows().unwrap();
        assert_eq!(rows[&old.id].info.blue_green, BlueGreenSupport::Unknown);
        assert_eq!(rows[&old.id].info, old);

        let supports = [
            BlueGreenSupport::Supported,
            BlueGreenSupport::Unsupported {
                why: "blue-green needs a traffic switch on this device".into(),
            },
            BlueGreenSupport::Unknown,
        ];
        let rows: Vec<DeviceRow> = supports
            .iter()
            .enumerate()
            .map(|(i, support)| {
                let mut info = DeviceInfo::new(DeviceId::new(format!("d{i}")).unwrap());
                info.blue_green = support.clone();
                DeviceRow {
                    info,
                    heartbeat: None,
                }
            })
            .collect();
        let b = Batch {
            devices: rows.iter().collect(),
            ..Batch::default()
        };
        s.commit(&b, UnixMillis(1)).unwrap();
        drop(s);
        let loaded = Store::open(&p).unwrap().device_rows().unwrap();
        for r in &rows {
            assert_eq!(loaded[&r.info.id].info.blue_green, r.info.blue_green);
        }
    }

    fn desired(device: &str, sequence: u64, hold: bool) -> DesiredRow {
        DesiredRow {
            device: DeviceId::new(device).unwrap(),
            sequence,
            rollout: Some(RolloutId::new("r-1").unwrap()),
            release: Some(Sha256::of(b"2.0")),
            report_interval: Duration::from_secs(10),
            retry: 0,
            hold,
        }
    }

    /// A restart republishes the stored desired states: blue-green's hold must survive it, or
    /// the devices would stop the old instances a rollback of their wave switches back to.
    #[test]
    fn desired_states_keep_their_hold_across_a_restart_and_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.db");
        // A registry written before hold existed (schema 2), with one desired state.
        {
            let conn = Connection::open(&p).unwrap();
            for (i, m) in MIGRATIONS.iter().take(2).enumerate() {
                conn.execute_batch(m).unwrap();
                conn.pragma_update(None, "user_version", i + 1).unwrap();
            }
            conn.execute(
                "INSERT INTO desired (device, sequence, rollout, release_digest, report_interval_ms, retry, updated_at)
                 VALUES ('old', 3, 'r-1', ?1, 10000, 0, 1)",
                [Sha256::of(b"2.0").to_string()],
            )
            .unwrap();
        }
        let mut s = Store::open(&p).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS.len());
        assert_eq!(s.load_desired().unwrap(), vec![desired("old", 3, false)]);
        let b = Batch {
            desired: vec![desired("held", 7, true), desired("old", 4, false)],
            ..Batch::default()
        };
        s.commit(&b, UnixMillis(2)).unwrap();
        drop(s);
        let s = Store::open(&p).unwrap();
        let mut rows = s.load_desired().unwrap();
        rows.sort_by(|a, b| a.device.cmp(&b.device));
        assert_eq!(
            rows,
            vec![desired("held", 7, true), desired("old", 4, false)]
        );
        // Released: the same device, a higher sequence, no hold.
        let mut s = s;
        let b = Batch {
            desired: vec![desired("held", 8, false)],
            ..Batch::default()
        };
        s.commit(&b, UnixMillis(3)).unwrap();
        let rows = s.load_desired().unwrap();
        assert!(rows.contains(&desired("held", 8, false)), "{rows:?}");
    }
}
