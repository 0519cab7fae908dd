//! Every kind of waiter learns of trouble: on removal, needs-reset, a
//! broken queue and a reset, a crew of thirteen waiters (blocking reader
//! and writer, `poll` and edge-triggered `epoll` for each direction, a
//! `SIGIO` owner, native AIO, io_uring and POSIX AIO reads and writes) sits
//! in the qw driver, and each must end with the result that
//! `docs/device-spec.md` ("What each waiter sees when the device fails")
//! documents, within the guest program's bound
//! (`vdevlab_guest::scenarios::waiters`). One boot per trouble: after
//! needs-reset and a broken queue the device needs a reset, and the
//! writers leave the device's capture full.

use vdevlab_guest::scenarios::waiters::CREW;
use vdevlab_lab::cell::Cell;
use vdevlab_lab::engine;
use vdevlab_lab::scenario::{pattern, Scenario, Step};
use vdevlab_tests::{assert_passed, lab};

/// Boot, run `trouble-<name>` with the host's `steps` after its first
/// marker, and print every waiter's end and time (the measured bounds).
fn trouble(kernel: &str, name: &str, steps: Vec<Step>, cell: Cell) {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let program = format!("trouble-{name}");
    let mut all = vec![Step::Ready(program.clone())];
    all.extend(steps);
    let mut case = Scenario::program(&program, &[]).with_steps(all);
    // A hostile fault must really have fired.
    if name.starts_with("broken") {
        case.expect.counters_at_least = vec![("hostile_bogus_ids".into(), 1)];
    }
    let outs = engine::run(&lab, &kernel, cell, &[case], |_| {}).expect("the scenario could run");
    let out = &outs[0];
    if let Some(g) = out.guest.as_ref() {
        for k in CREW {
            let end = g.extra.get(k.key()).and_then(|v| v.as_str()).unwrap_or("-");
            let ms = g
                .extra
                .get(&format!("{}_ms", k.key()))
                .and_then(|v| v.as_u64());
            let ms = ms.map_or("-".to_string(), |ms| ms.to_string());
            eprintln!(
                "{program} on {}: {:<12} {end:<34} {ms} ms",
                kernel.name,
                k.key()
            );
        }
    }
    assert_passed(out);
    let g = out.guest.as_ref().expect("the guest reported a result");
    for k in CREW {
        assert!(
            g.extra.contains_key(&format!("{}_ms", k.key())),
            "{program}: no time for {}",
            k.key()
        );
    }
}

/// The driver is unbound while everyone waits: ENODEV (native AIO
/// ESHUTDOWN), POLLHUP, SIGIO with POLL_HUP; then it binds again.
fn trouble_removal(kernel: &str, cell: Cell) {
    trouble(kernel, "removal", vec![], cell);
}

/// The device sets NEEDS_RESET: the driver's status poll finds it, and
/// everyone gets EIO, POLLERR, SIGIO with POLL_ERR; QW_IOC_RESET recovers.
fn trouble_needs_reset(kernel: &str, cell: Cell) {
    let steps = vec![Step::control(serde_json::json!({"op": "needs_reset"}))];
    trouble(kernel, "needs-reset", steps, cell);
}

/// A used entry naming a descriptor that was never posted breaks the rx
/// virtqueue (BAD_RING): everyone, the transmit side too, gets EIO,
/// POLLERR, SIGIO with POLL_ERR; QW_IOC_RESET recovers.
fn trouble_broken(kernel: &str, cell: Cell) {
    let fault = serde_json::json!({"kind": "hostile_bogus_id", "queue": "rx", "count": 1});
    let steps = vec![
        Step::fault(fault).expect("a valid fault"),
        Step::inject(pattern(95, 100)),
    ];
    trouble(kernel, "broken", steps, cell);
}

/// QW_IOC_RESET while everyone waits: no error; the transmit side goes on
/// at once (the reset emptied the ring), SIGIO says POLL_OUT; the receive
/// side keeps waiting until data comes after the reset.
fn trouble_reset(kernel: &str, cell: Cell) {
    let steps = vec![
        Step::Ready("trouble-reset-2".into()),
        Step::inject(pattern(96, 64 << 10)),
    ];
    trouble(kernel, "reset", steps, cell);
}

/// The PCI function is removed (a hot-unplug) while everyone waits: as
/// for removal; then a rescan finds it again.
fn trouble_unplug(kernel: &str, cell: Cell) {
    trouble(kernel, "unplug", vec![], cell);
}

/// The tx ring breaks instead: the device completes a transmit buffer (the
/// host takes some of the capture) with an id never posted; as for a
/// broken rx queue.
fn trouble_broken_tx(kernel: &str, cell: Cell) {
    let fault = serde_json::json!({"kind": "hostile_bogus_id", "queue": "tx", "count": 1});
    let steps = vec![
        Step::fault(fault).expect("a valid fault"),
        Step::control(serde_json::json!({"op": "capture", "max": 65536})),
    ];
    trouble(kernel, "broken-tx", steps, cell);
}

/// The troubles on one guest kernel, in a module named after it, on one
/// vCPU and/or on two (the device's interrupts on one vCPU and the crew
/// on the other, `vdevlab_lab::smp`: wakers and waiters really run at
/// once): `trixie::qemu_tcg_smp::trouble_reset`, ...
macro_rules! kernel_tests {
    ($kernel:ident: $($smp:ident)?) => {
        vdevlab_tests::cell_tests!($($smp)? kernel stringify!($kernel);
            trouble_removal,
            trouble_needs_reset,
            trouble_broken,
            trouble_reset,
            trouble_unplug,
            trouble_broken_tx,
        );
    };
}

// The default kernel on one vCPU and on two, the oldest series on one,
// the lab kernel with lockdep and the object checkers on two, where a
// splat in a wake or teardown path is likeliest. Each cell is one boot
// per trouble; the other combinations would add boots, not code paths.
mod trixie {
    kernel_tests!(trixie:);
    kernel_tests!(trixie: smp);
}
mod bookworm {
    kernel_tests!(bookworm:);
}
mod lockdep {
    kernel_tests!(lockdep: smp);
}
