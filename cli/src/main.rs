//! `vdevlab`: the lab's command.
//!
//! - `vdevlab demo`: provision, build, boot the lab guest, move a payload
//!   from the emulated device into a blocking `read()` and say what happened;
//! - `vdevlab test`: provision and build with progress shown, then run the
//!   test suite (cargo-nextest);
//! - `vdevlab prepare`: provision and build only;
//! - `vdevlab ctl`: talk to a running device's control plane;
//! - `vdevlab bench`: latency and throughput per I/O model against the
//!   virtio-serial baseline and a host-pipe floor, in one run;
//! - `vdevlab races`: seeded race bugs in the driver, and which layer
//!   (one vCPU, SMP, lockdep, KCSAN) catches each;
//! - `vdevlab user-test DIR`: a user's own driver and scenarios;
//! - `vdevlab up`: a shell in a booted guest with the device and driver;
//! - `vdevlab new device NAME`: scaffold a device, its driver and tests;
//! - `vdevlab stress`: the concurrency stress campaign (many readers and
//!   writers at once, then an unbind) on one kernel or all;
//! - `vdevlab doctor`: which cells this host can run, and the fix for each
//!   one it cannot.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod device;
mod faults;
mod new;
mod races;
mod stress;
mod up;
mod user;
use vdevlab_lab::engine::blocking_rx;
use vdevlab_lab::record::runs_file;
use vdevlab_lab::scenario::pattern;
use vdevlab_lab::Lab;

#[derive(Debug, Parser)]
#[command(version, about = "vdevlab: a hardware-less driver lab")]
struct Cli {
    /// Stream provisioning's apt and mmdebstrap output instead of one line
    /// per step (sets VDEVLAB_VERBOSE=1; it goes to the cache's
    /// provision.log either way, the lab kernel's make to its build.log).
    #[arg(long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot the lab guest, load the driver, move a payload through it.
    Demo {
        /// Payload size in bytes (a seeded pseudo-random stream).
        #[arg(long, default_value_t = 65536)]
        bytes: usize,
        /// Seed of the payload.
        #[arg(long, default_value_t = 0x5eed)]
        seed: u64,
        /// VMM and accelerator: qemu-tcg, qemu-kvm, cloud-hypervisor-kvm
        /// (each with -smp for several vCPUs), or auto (QEMU on KVM where
        /// KVM works, else QEMU/TCG).
        #[arg(long, default_value = "auto")]
        cell: String,
    },
    /// Provision and build, then run the test suite with cargo-nextest.
    Test {
        /// nextest profile (`ci` writes JUnit XML).
        #[arg(long, default_value = "default")]
        profile: String,
        /// Which cells (VMM and accelerator) run, as VDEVLAB_CELLS: auto
        /// (every cell this host can run; the others skip, on record with
        /// why), all, or a list (qemu-kvm,cloud-hypervisor-kvm): those must
        /// run and pass, so a KVM machine's check cannot pass on skips.
        #[arg(long, value_name = "CELLS")]
        cells: Option<String>,
        /// Extra arguments for `cargo nextest run` (after `--`).
        #[arg(last = true)]
        nextest_args: Vec<String>,
    },
    /// Provision the lab and build the guest image, nothing else.
    Prepare,
    /// Drive a running device from the host: inject, capture, stats,
    /// interrupt modes, data sources, faults, reset.
    Device(device::DeviceArgs),
    /// Run a fault-injection campaign (faults/*.toml) and report how the
    /// driver held up.
    Faults(faults::FaultsArgs),
    /// The concurrency stress campaign: readers and writers in every I/O
    /// model at once, churn, flush/reset ioctls, signals, lock holders and
    /// interrupt-mode changes, then an unbind while all of it runs; the
    /// records settle every byte. One boot per seed.
    Stress(stress::StressArgs),
    /// Seed race bugs into scratch copies of the driver
    /// (faults/races/seeded.toml) and show which layer catches each: one
    /// vCPU, two vCPUs, the lockdep and KCSAN kernels.
    Races(races::RacesArgs),
    /// Measure round-trip latency and throughput per I/O model, against
    /// QEMU's virtio-serial and a host pipe in the same run (tables, JSON
    /// and SVG under target/lab-runs/bench/).
    Bench(bench::BenchArgs),
    /// Test your own driver: build the module in DIR against the lab
    /// kernel(s), boot, load it, run DIR/vdevlab.toml's scenarios.
    UserTest(user::UserTestArgs),
    /// The interactive lab: boot the guest with the device and driver, get
    /// a shell on its console; the control plane stays open to other
    /// terminals (`vdevlab device -c ...`).
    Up(up::UpArgs),
    /// Scaffold a project: `vdevlab new device NAME` makes a device model on
    /// the framework, its driver and passing scenarios.
    New(new::NewArgs),
    /// Say what this host can run (QEMU/TCG, QEMU/KVM, Cloud Hypervisor)
    /// and, for each thing it cannot, why and the fix. Provisions and boots
    /// nothing.
    Doctor,
}

