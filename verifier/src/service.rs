//! The `vouch.v1.Attestation` gRPC service: enrollment, challenges and
//! evidence push, over TLS.
//!
//! Owns the verifier's in-memory view (compact per-node state, issued
//! nonces, pending enrollments) and commits every accepted appraisal to the
//! [`Store`] before answering. Trust boundary: every request comes from a
//! node and is untrusted; [`status_of`] is the one place that maps errors to
//! gRPC status codes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use vouch_proto::api::attestation_server::Attestation;
use vouch_proto::api::{
    BeginEnrollmentRequest, Challenge, ChallengeRequest, CompleteEnrollmentRequest,
    EnrollmentChallenge, EnrollmentResult, Evidence, EvidenceResult, LogState, SidecarStatus,
    TrustUpdate,
};
use vouch_proto::name::ak_qualified_name;
use vouch_proto::quote::{AkVerifier, PcrValue};
use vouch_proto::tpm::Public;

use crate::appraise::{appraise, check_nonce, IntegrityError, IssuedNonce, NodeState, Verdict};
use crate::ca::IssuingCa;
use crate::ear::EarSigner;
use crate::enroll::{self, EkTrust, EnrollError};
use crate::policy::Policy;
use crate::store::{CommitOp, NodeRecord, Store, StoreError, StoredState, VerdictWrite};

/// Most events accepted in one evidence message.
pub const MAX_EVENTS: usize = 10_000;
/// Largest evidence accepted, in bytes of events (the transport accepts
/// up to [`MAX_MESSAGE`], so larger evidence gets a clear InvalidArgument).
pub const MAX_EVIDENCE_BYTES: usize = 8 << 20;
/// Transport limit for one gRPC message.
pub const MAX_MESSAGE: usize = 32 << 20;

/// Service errors; [`status_of`] maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Enrollment refused.
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    /// Evidence failed integrity.
    #[error("evidence refused: {0}")]
    Integrity(#[from] IntegrityError),
    /// No such node.
    #[error("unknown node {0}: enroll first")]
    UnknownNode(String),
    /// No such pending enrollment.
    #[error("unknown or expired enrollment {0}")]
    UnknownEnrollment(String),
    /// Malformed request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A credential call without the session of a freshly attested node.
    #[error("node {0} has no valid session: push fresh evidence first")]
    NoSession(String),
    /// Credentials refused: the instance is not affirming and fresh.
    #[error("no credentials for {instance} on node {node}: {why}")]
    NotAffirmed {
        /// Node name.
        node: String,
        /// Instance (pid@start_time).
        instance: String,
        /// Why.
        why: String,
    },
    /// The issuing CA refused or failed.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
}

/// The one mapping from errors to gRPC status.
pub fn status_of(e: ServiceError) -> Status {
    let msg = e.to_string();
    match e {
        ServiceError::Invalid(_)
        | ServiceError::Enroll(EnrollError::Malformed { .. } | EnrollError::CertParse { .. }) => {
            Status::invalid_argument(msg)
        }
        ServiceError::Integrity(
            IntegrityError::Quote(_) | IntegrityError::EventMalformed { .. },
        ) => Status::invalid_argument(msg),
        ServiceError::Enroll(_) => Status::permission_denied(msg),
        ServiceError::Integrity(_) => Status::failed_precondition(msg),
        ServiceError::UnknownNode(_) | ServiceError::UnknownEnrollment(_) => Status::not_found(msg),
        ServiceError::Store(_) => Status::internal("verifier state unavailable"),
        ServiceError::NoSession(_) => Status::unauthenticated(msg),
        ServiceError::NotAffirmed { .. } => Status::permission_denied(msg),
        ServiceError::Ca(crate::ca::CaError::BadCsr(_) | crate::ca::CaError::BadSpiffeId(_)) => {
            Status::invalid_argument(msg)
        }
        ServiceError::Ca(_) => Status::internal("issuing CA unavailable"),
    }
}

/// Verifier settings the service needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// EK trust configuration.
    pub trust: EkTrust,
    /// Nonce lifetime.
    pub nonce_ttl: Duration,
    /// Credential issuance.
    pub creds: CredSettings,
}

/// How credentials are issued.
#[derive(Debug, Clone)]
pub struct CredSettings {
    /// Trust domain of sidecar SPIFFE IDs.
    pub trust_domain: String,
    /// SPIFFE ID of (vouchd's stand-in for) Dapr Sentry: the audience of
    /// Sentry tokens and the identity of vouchd's Sentry endpoint.
    pub sentry_id: String,
    /// X.509 SVID lifetime.
    pub svid_ttl: Duration,
    /// JWT-SVID and Sentry-token lifetime.
    pub jwt_ttl: Duration,
    /// A verdict older than this (since the node's last accepted evidence)
    /// no longer earns credentials.
    pub fresh: Duration,
}

impl Default for CredSettings {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            sentry_id: "spiffe://localhost/ns/default/dapr-sentry".into(),
            svid_ttl: Duration::from_secs(900),
            jwt_ttl: Duration::from_secs(300),
            fresh: Duration::from_secs(30),
        }
    }
}

struct Pending {
    record: NodeRecord,
    challenge: enroll::Challenge,
    expires_ms: u64,
}

