//! `alloc-faults`: the kernel's fault injection fails the qw driver's own
//! allocations, one at a time, in each of its paths, and every failure
//! must end in a clean error (or a clean degradation), with nothing leaked.
//! Needs a kernel with CONFIG_FAULT_INJECTION, FAILSLAB, FAIL_PAGE_ALLOC,
//! FAULT_INJECTION_DEBUG_FS and FAULT_INJECTION_STACKTRACE_FILTER (the
//! lockdep kernel), and for the leak check CONFIG_DEBUG_KMEMLEAK booted
//! with `kmemleak=on`; without them the program fails saying so.
//!
//! How one site at a time is failed: the per-task `fail-nth` file
//! (`/proc/thread-self/fail-nth`) makes the N-th allocation of this thread
//! fail, counting only allocations that pass failslab's and
//! fail_page_alloc's stack-trace filter: a frame in the module's text
//! (`require-start`/`require-end`, from `/proc/kallsyms`) and none in
//! kmemleak's (`reject-*`: kmemleak's own bookkeeping allocates inside
//! every allocation, and failing it would only test kmemleak). So N counts
//! the allocations the driver makes, itself or through the kernel
//! functions it calls (find_vqs, cdev_add, device_create, ...), in this
//! thread's system call. For each path, N = 1, 2, ... until the call runs
//! without the N-th allocation happening (`fail-nth` still armed): every
//! site of the path was then failed once. Each injected failure's stack
//! (the kernel prints it, `verbose=2`) comes from `/dev/kmsg`: its site is
//! the chain of driver frames and the function the innermost one called.
//!
//! The paths, in order (the device starts bound, with nothing buffered):
//!
//! 1. `open`: `open(O_RDWR|O_NONBLOCK)`; an injected failure must give
//!    `ENOMEM`.
//! 2. `write`: a one-byte `O_NONBLOCK` write: `ENOMEM` when failed, then 1.
//! 3. `aio_write`: a one-byte `IOCB_CMD_PWRITE` through `io_submit`: its
//!    completion `-ENOMEM` when failed, then 1.
//! 4. `probe`: unbind the device, then write its name to the driver's
//!    `bind` (probe runs in this thread). A failed probe must fail the
//!    write (with `ENOMEM` where the allocation's failure is the error) and
//!    leave no `/dev/qw0`; a probe that survived a failure (a fallback, a
//!    shorter receive ring) must leave a working device (open, read
//!    `EAGAIN`, write one byte), unbound again for the next N.
//! 5. `read`: the device bound once more with the last receive buffer's
//!    allocation failed (the site the probe walk found), so it is one
//!    buffer short: a `O_NONBLOCK` read of the empty device tops the ring
//!    up (`qw_rx_check()`), and must give `EAGAIN` (or `ENOMEM`) whether
//!    or not that refill failed.
//! 6. `aio_read`: an `IOCB_CMD_PREADV` of two iovecs on the empty device
//!    (so the driver queues it and copies the iovecs): its completion
//!    `-ENOMEM` when failed; queued otherwise, then `io_cancel`led
//!    (completion `-ECANCELED`).
//! 7. `reset`: `QW_IOC_RESET`, whose restart sets up new virtqueues and
//!    receive buffers: `ENOMEM` and a broken device (a read `EIO`) until
//!    the next reset when failed, else a working device.
//!
//! Then kmemleak scans (after its 5 s minimum object age) and every
//! unreferenced object is a problem: its size, task and driver frames are
//! in `leaks`. Objects already unreferenced before the walks are cleared
//! first (`leaks_before` counts them); kmemleak's `verbose` parameter is
//! set so that what it finds is also in the kernel log, where the host's
//! splat scan sees it.
//!
//! Fields: `module_text` (the filter's range), `kmemleak`, one object per
//! path (`open`, `write`, `aio_write`, `probe`, `read`, `aio_read`,
//! `reset`) with
//! `calls` (N tried), `injected` (failures injected), `errors` (each
//! outcome with its count), `sites` (each distinct site with its count and
//! outcomes) and `complete` (a call ran clean), then `leaks_before`,
//! `scan_ms`, `leaks`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{errno_name, last_errno, nap, open_device, os_err, wait_for_chardev};
use crate::common::{write_sysfs, Access};
use crate::scenarios::teardown::bound_device;
use crate::scenarios::Checked;
use crate::uapi::aio_abi::{Ctx, IoEvent, Iocb, IOCB_CMD_PWRITE};
use crate::uapi::ioctl_plain;
use crate::uapi::qw::{DRIVER, QW_IOC_RESET};
use crate::{json_str, ready, Opts};

