//! The daemon's TPM layer: the only code in Vouch that uses tss-esapi.
//!
//! Owns the TPM context (passed explicitly as [`Tpm`], never global), the EK,
//! the AK and its persisted blob, PCR extend/read, quotes and
//! ActivateCredential. Trust boundary: the TPM is trusted hardware (or a
//! software TPM, loudly flagged); everything it returns is still parsed with
//! vouch-proto's bounds-checked codecs before use, and the AK blob read from
//! the state directory is only usable under this TPM's EK.
//!
//! TPM invariants that bite here:
//! - libtpms (swtpm) has 3 transient object slots and no resource manager:
//!   we hold exactly two objects (EK, AK) and one policy session at a time.
//!   Dropping the [`Tpm`] flushes them.
//! - PCR_Extend, Quote and ActivateCredential need an authorization session;
//!   ESYS fails with 0x7000b without one.
//! - The EK has userWithAuth clear: ActivateCredential authorizes it with a
//!   policy session (PolicySecret(TPM_RH_ENDORSEMENT), plus PolicyOR for the
//!   high-range templates such as the P-384 EK).
//! - PCRs can change between PCR_Read and Quote; [`Tpm::quote`] compares the
//!   quote's pcrDigest with the values read and retries.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tss_esapi::abstraction::{ak, ek, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, NvIndexTpmHandle, ObjectHandle, PcrHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::NvAuth;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, DigestList, DigestValues, EncryptedSecret, IdObject,
    PcrSelectionListBuilder, PcrSlot, Private, Public, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use vouch_proto::quote::PcrValue;
use vouch_proto::tpm::alg;

/// Errors of the TPM layer. TPM and TSS return codes are kept as `source`.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI configuration string is not valid.
    #[error(
        "invalid TCTI {tcti:?} (expected e.g. device:/dev/tpmrm0 or swtpm:path=/run/swtpm.sock)"
    )]
    InvalidTcti {
        /// The string given.
        tcti: String,
        /// TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// The TPM could not be opened.
    #[error("cannot open the TPM through {tcti:?}")]
    Open {
        /// The TCTI used.
        tcti: String,
        /// TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM command {command} failed")]
    Command {
        /// The command or step.
        command: &'static str,
        /// TPM or TSS return code.
        #[source]
        source: tss_esapi::Error,
    },
    /// No EK certificate of the requested kind is provisioned in NV.
    #[error("no EK certificate in NV for {0} (is the TPM provisioned?)")]
    NoEkCertificate(&'static str),
    /// Reading or writing the AK state failed.
    #[error("AK state file {path}")]
    AkState {
        /// File involved.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The AK state was written for another EK kind or is corrupt.
    #[error("AK state in {path} is unusable: {detail}")]
    AkStateInvalid {
        /// File involved.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The PCRs changed between every read and quote.
    #[error("PCRs kept changing during {0} quote attempts")]
    PcrsUnstable(u32),
    /// The TPM returned data vouch-proto could not parse.
    #[error("TPM returned malformed {what}: {detail}")]
    Malformed {
        /// Structure.
        what: &'static str,
        /// Parser error.
        detail: String,
    },
    /// A PCR index outside 0..=23.
    #[error("PCR index {0} is out of range 0..=23")]
    BadPcr(u8),
}

type Result<T> = std::result::Result<T, TpmError>;

fn cmd(command: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { command, source }
}

/// Which EK to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EkKind {
    /// RSA-2048 EK (TCG low-range template, certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC P-384 EK (TCG high-range template, certificate at NV 0x01c00016).
    EccP384,
}

impl EkKind {
    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            Self::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            Self::EccP384 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP384),
        }
    }

    fn cert_index(self) -> u32 {
        match self {
            Self::Rsa2048 => 0x01c0_0002,
            Self::EccP384 => 0x01c0_0016,
        }
    }

    /// Human-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rsa2048 => "rsa2048",
            Self::EccP384 => "ecc-p384",
        }
    }
}

/// EK selection policy from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EkChoice {
    /// The first of RSA-2048, ECC P-384 that has a certificate in NV.
    #[default]
    Auto,
    /// Only the RSA-2048 EK.
    Rsa2048,
    /// Only the ECC P-384 EK.
    EccP384,
}

