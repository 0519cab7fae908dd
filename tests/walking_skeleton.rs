//! The walking skeleton: one payload from the emulated device reaches a
//! blocking read() in a booted guest, under every VMM the machine can run,
//! on every guest kernel of the matrix.
//!
//! Every test exists once per kernel, in a module named after it
//! (`trixie::…`, `bookworm::…`, `lab::…`; the lockdep kernel, `lockdep::…`,
//! runs a subset), and those that boot once per
//! cell of the VMM dimension inside it (`qemu_tcg::`, `qemu_kvm::`,
//! `cloud_hypervisor_kvm::`; `VDEVLAB_CELLS` picks, see
//! `vdevlab_lab::cell`), so a nextest filter picks a kernel (`bookworm`), a
//! cell (`qemu_kvm`), a test (`io_models_rx_and_tx`) or one of each
//! (`bookworm::qemu_kvm::io_models_rx_and_tx`). The I/O models and the
//! teardown also run on several vCPUs (`qemu_tcg_smp::`, ...), with the
//! device's interrupts on one CPU and the programs on another.

use vdevlab_lab::cell::Cell;
use vdevlab_lab::engine::{self, run_streams};
use vdevlab_lab::env::Kernel;
use vdevlab_lab::record::read_all;
use vdevlab_lab::scenario::{self, pattern, StreamCase};
use vdevlab_lab::Lab;
use vdevlab_qw::irq::IrqMode;
use vdevlab_tests::{assert_cpus, assert_passed, lab};

/// Crosses many 4 KiB receive buffers and ends mid-buffer.
const PAYLOAD: usize = 256 * 1024 + 123;

/// Every I/O model of the guest programs (`<model>-rx` in their list).
fn all_io_models() -> Vec<&'static str> {
    vdevlab_guest::SCENARIOS
        .iter()
        .filter_map(|s| s.strip_suffix("-rx"))
        .collect()
}

/// The lab and its kernel named `name`.
fn lab_kernel(name: &str) -> (Lab, Kernel) {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, name);
    (lab, kernel)
}

/// One payload into a blocking read(), checked by the test as well as by
/// the harness, and on record with a real boot time.
fn blocking_rx(kernel: &str, cell: Cell) {
    let (lab, kernel) = lab_kernel(kernel);
    let payload = pattern(0xb10c, PAYLOAD);
    let out = engine::blocking_rx(&lab, &kernel, cell, &payload).expect("the scenario could run");
    assert_passed(&out);
    // Check the data ourselves too, not only the harness's verdict.
    let guest = out.guest.as_ref().expect("the guest reported a result");
    assert_eq!(guest.bytes, Some(PAYLOAD as u64));
    assert_eq!(guest.sha256, out.host_sha256);
    assert!(
        guest.reads.unwrap_or(0) > 1,
        "a blocking reader of {PAYLOAD} bytes returns in pieces"
    );
    let stats = out.stats.expect("device stats");
    assert_eq!(stats.rx_bytes, PAYLOAD as u64);
    assert_eq!(stats.bad_chains, 0);
    assert!(stats.interrupts_raised > 0);
    // The run is on record, with a real boot time, for this kernel.
    let rec = &out.record;
    assert_eq!(rec.scenario, "blocking-rx");
    assert_eq!(rec.kernel, kernel.release);
    assert_eq!(Cell::of_record(&rec.vmm, &rec.accel, rec.vcpus), Some(cell));
    assert!(rec.boot_ms.is_some_and(|ms| ms > 0));
    let on_file = read_all().expect("runs.jsonl is readable");
    assert!(
        on_file.iter().any(|r| r == rec),
        "the record is in runs.jsonl"
    );
}

