//! Scenarios: a boot, a guest program, host-side stimulus and checks, and a
//! run record. Shared by the `vdevlab` CLI and the integration tests.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use vdevlab_device::device::Stats;
use vdevlab_device::irq::IrqMode;
use vdevlab_vmm_config::Accel;

use crate::env::Kernel;
use crate::guest::{accel_name, BootSpec, Guest, Vmm};
use crate::record::{self, RunRecord, Verdict};
use crate::Lab;

/// Budget for one TCG boot plus scenario; generous, since CI machines are
/// slow. A guest that needs longer has hung.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a guest program reported (`VDEVLAB-RESULT {...}`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GuestResult {
    /// Scenario name as the guest saw it.
    #[serde(default)]
    pub scenario: String,
    /// Whether the program itself succeeded.
    pub ok: bool,
    /// Its error, if not.
    #[serde(default)]
    pub error: Option<String>,
    /// Bytes moved.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// read() calls it took (rx).
    #[serde(default)]
    pub reads: Option<u64>,
    /// write() calls it took (tx).
    #[serde(default)]
    pub writes: Option<u64>,
    /// SHA-256 of the stream, hex.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// The outcome of one scenario run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The record that was appended to `runs.jsonl`.
    pub record: RunRecord,
    /// What the guest program reported, if it got that far.
    pub guest: Option<GuestResult>,
    /// SHA-256 of what the host sent or expected, hex.
    pub host_sha256: Option<String>,
    /// The device's counters at the end.
    pub stats: Option<Stats>,
}

impl Outcome {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.record.result == Verdict::Pass
    }
}

/// The seeded stream the guest programs use (shared code, so both sides
/// agree byte for byte).
pub use vdevlab_guest::pattern;

/// Record a cell (a scenario on one of the lab's kernels) that cannot run
/// here, with the reason.
pub fn record_skip(
    lab: &Lab,
    kernel: &Kernel,
    scenario: &str,
    vmm: Vmm,
    accel: Accel,
    reason: &str,
) -> Result<RunRecord> {
    lab.env.kernel(&kernel.name)?;
    let mut rec = RunRecord::new(
        scenario,
        vmm.name(),
        accel_name(accel),
        &kernel.release,
        Verdict::Skip,
    );
    rec.kernel_name = Some(kernel.name.clone());
    rec.reason = Some(reason.to_string());
    record::append(&rec)?;
    Ok(rec)
}

/// Which way a stream scenario moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to driver: the host injects, the guest reads.
    Rx,
    /// Driver to device: the guest writes, the host captures.
    Tx,
}

/// One stream scenario in a batch: `<model>-rx` or `<model>-tx`.
#[derive(Debug, Clone)]
pub struct StreamCase {
    /// Scenario name, e.g. `epoll-et-rx`.
    pub scenario: String,
    /// Bytes to move.
    pub bytes: usize,
    /// Seed of the pseudo-random stream.
    pub seed: u64,
    /// Bytes per read()/write() in the guest program.
    pub chunk: usize,
    /// Interrupt mode for both queues during this case (default: immediate).
    pub irq: Option<IrqMode>,
}

impl StreamCase {
    /// A case with the lab's defaults (4000-byte chunks, so calls straddle
    /// the driver's page-sized buffers).
    pub fn new(scenario: &str, bytes: usize, seed: u64) -> Self {
        Self {
            scenario: scenario.to_string(),
            bytes,
            seed,
            chunk: 4000,
            irq: None,
        }
    }

    /// The direction, from the name's suffix.
    pub fn direction(&self) -> Result<Direction> {
        if self.scenario.ends_with("-rx") {
            Ok(Direction::Rx)
        } else if self.scenario.ends_with("-tx") {
            Ok(Direction::Tx)
        } else {
            anyhow::bail!("scenario {} is neither -rx nor -tx", self.scenario)
        }
    }

