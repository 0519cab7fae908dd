//! `vdevlab bench`: round-trip latency and throughput of the qw device per
//! I/O model, against baselines measured in the same guest and run.
//!
//! One boot of the lab guest carries the qw device and a named
//! virtio-serial port (QEMU's built-in `virtio-serial-pci` +
//! `virtserialport`, the baseline), and runs, in order:
//!
//! 1. per model, `echo-<model>` on `/dev/qw0` and then on the port
//!    (`/dev/virtio-ports/vdevlab.bench`): the host sends one 16-byte
//!    stamped message (sequence number, host timestamp) at a time and times
//!    its return, host side. The host side is the same for both devices: a
//!    Unix stream socket, qw's data port (`vdevlab-qw --data`, served on
//!    the backend's vring worker thread) and QEMU's chardev socket of the
//!    port. The first messages are a warm-up and are not counted.
//! 2. per transfer size: the blocking stream scenario on `/dev/zero` and
//!    `/dev/null` in the guest (no transport: the guest program's own
//!    ceiling, system calls, copies and the SHA-256 it keeps of the
//!    stream), then per model and direction the suite's stream scenarios
//!    (`<model>-rx`, `<model>-tx`, `--chunk` = the size) on qw and then on
//!    the port. The host writes (rx) or reads (tx) the device's socket.
//!    Each run is timed host side from the arrival of its `VDEVLAB-READY`
//!    line (stamped by the console reader) to the end: rx, the arrival of
//!    the `VDEVLAB-RESULT` line (the program read it all); tx, the last
//!    byte read from the socket. Both ends check the bytes (SHA-256).
//!
//! The backend is built with the release profile for the bench.
//!
//! The floor is the same echo and the same streams between two threads of
//! this process over a pair of pipes: no guest, no VMM.
//!
//! Combinations that cannot work are reported, not hidden: `linux-aio` on
//! the port fails (`io_submit` gives `EINVAL`: virtio_console has no
//! `read_iter`/`write_iter`), and `sigio-tx` on the port is not run (see
//! [`unsupported`]).
//!
//! Benchmarks measure; nothing here asserts a timing.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};
use vdevlab_qw::control::{ControlClient, Request};

use vdevlab_guest::protocol;

use crate::cell::Cell;
use crate::engine::{self, Session, Start};
use crate::guest::{BootSpec, Guest};
use crate::scenario::{pattern, BOOT_TIMEOUT};
use crate::Lab;

/// The I/O models, in the suite's order.
pub use vdevlab_guest::MODELS;

/// The virtio-serial port's name in the guest.
pub const PORT_NAME: &str = "vdevlab.bench";
/// The port's device path in the guest (linked by init.sh).
pub const PORT_PATH: &str = "/dev/virtio-ports/vdevlab.bench";
/// Bytes per echo message: sequence number and host timestamp.
pub const MSG_LEN: usize = 16;
/// Transfer sizes of the throughput runs.
pub const SIZES: [usize; 3] = [64, 4096, 65536];

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The guest kernel's name.
    pub kernel: String,
    /// Latency samples per model and device (after the warm-up).
    pub samples: usize,
    /// Warm-up messages per echo run (not counted).
    pub warmup: usize,
    /// The I/O models, in order.
    pub models: Vec<String>,
    /// Transfer sizes of the throughput runs.
    pub sizes: Vec<usize>,
    /// Bytes moved per throughput run, per size (same order as `sizes`).
    pub stream_bytes: Vec<usize>,
    /// Repetitions of each throughput run (qw and virtio-serial
    /// alternating); the median is reported.
    pub reps: usize,
    /// Skip the throughput runs.
    pub no_throughput: bool,
    /// Boots without any scenario per kernel and image, to measure boot
    /// time.
    pub boot_runs: usize,
    /// The kernels those boots use (empty: every provisioned kernel).
    pub boot_kernels: Vec<String>,
}

impl BenchOptions {
    /// The full run: 10,000 samples per model and device, and streams of
    /// 256 KiB (64 B), 2 MiB (4 KiB) and 8 MiB (64 KiB), three times each.
    pub fn full(kernel: &str) -> Self {
        Self {
            kernel: kernel.into(),
            samples: 10_000,
            warmup: 200,
            models: vdevlab_guest::MODELS
                .iter()
                .map(|m| m.to_string())
                .collect(),
            sizes: SIZES.to_vec(),
            stream_bytes: vec![256 << 10, 2 << 20, 8 << 20],
            reps: 3,
            no_throughput: false,
            boot_runs: 1,
            boot_kernels: Vec::new(),
        }
    }

    /// A quick run: 1,000 samples, each stream once, no boot-time boots.
    pub fn quick(kernel: &str) -> Self {
        Self {
            samples: 1000,
            warmup: 50,
            reps: 1,
            boot_runs: 0,
            ..Self::full(kernel)
        }
    }
}

/// The devices compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// The qw device (vhost-user backend, the lab's driver).
    Qw,
    /// QEMU's virtio-serial port (virtio_console), the baseline.
    VirtioSerial,
    /// Two host threads over pipes, the floor.
    Pipe,
    /// The guest program alone: the blocking stream scenario reading
    /// `/dev/zero` or writing `/dev/null` in the guest. No transport at
    /// all: the ceiling the guest program itself (system calls, copies and
    /// the SHA-256 it keeps of the stream) allows under this accelerator.
    GuestNull,
}

impl Device {
    /// Its name in tables and files.
    pub fn name(self) -> &'static str {
        match self {
            Device::Qw => "qw",
            Device::VirtioSerial => "virtio-serial",
            Device::Pipe => "pipe",
            Device::GuestNull => "guest-null",
        }
    }

    fn guest_path(self, dir: Dir) -> &'static str {
        match (self, dir) {
            (Device::Qw, _) => "/dev/qw0",
            (Device::GuestNull, Dir::Rx) => "/dev/zero",
            (Device::GuestNull, Dir::Tx) => "/dev/null",
            _ => PORT_PATH,
        }
    }
}

