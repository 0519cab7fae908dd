//! `vdevlab user-test DIR`: build a user's driver from their folder, boot,
//! and run their scenarios (`vdevlab_lab::project`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vdevlab_lab::project::{self, Project};
use vdevlab_lab::Lab;

/// Build your driver module, put it and your programs into the guest, boot,
/// and run your scenarios (`DIR/vdevlab.toml`).
#[derive(Debug, Args)]
pub struct UserTestArgs {
    /// Your project folder (holding vdevlab.toml).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Guest kernel(s): a name (trixie, bookworm, ...) or all; default: the
    /// manifest's `kernels`, else trixie.
    #[arg(long)]
    kernel: Option<String>,
    /// Cells (VMM and accelerator) to run in, comma-separated or repeated:
    /// qemu-tcg, qemu-kvm, cloud-hypervisor-kvm (each with -smp for several
    /// vCPUs), all, or auto (QEMU on KVM where KVM works, else QEMU/TCG).
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    cell: Vec<String>,
}

/// Run the project; true when every scenario passed on every kernel.
pub fn run(args: UserTestArgs) -> Result<bool> {
    let project = Project::load(&args.dir)?;
    project.prepare()?;
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    let cells = vdevlab_lab::cell::pick_many(&args.cell)?;
    let lab = Lab::get()?;
    let mut all_pass = true;
    for kernel in project.kernels(&lab, args.kernel.as_deref())? {
        for &cell in &cells {
            eprintln!(
                "[vdevlab] {}: {} scenarios with {}.ko on {} ({}) in {cell}",
                project.name,
                project.manifest.scenario.len(),
                project.module,
                kernel.name,
                kernel.release
            );
            let verdicts = project.run(&lab, &kernel, cell)?;
            println!("{}", project::table(&verdicts));
            for v in verdicts.iter().filter(|v| !v.pass) {
                println!("--- {} on {}: output\n{}", v.name, v.kernel, v.output);
            }
            if let Some(v) = verdicts.first() {
                println!("console: {}", v.console.display());
            }
            all_pass &= verdicts.iter().all(|v| v.pass);
        }
    }
    println!(
        "reports: {}/user/{}/ (report-<kernel>-<cell>.json, junit-<kernel>-<cell>.xml); records: {}/<scenario> in {}",
        vdevlab_lab::env::runs_dir().display(),
        project.name,
        project.name,
        vdevlab_lab::record::runs_file().display()
    );
    Ok(all_pass)
}
