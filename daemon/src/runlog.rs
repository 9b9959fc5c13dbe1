//! The persisted runtime log: every event is appended and fsync'd before its
//! digest is extended into the runtime PCR, so the log always replays to the
//! PCR (or is one fsync'd event ahead of it after a crash, which the next
//! start completes).
//!
//! Owns `runtime.log` (frames of `u32 BE length || canonical event`),
//! `boot.json` (the TPM boot the log belongs to) and `integrity.json` (the
//! persistent integrity-lost state of a boot). Trust boundary: the files are
//! on the node's disk and may have been tampered with while vouchd was
//! stopped; they are trusted only if they replay to the TPM's PCR.
//!
//! Start rules:
//! - new boot (TPM resetCount/restartCount differ, or no boot.json): the old
//!   log is archived and a new one starts with BootStart (PCR value found,
//!   counters, vouchd's digest);
//! - same boot: the log must decode and replay from its first event's PCR
//!   value to the PCR's current value; then it continues with DaemonStart;
//! - same boot but the log is missing, truncated, corrupt or does not
//!   replay: never a silent fresh log. The state becomes integrity-lost
//!   (persisted in integrity.json for the rest of the boot), the broken log
//!   is kept aside, and a new log starts with DaemonStart{integrity_lost}.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use vouch_proto::event::{self, Event, EventKind, Record, MAX_EVENT_LEN};
use vouch_proto::measurement::StartFacts;

use crate::tpm::TpmError;

/// Log errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("runtime log file {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The TPM failed.
    #[error("TPM")]
    Tpm(#[from] TpmError),
    /// The log does not decode.
    #[error("runtime log corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// Offset of the bad frame.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The runtime PCR as the log sees it.
pub trait Pcr {
    /// Current value.
    fn read(&mut self) -> Result<[u8; 32], TpmError>;
    /// TPM2_PCR_Extend.
    fn extend(&mut self, digest: &[u8; 32]) -> Result<(), TpmError>;
    /// (resetCount, restartCount).
    fn boot(&mut self) -> Result<(u32, u32), TpmError>;
    /// The PCR index.
    fn index(&self) -> u8;
}

/// Integrity state of the log for this boot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LogState {
    /// Replays from this boot's BootStart.
    Intact,
    /// Could not be continued at some start in this boot.
    IntegrityLost {
        /// Why.
        reason: String,
    },
}

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct BootMarker {
    reset_count: u32,
    restart_count: u32,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct IntegrityMarker {
    reset_count: u32,
    restart_count: u32,
    reason: String,
}

/// The open, append-only runtime log.
#[derive(Debug)]
pub struct RuntimeLog {
    dir: PathBuf,
    file: File,
    next_seq: u64,
    pcr: [u8; 32],
    state: LogState,
    /// File offset of each event's frame (index = sequence number), so
    /// evidence pushes read only the events the verifier has not seen.
    offsets: Vec<u64>,
    /// File length.
    end: u64,
    /// TPM boot (resetCount, restartCount) of the log's first event.
    boot: Option<(u32, u32)>,
}

/// Reads every event of a log file.
pub fn read_events(path: &Path) -> Result<Vec<Event>, LogError> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(io_err(path))?;
    decode_frames(&buf)
}

