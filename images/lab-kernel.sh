#!/usr/bin/env bash
# Build the lab kernel, or one of its race-detector variants: a trimmed
# Linux from Debian's linux-source-6.12 with only what the lab's guests use
# (images/lab-kernel.config, merged over tinyconfig), for fast boots under
# TCG. images/provision.sh runs this and lists the result in lab.env as the
# guest kernel `lab`; it can also be run by itself (as root or any user) to
# (re)build it. Everything runs inside the trixie root that provision.sh
# makes (images/in-root.sh, the cache bound in at its own path): its gcc-14,
# kbuild's host tools and apt.
#
#   images/lab-kernel.sh [--variant lab|lockdep|kcsan] [--no-register]
#
# Variants: the lab fragment, then the variant's fragment merged after it
# (its lines win), each in a folder and a tree of its own:
#
#   lab       images/lab-kernel.config                  $VDEVLAB_CACHE/lab-kernel/
#   lockdep   + images/lab-kernel-lockdep.config         $VDEVLAB_CACHE/lockdep-kernel/
#             (PROVE_LOCKING, DEBUG_SPINLOCK, DEBUG_ATOMIC_SLEEP,
#             DEBUG_OBJECTS, DEBUG_LIST, fault injection, kmemleak off
#             unless kmemleak=on; provisioned by default)
#   kcsan     + images/lab-kernel-kcsan.config           $VDEVLAB_CACHE/kcsan-kernel/
#             (KCSAN, the data-race detector; opt-in)
#
# In the variant's folder ($VDEVLAB_CACHE/<variant>-kernel/):
#
#   linux-source-<v>/  the kernel tree, unpacked and built in place
#                       (vmlinux, bzImage, modules_prepare): the driver is
#                       built against it, in the trixie root, with
#                       `make -C <tree> M=<dir> W=1 C=1`
#   vmlinux    the ELF image QEMU boots by PVH
#   vmlinuz    the bzImage (VDEVLAB_PVH=0)
#   config     its .config
#   lab.env    its VDEVLAB_KERNEL_<VARIANT>_* keys
#   build-seconds   the build's wall time
#   build.log       the build's output
#
# Registering: unless --no-register (provision.sh, which writes lab.env
# itself, passes it), the kernel is then listed in $VDEVLAB_CACHE/lab.env
# (its name added to VDEVLAB_KERNELS, its keys replaced), so that
# `vdevlab ... --kernel <variant>` finds it; provision.sh keeps an opt-in
# kcsan kernel listed once it is built.
#
# The source tarball is shared with the debug kernel (images/kernel-source.sh,
# $VDEVLAB_CACHE/sources/). The package is trixie's linux-source-6.12, or
# VDEVLAB_LAB_SOURCE; the config fragments are checked against that series.
# A rebuild happens when the package version, a fragment or STAMP_VERSION
# changes. Two CPUs take a few minutes (the lab kernel) to a quarter of an
# hour (kcsan); README's guest-kernel section has the measured times.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
VARIANT=lab
REGISTER=1
while [ $# -gt 0 ]; do
    case $1 in
        --variant) [ $# -ge 2 ] || { echo "lab-kernel.sh: --variant needs a name (lab, lockdep, kcsan)" >&2; exit 2; }
            VARIANT=$2; shift 2 ;;
        --variant=*) VARIANT=${1#--variant=}; shift ;;
        --no-register) REGISTER=""; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "lab-kernel.sh: unknown argument '$1' (usage: images/lab-kernel.sh [--variant lab|lockdep|kcsan] [--no-register])" >&2; exit 2 ;;
    esac
done
# The fragments, in merge order, and what the variant is called in lab.env.
FRAGMENTS=("$HERE/lab-kernel.config")
case $VARIANT in
    lab) ;;
    lockdep | kcsan) FRAGMENTS+=("$HERE/lab-kernel-$VARIANT.config") ;;
    *) echo "lab-kernel.sh: unknown variant '$VARIANT' (known: lab, lockdep, kcsan)" >&2; exit 2 ;;
esac
KEY=$(echo "$VARIANT" | tr '[:lower:]' '[:upper:]')
LK=$CACHE/$VARIANT-kernel
# Bump when the build steps below change: the kernels are then rebuilt.
STAMP_VERSION=2
SRC=${VDEVLAB_LAB_SOURCE:-linux-source-6.12}
JOBS=${VDEVLAB_LAB_JOBS:-$(nproc)}
# One line per step; apt's output goes to $CACHE/provision.log, make's to
# build.log (see images/lib/progress.sh; VDEVLAB_VERBOSE=1 streams apt's).
PROGRESS_TAG=$VARIANT-kernel
# shellcheck source-path=SCRIPTDIR source=lib/progress.sh
. "$HERE/lib/progress.sh"

ROOT=$CACHE/trixie-root
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
for f in "${FRAGMENTS[@]}"; do [ -f "$f" ] || die "no $f"; done
[ -f "$ROOT/usr/bin/make" ] || die "no trixie root with make at $ROOT: run images/provision.sh first"
in_root() { "$HERE/in-root.sh" "$ROOT" "$CACHE:$CACHE" -- "$@"; }
mkdir -p "$LK"
exec 6>"$LK/.lock"
flock 6
rm -f "$LK/.last-result"

