//! `trouble-removal`, `trouble-needs-reset`, `trouble-broken`,
//! `trouble-reset`, `trouble-unplug` and `trouble-broken-tx`: a crew of waiters, one of every kind the qw driver has,
//! sits in the driver when the device gets into trouble, and each must end
//! the way `docs/device-spec.md` ("What each waiter sees when the device
//! fails") says, within [`BOUND`] of the trouble.
//!
//! 1. A non-blocking writer fills the transmit side until it stays full:
//!    nobody drains the device's capture (1 MiB), so once that and the tx
//!    ring are full, `POLLOUT` stays off (500 ms without it, buffers in
//!    flight): `tx_fill_ms`.
//! 2. The crew, each on its own descriptor and thread:
//!    `read` (blocking `read()` of a page), `write` (blocking `write()` of
//!    a page), `poll_in` / `poll_out` (`poll()` for `POLLIN` / `POLLOUT`),
//!    `epoll_in` / `epoll_out` (edge-triggered `epoll_wait` for
//!    `EPOLLIN` / `EPOLLOUT`), `sigio` (an `O_ASYNC` owner: `F_SETOWN_EX`
//!    to its thread, `F_SETSIG` `SIGIO`, so the kernel fills `si_code` and
//!    `si_band`; taken with `sigtimedwait`), `aio_read` / `aio_write`
//!    (native AIO, queued, reaped with `io_getevents`), `uring_read` /
//!    `uring_write` (io_uring, parked on the driver's poll) and
//!    `posix_read` / `posix_write` (glibc's POSIX AIO, whose helper
//!    threads sleep in `read()`/`write()`).
//! 3. The crew settles for 500 ms, and nobody may have ended; then
//!    `VDEVLAB-READY trouble-<kind>` and the trouble ([`Trouble`]): the
//!    program unbinds the driver (`removal`) or resets the device with
//!    `QW_IOC_RESET` (`reset`) itself, at once; for `needs-reset` the host sends
//!    `{"op":"needs_reset"}` and for `broken` arms `hostile_bogus_id` on
//!    rx and injects a few bytes, right after the marker (their times
//!    count from the marker, so they include the host's reaction).
//!    `unplug` is a removal by the PCI function's `remove` (the program
//!    writes it), `broken-tx` breaks the tx ring instead: the host arms
//!    `hostile_bogus_id` on tx and takes some of the capture, so the
//!    device completes a transmit buffer with an id never posted.
//! 4. Each waiter must end within [`BOUND`] with its documented result
//!    ([`want`]). On `reset` only the transmit side ends (the ring was
//!    emptied); the receive side keeps waiting until
//!    `VDEVLAB-READY trouble-reset-2`, after which the host injects data,
//!    and must then end with data (its times count from that marker).
//! 5. The way back: `removal` binds the driver again, `unplug` rescans
//!    the PCI bus, `needs-reset` and `broken(-tx)` reset the device (`QW_IOC_RESET`), `reset` flushes what the
//!    host injected; the device must then be in state 0.
//!
//! Fields: `trouble`, `bound_ms`, `tx_fill_ms`, per waiter its end
//! (`read`: `ENODEV`, `returned 4096`, `0x11 (IN|HUP)`, `POLL_HUP band
//! 0x18 (ERR|HUP)`, ...) and milliseconds (`read_ms`, ...), `armed` (how
//! the queued requests were set up), `stats_after`, `recover`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::common::{errno_name, last_errno, mask_name, nap, poll_one, read_fd, set_fl};
use crate::common::{open_device, os_err, wait_cqe, wait_for_chardev, write_sysfs, Access};
use crate::io_models::sigio::SigPoll;
use crate::scenarios::teardown::{bound_device, pci_parent};
use crate::scenarios::Checked;
use crate::uapi::aio_abi::{getevents, Ctx, IoEvent, Iocb, IOCB_CMD_PREAD, IOCB_CMD_PWRITE};
use crate::uapi::ioctl_plain;
use crate::uapi::qw::{get_stats, DRIVER, QW_IOC_FLUSH, QW_IOC_RESET};
use crate::{pattern, ready, Opts};

/// Every waiter must end this soon after its trouble (or, on `reset`, the
/// receive side after the data came).
pub const BOUND: Duration = Duration::from_secs(10);
/// What each reader asks for and each writer writes: one transmit buffer.
const PAGE: usize = 4096;
/// Time for every waiter to reach its sleep before the trouble.
const SETTLE: Duration = Duration::from_millis(500);
/// The transmit side must be full this soon.
const FILL_LIMIT: Duration = Duration::from_secs(20);
/// `POLLOUT` must stay off this long for the transmit side to count as full.
const FULL_QUIET: Duration = Duration::from_millis(500);
/// A waiter thread gives up after this in any case (the verdict uses
/// [`BOUND`]; this only keeps threads from staying forever).
const THREAD_LIMIT: Duration = Duration::from_secs(40);
const SYSFS: &str = "/sys";

