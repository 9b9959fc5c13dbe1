//! Shared by the verifier's bench binaries: start a `vouch-verifier`
//! process on free ports, seed enrolled simulated nodes, read RSS.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vouch_verifier::enroll::ek_id;
use vouch_verifier::simnode::SimNode;
use vouch_verifier::store::{NodeRecord, SqliteStore, Store};

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

pub struct Verifier {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_verifier(dir: &std::path::Path, digest: &str) -> Verifier {
    let pdir = dir.join("policies");
    std::fs::create_dir_all(&pdir).unwrap();
    std::fs::write(
        pdir.join("p.yaml"),
        format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: p\nspec:\n  trustedDaprd:\n    - sha256: {digest}\n  posture:\n    requireMtls: true\n"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_vouch-verifier"))
        .arg("serve")
        .env("VOUCH_VERIFIER_LISTEN", format!("127.0.0.1:{port}"))
        .env("VOUCH_VERIFIER_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("VOUCH_VERIFIER_STATE_DIR", dir)
        .env("VOUCH_VERIFIER_POLICY_DIR", &pdir)
        .env("VOUCH_VERIFIER_STALE_AFTER_MS", "600000")
        .env("VOUCH_VERIFIER_CREDENTIAL_FRESH_MS", "600000")
        .env("VOUCH_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "verifier did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Verifier { child, port }
}

pub fn seed(dir: &std::path::Path, nodes: &[SimNode]) {
    let mut st = SqliteStore::open(&dir.join("state.db")).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let ek = n.ek.marshal();
        let rec = NodeRecord {
            node_id: ek_id(&ek),
            name: format!("sim-{i}"),
            labels: BTreeMap::new(),
            ek_public: hex::encode(&ek),
            ak_public: hex::encode(n.ak.marshal()),
            trust: "LoadGenerator".into(),
            enrolled_unix: 0,
        };
        st.put_node(
            &rec,
            &serde_json::json!({"event": "seeded by load generator"}),
        )
        .unwrap();
    }
}

/// Gives every seeded node a continuation state with `instances` current
/// daprd measurements (what a busy node's state costs in memory).
pub fn seed_state(dir: &std::path::Path, nodes: &[SimNode], instances: u32) {
    use std::sync::Arc;
    use vouch_verifier::simnode::sample_measurement;
    use vouch_verifier::store::{CommitOp, StoredState};
    let mut st = SqliteStore::open(&dir.join("state.db")).unwrap();
    let ops: Vec<CommitOp> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let ek = n.ek.marshal();
            CommitOp {
                node: NodeRecord {
                    node_id: ek_id(&ek),
                    name: format!("sim-{i}"),
                    labels: BTreeMap::new(),
                    ek_public: hex::encode(&ek),
                    ak_public: hex::encode(n.ak.marshal()),
                    trust: "LoadGenerator".into(),
                    enrolled_unix: 0,
                },
                state: Some(StoredState {
                    boot: Some((1, 0)),
                    runtime_pcr: 13,
                    next_seq: u64::from(instances) + 1,
                    pcr: "00".repeat(32),
                    integrity_lost: None,
                    instances: (0..instances)
                        .map(|k| {
                            Arc::new(sample_measurement(
                                100 + k,
                                &format!("app-{k}"),
                                &"1".repeat(64),
                                4026531840 + u64::from(k),
                            ))
                        })
                        .collect(),
                    anomalies: Vec::new(),
                }),
                verdicts: Default::default(),
                write: vouch_verifier::store::VerdictWrite::Full,
                now_ms: 0,
                audit: serde_json::json!({"event": "seeded by load generator"}),
            }
        })
        .collect();
    for chunk in ops.chunks(5000) {
        st.commit_batch(chunk).unwrap();
    }
}
