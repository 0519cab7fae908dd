//! The qw device's state and logic, free of the framework: a byte stream in
//! both directions. [`Qw`] holds a receive FIFO (bytes waiting to be
//! delivered to the driver) and a transmit capture (bytes the driver wrote),
//! both bounded, and counts what moves. It knows nothing of virtqueues,
//! descriptor chains or the core: [`crate::device::QwDevice`] maps the
//! driver's buffers onto it, and the data port ([`crate::data`]) and the
//! control plane feed and drain it from the host side.
//!
//! Nothing is ever lost silently: bytes that do not fit the FIFO are refused
//! (and counted), and a transmit buffer that does not fit the capture waits
//! for room (back-pressure).

use std::collections::VecDeque;
use std::io;

use serde::{Deserialize, Serialize};

/// Default receive FIFO size: how much the host may inject ahead of the driver.
pub const DEFAULT_RX_FIFO_BYTES: usize = 1 << 20;
/// Default transmit capture size: how much the driver may write before the
/// device applies back-pressure (stops completing transmit buffers).
pub const DEFAULT_TX_CAPTURE_BYTES: usize = 1 << 20;

/// The qw device's own counters (the core keeps the generic ones), and
/// beside them `C`: nothing (`()`) in the device, which counts only its own
/// events; the core's counters in [`Stats`](crate::control::Stats), the
/// clients' view of a `stats` reply, which thus names every counter once.
/// `C` is flattened: the JSON object stays flat either way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QwCounters<C = ()> {
    /// Bytes accepted from the host for delivery to the driver.
    pub injected_bytes: u64,
    /// Bytes the host offered that the receive FIFO had no room for.
    pub inject_rejected_bytes: u64,
    /// Bytes written into the driver's receive buffers.
    pub rx_bytes: u64,
    /// Receive buffers completed.
    pub rx_buffers: u64,
    /// Bytes read from the driver's transmit buffers.
    pub tx_bytes: u64,
    /// Transmit buffers completed.
    pub tx_buffers: u64,
    /// Generator samples lost because the receive FIFO was full (may be
    /// missing from an older device's reply).
    #[serde(default)]
    pub overruns: u64,
    /// Times the host changed the carrier (`{"op":"carrier"}` with a new
    /// state), each followed by a config-change interrupt (may be missing
    /// from an older device's reply).
    #[serde(default)]
    pub carrier_changes: u64,
    /// The counters reported with these (see above).
    #[serde(flatten)]
    pub core: C,
}

/// The qw device's state: the receive FIFO, the transmit capture and the
/// counters.
#[derive(Debug)]
pub struct Qw {
    rx_fifo: VecDeque<u8>,
    rx_capacity: usize,
    tx_capture: VecDeque<u8>,
    tx_capacity: usize,
    counters: QwCounters,
    /// The last transmit buffer looked at was deferred for lack of room in
    /// the capture: whoever drains the capture must ask for another pass.
    tx_deferred: bool,
    /// The carrier (the "cable"): host state, kept across resets. Down
    /// shows as NO_CARRIER in the config status word.
    carrier: bool,
}

impl Default for Qw {
    fn default() -> Self {
        Self::new(DEFAULT_RX_FIFO_BYTES, DEFAULT_TX_CAPTURE_BYTES)
    }
}

impl Qw {
    /// A device with the given FIFO and capture capacities, in bytes.
    pub fn new(rx_capacity: usize, tx_capacity: usize) -> Self {
        Self {
            rx_fifo: VecDeque::new(),
            rx_capacity,
            tx_capture: VecDeque::new(),
            tx_capacity,
            counters: QwCounters::default(),
            tx_deferred: false,
            carrier: true,
        }
    }

    /// Whether the carrier is up (the default).
    pub fn carrier(&self) -> bool {
        self.carrier
    }

    /// Set the carrier; returns whether it changed (then counted in
    /// `carrier_changes`: the caller raises the config-change interrupt).
    pub fn set_carrier(&mut self, up: bool) -> bool {
        if self.carrier == up {
            return false;
        }
        self.carrier = up;
        self.counters.carrier_changes += 1;
        true
    }

    // The host side: what the control plane, the data port and the receive
    // source do.

