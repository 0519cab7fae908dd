//! `stress`: many readers and writers on `/dev/qw0` at once, for a set
//! time, seeded; then an unbind while all of it runs. Meant for an SMP
//! guest (`vdevlab stress`, `tests/stress.rs`).
//!
//! `stress --seconds N --seed S --readers R --writers W [--device PATH]`
//!
//! 1. Threads start, each on its own descriptor: `R` readers and `W`
//!    writers cycling through the I/O models (readers: blocking,
//!    O_NONBLOCK spinning, poll, edge-triggered epoll, SIGIO, native AIO,
//!    io_uring; writers: blocking, O_NONBLOCK, poll, native AIO,
//!    io_uring; the AIO and io_uring code is the I/O models' own), plus:
//!    - a churner: open/close in every mode, `FIONREAD`, stats, `O_ASYNC`
//!      set and the file closed;
//!    - a controller: `QW_IOC_FLUSH` (each flush's dropped bytes measured
//!      exactly: the stats before and after; it is the only flusher) and
//!      `QW_IOC_RESET`, at seeded intervals;
//!    - a signaller: `SIGUSR1` (no `SA_RESTART`: `EINTR`) and `SIGUSR2`
//!      (`SA_RESTART`: the call restarts) at the readers and writers,
//!      counting those asleep in the driver (`/proc/self/task/TID/stack`)
//!      and, of those, the ones asleep elsewhere than where the locker's
//!      sleepers wait for a held mutex (the kernel's stacks leave the
//!      mutex code out, but the call site's offset differs): on a wait
//!      queue, or rarely the mutex again after waiting;
//!    - a locker (if the kernel has userfaultfd): a reader (or writer)
//!      whose buffer is a userfaultfd page, so it sleeps in the driver's
//!      copy holding `read_mutex` (`write_mutex`) for as long as we like;
//!      meanwhile a non-blocking read (write) must get `EAGAIN` (a busy
//!      lock) and a blocking one that sleeps on the mutex must take
//!      `SIGUSR2` by restarting and `SIGUSR1` with `EINTR`;
//!    - a config reader: the driver's `config` sysfs file (its config
//!      space read with the generation check), read in a loop while the
//!      host changes the interrupt modes: each value must be one the host
//!      set, and they must come in the order it set them.
//!
//!    `VDEVLAB-READY stress`: the host pumps sequence-numbered records
//!    into the device and drains what the writers send
//!    ([`records`]), changing interrupt modes as it goes.
//! 2. After `--seconds`, the device is unbound while everything runs.
//!    Every thread must end with data or an error (`ENODEV`, `ESHUTDOWN`)
//!    within 30 s, never with a `read()`/`write()` returning 0 or
//!    `EINTR` despite `SA_RESTART`.
//! 3. `VDEVLAB-READY stress-2`; the driver's counters (a file still open
//!    after the unbind) settle the accounts: the records read, flushed
//!    and dropped at the unbind are exactly those the driver received
//!    ([`records::check_rx`]); the host checks the transmit side against
//!    `tx_written` and `tx_queued_bytes` ([`records::check_tx`]).
//!
//! Fields: `seconds`, `readers`, `writers`, `rx_records` (received by the
//! driver), `rx_read`, `rx_flushed`, `rx_lost_at_unbind`, `reader_bytes`,
//! `reader_models`, `writer_models`, `tx_written` (records per writer
//! id: the writers, then the locker's holder and prober),
//! `tx_queued_bytes`, `opens`, `flushes`, `resets`, `eagain`,
//! `eagain_busy_read_lock`, `eagain_busy_write_lock`, `eintr`,
//! `eintr_on_lock`, `restarts_on_lock`, `signals_to_lock_sleepers`,
//! `signals_to_driver_sleepers`, `signals_to_wq_sleepers`, `config_reads`,
//! `config_changes_seen`, `config_modes` (the irq_modes values seen, in
//! order), `uffd`, `ends` (how each thread ended).

pub mod records;
pub mod sensor;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use records::{decode_rx, tx_record, Rng, RX_RECORD};

use crate::common::{errno_name, last_errno, nap, open_device, os_err, write_sysfs, Access};
use crate::io_models::epoll::epoll_for;
use crate::io_models::linux_aio::Aio;
use crate::scenarios::teardown::bound_device;
use crate::scenarios::Checked;
use crate::uapi::qw::{class_dir, get_stats, QwStats, DRIVER, QW_IOC_FLUSH, QW_IOC_RESET};
use crate::uapi::{fionread, ioctl_plain};
use crate::{ready, Dir};

/// The scenario's name.
pub const NAME: &str = "stress";
/// How long the threads get to end after the unbind.
const END_LIMIT: Duration = Duration::from_secs(30);
/// Reader models, in the order readers take them.
pub const READER_MODELS: &[&str] = &[
    "blocking",
    "io-uring",
    "epoll-et",
    "linux-aio",
    "nonblocking",
    "sigio",
    "poll",
];
/// Writer models, in the order writers take them.
pub const WRITER_MODELS: &[&str] = &["blocking", "nonblocking", "linux-aio", "io-uring", "poll"];

/// The options of `stress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StressOpts {
    /// The device node.
    pub device: String,
    /// How long the threads run before the unbind.
    pub seconds: u64,
    /// Seed of the records and of every random choice.
    pub seed: u64,
    /// Reader threads.
    pub readers: usize,
    /// Writer threads.
    pub writers: usize,
}

/// Parse `stress`'s arguments (after its name).
pub fn parse(args: &[String]) -> Result<StressOpts, String> {
    let mut o = StressOpts {
        device: "/dev/qw0".into(),
        seconds: 10,
        seed: 1,
        readers: 4,
        writers: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num =
            || -> Result<u64, String> { value.parse().map_err(|e| format!("{flag} {value}: {e}")) };
        match flag.as_str() {
            "--device" => o.device = value.clone(),
            "--seconds" => o.seconds = num()?,
            "--seed" => o.seed = num()?,
            "--readers" => o.readers = num()? as usize,
            "--writers" => o.writers = num()? as usize,
            other => return Err(format!("stress: unknown option {other}")),
        }
    }
    if o.readers == 0 || o.writers == 0 || o.readers > 64 || o.writers > 64 {
        return Err("stress: --readers and --writers must be 1..=64".into());
    }
    Ok(o)
}

