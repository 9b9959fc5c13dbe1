//! Software TPM2_MakeCredential (TPM 2.0 Part 1, "Credential Protection";
//! Part 3, TPM2_MakeCredential) for RSA and ECC endorsement keys.
//!
//! Owns the verifier's half of AK enrollment: a secret is wrapped so that
//! only the TPM holding the EK's private key can unwrap it, and only when the
//! object named in the credential (the AK) is loaded in that same TPM. The
//! EK public area is untrusted input until its certificate has been checked;
//! this module checks only that it is a usable storage key.
//!
//! Construction, for an EK with nameAlg H and symmetric cipher AES-k-CFB:
//! 1. seed: RSA: random |H| bytes, encrypted with RSA-OAEP(H) and the label
//!    "IDENTITY\0". ECC: an ephemeral key on the EK's curve; Z is the x
//!    coordinate of ECDH(ephemeral, EK); seed = KDFe(H, Z, "IDENTITY",
//!    x(ephemeral), x(EK), |H|·8); the encrypted secret is the ephemeral
//!    TPMS_ECC_POINT.
//! 2. symKey = KDFa(H, seed, "STORAGE", Name(AK), "", k).
//! 3. encIdentity = AES-CFB(symKey, IV = 0, TPM2B_DIGEST(credential)).
//! 4. hmacKey = KDFa(H, seed, "INTEGRITY", "", "", |H|·8).
//! 5. outerHMAC = HMAC(hmacKey, encIdentity || Name(AK)).
//! 6. credentialBlob = TPM2B_DIGEST(outerHMAC) || encIdentity.

use crate::tpm::{alg, curve, HashAlg, Public, PublicKey, Writer};
use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::rand::SecureRandom;
use thiserror::Error;
use zeroize::Zeroizing;

/// Why a credential could not be made for this EK.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CredentialError {
    /// The EK's nameAlg is not SHA-256/384/512.
    #[error("EK nameAlg 0x{0:04x} is not supported")]
    UnsupportedNameAlg(u16),
    /// The EK is not a storage key with AES-CFB.
    #[error("EK symmetric definition unsupported: {0}")]
    UnsupportedSymmetric(&'static str),
    /// The EK's key type, curve or size is not supported.
    #[error("EK key unsupported: {0}")]
    UnsupportedKey(&'static str),
    /// The credential is longer than the EK's name digest.
    #[error("credential of {len} bytes exceeds the {max}-byte limit of the EK's nameAlg")]
    CredentialTooLong {
        /// Given length.
        len: usize,
        /// Digest size of the EK's nameAlg.
        max: usize,
    },
    /// The random source or a primitive failed.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

/// The output of MakeCredential: the two TPM2B bodies ActivateCredential
/// takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeCredential {
    /// Contents of TPM2B_ID_OBJECT (the credential blob, no size prefix).
    pub id_object: Vec<u8>,
    /// Contents of TPM2B_ENCRYPTED_SECRET (no size prefix).
    pub encrypted_secret: Vec<u8>,
}

/// KDFa (SP 800-108 counter mode with HMAC), as the TPM defines it. `label`
/// is given without its terminating zero; it is added here.
pub fn kdfa(
    hash: HashAlg,
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let key = ring::hmac::Key::new(hash.hmac(), key);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + hash.digest_len());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFe (SP 800-56A concatenation KDF), as the TPM defines it.
pub fn kdfe(
    hash: HashAlg,
    z: &[u8],
    label: &str,
    party_u: &[u8],
    party_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + hash.digest_len());
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = ring::digest::Context::new(hash.ring());
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

fn aes_cfb_encrypt(key: &[u8], data: &mut [u8]) -> Result<(), CredentialError> {
    let iv = [0u8; 16];
    match key.len() {
        16 => cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(key, &iv)
            .map_err(|_| CredentialError::Crypto("AES-128 key"))?
            .encrypt(data),
        32 => cfb_mode::Encryptor::<aes::Aes256>::new_from_slices(key, &iv)
            .map_err(|_| CredentialError::Crypto("AES-256 key"))?
            .encrypt(data),
        _ => return Err(CredentialError::UnsupportedSymmetric("AES key size")),
    }
    Ok(())
}

fn fill_random(buf: &mut [u8]) -> Result<(), CredentialError> {
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| CredentialError::Crypto("system random source"))
}

