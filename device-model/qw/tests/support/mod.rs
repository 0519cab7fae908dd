//! Test support for the protocol tests: the `vdevlab-device` binary in a
//! private temporary folder ([`Device`]), its control plane ([`Ctl`]), and an
//! in-process vhost-user frontend playing the VMM and the guest driver
//! ([`Vmm`]): guest memory in a memfd shared with the backend, split
//! virtqueues laid out in it, and helpers to post chains (well-formed or
//! not), kick, and watch the used rings and the call eventfds.
//!
//! Everything here fails loudly (panics with the backend's log) rather than
//! returning errors: it is test code.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vdevlab_device::control::{ControlClient, Response};
use vdevlab_device::device::Stats;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size: one region at guest physical address 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Queue size used for both queues (the lab's).
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Number of queues the device has.
pub const NUM_QUEUES: usize = 2;
/// First guest address free for data buffers (the rings live below).
pub const DATA_BASE: u64 = 0x10000;

/// `VRING_AVAIL_F_NO_INTERRUPT`.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// How long to wait for something that must happen.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait before concluding that something did not happen.
pub const SETTLE: Duration = Duration::from_millis(100);

fn ring_base(q: usize) -> u64 {
    0x1000 + 0x4000 * q as u64
}
/// Guest address of queue `q`'s descriptor table (16 * 256 bytes).
pub fn desc_table_addr(q: usize) -> u64 {
    ring_base(q)
}
/// Guest address of queue `q`'s available ring (4 + 2 * 256 + 2 bytes).
pub fn avail_ring_addr(q: usize) -> u64 {
    ring_base(q) + 0x1000
}
/// Guest address of queue `q`'s used ring (4 + 8 * 256 + 2 bytes).
pub fn used_ring_addr(q: usize) -> u64 {
    ring_base(q) + 0x2000
}

/// Poll `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A `vdevlab-device` process with its own temporary folder for the
/// vhost-user socket, the control socket and its log. Killed on drop.
pub struct Device {
    child: Child,
    dir: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    log: PathBuf,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("dir", &self.dir).finish()
    }
}

