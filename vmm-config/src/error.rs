//! The error type shared by parsing, validation and both renderers.

use std::fmt;
use std::path::PathBuf;

use crate::{
    MAX_CONFIG_SIZE, MAX_MEMORY_MIB, MAX_QUEUES, MAX_QUEUE_SIZE, MAX_SOCKET_PATH_LEN,
    MAX_VIRTIO_ID, MIN_MEMORY_MIB, MIN_VIRTIO_ID, QEMU_MAX_QUEUE_SIZE, QEMU_MAX_VIRTIO_ID,
};

/// Names one entry of `vhost_user` in error messages, e.g. `vhost_user[0] (vu0)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRef {
    /// Position in the `vhost_user` list.
    pub index: usize,
    /// The device's `id` (may be empty when the id itself is the problem).
    pub id: String,
}

impl DeviceRef {
    pub(crate) fn new(index: usize, id: &str) -> Self {
        Self {
            index,
            id: id.to_owned(),
        }
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            write!(f, "vhost_user[{}]", self.index)
        } else {
            write!(f, "vhost_user[{}] ({})", self.index, self.id)
        }
    }
}

/// Names one entry of `virtio_serial` in error messages, e.g.
/// `virtio_serial[0] (vs0)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRef {
    /// Position in the `virtio_serial` list.
    pub index: usize,
    /// The port's `id` (may be empty when the id itself is the problem).
    pub id: String,
}

impl PortRef {
    pub(crate) fn new(index: usize, id: &str) -> Self {
        Self {
            index,
            id: id.to_owned(),
        }
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.is_empty() {
            write!(f, "virtio_serial[{}]", self.index)
        } else {
            write!(f, "virtio_serial[{}] ({})", self.index, self.id)
        }
    }
}

