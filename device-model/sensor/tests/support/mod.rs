//! Test support for the sensor's protocol tests: the `vdevlab-sensor`
//! binary in a private temporary folder ([`Device`]), its control plane,
//! and an in-process vhost-user frontend playing the VMM and the driver
//! ([`Vmm`]): guest memory in a memfd shared with the backend, three split
//! virtqueues laid out in it, real eventfds for kicks and calls, and
//! helpers to post chains (well-formed or not) and read the used rings.
//!
//! Everything here panics with the backend's log rather than returning
//! errors: it is test code.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vdevlab_device_core::control::ControlClient;
use vdevlab_device_core::Fields;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory size: one region at guest physical address 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Queue size of every queue (the lab's).
pub const QUEUE_SIZE: u16 = 64;
/// Queue indices.
pub const SAMPLES: usize = 0;
/// See [`SAMPLES`].
pub const EVENTS: usize = 1;
/// See [`SAMPLES`].
pub const CTRL: usize = 2;
const NUM_QUEUES: usize = 3;
/// First guest address free for buffers (the rings live below).
pub const DATA_BASE: u64 = 0x10000;
/// A [`Desc::next`] that points at the descriptor's own slot (a loop).
pub const SELF: u16 = u16::MAX;
/// How long to wait for something that must happen.
pub const TIMEOUT: Duration = Duration::from_secs(3);

fn ring_base(q: usize) -> u64 {
    0x1000 + 0x3000 * q as u64
}
fn desc_table_addr(q: usize) -> u64 {
    ring_base(q)
}
fn avail_ring_addr(q: usize) -> u64 {
    ring_base(q) + 0x1000
}
fn used_ring_addr(q: usize) -> u64 {
    ring_base(q) + 0x2000
}

/// Poll `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// The backend process.
pub struct Device {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

impl Device {
    /// Start `vdevlab-sensor` with `extra` arguments and wait for its sockets.
    pub fn spawn(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "vdevlab-sensor-proto-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's folder");
        let socket = dir.join("vu.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join("device.log");
        let child = Command::new(env!("CARGO_BIN_EXE_vdevlab-sensor"))
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(File::create(&log).expect("the log file")))
            .spawn()
            .expect("starting vdevlab-sensor");
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
        assert!(up && dev.is_running(), "no sockets; log:\n{}", dev.log());
        dev
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The backend's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A control-plane client.
    pub fn control(&self) -> Ctl {
        Ctl(ControlClient::connect(&self.control).expect("connecting to the control socket"))
    }

    /// Connect a frontend and bring the three queues up.
    pub fn connect(&self) -> Vmm {
        Vmm::connect(self)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The control plane.
pub struct Ctl(pub ControlClient);

impl Ctl {
    /// A request that must succeed: its reply's fields.
    pub fn ok(&mut self, req: Value) -> Fields {
        self.0
            .checked(&req)
            .unwrap_or_else(|e| panic!("control {req}: {e}"))
    }

    /// A request's error message (it must fail).
    pub fn err(&mut self, req: Value) -> String {
        match self.0.checked(&req) {
            Ok(f) => panic!("control {req} succeeded: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// The counters (the core's and the sensor's).
    pub fn stats(&mut self) -> Fields {
        self.0.stats_fields().expect("control: stats")
    }

    /// One counter.
    pub fn counter(&mut self, name: &str) -> u64 {
        self.stats()
            .get(name)
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// The sensor's state (`{"op":"sensor"}`).
    pub fn sensor(&mut self) -> Fields {
        self.ok(json!({"op": "sensor"}))
    }
}

/// One descriptor: address, length, writable, and where NEXT points
/// (`None`: the next slot of the chain, or the end for the last one).
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// A raw next index (malformed chains).
    pub next: Option<u16>,
}

impl Desc {
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
            next: None,
        }
    }
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
            next: None,
        }
    }
    /// NEXT to this raw index, whatever it is.
    pub fn next(mut self, idx: u16) -> Self {
        self.next = Some(idx);
        self
    }
}

struct Ring {
    kick: EventFd,
    call: EventFd,
    err: EventFd,
    next_desc: u16,
    avail_idx: u16,
}

/// The frontend: the VMM and, through guest memory, the driver.
pub struct Vmm {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    host_base: u64,
    rings: Vec<Ring>,
    next_buf: u64,
}

fn guest_memory() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name and flags; the result
    // is checked below.
    let fd = unsafe { libc::memfd_create(c"vdevlab-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE).expect("sizing the memfd");
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        MEM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("mapping guest memory")
}

impl Vmm {
    fn connect(dev: &Device) -> Self {
        let deadline = Instant::now() + Duration::from_secs(5);
        let fe = loop {
            match UnixStream::connect(&dev.socket) {
                Ok(s) => break Frontend::from_stream(s, NUM_QUEUES as u64),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("connecting: {e}; log:\n{}", dev.log()),
            }
        };
        let mut fe = fe;
        fe.set_owner().expect("SET_OWNER");
        let offered = fe.get_features().expect("GET_FEATURES");
        let features =
            (1u64 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        assert_eq!(offered & features, features, "offered {offered:#x}");
        let pf = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let ack = pf
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        fe.set_protocol_features(ack)
            .expect("SET_PROTOCOL_FEATURES");
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(fe.get_queue_num().expect("GET_QUEUE_NUM"), 3);
        fe.set_features(features).expect("SET_FEATURES");
        let mem = guest_memory();
        let region = mem.find_region(GuestAddress(0)).expect("the region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        let host_base = info.userspace_addr;
        fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
        let fd = || EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd");
        let mut vmm = Vmm {
            fe,
            mem,
            host_base,
            rings: (0..NUM_QUEUES)
                .map(|_| Ring {
                    kick: fd(),
                    call: fd(),
                    err: fd(),
                    next_desc: 0,
                    avail_idx: 0,
                })
                .collect(),
            next_buf: DATA_BASE,
        };
        for q in 0..NUM_QUEUES {
            vmm.start_ring(q);
        }
        vmm
    }

    fn start_ring(&mut self, q: usize) {
        let cfg = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: self.host_base + desc_table_addr(q),
            used_ring_addr: self.host_base + used_ring_addr(q),
            avail_ring_addr: self.host_base + avail_ring_addr(q),
            log_addr: None,
        };
        let r = &self.rings[q];
        self.fe.set_vring_num(q, QUEUE_SIZE).expect("SET_VRING_NUM");
        self.fe.set_vring_addr(q, &cfg).expect("SET_VRING_ADDR");
        self.fe.set_vring_base(q, 0).expect("SET_VRING_BASE");
        self.fe.set_vring_call(q, &r.call).expect("SET_VRING_CALL");
        self.fe.set_vring_err(q, &r.err).expect("SET_VRING_ERR");
        self.fe.set_vring_kick(q, &r.kick).expect("SET_VRING_KICK");
        self.fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }

    /// A device reset as the VMM does it: stop every queue
    /// (GET_VRING_BASE), clear the rings, start them again.
    pub fn reset_device(&mut self) {
        for q in 0..NUM_QUEUES {
            self.fe.get_vring_base(q).expect("GET_VRING_BASE");
        }
        for q in 0..NUM_QUEUES {
            self.write(ring_base(q), &vec![0u8; 0x3000]);
            self.rings[q].next_desc = 0;
            self.rings[q].avail_idx = 0;
            self.start_ring(q);
        }
    }

    /// A fresh buffer of `len` bytes in guest memory (never reused).
    pub fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(64);
        assert!(self.next_buf < MEM_SIZE, "test ran out of guest memory");
        a
    }

    /// Write guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("writing guest memory");
    }

    /// Read guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("reading guest memory");
        b
    }

    fn store_u16(&self, addr: u64, v: u16) {
        self.mem
            .store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .expect("store");
    }

    fn load_u16(&self, addr: u64) -> u16 {
        u16::from_le(
            self.mem
                .load(GuestAddress(addr), Ordering::Acquire)
                .expect("load"),
        )
    }

    /// Write `descs` as one chain in consecutive slots and make it
    /// available (no kick); returns its head.
    pub fn post(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let ring = &mut self.rings[q];
        if ring.next_desc as usize + descs.len() > QUEUE_SIZE as usize {
            ring.next_desc = 0;
        }
        let base = ring.next_desc;
        ring.next_desc += descs.len() as u16;
        let mut table = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = match d.next {
                Some(SELF) => {
                    flags |= VRING_DESC_F_NEXT as u16;
                    base + i as u16
                }
                Some(n) => {
                    flags |= VRING_DESC_F_NEXT as u16;
                    n
                }
                None if i + 1 < descs.len() => {
                    flags |= VRING_DESC_F_NEXT as u16;
                    base + i as u16 + 1
                }
                None => 0,
            };
            table.extend_from_slice(&d.addr.to_le_bytes());
            table.extend_from_slice(&d.len.to_le_bytes());
            table.extend_from_slice(&flags.to_le_bytes());
            table.extend_from_slice(&next.to_le_bytes());
        }
        self.write(desc_table_addr(q) + 16 * u64::from(base), &table);
        let slot = self.rings[q].avail_idx % QUEUE_SIZE;
        self.store_u16(avail_ring_addr(q) + 4 + 2 * u64::from(slot), base);
        self.rings[q].avail_idx = self.rings[q].avail_idx.wrapping_add(1);
        self.store_u16(avail_ring_addr(q) + 2, self.rings[q].avail_idx);
        base
    }

    /// Publish `idx` as queue `q`'s available index (a broken ring, say).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.rings[q].avail_idx = idx;
        self.store_u16(avail_ring_addr(q) + 2, idx);
    }

    /// Kick queue `q`.
    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).expect("kick");
    }

    /// Queue `q`'s used index.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.load_u16(used_ring_addr(q) + 2)
    }

    /// Used element `i` of queue `q`: (head, length).
    pub fn used(&self, q: usize, i: u16) -> (u16, u32) {
        let b = self.read(used_ring_addr(q) + 4 + 8 * u64::from(i % QUEUE_SIZE), 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()) as u16,
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Wait until queue `q`'s used index reaches `idx`.
    pub fn wait_used(&self, q: usize, idx: u16, timeout: Duration) -> bool {
        wait_until(timeout, || self.used_idx(q).wrapping_sub(idx) < 0x8000)
    }

    /// Used-buffer interrupts signalled on queue `q` since the last call.
    pub fn take_calls(&self, q: usize) -> u64 {
        match self.rings[q].call.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("reading the call eventfd: {e}"),
        }
    }

    /// Send one control request (16 bytes) with an 8-byte status buffer,
    /// kick, and wait for the answer: (used length, status, value).
    pub fn ctrl(&mut self, cmd: u32, arg0: u32, arg1: u32, reserved: u32) -> (u32, u32, u32) {
        let req: Vec<u8> = [cmd, arg0, arg1, reserved]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.ctrl_raw(&req, 8)
    }

    /// A control chain with `req` readable and `status_len` writable
    /// bytes: (used length, status, value).
    pub fn ctrl_raw(&mut self, req: &[u8], status_len: u32) -> (u32, u32, u32) {
        let r = self.buf(req.len() as u32);
        let s = self.buf(status_len.max(8));
        self.write(r, req);
        self.write(s, &[0xee; 8]);
        let before = self.used_idx(CTRL);
        let head = self.post(
            CTRL,
            &[Desc::r(r, req.len() as u32), Desc::w(s, status_len)],
        );
        self.kick(CTRL);
        assert!(
            self.wait_used(CTRL, before.wrapping_add(1), TIMEOUT),
            "no answer to a control request"
        );
        let (id, len) = self.used(CTRL, before);
        assert_eq!(id, head);
        let st = self.read(s, 8);
        (
            len,
            u32::from_le_bytes(st[0..4].try_into().unwrap()),
            u32::from_le_bytes(st[4..8].try_into().unwrap()),
        )
    }

    /// `SET_RATE`, which must succeed.
    pub fn set_rate(&mut self, hz: u32) {
        assert_eq!(self.ctrl(1, hz, 0, 0), (8, 0, hz), "SET_RATE {hz}");
    }

    /// `SET_THRESHOLD`, which must succeed.
    pub fn set_threshold(&mut self, threshold: i32, mode: u32) {
        assert_eq!(
            self.ctrl(2, threshold as u32, mode, 0),
            (8, 0, mode),
            "SET_THRESHOLD {threshold} {mode}"
        );
    }
}

