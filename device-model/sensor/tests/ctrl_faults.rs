//! Control-queue faults (`docs/sensor-spec.md`, "Control-queue faults")
//! over the real vhost-user protocol: the real `vdevlab-sensor` binary,
//! the testkit's in-process frontend, the host's `ctrl_fault` requests.
//! Each fault must do exactly what it says (an error status, a late
//! answer, no answer) and the control queue must work again afterwards.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Desc, Device, Vmm, CTRL, TIMEOUT};

/// A control request posted and kicked but not waited for.
struct Pending {
    before: u16,
    head: u16,
    status: u64,
    sent: Instant,
}

/// Post `SET_RATE hz` on the control queue and kick.
fn post_set_rate(vmm: &mut Vmm, hz: u32) -> Pending {
    let req: Vec<u8> = [1, hz, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_le_bytes())
        .collect();
    let r = vmm.buf(16);
    let s = vmm.buf(8);
    vmm.write(r, &req);
    vmm.write(s, &[0xee; 8]);
    let before = vmm.used_idx(CTRL);
    let head = vmm.post(CTRL, &[Desc::r(r, 16), Desc::w(s, 8)]);
    let sent = Instant::now();
    vmm.kick(CTRL);
    Pending {
        before,
        head,
        status: s,
        sent,
    }
}

/// Whether `p` was answered within `timeout`; then (used length, status,
/// value, time from the kick to the answer being seen).
fn answer(vmm: &Vmm, p: &Pending, timeout: Duration) -> Option<(u32, u32, u32, Duration)> {
    if !vmm.wait_used(CTRL, p.before.wrapping_add(1), timeout) {
        return None;
    }
    let took = p.sent.elapsed();
    let (id, len) = vmm.used(CTRL, p.before);
    assert_eq!(id, p.head, "the answer is for the request posted");
    let st = vmm.read(p.status, 8);
    let w = |o: usize| u32::from_le_bytes(st[o..o + 4].try_into().unwrap());
    Some((len, w(0), w(4), took))
}

fn rate(dev: &Device) -> u64 {
    dev.control().sensor()["rate_hz"].as_u64().unwrap()
}

/// `status`: the next N requests get the injected status (also one the
/// specification does not define) and are not carried out; the one after
/// is answered as usual.
#[test]
fn injected_error_statuses_change_nothing() {
    let dev = Device::spawn(&[]);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    let armed = ctl.ok(json!({"op": "ctrl_fault", "mode": "status", "count": 2, "status": 9}));
    assert_eq!(armed["ctrl_faults"]["status"], 2);
    assert_eq!(vmm.ctrl(1, 100, 0, 0), (8, 9, 0));
    assert_eq!(
        rate(&dev),
        0,
        "a request answered with an error changes nothing"
    );
    ctl.ok(json!({"op": "ctrl_fault", "mode": "status"}));
    // Arming again adds to the count; the last status armed is answered.
    assert_eq!(vmm.ctrl(1, 100, 0, 0), (8, 1, 0), "INVALID, the default");
    assert_eq!(vmm.ctrl(2, 5, 1, 0), (8, 1, 0));
    assert_eq!(
        vmm.ctrl(1, 100, 0, 0),
        (8, 0, 100),
        "then answered as usual"
    );
    let st = ctl.stats();
    assert_eq!(st["ctrl_fault_status"], 3);
    assert_eq!(st["ctrl_errors"], 3);
    assert_eq!(st["ctrl_requests"], 4);
    assert_eq!(st["bad_chains"], 0);
    vmm.set_rate(0);
}

/// `late`: the answer comes no sooner than the delay (and not much
/// later), and the request takes effect when it is answered.
#[test]
fn late_answers_come_after_the_delay() {
    let dev = Device::spawn(&[]);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    ctl.ok(json!({"op": "ctrl_fault", "mode": "late", "delay_ms": 300}));
    let p = post_set_rate(&mut vmm, 50);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(vmm.used_idx(CTRL), p.before, "answered before the delay");
    assert_eq!(ctl.counter("ctrl_held"), 1);
    assert_eq!(rate(&dev), 0, "carried out before it was answered");
    let (len, status, value, took) =
        answer(&vmm, &p, Duration::from_secs(5)).expect("the late answer came");
    assert_eq!((len, status, value), (8, 0, 50));
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );
    assert!(
        took < Duration::from_millis(2300),
        "answered after {took:?}"
    );
    assert_eq!(rate(&dev), 50);
    let st = ctl.stats();
    assert_eq!(
        (st["ctrl_fault_late"].as_u64(), st["ctrl_held"].as_u64()),
        (Some(1), Some(0))
    );
    // The next request is answered at once.
    vmm.set_rate(0);
}

/// `never` then `clear`: the request stays with the device (its buffers
/// are not given back, nothing is carried out) until the host releases
/// it; then it is answered and carried out, and the queue works.
#[test]
fn a_held_request_is_answered_when_released() {
    let dev = Device::spawn(&[]);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    ctl.ok(json!({"op": "ctrl_fault", "mode": "never"}));
    let p = post_set_rate(&mut vmm, 20);
    assert!(
        answer(&vmm, &p, Duration::from_millis(700)).is_none(),
        "answered"
    );
    assert_eq!(ctl.counter("ctrl_held"), 1);
    assert_eq!(rate(&dev), 0);
    let cleared = ctl.ok(json!({"op": "ctrl_fault", "mode": "clear"}));
    assert_eq!(cleared["ctrl_faults"]["held"], false);
    let (len, status, value, _) = answer(&vmm, &p, TIMEOUT).expect("released");
    assert_eq!((len, status, value), (8, 0, 20));
    assert_eq!(rate(&dev), 20);
    let st = ctl.stats();
    assert_eq!(
        (
            st["ctrl_fault_never"].as_u64(),
            st["ctrl_fault_released"].as_u64(),
            st["ctrl_held"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    vmm.set_rate(0);
}

/// `never` then a driver reset: the device forgets the held request (the
/// driver has its buffers back) and the fresh queue works at once.
#[test]
fn a_reset_forgets_the_held_request() {
    let dev = Device::spawn(&[]);
    let mut vmm = dev.connect();
    let mut ctl = dev.control();
    ctl.ok(json!({"op": "ctrl_fault", "mode": "never", "count": 1}));
    let p = post_set_rate(&mut vmm, 20);
    assert!(answer(&vmm, &p, Duration::from_millis(300)).is_none());
    vmm.reset_device();
    let st = ctl.stats();
    assert_eq!(
        (st["ctrl_held"].as_u64(), st["ctrl_fault_reset"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(rate(&dev), 0, "the held request was never carried out");
    vmm.set_rate(30);
    assert_eq!(rate(&dev), 30);
    vmm.set_rate(0);
}

/// Bad `ctrl_fault` requests are refused with the reason.
#[test]
fn bad_ctrl_fault_requests_are_explained() {
    let dev = Device::spawn(&[]);
    let mut ctl = dev.control();
    assert!(ctl
        .err(json!({"op": "ctrl_fault", "mode": "late"}))
        .contains("delay_ms"));
    assert!(ctl
        .err(json!({"op": "ctrl_fault", "mode": "status", "status": 0}))
        .contains("OK"));
    assert!(ctl
        .err(json!({"op": "ctrl_fault", "mode": "sometimes"}))
        .contains("status, late, never or clear"));
}