# The variant's lab.env keys, from the tree's release: rewritten on every
# run, so that a cache copied or moved elsewhere names its own paths.
write_env() { # write_env <release>
    {
        echo "VDEVLAB_KERNEL_${KEY}_RELEASE=$1"
        echo "VDEVLAB_KERNEL_${KEY}_IMAGE=$LK/vmlinuz"
        echo "VDEVLAB_KERNEL_${KEY}_HEADERS=$LK/$SRC"
        echo "VDEVLAB_KERNEL_${KEY}_BUILD_ROOT=$ROOT"
        echo "VDEVLAB_KERNEL_${KEY}_BIND=$LK"
        echo "VDEVLAB_KERNEL_${KEY}_SPARSE=1"
        echo "VDEVLAB_KERNEL_${KEY}_MODULES="
    } > "$LK/lab.env.tmp"
    mv "$LK/lab.env.tmp" "$LK/lab.env"
}
# Add the variant to $CACHE/lab.env (VDEVLAB_KERNELS and its keys), under
# provision.sh's lock, which rewrites lab.env on every run. This kernel's
# lock is released first: provision.sh takes its own lock and then this
# script's (running it for the default kernels), so holding both here
# would deadlock with a provisioning started meanwhile.
register() {
    local env=$CACHE/lab.env
    exec 6>&-
    [ -n "$REGISTER" ] || return 0
    [ -f "$env" ] || { say "no $env yet: run images/provision.sh to list this kernel"; return 0; }
    exec 8>"$CACHE/.provision.lock"
    flock 8
    {
        grep -v "^VDEVLAB_KERNEL_${KEY}_" "$env" | sed "/^VDEVLAB_KERNELS=/{/[=,]$VARIANT\(,\|\$\)/!s/\$/,$VARIANT/}"
        cat "$LK/lab.env"
    } > "$env.$VARIANT.tmp"
    mv "$env.$VARIANT.tmp" "$env"
    flock -u 8
    say "registered in $env as '$VARIANT': VDEVLAB_KERNELS=$(sed -n 's/^VDEVLAB_KERNELS=//p' "$env")"
}

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
# (For the lab kernel this is the sum of its one fragment, as before the
# variants: an existing lab kernel stays cached.)
WANT="$STAMP_VERSION $SRC $VER $(cat "${FRAGMENTS[@]}" | md5sum | cut -d' ' -f1)"
if [ "$(cat "$LK/.vdevlab-lab-kernel" 2>/dev/null)" = "$WANT" ] && [ -f "$LK/lab.env" ]; then
    REL=$(sed -n "s/^VDEVLAB_KERNEL_${KEY}_RELEASE=//p" "$LK/lab.env")
    [ -n "$REL" ] || die "$LK/lab.env names no release: remove $LK/.vdevlab-lab-kernel and re-run to rebuild"
    write_env "$REL"
    result="cached ($REL, built in $(cat "$LK/build-seconds" 2>/dev/null || echo '?') s)"
    # provision.sh shows it on its own line for the kernel.
    echo "$result" > "$LK/.last-result"
    say "$result"
    register
    exit 0
fi
rm -f "$LK/.vdevlab-lab-kernel"
say "building the $VARIANT kernel from $SRC $VER (a few minutes; log $LK/build.log)"

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

names=""
for f in "${FRAGMENTS[@]}"; do names="${names:+$names + }$(basename "$f")"; done
step_begin "configuring: tinyconfig + $names"
cd "$TREE"
# The fragments, where the root sees them.
copies=()
i=0
for f in "${FRAGMENTS[@]}"; do
    i=$((i + 1))
    cp "$f" "$LK/fragment-$i.config"
    copies+=("$LK/fragment-$i.config")
done
mk() { in_root make -C "$TREE" ARCH=x86_64 "$@"; }
run_logged "make tinyconfig" mk -s tinyconfig || die "make tinyconfig failed in $TREE"
# Later fragments override earlier ones (merge_config.sh notes it in the log).
# shellcheck disable=SC2016 # the inner shell's $1
run_logged "merge_config.sh" in_root sh -c 'cd "$1" && shift && ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config "$@"' sh "$TREE" "${copies[@]}" \
    || die "merging ${FRAGMENTS[*]} failed"
run_logged "make olddefconfig" mk -s olddefconfig || die "make olddefconfig failed in $TREE"
# Verify: olddefconfig silently drops what it cannot satisfy. Every option
# of every fragment, with the value of the last fragment that sets it.
declare -A want_val=() want_from=()
order=()
for f in "${FRAGMENTS[@]}"; do
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) opt=${line%%=*}; val=${line#*=} ;;
            "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}; val="" ;;
            *) continue ;;
        esac
        [ -n "${want_from[$opt]+set}" ] || order+=("$opt")
        want_val[$opt]=$val
        want_from[$opt]=$(basename "$f")
    done < "$f"
done
bad=""
for opt in "${order[@]}"; do
    val=${want_val[$opt]}
    got=$(sed -n "s/^$opt=//p" .config)
    if [ -n "$val" ]; then
        [ "$got" = "$val" ] || bad="$bad $opt(want $val from ${want_from[$opt]}, got ${got:-unset})"
    elif [ -n "$got" ]; then
        bad="$bad $opt(want unset from ${want_from[$opt]}, got $got)"
    fi
done
[ -z "$bad" ] || die "after 'make olddefconfig' these options differ from the fragments:$bad (a missing dependency in $SRC? see 'make menuconfig' in $TREE)"
step_end_as "verified: all ${#order[@]} options of $names as asked"

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
write_env "$REL"
echo "$WANT" > "$LK/.vdevlab-lab-kernel"
say "ready: $VARIANT kernel $REL ($SRC $VER), built in ${secs} s"
register
