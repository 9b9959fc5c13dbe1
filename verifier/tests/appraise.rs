//! The appraisal function against simulated nodes (software keys making
//! genuine quotes): each violation yields its own reason; integrity
//! failures contraindicate every sidecar; audit mode only warns; arbitrary
//! evidence never panics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::collections::BTreeMap;
use std::path::Path;

use proptest::prelude::*;
use vouch_proto::event::{EventKind, Record, Value};
use vouch_proto::measurement::{anomaly_body, Anomaly, AnomalyKind};
use vouch_verifier::appraise::{
    appraise, check_nonce, Evidence, IntegrityError, IssuedNonce, NodeState, Verdict,
};
use vouch_verifier::policy::Policy;
use vouch_verifier::simnode::{sample_measurement, SimNode};

const GOOD_DAPRD: &str = "1111111111111111111111111111111111111111111111111111111111111111";

fn policy(mode: &str) -> Policy {
    let y = format!(
        "apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: prod\nspec:\n  mode: {mode}\n  selector:\n    namespaces: [prod]\n  trustedDaprd:\n    - sha256: {GOOD_DAPRD}\n      version: 1.15.0\n  posture:\n    requireMtls: true\n    requireApiToken: true\n    requireNonRoot: true\n    listenLoopbackOnly: true\n"
    );
    Policy::parse(Path::new("prod.yaml"), &y).unwrap()
}

struct Run {
    node: SimNode,
    state: NodeState,
    n: u8,
}

impl Run {
    fn new() -> Self {
        let node = SimNode::new(1).unwrap();
        let state = node.enrolled_state("node-a", BTreeMap::new()).unwrap();
        Self { node, state, n: 0 }
    }

    fn nonce(&mut self) -> [u8; 32] {
        self.n += 1;
        [self.n; 32]
    }

    /// Pushes evidence with all events not yet accepted.
    fn push(&mut self, policies: &[Policy]) -> vouch_verifier::appraise::Appraisal {
        let nonce = self.nonce();
        let (attest, sig, pcrs) = self.node.quote(&nonce).unwrap();
        let events = self.node.log[self.state.next_seq as usize..].to_vec();
        let ev = Evidence {
            nonce: &nonce,
            attest: &attest,
            signature: &sig,
            pcrs: &pcrs,
            events: &events,
            log_integrity_lost: false,
        };
        let a = appraise(&self.state, &ev, Ok(()), policies);
        if a.integrity.is_ok() {
            self.state = a.state.clone();
        }
        a
    }
}

fn reason_failed(a: &vouch_verifier::appraise::Appraisal, rule: &str) -> bool {
    a.verdicts
        .iter()
        .any(|v| v.reasons.iter().any(|r| r.rule == rule && !r.ok))
}

#[test]
fn matching_sidecar_is_affirming_with_reasons() {
    let mut r = Run::new();
    r.node
        .measure(&sample_measurement(10, "orders", GOOD_DAPRD, 100));
    let a = r.push(&[policy("enforce")]);
    assert_eq!(a.integrity, Ok(()));
    assert_eq!(a.verdicts.len(), 1);
    assert_eq!(
        a.verdicts[0].verdict,
        Verdict::Affirming,
        "{:?}",
        a.verdicts[0].reasons
    );
    assert!(a.verdicts[0]
        .reasons
        .iter()
        .any(|r| r.rule == "daprd.digest" && r.ok));
    // Heartbeat with no new events stays affirming.
    let a = r.push(&[policy("enforce")]);
    assert_eq!(a.verdicts[0].verdict, Verdict::Affirming);
}

