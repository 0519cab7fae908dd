//! Typed VM descriptions for vdevlab, rendered to QEMU or Cloud Hypervisor
//! command lines.
//!
//! Configs are data: a [`VmConfig`] is a serde type loaded from TOML (see
//! `configs/lab.toml`, also available as [`LAB_CONFIG_TOML`]). Unknown keys
//! are rejected so a typo never silently falls back to a default.
//!
//! ```
//! use vdevlab_vmm_config::{Accel, VmConfig, LAB_CONFIG_TOML};
//!
//! let vm = VmConfig::from_toml_str(LAB_CONFIG_TOML)?;
//! let qemu = vm.qemu_args()?; // argv after "qemu-system-x86_64"
//! assert_eq!(&qemu[..2], ["-accel", "tcg"]);
//!
//! let ch = vm.clone().with_accel(Accel::Kvm).cloud_hypervisor_args()?;
//! assert_eq!(&ch[..2], ["--cpus", "boot=1"]);
//! # Ok::<(), vdevlab_vmm_config::ConfigError>(())
//! ```
//!
//! # Validation
//!
//! [`VmConfig::validate`] checks everything that is independent of the VMM
//! (memory and vCPU ranges, paths, the kernel command line, device ids,
//! socket path length, virtio device ids, queue counts and sizes, config
//! space size). Both renderers run it first, then add their own checks.
//! Every [`ConfigError`] names the field and value and says how to fix it.
//!
//! # QEMU rendering ([`VmConfig::qemu_args`])
//!
//! Targets QEMU >= 10.2 and its generic `vhost-user-test-device-pci`:
//!
//! ```text
//! -accel tcg                     (tcg,thread=multi with several vCPUs;
//!                                or: -accel kvm -cpu host)
//! -m <mem>M -smp <vcpus>
//! -object memory-backend-memfd,id=mem,size=<mem>M,share=on -numa node,memdev=mem
//! -nodefaults -no-user-config -display none -serial stdio -no-reboot
//! -kernel <kernel> [-initrd <initramfs>] -append <cmdline>
//! per device:
//!   -chardev socket,id=<id>,path=<socket>[,reconnect-ms=<n>]
//!   -device vhost-user-test-device-pci,chardev=<id>,virtio-id=<virtio_id>,
//!           num_vqs=<queues>,vq_size=<size>[,config_size=<bytes>]
//! with virtio-serial ports, after the devices:
//!   -device virtio-serial-pci,id=vserial0
//!   per port:
//!   -chardev socket,id=<id>,path=<socket>,server=on,wait=off
//!   -device virtserialport,bus=vserial0.0,chardev=<id>,name=<name>
//! ```
//!
//! QEMU's option parser splits `-chardev`/`-object`/`-device` values on
//! `,`, so commas inside a path are doubled (`,,`). `-kernel`, `-initrd` and
//! `-append` take their value verbatim as a separate argv element. The QEMU
//! device has one `vq_size` for all of its queues, so a device whose queue
//! sizes differ cannot be rendered for QEMU, and no queue may exceed QEMU's
//! `VIRTQUEUE_MAX_SIZE` (1024).
//!
//! # Cloud Hypervisor rendering ([`VmConfig::cloud_hypervisor_args`])
//!
//! Targets Cloud Hypervisor v52+ and its `--generic-vhost-user` device:
//!
//! ```text
//! --cpus boot=<vcpus> --memory size=<mem>M,shared=on
//! --kernel <kernel> [--initramfs <initramfs>] --cmdline <cmdline>
//! --serial tty --console off
//! per device:
//!   --generic-vhost-user socket=<socket>,device_type=<virtio_id>,queue_sizes=[<s0>,<s1>,...],id=<id>
//! ```
//!
//! Cloud Hypervisor supports per-queue sizes but needs KVM (there is no TCG),
//! has no reconnecting vhost-user client (`reconnect_ms` must be unset) and
//! takes no config space size on the command line: the backend provides the
//! device config space over the vhost-user `CONFIG` protocol feature. It
//! cannot present named virtio-serial ports (its `--console` is one
//! unnamed console port, without `VIRTIO_CONSOLE_F_MULTIPORT`), so a config
//! with `virtio_serial` ports is refused with an error that says so.
//!
//! # Why the guest RAM is shared memory
//!
//! A vhost-user backend is a separate process. It reads and writes the
//! guest's virtqueues and buffers directly, so the VMM must hand it the
//! guest RAM as file descriptors (`VHOST_USER_SET_MEM_TABLE`) that the
//! backend can `mmap` with `MAP_SHARED`. That only works if guest RAM is
//! backed by a shareable file (a memfd) mapped shared by the VMM too;
//! anonymous private memory would give the backend a copy that never sees
//! the guest's writes. Hence QEMU always gets
//! `memory-backend-memfd,share=on` bound to the NUMA node, and Cloud
//! Hypervisor always gets `--memory ...,shared=on`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod cloud_hypervisor;
mod error;
mod qemu;

