#!/usr/bin/env bash
# Sets everything up and runs every check: formatting, clippy (warnings are
# errors), all unit, property, fixture and end-to-end tests (against swtpm).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TSS2_LOG="${TSS2_LOG:-all+none}"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests run the workspace's binaries as real processes.
cargo build --workspace --bins
cargo test --workspace
# The verifier must build and run without the TSS C library.
if cargo tree -p vouch-verifier -e normal,build | grep -q "tss-esapi"; then
  echo "vouch-verifier depends on tss-esapi: the verifier must not need libtss2" >&2
  exit 1
fi
