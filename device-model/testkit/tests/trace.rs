//! The device trace over real vhost-user: the kit's fill device
//! (`vdevlab-fill`) is traced from the control plane (or the `--trace`
//! flag) while the kit plays the VMM and the driver; the dumped events are
//! checked for order and fields. Each test says what it checks; every wait
//! is bounded.

use std::time::Duration;

use serde_json::{json, Value};
use vdevlab_device_testkit::{Config, Desc, Device, Layout, Options, Vmm, AVAIL_F_NO_INTERRUPT};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;

const LAYOUT: Layout = Layout {
    queues: 1,
    queue_size: 256,
    mem_size: 1 << 20,
    data_base: 0x10000,
};
const CONFIG: Config = Config {
    layout: LAYOUT,
    features: 0,
};
const TIMEOUT: Duration = Duration::from_secs(10);
const Q: usize = 0;
const LEN: u32 = 64;

fn device(extra: &[&str]) -> Device {
    Device::spawn(env!("CARGO_BIN_EXE_vdevlab-fill"), extra)
}

/// Post `n` writable buffers of [`LEN`] bytes, kick, wait for them all.
fn fill(vmm: &mut Vmm, n: u16) {
    let start = vmm.used_idx(Q);
    for _ in 0..n {
        let b = vmm.buf(LEN);
        vmm.post_chain(Q, &[Desc::writable(b, LEN)]);
    }
    vmm.kick(Q);
    assert!(
        vmm.wait_used(Q, start.wrapping_add(n), TIMEOUT),
        "the device completed {} of {n} buffers",
        vmm.used_idx(Q).wrapping_sub(start)
    );
}

/// The dumped events, each as a JSON object.
fn events(dump: &serde_json::Map<String, Value>) -> Vec<Value> {
    dump["events"].as_array().expect("events").clone()
}

fn named<'a>(events: &'a [Value], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event"] == name).collect()
}

fn position(events: &[Value], want: &Value) -> usize {
    let fields = want.as_object().unwrap();
    events
        .iter()
        .position(|e| fields.iter().all(|(k, v)| &e[k] == v))
        .unwrap_or_else(|| panic!("no event {want} in {events:#?}"))
}

