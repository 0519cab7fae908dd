//! The host control plane: a Unix socket (mode 0600) speaking one JSON
//! request and one JSON reply per line. The protocol is documented in
//! `docs/device-spec.md` ("Control plane").
//!
//! One thread serves every client through an [`event_manager::EventManager`];
//! requests act on the shared [`QwDevice`] and then kick the backend's worker
//! (an eventfd), so all virtqueue work stays on the vhost-user worker thread.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{QwDevice, Stats};
use crate::irq::IrqMode;
use crate::sources::SourceConfig;
use crate::spec::{RX_QUEUE, TX_QUEUE};
use vmm_sys_util::timerfd::TimerFd;

/// Longest request line accepted, in bytes (a 4 MiB injection, hex encoded,
/// plus framing). Longer lines get an error and the connection is closed.
pub const MAX_LINE: usize = 8 << 20 | 4096;

/// A control-plane request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness check.
    Ping {},
    /// Queue bytes (hex) for delivery to the driver.
    Inject {
        /// The bytes, hex encoded.
        data: String,
    },
    /// Take captured transmit bytes (what the driver wrote), oldest first.
    Capture {
        /// At most this many bytes (default: all).
        #[serde(default)]
        max: Option<usize>,
    },
    /// The device's counters and buffer levels.
    Stats {},
    /// Set the interrupt mode of a queue (`rx`, `tx` or `all`).
    InterruptMode {
        /// `rx`, `tx` or `all`.
        queue: String,
        /// The mode, e.g. `{"mode":"coalesce","count":4,"usecs":500}`.
        irq: IrqMode,
    },
    /// Drop the receive FIFO and the transmit capture (counters are kept).
    Reset {},
    /// Choose the receive source: `{"kind":"inject"}` (host injection only),
    /// `{"kind":"generator","bytes":N,"period_us":T,"seed":S}` or
    /// `{"kind":"file","path":P,"rate_bytes_per_sec":R}`.
    Source {
        /// The source.
        source: SourceConfig,
    },
    /// Declare the device broken (status NEEDS_RESET in config space): it
    /// stops serving its queues until the driver resets them.
    NeedsReset {},
    /// The config space as the driver would read it now, hex.
    Config {},
    /// Inject a fault (see `crate::faults::Fault`), e.g.
    /// `{"op":"fault","fault":{"kind":"drop_interrupts","queue":"rx","count":2}}`.
    Fault {
        /// The fault.
        fault: crate::faults::Fault,
    },
}

/// A control-plane reply. `ok` says whether the request succeeded; the other
/// fields appear when the request produces them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `inject`: bytes accepted (the rest did not fit the receive FIFO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted: Option<usize>,
    /// `capture`: the bytes, hex encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// `stats`: the counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Bytes waiting in the receive FIFO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_pending: Option<usize>,
    /// Bytes waiting in the transmit capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_captured: Option<usize>,
}

impl Response {
    fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Self::default()
        }
    }
}

/// What the control plane acts on: the device, the eventfd that asks the
/// vhost-user worker for a pass over the queues, and the receive source's
/// timer.
#[derive(Debug)]
pub struct Plane {
    /// The device.
    pub device: Arc<Mutex<QwDevice>>,
    /// Fired when the queues need a pass (data injected, capture drained).
    pub kick: EventFd,
    /// Ticks the receive source (generator or file).
    pub source_timer: Mutex<TimerFd>,
}

impl Plane {
    /// A plane around `device`, kicking the worker through `kick`.
    pub fn new(device: Arc<Mutex<QwDevice>>, kick: EventFd) -> io::Result<Self> {
        Ok(Self {
            device,
            kick,
            source_timer: Mutex::new(crate::backend::nonblocking_timer()?),
        })
    }

    /// One tick of the source timer: pump the source, kick the worker if
    /// bytes arrived. Several expirations (a late tick) pump several times,
    /// so a generator keeps its rate.
    pub fn source_tick(&self) {
        let ticks = self
            .source_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait()
            .unwrap_or(0)
            .min(1000);
        let mut got = false;
        {
            let mut dev = self.device.lock().unwrap_or_else(|e| e.into_inner());
            for _ in 0..ticks {
                got |= dev.pump_source();
            }
        }
        if got {
            let _ = self.kick.write(1);
        }
    }
}

