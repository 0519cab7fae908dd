//! `teardown-unbind` and `teardown-remove`: the device goes away while a
//! waiter sits in every kernel wait path of the driver, and every waiter
//! must come back with an error; then the device comes back and the module
//! unloads cleanly.
//!
//! 1. Find the virtio device bound to `vdevlab_qw`
//!    (`/sys/bus/virtio/drivers/vdevlab_qw/virtioN`; the one whose class
//!    device is the `--device` node if there are several) and its PCI
//!    function (the parent of the canonical `/sys/bus/virtio/devices/virtioN`).
//! 2. Open the device once per waiter, each waiter on its own descriptor,
//!    in its own thread:
//!    - `read`: a blocking `read()` of 4096 bytes (no data comes);
//!    - `write`: one blocking `write()` of 8 MiB: the device's capture
//!      holds 1 MiB and nobody drains it, so once the tx ring is full too
//!      the writer sleeps; the program waits for that (no `POLLOUT`);
//!    - `epoll`: `EPOLLIN|EPOLLOUT|EPOLLET`, the first edges drained with
//!      zero-timeout waits, then `epoll_wait` until an edge with HUP or
//!      ERR (a transmit completion's EPOLLOUT edge before the removal, as
//!      on several CPUs, is noted in the verdict, not judged);
//!    - `linux_aio`: `io_submit` of a read (queued: no data), reaped with
//!      `io_getevents`;
//!    - `io_uring`: a `READ` SQE (parked on the driver's poll), waited for
//!      with `io_uring_enter`;
//!    - `posix_aio`: `aio_read`, waited for with `aio_suspend` (glibc's
//!      helper thread sleeps in `read()`).
//! 3. `VDEVLAB-READY teardown-<how>` once every waiter is in place (the
//!    host has nothing to do, and must not drain the capture); 300 ms
//!    later `VDEVLAB-TEARDOWN unbind|remove`, then the trigger:
//!    the device name to `.../drivers/vdevlab_qw/unbind`, or `1` to
//!    `<pci function>/remove`.
//! 4. Every waiter must finish within 10 s, with an error: `read` ENODEV,
//!    ESHUTDOWN or EIO; `write` a short count or one of those; `epoll`
//!    EPOLLHUP or EPOLLERR; `linux_aio` res -ESHUTDOWN or -ENODEV;
//!    `io_uring` a negative res; `posix_aio` an error. A still-open file
//!    must see the removal too (`QW_IOC_GET_STATS` state REMOVED, `POLLHUP`,
//!    `read` ENODEV) and the node must be gone.
//! 5. Close everything. `unbind`: write the name to `.../bind`; `remove`:
//!    `1` to `/sys/bus/pci/rescan` (QEMU still has the device). `/dev/qw0`
//!    must come back within 10 s and a non-blocking read get `EAGAIN`.
//! 6. `delete_module("vdevlab_qw", O_NONBLOCK)` must succeed (retried for
//!    up to 5 s while it says `EWOULDBLOCK`, as io_uring puts its file
//!    references from a work item), which shows that no file, request or
//!    device reference leaked. Then the module is loaded again from
//!    `/lib/modules/vdevlab_qw.ko` with the same `virtio_id`, so later runs
//!    of the same boot find `/dev/qw0` as before.
//!
//! Fields: `device`, `pci`, `how`; per waiter its outcome (`read`,
//! `write`, `epoll`, `linux_aio`, `io_uring`, `posix_aio`) and the
//! milliseconds from the trigger to its end (`read_ms`, ...);
//! `tx_ring_full_ms`, `epoll_drained`, `wchans` (where each thread slept
//! just before the trigger), `stats_before` (`QW_IOC_GET_STATS`),
//! `trigger_ms`, `stats_after`, `poll_after`, `read_after`,
//! `open_after`, `back_ms`, `device_back`, `read_back`, `refcnt`,
//! `unload`, `reload`.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::common::{
    errno_name, last_errno, mask_name, poll_one, read_fd, wait_for_chardev, write_sysfs,
};
use crate::common::{nap, open_device, os_err, wait_cqe, Access};
use crate::scenarios::Checked;
use crate::uapi::aio_abi::{getevents, Ctx, IoEvent, Iocb, IOCB_CMD_PREAD};
use crate::uapi::qw::{get_stats, DRIVER, QW_STATE_REMOVED};
use crate::{marker, pattern, ready, Opts};

/// How the device goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// The driver is unbound from the virtio device.
    Unbind,
    /// The PCI function is removed (and later found again by a rescan).
    Remove,
}

impl How {
    /// As in the scenario name and the `VDEVLAB-TEARDOWN` line.
    pub fn name(self) -> &'static str {
        match self {
            How::Unbind => "unbind",
            How::Remove => "remove",
        }
    }
}

const SYSFS: &str = "/sys";
/// Where the lab's init loads the module from.
const MODULE_PATH: &str = "/lib/modules/vdevlab_qw.ko";
/// The blocked writer's request: far more than capture (1 MiB) plus ring.
const WRITE_BYTES: usize = 8 << 20;
/// Each reading waiter asks for this much.
const READ_BYTES: usize = 4096;
/// Time for every waiter to reach its sleep before the trigger.
const SETTLE: Duration = Duration::from_millis(300);
/// Every waiter must be back this soon after the trigger.
const WAKE_LIMIT: Duration = Duration::from_secs(10);
/// The tx ring must be full this soon (else the writer is not blocked).
const FILL_LIMIT: Duration = Duration::from_secs(15);
/// The node must come back this soon after bind/rescan or module load.
const BACK_LIMIT: Duration = Duration::from_secs(10);
/// Waits inside the threads that can time out end after this in any case
/// (the verdict uses [`WAKE_LIMIT`]; this only keeps threads from staying).
const THREAD_LIMIT: Duration = Duration::from_secs(60);
/// How long `delete_module` is retried while it says the module is in use.
const UNLOAD_LIMIT: Duration = Duration::from_secs(5);

/// The six waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiter {
    Read,
    Write,
    Epoll,
    LinuxAio,
    IoUring,
    PosixAio,
}

const WAITERS: [Waiter; 6] = [
    Waiter::Read,
    Waiter::Write,
    Waiter::Epoll,
    Waiter::LinuxAio,
    Waiter::IoUring,
    Waiter::PosixAio,
];

