//! The SVID issuing CA: X.509 SVIDs for attested sidecars and the node's
//! Sentry-endpoint certificate, signed for a CSR.
//!
//! Owns the CA keys (ECDSA P-256, one file per CA generation, mode 0600 in
//! `<state>/svid-ca/`) and the trust bundle. Rollover: once the newest CA
//! is past half its lifetime a new one is made and becomes the signer; the
//! old one stays in the bundle until it expires, so peers holding either
//! bundle keep verifying each other during rotation.
//!
//! Trust boundary: the CSR comes from a node and is untrusted. Only its
//! public key (after its self-signature is checked) is used; every name in
//! the certificate comes from the caller of [`IssuingCa::issue`], which
//! derives it from measurements, never from the request.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// CA certificates are valid from this many seconds before they are made
/// (clock skew); their half-life counts from when they were made.
const BACKDATE: i64 = 60;

/// Most bytes accepted in one CSR.
pub const MAX_CSR: usize = 16 << 10;

/// CA errors.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// File I/O on a CA file.
    #[error("SVID CA file {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A CA file is not a usable certificate or key.
    #[error("SVID CA file {path}: {reason}")]
    BadFile {
        /// File.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The CSR is not PEM/DER, not a CSR, or its signature is wrong.
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// The SPIFFE ID is malformed.
    #[error("invalid SPIFFE ID {0:?}")]
    BadSpiffeId(String),
    /// Certificate generation failed.
    #[error("signing the certificate: {0}")]
    Sign(#[from] rcgen::Error),
}

struct Generation {
    /// Unix seconds the CA expires.
    not_after: i64,
    /// Unix seconds the CA was made.
    not_before: i64,
    der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

/// An issued certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, DER.
    pub leaf_der: Vec<u8>,
    /// Unix seconds the leaf expires.
    pub not_after: i64,
}

/// The issuing CA with every unexpired generation.
pub struct IssuingCa {
    dir: PathBuf,
    ttl: Duration,
    /// Newest last.
    gens: Vec<Generation>,
}

impl std::fmt::Debug for IssuingCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuingCa")
            .field("dir", &self.dir)
            .field("generations", &self.gens.len())
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

fn time_of(unix: i64) -> Result<time::OffsetDateTime, CaError> {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_err(|e| CaError::BadSpiffeId(format!("time {unix}: {e}")))
}

/// Checks the shape of a SPIFFE ID (`spiffe://<trust-domain>/<path>`).
pub fn check_spiffe_id(id: &str) -> Result<(), CaError> {
    let bad = || CaError::BadSpiffeId(id.to_owned());
    let rest = id.strip_prefix("spiffe://").ok_or_else(bad)?;
    let (td, path) = rest.split_once('/').ok_or_else(bad)?;
    let td_ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    let path_ok = !path.is_empty()
        && id.len() <= 2048
        && path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
    if td_ok && path_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

impl IssuingCa {
    /// Loads every CA generation in `dir` (creating it), drops expired ones
    /// and makes a new generation if none is usable or the newest is past
    /// half its lifetime.
    pub fn load_or_create(dir: &Path, ttl: Duration, now: i64) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut gens = Vec::new();
        let rd = std::fs::read_dir(dir).map_err(io_err(dir))?;
        let mut stems: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_suffix(".pem").map(str::to_owned)
            })
            .collect();
        stems.sort();
        for stem in stems {
            let pem_p = dir.join(format!("{stem}.pem"));
            let key_p = dir.join(format!("{stem}.key"));
            let pem = std::fs::read_to_string(&pem_p).map_err(io_err(&pem_p))?;
            let key_pem = std::fs::read_to_string(&key_p).map_err(io_err(&key_p))?;
            let bad = |reason: String| CaError::BadFile {
                path: pem_p.clone(),
                reason,
            };
            let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadFile {
                path: key_p.clone(),
                reason: e.to_string(),
            })?;
            let der = vouch_proto::pem::decode_first(&pem).map_err(|e| bad(e.to_string()))?;
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::BadFile {
                    path: pem_p.clone(),
                    reason: e.to_string(),
                })?;
            let not_after = cert.validity().not_after.timestamp();
            let not_before = cert.validity().not_before.timestamp();
            if not_after <= now {
                tracing::info!(ca = %pem_p.display(), "expired SVID CA generation left out of the bundle");
                continue;
            }
            let issuer = Issuer::from_ca_cert_pem(&pem, key).map_err(|e| bad(e.to_string()))?;
            gens.push(Generation {
                not_after,
                not_before,
                der,
                issuer,
            });
        }
        gens.sort_by_key(|g| g.not_before);
        let mut ca = Self {
            dir: dir.to_owned(),
            ttl,
            gens,
        };
        ca.rotate_if_due(now)?;
        Ok(ca)
    }

    /// Makes a new generation when none is usable or the newest is past
    /// half its lifetime; drops expired ones. Returns whether the bundle
    /// changed.
    pub fn rotate_if_due(&mut self, now: i64) -> Result<bool, CaError> {
        let before = self.gens.len();
        self.gens.retain(|g| g.not_after > now);
        let due = self.gens.last().is_none_or(|g| {
            let made = g.not_before + BACKDATE;
            now >= made + (g.not_after - made) / 2
        });
        if due {
            self.generate(now)?;
        }
        Ok(due || before != self.gens.len())
    }

    fn generate(&mut self, now: i64) -> Result<(), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("vouch SVID CA {now}"));
        p.distinguished_name.push(DnType::OrganizationName, "Vouch");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let not_after = now + self.ttl.as_secs() as i64;
        p.not_before = time_of(now - BACKDATE)?;
        p.not_after = time_of(not_after)?;
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = p.self_signed(&key)?;
        // A unique, sortable stem; never overwrite an existing generation.
        let mut stem = format!("{now:012}");
        let mut i = 0;
        while self.dir.join(format!("{stem}.pem")).exists() {
            i += 1;
            stem = format!("{now:012}-{i}");
        }
        let key_p = self.dir.join(format!("{stem}.key"));
        let pem_p = self.dir.join(format!("{stem}.pem"));
        write_new(&key_p, key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&pem_p, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(ca = %pem_p.display(), not_after, "new SVID CA generation (the previous one stays in the bundle until it expires)");
        self.gens.push(Generation {
            not_after,
            not_before: now - BACKDATE,
            der: cert.der().to_vec(),
            issuer: Issuer::new(p, key),
        });
        Ok(())
    }

    /// Every unexpired CA certificate, DER, newest first.
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.gens.iter().rev().map(|g| g.der.clone()).collect()
    }

    /// Signs a certificate for the public key in `csr` (PEM or DER) with
    /// `spiffe_id` as its only URI SAN (plus `dns` names), valid `ttl`
    /// from `now` but never beyond the signing CA.
    pub fn issue(
        &self,
        csr: &[u8],
        spiffe_id: &str,
        dns: &[String],
        ttl: Duration,
        now: i64,
    ) -> Result<Issued, CaError> {
        check_spiffe_id(spiffe_id)?;
        if csr.len() > MAX_CSR {
            return Err(CaError::BadCsr(format!(
                "{} bytes exceed the limit of {MAX_CSR}",
                csr.len()
            )));
        }
        let der = if csr.starts_with(b"-----BEGIN") {
            let s =
                std::str::from_utf8(csr).map_err(|_| CaError::BadCsr("PEM is not UTF-8".into()))?;
            vouch_proto::pem::decode_first(s).map_err(|e| CaError::BadCsr(e.to_string()))?
        } else {
            csr.to_vec()
        };
        let parsed = CertificateSigningRequestParams::from_der(&der.as_slice().into())
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let g = self
            .gens
            .last()
            .ok_or_else(|| CaError::BadCsr("no usable CA generation".into()))?;
        let not_after = (now + ttl.as_secs() as i64).min(g.not_after);
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "SPIFFE");
        p.subject_alt_names = vec![SanType::URI(
            spiffe_id
                .try_into()
                .map_err(|_| CaError::BadSpiffeId(spiffe_id.to_owned()))?,
        )];
        for d in dns {
            p.subject_alt_names.push(SanType::DnsName(
                d.as_str()
                    .try_into()
                    .map_err(|_| CaError::BadSpiffeId(d.clone()))?,
            ));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = time_of(now - 30)?;
        p.not_after = time_of(not_after)?;
        p.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        let cert = p.signed_by(&parsed.public_key, &g.issuer)?;
        Ok(Issued {
            leaf_der: cert.der().to_vec(),
            not_after,
        })
    }
}

