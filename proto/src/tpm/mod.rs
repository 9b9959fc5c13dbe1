//! Pure-Rust codecs for the TPM 2.0 structures that cross from a node to the
//! verifier: TPMS_ATTEST, TPMT_SIGNATURE, TPMT_PUBLIC, TPML_PCR_SELECTION and
//! the TPM2B wrappers (TPM 2.0 Library, Part 2: Structures).
//!
//! Trust boundary: every `parse` here takes untrusted bytes and never panics;
//! `marshal` is the exact inverse, so `marshal(parse(b)) == b` for any `b`
//! that parses (property-tested). Names and signatures are computed over the
//! bytes exactly as received, never over a re-encoding the node did not sign.

pub mod codec;

pub use codec::{CodecError, Reader, Writer};

/// `TPM_GENERATED_VALUE`: the magic every TPM-produced TPMS_ATTEST starts with.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`: the attestation type of a TPM2_Quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
/// `TPM_RH_ENDORSEMENT`: the endorsement hierarchy handle; it is the Name and
/// the qualified name of the hierarchy a spec-conformant EK lives in.
pub const TPM_RH_ENDORSEMENT: u32 = 0x4000_000B;

/// TPM_ALG_ID values used here (Part 2, Table 9).
pub mod alg {
    /// RSA key.
    pub const RSA: u16 = 0x0001;
    /// SHA-1 (accepted in structures, never for names or signatures here).
    pub const SHA1: u16 = 0x0004;
    /// HMAC.
    pub const HMAC: u16 = 0x0005;
    /// AES.
    pub const AES: u16 = 0x0006;
    /// Keyed-hash object.
    pub const KEYEDHASH: u16 = 0x0008;
    /// XOR obfuscation.
    pub const XOR: u16 = 0x000A;
    /// SHA-256.
    pub const SHA256: u16 = 0x000B;
    /// SHA-384.
    pub const SHA384: u16 = 0x000C;
    /// SHA-512.
    pub const SHA512: u16 = 0x000D;
    /// The null algorithm.
    pub const NULL: u16 = 0x0010;
    /// RSASSA-PKCS1-v1_5.
    pub const RSASSA: u16 = 0x0014;
    /// RSAES-PKCS1-v1_5.
    pub const RSAES: u16 = 0x0015;
    /// RSASSA-PSS.
    pub const RSAPSS: u16 = 0x0016;
    /// RSAES-OAEP.
    pub const OAEP: u16 = 0x0017;
    /// ECDSA.
    pub const ECDSA: u16 = 0x0018;
    /// ECDH.
    pub const ECDH: u16 = 0x0019;
    /// ECDAA.
    pub const ECDAA: u16 = 0x001A;
    /// SM2.
    pub const SM2: u16 = 0x001B;
    /// EC-Schnorr.
    pub const ECSCHNORR: u16 = 0x001C;
    /// ECMQV.
    pub const ECMQV: u16 = 0x001D;
    /// KDF1 (SP 800-56A).
    pub const KDF1_SP800_56A: u16 = 0x0020;
    /// KDF2.
    pub const KDF2: u16 = 0x0021;
    /// KDF1 (SP 800-108).
    pub const KDF1_SP800_108: u16 = 0x0022;
    /// ECC key.
    pub const ECC: u16 = 0x0023;
    /// Symmetric cipher object.
    pub const SYMCIPHER: u16 = 0x0025;
    /// CFB mode.
    pub const CFB: u16 = 0x0043;
}

/// TPM_ECC_CURVE values supported here.
pub mod curve {
    /// NIST P-256.
    pub const NIST_P256: u16 = 0x0003;
    /// NIST P-384.
    pub const NIST_P384: u16 = 0x0004;
}

/// Largest digest any supported hash produces (SHA-512).
pub const MAX_DIGEST: usize = 64;
/// Largest TPM2B_NAME: a 2-byte algorithm plus a digest.
pub const MAX_NAME: usize = 2 + MAX_DIGEST;
/// Largest RSA modulus or signature accepted (4096 bits).
pub const MAX_RSA_BYTES: usize = 512;
/// Largest ECC coordinate accepted (P-521).
pub const MAX_ECC_BYTES: usize = 66;
/// Largest pcrSelect bitmap accepted in a TPMS_PCR_SELECTION.
pub const MAX_PCR_SELECT: usize = 4;
/// Largest count of banks in a TPML_PCR_SELECTION (HASH_COUNT).
pub const MAX_PCR_BANKS: u32 = 16;