/// The driver is held to kernel standards: a W=1 build with no warning,
/// against every kernel of the matrix.
fn driver_builds_warning_free_with_w1(kernel: &str) {
    let (lab, kernel) = lab_kernel(kernel);
    let art = lab.artifacts.for_kernel(&kernel.name).unwrap();
    let warnings: Vec<&str> = art
        .driver_build_log
        .lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        .collect();
    assert!(
        warnings.is_empty(),
        "driver build warnings for {} ({}; log {}):\n{}",
        kernel.name,
        kernel.release,
        art.driver_build_log_path.display(),
        warnings.join("\n")
    );
    assert!(art.driver_ko.exists());
    // sparse (C=1) runs where Debian's sparse understands the kernel's
    // headers: bookworm's 6.1 and the lab kernel's 6.12 (sparse 0.6.4 is too
    // old for 7.3's: guest-driver/README.md).
    if kernel.sparse {
        assert!(
            art.driver_build_log.contains("CHECK"),
            "sparse did not run on the {} build (is sparse installed? log {})",
            kernel.name,
            art.driver_build_log_path.display()
        );
    }
}

/// The driver's control and lifetime paths, in one boot: the ioctls and
/// sysfs counters (stats, flush, reset), several openers sharing the
/// stream, suspend and resume (pm_test: freeze/restore), then unbind and
/// PCI removal while a blocking reader, a blocked writer, an edge-triggered
/// epoll waiter, a native-AIO read, an io_uring read and a POSIX AIO read
/// all wait: every one must wake with an error, the module must unload
/// (nothing leaked) and load again, and the kernel must log no splat.
fn driver_ioctls_pm_and_teardown(kernel: &str, cell: Cell) {
    use sha2::{Digest, Sha256};
    use vdevlab_lab::scenario::{Expect, Scenario, Step};
    let (lab, kernel) = lab_kernel(kernel);
    let sha = |b: &[u8]| serde_json::Value::String(hex::encode(Sha256::digest(b)));
    let after_reset = pattern(41, 100);
    let sampled = pattern(9, 70_000);
    let ready = |m: &str| Step::Ready(m.to_string());
    let expect = |fields: Vec<(String, serde_json::Value)>| Expect {
        fields,
        ..Expect::default()
    };
    let cases = vec![
        Scenario {
            expect: expect(vec![("sha256_after_reset".into(), sha(&after_reset))]),
            ..Scenario::program("ioctl-stats", &["--bytes", "5000"]).with_steps(vec![
                ready("ioctl-stats"),
                Step::inject(pattern(40, 5000)),
                ready("ioctl-stats-2"),
                Step::inject(after_reset.clone()),
            ])
        },
        Scenario::program("multi-open", &["--bytes", "300001", "--seed", "5"])
            .with_steps(vec![ready("multi-open"), Step::inject(pattern(5, 300_001))]),
        Scenario {
            expect: expect(vec![("sha256".into(), sha(&sampled))]),
            ..Scenario::program("pm-freeze", &["--bytes", "70000"])
                .with_steps(vec![ready("pm-freeze"), Step::inject(sampled.clone())])
        },
        Scenario::program("teardown-unbind", &[]).with_steps(vec![ready("teardown-unbind")]),
        Scenario::program("teardown-remove", &[]).with_steps(vec![ready("teardown-remove")]),
    ];
    let outs = engine::run(&lab, &kernel, cell, &cases, |_| {}).expect("the scenarios could run");
    for out in &outs {
        assert_passed(out);
        // The unbind and the removal re-probe: new interrupt lines, not
        // routed, may take interrupts anywhere.
        assert_cpus(out, cell, false);
    }
}

/// Dynamic debug: loaded with `dyndbg=+p`, the driver's debug lines trace
/// the receive path on the console; in the other boots they stay off.
#[test]
fn driver_dynamic_debug() {
    let (lab, kernel) = lab_kernel("trixie");
    let cases = [StreamCase::new("blocking-rx", 8192, 3)];
    let on = vdevlab_lab::engine::run_streams_tuned(&lab, &kernel, Cell::QEMU_TCG, &cases, |b| {
        b.driver_params.push("dyndbg=+p".into())
    })
    .expect("the scenario could run");
    assert_passed(&on[0]);
    let console = |o: &vdevlab_lab::scenario::Outcome| {
        std::fs::read_to_string(o.record.console.as_ref().unwrap()).unwrap()
    };
    let traced = console(&on[0]);
    assert!(
        traced.contains("qw0: rx: buffer"),
        "no rx trace with dyndbg=+p"
    );
    assert!(
        traced.contains("qw0: read "),
        "no read trace with dyndbg=+p"
    );
    let off = run_streams(&lab, &kernel, Cell::QEMU_TCG, &cases).expect("the scenario could run");
    assert_passed(&off[0]);
    assert!(
        !console(&off[0]).contains("qw0: rx: buffer"),
        "debug lines without dyndbg"
    );
}

