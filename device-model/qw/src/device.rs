//! The qw device's logic, on the device framework ([`vdevlab_device_core`]).
//!
//! [`QwDevice`] owns the device's data: a receive FIFO (bytes waiting to be
//! delivered to the driver) and a transmit capture (bytes the driver wrote).
//! It implements [`VirtioDevice`]: the core hands it validated chains of its
//! two queues and it moves bytes between those buffers and the chains, so
//! the same code runs under the real backend and under unit tests with mock
//! queues. Everything the guest hands over is untrusted; the core refuses
//! malformed chains before they get here (see `docs/device-spec.md`).

use std::collections::VecDeque;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use vdevlab_device_core::sources::{Sink, Source};
use vdevlab_device_core::{
    to_fields, Chain, Core, Direction, Engine, Fields, Outcome, Pass, QueueError, QueueSpec,
    VirtioDevice,
};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use crate::control::Request;
use crate::data::DataPort;
use crate::spec::{MAX_CHAIN_BYTES, MAX_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

/// The qw device's own counters (the core keeps the generic ones).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QwCounters {
    /// Bytes accepted from the host for delivery to the driver.
    pub injected_bytes: u64,
    /// Bytes the host offered that the receive FIFO had no room for.
    pub inject_rejected_bytes: u64,
    /// Bytes written into the driver's receive buffers.
    pub rx_bytes: u64,
    /// Receive buffers completed.
    pub rx_buffers: u64,
    /// Bytes read from the driver's transmit buffers.
    pub tx_bytes: u64,
    /// Transmit buffers completed.
    pub tx_buffers: u64,
    /// Generator samples lost because the receive FIFO was full.
    pub overruns: u64,
}

/// All the counters of a qw device, as the control plane's `stats` request
/// reports them: the core's ([`vdevlab_device_core::CoreCounters`]) and the
/// device's ([`QwCounters`]) in one flat object. This is the clients' view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Bytes accepted from the host for delivery to the driver.
    pub injected_bytes: u64,
    /// Bytes the host offered that the receive FIFO had no room for.
    pub inject_rejected_bytes: u64,
    /// Bytes written into the driver's receive buffers.
    pub rx_bytes: u64,
    /// Receive buffers completed.
    pub rx_buffers: u64,
    /// Bytes read from the driver's transmit buffers.
    pub tx_bytes: u64,
    /// Transmit buffers completed.
    pub tx_buffers: u64,
    /// Chains refused as malformed (completed with length 0).
    pub bad_chains: u64,
    /// Used-buffer interrupts raised.
    pub interrupts_raised: u64,
    /// Used-buffer interrupts the driver asked us not to send.
    pub interrupts_suppressed: u64,
    /// Times a queue was found broken as a whole.
    pub queue_errors: u64,
    /// Generator samples lost because the receive FIFO was full.
    #[serde(default)]
    pub overruns: u64,
    /// Fault injection: due interrupts deliberately lost.
    #[serde(default)]
    pub interrupts_dropped: u64,
    /// Fault injection: interrupts raised with nothing new to report.
    #[serde(default)]
    pub spurious_interrupts: u64,
    /// Fault injection: passes skipped because a queue was stalled.
    #[serde(default)]
    pub stalled_passes: u64,
    /// Fault injection: receive buffers delivered with a flipped byte.
    #[serde(default)]
    pub corrupted_buffers: u64,
    /// Fault injection: bytes taken from the FIFO but not reported to the
    /// driver (truncated receive buffers).
    #[serde(default)]
    pub truncated_bytes: u64,
    /// Hostile mode: used entries naming an id the driver never posted.
    #[serde(default)]
    pub hostile_bogus_ids: u64,
    /// Hostile mode: used entries with a length larger than the buffer.
    #[serde(default)]
    pub hostile_overlong: u64,
    /// Hostile mode: used-index jumps.
    #[serde(default)]
    pub hostile_index_jumps: u64,
    /// Hostile mode: heads completed a second time.
    #[serde(default)]
    pub hostile_double_completions: u64,
}

impl Stats {
    /// The stats of `eng`, merged as the control plane reports them.
    pub fn of(eng: &Engine<QwDevice>) -> Self {
        serde_json::from_value(Value::Object(eng.stats_fields())).unwrap_or_default()
    }
}

/// Default receive FIFO size: how much the host may inject ahead of the driver.
pub const DEFAULT_RX_FIFO_BYTES: usize = 1 << 20;
/// Default transmit capture size: how much the driver may write before the
/// device applies back-pressure (stops completing transmit buffers).
pub const DEFAULT_TX_CAPTURE_BYTES: usize = 1 << 20;

