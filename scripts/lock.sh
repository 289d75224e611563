#!/usr/bin/env bash
# Recompile requirements/lock.txt: every runtime and dev dependency pinned with its hashes, for Python 3.11.
# `scripts/lock.sh` keeps today's pins where pyproject.toml still allows them (use it after editing pyproject.toml);
# `scripts/lock.sh --upgrade` moves every pin to the newest release the ranges in pyproject.toml allow.
# uv comes from the lock itself (a dev dependency), so the tool that writes the lock is pinned too.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
"$UV" pip compile pyproject.toml requirements/build.in \
    --extra server --extra dev \
    --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
    --custom-compile-command "scripts/lock.sh" \
    --quiet -o requirements/lock.txt "$@"
echo "lock: requirements/lock.txt ($(grep -c '==' requirements/lock.txt) packages)" >&2
