#!/usr/bin/env bash
# Provision the vdevlab lab toolchain from Debian's packages, into a cache
# folder outside git:
#
#   $VDEVLAB_CACHE/trixie-root      Debian trixie root with QEMU >= 10.2 from
#                                   trixie-backports, gcc-14, make, kernel
#                                   headers, sparse, perl, the kernel build
#                                   dependencies and busybox-static
#   $VDEVLAB_CACHE/bookworm-root    Debian bookworm root with gcc-12, sparse
#                                   and the 6.1 kernel's headers (only when
#                                   the bookworm kernel is wanted)
#   $VDEVLAB_CACHE/kernels/<rel>/   one folder per guest kernel: vmlinuz,
#                                   vmlinux, config, and the modules to load
#                                   before the driver (modules/, in order)
#   $VDEVLAB_CACHE/lab.env          what the Rust harness reads
#
# Every compiler, checker and package tool runs inside those roots
# (images/in-root.sh, with the cache bound in at its own path), never on the
# host: the host needs Linux x86_64 with user namespaces, mmdebstrap,
# util-linux (unshare, flock) and, as an ordinary user, newuidmap (uidmap).
#
# Guest kernels (the matrix; VDEVLAB_KERNELS picks a subset, default
# trixie,bookworm,lab,lockdep; kcsan only when listed):
#
#   trixie    trixie-backports' current kernel; virtio built in; the driver
#             is built inside the trixie root (gcc-14, like the kernel)
#   bookworm  Debian bookworm's 6.1 kernel (the newest 6.1.0-N ABI the
#             bookworm root's apt offers when it is made, or
#             VDEVLAB_BOOKWORM_ABI=N); virtio is modular; the driver is built
#             inside the bookworm root, whose gcc-12 is the kernel's own
#             compiler, with sparse
#   lab       the trimmed lab kernel, built here from Debian's
#             linux-source-6.12 by images/lab-kernel.sh (a few minutes,
#             once, in the trixie root); fast boots; the driver is built
#             against its tree there, with sparse
#   lockdep   the lab kernel with the lock and object checkers
#             (PROVE_LOCKING, DEBUG_SPINLOCK, DEBUG_ATOMIC_SLEEP,
#             DEBUG_OBJECTS, DEBUG_LIST), fault injection and kmemleak
#             (off unless kmemleak=on): images/lab-kernel.sh --variant
#             lockdep, in a tree of its own (a few minutes more, once)
#   kcsan     the lab kernel with KCSAN, the data-race detector
#             (images/lab-kernel.sh --variant kcsan): opt-in, built only
#             when VDEVLAB_KERNELS names it, and kept listed once built
#
# Idempotent: every step leaves a stamp, and a second run with everything
# cached only checks the stamps.  Runs as root or as any user (see below).
set -euo pipefail

CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
ROOT=$CACHE/trixie-root
STAMP_VERSION=1
# One line per step; the commands' output goes to $CACHE/provision.log
# (VDEVLAB_VERBOSE=1: to stderr too). See images/lib/progress.sh.
export PROGRESS_TAG=provision
# shellcheck source-path=SCRIPTDIR source=lib/progress.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/progress.sh"
step() { step_begin "($1/11) $2"; }

# As root: mmdebstrap and chroot as usual, and missing host packages are
# installed. As any other user: the same through user namespaces
# (mmdebstrap --mode=unshare, images/in-root.sh); missing host packages are
# named instead (the README's host prerequisites).
ROOTLESS=""; [ "$(id -u)" -eq 0 ] || ROOTLESS=1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
KERNELS=${VDEVLAB_KERNELS:-trixie,bookworm,lab,lockdep}
case ",$KERNELS," in *,trixie,*) ;; *) die "VDEVLAB_KERNELS=$KERNELS: trixie (the default kernel) must be in the list" ;; esac
for k in ${KERNELS//,/ }; do
    case "$k" in trixie|bookworm|lab|lockdep|kcsan) ;; *) die "VDEVLAB_KERNELS=$KERNELS: unknown kernel '$k' (known: trixie, bookworm, lab, lockdep, kcsan)" ;; esac
done
want_kernel() { case ",$KERNELS," in *,"$1",*) return 0 ;; esac; return 1; }
mkdir -p "$CACHE"

