#!/usr/bin/env bash
# W-churn, registry part: durable registration throughput through a real agent,
# the agent's memory per endpoint, and the cost of publishing one change as the
# catalog grows (each size in its own process, median of three runs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p switchyard -p switchyard-bench
B=target/release/switchyard-bench
echo "## machine: $(nproc) cores, $(uname -r), $(date -u +%F)"
echo
echo "### durable registration through the agent"
$B churn --endpoints "${ENDPOINTS:-1000000}" --batch 10000 --clients 4 --singles 4000 --single-clients 16
echo
for group in 1 100; do
  echo "### publish cost, $group endpoint change(s) per command (median of 3)"
  echo "| endpoints | µs per change | RSS per endpoint |"
  echo "|---|---|---|"
  for size in 1000 10000 100000 1000000; do
    for run in 1 2 3; do
      $B publish --sizes "$size" --changes 20000 --group "$group" | tail -1
    done | awk -F'|' '{print $3, $5}' | sort -n | sed -n 2p | awk -v s="$size" '{print "| " s " | " $1 " | " $2 " " $3 " |"}'
  done
  echo
done