/// Apply one request to the device.
pub fn handle_request(plane: &Plane, req: Request) -> Response {
    let kick = &plane.kick;
    let mut dev = plane.device.lock().unwrap_or_else(|e| e.into_inner());
    let mut resp = match req {
        Request::Ping {} => Response {
            ok: true,
            ..Response::default()
        },
        Request::Inject { data } => match hex::decode(&data) {
            Ok(bytes) => {
                let accepted = dev.inject(&bytes);
                if accepted < bytes.len() {
                    warn!(
                        offered = bytes.len(),
                        accepted, "receive FIFO full; injection partly refused"
                    );
                }
                Response {
                    ok: true,
                    accepted: Some(accepted),
                    ..Response::default()
                }
            }
            Err(e) => Response::error(format!("inject: data is not valid hex: {e}")),
        },
        Request::Capture { max } => Response {
            ok: true,
            data: Some(hex::encode(dev.take_capture(max.unwrap_or(usize::MAX)))),
            ..Response::default()
        },
        Request::Stats {} => Response {
            ok: true,
            stats: Some(dev.stats()),
            ..Response::default()
        },
        Request::InterruptMode { queue, irq } => {
            let queues: &[u16] = match queue.as_str() {
                "rx" => &[RX_QUEUE],
                "tx" => &[TX_QUEUE],
                "all" => &[RX_QUEUE, TX_QUEUE],
                _ => &[],
            };
            if queues.is_empty() {
                Response::error(format!(
                    "interrupt_mode: queue must be rx, tx or all, not {queue:?}"
                ))
            } else {
                match queues.iter().try_for_each(|&q| dev.set_irq_mode(q, irq)) {
                    Ok(()) => Response {
                        ok: true,
                        ..Response::default()
                    },
                    Err(e) => Response::error(format!("interrupt_mode: {e}")),
                }
            }
        }
        Request::Reset {} => {
            dev.reset();
            Response {
                ok: true,
                ..Response::default()
            }
        }
        Request::Source { source } => {
            let tick = source.tick();
            match dev.source_mut().set(source) {
                Ok(()) => {
                    let mut timer = plane.source_timer.lock().unwrap_or_else(|e| e.into_inner());
                    let armed = match tick {
                        Some(period) => timer.reset(period, Some(period)),
                        None => timer.clear(),
                    };
                    match armed {
                        Ok(()) => Response {
                            ok: true,
                            ..Response::default()
                        },
                        Err(e) => Response::error(format!("source: timer: {e}")),
                    }
                }
                Err(e) => Response::error(format!("source: {e}")),
            }
        }
        Request::NeedsReset {} => {
            dev.set_needs_reset(true);
            warn!("device declared broken (NEEDS_RESET) from the control plane");
            Response {
                ok: true,
                ..Response::default()
            }
        }
        Request::Fault { fault } => match dev.faults_mut().apply(&fault, std::time::Instant::now())
        {
            Ok(()) => {
                tracing::info!(?fault, "fault injected");
                Response {
                    ok: true,
                    ..Response::default()
                }
            }
            Err(e) => Response::error(format!("fault: {e}")),
        },
        Request::Config {} => Response {
            ok: true,
            data: Some(hex::encode(crate::config::render(&dev))),
            ..Response::default()
        },
    };
    resp.rx_pending = Some(dev.rx_pending());
    resp.tx_captured = Some(dev.tx_captured());
    drop(dev);
    if resp.ok {
        if let Err(e) = kick.write(1) {
            warn!(error = %e, "could not kick the device worker");
        }
    }
    resp
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline: each read scans
    /// only what it added, so a long request costs linear time.
    scanned: usize,
}

