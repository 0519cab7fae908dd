//! `ioctl-stats`: the driver's ioctls and sysfs counters against data that
//! is received but not read.
//!
//! 1. Before `VDEVLAB-READY`: the access checks (`QW_IOC_RESET` on a
//!    read-only file and `QW_IOC_FLUSH` on a write-only one fail with
//!    `EBADF`, an undefined `'q'` ioctl with `ENOTTY`), and the counters
//!    as they start (`stats_start`).
//! 2. `VDEVLAB-READY ioctl-stats`: the host injects exactly `--bytes`
//!    bytes (at most 64 pages, what the driver buffers) and the program
//!    does not read. `FIONREAD` must reach `--bytes` within 10 s (and never
//!    pass it).
//! 3. `QW_IOC_GET_STATS`: `rx_pending` = `--bytes`, `rx_bytes` grew by
//!    `--bytes` (and is at least that), state 0. Every file of
//!    `/sys/class/vdevlab_qw/qwN/` exists and reads as a number; its
//!    `rx_bytes` and `rx_pending` match the ioctl's, `needs_reset` is 0.
//! 4. `QW_IOC_FLUSH`: `FIONREAD` is 0, `flushed_bytes` grew by `--bytes`,
//!    `rx_pending` is 0, and a non-blocking read gets `EAGAIN`.
//! 5. `QW_IOC_RESET` succeeds, `resets` grew by 1, state 0; then
//!    `VDEVLAB-READY ioctl-stats-2`, the host injects 100 bytes, and the
//!    program reads exactly 100 (30 s at most): `sha256_after_reset`.
//!
//! Fields: `bytes`, `fionread`, `fionread_ms`, `stats_start`,
//! `stats_pending`, `sysfs` (every counter file), `stats_flushed`,
//! `stats_reset`, `sha256_after_reset`, `head_after_reset`,
//! `stats_end`.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::{errno_name, poll_one, read_counter, read_fd};
use crate::common::{nap, open_device, Access};
use crate::scenarios::Checked;
use crate::uapi::qw::{
    class_dir, get_stats, QwStats, QW_IOC_FLUSH, QW_IOC_RESET, QW_IOC_UNDEFINED, SYSFS_COUNTERS,
};
use crate::uapi::{fionread, ioctl_plain};
use crate::{ready, Opts};

/// Most bytes the driver holds unread: 64 rx buffers of one page.
pub const MAX_PENDING: u64 = 64 * 4096;
/// The second injection, after the reset.
pub const AFTER_RESET_BYTES: usize = 100;
const FIONREAD_LIMIT: Duration = Duration::from_secs(10);
const READ_LIMIT: Duration = Duration::from_secs(30);

fn expect_errno(c: &mut Checked, what: &str, r: Result<(), i32>, want: i32) {
    let got = match r {
        Ok(()) => "success".to_string(),
        Err(e) => errno_name(e),
    };
    c.check(r == Err(want), || {
        format!("{what}: {got}, not {}", errno_name(want))
    });
}

fn stats(c: &mut Checked, fd: i32, key: &str) -> Option<QwStats> {
    let st = c.take(get_stats(fd).map_err(|e| format!("{key}: {e}")))?;
    c.report.raw(key, &st.json());
    Some(st)
}

/// Read exactly `n` bytes, waiting with `poll` up to `limit` in all.
pub fn read_exact(fd: i32, n: usize, limit: Duration) -> Result<Vec<u8>, String> {
    let start = Instant::now();
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; n];
    while out.len() < n {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!("only {} of {n} bytes within {limit:?}", out.len()));
        }
        let rev = poll_one(fd, libc::POLLIN, left.as_millis() as i32)?;
        if rev == 0 {
            continue;
        }
        if rev & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Err(format!("poll revents {rev:#x} after {} bytes", out.len()));
        }
        match read_fd(fd, &mut buf[..n - out.len()]) {
            Ok(0) => return Err(format!("read returned 0 after {} bytes", out.len())),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(libc::EAGAIN) => {}
            Err(e) => return Err(format!("read after {} bytes: {}", out.len(), errno_name(e))),
        }
    }
    Ok(out)
}

/// Run `ioctl-stats`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    if o.bytes == 0 || o.bytes > MAX_PENDING {
        return Err(format!(
            "ioctl-stats needs --bytes in 1..={MAX_PENDING} (what the driver holds unread), not {}",
            o.bytes
        ));
    }
    let want = o.bytes;
    // O_NONBLOCK: read_exact polls; the EAGAIN check needs it anyway.
    let fd = open_device(&o.device, Access::ReadWrite, true)?;
    let raw = fd.as_raw_fd();
    let mut c = Checked::new();
    c.report.num("bytes", want);

    check_access(&mut c, o, raw)?;
    let start = stats(&mut c, raw, "stats_start").ok_or("QW_IOC_GET_STATS failed")?;
    if start.rx_pending != 0 {
        c.fail(format!(
            "{} bytes were pending before READY",
            start.rx_pending
        ));
    }

    ready(&o.scenario);
    wait_fionread(&mut c, raw, want);
    if let Some(st) = stats(&mut c, raw, "stats_pending") {
        judge_pending(&mut c, &start, &st, want);
        sysfs_matches(&mut c, &o.device, &st);
    }
    flush(&mut c, raw, &start, want);
    reset(&mut c, raw, &start);

    // The device still works.
    read_after_reset(&mut c, raw, &o.scenario);
    // Nothing more than the 100 bytes came.
    if let Some(st) = stats(&mut c, raw, "stats_end") {
        judge_end(&mut c, &start, &st, want);
    }
    Ok(c)
}