pub use error::{ConfigError, DeviceRef, PortRef};

/// The lab's default VM description (`configs/lab.toml`).
pub const LAB_CONFIG_TOML: &str = include_str!("../configs/lab.toml");

/// The sampling sensor's VM description (`configs/sensor.toml`,
/// docs/sensor-spec.md): the same guest with the sensor device.
pub const SENSOR_CONFIG_TOML: &str = include_str!("../configs/sensor.toml");

/// Smallest accepted `memory_mib`.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Largest accepted `memory_mib` (1 TiB).
pub const MAX_MEMORY_MIB: u32 = 1024 * 1024;
/// Smallest accepted `virtio_id`.
pub const MIN_VIRTIO_ID: u16 = 1;
/// Largest accepted `virtio_id`: Linux virtio-pci rejects PCI device ids
/// above 0x107f (= 0x1040 + 63).
pub const MAX_VIRTIO_ID: u16 = 63;
/// Largest number of queues per device.
pub const MAX_QUEUES: usize = 64;
/// Largest split virtqueue size allowed by the virtio spec.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// QEMU's `VIRTQUEUE_MAX_SIZE`.
pub const QEMU_MAX_QUEUE_SIZE: u16 = 1024;
/// Largest virtio id QEMU (10.2 to 11.1) has a name for: its
/// `virtio_device_names` table ends at VIRTIO_ID_GPIO (41).
pub const QEMU_MAX_VIRTIO_ID: u16 = 41;
/// Largest `config_size` in bytes.
pub const MAX_CONFIG_SIZE: u32 = 4096;
/// Longest Unix socket path in bytes: `sun_path` is 108 bytes including the
/// terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// How the VMM runs guest code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// QEMU's software emulation; works everywhere, QEMU only.
    #[default]
    Tcg,
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
}

/// One VM: kernel, memory, vCPUs, accelerator and vhost-user devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel image.
    pub kernel: PathBuf,
    /// Optional initramfs archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (single line, no NUL). Defaults to empty.
    #[serde(default)]
    pub cmdline: String,
    /// Guest RAM in MiB, 64..=1048576. Defaults to 512.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Number of vCPUs, 1..=255. Defaults to 1.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Accelerator, `"tcg"` or `"kvm"`. Defaults to TCG.
    #[serde(default)]
    pub accel: Accel,
    /// vhost-user devices, in guest PCI order (TOML `[[vhost_user]]`).
    #[serde(default)]
    pub vhost_user: Vec<VhostUserDevice>,
    /// Named virtio-serial ports whose host side is a Unix socket (TOML
    /// `[[virtio_serial]]`). QEMU only: they share one `virtio-serial-pci`
    /// controller, placed after the vhost-user devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtio_serial: Vec<VirtioSerialPort>,
}

/// A named virtio-serial port (QEMU `virtserialport`), for instance a
/// baseline to compare the vhost-user device with. The guest finds it by
/// `name` in `/sys/class/virtio-ports/*/name` (udev links it as
/// `/dev/virtio-ports/<name>`). QEMU listens on `socket`
/// (`server=on,wait=off`): the host connects to it to talk to the port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioSerialPort {
    /// Identifier, `[A-Za-z0-9_-]+`, unique per VM among all device and
    /// port ids: it becomes the QEMU chardev id.
    pub id: String,
    /// The Unix socket QEMU listens on (shorter than 108 bytes).
    pub socket: PathBuf,
    /// The port's name as the guest sees it, `[A-Za-z0-9._-]+`, unique.
    pub name: String,
}

/// Id of the `virtio-serial-pci` controller that carries the ports.
pub const VIRTIO_SERIAL_CONTROLLER_ID: &str = "vserial0";

