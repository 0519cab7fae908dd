//! The qw device on the device framework ([`vdevlab_device_core`]):
//! [`QwDevice`] implements [`VirtioDevice`], mapping its two queues, its
//! config space, its timer, its host control requests and its data port
//! onto the device's logic ([`Qw`], in [`crate::qw`]). The core hands it
//! validated chains of its two queues (it refuses malformed ones before they
//! get here, see `docs/device-spec.md`); this file moves bytes between those
//! chains and the logic's buffers, so the same code runs under the real
//! backend and under unit tests with mock queues.

use std::os::fd::RawFd;

use serde::Deserialize;
use serde_json::Value;
use vdevlab_device_core::sources::{Sink, Source};
use vdevlab_device_core::{
    to_fields, Chain, ChainError, Core, Direction, Engine, Fields, Outcome, Pass, QueueError,
    QueueSpec, VirtioDevice,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::control::Request;
use crate::data::DataPort;
use crate::qw::Qw;
use crate::spec::{MAX_CHAIN_BYTES, MAX_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

// Where these lived before the logic moved to `crate::qw` and the clients'
// types to `crate::control`; the paths keep working.
pub use crate::control::Stats;
pub use crate::qw::{QwCounters, DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES};

/// The qw device as a [`VirtioDevice`]: its logic, its receive source and
/// its data port.
#[derive(Debug)]
pub struct QwDevice {
    qw: Qw,
    source: Source,
    /// The data port, if the device has one (see [`crate::data`]).
    data: Option<DataPort>,
    /// Reused for every transmit buffer: no allocation per chain.
    scratch: Vec<u8>,
}

impl Default for QwDevice {
    fn default() -> Self {
        Self::new(DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES)
    }
}

/// The receive FIFO as a [`Sink`] for the receive source.
struct RxFifo<'a>(&'a mut Qw);

impl Sink for RxFifo<'_> {
    fn room(&self) -> usize {
        self.0.rx_room()
    }
    fn push(&mut self, data: &[u8]) -> usize {
        self.0.inject(data)
    }
}

impl QwDevice {
    /// A device with the given FIFO and capture capacities, in bytes.
    pub fn new(rx_capacity: usize, tx_capacity: usize) -> Self {
        Self {
            qw: Qw::new(rx_capacity, tx_capacity),
            source: Source::default(),
            data: None,
            scratch: Vec::new(),
        }
    }

    /// The same device, with its byte stream also on `port`.
    pub fn with_data_port(mut self, port: DataPort) -> Self {
        self.data = Some(port);
        self
    }

    /// The device's state (its buffers and counters).
    pub fn qw(&self) -> &Qw {
        &self.qw
    }

    /// Mutable access to the device's state (the host side: inject, take
    /// the capture).
    pub fn qw_mut(&mut self) -> &mut Qw {
        &mut self.qw
    }

    /// The receive source (generator, file, or host injection only).
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Mutable access to the receive source.
    pub fn source_mut(&mut self) -> &mut Source {
        &mut self.source
    }

    /// Move data from the receive source into the FIFO (one timer tick).
    /// Returns whether new bytes arrived.
    pub fn pump_source(&mut self) -> bool {
        let p = self.source.pump(&mut RxFifo(&mut self.qw));
        if p.overrun {
            self.qw.count_overrun();
        }
        p.bytes > 0
    }

    /// Run `f` on the data port, if there is one, with the device's state.
    fn with_port<T: Default>(&mut self, f: impl FnOnce(&mut DataPort, &mut Qw) -> T) -> T {
        match self.data.as_mut() {
            Some(port) => f(port, &mut self.qw),
            None => T::default(),
        }
    }

    /// Fill one receive chain from the FIFO; returns the used length.
    fn fill(&mut self, chain: &Chain<'_>, core: &mut Core) -> Result<u32, ChainError> {
        // Bounded by the chain length, itself bounded by MAX_CHAIN_BYTES.
        let (a, b) = self.qw.rx_front(chain.writable_len() as usize);
        let taken = a.len() + b.len();
        let reported = if core.damage_armed() {
            // Fault injection (rare path): damage a copy, then deliver it.
            let mut data = [a, b].concat();
            let cut = core.damage(&mut data);
            chain.write(&[&data])?;
            taken - cut
        } else {
            chain.write(&[a, b])?;
            taken
        };
        let reported = reported as u32;
        self.qw.rx_delivered(taken, reported);
        Ok(reported)
    }

