//! Config-change interrupts reach the drivers (issue 14, item 2): the
//! device changes its config space at run time and raises a config-change
//! interrupt (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, QEMU's
//! `virtio_notify_config`), and the driver's `config_changed` must notice.
//!
//! - qw: the host flips the carrier (`{"op":"carrier"}`: NO_CARRIER in the
//!   status word) and the guest program `carrier-change` checks that the
//!   driver shows each flip within seconds. The driver's status-word poll
//!   is off (`status_poll_ms=0`), so only the interrupt path can pass; a
//!   seeded copy of the driver whose `config_changed` does nothing must
//!   fail the same check, so the test can fail.
//!
//! Each runs on the default kernel (`trixie::`), and the interrupt paths
//! on the lockdep kernel too (`lockdep::`).
//! - sensor: alarms come as records on the events queue and as a count in
//!   the config status word announced by a config-change interrupt
//!   (`docs/sensor-spec.md`, "Alarms, two ways"): `sensor-alarms`, once
//!   with the records (`alarm_events=1`) and once without
//!   (`alarm_events=0`), where only the config-change path can tell the
//!   driver; both times the driver's count must equal the device's.

use serde_json::json;
use vdevlab_guest::scenarios::carrier_change::{marker, FLIPS};
use vdevlab_lab::cell::Cell;
use vdevlab_lab::engine;
use vdevlab_lab::scenario::{Expect, Outcome, Scenario, Step};
use vdevlab_lab::seeded::{self, Batch, Edit, Seed};
use vdevlab_tests::{assert_passed, lab};

/// The driver's parameter that turns the status-word poll off.
const NO_POLL: &str = "status_poll_ms=0";

/// `carrier-change` with the host's flips: after each marker, the carrier
/// goes down (then up, ...) and the device raises the interrupt.
fn carrier_scenario() -> Scenario {
    let name = "carrier-change";
    let mut steps = Vec::new();
    for k in 0..FLIPS {
        steps.push(Step::Ready(marker(name, k)));
        steps.push(Step::Control {
            request: json!({"op": "carrier", "up": k % 2 == 1}),
            reply: vec![("changed".into(), true.into())],
        });
    }
    Scenario {
        expect: Expect {
            fields: vec![("seen".into(), (FLIPS as u64).into())],
            counters_at_least: vec![("carrier_changes".into(), FLIPS as u64)],
            ..Expect::default()
        },
        // Eight flips take seconds; a lost one fails after 5 s.
        budget: std::time::Duration::from_secs(60),
        ..Scenario::program(name, &[]).with_steps(steps)
    }
}

/// A copy of the qw driver whose `config_changed` does nothing: it
/// neither counts the interrupt nor reads the config space.
fn deaf_seed() -> Seed {
    Seed {
        name: "config-changed-deaf".into(),
        breaks: "qw_config_changed() does nothing".into(),
        catchers: vec![],
        why: "without the status poll only config_changed can see a carrier change".into(),
        scenarios: vec![Batch::IoModels],
        edits: vec![Edit {
            find: "\tatomic64_inc(&qw->config_changes);\n\tqw_queue_work(qw, &qw->config_work);\n"
                .into(),
            replace: "\t(void)qw;\t/* seeded: deaf to config changes */\n".into(),
        }],
    }
}

/// Run `carrier-change` on `kernel` in `cell`, with `seed`'s driver
/// (`None`: the reference driver), the status poll off.
fn run_carrier(kernel: &str, cell: Cell, seed: Option<&Seed>) -> Outcome {
    let lab = lab();
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let scenarios = [carrier_scenario()];
    let outs = match seed {
        None => engine::run(&lab, &kernel, cell, &scenarios, |spec| {
            spec.driver_params.push(NO_POLL.into())
        }),
        Some(seed) => {
            let built = seeded::build(&kernel, seed).expect("the seeded driver builds");
            engine::run_labelled(
                &lab,
                &kernel,
                cell,
                &scenarios,
                Some(&seed.driver_label()),
                |spec| {
                    spec.driver_params.push(NO_POLL.into());
                    spec.overlays.push(built.overlay.clone());
                },
            )
        }
    }
    .expect("the scenario could run");
    outs.into_iter().next().expect("one outcome")
}

