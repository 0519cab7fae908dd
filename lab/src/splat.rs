//! Kernel splats: the console lines that mean the guest kernel complained
//! (oops, BUG, WARN, lockdep, KCSAN, KASAN, debug objects, hung task,
//! panic, ...). Any of them fails a test.
//!
//! The race detectors of the lockdep and kcsan kernels
//! (`images/lab-kernel.sh --variant lockdep|kcsan`) each start a report
//! with a headline of their own; the texts below are those of Linux 6.12
//! (kernel/locking/lockdep.c, kernel/locking/spinlock_debug.c,
//! kernel/kcsan/report.c, lib/debugobjects.c, kernel/sched/core.c,
//! kernel/workqueue.c, lib/list_debug.c). A report has several matching
//! lines (a WARN's "cut here" and "WARNING: CPU:" around its message);
//! each is listed, under the most specific kind.

/// One splat found on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splat {
    /// What kind of report it is.
    pub kind: &'static str,
    /// The console line.
    pub line: String,
}

/// (kind, text that identifies it). Matched anywhere in a line; the first
/// match names the kind, so the specific texts come before the generic
/// "BUG: " and "WARNING: CPU:".
const PATTERNS: &[(&str, &str)] = &[
    // -- lockdep (PROVE_LOCKING, PROVE_RCU) --
    ("lockdep", "possible circular locking dependency"),
    ("lockdep", "possible recursive locking detected"),
    ("lockdep", "possible irq lock inversion dependency detected"),
    // "WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected"
    ("lockdep", "-unsafe lock order detected"),
    ("lockdep", "inconsistent lock state"),
    ("lockdep", "bad unlock balance detected"),
    ("lockdep", "held lock freed"),
    ("lockdep", "still has locks held"),
    ("lockdep", "Nested lock was not taken"),
    ("lockdep", "chain_key collision"),
    ("lockdep", "BUG: Invalid wait context"),
    ("lockdep", "suspicious RCU usage"),
    ("lockdep", "lock held when returning to user space"),
    // A lock used before spin_lock_init() (or a dynamic key not registered).
    ("lockdep", "INFO: trying to register non-static key"),
    ("lockdep", "BUG: key "),
    // lockdep's tables full: it stops checking ("BUG: MAX_LOCKDEP_KEYS too
    // low!"), which hides whatever came next.
    ("lockdep", "BUG: MAX_LOCK"),
    ("lockdep", "BUG: MAX_STACK_TRACE_ENTRIES too low"),
    ("lockdep", "BUG: looking up invalid subclass"),
    // The checks of the lock primitives (DEBUG_MUTEXES, DEBUG_RWSEMS, lockdep's
    // own consistency checks): a WARN with this message.
    ("lockdep", "DEBUG_LOCKS_WARN_ON("),
    // -- KCSAN: "BUG: KCSAN: data-race in f / g", "BUG: KCSAN: assert: race in f" --
    ("kcsan", "BUG: KCSAN: "),
    // -- DEBUG_SPINLOCK: "BUG: spinlock bad magic on CPU#0, ...", "already
    // unlocked", "wrong owner", "wrong CPU", "recursion"; the same for rwlocks --
    ("spinlock", "BUG: spinlock "),
    ("spinlock", "BUG: rwlock "),
    // -- DEBUG_OBJECTS: "ODEBUG: free active (active state 0) object: ...
    // object type: timer_list hint: ...", "ODEBUG: object ... is on stack
    // ..., but NOT annotated.", "ODEBUG: Out of memory. ODEBUG disabled" --
    ("debug-objects", "ODEBUG: "),
    // -- DEBUG_ATOMIC_SLEEP and the scheduler --
    (
        "sleep-in-atomic",
        "sleeping function called from invalid context",
    ),
    ("sleep-in-atomic", "BUG: assuming atomic context"),
    ("sleep-in-atomic", "BUG: assuming non migratable context"),
    ("scheduling-while-atomic", "scheduling while atomic"),
    (
        "scheduling-while-atomic",
        "scheduling in a non-blocking section",
    ),
    // A task that ended with a spinlock held or interrupts off.
    ("scheduling-while-atomic", "exited with preempt_count"),
    ("scheduling-while-atomic", "exited with irqs disabled"),
    // A work item that returned holding a lock, in atomic context or in an
    // RCU read section: "BUG: workqueue leaked atomic, lock or RCU: ..."
    ("workqueue-leak", "BUG: workqueue leaked"),
    ("workqueue-lockup", "BUG: workqueue lockup"),
    // -- DEBUG_LIST (and CHECK_DATA_CORRUPTION) --
    ("list-corruption", "list_add corruption"),
    ("list-corruption", "list_del corruption"),
    ("list-corruption", "list_add double add"),
    // -- The rest of the kernel --
    ("kasan", "KASAN:"),
    ("ubsan", "UBSAN:"),
    ("hung-task", "blocked for more than"),
    ("soft-lockup", "soft lockup"),
    ("rcu-stall", "rcu_sched self-detected stall"),
    ("rcu-stall", "rcu: INFO:"),
    ("refcount", "refcount_t:"),
    ("oops", "Oops:"),
    ("oops", "Oops - "),
    ("panic", "Kernel panic - not syncing"),
    ("gpf", "general protection fault"),
    ("fault", "Unable to handle kernel"),
    ("fault", "unable to handle page fault"),
    ("bug", "kernel BUG at"),
    ("bug", "BUG: "),
    ("warn", "WARNING: CPU:"),
    ("warn", "------------[ cut here ]------------"),
    // -- kmemleak (DEBUG_KMEMLEAK, on with kmemleak=on): with its verbose
    // parameter set, each scan logs every new leak as "kmemleak:
    // unreferenced object 0xffff888003a1c000 (size 4096):" and its
    // backtrace (mm/kmemleak.c); `alloc-faults` sets it --
    ("kmemleak", "unreferenced object 0x"),
];

