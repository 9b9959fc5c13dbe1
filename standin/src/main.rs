//! A STAND-IN for daprd, for Vouch's tests. It is not Dapr.
//!
//! It takes daprd's flags (Go flag syntax), listens on the TCP ports daprd
//! would (`--dapr-http-port` 3500, `--dapr-grpc-port` 50001, and the public,
//! internal-gRPC and profiling ports when given) on `--dapr-listen-addresses`
//! (all interfaces by default), or on unix sockets in `--unix-domain-socket`
//! (`dapr-http-<app-id>.socket`, `dapr-grpc-<app-id>.socket`), and reads every
//! `--config` file and every file under each `--resources-path` /
//! `--components-path`, as daprd does at start. Then it waits until killed,
//! accepting and closing connections. `--exit-after-ms N` exits on its own.
//!
//! Credentials, as daprd gets them: with `--sentry-address unix:///PATH` it
//! asks that Sentry for a workload certificate (Ed25519 key, PEM CSR, app-id
//! from `SENTRY_LOCAL_IDENTITY` or `--app-id`, namespace from `NAMESPACE`),
//! checking the server against `DAPR_TRUST_ANCHORS` and Sentry's SPIFFE ID
//! (`--control-plane-trust-domain`, `--control-plane-namespace`), renews at
//! half-life and retries on failure (every `STANDIN_RETRY_MS`, default 10 s
//! like daprd). With `STANDIN_WORKLOAD_SOCKET` it follows the SPIFFE
//! Workload API's X.509 stream. Outcomes go as JSON lines to the file named
//! by `STANDIN_REPORT`.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::time::Duration;

fn main() {
    // Like daprd (Go), accept any bytes in argv.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let get = |name: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 1;
        while i < args.len() {
            let a = args[i].trim_start_matches('-');
            if let Some((n, v)) = a.split_once('=') {
                if n == name {
                    out.push(v.to_owned());
                }
            } else if a == name {
                if let Some(v) = args.get(i + 1) {
                    out.push(v.clone());
                    i += 1;
                }
            }
            i += 1;
        }
        out
    };
    let one = |v: Vec<String>| v.into_iter().last();
    let app_id = one(get("app-id")).unwrap_or_else(|| "standin".into());
    let http = one(get("dapr-http-port")).unwrap_or_else(|| "3500".into());
    let grpc = one(get("dapr-grpc-port")).unwrap_or_else(|| "50001".into());
    let mut ports = vec![http, grpc];
    ports.extend(one(get("dapr-public-port")));
    ports.extend(one(get("dapr-internal-grpc-port")));
    let addrs: Vec<String> = one(get("dapr-listen-addresses"))
        .map(|s| s.split(',').map(|a| a.trim().to_owned()).collect())
        .unwrap_or_else(|| vec!["0.0.0.0".into()]);
    let uds = one(get("unix-domain-socket"));
    let exit_after = one(get("exit-after-ms")).and_then(|v| v.parse::<u64>().ok());

    // Read the files daprd reads at start.
    let mut read = 0usize;
    for c in get("config") {
        if let Ok(mut f) = std::fs::File::open(&c) {
            let mut s = Vec::new();
            let _ = f.read_to_end(&mut s);
            read += 1;
        }
    }
    let mut dirs = get("resources-path");
    dirs.extend(get("components-path"));
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    read += usize::from(b.len() < usize::MAX);
                }
            }
        }
    }

    let mut tcp = Vec::new();
    let mut unix = Vec::new();
    match uds {
        Some(dir) => {
            for kind in ["http", "grpc"] {
                let p = format!("{}/dapr-{kind}-{app_id}.socket", dir.trim_end_matches('/'));
                let _ = std::fs::remove_file(&p);
                match UnixListener::bind(&p) {
                    Ok(l) => unix.push(l),
                    Err(e) => eprintln!("stand-in daprd: cannot listen on {p}: {e}"),
                }
            }
        }
        None => {
            for a in &addrs {
                let host = if a == "localhost" {
                    "127.0.0.1"
                } else {
                    a.as_str()
                };
                for p in &ports {
                    let spec = if host.contains(':') {
                        format!("[{host}]:{p}")
                    } else {
                        format!("{host}:{p}")
                    };
                    match TcpListener::bind(&spec) {
                        Ok(l) => tcp.push(l),
                        Err(e) => eprintln!("stand-in daprd: cannot listen on {spec}: {e}"),
                    }
                }
            }
        }
    }
    eprintln!(
        "stand-in daprd {app_id}: pid {}, {} tcp + {} unix listeners, {read} files read",
        std::process::id(),
        tcp.len(),
        unix.len()
    );
    for l in tcp {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
    for l in unix {
        std::thread::spawn(move || {
            for c in l.incoming() {
                drop(c);
            }
        });
    }
    if let Ok(sock) = std::env::var("STANDIN_RAW_WORKLOAD") {
        std::thread::spawn(move || raw_handoff(&sock));
    }
    let sentry =
        one(get("sentry-address")).and_then(|a| a.strip_prefix("unix://").map(str::to_owned));
    let workload = std::env::var("STANDIN_WORKLOAD_SOCKET").ok();
    if sentry.is_some() || workload.is_some() {
        let cp_td = one(get("control-plane-trust-domain")).unwrap_or_else(|| "localhost".into());
        let cp_ns = one(get("control-plane-namespace")).unwrap_or_else(|| "default".into());
        let app = app_id.clone();
        std::thread::spawn(move || {
            credentials(
                sentry,
                workload,
                app,
                format!("spiffe://{cp_td}/ns/{cp_ns}/dapr-sentry"),
            )
        });
    }
    match exit_after {
        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
        None => loop {
            std::thread::park();
        },
    }
}

