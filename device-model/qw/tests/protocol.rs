//! Protocol tests: the real `vdevlab-qw` binary driven over vhost-user by
//! an in-process frontend (see `support`), checked against
//! `docs/device-spec.md`. Each test starts its own device in its own
//! temporary folder.

mod support;

use support::*;
use vdevlab_qw::spec::MAX_CHAIN_BYTES;

/// Bytes injected ahead of a malformed receive chain.
const PAYLOAD: &[u8] = b"payload!";
/// Where the well-formed chains that follow a malformed one live.
const GOOD: u64 = 0x30000;
const GOOD2: u64 = 0x31000;

#[test]
fn negotiation_offers_the_spec_features() {
    use vhost::vhost_user::VhostUserProtocolFeatures as P;
    let dev = Device::spawn(&[]);
    let vmm = dev.connect(Options {
        event_idx: true,
        indirect: true,
    });
    // VERSION_1 (32), EVENT_IDX (29), INDIRECT_DESC (28), and vhost-user's
    // PROTOCOL_FEATURES (30); no device-specific bits.
    assert_eq!(
        vmm.offered_features,
        (1 << 32) | (1 << 30) | (1 << 29) | (1 << 28),
        "virtio features offered"
    );
    // REPLY_ACK is added by the vhost crate itself.
    assert_eq!(
        vmm.offered_protocol_features,
        P::MQ | P::REPLY_ACK | P::BACKEND_REQ | P::CONFIG | P::CONFIGURE_MEM_SLOTS,
        "protocol features offered"
    );
}

/// The config space over GET_CONFIG, as a VMM reads it for the driver: live
/// values (capacities, source, status), read-only.
#[test]
fn config_space_is_served_live_and_read_only() {
    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::VhostUserFrontend as _;
    let dev = Device::spawn(&["--rx-fifo-bytes", "5000"]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let read = |vmm: &mut support::Vmm| {
        let (_, payload) = vmm
            .fe
            .get_config(0, 48, VhostUserConfigFlags::WRITABLE, &[0u8; 48])
            .expect("GET_CONFIG");
        payload.to_vec()
    };
    let word = |b: &[u8], off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
    let cfg = read(&mut vmm);
    assert_eq!(&cfg[0..4], b"QWDV");
    assert_eq!(word(&cfg, 0x0c), 5000, "receive FIFO size");
    assert_eq!(word(&cfg, 0x14), 0, "status: healthy, no source");
    let resp = ctl.raw(
        r#"{"op":"source","source":{"kind":"generator","bytes":8,"period_us":100000,"seed":1}}"#,
    );
    assert!(resp.ok, "{resp:?}");
    let resp = ctl.raw(r#"{"op":"needs_reset"}"#);
    assert!(resp.ok);
    let cfg = read(&mut vmm);
    assert_eq!(
        word(&cfg, 0x14),
        0b11,
        "status: NEEDS_RESET and source active"
    );
    assert_eq!(word(&cfg, 0x20), 1, "source: generator");
    // A guest's write is refused (logged, nothing changes) without ending
    // the VMM's connection: the device is still there to read.
    vmm.fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[0u8; 4])
        .expect("SET_CONFIG is answered");
    assert_eq!(&read(&mut vmm)[0..4], b"QWDV", "the write changed nothing");
    assert!(dev.log().contains("config-space write refused"));
}

#[test]
fn rx_delivers_injected_bytes_in_order_across_buffers() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();

    let b0 = vmm.post_rx(&[(0x10000, 7)]);
    let b1 = vmm.post_rx(&[(0x11000, 100)]);
    let b2 = vmm.post_rx(&[(0x12000, 3), (0x13000, 5)]);
    let b3 = vmm.post_rx(&[(0x14000, 150)]);
    vmm.kick(RX);
    assert_eq!(ctl.inject(&data), 300);
    assert!(vmm.wait_used(RX, 4), "used ring: {:?}", vmm.all_used(RX));
    assert_eq!(
        vmm.used_elems(RX, 0, 4),
        vec![
            (b0.into(), 7),
            (b1.into(), 100),
            (b2.into(), 8),
            (b3.into(), 150)
        ],
        "every buffer filled completely, in ring order"
    );
    let mut got = vmm.read(0x10000, 7);
    got.extend(vmm.read(0x11000, 100));
    got.extend(vmm.read(0x12000, 3));
    got.extend(vmm.read(0x13000, 5));
    got.extend(vmm.read(0x14000, 150));
    assert_eq!(got, data[..265], "the byte stream, in order");

    // Counters and the interrupt follow the used ring: wait for them.
    ctl.wait_stats(|s| s.interrupts_raised >= 1);
    let reply = ctl.stats_reply();
    let stats = reply.stats.unwrap();
    assert_eq!(reply.rx_pending, Some(35), "the rest waits in the FIFO");
    assert_eq!(stats.injected_bytes, 300);
    assert_eq!(stats.rx_bytes, 265);
    assert_eq!(stats.rx_buffers, 4);
    assert_eq!(stats.bad_chains, 0);
    assert_eq!(stats.interrupts_raised, 1, "one pass, one interrupt");
    assert_eq!(vmm.calls(RX), 1, "the call eventfd was signalled once");

    // The rest goes into the next buffer, partly filling it.
    let b4 = vmm.post_rx(&[(0x15000, 64)]);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 5));
    assert_eq!(vmm.used_elem(RX, 4), (b4.into(), 35));
    assert_eq!(vmm.read(0x15000, 35), data[265..]);
    assert_eq!(
        vmm.read(0x15000 + 35, 29),
        vec![0u8; 29],
        "nothing written past the used length"
    );
    let s = ctl.wait_stats(|s| s.interrupts_raised == 2);
    assert_eq!((s.rx_bytes, s.rx_buffers, s.interrupts_raised), (300, 5, 2));
    assert_eq!(vmm.calls(RX), 2);
    assert_eq!(ctl.rx_pending(), 0);
}