/// Lines that contain a pattern but are no splat.
const NOT_SPLATS: &[&str] = &[
    // DEBUG_OBJECTS_SELFTEST's all-clear (off in the lab's kernels).
    "ODEBUG: selftest passed",
];

/// Lines that say a detector has stopped checking. They are consequences,
/// not reports: lockdep turns itself off after its first report (which
/// [`find_splats`] finds), and after a taint that makes it unreliable
/// (a WARN, an oops: found too). Later hung-task or lock dumps then say
/// "INFO: lockdep is turned off.". A run that shows one of these and no
/// splat lost its checking for another reason, and its "no splat" proves
/// less: see [`detectors_off`].
const DETECTOR_OFF: &[&str] = &[
    "INFO: lockdep is turned off",
    "turning off the locking correctness validator",
    "Disabling lock debugging due to kernel taint",
    // kmemleak gave up (its metadata could not be allocated, or an
    // internal error): it checks nothing from then on.
    "Kernel memory leak detector disabled",
];

/// The message of a console line: from after the timestamp on, so that the
/// dmesg dump (which repeats the live log) compares equal.
fn message(line: &str) -> &str {
    line.split_once("] ").map(|(_, m)| m).unwrap_or(line)
}

/// Every splat in `console`, in order, each line reported once (the
/// console holds the live log and a dmesg dump that repeats it).
pub fn find_splats(console: &str) -> Vec<Splat> {
    let mut found: Vec<Splat> = Vec::new();
    for line in console.lines() {
        let msg = message(line);
        if NOT_SPLATS.iter().any(|n| msg.contains(n)) {
            continue;
        }
        let Some((kind, _)) = PATTERNS.iter().find(|(_, pat)| msg.contains(pat)) else {
            continue;
        };
        if !found.iter().any(|s| message(&s.line) == msg) {
            found.push(Splat {
                kind,
                line: line.to_string(),
            });
        }
    }
    found
}

