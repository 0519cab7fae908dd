//! Replays of the vhost-user frontends of the VMMs the lab runs, so that a
//! backend change that breaks one VMM's path fails in a protocol test, with
//! no VMM installed (`docs/device-framework.md`, "Testing a device").
//!
//! A [`Replay`] plays one [`Script`] against a spawned [`Device`]: the
//! VMM's start-up handshake, the guest's config-space accesses as that VMM
//! forwards them, activation when the driver sets DRIVER_OK, teardown when
//! the driver resets the device, and reconnection. Each step sends the
//! messages in the order, with the flags and the payloads that the VMM's
//! sources use (the lists are in the docs and on [`Script`]), and checks
//! every reply; [`Replay::sent`] is the log of what went out. The queues,
//! guest memory and the driver's helpers are those of the testkit's
//! [`Vmm`] ([`Replay::vmm`]).
//!
//! Every step is bounded by [`REPLY_TIMEOUT`]: a watchdog closes the
//! connection of a step that takes longer, so a backend that hangs fails
//! the test instead of blocking it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Device, Layout, Vmm};

/// The longest a replay waits for any one reply from the backend.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a replay keeps trying to connect (the backend may still be
/// closing its previous connection).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `VHOST_USER_PROTOCOL_F_*` bits Cloud Hypervisor's generic vhost-user
/// device asks for (`generic_vhost_user.rs`, v52.0 and v53.0).
const CH_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::LOG_SHMFD)
    .union(VhostUserProtocolFeatures::DEVICE_STATE)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);

/// QEMU's largest vhost-user config window (`VHOST_USER_MAX_CONFIG_SIZE`).
pub const QEMU_MAX_CONFIG_SIZE: u32 = 256;

/// Closes a connection whose step takes longer than [`REPLY_TIMEOUT`]:
/// the vhost crate's frontend retries a read that times out, and waits
/// for a reply's full payload even when the backend sent less, so a socket
/// timeout alone does not bound a step. Closing the socket makes the
/// pending call fail, and the test with it.
struct Watchdog {
    state: Arc<Mutex<Watch>>,
}

#[derive(Default)]
struct Watch {
    armed: Option<(Instant, String)>,
    stream: Option<UnixStream>,
    done: bool,
}

impl Watchdog {
    fn new() -> Self {
        let state = Arc::new(Mutex::new(Watch::default()));
        let shared = state.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(10));
            let mut w = shared.lock().unwrap_or_else(|e| e.into_inner());
            if w.done {
                return;
            }
            if let Some((deadline, what)) = &w.armed {
                if Instant::now() > *deadline {
                    eprintln!("{what}: no reply within {REPLY_TIMEOUT:?}, the backend hangs; closing the connection");
                    if let Some(s) = &w.stream {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    w.armed = None;
                }
            }
        });
        Self { state }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watch> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watch `stream` for the step `what`.
    fn arm(&self, stream: &UnixStream, what: String) {
        let mut w = self.lock();
        w.stream = stream.try_clone().ok();
        w.armed = Some((Instant::now() + REPLY_TIMEOUT, what));
    }

    fn disarm(&self) {
        self.lock().armed = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.lock().done = true;
    }
}

