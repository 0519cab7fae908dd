//! `needs-reset`: the device declares itself broken (NEEDS_RESET in its
//! config space status word, set by the host's `{"op":"needs_reset"}`)
//! while a reader waits, and the driver must notice on its own: the device
//! then serves no queue and raises no interrupt, so only the driver's
//! periodic read of the status word can find it.
//!
//! 1. Open the device (blocking, read-write); `QW_IOC_GET_STATS` must
//!    answer (so nothing else is touched on a file that is not the qw
//!    driver) with state 0, and sysfs `needs_reset` must read 0.
//! 2. A thread starts a blocking `read()` of 4096 bytes; once it sleeps in
//!    the driver, `VDEVLAB-READY needs-reset`. The host sets NEEDS_RESET
//!    (and injects nothing).
//! 3. The read must fail with `EIO` within 5 s of the marker (`read_ms`).
//!    (If it has not returned after 20 s it is interrupted with a
//!    `SIGUSR1` whose handler does nothing, and reported as such.)
//! 4. While broken: `poll` reports `POLLERR`, a second read and a write
//!    of one byte fail with `EIO` at once, sysfs `needs_reset` reads 1 and
//!    `QW_IOC_GET_STATS` has `QW_STATE_NEEDS_RESET` in `state`.
//! 5. `QW_IOC_RESET` succeeds: state 0, `resets` one more, sysfs
//!    `needs_reset` 0, `poll` without `POLLERR`.
//! 6. `VDEVLAB-READY needs-reset-2`: the host injects 100 bytes, and the
//!    program reads exactly 100 (30 s at most): `sha256_after_reset`.
//!
//! Fields: `stats_start`, `sysfs_start`, `wchan`, `read`, `read_ms`,
//! `poll_broken`, `read_broken`, `write_broken`, `sysfs_broken`,
//! `stats_broken`, `reset`, `stats_reset`, `sysfs_reset`, `poll_reset`,
//! `sha256_after_reset`, `head_after_reset`, `stats_end`.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::{errno_name, last_errno, mask_name, poll_one, read_counter};
use crate::common::{nap, open_device, Access};
use crate::scenarios::ioctl_stats::AFTER_RESET_BYTES;
use crate::scenarios::multi_open::install_interrupter;
use crate::scenarios::Checked;
use crate::uapi::ioctl_plain;
use crate::uapi::qw::{class_dir, get_stats, QwStats, QW_IOC_RESET, QW_STATE_NEEDS_RESET};
use crate::{ready, Opts};

/// How soon after `VDEVLAB-READY` the blocked read must fail.
pub const EIO_LIMIT: Duration = Duration::from_secs(5);
/// How long to wait for the blocked read at all before interrupting it.
const GIVE_UP: Duration = Duration::from_secs(20);
/// What the blocked reader asks for.
const READ_LEN: usize = 4096;

/// What the program saw once the device said NEEDS_RESET.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The blocked read: bytes, or errno; `None` if it never returned.
    pub read: Option<Result<usize, i32>>,
    /// Milliseconds from the marker to the read's return.
    pub read_ms: u64,
    /// `poll` revents for `POLLIN|POLLOUT` with a zero timeout.
    pub revents: Option<i16>,
    /// A second, immediate read.
    pub read_again: Result<usize, i32>,
    /// A write of one byte.
    pub write: Result<usize, i32>,
    /// sysfs `needs_reset`.
    pub sysfs: Option<u64>,
    /// `QW_IOC_GET_STATS` state.
    pub state: Option<u64>,
}

/// An I/O outcome as a result-line value: `EIO`, `returned 5`, ...
pub fn outcome(r: &Result<usize, i32>) -> String {
    match r {
        Ok(n) => format!("returned {n}"),
        Err(e) => errno_name(*e),
    }
}

