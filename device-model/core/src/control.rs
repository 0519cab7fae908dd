//! The host control plane: a Unix socket (mode 0600) speaking one JSON
//! request and one JSON reply per line (`docs/device-spec.md`, "Control
//! plane", and `docs/device-framework.md`).
//!
//! One thread serves every client through an [`event_manager::EventManager`];
//! requests act on the shared [`Engine`] and then kick the backend's worker
//! (an eventfd), so all virtqueue work stays on the vhost-user worker thread.
//! The same thread runs the device's timer ([`VirtioDevice::tick`]).
//!
//! Requests the core answers for every device (`op`): `ping`, `stats`,
//! `interrupt_mode`, `reset`, `needs_reset`, `config`, `fault`,
//! `config_change`. Any other
//! `op` goes to [`VirtioDevice::control`]. A reply is one JSON object:
//! `ok`, `error` when `ok` is false, the request's own fields, and the
//! device's [`VirtioDevice::reply_fields`].

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{Fields, VirtioDevice};
use crate::engine::{contain_panic, Engine};
use crate::faults::Fault;
use crate::irq::IrqMode;

/// Longest request line accepted, in bytes (a 4 MiB injection, hex encoded,
/// plus framing). Longer lines get an error and the connection is closed.
pub const MAX_LINE: usize = 8 << 20 | 4096;

/// The requests the core answers for every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum CoreRequest {
    /// Liveness check.
    Ping {},
    /// The counters, the core's and the device's, as `stats`.
    Stats {},
    /// Set the interrupt mode of a queue (a queue name or `all`).
    InterruptMode {
        /// A queue name or `all`.
        queue: String,
        /// The mode, e.g. `{"mode":"coalesce","count":4,"usecs":500}`.
        irq: IrqMode,
    },
    /// Drop the device's data ([`VirtioDevice::reset`]; counters are kept).
    Reset {},
    /// Declare the device broken (DEVICE_NEEDS_RESET): it stops serving its
    /// queues until the driver resets them.
    NeedsReset {},
    /// The config space as the driver would read it now, hex, as `data`.
    Config {},
    /// Inject a fault (see [`Fault`]), e.g.
    /// `{"op":"fault","fault":{"kind":"drop_interrupts","queue":"rx","count":2}}`.
    Fault {
        /// The fault.
        fault: Fault,
    },
    /// Raise a config-change interrupt with the config as it is
    /// ([`crate::Core::notify_config_change`]). With `wait` (the default)
    /// the reply comes once the change was delivered or failed (at most
    /// the acknowledgement timeout, 2 s) and says how, as `delivery`
    /// (`acked`, `sent`, `refused`, `timeout`, `not_sent`); without, as
    /// soon as it is queued. `ticket` numbers it.
    ConfigChange {
        /// Wait for the outcome (default true).
        #[serde(default = "yes")]
        wait: bool,
    },
    /// Switch the device trace ([`crate::trace`]) on (with a ring of
    /// `capacity` events, default [`crate::trace::DEFAULT_CAPACITY`];
    /// what was recorded before is discarded) or off (what was recorded
    /// stays for `trace_dump`).
    Trace {
        /// On or off.
        on: bool,
        /// Ring size in events, when switching on.
        #[serde(default)]
        capacity: Option<usize>,
    },
    /// The recorded events, oldest first, as `events`; `dropped` (events
    /// lost, oldest first, because the ring was full), `on`, `capacity`.
    /// Empties the ring.
    TraceDump {},
}

fn yes() -> bool {
    true
}

/// The `op` names of [`CoreRequest`].
pub const CORE_OPS: &[&str] = &[
    "ping",
    "stats",
    "interrupt_mode",
    "reset",
    "needs_reset",
    "config",
    "fault",
    "config_change",
    "trace",
    "trace_dump",
];

/// A reply as the core writes it: `ok`, `error`, and the other fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The other fields.
    #[serde(flatten)]
    pub fields: Fields,
}

impl Reply {
    fn ok(fields: Fields) -> Self {
        Self {
            ok: true,
            error: None,
            fields,
        }
    }

    fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            fields: Fields::new(),
        }
    }
}

/// What the control plane acts on: the device, the eventfd that asks the
/// vhost-user worker for a pass over the queues, and the device's timer.
#[derive(Debug)]
pub struct Plane<D> {
    /// The device and its core.
    pub engine: Arc<Mutex<Engine<D>>>,
    /// Fired when the queues need a pass.
    pub kick: EventFd,
    /// The device's timer ([`crate::Core::set_tick`]).
    pub tick_timer: Arc<Mutex<TimerFd>>,
}

