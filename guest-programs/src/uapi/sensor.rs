//! The sampling sensor driver's userspace interface
//! (`guest-driver/sensor/include/uapi/vdevlab_sensor.h`): its ioctls, the
//! structs they and `read()` carry, the state and status bits, and thin
//! wrappers for each ioctl.

use std::os::fd::RawFd;

use super::{ioc, ioctl_plain, IOC_NONE, IOC_READ, IOC_WRITE};
use crate::common::{errno_name, last_errno, read_fd};

/// The driver's name: module, virtio driver and device class.
pub const SENSOR_DRIVER: &str = "vdevlab_sensor";

/// The uapi header's ioctl type: the same `'q'` as the qw driver's, with
/// numbers from 0x50 on.
const SENSOR_IOC_MAGIC: u8 = b'q';

/// `SENSOR_IOC_SET_RATE`: `_IOW('q', 0x50, __u32)`.
pub const SENSOR_IOC_SET_RATE: libc::c_ulong = ioc(IOC_WRITE, SENSOR_IOC_MAGIC, 0x50, 4);
/// `SENSOR_IOC_SET_THRESHOLD`: `_IOW('q', 0x51, struct sensor_threshold)`.
pub const SENSOR_IOC_SET_THRESHOLD: libc::c_ulong = ioc(IOC_WRITE, SENSOR_IOC_MAGIC, 0x51, 8);
/// `SENSOR_IOC_GET_ALARM`: `_IOR('q', 0x52, struct sensor_alarm)`.
pub const SENSOR_IOC_GET_ALARM: libc::c_ulong = ioc(
    IOC_READ,
    SENSOR_IOC_MAGIC,
    0x52,
    std::mem::size_of::<SensorAlarm>(),
);
/// `SENSOR_IOC_GET_INFO`: `_IOR('q', 0x53, struct sensor_info)`.
pub const SENSOR_IOC_GET_INFO: libc::c_ulong = ioc(
    IOC_READ,
    SENSOR_IOC_MAGIC,
    0x53,
    std::mem::size_of::<SensorInfo>(),
);
/// `SENSOR_IOC_GET_STATS`: `_IOR('q', 0x54, struct sensor_stats)`.
pub const SENSOR_IOC_GET_STATS: libc::c_ulong = ioc(
    IOC_READ,
    SENSOR_IOC_MAGIC,
    0x54,
    std::mem::size_of::<SensorStats>(),
);

/// `SENSOR_IOC_RESET`: `_IO('q', 0x55)`.
pub const SENSOR_IOC_RESET: libc::c_ulong = ioc(IOC_NONE, SENSOR_IOC_MAGIC, 0x55, 0);

/// Alarm kinds and threshold mode bits.
pub const ALARM_RISING: u32 = 1;
/// See [`ALARM_RISING`].
pub const ALARM_FALLING: u32 = 2;
/// `sensor_info.status`: the device needs a reset.
pub const STATUS_NEEDS_RESET: u32 = 1 << 0;
/// `sensor_info.status`: sampling (rate > 0).
pub const STATUS_SAMPLING: u32 = 1 << 1;
/// `sensor_stats.state`: removed.
pub const STATE_REMOVED: u64 = 1;
/// `sensor_stats.state`: a virtqueue broke.
pub const STATE_BROKEN: u64 = 1 << 2;

/// `struct sensor_sample`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SensorSample {
    /// Device clock, ns.
    pub timestamp_ns: u64,
    /// Sequence number.
    pub seq: u32,
    /// Value.
    pub value: i32,
}

/// `struct sensor_alarm`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SensorAlarm {
    /// Timestamp of the sample that crossed.
    pub timestamp_ns: u64,
    /// Its sequence number.
    pub seq: u32,
    /// Its value.
    pub value: i32,
    /// The threshold in force.
    pub threshold: i32,
    /// [`ALARM_RISING`] or [`ALARM_FALLING`].
    pub kind: u32,
}

/// `struct sensor_threshold`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct SensorThreshold {
    /// Level.
    pub threshold: i32,
    /// Mode bits.
    pub mode: u32,
}

/// `struct sensor_info`: the device's config space.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SensorInfo {
    /// Waveform seed.
    pub seed: u64,
    /// Layout version.
    pub version: u32,
    /// Highest rate.
    pub max_rate_hz: u32,
    /// Current rate.
    pub rate_hz: u32,
    /// Current threshold.
    pub threshold: i32,
    /// Current alarm mode.
    pub alarm_mode: u32,
    /// Waveform amplitude.
    pub amplitude: u32,
    /// Waveform period in samples.
    pub wave_period: u32,
    /// Noise amplitude.
    pub noise: u32,
    /// Status bits.
    pub status: u32,
    /// Samples the device dropped.
    pub samples_dropped: u32,
    /// Alarms the device dropped.
    pub alarms_dropped: u32,
    /// 0.
    pub reserved: u32,
}

