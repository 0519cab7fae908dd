//! `vdevlab-guest`: one static binary with a subcommand per scenario; it runs
//! inside the lab guest and talks to the host harness through the serial
//! console, one marker line per event:
//!
//! - `VDEVLAB-READY <scenario>`: the device is open and the program is about
//!   to block; the host may now inject;
//! - `VDEVLAB-RESULT {json}`: what the program observed (bytes, SHA-256 of
//!   the stream), which the host checks against what it injected.
//!
//! No argument parser crate: the guest binary stays small, and its arguments
//! are written by the harness, not by people.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use sha2::{Digest, Sha256};

struct Opts {
    scenario: String,
    device: String,
    bytes: u64,
    chunk: usize,
}

fn parse() -> Result<Opts, String> {
    let mut args = std::env::args().skip(1);
    let scenario = args
        .next()
        .ok_or("usage: vdevlab-guest SCENARIO [--device PATH] [--bytes N] [--chunk N]")?;
    let mut opts = Opts {
        scenario,
        device: "/dev/qw0".into(),
        bytes: 4096,
        chunk: 4096,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => opts.device = value,
            "--bytes" => opts.bytes = value.parse().map_err(|e| format!("--bytes {value}: {e}"))?,
            "--chunk" => opts.chunk = value.parse().map_err(|e| format!("--chunk {value}: {e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    if opts.chunk == 0 {
        return Err("--chunk must be at least 1".into());
    }
    Ok(opts)
}

fn marker(line: &str) {
    // The console is shared with the kernel's messages: write whole lines
    // in one call so they do not interleave mid-line.
    let mut out = io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

fn result(scenario: &str, ok: bool, fields: &str) {
    marker(&format!(
        "VDEVLAB-RESULT {{\"scenario\":\"{scenario}\",\"ok\":{ok}{fields}}}"
    ));
}

/// The seeds' first model: a blocking read() that sleeps in the driver until
/// the device's interrupt wakes it. Reads until `bytes` arrived, hashing the
/// stream, and counts how many read() calls it took (partial reads).
fn blocking_rx(o: &Opts) -> Result<String, String> {
    let file = OpenOptions::new()
        .read(true)
        .open(&o.device)
        .map_err(|e| format!("open {}: {e}", o.device))?;
    marker(&format!("VDEVLAB-READY {}", o.scenario));
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; o.chunk];
    let mut total: u64 = 0;
    let mut reads: u64 = 0;
    let mut head = Vec::new();
    while total < o.bytes {
        let want = (o.bytes - total).min(o.chunk as u64) as usize;
        // SAFETY: `buf` is a live, writable buffer of at least `want` bytes
        // and `file` keeps the descriptor open for the call.
        let n = unsafe { libc::read(file.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("read after {total} bytes: {e}"));
        }
        if n == 0 {
            return Err(format!("read returned 0 (end of file) after {total} bytes"));
        }
        let n = n as usize;
        if head.len() < 16 {
            let take = (16 - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hash.update(&buf[..n]);
        total += n as u64;
        reads += 1;
    }
    Ok(format!(
        ",\"bytes\":{total},\"reads\":{reads},\"sha256\":\"{}\",\"head\":\"{}\"",
        hex::encode(hash.finalize()),
        hex::encode(head)
    ))
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vdevlab-guest: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = match opts.scenario.as_str() {
        "blocking-rx" => blocking_rx(&opts),
        other => Err(format!("unknown scenario {other}")),
    };
    match outcome {
        Ok(fields) => {
            result(&opts.scenario, true, &fields);
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = e.replace('\\', "\\\\").replace('"', "\\\"");
            result(&opts.scenario, false, &format!(",\"error\":\"{e}\""));
            ExitCode::FAILURE
        }
    }
}
