//! Fault-injection campaigns: scenario files (TOML, under `faults/`) that
//! break the emulated hardware on purpose and say what must still hold,
//! run in real guests, reported as a table, JSON and JUnit XML.
//!
//! A scenario names a guest program (`guest`) of a device (`device`: the
//! qw device, default, or the `sensor`), optionally a guest kernel it needs
//! (`kernel`, e.g. `lockdep`: it then runs on that kernel, whatever the
//! campaign's), the stream it moves (`bytes`, `seed`), the host's steps once
//! the program is waiting (inject or capture part of the stream, inject a
//! fault, send a control request, wait for a later stage, a counter or a
//! console line, sleep), and the expectations (`[expect]`): what the
//! program's data must be, within how long, which device counters must
//! have moved and which fields of its result line must hold what.
//!
//! `data`:
//! - `intact`: a receive program (`*-rx`) read exactly the stream; a
//!   transmit program (`*-tx`) wrote it, and the host captured exactly it,
//!   byte for byte (what is not captured by a `capture` step is captured
//!   after the last step);
//! - `corrupted` (receive only): the stream's length, different bytes;
//! - `error`: the program must fail (e.g. EIO);
//! - `pass`: the program's own verdict decides (programs that check their
//!   own outcome, such as waiters that must end with a given errno, or the
//!   sensor's programs).
//!
//! Any kernel splat (oops, BUG, WARN, lockdep, KASAN, hung task) fails a
//! scenario. Every scenario appends a `fault-<name>` record to `runs.jsonl`.
//! Scenarios run in as few boots as they can: one per device, kernel and
//! backend arguments, plus one for each `own_boot` scenario.

use std::collections::BTreeMap;
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

/// Bytes per read()/write() of the stream programs, unless a scenario
/// says `chunk` (straddles the driver's page-sized buffers).
const DEFAULT_CHUNK: usize = 4000;

/// One host step of a scenario file (`[[step]]`): exactly one key each
/// (serde holds it to that).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepSpec {
    /// Inject a fault (the `fault` control request's object).
    Fault(toml::Value),
    /// Inject this many bytes of the stream, or `"rest"` (receive).
    Inject(toml::Value),
    /// Capture this many bytes of the stream, or `"rest"`, checked byte
    /// for byte (transmit).
    Capture(toml::Value),
    /// Wait this long.
    SleepMs(u64),
    /// Send a raw control request (JSON).
    Control(String),
    /// Wait for the program's `VDEVLAB-READY <marker>` (a later stage).
    Ready(String),
    /// Wait until a console line contains this text.
    WaitFor(String),
    /// Wait until a device counter reached a value.
    Counter {
        /// The counter (`tx_bytes`, ...).
        name: String,
        /// The value it must reach.
        at_least: u64,
    },
}

/// What the program's data must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataExpect {
    /// Exactly the stream (read, or written and captured).
    Intact,
    /// The stream's length, different bytes (injected corruption is seen).
    Corrupted,
    /// The program fails (e.g. EIO); its data does not matter.
    Error,
    /// The program's own verdict (`"ok": true`) decides.
    Pass,
}

/// Which device the scenario's guest talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// The qw device (`/dev/qw0`), the reference driver or `--driver`'s.
    #[default]
    Qw,
    /// The sampling sensor (`/dev/sensor0`, [`crate::sensor`]).
    Sensor,
}

impl DeviceKind {
    /// Its name in scenario files and reports.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Qw => "qw",
            DeviceKind::Sensor => "sensor",
        }
    }
}

