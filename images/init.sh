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
#                                       comma separated; runs separated by ';'.
#                                       A run whose first word is a path
#                                       (/...) runs that program instead of
#                                       /bin/vdevlab-guest
#   vdevlab.virtio_id=<id>              passed to the driver's virtio_id
#   vdevlab.qw_params=<name>=<value>[,...]
#                                       more driver module parameters (e.g.
#                                       dyndbg=+p, config_status=0)
#   vdevlab.shell=1                     open a shell on the console: after the
#                                       runs, or instead of them when there are
#                                       none (`vdevlab up`); between the markers
#                                       VDEVLAB-SHELL and VDEVLAB-SHELL-END
#   vdevlab.driver=<name>               the driver module to load,
#                                       /lib/modules/<name>.ko (default
#                                       vdevlab_qw; a user's own driver comes
#                                       in a second initramfs archive)
#   vdevlab.dev=<path>                  the device node the driver makes, waited
#                                       for before the runs (default /dev/qw0;
#                                       "none": do not wait)
#   vdevlab.vport=<name>                wait for the virtio-serial port named
#                                       <name> and link it (and every other
#                                       named port) as /dev/virtio-ports/<name>
#   vdevlab.irq_cpu=<n>                 an SMP guest: route every virtio
#                                       interrupt to CPU <n> once the driver is
#                                       bound, and report each one's per-CPU
#                                       counts then (VDEVLAB-IRQ start) and at
#                                       the end (VDEVLAB-IRQ end)
#   vdevlab.pin_cpu=<n>                 run the guest programs on CPU <n> only
#                                       (taskset), so their wake-ups come from
#                                       another CPU's interrupt
# A run list too long for the command line comes as /vdevlab.run (same
# format), in a second initramfs archive.
/bin/busybox mkdir -p /proc /sys /dev /tmp /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "VDEVLAB-BOOT uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"

run=""; vid=""; shell=""; qwp=""; vport=""; drv=vdevlab_qw; dev=/dev/qw0
irq_cpu=""; pin_cpu=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vdevlab.run=*) run=${arg#vdevlab.run=} ;;
        vdevlab.virtio_id=*) vid=${arg#vdevlab.virtio_id=} ;;
        vdevlab.shell=*) shell=${arg#vdevlab.shell=} ;;
        vdevlab.qw_params=*) qwp=${arg#vdevlab.qw_params=} ;;
        vdevlab.vport=*) vport=${arg#vdevlab.vport=} ;;
        vdevlab.driver=*) drv=${arg#vdevlab.driver=} ;;
        vdevlab.dev=*) dev=${arg#vdevlab.dev=} ;;
        vdevlab.irq_cpu=*) irq_cpu=${arg#vdevlab.irq_cpu=} ;;
        vdevlab.pin_cpu=*) pin_cpu=${arg#vdevlab.pin_cpu=} ;;
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
    [ -n "$irq_cpu" ] && virtio_irqs end
    echo "VDEVLAB-EXIT $1"
    echo "VDEVLAB-DMESG-BEGIN"
    dmesg
    echo "VDEVLAB-DMESG-END"
    [ "$shell" = 1 ] && console_shell
    poweroff -f
}
# An interactive shell on the serial console (its controlling tty, so
# Ctrl-C and job control work). This script is PID 1 and handles no
# signals, so a plain poweroff would do nothing: the shell's poweroff and
# reboot are the immediate kind.
console_shell() {
    shell=""
    cat > /tmp/vdevlab-shrc <<'EOF'
alias poweroff='poweroff -f'
alias reboot='poweroff -f'
PS1='vdevlab:\w# '
EOF
    echo "VDEVLAB-SHELL"
    ENV=/tmp/vdevlab-shrc setsid cttyhack sh
    echo "VDEVLAB-SHELL-END"
}

# Every virtio interrupt's /proc/interrupts line, after "VDEVLAB-IRQ $1"
# (the harness sums the per-CPU columns between start and end).
virtio_irqs() {
    grep -E 'virtio[0-9]' /proc/interrupts | while read -r line; do
        echo "VDEVLAB-IRQ $1 $line"
    done
}
# Route every virtio interrupt to CPU $irq_cpu: writable because virtio-pci
# does not give its vectors managed affinity unless a driver asks for it.
route_irqs() {
    [ "$irq_cpu" -lt "$(nproc)" ] || fail "vdevlab.irq_cpu=$irq_cpu, but the guest has $(nproc) CPUs"
    n=0
    for irq in $(grep -E 'virtio[0-9]' /proc/interrupts | cut -d: -f1); do
        echo "$irq_cpu" > "/proc/irq/$irq/smp_affinity_list" ||
            fail "could not route IRQ $irq to CPU $irq_cpu (/proc/irq/$irq/smp_affinity_list)"
        n=$((n + 1))
    done
    [ $n -gt 0 ] || fail "no virtio interrupt in /proc/interrupts to route to CPU $irq_cpu"
    echo "VDEVLAB-SMP cpus=$(nproc) irq_cpu=$irq_cpu pin_cpu=${pin_cpu:-none} irqs=$n"
    virtio_irqs start
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

# The reference driver takes the device's virtio id; a user's driver gets
# only the parameters it was given.
[ "$drv" = vdevlab_qw ] || vid=""
# shellcheck disable=SC2046 # one word per parameter
if ! insmod "/lib/modules/$drv.ko" ${vid:+virtio_id=$vid} $(echo "$qwp" | tr ',' ' '); then
    fail "insmod $drv.ko failed"
fi
i=0
while [ "$dev" != none ] && [ ! -e "$dev" ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "no $dev 10 s after loading $drv (device not bound?)"
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
[ -n "$irq_cpu" ] && route_irqs
[ -z "$run" ] && [ -f /vdevlab.run ] && run=$(cat /vdevlab.run)

if [ -z "$run" ]; then
    # `vdevlab up`: the shell first, then the usual end.
    [ "$shell" = 1 ] && console_shell
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
    case "$one" in
        /*) prog="" ;;
        *) prog=/bin/vdevlab-guest ;;
    esac
    [ -n "$pin_cpu" ] && prog="taskset -c $pin_cpu $prog"
    # shellcheck disable=SC2046
    $prog $(echo "$one" | tr ',' ' ') || failures=$((failures + 1))
    IFS=';'
done
IFS=$old_ifs
set +f
finish $failures
