//! The sensor's logic, apart from the transport: its clock, the samples it
//! takes, the alarms they raise, the FIFOs that hold both for the driver,
//! and the control commands. Time comes in as an [`Instant`] argument, so
//! unit tests drive the clock themselves.

use std::collections::VecDeque;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::spec::{
    ALARM_BYTES, ALARM_FALLING, ALARM_FIFO, ALARM_RISING, CMD_SET_RATE, CMD_SET_THRESHOLD,
    CONFIG_SIZE, CTRL_REQ_BYTES, MAGIC, MAX_RATE_HZ, MAX_TICK_NS, SAMPLE_BYTES, SAMPLE_FIFO,
    STATUS_ALARM_COUNT_SHIFT, STATUS_INVALID, STATUS_MALFORMED, STATUS_NEEDS_RESET, STATUS_OK,
    STATUS_SAMPLING, STATUS_UNSUPPORTED, VERSION,
};
use crate::wave::Wave;

/// One sample, as the driver receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The device clock when it was taken, ns.
    pub timestamp_ns: u64,
    /// Sequence number.
    pub seq: u32,
    /// Value.
    pub value: i32,
}

impl Sample {
    /// The 16-byte record.
    pub fn to_bytes(self) -> [u8; SAMPLE_BYTES] {
        let mut b = [0u8; SAMPLE_BYTES];
        b[0..8].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Parse a 16-byte record (tests and host tools).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b: &[u8; SAMPLE_BYTES] = b.get(..SAMPLE_BYTES)?.try_into().ok()?;
        Some(Self {
            timestamp_ns: u64::from_le_bytes(b[0..8].try_into().ok()?),
            seq: u32::from_le_bytes(b[8..12].try_into().ok()?),
            value: i32::from_le_bytes(b[12..16].try_into().ok()?),
        })
    }
}

/// One alarm, as the driver receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alarm {
    /// Timestamp of the sample that crossed.
    pub timestamp_ns: u64,
    /// Its sequence number.
    pub seq: u32,
    /// Its value.
    pub value: i32,
    /// The threshold in force.
    pub threshold: i32,
    /// [`ALARM_RISING`] or [`ALARM_FALLING`].
    pub kind: u32,
}

impl Alarm {
    /// The 24-byte record.
    pub fn to_bytes(self) -> [u8; ALARM_BYTES] {
        let mut b = [0u8; ALARM_BYTES];
        b[0..8].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.value.to_le_bytes());
        b[16..20].copy_from_slice(&self.threshold.to_le_bytes());
        b[20..24].copy_from_slice(&self.kind.to_le_bytes());
        b
    }

    /// Parse a 24-byte record (tests and host tools).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let b = b.get(..ALARM_BYTES)?;
        let u = |r: std::ops::Range<usize>| -> Option<[u8; 4]> { b.get(r)?.try_into().ok() };
        Some(Self {
            timestamp_ns: u64::from_le_bytes(b[0..8].try_into().ok()?),
            seq: u32::from_le_bytes(u(8..12)?),
            value: i32::from_le_bytes(u(12..16)?),
            threshold: i32::from_le_bytes(u(16..20)?),
            kind: u32::from_le_bytes(u(20..24)?),
        })
    }
}

/// The sensor's counters (the control plane's `stats`, with the core's).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Samples taken (delivered, pending or dropped).
    pub samples_taken: u64,
    /// Samples written into the driver's buffers.
    pub samples_delivered: u64,
    /// Samples lost because the sample FIFO was full.
    pub samples_dropped: u64,
    /// Sample buffers completed with data.
    pub sample_buffers: u64,
    /// Alarms raised.
    pub alarms_raised: u64,
    /// Alarms written into the driver's event buffers.
    pub alarms_delivered: u64,
    /// Alarms lost because the alarm FIFO was full.
    pub alarms_dropped: u64,
    /// Control requests answered.
    pub ctrl_requests: u64,
    /// Control requests answered with a status other than OK.
    pub ctrl_errors: u64,
}

