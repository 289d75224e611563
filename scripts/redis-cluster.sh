#!/usr/bin/env bash
# A local Redis Cluster for people and tests: 3 masters + 3 replicas on loopback.
#
#   scripts/redis-cluster.sh start    # ports 7100-7105 (REDIS_CLUSTER_PORT=7100), data in .data/cluster
#   scripts/redis-cluster.sh status   # CLUSTER INFO of the first node and the node list
#   scripts/redis-cluster.sh stop     # SHUTDOWN NOSAVE every node (the data folder stays; `clean` removes it)
#   scripts/redis-cluster.sh clean    # stop, then remove the data folder
#
# Every node runs with AOF (appendfsync everysec), replicas sync at once (no diskless-sync delay; `start` returns
# only when every replica is in sync) and a short cluster-node-timeout (REDIS_CLUSTER_NODE_TIMEOUT_MS,
# 2000 by default) so a killed master's replica is promoted within seconds. Seed URL for the broker:
#   redis://127.0.0.1:7100 with redis.cluster = true (docs/scaling.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${REDIS_CLUSTER_PORT:-7100}"
DIR="${REDIS_CLUSTER_DIR:-.data/cluster}"
TIMEOUT_MS="${REDIS_CLUSTER_NODE_TIMEOUT_MS:-2000}"
PORTS=()
for i in 0 1 2 3 4 5; do PORTS+=("$((BASE + i))"); done

cli() { redis-cli -h 127.0.0.1 -p "$1" "${@:2}"; }
up() { cli "$1" PING >/dev/null 2>&1; }

start() {
    command -v redis-server >/dev/null || { echo "redis-cluster: redis-server not found (run scripts/bootstrap.sh)" >&2; exit 1; }
    mkdir -p "$DIR"
    for port in "${PORTS[@]}"; do
        if up "$port"; then
            echo "redis-cluster: port $port already answers; leaving it as it is" >&2
            continue
        fi
        mkdir -p "$DIR/$port"
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
            --dir "$(cd "$DIR/$port" && pwd)" --logfile redis.log --pidfile "$(cd "$DIR/$port" && pwd)/redis.pid" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout "$TIMEOUT_MS" \
            --appendonly yes --appendfsync everysec --save "" --repl-diskless-sync-delay 0 \
            --hash-max-listpack-value 4096
    done
    for port in "${PORTS[@]}"; do
        for _ in $(seq 1 50); do up "$port" && break; sleep 0.1; done
        up "$port" || { echo "redis-cluster: node $port did not start; see $DIR/$port/redis.log" >&2; exit 1; }
    done
    if [ "$(cli "${PORTS[0]}" CLUSTER INFO | tr -d '\r' | awk -F: '/^cluster_state/ {print $2}')" = "ok" ]; then
        echo "redis-cluster: already formed on ${PORTS[0]}-${PORTS[5]}"
        return
    fi
    local addrs=()
    for port in "${PORTS[@]}"; do addrs+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
    for _ in $(seq 1 100); do
        state="$(cli "${PORTS[0]}" CLUSTER INFO | tr -d '\r' | awk -F: '/^cluster_state/ {print $2}')"
        [ "$state" = "ok" ] && break
        sleep 0.1
    done
    [ "$state" = "ok" ] || { echo "redis-cluster: state is '$state' after create; see $DIR/create.log" >&2; exit 1; }
    # Replicas attach a moment after the slots are assigned: wait until every master has its replica.
    for _ in $(seq 1 100); do
        [ "$(cli "${PORTS[0]}" CLUSTER NODES | grep -c ' slave ')" -ge 3 ] && break
        sleep 0.1
    done
    # ... and until every replica has synced: a replica that never completed its first sync cannot be promoted
    # (its data counts as too old), so a master killed before that would never fail over.
    for port in "${PORTS[@]}"; do
        for _ in $(seq 1 300); do
            info="$(cli "$port" INFO replication | tr -d '\r')"
            grep -q '^role:master' <<<"$info" && break
            grep -q '^master_link_status:up' <<<"$info" && break
            sleep 0.1
        done
        grep -q -e '^role:master' -e '^master_link_status:up' <<<"$info" \
            || { echo "redis-cluster: replica $port did not sync with its master; see $DIR/$port/redis.log" >&2; exit 1; }
    done
    echo "redis-cluster: 3 masters + 3 replicas on 127.0.0.1:${PORTS[0]}-${PORTS[5]} (data in $DIR)"
}

stop() {
    for port in "${PORTS[@]}"; do
        if up "$port"; then cli "$port" SHUTDOWN NOSAVE >/dev/null 2>&1 || true; fi
    done
    echo "redis-cluster: stopped"
}

status() {
    up "${PORTS[0]}" || { echo "redis-cluster: not running on ${PORTS[0]}"; exit 1; }
    cli "${PORTS[0]}" CLUSTER INFO | tr -d '\r' | grep -E '^cluster_(state|known_nodes|size|slots_assigned)'
    cli "${PORTS[0]}" CLUSTER NODES | awk '{print $2, $3, $9}'
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    clean) stop; rm -rf "$DIR"; echo "redis-cluster: removed $DIR" ;;
    *) echo "usage: $0 start|stop|status|clean" >&2; exit 2 ;;
esac
