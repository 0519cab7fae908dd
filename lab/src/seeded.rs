//! Seeded race bugs: proof that the lab catches races. A [`Seed`] is data
//! (`faults/races/seeded.toml`): a name, what it breaks, the layers
//! expected to catch it, and exact text edits of `guest-driver/vdevlab_qw.c`
//! (each `find` must occur exactly once, or applying the seed fails naming
//! the seed and the text: a driver change that makes a seed stale fails
//! loudly). [`build`] copies `guest-driver/` into a scratch folder
//! (`target/lab/seeded/`, never the checkout), edits the copy and builds it
//! for a kernel ([`crate::artifacts::build_module`], a label of its own per seed,
//! so builds are cached and do not clash); [`run`] boots it in place of the
//! reference driver (an initramfs overlay whose `lib/modules/vdevlab_qw.ko`
//! replaces the shipped one) through the one engine, and the records name
//! the driver `vdevlab_qw+<seed>`.
//!
//! The layers ([`Layer`]): `up` (one vCPU), `smp` (two vCPUs, the device's
//! interrupts on CPU 1, the programs on CPU 0), `lockdep` and `kcsan` (the
//! race-detector kernels, when provisioned). [`Catch::of`] says whether a
//! run caught the seed, and how (a kernel splat, a timeout, wrong data).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::artifacts::{build_module, check_module, write_archive};
use crate::cell::Cell;
use crate::env::{target_dir, workspace_root, Kernel};
use crate::scenario::{Outcome, Scenario, Step, StreamCase};
use crate::Lab;

/// The reference driver's module name (a seeded copy loads under it).
pub const MODULE: &str = "vdevlab_qw";

/// Budget of each scenario of a seeded run, from its first `Ready`: a lost
/// wake-up fails in seconds, not in the default two minutes. A clean run
/// of one case takes well under a second on the lab kernel under TCG.
pub const BUDGET: Duration = Duration::from_secs(20);

/// A layer of the lab that may catch a seeded bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layer {
    /// The lab kernel on one vCPU.
    Up,
    /// The lab kernel on two vCPUs, interrupts and programs apart.
    Smp,
    /// The lockdep kernel (PROVE_LOCKING, DEBUG_SPINLOCK, DEBUG_LIST, ...).
    Lockdep,
    /// The KCSAN kernel (the data-race detector).
    Kcsan,
}

impl Layer {
    /// Every layer, in table order.
    pub const ALL: [Layer; 4] = [Layer::Up, Layer::Smp, Layer::Lockdep, Layer::Kcsan];

    /// Its name, as in the seeds file.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Up => "up",
            Layer::Smp => "smp",
            Layer::Lockdep => "lockdep",
            Layer::Kcsan => "kcsan",
        }
    }

    /// The kernel (by name) and cell it runs in. The detector kernels run
    /// on two vCPUs, as the stress runs do (KCSAN needs two to see a race).
    pub fn place(self) -> (&'static str, Cell) {
        match self {
            Layer::Up => ("lab", Cell::QEMU_TCG),
            Layer::Smp => ("lab", Cell::QEMU_TCG_SMP),
            Layer::Lockdep => ("lockdep", Cell::QEMU_TCG_SMP),
            Layer::Kcsan => ("kcsan", Cell::QEMU_TCG_SMP),
        }
    }

    /// A layer by name.
    pub fn parse(text: &str) -> Result<Layer> {
        Layer::ALL
            .into_iter()
            .find(|l| l.name() == text)
            .with_context(|| format!("unknown layer {text:?} (known: up, smp, lockdep, kcsan)"))
    }
}

/// A scenario batch a seed runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Batch {
    /// The I/O-model batch: every model's `-rx` and `-tx`, then `mixed`.
    IoModels,
    /// Unbind and PCI removal while readers and writers of every model wait.
    Teardown,
    /// The concurrency stress ([`crate::stress`]), 10 s, seed 0x5eed: every
    /// model's readers and writers at once, churn, resets, signals, lock
    /// holders, interrupt-mode changes, then an unbind.
    Stress,
}

impl Batch {
    /// Its scenarios (each with the seeded runs' [`BUDGET`]).
    pub fn scenarios(self) -> Result<Vec<Scenario>> {
        match self {
            Batch::IoModels => io_models(),
            Batch::Teardown => Ok(teardown()),
            Batch::Stress => Ok(vec![crate::stress::scenario(&crate::stress::Stress::new(
                0x5eed, 10,
            ))]),
        }
    }

