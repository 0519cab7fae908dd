//! The device trace: a bounded ring of timestamped device events (kicks,
//! chains, completions, interrupts, config accesses, control requests,
//! faults, queue and VMM life cycle), off by default.
//!
//! Switched on by the daemon's `--trace` flag or the control plane's
//! `{"op":"trace","on":true,"capacity":N}`, read (and emptied) by
//! `{"op":"trace_dump"}`. Each [`Event`] carries a `CLOCK_MONOTONIC`
//! timestamp in nanoseconds and the host thread id (`gettid`), so that a
//! later tool can put it on one timeline with other sources (the guest's
//! ftrace, another process).
//!
//! Cost: when off, an event site is one relaxed atomic load
//! ([`Trace::record`] takes a closure that is not even called). When on,
//! a `clock_gettime`, a short lock and a push into a ring allocated when
//! tracing was switched on; a full ring drops its oldest event and counts
//! it. See `docs/device-framework.md`, "Device trace".

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::config_change::Delivery;

/// Ring size when none is given (`--trace` without `--trace-capacity`).
pub const DEFAULT_CAPACITY: usize = 65_536;

/// Largest ring accepted (events are about 64 bytes: 256 MiB at most).
pub const MAX_CAPACITY: usize = 1 << 22;

/// Why a due used-buffer interrupt was not raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Suppressed {
    /// EVENT_IDX: the driver's `used_event` says it does not want it yet.
    EventIdx,
    /// The driver set `VRING_AVAIL_F_NO_INTERRUPT`.
    NoInterrupt,
    /// The queue's interrupt policy (coalesce or delay) holds it back; a
    /// later completion or the queue's timer raises it.
    Coalescing,
    /// An injected fault (`drop_interrupts`) lost it on purpose.
    InjectedFault,
}

