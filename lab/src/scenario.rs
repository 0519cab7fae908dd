//! Scenarios: a boot, a guest program, host-side stimulus and checks, and a
//! run record. Shared by the `vdevlab` CLI and the integration tests.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use vdevlab_device::control::Request;
use vdevlab_device::device::Stats;
use vdevlab_device::irq::IrqMode;

use vdevlab_guest::protocol;

use crate::cell::Cell;
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
    /// `mixed`: bytes read.
    #[serde(default)]
    pub rx_bytes: Option<u64>,
    /// `mixed`: SHA-256 of what was read.
    #[serde(default)]
    pub rx_sha256: Option<String>,
    /// `mixed`: bytes written.
    #[serde(default)]
    pub tx_bytes: Option<u64>,
    /// `mixed`: SHA-256 of what was written.
    #[serde(default)]
    pub tx_sha256: Option<String>,
    /// Every other field of the result line (scripted scenarios check them).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
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

/// The version line of the VMM a run used, for its record.
pub fn vmm_version(lab: &Lab, vmm: Vmm) -> Option<String> {
    match vmm {
        Vmm::Qemu => Some(lab.env.qemu_version.clone()),
        Vmm::CloudHypervisor => crate::env::cloud_hypervisor().ok().map(|(_, v)| v),
    }
}

/// Record a scenario that cannot run here in a cell (VMM and accelerator)
/// on one of the lab's kernels, with the reason.
pub fn record_skip(
    lab: &Lab,
    kernel: &Kernel,
    scenario: &str,
    cell: Cell,
    reason: &str,
) -> Result<RunRecord> {
    record_unrun(lab, kernel, scenario, cell, Verdict::Skip, reason)
}

/// Record a scenario that did not boot, as `verdict` (a skip, or a failure
/// when the cell was asked for and cannot run), with the reason.
pub fn record_unrun(
    lab: &Lab,
    kernel: &Kernel,
    scenario: &str,
    cell: Cell,
    verdict: Verdict,
    reason: &str,
) -> Result<RunRecord> {
    lab.env.kernel(&kernel.name)?;
    let mut rec = RunRecord::new(
        scenario,
        cell.vmm.name(),
        accel_name(cell.accel),
        &kernel.release,
        verdict,
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
    /// Both at once (`mixed`): the host injects and captures concurrently.
    Both,
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
    /// Which device instance (`/dev/qw<instance>`): a boot gets as many
    /// instances as its cases use, each with its own backend.
    pub instance: usize,
    /// A scripted case (driver-robustness scenarios): the guest program's
    /// arguments, what the host does, and the result fields it expects.
    /// Stream cases leave it empty.
    pub script: Option<Script>,
}

/// What the host does during a scripted case, in order.
#[derive(Debug, Clone)]
pub enum HostStep {
    /// Wait for `VDEVLAB-READY <marker>`.
    Ready(String),
    /// Inject these bytes (all of them, waiting for FIFO room).
    Inject(Vec<u8>),
    /// Send this raw control request (one JSON object, e.g.
    /// `{"op":"needs_reset"}`); the reply must be `ok`.
    Control(String),
    /// Wait this long.
    Sleep(Duration),
}

/// The first JSON value of a console line. A kernel message can land on
/// the same serial line right after the guest's result (seen in CI), so
/// what follows the value is ignored.
/// Parse a [`HostStep::Control`] request.
pub fn control_request(json: &str) -> Result<Request> {
    serde_json::from_str(json).with_context(|| format!("bad control request {json}"))
}

/// A scripted case: see [`StreamCase::script`].
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// The guest program's arguments after the scenario name.
    pub args: Vec<String>,
    /// The host's steps.
    pub steps: Vec<HostStep>,
    /// Result fields that must have these values (besides `"ok": true`).
    pub expect: Vec<(String, serde_json::Value)>,
    /// The guest program is expected to fail (`"ok": false`), e.g. with
    /// EIO under an injected fault; its error is then not a problem.
    pub expect_failure: bool,
    /// Name for the run record (default: the guest scenario's name).
    pub record_as: Option<String>,
    /// Result fields that must NOT have these values (e.g. a SHA-256 that
    /// injected corruption must have changed).
    pub expect_not: Vec<(String, serde_json::Value)>,
    /// Device counters that must be at least these values at the end.
    pub stats_at_least: Vec<(String, u64)>,
    /// The result line must come within this long after the last step
    /// (default: the boot budget): no task blocked longer.
    pub result_within: Option<Duration>,
}