fn report(v: serde_json::Value) {
    use std::io::Write;
    let Ok(path) = std::env::var("STANDIN_REPORT") else {
        eprintln!("stand-in daprd: {v}");
        return;
    };
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{v}");
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn credentials(
    sentry: Option<String>,
    workload: Option<String>,
    app_id: String,
    sentry_id: String,
) {
    let retry = Duration::from_millis(
        std::env::var("STANDIN_RETRY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000),
    );
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let mut tasks = Vec::new();
        if let Some(path) = sentry {
            tasks.push(tokio::spawn(sentry_loop(
                path.into(),
                app_id,
                sentry_id,
                retry,
            )));
        }
        if let Some(path) = workload {
            tasks.push(tokio::spawn(workload_loop(path.into(), retry)));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

async fn sentry_loop(path: std::path::PathBuf, app_id: String, sentry_id: String, retry: Duration) {
    use vouch_proto::sentry::{sign_certificate_request::TokenValidator, SignCertificateRequest};
    loop {
        let anchors = std::env::var("DAPR_TRUST_ANCHORS").unwrap_or_default();
        let id = std::env::var("SENTRY_LOCAL_IDENTITY").unwrap_or_else(|_| app_id.clone());
        let ns = std::env::var("NAMESPACE").unwrap_or_else(|_| "default".into());
        let attempt = async {
            let (key, csr) = vouch_standin::ed25519_csr()?;
            let ch = vouch_standin::sentry_channel(&path, &anchors, &sentry_id).await?;
            let r = vouch_standin::sign_certificate(
                ch,
                SignCertificateRequest {
                    id: id.clone(),
                    token: String::new(),
                    trust_domain: "public".into(),
                    namespace: ns.clone(),
                    certificate_signing_request: csr,
                    token_validator: TokenValidator::Insecure as i32,
                    jwt_audiences: Vec::new(),
                },
            )
            .await?;
            Ok::<_, vouch_standin::ClientError>((key, r))
        };
        let wait = match attempt.await {
            Ok((key, r)) => {
                if let Some(n) = std::env::var("STANDIN_SENTRY_BURST")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                {
                    sentry_burst(&path, &anchors, &sentry_id, &id, &ns, n).await;
                }
                let until = r.valid_until.map_or(0, |t| t.seconds.max(0) as u64);
                let leaf = vouch_proto::pem::certificates(&String::from_utf8_lossy(
                    &r.workload_certificate,
                ));
                let spiffe_id = leaf
                    .first()
                    .map(|d| vouch_standin::uri_sans(d).join(","))
                    .unwrap_or_default();
                report(serde_json::json!({
                    "event": "sentry_issued",
                    "requested_id": id,
                    "spiffe_id": spiffe_id,
                    "cert_pem": String::from_utf8_lossy(&r.workload_certificate),
                    "key_pem": key,
                    "anchors_pem": r.trust_chain_certificates.iter().map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>(),
                    "valid_until": until,
                }));
                // Renew at half the remaining lifetime, as daprd does.
                Duration::from_secs(until.saturating_sub(now_unix()) / 2)
                    .max(Duration::from_secs(1))
            }
            Err(e) => {
                let (code, message) = match &e {
                    vouch_standin::ClientError::Status(s) => {
                        (format!("{:?}", s.code()), s.message().to_owned())
                    }
                    other => ("Transport".into(), other.to_string()),
                };
                report(
                    serde_json::json!({"event": "sentry_denied", "requested_id": id, "code": code, "message": message}),
                );
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn workload_loop(path: std::path::PathBuf, retry: Duration) {
    use vouch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    loop {
        let r = async {
            let ch = vouch_standin::unix_channel(&path).await?;
            let mut c = SpiffeWorkloadApiClient::new(ch);
            if let Ok(aud) = std::env::var("STANDIN_JWT_AUDIENCE") {
                let j = c
                    .fetch_jwtsvid(vouch_standin::workload_request(
                        vouch_proto::workload::JwtsvidRequest {
                            audience: vec![aud],
                            spiffe_id: String::new(),
                        },
                    ))
                    .await?
                    .into_inner();
                for v in j.svids {
                    report(
                        serde_json::json!({"event": "jwt", "spiffe_id": v.spiffe_id, "token": v.svid}),
                    );
                }
            }
            let mut s = c
                .fetch_x509svid(vouch_standin::workload_request(
                    vouch_proto::workload::X509svidRequest {},
                ))
                .await?
                .into_inner();
            while let Some(m) = s.message().await? {
                for v in m.svids {
                    report(serde_json::json!({
                        "event": "x509",
                        "spiffe_id": v.spiffe_id,
                        "cert_pem": vouch_proto::pem::encode("CERTIFICATE", &v.x509_svid),
                        "key_pem": vouch_proto::pem::encode("PRIVATE KEY", &v.x509_svid_key),
                        "bundle_pem": vouch_standin::split_der(&v.bundle).iter().map(|d| vouch_proto::pem::encode("CERTIFICATE", d)).collect::<String>(),
                    }));
                }
            }
            Ok::<_, vouch_standin::ClientError>(())
        };
        let (code, message) = match r.await {
            Ok(()) => ("Ok".to_string(), "stream ended".to_string()),
            Err(vouch_standin::ClientError::Status(s)) => {
                (format!("{:?}", s.code()), s.message().to_owned())
            }
            Err(e) => ("Transport".into(), e.to_string()),
        };
        report(serde_json::json!({"event": "stream_end", "code": code, "message": message}));
        tokio::time::sleep(retry).await;
    }
}

/// Benchmark mode (`STANDIN_SENTRY_BURST=N`): N SignCertificate calls, 32
/// in flight over one connection, as fast as they are answered; reports
/// {"event": "burst", "ok", "denied", "secs"}.
async fn sentry_burst(
    path: &std::path::Path,
    anchors: &str,
    sentry_id: &str,
    id: &str,
    ns: &str,
    n: usize,
) {
    use vouch_proto::sentry::SignCertificateRequest;
    let Ok((_, csr)) = vouch_standin::ed25519_csr() else {
        return;
    };
    let Ok(ch) = vouch_standin::sentry_channel(path, anchors, sentry_id).await else {
        return;
    };
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (ch, next, csr) = (ch.clone(), next.clone(), csr.clone());
        let req = SignCertificateRequest {
            id: id.to_owned(),
            namespace: ns.to_owned(),
            trust_domain: "public".into(),
            certificate_signing_request: csr,
            ..Default::default()
        };
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut denied) = (0usize, 0usize);
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                match vouch_standin::sign_certificate(ch.clone(), req.clone()).await {
                    Ok(_) => ok += 1,
                    Err(_) => denied += 1,
                }
            }
            (ok, denied)
        }));
    }
    let (mut ok, mut denied) = (0, 0);
    for t in tasks {
        if let Ok((o, d)) = t.await {
            ok += o;
            denied += d;
        }
    }
    report(
        serde_json::json!({"event": "burst", "ok": ok, "denied": denied, "secs": t0.elapsed().as_secs_f64()}),
    );
}

/// Test mode for the pid-reuse race (`STANDIN_RAW_WORKLOAD=SOCKET`): once
/// `STANDIN_GO` exists, send a complete Workload API FetchX509SVID request
/// as raw HTTP/2 frames, hand the connection to `STANDIN_HANDOFF_TO
/// raw-read STANDIN_RAW_OUT` (which reads whatever answer comes), wait
/// 300 ms (vouchd identifies this process meanwhile) and exit, so the pid
/// is free while vouchd is still working on the answer.
fn raw_handoff(sock: &str) {
    use std::io::Write;
    let (Ok(go), Ok(to), Ok(out)) = (
        std::env::var("STANDIN_GO"),
        std::env::var("STANDIN_HANDOFF_TO"),
        std::env::var("STANDIN_RAW_OUT"),
    ) else {
        return;
    };
    while !std::path::Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else {
        return;
    };
    if s.write_all(&vouch_standin::raw_fetch_x509svid()).is_err() {
        return;
    }
    let Ok(dup) = s.try_clone() else { return };
    let spawned = std::process::Command::new(to)
        .args(["raw-read", &out])
        .stdin(std::os::fd::OwnedFd::from(dup))
        .spawn();
    if spawned.is_ok() {
        std::thread::sleep(Duration::from_millis(300));
        std::process::exit(0);
    }
}
