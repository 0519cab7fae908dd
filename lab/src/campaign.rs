//! Fault-injection campaigns: scenario files (TOML, under `faults/`) that
//! break the emulated hardware on purpose and say what must still hold,
//! run in real guests, reported as a table, JSON and JUnit XML.
//!
//! A scenario names a receive program of the guest programs (e.g.
//! `blocking-rx`), the stream it reads (`bytes`, `seed`), the host's steps
//! once the program is waiting (inject part of the stream, inject a fault,
//! send a control request, sleep), and the expectations: what the reader
//! gets (`intact` data, `corrupted` data of the right length, or an
//! `error`), within how long, and which device counters must have moved.
//! Any kernel splat (oops, BUG, WARN, lockdep, KASAN, hung task) fails it.
//! Every scenario appends a `fault-<name>` record to `runs.jsonl`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cell::Cell;
use crate::engine;
use crate::env::{runs_dir, workspace_root, Kernel};
use crate::report;
use crate::scenario::{pattern, Expect, Outcome, Scenario, Step};
use crate::Lab;

/// One host step of a scenario file (`[[step]]`): exactly one key each
/// (serde holds it to that).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepSpec {
    /// Inject a fault (the `fault` control request's object).
    Fault(toml::Value),
    /// Inject this many bytes of the stream, or `"rest"`.
    Inject(toml::Value),
    /// Wait this long.
    SleepMs(u64),
    /// Send a raw control request (JSON).
    Control(String),
}

/// What the reader must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataExpect {
    /// Exactly the stream.
    Intact,
    /// The stream's length, different bytes (injected corruption is seen).
    Corrupted,
    /// The program fails (e.g. EIO); its data does not matter.
    Error,
}

