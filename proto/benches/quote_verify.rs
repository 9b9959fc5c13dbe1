//! Quote verification throughput on one core, next to the raw signature
//! verification rate of the primitive it uses (vouch_proto::p256 for ECDSA
//! P-256, ring for RSA) and of ring's P-256 verify for comparison.
//!
//! Inputs are genuine swtpm quotes checked in under test-data/quotes (9 PCRs:
//! 0-7 and the runtime PCR). "quote verify" = parse TPMT_SIGNATURE and
//! TPMS_ATTEST, verify the signature, check nonce, qualified signer, PCR
//! selection and PCR digest. Run: `cargo bench -p vouch-proto`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use vouch_proto::name::ak_qualified_name;
use vouch_proto::p256::P256Key;
use vouch_proto::quote::{verify_quote, AkVerifier, Expectation, QuoteFile};
use vouch_proto::tpm::{Public, PublicKey, Signature};

fn rate(label: &str, budget: Duration, mut f: impl FnMut()) -> f64 {
    // Warm up, then run batches until the budget is spent.
    for _ in 0..200 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    let r = n as f64 / start.elapsed().as_secs_f64();
    println!("{label:<68} {r:>10.0} /s  ({:.2} µs each)", 1e6 / r);
    r
}

fn main() {
    let budget = Duration::from_millis(
        std::env::var("VOUCH_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../test-data/quotes");
    println!(
        "quote verification, one thread, {} ms per line",
        budget.as_millis()
    );
    for (name, file) in [
        ("ECDSA P-256", "ecc-p256-ak.json"),
        ("RSASSA-2048", "rsa-2048-ak.json"),
    ] {
        let fx: QuoteFile =
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
        let ek = Public::parse(&fx.ek_public).unwrap();
        let ak = Public::parse(&fx.ak_public).unwrap();
        let qn = ak_qualified_name(&ek, &ak).unwrap();
        let nonce = fx.nonce.clone();
        let attest = fx.attest.clone();
        let sig = fx.signature.clone();
        let verifier = AkVerifier::new(&ak).unwrap();

        let full = rate(
            &format!("{name}: quote verify (parse + sig + nonce + PCR digest)"),
            budget,
            || {
                let r = verify_quote(
                    black_box(&verifier),
                    black_box(&attest),
                    black_box(&sig),
                    black_box(&fx.pcrs),
                    Expectation {
                        nonce: &nonce,
                        qualified_signer: Some(&qn),
                    },
                );
                assert!(r.is_ok());
            },
        );

        // The raw primitive on the same message and signature.
        let raw = match (&ak.key, Signature::parse(&sig).unwrap()) {
            (PublicKey::Ecc { x, y, .. }, Signature::Ecdsa { r, s, .. }) => {
                let mut point = vec![4u8];
                point.extend_from_slice(x);
                point.extend_from_slice(y);
                let mut rs = vec![0u8; 64];
                rs[32 - r.len()..32].copy_from_slice(&r);
                rs[64 - s.len()..].copy_from_slice(&s);
                let key = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point);
                let ring_raw = rate(
                    &format!("{name}: raw ring signature verify"),
                    budget,
                    || {
                        assert!(key.verify(black_box(&attest), black_box(&rs)).is_ok());
                    },
                );
                // vouch-proto's own verify (what AkVerifier uses for P-256),
                // with the key's table built once, and the one-time cost of
                // building it (paid once per AK at enrollment or load).
                let own = P256Key::new(x, y).unwrap();
                let own_raw = rate(
                    &format!("{name}: raw vouch_proto::p256 signature verify"),
                    budget,
                    || {
                        assert!(own.verify(black_box(&attest), black_box(&r), black_box(&s)));
                    },
                );
                // The swtpm quote above is one signature verified again and
                // again; this variable-time code could gain from the branch
                // predictor learning it. So: 256 distinct signatures by 64
                // keys (ring signs them), cycled.
                let rng = ring::rand::SystemRandom::new();
                let signers: Vec<_> = (0..64)
                    .map(|_| {
                        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
                        let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
                        let kp =
                            signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
                        let pt = signature::KeyPair::public_key(&kp).as_ref().to_vec();
                        (kp, P256Key::new(&pt[1..33], &pt[33..]).unwrap())
                    })
                    .collect();
                let varied: Vec<_> = (0..256)
                    .map(|i| {
                        let (kp, key) = &signers[i % signers.len()];
                        let mut msg = attest.clone();
                        msg[0] ^= i as u8;
                        let sig = kp.sign(&rng, &msg).unwrap().as_ref().to_vec();
                        (key, msg, sig)
                    })
                    .collect();
                let mut i = 0;
                rate(
                    &format!("{name}: raw vouch_proto::p256 verify, 256 distinct signatures"),
                    budget,
                    || {
                        let (key, msg, sig) = &varied[i % varied.len()];
                        i += 1;
                        assert!(key.verify(black_box(msg), &sig[..32], &sig[32..]));
                    },
                );
                rate(
                    &format!(
                        "{name}: preparing one AK ({} B table, once per AK)",
                        own.table_bytes()
                    ),
                    budget,
                    || {
                        black_box(P256Key::new(black_box(x), black_box(y)).unwrap());
                    },
                );
                println!(
                    "{name}: quote verify = {:.1}% of ring's raw verify rate",
                    100.0 * full / ring_raw
                );
                own_raw
            }
            (PublicKey::Rsa { modulus, .. }, Signature::RsaSsa { sig: s, .. }) => {
                let key = RsaPublicKeyComponents {
                    n: modulus.clone(),
                    e: vec![1, 0, 1],
                };
                rate(
                    &format!("{name}: raw ring signature verify"),
                    budget,
                    || {
                        assert!(key
                            .verify(
                                &signature::RSA_PKCS1_2048_8192_SHA256,
                                black_box(&attest),
                                black_box(&s)
                            )
                            .is_ok());
                    },
                )
            }
            _ => panic!("unexpected fixture key/signature pair"),
        };
        println!(
            "{name}: quote verify = {:.1}% of the raw verify rate of the primitive it uses\n",
            100.0 * full / raw
        );
    }
}