/// Which VMM's frontend a [`Replay`] plays.
///
/// **Cloud Hypervisor v52 / v53** (`virtio-devices/src/vhost_user/`,
/// `generic_vhost_user.rs`, `vu_common_ctrl.rs`, `mod.rs`; the order is the
/// same in both tags):
///
/// - start (device creation): `SET_OWNER`, `GET_FEATURES`,
///   `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES` (its wanted set
///   intersected with the offer: here `MQ | REPLY_ACK | BACKEND_REQ |
///   CONFIG | CONFIGURE_MEM_SLOTS`), then every message carries
///   `NEED_REPLY`; `GET_QUEUE_NUM`.
/// - guest config access: one `GET_CONFIG(offset, len)` (flags empty) or
///   `SET_CONFIG(offset, WRITABLE, data)` per access, before and after
///   feature negotiation; a `GET_CONFIG` the frontend sees fail panics
///   the VMM, and an error reply (an empty payload) hangs it: the vhost
///   crate's frontend waits for the payload.
/// - activation (DRIVER_OK): `SET_FEATURES` (the guest's acks plus
///   `PROTOCOL_FEATURES`), `SET_MEM_TABLE`, `SET_VRING_NUM` for every queue,
///   then per queue `SET_VRING_ADDR`, `SET_VRING_BASE` (the available index
///   in guest memory), `SET_VRING_CALL`, `SET_VRING_KICK`; `SET_VRING_ENABLE
///   1` per queue; `SET_BACKEND_REQ_FD`. No `SET_VRING_ERR`.
/// - device reset: per queue `SET_VRING_ENABLE 0`, `GET_VRING_BASE`.
/// - reconnect (the backend hung up while the device was active): connect
///   again (every 100 ms, up to a minute), `SET_OWNER`, `GET_FEATURES`,
///   `SET_PROTOCOL_FEATURES` (the set acked before, no
///   `GET_PROTOCOL_FEATURES`, no `GET_QUEUE_NUM`), then the activation
///   sequence with the rings as they are in guest memory.
///
/// **QEMU 11** (`hw/virtio/vhost-user.c`, `vhost.c`, `vhost-user-base.c`
/// behind `vhost-user-test-device-pci`):
///
/// - start (realize): `GET_FEATURES`, `GET_PROTOCOL_FEATURES`,
///   `SET_PROTOCOL_FEATURES` (everything offered that QEMU knows; `CONFIG`
///   is required once `config_size` is set), `GET_QUEUE_NUM`,
///   `GET_MAX_MEM_SLOTS`, `SET_BACKEND_REQ_FD` (`NEED_REPLY`), `SET_OWNER`,
///   `GET_FEATURES`, then per queue `SET_VRING_CALL` (a masked notifier)
///   and `SET_VRING_ERR`.
/// - guest config access: every read is `GET_CONFIG(0, config_size)` (the
///   whole window, flags empty); an access beyond `config_size` is answered
///   by QEMU (all ones) and sends nothing; a write patches QEMU's copy and
///   sends it whole, `SET_CONFIG(0, config_size, flags 0)` with
///   `NEED_REPLY`.
/// - activation: `SET_FEATURES` (the guest's acks plus
///   `PROTOCOL_FEATURES`), `ADD_MEM_REG` per region (`CONFIGURE_MEM_SLOTS`,
///   `NEED_REPLY`; only regions not sent before), per queue `SET_VRING_NUM`,
///   `SET_VRING_BASE`, `SET_VRING_ADDR`, `SET_VRING_KICK`, `SET_VRING_CALL`;
///   `SET_VRING_ENABLE 1` per queue (`NEED_REPLY`); `SET_VRING_CALL` per
///   queue again (`vub_start` unmasks).
/// - stop (driver reset or VM shutdown): `SET_VRING_ENABLE 0` per queue
///   (`NEED_REPLY`), then `GET_VRING_BASE` per queue.
/// - reconnect: QEMU 11.1's generic device cannot reconnect in place
///   (`docs/device-spec.md`), so a new QEMU starts against the same
///   backend: a new connection and the start sequence, new guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// Cloud Hypervisor v52 / v53's generic vhost-user device.
    CloudHypervisor,
    /// QEMU 11's `vhost-user-test-device-pci` (vhost-user-base).
    Qemu11,
}

/// The per-queue messages of activation, in the order each script sends
/// them ([`Replay::activate`]).
#[derive(Debug, Clone, Copy)]
enum Ring {
    /// SET_VRING_NUM (the queue's size).
    Num,
    /// SET_VRING_BASE with the index to start from.
    Base(u16),
    /// SET_VRING_ADDR.
    Addr,
    /// SET_VRING_KICK.
    Kick,
    /// SET_VRING_CALL.
    Call,
    /// SET_VRING_ENABLE 1.
    Enable,
}

impl Script {
    /// Both scripts.
    pub const ALL: [Script; 2] = [Script::CloudHypervisor, Script::Qemu11];

    /// A name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Script::CloudHypervisor => "Cloud Hypervisor v53",
            Script::Qemu11 => "QEMU 11",
        }
    }
}

/// What a replay needs to know about the device.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Queues and guest memory.
    pub layout: Layout,
    /// The config space's size: QEMU's `config_size=` (the window QEMU
    /// reads and writes whole); Cloud Hypervisor does not know it.
    pub config_size: u32,
}

