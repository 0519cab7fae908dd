//! `epoll-lt` and `epoll-et`: `O_NONBLOCK` and an epoll instance.
//!
//! - Level-triggered (`epoll-lt`): one read/write per wakeup; epoll reports
//!   the descriptor again while it stays ready.
//! - Edge-triggered (`epoll-et`, `EPOLLET`): after every wakeup the program
//!   drains, reading/writing until `EAGAIN` (or until all bytes moved),
//!   because epoll reports only changes. A wakeup that finds nothing to do
//!   is counted in `empty_wakeups`.
//!
//! A writer waits in slices of [`READINESS_SLICE_MS`] and reports how many
//! found it not writable (`epollout_false`), how often EPOLLOUT came back
//! after them (`epollout_again`) and the longest stretch (`max_unready_ms`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::common::{interrupted, open_device, os_err, Readiness, Side, Step, READINESS_SLICE_MS};
use crate::{Dir, Opts, Report};

/// Level- or edge-triggered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Default epoll behaviour.
    Level,
    /// `EPOLLET`.
    Edge,
}

/// An epoll instance watching `fd` for `events`.
pub fn epoll_for(fd: RawFd, events: u32) -> Result<OwnedFd, String> {
    // SAFETY: plain syscall wrapper.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(os_err("epoll_create1"));
    }
    // SAFETY: `ep` is a new descriptor that nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: `ev` is a valid epoll_event; both descriptors are open.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(os_err("epoll_ctl(EPOLL_CTL_ADD)"));
    }
    Ok(ep)
}

/// Wait for one event on `ep` (retrying `EINTR`) and return its mask.
pub fn epoll_wait_one(ep: RawFd) -> Result<u32, String> {
    loop {
        if let Some(mask) = epoll_wait_for(ep, -1)? {
            return Ok(mask);
        }
    }
}

/// Wait up to `timeout_ms` (-1: forever) for one event on `ep` (retrying
/// `EINTR`): its mask, or `None` on a timeout.
pub fn epoll_wait_for(ep: RawFd, timeout_ms: i32) -> Result<Option<u32>, String> {
    loop {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for exactly one event.
        let n = unsafe { libc::epoll_wait(ep, &mut ev, 1, timeout_ms) };
        if n < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("epoll_wait"));
        }
        return Ok((n == 1).then_some(ev.events));
    }
}

/// Run `epoll-lt-*` or `epoll-et-*`.
pub fn run(o: &Opts, dir: Dir, trigger: Trigger) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), true)?;
    let raw = fd.as_raw_fd();
    let mut events = match dir {
        Dir::Rx => libc::EPOLLIN,
        Dir::Tx => libc::EPOLLOUT,
    } as u32;
    if trigger == Trigger::Edge {
        events |= libc::EPOLLET as u32;
    }
    let ep = epoll_for(raw, events)?;
    let timeout = match dir {
        Dir::Rx => -1,
        Dir::Tx => READINESS_SLICE_MS,
    };
    let mut readiness = Readiness::default();
    crate::start(o);
    let (mut wakeups, mut empty, mut max_drain) = (0u64, 0u64, 0u64);
    while !side.done() {
        let Some(got) = epoll_wait_for(ep.as_raw_fd(), timeout)? else {
            readiness.not_ready();
            continue;
        };
        readiness.ready();
        wakeups += 1;
        if got & libc::EPOLLERR as u32 != 0 {
            return Err(format!("epoll reported EPOLLERR (events {got:#x})"));
        }
        match trigger {
            Trigger::Level => {
                if side.once(raw)? == Step::WouldBlock {
                    empty += 1;
                }
            }
            Trigger::Edge => {
                let mut moved = 0u64;
                while !side.done() {
                    match side.once(raw)? {
                        Step::Moved(_) => moved += 1,
                        Step::WouldBlock => break,
                    }
                }
                if moved == 0 {
                    empty += 1;
                }
                max_drain = max_drain.max(moved);
            }
        }
    }
    let mut r = side.report();
    r.num("wakeups", wakeups);
    match trigger {
        Trigger::Level => r.num("spurious", empty),
        Trigger::Edge => r.num("empty_wakeups", empty).num("max_drain", max_drain),
    };
    if dir == Dir::Tx {
        readiness.add_to(&mut r, "epollout");
    }
    Ok(r)
}
