//! Injected faults: the device misbehaving on purpose, on command from the
//! host, so a driver developer can see what their driver does when real
//! hardware loses an interrupt, raises one for nothing, stalls, slows down
//! or delivers damaged data. Everything here is counted in the device's
//! stats; nothing is lost without a counter saying so.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which queue(s) a fault applies to: a queue name the device declared
/// (the qw device: `"rx"`, `"tx"`) or `"all"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueSel(pub String);

impl QueueSel {
    /// Every queue.
    pub fn all() -> Self {
        Self("all".into())
    }

    /// The queue named `name`.
    pub fn named(name: &str) -> Self {
        Self(name.into())
    }
}

/// A fault to inject (control request `{"op":"fault","fault":{...}}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Lose the next `count` used-buffer interrupts that are due.
    DropInterrupts {
        /// Queue(s).
        queue: QueueSel,
        /// How many.
        count: u32,
    },
    /// Raise `count` interrupts now with nothing new in the used ring.
    SpuriousInterrupts {
        /// Queue(s).
        queue: QueueSel,
        /// How many.
        count: u32,
    },
    /// An interrupt storm: spurious interrupts at `rate_hz` for
    /// `duration_ms`.
    InterruptStorm {
        /// Queue(s).
        queue: QueueSel,
        /// Interrupts per second (1..=100000).
        rate_hz: u32,
        /// How long, in milliseconds (1..=60000).
        duration_ms: u64,
    },
    /// Stop serving the queue (no buffers taken, none completed) for a
    /// while; it resumes by itself.
    Stall {
        /// Queue(s).
        queue: QueueSel,
        /// How long, in milliseconds (at most 60 s).
        duration_ms: u64,
    },
    /// Sleep this long before every pass over a queue (0: full speed).
    Slow {
        /// Delay per pass, in microseconds (at most 1 s).
        delay_us: u64,
    },
    /// Flip one byte (seeded position) in each of the next `count` filled
    /// receive buffers.
    CorruptRx {
        /// How many buffers.
        count: u32,
        /// Seed of the flipped positions.
        #[serde(default)]
        seed: u64,
    },
    /// Report only half of what the next `count` receive buffers hold
    /// (the rest is lost, and counted in `truncated_bytes`).
    TruncateRx {
        /// How many buffers.
        count: u32,
    },
    /// Hostile mode: complete the next `count` buffers of the queue under
    /// an id the driver never made available (a descriptor index that is not
    /// a posted head, or the queue size when every index is one). The real
    /// head is never returned.
    HostileBogusId {
        /// Queue(s).
        queue: QueueSel,
        /// How many completions (default 1: one-shot).
        #[serde(default = "one")]
        count: u32,
    },
    /// Hostile mode: report a used length `by` bytes larger than the whole
    /// buffer (readable plus writable) for the next `count` completions.
    HostileOverlong {
        /// Queue(s).
        queue: QueueSel,
        /// How many completions (default 1).
        #[serde(default = "one")]
        count: u32,
        /// Bytes beyond the buffer (default 4096; 1..=1 MiB).
        #[serde(default = "default_overlong_by")]
        by: u32,
    },
    /// Hostile mode: after each of the next `count` completions, move the
    /// used index `by` entries past the entries written (the skipped slots
    /// hold whatever was there), and keep counting from there.
    HostileIndexJump {
        /// Queue(s).
        queue: QueueSel,
        /// How many jumps (default 1).
        #[serde(default = "one")]
        count: u32,
        /// Entries skipped per jump (default 1; 1..=32768).
        #[serde(default = "one_u16")]
        by: u16,
    },
    /// Hostile mode: complete each of the next `count` buffers twice (two
    /// used entries with the same head).
    HostileDoubleComplete {
        /// Queue(s).
        queue: QueueSel,
        /// How many buffers (default 1).
        #[serde(default = "one")]
        count: u32,
    },
    /// Cancel every pending fault and stall, and full speed again.
    Clear {},
    /// A device that consumes slowly: serve at most `buffers` buffers of
    /// the queue per pass, one pass every `interval_ms`, for `duration_ms`;
    /// then full speed again. The driver's buffers pile up on the ring
    /// meanwhile (a transmit ring fills, and writers wait).
    Throttle {
        /// Queue(s).
        queue: QueueSel,
        /// Buffers per pass (default 1; 1..=65535).
        #[serde(default = "one")]
        buffers: u32,
        /// Time between passes, in milliseconds (1..=1000).
        interval_ms: u64,
        /// How long, in milliseconds (1..=60000).
        duration_ms: u64,
    },
    /// Report used length `len` for each of the next `count` completions of
    /// the queue, whatever the device wrote into the buffer (within or past
    /// it): a device bug the driver must not trust. A transmit buffer's used
    /// length must be 0 (the device writes nothing into it), so there any
    /// other value is detectably wrong.
    WrongUsedLen {
        /// Queue(s).
        queue: QueueSel,
        /// How many completions (default 1).
        #[serde(default = "one")]
        count: u32,
        /// The used length to report.
        len: u32,
    },
    /// A config-change storm: `count` config-change interrupts at
    /// `rate_hz`, each interval off by up to `jitter_pct` percent (seeded
    /// by `seed`), with the config unchanged. Replaces a storm still
    /// running; `clear` stops it.
    ConfigChangeStorm {
        /// How many (1..=100000).
        count: u32,
        /// Config changes per second (1..=10000).
        rate_hz: u32,
        /// Jitter of each interval, percent (0..=100, default 0).
        #[serde(default)]
        jitter_pct: u32,
        /// Seed of the jitter.
        #[serde(default)]
        seed: u64,
    },
    /// Hostile: `count` config-change interrupts with nothing changed in
    /// the config space (counted in `hostile_config_changes`).
    HostileConfigChange {
        /// How many (default 1; 1..=64).
        #[serde(default = "one")]
        count: u32,
    },
    /// Hostile: a flickering (torn) config. `count` times, every
    /// `period_us`, the config bytes `[offset, offset + len)` flip between
    /// their value and its bitwise inverse, each flip announced by a config
    /// change (counted in `hostile_config_flips`); it ends on the real
    /// config. A driver that reads several fields without checking
    /// `config_generation` can see a mix (see `docs/device-framework.md`,
    /// "Config-change interrupts", for what the generation can tell).
    HostileConfigFlicker {
        /// Flips (default 10; 1..=10000; rounded up to an even number).
        #[serde(default = "default_flips")]
        count: u32,
        /// Time between flips, microseconds (default 2000; 100..=10000000).
        #[serde(default = "default_flip_period_us")]
        period_us: u64,
        /// First flipped byte of the config space (default 0).
        #[serde(default)]
        offset: u32,
        /// Flipped bytes (default 4).
        #[serde(default = "default_flip_len")]
        len: u32,
    },
}

