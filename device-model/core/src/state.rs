//! The device's generic state, [`Core`]: its queue list, interrupt
//! policies, armed faults, needs-reset, counters ([`CoreCounters`]) and
//! timer. A device gets it in every call of
//! [`VirtioDevice`](crate::device::VirtioDevice); the transport and the
//! control plane reach it through the [`Engine`](crate::engine::Engine) that
//! pairs it with the device.
//!
//! It knows nothing of the device trait or of the pass over a queue: the
//! trait ([`crate::device`]), hostile mode ([`crate::hostile`]) and the
//! engine ([`crate::engine`]) build on it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::{ChainError, QueueSpec};
use crate::config_change::{ConfigChangeError, ConfigChanges};
use crate::faults::{Fault, FaultState};
use crate::irq::{IrqAction, IrqMode, IrqPolicy};
use crate::trace::{EventKind, Trace};

/// The core's counters, reported (merged with the device's) by the control
/// plane's `stats` request. Those added after the first four may be missing
/// from an older device's reply: a client reads them as 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreCounters {
    /// Chains refused as malformed (completed with length 0).
    pub bad_chains: u64,
    /// Used-buffer interrupts raised.
    pub interrupts_raised: u64,
    /// Used-buffer interrupts the driver asked us not to send.
    pub interrupts_suppressed: u64,
    /// Times a queue was found broken as a whole.
    pub queue_errors: u64,
    /// Fault injection: due interrupts deliberately lost.
    #[serde(default)]
    pub interrupts_dropped: u64,
    /// Fault injection: interrupts raised with nothing new to report.
    #[serde(default)]
    pub spurious_interrupts: u64,
    /// Fault injection: passes skipped because a queue was stalled.
    #[serde(default)]
    pub stalled_passes: u64,
    /// Fault injection: device-to-driver buffers delivered with a flipped byte.
    #[serde(default)]
    pub corrupted_buffers: u64,
    /// Fault injection: bytes taken from the device but not reported to the
    /// driver (truncated buffers).
    #[serde(default)]
    pub truncated_bytes: u64,
    /// Hostile mode: used entries naming an id the driver never posted.
    #[serde(default)]
    pub hostile_bogus_ids: u64,
    /// Hostile mode: used entries with a length larger than the buffer.
    #[serde(default)]
    pub hostile_overlong: u64,
    /// Hostile mode: used-index jumps (the index moved past the entries written).
    #[serde(default)]
    pub hostile_index_jumps: u64,
    /// Hostile mode: heads completed a second time.
    #[serde(default)]
    pub hostile_double_completions: u64,
    /// Fault injection: passes cut short or put off by a throttle.
    #[serde(default)]
    pub throttled_passes: u64,
    /// Fault injection: completions reported with a wrong used length.
    #[serde(default)]
    pub wrong_used_lens: u64,
    /// Config-change interrupts asked for ([`Core::notify_config_change`],
    /// the control plane's `config_change`, the config-change faults).
    #[serde(default)]
    pub config_changes_raised: u64,
    /// Config changes written to the backend channel.
    #[serde(default)]
    pub config_changes_sent: u64,
    /// Config changes the VMM acknowledged (with REPLY_ACK).
    #[serde(default)]
    pub config_changes_acked: u64,
    /// Config changes refused when raised, not sent, refused by the VMM or
    /// never acknowledged within the timeout.
    #[serde(default)]
    pub config_changes_failed: u64,
    /// Hostile: config changes sent with nothing changed.
    #[serde(default)]
    pub hostile_config_changes: u64,
    /// Hostile: flips of a flickering config, each announced by a config change.
    #[serde(default)]
    pub hostile_config_flips: u64,
}

