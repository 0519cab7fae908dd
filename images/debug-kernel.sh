#!/usr/bin/env bash
# Build the lab's debug guest kernel from Debian's linux-source-* and list it
# in lab.env as the third guest kernel, `debug` (opt-in: nothing builds it
# unless you run this script; CI never does).
#
#   $VDEVLAB_CACHE/debug-kernel/linux-source-<v>/   the kernel tree, built
#                       in place (bzImage + modules_prepare): the driver is
#                       built against it with `make -C <tree> M=<dir>`
#   $VDEVLAB_CACHE/debug-kernel/vmlinuz             the image
#   $VDEVLAB_CACHE/debug-kernel/config              its .config
#   $VDEVLAB_CACHE/debug-kernel/lab.env             its VDEVLAB_KERNEL_DEBUG_*
#                       keys; provision.sh and this script merge them into
#                       $VDEVLAB_CACHE/lab.env
#   $VDEVLAB_CACHE/debug-kernel/build-seconds       the build's wall time
#   $VDEVLAB_CACHE/debug-kernel/.vdevlab-debug-kernel   the stamp
#
# The kernel: x86_64_defconfig with the big subsystems the lab never uses
# switched off (DRM, sound, USB, wireless, netfilter, ...), everything the
# lab's guests need built in (virtio-pci, the serial console, initramfs,
# devtmpfs, aio, io_uring, pm_test, PCI hotplug, dynamic debug, ...), and the
# debug options: generic inline KASAN, PROVE_LOCKING, DEBUG_ATOMIC_SLEEP,
# DEBUG_LIST and the kernel's fault injection (failslab, fail_page_alloc,
# with their debugfs knobs). It is built inside the trixie root that
# images/provision.sh makes (its gcc-14, kbuild's host tools and apt; the
# cache bound in at its own path), and so is the driver for it.
#
# Needs: images/provision.sh run first (the trixie root and lab.env). The
# source is trixie's linux-source-6.12 (shared with the lab kernel), or
# VDEVLAB_DEBUG_SOURCE=linux-source-<v>. Runs as root or as any user. Two
# CPUs take about half an hour. Idempotent: a second run with the stamp in
# place only re-registers the kernel in lab.env.
set -euo pipefail

CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
DK=$CACHE/debug-kernel
# Bump when the config below changes: the kernel is then rebuilt.
STAMP_VERSION=2
JOBS=${VDEVLAB_DEBUG_JOBS:-$(nproc)}
# One line per step; apt's output goes to $CACHE/provision.log, make's to
# build.log (see images/lib/progress.sh; VDEVLAB_VERBOSE=1 streams apt's).
PROGRESS_TAG=debug-kernel
# shellcheck source-path=SCRIPTDIR source=lib/progress.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/progress.sh"
step() { step_begin "($1/6) $2"; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$CACHE/trixie-root

[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
{ [ -f "$CACHE/lab.env" ] && [ -f "$ROOT/usr/bin/make" ]; } || die "no $CACHE/lab.env or trixie root: run images/provision.sh first (the debug kernel is built in the lab's root, and its guests use the lab's QEMU and busybox)"
in_root() { "$HERE/in-root.sh" "$ROOT" "$CACHE:$CACHE" -- "$@"; }
mkdir -p "$DK"

# One build at a time.
exec 9>"$DK/.lock"
flock -n 9 || die "another debug-kernel.sh is running (lock $DK/.lock); wait for it"

# The lab.env merge, shared with provision.sh: add `debug` to
# VDEVLAB_KERNELS and (re)place the VDEVLAB_KERNEL_DEBUG_* keys.
register() {
    local env=$CACHE/lab.env
    # Under provision.sh's lock, which rewrites lab.env on every run.
    exec 8>"$CACHE/.provision.lock"
    flock 8
    {
        grep -v '^VDEVLAB_KERNEL_DEBUG_' "$env" | sed '/^VDEVLAB_KERNELS=/{/[=,]debug\(,\|$\)/!s/$/,debug/}'
        cat "$DK/lab.env"
    } > "$env.debug.tmp"
    mv "$env.debug.tmp" "$env"
    flock -u 8
    say "registered in $env: VDEVLAB_KERNELS=$(sed -n 's/^VDEVLAB_KERNELS=//p' "$env")"
}

step 1 "build dependencies (in the trixie root)"
in_root sh -c 'command -v gcc && command -v bison && command -v flex && command -v bc' >/dev/null \
    || die "the trixie root at $ROOT lacks gcc, bison, flex or bc: re-run images/provision.sh"
step_end "present"

step 2 "Debian kernel source"
SRC=${VDEVLAB_DEBUG_SOURCE:-linux-source-6.12}
VER=$(in_root apt-cache policy "$SRC" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
{ [ -n "$VER" ] && [ "$VER" != "(none)" ]; } || die "$SRC has no candidate version in the trixie root's apt (images/in-root.sh $ROOT -- apt-cache policy $SRC)"
WANT="$STAMP_VERSION $SRC $VER"

if [ "$(cat "$DK/.vdevlab-debug-kernel" 2>/dev/null)" = "$WANT" ] && [ -f "$DK/lab.env" ]; then
    step_end "$SRC $VER: kernel cached ($(sed -n 's/^VDEVLAB_KERNEL_DEBUG_RELEASE=//p' "$DK/lab.env"), built in $(cat "$DK/build-seconds" 2>/dev/null || echo '?') s)"
    step 6 "lab.env"
    step_end "done"
    register
    exit 0
fi
rm -f "$DK/.vdevlab-debug-kernel"

TREE=$DK/$SRC
if [ "$(cat "$TREE/.vdevlab-source" 2>/dev/null)" != "$SRC $VER" ]; then
    rm -rf "$TREE"
    # The tarball is cached once and shared with the lab kernel.
    _progress_clear
    tarball=$(bash "$(dirname "${BASH_SOURCE[0]}")/kernel-source.sh" "$SRC" "$VER") \
        || die "could not get the source tarball of $SRC $VER"
    run_logged "unpacking into $TREE" in_root tar -xJf "$tarball" -C "$DK" || die "could not unpack $tarball"
    [ -f "$TREE/Makefile" ] || die "no $TREE/Makefile after unpacking $SRC (the tarball's top folder is not $SRC?)"
    echo "$SRC $VER" > "$TREE/.vdevlab-source"
fi
step_end "$SRC $VER, unpacked ($TREE)"

step 3 "configuring (x86_64_defconfig + the lab's needs + debug options)"
cd "$TREE"
mk() { in_root make -C "$TREE" ARCH=x86_64 "$@"; }
run_logged "make x86_64_defconfig" mk -s x86_64_defconfig || die "make x86_64_defconfig failed in $TREE"
C() { scripts/config --file .config "$@"; }
# What the lab's guests need, built in.
ENABLE="PCI VIRTIO_MENU VIRTIO VIRTIO_PCI VIRTIO_CONSOLE TTY SERIAL_8250 SERIAL_8250_CONSOLE
  BLK_DEV_INITRD DEVTMPFS DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BINFMT_ELF BINFMT_SCRIPT
  MODULES MODULE_UNLOAD AIO IO_URING EPOLL SIGNALFD EVENTFD TIMERFD FHANDLE FUTEX
  SUSPEND PM_SLEEP PM_DEBUG PM_SLEEP_DEBUG HOTPLUG_PCI ACPI HOTPLUG_PCI_ACPI
  DYNAMIC_DEBUG HYPERVISOR_GUEST PARAVIRT PVH KVM_GUEST NUMA MEMFD_CREATE
  DEBUG_KERNEL DEBUG_FS DEBUG_FS_ALLOW_ALL MAGIC_SYSRQ DETECT_HUNG_TASK SOFTLOCKUP_DETECTOR
  KASAN KASAN_GENERIC KASAN_INLINE PROVE_LOCKING DEBUG_ATOMIC_SLEEP DEBUG_LIST
  FAULT_INJECTION FAILSLAB FAIL_PAGE_ALLOC FAULT_INJECTION_DEBUG_FS STACKTRACE"
# Big and useless here: off, for a shorter build (and no debug info).
DISABLE="DRM SOUND USB_SUPPORT WLAN WIRELESS CFG80211 MAC80211 RFKILL BT NETFILTER
  IPV6 ETHERNET NET_VENDOR_INTEL HID INPUT_JOYSTICK INPUT_TABLET INPUT_TOUCHSCREEN
  AGP FB FRAMEBUFFER_CONSOLE NFS_FS NETWORK_FILESYSTEMS MD ATA SCSI BLK_DEV_SD
  MACINTOSH_DRIVERS THERMAL HWMON WATCHDOG EFI KEXEC CRASH_DUMP HIBERNATION
  DEBUG_INFO DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT DEBUG_INFO_DWARF4 DEBUG_INFO_DWARF5 DEBUG_INFO_BTF
  KASAN_OUTLINE KASAN_SW_TAGS KASAN_HW_TAGS MODULE_SIG WERROR LOCALVERSION_AUTO"
# shellcheck disable=SC2086
for o in $ENABLE; do C --enable "$o"; done
# shellcheck disable=SC2086
for o in $DISABLE; do C --disable "$o"; done
C --enable DEBUG_INFO_NONE
C --set-str LOCALVERSION "-vdevlab-debug"
C --set-str SYSTEM_TRUSTED_KEYS "" --set-str SYSTEM_REVOCATION_KEYS ""
run_logged "make olddefconfig" mk -s olddefconfig || die "make olddefconfig failed in $TREE"
# Verify: olddefconfig silently drops what it cannot satisfy.
REQUIRED="PCI VIRTIO VIRTIO_PCI VIRTIO_CONSOLE SERIAL_8250_CONSOLE BLK_DEV_INITRD DEVTMPFS
  PROC_FS SYSFS MODULES MODULE_UNLOAD AIO IO_URING EPOLL SIGNALFD EVENTFD TIMERFD FHANDLE
  PM_SLEEP PM_DEBUG HOTPLUG_PCI HOTPLUG_PCI_ACPI DYNAMIC_DEBUG PVH DETECT_HUNG_TASK
  DEBUG_KERNEL KASAN KASAN_GENERIC KASAN_INLINE PROVE_LOCKING DEBUG_ATOMIC_SLEEP DEBUG_LIST
  FAULT_INJECTION FAILSLAB FAIL_PAGE_ALLOC FAULT_INJECTION_DEBUG_FS"
bad=""
for o in $REQUIRED; do grep -qx "CONFIG_$o=y" .config || bad="$bad $o"; done
[ -z "$bad" ] || die "after 'make olddefconfig' these are not =y in $TREE/.config:$bad (a missing dependency in $SRC? see 'make menuconfig' / scripts/config)"
# shellcheck disable=SC2086
step_end_as "verified: $(echo $REQUIRED | wc -w) options built in"

step 4 "building bzImage + modules_prepare with -j$JOBS (about half an hour on two CPUs; log: $DK/build.log)"
start=$(date +%s)
build() { mk -j"$JOBS" bzImage modules_prepare > "$DK/build.log" 2>&1; }
build_modules() { mk -j"$JOBS" modules >> "$DK/build.log" 2>&1; }
compiled() { echo "$(grep -c '^  CC ' "$DK/build.log" || true) files compiled"; }
if ! PROGRESS_DETAIL=compiled PROGRESS_TAIL_LOG=$DK/build.log run_logged "make" build; then
    die "the kernel build failed: see $DK/build.log"
fi
# Module.symvers lists vmlinux's exports for out-of-tree modules; `make
# vmlinux` writes it, older trees only in `make modules`.
if [ ! -s Module.symvers ]; then
    note "no Module.symvers after bzImage; building the in-tree modules for it"
    PROGRESS_DETAIL=compiled PROGRESS_TAIL_LOG=$DK/build.log run_logged "make modules (for Module.symvers)" build_modules \
        || die "make modules failed: see $DK/build.log"
fi
[ -s Module.symvers ] || die "no Module.symvers in $TREE: out-of-tree modules cannot be linked against it"
secs=$(( $(date +%s) - start ))
echo "$secs" > "$DK/build-seconds"
step_end_as "built in ${secs} s ($(( secs / 60 )) min $(( secs % 60 )) s)"

step 5 "installing the image"
REL=$(mk -s --no-print-directory kernelrelease)
[ -n "$REL" ] || die "make kernelrelease printed nothing in $TREE"
cp arch/x86/boot/bzImage "$DK/vmlinuz.tmp" && mv "$DK/vmlinuz.tmp" "$DK/vmlinuz"
cp .config "$DK/config"
{
    echo "VDEVLAB_KERNEL_DEBUG_RELEASE=$REL"
    echo "VDEVLAB_KERNEL_DEBUG_IMAGE=$DK/vmlinuz"
    echo "VDEVLAB_KERNEL_DEBUG_HEADERS=$TREE"
    echo "VDEVLAB_KERNEL_DEBUG_BUILD_ROOT=$ROOT"
    echo "VDEVLAB_KERNEL_DEBUG_BIND=$DK"
    echo "VDEVLAB_KERNEL_DEBUG_SPARSE=1"
    echo "VDEVLAB_KERNEL_DEBUG_MODULES="
} > "$DK/lab.env"
echo "$WANT" > "$DK/.vdevlab-debug-kernel"
step_end "done"

step 6 "lab.env"
step_end "done"
register
say "ready: debug kernel $REL ($SRC $VER), built in ${secs} s; run: ./vdevlab faults --kernel debug"
