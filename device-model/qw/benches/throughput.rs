//! Throughput of the qw backend: descriptors per second and MB/s through the
//! real `vdevlab-qw` binary (built with the bench profile, i.e. release),
//! driven over vhost-user by the in-process frontend of the protocol tests
//! (`tests/support/mod.rs`), which plays the VMM and the guest driver.
//!
//! Groups:
//!
//! - `rx`, `tx`: the virtqueue path, for 64 B and 4 KiB buffers, with and
//!   without `VIRTIO_RING_F_EVENT_IDX`. The driver keeps the whole ring
//!   (256 single-descriptor buffers) posted, kicks, sleeps on the call
//!   eventfd, reaps the used ring and re-posts, as a guest driver does. Only
//!   that loop is timed: between chunks, with no buffer posted, the receive
//!   FIFO is refilled through the control socket (`inject`) and the transmit
//!   capture is emptied (`reset`), untimed.
//! - `control`: the host side of the same data: `inject` and `capture`
//!   requests through the control socket (JSON lines, hex), one at a time.
//!
//! Each benchmark reports elements (descriptors or requests) and bytes per
//! second. A table printed at the end adds what wall-clock figures on a
//! shared machine cannot show: the CPU time the device process and the
//! driver spent per descriptor (from `/proc/.../schedstat`), the driver's
//! kicks and wake-ups, and the device's interrupt counters.
//! `docs/benchmarks.md` has the figures and the command.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use support::{
    avail_ring_addr, used_ring_addr, Ctl, Desc, Device, Options, Vmm, AVAIL_F_NO_INTERRUPT,
    DATA_BASE, QUEUE_SIZE, RX, TX,
};
use vdevlab_qw::control::Response;
use vdevlab_qw::core::CoreCounters;
use vdevlab_qw::device::Stats;
use vhost::VhostBackend;
use virtio_bindings::bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Receive FIFO and transmit capture sizes given to the binary: room for a
/// whole chunk (below) and then some.
const DEVICE_BUFFER_BYTES: usize = 64 << 20;
/// Bytes moved per untimed refill (rx) or drain (tx) of the device.
const CHUNK_BYTES: u64 = 8 << 20;
/// Most descriptors per chunk (64 B buffers would otherwise make it 131072).
const CHUNK_MAX_DESCS: u64 = 16 * 1024;
/// Bytes per `inject` request when refilling the receive FIFO: small
/// requests cost the control plane the least CPU per byte (see
/// `docs/benchmarks.md`).
const INJECT_PIECE: usize = 16 << 10;
/// Refill requests in flight on the control socket (their replies are small
/// enough to sit in the socket buffer).
const INJECT_PIPELINE: usize = 32;
/// The set-up's self-check moves a ring's worth of buffers and 8 more, but
/// for large buffers only this many bytes (and at least 16 buffers): a debug
/// build, as in `cargo test --benches`, decodes hex slowly.
const SELF_CHECK_BYTES: u64 = 64 << 10;
/// Longest a driver waits for an interrupt before declaring the device stuck.
const IRQ_TIMEOUT_MS: i32 = 5000;

/// Criterion's measurement time per benchmark; rx with 4 KiB buffers gets
/// three times as much, whatever `--measurement-time` says.
const MEASUREMENT_TIME: Duration = Duration::from_secs(2);

/// The buffer sizes measured.
const SIZES: [u32; 2] = [64, 4096];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Rx,
    Tx,
}

impl Dir {
    fn name(self) -> &'static str {
        match self {
            Dir::Rx => "rx",
            Dir::Tx => "tx",
        }
    }
}

/// The byte stream used for checking: byte `k` is `k mod 251` (a prime, so
/// no buffer size lines up with it).
fn stream(from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64).map(|k| (k % 251) as u8).collect()
}

/// `vring_need_event` from the virtio specification: whether moving an index
/// from `old` to `new` passes `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// On-CPU time of a task, from its `schedstat` (nanoseconds, first field).
fn schedstat(path: &Path) -> Duration {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let ns = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// On-CPU time of the calling thread (the driver).
fn thread_cpu() -> Duration {
    schedstat(Path::new("/proc/thread-self/schedstat"))
}

/// The device process, to read its CPU time (`Device` keeps its child
/// private): the process whose command line names its control socket.
#[derive(Debug, Clone, Copy)]
struct DevicePid(u32);

impl DevicePid {
    fn find(dev: &Device) -> Self {
        let needle = dev.control.as_os_str().as_bytes();
        let entries = std::fs::read_dir("/proc").expect("reading /proc");
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if cmdline.windows(needle.len()).any(|w| w == needle) {
                return DevicePid(pid);
            }
        }
        panic!("no process serves {}", dev.control.display());
    }

    /// On-CPU time of all the device's threads (vhost-user, worker, control).
    fn cpu(self) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.0)).expect("device tasks");
        tasks
            .flatten()
            .map(|t| schedstat(&t.path().join("schedstat")))
            .sum()
    }
}