#[test]
fn rx_idle_device_leaves_buffers_posted() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let b0 = vmm.post_rx(&[(0x10000, 64)]);
    let b1 = vmm.post_rx(&[(0x11000, 64)]);
    vmm.kick(RX);
    std::thread::sleep(SETTLE);
    let _ = ctl.stats(); // another pass over both queues
    std::thread::sleep(SETTLE);
    assert_eq!(vmm.used_idx(RX), 0, "no data: no buffer taken");
    assert_eq!(vmm.calls(RX), 0, "nothing completed: no interrupt");
    let s = ctl.stats();
    assert_eq!((s.rx_buffers, s.interrupts_raised), (0, 0));

    // Data arrives later: the buffers posted long ago take it in order.
    assert_eq!(ctl.inject(b"late"), 4);
    assert!(vmm.wait_used(RX, 1));
    std::thread::sleep(SETTLE);
    assert_eq!(
        vmm.all_used(RX),
        vec![(b0.into(), 4)],
        "only one buffer used"
    );
    assert_eq!(vmm.read(0x10000, 4), b"late");
    assert_eq!(ctl.inject(b"r"), 1);
    assert!(vmm.wait_used(RX, 2));
    assert_eq!(vmm.used_elem(RX, 1), (b1.into(), 1));
    assert_eq!(vmm.read(0x11000, 1), b"r");
}

#[test]
fn rx_indirect_chain_is_filled() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    vmm.write_indirect_table(
        0x20000,
        &[Desc::writable(0x10000, 5), Desc::writable(0x11000, 6)],
    );
    let head = vmm.post_chain(RX, &[Desc::indirect(0x20000, 32)]);
    vmm.kick(RX);
    assert_eq!(ctl.inject(b"hello world!"), 12);
    assert!(vmm.wait_used(RX, 1));
    assert_eq!(vmm.used_elem(RX, 0), (head.into(), 11));
    assert_eq!(vmm.read(0x10000, 5), b"hello");
    assert_eq!(vmm.read(0x11000, 6), b" world");
    assert_eq!(ctl.rx_pending(), 1);
}

#[test]
fn rx_chain_of_exactly_the_limit_is_accepted() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let half = (MAX_CHAIN_BYTES / 2) as u32;
    let head = vmm.post_rx(&[(0x100000, half), (0x200000, half)]);
    vmm.kick(RX);
    assert_eq!(ctl.inject(PAYLOAD), 8);
    assert!(vmm.wait_used(RX, 1));
    assert_eq!(vmm.used_elem(RX, 0), (head.into(), 8));
    assert_eq!(vmm.read(0x100000, 8), PAYLOAD);
    let s = ctl.wait_stats(|s| s.rx_buffers >= 1);
    assert_eq!((s.bad_chains, s.rx_bytes), (0, 8));
}

#[test]
fn inject_beyond_the_fifo_is_refused_not_dropped() {
    let dev = Device::spawn(&["--rx-fifo-bytes", "8"]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    assert_eq!(ctl.inject(b"0123456789ab"), 8, "only what fits is accepted");
    let s = ctl.stats();
    assert_eq!((s.injected_bytes, s.inject_rejected_bytes), (8, 4));
    let h = vmm.post_rx(&[(0x10000, 64)]);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1));
    assert_eq!(vmm.used_elem(RX, 0), (h.into(), 8));
    assert_eq!(vmm.read(0x10000, 8), b"01234567");
    // The FIFO has room again.
    assert_eq!(ctl.inject(b"89ab"), 4);
    assert_eq!(ctl.rx_pending(), 4);
}

#[test]
fn tx_captures_bytes_in_order() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let h0 = vmm.post_tx(0x10000, b"first,");
    let h1 = vmm.post_tx_chain(&[(0x11000, b"sec"), (0x12000, b"ond,")]);
    let h2 = vmm.post_tx(0x13000, b"third");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 3), "used ring: {:?}", vmm.all_used(TX));
    assert_eq!(
        vmm.used_elems(TX, 0, 3),
        vec![(h0.into(), 0), (h1.into(), 0), (h2.into(), 0)],
        "transmit buffers complete with length 0, in order"
    );
    let s = ctl.wait_stats(|s| s.interrupts_raised == 1);
    assert_eq!(ctl.tx_captured(), 18);
    assert_eq!(ctl.capture(None), b"first,second,third");
    assert_eq!(ctl.capture(None), b"", "capture is taken once");
    assert_eq!((s.tx_bytes, s.tx_buffers, s.bad_chains), (18, 3, 0));
    assert_eq!(vmm.calls(TX), 1);
    assert_eq!(vmm.calls(RX), 0);
}

#[test]
fn tx_indirect_chain_is_captured() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    vmm.write(0x10000, b"indi");
    vmm.write(0x11000, b"rect");
    vmm.write_indirect_table(
        0x20000,
        &[Desc::readable(0x10000, 4), Desc::readable(0x11000, 4)],
    );
    let head = vmm.post_chain(TX, &[Desc::indirect(0x20000, 32)]);
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    assert_eq!(vmm.used_elem(TX, 0), (head.into(), 0));
    assert_eq!(ctl.capture(None), b"indirect");
}

