//! Boot a lab guest: start the real backend, start the real VMM with the
//! guest kernel and the lab initramfs, follow the serial console, and shut
//! everything down. Every test and the CLI boot guests through [`Guest`].

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use vdevlab_qw::control::ControlClient;
use vdevlab_vmm_config::{Accel, VirtioSerialPort, VmConfig, LAB_CONFIG_TOML};

use crate::artifacts::Artifacts;
use crate::env::{in_root_script, runs_dir, Kernel, LabEnv, QemuRuntime, DEFAULT_KERNEL};
pub use crate::smp::Placement;
use crate::sockets::SocketDir;
use crate::splat::{find_splats, Splat};
use vdevlab_guest::protocol;

/// Which VMM runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// QEMU with `vhost-user-test-device-pci`.
    Qemu,
    /// Cloud Hypervisor with `--generic-vhost-user`.
    CloudHypervisor,
}

impl Vmm {
    /// The name used in run records.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }
}

/// Where a timestamped kernel message (`[   10.559919] text`, the kernel
/// booted with `printk.time=1`, as the lab VMs are) starts inside a console
/// line, after other text: the serial console prints a kernel message the
/// moment it is logged, between two characters of a program's line if
/// need be, which several CPUs make common.
pub fn kernel_message_inside(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    (1..b.len()).find(|&i| {
        if b[i] != b'[' || line[..i].trim().is_empty() {
            return false;
        }
        let rest = &line[i + 1..];
        let Some((stamp, after)) = rest.split_once("] ") else {
            return false;
        };
        let Some((secs, usecs)) = stamp.trim_start().split_once('.') else {
            return false;
        };
        !after.is_empty()
            && !secs.is_empty()
            && secs.bytes().all(|c| c.is_ascii_digit())
            && usecs.len() == 6
            && usecs.bytes().all(|c| c.is_ascii_digit())
    })
}

/// Name used in run records for an accelerator.
pub fn accel_name(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => "tcg",
        Accel::Kvm => "kvm",
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// Scenario name (run records, console file name).
    pub scenario: String,
    /// Guest program invocations to run in order (`vdevlab-guest <args>`
    /// each); empty: only load the driver.
    pub runs: Vec<Vec<String>>,
    /// The VMM.
    pub vmm: Vmm,
    /// The accelerator.
    pub accel: Accel,
    /// The virtio device id the device is presented with (and the driver told).
    pub virtio_id: u16,
    /// The guest kernel's name (`trixie`, `bookworm`; see
    /// [`LabEnv::kernels`]).
    pub kernel: String,
    /// QEMU reconnects to a restarted backend after this many ms (None: a
    /// lost backend stays lost). See [`Guest::restart_backend`].
    pub reconnect_ms: Option<u32>,
    /// Device instances: each is its own backend process and vhost-user
    /// device, and the driver makes `/dev/qw0`, `/dev/qw1`, ... of them.
    pub instances: usize,
    /// More module parameters for the driver, `name=value` each (e.g.
    /// `config_status=0`, or `dyndbg=+p` for its debug lines); `virtio_id`
    /// comes from [`Self::virtio_id`].
    pub driver_params: Vec<String>,
    /// A named virtio-serial port (QEMU only), e.g. the benchmark's
    /// baseline: QEMU listens for its host side on `bench.sock` in the run
    /// folder ([`Guest::bench_socket`]), and the guest's init waits for the
    /// port and links it as `/dev/virtio-ports/<name>`, as udev would.
    pub bench_port: Option<String>,
    /// Boot the uncompressed ELF `vmlinux` by PVH (QEMU's `-kernel` with an
    /// ELF kernel: no real-mode setup, no decompression in the guest)
    /// instead of `vmlinuz`. `None`: QEMU does when `images/provision.sh`
    /// extracted it (`kernels/<release>/vmlinux`), unless `VDEVLAB_PVH=0`.
    pub pvh: Option<bool>,
    /// The driver module to load instead of the reference `vdevlab_qw`
    /// (init.sh's `vdevlab.driver`). Its `.ko` must be in the initramfs as
    /// `lib/modules/<name>.ko`, e.g. from one of [`Self::overlays`].
    pub driver: Option<GuestDriver>,
    /// More newc archives (host paths) appended to the kernel's initramfs:
    /// the kernel unpacks them in order, a later file replacing an earlier
    /// one. A user's driver, programs and files come this way.
    pub overlays: Vec<PathBuf>,
    /// The device backend; `None`: the reference device (`vdevlab-qw`).
    pub backend: Option<BackendCommand>,
    /// The guest's vCPUs; `None`: the cell's ([`crate::cell::Cell::vcpus`];
    /// [`crate::engine::Session::boot`] fills it in), or one.
    pub vcpus: Option<u8>,
    /// Where an SMP guest takes the device's interrupts and runs its
    /// programs (default: interrupts on the last CPU, programs on CPU 0).
    pub placement: Placement,
    /// An interactive boot (`vdevlab up`): the VMM's stdin is a pipe to the
    /// serial console ([`Guest::console_input`]), the raw console output is
    /// available as it arrives ([`Guest::raw_console`]), and init opens a
    /// shell on the console (`vdevlab.shell=1`).
    pub interactive: bool,
    /// More words for the kernel command line (e.g. `kmemleak=on`, for a
    /// kernel built with its detector off by default), each without
    /// spaces or quotes.
    pub kernel_args: Vec<String>,
}

/// A guest driver other than the reference one (see [`BootSpec::driver`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDriver {
    /// The module's name (`lib/modules/<name>.ko` in the initramfs).
    pub module: String,
    /// The device node init waits for after loading it (e.g. `/dev/mydev0`);
    /// `None`: do not wait.
    pub dev: Option<String>,
}

/// A device backend of the user's own: any vhost-user backend program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendCommand {
    /// Program and arguments. `{socket}` is replaced by the vhost-user
    /// socket it must listen on, `{control}` by a control socket path (the
    /// harness then waits for that too, and [`Guest::control`] connects to
    /// it), `{run}` by the run's folder.
    pub argv: Vec<String>,
    /// The device's queue sizes (one per queue).
    pub queue_sizes: Vec<u16>,
    /// The device's config space size in bytes (QEMU's `config_size`).
    pub config_size: u32,
}

impl BackendCommand {
    fn uses_control(&self) -> bool {
        self.argv.iter().any(|a| a.contains("{control}"))
    }
}

/// How a backend process is started (restarts use the same).
#[derive(Debug, Clone)]
enum Launch {
    /// `vdevlab-qw --socket .. --control .. --once`.
    Reference(PathBuf),
    /// The user's own command.
    Command(BackendCommand, PathBuf),
}

impl BootSpec {
    /// A QEMU/TCG boot of the default kernel named `scenario` running the
    /// guest programs `runs`.
    pub fn new(scenario: &str, runs: Vec<Vec<String>>) -> Self {
        Self {
            scenario: scenario.to_string(),
            runs,
            vmm: Vmm::Qemu,
            accel: Accel::Tcg,
            reconnect_ms: None,
            instances: 1,
            virtio_id: vdevlab_qw::spec::DEFAULT_VIRTIO_ID,
            kernel: DEFAULT_KERNEL.to_string(),
            driver_params: Vec::new(),
            bench_port: None,
            pvh: None,
            driver: None,
            overlays: Vec::new(),
            backend: None,
            vcpus: None,
            placement: Placement::default(),
            interactive: false,
            kernel_args: Vec::new(),
        }
    }

    /// The same boot on the guest kernel named `kernel`.
    pub fn on_kernel(mut self, kernel: &str) -> Self {
        self.kernel = kernel.to_string();
        self
    }
}

/// One console line and when the harness saw it.
#[derive(Debug, Clone)]
pub struct ConsoleLine {
    /// Time since the VMM was started.
    pub at: Duration,
    /// The line, without its end-of-line characters.
    pub text: String,
}

