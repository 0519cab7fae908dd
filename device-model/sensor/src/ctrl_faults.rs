//! Faults of the control queue (`docs/sensor-spec.md`, "Control-queue
//! faults"): the device answers control requests with an error status,
//! late, or not at all, on command from the host (`{"op":"ctrl_fault",
//! "mode":...}`), so a driver's request/response path can be seen to
//! cope. Everything is counted ([`CtrlFaultCounters`]).
//!
//! A held request stays on the available ring (the device returns
//! [`vdevlab_device_core::Outcome::Defer`] and declines the queue's
//! buffers until it is due): the driver's buffers stay the device's, as
//! with a real device that has not answered yet, and the device takes no
//! later request before it (requests are answered in order). A reset
//! hands every buffer back to the driver, so it forgets the held request.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::STATUS_INVALID;

/// Most requests one `ctrl_fault` request may arm.
pub const MAX_COUNT: u32 = 1000;
/// Longest delay of a late answer, ms.
pub const MAX_DELAY_MS: u64 = 60_000;

/// A `ctrl_fault` control request (the `op` field removed).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum CtrlFault {
    /// Answer the next `count` requests with `status` (not OK) and do not
    /// carry them out.
    Status {
        /// How many requests.
        #[serde(default = "one")]
        count: u32,
        /// The status to answer (default INVALID); any value but 0 (OK),
        /// also one the specification does not define. Arming again adds
        /// to the count, and the last status armed is the one answered.
        #[serde(default = "invalid")]
        status: u32,
    },
    /// Answer each of the next `count` requests `delay_ms` after the
    /// device took it; it is carried out when answered.
    Late {
        /// How many requests.
        #[serde(default = "one")]
        count: u32,
        /// The delay, ms (1..=60000).
        delay_ms: u64,
    },
    /// Hold each of the next `count` requests until `clear` or a reset.
    Never {
        /// How many requests.
        #[serde(default = "one")]
        count: u32,
    },
    /// Disarm everything; a held request is answered now (carried out).
    Clear {},
}

fn one() -> u32 {
    1
}

fn invalid() -> u32 {
    STATUS_INVALID
}

impl CtrlFault {
    /// Parse a `ctrl_fault` request (its `op` field is ignored); the error
    /// names the bad or missing field.
    pub fn from_request(request: &Value) -> Result<Self, String> {
        let mut r = request.clone();
        if let Some(obj) = r.as_object_mut() {
            obj.remove("op");
        }
        let f: CtrlFault = serde_json::from_value(r).map_err(|e| {
            format!("bad ctrl_fault request ({e}); mode is status, late, never or clear")
        })?;
        f.validate()?;
        Ok(f)
    }

    fn validate(&self) -> Result<(), String> {
        let count = match *self {
            CtrlFault::Status { count, status } => {
                if status == 0 {
                    return Err("status 0 is OK, not an error: use 1..".into());
                }
                count
            }
            CtrlFault::Late { count, delay_ms } => {
                if !(1..=MAX_DELAY_MS).contains(&delay_ms) {
                    return Err(format!(
                        "delay_ms {delay_ms} is out of range 1..={MAX_DELAY_MS}"
                    ));
                }
                count
            }
            CtrlFault::Never { count } => count,
            CtrlFault::Clear {} => return Ok(()),
        };
        if !(1..=MAX_COUNT).contains(&count) {
            return Err(format!("count {count} is out of range 1..={MAX_COUNT}"));
        }
        Ok(())
    }
}

/// The control-queue fault counters (in the `stats` reply).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CtrlFaultCounters {
    /// Requests answered with an injected error status.
    pub ctrl_fault_status: u64,
    /// Requests answered late on purpose.
    pub ctrl_fault_late: u64,
    /// Requests held with no answer (until `clear` or a reset).
    pub ctrl_fault_never: u64,
    /// Held requests answered because of `clear`.
    pub ctrl_fault_released: u64,
    /// Held requests forgotten because the driver reset the device.
    pub ctrl_fault_reset: u64,
    /// Requests the device holds now (0 or 1).
    pub ctrl_held: u64,
}

/// What to do with a control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Carry it out and answer.
    Answer,
    /// Answer this status, carry nothing out.
    Fail(u32),
    /// Not now: leave it on the ring.
    Hold,
}

/// A request the device holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// Its head (the same chain comes back when it is due).
    head: u16,
    /// When it is due; `None`: never (until `clear`).
    until: Option<Instant>,
}

/// The armed control-queue faults and the request held.
#[derive(Debug, Default)]
pub struct CtrlFaults {
    status: u32,
    status_value: u32,
    late: u32,
    late_delay: Duration,
    never: u32,
    held: Option<Held>,
    counters: CtrlFaultCounters,
}

impl CtrlFaults {
    /// Arm `fault` at `now` (or clear).
    pub fn apply(&mut self, fault: &CtrlFault) {
        match *fault {
            CtrlFault::Status { count, status } => {
                self.status = self.status.saturating_add(count);
                self.status_value = status;
            }
            CtrlFault::Late { count, delay_ms } => {
                self.late = self.late.saturating_add(count);
                self.late_delay = Duration::from_millis(delay_ms);
            }
            CtrlFault::Never { count } => self.never = self.never.saturating_add(count),
            CtrlFault::Clear {} => {
                self.status = 0;
                self.late = 0;
                self.never = 0;
                if self.held.take().is_some() {
                    self.counters.ctrl_fault_released += 1;
                }
            }
        }
    }

    /// Whether the device takes a control request now: no request is held,
    /// or the held one is due.
    pub fn ready(&self, now: Instant) -> bool {
        match self.held {
            None => true,
            Some(h) => h.until.is_some_and(|u| u <= now),
        }
    }

