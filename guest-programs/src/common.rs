//! What every program shares: opening the device, the receive and transmit
//! bookkeeping (byte counts, SHA-256, partial reads and short writes), and
//! small wrappers around system calls (errno names, `poll` of one
//! descriptor, reads that retry `EINTR`, sysfs reads and writes).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{pattern, Opts, Report};

/// How many leading bytes of the stream go into the `head` field.
const HEAD_LEN: usize = 16;

/// The last OS error, with what was being done.
pub fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// An errno value as text, with what was being done.
pub fn errno_err(what: &str, errno: i32) -> String {
    format!("{what}: {}", io::Error::from_raw_os_error(errno))
}

/// Whether the last OS error is `EINTR`.
pub fn interrupted() -> bool {
    io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
}

/// How the device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `O_RDONLY`.
    Read,
    /// `O_WRONLY`.
    Write,
    /// `O_RDWR`.
    ReadWrite,
}

/// Open `path` for `access`, with `O_NONBLOCK` if `nonblock`.
pub fn open_device(path: &str, access: Access, nonblock: bool) -> Result<OwnedFd, String> {
    let mut oo = OpenOptions::new();
    match access {
        Access::Read => oo.read(true),
        Access::Write => oo.write(true),
        Access::ReadWrite => oo.read(true).write(true),
    };
    oo.custom_flags(libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 });
    let file = oo.open(path).map_err(|e| format!("open {path}: {e}"))?;
    Ok(OwnedFd::from(file))
}

/// Set or clear status flags (`O_NONBLOCK`, `O_ASYNC`) with `F_SETFL`.
pub fn set_fl(fd: RawFd, set: libc::c_int, clear: libc::c_int) -> Result<(), String> {
    // SAFETY: F_GETFL takes no argument; `fd` is a descriptor the caller owns.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(os_err("fcntl(F_GETFL)"));
    }
    // SAFETY: F_SETFL takes an int argument; `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, (flags | set) & !clear) } < 0 {
        return Err(os_err("fcntl(F_SETFL)"));
    }
    Ok(())
}

/// Sleep for `d` (nanosleep; an interruption just ends the sleep early).
pub fn nap(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec; a null remainder pointer is allowed.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// The calling thread's errno.
pub fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The symbolic name of an errno value (the ones these scenarios meet),
/// or `errno N`.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        0 => "0",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::ETIME => "ETIME",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECANCELED => "ECANCELED",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOTCONN => "ENOTCONN",
        libc::EPROTO => "EPROTO",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

/// Write `value` to a sysfs (or procfs) file in one `write`.
pub fn write_sysfs(path: &Path, value: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(value.as_bytes())
        .map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// Wait until `path` is a character device (a device node came back);
/// returns how long that took.
pub fn wait_for_chardev(path: &str, timeout: Duration) -> Result<Duration, String> {
    use std::os::unix::fs::FileTypeExt;
    let start = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_char_device()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(format!("no {path} within {timeout:?}"));
        }
        nap(Duration::from_millis(20));
    }
}

/// `poll()` one descriptor for `events` with a timeout in milliseconds
/// (0: just look); the returned events, or 0 on timeout.
pub fn poll_one(
    fd: RawFd,
    events: libc::c_short,
    timeout_ms: i32,
) -> Result<libc::c_short, String> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n >= 0 {
            return Ok(if n == 0 { 0 } else { pfd.revents });
        }
        if !interrupted() {
            return Err(os_err("poll"));
        }
    }
}

