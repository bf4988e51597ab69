#!/usr/bin/env bash
# The update codec's quality experiment on SmolLM2-135M and the FAQ split (3 clients, one
# seed): local-only, plaintext dense FedAvg, encrypted pruned FedAvg at rho = 100/50/25/10%
# and at rho = 50% with 8-bit ciphertext bodies, centralised. Writes target/bench/quality.json
# and target/bench/quality.svg.
# About 50 minutes on 2 CPU cores; --quick runs the CI-sized version (about 90 s).
# Extra arguments go to `fedshield-edge quality` (see its --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >/dev/null
cargo build --locked -q -p fedshield-edge
target/debug/fedshield-edge quality --out target/bench "$@"
