//! The verifier's TLS identity: a private CA and a server certificate made
//! on first start (keys 0600 in the state directory). Nodes are configured
//! with the CA certificate (`ca.pem`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File I/O.
    #[error("TLS file {path}")]
    Io {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation.
    #[error("generating the verifier's TLS certificate: {0}")]
    Gen(#[from] rcgen::Error),
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// (server cert chain PEM, server key PEM); creates ca.pem, server.pem and
/// server.key in `dir` if missing. `names` are the server's DNS names / IPs.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<(String, String), TlsError> {
    let (cert_p, key_p, ca_p) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("ca.pem"),
    );
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| TlsError::Io {
            path: p.to_owned(),
            source,
        })
    };
    if cert_p.exists() && key_p.exists() && ca_p.exists() {
        return Ok((read(&cert_p)?, read(&key_p)?));
    }
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "vouch-verifier CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name
        .push(DnType::CommonName, "vouch-verifier");
    let cert = leaf.signed_by(&key, &issuer)?;
    write(&ca_p, &ca_cert.pem(), 0o644)?;
    write(&key_p, &key.serialize_pem(), 0o600)?;
    let chain = format!("{}{}", cert.pem(), ca_cert.pem());
    write(&cert_p, &chain, 0o644)?;
    Ok((chain, key.serialize_pem()))
}