/// Tracing switched on through the control plane records, in order: the
/// kick, each chain popped (its writable length) or refused (and why), the
/// device's own event, each used element (id, length), the interrupt
/// raised; after the driver sets NO_INTERRUPT, the interrupt suppressed
/// and why; a config read; the control request. Timestamps never go
/// backwards on one thread, and the control plane's thread is not the
/// queue worker's.
#[test]
fn traced_from_the_control_plane_chains_and_interrupts_come_in_order() {
    let dev = device(&[]);
    let mut vmm = dev.vmm(CONFIG);
    let mut ctl = dev.ctl();
    let on = ctl.ok(json!({"op":"trace","on":true,"capacity":1024}));
    assert_eq!(on.get("error"), None);
    // The control request kicks the worker for a pass (which finds
    // nothing): let it run first, so that the chains below are found by
    // the driver's kick.
    std::thread::sleep(Duration::from_millis(200));

    // Two good buffers and one the device must refuse (device-readable on
    // a device-writable queue), one kick.
    let good = [vmm.buf(LEN), vmm.buf(LEN)];
    for b in good {
        vmm.post_chain(Q, &[Desc::writable(b, LEN)]);
    }
    let bad = vmm.buf(LEN);
    vmm.post_chain(Q, &[Desc::readable(bad, LEN)]);
    vmm.kick(Q);
    assert!(vmm.wait_used(Q, 3, TIMEOUT), "3 buffers completed");
    assert!(
        kit_wait(|| vmm.calls(Q) == 1),
        "one interrupt for the first batch"
    );

    // The driver asks for no interrupt: the next completion is suppressed.
    vmm.set_avail_flags(Q, AVAIL_F_NO_INTERRUPT);
    fill(&mut vmm, 1);
    vmm.fe
        .get_config(0, 4, VhostUserConfigFlags::empty(), &[0u8; 4])
        .expect("GET_CONFIG");

    let dump = ctl.ok(json!({"op":"trace_dump"}));
    assert_eq!(dump["on"], true);
    assert_eq!(dump["dropped"], 0, "a 1024-event ring did not fill");
    let ev = events(&dump);

    let queue_events: Vec<Value> = ev
        .iter()
        .filter(|e| e["event"] != "kick" && e["event"] != "control" && e["event"] != "config_read")
        .cloned()
        .collect();
    let strip = |e: &Value| {
        let mut e = e.clone();
        let o = e.as_object_mut().unwrap();
        o.remove("t_ns");
        o.remove("tid");
        if o.contains_key("why") && o["event"] == "chain_refused" {
            assert!(
                o["why"].as_str().is_some_and(|w| !w.is_empty()),
                "a refusal says why: {e}"
            );
            e.as_object_mut().unwrap().remove("why");
        }
        e
    };
    let got: Vec<Value> = queue_events.iter().map(strip).collect();
    let popped =
        |head| json!({"event":"chain_popped","queue":0,"head":head,"readable":0,"writable":LEN});
    let filled = json!({"event":"device","name":"filled","value":LEN});
    let used = |id, len| json!({"event":"used_pushed","queue":0,"id":id,"len":len});
    assert_eq!(
        got,
        vec![
            popped(0),
            filled.clone(),
            popped(1),
            filled.clone(),
            json!({"event":"chain_refused","queue":0,"head":2}),
            used(0, LEN),
            used(1, LEN),
            used(2, 0),
            json!({"event":"irq_raised","queue":0,"forced":false}),
            popped(3),
            filled,
            used(3, LEN),
            json!({"event":"irq_suppressed","queue":0,"why":"no_interrupt"}),
        ],
        "the queue's events, in order"
    );

    // Each batch was started by a kick of queue 0.
    let kicks = named(&ev, "kick");
    assert!(
        kicks.len() >= 2 && kicks.iter().all(|k| k["queue"] == 0),
        "{kicks:?}"
    );
    assert!(position(&ev, &json!({"event":"kick"})) < position(&ev, &popped(0)));
    let second_kick = ev
        .iter()
        .rposition(|e| e["event"] == "kick")
        .expect("a kick");
    assert!(second_kick < position(&ev, &popped(3)));
    assert!(
        position(&ev, &json!({"event":"config_read","offset":0,"len":4}))
            > position(&ev, &used(3, LEN))
    );
    let control = named(&ev, "control");
    assert_eq!(
        control.last().map(|c| c["op"].clone()),
        Some(json!("trace_dump")),
        "the dump request itself is the newest event"
    );

    // Timestamps: non-decreasing per thread; two threads at least.
    let worker = ev[position(&ev, &popped(0))]["tid"].as_u64().unwrap();
    let plane = control[0]["tid"].as_u64().unwrap();
    assert_ne!(
        worker, plane,
        "control plane and queue worker are two threads"
    );
    for tid in [worker, plane] {
        let ts: Vec<u64> = ev
            .iter()
            .filter(|e| e["tid"].as_u64() == Some(tid))
            .map(|e| e["t_ns"].as_u64().unwrap())
            .collect();
        assert!(ts.windows(2).all(|w| w[0] <= w[1]), "thread {tid}: {ts:?}");
    }

    // Off: the request switching it off is the last event recorded.
    ctl.ok(json!({"op":"trace","on":false}));
    vmm.set_avail_flags(Q, 0);
    fill(&mut vmm, 1);
    let after = ctl.ok(json!({"op":"trace_dump"}));
    assert_eq!(after["on"], false);
    let names: Vec<Value> = events(&after)
        .iter()
        .map(|e| json!([e["event"], e["op"]]))
        .collect();
    assert_eq!(names, vec![json!(["control", "trace"])]);
}

fn kit_wait(cond: impl FnMut() -> bool) -> bool {
    vdevlab_device_testkit::wait_until(TIMEOUT, cond)
}

