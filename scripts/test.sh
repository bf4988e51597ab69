#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what it needs (scripts/setup.sh,
# idempotent), then runs every test of every crate, whole-system tests included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
# The secure-aggregation scaling benchmark, quick: both graphs at 20 and 70 devices (the
# full one is scripts/bench-secagg.sh).
cargo run --locked -q -p fedshield-crypto --example secagg_scale -- \
  --sizes 20,70 --out-dir target/bench-quick
# The fleet-scale benchmark, quick: 20 simulated devices against mosquitto and the real
# host, two rounds (the full one is scripts/bench-scale.sh).
cargo run --locked -q -p fedshield-hil-tests --bin fedshield-sim -- bench --devices 20 \
  --dropouts 0 --rank 1 --out target/bench-quick/scale.json
# The inference benchmark, quick: ours on ONNX Runtime (int8 and exact exports) and on
# libtorch, one thread, 32 new tokens; fails if the exact export and libtorch decode
# different tokens (the full one, against llama.cpp, is scripts/bench-infer.sh).
cargo run --locked -q -p fedshield-edge --example infer_bench -- --quick
# The rig protocol builds without std, as rig firmware on a microcontroller uses it.
cargo build --locked -q -p fedshield-rig --target thumbv7em-none-eabihf
# The crates without I/O drivers on aarch64, under qemu (the same round on both
# architectures: shared/crypto/tests/cross_arch.rs).
scripts/test-aarch64.sh
