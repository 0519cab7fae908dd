//! `vdevlab stress`: the concurrency stress campaign (`vdevlab_lab::stress`)
//! on one kernel or all: readers and writers in every I/O model at once,
//! churn, ioctls, signals, lock holders and config changes, then an
//! unbind while all of it runs; one boot per seed, each on record in
//! `runs.jsonl` (scenario `stress`), with a JSON report per run.

use anyhow::Result;
use clap::Args;
use vdevlab_lab::stress::{self, Stress, CONTENDED, LOCKER_CONTENDED, SENSOR_CONTENDED};
use vdevlab_lab::Lab;

/// Run the stress scenario.
#[derive(Debug, Args)]
pub struct StressArgs {
    /// Guest kernel(s): a kernel's name (trixie, bookworm, lab, or a
    /// debug kernel such as lockdep or kcsan once provisioned), or all.
    #[arg(long, default_value = "trixie")]
    kernel: String,
    /// VMM and accelerator: qemu-tcg, qemu-kvm, cloud-hypervisor-kvm, or
    /// auto (QEMU on KVM where KVM works, else QEMU/TCG).
    #[arg(long, default_value = "auto")]
    cell: String,
    /// Seconds of stress before the unbind, per run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seed of the first run (the runs use seed, seed+1, ...).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Runs (boots) per kernel.
    #[arg(long, default_value_t = 1)]
    runs: u64,
    /// Reader threads (they cycle through the reader models).
    #[arg(long, default_value_t = 7)]
    readers: usize,
    /// Writer threads (they cycle through the writer models).
    #[arg(long, default_value_t = 5)]
    writers: usize,
    /// Which device: qw (the reference device, /dev/qw0), sensor (the
    /// sampling sensor's smaller stress), or all (both, one boot each).
    #[arg(long, default_value = "qw")]
    device: String,
    /// The guest's vCPUs (2 to 8: an SMP cell, the device's interrupts
    /// on the last CPU, the threads on every CPU; 1: a one-vCPU cell).
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
}

/// The result fields the report shows, in order.
const SHOWN: &[&str] = &[
    "samples_received",
    "samples_read",
    "samples_dropped",
    "rx_records",
    "rx_read",
    "rx_flushed",
    "rx_lost_at_unbind",
    "tx_queued_bytes",
    "opens",
    "signals",
    "config_reads",
    "unbind_ms",
];

/// Run the campaign; true when every run passed.
pub fn run(args: StressArgs) -> Result<bool> {
    if !(1..=vdevlab_lab::cell::MAX_SMP_VCPUS).contains(&args.vcpus) {
        anyhow::bail!(
            "--vcpus {}: 1 to {} (the lab kernel's NR_CPUS)",
            args.vcpus,
            vdevlab_lab::cell::MAX_SMP_VCPUS
        );
    }
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    let mut cell = vdevlab_lab::cell::pick(Some(&args.cell))?;
    if args.vcpus > 1 {
        cell = cell.with_smp();
    }
    if let Some(why) = cell.blocked_by() {
        anyhow::bail!("{cell} cannot run here: {why}");
    }
    let lab = Lab::get()?;
    let kernels: Vec<_> = if args.kernel == "all" {
        lab.env.kernels.clone()
    } else {
        vec![lab.env.kernel(&args.kernel)?.clone()]
    };
    let (qw, sensor) = match args.device.as_str() {
        "qw" => (true, false),
        "sensor" => (false, true),
        "all" => (true, true),
        other => anyhow::bail!("--device {other}: qw, sensor or all"),
    };
    let sensor_art = if sensor {
        Some(vdevlab_lab::sensor::prepare(&lab)?)
    } else {
        None
    };
    let dir = vdevlab_lab::env::runs_dir().join("stress");
    std::fs::create_dir_all(&dir)?;
    let mut all_pass = true;
    for kernel in &kernels {
        for seed in args.seed..args.seed + args.runs {
            let st = Stress {
                seed,
                seconds: args.seconds,
                readers: args.readers,
                writers: args.writers,
            };
            let vcpus = args.vcpus;
            let mut runs = Vec::new();
            if qw {
                eprintln!(
                    "[vdevlab] stress on {} ({}) in {cell}, {vcpus} vCPU(s): seed {seed}, {} s, {} readers, {} writers",
                    kernel.name, kernel.release, st.seconds, st.readers, st.writers
                );
                let out = stress::run(&lab, kernel, cell, &st, |spec| spec.vcpus = Some(vcpus))?;
                let paths = out
                    .result
                    .as_ref()
                    .map_or(CONTENDED.to_vec(), stress::expected_paths);
                if !paths.contains(&LOCKER_CONTENDED[0]) {
                    println!(
                        "  (no userfaultfd in {}: the locker's paths, a held lock's EAGAIN and the EINTR of a task asleep on it, were not run)",
                        kernel.name
                    );
                }
                runs.push(("qw", out, paths));
            }
            if let Some(art) = &sensor_art {
                eprintln!(
                    "[vdevlab] sensor stress on {} ({}) in {cell}, {vcpus} vCPU(s): seed {seed}, {} s, {} readers",
                    kernel.name, kernel.release, st.seconds, st.readers
                );
                let out = stress::run_sensor(&lab, art, kernel, cell, &st, |spec| {
                    spec.vcpus = Some(vcpus)
                })?;
                runs.push(("sensor", out, SENSOR_CONTENDED.to_vec()));
            }
            for (device, out, contended) in runs {
                all_pass &= report(&dir, device, kernel, cell, seed, &st, &out, &contended)?;
            }
        }
    }
    println!(
        "reports: {}/report-<device>-<kernel>-<seed>.json; records: stress, sensor-stress in {}",
        dir.display(),
        vdevlab_lab::record::runs_file().display()
    );
    Ok(all_pass)
}