impl Waiter {
    fn key(self) -> &'static str {
        match self {
            Waiter::Read => "read",
            Waiter::Write => "write",
            Waiter::Epoll => "epoll",
            Waiter::LinuxAio => "linux_aio",
            Waiter::IoUring => "io_uring",
            Waiter::PosixAio => "posix_aio",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A finished waiter: when, what it got, whether that is what removal must
/// give, and what it used (closed by the main thread once all are back).
struct Done {
    waiter: Waiter,
    at: Instant,
    outcome: String,
    good: bool,
    keep: Box<dyn Send>,
}

/// What a waiter thread tells the main thread.
enum Msg {
    /// Its request is in place (`Ok`, with a detail) or could not be set
    /// up (`Err`). Only the waiters whose setup can fail or be observed.
    Armed(Waiter, Result<String, String>),
    /// It finished.
    Done(Done),
}

// ---- sysfs ----

/// Whether `s` looks like a PCI function address, `dddd:bb:dd.f`.
pub fn is_pci_address(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let (Some(dom), Some(bus), Some(devfn), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    hex(dom, 4)
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && func.as_bytes()[0].is_ascii_digit()
}

/// The virtio device bound to the driver: the `virtioN` entries of
/// `<sysfs>/bus/virtio/drivers/vdevlab_qw/`; with several, the one whose
/// class device is the node `device` names (`virtioN/vdevlab_qw/qwM`),
/// else the first.
pub fn bound_device(sysfs: &Path, device: &str) -> Result<String, String> {
    let dir = sysfs.join("bus/virtio/drivers").join(DRIVER);
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut names: Vec<(u64, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| {
            let idx = n.strip_prefix("virtio")?.parse::<u64>().ok()?;
            Some((idx, n))
        })
        .collect();
    names.sort();
    let node = Path::new(device)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((_, n)) = names
        .iter()
        .find(|(_, n)| dir.join(n).join(DRIVER).join(&node).exists())
    {
        return Ok(n.clone());
    }
    names
        .into_iter()
        .next()
        .map(|(_, n)| n)
        .ok_or_else(|| format!("no virtio device bound to {DRIVER} in {}", dir.display()))
}

/// The PCI function a virtio device sits on: the parent of its canonical
/// sysfs directory, which must be named like a PCI address and have a
/// `remove` file.
pub fn pci_parent(sysfs: &Path, name: &str) -> Result<PathBuf, String> {
    let link = sysfs.join("bus/virtio/devices").join(name);
    let real = std::fs::canonicalize(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    let parent = real
        .parent()
        .ok_or_else(|| format!("{} has no parent", real.display()))?;
    let base = parent
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !is_pci_address(&base) {
        return Err(format!(
            "{name} is not on a PCI function (its parent is {})",
            parent.display()
        ));
    }
    if !parent.join("remove").exists() {
        return Err(format!("{} has no remove file", parent.display()));
    }
    Ok(parent.to_path_buf())
}

// ---- verdicts, one per waiter ----

/// The errors that a removal gives a reader.
fn removal_errno(e: i32) -> bool {
    matches!(e, libc::ENODEV | libc::ESHUTDOWN | libc::EIO)
}

/// A blocking read interrupted by the removal must fail with ENODEV,
/// ESHUTDOWN or EIO.
pub fn judge_read(r: Result<usize, i32>) -> (String, bool) {
    match r {
        Ok(n) => (format!("returned {n}"), false),
        Err(e) => (errno_name(e), removal_errno(e)),
    }
}

/// A blocking write of `asked` bytes interrupted by the removal returns
/// the bytes queued so far (a short count) or fails like a read.
pub fn judge_write(r: Result<usize, i32>, asked: usize) -> (String, bool) {
    match r {
        Ok(n) if n < asked => (format!("short {n}"), true),
        Ok(n) => (format!("complete {n}"), false),
        Err(e) => (errno_name(e), removal_errno(e)),
    }
}

/// The event of an edge-triggered epoll waiter must carry EPOLLHUP or
/// EPOLLERR.
pub fn judge_epoll(mask: u32) -> (String, bool) {
    (mask_name(mask), removal_edge(mask))
}

/// Whether an epoll event says the device went away (EPOLLHUP or EPOLLERR).
fn removal_edge(mask: u32) -> bool {
    mask & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
}

/// A queued native AIO read completes with -ESHUTDOWN (or -ENODEV).
pub fn judge_linux_aio(res: i64) -> (String, bool) {
    if res < 0 {
        let e = (-res) as i32;
        (
            format!("res -{}", errno_name(e)),
            e == libc::ESHUTDOWN || e == libc::ENODEV,
        )
    } else {
        (format!("res {res}"), false)
    }
}

/// An io_uring read completes with a negative result.
pub fn judge_uring(res: i32) -> (String, bool) {
    if res < 0 {
        (format!("res -{}", errno_name(-res)), true)
    } else {
        (format!("res {res}"), false)
    }
}

/// A POSIX AIO read ends with an error (`aio_error` not 0).
pub fn judge_posix_aio(err: i32, ret: isize) -> (String, bool) {
    if err == 0 {
        (format!("returned {ret}"), false)
    } else {
        (errno_name(err), err != libc::EINPROGRESS)
    }
}

// ---- the waiters ----

fn spawn(waiter: Waiter, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name(format!("qw-{}", waiter.key().replace('_', "-")))
        .spawn(f)
        .map_err(|e| format!("spawning the {} waiter: {e}", waiter.key()))
}

fn done(tx: &Sender<Msg>, waiter: Waiter, verdict: (String, bool), keep: Box<dyn Send>) {
    let (outcome, good) = verdict;
    let _ = tx.send(Msg::Done(Done {
        waiter,
        at: Instant::now(),
        outcome,
        good,
        keep,
    }));
}

fn reader(fd: OwnedFd, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    spawn(Waiter::Read, move || {
        let mut buf = vec![0u8; READ_BYTES];
        let r = read_fd(fd.as_raw_fd(), &mut buf);
        done(&tx, Waiter::Read, judge_read(r), Box::new(fd));
    })
}

fn writer(fd: OwnedFd, seed: u64, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    let data = pattern(seed, WRITE_BYTES);
    spawn(Waiter::Write, move || {
        let r = loop {
            // SAFETY: `data` is a live buffer of `data.len()` bytes.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                break Ok(n as usize);
            }
            let e = last_errno();
            if e != libc::EINTR {
                break Err(e);
            }
        };
        done(
            &tx,
            Waiter::Write,
            judge_write(r, WRITE_BYTES),
            Box::new(fd),
        );
    })
}

fn epoller(fd: OwnedFd, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    spawn(Waiter::Epoll, move || {
        let events = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32;
        let ep = match crate::io_models::epoll::epoll_for(fd.as_raw_fd(), events) {
            Ok(ep) => ep,
            Err(e) => {
                let _ = tx.send(Msg::Armed(Waiter::Epoll, Err(e)));
                return;
            }
        };
        // The edges already pending (EPOLLOUT if the ring has room): take
        // them, so that the next wait reports only what happens next.
        let mut drained = Vec::new();
        for _ in 0..100 {
            let mut ev = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: room for 4 events; a zero timeout does not wait.
            let n = unsafe { libc::epoll_wait(ep.as_raw_fd(), ev.as_mut_ptr(), 4, 0) };
            if n <= 0 {
                break;
            }
            drained.extend(ev[..n as usize].iter().map(|e| mask_name(e.events)));
        }
        let _ = tx.send(Msg::Armed(
            Waiter::Epoll,
            Ok(format!(
                "drained {} [{}]",
                drained.len(),
                drained.join(", ")
            )),
        ));
        let start = Instant::now();
        // Edges that come before the removal's: on several CPUs the device
        // may still complete a transmit buffer after the drain above
        // (EPOLLOUT) while the removal has not begun. They are no verdict;
        // the removal's own edge must still come, with HUP or ERR.
        let mut early = Vec::new();
        let verdict = loop {
            let left = THREAD_LIMIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                break (format!("no event within {THREAD_LIMIT:?}"), false);
            }
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: room for one event.
            let n =
                unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, left.as_millis() as i32) };
            match n {
                1 if !removal_edge(ev.events) && early.len() < 100 => {
                    early.push(mask_name(ev.events));
                }
                1 => break judge_epoll(ev.events),
                0 => {}
                _ if last_errno() == libc::EINTR => {}
                _ => break (os_err("epoll_wait"), false),
            }
        };
        let verdict = match early.is_empty() {
            true => verdict,
            false => (
                format!("{} (after earlier edges [{}])", verdict.0, early.join(", ")),
                verdict.1,
            ),
        };
        done(&tx, Waiter::Epoll, verdict, Box::new((ep, fd)));
    })
}