/// The device declares itself broken (`{"op":"needs_reset"}`: NEEDS_RESET
/// in its config space status word) while a blocking reader waits. The
/// device then serves nothing and cannot raise a config interrupt, so the
/// driver must find it by polling the status word: the read fails with EIO
/// within 5 s, poll has POLLERR, sysfs and QW_IOC_GET_STATS show the
/// needs-reset state; QW_IOC_RESET clears it (the VMM's GET_VRING_BASE
/// clears the device's flag) and 100 bytes injected afterwards arrive.
fn device_needs_reset_is_noticed(kernel: &str, cell: Cell) {
    use sha2::{Digest, Sha256};
    use vdevlab_lab::scenario::{Expect, Scenario, Step};
    let (lab, kernel) = lab_kernel(kernel);
    let after_reset = pattern(43, 100);
    let sha = serde_json::Value::String(hex::encode(Sha256::digest(&after_reset)));
    let case = Scenario {
        expect: Expect {
            fields: vec![
                ("read".into(), "EIO".into()),
                ("reset".into(), "ok".into()),
                ("sha256_after_reset".into(), sha),
            ],
            ..Expect::default()
        },
        ..Scenario::program("needs-reset", &[]).with_steps(vec![
            Step::Ready("needs-reset".into()),
            Step::control(serde_json::json!({"op": "needs_reset"})),
            Step::Ready("needs-reset-2".into()),
            Step::inject(after_reset.clone()),
        ])
    };
    let outs = engine::run(&lab, &kernel, cell, &[case], |_| {}).expect("the scenario could run");
    assert_passed(&outs[0]);
    let guest = outs[0].guest.as_ref().expect("the guest reported a result");
    let ms = guest.extra.get("read_ms").and_then(|v| v.as_u64());
    eprintln!(
        "needs-reset on {}: the blocked read failed after {ms:?} ms",
        kernel.name
    );
    assert!(ms.is_some_and(|ms| ms <= 5000), "read_ms {ms:?}");
    // The device served again after the reset: exactly the 100 bytes.
    let stats = outs[0].stats.expect("device stats");
    assert_eq!(stats.rx_bytes, 100);
}

/// Two device instances in one guest: `/dev/qw0` and `/dev/qw1`, each with
/// its own backend; streams on each reach the right device.
#[test]
fn two_device_instances() {
    let (lab, kernel) = lab_kernel("trixie");
    let mut cases = vec![
        StreamCase::new("blocking-rx", 50_000, 11),
        StreamCase::new("blocking-tx", 50_000, 12),
        StreamCase::new("epoll-et-rx", 50_000, 13),
        StreamCase::new("poll-tx", 50_000, 14),
    ];
    cases[1].instance = 1;
    cases[2].instance = 1;
    let outs = run_streams(&lab, &kernel, Cell::QEMU_TCG, &cases).expect("the scenarios could run");
    for (out, case) in outs.iter().zip(&cases) {
        assert_passed(out);
        let stats = out.stats.expect("stats of the case's instance");
        // Each instance's counters show only its own traffic so far.
        match (case.instance, case.scenario.as_str()) {
            (1, "blocking-tx") => assert_eq!(stats.tx_bytes, 50_000),
            (1, "epoll-et-rx") => assert_eq!(stats.rx_bytes, 50_000),
            (0, "blocking-rx") => assert_eq!((stats.rx_bytes, stats.tx_bytes), (50_000, 0)),
            (0, "poll-tx") => assert_eq!((stats.rx_bytes, stats.tx_bytes), (50_000, 50_000)),
            _ => unreachable!(),
        }
    }
}

