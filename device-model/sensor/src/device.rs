//! The sensor on the device framework: [`SensorDevice`] implements
//! [`VirtioDevice`], mapping its three queues, its config space, its timer
//! and its host control requests onto [`Sensor`]. The core has validated
//! every chain (direction, memory, length, termination) before
//! [`VirtioDevice::handle_chain`] sees it; this file checks only what is
//! the sensor's own business (record sizes, the request's contents).

use std::time::{Duration, Instant};

use serde_json::Value;
use vdevlab_device_core::chain::{Chain, ChainError, Direction, QueueSpec};
use vdevlab_device_core::{to_fields, Core, Fields, Outcome, VirtioDevice};

use crate::ctrl_faults::{CtrlFault, CtrlFaults, Decision};
use crate::sensor::Sensor;
use crate::spec::{
    ALARM_BYTES, CTRL_QUEUE, CTRL_STATUS_BYTES, EVENTS_QUEUE, MAX_CTRL_CHAIN_BYTES, MAX_QUEUE_SIZE,
    SAMPLES_QUEUE, SAMPLE_BYTES,
};
use crate::wave::Wave;

/// How often the timer runs while a late control answer is pending.
const LATE_TICK: Duration = Duration::from_millis(1);

/// The sampling sensor as a [`VirtioDevice`].
#[derive(Debug)]
pub struct SensorDevice {
    sensor: Sensor,
    /// Control-queue faults armed by the host (`ctrl_fault`).
    ctrl_faults: CtrlFaults,
    /// The status word's alarm count the driver was last told of (by a
    /// config-change interrupt).
    alarms_signalled: u32,
    /// Reused for every request and every sample buffer: no allocation per
    /// chain.
    scratch: Vec<u8>,
}

impl SensorDevice {
    /// A sensor at power-on with this waveform (validated).
    pub fn new(wave: Wave) -> Result<Self, String> {
        wave.validate()?;
        Ok(Self {
            sensor: Sensor::new(wave),
            ctrl_faults: CtrlFaults::default(),
            alarms_signalled: 0,
            scratch: Vec::new(),
        })
    }

    /// The sensor's state (tests, host tools).
    pub fn sensor(&self) -> &Sensor {
        &self.sensor
    }

    /// Point the core's timer at the sensor's rate (none when stopped),
    /// and at most 1 ms while a late control answer is pending.
    fn retime(&self, core: &mut Core) {
        let mut period = self.sensor.tick_ns().map(Duration::from_nanos);
        if self.ctrl_faults.deadline().is_some() {
            period = Some(period.map_or(LATE_TICK, |p| p.min(LATE_TICK)));
        }
        if let Err(e) = core.set_tick(period) {
            tracing::warn!(error = %e, "could not set the sampling timer");
        }
    }

    /// New alarms since the last signal: raise a config-change interrupt
    /// (the status word's alarm count moved). At most one per timer tick
    /// or request, so a burst of alarms costs one interrupt; the driver
    /// re-reads the count, which also covers interrupts that merged.
    fn signal_alarms(&mut self, core: &mut Core) {
        let now = self.sensor.alarms_since_reset();
        if now == self.alarms_signalled {
            return;
        }
        self.alarms_signalled = now;
        if let Err(e) = core.notify_config_change() {
            tracing::debug!(error = %e, "alarms raised, but no config-change interrupt was sent");
        }
    }

    fn refuse(chain: &Chain<'_>, detail: String) -> Outcome {
        Outcome::Refuse(ChainError::Device {
            head: chain.head(),
            detail,
        })
    }

    fn fill_samples(&mut self, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        let room = chain.writable_len() as usize / SAMPLE_BYTES;
        if room == 0 {
            return Self::refuse(
                chain,
                format!(
                    "a sample buffer of {} bytes holds no {SAMPLE_BYTES}-byte sample",
                    chain.writable_len()
                ),
            );
        }
        self.scratch.clear();
        self.sensor.take_samples(room, &mut self.scratch);
        // Fault injection (corrupt_rx, truncate_rx): the core's data hook.
        let cut = if core.damage_armed() {
            core.damage(&mut self.scratch)
        } else {
            0
        };
        let len = self.scratch.len() - cut;
        match chain.write(&[&self.scratch[..len]]) {
            Ok(n) => Outcome::Complete { used_len: n as u32 },
            Err(e) => Outcome::Refuse(e),
        }
    }

    fn fill_event(&mut self, chain: &Chain<'_>) -> Outcome {
        if chain.writable_len() < ALARM_BYTES as u64 {
            return Self::refuse(
                chain,
                format!(
                    "an event buffer of {} bytes cannot hold a {ALARM_BYTES}-byte alarm",
                    chain.writable_len()
                ),
            );
        }
        let Some(alarm) = self.sensor.take_alarm() else {
            return Outcome::Defer; // not called without one (wants_buffers)
        };
        match chain.write(&[&alarm.to_bytes()]) {
            Ok(n) => Outcome::Complete { used_len: n as u32 },
            Err(e) => Outcome::Refuse(e),
        }
    }