/// `si_code` values of `SIGPOLL`-style signals (`<asm-generic/siginfo.h>`).
pub const POLL_OUT: i32 = 2;
/// The device needs a reset.
pub const POLL_ERR: i32 = 4;
/// The device is gone.
pub const POLL_HUP: i32 = 6;
const F_SETSIG: libc::c_int = 10;
const F_SETOWN_EX: libc::c_int = 15;
const F_OWNER_TID: libc::c_int = 0;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// The driver is unbound from the device (the program does it).
    Removal,
    /// The device sets NEEDS_RESET (the host: `{"op":"needs_reset"}`).
    NeedsReset,
    /// A hostile used ring breaks the rx virtqueue (the host arms
    /// `hostile_bogus_id` on rx and injects).
    Broken,
    /// `QW_IOC_RESET` while everyone waits (the program does it).
    Reset,
    /// The PCI function is removed, a hot-unplug (the program does it,
    /// and rescans the bus afterwards).
    Unplug,
    /// A hostile used ring breaks the tx virtqueue (the host arms
    /// `hostile_bogus_id` on tx and drains some of the capture, so the
    /// device completes a transmit buffer).
    BrokenTx,
}

/// The scenario names, in [`Trouble`] order.
pub const TROUBLES: [&str; 6] = [
    "trouble-removal",
    "trouble-needs-reset",
    "trouble-broken",
    "trouble-reset",
    "trouble-unplug",
    "trouble-broken-tx",
];

impl Trouble {
    /// The trouble of scenario `name`, if it is one of [`TROUBLES`].
    pub fn from_scenario(name: &str) -> Option<Self> {
        let all = [
            Trouble::Removal,
            Trouble::NeedsReset,
            Trouble::Broken,
            Trouble::Reset,
            Trouble::Unplug,
            Trouble::BrokenTx,
        ];
        TROUBLES.iter().position(|t| *t == name).map(|i| all[i])
    }

    fn key(self) -> &'static str {
        match self {
            Trouble::Removal => "removal",
            Trouble::NeedsReset => "needs-reset",
            Trouble::Broken => "broken",
            Trouble::Reset => "reset",
            Trouble::Unplug => "unplug",
            Trouble::BrokenTx => "broken-tx",
        }
    }
}

/// The kinds of waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    PollIn,
    PollOut,
    EpollIn,
    EpollOut,
    Sigio,
    AioRead,
    AioWrite,
    UringRead,
    UringWrite,
    PosixRead,
    PosixWrite,
}

/// The crew, in the order of the result line.
pub const CREW: [Kind; 13] = [
    Kind::Read,
    Kind::Write,
    Kind::PollIn,
    Kind::PollOut,
    Kind::EpollIn,
    Kind::EpollOut,
    Kind::Sigio,
    Kind::AioRead,
    Kind::AioWrite,
    Kind::UringRead,
    Kind::UringWrite,
    Kind::PosixRead,
    Kind::PosixWrite,
];

impl Kind {
    /// Its result-line field.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::PollIn => "poll_in",
            Kind::PollOut => "poll_out",
            Kind::EpollIn => "epoll_in",
            Kind::EpollOut => "epoll_out",
            Kind::Sigio => "sigio",
            Kind::AioRead => "aio_read",
            Kind::AioWrite => "aio_write",
            Kind::UringRead => "uring_read",
            Kind::UringWrite => "uring_write",
            Kind::PosixRead => "posix_read",
            Kind::PosixWrite => "posix_write",
        }
    }

    fn index(self) -> usize {
        CREW.iter().position(|k| *k == self).expect("in the crew")
    }

    /// Waits for received data (or its readiness); the others for room.
    fn receives(self) -> bool {
        matches!(
            self,
            Kind::Read
                | Kind::PollIn
                | Kind::EpollIn
                | Kind::AioRead
                | Kind::UringRead
                | Kind::PosixRead
        )
    }
}

/// How a waiter ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// A transfer returned this many bytes.
    Bytes(u64),
    /// A transfer failed with this errno.
    Errno(i32),
    /// `poll`/`epoll` reported these events.
    Events(u32),
    /// `SIGIO` with this `si_code` and `si_band`.
    Signal { code: i32, band: i64 },
    /// The waiter itself could not wait (a setup or syscall error, or no
    /// end within its thread's limit).
    Failed(String),
}

/// The `si_code` of a `SIGPOLL`-style signal, by name.
pub fn poll_code_name(code: i32) -> String {
    let names = [
        "POLL_IN", "POLL_OUT", "POLL_MSG", "POLL_ERR", "POLL_PRI", "POLL_HUP",
    ];
    match usize::try_from(code - 1).ok().and_then(|i| names.get(i)) {
        Some(n) => n.to_string(),
        None => format!("si_code {code}"),
    }
}

