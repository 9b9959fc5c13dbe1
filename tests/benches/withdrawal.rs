//! Impostor -> withdrawal, end to end on swtpm (release build first:
//! `cargo build --release --workspace --bins && cargo bench -p vouch-tests --bench withdrawal`).
//!
//! An affirmed stand-in daprd holds credentials (a Workload API stream and
//! a Sentry token file written by vouchd). Each run starts an impostor — a
//! second stand-in daprd (binary already hashed) in the same network
//! namespace — and measures from just before its spawn until vouchd has
//! withdrawn the affirmed sidecar's credentials (its token file is gone,
//! which vouchd does on receiving the contraindicated verdict): the whole
//! chain of exec event -> measurement -> log + PCR extend -> coalesced
//! quote -> verifier appraisal -> verdict -> withdrawal. Then the impostor
//! is killed and the bench waits until credentials are back. Prints
//! p50/p99/max over VOUCH_WITHDRAW_RUNS runs (default 200), and checks
//! that no impostor ever received an SVID.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::time::{Duration, Instant};

use vouch_tests::netns::Netns;
use vouch_tests::stack::{wait_verdict, Env};

fn main() {
    let runs: usize = std::env::var("VOUCH_WITHDRAW_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let env = Env::new().expect("swtpm, ip and sha256sum are needed");
    let dir = env.dir();
    let wl = env.workload_socket();
    let token = dir.join("orders.jwt");
    let rep = dir.join("orders.jsonl");
    let imp_rep = dir.join("impostors.jsonl");
    let ns = Netns::new().unwrap();
    let good = env.standin_env(
        &ns,
        "orders",
        &[],
        &[
            ("STANDIN_WORKLOAD_SOCKET", wl.to_str().unwrap()),
            ("STANDIN_RETRY_MS", "50"),
            ("STANDIN_REPORT", rep.to_str().unwrap()),
            ("DAPR_SENTRY_TOKEN_FILE", token.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), good.pid(), "affirming");
    let wait_token = |present: bool, limit: Duration| -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if token.exists() == present {
                return Some(Instant::now());
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    assert!(
        wait_token(true, Duration::from_secs(15)).is_some(),
        "no token"
    );
    let mut lat = Vec::with_capacity(runs);
    for i in 0..runs {
        let t0 = Instant::now();
        let imp = env.standin_env(
            &ns,
            "impostor",
            &["--dapr-http-port", "3600", "--dapr-grpc-port", "50002"],
            &[
                ("STANDIN_WORKLOAD_SOCKET", wl.to_str().unwrap()),
                ("STANDIN_RETRY_MS", "20"),
                ("STANDIN_REPORT", imp_rep.to_str().unwrap()),
            ],
        );
        let gone = wait_token(false, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("run {i}: credentials were not withdrawn"));
        lat.push((gone - t0).as_secs_f64() * 1e3);
        drop(imp);
        // Back to affirming: the token is written again.
        assert!(
            wait_token(true, Duration::from_secs(20)).is_some(),
            "run {i}: credentials did not come back"
        );
    }
    let imp_svids = std::fs::read_to_string(&imp_rep)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"event\":\"x509\""))
        .count();
    assert_eq!(imp_svids, 0, "an impostor received an SVID");
    let mut s = lat.clone();
    s.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| s[((s.len() - 1) as f64 * q) as usize];
    println!(
        "impostor (second daprd in the namespace) -> affirmed sidecar's credentials withdrawn at vouchd: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {runs} runs on swtpm; impostors never received an SVID",
        p(0.5),
        p(0.99),
        s[s.len() - 1]
    );
}
