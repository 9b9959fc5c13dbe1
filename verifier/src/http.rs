//! The operators' JSON HTTP API and the published JWKS.
//!
//! - `GET /v1/nodes` — enrolled nodes.
//! - `GET /v1/sidecars` — every sidecar: node, verdict, reasons.
//! - `GET /v1/sidecars/{node_id}/{pid@start}/ear` — the sidecar's EAR
//!   (EdDSA-signed JWT, `application/jwt`).
//! - `GET /.well-known/jwks.json` — keys that verify EARs.
//!
//! Trust boundary: read-only; requests are untrusted and only select what
//! to show. Bind it to loopback or put it behind your own TLS/authz proxy.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::ear::EarSigner;
use crate::service::Verifier;

fn reply(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", v.to_string())
}

fn not_found(what: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::NOT_FOUND,
        "application/json",
        serde_json::json!({"error": what}).to_string(),
    )
}

/// Handles one request.
pub fn route(
    v: &Verifier,
    signer: &EarSigner,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            r#"{"error":"GET only"}"#.into(),
        );
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        [".well-known", "jwks.json"] => json(&signer.jwks()),
        ["v1", "nodes"] => json(&serde_json::json!(v
            .snapshot()
            .into_iter()
            .map(|(r, vs)| serde_json::json!({"node_id": r.node_id, "name": r.name, "labels": r.labels, "trust": r.trust, "sidecars": vs.len()}))
            .collect::<Vec<_>>())),
        ["v1", "sidecars"] => json(&serde_json::json!(v
            .snapshot()
            .into_iter()
            .flat_map(|(r, vs)| vs.into_iter().map(move |s| serde_json::json!({"node_id": r.node_id, "node": r.name, "instance": s.id.to_string(), "sidecar": s})))
            .collect::<Vec<_>>())),
        ["v1", "sidecars", node, inst, "ear"] => {
            let snap = v.snapshot();
            let Some((rec, vs)) = snap.iter().find(|(r, _)| r.node_id == *node) else {
                return not_found("no such node");
            };
            let Some(s) = vs.iter().find(|s| s.id.to_string() == *inst) else {
                return not_found("no such sidecar");
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            reply(StatusCode::OK, "application/jwt", signer.ear(&rec.name, s, &v.policy_names(), now))
        }
        _ => not_found("no such resource"),
    }
}

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, v: Arc<Verifier>, signer: Arc<EarSigner>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (v, signer) = (v.clone(), signer.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = route(&v, &signer, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}