/// The enrolled node `id`, or `UnknownNode`.
fn node_mut<'a>(
    nodes: &'a mut HashMap<String, Node>,
    id: &str,
) -> Result<&'a mut Node, ServiceError> {
    nodes
        .get_mut(id)
        .ok_or_else(|| ServiceError::UnknownNode(id.to_owned()))
}

impl Node {
    /// A node just enrolled or loaded: no nonce, no verdicts yet, and a full
    /// reporting window from now.
    fn new(record: NodeRecord, state: NodeState) -> Self {
        Node {
            record,
            state,
            nonce: None,
            last_ok_ms: now_ms(),
            refreshed_ms: 0,
            generation: next_generation(),
            stale: false,
            verdicts: Arc::default(),
            integrity_ok: true,
            session: None,
            last_nonce: None,
        }
    }
}

/// A value no node state had before (see `Node::generation`).
fn next_generation() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Granularity of the stored verdicts' `updated_ms` while they stay the
/// same (a change is always written at once).
const REFRESH_MS: u64 = 60_000;

struct Node {
    record: NodeRecord,
    state: NodeState,
    nonce: Option<IssuedNonce>,
    /// Changes whenever `state` is replaced (or the node re-enrolls): an
    /// appraisal made outside the lock applies only to the generation it
    /// read.
    generation: u64,
    /// Last accepted evidence (Unix ms; 0 = none since this verifier started).
    last_ok_ms: u64,
    /// When the stored verdict rows' `updated_ms` was last written (Unix ms).
    refreshed_ms: u64,
    /// Sidecars were contraindicated for silence since then.
    stale: bool,
    /// The latest verdicts (what the operator API and EARs serve), shared
    /// with the commit that made them durable.
    verdicts: Arc<Vec<crate::appraise::SidecarVerdict>>,
    /// The last evidence held integrity.
    integrity_ok: bool,
    /// Credential session (handed out with accepted evidence).
    session: Option<[u8; 32]>,
    /// The last nonce consumed (a replay of it is named as such).
    last_nonce: Option<[u8; 32]>,
}

enum WriteOp {
    Node(NodeRecord, serde_json::Value),
    Commit(CommitOp),
}

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The single writer: batches whatever is queued into one transaction
/// (group commit), so appraisal never waits for one disk write per request;
/// callers that must not act before durability wait for the ack.
struct Writer {
    tx: std::sync::mpsc::Sender<(WriteOp, Option<Ack>)>,
}

/// How long the writer gathers commits nobody waits for.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

impl Writer {
    fn spawn(mut store: Box<dyn Store>) -> Result<Self, ServiceError> {
        let (tx, rx) = std::sync::mpsc::channel::<(WriteOp, Option<Ack>)>();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];

                    // Group commit. Nobody waits on commits without an
                    // ack (unchanged verdicts, audit rows), so those are
                    // gathered for up to BATCH_WINDOW: fewer, larger
                    // transactions cost far less per op (one WAL sync and
                    // one copy of each page per transaction). An op that is
                    // awaited (a verdict change) is committed at once.
                    let deadline = std::time::Instant::now() + BATCH_WINDOW;
                    let mut awaited = batch.iter().any(|(_, ack)| ack.is_some());
                    while batch.len() < 1024 && !awaited {
                        let left = deadline.saturating_duration_since(std::time::Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(op) => {
                                awaited = op.1.is_some();
                                batch.push(op);
                            }
                            Err(_) => break,
                        }
                    }
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    let mut result: Result<(), String> = Ok(());
                    let mut commits = Vec::new();
                    let flush = |commits: &mut Vec<CommitOp>,
                                 store: &mut Box<dyn Store>,
                                 result: &mut Result<(), String>| {
                        if !commits.is_empty() {
                            if let Err(e) = store.commit_batch(commits) {
                                *result = Err(e.to_string());
                            }
                            commits.clear();
                        }
                    };
                    let mut acks = Vec::new();
                    for (op, ack) in batch {
                        match op {
                            WriteOp::Commit(c) => commits.push(c),
                            WriteOp::Node(rec, audit) => {
                                flush(&mut commits, &mut store, &mut result);
                                if let Err(e) = store.put_node(&rec, &audit) {
                                    result = Err(e.to_string());
                                }
                            }
                        }
                        acks.extend(ack);
                    }
                    flush(&mut commits, &mut store, &mut result);
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "state commit failed");
                    }
                    for a in acks {
                        let _ = a.send(result.clone());
                    }
                }
            })
            .map_err(|e| ServiceError::Invalid(format!("cannot start the state writer: {e}")))?;
        Ok(Self { tx })
    }

    fn send(
        &self,
        op: WriteOp,
        wait: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<(), String>>> {
        let (ack, rx) = if wait {
            let (a, r) = tokio::sync::oneshot::channel();
            (Some(a), Some(r))
        } else {
            (None, None)
        };
        if self.tx.send((op, ack)).is_err() {
            tracing::error!("state writer stopped");
        }
        rx
    }
}

/// Waits until a write is durable.
async fn durable(
    rx: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
) -> Result<(), Status> {
    match rx {
        None => Ok(()),
        Some(rx) => match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "state not durable");
                Err(status_of(ServiceError::Invalid(
                    "verifier state unavailable".into(),
                )))
            }
            Err(_) => Err(Status::internal("verifier state writer stopped")),
        },
    }
}

