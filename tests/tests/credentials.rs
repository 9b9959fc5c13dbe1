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
    openssl_verify_opts(dir, leaf, bundle, &[]);
}

fn openssl_verify_opts(dir: &Path, leaf: &str, bundle: &Path, opts: &[&str]) {
    let p = dir.join(format!("leaf-{}.pem", rand_suffix()));
    std::fs::write(&p, leaf).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .args(opts)
        .arg("-CAfile")
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

/// Writes the latest X.509 SVID from a stand-in's Workload API report as
/// (cert, key, bundle) files.
fn svid_files(dir: &Path, name: &str, v: &serde_json::Value) -> (PathBuf, PathBuf, PathBuf) {
    let f = |ext: &str, key: &str| {
        let p = dir.join(format!("{name}.{ext}"));
        std::fs::write(&p, v[key].as_str().unwrap()).unwrap();
        p
    };
    (
        f("crt", "cert_pem"),
        f("key", "key_pem"),
        f("bundle", "bundle_pem"),
    )
}

const PY_MTLS: &str = r#"
import ssl, socket, sys, json
role, crt, key, bundle, portfile = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if role == 'server' else ssl.PROTOCOL_TLS_CLIENT)
ctx.load_cert_chain(crt, key)
ctx.load_verify_locations(bundle)
ctx.verify_mode = ssl.CERT_REQUIRED
ctx.check_hostname = False  # SPIFFE: the identity is the URI SAN
def uris(c):
    return [v for (k, v) in c.get('subjectAltName', ()) if k == 'URI']
if role == 'server':
    s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(1)
    open(portfile + '.tmp', 'w').write(str(s.getsockname()[1]))
    import os; os.rename(portfile + '.tmp', portfile)
    c, _ = s.accept()
    t = ctx.wrap_socket(c, server_side=True)
    print(json.dumps({'peer': uris(t.getpeercert()), 'version': t.version()}))
    t.sendall(b'ok'); t.close()
else:
    import time
    for _ in range(500):
        try: port = int(open(portfile).read()); break
        except Exception: time.sleep(0.01)
    t = ctx.wrap_socket(socket.create_connection(('127.0.0.1', port)))
    print(json.dumps({'peer': uris(t.getpeercert()), 'version': t.version(), 'data': t.recv(2).decode()}))
"#;