    /// Queue bytes for delivery to the driver. Returns how many were
    /// accepted: the rest did not fit the FIFO and were refused (and counted),
    /// never silently dropped.
    pub fn inject(&mut self, data: &[u8]) -> usize {
        let n = self.rx_room().min(data.len());
        self.rx_fifo.extend(&data[..n]);
        self.counters.injected_bytes += n as u64;
        self.counters.inject_rejected_bytes += (data.len() - n) as u64;
        n
    }

    /// A generator sample was lost because the FIFO was full.
    pub fn count_overrun(&mut self) {
        self.counters.overruns += 1;
    }

    /// Bytes waiting in the receive FIFO.
    pub fn rx_pending(&self) -> usize {
        self.rx_fifo.len()
    }

    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.rx_capacity.saturating_sub(self.rx_fifo.len())
    }

    /// Receive FIFO capacity.
    pub fn rx_capacity(&self) -> usize {
        self.rx_capacity
    }

    /// Transmit capture capacity.
    pub fn tx_capacity(&self) -> usize {
        self.tx_capacity
    }

    /// Take up to `max` captured transmit bytes, oldest first.
    pub fn take_capture(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.tx_capture.len());
        self.tx_capture.drain(..n).collect()
    }

    /// Bytes waiting in the transmit capture.
    pub fn tx_captured(&self) -> usize {
        self.tx_capture.len()
    }

    /// Write captured transmit bytes to `out`, oldest first, until it
    /// would block or the capture is empty; the bytes written leave the
    /// capture. Returns how many were written (the data port's path).
    pub fn send_capture(&mut self, out: &mut impl io::Write) -> io::Result<usize> {
        let mut sent = 0;
        loop {
            let (front, _) = self.tx_capture.as_slices();
            if front.is_empty() {
                return Ok(sent);
            }
            match out.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_capture.drain(..n);
                    sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(sent),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether transmit buffers wait for room in the capture: it is full, or
    /// the last buffer did not fit.
    pub fn tx_waiting_for_room(&self) -> bool {
        self.tx_deferred || self.tx_capture.len() >= self.tx_capacity
    }

    /// The device's own counters.
    pub fn counters(&self) -> QwCounters {
        self.counters
    }

    /// Forget all data. Counters are kept: they describe the whole session,
    /// across resets.
    pub fn clear(&mut self) {
        self.rx_fifo.clear();
        self.tx_capture.clear();
    }

    // The driver side: what the device does with the driver's buffers.

    /// Whether a receive buffer would get anything now: receive buffers are
    /// only taken while there is data to put in them, so an idle device
    /// keeps the driver's buffers posted.
    pub fn wants_rx(&self) -> bool {
        !self.rx_fifo.is_empty()
    }

    /// Whether a transmit buffer may be taken now: only while the capture
    /// has room (back-pressure rather than loss).
    pub fn wants_tx(&self) -> bool {
        self.tx_capture.len() < self.tx_capacity
    }

    /// What a receive buffer of `room` bytes gets: the first `room` bytes
    /// of the FIFO (fewer if it holds fewer), in two parts. They stay in the
    /// FIFO until [`rx_delivered`](Self::rx_delivered).
    pub fn rx_front(&self, room: usize) -> (&[u8], &[u8]) {
        let room = room.min(self.rx_fifo.len());
        let (a, b) = self.rx_fifo.as_slices();
        let from_a = room.min(a.len());
        (&a[..from_a], &b[..room - from_a])
    }

    /// The first `taken` bytes of the FIFO went into a receive buffer, and
    /// the driver is told of `reported` of them (fewer when a fault cut
    /// the buffer short).
    pub fn rx_delivered(&mut self, taken: usize, reported: u32) {
        self.rx_fifo.drain(..taken.min(self.rx_fifo.len()));
        self.counters.rx_bytes += u64::from(reported);
        if reported > 0 {
            self.counters.rx_buffers += 1;
        }
    }

    /// Whether a transmit buffer of `len` bytes fits the capture now. A
    /// buffer waits for room, except that an empty capture takes any buffer
    /// (the core bounds it by the chain limit): a buffer larger than the
    /// whole capture must not wedge the queue forever.
    pub fn tx_fits(&self, len: u64) -> bool {
        let room = self.tx_capacity.saturating_sub(self.tx_capture.len());
        len <= room as u64 || self.tx_capture.is_empty()
    }

    /// A transmit buffer's bytes, into the capture.
    pub fn tx_accept(&mut self, data: &[u8]) {
        self.tx_capture.extend(data);
        self.tx_deferred = false;
        self.counters.tx_bytes += data.len() as u64;
        self.counters.tx_buffers += 1;
    }

    /// A transmit buffer did not fit: it waits on the ring for room.
    pub fn tx_defer(&mut self) {
        self.tx_deferred = true;
    }

    /// Put bytes in the transmit capture as if the driver sent them (tests).
    #[cfg(test)]
    pub(crate) fn push_capture_for_test(&mut self, data: &[u8]) {
        self.tx_capture.extend(data);
    }

    /// Take up to `max` bytes from the front of the receive FIFO (tests).
    #[cfg(test)]
    pub(crate) fn take_rx(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.rx_fifo.len());
        self.rx_fifo.drain(..n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_refuses_what_does_not_fit_and_counts_it() {
        let mut qw = Qw::new(4, 4);
        assert_eq!(qw.inject(b"abcdef"), 4);
        assert_eq!(qw.inject(b"g"), 0);
        let c = qw.counters();
        assert_eq!((c.injected_bytes, c.inject_rejected_bytes), (4, 3));
        assert_eq!((qw.rx_pending(), qw.rx_room()), (4, 0));
        qw.clear();
        assert_eq!(qw.rx_pending(), 0);
        assert_eq!(qw.counters(), c, "counters outlive a reset");
    }

    #[test]
    fn carrier_changes_are_counted_and_outlive_a_reset() {
        let mut qw = Qw::new(4, 4);
        assert!(qw.carrier(), "up at power-on");
        assert!(!qw.set_carrier(true), "no change");
        assert!(qw.set_carrier(false));
        assert!(!qw.set_carrier(false));
        qw.clear();
        assert!(!qw.carrier(), "a reset does not plug the cable back in");
        assert!(qw.set_carrier(true));
        assert_eq!(qw.counters().carrier_changes, 2);
    }

    #[test]
    fn a_receive_buffer_takes_the_front_of_the_fifo() {
        let mut qw = Qw::new(8, 8);
        assert!(!qw.wants_rx());
        qw.inject(b"abcdef");
        assert!(qw.wants_rx());
        let (a, b) = qw.rx_front(4);
        assert_eq!([a, b].concat(), b"abcd");
        qw.rx_delivered(4, 4);
        // The FIFO wraps: its bytes come in two parts.
        qw.inject(b"ghijkl");
        let (a, b) = qw.rx_front(100);
        assert_eq!([a, b].concat(), b"efghijkl", "no more than there is");
        // Cut short by a fault: all taken, part reported.
        qw.rx_delivered(8, 3);
        qw.rx_delivered(0, 0);
        let c = qw.counters();
        assert_eq!(
            (c.rx_bytes, c.rx_buffers),
            (7, 2),
            "empty buffers not counted"
        );
        assert_eq!(qw.rx_pending(), 0);
    }

    #[test]
    fn transmit_buffers_wait_for_room_except_in_an_empty_capture() {
        let mut qw = Qw::new(8, 6);
        assert!(
            qw.wants_tx() && qw.tx_fits(100),
            "an empty capture takes any"
        );
        qw.tx_accept(b"abcd");
        assert!(qw.tx_fits(2) && !qw.tx_fits(3));
        qw.tx_defer();
        assert!(qw.tx_waiting_for_room());
        assert_eq!(qw.take_capture(2), b"ab");
        qw.tx_accept(b"ef");
        assert!(!qw.tx_waiting_for_room(), "accepting clears the deferral");
        qw.tx_accept(b"gh");
        assert!(!qw.wants_tx(), "full");
        assert!(qw.tx_waiting_for_room());
        let c = qw.counters();
        assert_eq!((c.tx_bytes, c.tx_buffers), (8, 3));
        let mut out = Vec::new();
        assert_eq!(qw.send_capture(&mut out).unwrap(), 6);
        assert_eq!(out, b"cdefgh");
        assert_eq!(qw.tx_captured(), 0);
    }
}