struct Inner {
    writer: Writer,
    nodes: HashMap<String, Node>,
    pending: HashMap<String, Pending>,
    /// Shared with appraisals running outside the lock.
    policies: Arc<Vec<Policy>>,
    /// Open Watch streams, by node id.
    watchers: HashMap<String, tokio::sync::watch::Sender<Arc<TrustUpdate>>>,
}

/// A verdict change, as webhooks receive it.
pub type VerdictEvent = serde_json::Value;

/// The service.
pub struct Verifier {
    inner: Mutex<Inner>,
    settings: Settings,
    ca: RwLock<IssuingCa>,
    signer: Arc<EarSigner>,
    events: Mutex<Option<tokio::sync::mpsc::UnboundedSender<VerdictEvent>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random32() -> Result<[u8; 32], ServiceError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| ServiceError::Invalid("system random source failed".into()))?;
    Ok(b)
}

fn node_state(
    record: &NodeRecord,
    stored: Option<&StoredState>,
) -> Result<NodeState, ServiceError> {
    let bad = |what: &str, e: String| {
        ServiceError::Invalid(format!("stored {what} of {}: {e}", record.node_id))
    };
    let ek_b = hex::decode(&record.ek_public).map_err(|e| bad("EK", e.to_string()))?;
    let ak_b = hex::decode(&record.ak_public).map_err(|e| bad("AK", e.to_string()))?;
    let ek = Public::parse(&ek_b).map_err(|e| bad("EK", e.to_string()))?;
    let ak = Public::parse(&ak_b).map_err(|e| bad("AK", e.to_string()))?;
    let mut s = NodeState {
        name: record.name.clone(),
        labels: record.labels.clone(),
        ak: AkVerifier::new(&ak).map_err(|e| bad("AK", e.to_string()))?,
        qualified_name: ak_qualified_name(&ek, &ak).map_err(|e| bad("AK", e.to_string()))?,
        boot: None,
        runtime_pcr: vouch_proto::DEFAULT_RUNTIME_PCR,
        next_seq: 0,
        pcr: [0; 32],
        integrity_lost: None,
        instances: BTreeMap::new(),
        anomalies: Vec::new(),
    };
    if let Some(st) = stored {
        st.apply(&mut s);
    }
    Ok(s)
}

/// Builds every loaded node's state (parsing its keys, preparing its AK's
/// verification table: about 70 µs each) on all cores: with 100,000 nodes
/// this is most of a restart.
fn prepare_nodes(
    mut loaded: Vec<(NodeRecord, Option<StoredState>)>,
) -> Result<Vec<(NodeRecord, NodeState)>, ServiceError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = loaded.len().div_ceil(threads).max(1);
    let mut parts = Vec::new();
    while !loaded.is_empty() {
        let rest = loaded.split_off(chunk.min(loaded.len()));
        parts.push(std::mem::replace(&mut loaded, rest));
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(|(record, stored)| {
                            let state = node_state(&record, stored.as_ref())?;
                            Ok((record, state))
                        })
                        .collect::<Result<Vec<_>, ServiceError>>()
                })
            })
            .collect();
        let mut out = Vec::new();
        for w in workers {
            let built = w
                .join()
                .map_err(|_| ServiceError::Invalid("preparing stored nodes failed".into()))??;
            out.extend(built);
        }
        Ok(out)
    })
}

impl Verifier {
    /// Loads enrolled nodes from `store`.
    pub fn new(
        store: Box<dyn Store>,
        settings: Settings,
        policies: Vec<Policy>,
        ca: IssuingCa,
        signer: Arc<EarSigner>,
    ) -> Result<Self, ServiceError> {
        let mut nodes = HashMap::new();
        for (record, state) in prepare_nodes(store.load()?)? {
            nodes.insert(
                record.node_id.clone(),
                // A restarted verifier gives every node a full window.
                Node::new(record, state),
            );
        }
        tracing::info!(nodes = nodes.len(), "verifier state loaded");
        Ok(Self {
            inner: Mutex::new(Inner {
                writer: Writer::spawn(store)?,
                nodes,
                pending: HashMap::new(),
                policies: Arc::new(policies),
                watchers: HashMap::new(),
            }),
            settings,
            ca: RwLock::new(ca),
            signer,
            events: Mutex::new(None),
        })
    }

