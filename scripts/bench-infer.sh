#!/usr/bin/env bash
# Inference benchmark: ours on ONNX Runtime, ours on libtorch and llama.cpp, side by side in
# one run on the same machine and GGUF (SmolLM2-135M-Instruct Q4_1), greedy, 128 new tokens
# after a 64-token prompt, one and two threads (see edge/examples/infer_bench.rs). Prints
# decode tokens/s, prefill and first-token times and peak RSS with the ratios to llama.cpp,
# and writes target/bench/infer.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --bench
cargo run --release --locked -q -p fedshield-edge --example infer_bench -- "$@"
