//! Queue helpers: descriptor chains checked before a device touches them.
//!
//! The guest is untrusted. Before [`crate::VirtioDevice::handle_chain`] sees
//! a chain, the core has walked it once and checked every descriptor: the
//! direction the queue allows, inside guest memory (no wrap), a bounded total
//! length, and a proper end (a loop, a bad next index or a broken indirect
//! table is detected, not merely bounded). A device then reads or writes the
//! chain through [`Chain`], which cannot reach outside it.

use std::io::{Read, Write};

use thiserror::Error;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, GuestMemory, GuestMemoryMmap, Permissions};

/// Largest descriptor chain, in bytes, the core accepts on any queue unless
/// the queue says otherwise ([`QueueSpec::max_chain_bytes`]). Longer chains
/// are refused rather than allowed to make a device allocate without bound.
pub const DEFAULT_MAX_CHAIN_BYTES: u64 = 1 << 20;

/// Which way data moves on a queue: which descriptors a chain may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to driver: every descriptor is device-writable (a receive or
    /// event queue).
    DeviceWrites,
    /// Driver to device: every descriptor is device-readable (a transmit
    /// queue).
    DeviceReads,
    /// A request/response queue: device-readable descriptors first, then
    /// device-writable ones (virtio's usual request layout).
    ReadThenWrite,
}

/// One virtqueue of a device, as the device declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// Short name, used by the control plane (`"rx"`, `"events"`, ...):
    /// faults and interrupt modes select queues by it. Not `"all"`.
    pub name: &'static str,
    /// Largest queue size the device accepts.
    pub max_size: u16,
    /// Which descriptors a chain may hold.
    pub direction: Direction,
    /// Longest chain, in bytes, accepted on this queue.
    pub max_chain_bytes: u64,
}

impl QueueSpec {
    /// A queue with the default chain limit ([`DEFAULT_MAX_CHAIN_BYTES`]).
    pub const fn new(name: &'static str, max_size: u16, direction: Direction) -> Self {
        Self {
            name,
            max_size,
            direction,
            max_chain_bytes: DEFAULT_MAX_CHAIN_BYTES,
        }
    }
}

/// Why a descriptor chain was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor has the wrong direction for the queue (or, on a
    /// request/response queue, a readable descriptor follows a writable one).
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
    /// The chain adds up to more bytes than the queue accepts in one buffer.
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
    /// The device refused the chain's contents (a malformed request).
    #[error("chain {head}: {detail}")]
    Device {
        /// Head index of the chain.
        head: u16,
        /// What is wrong with it.
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

/// A validated descriptor chain, handed to a device. Reads see only the
/// chain's device-readable bytes, writes land only in its device-writable
/// bytes.
#[derive(Debug)]
pub struct Chain<'a> {
    inner: DescriptorChain<&'a GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    readable: u64,
    writable: u64,
}

impl<'a> Chain<'a> {
    /// Head index (the id the used ring will carry).
    pub fn head(&self) -> u16 {
        self.inner.head_index()
    }

    /// Device-readable bytes in the chain.
    pub fn readable_len(&self) -> u64 {
        self.readable
    }

    /// Device-writable bytes in the chain.
    pub fn writable_len(&self) -> u64 {
        self.writable
    }

    fn access(&self, e: impl std::fmt::Display) -> ChainError {
        ChainError::Access {
            head: self.head(),
            detail: e.to_string(),
        }
    }

    /// Append every device-readable byte to `out`; returns how many.
    pub fn read_to_end(&self, out: &mut Vec<u8>) -> Result<usize, ChainError> {
        let mut reader = self
            .inner
            .clone()
            .reader::<()>(self.mem)
            .map_err(|e| self.access(e))?;
        reader.read_to_end(out).map_err(|e| self.access(e))
    }

    /// Write `parts`, one after the other, at the start of the chain's
    /// device-writable bytes; returns how many bytes were written (at most
    /// [`Chain::writable_len`]: what does not fit is not written).
    pub fn write(&self, parts: &[&[u8]]) -> Result<usize, ChainError> {
        let mut writer = self
            .inner
            .clone()
            .writer::<()>(self.mem)
            .map_err(|e| self.access(e))?;
        let mut written = 0;
        for part in parts {
            let n = part.len().min(writer.available_bytes());
            writer.write_all(&part[..n]).map_err(|e| self.access(e))?;
            written += n;
        }
        Ok(written)
    }
}

/// Walk `chain` once and check it against `spec` before anyone touches its
/// buffers. Returns the checked chain.
pub fn validate<'a>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    spec: &QueueSpec,
) -> Result<Chain<'a>, ChainError> {
    let head = chain.head_index();
    let mut readable: u64 = 0;
    let mut writable: u64 = 0;
    let mut count = 0;
    let mut last_has_next = false;
    let mut seen_writable = false;
    for (index, desc) in chain.clone().enumerate() {
        count = index + 1;
        last_has_next = desc.has_next();
        let writes = desc.is_write_only();
        let allowed = match spec.direction {
            Direction::DeviceWrites => writes,
            Direction::DeviceReads => !writes,
            Direction::ReadThenWrite => writes || !seen_writable,
        };
        seen_writable |= writes;
        if !allowed {
            return Err(ChainError::WrongDirection {
                queue: spec.name,
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
        if writes {
            writable += u64::from(len);
        } else {
            readable += u64::from(len);
        }
        if readable + writable > spec.max_chain_bytes {
            return Err(ChainError::TooLong {
                head,
                len: readable + writable,
                max: spec.max_chain_bytes,
            });
        }
    }
    // virtio-queue's walk stops silently after queue-size descriptors or at
    // a bad next index or indirect table; a chain whose last descriptor we
    // saw still points onwards is malformed, not merely short.
    if last_has_next {
        return Err(ChainError::Runaway { head, count });
    }
    if readable + writable == 0 {
        return Err(ChainError::Empty { head });
    }
    Ok(Chain {
        inner: chain,
        mem,
        readable,
        writable,
    })
}
