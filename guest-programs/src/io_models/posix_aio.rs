//! `posix-aio`: glibc's POSIX AIO (helper threads doing `read`/`write`;
//! glibc falls back from `pread` to `read` on `ESPIPE`, so stream devices
//! work). The descriptor is blocking, as the helper threads expect.
//!
//! Two steps over one stream:
//! 1. the first half (`--bytes / 2`): one `aio_read`/`aio_write` at a time,
//!    waited for with `aio_suspend`, collected with `aio_error` and
//!    `aio_return`;
//! 2. the rest: `lio_listio(LIO_WAIT)` batches of up to four chunk-sized
//!    requests.
//!
//! Step 2 relies on glibc running the requests of one descriptor one after
//! another in list order (POSIX does not promise an order). Reads stay
//! correct with partial results: each takes the bytes that follow the
//! previous one's. A short write followed by more writes of the same batch
//! would break the stream, so that is reported as an error (a blocking
//! write to the qw device or a pipe is not short unless interrupted).

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::common::{nap, open_device, Access, Rx, Tx};
use crate::{ready, Opts, Report};

/// Requests per `lio_listio` call.
const LIO_BATCH: usize = 4;

fn new_cb(fd: RawFd, buf: *mut libc::c_void, len: usize, op: libc::c_int) -> libc::aiocb {
    // SAFETY: aiocb is plain data; all-zero is its documented initial state.
    let mut cb: libc::aiocb = unsafe { std::mem::zeroed() };
    cb.aio_fildes = fd;
    cb.aio_buf = buf;
    cb.aio_nbytes = len;
    cb.aio_offset = 0;
    cb.aio_lio_opcode = op;
    cb.aio_sigevent.sigev_notify = libc::SIGEV_NONE;
    cb
}

/// Wait until the request of `cb` completed and return its result. Never
/// returns while the request is still in flight, so its buffers may be
/// reused or freed afterwards.
fn finish(cb: *mut libc::aiocb, suspends: &mut u64) -> Result<usize, String> {
    loop {
        // SAFETY: `cb` points to a live aiocb that was submitted.
        let e = unsafe { libc::aio_error(cb) };
        if e == libc::EINPROGRESS {
            *suspends += 1;
            let list = [cb as *const libc::aiocb];
            // SAFETY: a list of one live aiocb; null timeout waits forever.
            if unsafe { libc::aio_suspend(list.as_ptr(), 1, std::ptr::null()) } < 0
                && !crate::common::interrupted()
                && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
            {
                // Unexpected: keep polling aio_error() instead, slowly.
                nap(Duration::from_millis(1));
            }
            continue;
        }
        if e < 0 {
            return Err(crate::common::os_err("aio_error"));
        }
        // SAFETY: the request completed (aio_error is not EINPROGRESS);
        // aio_return is called exactly once for it.
        let ret = unsafe { libc::aio_return(cb) };
        if e != 0 {
            return Err(crate::common::errno_err("request failed", e));
        }
        return usize::try_from(ret).map_err(|_| format!("aio_return {ret} with aio_error 0"));
    }
}

/// Submit `cbs` with `lio_listio(LIO_WAIT)` and collect every result in list
/// order (waiting for each, whatever lio_listio said).
fn lio_batch(cbs: &mut [libc::aiocb], suspends: &mut u64) -> Result<Vec<usize>, String> {
    let list: Vec<*mut libc::aiocb> = cbs.iter_mut().map(|c| c as *mut _).collect();
    // SAFETY: `list` holds live aiocbs whose buffers stay valid until each
    // request finished (finish() below waits for all); no sigevent.
    let r = unsafe {
        libc::lio_listio(
            libc::LIO_WAIT,
            list.as_ptr(),
            list.len() as libc::c_int,
            std::ptr::null_mut(),
        )
    };
    let submit = (r < 0).then(std::io::Error::last_os_error);
    if let Some(e) = &submit {
        // EIO: some request failed (see below); EINTR: the wait was
        // interrupted. Anything else: nothing was queued.
        if !matches!(e.raw_os_error(), Some(libc::EIO | libc::EINTR)) {
            return Err(format!("lio_listio: {e}"));
        }
    }
    let results: Vec<_> = list.iter().map(|&cb| finish(cb, suspends)).collect();
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.map_err(|e| format!("lio_listio request {i}: {e}")))
        .collect()
}

