//! Config-change interrupts: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the
//! backend channel (the socket the VMM hands over with
//! `SET_BACKEND_REQ_FD`), so that the VMM raises the virtio config
//! interrupt and the driver's `config_changed` runs.
//!
//! vhost 0.18's `Backend` cannot send this message (see
//! `docs/device-framework.md`, "Config-change interrupts"), so the core
//! keeps its own handle on the backend channel: the [relay](crate::relay)
//! between the VMM and vhost-user-backend's daemon watches the protocol
//! features the VMM acknowledges and duplicates the descriptor of
//! `SET_BACKEND_REQ_FD` into [`ConfigChanges`]. Nothing else in the process
//! uses the channel (vhost-user-backend only hands it to
//! `VhostUserBackend::set_backend_req_fd`, which the core does not
//! implement), so the core is its only writer and reader.
//!
//! A request ([`ConfigChanges::raise`], through
//! [`crate::Core::notify_config_change`]) is checked at once (a VMM, the
//! BACKEND_REQ and CONFIG protocol features, a channel, room in a queue of
//! [`QUEUE_DEPTH`]) and sent by one sender thread: never by the thread that
//! serves the main vhost-user socket, because with NEED_REPLY the VMM may be
//! waiting on that socket for an answer while this thread waits for its
//! acknowledgement. With REPLY_ACK the sender waits at most
//! [`REPLY_TIMEOUT`] for the acknowledgement.
//!
//! The same thread runs the config-change faults: a storm (`count`
//! notifications at `rate_hz` with seeded jitter) and the hostile
//! variants (a notification with nothing changed; a flickering config).

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::trace::{EventKind, Trace};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag, VhostUserProtocolFeatures};

/// Config changes that may wait to be sent; one more is refused
/// ([`ConfigChangeError::Busy`]).
pub const QUEUE_DEPTH: usize = 64;

/// How long the sender waits for the VMM's acknowledgement (REPLY_ACK).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Outcomes kept for [`ConfigChanges::wait`] (the oldest are forgotten).
const KEPT_OUTCOMES: usize = 256;

/// Why a config change cannot be raised now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigChangeError {
    /// No VMM is connected (or the device runs without the transport, as
    /// in a unit test).
    #[error("no VMM is connected: a config-change interrupt needs a VMM on the vhost-user socket")]
    NoVmm,
    /// The VMM did not acknowledge the BACKEND_REQ protocol feature.
    #[error(
        "the VMM did not negotiate the BACKEND_REQ protocol feature, so there is no backend \
         channel for config-change interrupts (QEMU and Cloud Hypervisor negotiate it when the \
         backend offers it; check the VMM's configuration)"
    )]
    BackendReqNotNegotiated,
    /// The VMM negotiated BACKEND_REQ but has not sent SET_BACKEND_REQ_FD yet.
    #[error(
        "the VMM has not set up the backend channel yet (SET_BACKEND_REQ_FD; Cloud Hypervisor \
         sends it when the driver activates the device): raise the config change after the \
         driver is up"
    )]
    NoBackendChannel,
    /// The VMM did not acknowledge the CONFIG protocol feature.
    #[error(
        "the VMM did not negotiate the CONFIG protocol feature, so the driver cannot read the \
         device's config space through it (QEMU needs config_size > 0 for the device)"
    )]
    ConfigNotNegotiated,
    /// [`QUEUE_DEPTH`] config changes are already waiting.
    #[error(
        "{QUEUE_DEPTH} config changes are already waiting to be sent (is the VMM acknowledging \
         them?); raise fewer, or wait for the counters to catch up"
    )]
    Busy,
}

/// What became of one config change that was queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Sent, and the VMM acknowledged it (REPLY_ACK).
    Acked,
    /// Sent; the VMM did not negotiate REPLY_ACK, so no answer is expected.
    Sent,
    /// Sent, and the VMM answered with an error.
    Refused,
    /// Sent, and no answer came within [`REPLY_TIMEOUT`].
    Timeout,
    /// Not sent: the channel failed, or the VMM left, before it went out.
    NotSent,
}

/// The config-change counters (merged into [`crate::CoreCounters`]).
#[derive(Debug, Default)]
struct Counters {
    raised: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    failed: AtomicU64,
    hostile_changes: AtomicU64,
    hostile_flips: AtomicU64,
}