const DEBUGFS: &str = "/sys/kernel/debug";
const FAIL_NTH: &str = "/proc/thread-self/fail-nth";
const KMEMLEAK: &str = "/sys/kernel/debug/kmemleak";
const KMEMLEAK_VERBOSE: &str = "/sys/module/kmemleak/parameters/verbose";
/// The fault-injection capabilities whose allocations N counts.
const CAPABILITIES: [&str; 2] = ["failslab", "fail_page_alloc"];
/// Static functions of mm/kmemleak.c that every one of its bookkeeping
/// allocations runs under (its metadata in `__alloc_object`, the stack
/// depot's pages in `__create_object`): they sit together in its text
/// (its exported entry points are placed elsewhere), and the reject
/// range spans them.
const KMEMLEAK_FNS: &[&str] = &["__alloc_object", "__create_object", "__link_object"];
/// `IOCB_CMD_PREADV` of `<linux/aio_abi.h>`.
const IOCB_CMD_PREADV: u16 = 7;
/// No path may take more than this many allocations (a bound, not a goal).
const MAX_CALLS: u32 = 600;
/// A probe's node appears, or a removed one goes, this soon.
const NODE_LIMIT: Duration = Duration::from_secs(10);
/// An AIO completion comes this soon.
const AIO_LIMIT: Duration = Duration::from_secs(10);
/// kmemleak reports no object younger than this (its `jiffies_min_age`).
const KMEMLEAK_MIN_AGE: Duration = Duration::from_millis(5500);

// ---- fault injection ----

/// An inclusive-exclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First address.
    pub start: u64,
    /// First address past it.
    pub end: u64,
}

/// The most kmemleak's text can span: more means a name matched
/// elsewhere, and the reject range would swallow the kernel.
pub const KMEMLEAK_SPAN_MAX: u64 = 0x20000;

/// The text of `module` and the span of the kernel functions `fns` in a
/// `/proc/kallsyms` listing: each from its lowest text symbol to the
/// first symbol of any kind after its highest one. A name of `fns` listed
/// more than once (a static function of the same name elsewhere) is not
/// used, and a span over [`KMEMLEAK_SPAN_MAX`] is none.
pub fn kallsyms_ranges(text: &str, module: &str, fns: &[&str]) -> (Option<Range>, Option<Range>) {
    let tag = format!("[{module}]");
    let mut all = Vec::new();
    let mut m: Vec<u64> = Vec::new();
    let mut k: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr, 16) else {
            continue;
        };
        all.push(addr);
        let is_text = matches!(kind, "t" | "T");
        match w.next() {
            Some(owner) if owner == tag && is_text => m.push(addr),
            None if is_text && fns.contains(&name) => k.entry(name).or_default().push(addr),
            _ => {}
        }
    }
    let k: Vec<u64> = k.values().filter(|v| v.len() == 1).map(|v| v[0]).collect();
    let span = |v: &[u64]| -> Option<Range> {
        let (lo, hi) = (*v.iter().min()?, *v.iter().max()?);
        let end = all.iter().copied().filter(|&a| a > hi).min();
        Some(Range {
            start: lo,
            end: end.unwrap_or(hi + 0x10000),
        })
    };
    let k = span(&k).filter(|r| r.end - r.start <= KMEMLEAK_SPAN_MAX);
    (span(&m), k)
}

/// The frames of a stack dump (`func+0x1a/0x40 [module]`), innermost first:
/// (function, module).
fn frames(lines: &[String]) -> Vec<(String, Option<String>)> {
    lines
        .iter()
        .filter_map(|l| {
            let l = l.trim();
            // "? f+0x1/0x2": a stale address the unwinder found on the
            // stack, not a caller.
            if l.starts_with('?') {
                return None;
            }
            let (sym, rest) = l.split_once(' ').map_or((l, ""), |(s, r)| (s, r.trim()));
            let (func, off) = sym.split_once('+')?;
            if !off.starts_with("0x") || func.is_empty() {
                return None;
            }
            let module = rest
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string);
            Some((func.to_string(), module))
        })
        .collect()
}

/// Where an injected failure hit, from the kernel's report of it (the
/// `/dev/kmsg` messages after the call): `capability: drv_fn<caller<... ->
/// callee`, or why it cannot be told.
pub fn site_of(messages: &[String], module: &str) -> String {
    let Some(at) = messages
        .iter()
        .position(|m| m.contains("FAULT_INJECTION: forcing a failure"))
    else {
        return "unnamed (no report: the allocation asked for __GFP_NOWARN)".into();
    };
    // The capability's name follows in the same message (or, on a kernel
    // that splits it at the newline, the next one).
    let head = messages[at..]
        .iter()
        .take(2)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let cap = CAPABILITIES
        .iter()
        .find(|c| head.contains(&format!("name {c},")))
        .copied()
        .unwrap_or("?");
    let fr = frames(&messages[at + 1..]);
    let ours = |f: &(String, Option<String>)| f.1.as_deref() == Some(module);
    let Some(first) = fr.iter().position(ours) else {
        return format!("{cap}: no {module} frame in the report");
    };
    let chain: Vec<&str> = fr[first..]
        .iter()
        .take_while(|f| ours(f))
        .map(|f| f.0.as_str())
        .collect();
    let callee = first.checked_sub(1).map_or("?", |i| fr[i].0.as_str());
    format!("{cap}: {} -> {callee}", chain.join("<"))
}

/// The fault-injection set-up: the kernel log, for each failure's report.
struct Injector {
    kmsg: OwnedFd,
}

