//! Protocol tests: the real `vdevlab-sensor` binary driven over the real
//! vhost-user protocol by an in-process frontend (memfd guest memory, real
//! eventfds), as QEMU and the guest driver would (`docs/sensor-spec.md`).

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Collector, Desc, Device, Vmm, CTRL, EVENTS, SAMPLES, TIMEOUT};
use vdevlab_sensor::sensor::{Alarm, Sample};
use vdevlab_sensor::wave::Wave;

const WAVE_ARGS: [&str; 8] = [
    "--seed",
    "99",
    "--amplitude",
    "1000",
    "--wave-period",
    "32",
    "--noise",
    "40",
];

fn wave() -> Wave {
    Wave {
        seed: 99,
        amplitude: 1000,
        wave_period: 32,
        noise: 40,
    }
}

fn samples_of(c: &Collector) -> Vec<(Instant, Sample)> {
    c.records(16)
        .into_iter()
        .map(|(t, r)| (t, Sample::from_bytes(&r).expect("a record")))
        .collect()
}

fn word(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Samples come at the rate, each with the waveform's value, consecutive
/// sequence numbers and timestamps one period apart, and never before
/// their timestamp.
#[test]
fn samples_arrive_at_the_rate_with_exact_values() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut col = Collector::start(&mut vmm, SAMPLES, 16, 64);
    // An idle sensor leaves the buffers posted.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vmm.used_idx(SAMPLES), 0);
    let t0 = Instant::now();
    vmm.set_rate(200);
    assert!(
        col.until(&mut vmm, Duration::from_secs(5), |c| c.records(16).len()
            >= 60)
    );
    let got = samples_of(&col);
    for (i, (at, s)) in got.iter().enumerate() {
        assert_eq!(s.seq, i as u32);
        assert_eq!(s.timestamp_ns, i as u64 * 5_000_000);
        assert_eq!(s.value, wave().value(s.seq), "seq {}", s.seq);
        // The device clock starts after t0: a sample is never seen before
        // its timestamp.
        assert!(
            at.duration_since(t0) >= Duration::from_nanos(s.timestamp_ns),
            "seq {} seen {:?} after start, before its timestamp",
            s.seq,
            at.duration_since(t0)
        );
    }
    assert!(vmm.take_calls(SAMPLES) > 0, "completions are signalled");
    let mut ctl = dev.control();
    let st = ctl.stats();
    assert_eq!(st["bad_chains"], 0);
    assert!(st["samples_delivered"].as_u64().unwrap() >= 60);
    assert_eq!(ctl.sensor()["rate_hz"], 200);
}

/// A rate change applies from the next sample: the step switches once.
#[test]
fn rate_change_takes_effect_at_the_next_sample() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut col = Collector::start(&mut vmm, SAMPLES, 16, 128);
    vmm.set_rate(500);
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 20));
    vmm.set_rate(100);
    let n = col.records(16).len();
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= n + 15));
    let got = samples_of(&col);
    let steps: Vec<u64> = got
        .windows(2)
        .map(|w| w[1].1.timestamp_ns - w[0].1.timestamp_ns)
        .collect();
    let old = steps.iter().take_while(|&&d| d == 2_000_000).count();
    assert!(old >= 19, "{steps:?}");
    assert!(
        steps[old..].iter().all(|&d| d == 10_000_000),
        "one switch from 2 ms to 10 ms steps: {steps:?}"
    );
    for w in got.windows(2) {
        assert_eq!(w[1].1.seq, w[0].1.seq + 1);
    }
    // Stop: what was taken arrives, then nothing more is taken.
    vmm.set_rate(0);
    let mut ctl = dev.control();
    let taken = ctl.counter("samples_taken") as usize;
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() == taken));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ctl.counter("samples_taken") as usize,
        taken,
        "a stopped sensor takes no sample"
    );
    col.poll(&mut vmm);
    assert_eq!(col.records(16).len(), taken);
}

