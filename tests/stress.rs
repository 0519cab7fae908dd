//! The concurrency stress (`vdevlab_lab::stress`): readers and writers in
//! every I/O model at once on `/dev/qw0`, open/close churn, flush and
//! reset ioctls, signals at tasks asleep in the driver, lock holders,
//! interrupt-mode (config) changes from the host, then an unbind while
//! all of it runs. The short CI subset: one seed, a few seconds; the full
//! campaign is `vdevlab stress`.
//!
//! Each test checks the verdict (the engine's, with the stress's own
//! accounts: every record read once or flushed or dropped by the unbind,
//! exactly; every written record captured or dropped by a reset, to the
//! byte) and that the contended paths were reached: the counts in the
//! result are above 0.

use vdevlab_lab::cell::Cell;
use vdevlab_lab::stress::{self, Stress, SENSOR_CONTENDED};
use vdevlab_tests::{assert_passed, lab};

/// Seconds of stress in the CI subset.
const SECONDS: u64 = 12;

fn field(out: &vdevlab_lab::scenario::Outcome, name: &str) -> u64 {
    let v = out.result.as_ref().expect("a result line");
    v.get(name).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

// In the SMP cells (`qemu_tcg_smp::`, ...): the threads on every CPU, the
// device's interrupts on the last one. On the default kernel, and on the
// lab kernel's lockdep variant, where the race detectors watch.
mod trixie {
    vdevlab_tests::cell_tests!(smp kernel "trixie"; stress_qw_short, stress_sensor_short);
}
mod lockdep {
    vdevlab_tests::cell_tests!(smp kernel "lockdep"; stress_qw_short, stress_sensor_short);
}

/// The stress on `kernel`: the verdict, and every contended path reached.
fn stress_qw_short(kernel: &str, cell: Cell) {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let st = Stress::new(0x5eed, SECONDS);
    let out = stress::run(&lab, &kernel, cell, &st, |_| {}).expect("the stress could run");
    assert_passed(&out);
    // The unbind frees the device's interrupt line before init's final
    // count, so there are no per-CPU counts to check; the vCPUs are.
    assert_eq!(out.record.vcpus, cell.vcpus().ok(), "vcpus on record");
    let v = out.result.as_ref().expect("a result line");
    // Both kernels have userfaultfd: the locker's paths too.
    assert_eq!(v["uffd"], true, "{v}");
    let unreached: Vec<&str> = stress::expected_paths(v)
        .into_iter()
        .filter(|k| field(&out, k) == 0)
        .collect();
    assert!(
        unreached.is_empty(),
        "contended paths not reached: {unreached:?}\nresult: {v}"
    );
    // Every reader got data, and the writers' records reached the host.
    let readers = v["reader_bytes"].as_array().expect("reader_bytes");
    assert!(readers.iter().all(|b| b.as_u64() > Some(0)), "{v}");
    assert!(
        out.captured.len() > 100_000,
        "{} bytes captured",
        out.captured.len()
    );
    assert!(field(&out, "opens") > 100, "{v}");
}

/// The sensor's smaller stress: its three queues at once (readers, the
/// alarm taker, two controllers racing for the control queue, config
/// reads), signals and churn, then an unbind; every sample the driver
/// received read once (or counted dropped), every path reached.
fn stress_sensor_short(kernel: &str, cell: Cell) {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let art = vdevlab_lab::sensor::prepare(&lab).expect("the sensor builds");
    let st = Stress {
        readers: 3,
        ..Stress::new(0x5e, 8)
    };
    let out =
        stress::run_sensor(&lab, &art, &kernel, cell, &st, |_| {}).expect("the stress could run");
    assert_passed(&out);
    let v = out.result.as_ref().expect("a result line");
    let unreached: Vec<&str> = SENSOR_CONTENDED
        .iter()
        .copied()
        .filter(|k| field(&out, k) == 0)
        .collect();
    assert!(
        unreached.is_empty(),
        "contended paths not reached: {unreached:?}\nresult: {v}"
    );
    assert_eq!(field(&out, "lost_at_unbind"), 0, "{v}");
}
