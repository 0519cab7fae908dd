//! Test helpers for the unit tests beside the code: guest memory in the
//! test process and split rings laid out in it by virtio-queue's mock queue,
//! with descriptors written the way a (possibly hostile) driver writes them.
//! No transport and no other process: [`crate::chain::validate`] and
//! [`crate::Engine::process`] see the rings exactly as under the backend.

use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size: room for chains longer than 1 MiB.
pub(crate) const MEM: u64 = 0x40_0000;
/// Queue size of every test ring.
pub(crate) const QUEUE_SIZE: u16 = 16;
/// The device-writable flag, as a descriptor's `flags` holds it.
pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;

/// Guest memory of [`MEM`] bytes at address 0. The mock queue puts its ring
/// at 0 (descriptor table, available and used rings: under 0x200 bytes for
/// [`QUEUE_SIZE`]); buffers go from 0x8000 up.
pub(crate) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

/// Where a descriptor's `next` points.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Link {
    /// The following descriptor of the same chain (or table); none (no
    /// `NEXT`) for the last one.
    Auto,
    /// `NEXT` to the descriptor at this position of the same chain/table.
    Slot(u16),
    /// `NEXT` to this raw index, whatever it is (may be out of the table).
    Raw(u16),
}

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    link: Link,
}

impl Desc {
    /// A device-writable buffer.
    pub(crate) fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: W,
            link: Link::Auto,
        }
    }

    /// A device-readable buffer.
    pub(crate) fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            link: Link::Auto,
        }
    }

    /// An indirect descriptor: a table of `len / 16` descriptors at `addr`.
    pub(crate) fn indirect(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT as u16,
            link: Link::Auto,
        }
    }

    /// The same descriptor with `next` pointing as `link` says.
    pub(crate) fn link(mut self, link: Link) -> Self {
        self.link = link;
        self
    }

    /// The same descriptor with `flags` added.
    pub(crate) fn with_flags(mut self, flags: u16) -> Self {
        self.flags |= flags;
        self
    }
}

/// `descs` as raw descriptors, where slot `i` of the chain has index
/// `base + i`.
fn encode(descs: &[Desc], base: u16) -> Vec<RawDescriptor> {
    let next_flag = VRING_DESC_F_NEXT as u16;
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (flags, next) = match d.link {
                Link::Auto if i + 1 < descs.len() => (d.flags | next_flag, base + i as u16 + 1),
                Link::Auto => (d.flags, 0),
                Link::Slot(s) => (d.flags | next_flag, base + s),
                Link::Raw(n) => (d.flags | next_flag, n),
            };
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect()
}

/// A split ring of [`QUEUE_SIZE`] in `mem`, written by a test playing the
/// driver, and the device side's [`Queue`] over it.
pub(crate) struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    /// The device's view (its next available and used indices).
    pub(crate) queue: Queue,
    next_desc: u16,
}

impl<'a> Ring<'a> {
    /// An empty ring at address 0 of `mem`.
    pub(crate) fn new(mem: &'a GuestMemoryMmap) -> Self {
        let mock = MockSplitQueue::new(mem, QUEUE_SIZE);
        let queue = mock.create_queue().unwrap();
        Self {
            mem,
            mock,
            queue,
            next_desc: 0,
        }
    }

    /// Write `descs` as one chain in the next free table slots and make it
    /// available; returns its head.
    pub(crate) fn post(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in encode(descs, head).into_iter().enumerate() {
            self.mock
                .desc_table()
                .store(head + i as u16, d)
                .expect("the chain fits the descriptor table");
        }
        self.next_desc += descs.len() as u16;
        self.push_avail(head);
        head
    }

    /// Write `descs` as an indirect table at `addr`.
    pub(crate) fn write_table(&self, addr: u64, descs: &[Desc]) {
        for (i, d) in encode(descs, 0).into_iter().enumerate() {
            self.mem
                .write_obj(d, GuestAddress(addr + 16 * i as u64))
                .unwrap();
        }
    }

    /// Put `head`, whatever it is, in the available ring and publish the
    /// new index.
    pub(crate) fn push_avail(&self, head: u16) {
        let idx = self.mock.avail().idx().load();
        self.mock
            .avail()
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        self.mock.avail().idx().store(idx.wrapping_add(1));
    }

    /// Publish `idx` as the available index, whatever it is.
    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.mock.avail().idx().store(idx);
    }

    /// Used-ring entry `i`: (id, length).
    pub(crate) fn used(&self, i: u16) -> (u32, u32) {
        let e = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(i % QUEUE_SIZE))
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    /// Every used entry so far, oldest first.
    pub(crate) fn all_used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx()).map(|i| self.used(i)).collect()
    }

    /// The used index the device published.
    pub(crate) fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// `len` bytes of guest memory at `addr`.
    pub(crate) fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
        out
    }

    /// Put `data` in guest memory at `addr`.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