fn default_flips() -> u32 {
    10
}

fn default_flip_period_us() -> u64 {
    2000
}

fn default_flip_len() -> u32 {
    4
}

fn one() -> u32 {
    1
}

fn one_u16() -> u16 {
    1
}

fn default_overlong_by() -> u32 {
    4096
}

/// The hostile-mode violations armed on one queue (counts left).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HostileArms {
    /// Completions left to send under a bogus id.
    pub bogus_id: u32,
    /// Completions left with an overlong used length, and by how much.
    pub overlong: (u32, u32),
    /// Index jumps left, and by how much.
    pub index_jump: (u32, u16),
    /// Buffers left to complete twice.
    pub double_complete: u32,
    /// Completions left with a wrong used length, and that length
    /// ([`Fault::WrongUsedLen`]).
    pub wrong_len: (u32, u32),
}

/// A queue's [`Fault::Throttle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Throttle {
    buffers: u32,
    interval: Duration,
    until: Instant,
    /// The earliest time of the next pass.
    next: Instant,
}

/// What a throttled queue may do now ([`FaultState::throttle_gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Not throttled: serve every buffer.
    Open,
    /// A pass of at most this many buffers.
    Limit(u32),
    /// Too early: the next pass is due in this long.
    Wait(Duration),
}

const MAX_STALL_MS: u64 = 60_000;
const MAX_SLOW_US: u64 = 1_000_000;

/// The device's armed faults.
#[derive(Debug, Default)]
pub struct FaultState {
    drop_irqs: Vec<u32>,
    spurious: Vec<u32>,
    stall_until: Vec<Option<Instant>>,
    /// Storms not yet started by the transport: (period, until).
    storm_start: Vec<Option<(Duration, Instant)>>,
    storm_until: Vec<Option<Instant>>,
    hostile: Vec<HostileArms>,
    /// Queues whose next interrupt goes out whatever the driver asked.
    hostile_signal: Vec<bool>,
    throttle: Vec<Option<Throttle>>,
    slow: Duration,
    corrupt: u32,
    truncate: u32,
    rng: u64,
}