#[test]
fn tx_back_pressure_holds_the_ring_until_capture_is_drained() {
    let dev = Device::spawn(&["--tx-capture-bytes", "16"]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let h0 = vmm.post_tx(0x10000, b"0123456789");
    let h1 = vmm.post_tx(0x11000, b"abcdefgh");
    let h2 = vmm.post_tx(0x12000, b"XYZ");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    std::thread::sleep(SETTLE);
    vmm.kick(TX); // kicking again changes nothing
    std::thread::sleep(SETTLE);
    assert_eq!(
        vmm.all_used(TX),
        vec![(h0.into(), 0)],
        "8 bytes do not fit the 6 left: that buffer and the next stay on the ring"
    );
    assert_eq!(ctl.tx_captured(), 10);

    // Draining part of the capture makes room for the next buffer only.
    assert_eq!(ctl.capture(Some(4)), b"0123");
    assert!(vmm.wait_used(TX, 2));
    std::thread::sleep(SETTLE);
    assert_eq!(vmm.used_idx(TX), 2, "XYZ does not fit yet (6 + 8 + 3 > 16)");
    assert_eq!(vmm.used_elem(TX, 1), (h1.into(), 0));

    // Draining the rest releases the last one.
    assert_eq!(ctl.capture(None), b"456789abcdefgh");
    assert!(vmm.wait_used(TX, 3), "used ring: {:?}", vmm.all_used(TX));
    assert_eq!(vmm.used_elem(TX, 2), (h2.into(), 0));
    assert_eq!(ctl.capture(None), b"XYZ");
    let s = ctl.wait_stats(|s| s.tx_buffers >= 3);
    assert_eq!((s.tx_bytes, s.tx_buffers, s.bad_chains), (21, 3, 0));
}

/// Post one 8-byte receive buffer, inject 8 bytes, and wait until the
/// device has accounted for the resulting interrupt decision.
fn complete_one_rx(vmm: &mut Vmm, ctl: &mut Ctl, addr: u64, decisions: u64) {
    let before = vmm.used_idx(RX);
    vmm.post_rx(&[(addr, 8)]);
    assert_eq!(ctl.inject(PAYLOAD), 8);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, before.wrapping_add(1)));
    let s = ctl.wait_stats(|s| s.interrupts_raised + s.interrupts_suppressed >= decisions);
    assert_eq!(
        s.interrupts_raised + s.interrupts_suppressed,
        decisions,
        "one interrupt decision per pass: {s:?}"
    );
}

#[test]
fn no_interrupt_flag_suppresses_the_call() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default()); // no EVENT_IDX
    vmm.set_avail_flags(RX, AVAIL_F_NO_INTERRUPT);
    complete_one_rx(&mut vmm, &mut ctl, 0x10000, 1);
    let s = ctl.stats();
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (0, 0, 1),
        "VRING_AVAIL_F_NO_INTERRUPT set: no call, counted as suppressed"
    );

    vmm.set_avail_flags(RX, 0);
    complete_one_rx(&mut vmm, &mut ctl, 0x11000, 2);
    let s = ctl.stats();
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (1, 1, 1),
        "flag cleared: the next completion interrupts"
    );
}

#[test]
fn event_idx_suppresses_the_call_until_used_event_is_reached() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options {
        event_idx: true,
        ..Options::default()
    });
    // The driver wants an interrupt only once used index 10 is passed.
    vmm.set_used_event(RX, 10);
    complete_one_rx(&mut vmm, &mut ctl, 0x10000, 1);
    let s = ctl.stats();
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (0, 0, 1),
        "used_event not reached: no call"
    );
    // The NO_INTERRUPT flag is ignored with EVENT_IDX: used_event rules.
    vmm.set_avail_flags(RX, AVAIL_F_NO_INTERRUPT);
    vmm.set_used_event(RX, 1);
    complete_one_rx(&mut vmm, &mut ctl, 0x11000, 2);
    let s = ctl.stats();
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (1, 1, 1),
        "used index went from 1 to 2, past used_event 1: one call"
    );
}

#[test]
fn event_idx_raises_the_call_when_used_event_is_reached() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options {
        event_idx: true,
        ..Options::default()
    });
    vmm.set_used_event(RX, 0);
    complete_one_rx(&mut vmm, &mut ctl, 0x10000, 1);
    let s = ctl.stats();
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (1, 1, 0)
    );
    assert!(
        wait_until(TIMEOUT, || vmm.avail_event(RX) == 1),
        "the device publishes avail_event = the next index it will look at (1), not {}",
        vmm.avail_event(RX)
    );

    // Two buffers completed in one pass that crosses used_event 2.
    vmm.set_used_event(RX, 2);
    vmm.post_rx(&[(0x11000, 8)]);
    vmm.post_rx(&[(0x12000, 8)]);
    assert_eq!(ctl.inject(b"0123456789abcdef"), 16);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 3));
    let s = ctl.wait_stats(|s| s.interrupts_raised + s.interrupts_suppressed >= 2);
    assert_eq!(
        (vmm.calls(RX), s.interrupts_raised, s.interrupts_suppressed),
        (2, 2, 0)
    );
    assert!(
        wait_until(TIMEOUT, || vmm.avail_event(RX) == 3),
        "avail_event {}",
        vmm.avail_event(RX)
    );
}

// ---------------------------------------------------------------------------
// Malformed chains. Each case posts one bad chain, then a good one, and
// checks the spec's answer: the bad chain completes with length 0 and counts
// in `bad_chains`, no byte is lost, and the queue keeps working.

