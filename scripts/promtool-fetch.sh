#!/usr/bin/env bash
# Puts Prometheus's `promtool` (which checks the metrics exposition in the tests) into the venv's bin/,
# taken from Debian's `prometheus` package without installing that package: installing it would also
# start a Prometheus server on the host. Idempotent.
#
# usage: scripts/promtool-fetch.sh VENV
set -euo pipefail
venv=${1:?usage: $0 VENV}
[[ -x $venv/bin/promtool ]] && exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root prometheus); }
# a machine whose packages were all installed may never have fetched the package lists: fetch them once
download || { apt-get update -qq && download; }
dpkg-deb --fsys-tarfile "$work"/prometheus_*.deb | tar -x -C "$work" ./usr/bin/promtool
install -m 0755 "$work/usr/bin/promtool" "$venv/bin/promtool"
