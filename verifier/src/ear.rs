//! Signed attestation results: each sidecar's verdict as an EAR (EAT
//! Attestation Result, draft-ietf-rats-ear) JWT signed with EdDSA
//! (Ed25519), and the JWKS that verifies them.
//!
//! Owns the verifier's result-signing key (a 0600 file holding the 32-byte
//! Ed25519 seed). Trust boundary: output only; the key never leaves this
//! module and is never logged.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};

use crate::appraise::{SidecarVerdict, Verdict};

/// The EAR profile this verifier emits.
pub const EAR_PROFILE: &str = "tag:github.com,2023:veraison/ear";

/// Key errors.
#[derive(Debug, thiserror::Error)]
pub enum EarError {
    /// Reading or writing the key file failed.
    #[error("EAR signing key {path}")]
    Key {
        /// File.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold a 32-byte seed.
    #[error("EAR signing key {0} is not a 32-byte Ed25519 seed")]
    BadKey(std::path::PathBuf),
}

/// The verifier's EAR signer.
pub struct EarSigner {
    key: SigningKey,
    kid: String,
}

impl std::fmt::Debug for EarSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarSigner")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// AR4SI trustworthiness claim values used here.
fn tier(v: Verdict) -> i64 {
    match v {
        Verdict::Affirming => 2,
        Verdict::Warning => 32,
        Verdict::Contraindicated => 96,
    }
}

impl EarSigner {
    /// Loads the key at `path`, creating it (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, EarError> {
        let io = |source| EarError::Key {
            path: path.to_owned(),
            source,
        };
        let seed: [u8; 32] = match std::fs::read(path) {
            Ok(b) => b
                .try_into()
                .map_err(|_| EarError::BadKey(path.to_owned()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand_core::OsRng);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                f.write_all(&key.to_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                key.to_bytes()
            }
            Err(e) => return Err(io(e)),
        };
        Ok(Self::from_seed(&seed))
    }

    /// A signer from a seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let kid = B64.encode(&vouch_proto::event::digest(key.verifying_key().as_bytes())[..12]);
        Self { key, kid }
    }

    /// Key id (in every token header and the JWKS).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS publishing the verification key.
    pub fn jwks(&self) -> Value {
        json!({"keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": B64.encode(self.key.verifying_key().as_bytes()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }]})
    }

    /// Signs arbitrary JWT claims (EdDSA).
    pub fn sign_claims(&self, claims: &Value) -> String {
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string().as_bytes()),
            B64.encode(claims.to_string().as_bytes())
        );
        let sig = self.key.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }

    /// The EAR for one sidecar of `node`.
    pub fn ear(
        &self,
        node: &str,
        v: &SidecarVerdict,
        policy_ids: &[String],
        now_unix: u64,
    ) -> String {
        let status = v.verdict.as_str();
        // Trustworthiness vector: the worst outcome of the rules behind
        // each claim.
        let mut claims = std::collections::BTreeMap::<&str, i64>::new();
        for r in &v.reasons {
            let claim = match r.rule.split('.').next().unwrap_or("") {
                "daprd" => "executables",
                "image" => "file-system",
                "files" | "posture" => "configuration",
                "integrity" => "hardware",
                "placement" | "policy" => "instance-identity",
                _ => "runtime-opaque",
            };
            let value = if r.ok { 2 } else { tier(v.verdict).max(32) };
            let e = claims.entry(claim).or_insert(0);
            *e = (*e).max(value);
        }
        let sub = format!("{node}/{}", v.id);
        let ear = json!({
            "eat_profile": EAR_PROFILE,
            "iat": now_unix,
            "exp": now_unix + 300,
            "ear.verifier-id": {"developer": "vouch", "build": concat!("vouch-verifier ", env!("CARGO_PKG_VERSION"))},
            "submods": {
                sub.clone(): {
                    "ear.status": status,
                    "ear.trustworthiness-vector": claims,
                    "ear.appraisal-policy-id": policy_ids.join(","),
                    "vouch.app-id": v.app_id,
                    "vouch.namespace": v.namespace,
                }
            },
            "sub": sub,
        });
        self.sign_claims(&ear)
    }
}
