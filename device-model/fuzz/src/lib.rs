//! Fuzz harness for the qw device's request path: the framework's
//! validation and pass (`Engine::process`, through `QwEngine::process_rx`
//! and `QwEngine::process_tx`) and the qw device behind it.
//!
//! The fuzz input is a small program for a hostile driver: a header that
//! places the two split virtqueues in guest memory, then a list of operations
//! that write raw descriptors, publish heads on the available ring, scribble
//! over any guest memory (indirect tables, ring headers, `used_event`, ...),
//! inject host bytes into the receive FIFO, drain the transmit capture, and
//! run the device's passes. The harness keeps its own books and checks the
//! device's after every pass; any violation is a panic, which libFuzzer
//! reports as a crash. See `README.md` for the format and the invariants.
//!
//! The library is separate from the fuzz target so that `cargo test` (on a
//! stable toolchain, without libFuzzer) can build the seed corpus and replay it.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use vdevlab_qw::core::{Engine, Pass, QueueError};
use vdevlab_qw::device::{QwDevice, QwEngine, Stats};
use vdevlab_qw::spec::MAX_CHAIN_BYTES;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory: two adjacent 32 KiB regions (so buffers and rings may
/// straddle a region boundary), then a 4 KiB hole, then one more 4 KiB
/// region (so a descriptor can start in memory and run into the hole).
pub const REGIONS: [(u64, usize); 3] = [(0, 0x8000), (0x8000, 0x8000), (0x11000, 0x1000)];
/// The rings are placed in the first 64 KiB (the two adjacent regions).
pub const RING_SPACE: u64 = 0x1_0000;
/// Largest queue size the harness uses (the lab's size).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Passes (process_rx or process_tx calls) per input, so that one input stays
/// fast whatever it asks for.
pub const MAX_PASSES: usize = 32;
/// Largest FIFO / capture capacity the header can ask for.
pub const MAX_CAPACITY: u32 = 2 << 20;

/// Descriptor flags (virtio 1.x split ring).
pub const F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Queue indices as used in the input (bit 0 of the queue byte).
pub const RX: u8 = 0;
/// See [`RX`].
pub const TX: u8 = 1;

/// Where one queue's rings live, as encoded in the header (offsets into the
/// first 64 KiB, reduced and aligned by [`RingLayout::resolve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingLayout {
    /// log2 of the queue size (taken modulo 9: sizes 1..=256).
    pub size_log2: u8,
    /// Descriptor table offset.
    pub desc: u16,
    /// Available ring offset.
    pub avail: u16,
    /// Used ring offset.
    pub used: u16,
}

/// Resolved ring addresses of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rings {
    /// Queue size (a power of two, 1..=256).
    pub size: u16,
    /// Descriptor table address (16-byte aligned, table inside memory).
    pub desc: u64,
    /// Available ring address (2-byte aligned, non-zero, ring inside memory).
    pub avail: u64,
    /// Used ring address (4-byte aligned, ring inside memory).
    pub used: u64,
}

impl Rings {
    /// Whether the used ring (which the device writes) overlaps the
    /// available ring's entries (which it reads).
    pub fn avail_overlaps_used(&self) -> bool {
        let q = u64::from(self.size);
        let (a0, a1) = (self.avail + 4, self.avail + 4 + 2 * q);
        let (u0, u1) = (self.used, self.used + 4 + 8 * q);
        a0 < u1 && u0 < a1
    }
}

fn place(v: u16, align: u64, len: u64) -> u64 {
    let span = RING_SPACE - len + 1;
    (u64::from(v) % span) & !(align - 1)
}

impl RingLayout {
    /// Reduce the encoded offsets to addresses that satisfy the virtio
    /// alignment rules and keep each ring inside memory. Rings may overlap
    /// each other and the buffers: a hostile driver can do that too.
    pub fn resolve(&self) -> Rings {
        let size = 1u16 << (self.size_log2 % 9);
        let q = u64::from(size);
        let desc = place(self.desc, 16, 16 * q);
        // virtio-queue refuses to iterate a queue whose available ring is at
        // address 0 (it takes that for "not configured").
        let mut avail = place(self.avail, 2, 6 + 2 * q);
        if avail == 0 {
            avail = 2;
        }
        let used = place(self.used, 4, 6 + 8 * q);
        Rings {
            size,
            desc,
            avail,
            used,
        }
    }
}

