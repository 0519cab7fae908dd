#!/usr/bin/env bash
# Provision the vdevlab lab toolchain from Debian's packages, into a cache
# folder outside git:
#
#   $VDEVLAB_CACHE/trixie-root      Debian trixie root with QEMU >= 10.2 from
#                                   trixie-backports, gcc-14, make, kernel
#                                   headers and busybox-static
#   $VDEVLAB_CACHE/kernels/<rel>/   the unpacked guest kernel (vmlinuz)
#   $VDEVLAB_CACHE/lab.env          what the Rust harness reads
#
# Idempotent: every step leaves a stamp, and a second run with everything
# cached only checks the stamps.  Run as root (mmdebstrap, chroot).
set -euo pipefail

CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
ROOT=$CACHE/trixie-root
STAMP_VERSION=1
say() { printf '[vdevlab provision] %s\n' "$*" >&2; }
die() { printf '[vdevlab provision] error: %s\n' "$*" >&2; exit 1; }
step() { say "($1/5) $2"; }

[ "$(id -u)" -eq 0 ] || die "must run as root: it builds a Debian root with mmdebstrap and runs chroot. Re-run with sudo."
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
mkdir -p "$CACHE"

# One provisioner at a time: tests running in parallel may all ask for it.
exec 9>"$CACHE/.provision.lock"
flock 9

mirror() {
    # Use the mirror this machine already uses, as LAB-FACTS asks.
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk '$1=="deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=${VDEVLAB_MIRROR:-$(mirror)}

apt_updated=""
host_pkg() { # host_pkg <command> <package>
    command -v "$1" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and this host has no apt-get: install the '$2' package"
    if [ -z "$apt_updated" ]; then
        say "apt-get update (host)"
        apt-get update -q >&2 || die "apt-get update failed on the host"
        apt_updated=1
    fi
    say "installing host package $2"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >&2 \
        || die "could not install '$2' on the host: apt-get install $2"
}

step 1 "host tools (mmdebstrap, unshare, flock)"
host_pkg mmdebstrap mmdebstrap
host_pkg unshare util-linux

step 2 "Debian trixie root at $ROOT"
if [ ! -f "$ROOT/.vdevlab-root-$STAMP_VERSION" ]; then
    rm -rf "$ROOT.tmp"
    say "mmdebstrap trixie from $MIRROR (about 20 s to a few minutes)"
    mmdebstrap --variant=apt trixie "$ROOT.tmp" \
        "deb $MIRROR trixie main" "deb $MIRROR trixie-backports main" >&2 \
        || die "mmdebstrap failed; check that $MIRROR serves trixie and trixie-backports"
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
    touch "$ROOT/.vdevlab-root-$STAMP_VERSION"
else
    say "cached"
fi

in_root() {
    # A private mount namespace, so /proc and /dev in the root vanish with us.
    unshare --mount --propagation private -- /bin/sh -c '
        r=$1; shift
        mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@"
    ' sh "$ROOT" "$@"
}

step 3 "QEMU (trixie-backports), kernel headers, gcc, binutils, make, busybox in the root"
# The stamp holds the package list, so adding a package re-runs the install.
ROOT_PKGS="qemu-system-x86 linux-headers-amd64 make binutils busybox-static"
if [ "$(cat "$ROOT/.vdevlab-pkgs" 2>/dev/null)" != "$ROOT_PKGS" ]; then
    in_root apt-get update -q >&2 || die "apt-get update failed inside $ROOT"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
        -t trixie-backports $ROOT_PKGS >&2 \
        || die "apt-get install inside $ROOT failed (QEMU and headers must both come from trixie-backports)"
    echo "$ROOT_PKGS" > "$ROOT/.vdevlab-pkgs"
else
    say "cached"
fi

QEMU=$ROOT/usr/bin/qemu-system-x86_64
[ -x "$QEMU" ] || die "no qemu-system-x86_64 in $ROOT; remove $ROOT/.vdevlab-pkgs and re-run"
HEADERS=$(cd "$ROOT/usr/src" && ls -d linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$HEADERS" ] || die "no linux-headers-*-amd64 in $ROOT/usr/src"
KREL=${HEADERS#linux-headers-}

step 4 "guest kernel $KREL"
KDIR=$CACHE/kernels/$KREL
if [ ! -f "$KDIR/.vdevlab-kernel-$STAMP_VERSION" ]; then
    rm -rf "$KDIR" "$ROOT/var/tmp/vdevlab-dl" && mkdir -p "$ROOT/var/tmp/vdevlab-dl"
    # Newer Debian kernels split the image: linux-binary-* holds vmlinuz and
    # linux-base-* the config; older ones ship linux-image-*(-unsigned).
    got=""
    for pkgs in "linux-binary-$KREL linux-base-$KREL" "linux-image-$KREL-unsigned" "linux-image-$KREL"; do
        if in_root sh -c "cd /var/tmp/vdevlab-dl && apt-get download -q -t trixie-backports $pkgs" >&2; then
            got=$pkgs; break
        fi
    done
    [ -n "$got" ] || die "could not download the linux-image for $KREL from trixie-backports"
    mkdir -p "$KDIR/pkg"
    for deb in "$ROOT"/var/tmp/vdevlab-dl/*.deb; do dpkg -x "$deb" "$KDIR/pkg"; done
    rm -rf "$ROOT/var/tmp/vdevlab-dl"
    vmlinuz=$(find "$KDIR/pkg" \( -name "vmlinuz-$KREL" -o -path "*/modules/$KREL/vmlinuz" \) | head -n 1)
    config=$(find "$KDIR/pkg" \( -name "config-$KREL" -o -path "*/modules/$KREL/config" \) | head -n 1)
    [ -n "$vmlinuz" ] || die "no vmlinuz-$KREL in the packages $got"
    cp "$vmlinuz" "$KDIR/vmlinuz"
    [ -n "$config" ] && cp "$config" "$KDIR/config"
    rm -rf "$KDIR/pkg"
    touch "$KDIR/.vdevlab-kernel-$STAMP_VERSION"
else
    say "cached"
fi

step 5 "checking QEMU and writing $CACHE/lab.env"
QVER=$(in_root /usr/bin/qemu-system-x86_64 --version | head -n 1)
in_root /usr/bin/qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"' \
    || die "QEMU in $ROOT ($QVER) has no vhost-user-test-device-pci: QEMU 10.2+ needed"
cat > "$CACHE/lab.env.tmp" <<ENV
VDEVLAB_ROOT=$ROOT
VDEVLAB_QEMU=/usr/bin/qemu-system-x86_64
VDEVLAB_QEMU_VERSION=$QVER
VDEVLAB_KERNEL_RELEASE=$KREL
VDEVLAB_KERNEL=$KDIR/vmlinuz
VDEVLAB_KERNEL_HEADERS=/usr/src/$HEADERS
VDEVLAB_BUSYBOX=$ROOT/usr/bin/busybox
ENV
mv "$CACHE/lab.env.tmp" "$CACHE/lab.env"
say "ready: $QVER, guest kernel $KREL"
