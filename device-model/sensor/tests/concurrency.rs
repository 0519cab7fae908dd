//! The sensor backend under concurrency: its three queues driven from
//! three threads at once through the testkit's frontend (samples and
//! events harvested, SET_RATE / SET_THRESHOLD requests on ctrl), while a
//! control-plane client meddles (stats checked to never go back or stop
//! adding up, interrupt-mode changes, the `sensor`, `config` and
//! `waveform` requests, spurious interrupts) and the frontend reads the
//! config space. The sampling timer runs on the backend's control thread,
//! the queues on its worker, GET_CONFIG on its vhost-user thread: all meet
//! at the engine lock, and SET_RATE from the worker re-arms the timer the
//! control thread waits on.
//!
//! Checked: samples and alarms arrive with strictly increasing sequence
//! numbers and timestamps (none duplicated or reordered), and once
//! sampling stops and the FIFOs are drained, every sample taken was
//! delivered or counted as dropped (alarms likewise), every control
//! request was answered OK and counted, and every interrupt counted
//! reached a call eventfd. Every wait is bounded; choices are seeded.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Ctl, Device, CTRL, EVENTS, SAMPLES};
use vdevlab_device_testkit::{Desc, QueueDriver};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend as _;

const SEED: u64 = 0x5e05_0c0c;
/// The whole test must be done by then (it takes about a second).
const DEADLINE: Duration = Duration::from_secs(30);
/// How long the ctrl thread keeps changing the rate and threshold.
const RUN: Duration = Duration::from_millis(700);
/// Buffers kept posted on samples and events (the queues have 64).
const IN_FLIGHT: usize = 16;
/// Per-queue buffer regions in guest memory, 32 slots of 256 bytes each
/// (more than can be in flight).
const SLOT: u64 = 256;
const SLOTS: u64 = 32;
const REGION: [u64; 3] = [0x10_0000, 0x11_0000, 0x12_0000];

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

struct Shared {
    deadline: Instant,
    /// The ctrl thread stopped sampling (SET_RATE 0 answered).
    stopped: AtomicBool,
    /// The meddler stops.
    stop: AtomicBool,
}

impl Shared {
    fn late(&self) -> bool {
        Instant::now() > self.deadline
    }
}

#[derive(Debug, Default)]
struct Done {
    name: &'static str,
    /// Records received (samples, alarms), requests answered (ctrl),
    /// requests made (meddler).
    count: u64,
    /// Interrupts seen (drivers), spurious interrupts requested (meddler).
    calls: u64,
}

type Report = Result<Done, String>;

fn spawn(
    reports: &mpsc::Sender<Report>,
    name: &'static str,
    f: impl FnOnce() -> Report + Send + 'static,
) {
    let reports = reports.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|p| {
                    Err(format!(
                        "{name} panicked: {}",
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_default()
                    ))
                })
                .map(|d| Done { name, ..d });
            let _ = reports.send(r);
        })
        .expect("spawning a test thread");
}

/// The sensor's pending samples and alarms (every reply carries them).
fn pending(ctl: &mut Ctl) -> (u64, u64) {
    let f = ctl.ok(json!({"op": "ping"}));
    let n = |k: &str| f.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
    (n("samples_pending"), n("alarms_pending"))
}