/// A control connection that sends request lines encoded beforehand, so
/// the bench process does not re-encode megabytes of hex on every refill.
struct RawCtl {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    line: String,
}

impl RawCtl {
    fn connect(dev: &Device) -> Self {
        let writer = UnixStream::connect(&dev.control).expect("connecting to the control socket");
        let reader = BufReader::new(writer.try_clone().expect("cloning the control socket"));
        Self {
            writer,
            reader,
            line: String::new(),
        }
    }

    fn send(&mut self, line: &[u8]) {
        self.writer.write_all(line).expect("control: write");
    }

    /// The next reply line (raw), which must say `"ok":true`.
    fn reply_line(&mut self) -> &str {
        self.line.clear();
        let n = self
            .reader
            .read_line(&mut self.line)
            .expect("control: read");
        assert!(n > 0, "control socket closed");
        assert!(
            self.line.starts_with(r#"{"ok":true"#),
            "control: {}",
            self.line
        );
        &self.line
    }

    /// The next reply, parsed (small replies only).
    fn reply(&mut self) -> Response {
        serde_json::from_str(self.reply_line()).expect("control: reply")
    }

    fn reset(&mut self) {
        self.send(b"{\"op\":\"reset\"}\n");
        self.reply();
    }
}

/// `{"op":"inject",...}` for `data`, newline included.
fn inject_line(data: &[u8]) -> Vec<u8> {
    format!("{{\"op\":\"inject\",\"data\":\"{}\"}}\n", hex::encode(data)).into_bytes()
}

/// What was measured, for the summary table.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Descriptors (or requests).
    elems: u64,
    bytes: u64,
    /// Wall-clock time of the timed parts.
    timed: Duration,
    /// CPU time of the device process during the timed parts.
    device_cpu: Duration,
    /// CPU time of the driver (this thread) during the timed parts.
    driver_cpu: Duration,
    kicks: u64,
    wakeups: u64,
}

/// One row of the summary table.
#[derive(Debug)]
struct Row {
    name: String,
    counts: Counts,
    /// Device counters over the measurement (virtqueue rows only).
    device: Option<Stats>,
}

/// A guest driver for one queue of one device process, in the frontend's
/// guest memory.
///
/// Descriptor `i` of the table always describes buffer `i` (one descriptor
/// per chain, `size` bytes); posting a buffer is writing its head into the
/// available ring. Kicks and interrupts follow what Linux's virtio ring
/// does:
///
/// - kicks: without EVENT_IDX, after every batch of re-posted buffers unless
///   the device set `VRING_USED_F_NO_NOTIFY` (this device never does); with
///   EVENT_IDX, only when the new available index passes `avail_event`.
/// - interrupts: the driver keeps them off while it has work (without
///   EVENT_IDX, `VRING_AVAIL_F_NO_INTERRUPT`; with EVENT_IDX, a `used_event`
///   the used index has already passed), and turns them on only before it
///   sleeps. With EVENT_IDX it asks for the interrupt when 3/4 of the
///   outstanding buffers are used, as `virtqueue_enable_cb_delayed` does
///   (with one outstanding buffer: the next completion).
struct Driver {
    dir: Dir,
    size: u32,
    event_idx: bool,
    q: usize,
    vmm: Vmm,
    ctl: Ctl,
    raw: RawCtl,
    pid: DevicePid,
    /// Our own call eventfd (the support code's is private), to sleep on.
    call: EventFd,
    /// Heads not posted.
    free: VecDeque<u16>,
    /// The driver's shadow of the used index.
    last_used: u16,
    /// Available index at the last kick decision.
    kicked_avail: u16,
    /// A whole refill request ([`INJECT_PIECE`] bytes), encoded once.
    inject_piece: Vec<u8>,
    counts: Counts,
    stats_at_start: Stats,
    // Last: the process is killed after the connection is dropped.
    dev: Device,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("dir", &self.dir)
            .field("size", &self.size)
            .field("event_idx", &self.event_idx)
            .finish()
    }
}

