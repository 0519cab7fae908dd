//! `multi-open`: four readers, each with its own descriptor of the device,
//! share one stream: every byte must go to exactly one of them.
//!
//! 1. Four reader threads open the device (blocking) and read up to
//!    `--chunk` bytes at a time; `VDEVLAB-READY multi-open`; the host
//!    injects `pattern(--seed, --bytes)`.
//! 2. When the readers' total reaches `--bytes` (120 s at most) the program
//!    stops them (each still asleep in `read()` is interrupted by a
//!    `SIGUSR1` whose handler does nothing, installed without
//!    `SA_RESTART`, so its read fails with `EINTR`).
//! 3. The total must be exactly `--bytes`, no reader may have got an
//!    error, and the bytes, whatever reader got them, must be those of the
//!    pattern: the byte-value histogram of everything read equals the
//!    pattern's (order aside, which the readers' interleaving loses).
//! 4. With the four descriptors still open, one more reader and one writer
//!    open the device: `FIONREAD` is 0 and a non-blocking read gets
//!    `EAGAIN` (nothing is left over), and the writer writes the first 64
//!    bytes of the pattern (the host may capture and compare them).
//!
//! Fields: `bytes` (total), `reader_bytes` and `reader_reads` (arrays, one
//! entry per reader), `readers_with_data`, `histogram_ok`, `leftover`
//! (`FIONREAD` then), `extra_read`, `tx_bytes`, `tx_sha256`.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::common::{errno_name, last_errno, read_fd};
use crate::common::{nap, open_device, Access};
use crate::scenarios::Checked;
use crate::uapi::fionread;
use crate::{pattern, ready, Opts};

/// How many readers share the device.
pub const READERS: usize = 4;
/// What the extra writer writes: the first bytes of the pattern.
pub const TX_BYTES: usize = 64;
const LIMIT: Duration = Duration::from_secs(120);

/// What one reader saw.
#[derive(Debug)]
struct ReaderResult {
    bytes: u64,
    reads: u64,
    histogram: Box<[u64; 256]>,
    error: Option<String>,
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// `SIGUSR1` interrupts a blocked `read()` with `EINTR`: a handler that
/// does nothing, without `SA_RESTART`.
pub fn install_interrupter() -> Result<(), String> {
    // SAFETY: sigaction is plain data; all-zero is a valid start.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
    sa.sa_flags = 0;
    // SAFETY: `sa.sa_mask` is a valid sigset to clear.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: a valid sigaction for SIGUSR1; the old one is not wanted.
    if unsafe { libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) } < 0 {
        return Err(crate::common::os_err("sigaction(SIGUSR1)"));
    }
    Ok(())
}

fn histogram(data: &[u8]) -> Box<[u64; 256]> {
    let mut h = Box::new([0u64; 256]);
    for &b in data {
        h[b as usize] += 1;
    }
    h
}

fn reader(
    fd: OwnedFd,
    chunk: usize,
    want: u64,
    total: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> ReaderResult {
    let mut r = ReaderResult {
        bytes: 0,
        reads: 0,
        histogram: Box::new([0; 256]),
        error: None,
    };
    let mut buf = vec![0u8; chunk];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: `buf` is a live, writable buffer of `chunk` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), chunk) };
        if n < 0 {
            let e = last_errno();
            if e == libc::EINTR {
                continue;
            }
            r.error = Some(format!("read after {} bytes: {}", r.bytes, errno_name(e)));
            break;
        }
        if n == 0 {
            r.error = Some(format!("read returned 0 after {} bytes", r.bytes));
            break;
        }
        for &b in &buf[..n as usize] {
            r.histogram[b as usize] += 1;
        }
        r.bytes += n as u64;
        r.reads += 1;
        if total.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= want {
            stop.store(true, Ordering::SeqCst);
        }
    }
    r
}

fn json_array(v: impl Iterator<Item = u64>) -> String {
    format!(
        "[{}]",
        v.map(|x| x.to_string()).collect::<Vec<_>>().join(",")
    )
}

