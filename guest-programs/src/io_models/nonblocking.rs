//! `nonblocking`: `O_NONBLOCK` and a retry loop. On `EAGAIN` the program
//! backs off with a short `nanosleep` (doubling from 50 us up to 2 ms, reset
//! after progress) instead of spinning.

use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::common::{nap, open_device, Side, Step};
use crate::{Dir, Opts, Report};

const FIRST_BACKOFF: Duration = Duration::from_micros(50);
const MAX_BACKOFF: Duration = Duration::from_millis(2);

/// Run `nonblocking-rx` or `nonblocking-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), true)?;
    crate::start(o);
    let mut eagain = 0u64;
    let mut backoff = FIRST_BACKOFF;
    while !side.done() {
        match side.once(fd.as_raw_fd())? {
            Step::Moved(_) => backoff = FIRST_BACKOFF,
            Step::WouldBlock => {
                eagain += 1;
                nap(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let mut r = side.report();
    r.num("eagain", eagain);
    Ok(r)
}