/// Alarms on the event queue are exactly the threshold crossings of the
/// samples taken, with their sample's timestamp and value.
#[test]
fn alarms_fire_on_threshold_crossings() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut samples = Collector::start(&mut vmm, SAMPLES, 16, 256);
    let mut events = Collector::start(&mut vmm, EVENTS, 8, 24);
    vmm.set_threshold(300, 3);
    vmm.set_rate(1000);
    assert!(samples.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 200));
    vmm.set_rate(0);
    let mut ctl = dev.control();
    let taken = ctl.counter("samples_taken") as u32;
    let expect: Vec<(u32, u32)> = (0..taken)
        .filter_map(|s| wave().crossing(s, 300, 3).map(|k| (s, k)))
        .collect();
    assert!(expect.len() >= 10, "{expect:?}");
    assert!(events.until(&mut vmm, TIMEOUT, |c| c.got.len() >= expect.len()));
    std::thread::sleep(Duration::from_millis(20));
    events.poll(&mut vmm);
    let alarms: Vec<Alarm> = events
        .got
        .iter()
        .map(|(_, b)| {
            assert_eq!(b.len(), 24, "one alarm per event buffer");
            Alarm::from_bytes(b).unwrap()
        })
        .collect();
    let seen: Vec<(u32, u32)> = alarms.iter().map(|a| (a.seq, a.kind)).collect();
    assert_eq!(seen, expect);
    for a in &alarms {
        assert_eq!(a.threshold, 300);
        assert_eq!(a.value, wave().value(a.seq));
        assert_eq!(a.timestamp_ns, u64::from(a.seq) * 1_000_000);
    }
    let st = ctl.stats();
    assert_eq!(st["alarms_raised"], expect.len() as u64);
    assert_eq!(st["alarms_delivered"], expect.len() as u64);
    assert_eq!(st["alarms_dropped"], 0);
}

/// Without buffers the FIFO fills: later samples are dropped and counted,
/// the config space shows it, and the gap shows in `seq`.
#[test]
fn a_driver_that_posts_nothing_loses_counted_samples() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    vmm.set_rate(5000);
    std::thread::sleep(Duration::from_millis(200));
    let mut ctl = dev.control();
    let dropped = ctl.counter("samples_dropped");
    assert!(dropped > 0);
    let mut col = Collector::start(&mut vmm, SAMPLES, 4, 4096);
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 300));
    vmm.set_rate(0);
    let got = samples_of(&col);
    assert_eq!(got[0].1.seq, 0);
    assert_eq!(got[255].1.seq, 255, "the FIFO kept the first 256");
    assert!(got[256].1.seq > 256, "then a gap: {:?}", got[256].1);
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend as _;
    let (_, cfg) = vmm
        .fe
        .get_config(0, 64, VhostUserConfigFlags::WRITABLE, &[0u8; 64])
        .expect("GET_CONFIG");
    assert!(u64::from(word(&cfg, 0x38)) >= dropped);
}

/// The config space over GET_CONFIG: live, and read-only.
#[test]
fn config_space_is_live_and_read_only() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend as _;
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let read = |vmm: &mut Vmm| {
        vmm.fe
            .get_config(0, 64, VhostUserConfigFlags::WRITABLE, &[0u8; 64])
            .expect("GET_CONFIG")
            .1
    };
    let cfg = read(&mut vmm);
    assert_eq!(&cfg[0..4], b"SNSR");
    assert_eq!(
        (word(&cfg, 4), word(&cfg, 0x14), word(&cfg, 0x34)),
        (1, 0, 0)
    );
    assert_eq!((word(&cfg, 0x20), word(&cfg, 0x2c)), (99, 32));
    vmm.set_rate(50);
    vmm.set_threshold(-20, 2);
    let cfg = read(&mut vmm);
    assert_eq!(
        (word(&cfg, 0x14), word(&cfg, 0x18) as i32, word(&cfg, 0x1c)),
        (50, -20, 2)
    );
    assert_eq!(word(&cfg, 0x34), 2, "SAMPLING");
    dev.control().ok(json!({"op": "needs_reset"}));
    assert_eq!(word(&read(&mut vmm), 0x34), 3, "NEEDS_RESET and SAMPLING");
    // A guest's config write is refused (logged, nothing changes), and it
    // is bad input, not a reason to drop the VMM: the connection stays.
    vmm.fe
        .set_config(0x14, VhostUserConfigFlags::WRITABLE, &[0u8; 4])
        .expect("SET_CONFIG is answered");
    let cfg = read(&mut vmm);
    assert_eq!(word(&cfg, 0x14), 50, "the write changed nothing");
    assert!(dev.log().contains("config-space write refused"));
}