/// A virtio device implemented by an external vhost-user backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserDevice {
    /// Identifier, `[A-Za-z0-9_-]+`, unique per VM: used as the QEMU chardev
    /// id and the Cloud Hypervisor device id.
    pub id: String,
    /// The backend's vhost-user Unix socket (shorter than 108 bytes).
    pub socket: PathBuf,
    /// The virtio device type, 1..=63.
    pub virtio_id: u16,
    /// One size per virtqueue; each a power of two in 1..=32768
    /// (<= 1024 for QEMU, and all equal for QEMU).
    pub queue_sizes: Vec<u16>,
    /// Bytes of device config space, 0..=4096. Defaults to 0.
    ///
    /// Passed to QEMU as `config_size` when non-zero. Cloud Hypervisor takes
    /// no config size on its command line: the backend supplies the config
    /// space through the vhost-user `CONFIG` protocol feature
    /// (`VHOST_USER_GET_CONFIG`), so this field is not rendered for it.
    #[serde(default)]
    pub config_size: u32,
    /// QEMU chardev reconnect interval in milliseconds (`reconnect-ms`), so
    /// the guest survives a backend restart. `None` means no reconnect.
    /// Cloud Hypervisor does not support it; rendering for it fails if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_ms: Option<u32>,
}

fn default_memory_mib() -> u32 {
    512
}

fn default_vcpus() -> u8 {
    1
}

impl VmConfig {
    /// A config with the given kernel and all defaults: 512 MiB, 1 vCPU,
    /// TCG, empty command line, no initramfs, no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initramfs: None,
            cmdline: String::new(),
            memory_mib: default_memory_mib(),
            vcpus: default_vcpus(),
            accel: Accel::default(),
            vhost_user: Vec::new(),
            virtio_serial: Vec::new(),
        }
    }

    /// Sets the initramfs.
    pub fn with_initramfs(mut self, initramfs: impl Into<PathBuf>) -> Self {
        self.initramfs = Some(initramfs.into());
        self
    }

    /// Sets the kernel command line.
    pub fn with_cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Sets the guest RAM size in MiB.
    pub fn with_memory_mib(mut self, memory_mib: u32) -> Self {
        self.memory_mib = memory_mib;
        self
    }

    /// Sets the number of vCPUs.
    pub fn with_vcpus(mut self, vcpus: u8) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// Sets the accelerator.
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// Appends a vhost-user device.
    pub fn with_device(mut self, device: VhostUserDevice) -> Self {
        self.vhost_user.push(device);
        self
    }

    /// Appends a virtio-serial port.
    pub fn with_serial_port(mut self, port: VirtioSerialPort) -> Self {
        self.virtio_serial.push(port);
        self
    }

    /// Parses a TOML description. Does not validate; call [`Self::validate`]
    /// (the renderers do so themselves).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a TOML description from a file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Serialises the description back to TOML.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }

    /// Checks the VMM-independent rules; returns the first violation.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemoryOutOfRange {
                value: self.memory_mib,
            });
        }
        if self.vcpus == 0 {
            return Err(ConfigError::VcpusOutOfRange { value: self.vcpus });
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::EmptyKernel);
        }
        check_utf8("kernel", &self.kernel)?;
        if let Some(initramfs) = &self.initramfs {
            if initramfs.as_os_str().is_empty() {
                return Err(ConfigError::EmptyInitramfs);
            }
            check_utf8("initramfs", initramfs)?;
        }
        if let Some((offset, ch)) = self
            .cmdline
            .char_indices()
            .find(|&(_, c)| matches!(c, '\n' | '\r' | '\0'))
        {
            let what = match ch {
                '\n' => "a newline",
                '\r' => "a carriage return",
                _ => "a NUL byte",
            };
            return Err(ConfigError::CmdlineControlChar {
                value: self.cmdline.clone(),
                what,
                offset,
            });
        }

        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (index, dev) in self.vhost_user.iter().enumerate() {
            dev.validate(index)?;
            if let Some(&first_index) = seen.get(dev.id.as_str()) {
                return Err(ConfigError::DuplicateDeviceId {
                    device: DeviceRef::new(index, &dev.id),
                    first_index,
                });
            }
            seen.insert(&dev.id, index);
        }
        // Port ids share QEMU's chardev namespace with the devices' ids.
        let mut ids: HashMap<&str, String> = self
            .vhost_user
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.as_str(), d.device_ref(i).to_string()))
            .collect();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, port) in self.virtio_serial.iter().enumerate() {
            port.validate(index)?;
            let this = port.port_ref(index);
            if let Some(first) = ids.get(port.id.as_str()) {
                return Err(ConfigError::DuplicatePortId {
                    port: this,
                    first: first.clone(),
                });
            }
            if let Some(&first_index) = names.get(port.name.as_str()) {
                return Err(ConfigError::DuplicatePortName {
                    port: this,
                    name: port.name.clone(),
                    first_index,
                });
            }
            ids.insert(&port.id, this.to_string());
            names.insert(&port.name, index);
        }
        Ok(())
    }

    /// QEMU (>= 10.2) arguments, after the program name. Validates first.
    pub fn qemu_args(&self) -> Result<Vec<String>, ConfigError> {
        self.validate()?;
        qemu::render(self)
    }

    /// Cloud Hypervisor (v52+) arguments, after the program name.
    /// Validates first; requires `accel = "kvm"` and no `reconnect_ms`.
    /// `config_size` is not rendered (see [`VhostUserDevice::config_size`]).
    pub fn cloud_hypervisor_args(&self) -> Result<Vec<String>, ConfigError> {
        self.validate()?;
        cloud_hypervisor::render(self)
    }
}

