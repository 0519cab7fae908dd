//! `vdevlab faults`: run a fault-injection campaign and report.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vdevlab_lab::campaign::{self, FaultScenario};
use vdevlab_lab::project::Project;
use vdevlab_lab::Lab;

/// Run fault scenarios (default: every `faults/*.toml`) in real guests.
#[derive(Debug, Args)]
pub struct FaultsArgs {
    /// Only the fast subset (what CI runs on every change).
    #[arg(long)]
    fast: bool,
    /// Only the scenarios whose name contains this text (repeatable: any
    /// of them), e.g. `--only tx`.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// Guest kernel(s): trixie, bookworm, lab, lockdep, ... (VDEVLAB_KERNELS in lab.env), or all.
    /// A scenario that names a kernel (`kernel = "lockdep"`) runs on that one.
    #[arg(long, default_value = "trixie")]
    kernel: String,
    /// VMM and accelerator: qemu-tcg, qemu-kvm, cloud-hypervisor-kvm (each
    /// with -smp for several vCPUs), or auto (QEMU on KVM where KVM works,
    /// else QEMU/TCG).
    #[arg(long, default_value = "auto")]
    cell: String,
    /// Your own driver for the qw device instead of the reference one: a
    /// project folder (vdevlab.toml) or a Kbuild folder. The guest programs
    /// open the device node its manifest names (`[driver] dev`), else /dev/qw0.
    #[arg(long, value_name = "DIR")]
    driver: Option<PathBuf>,
    /// Scenario files to run instead of the shipped ones (e.g. your own).
    files: Vec<PathBuf>,
}

/// Run the campaign; true when every scenario passed.
pub fn run(args: FaultsArgs) -> Result<bool> {
    let scenarios: Vec<FaultScenario> = if args.files.is_empty() {
        campaign::shipped()?
    } else {
        args.files
            .iter()
            .map(|f| FaultScenario::load(f))
            .collect::<Result<_>>()?
    };
    let scenarios: Vec<FaultScenario> = scenarios
        .into_iter()
        .filter(|s| !args.fast || s.fast)
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| s.name.contains(o.as_str())))
        .collect();
    if scenarios.is_empty() {
        anyhow::bail!(
            "no fault scenario matches (see `vdevlab faults --help` for --fast and --only)"
        );
    }
    let driver = args.driver.as_deref().map(Project::load).transpose()?;
    if let Some(p) = &driver {
        p.prepare()?;
    }
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    let cell = vdevlab_lab::cell::pick(Some(&args.cell))?;
    let lab = Lab::get()?;
    let kernels: Vec<_> = if args.kernel == "all" {
        lab.env.kernels.clone()
    } else {
        vec![lab.env.kernel(&args.kernel)?.clone()]
    };
    let mut all_pass = true;
    for (n, kernel) in kernels.iter().enumerate() {
        // A scenario that names its own kernel runs once, not per kernel.
        let scenarios: Vec<FaultScenario> = scenarios
            .iter()
            .filter(|s| n == 0 || s.kernel.is_none())
            .cloned()
            .collect();
        eprintln!(
            "[vdevlab] {} fault scenarios on {} ({}) in {cell} against {}",
            scenarios.len(),
            kernel.name,
            kernel.release,
            driver
                .as_ref()
                .map_or("vdevlab_qw".to_string(), |p| format!("{}.ko", p.module))
        );
        let verdicts = campaign::run_against(&lab, kernel, cell, &scenarios, driver.as_ref())?;
        println!(
            "{} ({}), {cell}:\n{}",
            kernel.name,
            kernel.release,
            campaign::table(&verdicts)
        );
        all_pass &= verdicts.iter().all(|v| v.pass);
    }
    println!(
        "reports: {}/faults/ (report-<kernel>[-<module>]-<cell>.json, junit-<kernel>[-<module>]-<cell>.xml); records: fault-<name> in runs.jsonl",
        vdevlab_lab::env::runs_dir().display()
    );
    Ok(all_pass)
}
