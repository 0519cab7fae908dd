//! The unit the transport and the control plane lock and drive
//! ([`Engine`]): a device plus its generic state ([`Core`], in
//! [`crate::state`]).
//!
//! [`Engine::process`] is the one place where chains leave the available ring
//! and land on the used ring: it validates each chain, hands it to the
//! device, and puts the result on the used ring. It runs under the real
//! backend and under unit tests with mock queues alike.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::chain::{validate, QueueError};
use crate::device::{to_fields, Fields, Outcome, VirtioDevice};
use crate::hostile;
use crate::trace::EventKind;
// Where these lived before `crate::state`; the paths keep working.
pub use crate::state::{Core, CoreCounters};

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Chains completed (added to the used ring).
    pub completed: u32,
    /// Sum of the used lengths reported.
    pub bytes: u64,
}

/// Run `f`, device code that locks `engine` itself, and contain a panic in
/// it: a bug in a device model must not take the worker thread (and with
/// it every queue, silently), the control plane or the VMM connection down.
/// The device is then declared broken (DEVICE_NEEDS_RESET; `queue_errors`
/// += 1; logged): its state may be half-updated, so it serves nothing until
/// the driver resets it, which resets the device. `None` if `f` panicked.
///
/// Callers must not hold a vring's lock across `f` in a way that unwinding
/// would release (that would poison it, and vhost-user-backend unwraps
/// those locks): they call this inside the guard's scope.
pub fn contain_panic<D, R>(
    engine: &std::sync::Mutex<Engine<D>>,
    what: &'static str,
    f: impl FnOnce() -> R,
) -> Option<R> {
    // AssertUnwindSafe: what `f` leaves half-done is never used again
    // before a reset (NEEDS_RESET stops every queue pass and the driver's
    // reset calls `device_reset`).
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            engine.clear_poison();
            let mut eng = engine.lock().unwrap_or_else(|e| e.into_inner());
            eng.core.set_needs_reset(true);
            eng.core.queue_error();
            tracing::error!(
                during = what,
                panic = %msg,
                "the device panicked: declared broken (NEEDS_RESET) until the driver resets it"
            );
            None
        }
    }
}

/// Trace a refused chain (nothing but a load when tracing is off).
#[inline]
fn trace_refused(core: &Core, queue: u16, head: u16, e: &crate::chain::ChainError) {
    core.trace().record(|| EventKind::ChainRefused {
        queue,
        head,
        why: e.to_string(),
    });
}

/// How many rounds of requested passes ([`Core::request_pass`]) the
/// transport runs at the end of one event before leaving the remaining
/// requests for the next event.
pub const MAX_PASS_ROUNDS: usize = 4;

/// A device and its core: what the transport and the control plane share
/// (behind one lock) and drive.
#[derive(Debug)]
pub struct Engine<D> {
    /// The device.
    pub device: D,
    /// Its generic state.
    pub core: Core,
}

impl<D: VirtioDevice> Engine<D> {
    /// Put `device` on the core.
    pub fn new(device: D) -> Self {
        let core = Core::new(device.queues());
        Self { device, core }
    }

    /// Counters, the core's and the device's, as one JSON object.
    pub fn stats_fields(&self) -> Fields {
        let mut all = to_fields(&self.core.counters());
        all.extend(self.device.counters());
        all
    }

    /// The config space as the driver would read it now.
    pub fn config_space(&self) -> Vec<u8> {
        let mut config = self.device.config_space(&self.core);
        // A flickering config (hostile fault) shows some bytes inverted.
        self.core.config_changes_ref().apply_overlay(&mut config);
        config
    }