/// AK algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AkAlg {
    /// ECC P-256 with ECDSA-SHA256 (default: fast to sign and verify).
    #[default]
    EccP256,
    /// RSA-2048 with RSASSA-SHA256.
    Rsa2048,
}

/// The endorsement key, loaded, with its certificate and chain from NV.
#[derive(Debug)]
pub struct Ek {
    handle: KeyHandle,
    /// Which EK.
    pub kind: EkKind,
    /// TPMT_PUBLIC of the EK.
    pub public: Vec<u8>,
    /// DER EK certificate.
    pub certificate: Vec<u8>,
    /// DER certificates of the chain found in NV (0x01c00100..0x01c001ff).
    pub chain: Vec<Vec<u8>>,
}

/// The attestation key, loaded.
#[derive(Debug)]
pub struct Ak {
    handle: KeyHandle,
    /// TPMT_PUBLIC of the AK.
    pub public: Vec<u8>,
    /// The AK's Name.
    pub name: Vec<u8>,
    /// Whether this start created the AK (false: loaded from the state dir).
    pub created: bool,
}

/// A quote with the PCR values it covers (the shared JSON form).
pub type Quote = vouch_proto::quote::QuoteJson;

/// What the TPM says it is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TpmInfo {
    /// TPM_PT_MANUFACTURER as text.
    pub manufacturer: String,
    /// TPM_PT_VENDOR_STRING_1..4 as text.
    pub vendor: String,
    /// Whether this looks like a software TPM (swtpm/libtpms, simulators).
    pub software: bool,
}

/// An open TPM. Every operation takes `&mut self`: one command at a time.
pub struct Tpm {
    ctx: Context,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tpm")
    }
}

const PCR_HANDLES: [PcrHandle; 24] = [
    PcrHandle::Pcr0,
    PcrHandle::Pcr1,
    PcrHandle::Pcr2,
    PcrHandle::Pcr3,
    PcrHandle::Pcr4,
    PcrHandle::Pcr5,
    PcrHandle::Pcr6,
    PcrHandle::Pcr7,
    PcrHandle::Pcr8,
    PcrHandle::Pcr9,
    PcrHandle::Pcr10,
    PcrHandle::Pcr11,
    PcrHandle::Pcr12,
    PcrHandle::Pcr13,
    PcrHandle::Pcr14,
    PcrHandle::Pcr15,
    PcrHandle::Pcr16,
    PcrHandle::Pcr17,
    PcrHandle::Pcr18,
    PcrHandle::Pcr19,
    PcrHandle::Pcr20,
    PcrHandle::Pcr21,
    PcrHandle::Pcr22,
    PcrHandle::Pcr23,
];

fn slot(pcr: u8) -> Result<PcrSlot> {
    if pcr > 23 {
        return Err(TpmError::BadPcr(pcr));
    }
    PcrSlot::try_from(1u32 << pcr).map_err(cmd("PcrSlot"))
}

/// TCG EK Credential Profile 2.x, B.6: PolicyA (PolicySecret(TPM_RH_ENDORSEMENT))
/// and PolicyC (PolicyAuthorizeNV on 0x01C07F01), SHA-384, the two branches
/// of the high-range EK templates' PolicyOR.
const EK_POLICY_A_SHA384: &str = "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53";
const EK_POLICY_C_SHA384: &str = "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165";

fn der_len(buf: &[u8]) -> Option<usize> {
    // A DER SEQUENCE: 0x30, then short or long-form length.
    if buf.len() < 2 || buf[0] != 0x30 {
        return None;
    }
    let (hdr, len) = match buf[1] {
        n if n < 0x80 => (2, usize::from(n)),
        0x81 => (3, usize::from(*buf.get(2)?)),
        0x82 => (
            4,
            usize::from(*buf.get(2)?) << 8 | usize::from(*buf.get(3)?),
        ),
        _ => return None,
    };
    let total = hdr + len;
    (total <= buf.len()).then_some(total)
}

fn ascii(words: &[u32]) -> String {
    words
        .iter()
        .flat_map(|w| w.to_be_bytes())
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .map(char::from)
        .collect::<String>()
        .trim()
        .to_owned()
}

