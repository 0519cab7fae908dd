//! The matrix's VMM dimension: a cell is a VMM, an accelerator and a CPU
//! count (`qemu-tcg`, `qemu-kvm`, `cloud-hypervisor-kvm`, each with one
//! vCPU, and their SMP twins `qemu-tcg-smp`, `qemu-kvm-smp`,
//! `cloud-hypervisor-kvm-smp`). Every scenario of the suite runs in each
//! cell the host can run, beside the kernel dimension; the SMP cells run
//! the scenarios whose bugs need two CPUs at once (the I/O models, the
//! teardown, the stress).
//!
//! An SMP cell's guest has [`SMP_VCPUS_VAR`] vCPUs (default 2; QEMU's TCG
//! runs one host thread per vCPU, so they really run at once). By default
//! the guest routes the device's interrupts to its last CPU and pins the
//! guest programs to CPU 0, so every wake-up crosses CPUs
//! ([`crate::guest::Placement`]).
//!
//! `VDEVLAB_CELLS` picks them:
//!
//! - unset or `auto`: every cell this host can run; the others are skipped,
//!   and each skip is on record with why (no KVM, PVM, no Cloud
//!   Hypervisor, ...) and the fix;
//! - `all`, or a list (`qemu-kvm,cloud-hypervisor-kvm`): exactly those
//!   cells, and they must run: a listed cell this host cannot run fails its
//!   tests with the reason, so a KVM machine's check cannot pass on skips.
//!   Cells not listed are skipped as "not selected".
//!
//! Commands that boot one guest (`vdevlab user-test`, `up`, `faults`) take
//! `--cell`, whose `auto` is the fastest cell that runs here.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vdevlab_vmm_config::Accel;

use crate::env::{cloud_hypervisor, kvm_usable};
use crate::guest::{accel_name, Vmm};
use crate::record::Verdict;

/// A VMM, an accelerator, and one vCPU or several.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// The VMM.
    pub vmm: Vmm,
    /// The accelerator.
    pub accel: Accel,
    /// Several vCPUs ([`Cell::vcpus`]) instead of one.
    pub smp: bool,
}

/// The variable that selects cells.
pub const CELLS_VAR: &str = "VDEVLAB_CELLS";

/// The variable that sets the SMP cells' vCPU count (2 to 8; default 2).
pub const SMP_VCPUS_VAR: &str = "VDEVLAB_SMP_VCPUS";

/// The SMP cells' vCPUs when [`SMP_VCPUS_VAR`] is unset.
pub const DEFAULT_SMP_VCPUS: u8 = 2;

/// The most vCPUs an SMP cell may ask for: the lab kernel's `NR_CPUS`
/// (images/lab-kernel.config).
pub const MAX_SMP_VCPUS: u8 = 8;

/// The SMP cells' vCPU count from `value` (the variable's value, if set).
pub fn smp_vcpus_from(value: Option<&str>) -> Result<u8> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_SMP_VCPUS);
    };
    match v.parse::<u8>() {
        Ok(n) if (2..=MAX_SMP_VCPUS).contains(&n) => Ok(n),
        _ => bail!(
            "{SMP_VCPUS_VAR}={v}: an SMP cell needs 2 to {MAX_SMP_VCPUS} vCPUs \
             (the lab kernel's NR_CPUS); unset it for {DEFAULT_SMP_VCPUS}"
        ),
    }
}

impl Cell {
    /// QEMU with its software emulation: runs on any host.
    pub const QEMU_TCG: Cell = Cell {
        vmm: Vmm::Qemu,
        accel: Accel::Tcg,
        smp: false,
    };
    /// QEMU on KVM.
    pub const QEMU_KVM: Cell = Cell {
        vmm: Vmm::Qemu,
        accel: Accel::Kvm,
        smp: false,
    };
    /// Cloud Hypervisor (KVM only).
    pub const CLOUD_HYPERVISOR_KVM: Cell = Cell {
        vmm: Vmm::CloudHypervisor,
        accel: Accel::Kvm,
        smp: false,
    };
    /// QEMU's multi-threaded TCG with several vCPUs.
    pub const QEMU_TCG_SMP: Cell = Cell::QEMU_TCG.with_smp();
    /// QEMU on KVM with several vCPUs.
    pub const QEMU_KVM_SMP: Cell = Cell::QEMU_KVM.with_smp();
    /// Cloud Hypervisor with several vCPUs.
    pub const CLOUD_HYPERVISOR_KVM_SMP: Cell = Cell::CLOUD_HYPERVISOR_KVM.with_smp();
    /// Every cell: one vCPU first (TCG first), then the SMP ones.
    pub const ALL: [Cell; 6] = [
        Cell::QEMU_TCG,
        Cell::QEMU_KVM,
        Cell::CLOUD_HYPERVISOR_KVM,
        Cell::QEMU_TCG_SMP,
        Cell::QEMU_KVM_SMP,
        Cell::CLOUD_HYPERVISOR_KVM_SMP,
    ];

