//! A user's own driver and tests ("bring your own"): a folder with a
//! manifest, `vdevlab.toml`, naming an out-of-tree kernel module (a Kbuild
//! folder), the device to attach (the shipped qw device, or the user's own
//! vhost-user backend), files and programs to put into the guest, and
//! scenarios: shell commands run in the guest with the exit status and
//! output they must give, and host steps (inject, control requests,
//! faults, host commands) while they run.
//!
//! [`Project::run`] builds the module against each selected lab kernel the
//! way the reference driver is built (W=1, the kernel's own compiler; a
//! warning fails unless the manifest allows it), packs it and the files
//! into an initramfs archive laid over the lab's, boots once per kernel,
//! loads the module, runs every scenario in order, and gives each one a
//! run record (`<project>/<scenario>` in `runs.jsonl`), with the console
//! kept and scanned for kernel splats like every other run. Reports go to
//! `target/lab-runs/user/<project>/` (JSON and JUnit XML).
//!
//! A folder without a manifest but with a `Kbuild` file is a driver alone
//! (module name from its `obj-m`): enough for `vdevlab faults --driver`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use vdevlab_guest::protocol;

use crate::artifacts::{build_module, check_module, write_archive};
use crate::cell::Cell;
use crate::env::{runs_dir, target_dir, Kernel};
use crate::guest::{BackendCommand, BootSpec, GuestDriver};
use crate::report;
use crate::scenario::{fault_request, Expect, Scenario, Step};
use crate::Lab;

/// The manifest's file name.
pub const MANIFEST: &str = "vdevlab.toml";

/// `vdevlab.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The project's name (records, reports); default: the folder's name.
    #[serde(default)]
    pub name: Option<String>,
    /// Guest kernels to run on (`trixie`, `bookworm`, ...); default: the
    /// lab's default kernel.
    #[serde(default)]
    pub kernels: Vec<String>,
    /// Host commands run (`sh -c`) in the project folder before anything
    /// else, e.g. to build the guest programs or the backend.
    #[serde(default)]
    pub prepare: Vec<String>,
    /// The driver module.
    pub driver: DriverSpec,
    /// The device; default: the shipped qw device.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Files and folders to put into the guest.
    #[serde(default)]
    pub file: Vec<FileSpec>,
    /// The scenarios, run in this order in one boot per kernel.
    #[serde(default)]
    pub scenario: Vec<ScenarioSpec>,
}

/// `[driver]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverSpec {
    /// The Kbuild folder, relative to the project (default: the project).
    #[serde(default)]
    pub src: Option<PathBuf>,
    /// The module's name (`<module>.ko`); default: the first `obj-m` of the
    /// folder's Kbuild (or Makefile).
    #[serde(default)]
    pub module: Option<String>,
    /// Module parameters, `name=value` each.
    #[serde(default)]
    pub params: Vec<String>,
    /// The device node the driver makes; init waits for it after loading
    /// the module. Default: no wait.
    #[serde(default)]
    pub dev: Option<String>,
    /// Let compiler (W=1) and sparse warnings pass. Default: a warning
    /// fails the build, as for the reference driver.
    #[serde(default)]
    pub allow_warnings: bool,
}

/// `[device]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Virtio device id presented to the guest (1..=41 with QEMU's generic
    /// device); default: the qw device's, 21.
    #[serde(default)]
    pub virtio_id: Option<u16>,
    /// Your own vhost-user backend: program and arguments, relative paths
    /// from the project folder. `{socket}` becomes the vhost-user socket it
    /// must listen on, `{control}` a control socket (waited for, and used by
    /// `control`/`inject`/`capture`/`fault` steps if it speaks the qw
    /// control protocol), `{run}` the run folder. Default: the shipped qw
    /// device (`vdevlab-qw`).
    #[serde(default)]
    pub backend: Vec<String>,
    /// Queue sizes of your backend's device, one per queue (default: two
    /// queues of 256).
    #[serde(default)]
    pub queue_sizes: Vec<u16>,
    /// Config space size in bytes of your backend's device (default 0).
    #[serde(default)]
    pub config_size: Option<u32>,
}

