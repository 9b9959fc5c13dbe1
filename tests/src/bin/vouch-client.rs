//! A plain (not daprd) client of vouchd's credential sockets, for tests:
//!
//! - `vouch-client sentry SOCKET ANCHORS_FILE SENTRY_ID APP_ID`: one Dapr
//!   Sentry SignCertificate call; prints `{"code": ..., "message": ...}`.
//! - `vouch-client workload SOCKET`: one Workload API X.509 fetch; prints
//!   the code (and the SPIFFE ID on success).
//! - `vouch-client handoff SOCKET GO_FILE OUT_FILE`: connects, hands the
//!   connection to a child (`workload-inherited`, on its stdin) and exits at
//!   once, so the connection's SO_PEERCRED pid is free for reuse. The child
//!   waits for GO_FILE, then makes the Workload API call over the inherited
//!   connection and writes the outcome to OUT_FILE.
//! - `vouch-client raw-read OUT_FILE`: reads, from the connection on its
//!   stdin, the HTTP/2 answer to a request another process sent, and writes
//!   `credentials` if a gRPC message arrived, else `nothing`.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vouch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

fn outcome(r: Result<String, tonic::Status>) -> serde_json::Value {
    match r {
        Ok(id) => serde_json::json!({"code": "Ok", "spiffe_id": id}),
        Err(s) => serde_json::json!({"code": format!("{:?}", s.code()), "message": s.message()}),
    }
}

async fn fetch(ch: tonic::transport::Channel) -> Result<String, tonic::Status> {
    let mut c = SpiffeWorkloadApiClient::new(ch);
    let mut s = c
        .fetch_x509svid(vouch_standin::workload_request(
            vouch_proto::workload::X509svidRequest {},
        ))
        .await?
        .into_inner();
    match s.message().await? {
        Some(m) => Ok(m
            .svids
            .first()
            .map(|v| v.spiffe_id.clone())
            .unwrap_or_default()),
        None => Err(tonic::Status::unknown("stream ended without an SVID")),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["sentry", sock, anchors, sentry_id, app] => {
            let anchors = std::fs::read_to_string(anchors).context("anchors file")?;
            let v = rt.block_on(async {
                let (_key, csr) = vouch_standin::ed25519_csr()?;
                let ch = vouch_standin::sentry_channel(sock.as_ref(), &anchors, sentry_id).await?;
                let r = vouch_standin::sign_certificate(
                    ch,
                    vouch_proto::sentry::SignCertificateRequest {
                        id: (*app).to_owned(),
                        namespace: "prod".into(),
                        trust_domain: "public".into(),
                        certificate_signing_request: csr,
                        ..Default::default()
                    },
                )
                .await;
                Ok::<_, vouch_standin::ClientError>(match r {
                    Ok(_) => outcome(Ok("issued".into())),
                    Err(vouch_standin::ClientError::Status(s)) => outcome(Err(s)),
                    Err(e) => serde_json::json!({"code": "Transport", "message": e.to_string()}),
                })
            })?;
            println!("{v}");
        }
        ["workload", sock] => {
            let v = rt.block_on(async {
                let ch = vouch_standin::unix_channel(sock.as_ref()).await?;
                Ok::<_, vouch_standin::ClientError>(outcome(fetch(ch).await))
            })?;
            println!("{v}");
        }
        ["handoff", sock, go, out] => {
            let s = std::os::unix::net::UnixStream::connect(sock).context("connect")?;
            let exe = std::env::current_exe()?;
            std::process::Command::new(exe)
                .args(["workload-inherited", go, out])
                .stdin(OwnedFd::from(s))
                .spawn()
                .context("spawn the inheriting child")?;
            // Exit now: the connection's peer pid (ours) becomes reusable.
        }
        ["workload-inherited", go, out] => {
            while !std::path::Path::new(go).exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // fd 0 is the connection our parent opened.
            let fd = stdin_stream()?;
            let v = rt.block_on(async {
                let ch = vouch_standin::channel_over(fd).await?;
                Ok::<_, vouch_standin::ClientError>(outcome(fetch(ch).await))
            })?;
            let mut f = std::fs::File::create(out)?;
            writeln!(f, "{v}")?;
        }
        ["raw-read", out] => {
            let mut s = stdin_stream()?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let got = vouch_standin::raw_read_answer(&mut s).unwrap_or(false);
            std::fs::write(out, if got { "credentials" } else { "nothing" })?;
        }
        _ => bail!(
            "usage: vouch-client sentry|workload|handoff|raw-read ... (see the source header)"
        ),
    }
    Ok(())
}

/// Our stdin (the inherited connection) as a unix stream.
fn stdin_stream() -> Result<std::os::unix::net::UnixStream> {
    use std::os::fd::AsFd;
    let owned: OwnedFd = std::io::stdin().as_fd().try_clone_to_owned()?;
    Ok(std::os::unix::net::UnixStream::from(owned))
}