impl End {
    /// As a result-line value.
    pub fn text(&self) -> String {
        match self {
            End::Bytes(n) => format!("returned {n}"),
            End::Errno(e) => errno_name(*e),
            End::Events(m) => mask_name(*m),
            End::Signal { code, band } => {
                format!("{} band {}", poll_code_name(*code), mask_name(*band as u32))
            }
            End::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// What a waiter must end with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// This errno.
    Errno(i32),
    /// Events including this bit (`POLLHUP`, `POLLERR`).
    Flag(u32),
    /// Events including this bit and neither `POLLERR` nor `POLLHUP`.
    Ready(u32),
    /// Exactly this many bytes.
    Bytes(u64),
    /// At least one byte.
    Data,
    /// `SIGIO` with this `si_code` and this bit in `si_band`.
    Signal(i32, i64),
}

/// The documented end of waiter `k` on trouble `t` (the table in
/// `docs/device-spec.md`).
pub fn want(t: Trouble, k: Kind) -> Want {
    // Unplugged is removed; a broken tx queue is a broken queue.
    let t = match t {
        Trouble::Unplug => Trouble::Removal,
        Trouble::BrokenTx => Trouble::Broken,
        t => t,
    };
    let hup = libc::POLLHUP as u32;
    let err = libc::POLLERR as u32;
    match (t, k) {
        (Trouble::Removal, Kind::AioRead | Kind::AioWrite) => Want::Errno(libc::ESHUTDOWN),
        (Trouble::Removal, Kind::PollIn | Kind::PollOut | Kind::EpollIn | Kind::EpollOut) => {
            Want::Flag(hup)
        }
        (Trouble::Removal, Kind::Sigio) => Want::Signal(POLL_HUP, libc::POLLHUP as i64),
        (Trouble::Removal, _) => Want::Errno(libc::ENODEV),
        (
            Trouble::NeedsReset | Trouble::Broken,
            Kind::PollIn | Kind::PollOut | Kind::EpollIn | Kind::EpollOut,
        ) => Want::Flag(err),
        (Trouble::NeedsReset | Trouble::Broken, Kind::Sigio) => {
            Want::Signal(POLL_ERR, libc::POLLERR as i64)
        }
        (Trouble::NeedsReset | Trouble::Broken, _) => Want::Errno(libc::EIO),
        (Trouble::Reset, Kind::PollIn | Kind::EpollIn) => Want::Ready(libc::POLLIN as u32),
        (Trouble::Reset, Kind::PollOut | Kind::EpollOut) => Want::Ready(libc::POLLOUT as u32),
        (Trouble::Reset, Kind::Sigio) => Want::Signal(POLL_OUT, libc::POLLOUT as i64),
        (Trouble::Reset, k) if k.receives() => Want::Data,
        (Trouble::Reset, _) => Want::Bytes(PAGE as u64),
        (Trouble::Unplug | Trouble::BrokenTx, _) => unreachable!("mapped above"),
    }
}

/// Whether `end` is what `w` asks for.
pub fn meets(w: Want, end: &End) -> bool {
    let bad = (libc::POLLERR | libc::POLLHUP) as u32;
    match (w, end) {
        (Want::Errno(e), End::Errno(got)) => e == *got,
        (Want::Flag(f), End::Events(m)) => m & f != 0,
        (Want::Ready(f), End::Events(m)) => m & f != 0 && m & bad == 0,
        (Want::Bytes(n), End::Bytes(got)) => n == *got,
        (Want::Data, End::Bytes(got)) => *got > 0,
        (Want::Signal(code, bit), End::Signal { code: c, band }) => code == *c && band & bit != 0,
        _ => false,
    }
}

/// Whether waiter `k` ends only after the host's data (the receive side on
/// `reset`).
fn late(t: Trouble, k: Kind) -> bool {
    t == Trouble::Reset && k.receives()
}

// ---- the crew ----

/// What a waiter thread tells the main thread.
enum Msg {
    /// Its request is in place (with a detail) or could not be set up.
    Armed(Kind, Result<String, String>),
    /// It ended (what it used goes with it, closed by the main thread).
    Done(Kind, End, Instant, Box<dyn Send>),
}

fn armed(tx: &Sender<Msg>, k: Kind, r: Result<String, String>) {
    let _ = tx.send(Msg::Armed(k, r));
}

fn done(tx: &Sender<Msg>, k: Kind, end: End, keep: Box<dyn Send>) {
    let _ = tx.send(Msg::Done(k, end, Instant::now(), keep));
}

/// A transfer's outcome as an [`End`].
fn transfer(r: Result<usize, i32>) -> End {
    match r {
        Ok(n) => End::Bytes(n as u64),
        Err(e) => End::Errno(e),
    }
}

/// One blocking `write` of `data`, retrying `EINTR`.
fn write_fd(fd: RawFd, data: &[u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: `data` is a live buffer of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = last_errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

fn blocking(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    let mut buf = pattern(k as u64 + 1, PAGE);
    let r = if k == Kind::Write {
        write_fd(fd.as_raw_fd(), &buf)
    } else {
        read_fd(fd.as_raw_fd(), &mut buf)
    };
    done(&tx, k, transfer(r), Box::new(fd));
}

fn poller(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    let events = if k == Kind::PollIn {
        libc::POLLIN
    } else {
        libc::POLLOUT
    };
    let start = Instant::now();
    let end = loop {
        let left = THREAD_LIMIT.saturating_sub(start.elapsed());
        if left.is_zero() {
            break End::Failed(format!("no event within {THREAD_LIMIT:?}"));
        }
        match poll_one(fd.as_raw_fd(), events, left.as_millis() as i32) {
            Ok(0) => {}
            Ok(rev) => break End::Events(rev as u16 as u32),
            Err(e) => break End::Failed(e),
        }
    };
    done(&tx, k, end, Box::new(fd));
}

fn epoller(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    let dir = if k == Kind::EpollIn {
        libc::EPOLLIN
    } else {
        libc::EPOLLOUT
    };
    let ep = match crate::io_models::epoll::epoll_for(fd.as_raw_fd(), (dir | libc::EPOLLET) as u32)
    {
        Ok(ep) => ep,
        Err(e) => return done(&tx, k, End::Failed(e), Box::new(fd)),
    };
    let start = Instant::now();
    let end = loop {
        let left = THREAD_LIMIT.saturating_sub(start.elapsed());
        if left.is_zero() {
            break End::Failed(format!("no event within {THREAD_LIMIT:?}"));
        }
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event; the epoll descriptor is open.
        let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, left.as_millis() as i32) };
        match n {
            1 => break End::Events(ev.events),
            0 => {}
            _ if last_errno() == libc::EINTR => {}
            _ => break End::Failed(os_err("epoll_wait")),
        }
    };
    done(&tx, k, end, Box::new((ep, fd)));
}

/// The set holding only `SIGIO`.
fn sigio_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        set
    }
}

