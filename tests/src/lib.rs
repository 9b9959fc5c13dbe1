//! # vouch-tests
//!
//! Vouch's end-to-end test support: a per-test swtpm ([`swtpm::Swtpm`]),
//! tool checks that fail under CI instead of skipping ([`require_tools`]),
//! and helpers to run the workspace's binaries as real processes.
//!
//! Trust boundary: none; this crate only drives real parts in tests.

pub mod containerd;
pub mod netns;
pub mod proc;
pub mod stack;
pub mod swtpm;
pub mod vouchd;

/// True when running under CI (`CI=true`), where a missing tool is a
/// failure, never a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks that every tool is on PATH. Missing tools fail the test under CI;
/// elsewhere the test is skipped with a message (returns false).
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "missing tools {missing:?}: install them (bash .ci/run does) — apt-get install swtpm swtpm-tools tpm2-tools openssl"
    );
    assert!(!under_ci(), "CI=true and {msg}");
    eprintln!("SKIPPED: {msg}");
    false
}

/// Finds `tool` on PATH.
pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}
