//! vouchd's credential state: which measured daprd instances the verifier
//! affirms, the credentials cached for them, and their withdrawal.
//!
//! Owns the per-instance view (measured identity, the verifier's latest
//! verdict, "pending" while local events are not yet appraised), the SVID
//! cache, Sentry token files, the verifier's Watch stream and the trust
//! bundle. The Workload API ([`crate::workload`]) and the Sentry endpoint
//! ([`crate::sentry`]) ask [`Creds`] for credentials; they never decide.
//!
//! Trust boundary: callers are identified by the kernel (SO_PEERCRED and a
//! pidfd, see [`Peer`]), never by what they claim; the verifier signs only
//! for instances it affirms, and its answers name the identity. Fail
//! closed: no verifier, no new credentials; a withdrawal (verdict not
//! affirming, instance gone, evidence refused) drops the cache, ends
//! streams and removes token files at once.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;
use vouch_proto::api::credentials_client::CredentialsClient;
use vouch_proto::api::{
    JwtRequest, NodeAuth, SidecarStatus, TrustUpdate, WatchRequest, X509Request,
};
use vouch_proto::measurement::{InstanceId, Measurement};

use crate::{procfs, sys};

/// Why a caller gets no credentials (each is a PermissionDenied with this
/// text, and an audit event) or why issuing failed.
#[derive(Debug, thiserror::Error)]
pub enum CredError {
    /// The caller is not a measured daprd instance.
    #[error("pid {pid} is not a measured daprd instance")]
    NotMeasured {
        /// Caller pid.
        pid: u32,
    },
    /// The caller exited (its pid may belong to another process now).
    #[error("the calling process (pid {pid}) exited; its pid is not trusted")]
    CallerGone {
        /// Caller pid.
        pid: u32,
    },
    /// The process at the caller's pid is not the measured instance.
    #[error("pid {pid} now runs a different process than the measured instance {instance}")]
    NotSameProcess {
        /// Caller pid.
        pid: u32,
        /// Measured instance.
        instance: InstanceId,
    },
    /// The verifier does not affirm the instance.
    #[error("instance {instance} is not affirmed: {verdict}")]
    NotAffirmed {
        /// Instance.
        instance: InstanceId,
        /// Its verdict (or why none).
        verdict: String,
    },
    /// Local events about the instance are not appraised yet.
    #[error("instance {0} changed and is awaiting the verifier's verdict")]
    Pending(InstanceId),
    /// Trust was withdrawn while serving.
    #[error("trust in instance {0} was withdrawn")]
    Withdrawn(InstanceId),
    /// The verifier cannot be reached or has no session for this node.
    #[error("verifier unavailable: {0}")]
    Unavailable(String),
    /// The verifier refused.
    #[error("verifier refused: {0}")]
    Refused(String),
    /// Local key or CSR generation failed.
    #[error("key generation: {0}")]
    Keygen(String),
}

impl CredError {
    /// The gRPC status for a caller (the one place this daemon maps
    /// credential errors to codes).
    pub fn status(&self) -> tonic::Status {
        match self {
            CredError::Unavailable(_) => tonic::Status::unavailable(self.to_string()),
            CredError::Keygen(_) => tonic::Status::internal(self.to_string()),
            _ => tonic::Status::permission_denied(self.to_string()),
        }
    }
}

/// The process at the other end of a unix-socket connection, as the
/// kernel identified it at connect time.
#[derive(Debug)]
pub struct Peer {
    /// pid (SO_PEERCRED).
    pub pid: u32,
    /// uid (SO_PEERCRED).
    pub uid: u32,
    /// gid (SO_PEERCRED).
    pub gid: u32,
    /// SO_PEERPIDFD: the connecting process itself.
    pub pidfd: PeerPidfd,
}

/// What the kernel says about the connecting process.
#[derive(Debug)]
pub enum PeerPidfd {
    /// A pidfd naming the exact process that connected.
    Fd(OwnedFd),
    /// That process has already exited (ESRCH): never trust its pid.
    Gone,
    /// The kernel has no SO_PEERPIDFD (before Linux 6.5).
    Unsupported,
}