# One provisioner at a time: tests running in parallel may all ask for it.
exec 9>"$CACHE/.provision.lock"
flock 9
# Keep the log from growing forever: one previous generation.
if [ "$(stat -c %s "$PROGRESS_LOG" 2>/dev/null || echo 0)" -gt 20000000 ]; then
    mv "$PROGRESS_LOG" "$PROGRESS_LOG.old"
fi

mirror() { # mirror <debian|debian-security>: the one this machine uses, as LAB-FACTS asks
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m=$(awk -v want="$1" '/^URIs:/ { for (i = 2; i <= NF; i++) { n = split($i, p, "/"); if (p[n] == want || (p[n] == "" && p[n-1] == want)) { print $i; exit } } }' /etc/apt/sources.list.d/debian.sources)
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m=$(awk -v want="$1" '$1 == "deb" { n = split($2, p, "/"); if (p[n] == want || (p[n] == "" && p[n-1] == want)) { print $2; exit } }' /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/$1}"
}
MIRROR=${VDEVLAB_MIRROR:-$(mirror debian)}
SECURITY=${VDEVLAB_SECURITY_MIRROR:-$(mirror debian-security)}

host_pkg() { # host_pkg <command> <package>
    command -v "$1" >/dev/null 2>&1 && return 0
    [ -z "$ROOTLESS" ] || die "$1 is missing: install the host package '$2' (the README lists the host prerequisites for Debian, Ubuntu, Fedora and Arch)"
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing: install the host package '$2' (the README lists the host prerequisites)"
    host_pkg_install "$2"
}
host_pkg_install() { # host_pkg_install <package>: as root, with the host's apt
    if [ -z "${apt_updated:-}" ]; then
        run_logged "apt-get update (host)" apt-get update -q || die "apt-get update failed on the host"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive run_logged "installing host package $1" \
        apt-get install -y -q --no-install-recommends "$1" \
        || die "could not install '$1' on the host: apt-get install $1"
}

step 1 "host tools (mmdebstrap, unshare, flock, Debian's archive keyring)"
host_pkg mmdebstrap mmdebstrap
host_pkg unshare util-linux
host_pkg flock util-linux
if [ -n "$ROOTLESS" ]; then
    # mmdebstrap --mode=unshare maps a range of subordinate ids.
    host_pkg newuidmap uidmap
    me=$(id -un)
    for f in /etc/subuid /etc/subgid; do
        grep -q "^$me:" "$f" 2>/dev/null || grep -q "^$(id -u):" "$f" 2>/dev/null \
            || die "$me has no subordinate id range in $f, which mmdebstrap --mode=unshare needs: as root, usermod --add-subuids 100000-165535 --add-subgids 100000-165535 $me"
    done
    err=$(unshare --user --map-root-user true 2>&1) \
        || die "this user cannot make a user namespace ($err): allow unprivileged user namespaces (sysctl user.max_user_namespaces=10000; on older Debian kernels kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0), or run as root"
fi
# Debian's archive keyring, which mmdebstrap verifies the mirror with: on
# Debian in apt's trusted.gpg.d, elsewhere where the distribution's
# package puts it (Ubuntu's and Arch's debian-archive-keyring, Fedora's
# debian-keyring or distribution-gpg-keys), passed on with --keyring.
KEYRING=()
keyring() {
    local k
    if compgen -G '/etc/apt/trusted.gpg.d/debian-archive-*' >/dev/null; then return 0; fi
    for k in /usr/share/keyrings/debian-archive-keyring.gpg /usr/share/keyrings/debian-archive-keyring.pgp \
        /usr/share/distribution-gpg-keys/debian; do
        [ -e "$k" ] && { KEYRING=(--keyring="$k"); return 0; }
    done
    return 1
}
if ! keyring; then
    [ -n "$ROOTLESS" ] || ! command -v apt-get >/dev/null 2>&1 || host_pkg_install debian-archive-keyring
    keyring || die "Debian's archive keyring is missing: install the host package debian-archive-keyring (Fedora: debian-keyring)"
fi
step_end "present"

