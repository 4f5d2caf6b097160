#!/usr/bin/env bash
# Makes a stock Debian kernel bootable in a VM on this machine: downloads Debian's `linux-image-amd64`
# of a release (bookworm = Debian 12 = 6.1, trixie = Debian 13 = 6.12, bullseye = Debian 11 = 5.10) with
# a PRIVATE apt configuration under /var/cache/flowsteer-kernels (the host's apt sources and dpkg
# database are never touched), unpacks it and installs its kernel image and modules where virtme-ng
# finds them (/boot/vmlinuz-VERSION, /lib/modules/VERSION). Prints VERSION (uname -r of that kernel).
# Idempotent: a kernel already installed is not fetched again.
#
# usage: scripts/kernels-fetch.sh 6.1|6.12|5.10
set -euo pipefail

case ${1:-} in
    6.1) release=bookworm ;;
    6.12) release=trixie ;;
    5.10) release=bullseye ;;
    *) echo "usage: $0 6.1|6.12|5.10 (Debian 12, 13, 11)" >&2; exit 2 ;;
esac

cache=/var/cache/flowsteer-kernels
state=$cache/apt-$release
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$cache/debs"
touch "$state/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
{
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $release main"
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian-security $release-security main"
} > "$state/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State=$state" -o "Dir::State::Lists=$state/lists" -o "Dir::State::status=$state/status"
          -o "Dir::Cache=$state/cache" -o APT::Architecture=amd64 -o Debug::NoLocking=1
          -o APT::Sandbox::User=root -qq)

# The versioned image package the meta-package points at, from the release's current index; an index
# fetched today is reused (kernels of a stable release change a few times a year).
if [[ -z $(find "$state/lists" -name '*Packages*' -mtime -1 -print -quit) ]]; then
    apt-get "${apt_opts[@]}" update
fi
image=$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | grep -v unsigned | head -n1)
if [[ -z $image ]]; then
    echo "kernels-fetch: no linux-image package found for $release" >&2
    exit 1
fi
version=${image#linux-image-}
# modules.dep is written last (by depmod), so a fetch that stopped half-way is done again
if [[ -f /boot/vmlinuz-$version && -f /lib/modules/$version/modules.dep ]]; then
    echo "$version"
    exit 0
fi

cd "$cache/debs"
deb=$(ls "${image}"_*.deb 2>/dev/null | head -n1 || true)
if [[ -z $deb ]]; then
    apt-get "${apt_opts[@]}" download "$image" >&2
    deb=$(ls "${image}"_*.deb | head -n1)
fi
unpacked=$(mktemp -d)
trap 'rm -rf "$unpacked"' EXIT
dpkg-deb -x "$deb" "$unpacked"
cp "$unpacked/boot/vmlinuz-$version" "$unpacked/boot/config-$version" "$unpacked/boot/System.map-$version" /boot/
mkdir -p /lib/modules
rm -rf "/lib/modules/$version"
# Debian 13 ships modules under /usr/lib (merged /usr), older releases under /lib
modules=$unpacked/lib/modules/$version
[[ -d $modules ]] || modules=$unpacked/usr/lib/modules/$version
cp -a "$modules" "/lib/modules/$version"
depmod "$version"
echo "$version"