    fn guest_args(&self) -> Vec<String> {
        let mut args = vec![
            self.scenario.clone(),
            "--bytes".into(),
            self.bytes.to_string(),
            "--chunk".into(),
            self.chunk.to_string(),
        ];
        if self.direction().ok() == Some(Direction::Tx) {
            args.extend(["--seed".into(), self.seed.to_string()]);
        }
        args
    }
}

/// `blocking-rx`: the guest's blocking `read()` sleeps in the driver; the
/// host injects `payload` through the control plane once the reader is
/// waiting; the guest must receive exactly those bytes. Boots `kernel`.
pub fn blocking_rx(
    lab: &Lab,
    kernel: &Kernel,
    vmm: Vmm,
    accel: Accel,
    payload: &[u8],
) -> Result<Outcome> {
    run_streams_with(
        lab,
        kernel,
        vmm,
        accel,
        &[(
            StreamCase::new("blocking-rx", payload.len(), 0),
            Some(payload.to_vec()),
        )],
    )
    .map(|mut v| v.remove(0))
}

/// Run stream cases in one boot of `kernel`, in order: each gets its own
/// run record (sharing the boot's console and boot time).
pub fn run_streams(
    lab: &Lab,
    kernel: &Kernel,
    vmm: Vmm,
    accel: Accel,
    cases: &[StreamCase],
) -> Result<Vec<Outcome>> {
    let with: Vec<_> = cases.iter().map(|c| (c.clone(), None)).collect();
    run_streams_with(lab, kernel, vmm, accel, &with)
}

