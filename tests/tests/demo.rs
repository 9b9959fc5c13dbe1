//! The README's first command (`scripts/demo.sh` = set-up, build, then
//! `vouch-demo`) must run green: this runs the same `vouch-demo` binary and
//! checks the story it tells.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests

use std::process::Command;

use vouch_tests::proc::workspace_bin;

#[test]
fn the_demo_runs_green() {
    if !vouch_tests::require_tools(&["swtpm", "swtpm_setup", "ip", "sha256sum", "python3"]) {
        return;
    }
    let out = Command::new(workspace_bin("vouch-demo").unwrap())
        .env("TSS2_LOG", "all+none")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vouch-demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "app-id=orders -> AFFIRMING",
        "app-id=billing -> AFFIRMING",
        "got a workload certificate for spiffe://cluster.local/ns/prod/orders",
        "X.509 SVID from the Workload API stream: spiffe://cluster.local/ns/prod/billing",
        "app-id=payments -> CONTRAINDICATED",
        "its certificate request: PermissionDenied",
        "app-id=orders -> CONTRAINDICATED",
        "trust in orders withdrawn",
        "Demo finished",
    ] {
        assert!(text.contains(want), "demo output lacks {want:?}:\n{text}");
    }
}