/// The fixed part of an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Receive queue (queue 0).
    pub rx: RingLayout,
    /// Transmit queue (queue 1).
    pub tx: RingLayout,
    /// Bit 0: VIRTIO_RING_F_EVENT_IDX negotiated.
    pub flags: u8,
    /// Initial `next_avail` / `next_used` of both queues (as restored by
    /// VHOST_USER_SET_VRING_BASE), and the driver's initial indices.
    pub base: u16,
    /// Transmit capture capacity in bytes (reduced modulo MAX_CAPACITY + 1).
    pub tx_capacity: u32,
    /// Receive FIFO capacity in bytes (reduced modulo MAX_CAPACITY + 1).
    pub rx_capacity: u32,
}

/// Encoded header length.
pub const HEADER_LEN: usize = 24;

/// One step of the hostile driver / the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write a raw 16-byte descriptor into slot `index % size` of a queue's
    /// descriptor table.
    Desc {
        /// RX or TX (bit 0).
        queue: u8,
        /// Slot.
        index: u16,
        /// Raw descriptor: address, length, flags, next.
        desc: RawDesc,
    },
    /// Write a raw descriptor anywhere in the first 64 KiB (for indirect
    /// tables).
    DescAt {
        /// Guest address (clipped to memory).
        addr: u16,
        /// Raw descriptor.
        desc: RawDesc,
    },
    /// Publish a head on the available ring the way a driver does: write the
    /// ring slot, then bump the available index by one.
    Push {
        /// RX or TX.
        queue: u8,
        /// Head index (not checked: may be >= the queue size).
        head: u16,
    },
    /// Store an arbitrary available index (may jump past the queue size).
    AvailIdx {
        /// RX or TX.
        queue: u8,
        /// New index.
        idx: u16,
    },
    /// Write raw bytes into guest memory (clipped to the first 64 KiB).
    Write {
        /// Guest address.
        addr: u16,
        /// Bytes.
        data: Vec<u8>,
    },
    /// The host injects `len` bytes (a counting pattern) into the rx FIFO.
    Inject {
        /// Byte count.
        len: u16,
    },
    /// Run `process_rx`.
    RxPass,
    /// Run `process_tx`.
    TxPass,
    /// The host takes up to `max` bytes from the capture.
    Take {
        /// Byte count.
        max: u16,
    },
    /// Run `process_rx` then `process_tx`.
    BothPasses,
}

/// A split-ring descriptor as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawDesc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VRING_DESC_F_* flags (any bits).
    pub flags: u16,
    /// Next descriptor index.
    pub next: u16,
}

impl RawDesc {
    /// Shorthand constructor.
    pub fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Self {
        Self {
            addr: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            len: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            flags: u16::from_le_bytes(b[12..14].try_into().unwrap()),
            next: u16::from_le_bytes(b[14..16].try_into().unwrap()),
        }
    }
}

/// Number of opcodes; an op byte is taken modulo this.
pub const NUM_OPS: u8 = 10;

/// Serialize an input (used to write the seed corpus).
pub fn encode(h: &Header, ops: &[Op]) -> Vec<u8> {
    let mut v = Vec::new();
    for l in [h.rx, h.tx] {
        v.push(l.size_log2);
        v.extend_from_slice(&l.desc.to_le_bytes());
        v.extend_from_slice(&l.avail.to_le_bytes());
        v.extend_from_slice(&l.used.to_le_bytes());
    }
    v.push(h.flags);
    v.extend_from_slice(&h.base.to_le_bytes());
    v.extend_from_slice(&h.tx_capacity.to_le_bytes()[..3]);
    v.extend_from_slice(&h.rx_capacity.to_le_bytes()[..3]);
    assert_eq!(v.len(), HEADER_LEN - 1);
    v.push(0); // reserved
    for op in ops {
        match op {
            Op::Desc { queue, index, desc } => {
                v.push(0);
                v.push(*queue);
                v.extend_from_slice(&index.to_le_bytes());
                v.extend_from_slice(&desc.to_bytes());
            }
            Op::DescAt { addr, desc } => {
                v.push(1);
                v.extend_from_slice(&addr.to_le_bytes());
                v.extend_from_slice(&desc.to_bytes());
            }
            Op::Push { queue, head } => {
                v.push(2);
                v.push(*queue);
                v.extend_from_slice(&head.to_le_bytes());
            }
            Op::AvailIdx { queue, idx } => {
                v.push(3);
                v.push(*queue);
                v.extend_from_slice(&idx.to_le_bytes());
            }
            Op::Write { addr, data } => {
                assert!(data.len() <= 255);
                v.push(4);
                v.extend_from_slice(&addr.to_le_bytes());
                v.push(data.len() as u8);
                v.extend_from_slice(data);
            }
            Op::Inject { len } => {
                v.push(5);
                v.extend_from_slice(&len.to_le_bytes());
            }
            Op::RxPass => v.push(6),
            Op::TxPass => v.push(7),
            Op::Take { max } => {
                v.push(8);
                v.extend_from_slice(&max.to_le_bytes());
            }
            Op::BothPasses => v.push(9),
        }
    }
    v
}

struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (a, b) = self.data.split_at(n);
        self.data = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<u32> {
        self.take(3).map(|b| u32::from_le_bytes([b[0], b[1], b[2], 0]))
    }
    fn desc(&mut self) -> Option<RawDesc> {
        self.take(16).map(RawDesc::from_bytes)
    }
}

/// Parse an input. A short header is padded with zeros; a truncated
/// operation ends the list.
pub fn decode(data: &[u8]) -> (Header, Vec<Op>) {
    let mut head = [0u8; HEADER_LEN];
    let n = data.len().min(HEADER_LEN);
    head[..n].copy_from_slice(&data[..n]);
    let mut c = Cursor { data: &head };
    let mut layout = || RingLayout {
        size_log2: c.u8().unwrap(),
        desc: c.u16().unwrap(),
        avail: c.u16().unwrap(),
        used: c.u16().unwrap(),
    };
    let rx = layout();
    let tx = layout();
    let flags = c.u8().unwrap();
    let base = c.u16().unwrap();
    let tx_capacity = c.u24().unwrap() % (MAX_CAPACITY + 1);
    let rx_capacity = c.u24().unwrap() % (MAX_CAPACITY + 1);
    let h = Header {
        rx,
        tx,
        flags,
        base,
        tx_capacity,
        rx_capacity,
    };

    let mut c = Cursor { data: &data[n..] };
    let mut ops = Vec::new();
    while let Some(op) = c.u8() {
        let op = match op % NUM_OPS {
            0 => (|| {
                Some(Op::Desc {
                    queue: c.u8()? & 1,
                    index: c.u16()?,
                    desc: c.desc()?,
                })
            })(),
            1 => (|| {
                Some(Op::DescAt {
                    addr: c.u16()?,
                    desc: c.desc()?,
                })
            })(),
            2 => (|| {
                Some(Op::Push {
                    queue: c.u8()? & 1,
                    head: c.u16()?,
                })
            })(),
            3 => (|| {
                Some(Op::AvailIdx {
                    queue: c.u8()? & 1,
                    idx: c.u16()?,
                })
            })(),
            4 => (|| {
                let addr = c.u16()?;
                let len = c.u8()?;
                Some(Op::Write {
                    addr,
                    data: c.take(usize::from(len))?.to_vec(),
                })
            })(),
            5 => c.u16().map(|len| Op::Inject { len }),
            6 => Some(Op::RxPass),
            7 => Some(Op::TxPass),
            8 => c.u16().map(|max| Op::Take { max }),
            _ => Some(Op::BothPasses),
        };
        match op {
            Some(op) => ops.push(op),
            None => break,
        }
    }
    (h, ops)
}

/// The byte the host injects at stream position `i`: a pattern that does not
/// repeat within 251 bytes, so a replayed test can tell bytes apart.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// `len` bytes of [`pattern`] from stream position `start`, without a
/// per-byte loop (that loop, instrumented, dominated the fuzzer's time).
fn pattern_slice(start: u64, len: usize) -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    let t = TABLE.get_or_init(|| (0..251 + u64::from(u16::MAX)).map(pattern).collect());
    let from = (start % 251) as usize;
    &t[from..from + len]
}

/// What happened during one run (for the seed tests).
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Every pass, in order: queue and result (`Err` as text).
    pub passes: Vec<(u8, Result<Pass, String>)>,
    /// Device counters at the end.
    pub stats: Stats,
    /// Bytes the host took from the capture, in order.
    pub captured: Vec<u8>,
}

