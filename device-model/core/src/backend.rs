//! The vhost-user transport, generic over the device.
//!
//! [`CoreBackend`] implements [`VhostUserBackend`] for any
//! [`VirtioDevice`]: it advertises the device's features and queues, and on
//! every kick (or host-side event) runs [`Engine::process`] over the vrings,
//! then raises the used-buffer interrupt according to the queue's interrupt
//! policy, unless the driver suppressed it (EVENT_IDX or the no-interrupt
//! flag). Errors never leave [`VhostUserBackend::handle_event`]: in
//! vhost-user-backend an `Err` there ends the worker's event loop and the
//! device would silently die.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use anyhow::Context;
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::QueueError;
use crate::device::VirtioDevice;
use crate::engine::{contain_panic, Engine, Pass, MAX_PASS_ROUNDS};
use crate::faults::Gate;
use crate::irq::IrqAction;
use crate::relay::{PrivateSocket, Relay};
use crate::trace::{EventKind, Suppressed, Trace};

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// The epoll event ids the backend registers besides the queues' own
/// (ids up to the queue count are reserved by vhost-user-backend).
#[derive(Debug, Clone, Copy)]
struct EventIds {
    queues: u16,
}

impl EventIds {
    /// The host side changed the device's data (a control request, a timer
    /// tick, a config write): every queue needs another pass.
    fn device(self) -> u16 {
        self.queues + 1
    }
    /// The queues' interrupt timers (coalesce and delay modes).
    fn irq_timer(self) -> u16 {
        self.device() + 1
    }
    /// The queues' stall timers (fault injection); a stalled queue resumes
    /// when its timer fires.
    fn stall_timer(self) -> u16 {
        self.irq_timer() + self.queues
    }
    /// The queues' interrupt-storm timers (fault injection).
    fn storm_timer(self) -> u16 {
        self.stall_timer() + self.queues
    }
    /// The device's own host-side I/O ([`VirtioDevice::io_fd`]).
    fn io(self) -> u16 {
        self.storm_timer() + self.queues
    }
}

/// A device as a vhost-user backend.
#[derive(Debug)]
pub struct CoreBackend<D> {
    device: Arc<Mutex<Engine<D>>>,
    ids: EventIds,
    max_queue_size: usize,
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    device_event: EventFd,
    irq_timers: Vec<Mutex<TimerFd>>,
    stall_timers: Vec<Mutex<TimerFd>>,
    storm_timers: Vec<Mutex<TimerFd>>,
    /// A queue whose ring was found broken is left alone until the driver
    /// resets it (GET_VRING_BASE) or the VMM reconnects.
    broken: Vec<AtomicBool>,
    /// Queues stopped (GET_VRING_BASE) since they last ran: when every queue
    /// is, the device is reset once ([`VirtioDevice::device_reset`]).
    stopped: Vec<AtomicBool>,
    /// The device's trace (the core's), reached without the engine's lock.
    trace: Arc<Trace>,
    /// Queues stopped and not kicked since, for the trace's
    /// `queue_started` (unlike `stopped`, not cleared by a device reset).
    trace_stopped: Vec<AtomicBool>,
}

