//! The transport (`CoreBackend`) driving a tiny loopback device over real
//! split rings in guest memory: what a kick, a requested pass and a device
//! reset do. The VMM's part (ring set-up, kicks, queue stops) is played by
//! calling the `VhostUserBackend` methods the vhost-user daemon calls.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use vdevlab_device_core::backend::CoreBackend;
use vdevlab_device_core::chain::{Chain, Direction, QueueSpec};
use vdevlab_device_core::{Core, Engine, Fields, Outcome, VirtioDevice};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const RX: u16 = 0;
const TX: u16 = 1;
const SIZE: u16 = 16;

/// Every transmitted buffer comes back, byte for byte, on the receive
/// queue. With `request`, it asks the core for a pass over rx when a
/// transmit buffer gives it data; without, it relies on kicks alone.
#[derive(Debug)]
struct Loopback {
    request: bool,
    pending: VecDeque<Vec<u8>>,
    resets: u32,
}

impl VirtioDevice for Loopback {
    fn name(&self) -> &'static str {
        "loopback"
    }
    fn queues(&self) -> Vec<QueueSpec> {
        vec![
            QueueSpec::new("rx", SIZE, Direction::DeviceWrites),
            QueueSpec::new("tx", SIZE, Direction::DeviceReads),
        ]
    }
    fn config_space(&self, _core: &Core) -> Vec<u8> {
        Vec::new()
    }
    fn wants_buffers(&self, queue: u16) -> bool {
        match queue {
            RX => !self.pending.is_empty(),
            _ => self.pending.len() < 4,
        }
    }
    fn handle_chain(&mut self, queue: u16, chain: &Chain<'_>, core: &mut Core) -> Outcome {
        if queue == TX {
            let mut data = Vec::new();
            if let Err(e) = chain.read_to_end(&mut data) {
                return Outcome::Refuse(e);
            }
            // A device-model bug on demand (the panic tests below).
            if data == b"panic!" {
                panic!("loopback: told to panic by the driver");
            }
            self.pending.push_back(data);
            if self.request {
                core.request_pass(RX);
            }
            return Outcome::Complete { used_len: 0 };
        }
        let Some(data) = self.pending.pop_front() else {
            return Outcome::Defer;
        };
        match chain.write(&[&data]) {
            Ok(n) => Outcome::Complete { used_len: n as u32 },
            Err(e) => Outcome::Refuse(e),
        }
    }
    fn reset(&mut self, _core: &mut Core) {
        self.pending.clear();
    }
    fn device_reset(&mut self, core: &mut Core) {
        self.resets += 1;
        self.reset(core);
    }
    fn counters(&self) -> Fields {
        Fields::new()
    }
    fn control(
        &mut self,
        op: &str,
        _request: &serde_json::Value,
        _core: &mut Core,
    ) -> Option<Result<Fields, String>> {
        (op == "panic").then(|| panic!("loopback: told to panic by the host"))
    }
}

/// Guest memory, the two rings (rx at 0, tx at 0x4000: descriptor table,
/// then available ring at +0x1000, used ring at +0x2000), the backend.
struct Rig {
    mem: GuestMemoryMmap,
    backend: CoreBackend<Loopback>,
    engine: Arc<Mutex<Engine<Loopback>>>,
    vrings: Vec<VringRwLock>,
}

const RING: [u64; 2] = [0, 0x4000];

impl Rig {
    fn new(request: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let engine = Arc::new(Mutex::new(Engine::new(Loopback {
            request,
            pending: VecDeque::new(),
            resets: 0,
        })));
        let backend = CoreBackend::new(engine.clone()).unwrap();
        backend.update_memory(atomic.clone()).unwrap();
        let vrings = RING
            .iter()
            .map(|&base| {
                let v = VringRwLock::new(atomic.clone(), SIZE).unwrap();
                v.set_queue_size(SIZE);
                v.set_queue_info(base, base + 0x1000, base + 0x2000)
                    .unwrap();
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        Self {
            mem,
            backend,
            engine,
            vrings,
        }
    }

    fn u16_at(&self, addr: u64) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(addr)).unwrap())
    }

    /// Post one single-descriptor buffer at `addr` on queue `q`.
    fn post(&self, q: u16, addr: u64, len: u32, writable: bool) {
        let base = RING[q as usize];
        let slot = self.u16_at(base + 0x1000 + 2);
        // virtq_desc: addr, len, flags, next (little endian).
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&len.to_le_bytes());
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        let d = u64::from(slot % SIZE);
        self.mem
            .write_slice(&desc, GuestAddress(base + 16 * d))
            .unwrap();
        let ring = base + 0x1000 + 4 + 2 * d;
        self.mem
            .write_obj((slot % SIZE).to_le(), GuestAddress(ring))
            .unwrap();
        self.mem
            .write_obj(
                slot.wrapping_add(1).to_le(),
                GuestAddress(base + 0x1000 + 2),
            )
            .unwrap();
    }

    /// The used ring of `q`: (entries, length of the first one).
    fn used(&self, q: u16) -> (u16, u32) {
        let used = RING[q as usize] + 0x2000;
        let n = self.u16_at(used + 2);
        let len: u32 = self.mem.read_obj(GuestAddress(used + 4 + 4)).unwrap();
        (n, u32::from_le(len))
    }

    /// What a driver reset leaves: both queues stopped (GET_VRING_BASE)
    /// and set up again from index 0 with clear rings.
    fn driver_reset(&self) {
        for q in [RX, TX] {
            self.backend.stop_vring(u32::from(q)).unwrap();
        }
        for (v, &base) in self.vrings.iter().zip(&RING) {
            self.mem
                .write_slice(&[0u8; 0x3000], GuestAddress(base))
                .unwrap();
            v.set_queue_next_avail(0);
            v.set_queue_next_used(0);
        }
    }

    fn kick(&self, q: u16) {
        self.backend
            .handle_event(q, EventSet::IN, &self.vrings, 0)
            .unwrap();
    }
}

