//! `echo-<model>`: the guest side of `vdevlab bench`'s round-trip latency
//! measurement. The program opens `--device` read-write (the qw device, or
//! the virtio-serial baseline port `/dev/virtio-ports/<name>`), prints
//! `VDEVLAB-READY echo-<model>`, and then echoes the byte stream: it waits
//! for data the model's way, reads what is there (at most `--chunk` bytes,
//! never past `--bytes` in all) and writes exactly those bytes back, until
//! `--bytes` bytes went through. It keeps no message framing: the host
//! sends one small stamped message at a time and times its return.
//!
//! Each model waits as its stream scenario does (same descriptor mode and
//! system calls, sharing their helpers where they are public):
//!
//! | model | read side | write side |
//! | --- | --- | --- |
//! | `blocking` | blocking `read` | blocking `write` |
//! | `nonblocking` | `O_NONBLOCK` `read`; `EAGAIN`: `nanosleep` back-off, 50 us doubling to 2 ms | same |
//! | `select` | `select` for reading, then one `read` | `write`; `EAGAIN`: `select` for writing |
//! | `poll` | `poll(POLLIN)`, then one `read` | `write`; `EAGAIN`: `poll(POLLOUT)` |
//! | `epoll-lt` | `epoll_wait` (level), then one `read` | `write`; `EAGAIN`: `epoll_wait` on an `EPOLLOUT` instance |
//! | `epoll-et` | `read` until `EAGAIN`, then `epoll_wait` (`EPOLLET`) | as `epoll-lt` |
//! | `sigio` | `read` until `EAGAIN`, then `sigwaitinfo` (`O_ASYNC`, `F_SETSIG` `SIGRTMIN+1`) | `write`; `EAGAIN`: `sigwaitinfo` |
//! | `posix-aio` | `aio_read` + `aio_suspend` | `aio_write` + `aio_suspend` |
//! | `linux-aio` | `io_submit` `PREAD`, completion through an eventfd watched by epoll | `io_submit` `PWRITE`, same |
//! | `io-uring` | `IORING_OP_READ`, `io_uring_enter` waits | `IORING_OP_WRITE` |
//!
//! The signal of `sigio` is directed at the echoing thread (`F_SETOWN_EX`
//! with `F_OWNER_TID`), so the echo also works in a multi-threaded process
//! (the unit tests run it on a socket pair).
//!
//! Before `VDEVLAB-READY` the program waits (up to 30 s) while `poll`
//! reports `POLLHUP`: a virtio-serial port whose host side is not connected
//! yet reads as end of file.
//!
//! Result fields: `bytes`, `reads`, `writes`, `waits` (times the program
//! slept in the model's wait), `empty` (wakeups or retries that found
//! nothing), `write_waits` (writes that had to wait).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::common::{errno_err, interrupted, nap, open_device, os_err, set_fl, Access};
use crate::io_models::epoll::{epoll_for, epoll_wait_one};
use crate::uapi::aio_abi::{Ctx, IoEvent, Iocb, IOCB_CMD_PREAD};
use crate::{ready, Opts, Report};

/// The echo scenarios' prefix: `echo-<model>` for each of [`crate::MODELS`].
pub const PREFIX: &str = "echo-";

/// The model of `echo-<model>`, if it is one.
pub fn model_of(scenario: &str) -> Option<Model> {
    Model::from_name(scenario.strip_prefix(PREFIX)?)
}

/// An I/O model, as the echo runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Blocking `read`/`write`.
    Blocking,
    /// `O_NONBLOCK` with a sleeping retry loop.
    Nonblocking,
    /// `select`.
    Select,
    /// `poll`.
    Poll,
    /// Level-triggered epoll.
    EpollLt,
    /// Edge-triggered epoll.
    EpollEt,
    /// Signal-driven I/O.
    Sigio,
    /// glibc POSIX AIO.
    PosixAio,
    /// Linux native AIO.
    LinuxAio,
    /// io_uring.
    IoUring,
}

impl Model {
    /// The model named as in [`crate::MODELS`].
    pub fn from_name(name: &str) -> Option<Model> {
        Some(match name {
            "blocking" => Model::Blocking,
            "nonblocking" => Model::Nonblocking,
            "select" => Model::Select,
            "poll" => Model::Poll,
            "epoll-lt" => Model::EpollLt,
            "epoll-et" => Model::EpollEt,
            "sigio" => Model::Sigio,
            "posix-aio" => Model::PosixAio,
            "linux-aio" => Model::LinuxAio,
            "io-uring" => Model::IoUring,
            _ => return None,
        })
    }