impl Peer {
    /// Identifies the peer of an accepted unix stream.
    pub fn of(s: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let c = s.peer_cred()?;
        let pid = c
            .pid()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| std::io::Error::other("peer has no pid"))?;
        Ok(Self {
            pid,
            uid: c.uid(),
            gid: c.gid(),
            pidfd: match sys::peer_pidfd(s) {
                Ok(fd) => PeerPidfd::Fd(fd),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => PeerPidfd::Gone,
                Err(_) => PeerPidfd::Unsupported,
            },
        })
    }
}

/// An X.509 SVID with its key, as served to a caller.
#[derive(Clone)]
pub struct Svid {
    /// SPIFFE ID.
    pub spiffe_id: String,
    /// Leaf certificate, DER.
    pub leaf_der: Vec<u8>,
    /// PKCS#8 private key, DER (never logged).
    pub key_pkcs8: Vec<u8>,
    /// Trust bundle, DER certificates.
    pub bundle: Vec<Vec<u8>>,
    /// Unix seconds issued / expires.
    pub issued_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Past half its lifetime: time to rotate.
    pub fn due(&self, now: u64) -> bool {
        now >= self.issued_at + (self.expires_at.saturating_sub(self.issued_at)) / 2
    }
}

struct TokenFile {
    /// The directory, opened inside the process's root when first written
    /// (so the file can be removed after the process is gone).
    dir: Option<File>,
    /// In-root path.
    path: String,
    /// Unix seconds the written token expires (0: none written).
    expires_at: u64,
    issued_at: u64,
}

struct Inst {
    id: InstanceId,
    uid: u32,
    gid: u32,
    app_id: Option<String>,
    status: Option<SidecarStatus>,
    /// Log sequence number of the newest local event about this instance
    /// not yet covered by an appraisal.
    pending_seq: Option<u64>,
    svid: Option<Arc<Svid>>,
    token: Option<TokenFile>,
}

impl Inst {
    fn affirmed(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.verdict == "affirming")
    }
}

#[derive(Default)]
struct State {
    session: Option<NodeAuth>,
    instances: HashMap<u32, Inst>,
    bundle: Vec<Vec<u8>>,
    jwks: String,
    trust_domain: String,
}

/// Shared credential state (see the module docs).
pub struct Creds {
    state: Mutex<State>,
    changed: tokio::sync::watch::Sender<u64>,
    client: CredentialsClient<Channel>,
    kick: Box<dyn Fn() + Send + Sync>,
    bundle_file: PathBuf,
    token_dirs: Vec<PathBuf>,
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds").finish_non_exhaustive()
    }
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A PEM certificate from DER.
pub fn cert_pem(der: &[u8]) -> String {
    vouch_proto::pem::encode("CERTIFICATE", der)
}

/// A fresh P-256 key and a CSR for it: (PKCS#8 DER, CSR DER).
pub fn keypair_and_csr() -> Result<(Vec<u8>, Vec<u8>), CredError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CredError::Keygen(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| CredError::Keygen(e.to_string()))?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

fn from_status(s: tonic::Status) -> CredError {
    match s.code() {
        tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::NotFound => {
            CredError::Refused(s.message().to_owned())
        }
        _ => CredError::Unavailable(format!("{}: {}", s.code(), s.message())),
    }
}