/// `[[file]]`: a file or folder copied into the guest's initramfs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Host path, relative to the project folder.
    pub src: PathBuf,
    /// Absolute guest path (a folder's files go below it).
    pub dest: String,
    /// Permission bits (e.g. `0o755`); default: 0755 if the host file is
    /// executable, else 0644.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// `[[scenario]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioSpec {
    /// Name: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// Shell commands run in the guest (busybox sh, stdin /dev/null).
    pub run: String,
    /// The exit status it must end with.
    #[serde(default)]
    pub status: i32,
    /// The guest kills it after this long (and the host gives up a little
    /// later).
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Texts that must each appear in its output.
    #[serde(default)]
    pub expect_output: Vec<String>,
    /// Host steps, in order, once the command has started.
    #[serde(default)]
    pub step: Vec<StepSpec>,
}

fn default_timeout() -> u64 {
    60
}

/// One host step: exactly one action (serde holds it to that), and
/// `reply` beside `control` or `fault`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct StepSpec {
    /// What the host does.
    pub action: Action,
    /// With `control` or `fault`: fields the reply must have, with these
    /// values; a dotted name looks inside objects (a `stats` reply:
    /// `reply = { "stats.tx_bytes" = 4 }`).
    pub reply: Option<toml::Table>,
}

/// A host step's action, one key of `[[scenario.step]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Wait until a console line contains this text.
    WaitFor(String),
    /// Wait this long.
    SleepMs(u64),
    /// Inject this text into the device (qw control plane).
    Inject(String),
    /// Inject these bytes, hex.
    InjectHex(String),
    /// Capture from the device until this text has come, which must match.
    Capture(String),
    /// Inject a fault (`docs/device-spec.md`, "Injected faults").
    Fault(toml::Value),
    /// A raw control request (one JSON object); its reply must be `ok`.
    Control(String),
    /// A host command (`sh -c`, in the project folder) that must exit 0.
    /// It gets `VDEVLAB_CONTROL` (the control socket), `VDEVLAB_SOCKET`
    /// (the vhost-user socket) and `VDEVLAB_RUN_DIR`.
    Host(String),
}

impl TryFrom<toml::Table> for StepSpec {
    type Error = String;

    fn try_from(mut t: toml::Table) -> Result<Self, String> {
        let reply = match t.remove("reply") {
            None => None,
            Some(toml::Value::Table(r)) => Some(r),
            Some(_) => return Err("reply is a table of fields".into()),
        };
        let action = Action::deserialize(toml::Value::Table(t)).map_err(|e| {
            if e.message().contains("exactly 1") {
                "exactly one of wait_for, sleep_ms, inject, inject_hex, capture, fault, \
                 control, host"
                    .to_string()
            } else {
                e.message().to_string()
            }
        })?;
        if reply.is_some() && !matches!(action, Action::Control(_) | Action::Fault(_)) {
            return Err("reply goes with control or fault".into());
        }
        Ok(StepSpec { action, reply })
    }
}