fn buf_addr(i: u16, size: u32) -> u64 {
    DATA_BASE + u64::from(i) * u64::from(size)
}

impl Driver {
    fn new(dir: Dir, size: u32, event_idx: bool) -> Self {
        let buffer = DEVICE_BUFFER_BYTES.to_string();
        let mut args = vec!["--rx-fifo-bytes", &buffer, "--tx-capture-bytes", &buffer];
        // The device trace's cost (docs/benchmarks.md): the same run with
        // tracing on from the start.
        if std::env::var_os("VDEVLAB_BENCH_TRACE").is_some_and(|v| !v.is_empty()) {
            args.push("--trace");
        }
        let dev = Device::spawn(&args);
        let ctl = dev.control();
        let raw = RawCtl::connect(&dev);
        let pid = DevicePid::find(&dev);
        let mut vmm = dev.connect(Options {
            event_idx,
            ..Options::default()
        });
        let q = match dir {
            Dir::Rx => RX,
            Dir::Tx => TX,
        };
        let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        vmm.fe
            .set_vring_call(q, &call)
            .expect("SET_VRING_CALL (the bench's own eventfd)");
        for i in 0..QUEUE_SIZE {
            let addr = buf_addr(i, size);
            let desc = match dir {
                Dir::Rx => Desc::writable(addr, size),
                Dir::Tx => {
                    // Buffer i holds bytes i*size.. of the stream.
                    vmm.write(addr, &stream(u64::from(i) * u64::from(size), size as usize));
                    Desc::readable(addr, size)
                }
            };
            assert_eq!(vmm.write_chain(q, &[desc]), i, "descriptor slots in order");
        }
        if !event_idx {
            vmm.set_avail_flags(q, AVAIL_F_NO_INTERRUPT);
        }
        let mut d = Driver {
            dir,
            size,
            event_idx,
            q,
            vmm,
            ctl,
            raw,
            pid,
            call,
            free: (0..QUEUE_SIZE).collect(),
            last_used: 0,
            kicked_avail: 0,
            inject_piece: inject_line(&stream(0, INJECT_PIECE)),
            counts: Counts::default(),
            stats_at_start: Stats::default(),
            dev,
        };
        d.self_check();
        d.stats_at_start = d.ctl.stats();
        d
    }

    /// Move a ring's worth of buffers and a few more, so re-posting is
    /// covered (or, for large buffers, [`SELF_CHECK_BYTES`] or more), and
    /// check every byte, so a broken data path cannot produce fine-looking
    /// figures.
    fn self_check(&mut self) {
        let size = u64::from(self.size);
        let ring = u64::from(QUEUE_SIZE);
        let n = (ring + 8).min((SELF_CHECK_BYTES / size).max(16));
        let total = (n * size) as usize;
        match self.dir {
            Dir::Rx => {
                let data = stream(0, total);
                for piece in data.chunks(INJECT_PIECE) {
                    assert_eq!(self.ctl.inject(piece), piece.len());
                }
                self.run_chunk(n);
                // Buffers complete in ring order, so buffer h last got
                // descriptor number h (or QUEUE_SIZE + h) of the stream.
                for h in 0..n.min(ring) as u16 {
                    let nth = u64::from(h) + if u64::from(h) + ring < n { ring } else { 0 };
                    assert_eq!(
                        self.vmm.read(buf_addr(h, self.size), self.size as usize),
                        stream(nth * size, self.size as usize),
                        "rx buffer {h}"
                    );
                }
            }
            Dir::Tx => {
                self.run_chunk(n);
                let mut got = Vec::with_capacity(total);
                while got.len() < total {
                    let part = self.ctl.capture(Some(INJECT_PIECE));
                    assert!(!part.is_empty(), "capture ended after {} bytes", got.len());
                    got.extend(part);
                }
                // Buffer i holds stream bytes i*size..; the ring wraps.
                let ring_bytes = ring * size;
                for (k, &b) in got.iter().enumerate() {
                    assert_eq!(
                        b,
                        ((k as u64 % ring_bytes) % 251) as u8,
                        "tx capture byte {k}"
                    );
                }
            }
        }
        let s = self.ctl.stats();
        assert_eq!(s.bad_chains + s.queue_errors, 0, "{s:?}");
        self.counts = Counts::default();
    }