fn linux_aio(fd: OwnedFd, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    spawn(Waiter::LinuxAio, move || {
        // Declared before the context, so dropped after it: io_destroy
        // waits for a request that still uses the buffer.
        let mut buf = vec![0u8; READ_BYTES];
        let ctx = match Ctx::new(4) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Msg::Armed(Waiter::LinuxAio, Err(e)));
                return;
            }
        };
        let mut iocb = Iocb {
            aio_data: 7,
            aio_lio_opcode: IOCB_CMD_PREAD,
            aio_fildes: fd.as_raw_fd() as u32,
            aio_buf: buf.as_mut_ptr() as u64,
            aio_nbytes: READ_BYTES as u64,
            ..Iocb::default()
        };
        let list = [&mut iocb as *mut Iocb];
        // SAFETY: a list of one valid iocb whose buffer lives until the
        // context is destroyed; the context is live.
        let r =
            unsafe { libc::syscall(libc::SYS_io_submit, ctx.0, 1 as libc::c_long, list.as_ptr()) };
        if r != 1 {
            let _ = tx.send(Msg::Armed(
                Waiter::LinuxAio,
                Err(format!(
                    "io_submit returned {r}: {}",
                    errno_name(last_errno())
                )),
            ));
            return;
        }
        let mut ev = IoEvent::default();
        let at_once = matches!(getevents(&ctx, 0, Duration::ZERO, &mut ev), Ok(1));
        let _ = tx.send(Msg::Armed(
            Waiter::LinuxAio,
            Ok(if at_once {
                "completed at once"
            } else {
                "queued"
            }
            .into()),
        ));
        let start = Instant::now();
        let verdict = loop {
            if at_once {
                break judge_linux_aio(ev.res);
            }
            let left = THREAD_LIMIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                break (format!("no completion within {THREAD_LIMIT:?}"), false);
            }
            match getevents(&ctx, 1, left, &mut ev) {
                Ok(1) => break judge_linux_aio(ev.res),
                Ok(_) | Err(libc::EINTR) => {}
                Err(e) => break (format!("io_getevents: {}", errno_name(e)), false),
            }
        };
        done(&tx, Waiter::LinuxAio, verdict, Box::new((ctx, buf, fd)));
    })
}

fn uring(fd: OwnedFd, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    spawn(Waiter::IoUring, move || {
        let mut ring: IoUring = match IoUring::new(4) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Msg::Armed(
                    Waiter::IoUring,
                    Err(format!("io_uring_setup: {e}")),
                ));
                return;
            }
        };
        let mut buf = vec![0u8; READ_BYTES];
        let entry = opcode::Read::new(
            types::Fd(fd.as_raw_fd()),
            buf.as_mut_ptr(),
            READ_BYTES as u32,
        )
        .offset(u64::MAX)
        .build()
        .user_data(7);
        // SAFETY: the buffer lives until the completion arrives, or for
        // good (leaked below) if none does.
        if unsafe { ring.submission().push(&entry) }.is_err() {
            let _ = tx.send(Msg::Armed(
                Waiter::IoUring,
                Err("submission queue full".into()),
            ));
            return;
        }
        if let Err(e) = ring.submit() {
            let _ = tx.send(Msg::Armed(
                Waiter::IoUring,
                Err(format!("io_uring_enter: {e}")),
            ));
            return;
        }
        let first = ring.completion().next();
        let _ = tx.send(Msg::Armed(
            Waiter::IoUring,
            Ok(if first.is_some() {
                "completed at once"
            } else {
                "queued"
            }
            .into()),
        ));
        let start = Instant::now();
        let cqe = match first {
            Some(c) => Some(c),
            None => match wait_cqe(&mut ring, start, THREAD_LIMIT) {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("io_uring_enter: {e}");
                    std::mem::forget(buf);
                    done(&tx, Waiter::IoUring, (msg, false), Box::new((ring, fd)));
                    return;
                }
            },
        };
        match cqe {
            Some(c) => done(
                &tx,
                Waiter::IoUring,
                judge_uring(c.result()),
                Box::new((ring, buf, fd)),
            ),
            None => {
                // Still in flight: the kernel may yet write to the buffer.
                std::mem::forget(buf);
                let msg = format!("no completion within {THREAD_LIMIT:?}");
                done(&tx, Waiter::IoUring, (msg, false), Box::new((ring, fd)));
            }
        }
    })
}