/// Run `posix-aio-rx`.
pub fn rx(o: &Opts) -> Result<Report, String> {
    let mut rx = Rx::new(o);
    let fd = open_device(&o.device, Access::Read, false)?;
    let raw = fd.as_raw_fd();
    ready(&o.scenario);
    let split = o.bytes / 2;
    let (mut aio_ops, mut batches, mut lio_ops, mut suspends) = (0u64, 0u64, 0u64, 0u64);

    let mut buf = vec![0u8; o.chunk];
    while rx.total() < split {
        let len = rx.next_len_until(split);
        let mut cb = new_cb(raw, buf.as_mut_ptr().cast(), len, libc::LIO_READ);
        let p: *mut libc::aiocb = &mut cb;
        // SAFETY: `cb` and `buf` outlive the request: finish() waits for it.
        if unsafe { libc::aio_read(p) } < 0 {
            return Err(crate::common::os_err("aio_read"));
        }
        let n = finish(p, &mut suspends)
            .map_err(|e| format!("aio_read after {} bytes: {e}", rx.total()))?;
        rx.accept(&buf[..n])?;
        aio_ops += 1;
    }

    let mut bufs = vec![vec![0u8; o.chunk]; LIO_BATCH];
    while !rx.done() {
        let mut planned = 0u64;
        let mut cbs = Vec::with_capacity(LIO_BATCH);
        for b in bufs.iter_mut() {
            let len = (rx.remaining() - planned).min(o.chunk as u64) as usize;
            if len == 0 {
                break;
            }
            planned += len as u64;
            cbs.push(new_cb(raw, b.as_mut_ptr().cast(), len, libc::LIO_READ));
        }
        let at = rx.total();
        let results =
            lio_batch(&mut cbs, &mut suspends).map_err(|e| format!("after {at} bytes: {e}"))?;
        batches += 1;
        for (n, b) in results.into_iter().zip(&bufs) {
            rx.accept(&b[..n])?;
            lio_ops += 1;
        }
    }

    let mut r = rx.report();
    r.num("aio_ops", aio_ops)
        .num("lio_batches", batches)
        .num("lio_ops", lio_ops)
        .num("suspends", suspends);
    Ok(r)
}

/// Run `posix-aio-tx`.
pub fn tx(o: &Opts) -> Result<Report, String> {
    let mut tx = Tx::new(o)?;
    let fd = open_device(&o.device, Access::Write, false)?;
    let raw = fd.as_raw_fd();
    crate::start(o);
    let split = tx.remaining() / 2;
    let (mut aio_ops, mut batches, mut lio_ops, mut suspends) = (0u64, 0u64, 0u64, 0u64);

    while tx.sent() < split {
        let chunk = tx.next_until(split);
        let mut cb = new_cb(
            raw,
            chunk.as_ptr().cast_mut().cast(),
            chunk.len(),
            libc::LIO_WRITE,
        );
        let p: *mut libc::aiocb = &mut cb;
        let t0 = Instant::now();
        // SAFETY: `cb` and the pattern bytes outlive the request: finish()
        // waits for it; glibc only reads the buffer of a write.
        if unsafe { libc::aio_write(p) } < 0 {
            return Err(crate::common::os_err("aio_write"));
        }
        let n = finish(p, &mut suspends)
            .map_err(|e| format!("aio_write after {} bytes: {e}", tx.sent()))?;
        tx.latency(t0.elapsed());
        tx.advance(n)?;
        aio_ops += 1;
    }

    while !tx.done() {
        let rest = tx.rest();
        let mut cbs = Vec::with_capacity(LIO_BATCH);
        let mut lens = Vec::with_capacity(LIO_BATCH);
        for piece in rest.chunks(o.chunk).take(LIO_BATCH) {
            lens.push(piece.len());
            cbs.push(new_cb(
                raw,
                piece.as_ptr().cast_mut().cast(),
                piece.len(),
                libc::LIO_WRITE,
            ));
        }
        let at = tx.sent();
        let t0 = Instant::now();
        let results =
            lio_batch(&mut cbs, &mut suspends).map_err(|e| format!("after {at} bytes: {e}"))?;
        tx.latency(t0.elapsed());
        batches += 1;
        let last = results.len() - 1;
        for (i, (n, len)) in results.into_iter().zip(lens).enumerate() {
            if n < len && i < last {
                return Err(format!(
                    "short write ({n} of {len} bytes) at request {i} of a lio_listio batch after \
                     {at} bytes: the later writes of the batch already went out, the stream is broken"
                ));
            }
            tx.advance(n)?;
            lio_ops += 1;
        }
    }

    let mut r = tx.report();
    r.num("aio_ops", aio_ops)
        .num("lio_batches", batches)
        .num("lio_ops", lio_ops)
        .num("suspends", suspends);
    Ok(r)
}
