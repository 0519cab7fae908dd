//! The qw device's logic, apart from the vhost-user transport.
//!
//! [`QwDevice`] owns the device's data: a receive FIFO (bytes waiting to be
//! delivered to the driver) and a transmit capture (bytes the driver wrote).
//! It moves bytes between those buffers and a virtqueue handed to it, so the
//! same code runs under the real backend and under unit tests with mock
//! queues. Everything the guest hands over is untrusted: a malformed chain is
//! answered with a zero-length completion, counted and logged, and never stops
//! the queue (see `docs/device-spec.md`).

use std::collections::VecDeque;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, GuestMemory, Permissions};

use crate::faults::FaultState;
use crate::irq::{IrqAction, IrqMode, IrqPolicy};
use crate::sources::Source;
use crate::spec::{MAX_CHAIN_BYTES, NUM_QUEUES};

/// Why a descriptor chain was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A receive chain had a device-readable descriptor, or a transmit chain a
    /// device-writable one.
    #[error("descriptor {index} of chain {head} has the wrong direction for the {queue} queue")]
    WrongDirection {
        /// Queue name.
        queue: &'static str,
        /// Head index of the chain.
        head: u16,
        /// Position of the offending descriptor in the chain.
        index: usize,
    },
    /// A descriptor points outside guest memory (or wraps the address space).
    #[error("descriptor {index} of chain {head} covers 0x{addr:x}+{len}, outside guest memory")]
    OutOfMemory {
        /// Head index of the chain.
        head: u16,
        /// Position of the offending descriptor in the chain.
        index: usize,
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u32,
    },
    /// The chain adds up to more bytes than the device accepts in one buffer.
    #[error("chain {head} is {len} bytes long; the device accepts at most {max}")]
    TooLong {
        /// Head index of the chain.
        head: u16,
        /// Total length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The chain never ends: its last descriptor still says NEXT when the
    /// walk had to stop (a descriptor loop, a next index past the table, a
    /// broken indirect table, or more descriptors than the queue size).
    #[error("chain {head} does not end after {count} descriptors (a loop, a bad next index or a broken indirect table)")]
    Runaway {
        /// Head index of the chain.
        head: u16,
        /// Descriptors walked before stopping.
        count: usize,
    },
    /// The chain has no usable bytes at all.
    #[error("chain {head} has no bytes")]
    Empty {
        /// Head index of the chain.
        head: u16,
    },
    /// Copying to or from guest memory failed after validation.
    #[error("chain {head}: guest memory access failed: {detail}")]
    Access {
        /// Head index of the chain.
        head: u16,
        /// What went wrong.
        detail: String,
    },
}

/// Errors that concern a whole queue rather than one chain: the queue is then
/// unusable until the driver resets the device.
#[derive(Debug, Error)]
pub enum QueueError {
    /// The ring itself is broken (for example the available index jumped by
    /// more than the queue size, or a ring address is not in guest memory).
    #[error("virtqueue is broken: {0}")]
    Ring(#[from] virtio_queue::Error),
}

/// The device's counters, reported by the control plane's `stats` request.
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
}

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Chains completed (added to the used ring).
    pub completed: u32,
    /// Bytes moved.
    pub bytes: u64,
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
    stats: Stats,
    bad_chain_logged: bool,
    irq: [IrqPolicy; NUM_QUEUES],
    source: Source,
    needs_reset: bool,
    scratch: Vec<u8>,
    faults: FaultState,
}