impl StepSpec {
    /// The engine's step (`dir`: the project folder, for host commands).
    fn step(&self, dir: &Path) -> Result<Step> {
        let reply = |req: Value| -> Result<Step> {
            let reply = self
                .reply
                .iter()
                .flatten()
                .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v)?)))
                .collect::<Result<_>>()?;
            Ok(Step::Control {
                request: req,
                reply,
            })
        };
        Ok(match &self.action {
            Action::WaitFor(t) => Step::WaitFor(t.clone()),
            Action::SleepMs(ms) => Step::Sleep(Duration::from_millis(*ms)),
            Action::Inject(t) => Step::inject(t.as_bytes().to_vec()),
            Action::InjectHex(h) => Step::inject(hex::decode(h).context("inject_hex")?),
            Action::Capture(t) => Step::capture(t.as_bytes().to_vec()),
            Action::Fault(f) => reply(fault_request(serde_json::to_value(f)?)?)?,
            Action::Control(c) => {
                let v: Value =
                    serde_json::from_str(c).with_context(|| format!("control = {c}: not JSON"))?;
                if !v.get("op").is_some_and(|op| op.is_string()) {
                    bail!("control = {c}: a JSON object with \"op\"");
                }
                reply(v)?
            }
            Action::Host(cmd) => Step::Host {
                command: cmd.clone(),
                dir: dir.to_path_buf(),
            },
        })
    }
}

/// A loaded project.
#[derive(Debug, Clone)]
pub struct Project {
    /// Its folder (absolute).
    pub dir: PathBuf,
    /// Its name.
    pub name: String,
    /// The module's name.
    pub module: String,
    /// The module's Kbuild folder (absolute).
    pub driver_src: PathBuf,
    /// The manifest (a synthesized one for a bare driver folder).
    pub manifest: Manifest,
}

/// The module a Kbuild (or Makefile) folder makes: its first `obj-m`.
pub fn kbuild_module(src: &Path) -> Result<String> {
    for f in ["Kbuild", "Makefile"] {
        let Ok(text) = std::fs::read_to_string(src.join(f)) else {
            continue;
        };
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("obj-m") {
                let rest = rest.trim_start_matches([' ', '\t', ':', '+', '=']);
                if let Some(obj) = rest.split_whitespace().next() {
                    if let Some(m) = obj.strip_suffix(".o") {
                        return Ok(m.to_string());
                    }
                }
            }
        }
    }
    bail!(
        "{}: no `obj-m := NAME.o` in a Kbuild or Makefile; name the module in [driver] module",
        src.display()
    )
}

fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("{what} {name:?}: use letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

impl Project {
    /// Load `dir/vdevlab.toml`, or treat `dir` as a bare driver folder (a
    /// `Kbuild`, no scenarios).
    pub fn load(dir: &Path) -> Result<Project> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("no project folder {}", dir.display()))?;
        let path = dir.join(MANIFEST);
        let manifest: Manifest = if path.is_file() {
            let text = std::fs::read_to_string(&path)?;
            toml::from_str(&text)
                .with_context(|| format!("{}: not a valid manifest", path.display()))?
        } else if dir.join("Kbuild").is_file() || dir.join("Makefile").is_file() {
            Manifest {
                name: None,
                kernels: Vec::new(),
                prepare: Vec::new(),
                driver: DriverSpec {
                    src: None,
                    module: None,
                    params: Vec::new(),
                    dev: None,
                    allow_warnings: false,
                },
                device: DeviceSpec::default(),
                file: Vec::new(),
                scenario: Vec::new(),
            }
        } else {
            bail!(
                "{} has neither a {MANIFEST} nor a Kbuild file (see examples/user-driver/)",
                dir.display()
            );
        };
        let driver_src = dir.join(manifest.driver.src.clone().unwrap_or_default());
        let module = match &manifest.driver.module {
            Some(m) => m.clone(),
            None => kbuild_module(&driver_src)?,
        };
        let name = manifest.name.clone().unwrap_or_else(|| {
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| module.clone())
        });
        check_name("project name", &name)?;
        check_name("module name", &module)?;
        let bad_word = |w: &str| w.is_empty() || w.contains([',', ';', ' ', '"']);
        for p in &manifest.driver.params {
            if !p.contains('=') || bad_word(p) {
                bail!("[driver] params: {p:?} must be name=value, without ',', ';', ' ' or '\"'");
            }
        }
        if let Some(d) = &manifest.driver.dev {
            if !d.starts_with('/') || bad_word(d) {
                bail!("[driver] dev = {d:?}: an absolute path, e.g. /dev/mydev0");
            }
        }
        let mut seen = BTreeSet::new();
        for s in &manifest.scenario {
            check_name("scenario name", &s.name)?;
            if !seen.insert(s.name.clone()) {
                bail!("two scenarios are named {}", s.name);
            }
            for (i, st) in s.step.iter().enumerate() {
                st.step(&dir)
                    .with_context(|| format!("scenario {} step {}", s.name, i + 1))?;
            }
        }
        for f in &manifest.file {
            if !f.dest.starts_with('/') {
                bail!("[[file]] dest = {:?}: an absolute guest path", f.dest);
            }
        }
        if !manifest.device.backend.is_empty() && manifest.device.virtio_id.is_none() {
            bail!("[device] backend is set: give its virtio_id too");
        }
        Ok(Project {
            dir,
            name,
            module,
            driver_src,
            manifest,
        })
    }

    /// The kernels to run on: `choice` (a name or `all`), else the
    /// manifest's, else the lab's default.
    pub fn kernels(&self, lab: &Lab, choice: Option<&str>) -> Result<Vec<Kernel>> {
        let names: Vec<String> = match choice {
            Some("all") => return Ok(lab.env.kernels.clone()),
            Some(k) => vec![k.to_string()],
            None if !self.manifest.kernels.is_empty() => self.manifest.kernels.clone(),
            None => vec![lab.env.default_kernel().name.clone()],
        };
        names.iter().map(|n| lab.env.kernel(n).cloned()).collect()
    }

    /// Run the manifest's `prepare` commands in the project folder.
    pub fn prepare(&self) -> Result<()> {
        for cmd in &self.manifest.prepare {
            eprintln!("[vdevlab] {}: {cmd}", self.name);
            let status = Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .status()
                .with_context(|| format!("running {cmd}"))?;
            if !status.success() {
                bail!(
                    "prepare command `{cmd}` failed ({status}) in {}",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// Where this project's builds and archives go: `target/lab/user/<name>/`.
    pub fn build_dir(&self) -> PathBuf {
        target_dir().join("lab/user").join(&self.name)
    }

    /// Build the module for `kernel` (W=1, the kernel's compiler) and pack
    /// the archive laid over the lab's initramfs: the module, the files,
    /// the scenarios and their runner.
    pub fn build(&self, kernel: &Kernel) -> Result<Built> {
        let dir = self.build_dir();
        std::fs::create_dir_all(&dir)?;
        eprintln!(
            "[vdevlab] building {} ({}) for {} ({})",
            self.module,
            self.driver_src.display(),
            kernel.name,
            kernel.release
        );
        let (ko, log, log_path) =
            build_module(kernel, &self.driver_src, &self.module, &dir, "driver")?;
        let warnings: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("warning:") || l.contains("error:"))
            .collect();
        if !warnings.is_empty() && !self.manifest.driver.allow_warnings {
            bail!(
                "{}.ko for {}: the W=1 build warns (the lab holds drivers to a warning-free \
                 build; set [driver] allow_warnings = true to let it pass); log {}:\n{}",
                self.module,
                kernel.name,
                log_path.display(),
                warnings.join("\n")
            );
        }
        let data = std::fs::read(&ko)?;
        check_module(kernel, &self.module, &data)?;
        let mut files: Vec<(String, u32, Vec<u8>)> =
            vec![(format!("lib/modules/{}.ko", self.module), 0o644, data)];
        for f in &self.manifest.file {
            let src = self.dir.join(&f.src);
            add_host_path(&src, f.dest.trim_start_matches('/'), f.mode, &mut files)
                .with_context(|| format!("[[file]] src = {}", f.src.display()))?;
        }
        files.push((
            RUNNER.trim_start_matches('/').into(),
            0o755,
            runner().into_bytes(),
        ));
        for s in &self.manifest.scenario {
            files.push((
                format!("vdevlab/scenarios/{}.sh", s.name),
                0o644,
                s.run.as_bytes().to_vec(),
            ));
        }
        let overlay = dir.join(format!("overlay-{}.cpio", kernel.release));
        write_archive(&overlay, &parent_dirs(&files), &files)?;
        Ok(Built {
            kernel: kernel.name.clone(),
            ko,
            build_log: log_path,
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
            overlay,
        })
    }

    /// Set up `spec` for this project: its module, its archive, its device.
    pub fn tune(&self, spec: &mut BootSpec, built: &Built) {
        spec.driver = Some(GuestDriver {
            module: self.module.clone(),
            dev: self.manifest.driver.dev.clone(),
        });
        spec.driver_params = self.manifest.driver.params.clone();
        spec.overlays.push(built.overlay.clone());
        let dev = &self.manifest.device;
        if let Some(id) = dev.virtio_id {
            spec.virtio_id = id;
        }
        if !dev.backend.is_empty() {
            let mut argv = dev.backend.clone();
            // A relative program path is the project's.
            if argv[0].contains('/') && !argv[0].starts_with('/') {
                argv[0] = self.dir.join(&argv[0]).to_string_lossy().into_owned();
            }
            spec.backend = Some(BackendCommand {
                argv,
                queue_sizes: if dev.queue_sizes.is_empty() {
                    vec![256, 256]
                } else {
                    dev.queue_sizes.clone()
                },
                config_size: dev.config_size.unwrap_or(0),
            });
        }
    }

    /// The engine's scenario of `s`: the harness's runner starts its
    /// commands with the guest's timeout; the host's steps once it runs;
    /// its exit status and output must be the expected ones.
    pub fn scenario(&self, s: &ScenarioSpec) -> Result<Scenario> {
        let steps = std::iter::once(Ok(Step::Ready(s.name.clone())))
            .chain(s.step.iter().map(|st| st.step(&self.dir)))
            .collect::<Result<Vec<_>>>()?;
        let timeout = Duration::from_secs(s.timeout_s);
        Ok(Scenario {
            name: format!("{}/{}", self.name, s.name),
            marker: s.name.clone(),
            command: vec![RUNNER.into(), s.name.clone(), s.timeout_s.to_string()],
            instance: 0,
            steps,
            expect: Expect {
                status: Some(s.status.into()),
                output: s.expect_output.clone(),
                ..Expect::default()
            },
            // The guest kills the commands first; the host waits a little
            // longer, for the report.
            budget: timeout + Duration::from_secs(30),
            guest_timeout: Some(timeout),
            counters: false,
            host_sha256: None,
        })
    }

    /// Build for `kernel`, boot once, run every scenario, record each, and
    /// write the reports. Returns the verdicts.
    pub fn run(&self, lab: &Lab, kernel: &Kernel, cell: Cell) -> Result<Vec<ScenarioVerdict>> {
        let built = self.build(kernel)?;
        let specs = &self.manifest.scenario;
        if specs.is_empty() {
            bail!("{}: no [[scenario]] in {MANIFEST}", self.dir.display());
        }
        let scenarios: Vec<Scenario> = specs
            .iter()
            .map(|s| self.scenario(s))
            .collect::<Result<_>>()?;
        let outs = crate::engine::run(lab, kernel, cell, &scenarios, |spec| {
            spec.scenario = self.name.clone();
            self.tune(spec, &built);
        })?;
        let verdicts: Vec<ScenarioVerdict> = specs
            .iter()
            .zip(outs)
            .map(|(s, o)| ScenarioVerdict {
                name: s.name.clone(),
                kernel: kernel.name.clone(),
                cell: cell.name().to_string(),
                status: o
                    .result
                    .as_ref()
                    .and_then(|v| v["status"].as_i64())
                    .map(|st| st as i32),
                expected_status: s.status,
                pass: o.passed(),
                observed: o
                    .record
                    .reason
                    .clone()
                    .unwrap_or_else(|| "as expected".into()),
                output: o.output,
                console: o.record.console.clone().unwrap_or_default(),
            })
            .collect();
        self.write_reports(kernel, cell, &verdicts)?;
        Ok(verdicts)
    }

    fn write_reports(
        &self,
        kernel: &Kernel,
        cell: Cell,
        verdicts: &[ScenarioVerdict],
    ) -> Result<()> {
        let cases: Vec<report::Case> = verdicts
            .iter()
            .map(|v| report::Case {
                name: &v.name,
                pass: v.pass,
                message: &v.observed,
                detail: &v.output,
                output: Some(&v.output),
            })
            .collect();
        let suite = format!("{}.{}.{cell}", self.name, kernel.name);
        report::write(
            &runs_dir().join("user").join(&self.name),
            &format!("{}-{cell}", kernel.name),
            &serde_json::json!({
                "project": self.name,
                "module": self.module,
                "kernel": kernel.release,
                "cell": cell.name(),
                "scenarios": verdicts,
            }),
            &report::junit(&suite, &suite, &cases),
        )
    }
}

/// What [`Project::build`] made for one kernel.
#[derive(Debug, Clone)]
pub struct Built {
    /// The kernel's name.
    pub kernel: String,
    /// The module.
    pub ko: PathBuf,
    /// The build's log.
    pub build_log: PathBuf,
    /// Warning lines of the build (allowed ones).
    pub warnings: Vec<String>,
    /// The archive laid over the lab's initramfs.
    pub overlay: PathBuf,
}

/// One scenario's verdict on one kernel.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioVerdict {
    /// Scenario name.
    pub name: String,
    /// Kernel name.
    pub kernel: String,
    /// The cell it ran in (`qemu-tcg`, ...).
    pub cell: String,
    /// Exit status, if it got that far.
    pub status: Option<i32>,
    /// The status it had to end with.
    pub expected_status: i32,
    /// Passed.
    pub pass: bool,
    /// `as expected`, or the problems.
    pub observed: String,
    /// What the command printed (console lines between its start and
    /// its result, kernel messages included).
    pub output: String,
    /// The saved console.
    pub console: PathBuf,
}

/// The readable table of verdicts.
pub fn table(verdicts: &[ScenarioVerdict]) -> String {
    let rows: Vec<Vec<String>> = verdicts
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.kernel.clone(),
                v.status.map_or("-".into(), |s| s.to_string()),
                report::verdict_word(v.pass),
                v.observed.clone(),
            ]
        })
        .collect();
    report::table(
        &[
            ("scenario", 24),
            ("kernel", 10),
            ("status", 8),
            ("verdict", 7),
            ("observed", 0),
        ],
        &rows,
    )
}