    /// Its name, as in the seeds file.
    pub fn name(self) -> &'static str {
        match self {
            Batch::IoModels => "io-models",
            Batch::Teardown => "teardown",
            Batch::Stress => "stress",
        }
    }
}

/// One exact text edit of the driver.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    /// The text to find: it must occur exactly once.
    pub find: String,
    /// What replaces it.
    pub replace: String,
}

/// A seeded bug.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Its name (lower case, digits and `-`).
    pub name: String,
    /// What it breaks, one line.
    pub breaks: String,
    /// The layers expected to catch it.
    #[serde(default)]
    pub catchers: Vec<Layer>,
    /// Why those layers catch it, and why the others do not.
    #[serde(default)]
    pub why: String,
    /// The scenario batches that should show it.
    pub scenarios: Vec<Batch>,
    /// The edits of `guest-driver/vdevlab_qw.c`, applied in order.
    #[serde(rename = "edit")]
    pub edits: Vec<Edit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedsFile {
    seed: Vec<Seed>,
}

impl Seed {
    /// The driver as the records name it: `vdevlab_qw+<seed>`.
    pub fn driver_label(&self) -> String {
        format!("{MODULE}+{}", self.name)
    }

    /// `source` with this seed's edits, each of whose `find` must occur in
    /// it (as edited so far) exactly once.
    pub fn apply(&self, source: &str) -> Result<String> {
        let mut out = source.to_string();
        for (i, e) in self.edits.iter().enumerate() {
            let n = out.matches(e.find.as_str()).count();
            if n != 1 {
                bail!(
                    "seed {}: edit {} must match guest-driver/vdevlab_qw.c exactly once, \
                     but its text occurs {n} times (the driver changed? update \
                     faults/races/seeded.toml):\n{}",
                    self.name,
                    i + 1,
                    e.find
                );
            }
            out = out.replacen(e.find.as_str(), &e.replace, 1);
        }
        Ok(out)
    }

    /// Its scenarios: those of its batches, in order.
    pub fn scenarios(&self) -> Result<Vec<Scenario>> {
        let mut all = Vec::new();
        for b in &self.scenarios {
            all.extend(b.scenarios()?);
        }
        Ok(all)
    }
}

/// The shipped seeds file.
pub fn seeds_file() -> PathBuf {
    workspace_root().join("faults/races/seeded.toml")
}

/// The seeds of a file, checked: names well formed and unique, each with
/// edits and scenarios.
pub fn load(path: &Path) -> Result<Vec<Seed>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&text).with_context(|| format!("in {}", path.display()))
}

/// The seeds of a seeds file's text, checked as [`load`] does.
pub fn parse(text: &str) -> Result<Vec<Seed>> {
    let file: SeedsFile = toml::from_str(text).context("not a valid seeds file")?;
    let mut names = HashSet::new();
    for s in &file.seed {
        let ok = !s.name.is_empty()
            && s.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            bail!(
                "seed name {:?}: lower case letters, digits and '-' only",
                s.name
            );
        }
        if !names.insert(s.name.as_str()) {
            bail!("seed {} is listed twice", s.name);
        }
        if s.edits.is_empty() || s.scenarios.is_empty() {
            bail!(
                "seed {}: needs at least one [[seed.edit]] and one scenario batch",
                s.name
            );
        }
    }
    Ok(file.seed)
}

/// The shipped seeds.
pub fn shipped() -> Result<Vec<Seed>> {
    load(&seeds_file())
}

/// The shipped seed named `name`.
pub fn named(name: &str) -> Result<Seed> {
    let seeds = shipped()?;
    let known: Vec<String> = seeds.iter().map(|s| s.name.clone()).collect();
    seeds
        .into_iter()
        .find(|s| s.name == name)
        .with_context(|| format!("no seed {name} (known: {})", known.join(", ")))
}

/// Where seeded drivers are copied and built: `target/lab/seeded/`.
pub fn build_dir() -> PathBuf {
    target_dir().join("lab/seeded")
}

/// A seeded driver built for one kernel.
#[derive(Debug, Clone)]
pub struct Built {
    /// The module.
    pub ko: PathBuf,
    /// Its build's log.
    pub build_log: PathBuf,
    /// The W=1 build's warnings (a seed may well make some).
    pub warnings: Vec<String>,
    /// The archive laid over the initramfs: `lib/modules/vdevlab_qw.ko`.
    pub overlay: PathBuf,
}

