#!/usr/bin/env bash
# Installs what a fresh Debian-based machine lacks for flowsteer: system packages (apt, only the missing
# ones; scripts/apt-install.sh waits for other apt users and repairs an interrupted dpkg) and the Python
# virtual environment. Idempotent; `make` calls it through a stamp file.
set -euo pipefail

packages=(
    clang llvm libbpf-dev linux-libc-dev   # building the BPF objects
    libbpf1                                # the loader flowsteer.kernel.libbpf binds with ctypes
    iproute2 iptables nftables iputils-ping conntrack  # namespaces, divert rules, test traffic
    tcpdump                                # reading back divert capture files in the tests
    libnetfilter-queue-dev                 # the C baseline of bench/divert.py and python NetfilterQueue
    python3-venv python3-dev gcc
    wrk                                    # load generator of the restart tests and bench/reuseport.py
    systemd                                # systemd-analyze: the shipped units are verified by a test
    qemu-system-x86 busybox-static         # VMs of other kernels (scripts/test-kernels.sh, virtme-ng)
    kmod                                   # depmod and modprobe for those kernels' modules
)
"$(dirname "$0")/apt-install.sh" "${packages[@]}"

venv=${VENV:-.venv}
if [[ ! -x $venv/bin/python ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test,bench,kernels]'
"$(dirname "$0")/promtool-fetch.sh" "$venv"   # checks the metrics exposition in the tests
