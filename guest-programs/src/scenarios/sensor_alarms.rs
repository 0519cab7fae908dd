//! `sensor-alarms`: alarms reach the sensor driver two ways
//! (`docs/sensor-spec.md`, "Alarms, two ways"): as records on the events
//! queue, and as a count in the config status word announced by a
//! config-change interrupt. The driver's `alarm_events` parameter
//! (`/sys/module/vdevlab_sensor/parameters/alarm_events`) says whether it
//! takes the records too.
//!
//! 1. Open the sensor, announce `VDEVLAB-READY sensor-alarms`, set the
//!    threshold to 0 in both directions (the waveform crosses it twice a
//!    period) and the rate (`--rate`), and read `--samples` samples.
//! 2. Stop, read what is still buffered, and wait until sysfs
//!    `alarms_signalled` has not moved for 1 s (at most 10 s): the last
//!    alarms' interrupt has been handled.
//! 3. `alarms_expected`: the threshold crossings of every sample taken,
//!    from the first sample read to the last (a sample's value depends
//!    only on its `seq`, so samples dropped on the way count too).
//!    Check: sysfs `alarms_signalled` rose by exactly that, with at least
//!    one config-change interrupt (`config_changes`); with `alarm_events`
//!    on, `alarms_received` (records) rose by as many, with it off by 0.
//!
//! Fields: `alarm_events`, `samples`, `first_seq`, `last_seq`,
//! `alarms_expected`, `alarms_signalled`, `config_changes`,
//! `alarms_received`, `settle_ms`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{errno_name, nap, open_device, read_counter, Access};
use crate::ready;
use crate::scenarios::sensor::{SensorOpts, Wave};
use crate::scenarios::Checked;
use crate::uapi::sensor::{
    get_info, get_stats, read_samples, set_rate, set_threshold, SensorSample, ALARM_FALLING,
    ALARM_RISING,
};

/// The sensor's sysfs attribute `name`.
fn sysfs(device: &str, name: &str) -> Result<u64, String> {
    let node = Path::new(device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    read_counter(&Path::new("/sys/class/vdevlab_sensor").join(node).join(name))
}

/// The three counters, in order: signalled, config changes, received.
fn counters(device: &str) -> Result<[u64; 3], String> {
    Ok([
        sysfs(device, "alarms_signalled")?,
        sysfs(device, "config_changes")?,
        sysfs(device, "alarms_received")?,
    ])
}

/// Run `sensor-alarms`.
pub fn run(o: &SensorOpts) -> Result<Checked, String> {
    let file = open_device(&o.device, Access::Read, false)?;
    let fd = file.as_raw_fd();
    let mut c = Checked::new();
    let param = std::fs::read_to_string("/sys/module/vdevlab_sensor/parameters/alarm_events")
        .map_err(|e| format!("alarm_events parameter: {e}"))?;
    let events = param.trim() == "Y";
    c.report.text("alarm_events", param.trim());
    let wave = Wave::of(&get_info(fd)?);
    let start = counters(&o.device)?;
    ready(&o.scenario);

    let (threshold, mode) = (o.threshold.unwrap_or(0), ALARM_RISING | ALARM_FALLING);
    set_threshold(fd, threshold, mode).map_err(|e| format!("SET_THRESHOLD: {}", errno_name(e)))?;
    set_rate(fd, o.rate).map_err(|e| format!("SET_RATE: {}", errno_name(e)))?;
    // (first seq, last seq, samples read)
    let mut seen: (Option<(u32, u32)>, usize) = (None, 0);
    let take = |seen: &mut (Option<(u32, u32)>, usize), batch: Vec<SensorSample>| {
        for s in batch {
            seen.0 = Some(seen.0.map_or((s.seq, s.seq), |(a, _)| (a, s.seq)));
            seen.1 += 1;
        }
    };
    let read = |fd| read_samples(fd, 64).map_err(|e| format!("read: {}", errno_name(e)));
    while seen.1 < o.samples as usize {
        take(&mut seen, read(fd)?);
    }
    set_rate(fd, 0).map_err(|e| format!("SET_RATE 0: {}", errno_name(e)))?;
    // Samples taken before the stop are still delivered: take them too.
    nap(Duration::from_millis(300));
    while get_stats(fd)?.pending > 0 {
        take(&mut seen, read(fd)?);
    }
    let (seqs, n) = seen;
    c.report.num("samples", n as u64);
    let (first, last) = seqs.unwrap_or_default();
    let expected = (first.max(1)..=last)
        .filter(|&q| wave.crossing(q, threshold, mode).is_some())
        .count() as u64;
    c.report
        .num("first_seq", u64::from(first))
        .num("last_seq", u64::from(last))
        .num("alarms_expected", expected);

    // The last config change may still be on its way: wait until the
    // count has stood still for a second.
    let t0 = Instant::now();
    let (mut last, mut since) = (counters(&o.device)?, Instant::now());
    while since.elapsed() < Duration::from_secs(1) && t0.elapsed() < Duration::from_secs(10) {
        nap(Duration::from_millis(50));
        let now = counters(&o.device)?;
        if now[0] != last[0] {
            (last, since) = (now, Instant::now());
        }
    }
    let end = counters(&o.device)?;
    c.report.num("settle_ms", t0.elapsed().as_millis() as u64);
    let d: Vec<u64> = end.iter().zip(start).map(|(e, s)| e - s).collect();
    c.report
        .num("alarms_signalled", d[0])
        .num("config_changes", d[1])
        .num("alarms_received", d[2]);
    c.check(expected > 0, || "the samples crossed no threshold".into());
    c.check(d[0] == expected, || {
        format!(
            "{} alarms signalled by config change, {expected} raised",
            d[0]
        )
    });
    c.check(d[1] > 0, || "no config-change interrupt".into());
    if events {
        c.check(d[2] == d[0], || {
            format!("{} alarm records but {} alarms signalled", d[2], d[0])
        });
    } else {
        c.check(d[2] == 0, || {
            format!("{} alarm records with alarm_events off", d[2])
        });
    }
    Ok(c)
}