/// Copy `guest-driver/` (its sources, Kbuild, Makefile and `include/`)
/// into a scratch folder, apply `seed`, build it for `kernel` and pack the
/// overlay.
pub fn build(kernel: &Kernel, seed: &Seed) -> Result<Built> {
    let dir = build_dir();
    let src = dir.join(format!("{}-src", seed.name));
    copy_driver(&workspace_root().join("guest-driver"), &src)?;
    let c = src.join(format!("{MODULE}.c"));
    let pristine =
        std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
    write_if_changed(&c, seed.apply(&pristine)?.as_bytes())?;
    eprintln!(
        "[vdevlab] building {} for {} ({})",
        seed.driver_label(),
        kernel.name,
        kernel.release
    );
    let (ko, log, build_log) = build_module(kernel, &src, MODULE, &dir, &seed.name)?;
    let data = std::fs::read(&ko)?;
    check_module(kernel, MODULE, &data)?;
    let warnings = log
        .lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        .map(str::to_string)
        .collect();
    let overlay = dir.join(format!("{}-overlay-{}.cpio", seed.name, kernel.release));
    let files = [(format!("lib/modules/{MODULE}.ko"), 0o644, data)];
    // Parallel test processes pack the same archive: write a file of our
    // own, then move it into place.
    let tmp = dir.join(format!(
        "{}-overlay-{}.{}.cpio",
        seed.name,
        kernel.release,
        std::process::id()
    ));
    write_archive(&tmp, &["lib", "lib/modules"], &files)?;
    std::fs::rename(&tmp, &overlay)?;
    Ok(Built {
        ko,
        build_log,
        warnings,
        overlay,
    })
}

/// Copy the driver's build inputs (not `sensor/`, not build products).
fn copy_driver(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if name == "include" {
                copy_tree(&path, &to.join(&name))?;
            }
        } else if name.ends_with(".c")
            || name.ends_with(".h")
            || name == "Kbuild"
            || name == "Makefile"
        {
            write_if_changed(&to.join(&name), &std::fs::read(&path)?)?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &dest)?;
        } else {
            write_if_changed(&dest, &std::fs::read(entry.path())?)?;
        }
    }
    Ok(())
}

/// Write `data` unless the file already holds it (keeps mtimes, and lets
/// parallel processes prepare the same seed), atomically.
fn write_if_changed(path: &Path, data: &[u8]) -> Result<()> {
    if std::fs::read(path).ok().as_deref() == Some(data) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Boot `kernel` in `cell` once with `seed`'s driver (`None`: the
/// reference driver, for the comparison) and run `scenarios`; the records
/// name the driver `vdevlab_qw+<seed>`.
pub fn run(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    seed: Option<&Seed>,
    scenarios: &[Scenario],
) -> Result<Vec<Outcome>> {
    // The stress's threads run on every CPU, as crate::stress::run has it.
    let stress = scenarios.iter().any(|s| s.name == "stress");
    let place = |spec: &mut crate::guest::BootSpec| {
        if stress {
            spec.placement = crate::smp::Placement::IrqOnly;
        }
    };
    let Some(seed) = seed else {
        return crate::engine::run(lab, kernel, cell, scenarios, place);
    };
    let built = build(kernel, seed)?;
    let label = seed.driver_label();
    crate::engine::run_labelled(lab, kernel, cell, scenarios, Some(&label), |spec| {
        place(spec);
        spec.overlays.push(built.overlay.clone())
    })
}

/// The I/O-model batch, as the suite's `io_models_rx_and_tx` runs it (the
/// same sizes and seeds): every model's `-rx` and `-tx`, then `mixed`.
pub fn io_models() -> Result<Vec<Scenario>> {
    let models: Vec<&str> = vdevlab_guest::SCENARIOS
        .iter()
        .filter_map(|s| s.strip_suffix("-rx"))
        .collect();
    let mut cases = Vec::new();
    for (i, m) in models.iter().enumerate() {
        cases.push(StreamCase::new(
            &format!("{m}-rx"),
            40_000 + i,
            100 + i as u64,
        ));
        cases.push(StreamCase::new(
            &format!("{m}-tx"),
            40_000 + i,
            200 + i as u64,
        ));
    }
    cases.push(StreamCase::new("mixed", 100_000, 300));
    cases
        .iter()
        .map(|c| {
            let mut s = c.scenario(None)?;
            s.budget = BUDGET;
            Ok(s)
        })
        .collect()
}

/// The teardown, as the suite's runs it: unbind, then PCI removal, while a
/// blocking reader, a blocked writer, an edge-triggered epoll waiter and
/// native-AIO, io_uring and POSIX AIO reads wait.
pub fn teardown() -> Vec<Scenario> {
    ["teardown-unbind", "teardown-remove"]
        .iter()
        .map(|name| {
            let mut s =
                Scenario::program(name, &[]).with_steps(vec![Step::Ready(name.to_string())]);
            s.budget = BUDGET;
            s
        })
        .collect()
}

/// How a run went against a seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Catch {
    /// Some scenario of the boot failed.
    pub caught: bool,
    /// How: `splat:<kind>` (a kernel report), `timeout` (a task left
    /// waiting, a stalled stream), `data` (wrong bytes or counts), `eio` (a
    /// program got an error), `error` (the boot itself failed), `other`;
    /// empty when missed.
    pub how: String,
    /// The first failure's reason (its scenario first).
    pub detail: String,
    /// The boot failed before the driver was up, for a reason that is not
    /// the driver's (under a loaded host TCG's timer check may panic: "IO-APIC
    /// + timer doesn't work!"): the run says nothing about the seed.
    pub inconclusive: bool,
}

