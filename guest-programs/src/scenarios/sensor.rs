//! The sampling sensor's scenarios (`docs/sensor-spec.md`, driver
//! `guest-driver/sensor/`, `/dev/sensorN`):
//!
//! - `sensor-stream`: sets a threshold (both directions) and a rate, waits
//!   in `poll(POLLPRI)` for the first alarm, reads `--samples` samples and
//!   checks every one (sequence, value from the seeded waveform, timestamp
//!   step = the period); changes the rate, reads `--samples2` more and
//!   checks that the step switches once to the new period; stops, drains,
//!   and checks that the alarms are exactly the threshold crossings of the
//!   samples read; then that a stopped sensor stays quiet, that bad
//!   arguments get `EINVAL`, and that nothing was dropped.
//! - `sensor-unbind`: a blocked reader, a blocked `poll` and an alarm
//!   waiter sleep on a stopped sensor while the device is unbound through
//!   sysfs: each must wake with `ENODEV` / `POLLHUP`; the open file still
//!   answers `SENSOR_IOC_GET_STATS` (state REMOVED); after a rebind
//!   `/dev/sensor0` works again.
//! - `sensor-reset`: samples, then `VDEVLAB-READY sensor-reset`, and the
//!   host declares the device broken (`needs_reset`): the program must see
//!   NEEDS_RESET in the status within 10 s and no more samples, then
//!   `SENSOR_IOC_RESET` brings the device back at power-on (stopped,
//!   alarms off, the next sample is sequence 0 at time 0).
//! - `sensor-hostile`: the device breaks the virtio contract. After
//!   `VDEVLAB-READY sensor-hostile` the host makes one sample buffer come
//!   back with a used length past its end: the driver drops it (one gap in
//!   `seq`, one error) and every other sample is still right. After
//!   `VDEVLAB-READY sensor-hostile-2` a used entry names an id the driver
//!   never posted: the queue is broken, so a blocked read fails with `EIO`
//!   (after the samples already received), poll reports `POLLERR`,
//!   `SENSOR_IOC_SET_RATE` fails with `EIO`, and `SENSOR_IOC_RESET` brings
//!   the device back at power-on.
//!
//! Both print `VDEVLAB-READY <scenario>` after opening the device, and a
//! result line that keeps every observation and lists every failed check.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    errno_name, mask_name, nap, open_device, poll_one, wait_for_chardev, write_sysfs, Access,
};
use crate::ready;
use crate::scenarios::Checked;
use crate::uapi::sensor::{
    get_alarm, get_info, get_stats, read_samples, reset_device, set_rate, set_threshold,
    SensorInfo, SensorSample, ALARM_FALLING, ALARM_RISING, SENSOR_DRIVER, STATE_BROKEN,
    STATE_REMOVED, STATUS_NEEDS_RESET, STATUS_SAMPLING,
};

/// The sensor scenarios.
pub const SENSOR_SCENARIOS: &[&str] = &[
    "sensor-stream",
    "sensor-unbind",
    "sensor-reset",
    "sensor-hostile",
    "sensor-alarms",
];

/// The waveform parameters (from the config space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wave {
    /// Seed of the noise.
    pub seed: u64,
    /// Amplitude A.
    pub amplitude: u32,
    /// Period P in samples.
    pub period: u32,
    /// Noise amplitude N.
    pub noise: u32,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Wave {
    /// The waveform a device's config space describes.
    pub fn of(info: &SensorInfo) -> Self {
        Wave {
            seed: info.seed,
            amplitude: info.amplitude,
            period: info.wave_period,
            noise: info.noise,
        }
    }

    /// The value of sample `seq` (docs/sensor-spec.md, "The waveform"). The
    /// device model has its own copy; both pin the same values in tests.
    pub fn value(&self, seq: u32) -> i32 {
        let a = i64::from(self.amplitude);
        let p = i64::from(self.period.max(1));
        let phase = i64::from(seq) % p;
        let tri = if 2 * phase < p {
            -a + (4 * a * phase) / p
        } else {
            3 * a - (4 * a * phase) / p
        };
        let noise = if self.noise == 0 {
            0
        } else {
            let n = u64::from(self.noise);
            (splitmix64(self.seed ^ u64::from(seq)) % (2 * n + 1)) as i64 - n as i64
        };
        (tri + noise) as i32
    }

    /// The alarm kind sample `seq` raises under `threshold` and `mode`.
    pub fn crossing(&self, seq: u32, threshold: i32, mode: u32) -> Option<u32> {
        if seq == 0 {
            return None;
        }
        let (prev, cur) = (self.value(seq - 1), self.value(seq));
        if mode & ALARM_RISING != 0 && prev < threshold && threshold <= cur {
            Some(ALARM_RISING)
        } else if mode & ALARM_FALLING != 0 && prev >= threshold && threshold > cur {
            Some(ALARM_FALLING)
        } else {
            None
        }
    }
}