/// `[expect]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectSpec {
    /// What the program's data must be.
    pub data: DataExpect,
    /// The program's result must come within this long after the last step.
    #[serde(default)]
    pub max_ms: Option<u64>,
    /// Device counters that must be at least these values.
    #[serde(default)]
    pub stats_at_least: BTreeMap<String, u64>,
    /// Result-line fields that must have exactly these values (the
    /// program's evidence, e.g. `read = "ENODEV"`).
    #[serde(default)]
    pub fields: BTreeMap<String, toml::Value>,
    /// Numeric result-line fields that must be at least these values (a
    /// dotted name looks inside objects), e.g. `blocked_ms = 1000`.
    #[serde(default)]
    pub fields_at_least: BTreeMap<String, f64>,
    /// Texts that must each appear in the console between the program's
    /// READY and its result, kernel messages included (a driver's warning).
    #[serde(default)]
    pub output: Vec<String>,
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
    /// Run in a boot of its own (after the shared boots): for faults that
    /// leave the driver's device broken until it is reset, such as the
    /// hostile-device mode.
    #[serde(default)]
    pub own_boot: bool,
    /// The device (default: the qw device).
    #[serde(default)]
    pub device: DeviceKind,
    /// The guest kernel it needs (`lockdep`, `debug`, ...), whatever kernel
    /// the campaign runs on; absent: the campaign's.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The guest program: a stream program of the qw device (`*-rx`,
    /// `*-tx`), or any other program (with `data = "pass"` or `"error"`).
    pub guest: String,
    /// More arguments for the program (after the stream's).
    #[serde(default)]
    pub args: Vec<String>,
    /// More arguments for the device backend (sensor: e.g. `--seed 7`).
    #[serde(default)]
    pub backend_args: Vec<String>,
    /// Stream length (stream programs; 0 for the others).
    #[serde(default)]
    pub bytes: usize,
    /// Stream seed (the run reproduces from it).
    #[serde(default)]
    pub seed: u64,
    /// Bytes per read()/write() (default 4000).
    #[serde(default)]
    pub chunk: Option<usize>,
    /// The host's steps once the program waits.
    #[serde(default)]
    pub step: Vec<StepSpec>,
    /// What must hold.
    pub expect: ExpectSpec,
    /// More words for the guest kernel's command line (qw device), e.g.
    /// `["kmemleak=on"]` for a detector the kernel has built in but off;
    /// scenarios with different ones boot apart.
    #[serde(default)]
    pub kernel_args: Vec<String>,
    /// Where it was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

/// Which way a scenario's stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    /// A receive program: the host injects.
    Rx,
    /// A transmit program: the host captures.
    Tx,
    /// Any other program: no stream arguments.
    Other,
}

