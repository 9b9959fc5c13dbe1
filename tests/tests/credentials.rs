//! End to end: credentials only for attested sidecars. swtpm + vouchd +
//! vouch-verifier + stand-in daprds, with clients and checkers nobody here
//! wrote where it matters (openssl, Python's ssl, PyJWT).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin};
use vouch_tests::stack::{wait_verdict, Env};

const SENTRY_ID: &str = "spiffe://localhost/ns/default/dapr-sentry";

fn report(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits for a report line whose "event" is `event` (after `skip` lines).
fn wait_event(path: &Path, event: &str, skip: usize, secs: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = report(path)
            .into_iter()
            .skip(skip)
            .find(|v| v["event"] == event)
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {event} in {}: {:?}",
            path.display(),
            report(path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The URI SANs of a PEM certificate, read by openssl.
fn uri_sans(dir: &Path, pem: &str) -> Vec<String> {
    let p = dir.join(format!("cert-{}.pem", rand_suffix()));
    std::fs::write(&p, pem).unwrap();
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(&p),
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split([',', '\n'])
        .filter_map(|s| s.trim().strip_prefix("URI:").map(str::to_owned))
        .collect()
}

fn rand_suffix() -> String {
    let mut b = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    hex::encode(b)
}

/// `openssl verify` of a leaf PEM against a bundle PEM.
fn openssl_verify(dir: &Path, leaf: &str, bundle: &Path) {
    let p = dir.join(format!("leaf-{}.pem", rand_suffix()));
    std::fs::write(&p, leaf).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(bundle)
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn client(args: &[&str]) -> serde_json::Value {
    let out = run_ok(Command::new(workspace_bin("vouch-client").unwrap()).args(args)).unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A copy of the stand-in with one byte appended: still "daprd", but its
/// digest is not the trusted one.
fn tampered_daprd(dir: &Path) -> PathBuf {
    let d = dir.join(format!("other-{}", rand_suffix()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("daprd");
    let mut b = std::fs::read(workspace_bin("daprd").unwrap()).unwrap();
    b.push(0);
    std::fs::write(&p, b).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn sentry_endpoint_issues_the_measured_identity_and_refuses_impostors() {
    let Some(env) = Env::new() else { return };
    if !vouch_tests::require_tools(&["openssl"]) {
        return;
    }
    let dir = env.dir();
    let bundle = env.bundle();
    let anchors = std::fs::read_to_string(&bundle).unwrap();
    let sentry = format!("unix://{}", env.sentry_socket().display());
    let rep = dir.join("orders.jsonl");
    let ns = Netns::new().unwrap();
    // The stand-in asks for another app-id than it runs as.
    let good = env.standin_env(
        &ns,
        "orders",
        &["--sentry-address", &sentry],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("SENTRY_LOCAL_IDENTITY", "payments"),
            ("STANDIN_RETRY_MS", "200"),
            ("STANDIN_REPORT", rep.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), good.pid(), "affirming");
    let issued = wait_event(&rep, "sentry_issued", 0, 15);
    assert_eq!(issued["requested_id"], "payments");
    let cert = issued["cert_pem"].as_str().unwrap();
    assert_eq!(
        uri_sans(&dir, cert),
        vec!["spiffe://cluster.local/ns/prod/orders".to_string()]
    );
    openssl_verify(&dir, cert, &bundle);

    // A plain process (not daprd, not measured).
    let sock = env.sentry_socket();
    let sock = sock.to_str().unwrap();
    let v = client(&[
        "sentry",
        sock,
        bundle.to_str().unwrap(),
        SENTRY_ID,
        "orders",
    ]);
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("not a measured daprd"),
        "{v}"
    );

    // A daprd whose binary is not the trusted one.
    let ns2 = Netns::new().unwrap();
    let rep2 = dir.join("wrong-digest.jsonl");
    let wrong = env.standin_exe(
        &ns2,
        &tampered_daprd(&dir),
        "billing",
        &["--sentry-address", &sentry],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("STANDIN_RETRY_MS", "200"),
            ("STANDIN_REPORT", rep2.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), wrong.pid(), "contraindicated");
    let denied = wait_event(&rep2, "sentry_denied", 0, 15);
    assert_eq!(denied["code"], "PermissionDenied", "{denied}");
    assert!(report(&rep2).iter().all(|v| v["event"] != "sentry_issued"));

    // A second daprd in the affirmed one's namespace: refused, and the
    // first one's renewals are refused from now on.
    let rep3 = dir.join("second.jsonl");
    let second = env.standin_env(
        &ns,
        "orders2",
        &[
            "--sentry-address",
            &sentry,
            "--dapr-http-port",
            "3600",
            "--dapr-grpc-port",
            "50002",
        ],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("STANDIN_RETRY_MS", "200"),
            ("STANDIN_REPORT", rep3.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), second.pid(), "contraindicated");
    wait_verdict(&env.db(), good.pid(), "contraindicated");
    let denied = wait_event(&rep3, "sentry_denied", 0, 15);
    assert_eq!(denied["code"], "PermissionDenied", "{denied}");
    assert!(report(&rep3).iter().all(|v| v["event"] != "sentry_issued"));
}
