//! `sigio`: signal-driven I/O. The descriptor is `O_NONBLOCK | O_ASYNC`,
//! owned by this process (`F_SETOWN`), and `F_SETSIG` picks a real-time
//! signal (`SIGRTMIN + 1`), which the kernel queues with `si_fd` and
//! `si_band` filled in.
//!
//! The signal is blocked and taken with `sigwaitinfo()`, so no handler runs
//! and no wakeup can be lost between an `EAGAIN` and the wait: a readiness
//! change after the `EAGAIN` leaves the signal pending. Each wakeup drains
//! (read/write until `EAGAIN`), since a signal reports a change, not a
//! level. `SIGIO` is blocked and waited for too: the kernel sends plain
//! `SIGIO` when the real-time signal queue overflows, and then the program
//! just retries.
//!
//! Checks: every signal's `si_fd` must be this descriptor (else the run
//! fails); a `si_band` without `POLLIN` (rx) / `POLLOUT` (tx) is counted in
//! `other_band` (a driver may share one fasync list between directions), and
//! the union of all bands is reported as `bands`.
//!
//! Evidence of waiting: `signals_after_full` counts the signals with the
//! wanted band that came after a drain ended on `EAGAIN` (for a writer: the
//! ring was full, and the driver announced room), and `max_sigwait_ms` is
//! the longest wait in `sigwaitinfo()`.
//!
//! A driver without a `fasync` method accepts `O_ASYNC` silently and never
//! signals: this program then waits until the harness times out.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::common::{interrupted, open_device, os_err, set_fl, Side, Step};
use crate::{Dir, Opts, Report};

/// The start of `siginfo_t` for `SIGPOLL`-style signals on 64-bit Linux
/// (`si_signo`, `si_errno`, `si_code`, padding, then the `_sigpoll` union
/// member: `long si_band; int si_fd;`). The libc crate has no accessors for
/// these two fields on glibc.
/// Also the waiter crew's (`scenarios::waiters`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SigPoll {
    pub(crate) signo: libc::c_int,
    pub(crate) errno: libc::c_int,
    pub(crate) code: libc::c_int,
    _pad: libc::c_int,
    pub(crate) band: libc::c_long,
    pub(crate) fd: libc::c_int,
}

const _: () = assert!(std::mem::size_of::<SigPoll>() <= std::mem::size_of::<libc::siginfo_t>());
/// `F_SETSIG` of `<fcntl.h>` (Linux-specific; not in the libc crate).
const F_SETSIG: libc::c_int = 10;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("SigPoll describes the 64-bit siginfo_t layout");

/// Run `sigio-rx` or `sigio-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), true)?;
    let raw = fd.as_raw_fd();

    let sig = libc::SIGRTMIN() + 1;
    if sig > libc::SIGRTMAX() {
        return Err("no real-time signal available".into());
    }
    // SAFETY: sigset_t is plain data; sigemptyset initialises it next.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; `sig` and SIGIO are valid signals.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigaddset(&mut set, libc::SIGIO);
    }
    // Block before enabling O_ASYNC, so that no signal is ever delivered
    // (the default action of both would end the process).
    // SAFETY: `set` is valid; the old mask is not wanted (null).
    let e = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if e != 0 {
        return Err(crate::common::errno_err("pthread_sigmask", e));
    }
    // SAFETY: F_SETOWN takes a pid; `raw` is open.
    if unsafe { libc::fcntl(raw, libc::F_SETOWN, libc::getpid()) } < 0 {
        return Err(os_err("fcntl(F_SETOWN)"));
    }
    // SAFETY: F_SETSIG takes a signal number; `raw` is open.
    if unsafe { libc::fcntl(raw, F_SETSIG, sig) } < 0 {
        return Err(os_err("fcntl(F_SETSIG)"));
    }
    set_fl(raw, libc::O_ASYNC, 0)?;

    let want_band = match dir {
        Dir::Rx => libc::POLLIN,
        Dir::Tx => libc::POLLOUT,
    } as libc::c_long;
    crate::start(o);
    let (mut signals, mut overflow, mut other_band, mut empty) = (0u64, 0u64, 0u64, 0u64);
    let (mut after_full, mut blocked, mut max_wait) = (0u64, false, Duration::ZERO);
    let mut bands: libc::c_long = 0;
    let mut first_pass = true;
    loop {
        // Drain: the signal says something changed, not how much.
        let mut moved = false;
        while !side.done() {
            match side.once(raw)? {
                Step::Moved(_) => moved = true,
                Step::WouldBlock => {
                    blocked = true;
                    break;
                }
            }
        }
        if !moved && !first_pass {
            empty += 1;
        }
        first_pass = false;
        if side.done() {
            break;
        }
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let t0 = Instant::now();
        // SAFETY: `set` and `info` are valid for the call.
        let got = unsafe { libc::sigwaitinfo(&set, &mut info) };
        max_wait = max_wait.max(t0.elapsed());
        if got < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("sigwaitinfo"));
        }
        if got == libc::SIGIO {
            overflow += 1;
            continue;
        }
        // SAFETY: `info` is a fully initialised siginfo_t, larger than
        // SigPoll (asserted above), and SigPoll is plain data.
        let p: SigPoll = unsafe { std::ptr::read((&info as *const libc::siginfo_t).cast()) };
        signals += 1;
        if p.signo != sig {
            return Err(format!(
                "sigwaitinfo returned {got} with si_signo {}",
                p.signo
            ));
        }
        if p.fd != raw {
            return Err(format!(
                "signal {sig} carried si_fd {} (si_code {}, si_band {:#x}), expected descriptor {raw}",
                p.fd, p.code, p.band
            ));
        }
        bands |= p.band;
        if p.band & want_band == 0 {
            other_band += 1;
        } else if std::mem::take(&mut blocked) {
            after_full += 1;
        }
    }
    // Stop the signals; the descriptor closes right after anyway.
    let _ = set_fl(raw, 0, libc::O_ASYNC);

    let mut r = side.report();
    r.num("signals", signals)
        .num("sigio_overflow", overflow)
        .num("other_band", other_band)
        .num("empty_wakeups", empty)
        .text("bands", &format!("{bands:#x}"))
        .num("signal", sig as u64)
        .num("signals_after_full", after_full)
        .num("max_sigwait_ms", max_wait.as_millis() as u64);
    Ok(r)
}