/// The sensor's state: rate, threshold, clock, FIFOs, counters.
#[derive(Debug)]
pub struct Sensor {
    wave: Wave,
    rate_hz: u32,
    threshold: i32,
    mode: u32,
    /// Device clock origin: when the first sample after a reset was taken.
    epoch: Option<Instant>,
    next_seq: u32,
    /// Timestamp of the next sample to take, while sampling.
    next_ts: u64,
    last_ts: Option<u64>,
    samples: VecDeque<Sample>,
    alarms: VecDeque<Alarm>,
    /// Alarms raised since the last reset (the status word's count).
    alarms_since_reset: u32,
    counters: Counters,
}

impl Sensor {
    /// A sensor at power-on (stopped, alarms off) with this waveform.
    pub fn new(wave: Wave) -> Self {
        Self {
            wave,
            rate_hz: 0,
            threshold: 0,
            mode: 0,
            epoch: None,
            next_seq: 0,
            next_ts: 0,
            last_ts: None,
            samples: VecDeque::with_capacity(SAMPLE_FIFO),
            alarms: VecDeque::with_capacity(ALARM_FIFO),
            alarms_since_reset: 0,
            counters: Counters::default(),
        }
    }

    /// The waveform.
    pub fn wave(&self) -> Wave {
        self.wave
    }

    /// Change the waveform (host control plane). Samples already taken keep
    /// their values.
    pub fn set_wave(&mut self, wave: Wave) -> Result<(), String> {
        wave.validate()?;
        self.wave = wave;
        Ok(())
    }

    /// Current rate, Hz (0: stopped).
    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Current threshold and alarm mode.
    pub fn threshold(&self) -> (i32, u32) {
        (self.threshold, self.mode)
    }

    /// Sequence number of the next sample.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Samples waiting for a buffer.
    pub fn samples_pending(&self) -> usize {
        self.samples.len()
    }

    /// Alarms waiting for a buffer.
    pub fn alarms_pending(&self) -> usize {
        self.alarms.len()
    }

    /// The sampling period, ns, while sampling.
    pub fn period_ns(&self) -> Option<u64> {
        (self.rate_hz > 0).then(|| 1_000_000_000 / u64::from(self.rate_hz))
    }

    /// How often the device's timer should fire: the sampling period, at
    /// most [`MAX_TICK_NS`]; `None` when stopped.
    pub fn tick_ns(&self) -> Option<u64> {
        self.period_ns().map(|p| p.min(MAX_TICK_NS))
    }

