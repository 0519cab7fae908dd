#!/bin/sh
# Run a command inside the lab's Debian trixie root, in a private mount
# namespace (so nothing stays mounted after it exits), with /proc and /dev
# mounted and host folders bound in:
#
#   in-root.sh ROOT [HOST_DIR:ROOT_DIR]... -- COMMAND [ARG]...
#
# The command replaces this shell (same PID), so a caller can signal it.
set -eu
[ $# -ge 3 ] || { echo "usage: in-root.sh ROOT [HOST:TARGET]... -- CMD..." >&2; exit 2; }
root=$1; shift
[ -d "$root/usr" ] || { echo "in-root.sh: $root is not a provisioned root; run images/provision.sh" >&2; exit 2; }
if [ "${VDEVLAB_IN_NS:-}" != "$root" ]; then
    # Re-exec ourselves in a new mount namespace first.
    VDEVLAB_IN_NS=$root exec unshare --mount --propagation private -- "$0" "$root" "$@"
fi
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    host=${1%%:*}; target=${1#*:}
    mkdir -p "$root$target"
    mount --bind "$host" "$root$target"
    shift
done
[ "${1:-}" = "--" ] && shift
exec chroot "$root" "$@"