/// Run `stress` if `args` name it.
pub fn dispatch(args: &[String]) -> Option<Result<Checked, String>> {
    match args.first().map(String::as_str) {
        Some(NAME) => Some(parse(&args[1..]).and_then(|o| run(&o))),
        Some(sensor::NAME) => Some(parse(&args[1..]).and_then(|o| sensor::run(&o))),
        _ => None,
    }
}

// ---- signals ----

thread_local! {
    /// The signals this thread's handler took since [`forget_signals`]
    /// (bit 0: SIGUSR1, bit 1: SIGUSR2).
    static SEEN: Cell<u32> = const { Cell::new(0) };
}

extern "C" fn note_signal(sig: libc::c_int) {
    let bit = if sig == libc::SIGUSR2 { 2 } else { 1 };
    SEEN.with(|c| c.set(c.get() | bit));
}

/// Start a new call: no signal seen yet.
fn forget_signals() {
    SEEN.with(|c| c.set(0));
}

fn install(sig: libc::c_int, restart: bool) -> Result<(), String> {
    // SAFETY: sigaction is plain data; all-zero is a valid start.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = note_signal as *const () as libc::sighandler_t;
    sa.sa_flags = if restart { libc::SA_RESTART } else { 0 };
    // SAFETY: `sa.sa_mask` is a valid sigset to clear.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: a valid sigaction; the old one is not wanted.
    if unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) } < 0 {
        return Err(os_err("sigaction"));
    }
    Ok(())
}

/// The signal SIGIO readers take (blocked in every thread, taken with
/// `sigtimedwait`), and the one the churner's `O_ASYNC` files get.
fn sigio_signals() -> (libc::c_int, libc::c_int) {
    (libc::SIGRTMIN() + 1, libc::SIGRTMIN() + 2)
}

fn block_sigio_signals() -> Result<libc::sigset_t, String> {
    let (a, b) = sigio_signals();
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid; the signals are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, a);
        libc::sigaddset(&mut set, b);
        libc::sigaddset(&mut set, libc::SIGIO);
    }
    // SAFETY: `set` is valid; the old mask is not wanted.
    let e = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if e != 0 {
        return Err(crate::common::errno_err("pthread_sigmask", e));
    }
    Ok(set)
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

fn tgkill(tid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: signals a thread of this process; a stale tid fails harmlessly.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) };
}

/// Where a thread sleeps, as far as `/proc` tells. The kernel's stacks
/// leave out the scheduler and the mutex code (`__sched`), so a task
/// asleep on `read_mutex` and one asleep on `rx_wq` both show
/// `qw_read_sync`: which of the two it is, only the locker knows (its
/// sleepers wait on a mutex another task holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Running, or asleep outside the driver.
    Elsewhere,
    /// Asleep in the driver (on one of its mutexes or wait queues).
    Driver,
}

fn sleep_of(tid: libc::pid_t) -> Sleep {
    let dir = format!("/proc/self/task/{tid}");
    let stat = std::fs::read_to_string(format!("{dir}/stat")).unwrap_or_default();
    // The state follows the command name's closing parenthesis.
    let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
    if state != Some(Some('S')) {
        return Sleep::Elsewhere;
    }
    let stack = std::fs::read_to_string(format!("{dir}/stack"))
        .or_else(|_| std::fs::read_to_string(format!("{dir}/wchan")))
        .unwrap_or_default();
    // Either lab driver (qw or the sensor).
    if stack.contains("[vdevlab_") || stack.starts_with("qw_") || stack.starts_with("sensor_") {
        Sleep::Driver
    } else {
        Sleep::Elsewhere
    }
}

/// The innermost driver frame of `tid`'s kernel stack
/// (`qw_read_sync+0x91/0x220`), if the kernel shows stacks.
fn driver_frame(tid: libc::pid_t) -> Option<String> {
    let stack = std::fs::read_to_string(format!("/proc/self/task/{tid}/stack")).ok()?;
    stack
        .lines()
        .find(|l| l.contains("[vdevlab_"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(String::from)
}

// ---- what every thread shares and reports ----

#[derive(Debug, Default)]
struct Shared {
    seed: u64,
    device: String,
    /// The unbind has started: ENODEV and friends are expected now.
    unbinding: AtomicBool,
    /// Helpers (churner, controller, signaller, locker, config) stop.
    stop: AtomicBool,
    /// Reader and writer threads the signaller may aim at.
    targets: Mutex<Vec<libc::pid_t>>,
    /// The tx record counters per writer id.
    written: Mutex<BTreeMap<u16, u64>>,
    /// Where the locker's sleepers sleep (their innermost driver frame):
    /// the call sites of `mutex_lock_interruptible()` they wait in.
    lock_sites: Mutex<std::collections::HashSet<String>>,
    counts: Counts,
}

#[derive(Debug, Default)]
struct Counts {
    opens: AtomicU64,
    flushes: AtomicU64,
    resets: AtomicU64,
    eagain: AtomicU64,
    eintr: AtomicU64,
    eagain_busy_read_lock: AtomicU64,
    eagain_busy_write_lock: AtomicU64,
    eintr_on_lock: AtomicU64,
    restarts_on_lock: AtomicU64,
    to_lock: AtomicU64,
    to_driver: AtomicU64,
    to_wq: AtomicU64,
    signals: AtomicU64,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What one thread saw.
#[derive(Debug, Default)]
struct Out {
    name: String,
    /// Receive runs: (first record, records).
    runs: Vec<(u64, u64)>,
    bytes: u64,
    /// How it ended.
    end: String,
    problems: Vec<String>,
    /// The flusher's flushes, in records each.
    flushes: Vec<u64>,
    /// The config reader's values, deduplicated.
    modes: Vec<u32>,
    config_reads: u64,
}

impl Out {
    fn new(name: String) -> Self {
        Self {
            name,
            ..Self::default()
        }
    }

    /// A read returned `data`: whole records, one contiguous run, after
    /// this reader's previous one.
    fn accept(&mut self, seed: u64, data: &[u8]) {
        match decode_rx(seed, data) {
            Ok(first) => {
                let n = (data.len() / RX_RECORD) as u64;
                if let Some(&(p, pn)) = self.runs.last() {
                    if first < p + pn {
                        self.problems.push(format!(
                            "{}: records {first}.. after records ..{} (not in stream order)",
                            self.name,
                            p + pn
                        ));
                    }
                }
                self.runs.push((first, n));
                self.bytes += data.len() as u64;
            }
            Err(e) => self.problems.push(format!("{}: {e}", self.name)),
        }
    }
}

/// Errors that end a thread once the unbind started.
fn removal_errno(e: i32) -> bool {
    matches!(
        e,
        libc::ENODEV | libc::ESHUTDOWN | libc::ENXIO | libc::ENOENT
    )
}

/// What one attempt at I/O gave.
enum Got {
    Data(usize),
    Errno(i32),
}

/// Judge a result that is not data: `true` to go on. EAGAIN and EINTR
/// are counted (EINTR after a `SA_RESTART` signal on a plain read/write
/// is a problem); a removal error after the unbind ends the thread.
fn judge_errno(sh: &Shared, out: &mut Out, e: i32, plain: bool) -> bool {
    match e {
        libc::EAGAIN => {
            add(&sh.counts.eagain);
            true
        }
        libc::EINTR => {
            add(&sh.counts.eintr);
            // Only SIGUSR2 (SA_RESTART) came during the call: a plain
            // read()/write() must have restarted.
            if plain && SEEN.with(Cell::get) == 2 {
                out.problems.push(format!(
                    "{}: EINTR after SIGUSR2 alone, whose handler has SA_RESTART",
                    out.name
                ));
            }
            true
        }
        e if removal_errno(e) && sh.unbinding.load(Ordering::SeqCst) => {
            out.end = errno_name(e);
            false
        }
        e => {
            out.problems
                .push(format!("{}: {} before the unbind", out.name, errno_name(e)));
            out.end = errno_name(e);
            false
        }
    }
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> Got {
    // SAFETY: `buf` is live and writable for its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Got::Errno(last_errno())
    } else {
        Got::Data(n as usize)
    }
}

fn raw_write(fd: RawFd, buf: &[u8]) -> Got {
    // SAFETY: `buf` is live for its length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Got::Errno(last_errno())
    } else {
        Got::Data(n as usize)
    }
}

/// `poll()` one descriptor for up to 100 ms, EINTR counted as nothing.
fn poll_for(fd: RawFd, events: libc::c_short) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 100) };
    if n > 0 {
        pfd.revents
    } else {
        0
    }
}