impl FaultScenario {
    /// Read and check one scenario file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path).with_context(|| format!("{}", path.display()))
    }

    /// Parse and check the text of a scenario file read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut s: FaultScenario = toml::from_str(text).map_err(|e| {
            let hint = if e.message().contains("exactly 1") {
                "\n(each [[step]] takes exactly one of fault, inject, capture, sleep_ms, control, ready, wait_for, counter)"
            } else {
                ""
            };
            anyhow::anyhow!("not a valid fault scenario: {e}{hint}")
        })?;
        s.file = path.to_path_buf();
        s.check()?;
        s.scenario(None)?; // catches bad injects, captures and faults early
        Ok(s)
    }

    fn flow(&self) -> Flow {
        match self.device {
            DeviceKind::Qw if self.guest.ends_with("-rx") => Flow::Rx,
            DeviceKind::Qw if self.guest.ends_with("-tx") => Flow::Tx,
            _ => Flow::Other,
        }
    }

    /// The combinations that make no sense, explained.
    fn check(&self) -> Result<()> {
        let data = self.expect.data;
        let stream = matches!(data, DataExpect::Intact | DataExpect::Corrupted);
        if let Some(k) = &self.kernel {
            if k.is_empty() || k.contains(char::is_whitespace) {
                bail!("kernel = {k:?}: a guest kernel's name, e.g. \"lockdep\"");
            }
        }
        match (self.flow(), data) {
            (Flow::Other, _) if stream => bail!(
                "guest = {:?} on the {} device with data = {:?}: only the qw device's stream \
                 programs (*-rx, *-tx) move a stream the host can check; use data = \"pass\" \
                 (the program's own verdict) or \"error\"",
                self.guest,
                self.device.name(),
                format!("{data:?}").to_lowercase()
            ),
            (Flow::Tx, DataExpect::Corrupted) => bail!(
                "data = \"corrupted\" is for receive programs; a transmit program's capture is \
                 checked byte for byte (data = \"intact\")"
            ),
            (Flow::Rx | Flow::Tx, _) if stream && self.bytes == 0 => {
                bail!("bytes = 0: a stream scenario needs a stream length")
            }
            _ => {}
        }
        if self.device == DeviceKind::Sensor && self.bytes != 0 {
            bail!(
                "bytes = {}: the sensor's programs take no stream",
                self.bytes
            );
        }
        for st in &self.step {
            match (st, self.flow()) {
                (StepSpec::Capture(_), Flow::Rx | Flow::Other) => bail!(
                    "capture steps take what a transmit program (*-tx) wrote; {} writes no stream",
                    self.guest
                ),
                (StepSpec::Inject(_), Flow::Tx) => bail!(
                    "inject steps feed a reader; {} is a transmit program (use capture)",
                    self.guest
                ),
                (StepSpec::Inject(_), Flow::Other) if self.device == DeviceKind::Sensor => {
                    bail!("inject steps feed the qw device; the sensor makes its own samples")
                }
                _ => {}
            }
        }
        if let Some(0) = self.chunk {
            bail!("chunk = 0: at least 1 byte per call");
        }
        if let Some(a) = self
            .kernel_args
            .iter()
            .find(|a| a.is_empty() || a.contains(char::is_whitespace) || a.contains('"'))
        {
            bail!("kernel_args: {a:?} is not one command-line word");
        }
        if self.device == DeviceKind::Sensor && !self.kernel_args.is_empty() {
            bail!("kernel_args: only qw boots take kernel arguments for now");
        }
        Ok(())
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

    /// The kernel it runs on when the campaign runs on `campaign`.
    pub fn kernel_name<'a>(&'a self, campaign: &'a str) -> &'a str {
        self.kernel.as_deref().unwrap_or(campaign)
    }

    /// A byte count of the stream from a step's value (`"rest"`: what is
    /// left after `done`).
    fn count(&self, what: &str, v: &toml::Value, done: usize) -> Result<usize> {
        let n = match v {
            toml::Value::Integer(n) if *n >= 0 => *n as usize,
            toml::Value::String(s) if s == "rest" => self.bytes - done,
            other => bail!("{what} = {other}: a byte count or \"rest\""),
        };
        if done + n > self.bytes {
            bail!(
                "{what}: {} bytes in all, but the stream has {}",
                done + n,
                self.bytes
            );
        }
        Ok(n)
    }

    /// The host's steps: the program's READY, then the file's steps (and,
    /// for a transmit program expected to finish, the capture of what no
    /// step captured).
    fn steps(&self, stream: &[u8]) -> Result<Vec<Step>> {
        let (mut sent, mut got) = (0, 0);
        let mut steps = vec![Step::Ready(self.guest.clone())];
        for st in &self.step {
            steps.push(match st {
                StepSpec::Fault(f) => Step::fault(serde_json::to_value(f)?)?,
                StepSpec::Inject(n) => {
                    let n = self.count("inject", n, sent)?;
                    sent += n;
                    Step::inject(stream[sent - n..sent].to_vec())
                }
                StepSpec::Capture(n) => {
                    let n = self.count("capture", n, got)?;
                    got += n;
                    Step::capture(stream[got - n..got].to_vec())
                }
                StepSpec::SleepMs(ms) => Step::Sleep(Duration::from_millis(*ms)),
                StepSpec::Control(c) => {
                    if self.device == DeviceKind::Qw {
                        crate::scenario::control_request(c)?;
                    }
                    Step::control(
                        serde_json::from_str(c).with_context(|| format!("control = {c:?}"))?,
                    )
                }
                StepSpec::Ready(m) => Step::Ready(m.clone()),
                StepSpec::WaitFor(t) => Step::WaitFor(t.clone()),
                StepSpec::Counter { name, at_least } => Step::Counter {
                    name: name.clone(),
                    at_least: *at_least,
                },
            });
        }
        if self.flow() == Flow::Tx && self.expect.data != DataExpect::Error && got < self.bytes {
            steps.push(Step::capture(stream[got..].to_vec()));
        }
        Ok(steps)
    }

    /// The program's command line: the stream's arguments for a stream
    /// program (and `--device dev` for a user's qw driver), then `args`.
    fn args(&self, dev: Option<&str>) -> Vec<String> {
        let mut args = Vec::new();
        if self.flow() != Flow::Other || (self.device == DeviceKind::Qw && self.bytes > 0) {
            args.extend([
                "--bytes".to_string(),
                self.bytes.to_string(),
                "--chunk".into(),
                self.chunk.unwrap_or(DEFAULT_CHUNK).to_string(),
            ]);
        }
        if self.flow() == Flow::Tx {
            args.extend(["--seed".into(), self.seed.to_string()]);
        }
        if let (DeviceKind::Qw, Some(dev)) = (self.device, dev) {
            args.extend(["--device".into(), dev.to_string()]);
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// The scenario the engine runs: the program (opening `dev` instead
    /// of `/dev/qw0` if given, for the qw device), the host's steps once
    /// it waits, and the expectations on its data and result.
    pub fn scenario(&self, dev: Option<&str>) -> Result<Scenario> {
        let stream = pattern(self.seed, self.bytes);
        let steps = self.steps(&stream)?;
        let sha = serde_json::Value::String(hex::encode(Sha256::digest(&stream)));
        let bytes = serde_json::Value::from(self.bytes as u64);
        let (mut fields, fields_not) = match self.expect.data {
            DataExpect::Intact => (
                vec![("bytes".to_string(), bytes), ("sha256".to_string(), sha)],
                vec![],
            ),
            DataExpect::Corrupted => (
                vec![("bytes".to_string(), bytes)],
                vec![("sha256".to_string(), sha)],
            ),
            DataExpect::Error | DataExpect::Pass => (vec![], vec![]),
        };
        for (k, v) in &self.expect.fields {
            fields.push((k.clone(), serde_json::to_value(v)?));
        }
        let args = self.args(dev);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
                fields_at_least: self
                    .expect
                    .fields_at_least
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect(),
                output: self.expect.output.clone(),
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
    /// The device it ran against (`qw`, `sensor`).
    pub device: String,
    /// The guest kernel it ran on (its name in the lab).
    pub kernel: String,
    /// That kernel's release (absent when the lab does not have it).
    pub kernel_release: Option<String>,
    /// Whether the scenario itself asked for that kernel (`kernel = ...`).
    pub kernel_pinned: bool,
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
                || l.contains("vdevlab_sensor")
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

/// Run `scenarios` on `kernel` (those that name a kernel of their own on
/// that one) in `cell`, in as few boots as they allow, and write the report
/// (JSON and JUnit XML) under `target/lab-runs/faults/`. Returns the
/// verdicts, in the scenarios' order.
pub fn run(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[FaultScenario],
) -> Result<Vec<Verdict>> {
    run_against(lab, kernel, cell, scenarios, None)
}

/// Which scenarios share a boot: the same device, kernel and backend
/// arguments, and none of them `own_boot`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BootKey {
    device: DeviceKind,
    kernel: String,
    backend_args: Vec<String>,
    /// The index of an `own_boot` scenario.
    alone: Option<usize>,
    /// Kernel command-line words.
    kernel_args: Vec<String>,
}

/// The boots for `scenarios` on campaign kernel `campaign`, each with the
/// indices of its scenarios: the shared boots in the order their first
/// scenario comes, then one per `own_boot` scenario.
fn plan(scenarios: &[FaultScenario], campaign: &str) -> Vec<(BootKey, Vec<usize>)> {
    let mut boots: Vec<(BootKey, Vec<usize>)> = Vec::new();
    let key = |i: usize, s: &FaultScenario| BootKey {
        device: s.device,
        kernel: s.kernel_name(campaign).to_string(),
        backend_args: s.backend_args.clone(),
        alone: s.own_boot.then_some(i),
        kernel_args: s.kernel_args.clone(),
    };
    for (i, s) in scenarios.iter().enumerate().filter(|(_, s)| !s.own_boot) {
        let k = key(i, s);
        match boots.iter_mut().find(|(b, _)| *b == k) {
            Some((_, list)) => list.push(i),
            None => boots.push((k, vec![i])),
        }
    }
    for (i, s) in scenarios.iter().enumerate().filter(|(_, s)| s.own_boot) {
        boots.push((key(i, s), vec![i]));
    }
    boots
}

/// What the boots of one campaign share: the lab, the cell, a user's qw
/// driver (built per kernel on demand) and the sensor (built on demand).
struct Runner<'a> {
    lab: &'a Lab,
    cell: Cell,
    driver: Option<&'a crate::project::Project>,
    built: BTreeMap<String, crate::project::Built>,
    sensor: Option<crate::sensor::SensorArtifacts>,
}

impl Runner<'_> {
    /// Boot `kernel` for `list` (scenarios of one [`BootKey`]).
    fn boot(
        &mut self,
        kernel: &Kernel,
        key: &BootKey,
        list: &[&FaultScenario],
    ) -> Result<Vec<Outcome>> {
        let dev = match key.device {
            DeviceKind::Qw => self.driver.and_then(|p| p.manifest.driver.dev.clone()),
            DeviceKind::Sensor => None,
        };
        let runs: Vec<Scenario> = list
            .iter()
            .map(|s| s.scenario(dev.as_deref()))
            .collect::<Result<_>>()?;
        match key.device {
            DeviceKind::Qw => {
                if let Some(p) = self.driver {
                    if !self.built.contains_key(&kernel.name) {
                        self.built.insert(kernel.name.clone(), p.build(kernel)?);
                    }
                }
                let built = self.built.get(&kernel.name);
                let driver = self.driver;
                engine::run(self.lab, kernel, self.cell, &runs, |spec| {
                    if let (Some(p), Some(b)) = (driver, built) {
                        p.tune(spec, b);
                    }
                    spec.kernel_args.extend(key.kernel_args.iter().cloned());
                })
            }
            DeviceKind::Sensor => {
                if self.sensor.is_none() {
                    self.sensor = Some(crate::sensor::prepare(self.lab)?);
                }
                let art = self.sensor.as_ref().context("the sensor was just built")?;
                crate::sensor::run(self.lab, art, kernel, self.cell, &runs, &key.backend_args)
            }
        }
    }
}

/// [`run`] against a user's own driver for the qw device (`vdevlab faults
/// --driver DIR`): the project's module is loaded instead of the reference
/// one, and the guest programs open the device node it makes (default
/// `/dev/qw0`). Its records name the module (`driver`). Sensor scenarios
/// run against the reference sensor driver.
pub fn run_against(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[FaultScenario],
    driver: Option<&crate::project::Project>,
) -> Result<Vec<Verdict>> {
    let mut runner = Runner {
        lab,
        cell,
        driver,
        built: BTreeMap::new(),
        sensor: None,
    };
    let mut verdicts: Vec<Option<Verdict>> = vec![None; scenarios.len()];
    for (key, idx) in plan(scenarios, &kernel.name) {
        let list: Vec<&FaultScenario> = idx.iter().map(|&i| &scenarios[i]).collect();
        let on = match lab.env.kernel(&key.kernel) {
            Ok(k) => k.clone(),
            Err(e) => {
                // Not provisioned: each of its scenarios fails, saying how
                // to get the kernel (no silent skip).
                for &i in &idx {
                    verdicts[i] = Some(unrun(&scenarios[i], &key.kernel, &format!("{e:#}")));
                }
                continue;
            }
        };
        let outs = runner.boot(&on, &key, &list)?;
        for (&i, o) in idx.iter().zip(&outs) {
            verdicts[i] = Some(verdict(&scenarios[i], &on, o));
        }
    }
    let verdicts: Vec<Verdict> = verdicts
        .into_iter()
        .map(|v| v.context("a scenario produced no outcome"))
        .collect::<Result<_>>()?;
    // A user's driver gets its own report files, beside the reference's.
    let tag = match driver {
        Some(p) => format!("{}-{}-{cell}", kernel.name, p.module),
        None => format!("{}-{cell}", kernel.name),
    };
    write_reports(kernel, cell, &tag, &verdicts)?;
    Ok(verdicts)
}

fn verdict(s: &FaultScenario, kernel: &Kernel, o: &Outcome) -> Verdict {
    Verdict {
        name: s.name.clone(),
        device: s.device.name().into(),
        kernel: kernel.name.clone(),
        kernel_release: Some(kernel.release.clone()),
        kernel_pinned: s.kernel.is_some(),
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
    }
}

/// The verdict of a scenario whose kernel the lab does not have.
fn unrun(s: &FaultScenario, kernel: &str, why: &str) -> Verdict {
    Verdict {
        name: s.name.clone(),
        device: s.device.name().into(),
        kernel: kernel.to_string(),
        kernel_release: None,
        kernel_pinned: s.kernel.is_some(),
        fault: s.faults(),
        expected: format!("{:?}", s.expect.data).to_lowercase(),
        observed: format!("not run: it needs the guest kernel '{kernel}': {why}"),
        pass: false,
        console_excerpt: String::new(),
        console: None,
    }
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
            "kernel_name": kernel.name,
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

/// The readable summary table. A scenario that ran on a kernel of its own
/// (`kernel = ...`) or on the sensor says so in its `on` column.
pub fn table(verdicts: &[Verdict]) -> String {
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            let pin = if v.kernel_pinned { "*" } else { "" };
            vec![
                v.name.clone(),
                format!("{}/{}{pin}", v.device, v.kernel),
                v.fault.clone(),
                v.expected.clone(),
                report::verdict_word(v.pass),
                v.observed.clone(),
            ]
        })
        .collect();
    let mut t = report::table(
        &[
            ("scenario", 28),
            ("on", 16),
            ("fault", 34),
            ("expected", 10),
            ("verdict", 7),
            ("observed", 0),
        ],
        &rows,
    );
    if verdicts.iter().any(|v| v.kernel_pinned) {
        t.push_str("(* the scenario's own kernel, `kernel = ...`)\n");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<FaultScenario> {
        FaultScenario::parse(text, Path::new("test.toml"))
    }

    fn err(text: &str) -> String {
        format!("{:#}", parsed(text).unwrap_err())
    }

    const RX: &str = "name = \"x\"\nsummary = \"s\"\nguest = \"blocking-rx\"\nbytes = 10\n";
    const TX: &str = "name = \"t\"\nsummary = \"s\"\nguest = \"poll-tx\"\nbytes = 10\nseed = 3\n";

    #[test]
    fn shipped_scenarios_load() {
        let all = shipped().unwrap();
        assert!(all.len() >= 5);
        assert!(all.iter().any(|s| s.fast));
        for s in &all {
            assert!(!s.summary.is_empty(), "{}", s.name);
        }
        let mut names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "two scenarios share a name");
    }

    #[test]
    fn bad_files_are_explained() {
        let dir = std::env::temp_dir().join(format!("vdevlab-faults-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        let base = format!("{RX}[expect]\ndata = \"intact\"\n");
        std::fs::write(&f, format!("{base}[[step]]\ninject = 11\n")).unwrap();
        let e = format!("{:#}", FaultScenario::load(&f).unwrap_err());
        assert!(e.contains("stream has 10") && e.contains("bad.toml"), "{e}");
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

    #[test]
    fn transmit_scenarios_capture_the_stream_byte_for_byte() {
        let s = parsed(&format!(
            "{TX}[[step]]\nfault = {{ kind = \"stall\", queue = \"tx\", duration_ms = 5 }}\n\
             [[step]]\ncapture = 4\n[expect]\ndata = \"intact\"\n"
        ))
        .unwrap();
        let sc = s.scenario(None).unwrap();
        assert_eq!(
            sc.command,
            ["poll-tx", "--bytes", "10", "--chunk", "4000", "--seed", "3"]
        );
        let stream = pattern(3, 10);
        // Ready, the fault, the capture step, then the rest captured.
        assert_eq!(sc.steps.len(), 4);
        assert_eq!(sc.steps[2], Step::capture(stream[..4].to_vec()));
        assert_eq!(sc.steps[3], Step::capture(stream[4..].to_vec()));
        let names: Vec<&str> = sc.expect.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["bytes", "sha256"]);
        assert!(sc.expect.ok);
        // Everything captured by steps: nothing added.
        let all = parsed(&format!(
            "{TX}[[step]]\ncapture = \"rest\"\n[expect]\ndata = \"intact\"\n"
        ))
        .unwrap();
        assert_eq!(all.scenario(None).unwrap().steps.len(), 2);
        // A writer expected to fail is not drained.
        let e = parsed(&format!("{TX}[expect]\ndata = \"error\"\n")).unwrap();
        assert_eq!(e.scenario(None).unwrap().steps.len(), 1);
        assert!(err(&format!(
            "{TX}[[step]]\ninject = 1\n[expect]\ndata = \"intact\"\n"
        ))
        .contains("use capture"));
        assert!(err(&format!(
            "{RX}[[step]]\ncapture = 1\n[expect]\ndata = \"intact\"\n"
        ))
        .contains("transmit program"));
        assert!(err(&format!("{TX}[expect]\ndata = \"corrupted\"\n")).contains("byte for byte"));
        assert!(err(&format!(
            "{TX}[[step]]\ncapture = 11\n[expect]\ndata = \"intact\"\n"
        ))
        .contains("stream has 10"));
    }

    #[test]
    fn pass_scenarios_leave_the_verdict_to_the_program_and_check_its_evidence() {
        let s = parsed(
            "name = \"w\"\nsummary = \"s\"\nguest = \"waiters-removal\"\nargs = [\"--x\", \"1\"]\n\
             [[step]]\nready = \"waiters-removal-2\"\n[[step]]\nwait_for = \"armed\"\n\
             [[step]]\ncounter = { name = \"tx_bytes\", at_least = 5 }\n\
             [expect]\ndata = \"pass\"\nfields = { read = \"ENODEV\" }\n\
             fields_at_least = { blocked_ms = 1000, \"evidence.polls\" = 2 }\n\
             output = [\"woken\"]\n",
        )
        .unwrap();
        let sc = s.scenario(Some("/dev/mine0")).unwrap();
        assert_eq!(
            sc.command,
            ["waiters-removal", "--device", "/dev/mine0", "--x", "1"]
        );
        assert!(sc.expect.ok);
        assert_eq!(
            sc.expect.fields,
            [("read".to_string(), serde_json::json!("ENODEV"))]
        );
        assert_eq!(
            sc.expect.fields_at_least,
            [
                ("blocked_ms".to_string(), 1000.0),
                ("evidence.polls".to_string(), 2.0)
            ]
        );
        assert_eq!(sc.expect.output, ["woken"]);
        assert_eq!(sc.steps[1], Step::Ready("waiters-removal-2".into()));
        assert_eq!(sc.steps[2], Step::WaitFor("armed".into()));
        assert_eq!(
            sc.steps[3],
            Step::Counter {
                name: "tx_bytes".into(),
                at_least: 5
            }
        );
        // Only stream programs have data the host can check.
        assert!(
            err("name = \"w\"\nsummary = \"s\"\nguest = \"teardown-unbind\"\n[expect]\ndata = \"intact\"\n")
                .contains("data = \"pass\"")
        );
        assert!(err(&format!("{RX}[expect]\ndata = \"pass\"\nbogus = 1\n")).contains("bogus"));
    }

    #[test]
    fn sensor_and_kernel_keys() {
        let s = parsed(
            "name = \"c\"\nsummary = \"s\"\ndevice = \"sensor\"\nkernel = \"lockdep\"\n\
             guest = \"sensor-stream\"\nargs = [\"--rate\", \"200\"]\nbackend_args = [\"--seed\", \"7\"]\n\
             [[step]]\ncontrol = '{\"op\":\"set_rate_reply\",\"status\":1}'\n[expect]\ndata = \"pass\"\n",
        )
        .unwrap();
        assert_eq!(s.device, DeviceKind::Sensor);
        assert_eq!(s.kernel_name("trixie"), "lockdep");
        let sc = s.scenario(Some("/dev/qwX")).unwrap();
        // No stream arguments, and the qw device node is not the sensor's.
        assert_eq!(sc.command, ["sensor-stream", "--rate", "200"]);
        // The sensor's own control requests are not checked against qw's.
        assert!(matches!(sc.steps[1], Step::Control { .. }));
        let qw = parsed(&format!("{RX}[expect]\ndata = \"intact\"\n")).unwrap();
        assert_eq!(qw.device, DeviceKind::Qw);
        assert_eq!(qw.kernel_name("trixie"), "trixie");
        assert!(
            err(&format!("{RX}kernel = \"\"\n[expect]\ndata = \"intact\"\n"))
                .contains("guest kernel's name")
        );
        assert!(err(
            "name = \"c\"\nsummary = \"s\"\ndevice = \"sensor\"\nguest = \"sensor-stream\"\n[expect]\ndata = \"intact\"\n"
        )
        .contains("sensor device"));
        assert!(err(
            "name = \"c\"\nsummary = \"s\"\ndevice = \"toaster\"\nguest = \"x\"\n[expect]\ndata = \"pass\"\n"
        )
        .contains("toaster"));
    }

    #[test]
    fn boots_are_planned_by_device_kernel_and_own_boot() {
        let mk = |name: &str, extra: &str| {
            parsed(&format!(
                "name = \"{name}\"\nsummary = \"s\"\nguest = \"sensor-stream\"\n{extra}[expect]\ndata = \"pass\"\n"
            ))
            .unwrap()
        };
        let list = [
            mk("a", ""),
            mk("b", "device = \"sensor\"\n"),
            mk("c", "own_boot = true\n"),
            mk("d", "kernel = \"lockdep\"\n"),
            mk("e", ""),
            mk(
                "f",
                "device = \"sensor\"\nbackend_args = [\"--seed\", \"1\"]\n",
            ),
            mk("g", "kernel = \"trixie\"\n"),
        ];
        let plan = plan(&list, "trixie");
        let got: Vec<(&str, &str, Vec<usize>)> = plan
            .iter()
            .map(|(k, v)| (k.device.name(), k.kernel.as_str(), v.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("qw", "trixie", vec![0, 4, 6]),
                ("sensor", "trixie", vec![1]),
                ("qw", "lockdep", vec![3]),
                ("sensor", "trixie", vec![5]),
                ("qw", "trixie", vec![2]),
            ]
        );
        assert_eq!(plan[4].0.alone, Some(2));
    }

    #[test]
    fn the_table_says_where_each_scenario_ran() {
        let s = parsed(&format!(
            "{RX}kernel = \"lockdep\"\n[expect]\ndata = \"intact\"\n"
        ))
        .unwrap();
        let v = unrun(&s, "lockdep", "no guest kernel 'lockdep' in the lab");
        assert!(!v.pass);
        assert!(v.observed.contains("needs the guest kernel 'lockdep'"));
        let t = table(&[v]);
        assert!(t.contains("qw/lockdep*"), "{t}");
        assert!(t.contains("the scenario's own kernel"), "{t}");
    }

    #[test]
    fn kernel_arguments_boot_apart() {
        let other =
            "name = \"o\"\nsummary = \"s\"\nguest = \"alloc-faults\"\nkernel = \"lockdep\"\n";
        let with = format!("{other}kernel_args = [\"kmemleak=on\"]\n[expect]\ndata = \"pass\"\n");
        let a = parsed(&with).unwrap();
        assert_eq!(a.kernel_args, ["kmemleak=on"]);
        let b = parsed(&format!("{other}[expect]\ndata = \"pass\"\n")).unwrap();
        let boots = plan(&[a, b], "trixie");
        assert_eq!(boots.len(), 2, "{boots:?}");
        assert_eq!(boots[0].0.kernel_args, ["kmemleak=on"]);
        let bad = format!("{other}kernel_args = [\"a b\"]\n[expect]\ndata = \"pass\"\n");
        assert!(err(&bad).contains("not one command-line word"));
    }
}