impl Injector {
    /// Mount debugfs if needed, point both capabilities' filters at the
    /// module's text (rejecting kmemleak's), make every allocation type
    /// count and every failure report its stack.
    fn new(c: &mut Checked) -> Result<Self, String> {
        mount_debugfs()?;
        let cap_dir = |cap: &str| Path::new(DEBUGFS).join(cap);
        if !cap_dir("failslab").exists() || !Path::new(FAIL_NTH).exists() {
            return Err(format!(
                "no {DEBUGFS}/failslab or {FAIL_NTH}: this kernel lacks CONFIG_FAULT_INJECTION, \
                 FAILSLAB or FAULT_INJECTION_DEBUG_FS (run on the lockdep kernel, \
                 images/lab-kernel-lockdep.config)"
            ));
        }
        let syms = std::fs::read_to_string("/proc/kallsyms")
            .map_err(|e| format!("/proc/kallsyms: {e}"))?;
        let (text, kmemleak) = kallsyms_ranges(&syms, DRIVER, KMEMLEAK_FNS);
        let text = text
            .filter(|r| r.start != 0)
            .ok_or_else(|| format!("no {DRIVER} text symbols in /proc/kallsyms (is it loaded?)"))?;
        c.report
            .text("module_text", &format!("{:#x}-{:#x}", text.start, text.end));
        let k = kmemleak.map_or("none".into(), |k| format!("{:#x}-{:#x}", k.start, k.end));
        c.report.text("kmemleak_text", &k);
        for cap in CAPABILITIES {
            let d = cap_dir(cap);
            if !d.join("require-start").exists() {
                return Err(format!(
                    "no {}/require-start: the kernel lacks CONFIG_FAULT_INJECTION_STACKTRACE_FILTER",
                    d.display()
                ));
            }
            let mut set = vec![
                ("ignore-gfp-wait", "N".to_string()),
                ("probability", "0".into()),
                ("verbose", "2".into()),
                ("verbose_ratelimit_interval_ms", "0".into()),
                ("stacktrace-depth", "32".into()),
                ("require-start", format!("{:#x}", text.start)),
                ("require-end", format!("{:#x}", text.end)),
            ];
            if let Some(k) = kmemleak {
                set.push(("reject-start", format!("{:#x}", k.start)));
                set.push(("reject-end", format!("{:#x}", k.end)));
            }
            if cap == "fail_page_alloc" {
                set.push(("ignore-gfp-highmem", "N".into()));
                set.push(("min-order", "0".into()));
            }
            for (file, value) in set {
                write_sysfs(&d.join(file), &value)?;
            }
        }
        // As the kernel took it, for the record.
        let back: Vec<String> = [
            "ignore-gfp-wait",
            "require-start",
            "require-end",
            "reject-start",
            "reject-end",
        ]
        .iter()
        .map(|f| {
            let v = std::fs::read_to_string(cap_dir("failslab").join(f)).unwrap_or_default();
            format!("{f}={}", v.trim())
        })
        .collect();
        c.report.text("failslab", &back.join(" "));
        let kmsg = open_kmsg()?;
        Ok(Self { kmsg })
    }

    /// Make this thread's `n`-th counted allocation fail.
    fn arm(&mut self, n: u32) -> Result<(), String> {
        self.drain();
        self.set(n)
    }

    /// The file has no seek and keeps its position: each access opens it
    /// afresh (none of that is counted: no driver frame).
    fn set(&mut self, n: u32) -> Result<(), String> {
        write_sysfs(Path::new(FAIL_NTH), &n.to_string())
    }

    /// Whether the armed failure happened (`fail-nth` counted down to 0);
    /// disarms it either way.
    fn disarm(&mut self) -> Result<bool, String> {
        let s =
            std::fs::read_to_string(FAIL_NTH).map_err(|e| format!("reading {FAIL_NTH}: {e}"))?;
        let left: u64 = s
            .trim()
            .parse()
            .map_err(|e| format!("{FAIL_NTH} reads {s:?}: {e}"))?;
        if left != 0 {
            self.set(0)?;
        }
        Ok(left == 0)
    }

    /// The kernel log's new messages.
    fn drain(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: reads at most buf.len() bytes into buf.
            let n =
                unsafe { libc::read(self.kmsg.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                // EPIPE: records were overwritten; the next read goes on.
                if last_errno() == libc::EPIPE {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n as usize]);
            let first = rec.lines().next().unwrap_or("");
            let msg = first.split_once(';').map_or(first, |(_, m)| m);
            out.push(msg.replace("\\x0a", "\n"));
        }
        out
    }
}