impl Fault {
    /// The queues the fault names, if it names any.
    pub fn queue(&self) -> Option<&QueueSel> {
        match self {
            Fault::DropInterrupts { queue, .. }
            | Fault::SpuriousInterrupts { queue, .. }
            | Fault::InterruptStorm { queue, .. }
            | Fault::Stall { queue, .. }
            | Fault::HostileBogusId { queue, .. }
            | Fault::HostileOverlong { queue, .. }
            | Fault::HostileIndexJump { queue, .. }
            | Fault::HostileDoubleComplete { queue, .. }
            | Fault::Throttle { queue, .. }
            | Fault::WrongUsedLen { queue, .. } => Some(queue),
            _ => None,
        }
    }
}

impl FaultState {
    /// Nothing armed, for a device with `queues` queues.
    pub fn new(queues: usize) -> Self {
        Self {
            drop_irqs: vec![0; queues],
            spurious: vec![0; queues],
            stall_until: vec![None; queues],
            storm_start: vec![None; queues],
            storm_until: vec![None; queues],
            hostile: vec![HostileArms::default(); queues],
            hostile_signal: vec![false; queues],
            throttle: vec![None; queues],
            ..Self::default()
        }
    }

    /// Arm `fault` on `queues` (the indices its [`Fault::queue`] names,
    /// resolved by the caller; ignored by faults without a queue). Bad
    /// parameters are refused with a message naming them.
    pub fn apply(&mut self, fault: &Fault, queues: &[u16], now: Instant) -> Result<(), String> {
        match *fault {
            Fault::DropInterrupts { count, .. } => {
                for &q in queues {
                    self.drop_irqs[q as usize] = self.drop_irqs[q as usize].saturating_add(count);
                }
            }
            Fault::SpuriousInterrupts { count, .. } => {
                if count > 100_000 {
                    return Err(format!(
                        "spurious_interrupts: count must be at most 100000, not {count}"
                    ));
                }
                for &q in queues {
                    self.spurious[q as usize] = self.spurious[q as usize].saturating_add(count);
                }
            }
            Fault::InterruptStorm {
                rate_hz,
                duration_ms,
                ..
            } => {
                if rate_hz == 0 || rate_hz > 100_000 {
                    return Err(format!(
                        "interrupt_storm: rate_hz must be 1..=100000, not {rate_hz}"
                    ));
                }
                if duration_ms == 0 || duration_ms > MAX_STALL_MS {
                    return Err(format!(
                        "interrupt_storm: duration_ms must be 1..={MAX_STALL_MS}, not {duration_ms}"
                    ));
                }
                let period = Duration::from_nanos(1_000_000_000 / u64::from(rate_hz));
                let until = now + Duration::from_millis(duration_ms);
                for &q in queues {
                    self.storm_start[q as usize] = Some((period, until));
                    self.storm_until[q as usize] = Some(until);
                }
            }
            Fault::Stall { duration_ms, .. } => {
                if duration_ms == 0 || duration_ms > MAX_STALL_MS {
                    return Err(format!(
                        "stall: duration_ms must be 1..={MAX_STALL_MS}, not {duration_ms}"
                    ));
                }
                for &q in queues {
                    self.stall_until[q as usize] = Some(now + Duration::from_millis(duration_ms));
                }
            }
            Fault::Slow { delay_us } => {
                if delay_us > MAX_SLOW_US {
                    return Err(format!(
                        "slow: delay_us must be at most {MAX_SLOW_US}, not {delay_us}"
                    ));
                }
                self.slow = Duration::from_micros(delay_us);
            }
            Fault::CorruptRx { count, seed } => {
                self.corrupt = self.corrupt.saturating_add(count);
                self.rng = seed | 1;
            }
            Fault::TruncateRx { count } => self.truncate = self.truncate.saturating_add(count),
            Fault::HostileBogusId { count, .. } => {
                for &q in queues {
                    let a = &mut self.hostile[q as usize];
                    a.bogus_id = a.bogus_id.saturating_add(count);
                }
            }
            Fault::HostileOverlong { count, by, .. } => {
                if by == 0 || by > 1 << 20 {
                    return Err(format!(
                        "hostile_overlong: by must be 1..=1048576, not {by}"
                    ));
                }
                for &q in queues {
                    let a = &mut self.hostile[q as usize];
                    a.overlong = (a.overlong.0.saturating_add(count), by);
                }
            }
            Fault::HostileIndexJump { count, by, .. } => {
                if by == 0 || by > 0x8000 {
                    return Err(format!(
                        "hostile_index_jump: by must be 1..=32768, not {by}"
                    ));
                }
                for &q in queues {
                    let a = &mut self.hostile[q as usize];
                    a.index_jump = (a.index_jump.0.saturating_add(count), by);
                }
            }
            Fault::HostileDoubleComplete { count, .. } => {
                for &q in queues {
                    let a = &mut self.hostile[q as usize];
                    a.double_complete = a.double_complete.saturating_add(count);
                }
            }
            Fault::Clear {} => *self = FaultState::new(self.drop_irqs.len()),
            Fault::Throttle {
                buffers,
                interval_ms,
                duration_ms,
                ..
            } => {
                if buffers == 0 || buffers > 0xffff {
                    return Err(format!(
                        "throttle: buffers must be 1..=65535, not {buffers}"
                    ));
                }
                if interval_ms == 0 || interval_ms > 1000 {
                    return Err(format!(
                        "throttle: interval_ms must be 1..=1000, not {interval_ms}"
                    ));
                }
                if duration_ms == 0 || duration_ms > MAX_STALL_MS {
                    return Err(format!(
                        "throttle: duration_ms must be 1..={MAX_STALL_MS}, not {duration_ms}"
                    ));
                }
                for &q in queues {
                    self.throttle[q as usize] = Some(Throttle {
                        buffers,
                        interval: Duration::from_millis(interval_ms),
                        until: now + Duration::from_millis(duration_ms),
                        next: now,
                    });
                }
            }
            Fault::WrongUsedLen { count, len, .. } => {
                for &q in queues {
                    let a = &mut self.hostile[q as usize];
                    a.wrong_len = (a.wrong_len.0.saturating_add(count), len);
                }
            }
            Fault::ConfigChangeStorm { .. }
            | Fault::HostileConfigChange { .. }
            | Fault::HostileConfigFlicker { .. } => {
                return Err(
                    "config-change faults are armed through the core (Core::apply_fault)".into(),
                )
            }
        }
        Ok(())
    }