impl Default for QwDevice {
    fn default() -> Self {
        Self::new(DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES)
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
            stats: Stats::default(),
            bad_chain_logged: false,
            irq: Default::default(),
            source: Source::default(),
            needs_reset: false,
            scratch: Vec::new(),
            faults: FaultState::default(),
        }
    }

    /// Queue bytes for delivery to the driver. Returns how many were
    /// accepted: the rest did not fit the FIFO and were refused (and counted),
    /// never silently dropped.
    pub fn inject(&mut self, data: &[u8]) -> usize {
        let room = self.rx_capacity.saturating_sub(self.rx_fifo.len());
        let n = room.min(data.len());
        self.rx_fifo.extend(&data[..n]);
        self.stats.injected_bytes += n as u64;
        self.stats.inject_rejected_bytes += (data.len() - n) as u64;
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

    /// Take up to `max` bytes from the front of the receive FIFO (tests).
    #[cfg(test)]
    pub(crate) fn take_rx(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.rx_fifo.len());
        self.rx_fifo.drain(..n).collect()
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

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Mutable access to the counters, for the transport's interrupt bookkeeping.
    pub fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
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
        let got = source.pump(self);
        self.source = source;
        got
    }

    /// The armed faults (see [`crate::faults`]).
    pub fn faults_mut(&mut self) -> &mut FaultState {
        &mut self.faults
    }

    /// Whether the device has declared itself broken (DEVICE_NEEDS_RESET in
    /// the config space status word).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// Declare (or clear) the device broken: it stops serving its queues
    /// until the driver resets them.
    pub fn set_needs_reset(&mut self, on: bool) {
        self.needs_reset = on;
    }

    /// Set queue `queue`'s interrupt mode.
    pub fn set_irq_mode(&mut self, queue: u16, mode: IrqMode) -> Result<(), String> {
        mode.validate()?;
        let p = self
            .irq
            .get_mut(queue as usize)
            .ok_or_else(|| format!("no queue {queue}"))?;
        p.set_mode(mode);
        Ok(())
    }

    /// Queue `queue`'s interrupt mode.
    pub fn irq_mode(&self, queue: u16) -> Option<IrqMode> {
        self.irq.get(queue as usize).map(IrqPolicy::mode)
    }

    /// `n` buffers of `queue` were completed: what to do about the interrupt.
    pub fn on_completions(&mut self, queue: u16, n: u32) -> IrqAction {
        self.irq
            .get_mut(queue as usize)
            .map_or(IrqAction::Wait, |p| p.on_completions(n))
    }

    /// `queue`'s interrupt timer expired: whether to raise the interrupt.
    pub fn on_irq_timer(&mut self, queue: u16) -> bool {
        self.irq
            .get_mut(queue as usize)
            .is_some_and(IrqPolicy::on_timer)
    }

    /// Forget all data (device reset). Counters are kept: they describe the
    /// whole session, across resets.
    pub fn reset(&mut self) {
        self.rx_fifo.clear();
        self.tx_capture.clear();
    }

    /// Fill the driver's posted receive buffers from the FIFO, in order.
    ///
    /// Buffers are only taken while there is data to put in them, so an idle
    /// device keeps the driver's buffers posted.
    pub fn process_rx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Pass, QueueError> {
        let mut completions = Vec::new();
        let mut pass = Pass::default();
        let size = queue.size();
        let mut ring_error = None;
        {
            let mut iter = queue
                .iter(mem)
                .inspect_err(|_| self.stats.queue_errors += 1)?;
            while !self.rx_fifo.is_empty() {
                let Some(chain) = iter.next() else { break };
                let head = chain.head_index();
                if head >= size {
                    // A head outside the table cannot even be completed:
                    // the ring is broken. Stop before any byte moves.
                    ring_error = Some(virtio_queue::Error::InvalidDescriptorIndex);
                    break;
                }
                let len = match self.fill_chain(mem, chain) {
                    Ok(n) => n,
                    Err(e) => {
                        self.refuse(&e);
                        0
                    }
                };
                pass.bytes += u64::from(len);
                completions.push((head, len));
            }
        }
        for (head, len) in completions {
            queue
                .add_used(mem, head, len)
                .inspect_err(|_| self.stats.queue_errors += 1)?;
            pass.completed += 1;
            if len > 0 {
                self.stats.rx_buffers += 1;
            }
        }
        self.stats.rx_bytes += pass.bytes;
        self.ring_result(ring_error, pass)
    }

    /// Consume the driver's transmit buffers into the capture, in order.
    ///
    /// When the capture is full the device stops taking buffers (the driver
    /// sees its transmit ring fill up): back-pressure rather than loss.
    pub fn process_tx<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<Pass, QueueError> {
        let mut completions = Vec::new();
        let mut pass = Pass::default();
        let size = queue.size();
        let mut ring_error = None;
        {
            let mut iter = queue
                .iter(mem)
                .inspect_err(|_| self.stats.queue_errors += 1)?;
            loop {
                let room = self.tx_capacity.saturating_sub(self.tx_capture.len());
                if room == 0 {
                    break;
                }
                let Some(chain) = iter.next() else { break };
                let head = chain.head_index();
                if head >= size {
                    ring_error = Some(virtio_queue::Error::InvalidDescriptorIndex);
                    break;
                }
                let accepted = match self.drain_chain(mem, chain, room) {
                    Ok(Some(n)) => {
                        pass.bytes += n;
                        true
                    }
                    Ok(None) => {
                        // Not enough room for this whole buffer: leave it on
                        // the ring for a later pass.
                        iter.go_to_previous_position();
                        break;
                    }
                    Err(e) => {
                        self.refuse(&e);
                        false
                    }
                };
                completions.push((head, accepted));
            }
        }
        for (head, accepted) in completions {
            queue
                .add_used(mem, head, 0)
                .inspect_err(|_| self.stats.queue_errors += 1)?;
            pass.completed += 1;
            // Like rx_buffers, count only buffers that carried data.
            if accepted {
                self.stats.tx_buffers += 1;
            }
        }
        self.stats.tx_bytes += pass.bytes;
        self.ring_result(ring_error, pass)
    }

    /// The pass's result: the completions made before a ring-level fault
    /// are on the used ring either way; the fault is reported after them.
    fn ring_result(
        &mut self,
        ring_error: Option<virtio_queue::Error>,
        pass: Pass,
    ) -> Result<Pass, QueueError> {
        match ring_error {
            Some(e) => {
                self.stats.queue_errors += 1;
                Err(QueueError::Ring(e))
            }
            None => Ok(pass),
        }
    }

    fn refuse(&mut self, e: &ChainError) {
        self.stats.bad_chains += 1;
        // One warning per device, then debug: a hostile guest must not be
        // able to flood the host's log.
        if self.bad_chain_logged {
            tracing::debug!(error = %e, "refused a descriptor chain");
        } else {
            self.bad_chain_logged = true;
            tracing::warn!(error = %e, "refused a descriptor chain (further ones are logged at debug level)");
        }
    }

    fn fill_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<u32, ChainError> {
        let head = chain.head_index();
        validate_chain(mem, &chain, Direction::DeviceWrites)?;
        let mut writer = chain.writer(mem).map_err(|e| ChainError::Access {
            head,
            detail: e.to_string(),
        })?;
        let room = writer.available_bytes().min(self.rx_fifo.len());
        let access = |e: std::io::Error| ChainError::Access {
            head,
            detail: e.to_string(),
        };
        if self.faults.rx_damage_armed() {
            // Fault injection (rare path): damage a copy, then deliver it.
            let mut data: Vec<u8> = self.rx_fifo.range(..room).copied().collect();
            let (corrupted, cut) = self.faults.damage_rx(&mut data);
            writer.write_all(&data).map_err(access)?;
            self.rx_fifo.drain(..room);
            self.stats.corrupted_buffers += u64::from(corrupted);
            self.stats.truncated_bytes += cut as u64;
            return Ok((room - cut) as u32);
        }
        let (a, b) = self.rx_fifo.as_slices();
        let from_a = room.min(a.len());
        writer.write_all(&a[..from_a]).map_err(access)?;
        writer.write_all(&b[..room - from_a]).map_err(access)?;
        self.rx_fifo.drain(..room);
        // `room` is bounded by the chain length, itself bounded by MAX_CHAIN_BYTES.
        Ok(room as u32)
    }

    /// Read a whole transmit chain into the capture, if it fits in `room`.
    fn drain_chain<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
        room: usize,
    ) -> Result<Option<u64>, ChainError> {
        let head = chain.head_index();
        let total = validate_chain(mem, &chain, Direction::DeviceReads)?;
        // A buffer waits for room, except that an empty capture takes any
        // buffer (at most MAX_CHAIN_BYTES): a buffer larger than the whole
        // capture must not wedge the queue forever.
        if total as usize > room && !self.tx_capture.is_empty() {
            return Ok(None);
        }
        let mut reader = chain.reader(mem).map_err(|e| ChainError::Access {
            head,
            detail: e.to_string(),
        })?;
        // One scratch buffer, reused: no allocation per chain.
        self.scratch.clear();
        reader
            .read_to_end(&mut self.scratch)
            .map_err(|e| ChainError::Access {
                head,
                detail: e.to_string(),
            })?;
        self.tx_capture.extend(&self.scratch);
        Ok(Some(self.scratch.len() as u64))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    DeviceWrites,
    DeviceReads,
}