/// `[expect]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// What the reader gets.
    pub data: DataExpect,
    /// The program's result must come within this long after the last step.
    #[serde(default)]
    pub max_ms: Option<u64>,
    /// Device counters that must be at least these values.
    #[serde(default)]
    pub stats_at_least: std::collections::BTreeMap<String, u64>,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultScenario {
    /// Name (the record is `fault-<name>`).
    pub name: String,
    /// One line: what breaks and what must hold.
    pub summary: String,
    /// Part of the fast subset that CI runs on every change.
    #[serde(default)]
    pub fast: bool,
    /// Run in a boot of its own (after the shared boot): for faults that
    /// leave the driver's device broken until it is reset, such as the
    /// hostile-device mode.
    #[serde(default)]
    pub own_boot: bool,
    /// The guest program (a receive scenario, `*-rx`).
    pub guest: String,
    /// Stream length.
    pub bytes: usize,
    /// Stream seed (the run reproduces from it).
    #[serde(default)]
    pub seed: u64,
    /// The host's steps once the program waits.
    #[serde(default)]
    pub step: Vec<StepSpec>,
    /// What must hold.
    pub expect: ExpectSpec,
    /// Where it was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

impl FaultScenario {
    /// Read and check one scenario file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut s: FaultScenario = toml::from_str(&text).map_err(|e| {
            let hint = if e.message().contains("exactly 1") {
                "\n(each [[step]] takes exactly one of fault, inject, sleep_ms, control)"
            } else {
                ""
            };
            anyhow::anyhow!("{}: not a valid fault scenario: {e}{hint}", path.display())
        })?;
        s.file = path.to_path_buf();
        if !s.guest.ends_with("-rx") {
            bail!(
                "{}: guest = {:?}: campaigns drive receive programs (*-rx) for now",
                path.display(),
                s.guest
            );
        }
        s.scenario(None)?; // catches bad injects and faults early
        Ok(s)
    }

    /// A one-line description of the faults it injects.
    pub fn faults(&self) -> String {
        let kinds: Vec<String> = self
            .step
            .iter()
            .filter_map(|s| match s {
                StepSpec::Fault(f) => f.get("kind").and_then(|k| k.as_str().map(str::to_string)),
                StepSpec::Control(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        kinds.join(", ")
    }

    /// The scenario the engine runs: the receive program (opening `dev`
    /// instead of `/dev/qw0` if given), the host's steps once it waits,
    /// and the expectations on what it read.
    pub fn scenario(&self, dev: Option<&str>) -> Result<Scenario> {
        let stream = pattern(self.seed, self.bytes);
        let mut sent = 0;
        let mut steps = vec![Step::Ready(self.guest.clone())];
        for st in &self.step {
            steps.push(match st {
                StepSpec::Fault(f) => Step::fault(serde_json::to_value(f)?)?,
                StepSpec::Inject(n) => {
                    let n = match n {
                        toml::Value::Integer(n) if *n >= 0 => *n as usize,
                        toml::Value::String(s) if s == "rest" => self.bytes - sent,
                        other => bail!("inject = {other}: a byte count or \"rest\""),
                    };
                    if sent + n > self.bytes {
                        bail!(
                            "inject: {} bytes in all, but the stream has {}",
                            sent + n,
                            self.bytes
                        );
                    }
                    sent += n;
                    Step::inject(stream[sent - n..sent].to_vec())
                }
                StepSpec::SleepMs(ms) => Step::Sleep(Duration::from_millis(*ms)),
                StepSpec::Control(c) => {
                    crate::scenario::control_request(c)?;
                    Step::control(serde_json::from_str(c)?)
                }
            });
        }
        let sha = serde_json::Value::String(hex::encode(Sha256::digest(&stream)));
        let bytes = serde_json::Value::from(self.bytes as u64);
        let (fields, fields_not) = match self.expect.data {
            DataExpect::Intact => (vec![("sha256".to_string(), sha)], vec![]),
            DataExpect::Corrupted => (
                vec![("bytes".to_string(), bytes)],
                vec![("sha256".to_string(), sha)],
            ),
            DataExpect::Error => (vec![], vec![]),
        };
        let len = self.bytes.to_string();
        let mut args = vec!["--bytes", &len, "--chunk", "4000"];
        if let Some(dev) = dev {
            args.extend(["--device", dev]);
        }
        Ok(Scenario {
            name: format!("fault-{}", self.name),
            expect: Expect {
                ok: self.expect.data != DataExpect::Error,
                fields,
                fields_not,
                counters_at_least: self
                    .expect
                    .stats_at_least
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                within: self.expect.max_ms.map(Duration::from_millis),
                ..Expect::default()
            },
            ..Scenario::program(&self.guest, &args).with_steps(steps)
        })
    }
}

/// The shipped scenarios, `faults/*.toml`, sorted by file name.
pub fn shipped() -> Result<Vec<FaultScenario>> {
    let dir = workspace_root().join("faults");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files.iter().map(|f| FaultScenario::load(f)).collect()
}

/// One scenario's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Scenario name.
    pub name: String,
    /// Faults injected.
    pub fault: String,
    /// What was expected.
    pub expected: String,
    /// What happened (`as expected`, or the problems).
    pub observed: String,
    /// Passed.
    pub pass: bool,
    /// Console lines around the first problem (kernel messages).
    pub console_excerpt: String,
    /// The saved console.
    pub console: Option<PathBuf>,
}

fn excerpt(out: &Outcome) -> String {
    let Some(path) = &out.record.console else {
        return String::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("vdevlab_qw")
                || l.contains("qw0")
                || out
                    .record
                    .driver
                    .as_ref()
                    .is_some_and(|d| l.contains(d.as_str()))
        })
        .collect();
    lines
        .iter()
        .rev()
        .take(4)
        .rev()
        .cloned()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Run `scenarios` in one boot of `kernel` in `cell` (in order), and write
/// the report (JSON and JUnit XML) under `target/lab-runs/faults/`. Returns
/// the verdicts.
pub fn run(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[FaultScenario],
) -> Result<Vec<Verdict>> {
    run_against(lab, kernel, cell, scenarios, None)
}

/// [`run`] against a user's own driver for the qw device (`vdevlab faults
/// --driver DIR`): the project's module is loaded instead of the reference
/// one, and the guest programs open the device node it makes (default
/// `/dev/qw0`). Its records name the module (`driver`).
pub fn run_against(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[FaultScenario],
    driver: Option<&crate::project::Project>,
) -> Result<Vec<Verdict>> {
    let built = driver.map(|p| p.build(kernel)).transpose()?;
    let dev = driver.and_then(|p| p.manifest.driver.dev.clone());
    let boot = |list: &[&FaultScenario]| -> Result<Vec<Outcome>> {
        let runs: Vec<Scenario> = list
            .iter()
            .map(|s| s.scenario(dev.as_deref()))
            .collect::<Result<_>>()?;
        engine::run(lab, kernel, cell, &runs, |spec| {
            if let (Some(p), Some(b)) = (driver, &built) {
                p.tune(spec, b);
            }
        })
    };
    // The scenarios that share a boot run first, in order; then each
    // `own_boot` one in a fresh guest.
    let mut outs: Vec<Option<Outcome>> = vec![None; scenarios.len()];
    let shared: Vec<usize> = (0..scenarios.len())
        .filter(|&i| !scenarios[i].own_boot)
        .collect();
    if !shared.is_empty() {
        let list: Vec<&FaultScenario> = shared.iter().map(|&i| &scenarios[i]).collect();
        for (&i, o) in shared.iter().zip(boot(&list)?) {
            outs[i] = Some(o);
        }
    }
    for (i, s) in scenarios.iter().enumerate().filter(|(_, s)| s.own_boot) {
        outs[i] = boot(&[s])?.into_iter().next();
    }
    let outs: Vec<Outcome> = outs
        .into_iter()
        .map(|o| o.context("a scenario produced no outcome"))
        .collect::<Result<_>>()?;
    let verdicts: Vec<Verdict> = scenarios
        .iter()
        .zip(&outs)
        .map(|(s, o)| Verdict {
            name: s.name.clone(),
            fault: s.faults(),
            expected: format!("{:?}", s.expect.data).to_lowercase(),
            observed: o
                .record
                .reason
                .clone()
                .unwrap_or_else(|| "as expected".into()),
            pass: o.passed(),
            console_excerpt: excerpt(o),
            console: o.record.console.clone(),
        })
        .collect();
    // A user's driver gets its own report files, beside the reference's.
    let tag = match driver {
        Some(p) => format!("{}-{}-{cell}", kernel.name, p.module),
        None => format!("{}-{cell}", kernel.name),
    };
    write_reports(kernel, cell, &tag, &verdicts)?;
    Ok(verdicts)
}

fn write_reports(kernel: &Kernel, cell: Cell, tag: &str, verdicts: &[Verdict]) -> Result<()> {
    let cases: Vec<report::Case> = verdicts
        .iter()
        .map(|v| report::Case {
            name: &v.name,
            pass: v.pass,
            message: &v.observed,
            detail: &v.console_excerpt,
            output: None,
        })
        .collect();
    report::write(
        &runs_dir().join("faults"),
        tag,
        &serde_json::json!({
            "kernel": kernel.release,
            "cell": cell.name(),
            "vmm": cell.vmm.name(),
            "accel": crate::guest::accel_name(cell.accel),
            "scenarios": verdicts,
        }),
        &report::junit(
            &format!("vdevlab-faults-{}-{cell}", kernel.name),
            &format!("faults.{}.{cell}", kernel.name),
            &cases,
        ),
    )
}

/// The readable summary table.
pub fn table(verdicts: &[Verdict]) -> String {
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.fault.clone(),
                v.expected.clone(),
                report::verdict_word(v.pass),
                v.observed.clone(),
            ]
        })
        .collect();
    report::table(
        &[
            ("scenario", 28),
            ("fault", 34),
            ("expected", 10),
            ("verdict", 7),
            ("observed", 0),
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_load() {
        let all = shipped().unwrap();
        assert!(all.len() >= 5);
        assert!(all.iter().any(|s| s.fast));
        for s in &all {
            assert!(!s.summary.is_empty(), "{}", s.name);
        }
    }

    #[test]
    fn bad_files_are_explained() {
        let dir = std::env::temp_dir().join(format!("vdevlab-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        let base = "name = \"x\"\nsummary = \"s\"\nguest = \"blocking-rx\"\nbytes = 10\n[expect]\ndata = \"intact\"\n";
        std::fs::write(&f, format!("{base}[[step]]\ninject = 11\n")).unwrap();
        assert!(format!("{:#}", FaultScenario::load(&f).unwrap_err()).contains("stream has 10"));
        std::fs::write(
            &f,
            format!("{base}[[step]]\nfault = {{ kind = \"melt\" }}\n"),
        )
        .unwrap();
        assert!(FaultScenario::load(&f).is_err());
        std::fs::write(&f, format!("{base}[[step]]\nsleep_ms = 1\ninject = 1\n")).unwrap();
        assert!(format!("{:#}", FaultScenario::load(&f).unwrap_err())
            .contains("exactly one of fault, inject"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
