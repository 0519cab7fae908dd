//! Bindings to the kernel's userspace interfaces that the guest programs
//! use beyond `libc`, one module per header:
//!
//! | module | header |
//! | --- | --- |
//! | [`qw`] | `guest-driver/include/uapi/vdevlab_qw.h` (and the driver's sysfs counters) |
//! | [`sensor`] | `guest-driver/sensor/include/uapi/vdevlab_sensor.h` |
//! | [`aio_abi`] | `<linux/aio_abi.h>` (native AIO) |
//!
//! This module holds what they share: the ioctl number encoding of
//! `<asm-generic/ioctl.h>`, `FIONREAD`, and an ioctl without argument.

pub mod aio_abi;
pub mod qw;
pub mod sensor;

use std::os::fd::RawFd;

use crate::common::{last_errno, os_err};

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86, arm64).
pub(crate) const fn ioc(dir: u64, ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64) as libc::c_ulong
}
/// `_IOC_NONE`: no argument.
pub(crate) const IOC_NONE: u64 = 0;
/// `_IOC_WRITE`: userspace writes the argument to the driver (`_IOW`).
pub(crate) const IOC_WRITE: u64 = 1;
/// `_IOC_READ`: the driver writes the argument back (`_IOR`).
pub(crate) const IOC_READ: u64 = 2;

/// `FIONREAD`: the bytes that can be read now.
pub fn fionread(fd: RawFd) -> Result<i32, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer; `fd` is open.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) } < 0 {
        return Err(os_err("FIONREAD"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_encoded_as_the_kernel_does() {
        // _IO('q', 0x41), _IOW('q', 0x50, __u32), _IOR('q', 0x40, 96 bytes).
        assert_eq!(ioc(IOC_NONE, b'q', 0x41, 0), 0x7141);
        assert_eq!(ioc(IOC_WRITE, b'q', 0x50, 4), 0x4004_7150);
        assert_eq!(ioc(IOC_READ, b'q', 0x40, 96), 0x8060_7140);
    }
}