    /// Read a whole transmit chain into the capture, or leave it on the
    /// ring while it does not fit.
    fn drain(&mut self, chain: &Chain<'_>) -> Outcome {
        if !self.qw.tx_fits(chain.readable_len()) {
            self.qw.tx_defer();
            return Outcome::Defer;
        }
        self.scratch.clear();
        if let Err(e) = chain.read_to_end(&mut self.scratch) {
            return Outcome::Refuse(e);
        }
        self.qw.tx_accept(&self.scratch);
        Outcome::Complete { used_len: 0 }
    }

    /// The device's own control requests: `inject`, `capture`, `source`,
    /// `carrier`.
    fn device_request(&mut self, req: Request, core: &mut Core) -> Option<Result<Fields, String>> {
        let mut f = Fields::new();
        match req {
            Request::Inject { data } => {
                let bytes = match hex::decode(&data) {
                    Ok(b) => b,
                    Err(e) => return Some(Err(format!("data is not valid hex: {e}"))),
                };
                let accepted = self.qw.inject(&bytes);
                if accepted < bytes.len() {
                    tracing::warn!(
                        offered = bytes.len(),
                        accepted,
                        "receive FIFO full; injection partly refused"
                    );
                }
                f.insert("accepted".into(), accepted.into());
            }
            Request::Capture { max } => {
                let data = self.qw.take_capture(max.unwrap_or(usize::MAX));
                f.insert("data".into(), hex::encode(data).into());
            }
            Request::Carrier { up } => {
                let changed = self.qw.set_carrier(up);
                f.insert("changed".into(), changed.into());
                // Only a change is signalled: the config space is rendered
                // from the state just set, so a driver's re-read sees it.
                let notified = changed && Self::notify(core, &mut f);
                f.insert("notified".into(), notified.into());
            }
            Request::Source { source } => {
                let tick = source.tick();
                if let Err(e) = self.source.set(source) {
                    return Some(Err(e));
                }
                if let Err(e) = core.set_tick(tick) {
                    return Some(Err(format!("timer: {e}")));
                }
            }
            _ => return None,
        }
        Some(Ok(f))
    }
}

impl QwDevice {
    /// Raise a config-change interrupt after a config change; whether it
    /// went out (if not, `f` says why in `notify_error`).
    fn notify(core: &mut Core, f: &mut Fields) -> bool {
        match core.notify_config_change() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "config changed, but no config-change interrupt was sent");
                f.insert("notify_error".into(), e.to_string().into());
                false
            }
        }
    }
}

impl VirtioDevice for QwDevice {
    fn name(&self) -> &'static str {
        "qw"
    }

    fn queues(&self) -> Vec<QueueSpec> {
        let q = |name, direction| QueueSpec {
            max_chain_bytes: MAX_CHAIN_BYTES,
            ..QueueSpec::new(name, MAX_QUEUE_SIZE as u16, direction)
        };
        // Index order: RX_QUEUE (0), TX_QUEUE (1).
        vec![
            q("rx", Direction::DeviceWrites),
            q("tx", Direction::DeviceReads),
        ]
    }

    fn config_space(&self, core: &Core) -> Vec<u8> {
        crate::config::render(&self.qw, self.source.config(), core).to_vec()
    }

    /// Receive buffers are only taken while there is data to put in them,
    /// so an idle device keeps the driver's buffers posted; transmit buffers
    /// only while the capture has room (back-pressure rather than loss).
    fn wants_buffers(&self, queue: u16) -> bool {
        match queue {
            RX_QUEUE => self.qw.wants_rx(),
            TX_QUEUE => self.qw.wants_tx(),
            _ => false,
        }
    }

    fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        match queue {
            RX_QUEUE => match self.fill(chain, core) {
                Ok(len) => Outcome::Complete { used_len: len },
                Err(e) => Outcome::Refuse(e),
            },
            _ => self.drain(chain),
        }
    }

    /// Forget all data. Counters are kept: they describe the whole session,
    /// across resets.
    fn reset(&mut self, _core: &mut Core) {
        self.qw.clear();
    }

    fn control(
        &mut self,
        op: &str,
        request: &Value,
        core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        if !matches!(op, "inject" | "capture" | "source" | "carrier") {
            return None;
        }
        match Request::deserialize(request) {
            Ok(req) => self.device_request(req, core),
            Err(e) => Some(Err(format!("bad request: {e}"))),
        }
    }

    fn counters(&self) -> Fields {
        to_fields(&self.qw.counters())
    }

    fn reply_fields(&self) -> Fields {
        let mut f = Fields::new();
        f.insert("rx_pending".into(), self.qw.rx_pending().into());
        f.insert("tx_captured".into(), self.qw.tx_captured().into());
        f
    }

    fn tick(&mut self, ticks: u64, _core: &mut Core) -> bool {
        let mut got = false;
        for _ in 0..ticks {
            got |= self.pump_source();
        }
        got
    }

    fn io_fd(&self) -> Option<RawFd> {
        self.data.as_ref().map(DataPort::epoll_fd)
    }

    fn io_ready(&mut self, _core: &mut Core) -> bool {
        let wake = self.with_port(|port, qw| port.service(qw));
        wake.rx || wake.tx
    }

    fn after_pass(&mut self, queue: u16, _core: &mut Core) -> bool {
        let wake = self.with_port(|port, qw| port.sync(qw));
        queue == TX_QUEUE && wake.tx
    }
}

