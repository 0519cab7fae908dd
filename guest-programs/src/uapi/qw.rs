//! The qw driver's userspace interface
//! (`guest-driver/include/uapi/vdevlab_qw.h`): the ioctls and `struct
//! qw_stats`, the state bits, and the sysfs counters under
//! `/sys/class/vdevlab_qw/qwN/`.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::{ioc, IOC_NONE, IOC_READ};
use crate::common::os_err;

/// The driver's name: its module, its virtio driver and its device class.
pub const DRIVER: &str = "vdevlab_qw";

/// The uapi header's `QW_IOC_MAGIC`.
const QW_IOC_MAGIC: u8 = b'q';

/// `QW_IOC_GET_STATS`: `_IOR('q', 0x40, struct qw_stats)`.
pub const QW_IOC_GET_STATS: libc::c_ulong =
    ioc(IOC_READ, QW_IOC_MAGIC, 0x40, std::mem::size_of::<QwStats>());
/// `QW_IOC_FLUSH`: `_IO('q', 0x41)`; needs a file opened for reading.
pub const QW_IOC_FLUSH: libc::c_ulong = ioc(IOC_NONE, QW_IOC_MAGIC, 0x41, 0);
/// `QW_IOC_RESET`: `_IO('q', 0x42)`; needs a file opened for writing.
pub const QW_IOC_RESET: libc::c_ulong = ioc(IOC_NONE, QW_IOC_MAGIC, 0x42, 0);
/// An ioctl number in the driver's range that it does not define.
pub const QW_IOC_UNDEFINED: libc::c_ulong = ioc(IOC_NONE, QW_IOC_MAGIC, 0x4f, 0);

/// `qw_stats.state`: I/O fails with `EIO`, poll has `EPOLLERR`.
pub const QW_STATE_NEEDS_RESET: u64 = 1 << 0;
/// `qw_stats.state`: unplugged or unbound, `ENODEV`.
pub const QW_STATE_REMOVED: u64 = 1 << 1;
/// `qw_stats.state`: no virtqueues (suspended or a reset failed).
pub const QW_STATE_STOPPED: u64 = 1 << 2;
/// `qw_stats.state`: the carrier is down (poll has `EPOLLPRI`; I/O goes on).
pub const QW_STATE_NO_CARRIER: u64 = 1 << 3;

/// `struct qw_stats`: twelve `__u64`, the same layout for every ABI.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QwStats {
    /// Bytes received from the device.
    pub rx_bytes: u64,
    /// Bytes queued to the device.
    pub tx_bytes: u64,
    /// Used-buffer interrupts on the rx queue.
    pub rx_interrupts: u64,
    /// Used-buffer interrupts on the tx queue.
    pub tx_interrupts: u64,
    /// Times every rx buffer held unread data.
    pub overruns: u64,
    /// Device bugs and failures to queue a buffer.
    pub errors: u64,
    /// Bytes received and not read yet.
    pub rx_pending: u64,
    /// Buffers queued to the device and not returned yet.
    pub tx_inflight: u64,
    /// Received bytes dropped by `QW_IOC_FLUSH`.
    pub flushed_bytes: u64,
    /// Configuration-change interrupts.
    pub config_changes: u64,
    /// Resets done through `QW_IOC_RESET`.
    pub resets: u64,
    /// `QW_STATE_*` bits.
    pub state: u64,
}

const _: () = assert!(std::mem::size_of::<QwStats>() == 96);

impl QwStats {
    /// The fields in the header's order, with their names (which are also
    /// the sysfs file names, `state` aside).
    pub fn fields(&self) -> [(&'static str, u64); 12] {
        [
            ("rx_bytes", self.rx_bytes),
            ("tx_bytes", self.tx_bytes),
            ("rx_interrupts", self.rx_interrupts),
            ("tx_interrupts", self.tx_interrupts),
            ("overruns", self.overruns),
            ("errors", self.errors),
            ("rx_pending", self.rx_pending),
            ("tx_inflight", self.tx_inflight),
            ("flushed_bytes", self.flushed_bytes),
            ("config_changes", self.config_changes),
            ("resets", self.resets),
            ("state", self.state),
        ]
    }

    /// The counters as one JSON object.
    pub fn json(&self) -> String {
        let body: Vec<String> = self
            .fields()
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    }
}

/// The files under `/sys/class/vdevlab_qw/qwN/` (README "Device nodes and
/// sysfs").
pub const SYSFS_COUNTERS: &[&str] = &[
    "rx_bytes",
    "tx_bytes",
    "rx_interrupts",
    "tx_interrupts",
    "overruns",
    "errors",
    "rx_pending",
    "tx_inflight",
    "flushed_bytes",
    "config_changes",
    "resets",
    "needs_reset",
];

/// The device's class directory: `<sysfs>/class/vdevlab_qw/<node name>`
/// for a device path such as `/dev/qw0`.
pub fn class_dir(sysfs: &Path, device: &str) -> PathBuf {
    let node = Path::new(device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    sysfs.join("class").join(DRIVER).join(node)
}

/// `QW_IOC_GET_STATS`.
pub fn get_stats(fd: RawFd) -> Result<QwStats, String> {
    let mut st = QwStats::default();
    // SAFETY: the ioctl writes one struct qw_stats (96 bytes, size checked
    // above) to the pointer; `fd` is open.
    if unsafe { libc::ioctl(fd, QW_IOC_GET_STATS, &mut st as *mut QwStats) } < 0 {
        return Err(os_err("QW_IOC_GET_STATS"));
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IOR('q', 0x40, struct qw_stats) with sizeof = 96 = 0x60.
        assert_eq!(QW_IOC_GET_STATS, 0x8060_7140);
        assert_eq!(QW_IOC_FLUSH, 0x7141);
        assert_eq!(QW_IOC_RESET, 0x7142);
        assert_eq!(QW_IOC_UNDEFINED, 0x714f);
    }

    #[test]
    fn stats_json_and_names() {
        let st = QwStats {
            rx_bytes: 5,
            state: QW_STATE_REMOVED,
            ..QwStats::default()
        };
        let j = st.json();
        assert!(j.starts_with("{\"rx_bytes\":5,\"tx_bytes\":0,"), "{j}");
        assert!(j.ends_with("\"resets\":0,\"state\":2}"), "{j}");
        // Every sysfs counter but needs_reset is a qw_stats field.
        let names: Vec<&str> = st.fields().iter().map(|(n, _)| *n).collect();
        for c in SYSFS_COUNTERS.iter().filter(|c| **c != "needs_reset") {
            assert!(names.contains(c), "{c}");
        }
    }

    #[test]
    fn class_dir_uses_the_node_name() {
        assert_eq!(
            class_dir(Path::new("/sys"), "/dev/qw3"),
            Path::new("/sys/class/vdevlab_qw/qw3")
        );
    }
}