fn doctor() -> Result<bool> {
    let report = vdevlab_lab::doctor::examine();
    println!("vdevlab doctor: this host");
    for c in &report.checks {
        println!(
            "  {:<4} {:<24} {}",
            if c.ok { "ok" } else { "no" },
            c.what,
            c.detail
        );
        if let Some(fix) = &c.fix {
            println!("       {:<24} fix: {fix}", "");
        }
    }
    println!("cells (VMM/accelerator):");
    for cell in &report.cells {
        match &cell.blocked_by {
            None => println!("  {:<22} runs here", cell.cell.name()),
            Some(why) => println!("  {:<22} cannot run: {why}", cell.cell.name()),
        }
    }
    // Fails when not even the TCG cells can run (after provisioning).
    Ok(report.cells[0]
        .blocked_by
        .as_deref()
        .is_none_or(|why| why.contains("not provisioned yet")))
}

fn demo(bytes: usize, seed: u64, cell: &str) -> Result<bool> {
    let cell = vdevlab_lab::cell::pick(Some(cell))?;
    eprintln!(
        "[vdevlab] provisioning the lab and building the guest image (cached after the first run)"
    );
    let lab = Lab::get()?;
    println!(
        "lab: {} in {}",
        lab.env.qemu_version,
        match &lab.env.qemu {
            vdevlab_lab::env::QemuRuntime::Host(p) => format!("host ({})", p.display()),
            vdevlab_lab::env::QemuRuntime::InRoot { root, .. } =>
                format!("the lab root ({})", root.display()),
        }
    );
    let kernel = lab.env.default_kernel();
    println!("guest kernel: {} ({})", kernel.release, kernel.name);
    match vdevlab_lab::cell::Cell::QEMU_KVM.blocked_by() {
        Some(why) if cell == vdevlab_lab::cell::Cell::QEMU_TCG => {
            println!("cell: {cell} (KVM not usable: {why})")
        }
        _ => println!("cell: {cell}"),
    }
    let payload = pattern(seed, bytes);
    println!("booting the guest; its blocking read() waits for {bytes} bytes from the device...");
    let out = blocking_rx(&lab, kernel, cell, &payload)?;
    let r = &out.record;
    println!(
        "boot: init reached {} ms after VMM start; driver ready at {} ms",
        r.boot_ms.map_or("?".into(), |v| v.to_string()),
        r.driver_ready_ms.map_or("?".into(), |v| v.to_string())
    );
    if let Some(g) = &out.guest {
        println!(
            "guest: read {} bytes in {} read() calls, SHA-256 {}",
            g.bytes.unwrap_or(0),
            g.reads.unwrap_or(0),
            g.sha256.as_deref().unwrap_or("-")
        );
    }
    println!(
        "host:  sent {bytes} bytes, SHA-256 {}",
        out.host_sha256.as_deref().unwrap_or("-")
    );
    if let Some(s) = &out.stats {
        println!(
            "device: {} bytes into {} rx buffers, {} interrupts raised, {} suppressed, {} bad chains",
            s.rx_bytes, s.rx_buffers, s.interrupts_raised, s.interrupts_suppressed, s.bad_chains
        );
    }
    match &r.reason {
        None => println!("result: PASS"),
        Some(why) => println!("result: FAIL: {why}"),
    }
    if let Some(c) = &r.console {
        println!("console: {}", c.display());
    }
    println!("record: {}", runs_file().display());
    Ok(out.passed())
}

