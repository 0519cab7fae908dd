//! Hostile-device mode: the device breaking the virtio contract on purpose,
//! to harden drivers. Armed through the `fault` control request (kinds
//! `hostile_bogus_id`, `hostile_overlong`, `hostile_index_jump`,
//! `hostile_double_complete`; see [`crate::faults::Fault`]), one-shot or N
//! times, per queue. It acts where the core completes chains, so every
//! device has it without doing anything.
//!
//! What each violation puts on the used ring, for a chain with head `h`
//! whose buffer is `b` bytes long:
//!
//! - bogus id: one entry `(x, len)` with `x` an index the driver never made
//!   available: the smallest descriptor index that no available-ring slot
//!   names (every head in flight is in some slot: a slot is only rewritten
//!   after `size` newer posts), or the queue size when every index is named.
//!   `h` is never returned.
//! - overlong: one entry `(h, b + by)`.
//! - index jump: the entry `(h, len)`, then `used->idx` moves `by` further
//!   than the entries written; the device then goes on from there, and
//!   raises the next interrupt even if the driver's `used_event` says not
//!   to (the suppression check counts entries added, which a jump skips).
//! - double completion: two entries `(h, len)`.
//!
//! Each is counted (`hostile_*` counters) and logged at warning level.

use std::sync::atomic::Ordering;

use tracing::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::state::Core;
use crate::trace::EventKind;

/// An id the driver never made available on `q`: the smallest index below
/// the queue size that no available-ring slot names, else the queue size.
fn bogus_id(q: &Queue, mem: &GuestMemoryMmap, head: u16) -> u16 {
    let size = q.size();
    let mut named = vec![false; usize::from(size)];
    if let Some(h) = named.get_mut(usize::from(head)) {
        *h = true;
    }
    for slot in 0..u64::from(size) {
        let addr = GuestAddress(q.avail_ring() + 4 + 2 * slot);
        match mem.read_obj::<u16>(addr) {
            Ok(id) => {
                if let Some(n) = named.get_mut(usize::from(u16::from_le(id))) {
                    *n = true;
                }
            }
            // An unreadable ring: nothing is known, go out of range.
            Err(_) => return size,
        }
    }
    named.iter().position(|n| !n).map_or(size, |i| i as u16)
}

