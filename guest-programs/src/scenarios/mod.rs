//! The programs that are not one I/O model moving one stream: the
//! driver-robustness scenarios, the sensor device's scenarios and the
//! benchmark's echo programs.
//!
//! | module | scenarios |
//! | --- | --- |
//! | [`teardown`] | `teardown-unbind`, `teardown-remove` |
//! | [`ioctl_stats`] | `ioctl-stats` |
//! | [`pm_freeze`] | `pm-freeze` |
//! | [`multi_open`] | `multi-open` |
//! | [`needs_reset`] | `needs-reset` |
//! | [`stress`] | `stress`: readers, writers, churn, ioctls and signals at once, then an unbind |
//! | [`sensor`] | `sensor-stream`, `sensor-unbind`, `sensor-reset`, `sensor-hostile` |
//! | [`sensor_faults`] | `sensor-ctrl-status`, `sensor-ctrl-late`, `sensor-ctrl-lost` |
//! | [`echo`] | `echo-<model>` (`vdevlab bench`'s round trip) |
//! | [`alloc_faults`] | `alloc-faults`: the driver's allocations failed one at a time (fault injection, kmemleak) |
//! | [`waiters`] | `trouble-removal`, `trouble-needs-reset`, `trouble-broken`, `trouble-reset`, `trouble-unplug`, `trouble-broken-tx`: every kind of waiter learns of trouble |
//! | [`sensor_alarms`] | `sensor-alarms`: alarms as event records and as a count signalled by config change |
//! | [`carrier_change`] | `carrier-change`: the host flips the carrier, the driver must hear each config-change interrupt |
//!
//! The robustness and sensor scenarios have `run(opts) -> Result<Checked,
//! String>` (the sensor ones take their own options): `Err` when they
//! cannot even start, else every observation and the list of checks that
//! failed ([`Checked`]). The drivers' interfaces are in [`crate::uapi`].

pub mod alloc_faults;
pub mod carrier_change;
pub mod echo;
pub mod ioctl_stats;
pub mod multi_open;
pub mod needs_reset;
pub mod pm_freeze;
pub mod sensor;
pub mod sensor_alarms;
pub mod sensor_faults;
pub mod stress;
pub mod teardown;
pub mod waiters;

use crate::Report;

/// The observations of a scenario and the checks that failed. A scenario
/// goes on after a failed check where it can, so one run shows everything.
#[derive(Debug, Default)]
pub struct Checked {
    /// The result line's fields.
    pub report: Report,
    /// What did not hold, in order.
    pub problems: Vec<String>,
}

impl Checked {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a problem unless `ok`.
    pub fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.problems.push(what());
        }
        ok
    }

    /// Record a problem.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.problems.push(what.into());
    }

    /// Record the error of `r`, if any, and pass the value on.
    pub fn take<T>(&mut self, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.push(e);
                None
            }
        }
    }
}