struct QueueModel {
    rings: Rings,
    queue: Queue,
    /// The driver's own available index (what `Push` bumps).
    shadow_avail: Wrapping<u16>,
}

impl QueueModel {
    fn new(mem: &GuestMemoryMmap, layout: &RingLayout, base: u16, event_idx: bool) -> Self {
        let rings = layout.resolve();
        let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("queue");
        queue.try_set_size(rings.size).expect("size");
        queue
            .try_set_desc_table_address(GuestAddress(rings.desc))
            .expect("desc table address");
        queue
            .try_set_avail_ring_address(GuestAddress(rings.avail))
            .expect("avail ring address");
        queue
            .try_set_used_ring_address(GuestAddress(rings.used))
            .expect("used ring address");
        queue.set_event_idx(event_idx);
        queue.set_next_avail(base);
        queue.set_next_used(base);
        queue.set_ready(true);
        // The driver starts with its indices where the device's are.
        mem.write_obj(base.to_le(), GuestAddress(rings.avail + 2))
            .expect("avail idx");
        mem.write_obj(base.to_le(), GuestAddress(rings.used + 2))
            .expect("used idx");
        Self {
            rings,
            queue,
            shadow_avail: Wrapping(base),
        }
    }

    fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.rings.avail + 2)).unwrap())
    }

    /// The head in the available-ring entry for index `i`.
    fn avail_head(&self, mem: &GuestMemoryMmap, i: u16) -> u16 {
        let slot = u64::from(i % self.rings.size);
        u16::from_le(mem.read_obj(GuestAddress(self.rings.avail + 4 + 2 * slot)).unwrap())
    }
}

fn write_clipped(mem: &GuestMemoryMmap, addr: u16, data: &[u8]) {
    let addr = u64::from(addr);
    let room = (RING_SPACE - addr) as usize;
    mem.write_slice(&data[..data.len().min(room)], GuestAddress(addr))
        .expect("write inside the first 64 KiB");
}

/// The harness's own books, checked against the device after every pass.
#[derive(Default)]
struct Books {
    injected: u64,
    taken: u64,
}

/// With `RUST_LOG` set (e.g. `RUST_LOG=debug` when replaying a crash), print
/// the device's log on stderr; otherwise logging costs nothing.
fn init_logging() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .try_init();
        }
    });
}

/// Run one input. Panics (with a message naming the invariant) when the
/// device misbehaves.
pub fn run(data: &[u8]) -> Outcome {
    init_logging();
    let (h, ops) = decode(data);
    let mem: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l)))
            .expect("guest memory");
    let event_idx = h.flags & 1 != 0;
    let mut queues = [
        QueueModel::new(&mem, &h.rx, h.base, event_idx),
        QueueModel::new(&mem, &h.tx, h.base, event_idx),
    ];
    let tx_capacity = h.tx_capacity as usize;
    let mut dev = Engine::new(QwDevice::new(h.rx_capacity as usize, tx_capacity));
    let mut books = Books::default();
    let mut out = Outcome::default();

    // The host's closing moves: deliver and drain whatever is left.
    let tail = [
        Op::RxPass,
        Op::TxPass,
        Op::Take { max: u16::MAX },
        Op::TxPass,
        Op::RxPass,
    ];
    for op in ops.iter().chain(tail.iter()) {
        match op {
            Op::Desc { queue, index, desc } => {
                let r = &queues[usize::from(*queue)].rings;
                let slot = u64::from(*index % r.size);
                mem.write_slice(&desc.to_bytes(), GuestAddress(r.desc + 16 * slot))
                    .expect("descriptor table is inside memory");
            }
            Op::DescAt { addr, desc } => write_clipped(&mem, *addr, &desc.to_bytes()),
            Op::Push { queue, head } => {
                let q = &mut queues[usize::from(*queue)];
                let slot = u64::from(q.shadow_avail.0 % q.rings.size);
                mem.write_obj(head.to_le(), GuestAddress(q.rings.avail + 4 + 2 * slot))
                    .unwrap();
                q.shadow_avail += Wrapping(1);
                mem.store(
                    q.shadow_avail.0.to_le(),
                    GuestAddress(q.rings.avail + 2),
                    Ordering::Release,
                )
                .unwrap();
            }
            Op::AvailIdx { queue, idx } => {
                let q = &mut queues[usize::from(*queue)];
                q.shadow_avail = Wrapping(*idx);
                mem.store(idx.to_le(), GuestAddress(q.rings.avail + 2), Ordering::Release)
                    .unwrap();
            }
            Op::Write { addr, data } => write_clipped(&mem, *addr, data),
            Op::Inject { len } => {
                let start = books.injected + dev.stats().inject_rejected_bytes;
                let bytes = pattern_slice(start, usize::from(*len));
                let before = dev.stats();
                let accepted = dev.device.qw_mut().inject(bytes);
                books.injected += accepted as u64;
                let after = dev.stats();
                assert_eq!(
                    after.injected_bytes - before.injected_bytes,
                    accepted as u64,
                    "inject: injected_bytes counts what was accepted"
                );
                assert_eq!(
                    after.inject_rejected_bytes - before.inject_rejected_bytes,
                    u64::from(*len) - accepted as u64,
                    "inject: refused bytes are counted, never dropped silently"
                );
            }
            Op::Take { max } => {
                let got = dev.device.qw_mut().take_capture(usize::from(*max));
                books.taken += got.len() as u64;
                out.captured.extend_from_slice(&got);
            }
            Op::RxPass | Op::TxPass | Op::BothPasses => {
                let which: &[u8] = match op {
                    Op::RxPass => &[RX],
                    Op::TxPass => &[TX],
                    _ => &[RX, TX],
                };
                for &qi in which {
                    if out.passes.len() >= MAX_PASSES {
                        break;
                    }
                    let q = &mut queues[usize::from(qi)];
                    let r = pass(&mut dev, q, qi, &mem, &books, tx_capacity);
                    out.passes.push((qi, r.map_err(|e| e.to_string())));
                }
            }
        }
    }
    out.stats = dev.stats();
    out
}

