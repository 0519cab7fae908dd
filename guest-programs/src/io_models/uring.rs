//! `io-uring`: the `io-uring` crate, one request in flight at a time, on a
//! blocking descriptor (io_uring handles the waiting; on a file without
//! `FMODE_NOWAIT` it runs the request in an io-wq worker, and its generic
//! path also serves drivers that have only `read`/`write`).
//!
//! Two steps over one stream:
//! 1. the first half (`--bytes / 2`): `IORING_OP_READ`/`IORING_OP_WRITE`
//!    SQEs, each waited for with `io_uring_enter`;
//! 2. the rest: `IORING_OP_POLL_ADD` for `POLLIN`/`POLLOUT` first, then the
//!    read/write once the device is ready.
//!
//! Offsets are -1 ("the current position"), the right thing for a stream.

use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::common::{errno_err, open_device, Access, Rx, Tx};
use crate::{ready, Dir, Opts, Report};

const IO_TAG: u64 = 1;
const POLL_TAG: u64 = 2;

/// Counters of one run.
#[derive(Debug, Default)]
struct Counts {
    plain_ops: u64,
    poll_adds: u64,
    poll_ops: u64,
    poll_masks: u32,
}

impl Counts {
    fn add_to(&self, r: &mut Report) {
        r.num("uring_ops", self.plain_ops)
            .num("poll_adds", self.poll_adds)
            .num("poll_ops", self.poll_ops)
            .text("poll_masks", &format!("{:#x}", self.poll_masks));
    }
}

/// Queue `entry` and wait for its completion.
///
/// # Safety
/// Every buffer `entry` refers to must stay valid until the completion
/// arrives, or for good if this returns an error (the request may still be
/// in flight then).
pub(crate) unsafe fn run_one(
    ring: &mut IoUring,
    entry: &squeue::Entry,
    tag: u64,
) -> Result<i32, String> {
    // SAFETY: the caller keeps the entry's buffers valid (this fn's contract).
    unsafe { ring.submission().push(entry) }.map_err(|_| "submission queue full".to_string())?;
    let cqe: cqueue::Entry = loop {
        if let Some(c) = ring.completion().next() {
            break c;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("io_uring_enter: {e}")),
        }
    };
    if cqe.user_data() != tag {
        return Err(format!(
            "completion for request {}, expected {tag}",
            cqe.user_data()
        ));
    }
    Ok(cqe.result())
}

/// Poll-add for `events`; the mask, or an error for POLLERR/POLLNVAL.
fn poll_ready(ring: &mut IoUring, fd: i32, events: i16, c: &mut Counts) -> Result<(), String> {
    let entry = opcode::PollAdd::new(types::Fd(fd), events as u32)
        .build()
        .user_data(POLL_TAG);
    // SAFETY: a poll request refers to no buffer.
    let res = unsafe { run_one(ring, &entry, POLL_TAG) }?;
    if res < 0 {
        return Err(errno_err("IORING_OP_POLL_ADD", -res));
    }
    c.poll_adds += 1;
    c.poll_masks |= res as u32;
    if res & i32::from(libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(format!("IORING_OP_POLL_ADD returned mask {res:#x}"));
    }
    Ok(())
}

fn rx_transfer(
    ring: &mut IoUring,
    fd: i32,
    rx: &mut Rx,
    buf: &mut [u8],
    split: u64,
    c: &mut Counts,
) -> Result<(), String> {
    while !rx.done() {
        let step2 = rx.total() >= split;
        if step2 {
            poll_ready(ring, fd, libc::POLLIN, c)?;
        }
        let len = if step2 {
            rx.next_len()
        } else {
            rx.next_len_until(split)
        };
        let entry = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len as u32)
            .offset(u64::MAX)
            .build()
            .user_data(IO_TAG);
        // SAFETY: `buf` holds `len` bytes and outlives the request; on an
        // error the caller leaks it.
        let res = unsafe { run_one(ring, &entry, IO_TAG) }?;
        if res < 0 {
            return Err(errno_err(&format!("read after {} bytes", rx.total()), -res));
        }
        rx.accept(&buf[..res as usize])?;
        if step2 {
            c.poll_ops += 1;
        } else {
            c.plain_ops += 1;
        }
    }
    Ok(())
}

fn tx_transfer(
    ring: &mut IoUring,
    fd: i32,
    tx: &mut Tx,
    split: usize,
    c: &mut Counts,
) -> Result<(), String> {
    while !tx.done() {
        let step2 = tx.sent() >= split;
        // From the request's start (its POLL_ADD in step 2) to its end.
        let t0 = std::time::Instant::now();
        if step2 {
            poll_ready(ring, fd, libc::POLLOUT, c)?;
        }
        let chunk = if step2 {
            tx.next()
        } else {
            tx.next_until(split)
        };
        let entry = opcode::Write::new(types::Fd(fd), chunk.as_ptr(), chunk.len() as u32)
            .offset(u64::MAX)
            .build()
            .user_data(IO_TAG);
        // SAFETY: the pattern bytes outlive the request; on an error the
        // caller leaks them.
        let res = unsafe { run_one(ring, &entry, IO_TAG) }?;
        tx.latency(t0.elapsed());
        if res < 0 {
            return Err(errno_err(&format!("write after {} bytes", tx.sent()), -res));
        }
        tx.advance(res as usize)?;
        if step2 {
            c.poll_ops += 1;
        } else {
            c.plain_ops += 1;
        }
    }
    Ok(())
}

fn new_ring() -> Result<IoUring, String> {
    IoUring::new(8).map_err(|e| format!("io_uring_setup: {e}"))
}

/// Run `io-uring-rx` or `io-uring-tx`.
pub fn run(o: &Opts, dir: Dir) -> Result<Report, String> {
    let mut c = Counts::default();
    match dir {
        Dir::Rx => {
            let mut rx = Rx::new(o);
            let fd = open_device(&o.device, Access::Read, false)?;
            let mut ring = new_ring()?;
            let mut buf = vec![0u8; o.chunk];
            ready(&o.scenario);
            let res = rx_transfer(
                &mut ring,
                fd.as_raw_fd(),
                &mut rx,
                &mut buf,
                o.bytes / 2,
                &mut c,
            );
            if let Err(e) = res {
                // A request may still be in flight: keep its buffer and the
                // ring (and so the request) alive until the process exits.
                std::mem::forget(buf);
                std::mem::forget(ring);
                return Err(e);
            }
            let mut r = rx.report();
            c.add_to(&mut r);
            Ok(r)
        }
        Dir::Tx => {
            let mut tx = Tx::new(o)?;
            let fd = open_device(&o.device, Access::Write, false)?;
            let mut ring = new_ring()?;
            crate::start(o);
            let split = tx.remaining() / 2;
            if let Err(e) = tx_transfer(&mut ring, fd.as_raw_fd(), &mut tx, split, &mut c) {
                std::mem::forget(tx);
                std::mem::forget(ring);
                return Err(e);
            }
            let mut r = tx.report();
            c.add_to(&mut r);
            Ok(r)
        }
    }
}
