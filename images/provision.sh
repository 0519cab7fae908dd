#!/usr/bin/env bash
# Provision the vdevlab lab toolchain from Debian's packages, into a cache
# folder outside git:
#
#   $VDEVLAB_CACHE/trixie-root      Debian trixie root with QEMU >= 10.2 from
#                                   trixie-backports, gcc-14, make, kernel
#                                   headers and busybox-static
#   $VDEVLAB_CACHE/kernels/<rel>/   one folder per guest kernel: vmlinuz,
#                                   config, and for kernels built outside the
#                                   root their headers (headers/) and the
#                                   modules to load before the driver
#                                   (modules/, in load order)
#   $VDEVLAB_CACHE/lab.env          what the Rust harness reads
#
# Guest kernels (the matrix; VDEVLAB_KERNELS picks a subset, default all
# three):
#
#   trixie    trixie-backports' current kernel; virtio built in; the driver
#             is built inside the root (gcc-14, like the kernel)
#   bookworm  Debian bookworm's 6.1 kernel (the newest 6.1.0-N ABI the
#             host's apt offers, or VDEVLAB_BOOKWORM_ABI=N); virtio is
#             modular; the driver is built on the host, whose gcc-12 is the
#             kernel's own compiler (the host must be bookworm, or have
#             bookworm and bookworm-security in its apt sources)
#   lab       the trimmed lab kernel, built here from Debian's
#             linux-source-6.12 by images/lab-kernel.sh (a few minutes,
#             once); fast boots; the driver is built on the host against
#             its tree, with sparse
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
step() { step_begin "($1/9) $2"; }

# As root: mmdebstrap and chroot as usual, and missing host packages are
# installed. As any other user: the same through user namespaces
# (mmdebstrap --mode=unshare, images/in-root.sh); missing host packages are
# named instead (the README's host prerequisites).
ROOTLESS=""; [ "$(id -u)" -eq 0 ] || ROOTLESS=1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported (found $(uname -m))"
KERNELS=${VDEVLAB_KERNELS:-trixie,bookworm,lab}
case ",$KERNELS," in *,trixie,*) ;; *) die "VDEVLAB_KERNELS=$KERNELS: trixie (the default kernel) must be in the list" ;; esac
for k in ${KERNELS//,/ }; do
    case "$k" in trixie|bookworm|lab) ;; *) die "VDEVLAB_KERNELS=$KERNELS: unknown kernel '$k' (known: trixie, bookworm, lab)" ;; esac
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

# Set: do not (or no longer) run apt-get update on the host (only root can).
apt_updated=""; [ -z "$ROOTLESS" ] || apt_updated=1
host_pkg() { # host_pkg <command> <package>
    command -v "$1" >/dev/null 2>&1 && return 0
    [ -z "$ROOTLESS" ] || die "$1 is missing: install the host package '$2' (as root: apt-get install $2; the README lists the host prerequisites)"
    command -v apt-get >/dev/null 2>&1 || die "$1 is missing and this host has no apt-get: install the '$2' package"
    if [ -z "$apt_updated" ]; then
        run_logged "apt-get update (host)" apt-get update -q || die "apt-get update failed on the host"
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive run_logged "installing host package $2" \
        apt-get install -y -q --no-install-recommends "$2" \
        || die "could not install '$2' on the host: apt-get install $2"
}

step 1 "host tools (mmdebstrap, unshare, flock; make, gcc-12, objcopy for the bookworm kernel)"
host_pkg mmdebstrap mmdebstrap
host_pkg unshare util-linux
if want_kernel bookworm || want_kernel lab; then
    host_pkg make make
    host_pkg gcc-12 gcc-12
    host_pkg objcopy binutils
    # sparse (C=1) for the driver's host builds (bookworm 6.1, lab 6.12);
    # Debian's sparse 0.6.4 is too old for 7.3's headers, fine with these.
    host_pkg sparse sparse
fi
# For the uncompressed vmlinux of step 6.
host_pkg zstd zstd
host_pkg xz xz-utils
host_pkg readelf binutils
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
step_end "present"