/// Percentiles of a set of round-trip times, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Samples.
    pub n: usize,
    /// Mean.
    pub mean_ns: u64,
    /// Median.
    pub p50_ns: u64,
    /// 90th percentile.
    pub p90_ns: u64,
    /// 99th percentile.
    pub p99_ns: u64,
    /// 99.9th percentile.
    pub p999_ns: u64,
    /// Largest.
    pub max_ns: u64,
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    /// The summary of `samples` (any order).
    pub fn of(samples: &[u64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_unstable();
        if s.is_empty() {
            return Self::default();
        }
        Self {
            n: s.len(),
            mean_ns: (s.iter().map(|&v| v as u128).sum::<u128>() / s.len() as u128) as u64,
            p50_ns: quantile(&s, 0.5),
            p90_ns: quantile(&s, 0.9),
            p99_ns: quantile(&s, 0.99),
            p999_ns: quantile(&s, 0.999),
            max_ns: s[s.len() - 1],
        }
    }
}

/// One echo run: a model on a device.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// The I/O model (`blocking`, ...; `blocking` for the pipe floor).
    pub model: String,
    /// The device.
    pub device: Device,
    /// The percentiles.
    pub summary: Summary,
    /// Every round-trip time, in order, ns.
    pub samples_ns: Vec<u64>,
    /// Host CPU time of the VMM (all QEMU threads) per echoed message, µs
    /// (over the whole run, warm-up included): what one round trip costs
    /// the emulator, whatever the load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_cpu_us_per_msg: Option<f64>,
    /// The same for the qw backend process (qw runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_cpu_us_per_msg: Option<f64>,
    /// What the guest program reported (its counters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<serde_json::Value>,
    /// Why the run failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which way a throughput run moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// Host to guest program.
    Rx,
    /// Guest program to host.
    Tx,
}

impl Dir {
    /// `rx` or `tx`.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Rx => "rx",
            Dir::Tx => "tx",
        }
    }
}

/// One throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// The I/O model.
    pub model: String,
    /// The device.
    pub device: Device,
    /// The direction.
    pub dir: Dir,
    /// Bytes per read/write call (`--chunk`).
    pub size: usize,
    /// Bytes moved.
    pub bytes: usize,
    /// Wall-clock seconds of the timed window.
    pub secs: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: f64,
    /// `size`-byte transfers per second.
    pub msgs_per_s: f64,
    /// MB/s of each repetition, in the order run (`mb_per_s`, `secs` and
    /// `msgs_per_s` are the median repetition's).
    pub runs_mb_per_s: Vec<f64>,
    /// On-CPU time of the VMM (all QEMU threads) per second of the run:
    /// 1.0 = one host CPU busy throughout (median repetition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm_cpu: Option<f64>,
    /// The same for the qw backend process (qw runs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_cpu: Option<f64>,
    /// What the guest program reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<serde_json::Value>,
    /// Why the run failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Throughput {
    fn new(model: &str, device: Device, dir: Dir, size: usize, bytes: usize) -> Self {
        Self {
            model: model.into(),
            device,
            dir,
            size,
            bytes,
            secs: 0.0,
            mb_per_s: 0.0,
            msgs_per_s: 0.0,
            runs_mb_per_s: Vec::new(),
            vmm_cpu: None,
            backend_cpu: None,
            guest: None,
            error: None,
        }
    }
}

/// Merge the repetitions of each (model, device, direction, size): the
/// median run by MB/s stands for them, all their MB/s are kept. Failed
/// repetitions are left out; if all failed, the first error stands.
pub fn merge_reps(runs: Vec<Throughput>) -> Vec<Throughput> {
    let mut groups: Vec<Vec<Throughput>> = Vec::new();
    for r in runs {
        match groups.iter_mut().find(|g| {
            let f = &g[0];
            f.model == r.model && f.device == r.device && f.dir == r.dir && f.size == r.size
        }) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let mut ok: Vec<Throughput> = g.iter().filter(|t| t.error.is_none()).cloned().collect();
            if ok.is_empty() {
                return g.into_iter().next().expect("groups are not empty");
            }
            let all: Vec<f64> = ok.iter().map(|t| t.mb_per_s).collect();
            ok.sort_by(|a, b| a.mb_per_s.total_cmp(&b.mb_per_s));
            let mut m = ok.swap_remove(ok.len() / 2);
            m.runs_mb_per_s = all;
            m
        })
        .collect()
}

/// On-CPU time of every thread of `pid` so far, ns (from schedstat).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        if let Ok(s) = fs::read_to_string(path) {
            total += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Some(total)
}

/// Boot times, ms from VMM start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTimes {
    /// The guest kernel's name (`trixie`, `bookworm`, `lab`, ...).
    pub kernel: String,
    /// The kernel image booted: `vmlinux` (PVH direct boot) or `vmlinuz`.
    pub image: String,
    /// To the guest's init (`VDEVLAB-BOOT`).
    pub boot_ms: Option<u64>,
    /// To the driver bound (`VDEVLAB-DRIVER-READY`).
    pub driver_ready_ms: Option<u64>,
    /// CPU time the VMM process had used by then (all its threads): less
    /// sensitive than wall time to other load on a shared machine.
    pub vmm_cpu_ms: Option<u64>,
    /// The guest kernel's own clock at init (`uptime=` of `VDEVLAB-BOOT`):
    /// the part of `boot_ms` spent in the kernel; the rest is the VMM's
    /// start, firmware and loading the kernel.
    pub guest_uptime_ms: Option<u64>,
    /// Why the boot failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `uptime=<seconds>` of a `VDEVLAB-BOOT` line, in ms.
pub fn uptime_ms(boot_line: &str) -> Option<u64> {
    let v = boot_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uptime="))?;
    Some((v.parse::<f64>().ok()? * 1000.0).round() as u64)
}

