//! Runs every scenario of the `vdevlab-guest` binary on the host, with a
//! FIFO standing in for `/dev/qw0`: a FIFO is a byte stream with blocking,
//! `O_NONBLOCK`, poll/epoll readiness, `O_ASYNC`/`F_SETSIG` signals (with
//! `si_fd`/`si_band`), `read_iter`/`write_iter` (so native AIO's
//! `io_submit` works, if synchronously) and io_uring support, so every
//! model can be exercised against it.
//!
//! - `<model>-rx`: the test holds the FIFO open read-write (so the
//!   program's open never blocks and it never sees end of file), waits for
//!   `VDEVLAB-READY`, then feeds the pattern in uneven pieces with small
//!   pauses, and checks the program's byte count and SHA-256.
//! - `<model>-tx`: the test reads the FIFO in uneven pieces with pauses
//!   (the pipe is shrunk to one page, so the writer meets back-pressure,
//!   short writes and `EAGAIN`), compares what arrived with the pattern, and
//!   checks the program's report.
//! - `mixed`: the program opens the FIFO read-write itself, so its reader
//!   thread receives what its writer thread sends (a loopback).
//!
//! No model is skipped for being unsupported by a FIFO. `io-uring` and
//! `linux-aio` are skipped (with a message) only when this host's kernel
//! refuses `io_uring_setup` or `io_setup` altogether (seccomp, sysctl
//! `kernel.io_uring_disabled`, a kernel without CONFIG_AIO): that is a
//! limit of the machine, not of FIFOs.
//!
//! `VDEVLAB_GUEST_BIN=path cargo test -p vdevlab-guest --test fifo` runs
//! the same checks on another build of the program (the static one).
//!
//! What a FIFO cannot show: the qw driver's own behaviour (its wakeups,
//! its fasync list, whether its native AIO is really asynchronous). That is
//! what the lab's guest runs are for.

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vdevlab_guest::{pattern, MIXED, MODELS, ROBUSTNESS, SCENARIOS};

/// The program under test: this build's, or the one named by
/// `VDEVLAB_GUEST_BIN` (e.g. the static guest build, to check that glibc's
/// static AIO and signal parts work the same).
fn bin() -> String {
    std::env::var("VDEVLAB_GUEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_vdevlab-guest").to_string())
}
/// Odd, so no request size divides it.
const BYTES: usize = 150_001;
/// Larger than PIPE_BUF: writes to the pipe may be split and short.
const CHUNK: usize = 5000;
const SEED: u64 = 0x5eed_1234;
const TIMEOUT: Duration = Duration::from_secs(60);

/// A FIFO in a fresh directory, held open read-write and non-blocking by
/// the test.
struct Fifo {
    dir: PathBuf,
    path: PathBuf,
    fd: Option<OwnedFd>,
}

impl Fifo {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vdevlab-guest-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qw0");
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // SAFETY: as above; O_RDWR on a FIFO never blocks on Linux.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "open fifo: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is new and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // One page: the smallest pipe, so back-pressure comes early.
        // SAFETY: F_SETPIPE_SZ takes an int; `fd` is open.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
        Self {
            dir,
            path,
            fd: Some(fd),
        }
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().unwrap().as_raw_fd()
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Bytes waiting in the pipe.
    fn pending(&self) -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int; the descriptor is open.
        let r = unsafe { libc::ioctl(self.raw(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "FIONREAD");
        n
    }
}

impl Drop for Fifo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running guest program and its stdout lines.
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vdevlab-guest");
        let out = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn scenario(scenario: &str, fifo: &Fifo, bytes: usize, chunk: usize) -> Self {
        let (b, c, s) = (bytes.to_string(), chunk.to_string(), SEED.to_string());
        Self::start(&[
            scenario,
            "--device",
            fifo.path(),
            "--bytes",
            &b,
            "--chunk",
            &c,
            "--seed",
            &s,
        ])
    }

    /// The next line starting with `prefix`, within `deadline`.
    fn wait_for(&mut self, prefix: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("no {prefix:?} line ({e:?}); output so far: {:?}", self.seen);
                }
            }
        }
    }

    /// Whether the program has exited (its status is kept for later).
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Fail early instead of waiting for the deadline if the program died.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let rest: Vec<String> = self.lines.try_iter().collect();
            panic!("program exited early ({status}): {:?} {rest:?}", self.seen);
        }
    }

    fn exit_code(mut self, deadline: Instant) -> i32 {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("program did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Wait up to 100 ms for `events` on `fd`.
fn poll_for(fd: RawFd, events: libc::c_short) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) };
}

/// Uneven piece sizes, with a short pause every few pieces so that the
/// program finds the pipe empty (rx) or full (tx) now and then.
const PIECES: &[usize] = &[1, 7, 4096, 100, 3000, 65536, 513, 2, 9000];