fn mount_debugfs() -> Result<(), String> {
    if Path::new(DEBUGFS).join("failslab").exists() || Path::new(KMEMLEAK).exists() {
        return Ok(());
    }
    let cstr = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dir, ty) = (cstr("debugfs"), cstr(DEBUGFS), cstr("debugfs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let r = unsafe { libc::mount(src.as_ptr(), dir.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) };
    if r != 0 && last_errno() != libc::EBUSY {
        return Err(os_err(&format!("mount debugfs on {DEBUGFS}")));
    }
    Ok(())
}

/// `/dev/kmsg`, non-blocking, positioned at the end of the log.
fn open_kmsg() -> Result<OwnedFd, String> {
    let path = std::ffi::CString::new("/dev/kmsg").expect("no NUL");
    // SAFETY: valid path; the descriptor is owned below.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(os_err("open /dev/kmsg"));
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain lseek on our descriptor.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    Ok(fd)
}

// ---- walks ----

/// What one call gave: an errno, or a success with a detail.
type Outcome = Result<String, i32>;

/// One N of a walk.
#[derive(Debug, Clone)]
struct Attempt {
    injected: bool,
    outcome: Outcome,
    site: Option<String>,
}

fn outcome_text(o: &Outcome) -> String {
    match o {
        Ok(s) => s.clone(),
        Err(e) => errno_name(*e),
    }
}

/// A path's walk: N = 1, 2, ... until no failure was injected.
#[derive(Debug, Default)]
struct Walk {
    attempts: Vec<Attempt>,
    complete: bool,
}

impl Walk {
    /// `{"calls":..,"injected":..,"errors":{..},"sites":{site:{outcome:count}},"complete":..}`.
    fn json(&self) -> String {
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut sites: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for a in self.attempts.iter().filter(|a| a.injected) {
            let o = outcome_text(&a.outcome);
            *errors.entry(o.clone()).or_default() += 1;
            let site = a.site.clone().unwrap_or_default();
            *sites.entry(site).or_default().entry(o).or_default() += 1;
        }
        let map = |m: &BTreeMap<String, u64>| {
            let v: Vec<String> = m
                .iter()
                .map(|(k, n)| format!("{}:{n}", json_str(k)))
                .collect();
            format!("{{{}}}", v.join(","))
        };
        let sites: Vec<String> = sites
            .iter()
            .map(|(s, m)| format!("{}:{}", json_str(s), map(m)))
            .collect();
        format!(
            "{{\"calls\":{},\"injected\":{},\"errors\":{},\"sites\":{{{}}},\"complete\":{}}}",
            self.attempts.len(),
            self.attempts.iter().filter(|a| a.injected).count(),
            map(&errors),
            sites.join(","),
            self.complete
        )
    }

    /// Every injected failure's site, with its N.
    fn sites(&self) -> impl Iterator<Item = (u32, &str)> {
        self.attempts
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i as u32 + 1, a.site.as_deref()?)))
    }
}

/// Walk one path: `call` runs with the N-th allocation armed to fail;
/// `after` then judges the attempt and restores the starting state (both
/// unarmed), returning what did not hold.
fn walk(
    inj: &mut Injector,
    c: &mut Checked,
    path: &str,
    mut call: impl FnMut() -> Outcome,
    mut after: impl FnMut(&Attempt) -> Vec<String>,
) -> Walk {
    let mut w = Walk::default();
    for n in 1..=MAX_CALLS {
        if let Err(e) = inj.arm(n) {
            c.fail(format!("{path}: {e}"));
            return w;
        }
        let outcome = call();
        let injected = match inj.disarm() {
            Ok(i) => i,
            Err(e) => {
                c.fail(format!("{path}: {e}"));
                return w;
            }
        };
        let site = injected.then(|| site_of(&inj.drain(), DRIVER));
        let a = Attempt {
            injected,
            outcome,
            site,
        };
        for p in after(&a) {
            let at = a.site.as_deref().unwrap_or("no failure injected");
            c.fail(format!("{path}, N={n} ({at}): {p}"));
        }
        w.attempts.push(a);
        if !injected {
            w.complete = true;
            return w;
        }
    }
    c.fail(format!(
        "{path}: still failing allocations after {MAX_CALLS} calls"
    ));
    w
}

/// `ENOMEM` when a failure was injected, else `ok` (what the call must
/// give without one).
fn expect_enomem(a: &Attempt, ok: &Outcome) -> Vec<String> {
    let want = if a.injected {
        Err(libc::ENOMEM)
    } else {
        ok.clone()
    };
    if a.outcome == want {
        Vec::new()
    } else {
        vec![format!(
            "gave {}, not {}",
            outcome_text(&a.outcome),
            outcome_text(&want)
        )]
    }
}

