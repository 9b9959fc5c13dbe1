//! End to end: swtpm + vouchd + vouch-verifier (TLS, SQLite) + stand-in
//! daprd. The node enrolls (EK certificate chained to the swtpm CA, AK
//! bound by credential activation), pushes evidence, and the verifier's
//! verdicts follow what runs: a matching stand-in is affirming and
//! `explain` says why; a second daprd in its namespace contraindicates it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::process::Command;
use std::time::{Duration, Instant};

use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin};
use vouch_tests::stack::{sidecars, wait_verdict, Env};
use vouch_tests::vouchd::Vouchd;

#[test]
fn enroll_push_appraise_explain() {
    let Some(env) = Env::new() else { return };
    let ns = Netns::new().unwrap();
    let good = env.standin(&ns, "orders", &[]);
    let db = env.db();
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

    // Its EAR, fetched over the operator API, verifies with PyJWT against
    // the published JWKS.
    if vouch_tests::require_tools(&["python3"]) {
        let script = format!(
            "import json, urllib.request, jwt\nbase='http://127.0.0.1:{}'\njwks=json.load(urllib.request.urlopen(base+'/.well-known/jwks.json'))\nsc=[s for s in json.load(urllib.request.urlopen(base+'/v1/sidecars')) if s['instance'].startswith('{}@')][0]\ntok=urllib.request.urlopen(base+'/v1/sidecars/'+sc['node_id']+'/'+sc['instance']+'/ear').read().decode()\nkey=jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(tok)['kid']]\nc=jwt.decode(tok, key.key, algorithms=['EdDSA'])\nprint(c['submods'][c['sub']]['ear.status'])\n",
            env.http_port,
            good.pid()
        );
        let out = Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "affirming");
    }

    // A second daprd in the namespace: both contraindicated.
    let _impostor = env.standin(
        &ns,
        "impostor",
        &["--dapr-http-port", "3600", "--dapr-grpc-port", "50002"],
    );
    let row = wait_verdict(&db, good.pid(), "contraindicated");
    let failed: Vec<&str> = row["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["ok"] == false)
        .filter_map(|r| r["rule"].as_str())
        .collect();
    assert!(failed.contains(&"netns.daprd_count"), "{failed:?}");
}

fn updated_ms(db: &std::path::Path, pid: u32) -> u64 {
    sidecars(db)
        .into_iter()
        .find(|r| {
            r["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with(&format!("{pid}@")))
        })
        .and_then(|r| r["updated_ms"].as_u64())
        .unwrap_or(0)
}

#[test]
fn verifier_sigkill_and_tpm_reboot_need_no_operator() {
    let Some(mut env) = Env::new() else { return };
    let ns = Netns::new().unwrap();
    let good = env.standin(&ns, "orders", &[]);
    let db = env.db();
    wait_verdict(&db, good.pid(), "affirming");
    let node_id = std::fs::read_to_string(env.dir().join("vouchd/node_id")).unwrap();

    // SIGKILL the verifier; nothing accepted is lost; the node resumes
    // without re-enrolling.
    let vp = env.verifier.as_ref().unwrap().pid();
    run_ok(Command::new("kill").args(["-KILL", &vp.to_string()])).unwrap();
    env.verifier.take();
    let before = updated_ms(&db, good.pid());
    assert!(before > 0, "the affirming verdict survived the SIGKILL");
    env.start_verifier();
    let deadline = Instant::now() + Duration::from_secs(20);
    while updated_ms(&db, good.pid()) <= before {
        assert!(
            Instant::now() < deadline,
            "node did not resume pushing after the verifier restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_verdict(&db, good.pid(), "affirming");
    assert_eq!(
        std::fs::read_to_string(env.dir().join("vouchd/node_id")).unwrap(),
        node_id
    );
    let log = std::fs::read_to_string(env.dir().join("verifier.log")).unwrap();
    assert_eq!(
        log.matches("node enrolled").count(),
        1,
        "re-enrollment after a verifier restart"
    );

    // Reboot the TPM (swtpm restarted with its state): a new boot; the node
    // re-attests from the new BootStart with no operator action.
    let boot_of = |db: &std::path::Path| {
        let out = run_ok(
            Command::new(workspace_bin("vouch-verifier").unwrap())
                .args(["nodes", "--db"])
                .arg(db),
        )
        .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        s.split("boot=")
            .nth(1)
            .and_then(|r| r.split(" next_seq").next())
            .unwrap_or("")
            .to_owned()
    };
    let boot_before = boot_of(&db);
    assert!(boot_before.starts_with("Some"), "{boot_before}");
    env.vouchd.stop();
    env.sw.reboot().unwrap();
    // The harness' TCTI names the new port.
    let tcti = env.sw.tcti();
    env.vouchd = Vouchd::new(&env.sw, &env.dir().join("vouchd"))
        .env("VOUCHD_TCTI", &tcti)
        .env(
            "VOUCHD_VERIFIER_URL",
            &format!("https://127.0.0.1:{}", env.port),
        )
        .env(
            "VOUCHD_VERIFIER_CA",
            env.dir().join("verifier/ca.pem").to_str().unwrap(),
        )
        .env("VOUCHD_NODE_NAME", "node-a")
        .env("VOUCHD_HEARTBEAT_MS", "500");
    env.vouchd.start().unwrap();
    let evs = env.vouchd.events().unwrap();
    assert_eq!(evs[0].kind, vouch_proto::event::EventKind::BootStart);
    let deadline = Instant::now() + Duration::from_secs(20);
    while boot_of(&db) == boot_before {
        assert!(
            Instant::now() < deadline,
            "verifier did not accept the new boot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_verdict(&db, good.pid(), "affirming");
}

#[test]
fn a_silent_node_loses_its_affirming_verdicts_and_regains_them() {
    let Some(mut env) = Env::new() else { return };
    let ns = Netns::new().unwrap();
    let good = env.standin(&ns, "orders", &[]);
    let db = env.db();
    wait_verdict(&db, good.pid(), "affirming");
    env.vouchd.stop(); // silence (the stack's limit is 3 s)
    let row = wait_verdict(&db, good.pid(), "contraindicated");
    assert!(
        row["reasons"][0]["measured"]
            .as_str()
            .unwrap()
            .contains("silent"),
        "{row}"
    );
    env.vouchd.start().unwrap();
    wait_verdict(&db, good.pid(), "affirming");
}