/// One pass over one queue, with every invariant checked afterwards.
///
/// After a queue error the transport stops serving the queue until the
/// driver resets it; the harness goes on calling the device anyway (the
/// device must stay robust, and every invariant below still holds).
fn pass(
    dev: &mut Engine<QwDevice>,
    q: &mut QueueModel,
    qi: u8,
    mem: &GuestMemoryMmap,
    books: &Books,
    tx_capacity: usize,
) -> Result<Pass, QueueError> {
    let before = Before::take(dev, q, mem);
    let result = if qi == RX {
        dev.process_rx(&mut q.queue, mem)
    } else {
        dev.process_tx(&mut q.queue, mem)
    };
    let after = After {
        name: if qi == RX { "rx" } else { "tx" },
        qi,
        stats: dev.stats(),
        advanced: (Wrapping(q.queue.next_used()) - before.used).0,
        taken: (Wrapping(q.queue.next_avail()) - before.avail).0,
    };
    let tx_pass_bytes = check_books(dev, &before, &after, &result, books, tx_capacity);
    let name = after.name;
    assert!(after.advanced <= q.rings.size, "{name}: more completions than the queue size");
    let used = check_used_ring(q, mem, &before, &after);
    check_counters(&before, &after, &used, tx_pass_bytes);
    match &result {
        Ok(p) => check_success(q, mem, &before, &after, &used, p),
        Err(e) => check_queue_error(q, mem, &before, &after, e),
    }
    result
}

/// The queue and the device just before a pass.
struct Before {
    used: Wrapping<u16>,
    avail: Wrapping<u16>,
    /// The available index is more than the queue size ahead.
    ring_broken: bool,
    stats: Stats,
    captured: usize,
    /// The available entries as they are before the pass (for the
    /// broken-ring check: add_used may overwrite them when the guest made
    /// the rings overlap, and rx data may overwrite them while the device
    /// walks).
    heads: Vec<u16>,
}

impl Before {
    fn take(dev: &Engine<QwDevice>, q: &QueueModel, mem: &GuestMemoryMmap) -> Self {
        let size = q.rings.size;
        let avail = Wrapping(q.queue.next_avail());
        // The device reads the available index once, before it writes anything.
        let ahead = (Wrapping(q.avail_idx(mem)) - avail).0;
        let heads = (0..ahead.min(size))
            .map(|k| q.avail_head(mem, (avail + Wrapping(k)).0))
            .collect();
        Self {
            used: Wrapping(q.queue.next_used()),
            avail,
            ring_broken: ahead > size,
            stats: dev.stats(),
            captured: dev.device.qw().tx_captured(),
            heads,
        }
    }
}