fn refused_rx_case(build: fn(&mut Vmm) -> u16) {
    let mut dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let bad = build(&mut vmm);
    let good = vmm.post_rx(&[(GOOD, 8)]);
    assert_eq!(ctl.inject(PAYLOAD), 8);
    vmm.kick(RX);
    let done = vmm.wait_used(RX, 2);
    let stats = ctl.wait_stats(|s| s.bad_chains + s.queue_errors >= 1 && s.rx_buffers >= 1);
    let used = vmm.all_used(RX);
    assert!(
        done,
        "expected the bad chain (head {bad}) and the good one (head {good}) to complete; \
         used ring {used:?}, stats {stats:?}, rx_pending {}",
        ctl.rx_pending()
    );
    assert_eq!(
        used,
        vec![(bad.into(), 0), (good.into(), 8)],
        "bad chain completed with length 0, then the good chain with the payload"
    );
    assert_eq!(vmm.read(GOOD, 8), PAYLOAD, "no byte lost to the bad chain");
    assert_eq!(
        (stats.bad_chains, stats.queue_errors),
        (1, 0),
        "counters: {stats:?}"
    );
    assert_eq!((stats.rx_bytes, stats.rx_buffers), (8, 1));

    // The queue is not dead.
    let again = vmm.post_rx(&[(GOOD2, 16)]);
    assert_eq!(ctl.inject(b"still alive"), 11);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 3), "used ring: {:?}", vmm.all_used(RX));
    assert_eq!(vmm.used_elem(RX, 2), (again.into(), 11));
    assert_eq!(vmm.read(GOOD2, 11), b"still alive");
    assert!(dev.is_running(), "the backend is still running");
}

fn refused_tx_case(build: fn(&mut Vmm) -> u16) {
    let mut dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let bad = build(&mut vmm);
    let good = vmm.post_tx(GOOD, b"good bytes");
    vmm.kick(TX);
    let done = vmm.wait_used(TX, 2);
    let stats = ctl.wait_stats(|s| s.bad_chains + s.queue_errors >= 1 && s.tx_bytes >= 10);
    let used = vmm.all_used(TX);
    assert!(
        done,
        "expected the bad chain (head {bad}) and the good one (head {good}) to complete; \
         used ring {used:?}, stats {stats:?}"
    );
    assert_eq!(used, vec![(bad.into(), 0), (good.into(), 0)]);
    let captured = ctl.capture(None);
    assert_eq!(
        captured,
        b"good bytes",
        "only the good chain's bytes are captured ({} bytes captured)",
        captured.len()
    );
    assert_eq!(
        (stats.bad_chains, stats.queue_errors, stats.tx_bytes),
        (1, 0, 10),
        "counters: {stats:?}"
    );

    let again = vmm.post_tx(GOOD2, b"still alive");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 3), "used ring: {:?}", vmm.all_used(TX));
    assert_eq!(vmm.used_elem(TX, 2), (again.into(), 0));
    assert_eq!(ctl.capture(None), b"still alive");
    assert!(dev.is_running(), "the backend is still running");
}

macro_rules! refused {
    ($runner:ident: $($name:ident => $build:expr;)*) => {
        $(
            #[test]
            fn $name() {
                $runner($build);
            }
        )*
    };
}

// One case per row of the spec's table and direction, over vhost-user. The
// whole table of malformed chains (indirect tables, next indices, every
// place a descriptor can leave memory) is the core's, tested beside the code
// that refuses them: `device-model/core/src/chain.rs` (the refusal for each)
// and `engine.rs` (each one completed empty, no byte lost, the queue going
// on), on rings in test memory.
refused! { refused_rx_case:
    // Wrong direction.
    malformed_rx_readable_descriptor =>
        |v| v.post_chain(RX, &[Desc::readable(0x10000, 8)]);
    // Outside guest memory.
    malformed_rx_descriptor_past_the_end_of_memory =>
        |v| v.post_chain(RX, &[Desc::writable(MEM_SIZE - 4, 8)]);
    // Zero bytes in total.
    malformed_rx_zero_length_descriptor =>
        |v| v.post_chain(RX, &[Desc::writable(0x10000, 0)]);
    // Longer than 1 MiB in total (each descriptor inside memory).
    malformed_rx_chain_longer_than_1_mib =>
        |v| v.post_chain(RX, &[
            Desc::writable(0x100000, (MAX_CHAIN_BYTES / 2) as u32),
            Desc::writable(0x200000, (MAX_CHAIN_BYTES / 2) as u32 + 1),
        ]);
    // Never ends (virtio 2.7.5.3): a descriptor loop 0 -> 1 -> 0 -> ...,
    // and one inside an indirect table.
    malformed_rx_descriptor_loop =>
        |v| v.post_chain(RX, &[
            Desc::writable(0x10000, 16),
            Desc::writable(0x11000, 16).link(Link::Slot(0)),
        ]);
    malformed_rx_indirect_loop =>
        |v| {
            v.write_indirect_table(0x20000, &[
                Desc::writable(0x10000, 8),
                Desc::writable(0x11000, 8).link(Link::Slot(0)),
            ]);
            v.post_chain(RX, &[Desc::indirect(0x20000, 32)])
        };
}