impl Device {
    /// Start the binary with `--socket`, `--control` and `extra` arguments,
    /// and wait until both sockets are there.
    pub fn spawn(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vdevlab-proto-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir); // stale, from a reused pid
        std::fs::create_dir_all(&dir).expect("creating the test's temporary folder");
        let socket = dir.join("vu.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join("device.log");
        let log_file = File::create(&log).expect("creating the device log");
        let child = Command::new(env!("CARGO_BIN_EXE_vdevlab-device"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("starting vdevlab-device");
        let mut dev = Device {
            child,
            dir,
            socket,
            control,
            log,
        };
        let up = wait_until(Duration::from_secs(5), || {
            dev.socket.exists() && dev.control.exists() || !dev.is_running()
        });
        assert!(
            up && dev.is_running(),
            "vdevlab-device did not come up; its log:\n{}",
            dev.log()
        );
        dev
    }

    /// A new control-plane client.
    pub fn control(&self) -> Ctl {
        Ctl(ControlClient::connect(&self.control).expect("connecting to the control socket"))
    }

    /// Connect a new frontend (VMM) and bring both queues up.
    pub fn connect(&self, opts: Options) -> Vmm {
        Vmm::connect(&self.socket, opts, || self.log())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Identifies the file now at the vhost-user socket path (inode and
    /// change time), or `None` if there is none.
    pub fn socket_id(&self) -> Option<(u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&self.socket).ok()?;
        Some((m.ino(), m.ctime(), m.ctime_nsec()))
    }

    /// Wait until the backend listens on a new vhost-user socket (a file
    /// other than `old`): it has finished with the previous connection and
    /// its worker threads have exited.
    pub fn wait_relisten(&self, old: Option<(u64, i64, i64)>) -> bool {
        wait_until(TIMEOUT, || {
            let now = self.socket_id();
            now.is_some() && now != old
        })
    }

    /// The backend's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail = &log[log.len().saturating_sub(8192)..];
            eprintln!(
                "---- vdevlab-device log ({}) ----\n{tail}",
                self.dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A control-plane client with test-friendly helpers (they panic on error).
#[derive(Debug)]
pub struct Ctl(pub ControlClient);

impl Ctl {
    /// Send a raw JSON request line and return the reply.
    pub fn raw(&mut self, json: &str) -> vdevlab_device::control::Response {
        let req = serde_json::from_str(json).expect("a valid control request");
        self.0.request(&req).expect("control: request")
    }

    /// Inject bytes; returns how many the device accepted.
    pub fn inject(&mut self, data: &[u8]) -> usize {
        self.0.inject(data).expect("control: inject")
    }

    /// Take up to `max` captured bytes (all with `None`).
    pub fn capture(&mut self, max: Option<usize>) -> Vec<u8> {
        self.0.capture(max).expect("control: capture")
    }

    /// The full stats reply (counters and levels).
    pub fn stats_reply(&mut self) -> Response {
        self.0.stats().expect("control: stats")
    }

    /// The counters.
    pub fn stats(&mut self) -> Stats {
        self.stats_reply().stats.expect("stats reply has counters")
    }

    /// Bytes waiting in the receive FIFO.
    pub fn rx_pending(&mut self) -> usize {
        self.stats_reply().rx_pending.expect("reply has rx_pending")
    }

    /// Bytes waiting in the transmit capture.
    pub fn tx_captured(&mut self) -> usize {
        self.stats_reply()
            .tx_captured
            .expect("reply has tx_captured")
    }

    /// Poll the counters until `cond` holds (or [`TIMEOUT`]); returns the
    /// last counters seen. Note: every control request also makes the
    /// backend run a pass over both queues.
    pub fn wait_stats(&mut self, mut cond: impl FnMut(&Stats) -> bool) -> Stats {
        let mut last = self.stats();
        wait_until(TIMEOUT, || {
            last = self.stats();
            cond(&last)
        });
        last
    }
}

/// What the frontend negotiates.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            event_idx: false,
            indirect: true,
        }
    }
}

/// Where a descriptor's `next` points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The following descriptor of the same chain (or the table), or the
    /// end of the chain for the last one.
    Auto,
    /// End of chain (no `NEXT` flag), even if more descriptors follow.
    End,
    /// `NEXT` to the descriptor at this position of the same chain/table.
    Slot(u16),
    /// `NEXT` to this raw index, whatever it is (may be out of the table).
    Raw(u16),
}

/// One descriptor to write.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Flags other than `NEXT` (which [`Link`] decides).
    pub flags: u16,
    /// Where `next` points.
    pub link: Link,
}

impl Desc {
    /// A device-writable buffer.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
            link: Link::Auto,
        }
    }

    /// A device-readable buffer.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            link: Link::Auto,
        }
    }

    /// An indirect descriptor: a table of `len / 16` descriptors at `addr`.
    pub fn indirect(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT as u16,
            link: Link::Auto,
        }
    }

    /// The same descriptor with `next` pointing as `link` says.
    pub fn link(mut self, link: Link) -> Self {
        self.link = link;
        self
    }

    /// The same descriptor with `flags` added.
    pub fn with_flags(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }
}

