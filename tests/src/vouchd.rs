//! Runs `vouchd run` as a real process against a test's swtpm, and reads
//! its persisted runtime log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vouch_proto::event::Event;

use crate::proc::{workspace_bin, Owned};
use crate::swtpm::Swtpm;

/// A vouchd daemon under test.
#[derive(Debug)]
pub struct Vouchd {
    /// State directory (runtime log, AK).
    pub state: PathBuf,
    tcti: String,
    extra_env: Vec<(String, String)>,
    config: Option<PathBuf>,
    proc: Option<Owned>,
}

impl Vouchd {
    /// Prepares a vouchd for `sw` with state in `state` (not started).
    pub fn new(sw: &Swtpm, state: &Path) -> Self {
        Self {
            state: state.to_owned(),
            tcti: sw.tcti(),
            extra_env: Vec::new(),
            config: None,
            proc: None,
        }
    }

    /// Adds an environment variable for the daemon.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.extra_env.push((k.to_owned(), v.to_owned()));
        self
    }

    /// Uses a TOML config file.
    pub fn config(mut self, p: &Path) -> Self {
        self.config = Some(p.to_owned());
        self
    }

    /// Starts the daemon and waits until it is ready: its start event is in
    /// the log and its first full scan is done (`vouchd.ready` names it).
    pub fn start(&mut self) -> Result<()> {
        let mut c = Command::new(workspace_bin("vouchd")?);
        if let Some(cfg) = &self.config {
            c.arg("--config").arg(cfg);
        }
        c.arg("run")
            .env("VOUCHD_TCTI", &self.tcti)
            .env("VOUCHD_STATE_DIR", &self.state)
            .env("VOUCHD_RESCAN_INTERVAL_MS", "1000")
            .env("VOUCHD_LOG", "info")
            .env("TSS2_LOG", "all+none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.state.with_extension("stderr.log"))
                {
                    Ok(f) => Stdio::from(f),
                    Err(_) => Stdio::null(),
                },
            );
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        let owned = Owned::new("vouchd", c.spawn().context("spawn vouchd")?);
        let pid = owned.pid();
        self.proc = Some(owned);
        let ready = self.state.join("vouchd.ready");
        self.wait_for("vouchd ready", Duration::from_secs(15), |_| {
            std::fs::read_to_string(&ready).is_ok_and(|s| s.trim() == pid.to_string())
        })?;
        Ok(())
    }

    /// PID of the running daemon.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Owned::pid)
    }

    /// Whether the daemon is still running.
    pub fn running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| !p.exited())
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) and releases the TPM.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// The runtime log's events (empty if there is no log yet).
    pub fn events(&self) -> Result<Vec<Event>> {
        let p = self.state.join("runtime.log");
        if !p.exists() {
            return Ok(Vec::new());
        }
        vouch_daemon_log::read(&p)
    }

    /// Polls the log until `pred` holds, or fails after `timeout` (also if
    /// the daemon died).
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Event]) -> bool,
    ) -> Result<Vec<Event>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(evs) = self.events() {
                if pred(&evs) {
                    return Ok(evs);
                }
            }
            if !self.running() {
                bail!(
                    "vouchd exited while waiting for {what}; stderr:\n{}",
                    std::fs::read_to_string(self.state.with_extension("stderr.log"))
                        .unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.state.with_extension("stderr.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                if let (Ok(_), Some(pid)) = (std::env::var("VOUCH_DEBUG_GDB"), self.pid()) {
                    let out = Command::new("gdb")
                        .args([
                            "-p",
                            &pid.to_string(),
                            "-batch",
                            "-ex",
                            "thread apply all bt 40",
                        ])
                        .output();
                    if let Ok(o) = out {
                        let _ = std::fs::write("/tmp/vouchd-gdb.txt", &o.stdout);
                    }
                }
                bail!(
                    "timed out waiting for {what}; vouchd stderr (last lines, newest first):\n{}",
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Vouchd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reading the persisted runtime log: frames of `u32 BE length || event`.
/// Implemented here from the documented format (not by calling the
/// daemon's reader), so a format drift on either side shows.
pub mod vouch_daemon_log {
    use super::*;

    /// Decodes every frame of the log at `p`.
    pub fn read(p: &Path) -> Result<Vec<Event>> {
        let buf = std::fs::read(p)?;
        let mut out = Vec::new();
        let mut at = 0;
        while at + 4 <= buf.len() {
            let len = u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
            let Some(body) = buf.get(at + 4..at + 4 + len) else {
                break; // a frame being written right now
            };
            out.push(Event::decode(body)?);
            at += 4 + len;
        }
        Ok(out)
    }
}