fn open_rdwr(dev: &str, nonblock: bool) -> Result<OwnedFd, i32> {
    let c = std::ffi::CString::new(dev).map_err(|_| libc::EINVAL)?;
    let flags = libc::O_RDWR | libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: valid path; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn write_one(fd: RawFd) -> Outcome {
    let b = [0x5au8];
    // SAFETY: one valid byte.
    let n = unsafe { libc::write(fd, b.as_ptr().cast(), 1) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(format!("returned {n}"))
    }
}

fn read_some(fd: RawFd) -> Outcome {
    let mut b = [0u8; 4096];
    // SAFETY: room for b.len() bytes.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
    if n < 0 {
        Err(last_errno())
    } else {
        Ok(format!("returned {n}"))
    }
}

// ---- native AIO ----

fn submit(ctx: &Ctx, iocb: &mut Iocb) -> Result<(), i32> {
    let mut p = iocb as *mut Iocb;
    // SAFETY: one valid iocb pointer; its buffers outlive the request
    // (the caller reaps it before they go).
    let r = unsafe { libc::syscall(libc::SYS_io_submit, ctx.0, 1 as libc::c_long, &mut p) };
    if r == 1 {
        Ok(())
    } else {
        Err(if r < 0 { last_errno() } else { libc::EAGAIN })
    }
}

/// The next completion within `limit`: its result.
fn reap(ctx: &Ctx, limit: Duration) -> Result<i64, String> {
    let mut ev = IoEvent::default();
    let ts = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: room for one event; a valid timeout; a live context.
    let got = unsafe {
        libc::syscall(
            libc::SYS_io_getevents,
            ctx.0,
            1 as libc::c_long,
            1 as libc::c_long,
            &mut ev as *mut IoEvent,
            &ts as *const libc::timespec,
        )
    };
    match got {
        1 => Ok(ev.res),
        0 => Err(format!("no AIO completion within {limit:?}")),
        _ => Err(os_err("io_getevents")),
    }
}

/// An AIO result as an outcome: a count, or the negated errno.
fn aio_outcome(res: i64) -> Outcome {
    if res < 0 {
        Err((-res) as i32)
    } else {
        Ok(format!("returned {res}"))
    }
}

/// One-byte `IOCB_CMD_PWRITE`, reaped.
fn aio_write_one(ctx: &Ctx, fd: RawFd) -> Outcome {
    let b = [0xa5u8];
    let mut iocb = Iocb {
        aio_lio_opcode: IOCB_CMD_PWRITE,
        aio_fildes: fd as u32,
        aio_buf: b.as_ptr() as u64,
        aio_nbytes: 1,
        ..Iocb::default()
    };
    submit(ctx, &mut iocb)?;
    reap(ctx, AIO_LIMIT).map_or(Err(libc::ETIMEDOUT), aio_outcome)
}

/// A two-iovec `IOCB_CMD_PREADV` of the empty device: it completes at once
/// (an error) or is queued, and is then cancelled; either way reaped.
/// `Ok("queued")` when it was queued and completed `-ECANCELED`.
fn aio_readv(ctx: &Ctx, fd: RawFd) -> Outcome {
    let mut a = [0u8; 512];
    let mut b = [0u8; 512];
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let mut iocb = Iocb {
        aio_lio_opcode: IOCB_CMD_PREADV,
        aio_fildes: fd as u32,
        aio_buf: iov.as_ptr() as u64,
        aio_nbytes: iov.len() as u64,
        ..Iocb::default()
    };
    submit(ctx, &mut iocb)?;
    let mut ev = IoEvent::default();
    // SAFETY: the iocb we submitted and room for one event.
    unsafe { libc::syscall(libc::SYS_io_cancel, ctx.0, &mut iocb as *mut Iocb, &mut ev) };
    match reap(ctx, AIO_LIMIT) {
        Ok(r) if r == -(libc::ECANCELED as i64) => Ok("queued, cancelled".into()),
        Ok(r) => aio_outcome(r),
        Err(_) => Err(libc::ETIMEDOUT),
    }
}

// ---- probe ----

/// The driver's `bind`/`unbind` files and the device's name.
struct Binding {
    dir: PathBuf,
    name: String,
    dev: String,
}

impl Binding {
    fn unbind(&self) -> Result<(), String> {
        write_sysfs(&self.dir.join("unbind"), &self.name)?;
        wait_gone(&self.dev)
    }

    fn bind(&self) -> Outcome {
        let path = self.dir.join("bind");
        let c =
            std::ffi::CString::new(path.to_string_lossy().as_bytes()).map_err(|_| libc::EINVAL)?;
        // SAFETY: valid path; closed below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: valid bytes of the name.
        let n = unsafe { libc::write(fd.as_raw_fd(), self.name.as_ptr().cast(), self.name.len()) };
        if n < 0 {
            Err(last_errno())
        } else {
            Ok("bound".into())
        }
    }

    fn bound(&self) -> bool {
        self.dir.join(&self.name).exists()
    }
}

fn wait_gone(dev: &str) -> Result<(), String> {
    let start = Instant::now();
    while Path::new(dev).exists() {
        if start.elapsed() > NODE_LIMIT {
            return Err(format!("{dev} still there {NODE_LIMIT:?} after the unbind"));
        }
        nap(Duration::from_millis(10));
    }
    Ok(())
}

/// A device that probe left bound must work: it opens, an empty read
/// gives `EAGAIN`, a byte can be written.
fn check_works(dev: &str) -> Vec<String> {
    if let Err(e) = wait_for_chardev(dev, NODE_LIMIT) {
        return vec![format!("bound, but {e}")];
    }
    let fd = match open_rdwr(dev, true) {
        Ok(fd) => fd,
        Err(e) => return vec![format!("bound, but open: {}", errno_name(e))],
    };
    let mut p = Vec::new();
    let r = read_some(fd.as_raw_fd());
    if r != Err(libc::EAGAIN) {
        p.push(format!(
            "bound, but an empty read gave {}",
            outcome_text(&r)
        ));
    }
    let w = write_one(fd.as_raw_fd());
    if w != Ok("returned 1".into()) {
        p.push(format!("bound, but a write gave {}", outcome_text(&w)));
    }
    p
}

/// After one probe attempt: judge it, and leave the device unbound for
/// the next N (bound if the attempt ran clean).
fn after_probe(b: &Binding, a: &Attempt) -> Vec<String> {
    let mut p = Vec::new();
    match &a.outcome {
        Err(e) => {
            if !a.injected {
                p.push(format!(
                    "bind failed with {} without an injected failure",
                    errno_name(*e)
                ));
            }
            if b.bound() || Path::new(&b.dev).exists() {
                p.push(format!(
                    "the probe failed ({}), but the device is bound",
                    errno_name(*e)
                ));
                let _ = b.unbind();
            }
        }
        Ok(_) => {
            p.extend(check_works(&b.dev));
            if a.injected {
                if let Err(e) = b.unbind() {
                    p.push(e);
                }
            }
        }
    }
    p
}

fn probe_walk(inj: &mut Injector, c: &mut Checked, b: &Binding) -> Walk {
    if let Err(e) = b.unbind() {
        c.fail(format!("probe: the first unbind: {e}"));
        return Walk::default();
    }
    let w = walk(inj, c, "probe", || b.bind(), |a| after_probe(b, a));
    if !b.bound() {
        // Leave the device bound for what follows, whatever happened.
        let _ = b.bind();
    }
    w
}

/// The receive buffers' allocation in probe (`qw_rx_buf_alloc()` is
/// inlined into `qw_rx_fill()`).
const RX_FILL_IN_PROBE: &str = "qw_rx_fill<qw_probe";

/// Bind the device again with its last receive buffer's allocation failed
/// (near the probe walk's last [`RX_FILL_IN_PROBE`] site: a probe's count
/// can differ by one or two from the walk's, e.g. when the minor's IDA
/// already has its bitmap), so that it starts one buffer short and a read
/// has to top the ring up.
fn bind_short(inj: &mut Injector, b: &Binding, probe: &Walk) -> Result<(), String> {
    let (last, _) = probe
        .sites()
        .filter(|(_, s)| s.contains(RX_FILL_IN_PROBE))
        .last()
        .ok_or("the probe walk reached no receive-buffer allocation (qw_rx_fill<qw_probe)")?;
    let mut seen = Vec::new();
    for n in [0i64, -1, -2, 1, -3, 2, -4].map(|d| (last as i64 + d).max(1) as u32) {
        b.unbind()?;
        inj.arm(n)?;
        let r = b.bind();
        let injected = inj.disarm()?;
        let site = site_of(&inj.drain(), DRIVER);
        if injected && r.is_ok() && site.contains(RX_FILL_IN_PROBE) {
            return wait_for_chardev(&b.dev, NODE_LIMIT).map(|_| ());
        }
        seen.push(format!("N={n}: {} at {site}", outcome_text(&r)));
        if !b.bound() {
            let _ = b.bind();
        }
    }
    Err(format!(
        "no bind near allocation {last} left the probe one rx buffer short: {}",
        seen.join("; ")
    ))
}

// ---- kmemleak ----

/// kmemleak's report: one entry per unreferenced object, its first line
/// (`unreferenced object 0x... (size N):`), task and driver frames.
pub fn parse_kmemleak(text: &str) -> Vec<String> {
    let mut leaks = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("unreferenced object ") {
            leaks.extend(cur.take());
            cur = Some(rest.trim_end_matches(':').to_string());
        } else if let Some(cur) = cur.as_mut() {
            if let Some(comm) = t.strip_prefix("comm ") {
                let _ = write!(cur, " comm {}", comm.split(',').next().unwrap_or(""));
            } else if t.contains("[vdevlab_qw]") || t.contains("[vdevlab_") {
                let f = t
                    .split(['+', ' '])
                    .find(|w| !w.starts_with("[<"))
                    .unwrap_or(t);
                let _ = write!(cur, " <{f}");
            }
        }
    }
    leaks.extend(cur);
    leaks
}

