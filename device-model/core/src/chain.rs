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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testing::{memory, Desc, Link, Ring, MEM, QUEUE_SIZE, W};
    use virtio_queue::QueueOwnedT;

    /// A malformed chain: how the driver posts it (returning its head), and
    /// the refusal [`validate`] must give.
    pub(crate) struct Malformed {
        pub(crate) name: &'static str,
        pub(crate) post: fn(&mut Ring<'_>) -> u16,
        pub(crate) refusal: fn(&ChainError) -> bool,
    }

    const MAX: u32 = DEFAULT_MAX_CHAIN_BYTES as u32;

    fn case(
        name: &'static str,
        post: fn(&mut Ring<'_>) -> u16,
        refusal: fn(&ChainError) -> bool,
    ) -> Malformed {
        Malformed {
            name,
            post,
            refusal,
        }
    }

    /// Malformed chains on a device-writes queue (a receive queue).
    pub(crate) fn rx_cases() -> Vec<Malformed> {
        let mut cases = rx_table_cases();
        cases.extend(rx_indirect_cases());
        cases
    }

    /// Receive chains in the descriptor table itself.
    fn rx_table_cases() -> Vec<Malformed> {
        vec![
            // Wrong direction.
            case(
                "rx_readable_descriptor",
                |r| r.post(&[Desc::readable(0x10000, 8)]),
                |e| matches!(e, ChainError::WrongDirection { index: 0, .. }),
            ),
            case(
                "rx_chain_with_a_readable_tail",
                |r| r.post(&[Desc::writable(0x10000, 4), Desc::readable(0x11000, 4)]),
                |e| matches!(e, ChainError::WrongDirection { index: 1, .. }),
            ),
            // Outside guest memory.
            case(
                "rx_descriptor_past_the_end_of_memory",
                |r| r.post(&[Desc::writable(MEM - 4, 8)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 0, .. }),
            ),
            case(
                "rx_descriptor_far_outside_memory",
                |r| r.post(&[Desc::writable(0x1_0000_0000, 8)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 0, .. }),
            ),
            case(
                "rx_second_descriptor_outside_memory",
                |r| r.post(&[Desc::writable(0x10000, 4), Desc::writable(MEM, 4)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 1, .. }),
            ),
            case(
                "rx_descriptor_wrapping_the_address_space",
                |r| r.post(&[Desc::writable(u64::MAX - 3, 8)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 0, .. }),
            ),
            // Zero bytes in total.
            case(
                "rx_zero_length_descriptor",
                |r| r.post(&[Desc::writable(0x10000, 0)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "rx_chain_of_zero_length_descriptors",
                |r| r.post(&[Desc::writable(0x10000, 0), Desc::writable(0x11000, 0)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            // Longer than 1 MiB in total (each descriptor inside memory).
            case(
                "rx_chain_longer_than_1_mib",
                |r| {
                    r.post(&[
                        Desc::writable(0x100000, MAX / 2),
                        Desc::writable(0x200000, MAX / 2 + 1),
                    ])
                },
                |e| matches!(e, ChainError::TooLong { .. }),
            ),
            // The virtio spec (2.7.5.3): no loops, `next` inside the table,
            // no indirect table inside an indirect table. virtio-queue's walk
            // stops silently on all of them, so the core has to notice.
            //
            // A descriptor loop: 0 -> 1 -> 0 -> ... (never ends).
            case(
                "rx_descriptor_loop",
                |r| {
                    r.post(&[
                        Desc::writable(0x10000, 16),
                        Desc::writable(0x11000, 16).link(Link::Slot(0)),
                    ])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
            case(
                "rx_next_outside_the_table",
                |r| r.post(&[Desc::writable(0x10000, 8).link(Link::Raw(QUEUE_SIZE + 44))]),
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
        ]
    }

    /// Receive chains through an indirect table.
    fn rx_indirect_cases() -> Vec<Malformed> {
        vec![
            // Indirect tables. One virtio-queue cannot use at all (outside
            // memory, a length not a multiple of 16, or 0) yields no
            // descriptor, so the chain has no bytes; one that breaks off
            // midway leaves its last entry pointing onwards.
            case(
                "rx_indirect_table_outside_memory",
                |r| r.post(&[Desc::indirect(MEM + 0x1000, 16)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "rx_indirect_table_length_not_a_multiple_of_16",
                |r| {
                    r.write_table(
                        0x20000,
                        &[Desc::writable(0x10000, 8), Desc::writable(0x11000, 8)],
                    );
                    r.post(&[Desc::indirect(0x20000, 24)])
                },
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "rx_indirect_table_of_zero_length",
                |r| r.post(&[Desc::indirect(0x20000, 0)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "rx_indirect_table_running_past_the_end_of_memory",
                |r| {
                    // Entry 0 is fine and links to entry 1, past the end.
                    r.write_table(MEM - 16, &[Desc::writable(0x10000, 8).link(Link::Slot(1))]);
                    r.post(&[Desc::indirect(MEM - 16, 32)])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
            case(
                "rx_indirect_entry_outside_memory",
                |r| {
                    r.write_table(
                        0x20000,
                        &[Desc::writable(0x10000, 4), Desc::writable(MEM - 2, 4)],
                    );
                    r.post(&[Desc::indirect(0x20000, 32)])
                },
                |e| matches!(e, ChainError::OutOfMemory { index: 1, .. }),
            ),
            case(
                "rx_indirect_entry_readable",
                |r| {
                    r.write_table(
                        0x20000,
                        &[Desc::writable(0x10000, 4), Desc::readable(0x11000, 4)],
                    );
                    r.post(&[Desc::indirect(0x20000, 32)])
                },
                |e| matches!(e, ChainError::WrongDirection { index: 1, .. }),
            ),
            case(
                "rx_indirect_inside_an_indirect_table",
                |r| {
                    r.write_table(0x21000, &[Desc::writable(0x11000, 8)]);
                    r.write_table(
                        0x20000,
                        &[
                            Desc::writable(0x10000, 8),
                            Desc::indirect(0x21000, 16).with_flags(W),
                        ],
                    );
                    r.post(&[Desc::indirect(0x20000, 32)])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
            case(
                "rx_indirect_loop",
                |r| {
                    r.write_table(
                        0x20000,
                        &[
                            Desc::writable(0x10000, 8),
                            Desc::writable(0x11000, 8).link(Link::Slot(0)),
                        ],
                    );
                    r.post(&[Desc::indirect(0x20000, 32)])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
        ]
    }

    /// Malformed chains on a device-reads queue (a transmit queue). The
    /// readable ones carry bytes, which must not reach the device.
    pub(crate) fn tx_cases() -> Vec<Malformed> {
        vec![
            case(
                "tx_writable_descriptor",
                |r| {
                    r.write(0x10000, b"WRONGDIR");
                    r.post(&[Desc::writable(0x10000, 8)])
                },
                |e| matches!(e, ChainError::WrongDirection { index: 0, .. }),
            ),
            case(
                "tx_chain_with_a_writable_tail",
                |r| {
                    r.write(0x10000, b"HEAD");
                    r.post(&[Desc::readable(0x10000, 4), Desc::writable(0x11000, 4)])
                },
                |e| matches!(e, ChainError::WrongDirection { index: 1, .. }),
            ),
            case(
                "tx_descriptor_past_the_end_of_memory",
                |r| r.post(&[Desc::readable(MEM - 4, 8)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 0, .. }),
            ),
            case(
                "tx_descriptor_wrapping_the_address_space",
                |r| r.post(&[Desc::readable(u64::MAX - 3, 8)]),
                |e| matches!(e, ChainError::OutOfMemory { index: 0, .. }),
            ),
            case(
                "tx_zero_length_descriptor",
                |r| r.post(&[Desc::readable(0x10000, 0)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "tx_chain_longer_than_1_mib",
                |r| {
                    r.post(&[
                        Desc::readable(0x100000, MAX / 2),
                        Desc::readable(0x200000, MAX / 2 + 1),
                    ])
                },
                |e| matches!(e, ChainError::TooLong { .. }),
            ),
            case(
                "tx_descriptor_loop",
                |r| {
                    r.write(0x10000, b"LOOP-A");
                    r.write(0x11000, b"LOOP-B");
                    r.post(&[
                        Desc::readable(0x10000, 6),
                        Desc::readable(0x11000, 6).link(Link::Slot(0)),
                    ])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
            case(
                "tx_next_outside_the_table",
                |r| {
                    r.write(0x10000, b"TRUNCATED");
                    r.post(&[Desc::readable(0x10000, 9).link(Link::Raw(QUEUE_SIZE + 44))])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
            case(
                "tx_indirect_table_outside_memory",
                |r| r.post(&[Desc::indirect(MEM + 0x1000, 16)]),
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "tx_indirect_table_length_not_a_multiple_of_16",
                |r| {
                    r.write(0x10000, b"INDIRECT");
                    r.write_table(
                        0x20000,
                        &[Desc::readable(0x10000, 8), Desc::readable(0x10000, 8)],
                    );
                    r.post(&[Desc::indirect(0x20000, 17)])
                },
                |e| matches!(e, ChainError::Empty { .. }),
            ),
            case(
                "tx_indirect_table_running_past_the_end_of_memory",
                |r| {
                    r.write(0x10000, b"PARTIAL!");
                    r.write_table(MEM - 16, &[Desc::readable(0x10000, 8).link(Link::Slot(1))]);
                    r.post(&[Desc::indirect(MEM - 16, 32)])
                },
                |e| matches!(e, ChainError::Runaway { .. }),
            ),
        ]
    }

    /// The first available chain of `ring`, validated against `spec`:
    /// its readable and writable lengths.
    fn first(
        ring: &mut Ring<'_>,
        mem: &GuestMemoryMmap,
        spec: &QueueSpec,
    ) -> Result<(u64, u64), ChainError> {
        let chain = ring
            .queue
            .iter(mem)
            .unwrap()
            .next()
            .expect("a chain is available");
        validate(mem, chain, spec).map(|c| (c.readable_len(), c.writable_len()))
    }

    fn spec(direction: Direction) -> QueueSpec {
        QueueSpec::new("q", QUEUE_SIZE, direction)
    }

    #[test]
    fn every_malformed_chain_is_refused_for_what_is_wrong_with_it() {
        // The table qw's protocol tests had (19 receive, 11 transmit cases).
        assert_eq!((rx_cases().len(), tx_cases().len()), (19, 11));
        for (direction, cases) in [
            (Direction::DeviceWrites, rx_cases()),
            (Direction::DeviceReads, tx_cases()),
        ] {
            for c in cases {
                let mem = memory();
                let mut ring = Ring::new(&mem);
                (c.post)(&mut ring);
                match first(&mut ring, &mem, &spec(direction)) {
                    Err(e) => assert!((c.refusal)(&e), "{}: refused as {e:?}", c.name),
                    Ok(lens) => panic!("{}: accepted ({lens:?})", c.name),
                }
            }
        }
    }

    #[test]
    fn well_formed_chains_are_accepted_with_their_lengths() {
        let mem = memory();
        let writes = spec(Direction::DeviceWrites);
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x10000, 3), Desc::writable(0x11000, 5)]);
        assert_eq!(first(&mut ring, &mem, &writes), Ok((0, 8)));
        // Indirect, and exactly the limit (1 MiB in two descriptors).
        let mut ring = Ring::new(&mem);
        ring.write_table(
            0x20000,
            &[
                Desc::writable(0x100000, MAX / 2),
                Desc::writable(0x200000, MAX / 2),
            ],
        );
        ring.post(&[Desc::indirect(0x20000, 32)]);
        assert_eq!(first(&mut ring, &mem, &writes), Ok((0, u64::from(MAX))));
        // A request/response queue: readable first, then writable.
        let rw = spec(Direction::ReadThenWrite);
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::readable(0x10000, 4), Desc::writable(0x11000, 2)]);
        assert_eq!(first(&mut ring, &mem, &rw), Ok((4, 2)));
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x11000, 2), Desc::readable(0x10000, 4)]);
        assert!(matches!(
            first(&mut ring, &mem, &rw),
            Err(ChainError::WrongDirection { index: 1, .. })
        ));
        // A lower limit of the queue's own.
        let small = QueueSpec {
            max_chain_bytes: 7,
            ..writes
        };
        let mut ring = Ring::new(&mem);
        ring.post(&[Desc::writable(0x10000, 8)]);
        assert_eq!(
            first(&mut ring, &mem, &small),
            Err(ChainError::TooLong {
                head: 0,
                len: 8,
                max: 7
            })
        );
    }

    #[test]
    fn a_chain_reads_and_writes_only_its_own_bytes() {
        let mem = memory();
        let mut ring = Ring::new(&mem);
        ring.write(0x10000, b"abcdefgh");
        ring.post(&[
            Desc::readable(0x10000, 3),
            Desc::writable(0x11000, 2),
            Desc::writable(0x12000, 2),
        ]);
        let chain = ring.queue.iter(&mem).unwrap().next().unwrap();
        let c = validate(&mem, chain, &spec(Direction::ReadThenWrite)).unwrap();
        assert_eq!(c.head(), 0);
        let mut got = Vec::new();
        assert_eq!(c.read_to_end(&mut got), Ok(3));
        assert_eq!(got, b"abc", "only the readable part");
        assert_eq!(c.write(&[b"xy", b"zw", b"never"]), Ok(4), "what fits");
        assert_eq!(ring.read(0x11000, 2), b"xy");
        assert_eq!(ring.read(0x12000, 3), b"zw\0");
        assert_eq!(
            ring.read(0x10000, 8),
            b"abcdefgh",
            "readable bytes untouched"
        );
    }
}