refused! { refused_tx_case:
    malformed_tx_writable_descriptor =>
        |v| { v.write(0x10000, b"WRONGDIR"); v.post_chain(TX, &[Desc::writable(0x10000, 8)]) };
    malformed_tx_descriptor_wrapping_the_address_space =>
        |v| v.post_chain(TX, &[Desc::readable(u64::MAX - 3, 8)]);
    malformed_tx_zero_length_descriptor =>
        |v| v.post_chain(TX, &[Desc::readable(0x10000, 0)]);
    malformed_tx_chain_longer_than_1_mib =>
        |v| v.post_chain(TX, &[
            Desc::readable(0x100000, (MAX_CHAIN_BYTES / 2) as u32),
            Desc::readable(0x200000, (MAX_CHAIN_BYTES / 2) as u32 + 1),
        ]);
    malformed_tx_descriptor_loop =>
        |v| {
            v.write(0x10000, b"LOOP-A");
            v.write(0x11000, b"LOOP-B");
            v.post_chain(TX, &[
                Desc::readable(0x10000, 6),
                Desc::readable(0x11000, 6).link(Link::Slot(0)),
            ])
        };
}

// ---------------------------------------------------------------------------
// Ring-level faults: an available index more than the queue size ahead.

/// Post a good receive buffer with data waiting, then publish an available
/// index 300 entries ahead of the device, and kick.
fn break_rx_ring(vmm: &mut Vmm, ctl: &mut Ctl) {
    // The ring is broken before there is data to serve: injected first,
    // the payload's pass could fill the posted buffer in the moment
    // between post_rx publishing it and the index jump.
    vmm.post_rx(&[(GOOD, 8)]);
    vmm.set_avail_idx(RX, 1 + QUEUE_SIZE + 43);
    vmm.kick(RX);
    assert_eq!(ctl.inject(PAYLOAD), 8);
    let s = ctl.wait_stats(|s| s.queue_errors >= 1);
    assert!(s.queue_errors >= 1, "a queue error is counted: {s:?}");
}

#[test]
fn avail_index_jump_is_a_queue_error_and_the_device_survives() {
    let mut dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    break_rx_ring(&mut vmm, &mut ctl);
    std::thread::sleep(SETTLE);
    assert_eq!(vmm.used_idx(RX), 0, "nothing completed on the broken ring");
    assert_eq!(ctl.rx_pending(), 8, "no byte consumed");
    assert_eq!(ctl.stats().bad_chains, 0);

    // The other queue is unaffected.
    let h = vmm.post_tx(0x10000, b"tx still works");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    assert_eq!(vmm.used_elem(TX, 0), (h.into(), 0));
    assert_eq!(ctl.capture(None), b"tx still works");

    // The driver resets the queue; it works again and the data is there.
    assert_eq!(vmm.reset_queue(RX), 0, "the device consumed no entry");
    let h = vmm.post_rx(&[(GOOD2, 8)]);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1), "used ring: {:?}", vmm.all_used(RX));
    assert_eq!(vmm.used_elem(RX, 0), (h.into(), 8));
    assert_eq!(vmm.read(GOOD2, 8), PAYLOAD);
    assert!(dev.is_running());
}

#[test]
fn queue_error_is_counted_once_per_fault() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    break_rx_ring(&mut vmm, &mut ctl);
    for _ in 0..3 {
        vmm.kick(RX);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let _ = ctl.stats();
    }
    std::thread::sleep(SETTLE);
    let s = ctl.stats();
    assert_eq!(
        s.queue_errors, 1,
        "spec: the queue stops and queue_errors += 1; kicks and control requests on \
         the stopped queue must not count the same fault again: {s:?}"
    );
}

#[test]
fn broken_queue_stays_stopped_until_reset() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    break_rx_ring(&mut vmm, &mut ctl);
    // The driver puts a sane index back without resetting the device.
    vmm.set_avail_idx(RX, 1);
    vmm.kick(RX);
    std::thread::sleep(SETTLE);
    let _ = ctl.stats();
    std::thread::sleep(SETTLE);
    assert_eq!(
        (vmm.used_idx(RX), ctl.rx_pending()),
        (0, 8),
        "spec: a broken queue stops until the driver resets the device"
    );
}

/// An available-ring entry naming a head outside the descriptor table. The
/// spec does not say whether that is a bad chain or a broken ring; either
/// way, "a refused chain never consumes FIFO data, so no byte is lost".
#[test]
fn rx_avail_head_outside_the_table_loses_no_data() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    assert_eq!(ctl.inject(PAYLOAD), 8);
    vmm.push_avail(RX, QUEUE_SIZE + 44); // a head index outside the table
    vmm.post_rx(&[(GOOD, 8)]);
    vmm.kick(RX);
    let s = ctl.wait_stats(|s| s.bad_chains + s.queue_errors >= 1);
    std::thread::sleep(SETTLE);
    let used = vmm.all_used(RX);
    let delivered: u64 = used.iter().map(|&(_, len)| u64::from(len)).sum();
    let reply = ctl.stats_reply();
    let pending = reply.rx_pending.unwrap() as u64;
    let stats = reply.stats.unwrap();
    assert!(
        s.bad_chains + s.queue_errors >= 1,
        "the fault is counted: {s:?}"
    );
    assert_eq!(
        pending + delivered,
        8,
        "no byte lost: FIFO {pending} + completed {delivered} (used ring {used:?}, stats {stats:?})"
    );
    assert_eq!(stats.rx_bytes, delivered, "rx_bytes counts completed bytes");
}

