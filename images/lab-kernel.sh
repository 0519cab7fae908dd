#!/usr/bin/env bash
# Build the lab kernel: a trimmed Linux from Debian's linux-source-6.12 with
# only what the lab's guests use (images/lab-kernel.config, merged over
# tinyconfig), for fast boots under TCG. images/provision.sh runs this and
# lists the result in lab.env as the guest kernel `lab`; it can also be run
# by itself (as root or any user) to (re)build it. Everything runs inside
# the trixie root that provision.sh makes (images/in-root.sh, the cache
# bound in at its own path): its gcc-14, kbuild's host tools and apt.
#
#   $VDEVLAB_CACHE/lab-kernel/linux-source-<v>/  the kernel tree, built in
#                       place (vmlinux, bzImage, modules_prepare): the
#                       driver is built against it, in the trixie root,
#                       with `make -C <tree> M=<dir> W=1 C=1`
#   $VDEVLAB_CACHE/lab-kernel/vmlinux    the ELF image QEMU boots by PVH
#   $VDEVLAB_CACHE/lab-kernel/vmlinuz    the bzImage (VDEVLAB_PVH=0)
#   $VDEVLAB_CACHE/lab-kernel/config     its .config
#   $VDEVLAB_CACHE/lab-kernel/lab.env    its VDEVLAB_KERNEL_LAB_* keys,
#                       which provision.sh copies into $VDEVLAB_CACHE/lab.env
#   $VDEVLAB_CACHE/lab-kernel/build-seconds   the build's wall time
#   $VDEVLAB_CACHE/lab-kernel/build.log       the build's output
#
# The source tarball is shared with the debug kernel (images/kernel-source.sh,
# $VDEVLAB_CACHE/sources/). The package is trixie's linux-source-6.12, or
# VDEVLAB_LAB_SOURCE; the config fragment is checked against that series. A
# rebuild happens when the package version, the fragment or STAMP_VERSION
# changes. Two CPUs take a few minutes.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
LK=$CACHE/lab-kernel
FRAGMENT=$HERE/lab-kernel.config
# Bump when the build steps below change: the kernel is then rebuilt.
STAMP_VERSION=2
SRC=${VDEVLAB_LAB_SOURCE:-linux-source-6.12}
JOBS=${VDEVLAB_LAB_JOBS:-$(nproc)}
# One line per step; apt's output goes to $CACHE/provision.log, make's to
# build.log (see images/lib/progress.sh; VDEVLAB_VERBOSE=1 streams apt's).
PROGRESS_TAG=lab-kernel
# shellcheck source-path=SCRIPTDIR source=lib/progress.sh
. "$HERE/lib/progress.sh"

ROOT=$CACHE/trixie-root
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
[ -f "$FRAGMENT" ] || die "no $FRAGMENT"
[ -f "$ROOT/usr/bin/make" ] || die "no trixie root with make at $ROOT: run images/provision.sh first"
in_root() { "$HERE/in-root.sh" "$ROOT" "$CACHE:$CACHE" -- "$@"; }
mkdir -p "$LK"
exec 6>"$LK/.lock"
flock 6
rm -f "$LK/.last-result"

