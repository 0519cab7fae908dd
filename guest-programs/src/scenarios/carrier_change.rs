//! `carrier-change`: the host flips the qw device's carrier
//! (`{"op":"carrier","up":...}`: NO_CARRIER in the config status word,
//! then a config-change interrupt), and the driver must notice each flip.
//! Run with the driver's `status_poll_ms=0`, only the config-change
//! interrupt can tell it, so this checks that path end to end.
//!
//! 1. Open the device; `QW_IOC_GET_STATS` must answer, the carrier must be
//!    up (sysfs `carrier` 1, no `QW_STATE_NO_CARRIER`, no `POLLPRI`).
//! 2. [`FLIPS`] times: announce `VDEVLAB-READY carrier-change` (then
//!    `carrier-change-2`, ...), and the host pulls the cable (odd flips put
//!    it back). Wait in `poll(POLLPRI)` and on sysfs `carrier` until the
//!    driver shows the new state, at most [`WITHIN`]; `latency_us` is the
//!    time from the marker to then (an upper bound of the interrupt's
//!    latency: it includes the host's reaction to the marker). Then, in
//!    that state: `poll` has `POLLPRI` exactly while down, `state` has
//!    `QW_STATE_NO_CARRIER` exactly while down; while down the first time,
//!    a non-blocking read gets `EAGAIN` (no data, no error) and a write of
//!    one byte goes through. A flip not seen in time ends the program.
//! 3. sysfs `carrier_changes` rose by [`FLIPS`], and the driver's
//!    `config_changes` by at least as many (every flip came as an
//!    interrupt).
//!
//! Fields: `flips`, `seen`, `latency_us` (one per flip), `latency_max_us`,
//! `latency_mean_us`, `carrier_changes`, `config_changes`, `read_down`,
//! `write_down`, `stats_start`, `stats_end`.

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{mask_name, open_device, poll_one, read_counter, Access};
use crate::scenarios::needs_reset::{io_once, outcome};
use crate::scenarios::Checked;
use crate::uapi::qw::{class_dir, get_stats, QW_STATE_NO_CARRIER};
use crate::{ready, Opts};

/// Carrier flips the host makes (down, up, down, ...): the test's steps
/// follow this number.
pub const FLIPS: usize = 8;
/// How soon after its marker a flip must show.
pub const WITHIN: Duration = Duration::from_secs(5);

/// The marker of flip `k` (0-based): `carrier-change`, `carrier-change-2`, ...
pub fn marker(scenario: &str, k: usize) -> String {
    if k == 0 {
        scenario.to_string()
    } else {
        format!("{scenario}-{}", k + 1)
    }
}

/// sysfs attribute `name` of the device.
fn sysfs(device: &str, name: &str) -> Result<u64, String> {
    read_counter(&class_dir(Path::new("/sys"), device).join(name))
}

/// Wait until sysfs `carrier` reads `want` (1 up, 0 down), sleeping in
/// `poll(POLLPRI)` between looks (a carrier going down wakes it); the time
/// it took, or `None` after [`WITHIN`].
fn wait_carrier(fd: RawFd, device: &str, want: u64, from: Instant) -> Option<Duration> {
    while from.elapsed() < WITHIN {
        if sysfs(device, "carrier").ok() == Some(want) {
            return Some(from.elapsed());
        }
        // A short timeout too: a carrier coming up raises no POLLPRI.
        let _ = poll_one(fd, libc::POLLPRI, 2);
    }
    None
}

/// In the state `up`: poll and `QW_IOC_GET_STATS` agree with it.
fn check_state(c: &mut Checked, fd: RawFd, up: bool, when: &str) {
    match poll_one(fd, libc::POLLPRI | libc::POLLIN, 0) {
        Ok(rev) => {
            let pri = rev & libc::POLLPRI != 0;
            c.check(pri != up, || {
                format!(
                    "{when}: poll {} with the carrier {}",
                    mask_name(rev as u16 as u32),
                    if up { "up" } else { "down" }
                )
            });
        }
        Err(e) => c.fail(format!("{when}: poll: {e}")),
    }
    match get_stats(fd) {
        Ok(st) => {
            let down = st.state & QW_STATE_NO_CARRIER != 0;
            c.check(down != up, || {
                format!("{when}: QW_IOC_GET_STATS state {:#x}", st.state)
            });
        }
        Err(e) => c.fail(format!("{when}: {e}")),
    }
}

