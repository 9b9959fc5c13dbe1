//! Durable verifier state behind a storage interface: nodes and their AKs,
//! per-boot continuation state, each sidecar's current verdict and its
//! history, and an audit log of every decision. SQLite by default (one
//! file, WAL); the SQL is kept portable so a PostgreSQL backend can follow.
//!
//! Trust boundary: the database is the verifier's own; a verdict change is
//! committed before it is acted on.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use vouch_proto::measurement::{Anomaly, Measurement};

use crate::appraise::{NodeState, SidecarVerdict};

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("state database: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored row does not decode.
    #[error("state database row {what}: {reason}")]
    Corrupt {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
}

/// An enrolled node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node id: hex SHA-256 of the EK public area.
    pub node_id: String,
    /// Node name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// TPMT_PUBLIC of the EK (hex).
    pub ek_public: String,
    /// TPMT_PUBLIC of the AK (hex).
    pub ak_public: String,
    /// How the EK was trusted.
    pub trust: String,
    /// Enrollment time, Unix seconds.
    pub enrolled_unix: u64,
}

/// The serializable part of [`NodeState`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredState {
    /// (resetCount, restartCount).
    pub boot: Option<(u32, u32)>,
    /// Runtime PCR index.
    pub runtime_pcr: u8,
    /// Next sequence number due.
    pub next_seq: u64,
    /// PCR value (hex).
    pub pcr: String,
    /// Integrity lost reason.
    pub integrity_lost: Option<String>,
    /// Current instances (shared with the in-memory state).
    pub instances: Vec<std::sync::Arc<Measurement>>,
    /// Current anomalies.
    pub anomalies: Vec<Anomaly>,
}

impl StoredState {
    /// Extracts the durable part of a node state.
    pub fn of(s: &NodeState) -> Self {
        Self {
            boot: s.boot,
            runtime_pcr: s.runtime_pcr,
            next_seq: s.next_seq,
            pcr: hex::encode(s.pcr),
            integrity_lost: s.integrity_lost.clone(),
            instances: s.instances.values().cloned().collect(),
            anomalies: s.anomalies.clone(),
        }
    }

    /// Applies it onto a freshly enrolled node state.
    pub fn apply(&self, s: &mut NodeState) {
        s.boot = self.boot;
        s.runtime_pcr = self.runtime_pcr;
        s.next_seq = self.next_seq;
        if let Ok(b) = hex::decode(&self.pcr) {
            if let Ok(a) = <[u8; 32]>::try_from(b.as_slice()) {
                s.pcr = a;
            }
        }
        s.integrity_lost = self.integrity_lost.clone();
        s.instances = self.instances.iter().map(|m| (m.id, m.clone())).collect();
        s.anomalies = self.anomalies.clone();
    }
}

/// A sidecar's stored verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerdictRow {
    /// Node id.
    pub node_id: String,
    /// Node name.
    pub node_name: String,
    /// Instance (pid@start).
    pub instance: String,
    /// App id.
    pub app_id: Option<String>,
    /// Namespace.
    pub namespace: String,
    /// Verdict.
    pub verdict: String,
    /// Reasons (JSON).
    pub reasons: serde_json::Value,
    /// Last written (a change, or a refresh of unchanged verdicts at most
    /// once a minute), Unix ms.
    pub updated_ms: u64,
}

/// How a commit writes the node's verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerdictWrite {
    /// Verdict rows, history of changes and all.
    Full,
    /// Same verdicts and reasons as the previous commit: only their
    /// freshness (`updated_ms`; the service writes it at most once a
    /// minute per node).
    Refresh,
    /// Nothing about verdicts (refused, stale evidence): audit only.
    AuditOnly,
}

/// One accepted appraisal (or staleness decision) to make durable.
#[derive(Debug, Clone)]
pub struct CommitOp {
    /// The node's id.
    pub node_id: String,
    /// New continuation state (None: unchanged).
    pub state: Option<StoredState>,
    /// The node's sidecar verdicts now.
    pub verdicts: std::sync::Arc<Vec<SidecarVerdict>>,
    /// How much of `verdicts` to write.
    pub write: VerdictWrite,
    /// Time of the decision.
    pub now_ms: u64,
    /// Audit record.
    pub audit: serde_json::Value,
}

/// The storage interface.
pub trait Store: Send {
    /// Every enrolled node with its stored state.
    fn load(&self) -> Result<Vec<(NodeRecord, Option<StoredState>)>, StoreError>;
    /// Inserts or replaces a node (re-enrollment) and audits it.
    fn put_node(&mut self, n: &NodeRecord, audit: &serde_json::Value) -> Result<(), StoreError>;
    /// Commits appraisals (state, verdicts, history of changes, audit) in
    /// one transaction (group commit).
    fn commit_batch(&mut self, ops: &[CommitOp]) -> Result<(), StoreError>;
    /// Current verdicts of every sidecar.
    fn verdicts(&self) -> Result<Vec<VerdictRow>, StoreError>;
}