/// Block `SIGIO` in this thread (and in the threads it starts later), so
/// the owner takes it with `sigtimedwait` and no default action kills us.
pub fn block_sigio() -> Result<(), String> {
    let set = sigio_set();
    // SAFETY: a valid set; the old mask is not wanted.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(format!("pthread_sigmask: {}", errno_name(r)));
    }
    Ok(())
}

/// Make this thread the owner of `fd`'s `SIGIO`, with `si_code`/`si_band`.
fn own_sigio(fd: RawFd) -> Result<(), String> {
    #[repr(C)]
    struct FOwnerEx {
        kind: libc::c_int,
        pid: libc::pid_t,
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let owner = FOwnerEx {
        kind: F_OWNER_TID,
        pid: tid,
    };
    // SAFETY: F_SETOWN_EX reads one f_owner_ex; F_SETSIG takes an int.
    unsafe {
        if libc::fcntl(fd, F_SETOWN_EX, &owner as *const FOwnerEx) < 0 {
            return Err(os_err("fcntl(F_SETOWN_EX)"));
        }
        if libc::fcntl(fd, F_SETSIG, libc::SIGIO) < 0 {
            return Err(os_err("fcntl(F_SETSIG, SIGIO)"));
        }
    }
    set_fl(fd, libc::O_ASYNC, 0)
}

/// The next `SIGIO` within `timeout`: `Ok(None)` if none came.
fn take_sigio(timeout: Duration) -> Result<Option<SigPoll>, String> {
    let set = sigio_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid set, siginfo and timeout.
        let r = unsafe { libc::sigtimedwait(&set, &mut info, &ts) };
        if r >= 0 {
            // SAFETY: SigPoll is no larger than siginfo_t (asserted in io_models::sigio)
            // and both are plain data.
            return Ok(Some(unsafe {
                std::ptr::read((&info as *const libc::siginfo_t).cast::<SigPoll>())
            }));
        }
        match last_errno() {
            libc::EAGAIN => return Ok(None),
            libc::EINTR => {}
            e => return Err(format!("sigtimedwait: {}", errno_name(e))),
        }
    }
}

fn sigio(fd: OwnedFd, tx: Sender<Msg>) {
    if let Err(e) = own_sigio(fd.as_raw_fd()) {
        armed(&tx, Kind::Sigio, Err(e));
        return;
    }
    // Signals from before (none are due: nothing moves) would be no verdict.
    let mut early = 0;
    while let Ok(Some(_)) = take_sigio(Duration::ZERO) {
        early += 1;
    }
    armed(
        &tx,
        Kind::Sigio,
        Ok(format!("owner, {early} pending taken")),
    );
    let end = match take_sigio(THREAD_LIMIT) {
        Ok(Some(si)) if si.signo != libc::SIGIO || si.fd != fd.as_raw_fd() => End::Failed(format!(
            "signal {} for fd {}, not SIGIO for {}",
            si.signo,
            si.fd,
            fd.as_raw_fd()
        )),
        Ok(Some(si)) => End::Signal {
            code: si.code,
            band: si.band,
        },
        Ok(None) => End::Failed(format!("no SIGIO within {THREAD_LIMIT:?}")),
        Err(e) => End::Failed(e),
    };
    done(&tx, Kind::Sigio, end, Box::new(fd));
}

/// A native AIO result as an [`End`].
fn aio_end(res: i64) -> End {
    if res < 0 {
        End::Errno((-res) as i32)
    } else {
        End::Bytes(res as u64)
    }
}

