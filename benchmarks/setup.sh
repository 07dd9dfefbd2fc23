#!/bin/sh
# Installs what `make bench` needs beyond the venv: nginx (the reference) and wrk (the load generator).
# Idempotent: does nothing when both are present. Debian/Ubuntu packages; needs root or sudo.
set -eu
missing=""
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
[ -z "$missing" ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "benchmarks/setup.sh: please install:$missing (no apt-get here)" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "benchmarks/setup.sh: installing$missing" >&2
$SUDO apt-get update -qq
# nginx-light would do too; plain nginx is the package everyone has. The package's own service is not
# started by the benchmark: it runs its own nginx from a generated config on a free loopback port.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