/// Keeps `n` buffers posted on a device-to-driver queue and collects what
/// comes back, reposting each buffer as it returns (a driver's loop).
pub struct Collector {
    q: usize,
    len: u32,
    /// Used index seen so far.
    seen: u16,
    /// Head -> buffer address.
    bufs: std::collections::HashMap<u16, u64>,
    /// (arrival time, record bytes) per completed buffer, in order.
    pub got: Vec<(Instant, Vec<u8>)>,
}

impl Collector {
    /// Post `n` buffers of `len` bytes on queue `q` and kick.
    pub fn start(vmm: &mut Vmm, q: usize, n: usize, len: u32) -> Self {
        let mut c = Self {
            q,
            len,
            seen: vmm.used_idx(q),
            bufs: Default::default(),
            got: Vec::new(),
        };
        for _ in 0..n {
            let a = vmm.buf(len);
            let head = vmm.post(q, &[Desc::w(a, len)]);
            c.bufs.insert(head, a);
        }
        vmm.kick(q);
        c
    }

    /// Take what the device completed, repost those buffers; returns the
    /// number of buffers taken.
    pub fn poll(&mut self, vmm: &mut Vmm) -> usize {
        let now = Instant::now();
        let used = vmm.used_idx(self.q);
        let mut n = 0;
        while self.seen != used {
            let (head, len) = vmm.used(self.q, self.seen);
            self.seen = self.seen.wrapping_add(1);
            let addr = self.bufs.remove(&head).expect("a head we posted");
            self.got.push((now, vmm.read(addr, len as usize)));
            let a = vmm.buf(self.len);
            let h = vmm.post(self.q, &[Desc::w(a, self.len)]);
            self.bufs.insert(h, a);
            n += 1;
        }
        if n > 0 {
            vmm.kick(self.q);
        }
        n
    }

    /// Poll until `cond(self)` holds or `timeout` passes.
    pub fn until(
        &mut self,
        vmm: &mut Vmm,
        timeout: Duration,
        cond: impl Fn(&Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll(vmm);
            if cond(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Every record of `size` bytes received, with its buffer's arrival time.
    pub fn records(&self, size: usize) -> Vec<(Instant, Vec<u8>)> {
        self.got
            .iter()
            .flat_map(|(t, b)| b.chunks_exact(size).map(move |r| (*t, r.to_vec())))
            .collect()
    }
}