    fn answer(&mut self, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        if chain.readable_len() == 0 {
            return Self::refuse(chain, "a control chain without a request".into());
        }
        if chain.writable_len() < CTRL_STATUS_BYTES as u64 {
            return Self::refuse(
                chain,
                format!(
                    "a control chain with {} writable bytes has no room for the {CTRL_STATUS_BYTES}-byte status",
                    chain.writable_len()
                ),
            );
        }
        let now = Instant::now();
        let decision = self.ctrl_faults.on_request(chain.head(), now);
        if decision == Decision::Hold {
            // Answered when due (the timer) or released (`clear`).
            self.retime(core);
            return Outcome::Defer;
        }
        self.scratch.clear();
        if let Err(e) = chain.read_to_end(&mut self.scratch) {
            return Outcome::Refuse(e);
        }
        let (status, value) = match decision {
            Decision::Fail(status) => (self.sensor.injected_error(status), 0),
            _ => self.sensor.control(&self.scratch, now),
        };
        self.retime(core);
        self.signal_alarms(core);
        // SET_RATE takes the first sample at once: deliver it now, not at
        // the next tick.
        core.request_all_passes();
        let mut out = [0u8; CTRL_STATUS_BYTES];
        out[..4].copy_from_slice(&status.to_le_bytes());
        out[4..].copy_from_slice(&value.to_le_bytes());
        match chain.write(&[&out]) {
            Ok(n) => Outcome::Complete { used_len: n as u32 },
            Err(e) => Outcome::Refuse(e),
        }
    }
}

/// The fields of a `waveform` request, all optional (unset ones keep their
/// value); anything else is an error.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveRequest {
    #[allow(dead_code)]
    op: String,
    seed: Option<u64>,
    amplitude: Option<u32>,
    wave_period: Option<u32>,
    noise: Option<u32>,
}

impl VirtioDevice for SensorDevice {
    fn name(&self) -> &'static str {
        "vdevlab-sensor"
    }

    fn queues(&self) -> Vec<QueueSpec> {
        vec![
            QueueSpec::new("samples", MAX_QUEUE_SIZE, Direction::DeviceWrites),
            QueueSpec::new("events", MAX_QUEUE_SIZE, Direction::DeviceWrites),
            QueueSpec {
                max_chain_bytes: MAX_CTRL_CHAIN_BYTES,
                ..QueueSpec::new("ctrl", MAX_QUEUE_SIZE, Direction::ReadThenWrite)
            },
        ]
    }

    fn config_space(&self, core: &Core) -> Vec<u8> {
        self.sensor.config_space(core.needs_reset())
    }

    fn wants_buffers(&self, queue: u16) -> bool {
        match queue {
            SAMPLES_QUEUE => self.sensor.samples_pending() > 0,
            EVENTS_QUEUE => self.sensor.alarms_pending() > 0,
            CTRL_QUEUE => self.ctrl_faults.ready(Instant::now()),
            _ => true,
        }
    }

    fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        match queue {
            SAMPLES_QUEUE => self.fill_samples(chain, core),
            EVENTS_QUEUE => self.fill_event(chain),
            CTRL_QUEUE => self.answer(chain, core),
            _ => Self::refuse(chain, format!("no queue {queue}")),
        }
    }

    fn reset(&mut self, core: &mut Core) {
        self.sensor.reset();
        self.ctrl_faults.on_reset();
        // The count is back at 0: nothing to signal (the driver reset too).
        self.alarms_signalled = 0;
        self.retime(core);
    }

    fn queue_stopped(&mut self, _queue: u16, core: &mut Core) {
        // A driver reset stops every queue; the first one resets the sensor
        // (again for the others, which changes nothing).
        self.reset(core);
    }

    fn control(
        &mut self,
        op: &str,
        request: &Value,
        core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        match op {
            "ctrl_fault" => Some(CtrlFault::from_request(request).map(|f| {
                self.ctrl_faults.apply(&f);
                // A released request is answered on the pass that follows
                // every successful control request.
                self.retime(core);
                let mut fields = Fields::new();
                fields.insert("ctrl_faults".into(), self.ctrl_faults.armed());
                fields
            })),
            "sensor" => {
                let (threshold, mode) = self.sensor.threshold();
                let mut f = Fields::new();
                f.insert("rate_hz".into(), self.sensor.rate_hz().into());
                f.insert("threshold".into(), threshold.into());
                f.insert("alarm_mode".into(), mode.into());
                f.insert("next_seq".into(), self.sensor.next_seq().into());
                f.insert(
                    "wave".into(),
                    serde_json::to_value(self.sensor.wave()).unwrap_or_default(),
                );
                Some(Ok(f))
            }
            "waveform" => Some((|| {
                let r: WaveRequest = serde_json::from_value(request.clone())
                    .map_err(|e| format!("bad waveform request: {e}"))?;
                let old = self.sensor.wave();
                self.sensor.set_wave(Wave {
                    seed: r.seed.unwrap_or(old.seed),
                    amplitude: r.amplitude.unwrap_or(old.amplitude),
                    wave_period: r.wave_period.unwrap_or(old.wave_period),
                    noise: r.noise.unwrap_or(old.noise),
                })?;
                Ok(Fields::new())
            })()),
            _ => None,
        }
    }

    fn counters(&self) -> Fields {
        let mut f = to_fields(&self.sensor.counters());
        f.extend(to_fields(&self.ctrl_faults.counters()));
        f
    }

    fn reply_fields(&self) -> Fields {
        let mut f = Fields::new();
        f.insert(
            "samples_pending".into(),
            self.sensor.samples_pending().into(),
        );
        f.insert("alarms_pending".into(), self.sensor.alarms_pending().into());
        f
    }

    fn tick(&mut self, _ticks: u64, core: &mut Core) -> bool {
        // The clock, not the tick count, says which samples are due.
        let now = Instant::now();
        // A due late answer needs a pass; not while the device serves no
        // queue (NEEDS_RESET: only a reset ends that, and it forgets the
        // held request), or the timer would kick the worker every tick.
        let late_due = !core.needs_reset() && self.ctrl_faults.deadline().is_some_and(|d| d <= now);
        let queued = self.sensor.pump(now);
        self.signal_alarms(core);
        queued | late_due
    }
}