/// An aiocb and its buffer, which must not move or go while the request
/// is in flight.
struct PosixReq {
    cb: Box<libc::aiocb>,
    buf: Vec<u8>,
}

// SAFETY: the raw pointer inside the aiocb points to `buf`, which moves
// with it (a Vec's heap buffer does not move); glibc's helper thread uses
// both only while the request is in flight, and the request is only ever
// used by the one thread that owns this value.
unsafe impl Send for PosixReq {}

fn posix_aio(fd: OwnedFd, tx: Sender<Msg>) -> Result<JoinHandle<()>, String> {
    spawn(Waiter::PosixAio, move || {
        let mut req = PosixReq {
            // SAFETY: aiocb is plain data; all-zero is its initial state.
            cb: Box::new(unsafe { std::mem::zeroed() }),
            buf: vec![0u8; READ_BYTES],
        };
        req.cb.aio_fildes = fd.as_raw_fd();
        req.cb.aio_buf = req.buf.as_mut_ptr().cast();
        req.cb.aio_nbytes = READ_BYTES;
        req.cb.aio_sigevent.sigev_notify = libc::SIGEV_NONE;
        let cb: *mut libc::aiocb = &mut *req.cb;
        // SAFETY: `cb` and its buffer stay where they are until the request
        // is over (or for good: leaked below if it never ends).
        if unsafe { libc::aio_read(cb) } < 0 {
            let _ = tx.send(Msg::Armed(Waiter::PosixAio, Err(os_err("aio_read"))));
            return;
        }
        let _ = tx.send(Msg::Armed(Waiter::PosixAio, Ok("submitted".into())));
        let start = Instant::now();
        loop {
            // SAFETY: `cb` was submitted and is live.
            let e = unsafe { libc::aio_error(cb) };
            if e != libc::EINPROGRESS {
                // SAFETY: the request is over; aio_return is called once.
                let ret = unsafe { libc::aio_return(cb) };
                done(
                    &tx,
                    Waiter::PosixAio,
                    judge_posix_aio(e, ret),
                    Box::new((req, fd)),
                );
                return;
            }
            let left = THREAD_LIMIT.saturating_sub(start.elapsed());
            if left.is_zero() {
                std::mem::forget(req);
                std::mem::forget(fd);
                let msg = format!("still in progress after {THREAD_LIMIT:?}");
                done(&tx, Waiter::PosixAio, (msg, false), Box::new(()));
                return;
            }
            let ts = libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            };
            let list = [cb as *const libc::aiocb];
            // SAFETY: a list of one live aiocb and a valid timeout; errors
            // (EAGAIN on timeout, EINTR) just loop to aio_error.
            unsafe { libc::aio_suspend(list.as_ptr(), 1, &ts) };
        }
    })
}

// ---- the run ----

/// Where each thread of this process sleeps (`comm:wchan`).
fn thread_wchans() -> String {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return String::new();
    };
    let mut out = Vec::new();
    for e in dir.filter_map(|e| e.ok()) {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let wchan = std::fs::read_to_string(p.join("wchan")).unwrap_or_default();
        out.push(format!("{}:{}", comm.trim(), wchan.trim()));
    }
    out.sort();
    out.join(" ")
}

/// The driver's `virtio_id` parameter, for loading it again the same way.
fn module_virtio_id(sysfs: &Path) -> Option<String> {
    let p = sysfs
        .join("module")
        .join(DRIVER)
        .join("parameters/virtio_id");
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `delete_module(DRIVER, O_NONBLOCK)`, retried while the module is in
/// use: the attempts it took, or the last errno.
fn unload() -> Result<u32, (u32, i32)> {
    let name = CString::new(DRIVER).expect("no NUL in the name");
    let start = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        // SAFETY: `name` is a NUL-terminated string; O_NONBLOCK: never wait.
        let r = unsafe { libc::syscall(libc::SYS_delete_module, name.as_ptr(), libc::O_NONBLOCK) };
        if r == 0 {
            return Ok(attempts);
        }
        let e = last_errno();
        if e != libc::EWOULDBLOCK || start.elapsed() > UNLOAD_LIMIT {
            return Err((attempts, e));
        }
        nap(Duration::from_millis(100));
    }
}

/// `finit_module` of the module file with `params`.
fn load(path: &str, params: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let params = CString::new(params).map_err(|e| e.to_string())?;
    // SAFETY: an open module file, a NUL-terminated parameter string, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r != 0 {
        return Err(os_err(&format!("finit_module {path}")));
    }
    Ok(())
}

/// The waiters' messages so far.
#[derive(Default)]
struct Board {
    armed: [Option<Result<String, String>>; 6],
    done: [Option<Done>; 6],
}

impl Board {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Armed(w, r) => self.armed[w.index()] = Some(r),
            Msg::Done(d) => {
                let i = d.waiter.index();
                self.done[i] = Some(d);
            }
        }
    }

    /// Take messages until `enough` holds or `until` passes.
    fn pump(&mut self, rx: &Receiver<Msg>, until: Instant, enough: impl Fn(&Board) -> bool) {
        while !enough(self) {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(m) => self.take(m),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    fn settled(&self, w: Waiter) -> bool {
        self.armed[w.index()].is_some() || self.done[w.index()].is_some()
    }
}

/// Wait until the tx ring is full (no `POLLOUT` on `fd`, buffers in
/// flight): the writer is then asleep. Returns how long that took.
fn wait_ring_full(fd: i32, limit: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let rev = poll_one(fd, libc::POLLOUT, 0)?;
        let st = get_stats(fd)?;
        if rev & libc::POLLOUT == 0 && st.tx_inflight > 0 {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "the tx ring did not fill within {limit:?} (tx_bytes {}, tx_inflight {}, revents {:#x}): \
                 is the host draining the capture?",
                st.tx_bytes, st.tx_inflight, rev
            ));
        }
        nap(Duration::from_millis(10));
    }
}

