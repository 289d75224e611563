#!/bin/bash
# Interleaved A/B of the broker at an older commit against the working tree, with each process's CPU seconds.
# usage: bench/ab.sh OLD_COMMIT ROUNDS SCENARIO [extra bench args]     e.g. bench/ab.sh a777fb7 3 s1
# AB_OLD_ARGS / AB_NEW_ARGS: bench args for one side only (split on spaces), e.g. AB_OLD_ARGS="--redis-transport tcp"
# gives an old broker the loopback TCP the bench gave it before --redis-transport existed; with OLD_COMMIT = HEAD they
# compare two settings of the same code.
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1; rounds=$2; scenario=$3; shift 3
wt=$(mktemp -d /tmp/broker-ab.XXXXXX)
git worktree add --detach "$wt" "$old" >/dev/null 2>&1
trap 'git worktree remove --force "$wt"' EXIT
for _ in $(seq "$rounds"); do
  for side in old new; do
    dir=$([ "$side" = old ] && echo "$wt" || pwd)
    read -r -a side_args <<< "$([ "$side" = old ] && echo "${AB_OLD_ARGS:-}" || echo "${AB_NEW_ARGS:-}")"
    .venv/bin/python -m bench.cpumon "${CPU_WINDOW_S:-12}" > "$wt.cpu.$side" &
    result=$(.venv/bin/python -m bench --scenario "$scenario" "$@" "${side_args[@]}" \
      --broker-cmd "sh -c 'cd $dir && exec {python} -m broker serve --port {port}'" 2>&1 | grep -E ": ok in" \
      | sed -E 's/.*ok in [0-9.]+s //')
    wait
    cpu=$(awk '/broker serve/ {b=$1} /redis-server/ {r=$1} /-m bench --scenario/ {x=$1} \
      END {printf "cpu: broker=%s redis=%s bench=%s", b, r, x}' "$wt.cpu.$side")
    echo "$side $result $cpu"
  done
done
rm -f "$wt".cpu.*
