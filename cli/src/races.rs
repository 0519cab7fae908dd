//! `vdevlab races`: the seeded race-bug campaign. Every seed of
//! `faults/races/seeded.toml` (or those named) runs in every layer this lab
//! has (one vCPU, two vCPUs, the lockdep and KCSAN kernels when
//! provisioned), `--repeat` times, after the unseeded driver's run of the
//! same scenarios; a table seed x layer says caught/missed and how, and a
//! JSON report (plus JUnit) goes to `target/lab-runs/races/`.

use anyhow::{bail, Result};
use clap::Args;
use vdevlab_lab::cell::Cell;
use vdevlab_lab::report;
use vdevlab_lab::seeded::{self, Batch, Catch, Layer, Seed, Tally};
use vdevlab_lab::Lab;

/// Run the seeded race bugs in real guests and say which layer catches each.
#[derive(Debug, Args)]
pub struct RacesArgs {
    /// Only these layers (comma separated: up, smp, lockdep, kcsan); default
    /// every one whose kernel this lab has.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// A guest kernel by name instead of the layers' own (with --cell: one
    /// place, `<kernel>/<cell>`).
    #[arg(long)]
    kernel: Option<String>,
    /// A cell (qemu-tcg, qemu-tcg-smp, ...) instead of the layers' own.
    #[arg(long)]
    cell: Option<String>,
    /// Only this seed (repeatable).
    #[arg(long = "seed-bug", value_name = "NAME")]
    seed_bug: Vec<String>,
    /// Runs per seed and layer (a race caught in some of them is reported
    /// as such: caught k/N).
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Skip the unseeded driver's runs.
    #[arg(long)]
    no_reference: bool,
}

/// Where one column of the table runs.
struct Place {
    label: String,
    layer: Option<Layer>,
    kernel: String,
    cell: Cell,
}

