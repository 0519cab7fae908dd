//! Test support for the sensor's protocol tests: the `vdevlab-sensor`
//! binary in a private temporary folder ([`Device`]), its control plane
//! ([`Ctl`]), and the in-process vhost-user frontend of
//! `vdevlab-device-testkit` ([`Vmm`]) with the sensor's three queues, its
//! control requests, and a driver-like [`Collector`] of samples/events.
//!
//! Everything here panics with the backend's log rather than returning
//! errors: it is test code.

// Shared by several test binaries, each using a part.
#![allow(dead_code, unused_imports)]

use std::time::{Duration, Instant};

use serde_json::json;
use vdevlab_device_core::Fields;
use vdevlab_device_testkit as kit;

pub use kit::wait_until;

/// The sensor's queues in guest memory.
pub const LAYOUT: kit::Layout = kit::Layout {
    queues: 3,
    queue_size: QUEUE_SIZE,
    mem_size: MEM_SIZE,
    data_base: DATA_BASE,
};
/// Guest memory size: one region at guest physical address 0.
pub const MEM_SIZE: u64 = 4 << 20;
/// Queue size of every queue (the lab's).
pub const QUEUE_SIZE: u16 = 64;
/// Queue indices.
pub const SAMPLES: usize = 0;
/// See [`SAMPLES`].
pub const EVENTS: usize = 1;
/// See [`SAMPLES`].
pub const CTRL: usize = 2;
/// First guest address free for buffers (the rings live below).
pub const DATA_BASE: u64 = 0x10000;
/// A [`Desc::next`] that points at the descriptor's own slot (a loop).
pub const SELF: u16 = u16::MAX;
/// How long to wait for something that must happen.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The backend process (the testkit's [`kit::Device`]).
#[derive(Debug)]
pub struct Device(kit::Device);
kit::deref_to_kit!(Device => kit::Device);

impl Device {
    /// Start `vdevlab-sensor` with `extra` arguments and wait for its sockets.
    pub fn spawn(extra: &[&str]) -> Self {
        Self(kit::Device::spawn(
            env!("CARGO_BIN_EXE_vdevlab-sensor"),
            extra,
        ))
    }

    /// A control-plane client.
    pub fn control(&self) -> Ctl {
        Ctl(self.0.ctl())
    }

    /// Connect a frontend and bring the three queues up.
    pub fn connect(&self) -> Vmm {
        let config = kit::Config {
            layout: LAYOUT,
            features: 0,
        };
        Vmm(self.0.vmm(config))
    }
}

/// The core's control plane (the testkit's [`kit::Ctl`]) and the sensor's
/// own request.
#[derive(Debug)]
pub struct Ctl(kit::Ctl);
kit::deref_to_kit!(Ctl => kit::Ctl);

impl Ctl {
    /// The sensor's state (`{"op":"sensor"}`).
    pub fn sensor(&mut self) -> Fields {
        self.ok(json!({"op": "sensor"}))
    }
}

/// One descriptor: address, length, writable, and where NEXT points
/// (`None`: the next slot of the chain, or the end for the last one).
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
    /// A raw next index (malformed chains), or [`SELF`].
    pub next: Option<u16>,
}

impl Desc {
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
            next: None,
        }
    }
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
            next: None,
        }
    }
    /// NEXT to this raw index, whatever it is.
    pub fn next(mut self, idx: u16) -> Self {
        self.next = Some(idx);
        self
    }
}

impl From<Desc> for kit::Desc {
    fn from(d: Desc) -> Self {
        let kd = if d.write {
            kit::Desc::writable(d.addr, d.len)
        } else {
            kit::Desc::readable(d.addr, d.len)
        };
        kd.link(match d.next {
            None => kit::Link::Auto,
            Some(SELF) => kit::Link::Itself,
            Some(n) => kit::Link::Raw(n),
        })
    }
}

/// The testkit's frontend ([`kit::Vmm`]) with the sensor's helpers.
#[derive(Debug)]
pub struct Vmm(kit::Vmm);
kit::deref_to_kit!(Vmm => kit::Vmm);

impl Vmm {
    /// Write `descs` as one chain in consecutive slots and make it
    /// available (no kick); returns its head.
    pub fn post(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let descs: Vec<kit::Desc> = descs.iter().map(|&d| d.into()).collect();
        self.post_chain(q, &descs)
    }