/// A hash algorithm usable for names, PCR banks and signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlg {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl HashAlg {
    /// Maps a TPM_ALG_ID to a supported hash.
    pub fn from_tpm(id: u16) -> Option<Self> {
        match id {
            alg::SHA256 => Some(Self::Sha256),
            alg::SHA384 => Some(Self::Sha384),
            alg::SHA512 => Some(Self::Sha512),
            _ => None,
        }
    }

    /// The TPM_ALG_ID of this hash.
    pub fn tpm_id(self) -> u16 {
        match self {
            Self::Sha256 => alg::SHA256,
            Self::Sha384 => alg::SHA384,
            Self::Sha512 => alg::SHA512,
        }
    }

    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }

    /// The ring digest algorithm.
    pub fn ring(self) -> &'static ring::digest::Algorithm {
        match self {
            Self::Sha256 => &ring::digest::SHA256,
            Self::Sha384 => &ring::digest::SHA384,
            Self::Sha512 => &ring::digest::SHA512,
        }
    }

    /// The ring HMAC algorithm.
    pub fn hmac(self) -> ring::hmac::Algorithm {
        match self {
            Self::Sha256 => ring::hmac::HMAC_SHA256,
            Self::Sha384 => ring::hmac::HMAC_SHA384,
            Self::Sha512 => ring::hmac::HMAC_SHA512,
        }
    }

    /// Hashes the concatenation of `parts`.
    pub fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        let mut ctx = ring::digest::Context::new(self.ring());
        for p in parts {
            ctx.update(p);
        }
        ctx.finish().as_ref().to_vec()
    }
}

/// One bank of a PCR selection (TPMS_PCR_SELECTION).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    /// The bank's hash algorithm (TPM_ALG_ID; unknown ids are kept).
    pub hash: u16,
    /// The pcrSelect bitmap: bit `i % 8` of byte `i / 8` selects PCR `i`.
    pub select: Vec<u8>,
}

impl PcrSelection {
    /// A selection of `pcrs` in `hash`'s bank, with a 3-byte bitmap (24 PCRs).
    pub fn new(hash: HashAlg, pcrs: &[u8]) -> Self {
        let mut select = vec![0u8; 3];
        for &p in pcrs {
            let byte = usize::from(p / 8);
            if byte >= select.len() {
                select.resize(byte + 1, 0);
            }
            select[byte] |= 1 << (p % 8);
        }
        Self {
            hash: hash.tpm_id(),
            select,
        }
    }

    /// The selected PCR indices in ascending order (the order the TPM
    /// concatenates their values in for pcrDigest).
    pub fn indices(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (byte_idx, byte) in self.select.iter().enumerate() {
            for bit in 0..8u8 {
                if byte & (1 << bit) != 0 {
                    // byte_idx < MAX_PCR_SELECT (4), so the index fits in u8.
                    out.push((byte_idx as u8) * 8 + bit);
                }
            }
        }
        out
    }
}

/// TPML_PCR_SELECTION: the banks and PCRs a quote covers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PcrSelectionList(pub Vec<PcrSelection>);

impl PcrSelectionList {
    /// Reads a TPML_PCR_SELECTION.
    pub fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let count = r.u32("TPML_PCR_SELECTION.count")?;
        if count > MAX_PCR_BANKS {
            return Err(CodecError::TooLarge {
                what: "TPML_PCR_SELECTION.count",
                size: count as usize,
                max: MAX_PCR_BANKS as usize,
            });
        }
        let mut banks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let hash = r.u16("TPMS_PCR_SELECTION.hash")?;
            let size = usize::from(r.u8("TPMS_PCR_SELECTION.sizeofSelect")?);
            if size > MAX_PCR_SELECT {
                return Err(CodecError::TooLarge {
                    what: "TPMS_PCR_SELECTION.sizeofSelect",
                    size,
                    max: MAX_PCR_SELECT,
                });
            }
            let select = r.bytes(size, "TPMS_PCR_SELECTION.pcrSelect")?.to_vec();
            banks.push(PcrSelection { hash, select });
        }
        Ok(Self(banks))
    }

    /// Writes a TPML_PCR_SELECTION.
    pub fn write(&self, w: &mut Writer) {
        // At most MAX_PCR_BANKS entries when parsed; constructed lists are small.
        w.u32(self.0.len() as u32);
        for s in &self.0 {
            w.u16(s.hash);
            w.u8(s.select.len().min(usize::from(u8::MAX)) as u8);
            w.bytes(&s.select);
        }
    }

    /// (bank, PCR index) pairs in the order the TPM hashes them.
    pub fn ordered(&self) -> Vec<(u16, u8)> {
        self.0
            .iter()
            .flat_map(|s| s.indices().into_iter().map(move |i| (s.hash, i)))
            .collect()
    }
}