    /// When the held request is due, if it is held for a time.
    pub fn deadline(&self) -> Option<Instant> {
        self.held.and_then(|h| h.until)
    }

    /// The device took the request with head `head` at `now`: what to do.
    pub fn on_request(&mut self, head: u16, now: Instant) -> Decision {
        if let Some(h) = self.held {
            if h.head == head {
                if !self.ready(now) {
                    return Decision::Hold;
                }
                self.held = None;
                return Decision::Answer;
            }
            // Another chain where the held one was: the driver rewrote
            // its available ring. Forget the held request (waiting for a
            // head that is gone would keep the timer spinning) and take
            // this one as new.
            self.held = None;
        }
        if self.status > 0 {
            self.status -= 1;
            self.counters.ctrl_fault_status += 1;
            return Decision::Fail(self.status_value);
        }
        let until = if self.never > 0 {
            self.never -= 1;
            self.counters.ctrl_fault_never += 1;
            None
        } else if self.late > 0 {
            self.late -= 1;
            self.counters.ctrl_fault_late += 1;
            Some(now + self.late_delay)
        } else {
            return Decision::Answer;
        };
        self.held = Some(Held { head, until });
        Decision::Hold
    }

    /// The driver reset the device: it has its buffers back, so the held
    /// request is gone. Armed faults stay armed.
    pub fn on_reset(&mut self) {
        if self.held.take().is_some() {
            self.counters.ctrl_fault_reset += 1;
        }
    }

    /// The counters.
    pub fn counters(&self) -> CtrlFaultCounters {
        CtrlFaultCounters {
            ctrl_held: u64::from(self.held.is_some()),
            ..self.counters
        }
    }

    /// What is armed, for the `ctrl_fault` reply.
    pub fn armed(&self) -> Value {
        serde_json::json!({
            "status": self.status,
            "late": self.late,
            "never": self.never,
            "held": self.held.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<CtrlFault, String> {
        CtrlFault::from_request(&v)
    }

    #[test]
    fn requests_parse_with_defaults_and_ranges() {
        assert_eq!(
            parse(json!({"op":"ctrl_fault","mode":"status"})),
            Ok(CtrlFault::Status {
                count: 1,
                status: STATUS_INVALID
            })
        );
        assert_eq!(
            parse(json!({"mode":"late","count":2,"delay_ms":400})),
            Ok(CtrlFault::Late {
                count: 2,
                delay_ms: 400
            })
        );
        assert!(parse(json!({"mode":"late"}))
            .unwrap_err()
            .contains("delay_ms"));
        assert!(parse(json!({"mode":"late","delay_ms":0}))
            .unwrap_err()
            .contains("out of range"));
        assert!(parse(json!({"mode":"status","status":0}))
            .unwrap_err()
            .contains("OK"));
        assert!(parse(json!({"mode":"never","count":0})).is_err());
        assert!(parse(json!({"mode":"melt"}))
            .unwrap_err()
            .contains("status, late, never or clear"));
        assert!(parse(json!({"mode":"never","bogus":1})).is_err());
        assert_eq!(parse(json!({"mode":"clear"})), Ok(CtrlFault::Clear {}));
    }

    #[test]
    fn status_then_late_then_never_then_clear() {
        let t0 = Instant::now();
        let mut f = CtrlFaults::default();
        assert_eq!(f.on_request(0, t0), Decision::Answer);
        f.apply(&CtrlFault::Status {
            count: 2,
            status: 9,
        });
        assert_eq!(f.on_request(1, t0), Decision::Fail(9));
        assert_eq!(f.on_request(2, t0), Decision::Fail(9));
        assert_eq!(f.on_request(3, t0), Decision::Answer);

        f.apply(&CtrlFault::Late {
            count: 1,
            delay_ms: 100,
        });
        assert_eq!(f.on_request(4, t0), Decision::Hold);
        assert!(!f.ready(t0 + Duration::from_millis(99)));
        assert_eq!(f.deadline(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(f.counters().ctrl_held, 1);
        let due = t0 + Duration::from_millis(100);
        assert!(f.ready(due));
        assert_eq!(f.on_request(4, due), Decision::Answer);
        assert_eq!(f.on_request(6, due), Decision::Answer);

        // A rewritten ring: another head where the held one was.
        f.apply(&CtrlFault::Late {
            count: 1,
            delay_ms: 100,
        });
        assert_eq!(f.on_request(20, t0), Decision::Hold);
        assert_eq!(f.on_request(21, due), Decision::Answer, "taken as new");
        assert!(f.ready(t0) && f.deadline().is_none());

        f.apply(&CtrlFault::Never { count: 1 });
        assert_eq!(f.on_request(7, t0), Decision::Hold);
        assert!(!f.ready(t0 + Duration::from_secs(3600)));
        assert_eq!(f.deadline(), None);
        f.apply(&CtrlFault::Clear {});
        assert!(f.ready(t0));
        assert_eq!(f.on_request(7, t0), Decision::Answer);

        f.apply(&CtrlFault::Never { count: 1 });
        assert_eq!(f.on_request(8, t0), Decision::Hold);
        f.on_reset();
        assert!(f.ready(t0));
        let c = f.counters();
        assert_eq!(
            (
                c.ctrl_fault_status,
                c.ctrl_fault_late,
                c.ctrl_fault_never,
                c.ctrl_fault_released,
                c.ctrl_fault_reset,
                c.ctrl_held
            ),
            (2, 2, 2, 1, 1, 0)
        );
    }
}