/// Where the runner lives in the guest.
const RUNNER: &str = "/vdevlab/run-scenario";

/// The guest side of a scenario: announce it, run its commands with a
/// timeout and stdin from /dev/null, report the exit status, in the
/// protocol's words.
fn runner() -> String {
    format!(
        r#"#!/bin/sh
# vdevlab: run one scenario of a user project (written by the harness).
name=$1; secs=$2
echo "{ready} $name"
timeout "$secs" sh "/vdevlab/scenarios/$name.sh" < /dev/null
status=$?
echo "{result} {{\"scenario\":\"$name\",\"ok\":true,\"status\":$status}}"
"#,
        ready = protocol::READY,
        result = protocol::RESULT,
    )
}

/// Add a host file (or a folder's files, recursively) at guest path `dest`.
fn add_host_path(
    src: &Path,
    dest: &str,
    mode: Option<u32>,
    files: &mut Vec<(String, u32, Vec<u8>)>,
) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(src).with_context(|| format!("no {}", src.display()))?;
    if meta.is_dir() {
        let mut entries = std::fs::read_dir(src)?.collect::<std::io::Result<Vec<_>>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            add_host_path(&e.path(), &format!("{dest}/{name}"), mode, files)?;
        }
        return Ok(());
    }
    let mode = mode.unwrap_or(if meta.permissions().mode() & 0o111 != 0 {
        0o755
    } else {
        0o644
    });
    files.push((dest.to_string(), mode, std::fs::read(src)?));
    Ok(())
}