impl Creds {
    /// Credential state talking to the verifier over `channel`; `kick`
    /// asks the daemon to push evidence now (to get a fresh session).
    pub fn new(
        channel: Channel,
        kick: Box<dyn Fn() + Send + Sync>,
        serve: &crate::config::ServeConfig,
    ) -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: tokio::sync::watch::channel(0).0,
            client: CredentialsClient::new(channel),
            kick,
            bundle_file: serve.bundle_file.clone(),
            token_dirs: serve.token_dirs.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock means a panic while holding it; the state is
        // still consistent per field, and refusing forever would be worse.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Wakes on every change of verdicts, cache or bundle.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A new measured instance; it gets nothing until the verifier has
    /// appraised the event at `seq`.
    pub fn track(&self, m: &Measurement, seq: u64) {
        let token = procfs::environ(m.id.pid).ok().and_then(|env| {
            env.into_iter()
                .find(|(k, _)| k.as_slice() == b"DAPR_SENTRY_TOKEN_FILE")
                .and_then(|(_, v)| String::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
        });
        let token = token.and_then(|p| {
            let path = if p.starts_with('/') {
                p
            } else {
                // Relative to the daprd's working directory (in its root).
                let cwd = std::fs::read_link(procfs::path(m.id.pid, "cwd"))
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "/".into());
                format!("{}/{p}", cwd.trim_end_matches('/'))
            };
            let allowed = self.token_dirs.is_empty()
                || self.token_dirs.iter().any(|d| {
                    std::path::Path::new(&path).parent().is_some_and(|p| p.starts_with(d))
                        && !path.split('/').any(|c| c == "..")
                });
            if !allowed {
                tracing::warn!(instance = %m.id, file = %path, "DAPR_SENTRY_TOKEN_FILE is outside token_dirs; no token file");
                return None;
            }
            Some(TokenFile {
                dir: None,
                path,
                expires_at: 0,
                issued_at: 0,
            })
        });
        let (uid, gid) = procfs::ids(m.id.pid).unwrap_or((0, 0));
        let mut g = self.lock();
        let old = g.instances.insert(
            m.id.pid,
            Inst {
                id: m.id,
                uid,
                gid,
                app_id: m.flags.app_id.clone(),
                status: None,
                pending_seq: Some(seq),
                svid: None,
                token,
            },
        );
        drop(g);
        if let Some(old) = old {
            self.drop_token(&old);
        }
        self.bump();
    }

    /// An event about `pid` (or every instance) at `seq`: credentials wait
    /// for the verifier's appraisal of it.
    pub fn touch(&self, pid: Option<u32>, seq: u64) {
        let mut g = self.lock();
        for i in g.instances.values_mut() {
            if pid.is_none_or(|p| p == i.id.pid) {
                i.pending_seq = Some(seq);
            }
        }
    }

    /// The instance at `pid` exited.
    pub fn untrack(&self, pid: u32) {
        let old = self.lock().instances.remove(&pid);
        if let Some(old) = old {
            self.drop_token(&old);
            tracing::info!(instance = %old.id, "instance exited: credentials dropped");
            self.bump();
        }
    }

    /// Applies an evidence result: the session, and verdicts that cover
    /// every event before `next_seq`.
    pub fn on_push(&self, r: &vouch_proto::api::EvidenceResult, node_id: &str) {
        {
            let mut g = self.lock();
            if !r.session.is_empty() {
                g.session = Some(NodeAuth {
                    node_id: node_id.to_owned(),
                    session: r.session.clone(),
                });
            }
            let mut cleared = false;
            for i in g.instances.values_mut() {
                if i.pending_seq.is_some_and(|s| s < r.next_seq) {
                    i.pending_seq = None;
                    cleared = true;
                }
            }
            drop(g);
            if !self.apply(&r.sidecars) && cleared {
                // Waiters for these appraisals: the verdicts stand.
                self.bump();
            }
        }
    }

    /// The verifier refused our evidence or is gone: everything withdrawn
    /// (refused) or just no session (unreachable).
    pub fn on_push_failed(&self, refused: bool) {
        if refused {
            let mut g = self.lock();
            g.session = None;
            for i in g.instances.values_mut() {
                i.status = None;
            }
            drop(g);
            self.withdraw_unaffirmed();
        }
    }

    /// Applies the verifier's verdicts; withdraws from every instance that
    /// is not affirmed any more, and carries out the policy's response for
    /// instances that just turned contraindicated. Returns whether any
    /// verdict changed (nothing is woken otherwise).
    pub fn apply(&self, sidecars: &[SidecarStatus]) -> bool {
        let mut actions = Vec::new();
        let mut changed = false;
        {
            let mut g = self.lock();
            for i in g.instances.values_mut() {
                let new = sidecars
                    .iter()
                    .find(|s| s.pid == i.id.pid && s.start_time == i.id.start_time)
                    .cloned();
                if new == i.status {
                    continue;
                }
                changed = true;
                if let Some(s) = &new {
                    if !s.response.is_empty() && s.verdict == "contraindicated" {
                        actions.push((i.id, s.response.clone()));
                    }
                }
                i.status = new;
            }
        }
        if changed {
            self.withdraw_unaffirmed();
        }
        for (id, response) in actions {
            respond(id, &response);
        }
        changed
    }

