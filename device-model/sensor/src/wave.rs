//! The seeded waveform (`docs/sensor-spec.md`, "The waveform"): the value
//! of a sample depends only on its sequence number and the parameters, so
//! the guest can check every sample, also after a gap. The guest programs
//! have their own copy (`guest-programs/src/scenarios/sensor.rs`); both pin the
//! same values in their tests.

use serde::{Deserialize, Serialize};

use crate::spec::{ALARM_FALLING, ALARM_RISING, MAX_AMPLITUDE, WAVE_PERIOD_RANGE};

/// The waveform's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Seed of the noise.
    pub seed: u64,
    /// Amplitude A: the triangle goes from -A to A.
    pub amplitude: u32,
    /// Period P, in samples.
    pub wave_period: u32,
    /// Noise amplitude N: a seeded value in -N..=N is added.
    pub noise: u32,
}

impl Default for Wave {
    fn default() -> Self {
        Self {
            seed: 1,
            amplitude: 1000,
            wave_period: 64,
            noise: 50,
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Wave {
    /// Check the parameters against the spec's ranges; the error names the
    /// bad one.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_AMPLITUDE).contains(&self.amplitude) {
            return Err(format!(
                "amplitude must be 1..={MAX_AMPLITUDE}, not {}",
                self.amplitude
            ));
        }
        if !WAVE_PERIOD_RANGE.contains(&self.wave_period) {
            return Err(format!(
                "wave_period must be {}..={} samples, not {}",
                WAVE_PERIOD_RANGE.start(),
                WAVE_PERIOD_RANGE.end(),
                self.wave_period
            ));
        }
        if self.noise > self.amplitude {
            return Err(format!(
                "noise must be at most the amplitude ({}), not {}",
                self.amplitude, self.noise
            ));
        }
        Ok(())
    }

    /// The value of sample `seq`.
    pub fn value(&self, seq: u32) -> i32 {
        let a = i64::from(self.amplitude);
        let p = i64::from(self.wave_period.max(1));
        let phase = i64::from(seq) % p;
        let tri = if 2 * phase < p {
            -a + (4 * a * phase) / p
        } else {
            3 * a - (4 * a * phase) / p
        };
        let noise = if self.noise == 0 {
            0
        } else {
            let n = u64::from(self.noise);
            (splitmix64(self.seed ^ u64::from(seq)) % (2 * n + 1)) as i64 - n as i64
        };
        // |tri + noise| <= 2 * MAX_AMPLITUDE: fits an i32.
        (tri + noise) as i32
    }

    /// The alarm kind sample `seq` raises under `threshold` and `mode`, if
    /// any: rising when `value(seq-1) < threshold <= value(seq)`, falling
    /// when `value(seq-1) >= threshold > value(seq)`. Sample 0 has no
    /// predecessor and raises none.
    pub fn crossing(&self, seq: u32, threshold: i32, mode: u32) -> Option<u32> {
        if seq == 0 || mode == 0 {
            return None;
        }
        let (prev, cur) = (self.value(seq - 1), self.value(seq));
        if mode & ALARM_RISING != 0 && prev < threshold && threshold <= cur {
            Some(ALARM_RISING)
        } else if mode & ALARM_FALLING != 0 && prev >= threshold && threshold > cur {
            Some(ALARM_FALLING)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest programs' copy pins the same values
    /// (`scenarios::sensor::tests::waveform_pinned_values`).
    #[test]
    fn pinned_values() {
        let w = Wave {
            seed: 42,
            amplitude: 1000,
            wave_period: 64,
            noise: 50,
        };
        let got: Vec<i32> = (0..6).map(|s| w.value(s)).collect();
        assert_eq!(got, [-1027, -908, -835, -818, -705, -736]);
        let tri = Wave { noise: 0, ..w };
        let corners: Vec<i32> = [0, 16, 32, 48, 64].iter().map(|&s| tri.value(s)).collect();
        assert_eq!(corners, [-1000, 0, 1000, 0, -1000]);
    }

    #[test]
    fn noise_stays_in_range_and_values_fit() {
        let w = Wave {
            seed: u64::MAX,
            amplitude: MAX_AMPLITUDE,
            wave_period: 65536,
            noise: MAX_AMPLITUDE,
        };
        for seq in [0, 1, 32768, 65535, u32::MAX] {
            let v = i64::from(w.value(seq));
            assert!(v.abs() <= 2 * i64::from(MAX_AMPLITUDE), "{seq}: {v}");
        }
        let small = Wave {
            noise: 3,
            amplitude: 10,
            ..w
        };
        let tri = Wave { noise: 0, ..small };
        for seq in 0..1000 {
            assert!((small.value(seq) - tri.value(seq)).abs() <= 3);
        }
    }

    #[test]
    fn crossings_follow_the_mode() {
        let w = Wave {
            seed: 1,
            amplitude: 100,
            wave_period: 8,
            noise: 0,
        };
        // -100 -50 0 50 100 50 0 -50 | -100
        assert_eq!(w.crossing(0, 0, 3), None);
        assert_eq!(w.crossing(2, 0, 3), Some(ALARM_RISING));
        assert_eq!(w.crossing(2, 0, ALARM_FALLING), None);
        assert_eq!(w.crossing(7, 0, 3), Some(ALARM_FALLING));
        assert_eq!(w.crossing(7, 0, 0), None);
        assert_eq!(w.crossing(3, 0, 3), None);
    }

    #[test]
    fn validation_names_the_bad_parameter() {
        let ok = Wave::default();
        ok.validate().unwrap();
        for (bad, name) in [
            (Wave { amplitude: 0, ..ok }, "amplitude"),
            (
                Wave {
                    wave_period: 3,
                    ..ok
                },
                "wave_period",
            ),
            (Wave { noise: 5000, ..ok }, "noise"),
        ] {
            assert!(bad.validate().unwrap_err().contains(name));
        }
    }
}