impl StreamCase {
    /// A scripted case named `scenario` (a guest program subcommand).
    pub fn scripted(scenario: &str, script: Script) -> Self {
        Self {
            script: Some(script),
            ..Self::new(scenario, 0, 0)
        }
    }
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
            instance: 0,
            script: None,
        }
    }

    /// The direction, from the name's suffix.
    pub fn direction(&self) -> Result<Direction> {
        if self.scenario.ends_with("-rx") {
            Ok(Direction::Rx)
        } else if self.scenario.ends_with("-tx") {
            Ok(Direction::Tx)
        } else if self.scenario == "mixed" {
            Ok(Direction::Both)
        } else {
            anyhow::bail!("scenario {} is neither -rx, -tx nor mixed", self.scenario)
        }
    }

    fn guest_args(&self) -> Vec<String> {
        if let Some(script) = &self.script {
            let mut args = vec![self.scenario.clone()];
            args.extend(script.args.iter().cloned());
            return args;
        }
        let mut args = vec![
            self.scenario.clone(),
            "--bytes".into(),
            self.bytes.to_string(),
            "--chunk".into(),
            self.chunk.to_string(),
        ];
        if self.instance > 0 {
            args.extend(["--device".into(), format!("/dev/qw{}", self.instance)]);
        }
        if matches!(self.direction(), Ok(Direction::Tx | Direction::Both)) {
            args.extend(["--seed".into(), self.seed.to_string()]);
        }
        args
    }
}

/// `blocking-rx`: the guest's blocking `read()` sleeps in the driver; the
/// host injects `payload` through the control plane once the reader is
/// waiting; the guest must receive exactly those bytes. Boots `kernel`.
pub fn blocking_rx(lab: &Lab, kernel: &Kernel, cell: Cell, payload: &[u8]) -> Result<Outcome> {
    run_streams_with(
        lab,
        kernel,
        cell,
        &[(
            StreamCase::new("blocking-rx", payload.len(), 0),
            Some(payload.to_vec()),
        )],
        |_| {},
    )
    .map(|mut v| v.remove(0))
}

/// Run stream cases in one boot of `kernel`, in order: each gets its own
/// run record (sharing the boot's console and boot time).
pub fn run_streams(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    cases: &[StreamCase],
) -> Result<Vec<Outcome>> {
    run_streams_tuned(lab, kernel, cell, cases, |_| {})
}

/// [`run_streams`] with the boot adjusted by `tune` (e.g. driver parameters).
pub fn run_streams_tuned(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    cases: &[StreamCase],
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Vec<Outcome>> {
    let with: Vec<_> = cases.iter().map(|c| (c.clone(), None)).collect();
    run_streams_with(lab, kernel, cell, &with, tune)
}

/// Drive one case on a booted guest: returns the guest's result and the
/// SHA-256 of what the host sent or captured.
fn drive_case(
    guest: &mut Guest,
    case: &StreamCase,
    payload: &[u8],
) -> Result<(GuestResult, String)> {
    let dir = case.direction()?;
    guest.wait_ready(&case.scenario, BOOT_TIMEOUT)?;
    let mut ctl = guest.control_of(case.instance)?;
    ctl.interrupt_mode("all", case.irq.unwrap_or_default())
        .context("setting the interrupt mode")?;
    let (rx, tx): (&[u8], &[u8]) = match dir {
        Direction::Rx => (payload, &[]),
        Direction::Tx => (&[], payload),
        Direction::Both => (&payload[..case.bytes], &payload[case.bytes..]),
    };
    // One loop serves both directions, so `mixed` gets its injections and
    // captures interleaved while the guest reads and writes at once.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let (mut sent, mut got) = (0, Vec::with_capacity(tx.len()));
    while sent < rx.len() || got.len() < tx.len() {
        let mut moved = 0;
        if sent < rx.len() {
            let n = ctl.inject(&rx[sent..]).context("injecting the payload")?;
            sent += n;
            moved += n;
        }
        if got.len() < tx.len() {
            let chunk = ctl
                .capture(Some(tx.len() - got.len()))
                .context("capturing")?;
            moved += chunk.len();
            got.extend_from_slice(&chunk);
        }
        if moved == 0 {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "stalled: injected {sent} of {}, captured {} of {} bytes",
                    rx.len(),
                    got.len(),
                    tx.len()
                );
            }
            // FIFO full or capture empty: the driver has not caught up.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if got != tx {
        let at = got
            .iter()
            .zip(tx)
            .position(|(a, b)| a != b)
            .unwrap_or(tx.len());
        anyhow::bail!("captured stream differs from the pattern at byte {at}");
    }
    let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
    let host_sha = match dir {
        Direction::Rx => sha(rx),
        Direction::Tx => sha(tx),
        Direction::Both => format!("{}/{}", sha(rx), sha(tx)),
    };
    let raw = guest.wait_result(&case.scenario, BOOT_TIMEOUT)?;
    let result: GuestResult = serde_json::from_value(raw.clone())
        .with_context(|| format!("bad result of {}: {raw}", case.scenario))?;
    Ok((result, host_sha))
}