/// A `poll`/`epoll` event mask spelled out, e.g. `0x11 (IN|HUP)`.
pub fn mask_name(mask: u32) -> String {
    let names = [
        (libc::EPOLLIN as u32, "IN"),
        (libc::EPOLLPRI as u32, "PRI"),
        (libc::EPOLLOUT as u32, "OUT"),
        (libc::EPOLLERR as u32, "ERR"),
        (libc::EPOLLHUP as u32, "HUP"),
        (libc::EPOLLRDNORM as u32, "RDNORM"),
        (libc::EPOLLWRNORM as u32, "WRNORM"),
        (libc::EPOLLRDHUP as u32, "RDHUP"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    format!("{mask:#x} ({})", set.join("|"))
}

/// A read of `len` bytes into `buf` that retries `EINTR`: the byte count,
/// or the errno.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> Result<usize, i32> {
    loop {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = last_errno();
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// One sysfs counter: a decimal number and a newline.
pub fn read_counter(path: &Path) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.trim()
        .parse()
        .map_err(|e| format!("{}: {:?}: {e}", path.display(), text.trim()))
}

/// What one non-waiting attempt at I/O did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many bytes (at least 1) moved.
    Moved(usize),
    /// `EAGAIN`: nothing could move now.
    WouldBlock,
}

/// The receive side: how much is still wanted, and the hash of what came.
#[derive(Debug)]
pub struct Rx {
    want: u64,
    total: u64,
    ops: u64,
    chunk: usize,
    hash: Sha256,
    head: Vec<u8>,
    buf: Vec<u8>,
}

impl Rx {
    /// Expect `o.bytes` bytes, requested at most `o.chunk` at a time.
    pub fn new(o: &Opts) -> Self {
        Self {
            want: o.bytes,
            total: 0,
            ops: 0,
            chunk: o.chunk,
            hash: Sha256::new(),
            head: Vec::with_capacity(HEAD_LEN),
            buf: vec![0; o.chunk],
        }
    }

    /// Whether every expected byte arrived.
    pub fn done(&self) -> bool {
        self.total >= self.want
    }

    /// Bytes received so far.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes still expected.
    pub fn remaining(&self) -> u64 {
        self.want - self.total
    }

    /// Size of the next request: at most one chunk, never past the end.
    pub fn next_len(&self) -> usize {
        self.remaining().min(self.chunk as u64) as usize
    }

    /// Size of the next request that must also stop at `limit` total bytes.
    pub fn next_len_until(&self, limit: u64) -> usize {
        limit.saturating_sub(self.total).min(self.next_len() as u64) as usize
    }

    /// Take `data`, the result of one successful read, in stream order.
    pub fn accept(&mut self, data: &[u8]) -> Result<(), String> {
        if data.is_empty() {
            return Err(format!(
                "read returned 0 (end of file) after {} bytes",
                self.total
            ));
        }
        if data.len() as u64 > self.remaining() {
            return Err(format!(
                "a read returned {} bytes with only {} requested/outstanding after {} bytes",
                data.len(),
                self.remaining(),
                self.total
            ));
        }
        if self.head.len() < HEAD_LEN {
            let take = (HEAD_LEN - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..take]);
        }
        self.hash.update(data);
        self.total += data.len() as u64;
        self.ops += 1;
        Ok(())
    }

    /// One `read()` of up to a chunk, without waiting beyond what the
    /// descriptor's own mode does. `EINTR` is retried; `EAGAIN` is
    /// [`Step::WouldBlock`]; end of file is an error.
    pub fn read_once(&mut self, fd: RawFd) -> Result<Step, String> {
        let want = self.next_len();
        loop {
            // SAFETY: `buf` is a live, writable buffer of at least `want`
            // bytes (`want` <= chunk = its length); `fd` is open.
            let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), want) };
            if n >= 0 {
                let n = n as usize;
                let buf = std::mem::take(&mut self.buf);
                let r = self.accept(&buf[..n]);
                self.buf = buf;
                r?;
                return Ok(Step::Moved(n));
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(Step::WouldBlock),
                _ => return Err(os_err(&format!("read after {} bytes", self.total))),
            }
        }
    }

    /// `bytes`, `reads`, `sha256` and `head`.
    pub fn report(self) -> Report {
        let mut r = Report::new();
        r.num("bytes", self.total)
            .num("reads", self.ops)
            .text("sha256", &hex::encode(self.hash.finalize()))
            .text("head", &hex::encode(&self.head));
        r
    }
}

/// The transmit side: the pattern to send and how much of it went.
#[derive(Debug)]
pub struct Tx {
    data: Vec<u8>,
    sent: usize,
    ops: u64,
    chunk: usize,
    hash: Sha256,
    /// When the last write took bytes (evidence that the writer waited).
    last: Option<Instant>,
    /// The longest time between two writes that took bytes.
    max_gap: Duration,
    /// The longest single `write()` call ([`Tx::write_once`]).
    max_call: Duration,
    /// `EAGAIN`s from [`Tx::write_once`].
    would_block: u64,
    /// The longest submission-to-completion time of an asynchronous
    /// write ([`Tx::latency`]).
    max_latency: Duration,
}

