//! Enrollment: is this EK a real TPM's, and does this AK live in that TPM?
//!
//! Owns EK certificate validation (path building to configured
//! TPM-manufacturer CAs, or an explicit allowlist of EK public-key hashes,
//! or trust on first use only when the operator enables it) and the
//! credential challenge that binds the AK to the EK (software
//! MakeCredential; the node answers with TPM2_ActivateCredential).
//! Trust boundary: the EK public area, its certificate and chain and the AK
//! public area all come from the node; only the configured CA bundle and
//! allowlist are trusted.

use std::collections::HashSet;
use std::path::Path;

use vouch_proto::credential::{make_credential, MadeCredential};
use vouch_proto::name::name_of_public;
use vouch_proto::quote::AkVerifier;
use vouch_proto::tpm::{Public, PublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as SpkiKey;
use x509_parser::time::ASN1Time;

/// Why a node cannot enroll.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    /// A TPM structure from the node did not parse.
    #[error("{what} malformed: {reason}")]
    Malformed {
        /// Which structure.
        what: &'static str,
        /// Parser error.
        reason: String,
    },
    /// A certificate did not parse.
    #[error("{which} certificate does not parse: {reason}")]
    CertParse {
        /// Which certificate.
        which: String,
        /// Parser error.
        reason: String,
    },
    /// No path from the EK certificate to a configured CA.
    #[error("EK certificate does not chain to a configured TPM-manufacturer CA: {0}")]
    Untrusted(String),
    /// A certificate on the path is outside its validity period.
    #[error("{which} certificate is not valid at this time")]
    Expired {
        /// Which certificate.
        which: String,
    },
    /// The certified key is not the EK the node presented.
    #[error("EK certificate certifies another key than the EK public area presented")]
    EkKeyMismatch,
    /// The AK cannot be an attestation key.
    #[error("AK rejected: {0}")]
    BadAk(String),
    /// MakeCredential failed.
    #[error("credential: {0}")]
    Credential(String),
    /// The node did not return the secret: its AK is not in that TPM.
    #[error("activated secret does not match: the AK is not bound to this EK")]
    SecretMismatch,
}

/// How EKs are trusted.
#[derive(Debug, Clone, Default)]
pub struct EkTrust {
    /// DER certificates of the configured TPM-manufacturer CAs (roots and
    /// intermediates; any of them anchors a path).
    pub anchors: Vec<Vec<u8>>,
    /// Hex SHA-256 of EK public areas (TPMT_PUBLIC) trusted without a
    /// certificate.
    pub allowlist: HashSet<String>,
    /// Trust on first use (operator switch; logged as such).
    pub tofu: bool,
}

/// How an EK was trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustBasis {
    /// Certificate chained to a configured CA (its subject).
    Certificate(String),
    /// EK public hash on the allowlist.
    Allowlist,
    /// Trust on first use.
    FirstUse,
}

impl EkTrust {
    /// Reads a PEM bundle of CA certificates.
    pub fn add_pem_bundle(&mut self, path: &Path) -> Result<usize, String> {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 0;
        for pem in x509_parser::pem::Pem::iter_from_buffer(&data) {
            let pem = pem.map_err(|e| format!("{}: {e}", path.display()))?;
            X509Certificate::from_der(&pem.contents)
                .map_err(|e| format!("{}: certificate {n}: {e}", path.display()))?;
            self.anchors.push(pem.contents);
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: no PEM certificates", path.display()));
        }
        Ok(n)
    }
}

/// Hex SHA-256 of an EK public area: the EK's stable identity.
pub fn ek_id(ek_public: &[u8]) -> String {
    hex::encode(vouch_proto::event::digest(ek_public))
}

fn parse_cert<'a>(der: &'a [u8], which: &str) -> Result<X509Certificate<'a>, EnrollError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| EnrollError::CertParse {
            which: which.to_owned(),
            reason: e.to_string(),
        })
}

fn key_matches(cert: &X509Certificate<'_>, ek: &Public) -> bool {
    let trim = |b: &[u8]| {
        let i = b.iter().position(|x| *x != 0).unwrap_or(b.len());
        b[i..].to_vec()
    };
    match (cert.public_key().parsed(), &ek.key) {
        (
            Ok(SpkiKey::RSA(rsa)),
            PublicKey::Rsa {
                modulus, exponent, ..
            },
        ) => {
            let e = if *exponent == 0 { 65537 } else { *exponent };
            trim(rsa.modulus) == trim(modulus) && trim(rsa.exponent) == trim(&e.to_be_bytes())
        }
        (Ok(SpkiKey::EC(point)), PublicKey::Ecc { x, y, .. }) => {
            let d = point.data();
            let half = d.len().saturating_sub(1) / 2;
            d.first() == Some(&4)
                && trim(&d[1..1 + half]) == trim(x)
                && trim(&d[1 + half..]) == trim(y)
        }
        _ => false,
    }
}