    /// Criterion's measurement: `iters` descriptors, in chunks; returns the
    /// time spent in the driver loop only.
    fn measure(&mut self, iters: u64) -> Duration {
        let per_chunk = (CHUNK_BYTES / u64::from(self.size)).clamp(1, CHUNK_MAX_DESCS);
        let mut left = iters;
        let mut timed = Duration::ZERO;
        while left > 0 {
            let n = left.min(per_chunk);
            self.prepare(n);
            timed += self.run_chunk(n);
            left -= n;
        }
        timed
    }

    /// Untimed, with no buffer posted: put `n` buffers' worth of data in
    /// the receive FIFO, or empty the transmit capture.
    fn prepare(&mut self, n: u64) {
        assert_eq!(self.free.len(), usize::from(QUEUE_SIZE), "nothing posted");
        match self.dir {
            Dir::Rx => {
                let total = n * u64::from(self.size);
                let whole = total / INJECT_PIECE as u64;
                let rest = (total % INJECT_PIECE as u64) as usize;
                let mut sent = 0;
                let mut answered = 0;
                while answered < whole {
                    if sent < whole && sent - answered < INJECT_PIPELINE as u64 {
                        self.raw.send(&self.inject_piece);
                        sent += 1;
                    } else {
                        let r = self.raw.reply();
                        assert_eq!(r.accepted, Some(INJECT_PIECE), "{r:?}");
                        answered += 1;
                    }
                }
                if rest > 0 {
                    self.raw.send(&inject_line(&stream(0, rest)));
                    assert_eq!(self.raw.reply().accepted, Some(rest));
                }
            }
            Dir::Tx => self.raw.reset(),
        }
    }

    /// Move exactly `n` buffers: post up to a ring's worth, then reap and
    /// re-post until `n` are used. The device has exactly the data for
    /// them (rx) or the room (tx).
    fn run_chunk(&mut self, n: u64) -> Duration {
        let cpu0 = (self.pid.cpu(), thread_cpu());
        let start = Instant::now();
        let mut to_post = n;
        let mut done = 0;
        self.post(&mut to_post);
        while done < n {
            let reaped = self.reap();
            if reaped == 0 {
                self.sleep();
                continue;
            }
            done += reaped;
            self.post(&mut to_post);
        }
        let elapsed = start.elapsed();
        let c = &mut self.counts;
        c.driver_cpu += thread_cpu().saturating_sub(cpu0.1);
        c.device_cpu += self.pid.cpu().saturating_sub(cpu0.0);
        c.elems += n;
        c.bytes += n * u64::from(self.size);
        c.timed += elapsed;
        elapsed
    }

