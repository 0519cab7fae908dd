//! The qw backend under concurrency: both queues driven from two threads
//! at once through the testkit's frontend, while three control-plane
//! clients (each served by the backend's control thread) inject, capture
//! and meddle (stats, interrupt-mode changes, config reads, spurious
//! interrupts, resets), and the frontend itself reads the config space
//! (served by the vhost-user thread). The backend's worker, control and
//! vhost-user threads all meet at the engine lock.
//!
//! The data are 8-byte little-endian sequence numbers, moved in pieces
//! that are multiples of 8 (buffers, injections, captures, FIFO sizes), so
//! the FIFO and the capture only ever hold whole words: whatever the
//! interleaving, the driver's stream must be the injected words in order,
//! and the captured stream the transmitted words in order. Every wait is
//! bounded (a deadlock fails the test), every random choice is seeded.

mod support;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use support::{Ctl, Desc, Device, Options, RX, TX};
use vdevlab_device_core::irq::IrqMode;
use vdevlab_device_testkit::QueueDriver;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend as _;

const SEED: u64 = 0x5eed_c0c0;
/// Words (8 bytes each) moved each way.
const WORDS: u64 = 48 * 1024;
/// The whole test must be done by then (it takes well under a second).
const DEADLINE: Duration = Duration::from_secs(30);
/// Buffers each driver thread keeps posted (descriptors: up to 3 each,
/// fewer than the 256 of the queue).
const IN_FLIGHT: usize = 32;
/// Buffer slots in guest memory, one per descriptor, reused in turn: the
/// rx and tx threads have their own regions, with more slots than they can
/// have descriptors in flight (32 rx, 96 tx).
const RX_SLOT: u64 = 4096;
const RX_SLOTS: u64 = 64;
const RX_REGION: u64 = 0x10_0000;
const TX_SLOT: u64 = 2048;
const TX_SLOTS: u64 = 128;
const TX_REGION: u64 = 0x20_0000;
/// Small enough that injection meets a full FIFO and the driver meets a
/// full capture (back-pressure) now and then; multiples of 8.
const DEVICE_ARGS: &[&str] = &["--rx-fifo-bytes", "4096", "--tx-capture-bytes", "8192"];

/// xorshift64*, seeded: reproducible choices.
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
    /// A multiple of 8 in `8..=max` (max a multiple of 8).
    fn words(&mut self, max: u64) -> u64 {
        8 * (1 + self.next() % (max / 8))
    }
}

fn words(from: u64, to: u64) -> Vec<u8> {
    (from..to).flat_map(u64::to_le_bytes).collect()
}