/// A snapshot of the config-change counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ConfigChangeCounters {
    /// Config changes asked for (device, control plane, faults).
    pub raised: u64,
    /// Messages written to the backend channel.
    pub sent: u64,
    /// Messages the VMM acknowledged (REPLY_ACK).
    pub acked: u64,
    /// Config changes that did not reach the VMM, or that it refused or
    /// never answered: refused when raised, a failed write, an error
    /// answer, a timeout.
    pub failed: u64,
    /// Hostile: config changes sent with the config unchanged.
    pub hostile_changes: u64,
    /// Hostile: flips of a flickering config (each with a config change).
    pub hostile_flips: u64,
}

/// The state of the VMM connection, as the relay saw it.
#[derive(Debug, Default)]
struct Link {
    connected: bool,
    /// The protocol features the VMM acknowledged (SET_PROTOCOL_FEATURES).
    protocol_features: Option<VhostUserProtocolFeatures>,
    /// The core's own handle on the backend channel.
    channel: Option<Arc<UnixStream>>,
    /// After a timeout a late answer may still come: drain it before the
    /// next message.
    stale_replies: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    /// Hostile: nothing changed.
    Unchanged,
    /// Hostile: a flip of the flickering config.
    Flip,
}

#[derive(Debug)]
struct Job {
    seq: u64,
    kind: Kind,
}

/// A storm armed by `config_change_storm`.
#[derive(Debug, Clone)]
struct Storm {
    left: u32,
    period: Duration,
    jitter_pct: u32,
    rng: u64,
    next: Instant,
}

/// A flicker armed by `hostile_config_flicker`.
#[derive(Debug, Clone)]
struct Flicker {
    flips_left: u32,
    period: Duration,
    next: Instant,
}

/// Which bytes a flickering config shows inverted, and whether it does now.
#[derive(Debug, Clone, Copy, Default)]
struct Overlay {
    offset: usize,
    len: usize,
    on: bool,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    storm: Option<Storm>,
    flicker: Option<Flicker>,
    next_seq: u64,
    outcomes: BTreeMap<u64, Delivery>,
    sender_running: bool,
}

