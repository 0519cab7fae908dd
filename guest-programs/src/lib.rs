//! Shared parts of `vdevlab-guest`: the test pattern (which the host uses
//! too), the scenario list, argument parsing and the marker-line output;
//! the programs themselves are in the modules below.
//!
//! | module | what |
//! | --- | --- |
//! | [`protocol`] | the guest/host protocol: marker names, READY and RESULT lines |
//! | [`common`] | opening the device, rx/tx bookkeeping, system call wrappers |
//! | [`io_models`] | one module per Linux I/O model (`<model>-rx`/`-tx`, `mixed`) |
//! | [`scenarios`] | robustness, sensor and echo programs |
//! | [`uapi`] | the drivers' ioctls and structs, the native AIO ABI |
//!
//! A scenario is `<model>-<direction>`: `rx` moves bytes from the device to
//! the program (the host injects), `tx` from the program to the device (the
//! host captures). `mixed` runs a blocking reader and a blocking writer on
//! the same device at once. The [`ROBUSTNESS`] scenarios exercise the
//! driver's control paths (removal, ioctls, suspend) and many openers; they
//! need the real driver in a guest (except `multi-open`, which also runs on
//! a FIFO).

pub mod common;
pub mod io_models;
pub mod protocol;
pub mod scenarios;
pub mod uapi;

use std::fmt::Write as _;
use std::io::{self, Write};

/// The I/O models, in the order the lab reports them.
pub const MODELS: &[&str] = &[
    "blocking",
    "nonblocking",
    "select",
    "poll",
    "epoll-lt",
    "epoll-et",
    "sigio",
    "posix-aio",
    "linux-aio",
    "io-uring",
];

/// Every single-direction scenario: each model, receive then transmit.
pub const SCENARIOS: &[&str] = &[
    "blocking-rx",
    "blocking-tx",
    "nonblocking-rx",
    "nonblocking-tx",
    "select-rx",
    "select-tx",
    "poll-rx",
    "poll-tx",
    "epoll-lt-rx",
    "epoll-lt-tx",
    "epoll-et-rx",
    "epoll-et-tx",
    "sigio-rx",
    "sigio-tx",
    "posix-aio-rx",
    "posix-aio-tx",
    "linux-aio-rx",
    "linux-aio-tx",
    "io-uring-rx",
    "io-uring-tx",
];

/// The two-direction scenario: a reader thread and a writer thread on one
/// open device. Not in [`SCENARIOS`], which lists the single-direction ones.
pub const MIXED: &str = "mixed";

/// The driver-robustness scenarios (see [`scenarios::teardown`],
/// [`scenarios::ioctl_stats`], [`scenarios::pm_freeze`],
/// [`scenarios::multi_open`], [`scenarios::needs_reset`],
/// [`scenarios::waiters`]). Each reports
/// every observation, also on failure, and on failure its `error`
/// lists every check that did not hold.
pub const ROBUSTNESS: &[&str] = &[
    "teardown-unbind",
    "teardown-remove",
    "ioctl-stats",
    "pm-freeze",
    "multi-open",
    "needs-reset",
    "alloc-faults",
    "trouble-removal",
    "trouble-needs-reset",
    "trouble-broken",
    "trouble-reset",
    "trouble-unplug",
    "trouble-broken-tx",
    "carrier-change",
];

/// The echo scenarios of `vdevlab bench` ([`scenarios::echo`]): `echo-<model>`
/// for each of [`MODELS`]. Not printed by `list`, which names the test
/// suite's scenarios.
pub const ECHO: &[&str] = &[
    "echo-blocking",
    "echo-nonblocking",
    "echo-select",
    "echo-poll",
    "echo-epoll-lt",
    "echo-epoll-et",
    "echo-sigio",
    "echo-posix-aio",
    "echo-linux-aio",
    "echo-io-uring",
];

/// Whether `name` is a scenario this program runs.
pub fn known_scenario(name: &str) -> bool {
    name == MIXED || SCENARIOS.contains(&name) || ROBUSTNESS.contains(&name) || ECHO.contains(&name)
}

