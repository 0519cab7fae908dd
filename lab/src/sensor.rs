//! The second example device, the sampling sensor (`docs/sensor-spec.md`),
//! in the lab: its backend (`vdevlab-sensor`), its driver
//! (`guest-driver/sensor/`, built for every kernel of the matrix and laid
//! over the lab's initramfs), its VM description
//! (`vmm-config/configs/sensor.toml`) and its scenarios, which run through
//! the same boots, run records, console capture and splat detection as the
//! qw device's (the engine, [`crate::engine`]), with another
//! backend, driver and device node in the [`BootSpec`].

use std::fs::{self, File};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use vdevlab_vmm_config::{VmConfig, SENSOR_CONFIG_TOML};

use crate::artifacts::{build_module, check_module, lab_dir, write_archive};
use crate::cell::Cell;
use crate::engine;
use crate::env::{target_dir, workspace_root, Kernel};
use crate::guest::{BackendCommand, BootSpec, GuestDriver};
use crate::scenario::{Outcome, Scenario, Step};
use crate::Lab;

/// The driver module's name.
pub const MODULE: &str = "vdevlab_sensor";
/// The device node of the first sensor.
pub const DEVICE_NODE: &str = "/dev/sensor0";

/// What a sensor boot needs on top of the lab's artifacts.
#[derive(Debug, Clone)]
pub struct SensorArtifacts {
    /// The `vdevlab-sensor` backend binary.
    pub backend_bin: PathBuf,
    /// Per guest kernel (the lab's order).
    pub kernels: Vec<SensorKernel>,
}

/// The sensor driver for one guest kernel.
#[derive(Debug, Clone)]
pub struct SensorKernel {
    /// The kernel's name.
    pub kernel: String,
    /// The module.
    pub driver_ko: PathBuf,
    /// Its build log (compiler and sparse output).
    pub build_log: String,
    /// The same log on disk.
    pub build_log_path: PathBuf,
    /// A newc archive holding `lib/modules/vdevlab_sensor.ko`, laid over
    /// the kernel's lab initramfs ([`BootSpec::overlays`]).
    pub overlay: PathBuf,
}

impl SensorArtifacts {
    /// The driver built for the kernel named `name`.
    pub fn for_kernel(&self, name: &str) -> Result<&SensorKernel> {
        self.kernels
            .iter()
            .find(|k| k.kernel == name)
            .with_context(|| format!("no sensor driver was built for the guest kernel '{name}'"))
    }
}