// ---- readers ----

/// A reader's model state.
enum ReadModel {
    Blocking,
    Nonblocking,
    Poll,
    Epoll(OwnedFd),
    Sigio(libc::sigset_t),
    Aio(Box<Aio>),
    Uring(Box<io_uring::IoUring>),
}

fn reader(sh: Arc<Shared>, idx: usize, model: &'static str) -> Out {
    let mut out = Out::new(format!("reader {idx} ({model})"));
    let nonblock = matches!(model, "nonblocking" | "epoll-et" | "sigio" | "poll");
    let fd = match open_device(&sh.device, Access::Read, nonblock) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(format!("{}: {e}", out.name));
            return out;
        }
    };
    add(&sh.counts.opens);
    let raw = fd.as_raw_fd();
    let mut m = match setup_reader(model, raw) {
        Ok(m) => m,
        Err(e) => {
            out.problems.push(format!("{}: {e}", out.name));
            return out;
        }
    };
    sh.targets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(gettid());
    let mut rng = Rng::new(sh.seed, 100 + idx as u64);
    let mut buf = vec![0u8; 8192];
    loop {
        let len = RX_RECORD * rng.range(1, 512) as usize;
        forget_signals();
        let got = match &mut m {
            ReadModel::Blocking | ReadModel::Nonblocking | ReadModel::Poll => {
                raw_read(raw, &mut buf[..len])
            }
            ReadModel::Epoll(_) | ReadModel::Sigio(_) => raw_read(raw, &mut buf[..len]),
            ReadModel::Aio(aio) => {
                match aio.transfer_res(raw, Dir::Rx, buf.as_mut_ptr() as u64, len) {
                    Ok(res) if res >= 0 => Got::Data(res as usize),
                    Ok(res) => Got::Errno((-res) as i32),
                    Err(e) => {
                        out.problems.push(format!("{}: {e}", out.name));
                        std::mem::forget(buf);
                        std::mem::forget(m);
                        return out;
                    }
                }
            }
            ReadModel::Uring(ring) => {
                let entry = io_uring::opcode::Read::new(
                    io_uring::types::Fd(raw),
                    buf.as_mut_ptr(),
                    len as u32,
                )
                .offset(u64::MAX)
                .build()
                .user_data(1);
                // SAFETY: `buf` outlives the request; on an error both it
                // and the ring are leaked below.
                match unsafe { crate::io_models::uring::run_one(ring, &entry, 1) } {
                    Ok(res) if res >= 0 => Got::Data(res as usize),
                    Ok(res) => Got::Errno(-res),
                    Err(e) => {
                        out.problems.push(format!("{}: {e}", out.name));
                        std::mem::forget(buf);
                        std::mem::forget(m);
                        return out;
                    }
                }
            }
        };
        match got {
            Got::Data(0) => {
                out.problems.push(format!(
                    "{}: a read of {len} bytes returned 0 (end of file?)",
                    out.name
                ));
                out.end = "0".into();
                break;
            }
            Got::Data(n) => out.accept(sh.seed, &buf[..n]),
            Got::Errno(e) => {
                let plain = matches!(m, ReadModel::Blocking);
                if !judge_errno(&sh, &mut out, e, plain) {
                    break;
                }
                if e == libc::EAGAIN {
                    wait_readable(&mut m, raw);
                }
            }
        }
    }
    out
}

fn setup_reader(model: &str, raw: RawFd) -> Result<ReadModel, String> {
    Ok(match model {
        "blocking" => ReadModel::Blocking,
        "nonblocking" => ReadModel::Nonblocking,
        "poll" => ReadModel::Poll,
        "epoll-et" => ReadModel::Epoll(epoll_for(raw, (libc::EPOLLIN | libc::EPOLLET) as u32)?),
        "sigio" => {
            let (sig, _) = sigio_signals();
            // F_SETOWN_EX with F_OWNER_TID: the signal goes to this thread.
            const F_SETOWN_EX: libc::c_int = 15;
            #[repr(C)]
            struct Owner {
                kind: libc::c_int,
                pid: libc::pid_t,
            }
            let owner = Owner {
                kind: 0,
                pid: gettid(),
            };
            // SAFETY: F_SETOWN_EX takes a struct f_owner_ex; `raw` is open.
            if unsafe { libc::fcntl(raw, F_SETOWN_EX, &owner as *const Owner) } < 0 {
                return Err(os_err("fcntl(F_SETOWN_EX)"));
            }
            // SAFETY: F_SETSIG (10) takes a signal number.
            if unsafe { libc::fcntl(raw, 10, sig) } < 0 {
                return Err(os_err("fcntl(F_SETSIG)"));
            }
            crate::common::set_fl(raw, libc::O_ASYNC, 0)?;
            // SAFETY: sigset_t is plain data; sigemptyset initialises it.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is valid.
            unsafe {
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigaddset(&mut set, libc::SIGIO);
            }
            ReadModel::Sigio(set)
        }
        "linux-aio" => ReadModel::Aio(Box::new(Aio::new()?)),
        "io-uring" => ReadModel::Uring(Box::new(
            io_uring::IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))?,
        )),
        other => return Err(format!("no reader model {other}")),
    })
}