/// The checks of step 3 and 4 against what was seen: every one that
/// failed, in order.
pub fn broken_problems(b: &Broken) -> Vec<String> {
    let mut p = Vec::new();
    match &b.read {
        None => p.push(format!(
            "the blocked read did not return within {GIVE_UP:?} of VDEVLAB-READY"
        )),
        Some(Err(libc::EIO)) => {
            if b.read_ms > EIO_LIMIT.as_millis() as u64 {
                p.push(format!(
                    "the blocked read failed with EIO after {} ms, not within {EIO_LIMIT:?}",
                    b.read_ms
                ));
            }
        }
        Some(r) => p.push(format!("the blocked read: {}, not EIO", outcome(r))),
    }
    match b.revents {
        Some(rev) if rev & libc::POLLERR != 0 => {}
        Some(rev) => p.push(format!(
            "poll while broken: {}, no POLLERR",
            mask_name(rev as u16 as u32)
        )),
        None => p.push("poll while broken failed".into()),
    }
    if b.read_again != Err(libc::EIO) {
        p.push(format!(
            "a second read while broken: {}, not EIO",
            outcome(&b.read_again)
        ));
    }
    if b.write != Err(libc::EIO) {
        p.push(format!(
            "a write while broken: {}, not EIO",
            outcome(&b.write)
        ));
    }
    match b.sysfs {
        Some(1) => {}
        Some(v) => p.push(format!("sysfs needs_reset {v} while broken, not 1")),
        None => p.push("sysfs needs_reset unreadable while broken".into()),
    }
    match b.state {
        Some(s) if s & QW_STATE_NEEDS_RESET != 0 => {}
        Some(s) => p.push(format!(
            "QW_IOC_GET_STATS state {s:#x} while broken, no QW_STATE_NEEDS_RESET"
        )),
        None => p.push("QW_IOC_GET_STATS failed while broken".into()),
    }
    p
}

fn stats(c: &mut Checked, fd: RawFd, key: &str) -> Option<QwStats> {
    let st = c.take(get_stats(fd).map_err(|e| format!("{key}: {e}")))?;
    c.report.raw(key, &st.json());
    Some(st)
}

/// sysfs `needs_reset` of the device, recorded under `key`.
fn sysfs_needs_reset(c: &mut Checked, device: &str, key: &str) -> Option<u64> {
    let path = class_dir(Path::new("/sys"), device).join("needs_reset");
    let v = c.take(read_counter(&path))?;
    c.report.num(key, v);
    Some(v)
}

/// One raw `read`/`write` call, no `EINTR` retry: bytes or errno.
pub fn io_once(fd: RawFd, buf: &mut [u8], write: bool) -> Result<usize, i32> {
    // SAFETY: `buf` is a live buffer of `buf.len()` bytes, writable for a
    // read; `fd` is open.
    let n = unsafe {
        if write {
            libc::write(fd, buf.as_ptr().cast(), buf.len())
        } else {
            libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
        }
    };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(n as usize)
    }
}

/// The kernel function thread `tid` sleeps in (`/proc/self/task/N/wchan`).
fn wchan(tid: libc::pid_t) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Run `needs-reset`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    let fd = open_device(&o.device, Access::ReadWrite, false)?;
    let raw = fd.as_raw_fd();
    let mut c = Checked::new();

    let start = check_start(&mut c, o, raw)?;
    install_interrupter()?;
    let reader = start_reader(&mut c, raw)?;

    ready(&o.scenario);
    let ready_at = Instant::now();
    let got = reader.wait(ready_at)?;

    let mut b = [0u8; 1];
    let broken = Broken {
        read: got.as_ref().map(|(r, _)| *r),
        read_ms: got.map(|(_, d)| d.as_millis() as u64).unwrap_or(0),
        revents: poll_one(raw, libc::POLLIN | libc::POLLOUT, 0).ok(),
        read_again: io_once(raw, &mut b, false),
        write: io_once(raw, &mut b, true),
        sysfs: sysfs_needs_reset(&mut c, &o.device, "sysfs_broken"),
        state: stats(&mut c, raw, "stats_broken").map(|st| st.state),
    };
    report_broken(&mut c, &broken);
    c.problems.extend(broken_problems(&broken));

    recover(&mut c, o, raw, &start);

    // The device works again.
    crate::scenarios::ioctl_stats::read_after_reset(&mut c, raw, &o.scenario);
    if let Some(st) = stats(&mut c, raw, "stats_end") {
        c.check(st.rx_pending == 0, || {
            format!(
                "rx_pending {} after reading the {AFTER_RESET_BYTES} bytes",
                st.rx_pending
            )
        });
        c.check(st.state == 0, || {
            format!("state {:#x} at the end", st.state)
        });
    }
    Ok(c)
}