# Asking apt for the candidate takes a second, and every test process
# provisions: reuse the last answer while the root's apt lists are unchanged.
fingerprint() {
    { echo "$SRC"; stat -c '%n %Y %s' "$ROOT"/var/lib/apt/lists/*_Packages* 2>/dev/null; } | md5sum | cut -d' ' -f1
}
fp=$(fingerprint)
VER=""
if [ -f "$LK/choice" ]; then
    read -r cfp cver < "$LK/choice" || true
    [ "${cfp:-}" = "$fp" ] && VER=${cver:-}
fi
if [ -z "$VER" ]; then
    VER=$(in_root apt-cache policy "$SRC" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
    { [ -n "$VER" ] && [ "$VER" != "(none)" ]; } \
        || die "the trixie root's apt has no $SRC (images/in-root.sh $ROOT -- apt-get update; or set VDEVLAB_LAB_SOURCE=linux-source-<v>)"
    echo "$fp $VER" > "$LK/choice"
fi
WANT="$STAMP_VERSION $SRC $VER $(md5sum < "$FRAGMENT" | cut -d' ' -f1)"
if [ "$(cat "$LK/.vdevlab-lab-kernel" 2>/dev/null)" = "$WANT" ] && [ -f "$LK/lab.env" ]; then
    result="cached ($(sed -n 's/^VDEVLAB_KERNEL_LAB_RELEASE=//p' "$LK/lab.env"), built in $(cat "$LK/build-seconds" 2>/dev/null || echo '?') s)"
    # provision.sh shows it on its own line for the lab kernel.
    echo "$result" > "$LK/.last-result"
    say "$result"
    exit 0
fi
rm -f "$LK/.vdevlab-lab-kernel"
say "building the lab kernel from $SRC $VER (a few minutes; log $LK/build.log)"

TREE=$LK/$SRC
if [ "$(cat "$TREE/.vdevlab-source" 2>/dev/null)" != "$SRC $VER" ]; then
    tarball=$(bash "$HERE/kernel-source.sh" "$SRC" "$VER")
    rm -rf "$TREE" "$LK/unpack.tmp" && mkdir -p "$LK/unpack.tmp"
    step_begin "unpacking $(basename "$tarball") (about a minute)"
    run_logged "tar -xJf" in_root tar -xJf "$tarball" -C "$LK/unpack.tmp" || die "could not unpack $tarball"
    step_end
    [ -f "$LK/unpack.tmp/$SRC/Makefile" ] || die "no $SRC/Makefile in $tarball"
    mv "$LK/unpack.tmp/$SRC" "$TREE"
    rm -rf "$LK/unpack.tmp"
    echo "$SRC $VER" > "$TREE/.vdevlab-source"
fi

step_begin "configuring: tinyconfig + $(basename "$FRAGMENT")"
cd "$TREE"
# The fragment, where the root sees it.
cp "$FRAGMENT" "$LK/fragment.config"
mk() { in_root make -C "$TREE" ARCH=x86_64 "$@"; }
run_logged "make tinyconfig" mk -s tinyconfig || die "make tinyconfig failed in $TREE"
# shellcheck disable=SC2016 # the inner shell's $1 and $2
run_logged "merge_config.sh" in_root sh -c 'cd "$1" && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "$2"' sh "$TREE" "$LK/fragment.config" \
    || die "merging $FRAGMENT failed"
run_logged "make olddefconfig" mk -s olddefconfig || die "make olddefconfig failed in $TREE"
# Verify: olddefconfig silently drops what it cannot satisfy.
bad=""; n=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            n=$((n + 1))
            grep -qxF "$line" .config || bad="$bad ${line%%=*}(want ${line#*=}, got $(sed -n "s/^${line%%=*}=//p" .config | grep . || echo unset))"
            ;;
        "# CONFIG_"*" is not set")
            n=$((n + 1))
            opt=${line#\# }; opt=${opt%% *}
            if grep -q "^$opt=" .config; then bad="$bad $opt(want unset, got $(sed -n "s/^$opt=//p" .config))"; fi
            ;;
    esac
done < "$FRAGMENT"
[ -z "$bad" ] || die "after 'make olddefconfig' these options differ from $FRAGMENT:$bad (a missing dependency in $SRC? see 'make menuconfig' in $TREE)"
step_end_as "verified: all $n options of $(basename "$FRAGMENT") as asked"

step_begin "building vmlinux, bzImage, modules_prepare and modules with -j$JOBS (log $LK/build.log)"
start=$(date +%s)
# make's output stays in build.log (it is not streamed, even when verbose).
# run_logged stops the build if this script is stopped (make passes SIGTERM
# on to its jobs) rather than leave it running unseen.
build() { mk -j"$JOBS" bzImage modules_prepare modules > "$LK/build.log" 2>&1; }
compiled() { echo "$(grep -c '^  CC ' "$LK/build.log" || true) files compiled"; }
if ! PROGRESS_DETAIL=compiled PROGRESS_TAIL_LOG=$LK/build.log run_logged "make" build; then
    die "the kernel build failed: see $LK/build.log"
fi
[ -s Module.symvers ] || die "no Module.symvers in $TREE after the build: out-of-tree modules cannot be linked against it"
secs=$(( $(date +%s) - start ))
echo "$secs" > "$LK/build-seconds"
step_end

REL=$(mk -s --no-print-directory kernelrelease)
[ -n "$REL" ] || die "make kernelrelease printed nothing in $TREE"
# XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU boots.
in_root readelf -n "$TREE/vmlinux" | grep -Eq 'Xen .*(0x00000012|PHYS32_ENTRY)' \
    || die "$TREE/vmlinux has no PVH entry note: is CONFIG_PVH=y?"
cp vmlinux "$LK/vmlinux.tmp" && mv "$LK/vmlinux.tmp" "$LK/vmlinux"
cp arch/x86/boot/bzImage "$LK/vmlinuz.tmp" && mv "$LK/vmlinuz.tmp" "$LK/vmlinuz"
cp .config "$LK/config"
{
    echo "VDEVLAB_KERNEL_LAB_RELEASE=$REL"
    echo "VDEVLAB_KERNEL_LAB_IMAGE=$LK/vmlinuz"
    echo "VDEVLAB_KERNEL_LAB_HEADERS=$TREE"
    echo "VDEVLAB_KERNEL_LAB_BUILD_ROOT=$ROOT"
    echo "VDEVLAB_KERNEL_LAB_BIND=$LK"
    echo "VDEVLAB_KERNEL_LAB_SPARSE=1"
    echo "VDEVLAB_KERNEL_LAB_MODULES="
} > "$LK/lab.env"
echo "$WANT" > "$LK/.vdevlab-lab-kernel"
say "ready: lab kernel $REL ($SRC $VER), built in ${secs} s"