#[test]
fn each_violation_has_its_own_reason_and_audit_only_warns() {
    type Setup = Box<dyn Fn(&mut SimNode)>;
    let cases: Vec<(&str, Setup)> = vec![
        (
            "daprd.digest",
            Box::new(|n: &mut SimNode| {
                n.measure(&sample_measurement(10, "orders", &"2".repeat(64), 100))
            }),
        ),
        (
            "posture.mtls",
            Box::new(|n: &mut SimNode| {
                let mut m = sample_measurement(10, "orders", GOOD_DAPRD, 100);
                m.config_mtls_enabled = Some(false);
                n.measure(&m)
            }),
        ),
        (
            "netns.daprd_count",
            Box::new(|n: &mut SimNode| {
                n.measure(&sample_measurement(10, "orders", GOOD_DAPRD, 100));
                n.measure(&sample_measurement(11, "impostor", GOOD_DAPRD, 100));
            }),
        ),
        (
            "netns.exclusive_ports",
            Box::new(|n: &mut SimNode| {
                let m = sample_measurement(10, "orders", GOOD_DAPRD, 100);
                n.measure(&m);
                n.append(
                    EventKind::Anomaly,
                    anomaly_body(&Anomaly {
                        kind: AnomalyKind::ForeignListener,
                        instance: Some(m.id),
                        netns: 100,
                        other_pid: Some(99),
                        other_exe: Some("/usr/bin/python3".into()),
                        port: Some(3500),
                        path: None,
                        detail: "pid 99 listens on 3500".into(),
                    }),
                );
            }),
        ),
        (
            "posture.non_root",
            Box::new(|n: &mut SimNode| {
                let mut m = sample_measurement(10, "orders", GOOD_DAPRD, 100);
                m.uid = 0;
                n.measure(&m)
            }),
        ),
    ];
    for (rule, setup) in cases {
        for mode in ["enforce", "audit"] {
            let mut r = Run::new();
            setup(&mut r.node);
            let a = r.push(&[policy(mode)]);
            assert_eq!(a.integrity, Ok(()));
            assert!(reason_failed(&a, rule), "{rule}: {:?}", a.verdicts);
            let want = if mode == "enforce" {
                Verdict::Contraindicated
            } else {
                Verdict::Warning
            };
            // Every sidecar in the namespace is affected (it cannot tell who answers).
            assert!(
                a.verdicts.iter().all(|v| v.verdict == want),
                "{rule}/{mode}: {:?}",
                a.verdicts
            );
        }
    }
}

#[test]
fn integrity_violations() {
    let p = [policy("enforce")];
    // Replayed nonce, expired nonce, unknown nonce.
    let issued = IssuedNonce {
        nonce: [1; 32],
        expires_ms: 1000,
        used: true,
    };
    assert_eq!(
        check_nonce(Some(&issued), None, &[1; 32], 10),
        Err(IntegrityError::NonceReused)
    );
    let issued = IssuedNonce {
        used: false,
        ..issued
    };
    assert_eq!(
        check_nonce(Some(&issued), None, &[1; 32], 2000),
        Err(IntegrityError::NonceExpired)
    );
    assert_eq!(
        check_nonce(Some(&issued), None, &[2; 32], 10),
        Err(IntegrityError::NonceUnknown)
    );
    assert_eq!(check_nonce(Some(&issued), None, &[1; 32], 10), Ok(()));

    // Removed, reordered, altered events.
    for tamper in ["remove", "reorder", "alter"] {
        let mut r = Run::new();
        r.node
            .measure(&sample_measurement(10, "orders", GOOD_DAPRD, 100));
        r.node
            .measure(&sample_measurement(11, "other", GOOD_DAPRD, 101));
        let nonce = r.nonce();
        let (attest, sig, pcrs) = r.node.quote(&nonce).unwrap();
        let mut events = r.node.log.clone();
        match tamper {
            "remove" => {
                events.remove(1);
            }
            "reorder" => events.swap(1, 2),
            _ => {
                let last = events.len() - 1;
                let n = events[last].len();
                events[last][n - 3] ^= 1;
            }
        }
        let ev = Evidence {
            nonce: &nonce,
            attest: &attest,
            signature: &sig,
            pcrs: &pcrs,
            events: &events,
            log_integrity_lost: false,
        };
        let a = appraise(&r.state, &ev, Ok(()), &p);
        assert!(
            matches!(
                a.integrity,
                Err(IntegrityError::LogDiscontinuity { .. }
                    | IntegrityError::PcrReplayMismatch { .. }
                    | IntegrityError::EventMalformed { .. })
            ),
            "{tamper}: {:?}",
            a.integrity
        );
    }

    // A log rebased within one boot (vouchd restarted with a fresh log).
    let mut r = Run::new();
    r.node
        .measure(&sample_measurement(10, "orders", GOOD_DAPRD, 100));
    assert_eq!(r.push(&p).integrity, Ok(()));
    let fresh = SimNode::new(1).unwrap(); // same boot counters, log from seq 0
    let nonce = r.nonce();
    let mut node = r.node;
    node.log = fresh.log.clone();
    node.pcr = fresh.pcr;
    let (attest, sig, pcrs) = node.quote(&nonce).unwrap();
    let ev = Evidence {
        nonce: &nonce,
        attest: &attest,
        signature: &sig,
        pcrs: &pcrs,
        events: &node.log,
        log_integrity_lost: false,
    };
    let a = appraise(&r.state, &ev, Ok(()), &p);
    assert!(
        matches!(
            a.integrity,
            Err(IntegrityError::LogDiscontinuity {
                expected: 2,
                got: 0
            })
        ),
        "{:?}",
        a.integrity
    );
    assert!(a
        .verdicts
        .iter()
        .all(|v| v.verdict == Verdict::Contraindicated && v.reasons[0].rule == "integrity"));

    // A quote by an AK that was never enrolled.
    let mut r = Run::new();
    let mut stranger = SimNode::new(2).unwrap();
    let nonce = r.nonce();
    let (attest, sig, pcrs) = stranger.quote(&nonce).unwrap();
    let ev = Evidence {
        nonce: &nonce,
        attest: &attest,
        signature: &sig,
        pcrs: &pcrs,
        events: &stranger.log,
        log_integrity_lost: false,
    };
    assert!(matches!(
        appraise(&r.state, &ev, Ok(()), &p).integrity,
        Err(IntegrityError::Quote(_))
    ));
}