/// Wait for the boot markers: the init line's guest uptime, then the
/// driver.
fn wait_boot(guest: &mut Guest) -> Result<Option<u64>> {
    let line = guest.wait_for(protocol::BOOT, crate::scenario::BOOT_TIMEOUT)?;
    guest.wait_for(protocol::DRIVER_READY, crate::scenario::BOOT_TIMEOUT)?;
    Ok(uptime_ms(&line))
}

/// CPU time (user + system) of process `pid` so far, ms.
fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1000 / hz)
}

/// Where and how the figures were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Host CPUs online.
    pub cpus: usize,
    /// Host CPU model.
    pub cpu_model: String,
    /// Host kernel release.
    pub host_kernel: String,
    /// Load averages (1, 5, 15 min) at the start and at the end.
    pub loadavg_start: String,
    /// See `loadavg_start`.
    pub loadavg_end: String,
    /// The VMM's version line.
    pub vmm: String,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The guest kernel: series and release.
    pub guest_kernel: String,
}

/// Everything one `vdevlab bench` run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Unix time of the start.
    pub ts: u64,
    /// The machine.
    pub machine: Machine,
    /// Latency samples per model and device (after `warmup` messages).
    pub samples: usize,
    /// Warm-up messages per echo run.
    pub warmup: usize,
    /// The bench boot's own boot times.
    pub boot: BootTimes,
    /// Boots without scenario (`boot_runs`), each.
    pub boot_runs: Vec<BootTimes>,
    /// Echo runs: qw and virtio-serial per model, and the pipe floor.
    pub latency: Vec<Latency>,
    /// Throughput runs.
    pub throughput: Vec<Throughput>,
    /// The guest's console.
    pub console: Option<PathBuf>,
    /// Wall-clock seconds of the whole bench.
    pub duration_s: f64,
    /// Why the bench boot ended early or failed (the steps after the
    /// failure are missing), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aborted: Option<String>,
}

impl BenchReport {
    /// The echo run of `model` on `device`.
    pub fn latency_of(&self, model: &str, device: Device) -> Option<&Latency> {
        self.latency
            .iter()
            .find(|l| l.model == model && l.device == device)
    }

    /// The throughput run of `model`, `device`, `dir`, `size`.
    pub fn throughput_of(
        &self,
        model: &str,
        device: Device,
        dir: Dir,
        size: usize,
    ) -> Option<&Throughput> {
        self.throughput
            .iter()
            .find(|t| t.model == model && t.device == device && t.dir == dir && t.size == size)
    }
}

/// An echo message: sequence number and host timestamp (ns since the
/// bench's epoch), little endian.
pub fn encode_msg(seq: u64, stamp_ns: u64) -> [u8; MSG_LEN] {
    let mut m = [0u8; MSG_LEN];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m[8..].copy_from_slice(&stamp_ns.to_le_bytes());
    m
}

/// The sequence number and timestamp of an echo message.
pub fn decode_msg(m: &[u8; MSG_LEN]) -> (u64, u64) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&m[..8]);
    b.copy_from_slice(&m[8..]);
    (u64::from_le_bytes(a), u64::from_le_bytes(b))
}

/// One step of the guest's plan.
#[derive(Debug, Clone)]
enum Step {
    Echo {
        model: String,
        device: Device,
        msgs: usize,
    },
    Stream {
        model: String,
        device: Device,
        dir: Dir,
        size: usize,
        bytes: usize,
        seed: u64,
    },
}

impl Step {
    fn scenario(&self) -> String {
        match self {
            Step::Echo { model, .. } => format!("echo-{model}"),
            Step::Stream { model, dir, .. } => format!("{model}-{}", dir.name()),
        }
    }

    fn guest_args(&self) -> Vec<String> {
        let mut a = vec![self.scenario()];
        match self {
            Step::Echo { device, msgs, .. } => a.extend([
                "--device".into(),
                device.guest_path(Dir::Rx).into(),
                "--bytes".into(),
                (msgs * MSG_LEN).to_string(),
                "--chunk".into(),
                "4096".into(),
            ]),
            Step::Stream {
                device,
                size,
                bytes,
                seed,
                dir,
                ..
            } => {
                a.extend([
                    "--device".into(),
                    device.guest_path(*dir).into(),
                    "--bytes".into(),
                    bytes.to_string(),
                    "--chunk".into(),
                    size.to_string(),
                ]);
                if *dir == Dir::Tx {
                    a.extend(["--seed".into(), seed.to_string()]);
                }
            }
        }
        a
    }
}

/// Why a stream run cannot work on a device, if it cannot: it is then
/// reported as not run rather than left to hang the guest.
pub fn unsupported(model: &str, device: Device, dir: Dir, size: usize) -> Option<&'static str> {
    match (model, device, dir) {
        ("sigio", Device::VirtioSerial, Dir::Tx) => Some(
            "not run: virtio_console sends SIGIO only when data arrives or the host \
             opens/closes the port (send_sigio_to_port), never when the port becomes writable \
             again, so sigio-tx waits for good once the port's queue is full",
        ),
        ("posix-aio", Device::VirtioSerial, Dir::Tx) if size > 32 << 10 => Some(
            "not run: virtio_console takes at most 32 KiB per write (port_fops_write), so a \
             larger aio_write in a lio_listio batch comes back short after the batch's later \
             writes went out: the stream breaks (seen), and the port then wedged the guest",
        ),
        _ => None,
    }
}

impl Step {
    fn runs_in_guest(&self) -> bool {
        match self {
            Step::Echo { .. } => true,
            Step::Stream {
                model,
                device,
                dir,
                size,
                ..
            } => unsupported(model, *device, *dir, *size).is_none(),
        }
    }
}