/// The qw device's state.
#[derive(Debug)]
pub struct QwDevice {
    rx_fifo: VecDeque<u8>,
    rx_capacity: usize,
    tx_capture: VecDeque<u8>,
    tx_capacity: usize,
    counters: QwCounters,
    source: Source,
    scratch: Vec<u8>,
    /// The data port, if the device has one (see [`crate::data`]).
    data: Option<DataPort>,
    /// The last transmit chain looked at was deferred for lack of room in
    /// the capture: whoever drains the capture must ask for another pass.
    tx_deferred: bool,
}

impl Default for QwDevice {
    fn default() -> Self {
        Self::new(DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES)
    }
}

/// The receive FIFO as a [`Sink`] for the data source.
struct RxFifo<'a>(&'a mut QwDevice);

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
            rx_fifo: VecDeque::new(),
            rx_capacity,
            tx_capture: VecDeque::new(),
            tx_capacity,
            counters: QwCounters::default(),
            source: Source::default(),
            scratch: Vec::new(),
            data: None,
            tx_deferred: false,
        }
    }

    /// The same device, with its byte stream also on `port`.
    pub fn with_data_port(mut self, port: DataPort) -> Self {
        self.data = Some(port);
        self
    }

    /// Write captured transmit bytes to `out`, oldest first, until it
    /// would block or the capture is empty; the bytes written leave the
    /// capture. Returns how many were written (the data port's path).
    pub fn send_capture(&mut self, out: &mut impl std::io::Write) -> std::io::Result<usize> {
        let mut sent = 0;
        loop {
            let (front, _) = self.tx_capture.as_slices();
            if front.is_empty() {
                return Ok(sent);
            }
            match out.write(front) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_capture.drain(..n);
                    sent += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(sent),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether transmit chains wait for room in the capture: it is full, or
    /// the last chain did not fit.
    pub fn tx_waiting_for_room(&self) -> bool {
        self.tx_deferred || self.tx_capture.len() >= self.tx_capacity
    }

    /// Put bytes in the transmit capture as if the driver sent them (tests).
    #[cfg(test)]
    pub(crate) fn push_capture_for_test(&mut self, data: &[u8]) {
        self.tx_capture.extend(data);
    }

    /// Take up to `max` bytes from the front of the receive FIFO (tests).
    #[cfg(test)]
    pub(crate) fn take_rx(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.rx_fifo.len());
        self.rx_fifo.drain(..n).collect()
    }

    /// Run `f` on the data port, which gets the device too.
    fn with_port<T: Default>(&mut self, f: impl FnOnce(&mut DataPort, &mut Self) -> T) -> T {
        let Some(mut port) = self.data.take() else {
            return T::default();
        };
        let out = f(&mut port, self);
        self.data = Some(port);
        out
    }

    /// Queue bytes for delivery to the driver. Returns how many were
    /// accepted: the rest did not fit the FIFO and were refused (and counted),
    /// never silently dropped.
    pub fn inject(&mut self, data: &[u8]) -> usize {
        let room = self.rx_capacity.saturating_sub(self.rx_fifo.len());
        let n = room.min(data.len());
        self.rx_fifo.extend(&data[..n]);
        self.counters.injected_bytes += n as u64;
        self.counters.inject_rejected_bytes += (data.len() - n) as u64;
        n
    }

    /// Bytes waiting in the receive FIFO.
    pub fn rx_pending(&self) -> usize {
        self.rx_fifo.len()
    }

    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.rx_capacity.saturating_sub(self.rx_fifo.len())
    }

    /// Receive FIFO capacity.
    pub fn rx_capacity(&self) -> usize {
        self.rx_capacity
    }

    /// Transmit capture capacity.
    pub fn tx_capacity(&self) -> usize {
        self.tx_capacity
    }

    /// Take up to `max` captured transmit bytes, oldest first.
    pub fn take_capture(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.tx_capture.len());
        self.tx_capture.drain(..n).collect()
    }

    /// Bytes waiting in the transmit capture.
    pub fn tx_captured(&self) -> usize {
        self.tx_capture.len()
    }

    /// The device's own counters.
    pub fn counters(&self) -> QwCounters {
        self.counters
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
        let mut source = std::mem::take(&mut self.source);
        let p = source.pump(&mut RxFifo(self));
        self.source = source;
        if p.overrun {
            self.counters.overruns += 1;
        }
        p.bytes > 0
    }

    /// Fill one receive chain from the FIFO.
    fn fill(
        &mut self,
        chain: &Chain<'_>,
        core: &mut Core,
    ) -> Result<u32, vdevlab_device_core::ChainError> {
        // Bounded by the chain length, itself bounded by MAX_CHAIN_BYTES.
        let room = (chain.writable_len() as usize).min(self.rx_fifo.len());
        if core.damage_armed() {
            // Fault injection (rare path): damage a copy, then deliver it.
            let mut data: Vec<u8> = self.rx_fifo.range(..room).copied().collect();
            let cut = core.damage(&mut data);
            chain.write(&[&data])?;
            self.rx_fifo.drain(..room);
            return Ok((room - cut) as u32);
        }
        let (a, b) = self.rx_fifo.as_slices();
        let from_a = room.min(a.len());
        chain.write(&[&a[..from_a], &b[..room - from_a]])?;
        self.rx_fifo.drain(..room);
        Ok(room as u32)
    }

    /// Read a whole transmit chain into the capture, if it fits.
    fn drain(&mut self, chain: &Chain<'_>) -> Result<Option<u64>, vdevlab_device_core::ChainError> {
        let room = self.tx_capacity.saturating_sub(self.tx_capture.len());
        // A buffer waits for room, except that an empty capture takes any
        // buffer (at most MAX_CHAIN_BYTES): a buffer larger than the whole
        // capture must not wedge the queue forever.
        if chain.readable_len() as usize > room && !self.tx_capture.is_empty() {
            return Ok(None);
        }
        // One scratch buffer, reused: no allocation per chain.
        self.scratch.clear();
        chain.read_to_end(&mut self.scratch)?;
        self.tx_capture.extend(&self.scratch);
        Ok(Some(self.scratch.len() as u64))
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
        crate::config::render(self, core).to_vec()
    }

    /// Receive buffers are only taken while there is data to put in them,
    /// so an idle device keeps the driver's buffers posted; transmit buffers
    /// only while the capture has room (back-pressure rather than loss).
    fn wants_buffers(&self, queue: u16) -> bool {
        match queue {
            RX_QUEUE => !self.rx_fifo.is_empty(),
            TX_QUEUE => self.tx_capture.len() < self.tx_capacity,
            _ => false,
        }
    }

    fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        match queue {
            RX_QUEUE => match self.fill(chain, core) {
                Ok(len) => {
                    self.counters.rx_bytes += u64::from(len);
                    if len > 0 {
                        self.counters.rx_buffers += 1;
                    }
                    Outcome::Complete { used_len: len }
                }
                Err(e) => Outcome::Refuse(e),
            },
            _ => match self.drain(chain) {
                Ok(Some(n)) => {
                    self.tx_deferred = false;
                    self.counters.tx_bytes += n;
                    // Like rx_buffers, count only buffers that carried data.
                    self.counters.tx_buffers += 1;
                    Outcome::Complete { used_len: 0 }
                }
                // Not enough room for this whole buffer: leave it on the
                // ring for a later pass.
                Ok(None) => {
                    self.tx_deferred = true;
                    Outcome::Defer
                }
                Err(e) => Outcome::Refuse(e),
            },
        }
    }

    /// Forget all data. Counters are kept: they describe the whole session,
    /// across resets.
    fn reset(&mut self, _core: &mut Core) {
        self.rx_fifo.clear();
        self.tx_capture.clear();
    }

    fn control(
        &mut self,
        op: &str,
        request: &Value,
        core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        if !matches!(op, "inject" | "capture" | "source") {
            return None;
        }
        let req = match Request::deserialize(request) {
            Ok(r) => r,
            Err(e) => return Some(Err(format!("bad request: {e}"))),
        };
        let mut f = Fields::new();
        match req {
            Request::Inject { data } => {
                let bytes = match hex::decode(&data) {
                    Ok(b) => b,
                    Err(e) => return Some(Err(format!("data is not valid hex: {e}"))),
                };
                let accepted = self.inject(&bytes);
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
                let data = self.take_capture(max.unwrap_or(usize::MAX));
                f.insert("data".into(), hex::encode(data).into());
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

    fn counters(&self) -> Fields {
        to_fields(&self.counters)
    }

    fn reply_fields(&self) -> Fields {
        let mut f = Fields::new();
        f.insert("rx_pending".into(), self.rx_pending().into());
        f.insert("tx_captured".into(), self.tx_captured().into());
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
        let wake = self.with_port(|port, dev| port.service(dev));
        wake.rx || wake.tx
    }

    fn after_pass(&mut self, queue: u16, _core: &mut Core) -> bool {
        let wake = self.with_port(|port, dev| port.sync(dev));
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
        assert_eq!(dev.device.inject(b"hello world"), 11);
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
            dev.device.rx_pending(),
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
        dev.device.inject(b"x");
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
        assert_eq!(dev.device.take_capture(100), b"abcd");
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 1);
        assert_eq!(dev.stats().tx_bytes, 8);
        assert_eq!(dev.device.take_capture(2), b"ef");
        assert_eq!(dev.device.take_capture(100), b"gh");
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
        assert_eq!(dev.device.take_capture(100), b"0123456789");
    }

    #[test]
    fn inject_refuses_what_does_not_fit() {
        let mut dev = Engine::new(QwDevice::new(4, 4));
        assert_eq!(dev.device.inject(b"abcdef"), 4);
        assert_eq!(dev.stats().inject_rejected_bytes, 2);
        dev.device.reset(&mut dev.core);
        assert_eq!(dev.device.rx_pending(), 0);
    }
}