/// A good chain, then an available entry naming a head outside the table:
/// the good chain is completed and the driver is interrupted for it, even
/// though the ring then stops (found by the fuzz target).
#[test]
fn completions_before_a_ring_fault_are_signalled() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    // More than the good chain holds, so the device goes on to the bad entry.
    assert_eq!(ctl.inject(&[0x5a; 16]), 16);
    let calls_before = vmm.calls(RX);
    vmm.post_rx(&[(GOOD, 8)]);
    vmm.push_avail(RX, QUEUE_SIZE + 7);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1));
    let s = ctl.wait_stats(|s| s.queue_errors >= 1);
    assert_eq!(s.queue_errors, 1);
    assert_eq!(
        vmm.all_used(RX).len(),
        1,
        "only the good chain is completed"
    );
    std::thread::sleep(SETTLE);
    assert!(
        vmm.calls(RX) > calls_before,
        "the completion before the fault was signalled"
    );
}

#[test]
fn refusals_are_logged_once_at_warning_level() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    for i in 0..3 {
        vmm.post_chain(TX, &[Desc::writable(0x10000 + 0x1000 * i, 8)]);
    }
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 3));
    let s = ctl.wait_stats(|s| s.bad_chains == 3);
    assert_eq!(s.bad_chains, 3);
    let log = dev.log();
    assert_eq!(
        log.matches("refused a descriptor chain").count(),
        1,
        "one warning at the default level, the rest at debug; log:\n{log}"
    );
}

// ---------------------------------------------------------------------------
// Connections.

/// One frontend's worth of traffic: 5 bytes received, 5 sent; leaves one
/// receive buffer posted.
fn first_connection(vmm: &mut Vmm, ctl: &mut Ctl) {
    let h = vmm.post_rx(&[(0x10000, 64)]);
    assert_eq!(ctl.inject(b"first"), 5);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1));
    assert_eq!(vmm.used_elem(RX, 0), (h.into(), 5));
    vmm.post_tx(0x11000, b"out-1");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    vmm.post_rx(&[(0x12000, 64)]); // still posted when the VMM goes away
}

/// A second frontend takes what was injected meanwhile, and both directions
/// work; the counters cover both connections.
fn second_connection(dev: &Device, ctl: &mut Ctl) {
    let mut vmm = dev.connect(Options {
        event_idx: true,
        ..Options::default()
    });
    let h = vmm.post_rx(&[(0x10000, 64)]);
    vmm.kick(RX);
    assert!(vmm.wait_used(RX, 1), "used ring: {:?}", vmm.all_used(RX));
    assert_eq!(vmm.used_elem(RX, 0), (h.into(), 21));
    assert_eq!(vmm.read(0x10000, 21), b"kept across reconnect");
    vmm.post_tx(0x11000, b"out-2");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    assert_eq!(ctl.capture(None), b"out-2");
    let s = ctl.wait_stats(|s| s.tx_buffers >= 2);
    assert_eq!(
        (s.rx_bytes, s.rx_buffers, s.tx_bytes, s.tx_buffers),
        (26, 2, 10, 2),
        "counters kept across connections"
    );
}

#[test]
fn reconnect_after_the_vmm_goes_away_keeps_data_and_counters() {
    let mut dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let old_socket = dev.socket_id();
    {
        let mut vmm = dev.connect(Options::default());
        first_connection(&mut vmm, &mut ctl);
    } // the VMM disconnects abruptly, rings running
    assert!(
        dev.wait_relisten(old_socket),
        "without --once the backend listens again"
    );
    assert_eq!(ctl.capture(None), b"out-1");
    // Injected while no VMM is connected: kept for the next driver.
    assert_eq!(ctl.inject(b"kept across reconnect"), 21);
    std::thread::sleep(SETTLE);
    assert!(dev.is_running());
    assert_eq!(ctl.rx_pending(), 21, "nothing goes to the departed VMM");
    second_connection(&dev, &mut ctl);
}

#[test]
fn reconnect_after_an_orderly_stop_keeps_data_and_counters() {
    let mut dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    {
        let mut vmm = dev.connect(Options::default());
        first_connection(&mut vmm, &mut ctl);
        assert_eq!(
            vmm.stop_rings(),
            vec![1, 1],
            "next available index per queue: the second rx buffer was not taken"
        );
        // Stopped rings take nothing, even before the disconnect.
        assert_eq!(ctl.inject(b"kept across reconnect"), 21);
        std::thread::sleep(SETTLE);
        assert_eq!(vmm.used_idx(RX), 1);
    }
    assert_eq!(ctl.rx_pending(), 21);
    assert_eq!(ctl.capture(None), b"out-1");
    second_connection(&dev, &mut ctl);
    assert!(dev.is_running());
}

#[test]
fn once_mode_exits_when_the_frontend_disconnects() {
    let mut dev = Device::spawn(&["--once"]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    vmm.post_rx(&[(0x10000, 8)]);
    assert_eq!(ctl.inject(PAYLOAD), 8);
    assert!(vmm.wait_used(RX, 1));
    drop(vmm);
    let status = dev.wait_exit(TIMEOUT);
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}; log:\n{}",
        dev.log()
    );
}

// ---- Injected faults (the `fault` control request) ----

