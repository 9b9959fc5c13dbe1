//! vouchd's side of the verifier protocol: enrollment (EK, certificate, AK
//! -> credential activation) and evidence push (challenge, quote, the log
//! events the verifier has not accepted yet). vouchd always dials out over
//! TLS; nodes need no inbound port.
//!
//! Trust boundary: the verifier is authenticated by its CA certificate
//! (configured); its answers (nonces, credential blobs) are still only ever
//! handed to the TPM, which checks them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::Channel;
use vouch_proto::api::attestation_client::AttestationClient;
use vouch_proto::api::{
    BeginEnrollmentRequest, ChallengeRequest, CompleteEnrollmentRequest, Evidence, EvidenceResult,
    LogState, PcrValue as PbPcr,
};

use crate::daemon::TpmPcr;
use crate::runlog::{self, RuntimeLog};
use crate::tpm::{Ak, Ek, TpmError};

/// Push errors.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// Transport or TLS setup.
    #[error("connecting to the verifier at {url}: {reason}")]
    Connect {
        /// Verifier URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The verifier refused or failed a call.
    #[error("verifier {call}: {status}")]
    Rpc {
        /// Which call.
        call: &'static str,
        /// gRPC status.
        status: tonic::Status,
    },
    /// The TPM failed.
    #[error("TPM")]
    Tpm(#[from] TpmError),
    /// Reading the runtime log failed.
    #[error("runtime log")]
    Log(#[from] runlog::LogError),
    /// Local I/O.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A connection to the verifier.
pub struct Pusher {
    rt: tokio::runtime::Runtime,
    client: AttestationClient<Channel>,
    node_id_file: PathBuf,
    /// The enrolled node id.
    pub node_id: Option<String>,
    /// Node name presented at enrollment.
    pub node_name: String,
    /// Node labels presented at enrollment.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The challenge the verifier handed out with its last answer.
    next: Option<vouch_proto::api::Challenge>,
}

impl std::fmt::Debug for Pusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pusher")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Pusher {
    /// Connects (lazily) to `url` trusting `ca_pem`.
    pub fn new(
        url: &str,
        ca_pem: &Path,
        state_dir: &Path,
        node_name: String,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Self, PushError> {
        let cerr = |reason: String| PushError::Connect {
            url: url.to_owned(),
            reason,
        };
        let ca = std::fs::read(ca_pem).map_err(|source| PushError::Io {
            path: ca_pem.to_owned(),
            source,
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| cerr(e.to_string()))?;
        let endpoint = vouch_proto::client::verifier_endpoint(url, &ca)
            .map_err(|e| cerr(e.to_string()))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10));
        let channel = {
            // The lazy channel's background task belongs to this runtime.
            let _guard = rt.enter();
            endpoint.connect_lazy()
        };
        let node_id_file = state_dir.join("node_id");
        let node_id = std::fs::read_to_string(&node_id_file)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        Ok(Self {
            rt,
            client: AttestationClient::new(channel).max_decoding_message_size(16 << 20),
            node_id_file,
            node_id,
            node_name,
            labels,
            next: None,
        })
    }

    /// Enrolls this node: presents EK, certificate and AK, activates the
    /// verifier's credential in the TPM, and stores the node id.
    pub fn enroll(&mut self, pcr: &mut TpmPcr, ek: &Ek) -> Result<String, PushError> {
        let ak: &Ak = &pcr.ak;
        let req = BeginEnrollmentRequest {
            node_name: self.node_name.clone(),
            labels: self.labels.clone().into_iter().collect(),
            ek_public: ek.public.clone(),
            ek_certificate: ek.certificate.clone(),
            ek_chain: ek.chain.clone(),
            ak_public: ak.public.clone(),
        };
        let mut c = self.client.clone();
        let ch = self
            .rt
            .block_on(c.begin_enrollment(req))
            .map_err(|status| PushError::Rpc {
                call: "BeginEnrollment",
                status,
            })?
            .into_inner();
        let secret =
            pcr.tpm
                .activate_credential(&pcr.ak, ek, &ch.id_object, &ch.encrypted_secret)?;
        let res = self
            .rt
            .block_on(c.complete_enrollment(CompleteEnrollmentRequest {
                enrollment_id: ch.enrollment_id,
                secret,
            }))
            .map_err(|status| PushError::Rpc {
                call: "CompleteEnrollment",
                status,
            })?
            .into_inner();
        std::fs::write(&self.node_id_file, &res.node_id).map_err(|source| PushError::Io {
            path: self.node_id_file.clone(),
            source,
        })?;
        tracing::info!(node_id = %res.node_id, "enrolled with the verifier");
        self.node_id = Some(res.node_id.clone());
        Ok(res.node_id)
    }

    /// Pushes evidence: a fresh quote over the verifier's nonce and every
    /// log event from the verifier's next expected sequence number.
    pub fn push(
        &mut self,
        pcr: &mut TpmPcr,
        log: &RuntimeLog,
    ) -> Result<EvidenceResult, PushError> {
        let node_id = self.node_id.clone().unwrap_or_default();
        let mut c = self.client.clone();
        // The challenge that came with the last answer, unless it is about
        // to expire; else ask for one.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let carried = self.next.take().filter(|c| c.expires_at_ms > now_ms + 1000);
        let used_carried = carried.is_some();
        let ch = match carried {
            Some(ch) => ch,
            None => self
                .rt
                .block_on(c.get_challenge(ChallengeRequest {
                    node_id: node_id.clone(),
                }))
                .map_err(|status| PushError::Rpc {
                    call: "GetChallenge",
                    status,
                })?
                .into_inner(),
        };
        let mut pcrs = vouch_proto::BOOT_PCRS.to_vec();
        pcrs.push(pcr.index);
        let q = pcr.tpm.quote(&pcr.ak, &ch.nonce, &pcrs)?;
        // The verifier's next_seq counts in the boot it knows; a log of
        // another boot (or a restarted, integrity-lost log) goes from 0.
        let same_boot =
            ch.boot_known && log.boot() == Some((ch.boot_reset_count, ch.boot_restart_count));
        let events = log.raw_since(if same_boot { ch.next_seq } else { 0 })?;
        let lost = matches!(log.state(), runlog::LogState::IntegrityLost { .. });
        let ev = Evidence {
            node_id,
            nonce: ch.nonce,
            attest: q.attest,
            signature: q.signature,
            pcrs: q.pcrs.iter().map(PbPcr::from).collect(),
            events,
            log_state: if lost {
                LogState::IntegrityLost
            } else {
                LogState::Intact
            } as i32,
        };
        let res = match self.rt.block_on(c.push_evidence(ev)) {
            Ok(r) => r.into_inner(),
            // A carried challenge the verifier no longer knows (it
            // restarted): a stale nonce changes nothing there, so ask for
            // a fresh challenge and push again, once.
            Err(status) if used_carried && status.code() == tonic::Code::FailedPrecondition => {
                tracing::debug!(%status, "carried challenge refused; fetching a fresh one");
                return self.push(pcr, log);
            }
            Err(status) => {
                return Err(PushError::Rpc {
                    call: "PushEvidence",
                    status,
                })
            }
        };
        self.next = res.next.clone();
        Ok(res)
    }
}