    /// Whether `queue` is throttled now, and how ([`Fault::Throttle`]).
    pub fn throttle_gate(&mut self, queue: u16, now: Instant) -> Gate {
        let Some(slot) = self.throttle.get_mut(queue as usize) else {
            return Gate::Open;
        };
        match *slot {
            Some(t) if t.until <= now => {
                *slot = None;
                Gate::Open
            }
            Some(t) if t.next > now => Gate::Wait(t.next - now),
            Some(t) => Gate::Limit(t.buffers),
            None => Gate::Open,
        }
    }

    /// A throttled pass over `queue` ran at `now`: the next waits an
    /// interval. Returns that interval (`None` if not throttled).
    pub fn throttle_passed(&mut self, queue: u16, now: Instant) -> Option<Duration> {
        let t = self.throttle.get_mut(queue as usize)?.as_mut()?;
        t.next = now + t.interval;
        Some(t.interval)
    }

    /// Whether the next due interrupt of `queue` is to be lost (consumes one).
    pub fn take_drop(&mut self, queue: u16) -> bool {
        match self.drop_irqs.get_mut(queue as usize) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Spurious interrupts to raise now on `queue` (consumes them).
    pub fn take_spurious(&mut self, queue: u16) -> u32 {
        self.spurious
            .get_mut(queue as usize)
            .map_or(0, std::mem::take)
    }

    /// A storm the transport must start on `queue` now: its timer period.
    pub fn take_storm_start(&mut self, queue: u16) -> Option<Duration> {
        self.storm_start
            .get_mut(queue as usize)
            .and_then(Option::take)
            .map(|(period, _)| period)
    }

    /// Whether `queue`'s storm is still on (false once it is over).
    pub fn storm_on(&mut self, queue: u16, now: Instant) -> bool {
        let Some(slot) = self.storm_until.get_mut(queue as usize) else {
            return false;
        };
        match *slot {
            Some(until) if until > now => true,
            _ => {
                *slot = None;
                false
            }
        }
    }

    /// If `queue` is stalled, for how much longer.
    pub fn stalled_for(&mut self, queue: u16, now: Instant) -> Option<Duration> {
        let slot = self.stall_until.get_mut(queue as usize)?;
        match *slot {
            Some(until) if until > now => Some(until - now),
            Some(_) => {
                *slot = None;
                None
            }
            None => None,
        }
    }

    /// Delay before each pass.
    pub fn slow(&self) -> Duration {
        self.slow
    }

    /// Damage a receive buffer about to be written: returns the used length
    /// to report for `len` written bytes, and flips a byte of `data` if a
    /// corruption is armed. `(corrupted, truncated_bytes)` tell the caller
    /// what to count.
    pub fn damage_rx(&mut self, data: &mut [u8]) -> (bool, usize) {
        let mut corrupted = false;
        if self.corrupt > 0 && !data.is_empty() {
            self.corrupt -= 1;
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let at = (self.rng % data.len() as u64) as usize;
            data[at] ^= 0xff;
            corrupted = true;
        }
        let mut cut = 0;
        if self.truncate > 0 && data.len() > 1 {
            self.truncate -= 1;
            cut = data.len() - data.len() / 2;
        }
        (corrupted, cut)
    }

    /// The hostile-mode violations armed on `queue` (to consume them).
    pub fn hostile_mut(&mut self, queue: u16) -> Option<&mut HostileArms> {
        self.hostile.get_mut(queue as usize)
    }

    /// Raise `queue`'s next interrupt even if the driver suppressed it:
    /// after a used-index jump the transport's suppression bookkeeping
    /// (which counts entries added) no longer matches the index, and a
    /// hostile device does not ask anyway.
    pub fn force_next_signal(&mut self, queue: u16) {
        if let Some(f) = self.hostile_signal.get_mut(queue as usize) {
            *f = true;
        }
    }

    /// Whether `queue`'s next interrupt is forced (consumes it).
    pub fn take_forced_signal(&mut self, queue: u16) -> bool {
        self.hostile_signal
            .get_mut(queue as usize)
            .is_some_and(std::mem::take)
    }

    /// Whether a receive buffer needs [`FaultState::damage_rx`].
    pub fn rx_damage_armed(&self) -> bool {
        self.corrupt > 0 || self.truncate > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RX_QUEUE: u16 = 0;
    const TX_QUEUE: u16 = 1;

    /// Arm `fault` the way the core does for a device with queues rx and tx.
    fn arm(f: &mut FaultState, fault: &Fault, now: Instant) -> Result<(), String> {
        let queues: Vec<u16> = match fault.queue().map(|q| q.0.as_str()) {
            Some("rx") => vec![RX_QUEUE],
            Some("tx") => vec![TX_QUEUE],
            _ => vec![RX_QUEUE, TX_QUEUE],
        };
        f.apply(fault, &queues, now)
    }

    #[test]
    fn faults_arm_count_and_clear() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        arm(
            &mut f,
            &Fault::DropInterrupts {
                queue: QueueSel::all(),
                count: 2,
            },
            now,
        )
        .unwrap();
        assert!(f.take_drop(RX_QUEUE) && f.take_drop(RX_QUEUE) && !f.take_drop(RX_QUEUE));
        assert!(f.take_drop(TX_QUEUE));
        arm(
            &mut f,
            &Fault::SpuriousInterrupts {
                queue: QueueSel::named("tx"),
                count: 3,
            },
            now,
        )
        .unwrap();
        assert_eq!(
            (
                f.take_spurious(RX_QUEUE),
                f.take_spurious(TX_QUEUE),
                f.take_spurious(TX_QUEUE)
            ),
            (0, 3, 0)
        );
        arm(
            &mut f,
            &Fault::Stall {
                queue: QueueSel::named("rx"),
                duration_ms: 100,
            },
            now,
        )
        .unwrap();
        assert!(f.stalled_for(RX_QUEUE, now).is_some());
        assert!(f.stalled_for(TX_QUEUE, now).is_none());
        assert!(f
            .stalled_for(RX_QUEUE, now + Duration::from_millis(101))
            .is_none());
        arm(&mut f, &Fault::Slow { delay_us: 50 }, now).unwrap();
        arm(&mut f, &Fault::Clear {}, now).unwrap();
        assert_eq!(f.slow(), Duration::ZERO);
    }

    #[test]
    fn storms_start_once_and_end() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        let storm = Fault::InterruptStorm {
            queue: QueueSel::named("rx"),
            rate_hz: 1000,
            duration_ms: 50,
        };
        arm(&mut f, &storm, now).unwrap();
        assert_eq!(f.take_storm_start(RX_QUEUE), Some(Duration::from_millis(1)));
        assert_eq!(f.take_storm_start(RX_QUEUE), None);
        assert!(f.storm_on(RX_QUEUE, now));
        assert!(!f.storm_on(RX_QUEUE, now + Duration::from_millis(60)));
        let bad = Fault::InterruptStorm {
            queue: QueueSel::named("rx"),
            rate_hz: 0,
            duration_ms: 50,
        };
        assert!(arm(&mut f, &bad, now).unwrap_err().contains("rate_hz"));
    }