impl<D: VirtioDevice> CoreBackend<D> {
    /// A backend around `device`.
    pub fn new(device: Arc<Mutex<Engine<D>>>) -> io::Result<Self> {
        let (n, max_queue_size, trace) = {
            let eng = device.lock().unwrap_or_else(|e| e.into_inner());
            let specs = eng.core.queues();
            (
                specs.len(),
                specs.iter().map(|q| q.max_size).max().unwrap_or(1),
                eng.core.trace().clone(),
            )
        };
        let ids = EventIds { queues: n as u16 };
        let timers = || {
            (0..n)
                .map(|_| nonblocking_timer().map(Mutex::new))
                .collect::<io::Result<Vec<_>>>()
        };
        Ok(Self {
            device,
            ids,
            max_queue_size: usize::from(max_queue_size),
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            device_event: EventFd::new(EFD_NONBLOCK)?,
            irq_timers: timers()?,
            stall_timers: timers()?,
            storm_timers: timers()?,
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stopped: (0..n).map(|_| AtomicBool::new(false)).collect(),
            trace,
            trace_stopped: (0..n).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// The device and its core, shared with the control plane.
    pub fn engine(&self) -> Arc<Mutex<Engine<D>>> {
        self.device.clone()
    }

    /// A handle that the control plane uses to ask for a pass over the queues.
    pub fn kicker(&self) -> io::Result<EventFd> {
        self.device_event.try_clone()
    }

    /// The [`VhostUserBackend::handle_event`] id of the host-side device
    /// event (the [`kicker`](Self::kicker)'s), for tests that play the
    /// worker.
    pub fn device_event_id(&self) -> u16 {
        self.ids.device()
    }

    /// The [`VhostUserBackend::handle_event`] id of `queue`'s
    /// interrupt-storm timer, for tests that play the worker.
    pub fn storm_timer_event_id(&self, queue: u16) -> u16 {
        self.ids.storm_timer() + queue
    }

    fn device(&self) -> MutexGuard<'_, Engine<D>> {
        // A poisoned lock means a panic elsewhere; the data is still usable.
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run the device over one vring until it makes no more progress, and
    /// raise the interrupt where the driver wants one.
    fn process_queue(&self, queue: u16, vring: &VringRwLock) -> Result<(), QueueError> {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(()); // no memory table yet: nothing to do
        };
        let mem = mem.memory();
        let mut state = vring.get_mut();
        if !state.is_enabled()
            || !state.get_queue().ready()
            || self.is_broken(queue)
            || self.device().core.needs_reset()
        {
            return Ok(());
        }
        // Injected faults: a stalled queue waits for its timer; a slow
        // device sleeps before each pass.
        let (stalled, slow, throttled) = {
            let mut eng = self.device();
            let core = &mut eng.core;
            let now = std::time::Instant::now();
            let mut stalled = core.faults_mut().stalled_for(queue, now);
            if stalled.is_some() {
                core.counters_mut().stalled_passes += 1;
            }
            // A throttled queue waits for its next pass like a stalled one.
            let gate = core.faults_mut().throttle_gate(queue, now);
            if let (None, Gate::Wait(left)) = (stalled, gate) {
                core.counters_mut().throttled_passes += 1;
                stalled = Some(left);
            }
            (stalled, core.faults_mut().slow(), gate != Gate::Open)
        };
        if let Some(left) = stalled {
            if let Some(t) = self.stall_timers.get(queue as usize) {
                let _ = t
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset(left.max(std::time::Duration::from_micros(1)), None);
            }
            return Ok(());
        }
        if !slow.is_zero() {
            std::thread::sleep(slow);
        }
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                state.disable_notification()?;
            }
            let used_before = state.get_queue().next_used();
            // Contained inside the vring guard's scope: a panic in the
            // device must not poison the vring's lock.
            let Some(result) = contain_panic(&self.device, "a queue pass", || {
                self.device().process(queue, state.get_queue_mut(), &mem)
            }) else {
                return Ok(()); // the device is now NEEDS_RESET
            };
            let pass: Pass = match result {
                Ok(pass) => pass,
                Err(e) => {
                    // A ring fault mid-pass: the completions made before it
                    // are on the used ring and still owe the driver an
                    // interrupt (found by the fuzz target).
                    let done = state.get_queue().next_used().wrapping_sub(used_before);
                    if done > 0 {
                        self.device().core.on_completions(queue, u32::from(done));
                        self.signal(queue, &mut state)?;
                    }
                    return Err(e);
                }
            };
            if throttled {
                // One short pass, then the next after the interval (the
                // timer brings it back, as for a stall).
                let next = {
                    let mut eng = self.device();
                    eng.core.counters_mut().throttled_passes += 1;
                    eng.core
                        .faults_mut()
                        .throttle_passed(queue, std::time::Instant::now())
                };
                if let (Some(after), Some(t)) = (next, self.stall_timers.get(queue as usize)) {
                    let _ = t
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .reset(after, None);
                }
            }
            if pass.completed > 0 {
                let action = self.device().core.on_completions(queue, pass.completed);
                match action {
                    IrqAction::SignalNow => self.signal(queue, &mut state)?,
                    IrqAction::ArmTimer(after) => {
                        if let Some(t) = self.irq_timers.get(queue as usize) {
                            let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                            if let Err(e) = t.reset(after, None) {
                                // Never lose the interrupt: signal now.
                                warn!(queue, error = %e, "interrupt timer failed; signalling now");
                                drop(t);
                                self.signal(queue, &mut state)?;
                            }
                        }
                    }
                    IrqAction::Wait => {}
                }
                if action != IrqAction::SignalNow {
                    self.trace_suppressed(queue, Suppressed::Coalescing);
                }
                debug!(
                    queue,
                    completed = pass.completed,
                    bytes = pass.bytes,
                    ?action,
                    "queue pass"
                );
            }
            // With EVENT_IDX, re-enabling notifications tells whether the
            // driver added buffers meanwhile; go round again only if this
            // pass made progress, or an rx queue with no data would spin.
            if !event_idx || !state.enable_notification()? || pass.completed == 0 || throttled {
                break;
            }
        }
        Ok(())
    }

