//! `poll`: `O_NONBLOCK`, `poll()` for `POLLIN` (rx) or `POLLOUT` (tx), then
//! one read/write per wakeup. `POLLERR`/`POLLNVAL` end the run; on
//! `POLLHUP` the read is tried anyway, which reports what is wrong.
//!
//! A writer polls in slices of [`READINESS_SLICE_MS`] and reports how many
//! found the device not writable (`pollout_false`), how often POLLOUT came
//! back after them (`pollout_again`) and the longest unwritable stretch
//! (`max_unready_ms`): the evidence that it waited on a full ring.

use std::os::fd::AsRawFd;

use crate::common::{interrupted, open_device, os_err, Readiness, Side, Step, READINESS_SLICE_MS};
use crate::{Dir, Opts, Report};

/// Run `poll-rx` or `poll-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), true)?;
    let raw = fd.as_raw_fd();
    let events = side.poll_events();
    let timeout = match dir {
        Dir::Rx => -1,
        Dir::Tx => READINESS_SLICE_MS,
    };
    let mut readiness = Readiness::default();
    crate::start(o);
    let (mut wakeups, mut spurious, mut hups) = (0u64, 0u64, 0u64);
    while !side.done() {
        let mut p = libc::pollfd {
            fd: raw,
            events,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd; -1 waits forever.
        let n = unsafe { libc::poll(&mut p, 1, timeout) };
        if n < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("poll"));
        }
        if n == 0 {
            readiness.not_ready();
            continue;
        }
        if p.revents & events != 0 {
            readiness.ready();
        }
        wakeups += 1;
        if p.revents & libc::POLLNVAL != 0 {
            return Err("poll reported POLLNVAL".into());
        }
        if p.revents & libc::POLLERR != 0 {
            return Err(format!("poll reported POLLERR (revents {:#x})", p.revents));
        }
        if p.revents & libc::POLLHUP != 0 {
            hups += 1;
        }
        if side.once(raw)? == Step::WouldBlock {
            spurious += 1;
        }
    }
    let mut r = side.report();
    r.num("wakeups", wakeups)
        .num("spurious", spurious)
        .num("pollhup", hups);
    if dir == Dir::Tx {
        readiness.add_to(&mut r, "pollout");
    }
    Ok(r)
}