# The packages of the root; the stamp holds the list, so adding a package
# re-runs the install (step 3).
ROOT_PKGS="qemu-system-x86 linux-headers-amd64 make binutils busybox-static"

step 2 "Debian trixie root at $ROOT"
if [ ! -f "$ROOT/.vdevlab-root-$STAMP_VERSION" ]; then
    rm -rf "$ROOT.tmp" "$ROOT.tar"
    if [ -z "$ROOTLESS" ]; then
        run_logged "mmdebstrap trixie from $MIRROR" mmdebstrap --variant=apt trixie "$ROOT.tmp" \
            "deb $MIRROR trixie main" "deb $MIRROR trixie-backports main" \
            || die "mmdebstrap failed; check that $MIRROR serves trixie and trixie-backports"
    else
        # In mmdebstrap's own user namespace (all of the subordinate ids
        # mapped), packages install as on a real root; the result is a
        # tarball that this user unpacks, owning every file, so that later
        # runs need only a user namespace mapping this user
        # (images/in-root.sh). apt then cannot switch to its _apt user.
        run_logged "mmdebstrap --mode=unshare trixie from $MIRROR, with $ROOT_PKGS" \
            mmdebstrap --mode=unshare --variant=apt \
            --customize-hook="chroot \"\$1\" apt-get install -y -q --no-install-recommends -t trixie-backports $ROOT_PKGS" \
            trixie "$ROOT.tar" "deb $MIRROR trixie main" "deb $MIRROR trixie-backports main" \
            || die "mmdebstrap --mode=unshare failed (see the log); check that $MIRROR serves trixie and trixie-backports, and that newuidmap (package uidmap) and this user's /etc/subuid range work"
        mkdir -p "$ROOT.tmp"
        # Device nodes cannot be made here; /dev is bound in at run time.
        run_logged "unpacking the root" tar -C "$ROOT.tmp" --no-same-owner --exclude='./dev/*' -xf "$ROOT.tar" \
            || die "could not unpack $ROOT.tar"
        rm -f "$ROOT.tar"
        echo 'APT::Sandbox::User "root";' > "$ROOT.tmp/etc/apt/apt.conf.d/99vdevlab-rootless"
        echo "$ROOT_PKGS" > "$ROOT.tmp/.vdevlab-pkgs"
    fi
    rm -rf "$ROOT"
    mv "$ROOT.tmp" "$ROOT"
    touch "$ROOT/.vdevlab-root-$STAMP_VERSION"
fi
step_end

in_root() {
    # A private mount namespace (and a user namespace when not root), so
    # /proc and /dev in the root vanish with us.
    "$HERE/in-root.sh" "$ROOT" -- "$@"
}

step 3 "QEMU (trixie-backports), kernel headers, gcc, binutils, make, busybox in the root"
if [ "$(cat "$ROOT/.vdevlab-pkgs" 2>/dev/null)" != "$ROOT_PKGS" ]; then
    run_logged "apt-get update" in_root apt-get update -q || die "apt-get update failed inside $ROOT"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive run_logged "apt-get install" in_root apt-get install -y -q --no-install-recommends \
        -t trixie-backports $ROOT_PKGS \
        || die "apt-get install inside $ROOT failed (QEMU and headers must both come from trixie-backports)"
    echo "$ROOT_PKGS" > "$ROOT/.vdevlab-pkgs"
fi
step_end