/// TPMS_CLOCK_INFO: the TPM's clock and its boot counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockInfo {
    /// Milliseconds the TPM has been powered (not wall time).
    pub clock: u64,
    /// TPM2_Startup(CLEAR) count: a new value means a new boot.
    pub reset_count: u32,
    /// TPM Resume/Restart count since the last reset.
    pub restart_count: u32,
    /// Whether `clock` cannot have been rolled back.
    pub safe: bool,
}

/// The attested part of a quote (TPMS_QUOTE_INFO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteInfo {
    /// PCRs covered.
    pub pcr_select: PcrSelectionList,
    /// Hash (with the AK's signing hash) of the selected PCR values.
    pub pcr_digest: Vec<u8>,
}

/// TPMS_ATTEST for a quote. Other attestation types are rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// Must be [`TPM_GENERATED_VALUE`].
    pub magic: u32,
    /// Must be [`TPM_ST_ATTEST_QUOTE`].
    pub attest_type: u16,
    /// Qualified name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// The caller's qualifying data: the verifier's nonce.
    pub extra_data: Vec<u8>,
    /// Clock and boot counters.
    pub clock_info: ClockInfo,
    /// Vendor firmware version.
    pub firmware_version: u64,
    /// The quote body.
    pub quote: QuoteInfo,
}

impl Attest {
    /// Parses a TPMS_ATTEST of type quote. Magic and type are checked by the
    /// quote verifier, not here, so that their errors are specific.
    pub fn parse(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let magic = r.u32("TPMS_ATTEST.magic")?;
        let attest_type = r.u16("TPMS_ATTEST.type")?;
        if attest_type != TPM_ST_ATTEST_QUOTE {
            return Err(CodecError::Unsupported {
                what: "TPMS_ATTEST.type",
                value: u32::from(attest_type),
            });
        }
        let qualified_signer = r.tpm2b(MAX_NAME, "TPMS_ATTEST.qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b(MAX_DIGEST, "TPMS_ATTEST.extraData")?.to_vec();
        let clock = r.u64("TPMS_CLOCK_INFO.clock")?;
        let reset_count = r.u32("TPMS_CLOCK_INFO.resetCount")?;
        let restart_count = r.u32("TPMS_CLOCK_INFO.restartCount")?;
        let safe = match r.u8("TPMS_CLOCK_INFO.safe")? {
            0 => false,
            1 => true,
            v => {
                return Err(CodecError::Unsupported {
                    what: "TPMS_CLOCK_INFO.safe",
                    value: u32::from(v),
                })
            }
        };
        let firmware_version = r.u64("TPMS_ATTEST.firmwareVersion")?;
        let pcr_select = PcrSelectionList::read(&mut r)?;
        let pcr_digest = r.tpm2b(MAX_DIGEST, "TPMS_QUOTE_INFO.pcrDigest")?.to_vec();
        r.finish("TPMS_ATTEST")?;
        Ok(Self {
            magic,
            attest_type,
            qualified_signer,
            extra_data,
            clock_info: ClockInfo {
                clock,
                reset_count,
                restart_count,
                safe,
            },
            firmware_version,
            quote: QuoteInfo {
                pcr_select,
                pcr_digest,
            },
        })
    }

    /// Encodes this TPMS_ATTEST exactly as a TPM would.
    pub fn marshal(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(self.magic)
            .u16(self.attest_type)
            .tpm2b(&self.qualified_signer)
            .tpm2b(&self.extra_data)
            .u64(self.clock_info.clock)
            .u32(self.clock_info.reset_count)
            .u32(self.clock_info.restart_count)
            .u8(u8::from(self.clock_info.safe))
            .u64(self.firmware_version);
        self.quote.pcr_select.write(&mut w);
        w.tpm2b(&self.quote.pcr_digest);
        w.into_vec()
    }
}

/// TPMT_SIGNATURE for the schemes a quote can carry here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// RSASSA-PKCS1-v1_5.
    RsaSsa {
        /// Hash TPM_ALG_ID.
        hash: u16,
        /// The signature, as long as the modulus.
        sig: Vec<u8>,
    },
    /// RSASSA-PSS.
    RsaPss {
        /// Hash TPM_ALG_ID.
        hash: u16,
        /// The signature, as long as the modulus.
        sig: Vec<u8>,
    },
    /// ECDSA.
    Ecdsa {
        /// Hash TPM_ALG_ID.
        hash: u16,
        /// r, big-endian.
        r: Vec<u8>,
        /// s, big-endian.
        s: Vec<u8>,
    },
}