/// While down: the byte stream goes on (a non-blocking read finds no
/// data but no error either, a write goes through).
fn io_while_down(c: &mut Checked, fd: RawFd, device: &str) {
    let nb = match open_device(device, Access::Read, true) {
        Ok(f) => f,
        Err(e) => return c.fail(format!("carrier down: open O_NONBLOCK: {e}")),
    };
    let mut b = [0x5au8; 1];
    let read = io_once(nb.as_raw_fd(), &mut b, false);
    c.report.text("read_down", &outcome(&read));
    c.check(read == Err(libc::EAGAIN), || {
        format!(
            "carrier down: a non-blocking read: {}, not EAGAIN",
            outcome(&read)
        )
    });
    let write = io_once(fd, &mut b, true);
    c.report.text("write_down", &outcome(&write));
    c.check(write == Ok(1), || {
        format!("carrier down: a write of 1 byte: {}", outcome(&write))
    });
}

/// Run `carrier-change`.
pub fn run(o: &Opts) -> Result<Checked, String> {
    let fd = open_device(&o.device, Access::ReadWrite, false)?;
    let raw = fd.as_raw_fd();
    let mut c = Checked::new();
    let start = get_stats(raw)?;
    c.report.raw("stats_start", &start.json());
    let changes0 = sysfs(&o.device, "carrier_changes")?;
    c.check(sysfs(&o.device, "carrier")? == 1, || {
        "the carrier is down at the start".into()
    });
    check_state(&mut c, raw, true, "at the start");

    let mut lat = Vec::new();
    for k in 0..FLIPS {
        let up = k % 2 == 1;
        ready(&marker(&o.scenario, k));
        let at = Instant::now();
        match wait_carrier(raw, &o.device, u64::from(up), at) {
            Some(d) => lat.push(d.as_micros() as u64),
            None => {
                c.fail(format!(
                    "flip {} (carrier {}) not seen by the driver within {WITHIN:?}",
                    k + 1,
                    if up { "up" } else { "down" }
                ));
                break;
            }
        }
        check_state(&mut c, raw, up, &format!("flip {}", k + 1));
        if k == 0 {
            io_while_down(&mut c, raw, &o.device);
        }
    }
    report_latency(&mut c, &lat);

    let end = get_stats(raw)?;
    c.report.raw("stats_end", &end.json());
    let changes = sysfs(&o.device, "carrier_changes")?.saturating_sub(changes0);
    let configs = end.config_changes.saturating_sub(start.config_changes);
    c.report.num("carrier_changes", changes);
    c.report.num("config_changes", configs);
    if lat.len() == FLIPS {
        c.check(changes == FLIPS as u64, || {
            format!("carrier_changes rose by {changes}, not {FLIPS}")
        });
        c.check(configs >= FLIPS as u64, || {
            format!("config_changes rose by {configs}: not every flip came as an interrupt")
        });
    }
    Ok(c)
}

fn report_latency(c: &mut Checked, lat: &[u64]) {
    c.report.num("flips", FLIPS as u64);
    c.report.num("seen", lat.len() as u64);
    let list: Vec<String> = lat.iter().map(u64::to_string).collect();
    c.report.raw("latency_us", &format!("[{}]", list.join(",")));
    if !lat.is_empty() {
        c.report
            .num("latency_max_us", lat.iter().copied().max().unwrap_or(0));
        c.report.num(
            "latency_mean_us",
            lat.iter().sum::<u64>() / lat.len() as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_count_from_two() {
        assert_eq!(marker("carrier-change", 0), "carrier-change");
        assert_eq!(marker("carrier-change", 1), "carrier-change-2");
        assert_eq!(marker("carrier-change", 7), "carrier-change-8");
    }
}