/// A driver of the samples or events queue: keeps buffers posted,
/// harvests them in order, checks the records; after sampling stopped,
/// finishes once the device holds nothing more.
fn harvester(mut d: QueueDriver, sh: Arc<Shared>, mut ctl: Ctl) -> Report {
    let samples = d.q == SAMPLES;
    let record = if samples { 16 } else { 24 };
    let mut rng = Rng::new(SEED ^ d.q as u64);
    let mut posted: VecDeque<(u16, u64, u32)> = VecDeque::new();
    let mut next_slot = 0u64;
    let mut used = d.used_idx();
    let (mut last_seq, mut last_ts) = (None::<u32>, None::<u64>);
    let mut records = 0u64;
    loop {
        while posted.len() < IN_FLIGHT {
            let addr = REGION[d.q] + (next_slot % SLOTS) * SLOT;
            next_slot += 1;
            // Samples: 1 to 16 records a buffer; events: one alarm each.
            let len = if samples {
                16 * (1 + rng.next() % 16) as u32
            } else {
                24
            };
            posted.push_back((d.post_chain(&[Desc::writable(addr, len)]), addr, len));
        }
        d.kick();
        let now = d.used_idx();
        while used != now {
            let (id, len) = d.used_elem(used);
            let (head, addr, cap) = posted.pop_front().ok_or("a used entry never posted")?;
            if id != u32::from(head)
                || len > cap
                || !(len as usize).is_multiple_of(record)
                || len == 0
            {
                return Err(format!(
                    "queue {} used entry {used}: ({id}, {len}), posted ({head}, {cap})",
                    d.q
                ));
            }
            for r in d.read(addr, len as usize).chunks_exact(record) {
                let (ts, seq) = (u64_at(r, 0), u32_at(r, 8));
                if last_seq.is_some_and(|l| seq <= l) || last_ts.is_some_and(|l| ts <= l) {
                    return Err(format!(
                        "queue {}: record seq {seq} ts {ts} after seq {last_seq:?} ts {last_ts:?}",
                        d.q
                    ));
                }
                if !samples && !matches!(u32_at(r, 20), 1 | 2) {
                    return Err(format!("alarm of kind {}", u32_at(r, 20)));
                }
                (last_seq, last_ts) = (Some(seq), Some(ts));
                records += 1;
            }
            used = used.wrapping_add(1);
        }
        if sh.stopped.load(Ordering::Acquire) {
            let (s, a) = pending(&mut ctl);
            if (if samples { s } else { a }) == 0 && d.used_idx() == used {
                break;
            }
        }
        if sh.late() {
            return Err(format!("queue {}: timed out after {records} records", d.q));
        }
        d.wait_call(Duration::from_micros(500));
    }
    Ok(Done {
        count: records,
        calls: d.calls(),
        ..Done::default()
    })
}

/// The ctrl queue's driver: SET_RATE and SET_THRESHOLD, one request at a
/// time as the driver sends them, each answered OK; SET_RATE 0 at the end.
fn controller(mut d: QueueDriver, sh: Arc<Shared>) -> Report {
    let mut rng = Rng::new(SEED ^ 0xc7);
    let start = Instant::now();
    let mut answered = 0u64;
    let mut used = d.used_idx();
    let mut slot = 0u64;
    let mut last = false;
    loop {
        let (cmd, arg0, arg1) = if start.elapsed() >= RUN {
            last = true;
            (1, 0, 0)
        } else if rng.next().is_multiple_of(3) {
            // Thresholds within the waveform's range, rising, falling or both.
            let t = (rng.next() % 2001) as i32 - 1000;
            (2, t as u32, 1 + (rng.next() % 3) as u32)
        } else {
            (1, 1000 + (rng.next() % 9001) as u32, 0)
        };
        let (req, status) = (
            REGION[CTRL] + (slot % SLOTS) * SLOT,
            REGION[CTRL] + (slot % SLOTS) * SLOT + 64,
        );
        slot += 1;
        let bytes: Vec<u8> = [cmd, arg0, arg1, 0u32]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        d.write(req, &bytes);
        d.write(status, &[0xee; 8]);
        let head = d.post_chain(&[Desc::readable(req, 16), Desc::writable(status, 8)]);
        d.kick();
        while d.used_idx() == used {
            if sh.late() {
                return Err(format!("ctrl: request {answered} never answered"));
            }
            d.wait_call(Duration::from_micros(500));
        }
        let (id, len) = d.used_elem(used);
        used = used.wrapping_add(1);
        let st = d.read(status, 8);
        let expect = if cmd == 1 { arg0 } else { arg1 };
        if id != u32::from(head) || len != 8 || u32_at(&st, 0) != 0 || u32_at(&st, 4) != expect {
            return Err(format!(
                "ctrl request {cmd} {arg0} {arg1}: used ({id}, {len}), status {st:?}"
            ));
        }
        answered += 1;
        if last {
            break;
        }
        std::thread::sleep(Duration::from_micros(rng.next() % 2000));
    }
    sh.stopped.store(true, Ordering::Release);
    Ok(Done {
        count: answered,
        calls: d.calls(),
        ..Done::default()
    })
}