impl Tpm {
    /// Opens the TPM named by a TCTI string (`device:/dev/tpmrm0`,
    /// `swtpm:path=...`, `swtpm:host=...,port=...`).
    pub fn open(tcti: &str) -> Result<Self> {
        let conf = TctiNameConf::from_str(tcti).map_err(|source| TpmError::InvalidTcti {
            tcti: tcti.to_owned(),
            source,
        })?;
        let ctx = Context::new(conf).map_err(|source| TpmError::Open {
            tcti: tcti.to_owned(),
            source,
        })?;
        let mut me = Self { ctx };
        me.flush_stale()?;
        Ok(me)
    }

    /// Flushes transient objects and sessions left in the TPM by a previous
    /// vouchd that died without flushing them. Without a resource manager
    /// (swtpm, a raw /dev/tpm0) they would exhaust the 3 object slots
    /// (TPM_RC_OBJECT_MEMORY); behind /dev/tpmrm0 only our own are visible.
    fn flush_stale(&mut self) -> Result<()> {
        for (start, what) in [
            (0x8000_0000u32, "transient objects"),
            (0x0200_0000, "loaded sessions"),
            (0x0300_0000, "saved sessions"),
        ] {
            let (data, _) = self
                .ctx
                .execute_without_session(|c| c.get_capability(CapabilityType::Handles, start, 64))
                .map_err(cmd("GetCapability(HANDLES)"))?;
            let CapabilityData::Handles(list) = data else {
                continue;
            };
            for h in list.iter() {
                let raw = u32::from(*h);
                if raw & 0xff00_0000 != start {
                    continue;
                }
                let handle = self
                    .ctx
                    .execute_without_session(|c| c.tr_from_tpm_public(*h))
                    .map_err(cmd("TR_FromTPMPublic(stale)"));
                match handle {
                    Ok(obj) => {
                        if self.ctx.flush_context(obj).is_ok() {
                            tracing::debug!(
                                handle = format!("0x{raw:08x}"),
                                "flushed stale {what}"
                            );
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot open stale handle"),
                }
            }
        }
        Ok(())
    }

    /// Manufacturer and vendor strings, and whether this is a software TPM.
    pub fn info(&mut self) -> Result<TpmInfo> {
        use tss_esapi::constants::PropertyTag;
        let mut get = |p| {
            self.ctx
                .get_tpm_property(p)
                .map_err(cmd("GetCapability(TPM_PROPERTIES)"))
                .map(|v| v.unwrap_or(0))
        };
        let manufacturer = ascii(&[get(PropertyTag::Manufacturer)?]);
        let vendor = ascii(&[
            get(PropertyTag::VendorString1)?,
            get(PropertyTag::VendorString2)?,
            get(PropertyTag::VendorString3)?,
            get(PropertyTag::VendorString4)?,
        ]);
        let software = vendor.starts_with("SW")
            || vendor.contains("SIMU")
            || vendor.contains("swtpm")
            || manufacturer == "MSFT" && vendor.contains("Simulator");
        Ok(TpmInfo {
            manufacturer,
            vendor,
            software,
        })
    }

    fn nv_exists(&mut self, index: u32) -> Result<bool> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, index, 1))
            .map_err(cmd("GetCapability(HANDLES)"))?;
        Ok(match data {
            CapabilityData::Handles(list) => list.iter().any(|h| u32::from(*h) == index),
            _ => false,
        })
    }

    fn nv_handles(&mut self, from: u32, to: u32) -> Result<Vec<u32>> {
        let (data, _) = self
            .ctx
            .execute_without_session(|c| c.get_capability(CapabilityType::Handles, from, to - from))
            .map_err(cmd("GetCapability(HANDLES)"))?;
        Ok(match data {
            CapabilityData::Handles(list) => list
                .iter()
                .map(|h| u32::from(*h))
                .filter(|h| (from..to).contains(h))
                .collect(),
            _ => Vec::new(),
        })
    }

    fn nv_read(&mut self, index: u32) -> Result<Vec<u8>> {
        let nv = NvIndexTpmHandle::new(index).map_err(cmd("NvIndexTpmHandle"))?;
        let obj: ObjectHandle = self
            .ctx
            .execute_without_session(|c| c.tr_from_tpm_public(TpmHandle::NvIndex(nv)))
            .map_err(cmd("TR_FromTPMPublic(NV)"))?;
        let auth = NvAuth::NvIndex(obj.into());
        // read_full closes (never flushes) the ESYS handles of the NV index.
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                tss_esapi::abstraction::nv::read_full(c, auth, nv)
            })
            .map_err(cmd("NV_Read"))
    }

    /// Creates the EK from its TCG template and reads its certificate and
    /// any chain certificates from NV.
    pub fn load_ek(&mut self, choice: EkChoice) -> Result<Ek> {
        let kind = match choice {
            EkChoice::Rsa2048 => EkKind::Rsa2048,
            EkChoice::EccP384 => EkKind::EccP384,
            EkChoice::Auto => {
                if self.nv_exists(EkKind::Rsa2048.cert_index())? {
                    EkKind::Rsa2048
                } else if self.nv_exists(EkKind::EccP384.cert_index())? {
                    EkKind::EccP384
                } else {
                    return Err(TpmError::NoEkCertificate("RSA-2048 or ECC P-384"));
                }
            }
        };
        if !self.nv_exists(kind.cert_index())? {
            return Err(TpmError::NoEkCertificate(kind.as_str()));
        }
        let raw = self.nv_read(kind.cert_index())?;
        // Some TPMs pad the NV area; keep exactly one DER certificate.
        let certificate = match der_len(&raw) {
            Some(n) => raw[..n].to_vec(),
            None => {
                return Err(TpmError::Malformed {
                    what: "EK certificate",
                    detail: "NV content is not a DER certificate".into(),
                })
            }
        };
        let mut chain = Vec::new();
        for idx in self.nv_handles(0x01c0_0100, 0x01c0_0200)? {
            let raw = self.nv_read(idx)?;
            // Chain indices may hold several concatenated DER certificates.
            let mut rest = &raw[..];
            while let Some(n) = der_len(rest) {
                chain.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
        }
        let handle = ek::create_ek_object_2(&mut self.ctx, kind.selection(), None)
            .map_err(cmd("CreatePrimary(EK)"))?;
        let (public, _, _) = self
            .ctx
            .read_public(handle)
            .map_err(cmd("ReadPublic(EK)"))?;
        let public = public.marshall().map_err(cmd("marshal EK public"))?;
        Ok(Ek {
            handle,
            kind,
            public,
            certificate,
            chain,
        })
    }

    /// Loads the AK persisted in `state_dir`, or creates one under `ek` and
    /// persists it (files 0600). A blob that cannot be loaded is an error,
    /// never silently replaced: the verifier enrolled that AK.
    pub fn load_or_create_ak(&mut self, ek: &Ek, state_dir: &Path, alg: AkAlg) -> Result<Ak> {
        let pub_path = state_dir.join("ak.pub");
        let priv_path = state_dir.join("ak.priv");
        let meta_path = state_dir.join("ak.meta");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| TpmError::AkState { path, source }
        };
        if pub_path.exists() || priv_path.exists() {
            let meta = fs::read_to_string(&meta_path).map_err(io(&meta_path))?;
            let expect = format!("ek={}\n", ek.kind.as_str());
            if !meta.starts_with(&expect) {
                return Err(TpmError::AkStateInvalid {
                    path: meta_path,
                    detail: format!(
                        "AK was created under another EK ({}), this start uses {}",
                        meta.trim(),
                        ek.kind.as_str()
                    ),
                });
            }
            let pub_bytes = fs::read(&pub_path).map_err(io(&pub_path))?;
            let priv_bytes = fs::read(&priv_path).map_err(io(&priv_path))?;
            let public = Public::unmarshall(&pub_bytes).map_err(|e| TpmError::AkStateInvalid {
                path: pub_path.clone(),
                detail: e.to_string(),
            })?;
            let private = Private::try_from(priv_bytes).map_err(|e| TpmError::AkStateInvalid {
                path: priv_path.clone(),
                detail: e.to_string(),
            })?;
            let handle = ak::load_ak(&mut self.ctx, ek.handle, None, private, public.clone())
                .map_err(cmd("Load(AK) from persisted blob"))?;
            let name = self.name_of(handle)?;
            return Ok(Ak {
                handle,
                public: pub_bytes,
                name,
                created: false,
            });
        }
        let (key_alg, scheme) = match alg {
            AkAlg::EccP256 => (
                AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
                SignatureSchemeAlgorithm::EcDsa,
            ),
            AkAlg::Rsa2048 => (
                AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
                SignatureSchemeAlgorithm::RsaSsa,
            ),
        };
        let created = ak::create_ak_2(
            &mut self.ctx,
            ek.handle,
            HashingAlgorithm::Sha256,
            key_alg,
            scheme,
            None,
            None,
        )
        .map_err(cmd("Create(AK)"))?;
        let pub_bytes = created
            .out_public
            .marshall()
            .map_err(cmd("marshal AK public"))?;
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        write_private(&priv_path, created.out_private.value())?;
        write_private(&pub_path, &pub_bytes)?;
        write_private(
            &meta_path,
            format!("ek={}\nalg={alg:?}\n", ek.kind.as_str()).as_bytes(),
        )?;
        let handle = ak::load_ak(
            &mut self.ctx,
            ek.handle,
            None,
            created.out_private,
            created.out_public,
        )
        .map_err(cmd("Load(AK)"))?;
        let name = self.name_of(handle)?;
        Ok(Ak {
            handle,
            public: pub_bytes,
            name,
            created: true,
        })
    }

    fn name_of(&mut self, handle: KeyHandle) -> Result<Vec<u8>> {
        let (_, name, _) = self.ctx.read_public(handle).map_err(cmd("ReadPublic"))?;
        Ok(name.value().to_vec())
    }

    /// Extends `digest` into SHA-256 bank PCR `pcr`.
    pub fn pcr_extend(&mut self, pcr: u8, digest: &[u8; 32]) -> Result<()> {
        let handle = *PCR_HANDLES
            .get(usize::from(pcr))
            .ok_or(TpmError::BadPcr(pcr))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(cmd("Digest"))?,
        );
        self.ctx
            .execute_with_session(Some(AuthSession::Password), |c| {
                c.pcr_extend(handle, values)
            })
            .map_err(cmd("PCR_Extend"))
    }

    /// Reads SHA-256 bank PCRs, returned in ascending index order.
    pub fn pcr_read(&mut self, pcrs: &[u8]) -> Result<Vec<PcrValue>> {
        let mut sorted = pcrs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::with_capacity(sorted.len());
        // One PCR_Read returns at most 8 digests.
        for chunk in sorted.chunks(8) {
            let slots = chunk.iter().map(|p| slot(*p)).collect::<Result<Vec<_>>>()?;
            let sel = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()
                .map_err(cmd("PcrSelectionList"))?;
            let (_, read_sel, digests) = self
                .ctx
                .execute_without_session(|c| c.pcr_read(sel))
                .map_err(cmd("PCR_Read"))?;
            let mut read_idx = Vec::new();
            for s in read_sel.get_selections() {
                for sl in s.selected() {
                    read_idx.push(u32::from(sl).trailing_zeros() as u8);
                }
            }
            read_idx.sort_unstable();
            if read_idx != chunk || digests.value().len() != chunk.len() {
                return Err(TpmError::Malformed {
                    what: "PCR_Read response",
                    detail: format!("asked for PCRs {chunk:?}, got {read_idx:?}"),
                });
            }
            for (idx, d) in chunk.iter().zip(digests.value()) {
                out.push(PcrValue {
                    bank: alg::SHA256,
                    index: *idx,
                    value: d.value().to_vec(),
                });
            }
        }
        Ok(out)
    }

    /// Quotes SHA-256 bank `pcrs` with `nonce` as qualifying data, re-reading
    /// and re-quoting (up to 10 times) while the PCRs change in between.
    pub fn quote(&mut self, ak: &Ak, nonce: &[u8], pcrs: &[u8]) -> Result<Quote> {
        const ATTEMPTS: u32 = 10;
        let slots = pcrs.iter().map(|p| slot(*p)).collect::<Result<Vec<_>>>()?;
        for _ in 0..ATTEMPTS {
            let values = self.pcr_read(pcrs)?;
            let sel = PcrSelectionListBuilder::new()
                .with_selection(HashingAlgorithm::Sha256, &slots)
                .build()
                .map_err(cmd("PcrSelectionList"))?;
            let data = Data::try_from(nonce.to_vec()).map_err(cmd("qualifying data"))?;
            let (attest, signature) = self
                .ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.quote(ak.handle, data, SignatureScheme::Null, sel)
                })
                .map_err(cmd("Quote"))?;
            let attest = attest.marshall().map_err(cmd("marshal TPMS_ATTEST"))?;
            let signature = signature
                .marshall()
                .map_err(cmd("marshal TPMT_SIGNATURE"))?;
            let parsed =
                vouch_proto::tpm::Attest::parse(&attest).map_err(|e| TpmError::Malformed {
                    what: "TPMS_ATTEST",
                    detail: e.to_string(),
                })?;
            let sig_hash = vouch_proto::tpm::Signature::parse(&signature)
                .map_err(|e| TpmError::Malformed {
                    what: "TPMT_SIGNATURE",
                    detail: e.to_string(),
                })?
                .hash();
            if vouch_proto::quote::check_pcr_digest(
                &parsed.quote.pcr_select,
                &parsed.quote.pcr_digest,
                sig_hash,
                &values,
            )
            .is_ok()
            {
                return Ok(Quote {
                    attest,
                    signature,
                    pcrs: values,
                });
            }
            tracing::debug!("PCRs changed between read and quote; retrying");
        }
        Err(TpmError::PcrsUnstable(ATTEMPTS))
    }

    /// TPM2_ActivateCredential: recovers the secret a verifier wrapped for
    /// this EK and the AK's Name. Fails (TPM_RC_INTEGRITY) when the
    /// credential was made for another object's Name.
    pub fn activate_credential(
        &mut self,
        ak: &Ak,
        ek: &Ek,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>> {
        let id = IdObject::try_from(id_object.to_vec()).map_err(cmd("IdObject"))?;
        let secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(cmd("EncryptedSecret"))?;
        let (ek_hash, ek_policy_or) = match ek.kind {
            EkKind::Rsa2048 => (HashingAlgorithm::Sha256, None),
            EkKind::EccP384 => (
                HashingAlgorithm::Sha384,
                Some((EK_POLICY_A_SHA384, EK_POLICY_C_SHA384)),
            ),
        };
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                tss_esapi::structures::SymmetricDefinition::AES_128_CFB,
                ek_hash,
            )
            .map_err(cmd("StartAuthSession(policy)"))?
            .ok_or(TpmError::Malformed {
                what: "StartAuthSession response",
                detail: "no session handle".into(),
            })?;
        let (attrs, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let result = (|| {
            self.ctx
                .tr_sess_set_attributes(session, attrs, mask)
                .map_err(cmd("TRSess_SetAttributes"))?;
            let policy = PolicySession::try_from(session).map_err(cmd("PolicySession"))?;
            self.ctx
                .execute_with_session(Some(AuthSession::Password), |c| {
                    c.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(cmd("PolicySecret(TPM_RH_ENDORSEMENT)"))?;
            if let Some((a, c)) = ek_policy_or {
                let mut list = DigestList::new();
                for h in [a, c] {
                    let bytes = hex::decode(h).map_err(|e| TpmError::Malformed {
                        what: "EK policy constant",
                        detail: e.to_string(),
                    })?;
                    list.add(Digest::try_from(bytes).map_err(cmd("Digest"))?)
                        .map_err(cmd("DigestList"))?;
                }
                self.ctx
                    .policy_or(policy, list)
                    .map_err(cmd("PolicyOR(EK policy A, C)"))?;
            }
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |c| {
                    c.activate_credential(ak.handle, ek.handle, id, secret)
                })
                .map_err(cmd("ActivateCredential"))
        })();
        // Free the session slot whatever happened (libtpms has only 3).
        let _ = self
            .ctx
            .flush_context(tss_esapi::handles::SessionHandle::from(session).into());
        Ok(result?.value().to_vec())
    }

    /// The TPM's boot counters (resetCount, restartCount), read from a quote
    /// with an empty nonce (TPM2_ReadClock is not wrapped by tss-esapi).
    pub fn boot_counters(&mut self, ak: &Ak) -> Result<(u32, u32)> {
        let q = self.quote(ak, &[], &[0])?;
        let attest =
            vouch_proto::tpm::Attest::parse(&q.attest).map_err(|e| TpmError::Malformed {
                what: "TPMS_ATTEST",
                detail: e.to_string(),
            })?;
        Ok((
            attest.clock_info.reset_count,
            attest.clock_info.restart_count,
        ))
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let err = |source| TpmError::AkState {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}