/// Every carrier flip reaches the reference driver through its
/// `config_changed`, with the status poll off: each within 5 s of the
/// guest's marker; the device counts the flips, the driver counts as many
/// config-change interrupts. The latencies (marker to the driver showing
/// the flip, the host's reaction included) are printed.
fn carrier_changes_reach_the_driver_by_interrupt(kernel: &str, cell: Cell) {
    let out = run_carrier(kernel, cell, None);
    assert_passed(&out);
    let g = out.guest.as_ref().expect("the guest reported");
    eprintln!(
        "carrier-change ({}): latency_us {} (max {}, mean {}), driver config_changes {}",
        out.record.kernel,
        g.extra["latency_us"],
        g.extra["latency_max_us"],
        g.extra["latency_mean_us"],
        g.extra["config_changes"],
    );
    let stats = out.stats.expect("device stats");
    assert_eq!(stats.carrier_changes, FLIPS as u64);
}

/// The same check against a driver deaf to config changes must fail: the
/// first flip is never seen (only the interrupt could tell), and the
/// program says so.
fn a_driver_deaf_to_config_changes_fails(kernel: &str, cell: Cell) {
    let out = run_carrier(kernel, cell, Some(&deaf_seed()));
    assert!(!out.passed(), "a deaf driver passed carrier-change");
    let why = out.record.reason.clone().unwrap_or_default();
    assert!(
        why.contains("not seen by the driver"),
        "failed, but not for the missed flip: {why}"
    );
    assert!(!why.contains("kernel "), "a splat, not a miss: {why}");
}

/// `sensor-alarms` in one boot with the driver's `alarm_events=<events>`:
/// the guest's result.
fn sensor_alarms(kernel: &str, cell: Cell, events: bool) -> serde_json::Value {
    use vdevlab_lab::sensor;
    let lab = lab();
    let art = sensor::prepare(&lab).expect("the sensor builds");
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    let boot = sensor::SensorBoot::new(&art, &kernel, &[]).expect("the sensor boot");
    let mut case = sensor::case(
        "sensor-alarms",
        &["--rate", "400", "--samples", "800"],
        vec![],
    );
    case.budget = std::time::Duration::from_secs(90);
    case.expect.counters_at_least = vec![("alarms_raised".into(), 1)];
    let param = format!("alarm_events={}", u8::from(events));
    let outs = engine::run(&lab, &kernel, cell, &[case], |spec| {
        boot.apply(spec);
        spec.driver_params.push(param.clone());
    })
    .expect("the sensor boot ran");
    let out = outs.into_iter().next().expect("one outcome");
    assert_passed(&out);
    out.result.expect("a result line")
}

/// Alarms reach the sensor driver through the events queue and through
/// config changes: with the records on, the driver gets every alarm both
/// ways; with them off, only the config-change count tells it, and it is
/// still exact: the threshold crossings of every sample the device took.
fn sensor_alarms_two_ways(kernel: &str, cell: Cell) {
    for events in [true, false] {
        let g = sensor_alarms(kernel, cell, events);
        eprintln!(
            "sensor-alarms alarm_events={events}: expected {}, signalled {}, received {}, \
             config changes {}",
            g["alarms_expected"], g["alarms_signalled"], g["alarms_received"], g["config_changes"]
        );
        let expected = g["alarms_expected"].as_u64().expect("alarms_expected");
        assert!(expected > 0);
        assert_eq!(
            g["alarms_signalled"].as_u64(),
            Some(expected),
            "by config change"
        );
        let records = if events { expected } else { 0 };
        assert_eq!(g["alarms_received"].as_u64(), Some(records), "as records");
    }
}

/// On the default kernel (7.3), in every cell.
mod trixie {
    vdevlab_tests::cell_tests!(kernel "trixie";
        carrier_changes_reach_the_driver_by_interrupt,
        a_driver_deaf_to_config_changes_fails,
        sensor_alarms_two_ways,
    );
    // Two vCPUs: the config-change work on one CPU while the program
    // polls on the other.
    vdevlab_tests::cell_tests!(smp kernel "trixie";
        carrier_changes_reach_the_driver_by_interrupt,
    );
}

/// On the lockdep kernel (PROVE_LOCKING, DEBUG_ATOMIC_SLEEP, ...): the
/// config-change paths (hard-irq callback, work item, state and control
/// mutexes) are held to its rules; any report is a splat and fails.
mod lockdep {
    vdevlab_tests::cell_tests!(kernel "lockdep";
        carrier_changes_reach_the_driver_by_interrupt,
        sensor_alarms_two_ways,
    );
}