fn random_serial() -> Result<[u8; 16], CaError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| CaError::BadCsr("system random source failed".into()))?;
    // Positive, non-zero leading byte.
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, Vec<u8>) {
        let k = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let mut p = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI(
            "spiffe://x/ns/default/other".try_into().unwrap(),
        ));
        let c = p.serialize_request(&k).unwrap();
        (k, c.der().to_vec())
    }

    #[test]
    fn issues_only_the_given_id_and_rolls_over() {
        let d = tempfile::tempdir().unwrap();
        let now = 1_800_000_000;
        let mut ca = IssuingCa::load_or_create(d.path(), Duration::from_secs(1000), now).unwrap();
        let (_, der) = csr();
        let out = ca
            .issue(
                &der,
                "spiffe://td/ns/default/app",
                &[],
                Duration::from_secs(900),
                now,
            )
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&out.leaf_der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect();
        assert_eq!(sans, vec!["URI(spiffe://td/ns/default/app)".to_string()]);
        assert_eq!(out.not_after, now + 900);
        // The key file is private.
        let key = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.path().extension().is_some_and(|x| x == "key"))
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(key.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        // Past half-life: a second generation; both in the bundle.
        assert!(ca.rotate_if_due(now + 600).unwrap());
        assert_eq!(ca.bundle_der().len(), 2);
        // Leaves never outlive their CA.
        let out = ca
            .issue(
                &der,
                "spiffe://td/ns/default/app",
                &[],
                Duration::from_secs(5000),
                now + 600,
            )
            .unwrap();
        assert_eq!(out.not_after, now + 600 + 1000);
        // Reloaded from disk: the same two generations; after the first
        // expires, one.
        let ca2 =
            IssuingCa::load_or_create(d.path(), Duration::from_secs(1000), now + 601).unwrap();
        assert_eq!(ca2.bundle_der(), ca.bundle_der());
        let ca3 =
            IssuingCa::load_or_create(d.path(), Duration::from_secs(1000), now + 1001).unwrap();
        assert_eq!(ca3.bundle_der().len(), 1);
    }

    #[test]
    fn bad_csrs_and_ids_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ca =
            IssuingCa::load_or_create(d.path(), Duration::from_secs(1000), 1_800_000_000).unwrap();
        let (_, mut der) = csr();
        let n = der.len();
        der[n - 3] ^= 1;
        assert!(matches!(
            ca.issue(
                &der,
                "spiffe://td/a",
                &[],
                Duration::from_secs(9),
                1_800_000_000
            ),
            Err(CaError::BadCsr(_))
        ));
        assert!(ca
            .issue(
                b"garbage",
                "spiffe://td/a",
                &[],
                Duration::from_secs(9),
                1_800_000_000
            )
            .is_err());
        for id in [
            "http://x/y",
            "spiffe://TD/a",
            "spiffe://td/",
            "spiffe://td/a/../b",
            "spiffe://td",
        ] {
            assert!(check_spiffe_id(id).is_err(), "{id}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_csr_bytes_never_panic(b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let d = tempfile::tempdir().unwrap();
            let ca = IssuingCa::load_or_create(d.path(), Duration::from_secs(1000), 1_800_000_000).unwrap();
            let _ = ca.issue(&b, "spiffe://td/a", &[], Duration::from_secs(9), 1_800_000_000);
        }
    }
}