    /// Honour the passes the device requested ([`crate::Core::request_pass`])
    /// during this event: at most [`MAX_PASS_ROUNDS`] rounds, each running
    /// the requested queues that want buffers; what is still requested after
    /// that waits for the end of the next event.
    fn requested_passes(&self, vrings: &[VringRwLock]) {
        for _ in 0..MAX_PASS_ROUNDS {
            let queues = {
                let taken = contain_panic(&self.device, "taking requested passes", || {
                    let mut eng = self.device();
                    eng.core.pass_requested().then(|| eng.take_pass_requests())
                });
                match taken {
                    Some(Some(queues)) => queues,
                    _ => return,
                }
            };
            for q in queues {
                self.pass(q, vrings);
            }
        }
        if self.device().core.pass_requested() {
            debug!(
                rounds = MAX_PASS_ROUNDS,
                "requested passes left for the next event"
            );
        }
    }

    fn after_pass(&self, queue: u16) -> bool {
        contain_panic(&self.device, "after a pass", || {
            let mut eng = self.device();
            let eng = &mut *eng;
            eng.device.after_pass(queue, &mut eng.core)
        })
        .unwrap_or(false)
    }

    fn is_broken(&self, queue: u16) -> bool {
        self.broken
            .get(queue as usize)
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// Whether the driver wants this interrupt. With EVENT_IDX, virtio-queue
    /// compares `used_event`; without it, virtio-queue 0.18 does not look at
    /// `VRING_AVAIL_F_NO_INTERRUPT`, so read the available ring's flags here.
    fn driver_wants_interrupt(
        &self,
        state: &mut vhost_user_backend::VringState,
    ) -> Result<bool, QueueError> {
        if self.event_idx.load(Ordering::Relaxed) {
            return Ok(state.needs_notification()?);
        }
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(true);
        };
        let avail = GuestAddress(state.get_queue().avail_ring());
        // The flags are the ring's first little-endian u16. If they cannot
        // be read, interrupt: a spurious interrupt is harmless, a lost one
        // is not.
        let flags = mem
            .memory()
            .read_obj::<u16>(avail)
            .map(u16::from_le)
            .unwrap_or(0);
        Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
    }

    /// Raise `queue`'s used-buffer interrupt unless the driver suppressed it.
    fn signal(
        &self,
        queue: u16,
        state: &mut vhost_user_backend::VringState,
    ) -> Result<(), QueueError> {
        if self.device().core.faults_mut().take_drop(queue) {
            // Fault injection: this interrupt is lost on purpose.
            self.device().core.counters_mut().interrupts_dropped += 1;
            self.trace_suppressed(queue, Suppressed::InjectedFault);
            return Ok(());
        }
        // Always ask (it keeps the suppression bookkeeping in step); a
        // hostile index jump signals whatever the answer.
        let wants = self.driver_wants_interrupt(state)?;
        if wants || self.device().core.faults_mut().take_forced_signal(queue) {
            if let Err(e) = state.signal_used_queue() {
                warn!(queue, error = %e, "could not signal the used queue");
            }
            self.device().core.counters_mut().interrupts_raised += 1;
            self.trace.record(|| EventKind::IrqRaised {
                queue,
                forced: !wants,
            });
        } else {
            self.device().core.counters_mut().interrupts_suppressed += 1;
            let why = if self.event_idx.load(Ordering::Relaxed) {
                Suppressed::EventIdx
            } else {
                Suppressed::NoInterrupt
            };
            self.trace_suppressed(queue, why);
        }
        Ok(())
    }

    /// The first kick of a stopped queue (tracing is on).
    #[cold]
    fn trace_started(&self, queue: u16) {
        if let Some(s) = self.trace_stopped.get(queue as usize) {
            if s.swap(false, Ordering::Relaxed) {
                self.trace.record(|| EventKind::QueueStarted { queue });
            }
        }
    }

