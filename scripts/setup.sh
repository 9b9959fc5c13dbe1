#!/usr/bin/env bash
# Installs the Debian packages Vouch needs to build, test and run its demo,
# when they are missing. Safe to run repeatedly. Needs root (or sudo).
set -euo pipefail

PKGS=(
  pkg-config libtss2-dev        # tss-esapi (daemon TPM layer)
  protobuf-compiler             # gRPC code generation (vouch-proto)
  libsqlite3-dev                # verifier state (rusqlite, system SQLite)
  swtpm swtpm-tools             # software TPM + swtpm_setup/swtpm_localca
  tpm2-tools                    # tpm2_checkquote interop test
  openssl                       # X.509 path validation interop test
  iproute2 util-linux procps    # ip netns / unshare / ps for end-to-end tests
  containerd runc               # a real container runtime for end-to-end tests
)

missing=()
for p in "${PKGS[@]}"; do
  [[ "$p" == \#* ]] && continue
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "setup: all system packages present"
fi

# PyJWT (a JWT library nobody here wrote) verifies EAR tokens in the tests.
if ! python3 -c "import jwt, cryptography" 2>/dev/null; then
  echo "setup: installing PyJWT and cryptography (pip)"
  python3 -m pip install --quiet pyjwt cryptography
fi

for tool in cargo swtpm swtpm_setup swtpm_localca tpm2_checkquote openssl protoc ip unshare python3 sha256sum containerd ctr runc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "setup: required tool '$tool' is missing after installation" >&2
    exit 1
  fi
done
