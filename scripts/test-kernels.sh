#!/usr/bin/env bash
# Runs flowsteer's system tests under other kernels, each in a VM (virtme-ng boots the kernel with this
# machine's root file system, so the guest runs this checkout and its .venv), and prints one result line
# per kernel. KVM is used when /dev/kvm can run a guest, otherwise qemu emulates (TCG: slower, same
# result).
#
# usage: scripts/test-kernels.sh [--smoke] [KERNEL...]     KERNEL: 6.1 (default), 6.12, 5.10
#   --smoke   boot, load and attach every program, one real connection or packet per hook (CI runs this
#             under 6.1 as part of `make test`); without it the whole system suite runs (about 20
#             minutes per kernel under TCG, over an hour on two slow cores).
# Extra pytest arguments go after `--` (for example `-- -x -k reuseport`); test paths there replace the
# whole suite (`-- tests/system/test_doctor.py`). FLOWSTEER_VM_TIMEOUT=SECONDS changes how long a guest
# may run before it is stopped as hung (default 1200 for the smoke, 10800 for a suite).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=suite
kernels=()
while (($#)); do
    case $1 in
        --smoke) mode=smoke ;;
        --) shift; break ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) kernels+=("$1") ;;
    esac
    shift
done
((${#kernels[@]})) || kernels=(6.1)

# The tests each kind of run starts in the guest: the smoke is one test per hook that loads and attaches
# that hook's programs and sends real traffic through them (reuseport's includes the migration path),
# and flowsteer doctor, which loads every program this kernel gets.
smoke_tests=(
    "tests/system/test_doctor.py::test_every_hook_can_work_here"
    "tests/system/lookup/test_steering.py::test_two_services_share_port_80_on_disjoint_prefixes"
    "tests/system/reuseport/test_reuseport_differential.py::test_migrated_connections_land_where_the_model_says[tcp:192.0.2.12:9003-192.0.2.12-198.51.100.0/24]"
    "tests/system/divert/test_divert_socket.py::test_inbound_packet_not_written_back_is_dropped_and_written_back_passes"
)

vng=.venv/bin/vng
if [[ ! -x $vng ]]; then
    echo "test-kernels: $vng is missing; run make setup (it installs virtme-ng)" >&2
    exit 1
fi
export PATH=$PWD/.venv/bin:$PATH   # vng runs virtme-run from PATH

accel=(--disable-kvm)
if [[ -r /dev/kvm ]] && grep -qE 'vmx|svm' /proc/cpuinfo; then
    accel=()
fi

# A whole suite under TCG on two slow cores takes over an hour; the limit only stops a hung guest.
limit=${FLOWSTEER_VM_TIMEOUT:-$([[ $mode == smoke ]] && echo 1200 || echo 10800)}

status=0
summary=()
for kernel in "${kernels[@]}"; do
    version=$(scripts/kernels-fetch.sh "$kernel") || { summary+=("$kernel: could not fetch the kernel"); status=1; continue; }
    log=$(mktemp "/tmp/flowsteer-kernel-$kernel-XXXX.log")
    args=("$@")
    [[ $mode == smoke ]] && args=("${smoke_tests[@]}" "$@")
    echo "== $mode under $version ($([[ ${#accel[@]} -eq 0 ]] && echo KVM || echo TCG)), log: $log"
    started=$SECONDS
    # --verbose: without virtio-serial script ports virtme-ng falls back to the console, which only
    # --verbose shows; the guest's last line carries the exit code.
    timeout "$limit" "$vng" --run "/boot/vmlinuz-$version" --force-9p "${accel[@]}" --memory 2G --cpus 2 \
        --verbose --exec "scripts/test-kernels-guest.sh $mode ${args[*]+$(printf '%q ' "${args[@]}")}" > "$log" 2>&1
    took=$((SECONDS - started))
    result=$(sed -n 's/.*FLOWSTEER-GUEST-RESULT \([0-9]*\).*/\1/p' "$log" | tail -n1)
    outcome=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error).* in ' "$log" | tail -n1 | tr -d '=')
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    if [[ $result == 0 ]]; then
        summary+=("$kernel ($version): passed in ${took}s: ${outcome:-?}")
    else
        summary+=("$kernel ($version): FAILED (exit ${result:-none: the VM did not finish}) in ${took}s: ${outcome:-?}; log $log")
        status=1
        tail -n 40 "$log" | sed 's/^/    | /'
    fi
done
echo "== results"
printf '%s\n' "${summary[@]}"
exit $status
