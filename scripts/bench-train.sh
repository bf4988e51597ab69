#!/usr/bin/env bash
# Training benchmark: FedShield's trainer and PyTorch + PEFT side by side, in one run, on the
# same machine and configurations (see edge/examples/train_bench.rs). Prints tokens/s and
# peak RSS with their ratios, adds the memory planner's choice at PEFT's peak and the
# smallest plan, and writes target/bench/train.json.
# Extra arguments go to the benchmark (--config small|smollm2). With --plans it instead
# measures the planner's predicted peak against the real one for ten plans per config
# (target/bench/plan.json).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --bench
cargo run --release --locked -q -p fedshield-edge --example train_bench -- "$@"
