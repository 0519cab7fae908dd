//! `vdevlab bench`: latency and throughput per I/O model of the qw device,
//! against the virtio-serial baseline and the host-pipe floor measured in
//! the same run (`vdevlab_lab::bench`). Prints tables, writes the report as
//! JSON and draws SVG pictures under `target/lab-runs/bench/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use vdevlab_lab::bench::{self, BenchOptions, BenchReport, Device, Dir};
use vdevlab_lab::Lab;

/// `vdevlab bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Guest kernel (`trixie`, `bookworm`).
    #[arg(long, default_value = vdevlab_lab::env::DEFAULT_KERNEL)]
    kernel: String,
    /// Latency samples per model and device (default 10000; 1000 with
    /// --quick).
    #[arg(long)]
    samples: Option<usize>,
    /// I/O models, comma separated (default: all ten).
    #[arg(long, value_delimiter = ',')]
    models: Vec<String>,
    /// Fewer samples and shorter streams (a few minutes).
    #[arg(long)]
    quick: bool,
    /// Latency only.
    #[arg(long)]
    no_throughput: bool,
    /// Repetitions of each stream run, qw and virtio-serial alternating
    /// (default 3; 1 with --quick); the median is reported.
    #[arg(long)]
    reps: Option<usize>,
    /// Boots without a scenario per kernel and image, for the boot times
    /// (VMM start to init, and to the driver bound); default 1, 0 with
    /// --quick.
    #[arg(long)]
    boot_runs: Option<usize>,
    /// Kernels of those boots, comma separated (default: every provisioned
    /// kernel).
    #[arg(long, value_delimiter = ',')]
    boot_kernels: Vec<String>,
    /// Where the JSON report and the SVG pictures go (default:
    /// target/lab-runs/bench/).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn us(ns: u64) -> String {
    let v = ns as f64 / 1000.0;
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a > 0.0 && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

/// The latency table: per model, qw and virtio-serial, and the ratios.
fn latency_table(r: &BenchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Round-trip latency, µs ({}-byte message, host → guest program → host; {} samples after {} warm-up)\n",
        bench::MSG_LEN,
        r.samples,
        r.warmup
    ));
    out.push_str(&format!(
        "{:<12} {:<14} {:>8} {:>8} {:>8} {:>8} {:>8}  {:>8} {:>8} {:>8}  {:>11}\n",
        "model",
        "device",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "×vs p50",
        "×vs p99",
        "×vs max",
        "CPU/msg",
    ));
    let mut models: Vec<&str> = Vec::new();
    for l in &r.latency {
        if l.device != Device::Pipe && !models.contains(&l.model.as_str()) {
            models.push(&l.model);
        }
    }
    for m in models {
        let vs = r.latency_of(m, Device::VirtioSerial);
        for dev in [Device::Qw, Device::VirtioSerial] {
            let Some(l) = r.latency_of(m, dev) else {
                continue;
            };
            let name = if dev == Device::Qw { m } else { "" };
            if let Some(e) = &l.error {
                out.push_str(&format!(
                    "{name:<12} {:<14} n/a: {}\n",
                    dev.name(),
                    short(e)
                ));
                continue;
            }
            let s = &l.summary;
            let (r50, r99, rmax) = match (dev, vs) {
                (Device::Qw, Some(v)) if v.error.is_none() => (
                    ratio(s.p50_ns as f64, v.summary.p50_ns as f64),
                    ratio(s.p99_ns as f64, v.summary.p99_ns as f64),
                    ratio(s.max_ns as f64, v.summary.max_ns as f64),
                ),
                _ => (String::new(), String::new(), String::new()),
            };
            let cpu = match (l.vmm_cpu_us_per_msg, l.backend_cpu_us_per_msg) {
                (Some(v), Some(b)) => format!("{v:.0}+{b:.0}"),
                (Some(v), None) => format!("{v:.0}"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "{name:<12} {:<14} {:>8} {:>8} {:>8} {:>8} {:>8}  {r50:>8} {r99:>8} {rmax:>8}  {cpu:>11}\n",
                dev.name(),
                us(s.p50_ns),
                us(s.p90_ns),
                us(s.p99_ns),
                us(s.p999_ns),
                us(s.max_ns),
            ));
        }
    }
    if let Some(p) = r.latency_of("blocking", Device::Pipe) {
        let s = &p.summary;
        out.push_str(&format!(
            "{:<12} {:<14} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "(floor)",
            "host pipe",
            us(s.p50_ns),
            us(s.p90_ns),
            us(s.p99_ns),
            us(s.p999_ns),
            us(s.max_ns)
        ));
    }
    out.push_str(
        "×vs: qw / virtio-serial (above 1: qw slower). Both through a Unix socket on the host: qw's data port, the port's chardev.\nCPU/msg: host CPU µs per round trip, QEMU (+ qw's backend)\n",
    );
    out
}

