//! Numbers from `docs/device-spec.md`, the contract that this backend and the
//! guest driver both follow. Change them there first.

/// Default virtio device id of the qw device: 21, reserved by the virtio
/// specification ("signal distribution") but with no Linux driver, no device
/// model elsewhere, and not among crosvm's ids (which count down from 63).
/// It must also be an id QEMU has a name for (<= 41 in QEMU 10.2 to 11.1), or
/// `vhost-user-test-device-pci` aborts. The VMM configuration and the
/// driver's `virtio_id` module parameter can both change it.
pub const DEFAULT_VIRTIO_ID: u16 = 21;

/// Receive queue: device to driver. The driver posts device-writable buffers.
pub const RX_QUEUE: u16 = 0;
/// Transmit queue: driver to device. The driver posts device-readable buffers.
pub const TX_QUEUE: u16 = 1;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 2;
/// Largest queue size the device accepts.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Largest descriptor chain, in bytes, the device accepts on either queue.
/// Longer chains are refused (completed with length 0) rather than allowed to
/// make the device allocate without bound.
pub const MAX_CHAIN_BYTES: u64 = 1 << 20;