/// The driver posts an rx buffer (no kick: the device has nothing for it
/// yet), then transmits and kicks tx only. The echo must land on rx with
/// no other trigger.
fn echo(request: bool) -> (Rig, (u16, u32)) {
    let rig = Rig::new(request);
    rig.post(RX, 0x20000, 64, true);
    rig.mem
        .write_slice(b"loopback!", GuestAddress(0x30000))
        .unwrap();
    rig.post(TX, 0x30000, 9, false);
    rig.kick(TX);
    assert_eq!(rig.used(TX).0, 1, "the tx chain was consumed");
    let rx = rig.used(RX);
    (rig, rx)
}

#[test]
fn a_requested_pass_delivers_loopback_data_without_another_trigger() {
    let (rig, rx) = echo(true);
    assert_eq!(rx, (1, 9), "one rx buffer used, 9 bytes");
    let mut got = [0u8; 9];
    rig.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(&got, b"loopback!");
    assert!(!rig.engine.lock().unwrap().core.pass_requested());
}

#[test]
fn without_a_request_a_tx_kick_leaves_rx_waiting() {
    // What the mechanism is for: a kick serves only the kicked queue.
    let (rig, rx) = echo(false);
    assert_eq!(rx.0, 0, "rx got nothing without a request");
    rig.kick(RX);
    assert_eq!(rig.used(RX), (1, 9), "the next rx kick delivers it");
}

#[test]
fn requests_for_queues_that_want_no_buffers_are_dropped() {
    let rig = Rig::new(true);
    rig.engine.lock().unwrap().core.request_all_passes();
    // rx wants nothing (no data): only tx is taken.
    assert_eq!(rig.engine.lock().unwrap().take_pass_requests(), vec![TX]);
    assert!(!rig.engine.lock().unwrap().core.pass_requested());
    assert!(rig.engine.lock().unwrap().take_pass_requests().is_empty());
}

#[test]
fn device_reset_comes_once_when_every_queue_is_stopped() {
    let rig = Rig::new(true);
    let resets = || rig.engine.lock().unwrap().device.resets;
    rig.backend.stop_vring(u32::from(RX)).unwrap();
    assert_eq!(resets(), 0, "one queue stopped is not a device reset");
    rig.backend.stop_vring(u32::from(TX)).unwrap();
    assert_eq!(resets(), 1);
    // A queue reset on its own, a kick (the queue runs again), then the
    // other queue stops: not every queue is stopped.
    rig.backend.stop_vring(u32::from(RX)).unwrap();
    rig.kick(RX);
    rig.backend.stop_vring(u32::from(TX)).unwrap();
    assert_eq!(resets(), 1);
    rig.backend.stop_vring(u32::from(RX)).unwrap();
    assert_eq!(resets(), 2);
}

