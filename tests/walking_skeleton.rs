//! The walking skeleton: one payload from the emulated device reaches a
//! blocking read() in a booted guest, under every VMM the machine can run.

use vdevlab_device::irq::IrqMode;
use vdevlab_lab::env::{cloud_hypervisor, kvm_usable};
use vdevlab_lab::guest::Vmm;
use vdevlab_lab::record::{read_all, Verdict};
use vdevlab_lab::scenario::{blocking_rx, pattern, record_skip, run_streams, StreamCase};
use vdevlab_tests::{assert_passed, lab};
use vdevlab_vmm_config::Accel;

/// Crosses many 4 KiB receive buffers and ends mid-buffer.
const PAYLOAD: usize = 256 * 1024 + 123;

fn run_blocking_rx(vmm: Vmm, accel: Accel) {
    let lab = lab();
    let payload = pattern(0xb10c, PAYLOAD);
    let out = blocking_rx(&lab, vmm, accel, &payload).expect("the scenario could run");
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
    // The run is on record, with a real boot time.
    let rec = &out.record;
    assert_eq!(rec.scenario, "blocking-rx");
    assert!(rec.boot_ms.is_some_and(|ms| ms > 0));
    let on_file = read_all().expect("runs.jsonl is readable");
    assert!(
        on_file.iter().any(|r| r == rec),
        "the record is in runs.jsonl"
    );
}

#[test]
fn blocking_rx_qemu_tcg() {
    run_blocking_rx(Vmm::Qemu, Accel::Tcg);
}

#[test]
fn blocking_rx_qemu_kvm() {
    if let Err(why) = kvm_usable() {
        let rec = record_skip(&lab(), "blocking-rx", Vmm::Qemu, Accel::Kvm, &why).unwrap();
        assert_eq!(rec.result, Verdict::Skip);
        eprintln!("SKIP blocking-rx on QEMU/KVM: {why}");
        return;
    }
    run_blocking_rx(Vmm::Qemu, Accel::Kvm);
}

#[test]
fn blocking_rx_cloud_hypervisor() {
    let why = match (kvm_usable(), cloud_hypervisor()) {
        (Ok(()), Ok(_)) => None,
        (Err(kvm), Ok(_)) => Some(format!("Cloud Hypervisor needs KVM: {kvm}")),
        (Ok(()), Err(ch)) => Some(ch),
        (Err(kvm), Err(ch)) => Some(format!("Cloud Hypervisor needs KVM: {kvm}; and {ch}")),
    };
    if let Some(why) = why {
        let rec = record_skip(
            &lab(),
            "blocking-rx",
            Vmm::CloudHypervisor,
            Accel::Kvm,
            &why,
        )
        .unwrap();
        assert_eq!(rec.result, Verdict::Skip);
        eprintln!("SKIP blocking-rx on Cloud Hypervisor: {why}");
        return;
    }
    run_blocking_rx(Vmm::CloudHypervisor, Accel::Kvm);
}

/// The driver is held to kernel standards: a W=1 build with no warning.
#[test]
fn driver_builds_warning_free_with_w1() {
    let lab = lab();
    let warnings: Vec<&str> = lab
        .artifacts
        .driver_build_log
        .lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        .collect();
    assert!(
        warnings.is_empty(),
        "driver build warnings:\n{}",
        warnings.join("\n")
    );
    assert!(lab.artifacts.driver_ko.exists());
}

/// The driver must deliver every byte whatever the device's interrupt
/// policy: coalesced (one interrupt per 8 buffers or 2 ms) and delayed with
/// seeded jitter. One boot, two scenarios.
#[test]
fn blocking_rx_with_coalesced_and_delayed_interrupts() {
    let lab = lab();
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
    let outs = run_streams(&lab, Vmm::Qemu, Accel::Tcg, &[coalesced, delayed])
        .expect("the scenarios could run");
    assert_eq!(outs.len(), 2);
    for out in &outs {
        assert_passed(out);
        assert_eq!(out.guest.as_ref().unwrap().sha256, out.host_sha256);
    }
}

/// The I/O models the current driver serves (read/write, O_NONBLOCK, poll;
/// POSIX AIO and io_uring on top of those), both directions, in one boot.
/// fasync (sigio) and native AIO (linux-aio) come with the driver issue.
#[test]
fn io_models_rx_and_tx() {
    let lab = lab();
    let models = [
        "blocking",
        "nonblocking",
        "select",
        "poll",
        "epoll-lt",
        "epoll-et",
        "posix-aio",
        "io-uring",
    ];
    let cases: Vec<StreamCase> = models
        .iter()
        .enumerate()
        .flat_map(|(i, m)| {
            [
                StreamCase::new(&format!("{m}-rx"), 40_000 + i, 100 + i as u64),
                StreamCase::new(&format!("{m}-tx"), 40_000 + i, 200 + i as u64),
            ]
        })
        .collect();
    let outs = run_streams(&lab, Vmm::Qemu, Accel::Tcg, &cases).expect("the scenarios could run");
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
        "failed scenarios:\n{}",
        failed.join("\n")
    );
    for out in &outs {
        assert_eq!(
            out.guest.as_ref().unwrap().sha256,
            out.host_sha256,
            "{}",
            out.record.scenario
        );
    }
}