    /// The same VMM and accelerator with several vCPUs.
    pub const fn with_smp(self) -> Cell {
        Cell { smp: true, ..self }
    }

    /// `qemu-tcg`, `qemu-kvm`, `cloud-hypervisor-kvm`, and the same with
    /// `-smp` for the SMP cells.
    pub fn name(self) -> &'static str {
        match (self.vmm, self.accel, self.smp) {
            (Vmm::Qemu, Accel::Tcg, false) => "qemu-tcg",
            (Vmm::Qemu, Accel::Kvm, false) => "qemu-kvm",
            (Vmm::CloudHypervisor, Accel::Kvm, false) => "cloud-hypervisor-kvm",
            (Vmm::CloudHypervisor, Accel::Tcg, false) => "cloud-hypervisor-tcg",
            (Vmm::Qemu, Accel::Tcg, true) => "qemu-tcg-smp",
            (Vmm::Qemu, Accel::Kvm, true) => "qemu-kvm-smp",
            (Vmm::CloudHypervisor, Accel::Kvm, true) => "cloud-hypervisor-kvm-smp",
            (Vmm::CloudHypervisor, Accel::Tcg, true) => "cloud-hypervisor-tcg-smp",
        }
    }

    /// The guest's vCPUs: 1, or for an SMP cell [`SMP_VCPUS_VAR`]'s
    /// count (default [`DEFAULT_SMP_VCPUS`]); a bad value is an error that
    /// says the range.
    pub fn vcpus(self) -> Result<u8> {
        if self.smp {
            smp_vcpus_from(std::env::var(SMP_VCPUS_VAR).ok().as_deref())
        } else {
            Ok(1)
        }
    }

    /// The cell of a run record's `vmm`, `accel` and `vcpus` (a record
    /// without `vcpus` is from one vCPU).
    pub fn of_record(vmm: &str, accel: &str, vcpus: Option<u8>) -> Option<Cell> {
        let smp = vcpus.unwrap_or(1) > 1;
        Cell::ALL
            .into_iter()
            .find(|c| c.vmm.name() == vmm && accel_name(c.accel) == accel && c.smp == smp)
    }

    /// A cell by name: `qemu-tcg`, `qemu/kvm`, `cloud-hypervisor-kvm`,
    /// `ch-kvm`, `cloud-hypervisor` (KVM is its only accelerator).
    /// Any of them with `-smp` is the SMP cell (`qemu-tcg-smp`, `ch-smp`).
    pub fn parse(text: &str) -> Result<Cell> {
        let t = text.trim().to_ascii_lowercase().replace(['/', '_'], "-");
        if let Some(base) = t.strip_suffix("-smp") {
            return Cell::parse(base)
                .map(Cell::with_smp)
                .map_err(|e| anyhow::anyhow!("{e} (with -smp for several vCPUs)"));
        }
        let t = t.strip_prefix("ch").map_or(t.clone(), |rest| {
            if rest.is_empty() || rest.starts_with('-') {
                format!("cloud-hypervisor{rest}")
            } else {
                t.clone()
            }
        });
        let t = if t == "cloud-hypervisor" {
            "cloud-hypervisor-kvm".to_string()
        } else {
            t
        };
        match Cell::ALL.into_iter().find(|c| c.name() == t) {
            Some(c) => Ok(c),
            None if t == "cloud-hypervisor-tcg" || t == "cloud-hypervisor-tcg-smp" => {
                bail!("Cloud Hypervisor runs on KVM only: use cloud-hypervisor-kvm, or qemu-tcg")
            }
            None => bail!(
                "unknown cell '{text}': one of {}",
                Cell::ALL.map(Cell::name).join(", ")
            ),
        }
    }

    /// Why this host cannot run the cell, with the fix; `None` when it can.
    /// (That the lab is provisioned is not checked here: booting does it.)
    pub fn blocked_by(self) -> Option<String> {
        let kvm = match self.accel {
            Accel::Tcg => None,
            Accel::Kvm => kvm_usable().err(),
        };
        let vmm = match self.vmm {
            Vmm::Qemu => None,
            Vmm::CloudHypervisor => cloud_hypervisor().err(),
        };
        if let Err(e) = self.vcpus() {
            return Some(format!("{e:#}"));
        }
        match (kvm, vmm) {
            (None, None) => None,
            (Some(k), None) => Some(format!("{} needs KVM: {k}", self.name())),
            (None, Some(v)) => Some(v),
            (Some(k), Some(v)) => Some(format!("{} needs KVM: {k}; and {v}", self.name())),
        }
    }
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What `VDEVLAB_CELLS` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every cell the host can run.
    Auto,
    /// These cells, each of which must run.
    Listed(Vec<Cell>),
}

