//! Quote verification: is this TPMS_ATTEST signed by the enrolled AK, does it
//! carry the verifier's nonce, name the expected signer, and commit to the
//! PCR values the node reported?
//!
//! Trust boundary: the attest bytes, the signature and the PCR values come
//! from the node and are untrusted; the AK public area is trusted only after
//! enrollment bound it to an EK (see [`crate::credential`]). Everything here
//! is pure computation over bytes, so the verifier never needs a TSS library.
//!
//! Order of checks: both structures are parsed first, then the signature is
//! checked over the attest bytes exactly as received, and only then are the
//! signed fields (nonce, signer, PCR selection, PCR digest) compared. A field
//! is never trusted before the signature over it is.

use crate::p256::{P256Key, P256KeyError};
use crate::tpm::{
    alg, attr, curve, Attest, CodecError, HashAlg, PcrSelectionList, Public, PublicKey, Reader,
    Signature, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE,
};
use ring::signature::{self as rsig, RsaPublicKeyComponents, UnparsedPublicKey};
use thiserror::Error;

/// Why a quote did not verify. Each tampering has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QuoteError {
    /// The AK public area cannot be used as a quote-signing key.
    #[error("AK public area unusable: {0}")]
    UnsupportedAk(&'static str),
    /// The AK is not a restricted, fixedTPM signing key, so it could sign
    /// forged TPMS_ATTEST bytes.
    #[error("AK is not a restricted fixedTPM signing key (objectAttributes 0x{0:08x})")]
    AkNotRestrictedSigningKey(u32),
    /// TPMT_SIGNATURE did not parse.
    #[error("malformed TPMT_SIGNATURE: {0}")]
    SignatureMalformed(CodecError),
    /// TPMS_ATTEST did not parse.
    #[error("malformed TPMS_ATTEST: {0}")]
    AttestMalformed(CodecError),
    /// The attest structure does not start with TPM_GENERATED_VALUE.
    #[error("TPMS_ATTEST magic is 0x{0:08x}, not TPM_GENERATED_VALUE")]
    BadMagic(u32),
    /// The attest structure is not a quote.
    #[error("TPMS_ATTEST type is 0x{0:04x}, not TPM_ST_ATTEST_QUOTE")]
    NotAQuote(u16),
    /// The signature's scheme or hash does not match the AK's.
    #[error("signature scheme 0x{signature:04x} does not match the AK (0x{key:04x})")]
    SchemeMismatch {
        /// Scheme or hash the AK allows.
        key: u16,
        /// Scheme or hash the signature claims.
        signature: u16,
    },
    /// A hash algorithm this verifier does not accept.
    #[error("unsupported hash algorithm 0x{0:04x}")]
    UnsupportedHash(u16),
    /// The signature does not verify over the attest bytes with the AK.
    #[error("quote signature does not verify with the enrolled AK")]
    SignatureInvalid,
    /// extraData is not the nonce the verifier issued.
    #[error("quote nonce does not match the challenge")]
    NonceMismatch,
    /// qualifiedSigner is not the enrolled AK under the enrolled EK.
    #[error("quote qualifiedSigner does not match the enrolled AK")]
    QualifiedSignerMismatch,
    /// The reported PCRs are not the ones the quote covers.
    #[error("reported PCRs {reported:?} differ from the quote's selection {quoted:?}")]
    PcrSelectionMismatch {
        /// (bank, index) pairs the quote covers.
        quoted: Vec<(u16, u8)>,
        /// (bank, index) pairs the node reported.
        reported: Vec<(u16, u8)>,
    },
    /// A reported PCR value has the wrong length for its bank.
    #[error("PCR {index} value is {len} bytes, bank needs {expected}")]
    PcrValueLength {
        /// PCR index.
        index: u8,
        /// Reported length.
        len: usize,
        /// Digest size of the bank.
        expected: usize,
    },
    /// The quote's pcrDigest is not the hash of the reported values.
    #[error("quote pcrDigest {quoted} does not match reported PCR values ({computed})")]
    PcrDigestMismatch {
        /// pcrDigest inside the signed quote (hex).
        quoted: String,
        /// Hash of the reported values (hex).
        computed: String,
    },
}

/// A PCR value as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcrValue {
    /// Bank hash algorithm (TPM_ALG_ID).
    pub bank: u16,
    /// PCR index.
    pub index: u8,
    /// The value.
    #[serde(with = "hex::serde")]
    pub value: Vec<u8>,
}

