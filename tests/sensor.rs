//! The second example device, the sampling sensor (`docs/sensor-spec.md`),
//! in booted guests: the real `vdevlab-sensor` backend behind QEMU's
//! generic vhost-user device, the real `vdevlab_sensor` driver, and the
//! guest programs' sensor scenarios, with the same run records, console
//! capture and splat detection as the qw tests.
//!
//! Every boot test exists once per kernel (`trixie::…`, `bookworm::…`,
//! `lab::…`) and, inside it, once per cell (`trixie::qemu_kvm::…`).

use serde_json::Value;
use vdevlab_lab::cell::Cell;
use vdevlab_lab::env::Kernel;
use vdevlab_lab::record::read_all;
use vdevlab_lab::scenario::Step;
use vdevlab_lab::sensor::{self, SensorArtifacts};
use vdevlab_lab::Lab;
use vdevlab_tests::{assert_passed, lab};

/// The lab with the sensor's backend and drivers built (once per process).
fn sensor_lab(kernel: &str) -> (Lab, SensorArtifacts, Kernel) {
    let lab = lab();
    let art = vdevlab_tests::sensor_artifacts(&lab);
    let kernel = vdevlab_tests::kernel(&lab, kernel);
    (lab, art, kernel)
}

fn field<'a>(g: &'a vdevlab_lab::scenario::GuestResult, name: &str) -> &'a Value {
    g.extra
        .get(name)
        .unwrap_or_else(|| panic!("the guest reported no {name}: {:?}", g.extra))
}

/// One boot: `sensor-stream` (rate, threshold, every sample checked, a rate
/// change, the alarms exactly the crossings, bad arguments refused, a
/// stopped sensor quiet), `sensor-unbind` (every sleeper woken by removal,
/// the device back after a rebind), then `sensor-reset` (the host declares
/// the device broken; the program sees NEEDS_RESET, and SENSOR_IOC_RESET
/// brings it back at power-on), then `sensor-hostile` (an overlong used
/// length is dropped and counted; a used id never posted breaks the queue:
/// EIO, POLLERR, and SENSOR_IOC_RESET recovers).
fn sensor_scenarios(kernel: &str, cell: Cell) {
    let (lab, art, kernel) = sensor_lab(kernel);
    let cases = [
        sensor::case(
            "sensor-stream",
            &[
                // Modest rates: samples are lost (and the run fails) only
                // if the guest stalls for seconds, even on a loaded CI
                // machine running two TCG guests.
                "--rate",
                "250",
                "--rate2",
                "125",
                "--samples",
                "300",
                "--samples2",
                "100",
            ],
            vec![],
        ),
        sensor::case("sensor-unbind", &["--rate", "200"], vec![]),
        sensor::case(
            "sensor-reset",
            &["--rate", "200"],
            vec![Step::control(serde_json::json!({"op": "needs_reset"}))],
        ),
        // The framework's hostile-device mode, on the sensor's queue by name.
        sensor::case(
            "sensor-hostile",
            &["--rate", "200"],
            vec![
                Step::control(serde_json::json!({"op": "fault",
                    "fault": {"kind": "hostile_overlong", "queue": "samples", "count": 1}})),
                Step::Ready("sensor-hostile-2".into()),
                Step::control(serde_json::json!({"op": "fault",
                    "fault": {"kind": "hostile_bogus_id", "queue": "samples", "count": 1}})),
            ],
        ),
    ];
    let seed = ["--seed".to_string(), "77".to_string()];
    let outs = sensor::run(&lab, &art, &kernel, cell, &cases, &seed).expect("the sensor boot ran");
    for out in &outs {
        assert_passed(out);
        assert_eq!(out.record.kernel, kernel.release);
        assert_eq!(out.record.driver.as_deref(), Some(sensor::MODULE));
    }
    // The guest's observations, checked here too.
    let g = outs[0].guest.as_ref().expect("sensor-stream reported");
    assert_eq!(
        field(g, "info_start")["seed"],
        77,
        "the backend's waveform reached the guest"
    );
    assert!(field(g, "samples").as_u64().unwrap() >= 400);
    let alarms = field(g, "alarms").as_u64().unwrap();
    assert!(alarms > 0);
    assert_eq!(field(g, "alarms_expected").as_u64(), Some(alarms));
    assert_eq!(field(g, "bad_rate"), "EINVAL");
    assert_eq!(field(g, "read_stopped"), "EAGAIN");
    let u = outs[1].guest.as_ref().expect("sensor-unbind reported");
    assert_eq!(field(u, "read"), "ENODEV");
    assert_eq!(field(u, "set_rate_removed"), "ENODEV");
    let r = outs[2].guest.as_ref().expect("sensor-reset reported");
    assert_eq!(field(r, "reset"), "ok ()");
    assert_eq!(field(r, "stats_reset")["resets"], 1);
    let h = outs[3].guest.as_ref().expect("sensor-hostile reported");
    assert_eq!(field(h, "overlong_errors"), 1);
    assert_eq!(field(h, "read_broken"), "EIO");
    let on_file = read_all().expect("runs.jsonl is readable");
    for out in &outs {
        assert!(
            on_file.iter().any(|r| r == &out.record),
            "the record is on file"
        );
    }
}

