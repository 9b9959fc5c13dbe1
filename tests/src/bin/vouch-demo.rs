//! `vouch-demo`: Vouch's main job on one machine, with a private swtpm.
//!
//! 1. A software TPM is manufactured with EK certificates from a private CA.
//! 2. vouch-verifier starts (gRPC over TLS, SQLite state) with a policy that
//!    pins the daprd build and requires mTLS and an API token.
//! 3. vouchd starts: creates and persists an AK, enrolls (EK certificate
//!    checked against the CA; AK bound to the EK by credential activation),
//!    then measures daprd and pushes TPM-quoted evidence.
//! 4. A sidecar ("orders", a stand-in daprd) starts in its own network
//!    namespace: the verifier affirms it, and explains why.
//! 5. Impostors appear: a daprd built from a swapped binary, and a foreign
//!    process listening on port 3500 next to "orders". Both are refused,
//!    with the verdicts and reasons printed.
//!
//! Everything runs as real processes and is stopped and removed at the end.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vouch_tests::netns::Netns;
use vouch_tests::proc::{run_ok, workspace_bin, Owned};
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

fn sidecars(db: &Path) -> Vec<serde_json::Value> {
    let Ok(bin) = workspace_bin("vouch-verifier") else {
        return Vec::new();
    };
    Command::new(bin)
        .args(["sidecars", "--json", "--db"])
        .arg(db)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn wait_verdict(db: &Path, pid: u32, want: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let prefix = format!("{pid}@");
        if let Some(r) = sidecars(db).into_iter().find(|r| {
            r["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with(&prefix))
                && r["verdict"] == want
        }) {
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("pid {pid} never became {want}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn show(row: &serde_json::Value) {
    println!(
        "           {} app-id={} -> {}",
        row["instance"].as_str().unwrap_or("?"),
        row["app_id"].as_str().unwrap_or("-"),
        row["verdict"].as_str().unwrap_or("?").to_uppercase()
    );
    for r in row["reasons"].as_array().into_iter().flatten() {
        if r["ok"] == false {
            println!(
                "             ✘ {}: measured {} ; allowed {}",
                r["rule"].as_str().unwrap_or("?"),
                r["measured"].as_str().unwrap_or(""),
                r["expected"].as_str().unwrap_or("")
            );
        }
    }
}

fn main() -> Result<()> {
    for bin in ["vouchd", "vouch-verifier", "daprd"] {
        workspace_bin(bin)?;
    }
    println!("== Vouch demo: TPM-rooted attestation of Dapr sidecars (swtpm) ==\n");
    let sw = Swtpm::start().context("starting swtpm (run scripts/setup.sh)")?;
    println!("[tpm]      swtpm manufactured with RSA-2048 and ECC P-384 EK certificates from a private CA (pid {})", sw.pid());
    let dir = sw.scratch();
    let (vdir, pdir) = (dir.join("verifier"), dir.join("policies"));
    std::fs::create_dir_all(&vdir)?;
    std::fs::create_dir_all(&pdir)?;
    let bundle = dir.join("tpm-cas.pem");
    std::fs::write(
        &bundle,
        std::fs::read_to_string(sw.ca_root())? + &std::fs::read_to_string(sw.ca_issuer())?,
    )?;
    let digest = {
        let out = run_ok(Command::new("sha256sum").arg(workspace_bin("daprd")?))?;
        String::from_utf8_lossy(&out.stdout)
            .chars()
            .take(64)
            .collect::<String>()
    };
    std::fs::write(
        pdir.join("prod.yaml"),
        format!(
            "apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: prod\nspec:\n  mode: enforce\n  selector:\n    namespaces: [prod]\n  trustedDaprd:\n    - sha256: {digest}\n      version: stand-in\n  posture:\n    requireMtls: true\n    requireApiToken: true\n"
        ),
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let http_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _verifier = Owned::new(
        "vouch-verifier",
        Command::new(workspace_bin("vouch-verifier")?)
            .arg("serve")
            .env("VOUCH_VERIFIER_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "VOUCH_VERIFIER_HTTP_LISTEN",
                format!("127.0.0.1:{http_port}"),
            )
            .env("VOUCH_VERIFIER_STATE_DIR", &vdir)
            .env("VOUCH_VERIFIER_POLICY_DIR", &pdir)
            .env("VOUCH_VERIFIER_EK_CA_BUNDLES", &bundle)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("verifier.log"))?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "verifier did not start: {}",
                std::fs::read_to_string(dir.join("verifier.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "[verifier] listening on 127.0.0.1:{port} (TLS), state in SQLite, policy pins daprd {}…",
        &digest[..16]
    );

    let mut v = Vouchd::new(&sw, &dir.join("vouchd"))
        .env("VOUCHD_VERIFIER_URL", &format!("https://127.0.0.1:{port}"))
        .env("VOUCHD_VERIFIER_CA", &vdir.join("ca.pem").to_string_lossy())
        .env("VOUCHD_NODE_NAME", "demo-node")
        .env("VOUCHD_HEARTBEAT_MS", "1000");
    v.start()?;
    let node_id =
        std::fs::read_to_string(dir.join("vouchd/node_id")).context("vouchd did not enroll")?;
    println!("[vouchd]   AK created (0600 blob), EK certificate verified, credential activated: enrolled as {}…", &node_id[..16]);

    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n")?;
    let ns = Netns::new()?;
    let standin = |ns: &Netns, exe: &Path, args: &[&str]| -> Result<Owned> {
        let mut c = ns.command(exe);
        c.args(args)
            .env("NAMESPACE", "prod")
            .env("DAPR_API_TOKEN", "demo-token")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Owned::new("stand-in daprd", c.spawn()?))
    };
    let orders = standin(
        &ns,
        &workspace_bin("daprd")?,
        &[
            "--app-id",
            "orders",
            "--dapr-listen-addresses",
            "127.0.0.1",
            "--config",
            &cfg.to_string_lossy(),
        ],
    )?;
    let db = vdir.join("state.db");
    println!(
        "\n[node]     sidecar 'orders' (stand-in daprd) starts in network namespace {}",
        ns.name()
    );
    show(&wait_verdict(&db, orders.pid(), "affirming")?);
    let explain = run_ok(
        Command::new(workspace_bin("vouch-verifier")?)
            .args(["explain", "orders", "--db"])
            .arg(&db),
    )?;
    println!("[verifier] vouch-verifier explain orders:");
    for l in String::from_utf8_lossy(&explain.stdout).lines() {
        println!("           {l}");
    }

    // Impostor 1: a swapped daprd binary.
    let swapped = dir.join("daprd");
    let mut bytes = std::fs::read(workspace_bin("daprd")?)?;
    bytes.extend_from_slice(b"-- swapped build --");
    std::fs::write(&swapped, bytes)?;
    std::fs::set_permissions(
        &swapped,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let ns2 = Netns::new()?;
    let fake = standin(
        &ns2,
        &swapped,
        &["--app-id", "payments", "--config", &cfg.to_string_lossy()],
    )?;
    println!("\n[attack]   a daprd built from a swapped binary starts as 'payments'");
    show(&wait_verdict(&db, fake.pid(), "contraindicated")?);

    // Impostor 2: a foreign listener on 3500 next to 'orders'.
    let mut py = ns.command("python3");
    // orders holds 127.0.0.1:3500; the impostor answers on another address.
    py.args(["-c", "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.2',3500))\ns.listen()\ntime.sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _listener = Owned::new("foreign listener", py.spawn()?);
    println!("\n[attack]   a plain process (python3) starts listening on 127.0.0.2:3500 in orders' network namespace");
    show(&wait_verdict(&db, orders.pid(), "contraindicated")?);
    println!("\n[verifier] only affirming sidecars would receive credentials; both impostors and the sidecar they sit next to are refused.");
    println!("[verifier] signed results (EAR, EdDSA) and the JWKS are at http://127.0.0.1:{http_port}/v1/sidecars and /.well-known/jwks.json");
    drop(v);
    println!("\nDemo finished; all processes stopped, network namespaces and state removed.");
    Ok(())
}