/// After EAGAIN: wait the model's way (at most about 100 ms).
fn wait_readable(m: &mut ReadModel, raw: RawFd) {
    match m {
        ReadModel::Nonblocking => nap(Duration::from_micros(200)),
        ReadModel::Poll => {
            poll_for(raw, libc::POLLIN);
        }
        ReadModel::Epoll(ep) => {
            let mut ev = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: room for one event.
            unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, 100) };
        }
        ReadModel::Sigio(set) => {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            // SAFETY: valid set and timeout; the siginfo is not wanted.
            unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        }
        _ => {}
    }
}

// ---- writers ----

enum WriteModel {
    Blocking,
    Nonblocking,
    Poll,
    Aio(Box<Aio>),
    Uring(Box<io_uring::IoUring>),
}

fn note_written(sh: &Shared, writer: u16, seq: u32) {
    sh.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(writer, u64::from(seq));
}

fn writer(sh: Arc<Shared>, idx: usize, model: &'static str) -> Out {
    let mut out = Out::new(format!("writer {idx} ({model})"));
    let id = idx as u16;
    note_written(&sh, id, 0);
    let nonblock = matches!(model, "nonblocking" | "poll");
    let fd = match open_device(&sh.device, Access::Write, nonblock) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(format!("{}: {e}", out.name));
            return out;
        }
    };
    add(&sh.counts.opens);
    let raw = fd.as_raw_fd();
    let mut m = match model {
        "blocking" => WriteModel::Blocking,
        "nonblocking" => WriteModel::Nonblocking,
        "poll" => WriteModel::Poll,
        "linux-aio" => match Aio::new() {
            Ok(a) => WriteModel::Aio(Box::new(a)),
            Err(e) => {
                out.problems.push(e);
                return out;
            }
        },
        _ => match io_uring::IoUring::new(8) {
            Ok(r) => WriteModel::Uring(Box::new(r)),
            Err(e) => {
                out.problems.push(format!("io_uring_setup: {e}"));
                return out;
            }
        },
    };
    sh.targets
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(gettid());
    let mut seq = 0u32;
    let mut rec = tx_record(sh.seed, id, seq);
    loop {
        forget_signals();
        let got = match &mut m {
            WriteModel::Blocking | WriteModel::Nonblocking | WriteModel::Poll => {
                raw_write(raw, &rec)
            }
            WriteModel::Aio(aio) => {
                match aio.transfer_res(raw, Dir::Tx, rec.as_ptr() as u64, rec.len()) {
                    Ok(res) if res >= 0 => Got::Data(res as usize),
                    Ok(res) => Got::Errno((-res) as i32),
                    Err(e) => {
                        out.problems.push(format!("{}: {e}", out.name));
                        std::mem::forget(rec);
                        std::mem::forget(m);
                        return out;
                    }
                }
            }
            WriteModel::Uring(ring) => {
                let entry = io_uring::opcode::Write::new(
                    io_uring::types::Fd(raw),
                    rec.as_ptr(),
                    rec.len() as u32,
                )
                .offset(u64::MAX)
                .build()
                .user_data(1);
                // SAFETY: `rec` outlives the request; leaked on an error.
                match unsafe { crate::io_models::uring::run_one(ring, &entry, 1) } {
                    Ok(res) if res >= 0 => Got::Data(res as usize),
                    Ok(res) => Got::Errno(-res),
                    Err(e) => {
                        out.problems.push(format!("{}: {e}", out.name));
                        std::mem::forget(rec);
                        std::mem::forget(m);
                        return out;
                    }
                }
            }
        };
        match got {
            Got::Data(n) if n == rec.len() => {
                out.bytes += n as u64;
                seq += 1;
                note_written(&sh, id, seq);
                rec = tx_record(sh.seed, id, seq);
            }
            Got::Data(n) => {
                // Not atomic: the record is torn, the accounts cannot hold.
                out.problems.push(format!(
                    "{}: a write of {} bytes returned {n}",
                    out.name,
                    rec.len()
                ));
                out.end = format!("short write {n}");
                break;
            }
            Got::Errno(e) => {
                let plain = matches!(m, WriteModel::Blocking);
                if !judge_errno(&sh, &mut out, e, plain) {
                    break;
                }
                if e == libc::EAGAIN {
                    match m {
                        WriteModel::Poll => {
                            poll_for(raw, libc::POLLOUT);
                        }
                        _ => nap(Duration::from_micros(200)),
                    }
                }
            }
        }
    }
    out
}

// ---- helpers: churner, controller, signaller ----

fn churner(sh: Arc<Shared>) -> Out {
    let mut out = Out::new("churner".into());
    let mut rng = Rng::new(sh.seed, 1);
    let (_, sig) = sigio_signals();
    while !sh.stop.load(Ordering::SeqCst) {
        let access = match rng.range(0, 2) {
            0 => Access::Read,
            1 => Access::Write,
            _ => Access::ReadWrite,
        };
        match open_device(&sh.device, access, rng.range(0, 1) == 1) {
            Ok(fd) => {
                add(&sh.counts.opens);
                let raw = fd.as_raw_fd();
                let _ = fionread(raw);
                let _ = get_stats(raw);
                if rng.range(0, 3) == 0 {
                    // SAFETY: F_SETOWN takes a pid, F_SETSIG a signal.
                    unsafe {
                        libc::fcntl(raw, libc::F_SETOWN, libc::getpid());
                        libc::fcntl(raw, 10, sig);
                    }
                    let _ = crate::common::set_fl(raw, libc::O_ASYNC, 0);
                }
                drop(fd);
            }
            Err(e) => {
                if !sh.unbinding.load(Ordering::SeqCst) {
                    out.problems.push(format!("churner: {e}"));
                    break;
                }
            }
        }
        nap(Duration::from_micros(rng.range(100, 3000)));
    }
    out.end = "stopped".into();
    out
}

