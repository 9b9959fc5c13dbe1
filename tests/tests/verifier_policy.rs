//! Policy violations end to end (swtpm + vouchd + verifier + stand-ins):
//! unknown daprd digest, mTLS off, a foreign listener on 3500 — each
//! contraindicated with its own rule; audit mode turns them into warnings
//! after a live policy reload; a log lost in this boot contraindicates the
//! node; an EK whose certificate does not chain to the configured CAs
//! cannot enroll.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::process::Stdio;

use vouch_tests::netns::Netns;
use vouch_tests::proc::{workspace_bin, Owned};
use vouch_tests::stack::{wait_verdict, Env};
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

fn failed(row: &serde_json::Value) -> Vec<String> {
    row["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .filter_map(|r| r["rule"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn violations_audit_mode_lost_log_and_foreign_ek() {
    let Some(mut env) = Env::new() else { return };
    let dir = env.dir();
    let db = env.db();

    // Unknown digest: a swapped binary.
    let swapped = dir.join("daprd");
    let mut bytes = std::fs::read(workspace_bin("daprd").unwrap()).unwrap();
    bytes.extend_from_slice(b"swapped");
    std::fs::write(&swapped, bytes).unwrap();
    std::fs::set_permissions(
        &swapped,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let ns1 = Netns::new().unwrap();
    let mut c = ns1.command(&swapped);
    c.args(["--app-id", "swapped", "--config"])
        .arg(dir.join("config.yaml"))
        .env("NAMESPACE", "prod")
        .env("DAPR_API_TOKEN", "t");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let s1 = Owned::new("swapped", c.spawn().unwrap());
    let row = wait_verdict(&db, s1.pid(), "contraindicated");
    assert_eq!(failed(&row), vec!["daprd.digest"]);

    // mTLS off in the Configuration.
    let off = dir.join("mtls-off.yaml");
    std::fs::write(&off, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: false\n").unwrap();
    let ns2 = Netns::new().unwrap();
    let mut c = ns2.command(workspace_bin("daprd").unwrap());
    c.args(["--app-id", "nomtls", "--config"])
        .arg(&off)
        .env("NAMESPACE", "prod")
        .env("DAPR_API_TOKEN", "t");
    c.stdout(Stdio::null()).stderr(Stdio::null());
    let s2 = Owned::new("no-mtls", c.spawn().unwrap());
    let row = wait_verdict(&db, s2.pid(), "contraindicated");
    assert_eq!(failed(&row), vec!["posture.mtls"]);

    // A foreign listener on 3500 next to a good sidecar.
    let ns3 = Netns::new().unwrap();
    let good = env.standin(&ns3, "orders", &["--dapr-listen-addresses", "127.0.0.1"]);
    wait_verdict(&db, good.pid(), "affirming");
    let mut py = ns3.command("python3");
    py.args(["-c", "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.2',3500))\ns.listen()\ntime.sleep(60)"]);
    py.stdout(Stdio::null()).stderr(Stdio::null());
    let _py = Owned::new("foreign listener", py.spawn().unwrap());
    let row = wait_verdict(&db, good.pid(), "contraindicated");
    assert_eq!(failed(&row), vec!["netns.exclusive_ports"]);

    // Audit mode, reloaded live: the same violations become warnings.
    let p = dir.join("policies/prod.yaml");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("spec:\n", "spec:\n  mode: audit\n");
    std::fs::write(&p, text).unwrap();
    for pid in [s1.pid(), s2.pid(), good.pid()] {
        wait_verdict(&db, pid, "warning");
    }
    // A bad edit is refused; the audit policy stays in force.
    std::fs::write(dir.join("policies/broken.yaml"), "apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: broken\nspec:\n  modee: enforce\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    wait_verdict(&db, s2.pid(), "warning");
    let log = std::fs::read_to_string(dir.join("verifier.log")).unwrap();
    assert!(
        log.contains("policy reload failed") && log.contains("broken.yaml"),
        "no reload error logged"
    );

    // The runtime log deleted while vouchd is stopped: integrity lost.
    env.vouchd.stop();
    std::fs::remove_file(dir.join("vouchd/runtime.log")).unwrap();
    env.vouchd.start().unwrap();
    let row = wait_verdict(&db, s2.pid(), "contraindicated");
    assert!(failed(&row).contains(&"integrity".to_owned()), "{row}");

    // An EK certified by a CA the verifier does not trust cannot enroll.
    let other = Swtpm::start().unwrap();
    let mut foreign = Vouchd::new(&other, &other.scratch().join("vouchd"))
        .env(
            "VOUCHD_VERIFIER_URL",
            &format!("https://127.0.0.1:{}", env.port),
        )
        .env(
            "VOUCHD_VERIFIER_CA",
            dir.join("verifier/ca.pem").to_str().unwrap(),
        )
        .env("VOUCHD_NODE_NAME", "foreign");
    foreign.start().unwrap();
    assert!(
        !other.scratch().join("vouchd/node_id").exists(),
        "a foreign EK enrolled"
    );
    let log = std::fs::read_to_string(dir.join("verifier.log")).unwrap();
    assert!(
        log.contains("does not chain to a configured TPM-manufacturer CA"),
        "refusal not logged"
    );
}
