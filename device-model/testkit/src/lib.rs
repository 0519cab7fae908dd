//! Protocol-test kit for vdevlab devices (`docs/device-framework.md`,
//! "Testing a device"): a device binary in a private temporary folder
//! ([`Device`]), a client for the core's control plane ([`Ctl`]), and an
//! in-process vhost-user frontend playing the VMM and the guest driver
//! ([`Vmm`]): guest memory in a memfd shared with the backend, split
//! virtqueues laid out in it ([`Layout`]), real kick/call/error eventfds,
//! and helpers to post chains (well-formed or not, [`Desc`], [`Link`]) and
//! read the used rings. [`Vmm::queue_driver`] hands one queue to a thread of
//! its own ([`QueueDriver`]), so a test can drive several queues at once.
//!
//! A device's `tests/support/mod.rs` wraps these with its own queue names,
//! layout and typed helpers. Everything here panics (with the backend's log
//! where it helps) rather than returning errors: it is test code.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vdevlab_device_core::control::ControlClient;
use vdevlab_device_core::Fields;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub mod vmm;

pub use vhost;
pub use vm_memory;
pub use vmm_sys_util;

/// `Deref` and `DerefMut` from a device's newtype over a kit type (`struct
/// Vmm(kit::Vmm)`) to that type: the device's support module adds its own
/// helpers and keeps the kit's. `deref_to_kit!(Vmm => kit::Vmm, ...)`.
#[macro_export]
macro_rules! deref_to_kit {
    ($($outer:ty => $inner:ty),+ $(,)?) => {$(
        impl ::std::ops::Deref for $outer {
            type Target = $inner;
            fn deref(&self) -> &$inner {
                &self.0
            }
        }
        impl ::std::ops::DerefMut for $outer {
            fn deref_mut(&mut self) -> &mut $inner {
                &mut self.0
            }
        }
    )+};
}

/// `VRING_AVAIL_F_NO_INTERRUPT`.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

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

/// Where the queues live in guest memory: one region at guest physical
/// address 0 of `mem_size` bytes; queue `q`'s descriptor table, available
/// ring and used ring in three page-aligned parts from
/// [`ring_base`](Self::ring_base)`(q)`; data buffers from `data_base` up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Number of queues the device has.
    pub queues: usize,
    /// Size of every queue.
    pub queue_size: u16,
    /// Guest memory size.
    pub mem_size: u64,
    /// First guest address free for data buffers (the rings live below).
    pub data_base: u64,
}

impl Layout {
    /// Bytes of one part (the descriptor table, 16 bytes per entry, is the
    /// largest of the three), page-aligned.
    const fn part(&self) -> u64 {
        (16 * self.queue_size as u64).next_multiple_of(0x1000)
    }
    /// Bytes the rings of one queue take.
    pub const fn ring_stride(&self) -> u64 {
        3 * self.part()
    }
    /// Guest address of queue `q`'s rings.
    pub const fn ring_base(&self, q: usize) -> u64 {
        0x1000 + self.ring_stride() * q as u64
    }
    /// Guest address of queue `q`'s descriptor table.
    pub const fn desc_table_addr(&self, q: usize) -> u64 {
        self.ring_base(q)
    }
    /// Guest address of queue `q`'s available ring.
    pub const fn avail_ring_addr(&self, q: usize) -> u64 {
        self.ring_base(q) + self.part()
    }
    /// Guest address of queue `q`'s used ring.
    pub const fn used_ring_addr(&self, q: usize) -> u64 {
        self.ring_base(q) + 2 * self.part()
    }
}

