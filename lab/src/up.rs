//! The interactive lab (`vdevlab up`): boot a guest with the device
//! attached and the driver loaded, and hand the user a shell on its serial
//! console. The device's control plane stays reachable from other
//! terminals (`vdevlab device -c <run>/ctl.sock ...`). Leaving the shell
//! (`exit`, Ctrl-D, `poweroff`) powers the guest off; Ctrl-] (or a signal)
//! kills it. Either way the VMM and the backend are stopped, the sockets
//! removed, the console kept and scanned for kernel splats, and the session
//! recorded in `runs.jsonl` (scenario `up`).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use vdevlab_guest::protocol;

use crate::cell::Cell;
use crate::engine;
use crate::env::Kernel;
use crate::guest::{BootSpec, Guest};
use crate::project::Project;
use crate::record::RunRecord;
use crate::scenario::BOOT_TIMEOUT;
use crate::splat::Splat;
use crate::Lab;

/// The escape byte that kills the VM: Ctrl-] (as telnet's).
pub const ESCAPE: u8 = 0x1d;

/// How a session ended.
#[derive(Debug)]
pub struct Session {
    /// The guest powered off by itself (not killed by Ctrl-] or a signal).
    pub powered_off: bool,
    /// Kernel splats seen on the console.
    pub splats: Vec<Splat>,
    /// The saved console.
    pub console: PathBuf,
    /// The session's record in `runs.jsonl`.
    pub record: RunRecord,
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// The terminal in raw mode while it lives (keys go to the guest one by
/// one, its line editing and echo are the guest's), restored on drop.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal.
    fn enter() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the file descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal and `saved` is a valid termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: a valid termios for the terminal on fd 0.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

fn say(msg: &str) {
    eprintln!("[vdevlab] {msg}");
}

/// Boot `kernel` with the qw device and the reference driver (or
/// `project`'s driver, device and files) and connect `input` and `output`
/// to its console until the guest powers off or the user escapes. When
/// stdin is a terminal (and `input` is it), it is put in raw mode for the
/// session.
pub fn up(
    lab: &Lab,
    kernel: &Kernel,
    project: Option<&Project>,
    cell: Cell,
    input: impl Read + Send + 'static,
    output: impl Write + Send + 'static,
) -> Result<Session> {
    let mut spec = BootSpec::new("up", Vec::new()).on_kernel(&kernel.name);
    spec.interactive = true;
    let what = match project {
        Some(p) => {
            let built = p.build(kernel)?;
            p.tune(&mut spec, &built);
            format!("{}.ko", p.module)
        }
        None => "vdevlab_qw.ko".to_string(),
    };
    let mut session = engine::Session::boot(lab, &lab.artifacts, kernel, cell, spec)?;
    let guest = &mut session.guest;
    let raw = guest.raw_console().context("no console stream")?;
    let to_guest = guest.console_input().context("no console input")?;
    greet(guest, kernel, &what);
    let echo = echo_console(raw, output)?;
    let ready = guest.wait_for(protocol::SHELL, BOOT_TIMEOUT);
    let powered_off = match &ready {
        Err(e) => {
            say(&format!("the guest did not get to its shell: {e:#}"));
            false
        }
        Ok(_) => {
            say("the guest shell is ready");
            interact(guest, input, to_guest)?
        }
    };
    let console = guest.console_path.clone();
    let ended = if powered_off {
        session.finish(Duration::from_secs(10))
    } else {
        session.abort()
    };
    let _ = echo.join();
    let record = ended.record(
        "up",
        ready.err().map(|e| format!("{e:#}")).into_iter().collect(),
    )?;
    say(&format!(
        "{}; backend stopped, sockets removed; console {}",
        if powered_off {
            "the guest powered off"
        } else {
            "the guest was stopped"
        },
        console.display()
    ));
    for s in &ended.splats {
        say(&format!("kernel {}: {}", s.kind, s.line.trim()));
    }
    Ok(Session {
        powered_off,
        splats: ended.splats,
        console,
        record,
    })
}

/// Where things are and how to drive the device from another terminal.
fn greet(guest: &Guest, kernel: &Kernel, what: &str) {
    say(&format!(
        "booting {} ({}) with {what}; run folder {}",
        kernel.name,
        kernel.release,
        guest.run_dir.display()
    ));
    say(&format!("control socket: {}", guest.control_path.display()));
    say(&format!(
        "sockets: {} (linked from the run folder; removed at the end)",
        guest.socket_dir().display()
    ));
    say("from another terminal, drive the device with e.g.");
    for cmd in [
        "stats",
        "inject --text hello",
        "capture",
        "fault '{\"kind\":\"drop_interrupts\",\"queue\":\"rx\",\"count\":1}'",
    ] {
        say(&format!(
            "    ./vdevlab device -c {} {cmd}",
            guest.control_path.display()
        ));
    }
    say("leave with `exit` or Ctrl-D (the guest powers off), or Ctrl-] (kills it)");
}

/// Show the console as it comes, until the shell has ended (the dmesg
/// dump after it is for the splat scan, not for the user).
fn echo_console(
    raw: std::sync::mpsc::Receiver<Vec<u8>>,
    mut output: impl Write + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    Ok(std::thread::Builder::new()
        .name("vdevlab-up-echo".into())
        .spawn(move || {
            let mut tail = Vec::new();
            for chunk in raw {
                let mut show: &[u8] = &chunk;
                tail.extend_from_slice(&chunk);
                let end = protocol::SHELL_END.as_bytes();
                if let Some(pos) = find(&tail, end) {
                    let keep = (pos + end.len()).saturating_sub(tail.len() - chunk.len());
                    show = &chunk[..keep.min(chunk.len())];
                    let _ = output.write_all(show);
                    let _ = output.write_all(b"\r\n");
                    let _ = output.flush();
                    break;
                }
                let cut = tail.len().saturating_sub(end.len());
                tail.drain(..cut);
                let _ = output.write_all(show);
                let _ = output.flush();
            }
        })?)
}

/// The user's session: input goes to the guest until the guest powers off
/// (true), or Ctrl-] or a signal ends it (false).
fn interact(
    guest: &mut Guest,
    input: impl Read + Send + 'static,
    mut to_guest: std::process::ChildStdin,
) -> Result<bool> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
    let quit = Arc::new(AtomicBool::new(false));
    let raw_mode = RawTerminal::enter();
    let q = quit.clone();
    std::thread::Builder::new()
        .name("vdevlab-up-input".into())
        .spawn(move || forward_input(input, &mut to_guest, &q))?;
    let powered_off = loop {
        if quit.load(Ordering::SeqCst) || SIGNALLED.load(Ordering::SeqCst) {
            break false;
        }
        if !guest.vmm_running() {
            break true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(raw_mode);
    Ok(powered_off)
}

/// Copy the user's input to the guest console until Ctrl-] (set `quit`) or
/// end of input (then send the guest shell an end of file, Ctrl-D, so
/// piped commands end the session once they ran).
fn forward_input(mut input: impl Read, to_guest: &mut impl Write, quit: &AtomicBool) {
    let mut buf = [0u8; 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to_guest.write_all(b"\n\x04");
                let _ = to_guest.flush();
                return;
            }
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if let Some(pos) = chunk.iter().position(|&b| b == ESCAPE) {
            let _ = to_guest.write_all(&chunk[..pos]);
            quit.store(true, Ordering::SeqCst);
            return;
        }
        if to_guest
            .write_all(chunk)
            .and_then(|_| to_guest.flush())
            .is_err()
        {
            return;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_stops_at_the_escape_and_ends_with_an_eof() {
        let quit = AtomicBool::new(false);
        let mut out = Vec::new();
        forward_input(&b"ls\n\x1dreboot\n"[..], &mut out, &quit);
        assert_eq!(out, b"ls\n");
        assert!(quit.load(Ordering::SeqCst));

        let quit = AtomicBool::new(false);
        let mut out = Vec::new();
        forward_input(&b"cat /proc/version\n"[..], &mut out, &quit);
        assert_eq!(out, b"cat /proc/version\n\n\x04");
        assert!(!quit.load(Ordering::SeqCst));
    }
}