/// kmemleak's scan, then its report.
fn kmemleak_scan() -> Result<(String, Duration), String> {
    let t = Instant::now();
    write_sysfs(Path::new(KMEMLEAK), "scan")?;
    let text = std::fs::read_to_string(KMEMLEAK).map_err(|e| format!("{KMEMLEAK}: {e}"))?;
    Ok((text, t.elapsed()))
}

/// Before the walks: kmemleak must be on; what it already finds is
/// cleared (counted in `leaks_before`), and later finds go to the log.
fn kmemleak_start(c: &mut Checked) -> Result<bool, String> {
    if !Path::new(KMEMLEAK).exists() {
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        let why = if cmdline.contains("kmemleak=on") {
            "booted with kmemleak=on, but kmemleak is off (it failed: see the kernel log)"
        } else {
            "kmemleak is off: boot a kernel with CONFIG_DEBUG_KMEMLEAK (the lockdep kernel) with kmemleak=on"
        };
        c.report.text("kmemleak", "off");
        // The walks still run; the result fails for want of the leak check.
        c.fail(format!("no {KMEMLEAK}: {why}"));
        return Ok(false);
    }
    c.report.text("kmemleak", "on");
    let (text, _) = kmemleak_scan()?;
    c.report
        .num("leaks_before", parse_kmemleak(&text).len() as u64);
    write_sysfs(Path::new(KMEMLEAK), "clear")?;
    if Path::new(KMEMLEAK_VERBOSE).exists() {
        write_sysfs(Path::new(KMEMLEAK_VERBOSE), "1")?;
    }
    Ok(true)
}

