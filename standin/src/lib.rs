//! Clients a daprd uses to get its credentials, as the stand-in (and the
//! tests' helper processes) use them: Dapr Sentry's `SignCertificate` over
//! TLS on a unix socket (the server is checked the way daprd checks it:
//! chain to `DAPR_TRUST_ANCHORS`, then the Sentry SPIFFE ID), and the SPIFFE
//! Workload API on a unix socket.
//!
//! Trust boundary: everything the server sends is checked (TLS chain and
//! SPIFFE ID) before a request is sent; replies are reported, not trusted.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};
use vouch_proto::sentry::ca_client::CaClient;
use vouch_proto::sentry::{SignCertificateRequest, SignCertificateResponse};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad trust anchors or TLS setup.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// Connecting failed.
    #[error("connect {path}: {reason}")]
    Connect {
        /// Socket.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{0}")]
    Status(#[from] tonic::Status),
    /// Key or CSR generation.
    #[error("key generation: {0}")]
    Keygen(String),
}

#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring, as everywhere in the workspace (no PQ key exchange needed on a
    // node-local socket).
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the server as daprd does: chain to the anchors (any DNS name),
/// then exactly the expected SPIFFE ID in the leaf's URI SAN.
#[derive(Debug)]
struct SpiffeVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    expected: String,
}

/// The URI SANs of a DER certificate (empty if it does not parse).
pub fn uri_sans(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked under the name the certificate itself
        // carries; the identity check is the SPIFFE ID below.
        let name =
            ServerName::try_from("localhost").map_err(|e| rustls::Error::General(e.to_string()))?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp, now)?;
        let uris = uri_sans(end_entity);
        if uris.len() == 1 && uris[0] == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server SPIFFE ID {uris:?} is not {}",
                self.expected
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A gRPC channel over TLS on the unix socket `path`, checking the server
/// against `anchors_pem` and `sentry_id`.
pub async fn sentry_channel(
    path: &Path,
    anchors_pem: &str,
    sentry_id: &str,
) -> Result<Channel, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for d in vouch_proto::pem::certificates(anchors_pem) {
        roots
            .add(CertificateDer::from(d))
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ClientError::Tls("no trust anchors".into()));
    }
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeVerifier {
            inner,
            expected: sentry_id.to_owned(),
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let path = path.to_owned();
    let p2 = path.clone();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let (path, connector) = (path.clone(), connector.clone());
            async move {
                let s = tokio::net::UnixStream::connect(&path).await?;
                let name = ServerName::try_from("localhost")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, s).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            path: p2,
            reason: format!("{e}: {:?}", std::error::Error::source(&e)),
        })
}

/// An Ed25519 key (daprd's default) and a PEM CSR for it: (key PEM, CSR PEM).
pub fn ed25519_csr() -> Result<(String, Vec<u8>), ClientError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
        .map_err(|e| ClientError::Keygen(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| ClientError::Keygen(e.to_string()))?;
    Ok((key.serialize_pem(), csr.into_bytes()))
}

/// One SignCertificate call over `channel`.
pub async fn sign_certificate(
    channel: Channel,
    req: SignCertificateRequest,
) -> Result<SignCertificateResponse, ClientError> {
    Ok(CaClient::new(channel)
        .sign_certificate(req)
        .await?
        .into_inner())
}

/// A plain gRPC channel on the unix socket `path` (Workload API).
pub async fn unix_channel(path: &Path) -> Result<Channel, ClientError> {
    let p = path.to_owned();
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = p.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            path: path.to_owned(),
            reason: e.to_string(),
        })
}

/// A gRPC channel over an already-connected unix stream (for example one
/// inherited from the process that opened it). The channel never dials
/// again: a second connection attempt fails.
pub async fn channel_over(s: std::os::unix::net::UnixStream) -> Result<Channel, ClientError> {
    s.set_nonblocking(true)
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let slot = Arc::new(std::sync::Mutex::new(Some(s)));
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let slot = slot.clone();
            async move {
                let s = slot
                    .lock()
                    .ok()
                    .and_then(|mut g| g.take())
                    .ok_or_else(|| std::io::Error::other("connection already used"))?;
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::from_std(s)?))
            }
        }))
        .await
        .map_err(|e| ClientError::Connect {
            path: "(inherited)".into(),
            reason: e.to_string(),
        })
}

/// A Workload API request with the required security header.
pub fn workload_request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

/// Splits concatenated DER certificates (the Workload API's bundle field).
pub fn split_der(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 4 && b[0] == 0x30 {
        // SEQUENCE with a long-form length (certificates are > 127 bytes).
        let (len, hdr) = match b[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 => (usize::from(b[2]), 3),
            0x82 => ((usize::from(b[2]) << 8) | usize::from(b[3]), 4),
            _ => break,
        };
        let Some(one) = b.get(..hdr + len) else { break };
        out.push(one.to_vec());
        b = &b[hdr + len..];
    }
    out
}

/// HPACK "literal header field without indexing, new name" (RFC 7541
/// 6.2.2) for short names and values.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A whole gRPC call `/SpiffeWorkloadAPI/FetchX509SVID` (empty request,
/// security header set) as raw HTTP/2 bytes: connection preface, SETTINGS,
/// HEADERS and one DATA frame ending the stream. For tests that must send a
/// request and then hand the connection to another process.
pub fn raw_fetch_x509svid() -> Vec<u8> {
    let mut headers = Vec::new();
    for (n, v) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("workload.spiffe.io", "true"),
    ] {
        hpack_literal(&mut headers, n, v);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut out, 0x4, 0, 0, &[]);
    h2_frame(&mut out, 0x1, 0x4, 1, &headers);
    h2_frame(&mut out, 0x0, 0x1, 1, &[0, 0, 0, 0, 0]);
    out
}

/// Reads HTTP/2 frames from `s` until stream 1 carries a DATA frame (a
/// gRPC message: credentials were sent) or ends without one (refused), or
/// the connection ends. Returns whether a message arrived.
pub fn raw_read_answer(s: &mut std::os::unix::net::UnixStream) -> std::io::Result<bool> {
    use std::io::{Read, Write};
    loop {
        let mut h = [0u8; 9];
        if s.read_exact(&mut h).is_err() {
            return Ok(false);
        }
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]);
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload)?;
        match (kind, stream) {
            // SETTINGS from the server: acknowledge.
            (0x4, 0) if flags & 0x1 == 0 => {
                let mut ack = Vec::new();
                h2_frame(&mut ack, 0x4, 0x1, 0, &[]);
                s.write_all(&ack)?;
            }
            (0x0, 1) if !payload.is_empty() => return Ok(true),
            (0x1, 1) | (0x0, 1) if flags & 0x1 != 0 => return Ok(false),
            (0x3, 1) => return Ok(false),
            _ => {}
        }
    }
}
