#!/usr/bin/env bash
# Secure-aggregation scaling benchmark: the complete graph and the SecAgg+ Harary graph side
# by side, in one run, on the real state machines, all devices in one process (release build).
# Prints a table and writes target/bench/secagg.json. Extra arguments go to the benchmark
# (--sizes 100,300,1000 --dropouts 0,0.1 --graphs complete,auto).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo run --release --locked -q -p fedshield-crypto --example secagg_scale -- "$@"