impl Selection {
    /// Parse a `VDEVLAB_CELLS` value.
    pub fn parse(text: &str) -> Result<Selection> {
        let t = text.trim();
        if t.is_empty() || t == "auto" {
            return Ok(Selection::Auto);
        }
        if t == "all" {
            return Ok(Selection::Listed(Cell::ALL.to_vec()));
        }
        let mut cells = Vec::new();
        for part in t.split(',').filter(|p| !p.trim().is_empty()) {
            let c = Cell::parse(part)
                .map_err(|e| anyhow::anyhow!("{CELLS_VAR}={text}: {e}; or auto, or all"))?;
            if !cells.contains(&c) {
                cells.push(c);
            }
        }
        Ok(Selection::Listed(cells))
    }

    /// From the environment.
    pub fn from_env() -> Result<Selection> {
        Selection::parse(&std::env::var(CELLS_VAR).unwrap_or_default())
    }

    /// Whether `cell` is to run, given why the host cannot run it
    /// (`blocked`): [`Gate::Run`], [`Gate::Skip`] with the reason, or an
    /// error when the cell was asked for by name and cannot run.
    pub fn gate(&self, cell: Cell, blocked: Option<String>) -> Result<Gate> {
        match (self, blocked) {
            (Selection::Auto, None) => Ok(Gate::Run),
            (Selection::Auto, Some(why)) => Ok(Gate::Skip(why)),
            (Selection::Listed(cells), blocked) if cells.contains(&cell) => match blocked {
                None => Ok(Gate::Run),
                Some(why) => bail!("{CELLS_VAR} asks for {cell}, but {why}"),
            },
            (Selection::Listed(cells), _) => Ok(Gate::Skip(format!(
                "{cell} is not selected ({CELLS_VAR}={})",
                cells.iter().map(|c| c.name()).collect::<Vec<_>>().join(",")
            ))),
        }
    }
}

/// Whether a cell runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// It runs.
    Run,
    /// It does not, for this reason (recorded as a skip).
    Skip(String),
}

/// [`Selection::gate`] for this host and `VDEVLAB_CELLS`.
pub fn gate(cell: Cell) -> Result<Gate> {
    Selection::from_env()?.gate(cell, cell.blocked_by())
}

/// The cell for a command that boots one guest: `--cell` (or `auto`, the
/// default: QEMU on KVM where KVM works, else QEMU/TCG). A named cell the
/// host cannot run is an error with the reason and the fix.
pub fn pick(requested: Option<&str>) -> Result<Cell> {
    match requested.map(str::trim) {
        None | Some("") | Some("auto") => Ok(if Cell::QEMU_KVM.blocked_by().is_none() {
            Cell::QEMU_KVM
        } else {
            Cell::QEMU_TCG
        }),
        Some(name) => {
            let cell = Cell::parse(name)?;
            match cell.blocked_by() {
                None => Ok(cell),
                Some(why) => bail!("cannot run {cell} here: {why}"),
            }
        }
    }
}