impl Tx {
    /// `o.bytes` of the pattern from `o.seed`, written at most `o.chunk`
    /// at a time.
    pub fn new(o: &Opts) -> Result<Self, String> {
        let len = usize::try_from(o.bytes).map_err(|_| format!("--bytes {} too large", o.bytes))?;
        Ok(Self {
            data: pattern(o.seed, len),
            sent: 0,
            ops: 0,
            chunk: o.chunk,
            hash: Sha256::new(),
            last: None,
            max_gap: Duration::ZERO,
            max_call: Duration::ZERO,
            would_block: 0,
            max_latency: Duration::ZERO,
        })
    }

    /// Whether every byte was written.
    pub fn done(&self) -> bool {
        self.sent >= self.data.len()
    }

    /// Bytes written so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Bytes still to write.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.sent
    }

    /// The next request: at most one chunk of what is left.
    pub fn next(&self) -> &[u8] {
        let end = self.sent + self.remaining().min(self.chunk);
        &self.data[self.sent..end]
    }

    /// The next request that must also stop at `limit` total bytes.
    pub fn next_until(&self, limit: usize) -> &[u8] {
        let n = limit.saturating_sub(self.sent).min(self.next().len());
        &self.data[self.sent..self.sent + n]
    }

    /// The whole unsent rest, for requests that span several chunks.
    pub fn rest(&self) -> &[u8] {
        &self.data[self.sent..]
    }

    /// Record that one write took the next `n` bytes.
    pub fn advance(&mut self, n: usize) -> Result<(), String> {
        if n == 0 {
            return Err(format!("write returned 0 after {} bytes", self.sent));
        }
        if n > self.remaining() {
            return Err(format!(
                "a write returned {n} with only {} bytes outstanding after {} bytes",
                self.remaining(),
                self.sent
            ));
        }
        self.hash.update(&self.data[self.sent..self.sent + n]);
        self.sent += n;
        self.ops += 1;
        let now = Instant::now();
        if let Some(last) = self.last {
            self.max_gap = self.max_gap.max(now - last);
        }
        self.last = Some(now);
        Ok(())
    }

    /// An asynchronous write (AIO, io_uring) completed `d` after it was
    /// submitted.
    pub fn latency(&mut self, d: Duration) {
        self.max_latency = self.max_latency.max(d);
    }

    /// One `write()` of up to a chunk; `EINTR` is retried, `EAGAIN` is
    /// [`Step::WouldBlock`], and a short write just advances less.
    pub fn write_once(&mut self, fd: RawFd) -> Result<Step, String> {
        loop {
            let chunk = self.next();
            let t0 = Instant::now();
            // SAFETY: `chunk` is a live, readable buffer of `chunk.len()`
            // bytes; `fd` is open.
            let n = unsafe { libc::write(fd, chunk.as_ptr().cast(), chunk.len()) };
            let errno = io::Error::last_os_error().raw_os_error();
            self.max_call = self.max_call.max(t0.elapsed());
            if n >= 0 {
                self.advance(n as usize)?;
                return Ok(Step::Moved(n as usize));
            }
            match errno {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    self.would_block += 1;
                    return Ok(Step::WouldBlock);
                }
                _ => return Err(os_err(&format!("write after {} bytes", self.sent))),
            }
        }
    }

    /// `bytes`, `writes`, `sha256` (of what was written) and `head`, then
    /// the evidence of waiting: `max_gap_ms` (the longest time between two
    /// writes that took bytes: a stalled device shows here, whatever the
    /// model), `max_write_ms` (the longest `write()` call: a blocking
    /// writer that slept), `would_block` (`EAGAIN`s) and `max_latency_ms`
    /// (the longest time an asynchronous write took to complete).
    pub fn report(self) -> Report {
        let mut r = Report::new();
        let head = &self.data[..self.sent.min(HEAD_LEN)];
        r.num("bytes", self.sent as u64)
            .num("writes", self.ops)
            .text("sha256", &hex::encode(self.hash.finalize()))
            .text("head", &hex::encode(head))
            .num("max_gap_ms", self.max_gap.as_millis() as u64)
            .num("max_write_ms", self.max_call.as_millis() as u64)
            .num("would_block", self.would_block)
            .num("max_latency_ms", self.max_latency.as_millis() as u64);
        r
    }
}

/// How long a transmit waiter's bounded readiness waits last
/// ([`Readiness`]): short enough to count the waits of a stall, long enough
/// not to spin.
pub const READINESS_SLICE_MS: i32 = 50;

