#!/usr/bin/env bash
# Crypto benchmark: FedShield's packed GLWE and TenSEAL CKKS (the reference's parameters)
# side by side, in one run, on the same vectors, one core each. Prints a table and writes
# target/bench/crypto.json. Extra arguments go to the benchmark (--values N --clients C).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --bench
cargo run --release --locked -q -p fedshield-crypto --example crypto_bench -- "$@"