fn fault(ctl: &mut Ctl, json: &str) {
    let resp = ctl.raw(&format!(r#"{{"op":"fault","fault":{json}}}"#));
    assert!(resp.ok, "fault {json} refused: {resp:?}");
}

#[test]
fn fault_drop_interrupts_loses_exactly_that_many() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    for addr in [GOOD, GOOD2, GOOD2 + 0x100] {
        vmm.post_rx(&[(addr, 8)]);
    }
    vmm.kick(RX);
    fault(
        &mut ctl,
        r#"{"kind":"drop_interrupts","queue":"rx","count":2}"#,
    );
    let calls = vmm.calls(RX);
    for i in 1..=3u16 {
        ctl.inject(PAYLOAD);
        assert!(vmm.wait_used(RX, i));
        std::thread::sleep(SETTLE);
        let expected = calls + u64::from(i == 3);
        assert_eq!(vmm.calls(RX), expected, "after completion {i}");
    }
    assert_eq!(ctl.stats().interrupts_dropped, 2);
}

#[test]
fn fault_spurious_interrupts_with_nothing_used() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let calls = vmm.calls(TX);
    fault(
        &mut ctl,
        r#"{"kind":"spurious_interrupts","queue":"tx","count":3}"#,
    );
    let s = ctl.wait_stats(|s| s.spurious_interrupts == 3);
    assert_eq!(s.spurious_interrupts, 3);
    std::thread::sleep(SETTLE);
    // An eventfd counts: the three signals may arrive as one wakeup.
    assert!(vmm.calls(TX) > calls, "a call was raised");
    assert_eq!(vmm.used_idx(TX), 0, "nothing in the used ring");
}

#[test]
fn fault_stall_holds_the_queue_then_resumes() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    fault(
        &mut ctl,
        r#"{"kind":"stall","queue":"rx","duration_ms":400}"#,
    );
    let t0 = std::time::Instant::now();
    vmm.post_rx(&[(GOOD, 8)]);
    vmm.kick(RX);
    ctl.inject(PAYLOAD);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(vmm.used_idx(RX), 0, "stalled: nothing completed yet");
    assert!(wait_until(std::time::Duration::from_secs(3), || vmm
        .used_idx(RX)
        == 1));
    assert!(
        t0.elapsed() >= std::time::Duration::from_millis(350),
        "resumed too early"
    );
    assert_eq!(vmm.read(GOOD, 8), PAYLOAD);
    assert!(ctl.stats().stalled_passes >= 1);
}

#[test]
fn fault_corrupt_and_truncate_rx() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    fault(&mut ctl, r#"{"kind":"corrupt_rx","count":1,"seed":3}"#);
    vmm.post_rx(&[(GOOD, 8)]);
    vmm.kick(RX);
    ctl.inject(PAYLOAD);
    assert!(vmm.wait_used(RX, 1));
    let got = vmm.read(GOOD, 8);
    let diffs: Vec<usize> = (0..8).filter(|&i| got[i] != PAYLOAD[i]).collect();
    assert_eq!(diffs.len(), 1, "exactly one byte flipped: {got:?}");
    assert_eq!(got[diffs[0]], PAYLOAD[diffs[0]] ^ 0xff);
    fault(&mut ctl, r#"{"kind":"truncate_rx","count":1}"#);
    vmm.post_rx(&[(GOOD2, 8)]);
    vmm.kick(RX);
    ctl.inject(PAYLOAD);
    assert!(vmm.wait_used(RX, 2));
    assert_eq!(vmm.used_elem(RX, 1).1, 4, "half reported");
    let s = ctl.stats();
    assert_eq!((s.corrupted_buffers, s.truncated_bytes), (1, 4));
    assert_eq!(
        s.rx_bytes + s.truncated_bytes,
        s.injected_bytes,
        "the loss is counted"
    );
}

#[test]
fn fault_requests_with_bad_parameters_are_refused() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let resp = ctl.raw(r#"{"op":"fault","fault":{"kind":"stall","queue":"rx","duration_ms":0}}"#);
    assert!(!resp.ok && resp.error.unwrap().contains("duration_ms"));
    let resp = ctl.raw(r#"{"op":"fault","fault":{"kind":"slow","delay_us":5000000}}"#);
    assert!(!resp.ok && resp.error.unwrap().contains("delay_us"));
}

#[test]
fn fault_interrupt_storm_runs_at_its_rate_then_stops() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let calls = vmm.calls(RX);
    fault(
        &mut ctl,
        r#"{"kind":"interrupt_storm","queue":"rx","rate_hz":2000,"duration_ms":200}"#,
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = ctl.stats().spurious_interrupts;
    // 2000 Hz for 0.2 s is 400 ticks; a loaded 2-core machine loses some.
    assert!(
        (100..=450).contains(&during),
        "{during} spurious interrupts"
    );
    assert!(vmm.calls(RX) > calls);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(ctl.stats().spurious_interrupts, during, "the storm ended");
    assert_eq!(vmm.used_idx(RX), 0);
}

// Hostile-device mode: what each contract violation puts on the used ring.

#[test]
fn hostile_bogus_id_completes_under_an_id_never_posted() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    fault(&mut ctl, r#"{"kind":"hostile_bogus_id","queue":"rx"}"#);
    let h0 = vmm.post_rx(&[(GOOD, 8)]);
    let h1 = vmm.post_rx(&[(GOOD2, 8)]);
    vmm.kick(RX);
    ctl.inject(b"0123456789abcdef");
    assert!(vmm.wait_used(RX, 2));
    let (id, len) = vmm.used_elem(RX, 0);
    assert_eq!(len, 8);
    assert!(
        id != u32::from(h0) && id != u32::from(h1),
        "id {id} was posted (heads {h0}, {h1})"
    );
    assert!(id <= u32::from(QUEUE_SIZE));
    assert_eq!(
        vmm.used_elem(RX, 1),
        (u32::from(h1), 8),
        "one-shot: the next completion is honest"
    );
    assert_eq!(vmm.used_idx(RX), 2);
    assert_eq!(ctl.stats().hostile_bogus_ids, 1);
}

#[test]
fn hostile_overlong_reports_more_than_the_buffer_on_rx_and_tx() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    fault(
        &mut ctl,
        r#"{"kind":"hostile_overlong","queue":"rx","count":2,"by":100}"#,
    );
    fault(&mut ctl, r#"{"kind":"hostile_overlong","queue":"tx"}"#);
    let h0 = vmm.post_rx(&[(GOOD, 8)]);
    let h1 = vmm.post_rx(&[(GOOD2, 8)]);
    let h2 = vmm.post_rx(&[(GOOD2 + 0x100, 8)]);
    vmm.kick(RX);
    ctl.inject(&[7u8; 24]);
    assert!(vmm.wait_used(RX, 3));
    assert_eq!(
        vmm.used_elems(RX, 0, 3),
        [
            (u32::from(h0), 108),
            (u32::from(h1), 108),
            (u32::from(h2), 8)
        ],
        "two overlong completions, then an honest one"
    );
    let t = vmm.post_tx(GOOD2 + 0x200, b"hello");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 1));
    assert_eq!(
        vmm.used_elem(TX, 0),
        (u32::from(t), 5 + 4096),
        "a transmit buffer used with its length plus 4096"
    );
    assert_eq!(ctl.capture(None), b"hello", "the data itself is intact");
    assert_eq!(ctl.stats().hostile_overlong, 3);
}