/// Drive one case on a booted guest: returns the guest's result and the
/// SHA-256 of what the host sent or captured.
fn drive_case(
    guest: &mut Guest,
    case: &StreamCase,
    payload: &[u8],
) -> Result<(GuestResult, String)> {
    let dir = case.direction()?;
    guest.wait_for(&format!("VDEVLAB-READY {}", case.scenario), BOOT_TIMEOUT)?;
    let mut ctl = guest.control()?;
    ctl.interrupt_mode("all", case.irq.unwrap_or_default())
        .context("setting the interrupt mode")?;
    let host_sha = match dir {
        Direction::Rx => {
            let mut sent = 0;
            while sent < payload.len() {
                let n = ctl
                    .inject(&payload[sent..])
                    .context("injecting the payload")?;
                if n == 0 {
                    // FIFO full: the driver has not drained it yet.
                    std::thread::sleep(Duration::from_millis(5));
                }
                sent += n;
            }
            hex::encode(Sha256::digest(payload))
        }
        Direction::Tx => {
            let deadline = Instant::now() + BOOT_TIMEOUT;
            let mut got = Vec::with_capacity(case.bytes);
            while got.len() < case.bytes {
                let chunk = ctl
                    .capture(Some(case.bytes - got.len()))
                    .context("capturing")?;
                if chunk.is_empty() {
                    if Instant::now() > deadline {
                        anyhow::bail!("captured only {} of {} bytes", got.len(), case.bytes);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                got.extend_from_slice(&chunk);
            }
            if got != payload {
                let at = got
                    .iter()
                    .zip(payload)
                    .position(|(a, b)| a != b)
                    .unwrap_or(payload.len());
                anyhow::bail!("captured stream differs from the pattern at byte {at}");
            }
            hex::encode(Sha256::digest(&got))
        }
    };
    let line = guest.wait_for(
        &format!("VDEVLAB-RESULT {{\"scenario\":\"{}\"", case.scenario),
        BOOT_TIMEOUT,
    )?;
    let json = line.trim_start_matches("VDEVLAB-RESULT").trim();
    let result: GuestResult =
        serde_json::from_str(json).with_context(|| format!("bad result line: {line}"))?;
    Ok((result, host_sha))
}

fn run_streams_with(
    lab: &Lab,
    kernel: &Kernel,
    vmm: Vmm,
    accel: Accel,
    cases: &[(StreamCase, Option<Vec<u8>>)],
) -> Result<Vec<Outcome>> {
    let name = if cases.len() == 1 {
        cases[0].0.scenario.clone()
    } else {
        "batch".to_string()
    };
    let mut spec = BootSpec::new(&name, cases.iter().map(|(c, _)| c.guest_args()).collect())
        .on_kernel(&kernel.name);
    spec.vmm = vmm;
    spec.accel = accel;
    let t0 = Instant::now();
    let mut guest = Guest::boot(&lab.env, &lab.artifacts, &spec)?;
    let vmm_version = match vmm {
        Vmm::Qemu => Some(lab.env.qemu_version.clone()),
        Vmm::CloudHypervisor => crate::env::cloud_hypervisor().ok().map(|(_, v)| v),
    };

    let mut partial = Vec::new();
    let mut aborted: Option<String> = None;
    for (case, payload) in cases {
        if let Some(why) = &aborted {
            partial.push((case, None, None, vec![format!("not run: {why}")], None));
            continue;
        }
        let payload = payload
            .clone()
            .unwrap_or_else(|| pattern(case.seed, case.bytes));
        let mut problems = Vec::new();
        let (guest_result, host_sha) = match drive_case(&mut guest, case, &payload) {
            Ok((g, sha)) => {
                if !g.ok {
                    problems.push(format!(
                        "guest program failed: {}",
                        g.error.clone().unwrap_or_default()
                    ));
                } else if g.bytes != Some(case.bytes as u64) {
                    problems.push(format!(
                        "guest moved {:?} bytes, expected {}",
                        g.bytes, case.bytes
                    ));
                } else if g.sha256.as_deref() != Some(sha.as_str()) {
                    problems.push(format!(
                        "data mismatch: guest SHA-256 {:?}, host {sha}",
                        g.sha256
                    ));
                }
                (Some(g), Some(sha))
            }
            Err(e) => {
                let why = format!("{e:#}");
                problems.push(why.clone());
                aborted = Some(format!(
                    "an earlier scenario ({}) failed: {why}",
                    case.scenario
                ));
                (None, None)
            }
        };
        let stats = guest
            .control()
            .ok()
            .and_then(|mut c| c.stats().ok())
            .and_then(|r| r.stats);
        partial.push((case, guest_result, host_sha, problems, stats));
    }
    let boot_ms = guest.boot_ms;
    let driver_ready_ms = guest.driver_ready_ms;
    let console = guest.console_path.clone();
    let finished = guest.finish(Duration::from_secs(30));
    let duration_ms = t0.elapsed().as_millis() as u64;
    let mut shared = Vec::new();
    match &finished {
        Ok(f) => {
            for s in &f.splats {
                shared.push(format!("kernel {}: {}", s.kind, s.line.trim()));
            }
        }
        Err(e) => shared.push(format!("{e:#}")),
    }

    let mut outcomes = Vec::new();
    for (case, guest_result, host_sha, mut problems, stats) in partial {
        problems.extend(shared.iter().cloned());
        let mut rec = RunRecord::new(
            &case.scenario,
            vmm.name(),
            accel_name(accel),
            &kernel.release,
            Verdict::Fail,
        );
        rec.kernel_name = Some(kernel.name.clone());
        rec.vmm_version = vmm_version.clone();
        rec.boot_ms = boot_ms;
        rec.driver_ready_ms = driver_ready_ms;
        rec.console = Some(console.clone());
        rec.duration_ms = Some(duration_ms);
        if problems.is_empty() && guest_result.is_some() {
            rec.result = Verdict::Pass;
        } else {
            rec.reason = Some(problems.join("; "));
        }
        record::append(&rec)?;
        outcomes.push(Outcome {
            record: rec,
            guest: guest_result,
            host_sha256: host_sha,
            stats,
        });
    }
    Ok(outcomes)
}