/// Wraps `credential` for the object named `object_name` (the AK's Name) so
/// that only the TPM holding `ek` can recover it with ActivateCredential.
pub fn make_credential(
    ek: &Public,
    object_name: &[u8],
    credential: &[u8],
) -> Result<MadeCredential, CredentialError> {
    let h = ek
        .name_hash()
        .ok_or(CredentialError::UnsupportedNameAlg(ek.name_alg))?;
    if credential.len() > h.digest_len() {
        return Err(CredentialError::CredentialTooLong {
            len: credential.len(),
            max: h.digest_len(),
        });
    }
    let sym = ek.symmetric.ok_or(CredentialError::UnsupportedSymmetric(
        "EK has no symmetric definition",
    ))?;
    if sym.alg != alg::AES || sym.mode != alg::CFB {
        return Err(CredentialError::UnsupportedSymmetric(
            "EK cipher is not AES-CFB",
        ));
    }
    if sym.key_bits != 128 && sym.key_bits != 256 {
        return Err(CredentialError::UnsupportedSymmetric(
            "AES key bits not 128/256",
        ));
    }
    let digest_bits = (h.digest_len() * 8) as u32;

    let (seed, encrypted_secret) = match &ek.key {
        PublicKey::Rsa {
            exponent, modulus, ..
        } => {
            let mut seed = Zeroizing::new(vec![0u8; h.digest_len()]);
            fill_random(&mut seed)?;
            let n = rsa::BigUint::from_bytes_be(modulus);
            let e = rsa::BigUint::from(if *exponent == 0 { 65537 } else { *exponent });
            let pk = rsa::RsaPublicKey::new(n, e)
                .map_err(|_| CredentialError::UnsupportedKey("RSA EK public key invalid"))?;
            let mut rng = rand_core::OsRng;
            let label = "IDENTITY\0";
            let enc = match h {
                HashAlg::Sha256 => pk.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha256, _>(label),
                    &seed,
                ),
                HashAlg::Sha384 => pk.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha384, _>(label),
                    &seed,
                ),
                HashAlg::Sha512 => pk.encrypt(
                    &mut rng,
                    rsa::Oaep::new_with_label::<sha2::Sha512, _>(label),
                    &seed,
                ),
            }
            .map_err(|_| CredentialError::Crypto("RSA-OAEP encryption"))?;
            (seed, enc)
        }
        PublicKey::Ecc { curve: c, x, y, .. } => {
            let (agreement, field) = match *c {
                curve::NIST_P256 => (&ring::agreement::ECDH_P256, 32),
                curve::NIST_P384 => (&ring::agreement::ECDH_P384, 48),
                _ => return Err(CredentialError::UnsupportedKey("EK curve not P-256/P-384")),
            };
            if x.len() > field || y.len() > field {
                return Err(CredentialError::UnsupportedKey(
                    "EK point coordinate too long",
                ));
            }
            let mut ek_point = vec![0u8; 1 + 2 * field];
            ek_point[0] = 4;
            ek_point[1 + field - x.len()..1 + field].copy_from_slice(x);
            ek_point[1 + 2 * field - y.len()..].copy_from_slice(y);
            let ek_x = ek_point[1..1 + field].to_vec();

            let rng = ring::rand::SystemRandom::new();
            let eph = ring::agreement::EphemeralPrivateKey::generate(agreement, &rng)
                .map_err(|_| CredentialError::Crypto("ephemeral ECC key"))?;
            let eph_pub = eph
                .compute_public_key()
                .map_err(|_| CredentialError::Crypto("ephemeral public key"))?;
            let eph_pub = eph_pub.as_ref();
            let eph_x = &eph_pub[1..1 + field];
            let eph_y = &eph_pub[1 + field..];
            let peer = ring::agreement::UnparsedPublicKey::new(agreement, &ek_point);
            let seed = ring::agreement::agree_ephemeral(eph, &peer, |z| {
                Zeroizing::new(kdfe(h, z, "IDENTITY", eph_x, &ek_x, digest_bits))
            })
            .map_err(|_| CredentialError::UnsupportedKey("EK point is not on its curve"))?;
            let mut w = Writer::new();
            w.tpm2b(eph_x).tpm2b(eph_y);
            (seed, w.into_vec())
        }
    };

    let sym_key = Zeroizing::new(kdfa(
        h,
        &seed,
        "STORAGE",
        object_name,
        &[],
        u32::from(sym.key_bits),
    ));
    let mut enc_identity = Writer::new();
    enc_identity.tpm2b(credential);
    let mut enc_identity = enc_identity.into_vec();
    aes_cfb_encrypt(&sym_key, &mut enc_identity)?;

    let hmac_key = Zeroizing::new(kdfa(h, &seed, "INTEGRITY", &[], &[], digest_bits));
    let key = ring::hmac::Key::new(h.hmac(), &hmac_key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(&enc_identity);
    ctx.update(object_name);
    let outer_hmac = ctx.sign();

    let mut blob = Writer::new();
    blob.tpm2b(outer_hmac.as_ref()).bytes(&enc_identity);
    Ok(MadeCredential {
        id_object: blob.into_vec(),
        encrypted_secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KDFa must be deterministic and produce exactly the requested length.
    #[test]
    fn kdfa_lengths() {
        let a = kdfa(HashAlg::Sha256, b"k", "STORAGE", b"n", b"", 128);
        assert_eq!(a.len(), 16);
        let b = kdfa(HashAlg::Sha256, b"k", "STORAGE", b"n", b"", 384);
        assert_eq!(b.len(), 48);
        assert_eq!(a, kdfa(HashAlg::Sha256, b"k", "STORAGE", b"n", b"", 128));
        assert_ne!(a, kdfa(HashAlg::Sha256, b"k", "INTEGRITY", b"n", b"", 128));
    }
}