fn feed(run: &mut Run, fifo: &Fifo, data: &[u8], deadline: Instant) {
    let mut sent = 0;
    let mut i = 0;
    while sent < data.len() {
        let want = PIECES[i % PIECES.len()].min(data.len() - sent);
        // SAFETY: writes from a live slice; the descriptor is open.
        let n = unsafe { libc::write(fifo.raw(), data[sent..].as_ptr().cast(), want) };
        if n > 0 {
            sent += n as usize;
            i += 1;
            if i % 5 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EAGAIN),
            "feeding the FIFO: {e}"
        );
        run.check_alive();
        assert!(
            Instant::now() < deadline,
            "timed out feeding after {sent} bytes"
        );
        poll_for(fifo.raw(), libc::POLLOUT);
    }
}

fn drain(run: &mut Run, fifo: &Fifo, len: usize, deadline: Instant) -> Vec<u8> {
    let mut got = Vec::with_capacity(len);
    let mut buf = vec![0u8; 65536];
    let mut i = 0;
    while got.len() < len {
        let want = PIECES[i % PIECES.len()].min(len - got.len());
        // SAFETY: reads into a live buffer of at least `want` bytes.
        let n = unsafe { libc::read(fifo.raw(), buf.as_mut_ptr().cast(), want) };
        if n > 0 {
            got.extend_from_slice(&buf[..n as usize]);
            i += 1;
            if i % 5 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let e = std::io::Error::last_os_error();
        assert!(
            n < 0 && e.raw_os_error() == Some(libc::EAGAIN),
            "draining: {n} {e}"
        );
        // The program may write its last bytes and exit at any moment
        // after the read above. So look at whether it has exited first,
        // and only then at the FIFO: once it is seen gone, whatever it
        // wrote is already in the FIFO, so an empty FIFO after that means
        // it really stopped short. (The other order, "exited and bytes
        // pending, else check_alive", lost the race when the program wrote
        // and exited between the two checks: "exited early (exit status:
        // 0)" with its result line still unread.)
        if run.exited() {
            if fifo.pending() > 0 {
                continue;
            }
            run.check_alive();
            unreachable!("check_alive panics once the program has exited");
        }
        assert!(
            Instant::now() < deadline,
            "timed out draining after {} bytes",
            got.len()
        );
        poll_for(fifo.raw(), libc::POLLIN);
    }
    got
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

fn check_result(line: &str, scenario: &str, count_key: &str, bytes: usize, sha256: &str) {
    assert_eq!(field(line, "scenario"), Some(scenario), "{line}");
    assert_eq!(field(line, "ok"), Some("true"), "{line}");
    assert_eq!(
        field(line, "bytes"),
        Some(bytes.to_string().as_str()),
        "{line}"
    );
    assert_eq!(field(line, "sha256"), Some(sha256), "{line}");
    let ops: u64 = field(line, count_key)
        .unwrap_or_else(|| panic!("no {count_key}: {line}"))
        .parse()
        .unwrap();
    assert!(
        ops <= bytes as u64 && (ops >= 1 || bytes == 0),
        "{count_key} {ops}: {line}"
    );
}

/// Why this host cannot run `model` at all, if it cannot.
fn unavailable(model: &str) -> Option<String> {
    match model {
        "io-uring" => io_uring::IoUring::new(2)
            .err()
            .map(|e| format!("io_uring_setup fails on this host: {e}")),
        "linux-aio" => {
            let mut ctx: libc::c_ulong = 0;
            // SAFETY: io_setup writes the context id to `ctx`.
            let r = unsafe { libc::syscall(libc::SYS_io_setup, 1 as libc::c_long, &mut ctx) };
            if r < 0 {
                return Some(format!(
                    "io_setup fails on this host: {}",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: destroys the context just made.
            unsafe { libc::syscall(libc::SYS_io_destroy, ctx) };
            None
        }
        _ => None,
    }
}

fn run_rx(model: &str, bytes: usize, chunk: usize) {
    let scenario = format!("{model}-rx");
    if let Some(why) = unavailable(model) {
        eprintln!("SKIPPED {scenario}: {why}");
        return;
    }
    let deadline = Instant::now() + TIMEOUT;
    let fifo = Fifo::new(&format!("{scenario}-{bytes}-{chunk}"));
    let data = pattern(SEED ^ 0xff, bytes);
    let mut run = Run::scenario(&scenario, &fifo, bytes, chunk);
    run.wait_for(&format!("VDEVLAB-READY {scenario}"), deadline);
    feed(&mut run, &fifo, &data, deadline);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    check_result(&line, &scenario, "reads", bytes, &sha(&data));
    assert_eq!(fifo.pending(), 0, "the program left bytes in the FIFO");
    assert_eq!(run.exit_code(deadline), 0, "{line}");
}

fn run_tx(model: &str, bytes: usize, chunk: usize) {
    let scenario = format!("{model}-tx");
    if let Some(why) = unavailable(model) {
        eprintln!("SKIPPED {scenario}: {why}");
        return;
    }
    let deadline = Instant::now() + TIMEOUT;
    let fifo = Fifo::new(&format!("{scenario}-{bytes}-{chunk}"));
    let mut run = Run::scenario(&scenario, &fifo, bytes, chunk);
    run.wait_for(&format!("VDEVLAB-READY {scenario}"), deadline);
    let got = drain(&mut run, &fifo, bytes, deadline);
    let expect = pattern(SEED, bytes);
    assert!(
        got == expect,
        "{scenario}: the FIFO carried other bytes than the pattern"
    );
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    check_result(&line, &scenario, "writes", bytes, &sha(&expect));
    assert_eq!(run.exit_code(deadline), 0, "{line}");
    assert_eq!(fifo.pending(), 0, "the program wrote more than --bytes");
}

macro_rules! both_ways {
    ($($rx:ident, $tx:ident => $model:literal;)*) => {
        $(
            #[test]
            fn $rx() {
                run_rx($model, BYTES, CHUNK);
            }
            #[test]
            fn $tx() {
                run_tx($model, BYTES, CHUNK);
            }
        )*
        /// Every model has its two tests above.
        #[test]
        fn every_model_is_tested() {
            let tested = [$($model),*];
            assert_eq!(&tested[..], MODELS);
            assert_eq!(SCENARIOS.len(), 2 * tested.len());
        }
    };
}

both_ways! {
    blocking_rx, blocking_tx => "blocking";
    nonblocking_rx, nonblocking_tx => "nonblocking";
    select_rx, select_tx => "select";
    poll_rx, poll_tx => "poll";
    epoll_lt_rx, epoll_lt_tx => "epoll-lt";
    epoll_et_rx, epoll_et_tx => "epoll-et";
    sigio_rx, sigio_tx => "sigio";
    posix_aio_rx, posix_aio_tx => "posix-aio";
    linux_aio_rx, linux_aio_tx => "linux-aio";
    io_uring_rx, io_uring_tx => "io-uring";
}

/// Edge sizes: nothing at all, one byte (the AIO and io_uring models do
/// all of it in their second step), and a few bytes in one-byte and
/// uneven chunks (several short lio_listio batches).
#[test]
fn tiny_transfers() {
    for model in MODELS {
        for (bytes, chunk) in [(0, 1), (1, 1), (9, 1), (9, 4), (17, 100)] {
            run_rx(model, bytes, chunk);
            run_tx(model, bytes, chunk);
        }
    }
}

#[test]
fn mixed_loopback() {
    let deadline = Instant::now() + TIMEOUT;
    let fifo = Fifo::new("mixed");
    let mut run = Run::scenario(MIXED, &fifo, BYTES, CHUNK);
    run.wait_for(&format!("VDEVLAB-READY {MIXED}"), deadline);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    let expect = sha(&pattern(SEED, BYTES));
    assert_eq!(field(&line, "ok"), Some("true"), "{line}");
    for key in ["rx_bytes", "tx_bytes"] {
        assert_eq!(
            field(&line, key),
            Some(BYTES.to_string().as_str()),
            "{line}"
        );
    }
    for key in ["rx_sha256", "tx_sha256"] {
        assert_eq!(field(&line, key), Some(expect.as_str()), "{line}");
    }
    assert_eq!(run.exit_code(deadline), 0);
}

#[test]
fn end_of_file_is_an_error() {
    let deadline = Instant::now() + TIMEOUT;
    let mut fifo = Fifo::new("eof");
    let mut run = Run::scenario("blocking-rx", &fifo, 1000, CHUNK);
    run.wait_for("VDEVLAB-READY blocking-rx", deadline);
    feed(&mut run, &fifo, &pattern(1, 10), deadline);
    // The only writer goes away: the reader sees end of file after 10 bytes.
    fifo.fd = None;
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    assert_eq!(field(&line, "ok"), Some("false"), "{line}");
    assert!(
        line.contains("end of file") && line.contains("after 10 bytes"),
        "{line}"
    );
    assert_eq!(run.exit_code(deadline), 1);
}

/// The other end goes away mid-stream (the test closes the FIFO's only
/// other end): every model must report the failure (end of file for rx,
/// EPIPE or POLLERR for tx) instead of hanging or claiming success.
#[test]
fn peer_gone_is_an_error_in_every_model() {
    for scenario in SCENARIOS {
        let model = scenario.rsplit_once('-').unwrap().0;
        if let Some(why) = unavailable(model) {
            eprintln!("SKIPPED {scenario}: {why}");
            continue;
        }
        let deadline = Instant::now() + TIMEOUT;
        let mut fifo = Fifo::new(&format!("gone-{scenario}"));
        let mut run = Run::scenario(scenario, &fifo, 100_000, 1000);
        run.wait_for(&format!("VDEVLAB-READY {scenario}"), deadline);
        if scenario.ends_with("-rx") {
            feed(&mut run, &fifo, &pattern(3, 3000), deadline);
        } else {
            drain(&mut run, &fifo, 3000, deadline);
        }
        fifo.fd = None;
        let line = run.wait_for("VDEVLAB-RESULT ", deadline);
        assert_eq!(field(&line, "ok"), Some("false"), "{line}");
        assert_eq!(run.exit_code(deadline), 1, "{line}");
    }
}

#[test]
fn bad_arguments_still_give_a_result_line() {
    let deadline = Instant::now() + TIMEOUT;
    let mut run = Run::start(&["poll-rx", "--bogus", "1"]);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    assert_eq!(
        line,
        "VDEVLAB-RESULT {\"scenario\":\"poll-rx\",\"ok\":false,\"error\":\"unknown option --bogus\"}"
    );
    assert_eq!(run.exit_code(deadline), 2);

    let mut run = Run::start(&["blocking-rx", "--device", "/nonexistent/qw0"]);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    assert!(
        line.contains("\"ok\":false") && line.contains("open /nonexistent/qw0"),
        "{line}"
    );
    assert_eq!(run.exit_code(deadline), 1);
}

#[test]
fn list_names_every_scenario() {
    let out = Command::new(bin()).arg("list").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = text.lines().collect();
    let mut expect: Vec<&str> = SCENARIOS.to_vec();
    expect.push(MIXED);
    expect.extend_from_slice(ROBUSTNESS);
    expect.extend_from_slice(vdevlab_guest::scenarios::sensor::SENSOR_SCENARIOS);
    expect.extend_from_slice(vdevlab_guest::scenarios::sensor_faults::SENSOR_FAULT_SCENARIOS);
    assert_eq!(names, expect);
}

/// `multi-open`: four readers, each with its own descriptor, share one
/// stream; a FIFO splits it like the qw driver does (each byte to one
/// reader). Then a fifth reader finds nothing left and a writer's 64
/// bytes come out of the FIFO.
#[test]
fn multi_open_splits_one_stream_between_four_readers() {
    let deadline = Instant::now() + TIMEOUT;
    let fifo = Fifo::new("multi-open");
    let mut run = Run::scenario("multi-open", &fifo, BYTES, CHUNK);
    run.wait_for("VDEVLAB-READY multi-open", deadline);
    feed(&mut run, &fifo, &pattern(SEED, BYTES), deadline);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    assert_eq!(field(&line, "ok"), Some("true"), "{line}");
    assert_eq!(
        field(&line, "bytes"),
        Some(BYTES.to_string().as_str()),
        "{line}"
    );
    assert_eq!(field(&line, "histogram_ok"), Some("true"), "{line}");
    assert_eq!(field(&line, "leftover"), Some("0"), "{line}");
    assert_eq!(field(&line, "extra_read"), Some("EAGAIN"), "{line}");
    let tx = drain(&mut run, &fifo, 64, deadline);
    assert_eq!(tx, pattern(SEED, 64));
    assert_eq!(field(&line, "tx_sha256"), Some(sha(&tx).as_str()), "{line}");
    assert_eq!(run.exit_code(deadline), 0);
}

/// A robustness scenario on something that is not the qw driver fails
/// at once with a result line (and `pm-freeze`, `teardown-*` touch
/// nothing: they are not run here at all, to be safe on any host).
#[test]
fn ioctl_stats_on_a_fifo_fails_cleanly() {
    robustness_on_a_fifo_fails_cleanly("ioctl-stats");
}

/// `needs-reset` likewise: it asks `QW_IOC_GET_STATS` before it starts its
/// reader or prints anything.
#[test]
fn needs_reset_on_a_fifo_fails_cleanly() {
    robustness_on_a_fifo_fails_cleanly("needs-reset");
}

fn robustness_on_a_fifo_fails_cleanly(scenario: &str) {
    let deadline = Instant::now() + TIMEOUT;
    let fifo = Fifo::new(scenario);
    let mut run = Run::scenario(scenario, &fifo, 100, CHUNK);
    let line = run.wait_for("VDEVLAB-RESULT ", deadline);
    assert_eq!(field(&line, "ok"), Some("false"), "{line}");
    assert!(line.contains("QW_IOC_GET_STATS"), "{line}");
    assert!(
        !run.seen.iter().any(|l| l.starts_with("VDEVLAB-READY")),
        "{:?}",
        run.seen
    );
    assert_eq!(run.exit_code(deadline), 1);
}