/// Decodes a log's frames.
pub fn decode_frames(buf: &[u8]) -> Result<Vec<Event>, LogError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < buf.len() {
        let corrupt = |reason: String| LogError::Corrupt {
            offset: at as u64,
            reason,
        };
        let len_bytes = buf
            .get(at..at + 4)
            .ok_or_else(|| corrupt("truncated frame length".into()))?;
        let len =
            u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
        if len > MAX_EVENT_LEN {
            return Err(corrupt(format!(
                "frame of {len} bytes exceeds the event limit"
            )));
        }
        let body = buf
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| corrupt("truncated event".into()))?;
        let e = Event::decode(body).map_err(|e| corrupt(e.to_string()))?;
        if e.seq != out.len() as u64 {
            return Err(corrupt(format!(
                "sequence {} where {} was due",
                e.seq,
                out.len()
            )));
        }
        out.push(e);
        at += 4 + len;
    }
    Ok(out)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), LogError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl RuntimeLog {
    /// Path of the log file in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("runtime.log")
    }

    /// Opens (continuing or starting) the log; see the module docs.
    pub fn open(dir: &Path, pcr: &mut dyn Pcr, vouchd_sha256: [u8; 32]) -> Result<Self, LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (reset_count, restart_count) = pcr.boot()?;
        let pcr_now = pcr.read()?;
        let boot = BootMarker {
            reset_count,
            restart_count,
        };
        let boot_path = dir.join("boot.json");
        let integrity_path = dir.join("integrity.json");
        let log_path = Self::path_in(dir);
        let same_boot = fs::read(&boot_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<BootMarker>(&b).ok())
            .is_some_and(|b| b == boot);
        let runtime_pcr = pcr.index();
        let facts = |integrity_lost: bool, reason: Option<String>| StartFacts {
            pcr_found: pcr_now,
            reset_count,
            restart_count,
            vouchd_sha256,
            runtime_pcr,
            integrity_lost,
            reason,
        };

        if !same_boot {
            if log_path.exists() {
                let _ = fs::rename(&log_path, dir.join("runtime.log.previous-boot"));
            }
            let _ = fs::remove_file(&integrity_path);
            write_atomic(&boot_path, &serde_json::to_vec(&boot).unwrap_or_default())?;
            let mut log = Self::create(dir, pcr_now, LogState::Intact)?;
            let f = facts(false, None);
            log.append(pcr, EventKind::BootStart, f.body(EventKind::BootStart))?;
            return Ok(log);
        }

        // Same boot: was integrity already lost earlier in this boot?
        let earlier_loss = fs::read(&integrity_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<IntegrityMarker>(&b).ok())
            .filter(|m| m.reset_count == reset_count && m.restart_count == restart_count)
            .map(|m| m.reason);

        match Self::check_continuation(&log_path, pcr, pcr_now) {
            Ok((events, pcr_value)) => {
                let file = OpenOptions::new()
                    .append(true)
                    .open(&log_path)
                    .map_err(io_err(&log_path))?;
                let mut offsets = Vec::with_capacity(events.len());
                let mut end = 0u64;
                for e in &events {
                    offsets.push(end);
                    // Canonical: the re-encoding is the stored frame body.
                    end += 4 + e.encode().len() as u64;
                }
                let boot = events
                    .first()
                    .and_then(|e| StartFacts::of(e).ok())
                    .map(|f| (f.reset_count, f.restart_count));
                let mut log = Self {
                    dir: dir.to_owned(),
                    file,
                    next_seq: events.len() as u64,
                    offsets,
                    end,
                    boot,
                    pcr: pcr_value,
                    state: match &earlier_loss {
                        Some(reason) => LogState::IntegrityLost {
                            reason: reason.clone(),
                        },
                        None => LogState::Intact,
                    },
                };
                let f = facts(earlier_loss.is_some(), earlier_loss.clone());
                log.append(pcr, EventKind::DaemonStart, f.body(EventKind::DaemonStart))?;
                Ok(log)
            }
            Err(reason) => {
                tracing::error!(%reason, "runtime log cannot be continued: INTEGRITY LOST for the rest of this boot");
                if log_path.exists() {
                    let _ = fs::rename(
                        &log_path,
                        dir.join(format!("runtime.log.lost-{}", now_ns())),
                    );
                }
                let marker = IntegrityMarker {
                    reset_count,
                    restart_count,
                    reason: reason.clone(),
                };
                write_atomic(
                    &integrity_path,
                    &serde_json::to_vec(&marker).unwrap_or_default(),
                )?;
                let state = LogState::IntegrityLost {
                    reason: reason.clone(),
                };
                let mut log = Self::create(dir, pcr_now, state)?;
                let f = facts(true, Some(reason));
                log.append(pcr, EventKind::DaemonStart, f.body(EventKind::DaemonStart))?;
                Ok(log)
            }
        }
    }

    /// Checks that the log replays to `pcr_now`; completes the extend of a
    /// last event that was fsync'd but not extended before a crash.
    fn check_continuation(
        log_path: &Path,
        pcr: &mut dyn Pcr,
        pcr_now: [u8; 32],
    ) -> Result<(Vec<Event>, [u8; 32]), String> {
        if !log_path.exists() {
            return Err("runtime log of this boot is missing".into());
        }
        let events = read_events(log_path).map_err(|e| e.to_string())?;
        let first = events.first().ok_or("runtime log of this boot is empty")?;
        let start = StartFacts::of(first).map_err(|e| format!("first event: {e}"))?;
        let digests: Vec<[u8; 32]> = events.iter().map(Event::digest).collect();
        let all = event::replay(start.pcr_found, &digests);
        if all == pcr_now {
            return Ok((events, all));
        }
        if let Some((last, rest)) = digests.split_last() {
            if event::replay(start.pcr_found, rest) == pcr_now {
                // Crash between fsync and extend: the event is durable, so
                // extending it now restores the invariant.
                pcr.extend(last)
                    .map_err(|e| format!("completing last extend: {e}"))?;
                tracing::warn!(
                    seq = events.len() - 1,
                    "completed the PCR extend of the last logged event"
                );
                return Ok((events, all));
            }
        }
        Err(format!(
            "runtime log ({} events) replays to {}, but the PCR holds {}",
            events.len(),
            hex::encode(all),
            hex::encode(pcr_now)
        ))
    }

    fn create(dir: &Path, pcr_now: [u8; 32], state: LogState) -> Result<Self, LogError> {
        let path = Self::path_in(dir);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self {
            dir: dir.to_owned(),
            file,
            next_seq: 0,
            pcr: pcr_now,
            state,
            offsets: Vec::new(),
            end: 0,
            boot: None,
        })
    }

    /// Appends an event: write and fsync, then extend its digest.
    pub fn append(
        &mut self,
        pcr: &mut dyn Pcr,
        kind: EventKind,
        body: Record,
    ) -> Result<Event, LogError> {
        let e = Event {
            kind,
            seq: self.next_seq,
            time_unix_ns: now_ns(),
            body,
        };
        let bytes = e.encode();
        let mut frame = Vec::with_capacity(bytes.len() + 4);
        frame.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        frame.extend_from_slice(&bytes);
        let path = Self::path_in(&self.dir);
        self.file.write_all(&frame).map_err(io_err(&path))?;
        self.file.sync_data().map_err(io_err(&path))?;
        let d = event::digest(&bytes);
        pcr.extend(&d)?;
        self.pcr = event::extend(&self.pcr, &d);
        self.next_seq += 1;
        self.offsets.push(self.end);
        self.end += frame.len() as u64;
        if e.seq == 0 {
            self.boot = StartFacts::of(&e)
                .ok()
                .map(|f| (f.reset_count, f.restart_count));
        }
        Ok(e)
    }

    /// The encoded events from sequence number `seq` on, read from the
    /// file without decoding (they were checked when written).
    pub fn raw_since(&self, seq: u64) -> Result<Vec<Vec<u8>>, LogError> {
        let Some(&start) = usize::try_from(seq).ok().and_then(|i| self.offsets.get(i)) else {
            return Ok(Vec::new());
        };
        let path = Self::path_in(&self.dir);
        let mut f = File::open(&path).map_err(io_err(&path))?;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).map_err(io_err(&path))?;
        let mut buf = Vec::with_capacity((self.end - start) as usize);
        f.take(self.end - start)
            .read_to_end(&mut buf)
            .map_err(io_err(&path))?;
        let mut out = Vec::new();
        let mut rest = &buf[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let body = rest.get(4..4 + len).ok_or_else(|| LogError::Corrupt {
                offset: self.end - rest.len() as u64,
                reason: "truncated event".into(),
            })?;
            out.push(body.to_vec());
            rest = &rest[4 + len..];
        }
        Ok(out)
    }

    /// TPM boot (resetCount, restartCount) this log belongs to.
    pub fn boot(&self) -> Option<(u32, u32)> {
        self.boot
    }

    /// The PCR value the log replays to.
    pub fn pcr_value(&self) -> [u8; 32] {
        self.pcr
    }

    /// Sequence number of the next event.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Integrity state.
    pub fn state(&self) -> &LogState {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A software PCR standing in for the TPM in unit tests (the TPM itself
    /// is exercised end to end on swtpm).
    struct SoftPcr {
        value: [u8; 32],
        boot: (u32, u32),
    }

    impl Pcr for SoftPcr {
        fn read(&mut self) -> Result<[u8; 32], TpmError> {
            Ok(self.value)
        }
        fn extend(&mut self, d: &[u8; 32]) -> Result<(), TpmError> {
            self.value = event::extend(&self.value, d);
            Ok(())
        }
        fn boot(&mut self) -> Result<(u32, u32), TpmError> {
            Ok(self.boot)
        }
        fn index(&self) -> u8 {
            13
        }
    }

    fn anomaly() -> Record {
        Record::new().with(1, vouch_proto::event::Value::Str("x".into()))
    }

    #[test]
    fn continue_lose_and_new_boot() {
        let dir = tempfile::tempdir().unwrap();
        let mut pcr = SoftPcr {
            value: [5; 32],
            boot: (1, 0),
        };
        let mut log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        log.append(&mut pcr, EventKind::Anomaly, anomaly()).unwrap();
        assert_eq!(log.pcr_value(), pcr.value);
        drop(log);

        // Restart in the same boot: continues.
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert_eq!(log.state(), &LogState::Intact);
        assert_eq!(log.next_seq(), 3);
        let all = read_events(&RuntimeLog::path_in(dir.path())).unwrap();
        let raw = log.raw_since(1).unwrap();
        assert_eq!(raw, all[1..].iter().map(Event::encode).collect::<Vec<_>>());
        assert!(log.raw_since(3).unwrap().is_empty());
        assert_eq!(log.boot(), Some((1, 0)));
        drop(log);

        // Crash between fsync and extend: completed on start.
        let mut log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        let saved = pcr.value;
        log.append(&mut pcr, EventKind::Anomaly, anomaly()).unwrap();
        pcr.value = saved;
        drop(log);
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert_eq!(log.state(), &LogState::Intact);
        assert_eq!(log.pcr_value(), pcr.value);
        drop(log);

        // Truncated log: integrity lost, and it stays lost in this boot.
        let p = RuntimeLog::path_in(dir.path());
        let len = fs::metadata(&p).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert!(matches!(log.state(), LogState::IntegrityLost { .. }));
        assert_eq!(log.pcr_value(), pcr.value);
        drop(log);
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert!(matches!(log.state(), LogState::IntegrityLost { .. }));
        drop(log);

        // A new boot starts clean.
        pcr.boot = (2, 0);
        pcr.value = [0; 32];
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert_eq!(log.state(), &LogState::Intact);
        let events = read_events(&p).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::BootStart);

        // Deleted log in the same boot: integrity lost, not a fresh log.
        drop(log);
        fs::remove_file(&p).unwrap();
        let log = RuntimeLog::open(dir.path(), &mut pcr, [9; 32]).unwrap();
        assert!(matches!(log.state(), LogState::IntegrityLost { .. }));
        let events = read_events(&p).unwrap();
        assert_eq!(events[0].kind, EventKind::DaemonStart);
        assert!(StartFacts::of(&events[0]).unwrap().integrity_lost);
    }
}