impl<D: VirtioDevice> Plane<D> {
    /// A plane around `engine`, kicking the worker through `kick`; attaches
    /// the device's timer to the engine's core.
    pub fn new(engine: Arc<Mutex<Engine<D>>>, kick: EventFd) -> io::Result<Self> {
        let tick_timer = Arc::new(Mutex::new(crate::backend::nonblocking_timer()?));
        {
            let mut eng = engine.lock().unwrap_or_else(|e| e.into_inner());
            eng.core.attach_tick_timer(tick_timer.clone());
            // A period the device chose before the timer existed.
            let period = eng.core.tick_period();
            eng.core.set_tick(period).map_err(io::Error::other)?;
        }
        Ok(Self {
            engine,
            kick,
            tick_timer,
        })
    }

    /// The device's timer fired: tell the device how many times (a late
    /// tick counts several, so a rate is kept), kick the worker if the
    /// device says there is new data.
    pub fn tick(&self) {
        let ticks = self
            .tick_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait()
            .unwrap_or(0)
            .min(1000);
        if ticks == 0 {
            return;
        }
        let got = contain_panic(&self.engine, "the device's timer", || {
            let mut eng = self.engine.lock().unwrap_or_else(|e| e.into_inner());
            let Engine { device, core } = &mut *eng;
            device.tick(ticks, core)
        })
        .unwrap_or(false);
        if got {
            let _ = self.kick.write(1);
        }
    }

    /// Answer one request line (a JSON object).
    pub fn handle_line(&self, line: &[u8]) -> Reply {
        match serde_json::from_slice::<Value>(line) {
            Ok(v) => self.handle(&v),
            Err(e) => Reply::error(format!("bad request: {e}")),
        }
    }

    /// Answer one request.
    pub fn handle(&self, request: &Value) -> Reply {
        let Some(op) = request.get("op").and_then(Value::as_str) else {
            return Reply::error(
                "bad request: no \"op\" field (a JSON object with \"op\" is expected)",
            );
        };
        // A panic in the device's code fails this request and declares the
        // device broken, but the control plane (this thread) lives on.
        let reply = contain_panic(&self.engine, "a control request", || {
            let mut eng = self.engine.lock().unwrap_or_else(|e| e.into_inner());
            eng.core.trace().record(|| crate::trace::EventKind::Control { op: op.into() });
            let mut reply = if CORE_OPS.contains(&op) {
                match CoreRequest::deserialize(request) {
                    Ok(req) => core_request(&mut eng, req),
                    Err(e) => Reply::error(format!("bad request: {e}")),
                }
            } else {
                let Engine { device, core } = &mut *eng;
                match device.control(op, request, core) {
                    Some(Ok(fields)) => Reply::ok(fields),
                    Some(Err(e)) => Reply::error(format!("{op}: {e}")),
                    None => Reply::error(format!(
                        "bad request: unknown op {op:?} (the core knows {}; see the device's documentation for its own)",
                        CORE_OPS.join(", ")
                    )),
                }
            };
            reply.fields.extend(eng.device.reply_fields());
            reply
        })
        .unwrap_or_else(|| {
            Reply::error(format!(
                "{op}: the device panicked; it is declared broken (NEEDS_RESET) until the driver resets it"
            ))
        });
        let mut reply = reply;
        if reply.ok && op == "config_change" {
            self.wait_config_change(request, &mut reply);
        }
        if reply.ok {
            if let Err(e) = self.kick.write(1) {
                warn!(error = %e, "could not kick the device worker");
            }
        }
        reply
    }
}

impl<D: VirtioDevice> Plane<D> {
    /// For `config_change` with `wait`: wait for the outcome, with the
    /// device's lock released (the vhost-user thread may need it to answer
    /// the VMM meanwhile).
    fn wait_config_change(&self, request: &Value, reply: &mut Reply) {
        let wait = request.get("wait").and_then(Value::as_bool).unwrap_or(true);
        let Some(ticket) = reply.fields.get("ticket").and_then(Value::as_u64) else {
            return;
        };
        if !wait {
            return;
        }
        let cc = self
            .engine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .core
            .config_changes();
        let timeout = crate::config_change::REPLY_TIMEOUT + Duration::from_secs(1);
        match cc.wait(ticket, timeout) {
            Some(d) => {
                reply.fields.insert(
                    "delivery".into(),
                    serde_json::to_value(d).unwrap_or_default(),
                );
            }
            None => {
                reply
                    .fields
                    .insert("delivery".into(), Value::String("pending".into()));
            }
        }
    }
}

