#!/bin/sh
# Run a command inside one of the lab's Debian roots, in a private mount
# namespace (so nothing stays mounted after it exits), with /proc and /dev
# mounted and host folders bound in:
#
#   in-root.sh ROOT [HOST_DIR:ROOT_DIR]... -- COMMAND [ARG]...
#
# As root: a mount namespace, a fresh /proc and chroot. As any other user:
# a user namespace first (the user is root inside it, mapped to itself;
# nothing else is mapped, so no subordinate ids are needed), with the
# host's /proc bound in (a fresh proc would need a PID namespace, and then
# the command would no longer be this process). Either way the command
# replaces this shell (same PID), so a caller can signal it.
set -eu
[ $# -ge 3 ] || { echo "usage: in-root.sh ROOT [HOST:TARGET]... -- CMD..." >&2; exit 2; }
root=$1; shift
[ -d "$root/usr" ] || { echo "in-root.sh: $root is not a provisioned root; run images/provision.sh" >&2; exit 2; }
if [ "${VDEVLAB_IN_NS:-}" != "$root" ]; then
    # Re-exec ourselves in the new namespaces first.
    if [ "$(id -u)" -eq 0 ]; then
        VDEVLAB_IN_NS=$root VDEVLAB_IN_USERNS="" exec unshare --mount --propagation private -- "$0" "$root" "$@"
    fi
    if ! err=$(unshare --user --map-root-user --mount true 2>&1); then
        echo "in-root.sh: this user cannot make a user namespace ($err): allow unprivileged user namespaces (sysctl user.max_user_namespaces=10000; on older Debian kernels kernel.unprivileged_userns_clone=1; on Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for unshare), or run as root" >&2
        exit 2
    fi
    VDEVLAB_IN_NS=$root VDEVLAB_IN_USERNS=1 exec unshare --user --map-root-user --mount --propagation private -- "$0" "$root" "$@"
fi
if [ -n "${VDEVLAB_IN_USERNS:-}" ]; then
    mount --rbind /proc "$root/proc"
else
    mount -t proc proc "$root/proc"
fi
mount --rbind /dev "$root/dev"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    host=${1%%:*}; target=${1#*:}
    mkdir -p "$root$target"
    mount --bind "$host" "$root$target"
    shift
done
[ "${1:-}" = "--" ] && shift
# The root's own search path for the command (dpkg wants ldconfig from
# sbin, which an ordinary user's PATH lacks); chroot itself is in sbin on
# some hosts and in bin on others, found through the same path.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
exec chroot "$root" "$@"