/// The counters at the start (`stats_start`, state 0) and sysfs
/// `needs_reset` 0. Not the qw driver (a FIFO on the host): the error
/// stops the run before it touches more.
fn check_start(c: &mut Checked, o: &Opts, raw: RawFd) -> Result<QwStats, String> {
    let start = get_stats(raw)?;
    c.report.raw("stats_start", &start.json());
    c.check(start.state == 0, || {
        format!("state {:#x} before VDEVLAB-READY", start.state)
    });
    if let Some(v) = sysfs_needs_reset(c, &o.device, "sysfs_start") {
        c.check(v == 0, || format!("sysfs needs_reset {v} at the start"));
    }
    Ok(start)
}

/// The blocked read's outcome: bytes or errno, and a time (when it came
/// back, or how long after the marker).
type ReadOutcome<T> = (Result<usize, i32>, T);

/// The blocked reader: a thread in one `read`, which sends its outcome
/// and when it came back.
struct Reader {
    handle: std::thread::JoinHandle<()>,
    done: mpsc::Receiver<ReadOutcome<Instant>>,
}

/// Start the blocked reader on `raw` and wait (5 s at most) until it
/// sleeps in the driver, so that the host's request finds a waiting
/// reader: `wchan`.
fn start_reader(c: &mut Checked, raw: RawFd) -> Result<Reader, String> {
    let (tx, done) = mpsc::channel::<ReadOutcome<Instant>>();
    let (tid_tx, tid_rx) = mpsc::channel::<libc::pid_t>();
    let handle = std::thread::Builder::new()
        .name("needs-reset-rd".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = tid_tx.send(unsafe { libc::gettid() });
            let mut buf = vec![0u8; READ_LEN];
            let r = io_once(raw, &mut buf, false);
            let _ = tx.send((r, Instant::now()));
        })
        .map_err(|e| format!("spawning the reader: {e}"))?;
    let tid = tid_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|e| format!("the reader thread did not start: {e}"))?;
    let t = Instant::now();
    let mut where_ = wchan(tid);
    while where_.is_empty() || where_ == "0" {
        if t.elapsed() > Duration::from_secs(5) {
            break;
        }
        nap(Duration::from_millis(10));
        where_ = wchan(tid);
    }
    c.report.text("wchan", &where_);
    Ok(Reader { handle, done })
}

impl Reader {
    /// The read's outcome and how long after `ready_at` it came, or
    /// `None` if it did not within [`GIVE_UP`]. A reader still waiting is
    /// interrupted (repeatedly: a signal that lands just before the read
    /// starts is lost); the thread is joined either way.
    fn wait(self, ready_at: Instant) -> Result<Option<ReadOutcome<Duration>>, String> {
        let got = match self.done.recv_timeout(GIVE_UP) {
            Ok((r, at)) => Some((r, at.duration_since(ready_at))),
            Err(_) => None,
        };
        while !self.handle.is_finished() {
            // SAFETY: not joined yet, so the pthread_t is valid; SIGUSR1
            // has a handler that does nothing.
            unsafe { libc::pthread_kill(self.handle.as_pthread_t(), libc::SIGUSR1) };
            nap(Duration::from_millis(10));
        }
        self.handle
            .join()
            .map_err(|_| "the reader panicked".to_string())?;
        Ok(got)
    }
}

/// The fields of what was seen while broken: `read`, `read_ms`,
/// `poll_broken`, `read_broken`, `write_broken`.
fn report_broken(c: &mut Checked, broken: &Broken) {
    c.report
        .text(
            "read",
            &broken
                .read
                .as_ref()
                .map_or_else(|| "still waiting".to_string(), outcome),
        )
        .num("read_ms", broken.read_ms)
        .text(
            "poll_broken",
            &broken
                .revents
                .map_or_else(|| "poll failed".into(), |r| mask_name(r as u16 as u32)),
        )
        .text("read_broken", &outcome(&broken.read_again))
        .text("write_broken", &outcome(&broken.write));
}