/// Print one run's report and write its JSON; true when it passed and
/// reached every contended path.
#[allow(clippy::too_many_arguments)]
fn report(
    dir: &std::path::Path,
    device: &str,
    kernel: &vdevlab_lab::env::Kernel,
    cell: vdevlab_lab::cell::Cell,
    seed: u64,
    st: &Stress,
    out: &vdevlab_lab::scenario::Outcome,
    contended: &[&str],
) -> Result<bool> {
    let v = out.result.clone().unwrap_or_default();
    let num = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    println!(
        "{device} on {} ({}), {cell}, seed {seed}: {} in {:.1} s",
        kernel.name,
        kernel.release,
        if out.passed() { "PASS" } else { "FAIL" },
        out.record.duration_ms.unwrap_or(0) as f64 / 1000.0
    );
    let shown: Vec<String> = SHOWN
        .iter()
        .filter(|k| v.get(**k).is_some())
        .map(|k| format!("{k} {}", num(k)))
        .collect();
    println!("  {}", shown.join(", "));
    let reached: Vec<String> = contended
        .iter()
        .map(|k| format!("{k} {}", num(k)))
        .collect();
    println!("  contended paths: {}", reached.join(", "));
    let unreached: Vec<&str> = contended.iter().copied().filter(|k| num(k) == 0).collect();
    if !unreached.is_empty() {
        println!("  not reached: {}", unreached.join(", "));
    }
    if let Some(s) = &out.stats {
        println!(
            "  device: injected {} bytes, delivered {} in {} buffers, took {} in {} buffers, {} interrupts raised",
            s.injected_bytes, s.rx_bytes, s.rx_buffers, s.tx_bytes, s.tx_buffers, s.interrupts_raised
        );
    }
    println!("  captured {} bytes", out.captured.len());
    if let Some(why) = &out.record.reason {
        println!("  FAIL: {why}");
    }
    if let Some(per_cpu) = &out.record.irqs_per_cpu {
        println!(
            "  device interrupts per CPU: {per_cpu:?} (routed to CPU {})",
            out.record.irq_cpu.unwrap_or(0)
        );
    }
    if let Some(c) = &out.record.console {
        println!("  console: {}", c.display());
    }
    let report = dir.join(format!("report-{device}-{}-{seed}.json", kernel.name));
    let body = serde_json::json!({
        "device": device,
        "kernel": kernel.name,
        "release": kernel.release,
        "cell": cell.to_string(),
        "vcpus": out.record.vcpus,
        "irqs_per_cpu": out.record.irqs_per_cpu,
        "seed": seed,
        "seconds": st.seconds,
        "pass": out.passed(),
        "reason": out.record.reason,
        "duration_ms": out.record.duration_ms,
        "captured_bytes": out.captured.len(),
        "result": v,
    });
    std::fs::write(&report, serde_json::to_vec_pretty(&body)?)?;
    Ok(out.passed() && unreached.is_empty())
}
