#!/usr/bin/env bash
# Create the venv, install exactly the locked dependency set (requirements/lock.txt, every package pinned with its
# hashes), install the project on top of it without resolving anything, make sure a redis-server binary and Chromium
# (for the browser tests) exist, and (where Node is) install the JavaScript client's locked test dependency.
# Safe to run repeatedly; used by `make run` / `make test` and therefore by CI. Refresh the lock with scripts/lock.sh.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# No `pip install --upgrade pip` and no resolver: what gets installed is the lock, the same on every machine and day.
"$VENV/bin/python" -m pip install -q --require-hashes --no-deps -r requirements/lock.txt
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .

if ! command -v redis-server >/dev/null 2>&1; then
    echo "bootstrap: redis-server not found, installing it from the OS packages" >&2
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q redis-server >/dev/null
        # Debian starts a system service on install; the project manages its own instances.
    else
        echo "bootstrap: no apt-get; install redis-server yourself (the broker will fall back to fakeredis)" >&2
    fi
fi
command -v redis-server >/dev/null 2>&1 && redis-server --version >&2 || true

# Chromium for the real-browser tests (tests/browser.py drives it through Playwright's `executable_path`; Playwright's
# own browser download is never used). Debian's package; `apt-get update` only when apt knows no candidate for it.
CHROMIUM="${BROKER_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    echo "bootstrap: $CHROMIUM not found, installing Debian's chromium package for the browser tests" >&2
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        if ! apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            $SUDO apt-get update -q >/dev/null
        fi
        if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null; then
            echo "bootstrap: installing chromium failed: the browser tests will be SKIPPED (loudly)" >&2
        fi
    else
        echo "bootstrap: no apt-get; install Chromium at $CHROMIUM yourself or the browser tests are skipped" >&2
    fi
fi
[ -x "$CHROMIUM" ] && "$CHROMIUM" --version >&2 || true

# The JavaScript client's test dependency (the `ws` package, as locked in its package-lock.json), where Node is
# installed (CI machines have Node 20 and npm): `make test` runs the client's `node --test` suite.
JS_DIR="$(cd "$(dirname "$0")/.." && pwd)/broker/client/js"
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    if ! (cd "$JS_DIR" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
        echo "bootstrap: npm ci in broker/client/js failed: the JavaScript client's tests will fail until it works" >&2
    fi
else
    echo "bootstrap: no node/npm: the JavaScript client's tests will be skipped" >&2
fi
