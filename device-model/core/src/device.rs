//! The trait a device model implements: [`VirtioDevice`].

use std::os::fd::RawFd;

use serde_json::{Map, Value};

use crate::chain::{Chain, ChainError, QueueSpec};
use crate::state::Core;

/// Fields of a control-plane reply (`{"ok":true, ...fields}`), or of the
/// device's counters: a JSON object.
pub type Fields = Map<String, Value>;

/// What a device did with one descriptor chain ([`VirtioDevice::handle_chain`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Put the chain on the used ring with this used length: the number of
    /// bytes the device wrote into the chain's device-writable part (0 for a
    /// chain the device only read).
    Complete {
        /// The used length.
        used_len: u32,
    },
    /// Not now (no data for it yet, no room for its data): leave the chain on
    /// the available ring and end this pass over the queue. The core runs the
    /// queue again on the next kick, tick or control request, or when the
    /// device asks ([`Core::request_pass`]).
    Defer,
    /// The chain is malformed for this device: the core completes it with
    /// length 0, counts it in `bad_chains` and logs it (once at warning
    /// level, then at debug level, so a guest cannot flood the host log).
    Refuse(ChainError),
}

/// A device model served by the core.
///
/// The core owns the transport (vhost-user, the vrings, guest memory),
/// validation, interrupts, faults, the control plane and the generic
/// counters; the device owns its data and answers a few questions. All
/// methods are called with the device's lock held (one lock covers the
/// device and its [`Core`]), from the vhost-user worker thread or the
/// control-plane thread, so they must be quick and must not block.
///
/// Shape of a device:
///
/// - **queues**: [`queues`](Self::queues) lists them once, in index order,
///   with a name, a maximum size and a direction; the core checks every
///   chain against it before [`handle_chain`](Self::handle_chain) sees it.
/// - **driver-initiated work** (a transmit or request queue): the driver
///   posts a chain and kicks; the core calls `handle_chain`.
/// - **device-initiated work** (a receive queue, an event queue, periodic
///   samples): the driver posts empty buffers; the device says it has
///   something through [`wants_buffers`](Self::wants_buffers), and produces
///   it from a host request ([`control`](Self::control)) or from its own
///   timer ([`tick`](Self::tick), period set with [`Core::set_tick`]). After
///   either, the core runs every queue.
/// - **config space**: [`config_space`](Self::config_space) renders it
///   (the core windows the reads); [`write_config`](Self::write_config)
///   takes the driver's writes (read-only by default).
/// - **host control**: the core answers `ping`, `stats`, `interrupt_mode`,
///   `reset`, `needs_reset`, `config` and `fault` (faults and hostile mode
///   included); every other request goes to [`control`](Self::control).
/// - **counters**: [`counters`](Self::counters) are merged with the core's
///   in the `stats` reply.
///
/// See `docs/device-framework.md` for a walk-through.
pub trait VirtioDevice: Send + 'static {
    /// Short name, for logs and the vhost-user daemon.
    fn name(&self) -> &'static str;

    /// The device's queues, in index order. Called once, when the device is
    /// put in an [`crate::Engine`]; the list must not change afterwards.
    fn queues(&self) -> Vec<QueueSpec>;

    /// Device-specific virtio feature bits to offer. The core always adds
    /// VERSION_1, RING_EVENT_IDX and RING_INDIRECT_DESC. Note that Cloud
    /// Hypervisor's generic vhost-user frontend never passes device feature
    /// bits to the guest: put capabilities in config space.
    fn features(&self) -> u64 {
        0
    }

    /// The driver acknowledged these features (all bits, transport included).
    fn acked_features(&mut self, _features: u64) {}

    /// The whole config space as the driver would read it now. The core
    /// serves windows of it (reads past the end return zeros) and the
    /// control plane's `config` request shows it. `core` gives the generic
    /// state a device may expose (needs-reset, error counts, interrupt modes).
    fn config_space(&self, core: &Core) -> Vec<u8>;

    /// The driver wrote `data` at `offset` in config space. The default
    /// refuses: the config space is read-only. An error is logged and the
    /// write changes nothing; the VMM's SET_CONFIG is still answered as done
    /// (an error would end the whole vhost-user connection).
    fn write_config(&mut self, offset: u32, _data: &[u8], _core: &mut Core) -> Result<(), String> {
        Err(format!(
            "the config space is read-only (write at offset {offset})"
        ))
    }

    /// Whether the device can use a buffer of `queue` now. The core pops the
    /// next available chain only while this holds, so a device with nothing
    /// to deliver leaves the driver's buffers posted (and a malformed buffer
    /// is only looked at when it would be used). Default: always.
    fn wants_buffers(&self, _queue: u16) -> bool {
        true
    }

    /// Handle one validated chain of `queue`: read the request from it,
    /// write the response or data into it, and say what to do with it.
    /// Called only while [`wants_buffers`](Self::wants_buffers) holds.
    fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome;

    /// Forget the device's data (the control plane's `reset` request).
    /// Counters describe the whole session and are usually kept.
    fn reset(&mut self, core: &mut Core);

    /// The driver (or the VMM) stopped `queue` (GET_VRING_BASE: a driver
    /// reset, a module unload, a disconnect). The core has already cleared
    /// the queue's broken state and needs-reset.
    fn queue_stopped(&mut self, _queue: u16, _core: &mut Core) {}

    /// Every queue has been stopped since any of them last ran: the driver
    /// reset the device (or the VMM stopped it). Called once per such reset,
    /// after the last [`queue_stopped`](Self::queue_stopped); the place to
    /// return to power-on state (usually [`reset`](Self::reset)).
    /// A queue counts as running again once it is kicked.
    fn device_reset(&mut self, _core: &mut Core) {}

    /// A device-specific control request: `op` is its `"op"` field and
    /// `request` the whole JSON object. Return `None` if the device does not
    /// know `op` (the client is told so), `Some(Ok(fields))` to answer
    /// `{"ok":true, ...fields}`, `Some(Err(why))` to answer
    /// `{"ok":false,"error":why}`. After a successful request the core runs
    /// every queue.
    fn control(
        &mut self,
        _op: &str,
        _request: &Value,
        _core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        None
    }

    /// The device's own counters (a JSON object); the `stats` reply merges
    /// them with the core's ([`crate::CoreCounters`]). Names must not clash
    /// with the core's.
    fn counters(&self) -> Fields;

    /// Fields added to every control reply (for example buffer levels).
    fn reply_fields(&self) -> Fields {
        Fields::new()
    }

    /// The device's timer fired `ticks` times since the last call (period set
    /// with [`Core::set_tick`]; several ticks mean the thread was late, so a
    /// rate can be kept). Return whether the queues need a pass (new data).
    fn tick(&mut self, _ticks: u64, _core: &mut Core) -> bool {
        false
    }

    /// A descriptor the vhost-user worker thread watches for the device:
    /// readable when the device has host-side I/O to do (for example an
    /// epoll set of host sockets carrying its data, so that bytes move
    /// between the host and the queues with no thread hop). Asked once per
    /// VMM connection. Default: none.
    fn io_fd(&self) -> Option<RawFd> {
        None
    }

    /// [`io_fd`](Self::io_fd) is readable: do the host-side I/O (on the
    /// worker thread). Return whether the queues need a pass.
    fn io_ready(&mut self, _core: &mut Core) -> bool {
        false
    }

    /// A pass over `queue` ended: host-side I/O that follows it (for
    /// example sending what the driver wrote to a host socket). Return
    /// whether `queue` needs another pass (room was freed for chains the
    /// device deferred).
    fn after_pass(&mut self, _queue: u16, _core: &mut Core) -> bool {
        false
    }
}

/// Serialise `value` (a struct of counters, say) into [`Fields`]; anything
/// that is not a JSON object gives an empty map.
pub fn to_fields<T: serde::Serialize>(value: &T) -> Fields {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => map,
        _ => Fields::new(),
    }
}
