#!/usr/bin/env bash
# Sets everything up and runs Vouch's demo on a private swtpm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TSS2_LOG="${TSS2_LOG:-all+none}"
cargo build --workspace --bins
exec target/debug/vouch-demo "$@"
