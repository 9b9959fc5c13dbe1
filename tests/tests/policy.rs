//! From a real node to a policy: `vouchd measure --json` on a running
//! stand-in -> `vouch-verifier policy generate` -> `policy check` ->
//! the generated policy affirms what it pinned and refuses another digest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use vouch_proto::measurement::Measurement;
use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin, Owned};
use vouch_tests::require_tools;
use vouch_verifier::appraise::{judge, Verdict};
use vouch_verifier::policy::Policy;
use vouch_verifier::simnode::SimNode;

#[test]
fn generate_check_and_judge_from_real_measurements() {
    if !require_tools(&["ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n").unwrap();
    let ns = Netns::new().unwrap();
    let app = format!("gen-{}", std::process::id());
    let mut c = ns.command(workspace_bin("daprd").unwrap());
    c.args([
        "--app-id",
        &app,
        "--dapr-listen-addresses",
        "127.0.0.1",
        "--config",
    ])
    .arg(&cfg)
    .env("DAPR_API_TOKEN", "t")
    .env("NAMESPACE", "prod")
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let d = Owned::new("stand-in", c.spawn().unwrap());
    // Wait until it listens, then measure the node (no TPM).
    let mut measured: Option<Measurement> = None;
    let mut raw = Vec::new();
    for _ in 0..100 {
        raw = run_ok(Command::new(workspace_bin("vouchd").unwrap()).args(["measure", "--json"]))
            .unwrap()
            .stdout;
        let j: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        measured = j["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| serde_json::from_value::<Measurement>(i.clone()).ok())
            .find(|m| m.id.pid == d.pid() && !m.listeners.is_empty());
        if measured.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let m = measured.expect("stand-in in measure output");
    // Keep only our instance (other tests' stand-ins may run in parallel).
    let mut j: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    j["instances"] = serde_json::Value::Array(vec![serde_json::to_value(&m).unwrap()]);
    let input = dir.path().join("measure.json");
    std::fs::write(&input, serde_json::to_vec(&j).unwrap()).unwrap();

    let out = run_ok(
        Command::new(workspace_bin("vouch-verifier").unwrap())
            .args(["policy", "generate", "--name", "gen", "--input"])
            .arg(&input),
    )
    .unwrap();
    let policy_path = dir.path().join("gen.yaml");
    std::fs::write(&policy_path, &out.stdout).unwrap();
    let check = run_ok(
        Command::new(workspace_bin("vouch-verifier").unwrap())
            .args(["policy", "check"])
            .arg(&policy_path),
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok"));

    let p = Policy::load(&policy_path).unwrap();
    assert_eq!(
        p.spec.trusted_daprd[0].sha256,
        m.exe.sha256.clone().unwrap()
    );
    assert!(
        p.spec.posture.require_mtls
            && p.spec.posture.require_api_token
            && p.spec.posture.listen_loopback_only
    );
    let mut state = SimNode::new(0)
        .unwrap()
        .enrolled_state("n", BTreeMap::new())
        .unwrap();
    state.instances.insert(m.id, std::sync::Arc::new(m.clone()));
    let v = judge(&state, &m, std::slice::from_ref(&p));
    assert_eq!(v.verdict, Verdict::Affirming, "{:?}", v.reasons);
    let mut other = m.clone();
    other.exe.sha256 = Some("0".repeat(64));
    let v = judge(&state, &other, std::slice::from_ref(&p));
    assert_eq!(v.verdict, Verdict::Contraindicated);
    assert!(v.reasons.iter().any(|r| r.rule == "daprd.digest" && !r.ok));

    // A typo in the policy is reported with file, line and field.
    let typo = String::from_utf8_lossy(&out.stdout).replace("requireMtls", "requireMtsl");
    std::fs::write(&policy_path, typo).unwrap();
    let bad = Command::new(workspace_bin("vouch-verifier").unwrap())
        .args(["policy", "check"])
        .arg(&policy_path)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("gen.yaml:") && err.contains("requireMtsl"),
        "{err}"
    );
}