    /// The device clock at `now`, ns since the first sample after a reset.
    pub fn clock_ns(&self, now: Instant) -> u64 {
        self.epoch.map_or(0, |e| {
            u64::try_from(now.saturating_duration_since(e).as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// `SET_RATE`: `Ok(rate in force)` or `Err(status)`. Starting takes the
    /// first sample at once; a change applies from the next sample.
    pub fn set_rate(&mut self, hz: u32, now: Instant) -> Result<u32, u32> {
        if hz > MAX_RATE_HZ {
            return Err(STATUS_INVALID);
        }
        let was = self.rate_hz;
        self.rate_hz = hz;
        if hz == 0 {
            return Ok(0);
        }
        let period = 1_000_000_000 / u64::from(hz);
        if was == 0 {
            if self.epoch.is_none() {
                self.epoch = Some(now);
            }
            // At the current clock, and always after the last sample.
            let clock = self.clock_ns(now);
            self.next_ts = self.last_ts.map_or(clock, |l| clock.max(l + 1));
        } else if let Some(last) = self.last_ts {
            self.next_ts = last + period;
        }
        self.pump(now);
        Ok(hz)
    }

    /// `SET_THRESHOLD`: `Ok(mode in force)` or `Err(status)`.
    pub fn set_threshold(&mut self, threshold: i32, mode: u32) -> Result<u32, u32> {
        if mode > (ALARM_RISING | ALARM_FALLING) {
            return Err(STATUS_INVALID);
        }
        self.threshold = threshold;
        self.mode = mode;
        Ok(mode)
    }

    /// Answer a control request (`req`: the chain's device-readable bytes):
    /// the status and the value for the status record.
    pub fn control(&mut self, req: &[u8], now: Instant) -> (u32, u32) {
        self.counters.ctrl_requests += 1;
        let word = |i: usize| {
            req.get(4 * i..4 * i + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let result = match (
            req.len() >= CTRL_REQ_BYTES,
            word(0),
            word(1),
            word(2),
            word(3),
        ) {
            (true, Some(cmd), Some(arg0), Some(arg1), Some(0)) => match cmd {
                CMD_SET_RATE if arg1 == 0 => self.set_rate(arg0, now),
                CMD_SET_RATE => Err(STATUS_INVALID),
                CMD_SET_THRESHOLD => self.set_threshold(arg0 as i32, arg1),
                _ => Err(STATUS_UNSUPPORTED),
            },
            _ => Err(STATUS_MALFORMED),
        };
        match result {
            Ok(v) => (STATUS_OK, v),
            Err(status) => {
                self.counters.ctrl_errors += 1;
                (status, 0)
            }
        }
    }

    /// A request answered with an injected error `status` (the host's
    /// `ctrl_fault`): counted like a refused one, nothing carried out.
    /// Returns `status`.
    pub fn injected_error(&mut self, status: u32) -> u32 {
        self.counters.ctrl_requests += 1;
        self.counters.ctrl_errors += 1;
        status
    }

    /// Take every sample due at `now` (late timer ticks are made up): each
    /// is checked for a threshold crossing, then queued for the driver or,
    /// with the FIFO full, dropped and counted. Returns whether anything
    /// was queued.
    pub fn pump(&mut self, now: Instant) -> bool {
        let Some(period) = self.period_ns() else {
            return false;
        };
        let clock = self.clock_ns(now);
        let mut queued = false;
        while self.next_ts <= clock {
            let seq = self.next_seq;
            let sample = Sample {
                timestamp_ns: self.next_ts,
                seq,
                value: self.wave.value(seq),
            };
            self.counters.samples_taken += 1;
            if let Some(kind) = self.wave.crossing(seq, self.threshold, self.mode) {
                self.counters.alarms_raised += 1;
                self.alarms_since_reset = self.alarms_since_reset.wrapping_add(1);
                if self.alarms.len() < ALARM_FIFO {
                    self.alarms.push_back(Alarm {
                        timestamp_ns: sample.timestamp_ns,
                        seq,
                        value: sample.value,
                        threshold: self.threshold,
                        kind,
                    });
                    queued = true;
                } else {
                    self.counters.alarms_dropped += 1;
                }
            }
            if self.samples.len() < SAMPLE_FIFO {
                self.samples.push_back(sample);
                queued = true;
            } else {
                self.counters.samples_dropped += 1;
            }
            self.last_ts = Some(self.next_ts);
            self.next_ts += period;
            self.next_seq = seq.wrapping_add(1);
        }
        queued
    }

    /// Take up to `max` pending samples, oldest first, as records.
    pub fn take_samples(&mut self, max: usize, out: &mut Vec<u8>) -> usize {
        let n = max.min(self.samples.len());
        for s in self.samples.drain(..n) {
            out.extend_from_slice(&s.to_bytes());
        }
        self.counters.samples_delivered += n as u64;
        if n > 0 {
            self.counters.sample_buffers += 1;
        }
        n
    }

    /// Alarms raised since the last reset (wrapping): what the status
    /// word's alarm count shows, modulo 65536.
    pub fn alarms_since_reset(&self) -> u32 {
        self.alarms_since_reset
    }

    /// Take the oldest pending alarm.
    pub fn take_alarm(&mut self) -> Option<Alarm> {
        let a = self.alarms.pop_front()?;
        self.counters.alarms_delivered += 1;
        Some(a)
    }

    /// Back to the power-on state (a device reset): stopped, alarms off,
    /// FIFOs empty, sequence and clock at 0. The waveform and the counters
    /// are kept.
    pub fn reset(&mut self) {
        *self = Self {
            counters: self.counters,
            ..Self::new(self.wave)
        };
    }

    /// The config space as the driver reads it now.
    pub fn config_space(&self, needs_reset: bool) -> Vec<u8> {
        let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let mut status = 0;
        if needs_reset {
            status |= STATUS_NEEDS_RESET;
        }
        if self.rate_hz > 0 {
            status |= STATUS_SAMPLING;
        }
        status |= (self.alarms_since_reset & 0xffff) << STATUS_ALARM_COUNT_SHIFT;
        let words = [
            MAGIC,
            VERSION,
            SAMPLE_BYTES as u32,
            ALARM_BYTES as u32,
            MAX_RATE_HZ,
            self.rate_hz,
            self.threshold as u32,
            self.mode,
            self.wave.seed as u32,
            (self.wave.seed >> 32) as u32,
            self.wave.amplitude,
            self.wave.wave_period,
            self.wave.noise,
            status,
            sat(self.counters.samples_dropped),
            sat(self.counters.alarms_dropped),
        ];
        let space: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        debug_assert_eq!(space.len(), CONFIG_SIZE);
        space
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wave() -> Wave {
        Wave {
            seed: 7,
            amplitude: 1000,
            wave_period: 64,
            noise: 20,
        }
    }

    fn req(cmd: u32, a0: u32, a1: u32, reserved: u32) -> Vec<u8> {
        [cmd, a0, a1, reserved]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    fn drain(s: &mut Sensor) -> Vec<Sample> {
        let mut out = Vec::new();
        s.take_samples(usize::MAX, &mut out);
        out.chunks(16).filter_map(Sample::from_bytes).collect()
    }

    #[test]
    fn samples_come_at_the_rate_with_exact_values_and_timestamps() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        assert!(!s.pump(t0), "a stopped sensor takes nothing");
        assert_eq!(s.set_rate(1000, t0), Ok(1000));
        // The first sample is taken at once, at clock 0.
        assert_eq!(s.samples_pending(), 1);
        // 10.5 ms later: samples at 0, 1, ..., 10 ms.
        s.pump(t0 + Duration::from_micros(10_500));
        let got = drain(&mut s);
        assert_eq!(got.len(), 11);
        for (i, smp) in got.iter().enumerate() {
            assert_eq!(smp.seq, i as u32);
            assert_eq!(smp.timestamp_ns, i as u64 * 1_000_000);
            assert_eq!(smp.value, wave().value(i as u32));
        }
        // Never early: nothing new before the next timestamp.
        s.pump(t0 + Duration::from_micros(10_999));
        assert_eq!(s.samples_pending(), 0);
        s.pump(t0 + Duration::from_micros(11_000));
        assert_eq!(s.samples_pending(), 1);
        assert_eq!(s.counters().samples_taken, 12);
        assert_eq!(s.counters().samples_delivered, 11);
    }

    #[test]
    fn a_rate_change_applies_from_the_next_sample() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        s.set_rate(1000, t0).unwrap();
        s.pump(t0 + Duration::from_micros(2_500)); // 0, 1, 2 ms
        assert_eq!(s.set_rate(250, t0 + Duration::from_micros(2_600)), Ok(250));
        s.pump(t0 + Duration::from_millis(20));
        let ts: Vec<u64> = drain(&mut s).iter().map(|x| x.timestamp_ns).collect();
        assert_eq!(
            ts,
            [0, 1, 2, 6, 10, 14, 18]
                .iter()
                .map(|ms| ms * 1_000_000)
                .collect::<Vec<_>>()
        );
        // Stop, then start again: at once, at the current clock.
        assert_eq!(s.set_rate(0, t0 + Duration::from_millis(21)), Ok(0));
        assert!(!s.pump(t0 + Duration::from_millis(40)));
        s.set_rate(100, t0 + Duration::from_millis(50)).unwrap();
        let got = drain(&mut s);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].seq, got[0].timestamp_ns), (7, 50_000_000));
        assert_eq!(s.tick_ns(), Some(1_000_000), "timer at most 1 ms");
        s.set_rate(10_000, t0 + Duration::from_millis(51)).unwrap();
        assert_eq!(s.tick_ns(), Some(100_000));
    }

    #[test]
    fn alarms_are_the_threshold_crossings_of_every_sample_taken() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        assert_eq!(s.set_threshold(500, ALARM_RISING | ALARM_FALLING), Ok(3));
        s.set_rate(1000, t0).unwrap();
        s.pump(t0 + Duration::from_millis(199)); // seq 0..=199
        let expect: Vec<(u32, u32)> = (0..200)
            .filter_map(|q| wave().crossing(q, 500, 3).map(|k| (q, k)))
            .collect();
        assert!(expect.len() >= 6, "{expect:?}");
        let mut got = Vec::new();
        while let Some(a) = s.take_alarm() {
            assert_eq!(a.threshold, 500);
            assert_eq!(a.value, wave().value(a.seq));
            assert_eq!(a.timestamp_ns, u64::from(a.seq) * 1_000_000);
            got.push((a.seq, a.kind));
        }
        assert_eq!(got, expect);
        assert_eq!(s.counters().alarms_raised, expect.len() as u64);
    }

    #[test]
    fn full_fifos_drop_and_count_and_seq_shows_the_gap() {
        let t0 = Instant::now();
        let mut s = Sensor::new(Wave {
            wave_period: 4,
            noise: 0,
            ..wave()
        });
        s.set_threshold(0, ALARM_RISING).unwrap();
        s.set_rate(1000, t0).unwrap();
        // 1000 samples due at once: the FIFO keeps the first 256.
        s.pump(t0 + Duration::from_millis(999));
        let c = s.counters();
        assert_eq!(c.samples_taken, 1000);
        assert_eq!(c.samples_dropped, 1000 - SAMPLE_FIFO as u64);
        assert_eq!(c.alarms_raised, 250);
        assert_eq!(c.alarms_dropped, 250 - ALARM_FIFO as u64);
        let got = drain(&mut s);
        assert_eq!(got.last().unwrap().seq, SAMPLE_FIFO as u32 - 1);
        s.pump(t0 + Duration::from_millis(1000));
        assert_eq!(drain(&mut s)[0].seq, 1000, "the gap is visible");
        let cfg = s.config_space(false);
        assert_eq!(&cfg[0x38..0x3c], &(1000 - SAMPLE_FIFO as u32).to_le_bytes());
    }

    #[test]
    fn control_requests_are_checked() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        assert_eq!(s.control(&req(1, 500, 0, 0), t0), (STATUS_OK, 500));
        assert_eq!(s.control(&req(1, 10_001, 0, 0), t0), (STATUS_INVALID, 0));
        assert_eq!(s.rate_hz(), 500, "a refused request changes nothing");
        assert_eq!(s.control(&req(1, 5, 1, 0), t0), (STATUS_INVALID, 0));
        assert_eq!(s.control(&req(2, -7i32 as u32, 2, 0), t0), (STATUS_OK, 2));
        assert_eq!(s.threshold(), (-7, 2));
        assert_eq!(s.control(&req(2, 0, 4, 0), t0), (STATUS_INVALID, 0));
        assert_eq!(s.control(&req(9, 0, 0, 0), t0), (STATUS_UNSUPPORTED, 0));
        assert_eq!(s.control(&req(1, 1, 0, 1), t0), (STATUS_MALFORMED, 0));
        assert_eq!(s.control(&req(1, 1, 0, 0)[..15], t0), (STATUS_MALFORMED, 0));
        assert_eq!(s.control(&[], t0), (STATUS_MALFORMED, 0));
        let mut long = req(1, 100, 0, 0);
        long.extend_from_slice(&[0xff; 8]);
        assert_eq!(s.control(&long, t0), (STATUS_OK, 100));
        let c = s.counters();
        assert_eq!((c.ctrl_requests, c.ctrl_errors), (10, 7));
    }

    #[test]
    fn reset_returns_to_power_on_but_keeps_counters_and_wave() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        s.set_threshold(1, 3).unwrap();
        s.set_rate(1000, t0).unwrap();
        s.pump(t0 + Duration::from_millis(5));
        s.reset();
        assert_eq!((s.rate_hz(), s.threshold(), s.next_seq()), (0, (0, 0), 0));
        assert_eq!((s.samples_pending(), s.alarms_pending()), (0, 0));
        assert_eq!(s.counters().samples_taken, 6);
        assert_eq!(s.wave(), wave());
        let t1 = t0 + Duration::from_secs(1);
        s.set_rate(1000, t1).unwrap();
        let first = drain(&mut s)[0];
        assert_eq!((first.seq, first.timestamp_ns), (0, 0));
    }