/// The way out: `QW_IOC_RESET` succeeds, and then the state is 0,
/// `resets` one more than at `start`, sysfs `needs_reset` 0 and `poll`
/// without `POLLERR`/`POLLHUP`.
fn recover(c: &mut Checked, o: &Opts, raw: RawFd, start: &QwStats) {
    let reset = ioctl_plain(raw, QW_IOC_RESET);
    c.report.text(
        "reset",
        &match reset {
            Ok(()) => "ok".to_string(),
            Err(e) => errno_name(e),
        },
    );
    c.check(reset.is_ok(), || {
        format!("QW_IOC_RESET: {}", errno_name(reset.err().unwrap_or(0)))
    });
    if let Some(st) = stats(c, raw, "stats_reset") {
        c.check(st.state == 0, || {
            format!("state {:#x} after QW_IOC_RESET", st.state)
        });
        c.check(st.resets == start.resets + 1, || {
            format!(
                "resets went from {} to {}, expected +1",
                start.resets, st.resets
            )
        });
    }
    if let Some(v) = sysfs_needs_reset(c, &o.device, "sysfs_reset") {
        c.check(v == 0, || {
            format!("sysfs needs_reset {v} after QW_IOC_RESET")
        });
    }
    match poll_one(raw, libc::POLLIN | libc::POLLOUT, 0) {
        Ok(rev) => {
            c.report.text("poll_reset", &mask_name(rev as u16 as u32));
            c.check(rev & (libc::POLLERR | libc::POLLHUP) == 0, || {
                format!("poll after QW_IOC_RESET: {}", mask_name(rev as u16 as u32))
            });
        }
        Err(e) => c.fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Broken {
        Broken {
            read: Some(Err(libc::EIO)),
            read_ms: 700,
            revents: Some(libc::POLLERR | libc::POLLIN | libc::POLLOUT),
            read_again: Err(libc::EIO),
            write: Err(libc::EIO),
            sysfs: Some(1),
            state: Some(QW_STATE_NEEDS_RESET),
        }
    }

    #[test]
    fn what_was_seen_while_broken_is_reported() {
        let mut c = Checked::new();
        report_broken(&mut c, &good());
        let line = crate::checked_result_line("needs-reset", &c.report, &[]);
        assert!(
            line.ends_with(
                "\"read\":\"EIO\",\"read_ms\":700,\"poll_broken\":\"0xd (IN|OUT|ERR)\",\
                 \"read_broken\":\"EIO\",\"write_broken\":\"EIO\"}"
            ),
            "{line}"
        );
        let mut c = Checked::new();
        report_broken(
            &mut c,
            &Broken {
                read: None,
                revents: None,
                ..good()
            },
        );
        assert_eq!(c.report.get("read"), Some("\"still waiting\""));
        assert_eq!(c.report.get("poll_broken"), Some("\"poll failed\""));
    }

    #[test]
    fn a_prompt_eio_with_every_sign_passes() {
        assert_eq!(broken_problems(&good()), Vec::<String>::new());
        // The limit itself is still in time.
        let b = Broken {
            read_ms: EIO_LIMIT.as_millis() as u64,
            ..good()
        };
        assert!(broken_problems(&b).is_empty());
    }

    #[test]
    fn a_late_or_wrong_read_fails() {
        let late = Broken {
            read_ms: 5001,
            ..good()
        };
        let p = broken_problems(&late);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("after 5001 ms"), "{p:?}");

        let data = Broken {
            read: Some(Ok(3)),
            ..good()
        };
        assert!(broken_problems(&data)[0].contains("returned 3, not EIO"));

        let intr = Broken {
            read: Some(Err(libc::EINTR)),
            ..good()
        };
        assert!(broken_problems(&intr)[0].contains("EINTR, not EIO"));

        let never = Broken {
            read: None,
            ..good()
        };
        assert!(broken_problems(&never)[0].contains("did not return"));
    }

    #[test]
    fn every_missing_sign_is_reported() {
        let b = Broken {
            revents: Some(libc::POLLIN),
            read_again: Err(libc::EAGAIN),
            write: Ok(1),
            sysfs: Some(0),
            state: Some(0),
            ..good()
        };
        let p = broken_problems(&b);
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p[0].contains("no POLLERR"), "{p:?}");
        assert!(p[1].contains("EAGAIN"), "{p:?}");
        assert!(p[2].contains("returned 1"), "{p:?}");
        assert!(p[3].contains("needs_reset 0"), "{p:?}");
        assert!(p[4].contains("no QW_STATE_NEEDS_RESET"), "{p:?}");

        let none = Broken {
            revents: None,
            sysfs: None,
            state: None,
            ..good()
        };
        assert_eq!(broken_problems(&none).len(), 3);
    }

    #[test]
    fn outcomes_read_as_errno_names() {
        assert_eq!(outcome(&Err(libc::EIO)), "EIO");
        assert_eq!(outcome(&Ok(0)), "returned 0");
    }
}