fn short(e: &str) -> String {
    let e = e.replace('\n', " ");
    if e.chars().count() > 110 {
        format!("{}…", e.chars().take(110).collect::<String>())
    } else {
        e
    }
}

/// The throughput table: per size, direction and model.
fn throughput_table(r: &BenchReport) -> String {
    let mut out = String::new();
    if r.throughput.is_empty() {
        return out;
    }
    let reps = r
        .throughput
        .iter()
        .map(|t| t.runs_mb_per_s.len())
        .max()
        .unwrap_or(1);
    out.push_str(&format!("Throughput, median of {reps} run(s) alternating qw and virtio-serial (MB = 10^6 bytes; msg = one read/write of the transfer size; CPU = host CPU time per second of the run: QEMU (all threads), qw's backend; (guest only) = the same blocking program on /dev/zero or /dev/null: its own ceiling)\n"));
    out.push_str(&format!(
        "{:<8} {:<3} {:<12} {:>10} {:>10} {:>7}  {:>10} {:>10}  {:>12} {:>8}\n",
        "size",
        "dir",
        "model",
        "qw MB/s",
        "vs MB/s",
        "×vs",
        "qw msg/s",
        "vs msg/s",
        "CPU qw/be/vs",
        ""
    ));
    let mut sizes: Vec<usize> = r.throughput.iter().map(|t| t.size).collect();
    sizes.dedup();
    sizes.sort_unstable();
    sizes.dedup();
    let mut models: Vec<&str> = Vec::new();
    for t in &r.throughput {
        if matches!(t.device, Device::Qw | Device::VirtioSerial)
            && !models.contains(&t.model.as_str())
        {
            models.push(&t.model);
        }
    }
    for &size in &sizes {
        for dir in [Dir::Rx, Dir::Tx] {
            if let Some(g) = r.throughput_of("blocking", Device::GuestNull, dir, size) {
                let mb = if g.error.is_none() {
                    format!("{:.2}", g.mb_per_s)
                } else {
                    "n/a".into()
                };
                out.push_str(&format!(
                    "{:<8} {:<3} {:<12} {:>10} {:>10} {:>7}  {:>10.0}\n",
                    size_name(size),
                    dir.name(),
                    "(guest only)",
                    mb,
                    "",
                    "",
                    g.msgs_per_s
                ));
            }
        }
        for dir in [Dir::Rx, Dir::Tx] {
            for m in &models {
                let qw = r.throughput_of(m, Device::Qw, dir, size);
                let vs = r.throughput_of(m, Device::VirtioSerial, dir, size);
                let fmt =
                    |t: Option<&bench::Throughput>, f: fn(&bench::Throughput) -> String| match t {
                        Some(t) if t.error.is_none() => f(t),
                        Some(_) => "n/a".into(),
                        None => "-".into(),
                    };
                let val = |t: Option<&bench::Throughput>| {
                    t.filter(|t| t.error.is_none()).map_or(0.0, |t| t.mb_per_s)
                };
                let pct = |c: Option<f64>| c.map_or("-".into(), |c| format!("{:.0}", c * 100.0));
                let cpu = format!(
                    "{}/{}/{}",
                    pct(qw.and_then(|t| t.vmm_cpu)),
                    pct(qw.and_then(|t| t.backend_cpu)),
                    pct(vs.and_then(|t| t.vmm_cpu))
                );
                out.push_str(&format!(
                    "{:<8} {:<3} {:<12} {:>10} {:>10} {:>7}  {:>10} {:>10}  {:>12}\n",
                    size_name(size),
                    dir.name(),
                    m,
                    fmt(qw, |t| format!("{:.2}", t.mb_per_s)),
                    fmt(vs, |t| format!("{:.2}", t.mb_per_s)),
                    ratio(val(qw), val(vs)),
                    fmt(qw, |t| format!("{:.0}", t.msgs_per_s)),
                    fmt(vs, |t| format!("{:.0}", t.msgs_per_s)),
                    cpu,
                ));
            }
        }
        if let Some(p) = r.throughput_of("blocking", Device::Pipe, Dir::Rx, size) {
            out.push_str(&format!(
                "{:<8} {:<3} {:<12} {:>10.1} {:>10} {:>7}  {:>10.0}\n",
                size_name(size),
                "",
                "(host pipe)",
                p.mb_per_s,
                "",
                "",
                p.msgs_per_s
            ));
        }
    }
    let errors: Vec<String> = r
        .throughput
        .iter()
        .filter_map(|t| {
            t.error.as_ref().map(|e| {
                format!(
                    "  {} {} {} on {}: {}",
                    size_name(t.size),
                    t.dir.name(),
                    t.model,
                    t.device.name(),
                    short(e)
                )
            })
        })
        .collect();
    if !errors.is_empty() {
        out.push_str("n/a:\n");
        out.push_str(&errors.join("\n"));
        out.push('\n');
    }
    out
}