impl Signature {
    /// Parses a TPMT_SIGNATURE.
    pub fn parse(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let sig_alg = r.u16("TPMT_SIGNATURE.sigAlg")?;
        let out = match sig_alg {
            alg::RSASSA | alg::RSAPSS => {
                let hash = r.u16("TPMS_SIGNATURE_RSA.hash")?;
                let sig = r.tpm2b(MAX_RSA_BYTES, "TPMS_SIGNATURE_RSA.sig")?.to_vec();
                if sig_alg == alg::RSASSA {
                    Self::RsaSsa { hash, sig }
                } else {
                    Self::RsaPss { hash, sig }
                }
            }
            alg::ECDSA => {
                let hash = r.u16("TPMS_SIGNATURE_ECC.hash")?;
                let sr = r
                    .tpm2b(MAX_ECC_BYTES, "TPMS_SIGNATURE_ECC.signatureR")?
                    .to_vec();
                let ss = r
                    .tpm2b(MAX_ECC_BYTES, "TPMS_SIGNATURE_ECC.signatureS")?
                    .to_vec();
                Self::Ecdsa { hash, r: sr, s: ss }
            }
            other => {
                return Err(CodecError::Unsupported {
                    what: "TPMT_SIGNATURE.sigAlg",
                    value: u32::from(other),
                })
            }
        };
        r.finish("TPMT_SIGNATURE")?;
        Ok(out)
    }

    /// Encodes this TPMT_SIGNATURE.
    pub fn marshal(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            Self::RsaSsa { hash, sig } => {
                w.u16(alg::RSASSA).u16(*hash).tpm2b(sig);
            }
            Self::RsaPss { hash, sig } => {
                w.u16(alg::RSAPSS).u16(*hash).tpm2b(sig);
            }
            Self::Ecdsa { hash, r, s } => {
                w.u16(alg::ECDSA).u16(*hash).tpm2b(r).tpm2b(s);
            }
        }
        w.into_vec()
    }

    /// The hash TPM_ALG_ID the signature was made with.
    pub fn hash(&self) -> u16 {
        match self {
            Self::RsaSsa { hash, .. } | Self::RsaPss { hash, .. } | Self::Ecdsa { hash, .. } => {
                *hash
            }
        }
    }
}

/// A scheme with an optional hash (and ECDAA count): TPMT_RSA_SCHEME,
/// TPMT_ECC_SCHEME or TPMT_KDF_SCHEME. `alg == NULL` has no details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// Scheme TPM_ALG_ID.
    pub alg: u16,
    /// Hash TPM_ALG_ID, when the scheme has one.
    pub hash: Option<u16>,
    /// ECDAA commit count.
    pub count: Option<u16>,
}

impl Scheme {
    /// The null scheme.
    pub const NULL: Self = Self {
        alg: alg::NULL,
        hash: None,
        count: None,
    };

    /// A scheme with a hash.
    pub fn with_hash(alg: u16, hash: HashAlg) -> Self {
        Self {
            alg,
            hash: Some(hash.tpm_id()),
            count: None,
        }
    }

    fn read(r: &mut Reader<'_>, what: &'static str) -> Result<Self, CodecError> {
        let a = r.u16(what)?;
        let (hash, count) = match a {
            alg::NULL | alg::RSAES => (None, None),
            alg::RSASSA
            | alg::RSAPSS
            | alg::OAEP
            | alg::ECDSA
            | alg::ECDH
            | alg::SM2
            | alg::ECSCHNORR
            | alg::ECMQV
            | alg::KDF1_SP800_56A
            | alg::KDF2
            | alg::KDF1_SP800_108 => (Some(r.u16(what)?), None),
            alg::ECDAA => (Some(r.u16(what)?), Some(r.u16(what)?)),
            other => {
                return Err(CodecError::Unsupported {
                    what,
                    value: u32::from(other),
                })
            }
        };
        Ok(Self {
            alg: a,
            hash,
            count,
        })
    }