#[test]
fn hostile_index_jump_moves_the_used_index_past_the_entries() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    // With EVENT_IDX: the interrupt must not be suppressed by bookkeeping
    // that counts entries added (the jump adds none).
    let mut vmm = dev.connect(Options {
        event_idx: true,
        ..Options::default()
    });
    fault(
        &mut ctl,
        r#"{"kind":"hostile_index_jump","queue":"rx","by":3}"#,
    );
    let h0 = vmm.post_rx(&[(GOOD, 8)]);
    let h1 = vmm.post_rx(&[(GOOD2, 8)]);
    vmm.kick(RX);
    let calls = vmm.calls(RX);
    ctl.inject(PAYLOAD);
    assert!(vmm.wait_used(RX, 4));
    assert_eq!(vmm.used_idx(RX), 4, "one entry written, index 3 further");
    assert!(
        wait_until(TIMEOUT, || vmm.calls(RX) > calls),
        "the jump is signalled (the driver must get to see it)"
    );
    assert_eq!(vmm.used_elem(RX, 0), (u32::from(h0), 8));
    assert_eq!(
        vmm.used_elems(RX, 1, 4),
        [(0, 0); 3],
        "the skipped slots are what was there"
    );
    vmm.kick(RX);
    ctl.inject(PAYLOAD);
    assert!(vmm.wait_used(RX, 5));
    assert_eq!(
        vmm.used_elem(RX, 4),
        (u32::from(h1), 8),
        "the device goes on after the jump"
    );
    assert_eq!(vmm.used_idx(RX), 5);
    assert_eq!(ctl.stats().hostile_index_jumps, 1);
}

#[test]
fn hostile_double_complete_uses_the_same_head_twice_n_times() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    fault(
        &mut ctl,
        r#"{"kind":"hostile_double_complete","queue":"all","count":2}"#,
    );
    let h0 = vmm.post_rx(&[(GOOD, 8)]);
    let h1 = vmm.post_rx(&[(GOOD2, 8)]);
    let h2 = vmm.post_rx(&[(GOOD2 + 0x100, 8)]);
    vmm.kick(RX);
    ctl.inject(&[1u8; 24]);
    assert!(vmm.wait_used(RX, 5));
    let (a, b, c) = (u32::from(h0), u32::from(h1), u32::from(h2));
    assert_eq!(
        vmm.used_elems(RX, 0, 5),
        [(a, 8), (a, 8), (b, 8), (b, 8), (c, 8)]
    );
    std::thread::sleep(SETTLE);
    assert_eq!(vmm.used_idx(RX), 5, "count 2: the third buffer is honest");
    let t = vmm.post_tx(GOOD2 + 0x200, b"x");
    vmm.kick(TX);
    assert!(vmm.wait_used(TX, 2));
    assert_eq!(vmm.used_elems(TX, 0, 2), [(u32::from(t), 0); 2]);
    assert_eq!(ctl.stats().hostile_double_completions, 3);
}

#[test]
fn hostile_faults_with_bad_parameters_are_refused_and_clear_disarms() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    let mut vmm = dev.connect(Options::default());
    let resp = ctl.raw(r#"{"op":"fault","fault":{"kind":"hostile_overlong","queue":"rx","by":0}}"#);
    assert!(!resp.ok && resp.error.unwrap().contains("by"));
    let resp =
        ctl.raw(r#"{"op":"fault","fault":{"kind":"hostile_index_jump","queue":"rx","by":40000}}"#);
    assert!(!resp.ok && resp.error.unwrap().contains("by"));
    let resp = ctl.raw(r#"{"op":"fault","fault":{"kind":"hostile_bogus_id","queue":"middle"}}"#);
    assert!(!resp.ok && resp.error.unwrap().contains("rx, tx or all"));
    fault(
        &mut ctl,
        r#"{"kind":"hostile_double_complete","queue":"rx"}"#,
    );
    fault(&mut ctl, r#"{"kind":"clear"}"#);
    let h = vmm.post_rx(&[(GOOD, 8)]);
    vmm.kick(RX);
    ctl.inject(PAYLOAD);
    assert!(vmm.wait_used(RX, 1));
    std::thread::sleep(SETTLE);
    assert_eq!(vmm.all_used(RX), [(u32::from(h), 8)]);
}