    /// Whether the descriptor is opened `O_NONBLOCK`.
    fn nonblocking(self) -> bool {
        !matches!(
            self,
            Model::Blocking | Model::PosixAio | Model::LinuxAio | Model::IoUring
        )
    }
}

/// Counters of one echo run.
#[derive(Debug, Default)]
struct Counts {
    bytes: u64,
    reads: u64,
    writes: u64,
    waits: u64,
    empty: u64,
    write_waits: u64,
}

const FIRST_BACKOFF: Duration = Duration::from_micros(50);
const MAX_BACKOFF: Duration = Duration::from_millis(2);
/// `F_SETSIG`, `F_SETOWN_EX` and `F_OWNER_TID` of `<fcntl.h>` (not in the
/// libc crate for glibc targets).
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_FLAG_RESFD: u32 = 1 << 0;

/// `struct f_owner_ex`.
#[repr(C)]
#[derive(Debug)]
struct FOwnerEx {
    kind: libc::c_int,
    pid: libc::pid_t,
}

/// One read or write attempt: bytes moved, or `None` for `EAGAIN`.
fn try_io(fd: RawFd, buf: *mut u8, len: usize, write: bool) -> Result<Option<usize>, String> {
    loop {
        let n = if write {
            // SAFETY: the caller passes a live buffer of `len` readable bytes.
            unsafe { libc::write(fd, buf.cast_const().cast(), len) }
        } else {
            // SAFETY: the caller passes a live buffer of `len` writable bytes.
            unsafe { libc::read(fd, buf.cast(), len) }
        };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(os_err(if write { "write" } else { "read" })),
        }
    }
}

/// `poll` one descriptor for `events`, retrying `EINTR`; the revents.
fn poll_one(fd: RawFd, events: libc::c_short, timeout_ms: libc::c_int) -> Result<i16, String> {
    loop {
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if n < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("poll"));
        }
        if p.revents & libc::POLLNVAL != 0 {
            return Err("poll reported POLLNVAL".into());
        }
        return Ok(p.revents);
    }
}

/// `select` for reading or writing, retrying `EINTR`.
fn select_one(fd: RawFd, write: bool) -> Result<(), String> {
    if fd >= libc::FD_SETSIZE as RawFd {
        return Err(format!("descriptor {fd} does not fit an fd_set"));
    }
    loop {
        // SAFETY: fd_set is plain data; all-zero is a valid (empty) set.
        let mut set: libc::fd_set = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid fd_set and `fd` < FD_SETSIZE (above).
        unsafe {
            libc::FD_ZERO(&mut set);
            libc::FD_SET(fd, &mut set);
        }
        let (r, w): (*mut libc::fd_set, *mut libc::fd_set) = if write {
            (std::ptr::null_mut(), &mut set)
        } else {
            (&mut set, std::ptr::null_mut())
        };
        // SAFETY: the sets are valid or null; a null timeout waits forever.
        let n = unsafe { libc::select(fd + 1, r, w, std::ptr::null_mut(), std::ptr::null_mut()) };
        if n < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("select"));
        }
        // SAFETY: `set` is a valid fd_set that select() filled in.
        if n > 0 && unsafe { libc::FD_ISSET(fd, &set) } {
            return Ok(());
        }
    }
}

/// The signal-driven set-up of `sigio`: the blocked signal set.
#[derive(Debug)]
struct SigIo {
    set: libc::sigset_t,
}

impl SigIo {
    fn new(fd: RawFd) -> Result<Self, String> {
        let sig = libc::SIGRTMIN() + 1;
        if sig > libc::SIGRTMAX() {
            return Err("no real-time signal available".into());
        }
        // SAFETY: sigset_t is plain data; sigemptyset initialises it next.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t; the signals are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigaddset(&mut set, libc::SIGIO);
        }
        // Blocked before O_ASYNC, so no signal is ever delivered.
        // SAFETY: `set` is valid; the old mask is not wanted.
        let e = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if e != 0 {
            return Err(errno_err("pthread_sigmask", e));
        }
        let owner = FOwnerEx {
            kind: F_OWNER_TID,
            // SAFETY: gettid has no preconditions.
            pid: unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t,
        };
        // SAFETY: F_SETOWN_EX takes a pointer to a valid f_owner_ex.
        if unsafe { libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) } < 0 {
            return Err(os_err("fcntl(F_SETOWN_EX)"));
        }
        // SAFETY: F_SETSIG takes a signal number.
        if unsafe { libc::fcntl(fd, F_SETSIG, sig) } < 0 {
            return Err(os_err("fcntl(F_SETSIG)"));
        }
        set_fl(fd, libc::O_ASYNC, 0)?;
        Ok(Self { set })
    }

    /// Wait for the next readiness signal (or a queue-overflow `SIGIO`).
    fn wait(&self) -> Result<(), String> {
        loop {
            // SAFETY: siginfo_t is plain data; all-zero is valid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` and `info` are valid for the call.
            if unsafe { libc::sigwaitinfo(&self.set, &mut info) } >= 0 {
                return Ok(());
            }
            if !interrupted() {
                return Err(os_err("sigwaitinfo"));
            }
        }
    }
}

