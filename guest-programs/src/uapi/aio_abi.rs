//! The kernel's native AIO ABI (`<linux/aio_abi.h>`): `struct iocb`,
//! `struct io_event`, the opcodes and flags the programs use, and an
//! `io_setup`/`io_destroy` context. Used by the `linux-aio` model and by
//! the scenarios that park native AIO requests (`teardown`, `echo`,
//! `waiters`), with `getevents` to reap one.

use std::time::Duration;

use crate::common::{last_errno, os_err};

pub(crate) const IOCB_CMD_PREAD: u16 = 0;
pub(crate) const IOCB_CMD_PWRITE: u16 = 1;
pub(crate) const IOCB_FLAG_RESFD: u32 = 1 << 0;

/// `struct iocb` of `<linux/aio_abi.h>` (little-endian field order).
#[repr(C)]
#[derive(Debug, Default)]
pub(crate) struct Iocb {
    pub(crate) aio_data: u64,
    pub(crate) aio_key: u32,
    pub(crate) aio_rw_flags: i32,
    pub(crate) aio_lio_opcode: u16,
    pub(crate) aio_reqprio: i16,
    pub(crate) aio_fildes: u32,
    pub(crate) aio_buf: u64,
    pub(crate) aio_nbytes: u64,
    pub(crate) aio_offset: i64,
    pub(crate) aio_reserved2: u64,
    pub(crate) aio_flags: u32,
    pub(crate) aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IoEvent {
    pub(crate) data: u64,
    pub(crate) obj: u64,
    pub(crate) res: i64,
    pub(crate) res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);
#[cfg(not(target_endian = "little"))]
compile_error!("Iocb has the little-endian field order");

/// An AIO context; destroying it cancels or waits for what is in flight,
/// so it must be dropped before the buffers it may still be using.
#[derive(Debug)]
pub(crate) struct Ctx(pub(crate) libc::c_ulong);

impl Ctx {
    pub(crate) fn new(nr: libc::c_long) -> Result<Self, String> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the new context id to `ctx`.
        if unsafe { libc::syscall(libc::SYS_io_setup, nr, &mut ctx as *mut libc::c_ulong) } < 0 {
            return Err(os_err("io_setup (is the kernel built with CONFIG_AIO?)"));
        }
        Ok(Self(ctx))
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `self.0` is a context from io_setup, destroyed only here.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.0) };
    }
}

/// `io_getevents` for one event, waiting at most `timeout`.
pub(crate) fn getevents(
    ctx: &Ctx,
    min: i64,
    timeout: Duration,
    ev: &mut IoEvent,
) -> Result<i64, i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: room for one event; `ts` is a valid timeout; the context is live.
    let got = unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            ctx.0,
            min as libc::c_long,
            1 as libc::c_long,
            ev as *mut IoEvent,
            &ts as *const libc::timespec,
        )
    };
    if got < 0 {
        Err(last_errno())
    } else {
        Ok(got)
    }
}