/// Run `multi-open`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    install_interrupter()?;
    let readers = Readers::start(o)?;
    ready(&o.scenario);

    let mut c = Checked::new();
    let results = readers.wait_and_stop(&mut c, o.bytes)?;
    judge_readers(&mut c, o, &results)?;
    check_more_openers(&mut c, o);
    Ok(c)
}

/// The reader threads and what they share: the bytes read in all, and
/// the flag that stops them.
struct Readers {
    total: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<ReaderResult>>,
}

impl Readers {
    /// Open the device [`READERS`] times and start a reader on each; they
    /// stop themselves once `--bytes` arrived in all.
    fn start(o: &Opts) -> Result<Self, String> {
        let fds = (0..READERS)
            .map(|_| open_device(&o.device, Access::Read, false))
            .collect::<Result<Vec<_>, _>>()?;
        let total = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(o.bytes == 0));
        let mut handles = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            let (t, s, chunk, want) = (Arc::clone(&total), Arc::clone(&stop), o.chunk, o.bytes);
            let h = std::thread::Builder::new()
                .name(format!("qw-reader-{i}"))
                .spawn(move || reader(fd, chunk, want, t, s))
                .map_err(|e| format!("spawning reader {i}: {e}"))?;
            handles.push(h);
        }
        Ok(Self {
            total,
            stop,
            handles,
        })
    }

    /// Wait until the readers have `want` bytes (or one ends, or
    /// [`LIMIT`] passes: a problem), then stop them, waking those still
    /// asleep in `read()`, and collect what each saw.
    fn wait_and_stop(self, c: &mut Checked, want: u64) -> Result<Vec<ReaderResult>, String> {
        let Self {
            total,
            stop,
            handles,
        } = self;
        let start = Instant::now();
        while !stop.load(Ordering::SeqCst)
            && !handles.iter().any(|h| h.is_finished())
            && start.elapsed() < LIMIT
        {
            nap(Duration::from_millis(5));
        }
        if !stop.load(Ordering::SeqCst) && start.elapsed() >= LIMIT {
            c.fail(format!(
                "only {} of {} bytes within {LIMIT:?}",
                total.load(Ordering::SeqCst),
                want
            ));
        }
        stop.store(true, Ordering::SeqCst);
        // Wake the readers still asleep in read(); repeat, as a signal that
        // lands just before a read starts is lost.
        while handles.iter().any(|h| !h.is_finished()) {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                // SAFETY: the thread has not been joined, so its pthread_t is
                // valid; SIGUSR1 has a handler that does nothing.
                unsafe { libc::pthread_kill(h.as_pthread_t(), libc::SIGUSR1) };
            }
            nap(Duration::from_millis(10));
        }
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a reader panicked".to_string()))
            .collect()
    }
}

/// The readers together got exactly `--bytes`, none failed, and the
/// bytes are the pattern's (same byte histogram; the order is lost
/// between readers).
fn judge_readers(c: &mut Checked, o: &Opts, results: &[ReaderResult]) -> Result<(), String> {
    let sum: u64 = results.iter().map(|r| r.bytes).sum();
    c.report
        .num("bytes", sum)
        .raw("reader_bytes", &json_array(results.iter().map(|r| r.bytes)))
        .raw("reader_reads", &json_array(results.iter().map(|r| r.reads)))
        .num(
            "readers_with_data",
            results.iter().filter(|r| r.bytes > 0).count() as u64,
        );
    c.check(sum == o.bytes, || {
        format!("the readers got {sum} bytes in all, expected {}", o.bytes)
    });
    for (i, r) in results.iter().enumerate() {
        if let Some(e) = &r.error {
            c.fail(format!("reader {i}: {e}"));
        }
    }
    let mut hist = [0u64; 256];
    for r in results {
        for (h, x) in hist.iter_mut().zip(r.histogram.iter()) {
            *h += x;
        }
    }
    let len = usize::try_from(o.bytes).map_err(|_| "--bytes too large".to_string())?;
    let expect = histogram(&pattern(o.seed, len));
    let hist_ok = hist == *expect;
    c.report
        .raw("histogram_ok", if hist_ok { "true" } else { "false" });
    c.check(hist_ok, || {
        "the bytes read are not those of the pattern (byte histogram differs)".into()
    });
    Ok(())
}