    #[test]
    fn config_space_layout() {
        let t0 = Instant::now();
        let mut s = Sensor::new(Wave {
            seed: 0x1122_3344_5566_7788,
            ..wave()
        });
        s.set_rate(200, t0).unwrap();
        s.set_threshold(-5, 1).unwrap();
        let c = s.config_space(true);
        let w = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(c.len(), CONFIG_SIZE);
        assert_eq!(&c[0..4], b"SNSR");
        assert_eq!(
            (w(0x04), w(0x08), w(0x0c), w(0x10), w(0x14)),
            (1, 16, 24, 10_000, 200)
        );
        assert_eq!((w(0x18) as i32, w(0x1c)), (-5, 1));
        assert_eq!((w(0x20), w(0x24)), (0x5566_7788, 0x1122_3344));
        assert_eq!((w(0x28), w(0x2c), w(0x30)), (1000, 64, 20));
        assert_eq!(w(0x34), STATUS_NEEDS_RESET | STATUS_SAMPLING);
    }

    #[test]
    fn the_status_word_counts_alarms_since_the_reset() {
        let t0 = Instant::now();
        let mut s = Sensor::new(wave());
        s.set_threshold(0, ALARM_RISING | ALARM_FALLING).unwrap();
        s.set_rate(1000, t0).unwrap();
        s.pump(t0 + Duration::from_millis(5000));
        let raised = s.counters().alarms_raised;
        assert!(raised > 64, "more than the alarm FIFO holds: {raised}");
        assert_eq!(
            u64::from(s.alarms_since_reset()),
            raised,
            "dropped ones too"
        );
        let status = |s: &Sensor| {
            let c = s.config_space(false);
            u32::from_le_bytes(c[0x34..0x38].try_into().unwrap())
        };
        assert_eq!(status(&s) >> 16, raised as u32);
        assert_eq!(status(&s) & 0xffff, STATUS_SAMPLING);
        s.reset();
        assert_eq!(status(&s), 0, "back to 0 at a reset");
    }

    #[test]
    fn records_round_trip() {
        let s = Sample {
            timestamp_ns: 5,
            seq: 6,
            value: -7,
        };
        assert_eq!(Sample::from_bytes(&s.to_bytes()), Some(s));
        let a = Alarm {
            timestamp_ns: 1,
            seq: 2,
            value: -3,
            threshold: 4,
            kind: ALARM_FALLING,
        };
        assert_eq!(Alarm::from_bytes(&a.to_bytes()), Some(a));
        assert_eq!(Sample::from_bytes(&[0; 15]), None);
    }
}