/// The generic state of a device: its queue list, interrupt policies, armed
/// faults, needs-reset, counters and timer. A device gets it in every call
/// of [`VirtioDevice`](crate::device::VirtioDevice).
#[derive(Debug)]
pub struct Core {
    queues: Vec<QueueSpec>,
    counters: CoreCounters,
    irq: Vec<IrqPolicy>,
    faults: FaultState,
    needs_reset: bool,
    bad_chain_logged: bool,
    tick_period: Option<Duration>,
    tick_timer: Option<Arc<Mutex<TimerFd>>>,
    /// Queues a device asked to have served ([`Core::request_pass`]);
    /// `pass_requested` says whether any is set, so the transport's check
    /// after every event is one load when nothing was asked.
    pass_requests: Vec<bool>,
    pass_requested: bool,
    config_changes: Arc<ConfigChanges>,
    trace: Arc<Trace>,
}

impl Core {
    /// The core of a device with these queues.
    pub fn new(queues: Vec<QueueSpec>) -> Self {
        let n = queues.len();
        let config_changes = Arc::new(ConfigChanges::new());
        Self {
            irq: vec![IrqPolicy::default(); n],
            faults: FaultState::new(n),
            queues,
            counters: CoreCounters::default(),
            needs_reset: false,
            bad_chain_logged: false,
            tick_period: None,
            tick_timer: None,
            pass_requests: vec![false; n],
            pass_requested: false,
            trace: config_changes.trace(),
            config_changes,
        }
    }

    /// Ask for a pass over `queue` once the current work is done: a device
    /// that makes data for another queue while handling a chain (a loopback
    /// turning a transmit buffer into receive data, a control request that
    /// starts sampling) calls this from
    /// [`VirtioDevice::handle_chain`](crate::device::VirtioDevice::handle_chain)
    /// (or any other callback that gets the core) instead of waiting for the
    /// next kick or tick.
    ///
    /// The transport honours requests at the end of the event it is
    /// handling (a kick, a tick, a control request, host I/O): it runs each
    /// requested queue whose
    /// [`VirtioDevice::wants_buffers`](crate::device::VirtioDevice::wants_buffers)
    /// holds, in index order, never from inside a pass (no recursion).
    /// Passes run that way may request more; at most
    /// [`MAX_PASS_ROUNDS`](crate::engine::MAX_PASS_ROUNDS) rounds run per
    /// event, and requests still left then stay recorded until the next
    /// event ends (so a device that requests forever cannot starve the other
    /// events). A request for a queue that does not exist is ignored.
    /// Cheap: a flag when used, nothing when not.
    pub fn request_pass(&mut self, queue: u16) {
        if let Some(r) = self.pass_requests.get_mut(queue as usize) {
            *r = true;
            self.pass_requested = true;
        }
    }

    /// [`request_pass`](Self::request_pass) for every queue.
    pub fn request_all_passes(&mut self) {
        self.pass_requests.fill(true);
        self.pass_requested = !self.pass_requests.is_empty();
    }

    /// Take the requested passes: the requested queues for which `wanted`
    /// holds, in index order, and clear every request. Empty (and no
    /// allocation) when none was made. The engine's
    /// [`take_pass_requests`](crate::engine::Engine::take_pass_requests)
    /// asks the device.
    pub(crate) fn take_pass_requests(&mut self, wanted: impl Fn(u16) -> bool) -> Vec<u16> {
        if !self.pass_requested {
            return Vec::new();
        }
        self.pass_requested = false;
        self.pass_requests
            .iter_mut()
            .enumerate()
            .filter_map(|(q, r)| std::mem::take(r).then_some(q as u16))
            .filter(|&q| wanted(q))
            .collect()
    }

    /// Whether a pass was requested and not yet taken.
    pub fn pass_requested(&self) -> bool {
        self.pass_requested
    }

    /// The queues, in index order.
    pub fn queues(&self) -> &[QueueSpec] {
        &self.queues
    }

    /// Queue indices named by `sel`: a queue name, or `"all"`. The error
    /// lists the names the device has.
    pub fn resolve_queues(&self, sel: &str) -> Result<Vec<u16>, String> {
        if sel == "all" {
            return Ok((0..self.queues.len() as u16).collect());
        }
        match self.queues.iter().position(|q| q.name == sel) {
            Some(i) => Ok(vec![i as u16]),
            None => {
                let names: Vec<&str> = self.queues.iter().map(|q| q.name).collect();
                Err(format!(
                    "queue must be {} or all, not {sel:?}",
                    names.join(", ")
                ))
            }
        }
    }