/// [`pick`] for each of several names (`all`: every cell, each of which
/// must run here).
pub fn pick_many(requested: &[String]) -> Result<Vec<Cell>> {
    let mut cells = Vec::new();
    for name in requested {
        let more = if name.trim() == "all" {
            Cell::ALL
                .into_iter()
                .map(|c| pick(Some(c.name())))
                .collect::<Result<Vec<_>>>()?
        } else {
            vec![pick(Some(name))?]
        };
        for c in more {
            if !cells.contains(&c) {
                cells.push(c);
            }
        }
    }
    if cells.is_empty() {
        cells.push(pick(None)?);
    }
    Ok(cells)
}

/// One cell test's outcome (a line of `target/lab-runs/cell-tests.jsonl`),
/// written by the test suite's cell tests as they end: the cells' summary
/// comes from these, not from run records, since some tests make runs
/// fail on purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellTest {
    /// Unix time (seconds) when it ended.
    pub ts: u64,
    /// The test's path (`walking_skeleton::trixie::qemu_kvm::blocking_rx`).
    pub test: String,
    /// The cell's name.
    pub cell: String,
    /// Pass, fail or skip.
    pub result: Verdict,
    /// Why, for a skip or a failure that says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl CellTest {
    /// An outcome stamped now.
    pub fn new(test: &str, cell: Cell, result: Verdict, reason: Option<String>) -> CellTest {
        CellTest {
            ts: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            test: test.to_string(),
            cell: cell.name().to_string(),
            result,
            reason,
        }
    }
}

/// The outcomes file.
pub fn tests_file() -> std::path::PathBuf {
    crate::env::runs_dir().join("cell-tests.jsonl")
}

/// Append an outcome (one write: parallel test processes do not
/// interleave lines).
pub fn append_test(t: &CellTest) -> Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(crate::env::runs_dir())?;
    let mut line = serde_json::to_vec(t)?;
    line.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(tests_file())
        .and_then(|mut f| f.write_all(&line))
        .with_context(|| format!("appending to {}", tests_file().display()))
}

/// Every outcome on file.
pub fn read_tests() -> Result<Vec<CellTest>> {
    let text = match std::fs::read_to_string(tests_file()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad line: {l}")))
        .collect()
}

/// What the cell tests say about one cell.
#[derive(Debug, Clone, Serialize)]
pub struct CellSummary {
    /// The cell's name.
    pub cell: String,
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed: `<test>: <reason>`.
    pub failed: Vec<String>,
    /// Tests skipped.
    pub skipped: usize,
    /// Why they were skipped, each reason once.
    pub skip_reasons: Vec<String>,
}

impl CellSummary {
    /// `passed`, `FAILED`, `skipped` (nothing ran) or `not run`.
    pub fn verdict(&self) -> &'static str {
        match (self.passed, self.failed.len(), self.skipped) {
            (_, 1.., _) => "FAILED",
            (1.., 0, _) => "passed",
            (0, 0, 1..) => "skipped",
            (0, 0, 0) => "not run",
        }
    }
}

/// Sum the outcomes up per cell, every cell listed (TCG first).
pub fn summarize(tests: &[CellTest]) -> Vec<CellSummary> {
    Cell::ALL
        .into_iter()
        .map(|cell| {
            let mut sum = CellSummary {
                cell: cell.name().to_string(),
                passed: 0,
                failed: Vec::new(),
                skipped: 0,
                skip_reasons: Vec::new(),
            };
            for t in tests.iter().filter(|t| t.cell == cell.name()) {
                match t.result {
                    Verdict::Pass => sum.passed += 1,
                    Verdict::Fail => sum.failed.push(format!(
                        "{}: {}",
                        t.test,
                        t.reason.as_deref().unwrap_or("(see the test's output)")
                    )),
                    Verdict::Skip => {
                        sum.skipped += 1;
                        let why = t.reason.clone().unwrap_or_default();
                        if !sum.skip_reasons.contains(&why) {
                            sum.skip_reasons.push(why);
                        }
                    }
                }
            }
            sum
        })
        .collect()
}

