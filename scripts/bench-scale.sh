#!/usr/bin/env bash
# Fleet-scale benchmark: simulated devices (the real edge protocol and cryptography on
# synthetic updates, `fedshield-sim`) against a real mosquitto and the real
# `fedshield-host serve`, for N = 10, 100, 300 and 1,000 devices with no dropouts and with
# 10% of the devices leaving each round after their shares (the host then removes their
# masks; the round waits out the upload window for them), two rounds each; the figures are
# the second round's. Writes target/bench/scale.json
# (`runs`: devices, dropout, update_values, host_cpu_s by stage, host_peak_rss_mib,
# broker_bytes, round_s, every round) and target/bench/scale-{cpu,rss,secagg}.svg.
# About 30 minutes on two cores. Extra arguments go to `fedshield-sim bench`, e.g.
#   scripts/bench-scale.sh --devices 50 --dropouts 0 --rank 16 \
#       --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --rho 0.5 \
#       --out target/bench/scale-smollm2.json        # the SmolLM2 demo's update size
#   scripts/bench-scale.sh --devices 100,1000 --dropouts 0 --worker-counts 0,1,2,4 \
#       --out target/bench/shards.json               # aggregation over fold workers: prints
#                                                    # the host side's critical path against
#                                                    # one worker's and the host's alone
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh # mosquitto, the model's shapes
cargo build --locked -q -p fedshield-host -p fedshield-hil-tests --bins
exec target/debug/fedshield-sim bench --stages upload "$@"