/// A running guest with its backend.
#[derive(Debug)]
pub struct Guest {
    /// Scenario name.
    pub scenario: String,
    /// The folder holding this run's sockets and logs.
    pub run_dir: PathBuf,
    /// The saved serial console.
    pub console_path: PathBuf,
    /// The backend's log.
    pub backend_log: PathBuf,
    /// The control socket (host path).
    pub control_path: PathBuf,
    /// The device's data port (host path): the byte stream itself, like a
    /// chardev socket (see `vdevlab_qw::data`).
    pub data_path: PathBuf,
    /// VMM start to the guest's init (`VDEVLAB-BOOT`), once seen.
    pub boot_ms: Option<u64>,
    /// VMM start to the driver bound and `/dev/qw0` present.
    pub driver_ready_ms: Option<u64>,
    /// The accelerator.
    pub accel: Accel,
    /// The VMM.
    pub vmm: Vmm,
    /// The guest kernel it boots.
    pub kernel: Kernel,
    /// The host side of [`BootSpec::bench_port`]: the Unix socket QEMU
    /// listens on (connect once it exists; the guest sees end of file on
    /// the port until a client is connected).
    pub bench_socket: Option<PathBuf>,
    vmm_child: Child,
    backend: Child,
    /// Instances 1.. (see [`BootSpec::instances`]): process and control socket.
    extra: Vec<(Child, PathBuf)>,
    launch: Launch,
    vu_sock: PathBuf,
    /// The private folder holding the sockets; removed with the guest.
    sockets: SocketDir,
    console_input: Option<std::process::ChildStdin>,
    raw_console: Option<Receiver<Vec<u8>>>,
    lines: Receiver<ConsoleLine>,
    seen: Vec<ConsoleLine>,
    /// The start of a program's line that a kernel message cut in two
    /// ([`kernel_message_inside`]): the rest comes on the next line.
    cut: Option<String>,
    /// Lines before this index were matched already by `wait_for`.
    cursor: usize,
    /// When the line `wait_for` last matched arrived (since VMM start).
    matched_at: Option<Duration>,
    started: Instant,
    exited: bool,
    /// Kernel banners ("Linux version ...") seen: a second one is a reset.
    banners: usize,
    /// Why the guest is gone for good (a panic, a reset), once the console
    /// says so, and the index in `seen` of the line that says it: see
    /// [`guest_gone`].
    gone: Option<(usize, String)>,
    /// The backend was killed on purpose ([`Guest::kill_backend`]), so its
    /// exit is not a failure.
    backend_down: bool,
}

/// How often a wait on the console also checks the backends.
const BACKEND_POLL: Duration = Duration::from_millis(250);

/// What a console line says about the guest being gone for good, given the
/// kernel banners seen before it: a panic, or a reset (the kernel booting
/// a second time, or "reboot: Restarting system"). QEMU runs with
/// `-no-reboot` and exits on both; Cloud Hypervisor has no such option: it
/// resets the VM, boots the guest again and reconnects to the backend
/// (retrying for up to 60 s when it is gone), so the console is where the
/// harness learns of it.
pub fn guest_gone(text: &str, banners_before: usize) -> Option<String> {
    if text.contains("Kernel panic - not syncing") {
        return Some(format!("guest kernel panic: {}", text.trim()));
    }
    if text.contains("reboot: Restarting system") {
        return Some("the guest reset (reboot: Restarting system)".into());
    }
    if is_banner(text) && banners_before >= 1 {
        return Some(
            "the guest reset: its kernel booted a second time (a triple fault or a reboot; \
             Cloud Hypervisor restarts the VM where QEMU's -no-reboot stops it)"
                .into(),
        );
    }
    None
}

fn is_banner(text: &str) -> bool {
    text.contains("Linux version ") && text.contains(" (")
}

/// Whether a VMM's stderr shows that it failed, whatever its exit status:
/// Cloud Hypervisor logs `ERROR:` lines (a vCPU's "Unexpected exit reason",
/// a device error) or panics, and still exits 0. Returns the one-line
/// summary ([`vmm_failure_summary`]).
pub fn vmm_failed(stderr: &str) -> Option<String> {
    let fatal = stderr.lines().any(|l| {
        l.contains(" ERROR:")
            || l.contains("Unexpected exit reason")
            || l.contains("panicked at")
            || l.starts_with("Error booting VM")
    });
    fatal.then(|| vmm_failure_summary(stderr))
}

/// How a guest ended.
#[derive(Debug)]
pub struct Finished {
    /// The guest's exit marker (`VDEVLAB-EXIT <code>`), if it got that far.
    pub exit_code: Option<i32>,
    /// Kernel splats found on the console.
    pub splats: Vec<Splat>,
    /// The whole console.
    pub console: String,
}

/// The kernel image `spec` boots: `vmlinux` (PVH direct boot) or
/// `vmlinuz`; see [`BootSpec::pvh`].
pub fn boot_image(kernel: &Kernel, spec: &BootSpec) -> Result<PathBuf> {
    let vmlinux = kernel.image.with_file_name("vmlinux");
    let pvh = spec.pvh.unwrap_or_else(|| {
        spec.vmm == Vmm::Qemu
            && std::env::var("VDEVLAB_PVH").as_deref() != Ok("0")
            && vmlinux.is_file()
    });
    if !pvh {
        return Ok(kernel.image.clone());
    }
    if spec.vmm != Vmm::Qemu {
        bail!("PVH direct boot of vmlinux is set up for QEMU only");
    }
    if !vmlinux.is_file() {
        bail!(
            "no {} for a PVH boot: images/provision.sh extracts it from vmlinuz",
            vmlinux.display()
        );
    }
    Ok(vmlinux)
}

/// Longest `vdevlab.run=` value put on the kernel command line; longer run
/// lists go into the initramfs (x86's command line holds 2048 bytes).
const MAX_CMDLINE_RUNS: usize = 1200;

/// Copy `base` (an uncompressed initramfs) to `out` and append the newc
/// archives `overlays`, then, if there is a run list, one holding
/// `/vdevlab.run` = `runs`, which init.sh reads when the command line has
/// no `vdevlab.run=`.
fn append_archives(
    base: &Path,
    out: &Path,
    overlays: &[PathBuf],
    runs: Option<&str>,
) -> Result<()> {
    let mut extras = Vec::new();
    for o in overlays {
        extras.push(fs::read(o).with_context(|| format!("reading {}", o.display()))?);
    }
    if let Some(runs) = runs {
        let extra_path = out.with_extension("runs.cpio");
        crate::artifacts::write_initramfs(
            &extra_path,
            &[("vdevlab.run", 0o644, runs.as_bytes().to_vec())],
        )?;
        extras.push(fs::read(&extra_path)?);
        let _ = fs::remove_file(&extra_path);
    }
    let tmp = out.with_extension("tmp");
    fs::copy(base, &tmp).with_context(|| format!("copying {}", base.display()))?;
    let mut f = fs::OpenOptions::new().append(true).open(&tmp)?;
    for extra in extras {
        // Each archive must start 4-byte aligned; zeros between are skipped.
        let len = f.metadata()?.len();
        f.write_all(&vec![0u8; ((4 - len % 4) % 4) as usize])?;
        f.write_all(&extra)?;
    }
    drop(f);
    fs::rename(&tmp, out)?;
    Ok(())
}