# make_root DIR SUITE TARGET "PACKAGES" SOURCE...: a Debian SUITE root at
# DIR with PACKAGES installed (from the TARGET release, e.g. a backports
# suite; empty for the default). Stamps: .vdevlab-root-N (made) and
# .vdevlab-pkgs (the packages and sources), so a changed list re-runs apt
# in the existing root.
make_root() {
    local dir=$1 suite=$2 target=$3 pkgs=$4 want t
    shift 4
    want="$pkgs | $*"
    t=""; [ -z "$target" ] || t="-t $target"
    if [ ! -f "$dir/.vdevlab-root-$STAMP_VERSION" ]; then
        rm -rf "$dir.tmp" "$dir.tar"
        # The packages go in from a hook, which (unlike --include) can pick
        # the target release. The apt lists stay, for later downloads.
        local hook="chroot \"\$1\" apt-get install -y -q --no-install-recommends $t $pkgs"
        if [ -z "$ROOTLESS" ]; then
            run_logged "mmdebstrap $suite from $MIRROR, with $pkgs" \
                mmdebstrap --variant=apt --skip=cleanup/apt/lists "${KEYRING[@]}" --customize-hook="$hook" \
                "$suite" "$dir.tmp" "$@" \
                || die "mmdebstrap failed (see the log); check that $MIRROR serves $suite"
        else
            # In mmdebstrap's own user namespace (all of the subordinate
            # ids mapped) packages install as on a real root; the result is
            # a tarball that this user unpacks, owning every file, so that
            # later runs need only a user namespace mapping this user
            # (images/in-root.sh). apt then cannot switch to its _apt user.
            run_logged "mmdebstrap --mode=unshare $suite from $MIRROR, with $pkgs" \
                mmdebstrap --mode=unshare --variant=apt --skip=cleanup/apt/lists "${KEYRING[@]}" --customize-hook="$hook" \
                "$suite" "$dir.tar" "$@" \
                || die "mmdebstrap --mode=unshare failed (see the log); check that $MIRROR serves $suite, and that newuidmap (package uidmap) and this user's /etc/subuid range work"
            mkdir -p "$dir.tmp"
            # Device nodes cannot be made here; /dev is bound in at run time.
            run_logged "unpacking the root" tar -C "$dir.tmp" --no-same-owner --exclude='./dev/*' -xf "$dir.tar" \
                || die "could not unpack $dir.tar"
            rm -f "$dir.tar"
            echo 'APT::Sandbox::User "root";' > "$dir.tmp/etc/apt/apt.conf.d/99vdevlab-rootless"
        fi
        echo "$want" > "$dir.tmp/.vdevlab-pkgs"
        rm -rf "$dir"
        mv "$dir.tmp" "$dir"
        touch "$dir/.vdevlab-root-$STAMP_VERSION"
        return 0
    fi
    [ "$(cat "$dir/.vdevlab-pkgs" 2>/dev/null)" != "$want" ] || return 0
    # An older root: new sources or packages.
    printf '%s\n' "$@" > "$dir/etc/apt/sources.list"
    run_logged "apt-get update" "$HERE/in-root.sh" "$dir" -- apt-get update -q \
        || die "apt-get update failed inside $dir"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive run_logged "apt-get install $pkgs" \
        "$HERE/in-root.sh" "$dir" -- apt-get install -y -q --no-install-recommends $t $pkgs \
        || die "apt-get install inside $dir failed"
    echo "$want" > "$dir/.vdevlab-pkgs"
}

# in_root / in_bw: run a command inside the trixie / bookworm root (a
# private mount namespace, and a user namespace when not root, so /proc and
# /dev in the root vanish with it), with the cache bound in at its own path:
# host paths under $CACHE mean the same inside.
in_root() { "$HERE/in-root.sh" "$ROOT" "$CACHE:$CACHE" -- "$@"; }

# The trixie root's packages: QEMU, the trixie kernel's headers and
# compiler, the lab and debug kernels' build dependencies, sparse, perl (for
# checkpatch.pl), the decompressors and binutils for the vmlinux images.
ROOT_PKGS="qemu-system-x86 linux-headers-amd64 gcc make libc6-dev binutils busybox-static bc bison flex libelf-dev libssl-dev sparse kmod cpio xz-utils zstd perl python3"
step 2 "Debian trixie root: QEMU (trixie-backports), kernel headers, gcc-14, sparse, build tools ($ROOT)"
make_root "$ROOT" trixie trixie-backports "$ROOT_PKGS" \
    "deb $MIRROR trixie main" "deb $MIRROR trixie-updates main" \
    "deb $SECURITY trixie-security main" "deb $MIRROR trixie-backports main"
