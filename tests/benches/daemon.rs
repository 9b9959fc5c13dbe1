//! vouchd on swtpm, end to end (release build needed first:
//! `cargo build --release --workspace --bins && cargo bench -p vouch-tests --bench daemon`):
//! - exec of a stand-in daprd (binary already hashed) -> its InstanceMeasured
//!   event fsync'd in the runtime log, whose extend into the PCR follows
//!   immediately (PCR_Extend on swtpm: ~0.06 ms): p50/p99 over 200 runs;
//! - vouchd with 20 stand-ins and nothing happening: CPU share over 10 s
//!   and RSS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::io::{Read, Seek, SeekFrom};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vouch_proto::event::{Event, EventKind};
use vouch_proto::measurement::{exited_of, measurement_of};
use vouch_tests::proc::{workspace_bin, Owned};
use vouch_tests::swtpm::Swtpm;
use vouch_tests::vouchd::Vouchd;

struct Tail {
    f: std::fs::File,
    buf: Vec<u8>,
}

impl Tail {
    fn new(p: &std::path::Path) -> Self {
        let mut f = std::fs::File::open(p).unwrap();
        f.seek(SeekFrom::End(0)).unwrap();
        Self { f, buf: Vec::new() }
    }

    fn next_events(&mut self) -> Vec<Event> {
        let mut chunk = Vec::new();
        self.f.read_to_end(&mut chunk).unwrap();
        self.buf.extend_from_slice(&chunk);
        let mut out = Vec::new();
        loop {
            if self.buf.len() < 4 {
                break;
            }
            let len =
                u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
            if self.buf.len() < 4 + len {
                break;
            }
            out.push(Event::decode(&self.buf[4..4 + len]).unwrap());
            self.buf.drain(..4 + len);
        }
        out
    }

    fn wait(&mut self, pred: impl Fn(&Event) -> bool) -> Instant {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for e in self.next_events() {
                if pred(&e) {
                    return Instant::now();
                }
            }
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn main() {
    let runs: usize = std::env::var("VOUCH_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let sw = Swtpm::start().unwrap();
    let state = sw.scratch().join("state");
    let mut v = Vouchd::new(&sw, &state)
        .env("VOUCHD_RESCAN_INTERVAL_MS", "5000")
        .env("VOUCHD_LOG", "warn");
    v.start().unwrap();
    let daprd = workspace_bin("daprd").unwrap();
    let mut tail = Tail::new(&state.join("runtime.log"));

    // Warm-up: hash the stand-in binary once.
    let spawn = |i: usize| {
        let c = Command::new("unshare")
            .arg("-n")
            .arg(&daprd)
            .args(["--app-id", &format!("bench{i}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Owned::new("stand-in", c)
    };
    let mut lat = Vec::with_capacity(runs);
    for i in 0..runs + 5 {
        let t0 = Instant::now();
        let mut d = spawn(i);
        let pid = d.pid();
        let t1 = tail.wait(|e| {
            e.kind == EventKind::InstanceMeasured
                && measurement_of(e).is_ok_and(|m| m.id.pid == pid)
        });
        if i >= 5 {
            lat.push((t1 - t0).as_secs_f64() * 1e3);
        }
        d.stop();
        tail.wait(|e| exited_of(e).is_ok_and(|id| id.pid == pid));
    }
    println!(
        "exec of a stand-in -> InstanceMeasured logged and extended (swtpm): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {runs} runs",
        pct(lat.clone(), 0.5),
        pct(lat.clone(), 0.99),
        pct(lat, 1.0)
    );

    // 20 stand-ins, then idle.
    let kids: Vec<Owned> = (0..20).map(|i| spawn(1000 + i)).collect();
    for k in &kids {
        let pid = k.pid();
        let _ = pid;
    }
    std::thread::sleep(Duration::from_secs(4)); // rechecks settle
    let vp = v.pid().unwrap();
    let hz = 100.0; // USER_HZ
    let c0 = cpu_ticks(vp);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let c1 = cpu_ticks(vp);
    let secs = t0.elapsed().as_secs_f64();
    let tracked = v
        .events()
        .unwrap()
        .iter()
        .filter_map(|e| measurement_of(e).ok())
        .map(|m| m.id.pid)
        .filter(|p| kids.iter().any(|k| k.pid() == *p))
        .collect::<std::collections::HashSet<_>>()
        .len();
    println!(
        "vouchd idle with {tracked} stand-ins: CPU {:.2}% of one core over {secs:.0} s, RSS {:.1} MB",
        100.0 * (c1 - c0) as f64 / hz / secs,
        rss_kb(vp) as f64 / 1024.0
    );
    drop(kids);
}