/// A seeded pseudo-random stream (xorshift64*), reproducible from its seed.
/// The host's `vdevlab_lab::scenario::pattern` is the same function: keep
/// the two identical.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device to program: the program reads.
    Rx,
    /// Program to device: the program writes.
    Tx,
}

/// Split a scenario name into its model and direction; `None` for names
/// that are not in [`SCENARIOS`] (including [`MIXED`]).
pub fn split_scenario(name: &str) -> Option<(&str, Dir)> {
    if !SCENARIOS.contains(&name) {
        return None;
    }
    if let Some(model) = name.strip_suffix("-rx") {
        Some((model, Dir::Rx))
    } else {
        name.strip_suffix("-tx").map(|model| (model, Dir::Tx))
    }
}

/// Largest `--chunk`: one buffer of this size is allocated per request.
pub const MAX_CHUNK: usize = 64 << 20;

/// Command line of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opts {
    /// Scenario name, one of [`SCENARIOS`], [`MIXED`] or [`ROBUSTNESS`].
    pub scenario: String,
    /// Path to open: the qw device in the guest, or any stream-like file
    /// (a FIFO, a character device) elsewhere.
    pub device: String,
    /// Bytes to move (each way, for `mixed`).
    pub bytes: u64,
    /// Largest request per read/write call (or AIO/io_uring request).
    pub chunk: usize,
    /// Seed of the transmitted pattern.
    pub seed: u64,
    /// Milliseconds to wait after `VDEVLAB-READY` before the first I/O
    /// ([`start`]): room for the host to arm a fault (a stalled queue)
    /// before the program's first request.
    pub pause_ms: u64,
}

/// One line of usage, for errors.
pub const USAGE: &str =
    "usage: vdevlab-guest SCENARIO [--device PATH] [--bytes N] [--chunk N] [--seed S] [--pause-ms MS] | vdevlab-guest list";

fn number(flag: &str, value: &str) -> Result<u64, String> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| format!("{flag} {value}: {e}"))
}

/// Parse the arguments after the program name. Options take a value, as
/// `--flag VALUE` or `--flag=VALUE`; numbers are decimal or `0x` hex.
pub fn parse_args<I>(args: I) -> Result<Opts, String>
where
    I: IntoIterator,
    I::Item: Into<String>,
{
    let mut args = args.into_iter().map(Into::into);
    let scenario = args.next().ok_or(USAGE)?;
    if !known_scenario(&scenario) {
        return Err(format!(
            "unknown scenario {scenario} (known: {}, {MIXED}, {})",
            SCENARIOS.join(", "),
            ROBUSTNESS.join(", ")
        ));
    }
    let mut opts = Opts {
        scenario,
        device: "/dev/qw0".into(),
        bytes: 4096,
        chunk: 4096,
        seed: 1,
        pause_ms: 0,
    };
    while let Some(arg) = args.next() {
        let (flag, value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), v.to_string()),
            _ => {
                let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
                (arg, value)
            }
        };
        match flag.as_str() {
            "--device" => {
                if value.is_empty() {
                    return Err("--device must not be empty".into());
                }
                opts.device = value;
            }
            "--bytes" => opts.bytes = number(&flag, &value)?,
            "--chunk" => {
                let n = number(&flag, &value)?;
                opts.chunk = usize::try_from(n)
                    .ok()
                    .filter(|&n| (1..=MAX_CHUNK).contains(&n))
                    .ok_or_else(|| format!("--chunk must be 1..={MAX_CHUNK}, not {value}"))?;
            }
            "--seed" => opts.seed = number(&flag, &value)?,
            "--pause-ms" => {
                opts.pause_ms = number(&flag, &value)?;
                if opts.pause_ms > 60_000 {
                    return Err(format!("--pause-ms must be at most 60000, not {value}"));
                }
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(opts)
}

/// A JSON string literal (quotes included) holding `s`.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The fields of a result line after `scenario` and `ok`, in order.
#[derive(Debug, Default, Clone)]
pub struct Report {
    fields: Vec<(String, String)>,
}

impl Report {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a number field.
    pub fn num(&mut self, key: &str, value: u64) -> &mut Self {
        self.fields.push((key.into(), value.to_string()));
        self
    }

    /// Add a string field.
    pub fn text(&mut self, key: &str, value: &str) -> &mut Self {
        self.fields.push((key.into(), json_str(value)));
        self
    }

    /// Add a field whose value is already JSON.
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.fields.push((key.into(), json.into()));
        self
    }

    /// Append another report's fields.
    pub fn extend(&mut self, other: Report) -> &mut Self {
        self.fields.extend(other.fields);
        self
    }

    /// The value of a field as it will be written (JSON), if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `,"k":v,...` for the result line.
    fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.fields {
            let _ = write!(out, ",{}:{v}", json_str(k));
        }
        out
    }
}