/// What the frontend negotiates.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Queues and guest memory.
    pub layout: Layout,
    /// Virtio feature bits to acknowledge besides `VIRTIO_F_VERSION_1` and
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (the backend must offer them all).
    pub features: u64,
}

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// A device process with its own temporary folder for the vhost-user
/// socket, the control socket and its log (stderr, `RUST_LOG=info`).
/// Killed on drop; if the test is panicking, the log's tail is printed.
pub struct Device {
    child: Child,
    name: String,
    dir: PathBuf,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    log: PathBuf,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Device {
    /// Start `binary` (in a test, `env!("CARGO_BIN_EXE_<name>")`) with
    /// `--socket`, `--control` and `extra` arguments, and wait until both
    /// sockets are there.
    pub fn spawn(binary: impl AsRef<Path>, extra: &[&str]) -> Self {
        let binary = binary.as_ref();
        let name = binary
            .file_name()
            .map_or_else(|| "device".into(), |n| n.to_string_lossy().into_owned());
        let dir = std::env::temp_dir().join(format!(
            "{name}-proto-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir); // stale, from a reused pid
        std::fs::create_dir_all(&dir).expect("creating the test's temporary folder");
        let socket = dir.join("vu.sock");
        let control = dir.join("ctl.sock");
        let log = dir.join("device.log");
        let log_file = File::create(&log).expect("creating the device log");
        let child = Command::new(binary)
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
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut dev = Device {
            child,
            name,
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
            "{} did not come up; its log:\n{}",
            dev.name,
            dev.log()
        );
        dev
    }

    /// A new client for the core's control plane.
    pub fn ctl(&self) -> Ctl {
        Ctl(ControlClient::connect(&self.control).expect("connecting to the control socket"))
    }

    /// Connect a new frontend (VMM) and bring every queue up.
    pub fn vmm(&self, config: Config) -> Vmm {
        Vmm::connect(&self.socket, config, || self.log())
    }

    /// [`vmm`](Self::vmm), negotiating as `options` say (the backend
    /// channel included).
    pub fn vmm_with(&self, config: Config, options: Options) -> Vmm {
        Vmm::connect_with(&self.socket, config, options, || self.log())
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

    /// Wait up to `timeout` until the backend listens on a new vhost-user
    /// socket (a file other than `old`): it has finished with the previous
    /// connection and its worker threads have exited.
    pub fn wait_relisten(&self, old: Option<(u64, i64, i64)>, timeout: Duration) -> bool {
        wait_until(timeout, || {
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
            let tail = String::from_utf8_lossy(&log.as_bytes()[log.len().saturating_sub(8192)..]);
            eprintln!(
                "---- {} log ({}) ----\n{tail}",
                self.name,
                self.dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client for the core's control plane with test-friendly helpers (they
/// panic on error).
#[derive(Debug)]
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

    /// The counters (the core's and the device's).
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
    /// `NEXT` to the descriptor itself (a loop).
    Itself,
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
    let next_flag = VRING_DESC_F_NEXT as u16;
    let mut out = Vec::with_capacity(descs.len() * 16);
    for (i, d) in descs.iter().enumerate() {
        let (flags, next) = match d.link {
            Link::Auto if i + 1 < descs.len() => (d.flags | next_flag, base + i as u16 + 1),
            Link::Auto | Link::End => (d.flags & !next_flag, 0),
            Link::Slot(s) => (d.flags | next_flag, base + s),
            Link::Itself => (d.flags | next_flag, base + i as u16),
            Link::Raw(r) => (d.flags | next_flag, r),
        };
        out.extend_from_slice(&d.addr.to_le_bytes());
        out.extend_from_slice(&d.len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out
}

/// The driver's view of one split virtqueue.
#[derive(Debug)]
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

/// Read an eventfd's count (0 if nothing was signalled).
fn drain_eventfd(fd: &EventFd) -> u64 {
    match fd.read() {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => panic!("reading an eventfd: {e}"),
    }
}

/// Guest memory of `size` bytes backed by a fresh memfd, so the backend can
/// map it too.
fn guest_memory(size: u64) -> GuestMemoryMmap {
    // SAFETY: memfd_create takes a NUL-terminated name (a C string literal)
    // and flags; it has no other preconditions. The result is checked below.
    let fd = unsafe { libc::memfd_create(c"vdevlab-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a freshly created, valid file descriptor that nothing
    // else owns; the File takes sole ownership of it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("sizing the guest memory memfd");
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .expect("mapping guest memory")
}

/// How the frontend answers a config change on the backend channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Acknowledge it (0).
    Ok,
    /// Answer with an error (EIO).
    Refuse,
    /// Never answer (the handler waits until the channel is dropped).
    Never,
}

/// What the frontend negotiates beyond [`Config`] ([`Vmm::connect_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Acknowledge BACKEND_REQ and send SET_BACKEND_REQ_FD.
    pub backend_req: bool,
    /// Acknowledge REPLY_ACK (every request then waits for its answer, and
    /// the backend asks for answers on the backend channel).
    pub reply_ack: bool,
    /// Acknowledge CONFIG.
    pub config: bool,
    /// How config changes are answered.
    pub ack: Ack,
}

impl Default for Options {
    /// Everything negotiated, config changes acknowledged: what Cloud
    /// Hypervisor and QEMU do.
    fn default() -> Self {
        Self {
            backend_req: true,
            reply_ack: true,
            config: true,
            ack: Ack::Ok,
        }
    }
}

#[derive(Debug)]
struct ChannelState {
    /// Taken while a config change is handled: a test that holds it plays
    /// a VMM whose one thread is busy on the main socket (QEMU's BQL).
    busy: Arc<Mutex<()>>,
    ack: Mutex<Ack>,
    changes: Mutex<Vec<Instant>>,
    changed: Condvar,
    released: Mutex<bool>,
    release: Condvar,
}

impl VhostUserFrontendReqHandler for ChannelState {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        self.changed.notify_all();
        let ack = *self.ack.lock().unwrap_or_else(|e| e.into_inner());
        match ack {
            Ack::Ok => Ok(0),
            Ack::Refuse => Err(io::Error::from_raw_os_error(libc::EIO)),
            Ack::Never => {
                // Bounded, so a forgotten channel cannot hang a test run.
                let released = self.released.lock().unwrap_or_else(|e| e.into_inner());
                let _ = self
                    .release
                    .wait_timeout_while(released, Duration::from_secs(60), |r| !*r);
                Ok(0)
            }
        }
    }
}

/// The frontend's end of the backend channel (SET_BACKEND_REQ_FD): a
/// thread that serves the backend's requests with vhost's
/// `FrontendReqHandler` and records every config change. Stopped on drop.
pub struct BackendChannel {
    state: Arc<ChannelState>,
    fd: std::os::fd::RawFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for BackendChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendChannel")
            .field("config_changes", &self.config_changes())
            .finish()
    }
}

impl BackendChannel {
    /// Create the channel and hand it to the backend through `fe`.
    pub fn set_up(fe: &mut Frontend, reply_ack: bool, ack: Ack) -> Self {
        use std::os::fd::AsRawFd;
        let state = Arc::new(ChannelState {
            busy: Arc::new(Mutex::new(())),
            ack: Mutex::new(ack),
            changes: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            released: Mutex::new(false),
            release: Condvar::new(),
        });
        let mut handler = FrontendReqHandler::new(state.clone()).expect("backend channel");
        handler.set_reply_ack_flag(reply_ack);
        let tx = handler.get_tx_raw_fd();
        let fd = handler.as_raw_fd();
        fe.set_backend_request_fd(&BorrowedRaw(tx))
            .expect("SET_BACKEND_REQ_FD");
        let thread = std::thread::Builder::new()
            .name("testkit-backend-channel".into())
            .spawn(move || {
                // A handler error was answered; anything else: the channel closed.
                while let Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) =
                    handler.handle_request()
                {}
            })
            .expect("backend channel thread");
        Self {
            state,
            fd,
            thread: Some(thread),
        }
    }

    /// The lock the channel's handler takes before it handles a config
    /// change: hold it to play a VMM that serves the backend channel on the
    /// thread that waits on the main socket (QEMU under its big lock).
    pub fn busy_lock(&self) -> Arc<Mutex<()>> {
        self.state.busy.clone()
    }

    /// How config changes are answered from now on.
    pub fn set_ack(&self, ack: Ack) {
        *self.state.ack.lock().unwrap_or_else(|e| e.into_inner()) = ack;
    }

    /// Config changes received so far.
    pub fn config_changes(&self) -> usize {
        self.state
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// When each config change arrived.
    pub fn config_change_times(&self) -> Vec<Instant> {
        self.state
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Wait up to `timeout` until at least `n` config changes arrived;
    /// returns how many did.
    pub fn wait_config_changes(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut changes = self.state.changes.lock().unwrap_or_else(|e| e.into_inner());
        while changes.len() < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            changes = self
                .state
                .changed
                .wait_timeout(changes, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        changes.len()
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        *self
            .state
            .released
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        self.state.release.notify_all();
        // SAFETY: shutting down our own socket (owned by the handler, which
        // the thread still holds) ends its blocking read.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw descriptor as `AsRawFd`, for a call that only reads its number.
struct BorrowedRaw(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for BorrowedRaw {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// A vhost-user frontend: the VMM and, through guest memory, the driver.
pub struct Vmm {
    /// The vhost-user connection.
    pub fe: Frontend,
    /// Guest memory (a memfd shared with the backend).
    pub mem: GuestMemoryMmap,
    /// Where the queues live.
    pub layout: Layout,
    host_base: u64,
    rings: Vec<Ring>,
    next_buf: u64,
    /// Virtio features acknowledged.
    pub features: u64,
    /// Virtio features the backend offered.
    pub offered_features: u64,
    /// Protocol features the backend offered.
    pub offered_protocol_features: VhostUserProtocolFeatures,
    /// The backend channel, if BACKEND_REQ was negotiated
    /// ([`Vmm::connect_with`]).
    pub backend: Option<BackendChannel>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("layout", &self.layout)
            .field("features", &format_args!("{:#x}", self.features))
            .finish()
    }
}

impl Vmm {
    /// Connect to `socket` (retrying while the backend is not listening, or
    /// is still closing its previous connection), negotiate as `config`
    /// says and bring every queue up. `log` gives the backend's log for
    /// failure messages.
    pub fn connect(socket: &Path, config: Config, log: impl Fn() -> String) -> Self {
        let options = Options {
            backend_req: false,
            ..Options::default()
        };
        Self::connect_with(socket, config, options, log)
    }

    /// [`connect`](Self::connect), negotiating as `options` say: with
    /// `backend_req`, the backend channel is set up after the protocol
    /// features ([`Vmm::backend`]).
    pub fn connect_with(
        socket: &Path,
        config: Config,
        options: Options,
        log: impl Fn() -> String,
    ) -> Self {
        let layout = config.layout;
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut fe, offered) = loop {
            let attempt = UnixStream::connect(socket)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let fe = Frontend::from_stream(s, layout.queues as u64);
                    fe.set_owner().map_err(|e| e.to_string())?;
                    let offered = fe.get_features().map_err(|e| e.to_string())?;
                    Ok((fe, offered))
                });
            match attempt {
                Ok(ok) => break ok,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!(
                    "could not connect to {}: {e}; backend log:\n{}",
                    socket.display(),
                    log()
                ),
            }
        };
        let features = (1u64 << VIRTIO_F_VERSION_1)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | config.features;
        assert_eq!(
            offered & features,
            features,
            "the backend offers {offered:#x}, which lacks some of {features:#x}"
        );
        let offered_protocol_features = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let mut wanted =
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        for (on, bit) in [
            (options.reply_ack, VhostUserProtocolFeatures::REPLY_ACK),
            (options.config, VhostUserProtocolFeatures::CONFIG),
            (options.backend_req, VhostUserProtocolFeatures::BACKEND_REQ),
        ] {
            if on {
                wanted |= bit;
            }
        }
        let ack = offered_protocol_features & wanted;
        fe.set_protocol_features(ack)
            .expect("SET_PROTOCOL_FEATURES");
        if ack.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then waits for the backend's answer, so the
            // set-up below is done when these calls return.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = fe.get_queue_num().expect("GET_QUEUE_NUM");
        assert_eq!(queues, layout.queues as u64, "queue count");
        fe.set_features(features).expect("SET_FEATURES");

        let backend = ack
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
            .then(|| {
                BackendChannel::set_up(
                    &mut fe,
                    ack.contains(VhostUserProtocolFeatures::REPLY_ACK),
                    options.ack,
                )
            });
        let mut vmm = Vmm::assemble(fe, layout, features, offered, offered_protocol_features);
        vmm.backend = backend;
        let info = vmm.region_info();
        vmm.fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
        for q in 0..layout.queues {
            vmm.start_ring(q);
        }
        vmm
    }

    /// A frontend over `fe` with fresh guest memory and rings, nothing
    /// sent yet beyond what the caller did on `fe`.
    pub(crate) fn assemble(
        fe: Frontend,
        layout: Layout,
        features: u64,
        offered_features: u64,
        offered_protocol_features: VhostUserProtocolFeatures,
    ) -> Self {
        assert!(
            layout.ring_base(layout.queues) <= layout.data_base
                && layout.data_base < layout.mem_size,
            "{layout:?}: the rings overlap the data buffers"
        );
        let mem = guest_memory(layout.mem_size);
        let region = mem.find_region(GuestAddress(0)).expect("the guest region");
        let host_base = VhostUserMemoryRegionInfo::from_guest_region(region)
            .expect("describing the guest region")
            .userspace_addr;
        Vmm {
            fe,
            mem,
            layout,
            host_base,
            rings: (0..layout.queues).map(|_| Ring::new()).collect(),
            next_buf: layout.data_base,
            features,
            offered_features,
            offered_protocol_features,
            backend: None,
        }
    }

    /// The one guest memory region, as SET_MEM_TABLE / ADD_MEM_REG send it.
    pub(crate) fn region_info(&self) -> VhostUserMemoryRegionInfo {
        let region = self
            .mem
            .find_region(GuestAddress(0))
            .expect("the guest region");
        VhostUserMemoryRegionInfo::from_guest_region(region).expect("describing the guest region")
    }

    /// Queue `q`'s ring addresses (in the frontend's address space), as
    /// SET_VRING_ADDR sends them.
    pub(crate) fn vring_config(&self, q: usize) -> VringConfigData {
        let size = self.layout.queue_size;
        VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.host_base + self.layout.desc_table_addr(q),
            used_ring_addr: self.host_base + self.layout.used_ring_addr(q),
            avail_ring_addr: self.host_base + self.layout.avail_ring_addr(q),
            log_addr: None,
        }
    }

    fn start_ring(&mut self, q: usize) {
        let size = self.layout.queue_size;
        let config = self.vring_config(q);
        let ring = &self.rings[q];
        self.fe.set_vring_num(q, size).expect("SET_VRING_NUM");
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

    /// Clear queue `q`'s rings in guest memory and start it again from
    /// index 0 (the queue must have been stopped).
    fn restart_ring(&mut self, q: usize) {
        self.clear_ring(q);
        self.start_ring(q);
    }

    /// Clear queue `q`'s rings in guest memory and the driver's indices, as
    /// a driver does when it sets the queue up again (the queue must have
    /// been stopped).
    pub(crate) fn clear_ring(&mut self, q: usize) {
        let zeros = vec![0u8; self.layout.ring_stride() as usize];
        self.write(self.layout.ring_base(q), &zeros);
        let ring = &mut self.rings[q];
        ring.next_desc = 0;
        ring.avail_idx = 0;
        ring.calls += drain_eventfd(&ring.call);
    }

    /// Reset queue `q` as a VMM does when the driver resets the device:
    /// stop it (GET_VRING_BASE), clear its rings in guest memory, and start
    /// it again from index 0. Returns the backend's next available index.
    pub fn reset_queue(&mut self, q: usize) -> u32 {
        let base = self.fe.get_vring_base(q).expect("GET_VRING_BASE");
        self.restart_ring(q);
        base
    }

    /// A device reset as the VMM does it: stop every queue
    /// (GET_VRING_BASE), then clear the rings and start them again.
    pub fn reset_device(&mut self) {
        self.stop_rings();
        for q in 0..self.layout.queues {
            self.restart_ring(q);
        }
    }

    /// Stop every ring as a VMM does before it disconnects in an orderly
    /// way (GET_VRING_BASE); returns each queue's next available index.
    pub fn stop_rings(&mut self) -> Vec<u32> {
        (0..self.layout.queues)
            .map(|q| self.fe.get_vring_base(q).expect("GET_VRING_BASE"))
            .collect()
    }

    /// A fresh buffer of `len` bytes in guest memory, from
    /// [`Layout::data_base`] up (never reused).
    pub fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_buf;
        self.next_buf += u64::from(len).next_multiple_of(64);
        assert!(
            self.next_buf <= self.layout.mem_size,
            "test ran out of guest memory"
        );
        a
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
        let size = self.layout.queue_size;
        assert!(n <= size as usize, "a chain of {n} descriptors");
        let ring = &mut self.rings[q];
        if ring.next_desc as usize + n > size as usize {
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
            self.layout.desc_table_addr(q) + 16 * u64::from(base),
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
        let slot = self.rings[q].avail_idx % self.layout.queue_size;
        let avail = self.layout.avail_ring_addr(q);
        self.store_u16(avail + 4 + 2 * u64::from(slot), head);
        self.rings[q].avail_idx = self.rings[q].avail_idx.wrapping_add(1);
        self.store_u16(avail + 2, self.rings[q].avail_idx);
    }

    /// Write `descs` as one chain and make it available (no kick); returns
    /// its head.
    pub fn post_chain(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let head = self.write_chain(q, descs);
        self.push_avail(q, head);
        head
    }

    /// The driver's available index for queue `q`.
    pub fn avail_idx(&self, q: usize) -> u16 {
        self.rings[q].avail_idx
    }

    /// Publish `idx` as queue `q`'s available index, whatever it is (the
    /// driver's shadow index follows).
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) {
        self.rings[q].avail_idx = idx;
        self.store_u16(self.layout.avail_ring_addr(q) + 2, idx);
    }

    /// Set the available ring's flags (e.g. [`AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, q: usize, flags: u16) {
        self.store_u16(self.layout.avail_ring_addr(q), flags);
    }

    /// Set `used_event` (EVENT_IDX): interrupt once the used index passes it.
    pub fn set_used_event(&self, q: usize, idx: u16) {
        let size = u64::from(self.layout.queue_size);
        self.store_u16(self.layout.avail_ring_addr(q) + 4 + 2 * size, idx);
    }

    /// `avail_event` as published by the device (EVENT_IDX).
    pub fn avail_event(&self, q: usize) -> u16 {
        let size = u64::from(self.layout.queue_size);
        self.load_u16(self.layout.used_ring_addr(q) + 4 + 8 * size)
    }

    /// The used ring's flags as published by the device.
    pub fn used_flags(&self, q: usize) -> u16 {
        self.load_u16(self.layout.used_ring_addr(q))
    }

    /// Notify the device that queue `q` has new buffers.
    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).expect("kicking");
    }

    /// The device's used index for queue `q`.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.load_u16(self.layout.used_ring_addr(q) + 2)
    }

    /// Wait up to `timeout` until queue `q`'s used index reaches `idx`.
    pub fn wait_used(&self, q: usize, idx: u16, timeout: Duration) -> bool {
        wait_until(timeout, || self.used_idx(q).wrapping_sub(idx) < 0x8000)
    }

    /// Used element `i` of queue `q`: (descriptor head id, length).
    pub fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let slot = u64::from(i % self.layout.queue_size);
        let b = self.read(self.layout.used_ring_addr(q) + 4 + 8 * slot, 8);
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

    /// Used-buffer interrupts seen on queue `q` since the last call of
    /// this or [`calls`](Self::calls).
    pub fn take_calls(&mut self, q: usize) -> u64 {
        let before = self.rings[q].calls;
        self.calls(q) - before
    }

    /// Error eventfd signals seen on queue `q` since connecting.
    pub fn errs(&mut self, q: usize) -> u64 {
        let ring = &mut self.rings[q];
        ring.errs += drain_eventfd(&ring.err);
        ring.errs
    }
}

/// One queue of a [`Vmm`], driven from a thread of its own
/// ([`Vmm::queue_driver`]): a view of the shared guest memory, the queue's
/// kick and call eventfds, and the driver's indices for that queue. Tests
/// that drive two queues at once (or a queue and the control plane) give
/// each thread one of these. Guest memory is shared, so each thread must
/// keep to its own buffers.
#[derive(Debug)]
pub struct QueueDriver {
    /// The queue's index.
    pub q: usize,
    mem: GuestMemoryMmap,
    layout: Layout,
    kick: EventFd,
    call: EventFd,
    next_desc: u16,
    avail_idx: u16,
    calls: u64,
}

impl QueueDriver {
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

    /// Write `descs` as one chain in consecutive slots (wrapping to slot 0
    /// when they do not fit before the end of the table) and make it
    /// available (no kick); returns its head. The caller keeps fewer
    /// descriptors in flight than the queue has, so no slot in use is
    /// reused.
    pub fn post_chain(&mut self, descs: &[Desc]) -> u16 {
        let size = self.layout.queue_size;
        assert!(
            descs.len() <= size as usize,
            "a chain of {} descriptors",
            descs.len()
        );
        if self.next_desc as usize + descs.len() > size as usize {
            self.next_desc = 0;
        }
        let base = self.next_desc;
        self.next_desc += descs.len() as u16;
        self.write(
            self.layout.desc_table_addr(self.q) + 16 * u64::from(base),
            &encode(descs, base),
        );
        let slot = self.avail_idx % size;
        let avail = self.layout.avail_ring_addr(self.q);
        self.store_u16(avail + 4 + 2 * u64::from(slot), base);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.store_u16(avail + 2, self.avail_idx);
        base
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Notify the device that the queue has new buffers.
    pub fn kick(&self) {
        self.kick.write(1).expect("kicking");
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.load_u16(self.layout.used_ring_addr(self.q) + 2)
    }

    /// Used element `i`: (descriptor head id, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let slot = u64::from(i % self.layout.queue_size);
        let b = self.read(self.layout.used_ring_addr(self.q) + 4 + 8 * slot, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }

    /// Used-buffer interrupts (call eventfd signals) seen since the driver
    /// was made (those seen by the [`Vmm`] before are not counted).
    pub fn calls(&mut self) -> u64 {
        self.calls += drain_eventfd(&self.call);
        self.calls
    }

    /// Wait up to `timeout` for a used-buffer interrupt; whether one came.
    pub fn wait_call(&mut self, timeout: Duration) -> bool {
        let before = self.calls;
        wait_until(timeout, || self.calls() > before)
    }
}

impl Vmm {
    /// Queue `q` as a [`QueueDriver`] for another thread, starting from
    /// this frontend's indices for it. From then on only the driver may
    /// post on `q` (this frontend's indices for `q` no longer follow), and
    /// the interrupts of `q` go to whichever of the two reads them first.
    pub fn queue_driver(&mut self, q: usize) -> QueueDriver {
        let ring = &mut self.rings[q];
        ring.calls += drain_eventfd(&ring.call);
        QueueDriver {
            q,
            mem: self.mem.clone(),
            layout: self.layout,
            kick: ring.kick.try_clone().expect("cloning the kick eventfd"),
            call: ring.call.try_clone().expect("cloning the call eventfd"),
            next_desc: ring.next_desc,
            avail_idx: ring.avail_idx,
            calls: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_parts_are_page_aligned_and_do_not_overlap() {
        let l = Layout {
            queues: 3,
            queue_size: 256,
            mem_size: 4 << 20,
            data_base: 0x10000,
        };
        assert_eq!(l.ring_stride(), 0x3000);
        assert_eq!(l.desc_table_addr(1), 0x4000);
        assert_eq!(l.avail_ring_addr(1), 0x5000);
        assert_eq!(l.used_ring_addr(1), 0x6000);
        // The used ring (4 + 8 * 256 + 2 bytes) ends inside its part.
        assert!(l.used_ring_addr(0) + 4 + 8 * 256 + 2 <= l.ring_base(1));
        let big = Layout {
            queue_size: 1024,
            ..l
        };
        assert_eq!(big.avail_ring_addr(0) - big.desc_table_addr(0), 16 * 1024);
    }

    #[test]
    fn chains_encode_their_links() {
        let d = Desc::writable(0x10000, 64);
        let descs = [
            d,
            d.link(Link::Itself),
            d.link(Link::Slot(0)),
            d.link(Link::Raw(999)),
            d.link(Link::End),
            Desc::readable(0x20000, 8),
        ];
        let raw = encode(&descs, 10);
        let field = |i: usize| {
            let e = &raw[16 * i..16 * (i + 1)];
            (
                u16::from_le_bytes([e[12], e[13]]),
                u16::from_le_bytes([e[14], e[15]]),
            )
        };
        let (w, n) = (VRING_DESC_F_WRITE as u16, VRING_DESC_F_NEXT as u16);
        assert_eq!(field(0), (w | n, 11), "auto: the next slot");
        assert_eq!(field(1), (w | n, 11), "itself");
        assert_eq!(field(2), (w | n, 10), "slot 0 of the chain");
        assert_eq!(field(3), (w | n, 999), "raw");
        assert_eq!(field(4), (w, 0), "end, though more follow");
        assert_eq!(field(5), (0, 0), "auto: the last ends the chain");
    }
}