fn native_aio(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    // Before the context, so dropped after it: io_destroy waits for a
    // request that still uses the buffer.
    let mut buf = pattern(k as u64 + 1, PAGE);
    let ctx = match Ctx::new(4) {
        Ok(c) => c,
        Err(e) => return armed(&tx, k, Err(e)),
    };
    let mut iocb = Iocb {
        aio_data: 7,
        aio_lio_opcode: if k == Kind::AioWrite {
            IOCB_CMD_PWRITE
        } else {
            IOCB_CMD_PREAD
        },
        aio_fildes: fd.as_raw_fd() as u32,
        aio_buf: buf.as_mut_ptr() as u64,
        aio_nbytes: PAGE as u64,
        ..Iocb::default()
    };
    let list = [&mut iocb as *mut Iocb];
    // SAFETY: a list of one valid iocb whose buffer lives until the
    // context is destroyed; the context is live.
    let r = unsafe { libc::syscall(libc::SYS_io_submit, ctx.0, 1 as libc::c_long, list.as_ptr()) };
    if r != 1 {
        let e = errno_name(last_errno());
        return armed(&tx, k, Err(format!("io_submit returned {r}: {e}")));
    }
    let mut ev = IoEvent::default();
    let at_once = matches!(getevents(&ctx, 0, Duration::ZERO, &mut ev), Ok(1));
    let detail = if at_once {
        "completed at once"
    } else {
        "queued"
    };
    armed(&tx, k, Ok(detail.into()));
    let start = Instant::now();
    let end = loop {
        if at_once {
            break aio_end(ev.res);
        }
        let left = THREAD_LIMIT.saturating_sub(start.elapsed());
        if left.is_zero() {
            break End::Failed(format!("no completion within {THREAD_LIMIT:?}"));
        }
        match getevents(&ctx, 1, left, &mut ev) {
            Ok(1) => break aio_end(ev.res),
            Ok(_) | Err(libc::EINTR) => {}
            Err(e) => break End::Failed(format!("io_getevents: {}", errno_name(e))),
        }
    };
    done(&tx, k, end, Box::new((ctx, buf, fd)));
}

fn uring(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    let mut ring: IoUring = match IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return armed(&tx, k, Err(format!("io_uring_setup: {e}"))),
    };
    let mut buf = pattern(k as u64 + 1, PAGE);
    let target = types::Fd(fd.as_raw_fd());
    let entry = if k == Kind::UringWrite {
        opcode::Write::new(target, buf.as_ptr(), PAGE as u32)
            .offset(u64::MAX)
            .build()
    } else {
        opcode::Read::new(target, buf.as_mut_ptr(), PAGE as u32)
            .offset(u64::MAX)
            .build()
    };
    // SAFETY: the buffer lives until the completion arrives, or for good
    // (leaked below) if none does.
    if unsafe { ring.submission().push(&entry.user_data(7)) }.is_err() {
        return armed(&tx, k, Err("submission queue full".into()));
    }
    if let Err(e) = ring.submit() {
        return armed(&tx, k, Err(format!("io_uring_enter: {e}")));
    }
    let cqe = ring.completion().next();
    let detail = if cqe.is_some() {
        "completed at once"
    } else {
        "queued"
    };
    armed(&tx, k, Ok(detail.into()));
    let start = Instant::now();
    let cqe = match cqe {
        Some(c) => Some(c),
        None => match wait_cqe(&mut ring, start, THREAD_LIMIT) {
            Ok(c) => c,
            Err(e) => {
                std::mem::forget(buf);
                let end = End::Failed(format!("io_uring_enter: {e}"));
                return done(&tx, k, end, Box::new((ring, fd)));
            }
        },
    };
    match cqe {
        Some(c) => done(
            &tx,
            k,
            aio_end(c.result().into()),
            Box::new((ring, buf, fd)),
        ),
        None => {
            // Still in flight: the kernel may yet use the buffer.
            std::mem::forget(buf);
            let end = End::Failed(format!("no completion within {THREAD_LIMIT:?}"));
            done(&tx, k, end, Box::new((ring, fd)));
        }
    }
}

/// An aiocb and its buffer, which must not move or go while in flight.
struct PosixReq {
    cb: Box<libc::aiocb>,
    buf: Vec<u8>,
}

// SAFETY: the aiocb's pointer is to `buf`'s heap buffer, which moves with
// it; glibc's helper thread uses both only while the request is in flight,
// and only the one thread that owns this value uses the request.
unsafe impl Send for PosixReq {}

