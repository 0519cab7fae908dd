//! `linux-aio`: the kernel's native AIO through raw system calls
//! (`io_setup`, `io_submit`, `io_getevents`, `io_destroy`), as the classic
//! native-AIO examples do it: each `iocb` carries `IOCB_FLAG_RESFD` and an
//! eventfd, the eventfd is watched by epoll, and after each wakeup the
//! completions are reaped with a non-waiting `io_getevents`.
//!
//! One request is in flight at a time (a byte stream). Native AIO needs the
//! driver's `read_iter`/`write_iter`: without them `io_submit` fails with
//! `EINVAL`. On a file whose `read_iter` blocks (a pipe, or a driver
//! without real async support) `io_submit` itself waits until the transfer
//! is done, and the completion is then immediately ready.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::common::{errno_err, interrupted, nap, open_device, os_err, Access, Rx, Tx};
use crate::io_models::epoll::{epoll_for, epoll_wait_one};
use crate::uapi::aio_abi::{Ctx, IoEvent, Iocb, IOCB_CMD_PREAD, IOCB_CMD_PWRITE, IOCB_FLAG_RESFD};
use crate::{ready, Dir, Opts, Report};

/// The eventfd, its epoll watcher and the context (the `stress` scenario
/// runs its AIO workers on it too).
#[derive(Debug)]
pub(crate) struct Aio {
    efd: OwnedFd,
    ep: OwnedFd,
    ctx: Ctx,
    seq: u64,
    submits: u64,
    wakeups: u64,
    empty: u64,
}

impl Aio {
    pub(crate) fn new() -> Result<Self, String> {
        // SAFETY: plain syscall wrapper.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(os_err("eventfd"));
        }
        // SAFETY: `efd` is a new descriptor that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        let ep = epoll_for(efd.as_raw_fd(), libc::EPOLLIN as u32)?;
        Ok(Self {
            efd,
            ep,
            ctx: Ctx::new(4)?,
            seq: 0,
            submits: 0,
            wakeups: 0,
            empty: 0,
        })
    }

    /// Submit one read or write of `len` bytes at `buf` on `fd` and wait
    /// for its completion; returns the byte count. The buffer must stay
    /// valid until the context is destroyed if this fails.
    fn transfer(&mut self, fd: RawFd, dir: Dir, buf: u64, len: usize) -> Result<usize, String> {
        let res = self.transfer_res(fd, dir, buf, len)?;
        if res < 0 {
            return Err(errno_err("AIO request", (-res) as i32));
        }
        Ok(res as usize)
    }

    /// [`Self::transfer`], with the completion's result as it came (a
    /// byte count, or a negated errno); `Err` only when the request could
    /// not be submitted or reaped.
    pub(crate) fn transfer_res(
        &mut self,
        fd: RawFd,
        dir: Dir,
        buf: u64,
        len: usize,
    ) -> Result<i64, String> {
        self.seq += 1;
        let mut iocb = Iocb {
            aio_data: self.seq,
            aio_lio_opcode: match dir {
                Dir::Rx => IOCB_CMD_PREAD,
                Dir::Tx => IOCB_CMD_PWRITE,
            },
            aio_fildes: fd as u32,
            aio_buf: buf,
            aio_nbytes: len as u64,
            aio_offset: 0,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.efd.as_raw_fd() as u32,
            ..Iocb::default()
        };
        let list = [&mut iocb as *mut Iocb];
        loop {
            // SAFETY: a list of one valid iocb whose buffer the caller keeps
            // alive; the context is live.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx.0,
                    1 as libc::c_long,
                    list.as_ptr(),
                )
            };
            if r == 1 {
                break;
            }
            if r == 0 {
                return Err("io_submit queued nothing".into());
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => nap(Duration::from_millis(1)),
                Some(libc::EINVAL) => {
                    return Err(os_err(
                        "io_submit (EINVAL: does the file have read_iter/write_iter?)",
                    ))
                }
                _ => return Err(os_err("io_submit")),
            }
        }
        self.submits += 1;
        let ev = self.complete()?;
        if ev.data != self.seq || ev.obj != list[0] as u64 {
            return Err(format!(
                "completion for data {} obj {:#x}, expected {} {:#x}",
                ev.data, ev.obj, self.seq, list[0] as u64
            ));
        }
        Ok(ev.res)
    }

    /// Wait on the eventfd through epoll, then reap without waiting.
    fn complete(&mut self) -> Result<IoEvent, String> {
        loop {
            epoll_wait_one(self.ep.as_raw_fd())?;
            self.wakeups += 1;
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into `count`; the eventfd is open.
            let n = unsafe {
                libc::read(
                    self.efd.as_raw_fd(),
                    (&mut count as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n < 0
                && !matches!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EAGAIN | libc::EINTR)
                )
            {
                return Err(os_err("read(eventfd)"));
            }
            let mut ev = IoEvent::default();
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: room for one event; a zero timeout does not wait.
            let got = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx.0,
                    0 as libc::c_long,
                    1 as libc::c_long,
                    &mut ev as *mut IoEvent,
                    &zero as *const libc::timespec,
                )
            };
            if got < 0 {
                if interrupted() {
                    continue;
                }
                return Err(os_err("io_getevents"));
            }
            if got == 1 {
                return Ok(ev);
            }
            self.empty += 1;
        }
    }

    fn counters(&self, r: &mut Report) {
        r.num("submits", self.submits)
            .num("eventfd_wakeups", self.wakeups)
            .num("empty_wakeups", self.empty);
    }
}

/// Run `linux-aio-rx`.
pub fn rx(o: &Opts) -> Result<Report, String> {
    // Declared before `aio`, so dropped after it: io_destroy waits for a
    // request still in flight on an error path before the buffer goes.
    let mut rx = Rx::new(o);
    let mut buf = vec![0u8; o.chunk];
    let fd = open_device(&o.device, Access::Read, false)?;
    let mut aio = Aio::new()?;
    ready(&o.scenario);
    while !rx.done() {
        let len = rx.next_len();
        let n = aio
            .transfer(fd.as_raw_fd(), Dir::Rx, buf.as_mut_ptr() as u64, len)
            .map_err(|e| format!("after {} bytes: {e}", rx.total()))?;
        rx.accept(&buf[..n])?;
    }
    let mut r = rx.report();
    aio.counters(&mut r);
    Ok(r)
}

/// Run `linux-aio-tx`.
pub fn tx(o: &Opts) -> Result<Report, String> {
    let mut tx = Tx::new(o)?;
    let fd = open_device(&o.device, Access::Write, false)?;
    let mut aio = Aio::new()?;
    crate::start(o);
    while !tx.done() {
        let chunk = tx.next();
        let (ptr, len) = (chunk.as_ptr() as u64, chunk.len());
        let t0 = std::time::Instant::now();
        let n = aio
            .transfer(fd.as_raw_fd(), Dir::Tx, ptr, len)
            .map_err(|e| format!("after {} bytes: {e}", tx.sent()))?;
        tx.latency(t0.elapsed());
        tx.advance(n)?;
    }
    let mut r = tx.report();
    aio.counters(&mut r);
    Ok(r)
}