/// Every folder the files need, parents first.
fn parent_dirs(files: &[(String, u32, Vec<u8>)]) -> Vec<String> {
    let mut dirs = BTreeSet::new();
    for (name, _, _) in files {
        let mut p = Path::new(name).parent();
        while let Some(d) = p {
            if d.as_os_str().is_empty() {
                break;
            }
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    // BTreeSet order puts "a" before "a/b".
    dirs.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(manifest: &str) -> Result<Project> {
        let dir = std::env::temp_dir().join(format!(
            "vdevlab-project-{}-{}",
            std::process::id(),
            manifest.len()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("Kbuild"), "obj-m := mydrv.o\n").unwrap();
        std::fs::write(dir.join(MANIFEST), manifest).unwrap();
        let p = Project::load(&dir);
        std::fs::remove_dir_all(&dir).ok();
        p
    }

    #[test]
    fn manifests_load_and_bad_ones_are_explained() {
        let p = project(
            "name = \"demo\"\n[driver]\nparams = [\"a=1\"]\ndev = \"/dev/my0\"\n\
             [[scenario]]\nname = \"one\"\nrun = \"cat /dev/my0\"\n\
             [[scenario.step]]\ninject = \"hi\"\n\
             [[scenario.step]]\nfault = { kind = \"drop_interrupts\", queue = \"rx\", count = 1 }\n",
        )
        .unwrap();
        assert_eq!(p.module, "mydrv", "from Kbuild's obj-m");
        assert_eq!(p.name, "demo");
        assert_eq!(p.manifest.scenario[0].timeout_s, 60);
        let err = |m: &str| format!("{:#}", project(m).unwrap_err());
        assert!(err("[driver]\nparams = [\"nope\"]\n").contains("name=value"));
        assert!(
            err("[driver]\n[[scenario]]\nname = \"a b\"\nrun = \"x\"\n").contains("scenario name")
        );
        assert!(err(
            "[driver]\n[[scenario]]\nname = \"a\"\nrun = \"x\"\n[[scenario.step]]\nsleep_ms = 1\ninject = \"x\"\n"
        )
        .contains("exactly one"));
        assert!(err(
            "[driver]\n[[scenario]]\nname = \"a\"\nrun = \"x\"\n[[scenario.step]]\nfault = { kind = \"melt\" }\n"
        )
        .contains("fault"));
        assert!(err("[driver]\n[device]\nbackend = [\"x\"]\n").contains("virtio_id"));
        assert!(err("[driver]\nfrobnicate = 1\n").contains("not a valid manifest"));
    }

    #[test]
    fn kbuild_names_the_module() {
        let dir = std::env::temp_dir().join(format!("vdevlab-kbuild-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("Kbuild"),
            "# x\nobj-m += foo_bar.o\nfoo_bar-y := a.o\n",
        )
        .unwrap();
        assert_eq!(kbuild_module(&dir).unwrap(), "foo_bar");
        std::fs::write(dir.join("Kbuild"), "ccflags-y := -I.\n").unwrap();
        assert!(kbuild_module(&dir).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn archives_get_their_folders() {
        let files = vec![
            ("usr/local/bin/x".to_string(), 0o755, vec![]),
            ("vdevlab/run".to_string(), 0o755, vec![]),
        ];
        assert_eq!(
            parent_dirs(&files),
            ["usr", "usr/local", "usr/local/bin", "vdevlab"]
        );
    }
}
