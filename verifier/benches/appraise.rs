//! The appraisal function alone (no I/O), one core: heartbeat evidence from
//! simulated nodes (software P-256 AKs making genuine TPMS_ATTEST quotes),
//! with 0 and with 5 new log events, next to the raw ECDSA P-256 verify rate
//! on the same quotes of the primitive appraisal uses (vouch_proto::p256,
//! keys prepared as the verifier holds them) and of ring.
//! Run: `cargo bench -p vouch-verifier --bench appraise`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use vouch_proto::p256::P256Key;
use vouch_proto::tpm::{PublicKey, Signature};
use vouch_verifier::appraise::{appraise, Evidence};
use vouch_verifier::policy::Policy;
use vouch_verifier::simnode::{sample_measurement, SimNode};

const NODES: usize = 200;

fn main() {
    let budget = Duration::from_millis(
        std::env::var("VOUCH_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    );
    let digest = "1".repeat(64);
    let policy = Policy::parse(
        Path::new("bench.yaml"),
        &format!("apiVersion: vouch.dev/v1alpha1\nkind: SidecarPolicy\nmetadata:\n  name: b\nspec:\n  trustedDaprd:\n    - sha256: {digest}\n  posture:\n    requireMtls: true\n    requireApiToken: true\n"),
    )
    .unwrap();
    let policies = [policy];
    let mut all_cases = Vec::new();

    for new_events in [0usize, 5] {
        // Per node: accepted state after BootStart + one instance, then a
        // heartbeat with `new_events` more events and a fresh quote.
        let mut cases = Vec::with_capacity(NODES);
        for i in 0..NODES {
            let mut n = SimNode::new(i as u64).unwrap();
            n.measure(&sample_measurement(10, "orders", &digest, 100));
            let mut state = n
                .enrolled_state(&format!("node-{i}"), BTreeMap::new())
                .unwrap();
            let nonce = [1u8; 32];
            let (a, s, p) = n.quote(&nonce).unwrap();
            let events = n.log.clone();
            let ev = Evidence {
                nonce: &nonce,
                attest: &a,
                signature: &s,
                pcrs: &p,
                events: &events,
                log_integrity_lost: false,
            };
            let r = appraise(&state, &ev, Ok(()), &policies);
            assert!(r.integrity.is_ok());
            state = r.state;
            for k in 0..new_events {
                n.measure(&sample_measurement(
                    10 + k as u32 % 2,
                    "orders",
                    &digest,
                    100 + k as u64,
                ));
            }
            let nonce = [2u8; 32];
            let (a, s, p) = n.quote(&nonce).unwrap();
            let events = n.log[state.next_seq as usize..].to_vec();
            cases.push((state, nonce, a, s, p, events, n.ak.clone()));
        }
        let start = Instant::now();
        let mut count = 0u64;
        while start.elapsed() < budget {
            for (state, nonce, a, s, p, events, _) in &cases {
                let ev = Evidence {
                    nonce,
                    attest: a,
                    signature: s,
                    pcrs: p,
                    events,
                    log_integrity_lost: false,
                };
                let r = appraise(black_box(state), black_box(&ev), Ok(()), &policies);
                assert!(r.integrity.is_ok());
                count += 1;
            }
        }
        let rate = count as f64 / start.elapsed().as_secs_f64();
        println!("appraise heartbeat with {new_events} new events: {rate:>9.0} /s per core ({:.2} µs each)", 1e6 / rate);

        if new_events == 0 {
            // Raw verify of the same quotes.
            type RawCase<'a> = (UnparsedPublicKey<Vec<u8>>, Vec<u8>, &'a Vec<u8>, P256Key);
            let keys: Vec<RawCase> = cases
                .iter()
                .map(|(_, _, a, s, _, _, ak)| {
                    let PublicKey::Ecc { x, y, .. } = &ak.key else {
                        panic!()
                    };
                    let mut pt = vec![4u8];
                    pt.extend_from_slice(x);
                    pt.extend_from_slice(y);
                    let Signature::Ecdsa { r, s, .. } = Signature::parse(s).unwrap() else {
                        panic!()
                    };
                    let mut rs = vec![0u8; 64];
                    rs[32 - r.len()..32].copy_from_slice(&r);
                    rs[64 - s.len()..].copy_from_slice(&s);
                    let own = P256Key::new(x, y).unwrap();
                    (
                        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pt),
                        rs,
                        a,
                        own,
                    )
                })
                .collect();
            let start = Instant::now();
            let mut count = 0u64;
            while start.elapsed() < budget {
                for (_, rs, a, own) in &keys {
                    assert!(own.verify(black_box(a), black_box(&rs[..32]), black_box(&rs[32..])));
                    count += 1;
                }
            }
            let raw = count as f64 / start.elapsed().as_secs_f64();
            println!("raw vouch_proto::p256 verify, same quotes:   {raw:>9.0} /s per core ({:.2} µs each); appraisal = {:.1}% of raw", 1e6 / raw, 100.0 * rate / raw);
            let start = Instant::now();
            let mut count = 0u64;
            while start.elapsed() < budget {
                for (k, rs, a, _) in &keys {
                    assert!(k.verify(black_box(a), black_box(rs)).is_ok());
                    count += 1;
                }
            }
            let ring_raw = count as f64 / start.elapsed().as_secs_f64();
            println!("raw ring ECDSA P-256 verify, same quotes:    {ring_raw:>9.0} /s per core ({:.2} µs each); appraisal = {:.1}% of ring's raw", 1e6 / ring_raw, 100.0 * rate / ring_raw);
        }
        all_cases.push(cases);
    }

    // Per log event: the same nodes' heartbeats with 0 and with 5 new
    // events, appraised alternately (so drift and noise hit both alike);
    // the difference is what 5 events cost: decode, digest, replay, apply,
    // and judging the instances they changed.
    let (c0, c5) = (&all_cases[0], &all_cases[1]);
    let (mut t0, mut t5, mut n) = (Duration::ZERO, Duration::ZERO, 0u32);
    let start = Instant::now();
    while start.elapsed() < budget {
        for (a, b) in c0.iter().zip(c5) {
            for (case, acc) in [(a, &mut t0), (b, &mut t5)] {
                let (state, nonce, at, sg, p, events, _) = case;
                let ev = Evidence {
                    nonce,
                    attest: at,
                    signature: sg,
                    pcrs: p,
                    events,
                    log_integrity_lost: false,
                };
                let t = Instant::now();
                let r = appraise(black_box(state), black_box(&ev), Ok(()), &policies);
                *acc += t.elapsed();
                assert!(r.integrity.is_ok());
            }
            n += 1;
        }
    }
    println!(
        "  => {:.2} µs per log event (decode, digest, replay, apply, policy; interleaved, {n} pairs)",
        (t5.as_secs_f64() - t0.as_secs_f64()) * 1e6 / f64::from(n) / 5.0
    );
}