/// The 16-byte split-ring encoding of `descs`, where slot `i` of the chain
/// has index `base + i`.
fn encode(descs: &[Desc], base: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(descs.len() * 16);
    for (i, d) in descs.iter().enumerate() {
        let (flags, next) = match d.link {
            Link::Auto if i + 1 < descs.len() => {
                (d.flags | VRING_DESC_F_NEXT as u16, base + i as u16 + 1)
            }
            Link::Auto | Link::End => (d.flags & !(VRING_DESC_F_NEXT as u16), 0),
            Link::Slot(s) => (d.flags | VRING_DESC_F_NEXT as u16, base + s),
            Link::Raw(r) => (d.flags | VRING_DESC_F_NEXT as u16, r),
        };
        out.extend_from_slice(&d.addr.to_le_bytes());
        out.extend_from_slice(&d.len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out
}

/// The driver's view of one split virtqueue.
pub struct Ring {
    /// Kick eventfd (driver to device).
    pub kick: EventFd,
    /// Call eventfd (device to driver: used-buffer interrupt).
    pub call: EventFd,
    /// Error eventfd (device to driver).
    pub err: EventFd,
    next_desc: u16,
    avail_idx: u16,
    calls: u64,
    errs: u64,
}

impl Ring {
    fn new() -> Self {
        let fd = || EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd");
        Self {
            kick: fd(),
            call: fd(),
            err: fd(),
            next_desc: 0,
            avail_idx: 0,
            calls: 0,
            errs: 0,
        }
    }
}

/// Read and add up an eventfd's count (0 if nothing was signalled).
fn drain_eventfd(fd: &EventFd) -> u64 {
    match fd.read() {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("reading an eventfd: {e}"),
    }
}

/// A vhost-user frontend: the VMM and, through guest memory, the driver.
pub struct Vmm {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest memory (a memfd shared with the backend).
    pub mem: GuestMemoryMmap,
    host_base: u64,
    rings: Vec<Ring>,
    /// Virtio features acknowledged.
    pub features: u64,
    /// Virtio features the backend offered.
    pub offered_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol_features: VhostUserProtocolFeatures,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

/// Guest memory backed by a fresh memfd, so the backend can map it too.
fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create takes a NUL-terminated name (a C string literal)
    // and flags; it has no other preconditions. The result is checked below.
    let fd = unsafe { libc::memfd_create(c"vdevlab-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a freshly created, valid file descriptor that nothing
    // else owns; the File takes sole ownership of it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE)
        .expect("sizing the guest memory memfd");
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("mapping guest memory")
}

impl Vmm {
    /// Connect to `socket` (retrying while the backend is not listening, or
    /// is still closing its previous connection), negotiate and bring both
    /// queues up. `log` gives the backend's log for failure messages.
    pub fn connect(socket: &Path, opts: Options, log: impl Fn() -> String) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (fe, offered) = loop {
            let attempt = UnixStream::connect(socket)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let fe = Frontend::from_stream(s, NUM_QUEUES as u64);
                    fe.set_owner().map_err(|e| e.to_string())?;
                    let offered = fe.get_features().map_err(|e| e.to_string())?;
                    Ok((fe, offered))
                });
            match attempt {
                Ok(ok) => break ok,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!(
                    "could not connect to {}: {e}; backend log:\n{}",
                    socket.display(),
                    log()
                ),
            }
        };
        let mut fe = fe;
        let mut features =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if opts.event_idx {
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        assert_eq!(
            offered & features,
            features,
            "the backend offers {offered:#x}, which lacks some of {features:#x}"
        );
        let offered_protocol_features = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let ack = offered_protocol_features
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        fe.set_protocol_features(ack)
            .expect("SET_PROTOCOL_FEATURES");
        if ack.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then waits for the backend's answer, so the
            // set-up below is done when these calls return.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
        assert_eq!(queues, NUM_QUEUES as u64, "queue count");
        fe.set_features(features).expect("SET_FEATURES");

        let mem = guest_memory();
        let region = mem.find_region(GuestAddress(0)).expect("the guest region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)
            .expect("describing the guest region");
        let host_base = info.userspace_addr;
        fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");

        let mut vmm = Vmm {
            fe,
            mem,
            host_base,
            rings: (0..NUM_QUEUES).map(|_| Ring::new()).collect(),
            features,
            offered_features: offered,
            offered_protocol_features,
        };
        for q in 0..NUM_QUEUES {
            vmm.start_ring(q);
        }
        vmm
    }

    fn start_ring(&mut self, q: usize) {
        let config = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_base + desc_table_addr(q),
            used_ring_addr: self.host_base + used_ring_addr(q),
            avail_ring_addr: self.host_base + avail_ring_addr(q),
            log_addr: None,
        };
        let ring = &self.rings[q];
        self.fe.set_vring_num(q, QUEUE_SIZE).expect("SET_VRING_NUM");
        self.fe.set_vring_addr(q, &config).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        self.fe
            .set_vring_call(q, &ring.call)
            .expect("SET_VRING_CALL");
        self.fe.set_vring_err(q, &ring.err).expect("SET_VRING_ERR");
        self.fe
            .set_vring_kick(q, &ring.kick)
            .expect("SET_VRING_KICK");
        self.fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }

    /// Reset queue `q` as a VMM does when the driver resets the device:
    /// stop it (GET_VRING_BASE), clear its rings in guest memory, and start
    /// it again from index 0. Returns the backend's next available index.
    pub fn reset_queue(&mut self, q: usize) -> u32 {
        let base = self.fe.get_vring_base(q).expect("GET_VRING_BASE");
        let zeros = vec![0u8; 0x3000];
        self.write(ring_base(q), &zeros);
        let ring = &mut self.rings[q];
        ring.next_desc = 0;
        ring.avail_idx = 0;
        ring.calls += drain_eventfd(&ring.call);
        self.start_ring(q);
        base
    }

    /// Stop both rings as a VMM does before it disconnects in an orderly
    /// way (GET_VRING_BASE); returns each queue's next available index.
    pub fn stop_rings(&mut self) -> Vec<u32> {
        (0..NUM_QUEUES)
            .map(|q| self.fe.get_vring_base(q).expect("GET_VRING_BASE"))
            .collect()
    }

    /// Write `data` to guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("writing guest memory");
    }

    /// Read `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_slice(&mut buf, GuestAddress(addr))
            .expect("reading guest memory");
        buf
    }

    fn store_u16(&self, addr: u64, val: u16) {
        self.mem
            .store(u16::to_le(val), GuestAddress(addr), Ordering::Release)
            .expect("storing to guest memory");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("loading from guest memory"),
        )
    }

    /// Reserve `n` consecutive descriptor slots of queue `q`.
    fn alloc(&mut self, q: usize, n: usize) -> u16 {
        assert!(n <= QUEUE_SIZE as usize, "a chain of {n} descriptors");
        let ring = &mut self.rings[q];
        if ring.next_desc as usize + n > QUEUE_SIZE as usize {
            ring.next_desc = 0;
        }
        let base = ring.next_desc;
        ring.next_desc += n as u16;
        base
    }

    /// Write `descs` into queue `q`'s descriptor table (consecutive slots)
    /// without making them available; returns the first slot's index.
    pub fn write_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let base = self.alloc(q, descs.len());
        self.write(
            desc_table_addr(q) + 16 * u64::from(base),
            &encode(descs, base),
        );
        base
    }

    /// Write an indirect descriptor table at `addr` (slot `i` is index `i`).
    pub fn write_indirect_table(&self, addr: u64, descs: &[Desc]) {
        self.write(addr, &encode(descs, 0));
    }

    /// Put `head` in queue `q`'s available ring and publish the new index.
    pub fn push_avail(&mut self, q: usize, head: u16) {
        let slot = self.rings[q].avail_idx % QUEUE_SIZE;
        self.store_u16(avail_ring_addr(q) + 4 + 2 * u64::from(slot), head);
        self.rings[q].avail_idx = self.rings[q].avail_idx.wrapping_add(1);
        self.store_u16(avail_ring_addr(q) + 2, self.rings[q].avail_idx);
    }

    /// Write `descs` as one chain and make it available; returns its head.
    pub fn post_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let head = self.write_chain(q, descs);
        self.push_avail(q, head);
        head
    }

    /// Post a receive chain of device-writable buffers `(addr, len)`.
    pub fn post_rx(&mut self, bufs: &[(u64, u32)]) -> u16 {
        let descs: Vec<Desc> = bufs.iter().map(|&(a, l)| Desc::writable(a, l)).collect();
        self.post_chain(RX, &descs)
    }

    /// Post a transmit chain of one device-readable buffer holding `data`.
    pub fn post_tx(&mut self, addr: u64, data: &[u8]) -> u16 {
        self.post_tx_chain(&[(addr, data)])
    }

    /// Post a transmit chain: each `(addr, bytes)` written to guest memory
    /// and described by one device-readable descriptor.
    pub fn post_tx_chain(&mut self, bufs: &[(u64, &[u8])]) -> u16 {
        let descs: Vec<Desc> = bufs
            .iter()
            .map(|&(a, d)| {
                self.write(a, d);
                Desc::readable(a, d.len() as u32)
            })
            .collect();
        self.post_chain(TX, &descs)
    }

    /// The driver's available index for queue `q`.
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.rings[q].avail_idx
    }

    /// Publish `idx` as queue `q`'s available index, whatever it is (the
    /// driver's shadow index follows).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.rings[q].avail_idx = idx;
        self.store_u16(avail_ring_addr(q) + 2, idx);
    }

    /// Set the available ring's flags (e.g. [`AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, q: usize, flags: u16) {
        self.store_u16(avail_ring_addr(q), flags);
    }

    /// Set `used_event` (EVENT_IDX): interrupt once the used index passes it.
    pub fn set_used_event(&self, q: usize, idx: u16) {
        self.store_u16(avail_ring_addr(q) + 4 + 2 * u64::from(QUEUE_SIZE), idx);
    }

    /// `avail_event` as published by the device (EVENT_IDX).
    pub fn avail_event(&self, q: usize) -> u16 {
        self.load_u16(used_ring_addr(q) + 4 + 8 * u64::from(QUEUE_SIZE))
    }

    /// The used ring's flags as published by the device.
    pub fn used_flags(&self, q: usize) -> u16 {
        self.load_u16(used_ring_addr(q))
    }

    /// Notify the device that queue `q` has new buffers.
    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).expect("kicking");
    }

    /// The device's used index for queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.load_u16(used_ring_addr(q) + 2)
    }

    /// Wait (up to [`TIMEOUT`]) until queue `q`'s used index reaches `idx`.
    pub fn wait_used(&self, q: usize, idx: u16) -> bool {
        wait_until(TIMEOUT, || self.used_idx(q).wrapping_sub(idx) < 0x8000)
    }

    /// Used element `i` of queue `q`: (descriptor head id, length).
    pub fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let addr = used_ring_addr(q) + 4 + 8 * u64::from(i % QUEUE_SIZE);
        let b = self.read(addr, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Used elements `from..to` of queue `q`.
    pub fn used_elems(&self, q: usize, from: u16, to: u16) -> Vec<(u32, u32)> {
        (from..to).map(|i| self.used_elem(q, i)).collect()
    }

    /// All used elements of queue `q` so far (up to the used index).
    pub fn all_used(&self, q: usize) -> Vec<(u32, u32)> {
        self.used_elems(q, 0, self.used_idx(q))
    }

    /// Used-buffer interrupts (call eventfd signals) seen on queue `q`
    /// since connecting.
    pub fn calls(&mut self, q: usize) -> u64 {
        let ring = &mut self.rings[q];
        ring.calls += drain_eventfd(&ring.call);
        ring.calls
    }

    /// Error eventfd signals seen on queue `q` since connecting.
    pub fn errs(&mut self, q: usize) -> u64 {
        let ring = &mut self.rings[q];
        ring.errs += drain_eventfd(&ring.err);
        ring.errs
    }
}