fn core_request<D: VirtioDevice>(eng: &mut Engine<D>, req: CoreRequest) -> Reply {
    let mut fields = Fields::new();
    match req {
        CoreRequest::Ping {} => {}
        CoreRequest::Stats {} => {
            fields.insert("stats".into(), Value::Object(eng.stats_fields()));
        }
        CoreRequest::InterruptMode { queue, irq } => {
            let queues = match eng.core.resolve_queues(&queue) {
                Ok(q) => q,
                Err(e) => return Reply::error(format!("interrupt_mode: {e}")),
            };
            if let Err(e) = queues
                .iter()
                .try_for_each(|&q| eng.core.set_irq_mode(q, irq))
            {
                return Reply::error(format!("interrupt_mode: {e}"));
            }
        }
        CoreRequest::Reset {} => {
            let Engine { device, core } = eng;
            device.reset(core);
        }
        CoreRequest::NeedsReset {} => {
            eng.core.set_needs_reset(true);
            warn!("device declared broken (NEEDS_RESET) from the control plane");
        }
        CoreRequest::Config {} => {
            fields.insert(
                "data".into(),
                Value::String(hex::encode(eng.config_space())),
            );
        }
        CoreRequest::Fault { fault } => {
            let queues = match fault.queue() {
                Some(sel) => match eng.core.resolve_queues(&sel.0) {
                    Ok(q) => q,
                    Err(e) => return Reply::error(format!("fault: {e}")),
                },
                None => Vec::new(),
            };
            if let Err(e) = eng
                .core
                .apply_fault(&fault, &queues, std::time::Instant::now())
            {
                return Reply::error(format!("fault: {e}"));
            }
            info!(?fault, "fault injected");
        }
        CoreRequest::ConfigChange { .. } => match eng.core.config_changes().raise() {
            Ok(ticket) => {
                fields.insert("ticket".into(), ticket.into());
            }
            Err(e) => return Reply::error(format!("config_change: {e}")),
        },
        CoreRequest::Trace { on, capacity } => {
            let trace = eng.core.trace();
            if on {
                let capacity = capacity.unwrap_or(crate::trace::DEFAULT_CAPACITY);
                if let Err(e) = trace.start(capacity) {
                    return Reply::error(format!("trace: {e}"));
                }
                info!(capacity, "device trace on");
            } else {
                trace.stop();
                info!("device trace off");
            }
        }
        CoreRequest::TraceDump {} => {
            if let Value::Object(dump) =
                serde_json::to_value(eng.core.trace().dump()).unwrap_or_default()
            {
                fields.extend(dump);
            }
        }
    }
    Reply::ok(fields)
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline: each read scans
    /// only what it added, so a long request costs linear time.
    scanned: usize,
}

/// The control socket's event subscriber: the listener and its clients.
pub struct ControlServer<D> {
    listener: UnixListener,
    clients: HashMap<RawFd, Client>,
    plane: Plane<D>,
}

impl<D> std::fmt::Debug for ControlServer<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl<D: VirtioDevice> ControlServer<D> {
    /// Bind the control socket at `path` (replacing a stale one), mode 0600.
    pub fn bind(path: &Path, engine: Arc<Mutex<Engine<D>>>, kick: EventFd) -> io::Result<Self> {
        crate::sockpath::check(path, "the control socket")?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            clients: HashMap::new(),
            plane: Plane::new(engine, kick)?,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Reads happen only when epoll says the socket is
                    // readable; replies are written blocking, with a timeout
                    // so a stuck client cannot hold the control plane.
                    if let Err(e) = stream.set_write_timeout(Some(Duration::from_secs(5))) {
                        warn!(error = %e, "control client setup failed");
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) =
                        ops.add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP))
                    {
                        warn!(error = ?e, "could not watch a control client");
                        continue;
                    }
                    debug!(fd, "control client connected");
                    self.clients.insert(
                        fd,
                        Client {
                            stream,
                            buf: Vec::new(),
                            scanned: 0,
                        },
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    return;
                }
            }
        }
    }

    /// Read what the client sent and answer every complete line. Returns
    /// false when the client is gone.
    fn serve_client(&mut self, fd: RawFd) -> bool {
        let Some(client) = self.clients.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 64 * 1024];
        let n = match client.stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                return true
            }
            Err(_) => return false,
        };
        client.buf.extend_from_slice(&chunk[..n]);
        while let Some(off) = client.buf[client.scanned..]
            .iter()
            .position(|&b| b == b'\n')
        {
            let pos = client.scanned + off;
            let reply = self.plane.handle_line(&client.buf[..pos]);
            client.buf.drain(..=pos);
            client.scanned = 0;
            if write_line(&mut client.stream, &reply).is_err() {
                return false;
            }
        }
        client.scanned = client.buf.len();
        if client.buf.len() > MAX_LINE {
            let _ = write_line(
                &mut client.stream,
                &Reply::error(format!("request line longer than {MAX_LINE} bytes")),
            );
            return false;
        }
        true
    }
}