/// `struct sensor_stats`: the driver's counters.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SensorStats {
    /// Samples received.
    pub samples: u64,
    /// Sample buffers returned.
    pub sample_buffers: u64,
    /// Alarms received.
    pub alarms: u64,
    /// Samples the driver dropped.
    pub samples_dropped: u64,
    /// Alarms the driver dropped.
    pub alarms_dropped: u64,
    /// Control requests sent.
    pub ctrl_requests: u64,
    /// Control requests refused.
    pub ctrl_errors: u64,
    /// Device bugs, failures to post.
    pub errors: u64,
    /// Samples not read yet.
    pub pending: u64,
    /// State bits.
    pub state: u64,
    /// Resets done through `SENSOR_IOC_RESET`.
    pub resets: u64,
}

const _: () = assert!(std::mem::size_of::<SensorSample>() == 16);
const _: () = assert!(std::mem::size_of::<SensorAlarm>() == 24);
const _: () = assert!(std::mem::size_of::<SensorInfo>() == 56);
const _: () = assert!(std::mem::size_of::<SensorStats>() == 88);

impl SensorStats {
    /// As one JSON object.
    pub fn json(&self) -> String {
        format!(
            "{{\"samples\":{},\"sample_buffers\":{},\"alarms\":{},\"samples_dropped\":{},\
             \"alarms_dropped\":{},\"ctrl_requests\":{},\"ctrl_errors\":{},\"errors\":{},\
             \"pending\":{},\"state\":{},\"resets\":{}}}",
            self.samples,
            self.sample_buffers,
            self.alarms,
            self.samples_dropped,
            self.alarms_dropped,
            self.ctrl_requests,
            self.ctrl_errors,
            self.errors,
            self.pending,
            self.state,
            self.resets
        )
    }
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> Result<(), i32> {
    // SAFETY: every request here reads or writes exactly one T at `arg`
    // (sizes encoded in the request numbers, checked against the header's
    // layout above); `fd` is open.
    if unsafe { libc::ioctl(fd, req, arg) } < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// `SENSOR_IOC_SET_RATE`.
pub fn set_rate(fd: RawFd, mut hz: u32) -> Result<(), i32> {
    ioctl_ptr(fd, SENSOR_IOC_SET_RATE, &mut hz)
}

/// `SENSOR_IOC_SET_THRESHOLD`.
pub fn set_threshold(fd: RawFd, threshold: i32, mode: u32) -> Result<(), i32> {
    let mut t = SensorThreshold { threshold, mode };
    ioctl_ptr(fd, SENSOR_IOC_SET_THRESHOLD, &mut t)
}

/// `SENSOR_IOC_GET_ALARM`: `Ok(None)` when none is pending.
pub fn get_alarm(fd: RawFd) -> Result<Option<SensorAlarm>, i32> {
    let mut a = SensorAlarm::default();
    match ioctl_ptr(fd, SENSOR_IOC_GET_ALARM, &mut a) {
        Ok(()) => Ok(Some(a)),
        Err(libc::EAGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `SENSOR_IOC_GET_INFO`.
pub fn get_info(fd: RawFd) -> Result<SensorInfo, String> {
    let mut i = SensorInfo::default();
    ioctl_ptr(fd, SENSOR_IOC_GET_INFO, &mut i)
        .map_err(|e| format!("SENSOR_IOC_GET_INFO: {}", errno_name(e)))?;
    Ok(i)
}

/// `SENSOR_IOC_GET_STATS`.
pub fn get_stats(fd: RawFd) -> Result<SensorStats, String> {
    let mut s = SensorStats::default();
    ioctl_ptr(fd, SENSOR_IOC_GET_STATS, &mut s)
        .map_err(|e| format!("SENSOR_IOC_GET_STATS: {}", errno_name(e)))?;
    Ok(s)
}

/// `SENSOR_IOC_RESET`: `Ok(())` or the errno.
pub fn reset_device(fd: RawFd) -> Result<(), i32> {
    ioctl_plain(fd, SENSOR_IOC_RESET)
}

/// Read up to `max` samples (one read() call): the samples or the errno.
pub fn read_samples(fd: RawFd, max: usize) -> Result<Vec<SensorSample>, i32> {
    let mut buf = vec![0u8; max * 16];
    let n = read_fd(fd, &mut buf)?;
    Ok(buf[..n - n % 16]
        .chunks_exact(16)
        .map(|c| SensorSample {
            timestamp_ns: u64::from_ne_bytes(c[0..8].try_into().unwrap_or_default()),
            seq: u32::from_ne_bytes(c[8..12].try_into().unwrap_or_default()),
            value: i32::from_ne_bytes(c[12..16].try_into().unwrap_or_default()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        assert_eq!(SENSOR_IOC_SET_RATE, 0x4004_7150);
        assert_eq!(SENSOR_IOC_SET_THRESHOLD, 0x4008_7151);
        assert_eq!(SENSOR_IOC_GET_ALARM, 0x8018_7152);
        assert_eq!(SENSOR_IOC_GET_INFO, 0x8038_7153);
        assert_eq!(SENSOR_IOC_GET_STATS, 0x8058_7154);
        assert_eq!(SENSOR_IOC_RESET, 0x7155);
    }
}