/// The sequence numbers in `bytes` (a multiple of 8 long).
fn decode(bytes: &[u8]) -> Vec<u64> {
    assert_eq!(bytes.len() % 8, 0, "a stream of whole words");
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

/// With resets, words may be missing (a reset drops what the FIFO or the
/// capture holds) but never duplicated or reordered.
fn strictly_increasing(what: &str, seq: &[u64]) {
    if let Some(w) = seq.windows(2).find(|w| w[1] <= w[0]) {
        panic!("{what}: word {} after word {}", w[1], w[0]);
    }
}

/// What one thread hands back.
#[derive(Debug, Default)]
struct Done {
    name: &'static str,
    /// Bytes received (rx driver) or captured (capture client).
    bytes: Vec<u8>,
    /// Buffers completed (drivers), bytes offered (injector).
    count: u64,
    /// Interrupts seen (drivers), bytes accepted (injector), spurious
    /// interrupts requested (meddler).
    extra: u64,
}

type Report = Result<Done, String>;

fn spawn(
    reports: &mpsc::Sender<Report>,
    name: &'static str,
    f: impl FnOnce() -> Result<Done, String> + Send + 'static,
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

/// Shared between the threads.
struct Shared {
    deadline: Instant,
    /// Set when the injector has offered everything (rx) or the tx driver
    /// has completed everything (tx): who waits on it may finish.
    injected_all: AtomicBool,
    tx_all: AtomicBool,
    /// The meddler stops when this is set.
    stop: AtomicBool,
    /// Words accepted by the device so far (rx side).
    accepted_words: AtomicU64,
}

impl Shared {
    fn late(&self) -> bool {
        Instant::now() > self.deadline
    }
}

/// The receive driver: keeps buffers posted, harvests them in order, and
/// stops once the injector is done and everything it got accepted has
/// arrived (or, with resets, once the FIFO is empty too).
fn rx_driver(mut d: QueueDriver, sh: Arc<Shared>, mut ctl: Ctl, resets: bool) -> Report {
    let mut rng = Rng::new(SEED ^ 0x11);
    let mut posted: VecDeque<(u16, u64, u32)> = VecDeque::new();
    let mut next_slot = 0u64;
    let mut used = d.used_idx();
    let mut got = Vec::new();
    let mut completed = 0u64;
    loop {
        // A driver that is sometimes slow to give buffers back: the FIFO
        // then fills and injections meet refusals, and bytes wait in the
        // FIFO for the next kick.
        let want = 1 + (rng.next() % IN_FLIGHT as u64) as usize;
        if rng.next().is_multiple_of(4) {
            std::thread::sleep(Duration::from_micros(rng.next() % 400));
        }
        while posted.len() < want {
            let addr = RX_REGION + (next_slot % RX_SLOTS) * RX_SLOT;
            next_slot += 1;
            // Small buffers, so a few posted ones hold less than the FIFO.
            let len = rng.words(512) as u32;
            let head = d.post_chain(&[Desc::writable(addr, len)]);
            posted.push_back((head, addr, len));
        }
        d.kick();
        let now = d.used_idx();
        while used != now {
            let (id, len) = d.used_elem(used);
            let (head, addr, cap) = posted.pop_front().ok_or("a used rx entry never posted")?;
            if id != u32::from(head) || len > cap {
                return Err(format!(
                    "rx used entry {used}: ({id}, {len}), posted ({head}, {cap})"
                ));
            }
            got.extend(d.read(addr, len as usize));
            completed += 1;
            used = used.wrapping_add(1);
        }
        if sh.injected_all.load(Ordering::Acquire) {
            let accepted = sh.accepted_words.load(Ordering::Acquire) * 8;
            if got.len() as u64 == accepted {
                break;
            }
            // With resets the rest may have been dropped: done once the
            // device holds nothing more for us.
            if resets && ctl.rx_pending() == 0 && d.used_idx() == used {
                break;
            }
        }
        if sh.late() {
            return Err(format!("rx driver: timed out with {} bytes", got.len()));
        }
        // Sleep on the interrupt (bounded: coalesce and delay modes hold
        // it back, and a poll finds the rest anyway).
        d.wait_call(Duration::from_micros(500));
    }
    Ok(Done {
        bytes: got,
        count: completed,
        extra: d.calls(),
        ..Done::default()
    })
}

/// The injector: offers the words in uneven pieces; what the FIFO refuses
/// is offered again later.
fn injector(sh: Arc<Shared>, mut ctl: Ctl) -> Report {
    let mut rng = Rng::new(SEED ^ 0x22);
    let (mut next, mut offered, mut accepted) = (0u64, 0u64, 0u64);
    while next < WORDS {
        let n = (rng.words(8192) / 8).min(WORDS - next);
        let took = ctl.inject(&words(next, next + n)) as u64;
        if !took.is_multiple_of(8) {
            return Err(format!("the FIFO took {took} bytes: not whole words"));
        }
        offered += n * 8;
        accepted += took;
        next += took / 8;
        sh.accepted_words.store(next, Ordering::Release);
        if took < n * 8 {
            std::thread::sleep(Duration::from_micros(200));
        }
        if sh.late() {
            return Err(format!("injector: timed out at word {next}"));
        }
    }
    sh.injected_all.store(true, Ordering::Release);
    Ok(Done {
        count: offered,
        extra: accepted,
        ..Done::default()
    })
}

/// The transmit driver: posts chains of 1 to 3 buffers holding the next
/// words, harvests them in order.
fn tx_driver(mut d: QueueDriver, sh: Arc<Shared>) -> Report {
    let mut rng = Rng::new(SEED ^ 0x33);
    let mut posted: VecDeque<u16> = VecDeque::new();
    let mut next_slot = 0u64;
    let mut next = 0u64;
    let mut used = d.used_idx();
    let mut completed = 0u64;
    loop {
        while posted.len() < IN_FLIGHT && next < WORDS {
            let parts = 1 + rng.next() % 3;
            let mut descs = Vec::new();
            for _ in 0..parts {
                if next == WORDS {
                    break;
                }
                let n = (rng.words(TX_SLOT) / 8).min(WORDS - next);
                let addr = TX_REGION + (next_slot % TX_SLOTS) * TX_SLOT;
                next_slot += 1;
                d.write(addr, &words(next, next + n));
                next += n;
                descs.push(Desc::readable(addr, n as u32 * 8));
            }
            posted.push_back(d.post_chain(&descs));
        }
        d.kick();
        let now = d.used_idx();
        while used != now {
            let (id, _) = d.used_elem(used);
            let head = posted.pop_front().ok_or("a used tx entry never posted")?;
            if id != u32::from(head) {
                return Err(format!("tx used entry {used}: head {id}, posted {head}"));
            }
            completed += 1;
            used = used.wrapping_add(1);
        }
        if next == WORDS && posted.is_empty() {
            break;
        }
        if sh.late() {
            return Err(format!(
                "tx driver: timed out at word {next}, {} in flight",
                posted.len()
            ));
        }
        d.wait_call(Duration::from_micros(500));
    }
    sh.tx_all.store(true, Ordering::Release);
    Ok(Done {
        count: completed,
        extra: d.calls(),
        ..Done::default()
    })
}

/// The capture client: takes what the driver transmitted, in uneven
/// pieces.
fn capturer(sh: Arc<Shared>, mut ctl: Ctl) -> Report {
    let mut rng = Rng::new(SEED ^ 0x44);
    let mut got = Vec::new();
    loop {
        let tx_done = sh.tx_all.load(Ordering::Acquire);
        let c = ctl.capture(Some(rng.words(4096) as usize));
        if !c.len().is_multiple_of(8) {
            return Err(format!("captured {} bytes: not whole words", c.len()));
        }
        got.extend_from_slice(&c);
        // Once the driver is done, an empty capture means all is in.
        if tx_done && c.is_empty() {
            break;
        }
        if c.is_empty() {
            std::thread::sleep(Duration::from_micros(200));
        }
        if sh.late() {
            return Err(format!("capturer: timed out with {} bytes", got.len()));
        }
    }
    Ok(Done {
        bytes: got,
        ..Done::default()
    })
}

fn irq_mode(rng: &mut Rng) -> IrqMode {
    match rng.next() % 3 {
        0 => IrqMode::Immediate,
        1 => IrqMode::Coalesce {
            count: 1 + (rng.next() % 8) as u32,
            usecs: 50 + rng.next() % 950,
        },
        _ => IrqMode::Delay {
            usecs: rng.next() % 500,
            jitter_usecs: rng.next() % 200,
            seed: rng.next(),
        },
    }
}

/// The meddler: stats (counters never go back), interrupt-mode changes,
/// config reads, spurious interrupts and, if `resets`, resets.
fn meddler(sh: Arc<Shared>, mut ctl: Ctl, resets: bool) -> Report {
    let mut rng = Rng::new(SEED ^ 0x55);
    let mut last = ctl.stats();
    let mut spurious = 0u64;
    let mut requests = 0u64;
    while !sh.stop.load(Ordering::Acquire) {
        match rng.next() % 8 {
            0..=2 => {
                let s = ctl.stats();
                let back = [
                    ("injected_bytes", s.injected_bytes, last.injected_bytes),
                    ("rx_bytes", s.rx_bytes, last.rx_bytes),
                    ("rx_buffers", s.rx_buffers, last.rx_buffers),
                    ("tx_bytes", s.tx_bytes, last.tx_bytes),
                    ("tx_buffers", s.tx_buffers, last.tx_buffers),
                    (
                        "interrupts_raised",
                        s.core.interrupts_raised,
                        last.core.interrupts_raised,
                    ),
                ];
                if let Some((name, now, was)) = back.iter().find(|(_, now, was)| now < was) {
                    return Err(format!("counter {name} went back from {was} to {now}"));
                }
                if s.rx_bytes > s.injected_bytes {
                    return Err(format!(
                        "delivered {} bytes of {} injected",
                        s.rx_bytes, s.injected_bytes
                    ));
                }
                last = s;
            }
            3 | 4 => {
                let queue = ["rx", "tx", "all"][(rng.next() % 3) as usize];
                ctl.0
                    .interrupt_mode(queue, irq_mode(&mut rng))
                    .map_err(|e| format!("interrupt_mode: {e}"))?;
            }
            5 => {
                let r = ctl.raw(r#"{"op":"config"}"#);
                if !r.ok {
                    return Err(format!("config: {r:?}"));
                }
            }
            6 => {
                let q = ["rx", "tx"][(rng.next() % 2) as usize];
                let n = 1 + rng.next() % 3;
                let r = ctl.raw(&format!(
                    r#"{{"op":"fault","fault":{{"kind":"spurious_interrupts","queue":"{q}","count":{n}}}}}"#
                ));
                if !r.ok {
                    return Err(format!("fault: {r:?}"));
                }
                spurious += n;
            }
            _ => {
                if resets {
                    let r = ctl.raw(r#"{"op":"reset"}"#);
                    if !r.ok {
                        return Err(format!("reset: {r:?}"));
                    }
                }
            }
        }
        requests += 1;
        std::thread::sleep(Duration::from_micros(rng.next() % 300));
        if sh.late() {
            return Err("meddler: past the deadline".into());
        }
    }
    // Back to immediate interrupts, so nothing is held by a timer.
    ctl.0
        .interrupt_mode("all", IrqMode::Immediate)
        .map_err(|e| format!("interrupt_mode: {e}"))?;
    Ok(Done {
        count: requests,
        extra: spurious,
        ..Done::default()
    })
}

struct Outcome {
    dev: Device,
    vmm: support::Vmm,
    rx: Done,
    injected: Done,
    tx: Done,
    captured: Done,
    meddled: Done,
    config_reads: u64,
}

/// Run everything at once; returns what each thread reported.
fn race(resets: bool) -> Outcome {
    let dev = Device::spawn(DEVICE_ARGS);
    let mut vmm = dev.connect(Options::default());
    let sh = Arc::new(Shared {
        deadline: Instant::now() + DEADLINE,
        injected_all: AtomicBool::new(false),
        tx_all: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        accepted_words: AtomicU64::new(0),
    });
    let (reports, done) = mpsc::channel();
    let (rxd, txd) = (vmm.queue_driver(RX), vmm.queue_driver(TX));
    {
        let (sh, ctl) = (sh.clone(), dev.control());
        spawn(&reports, "rx-driver", move || {
            rx_driver(rxd, sh, ctl, resets)
        });
    }
    {
        let (sh, ctl) = (sh.clone(), dev.control());
        spawn(&reports, "injector", move || injector(sh, ctl));
    }
    {
        let sh = sh.clone();
        spawn(&reports, "tx-driver", move || tx_driver(txd, sh));
    }
    {
        let (sh, ctl) = (sh.clone(), dev.control());
        spawn(&reports, "capturer", move || capturer(sh, ctl));
    }
    {
        let (sh, ctl) = (sh.clone(), dev.control());
        spawn(&reports, "meddler", move || meddler(sh, ctl, resets));
    }
    drop(reports);
    // This thread plays the VMM reading the config space meanwhile (the
    // backend's vhost-user thread), until the data threads are done.
    let mut got: Vec<Done> = Vec::new();
    let mut config_reads = 0u64;
    while got.len() < 5 {
        if got.len() == 4 {
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
                    .get_config(0, 48, VhostUserConfigFlags::WRITABLE, &[0u8; 48])
                    .expect("GET_CONFIG");
                assert_eq!(&payload[0..4], b"QWDV");
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
    let mut take = |name| {
        let i = got.iter().position(|d| d.name == name).unwrap();
        got.swap_remove(i)
    };
    Outcome {
        rx: take("rx-driver"),
        injected: take("injector"),
        tx: take("tx-driver"),
        captured: take("capturer"),
        meddled: take("meddler"),
        config_reads,
        dev,
        vmm,
    }
}

/// One line on what the race did, for the test's output.
fn summary(o: &Outcome, s: &vdevlab_qw::device::Stats) {
    eprintln!(
        "rx {} buffers, tx {} chains; inject refused {} of {} bytes offered; \
         meddler {} requests, {} config reads; interrupts raised {}, spurious {}",
        o.rx.count,
        o.tx.count,
        s.inject_rejected_bytes,
        o.injected.count,
        o.meddled.count,
        o.config_reads,
        s.core.interrupts_raised,
        s.core.spurious_interrupts
    );
}

fn check_device_healthy(dev: &mut Device) {
    assert!(dev.is_running(), "the device died:\n{}", dev.log());
    let log = dev.log();
    assert!(!log.contains("panicked"), "the device panicked:\n{log}");
}

#[test]
fn both_queues_and_the_control_plane_at_once_lose_and_duplicate_nothing() {
    let mut o = race(false);
    let total = (WORDS * 8) as usize;
    assert_eq!(o.rx.bytes.len(), total, "bytes delivered to the driver");
    assert!(
        o.rx.bytes == words(0, WORDS),
        "the driver's stream is not the injected words in order"
    );
    assert_eq!(o.captured.bytes.len(), total, "bytes captured");
    assert!(
        o.captured.bytes == words(0, WORDS),
        "the captured stream is not the transmitted words in order"
    );
    check_device_healthy(&mut o.dev);

    // The counters add up.
    let mut ctl = o.dev.control();
    let s = ctl.stats();
    summary(&o, &s);
    assert_eq!(s.injected_bytes, o.injected.extra, "{s:?}");
    assert_eq!(o.injected.extra, total as u64);
    assert_eq!(
        s.inject_rejected_bytes,
        o.injected.count - o.injected.extra,
        "refused = offered - accepted: {s:?}"
    );
    assert_eq!(s.rx_bytes, total as u64, "{s:?}");
    assert_eq!(s.rx_buffers, o.rx.count, "{s:?}");
    assert_eq!(s.tx_bytes, total as u64, "{s:?}");
    assert_eq!(s.tx_buffers, o.tx.count, "{s:?}");
    assert_eq!(s.core.bad_chains, 0, "{s:?}");
    assert_eq!(s.core.queue_errors, 0, "{s:?}");
    assert_eq!(ctl.rx_pending(), 0);
    assert_eq!(ctl.tx_captured(), 0);
    // Every interrupt the device counts reached the driver, and no other:
    // each is one eventfd write. The drivers read theirs; what came after
    // they stopped (or before they started) the frontend reads. Wait for
    // the last timers (the meddler set immediate mode at the end, but a
    // delay armed before still fires).
    let mut seen = 0;
    let settled = support::wait_until(Duration::from_secs(2), || {
        let s = ctl.stats();
        seen = o.rx.extra + o.tx.extra + o.vmm.calls(RX) + o.vmm.calls(TX);
        s.core.interrupts_raised + s.core.spurious_interrupts == seen
    });
    let s = ctl.stats();
    assert!(
        settled,
        "interrupts counted: {} + {} spurious; the drivers saw {seen}: {s:?}",
        s.core.interrupts_raised, s.core.spurious_interrupts
    );
    assert_eq!(s.core.spurious_interrupts, o.meddled.extra, "{s:?}");
    assert!(o.meddled.count > 0 && o.config_reads > 0);
}

#[test]
fn resets_racing_traffic_drop_whole_words_but_never_reorder_or_duplicate() {
    let mut o = race(true);
    let rx = decode(&o.rx.bytes);
    strictly_increasing("rx", &rx);
    let tx = decode(&o.captured.bytes);
    strictly_increasing("tx capture", &tx);
    eprintln!(
        "resets dropped {} of {} rx words and {} of {} tx words",
        o.injected.extra / 8 - rx.len() as u64,
        o.injected.extra / 8,
        WORDS - tx.len() as u64,
        WORDS
    );
    check_device_healthy(&mut o.dev);
    let mut ctl = o.dev.control();
    let s = ctl.stats();
    summary(&o, &s);
    assert_eq!(s.injected_bytes, o.injected.extra, "{s:?}");
    assert_eq!(s.rx_bytes, o.rx.bytes.len() as u64, "{s:?}");
    assert_eq!(s.rx_buffers, o.rx.count, "{s:?}");
    assert_eq!(
        s.tx_bytes,
        WORDS * 8,
        "every transmitted byte was taken: {s:?}"
    );
    assert_eq!(s.tx_buffers, o.tx.count, "{s:?}");
    assert_eq!(s.core.bad_chains, 0, "{s:?}");
    assert_eq!(s.core.queue_errors, 0, "{s:?}");
    // Still a working device after all that, once the driver resets the
    // receive queue (its indices moved on with the rx thread).
    let vmm = &mut o.vmm;
    vmm.reset_queue(RX);
    let buf = vmm.buf(64);
    vmm.post_rx(&[(buf, 64)]);
    assert_eq!(ctl.inject(b"after the storm"), 15);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1), "rx works after the race");
    assert_eq!(vmm.used_elem(RX, 0).1, 15);
    assert_eq!(vmm.read(buf, 15), b"after the storm");
}