fn write_line(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let mut out = serde_json::to_vec(reply).map_err(io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out)
}

impl<D: VirtioDevice> MutEventSubscriber for ControlServer<D> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            warn!(error = ?e, "could not watch the control socket");
        }
        let timer = self
            .plane
            .tick_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(timer, EventSet::IN)) {
            warn!(error = ?e, "could not watch the device timer");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        if fd
            == self
                .plane
                .tick_timer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_raw_fd()
        {
            self.plane.tick();
            return;
        }
        // A hang-up with unread bytes still reports IN: serve what is there;
        // the read that returns 0 tells the client is gone.
        if !self.serve_client(fd) {
            if let Some(client) = self.clients.remove(&fd) {
                let _ = ops.remove(Events::new(
                    &client.stream,
                    EventSet::IN | EventSet::READ_HANG_UP,
                ));
                debug!(fd, "control client gone");
            }
        }
    }
}

/// Start the control plane on its own thread.
pub fn spawn<D: VirtioDevice>(
    path: PathBuf,
    engine: Arc<Mutex<Engine<D>>>,
    kick: EventFd,
) -> io::Result<std::thread::JoinHandle<()>> {
    let server = ControlServer::bind(&path, engine, kick)?;
    info!(socket = %path.display(), "control plane listening");
    std::thread::Builder::new()
        .name("vdevlab-control".into())
        .spawn(move || {
            let mut manager: EventManager<ControlServer<D>> = match EventManager::new() {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = ?e, "control plane could not start");
                    return;
                }
            };
            manager.add_subscriber(server);
            loop {
                if let Err(e) = manager.run() {
                    warn!(error = ?e, "control plane event loop error");
                }
            }
        })
}

/// A client of any device's control plane. Devices wrap it with typed
/// helpers for their own requests.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connect to the control socket at `path`.
    /// A path too long for a socket address is resolved first: a link to
    /// the socket (a run folder's `ctl.sock`) may be deeper than the socket.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let resolved;
        let path = match crate::sockpath::check(path, "the control socket") {
            Ok(()) => path,
            Err(e) => match std::fs::canonicalize(path) {
                Ok(real) if crate::sockpath::check(&real, "").is_ok() => {
                    resolved = real;
                    &resolved
                }
                _ => return Err(e),
            },
        };
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the control socket {}: {e} (is the device running?)",
                    path.display()
                ),
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Send one request (anything that serialises to a JSON object with an
    /// `op`) and parse its reply as `R` (for example [`Reply`]).
    pub fn call<Q: Serialize + ?Sized, R: DeserializeOwned>(&mut self, req: &Q) -> io::Result<R> {
        let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "control socket closed",
            ));
        }
        serde_json::from_str(&reply).map_err(io::Error::other)
    }

    /// Send one request and return its reply's fields; a refusal is an error
    /// carrying the device's message.
    pub fn checked<Q: Serialize + ?Sized>(&mut self, req: &Q) -> io::Result<Fields> {
        let reply: Reply = self.call(req)?;
        if reply.ok {
            Ok(reply.fields)
        } else {
            Err(io::Error::other(
                reply.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }

    /// The device's counters (the core's and its own) as one JSON object.
    pub fn stats_fields(&mut self) -> io::Result<Fields> {
        let mut f = self.checked(&CoreRequest::Stats {})?;
        match f.remove("stats") {
            Some(Value::Object(m)) => Ok(m),
            _ => Err(io::Error::other("stats reply without stats")),
        }
    }
}
