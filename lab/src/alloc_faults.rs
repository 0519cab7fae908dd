//! Kernel-side fault injection against the qw driver: the `alloc-faults`
//! guest program (`vdevlab_guest::scenarios::alloc_faults`) fails the
//! driver's own allocations one at a time through the kernel's per-task
//! `fail-nth`, in open, write, native AIO, probe and read, and checks
//! with kmemleak that nothing leaked. The kernel must have the fault
//! injection and kmemleak built in (the lockdep kernel,
//! images/lab-kernel-lockdep.config) and boot with [`KERNEL_ARGS`]
//! (kmemleak is built off by default, so the other lockdep runs do not
//! pay for it).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::cell::Cell;
use crate::engine;
use crate::env::Kernel;
use crate::scenario::{Outcome, Scenario, Step};
use crate::Lab;

/// The guest program.
pub const PROGRAM: &str = "alloc-faults";
/// The kernel command line words the program needs.
pub const KERNEL_ARGS: &[&str] = &["kmemleak=on"];
/// The program's budget once it said READY. Its walks (about 210
/// bind/unbind cycles, a few dozen other calls) and kmemleak's wait and two
/// scans took about 15 s of guest time under TCG here (the whole test 28 s
/// to 70 s, with the machine idle or shared by six builds); a loaded CI
/// machine gets ten times that.
pub const BUDGET: Duration = Duration::from_secs(180);

/// The scenario: the program, waited for until its READY, then its result
/// within [`BUDGET`].
pub fn scenario() -> Scenario {
    Scenario {
        budget: BUDGET,
        ..Scenario::program(PROGRAM, &[]).with_steps(vec![Step::Ready(PROGRAM.into())])
    }
}

/// Boot `kernel` in `cell` with [`KERNEL_ARGS`] and run the program.
pub fn run(lab: &Lab, kernel: &Kernel, cell: Cell) -> Result<Outcome> {
    let mut outs = engine::run(lab, kernel, cell, &[scenario()], |spec| {
        spec.kernel_args
            .extend(KERNEL_ARGS.iter().map(|a| a.to_string()));
    })?;
    outs.pop().context("the run gave no outcome")
}
