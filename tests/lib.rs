//! Helpers shared by the integration tests. Every test boots through
//! `vdevlab_lab` (the same harness as the `vdevlab` command), so a test
//! failure reproduces with the CLI.

use vdevlab_lab::env::Kernel;
use vdevlab_lab::scenario::Outcome;
use vdevlab_lab::sensor::SensorArtifacts;
use vdevlab_lab::Lab;

/// The provisioned lab with its artifacts; panics with the reason (what to
/// install or fix) when the lab cannot be set up.
pub fn lab() -> Lab {
    match Lab::get() {
        Ok(lab) => lab,
        Err(e) => panic!("the lab could not be set up: {e:#}"),
    }
}

/// The provisioned guest kernel `name` (`trixie`, `lockdep`, ...); panics
/// with the reason (how to provision it) when it is not there.
pub fn kernel(lab: &Lab, name: &str) -> Kernel {
    match lab.env.kernel(name) {
        Ok(k) => k.clone(),
        Err(e) => panic!("{e:#}"),
    }
}

/// The sensor's backend and drivers, built once per test process; panics
/// with the build's error.
pub fn sensor_artifacts(lab: &Lab) -> SensorArtifacts {
    static ART: std::sync::OnceLock<Result<SensorArtifacts, String>> = std::sync::OnceLock::new();
    ART.get_or_init(|| vdevlab_lab::sensor::prepare(lab).map_err(|e| format!("{e:#}")))
        .clone()
        .unwrap_or_else(|e| panic!("the sensor could not be built: {e}"))
}

/// Fail the test with the record's reason and console when the run failed.
pub fn assert_passed(out: &Outcome) {
    assert!(
        out.passed(),
        "{} failed: {}\nconsole: {}",
        out.record.scenario,
        out.record.reason.as_deref().unwrap_or("(no reason)"),
        out.record
            .console
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
}

/// The `vdevlab` command of this checkout (built on first use), for tests
/// that drive the CLI as a user would.
pub fn vdevlab_command() -> std::process::Command {
    use std::sync::OnceLock;
    static BIN: OnceLock<std::path::PathBuf> = OnceLock::new();
    let bin = BIN.get_or_init(|| {
        let status =
            std::process::Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
                .current_dir(vdevlab_lab::env::workspace_root())
                .args(["build", "--quiet", "-p", "vdevlab", "--bin", "vdevlab"])
                .status()
                .expect("running cargo build -p vdevlab");
        assert!(status.success(), "cargo build -p vdevlab failed");
        vdevlab_lab::env::target_dir().join("debug/vdevlab")
    });
    let mut cmd = std::process::Command::new(bin);
    cmd.current_dir(vdevlab_lab::env::workspace_root());
    cmd
}

/// Run `body`, the test at path `test`, in `cell` on `kernel` (a kernel
/// name; `None`: the default kernel) when this host and `VDEVLAB_CELLS`
/// let it (`vdevlab_lab::cell`); otherwise record the skip, with why, in
/// `runs.jsonl` and on the test's output. A cell `VDEVLAB_CELLS` names
/// that cannot run fails the test. Either way the outcome goes to
/// `cell-tests.jsonl`, which `vdevlab test` sums up per cell.
pub fn in_cell(
    kernel: Option<&str>,
    cell: vdevlab_lab::cell::Cell,
    test: &str,
    body: impl FnOnce(vdevlab_lab::cell::Cell),
) {
    use vdevlab_lab::cell::{append_test, gate, CellTest, Gate};
    use vdevlab_lab::record::Verdict;
    let name = test.rsplit("::").next().unwrap_or(test);
    let unrun = |verdict: Verdict, why: &str| {
        let lab = lab();
        let k = match kernel {
            Some(name) => lab.env.kernel(name).unwrap_or_else(|e| panic!("{e:#}")),
            None => lab.env.default_kernel(),
        }
        .clone();
        vdevlab_lab::scenario::record_unrun(&lab, &k, name, cell, verdict, why)
            .expect("the run is on record");
        append_test(&CellTest::new(test, cell, verdict, Some(why.to_string())))
            .expect("the outcome is on file");
        k.name
    };
    match gate(cell) {
        Ok(Gate::Run) => {
            // The outcome goes on file however the body ends.
            struct Outcome<'a>(&'a str, vdevlab_lab::cell::Cell);
            impl Drop for Outcome<'_> {
                fn drop(&mut self) {
                    let verdict = if std::thread::panicking() {
                        Verdict::Fail
                    } else {
                        Verdict::Pass
                    };
                    let _ = append_test(&CellTest::new(self.0, self.1, verdict, None));
                }
            }
            let _outcome = Outcome(test, cell);
            body(cell)
        }
        Ok(Gate::Skip(why)) => {
            let k = unrun(Verdict::Skip, &why);
            eprintln!("SKIP {name} in {cell} ({k}): {why}");
        }
        Err(e) => {
            let why = format!("{e:#}");
            unrun(Verdict::Fail, &why);
            panic!("{why}");
        }
    }
}