impl From<&PcrValue> for crate::api::PcrValue {
    fn from(p: &PcrValue) -> Self {
        Self {
            bank: u32::from(p.bank),
            index: u32::from(p.index),
            value: p.value.clone(),
        }
    }
}

/// A quote as vouchd prints it (`vouchd tpm quote`): TPMS_ATTEST,
/// TPMT_SIGNATURE (hex) and the PCR values it covers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuoteJson {
    /// TPMS_ATTEST bytes.
    #[serde(with = "hex::serde")]
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE bytes.
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// PCR values in quote order.
    pub pcrs: Vec<PcrValue>,
}

/// Self-contained quote evidence for offline checks and test vectors
/// (`vouch-verifier verify-quote`, test-data/quotes/*.json): the EK and AK
/// public areas, the nonce and the quote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuoteFile {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// TPMT_PUBLIC of the EK.
    #[serde(with = "hex::serde")]
    pub ek_public: Vec<u8>,
    /// TPMT_PUBLIC of the AK.
    #[serde(with = "hex::serde")]
    pub ak_public: Vec<u8>,
    /// Qualifying data.
    #[serde(with = "hex::serde")]
    pub nonce: Vec<u8>,
    /// TPMS_ATTEST bytes.
    #[serde(with = "hex::serde")]
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE bytes.
    #[serde(with = "hex::serde")]
    pub signature: Vec<u8>,
    /// PCR values in quote order.
    pub pcrs: Vec<PcrValue>,
}

#[derive(Debug, Clone)]
enum Key {
    /// P-256 keys use [`crate::p256`] with the key's comb table (shared
    /// between clones).
    P256(std::sync::Arc<P256Key>),
    Ecdsa {
        alg: &'static rsig::EcdsaVerificationAlgorithm,
        field: usize,
        point: Vec<u8>,
        hash: u16,
    },
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
        scheme: u16,
        hash: u16,
    },
}

/// An AK public key prepared once for many quote verifications.
#[derive(Debug, Clone)]
pub struct AkVerifier {
    key: Key,
    restricted_ok: bool,
    attributes: u32,
}

fn scheme_hash(scheme: &crate::tpm::Scheme) -> Result<(u16, u16), QuoteError> {
    if scheme.alg == alg::NULL {
        return Err(QuoteError::UnsupportedAk(
            "restricted signing key without a scheme",
        ));
    }
    let hash = scheme
        .hash
        .ok_or(QuoteError::UnsupportedAk("scheme without a hash"))?;
    Ok((scheme.alg, hash))
}

impl AkVerifier {
    /// Prepares `ak` for verification. Only P-256/P-384 ECDSA and RSA
    /// (RSASSA or RSAPSS, 2048 bits or more) with SHA-256/384 are accepted.
    pub fn new(ak: &Public) -> Result<Self, QuoteError> {
        let need = attr::FIXED_TPM | attr::RESTRICTED | attr::SIGN_ENCRYPT;
        let restricted_ok =
            ak.object_attributes & need == need && ak.object_attributes & attr::DECRYPT == 0;
        let key = match &ak.key {
            PublicKey::Ecc {
                scheme,
                curve: c,
                x,
                y,
                ..
            } => {
                let (sch, hash) = scheme_hash(scheme)?;
                if sch != alg::ECDSA {
                    return Err(QuoteError::UnsupportedAk("ECC AK scheme is not ECDSA"));
                }
                let (alg, field) = match (*c, hash) {
                    (curve::NIST_P256, alg::SHA256) => {
                        let key = P256Key::new(x, y).map_err(|e| {
                            QuoteError::UnsupportedAk(match e {
                                P256KeyError::CoordinateTooLong => "ECC point coordinate too long",
                                P256KeyError::CoordinateOutOfRange => {
                                    "ECC point coordinate not below the field prime"
                                }
                                P256KeyError::NotOnCurve => "ECC point is not on P-256",
                            })
                        })?;
                        return Ok(Self {
                            key: Key::P256(std::sync::Arc::new(key)),
                            restricted_ok,
                            attributes: ak.object_attributes,
                        });
                    }
                    (curve::NIST_P384, alg::SHA384) => (&rsig::ECDSA_P384_SHA384_FIXED, 48),
                    _ => {
                        return Err(QuoteError::UnsupportedAk(
                            "ECC AK must be P-256/SHA-256 or P-384/SHA-384",
                        ))
                    }
                };
                if x.len() > field || y.len() > field {
                    return Err(QuoteError::UnsupportedAk("ECC point coordinate too long"));
                }
                let mut point = vec![0u8; 1 + 2 * field];
                point[0] = 4;
                point[1 + field - x.len()..1 + field].copy_from_slice(x);
                point[1 + 2 * field - y.len()..].copy_from_slice(y);
                Key::Ecdsa {
                    alg,
                    field,
                    point,
                    hash,
                }
            }
            PublicKey::Rsa {
                scheme,
                exponent,
                modulus,
                ..
            } => {
                let (sch, hash) = scheme_hash(scheme)?;
                if sch != alg::RSASSA && sch != alg::RSAPSS {
                    return Err(QuoteError::UnsupportedAk(
                        "RSA AK scheme is not RSASSA or RSAPSS",
                    ));
                }
                if HashAlg::from_tpm(hash).is_none() {
                    return Err(QuoteError::UnsupportedHash(hash));
                }
                if modulus.len() < 256 {
                    return Err(QuoteError::UnsupportedAk("RSA AK shorter than 2048 bits"));
                }
                let e = if *exponent == 0 { 65537 } else { *exponent };
                let e = e.to_be_bytes();
                let first = e.iter().position(|b| *b != 0).unwrap_or(3);
                Key::Rsa {
                    n: modulus.clone(),
                    e: e[first..].to_vec(),
                    scheme: sch,
                    hash,
                }
            }
        };
        Ok(Self {
            key,
            restricted_ok,
            attributes: ak.object_attributes,
        })
    }