step_end

QEMU=$ROOT/usr/bin/qemu-system-x86_64
[ -x "$QEMU" ] || die "no qemu-system-x86_64 in $ROOT; remove $ROOT/.vdevlab-pkgs and re-run"
HEADERS=$(cd "$ROOT/usr/src" && ls -d linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$HEADERS" ] || die "no linux-headers-*-amd64 in $ROOT/usr/src"
KREL=${HEADERS#linux-headers-}

# dl_unpack DIR ROOT_CMD PACKAGE...: apt-get download the first PACKAGE
# that exists (each a list of packages) into DIR/debs, unpacked into DIR/pkg.
dl_unpack() {
    local dir=$1 cmd=$2 pkgs deb
    shift 2
    rm -rf "$dir/debs" "$dir/pkg" && mkdir -p "$dir/debs" "$dir/pkg"
    for pkgs in "$@"; do
        # shellcheck disable=SC2086
        if run_logged "apt-get download $pkgs" $cmd sh -c 'cd "$1" && shift && apt-get download -q "$@"' sh "$dir/debs" $pkgs; then
            for deb in "$dir"/debs/*.deb; do
                $cmd dpkg -x "$deb" "$dir/pkg" || die "dpkg -x $deb failed"
            done
            rm -rf "$dir/debs"
            return 0
        fi
        rm -f "$dir"/debs/*.deb
    done
    return 1
}

step 3 "trixie guest kernel $KREL"
KDIR=$CACHE/kernels/$KREL
if [ ! -f "$KDIR/.vdevlab-kernel-$STAMP_VERSION" ]; then
    rm -rf "$KDIR" && mkdir -p "$KDIR"
    # Newer Debian kernels split the image: linux-binary-* holds vmlinuz and
    # linux-base-* the config; older ones ship linux-image-*(-unsigned).
    dl_unpack "$KDIR" in_root "-t trixie-backports linux-binary-$KREL linux-base-$KREL" \
        "-t trixie-backports linux-image-$KREL-unsigned" "-t trixie-backports linux-image-$KREL" \
        || die "could not download the linux-image for $KREL from trixie-backports"
    vmlinuz=$(find "$KDIR/pkg" \( -name "vmlinuz-$KREL" -o -path "*/modules/$KREL/vmlinuz" \) | head -n 1)
    config=$(find "$KDIR/pkg" \( -name "config-$KREL" -o -path "*/modules/$KREL/config" \) | head -n 1)
    [ -n "$vmlinuz" ] || die "no vmlinuz-$KREL in the kernel packages for $KREL"
    cp "$vmlinuz" "$KDIR/vmlinuz"
    [ -n "$config" ] && cp "$config" "$KDIR/config"
    rm -rf "$KDIR/pkg"
    touch "$KDIR/.vdevlab-kernel-$STAMP_VERSION"
fi
step_end

# The bookworm 6.1 kernel, from a bookworm root of its own: the headers are
# installed there (with the kernel's own compiler, gcc-12, and sparse; the
# driver is built there), the image and the modules virtio-pci needs
# (virtio is modular in 6.1) are unpacked into the cache.
BWROOT=$CACHE/bookworm-root
BW_WANT_MODULES=${VDEVLAB_BOOKWORM_MODULES:-virtio_pci}
# Modules the benchmark needs besides the driver's preloads
# (virtio_console, for the virtio-serial baseline of `vdevlab bench`): the
# harness adds them to the initramfs, after the preloads, when it finds them
# in modules/ (they stay out of modules/order).
BW_EXTRA=${VDEVLAB_BOOKWORM_EXTRA_MODULES:-virtio_console}
BW_REL=""; BW_DIR=""; BW_MODULES=""
in_bw() { "$HERE/in-root.sh" "$BWROOT" "$CACHE:$CACHE" -- "$@"; }

if want_kernel bookworm; then
    step 4 "Debian bookworm root: gcc-12, sparse, the 6.1 kernel's headers ($BWROOT)"
    bw_headers=linux-headers-amd64
    [ -z "${VDEVLAB_BOOKWORM_ABI:-}" ] || bw_headers=linux-headers-6.1.0-$VDEVLAB_BOOKWORM_ABI-amd64
    make_root "$BWROOT" bookworm "" "gcc-12 make libc6-dev sparse kmod $bw_headers" \
        "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY bookworm-security main"
    step_end

    BW_HDR=$(cd "$BWROOT/usr/src" && ls -d linux-headers-6.1.0-*-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$BW_HDR" ] || die "no linux-headers-6.1.0-*-amd64 in $BWROOT/usr/src"
    BW_REL=${BW_HDR#linux-headers-}
    BW_DIR=$CACHE/kernels/$BW_REL
    step 5 "bookworm guest kernel $BW_REL and its modules ($BW_WANT_MODULES; $BW_EXTRA)"
    ver=$(in_bw dpkg-query -W -f '${Version}' "linux-headers-$BW_REL") \
        || die "linux-headers-$BW_REL is not installed in $BWROOT"
    bw_stamp="$STAMP_VERSION $ver $BW_WANT_MODULES $BW_EXTRA"
    if [ "$(cat "$BW_DIR/.vdevlab-bookworm" 2>/dev/null)" != "$bw_stamp" ]; then
        tmp=$BW_DIR.tmp
        rm -rf "$tmp" && mkdir -p "$tmp/modules"
        # The image of the headers' version (unsigned where there is one).
        dl_unpack "$tmp" in_bw "linux-image-$BW_REL-unsigned=$ver" "linux-image-$BW_REL=$ver" \
            || die "could not download linux-image-$BW_REL=$ver in $BWROOT (apt-get update there, or remove $BWROOT to make it anew)"
        [ -f "$tmp/pkg/boot/vmlinuz-$BW_REL" ] || die "no boot/vmlinuz-$BW_REL in linux-image-$BW_REL"
        cp "$tmp/pkg/boot/vmlinuz-$BW_REL" "$tmp/vmlinuz"
        cp "$tmp/pkg/boot/config-$BW_REL" "$tmp/config" 2>/dev/null || true
        kcc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$BWROOT/usr/src/$BW_HDR/include/config/auto.conf")
        hcc=$(in_bw gcc-12 --version | head -n 1)
        [ "$kcc" = "$hcc" ] || say "note: $BW_REL was built with '$kcc', the bookworm root has '$hcc'"
        find_mod() { # find_mod <name>: its .ko in the image package
            find "$tmp/pkg/lib/modules/$BW_REL" \( -name "$1.ko" -o -name "${1//_/-}.ko" \) | head -n 1
        }
        # The modules virtio-pci needs, dependencies first.
        order=""
        add_mod() {
            case " $order " in *" $1 "*) return 0 ;; esac
            local f d
            f=$(find_mod "$1")
            [ -n "$f" ] || die "module $1 is not in linux-image-$BW_REL (is it built in? then drop it from VDEVLAB_BOOKWORM_MODULES)"
            for d in $(in_bw modinfo -F depends "$f" | tr ',' ' '); do add_mod "$d"; done
            cp "$f" "$tmp/modules/$1.ko"
            order="$order $1"
        }
        for m in ${BW_WANT_MODULES//,/ }; do add_mod "$m"; done
        printf '%s\n' $order > "$tmp/modules/order"
        note "modules to load before the driver:$order"
        for m in ${BW_EXTRA//,/ }; do
            f=$(find_mod "$m")
            [ -n "$f" ] || die "module $m is not in linux-image-$BW_REL (built in? then drop it from VDEVLAB_BOOKWORM_EXTRA_MODULES)"
            for d in $(in_bw modinfo -F depends "$f" | tr ',' ' '); do
                [ -f "$tmp/modules/$d.ko" ] || die "module $m needs $d, which is not preloaded; add it to VDEVLAB_BOOKWORM_MODULES"
            done
            cp "$f" "$tmp/modules/$m.ko"
        done
        rm -rf "$tmp/pkg" "$BW_DIR"
        mv "$tmp" "$BW_DIR"
        echo "$bw_stamp" > "$BW_DIR/.vdevlab-bookworm"
    fi
    BW_MODULES=$(sed "s|^\(.*\)$|$BW_DIR/modules/\1.ko|" "$BW_DIR/modules/order" | paste -sd:)
    step_end
else
    step 4 "Debian bookworm root"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
    step 5 "bookworm 6.1 guest kernel"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
fi

# Every guest kernel also as an uncompressed ELF vmlinux, for QEMU's PVH
# direct boot (-kernel vmlinux: no real-mode setup, no decompressor; both
# Debian kernels have CONFIG_PVH=y, whose ELF note QEMU needs). The harness
# uses kernels/<release>/vmlinux when it is there. Found the way the
# kernel's scripts/extract-vmlinux does it: try the decompressor (the trixie
# root's) at each offset where its magic occurs in the bzImage (zstd for
# trixie, xz for bookworm) until the output is an ELF file. Cached: done
# once per kernel.
extract_vmlinux() { # extract_vmlinux <vmlinuz> <vmlinux>
    local img=$1 out=$2 tmp spec magic cmd pos
    tmp=$out.part
    for spec in "28b52ffd:zstd -dcq" "fd377a585a00:xz -dcq"; do
        magic=${spec%%:*}; cmd=${spec#*:}
        for pos in $(od -An -v -tx1 "$img" | tr -d ' \n' | grep -ob "$magic" | cut -d: -f1); do
            [ $((pos % 2)) -eq 0 ] || continue
            # The payload is followed by more of the image: the
            # decompressor complains about it after writing the kernel.
            # shellcheck disable=SC2086
            tail -c +$((pos / 2 + 1)) "$img" | in_root $cmd > "$tmp" 2>/dev/null || true
            if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then
                chmod 644 "$tmp"
                mv "$tmp" "$out"
                return 0
            fi
        done
    done
    rm -f "$tmp"
    return 1
}
step 6 "uncompressed vmlinux of each guest kernel (PVH direct boot)"
for kdir in "$KDIR" ${BW_DIR:+"$BW_DIR"}; do
    [ -f "$kdir/vmlinux" ] && continue
    run_logged "extracting $kdir/vmlinux" extract_vmlinux "$kdir/vmlinuz" "$kdir/vmlinux.tmp" \
        || die "found no zstd or xz payload that decompresses to an ELF kernel in $kdir/vmlinuz"
    # XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU boots.
    in_root readelf -n "$kdir/vmlinux.tmp" | grep -Eq 'Xen .*(0x00000012|PHYS32_ENTRY)' \
        || die "$kdir/vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is the kernel built with CONFIG_PVH=y?"
    mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
done
step_end

# The kernel source the lab kernel is built from (trixie's linux-source-6.12)
# also gives checkpatch.pl; the tarball is cached once (kernel-source.sh).
LAB_SOURCE=${VDEVLAB_LAB_SOURCE:-linux-source-6.12}
step 7 "checkpatch.pl from Debian's $LAB_SOURCE (for the drivers' style check)"
CP_DIR=$CACHE/checkpatch
src_ver=$(in_root apt-cache policy "$LAB_SOURCE" | awk '/Candidate:/ {print $2; exit}')
[ -n "$src_ver" ] && [ "$src_ver" != "(none)" ] || die "the trixie root's apt has no $LAB_SOURCE (set VDEVLAB_LAB_SOURCE=linux-source-<v>)"
if [ "$(cat "$CP_DIR/source" 2>/dev/null)" != "$LAB_SOURCE $src_ver" ] || [ ! -f "$CP_DIR/.vdevlab-checkpatch-$STAMP_VERSION" ]; then
    rm -rf "$CP_DIR.tmp" && mkdir -p "$CP_DIR.tmp"
    run_logged "the source of $LAB_SOURCE $src_ver (about 150 MB, once)" bash "$HERE/kernel-source.sh" "$LAB_SOURCE" "$src_ver" \
        || die "could not get the source of $LAB_SOURCE $src_ver (images/kernel-source.sh)"
    tarball=$CACHE/sources/${LAB_SOURCE}_${src_ver//:/%3a}.tar.xz
    # Only three files are kept, but the whole tarball is read: a minute.
    run_logged "extracting scripts/checkpatch.pl" in_root tar -xJf "$tarball" -C "$CP_DIR.tmp" \
        --wildcards --strip-components=2 \
        '*/scripts/checkpatch.pl' '*/scripts/spelling.txt' '*/scripts/const_structs.checkpatch' \
        || die "could not extract checkpatch.pl from $tarball"
    [ -f "$CP_DIR.tmp/checkpatch.pl" ] || die "checkpatch.pl missing from $tarball"
    echo "$LAB_SOURCE $src_ver" > "$CP_DIR.tmp/source"
    rm -rf "$CP_DIR" && mv "$CP_DIR.tmp" "$CP_DIR"
    touch "$CP_DIR/.vdevlab-checkpatch-$STAMP_VERSION"
fi
step_end "cached ($(cat "$CP_DIR/source"))"

lab_kernel_progress() { # <variant>: for the counter, files compiled so far
    local log=$CACHE/$1-kernel/build.log
    # shellcheck disable=SC2154 # set by step_begin
    [ -f "$log" ] && [ "$(stat -c %Y "$log")" -ge "$_progress_t0" ] || return 0
    echo "$(grep -c '^  CC ' "$log" || true) files compiled"
}
# lab_kernel <step> <variant> <label> <without>: images/lab-kernel.sh for
# one variant (this script writes lab.env, so it does not register);
# <without> is the VDEVLAB_KERNELS that leaves it out, for the error.
lab_kernel() {
    local n=$1 variant=$2 label=$3 without=$4 result
    step "$n" "$label"
    rm -f "$CACHE/$variant-kernel/.last-result"
    PROGRESS_DETAIL="lab_kernel_progress $variant" run_logged "images/lab-kernel.sh --variant $variant" \
        bash "$HERE/lab-kernel.sh" --variant "$variant" --no-register \
        || die "images/lab-kernel.sh --variant $variant failed (see above); set VDEVLAB_KERNELS=$without to provision without the $variant kernel"
    # lab-kernel.sh leaves "cached (...)" there when it had nothing to do.
    result=$(cat "$CACHE/$variant-kernel/.last-result" 2>/dev/null || true)
    case $result in cached*) step_end_as "$result" ;; *) step_end ;; esac
}
without() { # the kernels without $1
    echo ",$KERNELS," | sed "s/,$1,/,/; s/^,//; s/,\$//"
}
if want_kernel lab; then
    lab_kernel 8 lab "the lab kernel (trimmed 6.12, images/lab-kernel.sh)" "$(without lab)"
else
    step 8 "the lab kernel"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
fi
if want_kernel lockdep; then
    lab_kernel 9 lockdep "the lockdep kernel (the lab kernel + lockdep, DEBUG_OBJECTS; images/lab-kernel.sh --variant lockdep)" "$(without lockdep)"
else
    step 9 "the lockdep kernel"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
fi
# The KCSAN kernel is opt-in: built when asked for, listed once built.
KCSAN_BUILT=""
[ -f "$CACHE/kcsan-kernel/.vdevlab-lab-kernel" ] && [ -f "$CACHE/kcsan-kernel/lab.env" ] && KCSAN_BUILT=1
if want_kernel kcsan; then
    lab_kernel 10 kcsan "the kcsan kernel (the lab kernel + KCSAN; images/lab-kernel.sh --variant kcsan)" "$(without kcsan)"
    KCSAN_BUILT=1
else
    step 10 "the kcsan kernel (opt-in)"
    if [ -n "$KCSAN_BUILT" ]; then
        step_end "built before, kept listed"
    else
        step_end "not wanted (add kcsan to VDEVLAB_KERNELS, or run images/lab-kernel.sh --variant kcsan)"
    fi
fi

step 11 "checking QEMU and writing $CACHE/lab.env"
QVER=$(in_root /usr/bin/qemu-system-x86_64 --version | head -n 1)
in_root /usr/bin/qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"' \
    || die "QEMU in $ROOT ($QVER) has no vhost-user-test-device-pci: QEMU 10.2+ needed"
# Per kernel: RELEASE (uname -r), IMAGE (host path), HEADERS (the kbuild
# folder, inside BUILD_ROOT), BUILD_ROOT (the Debian root to build in),
# BIND (host folders, ':'-separated, bound into that root at their own
# path for the build: a kernel tree in the cache), SPARSE (1: build with
# C=1; Debian's sparse handles 6.1's and 6.12's headers, not 7.3's), MODULES
# (host paths of modules to insmod before the driver, in order,
# ':'-separated). The unprefixed VDEVLAB_KERNEL* keys are the default
# kernel's (trixie), for older readers.
{
    echo "VDEVLAB_ROOT=$ROOT"
    echo "VDEVLAB_QEMU=/usr/bin/qemu-system-x86_64"
    echo "VDEVLAB_QEMU_VERSION=$QVER"
    echo "VDEVLAB_BUSYBOX=$ROOT/usr/bin/busybox"
    kernels=$KERNELS
    [ -z "$KCSAN_BUILT" ] || want_kernel kcsan || kernels=$kernels,kcsan
    echo "VDEVLAB_KERNELS=$kernels"
    echo "VDEVLAB_KERNEL_TRIXIE_RELEASE=$KREL"
    echo "VDEVLAB_KERNEL_TRIXIE_IMAGE=$KDIR/vmlinuz"
    echo "VDEVLAB_KERNEL_TRIXIE_HEADERS=/usr/src/$HEADERS"
    echo "VDEVLAB_KERNEL_TRIXIE_BUILD_ROOT=$ROOT"
    echo "VDEVLAB_KERNEL_TRIXIE_MODULES="
    if want_kernel bookworm; then
        echo "VDEVLAB_KERNEL_BOOKWORM_RELEASE=$BW_REL"
        echo "VDEVLAB_KERNEL_BOOKWORM_IMAGE=$BW_DIR/vmlinuz"
        echo "VDEVLAB_KERNEL_BOOKWORM_HEADERS=/usr/src/$BW_HDR"
        echo "VDEVLAB_KERNEL_BOOKWORM_BUILD_ROOT=$BWROOT"
        echo "VDEVLAB_KERNEL_BOOKWORM_SPARSE=1"
        echo "VDEVLAB_KERNEL_BOOKWORM_MODULES=$BW_MODULES"
    fi
    if want_kernel lab; then
        cat "$CACHE/lab-kernel/lab.env"
    fi
    if want_kernel lockdep; then
        cat "$CACHE/lockdep-kernel/lab.env"
    fi
    if [ -n "$KCSAN_BUILT" ]; then
        cat "$CACHE/kcsan-kernel/lab.env"
    fi
    echo "VDEVLAB_KERNEL_RELEASE=$KREL"
    echo "VDEVLAB_KERNEL=$KDIR/vmlinuz"
    echo "VDEVLAB_KERNEL_HEADERS=/usr/src/$HEADERS"
} > "$CACHE/lab.env.tmp"
# The opt-in debug kernel, once images/debug-kernel.sh has built it: keep it
# listed (`debug` in VDEVLAB_KERNELS and its VDEVLAB_KERNEL_DEBUG_* keys).
if [ -f "$CACHE/debug-kernel/.vdevlab-debug-kernel" ] && [ -f "$CACHE/debug-kernel/lab.env" ]; then
    sed -i 's/^VDEVLAB_KERNELS=.*/&,debug/' "$CACHE/lab.env.tmp"
    cat "$CACHE/debug-kernel/lab.env" >> "$CACHE/lab.env.tmp"
fi
mv "$CACHE/lab.env.tmp" "$CACHE/lab.env"
step_end "done"
LAB_REL=$(sed -n 's/^VDEVLAB_KERNEL_LAB_RELEASE=//p' "$CACHE/lab.env")
LOCKDEP_REL=$(sed -n 's/^VDEVLAB_KERNEL_LOCKDEP_RELEASE=//p' "$CACHE/lab.env")
KCSAN_REL=$(sed -n 's/^VDEVLAB_KERNEL_KCSAN_RELEASE=//p' "$CACHE/lab.env")
say "ready: $QVER; guest kernels: trixie $KREL${BW_REL:+, bookworm $BW_REL}${LAB_REL:+, lab $LAB_REL}${LOCKDEP_REL:+, lockdep $LOCKDEP_REL}${KCSAN_REL:+, kcsan $KCSAN_REL}"
