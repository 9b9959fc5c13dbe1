//! Appraisal: a pure function of (evidence, stored node state, policies) to
//! a new node state and a verdict per sidecar. No I/O, no clock reads (the
//! caller passes `now`), so it can be fuzzed and benchmarked in isolation.
//!
//! Trust boundary: everything in [`Evidence`] comes from a node and is
//! untrusted. The order of checks follows what vouches for what: the quote
//! (signature by the enrolled AK over the verifier's fresh nonce) vouches for
//! the PCR values; the runtime PCR vouches for the log events that replay to
//! it; only then are the events' measurements judged against policy.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use vouch_proto::event::{self, Event, EventKind};
use vouch_proto::measurement::{
    self as m, Anomaly, AnomalyKind, InstanceId, Measurement, StartFacts,
};
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, PcrValue, QuoteError};
use vouch_proto::tpm::alg;

use crate::policy::{Mode, Policy};

/// Why evidence failed integrity. Every variant contraindicates every
/// sidecar of the node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
pub enum IntegrityError {
    /// The nonce was never issued to this node.
    #[error("nonce was not issued to this node")]
    NonceUnknown,
    /// The nonce expired before the evidence arrived.
    #[error("nonce expired")]
    NonceExpired,
    /// The nonce was already used (replayed evidence).
    #[error("nonce already used (replayed evidence)")]
    NonceReused,
    /// The quote failed verification.
    #[error("quote: {0}")]
    Quote(String),
    /// The quote does not cover the runtime PCR.
    #[error("quote does not cover runtime PCR {0}")]
    RuntimePcrMissing(u8),
    /// A new boot whose log does not start with a start-of-boot event.
    #[error("new boot (resetCount {reset}, restartCount {restart}) but the log does not restart from a BootStart event")]
    NewBootWithoutBootStart {
        /// TPM resetCount.
        reset: u32,
        /// TPM restartCount.
        restart: u32,
    },
    /// Within one boot the log must continue at the next sequence number.
    #[error("log rebased, truncated or forked: expected event {expected}, got {got}")]
    LogDiscontinuity {
        /// Next sequence number due.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// An event did not decode.
    #[error("event {index} malformed: {reason}")]
    EventMalformed {
        /// Position in the evidence.
        index: usize,
        /// Decoder error.
        reason: String,
    },
    /// The events do not replay to the quoted runtime PCR.
    #[error("log replays to {expected} but PCR {pcr} is {actual}")]
    PcrReplayMismatch {
        /// Runtime PCR index.
        pcr: u8,
        /// Replay result (hex).
        expected: String,
        /// Quoted value (hex).
        actual: String,
    },
    /// A boot PCR differs from the policy's reference.
    #[error("boot PCR {pcr} is {actual}, policy expects {expected}")]
    BootPcrMismatch {
        /// PCR index.
        pcr: u8,
        /// Policy value.
        expected: String,
        /// Quoted value.
        actual: String,
    },
    /// vouchd reports that its log could not be continued in this boot.
    #[error("vouchd lost its runtime log in this boot: {0}")]
    IntegrityLost(String),
    /// The node has not reported within the allowed time.
    #[error("node silent since {last_ms} (limit {limit_ms} ms)")]
    Stale {
        /// Last accepted evidence, Unix ms.
        last_ms: u64,
        /// Allowed silence.
        limit_ms: u64,
    },
}

/// One challenge the verifier issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedNonce {
    /// The nonce.
    pub nonce: [u8; 32],
    /// Expiry, Unix ms.
    pub expires_ms: u64,
    /// Already consumed.
    pub used: bool,
}

/// What the verifier keeps per enrolled node (compact: no history).
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Node name.
    pub name: String,
    /// Node labels (from enrollment).
    pub labels: BTreeMap<String, String>,
    /// The enrolled AK, prepared.
    pub ak: AkVerifier,
    /// The AK's qualified name under the enrolled EK.
    pub qualified_name: Vec<u8>,
    /// Current boot (resetCount, restartCount), once seen.
    pub boot: Option<(u32, u32)>,
    /// Runtime PCR index (from the boot's start event).
    pub runtime_pcr: u8,
    /// Next log sequence number due.
    pub next_seq: u64,
    /// Runtime PCR value the accepted log replays to.
    pub pcr: [u8; 32],
    /// vouchd reported integrity loss in this boot.
    pub integrity_lost: Option<String>,
    /// Current daprd instances (shared: cloning the state for an
    /// appraisal copies pointers, not measurements).
    pub instances: BTreeMap<InstanceId, std::sync::Arc<Measurement>>,
    /// Current anomalies (dropped when their instance exits).
    pub anomalies: Vec<Anomaly>,
}

