//! Proof that the lab catches races (issue 13, item 4): race bugs seeded
//! into scratch copies of the driver (`faults/races/seeded.toml`,
//! `vdevlab_lab::seeded`) must make the layer expected to catch them fail,
//! for the expected reason, and the unseeded driver must pass the same
//! scenarios, so every test here can fail both ways. Only what a layer
//! catches (nearly) every time is a test; `vdevlab races --repeat N` runs
//! the whole campaign, KCSAN's seeds included, and says how often.
//!
//! - `lab::qemu_tcg_smp::…`: two vCPUs, the device's interrupts on CPU 1,
//!   the programs on CPU 0;
//! - `lab::qemu_tcg::…`: the same seed on one vCPU, where it cannot bite;
//! - `lockdep::…`: the lockdep kernel (failing, with the fix, where it is not
//!   provisioned).

use vdevlab_lab::cell::Cell;
use vdevlab_lab::scenario::Outcome;
use vdevlab_lab::seeded::{self, classify, Batch, Catch};
use vdevlab_tests::{assert_passed, lab};

/// Run `seed` (`None`: the reference driver) with `batch` on `kernel`.
fn run(kernel: &str, cell: Cell, seed: Option<&str>, batch: Batch) -> Vec<Outcome> {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let seed = seed.map(|s| seeded::named(s).unwrap_or_else(|e| panic!("{e:#}")));
    let scenarios = batch.scenarios().expect("the batch's scenarios");
    let outs = seeded::run(&lab, &kernel, cell, seed.as_ref(), &scenarios)
        .expect("the seeded driver builds and boots");
    assert_eq!(outs.len(), scenarios.len());
    let want = seed.map(|s| s.driver_label());
    for o in &outs {
        assert_eq!(o.record.driver, want, "the record names the driver");
    }
    outs
}

/// The boot must have failed, the first failure being of kind `how`
/// (`seeded::classify`) and its reason containing `text`.
fn assert_caught(outs: &[Outcome], how: &str, text: &str) {
    let c = Catch::of(&Ok(outs.to_vec()));
    assert!(
        c.caught,
        "the seeded bug went unnoticed: every scenario passed"
    );
    assert_eq!(c.how, how, "caught, but not as expected: {}", c.detail);
    assert!(
        c.detail.contains(text),
        "{how}, but without {text:?}: {}",
        c.detail
    );
}

/// The seed of a lost wake-up (the rx callback wakes the readers before
/// filing the buffers, 2 ms apart): on two vCPUs a reader woken on CPU 0
/// re-checks before CPU 1 filed the buffer and sleeps on with data filed,
/// so the batch times out within its budget (seconds), without a splat.
fn lost_wakeup_seed_hangs_a_reader_on_smp(kernel: &str, cell: Cell) {
    let outs = run(
        kernel,
        cell,
        Some("rx-wake-before-harvest-wide"),
        Batch::IoModels,
    );
    assert_caught(&outs, "timeout", "-rx");
    for o in &outs {
        let why = o.record.reason.as_deref().unwrap_or("");
        assert!(
            !why.contains("kernel "),
            "a lost wake-up is no splat: {why}"
        );
    }
}

/// The same seed on one vCPU: the callback runs to completion, irqs off,
/// before the woken reader does, so nothing is lost and the batch passes.
/// This is why the suite has SMP cells.
fn lost_wakeup_seed_is_invisible_on_one_vcpu(kernel: &str, cell: Cell) {
    for o in run(
        kernel,
        cell,
        Some("rx-wake-before-harvest-wide"),
        Batch::IoModels,
    ) {
        assert_passed(&o);
    }
}

/// The unseeded driver passes what the seeds run, with their budgets: the
/// I/O-model batch and the teardown, in one boot.
fn reference_driver_passes_the_seeded_scenarios(kernel: &str, cell: Cell) {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let mut scenarios = Batch::IoModels.scenarios().unwrap();
    scenarios.extend(Batch::Teardown.scenarios().unwrap());
    let outs = seeded::run(&lab, &kernel, cell, None, &scenarios).expect("the scenarios could run");
    for o in &outs {
        assert_passed(o);
        assert_eq!(o.record.driver, None);
    }
}

mod lab {
    vdevlab_tests::cell_tests!(smp kernel "lab";
        lost_wakeup_seed_hangs_a_reader_on_smp,
        reference_driver_passes_the_seeded_scenarios,
    );
    vdevlab_tests::cell_tests!(kernel "lab";
        lost_wakeup_seed_is_invisible_on_one_vcpu,
    );
}

