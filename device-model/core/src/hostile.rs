//! Hostile-device mode: the device breaking the virtio contract on purpose,
//! to harden drivers.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::engine::Core;

/// Put `head` on `queue`'s used ring with `len`.
pub(crate) fn complete(
    _core: &mut Core,
    _queue: u16,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    _buffer_len: u64,
) -> Result<(), virtio_queue::Error> {
    q.add_used(mem, head, len)
}