/// A VMM frontend being replayed against a device.
pub struct Replay {
    script: Script,
    target: Target,
    /// The connection, guest memory and rings, with the driver's helpers.
    pub vmm: Vmm,
    /// A second handle on the connection's socket (to close it).
    stream: UnixStream,
    acked_protocol: VhostUserProtocolFeatures,
    sent: Vec<String>,
    /// Our end of the backend's request channel (SET_BACKEND_REQ_FD).
    backend_channel: Option<UnixStream>,
    /// QEMU's masked call notifiers (sent at start).
    masked: Vec<EventFd>,
    /// QEMU's copy of the config space (`vdev->config`).
    qemu_config: Vec<u8>,
    /// QEMU: the memory region went out (ADD_MEM_REG) on this connection.
    mem_sent: bool,
    /// Features acked at the last activation.
    acked_features: u64,
    active: bool,
    watchdog: Watchdog,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("script", &self.script)
            .field("active", &self.active)
            .field("sent", &self.sent.len())
            .finish()
    }
}

/// Connect to the device's socket, retrying while it is not listening;
/// replies time out after [`REPLY_TIMEOUT`].
fn connect(dev: &Device) -> UnixStream {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match UnixStream::connect(&dev.socket) {
            Ok(s) => {
                s.set_read_timeout(Some(REPLY_TIMEOUT))
                    .expect("setting the socket's read timeout");
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!(
                "could not connect to {}: {e}; backend log:\n{}",
                dev.socket.display(),
                dev.log()
            ),
        }
    }
}

/// What a VMM's start-up handshake leaves for the replay.
struct Started {
    vmm: Vmm,
    acked_protocol: VhostUserProtocolFeatures,
    /// QEMU: our end of the backend request channel.
    backend_channel: Option<UnixStream>,
    /// QEMU: the masked call notifiers.
    masked: Vec<EventFd>,
}

impl Replay {
    /// Connect to `dev` as `script`'s VMM and run its start-up handshake
    /// (nothing activated yet: the guest has not found the device).
    pub fn start(script: Script, dev: &Device, target: Target) -> Self {
        let stream = connect(dev);
        let handle = stream.try_clone().expect("cloning the socket");
        let watchdog = Watchdog::new();
        watchdog.arm(&handle, format!("{}: start", script.name()));
        let fe = Frontend::from_stream(stream, target.layout.queues as u64);
        let mut sent = Vec::new();
        let started = match script {
            Script::CloudHypervisor => Self::start_cloud_hypervisor(fe, target, &mut sent),
            Script::Qemu11 => Self::start_qemu11(fe, target, &mut sent),
        };
        watchdog.disarm();
        Self {
            script,
            target,
            vmm: started.vmm,
            stream: handle,
            acked_protocol: started.acked_protocol,
            sent,
            backend_channel: started.backend_channel,
            masked: started.masked,
            qemu_config: vec![0; target.config_size as usize],
            mem_sent: false,
            acked_features: 0,
            active: false,
            watchdog: Watchdog::new(),
        }
    }