fn counters(ctl: &mut Ctl) -> Value {
    Value::Object(ctl.stats())
}

fn c(stats: &Value, key: &str) -> u64 {
    stats
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no counter {key} in {stats}"))
}

/// The host side: stats (monotone; taken >= delivered + dropped),
/// interrupt modes, the sensor's and the core's read-only requests, a
/// waveform change, spurious interrupts.
fn meddler(sh: Arc<Shared>, mut ctl: Ctl) -> Report {
    let mut rng = Rng::new(SEED ^ 0x3e);
    let mut last = counters(&mut ctl);
    let (mut requests, mut spurious) = (0u64, 0u64);
    const MONOTONE: &[&str] = &[
        "samples_taken",
        "samples_delivered",
        "samples_dropped",
        "sample_buffers",
        "alarms_raised",
        "alarms_delivered",
        "ctrl_requests",
        "interrupts_raised",
    ];
    while !sh.stop.load(Ordering::Acquire) {
        let queue = ["samples", "events", "ctrl", "all"][(rng.next() % 4) as usize];
        let r = match rng.next() % 8 {
            0..=2 => {
                let s = counters(&mut ctl);
                if let Some(k) = MONOTONE.iter().find(|k| c(&s, k) < c(&last, k)) {
                    return Err(format!("counter {k} went back: {last} then {s}"));
                }
                if c(&s, "samples_delivered") + c(&s, "samples_dropped") > c(&s, "samples_taken") {
                    return Err(format!(
                        "more samples delivered and dropped than taken: {s}"
                    ));
                }
                last = s;
                Ok(())
            }
            3 => {
                let irq = match rng.next() % 3 {
                    0 => json!({"mode": "immediate"}),
                    1 => json!({"mode": "coalesce", "count": 1 + rng.next() % 8,
                                "usecs": 50 + rng.next() % 950}),
                    _ => json!({"mode": "delay", "usecs": rng.next() % 500,
                                "jitter_usecs": rng.next() % 200, "seed": rng.next()}),
                };
                ctl.0
                    .checked(&json!({"op": "interrupt_mode", "queue": queue, "irq": irq}))
                    .map(drop)
            }
            4 => ctl.0.checked(&json!({"op": "sensor"})).map(drop),
            5 => ctl.0.checked(&json!({"op": "config"})).map(drop),
            6 => ctl
                .0
                .checked(&json!({"op": "waveform",
                                  "amplitude": 500 + rng.next() % 1000,
                                  "wave_period": 4 + rng.next() % 200}))
                .map(drop),
            _ => {
                let n = 1 + rng.next() % 3;
                let q = ["samples", "events", "ctrl"][(rng.next() % 3) as usize];
                spurious += n;
                ctl.0
                    .checked(&json!({"op": "fault", "fault":
                        {"kind": "spurious_interrupts", "queue": q, "count": n}}))
                    .map(drop)
            }
        };
        r.map_err(|e| format!("control request: {e}"))?;
        requests += 1;
        std::thread::sleep(Duration::from_micros(rng.next() % 300));
        if sh.late() {
            return Err("meddler: past the deadline".into());
        }
    }
    ctl.0
        .checked(&json!({"op": "interrupt_mode", "queue": "all", "irq": {"mode": "immediate"}}))
        .map_err(|e| format!("interrupt_mode: {e}"))?;
    Ok(Done {
        count: requests,
        calls: spurious,
        ..Done::default()
    })
}