    /// The core's counters.
    pub fn counters(&self) -> CoreCounters {
        let cc = self.config_changes.counters();
        CoreCounters {
            config_changes_raised: cc.raised,
            config_changes_sent: cc.sent,
            config_changes_acked: cc.acked,
            config_changes_failed: cc.failed,
            hostile_config_changes: cc.hostile_changes,
            hostile_config_flips: cc.hostile_flips,
            ..self.counters
        }
    }

    /// Mutable access to the counters (the transport's interrupt bookkeeping).
    pub fn counters_mut(&mut self) -> &mut CoreCounters {
        &mut self.counters
    }

    /// Arm `fault` on `queues` (the indices its
    /// [`Fault::queue`](crate::faults::Fault::queue) names): the
    /// config-change faults here, the others in [`FaultState`]; `clear`
    /// cancels both.
    pub fn apply_fault(
        &mut self,
        fault: &Fault,
        queues: &[u16],
        now: Instant,
    ) -> Result<(), String> {
        self.trace.record(|| EventKind::Fault {
            kind: serde_json::to_value(fault)
                .ok()
                .and_then(|v| v.get("kind")?.as_str().map(String::from))
                .unwrap_or_default(),
        });
        let cc = &self.config_changes;
        match *fault {
            Fault::ConfigChangeStorm {
                count,
                rate_hz,
                jitter_pct,
                seed,
            } => cc.storm(count, rate_hz, jitter_pct, seed),
            Fault::HostileConfigChange { count } => cc.hostile_unchanged(count),
            Fault::HostileConfigFlicker {
                count,
                period_us,
                offset,
                len,
            } => cc.flicker(
                count,
                Duration::from_micros(period_us),
                offset as usize,
                len as usize,
            ),
            Fault::Clear {} => {
                cc.clear_faults();
                self.faults.apply(fault, queues, now)
            }
            _ => self.faults.apply(fault, queues, now),
        }
    }

    /// The armed faults (see [`crate::faults`]).
    pub fn faults_mut(&mut self) -> &mut FaultState {
        &mut self.faults
    }

    /// The data-damage fault hook, for a device writing device-to-driver
    /// data: if a `corrupt_rx` or `truncate_rx` fault is armed, flip a byte
    /// of `data` and/or choose to report only part of it. Returns how many
    /// bytes at the end of `data` are *not* to be reported to the driver
    /// (already counted in `truncated_bytes`). Cheap when nothing is armed.
    pub fn damage(&mut self, data: &mut [u8]) -> usize {
        if !self.faults.rx_damage_armed() {
            return 0;
        }
        let (corrupted, cut) = self.faults.damage_rx(data);
        self.counters.corrupted_buffers += u64::from(corrupted);
        self.counters.truncated_bytes += cut as u64;
        cut
    }

    /// Whether a data-damage fault is armed (so a device can take its slow,
    /// copying path only then).
    pub fn damage_armed(&self) -> bool {
        self.faults.rx_damage_armed()
    }

    /// Whether the device has declared itself broken (DEVICE_NEEDS_RESET).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// Declare (or clear) the device broken: it stops serving its queues
    /// until the driver resets them.
    pub fn set_needs_reset(&mut self, on: bool) {
        self.needs_reset = on;
    }

    /// Set queue `queue`'s interrupt mode.
    pub fn set_irq_mode(&mut self, queue: u16, mode: IrqMode) -> Result<(), String> {
        mode.validate()?;
        let p = self
            .irq
            .get_mut(queue as usize)
            .ok_or_else(|| format!("no queue {queue}"))?;
        p.set_mode(mode);
        Ok(())
    }

    /// Queue `queue`'s interrupt mode.
    pub fn irq_mode(&self, queue: u16) -> Option<IrqMode> {
        self.irq.get(queue as usize).map(IrqPolicy::mode)
    }

