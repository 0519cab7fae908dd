//! `sensor-stress`: the stress's smaller twin for the sampling sensor
//! (`/dev/sensor0`, `docs/sensor-spec.md`), its three queues at once:
//!
//! - readers of the samples queue (blocking, O_NONBLOCK spinning, poll),
//!   each asking for a seeded number of samples per `read()`;
//! - an alarm taker (poll for `EPOLLPRI`, then `SENSOR_IOC_GET_ALARM`
//!   until `EAGAIN`) on the events queue;
//! - two controllers on the ctrl queue at once, `SET_RATE` and
//!   `SET_THRESHOLD` with seeded values, racing each other for the
//!   driver's one request slot (`ctrl_mutex`);
//! - a config reader (`SENSOR_IOC_GET_INFO`: the config space, read while
//!   the controllers change the rate and threshold words);
//! - open/close churn and the signaller (as for qw).
//!
//! `VDEVLAB-READY sensor-stress`; after `--seconds` the device is unbound
//! with all of it running, every thread must end (`ENODEV`) within 30 s;
//! `VDEVLAB-READY sensor-stress-2`, then the checks: every sample read is
//! the waveform's value for its `seq`, no `seq` was read twice, each
//! reader's come in order, each alarm's value is its sample's; the
//! samples the driver received are exactly those read and those its full
//! FIFO dropped (`samples_dropped`): readers still get what it buffered
//! after the unbind, then `ENODEV`; every config read shows a rate and a threshold a
//! controller set (or the starting ones).
//!
//! Fields: `samples_received`, `samples_read`, `samples_dropped`,
//! `lost_at_unbind`, `reader_samples`, `alarms`, `ctrl_requests`,
//! `config_reads`, `config_changes_seen`, `eagain`, `eintr`,
//! `signals_to_driver_sleepers`, `opens`, `ends`.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::records::Rng;
use super::{
    add, forget_signals, gettid, install, json_nums, sleep_of, spawn, tgkill, Sleep, StressOpts,
    SEEN,
};
use crate::common::{errno_name, last_errno, nap, open_device, write_sysfs, Access};
use crate::ready;
use crate::scenarios::sensor::Wave;
use crate::scenarios::Checked;
use crate::uapi::sensor::{
    get_alarm, get_info, get_stats, set_rate, set_threshold, SensorSample, SENSOR_DRIVER,
};

/// The scenario's name.
pub const NAME: &str = "sensor-stress";
/// Rates the controllers set (Hz).
const RATES: &[u32] = &[200, 500, 1000, 2000, 5000];

#[derive(Debug, Default)]
struct Shared {
    device: String,
    unbinding: AtomicBool,
    stop: AtomicBool,
    targets: Mutex<Vec<libc::pid_t>>,
    /// Rates and thresholds any controller asked for.
    rates: Mutex<HashSet<u32>>,
    thresholds: Mutex<HashSet<i32>>,
    opens: AtomicU64,
    eagain: AtomicU64,
    eintr: AtomicU64,
    to_driver: AtomicU64,
    ctrl: AtomicU64,
}

#[derive(Debug, Default)]
struct Out {
    name: String,
    /// The seqs this thread read, in order.
    seqs: Vec<u32>,
    alarms: u64,
    config_reads: u64,
    config_changes: u64,
    end: String,
    problems: Vec<String>,
}

fn gone(sh: &Shared, e: i32) -> bool {
    sh.unbinding.load(Ordering::SeqCst) && matches!(e, libc::ENODEV | libc::ENXIO | libc::ENOENT)
}