/// Evidence as received (untrusted).
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// The nonce the node quoted.
    pub nonce: &'a [u8],
    /// TPMS_ATTEST.
    pub attest: &'a [u8],
    /// TPMT_SIGNATURE.
    pub signature: &'a [u8],
    /// PCR values.
    pub pcrs: &'a [PcrValue],
    /// Canonical events after the last accepted sequence number.
    pub events: &'a [Vec<u8>],
    /// vouchd's own view: log integrity lost.
    pub log_integrity_lost: bool,
}

/// A sidecar's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Trustworthy: may receive credentials.
    Affirming,
    /// Violations under an audit-mode policy: reported, nothing withheld.
    Warning,
    /// Not trustworthy: no credentials.
    Contraindicated,
}

impl Verdict {
    /// The wire and storage name (`affirming`, `warning`, `contraindicated`),
    /// as the EAR draft spells `ear.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Affirming => "affirming",
            Verdict::Warning => "warning",
            Verdict::Contraindicated => "contraindicated",
        }
    }
}

/// Why, machine-readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// Rule id, e.g. `daprd.digest`, `posture.mtls`, `integrity`.
    pub rule: Cow<'static, str>,
    /// Policy that raised it, if any.
    pub policy: Option<Arc<str>>,
    /// What was measured.
    pub measured: String,
    /// What the policy allows.
    pub expected: Cow<'static, str>,
    /// Whether the rule held.
    pub ok: bool,
}

/// Verdict for one sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SidecarVerdict {
    /// Instance.
    pub id: InstanceId,
    /// App id (measured).
    pub app_id: Option<String>,
    /// Dapr namespace (measured).
    pub namespace: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Every rule checked (held or not).
    pub reasons: Vec<Reason>,
    /// The strongest response asked by an enforcing policy that failed.
    pub response: crate::policy::Response,
}

/// The result of one appraisal.
#[derive(Debug, Clone)]
pub struct Appraisal {
    /// State to store if the evidence is accepted (integrity held).
    pub state: NodeState,
    /// Integrity outcome.
    pub integrity: Result<(), IntegrityError>,
    /// Per-sidecar verdicts (all contraindicated on integrity failure).
    pub verdicts: Vec<SidecarVerdict>,
}

fn runtime_value(pcrs: &[PcrValue], index: u8) -> Option<[u8; 32]> {
    pcrs.iter()
        .find(|p| p.bank == alg::SHA256 && p.index == index)
        .and_then(|p| <[u8; 32]>::try_from(p.value.as_slice()).ok())
}

/// Checks the nonce against what was issued. `last_used` is the nonce the
/// node consumed before the one outstanding now (answers carry the next
/// challenge, so a replay of the previous evidence names that one).
pub fn check_nonce(
    issued: Option<&IssuedNonce>,
    last_used: Option<&[u8; 32]>,
    nonce: &[u8],
    now_ms: u64,
) -> Result<(), IntegrityError> {
    match issued {
        _ if last_used.is_some_and(|l| l.as_slice() == nonce) => Err(IntegrityError::NonceReused),
        Some(i) if i.nonce.as_slice() == nonce => {
            if i.used {
                Err(IntegrityError::NonceReused)
            } else if now_ms > i.expires_ms {
                Err(IntegrityError::NonceExpired)
            } else {
                Ok(())
            }
        }
        _ => Err(IntegrityError::NonceUnknown),
    }
}