/// Conveniences on a qw [`Engine`] (the device and its core), for tests,
/// the fuzz harness and benchmarks.
pub trait QwEngine {
    /// One pass over the receive queue.
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Pass, QueueError>;
    /// One pass over the transmit queue.
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Pass, QueueError>;
    /// All counters, as `stats` reports them.
    fn stats(&self) -> Stats;
}

impl QwEngine for Engine<QwDevice> {
    fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Pass, QueueError> {
        self.process(RX_QUEUE, queue, mem)
    }
    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Pass, QueueError> {
        self.process(TX_QUEUE, queue, mem)
    }
    fn stats(&self) -> Stats {
        Stats::of(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEM: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
    }

    /// Post `chains` (each a list of descriptors) on a mock queue of 16.
    fn queue_with<'a>(
        mem: &'a GuestMemoryMmap,
        chains: &[Vec<RawDescriptor>],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        // One call per chain: the mock decides chain boundaries from NEXT
        // flags, which malformed chains set on purpose.
        let mut offset = 0;
        for c in chains {
            vq.add_desc_chains(c, offset).unwrap();
            offset += c.len() as u16;
        }
        let q: Queue = vq.create_queue().unwrap();
        (vq, q)
    }

    fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i as usize).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn rx_fills_buffers_in_order_across_boundaries() {
        let mem = memory();
        let w = VRING_DESC_F_WRITE;
        let (vq, mut q) = queue_with(
            &mem,
            &[
                vec![desc(0x8000, 4, w, 0)],
                vec![
                    desc(0x9000, 3, w | VRING_DESC_F_NEXT, 2),
                    desc(0xa000, 3, w, 0),
                ],
            ],
        );
        let mut dev = Engine::new(QwDevice::default());
        assert_eq!(dev.device.qw_mut().inject(b"hello world"), 11);
        let pass = dev.process_rx(&mut q, &mem).unwrap();
        assert_eq!(
            pass,
            Pass {
                completed: 2,
                bytes: 10
            }
        );
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got, b"hell");
        let mut a = [0u8; 3];
        mem.read_slice(&mut a, GuestAddress(0x9000)).unwrap();
        assert_eq!(&a, b"o w");
        mem.read_slice(&mut a, GuestAddress(0xa000)).unwrap();
        assert_eq!(&a, b"orl");
        assert_eq!(used(&vq, 0), (0, 4));
        assert_eq!(used(&vq, 1), (1, 6));
        assert_eq!(
            dev.device.qw().rx_pending(),
            1,
            "the last byte waits for the next buffer"
        );
        assert_eq!(dev.stats().rx_bytes, 10);
    }

    #[test]
    fn rx_leaves_buffers_posted_when_idle() {
        let mem = memory();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 64, VRING_DESC_F_WRITE, 0)]]);
        let mut dev = Engine::new(QwDevice::default());
        assert_eq!(dev.process_rx(&mut q, &mem).unwrap(), Pass::default());
        assert_eq!(vq.used().idx().load(), 0);
        dev.device.qw_mut().inject(b"x");
        assert_eq!(dev.process_rx(&mut q, &mem).unwrap().completed, 1);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn tx_captures_and_applies_back_pressure() {
        let mem = memory();
        mem.write_slice(b"abcd", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"efgh", GuestAddress(0x9000)).unwrap();
        let (vq, mut q) = queue_with(
            &mem,
            &[vec![desc(0x8000, 4, 0, 0)], vec![desc(0x9000, 4, 0, 0)]],
        );
        let mut dev = Engine::new(QwDevice::new(64, 6));
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 1, "the second buffer does not fit");
        assert_eq!(dev.stats().tx_bytes, 4);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(dev.device.qw_mut().take_capture(100), b"abcd");
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 1);
        assert_eq!(dev.stats().tx_bytes, 8);
        assert_eq!(dev.device.qw_mut().take_capture(2), b"ef");
        assert_eq!(dev.device.qw_mut().take_capture(100), b"gh");
    }

    #[test]
    fn tx_buffer_larger_than_the_capture_is_taken_when_it_is_empty() {
        let mem = memory();
        mem.write_slice(b"0123456789", GuestAddress(0x8000))
            .unwrap();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 10, 0, 0)]]);
        let mut dev = Engine::new(QwDevice::new(64, 4));
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(
            pass,
            Pass {
                completed: 1,
                bytes: 0
            },
            "a transmit buffer is used with length 0"
        );
        assert_eq!(dev.stats().tx_bytes, 10);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(dev.device.qw_mut().take_capture(100), b"0123456789");
    }

    #[test]
    fn config_reads_are_windowed_and_bounded() {
        let dev = Engine::new(QwDevice::default());
        assert_eq!(crate::config::read(&dev, 0, 4), b"QWDV");
        assert_eq!(
            crate::config::read(&dev, 46, 4),
            [0, 0, 0, 0][..].iter().copied().take(4).collect::<Vec<_>>()
        );
        assert_eq!(crate::config::read(&dev, 1000, 8), vec![0; 8]);
        assert_eq!(crate::config::read(&dev, 0, u32::MAX).len(), 4096);
    }

    #[test]
    fn inject_refuses_what_does_not_fit() {
        let mut dev = Engine::new(QwDevice::new(4, 4));
        assert_eq!(dev.device.qw_mut().inject(b"abcdef"), 4);
        assert_eq!(dev.stats().inject_rejected_bytes, 2);
        dev.device.reset(&mut dev.core);
        assert_eq!(dev.device.qw().rx_pending(), 0);
    }
}