fn reader(sh: Arc<Shared>, wave: Wave, idx: usize, seed: u64) -> Out {
    let model = ["blocking", "nonblocking", "poll"][idx % 3];
    let mut out = Out {
        name: format!("sensor reader {idx} ({model})"),
        ..Out::default()
    };
    let fd = match open_device(&sh.device, Access::Read, model != "blocking") {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(e);
            return out;
        }
    };
    add(&sh.opens);
    sh.targets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(gettid());
    let raw = fd.as_raw_fd();
    let mut rng = Rng::new(seed, 200 + idx as u64);
    let mut buf = vec![SensorSample::default(); 64];
    loop {
        let n = rng.range(1, 64) as usize;
        forget_signals();
        // SAFETY: `buf` holds 64 samples of 16 bytes; at most n are read.
        let got = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), n * 16) };
        if got < 0 {
            let e = last_errno();
            match e {
                libc::EAGAIN => {
                    add(&sh.eagain);
                    if model == "poll" {
                        let mut p = libc::pollfd {
                            fd: raw,
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        unsafe { libc::poll(&mut p, 1, 100) };
                    } else {
                        nap(Duration::from_micros(300));
                    }
                }
                libc::EINTR => {
                    add(&sh.eintr);
                    if SEEN.with(std::cell::Cell::get) == 2 {
                        out.problems.push(format!(
                            "{}: EINTR after SIGUSR2 alone (SA_RESTART)",
                            out.name
                        ));
                    }
                }
                e if gone(&sh, e) => {
                    out.end = errno_name(e);
                    break;
                }
                e => {
                    out.problems
                        .push(format!("{}: {} before the unbind", out.name, errno_name(e)));
                    out.end = errno_name(e);
                    break;
                }
            }
            continue;
        }
        let got = got as usize;
        if got == 0 || !got.is_multiple_of(16) {
            out.problems.push(format!(
                "{}: a read of {n} samples returned {got} bytes",
                out.name
            ));
            out.end = format!("read {got}");
            break;
        }
        for smp in &buf[..got / 16] {
            if smp.value != wave.value(smp.seq) {
                out.problems.push(format!(
                    "{}: sample {} has value {}, the waveform's is {}",
                    out.name,
                    smp.seq,
                    smp.value,
                    wave.value(smp.seq)
                ));
            }
            if out.seqs.last().is_some_and(|&l| smp.seq <= l) {
                out.problems.push(format!(
                    "{}: sample {} after sample {} (not in order)",
                    out.name,
                    smp.seq,
                    out.seqs.last().copied().unwrap_or(0)
                ));
            }
            out.seqs.push(smp.seq);
        }
    }
    out
}

fn alarm_taker(sh: Arc<Shared>, wave: Wave) -> Out {
    let mut out = Out {
        name: "alarm taker".into(),
        ..Out::default()
    };
    let fd = match open_device(&sh.device, Access::Read, true) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(e);
            return out;
        }
    };
    add(&sh.opens);
    let raw = fd.as_raw_fd();
    loop {
        let mut p = libc::pollfd {
            fd: raw,
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
        loop {
            match get_alarm(raw) {
                Ok(Some(a)) => {
                    out.alarms += 1;
                    if a.value != wave.value(a.seq) {
                        out.problems.push(format!(
                            "alarm for sample {} with value {}, the waveform's is {}",
                            a.seq,
                            a.value,
                            wave.value(a.seq)
                        ));
                    }
                }
                Ok(None) => break,
                Err(libc::EINTR) => {}
                Err(e) if gone(&sh, e) => {
                    out.end = errno_name(e);
                    return out;
                }
                Err(e) => {
                    out.problems
                        .push(format!("SENSOR_IOC_GET_ALARM: {}", errno_name(e)));
                    return out;
                }
            }
        }
        if sh.stop.load(Ordering::SeqCst) {
            out.end = "stopped".into();
            return out;
        }
    }
}

fn controller(sh: Arc<Shared>, idx: u64, seed: u64, amplitude: i32) -> Out {
    let mut out = Out {
        name: format!("controller {idx}"),
        ..Out::default()
    };
    let fd = match open_device(&sh.device, Access::ReadWrite, false) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(e);
            return out;
        }
    };
    add(&sh.opens);
    let raw = fd.as_raw_fd();
    let mut rng = Rng::new(seed, 300 + idx);
    while !sh.stop.load(Ordering::SeqCst) {
        nap(Duration::from_millis(rng.range(2, 40)));
        let r = if rng.range(0, 1) == 0 {
            let hz = RATES[rng.range(0, RATES.len() as u64 - 1) as usize];
            sh.rates
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(hz);
            set_rate(raw, hz)
        } else {
            let t = rng.range(0, 2 * amplitude.max(1) as u64) as i32 - amplitude;
            sh.thresholds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(t);
            set_threshold(raw, t, rng.range(0, 3) as u32)
        };
        match r {
            Ok(()) => add(&sh.ctrl),
            Err(libc::EINTR) => {}
            Err(e) if gone(&sh, e) => break,
            Err(e) => {
                out.problems.push(format!(
                    "{}: a control request: {}",
                    out.name,
                    errno_name(e)
                ));
                break;
            }
        }
    }
    out.end = "stopped".into();
    out
}

