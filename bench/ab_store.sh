#!/bin/bash
# Interleaved A/B of the store layer alone (bench/storecost.py): an older commit's broker package against the
# working tree's, same driver, each shape in turn. Prints one JSON line per run, prefixed old/new.
# usage: bench/ab_store.sh OLD_COMMIT ROUNDS [MESSAGES] [SHAPES]   e.g. bench/ab_store.sh 2c097ad 3 3000 "batch single"
# STORECOST_ARGS: more arguments for storecost.py (e.g. --listen).
# NEW_COMMIT=<commit> measures that commit instead of the working tree (so the tree can change during a long run).
set -euo pipefail
cd "$(dirname "$0")/.."
old=$1; rounds=$2; messages=${3:-3000}; shapes=${4:-batch single concurrent}
wt=$(mktemp -d /tmp/broker-ab-store.XXXXXX)
git worktree add --detach "$wt" "$old" >/dev/null 2>&1
new=$(pwd)
if [ -n "${NEW_COMMIT:-}" ]; then
  new=$(mktemp -d /tmp/broker-ab-store-new.XXXXXX)
  git worktree add --detach "$new" "$NEW_COMMIT" >/dev/null 2>&1
fi
trap 'git worktree remove --force "$wt"; [ "$new" = "$(pwd)" ] || git worktree remove --force "$new"' EXIT
for _ in $(seq "$rounds"); do
  for shape in $shapes; do
    for side in old new; do
      dir=$([ "$side" = old ] && echo "$wt" || echo "$new")
      echo "$side $(PYTHONPATH="$dir" .venv/bin/python bench/storecost.py --shape "$shape" --messages "$messages" ${STORECOST_ARGS:-} 2>/dev/null)"
    done
  done
done