impl Catch {
    /// The verdict of a boot's outcomes (or of its error).
    pub fn of(outs: &Result<Vec<Outcome>>) -> Catch {
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                return Catch {
                    caught: false,
                    how: "error".into(),
                    detail: format!("{e:#}"),
                    inconclusive: true,
                }
            }
        };
        let Some(bad) = outs.iter().find(|o| !o.passed()) else {
            return Catch {
                caught: false,
                how: String::new(),
                detail: String::new(),
                inconclusive: false,
            };
        };
        let reason = bad.record.reason.clone().unwrap_or_default();
        let early = bad.record.driver_ready_ms.is_none() && !reason.contains("qw");
        let inconclusive = early || reason.contains("IO-APIC + timer doesn't work");
        Catch {
            caught: !inconclusive,
            how: if inconclusive {
                "boot".into()
            } else {
                classify(&reason)
            },
            detail: format!("{}: {reason}", bad.record.scenario),
            inconclusive,
        }
    }
}

/// The kind of a failure, from its reason (see [`Catch::how`]). A kernel
/// splat wins: it says most about the cause.
pub fn classify(reason: &str) -> String {
    if let Some(i) = reason.find("kernel ") {
        let rest = &reason[i + "kernel ".len()..];
        if let Some((kind, _)) = rest.split_once(':') {
            if !kind.is_empty() && !kind.contains(' ') {
                return format!("splat:{kind}");
            }
        }
    }
    let has = |t: &str| reason.contains(t);
    if has("within") || has("stalled") || has("timed out") || has("not run") {
        "timeout".into()
    } else if has(" is ") && (has("sha256") || has("bytes")) || has("differs") {
        "data".into()
    } else if has("EIO") || has("guest program failed") {
        "eio".into()
    } else {
        "other".into()
    }
}

/// Where a seed's catches are summed: one per (seed, layer).
#[derive(Debug, Clone, Serialize)]
pub struct Tally {
    /// The seed (`reference`: the unseeded driver).
    pub seed: String,
    /// The layer's name (`up`, `smp`, `lockdep`, `kcsan`), or
    /// `<kernel>/<cell>` for a place asked for by hand.
    pub layer: String,
    /// The kernel's name.
    pub kernel: String,
    /// The cell it ran in.
    pub cell: String,
    /// Whether it should be caught here: the seeds file's catchers for a
    /// layer (never, for the reference); `None` for a place by hand.
    pub expected: Option<bool>,
    /// Runs made.
    pub runs: u32,
    /// Runs that caught it.
    pub caught: u32,
    /// Runs that said nothing (the boot failed for its own reasons) and
    /// were made again; not counted in `runs`.
    pub inconclusive: u32,
    /// Each run's verdict.
    pub catches: Vec<Catch>,
}