fn unique_run_dir(scenario: &str) -> Result<PathBuf> {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let dir = runs_dir().join(format!("{scenario}-{stamp}-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The data port's socket of the backend on `vu_sock`: `vu.sock` ->
/// `data.sock`, `vu1.sock` -> `data1.sock` (the reference backend's
/// `--data`, see `vdevlab_qw::data`).
pub fn data_socket_of(vu_sock: &Path) -> PathBuf {
    let name = vu_sock
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    vu_sock.with_file_name(format!("data{}", name.trim_start_matches("vu")))
}

/// Start the backend on its sockets and wait until they exist: the
/// reference `vdevlab-qw` (with its data port,
/// [`data_socket_of`]), or the user's command (waiting for the control
/// socket only if it names one). Its output is appended to `log` (a
/// restart adds to the same file).
fn start_backend(
    launch: &Launch,
    vu_sock: &Path,
    ctl_sock: &Path,
    log_path: &Path,
) -> Result<Child> {
    let data_sock = data_socket_of(vu_sock);
    // A restart must not find the old sockets and think it is ready.
    let _ = fs::remove_file(vu_sock);
    let _ = fs::remove_file(ctl_sock);
    let _ = fs::remove_file(&data_sock);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)?;
    let (mut cmd, wait_ctl) = match launch {
        Launch::Reference(bin) => {
            let mut c = Command::new(bin);
            c.arg("--socket")
                .arg(vu_sock)
                .arg("--control")
                .arg(ctl_sock)
                .arg("--data")
                .arg(&data_sock)
                .arg("--once")
                // The guest may power off right after its last result:
                // its final counters stay readable until `stop` kills it.
                .arg("--linger-ms")
                .arg("10000");
            (c, true)
        }
        Launch::Command(bc, run_dir) => {
            let subst = |a: &String| {
                a.replace("{socket}", &vu_sock.to_string_lossy())
                    .replace("{control}", &ctl_sock.to_string_lossy())
                    .replace("{run}", &run_dir.to_string_lossy())
            };
            let argv: Vec<String> = bc.argv.iter().map(subst).collect();
            let Some((prog, args)) = argv.split_first() else {
                bail!("the backend command is empty");
            };
            let mut c = Command::new(prog);
            c.args(args);
            (c, bc.uses_control())
        }
    };
    let what = format!("{:?}", cmd.get_program());
    let mut backend = cmd
        .env(
            "RUST_LOG",
            std::env::var("VDEVLAB_DEVICE_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting the device backend {what}"))?;
    wait_for_path(vu_sock, &mut backend, log_path, Duration::from_secs(10))?;
    if wait_ctl {
        wait_for_path(ctl_sock, &mut backend, log_path, Duration::from_secs(10))?;
    }
    if matches!(launch, Launch::Reference(_)) {
        wait_for_path(&data_sock, &mut backend, log_path, Duration::from_secs(10))?;
    }
    Ok(backend)
}

fn wait_for_path(path: &Path, child: &mut Child, log: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the backend exited ({status}) before creating {}; its log {}:\n{}",
                path.display(),
                log.display(),
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the backend did not create {} within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The socket names of a boot's private folder, each linked from the run
/// folder: per instance its vhost-user, control and data sockets (`vu.sock`,
/// `ctl.sock`, `data.sock`, then `vu1.sock`, ...), and `bench.sock` for a
/// [`BootSpec::bench_port`].
fn socket_names(spec: &BootSpec) -> Vec<String> {
    let mut names = vec!["vu.sock".to_string(), "ctl.sock".into(), "data.sock".into()];
    for i in 1..spec.instances.max(1) {
        names.extend([
            format!("vu{i}.sock"),
            format!("ctl{i}.sock"),
            format!("data{i}.sock"),
        ]);
    }
    if spec.bench_port.is_some() {
        names.push("bench.sock".into());
    }
    names
}

/// Start one backend per instance: the first on `vu.sock`/`ctl.sock`
/// (its log `backend.log`), instance `i` on `vu<i>.sock`/`ctl<i>.sock`
/// (`backend<i>.log`). Returns the first and the others with their
/// control sockets.
fn start_backends(
    launch: &Launch,
    sockets: &SocketDir,
    run_dir: &Path,
    instances: usize,
) -> Result<(Child, Vec<(Child, PathBuf)>)> {
    let backend = start_backend(
        launch,
        &sockets.socket("vu.sock"),
        &sockets.socket("ctl.sock"),
        &run_dir.join("backend.log"),
    )?;
    let mut extra = Vec::new();
    for i in 1..instances.max(1) {
        let ctl = sockets.socket(&format!("ctl{i}.sock"));
        let child = start_backend(
            launch,
            &sockets.socket(&format!("vu{i}.sock")),
            &ctl,
            &run_dir.join(format!("backend{i}.log")),
        )?;
        extra.push((child, ctl));
    }
    Ok((backend, extra))
}

/// The kernel command line of a boot, and its run list when that is too
/// long for the command line (it then goes into the initramfs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct KernelCmdline {
    /// The whole command line.
    cmdline: String,
    /// The run list for `/vdevlab.run`, if not on the command line.
    runs_file: Option<String>,
}

/// The command line `spec` boots with: the lab VM's `base` line, `quiet`,
/// and the `vdevlab.*` words that init.sh reads (virtio id, run list,
/// virtio-serial port, driver and device node, shell, driver parameters).
/// Fails on arguments init.sh cannot split back.
fn kernel_cmdline(base: &str, spec: &BootSpec) -> Result<KernelCmdline> {
    let mut cmdline = format!("{base} quiet vdevlab.virtio_id={}", spec.virtio_id);
    let mut runs_file = None;
    if !spec.runs.is_empty() {
        // init.sh splits runs at ';' and arguments at ','.
        let bad = |a: &String| a.is_empty() || a.contains([',', ';', ' ', '"']);
        if spec.runs.iter().flatten().any(bad) {
            bail!(
                "guest program arguments must be non-empty, without ',', ';', ' ' or '\"': {:?}",
                spec.runs
            );
        }
        let runs: Vec<String> = spec.runs.iter().map(|r| r.join(",")).collect();
        let runs = runs.join(";");
        if runs.len() <= MAX_CMDLINE_RUNS {
            cmdline.push_str(&format!(" vdevlab.run={runs}"));
        } else {
            // Too long for the kernel command line (2048 bytes on x86):
            // init.sh reads the same list from /vdevlab.run instead.
            runs_file = Some(runs);
        }
    }
    if let Some(name) = &spec.bench_port {
        cmdline.push_str(&format!(" vdevlab.vport={name}"));
    }
    if let Some(d) = &spec.driver {
        let ok = |w: &str| !w.is_empty() && !w.contains([',', ';', ' ', '"', '=']);
        if !ok(&d.module) || d.dev.as_deref().is_some_and(|p| !ok(p)) {
            bail!("bad driver module name or device node: {d:?}");
        }
        cmdline.push_str(&format!(
            " vdevlab.driver={} vdevlab.dev={}",
            d.module,
            d.dev.as_deref().unwrap_or("none")
        ));
    }
    if spec.interactive {
        cmdline.push_str(" vdevlab.shell=1");
    }
    cmdline.push_str(&spec.placement.cmdline_words(spec.vcpus.unwrap_or(1)));
    if !spec.driver_params.is_empty() {
        // init.sh splits them at ',' and passes them to insmod.
        let bad =
            |p: &String| !p.contains('=') || p.starts_with('=') || p.contains([',', ';', ' ', '"']);
        if spec.driver_params.iter().any(bad) {
            bail!(
                "driver parameters must be name=value, without ',', ';', ' ' or '\"': {:?}",
                spec.driver_params
            );
        }
        cmdline.push_str(&format!(
            " vdevlab.qw_params={}",
            spec.driver_params.join(",")
        ));
    }
    if spec
        .kernel_args
        .iter()
        .any(|a| a.is_empty() || a.contains([' ', '"', '\n']))
    {
        bail!(
            "kernel arguments must be single words, without spaces or quotes: {:?}",
            spec.kernel_args
        );
    }
    for a in &spec.kernel_args {
        cmdline.push(' ');
        cmdline.push_str(a);
    }
    Ok(KernelCmdline { cmdline, runs_file })
}

/// The initramfs a boot uses (host path): the kernel's own `base`, or,
/// when there are `overlays` or a run list too long for the command line,
/// a copy in `run_dir` with those appended (the kernel unpacks them all).
/// The flag says which.
fn boot_initramfs(
    base: &Path,
    run_dir: &Path,
    overlays: &[PathBuf],
    runs_file: Option<&str>,
) -> Result<(PathBuf, bool)> {
    let combined = runs_file.is_some() || !overlays.is_empty();
    if !combined {
        return Ok((base.to_path_buf(), false));
    }
    let copy = run_dir.join("initramfs.cpio");
    append_archives(base, &copy, overlays, runs_file)?;
    Ok((copy, true))
}

/// Where the VMM finds the kernel, the initramfs and the sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VmmPaths {
    kernel: PathBuf,
    initramfs: PathBuf,
    vu_socket: PathBuf,
    bench_socket: PathBuf,
}

/// The paths the VMM is given: the host paths, or for a QEMU in the lab
/// root the folders bound into it ([`root_binds`]): the kernel's folder
/// at `/lab/kernel`, the artifacts at `/lab/artifacts` (the kernel's own
/// initramfs), the run folder at `/lab/run` (a `combined` initramfs) and
/// the sockets at `/lab/sock`.
fn vmm_paths(
    in_root: bool,
    image: &Path,
    initramfs: &Path,
    combined: bool,
    vu_sock: &Path,
    bench_sock: &Path,
) -> Result<VmmPaths> {
    let kernel_name = image.file_name().context("kernel path has no file name")?;
    let initramfs_name = initramfs
        .file_name()
        .context("initramfs has no file name")?;
    let initramfs_dir = if combined {
        "/lab/run"
    } else {
        "/lab/artifacts"
    };
    Ok(if in_root {
        VmmPaths {
            kernel: Path::new("/lab/kernel").join(kernel_name),
            initramfs: Path::new(initramfs_dir).join(initramfs_name),
            vu_socket: PathBuf::from("/lab/sock/vu.sock"),
            bench_socket: PathBuf::from("/lab/sock/bench.sock"),
        }
    } else {
        VmmPaths {
            kernel: image.to_path_buf(),
            initramfs: initramfs.to_path_buf(),
            vu_socket: vu_sock.to_path_buf(),
            bench_socket: bench_sock.to_path_buf(),
        }
    })
}

/// The VM a boot describes: the lab VM `base` with the spec's kernel,
/// initramfs, command line and accelerator, one vhost-user device per
/// instance (`vu0` on `vu.sock`, `vu<i>` on `vu<i>.sock` beside it; a
/// user's backend brings its queue sizes and config space size), and the
/// benchmark's virtio-serial port.
fn vm_config(
    base: &VmConfig,
    spec: &BootSpec,
    cmdline: String,
    paths: &VmmPaths,
) -> Result<VmConfig> {
    let mut cfg = base.clone();
    cfg.kernel = paths.kernel.clone();
    cfg.initramfs = Some(paths.initramfs.clone());
    cfg.cmdline = cmdline;
    cfg.accel = spec.accel;
    if let Some(n) = spec.vcpus {
        cfg.vcpus = n;
    }
    let dev = cfg
        .vhost_user
        .first_mut()
        .context("the lab VM description has no vhost-user device")?;
    dev.socket = paths.vu_socket.clone();
    dev.virtio_id = spec.virtio_id;
    dev.reconnect_ms = spec.reconnect_ms;
    if let Some(bc) = &spec.backend {
        dev.queue_sizes = bc.queue_sizes.clone();
        dev.config_size = bc.config_size;
    }
    let first = dev.clone();
    for i in 1..spec.instances.max(1) {
        let mut d = first.clone();
        d.id = format!("vu{i}");
        d.socket = first.socket.with_file_name(format!("vu{i}.sock"));
        cfg.vhost_user.push(d);
    }
    if let Some(name) = &spec.bench_port {
        cfg.virtio_serial.push(VirtioSerialPort::new(
            "bench0",
            paths.bench_socket.clone(),
            name.clone(),
        ));
    }
    Ok(cfg)
}

/// The `host:/lab/...` folders `images/in-root.sh` binds into the lab
/// root for QEMU: the kernel's folder, the artifacts, the run folder and
/// the sockets.
fn root_binds(kernel_dir: &Path, art_dir: &Path, run_dir: &Path, sock_dir: &Path) -> [String; 4] {
    [
        format!("{}:/lab/kernel", kernel_dir.display()),
        format!("{}:/lab/artifacts", art_dir.display()),
        format!("{}:/lab/run", run_dir.display()),
        format!("{}:/lab/sock", sock_dir.display()),
    ]
}

/// QEMU with `args`: the host's, or the lab root's through
/// `images/in-root.sh <root> <binds...> -- <qemu>`.
fn qemu_command(qemu: &QemuRuntime, binds: &[String], args: Vec<String>) -> Command {
    let mut c = match qemu {
        QemuRuntime::Host(qemu) => Command::new(qemu),
        QemuRuntime::InRoot { root, qemu } => {
            let mut c = Command::new(in_root_script());
            c.arg(root).args(binds).arg("--").arg(qemu);
            c
        }
    };
    c.args(args);
    c
}

/// The VMM process for `cfg` (not started yet): Cloud Hypervisor, or
/// QEMU (see [`qemu_command`]) with the folders `binds`.
fn vmm_command(vmm: Vmm, qemu: &QemuRuntime, cfg: &VmConfig, binds: &[String]) -> Result<Command> {
    Ok(match vmm {
        Vmm::CloudHypervisor => {
            let (bin, _) = crate::env::cloud_hypervisor().map_err(anyhow::Error::msg)?;
            let mut c = Command::new(bin);
            c.args(
                cfg.cloud_hypervisor_args()
                    .context("rendering the Cloud Hypervisor command line")?,
            );
            c
        }
        Vmm::Qemu => {
            let args = cfg.qemu_args().context("rendering the QEMU command line")?;
            qemu_command(qemu, binds, args)
        }
    })
}

/// Cuts the console's byte stream into lines, as chunks arrive.
#[derive(Debug, Default)]
struct LineSplitter {
    line: Vec<u8>,
}

impl LineSplitter {
    /// The lines that `chunk` completes, each with its `\n`.
    fn push(&mut self, chunk: &[u8]) -> Vec<Vec<u8>> {
        let mut done = Vec::new();
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            self.line.extend_from_slice(piece);
            if self.line.ends_with(b"\n") {
                done.push(std::mem::take(&mut self.line));
            }
        }
        done
    }

    /// What is left after the last end of line, if anything.
    fn finish(self) -> Option<Vec<u8>> {
        (!self.line.is_empty()).then_some(self.line)
    }
}