    /// `n` buffers of `queue` were completed: what to do about the interrupt.
    pub fn on_completions(&mut self, queue: u16, n: u32) -> IrqAction {
        self.irq
            .get_mut(queue as usize)
            .map_or(IrqAction::Wait, |p| p.on_completions(n))
    }

    /// `queue`'s interrupt timer expired: whether to raise the interrupt.
    pub fn on_irq_timer(&mut self, queue: u16) -> bool {
        self.irq
            .get_mut(queue as usize)
            .is_some_and(IrqPolicy::on_timer)
    }

    /// Run the device's timer every `period`
    /// ([`VirtioDevice::tick`](crate::device::VirtioDevice::tick)), or stop
    /// it (`None`). Under the real transport a timerfd on the control-plane
    /// thread drives it; in unit tests only the period is recorded.
    pub fn set_tick(&mut self, period: Option<Duration>) -> Result<(), String> {
        if period.is_some_and(|p| p < Duration::from_micros(10)) {
            return Err("the device timer's period must be at least 10 us".into());
        }
        if let Some(t) = &self.tick_timer {
            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
            match period {
                Some(p) => t.reset(p, Some(p)),
                None => t.clear(),
            }
            .map_err(|e| format!("device timer: {e}"))?;
        }
        self.tick_period = period;
        Ok(())
    }

    /// The device timer's period, if it runs.
    pub fn tick_period(&self) -> Option<Duration> {
        self.tick_period
    }

    pub(crate) fn attach_tick_timer(&mut self, timer: Arc<Mutex<TimerFd>>) {
        self.tick_timer = Some(timer);
    }

    /// Raise a config-change interrupt: call it after the device changed
    /// its config space, and the driver's `config_changed` runs (the VMM
    /// raises the virtio config interrupt on
    /// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`).
    ///
    /// Never blocks: the change is checked (a VMM connected, the
    /// BACKEND_REQ and CONFIG protocol features negotiated, the backend
    /// channel set up, room in the queue) and queued for the sender thread
    /// ([`crate::config_change`]). Counted in `config_changes_raised`, and
    /// later in `config_changes_sent`, `config_changes_acked` or
    /// `config_changes_failed`. An error says why it cannot be sent; the
    /// device can treat it as "the driver will see the change on its next
    /// read" (nothing is lost but the interrupt).
    pub fn notify_config_change(&self) -> Result<(), ConfigChangeError> {
        self.config_changes.raise().map(drop)
    }

    /// The device's config-change machinery (shared with the transport and
    /// the control plane).
    pub fn config_changes(&self) -> Arc<ConfigChanges> {
        self.config_changes.clone()
    }

    pub(crate) fn config_changes_ref(&self) -> &ConfigChanges {
        &self.config_changes
    }

    /// The device trace ([`crate::trace`]), shared with the transport, the
    /// control plane and the config-change sender.
    pub fn trace(&self) -> &Arc<Trace> {
        &self.trace
    }

    /// Record a device's own event in the trace, e.g.
    /// `core.trace_event("fifo_level", n as u64)`: one relaxed atomic load
    /// when tracing is off. It appears as
    /// `{"event":"device","name":"fifo_level","value":..}`.
    #[inline]
    pub fn trace_event(&self, name: &'static str, value: u64) {
        self.trace.record(|| EventKind::Device { name, value });
    }

    /// Count and log a refused chain.
    pub fn refuse(&mut self, e: &ChainError) {
        self.counters.bad_chains += 1;
        // One warning per device, then debug: a hostile guest must not be
        // able to flood the host's log.
        if self.bad_chain_logged {
            tracing::debug!(error = %e, "refused a descriptor chain");
        } else {
            self.bad_chain_logged = true;
            tracing::warn!(error = %e, "refused a descriptor chain (further ones are logged at debug level)");
        }
    }

    /// A whole-queue fault was found (counted in `queue_errors`).
    pub fn queue_error(&mut self) {
        self.counters.queue_errors += 1;
    }
}
