//! Kernel splats: the console lines that mean the guest kernel complained
//! (oops, BUG, WARN, lockdep, KASAN, hung task, panic, ...). Any of them fails
//! a test.

/// One splat found on the console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splat {
    /// What kind of report it is.
    pub kind: &'static str,
    /// The console line.
    pub line: String,
}

/// (kind, text that identifies it). Matched anywhere in a line.
const PATTERNS: &[(&str, &str)] = &[
    ("oops", "Oops:"),
    ("oops", "Oops - "),
    ("bug", "BUG: "),
    ("bug", "kernel BUG at"),
    ("warn", "WARNING: CPU:"),
    ("warn", "------------[ cut here ]------------"),
    ("panic", "Kernel panic - not syncing"),
    ("gpf", "general protection fault"),
    ("fault", "Unable to handle kernel"),
    ("fault", "unable to handle page fault"),
    ("lockdep", "possible circular locking dependency"),
    ("lockdep", "possible recursive locking detected"),
    ("lockdep", "inconsistent lock state"),
    ("lockdep", "suspicious RCU usage"),
    ("lockdep", "lock held when returning to user space"),
    ("kasan", "KASAN:"),
    ("ubsan", "UBSAN:"),
    ("hung-task", "blocked for more than"),
    ("soft-lockup", "soft lockup"),
    ("rcu-stall", "rcu_sched self-detected stall"),
    ("rcu-stall", "rcu: INFO:"),
    ("list-corruption", "list_add corruption"),
    ("list-corruption", "list_del corruption"),
    ("refcount", "refcount_t:"),
    (
        "sleep-in-atomic",
        "sleeping function called from invalid context",
    ),
    ("scheduling-while-atomic", "scheduling while atomic"),
];

/// Every splat in `console`, in order, each line reported once (the
/// console holds the live log and a dmesg dump that repeats it).
pub fn find_splats(console: &str) -> Vec<Splat> {
    let mut found: Vec<Splat> = Vec::new();
    for line in console.lines() {
        // The dmesg dump repeats kernel lines with the same text; compare
        // from the message onwards so each report counts once.
        let msg = line.split_once("] ").map(|(_, m)| m).unwrap_or(line);
        for (kind, pat) in PATTERNS {
            if msg.contains(pat) {
                if !found
                    .iter()
                    .any(|s| s.line.split_once("] ").map(|(_, m)| m).unwrap_or(&s.line) == msg)
                {
                    found.push(Splat {
                        kind,
                        line: line.to_string(),
                    });
                }
                break;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let s = find_splats(console);
        let kinds: Vec<_> = s.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, ["warn", "warn", "bug", "hung-task"]);
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
}