    #[test]
    fn rx_damage_flips_one_byte_and_truncates() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        arm(&mut f, &Fault::CorruptRx { count: 1, seed: 5 }, now).unwrap();
        let mut data = vec![0u8; 64];
        assert_eq!(f.damage_rx(&mut data), (true, 0));
        assert_eq!(data.iter().filter(|&&b| b == 0xff).count(), 1);
        assert!(!f.rx_damage_armed());
        arm(&mut f, &Fault::TruncateRx { count: 1 }, now).unwrap();
        let mut data = vec![0u8; 9];
        assert_eq!(f.damage_rx(&mut data), (false, 5));
    }

    #[test]
    fn throttle_gates_passes_and_ends() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        let t = Fault::Throttle {
            queue: QueueSel::named("tx"),
            buffers: 2,
            interval_ms: 10,
            duration_ms: 100,
        };
        arm(&mut f, &t, now).unwrap();
        assert_eq!(f.throttle_gate(RX_QUEUE, now), Gate::Open);
        assert_eq!(f.throttle_gate(TX_QUEUE, now), Gate::Limit(2));
        assert_eq!(
            f.throttle_passed(TX_QUEUE, now),
            Some(Duration::from_millis(10))
        );
        assert_eq!(
            f.throttle_gate(TX_QUEUE, now + Duration::from_millis(4)),
            Gate::Wait(Duration::from_millis(6))
        );
        assert_eq!(
            f.throttle_gate(TX_QUEUE, now + Duration::from_millis(10)),
            Gate::Limit(2)
        );
        assert_eq!(
            f.throttle_gate(TX_QUEUE, now + Duration::from_millis(100)),
            Gate::Open
        );
        assert_eq!(f.throttle_passed(TX_QUEUE, now), None);
        let bad = Fault::Throttle {
            queue: QueueSel::named("tx"),
            buffers: 0,
            interval_ms: 10,
            duration_ms: 100,
        };
        assert!(arm(&mut f, &bad, now).unwrap_err().contains("buffers"));
        let parsed: Fault = serde_json::from_str(
            r#"{"kind":"throttle","queue":"tx","interval_ms":5,"duration_ms":50}"#,
        )
        .unwrap();
        assert!(matches!(parsed, Fault::Throttle { buffers: 1, .. }));
    }

    #[test]
    fn wrong_used_lengths_are_armed_per_queue() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        let w: Fault =
            serde_json::from_str(r#"{"kind":"wrong_used_len","queue":"tx","count":3,"len":7}"#)
                .unwrap();
        arm(&mut f, &w, now).unwrap();
        assert_eq!(f.hostile_mut(TX_QUEUE).unwrap().wrong_len, (3, 7));
        assert_eq!(f.hostile_mut(RX_QUEUE).unwrap().wrong_len, (0, 0));
    }

    #[test]
    fn bad_parameters_are_explained() {
        let now = Instant::now();
        let mut f = FaultState::new(2);
        let e = arm(
            &mut f,
            &Fault::Stall {
                queue: QueueSel::named("rx"),
                duration_ms: 0,
            },
            now,
        )
        .unwrap_err();
        assert!(e.contains("duration_ms"));
        let e = arm(
            &mut f,
            &Fault::Slow {
                delay_us: 5_000_000,
            },
            now,
        )
        .unwrap_err();
        assert!(e.contains("delay_us"));
        let parsed: Fault =
            serde_json::from_str(r#"{"kind":"drop_interrupts","queue":"rx","count":3}"#).unwrap();
        assert_eq!(
            parsed,
            Fault::DropInterrupts {
                queue: QueueSel::named("rx"),
                count: 3
            }
        );
        assert!(serde_json::from_str::<Fault>(r#"{"kind":"explode"}"#).is_err());
    }
}