/// Integrity part: quote, boot continuity, log replay, boot PCRs. Returns
/// the state with the new events applied.
fn integrity(
    state: &NodeState,
    ev: &Evidence<'_>,
    policies: &[Policy],
) -> Result<NodeState, IntegrityError> {
    let attest = verify_quote(
        &state.ak,
        ev.attest,
        ev.signature,
        ev.pcrs,
        Expectation {
            nonce: ev.nonce,
            qualified_signer: Some(&state.qualified_name),
        },
    )
    .map_err(|e: QuoteError| IntegrityError::Quote(e.to_string()))?;
    let boot = (
        attest.clock_info.reset_count,
        attest.clock_info.restart_count,
    );
    let mut events = Vec::with_capacity(ev.events.len());
    for (index, raw) in ev.events.iter().enumerate() {
        let e = Event::decode(raw).map_err(|e| IntegrityError::EventMalformed {
            index,
            reason: e.to_string(),
        })?;
        events.push((e, event::digest(raw)));
    }
    let mut next = state.clone();
    let new_boot = state.boot != Some(boot);
    if new_boot {
        // A new boot must restart the log: seq 0, BootStart.
        let Some((first, _)) = events.first() else {
            return Err(IntegrityError::NewBootWithoutBootStart {
                reset: boot.0,
                restart: boot.1,
            });
        };
        if first.seq != 0 || first.kind != EventKind::BootStart {
            return Err(IntegrityError::NewBootWithoutBootStart {
                reset: boot.0,
                restart: boot.1,
            });
        }
        let facts = StartFacts::of(first).map_err(|e| IntegrityError::EventMalformed {
            index: 0,
            reason: e.to_string(),
        })?;
        if (facts.reset_count, facts.restart_count) != boot {
            return Err(IntegrityError::NewBootWithoutBootStart {
                reset: boot.0,
                restart: boot.1,
            });
        }
        next.boot = Some(boot);
        next.runtime_pcr = facts.runtime_pcr;
        next.pcr = facts.pcr_found;
        next.next_seq = 0;
        next.integrity_lost = None;
        next.instances.clear();
        next.anomalies.clear();
    }
    let quoted = runtime_value(ev.pcrs, next.runtime_pcr)
        .ok_or(IntegrityError::RuntimePcrMissing(next.runtime_pcr))?;
    // A measurement superseded by a later one of the same instance in this
    // batch changes nothing in the final state: only the last is decoded.
    let ids: Vec<Option<InstanceId>> = events.iter().map(|(e, _)| m::instance_of(e)).collect();
    let mut superseded = vec![false; ids.len()];
    if ids.len() <= 32 {
        // Heartbeats carry a few events: a scan beats hashing.
        for (i, id) in ids.iter().enumerate() {
            superseded[i] = id.is_some() && ids[i + 1..].contains(id);
        }
    } else {
        let mut seen = std::collections::HashSet::new();
        for (i, id) in ids.iter().enumerate().rev() {
            if let Some(id) = id {
                superseded[i] = !seen.insert(*id);
            }
        }
    }
    for (i, (e, d)) in events.iter().enumerate() {
        if e.seq != next.next_seq {
            return Err(IntegrityError::LogDiscontinuity {
                expected: next.next_seq,
                got: e.seq,
            });
        }
        next.pcr = event::extend(&next.pcr, d);
        next.next_seq += 1;
        if !superseded[i] {
            apply(&mut next, e);
        }
    }
    if next.pcr != quoted {
        return Err(IntegrityError::PcrReplayMismatch {
            pcr: next.runtime_pcr,
            expected: hex::encode(next.pcr),
            actual: hex::encode(quoted),
        });
    }
    for p in policies {
        for (idx, want) in &p.spec.boot_pcrs {
            let got = ev
                .pcrs
                .iter()
                .find(|v| v.bank == alg::SHA256 && v.index == *idx)
                .map(|v| hex::encode(&v.value))
                .unwrap_or_default();
            if !got.eq_ignore_ascii_case(want) {
                return Err(IntegrityError::BootPcrMismatch {
                    pcr: *idx,
                    expected: want.clone(),
                    actual: got,
                });
            }
        }
    }
    if ev.log_integrity_lost && next.integrity_lost.is_none() {
        next.integrity_lost = Some("reported by vouchd".into());
    }
    if let Some(r) = &next.integrity_lost {
        return Err(IntegrityError::IntegrityLost(r.clone()));
    }
    Ok(next)
}

fn apply(state: &mut NodeState, e: &Event) {
    match e.kind {
        EventKind::BootStart | EventKind::DaemonStart => {
            if let Ok(f) = StartFacts::of(e) {
                if f.integrity_lost {
                    state.integrity_lost = Some(f.reason.unwrap_or_else(|| "log lost".into()));
                }
            }
        }
        EventKind::InstanceMeasured | EventKind::FileChanged => {
            if let Ok(meas) = m::measurement_of(e) {
                state.instances.insert(meas.id, std::sync::Arc::new(meas));
            }
        }
        EventKind::InstanceExited => {
            if let Ok(id) = m::exited_of(e) {
                state.instances.remove(&id);
                state
                    .anomalies
                    .retain(|a| a.instance != Some(id) && a.other_pid != Some(id.pid));
            }
        }
        EventKind::Anomaly => {
            if let Ok(a) = m::anomaly_of(e) {
                state.anomalies.push(a);
            }
        }
    }
}

