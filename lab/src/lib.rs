//! The vdevlab harness, shared by the `vdevlab` command and the integration
//! tests. Its modules, in the order a run uses them:
//!
//! - [`mod@env`]: provisions the lab (toolchain, guest kernels, QEMU) and
//!   knows where things live;
//! - [`doctor`]: says what this machine can run, and what to do about it;
//! - [`cell`]: the matrix's cells (VMM, accelerator, one vCPU or SMP) and
//!   which can run;
//! - [`artifacts`]: builds what a boot needs (backend, guest programs,
//!   driver, initramfs);
//! - [`sockets`]: a run's short private socket folder;
//! - [`guest`]: boots a guest under a real VMM with the real backend, and
//!   reads its console;
//! - [`smp`]: where an SMP guest takes interrupts and runs programs, and
//!   the proof of it from the console;
//! - [`scenario`]: what a scenario is (data: a guest command, the host's
//!   steps, the expectations);
//! - [`engine`]: the one engine that runs scenarios and records them;
//! - [`campaign`]: fault-injection campaigns (`faults/*.toml`);
//! - [`seeded`]: race bugs seeded into a scratch copy of the driver
//!   (`faults/races/seeded.toml`), and which layer catches each;
//! - [`project`]: a user's own driver, device and scenarios
//!   (`vdevlab.toml`);
//! - [`sensor`]: the second example device in the lab;
//! - [`mod@bench`]: latency and throughput against virtio-serial and a pipe;
//! - [`up`]: the interactive lab, a shell on the guest's console;
//! - [`stress`]: the concurrency stress (many readers and writers, then an
//!   unbind), as data for the engine;
//! - [`splat`]: spots kernel splats on a console;
//! - [`record`]: one run record per scenario, `runs.jsonl`;
//! - [`report`]: JSON and JUnit reports and verdict tables;
//! - [`alloc_faults`]: the driver's allocations failed one at a time by the
//!   kernel's fault injection, on the lockdep kernel with kmemleak.

pub mod alloc_faults;
pub mod artifacts;
pub mod bench;
pub mod campaign;
pub mod cell;
pub mod doctor;
pub mod engine;
pub mod env;
pub mod guest;
pub mod project;
pub mod record;
pub mod report;
pub mod scenario;
pub mod seeded;
pub mod sensor;
pub mod smp;
pub mod sockets;
pub mod splat;
pub mod stress;
pub mod up;

use std::sync::OnceLock;

use anyhow::Result;

/// A provisioned lab with its artifacts built.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Toolchain, kernel and VMM.
    pub env: env::LabEnv,
    /// Backend, guest programs, driver and initramfs.
    pub artifacts: artifacts::Artifacts,
}

static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();

impl Lab {
    /// Provision and build (once per process; cached across processes).
    pub fn get() -> Result<Lab> {
        LAB.get_or_init(|| {
            (|| -> Result<Lab> {
                let env = env::LabEnv::provision()?;
                let artifacts = artifacts::prepare(&env)?;
                Ok(Lab { env, artifacts })
            })()
            .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
    }
}