/// Run `teardown-unbind` or `teardown-remove`: find the device, put a
/// waiter in every wait path, trigger, judge how each waiter came back
/// and what an open file sees, bring the device back, and unload and
/// load the module.
pub fn run(o: &Opts, how: How) -> Result<Checked, String> {
    let sysfs = Path::new(SYSFS);
    // Only ever on the qw driver's node.
    let ctl = open_device(&o.device, Access::ReadWrite, true)?;
    let target = find_target(sysfs, o, how, ctl.as_raw_fd())?;
    let fds = open_waiter_files(o)?;

    let mut c = Checked::new();
    c.report
        .text("device", &target.name)
        .text("pci", &target.pci_text())
        .text("how", how.name());
    let mut waiters = start_waiters(&mut c, o, ctl.as_raw_fd(), fds)?;
    settle(&mut c, o, ctl.as_raw_fd(), &mut waiters);

    let t0 = trigger(&mut c, sysfs, how, &target);
    // Every waiter back within WAKE_LIMIT, each with an error.
    waiters.pump(t0 + WAKE_LIMIT, |b| b.done.iter().all(Option::is_some));
    let stuck = report_waiters(&mut c, &waiters.board, t0);
    check_removed(&mut c, o, ctl.as_raw_fd());

    // Close everything (what a stuck waiter uses stays with it).
    drop(ctl);
    waiters.close(&stuck);

    bring_back(&mut c, sysfs, o, how, &target.name);
    unload_and_reload(&mut c, sysfs, o, target.virtio_id.as_deref(), &stuck);
    Ok(c)
}

/// The device a teardown removes.
#[derive(Debug)]
struct Target {
    /// The virtio device bound to the driver (`virtioN`).
    name: String,
    /// Its PCI function, or why it has none (only `remove` needs one).
    pci: Result<PathBuf, String>,
    /// The driver's `virtio_id` parameter, to load it again the same way.
    virtio_id: Option<String>,
}

impl Target {
    /// The `pci` field: the function's path, or why there is none.
    fn pci_text(&self) -> String {
        self.pci
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| e.clone())
    }
}

/// What `how` tears down, if `ctl` is a qw device (it answers
/// `QW_IOC_GET_STATS`; nothing is touched otherwise).
fn find_target(sysfs: &Path, o: &Opts, how: How, ctl: RawFd) -> Result<Target, String> {
    get_stats(ctl).map_err(|e| {
        format!(
            "{} is not a qw device ({e}): not tearing anything down",
            o.device
        )
    })?;
    let name = bound_device(sysfs, &o.device)?;
    let pci = pci_parent(sysfs, &name);
    if how == How::Remove {
        pci.as_ref().map_err(Clone::clone)?;
    }
    Ok(Target {
        name,
        pci,
        virtio_id: module_virtio_id(sysfs),
    })
}

/// One file per waiter, in [`WAITERS`] order; the epoll waiter's is
/// read-write and non-blocking.
fn open_waiter_files(o: &Opts) -> Result<[OwnedFd; 6], String> {
    let open = |access| open_device(&o.device, access, false);
    Ok([
        open(Access::Read)?,
        open(Access::Write)?,
        open_device(&o.device, Access::ReadWrite, true)?,
        open(Access::Read)?,
        open(Access::Read)?,
        open(Access::Read)?,
    ])
}

/// The waiter threads and what they reported so far.
struct Waiters {
    rx: Receiver<Msg>,
    board: Board,
    handles: Vec<(Waiter, JoinHandle<()>)>,
}

impl Waiters {
    /// Take messages until `enough` holds or `until` passes.
    fn pump(&mut self, until: Instant, enough: impl Fn(&Board) -> bool) {
        self.board.pump(&self.rx, until, enough);
    }

    /// Close what the finished waiters used and join their threads; a
    /// stuck waiter keeps its file and its thread.
    fn close(mut self, stuck: &[Waiter]) {
        for d in self.board.done.iter_mut().filter_map(Option::take) {
            drop(d.keep);
        }
        for (w, h) in self.handles {
            if !stuck.contains(&w) {
                let _ = h.join();
            }
        }
    }
}

/// The waiters whose setup can fail or be observed: they send
/// [`Msg::Armed`].
const ARMABLE: [Waiter; 4] = [
    Waiter::Epoll,
    Waiter::LinuxAio,
    Waiter::IoUring,
    Waiter::PosixAio,
];

/// Start the six waiters on `fds`: the reader and the writer, then (once
/// the writer sleeps on a full tx ring, seen through `ctl`) the others,
/// and wait up to 10 s for each of those to set up its request.
fn start_waiters(
    c: &mut Checked,
    o: &Opts,
    ctl: RawFd,
    fds: [OwnedFd; 6],
) -> Result<Waiters, String> {
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    let [f_read, f_write, f_epoll, f_aio, f_uring, f_posix] = fds;
    handles.push((Waiter::Read, reader(f_read, tx.clone())?));
    handles.push((Waiter::Write, writer(f_write, o.seed, tx.clone())?));
    match wait_ring_full(ctl, FILL_LIMIT) {
        Ok(d) => {
            c.report.num("tx_ring_full_ms", d.as_millis() as u64);
        }
        Err(e) => c.fail(e),
    }
    handles.push((Waiter::Epoll, epoller(f_epoll, tx.clone())?));
    handles.push((Waiter::LinuxAio, linux_aio(f_aio, tx.clone())?));
    handles.push((Waiter::IoUring, uring(f_uring, tx.clone())?));
    handles.push((Waiter::PosixAio, posix_aio(f_posix, tx.clone())?));
    drop(tx);

    let mut waiters = Waiters {
        rx,
        board: Board::default(),
        handles,
    };
    waiters.pump(Instant::now() + Duration::from_secs(10), |b| {
        ARMABLE.iter().all(|w| b.settled(*w))
    });
    check_armed(c, &waiters.board);
    Ok(waiters)
}

/// Each armable waiter must have its request in place, and none of them
/// may have completed at once (no data was there); the epoll waiter's
/// detail (the edges it drained) is the `epoll_drained` field.
fn check_armed(c: &mut Checked, board: &Board) {
    for w in ARMABLE {
        match &board.armed[w.index()] {
            Some(Ok(detail)) => {
                if w == Waiter::Epoll {
                    c.report.text("epoll_drained", detail);
                } else if detail != "queued" && detail != "submitted" {
                    c.fail(format!("{}: {detail} (no data was there)", w.key()));
                }
            }
            Some(Err(e)) => c.fail(format!("{} waiter: {e}", w.key())),
            None => c.fail(format!("{} waiter did not set up within 10 s", w.key())),
        }
    }
}

