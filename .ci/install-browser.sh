#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_browser.py. Idempotent: a no-op when it is already there.
# Never fails the build: if the browser cannot be installed, it says why and exits 0, and the browser
# tests then skip with a reason (pytest -rs prints it in the summary).
set -u

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi

reason=""
if ! command -v apt-get >/dev/null 2>&1; then
    reason="apt-get is not available on this machine"
elif [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    reason="not root and no sudo, so apt-get cannot install packages"
fi

if [ -z "$reason" ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    echo "install-browser: installing chromium with apt-get (one-off; later runs skip this)" >&2
    if ! $SUDO apt-get update -qq >/tmp/install-browser.log 2>&1; then
        reason="'apt-get update' failed (see /tmp/install-browser.log)"
    elif ! $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core \
            >>/tmp/install-browser.log 2>&1; then
        reason="'apt-get install chromium' failed (see /tmp/install-browser.log)"
    elif [ ! -x "$CHROMIUM" ]; then
        reason="apt-get installed chromium but $CHROMIUM is missing"
    fi
fi

if [ -n "$reason" ]; then
    echo "install-browser: WARNING: chromium not installed: $reason; the browser tests will be SKIPPED" >&2
    tail -n 5 /tmp/install-browser.log 2>/dev/null >&2 || true
fi
exit 0