    /// The hash algorithm the AK signs with (and the pcrDigest uses).
    pub fn hash(&self) -> u16 {
        match &self.key {
            Key::P256(_) => alg::SHA256,
            Key::Ecdsa { hash, .. } | Key::Rsa { hash, .. } => *hash,
        }
    }

    /// Checks `sig` over `msg` with this key (no TPMS_ATTEST semantics).
    pub fn verify_signature(&self, msg: &[u8], sig: &Signature) -> Result<(), QuoteError> {
        match (&self.key, sig) {
            (Key::P256(key), Signature::Ecdsa { hash: h, r, s }) => {
                if *h != alg::SHA256 {
                    return Err(QuoteError::SchemeMismatch {
                        key: alg::SHA256,
                        signature: *h,
                    });
                }
                if key.verify(msg, r, s) {
                    Ok(())
                } else {
                    Err(QuoteError::SignatureInvalid)
                }
            }
            (
                Key::Ecdsa {
                    alg,
                    field,
                    point,
                    hash,
                },
                Signature::Ecdsa { hash: h, r, s },
            ) => {
                if h != hash {
                    return Err(QuoteError::SchemeMismatch {
                        key: *hash,
                        signature: *h,
                    });
                }
                let f = *field;
                if r.len() > f || s.len() > f {
                    return Err(QuoteError::SignatureInvalid);
                }
                let mut buf = [0u8; 96];
                buf[f - r.len()..f].copy_from_slice(r);
                buf[2 * f - s.len()..2 * f].copy_from_slice(s);
                UnparsedPublicKey::new(*alg, point)
                    .verify(msg, &buf[..2 * f])
                    .map_err(|_| QuoteError::SignatureInvalid)
            }
            (Key::Rsa { n, e, scheme, hash }, Signature::RsaSsa { hash: h, sig: s })
            | (Key::Rsa { n, e, scheme, hash }, Signature::RsaPss { hash: h, sig: s }) => {
                let sig_scheme = if matches!(sig, Signature::RsaSsa { .. }) {
                    alg::RSASSA
                } else {
                    alg::RSAPSS
                };
                if sig_scheme != *scheme {
                    return Err(QuoteError::SchemeMismatch {
                        key: *scheme,
                        signature: sig_scheme,
                    });
                }
                if h != hash {
                    return Err(QuoteError::SchemeMismatch {
                        key: *hash,
                        signature: *h,
                    });
                }
                let params: &rsig::RsaParameters = match (sig_scheme, *h) {
                    (alg::RSASSA, alg::SHA256) => &rsig::RSA_PKCS1_2048_8192_SHA256,
                    (alg::RSASSA, alg::SHA384) => &rsig::RSA_PKCS1_2048_8192_SHA384,
                    (alg::RSASSA, alg::SHA512) => &rsig::RSA_PKCS1_2048_8192_SHA512,
                    (_, alg::SHA256) => &rsig::RSA_PSS_2048_8192_SHA256,
                    (_, alg::SHA384) => &rsig::RSA_PSS_2048_8192_SHA384,
                    (_, alg::SHA512) => &rsig::RSA_PSS_2048_8192_SHA512,
                    (_, other) => return Err(QuoteError::UnsupportedHash(other)),
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, msg, s)
                    .map_err(|_| QuoteError::SignatureInvalid)
            }
            (Key::P256(_), other) | (Key::Ecdsa { .. }, other) | (Key::Rsa { .. }, other) => {
                Err(QuoteError::SchemeMismatch {
                    key: self.hash(),
                    signature: match other {
                        Signature::RsaSsa { .. } => alg::RSASSA,
                        Signature::RsaPss { .. } => alg::RSAPSS,
                        Signature::Ecdsa { .. } => alg::ECDSA,
                    },
                })
            }
        }
    }
}