/// One more reader and a writer, with the four still open: nothing is
/// left over (`FIONREAD` 0, `EAGAIN`), and the writer writes the first
/// [`TX_BYTES`] of the pattern.
fn check_more_openers(c: &mut Checked, o: &Opts) {
    let (rfd, wfd) = match (
        open_device(&o.device, Access::Read, true),
        open_device(&o.device, Access::Write, false),
    ) {
        (Ok(rfd), Ok(wfd)) => (rfd, wfd),
        (r, w) => {
            if let Err(e) = r {
                c.fail(format!("a fifth opener: {e}"));
            }
            if let Err(e) = w {
                c.fail(format!("a writer next to the readers: {e}"));
            }
            return;
        }
    };
    match fionread(rfd.as_raw_fd()) {
        Ok(n) => {
            c.report.num("leftover", n.max(0) as u64);
            c.check(n == 0, || format!("FIONREAD {n} after all bytes were read"));
        }
        Err(e) => c.fail(e),
    }
    let mut b = [0u8; 16];
    let r = read_fd(rfd.as_raw_fd(), &mut b);
    let text = match r {
        Ok(n) => format!("returned {n}"),
        Err(e) => errno_name(e),
    };
    c.report.text("extra_read", &text);
    c.check(r == Err(libc::EAGAIN), || {
        format!("a non-blocking read by a fifth opener: {text}, not EAGAIN")
    });
    let data = pattern(o.seed, TX_BYTES);
    // SAFETY: `data` is a live buffer of TX_BYTES bytes.
    let n = unsafe { libc::write(wfd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    if n == TX_BYTES as isize {
        c.report
            .num("tx_bytes", TX_BYTES as u64)
            .text("tx_sha256", &hex::encode(Sha256::digest(&data)));
    } else {
        c.fail(format!(
            "write of {TX_BYTES} bytes by the extra writer: {}",
            if n < 0 {
                errno_name(last_errno())
            } else {
                format!("returned {n}")
            }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_and_arrays() {
        let h = histogram(&[0, 1, 1, 255]);
        assert_eq!((h[0], h[1], h[2], h[255]), (1, 2, 0, 1));
        assert_eq!(json_array([1u64, 2, 3].into_iter()), "[1,2,3]");
        assert_eq!(json_array(std::iter::empty()), "[]");
    }

    fn result(data: &[u8], error: Option<&str>) -> ReaderResult {
        ReaderResult {
            bytes: data.len() as u64,
            reads: 1,
            histogram: histogram(data),
            error: error.map(String::from),
        }
    }

    #[test]
    fn the_readers_share_the_pattern() {
        let o = crate::parse_args(["multi-open", "--bytes", "1000", "--seed", "5"]).unwrap();
        let p = pattern(5, 1000);
        // Any split of the stream between the readers, any order.
        let results = [
            result(&p[600..], None),
            result(&[], None),
            result(&p[..100], None),
            result(&p[100..600], None),
        ];
        let mut c = Checked::new();
        judge_readers(&mut c, &o, &results).unwrap();
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let line = crate::checked_result_line("multi-open", &c.report, &[]);
        assert!(
            line.ends_with(
                "\"bytes\":1000,\"reader_bytes\":[400,0,100,500],\"reader_reads\":[1,1,1,1],\
                 \"readers_with_data\":3,\"histogram_ok\":true}"
            ),
            "{line}"
        );

        // A byte short, another byte instead, and a reader's error.
        let mut other = p[..100].to_vec();
        other[0] = other[0].wrapping_add(1);
        let results = [
            result(&p[100..999], Some("read after 899 bytes: EIO")),
            result(&other, None),
        ];
        let mut c = Checked::new();
        judge_readers(&mut c, &o, &results).unwrap();
        assert_eq!(
            c.problems,
            [
                "the readers got 999 bytes in all, expected 1000",
                "reader 0: read after 899 bytes: EIO",
                "the bytes read are not those of the pattern (byte histogram differs)"
            ]
        );
        assert_eq!(c.report.get("histogram_ok"), Some("false"));
    }
}