/// Two workers on one backend at once, as vhost-user-backend runs them
/// when a backend spreads its queues over several threads
/// (`queues_per_thread`; today every queue is on one worker, so this was a
/// latent lock-order inversion, not yet a live deadlock). One worker starts
/// an injected interrupt storm (a device event: `spurious` arms the storm
/// timer), the other serves that storm timer's tick. They used to take the
/// engine lock and the storm timer's lock in opposite orders (`spurious`
/// held the engine, from an `if let` scrutinee, while it armed the timer;
/// the tick holds the timer while it asks the engine whether the storm is
/// on): both workers stuck, and the control plane, which waits for the
/// engine, with them. Before the fix this test deadlocked in 2 runs of 2.
#[test]
fn two_workers_starting_and_serving_a_storm_do_not_deadlock() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use vdevlab_device_core::faults::{Fault, QueueSel};

    const ROUNDS: usize = 20_000;
    let rig = Arc::new(Rig::new(true));
    let storm = Fault::InterruptStorm {
        queue: QueueSel::named("rx"),
        rate_hz: 1000,
        duration_ms: 60_000,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (done, finished) = mpsc::channel::<&'static str>();
    let starter = {
        let (rig, stop, done, storm) = (rig.clone(), stop.clone(), done.clone(), storm.clone());
        std::thread::spawn(move || {
            for _ in 0..ROUNDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                rig.engine
                    .lock()
                    .unwrap()
                    .core
                    .faults_mut()
                    .apply(&storm, &[RX], Instant::now())
                    .unwrap();
                rig.backend
                    .handle_event(rig.backend.device_event_id(), EventSet::IN, &rig.vrings, 0)
                    .unwrap();
            }
            let _ = done.send("starter");
        })
    };
    let ticker = {
        let (rig, stop, done) = (rig.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            for _ in 0..ROUNDS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                rig.backend
                    .handle_event(
                        rig.backend.storm_timer_event_id(RX),
                        EventSet::IN,
                        &rig.vrings,
                        1,
                    )
                    .unwrap();
            }
            let _ = done.send("ticker");
        })
    };
    drop(done);
    // Every wait is bounded: a deadlock fails the test instead of hanging
    // it (the two stuck threads are left behind; the process ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            stop.store(true, Ordering::Relaxed);
            panic!("the two workers deadlocked on the engine and the storm timer");
        }
    }
    starter.join().unwrap();
    ticker.join().unwrap();
    // The engine is still usable (not held, not poisoned).
    assert!(rig.engine.try_lock().is_ok());
}

/// A bug in the device model (here: a panic on a magic transmit payload)
/// must not end the worker thread, which would silently stop every queue:
/// vhost-user-backend's worker loop does not catch panics, and unwinding
/// out of a pass would also poison the vring's lock, which
/// vhost-user-backend unwraps on every later use. The panic is contained,
/// the device declares itself broken (NEEDS_RESET, `queue_errors` += 1)
/// and serves nothing until the driver resets it; then it works again.
#[test]
fn a_panicking_device_is_declared_broken_and_recovers_on_a_driver_reset() {
    let rig = Rig::new(true);
    rig.mem
        .write_slice(b"panic!", GuestAddress(0x30000))
        .unwrap();
    rig.post(TX, 0x30000, 6, false);
    rig.kick(TX); // handle_event returns Ok: no panic leaves it
    {
        let eng = rig
            .engine
            .lock()
            .expect("the engine lock is not left poisoned");
        assert!(eng.core.needs_reset(), "the device declared itself broken");
        assert_eq!(eng.core.counters().queue_errors, 1);
    }
    // Neither vring's lock is poisoned (these would panic).
    for v in &rig.vrings {
        drop(v.get_mut());
    }
    // Broken: nothing is served, not even a harmless chain.
    rig.mem
        .write_slice(b"hello", GuestAddress(0x30100))
        .unwrap();
    rig.post(TX, 0x30100, 5, false);
    rig.kick(TX);
    assert_eq!(rig.used(TX).0, 0, "a broken device serves nothing");
    // The driver resets the device: it is healthy again and echoes.
    rig.driver_reset();
    assert!(!rig.engine.lock().unwrap().core.needs_reset());
    assert_eq!(rig.engine.lock().unwrap().device.resets, 1);
    rig.post(RX, 0x20000, 64, true);
    rig.post(TX, 0x30100, 5, false);
    rig.kick(TX);
    assert_eq!(rig.used(TX).0, 1);
    assert_eq!(rig.used(RX), (1, 5));
    let mut got = [0u8; 5];
    rig.mem.read_slice(&mut got, GuestAddress(0x20000)).unwrap();
    assert_eq!(&got, b"hello");
}

/// The same on the control plane's thread: a device's request handler
/// that panics fails that request with an error and declares the device
/// broken; the plane (and the engine lock) go on serving.
#[test]
fn a_panicking_control_request_fails_alone_and_the_plane_lives_on() {
    use vdevlab_device_core::control::Plane;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let rig = Rig::new(true);
    let plane = Plane::new(rig.engine.clone(), EventFd::new(EFD_NONBLOCK).unwrap()).unwrap();
    let reply = plane.handle(&serde_json::json!({"op": "panic"}));
    assert!(!reply.ok);
    assert!(
        reply
            .error
            .as_deref()
            .unwrap_or("")
            .contains("the device panicked"),
        "{reply:?}"
    );
    assert!(plane.handle(&serde_json::json!({"op": "ping"})).ok);
    let stats = plane.handle(&serde_json::json!({"op": "stats"}));
    assert!(stats.ok, "{stats:?}");
    assert!(rig.engine.lock().unwrap().core.needs_reset());
}