/// The sensor driver is held to the same standard as qw's: a W=1 build
/// with no warning on every kernel, and sparse where the build runs on the
/// host (6.1 and 6.12).
fn sensor_driver_builds_warning_free_with_w1(kernel: &str) {
    let (_lab, art, kernel) = sensor_lab(kernel);
    let k = art.for_kernel(&kernel.name).unwrap();
    let warnings: Vec<&str> = k
        .build_log
        .lines()
        .filter(|l| l.contains("warning:") || l.contains("error:"))
        .collect();
    assert!(
        warnings.is_empty(),
        "sensor driver warnings on {} (log {}):\n{}",
        kernel.name,
        k.build_log_path.display(),
        warnings.join("\n")
    );
    // sparse runs on bookworm's 6.1 and the lab kernel's 6.12 builds;
    // Debian's sparse is too old for 7.3's headers.
    if kernel.sparse {
        assert!(
            k.build_log.contains("CHECK"),
            "sparse did not run on the {} build (log {})",
            kernel.name,
            k.build_log_path.display()
        );
    }
}

/// checkpatch.pl --strict finds nothing but the one documented exception
/// (LINUX_VERSION_CODE in the compatibility macro, guest-driver/README.md).
#[test]
fn sensor_driver_passes_checkpatch_strict() {
    let lab = lab(); // provisions checkpatch.pl
    let dir = vdevlab_lab::env::workspace_root().join("guest-driver/sensor");
    let out = vdevlab_lab::artifacts::checkpatch(
        &lab.env,
        &dir,
        &["vdevlab_sensor.c", "include/uapi/vdevlab_sensor.h"],
    )
    .expect("checkpatch.pl runs in the lab root");
    let report = String::from_utf8_lossy(&out.stdout);
    let unexpected: Vec<&str> = report
        .lines()
        .filter(|l| l.contains(": WARNING:") || l.contains(": ERROR:") || l.contains(": CHECK:"))
        .filter(|l| !l.contains(":LINUX_VERSION_CODE:"))
        .collect();
    assert!(
        unexpected.is_empty(),
        "checkpatch --strict findings:\n{}",
        unexpected.join("\n")
    );
    assert!(
        report.contains("total:"),
        "checkpatch did not run: {report}"
    );
}

macro_rules! kernel_tests {
    ($($kernel:ident),*) => {$(
        mod $kernel {
            vdevlab_tests::cell_tests!(kernel stringify!($kernel); sensor_scenarios);

            #[test]
            fn sensor_driver_builds_warning_free_with_w1() {
                super::sensor_driver_builds_warning_free_with_w1(stringify!($kernel));
            }
        }
    )*};
}

kernel_tests!(trixie, bookworm, lab);