/// On an SMP guest that routed the device's interrupts (the SMP cells'
/// default), check the record says so and that they were taken on the
/// CPU they were sent to: some there and, when `only_there` (no re-probe
/// in the boot made new, unrouted interrupt lines), none elsewhere but the
/// one each IO-APIC line takes on its old CPU as it moves
/// (`vdevlab_lab::smp::irq_deltas`). On one vCPU, check the record says
/// one.
pub fn assert_cpus(out: &Outcome, cell: vdevlab_lab::cell::Cell, only_there: bool) {
    let rec = &out.record;
    let vcpus = cell.vcpus().expect("the cell's vCPU count");
    assert_eq!(rec.vcpus, Some(vcpus), "{}: vcpus on record", rec.scenario);
    if !cell.smp {
        return;
    }
    let cpu = rec.irq_cpu.expect("an SMP record names its interrupt CPU");
    let per_cpu = rec.irqs_per_cpu.as_ref().unwrap_or_else(|| {
        panic!(
            "{}: no interrupt counts from the guest (VDEVLAB-IRQ start/end)",
            rec.scenario
        )
    });
    assert!(
        per_cpu[usize::from(cpu)] > 0,
        "{}: no device interrupt on CPU {cpu}, where they were routed: {per_cpu:?}",
        rec.scenario
    );
    if only_there {
        let elsewhere: u64 = per_cpu
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != usize::from(cpu))
            .map(|(_, n)| n)
            .sum();
        let lines = u64::from(rec.irq_lines.unwrap_or(0));
        assert!(
            elsewhere <= lines,
            "{}: {elsewhere} device interrupts on other CPUs than {cpu} \
             (at most {lines}, one per line as it moves): {per_cpu:?}",
            rec.scenario
        );
    }
}

/// One test per cell of the matrix, in a module named after the cell
/// (`qemu_tcg::`, `qemu_kvm::`, `cloud_hypervisor_kvm::`), each calling the
/// crate-level function of the same name through [`in_cell`]:
///
/// - `cell_tests!(kernel "trixie"; io_models_rx_and_tx, ...)` calls
///   `crate::io_models_rx_and_tx("trixie", cell)`;
/// - `cell_tests!(fast_fault_campaign, ...)` calls
///   `crate::fast_fault_campaign(cell)` (default kernel);
/// - `cell_tests!(smp kernel "lab"; ...)` and `cell_tests!(smp ...)` do the
///   same in the SMP cells (`qemu_tcg_smp::`, ...).
#[macro_export]
// `crate::` on purpose: the functions are the calling test file's.
#[allow(clippy::crate_in_macro_def)]
macro_rules! cell_tests {
    (smp kernel $kernel:expr; $($test:ident),* $(,)?) => {
        $crate::cell_tests!(@kernel qemu_tcg_smp QEMU_TCG_SMP $kernel; $($test),*);
        $crate::cell_tests!(@kernel qemu_kvm_smp QEMU_KVM_SMP $kernel; $($test),*);
        $crate::cell_tests!(@kernel cloud_hypervisor_kvm_smp CLOUD_HYPERVISOR_KVM_SMP $kernel; $($test),*);
    };
    (smp $($test:ident),* $(,)?) => {
        $crate::cell_tests!(@default qemu_tcg_smp QEMU_TCG_SMP; $($test),*);
        $crate::cell_tests!(@default qemu_kvm_smp QEMU_KVM_SMP; $($test),*);
        $crate::cell_tests!(@default cloud_hypervisor_kvm_smp CLOUD_HYPERVISOR_KVM_SMP; $($test),*);
    };
    (kernel $kernel:expr; $($test:ident),* $(,)?) => {
        $crate::cell_tests!(@kernel qemu_tcg QEMU_TCG $kernel; $($test),*);
        $crate::cell_tests!(@kernel qemu_kvm QEMU_KVM $kernel; $($test),*);
        $crate::cell_tests!(@kernel cloud_hypervisor_kvm CLOUD_HYPERVISOR_KVM $kernel; $($test),*);
    };
    ($($test:ident),* $(,)?) => {
        $crate::cell_tests!(@default qemu_tcg QEMU_TCG; $($test),*);
        $crate::cell_tests!(@default qemu_kvm QEMU_KVM; $($test),*);
        $crate::cell_tests!(@default cloud_hypervisor_kvm CLOUD_HYPERVISOR_KVM; $($test),*);
    };
    (@kernel $module:ident $cell:ident $kernel:expr; $($test:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    $crate::in_cell(
                        Some($kernel),
                        ::vdevlab_lab::cell::Cell::$cell,
                        concat!(module_path!(), "::", stringify!($test)),
                        |cell| crate::$test($kernel, cell),
                    );
                }
            )*
        }
    };
    (@default $module:ident $cell:ident; $($test:ident),*) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    $crate::in_cell(
                        None,
                        ::vdevlab_lab::cell::Cell::$cell,
                        concat!(module_path!(), "::", stringify!($test)),
                        |cell| crate::$test(cell),
                    );
                }
            )*
        }
    };
}