/// `VDEVLAB-READY`: set up, the host may act (it must not drain the
/// capture, which would let the writer go on). Let every waiter reach its
/// sleep; none may have finished. Notes where the threads sleep and the
/// counters before the trigger.
fn settle(c: &mut Checked, o: &Opts, ctl: RawFd, waiters: &mut Waiters) {
    ready(&o.scenario);
    waiters.pump(Instant::now() + SETTLE, |_| false);
    for w in WAITERS {
        if let Some(d) = &waiters.board.done[w.index()] {
            c.fail(format!(
                "{} finished before the teardown: {}",
                w.key(),
                d.outcome
            ));
        }
    }
    c.report.text("wchans", &thread_wchans());
    match get_stats(ctl) {
        Ok(st) => {
            c.report.raw("stats_before", &st.json());
        }
        Err(e) => c.fail(e),
    }
}

/// The sysfs file and the value that remove the device: its name to the
/// driver's `unbind`, or `1` to the PCI function's `remove`.
fn trigger_write(sysfs: &Path, how: How, t: &Target) -> Result<(PathBuf, String), String> {
    match how {
        How::Unbind => Ok((
            sysfs.join("bus/virtio/drivers").join(DRIVER).join("unbind"),
            t.name.clone(),
        )),
        How::Remove => match &t.pci {
            Ok(p) => Ok((p.join("remove"), "1".into())),
            Err(e) => Err(e.clone()),
        },
    }
}

/// `VDEVLAB-TEARDOWN <how>`, then the trigger; returns when it started.
fn trigger(c: &mut Checked, sysfs: &Path, how: How, t: &Target) -> Instant {
    marker(&format!("{} {}", crate::protocol::TEARDOWN, how.name()));
    let t0 = Instant::now();
    let trig = trigger_write(sysfs, how, t).and_then(|(path, value)| write_sysfs(&path, &value));
    c.report.num("trigger_ms", t0.elapsed().as_millis() as u64);
    if let Err(e) = trig {
        c.fail(format!("trigger: {e}"));
    }
    t0
}

/// Each waiter's outcome and its time since the trigger `t0`; a waiter
/// must be back, with what a removal gives. Returns those still waiting.
fn report_waiters(c: &mut Checked, board: &Board, t0: Instant) -> Vec<Waiter> {
    let mut stuck = Vec::new();
    for w in WAITERS {
        match &board.done[w.index()] {
            Some(d) => {
                c.report.text(w.key(), &d.outcome);
                if d.at >= t0 {
                    c.report.num(
                        &format!("{}_ms", w.key()),
                        d.at.duration_since(t0).as_millis() as u64,
                    );
                }
                c.check(d.good, || {
                    format!("{}: {} is not what a removal must give", w.key(), d.outcome)
                });
            }
            None => {
                c.report.text(w.key(), "still waiting");
                c.fail(format!(
                    "{} did not finish within {WAKE_LIMIT:?} of the teardown",
                    w.key()
                ));
                stuck.push(w);
            }
        }
    }
    stuck
}

/// A file that stayed open (`ctl`) sees the removal: state REMOVED,
/// `POLLHUP`, a read fails; and the node is gone.
fn check_removed(c: &mut Checked, o: &Opts, ctl: RawFd) {
    match get_stats(ctl) {
        Ok(st) => {
            c.report.raw("stats_after", &st.json());
            c.check(st.state & QW_STATE_REMOVED != 0, || {
                format!(
                    "QW_IOC_GET_STATS state {:#x} after the teardown lacks REMOVED",
                    st.state
                )
            });
        }
        Err(e) => c.fail(format!("after the teardown: {e}")),
    }
    match poll_one(ctl, libc::POLLIN | libc::POLLOUT, 0) {
        Ok(rev) => {
            c.report.text("poll_after", &mask_name(rev as u32));
            c.check(rev & libc::POLLHUP != 0, || {
                format!(
                    "poll after the teardown: {} lacks POLLHUP",
                    mask_name(rev as u32)
                )
            });
        }
        Err(e) => c.fail(e),
    }
    let mut b = [0u8; 16];
    let (ra, good) = judge_read(read_fd(ctl, &mut b));
    c.report.text("read_after", &ra);
    c.check(good, || {
        format!("read on an open file after the teardown: {ra}")
    });
    let node_gone = std::fs::metadata(&o.device).is_err();
    c.check(node_gone, || {
        format!("{} still exists after the teardown", o.device)
    });
    let open_after = match open_device(&o.device, Access::Read, true) {
        Ok(_) => {
            c.fail(format!("{} could be opened after the teardown", o.device));
            "opened".to_string()
        }
        Err(e) => e,
    };
    c.report.text("open_after", &open_after);
}

/// The sysfs file and the value that bring the device back: its name to
/// the driver's `bind`, or `1` to `/sys/bus/pci/rescan`.
fn back_write(sysfs: &Path, how: How, name: &str) -> (PathBuf, String) {
    match how {
        How::Unbind => (
            sysfs.join("bus/virtio/drivers").join(DRIVER).join("bind"),
            name.to_string(),
        ),
        How::Remove => (sysfs.join("bus/pci/rescan"), "1".into()),
    }
}

/// Bind again (or rescan): the node must come back within
/// [`BACK_LIMIT`] and work.
fn bring_back(c: &mut Checked, sysfs: &Path, o: &Opts, how: How, name: &str) {
    let (path, value) = back_write(sysfs, how, name);
    if let Err(e) = write_sysfs(&path, &value) {
        c.fail(format!("bringing the device back: {e}"));
    }
    match wait_for_chardev(&o.device, BACK_LIMIT) {
        Ok(d) => {
            c.report.num("back_ms", d.as_millis() as u64);
            c.report.text(
                "device_back",
                &bound_device(sysfs, &o.device).unwrap_or_else(|e| e),
            );
            check_works(c, o, "read_back");
        }
        Err(e) => c.fail(format!(
            "after {}: {e}",
            if how == How::Unbind { "bind" } else { "rescan" }
        )),
    }
}

/// The module parameters to load the driver again with.
fn reload_params(virtio_id: Option<&str>) -> String {
    virtio_id
        .map(|v| format!("virtio_id={v}"))
        .unwrap_or_default()
}

