//! SVID issuance for an attested caller through vouchd, end to end on
//! swtpm (release build first:
//! `cargo build --release --workspace --bins && cargo bench -p vouch-tests --bench issuance`).
//!
//! An affirmed stand-in daprd calls vouchd's attesting Dapr Sentry endpoint
//! (`SignCertificate` over TLS on the unix socket) VOUCH_ISSUE_N times
//! (default 20,000), 32 in flight: each call is identified by the kernel
//! (SO_PEERCRED + pidfd), checked against the instance's verdict, signed by
//! the verifier over gRPC/TLS, re-checked, and answered. Stand-in, vouchd,
//! verifier and swtpm share the machine's 2 cores.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::time::{Duration, Instant};

use vouch_tests::netns::Netns;
use vouch_tests::stack::{wait_verdict, Env};

fn main() {
    let n: usize = std::env::var("VOUCH_ISSUE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let env = Env::new().expect("swtpm, ip and sha256sum are needed");
    let dir = env.dir();
    let anchors = std::fs::read_to_string(env.bundle()).unwrap();
    let rep = dir.join("burst.jsonl");
    let ns = Netns::new().unwrap();
    let sentry = format!("unix://{}", env.sentry_socket().display());
    let nstr = n.to_string();
    let caller = env.standin_env(
        &ns,
        "orders",
        &["--sentry-address", &sentry],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("STANDIN_RETRY_MS", "200"),
            ("STANDIN_SENTRY_BURST", &nstr),
            ("STANDIN_REPORT", rep.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), caller.pid(), "affirming");
    let deadline = Instant::now() + Duration::from_secs(600);
    let v = loop {
        let found = std::fs::read_to_string(&rep)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "burst");
        if let Some(v) = found {
            break v;
        }
        assert!(Instant::now() < deadline, "no burst result");
        std::thread::sleep(Duration::from_millis(100));
    };
    let ok = v["ok"].as_u64().unwrap();
    let secs = v["secs"].as_f64().unwrap();
    assert_eq!(v["denied"], 0, "{v}");
    println!(
        "SVID issuance for an attested daprd through vouchd's Sentry endpoint (kernel identification, verdict check, verifier signing over gRPC/TLS): {:.0} certificates/s ({ok} in {secs:.2} s, 32 in flight; everything on the same 2 cores)",
        ok as f64 / secs
    );
}