/// What the verifier expects the quote to say.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    /// The nonce issued for this quote.
    pub nonce: &'a [u8],
    /// The AK's qualified name (see [`crate::name::ak_qualified_name`]);
    /// `None` skips the check (only for tools, never in appraisal).
    pub qualified_signer: Option<&'a [u8]>,
}

/// Verifies a quote and returns the parsed, now-trusted TPMS_ATTEST.
pub fn verify_quote(
    ak: &AkVerifier,
    attest_bytes: &[u8],
    signature_bytes: &[u8],
    pcrs: &[PcrValue],
    expect: Expectation<'_>,
) -> Result<Attest, QuoteError> {
    if !ak.restricted_ok {
        return Err(QuoteError::AkNotRestrictedSigningKey(ak.attributes));
    }
    let sig = Signature::parse(signature_bytes).map_err(QuoteError::SignatureMalformed)?;
    let mut head = Reader::new(attest_bytes);
    let magic = head
        .u32("TPMS_ATTEST.magic")
        .map_err(QuoteError::AttestMalformed)?;
    if magic != TPM_GENERATED_VALUE {
        return Err(QuoteError::BadMagic(magic));
    }
    let kind = head
        .u16("TPMS_ATTEST.type")
        .map_err(QuoteError::AttestMalformed)?;
    if kind != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteError::NotAQuote(kind));
    }
    let attest = Attest::parse(attest_bytes).map_err(QuoteError::AttestMalformed)?;
    ak.verify_signature(attest_bytes, &sig)?;

    // Everything below is covered by the signature.
    // The nonce is public; a plain comparison leaks nothing.
    if attest.extra_data != expect.nonce {
        return Err(QuoteError::NonceMismatch);
    }
    if let Some(qs) = expect.qualified_signer {
        if attest.qualified_signer != qs {
            return Err(QuoteError::QualifiedSignerMismatch);
        }
    }
    check_pcr_digest(
        &attest.quote.pcr_select,
        &attest.quote.pcr_digest,
        ak.hash(),
        pcrs,
    )?;
    Ok(attest)
}

/// Checks that `pcrs` are exactly the PCRs `selection` covers, in order, and
/// that their values hash (with `digest_alg`) to `pcr_digest`.
pub fn check_pcr_digest(
    selection: &PcrSelectionList,
    pcr_digest: &[u8],
    digest_alg: u16,
    pcrs: &[PcrValue],
) -> Result<(), QuoteError> {
    let h = HashAlg::from_tpm(digest_alg).ok_or(QuoteError::UnsupportedHash(digest_alg))?;
    let mut ctx = ring::digest::Context::new(h.ring());
    let mut count = 0usize;
    let mut matches = true;
    for sel in &selection.0 {
        for idx in sel.indices() {
            match pcrs.get(count) {
                Some(p) if p.bank == sel.hash && p.index == idx => {
                    let bank =
                        HashAlg::from_tpm(p.bank).ok_or(QuoteError::UnsupportedHash(p.bank))?;
                    if p.value.len() != bank.digest_len() {
                        return Err(QuoteError::PcrValueLength {
                            index: idx,
                            len: p.value.len(),
                            expected: bank.digest_len(),
                        });
                    }
                    ctx.update(&p.value);
                }
                _ => matches = false,
            }
            count += 1;
        }
    }
    if !matches || count != pcrs.len() {
        return Err(QuoteError::PcrSelectionMismatch {
            quoted: selection.ordered(),
            reported: pcrs.iter().map(|p| (p.bank, p.index)).collect(),
        });
    }
    let computed = ctx.finish();
    if computed.as_ref() != pcr_digest {
        return Err(QuoteError::PcrDigestMismatch {
            quoted: hex::encode(pcr_digest),
            computed: hex::encode(computed.as_ref()),
        });
    }
    Ok(())
}
