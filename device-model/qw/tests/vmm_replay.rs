//! The qw backend driven by replays of each VMM's vhost-user frontend
//! (`vdevlab_device_testkit::vmm`): the messages, in the order and with the
//! flags, that Cloud Hypervisor v52/v53 and QEMU 11 send, from start-up to
//! reconnection, so a change that breaks one VMM's path fails here without
//! that VMM (`docs/device-framework.md`, "Testing a device").

mod support;

use std::time::Duration;

use support::*;
use vdevlab_device_testkit::vmm::{config_read_outside_window, Refusal, Replay, Script, Target};

/// qw's queues and its 48-byte config space (QEMU's `config_size=48`).
const TARGET: Target = Target {
    layout: LAYOUT,
    config_size: 48,
};

/// What the Linux driver acknowledges: VERSION_1, EVENT_IDX, INDIRECT_DESC.
const DRIVER_FEATURES: u64 = (1 << 32) | (1 << 29) | (1 << 28);

fn word(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// One round trip the driver makes: `tag` injected on the host comes in
/// on rx, and goes out on tx into the capture.
fn traffic(r: &mut Replay, ctl: &mut Ctl, tag: &[u8]) {
    let vmm = &mut r.vmm;
    let len = tag.len() as u32;
    let rx_before = vmm.used_idx(RX);
    let buf = vmm.buf(64);
    let head = vmm.post_chain(RX, &[Desc::writable(buf, 64)]);
    vmm.kick(RX);
    assert_eq!(ctl.inject(tag), tag.len());
    assert!(
        vmm.wait_used(RX, rx_before.wrapping_add(1), TIMEOUT),
        "rx: nothing used; used ring {:?}",
        vmm.all_used(RX)
    );
    assert_eq!(vmm.used_elem(RX, rx_before), (head.into(), len));
    assert_eq!(vmm.read(buf, tag.len()), tag);

    let tx_before = vmm.used_idx(TX);
    let out = vmm.buf(64);
    vmm.write(out, tag);
    let head = vmm.post_chain(TX, &[Desc::readable(out, len)]);
    vmm.kick(TX);
    assert!(
        vmm.wait_used(TX, tx_before.wrapping_add(1), TIMEOUT),
        "tx: nothing used"
    );
    assert_eq!(vmm.used_elem(TX, tx_before).0, u32::from(head));
    assert_eq!(ctl.capture(None), tag);
}

/// The whole life of the device under `script`: config reads before
/// features (whole, partial, past the layout), activation, data, config
/// after features, a refused write, a device reset and re-activation, and
/// a reconnect, with data after each.
fn replay(script: Script) {
    let mut dev = Device::spawn(&["--rx-fifo-bytes", "5000"]);
    let mut ctl = dev.control();
    let mut r = Replay::start(script, &dev, TARGET);
    let name = script.name();

    // The guest probes the device: config before feature negotiation.
    let cfg = r.guest_read_config(0, 48).expect("the whole config space");
    assert_eq!(&cfg[0..4], b"QWDV", "{name}: magic");
    assert_eq!(
        (word(&cfg, 4), word(&cfg, 0x0c)),
        (1, 5000),
        "{name}: version, rx FIFO"
    );
    assert_eq!(
        r.guest_read_config(4, 4).expect("a partial read"),
        1u32.to_le_bytes(),
        "{name}: the version word alone"
    );
    let sent = r.sent().len();
    let past = r
        .guest_read_config(48, 4)
        .expect("a read past the layout is answered (Cloud Hypervisor panics otherwise)");
    match script {
        // Forwarded as GET_CONFIG(48, 4): the backend reads zeros there.
        Script::CloudHypervisor => assert_eq!(past, [0; 4], "{name}: zeros past the layout"),
        // Past config_size: QEMU answers all ones and sends nothing.
        Script::Qemu11 => {
            assert_eq!(past, [0xff; 4]);
            assert_eq!(r.sent().len(), sent, "QEMU sends nothing for it");
        }
    }
    assert_eq!(
        r.guest_read_config(0x2c, 4).expect("the last word"),
        [0; 4],
        "{name}: irq_modes, all immediate"
    );

    // DRIVER_OK.
    r.activate(DRIVER_FEATURES);
    traffic(&mut r, &mut ctl, b"first");

    // Config after feature negotiation: still served, live.
    let cfg = r.guest_read_config(0, 48).expect("config after features");
    assert_eq!(&cfg[0..4], b"QWDV");
    assert_eq!(word(&cfg, 0x14), 0, "{name}: status healthy");
    // A guest's config write: refused by the device, acknowledged to the
    // VMM (an error would end the connection), nothing changes.
    r.guest_write_config(0x14, &[0xff; 4])
        .expect("the refused write is acknowledged");
    assert!(dev.log().contains("config-space write refused"));
    assert_eq!(
        r.guest_read_config(0, 48).expect("config after the write"),
        cfg,
        "{name}: the write changed nothing"
    );
    traffic(&mut r, &mut ctl, b"second");

    // The driver resets the device: the rings stop where they were.
    assert_eq!(
        r.reset(),
        vec![2, 2],
        "{name}: next available index per queue"
    );
    assert_eq!(ctl.inject(b"held"), 4);
    std::thread::sleep(SETTLE);
    assert_eq!(ctl.rx_pending(), 4, "{name}: stopped rings take nothing");
    // ... and sets it up again: the held bytes come first.
    r.reactivate(DRIVER_FEATURES);
    let buf = r.vmm.buf(64);
    let head = r.vmm.post_chain(RX, &[Desc::writable(buf, 64)]);
    r.vmm.kick(RX);
    assert!(
        r.vmm.wait_used(RX, 1, TIMEOUT),
        "{name}: rx after re-activation"
    );
    assert_eq!(r.vmm.used_elem(RX, 0), (head.into(), 4));
    assert_eq!(r.vmm.read(buf, 4), b"held");
    traffic(&mut r, &mut ctl, b"third");

    // The connection ends and the VMM comes back.
    r.reconnect(&dev);
    if script == Script::Qemu11 {
        let cfg = r.guest_read_config(0, 48).expect("config on the new QEMU");
        assert_eq!(&cfg[0..4], b"QWDV");
        r.activate(DRIVER_FEATURES);
    }
    traffic(&mut r, &mut ctl, b"after reconnect");

    let s = ctl.wait_stats(|s| s.tx_buffers >= 4);
    assert_eq!(
        (s.rx_buffers, s.rx_bytes, s.tx_buffers, s.tx_bytes),
        (5, 5 + 6 + 4 + 5 + 15, 4, 5 + 6 + 5 + 15),
        "{name}: counters across the reset and the reconnect"
    );
    let running = dev.is_running();
    r.assert_backend_served(running, &dev.log());
}

#[test]
fn cloud_hypervisor_v53_replay() {
    replay(Script::CloudHypervisor);
}

#[test]
fn qemu11_replay() {
    replay(Script::Qemu11);
}

/// QEMU's largest config window, more than qw's layout: the rest reads as
/// zeros (a `config_size` set too large still works).
#[test]
fn qemu11_config_window_larger_than_the_layout_reads_zeros() {
    let dev = Device::spawn(&[]);
    let target = Target {
        config_size: vdevlab_device_testkit::vmm::QEMU_MAX_CONFIG_SIZE,
        ..TARGET
    };
    let mut r = Replay::start(Script::Qemu11, &dev, target);
    let cfg = r
        .guest_read_config(0, target.config_size)
        .expect("256 bytes");
    assert_eq!(&cfg[0..4], b"QWDV");
    assert!(cfg[48..].iter().all(|&b| b == 0), "{cfg:?}");
}

/// A GET_CONFIG outside the vhost-user config window, which neither VMM
/// sends: the backend must neither hang nor die, and the next VMM must
/// find it serving.
#[test]
fn config_read_outside_the_window_is_refused_and_the_backend_serves_on() {
    let mut dev = Device::spawn(&[]);
    let old = dev.socket_id();
    let outcome = config_read_outside_window(&dev, 0xffc, 8);
    assert!(
        matches!(outcome, Refusal::ErrorReply | Refusal::Closed),
        "{outcome:?}; log:\n{}",
        dev.log()
    );
    assert!(dev.is_running());
    if outcome == Refusal::Closed {
        assert!(dev.wait_relisten(old), "the backend listens again");
    }
    std::thread::sleep(Duration::from_millis(10));
    let mut ctl = dev.control();
    for script in Script::ALL {
        let mut r = Replay::start(script, &dev, TARGET);
        assert_eq!(&r.guest_read_config(0, 4).unwrap(), b"QWDV");
        r.activate(DRIVER_FEATURES);
        traffic(&mut r, &mut ctl, script.name().as_bytes());
        let old = dev.socket_id();
        drop(r);
        assert!(dev.wait_relisten(old));
    }
}
