//! `blocking`: plain `read()`/`write()` on a blocking descriptor. A reader
//! sleeps in the driver until data arrives and may get less than it asked
//! for; a writer sleeps while the device's ring is full.

use std::os::fd::AsRawFd;

use crate::common::{open_device, Side, Step};
use crate::{Dir, Opts, Report};

/// Run `blocking-rx` or `blocking-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), false)?;
    crate::start(o);
    while !side.done() {
        if side.once(fd.as_raw_fd())? == Step::WouldBlock {
            return Err("EAGAIN from a blocking descriptor".into());
        }
    }
    Ok(side.report())
}