/// Check a whole chain before touching its buffers: every descriptor in the
/// queue's direction and inside guest memory, and a bounded total length.
/// Returns the total length in bytes.
fn validate_chain<M: GuestMemory>(
    mem: &M,
    chain: &DescriptorChain<&M>,
    dir: Direction,
) -> Result<u64, ChainError> {
    let head = chain.head_index();
    let mut total: u64 = 0;
    let mut count = 0;
    let mut last_has_next = false;
    for (index, desc) in chain.clone().enumerate() {
        count = index + 1;
        last_has_next = desc.has_next();
        let writes = desc.is_write_only();
        if writes != (dir == Direction::DeviceWrites) {
            return Err(ChainError::WrongDirection {
                queue: if dir == Direction::DeviceWrites {
                    "rx"
                } else {
                    "tx"
                },
                head,
                index,
            });
        }
        let len = desc.len();
        let in_memory = len == 0
            || desc
                .addr()
                .checked_add(u64::from(len) - 1)
                .is_some_and(|_| {
                    mem.check_range(desc.addr(), len as usize, Permissions::ReadWrite)
                });
        if !in_memory {
            return Err(ChainError::OutOfMemory {
                head,
                index,
                addr: desc.addr().raw_value(),
                len,
            });
        }
        total += u64::from(len);
        if total > MAX_CHAIN_BYTES {
            return Err(ChainError::TooLong {
                head,
                len: total,
                max: MAX_CHAIN_BYTES,
            });
        }
    }
    // virtio-queue's walk stops silently after queue-size descriptors or at
    // a bad next index or indirect table; a chain whose last descriptor we
    // saw still points onwards is malformed, not merely short.
    if last_has_next {
        return Err(ChainError::Runaway { head, count });
    }
    if total == 0 {
        return Err(ChainError::Empty { head });
    }
    Ok(total)
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
        let mut dev = QwDevice::default();
        assert_eq!(dev.inject(b"hello world"), 11);
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
            dev.rx_pending(),
            1,
            "the last byte waits for the next buffer"
        );
        assert_eq!(dev.stats().rx_bytes, 10);
    }

    #[test]
    fn rx_leaves_buffers_posted_when_idle() {
        let mem = memory();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 64, VRING_DESC_F_WRITE, 0)]]);
        let mut dev = QwDevice::default();
        assert_eq!(dev.process_rx(&mut q, &mem).unwrap(), Pass::default());
        assert_eq!(vq.used().idx().load(), 0);
        dev.inject(b"x");
        assert_eq!(dev.process_rx(&mut q, &mem).unwrap().completed, 1);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn rx_refuses_bad_chains_and_keeps_going() {
        let mem = memory();
        let w = VRING_DESC_F_WRITE;
        let (vq, mut q) = queue_with(
            &mem,
            &[
                vec![desc(0x8000, 8, 0, 0)],       // device-readable on rx
                vec![desc(MEM - 4, 8, w, 0)],      // runs past the end of memory
                vec![desc(u64::MAX - 2, 8, w, 0)], // wraps the address space
                vec![desc(0x9000, 0, w, 0)],       // no bytes
                vec![desc(0xa000, 8, w, 0)],       // fine
            ],
        );
        let mut dev = QwDevice::default();
        dev.inject(b"payload!");
        let pass = dev.process_rx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 5);
        assert_eq!(dev.stats().bad_chains, 4);
        for i in 0..4 {
            assert_eq!(used(&vq, i).1, 0, "bad chain {i} completes with length 0");
        }
        assert_eq!(used(&vq, 4), (4, 8));
        let mut got = [0u8; 8];
        mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
        assert_eq!(&got, b"payload!", "no byte lost to the bad chains");
    }

    #[test]
    fn loops_and_bad_next_indices_are_refused() {
        let mem = memory();
        let w = VRING_DESC_F_WRITE;
        let n = VRING_DESC_F_NEXT;
        let (vq, mut q) = queue_with(
            &mem,
            &[
                vec![desc(0x8000, 4, w | n, 0)],  // points at itself
                vec![desc(0x9000, 4, w | n, 99)], // next past the table
                vec![desc(0xa000, 8, w, 0)],      // fine
            ],
        );
        let mut dev = QwDevice::default();
        dev.inject(b"12345678");
        let pass = dev.process_rx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 3);
        assert_eq!(dev.stats().bad_chains, 2);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(used(&vq, 1), (1, 0));
        assert_eq!(used(&vq, 2), (2, 8));
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
        let mut dev = QwDevice::new(64, 6);
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(
            pass,
            Pass {
                completed: 1,
                bytes: 4
            },
            "the second buffer does not fit"
        );
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(dev.take_capture(100), b"abcd");
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(
            pass,
            Pass {
                completed: 1,
                bytes: 4
            }
        );
        assert_eq!(dev.take_capture(2), b"ef");
        assert_eq!(dev.take_capture(100), b"gh");
    }

    #[test]
    fn tx_buffer_larger_than_the_capture_is_taken_when_it_is_empty() {
        let mem = memory();
        mem.write_slice(b"0123456789", GuestAddress(0x8000))
            .unwrap();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 10, 0, 0)]]);
        let mut dev = QwDevice::new(64, 4);
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(
            pass,
            Pass {
                completed: 1,
                bytes: 10
            }
        );
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(dev.take_capture(100), b"0123456789");
    }

    #[test]
    fn tx_refuses_writable_descriptors() {
        let mem = memory();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 4, VRING_DESC_F_WRITE, 0)]]);
        let mut dev = QwDevice::default();
        let pass = dev.process_tx(&mut q, &mem).unwrap();
        assert_eq!(pass.completed, 1);
        assert_eq!(dev.stats().bad_chains, 1);
        assert_eq!(used(&vq, 0), (0, 0));
        assert_eq!(dev.tx_captured(), 0);
    }

    #[test]
    fn a_head_outside_the_table_breaks_the_ring_without_losing_data() {
        let mem = memory();
        let w = VRING_DESC_F_WRITE;
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 4, w, 0)]]);
        // A second avail entry naming head 300 in a 16-entry table.
        let ring = vq.avail_addr().checked_add(4 + 2).unwrap();
        mem.write_obj(300u16.to_le(), ring).unwrap();
        vq.avail().idx().store(2);
        let mut dev = QwDevice::default();
        dev.inject(b"abcdefgh");
        assert!(dev.process_rx(&mut q, &mem).is_err());
        assert_eq!(used(&vq, 0), (0, 4), "the good chain before it completed");
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(dev.rx_pending(), 4, "no byte went to the bad head");
        assert_eq!(dev.stats().rx_bytes, 4);
        assert_eq!(dev.stats().queue_errors, 1);
    }

    #[test]
    fn inject_refuses_what_does_not_fit() {
        let mut dev = QwDevice::new(4, 4);
        assert_eq!(dev.inject(b"abcdef"), 4);
        assert_eq!(dev.stats().inject_rejected_bytes, 2);
        dev.reset();
        assert_eq!(dev.rx_pending(), 0);
    }

    #[test]
    fn avail_index_jump_is_a_queue_error() {
        let mem = memory();
        let (vq, mut q) = queue_with(&mem, &[vec![desc(0x8000, 4, VRING_DESC_F_WRITE, 0)]]);
        vq.avail().idx().store(100); // more than the queue size ahead
        let mut dev = QwDevice::default();
        dev.inject(b"x");
        assert!(dev.process_rx(&mut q, &mem).is_err());
        assert_eq!(dev.stats().queue_errors, 1);
    }
}