fn plan(o: &BenchOptions) -> Vec<Step> {
    let mut steps = Vec::new();
    for model in &o.models {
        for device in [Device::Qw, Device::VirtioSerial] {
            steps.push(Step::Echo {
                model: model.clone(),
                device,
                msgs: o.warmup + o.samples,
            });
        }
    }
    if !o.no_throughput {
        let mut seed = 0xbe_0000;
        for (&size, &bytes) in o.sizes.iter().zip(&o.stream_bytes) {
            // The guest program's own ceiling at this size, first.
            for dir in [Dir::Rx, Dir::Tx] {
                for _ in 0..o.reps.max(1) {
                    seed += 1;
                    steps.push(Step::Stream {
                        model: "blocking".into(),
                        device: Device::GuestNull,
                        dir,
                        size,
                        bytes,
                        seed,
                    });
                }
            }
            // Ours and the baseline alternate, so both see the same load.
            for model in &o.models {
                for dir in [Dir::Rx, Dir::Tx] {
                    for _ in 0..o.reps.max(1) {
                        for device in [Device::Qw, Device::VirtioSerial] {
                            seed += 1;
                            steps.push(Step::Stream {
                                model: model.clone(),
                                device,
                                dir,
                                size,
                                bytes,
                                seed,
                            });
                        }
                    }
                }
            }
        }
    }
    steps
}

/// Wait for `scenario` to start: READY, or its result if it ended first.
fn next_mark(guest: &mut Guest, scenario: &str, timeout: Duration) -> Result<Start> {
    engine::wait_start(guest, scenario, scenario, timeout)
}

fn wait_result(guest: &mut Guest, scenario: &str, timeout: Duration) -> Result<serde_json::Value> {
    guest.wait_result(scenario, timeout)
}

/// The guest's verdict: its error, if it reported `ok: false`.
fn guest_error(v: &serde_json::Value) -> Option<String> {
    if v.get("ok") == Some(&serde_json::Value::Bool(true)) {
        None
    } else {
        Some(format!(
            "guest program failed: {}",
            v.get("error").and_then(|e| e.as_str()).unwrap_or("?")
        ))
    }
}

/// The host side of a device's byte stream: qw's data port, or QEMU's
/// chardev socket of the virtio-serial port. Both are Unix stream sockets,
/// so the host does the very same thing for either.
struct Link {
    path: PathBuf,
    stream: UnixStream,
}

impl Link {
    fn connect(path: &Path, timeout: Duration) -> Result<Link> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(stream) => {
                    return Ok(Link {
                        path: path.to_path_buf(),
                        stream,
                    })
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Drop the connection (and whatever is buffered in it) and connect
    /// again, after a run that failed half-way.
    fn reconnect(&mut self) -> Result<()> {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        *self = Link::connect(&self.path, Duration::from_secs(10))?;
        Ok(())
    }
}

/// Per-message timeout of the echo: a reply later than this means the
/// guest program is gone.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// Budget for one stream run.
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

fn echo_stream<S: Read + Write>(io: &mut S, msgs: usize, epoch: Instant) -> Result<Vec<u64>> {
    let mut rtts = Vec::with_capacity(msgs);
    for seq in 0..msgs as u64 {
        let msg = encode_msg(seq, epoch.elapsed().as_nanos() as u64);
        io.write_all(&msg).context("sending an echo message")?;
        let mut back = [0u8; MSG_LEN];
        io.read_exact(&mut back)
            .with_context(|| format!("message {seq}: waiting for its echo"))?;
        let now = epoch.elapsed().as_nanos() as u64;
        let (s, stamp) = decode_msg(&back);
        if s != seq {
            bail!("echo of message {seq} carries sequence number {s}");
        }
        rtts.push(now.saturating_sub(stamp));
    }
    Ok(rtts)
}

/// The pipe floor: an echo thread between two pipes, `warmup + samples`
/// messages; the round-trip times after the warm-up.
pub fn pipe_latency(warmup: usize, samples: usize) -> Result<Vec<u64>> {
    let (mut to_echo, from_host) = pipe()?;
    let (to_host, mut from_echo) = pipe()?;
    let total = warmup + samples;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut r, mut w) = (from_host, to_host);
        let mut buf = [0u8; MSG_LEN];
        for _ in 0..total {
            r.read_exact(&mut buf)?;
            w.write_all(&buf)?;
        }
        Ok(())
    });
    let epoch = Instant::now();
    let mut both = Duplex {
        r: &mut from_echo,
        w: &mut to_echo,
    };
    let rtts = echo_stream(&mut both, total, epoch)?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the pipe echo thread panicked"))??;
    Ok(rtts[warmup..].to_vec())
}

/// The pipe floor's throughput: `bytes` through a pipe in `size`-byte
/// writes and reads, one thread each way; seconds.
pub fn pipe_throughput(size: usize, bytes: usize) -> Result<f64> {
    let (mut w, mut r) = pipe()?;
    let data = pattern(7, bytes);
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; size];
        let mut total = 0;
        while total < bytes {
            let want = size.min(bytes - total);
            let n = r.read(&mut buf[..want])?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    });
    for chunk in data.chunks(size) {
        w.write_all(chunk)?;
    }
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the pipe reader panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    if got != bytes {
        bail!("the pipe delivered {got} of {bytes} bytes");
    }
    Ok(secs)
}

struct Duplex<'a> {
    r: &'a mut fs::File,
    w: &'a mut fs::File,
}

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// A pipe: (write end, read end).
fn pipe() -> Result<(fs::File, fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (fs::File::from_raw_fd(fds[1]), fs::File::from_raw_fd(fds[0])) })
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// The timed part of a stream run.
#[derive(Debug, Clone, Copy)]
struct Timed {
    secs: f64,
}