/// A ring of 4 events that sees more keeps the newest 4, oldest dropped
/// first, and the dump says how many were dropped.
#[test]
fn a_full_ring_drops_the_oldest_and_the_dump_says_so() {
    let dev = device(&[]);
    let mut vmm = dev.vmm(CONFIG);
    let mut ctl = dev.ctl();
    ctl.ok(json!({"op":"trace","on":true,"capacity":4}));
    // As above: the request's own pass first, then the chains.
    std::thread::sleep(Duration::from_millis(200));
    fill(&mut vmm, 4);
    assert!(kit_wait(|| vmm.calls(Q) >= 1), "the interrupt came");
    let dump = ctl.ok(json!({"op":"trace_dump"}));
    let ev = events(&dump);
    assert_eq!(ev.len(), 4, "{ev:#?}");
    assert_eq!(dump["capacity"], 4);
    // 4 chains x (popped, device, used) + kick + interrupt + the dump
    // request: at least 15 events, 4 kept.
    let dropped = dump["dropped"].as_u64().unwrap();
    assert!(dropped >= 11, "dropped {dropped}");
    let names: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["used_pushed", "used_pushed", "irq_raised", "control"],
        "the newest four"
    );
    assert_eq!(ev[1]["id"], 3, "the last buffer's completion is kept");
    let again = ctl.ok(json!({"op":"trace_dump"}));
    assert_eq!(again["dropped"], 0, "a dump resets the dropped count");
}

/// `--trace` traces from the start (the VMM's connection included); a
/// capacity out of range is refused with the limit; without the flag the
/// trace is off.
#[test]
fn the_daemon_flag_traces_from_the_start() {
    let dev = device(&["--trace", "--trace-capacity", "256"]);
    let mut vmm = dev.vmm(CONFIG);
    fill(&mut vmm, 1);
    let mut ctl = dev.ctl();
    let dump = ctl.ok(json!({"op":"trace_dump"}));
    assert_eq!(
        (dump["on"].clone(), dump["capacity"].clone()),
        (json!(true), json!(256))
    );
    let ev = events(&dump);
    assert!(
        position(&ev, &json!({"event":"vmm_connected"}))
            < position(&ev, &json!({"event":"used_pushed","id":0})),
        "{ev:#?}"
    );
    let err = ctl.err(json!({"op":"trace","on":true,"capacity":0}));
    assert!(err.contains("capacity must be 1..="), "{err}");

    let plain = device(&[]);
    let mut vmm = plain.vmm(CONFIG);
    fill(&mut vmm, 1);
    let dump = plain.ctl().ok(json!({"op":"trace_dump"}));
    assert_eq!(dump["on"], false);
    assert_eq!(events(&dump), Vec::<Value>::new());
}

/// The interrupt events say why an interrupt was held or lost: a
/// coalescing policy holds it until its timer raises it; a
/// `drop_interrupts` fault (itself traced, with its kind) loses it.
#[test]
fn held_and_lost_interrupts_say_why() {
    let dev = device(&["--trace"]);
    let mut vmm = dev.vmm(CONFIG);
    let mut ctl = dev.ctl();
    ctl.ok(json!({"op":"interrupt_mode","queue":"q",
        "irq":{"mode":"coalesce","count":4,"usecs":50_000}}));
    fill(&mut vmm, 1);
    assert!(
        kit_wait(|| vmm.calls(Q) == 1),
        "the coalescing timer raised it"
    );
    ctl.ok(json!({"op":"interrupt_mode","queue":"q","irq":{"mode":"immediate"}}));
    ctl.ok(json!({"op":"fault","fault":{"kind":"drop_interrupts","queue":"q","count":1}}));
    fill(&mut vmm, 1);
    let ev = events(&ctl.ok(json!({"op":"trace_dump"})));
    let irq: Vec<Value> = ev
        .iter()
        .filter(|e| {
            let name = e["event"].as_str().unwrap_or("");
            name.starts_with("irq_") || name == "fault"
        })
        .map(|e| json!([e["event"], e["why"], e["kind"]]))
        .collect();
    assert_eq!(
        irq,
        vec![
            json!(["irq_suppressed", "coalescing", null]),
            json!(["irq_raised", null, null]),
            json!(["fault", null, "drop_interrupts"]),
            json!(["irq_suppressed", "injected_fault", null]),
        ],
        "{ev:#?}"
    );
    assert_eq!(vmm.calls(Q), 1, "the dropped interrupt never came");
}

