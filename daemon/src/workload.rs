//! The SPIFFE Workload API on a node-local unix socket: X.509 SVIDs (with
//! their keys) and JWT-SVIDs for attested daprd instances, trust bundles,
//! all streamed again on rotation and ended when trust is withdrawn.
//!
//! Trust boundary: the caller is whoever the kernel says opened the
//! connection ([`crate::creds::Peer`]); every reply is preceded by a
//! re-check that the caller is the same live process and still affirmed.
//! Refusals are PermissionDenied plus an audit event (`vouch_audit`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use vouch_proto::measurement::InstanceId;
use vouch_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use vouch_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};

use crate::creds::{CredError, Creds, Peer};
use crate::serve::peer_of;

/// The Workload API service.
#[derive(Clone)]
pub struct WorkloadApi {
    /// Credential state.
    pub creds: Arc<Creds>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Logs a refused credential request as an audit event.
pub fn audit_denied(api: &str, peer: &Peer, e: &CredError) {
    let exe = std::fs::read_link(format!("/proc/{}/exe", peer.pid))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    tracing::warn!(target: "vouch_audit", api, pid = peer.pid, uid = peer.uid, exe = %exe, reason = %e, "credential request denied");
}

impl WorkloadApi {
    async fn caller<B>(&self, r: &Request<B>) -> Result<(Arc<Peer>, InstanceId), Status> {
        if r.metadata()
            .get("workload.spiffe.io")
            .and_then(|v| v.to_str().ok())
            != Some("true")
        {
            return Err(Status::invalid_argument(
                "security header missing: send metadata workload.spiffe.io: true",
            ));
        }
        let peer = peer_of(r).ok_or_else(|| Status::internal("no peer credentials"))?;
        match self
            .creds
            .identify_wait(&peer, Duration::from_secs(2))
            .await
        {
            Ok(id) => Ok((peer, id)),
            Err(e) => {
                audit_denied("workload", &peer, &e);
                Err(e.status())
            }
        }
    }

    fn deny(peer: &Peer, e: CredError) -> Status {
        audit_denied("workload", peer, &e);
        e.status()
    }

    fn bundle_bytes(b: &[Vec<u8>]) -> Vec<u8> {
        b.concat()
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        r: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let (peer, id) = self.caller(&r).await?;
        let aud = r.into_inner().audience;
        if aud.is_empty() {
            return Err(Status::invalid_argument("audience is required"));
        }
        let j = self
            .creds
            .jwt(id, aud, false)
            .await
            .map_err(|e| Self::deny(&peer, e))?;
        self.creds
            .recheck(&peer, id)
            .map_err(|e| Self::deny(&peer, e))?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: j.spiffe_id,
                svid: j.token,
                hint: String::new(),
            }],
        }))
    }

    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        r: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let (peer, id) = self.caller(&r).await?;
        let creds = self.creds.clone();
        let s = follow(creds.clone(), peer, id, move |_| {
            let (jwks, td) = creds.jwks();
            Box::pin(async move {
                Ok(JwtBundlesResponse {
                    bundles: [(td, jwks.into_bytes())].into_iter().collect(),
                })
            })
        });
        Ok(Response::new(s))
    }

    type FetchX509SVIDStream = Stream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        r: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let (peer, id) = self.caller(&r).await?;
        let creds = self.creds.clone();
        let s = follow(creds.clone(), peer, id, move |id| {
            let creds = creds.clone();
            Box::pin(async move {
                let svid = creds.x509(id).await?;
                // The current bundle (a CA rollover reaches callers at
                // once, not only with their next SVID).
                let bundle = match creds.bundle() {
                    b if b.is_empty() => svid.bundle.clone(),
                    b => b,
                };
                Ok(X509svidResponse {
                    svids: vec![X509svid {
                        spiffe_id: svid.spiffe_id.clone(),
                        x509_svid: svid.leaf_der.clone(),
                        x509_svid_key: svid.key_pkcs8.clone(),
                        bundle: WorkloadApi::bundle_bytes(&bundle),
                        hint: String::new(),
                    }],
                    crl: Vec::new(),
                    federated_bundles: Default::default(),
                })
            })
        });
        Ok(Response::new(s))
    }

    type FetchX509BundlesStream = Stream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        r: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let (peer, id) = self.caller(&r).await?;
        let creds = self.creds.clone();
        let s = follow(creds.clone(), peer, id, move |_| {
            let creds = creds.clone();
            Box::pin(async move {
                let (_, td) = creds.jwks();
                Ok(X509BundlesResponse {
                    crl: Vec::new(),
                    bundles: [(td, WorkloadApi::bundle_bytes(&creds.bundle()))]
                        .into_iter()
                        .collect(),
                })
            })
        });
        Ok(Response::new(s))
    }
}

/// A stream that sends `make(id)` now, again whenever it changes (SVID
/// rotation at half-life, new bundle), and ends with PermissionDenied as
/// soon as trust in the caller is withdrawn or the caller is gone.
fn follow<T, F>(creds: Arc<Creds>, peer: Arc<Peer>, id: InstanceId, make: F) -> Stream<T>
where
    T: PartialEq + Clone + Send + 'static,
    F: Fn(InstanceId) -> Pin<Box<dyn std::future::Future<Output = Result<T, CredError>> + Send>>
        + Send
        + Sync
        + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<T, Status>>(4);
    tokio::spawn(async move {
        let mut changes = creds.subscribe();
        let mut last: Option<T> = None;
        loop {
            let item = match make(id).await {
                Ok(v) => creds.recheck(&peer, id).map(|()| v),
                Err(e) => Err(e),
            };
            match item {
                Ok(v) => {
                    if last.as_ref() != Some(&v) {
                        last = Some(v.clone());
                        if tx.send(Ok(v)).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let withdrawn = !matches!(e, CredError::Unavailable(_) | CredError::Pending(_));
                    if withdrawn {
                        audit_denied("workload", &peer, &e);
                        let _ = tx
                            .send(Err(Status::permission_denied(format!(
                                "trust withdrawn: {e}"
                            ))))
                            .await;
                        return;
                    }
                    tracing::warn!(instance = %id, error = %e, "cannot refresh credentials; retrying");
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
