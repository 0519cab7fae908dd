#!/bin/busybox sh
# /init of the vdevlab lab guest (an initramfs with busybox, the qw driver
# and the guest programs, plus the kernel's virtio modules where they are
# not built in). It mounts the basics, loads the driver, runs the
# scenario named on the kernel command line and powers off. Everything the
# host harness needs to know is printed on the serial console as marker
# lines starting with "VDEVLAB-".
#
# Kernel command line parameters (set by the harness):
#   vdevlab.run=<scenario>[,<arg>...][;<scenario>...]
#                                       guest programs to run in order: each
#                                       is a scenario and its arguments,
#                                       comma separated; runs separated by ';'
#   vdevlab.virtio_id=<id>              passed to the driver's virtio_id
#   vdevlab.qw_params=<name>=<value>[,...]
#                                       more driver module parameters (e.g.
#                                       dyndbg=+p, config_status=0)
#   vdevlab.shell=1                     open a shell instead of powering off
#   vdevlab.vport=<name>                wait for the virtio-serial port named
#                                       <name> and link it (and every other
#                                       named port) as /dev/virtio-ports/<name>
# A run list too long for the command line comes as /vdevlab.run (same
# format), in a second initramfs archive.
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VDEVLAB-BOOT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

run=""; vid=""; shell=""; qwp=""; vport=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vdevlab.run=*) run=${arg#vdevlab.run=} ;;
        vdevlab.virtio_id=*) vid=${arg#vdevlab.virtio_id=} ;;
        vdevlab.shell=*) shell=${arg#vdevlab.shell=} ;;
        vdevlab.qw_params=*) qwp=${arg#vdevlab.qw_params=} ;;
        vdevlab.vport=*) vport=${arg#vdevlab.vport=} ;;
    esac
done

# From here on every kernel message reaches the console, so a WARN or an
# oops during the scenario is seen live; a task stuck in D state for 10 s is
# reported by the hung-task detector.
echo 8 > /proc/sys/kernel/printk
[ -w /proc/sys/kernel/hung_task_timeout_secs ] && echo 10 > /proc/sys/kernel/hung_task_timeout_secs

fail() {
    echo "VDEVLAB-FAIL $1"
    finish 1
}
finish() {
    echo "VDEVLAB-EXIT $1"
    echo "VDEVLAB-DMESG-BEGIN"
    dmesg
    echo "VDEVLAB-DMESG-END"
    if [ "$shell" = 1 ]; then
        setsid cttyhack sh
    fi
    poweroff -f
}

# The kernel's own modules the driver needs first (virtio and virtio_pci
# where they are modular, e.g. Debian's 6.1), one name a line, in
# dependency order. Empty where virtio is built in.
if [ -f /lib/modules/preload.list ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod.ko" || fail "insmod $mod.ko (preloaded before the driver) failed"
    done < /lib/modules/preload.list
fi

# shellcheck disable=SC2046 # one word per parameter
if ! insmod /lib/modules/vdevlab_qw.ko ${vid:+virtio_id=$vid} $(echo "$qwp" | tr ',' ' '); then
    fail "insmod vdevlab_qw.ko failed"
fi
i=0
while [ ! -c /dev/qw0 ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no /dev/qw0 10 s after loading the driver (device not bound?)"
    sleep 0.1
done
echo "VDEVLAB-DRIVER-READY uptime=$(cut -d' ' -f1 /proc/uptime)"

# Named virtio-serial ports (the benchmark's baseline): no udev here, so
# link them as its rule does, /dev/virtio-ports/<name> -> ../vportNpM.
if [ -n "$vport" ]; then
    i=0
    while [ ! -e "/dev/virtio-ports/$vport" ]; do
        for f in /sys/class/virtio-ports/*/name; do
            [ -s "$f" ] || continue
            p=${f%/name}
            mkdir -p /dev/virtio-ports
            ln -sf "../${p##*/}" "/dev/virtio-ports/$(cat "$f")"
        done
        [ -e "/dev/virtio-ports/$vport" ] && break
        i=$((i + 1))
        [ $i -gt 100 ] && fail "no virtio-serial port named $vport 10 s after the driver (virtio_console loaded?)"
        sleep 0.1
    done
    echo "VDEVLAB-VPORT $vport $(readlink "/dev/virtio-ports/$vport")"
fi
[ -z "$run" ] && [ -f /vdevlab.run ] && run=$(cat /vdevlab.run)

if [ -z "$run" ]; then
    finish 0
fi
# Run every scenario in order; the exit marker counts the failures. A
# failing scenario does not stop the others: each reports its own result.
failures=0
old_ifs=$IFS
IFS=';'
set -f
for one in $run; do
    IFS=$old_ifs
    # shellcheck disable=SC2046
    /bin/vdevlab-guest $(echo "$one" | tr ',' ' ') || failures=$((failures + 1))
    IFS=';'
done
IFS=$old_ifs
set +f
finish $failures
