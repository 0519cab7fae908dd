//! Config-change interrupts end to end: the qw backend raises
//! `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (the control plane's
//! `config_change` request and the `config_change_storm` fault), the VMM
//! acknowledges it and raises the virtio config interrupt, and the guest's
//! qw driver sees it: its `config_changed` callback counts every one in the
//! `config_changes` counter (`QW_IOC_GET_STATS`, read by `ioctl-stats`).

use serde_json::json;
use vdevlab_lab::cell::Cell;
use vdevlab_lab::engine;
use vdevlab_lab::scenario::{pattern, Expect, Scenario, Step};
use vdevlab_tests::{assert_passed, lab};

/// Changes the host raises: two requests, then a storm of this many.
const STORM: u64 = 5;
/// Between the two requests and the storm: long enough that the guest has
/// taken one config interrupt before the next is raised (an interrupt
/// raised while the previous one is still pending merges with it, as
/// used-buffer interrupts do), even on a loaded TCG host.
const SPACING: std::time::Duration = std::time::Duration::from_secs(1);

fn config_change_reaches_the_driver(cell: Cell) {
    let lab = lab();
    let kernel = lab.env.default_kernel().clone();
    let acked = |req: serde_json::Value| Step::Control {
        request: req,
        reply: vec![("delivery".into(), json!("acked"))],
    };
    let storm = Step::fault(json!({
        "kind": "config_change_storm", "count": STORM, "rate_hz": 20, "jitter_pct": 30, "seed": 1
    }))
    .expect("the storm is a fault of the device's vocabulary");
    let case = Scenario {
        expect: Expect {
            counters_at_least: vec![("config_changes_acked".into(), 2 + STORM)],
            ..Expect::default()
        },
        ..Scenario::program("ioctl-stats", &["--bytes", "5000"]).with_steps(vec![
            Step::Ready("ioctl-stats".into()),
            acked(json!({"op": "config_change"})),
            Step::Sleep(SPACING),
            acked(json!({"op": "config_change"})),
            Step::Sleep(SPACING),
            storm,
            Step::Counter {
                name: "config_changes_acked".into(),
                at_least: 2 + STORM,
            },
            Step::inject(pattern(40, 5000)),
            Step::Ready("ioctl-stats-2".into()),
            Step::inject(pattern(41, 100)),
        ])
    };
    let outs = engine::run(&lab, &kernel, cell, &[case], |_| {}).expect("the scenario could run");
    let out = &outs[0];
    assert_passed(out);
    let result = out.result.as_ref().expect("the program's result");
    let seen = |key: &str| result[key]["config_changes"].as_u64();
    assert_eq!(
        seen("stats_start"),
        Some(0),
        "no config change before: {result}"
    );
    // Every acknowledged change raised the interrupt before the driver
    // read its counters: the two spaced requests each ran config_changed,
    // the storm at least once (its changes 50 ms apart may merge in a slow
    // guest), and nothing ran it that the device did not raise.
    let end = seen("stats_end").expect("stats_end.config_changes");
    assert!(
        (3..=2 + STORM).contains(&end),
        "the driver saw {end} config changes; the VMM acknowledged {} (two 1 s apart, then a storm)",
        2 + STORM
    );
    let stats = out.stats.as_ref().expect("the device's counters");
    assert_eq!(stats.config_changes_failed, 0);
}

vdevlab_tests::cell_tests!(config_change_reaches_the_driver);