    /// Bytes `offset..offset+size` of the config space; reads past the end
    /// return zeros (a frontend may ask for a larger window than the layout),
    /// and at most 4096 bytes are returned.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        crate::config::window(&self.config_space(), offset, size)
    }

    /// Take the requested passes ([`Core::request_pass`]): the requested
    /// queues whose [`VirtioDevice::wants_buffers`] holds, in index order,
    /// and clear every request. Empty (and no allocation) when none was made.
    pub fn take_pass_requests(&mut self) -> Vec<u16> {
        let device = &self.device;
        self.core.take_pass_requests(|q| device.wants_buffers(q))
    }

    /// Serve queue `queue` once: take available chains while the device
    /// wants them, validate each, let the device handle it, and put the
    /// results on the used ring, in order.
    ///
    /// A malformed chain is completed with length 0 and counted; it never
    /// stops the queue. A broken ring (an available index more than the queue
    /// size ahead, a head outside the table, a ring outside memory) is a
    /// [`QueueError`]: the completions made before it are on the used ring
    /// either way, and the transport then leaves the queue alone until the
    /// driver resets it.
    pub fn process(
        &mut self,
        queue: u16,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Pass, QueueError> {
        let Some(spec) = self.core.queues().get(queue as usize).copied() else {
            return Ok(Pass::default());
        };
        let mut completions: Vec<(u16, u32, u64)> = Vec::new();
        let size = q.size();
        let mut ring_error = None;
        // A throttled queue (fault injection) serves a few buffers a pass.
        let limit = match self
            .core
            .faults_mut()
            .throttle_gate(queue, std::time::Instant::now())
        {
            crate::faults::Gate::Limit(n) => n as usize,
            _ => usize::MAX,
        };
        {
            let core = &mut self.core;
            let mut iter = q.iter(mem).inspect_err(|_| core.queue_error())?;
            while completions.len() < limit && self.device.wants_buffers(queue) {
                let Some(chain) = iter.next() else { break };
                let head = chain.head_index();
                if head >= size {
                    // A head outside the table cannot even be completed:
                    // the ring is broken. Stop before any byte moves.
                    ring_error = Some(virtio_queue::Error::InvalidDescriptorIndex);
                    break;
                }
                // (used length, buffer length for the hostile mode)
                let (len, buffer) = match validate(mem, chain, &spec) {
                    Err(e) => {
                        trace_refused(core, queue, head, &e);
                        core.refuse(&e);
                        (0, 0)
                    }
                    Ok(c) => {
                        let buffer = c.readable_len() + c.writable_len();
                        core.trace().record(|| EventKind::ChainPopped {
                            queue,
                            head,
                            readable: c.readable_len(),
                            writable: c.writable_len(),
                        });
                        match self.device.handle_chain(queue, &c, core) {
                            // Never report more than the device could have
                            // written (a device bug must not reach the driver).
                            Outcome::Complete { used_len } => {
                                (used_len.min(c.writable_len() as u32), buffer)
                            }
                            Outcome::Defer => {
                                iter.go_to_previous_position();
                                break;
                            }
                            Outcome::Refuse(e) => {
                                trace_refused(core, queue, head, &e);
                                core.refuse(&e);
                                (0, buffer)
                            }
                        }
                    }
                };
                completions.push((head, len, buffer));
            }
        }
        let mut pass = Pass::default();
        for (head, len, buffer) in completions {
            hostile::complete(&mut self.core, queue, q, mem, head, len, buffer)
                .inspect_err(|_| self.core.queue_error())?;
            pass.completed += 1;
            pass.bytes += u64::from(len);
        }
        match ring_error {
            Some(e) => {
                self.core.queue_error();
                Err(QueueError::Ring(e))
            }
            None => Ok(pass),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::chain::tests::{rx_cases, tx_cases};
    use crate::chain::{Chain, Direction, QueueSpec};
    use crate::testing::{memory, Desc, Link, Ring, MEM, QUEUE_SIZE};
    use crate::Core;

    const RX: u16 = 0;
    const TX: u16 = 1;
    /// Bytes waiting ahead of a malformed receive chain.
    const PAYLOAD: &[u8] = b"payload!";
    /// Where the well-formed chains that follow a malformed one live.
    const GOOD: u64 = 0x30000;
    const GOOD2: u64 = 0x31000;

    /// About the smallest device there is: bytes put in `fifo` go to the
    /// driver's receive buffers (queue 0, taken only while there are bytes),
    /// the driver's transmit buffers (queue 1) land in `capture`.
    #[derive(Debug, Default)]
    struct Pipe {
        fifo: VecDeque<u8>,
        capture: Vec<u8>,
        rx_bytes: u64,
        rx_buffers: u64,
        tx_bytes: u64,
    }

    impl VirtioDevice for Pipe {
        fn name(&self) -> &'static str {
            "pipe"
        }
        fn queues(&self) -> Vec<QueueSpec> {
            vec![
                QueueSpec::new("rx", QUEUE_SIZE, Direction::DeviceWrites),
                QueueSpec::new("tx", QUEUE_SIZE, Direction::DeviceReads),
            ]
        }
        fn config_space(&self, _core: &Core) -> Vec<u8> {
            Vec::new()
        }
        fn wants_buffers(&self, queue: u16) -> bool {
            queue == TX || !self.fifo.is_empty()
        }
        fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, _core: &mut Core) -> Outcome {
            if queue == TX {
                return match chain.read_to_end(&mut self.capture) {
                    Ok(n) => {
                        self.tx_bytes += n as u64;
                        Outcome::Complete { used_len: 0 }
                    }
                    Err(e) => Outcome::Refuse(e),
                };
            }
            let n = (chain.writable_len() as usize).min(self.fifo.len());
            let (a, b) = self.fifo.as_slices();
            let from_a = n.min(a.len());
            match chain.write(&[&a[..from_a], &b[..n - from_a]]) {
                Ok(written) => {
                    self.fifo.drain(..written);
                    self.rx_bytes += written as u64;
                    self.rx_buffers += 1;
                    Outcome::Complete {
                        used_len: written as u32,
                    }
                }
                Err(e) => Outcome::Refuse(e),
            }
        }
        fn reset(&mut self, _core: &mut Core) {
            self.fifo.clear();
            self.capture.clear();
        }
        fn counters(&self) -> Fields {
            Fields::new()
        }
    }

    fn engine_with(data: &[u8]) -> Engine<Pipe> {
        let mut eng = Engine::new(Pipe::default());
        eng.device.fifo.extend(data);
        eng
    }

    /// (bad_chains, queue_errors)
    fn faults(eng: &Engine<Pipe>) -> (u64, u64) {
        let c = eng.core.counters();
        (c.bad_chains, c.queue_errors)
    }

    #[test]
    fn rx_refuses_bad_chains_and_keeps_going() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::readable(0x8000, 8)]); // device-readable on rx
        ring.post(&[Desc::writable(MEM - 4, 8)]); // runs past the end of memory
        ring.post(&[Desc::writable(u64::MAX - 2, 8)]); // wraps the address space
        ring.post(&[Desc::writable(0x9000, 0)]); // no bytes
        ring.post(&[Desc::writable(0xa000, 8)]); // fine
        let mut eng = engine_with(PAYLOAD);
        let pass = eng.process(RX, &mut ring.queue, &mem).unwrap();
        assert_eq!(pass.completed, 5);
        assert_eq!(eng.core.counters().bad_chains, 4);
        for i in 0..4 {
            assert_eq!(ring.used(i).1, 0, "bad chain {i} completes with length 0");
        }
        assert_eq!(ring.used(4), (4, 8));
        assert_eq!(
            ring.read(0xa000, 8),
            PAYLOAD,
            "no byte lost to the bad chains"
        );
    }

    #[test]
    fn loops_and_bad_next_indices_are_refused() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x8000, 4).link(Link::Slot(0))]); // points at itself
        ring.post(&[Desc::writable(0x9000, 4).link(Link::Raw(99))]); // next past the table
        ring.post(&[Desc::writable(0xa000, 8)]); // fine
        let mut eng = engine_with(b"12345678");
        let pass = eng.process(RX, &mut ring.queue, &mem).unwrap();
        assert_eq!(pass.completed, 3);
        assert_eq!(eng.core.counters().bad_chains, 2);
        assert_eq!(ring.used(0), (0, 0));
        assert_eq!(ring.used(1), (1, 0));
        assert_eq!(ring.used(2), (2, 8));
    }

    #[test]
    fn tx_refuses_writable_descriptors() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x8000, 4)]);
        let mut eng = engine_with(b"");
        let pass = eng.process(TX, &mut ring.queue, &mem).unwrap();
        assert_eq!(pass.completed, 1);
        assert_eq!(eng.core.counters().bad_chains, 1);
        assert_eq!(ring.used(0), (0, 0));
        assert!(eng.device.capture.is_empty());
    }

    #[test]
    fn a_head_outside_the_table_breaks_the_ring_without_losing_data() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x8000, 4)]);
        // A second avail entry naming head 300 in a 16-entry table.
        ring.push_avail(300);
        let mut eng = engine_with(b"abcdefgh");
        assert!(eng.process(RX, &mut ring.queue, &mem).is_err());
        assert_eq!(ring.used(0), (0, 4), "the good chain before it completed");
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(eng.device.fifo.len(), 4, "no byte went to the bad head");
        assert_eq!(eng.device.rx_bytes, 4);
        assert_eq!(eng.core.counters().queue_errors, 1);
    }

    #[test]
    fn avail_index_jump_is_a_queue_error() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x8000, 4)]);
        ring.set_avail_idx(100); // more than the queue size ahead
        let mut eng = engine_with(b"x");
        assert!(eng.process(RX, &mut ring.queue, &mem).is_err());
        assert_eq!(eng.core.counters().queue_errors, 1);
    }

    /// Each malformed receive chain of the table in `chain.rs`, then a good
    /// one: the bad chain completes with length 0 and counts in
    /// `bad_chains`, no byte is lost, and the queue keeps working.
    #[test]
    fn a_malformed_rx_chain_is_completed_empty_and_the_queue_goes_on() {
        for c in rx_cases() {
            let mem = memory();
            let mut ring = Ring::new(&mem);
            let bad = (c.post)(&mut ring);
            let good = ring.post(&[Desc::writable(GOOD, 8)]);
            let mut eng = engine_with(PAYLOAD);
            let pass = eng.process(RX, &mut ring.queue, &mem);
            assert!(pass.is_ok(), "{}: the queue broke: {pass:?}", c.name);
            assert_eq!(
                ring.all_used(),
                vec![(bad.into(), 0), (good.into(), 8)],
                "{}: bad chain completed with length 0, then the good chain with the payload",
                c.name
            );
            assert_eq!(ring.read(GOOD, 8), PAYLOAD, "{}: no byte lost", c.name);
            assert_eq!(faults(&eng), (1, 0), "{}: counters", c.name);
            assert_eq!((eng.device.rx_bytes, eng.device.rx_buffers), (8, 1));

            // The queue is not dead.
            let again = ring.post(&[Desc::writable(GOOD2, 16)]);
            eng.device.fifo.extend(b"still alive");
            eng.process(RX, &mut ring.queue, &mem).unwrap();
            assert_eq!(ring.used_idx(), 3, "{}: {:?}", c.name, ring.all_used());
            assert_eq!(ring.used(2), (again.into(), 11), "{}", c.name);
            assert_eq!(ring.read(GOOD2, 11), b"still alive", "{}", c.name);
        }
    }

    /// The same for each malformed transmit chain: only the good chain's
    /// bytes reach the device.
    #[test]
    fn a_malformed_tx_chain_is_completed_empty_and_the_queue_goes_on() {
        for c in tx_cases() {
            let mem = memory();
            let mut ring = Ring::new(&mem);
            let bad = (c.post)(&mut ring);
            ring.write(GOOD, b"good bytes");
            let good = ring.post(&[Desc::readable(GOOD, 10)]);
            let mut eng = engine_with(b"");
            let pass = eng.process(TX, &mut ring.queue, &mem);
            assert!(pass.is_ok(), "{}: the queue broke: {pass:?}", c.name);
            assert_eq!(
                ring.all_used(),
                vec![(bad.into(), 0), (good.into(), 0)],
                "{}",
                c.name
            );
            let captured = std::mem::take(&mut eng.device.capture);
            assert_eq!(
                captured,
                b"good bytes",
                "{}: only the good chain's bytes are captured ({} bytes captured)",
                c.name,
                captured.len()
            );
            assert_eq!(
                (faults(&eng), eng.device.tx_bytes),
                ((1, 0), 10),
                "{}: counters",
                c.name
            );

            ring.write(GOOD2, b"still alive");
            let again = ring.post(&[Desc::readable(GOOD2, 11)]);
            eng.process(TX, &mut ring.queue, &mem).unwrap();
            assert_eq!(ring.used_idx(), 3, "{}: {:?}", c.name, ring.all_used());
            assert_eq!(ring.used(2), (again.into(), 0), "{}", c.name);
            assert_eq!(eng.device.capture, b"still alive", "{}", c.name);
        }
    }

    /// With the trace on, a pass records each chain popped or refused and
    /// each used element, in ring order, with the lengths the ring got.
    #[test]
    fn the_trace_records_chains_and_completions_in_order() {
        use crate::trace::EventKind as E;
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::readable(0x8000, 8)]); // device-readable on rx: refused
        ring.post(&[Desc::writable(0xa000, 8)]);
        let mut eng = engine_with(PAYLOAD);
        eng.core.trace().start(16).unwrap();
        eng.process(RX, &mut ring.queue, &mem).unwrap();
        let d = eng.core.trace().dump();
        let kinds: Vec<E> = d.events.into_iter().map(|e| e.kind).collect();
        assert!(
            matches!(&kinds[0], E::ChainRefused { queue: RX, head: 0, why } if !why.is_empty()),
            "{kinds:?}"
        );
        assert_eq!(
            kinds[1..],
            [
                E::ChainPopped {
                    queue: RX,
                    head: 1,
                    readable: 0,
                    writable: 8
                },
                E::UsedPushed {
                    queue: RX,
                    id: 0,
                    len: 0
                },
                E::UsedPushed {
                    queue: RX,
                    id: 1,
                    len: 8
                },
            ]
        );
        assert_eq!(d.dropped, 0);
    }

    #[test]
    fn with_the_trace_off_nothing_is_recorded() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0xa000, 8)]);
        let mut eng = engine_with(PAYLOAD);
        eng.process(RX, &mut ring.queue, &mem).unwrap();
        assert!(eng.core.trace().dump().events.is_empty());
    }
}
