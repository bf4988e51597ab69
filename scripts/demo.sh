#!/usr/bin/env bash
# The main job on one machine: a host and three edge processes fine-tune SmolLM2-135M (4-bit
# base, LoRA r=16 on all projections) on the FAQ data split by category, for 3 rounds,
# pruned (rho = 50%, 8-bit ciphertext bodies: 0.5 bytes per parameter) and encrypted, over
# the embedded MQTT broker.
#
#   scripts/demo.sh [extra fedshield-host serve flags, e.g. --rounds 5 --rho 0.25]
#
# Installs what it needs first (scripts/setup.sh, idempotent). Prints each round's progress
# and held-out loss, then the paths of the PEFT adapter, the loss plot and metrics.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >/dev/null
echo "[demo] building fedshield-host and fedshield-edge"
cargo build --locked -q -p fedshield-host -p fedshield-edge
BIN=target/debug
RUN=${FEDSHIELD_DEMO_DIR:-runs/demo-$(date +%Y%m%d-%H%M%S)}
ROUNDS=${FEDSHIELD_DEMO_ROUNDS:-3}
EDGE_FLAGS=${FEDSHIELD_DEMO_EDGE_FLAGS:-}
mkdir -p "$RUN"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/fedshield-host" enrol --fleet demo --fleet-dir "$RUN/fleet" --authority-dir "$RUN/authority" --devices edge-0,edge-1,edge-2 >/dev/null
start=$(date +%s)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
"$BIN/fedshield-host" serve --embedded-broker --broker "127.0.0.1:$PORT" \
  --fleet-dir "$RUN/fleet" --out "$RUN" --rounds "$ROUNDS" "$@" &
host=$!
pids+=("$host")
for i in 0 1 2; do
  # shellcheck disable=SC2086
  "$BIN/fedshield-edge" run --threads 1 --key "$RUN/fleet/devices/edge-$i.json" \
    --broker "127.0.0.1:$PORT" --client "$i" --clients 3 --rounds "$ROUNDS" $EDGE_FLAGS \
    > "$RUN/edge-$i.log" 2>&1 &
  pids+=("$!")
done
echo "[demo] host and 3 edges started (logs: $RUN/edge-*.log)"
wait "$host"
for p in "${pids[@]:1}"; do wait "$p" || echo "[demo] an edge exited with an error (see its log)"; done
trap - EXIT
echo "[demo] finished in $(( $(date +%s) - start )) s"
python3 - "$RUN/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"{'round':>5} {'contributors':>12} {'eval loss':>10} {'upload B/client':>16} {'global B':>9} {'round s':>8} {'crypto s':>9} {'crypto %':>8}")
for r in m["rounds"]:
    loss = f"{r['eval_loss']:.4f}" if r["eval_loss"] is not None else "-"
    share = 100 * r["crypto_seconds"] / r["round_seconds"] if r["round_seconds"] else 0
    print(f"{r['round']:>5} {r['contributors']:>12} {loss:>10} {r['upload_bytes_per_client']:>16} {r['download_bytes_per_client']:>9} {r['round_seconds']:>8.1f} {r['crypto_seconds']:>9.2f} {share:>7.2f}%")
print()
print(f"{'round':>5} {'device':>8} {'plan':>18} {'budget MiB':>10} {'steps':>7} {'tokens':>7} {'tokens/s':>9} {'throttled s':>11} {'J/token':>8}")
for r in m["rounds"]:
    for device, d in sorted(r.get("devices", {}).items()):
        s = d["status"]
        a = d["assignment"]
        t = (r.get("reports", {}).get(device) or {}).get("training") or {}
        steps = f"{t['steps']}/{t['assigned']}" if t else (str(a["train"]["steps"]) if "train" in a else "out")
        speed = f"{t['tokens'] / t['seconds']:.1f}" if t and t["seconds"] > 0 else "-"
        jpt = f"{t['joules'] / t['tokens']:.4f}" if t and t.get("joules") is not None and t["tokens"] else "-"
        print(f"{r['round']:>5} {device:>8} {s.get('plan') or '-':>18} {s.get('memory_budget_mib') or '-':>10} {steps:>7} {t.get('tokens', '-'):>7} {speed:>9} {t.get('throttled_seconds', 0.0):>11.1f} {jpt:>8}")
PY