fn kmemleak_end(c: &mut Checked) {
    nap(KMEMLEAK_MIN_AGE);
    // Twice: an object whose last pointer was in flight during the first
    // scan (a register, a list being spliced) is found by the second.
    let scanned = kmemleak_scan().and_then(|_| kmemleak_scan());
    match scanned {
        Ok((text, took)) => {
            let leaks = parse_kmemleak(&text);
            c.report.num("scan_ms", took.as_millis() as u64);
            let list: Vec<String> = leaks.iter().map(|l| json_str(l)).collect();
            c.report.raw("leaks", &format!("[{}]", list.join(",")));
            c.check(leaks.is_empty(), || {
                format!(
                    "kmemleak: {} unreferenced objects: {}",
                    leaks.len(),
                    leaks.join("; ")
                )
            });
        }
        Err(e) => c.fail(format!("kmemleak: {e}")),
    }
}

// ---- the scenario ----

/// Run `alloc-faults`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    let mut c = Checked::new();
    let sysfs = Path::new("/sys");
    let binding = Binding {
        dir: sysfs.join("bus/virtio/drivers").join(DRIVER),
        name: bound_device(sysfs, &o.device)?,
        dev: o.device.clone(),
    };
    let mut inj = Injector::new(&mut c)?;
    let kmemleak = kmemleak_start(&mut c)?;
    ready(&o.scenario);

    let dev = o.device.clone();
    let w = walk(
        &mut inj,
        &mut c,
        "open",
        || open_rdwr(&dev, true).map(|_| "opened".into()),
        |a| expect_enomem(a, &Ok("opened".into())),
    );
    c.report.raw("open", &w.json());

    let fd =
        open_rdwr(&o.device, true).map_err(|e| format!("open {}: {}", o.device, errno_name(e)))?;
    let one = Ok("returned 1".to_string());
    let w = walk(
        &mut inj,
        &mut c,
        "write",
        || write_one(fd.as_raw_fd()),
        |a| expect_enomem(a, &one),
    );
    c.report.raw("write", &w.json());

    let afd = open_device(&o.device, Access::ReadWrite, false)?;
    let ctx = Ctx::new(4)?;
    let w = walk(
        &mut inj,
        &mut c,
        "aio_write",
        || aio_write_one(&ctx, afd.as_raw_fd()),
        |a| expect_enomem(a, &one),
    );
    c.report.raw("aio_write", &w.json());
    drop((fd, afd, ctx));

    let probe = probe_walk(&mut inj, &mut c, &binding);
    c.report.raw("probe", &probe.json());

    match bind_short(&mut inj, &binding, &probe) {
        Ok(()) => read_walks(&mut inj, &mut c, &o.device),
        Err(e) => c.fail(format!("read: {e}")),
    }
    reset_walk(&mut inj, &mut c, &o.device);
    if kmemleak {
        kmemleak_end(&mut c);
    }
    Ok(c)
}

/// The `read` and `aio_read` walks on a device one receive buffer short.
fn read_walks(inj: &mut Injector, c: &mut Checked, dev: &str) {
    let fd = match open_rdwr(dev, true) {
        Ok(fd) => fd,
        Err(e) => return c.fail(format!("read: open {dev}: {}", errno_name(e))),
    };
    let w = walk(
        inj,
        c,
        "read",
        || read_some(fd.as_raw_fd()),
        |a| match a.outcome {
            Err(libc::EAGAIN) => Vec::new(),
            Err(libc::ENOMEM) if a.injected => Vec::new(),
            ref r => vec![format!("gave {}, not EAGAIN", outcome_text(r))],
        },
    );
    c.report.raw("read", &w.json());

    let (afd, ctx) = match (open_device(dev, Access::ReadWrite, false), Ctx::new(4)) {
        (Ok(f), Ok(x)) => (f, x),
        (Err(e), _) | (_, Err(e)) => return c.fail(format!("aio_read: {e}")),
    };
    let queued = Ok("queued, cancelled".to_string());
    let w = walk(
        inj,
        c,
        "aio_read",
        || aio_readv(&ctx, afd.as_raw_fd()),
        |a| expect_enomem(a, &queued),
    );
    c.report.raw("aio_read", &w.json());
}

