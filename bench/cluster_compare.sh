#!/bin/bash
# S1, S2 and S3 with the broker on a single redis-server (the bench's own) and on a local Redis Cluster (3 masters +
# 3 replicas, scripts/redis-cluster.sh) with redis.replicas_to_ack 0 and 1, interleaved round by round. Prints each
# run's result line, prefixed by the mode. Issue 16's numbers (docs/scaling.md).
# usage: bench/cluster_compare.sh ROUNDS [bench args]   e.g. bench/cluster_compare.sh 3 --messages 20000 --latency-seconds 8
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=$1; shift
export REDIS_CLUSTER_PORT=${REDIS_CLUSTER_PORT:-7310}
export REDIS_CLUSTER_DIR=${REDIS_CLUSTER_DIR:-$(mktemp -d /tmp/bench-cluster.XXXXXX)}
bash scripts/redis-cluster.sh start >/dev/null
trap 'bash scripts/redis-cluster.sh clean >/dev/null' EXIT
url=redis://127.0.0.1:$REDIS_CLUSTER_PORT
# CPU seconds of the cluster's six redis-servers (replicas included), from /proc
cluster_cpu() {
  local t=0 f
  for f in "$REDIS_CLUSTER_DIR"/*/redis.pid; do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$(cat "$f")/stat")))
  done
  echo "$t"
}
hz=$(getconf CLK_TCK)
# One scenario per bench run, so that the cluster's CPU can be read around it (the bench's cpu_redis is its own
# redis-server's, idle when the broker runs on the cluster).
for _ in $(seq "$rounds"); do
  for scenario in s1 s2 s3; do
    for mode in single cluster-0 cluster-1; do
      env=()
      if [ "$mode" != single ]; then
        env=(--broker-env "BROKER_REDIS_URL=$url" --broker-env BROKER_REDIS_CLUSTER=true
             --broker-env "BROKER_REDIS_REPLICAS_TO_ACK=${mode#cluster-}")
      fi
      before=$(cluster_cpu)
      line=$(.venv/bin/python -m bench --scenario "$scenario" "${env[@]}" "$@" 2>&1 | grep -E ": ok in|FAIL|rror" \
        | sed -E "s/^\[bench [0-9:]+\] //")
      after=$(cluster_cpu)
      echo "$mode load=$(cut -d' ' -f1 /proc/loadavg) cluster_cpu_s=$(echo "scale=2; ($after - $before) / $hz" | bc) $line"
    done
  done
done