    /// Cloud Hypervisor's start-up handshake (see the module documentation).
    fn start_cloud_hypervisor(mut fe: Frontend, target: Target, sent: &mut Vec<String>) -> Started {
        let mut log = |m: String| sent.push(m);
        let queues = target.layout.queues;
        log("SET_OWNER".into());
        fe.set_owner().expect("SET_OWNER");
        log("GET_FEATURES".into());
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "without PROTOCOL_FEATURES, Cloud Hypervisor cannot read the config space"
        );
        log("GET_PROTOCOL_FEATURES".into());
        let offered_protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        let acked_protocol = CH_PROTOCOL & offered_protocol;
        log(format!(
            "SET_PROTOCOL_FEATURES({:#x})",
            acked_protocol.bits()
        ));
        fe.set_protocol_features(acked_protocol)
            .expect("SET_PROTOCOL_FEATURES");
        if acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            log("GET_QUEUE_NUM".into());
            let n = fe.get_queue_num().expect("GET_QUEUE_NUM");
            assert!(
                n >= queues as u64,
                "the backend has {n} queues, not {queues}"
            );
        }
        Started {
            vmm: Vmm::assemble(fe, target.layout, 0, offered, offered_protocol),
            acked_protocol,
            backend_channel: None,
            masked: Vec::new(),
        }
    }

    /// QEMU 11's start-up handshake, as the generic vhost-user device
    /// realizes (see the module documentation).
    fn start_qemu11(mut fe: Frontend, target: Target, sent: &mut Vec<String>) -> Started {
        let mut log = |m: String| sent.push(m);
        let queues = target.layout.queues;
        log("GET_FEATURES".into());
        let offered = fe.get_features().expect("GET_FEATURES");
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0,
            "QEMU needs PROTOCOL_FEATURES for config_size"
        );
        log("GET_PROTOCOL_FEATURES".into());
        let offered_protocol = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            offered_protocol.contains(VhostUserProtocolFeatures::CONFIG),
            "QEMU refuses to realize a device with config_size whose backend lacks CONFIG"
        );
        let acked_protocol = offered_protocol;
        log(format!(
            "SET_PROTOCOL_FEATURES({:#x})",
            acked_protocol.bits()
        ));
        fe.set_protocol_features(acked_protocol)
            .expect("SET_PROTOCOL_FEATURES");
        if acked_protocol.contains(VhostUserProtocolFeatures::MQ) {
            log("GET_QUEUE_NUM".into());
            let n = fe.get_queue_num().expect("GET_QUEUE_NUM");
            assert!(
                n >= queues as u64,
                "the backend has {n} queues, not {queues}"
            );
        }
        if acked_protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            log("GET_MAX_MEM_SLOTS".into());
            let slots = fe.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS");
            assert!(slots >= 1, "the backend takes {slots} memory slots");
        }
        let mut backend_channel = None;
        if acked_protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let (ours, theirs) = UnixStream::pair().expect("socketpair");
            let reply = acked_protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
            log(format!(
                "SET_BACKEND_REQ_FD{}",
                if reply { " +NEED_REPLY" } else { "" }
            ));
            if reply {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            fe.set_backend_request_fd(&theirs)
                .expect("SET_BACKEND_REQ_FD");
            fe.set_hdr_flags(VhostUserHeaderFlag::empty());
            backend_channel = Some(ours);
        }
        log("SET_OWNER".into());
        fe.set_owner().expect("SET_OWNER");
        log("GET_FEATURES".into());
        assert_eq!(fe.get_features().expect("GET_FEATURES"), offered);
        let vmm = Vmm::assemble(fe, target.layout, 0, offered, offered_protocol);
        let mut masked = Vec::new();
        for q in 0..queues {
            let m = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            log(format!("SET_VRING_CALL({q}, masked)"));
            vmm.fe.set_vring_call(q, &m).expect("SET_VRING_CALL");
            log(format!("SET_VRING_ERR({q})"));
            vmm.fe
                .set_vring_err(q, &vmm.rings[q].err)
                .expect("SET_VRING_ERR");
            masked.push(m);
        }
        Started {
            vmm,
            acked_protocol,
            backend_channel,
            masked,
        }
    }

    /// The script played.
    pub fn script(&self) -> Script {
        self.script
    }

    /// Every message sent so far, in order (with its arguments).
    pub fn sent(&self) -> &[String] {
        &self.sent
    }

    /// Interrupts the backend raised on queue `q`'s masked notifier, the
    /// call eventfd QEMU hands over at start, before activation (Cloud
    /// Hypervisor has none: always 0).
    pub fn masked_signals(&self, q: usize) -> u64 {
        self.masked.get(q).map_or(0, crate::drain_eventfd)
    }

    /// Fail unless the backend is `running` and its `log` shows no
    /// connection it ended (a message it refused ends the VMM's
    /// connection); the failure lists what was sent.
    pub fn assert_backend_served(&self, running: bool, log: &str) {
        let name = self.script.name();
        assert!(running, "{name}: the backend exited; log:\n{log}");
        assert!(
            !log.contains("connection ended with an error"),
            "{name}: the backend dropped a connection; sent: {:#?}\nlog:\n{log}",
            self.sent
        );
    }

    /// Play the VMM's side of one config change on the backend channel,
    /// as the real VMM does: wait up to [`REPLY_TIMEOUT`] for the backend's
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (empty body), and answer
    /// `answer` (0: done) when it asks (`NEED_REPLY`). Returns whether it
    /// asked. QEMU raises the config interrupt
    /// (`vhost_user_backend_handle_config_change`, then
    /// `virtio_notify_config`), Cloud Hypervisor too (v52+); both answer
    /// when REPLY_ACK was negotiated, which both do.
    pub fn answer_config_change(&mut self, answer: u64) -> Result<bool, String> {
        let ch = self.backend_channel.as_mut().ok_or(
            "no backend channel: BACKEND_REQ not negotiated, or SET_BACKEND_REQ_FD not sent yet",
        )?;
        ch.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut hdr = [0u8; 12];
        ch.read_exact(&mut hdr)
            .map_err(|e| format!("no config change on the backend channel: {e}"))?;
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        if request != u32::from(vhost::vhost_user::message::BackendReq::CONFIG_CHANGE_MSG) {
            return Err(format!(
                "backend request {request}, not CONFIG_CHANGE_MSG (2)"
            ));
        }
        if size != 0 {
            return Err(format!(
                "CONFIG_CHANGE_MSG with a {size}-byte body (it has none)"
            ));
        }
        if flags & 0x3 != 1 || flags & VhostUserHeaderFlag::REPLY.bits() != 0 {
            return Err(format!("CONFIG_CHANGE_MSG with flags {flags:#x}"));
        }
        let need_reply = flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0;
        self.sent.push(format!(
            "<- CONFIG_CHANGE_MSG{}",
            if need_reply { " +NEED_REPLY" } else { "" }
        ));
        if need_reply
            && self
                .acked_protocol
                .contains(VhostUserProtocolFeatures::REPLY_ACK)
        {
            let mut reply = Vec::with_capacity(20);
            for w in [request, 1 | VhostUserHeaderFlag::REPLY.bits(), 8] {
                reply.extend_from_slice(&w.to_ne_bytes());
            }
            reply.extend_from_slice(&answer.to_ne_bytes());
            ch.write_all(&reply).map_err(|e| e.to_string())?;
        }
        Ok(need_reply)
    }

    /// The protocol features the VMM acknowledged.
    pub fn acked_protocol(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol
    }

    fn watch(&self, step: &str) {
        self.watchdog
            .arm(&self.stream, format!("{}: {step}", self.script.name()));
    }

    fn log(&mut self, m: impl Into<String>) {
        self.sent.push(m.into());
    }

    fn has(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol.contains(f)
    }

    /// Run `f` with `NEED_REPLY` on every message if the VMM asks for a
    /// reply there (QEMU, with REPLY_ACK); Cloud Hypervisor sets it on
    /// every message once REPLY_ACK is negotiated.
    fn with_reply<T>(&mut self, f: impl FnOnce(&mut Frontend) -> T) -> T {
        let qemu_reply =
            self.script == Script::Qemu11 && self.has(VhostUserProtocolFeatures::REPLY_ACK);
        if qemu_reply {
            self.vmm.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let out = f(&mut self.vmm.fe);
        if qemu_reply {
            self.vmm.fe.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        out
    }

    /// A guest's read of `len` config bytes at `offset`, as the VMM turns
    /// it into vhost-user: the bytes the guest sees, or the frontend's
    /// error (for Cloud Hypervisor, a VMM panic; an error reply makes the
    /// watchdog close the connection after [`REPLY_TIMEOUT`]).
    pub fn guest_read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        self.watch("guest_read_config");
        let out = self.guest_read_config_inner(offset, len);
        self.watchdog.disarm();
        out
    }

    fn guest_read_config_inner(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        match self.script {
            Script::CloudHypervisor => {
                self.log(format!("GET_CONFIG({offset:#x}, {len})"));
                let zeros = vec![0u8; len as usize];
                self.vmm
                    .fe
                    .get_config(offset, len, VhostUserConfigFlags::empty(), &zeros)
                    .map(|(_, payload)| payload)
                    .map_err(|e| e.to_string())
            }
            Script::Qemu11 => {
                let size = self.target.config_size;
                if u64::from(offset) + u64::from(len) > u64::from(size) {
                    // virtio_config_read*: out of range, all ones, no message.
                    return Ok(vec![0xff; len as usize]);
                }
                self.log(format!("GET_CONFIG(0x0, {size})"));
                let zeros = vec![0u8; size as usize];
                let (_, payload) = self
                    .vmm
                    .fe
                    .get_config(0, size, VhostUserConfigFlags::empty(), &zeros)
                    .map_err(|e| e.to_string())?;
                self.qemu_config = payload;
                Ok(self.qemu_config[offset as usize..(offset + len) as usize].to_vec())
            }
        }
    }

    /// A guest's config write of `data` at `offset`, as the VMM forwards
    /// it: `Ok` if the backend acknowledged it (or QEMU dropped it as out
    /// of range).
    pub fn guest_write_config(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        self.watch("guest_write_config");
        let out = self.guest_write_config_inner(offset, data);
        self.watchdog.disarm();
        out
    }

    fn guest_write_config_inner(&mut self, offset: u32, data: &[u8]) -> Result<(), String> {
        match self.script {
            Script::CloudHypervisor => {
                self.log(format!("SET_CONFIG({offset:#x}, {}, WRITABLE)", data.len()));
                self.vmm
                    .fe
                    .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
                    .map_err(|e| e.to_string())
            }
            Script::Qemu11 => {
                let size = self.target.config_size as usize;
                let (start, end) = (offset as usize, offset as usize + data.len());
                if end > size {
                    return Ok(()); // virtio_config_write*: ignored
                }
                self.qemu_config[start..end].copy_from_slice(data);
                let window = self.qemu_config.clone();
                self.log(format!("SET_CONFIG(0x0, {size}, 0) +NEED_REPLY"));
                self.with_reply(|fe| fe.set_config(0, VhostUserConfigFlags::empty(), &window))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The driver set DRIVER_OK having acknowledged `driver_features`
    /// (virtio bits the guest saw offered): the VMM hands the memory and
    /// the rings to the backend. The rings start from their available
    /// index in guest memory (Cloud Hypervisor) or from 0 (QEMU, a fresh
    /// start).
    pub fn activate(&mut self, driver_features: u64) {
        self.watch("activate");
        self.activate_inner(driver_features);
        self.watchdog.disarm();
    }

    fn activate_inner(&mut self, driver_features: u64) {
        assert!(!self.active, "{}: already active", self.script.name());
        let features = driver_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.acked_features = features;
        self.vmm.features = features;
        self.log(format!("SET_FEATURES({features:#x})"));
        self.vmm.fe.set_features(features).expect("SET_FEATURES");
        let queues = self.target.layout.queues;
        match self.script {
            Script::CloudHypervisor => {
                let info = self.vmm.region_info();
                self.log("SET_MEM_TABLE");
                self.vmm.fe.set_mem_table(&[info]).expect("SET_MEM_TABLE");
                for q in 0..queues {
                    self.ring(q, Ring::Num);
                }
                for q in 0..queues {
                    // The rings resume from the available index in memory.
                    let base = self.vmm.load_u16(self.target.layout.avail_ring_addr(q) + 2);
                    for m in [Ring::Addr, Ring::Base(base), Ring::Call, Ring::Kick] {
                        self.ring(q, m);
                    }
                }
                for q in 0..queues {
                    self.ring(q, Ring::Enable);
                }
                if self.has(VhostUserProtocolFeatures::BACKEND_REQ) {
                    let (ours, theirs) = UnixStream::pair().expect("socketpair");
                    self.log("SET_BACKEND_REQ_FD");
                    self.vmm
                        .fe
                        .set_backend_request_fd(&theirs)
                        .expect("SET_BACKEND_REQ_FD");
                    self.backend_channel = Some(ours);
                }
            }
            Script::Qemu11 => {
                if !self.mem_sent {
                    let info = self.vmm.region_info();
                    if self.has(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                        self.log("ADD_MEM_REG +NEED_REPLY");
                        self.with_reply(|fe| fe.add_mem_region(&info))
                            .expect("ADD_MEM_REG");
                    } else {
                        self.log("SET_MEM_TABLE +NEED_REPLY");
                        self.with_reply(|fe| fe.set_mem_table(&[info]))
                            .expect("SET_MEM_TABLE");
                    }
                    self.mem_sent = true;
                }
                for q in 0..queues {
                    let base = self.vmm.avail_idx(q);
                    for m in [
                        Ring::Num,
                        Ring::Base(base),
                        Ring::Addr,
                        Ring::Kick,
                        Ring::Call,
                    ] {
                        self.ring(q, m);
                    }
                }
                for q in 0..queues {
                    self.ring(q, Ring::Enable);
                }
                // The guest notifiers, unmasked once the rings run.
                for q in 0..queues {
                    self.ring(q, Ring::Call);
                }
            }
        }
        self.active = true;
    }

    /// Send one per-queue activation message for queue `q` (logged as
    /// sent). SET_VRING_ENABLE goes with NEED_REPLY where the VMM asks for
    /// one (QEMU; Cloud Hypervisor sets it on every message anyway).
    fn ring(&mut self, q: usize, m: Ring) {
        match m {
            Ring::Num => {
                let size = self.target.layout.queue_size;
                self.log(format!("SET_VRING_NUM({q}, {size})"));
                self.vmm.fe.set_vring_num(q, size).expect("SET_VRING_NUM");
            }
            Ring::Base(base) => {
                self.log(format!("SET_VRING_BASE({q}, {base})"));
                self.vmm.fe.set_vring_base(q, base).expect("SET_VRING_BASE");
            }
            Ring::Addr => {
                let config = self.vmm.vring_config(q);
                self.log(format!("SET_VRING_ADDR({q})"));
                self.vmm
                    .fe
                    .set_vring_addr(q, &config)
                    .expect("SET_VRING_ADDR");
            }
            Ring::Kick => {
                self.log(format!("SET_VRING_KICK({q})"));
                self.vmm
                    .fe
                    .set_vring_kick(q, &self.vmm.rings[q].kick)
                    .expect("SET_VRING_KICK");
            }
            Ring::Call => {
                self.log(format!("SET_VRING_CALL({q})"));
                self.vmm
                    .fe
                    .set_vring_call(q, &self.vmm.rings[q].call)
                    .expect("SET_VRING_CALL");
            }
            Ring::Enable => {
                let reply = if self.script == Script::Qemu11 {
                    " +NEED_REPLY"
                } else {
                    ""
                };
                self.log(format!("SET_VRING_ENABLE({q}, 1){reply}"));
                self.with_reply(|fe| fe.set_vring_enable(q, true))
                    .expect("SET_VRING_ENABLE");
            }
        }
    }

    /// The driver reset the device (or the VM shuts down): the VMM stops
    /// every ring. Returns each queue's next available index as the
    /// backend reported it (GET_VRING_BASE).
    pub fn reset(&mut self) -> Vec<u32> {
        self.watch("reset");
        let out = self.reset_inner();
        self.watchdog.disarm();
        out
    }

    fn reset_inner(&mut self) -> Vec<u32> {
        assert!(self.active, "{}: not active", self.script.name());
        let queues = self.target.layout.queues;
        let mut bases = Vec::with_capacity(queues);
        match self.script {
            Script::CloudHypervisor => {
                for q in 0..queues {
                    self.log(format!("SET_VRING_ENABLE({q}, 0)"));
                    self.vmm
                        .fe
                        .set_vring_enable(q, false)
                        .expect("SET_VRING_ENABLE 0");
                    self.log(format!("GET_VRING_BASE({q})"));
                    bases.push(self.vmm.fe.get_vring_base(q).expect("GET_VRING_BASE"));
                }
            }
            Script::Qemu11 => {
                for q in 0..queues {
                    self.log(format!("SET_VRING_ENABLE({q}, 0) +NEED_REPLY"));
                    self.with_reply(|fe| fe.set_vring_enable(q, false))
                        .expect("SET_VRING_ENABLE 0");
                }
                for q in 0..queues {
                    self.log(format!("GET_VRING_BASE({q})"));
                    bases.push(self.vmm.fe.get_vring_base(q).expect("GET_VRING_BASE"));
                }
            }
        }
        self.active = false;
        bases
    }

    /// The driver sets the queues up again after a reset (fresh rings from
    /// index 0) and sets DRIVER_OK: [`activate`](Self::activate) on the
    /// same connection.
    pub fn reactivate(&mut self, driver_features: u64) {
        for q in 0..self.target.layout.queues {
            self.vmm.clear_ring(q);
        }
        self.activate(driver_features);
    }

    /// The connection ends and the VMM connects again, each as it does:
    ///
    /// - Cloud Hypervisor, active: its reconnect path (the backend hung up;
    ///   here the replay hangs up, so that the same backend listens
    ///   again): a new connection, `SET_OWNER`, `GET_FEATURES`,
    ///   `SET_PROTOCOL_FEATURES`, and the activation sequence over the same
    ///   guest memory and rings, from their available index.
    /// - QEMU 11: a new QEMU process (the old one exited): a new
    ///   connection, the start sequence, new guest memory; nothing active.
    pub fn reconnect(&mut self, dev: &Device) {
        let old = dev.socket_id();
        let _ = self.stream.shutdown(Shutdown::Both);
        assert!(
            dev.wait_relisten(old, CONNECT_TIMEOUT),
            "{}: the backend did not listen again after the VMM left; log:\n{}",
            self.script.name(),
            dev.log()
        );
        match self.script {
            Script::CloudHypervisor => {
                assert!(
                    self.active,
                    "Cloud Hypervisor reconnects only an active device"
                );
                let stream = connect(dev);
                self.stream = stream.try_clone().expect("cloning the socket");
                self.watch("reconnect");
                let mut fe = Frontend::from_stream(stream, self.target.layout.queues as u64);
                self.log("-- reconnect --");
                self.log("SET_OWNER");
                fe.set_owner().expect("SET_OWNER");
                self.log("GET_FEATURES");
                fe.get_features().expect("GET_FEATURES");
                self.log(format!(
                    "SET_PROTOCOL_FEATURES({:#x})",
                    self.acked_protocol.bits()
                ));
                fe.set_protocol_features(self.acked_protocol)
                    .expect("SET_PROTOCOL_FEATURES");
                if self.has(VhostUserProtocolFeatures::REPLY_ACK) {
                    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                }
                self.vmm.fe = fe;
                self.watchdog.disarm();
                self.active = false;
                let driver_features =
                    self.acked_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
                self.activate(driver_features);
            }
            Script::Qemu11 => {
                let mut sent = std::mem::take(&mut self.sent);
                *self = Replay::start(self.script, dev, self.target);
                sent.push("-- new QEMU --".into());
                sent.append(&mut self.sent);
                self.sent = sent;
            }
        }
    }
}

/// What became of a request the backend cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An error reply: a `GET_CONFIG` reply with an empty payload.
    ErrorReply,
    /// A reply with this many payload bytes (the request was served).
    Reply(u32),
    /// The backend closed the connection without replying.
    Closed,
    /// No answer within [`REPLY_TIMEOUT`]: the backend hung.
    Hung,
}

/// A `GET_CONFIG` outside the vhost-user config window (`offset + size >
/// 0x1000`), sent raw on a fresh connection after the minimal handshake
/// (`GET_FEATURES`, `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES` with
/// `CONFIG`). Neither VMM sends one (QEMU's window is at most 256 bytes
/// from 0; the vhost crate, hence Cloud Hypervisor, refuses it before
/// sending), so this is a buggy frontend; the connection is closed
/// afterwards.
pub fn config_read_outside_window(dev: &Device, offset: u32, size: u32) -> Refusal {
    let stream = connect(dev);
    let mut raw = stream.try_clone().expect("cloning the socket");
    let mut fe = Frontend::from_stream(stream, 1);
    let offered = fe.get_features().expect("GET_FEATURES");
    assert_ne!(
        offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let offered = fe.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(offered.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG)
        .expect("SET_PROTOCOL_FEATURES");
    // Header: request, flags (version 1), payload size; then the
    // VhostUserConfig body (offset, size, flags) and `size` bytes.
    const GET_CONFIG: u32 = 24;
    let mut msg = Vec::new();
    for w in [GET_CONFIG, 0x1, 12 + size, offset, size, 0] {
        msg.extend_from_slice(&w.to_le_bytes());
    }
    msg.resize(msg.len() + size as usize, 0);
    raw.write_all(&msg).expect("sending the raw GET_CONFIG");
    let mut hdr = [0u8; 12];
    let outcome = match raw.read_exact(&mut hdr) {
        Ok(()) => {
            let word = |i: usize| u32::from_le_bytes(hdr[4 * i..4 * i + 4].try_into().unwrap());
            assert_eq!(word(0), GET_CONFIG, "a reply to another request");
            let mut body = vec![0u8; word(2) as usize];
            raw.read_exact(&mut body).expect("the reply's body");
            let payload = word(2).saturating_sub(12);
            if payload == 0 {
                Refusal::ErrorReply
            } else {
                Refusal::Reply(payload)
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Refusal::Hung
        }
        Err(_) => Refusal::Closed,
    };
    let _ = raw.shutdown(Shutdown::Both);
    outcome
}
