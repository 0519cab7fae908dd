//! `pm-freeze`: a system suspend test cycle (the driver's `freeze` and
//! `restore`) while a blocking reader waits on the device; the reader must
//! get every byte injected after the resume.
//!
//! 1. Needs the qw driver behind `--device` (`QW_IOC_GET_STATS` works;
//!    nothing is suspended otherwise) and `/sys/power/pm_test`
//!    (`CONFIG_PM_DEBUG`); without the latter the run fails with "no
//!    /sys/power/pm_test (kernel without CONFIG_PM_DEBUG)".
//! 2. A reader thread opens nothing new: it blocks in `read()` on its own
//!    descriptor of the device (it wants `--bytes` bytes).
//! 3. After 300 ms: `devices` to `/sys/power/pm_test`, then `freeze` (or
//!    `mem` if `/sys/power/state` has no `freeze`) to `/sys/power/state`.
//!    The kernel freezes the tasks (the reader's `read()` is restarted
//!    transparently), suspends the devices, waits 5 s, resumes them and
//!    thaws the tasks; only then does the write return. The reader must
//!    still be waiting, and the device must be live again (state 0).
//! 4. `pm_test` back to `none` (also when something failed), then
//!    `VDEVLAB-READY pm-freeze`: the host injects `--bytes` bytes, which
//!    the reader must receive within 60 s.
//!
//! Fields: `state` (what was written), `suspend_ms` (how long the write
//! took), `stats_before`, `stats_after` (`QW_IOC_GET_STATS`), then the
//! reader's `bytes`, `reads`, `sha256`, `head`.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use crate::common::write_sysfs;
use crate::common::{nap, open_device, Access, Rx, Step};
use crate::scenarios::Checked;
use crate::uapi::qw::get_stats;
use crate::{ready, Opts, Report};

const PM_TEST: &str = "/sys/power/pm_test";
const PM_STATE: &str = "/sys/power/state";
/// The error of a kernel without `CONFIG_PM_DEBUG`.
pub const NO_PM_TEST: &str = "no /sys/power/pm_test (kernel without CONFIG_PM_DEBUG)";
const SETTLE: Duration = Duration::from_millis(300);
const READ_LIMIT: Duration = Duration::from_secs(60);

/// `/sys/power/pm_test` reads like `none core processors platform
/// [devices] freezer`: the choices and the selected one (in brackets).
pub fn parse_pm_test(text: &str) -> (Vec<String>, Option<String>) {
    let mut all = Vec::new();
    let mut selected = None;
    for word in text.split_whitespace() {
        let bare = word.trim_start_matches('[').trim_end_matches(']');
        if bare.len() + 2 == word.len() && word.starts_with('[') {
            selected = Some(bare.to_string());
        }
        all.push(bare.to_string());
    }
    (all, selected)
}

/// The sleep state to test: `freeze` (suspend to idle) if
/// `/sys/power/state` lists it, else `mem`, else none.
pub fn pick_state(states: &str) -> Option<&'static str> {
    let listed: Vec<&str> = states.split_whitespace().collect();
    ["freeze", "mem"].into_iter().find(|s| listed.contains(s))
}

/// Puts `pm_test` back to `none` when dropped.
#[derive(Debug)]
struct PmTestGuard;

impl Drop for PmTestGuard {
    fn drop(&mut self) {
        let _ = write_sysfs(Path::new(PM_TEST), "none");
    }
}

