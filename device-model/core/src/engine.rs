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
// Where these lived before `crate::state`; the paths keep working.
pub use crate::state::{ConfigChangeUnsupported, Core, CoreCounters};

/// What one pass over a queue did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Chains completed (added to the used ring).
    pub completed: u32,
    /// Sum of the used lengths reported.
    pub bytes: u64,
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
        self.device.config_space(&self.core)
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
        {
            let core = &mut self.core;
            let mut iter = q.iter(mem).inspect_err(|_| core.queue_error())?;
            while self.device.wants_buffers(queue) {
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
                        core.refuse(&e);
                        (0, 0)
                    }
                    Ok(c) => {
                        let buffer = c.readable_len() + c.writable_len();
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