/// Everything that can be wrong with a [`crate::VmConfig`].
///
/// Every message names the offending field and value and says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML text did not parse into a `VmConfig` (syntax error, missing
    /// required field, wrong type, or an unknown field such as a typo).
    #[error(
        "VM config TOML is invalid (keys are checked strictly, so a misspelt or unsupported key is reported as an unknown field; fix or remove it): {}",
        .0.to_string().trim_end()
    )]
    Toml(#[from] toml::de::Error),

    /// The config could not be serialised to TOML.
    #[error("cannot serialise VM config to TOML: {0}")]
    TomlSerialize(#[from] toml::ser::Error),

    /// A config file could not be read.
    #[error("cannot read VM config file {}: {source}; check the path and its permissions", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// `memory_mib` is outside `MIN_MEMORY_MIB..=MAX_MEMORY_MIB`.
    #[error(
        "memory_mib {value} is out of range: set memory_mib to between {MIN_MEMORY_MIB} (64 MiB, enough for a kernel plus initramfs) and {MAX_MEMORY_MIB} (1 TiB)"
    )]
    MemoryOutOfRange {
        /// The rejected value.
        value: u32,
    },

    /// `vcpus` is 0.
    #[error("vcpus {value} is out of range: a VM needs at least one vCPU; set vcpus to 1..=255")]
    VcpusOutOfRange {
        /// The rejected value.
        value: u8,
    },

    /// `kernel` is an empty path.
    #[error(
        "kernel is empty: set kernel to the path of the guest kernel image (e.g. \"/lab/vmlinuz\")"
    )]
    EmptyKernel,

    /// `initramfs` is present but empty.
    #[error(
        "initramfs is set to an empty path: set it to the path of the initramfs archive, or remove the initramfs key to boot without one"
    )]
    EmptyInitramfs,

    /// A path is not valid UTF-8, so it cannot be put on a `String` argv.
    #[error("{field} path {path:?} is not valid UTF-8: VMM arguments are rendered as UTF-8 strings; rename the file or use a UTF-8 path")]
    NonUtf8Path {
        /// The field holding the path, e.g. `kernel` or `vhost_user[0] (vu0).socket`.
        field: String,
        /// The rejected path.
        path: PathBuf,
    },

    /// `cmdline` contains a newline, carriage return or NUL.
    #[error(
        "cmdline {value:?} contains {what} at byte {offset}: the kernel command line must be a single line without NUL bytes; separate parameters with spaces instead"
    )]
    CmdlineControlChar {
        /// The rejected command line.
        value: String,
        /// Human-readable name of the forbidden character.
        what: &'static str,
        /// Byte offset of the first forbidden character.
        offset: usize,
    },

    /// A device's `id` is empty.
    #[error(
        "{device}: id is empty: give every vhost_user device a non-empty id made of [A-Za-z0-9_-], e.g. \"vu{index}\"",
        index = device.index
    )]
    EmptyDeviceId {
        /// The device.
        device: DeviceRef,
    },

    /// A device's `id` contains a character other than `[A-Za-z0-9_-]`.
    #[error(
        "{device}: id {id:?} contains {ch:?}: ids become QEMU chardev ids and Cloud Hypervisor device ids, so only [A-Za-z0-9_-] is allowed; rename it",
        id = device.id
    )]
    InvalidDeviceId {
        /// The device.
        device: DeviceRef,
        /// The first forbidden character.
        ch: char,
    },

    /// Two devices share an `id`.
    #[error(
        "{device}: id {id:?} is already used by vhost_user[{first_index}]: device ids must be unique; rename one of them",
        id = device.id
    )]
    DuplicateDeviceId {
        /// The later device.
        device: DeviceRef,
        /// Index of the first device with the same id.
        first_index: usize,
    },

    /// A device's `socket` path is empty.
    #[error(
        "{device}: socket is empty: set socket to the path of the backend's vhost-user Unix socket"
    )]
    EmptySocket {
        /// The device.
        device: DeviceRef,
    },

    /// A device's `socket` path does not fit in `sockaddr_un.sun_path`.
    #[error(
        "{device}: socket {path:?} is {len} bytes long: a Unix socket path must be shorter than 108 bytes (the sun_path limit, at most {MAX_SOCKET_PATH_LEN} bytes plus the NUL terminator); use a shorter directory such as /tmp or /run",
        path = path.display()
    )]
    SocketPathTooLong {
        /// The device.
        device: DeviceRef,
        /// The rejected path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },

    /// A device's `virtio_id` is outside `1..=63`.
    #[error(
        "{device}: virtio_id {value} is out of range: Linux virtio-pci accepts device ids {MIN_VIRTIO_ID}..={MAX_VIRTIO_ID} (it rejects PCI device ids above 0x107f, i.e. 0x1040 + 63); set virtio_id to the virtio device type number"
    )]
    VirtioIdOutOfRange {
        /// The device.
        device: DeviceRef,
        /// The rejected value.
        value: u16,
    },

    /// A device has no queues or too many queues.
    #[error(
        "{device}: queue_sizes has {count} entries: a device needs 1..={MAX_QUEUES} queues; list one size per virtqueue, e.g. queue_sizes = [256, 256]"
    )]
    QueueCountOutOfRange {
        /// The device.
        device: DeviceRef,
        /// The number of queues listed.
        count: usize,
    },

    /// A queue size is not a power of two in `1..=32768`.
    #[error(
        "{device}: queue_sizes[{queue}] = {size} is invalid: a split virtqueue size must be a power of two in 1..={MAX_QUEUE_SIZE}; use e.g. 256"
    )]
    InvalidQueueSize {
        /// The device.
        device: DeviceRef,
        /// Index into `queue_sizes`.
        queue: usize,
        /// The rejected size.
        size: u16,
    },

    /// `config_size` is larger than a virtio-pci device config window.
    #[error(
        "{device}: config_size {value} is too large: the device config space is at most {MAX_CONFIG_SIZE} bytes; set config_size to the size of the device's config struct (0 for none)"
    )]
    ConfigSizeTooLarge {
        /// The device.
        device: DeviceRef,
        /// The rejected value.
        value: u32,
    },

    /// QEMU's vhost-user-test-device has one `vq_size` for all queues.
    #[error(
        "{device}: queue_sizes {sizes:?} differ, but QEMU's vhost-user-test-device-pci has a single vq_size for all queues: make all queue sizes equal, or use Cloud Hypervisor, which supports per-queue sizes"
    )]
    QemuMixedQueueSizes {
        /// The device.
        device: DeviceRef,
        /// The listed sizes.
        sizes: Vec<u16>,
    },

    /// QEMU cannot create queues larger than `VIRTQUEUE_MAX_SIZE`.
    #[error(
        "{device}: queue size {size} is too large for QEMU: QEMU's VIRTQUEUE_MAX_SIZE is {QEMU_MAX_QUEUE_SIZE}; set queue_sizes to at most {QEMU_MAX_QUEUE_SIZE}, or use Cloud Hypervisor"
    )]
    QemuQueueSizeTooLarge {
        /// The device.
        device: DeviceRef,
        /// The rejected size.
        size: u16,
    },

    /// QEMU's generic vhost-user device names the device after its virtio
    /// id and aborts (an assertion) on ids it has no name for.
    #[error(
        "{device}: virtio_id {virtio_id} is unknown to QEMU: vhost-user-test-device-pci only accepts ids QEMU has a name for (1..={QEMU_MAX_VIRTIO_ID}; larger ids abort QEMU with 'virtio_id_to_name: Assertion failed'); pick an id in that range with no Linux driver, such as 21"
    )]
    QemuUnknownVirtioId {
        /// The device.
        device: DeviceRef,
        /// The rejected id.
        virtio_id: u16,
    },

    /// Cloud Hypervisor was asked to run with TCG.
    #[error(
        "accel \"tcg\" cannot be used with Cloud Hypervisor: Cloud Hypervisor has no software emulation (TCG); it needs KVM: set accel = \"kvm\" on a host with usable /dev/kvm, or use QEMU"
    )]
    CloudHypervisorNeedsKvm,

    /// Cloud Hypervisor has no reconnecting vhost-user socket option.
    #[error(
        "{device}: reconnect_ms = {value} is not supported by Cloud Hypervisor: its --generic-vhost-user has no reconnect option; remove reconnect_ms, or use QEMU"
    )]
    CloudHypervisorReconnectUnsupported {
        /// The device.
        device: DeviceRef,
        /// The rejected value.
        value: u32,
    },

    /// Cloud Hypervisor's option parser cannot carry this character in a value.
    #[error(
        "{device}: socket {path:?} contains {ch:?}: Cloud Hypervisor's option parser splits on ',' and treats '[', ']' and '\"' specially, with no escape; move the socket to a path without these characters",
        path = path.display()
    )]
    CloudHypervisorUnsupportedSocketChar {
        /// The device.
        device: DeviceRef,
        /// The rejected path.
        path: PathBuf,
        /// The first unsupported character.
        ch: char,
    },

    /// A virtio-serial port's `id` is empty.
    #[error(
        "{port}: id is empty: give every virtio_serial port a non-empty id made of [A-Za-z0-9_-], e.g. \"vs{index}\"",
        index = port.index
    )]
    EmptyPortId {
        /// The port.
        port: PortRef,
    },

    /// A virtio-serial port's `id` contains a character other than `[A-Za-z0-9_-]`.
    #[error(
        "{port}: id {id:?} contains {ch:?}: port ids become QEMU chardev ids, so only [A-Za-z0-9_-] is allowed; rename it",
        id = port.id
    )]
    InvalidPortId {
        /// The port.
        port: PortRef,
        /// The first forbidden character.
        ch: char,
    },

    /// A virtio-serial port's `id` is already used by a device or another port.
    #[error(
        "{port}: id {id:?} is already used by {first}: ports and vhost_user devices share QEMU's chardev ids, which must be unique; rename one of them",
        id = port.id
    )]
    DuplicatePortId {
        /// The later port.
        port: PortRef,
        /// The device or port that has the id first, e.g. `vhost_user[0] (vu0)`.
        first: String,
    },

    /// Two virtio-serial ports share a `name`.
    #[error(
        "{port}: name {name:?} is already used by virtio_serial[{first_index}]: the guest finds ports by name, so names must be unique; rename one of them"
    )]
    DuplicatePortName {
        /// The later port.
        port: PortRef,
        /// The shared name.
        name: String,
        /// Index of the first port with the same name.
        first_index: usize,
    },

    /// A virtio-serial port's `socket` path is empty.
    #[error("{port}: socket is empty: set socket to the Unix socket path QEMU should listen on for this port")]
    EmptyPortSocket {
        /// The port.
        port: PortRef,
    },

    /// A virtio-serial port's `socket` path does not fit in `sun_path`.
    #[error(
        "{port}: socket {path:?} is {len} bytes long: a Unix socket path must be shorter than 108 bytes (the sun_path limit, at most {MAX_SOCKET_PATH_LEN} bytes plus the NUL terminator); use a shorter directory such as /tmp or /run",
        path = path.display()
    )]
    PortSocketPathTooLong {
        /// The port.
        port: PortRef,
        /// The rejected path.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },

    /// A virtio-serial port's `name` is empty or has a character other
    /// than `[A-Za-z0-9._-]`.
    #[error(
        "{port}: name {name:?} is invalid: a port name must be non-empty and made of [A-Za-z0-9._-] (it is a QEMU option value and the guest's /dev/virtio-ports/<name> link), e.g. \"org.example.port0\""
    )]
    InvalidPortName {
        /// The port.
        port: PortRef,
        /// The rejected name.
        name: String,
    },

    /// Cloud Hypervisor cannot present named virtio-serial ports.
    #[error(
        "{port}: virtio_serial ports are not supported by Cloud Hypervisor: its only virtio-console device (--console) is a single unnamed console port without the multiport feature (VIRTIO_CONSOLE_F_MULTIPORT), so a named port such as {name:?} cannot be presented to the guest; remove virtio_serial, or use QEMU"
    )]
    CloudHypervisorVirtioSerialUnsupported {
        /// The first port.
        port: PortRef,
        /// Its name.
        name: String,
    },
}