    fn write(&self, w: &mut Writer) {
        w.u16(self.alg);
        if let Some(h) = self.hash {
            w.u16(h);
        }
        if let Some(c) = self.count {
            w.u16(c);
        }
    }
}

/// TPMT_SYM_DEF_OBJECT when not null: the storage key's symmetric cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    /// Cipher TPM_ALG_ID (AES).
    pub alg: u16,
    /// Key size in bits.
    pub key_bits: u16,
    /// Mode TPM_ALG_ID (CFB).
    pub mode: u16,
}

impl SymDef {
    fn read(r: &mut Reader<'_>) -> Result<Option<Self>, CodecError> {
        let a = r.u16("TPMT_SYM_DEF_OBJECT.algorithm")?;
        if a == alg::NULL {
            return Ok(None);
        }
        let key_bits = r.u16("TPMT_SYM_DEF_OBJECT.keyBits")?;
        let mode = r.u16("TPMT_SYM_DEF_OBJECT.mode")?;
        Ok(Some(Self {
            alg: a,
            key_bits,
            mode,
        }))
    }

    fn write(this: &Option<Self>, w: &mut Writer) {
        match this {
            None => {
                w.u16(alg::NULL);
            }
            Some(s) => {
                w.u16(s.alg).u16(s.key_bits).u16(s.mode);
            }
        }
    }
}

/// The type-specific part of a TPMT_PUBLIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// TPMS_RSA_PARMS + TPM2B_PUBLIC_KEY_RSA.
    Rsa {
        /// Signing or encryption scheme.
        scheme: Scheme,
        /// Modulus size in bits.
        key_bits: u16,
        /// Public exponent; 0 means 65537.
        exponent: u32,
        /// Modulus, big-endian.
        modulus: Vec<u8>,
    },
    /// TPMS_ECC_PARMS + TPMS_ECC_POINT.
    Ecc {
        /// Signing or key-exchange scheme.
        scheme: Scheme,
        /// TPM_ECC_CURVE.
        curve: u16,
        /// Key derivation scheme.
        kdf: Scheme,
        /// x coordinate, big-endian.
        x: Vec<u8>,
        /// y coordinate, big-endian.
        y: Vec<u8>,
    },
}

/// TPMT_PUBLIC for RSA and ECC keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Public {
    /// nameAlg as a TPM_ALG_ID (kept raw so unknown ids re-encode exactly).
    pub name_alg: u16,
    /// TPMA_OBJECT bits.
    pub object_attributes: u32,
    /// authPolicy digest.
    pub auth_policy: Vec<u8>,
    /// Symmetric definition (storage keys such as the EK).
    pub symmetric: Option<SymDef>,
    /// Algorithm parameters and the public key.
    pub key: PublicKey,
}

/// TPMA_OBJECT bits that matter for attestation keys.
pub mod attr {
    /// fixedTPM: the key cannot leave this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin: the TPM generated the key.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// userWithAuth.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// restricted: signs only TPM-generated data (quotes) when a signing key.
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign / encrypt.
    pub const SIGN_ENCRYPT: u32 = 1 << 18;
}

impl Public {
    /// Parses a TPMT_PUBLIC (no TPM2B size prefix).
    pub fn parse(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let kind = r.u16("TPMT_PUBLIC.type")?;
        let name_alg = r.u16("TPMT_PUBLIC.nameAlg")?;
        let object_attributes = r.u32("TPMT_PUBLIC.objectAttributes")?;
        let auth_policy = r.tpm2b(MAX_DIGEST, "TPMT_PUBLIC.authPolicy")?.to_vec();
        let symmetric = SymDef::read(&mut r)?;
        let key = match kind {
            alg::RSA => {
                let scheme = Scheme::read(&mut r, "TPMS_RSA_PARMS.scheme")?;
                let key_bits = r.u16("TPMS_RSA_PARMS.keyBits")?;
                let exponent = r.u32("TPMS_RSA_PARMS.exponent")?;
                let modulus = r.tpm2b(MAX_RSA_BYTES, "TPM2B_PUBLIC_KEY_RSA")?.to_vec();
                PublicKey::Rsa {
                    scheme,
                    key_bits,
                    exponent,
                    modulus,
                }
            }
            alg::ECC => {
                let scheme = Scheme::read(&mut r, "TPMS_ECC_PARMS.scheme")?;
                let curve = r.u16("TPMS_ECC_PARMS.curveID")?;
                let kdf = Scheme::read(&mut r, "TPMS_ECC_PARMS.kdf")?;
                let x = r.tpm2b(MAX_ECC_BYTES, "TPMS_ECC_POINT.x")?.to_vec();
                let y = r.tpm2b(MAX_ECC_BYTES, "TPMS_ECC_POINT.y")?.to_vec();
                PublicKey::Ecc {
                    scheme,
                    curve,
                    kdf,
                    x,
                    y,
                }
            }
            other => {
                return Err(CodecError::Unsupported {
                    what: "TPMT_PUBLIC.type",
                    value: u32::from(other),
                })
            }
        };
        r.finish("TPMT_PUBLIC")?;
        Ok(Self {
            name_alg,
            object_attributes,
            auth_policy,
            symmetric,
            key,
        })
    }