fn config_reader(sh: Arc<Shared>) -> Out {
    let mut out = Out {
        name: "config reader".into(),
        ..Out::default()
    };
    let fd = match open_device(&sh.device, Access::Read, false) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(e);
            return out;
        }
    };
    add(&sh.opens);
    let raw = fd.as_raw_fd();
    let mut last = None;
    while !sh.stop.load(Ordering::SeqCst) {
        match get_info(raw) {
            Ok(i) => {
                out.config_reads += 1;
                let rate_ok = i.rate_hz == 0
                    || sh
                        .rates
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&i.rate_hz);
                let thr_ok = i.threshold == 0
                    || sh
                        .thresholds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains(&i.threshold);
                if !rate_ok || !thr_ok {
                    out.problems.push(format!(
                        "a config read shows rate {} Hz and threshold {}, which no controller set",
                        i.rate_hz, i.threshold
                    ));
                    break;
                }
                if last.is_some_and(|l| l != (i.rate_hz, i.threshold)) {
                    out.config_changes += 1;
                }
                last = Some((i.rate_hz, i.threshold));
            }
            Err(_) if sh.unbinding.load(Ordering::SeqCst) => break,
            Err(e) if e.contains("EINTR") => {}
            Err(e) => {
                out.problems.push(e);
                break;
            }
        }
        nap(Duration::from_micros(500));
    }
    out.end = "stopped".into();
    out
}

fn churner(sh: Arc<Shared>, seed: u64) -> Out {
    let mut out = Out {
        name: "churner".into(),
        ..Out::default()
    };
    let mut rng = Rng::new(seed, 5);
    while !sh.stop.load(Ordering::SeqCst) {
        match open_device(&sh.device, Access::Read, rng.range(0, 1) == 1) {
            Ok(fd) => {
                add(&sh.opens);
                let _ = get_stats(fd.as_raw_fd());
            }
            Err(e) if !sh.unbinding.load(Ordering::SeqCst) => {
                out.problems.push(format!("churner: {e}"));
                break;
            }
            Err(_) => {}
        }
        nap(Duration::from_micros(rng.range(200, 3000)));
    }
    out.end = "stopped".into();
    out
}

fn signaller(sh: Arc<Shared>, seed: u64) -> Out {
    let mut rng = Rng::new(seed, 6);
    while !sh.stop.load(Ordering::SeqCst) {
        nap(Duration::from_micros(rng.range(500, 8000)));
        let tid = {
            let t = sh.targets.lock().unwrap_or_else(|e| e.into_inner());
            if t.is_empty() {
                continue;
            }
            t[rng.range(0, t.len() as u64 - 1) as usize]
        };
        if sleep_of(tid) == Sleep::Driver {
            add(&sh.to_driver);
        }
        tgkill(
            tid,
            if rng.range(0, 9) < 6 {
                libc::SIGUSR1
            } else {
                libc::SIGUSR2
            },
        );
    }
    Out {
        name: "signaller".into(),
        end: "stopped".into(),
        ..Out::default()
    }
}

/// The virtio device the sensor driver is bound to.
fn bound(sysfs: &Path) -> Result<String, String> {
    let dir = sysfs.join("bus/virtio/drivers").join(SENSOR_DRIVER);
    std::fs::read_dir(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("virtio"))
        .ok_or_else(|| format!("no device bound to {SENSOR_DRIVER}"))
}