/// The readable table of [`summarize`], one line per cell, then each
/// failure and each skip reason.
pub fn summary_table(sums: &[CellSummary]) -> String {
    let mut out = format!(
        "{:<26} {:<8} {:>6} {:>6} {:>7}\n",
        "cell", "verdict", "passed", "failed", "skipped"
    );
    for s in sums {
        out.push_str(&format!(
            "{:<26} {:<8} {:>6} {:>6} {:>7}\n",
            s.cell,
            s.verdict(),
            s.passed,
            s.failed.len(),
            s.skipped
        ));
    }
    for s in sums {
        for f in &s.failed {
            out.push_str(&format!("  {} failed: {f}\n", s.cell));
        }
        for why in &s.skip_reasons {
            out.push_str(&format!("  {} skipped: {why}\n", s.cell));
        }
    }
    out
}

/// Whether the summary meets `selection`: nothing failed, and each cell it
/// lists passed runs (a listed cell that only skipped, or never ran, is
/// not ready).
pub fn meets(selection: &Selection, sums: &[CellSummary]) -> bool {
    let nothing_failed = sums.iter().all(|s| s.failed.is_empty());
    match selection {
        Selection::Auto => nothing_failed,
        Selection::Listed(cells) => {
            nothing_failed
                && cells.iter().all(|c| {
                    sums.iter()
                        .any(|s| s.cell == c.name() && s.verdict() == "passed")
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_parse_by_every_spelling() {
        for (text, cell) in [
            ("qemu-tcg", Cell::QEMU_TCG),
            ("QEMU/TCG", Cell::QEMU_TCG),
            ("qemu_kvm", Cell::QEMU_KVM),
            ("cloud-hypervisor-kvm", Cell::CLOUD_HYPERVISOR_KVM),
            ("cloud-hypervisor/kvm", Cell::CLOUD_HYPERVISOR_KVM),
            ("cloud-hypervisor", Cell::CLOUD_HYPERVISOR_KVM),
            ("ch", Cell::CLOUD_HYPERVISOR_KVM),
            ("ch-kvm", Cell::CLOUD_HYPERVISOR_KVM),
        ] {
            assert_eq!(Cell::parse(text).unwrap(), cell, "{text}");
        }
        for (text, cell) in [
            ("qemu-tcg-smp", Cell::QEMU_TCG_SMP),
            ("QEMU/TCG/SMP", Cell::QEMU_TCG_SMP),
            ("qemu_kvm_smp", Cell::QEMU_KVM_SMP),
            ("ch-smp", Cell::CLOUD_HYPERVISOR_KVM_SMP),
            ("cloud-hypervisor-smp", Cell::CLOUD_HYPERVISOR_KVM_SMP),
        ] {
            assert_eq!(Cell::parse(text).unwrap(), cell, "{text}");
        }
        for cell in Cell::ALL {
            assert_eq!(Cell::parse(cell.name()).unwrap(), cell);
            let vcpus = if cell.smp { 2 } else { 1 };
            assert_eq!(
                Cell::of_record(cell.vmm.name(), accel_name(cell.accel), Some(vcpus)),
                Some(cell)
            );
        }
        // Records from before SMP cells have no vcpus: one.
        assert_eq!(Cell::of_record("qemu", "tcg", None), Some(Cell::QEMU_TCG));
        let e = Cell::parse("ch-tcg-smp").unwrap_err().to_string();
        assert!(e.contains("KVM only"), "{e}");
        let e = Cell::parse("xen-smp").unwrap_err().to_string();
        assert!(e.contains("with -smp"), "{e}");
        let e = Cell::parse("cloud-hypervisor-tcg").unwrap_err().to_string();
        assert!(e.contains("KVM only"), "{e}");
        let e = Cell::parse("qemu-hvf").unwrap_err().to_string();
        assert!(
            e.contains("qemu-tcg, qemu-kvm, cloud-hypervisor-kvm"),
            "{e}"
        );
        assert!(Cell::parse("chqemu").is_err());
    }

    #[test]
    fn smp_cells_take_their_vcpus_from_the_variable() {
        assert_eq!(smp_vcpus_from(None).unwrap(), 2);
        assert_eq!(smp_vcpus_from(Some("")).unwrap(), 2);
        assert_eq!(smp_vcpus_from(Some("4")).unwrap(), 4);
        assert_eq!(smp_vcpus_from(Some("8")).unwrap(), 8);
        for bad in ["1", "9", "two", "-2"] {
            let e = smp_vcpus_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("2 to 8") && e.contains(SMP_VCPUS_VAR), "{e}");
        }
        assert_eq!(Cell::QEMU_TCG.vcpus().unwrap(), 1);
        const { assert!(!Cell::QEMU_TCG.smp && Cell::QEMU_TCG_SMP.smp) };
        assert_eq!(Cell::QEMU_TCG_SMP.name(), "qemu-tcg-smp");
    }

    #[test]
    fn selections_parse() {
        assert_eq!(Selection::parse("").unwrap(), Selection::Auto);
        assert_eq!(Selection::parse("auto").unwrap(), Selection::Auto);
        assert_eq!(
            Selection::parse("all").unwrap(),
            Selection::Listed(Cell::ALL.to_vec())
        );
        assert_eq!(
            Selection::parse("qemu-kvm, ch,qemu-kvm").unwrap(),
            Selection::Listed(vec![Cell::QEMU_KVM, Cell::CLOUD_HYPERVISOR_KVM])
        );
        let e = Selection::parse("qemu-tcg,xen").unwrap_err().to_string();
        assert!(
            e.contains("VDEVLAB_CELLS=qemu-tcg,xen") && e.contains("auto"),
            "{e}"
        );
    }

    #[test]
    fn auto_skips_what_cannot_run_and_a_listed_cell_must_run() {
        let pvm = || Some("qemu-kvm needs KVM: /dev/kvm is PVM".to_string());
        let auto = Selection::Auto;
        assert_eq!(auto.gate(Cell::QEMU_TCG, None).unwrap(), Gate::Run);
        assert_eq!(
            auto.gate(Cell::QEMU_KVM, pvm()).unwrap(),
            Gate::Skip(pvm().unwrap())
        );
        let listed = Selection::parse("qemu-kvm").unwrap();
        assert_eq!(listed.gate(Cell::QEMU_KVM, None).unwrap(), Gate::Run);
        let e = listed.gate(Cell::QEMU_KVM, pvm()).unwrap_err().to_string();
        assert!(e.contains("asks for qemu-kvm") && e.contains("PVM"), "{e}");
        match listed.gate(Cell::QEMU_TCG, None).unwrap() {
            Gate::Skip(why) => assert!(why.contains("not selected (VDEVLAB_CELLS=qemu-kvm)")),
            g => panic!("{g:?}"),
        }
    }

    #[test]
    fn outcomes_sum_up_per_cell() {
        let t = |cell: Cell, v: Verdict, why: Option<&str>| {
            CellTest::new(
                "walking_skeleton::trixie::x::blocking_rx",
                cell,
                v,
                why.map(String::from),
            )
        };
        let pvm = "qemu-kvm needs KVM: /dev/kvm is PVM";
        let tests = [
            t(Cell::QEMU_TCG, Verdict::Pass, None),
            t(Cell::QEMU_TCG, Verdict::Pass, None),
            t(Cell::QEMU_KVM, Verdict::Skip, Some(pvm)),
            t(Cell::QEMU_KVM, Verdict::Skip, Some(pvm)),
            t(
                Cell::CLOUD_HYPERVISOR_KVM,
                Verdict::Fail,
                Some("the guest reset"),
            ),
        ];
        let sums = summarize(&tests);
        assert_eq!(
            sums.iter().map(|s| s.verdict()).collect::<Vec<_>>(),
            ["passed", "skipped", "FAILED", "not run", "not run", "not run"]
        );
        assert_eq!(sums[0].passed, 2);
        assert_eq!(sums[1].skip_reasons, [pvm]);
        assert_eq!(
            sums[2].failed,
            ["walking_skeleton::trixie::x::blocking_rx: the guest reset"]
        );
        let table = summary_table(&sums);
        assert!(
            table.contains("cloud-hypervisor-kvm failed: walking_skeleton::"),
            "{table}"
        );
        assert!(
            table.contains(&format!("qemu-kvm skipped: {pvm}")),
            "{table}"
        );
        assert!(!meets(&Selection::Auto, &sums));
        let tcg_only = summarize(&tests[..4]);
        assert!(meets(&Selection::Auto, &tcg_only));
        assert!(meets(&Selection::parse("qemu-tcg").unwrap(), &tcg_only));
        // A listed cell that only skipped is not ready.
        assert!(!meets(
            &Selection::parse("qemu-tcg,qemu-kvm").unwrap(),
            &tcg_only
        ));
        assert_eq!(summarize(&[])[0].verdict(), "not run");
    }
}