#[test]
fn workload_api_svids_do_mtls_with_python_and_sentry_tokens_verify_with_pyjwt() {
    let Some(env) = Env::new() else { return };
    if !vouch_tests::require_tools(&["openssl", "python3"]) {
        return;
    }
    let dir = env.dir();
    let wl = env.workload_socket();
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let mut reports = Vec::new();
    let mut procs = Vec::new();
    let mut nss = Vec::new();
    for app in ["orders", "billing"] {
        let ns = Netns::new().unwrap();
        let rep = dir.join(format!("{app}.jsonl"));
        let token = tokens.join(format!("{app}.jwt"));
        procs.push(env.standin_env(
            &ns,
            app,
            &[],
            &[
                ("STANDIN_WORKLOAD_SOCKET", wl.to_str().unwrap()),
                ("STANDIN_RETRY_MS", "200"),
                ("STANDIN_REPORT", rep.to_str().unwrap()),
                ("DAPR_SENTRY_TOKEN_FILE", token.to_str().unwrap()),
                (
                    "STANDIN_JWT_AUDIENCE",
                    "spiffe://cluster.local/ns/prod/inventory",
                ),
            ],
        ));
        reports.push(rep);
        nss.push(ns);
    }
    let mut files = Vec::new();
    for (app, rep) in ["orders", "billing"].iter().zip(&reports) {
        let v = wait_event(rep, "x509", 0, 20);
        assert_eq!(
            v["spiffe_id"],
            format!("spiffe://cluster.local/ns/prod/{app}")
        );
        let (crt, key, bundle) = svid_files(&dir, app, &v);
        assert_eq!(
            uri_sans(&dir, v["cert_pem"].as_str().unwrap()),
            vec![format!("spiffe://cluster.local/ns/prod/{app}")]
        );
        openssl_verify(&dir, v["cert_pem"].as_str().unwrap(), &bundle);
        files.push((crt, key, bundle));
    }

    // Python's ssl: mTLS between two processes with the two SVIDs.
    let portfile = dir.join("py-port");
    let arg = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let server = Command::new("python3")
        .args(["-c", PY_MTLS, "server"])
        .args([
            arg(&files[0].0),
            arg(&files[0].1),
            arg(&files[0].2),
            arg(&portfile),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut server = vouch_tests::proc::Owned::new("python tls server", server);
    let client = Command::new("python3")
        .args(["-c", PY_MTLS, "client"])
        .args([
            arg(&files[1].0),
            arg(&files[1].1),
            arg(&files[1].2),
            arg(&portfile),
        ])
        .output()
        .unwrap();
    assert!(
        client.status.success(),
        "python client: {}",
        String::from_utf8_lossy(&client.stderr)
    );
    let c: serde_json::Value = serde_json::from_slice(&client.stdout).unwrap();
    assert_eq!(c["peer"][0], "spiffe://cluster.local/ns/prod/orders", "{c}");
    assert_eq!(c["data"], "ok");
    let out = server.wait_output(Duration::from_secs(10));
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        s["peer"][0], "spiffe://cluster.local/ns/prod/billing",
        "{s}"
    );

    // The Workload API socket is 0660.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&wl).unwrap().permissions().mode() & 0o777,
        0o660
    );

    // JWT-SVIDs from the Workload API verify with PyJWT against the JWKS.
    let verify = |tok: &str, aud: &str| -> serde_json::Value {
        let script = format!(
            "import json, sys, urllib.request, jwt\njwks=json.load(urllib.request.urlopen('http://127.0.0.1:{}/.well-known/jwks.json'))\ntok=sys.stdin.read().strip()\nkey=jwt.PyJWKSet.from_dict(jwks)[jwt.get_unverified_header(tok)['kid']]\nprint(json.dumps(jwt.decode(tok, key.key, algorithms=['EdDSA'], audience='{aud}')))\n",
            env.http_port
        );
        let mut c = Command::new("python3")
            .args(["-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(tok.as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "PyJWT: {} (http port {}, grpc port {}; verifier log:\n{})",
            String::from_utf8_lossy(&out.stderr),
            env.http_port,
            env.port,
            std::fs::read_to_string(env.dir().join("verifier.log")).unwrap_or_default()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let j = wait_event(&reports[0], "jwt", 0, 10);
    let claims = verify(
        j["token"].as_str().unwrap(),
        "spiffe://cluster.local/ns/prod/inventory",
    );
    assert_eq!(claims["sub"], "spiffe://cluster.local/ns/prod/orders");

    // The Sentry tokens vouchd wrote verify with PyJWT against the JWKS.
    for app in ["orders", "billing"] {
        let token = tokens.join(format!("{app}.jwt"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !token.exists() {
            assert!(Instant::now() < deadline, "no token file for {app}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let claims = verify(&std::fs::read_to_string(&token).unwrap(), SENTRY_ID);
        assert_eq!(
            claims["sub"],
            format!("spiffe://cluster.local/ns/prod/{app}")
        );
        assert_eq!(claims["aud"][0], SENTRY_ID);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&token).unwrap().mode() & 0o777, 0o600);
    }
}

/// A test HTTP receiver: records every POST body with its arrival time.
struct Hooks {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<(Instant, serde_json::Value)>>>,
}

impl Hooks {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_ok() {
                    if let Ok(v) = serde_json::from_slice(&body) {
                        g.lock().unwrap().push((Instant::now(), v));
                    }
                }
                let _ = c.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
            }
        });
        Self { port, got }
    }
}

#[test]
fn tampering_withdraws_everything_within_a_second() {
    let hooks = Hooks::start();
    let url = format!("http://127.0.0.1:{}/hook", hooks.port);
    let Some(env) = Env::with_verifier_env(&[("VOUCH_VERIFIER_WEBHOOKS", &url)]) else {
        return;
    };
    let dir = env.dir();
    let rep = dir.join("orders.jsonl");
    let token = dir.join("orders.jwt");
    let ns = Netns::new().unwrap();
    let good = env.standin_env(
        &ns,
        "orders",
        &[],
        &[
            (
                "STANDIN_WORKLOAD_SOCKET",
                env.workload_socket().to_str().unwrap(),
            ),
            ("STANDIN_RETRY_MS", "100"),
            ("STANDIN_REPORT", rep.to_str().unwrap()),
            ("DAPR_SENTRY_TOKEN_FILE", token.to_str().unwrap()),
        ],
    );
    wait_verdict(&env.db(), good.pid(), "affirming");
    wait_event(&rep, "x509", 0, 15);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !token.exists() {
        assert!(Instant::now() < deadline, "no token file");
        std::thread::sleep(Duration::from_millis(10));
    }
    let instance_prefix = format!("{}@", good.pid());
    let affirmed_hook = |v: &serde_json::Value| {
        v["instance"]
            .as_str()
            .unwrap_or("")
            .starts_with(&instance_prefix)
    };
    // The webhook saw it become affirming.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !hooks
        .got
        .lock()
        .unwrap()
        .iter()
        .any(|(_, v)| affirmed_hook(v) && v["to"] == "affirming")
    {
        assert!(Instant::now() < deadline, "no affirming webhook");
        std::thread::sleep(Duration::from_millis(10));
    }
    let seen = report(&rep).len();

    // Tamper: its Configuration turns mTLS off.
    let t0 = Instant::now();
    std::fs::write(
        dir.join("config.yaml"),
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata:\n  name: c\nspec:\n  mtls:\n    enabled: false\n",
    )
    .unwrap();
    let limit = t0 + Duration::from_secs(1);
    let (mut gone, mut ended, mut refused, mut hooked) = (None, None, None, None);
    while Instant::now() < limit + Duration::from_secs(2) {
        let now = Instant::now();
        if gone.is_none() && !token.exists() {
            gone = Some(now);
        }
        let ends: Vec<_> = report(&rep)
            .into_iter()
            .skip(seen)
            .filter(|v| v["event"] == "stream_end")
            .collect();
        if ended.is_none() && !ends.is_empty() {
            assert_eq!(ends[0]["code"], "PermissionDenied", "{:?}", ends[0]);
            ended = Some(now);
        }
        // A renewal attempt after the end is refused too.
        if refused.is_none() && ends.len() >= 2 {
            assert_eq!(ends[1]["code"], "PermissionDenied", "{:?}", ends[1]);
            refused = Some(now);
        }
        if hooked.is_none() {
            hooked = hooks
                .got
                .lock()
                .unwrap()
                .iter()
                .find(|(_, v)| affirmed_hook(v) && v["to"] == "contraindicated")
                .map(|(t, _)| *t);
        }
        if gone.is_some() && ended.is_some() && refused.is_some() && hooked.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for (what, at) in [
        ("token file removed", gone),
        ("stream ended", ended),
        ("renewal refused", refused),
        ("webhook received", hooked),
    ] {
        let at = at.unwrap_or_else(|| panic!("{what}: never (report {:?})", report(&rep)));
        assert!(at <= limit, "{what} after {:?}", at - t0);
        eprintln!("{what} after {:?}", at - t0);
    }
    let hook = hooks
        .got
        .lock()
        .unwrap()
        .iter()
        .find(|(_, v)| affirmed_hook(v) && v["to"] == "contraindicated")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(hook["from"], "affirming");
    assert_eq!(hook["spiffe_id"], "spiffe://cluster.local/ns/prod/orders");
    assert!(
        hook["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule"] == "posture.mtls"),
        "{hook}"
    );
}

/// Spawns `cmd` until the kernel gives it `pid` (forced through
/// /proc/sys/kernel/ns_last_pid); None if that is not possible here.
fn spawn_at_pid(
    pid: u32,
    mut make: impl FnMut() -> vouch_tests::proc::Owned,
) -> Option<vouch_tests::proc::Owned> {
    for _ in 0..200 {
        if std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).is_err() {
            return None;
        }
        let p = make();
        if p.pid() == pid {
            return Some(p);
        }
        drop(p);
    }
    None
}

