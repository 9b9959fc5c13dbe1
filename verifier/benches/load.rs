//! Load generator: many simulated nodes push heartbeat evidence (a genuine
//! TPMS_ATTEST quote by a software P-256 AK over the verifier's nonce — the
//! one handed out with the previous answer, as vouchd does — plus up to 5
//! new log events) to one `vouch-verifier` process over gRPC/TLS.
//! Nodes are enrolled by writing their records into the verifier's database
//! before it starts (software keys cannot pass credential activation — that
//! is the point of it). Reports evidence/s, p50/p99 latency of
//! challenge+push, and the verifier's memory per enrolled node.
//! Run: `cargo bench -p vouch-verifier --bench load`
//! (VOUCH_LOAD_NODES, VOUCH_LOAD_SECS, VOUCH_LOAD_CONCURRENCY,
//! VOUCH_LOAD_CONNECTIONS, VOUCH_LOAD_MEMNODES).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::sync::Arc;
use std::time::{Duration, Instant};

use vouch_proto::api::attestation_client::AttestationClient;
use vouch_proto::api::{ChallengeRequest, Evidence, LogState, PcrValue as PbPcr};
use vouch_verifier::enroll::ek_id;
use vouch_verifier::simnode::{sample_measurement, SimNode};

mod common;
use common::{env, gather, rss_kb, seed, seed_state, start_verifier, summarize};