fn posix_aio(k: Kind, fd: OwnedFd, tx: Sender<Msg>) {
    let mut req = PosixReq {
        // SAFETY: aiocb is plain data; all-zero is its initial state.
        cb: Box::new(unsafe { std::mem::zeroed() }),
        buf: pattern(k as u64 + 1, PAGE),
    };
    req.cb.aio_fildes = fd.as_raw_fd();
    req.cb.aio_buf = req.buf.as_mut_ptr().cast();
    req.cb.aio_nbytes = PAGE;
    req.cb.aio_sigevent.sigev_notify = libc::SIGEV_NONE;
    let cb: *mut libc::aiocb = &mut *req.cb;
    // SAFETY: `cb` and its buffer stay put until the request is over (or
    // for good: leaked below if it never ends).
    let r = unsafe {
        if k == Kind::PosixWrite {
            libc::aio_write(cb)
        } else {
            libc::aio_read(cb)
        }
    };
    if r < 0 {
        return armed(&tx, k, Err(os_err("aio_read/aio_write")));
    }
    armed(&tx, k, Ok("submitted".into()));
    let start = Instant::now();
    loop {
        // SAFETY: `cb` was submitted and is live.
        let e = unsafe { libc::aio_error(cb) };
        if e != libc::EINPROGRESS {
            // SAFETY: the request is over; aio_return is called once.
            let ret = unsafe { libc::aio_return(cb) };
            let end = if e == 0 {
                End::Bytes(ret as u64)
            } else {
                End::Errno(e)
            };
            return done(&tx, k, end, Box::new((req, fd)));
        }
        let left = THREAD_LIMIT.saturating_sub(start.elapsed());
        if left.is_zero() {
            std::mem::forget(req);
            std::mem::forget(fd);
            let end = End::Failed(format!("still in progress after {THREAD_LIMIT:?}"));
            return done(&tx, k, end, Box::new(()));
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        let list = [cb as *const libc::aiocb];
        // SAFETY: one live aiocb and a valid timeout; a timeout or EINTR
        // just loops to aio_error.
        unsafe { libc::aio_suspend(list.as_ptr(), 1, &ts) };
    }
}

/// Start waiter `k` on a descriptor of its own.
fn start(k: Kind, device: &str, tx: Sender<Msg>) -> Result<(), String> {
    let access = match k {
        Kind::Sigio => Access::ReadWrite,
        k if k.receives() => Access::Read,
        _ => Access::Write,
    };
    let fd = open_device(device, access, k == Kind::Sigio)?;
    let body: Box<dyn FnOnce() + Send> = match k {
        Kind::Read | Kind::Write => Box::new(move || blocking(k, fd, tx)),
        Kind::PollIn | Kind::PollOut => Box::new(move || poller(k, fd, tx)),
        Kind::EpollIn | Kind::EpollOut => Box::new(move || epoller(k, fd, tx)),
        Kind::Sigio => Box::new(move || sigio(fd, tx)),
        Kind::AioRead | Kind::AioWrite => Box::new(move || native_aio(k, fd, tx)),
        Kind::UringRead | Kind::UringWrite => Box::new(move || uring(k, fd, tx)),
        Kind::PosixRead | Kind::PosixWrite => Box::new(move || posix_aio(k, fd, tx)),
    };
    std::thread::Builder::new()
        .name(format!("qw-{}", k.key().replace('_', "-")))
        .spawn(body)
        .map(drop)
        .map_err(|e| format!("spawning the {} waiter: {e}", k.key()))
}

/// The kinds that report how their request was set up.
fn arms(k: Kind) -> bool {
    matches!(
        k,
        Kind::Sigio
            | Kind::AioRead
            | Kind::AioWrite
            | Kind::UringRead
            | Kind::UringWrite
            | Kind::PosixRead
            | Kind::PosixWrite
    )
}

/// What the crew reported so far.
struct Board {
    rx: Receiver<Msg>,
    armed: Vec<Option<Result<String, String>>>,
    done: Vec<Option<(End, Instant)>>,
    /// What the ended waiters used, closed at the end.
    keep: Vec<Box<dyn Send>>,
}

impl Board {
    fn new(rx: Receiver<Msg>) -> Self {
        Self {
            rx,
            armed: vec![None; CREW.len()],
            done: vec![None; CREW.len()],
            keep: Vec::new(),
        }
    }

    /// Take messages until `enough` holds or `until` passes.
    fn pump(&mut self, until: Instant, enough: impl Fn(&Board) -> bool) {
        while !enough(self) {
            let left = until.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Msg::Armed(k, r)) => self.armed[k.index()] = Some(r),
                Ok(Msg::Done(k, end, at, keep)) => {
                    self.done[k.index()] = Some((end, at));
                    self.keep.push(keep);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn ended(&self, k: Kind) -> bool {
        self.done[k.index()].is_some()
    }
}

// ---- the run ----

/// Fill the transmit side through the non-blocking `fd` until `POLLOUT`
/// stays off for [`FULL_QUIET`] with buffers in flight; how long it took.
fn fill_tx(fd: RawFd, seed: u64) -> Result<Duration, String> {
    let data = pattern(seed, 64 << 10);
    let start = Instant::now();
    loop {
        if start.elapsed() > FILL_LIMIT {
            let st = get_stats(fd)?;
            return Err(format!(
                "the transmit side did not fill within {FILL_LIMIT:?} (tx_bytes {}, \
                 tx_inflight {}): is the host draining the capture?",
                st.tx_bytes, st.tx_inflight
            ));
        }
        // SAFETY: `data` is a live buffer of `data.len()` bytes.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            continue;
        }
        match last_errno() {
            libc::EAGAIN => {}
            libc::EINTR => continue,
            e => return Err(format!("filling the tx ring: {}", errno_name(e))),
        }
        let rev = poll_one(fd, libc::POLLOUT, FULL_QUIET.as_millis() as i32)?;
        if rev & libc::POLLOUT == 0 && get_stats(fd)?.tx_inflight > 0 {
            return Ok(start.elapsed());
        }
    }
}

/// Run one of [`TROUBLES`].
pub fn run(o: &Opts) -> Result<Checked, String> {
    let t = Trouble::from_scenario(&o.scenario)
        .ok_or_else(|| format!("{} is not a trouble scenario", o.scenario))?;
    // Only ever on the qw driver's node: it answers QW_IOC_GET_STATS.
    let ctl = open_device(&o.device, Access::ReadWrite, true)?;
    let ctl_fd = ctl.as_raw_fd();
    get_stats(ctl_fd).map_err(|e| format!("{} is not a qw device: {e}", o.device))?;
    let virtio = bound_device(Path::new(SYSFS), &o.device)?;
    if t == Trouble::Unplug {
        pci_parent(Path::new(SYSFS), &virtio)?;
    }
    block_sigio()?;

    let mut c = Checked::new();
    c.report
        .text("trouble", t.key())
        .num("bound_ms", BOUND.as_millis() as u64);
    let fill = fill_tx(ctl_fd, o.seed)?;
    c.report.num("tx_fill_ms", fill.as_millis() as u64);

    let (tx, rx) = mpsc::channel();
    for k in CREW {
        start(k, &o.device, tx.clone())?;
    }
    drop(tx);
    let mut board = Board::new(rx);
    board.pump(Instant::now() + Duration::from_secs(10), |b| {
        CREW.iter()
            .filter(|k| arms(**k))
            .all(|k| b.armed[k.index()].is_some() || b.ended(*k))
    });
    check_armed(&mut c, &board);

    // Settled before the marker: the host's troubles come right after it.
    board.pump(Instant::now() + SETTLE, |_| false);
    for k in CREW {
        if let Some((end, _)) = &board.done[k.index()] {
            c.fail(format!(
                "{} ended before the trouble: {}",
                k.key(),
                end.text()
            ));
        }
    }
    let ready_at = Instant::now();
    ready(&o.scenario);
    let t0 = trigger(&mut c, t, ctl_fd, &virtio, ready_at);
    let early = |b: &Board| CREW.iter().filter(|k| !late(t, **k)).all(|k| b.ended(*k));
    board.pump(t0 + BOUND, early);
    let mut from = vec![t0; CREW.len()];
    if t == Trouble::Reset {
        // The receive side must still wait: the host's data ends it.
        ready(&format!("{}-2", o.scenario));
        let t1 = Instant::now();
        for k in CREW.iter().filter(|k| late(t, **k)) {
            from[k.index()] = t1;
        }
        board.pump(t1 + BOUND, |b| CREW.iter().all(|k| b.ended(*k)));
    }
    judge_crew(&mut c, t, &board, &from);
    if let Ok(st) = get_stats(ctl_fd) {
        c.report.raw("stats_after", &st.json());
    }
    drop(std::mem::take(&mut board.keep));
    recover(&mut c, t, o, ctl, &virtio);
    Ok(c)
}

/// Every request that reports its setup must be in place and waiting.
fn check_armed(c: &mut Checked, board: &Board) {
    let mut details = Vec::new();
    for k in CREW.iter().filter(|k| arms(**k)) {
        match &board.armed[k.index()] {
            Some(Ok(d)) => {
                if d == "completed at once" {
                    c.fail(format!("{}: {d} (nothing was there to move)", k.key()));
                }
                details.push(format!("{}: {d}", k.key()));
            }
            Some(Err(e)) => c.fail(format!("{} waiter: {e}", k.key())),
            None if board.ended(*k) => {}
            None => c.fail(format!("{} waiter did not set up within 10 s", k.key())),
        }
    }
    c.report.text("armed", &details.join("; "));
}

/// Bring the trouble about (or, for the host's, note that it came at the
/// marker); returns the time the waiters' times count from.
fn trigger(c: &mut Checked, t: Trouble, ctl: RawFd, virtio: &str, ready_at: Instant) -> Instant {
    let t0 = Instant::now();
    let r =
        match t {
            Trouble::Removal => {
                let unbind = Path::new(SYSFS)
                    .join("bus/virtio/drivers")
                    .join(DRIVER)
                    .join("unbind");
                write_sysfs(&unbind, virtio)
            }
            Trouble::Reset => ioctl_plain(ctl, QW_IOC_RESET)
                .map_err(|e| format!("QW_IOC_RESET: {}", errno_name(e))),
            Trouble::Unplug => pci_parent(Path::new(SYSFS), virtio)
                .and_then(|p| write_sysfs(&p.join("remove"), "1")),
            Trouble::NeedsReset | Trouble::Broken | Trouble::BrokenTx => return ready_at,
        };
    c.report.num("trigger_ms", t0.elapsed().as_millis() as u64);
    if let Err(e) = r {
        c.fail(format!("the trouble: {e}"));
    }
    t0
}

/// Each waiter's end and time: it must have ended, within [`BOUND`], with
/// what [`want`] says.
fn judge_crew(c: &mut Checked, t: Trouble, board: &Board, from: &[Instant]) {
    for k in CREW {
        let i = k.index();
        let Some((end, at)) = &board.done[i] else {
            c.report.text(k.key(), "still waiting");
            c.fail(format!(
                "{} still waiting {BOUND:?} after the trouble",
                k.key()
            ));
            continue;
        };
        let ms = at.saturating_duration_since(from[i]).as_millis() as u64;
        c.report
            .text(k.key(), &end.text())
            .num(&format!("{}_ms", k.key()), ms);
        let w = want(t, k);
        c.check(meets(w, end), || {
            format!("{}: {}, documented: {w:?}", k.key(), end.text())
        });
        c.check(ms <= BOUND.as_millis() as u64, || {
            format!("{}: ended after {ms} ms, bound {BOUND:?}", k.key())
        });
    }
}

/// The way back, and the device in state 0 afterwards: `recover`.
fn recover(c: &mut Checked, t: Trouble, o: &Opts, ctl: OwnedFd, virtio: &str) {
    let r = match t {
        Trouble::Removal => {
            drop(ctl);
            rebind(&o.device, virtio)
        }
        Trouble::Unplug => {
            drop(ctl);
            rescan(&o.device)
        }
        Trouble::NeedsReset | Trouble::Broken | Trouble::BrokenTx => {
            ioctl_plain(ctl.as_raw_fd(), QW_IOC_RESET)
                .map_err(|e| format!("QW_IOC_RESET: {}", errno_name(e)))
                .and_then(|()| state_zero(ctl.as_raw_fd()))
        }
        Trouble::Reset => ioctl_plain(ctl.as_raw_fd(), QW_IOC_FLUSH)
            .map_err(|e| format!("QW_IOC_FLUSH: {}", errno_name(e)))
            .and_then(|()| state_zero(ctl.as_raw_fd())),
    };
    c.report.text(
        "recover",
        match &r {
            Ok(()) => "ok",
            Err(e) => e,
        },
    );
    if let Err(e) = r {
        c.fail(format!("the way back: {e}"));
    }
}

fn state_zero(fd: RawFd) -> Result<(), String> {
    let st = get_stats(fd)?;
    if st.state != 0 {
        return Err(format!("state {:#x}, not 0", st.state));
    }
    Ok(())
}

/// Bind the driver to `virtio` again; the node must come back working.
fn rebind(device: &str, virtio: &str) -> Result<(), String> {
    let bind = Path::new(SYSFS)
        .join("bus/virtio/drivers")
        .join(DRIVER)
        .join("bind");
    write_sysfs(&bind, virtio)?;
    back(device)
}

/// Find the unplugged function again (QEMU still has it).
fn rescan(device: &str) -> Result<(), String> {
    write_sysfs(&Path::new(SYSFS).join("bus/pci/rescan"), "1")?;
    back(device)
}

/// The node must come back, open and be in state 0.
fn back(device: &str) -> Result<(), String> {
    wait_for_chardev(device, BOUND)?;
    // udev-less /dev: the node may appear a moment before it opens.
    let start = Instant::now();
    let fd = loop {
        match open_device(device, Access::ReadWrite, true) {
            Ok(fd) => break fd,
            Err(e) if start.elapsed() > BOUND => return Err(e),
            Err(_) => nap(Duration::from_millis(50)),
        }
    };
    state_zero(fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_trouble_has_a_documented_end_for_every_waiter() {
        for name in TROUBLES {
            let t = Trouble::from_scenario(name).unwrap();
            for k in CREW {
                // Nothing a waiter can get is accepted by a Want that does
                // not ask for it.
                assert!(!meets(want(t, k), &End::Failed("x".into())));
            }
        }
        assert_eq!(Trouble::from_scenario("trouble-nope"), None);
    }

    #[test]
    fn removal_wants_enodev_eshutdown_hup() {
        let t = Trouble::Removal;
        assert!(meets(want(t, Kind::Read), &End::Errno(libc::ENODEV)));
        assert!(!meets(want(t, Kind::Read), &End::Errno(libc::EIO)));
        assert!(meets(want(t, Kind::AioWrite), &End::Errno(libc::ESHUTDOWN)));
        let hup_in = (libc::POLLHUP | libc::POLLIN) as u32;
        assert!(meets(want(t, Kind::PollOut), &End::Events(hup_in)));
        assert!(!meets(
            want(t, Kind::PollOut),
            &End::Events(libc::POLLOUT as u32)
        ));
        let sig = End::Signal {
            code: POLL_HUP,
            band: (libc::POLLHUP | libc::POLLERR) as i64,
        };
        assert!(meets(want(t, Kind::Sigio), &sig));
        let wrong = End::Signal {
            code: POLL_OUT,
            band: libc::POLLOUT as i64,
        };
        assert!(!meets(want(t, Kind::Sigio), &wrong));
    }

    #[test]
    fn reset_wants_progress_not_errors() {
        let t = Trouble::Reset;
        assert!(meets(want(t, Kind::Write), &End::Bytes(PAGE as u64)));
        assert!(!meets(want(t, Kind::Write), &End::Bytes(1)));
        assert!(meets(want(t, Kind::UringRead), &End::Bytes(5)));
        assert!(!meets(want(t, Kind::UringRead), &End::Bytes(0)));
        let err_out = (libc::POLLERR | libc::POLLOUT) as u32;
        assert!(!meets(want(t, Kind::EpollOut), &End::Events(err_out)));
        assert!(late(t, Kind::PollIn) && !late(t, Kind::PollOut));
        assert!(!late(Trouble::Broken, Kind::Read));
    }

    #[test]
    fn ends_read_as_names() {
        assert_eq!(End::Errno(libc::EIO).text(), "EIO");
        let s = End::Signal {
            code: POLL_ERR,
            band: libc::POLLERR as i64,
        };
        assert_eq!(s.text(), "POLL_ERR band 0x8 (ERR)");
        assert_eq!(poll_code_name(0), "si_code 0");
    }
}
