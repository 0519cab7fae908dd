//! Scenarios: a boot, a guest program, host-side stimulus and checks, and a
//! run record. Shared by the `vdevlab` CLI and the integration tests.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use vdevlab_device::device::Stats;
use vdevlab_vmm_config::Accel;

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
    /// read()/write() calls it took.
    #[serde(default)]
    pub reads: Option<u64>,
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

/// A seeded pseudo-random stream (xorshift64*), reproducible from its seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Record a cell that cannot run here, with the reason.
pub fn record_skip(
    lab: &Lab,
    scenario: &str,
    vmm: Vmm,
    accel: Accel,
    reason: &str,
) -> Result<RunRecord> {
    let mut rec = RunRecord::new(
        scenario,
        vmm.name(),
        accel_name(accel),
        &lab.env.kernel_release,
        Verdict::Skip,
    );
    rec.reason = Some(reason.to_string());
    record::append(&rec)?;
    Ok(rec)
}

/// `blocking-rx`: the guest's blocking `read()` sleeps in the driver; the
/// host injects `payload` through the control plane once the reader is
/// waiting; the guest must receive exactly those bytes.
pub fn blocking_rx(lab: &Lab, vmm: Vmm, accel: Accel, payload: &[u8]) -> Result<Outcome> {
    let scenario = "blocking-rx";
    let bytes = payload.len().to_string();
    let spec = BootSpec {
        vmm,
        accel,
        ..BootSpec::new(scenario, &[scenario, "--bytes", &bytes, "--chunk", "1000"])
    };
    let host_sha = hex::encode(Sha256::digest(payload));
    let t0 = Instant::now();
    let mut guest = Guest::boot(&lab.env, &lab.artifacts, &spec)?;
    let mut rec = RunRecord::new(
        scenario,
        vmm.name(),
        accel_name(accel),
        &lab.env.kernel_release,
        Verdict::Fail,
    );
    rec.vmm_version = match vmm {
        Vmm::Qemu => Some(lab.env.qemu_version.clone()),
        Vmm::CloudHypervisor => crate::env::cloud_hypervisor().ok().map(|(_, v)| v),
    };
    rec.console = Some(guest.console_path.clone());

    let mut guest_result = None;
    let mut stats = None;
    let drive = (|| -> Result<()> {
        guest.wait_for(&format!("VDEVLAB-READY {scenario}"), BOOT_TIMEOUT)?;
        let mut ctl = guest.control()?;
        let mut sent = 0;
        while sent < payload.len() {
            let n = ctl
                .inject(&payload[sent..])
                .context("injecting the payload")?;
            if n == 0 {
                // FIFO full: the driver has not drained it yet.
                std::thread::sleep(Duration::from_millis(20));
            }
            sent += n;
        }
        let line = guest.wait_for("VDEVLAB-RESULT", BOOT_TIMEOUT)?;
        guest_result = Some(
            serde_json::from_str::<GuestResult>(&line)
                .with_context(|| format!("bad result line: {line}"))?,
        );
        stats = ctl.stats().ok().and_then(|r| r.stats);
        Ok(())
    })();
    rec.boot_ms = guest.boot_ms;
    rec.driver_ready_ms = guest.driver_ready_ms;
    let finished = guest.finish(Duration::from_secs(30));
    rec.duration_ms = Some(t0.elapsed().as_millis() as u64);

    let mut problems = Vec::new();
    if let Err(e) = &drive {
        problems.push(format!("{e:#}"));
    }
    match &finished {
        Ok(f) => {
            for s in &f.splats {
                problems.push(format!("kernel {}: {}", s.kind, s.line.trim()));
            }
        }
        Err(e) => problems.push(format!("{e:#}")),
    }
    if let Some(g) = &guest_result {
        if !g.ok {
            problems.push(format!(
                "guest program failed: {}",
                g.error.clone().unwrap_or_default()
            ));
        } else if g.bytes != Some(payload.len() as u64) {
            problems.push(format!(
                "guest read {:?} bytes, host sent {}",
                g.bytes,
                payload.len()
            ));
        } else if g.sha256.as_deref() != Some(host_sha.as_str()) {
            problems.push(format!(
                "data mismatch: guest SHA-256 {:?}, host {host_sha}",
                g.sha256
            ));
        }
    }
    if problems.is_empty() && guest_result.is_some() {
        rec.result = Verdict::Pass;
    } else {
        if guest_result.is_none() && problems.is_empty() {
            problems.push("the guest reported no result".into());
        }
        rec.reason = Some(problems.join("; "));
    }
    record::append(&rec)?;
    Ok(Outcome {
        record: rec,
        guest: guest_result,
        host_sha256: Some(host_sha),
        stats,
    })
}