impl VhostUserDevice {
    /// A device with `config_size = 0` and no reconnect.
    pub fn new(
        id: impl Into<String>,
        socket: impl Into<PathBuf>,
        virtio_id: u16,
        queue_sizes: impl Into<Vec<u16>>,
    ) -> Self {
        Self {
            id: id.into(),
            socket: socket.into(),
            virtio_id,
            queue_sizes: queue_sizes.into(),
            config_size: 0,
            reconnect_ms: None,
        }
    }

    /// Sets the device config space size in bytes.
    pub fn with_config_size(mut self, config_size: u32) -> Self {
        self.config_size = config_size;
        self
    }

    /// Sets the QEMU chardev reconnect interval.
    pub fn with_reconnect_ms(mut self, reconnect_ms: u32) -> Self {
        self.reconnect_ms = Some(reconnect_ms);
        self
    }

    /// `vhost_user[index] (id)` for error messages.
    pub(crate) fn device_ref(&self, index: usize) -> DeviceRef {
        DeviceRef::new(index, &self.id)
    }

    /// Per-device rules (uniqueness is checked by [`VmConfig::validate`]).
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let device = || self.device_ref(index);
        if self.id.is_empty() {
            return Err(ConfigError::EmptyDeviceId { device: device() });
        }
        if let Some(ch) = self
            .id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ConfigError::InvalidDeviceId {
                device: device(),
                ch,
            });
        }
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptySocket { device: device() });
        }
        let len = self.socket.as_os_str().len();
        if len > MAX_SOCKET_PATH_LEN {
            return Err(ConfigError::SocketPathTooLong {
                device: device(),
                path: self.socket.clone(),
                len,
            });
        }
        check_utf8(&format!("{}.socket", device()), &self.socket)?;
        if !(MIN_VIRTIO_ID..=MAX_VIRTIO_ID).contains(&self.virtio_id) {
            return Err(ConfigError::VirtioIdOutOfRange {
                device: device(),
                value: self.virtio_id,
            });
        }
        let count = self.queue_sizes.len();
        if !(1..=MAX_QUEUES).contains(&count) {
            return Err(ConfigError::QueueCountOutOfRange {
                device: device(),
                count,
            });
        }
        for (queue, &size) in self.queue_sizes.iter().enumerate() {
            if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(ConfigError::InvalidQueueSize {
                    device: device(),
                    queue,
                    size,
                });
            }
        }
        if self.config_size > MAX_CONFIG_SIZE {
            return Err(ConfigError::ConfigSizeTooLarge {
                device: device(),
                value: self.config_size,
            });
        }
        Ok(())
    }
}

impl VirtioSerialPort {
    /// A port with host socket `socket`, named `name` in the guest.
    pub fn new(id: impl Into<String>, socket: impl Into<PathBuf>, name: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            socket: socket.into(),
            name: name.into(),
        }
    }

    /// `virtio_serial[index] (id)` for error messages.
    pub(crate) fn port_ref(&self, index: usize) -> PortRef {
        PortRef::new(index, &self.id)
    }

    /// Per-port rules (uniqueness is checked by [`VmConfig::validate`]).
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let port = || self.port_ref(index);
        if self.id.is_empty() {
            return Err(ConfigError::EmptyPortId { port: port() });
        }
        if let Some(ch) = self
            .id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(ConfigError::InvalidPortId { port: port(), ch });
        }
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPortSocket { port: port() });
        }
        let len = self.socket.as_os_str().len();
        if len > MAX_SOCKET_PATH_LEN {
            return Err(ConfigError::PortSocketPathTooLong {
                port: port(),
                path: self.socket.clone(),
                len,
            });
        }
        check_utf8(&format!("{}.socket", port()), &self.socket)?;
        let bad = self
            .name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        if self.name.is_empty() || bad.is_some() {
            return Err(ConfigError::InvalidPortName {
                port: port(),
                name: self.name.clone(),
            });
        }
        Ok(())
    }
}

