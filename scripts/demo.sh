#!/usr/bin/env bash
# The main job on one machine: installs what it needs (scripts/setup.sh, idempotent), builds,
# and runs the federated pipeline with the embedded MQTT broker.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo run --locked -q -p fedshield-hil-tests --bin fedshield-demo -- "$@"