fn controller(sh: Arc<Shared>) -> Out {
    let mut out = Out::new("controller".into());
    let mut rng = Rng::new(sh.seed, 2);
    let fd = match open_device(&sh.device, Access::ReadWrite, false) {
        Ok(fd) => fd,
        Err(e) => {
            out.problems.push(format!("controller: {e}"));
            return out;
        }
    };
    add(&sh.counts.opens);
    let raw = fd.as_raw_fd();
    while !sh.stop.load(Ordering::SeqCst) {
        nap(Duration::from_millis(rng.range(20, 250)));
        if rng.range(0, 2) < 2 {
            // Flush while something is buffered, if it comes soon: the
            // readers drain fast.
            let until = Instant::now() + Duration::from_millis(100);
            while fionread(raw).is_ok_and(|n| n == 0) && Instant::now() < until {
                nap(Duration::from_micros(200));
            }
            let before = get_stats(raw).map(|s| s.flushed_bytes);
            let r = ioctl_plain(raw, QW_IOC_FLUSH);
            let after = get_stats(raw).map(|s| s.flushed_bytes);
            match (r, before, after) {
                (Ok(()), Ok(b), Ok(a)) => {
                    add(&sh.counts.flushes);
                    if !(a - b).is_multiple_of(RX_RECORD as u64) {
                        out.problems.push(format!(
                            "a flush dropped {} bytes: not whole records",
                            a - b
                        ));
                    }
                    out.flushes.push((a - b) / RX_RECORD as u64);
                }
                (Err(e), _, _) if removal_errno(e) && sh.unbinding.load(Ordering::SeqCst) => break,
                (Err(e), _, _) => {
                    out.problems
                        .push(format!("QW_IOC_FLUSH: {}", errno_name(e)));
                    break;
                }
                (_, Err(e), _) | (_, _, Err(e)) => {
                    out.problems.push(e);
                    break;
                }
            }
        } else {
            match ioctl_plain(raw, QW_IOC_RESET) {
                Ok(()) => add(&sh.counts.resets),
                Err(e) if removal_errno(e) && sh.unbinding.load(Ordering::SeqCst) => break,
                Err(e) => {
                    out.problems
                        .push(format!("QW_IOC_RESET: {}", errno_name(e)));
                    break;
                }
            }
        }
    }
    out.end = "stopped".into();
    out
}

fn signaller(sh: Arc<Shared>) -> Out {
    let mut out = Out::new("signaller".into());
    let mut rng = Rng::new(sh.seed, 3);
    while !sh.stop.load(Ordering::SeqCst) {
        nap(Duration::from_micros(rng.range(500, 8000)));
        let tid = {
            let t = sh.targets.lock().unwrap_or_else(|e| e.into_inner());
            if t.is_empty() {
                continue;
            }
            t[rng.range(0, t.len() as u64 - 1) as usize]
        };
        if sleep_of(tid) == Sleep::Driver {
            add(&sh.counts.to_driver);
            // Not where a task waits for a held mutex: on a wait queue
            // (or, rarely, on the mutex again after the wait).
            let sites = sh.lock_sites.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = driver_frame(tid) {
                if !sites.is_empty() && !sites.contains(&f) {
                    add(&sh.counts.to_wq);
                }
            }
        }
        let sig = if rng.range(0, 9) < 6 {
            libc::SIGUSR1
        } else {
            libc::SIGUSR2
        };
        add(&sh.counts.signals);
        tgkill(tid, sig);
    }
    out.end = "stopped".into();
    out
}

// ---- the config reader ----

/// The driver's `config` sysfs file: `irq_modes=0x..` among its lines.
fn config_reader(sh: Arc<Shared>, path: std::path::PathBuf) -> Out {
    let mut out = Out::new("config reader".into());
    while !sh.stop.load(Ordering::SeqCst) {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                out.config_reads += 1;
                let modes = text
                    .lines()
                    .find_map(|l| l.strip_prefix("irq_modes="))
                    .and_then(|v| u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok());
                match modes {
                    Some(m) if m & 0xf <= 2 && (m >> 4) & 0xf <= 2 && m >> 8 == 0 => {
                        if out.modes.last() != Some(&m) {
                            out.modes.push(m);
                        }
                    }
                    _ => out
                        .problems
                        .push(format!("config reader: a config read gave {text:?}")),
                }
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                if sh.unbinding.load(Ordering::SeqCst) {
                    break;
                }
                // A reset in progress (the device is stopped) or a signal.
                if !matches!(errno, libc::EAGAIN | libc::EINTR | libc::ENODEV) {
                    out.problems
                        .push(format!("config reader: {}: {e}", path.display()));
                    break;
                }
            }
        }
        nap(Duration::from_micros(500));
    }
    out.end = "stopped".into();
    out
}

// ---- the locker: userfaultfd pages in the driver's copies ----

mod uffd {
    use crate::uapi::ioc;

    pub const API: u64 = 0xaa;
    #[repr(C)]
    pub struct Api {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Register {
        pub start: u64,
        pub len: u64,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    pub struct Copy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }
    const RW: u64 = 3;
    pub const IOC_API: libc::c_ulong = ioc(RW, 0xaa, 0x3f, std::mem::size_of::<Api>());
    pub const IOC_REGISTER: libc::c_ulong = ioc(RW, 0xaa, 0x00, std::mem::size_of::<Register>());
    pub const IOC_COPY: libc::c_ulong = ioc(RW, 0xaa, 0x03, std::mem::size_of::<Copy>());
    pub const MODE_MISSING: u64 = 1;
}

/// A userfaultfd descriptor, or `None` if the kernel has none.
fn uffd_open() -> Option<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = uffd::Api {
        api: uffd::API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api.
    if unsafe { libc::ioctl(fd.as_raw_fd(), uffd::IOC_API, &mut api) } < 0 {
        return None;
    }
    Some(fd)
}

const PAGE: usize = 4096;

/// One page registered for missing faults with `uffd`.
struct Trap {
    addr: *mut u8,
}

impl Trap {
    fn new(uffd: RawFd) -> Result<Self, String> {
        // SAFETY: a fresh anonymous mapping.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(os_err("mmap"));
        }
        let mut reg = uffd::Register {
            start: addr as u64,
            len: PAGE as u64,
            mode: uffd::MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register.
        if unsafe { libc::ioctl(uffd, uffd::IOC_REGISTER, &mut reg) } < 0 {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(addr, PAGE) };
            return Err(os_err("UFFDIO_REGISTER"));
        }
        Ok(Self { addr: addr.cast() })
    }