/// Validates the EK: its certificate chains (through node-supplied
/// intermediates if needed) to a configured CA and certifies exactly this
/// EK public area; or the EK is allowlisted; or first use is trusted.
pub fn validate_ek(
    trust: &EkTrust,
    ek_public: &[u8],
    ek_cert: &[u8],
    chain: &[Vec<u8>],
    now_unix: i64,
) -> Result<TrustBasis, EnrollError> {
    let ek = Public::parse(ek_public).map_err(|e| EnrollError::Malformed {
        what: "EK TPMT_PUBLIC",
        reason: e.to_string(),
    })?;
    if trust.allowlist.contains(&ek_id(ek_public)) {
        return Ok(TrustBasis::Allowlist);
    }
    let path_result = (|| {
        let leaf = parse_cert(ek_cert, "EK")?;
        if !key_matches(&leaf, &ek) {
            return Err(EnrollError::EkKeyMismatch);
        }
        let now = ASN1Time::from_timestamp(now_unix)
            .map_err(|e| EnrollError::Untrusted(e.to_string()))?;
        if !leaf.validity().is_valid_at(now) {
            return Err(EnrollError::Expired { which: "EK".into() });
        }
        let anchors: Vec<X509Certificate<'_>> = trust
            .anchors
            .iter()
            .enumerate()
            .map(|(i, d)| parse_cert(d, &format!("CA bundle #{i}")))
            .collect::<Result<_, _>>()?;
        let inter: Vec<X509Certificate<'_>> = chain
            .iter()
            .enumerate()
            .map(|(i, d)| parse_cert(d, &format!("chain #{i}")))
            .collect::<Result<_, _>>()?;
        let mut current = leaf;
        for _depth in 0..8 {
            let issuer_raw = current.issuer().as_raw();
            if let Some(a) = anchors.iter().find(|a| {
                a.subject().as_raw() == issuer_raw
                    && current.verify_signature(Some(a.public_key())).is_ok()
            }) {
                if !a.validity().is_valid_at(now) {
                    return Err(EnrollError::Expired {
                        which: a.subject().to_string(),
                    });
                }
                return Ok(TrustBasis::Certificate(a.subject().to_string()));
            }
            let next = inter.iter().find(|c| {
                c.subject().as_raw() == issuer_raw
                    && current.verify_signature(Some(c.public_key())).is_ok()
                    && c.basic_constraints()
                        .ok()
                        .flatten()
                        .is_some_and(|b| b.value.ca)
            });
            match next {
                Some(c) => {
                    if !c.validity().is_valid_at(now) {
                        return Err(EnrollError::Expired {
                            which: c.subject().to_string(),
                        });
                    }
                    current = c.clone();
                }
                None => {
                    return Err(EnrollError::Untrusted(format!(
                        "no configured CA or supplied intermediate issued {:?} (issuer {})",
                        current.subject().to_string(),
                        current.issuer()
                    )))
                }
            }
        }
        Err(EnrollError::Untrusted(
            "chain longer than 8 certificates".into(),
        ))
    })();
    match path_result {
        Ok(b) => Ok(b),
        Err(e @ (EnrollError::EkKeyMismatch | EnrollError::Malformed { .. })) => Err(e),
        Err(e) if trust.tofu => {
            tracing::warn!(error = %e, ek = %ek_id(ek_public), "EK accepted on TRUST ON FIRST USE (operator switch)");
            Ok(TrustBasis::FirstUse)
        }
        Err(e) => Err(e),
    }
}

/// A pending enrollment: the secret the node must return.
#[derive(Debug, Clone)]
pub struct Challenge {
    /// The secret (kept by the verifier only).
    pub secret: [u8; 32],
    /// What the node receives.
    pub credential: MadeCredential,
}

/// Checks the AK and wraps a fresh secret for (EK, Name(AK)).
pub fn challenge(ek_public: &[u8], ak_public: &[u8]) -> Result<Challenge, EnrollError> {
    let ek = Public::parse(ek_public).map_err(|e| EnrollError::Malformed {
        what: "EK TPMT_PUBLIC",
        reason: e.to_string(),
    })?;
    let ak = Public::parse(ak_public).map_err(|e| EnrollError::Malformed {
        what: "AK TPMT_PUBLIC",
        reason: e.to_string(),
    })?;
    AkVerifier::new(&ak).map_err(|e| EnrollError::BadAk(e.to_string()))?;
    let need = vouch_proto::tpm::attr::FIXED_TPM
        | vouch_proto::tpm::attr::RESTRICTED
        | vouch_proto::tpm::attr::SIGN_ENCRYPT;
    if ak.object_attributes & need != need
        || ak.object_attributes & vouch_proto::tpm::attr::DECRYPT != 0
    {
        return Err(EnrollError::BadAk(format!(
            "objectAttributes 0x{:08x}: not a restricted fixedTPM signing key",
            ak.object_attributes
        )));
    }
    let name = name_of_public(&ak).map_err(|e| EnrollError::BadAk(e.to_string()))?;
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| EnrollError::Credential("system random source failed".into()))?;
    let credential =
        make_credential(&ek, &name, &secret).map_err(|e| EnrollError::Credential(e.to_string()))?;
    Ok(Challenge { secret, credential })
}

/// Checks the node's answer (constant time).
pub fn complete(c: &Challenge, returned: &[u8]) -> Result<(), EnrollError> {
    let ok = returned.len() == c.secret.len()
        && returned
            .iter()
            .zip(c.secret.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if ok {
        Ok(())
    } else {
        Err(EnrollError::SecretMismatch)
    }
}