/// Config-change interrupts for one device: the backend channel, the
/// counters, the queue and the faults. One per device process, shared by
/// its [`crate::Core`], the relay and the sender thread.
#[derive(Debug, Default)]
pub struct ConfigChanges {
    link: Mutex<Link>,
    queue: Mutex<Queue>,
    wake: Condvar,
    done: Condvar,
    counters: Counters,
    overlay: Mutex<Overlay>,
    trace: Arc<Trace>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConfigChanges {
    /// Nothing connected yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device's trace (the [`crate::Core`] shares it).
    pub fn trace(&self) -> Arc<Trace> {
        self.trace.clone()
    }

    /// The counters now.
    pub fn counters(&self) -> ConfigChangeCounters {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ConfigChangeCounters {
            raised: get(&c.raised),
            sent: get(&c.sent),
            acked: get(&c.acked),
            failed: get(&c.failed),
            hostile_changes: get(&c.hostile_changes),
            hostile_flips: get(&c.hostile_flips),
        }
    }

    // --- the relay's side -------------------------------------------------

    /// A VMM connected (the relay accepted it).
    pub fn vmm_connected(&self) {
        self.trace.record(|| EventKind::VmmConnected {});
        *lock(&self.link) = Link {
            connected: true,
            ..Link::default()
        };
    }

    /// The VMM acknowledged these protocol features.
    pub fn set_protocol_features(&self, features: VhostUserProtocolFeatures) {
        debug!(?features, "protocol features acknowledged by the VMM");
        lock(&self.link).protocol_features = Some(features);
    }

    /// The VMM handed over the backend channel (a duplicate of the
    /// descriptor that vhost-user-backend also receives).
    pub fn set_channel(&self, channel: UnixStream) {
        info!("backend channel set up: config-change interrupts can be sent");
        let mut link = lock(&self.link);
        link.channel = Some(Arc::new(channel));
        link.stale_replies = false;
    }

    /// The VMM left: what is still queued fails when the sender reaches it.
    pub fn vmm_disconnected(&self) {
        self.trace.record(|| EventKind::VmmDisconnected {});
        *lock(&self.link) = Link::default();
        self.wake.notify_all();
    }

    // --- the device's side ------------------------------------------------

    /// Check that a config change can be sent now.
    fn check(&self) -> Result<(), ConfigChangeError> {
        let link = lock(&self.link);
        if !link.connected {
            return Err(ConfigChangeError::NoVmm);
        }
        let features = link
            .protocol_features
            .unwrap_or(VhostUserProtocolFeatures::empty());
        if !features.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            return Err(ConfigChangeError::BackendReqNotNegotiated);
        }
        if !features.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ConfigChangeError::ConfigNotNegotiated);
        }
        if link.channel.is_none() {
            return Err(ConfigChangeError::NoBackendChannel);
        }
        Ok(())
    }

    fn count_raised(&self, result: &Result<u64, ConfigChangeError>) {
        self.counters.raised.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            debug!(error = %e, "config change not raised");
        }
    }

    fn enqueue(&self, kind: Kind) -> Result<u64, ConfigChangeError> {
        let result = self.check().and_then(|()| {
            let mut q = lock(&self.queue);
            if q.jobs.len() >= QUEUE_DEPTH {
                return Err(ConfigChangeError::Busy);
            }
            q.next_seq += 1;
            let seq = q.next_seq;
            q.jobs.push_back(Job { seq, kind });
            Ok(seq)
        });
        self.count_raised(&result);
        self.trace.record(|| EventKind::ConfigChangeRaised {
            ticket: *result.as_ref().unwrap_or(&0),
            error: result.as_ref().err().map(ToString::to_string),
        });
        if result.is_ok() {
            self.wake.notify_all();
        }
        result
    }

    /// Raise a config-change interrupt: queue a CONFIG_CHANGE_MSG for the
    /// sender thread. Returns the change's ticket for [`wait`](Self::wait).
    /// Never blocks.
    pub fn raise(&self) -> Result<u64, ConfigChangeError> {
        self.enqueue(Kind::Plain)
    }

    /// Wait up to `timeout` for what became of the change with `ticket`.
    /// `None`: not decided yet (or forgotten, after 256 more).
    pub fn wait(&self, ticket: u64, timeout: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.queue);
        loop {
            if let Some(d) = q.outcomes.get(&ticket) {
                return Some(*d);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            q = self
                .done
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    // --- faults -----------------------------------------------------------

    /// Hostile: `count` config changes with the config unchanged.
    pub fn hostile_unchanged(&self, count: u32) -> Result<(), String> {
        if count == 0 || count as usize > QUEUE_DEPTH {
            return Err(format!(
                "hostile_config_change: count must be 1..={QUEUE_DEPTH}, not {count}"
            ));
        }
        self.check()
            .map_err(|e| format!("hostile_config_change: {e}"))?;
        for _ in 0..count {
            self.enqueue(Kind::Unchanged)
                .map_err(|e| format!("hostile_config_change: {e}"))?;
        }
        Ok(())
    }

    /// A storm: `count` config changes at `rate_hz`, each interval off by
    /// up to `jitter_pct` percent (seeded by `seed`). Replaces a storm
    /// still running.
    pub fn storm(
        &self,
        count: u32,
        rate_hz: u32,
        jitter_pct: u32,
        seed: u64,
    ) -> Result<(), String> {
        if count == 0 || count > 100_000 {
            return Err(format!(
                "config_change_storm: count must be 1..=100000, not {count}"
            ));
        }
        if rate_hz == 0 || rate_hz > 10_000 {
            return Err(format!(
                "config_change_storm: rate_hz must be 1..=10000, not {rate_hz}"
            ));
        }
        if jitter_pct > 100 {
            return Err(format!(
                "config_change_storm: jitter_pct must be 0..=100, not {jitter_pct}"
            ));
        }
        self.check()
            .map_err(|e| format!("config_change_storm: {e}"))?;
        lock(&self.queue).storm = Some(Storm {
            left: count,
            period: Duration::from_nanos(1_000_000_000 / u64::from(rate_hz)),
            jitter_pct,
            rng: seed | 1,
            next: Instant::now(),
        });
        self.wake.notify_all();
        Ok(())
    }

    /// Hostile: a flickering config. `flips` times, every `period`, the
    /// bytes `[offset, offset + len)` of the config space flip between
    /// their value and its inverse, each flip followed by a config change;
    /// it ends showing the real config (one more flip if needed).
    pub fn flicker(
        &self,
        flips: u32,
        period: Duration,
        offset: usize,
        len: usize,
    ) -> Result<(), String> {
        if flips == 0 || flips > 10_000 {
            return Err(format!(
                "hostile_config_flicker: flips must be 1..=10000, not {flips}"
            ));
        }
        if period < Duration::from_micros(100) || period > Duration::from_secs(10) {
            return Err(format!(
                "hostile_config_flicker: period_us must be 100..=10000000, not {}",
                period.as_micros()
            ));
        }
        if len == 0 || offset.saturating_add(len) > 0x1000 {
            return Err(format!(
                "hostile_config_flicker: the flipped bytes [{offset}, +{len}) must be non-empty and inside the 4 KiB config window"
            ));
        }
        self.check()
            .map_err(|e| format!("hostile_config_flicker: {e}"))?;
        *lock(&self.overlay) = Overlay {
            offset,
            len,
            on: false,
        };
        // An even number of flips ends on the real config.
        lock(&self.queue).flicker = Some(Flicker {
            flips_left: flips + flips % 2,
            period,
            next: Instant::now(),
        });
        self.wake.notify_all();
        Ok(())
    }

    /// Cancel the storm and the flicker (fault `clear`): the config shows
    /// its real value again (announced with one more change if it did not).
    pub fn clear_faults(&self) {
        let mut q = lock(&self.queue);
        q.storm = None;
        let was_on = std::mem::take(&mut lock(&self.overlay).on);
        q.flicker = None;
        drop(q);
        if was_on {
            let _ = self.enqueue(Kind::Flip);
        }
    }

    /// The config space as the driver sees it now: `config` with the
    /// flickering bytes inverted while a flicker shows them so.
    pub fn apply_overlay(&self, config: &mut Vec<u8>) {
        let o = *lock(&self.overlay);
        if !o.on {
            return;
        }
        let end = o.offset + o.len;
        if config.len() < end {
            config.resize(end, 0);
        }
        for b in &mut config[o.offset..end] {
            *b ^= 0xff;
        }
    }

    // --- the sender thread ------------------------------------------------

    /// Start the sender thread (once; later calls do nothing).
    pub fn start_sender(self: &Arc<Self>) -> io::Result<()> {
        {
            let mut q = lock(&self.queue);
            if q.sender_running {
                return Ok(());
            }
            q.sender_running = true;
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("vdevlab-config-change".into())
            .spawn(move || me.sender())
            .map(drop)
            .inspect_err(|_| lock(&self.queue).sender_running = false)
    }

    /// The next thing to do: a queued job now, or a storm or flicker tick
    /// when it is due.
    fn next_job(&self) -> Job {
        let mut q = lock(&self.queue);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                return job;
            }
            let now = Instant::now();
            let mut due: Option<Instant> = None;
            if let Some(s) = q.storm.as_mut() {
                if s.next <= now {
                    s.left -= 1;
                    s.next = now.max(s.next) + jittered(s);
                    if s.left == 0 {
                        q.storm = None;
                    }
                    q.next_seq += 1;
                    let seq = q.next_seq;
                    self.counters.raised.fetch_add(1, Ordering::Relaxed);
                    return Job {
                        seq,
                        kind: Kind::Plain,
                    };
                }
                due = Some(s.next);
            }
            if let Some(f) = q.flicker.as_mut() {
                if f.next <= now {
                    f.flips_left -= 1;
                    f.next = now + f.period;
                    if f.flips_left == 0 {
                        q.flicker = None;
                    }
                    // The device changes its config, then says so.
                    let mut o = lock(&self.overlay);
                    o.on = !o.on;
                    drop(o);
                    q.next_seq += 1;
                    let seq = q.next_seq;
                    self.counters.raised.fetch_add(1, Ordering::Relaxed);
                    return Job {
                        seq,
                        kind: Kind::Flip,
                    };
                }
                due = Some(due.map_or(f.next, |d| d.min(f.next)));
            }
            q = match due {
                Some(at) => {
                    self.wake
                        .wait_timeout(q, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    fn sender(&self) {
        loop {
            let job = self.next_job();
            let delivery = self.deliver(job.kind);
            self.trace.record(|| EventKind::ConfigChangeDelivered {
                ticket: job.seq,
                delivery,
            });
            let c = &self.counters;
            match delivery {
                Delivery::Acked => {
                    c.acked.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::Sent => {}
                Delivery::Refused | Delivery::Timeout | Delivery::NotSent => {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if delivery != Delivery::NotSent {
                match job.kind {
                    Kind::Unchanged => c.hostile_changes.fetch_add(1, Ordering::Relaxed),
                    Kind::Flip => c.hostile_flips.fetch_add(1, Ordering::Relaxed),
                    Kind::Plain => 0,
                };
            }
            let mut q = lock(&self.queue);
            q.outcomes.insert(job.seq, delivery);
            while q.outcomes.len() > KEPT_OUTCOMES {
                q.outcomes.pop_first();
            }
            drop(q);
            self.done.notify_all();
        }
    }

    /// Send one CONFIG_CHANGE_MSG and, with REPLY_ACK, wait for its answer.
    fn deliver(&self, kind: Kind) -> Delivery {
        let (channel, reply_ack, stale) = {
            let mut link = lock(&self.link);
            let Some(ch) = link.channel.clone() else {
                debug!(
                    ?kind,
                    "config change dropped: the VMM left or never set up the channel"
                );
                return Delivery::NotSent;
            };
            let ack = link
                .protocol_features
                .is_some_and(|f| f.contains(VhostUserProtocolFeatures::REPLY_ACK));
            (ch, ack, std::mem::take(&mut link.stale_replies))
        };
        if stale {
            drain_stale(&channel);
        }
        let mut flags = 0;
        if reply_ack {
            flags |= VhostUserHeaderFlag::NEED_REPLY.bits();
        }
        let hdr = header(u32::from(BackendReq::CONFIG_CHANGE_MSG), flags, 0);
        if let Err(e) = (&*channel).write_all(&hdr) {
            warn!(error = %e, "could not send a config change on the backend channel");
            return Delivery::NotSent;
        }
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        if !reply_ack {
            return Delivery::Sent;
        }
        match read_ack(&channel) {
            Ok(0) => Delivery::Acked,
            Ok(v) => {
                warn!(answer = v as i64, "the VMM refused a config change");
                Delivery::Refused
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut {
                    warn!(
                        timeout_ms = REPLY_TIMEOUT.as_millis() as u64,
                        "the VMM did not acknowledge a config change in time"
                    );
                    lock(&self.link).stale_replies = true;
                    Delivery::Timeout
                } else {
                    warn!(error = %e, "reading the VMM's answer to a config change failed");
                    Delivery::Refused
                }
            }
        }
    }
}

/// One interval of a storm, jittered by up to `jitter_pct` percent.
fn jittered(s: &mut Storm) -> Duration {
    if s.jitter_pct == 0 {
        return s.period;
    }
    s.rng ^= s.rng << 13;
    s.rng ^= s.rng >> 7;
    s.rng ^= s.rng << 17;
    // A factor in [1 - j, 1 + j], in per mille.
    let span = 2 * 10 * u64::from(s.jitter_pct) + 1;
    let per_mille = 1000 - 10 * u64::from(s.jitter_pct) + s.rng % span;
    s.period * per_mille as u32 / 1000
}

/// A vhost-user message header: request, flags (version 1), body size.
pub(crate) fn header(request: u32, flags: u32, size: u32) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[0..4].copy_from_slice(&request.to_ne_bytes());
    h[4..8].copy_from_slice(&(flags | 0x1).to_ne_bytes());
    h[8..12].copy_from_slice(&size.to_ne_bytes());
    h
}

/// Read the VMM's REPLY_ACK answer (a header and a u64) within
/// [`REPLY_TIMEOUT`].
fn read_ack(channel: &UnixStream) -> io::Result<u64> {
    channel.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut buf = [0u8; 20];
    (&*channel).read_exact(&mut buf)?;
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if request != u32::from(BackendReq::CONFIG_CHANGE_MSG)
        || flags & VhostUserHeaderFlag::REPLY.bits() == 0
        || size != 8
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an answer to CONFIG_CHANGE_MSG: request {request}, flags {flags:#x}, size {size}"),
        ));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&buf[12..20]);
    Ok(u64::from_ne_bytes(v))
}

/// Throw away answers that came after their timeout.
fn drain_stale(channel: &UnixStream) {
    if channel.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 256];
    let mut n = 0usize;
    while let Ok(got @ 1..) = (&*channel).read(&mut buf) {
        n += got;
    }
    let _ = channel.set_nonblocking(false);
    if n > 0 {
        debug!(bytes = n, "dropped late answers on the backend channel");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn negotiated(cc: &ConfigChanges, features: VhostUserProtocolFeatures) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        cc.vmm_connected();
        cc.set_protocol_features(features);
        cc.set_channel(ours);
        theirs
    }

    #[test]
    fn refusals_name_what_is_missing_and_are_counted() {
        let cc = ConfigChanges::new();
        assert_eq!(cc.raise(), Err(ConfigChangeError::NoVmm));
        cc.vmm_connected();
        cc.set_protocol_features(VhostUserProtocolFeatures::CONFIG);
        assert_eq!(cc.raise(), Err(ConfigChangeError::BackendReqNotNegotiated));
        cc.set_protocol_features(VhostUserProtocolFeatures::BACKEND_REQ);
        assert_eq!(cc.raise(), Err(ConfigChangeError::ConfigNotNegotiated));
        cc.set_protocol_features(
            VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG,
        );
        assert_eq!(cc.raise(), Err(ConfigChangeError::NoBackendChannel));
        let c = cc.counters();
        assert_eq!((c.raised, c.failed, c.sent), (4, 4, 0));
    }

    #[test]
    fn queue_is_bounded() {
        let cc = ConfigChanges::new();
        let _peer = negotiated(
            &cc,
            VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG,
        );
        // No sender thread: the queue fills.
        for _ in 0..QUEUE_DEPTH {
            cc.raise().unwrap();
        }
        assert_eq!(cc.raise(), Err(ConfigChangeError::Busy));
    }

    #[test]
    fn sender_writes_the_message_and_reads_the_ack() {
        let cc = Arc::new(ConfigChanges::new());
        let mut peer = negotiated(
            &cc,
            VhostUserProtocolFeatures::BACKEND_REQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK,
        );
        cc.start_sender().unwrap();
        let t = cc.raise().unwrap();
        let mut hdr = [0u8; 12];
        peer.read_exact(&mut hdr).unwrap();
        assert_eq!(
            hdr,
            header(2, VhostUserHeaderFlag::NEED_REPLY.bits(), 0),
            "CONFIG_CHANGE_MSG with NEED_REPLY and an empty body"
        );
        let mut reply = header(2, VhostUserHeaderFlag::REPLY.bits(), 8).to_vec();
        reply.extend_from_slice(&0u64.to_ne_bytes());
        peer.write_all(&reply).unwrap();
        assert_eq!(cc.wait(t, Duration::from_secs(5)), Some(Delivery::Acked));
        let c = cc.counters();
        assert_eq!((c.raised, c.sent, c.acked, c.failed), (1, 1, 1, 0));
    }

    #[test]
    fn storm_intervals_are_jittered_within_bounds() {
        let mut s = Storm {
            left: 10,
            period: Duration::from_millis(10),
            jitter_pct: 50,
            rng: 7,
            next: Instant::now(),
        };
        let all: Vec<Duration> = (0..100).map(|_| jittered(&mut s)).collect();
        assert!(all
            .iter()
            .all(|d| *d >= Duration::from_millis(5) && *d <= Duration::from_millis(15)));
        assert!(all.iter().any(|d| *d != all[0]), "jitter varies");
    }

    #[test]
    fn overlay_inverts_the_flickering_bytes() {
        let cc = ConfigChanges::new();
        *lock(&cc.overlay) = Overlay {
            offset: 1,
            len: 2,
            on: true,
        };
        let mut cfg = vec![0u8, 0x0f, 0xf0, 7];
        cc.apply_overlay(&mut cfg);
        assert_eq!(cfg, vec![0, 0xf0, 0x0f, 7]);
    }
}