    /// Resolve the fault with `content` (a page).
    fn fill(&self, uffd: RawFd, content: &[u8; PAGE]) -> Result<(), String> {
        let mut c = uffd::Copy {
            dst: self.addr as u64,
            src: content.as_ptr() as u64,
            len: PAGE as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a struct uffdio_copy; `content` is a page.
        if unsafe { libc::ioctl(uffd, uffd::IOC_COPY, &mut c) } < 0 {
            return Err(os_err("UFFDIO_COPY"));
        }
        Ok(())
    }
}

impl Drop for Trap {
    fn drop(&mut self) {
        // SAFETY: the mapping this Trap made; nobody uses it any more.
        unsafe { libc::munmap(self.addr.cast(), PAGE) };
    }
}

/// Wait up to `ms` for a fault on `uffd`; true if one came (and was read).
fn wait_fault(uffd: RawFd, ms: i32) -> bool {
    if poll_once(uffd, ms) == 0 {
        return false;
    }
    let mut msg = [0u8; 32];
    // SAFETY: a 32-byte uffd_msg into `msg`.
    let n = unsafe { libc::read(uffd, msg.as_mut_ptr().cast(), msg.len()) };
    n == 32
}

fn poll_once(fd: RawFd, ms: i32) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } > 0 {
        pfd.revents
    } else {
        0
    }
}

/// A thread that makes one blocking call and says its tid first.
fn sleeper<F>(f: F) -> (JoinHandle<Got>, libc::pid_t)
where
    F: FnOnce() -> Got + Send + 'static,
{
    let tid = Arc::new(AtomicI32::new(0));
    let t = Arc::clone(&tid);
    let h = std::thread::spawn(move || {
        t.store(gettid(), Ordering::SeqCst);
        f()
    });
    while tid.load(Ordering::SeqCst) == 0 {
        nap(Duration::from_micros(100));
    }
    (h, tid.load(Ordering::SeqCst))
}

/// Wait until `tid` sleeps in the driver; at most a second.
fn wait_asleep(tid: libc::pid_t) -> Sleep {
    let start = Instant::now();
    loop {
        let s = sleep_of(tid);
        if s != Sleep::Elsewhere || start.elapsed() > Duration::from_secs(1) {
            return s;
        }
        nap(Duration::from_millis(1));
    }
}

/// Ptr wrapper to move the trap's address into a thread.
#[derive(Clone, Copy)]
struct Addr(usize);

fn locker(sh: Arc<Shared>, writer_ids: (u16, u16)) -> Out {
    let mut out = Out::new("locker".into());
    let Some(ufd) = uffd_open() else {
        out.end = "no userfaultfd".into();
        return out;
    };
    let u = ufd.as_raw_fd();
    let (holder_id, probe_id) = writer_ids;
    let (mut holder_seq, mut probe_seq) = (0u32, 0u32);
    note_written(&sh, holder_id, 0);
    note_written(&sh, probe_id, 0);
    let mut rng = Rng::new(sh.seed, 4);
    let mut round = 0u64;
    while !sh.stop.load(Ordering::SeqCst) && !sh.unbinding.load(Ordering::SeqCst) {
        nap(Duration::from_millis(rng.range(50, 300)));
        round += 1;
        let write = round.is_multiple_of(2);
        let trap = match Trap::new(u) {
            Ok(t) => t,
            Err(e) => {
                out.problems.push(format!("locker: {e}"));
                break;
            }
        };
        let access = if write { Access::Write } else { Access::Read };
        let (hfd, pfd_nb, pfd_b) = match (
            open_device(&sh.device, access, false),
            open_device(&sh.device, access, true),
            open_device(&sh.device, access, false),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => break,
        };
        for _ in 0..3 {
            add(&sh.counts.opens);
        }
        let addr = Addr(trap.addr as usize);
        let hraw = hfd.as_raw_fd();
        let hrec = tx_record(sh.seed, holder_id, holder_seq);
        let hlen = if write { hrec.len() } else { PAGE };
        // The holder: its buffer is the trap page.
        let (holder, _) = sleeper(move || {
            let a = addr;
            // SAFETY: the trap page stays mapped until the holder is joined.
            let buf = unsafe { std::slice::from_raw_parts_mut(a.0 as *mut u8, hlen) };
            if write {
                raw_write(hraw, buf)
            } else {
                raw_read(hraw, buf)
            }
        });
        let faulted = wait_fault(u, 2000);
        if faulted {
            // The holder sleeps in the driver's copy, holding the mutex.
            let mut probe = vec![0u8; RX_RECORD];
            let prec = tx_record(sh.seed, probe_id, probe_seq);
            let got = if write {
                raw_write(pfd_nb.as_raw_fd(), &prec)
            } else {
                raw_read(pfd_nb.as_raw_fd(), &mut probe)
            };
            match got {
                Got::Errno(libc::EAGAIN) => add(if write {
                    &sh.counts.eagain_busy_write_lock
                } else {
                    &sh.counts.eagain_busy_read_lock
                }),
                Got::Data(n) => {
                    out.problems.push(format!(
                        "a non-blocking {} got {n} bytes while another task held the lock",
                        if write { "write" } else { "read" }
                    ));
                    if write {
                        probe_seq += 1;
                        note_written(&sh, probe_id, probe_seq);
                    } else if n > 0 {
                        out.accept(sh.seed, &probe[..n]);
                    }
                }
                // The unbind may come mid-round.
                Got::Errno(e) if removal_errno(e) && sh.unbinding.load(Ordering::SeqCst) => {}
                Got::Errno(e) => out.problems.push(format!(
                    "a non-blocking {} next to a lock holder: {}",
                    if write { "write" } else { "read" },
                    errno_name(e)
                )),
            }
            // A blocking one sleeps on the mutex: SIGUSR2 (SA_RESTART)
            // must restart it, SIGUSR1 must end it with EINTR.
            let braw = pfd_b.as_raw_fd();
            let prec2 = prec.clone();
            // What it read, if it read (not expected), for the accounts.
            let took = Arc::new(Mutex::new(Vec::new()));
            let took2 = Arc::clone(&took);
            let (h, tid) = sleeper(move || {
                if write {
                    raw_write(braw, &prec2)
                } else {
                    let mut b = vec![0u8; RX_RECORD * 4];
                    let got = raw_read(braw, &mut b);
                    if let Got::Data(n) = got {
                        b.truncate(n);
                        *took2.lock().unwrap_or_else(|e| e.into_inner()) = b;
                    }
                    got
                }
            });
            // Asleep in the driver while the holder has the mutex: on
            // the mutex (it cannot have got past it).
            if wait_asleep(tid) == Sleep::Driver {
                add(&sh.counts.to_lock);
                if let Some(f) = driver_frame(tid) {
                    sh.lock_sites
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(f);
                }
                tgkill(tid, libc::SIGUSR2);
                nap(Duration::from_millis(20));
                if !h.is_finished() && wait_asleep(tid) != Sleep::Elsewhere {
                    add(&sh.counts.restarts_on_lock);
                }
                tgkill(tid, libc::SIGUSR1);
            }
            let deadline = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < deadline {
                tgkill(tid, libc::SIGUSR1);
                nap(Duration::from_millis(5));
            }
            // Let the holder go: a zero page (read) or its record (write).
            let mut page = [0u8; PAGE];
            if write {
                page[..hrec.len()].copy_from_slice(&hrec);
            }
            if let Err(e) = trap.fill(u, &page) {
                out.problems.push(format!("locker: {e}"));
            }
            match h.join() {
                Ok(Got::Errno(libc::EINTR)) => add(&sh.counts.eintr_on_lock),
                Ok(Got::Errno(e)) if removal_errno(e) => {}
                Ok(Got::Errno(e)) => out.problems.push(format!(
                    "a blocking call asleep on the driver's lock, signalled: {}",
                    errno_name(e)
                )),
                Ok(Got::Data(n)) => {
                    out.problems.push(format!(
                        "a blocking call asleep on the driver's lock returned {n} despite SIGUSR1"
                    ));
                    if write && n > 0 {
                        probe_seq += 1;
                        note_written(&sh, probe_id, probe_seq);
                    } else if n > 0 {
                        let data = took.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        out.accept(sh.seed, &data);
                    }
                }
                Err(_) => out.problems.push("a sleeper panicked".into()),
            }
        } else {
            // No fault within 2 s (the unbind?): release whatever comes.
            let page = [0u8; PAGE];
            let _ = trap.fill(u, &page);
        }
        // The holder finishes once its page is there (or with an error).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !holder.is_finished() && Instant::now() < deadline {
            if wait_fault(u, 10) {
                let mut page = [0u8; PAGE];
                if write {
                    page[..hrec.len()].copy_from_slice(&hrec);
                }
                let _ = trap.fill(u, &page);
            }
        }
        if !holder.is_finished() {
            out.problems
                .push("the lock holder did not finish within 10 s".into());
            std::mem::forget(trap);
            std::mem::forget(holder);
            break;
        }
        match holder.join() {
            Ok(Got::Data(n)) if write => {
                if n != hrec.len() {
                    out.problems
                        .push(format!("the holder's write of {} returned {n}", hrec.len()));
                }
                holder_seq += 1;
                note_written(&sh, holder_id, holder_seq);
            }
            Ok(Got::Data(0)) => out.problems.push("the holder's read returned 0".into()),
            Ok(Got::Data(n)) => {
                // SAFETY: the trap page holds what the read copied.
                let data = unsafe { std::slice::from_raw_parts(trap.addr, n) };
                out.accept(sh.seed, data);
            }
            Ok(Got::Errno(e)) if removal_errno(e) || e == libc::EINTR => {}
            Ok(Got::Errno(e)) => out
                .problems
                .push(format!("the lock holder: {}", errno_name(e))),
            Err(_) => out.problems.push("the holder panicked".into()),
        }
        drop(trap);
    }
    out.end = format!("{round} rounds");
    out
}