fn namespace_of(meas: &Measurement) -> String {
    meas.env
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

fn applies(p: &Policy, meas: &Measurement, labels: &BTreeMap<String, String>) -> bool {
    let s = &p.spec.selector;
    let ns = namespace_of(meas);
    (s.namespaces.is_empty() || s.namespaces.contains(&ns))
        && (s.app_ids.is_empty()
            || meas
                .flags
                .app_id
                .as_ref()
                .is_some_and(|a| s.app_ids.contains(a)))
        && s.node_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn is_loopback(a: &str) -> bool {
    matches!(a, "localhost" | "127.0.0.1" | "::1") || a.starts_with("127.")
}

/// Judges one sidecar against the policies that select it.
pub fn judge(state: &NodeState, meas: &Measurement, policies: &[Policy]) -> SidecarVerdict {
    let mut reasons = Vec::new();
    let mut verdict = Verdict::Affirming;
    let mut response = crate::policy::Response::None;
    let selected: Vec<&Policy> = policies
        .iter()
        .filter(|p| applies(p, meas, &state.labels))
        .collect();
    if selected.is_empty() {
        reasons.push(Reason {
            rule: "policy.selected".into(),
            policy: None,
            measured: format!(
                "app-id {:?} in namespace {}",
                meas.flags.app_id,
                namespace_of(meas)
            ),
            expected: "a policy that selects this sidecar".into(),
            ok: false,
        });
        verdict = Verdict::Contraindicated;
    }
    for p in selected {
        let name: Option<Arc<str>> = Some(Arc::from(p.metadata.name.as_str()));
        let mut rule =
            |rule: &'static str, ok: bool, measured: String, expected: Cow<'static, str>| {
                reasons.push(Reason {
                    rule: Cow::Borrowed(rule),
                    policy: name.clone(),
                    measured,
                    expected,
                    ok,
                });
                ok
            };
        let mut ok = true;
        let s = &p.spec;
        let digest = meas.exe.sha256.clone().unwrap_or_default();
        if !s.trusted_daprd.is_empty() {
            let hit = s
                .trusted_daprd
                .iter()
                .find(|t| t.sha256.eq_ignore_ascii_case(&digest));
            ok &= rule(
                "daprd.digest",
                hit.is_some(),
                digest.clone(),
                s.trusted_daprd
                    .iter()
                    .map(|t| format!("{} ({})", t.sha256, t.version.as_deref().unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into(),
            );
        }
        ok &= rule(
            "daprd.exe_intact",
            !meas.exe.deleted && !meas.exe.replaced,
            format!(
                "deleted={} replaced={}",
                meas.exe.deleted, meas.exe.replaced
            ),
            "executable unchanged on disk".into(),
        );
        if !s.allowed_images.is_empty() {
            let img = meas
                .container
                .as_ref()
                .and_then(|c| c.image_digest.clone())
                .unwrap_or_default();
            ok &= rule(
                "image.digest",
                s.allowed_images.contains(&img),
                img,
                s.allowed_images.join(", ").into(),
            );
        }
        if !s.allowed_files.is_empty() {
            for f in &meas.files {
                let d = f.sha256.clone().unwrap_or_default();
                ok &= rule(
                    "files.digest",
                    s.allowed_files.iter().any(|a| a.eq_ignore_ascii_case(&d)),
                    format!(
                        "{} {}",
                        f.path,
                        if d.is_empty() {
                            f.error.clone().unwrap_or_default()
                        } else {
                            d
                        }
                    ),
                    "one of spec.allowedFiles".into(),
                );
            }
        }
        let post = &s.posture;
        if post.require_mtls {
            ok &= rule(
                "posture.mtls",
                meas.config_mtls_enabled == Some(true),
                format!("{:?}", meas.config_mtls_enabled),
                "Configuration spec.mtls.enabled: true".into(),
            );
        }
        if post.forbid_profiling {
            ok &= rule(
                "posture.profiling",
                !meas.flags.enable_profiling,
                meas.flags.enable_profiling.to_string(),
                "false".into(),
            );
        }
        if post.listen_loopback_only {
            let uds = meas.flags.unix_domain_socket.is_some();
            let lo = !meas.flags.listen_addresses.is_empty()
                && meas.flags.listen_addresses.iter().all(|a| is_loopback(a));
            ok &= rule(
                "posture.listen",
                uds || lo,
                format!("{:?} uds={uds}", meas.flags.listen_addresses),
                "loopback addresses only, or a unix domain socket".into(),
            );
        }
        if post.require_api_token {
            ok &= rule(
                "posture.api_token",
                meas.env.dapr_api_token_sha256.is_some(),
                (if meas.env.dapr_api_token_sha256.is_some() {
                    "present"
                } else {
                    "absent"
                })
                .into(),
                "DAPR_API_TOKEN present".into(),
            );
        }
        if post.require_non_root {
            ok &= rule(
                "posture.non_root",
                meas.uid != 0,
                format!("uid {}", meas.uid),
                "uid != 0".into(),
            );
        }
        if !s.placement.is_empty() {
            let app = meas.flags.app_id.clone().unwrap_or_default();
            let ns = namespace_of(meas);
            let allowed = s.placement.iter().any(|pl| {
                pl.app_id == app
                    && (pl.namespaces.is_empty() || pl.namespaces.contains(&ns))
                    && pl
                        .node_labels
                        .iter()
                        .all(|(k, v)| state.labels.get(k) == Some(v))
            });
            ok &= rule(
                "placement",
                allowed,
                format!("{app} in {ns} on {}", state.name),
                "a matching spec.placement entry".into(),
            );
        }
        let same_ns = state
            .instances
            .values()
            .filter(|o| o.netns == meas.netns)
            .count();
        ok &= rule(
            "netns.daprd_count",
            same_ns as u32 <= s.max_daprd_per_netns,
            format!("{same_ns} daprd in network namespace {}", meas.netns),
            format!("at most {}", s.max_daprd_per_netns).into(),
        );
        let foreign: Vec<&Anomaly> = state
            .anomalies
            .iter()
            .filter(|a| a.kind == AnomalyKind::ForeignListener && a.netns == meas.netns)
            .filter(|a| {
                a.port.is_none_or(|p| {
                    s.exclusive_ports.contains(&p) || crate::appraise::own_port(meas, p)
                })
            })
            .collect();
        ok &= rule(
            "netns.exclusive_ports",
            foreign.is_empty(),
            foreign
                .iter()
                .map(|a| a.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
            format!(
                "only daprd listens on {:?} and its own ports",
                s.exclusive_ports
            )
            .into(),
        );
        if !ok {
            let v = match s.mode {
                Mode::Enforce => Verdict::Contraindicated,
                Mode::Audit => Verdict::Warning,
            };
            if s.mode == Mode::Enforce {
                response = response.max(s.response);
            }
            verdict = verdict.max(v);
        }
    }
    SidecarVerdict {
        id: meas.id,
        app_id: meas.flags.app_id.clone(),
        namespace: namespace_of(meas),
        verdict,
        reasons,
        response,
    }
}

/// Whether `port` is one of the instance's own Dapr ports.
pub fn own_port(meas: &Measurement, port: u16) -> bool {
    let f = &meas.flags;
    [
        f.http_port.or(Some(3500)),
        f.grpc_port.or(Some(50001)),
        f.public_port,
        f.internal_grpc_port,
    ]
    .contains(&Some(port))
}

/// Appraises evidence against a node's state and the policies. `nonce`
/// is the outcome of [`check_nonce`] (done by the caller, which owns the
/// single-use nonce store).
pub fn appraise(
    state: &NodeState,
    ev: &Evidence<'_>,
    nonce: Result<(), IntegrityError>,
    policies: &[Policy],
) -> Appraisal {
    let checked = nonce.and_then(|()| integrity(state, ev, policies));
    match checked {
        Ok(next) => {
            let verdicts = next
                .instances
                .values()
                .map(|m| judge(&next, m, policies))
                .collect();
            Appraisal {
                state: next,
                integrity: Ok(()),
                verdicts,
            }
        }
        Err(e) => {
            let verdicts = state
                .instances
                .values()
                .map(|m| SidecarVerdict {
                    id: m.id,
                    app_id: m.flags.app_id.clone(),
                    namespace: namespace_of(m),
                    verdict: Verdict::Contraindicated,
                    reasons: vec![Reason {
                        rule: "integrity".into(),
                        policy: None,
                        measured: e.to_string(),
                        expected: "fresh quote by the enrolled AK; log replays to the runtime PCR"
                            .into(),
                        ok: false,
                    }],
                    response: crate::policy::Response::None,
                })
                .collect();
            Appraisal {
                state: state.clone(),
                integrity: Err(e),
                verdicts,
            }
        }
    }
}
