//! The sensor backend driven by replays of each VMM's vhost-user frontend
//! (`vdevlab_device_testkit::vmm`): the messages, in the order and with the
//! flags, that Cloud Hypervisor v52/v53 and QEMU 11 send, from start-up to
//! reconnection (`docs/device-framework.md`, "Testing a device").

mod support;

use support::{Device, CTRL, LAYOUT, SAMPLES, TIMEOUT};
use vdevlab_device_testkit::vmm::{config_read_outside_window, Refusal, Replay, Script, Target};
use vdevlab_device_testkit::Desc;
use vdevlab_sensor::sensor::Sample;

/// The sensor's three queues and its 64-byte config space (QEMU's
/// `config_size=64`).
const TARGET: Target = Target {
    layout: LAYOUT,
    config_size: 64,
};

/// What the Linux driver acknowledges: VERSION_1, EVENT_IDX, INDIRECT_DESC.
const DRIVER_FEATURES: u64 = (1 << 32) | (1 << 29) | (1 << 28);

fn word(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// One control request on the ctrl queue: (used length, status, value).
fn ctrl(r: &mut Replay, cmd: u32, arg0: u32) -> (u32, u32, u32) {
    let vmm = &mut r.vmm;
    let req: Vec<u8> = [cmd, arg0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let (rq, st) = (vmm.buf(16), vmm.buf(8));
    vmm.write(rq, &req);
    vmm.write(st, &[0xee; 8]);
    let before = vmm.used_idx(CTRL);
    let head = vmm.post_chain(CTRL, &[Desc::readable(rq, 16), Desc::writable(st, 8)]);
    vmm.kick(CTRL);
    assert!(
        vmm.wait_used(CTRL, before.wrapping_add(1), TIMEOUT),
        "no answer on the control queue"
    );
    let (id, len) = vmm.used_elem(CTRL, before);
    assert_eq!(id, u32::from(head));
    let s = vmm.read(st, 8);
    (len, word(&s, 0), word(&s, 4))
}

/// Data through the queues: SET_RATE answered on ctrl, one sample
/// delivered on samples with the next sequence number, then stopped.
/// Returns that sample's sequence number.
fn traffic(r: &mut Replay) -> u32 {
    let buf = r.vmm.buf(16);
    let before = r.vmm.used_idx(SAMPLES);
    let head = r.vmm.post_chain(SAMPLES, &[Desc::writable(buf, 16)]);
    r.vmm.kick(SAMPLES);
    assert_eq!(ctrl(r, 1, 1000), (8, 0, 1000), "SET_RATE 1000");
    assert!(
        r.vmm.wait_used(SAMPLES, before.wrapping_add(1), TIMEOUT),
        "no sample delivered"
    );
    assert_eq!(r.vmm.used_elem(SAMPLES, before), (head.into(), 16));
    let sample = Sample::from_bytes(&r.vmm.read(buf, 16)).expect("a sample record");
    assert_eq!(ctrl(r, 1, 0), (8, 0, 0), "SET_RATE 0");
    sample.seq
}

/// The whole life of the device under `script`, as for qw: config before
/// features, activation, data, config after features, a refused write, a
/// reset and re-activation, a reconnect.
fn replay(script: Script) {
    let mut dev = Device::spawn(&["--seed", "7"]);
    let mut r = Replay::start(script, &dev, TARGET);
    let name = script.name();

    let cfg = r.guest_read_config(0, 64).expect("the whole config space");
    assert_eq!(&cfg[0..4], b"SNSR", "{name}: magic");
    assert_eq!(
        (word(&cfg, 4), word(&cfg, 8), word(&cfg, 0x20)),
        (1, 16, 7),
        "{name}: version, sample size, seed"
    );
    assert_eq!(
        r.guest_read_config(0x10, 4).expect("a partial read"),
        10000u32.to_le_bytes(),
        "{name}: max_rate_hz alone"
    );
    let sent = r.sent().len();
    let past = r.guest_read_config(64, 4).expect("a read past the layout");
    match script {
        Script::CloudHypervisor => assert_eq!(past, [0; 4], "{name}: zeros past the layout"),
        Script::Qemu11 => {
            assert_eq!(past, [0xff; 4]);
            assert_eq!(r.sent().len(), sent, "QEMU sends nothing for it");
        }
    }

    r.activate(DRIVER_FEATURES);
    assert_eq!(traffic(&mut r), 0, "{name}: the first sample");

    let cfg = r.guest_read_config(0, 64).expect("config after features");
    assert_eq!(word(&cfg, 0x14), 0, "{name}: stopped again");
    // A write to rate_hz: refused, acknowledged, nothing changes.
    r.guest_write_config(0x14, &50u32.to_le_bytes())
        .expect("the refused write is acknowledged");
    assert!(dev.log().contains("config-space write refused"));
    assert_eq!(
        r.guest_read_config(0, 64).expect("config after the write"),
        cfg,
        "{name}: the write changed nothing"
    );
    let seq = traffic(&mut r);
    assert!(seq >= 1, "{name}: sampling resumed at seq {seq}");

    // Reset: the rings stop where they were and the sensor is at power-on.
    assert_eq!(
        r.reset(),
        vec![2, 0, 4],
        "{name}: next available index per queue"
    );
    r.reactivate(DRIVER_FEATURES);
    assert_eq!(traffic(&mut r), 0, "{name}: power-on after the reset");

    r.reconnect(&dev);
    if script == Script::Qemu11 {
        assert_eq!(&r.guest_read_config(0, 4).unwrap(), b"SNSR");
        r.activate(DRIVER_FEATURES);
    }
    traffic(&mut r);
    let st = dev.control().stats();
    assert_eq!(st["bad_chains"], 0, "{name}: {st:?}");
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

/// A GET_CONFIG outside the vhost-user window (no VMM sends one): no hang,
/// no crash, and the next VMM finds the backend serving.
#[test]
fn config_read_outside_the_window_is_refused_and_the_backend_serves_on() {
    let mut dev = Device::spawn(&[]);
    let old = dev.socket_id();
    let outcome = config_read_outside_window(&dev, 0xff0, 64);
    assert!(
        matches!(outcome, Refusal::ErrorReply | Refusal::Closed),
        "{outcome:?}; log:\n{}",
        dev.log()
    );
    assert!(dev.is_running());
    if outcome == Refusal::Closed {
        assert!(dev.wait_relisten(old, TIMEOUT), "the backend listens again");
    }
    for script in Script::ALL {
        let mut r = Replay::start(script, &dev, TARGET);
        assert_eq!(&r.guest_read_config(0, 4).unwrap(), b"SNSR");
        r.activate(DRIVER_FEATURES);
        traffic(&mut r);
        let old = dev.socket_id();
        drop(r);
        assert!(dev.wait_relisten(old, TIMEOUT));
    }
}
