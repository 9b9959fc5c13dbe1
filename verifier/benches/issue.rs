//! SVID issuance rate: X.509 SVIDs signed per second for an attested
//! caller, over gRPC/TLS to one `vouch-verifier` process (the path vouchd
//! takes for every Workload API or Sentry request that needs a new
//! certificate): session check, verdict and freshness check, CSR parse and
//! signature check, certificate signing. The node is a simulated one whose
//! evidence (a genuine quote by a software AK) was accepted first.
//! Also prints the in-process signing rate of the issuing CA on one core.
//! Run: `cargo bench -p vouch-verifier --bench issue`
//! (VOUCH_ISSUE_SECS, VOUCH_ISSUE_CONCURRENCY).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{env, gather, seed, start_verifier, summarize};
use vouch_proto::api::attestation_client::AttestationClient;
use vouch_proto::api::credentials_client::CredentialsClient;
use vouch_proto::api::{
    ChallengeRequest, Evidence, LogState, NodeAuth, PcrValue as PbPcr, X509Request,
};
use vouch_verifier::enroll::ek_id;
use vouch_verifier::simnode::{sample_measurement, SimNode};

fn csrs(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            rcgen::CertificateParams::default()
                .serialize_request(&k)
                .unwrap()
                .der()
                .to_vec()
        })
        .collect()
}

fn main() {
    let secs = env("VOUCH_ISSUE_SECS", 10);
    let conc = env("VOUCH_ISSUE_CONCURRENCY", 64);
    let digest = "1".repeat(64);
    let csrs = Arc::new(csrs(512));

    // In process, one core: the CA alone.
    {
        let d = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ca = vouch_verifier::ca::IssuingCa::load_or_create(
            d.path(),
            Duration::from_secs(86_400),
            now,
        )
        .unwrap();
        let t0 = Instant::now();
        let mut n = 0usize;
        while t0.elapsed() < Duration::from_secs(2) {
            ca.issue(
                &csrs[n % csrs.len()],
                "spiffe://cluster.local/ns/prod/orders",
                &[],
                Duration::from_secs(900),
                now,
            )
            .unwrap();
            n += 1;
        }
        println!(
            "issuing CA in process (CSR parse + check + P-256 signature), one core: {:.0} SVIDs/s",
            n as f64 / t0.elapsed().as_secs_f64()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut node = SimNode::new(7).unwrap();
    node.measure(&sample_measurement(10, "orders", &digest, 100));
    seed(dir.path(), std::slice::from_ref(&node));
    let v = start_verifier(dir.path(), &digest);
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let channel = rt.block_on(async {
        vouch_proto::client::verifier_endpoint(&format!("https://127.0.0.1:{}", v.port), &ca)
            .unwrap()
            .connect()
            .await
            .unwrap()
    });
    let node_id = ek_id(&node.ek.marshal());
    // Attest once: the session and an affirming verdict.
    let session = rt.block_on(async {
        let mut c = AttestationClient::new(channel.clone());
        let ch = c
            .get_challenge(ChallengeRequest {
                node_id: node_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let (attest, signature, pcrs) = node.quote(&ch.nonce).unwrap();
        let r = c
            .push_evidence(Evidence {
                node_id: node_id.clone(),
                nonce: ch.nonce,
                attest,
                signature,
                pcrs: pcrs.iter().map(PbPcr::from).collect(),
                events: node.log.clone(),
                log_state: LogState::Intact as i32,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.sidecars[0].verdict, "affirming", "{:?}", r.sidecars);
        r.session
    });
    let auth = NodeAuth { node_id, session };
    let stop_at = Instant::now() + Duration::from_secs(secs as u64);
    let warm_until = Instant::now() + Duration::from_secs(2);
    let (lat, ok, errs) = rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..conc {
            let mut c = CredentialsClient::new(channel.clone());
            let (auth, csrs) = (auth.clone(), csrs.clone());
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut ok, mut errs) = (Vec::new(), 0u64, 0u64);
                let mut i = w;
                while Instant::now() < stop_at {
                    let t0 = Instant::now();
                    let r = c
                        .sign_x509(X509Request {
                            auth: Some(auth.clone()),
                            pid: 10,
                            start_time: 1010,
                            csr: csrs[i % csrs.len()].clone(),
                            sentry_server: false,
                        })
                        .await;
                    i += conc;
                    match r {
                        Ok(_) if t0 > warm_until => {
                            ok += 1;
                            lat.push(t0.elapsed().as_secs_f64() * 1e3);
                        }
                        Ok(_) => {}
                        Err(_) => errs += 1,
                    }
                }
                (lat, ok, errs)
            }));
        }
        gather(tasks).await
    });
    let r = summarize(lat, ok, secs);
    println!(
        "SVID issuance over gRPC/TLS, {conc} in flight: {:.0} SVIDs/s, p50 {:.2} ms, p99 {:.2} ms ({ok} ok, {errs} errors over {:.0} s; client and verifier share the 2 cores)",
        r.rate, r.p50, r.p99, r.secs
    );
}
