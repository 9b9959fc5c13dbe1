//! TPM object Names and qualified names (TPM 2.0 Part 1, "Names").
//!
//! Owns the computation the verifier uses to bind an AK to the EK it was
//! created under. A Name is `nameAlg || H_nameAlg(TPMT_PUBLIC)`; the qualified
//! name of an object is `nameAlg || H_nameAlg(QN(parent) || Name(object))`,
//! and the QN of a hierarchy is its 4-byte handle. A quote's
//! `qualifiedSigner` is the AK's qualified name, so it changes if the AK is
//! moved under a different parent.

use crate::tpm::{HashAlg, Public, TPM_RH_ENDORSEMENT};
use thiserror::Error;

/// Why a Name could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The object's nameAlg is not SHA-256/384/512.
    #[error("unsupported nameAlg 0x{0:04x}")]
    UnsupportedNameAlg(u16),
}

/// Name of the object whose TPMT_PUBLIC is `public_bytes`.
pub fn name_of(public_bytes: &[u8], name_alg: u16) -> Result<Vec<u8>, NameError> {
    let h = HashAlg::from_tpm(name_alg).ok_or(NameError::UnsupportedNameAlg(name_alg))?;
    let mut out = name_alg.to_be_bytes().to_vec();
    out.extend_from_slice(&h.digest(&[public_bytes]));
    Ok(out)
}

/// Name of a parsed public area (over its exact encoding).
pub fn name_of_public(public: &Public) -> Result<Vec<u8>, NameError> {
    name_of(&public.marshal(), public.name_alg)
}

/// Qualified name of an object: `nameAlg || H(parent_qn || name)`.
pub fn qualified_name(parent_qn: &[u8], name: &[u8], name_alg: u16) -> Result<Vec<u8>, NameError> {
    let h = HashAlg::from_tpm(name_alg).ok_or(NameError::UnsupportedNameAlg(name_alg))?;
    let mut out = name_alg.to_be_bytes().to_vec();
    out.extend_from_slice(&h.digest(&[parent_qn, name]));
    Ok(out)
}

/// The qualified name a quote by `ak` (a child of the primary `ek` in the
/// endorsement hierarchy) carries as qualifiedSigner.
pub fn ak_qualified_name(ek: &Public, ak: &Public) -> Result<Vec<u8>, NameError> {
    let ek_qn = qualified_name(
        &TPM_RH_ENDORSEMENT.to_be_bytes(),
        &name_of_public(ek)?,
        ek.name_alg,
    )?;
    qualified_name(&ek_qn, &name_of_public(ak)?, ak.name_alg)
}