    #[inline]
    fn trace_suppressed(&self, queue: u16, why: Suppressed) {
        self.trace
            .record(|| EventKind::IrqSuppressed { queue, why });
    }

    /// `queue`'s interrupt timer expired.
    fn irq_timer(&self, queue: u16, vrings: &[VringRwLock]) {
        if let Some(t) = self.irq_timers.get(queue as usize) {
            // Clear the expiry count (non-blocking: the timer fired).
            let _ = t.lock().unwrap_or_else(|e| e.into_inner()).wait();
        }
        if !self.device().core.on_irq_timer(queue) {
            return;
        }
        if let Some(vring) = vrings.get(queue as usize) {
            let mut state = vring.get_mut();
            if let Err(e) = self.signal(queue, &mut state) {
                warn!(queue, error = %e, "virtqueue error while signalling");
            }
        }
    }

    /// Fault injection: raise the requested spurious interrupts, with
    /// nothing new in the used ring and regardless of suppression (a
    /// misbehaving device does not ask).
    fn spurious(&self, vrings: &[VringRwLock]) {
        for (queue, timer) in self.storm_timers.iter().enumerate() {
            // Release the engine before taking the timer's lock: the storm
            // tick (in `handle_event`) holds the timer while it asks the
            // engine. With one worker thread (today: every queue on one)
            // the opposite orders never meet; with a worker per queue
            // (`queues_per_thread`) they deadlock both workers, and the
            // control plane behind them. In an `if let` scrutinee (edition
            // 2021) the engine's guard would live through the body.
            let start = self
                .device()
                .core
                .faults_mut()
                .take_storm_start(queue as u16);
            if let Some(period) = start {
                let _ = timer
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .reset(period, Some(period));
            }
        }
        for (queue, vring) in vrings.iter().enumerate() {
            let n = self.device().core.faults_mut().take_spurious(queue as u16);
            for _ in 0..n {
                if vring.get_ref().signal_used_queue().is_ok() {
                    self.device().core.counters_mut().spurious_interrupts += 1;
                    self.trace.record(|| EventKind::IrqSpurious {
                        queue: queue as u16,
                        count: 1,
                    });
                }
            }
        }
    }

    fn pass(&self, queue: u16, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(queue as usize) else {
            return;
        };
        let mut result = self.process_queue(queue, vring);
        // The device's host-side I/O after the pass may free room for
        // chains it deferred: then the queue gets another pass.
        while result.is_ok() && self.after_pass(queue) {
            result = self.process_queue(queue, vring);
        }
        if let Err(e) = result {
            // The ring itself is unusable until the driver resets the
            // device: stop serving it (so the fault is counted and logged
            // once) and keep the worker alive for the other queues.
            if let Some(b) = self.broken.get(queue as usize) {
                b.store(true, Ordering::Release);
            }
            warn!(queue, error = %e, "virtqueue broken; it stays stopped until the driver resets the device");
        }
    }
}

