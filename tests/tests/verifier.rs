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

struct Env {
    sw: Swtpm,
    port: u16,
    verifier: Option<Owned>,
    vouchd: Vouchd,
}

impl Env {
    fn dir(&self) -> std::path::PathBuf {
        self.sw.scratch().to_owned()
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir().join("verifier/state.db")
    }

    fn start_verifier(&mut self) {
        let dir = self.dir();
        let child = Command::new(workspace_bin("vouch-verifier").unwrap())
            .arg("serve")
            .env("VOUCH_VERIFIER_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("VOUCH_VERIFIER_STATE_DIR", dir.join("verifier"))
            .env("VOUCH_VERIFIER_POLICY_DIR", dir.join("policies"))
            .env("VOUCH_VERIFIER_EK_CA_BUNDLES", dir.join("tpm-cas.pem"))
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("verifier.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.verifier = Some(Owned::new("vouch-verifier", child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "verifier did not start: {}",
                std::fs::read_to_string(dir.join("verifier.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// swtpm, a policy pinning the stand-in, the swtpm CA as EK CA bundle,
    /// a verifier and an enrolled vouchd.
    fn new() -> Option<Self> {
        if !require_tools(&["swtpm", "swtpm_setup", "ip", "sha256sum"]) {
            return None;
        }
        let sw = Swtpm::start().unwrap();
        let dir = sw.scratch().to_owned();
        std::fs::create_dir_all(dir.join("verifier")).unwrap();
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let mut pem = std::fs::read_to_string(sw.ca_root()).unwrap();
        pem.push_str(&std::fs::read_to_string(sw.ca_issuer()).unwrap());
        std::fs::write(dir.join("tpm-cas.pem"), pem).unwrap();
        let out = run_ok(Command::new("sha256sum").arg(workspace_bin("daprd").unwrap())).unwrap();
        let digest = String::from_utf8(out.stdout).unwrap()[..64].to_owned();
        std::fs::write(
            dir.join("policies/prod.yaml"),
            format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: prod\nspec:\n  selector:\n    namespaces: [prod]\n  trustedDaprd:\n    - sha256: {digest}\n      version: stand-in\n  posture:\n    requireMtls: true\n    requireApiToken: true\n"),
        )
        .unwrap();
        std::fs::write(dir.join("config.yaml"), "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n").unwrap();
        let port = free_port();
        let vouchd = Vouchd::new(&sw, &dir.join("vouchd"))
            .env("VOUCHD_VERIFIER_URL", &format!("https://127.0.0.1:{port}"))
            .env(
                "VOUCHD_VERIFIER_CA",
                dir.join("verifier/ca.pem").to_str().unwrap(),
            )
            .env("VOUCHD_NODE_NAME", "node-a")
            .env("VOUCHD_HEARTBEAT_MS", "500");
        let mut env = Self {
            sw,
            port,
            verifier: None,
            vouchd,
        };
        env.start_verifier();
        env.vouchd.start().unwrap();
        assert!(dir.join("vouchd/node_id").exists(), "vouchd did not enroll");
        Some(env)
    }

    fn standin(&self, ns: &Netns, app: &str, extra: &[&str]) -> Owned {
        let mut c = ns.command(workspace_bin("daprd").unwrap());
        c.args(["--app-id", app, "--config"])
            .arg(self.dir().join("config.yaml"))
            .args(extra);
        c.env("NAMESPACE", "prod")
            .env("DAPR_API_TOKEN", "t")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Owned::new("stand-in", c.spawn().unwrap())
    }
}

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
