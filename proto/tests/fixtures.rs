//! Checked-in vectors, so the formats cannot drift silently:
//! - test-data/log-events/golden.json: canonical encodings, digests and the
//!   PCR replay chain of a fixed event sequence;
//! - test-data/quotes/*.json: genuine swtpm quotes that must keep verifying.
//!
//! `VOUCH_BLESS=1 cargo test -p vouch-proto --test fixtures` rewrites the
//! golden event file (review the diff: it is a format change).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::path::PathBuf;

use vouch_proto::event::{replay, Event, EventKind, Record, Value};
use vouch_proto::name::ak_qualified_name;
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, QuoteFile};
use vouch_proto::tpm::Public;

fn test_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../test-data")
}

fn golden_events() -> Vec<Event> {
    vec![
        Event {
            kind: EventKind::BootStart,
            seq: 0,
            time_unix_ns: 1_764_000_000_000_000_000,
            body: Record::new()
                .with(1, Value::Bytes(vec![0; 32]))
                .with(2, Value::U64(7))
                .with(3, Value::U64(0))
                .with(4, Value::Bytes((0u8..32).collect())),
        },
        Event {
            kind: EventKind::InstanceMeasured,
            seq: 1,
            time_unix_ns: 1_764_000_000_100_000_000,
            body: Record::new()
                .with(1, Value::U64(4242))
                .with(2, Value::Str("daprd".into()))
                .with(3, Value::Bool(true))
                .with(
                    4,
                    Value::List(vec![
                        Value::Str("--app-id".into()),
                        Value::Str("orders".into()),
                        Value::Bytes(vec![0xff, 0x00]),
                    ]),
                )
                .with(
                    10,
                    Value::Record(
                        Record::new()
                            .with(1, Value::Str("/etc/dapr/config.yaml".into()))
                            .with(2, Value::Bytes(vec![0xab; 32])),
                    ),
                ),
        },
        Event {
            kind: EventKind::Anomaly,
            seq: 2,
            time_unix_ns: 1_764_000_000_200_000_000,
            body: Record::new()
                .with(1, Value::Str("foreign-listener".into()))
                .with(2, Value::U64(3500)),
        },
        Event {
            kind: EventKind::InstanceExited,
            seq: 3,
            time_unix_ns: 1_764_000_000_300_000_000,
            body: Record::new(),
        },
    ]
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct GoldenEvent {
    encoding: String,
    digest: String,
    pcr_after: String,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct Golden {
    comment: String,
    pcr_start: String,
    events: Vec<GoldenEvent>,
}

fn compute() -> Golden {
    let start = [0u8; 32];
    let mut pcr = start;
    let events = golden_events()
        .iter()
        .map(|e| {
            let enc = e.encode();
            let d = vouch_proto::event::digest(&enc);
            pcr = vouch_proto::event::extend(&pcr, &d);
            GoldenEvent {
                encoding: hex::encode(&enc),
                digest: hex::encode(d),
                pcr_after: hex::encode(pcr),
            }
        })
        .collect();
    Golden {
        comment: "vouch-proto runtime-log event vectors; see the event module docs for the layout"
            .into(),
        pcr_start: hex::encode(start),
        events,
    }
}

#[test]
fn log_event_golden_vectors() {
    let path = test_data().join("log-events/golden.json");
    let computed = compute();
    if std::env::var("VOUCH_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&computed).unwrap() + "\n",
        )
        .unwrap();
    }
    let text =
        std::fs::read_to_string(&path).expect("golden file missing: run with VOUCH_BLESS=1 once");
    let golden: Golden = serde_json::from_str(&text).unwrap();
    assert_eq!(
        computed,
        golden,
        "event encoding drifted from {}",
        path.display()
    );

    // Decoding the golden bytes gives back the same events, and replay from
    // the start value reaches the last PCR value.
    let mut digests = Vec::new();
    for (g, e) in golden.events.iter().zip(golden_events()) {
        let bytes = hex::decode(&g.encoding).unwrap();
        assert_eq!(Event::decode(&bytes).unwrap(), e);
        digests.push(e.digest());
    }
    let end = replay([0u8; 32], &digests);
    assert_eq!(hex::encode(end), golden.events.last().unwrap().pcr_after);
}

#[test]
fn swtpm_quote_fixtures_verify() {
    for f in ["ecc-p256-ak.json", "rsa-2048-ak.json"] {
        let text = std::fs::read_to_string(test_data().join("quotes").join(f)).unwrap();
        let q: QuoteFile = serde_json::from_str(&text).unwrap();
        let ek = Public::parse(&q.ek_public).unwrap();
        let ak = Public::parse(&q.ak_public).unwrap();
        let qn = ak_qualified_name(&ek, &ak).unwrap();
        let nonce = q.nonce.clone();
        let attest = verify_quote(
            &AkVerifier::new(&ak).unwrap(),
            &q.attest,
            &q.signature,
            &q.pcrs,
            Expectation {
                nonce: &nonce,
                qualified_signer: Some(&qn),
            },
        )
        .unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(attest.extra_data, nonce);
    }
}