/// A timerfd whose read never blocks: a timer re-armed after its expiry was
/// reported (in the same epoll batch) has nothing to read any more.
pub fn nonblocking_timer() -> io::Result<TimerFd> {
    let t = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let fd = t.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with flags read from it.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above; adding O_NONBLOCK to the flags just read.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

impl<D: VirtioDevice> VhostUserBackend for CoreBackend<D> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.broken.len()
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.device().device.features()
            | (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn acked_features(&self, features: u64) {
        info!(
            features = format_args!("{features:#x}"),
            "driver features acknowledged"
        );
        self.device().device.acked_features(features);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.trace
            .record(|| EventKind::ConfigRead { offset, len: size });
        contain_panic(&self.device, "a config read", || {
            self.device().read_config(offset, size)
        })
        .unwrap_or_default()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.trace.record(|| EventKind::ConfigWrite {
            offset,
            len: buf.len() as u32,
        });
        let result = contain_panic(&self.device, "a config write", || {
            let mut eng = self.device();
            let Engine { device, core } = &mut *eng;
            device.write_config(offset, buf, core)
        })
        .unwrap_or_else(|| Err("the device panicked".into()));
        match result {
            Ok(()) => {
                // The write may have given the device work (a new rate, a
                // new threshold): run the queues.
                let _ = self.device_event.write(1);
                Ok(())
            }
            Err(e) => {
                // Refused and logged, but answered Ok: vhost-user-backend
                // ends the whole VMM connection when a handler fails, and
                // QEMU forwards every guest config write (SET_CONFIG), so an
                // error here would let one bad guest write lose the device.
                warn!(offset, len = buf.len(), error = %e, "config-space write refused");
                Ok(())
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the driver (or the VMM) is resetting this queue;
        // a new ring set-up starts clean.
        if let Some(b) = self.broken.get(queue_index as usize) {
            b.store(false, Ordering::Release);
        }
        self.trace.record(|| EventKind::QueueStopped {
            queue: queue_index as u16,
        });
        if let Some(s) = self.trace_stopped.get(queue_index as usize) {
            s.store(true, Ordering::Relaxed);
        }
        let mut eng = self.device();
        let Engine { device, core } = &mut *eng;
        core.set_needs_reset(false);
        device.queue_stopped(queue_index as u16, core);
        if let Some(s) = self.stopped.get(queue_index as usize) {
            s.store(true, Ordering::Release);
        }
        if self.stopped.iter().all(|s| s.load(Ordering::Acquire)) {
            // Every queue is stopped: a device reset (or a disconnect).
            for s in &self.stopped {
                s.store(false, Ordering::Release);
            }
            self.trace.record(|| EventKind::DeviceReset {});
            device.device_reset(core);
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Each daemon (one per VMM connection) gets its own pair; the
        // framework keeps the notifier and fires it at disconnect.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let ids = self.ids;
        let n = ids.queues;
        match device_event {
            q if q < n => {
                // A kick: the queue runs again (for the device-reset
                // bookkeeping of `stop_vring`).
                self.trace.record(|| EventKind::Kick { queue: q });
                if let Some(s) = self.stopped.get(q as usize) {
                    s.store(false, Ordering::Release);
                }
                if self.trace.is_on() {
                    self.trace_started(q);
                }
                self.pass(q, vrings)
            }
            e if e == ids.device() => {
                // Level-triggered: consume the count first so we are not
                // woken again for the same change.
                let _ = self.device_event.read();
                for q in 0..n {
                    self.pass(q, vrings);
                }
                self.spurious(vrings);
            }
            e if (ids.storm_timer()..ids.storm_timer() + n).contains(&e) => {
                let queue = e - ids.storm_timer();
                let Some(t) = self.storm_timers.get(queue as usize) else {
                    return Ok(());
                };
                let mut timer = t.lock().unwrap_or_else(|e| e.into_inner());
                let ticks = timer.wait().unwrap_or(0);
                let on = self
                    .device()
                    .core
                    .faults_mut()
                    .storm_on(queue, std::time::Instant::now());
                if !on {
                    let _ = timer.clear();
                    return Ok(());
                }
                drop(timer);
                // One signal per tick due; an eventfd merges them anyway.
                if ticks > 0 {
                    if let Some(vring) = vrings.get(queue as usize) {
                        if vring.get_ref().signal_used_queue().is_ok() {
                            self.device().core.counters_mut().spurious_interrupts += ticks;
                            self.trace.record(|| EventKind::IrqSpurious {
                                queue,
                                count: ticks,
                            });
                        }
                    }
                }
            }
            e if (ids.stall_timer()..ids.stall_timer() + n).contains(&e) => {
                let queue = e - ids.stall_timer();
                if let Some(t) = self.stall_timers.get(queue as usize) {
                    let _ = t.lock().unwrap_or_else(|e| e.into_inner()).wait();
                }
                self.pass(queue, vrings);
            }
            e if (ids.irq_timer()..ids.irq_timer() + n).contains(&e) => {
                self.irq_timer(e - ids.irq_timer(), vrings)
            }
            e if e == ids.io() => {
                let again = contain_panic(&self.device, "the device's I/O", || {
                    let mut eng = self.device();
                    let eng = &mut *eng;
                    eng.device.io_ready(&mut eng.core)
                })
                .unwrap_or(false);
                if again {
                    for q in 0..n {
                        self.pass(q, vrings);
                    }
                }
            }
            other => warn!(event = other, "unknown device event"),
        }
        // Passes the device asked for during this event (one flag check
        // when it asked for none).
        self.requested_passes(vrings);
        Ok(())
    }
}

/// Serve the device on the vhost-user socket `socket`, one VMM connection at
/// a time. With `once`, return after the first connection ends; otherwise
/// wait for the next one (a VMM reconnecting after a restart).
///
/// Each connection goes through the [relay](crate::relay), so that the core
/// holds the backend channel for config-change interrupts.
pub fn serve<D: VirtioDevice>(
    socket: &Path,
    backend: Arc<CoreBackend<D>>,
    once: bool,
) -> anyhow::Result<()> {
    let name = format!("vdevlab-{}", backend.device().device.name());
    let ids = backend.ids;
    let config_changes = backend.device().core.config_changes();
    config_changes
        .start_sender()
        .context("starting the config-change sender")?;
    loop {
        for b in backend.broken.iter().chain(&backend.stopped) {
            b.store(false, Ordering::Release);
        }
        let mut daemon = VhostUserDaemon::new(
            name.clone(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("could not create the vhost-user daemon: {e}"))?;
        if let Some(handler) = daemon.get_epoll_handlers().first() {
            handler
                .register_listener(
                    backend.device_event.as_raw_fd(),
                    EventSet::IN,
                    u64::from(ids.device()),
                )
                .map_err(|e| anyhow::anyhow!("could not register the device event: {e}"))?;
            for (q, timer) in backend.irq_timers.iter().enumerate() {
                let fd = timer.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
                handler
                    .register_listener(fd, EventSet::IN, u64::from(ids.irq_timer()) + q as u64)
                    .map_err(|e| anyhow::anyhow!("could not register the interrupt timer: {e}"))?;
            }
            for (q, timer) in backend.storm_timers.iter().enumerate() {
                let fd = timer.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
                handler
                    .register_listener(fd, EventSet::IN, u64::from(ids.storm_timer()) + q as u64)
                    .map_err(|e| anyhow::anyhow!("could not register the storm timer: {e}"))?;
            }
            if let Some(fd) = backend.device().device.io_fd() {
                handler
                    .register_listener(fd, EventSet::IN, u64::from(ids.io()))
                    .map_err(|e| anyhow::anyhow!("could not register the device's I/O: {e}"))?;
            }
            for (q, timer) in backend.stall_timers.iter().enumerate() {
                let fd = timer.lock().unwrap_or_else(|e| e.into_inner()).as_raw_fd();
                handler
                    .register_listener(fd, EventSet::IN, u64::from(ids.stall_timer()) + q as u64)
                    .map_err(|e| anyhow::anyhow!("could not register the stall timer: {e}"))?;
            }
        }
        // A new socket file per connection, removed when it ends (as
        // vhost-user-backend's `serve` does): a new file at the path tells
        // that the backend is ready for the next VMM.
        let listener = Listener::new(socket, true)
            .map_err(|e| anyhow::anyhow!("could not listen on {}: {e}", socket.display()))?;
        info!(socket = %socket.display(), "waiting for the VMM on the vhost-user socket");
        let vmm = accept(&listener)?;
        match connect_through_relay(&mut daemon, vmm, &config_changes) {
            Ok(relay) => {
                match daemon.wait() {
                    Ok(()) => info!("VMM disconnected"),
                    Err(vhost_user_backend::Error::HandleRequest(
                        vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage,
                    )) => info!("VMM disconnected"),
                    Err(e) => warn!(error = %e, "vhost-user connection ended with an error"),
                }
                relay.finish();
            }
            Err(e) => warn!(error = %e, "could not serve the VMM connection"),
        }
        // Dropping the daemon stops its vring workers before the socket is
        // bound again for the next VMM.
        drop(daemon);
        drop(listener);
        if once {
            return Ok(());
        }
    }
}

/// Wait for the next VMM connection.
fn accept(listener: &Listener) -> anyhow::Result<UnixStream> {
    loop {
        match listener.accept() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => continue,
            Err(e) => return Err(anyhow::anyhow!("accepting a VMM connection failed: {e}")),
        }
    }
}

/// Start vhost-user-backend's daemon as a client of a private socket and
/// relay `vmm` to it.
fn connect_through_relay<D: VirtioDevice>(
    daemon: &mut VhostUserDaemon<Arc<CoreBackend<D>>>,
    vmm: UnixStream,
    config_changes: &Arc<crate::config_change::ConfigChanges>,
) -> anyhow::Result<Relay> {
    let private = PrivateSocket::new().context("creating the relay's private socket")?;
    daemon
        .start_client(private.path())
        .map_err(|e| anyhow::anyhow!("starting the vhost-user daemon: {e}"))?;
    let inner = private
        .accept_own()
        .context("accepting the vhost-user daemon on the private socket")?;
    Relay::start(vmm, inner, config_changes.clone()).context("starting the relay")
}