/// The ioctls check the file's access mode: `QW_IOC_RESET` on a read-only
/// file and `QW_IOC_FLUSH` on a write-only one give `EBADF`, and an
/// undefined `'q'` ioctl on `raw` gives `ENOTTY`.
fn check_access(c: &mut Checked, o: &Opts, raw: RawFd) -> Result<(), String> {
    let ro = open_device(&o.device, Access::Read, true)?;
    let wo = open_device(&o.device, Access::Write, true)?;
    expect_errno(
        c,
        "QW_IOC_RESET on a read-only file",
        ioctl_plain(ro.as_raw_fd(), QW_IOC_RESET),
        libc::EBADF,
    );
    expect_errno(
        c,
        "QW_IOC_FLUSH on a write-only file",
        ioctl_plain(wo.as_raw_fd(), QW_IOC_FLUSH),
        libc::EBADF,
    );
    expect_errno(
        c,
        "an undefined 'q' ioctl",
        ioctl_plain(raw, QW_IOC_UNDEFINED),
        libc::ENOTTY,
    );
    Ok(())
}

/// `FIONREAD` must reach `want` within [`FIONREAD_LIMIT`] (the host
/// injects them): `fionread`, `fionread_ms`.
fn wait_fionread(c: &mut Checked, raw: RawFd, want: u64) {
    let t = Instant::now();
    let mut seen = 0;
    loop {
        match fionread(raw) {
            Ok(n) => seen = n,
            Err(e) => {
                c.fail(e);
                break;
            }
        }
        if seen as u64 >= want || t.elapsed() > FIONREAD_LIMIT {
            break;
        }
        nap(Duration::from_millis(10));
    }
    c.report.num("fionread", seen.max(0) as u64);
    c.report.num("fionread_ms", t.elapsed().as_millis() as u64);
    c.check(seen as u64 == want, || {
        format!("FIONREAD {seen}, expected {want} within {FIONREAD_LIMIT:?}")
    });
}

/// With `want` bytes unread: `rx_pending` is `want`, `rx_bytes` grew by
/// `want` since `start`, state 0.
fn judge_pending(c: &mut Checked, start: &QwStats, st: &QwStats, want: u64) {
    c.check(st.rx_pending == want, || {
        format!("rx_pending {} with {want} bytes unread", st.rx_pending)
    });
    c.check(
        st.rx_bytes >= want && st.rx_bytes.wrapping_sub(start.rx_bytes) == want,
        || {
            format!(
                "rx_bytes went from {} to {}, expected +{want}",
                start.rx_bytes, st.rx_bytes
            )
        },
    );
    c.check(st.state == 0, || {
        format!("state {:#x} with data pending", st.state)
    });
}

/// `QW_IOC_FLUSH` drops the `want` unread bytes: `FIONREAD` 0, the
/// counters (`stats_flushed`), and a non-blocking read gets `EAGAIN`.
fn flush(c: &mut Checked, raw: RawFd, start: &QwStats, want: u64) {
    let flushed = ioctl_plain(raw, QW_IOC_FLUSH);
    c.check(flushed.is_ok(), || {
        format!("QW_IOC_FLUSH: {}", errno_name(flushed.err().unwrap_or(0)))
    });
    match fionread(raw) {
        Ok(n) => {
            c.check(n == 0, || format!("FIONREAD {n} after QW_IOC_FLUSH"));
        }
        Err(e) => c.fail(e),
    }
    if let Some(st) = stats(c, raw, "stats_flushed") {
        judge_flushed(c, start, &st, want);
    }
    let mut b = [0u8; 64];
    let r = read_fd(raw, &mut b);
    c.check(r == Err(libc::EAGAIN), || {
        format!(
            "a non-blocking read after the flush: {}",
            match r {
                Ok(n) => format!("returned {n}"),
                Err(e) => errno_name(e),
            }
        )
    });
}

/// After the flush: `flushed_bytes` grew by `want`, nothing pending.
fn judge_flushed(c: &mut Checked, start: &QwStats, st: &QwStats, want: u64) {
    c.check(
        st.flushed_bytes.wrapping_sub(start.flushed_bytes) == want,
        || {
            format!(
                "flushed_bytes went from {} to {}, expected +{want}",
                start.flushed_bytes, st.flushed_bytes
            )
        },
    );
    c.check(st.rx_pending == 0, || {
        format!("rx_pending {} after the flush", st.rx_pending)
    });
}