    /// Parses a TPM2B_PUBLIC (u16 size, then TPMT_PUBLIC).
    pub fn parse_tpm2b(bytes: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let inner = r.tpm2b(usize::from(u16::MAX), "TPM2B_PUBLIC")?;
        r.finish("TPM2B_PUBLIC")?;
        Self::parse(inner)
    }

    /// Encodes this TPMT_PUBLIC.
    pub fn marshal(&self) -> Vec<u8> {
        let mut w = Writer::new();
        let kind = match self.key {
            PublicKey::Rsa { .. } => alg::RSA,
            PublicKey::Ecc { .. } => alg::ECC,
        };
        w.u16(kind)
            .u16(self.name_alg)
            .u32(self.object_attributes)
            .tpm2b(&self.auth_policy);
        SymDef::write(&self.symmetric, &mut w);
        match &self.key {
            PublicKey::Rsa {
                scheme,
                key_bits,
                exponent,
                modulus,
            } => {
                scheme.write(&mut w);
                w.u16(*key_bits).u32(*exponent).tpm2b(modulus);
            }
            PublicKey::Ecc {
                scheme,
                curve,
                kdf,
                x,
                y,
            } => {
                scheme.write(&mut w);
                w.u16(*curve);
                kdf.write(&mut w);
                w.tpm2b(x).tpm2b(y);
            }
        }
        w.into_vec()
    }

    /// The name algorithm, if it is one this crate can compute names with.
    pub fn name_hash(&self) -> Option<HashAlg> {
        HashAlg::from_tpm(self.name_alg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pcr_selection_indices_roundtrip() {
        let s = PcrSelection::new(HashAlg::Sha256, &[0, 1, 7, 13, 23]);
        assert_eq!(s.indices(), vec![0, 1, 7, 13, 23]);
        assert_eq!(s.select, vec![0b1000_0011, 0b0010_0000, 0b1000_0000]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn attest_parse_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(a) = Attest::parse(&bytes) {
                prop_assert_eq!(a.marshal(), bytes);
            }
        }

        #[test]
        fn signature_parse_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            if let Ok(s) = Signature::parse(&bytes) {
                prop_assert_eq!(s.marshal(), bytes);
            }
        }

        #[test]
        fn public_parse_never_panics_and_roundtrips(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(p) = Public::parse(&bytes) {
                prop_assert_eq!(p.marshal(), bytes);
            }
        }

        /// Structured inputs reach deep into the parser: a valid prefix with
        /// random tails and random size fields.
        #[test]
        fn attest_structured_prefix(
            signer in proptest::collection::vec(any::<u8>(), 0..80),
            extra in proptest::collection::vec(any::<u8>(), 0..80),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
            count in 0u32..20,
        ) {
            let mut w = Writer::new();
            w.u32(TPM_GENERATED_VALUE).u16(TPM_ST_ATTEST_QUOTE).tpm2b(&signer).tpm2b(&extra)
                .u64(1).u32(2).u32(3).u8(1).u64(4).u32(count).bytes(&tail);
            let bytes = w.into_vec();
            if let Ok(a) = Attest::parse(&bytes) {
                prop_assert_eq!(a.marshal(), bytes);
            }
        }

        #[test]
        fn public_structured_prefix(
            kind in prop_oneof![Just(alg::RSA), Just(alg::ECC), any::<u16>()],
            sym in prop_oneof![Just(alg::NULL), Just(alg::AES)],
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut w = Writer::new();
            w.u16(kind).u16(alg::SHA256).u32(0x0005_0072).tpm2b(&[]).u16(sym).bytes(&tail);
            let bytes = w.into_vec();
            if let Ok(p) = Public::parse(&bytes) {
                prop_assert_eq!(p.marshal(), bytes);
            }
        }
    }
}
