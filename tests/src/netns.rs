//! Real network namespaces for tests (`ip netns`), deleted on drop.

use std::process::{Command, Stdio};

use anyhow::Result;

use crate::proc::run_ok;

/// A named network namespace with loopback up.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `vouch-<random>` and brings `lo` up in it.
    pub fn new() -> Result<Self> {
        let name = format!(
            "vouch-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let me = Self { name };
        run_ok(
            Command::new("ip").args(["netns", "exec", &me.name, "ip", "link", "set", "lo", "up"]),
        )?;
        Ok(me)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`
    /// execs it, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}