/// Put `head` on `queue`'s used ring with `len` (its buffer being
/// `buffer_len` bytes, readable plus writable), applying the hostile-mode
/// violations armed on the queue.
pub(crate) fn complete(
    core: &mut Core,
    queue: u16,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    buffer_len: u64,
) -> Result<(), virtio_queue::Error> {
    let Some(arms) = core.faults_mut().hostile_mut(queue).copied() else {
        return add_used(core, queue, q, mem, head, len);
    };
    if arms == Default::default() {
        return add_used(core, queue, q, mem, head, len);
    }
    if arms.bogus_id > 0 {
        if let Some(a) = core.faults_mut().hostile_mut(queue) {
            a.bogus_id -= 1;
        }
        let id = bogus_id(q, mem, head);
        warn!(
            queue,
            head, id, "hostile: completing a buffer under an id never made available"
        );
        core.counters_mut().hostile_bogus_ids += 1;
        trace_hostile(core, queue, "bogus_id");
        // add_used refuses an id >= the queue size; write the entry and the
        // index by hand then, as a broken device would (and signal: the
        // suppression check does not count that entry).
        return if id < q.size() {
            add_used(core, queue, q, mem, id, len)
        } else {
            core.faults_mut().force_next_signal(queue);
            trace_used(core, queue, id, len);
            raw_add_used(q, mem, id, len)
        };
    }
    let mut len = len;
    if arms.overlong.0 > 0 {
        if let Some(a) = core.faults_mut().hostile_mut(queue) {
            a.overlong.0 -= 1;
        }
        len = u32::try_from(buffer_len + u64::from(arms.overlong.1)).unwrap_or(u32::MAX);
        warn!(
            queue,
            head, len, buffer_len, "hostile: used length larger than the buffer"
        );
        core.counters_mut().hostile_overlong += 1;
        trace_hostile(core, queue, "overlong");
    }
    if arms.wrong_len.0 > 0 {
        if let Some(a) = core.faults_mut().hostile_mut(queue) {
            a.wrong_len.0 -= 1;
        }
        warn!(
            queue,
            head,
            len = arms.wrong_len.1,
            written = len,
            "fault: completing a buffer with a wrong used length"
        );
        len = arms.wrong_len.1;
        core.counters_mut().wrong_used_lens += 1;
        trace_hostile(core, queue, "wrong_used_len");
    }
    add_used(core, queue, q, mem, head, len)?;
    if arms.double_complete > 0 {
        if let Some(a) = core.faults_mut().hostile_mut(queue) {
            a.double_complete -= 1;
        }
        warn!(queue, head, "hostile: completing the same head twice");
        core.counters_mut().hostile_double_completions += 1;
        trace_hostile(core, queue, "double_completion");
        add_used(core, queue, q, mem, head, len)?;
    }
    if arms.index_jump.0 > 0 {
        if let Some(a) = core.faults_mut().hostile_mut(queue) {
            a.index_jump.0 -= 1;
        }
        let next = q.next_used().wrapping_add(arms.index_jump.1);
        warn!(
            queue,
            by = arms.index_jump.1,
            idx = next,
            "hostile: used index jumps past the entries written"
        );
        core.counters_mut().hostile_index_jumps += 1;
        trace_hostile(core, queue, "index_jump");
        core.faults_mut().force_next_signal(queue);
        q.set_next_used(next);
        store_used_idx(q, mem, next)?;
    }
    Ok(())
}

/// Write used entry `(id, len)` at the next used slot and publish it, without
/// the checks of `Queue::add_used`.
fn raw_add_used(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    id: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    let next = q.next_used();
    let slot = u64::from(next % q.size());
    let addr = GuestAddress(q.used_ring() + 4 + 8 * slot);
    let mut elem = [0u8; 8];
    elem[..4].copy_from_slice(&u32::from(id).to_le_bytes());
    elem[4..].copy_from_slice(&len.to_le_bytes());
    mem.write_slice(&elem, addr)
        .map_err(virtio_queue::Error::GuestMemory)?;
    let next = next.wrapping_add(1);
    q.set_next_used(next);
    store_used_idx(q, mem, next)
}

fn store_used_idx(q: &Queue, mem: &GuestMemoryMmap, idx: u16) -> Result<(), virtio_queue::Error> {
    // Release: the entries before the index are visible first, as in
    // Queue::add_used.
    mem.store(
        idx.to_le(),
        GuestAddress(q.used_ring() + 2),
        Ordering::Release,
    )
    .map_err(virtio_queue::Error::GuestMemory)
}

/// Put one used element on the ring, and trace it.
#[inline]
fn add_used(
    core: &Core,
    queue: u16,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    id: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    q.add_used(mem, id, len)?;
    trace_used(core, queue, id, len);
    Ok(())
}

#[inline]
fn trace_used(core: &Core, queue: u16, id: u16, len: u32) {
    core.trace()
        .record(|| EventKind::UsedPushed { queue, id, len });
}