fn test(profile: &str, cells: Option<&str>, extra: &[String]) -> Result<bool> {
    use vdevlab_lab::cell::{self, Selection, CELLS_VAR};
    let selection = match cells {
        Some(c) => Selection::parse(c)?,
        None => Selection::from_env()?,
    };
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    Lab::get()?;
    let has_nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nextest {
        bail!("cargo-nextest is needed: cargo install cargo-nextest --locked");
    }
    eprintln!(
        "[vdevlab] running the test suite (cargo nextest run --workspace --profile {profile})"
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut cmd = Command::new("cargo");
    cmd.current_dir(vdevlab_lab::env::workspace_root())
        .args(["nextest", "run", "--workspace", "--profile", profile])
        .args(extra);
    if let Some(c) = cells {
        cmd.env(CELLS_VAR, c);
    }
    let status = cmd.status().context("running cargo nextest")?;
    // What each cell's tests did in this run.
    let tests: Vec<_> = cell::read_tests()?
        .into_iter()
        .filter(|t| t.ts >= started)
        .collect();
    let sums = cell::summarize(&tests);
    let path = vdevlab_lab::env::runs_dir().join("cells.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&sums)?)?;
    println!(
        "cells ({CELLS_VAR}={}; {} cell tests; {}):\n{}",
        cells
            .map(String::from)
            .or_else(|| std::env::var(CELLS_VAR).ok())
            .unwrap_or_else(|| "auto".into()),
        tests.len(),
        path.display(),
        cell::summary_table(&sums)
    );
    let ready = cell::meets(&selection, &sums);
    if !ready && status.success() {
        println!("the selected cells did not all pass (see above)");
    }
    Ok(status.success() && ready)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if cli.verbose {
        // Read by images/provision.sh and the scripts it runs (this
        // process's children inherit it); set before any thread starts.
        std::env::set_var("VDEVLAB_VERBOSE", "1");
    }
    let result = match cli.cmd {
        Cmd::Demo { bytes, seed, cell } => demo(bytes, seed, &cell),
        Cmd::Test {
            profile,
            nextest_args,
            cells,
        } => test(&profile, cells.as_deref(), &nextest_args),
        Cmd::Prepare => Lab::get().map(|lab| {
            for k in &lab.artifacts.kernels {
                println!("{} ({}):", k.kernel, k.release);
                println!("  initramfs: {}", k.initramfs.display());
                println!("  driver: {}", k.driver_ko.display());
            }
            true
        }),
        Cmd::Device(args) => device::run(args),
        Cmd::Faults(args) => faults::run(args),
        Cmd::Races(args) => races::run(args),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Stress(args) => stress::run(args),
        Cmd::UserTest(args) => user::run(args),
        Cmd::Up(args) => up::run(args),
        Cmd::Doctor => doctor(),
        Cmd::New(args) => new::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("vdevlab: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The CI recipes in docs/ci/ are documentation people copy: every
    /// `./vdevlab SUBCOMMAND --flag` they run must exist, and so must the
    /// files and settings they rely on.
    #[test]
    fn ci_recipes_call_real_commands() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf();
        let cli = Cli::command();
        let mut recipes: Vec<_> = std::fs::read_dir(root.join("docs/ci"))
            .expect("docs/ci exists")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
        recipes.sort();
        assert!(recipes.len() >= 2, "{recipes:?}");
        // The README's host prerequisites for Debian and Ubuntu: the
        // packages of its `sudo apt-get install` line.
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let prereqs: Vec<&str> = readme
            .lines()
            .find_map(|l| l.split_once("sudo apt-get install").map(|(_, rest)| rest))
            .expect("README.md has a `sudo apt-get install` line")
            .split_whitespace()
            .filter(|w| !w.starts_with('-') && *w != "\\")
            .collect();
        assert!(
            !prereqs.is_empty(),
            "README.md's apt-get line names no package"
        );
        let mut calls = 0;
        for path in &recipes {
            let text = std::fs::read_to_string(path).unwrap();
            let name = path.display();
            // The recipes run on an Ubuntu runner as its own user: they
            // install the README's prerequisites and allow unprivileged
            // user namespaces, and no longer need a privileged container.
            let steps: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .collect();
            // The `apt-get install` command with its continuation lines.
            let mut installed = Vec::new();
            let mut on = false;
            for l in &steps {
                on = on || l.contains("apt-get install");
                if on {
                    installed.extend(l.split_whitespace());
                    on = l.trim_end().ends_with('\\');
                }
            }
            for p in &prereqs {
                assert!(
                    installed.contains(p),
                    "{name} does not install {p}, a host prerequisite in README.md"
                );
            }
            assert!(
                steps
                    .iter()
                    .any(|l| l.contains("kernel.apparmor_restrict_unprivileged_userns=0")),
                "{name} does not allow unprivileged user namespaces (Ubuntu 24.04)"
            );
            assert!(
                !steps.iter().any(|l| l.contains("--privileged")),
                "{name} asks for a privileged container, which the lab no longer needs"
            );
            for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
                if line.contains(".ci/run") {
                    let run = root.join(".ci/run");
                    assert!(run.is_file(), "{name}: .ci/run is gone");
                    let script = std::fs::read_to_string(run).unwrap();
                    if text.contains("VDEVLAB_PARTITION") {
                        assert!(
                            script.contains("VDEVLAB_PARTITION"),
                            "{name}: .ci/run ignores VDEVLAB_PARTITION"
                        );
                    }
                }
                let mut rest = line;
                while let Some(pos) = rest.find("./vdevlab ") {
                    rest = &rest[pos + "./vdevlab ".len()..];
                    let words: Vec<&str> = rest
                        .split_whitespace()
                        .take_while(|w| !matches!(*w, "&&" | "||" | ";" | "|"))
                        .collect();
                    let sub_name = words.first().copied().unwrap_or_default();
                    let sub = cli
                        .get_subcommands()
                        .find(|s| s.get_name() == sub_name)
                        .unwrap_or_else(|| panic!("{name}: `vdevlab {sub_name}` does not exist"));
                    for w in words.iter().skip(1).take_while(|w| **w != "--") {
                        if let Some(flag) = w.strip_prefix("--") {
                            let flag = flag.split('=').next().unwrap();
                            assert!(
                                sub.get_arguments().any(|a| a.get_long() == Some(flag)),
                                "{name}: `vdevlab {sub_name} --{flag}` does not exist"
                            );
                        }
                    }
                    calls += 1;
                }
            }
            if text.contains("target/nextest/ci/junit.xml") {
                let nextest = std::fs::read_to_string(root.join(".config/nextest.toml")).unwrap();
                assert!(
                    nextest.contains("[profile.ci.junit]") && nextest.contains("path = \"junit.xml\""),
                    "{name} uploads target/nextest/ci/junit.xml, which the ci profile no longer writes"
                );
            }
        }
        assert!(calls >= 2, "the recipes call vdevlab {calls} times");
    }
}
