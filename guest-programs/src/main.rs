//! `vdevlab-guest`: one static binary with a subcommand per scenario; it runs
//! inside the lab guest and talks to the host harness through the serial
//! console, one marker line per event:
//!
//! - `VDEVLAB-READY <scenario>`: the device is open and the program is about
//!   to wait on it; the host may now inject (rx) or drain the capture (tx);
//! - `VDEVLAB-RESULT {json}`: what the program observed (bytes, SHA-256 of
//!   the stream), which the host checks against what it injected/captured.
//!
//! `vdevlab-guest list` prints the scenario names, one a line.
//!
//! The robustness scenarios print more markers of their own
//! (`VDEVLAB-TEARDOWN <how>`, a second `VDEVLAB-READY ioctl-stats-2`) and
//! their result line keeps every field on failure, with `error` listing
//! each check that did not hold.
//!
//! No argument parser crate: the guest binary stays small, and its arguments
//! are written by the harness, not by people.

use std::process::ExitCode;

use vdevlab_guest::io_models::{
    blocking, epoll, linux_aio, mixed, nonblocking, poll, posix_aio, select, sigio, uring,
};
use vdevlab_guest::scenarios::teardown::How;
use vdevlab_guest::scenarios::{
    alloc_faults, carrier_change, echo, ioctl_stats, multi_open, needs_reset, pm_freeze, sensor,
    sensor_faults, stress, teardown, waiters, Checked,
};
use vdevlab_guest::{
    checked_result_line, marker, parse_args, result_line, split_scenario, Dir, Opts, Report, ECHO,
    MIXED, ROBUSTNESS, SCENARIOS,
};

/// A robustness scenario, or `None` for the I/O-model ones.
fn dispatch_robust(o: &Opts) -> Option<Result<Checked, String>> {
    Some(match o.scenario.as_str() {
        "teardown-unbind" => teardown::run(o, How::Unbind),
        "teardown-remove" => teardown::run(o, How::Remove),
        "ioctl-stats" => ioctl_stats::run(o),
        "pm-freeze" => pm_freeze::run(o),
        "multi-open" => multi_open::run(o),
        "needs-reset" => needs_reset::run(o),
        "alloc-faults" => alloc_faults::run(o),
        "trouble-removal"
        | "trouble-needs-reset"
        | "trouble-broken"
        | "trouble-reset"
        | "trouble-unplug"
        | "trouble-broken-tx" => waiters::run(o),
        "carrier-change" => carrier_change::run(o),
        _ => return None,
    })
}

fn dispatch(o: &Opts) -> Result<Report, String> {
    if o.scenario == MIXED {
        return mixed::run(o);
    }
    if ECHO.contains(&o.scenario.as_str()) {
        return echo::run(o);
    }
    let (model, dir) =
        split_scenario(&o.scenario).ok_or_else(|| format!("unknown scenario {}", o.scenario))?;
    match (model, dir) {
        ("blocking", _) => blocking::run(o, dir),
        ("nonblocking", _) => nonblocking::run(o, dir),
        ("select", _) => select::run(o, dir),
        ("poll", _) => poll::run(o, dir),
        ("epoll-lt", _) => epoll::run(o, dir, epoll::Trigger::Level),
        ("epoll-et", _) => epoll::run(o, dir, epoll::Trigger::Edge),
        ("sigio", _) => sigio::run(o, dir),
        ("posix-aio", Dir::Rx) => posix_aio::rx(o),
        ("posix-aio", Dir::Tx) => posix_aio::tx(o),
        ("linux-aio", Dir::Rx) => linux_aio::rx(o),
        ("linux-aio", Dir::Tx) => linux_aio::tx(o),
        ("io-uring", _) => uring::run(o, dir),
        (other, _) => Err(format!("model {other} has no implementation")),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("list") {
        let mut names = SCENARIOS.join("\n");
        names.push('\n');
        names.push_str(MIXED);
        for name in ROBUSTNESS
            .iter()
            .chain(sensor::SENSOR_SCENARIOS)
            .chain(sensor_faults::SENSOR_FAULT_SCENARIOS)
        {
            names.push('\n');
            names.push_str(name);
        }
        marker(&names);
        return ExitCode::SUCCESS;
    }
    // The sensor device's scenarios and the stress have options of their own.
    if let Some(outcome) = sensor::dispatch(&args)
        .or_else(|| stress::dispatch(&args))
        .or_else(|| sensor_faults::dispatch(&args))
    {
        let name = args.first().map(String::as_str).unwrap_or("");
        let (line, ok) = match outcome {
            Ok(c) => (
                checked_result_line(name, &c.report, &c.problems),
                c.problems.is_empty(),
            ),
            Err(e) => (result_line(name, &Err(e)), false),
        };
        marker(&line);
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let opts = match parse_args(args.iter().cloned()) {
        Ok(o) => o,
        Err(e) => {
            // Still a result line: the harness waits for one.
            let name = args.first().map(String::as_str).unwrap_or("");
            eprintln!("vdevlab-guest: {e}");
            marker(&result_line(name, &Err(e)));
            return ExitCode::from(2);
        }
    };
    let (line, ok) = match dispatch_robust(&opts) {
        Some(Ok(c)) => (
            checked_result_line(&opts.scenario, &c.report, &c.problems),
            c.problems.is_empty(),
        ),
        Some(Err(e)) => (result_line(&opts.scenario, &Err(e)), false),
        None => {
            let outcome = dispatch(&opts);
            (result_line(&opts.scenario, &outcome), outcome.is_ok())
        }
    };
    marker(&line);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