/// Drive one stream run after its READY; returns the timed part: from
/// the READY line's arrival at the host (stamped by the console reader, so
/// however late this thread looks) to the end: rx, the RESULT line's
/// arrival (the program read everything); tx, the last byte reaching the
/// host through the device's socket.
fn drive_stream(
    guest: &mut Guest,
    link: &mut Link,
    scenario: &str,
    device: Device,
    dir: Dir,
    data: &[u8],
) -> Result<(Timed, serde_json::Value)> {
    let bytes = data.len();
    let vm_start = Instant::now() - guest.elapsed();
    let t_ready = vm_start + guest.matched_at().context("no READY time")?;
    let timed = |end: Instant| Timed {
        secs: end.saturating_duration_since(t_ready).as_secs_f64(),
    };
    match (device, dir) {
        (Device::Qw | Device::VirtioSerial, Dir::Rx) => {
            let mut w = link.stream.try_clone()?;
            let owned = data.to_vec();
            let writer = std::thread::spawn(move || w.write_all(&owned));
            let v = wait_result(guest, scenario, STREAM_TIMEOUT);
            let end = vm_start + guest.matched_at().unwrap_or_default();
            if v.is_err() || v.as_ref().is_ok_and(|v| guest_error(v).is_some()) {
                // Unblock the writer: the guest is not reading.
                let _ = link.stream.shutdown(std::net::Shutdown::Both);
            }
            let w = writer
                .join()
                .map_err(|_| anyhow::anyhow!("writer panicked"))?;
            let v = v?;
            check_rx(&v, data)?;
            w.context("writing to the device's socket")?;
            Ok((timed(end), v))
        }
        (Device::Qw | Device::VirtioSerial, Dir::Tx) => {
            // A reader thread; the guest's result is watched meanwhile, so
            // a program that fails does not leave the reader waiting.
            let mut r = link.stream.try_clone()?;
            let reader = std::thread::spawn(move || -> std::io::Result<(Instant, String)> {
                let mut buf = vec![0u8; 1 << 16];
                let mut hash = Sha256::new();
                let mut got = 0usize;
                while got < bytes {
                    let want = buf.len().min(bytes - got);
                    let n = r.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    hash.update(&buf[..n]);
                    got += n;
                }
                Ok((Instant::now(), hex::encode(hash.finalize())))
            });
            let v = wait_result(guest, scenario, STREAM_TIMEOUT);
            let failed = v.is_err() || v.as_ref().is_ok_and(|v| guest_error(v).is_some());
            if failed {
                let _ = link.stream.shutdown(std::net::Shutdown::Both);
            }
            let got = reader
                .join()
                .map_err(|_| anyhow::anyhow!("reader panicked"))?;
            let v = v?;
            check_tx(&v, data)?;
            let (end, sha) = got.context("reading the device's socket")?;
            if sha != sha_hex(data) {
                bail!("the device delivered different bytes than the guest wrote");
            }
            Ok((timed(end), v))
        }
        (Device::GuestNull, _) => {
            let v = wait_result(guest, scenario, STREAM_TIMEOUT)?;
            let end = vm_start + guest.matched_at().context("no RESULT time")?;
            if let Some(e) = guest_error(&v) {
                bail!(e);
            }
            if v.get("bytes").and_then(|b| b.as_u64()) != Some(bytes as u64) {
                bail!("the guest moved {:?} bytes, not {bytes}", v.get("bytes"));
            }
            Ok((timed(end), v))
        }
        (Device::Pipe, _) => unreachable!("the pipe floor runs on the host"),
    }
}

fn ok_or_err(r: vdevlab_qw::control::Response) -> std::io::Result<()> {
    if r.ok {
        Ok(())
    } else {
        Err(std::io::Error::other(r.error.unwrap_or_default()))
    }
}

fn check_rx(v: &serde_json::Value, data: &[u8]) -> Result<()> {
    if let Some(e) = guest_error(v) {
        bail!(e);
    }
    let bytes = v.get("bytes").and_then(|b| b.as_u64());
    if bytes != Some(data.len() as u64) {
        bail!("the guest read {bytes:?} bytes, not {}", data.len());
    }
    if v.get("sha256").and_then(|s| s.as_str()) != Some(sha_hex(data).as_str()) {
        bail!("the guest read different bytes than the host sent");
    }
    Ok(())
}

fn check_tx(v: &serde_json::Value, data: &[u8]) -> Result<()> {
    if let Some(e) = guest_error(v) {
        bail!(e);
    }
    let bytes = v.get("bytes").and_then(|b| b.as_u64());
    if bytes != Some(data.len() as u64) {
        bail!("the guest wrote {bytes:?} bytes, not {}", data.len());
    }
    Ok(())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine(lab: &Lab, kernel: &crate::env::Kernel) -> Machine {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        host_kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        vmm: lab.env.qemu_version.clone(),
        accel: "tcg".into(),
        guest_kernel: format!("{} ({})", kernel.release, kernel.name),
    }
}