fn trace_hostile(core: &Core, queue: u16, kind: &'static str) {
    core.trace().record(|| EventKind::Hostile { queue, kind });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{Direction, QueueSpec};
    use crate::faults::{Fault, QueueSel};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn setup(mem: &GuestMemoryMmap, posted: u16) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let descs: Vec<RawDescriptor> = (0..posted)
            .map(|i| {
                RawDescriptor::from(SplitDescriptor::new(
                    0x8000 + 0x100 * u64::from(i),
                    64,
                    VRING_DESC_F_WRITE as u16,
                    0,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let q: Queue = vq.create_queue().unwrap();
        (vq, q)
    }

    fn core_with(fault: Fault) -> Core {
        let mut core = Core::new(vec![QueueSpec::new("rx", 16, Direction::DeviceWrites)]);
        core.faults_mut()
            .apply(&fault, &[0], std::time::Instant::now())
            .unwrap();
        core
    }

    fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i as usize).unwrap().load();
        (e.id(), e.len())
    }

    #[test]
    fn each_violation_lands_on_the_used_ring_once() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let q = || QueueSel::named("rx");
        let (vq, mut queue) = setup(&mem, 3);
        let mut core = core_with(Fault::HostileBogusId {
            queue: q(),
            count: 1,
        });
        complete(&mut core, 0, &mut queue, &mem, 0, 8, 64).unwrap();
        let (id, len) = used(&vq, 0);
        assert_eq!(len, 8);
        assert!(id >= 3, "id {id} was posted (heads 0..3 are)");
        complete(&mut core, 0, &mut queue, &mem, 1, 8, 64).unwrap();
        assert_eq!(used(&vq, 1), (1, 8), "one-shot");
        assert_eq!(core.counters().hostile_bogus_ids, 1);

        let (vq, mut queue) = setup(&mem, 2);
        let mut core = core_with(Fault::HostileOverlong {
            queue: q(),
            count: 2,
            by: 100,
        });
        for h in 0..2 {
            complete(&mut core, 0, &mut queue, &mem, h, 8, 64).unwrap();
            assert_eq!(used(&vq, h), (u32::from(h), 164));
        }
        assert_eq!(core.counters().hostile_overlong, 2);

        let (vq, mut queue) = setup(&mem, 2);
        let mut core = core_with(Fault::HostileDoubleComplete {
            queue: q(),
            count: 1,
        });
        complete(&mut core, 0, &mut queue, &mem, 0, 8, 64).unwrap();
        assert_eq!((used(&vq, 0), used(&vq, 1)), ((0, 8), (0, 8)));
        assert_eq!(vq.used().idx().load(), 2);

        let (vq, mut queue) = setup(&mem, 2);
        let mut core = core_with(Fault::HostileIndexJump {
            queue: q(),
            count: 1,
            by: 5,
        });
        complete(&mut core, 0, &mut queue, &mem, 0, 8, 64).unwrap();
        assert_eq!(
            vq.used().idx().load(),
            6,
            "1 entry written, index 5 further"
        );
        complete(&mut core, 0, &mut queue, &mem, 1, 8, 64).unwrap();
        assert_eq!(used(&vq, 6), (1, 8), "the device goes on from the jump");
        assert_eq!(vq.used().idx().load(), 7);
    }

    #[test]
    fn wrong_used_lengths_replace_what_was_written() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (vq, mut queue) = setup(&mem, 3);
        let mut core = core_with(Fault::WrongUsedLen {
            queue: QueueSel::named("rx"),
            count: 2,
            len: 33,
        });
        complete(&mut core, 0, &mut queue, &mem, 0, 0, 64).unwrap();
        complete(&mut core, 0, &mut queue, &mem, 1, 8, 64).unwrap();
        complete(&mut core, 0, &mut queue, &mem, 2, 0, 64).unwrap();
        assert_eq!(
            (used(&vq, 0), used(&vq, 1), used(&vq, 2)),
            ((0, 33), (1, 33), (2, 0)),
            "two wrong lengths, then the truth"
        );
        assert_eq!(core.counters().wrong_used_lens, 2);
    }

    #[test]
    fn a_full_ring_gets_an_out_of_range_id() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (vq, mut queue) = setup(&mem, 16);
        let mut core = core_with(Fault::HostileBogusId {
            queue: QueueSel::named("rx"),
            count: 1,
        });
        complete(&mut core, 0, &mut queue, &mem, 0, 8, 64).unwrap();
        assert_eq!(used(&vq, 0), (16, 8));
        assert_eq!(vq.used().idx().load(), 1);
    }
}
