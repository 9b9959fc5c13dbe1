//! A rogue client holding the node's TPM and AK (vouchd stopped) talks to
//! the verifier directly: replayed evidence, an expired nonce, removed,
//! reordered and altered events, a quote by an AK that was never enrolled,
//! garbage quote bytes and out-of-range fields are each refused with their
//! own reason; malformed input gets InvalidArgument and the verifier keeps
//! serving; integrity failures contraindicate the node's sidecars.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::time::Duration;

use tonic::transport::Channel;
use vouch_daemon::tpm::{AkAlg, EkChoice, Tpm};
use vouch_proto::api::attestation_client::AttestationClient;
use vouch_proto::api::{ChallengeRequest, Evidence, LogState, PcrValue as PbPcr};
use vouch_proto::event::{Event, EventKind, Record, Value};
use vouch_tests::netns::Netns;
use vouch_tests::stack::{wait_verdict, Env};

struct Rogue {
    rt: tokio::runtime::Runtime,
    client: AttestationClient<Channel>,
    node_id: String,
}

impl Rogue {
    fn new(env: &Env) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ca = std::fs::read(env.dir().join("verifier/ca.pem")).unwrap();
        let channel = rt.block_on(async {
            vouch_proto::client::verifier_endpoint(&format!("https://127.0.0.1:{}", env.port), &ca)
                .unwrap()
                .connect()
                .await
                .unwrap()
        });
        let node_id = std::fs::read_to_string(env.dir().join("vouchd/node_id")).unwrap();
        Self {
            rt,
            client: AttestationClient::new(channel),
            node_id,
        }
    }

    fn challenge(&mut self) -> vouch_proto::api::Challenge {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get_challenge(ChallengeRequest {
                node_id: self.node_id.clone(),
            }))
            .unwrap()
            .into_inner()
    }

    fn push(&mut self, e: Evidence) -> Result<vouch_proto::api::EvidenceResult, tonic::Status> {
        let mut c = self.client.clone();
        self.rt.block_on(c.push_evidence(e)).map(|r| r.into_inner())
    }
}

fn evidence(
    node_id: &str,
    nonce: &[u8],
    q: &vouch_proto::quote::QuoteJson,
    events: Vec<Vec<u8>>,
) -> Evidence {
    Evidence {
        node_id: node_id.to_owned(),
        nonce: nonce.to_vec(),
        attest: q.attest.clone(),
        signature: q.signature.clone(),
        pcrs: q.pcrs.iter().map(PbPcr::from).collect(),
        events,
        log_state: LogState::Intact as i32,
    }
}

fn pcrs() -> Vec<u8> {
    let mut p = vouch_proto::BOOT_PCRS.to_vec();
    p.push(vouch_proto::DEFAULT_RUNTIME_PCR);
    p
}