/// Boot each of `kernels` with no scenario, `n` times, per kernel image
/// (`vmlinux` by PVH where provisioning extracted one, and `vmlinuz`),
/// round-robin so that load changes hit all alike; the boot times of each.
/// A boot that fails is reported with its error, not fatal.
pub fn boot_times(
    lab: &Lab,
    art: &crate::artifacts::Artifacts,
    kernels: &[String],
    n: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BootTimes>> {
    let mut out = Vec::new();
    for round in 0..n {
        for name in kernels {
            let k = lab.env.kernel(name)?;
            let mut ways = Vec::new();
            if k.image.with_file_name("vmlinux").is_file() {
                ways.push(true);
            }
            ways.push(false);
            for pvh in ways {
                let mut spec = BootSpec::new("bench-boot", Vec::new()).on_kernel(name);
                spec.pvh = Some(pvh);
                let mut b = BootTimes {
                    kernel: name.clone(),
                    image: image_name(k, &spec),
                    ..BootTimes::default()
                };
                progress(&format!(
                    "boot {}/{n}: {name} ({}), {}",
                    round + 1,
                    k.release,
                    b.image
                ));
                match Guest::boot(&lab.env, art, &spec) {
                    Ok(mut guest) => {
                        match wait_boot(&mut guest) {
                            Ok(up) => {
                                b.vmm_cpu_ms = cpu_ms(guest.vmm_pid());
                                b.guest_uptime_ms = up;
                            }
                            Err(e) => b.error = Some(format!("{e:#}")),
                        }
                        b.boot_ms = guest.boot_ms;
                        b.driver_ready_ms = guest.driver_ready_ms;
                        let _ = guest.finish(Duration::from_secs(30));
                    }
                    Err(e) => b.error = Some(format!("{e:#}")),
                }
                out.push(b);
            }
        }
    }
    Ok(out)
}

fn image_name(kernel: &crate::env::Kernel, spec: &BootSpec) -> String {
    crate::guest::boot_image(kernel, spec)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default()
}

/// Run the benchmark: one boot with every echo and stream run, the pipe
/// floor, and `boot_runs` extra boots. `progress` gets one line per step.
pub fn run(lab: &Lab, o: &BenchOptions, mut progress: impl FnMut(&str)) -> Result<BenchReport> {
    let t_start = Instant::now();
    let kernel = lab.env.kernel(&o.kernel)?.clone();
    let mut machine = machine(lab, &kernel);
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // The backend as users run it: optimised.
    let mut release = lab.artifacts.clone();
    release.device_bin = crate::artifacts::release_device_bin()?;

    // The floor first, on a quiet host (no guest running yet).
    progress("pipe floor: echo and streams between two host threads");
    let (mut latency, mut throughput) = pipe_floor(o)?;
    let measured = measure_in_guest(lab, &release, &kernel, o, &mut progress)?;
    latency.extend(measured.latency);
    throughput.extend(measured.throughput);
    // A failed boot or step ends the run; what was measured is kept.
    if let Some(why) = &measured.aborted {
        progress(&format!("the bench boot failed: {why}"));
    }

    let mut boot_runs = Vec::new();
    if o.boot_runs > 0 {
        let kernels = if o.boot_kernels.is_empty() {
            lab.env
                .kernel_names()
                .iter()
                .map(|k| k.to_string())
                .collect()
        } else {
            o.boot_kernels.clone()
        };
        progress(&format!(
            "boot time: {} boot(s) per kernel and image without a scenario ({})",
            o.boot_runs,
            kernels.join(", ")
        ));
        boot_runs = boot_times(lab, &release, &kernels, o.boot_runs, &mut progress)?;
    }
    machine.loadavg_end = loadavg();
    Ok(BenchReport {
        ts,
        machine,
        samples: o.samples,
        warmup: o.warmup,
        boot: measured.boot,
        boot_runs,
        latency,
        throughput: merge_reps(throughput),
        console: Some(measured.console),
        duration_s: t_start.elapsed().as_secs_f64(),
        aborted: measured.aborted,
    })
}

/// The pipe floor: echo and streams between two host threads.
fn pipe_floor(o: &BenchOptions) -> Result<(Vec<Latency>, Vec<Throughput>)> {
    let rtts = pipe_latency(o.warmup, o.samples)?;
    let latency = vec![Latency {
        model: "blocking".into(),
        device: Device::Pipe,
        summary: Summary::of(&rtts),
        samples_ns: rtts,
        vmm_cpu_us_per_msg: None,
        backend_cpu_us_per_msg: None,
        guest: None,
        error: None,
    }];
    let mut throughput = Vec::new();
    if !o.no_throughput {
        for (&size, &bytes) in o.sizes.iter().zip(&o.stream_bytes) {
            for _ in 0..o.reps.max(1) {
                let secs = pipe_throughput(size, bytes)?;
                for dir in [Dir::Rx, Dir::Tx] {
                    let mut t = Throughput::new("blocking", Device::Pipe, dir, size, bytes);
                    t.secs = secs;
                    t.mb_per_s = bytes as f64 / secs / 1e6;
                    t.msgs_per_s = (bytes / size) as f64 / secs;
                    t.runs_mb_per_s = vec![t.mb_per_s];
                    throughput.push(t);
                }
            }
        }
    }
    Ok((latency, throughput))
}

/// What the bench boot measured.
struct Measured {
    latency: Vec<Latency>,
    throughput: Vec<Throughput>,
    boot: BootTimes,
    console: PathBuf,
    aborted: Option<String>,
}

/// The bench boot: every echo and stream of the plan in one guest, through
/// the scenario engine's session (markers, finish, splats, record).
fn measure_in_guest(
    lab: &Lab,
    art: &crate::artifacts::Artifacts,
    kernel: &crate::env::Kernel,
    o: &BenchOptions,
    progress: &mut impl FnMut(&str),
) -> Result<Measured> {
    let steps = plan(o);
    // A last one-message echo on qw keeps the guest up until the host has
    // finished with the step before it (a tx stream's last bytes may still
    // be on their way when the guest program reports; the guest powers off
    // after its last program).
    let sentinel = Step::Echo {
        model: "blocking".into(),
        device: Device::Qw,
        msgs: 1,
    };
    let mut runs: Vec<Vec<String>> = steps
        .iter()
        .filter(|s| s.runs_in_guest())
        .map(Step::guest_args)
        .collect();
    runs.push(sentinel.guest_args());
    let mut spec = BootSpec::new("bench", runs).on_kernel(&kernel.name);
    spec.bench_port = Some(PORT_NAME.into());
    let image = image_name(kernel, &spec);
    progress(&format!(
        "booting {} ({}) with the qw device and the virtio-serial port '{PORT_NAME}'",
        kernel.name, kernel.release
    ));
    let mut session = Session::boot(lab, art, kernel, Cell::QEMU_TCG, spec)?;
    let console = session.guest.console_path.clone();
    let mut boot = BootTimes {
        kernel: kernel.name.clone(),
        image,
        ..BootTimes::default()
    };
    let (mut latency, mut throughput) = (Vec::new(), Vec::new());
    let outcome = (|| -> Result<()> {
        let guest = &mut session.guest;
        let mut b = Bencher::connect(guest, o)?;
        boot.guest_uptime_ms = wait_boot(b.guest)?;
        boot.vmm_cpu_ms = cpu_ms(b.guest.vmm_pid());
        for (i, step) in steps.iter().enumerate() {
            let at = format!("[{}/{}]", i + 1, steps.len());
            match step {
                Step::Echo {
                    model,
                    device,
                    msgs,
                } => latency.push(b.echo(&at, step, model, *device, *msgs, progress)?),
                Step::Stream {
                    model,
                    device,
                    dir,
                    size,
                    bytes,
                    seed,
                } => throughput.push(b.stream(
                    &at,
                    step,
                    (model, *device, *dir),
                    (*size, *bytes, *seed),
                    progress,
                )?),
            }
        }
        let scenario = sentinel.scenario();
        if let Start::Ready = next_mark(b.guest, &scenario, BOOT_TIMEOUT)? {
            b.qw.stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
            echo_stream(&mut b.qw.stream, 1, b.epoch)?;
            wait_result(b.guest, &scenario, BOOT_TIMEOUT)?;
        }
        Ok(())
    })();
    boot.boot_ms = session.guest.boot_ms;
    boot.driver_ready_ms = session.guest.driver_ready_ms;
    let ended = session.finish(Duration::from_secs(60));
    let problems: Vec<String> = outcome
        .err()
        .map(|e| format!("{e:#}"))
        .into_iter()
        .collect();
    let rec = ended.record("bench", problems)?;
    Ok(Measured {
        latency,
        throughput,
        boot,
        console,
        aborted: rec.reason,
    })
}

/// The link a run on `device` uses: the qw device's data socket, or the
/// virtio-serial port.
fn pick<'a>(qw: &'a mut Link, port: &'a mut Link, device: Device) -> &'a mut Link {
    if device == Device::Qw {
        qw
    } else {
        port
    }
}

/// The bench boot's links: the guest, its qw device's data socket, the
/// virtio-serial port, the control socket, and the processes to account.
struct Bencher<'g> {
    guest: &'g mut Guest,
    o: &'g BenchOptions,
    ctl: ControlClient,
    qw: Link,
    port: Link,
    vmm_pid: u32,
    backend_pid: u32,
    epoch: Instant,
}

