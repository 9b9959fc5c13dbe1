//! The attesting Dapr Sentry endpoint: `/dapr.proto.sentry.v1.CA/SignCertificate`
//! over TLS on a node-local unix socket, so an unmodified daprd started
//! with `--sentry-address unix:///...` gets its workload certificate only
//! while the verifier affirms it.
//!
//! The server certificate carries the Sentry SPIFFE ID daprd checks and is
//! issued by the verifier's SVID CA (the trust anchors daprd is given,
//! kept by vouchd in the bundle file); it is renewed at half-life.
//!
//! Trust boundary: the request's id, namespace, trust domain and token are
//! claims and are ignored; the identity comes from the measured instance
//! the kernel says is calling. Only the CSR's public key is used.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tonic::{Request, Response, Status};
use vouch_proto::sentry::ca_server::{Ca, CaServer};
use vouch_proto::sentry::{SignCertificateRequest, SignCertificateResponse};

use crate::creds::{cert_pem, keypair_and_csr, unix_now, CredError, Creds};
use crate::serve::peer_of;
use crate::workload::audit_denied;

/// The server certificate, swapped on renewal.
#[derive(Debug, Default)]
struct SwapCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for SwapCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|g| g.clone())
    }
}

/// The CA service.
#[derive(Clone)]
pub struct SentryCa {
    creds: Arc<Creds>,
}

#[tonic::async_trait]
impl Ca for SentryCa {
    async fn sign_certificate(
        &self,
        r: Request<SignCertificateRequest>,
    ) -> Result<Response<SignCertificateResponse>, Status> {
        let peer = peer_of(&r).ok_or_else(|| Status::internal("no peer credentials"))?;
        let deny = |e: CredError| {
            audit_denied("sentry", &peer, &e);
            e.status()
        };
        let id = self
            .creds
            .identify_wait(&peer, Duration::from_secs(2))
            .await
            .map_err(deny)?;
        let req = r.into_inner();
        self.creds
            .entitled_wait(id, Duration::from_secs(3))
            .await
            .map_err(deny)?;
        let out = self
            .creds
            .sign(Some(id), req.certificate_signing_request)
            .await
            .map_err(deny)?;
        self.creds.recheck(&peer, id).map_err(deny)?;
        let claimed = format!("/ns/{}/{}", req.namespace, req.id);
        if !out.spiffe_id.ends_with(&claimed) {
            tracing::warn!(target: "vouch_audit", instance = %id, claimed_id = %req.id, claimed_namespace = %req.namespace, issued = %out.spiffe_id, "SignCertificate claims another identity; issued the measured one");
        }
        tracing::info!(instance = %id, spiffe_id = %out.spiffe_id, expires_at = out.expires_at, "workload certificate issued via the Sentry endpoint");
        Ok(Response::new(SignCertificateResponse {
            workload_certificate: cert_pem(&out.certificate).into_bytes(),
            trust_chain_certificates: out
                .bundle
                .iter()
                .map(|d| cert_pem(d).into_bytes())
                .collect(),
            valid_until: Some(prost_types::Timestamp {
                seconds: out.expires_at as i64,
                nanos: 0,
            }),
            jwt: None,
            per_audience_jwts: Default::default(),
        }))
    }
}

async fn server_cert(creds: &Creds) -> Result<(Arc<CertifiedKey>, u64, u64), CredError> {
    let (key, csr) = keypair_and_csr()?;
    let r = creds.sign(None, csr).await?;
    let provider = crate::serve::tls_provider();
    let sk = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()))
        .map_err(|e| CredError::Keygen(e.to_string()))?;
    let ck = CertifiedKey::new(vec![r.certificate.into()], sk);
    Ok((Arc::new(ck), unix_now(), r.expires_at))
}

/// Serves the Sentry endpoint on `listener` for as long as the process
/// lives (first waiting for a server certificate from the verifier).
pub async fn run(creds: Arc<Creds>, listener: tokio::net::UnixListener) {
    let swap = Arc::new(SwapCert::default());
    let (mut issued, mut expires) = loop {
        match server_cert(&creds).await {
            Ok((ck, i, e)) => {
                if let Ok(mut g) = swap.0.write() {
                    *g = Some(ck);
                }
                tracing::info!(expires_at = e, "Sentry endpoint certificate issued");
                break (i, e);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no Sentry endpoint certificate yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let renew = swap.clone();
    let creds2 = creds.clone();
    tokio::spawn(async move {
        loop {
            let half = issued + expires.saturating_sub(issued) / 2;
            let wait = half.saturating_sub(unix_now()).max(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match server_cert(&creds2).await {
                Ok((ck, i, e)) => {
                    if let Ok(mut g) = renew.0.write() {
                        *g = Some(ck);
                    }
                    (issued, expires) = (i, e);
                    tracing::info!(expires_at = e, "Sentry endpoint certificate renewed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Sentry endpoint certificate renewal failed; retrying")
                }
            }
        }
    });
    let mut cfg =
        match rustls::ServerConfig::builder_with_provider(Arc::new(crate::serve::tls_provider()))
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b.with_no_client_auth().with_cert_resolver(swap),
            Err(e) => {
                tracing::error!(error = %e, "TLS setup failed; Sentry endpoint not served");
                return;
            }
        };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    tracing::info!("attesting Sentry endpoint serving");
    let r = tonic::transport::Server::builder()
        .add_service(CaServer::new(SentryCa { creds }))
        .serve_with_incoming(crate::serve::incoming_tls(listener, acceptor))
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "Sentry endpoint stopped");
    }
}
