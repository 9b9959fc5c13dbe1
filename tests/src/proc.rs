//! Child processes owned by a test: killed by PID on drop, also when the
//! test fails, and helpers to find and run the workspace's binaries.

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child process that is killed (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Owned {
    child: Option<Child>,
    /// What the process is, for messages.
    pub name: String,
}

impl Owned {
    /// Takes ownership of a spawned child.
    pub fn new(name: impl Into<String>, child: Child) -> Self {
        Self {
            child: Some(child),
            name: name.into(),
        }
    }

    /// PID of the child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut() {
            None => true,
            Some(c) => !matches!(c.try_wait(), Ok(None)),
        }
    }

    /// Waits up to `limit` for the child to exit on its own and returns its
    /// stdout (piped at spawn); kills it if it does not.
    pub fn wait_output(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while !self.exited() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(mut child) = self.child.take() else {
            return String::new();
        };
        let _ = child.kill();
        child
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Stops the child now: SIGTERM, up to 2 s grace, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        if let Ok(None) = child.try_wait() {
            // Polite stop first: kill(1) by PID.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Path of a workspace binary built next to the running test executable
/// (`target/<profile>/<name>`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let dir = exe.parent().context("executable has no parent directory")?;
    let candidates = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))];
    for p in candidates.iter().flatten() {
        if p.is_file() {
            return Ok(p.clone());
        }
    }
    bail!(
        "{name} not built next to {}: run `cargo build --workspace --bins` first (the README's test command does)",
        exe.display()
    )
}

/// Runs a command to completion; fails with its stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
