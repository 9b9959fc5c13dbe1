//! A whole Vouch stack for end-to-end tests: a swtpm, a policy pinning the
//! stand-in daprd, the swtpm CA as EK CA bundle, a `vouch-verifier` and an
//! enrolled `vouchd`, all real processes stopped on drop.
// Test harness: a failed setup step must fail the test that asked for it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::proc::{run_ok, workspace_bin, Owned};
use crate::require_tools;
use crate::swtpm::Swtpm;
use crate::vouchd::Vouchd;

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("test stack")
        .local_addr()
        .expect("test stack")
        .port()
}

/// `vouch-verifier sidecars --json` rows.
pub fn sidecars(db: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(workspace_bin("vouch-verifier").expect("test stack"))
        .args(["sidecars", "--json", "--db"])
        .arg(db)
        .output()
        .expect("test stack");
    if !out.status.success() {
        return Vec::new();
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Waits until the sidecar with `pid` has verdict `want`; returns its row.
pub fn wait_verdict(db: &std::path::Path, pid: u32, want: &str) -> serde_json::Value {
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

/// The stack.
pub struct Env {
    /// The TPM.
    pub sw: Swtpm,
    /// Verifier port.
    pub port: u16,
    /// Operator HTTP API port.
    pub http_port: u16,
    /// The verifier process.
    pub verifier: Option<Owned>,
    /// The node daemon.
    pub vouchd: Vouchd,
    /// Extra environment for the verifier (set before [`Env::start_verifier`]).
    pub verifier_env: Vec<(String, String)>,
}

impl Env {
    /// Scratch directory.
    pub fn dir(&self) -> std::path::PathBuf {
        self.sw.scratch().to_owned()
    }

    /// The verifier's database.
    pub fn db(&self) -> std::path::PathBuf {
        self.dir().join("verifier/state.db")
    }

    /// Starts (or restarts) the verifier.
    pub fn start_verifier(&mut self) {
        let dir = self.dir();
        let child = Command::new(workspace_bin("vouch-verifier").expect("test stack"))
            .arg("serve")
            .env("VOUCH_VERIFIER_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("VOUCH_VERIFIER_STATE_DIR", dir.join("verifier"))
            .env("VOUCH_VERIFIER_POLICY_DIR", dir.join("policies"))
            .env("VOUCH_VERIFIER_EK_CA_BUNDLES", dir.join("tpm-cas.pem"))
            .env(
                "VOUCH_VERIFIER_HTTP_LISTEN",
                format!("127.0.0.1:{}", self.http_port),
            )
            .env("VOUCH_VERIFIER_NONCE_TTL_MS", "2000")
            .env("VOUCH_VERIFIER_STALE_AFTER_MS", "3000")
            .envs(
                self.verifier_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("verifier.log"))
                    .expect("test stack"),
            )
            .spawn()
            .expect("test stack");
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

    /// The Workload API socket.
    pub fn workload_socket(&self) -> std::path::PathBuf {
        self.dir().join("run/workload.sock")
    }

    /// The Sentry endpoint socket.
    pub fn sentry_socket(&self) -> std::path::PathBuf {
        self.dir().join("run/sentry.sock")
    }

    /// The trust bundle vouchd keeps (PEM), once it exists.
    pub fn bundle(&self) -> std::path::PathBuf {
        let p = self.dir().join("vouchd/bundle.pem");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.exists() {
            assert!(Instant::now() < deadline, "vouchd wrote no trust bundle");
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// swtpm, a policy pinning the stand-in, the swtpm CA as EK CA bundle,
    /// a verifier and an enrolled vouchd.
    pub fn new() -> Option<Self> {
        Self::with_verifier_env(&[])
    }

    /// [`Env::new`] with extra verifier environment.
    pub fn with_verifier_env(venv: &[(&str, &str)]) -> Option<Self> {
        if !require_tools(&["swtpm", "swtpm_setup", "ip", "sha256sum"]) {
            return None;
        }
        let sw = Swtpm::start().expect("test stack");
        let dir = sw.scratch().to_owned();
        std::fs::create_dir_all(dir.join("verifier")).expect("test stack");
        std::fs::create_dir_all(dir.join("policies")).expect("test stack");
        let mut pem = std::fs::read_to_string(sw.ca_root()).expect("test stack");
        pem.push_str(&std::fs::read_to_string(sw.ca_issuer()).expect("test stack"));
        std::fs::write(dir.join("tpm-cas.pem"), pem).expect("test stack");
        let out =
            run_ok(Command::new("sha256sum").arg(workspace_bin("daprd").expect("test stack")))
                .expect("test stack");
        let digest = String::from_utf8(out.stdout).expect("test stack")[..64].to_owned();
        std::fs::write(
            dir.join("policies/prod.yaml"),
            format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: prod\nspec:\n  selector:\n    namespaces: [prod]\n  trustedDaprd:\n    - sha256: {digest}\n      version: stand-in\n  posture:\n    requireMtls: true\n    requireApiToken: true\n"),
        )
        .expect("test stack");
        std::fs::write(dir.join("config.yaml"), "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n").expect("test stack");
        let port = free_port();
        let vouchd = Vouchd::new(&sw, &dir.join("vouchd"))
            .env("VOUCHD_VERIFIER_URL", &format!("https://127.0.0.1:{port}"))
            .env(
                "VOUCHD_VERIFIER_CA",
                dir.join("verifier/ca.pem").to_str().expect("test stack"),
            )
            .env("VOUCHD_NODE_NAME", "node-a")
            .env("VOUCHD_HEARTBEAT_MS", "500")
            .env(
                "VOUCHD_WORKLOAD_SOCKET",
                dir.join("run/workload.sock").to_str().expect("test stack"),
            )
            .env(
                "VOUCHD_SENTRY_SOCKET",
                dir.join("run/sentry.sock").to_str().expect("test stack"),
            )
            // Every test's vouchd sees every stand-in on the machine: each
            // writes token files only into its own test's directory.
            .env("VOUCHD_TOKEN_DIRS", dir.to_str().expect("test stack"));
        let mut env = Self {
            sw,
            port,
            http_port: free_port(),
            verifier: None,
            vouchd,
            verifier_env: venv
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        env.start_verifier();
        env.vouchd.start().expect("test stack");
        assert!(dir.join("vouchd/node_id").exists(), "vouchd did not enroll");
        Some(env)
    }

    /// A stand-in daprd in `ns` (NAMESPACE=prod, API token, mTLS config).
    pub fn standin(&self, ns: &Netns, app: &str, extra: &[&str]) -> Owned {
        self.standin_env(ns, app, extra, &[])
    }

    /// [`Env::standin`] with extra environment.
    pub fn standin_env(
        &self,
        ns: &Netns,
        app: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Owned {
        self.standin_exe(
            ns,
            &workspace_bin("daprd").expect("test stack"),
            app,
            extra,
            env,
        )
    }

    /// [`Env::standin_env`] running the executable at `exe`.
    pub fn standin_exe(
        &self,
        ns: &Netns,
        exe: &std::path::Path,
        app: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Owned {
        let mut c = ns.command(exe);
        c.args(["--app-id", app, "--config"])
            .arg(self.dir().join("config.yaml"))
            .args(extra);
        c.env("NAMESPACE", "prod")
            .env("DAPR_API_TOKEN", "t")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Owned::new("stand-in", c.spawn().expect("test stack"))
    }
}