/// The control socket's event subscriber: the listener and its clients.
pub struct ControlServer {
    listener: UnixListener,
    clients: HashMap<RawFd, Client>,
    plane: Plane,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl ControlServer {
    /// Bind the control socket at `path` (replacing a stale one), mode 0600.
    pub fn bind(path: &Path, device: Arc<Mutex<QwDevice>>, kick: EventFd) -> io::Result<Self> {
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
            plane: Plane::new(device, kick)?,
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
            let resp = match serde_json::from_slice::<Request>(&client.buf[..pos]) {
                Ok(req) => handle_request(&self.plane, req),
                Err(e) => Response::error(format!("bad request: {e}")),
            };
            client.buf.drain(..=pos);
            client.scanned = 0;
            if write_line(&mut client.stream, &resp).is_err() {
                return false;
            }
        }
        client.scanned = client.buf.len();
        if client.buf.len() > MAX_LINE {
            let _ = write_line(
                &mut client.stream,
                &Response::error(format!("request line longer than {MAX_LINE} bytes")),
            );
            return false;
        }
        true
    }
}

fn write_line(stream: &mut UnixStream, resp: &Response) -> io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(io::Error::other)?;
    out.push(b'\n');
    stream.write_all(&out)
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            warn!(error = ?e, "could not watch the control socket");
        }
        let timer = self
            .plane
            .source_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd();
        if let Err(e) = ops.add(Events::new_raw(timer, EventSet::IN)) {
            warn!(error = ?e, "could not watch the source timer");
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
                .source_timer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_raw_fd()
        {
            self.plane.source_tick();
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
pub fn spawn(
    path: PathBuf,
    device: Arc<Mutex<QwDevice>>,
    kick: EventFd,
) -> io::Result<std::thread::JoinHandle<()>> {
    let server = ControlServer::bind(&path, device, kick)?;
    info!(socket = %path.display(), "control plane listening");
    std::thread::Builder::new()
        .name("vdevlab-control".into())
        .spawn(move || {
            let mut manager: EventManager<ControlServer> = match EventManager::new() {
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

/// A client of the control plane, for the CLI and the test harness.
#[derive(Debug)]
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    /// Connect to the control socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the control socket {}: {e} (is vdevlab-device running?)",
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

    /// Send one request and wait for its reply.
    pub fn request(&mut self, req: &Request) -> io::Result<Response> {
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

    fn checked(&mut self, req: &Request) -> io::Result<Response> {
        let resp = self.request(req)?;
        if resp.ok {
            Ok(resp)
        } else {
            Err(io::Error::other(
                resp.error.unwrap_or_else(|| "request failed".into()),
            ))
        }
    }

    /// Queue bytes for the driver; returns how many the device accepted.
    pub fn inject(&mut self, data: &[u8]) -> io::Result<usize> {
        let resp = self.checked(&Request::Inject {
            data: hex::encode(data),
        })?;
        Ok(resp.accepted.unwrap_or(0))
    }

    /// Take up to `max` captured transmit bytes.
    pub fn capture(&mut self, max: Option<usize>) -> io::Result<Vec<u8>> {
        let resp = self.checked(&Request::Capture { max })?;
        hex::decode(resp.data.unwrap_or_default()).map_err(io::Error::other)
    }

    /// Set the interrupt mode of `queue` (`rx`, `tx` or `all`).
    pub fn interrupt_mode(&mut self, queue: &str, irq: IrqMode) -> io::Result<()> {
        self.checked(&Request::InterruptMode {
            queue: queue.into(),
            irq,
        })
        .map(drop)
    }

    /// The device's counters.
    pub fn stats(&mut self) -> io::Result<Response> {
        self.checked(&Request::Stats {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn plane(dev: QwDevice) -> Plane {
        Plane::new(
            Arc::new(Mutex::new(dev)),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn generator_source_ticks_into_the_fifo_and_config_shows_it() {
        let plane = plane(QwDevice::default());
        let req: Request = serde_json::from_str(
            r#"{"op":"source","source":{"kind":"generator","bytes":100,"period_us":1000,"seed":9}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, req).ok);
        std::thread::sleep(Duration::from_millis(20));
        plane.source_tick();
        let pending = plane.device.lock().unwrap().rx_pending();
        assert!(
            pending >= 1000 && pending.is_multiple_of(100),
            "late ticks keep the rate: {pending}"
        );
        assert!(plane.kick.read().unwrap() >= 1);
        let config = handle_request(&plane, Request::Config {}).data.unwrap();
        let config = hex::decode(config).unwrap();
        assert_eq!(&config[0..4], b"QWDV");
        assert_eq!(config[0x20], 1, "source: generator");
        let bad: Request = serde_json::from_str(
            r#"{"op":"source","source":{"kind":"generator","bytes":0,"period_us":1000}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, bad).error.unwrap().contains("bytes"));
        let off: Request =
            serde_json::from_str(r#"{"op":"source","source":{"kind":"inject"}}"#).unwrap();
        assert!(handle_request(&plane, off).ok);
        assert!(handle_request(&plane, Request::NeedsReset {}).ok);
        assert!(plane.device.lock().unwrap().needs_reset());
    }

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r: Request = serde_json::from_str(r#"{"op":"inject","data":"6869"}"#).unwrap();
        assert_eq!(
            r,
            Request::Inject {
                data: "6869".into()
            }
        );
        let r: Request = serde_json::from_str(r#"{"op":"capture"}"#).unwrap();
        assert_eq!(r, Request::Capture { max: None });
        assert!(serde_json::from_str::<Request>(r#"{"op":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"ping","x":1}"#).is_err());
    }

    #[test]
    fn inject_and_stats_through_handle_request() {
        let plane = plane(QwDevice::new(4, 4));
        let resp = handle_request(
            &plane,
            Request::Inject {
                data: "0102030405".into(),
            },
        );
        assert!(resp.ok);
        assert_eq!(resp.accepted, Some(4));
        assert_eq!(resp.rx_pending, Some(4));
        assert_eq!(plane.kick.read().unwrap(), 1, "the worker is kicked");
        let resp = handle_request(&plane, Request::Inject { data: "zz".into() });
        assert!(!resp.ok);
        assert!(resp.error.unwrap().contains("hex"));
        let stats = handle_request(&plane, Request::Stats {}).stats.unwrap();
        assert_eq!(stats.injected_bytes, 4);
        assert_eq!(stats.inject_rejected_bytes, 1);
    }

    #[test]
    fn interrupt_mode_and_reset() {
        let plane = plane(QwDevice::default());
        let req: Request = serde_json::from_str(
            r#"{"op":"interrupt_mode","queue":"all","irq":{"mode":"coalesce","count":4,"usecs":500}}"#,
        )
        .unwrap();
        assert!(handle_request(&plane, req).ok);
        let want = IrqMode::Coalesce {
            count: 4,
            usecs: 500,
        };
        assert_eq!(plane.device.lock().unwrap().irq_mode(TX_QUEUE), Some(want));
        let bad = Request::InterruptMode {
            queue: "middle".into(),
            irq: IrqMode::Immediate,
        };
        assert!(handle_request(&plane, bad)
            .error
            .unwrap()
            .contains("rx, tx or all"));
        let bad = Request::InterruptMode {
            queue: "rx".into(),
            irq: IrqMode::Coalesce { count: 0, usecs: 1 },
        };
        assert!(!handle_request(&plane, bad).ok);
        handle_request(
            &plane,
            Request::Inject {
                data: "0102".into(),
            },
        );
        let resp = handle_request(&plane, Request::Reset {});
        assert_eq!(resp.rx_pending, Some(0));
    }

    #[test]
    fn socket_serves_several_clients_and_is_private() {
        let dir = std::env::temp_dir().join(format!("vdevlab-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ctl.sock");
        let dev = Arc::new(Mutex::new(QwDevice::default()));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        spawn(path.clone(), dev.clone(), kick).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut a = ControlClient::connect(&path).unwrap();
        let mut b = ControlClient::connect(&path).unwrap();
        assert_eq!(a.inject(b"abc").unwrap(), 3);
        assert_eq!(b.inject(b"de").unwrap(), 2);
        assert_eq!(a.stats().unwrap().rx_pending, Some(5));
        let bad = b.request(&Request::Inject { data: "q".into() }).unwrap();
        assert!(!bad.ok);
        assert_eq!(dev.lock().unwrap().rx_pending(), 5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