/// The console lines that say a race detector stopped checking (lockdep
/// turned off), each once. Not splats (see `DETECTOR_OFF`): a test that
/// relies on lockdep can ask for none.
pub fn detectors_off(console: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for line in console.lines() {
        let msg = message(line);
        if DETECTOR_OFF.iter().any(|p| msg.contains(p)) && !found.iter().any(|l| message(l) == msg)
        {
            found.push(line.to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(console: &str) -> Vec<&'static str> {
        find_splats(console).iter().map(|s| s.kind).collect()
    }

    #[test]
    fn finds_each_kind_once() {
        let console = "\
[    1.0] virtio_net: ok
[    2.0] ------------[ cut here ]------------
[    2.0] WARNING: CPU: 0 PID: 1 at drivers/char/qw.c:10 qw_read+0x1/0x2
[    3.0] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    4.0] INFO: task cat:55 blocked for more than 10 seconds.
VDEVLAB-DMESG-BEGIN
[    2.000000] WARNING: CPU: 0 PID: 1 at drivers/char/qw.c:10 qw_read+0x1/0x2
";
        assert_eq!(kinds(console), ["warn", "warn", "bug", "hung-task"]);
    }

    #[test]
    fn a_clean_boot_has_none() {
        let console = "\
[    0.5] Linux version 7.3.4+deb13-amd64
[    1.2] vdevlab_qw: loading out-of-tree module taints kernel.
[    1.3] vdevlab_qw: module verification failed: signature and/or required key missing - tainting kernel
VDEVLAB-RESULT {\"ok\":true}
";
        assert!(find_splats(console).is_empty());
    }

    /// A clean boot of the lockdep and kcsan kernels: their banners and
    /// the debug-objects and KCSAN start-up lines are no splat.
    #[test]
    fn the_detectors_banners_are_no_splat() {
        let console = "\
[    0.000000] Linux version 6.12.118-vdevlab-lockdep (root@host) (gcc (Debian 14.2.0-19) 14.2.0)
[    0.210000] Lock dependency validator: Copyright (c) 2006 Red Hat, Inc., Ingo Molnar
[    0.210000] ... MAX_LOCKDEP_SUBCLASSES:  8
[    0.210000] ... MAX_LOCK_DEPTH:          48
[    0.210000] ... MAX_LOCKDEP_KEYS:        8192
[    0.210000] ... CLASSHASH_SIZE:          4096
[    0.210000] ... MAX_LOCKDEP_ENTRIES:     32768
[    0.210000] ... MAX_LOCKDEP_CHAINS:      65536
[    0.210000] ... CHAINHASH_SIZE:          32768
[    0.210000]  memory used by lock dependency info: 6365 kB
[    0.210000]  memory used for stack traces: 4224 kB
[    0.210000]  per task-struct memory footprint: 1920 bytes
[    0.350000] ODEBUG: selftest passed
[    0.400000] kcsan: enabled early
[    0.400000] kcsan: strict mode configured
[    1.100000] vdevlab_qw: loading out-of-tree module taints kernel.
";
        assert!(
            find_splats(console).is_empty(),
            "{:?}",
            find_splats(console)
        );
        assert!(detectors_off(console).is_empty());
    }

    #[test]
    fn lockdep_reports() {
        let console = "\
[   12.345678] ======================================================
[   12.345679] WARNING: possible circular locking dependency detected
[   12.345680] 6.12.118-vdevlab-lockdep #1 Tainted: G           O
[   12.345681] ------------------------------------------------------
[   12.345682] qw-stress/77 is trying to acquire lock:
[   12.345683] ffff888003a1c0d8 (&qw->rx_lock){+.+.}-{2:2}, at: qw_read+0x5a/0x2c0 [vdevlab_qw]
[   13.000000] ========================================================
[   13.000001] WARNING: possible irq lock inversion dependency detected
[   13.100000] =====================================================
[   13.100001] WARNING: HARDIRQ-safe -> HARDIRQ-unsafe lock order detected
[   14.000000] ================================
[   14.000001] WARNING: inconsistent lock state
[   14.000002] inconsistent {IN-HARDIRQ-W} -> {HARDIRQ-ON-W} usage.
[   15.000000] ============================================
[   15.000001] WARNING: possible recursive locking detected
[   16.000000] =====================================
[   16.000001] WARNING: bad unlock balance detected!
[   17.000000] ================================================
[   17.000001] WARNING: lock held when returning to user space!
[   18.000000] =========================
[   18.000001] WARNING: held lock freed!
[   19.000000] ====================================
[   19.000001] WARNING: qw-stress/80 still has locks held!
[   20.000000] =============================
[   20.000001] [ BUG: Invalid wait context ]
[   21.000000] =============================
[   21.000001] WARNING: suspicious RCU usage
[   22.000000] INFO: trying to register non-static key.
[   22.000001] The code is fine but needs lockdep annotation, or maybe
[   22.000002] you didn't initialize this object before use?
[   22.000003] turning off the locking correctness validator.
[   23.000000] BUG: MAX_LOCKDEP_CHAIN_HLOCKS too low!
[   24.000000] ------------[ cut here ]------------
[   24.000001] DEBUG_LOCKS_WARN_ON(__owner != current)
[   24.000002] WARNING: CPU: 1 PID: 81 at kernel/locking/mutex.c:912 __mutex_unlock_slowpath+0x1a0/0x2b0
";
        assert_eq!(
            kinds(console),
            [
                "lockdep", "lockdep", "lockdep", "lockdep", "lockdep", "lockdep", "lockdep",
                "lockdep", "lockdep", "lockdep", "lockdep", "lockdep", "lockdep", "warn",
                "lockdep", "warn"
            ]
        );
        assert_eq!(
            detectors_off(console),
            ["[   22.000003] turning off the locking correctness validator."]
        );
    }

    #[test]
    fn kcsan_reports() {
        let console = "\
[   30.100000] ==================================================================
[   30.100001] BUG: KCSAN: data-race in qw_irq_handler [vdevlab_qw] / qw_read [vdevlab_qw]
[   30.100002]
[   30.100003] write to 0xffff888003a1c120 of 4 bytes by interrupt on cpu 1:
[   30.100004]  qw_irq_handler+0x8c/0x1f0 [vdevlab_qw]
[   30.100005]
[   30.100006] read to 0xffff888003a1c120 of 4 bytes by task 91 on cpu 0:
[   30.100007]  qw_read+0x113/0x2c0 [vdevlab_qw]
[   30.100008]
[   30.100009] value changed: 0x00000003 -> 0x00000004
[   31.000000] BUG: KCSAN: data-race in qw_poll [vdevlab_qw]
[   31.000001] race at unknown origin, with read to 0xffff888003a1c124 of 4 bytes by task 92 on cpu 1:
[   32.000000] BUG: KCSAN: assert: race in qw_reclaim [vdevlab_qw] / qw_write [vdevlab_qw]
";
        assert_eq!(kinds(console), ["kcsan", "kcsan", "kcsan"]);
    }

    #[test]
    fn spinlock_object_and_atomic_reports() {
        let console = "\
[   40.000000] BUG: spinlock bad magic on CPU#1, qw-stress/93
[   40.000001]  lock: 0xffff888003a1c0d8, .magic: 00000000, .owner: <none>/-1, .owner_cpu: 0
[   41.000000] BUG: spinlock already unlocked on CPU#0, swapper/0/0
[   42.000000] BUG: rwlock wrong owner on CPU#1, qw-stress/94, ffff888003a1c200
[   43.000000] ------------[ cut here ]------------
[   43.000001] ODEBUG: free active (active state 0) object: ffff888003a1c300 object type: timer_list hint: qw_timeout+0x0/0x40 [vdevlab_qw]
[   43.000002] WARNING: CPU: 0 PID: 95 at lib/debugobjects.c:514 debug_print_object+0x8d/0xb0
[   44.000000] ODEBUG: object 00000000b1c2d3e4 is on stack 00000000a1b2c3d4, but NOT annotated.
[   45.000000] BUG: sleeping function called from invalid context at kernel/locking/mutex.c:585
[   45.000001] in_atomic(): 1, irqs_disabled(): 0, non_block: 0, pid: 96, name: qw-stress
[   45.000002] preempt_count: 1, expected: 0
[   46.000000] BUG: scheduling while atomic: qw-stress/97/0x00000002
[   47.000000] BUG: workqueue leaked atomic, lock or RCU: kworker/1:2[98]
[   47.000001]      preempt=0x00000000 lock=1->0 RCU=0->0 workfn=qw_reset_work [vdevlab_qw]
[   48.000000] note: qw-stress[99] exited with preempt_count 1
[   49.000000] list_add double add: new=ffff888003a1c400, prev=ffff888003a1c400, next=ffff888003a1c410.
[   50.000000] list_del corruption, ffff888003a1c400->next is LIST_POISON1 (dead000000000100)
";
        assert_eq!(
            kinds(console),
            [
                "spinlock",
                "spinlock",
                "spinlock",
                "warn",
                "debug-objects",
                "warn",
                "debug-objects",
                "sleep-in-atomic",
                "scheduling-while-atomic",
                "workqueue-leak",
                "scheduling-while-atomic",
                "list-corruption",
                "list-corruption",
            ]
        );
    }

    #[test]
    fn kmemleak_reports() {
        let console = "\
[   80.000000] kmemleak: unreferenced object 0xffff888003a1c000 (size 4096):
[   80.000001] kmemleak:   comm \"vdevlab-guest\", pid 77, jiffies 4294900000
[   80.000002] kmemleak:   backtrace (crc 1234abcd):
[   80.000003] kmemleak:     qw_rx_buf_alloc+0x2e/0x80 [vdevlab_qw]
[   80.100000] kmemleak: 1 new suspected memory leaks (see /sys/kernel/debug/kmemleak)
[   81.000000] FAULT_INJECTION: forcing a failure.
[   81.000001] vdevlab-guest: page allocation failure: order:0, mode:0xcc0(GFP_KERNEL)
[   90.000000] kmemleak: Kernel memory leak detector disabled
";
        assert_eq!(kinds(console), ["kmemleak"]);
        assert_eq!(
            detectors_off(console),
            ["[   90.000000] kmemleak: Kernel memory leak detector disabled"]
        );
    }

    #[test]
    fn lockdep_turned_off_is_a_consequence() {
        // A WARN taints the kernel and turns lockdep off; a later hung
        // task's lock dump says so. The WARN and the hung task are the
        // splats; the rest is reported by detectors_off.
        let console = "\
[   60.000000] WARNING: CPU: 0 PID: 100 at drivers/char/qw.c:10 qw_read+0x1/0x2
[   60.000001] Disabling lock debugging due to kernel taint
[   90.000000] INFO: task cat:101 blocked for more than 30 seconds.
[   90.000001] INFO: lockdep is turned off.
VDEVLAB-DMESG-BEGIN
[   90.000001] INFO: lockdep is turned off.
";
        assert_eq!(kinds(console), ["warn", "hung-task"]);
        assert_eq!(
            detectors_off(console),
            [
                "[   60.000001] Disabling lock debugging due to kernel taint",
                "[   90.000001] INFO: lockdep is turned off."
            ]
        );
    }
}