    /// Contraindicates every sidecar of nodes silent for longer than
    /// `limit` (committed before it takes effect). Returns how many nodes
    /// turned stale.
    pub fn expire_stale(&self, limit: Duration) -> Result<usize, ServiceError> {
        let now = now_ms();
        let limit_ms = limit.as_millis() as u64;
        let mut g = self.lock()?;
        let g = &mut *g;
        let mut n_stale = 0;
        for n in g.nodes.values_mut() {
            if n.stale
                || now.saturating_sub(n.last_ok_ms) <= limit_ms
                || n.state.instances.is_empty()
            {
                continue;
            }
            let err = IntegrityError::Stale {
                last_ms: n.last_ok_ms,
                limit_ms,
            };
            let verdicts: Arc<Vec<_>> = n
                .state
                .instances
                .values()
                .map(|m| crate::appraise::SidecarVerdict {
                    id: m.id,
                    app_id: m.flags.app_id.clone(),
                    namespace: m.env.namespace.clone().unwrap_or_else(|| "default".into()),
                    verdict: Verdict::Contraindicated,
                    reasons: vec![crate::appraise::Reason {
                        rule: "integrity".into(),
                        policy: None,
                        measured: err.to_string(),
                        expected: "evidence at least every stale_after_ms".into(),
                        ok: false,
                    }],
                    response: crate::policy::Response::None,
                })
                .collect::<Vec<_>>()
                .into();
            let audit = serde_json::json!({"event": "stale", "last_ok_ms": n.last_ok_ms, "limit_ms": limit_ms});
            g.writer.send(
                WriteOp::Commit(CommitOp {
                    node_id: n.record.node_id.clone(),
                    state: None,
                    verdicts: verdicts.clone(),
                    write: VerdictWrite::Full,
                    now_ms: now,
                    audit,
                }),
                false,
            );
            tracing::warn!(node = %n.record.name, silent_ms = now - n.last_ok_ms, "node stopped reporting: its sidecars are contraindicated");
            self.emit_changes(&n.record, &n.verdicts, &verdicts, now);
            n.verdicts = verdicts;
            n.stale = true;
            n_stale += 1;
            if let Some(tx) = g.watchers.get(&n.record.node_id) {
                send_if_changed(tx, self.update_of(n));
            }
        }
        Ok(n_stale)
    }