/// The `reset` walk: `QW_IOC_RESET` (its restart sets up new virtqueues
/// and receive buffers). A failed restart must give `ENOMEM` and leave the
/// device broken (a read `EIO`) until the next reset; a restart that
/// survived a failure must leave a working device.
fn reset_walk(inj: &mut Injector, c: &mut Checked, dev: &str) {
    let fd = match open_rdwr(dev, true) {
        Ok(fd) => fd,
        Err(e) => return c.fail(format!("reset: open {dev}: {}", errno_name(e))),
    };
    let reset = || ioctl_plain(fd.as_raw_fd(), QW_IOC_RESET).map(|()| "reset".to_string());
    let w = walk(inj, c, "reset", reset, |a| match a.outcome {
        Ok(_) => check_works(dev),
        Err(libc::ENOMEM) if a.injected => match read_some(fd.as_raw_fd()) {
            Err(libc::EIO) => Vec::new(),
            r => vec![format!(
                "the reset failed, but a read gave {}, not EIO (broken)",
                outcome_text(&r)
            )],
        },
        Err(e) => vec![format!("the reset gave {}", errno_name(e))],
    });
    c.report.raw("reset", &w.json());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_from_kallsyms() {
        let syms = "\
ffffffff81100000 T _stext
ffffffff81200000 t __alloc_object
ffffffff81200400 t __create_object
ffffffff81200800 t kmemleak_scan
ffffffff81200900 T next_thing
ffffffff81300000 t __link_object
ffffffff81400000 t __link_object
ffffffffc0000000 t qw_release\t[vdevlab_qw]
ffffffffc0000100 t qw_probe\t[vdevlab_qw]
ffffffffc0003000 d qw_driver\t[vdevlab_qw]
ffffffffc0001000 t other\t[othermod]
";
        let (m, k) = kallsyms_ranges(syms, "vdevlab_qw", KMEMLEAK_FNS);
        assert_eq!(
            m,
            Some(Range {
                start: 0xffffffffc0000000,
                end: 0xffffffffc0001000
            })
        );
        assert_eq!(
            k,
            Some(Range {
                start: 0xffffffff81200000,
                end: 0xffffffff81200800
            })
        );
        assert_eq!(
            kallsyms_ranges("", "vdevlab_qw", KMEMLEAK_FNS),
            (None, None)
        );
    }

    #[test]
    fn sites_from_fault_reports() {
        let log: Vec<String> = [
            "qw0: something before",
            "FAULT_INJECTION: forcing a failure.\nname failslab, interval 1, probability 0, space 0, times 0",
            "CPU: 0 UID: 0 PID: 77 Comm: vdevlab-guest Not tainted 6.12.118-vdevlab-lockdep #1",
            "Call Trace:",
            " <TASK>",
            " dump_stack_lvl+0x5d/0x80",
            " should_fail_ex+0x1a0/0x1f0",
            " should_failslab+0x4b/0x70",
            " __kmalloc_cache_noprof+0x55/0x2f0",
            " ? qw_probe+0x10/0x4c0 [vdevlab_qw]",
            " qw_rx_buf_alloc+0x1e/0x80 [vdevlab_qw]",
            " qw_rx_fill+0x6b/0x1a0 [vdevlab_qw]",
            " qw_probe+0x2a1/0x4c0 [vdevlab_qw]",
            " virtio_dev_probe+0x1c4/0x2b0",
            " </TASK>",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            site_of(&log, "vdevlab_qw"),
            "failslab: qw_rx_buf_alloc<qw_rx_fill<qw_probe -> __kmalloc_cache_noprof"
        );
        assert!(site_of(&log[..1], "vdevlab_qw").starts_with("unnamed"));
        assert!(site_of(&log[..9], "vdevlab_qw").contains("no vdevlab_qw frame"));
    }

    #[test]
    fn kmemleak_reports() {
        let text = "\
unreferenced object 0xffff888003a1c000 (size 4096):
  comm \"vdevlab-guest\", pid 77, jiffies 4294900000
  hex dump (first 32 bytes):
    00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00  ................
  backtrace (crc 1234abcd):
    [<ffffffff81234567>] __kmalloc_cache_noprof+0x1c1/0x2f0
    [<ffffffffc0000123>] qw_rx_buf_alloc+0x2e/0x80 [vdevlab_qw]
    [<ffffffffc0000456>] qw_rx_fill+0x6b/0x1a0 [vdevlab_qw]
unreferenced object 0xffff888003a1d000 (size 64):
  comm \"swapper/0\", pid 1, jiffies 4294890000
  backtrace (crc 0):
    [<ffffffff81234567>] kmalloc_trace+0x1c1/0x2f0
";
        assert_eq!(
            parse_kmemleak(text),
            [
                "0xffff888003a1c000 (size 4096) comm \"vdevlab-guest\" <qw_rx_buf_alloc <qw_rx_fill",
                "0xffff888003a1d000 (size 64) comm \"swapper/0\""
            ]
        );
        assert!(parse_kmemleak("").is_empty());
    }
}
