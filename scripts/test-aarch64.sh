#!/usr/bin/env bash
# The crates without I/O drivers, cross-compiled for aarch64 (the Jetson's architecture)
# and tested under qemu-user: the wire, crypto, codec, protocol and rig crates, the
# telemetry parsers and governor, and the persistent-file store. shared/crypto's
# tests/cross_arch.rs pins digests computed on x86-64 (masks, keys, FFT products,
# encodings, ciphertexts, decryption, signatures), so this run proves that a device and a
# host of the two architectures compute the same round. Needs scripts/setup.sh (the
# aarch64 Rust target, gcc-aarch64-linux-gnu and qemu-user-static).
#
#     scripts/test-aarch64.sh [cargo test args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /usr/aarch64-linux-gnu"
start=$(date +%s)
cargo test --locked --target aarch64-unknown-linux-gnu \
  -p fedshield-wire -p fedshield-crypto -p fedshield-codec -p fedshield-protocol \
  -p fedshield-rig -p fedshield-telemetry -p fedshield-store "$@"
echo "aarch64: built and tested under qemu in $(( $(date +%s) - start )) s"