/// What happened. Serialized with an `event` tag, e.g.
/// `{"event":"used_pushed","queue":0,"id":3,"len":64}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The driver kicked `queue`.
    Kick {
        /// Queue index.
        queue: u16,
    },
    /// A valid chain was taken from the available ring.
    ChainPopped {
        /// Queue index.
        queue: u16,
        /// Head descriptor index.
        head: u16,
        /// Device-readable bytes.
        readable: u64,
        /// Device-writable bytes.
        writable: u64,
    },
    /// A chain was refused (completed with length 0).
    ChainRefused {
        /// Queue index.
        queue: u16,
        /// Head descriptor index.
        head: u16,
        /// Why, as the error says it.
        why: String,
    },
    /// A used element was written.
    UsedPushed {
        /// Queue index.
        queue: u16,
        /// The element's id (the chain's head).
        id: u16,
        /// The used length reported.
        len: u32,
    },
    /// The used-buffer interrupt was raised.
    IrqRaised {
        /// Queue index.
        queue: u16,
        /// Raised although the driver suppressed it (hostile mode).
        forced: bool,
    },
    /// A due used-buffer interrupt was not raised.
    IrqSuppressed {
        /// Queue index.
        queue: u16,
        /// Why.
        why: Suppressed,
    },
    /// Injected spurious interrupts (nothing new on the used ring).
    IrqSpurious {
        /// Queue index.
        queue: u16,
        /// How many signals.
        count: u64,
    },
    /// The VMM read the config space.
    ConfigRead {
        /// Offset.
        offset: u32,
        /// Bytes asked for.
        len: u32,
    },
    /// The VMM wrote the config space.
    ConfigWrite {
        /// Offset.
        offset: u32,
        /// Bytes written.
        len: u32,
    },
    /// A config-change interrupt was raised; `ticket` 0 and `error` when
    /// it could not be queued.
    ConfigChangeRaised {
        /// Its ticket (0 when refused).
        ticket: u64,
        /// Why it was refused.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// What became of a config change (the sender thread).
    ConfigChangeDelivered {
        /// Its ticket.
        ticket: u64,
        /// How it went.
        delivery: Delivery,
    },
    /// A control-plane request.
    Control {
        /// Its `op`.
        op: String,
    },
    /// A fault or a hostile action was armed (control plane).
    Fault {
        /// The fault's `kind`.
        kind: String,
    },
    /// A hostile action was applied to a completion.
    Hostile {
        /// Queue index.
        queue: u16,
        /// What was done (`bogus_id`, `overlong`, `index_jump`,
        /// `double_completion`, `wrong_used_len`).
        kind: &'static str,
    },
    /// The VMM stopped `queue` (GET_VRING_BASE).
    QueueStopped {
        /// Queue index.
        queue: u16,
    },
    /// A stopped queue ran again (its first kick).
    QueueStarted {
        /// Queue index.
        queue: u16,
    },
    /// Every queue was stopped: the device was reset.
    DeviceReset {},
    /// A VMM connected.
    VmmConnected {},
    /// The VMM disconnected.
    VmmDisconnected {},
    /// A device's own event ([`crate::Core::trace_event`]).
    Device {
        /// What (a name the device chose).
        name: &'static str,
        /// A value the device chose (a length, an index, a state).
        value: u64,
    },
}

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `CLOCK_MONOTONIC`, nanoseconds.
    pub t_ns: u64,
    /// The host thread that recorded it (`gettid`).
    pub tid: u32,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What [`Trace::dump`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dump {
    /// Whether tracing is on.
    pub on: bool,
    /// The ring's size.
    pub capacity: usize,
    /// Events dropped (the oldest first) because the ring was full, since
    /// tracing was switched on or last dumped.
    pub dropped: u64,
    /// The events, oldest first.
    pub events: Vec<Event>,
}

#[derive(Debug, Default)]
struct Ring {
    events: VecDeque<Event>,
    capacity: usize,
    dropped: u64,
}

/// A device's trace: one per device process, shared by the core, the
/// transport, the control plane and the config-change sender.
#[derive(Debug, Default)]
pub struct Trace {
    on: AtomicBool,
    ring: Mutex<Ring>,
}

impl Trace {
    /// Whether tracing is on (one relaxed load).
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Record the event `kind` makes, if tracing is on; when off, `kind`
    /// is not called.
    #[inline]
    pub fn record(&self, kind: impl FnOnce() -> EventKind) {
        if self.is_on() {
            self.push(kind());
        }
    }

    #[cold]
    #[inline(never)]
    fn push(&self, kind: EventKind) {
        let event = Event {
            t_ns: monotonic_ns(),
            tid: thread_id(),
            kind,
        };
        let mut ring = self.ring();
        if ring.capacity == 0 {
            return; // switched off and dumped meanwhile
        }
        if ring.events.len() >= ring.capacity {
            ring.events.pop_front();
            ring.dropped += 1;
        }
        ring.events.push_back(event);
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Switch tracing on with a ring of `capacity` events (allocated now),
    /// discarding what an earlier run recorded.
    pub fn start(&self, capacity: usize) -> Result<(), String> {
        if !(1..=MAX_CAPACITY).contains(&capacity) {
            return Err(format!(
                "the trace capacity must be 1..={MAX_CAPACITY} events, not {capacity}"
            ));
        }
        *self.ring() = Ring {
            events: VecDeque::with_capacity(capacity),
            capacity,
            dropped: 0,
        };
        self.on.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Switch tracing off; what was recorded stays for [`dump`](Self::dump).
    pub fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    /// Take the recorded events (the ring is emptied, the dropped count
    /// reset). Once off, a dump also frees the ring.
    pub fn dump(&self) -> Dump {
        let on = self.is_on();
        let mut ring = self.ring();
        let capacity = ring.capacity;
        let dropped = std::mem::take(&mut ring.dropped);
        let events = if on {
            ring.events.drain(..).collect()
        } else {
            let events = std::mem::take(&mut ring.events).into();
            ring.capacity = 0;
            events
        };
        Dump {
            on,
            capacity,
            dropped,
            events,
        }
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds (the clock `perf`, ftrace's `mono`
/// clock and Perfetto's default host clock use).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

thread_local! {
    static TID: Cell<u32> = const { Cell::new(0) };
}

/// The calling thread's kernel id (`gettid`), cached per thread.
pub fn thread_id() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no arguments and cannot fail.
            t.set(unsafe { libc::gettid() } as u32);
        }
        t.get()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick(queue: u16) -> EventKind {
        EventKind::Kick { queue }
    }

    #[test]
    fn off_by_default_and_the_closure_is_not_called() {
        let t = Trace::default();
        t.record(|| panic!("called while off"));
        let d = t.dump();
        assert!(!d.on && d.events.is_empty() && d.dropped == 0);
    }

    #[test]
    fn a_full_ring_drops_the_oldest_and_says_so() {
        let t = Trace::default();
        t.start(3).unwrap();
        for q in 0..5 {
            t.record(|| kick(q));
        }
        let d = t.dump();
        assert_eq!(d.dropped, 2, "two events dropped");
        let kinds: Vec<_> = d.events.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(kinds, vec![kick(2), kick(3), kick(4)], "the newest kept");
        let again = t.dump();
        assert!(
            again.events.is_empty() && again.dropped == 0,
            "a dump empties"
        );
    }

    #[test]
    fn events_carry_monotonic_time_and_the_thread_id() {
        let t = Trace::default();
        t.start(8).unwrap();
        let before = monotonic_ns();
        t.record(|| kick(0));
        t.record(|| kick(1));
        let after = monotonic_ns();
        let d = t.dump();
        let (a, b) = (&d.events[0], &d.events[1]);
        assert!(before <= a.t_ns && a.t_ns <= b.t_ns && b.t_ns <= after);
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::gettid() } as u32;
        assert_eq!((a.tid, b.tid), (tid, tid));
        let other = std::thread::spawn(thread_id).join().unwrap();
        assert_ne!(other, tid, "another thread, another id");
    }

    #[test]
    fn off_keeps_the_events_for_one_dump_and_records_no_more() {
        let t = Trace::default();
        t.start(4).unwrap();
        t.record(|| kick(7));
        t.stop();
        t.record(|| kick(8));
        let d = t.dump();
        assert!(!d.on);
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].kind, kick(7));
        assert!(t.dump().events.is_empty());
    }

    #[test]
    fn capacity_is_checked_and_the_json_is_flat() {
        let t = Trace::default();
        assert!(t.start(0).unwrap_err().contains("1..="));
        assert!(t.start(MAX_CAPACITY + 1).is_err());
        t.start(2).unwrap();
        t.record(|| EventKind::UsedPushed {
            queue: 1,
            id: 3,
            len: 64,
        });
        let v = serde_json::to_value(t.dump()).unwrap();
        let e = &v["events"][0];
        assert_eq!(e["event"], "used_pushed");
        assert_eq!((e["queue"].as_u64(), e["id"].as_u64()), (Some(1), Some(3)));
        assert_eq!(e["len"], 64);
        assert!(e["t_ns"].as_u64().is_some() && e["tid"].as_u64().is_some());
        assert_eq!(v["capacity"], 2);
    }
}