/// Run `sensor-stress` (`--device` defaults to `/dev/qw0` in the options:
/// it means `/dev/sensor0` here unless given).
pub fn run(o: &StressOpts) -> Result<Checked, String> {
    install(libc::SIGUSR1, false)?;
    install(libc::SIGUSR2, true)?;
    let device = if o.device == "/dev/qw0" {
        "/dev/sensor0".to_string()
    } else {
        o.device.clone()
    };
    let keeper = open_device(&device, Access::ReadWrite, false)?;
    let info = get_info(keeper.as_raw_fd())?;
    let wave = Wave::of(&info);
    let s0 = get_stats(keeper.as_raw_fd())?;
    set_rate(keeper.as_raw_fd(), 1000).map_err(|e| format!("SET_RATE: {}", errno_name(e)))?;
    let sh = Arc::new(Shared {
        device,
        ..Shared::default()
    });
    sh.rates
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(1000);
    let mut workers = Vec::new();
    for i in 0..o.readers {
        let (s, w, seed) = (Arc::clone(&sh), Wave { ..wave }, o.seed);
        workers.push(spawn(format!("sreader-{i}"), move || {
            let r = reader(s, w, i, seed);
            super::Out {
                name: r.name.clone(),
                end: r.end.clone(),
                problems: r.problems.clone(),
                runs: r.seqs.iter().map(|&q| (u64::from(q), 1)).collect(),
                ..super::Out::default()
            }
        })?);
    }
    // The helpers report through the parent module's Out: seqs as runs,
    // counts in bytes/config_reads/flushes.
    let conv = |r: Out| super::Out {
        name: r.name,
        end: r.end,
        problems: r.problems,
        bytes: r.alarms,
        config_reads: r.config_reads,
        flushes: vec![r.config_changes],
        ..super::Out::default()
    };
    let mut helpers = Vec::new();
    let (s, w) = (Arc::clone(&sh), Wave { ..wave });
    helpers.push(spawn("alarms".into(), move || conv(alarm_taker(s, w)))?);
    for i in 0..2 {
        let (s, seed, a) = (Arc::clone(&sh), o.seed, info.amplitude as i32);
        helpers.push(spawn(format!("ctrl-{i}"), move || {
            conv(controller(s, i, seed, a))
        })?);
    }
    let s = Arc::clone(&sh);
    helpers.push(spawn("sconfig".into(), move || conv(config_reader(s)))?);
    let (s, seed) = (Arc::clone(&sh), o.seed);
    helpers.push(spawn("schurn".into(), move || conv(churner(s, seed)))?);
    let (s, seed) = (Arc::clone(&sh), o.seed);
    helpers.push(spawn("ssignal".into(), move || conv(signaller(s, seed)))?);
    let sysfs = Path::new("/sys");
    let name = bound(sysfs)?;
    ready(NAME);

    nap(Duration::from_secs(o.seconds));

    let mut c = Checked::new();
    sh.unbinding.store(true, Ordering::SeqCst);
    let unbind = sysfs
        .join("bus/virtio/drivers")
        .join(SENSOR_DRIVER)
        .join("unbind");
    if let Err(e) = write_sysfs(&unbind, &name) {
        c.fail(e);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while workers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        nap(Duration::from_millis(10));
    }
    sh.stop.store(true, Ordering::SeqCst);
    while helpers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        nap(Duration::from_millis(10));
    }
    let mut outs = Vec::new();
    for h in workers.into_iter().chain(helpers) {
        if !h.is_finished() {
            let n = h.thread().name().unwrap_or("?").to_string();
            c.fail(format!("{n} did not end within 30 s of the unbind"));
            continue;
        }
        match h.join() {
            Ok(out) => outs.push(out),
            Err(_) => c.fail("a thread panicked"),
        }
    }
    let s1 = get_stats(keeper.as_raw_fd())?;
    ready(&format!("{NAME}-2"));

    for out in &outs {
        c.problems.extend(out.problems.iter().cloned());
    }
    let readers: Vec<&super::Out> = outs
        .iter()
        .filter(|o| o.name.starts_with("sensor reader"))
        .collect();
    let mut seen = HashSet::new();
    let mut twice = 0u64;
    for r in &readers {
        for &(q, _) in &r.runs {
            if !seen.insert(q) {
                twice += 1;
            }
        }
    }
    c.check(twice == 0, || {
        format!("{twice} samples were read by more than one reader")
    });
    let read = seen.len() as u64 + twice;
    let received = s1.samples - s0.samples;
    let dropped = s1.samples_dropped - s0.samples_dropped;
    let lost = received.checked_sub(read + dropped);
    // Readers still get what was buffered after the unbind (then ENODEV):
    // nothing the driver received may be missing.
    c.check(lost == Some(0), || {
        format!(
            "the driver received {received} samples and dropped {dropped}, the readers read {read}: \
             {} unaccounted for",
            received as i64 - (read + dropped) as i64
        )
    });
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let alarms: u64 = outs
        .iter()
        .filter(|o| o.name == "alarm taker")
        .map(|o| o.bytes)
        .sum();
    let changes: u64 = outs
        .iter()
        .filter(|o| o.name == "config reader")
        .flat_map(|o| o.flushes.clone())
        .sum();
    c.report
        .num("seconds", o.seconds)
        .num("seed", o.seed)
        .num("samples_received", received)
        .num("samples_read", read)
        .num("samples_dropped", dropped)
        .num("lost_at_unbind", lost.unwrap_or(0))
        .raw(
            "reader_samples",
            &json_nums(readers.iter().map(|r| r.runs.len() as u64)),
        )
        .num("alarms", alarms)
        .num("ctrl_requests", get(&sh.ctrl))
        .num(
            "config_reads",
            outs.iter().map(|o| o.config_reads).sum::<u64>(),
        )
        .num("config_changes_seen", changes)
        .num("eagain", get(&sh.eagain))
        .num("eintr", get(&sh.eintr))
        .num("signals_to_driver_sleepers", get(&sh.to_driver))
        .num("opens", get(&sh.opens))
        .raw(
            "ends",
            &super::ends_json(outs.iter().map(|o| (o.name.as_ref(), o.end.as_ref()))),
        )
        .raw("driver_stats", &s1.json());
    Ok(c)
}