/// What a pass did, as the harness sees it right after.
struct After {
    name: &'static str,
    qi: u8,
    stats: Stats,
    /// Used entries added.
    advanced: u16,
    /// Available entries taken.
    taken: u16,
}

/// The used entries a pass added, summed up.
struct Used {
    /// Sum of their lengths.
    sum: u64,
    /// Entries with a length, and without.
    with_data: u64,
    empty: u64,
}

/// Conservation, whatever the result: no byte lost or invented; and the
/// capture within its capacity. Returns the bytes the pass added to the
/// capture.
fn check_books(
    dev: &Engine<QwDevice>,
    before: &Before,
    after: &After,
    result: &Result<Pass, QueueError>,
    books: &Books,
    tx_capacity: usize,
) -> u64 {
    let (name, qi, s) = (after.name, after.qi, &after.stats);
    let captured_before = before.captured;
    let stats_before = &before.stats;
    assert_eq!(
        s.injected_bytes, books.injected,
        "{name}: injected_bytes matches what the host injected"
    );
    assert_eq!(
        s.rx_bytes + dev.device.qw().rx_pending() as u64,
        s.injected_bytes,
        "{name} pass ({result:?}): rx_bytes + rx_pending == injected_bytes \
         (a byte left the FIFO without being reported delivered, or was invented)"
    );
    assert_eq!(
        s.tx_bytes,
        books.taken + dev.device.qw().tx_captured() as u64,
        "{name} pass ({result:?}): tx_bytes == bytes taken + bytes still captured"
    );
    let tx_pass_bytes = (dev.device.qw().tx_captured() - captured_before.min(dev.device.qw().tx_captured())) as u64;
    // Capacity. The spec lets an *empty* capture take one buffer larger than
    // the whole capture (at most MAX_CHAIN_BYTES), so that a big buffer
    // cannot wedge the queue; otherwise the capture stays within capacity.
    assert!(
        dev.device.qw().tx_captured() <= tx_capacity
            || dev.device.qw().tx_captured() <= captured_before
            || (captured_before == 0
                && qi == TX
                && s.tx_buffers - stats_before.tx_buffers == 1
                && dev.device.qw().tx_captured() as u64 <= MAX_CHAIN_BYTES),
        "{name}: capture holds {} bytes (was {captured_before}), more than its capacity \
         {tx_capacity}, and not as the single oversized buffer an empty capture may take",
        dev.device.qw().tx_captured()
    );
    tx_pass_bytes
}

/// The used ring: the device's next_used is published, and the elements
/// it wrote are well formed.
fn check_used_ring(
    q: &QueueModel,
    mem: &GuestMemoryMmap,
    before: &Before,
    after: &After,
) -> Used {
    let (name, qi, size, advanced) = (after.name, after.qi, q.rings.size, after.advanced);
    if advanced > 0 {
        let used_idx: u16 = u16::from_le(mem.read_obj(GuestAddress(q.rings.used + 2)).unwrap());
        assert_eq!(
            used_idx,
            q.queue.next_used(),
            "{name}: used.idx in guest memory is the device's next_used"
        );
    }
    let (mut sum, mut with_data, mut empty) = (0u64, 0u64, 0u64);
    for k in 0..advanced {
        let slot = u64::from((before.used + Wrapping(k)).0 % size);
        let at = q.rings.used + 4 + 8 * slot;
        let id = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
        let len = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
        assert!(id < u32::from(size), "{name}: used element id {id} >= queue size {size}");
        assert!(u64::from(len) <= MAX_CHAIN_BYTES, "{name}: used len {len} too large");
        if qi == TX {
            assert_eq!(len, 0, "{name}: tx buffers complete with used length 0");
        }
        sum += u64::from(len);
        if len > 0 {
            with_data += 1;
        } else {
            empty += 1;
        }
    }
    Used { sum, with_data, empty }
}

