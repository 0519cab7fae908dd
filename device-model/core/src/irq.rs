//! Interrupt policy: when the device raises the used-buffer interrupt after
//! completing buffers. Real devices coalesce and delay interrupts; drivers
//! must cope, and the lab lets a user choose per queue.
//!
//! The policy is a small state machine, independent of the transport: it is
//! told about completions and timer expiries and answers what to do. The
//! transport then still honours the driver's suppression (EVENT_IDX or the
//! no-interrupt flag) at the moment it signals.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a queue raises its used-buffer interrupt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum IrqMode {
    /// After every pass that completed buffers.
    #[default]
    Immediate,
    /// After `count` completed buffers, or `usecs` after the first
    /// unsignalled completion, whichever comes first.
    Coalesce {
        /// Buffers per interrupt (>= 1).
        count: u32,
        /// Longest wait, in microseconds (>= 1).
        usecs: u64,
    },
    /// `usecs` (plus a seeded random 0..=`jitter_usecs`) after the first
    /// unsignalled completion; completions meanwhile share the interrupt.
    Delay {
        /// Fixed delay, in microseconds.
        usecs: u64,
        /// Extra random delay bound, in microseconds.
        #[serde(default)]
        jitter_usecs: u64,
        /// Seed of the jitter, so a run reproduces.
        #[serde(default)]
        seed: u64,
    },
}

impl IrqMode {
    /// Check the parameters; the error says what to change.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            IrqMode::Immediate => Ok(()),
            IrqMode::Coalesce { count, usecs } => {
                if count == 0 || usecs == 0 {
                    Err(format!("coalesce needs count >= 1 and usecs >= 1 (got count {count}, usecs {usecs})"))
                } else {
                    Ok(())
                }
            }
            IrqMode::Delay {
                usecs,
                jitter_usecs,
                ..
            } => {
                if usecs.saturating_add(jitter_usecs) > 10_000_000 {
                    Err("delay: usecs + jitter_usecs must be at most 10 s".into())
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// What the transport should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqAction {
    /// Raise the interrupt now (subject to the driver's suppression).
    SignalNow,
    /// Arm the queue's timer to expire after this long.
    ArmTimer(Duration),
    /// Nothing yet: a timer is already running.
    Wait,
}

/// One queue's interrupt state.
#[derive(Debug, Clone, Default)]
pub struct IrqPolicy {
    mode: IrqMode,
    pending: u64,
    armed: bool,
    rng: u64,
}

impl IrqPolicy {
    /// Switch mode. Completions not yet signalled are signalled by the next
    /// event, so none is lost across the switch.
    pub fn set_mode(&mut self, mode: IrqMode) {
        if let IrqMode::Delay { seed, .. } = mode {
            self.rng = seed | 1;
        }
        self.mode = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> IrqMode {
        self.mode
    }

    /// Completions not yet covered by an interrupt.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    fn jitter(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        // xorshift64: reproducible from the seed, no allocation.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % (bound + 1)
    }

    /// `n` buffers were completed.
    pub fn on_completions(&mut self, n: u32) -> IrqAction {
        if n == 0 {
            return IrqAction::Wait;
        }
        self.pending += u64::from(n);
        match self.mode {
            IrqMode::Immediate => {
                self.pending = 0;
                IrqAction::SignalNow
            }
            IrqMode::Coalesce { count, usecs } => {
                if self.pending >= u64::from(count) {
                    self.pending = 0;
                    // A timer still armed will find nothing pending.
                    IrqAction::SignalNow
                } else if self.armed {
                    IrqAction::Wait
                } else {
                    self.armed = true;
                    IrqAction::ArmTimer(Duration::from_micros(usecs))
                }
            }
            IrqMode::Delay {
                usecs,
                jitter_usecs,
                ..
            } => {
                if self.armed {
                    IrqAction::Wait
                } else {
                    self.armed = true;
                    let d = usecs + self.jitter(jitter_usecs);
                    IrqAction::ArmTimer(Duration::from_micros(d.max(1)))
                }
            }
        }
    }

    /// The queue's timer expired: whether to raise the interrupt now.
    pub fn on_timer(&mut self) -> bool {
        self.armed = false;
        if self.pending > 0 {
            self.pending = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_signals_every_time() {
        let mut p = IrqPolicy::default();
        assert_eq!(p.on_completions(1), IrqAction::SignalNow);
        assert_eq!(p.on_completions(3), IrqAction::SignalNow);
        assert_eq!(p.on_completions(0), IrqAction::Wait);
    }

    #[test]
    fn coalesce_by_count_or_time() {
        let mut p = IrqPolicy::default();
        p.set_mode(IrqMode::Coalesce {
            count: 4,
            usecs: 500,
        });
        assert_eq!(
            p.on_completions(1),
            IrqAction::ArmTimer(Duration::from_micros(500))
        );
        assert_eq!(p.on_completions(2), IrqAction::Wait);
        assert_eq!(
            p.on_completions(1),
            IrqAction::SignalNow,
            "the fourth buffer"
        );
        assert!(!p.on_timer(), "nothing left for the stale timer");
        assert_eq!(
            p.on_completions(1),
            IrqAction::ArmTimer(Duration::from_micros(500))
        );
        assert!(p.on_timer(), "the timer covers the lone buffer");
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn delay_is_seeded_and_bounded() {
        let mode = IrqMode::Delay {
            usecs: 100,
            jitter_usecs: 50,
            seed: 7,
        };
        let delays = |seed_mode| {
            let mut p = IrqPolicy::default();
            p.set_mode(seed_mode);
            (0..20)
                .map(|_| {
                    let a = p.on_completions(1);
                    assert_eq!(
                        p.on_completions(1),
                        IrqAction::Wait,
                        "one interrupt covers both"
                    );
                    assert!(p.on_timer());
                    a
                })
                .collect::<Vec<_>>()
        };
        let a = delays(mode);
        assert_eq!(a, delays(mode), "same seed, same delays");
        for act in &a {
            let IrqAction::ArmTimer(d) = act else {
                panic!("{act:?}")
            };
            assert!((100..=150).contains(&(d.as_micros() as u64)));
        }
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 1,
            "jitter varies"
        );
    }

    #[test]
    fn bad_parameters_are_explained() {
        assert!(IrqMode::Coalesce {
            count: 0,
            usecs: 10
        }
        .validate()
        .unwrap_err()
        .contains("count"));
        assert!(IrqMode::Delay {
            usecs: 20_000_000,
            jitter_usecs: 0,
            seed: 0
        }
        .validate()
        .is_err());
        assert!(IrqMode::Immediate.validate().is_ok());
    }
}
