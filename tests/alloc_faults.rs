//! Kernel-side fault injection against the qw driver (issue 14, item 4):
//! on the lockdep kernel, built with the kernel's fault injection and
//! kmemleak (images/lab-kernel-lockdep.config) and booted with
//! `kmemleak=on`, the `alloc-faults` guest program fails the driver's own
//! allocations one at a time in open, write, native AIO, probe and read
//! (`vdevlab_guest::scenarios::alloc_faults`). Every failure must end in a
//! clean error or a working device, kmemleak must find nothing, and the
//! console no splat. The test also holds the walks to having reached the
//! sites each path has, so a filter that silently matched nothing fails.

use serde_json::Value;
use vdevlab_lab::alloc_faults;
use vdevlab_lab::cell::Cell;
use vdevlab_tests::{assert_passed, in_cell, lab};

/// The walk of `path` in the result: it completed, injected at least
/// `min` failures, and reached a site naming each of `sites`.
fn assert_walk(result: &Value, path: &str, min: u64, sites: &[&str]) {
    let w = &result[path];
    assert_eq!(w["complete"], true, "{path}: the walk did not end: {w}");
    let injected = w["injected"].as_u64().unwrap_or(0);
    assert!(
        injected >= min,
        "{path}: {injected} failures injected, at least {min} expected: {w}"
    );
    let reached: Vec<&String> = w["sites"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    for want in sites {
        assert!(
            reached.iter().any(|s| s.contains(want)),
            "{path}: no site with {want:?} reached; reached: {reached:?}"
        );
    }
}

#[test]
fn driver_allocation_failures_end_cleanly_without_leaks() {
    let test = concat!(
        module_path!(),
        "::driver_allocation_failures_end_cleanly_without_leaks"
    );
    let lab = lab();
    if let Err(e) = lab.env.kernel("lockdep") {
        panic!("{test} needs the lockdep kernel: {e:#}");
    }
    in_cell(Some("lockdep"), Cell::QEMU_TCG, test, |cell| {
        let kernel = lab.env.kernel("lockdep").unwrap().clone();
        let out = alloc_faults::run(&lab, &kernel, cell).expect("the guest boots");
        assert_passed(&out);
        let r = out.result.as_ref().expect("a result line");
        eprintln!("{}", serde_json::to_string_pretty(r).unwrap_or_default());
        assert_eq!(r["kmemleak"], "on", "kmemleak must check: {r}");
        assert_eq!(r["leaks"], Value::Array(Vec::new()));
        // open allocates nothing of its own; a walk of one call.
        assert_walk(r, "open", 0, &[]);
        assert_walk(r, "write", 1, &["qw_tx_push_one<qw_write_sync"]);
        assert_walk(r, "aio_write", 1, &["qw_tx_push_one<qw_write_iter"]);
        assert_walk(
            r,
            "probe",
            10,
            &[
                "qw_probe -> __kmalloc_cache_noprof",
                "qw_init_vqs<qw_probe",
                "qw_rx_fill<qw_probe",
                "-> cdev_alloc",
                "-> cdev_add",
                "-> device_create_with_groups",
            ],
        );
        assert_walk(r, "read", 1, &["qw_rx_fill<qw_rx_check"]);
        assert_walk(
            r,
            "aio_read",
            2,
            &[
                "qw_aio_queue -> __kmalloc_cache_noprof",
                "qw_aio_queue -> dup_iter",
            ],
        );
        assert_walk(r, "reset", 2, &["qw_rx_fill<", "qw_init_vqs<"]);
    });
}