fn check_utf8(field: &str, path: &Path) -> Result<(), ConfigError> {
    if path.to_str().is_none() {
        return Err(ConfigError::NonUtf8Path {
            field: field.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// The UTF-8 form of a path already checked by [`VmConfig::validate`].
pub(crate) fn path_str(path: &Path) -> &str {
    // validate() rejects non-UTF-8 paths, so the fallback is unreachable
    // in practice; it keeps rendering panic-free regardless.
    path.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid baseline that each test breaks in exactly one way.
    fn base() -> VmConfig {
        VmConfig::from_toml_str(LAB_CONFIG_TOML).expect("lab.toml parses")
    }

    fn err_of(cfg: &VmConfig) -> String {
        cfg.validate()
            .expect_err("config should be rejected")
            .to_string()
    }

    fn assert_mentions(msg: &str, needles: &[&str]) {
        for needle in needles {
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn sensor_toml_renders_the_sensor_device() {
        let cfg = VmConfig::from_toml_str(SENSOR_CONFIG_TOML).expect("sensor.toml parses");
        cfg.validate().expect("sensor config is valid");
        let dev = &cfg.vhost_user[0];
        assert_eq!(
            (dev.virtio_id, dev.queue_sizes.as_slice(), dev.config_size),
            (10, &[64u16, 64, 64][..], 64)
        );
        let args = cfg.qemu_args().unwrap().join(" ");
        assert!(
            args.contains("virtio-id=10,num_vqs=3,vq_size=64,config_size=64"),
            "{args}"
        );
    }

    #[test]
    fn lab_toml_parses_to_expected_struct() {
        let expected = VmConfig::new("/lab/vmlinuz")
            .with_initramfs("/lab/initramfs.cpio")
            .with_cmdline("console=ttyS0 panic=-1 no_timer_check printk.time=1")
            .with_memory_mib(256)
            .with_vcpus(1)
            .with_accel(Accel::Tcg)
            .with_device(
                VhostUserDevice::new("vu0", "/lab/vu.sock", 21, [256, 256]).with_config_size(48),
            );
        let cfg = base();
        assert_eq!(cfg, expected);
        cfg.validate().expect("lab config is valid");
    }

    #[test]
    fn defaults_apply_to_omitted_fields() {
        let cfg = VmConfig::from_toml_str(
            r#"
            kernel = "/k"
            [[vhost_user]]
            id = "a"
            socket = "/s"
            virtio_id = 1
            queue_sizes = [8]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.memory_mib, 512);
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.accel, Accel::Tcg);
        assert_eq!(cfg.initramfs, None);
        assert_eq!(cfg.cmdline, "");
        assert_eq!(cfg.vhost_user[0].config_size, 0);
        assert_eq!(cfg.vhost_user[0].reconnect_ms, None);
        cfg.validate().unwrap();
    }

    #[test]
    fn accel_parses_lowercase_names() {
        let cfg = VmConfig::from_toml_str("kernel = \"/k\"\naccel = \"kvm\"\n").unwrap();
        assert_eq!(cfg.accel, Accel::Kvm);
        let err = VmConfig::from_toml_str("kernel = \"/k\"\naccel = \"hvf\"\n")
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["hvf", "tcg", "kvm"]);
    }

    #[test]
    fn unknown_top_level_field_is_rejected() {
        let text = LAB_CONFIG_TOML.replace("memory_mib = 256", "memory_mb = 256");
        assert_ne!(text, LAB_CONFIG_TOML);
        let err = VmConfig::from_toml_str(&text).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err:?}");
        assert_mentions(&err.to_string(), &["unknown field", "memory_mb"]);
    }

    #[test]
    fn unknown_device_field_is_rejected() {
        let text = LAB_CONFIG_TOML.replace("virtio_id = 21", "virtio_id = 21\nqueue_size = 256");
        assert_ne!(text, LAB_CONFIG_TOML);
        let err = VmConfig::from_toml_str(&text).unwrap_err();
        assert!(matches!(err, ConfigError::Toml(_)), "{err:?}");
        assert_mentions(&err.to_string(), &["unknown field", "queue_size"]);
    }

    #[test]
    fn toml_round_trips() {
        let cfg = base().with_accel(Accel::Kvm).with_device(
            VhostUserDevice::new("vu1", "/lab/vu1.sock", 1, [64])
                .with_config_size(8)
                .with_reconnect_ms(100),
        );
        let text = cfg.to_toml_string().unwrap();
        assert_eq!(VmConfig::from_toml_str(&text).unwrap(), cfg);
    }

    #[test]
    fn from_toml_file_reads_and_reports_missing_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/lab.toml");
        assert_eq!(VmConfig::from_toml_file(&path).unwrap(), base());
        let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/nope.toml");
        let err = VmConfig::from_toml_file(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
        assert_mentions(&err.to_string(), &["nope.toml"]);
    }

    #[test]
    fn memory_below_minimum_is_rejected() {
        let mut cfg = base();
        cfg.memory_mib = 64;
        cfg.validate().unwrap();
        cfg.memory_mib = 63;
        assert_mentions(&err_of(&cfg), &["memory_mib 63", "64"]);
    }

    #[test]
    fn memory_above_one_tib_is_rejected() {
        let mut cfg = base();
        cfg.memory_mib = MAX_MEMORY_MIB;
        cfg.validate().unwrap();
        cfg.memory_mib = MAX_MEMORY_MIB + 1;
        assert_mentions(&err_of(&cfg), &["memory_mib 1048577", "1 TiB"]);
    }

    #[test]
    fn zero_vcpus_is_rejected() {
        let mut cfg = base();
        cfg.vcpus = 255;
        cfg.validate().unwrap();
        cfg.vcpus = 0;
        assert_mentions(&err_of(&cfg), &["vcpus 0", "1..=255"]);
    }

    #[test]
    fn empty_kernel_is_rejected() {
        let mut cfg = base();
        cfg.kernel = PathBuf::new();
        assert_mentions(&err_of(&cfg), &["kernel is empty"]);
    }

    #[test]
    fn empty_initramfs_is_rejected() {
        let mut cfg = base();
        cfg.initramfs = Some(PathBuf::new());
        assert_mentions(&err_of(&cfg), &["initramfs", "empty"]);
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_socket_path_is_rejected() {
        use std::os::unix::ffi::OsStrExt;
        let mut cfg = base();
        cfg.vhost_user[0].socket = PathBuf::from(std::ffi::OsStr::from_bytes(b"/lab/\xff.sock"));
        let err = err_of(&cfg);
        assert_mentions(&err, &["vhost_user[0] (vu0).socket", "UTF-8"]);
    }

    #[test]
    fn cmdline_newline_is_rejected() {
        let mut cfg = base();
        cfg.cmdline = "console=ttyS0\npanic=-1".into();
        assert_mentions(&err_of(&cfg), &["cmdline", "newline", "byte 13"]);
    }

    #[test]
    fn cmdline_nul_is_rejected() {
        let mut cfg = base();
        cfg.cmdline = "console=ttyS0\0".into();
        assert_mentions(&err_of(&cfg), &["cmdline", "NUL"]);
    }

    #[test]
    fn empty_device_id_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].id = String::new();
        assert_mentions(&err_of(&cfg), &["vhost_user[0]", "id is empty"]);
    }

    #[test]
    fn device_id_with_forbidden_char_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].id = "vu-0_A".into();
        cfg.validate().unwrap();
        cfg.vhost_user[0].id = "vu,0".into();
        assert_mentions(
            &err_of(&cfg),
            &["vhost_user[0] (vu,0)", "id \"vu,0\"", "','"],
        );
    }

    #[test]
    fn duplicate_device_id_is_rejected() {
        let cfg = base().with_device(VhostUserDevice::new("vu0", "/lab/other.sock", 52, [256]));
        assert_mentions(
            &err_of(&cfg),
            &[
                "vhost_user[1] (vu0)",
                "id \"vu0\"",
                "vhost_user[0]",
                "unique",
            ],
        );
    }

    #[test]
    fn empty_socket_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].socket = PathBuf::new();
        assert_mentions(&err_of(&cfg), &["vhost_user[0] (vu0)", "socket is empty"]);
    }

    #[test]
    fn socket_path_of_108_bytes_is_rejected() {
        let mut cfg = base();
        let ok = format!("/{}", "s".repeat(106));
        assert_eq!(ok.len(), 107);
        cfg.vhost_user[0].socket = ok.into();
        cfg.validate().unwrap();
        let long = format!("/{}", "s".repeat(107));
        cfg.vhost_user[0].socket = long.clone().into();
        assert_mentions(
            &err_of(&cfg),
            &[
                "vhost_user[0] (vu0)",
                "socket",
                &long,
                "108 bytes",
                "sun_path",
            ],
        );
    }

    #[test]
    fn virtio_id_zero_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].virtio_id = 1;
        cfg.validate().unwrap();
        cfg.vhost_user[0].virtio_id = 0;
        assert_mentions(
            &err_of(&cfg),
            &["vhost_user[0] (vu0)", "virtio_id 0", "1..=63"],
        );
    }

    #[test]
    fn virtio_id_above_63_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].virtio_id = 63;
        cfg.validate().unwrap();
        cfg.vhost_user[0].virtio_id = 70;
        assert_eq!(
            err_of(&cfg),
            "vhost_user[0] (vu0): virtio_id 70 is out of range: Linux virtio-pci accepts \
             device ids 1..=63 (it rejects PCI device ids above 0x107f, i.e. 0x1040 + 63); \
             set virtio_id to the virtio device type number"
        );
    }

    #[test]
    fn zero_queues_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].queue_sizes.clear();
        assert_mentions(
            &err_of(&cfg),
            &["vhost_user[0] (vu0)", "queue_sizes has 0 entries"],
        );
    }

    #[test]
    fn more_than_64_queues_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].queue_sizes = vec![256; 64];
        cfg.validate().unwrap();
        cfg.vhost_user[0].queue_sizes = vec![256; 65];
        assert_mentions(
            &err_of(&cfg),
            &[
                "vhost_user[0] (vu0)",
                "queue_sizes has 65 entries",
                "1..=64",
            ],
        );
    }

    #[test]
    fn non_power_of_two_queue_size_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].queue_sizes = vec![256, 100];
        assert_mentions(
            &err_of(&cfg),
            &[
                "vhost_user[0] (vu0)",
                "queue_sizes[1] = 100",
                "power of two",
            ],
        );
    }

    #[test]
    fn zero_queue_size_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].queue_sizes = vec![0];
        assert_mentions(&err_of(&cfg), &["queue_sizes[0] = 0", "1..=32768"]);
    }

    #[test]
    fn largest_queue_size_is_accepted_by_validate() {
        let mut cfg = base();
        cfg.vhost_user[0].queue_sizes = vec![1, MAX_QUEUE_SIZE];
        cfg.validate().unwrap();
    }

    #[test]
    fn config_size_above_4096_is_rejected() {
        let mut cfg = base();
        cfg.vhost_user[0].config_size = 4096;
        cfg.validate().unwrap();
        cfg.vhost_user[0].config_size = 4097;
        assert_mentions(
            &err_of(&cfg),
            &["vhost_user[0] (vu0)", "config_size 4097", "4096"],
        );
    }

    #[test]
    fn second_device_errors_name_that_device() {
        let cfg = base().with_device(VhostUserDevice::new("blk", "/lab/blk.sock", 99, [128]));
        assert_mentions(&err_of(&cfg), &["vhost_user[1] (blk)", "virtio_id 99"]);
    }

    #[test]
    fn renderers_validate_first() {
        let cfg = base().with_accel(Accel::Kvm).with_memory_mib(1);
        for err in [
            cfg.qemu_args().unwrap_err(),
            cfg.cloud_hypervisor_args().unwrap_err(),
        ] {
            assert!(
                matches!(err, ConfigError::MemoryOutOfRange { value: 1 }),
                "{err:?}"
            );
        }
    }

    fn with_port() -> VmConfig {
        base().with_serial_port(VirtioSerialPort::new(
            "vs0",
            "/lab/run/bench.sock",
            "vdevlab.bench",
        ))
    }

    #[test]
    fn virtio_serial_ports_parse_validate_and_round_trip() {
        let text = format!(
            "{LAB_CONFIG_TOML}\n[[virtio_serial]]\nid = \"vs0\"\nsocket = \"/lab/run/bench.sock\"\nname = \"vdevlab.bench\"\n"
        );
        let cfg = VmConfig::from_toml_str(&text).unwrap();
        assert_eq!(cfg, with_port());
        cfg.validate().unwrap();
        assert_eq!(
            VmConfig::from_toml_str(&cfg.to_toml_string().unwrap()).unwrap(),
            cfg
        );
        // No ports: nothing is written, so older readers still parse it.
        assert!(!base().to_toml_string().unwrap().contains("virtio_serial"));
        let typo = text.replace("name = ", "nmae = ");
        assert_mentions(
            &VmConfig::from_toml_str(&typo).unwrap_err().to_string(),
            &["unknown field", "nmae"],
        );
    }

    #[test]
    fn virtio_serial_port_errors_name_the_port() {
        let mut cfg = with_port();
        cfg.virtio_serial[0].id = String::new();
        assert_mentions(&err_of(&cfg), &["virtio_serial[0]", "id is empty"]);
        let mut cfg = with_port();
        cfg.virtio_serial[0].id = "v s".into();
        assert_mentions(&err_of(&cfg), &["virtio_serial[0] (v s)", "' '"]);
        let mut cfg = with_port();
        cfg.virtio_serial[0].socket = PathBuf::new();
        assert_mentions(
            &err_of(&cfg),
            &["virtio_serial[0] (vs0)", "socket is empty"],
        );
        let mut cfg = with_port();
        cfg.virtio_serial[0].socket = format!("/{}", "s".repeat(107)).into();
        assert_mentions(&err_of(&cfg), &["virtio_serial[0] (vs0)", "108 bytes"]);
        for bad in ["", "a,b", "a b", "a/b"] {
            let mut cfg = with_port();
            cfg.virtio_serial[0].name = bad.into();
            assert_mentions(
                &err_of(&cfg),
                &[
                    "virtio_serial[0] (vs0)",
                    &format!("name {bad:?}"),
                    "[A-Za-z0-9._-]",
                ],
            );
        }
    }

    #[test]
    fn virtio_serial_ids_and_names_must_be_unique() {
        // A port may not reuse a vhost-user device's id (both are chardevs).
        let mut cfg = with_port();
        cfg.virtio_serial[0].id = "vu0".into();
        assert_mentions(
            &err_of(&cfg),
            &["virtio_serial[0] (vu0)", "vhost_user[0] (vu0)", "unique"],
        );
        let cfg = with_port().with_serial_port(VirtioSerialPort::new("vs0", "/s2", "other"));
        assert_mentions(
            &err_of(&cfg),
            &["virtio_serial[1] (vs0)", "virtio_serial[0] (vs0)"],
        );
        let cfg =
            with_port().with_serial_port(VirtioSerialPort::new("vs1", "/s2", "vdevlab.bench"));
        assert_mentions(
            &err_of(&cfg),
            &[
                "virtio_serial[1] (vs1)",
                "\"vdevlab.bench\"",
                "virtio_serial[0]",
            ],
        );
    }

    /// Config-change interrupts (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`)
    /// reach the guest only if the VMM wires them: QEMU's generic device
    /// registers its config notifier only with a non-zero `config_size`,
    /// and Cloud Hypervisor negotiates BACKEND_REQ by itself (its
    /// `--generic-vhost-user` has no option that turns it off, and none
    /// may be rendered that would).
    #[test]
    fn shipped_configs_let_config_changes_reach_the_guest() {
        for (name, text) in [("lab", LAB_CONFIG_TOML), ("sensor", SENSOR_CONFIG_TOML)] {
            let vm = VmConfig::from_toml_str(text).unwrap();
            let qemu = vm.qemu_args().unwrap();
            for dev in &vm.vhost_user {
                assert!(dev.config_size > 0, "{name}: {} has no config_size", dev.id);
                let want = format!(",config_size={}", dev.config_size);
                assert!(
                    qemu.iter()
                        .any(|a| a.starts_with("vhost-user-test-device-pci") && a.contains(&want)),
                    "{name}: QEMU's device lacks {want}: {qemu:?}"
                );
            }
            let ch = vm
                .clone()
                .with_accel(Accel::Kvm)
                .cloud_hypervisor_args()
                .unwrap();
            let generic: Vec<&String> = ch
                .iter()
                .skip_while(|a| *a != "--generic-vhost-user")
                .skip(1)
                .step_by(2)
                .collect();
            assert_eq!(generic.len(), vm.vhost_user.len(), "{name}: {ch:?}");
            for arg in generic {
                let keys: Vec<&str> = arg
                    .split(',')
                    .filter_map(|kv| kv.split_once('=').map(|(k, _)| k))
                    .filter(|k| !k.starts_with(|c: char| c.is_ascii_digit()))
                    .collect();
                assert_eq!(
                    keys,
                    ["socket", "device_type", "queue_sizes", "id"],
                    "{name}: {arg}"
                );
            }
        }
    }
}
