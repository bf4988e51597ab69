#!/usr/bin/env bash
# Flake campaign for the whole-system tests: runs hil-tests/tests/federation.rs N times in a
# row (default 20) while mqtt_brokers.rs and serial_rig.rs run in a loop beside it, and
# counts every run of each. Not part of CI (about 4 minutes per federation run on 2 cores);
# run it before relying on a change to the drivers.
#
#     scripts/flake-campaign.sh [N]
#
# Results: target/flake/progress.txt (one line per federation run, with the counts beside),
# logs of failed runs in target/flake/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${1:-20}
scripts/setup.sh
# Build once; the test binaries' paths come from cargo's JSON messages.
bins=$(cargo test --locked -p fedshield-hil-tests --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])
')
bin() { echo "$bins" | awk -v n="$1" '$1 == n { print $2 }'; }
FED=$(bin federation)
MQ=$(bin mqtt_brokers)
SR=$(bin serial_rig)
out=target/flake
mkdir -p "$out"
rm -f "$out"/progress.txt "$out"/*.log "$out"/stop
cd hil-tests
(
  m=0 s=0 mf=0 sf=0
  while [ ! -f "../$out/stop" ]; do
    if "$MQ" >"../$out/mq.log" 2>&1; then m=$((m + 1)); else mf=$((mf + 1)); cp "../$out/mq.log" "../$out/mqtt_brokers-failed-$mf.log"; fi
    if "$SR" >"../$out/sr.log" 2>&1; then s=$((s + 1)); else sf=$((sf + 1)); cp "../$out/sr.log" "../$out/serial_rig-failed-$sf.log"; fi
    echo "mqtt_brokers $m ok $mf failed; serial_rig $s ok $sf failed" >"../$out/beside.txt"
  done
) &
beside=$!
ok=0 failed=0
for i in $(seq 1 "$N"); do
  t0=$(date +%s)
  if "$FED" >"../$out/federation-$i.log" 2>&1; then
    ok=$((ok + 1)) r=ok
    rm -f "../$out/federation-$i.log"
  else
    failed=$((failed + 1)) r=FAILED
  fi
  echo "federation run $i: $r in $(($(date +%s) - t0)) s (beside: $(cat "../$out/beside.txt" 2>/dev/null))" | tee -a "../$out/progress.txt"
done
touch "../$out/stop"
wait "$beside"
echo "federation: $ok ok, $failed failed of $N; beside: $(cat "../$out/beside.txt")" | tee -a "../$out/progress.txt"
[ "$failed" -eq 0 ]