    fn withdraw_unaffirmed(&self) {
        let mut tokens = Vec::new();
        {
            let mut g = self.lock();
            for i in g.instances.values_mut() {
                if i.affirmed() {
                    continue;
                }
                let had =
                    i.svid.take().is_some() || i.token.as_ref().is_some_and(|t| t.expires_at > 0);
                if had {
                    tracing::warn!(instance = %i.id, app_id = ?i.app_id, verdict = ?i.status.as_ref().map(|s| s.verdict.clone()), "trust withdrawn: cached credentials dropped");
                }
                if let Some(t) = i.token.as_mut() {
                    if t.expires_at > 0 {
                        tokens.push((i.id, t.dir.take(), t.path.clone()));
                        t.expires_at = 0;
                    }
                }
            }
        }
        self.bump();
        for (id, dir, path) in tokens {
            remove_token(id, dir.as_ref(), &path);
        }
    }

    fn drop_token(&self, i: &Inst) {
        if let Some(t) = &i.token {
            if t.expires_at > 0 {
                remove_token(i.id, t.dir.as_ref(), &t.path);
            }
        }
    }

    /// Identifies a caller: the measured instance whose process is the
    /// peer itself (the pidfd taken at connect time must still name a live
    /// process at that pid, with the instance's start time).
    pub fn identify(&self, peer: &Peer) -> Result<InstanceId, CredError> {
        let pid = peer.pid;
        let id = self
            .lock()
            .instances
            .get(&pid)
            .map(|i| i.id)
            .ok_or(CredError::NotMeasured { pid })?;
        match &peer.pidfd {
            PeerPidfd::Fd(fd) if sys::pidfd_pid(fd) == Some(pid) => {}
            PeerPidfd::Fd(_) | PeerPidfd::Gone => return Err(CredError::CallerGone { pid }),
            PeerPidfd::Unsupported => {}
        }
        let st = procfs::stat(pid).map_err(|_| CredError::CallerGone { pid })?;
        if st.start_time != id.start_time {
            return Err(CredError::NotSameProcess { pid, instance: id });
        }
        // Without a pidfd (kernels before 6.5) the check above is all we
        // have: the process at the pid is the instance, not necessarily
        // the one that connected.
        Ok(id)
    }