#[test]
fn a_reused_pid_never_receives_the_callers_credentials() {
    let Some(env) = Env::new() else { return };
    let dir = env.dir();
    let wl = env.workload_socket();
    let (go, out) = (dir.join("go"), dir.join("out.json"));
    // The caller connects, hands its connection to a child and exits: the
    // connection's peer pid is now free.
    let mut caller = vouch_tests::proc::Owned::new(
        "handoff caller",
        Command::new(workspace_bin("vouch-client").unwrap())
            .arg("handoff")
            .args([&wl, &go, &out])
            .spawn()
            .unwrap(),
    );
    let pid = caller.pid();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !caller.exited() {
        assert!(Instant::now() < deadline, "caller did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Force the race: an affirmed daprd takes exactly that pid.
    let ns = Netns::new().unwrap();
    let rep = dir.join("reuser.jsonl");
    let reuser = spawn_at_pid(pid, || {
        env.standin_env(
            &ns,
            "orders",
            &[],
            &[
                ("STANDIN_WORKLOAD_SOCKET", wl.to_str().unwrap()),
                ("STANDIN_RETRY_MS", "200"),
                ("STANDIN_REPORT", rep.to_str().unwrap()),
            ],
        )
    });
    let Some(reuser) = reuser else {
        assert!(
            std::env::var("CI").is_err(),
            "cannot force pid reuse (needs root for /proc/sys/kernel/ns_last_pid)"
        );
        eprintln!("SKIP: cannot force pid reuse here");
        return;
    };
    wait_verdict(&env.db(), reuser.pid(), "affirming");
    // The daprd now at that pid is entitled (it gets its own SVID) ...
    let own = wait_event(&rep, "x509", 0, 15);
    assert_eq!(own["spiffe_id"], "spiffe://cluster.local/ns/prod/orders");
    // ... but the connection opened by the exited caller gets nothing.
    std::fs::write(&go, "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.exists() {
        assert!(
            Instant::now() < deadline,
            "the inheriting child reported nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    assert!(v["message"].as_str().unwrap().contains("exited"), "{v}");
}

fn not_after(dir: &Path, pem: &str) -> String {
    let p = dir.join(format!("na-{}.pem", rand_suffix()));
    std::fs::write(&p, pem).unwrap();
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-enddate", "-in"])
            .arg(&p),
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn verifier_down_means_no_new_credentials_and_issuing_resumes_when_it_is_back() {
    let Some(mut env) = Env::with_verifier_env(&[("VOUCH_VERIFIER_SVID_TTL_S", "4")]) else {
        return;
    };
    if !vouch_tests::require_tools(&["openssl"]) {
        return;
    }
    let dir = env.dir();
    let wl = env.workload_socket();
    let standin = |env: &Env, ns: &Netns, app: &str, rep: &Path| {
        env.standin_env(
            ns,
            app,
            &[],
            &[
                ("STANDIN_WORKLOAD_SOCKET", wl.to_str().unwrap()),
                ("STANDIN_RETRY_MS", "200"),
                ("STANDIN_REPORT", rep.to_str().unwrap()),
            ],
        )
    };
    let (ns_a, ns_b) = (Netns::new().unwrap(), Netns::new().unwrap());
    let (rep_a, rep_b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    let a = standin(&env, &ns_a, "orders", &rep_a);
    wait_verdict(&env.db(), a.pid(), "affirming");
    wait_event(&rep_a, "x509", 0, 15);
    // Rotation at half-life (2 s): a second SVID arrives while all is well.
    let first = report(&rep_a).len();
    wait_event(&rep_a, "x509", first, 10);
    let vouchd_pid = env.vouchd.pid();

    // The verifier goes away.
    env.verifier.take().unwrap().stop();
    let stopped = Instant::now();
    let before = report(&rep_a).len();
    let last = report(&rep_a)
        .into_iter()
        .rev()
        .find(|v| v["event"] == "x509")
        .unwrap();
    // A new instance gets nothing.
    let b = standin(&env, &ns_b, "billing", &rep_b);
    // The existing SVID lives out its lifetime (4 s), no longer.
    std::thread::sleep(Duration::from_secs(5).saturating_sub(stopped.elapsed()));
    assert!(
        report(&rep_a)
            .into_iter()
            .skip(before)
            .all(|v| v["event"] != "x509"),
        "a new SVID was served with the verifier down: {:?}",
        report(&rep_a)
    );
    assert!(report(&rep_b).iter().all(|v| v["event"] != "x509"));
    let leaf = last["cert_pem"].as_str().unwrap();
    let p = dir.join("expired.pem");
    std::fs::write(&p, leaf).unwrap();
    let bundle = dir.join("vouchd/bundle.pem");
    let v = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&bundle)
        .arg(&p)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(
        !v.status.success() && said.contains("expired"),
        "the SVID ({}) should have expired: {}{}",
        not_after(&dir, leaf),
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    // The verifier is back: both get SVIDs, vouchd never restarted.
    env.start_verifier();
    let back = report(&rep_a).len();
    let again = wait_event(&rep_a, "x509", back, 20);
    assert_eq!(again["spiffe_id"], "spiffe://cluster.local/ns/prod/orders");
    openssl_verify(&dir, again["cert_pem"].as_str().unwrap(), &bundle);
    let vb = wait_event(&rep_b, "x509", 0, 20);
    assert_eq!(vb["spiffe_id"], "spiffe://cluster.local/ns/prod/billing");
    assert_eq!(env.vouchd.pid(), vouchd_pid);
    drop(b);
}

#[test]
fn a_policy_can_stop_the_contraindicated_process() {
    let Some(env) = Env::new() else { return };
    let dir = env.dir();
    // The operator asks for SIGSTOP on contraindication (live reload), for
    // two app-ids only this test uses (other tests' vouchds and stand-ins
    // share the machine).
    let (a, b) = (
        format!("stop-{}", rand_suffix()),
        format!("stop-{}", rand_suffix()),
    );
    std::fs::write(
        dir.join("policies/stop.yaml"),
        format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: stop\nspec:\n  selector:\n    appIds: [{a}, {b}]\n  response: stop\n"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let ns = Netns::new().unwrap();
    let good = env.standin(&ns, &a, &[]);
    wait_verdict(&env.db(), good.pid(), "affirming");
    let state = |pid: u32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        s.rsplit_once(") ")
            .and_then(|(_, r)| r.chars().next())
            .unwrap_or('?')
    };
    assert_ne!(state(good.pid()), 'T');
    // A second daprd next to it: both contraindicated, both stopped.
    let second = env.standin(
        &ns,
        &b,
        &["--dapr-http-port", "3600", "--dapr-grpc-port", "50002"],
    );
    wait_verdict(&env.db(), good.pid(), "contraindicated");
    let deadline = Instant::now() + Duration::from_secs(5);
    while state(good.pid()) != 'T' || state(second.pid()) != 'T' {
        assert!(
            Instant::now() < deadline,
            "not stopped: {} {}",
            state(good.pid()),
            state(second.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the harness's SIGTERM take effect.
    for p in [good.pid(), second.pid()] {
        let _ = Command::new("kill")
            .args(["-CONT", &p.to_string()])
            .status();
    }
}

#[test]
fn a_ca_rollover_reaches_callers_with_old_and_new_ca_in_the_bundle() {
    // CA generations of 60 s rotate at 30 s; SVIDs live 4 s.
    let Some(env) = Env::with_verifier_env(&[
        ("VOUCH_VERIFIER_CA_TTL_S", "60"),
        ("VOUCH_VERIFIER_SVID_TTL_S", "4"),
    ]) else {
        return;
    };
    if !vouch_tests::require_tools(&["openssl"]) {
        return;
    }
    let dir = env.dir();
    let rep = dir.join("orders.jsonl");
    let ns = Netns::new().unwrap();
    let _good = env.standin_env(
        &ns,
        "orders",
        &[],
        &[
            (
                "STANDIN_WORKLOAD_SOCKET",
                env.workload_socket().to_str().unwrap(),
            ),
            ("STANDIN_RETRY_MS", "200"),
            ("STANDIN_REPORT", rep.to_str().unwrap()),
        ],
    );
    let first = wait_event(&rep, "x509", 0, 20);
    let count = |pem: &str| pem.matches("BEGIN CERTIFICATE").count();
    assert_eq!(count(first["bundle_pem"].as_str().unwrap()), 1);
    // Wait for a message whose bundle holds both generations.
    let deadline = Instant::now() + Duration::from_secs(60);
    let both = loop {
        if let Some(v) = report(&rep)
            .into_iter()
            .find(|v| v["event"] == "x509" && count(v["bundle_pem"].as_str().unwrap_or("")) == 2)
        {
            break v;
        }
        assert!(Instant::now() < deadline, "no rollover reached the caller");
        std::thread::sleep(Duration::from_millis(100));
    };
    let bundle = dir.join("both.pem");
    std::fs::write(&bundle, both["bundle_pem"].as_str().unwrap()).unwrap();
    // A certificate from the old CA and one from the new both verify
    // against the bundle callers now hold.
    let newest = wait_event(&rep, "x509", report(&rep).len(), 10);
    openssl_verify(&dir, newest["cert_pem"].as_str().unwrap(), &bundle);
    let old_ca = dir.join("old-ca.pem");
    let old_pem: String = first["bundle_pem"].as_str().unwrap().to_owned();
    std::fs::write(&old_ca, &old_pem).unwrap();
    assert!(both["bundle_pem"]
        .as_str()
        .unwrap()
        .contains(old_pem.trim()));
    let issuers: std::collections::HashSet<String> = report(&rep)
        .into_iter()
        .filter(|v| v["event"] == "x509")
        .map(|v| {
            let p = dir.join(format!("c-{}.pem", rand_suffix()));
            std::fs::write(&p, v["cert_pem"].as_str().unwrap()).unwrap();
            let o = run_ok(
                Command::new("openssl")
                    .args(["x509", "-noout", "-issuer", "-in"])
                    .arg(&p),
            )
            .unwrap();
            // Short-lived SVIDs from earlier may have expired by now: the
            // chain is what is checked here.
            openssl_verify_opts(
                &dir,
                v["cert_pem"].as_str().unwrap(),
                &bundle,
                &["-no_check_time"],
            );
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        })
        .collect();
    assert!(
        issuers.len() >= 2,
        "SVIDs from both CA generations: {issuers:?}"
    );
}

#[test]
fn a_caller_gone_between_identification_and_reply_gets_nothing() {
    let Some(mut env) = Env::new() else { return };
    let dir = env.dir();
    let (go, out) = (dir.join("go"), dir.join("answer"));
    let ns = Netns::new().unwrap();
    let client = workspace_bin("vouch-client").unwrap();
    // An affirmed daprd that will send a Workload API request, hand the
    // connection to a child and exit while vouchd works on the answer.
    let mut caller = env.standin_env(
        &ns,
        "orders",
        &[],
        &[
            (
                "STANDIN_RAW_WORKLOAD",
                env.workload_socket().to_str().unwrap(),
            ),
            ("STANDIN_GO", go.to_str().unwrap()),
            ("STANDIN_HANDOFF_TO", client.to_str().unwrap()),
            ("STANDIN_RAW_OUT", out.to_str().unwrap()),
        ],
    );
    let pid = caller.pid();
    wait_verdict(&env.db(), pid, "affirming");
    // Hold the answer: the verifier (which must sign) is stopped.
    let vpid = env.verifier.as_ref().unwrap().pid().to_string();
    run_ok(Command::new("kill").args(["-STOP", &vpid])).unwrap();
    std::fs::write(&go, "").unwrap();
    // vouchd identifies the live, affirmed caller; then the caller exits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !caller.exited() {
        assert!(Instant::now() < deadline, "caller did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Force the race: another process takes the caller's pid.
    let reuser = spawn_at_pid(pid, || {
        vouch_tests::proc::Owned::new(
            "pid reuser",
            Command::new("sleep").arg("30").spawn().unwrap(),
        )
    });
    let resume = || {
        let _ = Command::new("kill").args(["-CONT", &vpid]).status();
    };
    let Some(_reuser) = reuser else {
        resume();
        assert!(
            std::env::var("CI").is_err(),
            "cannot force pid reuse (needs root for /proc/sys/kernel/ns_last_pid)"
        );
        eprintln!("SKIP: cannot force pid reuse here");
        return;
    };
    // The verifier answers; vouchd's re-check before replying must refuse.
    resume();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !out.exists() {
        assert!(
            Instant::now() < deadline,
            "the inheriting child reported nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "nothing");
    let log = std::fs::read_to_string(dir.join("vouchd.stderr.log")).unwrap();
    assert!(
        // Refused at reply time, for whichever vouchd saw first: the
        // calling process is gone, or its instance exited.
        log.lines().any(|l| l.contains("vouch_audit")
            && l.contains("credential request denied")
            && (l.contains(&format!("(pid {pid}) exited"))
                || l.contains(&format!("instance {pid}@")))),
        "no audit event for the exited caller:\n{}",
        log.lines()
            .filter(|l| l.contains("audit") || l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    env.verifier.take();
}