/// A waiter's evidence about readiness (poll, select, epoll): bounded waits
/// ([`READINESS_SLICE_MS`]) that ended with the descriptor not ready, how
/// often readiness was reported again after such waits, and the longest
/// time it stayed unready.
#[derive(Debug, Default)]
pub struct Readiness {
    not_ready: u64,
    again: u64,
    since: Option<Instant>,
    longest: Duration,
}

impl Readiness {
    /// A bounded wait ended without readiness.
    pub fn not_ready(&mut self) {
        self.not_ready += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// Readiness was reported.
    pub fn ready(&mut self) {
        if let Some(t) = self.since.take() {
            self.again += 1;
            self.longest = self.longest.max(t.elapsed());
        }
    }

    /// `<what>_false` (waits that found it not ready), `<what>_again`
    /// (readiness reported again after them) and `max_unready_ms`.
    pub fn add_to(&self, r: &mut Report, what: &str) {
        r.num(&format!("{what}_false"), self.not_ready)
            .num(&format!("{what}_again"), self.again)
            .num("max_unready_ms", self.longest.as_millis() as u64);
    }
}

/// Either side, for the models whose loop is the same both ways.
#[derive(Debug)]
pub enum Side {
    /// Reading.
    Rx(Rx),
    /// Writing.
    Tx(Tx),
}

impl Side {
    /// The side for `dir`, sized from `o`.
    pub fn new(o: &Opts, dir: crate::Dir) -> Result<Self, String> {
        Ok(match dir {
            crate::Dir::Rx => Side::Rx(Rx::new(o)),
            crate::Dir::Tx => Side::Tx(Tx::new(o)?),
        })
    }

    /// How the device must be opened for this side.
    pub fn access(&self) -> Access {
        match self {
            Side::Rx(_) => Access::Read,
            Side::Tx(_) => Access::Write,
        }
    }

    /// Whether all bytes moved.
    pub fn done(&self) -> bool {
        match self {
            Side::Rx(r) => r.done(),
            Side::Tx(t) => t.done(),
        }
    }

    /// One read or write attempt; see [`Rx::read_once`], [`Tx::write_once`].
    pub fn once(&mut self, fd: RawFd) -> Result<Step, String> {
        match self {
            Side::Rx(r) => r.read_once(fd),
            Side::Tx(t) => t.write_once(fd),
        }
    }

    /// Poll events that mean "this side can make progress".
    pub fn poll_events(&self) -> libc::c_short {
        match self {
            Side::Rx(_) => libc::POLLIN,
            Side::Tx(_) => libc::POLLOUT,
        }
    }

    /// The report of this side.
    pub fn report(self) -> Report {
        match self {
            Side::Rx(r) => r.report(),
            Side::Tx(t) => t.report(),
        }
    }
}

/// Wait at most `limit` from `start` for `ring`'s first completion,
/// entering the kernel with a timeout (ETIME and EINTR just loop).
/// `Ok(None)`: none came in time; `Err`: `io_uring_enter` failed. Either
/// way the request may still be in flight, so its buffer must outlive it.
pub(crate) fn wait_cqe(
    ring: &mut io_uring::IoUring,
    start: Instant,
    limit: Duration,
) -> io::Result<Option<io_uring::cqueue::Entry>> {
    loop {
        if let Some(c) = ring.completion().next() {
            return Ok(Some(c));
        }
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Ok(None);
        }
        let ts = io_uring::types::Timespec::new()
            .sec(left.as_secs())
            .nsec(left.subsec_nanos());
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_and_mask_names() {
        assert_eq!(errno_name(libc::ENODEV), "ENODEV");
        assert_eq!(errno_name(libc::ESHUTDOWN), "ESHUTDOWN");
        assert_eq!(errno_name(9999), "errno 9999");
        assert_eq!(
            mask_name((libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLRDNORM) as u32),
            "0x51 (IN|HUP|RDNORM)"
        );
    }

    #[test]
    fn counters_parse() {
        let dir = std::env::temp_dir().join(format!("common-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("rx_bytes"), "12345\n").unwrap();
        std::fs::write(dir.join("bad"), "x\n").unwrap();
        assert_eq!(read_counter(&dir.join("rx_bytes")), Ok(12345));
        assert!(read_counter(&dir.join("bad")).is_err());
        assert!(read_counter(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
