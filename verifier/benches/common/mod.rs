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
    /// From spawn to accepting connections (state loaded, AKs prepared).
    pub ready_after: Duration,
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
    let started = Instant::now();
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
    Verifier {
        child,
        port,
        ready_after: started.elapsed(),
    }
}

/// The enrollment record of simulated node `i`.
fn node_record(i: usize, n: &SimNode) -> NodeRecord {
    let ek = n.ek.marshal();
    NodeRecord {
        node_id: ek_id(&ek),
        name: format!("sim-{i}"),
        labels: BTreeMap::new(),
        ek_public: hex::encode(&ek),
        ak_public: hex::encode(n.ak.marshal()),
        trust: "LoadGenerator".into(),
        enrolled_unix: 0,
    }
}

/// What a worker measured: latencies (ms), successes, errors.
pub type Tally = (Vec<f64>, u64, u64);

/// Adds up the workers' tallies.
pub async fn gather(tasks: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let (mut lat, mut ok, mut errs) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, o, e) = t.await.unwrap();
        lat.extend(l);
        ok += o;
        errs += e;
    }
    (lat, ok, errs)
}

/// The latency at a quantile (0..=1) of `lat`.
pub fn percentiles(mut lat: Vec<f64>) -> impl Fn(f64) -> f64 {
    lat.sort_by(|a, b| a.total_cmp(b));
    move |q: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(0.0)
    }
}

/// A timed run's result: the seconds measured (after the 2 s warm-up),
/// successes per second, and latency p50/p99 in ms.
pub struct Summary {
    pub secs: f64,
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
}

/// Sums up a run of `secs` seconds whose first 2 s were warm-up.
pub fn summarize(lat: Vec<f64>, ok: u64, secs: usize) -> Summary {
    let measured = (secs as f64 - 2.0).max(1.0);
    let p = percentiles(lat);
    Summary {
        secs: measured,
        rate: ok as f64 / measured,
        p50: p(0.5),
        p99: p(0.99),
    }
}

pub fn seed(dir: &std::path::Path, nodes: &[SimNode]) {
    let mut st = SqliteStore::open(&dir.join("state.db")).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let rec = node_record(i, n);
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
        .map(|(i, n)| CommitOp {
            node_id: node_record(i, n).node_id,
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
        })
        .collect();
    for chunk in ops.chunks(5000) {
        st.commit_batch(chunk).unwrap();
    }
}