/// Command line of a sensor scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SensorOpts {
    /// Scenario name.
    pub scenario: String,
    /// Device node.
    pub device: String,
    /// First rate, Hz.
    pub rate: u32,
    /// Second rate, Hz.
    pub rate2: u32,
    /// Samples to read at the first rate.
    pub samples: u32,
    /// Samples to read after the rate change.
    pub samples2: u32,
    /// Samples per read() call.
    pub chunk: u32,
    /// Threshold; `None`: half the amplitude.
    pub threshold: Option<i32>,
}

/// Parse `SCENARIO [--device P] [--rate R] [--rate2 R] [--samples N]
/// [--samples2 N] [--chunk N] [--threshold T]`.
pub fn parse(args: &[String]) -> Result<SensorOpts, String> {
    let mut it = args.iter();
    let scenario = it.next().ok_or("no scenario")?.clone();
    if !SENSOR_SCENARIOS.contains(&scenario.as_str()) {
        return Err(format!("unknown sensor scenario {scenario}"));
    }
    let mut o = SensorOpts {
        scenario,
        device: "/dev/sensor0".into(),
        rate: 500,
        rate2: 250,
        samples: 300,
        samples2: 100,
        chunk: 7,
        threshold: None,
    };
    while let Some(flag) = it.next() {
        let (flag, value) = match flag.split_once('=') {
            Some((f, v)) => (f.to_string(), v.to_string()),
            None => (
                flag.clone(),
                it.next()
                    .ok_or_else(|| format!("{flag} needs a value"))?
                    .clone(),
            ),
        };
        let num = |v: &str| v.parse::<u32>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--device" => o.device = value,
            "--rate" => o.rate = num(&value)?,
            "--rate2" => o.rate2 = num(&value)?,
            "--samples" => o.samples = num(&value)?,
            "--samples2" => o.samples2 = num(&value)?,
            "--chunk" => o.chunk = num(&value)?.max(1),
            "--threshold" => {
                o.threshold = Some(value.parse().map_err(|e| format!("{flag} {value}: {e}"))?)
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    if o.rate == 0 || o.rate2 == 0 || o.rate == o.rate2 {
        return Err("--rate and --rate2 must be different and not 0".into());
    }
    Ok(o)
}

/// Checks a run of samples as they arrive.
#[derive(Debug)]
struct Stream {
    wave: Wave,
    got: Vec<SensorSample>,
    /// Byte count of a read() that was not a multiple of 16, or a sample
    /// out of order / with a wrong value: the first few, spelled out.
    bad: Vec<String>,
}

impl Stream {
    /// Nothing read yet.
    fn new(wave: Wave) -> Self {
        Self {
            wave,
            got: Vec::new(),
            bad: Vec::new(),
        }
    }

    fn push(&mut self, s: SensorSample) {
        if let Some(prev) = self.got.last() {
            if s.seq != prev.seq.wrapping_add(1) && self.bad.len() < 5 {
                self.bad
                    .push(format!("seq {} follows seq {}", s.seq, prev.seq));
            }
            if s.timestamp_ns <= prev.timestamp_ns && self.bad.len() < 5 {
                self.bad.push(format!(
                    "seq {}: timestamp {} not after {}",
                    s.seq, s.timestamp_ns, prev.timestamp_ns
                ));
            }
        }
        let want = self.wave.value(s.seq);
        if s.value != want && self.bad.len() < 5 {
            self.bad
                .push(format!("seq {}: value {} expected {want}", s.seq, s.value));
        }
        self.got.push(s);
    }

    /// Read until `n` more samples arrived (blocking reads of `chunk`).
    fn read_n(&mut self, fd: RawFd, n: usize, chunk: usize) -> Result<(), String> {
        let goal = self.got.len() + n;
        while self.got.len() < goal {
            let want = chunk.min(goal - self.got.len());
            let batch = read_samples(fd, want).map_err(|e| format!("read: {}", errno_name(e)))?;
            if batch.is_empty() {
                return Err("read returned 0".into());
            }
            for s in batch {
                self.push(s);
            }
        }
        Ok(())
    }

    /// The timestamp steps from index `from` on.
    fn steps(&self, from: usize) -> Vec<u64> {
        self.got
            .windows(2)
            .skip(from.saturating_sub(1))
            .map(|w| w[1].timestamp_ns - w[0].timestamp_ns)
            .collect()
    }
}

/// `sensor-stream` (see the module's documentation).
pub fn stream(o: &SensorOpts) -> Result<Checked, String> {
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let mut c = Checked::new();
    let info = get_info(fd)?;
    c.report.raw("info_start", &info_json(&info));
    c.check(info.version == 1, || {
        format!("config version {}", info.version)
    });
    c.check(
        info.rate_hz == 0 && info.status & STATUS_SAMPLING == 0,
        || format!("the sensor samples before it was asked to: {info:?}"),
    );
    let wave = Wave::of(&info);
    let threshold = o
        .threshold
        .unwrap_or_else(|| i32::try_from(info.amplitude / 2).unwrap_or(0));
    ready(&o.scenario);

    check_bad_arguments(&mut c, fd, &info, threshold);
    let Some(t0) = start_sampling(&mut c, fd, o, threshold)? else {
        return Ok(c);
    };
    let mut st = Stream::new(wave);
    st.read_n(fd, o.samples as usize, o.chunk as usize)?;
    let first = check_first_rate(&mut c, fd, o, &st, t0)?;
    check_rate_change(&mut c, fd, o, &mut st)?;
    stop_and_drain(&mut c, fd, &mut st)?;

    let last = *st.got.last().unwrap_or(&first);
    c.report
        .num("samples", st.got.len() as u64)
        .num("last_seq", u64::from(last.seq));
    for b in &st.bad {
        c.fail(b.clone());
    }
    check_alarms(&mut c, fd, &st, (first.seq, last.seq), threshold);
    check_end(&mut c, fd)?;
    Ok(c)
}

/// Bad arguments are refused by the device, through the driver: a rate
/// above the maximum and an undefined threshold mode give `EINVAL`.
fn check_bad_arguments(c: &mut Checked, fd: RawFd, info: &SensorInfo, threshold: i32) {
    let bad_rate = set_rate(fd, info.max_rate_hz.saturating_add(1));
    c.report.text("bad_rate", &outcome(&bad_rate));
    c.check(bad_rate == Err(libc::EINVAL), || {
        format!("rate max+1 gave {}, expected EINVAL", outcome(&bad_rate))
    });
    let bad_mode = set_threshold(fd, threshold, 7);
    c.report.text("bad_mode", &outcome(&bad_mode));
    c.check(bad_mode == Err(libc::EINVAL), || {
        format!("mode 7 gave {}, expected EINVAL", outcome(&bad_mode))
    });
}

/// Set the threshold (both directions) and the first rate, and wait for
/// the first alarm (`POLLPRI`: the waveform crosses the threshold within
/// one period). Returns when sampling was asked for, or `None` when the
/// rate was refused (the run ends there).
fn start_sampling(
    c: &mut Checked,
    fd: RawFd,
    o: &SensorOpts,
    threshold: i32,
) -> Result<Option<Instant>, String> {
    let r = set_threshold(fd, threshold, ALARM_RISING | ALARM_FALLING);
    c.check(r.is_ok(), || format!("SET_THRESHOLD: {}", outcome(&r)));
    let t0 = Instant::now();
    if let Err(e) = set_rate(fd, o.rate) {
        c.fail(format!("SET_RATE {}: {}", o.rate, errno_name(e)));
        return Ok(None);
    }
    let pri = poll_one(fd, libc::POLLPRI, 10_000)?;
    let alarm_wait_ms = t0.elapsed().as_millis() as u64;
    c.report
        .text("alarm_poll", &mask_name(pri as u32))
        .num("alarm_wait_ms", alarm_wait_ms);
    c.check(pri & libc::POLLPRI != 0, || {
        format!(
            "no POLLPRI within 10 s of starting ({})",
            mask_name(pri as u32)
        )
    });
    Ok(Some(t0))
}

/// The sample period at `rate_hz`, in ns.
fn period_ns(rate_hz: u32) -> u64 {
    1_000_000_000 / u64::from(rate_hz)
}

/// The samples read at the first rate (sampling asked for at `t0`): the
/// first is sequence 0 at 0 ns, every step is one period, none came
/// before its time, and the config says sampling at that rate. Returns
/// the first sample.
fn check_first_rate(
    c: &mut Checked,
    fd: RawFd,
    o: &SensorOpts,
    st: &Stream,
    t0: Instant,
) -> Result<SensorSample, String> {
    let elapsed = t0.elapsed();
    let p1 = period_ns(o.rate);
    let first = st.got[0];
    c.report
        .num("first_seq", u64::from(first.seq))
        .num("first_elapsed_ms", elapsed.as_millis() as u64);
    c.check(first.seq == 0 && first.timestamp_ns == 0, || {
        format!("first sample after start is {first:?}, expected seq 0 at 0 ns")
    });
    let steps1 = st.steps(1);
    let off: Vec<&u64> = steps1.iter().filter(|&&d| d != p1).collect();
    c.check(off.is_empty(), || {
        format!(
            "{} steps at rate {} were not {p1} ns: {:?}",
            off.len(),
            o.rate,
            &off[..off.len().min(5)]
        )
    });
    // Samples never come early: the last one read was taken at its
    // timestamp on the device clock, which started after t0. The guest's
    // clock under TCG may be calibrated a few percent off the host's, so
    // allow 10%: a device that ignored the rate would be far off.
    let last_ts = st.got.last().map_or(0, |s| s.timestamp_ns);
    c.check(elapsed.as_nanos() as u64 * 11 / 10 >= last_ts, || {
        format!(
            "{} samples at {} Hz arrived after {elapsed:?}, before the last one's timestamp {last_ts} ns",
            o.samples, o.rate
        )
    });
    let mid = get_info(fd)?;
    c.check(
        mid.rate_hz == o.rate && mid.status & STATUS_SAMPLING != 0,
        || format!("config while sampling: {mid:?}"),
    );
    Ok(first)
}

/// How many of `steps` still have the old period `p1`, and whether the
/// steps switch exactly once from `p1` to `p2` (the old ones first, then
/// only new ones).
fn switches_once(steps: &[u64], p1: u64, p2: u64) -> (usize, bool) {
    let switch = steps.iter().position(|&d| d == p2);
    let old = steps.iter().take_while(|&&d| d == p1).count();
    (
        old,
        switch == Some(old) && steps[old..].iter().all(|&d| d == p2),
    )
}

/// Change to the second rate and read `--samples2` more: the step must
/// switch once, from the old period to the new.
fn check_rate_change(
    c: &mut Checked,
    fd: RawFd,
    o: &SensorOpts,
    st: &mut Stream,
) -> Result<(), String> {
    let (p1, p2) = (period_ns(o.rate), period_ns(o.rate2));
    let change_at = st.got.len();
    let r = set_rate(fd, o.rate2);
    c.check(r.is_ok(), || {
        format!("SET_RATE {}: {}", o.rate2, outcome(&r))
    });
    st.read_n(fd, o.samples2 as usize, o.chunk as usize)?;
    let steps2 = st.steps(change_at);
    let (old, once) = switches_once(&steps2, p1, p2);
    c.report.num("old_rate_steps_after_change", old as u64);
    c.check(once, || {
        format!(
            "after the change to {} Hz the steps were not {p1} then only {p2}: {:?}",
            o.rate2,
            &steps2[..steps2.len().min(12)]
        )
    });
    Ok(())
}

/// Stop: what was taken still arrives (read without blocking until
/// `EAGAIN`), then nothing: `poll` stays quiet and a read gets `EAGAIN`.
fn stop_and_drain(c: &mut Checked, fd: RawFd, st: &mut Stream) -> Result<(), String> {
    let r = set_rate(fd, 0);
    c.check(r.is_ok(), || format!("SET_RATE 0: {}", outcome(&r)));
    nap(Duration::from_millis(300));
    crate::common::set_fl(fd, libc::O_NONBLOCK, 0)?;
    loop {
        match read_samples(fd, 64) {
            Ok(b) if b.is_empty() => break,
            Ok(b) => b.into_iter().for_each(|s| st.push(s)),
            Err(libc::EAGAIN) => break,
            Err(e) => {
                c.fail(format!("draining read: {}", errno_name(e)));
                break;
            }
        }
    }
    let quiet = poll_one(fd, libc::POLLIN, 300)?;
    c.report.text("poll_stopped", &mask_name(quiet as u32));
    c.check(quiet == 0, || {
        format!(
            "a stopped sensor still delivers: poll {}",
            mask_name(quiet as u32)
        )
    });
    let again = read_samples(fd, 1).map(|v| v.len());
    c.report.text("read_stopped", &outcome(&again));
    c.check(again == Err(libc::EAGAIN), || {
        format!("O_NONBLOCK read of a stopped sensor: {}", outcome(&again))
    });
    Ok(())
}

/// The alarms (sequence, kind) that the samples `seqs` (first, last) must
/// raise under `threshold`, both directions armed.
fn expected_alarms(wave: &Wave, (first, last): (u32, u32), threshold: i32) -> Vec<(u32, u32)> {
    (first..=last)
        .filter_map(|s| {
            wave.crossing(s, threshold, ALARM_RISING | ALARM_FALLING)
                .map(|k| (s, k))
        })
        .collect()
}

/// The alarms are exactly the crossings of the samples taken (`seqs`:
/// the first and the last), and each matches its sample.
fn check_alarms(c: &mut Checked, fd: RawFd, st: &Stream, seqs: (u32, u32), threshold: i32) {
    let wave = st.wave;
    let mut alarms = Vec::new();
    loop {
        match get_alarm(fd) {
            Ok(Some(a)) => alarms.push(a),
            Ok(None) => break,
            Err(e) => {
                c.fail(format!("SENSOR_IOC_GET_ALARM: {}", errno_name(e)));
                break;
            }
        }
    }
    let expected = expected_alarms(&wave, seqs, threshold);
    let seen: Vec<(u32, u32)> = alarms.iter().map(|a| (a.seq, a.kind)).collect();
    c.report
        .num("alarms", alarms.len() as u64)
        .num("alarms_expected", expected.len() as u64);
    c.check(!expected.is_empty(), || {
        "the samples read cross the threshold nowhere: the run proves nothing".into()
    });
    c.check(seen == expected, || {
        format!(
            "alarms (seq, kind) {:?} differ from the crossings {:?}",
            &seen[..seen.len().min(8)],
            &expected[..expected.len().min(8)]
        )
    });
    for a in &alarms {
        let sample = st.got.iter().find(|s| s.seq == a.seq);
        let ok = a.threshold == threshold
            && a.value == wave.value(a.seq)
            && sample.is_none_or(|s| s.timestamp_ns == a.timestamp_ns);
        if !c.check(ok, || {
            format!("alarm {a:?} does not match its sample {sample:?}")
        }) {
            break;
        }
    }
}

/// At the end nothing was dropped (driver and device), no error, and the
/// sensor is stopped.
fn check_end(c: &mut Checked, fd: RawFd) -> Result<(), String> {
    let stats = get_stats(fd)?;
    let end = get_info(fd)?;
    c.report
        .raw("stats", &stats.json())
        .raw("info_end", &info_json(&end));
    c.check(
        stats.samples_dropped == 0 && stats.alarms_dropped == 0 && stats.errors == 0,
        || format!("driver dropped or erred: {}", stats.json()),
    );
    c.check(end.samples_dropped == 0 && end.alarms_dropped == 0, || {
        format!("device dropped: {end:?}")
    });
    c.check(
        end.rate_hz == 0 && end.status & STATUS_SAMPLING == 0,
        || format!("config after stop: {end:?}"),
    );
    Ok(())
}

fn info_json(i: &SensorInfo) -> String {
    format!(
        "{{\"seed\":{},\"version\":{},\"max_rate_hz\":{},\"rate_hz\":{},\"threshold\":{},\
         \"alarm_mode\":{},\"amplitude\":{},\"wave_period\":{},\"noise\":{},\"status\":{},\
         \"samples_dropped\":{},\"alarms_dropped\":{}}}",
        i.seed,
        i.version,
        i.max_rate_hz,
        i.rate_hz,
        i.threshold,
        i.alarm_mode,
        i.amplitude,
        i.wave_period,
        i.noise,
        i.status,
        i.samples_dropped,
        i.alarms_dropped
    )
}

fn outcome<T: std::fmt::Debug>(r: &Result<T, i32>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => errno_name(*e),
    }
}

/// `sensor-unbind` (see the module's documentation).
pub fn unbind(o: &SensorOpts) -> Result<Checked, String> {
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let mut c = Checked::new();
    let node = Path::new(&o.device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let link = Path::new("/sys/class")
        .join(SENSOR_DRIVER)
        .join(&node)
        .join("device");
    let vdev = std::fs::read_link(&link)
        .map_err(|e| format!("{}: {e}", link.display()))?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    c.report.text("virtio_device", &vdev);

    // Three sleepers on a stopped sensor.
    let (tx, rx) = std::sync::mpsc::channel::<(&'static str, String)>();
    let t1 = tx.clone();
    let reader = std::thread::spawn(move || {
        let r = read_samples(fd, 4).map(|v| v.len());
        let _ = t1.send(("read", outcome(&r)));
    });
    let t2 = tx.clone();
    let poller = std::thread::spawn(move || {
        let r = poll_one(fd, libc::POLLIN, 20_000);
        let _ = t2.send(("poll", r.map_or_else(|e| e, |m| mask_name(m as u32))));
    });
    let t3 = tx;
    let alarm = std::thread::spawn(move || {
        let r = poll_one(fd, libc::POLLPRI, 20_000);
        let _ = t3.send(("poll_pri", r.map_or_else(|e| e, |m| mask_name(m as u32))));
    });
    nap(Duration::from_millis(500));
    ready(&o.scenario);
    let unbind_path = Path::new("/sys/bus/virtio/drivers")
        .join(SENSOR_DRIVER)
        .join("unbind");
    let t = Instant::now();
    if let Err(e) = write_sysfs(&unbind_path, &vdev) {
        c.fail(e);
    }
    let mut woke = Vec::new();
    for _ in 0..3 {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok((what, how)) => {
                c.report.text(what, &how);
                woke.push((what, how));
            }
            Err(_) => {
                c.fail("a sleeper did not wake within 10 s of the unbind");
                break;
            }
        }
    }
    c.report.num("wake_ms", t.elapsed().as_millis() as u64);
    if woke.len() < 3 {
        // A sleeper is stuck in the driver: do not wait for it.
        return Ok(c);
    }
    for (what, how) in &woke {
        let ok = match *what {
            "read" => how == "ENODEV",
            _ => how.contains("HUP"),
        };
        c.check(ok, || format!("{what} woke with {how}"));
    }
    let _ = (reader.join(), poller.join(), alarm.join());
    match get_stats(fd) {
        Ok(s) => {
            c.report.raw("stats_removed", &s.json());
            c.check(s.state & STATE_REMOVED != 0, || {
                format!("GET_STATS after unbind: state {}", s.state)
            });
        }
        Err(e) => c.fail(e),
    }
    let r = set_rate(fd, 100);
    c.report.text("set_rate_removed", &outcome(&r));
    c.check(r == Err(libc::ENODEV), || {
        format!("SET_RATE after unbind: {}", outcome(&r))
    });
    drop(file);

    // Bind again: the device comes back and samples.
    let bind = Path::new("/sys/bus/virtio/drivers")
        .join(SENSOR_DRIVER)
        .join("bind");
    if let Err(e) = write_sysfs(&bind, &vdev) {
        c.fail(e);
        return Ok(c);
    }
    wait_for_chardev(&o.device, Duration::from_secs(10))?;
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let r = set_rate(fd, o.rate);
    c.check(r.is_ok(), || {
        format!("SET_RATE after rebind: {}", outcome(&r))
    });
    match read_samples(fd, 4) {
        Ok(v) => {
            c.report.num("samples_after_rebind", v.len() as u64);
            let first = v.first().copied().unwrap_or_default();
            c.check(!v.is_empty() && first.seq == 0, || {
                format!("after the rebind (a device reset) the first sample is {first:?}, expected seq 0")
            });
        }
        Err(e) => c.fail(format!("read after rebind: {}", errno_name(e))),
    }
    let _ = set_rate(fd, 0);
    Ok(c)
}

/// `sensor-reset` (see the module's documentation).
pub fn reset(o: &SensorOpts) -> Result<Checked, String> {
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let mut c = Checked::new();
    let info = get_info(fd)?;
    let wave = Wave::of(&info);
    let r = set_rate(fd, o.rate);
    c.check(r.is_ok(), || {
        format!("SET_RATE {}: {}", o.rate, outcome(&r))
    });
    let before = read_samples(fd, 4).map(|v| v.len());
    c.report.text("read_before", &outcome(&before));
    c.check(matches!(before, Ok(n) if n > 0), || {
        format!("no sample before the fault: {}", outcome(&before))
    });
    ready(&o.scenario);

    // The host declares the device broken: the status says so.
    let t = Instant::now();
    let mut seen = false;
    while t.elapsed() < Duration::from_secs(10) {
        if get_info(fd)?.status & STATUS_NEEDS_RESET != 0 {
            seen = true;
            break;
        }
        nap(Duration::from_millis(20));
    }
    c.report
        .num("needs_reset_ms", t.elapsed().as_millis() as u64);
    if !c.check(seen, || "no NEEDS_RESET in the status within 10 s".into()) {
        return Ok(c);
    }
    // It serves nothing any more: drain what came before, then quiet.
    nap(Duration::from_millis(200));
    crate::common::set_fl(fd, libc::O_NONBLOCK, 0)?;
    while matches!(read_samples(fd, 64), Ok(v) if !v.is_empty()) {}
    let quiet = poll_one(fd, libc::POLLIN, 300)?;
    c.report.text("poll_broken", &mask_name(quiet as u32));
    c.check(quiet == 0, || {
        format!(
            "a device that needs a reset still delivers: {}",
            mask_name(quiet as u32)
        )
    });

    // SENSOR_IOC_RESET: back at power-on.
    let r = reset_device(fd);
    c.report.text("reset", &outcome(&r));
    if !c.check(r.is_ok(), || format!("SENSOR_IOC_RESET: {}", outcome(&r))) {
        return Ok(c);
    }
    let after = get_info(fd)?;
    c.report.raw("info_reset", &info_json(&after));
    c.check(
        after.status == 0 && after.rate_hz == 0 && after.alarm_mode == 0,
        || format!("after the reset the device is not at power-on: {after:?}"),
    );
    let stats = get_stats(fd)?;
    c.report.raw("stats_reset", &stats.json());
    c.check(stats.resets == 1 && stats.state == 0, || {
        format!("driver state after the reset: {}", stats.json())
    });
    crate::common::set_fl(fd, 0, libc::O_NONBLOCK)?;
    let r = set_rate(fd, o.rate);
    c.check(r.is_ok(), || {
        format!("SET_RATE after the reset: {}", outcome(&r))
    });
    match read_samples(fd, 4) {
        Ok(v) => {
            let first = v.first().copied().unwrap_or_default();
            c.report.num("samples_after_reset", v.len() as u64);
            c.check(
                !v.is_empty()
                    && first.seq == 0
                    && first.timestamp_ns == 0
                    && v.iter().all(|s| s.value == wave.value(s.seq)),
                || format!("after the reset the samples are {v:?}, expected seq 0 at 0 ns on"),
            );
        }
        Err(e) => c.fail(format!("read after the reset: {}", errno_name(e))),
    }
    let _ = set_rate(fd, 0);
    Ok(c)
}

/// `sensor-hostile` (see the module's documentation).
pub fn hostile(o: &SensorOpts) -> Result<Checked, String> {
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let mut c = Checked::new();
    let info = get_info(fd)?;
    let wave = Wave::of(&info);
    let errors_before = get_stats(fd)?.errors;
    let r = set_rate(fd, o.rate);
    c.check(r.is_ok(), || {
        format!("SET_RATE {}: {}", o.rate, outcome(&r))
    });
    let mut got: Vec<SensorSample> = Vec::new();
    let read_more = |got: &mut Vec<SensorSample>, n: usize| -> Result<(), String> {
        let goal = got.len() + n;
        while got.len() < goal {
            let batch = read_samples(fd, 8).map_err(|e| format!("read: {}", errno_name(e)))?;
            got.extend(batch);
        }
        Ok(())
    };
    read_more(&mut got, 10)?;
    ready(&o.scenario);

    // One overlong used length: that buffer is dropped, nothing else.
    read_more(&mut got, 60)?;
    let gaps: Vec<(u32, u32)> = got
        .windows(2)
        .filter(|w| w[1].seq != w[0].seq.wrapping_add(1))
        .map(|w| (w[0].seq, w[1].seq))
        .collect();
    let wrong = got.iter().filter(|s| s.value != wave.value(s.seq)).count();
    let errors = get_stats(fd)?.errors - errors_before;
    c.report
        .num("overlong_errors", errors)
        .num("overlong_gaps", gaps.len() as u64)
        .num("wrong_values", wrong as u64);
    c.check(errors == 1 && gaps.len() == 1 && wrong == 0, || {
        format!(
            "after one overlong used length: {errors} errors, gaps {gaps:?}, {wrong} wrong values \
             (expected 1 error, one gap, none wrong)"
        )
    });
    c.check(gaps.iter().all(|(a, b)| b > a), || {
        format!("seq went backwards: {gaps:?} (stale records delivered)")
    });
    ready(&format!("{}-2", o.scenario));

    // A used id never posted: the queue is broken; reads fail once the
    // samples already received are read.
    let t = Instant::now();
    let end = loop {
        match read_samples(fd, 8) {
            Ok(v) if !v.is_empty() && t.elapsed() < Duration::from_secs(20) => continue,
            Ok(v) => break if v.is_empty() { Ok(0) } else { Err(0) },
            Err(e) => break Err(e),
        }
    };
    c.report
        .text("read_broken", &outcome(&end))
        .num("read_broken_ms", t.elapsed().as_millis() as u64);
    c.check(end == Err(libc::EIO), || {
        format!(
            "a read on a broken queue gave {} (expected EIO)",
            outcome(&end)
        )
    });
    let revents = poll_one(fd, libc::POLLIN, 0)?;
    c.report.text("poll_broken", &mask_name(revents as u32));
    c.check(revents & libc::POLLERR != 0, || {
        format!("poll on a broken device: {}", mask_name(revents as u32))
    });
    let st = get_stats(fd)?;
    c.check(st.state & STATE_BROKEN != 0, || {
        format!("GET_STATS state {} without BROKEN", st.state)
    });
    let r = set_rate(fd, 0);
    c.report.text("set_rate_broken", &outcome(&r));
    c.check(r == Err(libc::EIO), || {
        format!("SET_RATE on a broken device: {}", outcome(&r))
    });

    // SENSOR_IOC_RESET brings it back at power-on.
    let r = reset_device(fd);
    c.report.text("reset", &outcome(&r));
    if !c.check(r.is_ok(), || format!("SENSOR_IOC_RESET: {}", outcome(&r))) {
        return Ok(c);
    }
    let st = get_stats(fd)?;
    c.check(st.state == 0, || {
        format!("state after the reset: {}", st.state)
    });
    let r = set_rate(fd, o.rate);
    c.check(r.is_ok(), || {
        format!("SET_RATE after the reset: {}", outcome(&r))
    });
    match read_samples(fd, 4) {
        Ok(v) => {
            let first = v.first().copied().unwrap_or_default();
            c.check(!v.is_empty() && first.seq == 0, || {
                format!("after the reset the first sample is {first:?}, expected seq 0")
            });
        }
        Err(e) => c.fail(format!("read after the reset: {}", errno_name(e))),
    }
    let _ = set_rate(fd, 0);
    Ok(c)
}

/// Run a sensor scenario from its arguments; `None` if `args` names none.
pub fn dispatch(args: &[String]) -> Option<Result<Checked, String>> {
    let name = args.first()?;
    if !SENSOR_SCENARIOS.contains(&name.as_str()) {
        return None;
    }
    Some(parse(args).and_then(|o| match o.scenario.as_str() {
        "sensor-stream" => stream(&o),
        "sensor-reset" => reset(&o),
        "sensor-hostile" => hostile(&o),
        "sensor-alarms" => crate::scenarios::sensor_alarms::run(&o),
        _ => unbind(&o),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: the device model's copy
    /// (`device-model/sensor/src/wave.rs`) pins the same ones.
    #[test]
    fn waveform_pinned_values() {
        let w = Wave {
            seed: 42,
            amplitude: 1000,
            period: 64,
            noise: 50,
        };
        let got: Vec<i32> = (0..6).map(|s| w.value(s)).collect();
        let tri = Wave { noise: 0, ..w };
        assert_eq!(tri.value(0), -1000);
        assert_eq!(tri.value(16), 0);
        assert_eq!(tri.value(32), 1000);
        assert_eq!(tri.value(48), 0);
        assert_eq!(tri.value(64), -1000);
        assert_eq!(got, PINNED);
    }

    /// `Wave { seed: 42, amplitude: 1000, period: 64, noise: 50 }`, seq 0..6.
    const PINNED: [i32; 6] = [-1027, -908, -835, -818, -705, -736];

    #[test]
    fn crossings() {
        let w = Wave {
            seed: 1,
            amplitude: 100,
            period: 8,
            noise: 0,
        };
        // -100 -50 0 50 100 50 0 -50 -100
        assert_eq!(w.crossing(0, 0, 3), None);
        assert_eq!(w.crossing(2, 0, 3), Some(ALARM_RISING));
        assert_eq!(w.crossing(2, 0, ALARM_FALLING), None);
        assert_eq!(w.crossing(7, 0, 3), Some(ALARM_FALLING));
        assert_eq!(w.crossing(3, 0, 3), None);
    }

    #[test]
    fn the_alarms_a_run_must_see() {
        let w = Wave {
            seed: 1,
            amplitude: 100,
            period: 8,
            noise: 0,
        };
        let both = (ALARM_RISING, ALARM_FALLING);
        assert_eq!(
            expected_alarms(&w, (0, 16), 0),
            [(2, both.0), (7, both.1), (10, both.0), (15, both.1)]
        );
        assert_eq!(expected_alarms(&w, (3, 9), 0), [(7, both.1)]);
        assert!(expected_alarms(&w, (0, 16), 101).is_empty());
    }

    #[test]
    fn the_rate_switches_once() {
        let (p1, p2) = (period_ns(500), period_ns(250));
        assert_eq!((p1, p2), (2_000_000, 4_000_000));
        assert_eq!(switches_once(&[p1, p1, p2, p2], p1, p2), (2, true));
        assert_eq!(switches_once(&[p2, p2], p1, p2), (0, true));
        assert_eq!(switches_once(&[p1, p1], p1, p2), (2, false));
        assert_eq!(switches_once(&[p1, p2, p1], p1, p2), (1, false));
        assert_eq!(switches_once(&[p1, 3_000_000, p2], p1, p2), (1, false));
        assert_eq!(switches_once(&[], p1, p2), (0, false));
    }

    #[test]
    fn the_wave_comes_from_the_config_space() {
        let info = SensorInfo {
            seed: 9,
            amplitude: 1000,
            wave_period: 64,
            noise: 5,
            ..SensorInfo::default()
        };
        assert_eq!(
            Wave::of(&info),
            Wave {
                seed: 9,
                amplitude: 1000,
                period: 64,
                noise: 5
            }
        );
    }

    #[test]
    fn parse_options() {
        let a: Vec<String> = ["sensor-stream", "--rate", "100", "--samples=50"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let o = parse(&a).unwrap();
        assert_eq!((o.rate, o.samples, o.rate2), (100, 50, 250));
        assert!(parse(&["sensor-stream".into(), "--rate".into(), "250".into()]).is_err());
        assert!(parse(&["nope".into()]).is_err());
    }
}