/// Print one marker line with a single write, so that it does not
/// interleave mid-line with kernel messages on the shared console (or with
/// another thread's line).
pub fn marker(line: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

/// `VDEVLAB-READY <scenario>`: the device is open and the program is about
/// to wait for it; the host may start injecting (or draining the capture).
pub fn ready(scenario: &str) {
    marker(&protocol::ready_line(scenario));
}

/// [`ready`], then wait `--pause-ms` (the host arms its fault meanwhile).
pub fn start(o: &Opts) {
    ready(&o.scenario);
    if o.pause_ms > 0 {
        common::nap(std::time::Duration::from_millis(o.pause_ms));
    }
}

/// The `VDEVLAB-RESULT {json}` line for an outcome.
pub fn result_line(scenario: &str, outcome: &Result<Report, String>) -> String {
    let body = match outcome {
        Ok(report) => format!("\"ok\":true{}", report.render()),
        Err(e) => format!("\"ok\":false,\"error\":{}", json_str(e)),
    };
    format!(
        "{} {{\"scenario\":{},{body}}}",
        protocol::RESULT,
        json_str(scenario)
    )
}

/// The result line of a run that checks many things and reports what it
/// saw either way: `ok` is true when `problems` is empty; otherwise
/// `error` joins the problems with `"; "`. The report's fields follow in
/// both cases.
pub fn checked_result_line(scenario: &str, report: &Report, problems: &[String]) -> String {
    let head = if problems.is_empty() {
        "\"ok\":true".to_string()
    } else {
        format!("\"ok\":false,\"error\":{}", json_str(&problems.join("; ")))
    };
    format!(
        "{} {{\"scenario\":{},{head}{}}}",
        protocol::RESULT,
        json_str(scenario),
        report.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_known_values() {
        // The first word for seed 1, spelled out.
        let mut x: u64 = 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let first = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        assert_eq!(&pattern(1, 8)[..], &first[..]);
        // Seed 0 and seed 1 are the same stream (seed | 1).
        assert_eq!(pattern(0, 100), pattern(1, 100));
        assert_ne!(pattern(2, 100), pattern(1, 100));
        // Pinned, so an accidental change to the generator shows up here
        // and not as a data mismatch in a lab run.
        assert_eq!(
            hex::encode(pattern(1, 16)),
            "1ddd6c894bcee4471d6579e0a8a6cfab"
        );
    }

    #[test]
    fn pattern_lengths_and_prefixes() {
        assert!(pattern(7, 0).is_empty());
        for len in [1, 7, 8, 9, 15, 16, 17, 1000, 4097] {
            let p = pattern(7, len);
            assert_eq!(p.len(), len);
            // A shorter stream is a prefix of a longer one with the same seed.
            assert_eq!(&pattern(7, 5000)[..len], &p[..]);
        }
    }

    #[test]
    fn scenario_list_is_models_times_directions() {
        let mut expected = Vec::new();
        for m in MODELS {
            expected.push(format!("{m}-rx"));
            expected.push(format!("{m}-tx"));
        }
        assert_eq!(SCENARIOS.len(), 20);
        assert_eq!(
            SCENARIOS,
            expected.iter().map(String::as_str).collect::<Vec<_>>()
        );
        for name in SCENARIOS {
            let (model, dir) = split_scenario(name).unwrap();
            assert!(MODELS.contains(&model));
            let suffix = if dir == Dir::Rx { "-rx" } else { "-tx" };
            assert_eq!(format!("{model}{suffix}"), *name);
        }
        assert_eq!(split_scenario(MIXED), None);
        assert_eq!(split_scenario("bogus-rx"), None);
    }

    #[test]
    fn parse_defaults() {
        let o = parse_args(["blocking-rx"]).unwrap();
        assert_eq!(
            o,
            Opts {
                scenario: "blocking-rx".into(),
                device: "/dev/qw0".into(),
                bytes: 4096,
                chunk: 4096,
                seed: 1,
                pause_ms: 0,
            }
        );
    }

    #[test]
    fn parse_all_options() {
        let o = parse_args([
            "epoll-et-tx",
            "--device",
            "/tmp/fifo",
            "--bytes",
            "100000",
            "--chunk=333",
            "--seed",
            "0xdeadBEEF",
        ])
        .unwrap();
        assert_eq!(o.scenario, "epoll-et-tx");
        assert_eq!(o.device, "/tmp/fifo");
        assert_eq!(o.bytes, 100_000);
        assert_eq!(o.chunk, 333);
        assert_eq!(o.seed, 0xdead_beef);
        // Later options win; `mixed` is accepted.
        let o = parse_args(["mixed", "--bytes", "1", "--bytes", "0"]).unwrap();
        assert_eq!(o.bytes, 0);
        assert_eq!(o.scenario, MIXED);
        for name in ROBUSTNESS {
            assert_eq!(parse_args([*name, "--bytes", "100"]).unwrap().bytes, 100);
            assert!(split_scenario(name).is_none());
            assert!(!SCENARIOS.contains(name));
        }
    }

    #[test]
    fn parse_errors() {
        let none: [&str; 0] = [];
        assert!(parse_args(none).unwrap_err().contains("usage"));
        assert!(parse_args(["nope"])
            .unwrap_err()
            .contains("unknown scenario"));
        assert!(parse_args(["poll-rx", "--bytes"])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse_args(["poll-rx", "--bytes", "-1"]).is_err());
        assert!(parse_args(["poll-rx", "--bytes", "12k"]).is_err());
        assert!(parse_args(["poll-rx", "--chunk", "0"]).is_err());
        assert!(parse_args(["poll-rx", "--chunk", &(MAX_CHUNK + 1).to_string()]).is_err());
        assert!(parse_args(["poll-rx", "--seed", "0xzz"]).is_err());
        assert!(parse_args(["poll-rx", "--device", ""]).is_err());
        assert!(parse_args(["poll-rx", "--frobnicate", "1"])
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_args(["poll-rx", "stray"]).is_err());
    }

    #[test]
    fn json_escaping_and_result_lines() {
        assert_eq!(json_str("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
        let mut r = Report::new();
        r.num("bytes", 3).text("sha256", "ab");
        assert_eq!(
            result_line("poll-rx", &Ok(r)),
            "VDEVLAB-RESULT {\"scenario\":\"poll-rx\",\"ok\":true,\"bytes\":3,\"sha256\":\"ab\"}"
        );
        assert_eq!(
            result_line("poll-rx", &Err("bad \"x\"\n".into())),
            "VDEVLAB-RESULT {\"scenario\":\"poll-rx\",\"ok\":false,\"error\":\"bad \\\"x\\\"\\n\"}"
        );
    }

    #[test]
    fn checked_result_lines_keep_fields_on_failure() {
        let mut r = Report::new();
        r.num("n", 1).text("read", "ENODEV");
        assert_eq!(
            checked_result_line("teardown-unbind", &r, &[]),
            "VDEVLAB-RESULT {\"scenario\":\"teardown-unbind\",\"ok\":true,\"n\":1,\"read\":\"ENODEV\"}"
        );
        assert_eq!(
            checked_result_line("x", &r, &["a".into(), "b \"c\"".into()]),
            "VDEVLAB-RESULT {\"scenario\":\"x\",\"ok\":false,\"error\":\"a; b \\\"c\\\"\",\"n\":1,\"read\":\"ENODEV\"}"
        );
    }
}