/// The used elements add up to the counters.
fn check_counters(before: &Before, after: &After, used: &Used, tx_pass_bytes: u64) {
    let (s, stats_before, advanced) = (&after.stats, &before.stats, after.advanced);
    let (sum, with_data, empty) = (used.sum, used.with_data, used.empty);
    let bad = s.bad_chains - stats_before.bad_chains;
    if after.qi == RX {
        assert_eq!(sum, s.rx_bytes - stats_before.rx_bytes, "rx: used lengths add up to rx_bytes");
        assert_eq!(s.rx_buffers - stats_before.rx_buffers, with_data, "rx: rx_buffers counts filled buffers");
        assert_eq!(bad, empty, "rx: every length-0 completion is a refused chain, and vice versa");
        assert_eq!(s.tx_bytes, stats_before.tx_bytes, "rx pass moved tx bytes");
    } else {
        let accepted = s.tx_buffers - stats_before.tx_buffers;
        assert_eq!(accepted + bad, u64::from(advanced), "tx: each completion is accepted or refused");
        assert_eq!(s.tx_bytes - stats_before.tx_bytes, tx_pass_bytes, "tx: tx_bytes grew by the capture's growth");
        assert_eq!(accepted > 0, tx_pass_bytes > 0, "tx: accepted buffers carry bytes");
        assert_eq!(s.rx_bytes, stats_before.rx_bytes, "tx pass moved rx bytes");
    }
}

/// A pass that succeeded: the ring was sane, and it completed every chain
/// it took.
fn check_success(
    q: &mut QueueModel,
    mem: &GuestMemoryMmap,
    before: &Before,
    after: &After,
    used: &Used,
    p: &Pass,
) {
    let (name, s, advanced, taken) = (after.name, &after.stats, after.advanced, after.taken);
    assert!(
        !before.ring_broken,
        "{name}: the available index is more than the queue size ahead, \
         but the pass succeeded ({p:?})"
    );
    assert_eq!(s.queue_errors, before.stats.queue_errors, "{name}: queue error counted on success");
    assert_eq!(
        u32::from(advanced),
        p.completed,
        "{name}: next_used advanced by exactly the completions reported"
    );
    assert_eq!(taken, advanced, "{name}: every chain taken off the available ring was completed");
    // The pass reports the used lengths: the bytes written on rx,
    // none on tx.
    let bytes = if after.qi == RX { used.sum } else { 0 };
    assert_eq!(p.bytes, bytes, "{name}: the pass reports the used lengths");
    // The transport asks this after a pass with completions; it must
    // not fail on a ring inside memory, whatever the guest wrote.
    if p.completed > 0 {
        q.queue
            .needs_notification(mem)
            .expect("needs_notification on a ring inside memory");
    }
}

/// A pass that found the queue broken: counted once, and only a broken
/// ring (spec) explains it.
fn check_queue_error(
    q: &QueueModel,
    mem: &GuestMemoryMmap,
    before: &Before,
    after: &After,
    e: &QueueError,
) {
    let (name, s, size) = (after.name, &after.stats, q.rings.size);
    let (advanced, taken, stats_before) = (after.advanced, after.taken, &before.stats);
    assert_eq!(
        s.queue_errors,
        stats_before.queue_errors + 1,
        "{name}: a queue error is counted once"
    );
    // Spec: a broken ring is an available index more than the queue
    // size ahead, or an available entry naming a head outside the
    // table. Completions before the fault stay; the bad entry gets
    // no byte (it is the last entry the device took, and it is not
    // on the used ring).
    if before.ring_broken {
        assert_eq!(advanced, 0, "{name}: completions although the available index was broken");
        return;
    }
    assert!(taken >= 1, "{name}: queue error `{e}` without a broken available index or entry");
    let at = (before.avail + Wrapping(taken - 1)).0;
    let head_before = before.heads.get(usize::from(taken - 1)).copied();
    let after_head = q.avail_head(mem, at);
    // What the device read lies between those two snapshots; if
    // the guest let the device's writes land on the available
    // ring, neither snapshot need show it.
    let clobbered = (after.qi == RX && s.rx_bytes > stats_before.rx_bytes)
        || (advanced > 0 && q.rings.avail_overlaps_used());
    assert!(
        head_before.is_some_and(|h| h >= size) || after_head >= size || clobbered,
        "{name}: queue error `{e}` although the available index was not more than \
         the queue size ahead and the last entry taken names head {head_before:?}/{after_head} < {size}"
    );
    assert_eq!(
        taken,
        advanced + 1,
        "{name}: every entry before the bad one was completed, and only those"
    );
}