/// Run `pm-freeze`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    // Before anything touches /sys/power: this must be the qw driver (run
    // on a host against a FIFO, the program must not suspend the host).
    let ctl = open_device(&o.device, Access::Read, true)?;
    let before = get_stats(ctl.as_raw_fd())
        .map_err(|e| format!("{} is not a qw device ({e}): not suspending", o.device))?;
    if !Path::new(PM_TEST).exists() {
        return Err(NO_PM_TEST.into());
    }
    let states = std::fs::read_to_string(PM_STATE).map_err(|e| format!("{PM_STATE}: {e}"))?;
    let state = pick_state(&states).ok_or_else(|| {
        format!(
            "{PM_STATE} lists neither freeze nor mem: {:?}",
            states.trim()
        )
    })?;
    let tests = std::fs::read_to_string(PM_TEST).map_err(|e| format!("{PM_TEST}: {e}"))?;
    let (levels, _) = parse_pm_test(&tests);
    if !levels.iter().any(|l| l == "devices") {
        return Err(format!(
            "{PM_TEST} has no devices level: {:?}",
            tests.trim()
        ));
    }

    let fd = open_device(&o.device, Access::Read, false)?;
    let mut c = Checked::new();
    c.report
        .text("state", state)
        .raw("stats_before", &before.json());

    let (tx, rx) = mpsc::channel::<Result<Report, String>>();
    let mut side = Rx::new(o);
    std::thread::Builder::new()
        .name("qw-pm-reader".into())
        .spawn(move || {
            let mut res = Ok(());
            while !side.done() {
                match side.read_once(fd.as_raw_fd()) {
                    Ok(Step::Moved(_)) => {}
                    Ok(Step::WouldBlock) => res = Err("EAGAIN from a blocking descriptor".into()),
                    Err(e) => res = Err(e),
                }
                if res.is_err() {
                    break;
                }
            }
            let _ = tx.send(res.map(|()| side.report()));
        })
        .map_err(|e| format!("spawning the reader: {e}"))?;
    nap(SETTLE);

    {
        let _guard = PmTestGuard;
        match write_sysfs(Path::new(PM_TEST), "devices") {
            Ok(()) => {
                let t = Instant::now();
                let r = write_sysfs(Path::new(PM_STATE), state);
                c.report.num("suspend_ms", t.elapsed().as_millis() as u64);
                if let Err(e) = r {
                    c.fail(format!("suspend test cycle: {e}"));
                }
            }
            Err(e) => c.fail(e),
        }
    }
    let restored = std::fs::read_to_string(PM_TEST).unwrap_or_default();
    c.check(
        parse_pm_test(&restored).1.as_deref() == Some("none"),
        || format!("{PM_TEST} not back to none: {:?}", restored.trim()),
    );

    match rx.try_recv() {
        Ok(Ok(_)) => c.fail("the reader finished before any data was injected"),
        Ok(Err(e)) => c.fail(format!("the reader failed across the suspend cycle: {e}")),
        Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
    }
    match get_stats(ctl.as_raw_fd()) {
        Ok(st) => {
            c.report.raw("stats_after", &st.json());
            c.check(st.state == 0, || {
                format!("state {:#x} after the resume, not 0 (live)", st.state)
            });
        }
        Err(e) => c.fail(e),
    }

    ready(&o.scenario);
    match rx.recv_timeout(READ_LIMIT) {
        Ok(Ok(r)) => {
            c.report.extend(r);
        }
        Ok(Err(e)) => c.fail(format!("reader: {e}")),
        Err(RecvTimeoutError::Timeout) => c.fail(format!(
            "the reader did not get {} bytes within {READ_LIMIT:?} after the resume",
            o.bytes
        )),
        Err(RecvTimeoutError::Disconnected) => c.fail("the reader ended without a result"),
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm_test_levels() {
        let (all, sel) = parse_pm_test("[none] core processors platform devices freezer\n");
        assert_eq!(
            all,
            [
                "none",
                "core",
                "processors",
                "platform",
                "devices",
                "freezer"
            ]
        );
        assert_eq!(sel.as_deref(), Some("none"));
        let (_, sel) = parse_pm_test("none core processors platform [devices] freezer");
        assert_eq!(sel.as_deref(), Some("devices"));
        assert_eq!(parse_pm_test("").1, None);
    }

    #[test]
    fn state_choice() {
        assert_eq!(pick_state("freeze mem disk\n"), Some("freeze"));
        assert_eq!(pick_state("mem disk"), Some("mem"));
        assert_eq!(pick_state("disk"), None);
        assert_eq!(pick_state("freezer"), None);
    }
}