impl<'g> Bencher<'g> {
    fn connect(guest: &'g mut Guest, o: &'g BenchOptions) -> Result<Self> {
        let sock = guest
            .bench_socket
            .clone()
            .context("the bench boot has no port socket")?;
        let port = Link::connect(&sock, Duration::from_secs(30))?;
        let qw = Link::connect(&guest.data_path, Duration::from_secs(30))?;
        let ctl = guest.control()?;
        let (vmm_pid, backend_pid) = (guest.vmm_pid(), guest.backend_pid());
        Ok(Self {
            guest,
            o,
            ctl,
            qw,
            port,
            vmm_pid,
            backend_pid,
            epoch: Instant::now(),
        })
    }

    /// One latency run: `msgs` echoes once the guest program is ready.
    fn echo(
        &mut self,
        at: &str,
        step: &Step,
        model: &str,
        device: Device,
        msgs: usize,
        progress: &mut impl FnMut(&str),
    ) -> Result<Latency> {
        progress(&format!(
            "{at} latency {model} on {}: {msgs} messages",
            device.name()
        ));
        let scenario = step.scenario();
        let mut res = Latency {
            model: model.to_string(),
            device,
            summary: Summary::default(),
            samples_ns: Vec::new(),
            vmm_cpu_us_per_msg: None,
            backend_cpu_us_per_msg: None,
            guest: None,
            error: None,
        };
        if let Start::Ended(v) = next_mark(self.guest, &scenario, BOOT_TIMEOUT)? {
            res.error = guest_error(&v);
            res.guest = Some(v);
        } else {
            let (vmm_pid, backend_pid, epoch) = (self.vmm_pid, self.backend_pid, self.epoch);
            let link = pick(&mut self.qw, &mut self.port, device);
            link.stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
            let (vmm0, be0) = (cpu_ns(vmm_pid), cpu_ns(backend_pid));
            let r = echo_stream(&mut link.stream, msgs, epoch);
            let per_msg = |before: Option<u64>, pid: u32| {
                Some(cpu_ns(pid)?.saturating_sub(before?) as f64 / 1e3 / msgs.max(1) as f64)
            };
            res.vmm_cpu_us_per_msg = per_msg(vmm0, vmm_pid);
            if device == Device::Qw {
                res.backend_cpu_us_per_msg = per_msg(be0, backend_pid);
            }
            link.stream.set_read_timeout(None)?;
            let v = wait_result(self.guest, &scenario, BOOT_TIMEOUT)?;
            res.error = guest_error(&v);
            res.guest = Some(v);
            match r {
                Ok(rtts) => {
                    let kept = rtts[self.o.warmup.min(rtts.len())..].to_vec();
                    res.summary = Summary::of(&kept);
                    res.samples_ns = kept;
                }
                Err(e) => {
                    res.error.get_or_insert(format!("{e:#}"));
                }
            }
        }
        if let Some(e) = &res.error {
            progress(&format!("  n/a: {e}"));
            recover(&mut self.ctl, &mut self.qw, &mut self.port, device)?;
        } else {
            let s = &res.summary;
            let us = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.1} µs"));
            progress(&format!(
                "  p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs; CPU per message: QEMU {}, backend {}",
                s.p50_ns as f64 / 1e3,
                s.p99_ns as f64 / 1e3,
                s.max_ns as f64 / 1e3,
                us(res.vmm_cpu_us_per_msg),
                us(res.backend_cpu_us_per_msg)
            ));
        }
        Ok(res)
    }

    /// One throughput run: the stream once the guest program is ready.
    fn stream(
        &mut self,
        at: &str,
        step: &Step,
        (model, device, dir): (&str, Device, Dir),
        (size, bytes, seed): (usize, usize, u64),
        progress: &mut impl FnMut(&str),
    ) -> Result<Throughput> {
        progress(&format!(
            "{at} throughput {model} {} {size} B on {}: {bytes} bytes",
            dir.name(),
            device.name()
        ));
        let scenario = step.scenario();
        let mut res = Throughput::new(model, device, dir, size, bytes);
        if let Some(why) = unsupported(model, device, dir, size) {
            progress(&format!("  {why}"));
            res.error = Some(why.into());
            return Ok(res);
        }
        let data = pattern(seed, bytes);
        if let Start::Ended(v) = next_mark(self.guest, &scenario, BOOT_TIMEOUT)? {
            res.error = guest_error(&v);
            res.guest = Some(v);
        } else {
            let (t0, vmm0, be0) = (
                Instant::now(),
                cpu_ns(self.vmm_pid),
                cpu_ns(self.backend_pid),
            );
            let link = pick(&mut self.qw, &mut self.port, device);
            match drive_stream(self.guest, link, &scenario, device, dir, &data) {
                Ok((t, v)) => {
                    let wall = t0.elapsed().as_nanos().max(1) as f64;
                    let share = |before: Option<u64>, pid: u32| {
                        Some((cpu_ns(pid)?.saturating_sub(before?)) as f64 / wall)
                    };
                    res.vmm_cpu = share(vmm0, self.vmm_pid);
                    if device == Device::Qw {
                        res.backend_cpu = share(be0, self.backend_pid);
                    }
                    res.secs = t.secs;
                    res.mb_per_s = bytes as f64 / t.secs / 1e6;
                    res.msgs_per_s = bytes.div_ceil(size) as f64 / t.secs;
                    res.runs_mb_per_s = vec![res.mb_per_s];
                    res.guest = Some(v);
                }
                Err(e) => res.error = Some(format!("{e:#}")),
            }
        }
        if let Some(e) = &res.error {
            progress(&format!("  n/a: {e}"));
            recover(&mut self.ctl, &mut self.qw, &mut self.port, device)?;
        } else {
            let pct = |c: Option<f64>| c.map_or("-".into(), |c| format!("{:.0}%", c * 100.0));
            progress(&format!(
                "  {:.2} MB/s in {:.2} s; CPU: QEMU {}, backend {}",
                res.mb_per_s,
                res.secs,
                pct(res.vmm_cpu),
                pct(res.backend_cpu)
            ));
        }
        Ok(res)
    }
}