// ---- the run ----

fn spawn(
    name: String,
    f: impl FnOnce() -> Out + Send + 'static,
) -> Result<JoinHandle<Out>, String> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|e| format!("spawning {name}: {e}"))
}

fn json_nums(v: impl Iterator<Item = u64>) -> String {
    format!(
        "[{}]",
        v.map(|x| x.to_string()).collect::<Vec<_>>().join(",")
    )
}

fn json_texts<'a>(v: impl Iterator<Item = &'a str>) -> String {
    format!("[{}]", v.map(crate::json_str).collect::<Vec<_>>().join(","))
}

/// Run `stress`.
pub fn run(o: &StressOpts) -> Result<Checked, String> {
    install(libc::SIGUSR1, false)?;
    install(libc::SIGUSR2, true)?;
    block_sigio_signals()?;
    let sysfs = Path::new("/sys");
    let keeper = open_device(&o.device, Access::ReadWrite, false)?;
    let s0 = get_stats(keeper.as_raw_fd())?;
    let sh = Arc::new(Shared {
        seed: o.seed,
        device: o.device.clone(),
        ..Shared::default()
    });
    let mut workers = Vec::new();
    for i in 0..o.readers {
        let (s, m) = (Arc::clone(&sh), READER_MODELS[i % READER_MODELS.len()]);
        workers.push(spawn(format!("reader-{i}"), move || reader(s, i, m))?);
    }
    for i in 0..o.writers {
        let (s, m) = (Arc::clone(&sh), WRITER_MODELS[i % WRITER_MODELS.len()]);
        workers.push(spawn(format!("writer-{i}"), move || writer(s, i, m))?);
    }
    let mut helpers = Vec::new();
    let s = Arc::clone(&sh);
    helpers.push(spawn("churner".into(), move || churner(s))?);
    let s = Arc::clone(&sh);
    helpers.push(spawn("controller".into(), move || controller(s))?);
    let s = Arc::clone(&sh);
    helpers.push(spawn("signaller".into(), move || signaller(s))?);
    let s = Arc::clone(&sh);
    let ids = (o.writers as u16, o.writers as u16 + 1);
    helpers.push(spawn("locker".into(), move || locker(s, ids))?);
    let config = class_dir(sysfs, &o.device).join("config");
    let has_config = config.exists();
    if has_config {
        let s = Arc::clone(&sh);
        helpers.push(spawn("config".into(), move || config_reader(s, config))?);
    }
    let name = bound_device(sysfs, &o.device)?;
    ready(NAME);

    nap(Duration::from_secs(o.seconds));

    // The unbind, with everything running.
    let mut c = Checked::new();
    sh.unbinding.store(true, Ordering::SeqCst);
    let unbind = sysfs.join("bus/virtio/drivers").join(DRIVER).join("unbind");
    let t = Instant::now();
    if let Err(e) = write_sysfs(&unbind, &name) {
        c.fail(e);
    }
    let unbind_ms = t.elapsed().as_millis() as u64;
    let deadline = Instant::now() + END_LIMIT;
    while workers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        nap(Duration::from_millis(10));
    }
    sh.stop.store(true, Ordering::SeqCst);
    while helpers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        nap(Duration::from_millis(10));
    }
    let mut outs = Vec::new();
    for h in workers.into_iter().chain(helpers) {
        if !h.is_finished() {
            let n = h.thread().name().unwrap_or("?").to_string();
            c.fail(format!(
                "{n} did not end within {END_LIMIT:?} of the unbind"
            ));
            continue;
        }
        match h.join() {
            Ok(out) => outs.push(out),
            Err(_) => c.fail("a thread panicked"),
        }
    }
    let s1: QwStats = get_stats(keeper.as_raw_fd())?;
    ready(&format!("{NAME}-2"));

    // The accounts.
    let rx_bytes = s1.rx_bytes - s0.rx_bytes;
    c.check(rx_bytes.is_multiple_of(RX_RECORD as u64), || {
        format!("the driver received {rx_bytes} bytes: not whole records")
    });
    let received = rx_bytes / RX_RECORD as u64;
    let flushes: Vec<u64> = outs.iter().flat_map(|o| o.flushes.clone()).collect();
    let flushed_sum: u64 = flushes.iter().sum::<u64>() * RX_RECORD as u64;
    c.check(flushed_sum == s1.flushed_bytes - s0.flushed_bytes, || {
        format!(
            "the flushes measured {flushed_sum} bytes, the driver counted {}",
            s1.flushed_bytes - s0.flushed_bytes
        )
    });
    let mut runs: Vec<(u64, u64)> = outs.iter().flat_map(|o| o.runs.clone()).collect();
    let (mut read, mut flushed, mut lost) = (0, 0, 0);
    match records::check_rx(&mut runs, &flushes, received) {
        Ok(v) => (read, flushed, lost) = (v.read, v.flushed, v.lost_at_unbind),
        Err(e) => c.fail(format!("receive stream: {e}")),
    }
    for out in &outs {
        c.problems.extend(out.problems.iter().cloned());
    }
    let written = sh.written.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let n_ids = o.writers + 2;
    let tx_written: Vec<u64> = (0..n_ids as u16)
        .map(|w| written.get(&w).copied().unwrap_or(0))
        .collect();
    let k = &sh.counts;
    let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
    let modes: Vec<u32> = outs.iter().flat_map(|o| o.modes.clone()).collect();
    let config_reads: u64 = outs.iter().map(|o| o.config_reads).sum();
    c.report
        .num("seconds", o.seconds)
        .num("seed", o.seed)
        .num("readers", o.readers as u64)
        .num("writers", o.writers as u64)
        .num("unbind_ms", unbind_ms)
        .num("rx_records", received)
        .num("rx_read", read)
        .num("rx_flushed", flushed)
        .num("rx_lost_at_unbind", lost)
        .raw(
            "reader_bytes",
            &json_nums(
                outs.iter()
                    .filter(|o| o.name.starts_with("reader"))
                    .map(|o| o.bytes),
            ),
        )
        .raw(
            "reader_models",
            &json_texts((0..o.readers).map(|i| READER_MODELS[i % READER_MODELS.len()])),
        )
        .raw(
            "writer_models",
            &json_texts((0..o.writers).map(|i| WRITER_MODELS[i % WRITER_MODELS.len()])),
        )
        .raw("tx_written", &json_nums(tx_written.iter().copied()))
        .num("tx_queued_bytes", s1.tx_bytes - s0.tx_bytes)
        .num("opens", get(&k.opens))
        .num("flushes", get(&k.flushes))
        .num("resets", get(&k.resets))
        .num("driver_resets", s1.resets - s0.resets)
        .num("eagain", get(&k.eagain))
        .num("eagain_busy_read_lock", get(&k.eagain_busy_read_lock))
        .num("eagain_busy_write_lock", get(&k.eagain_busy_write_lock))
        .num("eintr", get(&k.eintr))
        .num("eintr_on_lock", get(&k.eintr_on_lock))
        .num("restarts_on_lock", get(&k.restarts_on_lock))
        .num("signals", get(&k.signals))
        .num("signals_to_lock_sleepers", get(&k.to_lock))
        .num("signals_to_driver_sleepers", get(&k.to_driver))
        .num("signals_to_wq_sleepers", get(&k.to_wq))
        .raw("config", if has_config { "true" } else { "false" })
        .num("config_reads", config_reads)
        .num("config_changes_seen", modes.len().saturating_sub(1) as u64)
        .raw(
            "config_modes",
            &json_nums(modes.iter().map(|&m| u64::from(m))),
        )
        .raw(
            "uffd",
            if outs
                .iter()
                .any(|o| o.name == "locker" && o.end != "no userfaultfd")
            {
                "true"
            } else {
                "false"
            },
        )
        .raw(
            "ends",
            &ends_json(outs.iter().map(|o| (o.name.as_ref(), o.end.as_ref()))),
        )
        .raw("driver_stats", &s1.json());
    Ok(c)
}

/// How each thread ended, as a JSON object `{"<name>":"<how>",...}`.
fn ends_json<'a>(ends: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let fields: Vec<String> = ends
        .map(|(name, end)| format!("{}:{}", crate::json_str(name), crate::json_str(end)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse(&a(&["--seconds", "3", "--seed", "9", "--readers", "5"])).unwrap();
        assert_eq!((o.seconds, o.seed, o.readers, o.writers), (3, 9, 5, 3));
        assert!(parse(&a(&["--readers", "0"])).is_err());
        assert!(parse(&a(&["--frob", "1"])).is_err());
        assert!(dispatch(&a(&["other"])).is_none());
    }

    #[test]
    fn readers_check_their_runs() {
        let mut out = Out::new("r".into());
        out.accept(5, &records::rx_records(5, 3, 2));
        out.accept(5, &records::rx_records(5, 9, 1));
        assert!(out.problems.is_empty(), "{:?}", out.problems);
        out.accept(5, &records::rx_records(5, 4, 1));
        assert_eq!(out.problems.len(), 1, "out of order");
        assert_eq!(out.runs, [(3, 2), (9, 1), (4, 1)]);
    }
}