    /// Used element `i` of queue `q`: (head, length).
    pub fn used(&self, q: usize, i: u16) -> (u16, u32) {
        let (id, len) = self.used_elem(q, i);
        (id as u16, len)
    }

    /// Send one control request (16 bytes) with an 8-byte status buffer,
    /// kick, and wait for the answer: (used length, status, value).
    pub fn ctrl(&mut self, cmd: u32, arg0: u32, arg1: u32, reserved: u32) -> (u32, u32, u32) {
        let req: Vec<u8> = [cmd, arg0, arg1, reserved]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        self.ctrl_raw(&req, 8)
    }

    /// A control chain with `req` readable and `status_len` writable
    /// bytes: (used length, status, value).
    pub fn ctrl_raw(&mut self, req: &[u8], status_len: u32) -> (u32, u32, u32) {
        let r = self.buf(req.len() as u32);
        let s = self.buf(status_len.max(8));
        self.write(r, req);
        self.write(s, &[0xee; 8]);
        let before = self.used_idx(CTRL);
        let head = self.post(
            CTRL,
            &[Desc::r(r, req.len() as u32), Desc::w(s, status_len)],
        );
        self.kick(CTRL);
        assert!(
            self.wait_used(CTRL, before.wrapping_add(1), TIMEOUT),
            "no answer to a control request"
        );
        let (id, len) = self.used(CTRL, before);
        assert_eq!(id, head);
        let st = self.read(s, 8);
        (
            len,
            u32::from_le_bytes(st[0..4].try_into().unwrap()),
            u32::from_le_bytes(st[4..8].try_into().unwrap()),
        )
    }

    /// `SET_RATE`, which must succeed.
    pub fn set_rate(&mut self, hz: u32) {
        assert_eq!(self.ctrl(1, hz, 0, 0), (8, 0, hz), "SET_RATE {hz}");
    }

    /// `SET_THRESHOLD`, which must succeed.
    pub fn set_threshold(&mut self, threshold: i32, mode: u32) {
        assert_eq!(
            self.ctrl(2, threshold as u32, mode, 0),
            (8, 0, mode),
            "SET_THRESHOLD {threshold} {mode}"
        );
    }
}

/// Keeps `n` buffers posted on a device-to-driver queue and collects what
/// comes back, reposting each buffer as it returns (a driver's loop).
pub struct Collector {
    q: usize,
    len: u32,
    /// Used index seen so far.
    seen: u16,
    /// Head -> buffer address.
    bufs: std::collections::HashMap<u16, u64>,
    /// (arrival time, record bytes) per completed buffer, in order.
    pub got: Vec<(Instant, Vec<u8>)>,
}

impl Collector {
    /// Post `n` buffers of `len` bytes on queue `q` and kick.
    pub fn start(vmm: &mut Vmm, q: usize, n: usize, len: u32) -> Self {
        let mut c = Self {
            q,
            len,
            seen: vmm.used_idx(q),
            bufs: Default::default(),
            got: Vec::new(),
        };
        for _ in 0..n {
            let a = vmm.buf(len);
            let head = vmm.post(q, &[Desc::w(a, len)]);
            c.bufs.insert(head, a);
        }
        vmm.kick(q);
        c
    }

    /// Take what the device completed, repost those buffers; returns the
    /// number of buffers taken.
    pub fn poll(&mut self, vmm: &mut Vmm) -> usize {
        let now = Instant::now();
        let used = vmm.used_idx(self.q);
        let mut n = 0;
        while self.seen != used {
            let (head, len) = vmm.used(self.q, self.seen);
            self.seen = self.seen.wrapping_add(1);
            let addr = self.bufs.remove(&head).expect("a head we posted");
            self.got.push((now, vmm.read(addr, len as usize)));
            let a = vmm.buf(self.len);
            let h = vmm.post(self.q, &[Desc::w(a, self.len)]);
            self.bufs.insert(h, a);
            n += 1;
        }
        if n > 0 {
            vmm.kick(self.q);
        }
        n
    }

    /// Poll until `cond(self)` holds or `timeout` passes.
    pub fn until(
        &mut self,
        vmm: &mut Vmm,
        timeout: Duration,
        cond: impl Fn(&Self) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll(vmm);
            if cond(self) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Every record of `size` bytes received, with its buffer's arrival time.
    pub fn records(&self, size: usize) -> Vec<(Instant, Vec<u8>)> {
        self.got
            .iter()
            .flat_map(|(t, b)| b.chunks_exact(size).map(move |r| (*t, r.to_vec())))
            .collect()
    }
}