    /// [`Creds::identify`], waiting up to `limit` when the caller is not
    /// tracked yet: a daprd that asks for its certificate right after exec
    /// is still being measured, and deserves an answer about its verdict
    /// rather than a refusal.
    pub async fn identify_wait(
        &self,
        peer: &Peer,
        limit: Duration,
    ) -> Result<InstanceId, CredError> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.identify(peer) {
                Err(CredError::NotMeasured { .. }) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.identify(peer);
            }
        }
    }

    /// Re-checks, just before a reply, that the caller is still the same
    /// live process and still affirmed.
    pub fn recheck(&self, peer: &Peer, id: InstanceId) -> Result<(), CredError> {
        let now = self.identify(peer)?;
        if now != id {
            return Err(CredError::NotSameProcess {
                pid: peer.pid,
                instance: id,
            });
        }
        self.entitled(id)
    }

    fn entitled(&self, id: InstanceId) -> Result<(), CredError> {
        let g = self.lock();
        let i = g
            .instances
            .get(&id.pid)
            .filter(|i| i.id == id)
            .ok_or(CredError::Withdrawn(id))?;
        // A verdict other than affirming refuses at once; an instance
        // whose latest events are not appraised yet waits.
        match &i.status {
            Some(s) if s.verdict != "affirming" => Err(CredError::NotAffirmed {
                instance: id,
                verdict: s.verdict.clone(),
            }),
            _ if i.pending_seq.is_some() => Err(CredError::Pending(id)),
            None => Err(CredError::NotAffirmed {
                instance: id,
                verdict: "not appraised by the verifier".into(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Waits (up to `limit`) until local events about `id` are appraised,
    /// then says whether it is entitled.
    pub async fn entitled_wait(&self, id: InstanceId, limit: Duration) -> Result<(), CredError> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.entitled(id) {
                Err(CredError::Pending(_)) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return self.entitled(id);
            }
        }
    }

    fn auth(&self) -> Result<NodeAuth, CredError> {
        self.lock().session.clone().ok_or_else(|| {
            CredError::Unavailable("no attested session with the verifier yet".into())
        })
    }

    fn session_lost(&self, s: &tonic::Status) {
        if s.code() == tonic::Code::Unauthenticated || s.code() == tonic::Code::NotFound {
            self.lock().session = None;
            (self.kick)();
        }
    }

    /// The instance's X.509 SVID: the cached one until half its lifetime,
    /// else a new key signed by the verifier.
    pub async fn x509(&self, id: InstanceId) -> Result<Arc<Svid>, CredError> {
        self.entitled_wait(id, Duration::from_secs(3)).await?;
        let now = unix_now();
        if let Some(s) = self
            .lock()
            .instances
            .get(&id.pid)
            .filter(|i| i.id == id)
            .and_then(|i| i.svid.clone())
        {
            if !s.due(now) {
                return Ok(s);
            }
        }
        let (key, csr) = keypair_and_csr()?;
        let r = self.sign(Some(id), csr).await?;
        let svid = Arc::new(Svid {
            spiffe_id: r.spiffe_id,
            leaf_der: r.certificate,
            key_pkcs8: key,
            bundle: r.bundle,
            issued_at: now,
            expires_at: r.expires_at,
        });
        // Cache only if still entitled (a withdrawal may have raced).
        self.entitled(id)?;
        if let Some(i) = self
            .lock()
            .instances
            .get_mut(&id.pid)
            .filter(|i| i.id == id)
        {
            i.svid = Some(svid.clone());
        }
        tracing::info!(instance = %id, spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at, "X.509 SVID issued");
        Ok(svid)
    }

    /// Asks the verifier to sign `csr` for instance `id`, or for the node's
    /// Sentry endpoint when `id` is None.
    pub async fn sign(
        &self,
        id: Option<InstanceId>,
        csr: Vec<u8>,
    ) -> Result<vouch_proto::api::X509Response, CredError> {
        let mut c = self.client.clone();
        let res = c
            .sign_x509(X509Request {
                auth: Some(self.auth()?),
                pid: id.map_or(0, |i| i.pid),
                start_time: id.map_or(0, |i| i.start_time),
                csr,
                sentry_server: id.is_none(),
            })
            .await;
        res.map(|r| r.into_inner()).map_err(|s| {
            self.session_lost(&s);
            from_status(s)
        })
    }

    /// A JWT for `id` (`sentry` = a Sentry token; else a JWT-SVID for
    /// `audience`).
    pub async fn jwt(
        &self,
        id: InstanceId,
        audience: Vec<String>,
        sentry: bool,
    ) -> Result<vouch_proto::api::JwtResponse, CredError> {
        self.entitled_wait(id, Duration::from_secs(3)).await?;
        let mut c = self.client.clone();
        let res = c
            .mint_jwt(JwtRequest {
                auth: Some(self.auth()?),
                pid: id.pid,
                start_time: id.start_time,
                audience,
                sentry_token: sentry,
            })
            .await;
        res.map(|r| r.into_inner()).map_err(|s| {
            self.session_lost(&s);
            from_status(s)
        })
    }

    /// The trust bundle (DER, newest first).
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        self.lock().bundle.clone()
    }

    /// The verifier's JWKS (JSON) and the trust domain.
    pub fn jwks(&self) -> (String, String) {
        let g = self.lock();
        (g.jwks.clone(), g.trust_domain.clone())
    }

    fn set_trust(&self, u: &TrustUpdate) {
        let changed = {
            let mut g = self.lock();
            let changed = g.bundle != u.bundle;
            g.bundle = u.bundle.clone();
            g.jwks = u.jwks.clone();
            g.trust_domain = u.trust_domain.clone();
            changed
        };
        if changed && !u.bundle.is_empty() {
            let pem: String = u.bundle.iter().map(|d| cert_pem(d)).collect();
            if let Err(e) = write_atomic(&self.bundle_file, pem.as_bytes()) {
                tracing::warn!(file = %self.bundle_file.display(), error = %e, "cannot write the trust bundle");
            }
        }
    }

    /// Follows the verifier's Watch stream for as long as the process
    /// lives: verdict changes withdraw at once; bundle changes are stored.
    pub async fn watch_loop(self: Arc<Self>) {
        loop {
            let auth = match self.auth() {
                Ok(a) => a,
                Err(_) => {
                    let mut rx = self.subscribe();
                    let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
                    continue;
                }
            };
            let mut c = self.client.clone();
            match c.watch(WatchRequest { auth: Some(auth) }).await {
                Ok(stream) => {
                    let mut s = stream.into_inner();
                    loop {
                        match s.message().await {
                            Ok(Some(u)) => {
                                self.set_trust(&u);
                                self.apply(&u.sidecars);
                            }
                            Ok(None) => break,
                            Err(st) => {
                                tracing::warn!(status = %st, "verifier watch stream ended");
                                self.session_lost(&st);
                                break;
                            }
                        }
                    }
                }
                Err(st) => {
                    tracing::debug!(status = %st, "verifier watch refused");
                    self.session_lost(&st);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Keeps Sentry token files: written for affirmed instances that name
    /// one (DAPR_SENTRY_TOKEN_FILE), refreshed at half-life, removed on
    /// withdrawal (that happens in [`Creds::apply`]).
    pub async fn token_loop(self: Arc<Self>) {
        let mut rx = self.subscribe();
        loop {
            let now = unix_now();
            let due: Vec<InstanceId> = {
                let g = self.lock();
                g.instances
                    .values()
                    .filter(|i| i.affirmed() && i.pending_seq.is_none())
                    .filter(|i| {
                        i.token.as_ref().is_some_and(|t| {
                            t.expires_at == 0
                                || now >= t.issued_at + (t.expires_at - t.issued_at) / 2
                        })
                    })
                    .map(|i| i.id)
                    .collect()
            };
            for id in due {
                match self.jwt(id, Vec::new(), true).await {
                    Ok(j) => self.write_token(id, &j),
                    Err(e) => tracing::warn!(instance = %id, error = %e, "no Sentry token"),
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        }
    }

    fn write_token(&self, id: InstanceId, j: &vouch_proto::api::JwtResponse) {
        let mut g = self.lock();
        let Some(i) = g.instances.get_mut(&id.pid).filter(|i| i.id == id) else {
            return;
        };
        // A withdrawal may have raced the mint: write only if affirmed now.
        if !i.affirmed() || i.pending_seq.is_some() {
            return;
        }
        let (uid, gid) = (i.uid, i.gid);
        let Some(t) = i.token.as_mut() else { return };
        let result = (|| {
            let (dir, name) = sys::split_file(&t.path)?;
            if t.dir.is_none() {
                t.dir = Some(sys::open_dir_in_root(id.pid, dir)?);
            }
            match &t.dir {
                Some(d) => sys::write_at(d, name, j.token.as_bytes(), uid, gid),
                None => Ok(()),
            }
        })();
        match result {
            Ok(()) => {
                t.issued_at = unix_now();
                t.expires_at = j.expires_at;
                tracing::info!(instance = %id, file = %t.path, expires_at = j.expires_at, "Sentry token written");
            }
            Err(e) => {
                tracing::warn!(instance = %id, file = %t.path, error = %e, "cannot write the Sentry token file")
            }
        }
    }
}

fn remove_token(id: InstanceId, dir: Option<&File>, path: &str) {
    let name = path.rsplit('/').next().unwrap_or_default();
    let r = match dir {
        Some(d) => sys::remove_at(d, name),
        None => sys::remove_in_root(id.pid, path),
    };
    match r {
        Ok(()) => tracing::warn!(instance = %id, file = %path, "Sentry token removed"),
        Err(e) => {
            tracing::error!(instance = %id, file = %path, error = %e, "cannot remove the Sentry token file")
        }
    }
}

/// The policy's response to a contraindicated process, through a pidfd
/// checked against the instance's start time (never a reused pid).
fn respond(id: InstanceId, response: &str) {
    let sig = match response {
        "stop" => libc::SIGSTOP,
        "kill" => libc::SIGKILL,
        _ => return,
    };
    let r = sys::pidfd_open(id.pid).and_then(|fd| {
        let st = procfs::stat(id.pid)?;
        if st.start_time != id.start_time {
            return Err(std::io::Error::other("pid now belongs to another process"));
        }
        sys::pidfd_signal(&fd, sig)
    });
    match r {
        Ok(()) => {
            tracing::warn!(instance = %id, response, "policy response applied to the process")
        }
        Err(e) => tracing::error!(instance = %id, response, error = %e, "policy response failed"),
    }
}

/// Writes `data` to `path` atomically (temp file + rename), mode 0644.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
