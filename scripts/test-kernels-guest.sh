#!/usr/bin/env bash
# Runs inside the VM that scripts/test-kernels.sh boots (virtme-ng: the host's root file system over 9p,
# this kernel): a private /tmp, then the smoke or the system suite with the checkout's .venv. The last
# line is the marker the host script reads, since virtme-ng's console fallback loses the exit code.
#
# usage: scripts/test-kernels-guest.sh smoke|suite [pytest arguments...]   (smoke: the tests to run)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=$1; shift
# The host's file systems are shared read-only; tests need a writable scratch directory. It is a
# private tmpfs over /tmp, or over /var/tmp when the checkout itself lives under /tmp (a tmpfs there
# would hide it).
scratch=/tmp
[[ $PWD/ == /tmp/* ]] && scratch=/var/tmp
mount -t tmpfs tmpfs "$scratch"
# compile the checkout's modules once per boot into the scratch directory (over 9p every import is
# slow), and give each test the headroom an emulated CPU needs
unset PYTHONDONTWRITEBYTECODE
export TMPDIR=$scratch PYTHONPYCACHEPREFIX=$scratch/pycache PYTEST_ADDOPTS="--color=no --timeout=900 --tb=short"
echo "guest kernel $(uname -r)"
# the smoke's tests are named on the command line by the host script; the suite is tests/system, or
# the tests named after `--` when some are
named=0
for arg in "$@"; do [[ $arg == tests/* ]] && named=1; done
[[ $mode == smoke || $named == 1 ]] || set -- tests/system "$@"
# a suite names each test as it finishes (-v): a run stopped before its summary still shows what failed
verbosity=-q
[[ $mode == suite ]] && verbosity=-v
.venv/bin/python -m pytest "$verbosity" -p no:cacheprovider "$@"
echo "FLOWSTEER-GUEST-RESULT $?"
