#!/usr/bin/env bash
# Installs those of the given Debian packages that are missing, on a machine where other people may
# run apt at the same time:
#   - waits (up to $APT_LOCK_WAIT seconds, default 900) for another apt or dpkg to release its lock,
#     rather than failing;
#   - when apt says dpkg was interrupted, repairs it (`dpkg --configure -a`) and goes on.
# Usage: scripts/apt-install.sh PACKAGE...   (as root when anything is missing)
set -euo pipefail

lock_wait=${APT_LOCK_WAIT:-900}
retry_every=${APT_RETRY_SECONDS:-5}
deadline=$((SECONDS + lock_wait))

# Runs "$@" (apt-get or dpkg); while it fails because another process holds the apt/dpkg lock, waits
# and runs it again; when apt reports an interrupted dpkg, repairs that (once) first. Its output goes to
# stderr; its exit status is returned once it fails for any other reason or the wait is over.
locked_run() {
    local out status repaired=0
    while true; do
        status=0
        out=$("$@" 2>&1) || status=$?
        if ((status == 0)); then
            return 0
        fi
        if grep -q "dpkg was interrupted" <<<"$out" && ((!repaired)); then
            echo "bootstrap: dpkg was interrupted; repairing it with dpkg --configure -a" >&2
            locked_run dpkg --force-confdef --force-confold --configure -a
            repaired=1
        elif grep -q -i -E "could not get lock|unable to acquire the dpkg frontend lock|locked by another process" <<<"$out" \
                && ((SECONDS < deadline)); then
            echo "bootstrap: another apt or dpkg holds the lock; waiting for it" >&2
            sleep "$retry_every"
        else
            printf '%s\n' "$out" >&2
            return "$status"
        fi
    done
}

missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: missing system packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
fi
echo "bootstrap: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
locked_run apt-get -o DPkg::Lock::Timeout="$lock_wait" update -qq
locked_run apt-get -o DPkg::Lock::Timeout="$lock_wait" install -y -qq --no-install-recommends "${missing[@]}"