#[test]
fn three_queues_the_timer_and_the_control_plane_at_once() {
    let mut dev = Device::spawn(&[]);
    let mut vmm = dev.connect();
    let sh = Arc::new(Shared {
        deadline: Instant::now() + DEADLINE,
        stopped: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let (reports, done) = mpsc::channel();
    for q in [SAMPLES, EVENTS] {
        let (d, sh, ctl) = (vmm.queue_driver(q), sh.clone(), dev.control());
        let name = if q == SAMPLES { "samples" } else { "events" };
        spawn(&reports, name, move || harvester(d, sh, ctl));
    }
    {
        let (d, sh) = (vmm.queue_driver(CTRL), sh.clone());
        spawn(&reports, "ctrl", move || controller(d, sh));
    }
    {
        let (sh, ctl) = (sh.clone(), dev.control());
        spawn(&reports, "meddler", move || meddler(sh, ctl));
    }
    drop(reports);
    let mut got: Vec<Done> = Vec::new();
    let mut config_reads = 0u64;
    while got.len() < 4 {
        if got.len() == 3 {
            sh.stop.store(true, Ordering::Release);
        }
        match done.recv_timeout(Duration::from_millis(2)) {
            Ok(Ok(d)) => got.push(d),
            Ok(Err(e)) => {
                sh.stop.store(true, Ordering::Release);
                panic!("{e}");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let (_, payload) = vmm
                    .fe
                    .get_config(0, 64, VhostUserConfigFlags::WRITABLE, &[0u8; 64])
                    .expect("GET_CONFIG");
                assert_eq!(&payload[0..4], b"SNSR");
                config_reads += 1;
                if sh.late() {
                    sh.stop.store(true, Ordering::Release);
                    let names: Vec<_> = got.iter().map(|d| d.name).collect();
                    panic!("deadlock or stall: only {names:?} finished in {DEADLINE:?}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("every thread reports"),
        }
    }
    let by = |name| got.iter().find(|d| d.name == name).unwrap();
    let (samples, events, ctrl, meddled) = (by("samples"), by("events"), by("ctrl"), by("meddler"));
    assert!(dev.is_running(), "the device died:\n{}", dev.log());
    assert!(!dev.log().contains("panicked"), "{}", dev.log());

    let mut ctl = dev.control();
    let s = counters(&mut ctl);
    eprintln!(
        "samples {} (taken {}, dropped {}), alarms {} (raised {}), ctrl {}, meddler {} \
         requests, {config_reads} config reads, interrupts raised {}",
        samples.count,
        c(&s, "samples_taken"),
        c(&s, "samples_dropped"),
        events.count,
        c(&s, "alarms_raised"),
        ctrl.count,
        meddled.count,
        c(&s, "interrupts_raised")
    );
    assert_eq!(pending(&mut ctl), (0, 0), "the FIFOs were drained");
    assert_eq!(c(&s, "samples_delivered"), samples.count, "{s}");
    assert_eq!(
        c(&s, "samples_taken"),
        c(&s, "samples_delivered") + c(&s, "samples_dropped"),
        "every sample delivered or counted as dropped: {s}"
    );
    assert_eq!(c(&s, "alarms_delivered"), events.count, "{s}");
    assert_eq!(
        c(&s, "alarms_raised"),
        c(&s, "alarms_delivered") + c(&s, "alarms_dropped"),
        "{s}"
    );
    assert_eq!(c(&s, "ctrl_requests"), ctrl.count, "{s}");
    assert_eq!(c(&s, "ctrl_errors"), 0, "{s}");
    assert_eq!(c(&s, "bad_chains"), 0, "{s}");
    assert_eq!(c(&s, "queue_errors"), 0, "{s}");
    assert!(samples.count > 100, "sampling ran: {s}");
    assert!(meddled.count > 0 && config_reads > 0);
    // Every interrupt counted reached a call eventfd, and no other.
    let mut seen = 0;
    let drivers = samples.calls + events.calls + ctrl.calls;
    let settled = support::wait_until(Duration::from_secs(2), || {
        let s = counters(&mut ctl);
        seen = drivers + vmm.calls(SAMPLES) + vmm.calls(EVENTS) + vmm.calls(CTRL);
        c(&s, "interrupts_raised") + c(&s, "spurious_interrupts") == seen
    });
    let s = counters(&mut ctl);
    assert!(settled, "the drivers saw {seen} interrupts: {s}");
    assert_eq!(c(&s, "spurious_interrupts"), meddled.calls, "{s}");
}