/// `QW_IOC_RESET` succeeds (`stats_reset`).
fn reset(c: &mut Checked, raw: RawFd, start: &QwStats) {
    let reset = ioctl_plain(raw, QW_IOC_RESET);
    c.check(reset.is_ok(), || {
        format!("QW_IOC_RESET: {}", errno_name(reset.err().unwrap_or(0)))
    });
    if let Some(st) = stats(c, raw, "stats_reset") {
        judge_reset(c, start, &st);
    }
}

/// After the reset: `resets` one more, state 0.
fn judge_reset(c: &mut Checked, start: &QwStats, st: &QwStats) {
    c.check(st.resets == start.resets + 1, || {
        format!(
            "resets went from {} to {}, expected +1",
            start.resets, st.resets
        )
    });
    c.check(st.state == 0, || {
        format!("state {:#x} after the reset", st.state)
    });
}

/// At the end: nothing pending, and `rx_bytes` grew by `want` and the
/// [`AFTER_RESET_BYTES`], no more.
fn judge_end(c: &mut Checked, start: &QwStats, st: &QwStats, want: u64) {
    c.check(st.rx_pending == 0, || {
        format!("rx_pending {} after reading the 100 bytes", st.rx_pending)
    });
    let total = want + AFTER_RESET_BYTES as u64;
    c.check(st.rx_bytes.wrapping_sub(start.rx_bytes) == total, || {
        format!(
            "rx_bytes went from {} to {}, expected +{total} in all",
            start.rx_bytes, st.rx_bytes
        )
    });
}

/// Every sysfs counter exists and parses; `rx_bytes` and `rx_pending`
/// agree with `st` (read just before, with nothing arriving meanwhile).
fn sysfs_matches(c: &mut Checked, device: &str, st: &QwStats) {
    let dir = class_dir(Path::new("/sys"), device);
    let mut fields = Vec::new();
    for name in SYSFS_COUNTERS {
        match read_counter(&dir.join(name)) {
            Ok(v) => {
                fields.push(format!("\"{name}\":{v}"));
                let expect = match *name {
                    "rx_bytes" => Some(st.rx_bytes),
                    "rx_pending" => Some(st.rx_pending),
                    "needs_reset" => Some(0),
                    _ => None,
                };
                if let Some(e) = expect {
                    c.check(v == e, || format!("sysfs {name} {v}, QW_IOC_GET_STATS {e}"));
                }
            }
            Err(e) => c.fail(format!("sysfs counter: {e}")),
        }
    }
    c.report.raw("sysfs", &format!("{{{}}}", fields.join(",")));
}

/// After a reset: announce `<scenario>-2`, read the host's 100 bytes and
/// report their SHA-256 (`sha256_after_reset`) and first bytes.
pub fn read_after_reset(c: &mut Checked, raw: i32, scenario: &str) {
    ready(&format!("{scenario}-2"));
    match read_exact(raw, AFTER_RESET_BYTES, READ_LIMIT) {
        Ok(data) => {
            c.report
                .text("sha256_after_reset", &hex::encode(Sha256::digest(&data)))
                .text(
                    "head_after_reset",
                    &hex::encode(&data[..16.min(data.len())]),
                );
        }
        Err(e) => c.fail(format!("after the reset: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(rx_bytes: u64, rx_pending: u64, flushed_bytes: u64, resets: u64) -> QwStats {
        QwStats {
            rx_bytes,
            rx_pending,
            flushed_bytes,
            resets,
            ..QwStats::default()
        }
    }

    #[test]
    fn a_clean_run_of_counters_passes() {
        let start = at(1000, 0, 50, 2);
        let mut c = Checked::new();
        judge_pending(&mut c, &start, &at(5096, 4096, 50, 2), 4096);
        judge_flushed(&mut c, &start, &at(5096, 0, 4146, 2), 4096);
        judge_reset(&mut c, &start, &at(5096, 0, 4146, 3));
        judge_end(&mut c, &start, &at(5196, 0, 4146, 3), 4096);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
    }

    #[test]
    fn each_counter_that_is_off_is_named() {
        let start = at(1000, 0, 50, 2);
        let mut c = Checked::new();
        let mut pending = at(5000, 4000, 50, 2);
        pending.state = crate::uapi::qw::QW_STATE_NEEDS_RESET;
        judge_pending(&mut c, &start, &pending, 4096);
        assert_eq!(
            c.problems,
            [
                "rx_pending 4000 with 4096 bytes unread",
                "rx_bytes went from 1000 to 5000, expected +4096",
                "state 0x1 with data pending"
            ]
        );
        let mut c = Checked::new();
        judge_flushed(&mut c, &start, &at(5096, 1, 50, 2), 4096);
        judge_reset(&mut c, &start, &at(5096, 0, 50, 2));
        judge_end(&mut c, &start, &at(5296, 7, 50, 3), 4096);
        assert_eq!(
            c.problems,
            [
                "flushed_bytes went from 50 to 50, expected +4096",
                "rx_pending 1 after the flush",
                "resets went from 2 to 2, expected +1",
                "rx_pending 7 after reading the 100 bytes",
                "rx_bytes went from 1000 to 5296, expected +4196 in all"
            ]
        );
    }
}
