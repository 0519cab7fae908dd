#!/usr/bin/env bash
# The source tarball of a Debian linux-source-<major.minor> package, cached
# once per version and shared by the kernels the lab builds from it (the lab
# kernel, images/lab-kernel.sh, and the debug kernel, images/debug-kernel.sh):
#
#   kernel-source.sh <package> <version>
#
# prints the path of $VDEVLAB_CACHE/sources/<package>_<version>.tar.xz,
# downloading the package with the trixie root's apt (images/provision.sh
# makes the root) and taking the tarball out of it the first time (about
# 150 MB), inside that root. Older versions of the same package are removed
# when a new one is cached. Runs as root or as any user.
set -euo pipefail

CACHE=${VDEVLAB_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdevlab}
SRCDIR=$CACHE/sources
ROOT=$CACHE/trixie-root
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROGRESS_TAG=kernel-source
# shellcheck source-path=SCRIPTDIR source=lib/progress.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/progress.sh"

[ $# -eq 2 ] || die "usage: kernel-source.sh <linux-source-package> <version>"
PKG=$1 VER=$2
case "$PKG" in linux-source-[0-9]*) ;; *) die "$PKG is not a linux-source-<major.minor> package" ;; esac
# A version may hold ':' (an epoch); keep the file name plain.
OUT=$SRCDIR/${PKG}_${VER//:/%3a}.tar.xz
[ -d "$ROOT/usr" ] || die "no trixie root at $ROOT: run images/provision.sh first"
in_root() { "$HERE/in-root.sh" "$ROOT" "$CACHE:$CACHE" -- "$@"; }
mkdir -p "$SRCDIR"
exec 7>"$SRCDIR/.lock"
flock 7
if [ ! -s "$OUT" ]; then
    tmp=$(mktemp -d "$SRCDIR/dl.XXXXXX")
    step_begin "downloading $PKG $VER (about 150 MB)"
    # shellcheck disable=SC2016 # the inner shell's $1 and $2
    download() { in_root sh -c 'cd "$1" && apt-get download -q "$2"' sh "$tmp" "$PKG=$VER"; }
    if ! run_logged "apt-get download $PKG=$VER" download; then
        rm -rf "$tmp"
        die "apt-get download $PKG=$VER failed in $ROOT (stale lists? images/in-root.sh $ROOT -- apt-get update)"
    fi
    take_tarball() { in_root dpkg-deb --fsys-tarfile "$(echo "$tmp/${PKG}_"*.deb)" | tar -xO --wildcards '*/linux-source-*.tar.xz' > "$tmp/src.tar.xz"; }
    if ! run_logged "taking the source tarball out" take_tarball || [ ! -s "$tmp/src.tar.xz" ]; then
        rm -rf "$tmp"
        die "no usr/src/linux-source-*.tar.xz in $PKG $VER"
    fi
    mv "$tmp/src.tar.xz" "$OUT"
    rm -rf "$tmp"
    # One version per package is enough.
    for old in "$SRCDIR/${PKG}"_*.tar.xz; do
        [ "$old" = "$OUT" ] || rm -f "$old"
    done
    step_end
fi
echo "$OUT"