/// The queue and VMM life cycle: a device reset shows each queue stopped
/// and the reset, the next kick the queue started again; the VMM leaving
/// is the last event.
#[test]
fn reset_and_disconnect_are_traced() {
    let dev = device(&["--trace"]);
    let mut vmm = dev.vmm(CONFIG);
    fill(&mut vmm, 1);
    vmm.reset_device();
    fill(&mut vmm, 1);
    drop(vmm);
    let mut ctl = dev.ctl();
    let mut ev = Vec::new();
    let left = kit_wait(|| {
        ev.extend(events(&ctl.ok(json!({"op":"trace_dump"}))));
        !named(&ev, "vmm_disconnected").is_empty()
    });
    assert!(left, "no vmm_disconnected in {ev:#?}");
    let at = |want: Value| position(&ev, &want);
    let stopped = at(json!({"event":"queue_stopped","queue":0}));
    let reset = at(json!({"event":"device_reset"}));
    let started = at(json!({"event":"queue_started","queue":0}));
    let second = ev
        .iter()
        .rposition(|e| e["event"] == "used_pushed")
        .unwrap();
    assert!(
        at(json!({"event":"vmm_connected"})) < stopped
            && stopped < reset
            && reset < started
            && started < second
            && second < at(json!({"event":"vmm_disconnected"})),
        "{ev:#?}"
    );
}

/// With EVENT_IDX negotiated, a completion the driver's `used_event` does
/// not ask about is suppressed, and the trace says `event_idx`.
#[test]
fn an_event_idx_suppression_says_event_idx() {
    let dev = device(&["--trace"]);
    let mut vmm = dev.vmm(Config {
        layout: LAYOUT,
        features: 1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    });
    fill(&mut vmm, 1);
    assert!(
        kit_wait(|| vmm.calls(Q) == 1),
        "used_event 0 asks for the first"
    );
    vmm.set_used_event(Q, 100);
    fill(&mut vmm, 1);
    let ev = events(&dev.ctl().ok(json!({"op":"trace_dump"})));
    let irq: Vec<Value> = ev
        .iter()
        .filter(|e| e["event"].as_str().is_some_and(|n| n.starts_with("irq_")))
        .map(|e| json!([e["event"], e["why"]]))
        .collect();
    assert_eq!(
        irq,
        vec![
            json!(["irq_raised", null]),
            json!(["irq_suppressed", "event_idx"])
        ],
        "{ev:#?}"
    );
}

/// Config space: a VMM's write is traced (offset, length), and the config
/// change the device raises for it, then its delivery (acknowledged).
#[test]
fn a_config_write_and_its_config_change_are_traced() {
    let dev = Device::spawn(env!("CARGO_BIN_EXE_vdevlab-cfgdev"), &["--trace"]);
    // With the backend channel (BACKEND_REQ), as QEMU does.
    let mut vmm = dev.vmm_with(CONFIG, Options::default());
    vmm.fe
        .set_config(4, VhostUserConfigFlags::WRITABLE, &7u32.to_le_bytes())
        .expect("SET_CONFIG");
    let mut ctl = dev.ctl();
    let mut ev = Vec::new();
    let delivered = kit_wait(|| {
        ev.extend(events(&ctl.ok(json!({"op":"trace_dump"}))));
        !named(&ev, "config_change_delivered").is_empty()
    });
    assert!(delivered, "no delivery in {ev:#?}");
    let write = position(&ev, &json!({"event":"config_write","offset":4,"len":4}));
    let raised = position(&ev, &json!({"event":"config_change_raised"}));
    let ticket = ev[raised]["ticket"].clone();
    assert!(ticket.as_u64().is_some_and(|t| t > 0), "{ev:#?}");
    let done = position(
        &ev,
        &json!({"event":"config_change_delivered","ticket":ticket,"delivery":"acked"}),
    );
    assert!(write < raised && raised < done, "{ev:#?}");
}