/// A run folder more than 200 characters deep, as in a CI workspace or a
/// monorepo: no socket path follows it (each would be far over the 107
/// bytes a socket address holds), so two instances with all their sockets
/// still boot and pass, and the run is recorded there.
#[test]
fn run_folder_200_characters_deep() {
    let mut deep = vdevlab_lab::env::target_dir().join("lab-runs").join("deep");
    let mut n = 0;
    while deep.as_os_str().len() < 200 {
        deep.push(format!("a-folder-as-deep-as-ci-workspaces-nest-{n}"));
        n += 1;
    }
    std::fs::create_dir_all(&deep).unwrap();
    // SAFETY: set before the harness starts any thread; nextest runs each
    // test in a process of its own.
    unsafe { std::env::set_var("VDEVLAB_RUNS_DIR", &deep) };
    let (lab, kernel) = lab_kernel(vdevlab_lab::env::DEFAULT_KERNEL);
    let mut cases = vec![
        StreamCase::new("blocking-rx", 20_000, 21),
        StreamCase::new("blocking-tx", 20_000, 22),
    ];
    cases[1].instance = 1;
    let outs = run_streams(&lab, &kernel, Cell::QEMU_TCG, &cases).expect("the scenarios could run");
    for out in &outs {
        assert_passed(out);
        let console = out.record.console.as_ref().expect("a console");
        assert!(console.starts_with(&deep), "{}", console.display());
        let run = console.parent().unwrap();
        assert!(run.as_os_str().len() > 200);
        // Each backend served on a short path, which went with the run.
        for log in ["backend.log", "backend1.log"] {
            let text = std::fs::read_to_string(run.join(log)).unwrap();
            let sockets: Vec<&str> = text
                .split_whitespace()
                .filter_map(|w| w.strip_prefix("socket="))
                .collect();
            assert!(
                sockets.len() >= 3,
                "vhost-user, control, data in {log}: {text}"
            );
            for s in sockets {
                assert!(
                    s.len() <= 107 && !s.starts_with(run.to_str().unwrap()),
                    "{s}"
                );
                assert!(!std::path::Path::new(s).exists(), "{s} is left behind");
            }
        }
    }
    let on_file = read_all().expect("runs.jsonl is readable");
    assert!(
        on_file.iter().any(|r| r == &outs[0].record),
        "recorded in the deep folder"
    );
}