/// Run the campaign; true when the reference driver passed everywhere and
/// every seed was caught at least once by each layer expected to catch it.
pub fn run(args: RacesArgs) -> Result<bool> {
    let mut seeds = seeded::shipped()?;
    if !args.seed_bug.is_empty() {
        for name in &args.seed_bug {
            seeded::named(name)?;
        }
        seeds.retain(|s| args.seed_bug.contains(&s.name));
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    eprintln!("[vdevlab] provisioning the lab and building the guest image");
    let lab = Lab::get()?;
    let places = places(&lab, &args)?;
    let mut tallies = Vec::new();
    for p in &places {
        let kernel = lab.env.kernel(&p.kernel)?.clone();
        if !args.no_reference {
            let scenarios = all_batches()?;
            let (mut catches, mut inconclusive) = (Vec::new(), 0);
            for i in 0..args.repeat {
                eprintln!(
                    "[vdevlab] {}: the reference driver (run {} of {})",
                    p.label,
                    i + 1,
                    args.repeat
                );
                let (c, redone) = attempt(|| seeded::run(&lab, &kernel, p.cell, None, &scenarios));
                inconclusive += redone;
                catches.push(c);
            }
            tallies.push(tally("reference", p, Some(false), catches, inconclusive));
        }
        for seed in &seeds {
            let mut catches = Vec::new();
            let mut inconclusive = 0;
            for i in 0..args.repeat {
                eprintln!(
                    "[vdevlab] {}: {} (run {} of {})",
                    p.label,
                    seed.name,
                    i + 1,
                    args.repeat
                );
                // One boot per batch (the stress places its threads
                // differently); caught if any of them caught it.
                let mut c = None;
                for b in &seed.scenarios {
                    let scenarios = b.scenarios()?;
                    let (one, redone) =
                        attempt(|| seeded::run(&lab, &kernel, p.cell, Some(seed), &scenarios));
                    inconclusive += redone;
                    let stop = one.caught;
                    if c.as_ref().is_none_or(|k: &Catch| !k.caught) {
                        c = Some(one);
                    }
                    if stop {
                        break;
                    }
                }
                let c = c.expect("a seed has a batch");
                eprintln!(
                    "[vdevlab]   {}",
                    if c.caught || c.inconclusive {
                        format!("caught ({}): {}", c.how, short(&c.detail, 300))
                    } else {
                        "missed".into()
                    }
                );
                catches.push(c);
            }
            let expected = p.layer.map(|l| seed.catchers.contains(&l));
            tallies.push(tally(&seed.name, p, expected, catches, inconclusive));
        }
    }
    print!("{}", table(&places, &seeds, &tallies, !args.no_reference));
    let ok = tallies.iter().all(|t| match t.expected {
        Some(true) => t.caught > 0,
        _ if t.seed == "reference" => t.caught == 0,
        _ => true,
    });
    let cases: Vec<(String, bool, String)> = tallies
        .iter()
        .map(|t| {
            let pass = match t.expected {
                Some(e) => (t.caught > 0) == e,
                None => true,
            };
            let detail = t
                .catches
                .iter()
                .find(|c| c.caught)
                .map_or(String::new(), |c| c.detail.clone());
            (format!("{} @ {}", t.seed, t.layer), pass, detail)
        })
        .collect();
    let junit_cases: Vec<report::Case> = cases
        .iter()
        .map(|(name, pass, detail)| report::Case {
            name,
            pass: *pass,
            message: if *pass {
                ""
            } else {
                "caught where not expected, or missed where expected"
            },
            detail,
            output: None,
        })
        .collect();
    let dir = vdevlab_lab::env::runs_dir().join("races");
    let json = serde_json::json!({
        "seeds_file": seeded::seeds_file(),
        "repeat": args.repeat,
        "seeds": seeds.iter().map(|s| serde_json::json!({
            "name": s.name, "breaks": s.breaks, "catchers": s.catchers, "why": s.why.trim(),
            "scenarios": s.scenarios.iter().map(|b| b.name()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tallies": tallies,
    });
    report::write(
        &dir,
        "races",
        &json,
        &report::junit("races", "races", &junit_cases),
    )?;
    println!(
        "report: {}/report-races.json (junit-races.xml); records: driver vdevlab_qw+<seed> in runs.jsonl",
        dir.display()
    );
    Ok(ok)
}

fn all_batches() -> Result<Vec<vdevlab_lab::scenario::Scenario>> {
    let mut s = Batch::IoModels.scenarios()?;
    s.extend(Batch::Teardown.scenarios()?);
    Ok(s)
}

fn places(lab: &Lab, args: &RacesArgs) -> Result<Vec<Place>> {
    if args.kernel.is_some() && args.cell.is_some() && args.layers.is_empty() {
        let kernel = args.kernel.clone().unwrap_or_default();
        let cell = Cell::parse(args.cell.as_deref().unwrap_or_default())?;
        lab.env.kernel(&kernel)?;
        return Ok(vec![Place {
            label: format!("{kernel}/{cell}"),
            layer: None,
            kernel,
            cell,
        }]);
    }
    let layers: Vec<Layer> = if args.layers.is_empty() {
        seeded::available_layers(lab)
    } else {
        args.layers
            .iter()
            .map(|l| Layer::parse(l))
            .collect::<Result<_>>()?
    };
    let cell = args.cell.as_deref().map(Cell::parse).transpose()?;
    layers
        .into_iter()
        .map(|l| {
            let (k, c) = l.place();
            let kernel = args.kernel.clone().unwrap_or_else(|| k.to_string());
            let cell = cell.unwrap_or(c);
            lab.env.kernel(&kernel)?;
            let custom = args.kernel.is_some() || args.cell.is_some();
            Ok(Place {
                label: if custom {
                    format!("{}:{kernel}/{cell}", l.name())
                } else {
                    l.name().to_string()
                },
                layer: Some(l),
                kernel,
                cell,
            })
        })
        .collect()
}

/// How many times a boot that failed for its own reasons is made again.
const REDO: u32 = 2;

/// One run's verdict, made again (at most [`REDO`] times) while its boot
/// fails for reasons of its own; and how many were made again.
fn attempt(mut run: impl FnMut() -> Result<Vec<vdevlab_lab::scenario::Outcome>>) -> (Catch, u32) {
    let mut redone = 0;
    loop {
        let c = Catch::of(&run());
        if !c.inconclusive || redone == REDO {
            return (c, redone);
        }
        eprintln!(
            "[vdevlab]   inconclusive, made again: {}",
            short(&c.detail, 200)
        );
        redone += 1;
    }
}

fn tally(
    seed: &str,
    p: &Place,
    expected: Option<bool>,
    catches: Vec<Catch>,
    inconclusive: u32,
) -> Tally {
    Tally {
        seed: seed.to_string(),
        layer: p.label.clone(),
        kernel: p.kernel.clone(),
        cell: p.cell.to_string(),
        expected,
        runs: catches.len() as u32,
        caught: catches.iter().filter(|c| c.caught).count() as u32,
        inconclusive,
        catches,
    }
}

fn short(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// Seeds down, places across; `*` marks a layer the seeds file expects to
/// catch the seed. Then each catch's first reason.
fn table(places: &[Place], seeds: &[Seed], tallies: &[Tally], reference: bool) -> String {
    let mut names: Vec<&str> = Vec::new();
    if reference {
        names.push("reference");
    }
    names.extend(seeds.iter().map(|s| s.name.as_str()));
    let mut columns = vec![("seed", 28)];
    let titles: Vec<String> = places.iter().map(|p| p.label.clone()).collect();
    for t in &titles {
        columns.push((t.as_str(), 30));
    }
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|n| {
            let mut row = vec![n.to_string()];
            for p in places {
                let cell = tallies
                    .iter()
                    .find(|t| t.seed == *n && t.layer == p.label)
                    .map_or("-".into(), |t| {
                        let mark = if t.expected == Some(true) { "*" } else { "" };
                        match (t.seed.as_str(), t.caught) {
                            ("reference", 0) => format!("passes {}/{}", t.runs, t.runs),
                            ("reference", _) => format!("FAILS: {}", t.cell_text()),
                            _ => format!("{mark}{}", t.cell_text()),
                        }
                    });
                row.push(cell);
            }
            row
        })
        .collect();
    let mut out = report::table(&columns, &rows);
    out.push_str("(* expected to catch it, per faults/races/seeded.toml)\n");
    for t in tallies {
        if let Some(c) = t.catches.iter().find(|c| c.caught) {
            out.push_str(&format!(
                "  {} @ {}: {}\n",
                t.seed,
                t.layer,
                short(&c.detail, 240)
            ));
        }
    }
    out
}