/// Native AIO: context, eventfd and its epoll watcher.
#[derive(Debug)]
struct LinuxAio {
    efd: OwnedFd,
    ep: OwnedFd,
    ctx: Ctx,
    seq: u64,
}

impl LinuxAio {
    fn new() -> Result<Self, String> {
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
        })
    }

    /// One request, waited for through the eventfd; the byte count.
    ///
    /// # Safety
    /// `buf` must stay valid for `len` bytes until the context is dropped
    /// if this returns an error (the request may still be in flight).
    unsafe fn transfer(
        &mut self,
        fd: RawFd,
        write: bool,
        buf: *mut u8,
        len: usize,
        c: &mut Counts,
    ) -> Result<usize, String> {
        self.seq += 1;
        let mut iocb = Iocb {
            aio_data: self.seq,
            aio_lio_opcode: if write {
                IOCB_CMD_PWRITE
            } else {
                IOCB_CMD_PREAD
            },
            aio_fildes: fd as u32,
            aio_buf: buf as u64,
            aio_nbytes: len as u64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.efd.as_raw_fd() as u32,
            ..Iocb::default()
        };
        let list = [&mut iocb as *mut Iocb];
        loop {
            // SAFETY: one valid iocb whose buffer the caller keeps alive.
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
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => nap(Duration::from_millis(1)),
                _ => return Err(os_err("io_submit")),
            }
        }
        loop {
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
            if got < 0 && !interrupted() {
                return Err(os_err("io_getevents"));
            }
            if got == 1 {
                if ev.data != self.seq {
                    return Err(format!(
                        "completion for request {}, expected {}",
                        ev.data, self.seq
                    ));
                }
                if ev.res < 0 {
                    return Err(errno_err("AIO request", (-ev.res) as i32));
                }
                return Ok(ev.res as usize);
            }
            c.waits += 1;
            epoll_wait_one(self.ep.as_raw_fd())?;
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into `count`; the eventfd is open.
            unsafe {
                libc::read(
                    self.efd.as_raw_fd(),
                    (&mut count as *mut u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }
}

/// The model's waiting machinery for one descriptor (no `Debug`: the
/// io_uring crate's ring has none).
enum Waiter {
    Plain,
    Epoll { rd: OwnedFd, wr: Option<OwnedFd> },
    Sig(SigIo),
    Aio(LinuxAio),
    Uring(Box<IoUring>),
}

/// Wait (POSIX AIO) for the request of `cb`; its result.
fn posix_aio_finish(cb: *mut libc::aiocb, c: &mut Counts) -> Result<usize, String> {
    loop {
        // SAFETY: `cb` points to a live, submitted aiocb.
        let e = unsafe { libc::aio_error(cb) };
        if e == libc::EINPROGRESS {
            c.waits += 1;
            let list = [cb as *const libc::aiocb];
            // SAFETY: a list of one live aiocb; null timeout waits forever.
            unsafe { libc::aio_suspend(list.as_ptr(), 1, std::ptr::null()) };
            continue;
        }
        // SAFETY: the request completed; aio_return is called once for it.
        let ret = unsafe { libc::aio_return(cb) };
        if e != 0 {
            return Err(errno_err("POSIX AIO request", e));
        }
        return usize::try_from(ret).map_err(|_| format!("aio_return {ret}"));
    }
}

/// One POSIX AIO read or write of `len` bytes at `buf`, waited for.
fn posix_aio(
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    write: bool,
    c: &mut Counts,
) -> Result<usize, String> {
    // SAFETY: aiocb is plain data; all-zero is its initial state.
    let mut cb: libc::aiocb = unsafe { std::mem::zeroed() };
    cb.aio_fildes = fd;
    cb.aio_buf = buf.cast();
    cb.aio_nbytes = len;
    cb.aio_sigevent.sigev_notify = libc::SIGEV_NONE;
    let p: *mut libc::aiocb = &mut cb;
    // SAFETY: `cb` and the buffer outlive the request: posix_aio_finish
    // returns only once it completed.
    let r = unsafe {
        if write {
            libc::aio_write(p)
        } else {
            libc::aio_read(p)
        }
    };
    if r < 0 {
        return Err(os_err(if write { "aio_write" } else { "aio_read" }));
    }
    posix_aio_finish(p, c)
}

/// One io_uring read or write, waited for.
///
/// # Safety
/// `buf` must stay valid for `len` bytes for good if this returns an error.
unsafe fn uring(
    ring: &mut IoUring,
    fd: RawFd,
    buf: *mut u8,
    len: usize,
    write: bool,
    c: &mut Counts,
) -> Result<usize, String> {
    let entry = if write {
        opcode::Write::new(types::Fd(fd), buf.cast_const(), len as u32)
            .offset(u64::MAX)
            .build()
    } else {
        opcode::Read::new(types::Fd(fd), buf, len as u32)
            .offset(u64::MAX)
            .build()
    }
    .user_data(1);
    // SAFETY: the caller keeps `buf` valid (this fn's contract).
    unsafe { ring.submission().push(&entry) }.map_err(|_| "submission queue full".to_string())?;
    uring_complete(ring, c)
}

fn uring_complete(ring: &mut IoUring, c: &mut Counts) -> Result<usize, String> {
    let cqe = loop {
        if let Some(cqe) = ring.completion().next() {
            break cqe;
        }
        c.waits += 1;
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
    };
    let res = cqe.result();
    if res < 0 {
        return Err(errno_err("io_uring request", -res));
    }
    Ok(res as usize)
}

/// The echo loop on an open descriptor (read-write, blocking or not as
/// [`Model`] wants; [`run`] opens it so). Calls `on_ready` once set up.
pub fn echo_fd(
    fd: RawFd,
    model: Model,
    total: u64,
    chunk: usize,
    on_ready: impl FnOnce(),
) -> Result<Report, String> {
    let mut waiter = match model {
        Model::Select | Model::Poll | Model::Blocking | Model::Nonblocking | Model::PosixAio => {
            Waiter::Plain
        }
        Model::EpollLt => Waiter::Epoll {
            rd: epoll_for(fd, libc::EPOLLIN as u32)?,
            wr: None,
        },
        Model::EpollEt => Waiter::Epoll {
            rd: epoll_for(fd, (libc::EPOLLIN | libc::EPOLLET) as u32)?,
            wr: None,
        },
        Model::Sigio => Waiter::Sig(SigIo::new(fd)?),
        Model::LinuxAio => Waiter::Aio(LinuxAio::new()?),
        Model::IoUring => Waiter::Uring(Box::new(
            IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?,
        )),
    };
    let mut buf = vec![0u8; chunk.max(1)];
    let mut c = Counts::default();
    on_ready();
    let result = echo_loop(fd, model, total, &mut buf, &mut waiter, &mut c);
    if let Err(e) = result {
        // A request may still be in flight: keep its buffer (and the ring
        // or context) alive until the process exits.
        std::mem::forget(buf);
        std::mem::forget(waiter);
        return Err(e);
    }
    if let Waiter::Sig(_) = waiter {
        let _ = set_fl(fd, 0, libc::O_ASYNC);
    }
    let mut r = Report::new();
    r.num("bytes", c.bytes)
        .num("reads", c.reads)
        .num("writes", c.writes)
        .num("waits", c.waits)
        .num("empty", c.empty)
        .num("write_waits", c.write_waits);
    Ok(r)
}

/// Echo until `total` bytes went through: read what is there (at most
/// `buf.len()`, never past `total`), write it all back.
fn echo_loop(
    fd: RawFd,
    model: Model,
    total: u64,
    buf: &mut [u8],
    waiter: &mut Waiter,
    c: &mut Counts,
) -> Result<(), String> {
    let mut backoff = FIRST_BACKOFF;
    while c.bytes < total {
        let want = (total - c.bytes).min(buf.len() as u64) as usize;
        let p = buf.as_mut_ptr();
        let n = read_some(fd, model, p, want, waiter, c, &mut backoff)?;
        if n == 0 {
            return Err(format!(
                "read returned 0 (end of file) after {} bytes",
                c.bytes
            ));
        }
        if n > want {
            return Err(format!("read returned {n} bytes, {want} asked for"));
        }
        c.reads += 1;
        write_back(fd, model, p, n, waiter, c)?;
        c.bytes += n as u64;
    }
    Ok(())
}

/// Read at least one byte and at most `want` into `p`, the model's way
/// (`backoff`: the non-blocking model's current back-off, kept between
/// reads). The buffer must stay valid for good if this fails (see
/// [`echo_fd`]).
fn read_some(
    fd: RawFd,
    model: Model,
    p: *mut u8,
    want: usize,
    waiter: &mut Waiter,
    c: &mut Counts,
    backoff: &mut Duration,
) -> Result<usize, String> {
    Ok(loop {
        match model {
            Model::Blocking => match try_io(fd, p, want, false)? {
                Some(n) => break n,
                None => return Err("EAGAIN from a blocking descriptor".into()),
            },
            Model::Nonblocking => match try_io(fd, p, want, false)? {
                Some(n) => {
                    *backoff = FIRST_BACKOFF;
                    break n;
                }
                None => {
                    c.empty += 1;
                    c.waits += 1;
                    nap(*backoff);
                    *backoff = (*backoff * 2).min(MAX_BACKOFF);
                }
            },
            // Wait first, then one read per wakeup.
            Model::Select | Model::Poll | Model::EpollLt => {
                c.waits += 1;
                match (model, &*waiter) {
                    (Model::Select, _) => select_one(fd, false)?,
                    (Model::EpollLt, Waiter::Epoll { rd, .. }) => {
                        let ev = epoll_wait_one(rd.as_raw_fd())?;
                        if ev & libc::EPOLLERR as u32 != 0 {
                            return Err(format!("epoll reported EPOLLERR ({ev:#x})"));
                        }
                    }
                    _ => {
                        let rev = poll_one(fd, libc::POLLIN, -1)?;
                        if rev & libc::POLLERR != 0 {
                            return Err(format!("poll reported POLLERR ({rev:#x})"));
                        }
                    }
                }
                match try_io(fd, p, want, false)? {
                    Some(n) => break n,
                    None => c.empty += 1,
                }
            }
            // Drain until EAGAIN, then wait for the next edge/signal.
            Model::EpollEt | Model::Sigio => match try_io(fd, p, want, false)? {
                Some(n) => break n,
                None => {
                    c.waits += 1;
                    match &*waiter {
                        Waiter::Sig(s) => s.wait()?,
                        Waiter::Epoll { rd, .. } => {
                            let ev = epoll_wait_one(rd.as_raw_fd())?;
                            if ev & libc::EPOLLERR as u32 != 0 {
                                return Err(format!("epoll reported EPOLLERR ({ev:#x})"));
                            }
                        }
                        _ => unreachable!("edge models have their waiter"),
                    }
                }
            },
            Model::PosixAio => break posix_aio(fd, p, want, false, c)?,
            Model::LinuxAio => match waiter {
                // SAFETY: `buf` outlives the request; on an error the
                // caller forgets it and the context.
                Waiter::Aio(a) => break unsafe { a.transfer(fd, false, p, want, c) }?,
                _ => unreachable!("linux-aio has its context"),
            },
            Model::IoUring => match waiter {
                // SAFETY: as for linux-aio.
                Waiter::Uring(r) => break unsafe { uring(r, fd, p, want, false, c) }?,
                _ => unreachable!("io-uring has its ring"),
            },
        }
    })
}

/// Write the `n` bytes at `p` back, all of them (waiting the model's way
/// while the device is full). The buffer must stay valid for good if
/// this fails.
fn write_back(
    fd: RawFd,
    model: Model,
    p: *mut u8,
    n: usize,
    waiter: &mut Waiter,
    c: &mut Counts,
) -> Result<(), String> {
    let mut off = 0;
    while off < n {
        // SAFETY: `off < n <= buf.len()`.
        let q = unsafe { p.add(off) };
        let left = n - off;
        let m = match (model, &mut *waiter) {
            (Model::PosixAio, _) => Some(posix_aio(fd, q, left, true, c)?),
            // SAFETY: as for the read.
            (_, Waiter::Aio(a)) => Some(unsafe { a.transfer(fd, true, q, left, c) }?),
            // SAFETY: as for the read.
            (_, Waiter::Uring(r)) => Some(unsafe { uring(r, fd, q, left, true, c) }?),
            _ => try_io(fd, q, left, true)?,
        };
        match m {
            Some(0) => return Err(format!("write returned 0 after {} bytes", c.bytes)),
            Some(m) => {
                off += m;
                c.writes += 1;
            }
            None => {
                c.write_waits += 1;
                match (model, &mut *waiter) {
                    (Model::Blocking, _) => return Err("EAGAIN from a blocking descriptor".into()),
                    (Model::Nonblocking, _) => nap(FIRST_BACKOFF),
                    (Model::Select, _) => select_one(fd, true)?,
                    (_, Waiter::Epoll { wr, .. }) => {
                        if wr.is_none() {
                            *wr = Some(epoll_for(fd, libc::EPOLLOUT as u32)?);
                        }
                        if let Some(w) = wr {
                            epoll_wait_one(w.as_raw_fd())?;
                        }
                    }
                    (_, Waiter::Sig(s)) => s.wait()?,
                    _ => {
                        poll_one(fd, libc::POLLOUT, -1)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Wait (up to `limit`) while `poll` reports `POLLHUP` on `fd`: the host
/// side of a virtio-serial port is not connected yet.
fn wait_for_peer(fd: RawFd, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let rev = poll_one(fd, libc::POLLIN, 0)?;
        if rev & libc::POLLHUP == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the device reports POLLHUP (no peer) {} s after opening it",
                limit.as_secs()
            ));
        }
        nap(Duration::from_millis(50));
    }
}

/// Run `echo-<model>` on `--device`: echo `--bytes` bytes.
pub fn run(o: &Opts) -> Result<Report, String> {
    let model = model_of(&o.scenario).ok_or_else(|| format!("unknown scenario {}", o.scenario))?;
    let fd = open_device(&o.device, Access::ReadWrite, model.nonblocking())?;
    wait_for_peer(fd.as_raw_fd(), Duration::from_secs(30))?;
    echo_fd(fd.as_raw_fd(), model, o.bytes, o.chunk, || {
        ready(&o.scenario)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Every model echoes a stream of small messages on a socket pair,
    /// one message at a time (as the host does), byte for byte.
    #[test]
    fn every_model_echoes_on_a_socket_pair() {
        for name in crate::MODELS {
            let model = Model::from_name(name).unwrap();
            assert_eq!(model_of(&format!("echo-{name}")), Some(model));
            let (mut host, guest) = UnixStream::pair().unwrap();
            guest.set_nonblocking(model.nonblocking()).unwrap();
            const MSG: usize = 16;
            const COUNT: usize = 200;
            let (tx, rx) = std::sync::mpsc::channel();
            let echo = std::thread::spawn(move || {
                let r = echo_fd(guest.as_raw_fd(), model, (MSG * COUNT) as u64, 4096, || {
                    tx.send(()).unwrap()
                });
                drop(guest);
                r
            });
            rx.recv_timeout(Duration::from_secs(10)).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            for i in 0..COUNT {
                let mut msg = [0u8; MSG];
                msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
                msg[8..].copy_from_slice(&(!(i as u64)).to_le_bytes());
                host.write_all(&msg).unwrap();
                let mut back = [0u8; MSG];
                host.read_exact(&mut back)
                    .unwrap_or_else(|e| panic!("{name}: message {i}: {e}"));
                assert_eq!(back, msg, "{name}: message {i}");
            }
            let report = echo
                .join()
                .unwrap()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(report.get("bytes"), Some("3200"), "{name}");
            let reads: u64 = report.get("reads").unwrap().parse().unwrap();
            assert!(
                (COUNT as u64..=(MSG * COUNT) as u64).contains(&reads),
                "{name}: {reads}"
            );
        }
    }

    #[test]
    fn a_peer_that_goes_away_is_an_error_not_a_hang() {
        let (host, guest) = UnixStream::pair().unwrap();
        drop(host);
        let err = echo_fd(guest.as_raw_fd(), Model::Blocking, 16, 16, || {}).unwrap_err();
        assert!(err.contains("end of file"), "{err}");
    }

    #[test]
    fn only_the_ten_models_are_echo_scenarios() {
        assert_eq!(model_of("echo-epoll-et"), Some(Model::EpollEt));
        assert_eq!(model_of("echo-bogus"), None);
        assert_eq!(model_of("epoll-et-rx"), None);
        assert!(crate::MODELS.iter().all(|m| Model::from_name(m).is_some()));
    }
}
