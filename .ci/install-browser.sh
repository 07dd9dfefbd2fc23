#!/usr/bin/env bash
# Installs Debian's chromium for the browser suites (tests/test_browser.py, tests/test_dashboard_browser.py),
# driven by Playwright, which never downloads a browser.
# Idempotent and instant when /usr/bin/chromium is already there. Never fails the build: if chromium cannot
# be installed it says why, here and in test-output/browser/install-browser.txt, and exits 0; the browser
# tests then skip with that reason (pytest -rs prints it in the summary).
set -u

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    exit 0
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NOTE="$ROOT/test-output/browser/install-browser.txt"
LOG="${TMPDIR:-/tmp}/install-browser.log"
: >"$LOG"

reason=""
SUDO=""
if ! command -v apt-get >/dev/null 2>&1; then
    reason="apt-get is not available on this machine"
elif [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        reason="not root, and no password-less sudo for apt-get"
    fi
fi

if [ -z "$reason" ]; then
    echo "install-browser: installing chromium with apt-get (once; later runs skip this)" >&2
    # Wait for another apt/dpkg run to finish rather than failing on its lock.
    APT=($SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -y -q)
    if ! "${APT[@]}" update >>"$LOG" 2>&1; then
        reason="'apt-get update' failed"
    elif ! "${APT[@]}" install --no-install-recommends chromium fonts-dejavu-core >>"$LOG" 2>&1; then
        reason="'apt-get install chromium' failed"
    elif [ ! -x "$CHROMIUM" ]; then
        reason="the chromium package installed no $CHROMIUM"
    fi
    last_error="$(grep -E '^(E|Err):' "$LOG" | tail -n 1)"
    if [ -n "$reason" ] && [ -n "$last_error" ]; then
        reason="$reason: $last_error"
    fi
fi

if [ -n "$reason" ]; then
    echo "install-browser: WARNING: chromium is not installed ($reason); the browser tests will be SKIPPED" >&2
    mkdir -p "$(dirname "$NOTE")" && printf '%s\n' "$reason" >"$NOTE"
else
    rm -f "$NOTE"
fi
exit 0