/// A console line's text: lossy UTF-8, without its end-of-line characters.
fn line_text(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .trim_end_matches(['\r', '\n'])
        .to_string()
}

/// The console reader's receivers: the lines, and for an interactive
/// boot the raw chunks.
type ConsoleReceivers = (Receiver<ConsoleLine>, Option<Receiver<Vec<u8>>>);

/// Follow the VMM's stdout on a thread until it closes: save every chunk
/// to `console`, send it raw (`interactive`), and send each line stamped
/// with the time since `started`.
fn spawn_console_reader(
    stdout: ChildStdout,
    mut console: File,
    started: Instant,
    interactive: bool,
) -> Result<ConsoleReceivers> {
    let (tx, lines) = mpsc::channel();
    let (raw_tx, raw_console) = if interactive {
        let (t, r) = mpsc::channel();
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    std::thread::Builder::new()
        .name("vdevlab-console".into())
        .spawn(move || {
            // Chunks as they come (an interactive prompt has no end of
            // line yet), cut into lines for the markers.
            let mut reader = stdout;
            let mut buf = [0u8; 4096];
            let mut splitter = LineSplitter::default();
            let send = |raw: &[u8]| {
                // Keep saving the console even if nobody listens.
                let _ = tx.send(ConsoleLine {
                    at: started.elapsed(),
                    text: line_text(raw),
                });
            };
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                let _ = console.write_all(chunk);
                if let Some(raw) = &raw_tx {
                    let _ = raw.send(chunk.to_vec());
                }
                for line in splitter.push(chunk) {
                    send(&line);
                }
            }
            if let Some(rest) = splitter.finish() {
                send(&rest);
            }
            let _ = console.flush();
        })?;
    Ok((lines, raw_console))
}

