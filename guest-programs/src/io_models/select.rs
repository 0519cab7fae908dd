//! `select`: `O_NONBLOCK`, `select()` for readability (rx) or writability
//! (tx), then one read/write per wakeup. A wakeup after which the call
//! still gets `EAGAIN` is counted as `spurious`.

use std::os::fd::AsRawFd;

use crate::common::{interrupted, open_device, os_err, Readiness, Side, Step, READINESS_SLICE_MS};
use crate::{Dir, Opts, Report};

/// Wait until `fd` is ready for `dir` (a writer in slices of
/// [`READINESS_SLICE_MS`], each unready one counted in `readiness`).
fn wait(fd: libc::c_int, dir: Dir, readiness: &mut Readiness) -> Result<(), String> {
    loop {
        // SAFETY: fd_set is plain data; all-zero is a valid (empty) set.
        let mut set: libc::fd_set = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid fd_set and `fd` < FD_SETSIZE (checked
        // by the caller).
        unsafe {
            libc::FD_ZERO(&mut set);
            libc::FD_SET(fd, &mut set);
        }
        let (r, w): (*mut libc::fd_set, *mut libc::fd_set) = match dir {
            Dir::Rx => (&mut set, std::ptr::null_mut()),
            Dir::Tx => (std::ptr::null_mut(), &mut set),
        };
        let mut slice = libc::timeval {
            tv_sec: 0,
            tv_usec: libc::suseconds_t::from(READINESS_SLICE_MS) * 1000,
        };
        let timeout: *mut libc::timeval = match dir {
            Dir::Rx => std::ptr::null_mut(),
            Dir::Tx => &mut slice,
        };
        // SAFETY: the sets are valid or null; a null timeout waits forever.
        let n = unsafe { libc::select(fd + 1, r, w, std::ptr::null_mut(), timeout) };
        if n < 0 {
            if interrupted() {
                continue;
            }
            return Err(os_err("select"));
        }
        // SAFETY: `set` is a valid fd_set that select() filled in.
        if n > 0 && unsafe { libc::FD_ISSET(fd, &set) } {
            readiness.ready();
            return Ok(());
        }
        readiness.not_ready();
    }
}

/// Run `select-rx` or `select-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut side = Side::new(o, dir)?;
    let fd = open_device(&o.device, side.access(), true)?;
    let raw = fd.as_raw_fd();
    if raw >= libc::FD_SETSIZE as libc::c_int {
        return Err(format!("descriptor {raw} does not fit an fd_set"));
    }
    let mut readiness = Readiness::default();
    crate::start(o);
    let (mut wakeups, mut spurious) = (0u64, 0u64);
    while !side.done() {
        wait(raw, dir, &mut readiness)?;
        wakeups += 1;
        if side.once(raw)? == Step::WouldBlock {
            spurious += 1;
        }
    }
    let mut r = side.report();
    r.num("wakeups", wakeups).num("spurious", spurious);
    if dir == Dir::Tx {
        readiness.add_to(&mut r, "writable");
    }
    Ok(r)
}