/// Drive a scripted case: the host's steps, then the result line.
fn drive_script(
    guest: &mut Guest,
    case: &StreamCase,
    script: &Script,
) -> Result<(GuestResult, serde_json::Value)> {
    let mut ctl = guest.control_of(case.instance)?;
    for step in &script.steps {
        match step {
            HostStep::Ready(marker) => {
                guest.wait_ready(marker, BOOT_TIMEOUT)?;
            }
            HostStep::Inject(data) => {
                let deadline = Instant::now() + BOOT_TIMEOUT;
                let mut sent = 0;
                while sent < data.len() {
                    let n = ctl.inject(&data[sent..]).context("injecting")?;
                    if n == 0 {
                        anyhow::ensure!(
                            Instant::now() < deadline,
                            "the receive FIFO never drained"
                        );
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    sent += n;
                }
            }
            HostStep::Sleep(d) => std::thread::sleep(*d),
            HostStep::Control(json) => {
                let req = control_request(json)?;
                let resp = ctl
                    .request(&req)
                    .with_context(|| format!("control request {json}"))?;
                anyhow::ensure!(
                    resp.ok,
                    "control request {json} failed: {}",
                    resp.error.unwrap_or_default()
                );
            }
        }
    }
    let raw = guest.wait_result(&case.scenario, script.result_within.unwrap_or(BOOT_TIMEOUT))?;
    Ok((serde_json::from_value(raw.clone())?, raw))
}

fn run_streams_with(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    cases: &[(StreamCase, Option<Vec<u8>>)],
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Vec<Outcome>> {
    let name = if cases.len() == 1 {
        cases[0].0.scenario.clone()
    } else {
        "batch".to_string()
    };
    let mut spec = BootSpec::new(&name, cases.iter().map(|(c, _)| c.guest_args()).collect())
        .on_kernel(&kernel.name);
    spec.vmm = cell.vmm;
    spec.accel = cell.accel;
    spec.instances = cases.iter().map(|(c, _)| c.instance + 1).max().unwrap_or(1);
    tune(&mut spec);
    let driver = spec.driver.as_ref().map(|d| d.module.clone());
    let t0 = Instant::now();
    let mut guest = Guest::boot(&lab.env, &lab.artifacts, &spec)?;
    let vmm_version = vmm_version(lab, cell.vmm);

    let mut partial = Vec::new();
    let mut aborted: Option<String> = None;
    for (case, payload) in cases {
        if let Some(why) = &aborted {
            partial.push((case, None, None, vec![format!("not run: {why}")], None));
            continue;
        }
        if let Some(script) = &case.script {
            let mut problems = Vec::new();
            let guest_result = match drive_script(&mut guest, case, script) {
                Ok((g, raw)) => {
                    if script.expect_failure && g.ok {
                        problems.push(
                            "the guest program succeeded, but it was expected to fail".into(),
                        );
                    }
                    if !g.ok && !script.expect_failure {
                        problems.push(format!(
                            "guest program failed: {}",
                            g.error.clone().unwrap_or_default()
                        ));
                    }
                    for (field, want) in &script.expect {
                        if raw.get(field) != Some(want) {
                            problems
                                .push(format!("{field} is {:?}, expected {want}", raw.get(field)));
                        }
                    }
                    Some(g)
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    problems.push(why.clone());
                    aborted = Some(format!(
                        "an earlier scenario ({}) failed: {why}",
                        case.scenario
                    ));
                    None
                }
            };
            let stats = guest
                .control_of(case.instance)
                .ok()
                .and_then(|mut c| c.stats().ok())
                .and_then(|r| r.stats);
            if !script.stats_at_least.is_empty() {
                let seen = stats.map(|s| serde_json::to_value(s).unwrap_or_default());
                for (name, min) in &script.stats_at_least {
                    let got = seen
                        .as_ref()
                        .and_then(|v| v.get(name))
                        .and_then(|v| v.as_u64());
                    if got.is_none_or(|g| g < *min) {
                        problems.push(format!(
                            "device counter {name} is {got:?}, expected at least {min}"
                        ));
                    }
                }
            }
            partial.push((case, guest_result, None, problems, stats));
            continue;
        }
        let payload = payload.clone().unwrap_or_else(|| {
            if case.direction().ok() == Some(Direction::Both) {
                // What the host injects (its own stream), then what the
                // guest writes (the pattern of its --seed).
                // (pattern() sets the seed's low bit: derive a seed that
                // differs elsewhere, so the two streams differ.)
                let mut both = pattern(case.seed ^ 0x9e37_79b9_7f4a_7c00, case.bytes);
                both.extend(pattern(case.seed, case.bytes));
                both
            } else {
                pattern(case.seed, case.bytes)
            }
        });
        let mut problems = Vec::new();
        let (guest_result, host_sha) = match drive_case(&mut guest, case, &payload) {
            Ok((g, sha)) => {
                if !g.ok {
                    problems.push(format!(
                        "guest program failed: {}",
                        g.error.clone().unwrap_or_default()
                    ));
                } else if case.direction().ok() == Some(Direction::Both) {
                    let seen = format!(
                        "{}/{}",
                        g.rx_sha256.clone().unwrap_or_default(),
                        g.tx_sha256.clone().unwrap_or_default()
                    );
                    if g.rx_bytes != Some(case.bytes as u64)
                        || g.tx_bytes != Some(case.bytes as u64)
                    {
                        problems.push(format!(
                            "guest moved rx {:?} / tx {:?} bytes, expected {} each way",
                            g.rx_bytes, g.tx_bytes, case.bytes
                        ));
                    } else if seen != sha {
                        problems.push(format!(
                            "data mismatch: guest rx/tx SHA-256 {seen}, host {sha}"
                        ));
                    }
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
            .control_of(case.instance)
            .ok()
            .and_then(|mut c| c.stats().ok())
            .and_then(|r| r.stats);
        partial.push((case, guest_result, host_sha, problems, stats));
    }
    let boot_ms = guest.boot_ms;
    let driver_ready_ms = guest.driver_ready_ms;
    let console = guest.console_path.clone();
    // After a case that could not finish (e.g. a reader still blocked),
    // the guest would not power off by itself: end it now, so the cases
    // before keep their own verdicts.
    let finished = if aborted.is_some() {
        Ok(guest.abort())
    } else {
        guest.finish(Duration::from_secs(30))
    };
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
        let name = case
            .script
            .as_ref()
            .and_then(|s| s.record_as.clone())
            .unwrap_or_else(|| case.scenario.clone());
        let mut rec = RunRecord::new(
            &name,
            cell.vmm.name(),
            accel_name(cell.accel),
            &kernel.release,
            Verdict::Fail,
        );
        rec.kernel_name = Some(kernel.name.clone());
        rec.vmm_version = vmm_version.clone();
        rec.boot_ms = boot_ms;
        rec.driver_ready_ms = driver_ready_ms;
        rec.console = Some(console.clone());
        rec.duration_ms = Some(duration_ms);
        rec.driver = driver.clone();
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

/// `backend-crash-rx`: the device model crashes (SIGKILL) mid-stream while
/// QEMU keeps running, and what the guest sees is checked.
///
/// QEMU 11.1's `vhost-user-test-device-pci` cannot reconnect: started with
/// the chardev's `reconnect-ms` it fails to realize ("Failed to set msg
/// fds": the generic device does not wait for the socket to connect), and
/// without it a closed socket stays closed. So a crash is final for the
/// device, and the contract for the guest is: data delivered before the
/// crash is read intact; then the device goes quiet, and the reader simply
/// blocks (no error, no invented byte, no kernel splat) until the VM is
/// torn down. The guest's blocking reader waits for `2 * half` bytes; the
/// host delivers `half`, kills the backend, and checks that the reader is
/// still waiting and the VM still running 5 s later.
pub fn backend_crash_rx(lab: &Lab, kernel: &Kernel, half: usize) -> Result<Outcome> {
    let scenario = "backend-crash-rx";
    let total = 2 * half;
    let mut spec = BootSpec::new(
        scenario,
        vec![vec![
            "blocking-rx".into(),
            "--bytes".into(),
            total.to_string(),
            "--chunk".into(),
            "4000".into(),
        ]],
    )
    .on_kernel(&kernel.name);
    // The driver must not read config space here: QEMU 11.1's generic
    // vhost-user device forwards every config read to the backend, and
    // once it has handled the backend's disconnect such a read fails an
    // assertion (vhost_dev_get_config: `hdev->vhost_ops`) and aborts QEMU.
    // With the default config_status=1 the driver's status-word poll does
    // that within 500 ms of the crash.
    spec.driver_params = vec!["config_status=0".into()];
    let payload = pattern(0x7e57, half);
    let t0 = Instant::now();
    let mut guest = Guest::boot(&lab.env, &lab.artifacts, &spec)?;
    let mut rec = RunRecord::new(
        scenario,
        Vmm::Qemu.name(),
        "tcg",
        &kernel.release,
        Verdict::Fail,
    );
    rec.kernel_name = Some(kernel.name.clone());
    rec.vmm_version = Some(lab.env.qemu_version.clone());
    rec.console = Some(guest.console_path.clone());

    let mut stats = None;
    let drive = (|| -> Result<()> {
        guest.wait_ready("blocking-rx", BOOT_TIMEOUT)?;
        let mut ctl = guest.control()?;
        let mut sent = 0;
        while sent < payload.len() {
            let n = ctl.inject(&payload[sent..])?;
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            sent += n;
        }
        // Delivered into the driver's buffers, not just queued.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            stats = ctl.stats()?.stats;
            if stats.map(|s| s.rx_bytes) == Some(half as u64) {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the first half was never delivered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        guest.kill_backend();
        match guest.wait_for(protocol::RESULT, Duration::from_secs(5)) {
            Ok(line) => {
                anyhow::bail!("the reader returned after the crash instead of waiting: {line}")
            }
            Err(e) if format!("{e}").contains("within") => {}
            Err(e) => return Err(e),
        }
        anyhow::ensure!(guest.vmm_running(), "QEMU exited when the backend crashed");
        Ok(())
    })();
    rec.boot_ms = guest.boot_ms;
    rec.driver_ready_ms = guest.driver_ready_ms;
    // The reader never finishes: end the VM now.
    let finished = guest.abort();
    rec.duration_ms = Some(t0.elapsed().as_millis() as u64);
    let mut problems = Vec::new();
    if let Err(e) = drive {
        problems.push(format!("{e:#}"));
    }
    problems.extend(
        finished
            .splats
            .iter()
            .map(|s| format!("kernel {}: {}", s.kind, s.line.trim())),
    );
    if problems.is_empty() {
        rec.result = Verdict::Pass;
    } else {
        rec.reason = Some(problems.join("; "));
    }
    record::append(&rec)?;
    Ok(Outcome {
        record: rec,
        guest: None,
        host_sha256: None,
        stats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_tolerate_a_kernel_message_after_them() {
        let v: serde_json::Value =
            crate::guest::first_json(r#"{"scenario":"x","ok":true}[   26.9] vdevlab_qw: bound"#)
                .unwrap();
        assert_eq!(v["ok"], true);
        assert!(crate::guest::first_json::<serde_json::Value>("garbage").is_err());
    }

    #[test]
    fn control_steps_parse_as_requests() {
        assert_eq!(
            control_request(r#"{"op":"needs_reset"}"#).unwrap(),
            Request::NeedsReset {}
        );
        assert_eq!(
            control_request(r#"{"op":"capture","max":3}"#).unwrap(),
            Request::Capture { max: Some(3) }
        );
        let err = format!(
            "{:#}",
            control_request(r#"{"op":"frobnicate"}"#).unwrap_err()
        );
        assert!(err.contains("bad control request"), "{err}");
        assert!(control_request("not json").is_err());
    }
}
