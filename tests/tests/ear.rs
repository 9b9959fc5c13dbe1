//! EAR tokens (EdDSA JWTs) verify with PyJWT — a JWT library nobody here
//! wrote — against the published JWKS, carry the sidecar's status, and a
//! tampered token is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::collections::BTreeMap;
use std::process::Command;

use vouch_tests::require_tools;
use vouch_verifier::appraise::{judge, Verdict};
use vouch_verifier::ear::EarSigner;
use vouch_verifier::policy::Policy;
use vouch_verifier::simnode::{sample_measurement, SimNode};

const VERIFY: &str = r#"
import json, sys, jwt
jwks = json.load(open(sys.argv[1]))
token = open(sys.argv[2]).read().strip()
kid = jwt.get_unverified_header(token)["kid"]
key = jwt.PyJWKSet.from_dict(jwks)[kid]
claims = jwt.decode(token, key.key, algorithms=["EdDSA"])
sub = claims["sub"]
print(json.dumps({"status": claims["submods"][sub]["ear.status"], "profile": claims["eat_profile"], "tv": claims["submods"][sub]["ear.trustworthiness-vector"]}))
"#;

fn pyjwt_ready() -> bool {
    if !require_tools(&["python3"]) {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import jwt, cryptography"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || !vouch_tests::under_ci(),
        "CI=true and PyJWT is missing (scripts/setup.sh installs it)"
    );
    if !ok {
        eprintln!("SKIPPED: PyJWT missing: python3 -m pip install pyjwt cryptography");
    }
    ok
}

#[test]
fn ear_tokens_verify_with_pyjwt_against_the_jwks() {
    if !pyjwt_ready() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("ear.key");
    let signer = EarSigner::load_or_create(&key_path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Reloading gives the same key.
    assert_eq!(
        EarSigner::load_or_create(&key_path).unwrap().kid(),
        signer.kid()
    );

    let p = Policy::parse(
        std::path::Path::new("p.yaml"),
        &format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: p\nspec:\n  trustedDaprd:\n    - sha256: {}\n", "1".repeat(64)),
    )
    .unwrap();
    let mut state = SimNode::new(0)
        .unwrap()
        .enrolled_state("node-a", BTreeMap::new())
        .unwrap();
    let good = sample_measurement(10, "orders", &"1".repeat(64), 100);
    let bad = sample_measurement(11, "evil", &"2".repeat(64), 101);
    state
        .instances
        .insert(good.id, std::sync::Arc::new(good.clone()));
    state
        .instances
        .insert(bad.id, std::sync::Arc::new(bad.clone()));
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, signer.jwks().to_string()).unwrap();
    let script = dir.path().join("verify.py");
    std::fs::write(&script, VERIFY).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    for (m, want) in [(&good, "affirming"), (&bad, "contraindicated")] {
        let v = judge(&state, m, std::slice::from_ref(&p));
        assert_eq!(v.verdict == Verdict::Affirming, want == "affirming");
        let token = signer.ear("node-a", &v, &["p".into()], now);
        let tok = dir.path().join("token");
        std::fs::write(&tok, &token).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&jwks)
            .arg(&tok)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "PyJWT refused a genuine EAR: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(got["status"], want);
        assert_eq!(got["profile"], vouch_verifier::ear::EAR_PROFILE);
        if want == "contraindicated" {
            assert_eq!(got["tv"]["executables"], 96);
        }
        // Tampered payload: refused.
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].replace('A', "B");
        if parts[1] == token.split('.').nth(1).unwrap() {
            parts[1].push('A');
        }
        std::fs::write(&tok, parts.join(".")).unwrap();
        let out = Command::new("python3")
            .arg(&script)
            .arg(&jwks)
            .arg(&tok)
            .output()
            .unwrap();
        assert!(!out.status.success(), "PyJWT accepted a tampered token");
    }
}