QEMU=$ROOT/usr/bin/qemu-system-x86_64
[ -x "$QEMU" ] || die "no qemu-system-x86_64 in $ROOT; remove $ROOT/.vdevlab-pkgs and re-run"
HEADERS=$(cd "$ROOT/usr/src" && ls -d linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
[ -n "$HEADERS" ] || die "no linux-headers-*-amd64 in $ROOT/usr/src"
KREL=${HEADERS#linux-headers-}

step 4 "trixie guest kernel $KREL"
KDIR=$CACHE/kernels/$KREL
if [ ! -f "$KDIR/.vdevlab-kernel-$STAMP_VERSION" ]; then
    rm -rf "$KDIR" "$ROOT/var/tmp/vdevlab-dl" && mkdir -p "$ROOT/var/tmp/vdevlab-dl"
    # Newer Debian kernels split the image: linux-binary-* holds vmlinuz and
    # linux-base-* the config; older ones ship linux-image-*(-unsigned).
    # mmdebstrap leaves no apt lists (a rootless root skipped step 3's update).
    if ! ls "$ROOT"/var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        run_logged "apt-get update" in_root apt-get update -q || die "apt-get update failed inside $ROOT"
    fi
    got=""
    for pkgs in "linux-binary-$KREL linux-base-$KREL" "linux-image-$KREL-unsigned" "linux-image-$KREL"; do
        if run_logged "apt-get download $pkgs" in_root sh -c "cd /var/tmp/vdevlab-dl && apt-get download -q -t trixie-backports $pkgs"; then
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
fi
step_end

# The bookworm 6.1 kernel, from the HOST's apt (the host is bookworm): the
# image, the modules virtio-pci needs (virtio is modular in 6.1) and the
# headers with their kbuild, all unpacked into the cache (nothing is
# installed on the host). The headers expect gcc-12 (CONFIG_CC_VERSION_TEXT),
# the host's compiler, so the driver is built on the host.
BW_WANT_MODULES=${VDEVLAB_BOOKWORM_MODULES:-virtio_pci}
BW_REL=""; BW_DIR=""; BW_MODULES=""
host_apt() { # apt-get as root, downloading into the current folder
    apt-get -q -o APT::Sandbox::User=root "$@"
}
candidate() { # candidate <package>: its candidate version, or nothing
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}' | grep -v '^(none)$' || true
}
bookworm_abi() { # the newest 6.1.0-N ABI with both an image and headers
    if [ -n "${VDEVLAB_BOOKWORM_ABI:-}" ]; then echo "$VDEVLAB_BOOKWORM_ABI"; return; fi
    local abis pkgs
    abis=$(apt-cache pkgnames linux-headers-6.1.0- 2>/dev/null \
        | sed -n 's/^linux-headers-6\.1\.0-\([0-9][0-9]*\)-amd64$/\1/p' | sort -rn)
    [ -n "$abis" ] || return 0
    pkgs=$(for n in $abis; do
        echo "linux-headers-6.1.0-$n-amd64 linux-image-6.1.0-$n-amd64-unsigned linux-image-6.1.0-$n-amd64"
    done)
    # One apt-cache call (each costs about a second): "package version" lines.
    # shellcheck disable=SC2086
    apt-cache policy $pkgs 2>/dev/null | awk '
        /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
        /Candidate:/ && $2 != "(none)" { print pkg, $2 }' > "$CACHE/.apt-candidates"
    for n in $abis; do
        hv=$(awk -v p="linux-headers-6.1.0-$n-amd64" '$1 == p {print $2}' "$CACHE/.apt-candidates")
        [ -n "$hv" ] || continue
        if awk -v n="$n" -v v="$hv" '($1 == "linux-image-6.1.0-" n "-amd64-unsigned" || $1 == "linux-image-6.1.0-" n "-amd64") && $2 == v {f = 1} END {exit !f}' "$CACHE/.apt-candidates"; then
            echo "$n"; return 0
        fi
    done
    return 0
}
apt_lists_fingerprint() { # changes whenever the host's apt lists do
    { echo "${VDEVLAB_BOOKWORM_ABI:-}"; stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null; } | md5sum | cut -d' ' -f1
}
modinfo_depends() { # modinfo_depends <file.ko>: its dependencies, space separated
    local tmp
    tmp=$(mktemp)
    objcopy -O binary --only-section=.modinfo "$1" "$tmp" \
        || { rm -f "$tmp"; die "objcopy could not read .modinfo of $1"; }
    tr '\0' '\n' < "$tmp" | sed -n 's/^depends=//p' | tr ',' ' '
    rm -f "$tmp"
}

if want_kernel bookworm; then
    step 5 "bookworm 6.1 guest kernel, its virtio modules and headers (host apt)"
    command -v apt-get >/dev/null 2>&1 || die "the bookworm kernel comes from the host's apt, and this host has no apt-get; set VDEVLAB_KERNELS=trixie to provision the trixie kernel only"
    # Asking apt takes seconds, and every test process provisions: reuse the
    # last choice while the host's apt lists are unchanged.
    fp=$(apt_lists_fingerprint)
    abi=""
    if [ -f "$CACHE/kernels/bookworm.choice" ]; then
        read -r cfp cabi < "$CACHE/kernels/bookworm.choice" || true
        [ "$cfp" = "$fp" ] && abi=$cabi
    fi
    [ -n "$abi" ] || abi=$(bookworm_abi)
    if [ -z "$abi" ] && [ -z "$apt_updated" ]; then
        note "the host's apt offers no linux-image/linux-headers-6.1.0-N-amd64 pair; apt-get update (host)"
        run_logged "apt-get update (host)" apt-get update -q || die "apt-get update failed on the host"
        apt_updated=1
        abi=$(bookworm_abi)
    fi
    [ -n "$abi" ] || die "the host's apt offers no linux-image-6.1.0-N-amd64 with matching linux-headers-6.1.0-N-amd64: add 'bookworm bookworm-updates' and 'bookworm-security' to the host's apt sources and run apt-get update, or set VDEVLAB_KERNELS=trixie"
    BW_REL=6.1.0-$abi-amd64
    BW_DIR=$CACHE/kernels/$BW_REL
    bw_stamp="$STAMP_VERSION $BW_WANT_MODULES"
    if [ "$(cat "$BW_DIR/.vdevlab-bookworm" 2>/dev/null)" != "$bw_stamp" ]; then
        ver=$(candidate "linux-headers-$BW_REL")
        [ -n "$ver" ] || die "no candidate for linux-headers-$BW_REL on the host's apt"
        tmp=$BW_DIR.tmp
        rm -rf "$tmp" && mkdir -p "$tmp/debs" "$tmp/pkg" "$tmp/headers" "$tmp/modules"
        # The kernel's own kbuild version first; else the candidate (>= it).
        image=linux-image-$BW_REL-unsigned
        [ "$(candidate "$image")" = "$ver" ] || image=linux-image-$BW_REL
        pkgs="$image=$ver linux-headers-$BW_REL=$ver linux-headers-6.1.0-$abi-common=$ver"
        dl_in_tmp() { cd "$tmp/debs" && host_apt download "$@"; }
        dl() { run_logged "downloading $*" dl_in_tmp "$@"; }
        # shellcheck disable=SC2086
        if ! dl $pkgs; then
            [ -n "$apt_updated" ] || { note "download failed; apt-get update (host) and retrying"; run_logged "apt-get update (host)" apt-get update -q || true; apt_updated=1; }
            # shellcheck disable=SC2086
            dl $pkgs || die "could not download $pkgs from the host's apt (stale lists or no bookworm-security source?): run apt-get update, or pick another ABI with VDEVLAB_BOOKWORM_ABI=N"
        fi
        dl "linux-kbuild-6.1=$ver" || dl linux-kbuild-6.1 \
            || die "could not download linux-kbuild-6.1 from the host's apt"
        note "unpacking $BW_REL"
        dpkg -x "$tmp/debs/${image}_"*.deb "$tmp/pkg" || die "dpkg -x $image failed"
        for deb in "$tmp"/debs/linux-headers-*.deb "$tmp"/debs/linux-kbuild-*.deb; do
            dpkg -x "$deb" "$tmp/headers" || die "dpkg -x $deb failed"
        done
        [ -f "$tmp/pkg/boot/vmlinuz-$BW_REL" ] || die "no boot/vmlinuz-$BW_REL in $image"
        cp "$tmp/pkg/boot/vmlinuz-$BW_REL" "$tmp/vmlinuz"
        cp "$tmp/pkg/boot/config-$BW_REL" "$tmp/config" 2>/dev/null || true
        # The headers' Makefile includes the common headers by absolute
        # path (/usr/src/...): point it at the unpacked copy. scripts/ and
        # tools/ are relative links into the unpacked kbuild.
        hdr=$tmp/headers/usr/src/linux-headers-$BW_REL
        [ -f "$hdr/Makefile" ] || die "no usr/src/linux-headers-$BW_REL/Makefile in the headers package"
        sed -i "s|^include /usr/src/|include $BW_DIR/headers/usr/src/|" "$hdr/Makefile"
        [ -x "$hdr/scripts/mod/modpost" ] || die "the unpacked headers have no scripts/mod/modpost (linux-kbuild-6.1 missing?)"
        kcc=$(sed -n 's/^CONFIG_CC_VERSION_TEXT="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$hdr/include/config/auto.conf")
        hcc=$(gcc-12 --version | head -n 1)
        [ "$kcc" = "$hcc" ] || say "note: $BW_REL was built with '$kcc', the host has '$hcc'"
        # The modules virtio-pci needs, dependencies first.
        order=""
        add_mod() {
            case " $order " in *" $1 "*) return 0 ;; esac
            local f d
            f=$(find "$tmp/pkg/lib/modules/$BW_REL" \( -name "$1.ko" -o -name "${1//_/-}.ko" \) | head -n 1)
            [ -n "$f" ] || die "module $1 is not in $image (is it built in? then drop it from VDEVLAB_BOOKWORM_MODULES)"
            for d in $(modinfo_depends "$f"); do add_mod "$d"; done
            cp "$f" "$tmp/modules/$1.ko"
            order="$order $1"
        }
        for m in ${BW_WANT_MODULES//,/ }; do add_mod "$m"; done
        printf '%s\n' $order > "$tmp/modules/order"
        note "modules to load before the driver:$order"
        rm -rf "$tmp/pkg" "$tmp/debs" "$BW_DIR"
        mv "$tmp" "$BW_DIR"
        echo "$bw_stamp" > "$BW_DIR/.vdevlab-bookworm"
    fi
    echo "$(apt_lists_fingerprint) $abi" > "$CACHE/kernels/bookworm.choice"
    BW_MODULES=$(sed "s|^\(.*\)$|$BW_DIR/modules/\1.ko|" "$BW_DIR/modules/order" | paste -sd:)
    # Modules the benchmark needs besides the driver's preloads
    # (virtio_console, for the virtio-serial baseline of `vdevlab bench`),
    # picked by name from the same image package into modules/, next to the
    # preloads. They have no stamp of their own and leave modules/order (and
    # the stamp above) alone: the harness adds them to the initramfs, after
    # the preloads, when it finds them there.
    BW_EXTRA=${VDEVLAB_BOOKWORM_EXTRA_MODULES:-virtio_console}
    missing=""
    for m in ${BW_EXTRA//,/ }; do [ -f "$BW_DIR/modules/$m.ko" ] || missing="$missing $m"; done
    if [ -n "$missing" ]; then
        ver=$(candidate "linux-headers-$BW_REL")
        [ -n "$ver" ] || die "no candidate for linux-headers-$BW_REL on the host's apt"
        image=linux-image-$BW_REL-unsigned
        [ "$(candidate "$image")" = "$ver" ] || image=linux-image-$BW_REL
        tmp=$BW_DIR.extra.tmp
        rm -rf "$tmp" && mkdir -p "$tmp/debs" "$tmp/pkg"
        note "modules for the benchmark:$missing (from $image $ver, about 60 MB)"
        dl_extra() { cd "$tmp/debs" && host_apt download "$image=$ver"; }
        run_logged "downloading $image=$ver (for$missing)" dl_extra \
            || die "could not download $image=$ver from the host's apt (for$missing)"
        dpkg -x "$tmp/debs/${image}_"*.deb "$tmp/pkg" || die "dpkg -x $image failed"
        for m in $missing; do
            f=$(find "$tmp/pkg/lib/modules/$BW_REL" \( -name "$m.ko" -o -name "${m//_/-}.ko" \) | head -n 1)
            [ -n "$f" ] || die "module $m is not in $image (built in? then drop it from VDEVLAB_BOOKWORM_EXTRA_MODULES)"
            for d in $(modinfo_depends "$f"); do
                [ -f "$BW_DIR/modules/$d.ko" ] || die "module $m needs $d, which is not preloaded; add it to VDEVLAB_BOOKWORM_MODULES"
            done
            cp "$f" "$BW_DIR/modules/$m.ko.tmp" && mv "$BW_DIR/modules/$m.ko.tmp" "$BW_DIR/modules/$m.ko"
        done
        rm -rf "$tmp"
    fi
    step_end "cached ($BW_REL)"
else
    step 5 "bookworm 6.1 guest kernel"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
fi

# Every guest kernel also as an uncompressed ELF vmlinux, for QEMU's PVH
# direct boot (-kernel vmlinux: no real-mode setup, no decompressor; both
# Debian kernels have CONFIG_PVH=y, whose ELF note QEMU needs). The harness
# uses kernels/<release>/vmlinux when it is there. Found the way the
# kernel's scripts/extract-vmlinux does it: try the decompressor at each
# offset where its magic occurs in the bzImage (zstd for trixie, xz for
# bookworm) until the output is an ELF file. Cached: done once per kernel.
extract_vmlinux() { # extract_vmlinux <vmlinuz> <vmlinux>
    local img=$1 out=$2 tmp spec magic cmd pos
    tmp=$(mktemp)
    for spec in "28b52ffd:zstd -dcq" "fd377a585a00:xz -dcq"; do
        magic=${spec%%:*}; cmd=${spec#*:}
        for pos in $(od -An -v -tx1 "$img" | tr -d ' \n' | grep -ob "$magic" | cut -d: -f1); do
            [ $((pos % 2)) -eq 0 ] || continue
            # The payload is followed by more of the image: the
            # decompressor complains about it after writing the kernel.
            tail -c +$((pos / 2 + 1)) "$img" | $cmd > "$tmp" 2>/dev/null || true
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
    readelf -n "$kdir/vmlinux.tmp" | grep -Eq 'Xen .*(0x00000012|PHYS32_ENTRY)' \
        || die "$kdir/vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is the kernel built with CONFIG_PVH=y?"
    mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
done
step_end

step 7 "checkpatch.pl from Debian's linux-source (for the driver's style check)"
CP_DIR=$CACHE/checkpatch
if [ ! -f "$CP_DIR/.vdevlab-checkpatch-$STAMP_VERSION" ]; then
    rm -rf "$CP_DIR.tmp" && mkdir -p "$CP_DIR.tmp"
    # The host's own linux-source (bookworm: 6.1). Only three files are
    # kept, but the whole tarball has to be read: about a minute, once.
    src=$(apt-cache search --names-only '^linux-source-[0-9.]+$' 2>/dev/null | awk '{print $1}' | sort -V | tail -n 1)
    [ -n "$src" ] || die "no linux-source-* package in the host's apt lists (apt-get update?)"
    cp_download() { cd "$CP_DIR.tmp" && apt-get download -q "$src"; }
    cp_extract() {
        dpkg-deb --fsys-tarfile "$CP_DIR.tmp"/"$src"_*.deb \
            | tar -xO --wildcards '*/linux-source-*.tar.xz' \
            | tar -xJ -C "$CP_DIR.tmp" --wildcards --strip-components=2 \
                '*/scripts/checkpatch.pl' '*/scripts/spelling.txt' '*/scripts/const_structs.checkpatch'
    }
    run_logged "apt-get download $src" cp_download || die "apt-get download $src failed"
    run_logged "extracting scripts/checkpatch.pl" cp_extract \
        || die "could not extract checkpatch.pl from $src"
    rm -f "$CP_DIR.tmp"/*.deb
    [ -f "$CP_DIR.tmp/checkpatch.pl" ] || die "checkpatch.pl missing from $src"
    echo "$src" > "$CP_DIR.tmp/source"
    rm -rf "$CP_DIR" && mv "$CP_DIR.tmp" "$CP_DIR"
    touch "$CP_DIR/.vdevlab-checkpatch-$STAMP_VERSION"
fi
step_end "cached ($(cat "$CP_DIR/source"))"

lab_kernel_progress() { # for the counter: files compiled so far
    local log=$CACHE/lab-kernel/build.log
    # shellcheck disable=SC2154 # set by step_begin
    [ -f "$log" ] && [ "$(stat -c %Y "$log")" -ge "$_progress_t0" ] || return 0
    echo "$(grep -c '^  CC ' "$log" || true) files compiled"
}
if want_kernel lab; then
    step 8 "the lab kernel (trimmed 6.12, images/lab-kernel.sh)"
    rm -f "$CACHE/lab-kernel/.last-result"
    PROGRESS_DETAIL='lab_kernel_progress' run_logged "images/lab-kernel.sh" \
        bash "$(dirname "${BASH_SOURCE[0]}")/lab-kernel.sh" \
        || die "images/lab-kernel.sh failed (see above); set VDEVLAB_KERNELS=trixie,bookworm to provision without the lab kernel"
    # lab-kernel.sh leaves "cached (...)" there when it had nothing to do.
    lk_result=$(cat "$CACHE/lab-kernel/.last-result" 2>/dev/null || true)
    case $lk_result in cached*) step_end_as "$lk_result" ;; *) step_end ;; esac
else
    step 8 "the lab kernel"
    step_end "not wanted (VDEVLAB_KERNELS=$KERNELS)"
fi

step 9 "checking QEMU and writing $CACHE/lab.env"
QVER=$(in_root /usr/bin/qemu-system-x86_64 --version | head -n 1)
in_root /usr/bin/qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vhost-user-test-device-pci"' \
    || die "QEMU in $ROOT ($QVER) has no vhost-user-test-device-pci: QEMU 10.2+ needed"
# Per kernel: RELEASE (uname -r), IMAGE (host path), HEADERS (the kbuild
# folder, inside BUILD_ROOT), BUILD_ROOT (a Debian root to build in, or
# "host"), MODULES (host paths of modules to insmod before the driver, in
# order, ':'-separated). The unprefixed VDEVLAB_KERNEL* keys are the default
# kernel's (trixie), for older readers.
{
    echo "VDEVLAB_ROOT=$ROOT"
    echo "VDEVLAB_QEMU=/usr/bin/qemu-system-x86_64"
    echo "VDEVLAB_QEMU_VERSION=$QVER"
    echo "VDEVLAB_BUSYBOX=$ROOT/usr/bin/busybox"
    echo "VDEVLAB_KERNELS=$KERNELS"
    echo "VDEVLAB_KERNEL_TRIXIE_RELEASE=$KREL"
    echo "VDEVLAB_KERNEL_TRIXIE_IMAGE=$KDIR/vmlinuz"
    echo "VDEVLAB_KERNEL_TRIXIE_HEADERS=/usr/src/$HEADERS"
    echo "VDEVLAB_KERNEL_TRIXIE_BUILD_ROOT=$ROOT"
    echo "VDEVLAB_KERNEL_TRIXIE_MODULES="
    if want_kernel bookworm; then
        echo "VDEVLAB_KERNEL_BOOKWORM_RELEASE=$BW_REL"
        echo "VDEVLAB_KERNEL_BOOKWORM_IMAGE=$BW_DIR/vmlinuz"
        echo "VDEVLAB_KERNEL_BOOKWORM_HEADERS=$BW_DIR/headers/usr/src/linux-headers-$BW_REL"
        echo "VDEVLAB_KERNEL_BOOKWORM_BUILD_ROOT=host"
        echo "VDEVLAB_KERNEL_BOOKWORM_MODULES=$BW_MODULES"
    fi
    if want_kernel lab; then
        cat "$CACHE/lab-kernel/lab.env"
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
say "ready: $QVER; guest kernels: trixie $KREL${BW_REL:+, bookworm $BW_REL}${LAB_REL:+, lab $LAB_REL}"