fn size_name(size: usize) -> String {
    if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

fn boot_table(r: &BenchReport) -> String {
    let ms = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
    let mut out = format!(
        "Boot, ms from VMM start (QEMU CPU = CPU time QEMU used by driver-ready; in kernel = the guest's uptime at init)\n  the bench boot ({} {}): init {}, driver ready {}, QEMU CPU {}, in kernel {}\n",
        r.boot.kernel,
        r.boot.image,
        ms(r.boot.boot_ms),
        ms(r.boot.driver_ready_ms),
        ms(r.boot.vmm_cpu_ms),
        ms(r.boot.guest_uptime_ms),
    );
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for b in &r.boot_runs {
        if !keys.contains(&(b.kernel.as_str(), b.image.as_str())) {
            keys.push((&b.kernel, &b.image));
        }
    }
    if !keys.is_empty() {
        out.push_str(&format!(
            "  {:<10} {:<8} {:>5}  {:>16} {:>16} {:>16} {:>16}\n",
            "kernel", "image", "boots", "init", "driver ready", "QEMU CPU", "in kernel"
        ));
    }
    for (kernel, image) in keys {
        let runs: Vec<&bench::BootTimes> = r
            .boot_runs
            .iter()
            .filter(|b| b.kernel == kernel && b.image == image)
            .collect();
        let med = |f: fn(&bench::BootTimes) -> Option<u64>| {
            let mut v: Vec<u64> = runs
                .iter()
                .filter(|b| b.error.is_none())
                .filter_map(|b| f(b))
                .collect();
            v.sort_unstable();
            match (v.get(v.len() / 2), v.first(), v.last()) {
                (Some(m), Some(lo), Some(hi)) if v.len() > 1 => format!("{m} ({lo}-{hi})"),
                (Some(m), ..) => m.to_string(),
                _ => "n/a".into(),
            }
        };
        out.push_str(&format!(
            "  {kernel:<10} {image:<8} {:>5}  {:>16} {:>16} {:>16} {:>16}\n",
            runs.len(),
            med(|b| b.boot_ms),
            med(|b| b.driver_ready_ms),
            med(|b| b.vmm_cpu_ms),
            med(|b| b.guest_uptime_ms),
        ));
        for b in runs.iter().filter(|b| b.error.is_some()) {
            out.push_str(&format!(
                "    failed: {}\n",
                short(b.error.as_deref().unwrap_or_default())
            ));
        }
    }
    out
}

/// The targets in one table: per model, qw / virtio-serial for the p50
/// round trip (target <= 1) and the 4 KiB and 64 KiB streams both ways
/// (target >= 1).
fn targets_table(r: &BenchReport) -> String {
    fn ok(t: Option<&bench::Throughput>) -> Option<&bench::Throughput> {
        t.filter(|t| t.error.is_none() && t.mb_per_s > 0.0)
    }
    let mut models: Vec<&str> = Vec::new();
    for l in &r.latency {
        if l.device == Device::Qw && !models.contains(&l.model.as_str()) {
            models.push(&l.model);
        }
    }
    let mut out = String::from(
        "Ratios qw / virtio-serial (targets: p50 <= 1, streams >= 1; '-' = not measured, n/a = one side failed)\n",
    );
    out.push_str(&format!(
        "{:<12} {:>7} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "model", "p50", "4K rx", "4K tx", "64K rx", "64K tx", "targets"
    ));
    for m in models {
        let mut met = 0;
        let mut total = 0;
        let lat = match (
            r.latency_of(m, Device::Qw).filter(|l| l.error.is_none()),
            r.latency_of(m, Device::VirtioSerial)
                .filter(|l| l.error.is_none()),
        ) {
            (Some(q), Some(v)) => {
                let x = q.summary.p50_ns as f64 / v.summary.p50_ns.max(1) as f64;
                total += 1;
                met += usize::from(x <= 1.0);
                format!("{x:.2}")
            }
            (Some(_), None) => "n/a".into(),
            _ => "-".into(),
        };
        let mut cells = Vec::new();
        for size in [4096, 65536] {
            for dir in [Dir::Rx, Dir::Tx] {
                let q = r.throughput_of(m, Device::Qw, dir, size);
                let v = r.throughput_of(m, Device::VirtioSerial, dir, size);
                cells.push(match (ok(q), ok(v)) {
                    (Some(q), Some(v)) => {
                        let x = q.mb_per_s / v.mb_per_s;
                        total += 1;
                        met += usize::from(x >= 1.0);
                        format!("{x:.2}")
                    }
                    (Some(_), None) if v.is_some() => "n/a".into(),
                    _ if q.is_some() || v.is_some() => "n/a".into(),
                    _ => "-".into(),
                });
            }
        }
        out.push_str(&format!(
            "{m:<12} {lat:>7} {:>9} {:>9} {:>9} {:>9}  {met}/{total}\n",
            cells[0], cells[1], cells[2], cells[3]
        ));
    }
    out
}

/// Every table, as printed.
pub fn tables(r: &BenchReport) -> String {
    let m = &r.machine;
    format!(
        "Machine: {} CPUs ({}), host {}, load {} → {}; {} ({}); guest {}\n\n{}\n{}\n{}\n{}",
        m.cpus,
        m.cpu_model,
        m.host_kernel,
        m.loadavg_start,
        m.loadavg_end,
        m.vmm,
        m.accel,
        m.guest_kernel,
        latency_table(r),
        throughput_table(r),
        targets_table(r),
        boot_table(r)
    )
}

const QW: RGBColor = RGBColor(0xd9, 0x5f, 0x02);
const VS: RGBColor = RGBColor(0x1b, 0x9e, 0x77);
const PIPE: RGBColor = RGBColor(0x75, 0x70, 0xb3);

/// The empirical CDF of `samples` (ns) as (µs, fraction) points, at most
/// about 400 of them.
fn cdf(samples: &[u64]) -> Vec<(f64, f64)> {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n == 0 {
        return Vec::new();
    }
    let step = (n / 400).max(1);
    let mut pts: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (s[i] as f64 / 1000.0, (i + 1) as f64 / n as f64))
        .collect();
    pts.push((s[n - 1] as f64 / 1000.0, 1.0));
    pts
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One SVG: a latency CDF per model, qw against virtio-serial (and the
/// host pipe floor, dashed), log time axis.
fn draw_cdfs(r: &BenchReport, path: &Path) -> DrawResult<()> {
    let models: Vec<&str> = r
        .latency
        .iter()
        .filter(|l| l.device == Device::Qw)
        .map(|l| l.model.as_str())
        .collect();
    let cols = 2usize;
    let rows = models.len().div_ceil(cols).max(1);
    let root = SVGBackend::new(path, (1100, 60 + 300 * rows as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
    title.draw_text(
        &format!(
            "Round-trip latency CDF, 16-byte echo: qw (orange) vs virtio-serial (green), host pipe floor (purple); {}",
            r.machine.guest_kernel
        ),
        &("sans-serif", 16).into_text_style(&title),
        (10, 15),
    )?;
    let all: Vec<u64> = r
        .latency
        .iter()
        .flat_map(|l| l.samples_ns.iter().copied())
        .collect();
    let lo = (all.iter().min().copied().unwrap_or(1000) as f64 / 1000.0).max(0.1) * 0.8;
    let hi = (all.iter().max().copied().unwrap_or(1_000_000) as f64 / 1000.0) * 1.2;
    let panels = body.split_evenly((rows, cols));
    for (panel, model) in panels.iter().zip(&models) {
        let mut chart = ChartBuilder::on(panel)
            .caption(*model, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("µs")
            .y_desc("fraction")
            .x_labels(8)
            .y_labels(5)
            .draw()?;
        for (dev, color) in [(Device::Qw, QW), (Device::VirtioSerial, VS)] {
            if let Some(l) = r.latency_of(model, dev) {
                chart.draw_series(LineSeries::new(cdf(&l.samples_ns), color.stroke_width(2)))?;
            }
        }
        if let Some(p) = r.latency_of("blocking", Device::Pipe) {
            chart.draw_series(DashedLineSeries::new(
                cdf(&p.samples_ns),
                4,
                4,
                PIPE.stroke_width(1),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// One SVG: MB/s bars per model, qw next to virtio-serial, a panel per
/// transfer size and direction (log scale), with the host-pipe floor as a
/// line.
fn draw_throughput(r: &BenchReport, path: &Path) -> DrawResult<()> {
    let mut sizes: Vec<usize> = r.throughput.iter().map(|t| t.size).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let models: Vec<&str> = {
        let mut m: Vec<&str> = Vec::new();
        for t in &r.throughput {
            if matches!(t.device, Device::Qw | Device::VirtioSerial)
                && !m.contains(&t.model.as_str())
            {
                m.push(&t.model);
            }
        }
        m
    };
    let root = SVGBackend::new(path, (1200, 60 + 320 * sizes.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
    title.draw_text(
        &format!(
            "Throughput, MB/s (log): qw (orange) vs virtio-serial (green); host pipe (purple line), guest program alone on /dev/zero|null (dashed); {}",
            r.machine.guest_kernel
        ),
        &("sans-serif", 16).into_text_style(&title),
        (10, 15),
    )?;
    let vals: Vec<f64> = r
        .throughput
        .iter()
        .filter(|t| t.error.is_none() && t.mb_per_s > 0.0)
        .map(|t| t.mb_per_s)
        .collect();
    let lo = vals.iter().cloned().fold(f64::INFINITY, f64::min).min(1.0) * 0.5;
    let hi = vals.iter().cloned().fold(0.0, f64::max).max(10.0) * 2.0;
    let panels = body.split_evenly((sizes.len(), 2));
    let n = models.len() as f64;
    for (i, panel) in panels.iter().enumerate() {
        let size = sizes[i / 2];
        let dir = if i % 2 == 0 { Dir::Rx } else { Dir::Tx };
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{} {}", size_name(size), dir.name()),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(60)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..n, (lo..hi).log_scale())?;
        let names = models.clone();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(models.len() * 2 + 1)
            .x_label_formatter(&move |x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                    names[i].to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("MB/s")
            .draw()?;
        for (k, m) in models.iter().enumerate() {
            for (j, (dev, color)) in [(Device::Qw, QW), (Device::VirtioSerial, VS)]
                .into_iter()
                .enumerate()
            {
                if let Some(t) = r.throughput_of(m, dev, dir, size) {
                    let x0 = k as f64 + 0.1 + 0.4 * j as f64;
                    if t.error.is_none() && t.mb_per_s > 0.0 {
                        chart.draw_series(std::iter::once(Rectangle::new(
                            [(x0, lo), (x0 + 0.38, t.mb_per_s)],
                            color.filled(),
                        )))?;
                    } else {
                        chart.draw_series(std::iter::once(Text::new(
                            "n/a",
                            (x0 + 0.05, lo * 1.6),
                            ("sans-serif", 11).into_font().color(&color),
                        )))?;
                    }
                }
            }
        }
        if let Some(p) = r.throughput_of("blocking", Device::Pipe, dir, size) {
            chart.draw_series(LineSeries::new(
                [(0.0, p.mb_per_s), (n, p.mb_per_s)],
                PIPE.stroke_width(2),
            ))?;
        }
        if let Some(g) = r.throughput_of("blocking", Device::GuestNull, dir, size) {
            if g.error.is_none() && g.mb_per_s > 0.0 {
                chart.draw_series(DashedLineSeries::new(
                    [(0.0, g.mb_per_s), (n, g.mb_per_s)],
                    6,
                    4,
                    BLACK.stroke_width(1),
                ))?;
            }
        }
    }
    root.present()?;
    Ok(())
}

/// Write the JSON report and the pictures; their paths.
pub fn write_outputs(r: &BenchReport, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("{}", r.ts);
    let json = dir.join(format!("{stem}.json"));
    std::fs::write(&json, serde_json::to_vec_pretty(r)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let mut out = vec![json];
    let cdf = dir.join(format!("{stem}-latency-cdf.svg"));
    draw_cdfs(r, &cdf).map_err(|e| anyhow::anyhow!("drawing {}: {e}", cdf.display()))?;
    out.push(cdf);
    if !r.throughput.is_empty() {
        let bars = dir.join(format!("{stem}-throughput.svg"));
        draw_throughput(r, &bars)
            .map_err(|e| anyhow::anyhow!("drawing {}: {e}", bars.display()))?;
        out.push(bars);
    }
    Ok(out)
}

/// Run `vdevlab bench`.
pub fn run(args: BenchArgs) -> Result<bool> {
    let mut o = if args.quick {
        BenchOptions::quick(&args.kernel)
    } else {
        BenchOptions::full(&args.kernel)
    };
    if let Some(n) = args.samples {
        if n == 0 {
            bail!("--samples must be at least 1");
        }
        o.samples = n;
        o.warmup = o.warmup.min(n.div_ceil(10).max(10));
    }
    if !args.models.is_empty() {
        for m in &args.models {
            if !bench::MODELS.contains(&m.as_str()) {
                bail!(
                    "unknown I/O model {m} (known: {})",
                    bench::MODELS.join(", ")
                );
            }
        }
        o.models = args.models.clone();
    }
    o.no_throughput = args.no_throughput;
    if let Some(n) = args.reps {
        o.reps = n.max(1);
    }
    if let Some(n) = args.boot_runs {
        o.boot_runs = n;
    }
    o.boot_kernels = args.boot_kernels.clone();
    eprintln!(
        "[vdevlab] provisioning the lab and building the guest image (cached after the first run)"
    );
    let lab = Lab::get()?;
    let report = bench::run(&lab, &o, |line| eprintln!("[vdevlab bench] {line}"))?;
    println!("{}", tables(&report));
    let dir = args
        .out
        .unwrap_or_else(|| vdevlab_lab::env::runs_dir().join("bench"));
    for p in write_outputs(&report, &dir)? {
        println!("wrote {}", p.display());
    }
    if let Some(c) = &report.console {
        println!("console: {}", c.display());
    }
    if let Some(why) = &report.aborted {
        println!("INCOMPLETE: {why}");
        return Ok(false);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdevlab_lab::bench::{BootTimes, Latency, Machine, Summary, Throughput};

    fn report() -> BenchReport {
        let lat = |model: &str, device, base: u64, error: Option<&str>| {
            let samples: Vec<u64> = (0..500).map(|i| base + i * 37 % 900).collect();
            Latency {
                model: model.into(),
                device,
                summary: Summary::of(&samples),
                samples_ns: samples,
                vmm_cpu_us_per_msg: Some(40.0),
                backend_cpu_us_per_msg: None,
                guest: None,
                error: error.map(str::to_string),
            }
        };
        let tp = |model: &str, device, dir, size, mb: f64| Throughput {
            model: model.into(),
            device,
            dir,
            size,
            bytes: 1 << 20,
            secs: 1.0,
            mb_per_s: mb,
            msgs_per_s: mb * 1e6 / size as f64,
            runs_mb_per_s: vec![mb],
            vmm_cpu: Some(0.9),
            backend_cpu: None,
            guest: None,
            error: None,
        };
        BenchReport {
            ts: 1,
            machine: Machine {
                cpus: 2,
                cpu_model: "cpu".into(),
                host_kernel: "6.18".into(),
                loadavg_start: "1 1 1".into(),
                loadavg_end: "2 2 2".into(),
                vmm: "QEMU".into(),
                accel: "tcg".into(),
                guest_kernel: "7.3 (trixie)".into(),
            },
            samples: 500,
            warmup: 10,
            boot: BootTimes {
                kernel: "trixie".into(),
                image: "vmlinux".into(),
                boot_ms: Some(9000),
                driver_ready_ms: Some(9200),
                vmm_cpu_ms: Some(8000),
                guest_uptime_ms: Some(7000),
                error: None,
            },
            boot_runs: vec![
                BootTimes {
                    kernel: "lab".into(),
                    image: "vmlinux".into(),
                    boot_ms: Some(1500),
                    driver_ready_ms: Some(1900),
                    vmm_cpu_ms: Some(1700),
                    guest_uptime_ms: Some(1000),
                    error: None,
                },
                BootTimes {
                    kernel: "lab".into(),
                    image: "vmlinux".into(),
                    boot_ms: Some(1700),
                    driver_ready_ms: Some(2100),
                    vmm_cpu_ms: Some(1800),
                    guest_uptime_ms: Some(1100),
                    error: None,
                },
                BootTimes {
                    kernel: "lab".into(),
                    image: "vmlinuz".into(),
                    error: Some("no VDEVLAB-BOOT".into()),
                    ..BootTimes::default()
                },
            ],
            latency: vec![
                lat("poll", Device::Qw, 300_000, None),
                lat("poll", Device::VirtioSerial, 150_000, None),
                lat("linux-aio", Device::Qw, 310_000, None),
                lat(
                    "linux-aio",
                    Device::VirtioSerial,
                    0,
                    Some("io_submit: EINVAL"),
                ),
                lat("blocking", Device::Pipe, 5_000, None),
            ],
            throughput: vec![
                tp("poll", Device::Qw, Dir::Rx, 64, 1.5),
                tp("poll", Device::VirtioSerial, Dir::Rx, 64, 3.0),
                tp("poll", Device::Qw, Dir::Tx, 64, 1.0),
                tp("poll", Device::VirtioSerial, Dir::Tx, 64, 2.0),
                tp("blocking", Device::Pipe, Dir::Rx, 64, 300.0),
                tp("blocking", Device::GuestNull, Dir::Rx, 64, 30.0),
            ],
            console: None,
            duration_s: 1.0,
            aborted: None,
        }
    }

    #[test]
    fn tables_show_ratios_and_unavailable_cells() {
        let t = tables(&report());
        assert!(t.contains("poll"), "{t}");
        // qw p50 300.5 µs against 150.5 µs: about 2.00.
        assert!(t.contains("2.00"), "{t}");
        assert!(t.contains("n/a: io_submit: EINVAL"), "{t}");
        assert!(t.contains("(floor)"), "{t}");
        assert!(t.contains("0.50"), "throughput ratio: {t}");
        assert!(t.contains("(guest only)"), "{t}");
        // The targets table: poll's p50 ratio, linux-aio's failed baseline.
        assert!(t.contains("Ratios qw / virtio-serial"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("poll") && l.contains("0/1")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("linux-aio") && l.contains("n/a")),
            "{t}"
        );
        assert!(
            t.contains("the bench boot (trixie vmlinux): init 9000, driver ready 9200"),
            "{t}"
        );
        // Boot runs: the median of two and its range; a failed boot.
        assert!(
            t.lines().any(|l| l.contains("lab")
                && l.contains("vmlinux")
                && l.contains("2100 (1900-2100)")),
            "{t}"
        );
        assert!(t.contains("failed: no VDEVLAB-BOOT"), "{t}");
    }

    #[test]
    fn outputs_are_json_and_svg() {
        let dir = std::env::temp_dir().join(format!("vdevlab-bench-{}", std::process::id()));
        let files = write_outputs(&report(), &dir).unwrap();
        assert_eq!(files.len(), 3);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
        assert_eq!(json["latency"][0]["device"], "qw");
        assert_eq!(json["latency"][1]["device"], "virtio-serial");
        assert_eq!(
            json["latency"][0]["samples_ns"].as_array().unwrap().len(),
            500
        );
        for svg in &files[1..] {
            let text = std::fs::read_to_string(svg).unwrap();
            assert!(
                text.starts_with("<svg") && text.contains("</svg>"),
                "{svg:?}"
            );
            assert!(text.contains("poll"), "{svg:?}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
