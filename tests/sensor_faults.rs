//! The sensor's control-queue faults (`docs/sensor-spec.md`, "Control-queue
//! faults") in a booted guest: the real `vdevlab-sensor` backend answers
//! control requests with error statuses, late or never (`ctrl_fault`), and
//! the real `vdevlab_sensor` driver must turn each into its documented
//! result (an errno, `ETIMEDOUT` after `ctrl_timeout_ms`, `EBUSY` while the
//! device still owns the buffers, `ENODEV` for a waiter at removal), with
//! no kernel splat. One boot runs the three guest scenarios
//! (`sensor-ctrl-status`, `sensor-ctrl-late`, `sensor-ctrl-lost`).

use serde_json::{json, Value};
use vdevlab_lab::cell::Cell;
use vdevlab_lab::env::Kernel;
use vdevlab_lab::scenario::{GuestResult, Step};
use vdevlab_lab::sensor::{self, SensorArtifacts};
use vdevlab_lab::Lab;
use vdevlab_tests::{assert_passed, lab};

/// The lab with the sensor's backend and drivers built (once per process).
fn sensor_lab() -> (Lab, SensorArtifacts, Kernel) {
    let lab = lab();
    let art = vdevlab_tests::sensor_artifacts(&lab);
    let kernel = lab.env.default_kernel().clone();
    (lab, art, kernel)
}

fn field<'a>(g: &'a GuestResult, name: &str) -> &'a Value {
    g.extra
        .get(name)
        .unwrap_or_else(|| panic!("the guest reported no {name}: {:?}", g.extra))
}

fn num(g: &GuestResult, name: &str) -> u64 {
    field(g, name)
        .as_u64()
        .unwrap_or_else(|| panic!("{name} is not a number: {:?}", g.extra))
}

fn ctrl_fault(request: Value) -> Step {
    let mut r = request;
    r["op"] = "ctrl_fault".into();
    Step::control(r)
}

/// The device's counters must have these values now.
fn stats_are(fields: &[(&str, u64)]) -> Step {
    Step::Control {
        request: json!({"op": "stats"}),
        reply: fields
            .iter()
            .map(|(k, v)| (format!("stats.{k}"), Value::from(*v)))
            .collect(),
    }
}

/// Each phase's READY, then the host's fault; the guest probes until it
/// sees it (`guest-programs/src/scenarios/sensor_faults.rs`).
fn cases() -> Vec<vdevlab_lab::scenario::Scenario> {
    let status =
        |n: u32, count: u32| ctrl_fault(json!({"mode": "status", "status": n, "count": count}));
    vec![
        sensor::case(
            "sensor-ctrl-status",
            &[],
            vec![
                status(1, 1),
                Step::Ready("sensor-ctrl-status-2".into()),
                status(2, 1),
                Step::Ready("sensor-ctrl-status-3".into()),
                status(3, 1),
                Step::Ready("sensor-ctrl-status-4".into()),
                status(9, 2),
            ],
        ),
        sensor::case(
            "sensor-ctrl-late",
            &[],
            vec![
                // Five injected statuses answered in the scenario before.
                stats_are(&[("ctrl_fault_status", 5), ("ctrl_held", 0)]),
                ctrl_fault(json!({"mode": "late", "delay_ms": 600})),
                Step::Ready("sensor-ctrl-late-2".into()),
                ctrl_fault(json!({"mode": "late", "delay_ms": 2000})),
            ],
        ),
        sensor::case(
            "sensor-ctrl-lost",
            &[],
            vec![
                stats_are(&[("ctrl_fault_late", 2), ("ctrl_held", 0)]),
                ctrl_fault(json!({"mode": "never"})),
                Step::Ready("sensor-ctrl-lost-2".into()),
                // The driver timed out; the device still holds the request.
                stats_are(&[("ctrl_fault_never", 1), ("ctrl_held", 1)]),
                ctrl_fault(json!({"mode": "clear"})),
                Step::Ready("sensor-ctrl-lost-3".into()),
                stats_are(&[("ctrl_fault_released", 1), ("ctrl_held", 0)]),
                ctrl_fault(json!({"mode": "never", "count": 2})),
            ],
        ),
    ]
}

/// One boot, the three scenarios; the guest checks each result itself,
/// and the figures it measured are checked here too.
fn sensor_ctrl_faults(cell: Cell) {
    let (lab, art, kernel) = sensor_lab();
    let outs = sensor::run(&lab, &art, &kernel, cell, &cases(), &[]).expect("the sensor boot ran");
    for out in &outs {
        eprintln!(
            "{}: {}",
            out.record.scenario,
            out.result
                .as_ref()
                .map_or_else(String::new, Value::to_string)
        );
    }
    for out in &outs {
        assert_passed(out);
    }
    let g = |i: usize| outs[i].guest.as_ref().expect("the scenario reported");
    let s = g(0);
    assert_eq!(field(s, "status_invalid"), "EINVAL");
    assert_eq!(field(s, "status_unsupported"), "EOPNOTSUPP");
    assert_eq!(field(s, "status_malformed"), "EPROTO");
    assert_eq!(field(s, "status_undefined"), "EPROTO,EPROTO");

    let l = g(1);
    assert_eq!(field(l, "late_result"), "ok");
    assert!(num(l, "late_ms") >= 540, "{:?}", l.extra);
    assert_eq!(field(l, "timeout_result"), "ETIMEDOUT");
    assert!((400..3000).contains(&num(l, "timeout_ms")), "{:?}", l.extra);
    assert_eq!(field(l, "timeout_busy"), "EBUSY");

    let x = g(2);
    assert_eq!(field(x, "lost_result"), "ETIMEDOUT");
    assert_eq!(field(x, "lost_busy"), "EBUSY");
    assert_eq!(field(x, "reset_result"), "ETIMEDOUT");
    assert_eq!(field(x, "reset"), "ok");
    assert_eq!(field(x, "held_blocked"), "yes");
    assert_eq!(field(x, "unbind_result"), "ENODEV");
    assert!(num(x, "unbind_wake_ms") < 5000, "{:?}", x.extra);
    assert_eq!(field(x, "after_rebind"), "ok");
}

vdevlab_tests::cell_tests!(sensor_ctrl_faults);
// Two vCPUs: the ctrl callback and the waiter really run at once.
vdevlab_tests::cell_tests!(smp sensor_ctrl_faults);
