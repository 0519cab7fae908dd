//! What the robustness scenarios share: the qw driver's userspace interface
//! (`guest-driver/include/uapi/vdevlab_qw.h`: the ioctls and `struct
//! qw_stats`, `FIONREAD`, the sysfs counters), errno names, sysfs writes,
//! and [`Checked`], a report that collects every failed check instead of
//! stopping at the first.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::nap;
use crate::Report;

/// The driver's name: its module, its virtio driver and its device class.
pub const DRIVER: &str = "vdevlab_qw";

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86, arm64).
const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}
const IOC_NONE: u64 = 0;
const IOC_READ: u64 = 2;
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

/// One sysfs counter: a decimal number and a newline.
pub fn read_counter(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: {:?}: {e}", path.display(), text.trim()))
}

/// `QW_IOC_GET_STATS`.
pub fn get_stats(fd: RawFd) -> Result<QwStats, String> {
    let mut st = QwStats::default();
    // SAFETY: the ioctl writes one struct qw_stats (96 bytes, size checked
    // above) to the pointer; `fd` is open.
    if unsafe { libc::ioctl(fd, QW_IOC_GET_STATS, &mut st as *mut QwStats) } < 0 {
        return Err(crate::common::os_err("QW_IOC_GET_STATS"));
    }
    Ok(st)
}

/// `FIONREAD`: the bytes that can be read now.
pub fn fionread(fd: RawFd) -> Result<i32, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer; `fd` is open.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) } < 0 {
        return Err(crate::common::os_err("FIONREAD"));
    }
    Ok(n)
}

/// An ioctl without argument: `Ok(())` or the errno.
pub fn ioctl_plain(fd: RawFd, req: libc::c_ulong) -> Result<(), i32> {
    // SAFETY: the request takes no argument (0 is passed); `fd` is open.
    if unsafe { libc::ioctl(fd, req, 0 as libc::c_ulong) } < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// The calling thread's errno.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The symbolic name of an errno value (the ones these scenarios meet),
/// or `errno N`.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "0",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ETIME => "ETIME",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOTCONN => "ENOTCONN",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Write `value` to a sysfs (or procfs) file in one `write`.
pub fn write_sysfs(path: &Path, value: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(value.as_bytes())
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// Wait until `path` is a character device (a device node came back);
/// returns how long that took.
pub fn wait_for_chardev(path: &str, timeout: Duration) -> Result<Duration, String> {
    use std::os::unix::fs::FileTypeExt;
    let start = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!("no {path} within {timeout:?}"));
        }
        nap(Duration::from_millis(20));
    }
}

/// `poll()` one descriptor for `events` with a timeout in milliseconds
/// (0: just look); the returned events, or 0 on timeout.
pub fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: i32,
) -> Result<libc::c_short, String> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(if n == 0 { 0 } else { pfd.revents });
        }
        if !crate::common::interrupted() {
            return Err(crate::common::os_err("poll"));
        }
    }
}

/// A `poll`/`epoll` event mask spelled out, e.g. `0x11 (IN|HUP)`.
pub fn mask_name(mask: u32) -> String {
    let names = [
        (libc::EPOLLIN as u32, "IN"),
        (libc::EPOLLPRI as u32, "PRI"),
        (libc::EPOLLOUT as u32, "OUT"),
        (libc::EPOLLERR as u32, "ERR"),
        (libc::EPOLLHUP as u32, "HUP"),
        (libc::EPOLLRDNORM as u32, "RDNORM"),
        (libc::EPOLLWRNORM as u32, "WRNORM"),
        (libc::EPOLLRDHUP as u32, "RDHUP"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{mask:#x} ({})", set.join("|"))
}

/// A read of `len` bytes into `buf` that retries `EINTR`: the byte count,
/// or the errno.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = last_errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// The observations of a scenario and the checks that failed. A scenario
/// goes on after a failed check where it can, so one run shows everything.
#[derive(Debug, Default)]
pub struct Checked {
    /// The result line's fields.
    pub report: Report,
    /// What did not hold, in order.
    pub problems: Vec<String>,
}

impl Checked {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a problem unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.problems.push(what());
        }
        ok
    }

    /// Record a problem.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.problems.push(what.into());
    }

    /// Record the error of `r`, if any, and pass the value on.
    pub fn take<T>(&mut self, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.push(e);
                None
            }
        }
    }
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

    #[test]
    fn errno_and_mask_names() {
        assert_eq!(errno_name(libc::ENODEV), "ENODEV");
        assert_eq!(errno_name(libc::ESHUTDOWN), "ESHUTDOWN");
        assert_eq!(errno_name(9999), "errno 9999");
        assert_eq!(
            mask_name((libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLRDNORM) as u32),
            "0x51 (IN|HUP|RDNORM)"
        );
    }

    #[test]
    fn counters_parse() {
        let dir = std::env::temp_dir().join(format!("qwdev-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rx_bytes"), "12345\n").unwrap();
        std::fs::write(dir.join("bad"), "x\n").unwrap();
        assert_eq!(read_counter(&dir.join("rx_bytes")), Ok(12345));
        assert!(read_counter(&dir.join("bad")).is_err());
        assert!(read_counter(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
