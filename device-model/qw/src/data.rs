//! The data port: an optional Unix stream socket (`vdevlab-qw --data
//! PATH`, mode 0600) that carries the device's byte stream, the way QEMU's
//! chardev socket carries a virtio-serial port's.
//!
//! - Bytes a client writes go into the receive FIFO, as far as it has room:
//!   when the FIFO is full the port stops reading, so the socket applies
//!   back-pressure to the writer and nothing is lost.
//! - Bytes the driver transmits are written to the client as soon as the
//!   transmit pass captured them; what the socket does not take at once
//!   waits in the capture, and the device stops taking transmit buffers when
//!   the capture is full (back-pressure again).
//!
//! One client at a time; a new connection replaces the old one. With no
//! client the device behaves as without the port (the control plane's
//! `inject` and `capture` keep working either way).
//!
//! Why: the control plane's JSON lines with hex data cost tens of µs and
//! one thread hop per message, and `capture` must be polled. The port is
//! served on the vhost-user worker thread itself, from an epoll set of its
//! own that the worker watches (the framework's
//! [`VirtioDevice::io_fd`](vdevlab_device_core::VirtioDevice::io_fd)):
//! bytes reach the virtqueue, and the virtqueue's bytes reach the socket,
//! with no thread hop and no encoding. `vdevlab bench` measures qw through
//! it.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use tracing::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::qw::Qw;

/// Bytes read from the client per read call.
const READ_CHUNK: usize = 64 * 1024;
/// Most bytes read from the client per service call, so one busy writer
/// cannot keep the worker from its queues.
const READ_BUDGET: usize = 1 << 20;

const LISTENER: u64 = 0;
const CLIENT: u64 = 1;

/// What a service call changed, so the caller knows which queues need a
/// pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// New bytes in the receive FIFO.
    pub rx: bool,
    /// Room freed in the transmit capture.
    pub tx: bool,
}

/// The data port (see the module documentation).
#[derive(Debug)]
pub struct DataPort {
    epoll: Epoll,
    listener: UnixListener,
    client: Option<UnixStream>,
    /// The events the client is registered for (empty: not registered).
    watching: EventSet,
    buf: Vec<u8>,
}

impl DataPort {
    /// Bind the port at `path` (replacing a stale socket), mode 0600.
    pub fn bind(path: &Path) -> io::Result<Self> {
        vdevlab_device_core::sockpath::check(path, "the data port's socket")?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        info!(socket = %path.display(), "data port listening");
        Ok(Self {
            epoll,
            listener,
            client: None,
            watching: EventSet::empty(),
            buf: vec![0; READ_CHUNK],
        })
    }

    /// The port's own epoll descriptor: readable when the port has work
    /// (a connection, data, or room to write). The worker watches it.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Whether a client is connected.
    pub fn connected(&self) -> bool {
        self.client.is_some()
    }