/// Nothing may hold the module now: `delete_module` must succeed (unless
/// waiters are `stuck`: then it is skipped), and the module is loaded
/// again from [`MODULE_PATH`] (its node must come back).
fn unload_and_reload(
    c: &mut Checked,
    sysfs: &Path,
    o: &Opts,
    virtio_id: Option<&str>,
    stuck: &[Waiter],
) {
    let refcnt = std::fs::read_to_string(sysfs.join("module").join(DRIVER).join("refcnt"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("? ({e})"));
    c.report.text("refcnt", &refcnt);
    if !stuck.is_empty() {
        c.fail(format!(
            "not unloading: waiters still hold the device ({})",
            stuck.iter().map(|w| w.key()).collect::<Vec<_>>().join(", ")
        ));
        c.report.text("unload", "skipped");
        return;
    }
    match unload() {
        Ok(n) => {
            c.report.text("unload", &format!("ok after {n} attempt(s)"));
            c.check(!sysfs.join("module").join(DRIVER).exists(), || {
                "the module is still in /sys/module after delete_module".into()
            });
            let reload = load(MODULE_PATH, &reload_params(virtio_id))
                .and_then(|()| wait_for_chardev(&o.device, BACK_LIMIT));
            match reload {
                Ok(d) => {
                    c.report.text(
                        "reload",
                        &format!("ok, {} back after {} ms", o.device, d.as_millis()),
                    );
                }
                Err(e) => {
                    c.report.text("reload", &e);
                    c.fail(format!("loading the module again: {e}"));
                }
            }
        }
        Err((n, e)) => {
            c.report
                .text("unload", &format!("{} after {n} attempt(s)", errno_name(e)));
            c.fail(format!(
                "delete_module({DRIVER}, O_NONBLOCK): {} after {n} attempt(s) (refcnt {refcnt}): a reference leaked",
                errno_name(e)
            ));
        }
    }
}

/// Open the device again: a non-blocking read must say `EAGAIN` (it works
/// and has no data) and the state must be 0.
fn check_works(c: &mut Checked, o: &Opts, key: &str) {
    match open_device(&o.device, Access::Read, true) {
        Ok(fd) => {
            let mut b = [0u8; 16];
            let r = read_fd(fd.as_raw_fd(), &mut b);
            let text = match r {
                Ok(n) => format!("returned {n}"),
                Err(e) => errno_name(e),
            };
            c.check(r == Err(libc::EAGAIN), || {
                format!("{key}: a non-blocking read on the new device: {text}, not EAGAIN")
            });
            c.report.text(key, &text);
            match get_stats(fd.as_raw_fd()) {
                Ok(st) => {
                    c.check(st.state == 0, || {
                        format!("{key}: state {:#x}, not 0", st.state)
                    });
                }
                Err(e) => c.fail(format!("{key}: {e}")),
            }
        }
        Err(e) => c.fail(format!("{key}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: one virtio device on PCI function 0000:00:04.0,
    /// bound to the driver, with its class device qw0; links relative,
    /// as in the real one.
    fn fake_sysfs(tag: &str) -> PathBuf {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("teardown-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let func = root.join("devices/pci0000:00/0000:00:04.0");
        std::fs::create_dir_all(func.join("virtio1/vdevlab_qw/qw0")).unwrap();
        std::fs::write(func.join("remove"), "").unwrap();
        std::fs::create_dir_all(root.join("bus/virtio/devices")).unwrap();
        let drv = root.join("bus/virtio/drivers/vdevlab_qw");
        std::fs::create_dir_all(&drv).unwrap();
        for f in ["bind", "unbind", "uevent"] {
            std::fs::write(drv.join(f), "").unwrap();
        }
        symlink(
            "../../../devices/pci0000:00/0000:00:04.0/virtio1",
            root.join("bus/virtio/devices/virtio1"),
        )
        .unwrap();
        symlink(
            "../../../../devices/pci0000:00/0000:00:04.0/virtio1",
            drv.join("virtio1"),
        )
        .unwrap();
        root
    }

    #[test]
    fn finds_the_bound_device_and_its_pci_function() {
        let root = fake_sysfs("one");
        assert_eq!(bound_device(&root, "/dev/qw0").unwrap(), "virtio1");
        let pci = pci_parent(&root, "virtio1").unwrap();
        assert_eq!(
            pci,
            std::fs::canonicalize(root.join("devices/pci0000:00/0000:00:04.0")).unwrap()
        );
        assert!(pci_parent(&root, "virtio9").is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn prefers_the_device_of_the_node_and_needs_pci() {
        use std::os::unix::fs::symlink;
        let root = fake_sysfs("two");
        // A second bound device, virtio0, not on PCI (e.g. virtio-mmio).
        let mmio = root.join("devices/platform/virtio-mmio.0/virtio0");
        std::fs::create_dir_all(&mmio).unwrap();
        symlink(
            "../../../devices/platform/virtio-mmio.0/virtio0",
            root.join("bus/virtio/devices/virtio0"),
        )
        .unwrap();
        symlink(
            "../../../../devices/platform/virtio-mmio.0/virtio0",
            root.join("bus/virtio/drivers/vdevlab_qw/virtio0"),
        )
        .unwrap();
        // virtio1 holds qw0; virtio0 is first by number.
        assert_eq!(bound_device(&root, "/dev/qw0").unwrap(), "virtio1");
        assert_eq!(bound_device(&root, "/dev/qw5").unwrap(), "virtio0");
        let e = pci_parent(&root, "virtio0").unwrap_err();
        assert!(e.contains("not on a PCI function"), "{e}");
        // No remove file: refused.
        std::fs::remove_file(root.join("devices/pci0000:00/0000:00:04.0/remove")).unwrap();
        assert!(pci_parent(&root, "virtio1")
            .unwrap_err()
            .contains("no remove file"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn no_bound_device_is_an_error() {
        let root = std::env::temp_dir().join(format!("teardown-none-{}", std::process::id()));
        std::fs::create_dir_all(root.join("bus/virtio/drivers/vdevlab_qw")).unwrap();
        assert!(bound_device(&root, "/dev/qw0")
            .unwrap_err()
            .contains("no virtio device"));
        assert!(bound_device(&root.join("nope"), "/dev/qw0").is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn pci_addresses() {
        assert!(is_pci_address("0000:00:04.0"));
        assert!(is_pci_address("0001:1a:1f.7"));
        assert!(!is_pci_address("pci0000:00"));
        assert!(!is_pci_address("0000:00:04"));
        assert!(!is_pci_address("0000:00:04.a"));
        assert!(!is_pci_address("virtio-mmio.0"));
        assert!(!is_pci_address("0000:00:04.0:1"));
    }

    fn target(pci: Result<&str, &str>) -> Target {
        Target {
            name: "virtio1".into(),
            pci: pci.map(PathBuf::from).map_err(String::from),
            virtio_id: Some("42".into()),
        }
    }

    #[test]
    fn the_trigger_and_the_way_back_write_these_files() {
        let sys = Path::new("/sys");
        let t = target(Ok("/sys/devices/pci0000:00/0000:00:04.0"));
        assert_eq!(
            trigger_write(sys, How::Unbind, &t).unwrap(),
            (
                PathBuf::from("/sys/bus/virtio/drivers/vdevlab_qw/unbind"),
                "virtio1".to_string()
            )
        );
        assert_eq!(
            trigger_write(sys, How::Remove, &t).unwrap(),
            (
                PathBuf::from("/sys/devices/pci0000:00/0000:00:04.0/remove"),
                "1".to_string()
            )
        );
        assert_eq!(t.pci_text(), "/sys/devices/pci0000:00/0000:00:04.0");
        let mmio = target(Err("virtio1 is not on a PCI function"));
        assert_eq!(
            trigger_write(sys, How::Remove, &mmio).unwrap_err(),
            "virtio1 is not on a PCI function"
        );
        assert_eq!(mmio.pci_text(), "virtio1 is not on a PCI function");
        assert_eq!(
            back_write(sys, How::Unbind, "virtio1"),
            (
                PathBuf::from("/sys/bus/virtio/drivers/vdevlab_qw/bind"),
                "virtio1".to_string()
            )
        );
        assert_eq!(
            back_write(sys, How::Remove, "virtio1"),
            (PathBuf::from("/sys/bus/pci/rescan"), "1".to_string())
        );
        assert_eq!(reload_params(Some("42")), "virtio_id=42");
        assert_eq!(reload_params(None), "");
    }

    #[test]
    fn armed_waiters_are_checked() {
        let mut board = Board::default();
        board.armed[Waiter::Epoll.index()] = Some(Ok("drained 1 [0x4 (OUT)]".into()));
        board.armed[Waiter::LinuxAio.index()] = Some(Ok("queued".into()));
        board.armed[Waiter::IoUring.index()] = Some(Ok("completed at once".into()));
        board.armed[Waiter::PosixAio.index()] = Some(Err("aio_read: EINVAL".into()));
        let mut c = Checked::new();
        check_armed(&mut c, &board);
        assert_eq!(
            c.report.get("epoll_drained"),
            Some("\"drained 1 [0x4 (OUT)]\"")
        );
        assert_eq!(
            c.problems,
            [
                "io_uring: completed at once (no data was there)",
                "posix_aio waiter: aio_read: EINVAL"
            ]
        );
        let mut c = Checked::new();
        check_armed(&mut c, &Board::default());
        assert_eq!(c.problems.len(), 4);
        assert!(c.problems[0].contains("epoll waiter did not set up within 10 s"));
    }

    #[test]
    fn waiters_are_judged_in_order_and_the_stuck_ones_named() {
        let t0 = Instant::now();
        let mut board = Board::default();
        for (w, outcome, good) in [
            (Waiter::Read, "ENODEV", true),
            (Waiter::Write, "complete 8388608", false),
            (Waiter::Epoll, "0x19 (IN|ERR|HUP)", true),
            (Waiter::LinuxAio, "res -ESHUTDOWN", true),
            (Waiter::PosixAio, "EIO", true),
        ] {
            board.done[w.index()] = Some(Done {
                waiter: w,
                at: t0 + Duration::from_millis(12),
                outcome: outcome.into(),
                good,
                keep: Box::new(()),
            });
        }
        let mut c = Checked::new();
        let stuck = report_waiters(&mut c, &board, t0);
        assert_eq!(stuck, [Waiter::IoUring]);
        assert_eq!(c.report.get("read"), Some("\"ENODEV\""));
        assert_eq!(c.report.get("read_ms"), Some("12"));
        assert_eq!(c.report.get("io_uring"), Some("\"still waiting\""));
        assert_eq!(c.report.get("io_uring_ms"), None);
        assert_eq!(
            c.problems,
            [
                "write: complete 8388608 is not what a removal must give".to_string(),
                format!("io_uring did not finish within {WAKE_LIMIT:?} of the teardown"),
            ]
        );
        // The fields in the result line, in the waiters' order.
        let line = crate::checked_result_line("t", &c.report, &[]);
        assert!(
            line.ends_with(
                "\"read\":\"ENODEV\",\"read_ms\":12,\"write\":\"complete 8388608\",\"write_ms\":12,\
                 \"epoll\":\"0x19 (IN|ERR|HUP)\",\"epoll_ms\":12,\"linux_aio\":\"res -ESHUTDOWN\",\
                 \"linux_aio_ms\":12,\"io_uring\":\"still waiting\",\"posix_aio\":\"EIO\",\"posix_aio_ms\":12}"
            ),
            "{line}"
        );
    }

    #[test]
    fn verdicts() {
        assert_eq!(judge_read(Err(libc::ENODEV)), ("ENODEV".into(), true));
        assert!(judge_read(Err(libc::ESHUTDOWN)).1);
        assert!(judge_read(Err(libc::EIO)).1);
        assert_eq!(judge_read(Err(libc::EAGAIN)), ("EAGAIN".into(), false));
        assert_eq!(judge_read(Ok(0)), ("returned 0".into(), false));
        assert_eq!(judge_write(Ok(100), 200), ("short 100".into(), true));
        assert!(judge_write(Ok(0), 200).1);
        assert_eq!(judge_write(Ok(200), 200), ("complete 200".into(), false));
        assert!(judge_write(Err(libc::ENODEV), 1).1);
        assert!(!judge_write(Err(libc::EINVAL), 1).1);
        assert!(judge_epoll((libc::EPOLLHUP | libc::EPOLLIN) as u32).1);
        assert!(judge_epoll(libc::EPOLLERR as u32).1);
        assert!(!judge_epoll(libc::EPOLLOUT as u32).1);
        assert_eq!(
            judge_linux_aio(-(libc::ESHUTDOWN as i64)),
            ("res -ESHUTDOWN".into(), true)
        );
        assert!(judge_linux_aio(-(libc::ENODEV as i64)).1);
        assert!(!judge_linux_aio(-(libc::ECANCELED as i64)).1);
        assert!(!judge_linux_aio(0).1);
        assert_eq!(judge_uring(-libc::ENODEV), ("res -ENODEV".into(), true));
        assert!(!judge_uring(0).1);
        assert_eq!(judge_posix_aio(libc::ENODEV, -1), ("ENODEV".into(), true));
        assert!(!judge_posix_aio(0, 5).1);
        assert!(!judge_posix_aio(libc::EINPROGRESS, -1).1);
    }
}
