//! Test support for qw's protocol tests: the `vdevlab-qw` binary in a
//! private temporary folder ([`Device`]), its typed control plane ([`Ctl`]),
//! and the in-process vhost-user frontend of `vdevlab-device-testkit`
//! ([`Vmm`]) with qw's two queues and receive/transmit helpers.
//!
//! Everything here fails loudly (panics with the backend's log) rather than
//! returning errors: it is test code.

// Shared by several test binaries and the bench, each using a part.
#![allow(dead_code, unused_imports)]

use std::path::Path;
use std::time::Duration;

use vdevlab_device_testkit as kit;
use vdevlab_qw::control::{ControlClient, Response};
use vdevlab_qw::device::Stats;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

pub use kit::{wait_until, Desc, Link, AVAIL_F_NO_INTERRUPT};

/// qw's queues in guest memory.
pub const LAYOUT: kit::Layout = kit::Layout {
    queues: NUM_QUEUES,
    queue_size: QUEUE_SIZE,
    mem_size: MEM_SIZE,
    data_base: DATA_BASE,
};
/// Guest memory size: one region at guest physical address 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Queue size used for both queues (the lab's).
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Number of queues the device has.
pub const NUM_QUEUES: usize = 2;
/// First guest address free for data buffers (the rings live below).
pub const DATA_BASE: u64 = 0x10000;

/// How long to wait for something that must happen.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait before concluding that something did not happen.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Guest address of queue `q`'s descriptor table.
pub fn desc_table_addr(q: usize) -> u64 {
    LAYOUT.desc_table_addr(q)
}
/// Guest address of queue `q`'s available ring.
pub fn avail_ring_addr(q: usize) -> u64 {
    LAYOUT.avail_ring_addr(q)
}
/// Guest address of queue `q`'s used ring.
pub fn used_ring_addr(q: usize) -> u64 {
    LAYOUT.used_ring_addr(q)
}

/// A `vdevlab-qw` process (the testkit's [`kit::Device`]).
#[derive(Debug)]
pub struct Device(kit::Device);
kit::deref_to_kit!(Device => kit::Device);

impl Device {
    /// Start the binary with `--socket`, `--control` and `extra` arguments,
    /// and wait until both sockets are there.
    pub fn spawn(extra: &[&str]) -> Self {
        Self(kit::Device::spawn(env!("CARGO_BIN_EXE_vdevlab-qw"), extra))
    }

    /// A new control-plane client.
    pub fn control(&self) -> Ctl {
        Ctl(ControlClient::connect(&self.0.control).expect("connecting to the control socket"))
    }

    /// Connect a new frontend (VMM) and bring both queues up.
    pub fn connect(&self, opts: Options) -> Vmm {
        Vmm::connect(&self.socket, opts, || self.log())
    }

    /// Wait until the backend listens on a new vhost-user socket (a file
    /// other than `old`).
    pub fn wait_relisten(&self, old: Option<(u64, i64, i64)>) -> bool {
        self.0.wait_relisten(old, TIMEOUT)
    }
}

/// A control-plane client with test-friendly helpers (they panic on error).
#[derive(Debug)]
pub struct Ctl(pub ControlClient);

impl Ctl {
    /// Send a raw JSON request line and return the reply.
    pub fn raw(&mut self, json: &str) -> Response {
        let req = serde_json::from_str(json).expect("a valid control request");
        self.0.request(&req).expect("control: request")
    }

    /// Inject bytes; returns how many the device accepted.
    pub fn inject(&mut self, data: &[u8]) -> usize {
        self.0.inject(data).expect("control: inject")
    }

    /// Take up to `max` captured bytes (all with `None`).
    pub fn capture(&mut self, max: Option<usize>) -> Vec<u8> {
        self.0.capture(max).expect("control: capture")
    }

    /// The full stats reply (counters and levels).
    pub fn stats_reply(&mut self) -> Response {
        self.0.stats().expect("control: stats")
    }

    /// The counters.
    pub fn stats(&mut self) -> Stats {
        self.stats_reply().stats.expect("stats reply has counters")
    }

    /// Bytes waiting in the receive FIFO.
    pub fn rx_pending(&mut self) -> usize {
        self.stats_reply().rx_pending.expect("reply has rx_pending")
    }

    /// Bytes waiting in the transmit capture.
    pub fn tx_captured(&mut self) -> usize {
        self.stats_reply()
            .tx_captured
            .expect("reply has tx_captured")
    }

    /// Poll the counters until `cond` holds (or [`TIMEOUT`]); returns the
    /// last counters seen. Note: every control request also makes the
    /// backend run a pass over both queues.
    pub fn wait_stats(&mut self, mut cond: impl FnMut(&Stats) -> bool) -> Stats {
        let mut last = self.stats();
        wait_until(TIMEOUT, || {
            last = self.stats();
            cond(&last)
        });
        last
    }
}

/// What the frontend negotiates.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            event_idx: false,
            indirect: true,
        }
    }
}

/// The testkit's frontend ([`kit::Vmm`]) with qw's queues and helpers.
#[derive(Debug)]
pub struct Vmm(kit::Vmm);
kit::deref_to_kit!(Vmm => kit::Vmm);

impl Vmm {
    /// Connect to `socket`, negotiate `opts` and bring both queues up.
    /// `log` gives the backend's log for failure messages.
    pub fn connect(socket: &Path, opts: Options, log: impl Fn() -> String) -> Self {
        let mut features = 0;
        if opts.event_idx {
            features |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        let config = kit::Config {
            layout: LAYOUT,
            features,
        };
        Self(kit::Vmm::connect(socket, config, log))
    }

    /// Post a receive chain of device-writable buffers `(addr, len)`.
    pub fn post_rx(&mut self, bufs: &[(u64, u32)]) -> u16 {
        let descs: Vec<Desc> = bufs.iter().map(|&(a, l)| Desc::writable(a, l)).collect();
        self.post_chain(RX, &descs)
    }

    /// Post a transmit chain of one device-readable buffer holding `data`.
    pub fn post_tx(&mut self, addr: u64, data: &[u8]) -> u16 {
        self.post_tx_chain(&[(addr, data)])
    }

    /// Post a transmit chain: each `(addr, bytes)` written to guest memory
    /// and described by one device-readable descriptor.
    pub fn post_tx_chain(&mut self, bufs: &[(u64, &[u8])]) -> u16 {
        let descs: Vec<Desc> = bufs
            .iter()
            .map(|&(a, d)| {
                self.write(a, d);
                Desc::readable(a, d.len() as u32)
            })
            .collect();
        self.post_chain(TX, &descs)
    }

    /// Wait (up to [`TIMEOUT`]) until queue `q`'s used index reaches `idx`.
    pub fn wait_used(&self, q: usize, idx: u16) -> bool {
        self.0.wait_used(q, idx, TIMEOUT)
    }
}