/// Bad control requests get a status that says why and change nothing.
#[test]
fn bad_control_requests_get_clear_statuses() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    assert_eq!(
        vmm.ctrl(1, 10_001, 0, 0),
        (8, 1, 0),
        "rate too high: INVALID"
    );
    assert_eq!(vmm.ctrl(2, 0, 4, 0), (8, 1, 0), "unknown mode: INVALID");
    assert_eq!(vmm.ctrl(77, 0, 0, 0), (8, 2, 0), "unknown cmd: UNSUPPORTED");
    assert_eq!(vmm.ctrl(1, 10, 0, 5), (8, 3, 0), "reserved != 0: MALFORMED");
    assert_eq!(
        vmm.ctrl_raw(&[1, 0, 0, 0, 10, 0, 0, 0], 8),
        (8, 3, 0),
        "short request: MALFORMED"
    );
    let mut ctl = dev.control();
    assert_eq!(ctl.sensor()["rate_hz"], 0, "nothing changed");
    let st = ctl.stats();
    assert_eq!(
        (st["ctrl_requests"].as_u64(), st["ctrl_errors"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(st["bad_chains"], 0, "answered, not refused");
}

/// Malformed chains on every queue are refused (used length 0, counted),
/// consume no sample or alarm, and the device serves on.
#[test]
fn malformed_chains_are_refused_and_the_device_survives() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    vmm.set_threshold(0, 3);
    vmm.set_rate(1000);
    std::thread::sleep(Duration::from_millis(100)); // samples and alarms pending
    let a = vmm.buf(4096);
    // samples: readable descriptor, too short, outside memory, a loop,
    // a next index past the table.
    let bad_samples = [
        vec![Desc::r(a, 64)],
        vec![Desc::w(a, 8)],
        vec![Desc::w(support::MEM_SIZE - 8, 64)],
        vec![Desc::w(a, 64).next(support::SELF)],
        vec![Desc::w(a, 64).next(999)],
    ];
    for c in &bad_samples {
        vmm.post(SAMPLES, c);
    }
    let good = vmm.buf(64);
    vmm.post(SAMPLES, &[Desc::w(good, 64)]);
    vmm.kick(SAMPLES);
    assert!(vmm.wait_used(SAMPLES, 6, TIMEOUT));
    for i in 0..5 {
        assert_eq!(vmm.used(SAMPLES, i).1, 0, "bad sample chain {i}");
    }
    assert_eq!(vmm.used(SAMPLES, 5).1, 64, "the good one gets 4 samples");
    let first = Sample::from_bytes(&vmm.read(good, 16)).unwrap();
    assert_eq!(first.seq, 0, "no sample was lost to the bad chains");
    // events: too short, and a readable one.
    vmm.post(EVENTS, &[Desc::w(a, 16)]);
    vmm.post(EVENTS, &[Desc::r(a, 24)]);
    let ev = vmm.buf(24);
    vmm.post(EVENTS, &[Desc::w(ev, 24)]);
    vmm.kick(EVENTS);
    assert!(vmm.wait_used(EVENTS, 3, TIMEOUT));
    assert_eq!(
        [
            vmm.used(EVENTS, 0).1,
            vmm.used(EVENTS, 1).1,
            vmm.used(EVENTS, 2).1
        ],
        [0, 0, 24]
    );
    let alarm = Alarm::from_bytes(&vmm.read(ev, 24)).unwrap();
    let expect_first = (1..).find(|&s| wave().crossing(s, 0, 3).is_some()).unwrap();
    assert_eq!(alarm.seq, expect_first, "no alarm was lost");
    // ctrl: no status room, no request at all, status too short,
    // writable before readable.
    let r = vmm.buf(16);
    vmm.write(r, &[1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let s = vmm.buf(8);
    let before = vmm.used_idx(CTRL);
    vmm.post(CTRL, &[Desc::r(r, 16)]);
    vmm.post(CTRL, &[Desc::w(s, 8)]);
    vmm.post(CTRL, &[Desc::r(r, 16), Desc::w(s, 4)]);
    vmm.post(CTRL, &[Desc::w(s, 8), Desc::r(r, 16)]);
    vmm.kick(CTRL);
    assert!(vmm.wait_used(CTRL, before.wrapping_add(4), TIMEOUT));
    for i in 0..4 {
        assert_eq!(
            vmm.used(CTRL, before.wrapping_add(i)).1,
            0,
            "bad ctrl chain {i}"
        );
    }
    assert_eq!(
        ctl.sensor()["rate_hz"],
        1000,
        "no refused request took effect"
    );
    assert_eq!(ctl.counter("bad_chains"), 11);
    // Still serving, on every queue.
    vmm.set_rate(100);
    assert!(dev.log().contains("refused a descriptor chain"));
    let mut dev = dev;
    assert!(dev.is_running());
}

/// A broken ring stops that queue only, until the driver resets the
/// device; NEEDS_RESET stops everything until then. A reset returns the
/// sensor to power-on: stopped, alarms off, sequence and clock at 0.
#[test]
fn broken_ring_needs_reset_and_reset_returns_to_power_on() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    vmm.set_threshold(100, 1);
    vmm.set_rate(1000);
    let mut col = Collector::start(&mut vmm, SAMPLES, 8, 64);
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 10));
    // Break the control ring: the available index jumps far ahead.
    let used = vmm.used_idx(CTRL);
    vmm.set_avail_idx(CTRL, used.wrapping_add(1000));
    vmm.kick(CTRL);
    assert!(support::wait_until(TIMEOUT, || ctl.counter("queue_errors") == 1));
    // The samples queue still runs.
    let n = col.records(16).len();
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= n + 10));
    // NEEDS_RESET: nothing is served any more (a pass already under way
    // may finish first), while the sensor still samples.
    ctl.ok(json!({"op": "needs_reset"}));
    std::thread::sleep(Duration::from_millis(50));
    let delivered = ctl.counter("samples_delivered");
    let taken = ctl.counter("samples_taken");
    std::thread::sleep(Duration::from_millis(100));
    col.poll(&mut vmm);
    assert_eq!(
        ctl.counter("samples_delivered"),
        delivered,
        "a device that needs a reset serves nothing"
    );
    assert!(ctl.counter("samples_taken") > taken);
    // The driver resets the device.
    vmm.reset_device();
    let s = ctl.sensor();
    assert_eq!(
        (s["rate_hz"].as_u64(), s["alarm_mode"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s["next_seq"], 0);
    let mut col = Collector::start(&mut vmm, SAMPLES, 8, 64);
    vmm.set_rate(500); // the control queue works again
    assert!(col.until(&mut vmm, TIMEOUT, |c| !c.got.is_empty()));
    let first = samples_of(&col)[0].1;
    assert_eq!((first.seq, first.timestamp_ns), (0, 0));
    assert_eq!(ctl.counter("queue_errors"), 1, "counted once");
}

/// Host control requests: bad waveform parameters are refused with the
/// parameter's name; a good one changes the values the samples carry.
#[test]
fn waveform_control_request() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut ctl = dev.control();
    assert!(ctl
        .err(json!({"op": "waveform", "wave_period": 2}))
        .contains("wave_period"));
    assert!(ctl
        .err(json!({"op": "waveform", "bogus": 1}))
        .contains("bogus"));
    ctl.ok(json!({"op": "waveform", "seed": 5, "noise": 0}));
    let mut vmm = dev.connect();
    let mut col = Collector::start(&mut vmm, SAMPLES, 4, 64);
    vmm.set_rate(1000);
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 8));
    let w = Wave {
        seed: 5,
        noise: 0,
        ..wave()
    };
    for (_, s) in samples_of(&col) {
        assert_eq!(s.value, w.value(s.seq));
    }
}

