//! `vdevlab up`: the interactive lab (`vdevlab_lab::up`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vdevlab_lab::project::Project;
use vdevlab_lab::Lab;

/// Boot a guest with the device attached and the driver loaded, and give
/// you a shell on its console.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Guest kernel: trixie, bookworm, ...
    #[arg(long, default_value = "trixie")]
    kernel: String,
    /// Your project (vdevlab.toml) or Kbuild folder: its driver, device and
    /// files instead of the reference driver.
    #[arg(long, value_name = "DIR")]
    project: Option<PathBuf>,
    /// VMM and accelerator: qemu-tcg, qemu-kvm, cloud-hypervisor-kvm (each
    /// with -smp for several vCPUs), or auto (QEMU on KVM where KVM works,
    /// else QEMU/TCG).
    #[arg(long, default_value = "auto")]
    cell: String,
}

/// Run a session; true when it ended without a kernel splat.
pub fn run(args: UpArgs) -> Result<bool> {
    let project = args.project.as_deref().map(Project::load).transpose()?;
    if let Some(p) = &project {
        p.prepare()?;
    }
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    let cell = vdevlab_lab::cell::pick(Some(&args.cell))?;
    let lab = Lab::get()?;
    let kernel = lab.env.kernel(&args.kernel)?.clone();
    let session = vdevlab_lab::up::up(
        &lab,
        &kernel,
        project.as_ref(),
        cell,
        std::io::stdin(),
        std::io::stdout(),
    )?;
    Ok(session.record.reason.is_none())
}