/// After a failed run: empty the qw device, or reconnect to the port so
/// nothing buffered leaks into the next run.
fn recover(ctl: &mut ControlClient, qw: &mut Link, port: &mut Link, device: Device) -> Result<()> {
    match device {
        Device::Qw => {
            qw.reconnect()?;
            ctl.request(&Request::Reset {}).and_then(ok_or_err)?;
        }
        Device::VirtioSerial => port.reconnect()?,
        Device::Pipe | Device::GuestNull => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_line_uptime() {
        assert_eq!(
            uptime_ms("VDEVLAB-BOOT uptime=4.37 kernel=7.3.4+deb13-amd64"),
            Some(4370)
        );
        assert_eq!(uptime_ms("VDEVLAB-BOOT kernel=x"), None);
    }

    #[test]
    fn messages_round_trip() {
        let m = encode_msg(7, 123_456_789);
        assert_eq!(m.len(), MSG_LEN);
        assert_eq!(decode_msg(&m), (7, 123_456_789));
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let v: Vec<u64> = (1..=1000).rev().collect();
        let s = Summary::of(&v);
        assert_eq!(s.n, 1000);
        assert_eq!(s.p50_ns, 500);
        assert_eq!(s.p90_ns, 900);
        assert_eq!(s.p99_ns, 990);
        assert_eq!(s.p999_ns, 999);
        assert_eq!(s.max_ns, 1000);
        assert_eq!(s.mean_ns, 500);
        assert_eq!(Summary::of(&[]), Summary::default());
        assert_eq!(quantile(&[5], 0.0), 5);
    }

    #[test]
    fn the_plan_interleaves_ours_and_the_baseline() {
        let mut o = BenchOptions::quick("trixie");
        o.models = vec!["poll".into(), "io-uring".into()];
        let steps = plan(&o);
        // 2 models x 2 devices echo, then per size (3) the guest-only
        // ceiling both ways and 2 models x 2 dirs x 2 devices.
        assert_eq!(steps.len(), 4 + 3 * (2 + 8));
        let args: Vec<String> = steps.iter().map(|s| s.guest_args().join(" ")).collect();
        assert_eq!(
            args[0],
            "echo-poll --device /dev/qw0 --bytes 16800 --chunk 4096"
        );
        assert_eq!(
            args[1],
            format!("echo-poll --device {PORT_PATH} --bytes 16800 --chunk 4096")
        );
        assert_eq!(
            args[4],
            "blocking-rx --device /dev/zero --bytes 262144 --chunk 64"
        );
        assert!(args[5].starts_with("blocking-tx --device /dev/null --bytes 262144 --chunk 64"));
        assert_eq!(
            args[6],
            "poll-rx --device /dev/qw0 --bytes 262144 --chunk 64"
        );
        assert!(args[7].starts_with(&format!("poll-rx --device {PORT_PATH} ")));
        assert!(args[8].contains("poll-tx") && args[8].contains("--seed"));
        // Guest arguments are safe for init.sh's splitting.
        for a in steps.iter().flat_map(Step::guest_args) {
            assert!(!a.contains([',', ';', ' ', '"']) && !a.is_empty(), "{a}");
        }
    }

    /// The floor's machinery moves every message and byte (no timing
    /// checked).
    #[test]
    fn the_pipe_floor_echoes_and_streams() {
        let rtts = pipe_latency(5, 50).unwrap();
        assert_eq!(rtts.len(), 50);
        assert!(pipe_throughput(4096, 100_000).unwrap() > 0.0);
        assert!(pipe_throughput(64, 1000).unwrap() > 0.0);
    }
}