    /// Post free buffers (at most `to_post`) and kick if the device wants it.
    fn post(&mut self, to_post: &mut u64) {
        let n = (self.free.len() as u64).min(*to_post);
        if n == 0 {
            return;
        }
        let q = self.q;
        let mut idx = self.vmm.avail_idx(q);
        for _ in 0..n {
            let head = self.free.pop_front().expect("a free head");
            let slot = avail_ring_addr(q) + 4 + 2 * u64::from(idx % QUEUE_SIZE);
            self.vmm
                .mem
                .write_obj(head.to_le(), GuestAddress(slot))
                .expect("writing the available ring");
            idx = idx.wrapping_add(1);
        }
        // A release store: the entries are visible before the index.
        self.vmm.set_avail_idx(q, idx);
        *to_post -= n;
        // As virtio_mb() in Linux's virtqueue_kick_prepare: the index store
        // must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            need_event(self.vmm.avail_event(q), idx, self.kicked_avail)
        } else {
            self.vmm.used_flags(q) & VRING_USED_F_NO_NOTIFY as u16 == 0
        };
        self.kicked_avail = idx;
        if kick {
            self.vmm.kick(q);
            self.counts.kicks += 1;
        }
    }

    /// Take every new used element; returns how many.
    fn reap(&mut self) -> u64 {
        let q = self.q;
        let used = self.vmm.used_idx(q); // acquire: the elements are visible
        let n = used.wrapping_sub(self.last_used);
        let want_len = match self.dir {
            Dir::Rx => self.size,
            Dir::Tx => 0,
        };
        for i in 0..n {
            let idx = self.last_used.wrapping_add(i);
            let addr = used_ring_addr(q) + 4 + 8 * u64::from(idx % QUEUE_SIZE);
            let elem: [u8; 8] = self
                .vmm
                .mem
                .read_obj(GuestAddress(addr))
                .expect("reading the used ring");
            let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
            let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
            assert!(
                id < u32::from(QUEUE_SIZE) && len == want_len,
                "used element {idx}: id {id}, len {len} (want len {want_len}); device log:\n{}",
                self.dev.log()
            );
            self.free.push_back(id as u16);
        }
        self.last_used = used;
        u64::from(n)
    }

    /// Nothing to reap: turn interrupts on, look once more, and sleep on
    /// the call eventfd until the device signals.
    fn sleep(&mut self) {
        let q = self.q;
        if self.event_idx {
            let outstanding = self.vmm.avail_idx(q).wrapping_sub(self.last_used);
            self.vmm
                .set_used_event(q, self.last_used.wrapping_add(outstanding * 3 / 4));
        } else {
            self.vmm.set_avail_flags(q, 0);
        }
        // The device may have used buffers before it could see the change.
        fence(Ordering::SeqCst);
        if self.vmm.used_idx(q) == self.last_used {
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd that lives across the call,
            // and the count passed is 1.
            let r = unsafe { libc::poll(&mut pfd, 1, IRQ_TIMEOUT_MS) };
            assert!(
                r > 0,
                "no interrupt within {IRQ_TIMEOUT_MS} ms (poll returned {r}); {:?}, used {} of avail {}; device log:\n{}",
                self,
                self.vmm.used_idx(q),
                self.vmm.avail_idx(q),
                self.dev.log()
            );
            self.counts.wakeups += 1;
        }
        // Consume the signal count (nothing there if we did not sleep).
        let _ = self.call.read();
        if !self.event_idx {
            self.vmm.set_avail_flags(q, AVAIL_F_NO_INTERRUPT);
        }
    }

    fn row(&mut self, name: String) -> Row {
        let now = self.ctl.stats();
        let s0 = self.stats_at_start;
        Row {
            name,
            counts: self.counts,
            device: Some(Stats {
                core: CoreCounters {
                    interrupts_raised: now.interrupts_raised - s0.interrupts_raised,
                    interrupts_suppressed: now.interrupts_suppressed - s0.interrupts_suppressed,
                    ..now.core
                },
                ..now
            }),
        }
    }
}

fn flat_group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    // Every iteration is costly and alike: flat sampling.
    g.sampling_mode(SamplingMode::Flat);
    g
}

