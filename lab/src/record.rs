//! Run records: one JSON line per guest boot in `target/lab-runs/runs.jsonl`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::env::runs_dir;

/// A run's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Everything held.
    Pass,
    /// Something did not; `reason` says what.
    Fail,
    /// The cell could not run here; `reason` says why.
    Skip,
}

/// One line of `runs.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unix time (seconds) when the record was written.
    pub ts: u64,
    /// `qemu` or `cloud-hypervisor`.
    pub vmm: String,
    /// The VMM's version line, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm_version: Option<String>,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// The guest's vCPUs (absent in records from before SMP cells: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    /// An SMP guest's device interrupts per CPU, from routing them
    /// (`irq_cpu`) to the end of the boot ([`crate::smp::irq_deltas`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irqs_per_cpu: Option<Vec<u64>>,
    /// How many interrupt lines `irqs_per_cpu` sums (each may show one
    /// interrupt on the CPU it moved from: [`crate::smp::irq_deltas`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_lines: Option<u32>,
    /// The CPU an SMP guest routed the device's interrupts to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irq_cpu: Option<u8>,
    /// Guest kernel release.
    pub kernel: String,
    /// The guest kernel's series in the matrix (`trixie`, `bookworm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_name: Option<String>,
    /// VMM start to the guest's init, in milliseconds.
    pub boot_ms: Option<u64>,
    /// VMM start to the driver bound (`/dev/qw0` present), in milliseconds.
    #[serde(default)]
    pub driver_ready_ms: Option<u64>,
    /// Scenario name, e.g. `blocking-rx`.
    pub scenario: String,
    /// The verdict.
    pub result: Verdict,
    /// Why, for `fail` and `skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The saved serial console.
    pub console: Option<PathBuf>,
    /// Whole run, VMM start to teardown, in milliseconds.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// The driver module under test, when it is not the reference
    /// `vdevlab_qw` (a user's own, `vdevlab user-test` or `faults --driver`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
}

impl RunRecord {
    /// A record stamped now.
    pub fn new(scenario: &str, vmm: &str, accel: &str, kernel: &str, result: Verdict) -> Self {
        Self {
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            vmm: vmm.into(),
            vmm_version: None,
            accel: accel.into(),
            vcpus: None,
            irqs_per_cpu: None,
            irq_lines: None,
            irq_cpu: None,
            kernel: kernel.into(),
            kernel_name: None,
            boot_ms: None,
            driver_ready_ms: None,
            scenario: scenario.into(),
            result,
            reason: None,
            console: None,
            duration_ms: None,
            driver: None,
        }
    }
}

/// The records file.
pub fn runs_file() -> PathBuf {
    runs_dir().join("runs.jsonl")
}

/// Append `rec` to `target/lab-runs/runs.jsonl` (one write, so parallel
/// test processes do not interleave lines).
pub fn append(rec: &RunRecord) -> Result<()> {
    std::fs::create_dir_all(runs_dir())?;
    let mut line = serde_json::to_vec(rec)?;
    line.push(b'\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(runs_file())
        .and_then(|mut f| f.write_all(&line))
        .with_context(|| format!("appending to {}", runs_file().display()))
}

/// Every record in the file.
pub fn read_all() -> Result<Vec<RunRecord>> {
    let text = match std::fs::read_to_string(runs_file()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad record: {l}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_has_the_documented_fields() {
        let mut r = RunRecord::new("blocking-rx", "qemu", "tcg", "7.3.4", Verdict::Skip);
        r.reason = Some("no KVM".into());
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in [
            "vmm", "accel", "kernel", "boot_ms", "scenario", "result", "reason", "console",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["result"], "skip");
    }
}