    /// Every node's record and latest verdicts.
    pub fn snapshot(&self) -> Vec<(NodeRecord, Vec<crate::appraise::SidecarVerdict>)> {
        match self.inner.lock() {
            Ok(g) => g
                .nodes
                .values()
                .map(|n| (n.record.clone(), n.verdicts.to_vec()))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Names of the policies in force.
    pub fn policy_names(&self) -> Vec<String> {
        match self.inner.lock() {
            Ok(g) => g.policies.iter().map(|p| p.metadata.name.clone()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Replaces the policy set (after a successful reload).
    pub fn set_policies(&self, p: Vec<Policy>) {
        if let Ok(mut g) = self.inner.lock() {
            g.policies = Arc::new(p);
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, ServiceError> {
        self.inner
            .lock()
            .map_err(|_| ServiceError::Invalid("verifier state lock poisoned".into()))
    }

    fn begin(&self, r: BeginEnrollmentRequest) -> Result<EnrollmentChallenge, ServiceError> {
        if r.node_name.is_empty() || r.node_name.len() > 253 {
            return Err(ServiceError::Invalid(
                "node_name must be 1-253 characters".into(),
            ));
        }
        let basis = enroll::validate_ek(
            &self.settings.trust,
            &r.ek_public,
            &r.ek_certificate,
            &r.ek_chain,
            (now_ms() / 1000) as i64,
        )?;
        let challenge = enroll::challenge(&r.ek_public, &r.ak_public)?;
        let id = hex::encode(random32()?);
        let record = NodeRecord {
            node_id: enroll::ek_id(&r.ek_public),
            name: r.node_name,
            labels: r.labels.into_iter().collect(),
            ek_public: hex::encode(&r.ek_public),
            ak_public: hex::encode(&r.ak_public),
            trust: format!("{basis:?}"),
            enrolled_unix: now_ms() / 1000,
        };
        let out = EnrollmentChallenge {
            enrollment_id: id.clone(),
            id_object: challenge.credential.id_object.clone(),
            encrypted_secret: challenge.credential.encrypted_secret.clone(),
        };
        let mut g = self.lock()?;
        g.pending.retain(|_, p| p.expires_ms > now_ms());
        g.pending.insert(
            id,
            Pending {
                record,
                challenge,
                expires_ms: now_ms() + 60_000,
            },
        );
        Ok(out)
    }

    #[allow(clippy::type_complexity)]
    fn complete(
        &self,
        r: CompleteEnrollmentRequest,
    ) -> Result<
        (
            EnrollmentResult,
            Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
        ),
        ServiceError,
    > {
        let mut g = self.lock()?;
        let p = g
            .pending
            .remove(&r.enrollment_id)
            .filter(|p| p.expires_ms > now_ms())
            .ok_or_else(|| ServiceError::UnknownEnrollment(r.enrollment_id.clone()))?;
        enroll::complete(&p.challenge, &r.secret)?;
        let rec = p.record;
        let previous = g
            .nodes
            .get(&rec.node_id)
            .map(|n| n.record.ak_public.clone());
        let audit = serde_json::json!({
            "event": if previous.is_some() { "re-enrolled" } else { "enrolled" },
            "node": rec.name, "trust": rec.trust,
            "new_ak": previous.as_ref().is_some_and(|a| a != &rec.ak_public),
        });
        let ack = g.writer.send(WriteOp::Node(rec.clone(), audit), true);
        tracing::info!(node = %rec.name, node_id = %rec.node_id, trust = %rec.trust, reenrolled = previous.is_some(), "node enrolled (AK bound to EK by credential activation)");
        let state = node_state(&rec, None)?;
        let id = rec.node_id.clone();
        g.nodes.insert(id.clone(), Node::new(rec, state));
        Ok((EnrollmentResult { node_id: id }, ack))
    }

    fn challenge(&self, r: ChallengeRequest) -> Result<Challenge, ServiceError> {
        let nonce = random32()?;
        let mut g = self.lock()?;
        let n = node_mut(&mut g.nodes, &r.node_id)?;
        Ok(self.issue_nonce(n, nonce))
    }

    /// Issues `nonce` as the node's one outstanding challenge.
    fn issue_nonce(&self, n: &mut Node, nonce: [u8; 32]) -> Challenge {
        let expires = now_ms() + self.settings.nonce_ttl.as_millis() as u64;
        n.nonce = Some(IssuedNonce {
            nonce,
            expires_ms: expires,
            used: false,
        });
        let (reset, restart) = n.state.boot.unwrap_or((0, 0));
        Challenge {
            nonce: nonce.to_vec(),
            expires_at_ms: expires,
            next_seq: n.state.next_seq,
            boot_known: n.state.boot.is_some(),
            boot_reset_count: reset,
            boot_restart_count: restart,
        }
    }

    #[allow(clippy::type_complexity)]
    /// Appraises pushed evidence: (answer, durability of a verdict change,
    /// whether the node's verdicts changed).
    fn push(
        &self,
        e: Evidence,
    ) -> Result<
        (
            EvidenceResult,
            Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
            bool,
        ),
        ServiceError,
    > {
        let bytes: usize =
            e.events.iter().map(Vec::len).sum::<usize>() + e.attest.len() + e.signature.len();
        if bytes > MAX_EVIDENCE_BYTES {
            return Err(ServiceError::Invalid(format!(
                "evidence of {bytes} bytes exceeds the limit of {MAX_EVIDENCE_BYTES}"
            )));
        }
        if e.events.len() > MAX_EVENTS {
            return Err(ServiceError::Invalid(format!(
                "{} events exceed the limit of {MAX_EVENTS}",
                e.events.len()
            )));
        }
        let pcrs: Vec<PcrValue> = e
            .pcrs
            .iter()
            .map(|p| {
                Ok(PcrValue {
                    bank: u16::try_from(p.bank).map_err(|_| {
                        ServiceError::Invalid(format!("PCR bank {} out of range", p.bank))
                    })?,
                    index: u8::try_from(p.index).map_err(|_| {
                        ServiceError::Invalid(format!("PCR index {} out of range", p.index))
                    })?,
                    value: p.value.clone(),
                })
            })
            .collect::<Result<_, ServiceError>>()?;
        let next_nonce = random32()?;
        let ev = crate::appraise::Evidence {
            nonce: &e.nonce,
            attest: &e.attest,
            signature: &e.signature,
            pcrs: &pcrs,
            events: &e.events,
            log_integrity_lost: e.log_state == LogState::IntegrityLost as i32,
        };
        // 1. Under the lock: the nonce is checked and consumed, and the
        //    node's state is read (a cheap clone: measurements are shared).
        let (snapshot, generation, policies) = {
            let mut guard = self.lock()?;
            let g = &mut *guard;
            let n = node_mut(&mut g.nodes, &e.node_id)?;
            let nonce_check =
                check_nonce(n.nonce.as_ref(), n.last_nonce.as_ref(), &e.nonce, now_ms());
            if let Some(issued) = n.nonce.as_mut() {
                if issued.nonce.as_slice() == e.nonce.as_slice() {
                    issued.used = true;
                    n.last_nonce = Some(issued.nonce);
                }
            }
            if let Err(err) = nonce_check {
                // Evidence that is not fresh says nothing about the node now
                // (it may be an attacker's replay, or a challenge from before
                // a verifier restart): refused and audited, verdicts unchanged.
                g.writer.send(
                    WriteOp::Commit(CommitOp {
                        node_id: n.record.node_id.clone(),
                        state: None,
                        verdicts: n.verdicts.clone(),
                        write: VerdictWrite::AuditOnly,
                        now_ms: now_ms(),
                        audit: serde_json::json!({"event": "evidence refused", "reason": err.to_string()}),
                    }),
                    false,
                );
                return Err(err.into());
            }
            (n.state.clone(), n.generation, g.policies.clone())
        };
        // 2. Without the lock: appraisal (signature, replay, policy) — the
        //    costly part — so appraisals of different nodes run in parallel.
        let mut a = appraise(&snapshot, &ev, Ok(()), &policies);
        // 3. Under the lock again: apply it, unless the node's state changed
        //    meanwhile (another accepted evidence, a re-enrollment); then the
        //    evidence is appraised again against the state now in force.
        let mut guard = self.lock()?;
        let g = &mut *guard;
        let n = node_mut(&mut g.nodes, &e.node_id)?;
        if n.generation != generation {
            a = appraise(&n.state, &ev, Ok(()), &g.policies);
        }
        let accepted = a.integrity.is_ok();
        // Without new events an accepted state is the stored one (a new
        // boot or lost integrity both need events or refuse).
        let stored = (accepted && !e.events.is_empty()).then(|| StoredState::of(&a.state));
        let verdicts = Arc::new(std::mem::take(&mut a.verdicts));
        let unchanged = *verdicts == *n.verdicts;
        let audit = serde_json::json!({
            "event": "appraisal",
            "integrity": match &a.integrity { Ok(()) => serde_json::Value::String("ok".into()), Err(e) => serde_json::to_value(e).unwrap_or_default() },
            "verdicts": verdicts.iter().map(|v| serde_json::json!({"instance": v.id.to_string(), "app_id": v.app_id, "verdict": v.verdict.as_str()})).collect::<Vec<_>>(),
        });
        // Group commit; a verdict change is durable before we answer.
        let changed = n.verdicts.len() != verdicts.len()
            || n.verdicts
                .iter()
                .zip(verdicts.iter())
                .any(|(x, y)| x.id != y.id || x.verdict != y.verdict);
        // Unchanged verdicts only refresh their stored `updated_ms`, and at
        // most once per REFRESH_MS per node: rewriting every node's verdict
        // page at every heartbeat cost a third of the writer's disk pages.
        // (The live `last_ms` of each node is in memory; the audit row of
        // this appraisal is written regardless.)
        let now = now_ms();
        let write = if !unchanged {
            VerdictWrite::Full
        } else if now.saturating_sub(n.refreshed_ms) >= REFRESH_MS {
            VerdictWrite::Refresh
        } else {
            VerdictWrite::AuditOnly
        };
        if write != VerdictWrite::AuditOnly {
            n.refreshed_ms = now;
        }
        let ack = g.writer.send(
            WriteOp::Commit(CommitOp {
                node_id: n.record.node_id.clone(),
                state: stored,
                verdicts: verdicts.clone(),
                write,
                now_ms: now,
                audit,
            }),
            changed,
        );
        // Changes are logged at info by emit_changes; the unchanged rest
        // only at debug (one line per sidecar per heartbeat is noise).
        for v in verdicts.iter() {
            tracing::debug!(node = %n.record.name, instance = %v.id, app_id = ?v.app_id, verdict = v.verdict.as_str(), "sidecar verdict");
        }
        self.emit_changes(&n.record, &n.verdicts, &verdicts, now_ms());
        n.verdicts = verdicts.clone();
        n.integrity_ok = accepted;
        if accepted {
            n.state = a.state;
            n.generation = next_generation();
            n.last_ok_ms = now_ms();
            n.stale = false;
            if n.session.is_none() {
                n.session = Some(random32()?);
            }
        } else {
            // Integrity failed: the node must attest afresh for credentials.
            n.session = None;
        }
        if let Err(e) = a.integrity {
            // The contraindicated verdicts are committed (not awaited here:
            // refusing is already the safe answer).
            return Err(e.into());
        }
        let next = self.issue_nonce(n, next_nonce);
        let result = EvidenceResult {
            next_seq: n.state.next_seq,
            sidecars: verdicts.iter().map(|v| self.status_of_verdict(v)).collect(),
            session: n.session.map(|s| s.to_vec()).unwrap_or_default(),
            next: Some(next),
        };
        Ok((result, ack, !unchanged))
    }
}

#[tonic::async_trait]
impl Attestation for Verifier {
    async fn begin_enrollment(
        &self,
        r: Request<BeginEnrollmentRequest>,
    ) -> Result<Response<EnrollmentChallenge>, Status> {
        self.begin(r.into_inner()).map(Response::new).map_err(|e| {
            tracing::warn!(error = %e, "enrollment refused");
            status_of(e)
        })
    }

    async fn complete_enrollment(
        &self,
        r: Request<CompleteEnrollmentRequest>,
    ) -> Result<Response<EnrollmentResult>, Status> {
        let (res, ack) = self.complete(r.into_inner()).map_err(|e| {
            tracing::warn!(error = %e, "enrollment completion refused");
            status_of(e)
        })?;
        durable(ack).await?;
        Ok(Response::new(res))
    }

    async fn get_challenge(
        &self,
        r: Request<ChallengeRequest>,
    ) -> Result<Response<Challenge>, Status> {
        self.challenge(r.into_inner())
            .map(Response::new)
            .map_err(status_of)
    }

    async fn push_evidence(
        &self,
        r: Request<Evidence>,
    ) -> Result<Response<EvidenceResult>, Status> {
        let node = r.get_ref().node_id.clone();
        let (res, ack, changed) = self.push(r.into_inner()).map_err(|e| {
            tracing::warn!(node_id = %node, error = %e, "evidence refused");
            // Refused evidence contraindicates the node's sidecars: tell
            // its vouchd at once (withdrawing needs no durability first).
            self.notify(&node);
            status_of(e)
        })?;
        durable(ack).await?;
        // Durable before anything acts on it.
        // Heartbeats that change no verdict wake nobody.
        if changed {
            self.notify(&node);
        }
        Ok(Response::new(res))
    }
}

/// Wakes a node's Watch streams only when what they would see changed
/// (heartbeats that change nothing send nothing).
fn send_if_changed(tx: &tokio::sync::watch::Sender<Arc<TrustUpdate>>, u: TrustUpdate) {
    tx.send_if_modified(|cur| {
        if **cur == u {
            false
        } else {
            *cur = Arc::new(u);
            true
        }
    });
}

/// The node a credential call names, if it presents that node's session.
fn session_node<'a>(
    nodes: &'a HashMap<String, Node>,
    auth: Option<&vouch_proto::api::NodeAuth>,
) -> Result<&'a Node, ServiceError> {
    let auth = auth.ok_or_else(|| ServiceError::Invalid("auth missing".into()))?;
    let n = nodes
        .get(&auth.node_id)
        .ok_or_else(|| ServiceError::UnknownNode(auth.node_id.clone()))?;
    match n.session.as_ref() {
        Some(s) if same_secret(&auth.session, s) => Ok(n),
        _ => Err(ServiceError::NoSession(n.record.name.clone())),
    }
}

fn same_secret(a: &[u8], b: &[u8; 32]) -> bool {
    a.len() == 32 && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a credential call is for.
enum Subject {
    /// A sidecar instance: (pid, start_time).
    Instance(u32, u64),
    /// The node itself (its Sentry endpoint).
    Node,
}

impl Verifier {
    /// Sends every verdict change to the webhook queue from now on.
    pub fn set_event_sink(&self, tx: tokio::sync::mpsc::UnboundedSender<VerdictEvent>) {
        if let Ok(mut g) = self.events.lock() {
            *g = Some(tx);
        }
    }

    /// The SPIFFE ID of a sidecar with `app_id` in `namespace`.
    pub fn spiffe_id(&self, namespace: &str, app_id: &str) -> String {
        format!(
            "spiffe://{}/ns/{namespace}/{app_id}",
            self.settings.creds.trust_domain
        )
    }

    fn status_of_verdict(&self, v: &crate::appraise::SidecarVerdict) -> SidecarStatus {
        SidecarStatus {
            pid: v.id.pid,
            start_time: v.id.start_time,
            app_id: v.app_id.clone().unwrap_or_default(),
            verdict: v.verdict.as_str().into(),
            namespace: v.namespace.clone(),
            spiffe_id: v
                .app_id
                .as_deref()
                .map(|a| self.spiffe_id(&v.namespace, a))
                .unwrap_or_default(),
            response: v.response.as_str().into(),
        }
    }

    fn emit_changes(
        &self,
        node: &NodeRecord,
        old: &[crate::appraise::SidecarVerdict],
        new: &[crate::appraise::SidecarVerdict],
        now: u64,
    ) {
        let Ok(g) = self.events.lock() else { return };
        for v in new {
            let before = old.iter().find(|o| o.id == v.id).map(|o| o.verdict);
            if before == Some(v.verdict) {
                continue;
            }
            tracing::info!(node = %node.name, instance = %v.id, app_id = ?v.app_id, from = before.map(|b| b.as_str()), to = v.verdict.as_str(), "verdict changed");
            if let Some(tx) = g.as_ref() {
                let failed: Vec<_> = v.reasons.iter().filter(|r| !r.ok).collect();
                let _ = tx.send(serde_json::json!({
                    "type": "vouch.verdict.changed",
                    "at_ms": now,
                    "node": node.name,
                    "node_id": node.node_id,
                    "instance": v.id.to_string(),
                    "app_id": v.app_id,
                    "namespace": v.namespace,
                    "spiffe_id": v.app_id.as_deref().map(|a| self.spiffe_id(&v.namespace, a)),
                    "from": before.map(|b| b.as_str()),
                    "to": v.verdict.as_str(),
                    "reasons": failed,
                }));
            }
        }
    }

    fn update_of(&self, n: &Node) -> TrustUpdate {
        TrustUpdate {
            sidecars: n
                .verdicts
                .iter()
                .map(|v| self.status_of_verdict(v))
                .collect(),
            bundle: self.bundle_der(),
            jwks: self.signer.jwks().to_string(),
            trust_domain: self.settings.creds.trust_domain.clone(),
        }
    }

    fn bundle_der(&self) -> Vec<Vec<u8>> {
        self.ca.read().map(|c| c.bundle_der()).unwrap_or_default()
    }

    /// Sends `node`'s current verdicts to its Watch streams.
    pub fn notify(&self, node_id: &str) {
        let Ok(g) = self.inner.lock() else { return };
        if let (Some(tx), Some(n)) = (g.watchers.get(node_id), g.nodes.get(node_id)) {
            send_if_changed(tx, self.update_of(n));
        }
    }

    /// Rotates the issuing CA when due; on a change every node hears of the
    /// new bundle.
    pub fn rotate_ca(&self) -> Result<bool, ServiceError> {
        let now = (now_ms() / 1000) as i64;
        let changed = self
            .ca
            .write()
            .map_err(|_| ServiceError::Invalid("CA lock poisoned".into()))?
            .rotate_if_due(now)?;
        if changed {
            let g = self.lock()?;
            for (id, tx) in &g.watchers {
                if let Some(n) = g.nodes.get(id) {
                    send_if_changed(tx, self.update_of(n));
                }
            }
        }
        Ok(changed)
    }

    /// Checks the node's session and what it asks credentials for; returns
    /// (SPIFFE ID, node name) taken from the verifier's own state.
    fn authorize(
        &self,
        auth: Option<&vouch_proto::api::NodeAuth>,
        subject: Subject,
    ) -> Result<(String, String), ServiceError> {
        let g = self.lock()?;
        let n = session_node(&g.nodes, auth)?;
        let refuse = |instance: String, why: String| ServiceError::NotAffirmed {
            node: n.record.name.clone(),
            instance,
            why,
        };
        let age = now_ms().saturating_sub(n.last_ok_ms);
        let fresh = self.settings.creds.fresh.as_millis() as u64;
        let what = match subject {
            Subject::Instance(pid, st) => format!("{pid}@{st}"),
            Subject::Node => "the node".into(),
        };
        if n.stale || !n.integrity_ok {
            return Err(refuse(what, "the node's evidence failed or stopped".into()));
        }
        if age > fresh {
            return Err(refuse(
                what,
                format!("last accepted evidence {age} ms ago (fresh window {fresh} ms)"),
            ));
        }
        match subject {
            Subject::Instance(pid, st) => {
                let v = n
                    .verdicts
                    .iter()
                    .find(|v| v.id.pid == pid && v.id.start_time == st)
                    .ok_or_else(|| refuse(what.clone(), "not a measured daprd instance".into()))?;
                if v.verdict != Verdict::Affirming {
                    return Err(refuse(what, format!("verdict is {}", v.verdict.as_str())));
                }
                let app = v
                    .app_id
                    .as_deref()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| refuse(what.clone(), "no measured --app-id".into()))?;
                Ok((self.spiffe_id(&v.namespace, app), n.record.name.clone()))
            }
            Subject::Node => Ok((self.settings.creds.sentry_id.clone(), n.record.name.clone())),
        }
    }

    /// Signs an X.509 SVID (or the node's Sentry certificate).
    pub fn sign_x509(
        &self,
        r: &vouch_proto::api::X509Request,
    ) -> Result<vouch_proto::api::X509Response, ServiceError> {
        let subject = if r.sentry_server {
            Subject::Node
        } else {
            Subject::Instance(r.pid, r.start_time)
        };
        let (id, node) = self.authorize(r.auth.as_ref(), subject)?;
        let now = (now_ms() / 1000) as i64;
        // The Sentry endpoint also answers to "localhost" for TLS clients
        // that check a DNS name (daprd checks the SPIFFE ID).
        let sentry_dns = ["localhost".to_string()];
        let dns: &[String] = if r.sentry_server { &sentry_dns } else { &[] };
        let ca = self
            .ca
            .read()
            .map_err(|_| ServiceError::Invalid("CA lock poisoned".into()))?;
        let out = ca.issue(&r.csr, &id, dns, self.settings.creds.svid_ttl, now)?;
        tracing::debug!(node = %node, spiffe_id = %id, not_after = out.not_after, "X.509 SVID issued");
        Ok(vouch_proto::api::X509Response {
            spiffe_id: id,
            certificate: out.leaf_der,
            bundle: ca.bundle_der(),
            expires_at: out.not_after as u64,
        })
    }

    /// Mints a JWT-SVID or a Sentry token (EdDSA, the published JWKS key).
    pub fn mint_jwt(
        &self,
        r: &vouch_proto::api::JwtRequest,
    ) -> Result<vouch_proto::api::JwtResponse, ServiceError> {
        let (id, node) = self.authorize(r.auth.as_ref(), Subject::Instance(r.pid, r.start_time))?;
        let aud: Vec<String> = if r.sentry_token {
            vec![self.settings.creds.sentry_id.clone()]
        } else {
            r.audience.clone()
        };
        if aud.is_empty() || aud.len() > 16 || aud.iter().any(|a| a.is_empty() || a.len() > 512) {
            return Err(ServiceError::Invalid(
                "audience: 1-16 non-empty values of at most 512 bytes".into(),
            ));
        }
        let now = (now_ms() / 1000) as i64;
        let exp = now + self.settings.creds.jwt_ttl.as_secs() as i64;
        let token = self.signer.sign_claims(&serde_json::json!({
            "sub": id, "aud": aud, "iat": now, "nbf": now - 30, "exp": exp,
            "iss": "vouch-verifier",
        }));
        tracing::debug!(node = %node, spiffe_id = %id, sentry = r.sentry_token, "JWT issued");
        Ok(vouch_proto::api::JwtResponse {
            spiffe_id: id,
            token,
            expires_at: exp as u64,
        })
    }

    /// Opens a Watch stream for a node (its session checked).
    pub fn watch(
        &self,
        auth: Option<&vouch_proto::api::NodeAuth>,
    ) -> Result<tokio::sync::watch::Receiver<Arc<TrustUpdate>>, ServiceError> {
        let mut g = self.lock()?;
        let g = &mut *g;
        let n = session_node(&g.nodes, auth)?;
        let node_id = n.record.node_id.clone();
        let update = Arc::new(self.update_of(n));
        let tx = g
            .watchers
            .entry(node_id)
            .or_insert_with(|| tokio::sync::watch::channel(update.clone()).0);
        tx.send_replace(update);
        Ok(tx.subscribe())
    }
}

/// A credential call's answer; a refusal is logged and mapped to its status.
fn answer<T>(what: &str, r: Result<T, ServiceError>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| {
        tracing::warn!(error = %e, "{what} refused");
        status_of(e)
    })
}

/// The `vouch.v1.Credentials` service over the same verifier state.
#[derive(Clone)]
pub struct CredentialService(pub Arc<Verifier>);

type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<TrustUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl vouch_proto::api::credentials_server::Credentials for CredentialService {
    async fn sign_x509(
        &self,
        r: Request<vouch_proto::api::X509Request>,
    ) -> Result<Response<vouch_proto::api::X509Response>, Status> {
        answer("X.509 SVID", self.0.sign_x509(r.get_ref()))
    }

    async fn mint_jwt(
        &self,
        r: Request<vouch_proto::api::JwtRequest>,
    ) -> Result<Response<vouch_proto::api::JwtResponse>, Status> {
        answer("JWT", self.0.mint_jwt(r.get_ref()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        r: Request<vouch_proto::api::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let rx = self.0.watch(r.get_ref().auth.as_ref()).map_err(status_of)?;
        let s = tokio_stream::wrappers::WatchStream::new(rx).map(|u| Ok((*u).clone()));
        Ok(Response::new(Box::pin(s)))
    }
}
