//! `vouch-demo`: Vouch's main job on one machine, with a private swtpm.
//!
//! 1. A software TPM is manufactured with EK certificates from a private CA.
//! 2. vouch-verifier starts (gRPC over TLS, SQLite state) with a policy that
//!    pins the daprd build and requires mTLS and an API token.
//! 3. vouchd starts: creates and persists an AK, enrolls (EK certificate
//!    checked against the CA; AK bound to the EK by credential activation),
//!    then measures daprd and pushes TPM-quoted evidence.
//! 4. Two sidecars (stand-in daprds "orders" and "billing") start in their
//!    own network namespaces: the verifier affirms them and explains why;
//!    "orders" gets its workload certificate from vouchd's attesting Sentry
//!    endpoint (with the measured identity, not the one it asks for) and a
//!    Sentry token file; "billing" gets an X.509 SVID over the SPIFFE
//!    Workload API.
//! 5. Impostors appear: a daprd built from a swapped binary (refused, its
//!    certificate request denied), and a foreign process listening on port
//!    3500 next to "orders" (orders is contraindicated and its credentials
//!    are withdrawn), with the verdicts and reasons printed.
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

fn wait_file(p: &Path, present: bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while p.exists() != present {
        if Instant::now() > deadline {
            bail!(
                "{} never {}",
                p.display(),
                if present { "appeared" } else { "went away" }
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The first JSON line with `"event": event` a stand-in reported.
fn wait_event(report: &Path, event: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = std::fs::read_to_string(report)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == event);
        if let Some(v) = found {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{} never reported {event}", report.display());
        }
        std::thread::sleep(Duration::from_millis(20));
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

    let (wl_sock, sentry_sock) = (dir.join("run/workload.sock"), dir.join("run/sentry.sock"));
    let mut v = Vouchd::new(&sw, &dir.join("vouchd"))
        .env("VOUCHD_VERIFIER_URL", &format!("https://127.0.0.1:{port}"))
        .env("VOUCHD_VERIFIER_CA", &vdir.join("ca.pem").to_string_lossy())
        .env("VOUCHD_NODE_NAME", "demo-node")
        .env("VOUCHD_HEARTBEAT_MS", "1000")
        .env("VOUCHD_WORKLOAD_SOCKET", &wl_sock.to_string_lossy())
        .env("VOUCHD_SENTRY_SOCKET", &sentry_sock.to_string_lossy())
        .env("VOUCHD_TOKEN_DIRS", &dir.to_string_lossy());
    v.start()?;
    let node_id =
        std::fs::read_to_string(dir.join("vouchd/node_id")).context("vouchd did not enroll")?;
    println!("[vouchd]   AK created (0600 blob), EK certificate verified, credential activated: enrolled as {}…", &node_id[..16]);
    let trust_bundle = dir.join("vouchd/bundle.pem");
    wait_file(&trust_bundle, true)?;
    println!("[vouchd]   serving the SPIFFE Workload API ({}) and an attesting Dapr Sentry endpoint ({}); trust bundle in {}",
        wl_sock.display(), sentry_sock.display(), trust_bundle.display());
    let anchors = std::fs::read_to_string(&trust_bundle)?;

    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: true\n")?;
    let ns = Netns::new()?;
    let standin = |ns: &Netns, exe: &Path, args: &[&str], env: &[(&str, &str)]| -> Result<Owned> {
        let mut c = ns.command(exe);
        c.args(args)
            .env("NAMESPACE", "prod")
            .env("DAPR_API_TOKEN", "demo-token")
            .env("STANDIN_RETRY_MS", "300")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(Owned::new("stand-in daprd", c.spawn()?))
    };
    let sentry_addr = format!("unix://{}", sentry_sock.display());
    let (orders_rep, billing_rep) = (dir.join("orders.jsonl"), dir.join("billing.jsonl"));
    let token = dir.join("orders-sentry.jwt");
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
            "--sentry-address",
            &sentry_addr,
        ],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("SENTRY_LOCAL_IDENTITY", "payments"),
            ("DAPR_SENTRY_TOKEN_FILE", &token.to_string_lossy()),
            ("STANDIN_REPORT", &orders_rep.to_string_lossy()),
        ],
    )?;
    let ns_b = Netns::new()?;
    let billing = standin(
        &ns_b,
        &workspace_bin("daprd")?,
        &[
            "--app-id",
            "billing",
            "--dapr-listen-addresses",
            "127.0.0.1",
            "--config",
            &cfg.to_string_lossy(),
        ],
        &[
            ("STANDIN_WORKLOAD_SOCKET", &wl_sock.to_string_lossy()),
            ("STANDIN_REPORT", &billing_rep.to_string_lossy()),
        ],
    )?;
    let db = vdir.join("state.db");
    println!(
        "\n[node]     sidecars 'orders' and 'billing' (stand-in daprds) start in network namespaces {} and {}",
        ns.name(),
        ns_b.name()
    );
    show(&wait_verdict(&db, orders.pid(), "affirming")?);
    show(&wait_verdict(&db, billing.pid(), "affirming")?);
    let issued = wait_event(&orders_rep, "sentry_issued")?;
    println!(
        "[creds]    orders asked the attesting Sentry endpoint for app-id '{}' and got a workload certificate for {} (valid until unix {})",
        issued["requested_id"].as_str().unwrap_or("?"),
        issued["spiffe_id"].as_str().unwrap_or("?"),
        issued["valid_until"]
    );
    wait_file(&token, true)?;
    println!("[creds]    vouchd wrote orders' Sentry token ({}): a JWT with sub = its SPIFFE ID, for a stock Dapr Sentry's JWKS validator", token.display());
    let svid = wait_event(&billing_rep, "x509")?;
    println!(
        "[creds]    billing holds an X.509 SVID from the Workload API stream: {}",
        svid["spiffe_id"].as_str().unwrap_or("?")
    );
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
    let fake_rep = dir.join("payments.jsonl");
    let fake = standin(
        &ns2,
        &swapped,
        &[
            "--app-id",
            "payments",
            "--config",
            &cfg.to_string_lossy(),
            "--sentry-address",
            &sentry_addr,
        ],
        &[
            ("DAPR_TRUST_ANCHORS", &anchors),
            ("STANDIN_REPORT", &fake_rep.to_string_lossy()),
        ],
    )?;
    println!("\n[attack]   a daprd built from a swapped binary starts as 'payments' and asks Sentry for a certificate");
    show(&wait_verdict(&db, fake.pid(), "contraindicated")?);
    let denied = wait_event(&fake_rep, "sentry_denied")?;
    println!(
        "[creds]    its certificate request: {} ({})",
        denied["code"].as_str().unwrap_or("?"),
        denied["message"].as_str().unwrap_or("")
    );

    // Impostor 2: a foreign listener on 3500 next to 'orders'.
    let mut py = ns.command("python3");
    // orders holds 127.0.0.1:3500; the impostor answers on another address.
    py.args(["-c", "import socket,time\ns=socket.socket()\ns.bind(('127.0.0.2',3500))\ns.listen()\ntime.sleep(60)"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _listener = Owned::new("foreign listener", py.spawn()?);
    println!("\n[attack]   a plain process (python3) starts listening on 127.0.0.2:3500 in orders' network namespace");
    show(&wait_verdict(&db, orders.pid(), "contraindicated")?);
    wait_file(&token, false)?;
    println!("[creds]    trust in orders withdrawn: vouchd removed its Sentry token; new certificates are refused until it is affirmed again");
    println!("\n[verifier] only affirming sidecars receive credentials; both impostors and the sidecar they sit next to are refused.");
    println!("[verifier] signed results (EAR, EdDSA) and the JWKS are at http://127.0.0.1:{http_port}/v1/sidecars and /.well-known/jwks.json");
    drop(v);
    println!("\nDemo finished; all processes stopped, network namespaces and state removed.");
    Ok(())
}