/// checkpatch.pl --strict (from Debian's linux-source, provisioned) finds
/// nothing in the driver but the two exceptions guest-driver/README.md
/// explains: LINUX_VERSION_CODE (one compat macro) and the sysfs macro's
/// argument reuse.
#[test]
fn driver_passes_checkpatch_strict() {
    let lab = lab(); // provisions checkpatch.pl
    let dir = vdevlab_lab::env::workspace_root().join("guest-driver");
    let out = vdevlab_lab::artifacts::checkpatch(
        &lab.env,
        &dir,
        &["vdevlab_qw.c", "include/uapi/vdevlab_qw.h"],
    )
    .expect("checkpatch.pl runs in the lab root");
    let report = String::from_utf8_lossy(&out.stdout);
    const ALLOWED: &[&str] = &[":LINUX_VERSION_CODE:", ":MACRO_ARG_REUSE:"];
    let findings: Vec<&str> = report
        .lines()
        .filter(|l| l.contains(": WARNING:") || l.contains(": ERROR:") || l.contains(": CHECK:"))
        .collect();
    let unexpected: Vec<&&str> = findings
        .iter()
        .filter(|l| !ALLOWED.iter().any(|a| l.contains(a)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "checkpatch --strict findings not documented as exceptions:\n{}",
        unexpected
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        report.contains("total:"),
        "checkpatch did not run: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The driver must deliver every byte whatever the device's interrupt
/// policy: coalesced (one interrupt per 8 buffers or 2 ms) and delayed with
/// seeded jitter. One boot, two scenarios.
fn blocking_rx_with_coalesced_and_delayed_interrupts(kernel: &str, cell: Cell) {
    let (lab, kernel) = lab_kernel(kernel);
    let mut coalesced = StreamCase::new("blocking-rx", 100_000, 1);
    coalesced.irq = Some(IrqMode::Coalesce {
        count: 8,
        usecs: 2000,
    });
    let mut delayed = StreamCase::new("blocking-rx", 100_000, 2);
    delayed.irq = Some(IrqMode::Delay {
        usecs: 500,
        jitter_usecs: 1500,
        seed: 42,
    });
    let outs =
        run_streams(&lab, &kernel, cell, &[coalesced, delayed]).expect("the scenarios could run");
    assert_eq!(outs.len(), 2);
    for out in &outs {
        assert_passed(out);
        assert_eq!(out.guest.as_ref().unwrap().sha256, out.host_sha256);
    }
}

/// The models to run: all of them, or those listed in `VDEVLAB_MODELS`
/// (comma separated, e.g. `epoll-et,io-uring`).
fn selected_io_models() -> Vec<String> {
    match std::env::var("VDEVLAB_MODELS") {
        Ok(list) if !list.trim().is_empty() => {
            let models: Vec<String> = list.split(',').map(|m| m.trim().to_string()).collect();
            for m in &models {
                assert!(
                    all_io_models().contains(&m.as_str()),
                    "VDEVLAB_MODELS: unknown model {m} (known: {})",
                    all_io_models().join(", ")
                );
            }
            models
        }
        _ => all_io_models().into_iter().map(|m| m.to_string()).collect(),
    }
}

/// The I/O models, both directions, then `mixed` (a reader and a writer at
/// once), in one boot.
fn io_models_rx_and_tx(kernel: &str, cell: Cell) {
    let (lab, kernel) = lab_kernel(kernel);
    let all = all_io_models();
    let cases: Vec<StreamCase> = selected_io_models()
        .iter()
        .flat_map(|m| {
            // Sizes and seeds stay tied to the model, whatever the selection.
            let i = all.iter().position(|k| k == m).unwrap();
            [
                StreamCase::new(&format!("{m}-rx"), 40_000 + i, 100 + i as u64),
                StreamCase::new(&format!("{m}-tx"), 40_000 + i, 200 + i as u64),
            ]
        })
        .collect();
    // A reader and a writer on one open file at once, last in the boot.
    let mut cases = cases;
    cases.push(StreamCase::new("mixed", 100_000, 300));
    let outs = run_streams(&lab, &kernel, cell, &cases).expect("the scenarios could run");
    assert_eq!(outs.len(), cases.len());
    let failed: Vec<String> = outs
        .iter()
        .filter(|o| !o.passed())
        .map(|o| {
            format!(
                "{}: {}",
                o.record.scenario,
                o.record.reason.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "failed scenarios on {} ({}):\n{}",
        kernel.name,
        kernel.release,
        failed.join("\n")
    );
    for out in &outs {
        let g = out.guest.as_ref().unwrap();
        // `mixed` reports each direction; the others one stream.
        let seen = match (&g.rx_sha256, &g.tx_sha256) {
            (Some(rx), Some(tx)) => Some(format!("{rx}/{tx}")),
            _ => g.sha256.clone(),
        };
        assert_eq!(seen, out.host_sha256, "{}", out.record.scenario);
        assert_eq!(out.record.kernel, kernel.release);
        assert_cpus(out, cell, true);
    }
}

/// The tests of one guest kernel, in a module named after it; those that
/// boot exist once per cell (`trixie::qemu_kvm::io_models_rx_and_tx`).
macro_rules! kernel_tests {
    ($kernel:ident) => {
        mod $kernel {
            #[test]
            fn driver_builds_warning_free_with_w1() {
                super::driver_builds_warning_free_with_w1(stringify!($kernel));
            }

            vdevlab_tests::cell_tests!(kernel stringify!($kernel);
                blocking_rx,
                blocking_rx_with_coalesced_and_delayed_interrupts,
                io_models_rx_and_tx,
                driver_ioctls_pm_and_teardown,
                device_needs_reset_is_noticed,
            );
            // On several vCPUs, the device's interrupts on one CPU and the
            // programs on another (`vdevlab_lab::smp`).
            vdevlab_tests::cell_tests!(smp kernel stringify!($kernel);
                io_models_rx_and_tx,
                driver_ioctls_pm_and_teardown,
            );
        }
    };
}

kernel_tests!(trixie);
kernel_tests!(bookworm);
// The trimmed lab kernel (images/lab-kernel.sh): 6.12, a third series.
kernel_tests!(lab);

/// The lab kernel's lockdep variant (`images/lab-kernel.sh --variant
/// lockdep`: PROVE_LOCKING, DEBUG_SPINLOCK, DEBUG_ATOMIC_SLEEP,
/// DEBUG_OBJECTS, DEBUG_LIST), which provisioning builds by default: the
/// race detectors watch the driver on several vCPUs, where its interrupt
/// handlers and its readers and writers really run at once, and through
/// its control, suspend and teardown paths. Any report they print is a
/// splat, which fails the run.
mod lockdep {
    #[test]
    fn driver_builds_warning_free_with_w1() {
        super::driver_builds_warning_free_with_w1("lockdep");
    }

    vdevlab_tests::cell_tests!(kernel "lockdep";
        blocking_rx,
        driver_ioctls_pm_and_teardown,
    );
    vdevlab_tests::cell_tests!(smp kernel "lockdep";
        io_models_rx_and_tx,
        driver_ioctls_pm_and_teardown,
    );
}

/// The device model crashes mid-stream while QEMU keeps running: the
/// guest read what was delivered, then its reader waits quietly; no error,
/// no splat (see `vdevlab_lab::engine::backend_crash_rx` for why QEMU's
/// generic device cannot reconnect).
#[test]
fn backend_crash_while_the_vmm_runs() {
    let (lab, kernel) = lab_kernel("trixie");
    let out = vdevlab_lab::engine::backend_crash_rx(&lab, &kernel, 64 * 1024)
        .expect("the scenario could run");
    assert_passed(&out);
    assert_eq!(
        out.stats.expect("stats before the crash").rx_bytes,
        64 * 1024
    );
}

/// A device backend that dies while the VMM runs (a crash, not the lab's
/// own `kill_backend`) fails the wait on the guest within a second or
/// two, naming the backend, instead of running into the wait's timeout:
/// under Cloud Hypervisor the guest would otherwise sit on a dead device
/// until the timeout.
#[test]
fn a_backend_that_dies_fails_the_wait_at_once() {
    use std::time::{Duration, Instant};
    use vdevlab_lab::guest::{BootSpec, Guest};
    let (lab, kernel) = lab_kernel("trixie");
    let spec = BootSpec::new(
        "backend-dies",
        vec![vec!["blocking-rx".into(), "--bytes".into(), "1000".into()]],
    )
    .on_kernel(&kernel.name);
    let mut guest = Guest::boot(&lab.env, &lab.artifacts, &spec).expect("the guest boots");
    guest
        .wait_ready("blocking-rx", scenario::BOOT_TIMEOUT)
        .expect("the reader waits");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &guest.backend_pid().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    let t0 = Instant::now();
    let err = guest
        .wait_result("blocking-rx", Duration::from_secs(60))
        .expect_err("nothing can arrive from a dead device");
    let waited = t0.elapsed();
    let err = format!("{err:#}");
    assert!(
        err.contains("the device backend of instance 0 exited") && err.contains("signal: 9"),
        "{err}"
    );
    assert!(waited < Duration::from_secs(5), "noticed after {waited:?}");
    assert!(
        guest.vmm_running(),
        "QEMU keeps running without its backend"
    );
    let finished = guest.abort();
    assert!(finished.splats.is_empty(), "{:?}", finished.splats);
}