#[test]
fn replay_expiry_tampering_foreign_ak_and_garbage_are_refused() {
    let Some(mut env) = Env::new() else { return };
    let ns = Netns::new().unwrap();
    let good = env.standin(&ns, "orders", &[]);
    let db = env.db();
    wait_verdict(&db, good.pid(), "affirming");
    env.vouchd.stop(); // the rogue takes the TPM and the node's AK

    let mut tpm = Tpm::open(&env.sw.tcti()).unwrap();
    let ek = tpm.load_ek(EkChoice::Auto).unwrap();
    let ak = tpm
        .load_or_create_ak(&ek, &env.dir().join("vouchd"), AkAlg::EccP256)
        .unwrap();
    assert!(!ak.created, "must be the enrolled AK");
    let mut r = Rogue::new(&env);
    let log: Vec<Event> = env.vouchd.events().unwrap();

    // 1. Genuine evidence is accepted...
    let ch = r.challenge();
    let q = tpm.quote(&ak, &ch.nonce, &pcrs()).unwrap();
    let events: Vec<Vec<u8>> = log
        .iter()
        .skip(ch.next_seq as usize)
        .map(Event::encode)
        .collect();
    let ev = evidence(&r.node_id, &ch.nonce, &q, events);
    r.push(ev.clone()).expect("genuine evidence");
    // 2. ...and refused when replayed.
    let e = r.push(ev).unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("nonce already used"),
        "{}",
        e.message()
    );

    // 3. An expired nonce (the stack's nonce lifetime is 2 s).
    let ch = r.challenge();
    std::thread::sleep(Duration::from_millis(2300));
    let q = tpm.quote(&ak, &ch.nonce, &pcrs()).unwrap();
    let e = r
        .push(evidence(&r.node_id, &ch.nonce, &q, Vec::new()))
        .unwrap_err();
    assert!(e.message().contains("nonce expired"), "{}", e.message());

    // 4. Two new events extended into the PCR; evidence with one removed,
    // the two swapped, or one altered is refused.
    let next = r.challenge().next_seq;
    let mk = |seq: u64, tag: &str| {
        Event {
        kind: EventKind::Anomaly,
        seq,
        time_unix_ns: 1,
        body: Record::new().with(1, Value::Str(format!("{{\"kind\":\"foreign_listener\",\"instance\":null,\"netns\":1,\"other_pid\":null,\"other_exe\":null,\"port\":null,\"path\":null,\"detail\":\"{tag}\"}}"))),
    }
    };
    let (e1, e2) = (mk(next, "one").encode(), mk(next + 1, "two").encode());
    for e in [&e1, &e2] {
        tpm.pcr_extend(
            vouch_proto::DEFAULT_RUNTIME_PCR,
            &vouch_proto::event::digest(e),
        )
        .unwrap();
    }
    let mut altered = e2.clone();
    let n = altered.len();
    altered[n - 3] ^= 1;
    for (what, events) in [
        ("removed", vec![e2.clone()]),
        ("reordered", vec![e2.clone(), e1.clone()]),
        ("altered", vec![e1.clone(), altered]),
    ] {
        let ch = r.challenge();
        let q = tpm.quote(&ak, &ch.nonce, &pcrs()).unwrap();
        let e = r
            .push(evidence(&r.node_id, &ch.nonce, &q, events))
            .unwrap_err();
        assert!(
            e.message().contains("log rebased, truncated or forked")
                || e.message().contains("replays to"),
            "{what}: {}",
            e.message()
        );
    }

    // 5. A quote by an AK of this TPM that was never enrolled.
    drop(ak);
    let stranger = tpm
        .load_or_create_ak(&ek, &env.dir().join("stranger-ak"), AkAlg::EccP256)
        .unwrap();
    let ch = r.challenge();
    let q = tpm.quote(&stranger, &ch.nonce, &pcrs()).unwrap();
    let e = r
        .push(evidence(
            &r.node_id,
            &ch.nonce,
            &q,
            vec![e1.clone(), e2.clone()],
        ))
        .unwrap_err();
    assert!(e.message().contains("quote"), "{}", e.message());

    // 6. Garbage and wrong field lengths: InvalidArgument; still serving.
    let ch = r.challenge();
    let mut ev = evidence(&r.node_id, &ch.nonce, &q, Vec::new());
    ev.attest = vec![0xde, 0xad, 0xbe, 0xef];
    assert_eq!(
        r.push(ev.clone()).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    ev.pcrs[0].index = 300;
    assert_eq!(
        r.push(ev.clone()).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    ev.events = vec![vec![0xff; 64]];
    ev.pcrs[0].index = 0;
    ev.attest = q.attest.clone();
    let _ = r.push(ev).unwrap_err();
    // Oversized evidence (9 MiB of events).
    let ch = r.challenge();
    let mut big = evidence(&r.node_id, &ch.nonce, &q, vec![vec![0u8; 1 << 20]; 9]);
    big.log_state = LogState::Intact as i32;
    let e = r.push(big).unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("exceeds the limit"), "{}", e.message());
    let _ = r.challenge(); // the verifier keeps serving

    // Integrity failures contraindicate the node's sidecars.
    let row = wait_verdict(&db, good.pid(), "contraindicated");
    assert!(
        row["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["rule"] == "integrity"),
        "{row}"
    );
}