/// The generator allocates like the verifier does; same allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n_nodes = env("VOUCH_LOAD_NODES", 1000);
    let secs = env("VOUCH_LOAD_SECS", 10);
    let conc = env("VOUCH_LOAD_CONCURRENCY", 64);
    let mem_nodes = env("VOUCH_LOAD_MEMNODES", 20_000);
    let digest = "1".repeat(64);

    // Memory per enrolled node: an idle verifier with `mem_nodes` nodes vs none.
    {
        let empty = tempfile::tempdir().unwrap();
        let v0 = start_verifier(empty.path(), &digest);
        std::thread::sleep(Duration::from_millis(500));
        let base = rss_kb(v0.child.id());
        drop(v0);
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<SimNode> = (0..mem_nodes)
            .map(|i| SimNode::new(i as u64).unwrap())
            .collect();
        seed(dir.path(), &nodes);
        seed_state(dir.path(), &nodes, 2);
        let v = start_verifier(dir.path(), &digest);
        std::thread::sleep(Duration::from_millis(500));
        let with = rss_kb(v.child.id());
        println!(
            "verifier memory: {:.1} MB empty, {:.1} MB with {mem_nodes} enrolled nodes (each with 2 current daprd measurements) = {:.2} KB per node",
            base as f64 / 1024.0,
            with as f64 / 1024.0,
            (with.saturating_sub(base)) as f64 / mem_nodes as f64
        );
        println!(
            "verifier start with {mem_nodes} enrolled nodes (load state, prepare every AK): ready after {:.2} s",
            v.ready_after.as_secs_f64()
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<SimNode> = (0..n_nodes)
        .map(|i| SimNode::new(i as u64).unwrap())
        .collect();
    for n in &mut nodes {
        n.measure(&sample_measurement(10, "orders", &digest, 100));
    }
    seed(dir.path(), &nodes);
    // Signature nonces are prepared before measuring (ECDSA presignatures:
    // k and r = x(k·G) do not depend on the message), enough for 15,000
    // heartbeats/s; a node that runs out signs from scratch. The quotes are
    // as genuine as before; the generator just leaves the CPU to the
    // verifier it measures.
    let presign = env("VOUCH_LOAD_PRESIGN", 15_000 * secs / n_nodes + 16);
    std::thread::scope(|s| {
        let half = nodes.len().div_ceil(2);
        for chunk in nodes.chunks_mut(half.max(1)) {
            s.spawn(move || {
                for n in chunk {
                    n.presign(presign).unwrap();
                }
            });
        }
    });
    let v = start_verifier(dir.path(), &digest);
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Nodes hold their own connections; the generator spreads its
    // simulated nodes over VOUCH_LOAD_CONNECTIONS TLS connections.
    let conns = env("VOUCH_LOAD_CONNECTIONS", 16);
    let channels: Vec<_> = (0..conns)
        .map(|_| {
            rt.block_on(async {
                vouch_proto::client::verifier_endpoint(
                    &format!("https://127.0.0.1:{}", v.port),
                    &ca,
                )
                .unwrap()
                .connect()
                .await
                .unwrap()
            })
        })
        .collect();
    type Slot = (SimNode, String, u64, Option<vouch_proto::api::Challenge>);
    let nodes: Vec<Arc<tokio::sync::Mutex<Slot>>> = nodes
        .into_iter()
        .map(|n| {
            let id = ek_id(&n.ek.marshal());
            Arc::new(tokio::sync::Mutex::new((n, id, 0u64, None)))
        })
        .collect();
    let nodes = Arc::new(nodes);
    let stop_at = Instant::now() + Duration::from_secs(secs as u64);
    let warm_until = Instant::now() + Duration::from_secs(2);
    // The verifier's own CPU time over the measured window (utime+stime in
    // /proc/PID/stat, USER_HZ = 100 ticks per second on Linux).
    let vpid = v.child.id();
    let cpu = std::thread::spawn(move || {
        let ticks = || -> u64 {
            std::fs::read_to_string(format!("/proc/{vpid}/stat"))
                .ok()
                .and_then(|s| {
                    let f: Vec<u64> = s
                        .rsplit_once(") ")?
                        .1
                        .split_whitespace()
                        .skip(11)
                        .take(2)
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    Some(f.iter().sum())
                })
                .unwrap_or(0)
        };
        std::thread::sleep(warm_until.saturating_duration_since(Instant::now()));
        let a = ticks();
        std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
        ticks() - a
    });
    let (lat, ok, errs) = rt.block_on(async {
        let mut tasks = Vec::new();
        // The 5 measurements a heartbeat logs (each node logs its own
        // events; the measured facts are the same).
        let samples: Arc<Vec<_>> = Arc::new(
            (0..5u32)
                .map(|k| sample_measurement(10 + k % 2, "orders", &digest, 100 + u64::from(k)))
                .collect(),
        );
        for w in 0..conc {
            let nodes = nodes.clone();
            let samples = samples.clone();
            let mut client = AttestationClient::new(channels[w % conns].clone());
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut ok, mut errs) = (Vec::new(), 0u64, 0u64);
                let mut i = w;
                while Instant::now() < stop_at {
                    let slot = nodes[i % nodes.len()].clone();
                    i += conc;
                    let mut g = slot.lock().await;
                    let (node, node_id, pushes, next) = &mut *g;
                    let node_id = node_id.clone();
                    let t0 = Instant::now();
                    // The challenge from the last answer, as vouchd does;
                    // GetChallenge only for the first heartbeat.
                    let ch = match next.take() {
                        Some(ch) => ch,
                        None => match client
                            .get_challenge(ChallengeRequest {
                                node_id: node_id.clone(),
                            })
                            .await
                        {
                            Ok(ch) => ch.into_inner(),
                            Err(_) => {
                                errs += 1;
                                continue;
                            }
                        },
                    };
                    // Heartbeats after the first carry up to 5 new events.
                    if *pushes > 0 {
                        for m in samples.iter() {
                            node.measure(m);
                        }
                    }
                    let (attest, signature, pcrs) = node.quote(&ch.nonce).unwrap();
                    // What the verifier accepted can go (as vouchd's log
                    // rotation would drop it); the rest is sent.
                    node.forget_before(ch.next_seq);
                    let events = node.events_from(ch.next_seq).to_vec();
                    let ev = Evidence {
                        node_id,
                        nonce: ch.nonce,
                        attest,
                        signature,
                        pcrs: pcrs.iter().map(PbPcr::from).collect(),
                        events,
                        log_state: LogState::Intact as i32,
                    };
                    match client.push_evidence(ev).await {
                        Ok(r) => {
                            *next = r.into_inner().next;
                            *pushes += 1;
                            if t0 > warm_until {
                                ok += 1;
                                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        Err(_) => errs += 1,
                    }
                }
                (lat, ok, errs)
            }));
        }
        gather(tasks).await
    });
    let r = summarize(lat, ok, secs);
    let measured = r.secs;
    println!(
        "load: {n_nodes} nodes, {conc} in flight, heartbeat = quote over the challenge from the previous answer + push with up to 5 new events: {:.0} evidence/s, p50 {:.2} ms, p99 {:.2} ms ({ok} ok, {errs} errors, over {measured:.0} s; generator and verifier share the 2 cores)",
        r.rate, r.p50, r.p99
    );
    let vticks = cpu.join().unwrap_or(0);
    let us_per = vticks as f64 * 10_000.0 / ok.max(1) as f64;
    println!(
        "verifier CPU: {:.2} cores busy, {us_per:.0} µs of CPU per evidence (gRPC/TLS, appraisal, group commit) => {:.0} evidence/s if it had the 2 cores to itself",
        vticks as f64 / 100.0 / measured,
        2e6 / us_per
    );
}