impl Guest {
    /// Start the backend and boot a guest under the spec's VMM: the run
    /// folder and its sockets, the backends, the kernel command line and
    /// initramfs, the VM description and the VMM's command, then the VMM
    /// itself and the console reader.
    pub fn boot(env: &LabEnv, art: &Artifacts, spec: &BootSpec) -> Result<Guest> {
        let kernel = env.kernel(&spec.kernel)?.clone();
        let kernel_art = art.for_kernel(&kernel.name)?;
        let run_dir = unique_run_dir(&format!("{}-{}", spec.scenario, kernel.name))?;
        // Sockets live in a short private folder (the run folder may be too
        // deep for a socket path); the run folder links to each.
        let sockets = SocketDir::create()?;
        for n in &socket_names(spec) {
            sockets.link_into(&run_dir, n)?;
        }
        let vu_sock = sockets.socket("vu.sock");
        let ctl_sock = sockets.socket("ctl.sock");
        let bench_sock = sockets.socket("bench.sock");
        let backend_log = run_dir.join("backend.log");
        let console_path = run_dir.join("console.log");

        let launch = match &spec.backend {
            None => Launch::Reference(art.device_bin.clone()),
            Some(bc) => Launch::Command(bc.clone(), run_dir.clone()),
        };
        let (backend, extra) = start_backends(&launch, &sockets, &run_dir, spec.instances)?;

        let base =
            VmConfig::from_toml_str(LAB_CONFIG_TOML).context("the shipped lab VM description")?;
        let line = kernel_cmdline(&base.cmdline, spec)?;
        let image = boot_image(&kernel, spec)?;
        let kernel_dir = image.parent().context("kernel path has no folder")?;
        let (initramfs, combined) = boot_initramfs(
            &kernel_art.initramfs,
            &run_dir,
            &spec.overlays,
            line.runs_file.as_deref(),
        )?;
        let in_root = spec.vmm == Vmm::Qemu && matches!(env.qemu, QemuRuntime::InRoot { .. });
        let paths = vmm_paths(in_root, &image, &initramfs, combined, &vu_sock, &bench_sock)?;
        let cfg = vm_config(&base, spec, line.cmdline, &paths)?;
        let binds = root_binds(kernel_dir, &art.dir, &run_dir, sockets.path());
        let mut cmd = vmm_command(spec.vmm, &env.qemu, &cfg, &binds)?;
        fs::write(run_dir.join("vmm.cmdline"), format!("{cmd:?}\n"))?;

        let started = Instant::now();
        let mut vmm_child = cmd
            .stdin(if spec.interactive {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(File::create(run_dir.join("vmm.stderr"))?)
            .spawn()
            .with_context(|| format!("starting {}", spec.vmm.name()))?;
        let stdout = vmm_child.stdout.take().context("QEMU stdout")?;
        let console_input = vmm_child.stdin.take();
        let (lines, raw_console) = spawn_console_reader(
            stdout,
            File::create(&console_path)?,
            started,
            spec.interactive,
        )?;

        Ok(Guest {
            scenario: spec.scenario.clone(),
            run_dir,
            console_path,
            backend_log,
            control_path: ctl_sock,
            data_path: data_socket_of(&vu_sock),
            boot_ms: None,
            driver_ready_ms: None,
            accel: spec.accel,
            vmm: spec.vmm,
            kernel,
            bench_socket: spec.bench_port.as_ref().map(|_| bench_sock),
            vmm_child,
            backend,
            extra,
            launch,
            vu_sock,
            sockets,
            console_input,
            raw_console,
            lines,
            seen: Vec::new(),
            cut: None,
            cursor: 0,
            matched_at: None,
            started,
            exited: false,
            banners: 0,
            gone: None,
            backend_down: false,
        })
    }

    fn note(&mut self, line: &ConsoleLine) {
        // A kernel message printed by another CPU while a program's line
        // went out lands inside that line; the line's rest follows the
        // message. Put the line back together, and the message apart.
        let mut text = match self.cut.take() {
            Some(start) => start + &line.text,
            None => line.text.clone(),
        };
        if let Some(i) = kernel_message_inside(&text) {
            self.cut = Some(text[..i].to_string());
            text = text[i..].to_string();
        }
        let line = &ConsoleLine { at: line.at, text };
        if line.text.contains(protocol::BOOT) && self.boot_ms.is_none() {
            self.boot_ms = Some(line.at.as_millis() as u64);
        }
        if line.text.contains(protocol::DRIVER_READY) && self.driver_ready_ms.is_none() {
            self.driver_ready_ms = Some(line.at.as_millis() as u64);
        }
        if self.gone.is_none() {
            self.gone = guest_gone(&line.text, self.banners).map(|why| (self.seen.len(), why));
        }
        if is_banner(&line.text) {
            self.banners += 1;
        }
        self.seen.push(line.clone());
    }

    /// Wait for the next console line (after the last one matched)
    /// containing `marker`; return the text from the marker on. Fails early
    /// when init reports a failure (`VDEVLAB-FAIL`) or the kernel panics.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            while self.cursor < self.seen.len() {
                let text = &self.seen[self.cursor].text;
                let at = self.seen[self.cursor].at;
                self.cursor += 1;
                if let Some(pos) = text.find(marker) {
                    self.matched_at = Some(at);
                    return Ok(text[pos..].to_string());
                }
                if let Some(why) = text
                    .find(protocol::FAIL)
                    .and_then(|pos| protocol::fail_reason(&text[pos..]))
                {
                    bail!(
                        "guest init failed: {why} (console: {})",
                        self.console_path.display()
                    );
                }
                // Lines after a panic or a reset belong to no run of ours
                // (Cloud Hypervisor boots the guest again: its markers
                // would come a second time).
                if let Some((i, why)) = &self.gone {
                    if *i < self.cursor {
                        bail!("{why} (console: {})", self.console_path.display());
                    }
                }
            }
            if let Some((i, why)) = &self.gone {
                if *i < self.cursor {
                    bail!("{why} (console: {})", self.console_path.display());
                }
            }
            if let Some(why) = self.backend_gone() {
                bail!(
                    "{why}, while waiting for '{marker}' (console: {})",
                    self.console_path.display()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no '{marker}' on the guest console within {timeout:?} (console: {})",
                    self.console_path.display()
                );
            }
            match self.lines.recv_timeout(left.min(BACKEND_POLL)) {
                Ok(line) => self.note(&line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.exited = true;
                    bail!(
                        "the VMM exited before '{marker}' appeared (console: {}; VMM said: {})",
                        self.console_path.display(),
                        vmm_failure_summary(&self.vmm_stderr())
                    )
                }
            }
        }
    }

    /// Wait for `scenario`'s [`protocol::READY`] line: the guest program
    /// has the device open and is about to wait on it.
    pub fn wait_ready(&mut self, scenario: &str, timeout: Duration) -> Result<()> {
        self.wait_for(&protocol::ready_line(scenario), timeout)
            .map(|_| ())
    }

    /// Wait for `scenario`'s [`protocol::RESULT`] line and return its JSON
    /// object (the first JSON value on the line: a kernel message may
    /// follow it on the same console line).
    pub fn wait_result(&mut self, scenario: &str, timeout: Duration) -> Result<serde_json::Value> {
        let line = self.wait_for(&protocol::result_prefix(scenario), timeout)?;
        let json = protocol::result_json(&line).unwrap_or_default();
        first_json(json).with_context(|| format!("bad result line: {line}"))
    }

    fn vmm_stderr(&self) -> String {
        fs::read_to_string(self.run_dir.join("vmm.stderr")).unwrap_or_default()
    }

    /// Why a device backend is gone while the VMM still runs (it crashed,
    /// or exited on an error), with the last line of its log; `None` while
    /// they all run, or when the VMM is gone too (then the VMM's exit is
    /// the news), or after [`Guest::kill_backend`].
    fn backend_gone(&mut self) -> Option<String> {
        if self.backend_down || !matches!(self.vmm_child.try_wait(), Ok(None)) {
            return None;
        }
        let mut procs = vec![(&mut self.backend, self.backend_log.clone())];
        for (i, (child, _)) in self.extra.iter_mut().enumerate() {
            let log = self
                .backend_log
                .with_file_name(format!("backend{}.log", i + 1));
            procs.push((child, log));
        }
        for (i, (child, log)) in procs.into_iter().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                let last = text
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("(empty log)")
                    .trim()
                    .to_string();
                return Some(format!(
                    "the device backend of instance {i} exited ({status}) while the VMM runs; \
                     its log ({}) ends: {last}",
                    log.display()
                ));
            }
        }
        None
    }

    /// The VMM's serial console input (interactive boots only; see
    /// [`BootSpec::interactive`]). Taken once.
    pub fn console_input(&mut self) -> Option<std::process::ChildStdin> {
        self.console_input.take()
    }

    /// The console's bytes as they arrive (interactive boots only), besides
    /// the lines [`Guest::wait_for`] sees. Taken once.
    pub fn raw_console(&mut self) -> Option<Receiver<Vec<u8>>> {
        self.raw_console.take()
    }

    /// A client of this guest's device control plane.
    pub fn control(&self) -> Result<ControlClient> {
        Ok(ControlClient::connect(&self.control_path)?)
    }

    /// A client of device instance `i`'s control plane (`/dev/qw<i>`'s
    /// device, in probe order).
    pub fn control_of(&self, i: usize) -> Result<ControlClient> {
        if i == 0 {
            return self.control();
        }
        let (_, ctl) = self.extra.get(i - 1).with_context(|| {
            format!(
                "no device instance {i} (the boot has {})",
                self.extra.len() + 1
            )
        })?;
        Ok(ControlClient::connect(ctl)?)
    }

    /// When the line that [`Guest::wait_for`] last returned reached the
    /// host (time since the VMM started; the console reader stamps every
    /// line as it arrives, however late the caller looks at it).
    pub fn matched_at(&self) -> Option<Duration> {
        self.matched_at
    }

    /// The VMM's process id (QEMU's own, also when it runs in the lab
    /// root: the helper script execs it).
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_child.id()
    }

    /// The (first) backend's process id.
    pub fn backend_pid(&self) -> u32 {
        self.backend.id()
    }

    /// Time since the VMM started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Wait for the guest to power off (or kill it after `timeout`), stop
    /// the backend, and scan the console for kernel splats.
    pub fn finish(mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        loop {
            if self.gone.is_some() {
                // QEMU stops by itself (-no-reboot); Cloud Hypervisor would
                // boot the guest again. Keep what follows a panic line (the
                // end of its trace), then stop the VM.
                let grace = Instant::now() + Duration::from_millis(500);
                while let Ok(line) = self
                    .lines
                    .recv_timeout(grace.saturating_duration_since(Instant::now()))
                {
                    self.note(&line);
                }
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.note(&line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    timed_out = true;
                    break;
                }
            }
        }
        let gone = self.gone.clone();
        let finished = self.collect();
        if let Some((_, why)) = gone.filter(|(_, why)| !why.contains("kernel panic")) {
            // A panic is a splat the caller reports; a reset is not.
            bail!(
                "{why} instead of powering off (console: {})",
                self.console_path.display()
            );
        }
        if let Some(why) = vmm_failed(&self.vmm_stderr()) {
            // Cloud Hypervisor exits 0 even then: its log is the evidence.
            bail!(
                "the VMM failed: {why} (console: {}; its stderr: {})",
                self.console_path.display(),
                self.run_dir.join("vmm.stderr").display()
            );
        }
        if timed_out {
            let splats: Vec<String> = finished
                .splats
                .iter()
                .map(|s| format!("kernel {}: {}", s.kind, s.line.trim()))
                .collect();
            bail!(
                "the guest did not power off within {timeout:?} (console: {}){}",
                self.console_path.display(),
                if splats.is_empty() {
                    String::new()
                } else {
                    format!("; {}", splats.join("; "))
                }
            );
        }
        Ok(finished)
    }

    /// Stop the VM now (it is not expected to power off by itself) and scan
    /// what it printed.
    pub fn abort(mut self) -> Finished {
        // Take what is already buffered, without waiting.
        while let Ok(line) = self.lines.try_recv() {
            self.note(&line);
        }
        self.collect()
    }

    fn collect(&mut self) -> Finished {
        self.stop();
        while let Ok(line) = self.lines.try_recv() {
            self.note(&line);
        }
        let console = self
            .seen
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let exit_code = self
            .seen
            .iter()
            .find_map(|l| protocol::exit_status(&l.text));
        Finished {
            exit_code,
            splats: find_splats(&console),
            console,
        }
    }

    /// Kill the backend (SIGKILL: a crash, not a clean exit) and start a new
    /// one on the same sockets, as a user restarting a crashed device model
    /// would. With [`BootSpec::reconnect_ms`] QEMU reconnects to it and
    /// replays the memory table and ring state; the new process starts with
    /// an empty FIFO and capture and fresh counters.
    pub fn restart_backend(&mut self, down_for: Duration) -> Result<()> {
        self.kill_backend();
        std::thread::sleep(down_for);
        self.backend = start_backend(
            &self.launch,
            &self.vu_sock,
            &self.control_path,
            &self.backend_log,
        )?;
        self.backend_down = false;
        Ok(())
    }

    /// The vhost-user socket of the first instance (host path).
    pub fn vu_socket(&self) -> &Path {
        &self.vu_sock
    }

    /// The folder holding this run's sockets (short, private; the run
    /// folder links to each socket in it).
    pub fn socket_dir(&self) -> &Path {
        self.sockets.path()
    }

    /// Kill the backend with SIGKILL, as a crash would (waits on the guest
    /// then no longer fail because it is gone).
    pub fn kill_backend(&mut self) {
        self.backend_down = true;
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }

    /// Whether the VMM process is still running.
    pub fn vmm_running(&mut self) -> bool {
        matches!(self.vmm_child.try_wait(), Ok(None))
    }

    fn stop(&mut self) {
        if !self.exited {
            let _ = self.vmm_child.kill();
        }
        let _ = self.vmm_child.wait();
        self.exited = true;
        for (mut child, _) in self.extra.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The backend sees the VMM go (--once); give it a moment to say so
        // in its log (the reference backend then lingers, see
        // `start_backend`), then make sure.
        for _ in 0..50 {
            if matches!(self.backend.try_wait(), Ok(Some(_)))
                || fs::read_to_string(&self.backend_log).is_ok_and(|l| {
                    l.rsplit("waiting for the VMM")
                        .next()
                        .is_some_and(|t| t.contains("VMM disconnected"))
                })
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.backend.kill();
        let _ = self.backend.wait();
        self.remove_sockets();
    }

    /// The sockets go with the processes that served them: the links in
    /// the run folder now, the private folder when the guest is dropped.
    fn remove_sockets(&self) {
        if let Ok(entries) = fs::read_dir(self.sockets.path()) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        if let Ok(entries) = fs::read_dir(&self.run_dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".sock") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first JSON value of `text` (what follows it is ignored).
pub(crate) fn first_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<T>();
    Ok(values.next().context("no JSON value")??)
}

/// What a VMM's stderr says about why it stopped, on one line: its error
/// lines (Cloud Hypervisor's "Unexpected exit reason on vcpu run:
/// InternalError", "Error booting VM", a Rust panic; QEMU's
/// "qemu-system-x86_64: ..."), else its last line. Cloud Hypervisor exits
/// with status 0 even after a vCPU failure, so the text is the evidence.
pub fn vmm_failure_summary(stderr: &str) -> String {
    const MAX: usize = 600;
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("error")
                || lower.contains("panicked")
                || lower.contains("unexpected exit reason")
                || lower.starts_with("qemu-system")
        })
        .collect();
    let text = if errors.is_empty() {
        lines
            .last()
            .copied()
            .unwrap_or("(nothing on stderr)")
            .to_string()
    } else {
        errors.join(" | ")
    };
    if text.len() > MAX {
        let mut end = MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &text[..end])
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest's init is shell: it must print the protocol's words.
    #[test]
    fn init_speaks_the_protocol() {
        let init =
            std::fs::read_to_string(crate::env::workspace_root().join("images/init.sh")).unwrap();
        for marker in [
            protocol::BOOT,
            protocol::DRIVER_READY,
            protocol::VPORT,
            protocol::FAIL,
            protocol::EXIT,
            protocol::DMESG_BEGIN,
            protocol::DMESG_END,
            protocol::SHELL,
            protocol::SHELL_END,
        ] {
            assert!(
                init.contains(&format!("echo \"{marker}")),
                "images/init.sh does not print {marker}"
            );
        }
    }

    #[test]
    fn the_console_tells_a_panic_and_a_reset() {
        let banner = "[    0.000000] Linux version 6.12.117 (root@lab) (gcc-14 (Debian 14.2.0-19) 14.2.0) #1 SMP";
        assert_eq!(guest_gone(banner, 0), None, "the first boot");
        let again = guest_gone(banner, 1).expect("a second boot is a reset");
        assert!(again.contains("booted a second time"), "{again}");
        assert_eq!(
            guest_gone("[   12.5] reboot: Restarting system", 1).as_deref(),
            Some("the guest reset (reboot: Restarting system)")
        );
        let panic = guest_gone(
            "[    3.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000000",
            1,
        )
        .unwrap();
        assert!(
            panic.starts_with("guest kernel panic: [    3.1] Kernel panic"),
            "{panic}"
        );
        for quiet in [
            "[    0.9] reboot: Power down",
            "VDEVLAB-BOOT",
            "the program printed Linux version 7",
        ] {
            assert_eq!(guest_gone(quiet, 1), None, "{quiet}");
        }
    }

    #[test]
    fn a_vmm_that_exits_0_after_failing_is_caught() {
        // Cloud Hypervisor v53 on PVM: a vCPU error, then exit status 0.
        let ch = "cloud-hypervisor: 5.1s: <vcpu0> ERROR:vmm/src/cpu.rs:1180 -- \
                  Unexpected exit reason on vcpu run: InternalError\n";
        assert!(vmm_failed(ch).unwrap().contains("InternalError"));
        let panic = "thread 'vmm' panicked at vmm/src/device_manager.rs:1:1:\nbad\n";
        assert!(vmm_failed(panic).is_some());
        // A clean run: QEMU says nothing, or warns.
        assert_eq!(vmm_failed(""), None);
        assert_eq!(
            vmm_failed("qemu-system-x86_64: warning: host doesn't support requested feature\n"),
            None
        );
    }

    fn lab_vm() -> VmConfig {
        VmConfig::from_toml_str(LAB_CONFIG_TOML).unwrap()
    }

    fn host_paths() -> VmmPaths {
        vmm_paths(
            false,
            Path::new("/k/trixie/vmlinuz"),
            Path::new("/art/trixie/initramfs.cpio"),
            false,
            Path::new("/s/vu.sock"),
            Path::new("/s/bench.sock"),
        )
        .unwrap()
    }

    #[test]
    fn the_kernel_command_line_of_a_boot() {
        let base = lab_vm().cmdline;
        let spec = BootSpec::new("blocking-rx", vec![]);
        let line = kernel_cmdline(&base, &spec).unwrap();
        assert_eq!(
            line.cmdline,
            format!(
                "console=ttyS0 panic=-1 no_timer_check printk.time=1 quiet vdevlab.virtio_id={}",
                vdevlab_qw::spec::DEFAULT_VIRTIO_ID
            )
        );
        assert_eq!(line.runs_file, None);

        let mut spec = BootSpec::new(
            "x",
            vec![
                vec!["blocking-rx".into(), "--bytes".into(), "100".into()],
                vec!["poll-tx".into()],
            ],
        );
        spec.virtio_id = 42;
        spec.bench_port = Some("bench".into());
        spec.driver = Some(GuestDriver {
            module: "mydrv".into(),
            dev: None,
        });
        spec.interactive = true;
        spec.driver_params = vec!["config_status=0".into(), "dyndbg=+p".into()];
        assert_eq!(
            kernel_cmdline("console=ttyS0", &spec).unwrap(),
            KernelCmdline {
                cmdline: "console=ttyS0 quiet vdevlab.virtio_id=42 \
                          vdevlab.run=blocking-rx,--bytes,100;poll-tx vdevlab.vport=bench \
                          vdevlab.driver=mydrv vdevlab.dev=none vdevlab.shell=1 \
                          vdevlab.qw_params=config_status=0,dyndbg=+p"
                    .into(),
                runs_file: None,
            }
        );
        spec.driver = Some(GuestDriver {
            module: "mydrv".into(),
            dev: Some("/dev/my0".into()),
        });
        let line = kernel_cmdline("c", &spec).unwrap().cmdline;
        assert!(
            line.contains(" vdevlab.driver=mydrv vdevlab.dev=/dev/my0 "),
            "{line}"
        );
    }

    #[test]
    fn a_kernel_message_inside_a_line_is_found() {
        let cut = "VDEVLAB-RESULT {[   10.559919] vdevlab_qw: bound to virtio device id 21";
        assert_eq!(kernel_message_inside(cut), Some(16));
        for whole in [
            "[   10.559919] vdevlab_qw: bound",
            "  [   10.559919] indented",
            "VDEVLAB-RESULT {\"a\":\"[1.5] no\"}",
            "x[ 1.12345] five digits",
            "x[ 1.123456]no space",
            "plain line",
        ] {
            assert_eq!(kernel_message_inside(whole), None, "{whole}");
        }
    }

    #[test]
    fn an_smp_boot_tells_init_where_interrupts_and_programs_go() {
        let mut spec = BootSpec::new("x", vec![]);
        assert!(!kernel_cmdline("c", &spec)
            .unwrap()
            .cmdline
            .contains("_cpu="));
        spec.vcpus = Some(2);
        let line = kernel_cmdline("c", &spec).unwrap().cmdline;
        assert!(
            line.ends_with(" vdevlab.irq_cpu=1 vdevlab.pin_cpu=0"),
            "{line}"
        );
        spec.placement = Placement::Free;
        let line = kernel_cmdline("c", &spec).unwrap().cmdline;
        assert!(!line.contains("_cpu="), "{line}");
    }

    #[test]
    fn a_long_run_list_goes_to_the_initramfs_and_bad_words_are_refused() {
        let run = vec!["blocking-rx".to_string(), "--bytes".into(), "4096".into()];
        // 24 bytes a run and a ';' between: 48 runs fit in MAX_CMDLINE_RUNS
        // (1199 bytes), 49 do not.
        let fits = BootSpec::new("x", vec![run.clone(); 48]);
        let line = kernel_cmdline("c", &fits).unwrap();
        assert!(line
            .cmdline
            .contains(" vdevlab.run=blocking-rx,--bytes,4096;"));
        assert_eq!(line.runs_file, None);
        let long = BootSpec::new("x", vec![run.clone(); 49]);
        let line = kernel_cmdline("c", &long).unwrap();
        assert!(!line.cmdline.contains("vdevlab.run="), "{}", line.cmdline);
        let runs = line.runs_file.unwrap();
        assert_eq!(runs.len(), 49 * 25 - 1);
        assert!(runs.starts_with("blocking-rx,--bytes,4096;blocking-rx,"));

        for bad in ["", "a,b", "a;b", "a b", "a\"b"] {
            let spec = BootSpec::new("x", vec![vec!["poll-rx".into(), bad.into()]]);
            assert!(kernel_cmdline("c", &spec).is_err(), "{bad:?}");
        }
        for bad in ["noequals", "=v", "a=b,c=d", "a=b c"] {
            let mut spec = BootSpec::new("x", vec![]);
            spec.driver_params = vec![bad.into()];
            assert!(kernel_cmdline("c", &spec).is_err(), "{bad:?}");
        }
        for (module, dev) in [("", None), ("a=b", None), ("ok", Some("/dev/a b"))] {
            let mut spec = BootSpec::new("x", vec![]);
            spec.driver = Some(GuestDriver {
                module: module.into(),
                dev: dev.map(String::from),
            });
            assert!(kernel_cmdline("c", &spec).is_err(), "{module:?} {dev:?}");
        }
    }

    #[test]
    fn sockets_per_instance_and_the_bench_port() {
        let mut spec = BootSpec::new("x", vec![]);
        assert_eq!(socket_names(&spec), ["vu.sock", "ctl.sock", "data.sock"]);
        spec.instances = 0;
        assert_eq!(socket_names(&spec).len(), 3);
        spec.instances = 3;
        spec.bench_port = Some("b".into());
        assert_eq!(
            socket_names(&spec),
            [
                "vu.sock",
                "ctl.sock",
                "data.sock",
                "vu1.sock",
                "ctl1.sock",
                "data1.sock",
                "vu2.sock",
                "ctl2.sock",
                "data2.sock",
                "bench.sock"
            ]
        );
    }

    #[test]
    fn the_vmm_sees_host_paths_or_the_lab_roots() {
        assert_eq!(
            host_paths(),
            VmmPaths {
                kernel: "/k/trixie/vmlinuz".into(),
                initramfs: "/art/trixie/initramfs.cpio".into(),
                vu_socket: "/s/vu.sock".into(),
                bench_socket: "/s/bench.sock".into(),
            }
        );
        let image = Path::new("/k/trixie/vmlinux");
        let vu = Path::new("/s/vu.sock");
        let bench = Path::new("/s/bench.sock");
        let own = Path::new("/art/trixie/initramfs.cpio");
        let root = vmm_paths(true, image, own, false, vu, bench).unwrap();
        assert_eq!(
            root,
            VmmPaths {
                kernel: "/lab/kernel/vmlinux".into(),
                initramfs: "/lab/artifacts/initramfs.cpio".into(),
                vu_socket: "/lab/sock/vu.sock".into(),
                bench_socket: "/lab/sock/bench.sock".into(),
            }
        );
        let copy = Path::new("/runs/x-1/initramfs.cpio");
        let root = vmm_paths(true, image, copy, true, vu, bench).unwrap();
        assert_eq!(root.initramfs, Path::new("/lab/run/initramfs.cpio"));
        assert!(vmm_paths(false, Path::new("/"), own, false, vu, bench).is_err());
    }

    #[test]
    fn the_qemu_argv_of_a_boot() {
        let mut spec = BootSpec::new("x", vec![]);
        spec.reconnect_ms = Some(500);
        let cfg = vm_config(
            &lab_vm(),
            &spec,
            "console=ttyS0 quiet".into(),
            &host_paths(),
        )
        .unwrap();
        let args = cfg.qemu_args().unwrap();
        let pair = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].as_str()
        };
        assert_eq!(&args[..2], ["-accel", "tcg"]);
        assert_eq!(pair("-kernel"), "/k/trixie/vmlinuz");
        assert_eq!(pair("-initrd"), "/art/trixie/initramfs.cpio");
        assert_eq!(pair("-append"), "console=ttyS0 quiet");
        assert_eq!(
            pair("-chardev"),
            "socket,id=vu0,path=/s/vu.sock,reconnect-ms=500"
        );
        let device = pair("-device");
        assert!(
            device.starts_with("vhost-user-test-device-pci,"),
            "{device}"
        );
        assert!(
            device.contains(&format!(
                "virtio-id={}",
                vdevlab_qw::spec::DEFAULT_VIRTIO_ID
            )),
            "{device}"
        );
        assert!(device.contains("config_size=48"), "{device}");

        // Three instances, a user's backend and the bench port.
        spec.instances = 3;
        spec.reconnect_ms = None;
        spec.bench_port = Some("bench".into());
        spec.backend = Some(BackendCommand {
            argv: vec!["my-backend".into(), "{socket}".into()],
            queue_sizes: vec![64],
            config_size: 8,
        });
        let cfg = vm_config(&lab_vm(), &spec, "c".into(), &host_paths()).unwrap();
        let ids: Vec<(&str, &Path, &[u16], u32)> = cfg
            .vhost_user
            .iter()
            .map(|d| {
                (
                    d.id.as_str(),
                    d.socket.as_path(),
                    &d.queue_sizes[..],
                    d.config_size,
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("vu0", Path::new("/s/vu.sock"), &[64][..], 8),
                ("vu1", Path::new("/s/vu1.sock"), &[64][..], 8),
                ("vu2", Path::new("/s/vu2.sock"), &[64][..], 8),
            ]
        );
        assert_eq!(cfg.virtio_serial.len(), 1);
        assert_eq!(cfg.virtio_serial[0].id, "bench0");
        assert_eq!(cfg.virtio_serial[0].socket, Path::new("/s/bench.sock"));
        assert_eq!(cfg.virtio_serial[0].name, "bench");
        let args = cfg.qemu_args().unwrap();
        let chardevs: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(f, _)| *f == "-chardev")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(chardevs.len(), 4, "{args:?}");
        assert_eq!(chardevs[2], "socket,id=vu2,path=/s/vu2.sock");
    }

    #[test]
    fn the_cloud_hypervisor_argv_of_a_boot() {
        let mut spec = BootSpec::new("x", vec![]);
        spec.vmm = Vmm::CloudHypervisor;
        spec.accel = Accel::Kvm;
        let cfg = vm_config(
            &lab_vm(),
            &spec,
            "console=ttyS0 quiet".into(),
            &host_paths(),
        )
        .unwrap();
        let args = cfg.cloud_hypervisor_args().unwrap();
        let pair = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].as_str()
        };
        assert_eq!(pair("--kernel"), "/k/trixie/vmlinuz");
        assert_eq!(pair("--initramfs"), "/art/trixie/initramfs.cpio");
        assert_eq!(pair("--cmdline"), "console=ttyS0 quiet");
        let vu = pair("--generic-vhost-user");
        assert!(vu.contains("socket=/s/vu.sock"), "{vu}");
        assert!(
            vu.contains(&format!(
                "device_type={}",
                vdevlab_qw::spec::DEFAULT_VIRTIO_ID
            )),
            "{vu}"
        );
        // TCG is QEMU's only.
        spec.accel = Accel::Tcg;
        let cfg = vm_config(&lab_vm(), &spec, "c".into(), &host_paths()).unwrap();
        assert!(cfg.cloud_hypervisor_args().is_err());
    }

    #[test]
    fn qemu_in_the_lab_root_runs_through_the_helper_with_its_binds() {
        let binds = root_binds(
            Path::new("/k/trixie"),
            Path::new("/art"),
            Path::new("/runs/x-1"),
            Path::new("/tmp/vdl-1"),
        );
        assert_eq!(
            binds,
            [
                "/k/trixie:/lab/kernel",
                "/art:/lab/artifacts",
                "/runs/x-1:/lab/run",
                "/tmp/vdl-1:/lab/sock"
            ]
        );
        let args = vec!["-accel".to_string(), "tcg".into()];
        let root = QemuRuntime::InRoot {
            root: "/cache/trixie-root".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
        };
        let c = qemu_command(&root, &binds, args.clone());
        assert_eq!(c.get_program(), in_root_script().as_os_str());
        let argv: Vec<&std::ffi::OsStr> = c.get_args().collect();
        assert_eq!(
            argv,
            [
                "/cache/trixie-root",
                "/k/trixie:/lab/kernel",
                "/art:/lab/artifacts",
                "/runs/x-1:/lab/run",
                "/tmp/vdl-1:/lab/sock",
                "--",
                "/usr/bin/qemu-system-x86_64",
                "-accel",
                "tcg"
            ]
        );
        let host = qemu_command(&QemuRuntime::Host("/usr/bin/qemu".into()), &binds, args);
        assert_eq!(host.get_program(), "/usr/bin/qemu");
        assert_eq!(host.get_args().collect::<Vec<_>>(), ["-accel", "tcg"]);
    }

    #[test]
    fn the_console_is_cut_into_lines_as_chunks_arrive() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"Linux ver").is_empty());
        assert_eq!(
            s.push(b"sion 7\r\nVDEVLAB-BOOT\n~ # "),
            [&b"Linux version 7\r\n"[..], b"VDEVLAB-BOOT\n"]
        );
        assert_eq!(s.push(b"\n\n"), [&b"~ # \n"[..], b"\n"]);
        assert_eq!(s.finish(), None);
        let mut s = LineSplitter::default();
        s.push(b"no end");
        assert_eq!(s.finish().as_deref(), Some(&b"no end"[..]));
        assert_eq!(line_text(b"VDEVLAB-EXIT 0\r\n"), "VDEVLAB-EXIT 0");
        assert_eq!(line_text(b"a\xffb\n"), "a\u{fffd}b");
    }

    #[test]
    fn vmm_failures_are_summed_up_on_one_line() {
        // Cloud Hypervisor v53 after a vCPU failure (it then exits 0).
        let ch = "cloud-hypervisor: 12.345678ms: <vcpu0> ERROR:vmm/src/cpu.rs:1180 -- \
                  Unexpected exit reason on vcpu run: InternalError\n\
                  cloud-hypervisor: 12.4ms: <vmm> INFO:vmm/src/lib.rs:2 -- VM exited\n";
        let s = vmm_failure_summary(ch);
        assert!(
            s.contains("Unexpected exit reason on vcpu run: InternalError"),
            "{s}"
        );
        assert!(!s.contains('\n') && !s.contains("VM exited"), "{s}");
        let qemu = "qemu-system-x86_64: -chardev socket,id=vu0,path=/x: Failed to connect to '/x': No such file or directory\n";
        assert!(vmm_failure_summary(qemu).starts_with("qemu-system-x86_64: -chardev"));
        assert_eq!(vmm_failure_summary("\n\n"), "(nothing on stderr)");
        assert_eq!(vmm_failure_summary("a\nlast words\n"), "last words");
        assert!(vmm_failure_summary(&"error ".repeat(500)).len() <= 603);
    }
}

#[cfg(test)]
mod kernel_args_tests {
    use super::*;

    #[test]
    fn kernel_args_end_the_command_line() {
        let mut spec = BootSpec::new("x", vec![]);
        spec.kernel_args = vec!["kmemleak=on".into()];
        let line = kernel_cmdline("c", &spec).unwrap().cmdline;
        assert!(line.ends_with(" kmemleak=on"), "{line}");
        for bad in ["", "a b", "a\"b"] {
            spec.kernel_args = vec![bad.into()];
            assert!(kernel_cmdline("c", &spec).is_err(), "{bad:?}");
        }
    }
}