/// Build the backend and, for every kernel of the lab, the driver (W=1;
/// with sparse where the lab's driver build runs it) and its overlay.
/// Incremental, and serialised across test processes by a lock file.
pub fn prepare(lab: &Lab) -> Result<SensorArtifacts> {
    let dir = lab_dir();
    fs::create_dir_all(&dir)?;
    let lock = File::create(dir.join(".sensor.lock"))?;
    lock.lock()
        .context("locking target/lab for the sensor build")?;

    eprintln!("[vdevlab] building the sensor backend (vdevlab-sensor)");
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "build",
            "--quiet",
            "-p",
            "vdevlab-sensor",
            "--bin",
            "vdevlab-sensor",
        ])
        .stdin(Stdio::null())
        .output()
        .context("starting cargo build -p vdevlab-sensor")?;
    if !out.status.success() {
        bail!(
            "cargo build -p vdevlab-sensor failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let backend_bin = target_dir().join("debug/vdevlab-sensor");

    let src = workspace_root().join("guest-driver/sensor");
    let mut kernels = Vec::new();
    for kernel in &lab.env.kernels {
        eprintln!("[vdevlab] building the sensor driver for {}", kernel.name);
        let (driver_ko, build_log, build_log_path) =
            build_module(kernel, &src, MODULE, &dir, "sensor-driver")?;
        let ko =
            fs::read(&driver_ko).with_context(|| format!("reading {}", driver_ko.display()))?;
        check_module(kernel, MODULE, &ko)?;
        let overlay = dir.join(format!("sensor-overlay-{}.cpio", kernel.release));
        write_archive(
            &overlay,
            &["lib", "lib/modules"],
            &[(format!("lib/modules/{MODULE}.ko"), 0o644, ko)],
        )?;
        kernels.push(SensorKernel {
            kernel: kernel.name.clone(),
            driver_ko,
            build_log,
            build_log_path,
            overlay,
        });
    }
    Ok(SensorArtifacts {
        backend_bin,
        kernels,
    })
}

/// The sensor's VM description (`configs/sensor.toml`): its device's
/// virtio id, queue sizes and config size are the boot's.
pub fn vm_config() -> Result<VmConfig> {
    let cfg = VmConfig::from_toml_str(SENSOR_CONFIG_TOML).context("configs/sensor.toml")?;
    cfg.validate().context("configs/sensor.toml")?;
    Ok(cfg)
}

/// What turns a lab boot into a sensor boot: the sensor backend, the
/// device as `configs/sensor.toml` describes it, and the sensor driver (told
/// the same virtio id), waited for as `/dev/sensor0`.
#[derive(Debug, Clone)]
pub struct SensorBoot {
    backend: BackendCommand,
    virtio_id: u16,
    overlay: PathBuf,
}

impl SensorBoot {
    /// The sensor boot of `kernel`, with `backend_args` after the backend's
    /// sockets (e.g. `--seed 7`).
    pub fn new(art: &SensorArtifacts, kernel: &Kernel, backend_args: &[String]) -> Result<Self> {
        let cfg = vm_config()?;
        let dev = cfg
            .vhost_user
            .first()
            .context("configs/sensor.toml has no vhost-user device")?;
        let mut argv = vec![
            art.backend_bin.to_string_lossy().into_owned(),
            "--socket".into(),
            "{socket}".into(),
            "--control".into(),
            "{control}".into(),
            "--once".into(),
            // Final counters stay readable after the guest powers off.
            "--linger-ms".into(),
            "10000".into(),
        ];
        argv.extend(backend_args.iter().cloned());
        Ok(Self {
            backend: BackendCommand {
                argv,
                queue_sizes: dev.queue_sizes.clone(),
                config_size: dev.config_size,
            },
            virtio_id: dev.virtio_id,
            overlay: art.for_kernel(&kernel.name)?.overlay.clone(),
        })
    }

    /// Apply to a boot.
    pub fn apply(&self, spec: &mut BootSpec) {
        spec.backend = Some(self.backend.clone());
        spec.virtio_id = self.virtio_id;
        spec.driver = Some(GuestDriver {
            module: MODULE.into(),
            dev: Some(DEVICE_NODE.into()),
        });
        spec.driver_params
            .push(format!("virtio_id={}", self.virtio_id));
        spec.overlays.push(self.overlay.clone());
    }
}

/// A sensor scenario of the guest programs (`sensor-stream`,
/// `sensor-unbind`, `sensor-reset`) with its arguments, as a scripted case:
/// the host waits for its `VDEVLAB-READY`, then does `then` (e.g. a
/// control request), and the guest checks everything itself (every
/// sample's value, sequence and timestamp, the alarms, the errors).
pub fn case(scenario: &str, args: &[&str], then: Vec<Step>) -> Scenario {
    let mut steps = vec![Step::Ready(scenario.to_string())];
    steps.extend(then);
    Scenario::program(scenario, args).with_steps(steps)
}

/// Boot `kernel` once with the sensor in `cell` and run `cases` in order,
/// each with its own run record (scenario name as given, driver
/// `vdevlab_sensor`).
pub fn run(
    lab: &Lab,
    art: &SensorArtifacts,
    kernel: &Kernel,
    cell: Cell,
    cases: &[Scenario],
    backend_args: &[String],
) -> Result<Vec<Outcome>> {
    let boot = SensorBoot::new(art, kernel, backend_args)?;
    engine::run(lab, kernel, cell, cases, |spec| boot.apply(spec))
}