fn size_name(size: u32) -> String {
    if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else if size >= 1024 {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

fn virtqueue_benches(c: &mut Criterion, rows: &mut Vec<Row>) {
    for dir in [Dir::Rx, Dir::Tx] {
        let mut g = flat_group(c, dir.name());
        for size in SIZES {
            for event_idx in [false, true] {
                let id = format!(
                    "{}/{}",
                    size_name(size),
                    if event_idx {
                        "event_idx"
                    } else {
                        "no_event_idx"
                    }
                );
                g.throughput(Throughput::ElementsAndBytes {
                    elements: 1,
                    bytes: u64::from(size),
                });
                // Refilling the receive FIFO through the control socket
                // takes ~60 times longer than emptying it at 4 KiB, and
                // criterion budgets wall-clock time: give it more. (The
                // group keeps the setting, so rx's larger size comes last.)
                if dir == Dir::Rx && size >= 4096 {
                    g.measurement_time(MEASUREMENT_TIME * 3);
                }
                let mut driver: Option<Driver> = None;
                g.bench_function(&id, |b| {
                    let d = driver.get_or_insert_with(|| Driver::new(dir, size, event_idx));
                    b.iter_custom(|iters| d.measure(iters));
                });
                if let Some(mut d) = driver {
                    rows.push(d.row(format!("{}/{id}", dir.name())));
                }
            }
        }
        g.finish();
    }
}

/// The control plane alone, one request at a time: `inject` requests of
/// 64 KiB and 1 MiB into a device with no buffer posted (the FIFO is
/// emptied with `reset`, untimed, before it would overflow), and 1 MiB
/// `capture` requests of what the tx path put in the capture (untimed).
fn control_benches(c: &mut Criterion, rows: &mut Vec<Row>) {
    let mut g = flat_group(c, "control");
    for piece in [64usize << 10, 1 << 20] {
        let id = format!("inject/{}", size_name(piece as u32));
        g.throughput(Throughput::ElementsAndBytes {
            elements: 1,
            bytes: piece as u64,
        });
        let mut state: Option<(Device, RawCtl, DevicePid, Vec<u8>, Counts)> = None;
        g.bench_function(&id, |b| {
            let (_, raw, pid, line, counts) = state.get_or_insert_with(|| {
                let dev = Device::spawn(&["--rx-fifo-bytes", &DEVICE_BUFFER_BYTES.to_string()]);
                let raw = RawCtl::connect(&dev);
                let pid = DevicePid::find(&dev);
                (
                    dev,
                    raw,
                    pid,
                    inject_line(&stream(0, piece)),
                    Counts::default(),
                )
            });
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                // The FIFO survives from the previous sample: start empty.
                let mut fifo = usize::MAX;
                for _ in 0..iters {
                    if fifo.saturating_add(piece) > DEVICE_BUFFER_BYTES {
                        raw.reset();
                        fifo = 0;
                    }
                    let cpu0 = pid.cpu();
                    let t = Instant::now();
                    raw.send(line);
                    let r = raw.reply();
                    let elapsed = t.elapsed();
                    counts.device_cpu += pid.cpu().saturating_sub(cpu0);
                    assert_eq!(r.accepted, Some(piece));
                    timed += elapsed;
                    fifo += piece;
                }
                counts.elems += iters;
                counts.bytes += iters * piece as u64;
                counts.timed += timed;
                timed
            });
        });
        if let Some((.., counts)) = state {
            rows.push(Row {
                name: format!("control/{id}"),
                counts,
                device: None,
            });
        }
    }
    let piece = 1usize << 20;
    g.throughput(Throughput::ElementsAndBytes {
        elements: 1,
        bytes: piece as u64,
    });
    let mut state: Option<(Driver, Counts)> = None;
    let line = format!("{{\"op\":\"capture\",\"max\":{piece}}}\n").into_bytes();
    g.bench_function("capture/1MiB", |b| {
        let (d, counts) =
            state.get_or_insert_with(|| (Driver::new(Dir::Tx, 4096, true), Counts::default()));
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                // Untimed: 1 MiB through the tx ring into an empty capture.
                d.prepare(0);
                d.run_chunk(piece as u64 / 4096);
                let cpu0 = d.pid.cpu();
                let t = Instant::now();
                d.raw.send(&line);
                let reply_len = d.raw.reply_line().len();
                let elapsed = t.elapsed();
                counts.device_cpu += d.pid.cpu().saturating_sub(cpu0);
                assert!(reply_len > 2 * piece, "a 1 MiB capture, hex encoded");
                timed += elapsed;
            }
            counts.elems += iters;
            counts.bytes += iters * piece as u64;
            counts.timed += timed;
            timed
        });
    });
    if let Some((_, counts)) = state {
        rows.push(Row {
            name: "control/capture/1MiB".into(),
            counts,
            device: None,
        });
    }
    g.finish();
}

fn print_rows(rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("Summary over warm-up and measurement, timed parts only. cpu: on-CPU time per");
    println!("element (descriptor or request) of the device process (all threads) and of");
    println!("the driver thread; kick and wake: elements per kick and per driver wake-up;");
    println!("irq: interrupts the device raised and suppressed.");
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}",
        "benchmark",
        "elements",
        "Melem/s",
        "MB/s",
        "dev cpu",
        "drv cpu",
        "/kick",
        "/wake",
        "irq",
        "irq sup"
    );
    for r in rows {
        let c = r.counts;
        let secs = c.timed.as_secs_f64().max(1e-9);
        let per = |n: u64| match n {
            0 => "-".to_string(),
            n => format!("{:.0}", c.elems as f64 / n as f64),
        };
        let cpu = |d: Duration| match d {
            Duration::ZERO => "-".to_string(),
            d => format!("{:.3}us", d.as_secs_f64() * 1e6 / c.elems.max(1) as f64),
        };
        let (raised, suppressed) = r.device.map_or(("-".into(), "-".into()), |s| {
            (
                s.interrupts_raised.to_string(),
                s.interrupts_suppressed.to_string(),
            )
        });
        println!(
            "{:<24} {:>9} {:>9.3} {:>9.1} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8}",
            r.name,
            c.elems,
            c.elems as f64 / secs / 1e6,
            c.bytes as f64 / secs / 1e6,
            cpu(c.device_cpu),
            cpu(c.driver_cpu),
            per(c.kicks),
            per(c.wakeups),
            raised,
            suppressed
        );
    }
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(MEASUREMENT_TIME)
        .configure_from_args();
    let mut rows = Vec::new();
    virtqueue_benches(&mut c, &mut rows);
    control_benches(&mut c, &mut rows);
    c.final_summary();
    print_rows(&rows);
}
