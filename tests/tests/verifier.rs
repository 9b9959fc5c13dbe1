//! End to end: swtpm + vouchd + vouch-verifier (TLS, SQLite) + stand-in
//! daprd. The node enrolls (EK certificate chained to the swtpm CA, AK
//! bound by credential activation), pushes evidence, and the verifier's
//! verdicts follow what runs: a matching stand-in is affirming and
//! `explain` says why; a second daprd in its namespace contraindicates it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin, Owned};
use vouch_tests::require_tools;
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn sidecars(db: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(workspace_bin("vouch-verifier").unwrap())
        .args(["sidecars", "--json", "--db"])
        .arg(db)
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn wait_verdict(db: &std::path::Path, pid: u32, want: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(r) = sidecars(db).into_iter().find(|r| {
            r["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with(&format!("{pid}@")))
        }) {
            if r["verdict"] == want {
                return r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {want} verdict for pid {pid}: {:?}",
            sidecars(db)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn enroll_push_appraise_explain() {
    if !require_tools(&["swtpm", "swtpm_setup", "ip", "sha256sum"]) {
        return;
    }
    let sw = Swtpm::start().unwrap();
    let dir = sw.scratch();
    let vdir = dir.join("verifier");
    let pdir = dir.join("policies");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::create_dir_all(&pdir).unwrap();
    let bundle = dir.join("tpm-cas.pem");
    let mut pem = std::fs::read_to_string(sw.ca_root()).unwrap();
    pem.push_str(&std::fs::read_to_string(sw.ca_issuer()).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let digest = {
        let out = run_ok(Command::new("sha256sum").arg(workspace_bin("daprd").unwrap())).unwrap();
        String::from_utf8(out.stdout).unwrap()[..64].to_owned()
    };
    std::fs::write(
        pdir.join("prod.yaml"),
        format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: prod\nspec:\n  selector:\n    namespaces: [prod]\n  trustedDaprd:\n    - sha256: {digest}\n      version: stand-in\n  posture:\n    requireMtls: true\n    requireApiToken: true\n"),
    )
    .unwrap();
    let port = free_port();
    let verifier = Owned::new(
        "vouch-verifier",
        Command::new(workspace_bin("vouch-verifier").unwrap())
            .arg("serve")
            .env("VOUCH_VERIFIER_LISTEN", format!("127.0.0.1:{port}"))
            .env("VOUCH_VERIFIER_STATE_DIR", &vdir)
            .env("VOUCH_VERIFIER_POLICY_DIR", &pdir)
            .env("VOUCH_VERIFIER_EK_CA_BUNDLES", &bundle)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("verifier.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "verifier did not start: {}",
            std::fs::read_to_string(dir.join("verifier.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut v = Vouchd::new(&sw, &dir.join("vouchd"))
        .env("VOUCHD_VERIFIER_URL", &format!("https://127.0.0.1:{port}"))
        .env("VOUCHD_VERIFIER_CA", vdir.join("ca.pem").to_str().unwrap())
        .env("VOUCHD_NODE_NAME", "node-a")
        .env("VOUCHD_HEARTBEAT_MS", "500");
    v.start().unwrap();
    assert!(
        dir.join("vouchd/node_id").exists(),
        "vouchd did not enroll: {}",
        std::fs::read_to_string(dir.join("vouchd.stderr.log")).unwrap_or_default()
    );

    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n").unwrap();
    let ns = Netns::new().unwrap();
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.args(["--app-id", "orders", "--config"])
        .arg(&cfg)
        .env("NAMESPACE", "prod")
        .env("DAPR_API_TOKEN", "t");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let good = Owned::new("stand-in", c.spawn().unwrap());
    let db = vdir.join("state.db");
    let row = wait_verdict(&db, good.pid(), "affirming");
    assert_eq!(row["app_id"], "orders");
    let explain = run_ok(
        Command::new(workspace_bin("vouch-verifier").unwrap())
            .args(["explain", "orders", "--db"])
            .arg(&db),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        text.contains("AFFIRMING")
            && text.contains("[ok] daprd.digest")
            && text.contains("[ok] posture.mtls"),
        "{text}"
    );

    // A second daprd in the namespace: both contraindicated.
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.args([
        "--app-id",
        "impostor",
        "--dapr-http-port",
        "3600",
        "--dapr-grpc-port",
        "50002",
    ])
    .env("NAMESPACE", "prod");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let _impostor = Owned::new("impostor", c.spawn().unwrap());
    let row = wait_verdict(&db, good.pid(), "contraindicated");
    let failed: Vec<&str> = row["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(failed.contains(&"netns.daprd_count"), "{failed:?}");
    drop(verifier);
}