/// SQLite-backed store.
pub struct SqliteStore {
    conn: Connection,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS nodes (
  node_id TEXT PRIMARY KEY,
  record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS node_state (
  node_id TEXT PRIMARY KEY REFERENCES nodes(node_id),
  state TEXT NOT NULL,
  updated_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
  node_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  app_id TEXT,
  namespace TEXT NOT NULL,
  verdict TEXT NOT NULL,
  reasons TEXT NOT NULL,
  updated_ms BIGINT NOT NULL,
  PRIMARY KEY (node_id, instance)
);
CREATE TABLE IF NOT EXISTS verdict_history (
  node_id TEXT NOT NULL,
  instance TEXT NOT NULL,
  verdict TEXT NOT NULL,
  reasons TEXT NOT NULL,
  at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
  at_ms BIGINT NOT NULL,
  node_id TEXT,
  detail TEXT NOT NULL
);
";

impl SqliteStore {
    /// Opens (creating) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Keep the working set (node states, verdicts) in SQLite's page cache
        // (64 MiB at most): the default 2 MiB made every group commit re-read
        // pages through the kernel.
        conn.pragma_update(None, "cache_size", -65536)?;
        // Checkpoint the WAL into the database every ~40 MB instead of every
        // ~4 MB: a node's pages are rewritten many times between checkpoints
        // and each checkpoint copies them once (it took a quarter of the
        // writer's CPU at the default). Recovery replays at most that much.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    /// Opens read-only (operator CLI).
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        Ok(Self { conn })
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

/// Prefix of node states stored as base64(postcard): about a quarter of
/// the JSON's size, which matters because every accepted evidence with new
/// events rewrites its node's row. Rows without it are JSON (written by
/// earlier versions) and still load. A change to [`StoredState`]'s fields
/// needs a new prefix (postcard is not self-describing).
const STATE_V1: &str = "b1:";

fn encode_state(st: &StoredState) -> Result<String, StoreError> {
    use base64::Engine as _;
    let bin = postcard::to_allocvec(st).map_err(|e| corrupt("node state", e))?;
    let mut out = String::with_capacity(STATE_V1.len() + bin.len() * 4 / 3 + 4);
    out.push_str(STATE_V1);
    base64::engine::general_purpose::STANDARD_NO_PAD.encode_string(&bin, &mut out);
    Ok(out)
}

fn decode_state(id: &str, s: &str) -> Result<StoredState, StoreError> {
    use base64::Engine as _;
    let what = format!("node_state/{id}");
    match s.strip_prefix(STATE_V1) {
        Some(b64) => {
            let bin = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(b64)
                .map_err(|e| corrupt(&what, e))?;
            postcard::from_bytes(&bin).map_err(|e| corrupt(&what, e))
        }
        None => serde_json::from_str(s).map_err(|e| corrupt(&what, e)),
    }
}

fn apply_commit(tx: &rusqlite::Transaction<'_>, op: &CommitOp) -> Result<(), StoreError> {
    let (node_id, state, verdicts, now_ms, audit) = (
        &op.node_id,
        op.state.as_ref(),
        &op.verdicts,
        op.now_ms,
        &op.audit,
    );
    // Statements are prepared once per connection (cached); the SQL is
    // portable (UPSERT works in SQLite and PostgreSQL alike).
    if let Some(st) = state {
        let s = encode_state(st)?;
        tx.prepare_cached(
            "INSERT INTO node_state (node_id, state, updated_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (node_id) DO UPDATE SET state = excluded.state, updated_ms = excluded.updated_ms",
        )?
        .execute(params![node_id, s, now_ms as i64])?;
    }
    if op.write != VerdictWrite::Full {
        if op.write == VerdictWrite::Refresh {
            tx.prepare_cached("UPDATE verdicts SET updated_ms = ?1 WHERE node_id = ?2")?
                .execute(params![now_ms as i64, node_id])?;
        }
        tx.prepare_cached("INSERT INTO audit (at_ms, node_id, detail) VALUES (?1, ?2, ?3)")?
            .execute(params![now_ms as i64, node_id, audit.to_string()])?;
        return Ok(());
    }
    let live: Vec<String> = verdicts.iter().map(|v| v.id.to_string()).collect();
    // Sidecars that are gone lose their verdict row; the previous verdicts
    // decide what enters the history.
    let stored: Vec<(String, String)> = tx
        .prepare_cached("SELECT instance, verdict FROM verdicts WHERE node_id = ?1")?
        .query_map(params![node_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (inst, _) in stored.iter().filter(|(i, _)| !live.contains(i)) {
        tx.prepare_cached("DELETE FROM verdicts WHERE node_id = ?1 AND instance = ?2")?
            .execute(params![node_id, inst])?;
    }
    for (v, inst) in verdicts.iter().zip(&live) {
        let reasons = serde_json::to_string(&v.reasons).map_err(|e| corrupt("reasons", e))?;
        let prev = stored
            .iter()
            .find(|(i, _)| i == inst)
            .map(|(_, v)| v.as_str());
        let now_v = v.verdict.as_str();
        if prev != Some(now_v) {
            tx.prepare_cached(
                "INSERT INTO verdict_history (node_id, instance, verdict, reasons, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![node_id, inst, now_v, reasons, now_ms as i64])?;
        }
        tx.prepare_cached(
            "INSERT INTO verdicts (node_id, instance, app_id, namespace, verdict, reasons, updated_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (node_id, instance) DO UPDATE SET app_id = excluded.app_id, \
             namespace = excluded.namespace, verdict = excluded.verdict, \
             reasons = excluded.reasons, updated_ms = excluded.updated_ms",
        )?
        .execute(params![node_id, inst, v.app_id, v.namespace, now_v, reasons, now_ms as i64])?;
    }
    tx.prepare_cached("INSERT INTO audit (at_ms, node_id, detail) VALUES (?1, ?2, ?3)")?
        .execute(params![now_ms as i64, node_id, audit.to_string()])?;
    Ok(())
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Vec<(NodeRecord, Option<StoredState>)>, StoreError> {
        // One query for all nodes with their states (not one per node).
        let mut stmt = self.conn.prepare(
            "SELECT n.node_id, n.record, s.state FROM nodes n \
             LEFT JOIN node_state s ON s.node_id = n.node_id ORDER BY n.node_id",
        )?;
        let rows: Vec<(String, String, Option<String>)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, rec, state) in rows {
            let record: NodeRecord =
                serde_json::from_str(&rec).map_err(|e| corrupt(&format!("nodes/{id}"), e))?;
            let state = match state {
                Some(s) => Some(decode_state(&id, &s)?),
                None => None,
            };
            out.push((record, state));
        }
        Ok(out)
    }

    fn put_node(&mut self, n: &NodeRecord, audit: &serde_json::Value) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        let rec = serde_json::to_string(n).map_err(|e| corrupt("node record", e))?;
        tx.execute("DELETE FROM nodes WHERE node_id = ?1", params![n.node_id])?;
        tx.execute(
            "INSERT INTO nodes (node_id, record) VALUES (?1, ?2)",
            params![n.node_id, rec],
        )?;
        tx.execute(
            "DELETE FROM node_state WHERE node_id = ?1",
            params![n.node_id],
        )?;
        tx.execute(
            "INSERT INTO audit (at_ms, node_id, detail) VALUES (?1, ?2, ?3)",
            params![n.enrolled_unix as i64 * 1000, n.node_id, audit.to_string()],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn commit_batch(&mut self, ops: &[CommitOp]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        for op in ops {
            apply_commit(&tx, op)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn verdicts(&self) -> Result<Vec<VerdictRow>, StoreError> {
        let names: BTreeMap<String, String> = self
            .load()?
            .into_iter()
            .map(|(r, _)| (r.node_id.clone(), r.name))
            .collect();
        let mut stmt = self.conn.prepare(
            "SELECT node_id, instance, app_id, namespace, verdict, reasons, updated_ms FROM verdicts ORDER BY node_id, instance",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let node_id: String = r.get(0)?;
                let reasons: String = r.get(5)?;
                Ok(VerdictRow {
                    node_name: names.get(&node_id).cloned().unwrap_or_default(),
                    node_id,
                    instance: r.get(1)?,
                    app_id: r.get(2)?,
                    namespace: r.get(3)?,
                    verdict: r.get(4)?,
                    reasons: serde_json::from_str(&reasons).unwrap_or(serde_json::Value::Null),
                    updated_ms: r.get::<_, i64>(6)? as u64,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::simnode::sample_measurement;

    fn sample() -> StoredState {
        StoredState {
            boot: Some((3, 1)),
            runtime_pcr: 14,
            next_seq: 42,
            pcr: "ab".repeat(32),
            integrity_lost: None,
            instances: vec![
                std::sync::Arc::new(sample_measurement(10, "orders", &"1".repeat(64), 100)),
                std::sync::Arc::new(sample_measurement(11, "billing", &"2".repeat(64), 101)),
            ],
            anomalies: Vec::new(),
        }
    }

    fn same(a: &StoredState, b: &StoredState) -> bool {
        serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap()
    }

    #[test]
    fn node_state_round_trips_and_legacy_json_still_loads() {
        let st = sample();
        let enc = encode_state(&st).unwrap();
        assert!(enc.starts_with(STATE_V1));
        let json = serde_json::to_string(&st).unwrap();
        assert!(
            enc.len() * 2 < json.len(),
            "{} vs {}",
            enc.len(),
            json.len()
        );
        assert!(same(&decode_state("n", &enc).unwrap(), &st));
        assert!(same(&decode_state("n", &json).unwrap(), &st));
        // Damage is reported as corruption of that node's row, not a panic.
        let bad = format!("{STATE_V1}{}", &enc[STATE_V1.len() + 8..]);
        match decode_state("node-7", &bad) {
            Err(StoreError::Corrupt { what, .. }) => assert_eq!(what, "node_state/node-7"),
            other => panic!("{other:?}"),
        }
    }
}