/// The device's control requests, answered as the control plane's server
/// answers them (the core's [`Plane`](vdevlab_device_core::control::Plane)
/// with no socket, then over one).
#[cfg(test)]
mod control_plane_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use vdevlab_device_core::irq::IrqMode;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::control::{spawn, ControlClient, Plane, Request, Response};

    fn plane(dev: QwDevice) -> Plane<QwDevice> {
        Plane::new(
            Arc::new(Mutex::new(Engine::new(dev))),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    /// Answer `req` as the server does, parsed as a client would.
    fn handle_request(plane: &Plane<QwDevice>, req: Request) -> Response {
        let reply = plane.handle(&serde_json::to_value(req).unwrap());
        serde_json::from_value(serde_json::to_value(reply).unwrap()).unwrap()
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
        plane.tick();
        let pending = plane.engine.lock().unwrap().device.qw().rx_pending();
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
        assert!(plane.engine.lock().unwrap().core.needs_reset());
    }

    /// What `control::tests::requests_round_trip_as_json_lines` refuses on
    /// the client's side, the server refuses too.
    #[test]
    fn the_server_refuses_what_the_protocol_does_not_allow() {
        let plane = plane(QwDevice::default());
        let bad = plane.handle_line(br#"{"op":"explode"}"#);
        assert!(!bad.ok && bad.error.unwrap().contains("unknown op"));
        assert!(!plane.handle_line(br#"{"op":"ping","x":1}"#).ok);
        assert!(
            !plane
                .handle_line(br#"{"op":"inject","data":"00","x":1}"#)
                .ok
        );
        assert!(!plane.handle_line(b"[1]").ok);
    }

    #[test]
    fn carrier_sets_no_carrier_and_asks_for_a_config_change() {
        use crate::config::STATUS_NO_CARRIER;
        let plane = plane(QwDevice::default());
        let status = |plane: &Plane<QwDevice>| {
            let c = hex::decode(handle_request(plane, Request::Config {}).data.unwrap()).unwrap();
            u32::from_le_bytes(c[0x14..0x18].try_into().unwrap())
        };
        assert_eq!(status(&plane) & STATUS_NO_CARRIER, 0, "up at power-on");
        let reply = plane.handle_line(br#"{"op":"carrier","up":false}"#);
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.fields["changed"], true);
        // No VMM here: the interrupt cannot go out, and the reply says why.
        assert_eq!(reply.fields["notified"], false);
        let why = reply.fields["notify_error"].as_str().unwrap();
        assert!(why.contains("no VMM"), "{why}");
        assert_ne!(status(&plane) & STATUS_NO_CARRIER, 0);
        let again = plane.handle_line(br#"{"op":"carrier","up":false}"#);
        assert_eq!(
            (&again.fields["changed"], &again.fields["notified"]),
            (&false.into(), &false.into()),
            "no change, no interrupt"
        );
        assert!(!plane.handle_line(br#"{"op":"carrier","up":1}"#).ok);
        let stats = handle_request(&plane, Request::Stats {}).stats.unwrap();
        assert_eq!(stats.carrier_changes, 1);
        assert_eq!(
            (stats.config_changes_raised, stats.config_changes_failed),
            (1, 1),
            "one asked for, refused"
        );
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
    fn every_counter_reaches_the_typed_stats() {
        // The clients' flat Stats must name every counter the core and the
        // device report, or a counter would be silently invisible.
        let plane = plane(QwDevice::default());
        let reply = plane.handle_line(br#"{"op":"stats"}"#);
        let serde_json::Value::Object(raw) = reply.fields["stats"].clone() else {
            panic!("stats is not an object")
        };
        let typed = serde_json::to_value(Stats::default()).unwrap();
        for key in raw.keys() {
            assert!(typed.get(key).is_some(), "Stats lacks the counter {key}");
        }
        assert_eq!(raw.len(), typed.as_object().unwrap().len());
        // And exactly the counters clients know (the wire form).
        let mut names: Vec<&str> = raw.keys().map(String::as_str).collect();
        let mut want = crate::control::tests::STATS_FIELDS.to_vec();
        names.sort_unstable();
        want.sort_unstable();
        assert_eq!(names, want);
    }

    #[test]
    fn a_stats_reply_reads_into_stats_and_back_unchanged() {
        // Counters of the device and of the core, none zero.
        let plane = plane(QwDevice::new(4, 4));
        let inject = br#"{"op":"inject","data":"0102030405"}"#;
        assert!(plane.handle_line(inject).ok);
        {
            let mut eng = plane.engine.lock().unwrap();
            let c = eng.core.counters_mut();
            (c.bad_chains, c.interrupts_raised, c.hostile_overlong) = (2, 3, 4);
        }
        let reply = plane.handle_line(br#"{"op":"stats"}"#);
        let raw = reply.fields["stats"].clone();
        let stats: Stats = serde_json::from_value(raw.clone()).unwrap();
        assert_eq!(serde_json::to_value(stats).unwrap(), raw);
        assert_eq!((stats.injected_bytes, stats.inject_rejected_bytes), (4, 1));
        assert_eq!(
            (
                stats.bad_chains,
                stats.interrupts_raised,
                stats.hostile_overlong
            ),
            (2, 3, 4)
        );
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
        assert_eq!(
            plane.engine.lock().unwrap().core.irq_mode(TX_QUEUE),
            Some(want)
        );
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
        let eng = Arc::new(Mutex::new(Engine::new(QwDevice::default())));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        spawn(path.clone(), eng.clone(), kick).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut a = ControlClient::connect(&path).unwrap();
        let mut b = ControlClient::connect(&path).unwrap();
        assert_eq!(a.inject(b"abc").unwrap(), 3);
        assert_eq!(b.inject(b"de").unwrap(), 2);
        assert_eq!(a.stats().unwrap().rx_pending, Some(5));
        let bad = b.request(&Request::Inject { data: "q".into() }).unwrap();
        assert!(!bad.ok);
        assert_eq!(eng.lock().unwrap().device.qw().rx_pending(), 5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