impl Tally {
    /// One cell of the table: `caught 3/3 (splat:warn)`, `missed 0/3`.
    pub fn cell_text(&self) -> String {
        let redone = match self.inconclusive {
            0 => String::new(),
            n => format!(" [{n} boot(s) failed, redone]"),
        };
        if self.caught == 0 {
            return format!("missed 0/{}{redone}", self.runs);
        }
        let mut hows: Vec<&str> = self
            .catches
            .iter()
            .filter(|c| c.caught)
            .map(|c| c.how.as_str())
            .collect();
        hows.sort();
        hows.dedup();
        format!(
            "caught {}/{} ({}){redone}",
            self.caught,
            self.runs,
            hows.join(",")
        )
    }
}

/// The layers whose kernel this lab has (`up` and `smp` always; the
/// detector kernels when provisioned).
pub fn available_layers(lab: &Lab) -> Vec<Layer> {
    Layer::ALL
        .into_iter()
        .filter(|l| lab.env.kernel(l.place().0).is_ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn driver() -> String {
        std::fs::read_to_string(workspace_root().join("guest-driver/vdevlab_qw.c")).unwrap()
    }

    #[test]
    fn every_shipped_seed_applies_to_the_driver() {
        let seeds = shipped().unwrap();
        assert!(seeds.len() >= 4, "at least four seeds");
        let src = driver();
        for s in &seeds {
            let edited = s.apply(&src).unwrap_or_else(|e| panic!("{e:#}"));
            assert_ne!(edited, src, "{} changes the driver", s.name);
            assert!(
                !s.catchers.is_empty(),
                "{}: name its expected catchers",
                s.name
            );
            assert!(!s.breaks.contains('\n'), "{}: breaks is one line", s.name);
        }
    }

    #[test]
    fn a_stale_seed_fails_naming_itself_and_its_text() {
        let seeds = parse(
            "[[seed]]\nname = \"x\"\nbreaks = \"b\"\nscenarios = [\"io-models\"]\n\
             [[seed.edit]]\nfind = \"abc\"\nreplace = \"d\"\n",
        )
        .unwrap();
        let err = format!("{:#}", seeds[0].apply("no such text").unwrap_err());
        assert!(err.contains("seed x") && err.contains("abc") && err.contains("0 times"));
        let err = format!("{:#}", seeds[0].apply("abc abc").unwrap_err());
        assert!(err.contains("2 times"), "{err}");
        assert_eq!(seeds[0].apply("1abc2").unwrap(), "1d2");
        assert_eq!(seeds[0].driver_label(), "vdevlab_qw+x");
    }

    #[test]
    fn bad_seed_files_are_refused() {
        let one = "[[seed]]\nname = \"a\"\nbreaks = \"b\"\nscenarios = [\"teardown\"]\n\
                   [[seed.edit]]\nfind = \"f\"\nreplace = \"r\"\n";
        assert!(parse(one).is_ok());
        assert!(parse(&format!("{one}{one}")).is_err(), "a name twice");
        assert!(parse(&one.replace("\"a\"", "\"A b\"")).is_err());
        assert!(parse(&one.replace("teardown", "nope")).is_err());
        assert!(parse(&one.replace("breaks", "brakes")).is_err());
        let no_edit =
            "[[seed]]\nname = \"a\"\nbreaks = \"b\"\nscenarios = [\"teardown\"]\nedit = []\n";
        assert!(parse(no_edit).is_err());
    }

    #[test]
    fn failures_are_classified() {
        assert_eq!(
            classify("kernel warn: [ 3.1] WARNING: CPU: 1 PID: 0 at qw.c:9 qw_rx_harvest_locked"),
            "splat:warn"
        );
        assert_eq!(
            classify(
                "step 3 (inject 40000 bytes): stalled: injected 1 of 2, captured 0 of 0 bytes"
            ),
            "timeout"
        );
        assert_eq!(
            classify("no result line from blocking-rx within 5s"),
            "timeout"
        );
        assert_eq!(classify("sha256 is \"aa\", expected \"bb\""), "data");
        assert_eq!(classify("guest program failed: read: EIO"), "eio");
        assert_eq!(Layer::parse("lockdep").unwrap(), Layer::Lockdep);
        assert!(Layer::parse("x").is_err());
    }

    #[test]
    fn the_batches_carry_the_short_budget() {
        let io = io_models().unwrap();
        assert_eq!(io.last().unwrap().name, "mixed");
        assert!(io.iter().any(|s| s.name == "epoll-et-rx"));
        assert!(io.iter().all(|s| s.budget == BUDGET));
        assert_eq!(teardown().len(), 2);
    }
}