/// Run `body` on the lockdep kernel in QEMU/TCG (one vCPU: lockdep's
/// verdicts need no second CPU). Provisioning builds that kernel by
/// default; a lab without it fails here like every `lockdep::` test, with
/// the fix (images/lab-kernel.sh --variant lockdep).
fn on_lockdep(test: &str, body: impl FnOnce(Cell)) {
    let lab = lab();
    if let Err(e) = lab.env.kernel("lockdep") {
        panic!("{test} needs the lockdep kernel: {e:#}");
    }
    vdevlab_tests::in_cell(Some("lockdep"), Cell::QEMU_TCG, test, body);
}

/// `lockdep_assert_held()` is a `WARN_ON()`: a kernel built without
/// CONFIG_BUG (tinyconfig with EXPERT turns it off) compiles it to a silent
/// test, and its lockdep cannot report an unheld lock. Fail saying so.
fn assert_kernel_can_warn(kernel: &str) {
    let lab = lab();
    let k = lab.env.kernel(kernel).unwrap();
    let config = std::fs::read_to_string(k.headers.join(".config")).unwrap_or_default();
    assert!(
        config.is_empty() || config.lines().any(|l| l == "CONFIG_BUG=y"),
        "the {kernel} kernel ({}) is built without CONFIG_BUG: WARN_ON(), and with it \
         lockdep_assert_held() and DEBUG_LIST's reports, print nothing (and BUG() hangs \
         silently); set CONFIG_BUG=y in images/lab-kernel.config and rebuild it",
        k.release
    );
}

mod lockdep {
    use super::*;

    /// rx_lock taken out of the rx callback's harvest:
    /// `lockdep_assert_held()` in the harvest warns at the first rx
    /// interrupt, whichever CPU takes it.
    #[test]
    fn rx_harvest_unlocked_warns() {
        on_lockdep(
            concat!(module_path!(), "::rx_harvest_unlocked_warns"),
            |cell| {
                assert_kernel_can_warn("lockdep");
                let outs = run(
                    "lockdep",
                    cell,
                    Some("rx-harvest-unlocked"),
                    Batch::IoModels,
                );
                assert_caught(&outs, "splat:warn", "qw_rx_harvest_locked");
            },
        );
    }

    /// tx_lock taken out of the tx callback's reclaim: its assertion warns.
    #[test]
    fn tx_reclaim_unlocked_warns() {
        on_lockdep(
            concat!(module_path!(), "::tx_reclaim_unlocked_warns"),
            |cell| {
                assert_kernel_can_warn("lockdep");
                let outs = run(
                    "lockdep",
                    cell,
                    Some("tx-reclaim-unlocked"),
                    Batch::IoModels,
                );
                assert_caught(&outs, "splat:warn", "qw_tx_reclaim_locked");
            },
        );
    }

    /// Removal taking tx_lock before rx_lock: lockdep reports the AB-BA
    /// order at the first removal, though the two never overlapped.
    #[test]
    fn set_gone_lock_inversion_is_reported() {
        on_lockdep(
            concat!(module_path!(), "::set_gone_lock_inversion_is_reported"),
            |cell| {
                let outs = run(
                    "lockdep",
                    cell,
                    Some("set-gone-lock-inversion"),
                    Batch::Teardown,
                );
                assert_caught(&outs, "splat:lockdep", "circular locking");
            },
        );
    }

    /// The reference driver gives lockdep nothing to report in the same
    /// scenarios.
    #[test]
    fn reference_driver_is_clean() {
        on_lockdep(
            concat!(module_path!(), "::reference_driver_is_clean"),
            |cell| {
                let lab = lab();
                let kernel = lab.env.kernel("lockdep").unwrap().clone();
                let mut scenarios = Batch::IoModels.scenarios().unwrap();
                scenarios.extend(Batch::Teardown.scenarios().unwrap());
                let outs = seeded::run(&lab, &kernel, cell, None, &scenarios)
                    .expect("the scenarios could run");
                for o in &outs {
                    assert_passed(o);
                }
            },
        );
    }
}

/// The classification the assertions rely on.
#[test]
fn catches_are_classified_by_their_reason() {
    assert_eq!(
        classify("kernel lockdep: [ 9.0] WARNING: possible circular locking dependency detected"),
        "splat:lockdep"
    );
}