/// The framework's generic faults and interrupt modes work on the sensor's
/// queues by name: a corrupted sample buffer (one byte inverted), lost
/// interrupts, coalesced interrupts, and an error naming the queues there
/// are for a queue there is not.
#[test]
fn core_faults_and_interrupt_modes_apply_to_the_sensor_queues() {
    let dev = Device::spawn(&WAVE_ARGS);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    let err = ctl
        .err(json!({"op": "fault", "fault": {"kind": "stall", "queue": "rx", "duration_ms": 10}}));
    assert!(
        err.contains("samples") && err.contains("events") && err.contains("ctrl"),
        "{err}"
    );
    ctl.ok(json!({"op": "fault", "fault": {"kind": "corrupt_rx", "count": 1, "seed": 3}}));
    ctl.ok(json!({"op": "fault", "fault": {"kind": "drop_interrupts", "queue": "samples", "count": 3}}));
    let mut col = Collector::start(&mut vmm, SAMPLES, 16, 64);
    vmm.take_calls(SAMPLES);
    vmm.set_rate(1000);
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.records(16).len() >= 40));
    // Exactly one byte of everything received differs from the record the
    // device should have sent, and it is inverted.
    let mut diffs = Vec::new();
    for (i, (_, rec)) in col.records(16).iter().enumerate() {
        let want = Sample {
            timestamp_ns: i as u64 * 1_000_000,
            seq: i as u32,
            value: wave().value(i as u32),
        }
        .to_bytes();
        for (k, (a, b)) in rec.iter().zip(want.iter()).enumerate() {
            if a != b {
                diffs.push((i, k, *a, *b));
            }
        }
    }
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert_eq!(diffs[0].2, !diffs[0].3, "the byte is inverted");
    let st = ctl.stats();
    assert_eq!(st["corrupted_buffers"], 1);
    assert_eq!(st["interrupts_dropped"], 3);
    // Coalesced: at most one interrupt per 4 buffers (or 50 ms).
    ctl.ok(json!({"op": "interrupt_mode", "queue": "samples",
        "irq": {"mode": "coalesce", "count": 4, "usecs": 50000}}));
    vmm.take_calls(SAMPLES);
    let n = col.got.len();
    assert!(col.until(&mut vmm, TIMEOUT, |c| c.got.len() >= n + 40));
    let buffers = (col.got.len() - n) as u64;
    let calls = vmm.take_calls(SAMPLES);
    assert!(
        calls * 2 <= buffers,
        "{calls} interrupts for {buffers} buffers under coalesce 4"
    );
    vmm.set_rate(0);
}
