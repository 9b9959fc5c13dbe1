//! Measurement costs without a TPM: hashing a 256 MiB executable through the
//! measurement path vs raw `sha2` in the same run, and a full /proc rescan
//! with 2,000 processes. Run: `cargo bench -p vouch-daemon --bench measure`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // bench binary

use std::hint::black_box;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vouch_daemon::hash::HashCache;
use vouch_daemon::measure::{MeasureConfig, Measurer};

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // 1. Hashing 256 MiB.
    let size = 256usize << 20;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big-exe");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&data)
        .unwrap();
    // Warm the page cache: the executable of a running process is resident.
    let _ = std::fs::read(&path).unwrap();
    let runs = 5;
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        black_box(Sha256::digest(black_box(&data)));
        raw.push(size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64);
        let mut cache = HashCache::new();
        let t = Instant::now();
        let f = std::fs::File::open(&path).unwrap();
        black_box(cache.hash_file(f, u64::MAX).unwrap());
        ours.push(size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64);
    }
    let (r, o) = (pct(raw.clone(), 0.5), pct(ours.clone(), 0.5));
    println!("hash 256 MiB: raw sha2 in memory {r:.2} GiB/s; vouchd measurement path (file, page cache) {o:.2} GiB/s = {:.1}% of raw (median of {runs})", 100.0 * o / r);
    let t = Instant::now();
    let ok = Command::new("sha256sum")
        .arg(&path)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        println!(
            "  for reference, coreutils sha256sum: {:.2} GiB/s",
            size as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64
        );
    }
    let mut cache = HashCache::new();
    let f = std::fs::File::open(&path).unwrap();
    cache.hash_file(f, u64::MAX).unwrap();
    let t = Instant::now();
    let f = std::fs::File::open(&path).unwrap();
    cache.hash_file(f, u64::MAX).unwrap();
    println!(
        "  unchanged file again (cache hit): {:.1} µs",
        t.elapsed().as_secs_f64() * 1e6
    );
    drop(data);

    // 2. /proc rescan with 2,000 processes.
    let existing = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let want = 2000usize.saturating_sub(existing);
    let mut kids = Vec::with_capacity(want);
    for _ in 0..want {
        kids.push(
            Command::new("sleep")
                .arg("120")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let total = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let m = Measurer::new(MeasureConfig::default());
    let t = Instant::now();
    for _ in 0..10 {
        black_box(vouch_daemon::procfs::pids().unwrap());
    }
    println!(
        "  (listing /proc alone: {:.2} ms)",
        t.elapsed().as_secs_f64() * 1e3 / 10.0
    );
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        black_box(m.scan());
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "full (cold) /proc rescan with {total} processes: median {:.2} ms, p99 {:.2} ms (50 scans)",
        pct(times.clone(), 0.5),
        pct(times, 0.99)
    );
    let mut cleared = std::collections::HashSet::new();
    m.scan_with(&mut cleared);
    let mut times = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        black_box(m.scan_with(&mut cleared));
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "periodic (warm) rescan vouchd runs, {total} processes: median {:.2} ms, p99 {:.2} ms (50 scans)",
        pct(times.clone(), 0.5),
        pct(times, 0.99)
    );
    for mut k in kids {
        let _ = k.kill();
        let _ = k.wait();
    }
}