    /// Handle whatever is ready: accept a connection, read the client's
    /// bytes into the FIFO, write captured bytes to it.
    pub fn service(&mut self, qw: &mut Qw) -> Wake {
        let mut events = [EpollEvent::default(); 2];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                warn!(error = %e, "data port: epoll_wait failed");
                0
            }
        };
        let mut wake = Wake::default();
        for ev in &events[..n] {
            match ev.data() {
                LISTENER => self.accept(),
                _ => {
                    let set = ev.event_set();
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
                        wake.rx |= self.read_in(qw);
                    }
                }
            }
        }
        let sync = self.sync(qw);
        Wake {
            rx: wake.rx || sync.rx,
            tx: sync.tx,
        }
    }

    /// After a queue pass: send what the driver transmitted, and read
    /// again if the FIFO has room once more.
    pub fn sync(&mut self, qw: &mut Qw) -> Wake {
        let mut wake = Wake::default();
        let Some(client) = self.client.as_mut() else {
            return wake;
        };
        if qw.tx_captured() > 0 {
            // Asked before sending: a capture that was exactly full is not
            // full any more once sent.
            let waiting = qw.tx_waiting_for_room();
            match qw.send_capture(client) {
                Ok(sent) => wake.tx = sent > 0 && waiting,
                Err(e) => {
                    debug!(error = %e, "data port client gone while writing");
                    self.drop_client();
                    return wake;
                }
            }
        }
        // A paused reader is not watched at all: a hang-up would
        // otherwise report the client ready over and over.
        let mut want = EventSet::empty();
        if qw.rx_room() > 0 {
            want |= EventSet::IN | EventSet::READ_HANG_UP;
        }
        if qw.tx_captured() > 0 {
            want |= EventSet::OUT;
        }
        self.watch(want);
        wake
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!(error = %e, "data port: could not set up a client");
                        continue;
                    }
                    if self.client.is_some() {
                        info!("data port: a new client replaces the old one");
                        self.drop_client();
                    }
                    let fd = stream.as_raw_fd();
                    let want = EventSet::IN | EventSet::READ_HANG_UP;
                    if let Err(e) =
                        self.epoll
                            .ctl(ControlOperation::Add, fd, EpollEvent::new(want, CLIENT))
                    {
                        warn!(error = %e, "data port: could not watch a client");
                        continue;
                    }
                    debug!(fd, "data port client connected");
                    self.client = Some(stream);
                    self.watching = want;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "data port: accept failed");
                    return;
                }
            }
        }
    }

    /// Read the client's bytes into the FIFO while it has room. Returns
    /// whether bytes arrived.
    fn read_in(&mut self, qw: &mut Qw) -> bool {
        let mut got = 0;
        while got < READ_BUDGET {
            let room = qw.rx_room().min(self.buf.len());
            if room == 0 {
                break;
            }
            let Some(client) = self.client.as_mut() else {
                break;
            };
            match client.read(&mut self.buf[..room]) {
                Ok(0) => {
                    debug!("data port client closed");
                    self.drop_client();
                    break;
                }
                Ok(n) => {
                    // `room` bytes fit, so the FIFO takes all of them.
                    let taken = qw.inject(&self.buf[..n]);
                    debug_assert_eq!(taken, n);
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(error = %e, "data port client gone while reading");
                    self.drop_client();
                    break;
                }
            }
        }
        got > 0
    }

    fn watch(&mut self, want: EventSet) {
        let Some(client) = &self.client else { return };
        if want == self.watching {
            return;
        }
        let op = if want.is_empty() {
            ControlOperation::Delete
        } else if self.watching.is_empty() {
            ControlOperation::Add
        } else {
            ControlOperation::Modify
        };
        let ev = EpollEvent::new(want, CLIENT);
        match self.epoll.ctl(op, client.as_raw_fd(), ev) {
            Ok(()) => self.watching = want,
            Err(e) => warn!(error = %e, "data port: could not change what it watches"),
        }
    }

    fn drop_client(&mut self) {
        if let Some(c) = self.client.take() {
            if !self.watching.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
        }
        self.watching = EventSet::empty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn port() -> (DataPort, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "vdevlab-data-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.sock");
        (DataPort::bind(&path).unwrap(), path)
    }

    /// Service the port until `done` holds (the client's bytes travel
    /// through the kernel, so the first call may see nothing).
    fn service_until(
        port: &mut DataPort,
        qw: &mut Qw,
        mut done: impl FnMut(&DataPort, &Qw) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(port, qw) {
            assert!(Instant::now() < deadline, "the data port made no progress");
            port.service(qw);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn bytes_flow_both_ways_and_the_fifo_limits_reading() {
        let (mut port, path) = port();
        let mut qw = Qw::new(100, 1000);
        assert!(!port.connected());
        let mut client = UnixStream::connect(&path).unwrap();
        service_until(&mut port, &mut qw, |p, _| p.connected());

        // 300 bytes offered, 100 fit: the rest waits in the socket.
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        client.write_all(&data).unwrap();
        service_until(&mut port, &mut qw, |_, d| d.rx_pending() == 100);
        assert_eq!(qw.counters().inject_rejected_bytes, 0, "nothing refused");
        assert!(port.watching.is_empty(), "reading paused");
        assert_eq!(qw.take_rx(1000), data[..100]);
        // Room again: a sync resumes reading.
        port.sync(&mut qw);
        service_until(&mut port, &mut qw, |_, d| d.rx_pending() == 100);
        assert_eq!(qw.take_rx(1000), data[100..200]);

        // Transmitted bytes go to the client.
        qw.push_capture_for_test(b"hello");
        let w = port.sync(&mut qw);
        assert!(!w.tx, "no transmit pass waited for room");
        assert_eq!(qw.tx_captured(), 0);
        let mut back = [0u8; 5];
        client.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");

        // A closed client is dropped once its last bytes are in (the
        // driver makes room for them); its place is free for another.
        drop(client);
        service_until(&mut port, &mut qw, |_, d| d.rx_pending() == 100);
        assert_eq!(qw.take_rx(1000), data[200..]);
        port.sync(&mut qw);
        service_until(&mut port, &mut qw, |p, _| !p.connected());
        let _second = UnixStream::connect(&path).unwrap();
        service_until(&mut port, &mut qw, |p, _| p.connected());
    }

    #[test]
    fn a_full_capture_waits_for_the_reader() {
        let (mut port, path) = port();
        let mut qw = Qw::new(100, 4 << 20);
        let mut client = UnixStream::connect(&path).unwrap();
        service_until(&mut port, &mut qw, |p, _| p.connected());
        // More than a socket buffer holds: part stays captured.
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i * 7) as u8).collect();
        qw.push_capture_for_test(&data);
        // Exactly full: the transmit pass stopped without deferring a chain.
        let w = port.sync(&mut qw);
        assert!(w.tx, "room made for a waiting transmit pass asks for one");
        assert!(qw.tx_captured() > 0, "the socket took everything at once?");
        assert!(port.watching.contains(EventSet::OUT));
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 4 << 20];
            client.read_exact(&mut got).unwrap();
            got
        });
        service_until(&mut port, &mut qw, |_, d| d.tx_captured() == 0);
        assert_eq!(reader.join().unwrap(), data);
        assert!(!port.watching.contains(EventSet::OUT));
    }
}