#[test]
fn new_boot_reattests_from_boot_start() {
    let p = [policy("enforce")];
    let mut r = Run::new();
    r.node
        .measure(&sample_measurement(10, "orders", GOOD_DAPRD, 100));
    assert_eq!(r.push(&p).integrity, Ok(()));
    // Reboot: counters move, PCR resets, log restarts.
    let mut fresh = SimNode::new(1).unwrap();
    std::mem::swap(&mut fresh.log, &mut r.node.log);
    r.node.log.clear();
    r.node.pcr = [0; 32];
    r.node.boot = (2, 0);
    let facts = vouch_proto::measurement::StartFacts {
        pcr_found: [0; 32],
        reset_count: 2,
        restart_count: 0,
        vouchd_sha256: [7; 32],
        runtime_pcr: 13,
        integrity_lost: false,
        reason: None,
    };
    r.node
        .append(EventKind::BootStart, facts.body(EventKind::BootStart));
    r.node
        .measure(&sample_measurement(20, "orders", GOOD_DAPRD, 100));
    r.state.next_seq = 0; // what a node sends after a reboot: from seq 0
    let a = r.push(&p);
    assert_eq!(a.integrity, Ok(()));
    assert_eq!(a.verdicts.len(), 1);
    assert_eq!(a.verdicts[0].id.pid, 20);
    assert_eq!(a.verdicts[0].verdict, Verdict::Affirming);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Arbitrary evidence never panics and never passes integrity.
    #[test]
    fn arbitrary_evidence_never_panics(
        attest in proptest::collection::vec(any::<u8>(), 0..200),
        sig in proptest::collection::vec(any::<u8>(), 0..100),
        events in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..4),
        nonce in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let r = Run::new();
        let pcrs = r.node.pcr_values();
        let ev = Evidence { nonce: &nonce, attest: &attest, signature: &sig, pcrs: &pcrs, events: &events, log_integrity_lost: false };
        let a = appraise(&r.state, &ev, Ok(()), &[policy("enforce")]);
        prop_assert!(a.integrity.is_err());
    }

    /// Genuine quotes with arbitrary (well-formed) event bodies never panic.
    #[test]
    fn arbitrary_event_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200), kind in 1u16..7) {
        let mut r = Run::new();
        let k = vouch_proto::event::EventKind::from_u16(kind).unwrap();
        r.node.append(k, Record::new().with(1, Value::Str(String::from_utf8_lossy(&body).into_owned())).with(2, Value::Bytes(body.clone())));
        let _ = r.push(&[policy("enforce")]);
    }
}

#[test]
fn only_the_last_measurement_of_an_instance_in_a_batch_counts() {
    let p = [policy("enforce")];
    for batch in [3usize, 40] {
        let mut r = Run::new();
        // Alternating app-ids for the same two instances; the last of each
        // wins, whatever the batch size (small batches scan, large hash).
        for k in 0..batch {
            for pid in [10u32, 11] {
                let mut m =
                    sample_measurement(pid, &format!("app-{k}"), GOOD_DAPRD, 100 + u64::from(pid));
                m.id.start_time = 1000 + u64::from(pid);
                r.node.measure(&m);
            }
        }
        let a = r.push(&p);
        assert!(a.integrity.is_ok(), "{:?}", a.integrity);
        let apps: Vec<_> = a
            .state
            .instances
            .values()
            .map(|m| m.flags.app_id.clone().unwrap())
            .collect();
        let last = format!("app-{}", batch - 1);
        assert_eq!(apps, vec![last.clone(), last], "batch of {batch}");
    }
}
