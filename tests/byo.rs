//! Bring your own driver: the `vdevlab` commands a user runs on their own
//! driver (`user-test`, `faults --driver`) and the interactive lab (`up`),
//! driven through the CLI as a user would, with real guests. `user-test`
//! and `up` run in every cell (`qemu_tcg::…`, `qemu_kvm::…`,
//! `cloud_hypervisor_kvm::…`); the others in QEMU/TCG.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vdevlab_lab::cell::Cell;
use vdevlab_lab::env::{runs_dir, workspace_root};
use vdevlab_lab::record::{read_all, Verdict};
use vdevlab_tests::{lab, vdevlab_command};

fn example() -> PathBuf {
    workspace_root().join("examples/user-driver")
}

fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().expect("vdevlab runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("a JSON report")
}

/// The example project (examples/user-driver: the qwmini module, a static
/// C program, four scenarios) passes, with a record per scenario.
fn user_project_passes_its_scenarios(cell: Cell) {
    lab();
    let (code, out) = run(vdevlab_command()
        .args(["user-test", "--cell", cell.name()])
        .arg(example()));
    assert_eq!(code, 0, "vdevlab user-test failed:\n{out}");
    let rep = report(&runs_dir().join(format!("user/qwmini/report-trixie-{cell}.json")));
    assert_eq!(rep["cell"], cell.name());
    let scenarios = rep["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "read-from-host",
            "write-to-host",
            "lost-interrupt",
            "no-such-device"
        ]
    );
    assert!(scenarios.iter().all(|s| s["pass"] == true), "{rep:#}");
    let console = scenarios[0]["console"].as_str().unwrap();
    // What the guest program printed is in the report, from the console.
    assert!(scenarios[0]["output"]
        .as_str()
        .unwrap()
        .contains("qwpoll: read hello"));
    assert_eq!(scenarios[3]["status"], 1);
    let records: Vec<_> = read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.console.as_deref() == Some(Path::new(console)))
        .collect();
    assert_eq!(records.len(), 4, "one record per scenario");
    for r in &records {
        assert!(r.scenario.starts_with("qwmini/"), "{r:?}");
        assert_eq!(r.result, Verdict::Pass);
        assert_eq!(r.driver.as_deref(), Some("qwmini"));
        assert_eq!(
            Cell::of_record(&r.vmm, &r.accel, r.vcpus),
            Some(cell),
            "{r:?}"
        );
    }
    let junit =
        std::fs::read_to_string(runs_dir().join(format!("user/qwmini/junit-trixie-{cell}.xml")))
            .unwrap();
    assert!(junit.contains("tests=\"4\" failures=\"0\""), "{junit}");
}

/// A scenario whose exit status or output is not the expected one fails,
/// and the command says so (exit status 1, FAIL in the table, the reason).
#[test]
fn user_test_reports_failing_scenarios() {
    lab();
    let dir = std::env::temp_dir().join(format!("vdevlab-byo-fail-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vdevlab.toml"),
        format!(
            "name = \"byo-fail\"\n[driver]\nsrc = \"{}\"\ndev = \"/dev/qwmini0\"\n\
             [[scenario]]\nname = \"wrong-status\"\nrun = \"exit 3\"\n\
             [[scenario]]\nname = \"wrong-output\"\nrun = \"echo something\"\nexpect_output = [\"nothing\"]\n\
             [[scenario]]\nname = \"fine\"\nrun = \"test -c /dev/qwmini0\"\n",
            example().join("driver").display()
        ),
    )
    .unwrap();
    let (code, out) = run(vdevlab_command()
        .args(["user-test", "--cell", "qemu-tcg"])
        .arg(&dir));
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "failing scenarios must fail the command:\n{out}");
    let rep = report(&runs_dir().join("user/byo-fail/report-trixie-qemu-tcg.json"));
    let s = rep["scenarios"].as_array().unwrap();
    assert_eq!(s[0]["pass"], false);
    assert!(
        s[0]["observed"]
            .as_str()
            .unwrap()
            .contains("exit status 3, expected 0"),
        "{rep:#}"
    );
    assert_eq!(s[1]["pass"], false);
    assert!(
        s[1]["observed"]
            .as_str()
            .unwrap()
            .contains("output lacks \"nothing\""),
        "{rep:#}"
    );
    assert_eq!(s[2]["pass"], true, "{rep:#}");
}

/// A guest that resets (here `reboot -f` in a scenario) fails the run at
/// once with the reason, and the scenarios after it are not run: QEMU
/// stops on `-no-reboot`, and the console's "reboot: Restarting system" is
/// what the harness acts on where Cloud Hypervisor would boot the guest
/// again instead.
#[test]
fn a_guest_reset_fails_the_run_at_once() {
    lab();
    let dir = std::env::temp_dir().join(format!("vdevlab-byo-reset-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("vdevlab.toml"),
        format!(
            "name = \"byo-reset\"\n[driver]\nsrc = \"{}\"\ndev = \"/dev/qwmini0\"\n\
             [[scenario]]\nname = \"resets\"\nrun = \"busybox reboot -f\"\n\
             [[scenario]]\nname = \"after\"\nrun = \"true\"\n",
            example().join("driver").display()
        ),
    )
    .unwrap();
    let t0 = Instant::now();
    let (code, out) = run(vdevlab_command()
        .args(["user-test", "--cell", "qemu-tcg"])
        .arg(&dir));
    let took = t0.elapsed();
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(code, 1, "a reset must fail the run:\n{out}");
    let rep = report(&runs_dir().join("user/byo-reset/report-trixie-qemu-tcg.json"));
    let s = rep["scenarios"].as_array().unwrap();
    let observed = s[0]["observed"].as_str().unwrap();
    assert!(
        observed.contains("the guest reset (reboot: Restarting system)"),
        "{rep:#}"
    );
    assert!(
        s[1]["observed"].as_str().unwrap().contains("not run"),
        "{rep:#}"
    );
    // Far from any timeout: the boot, the build check, the reset.
    assert!(took < Duration::from_secs(90), "took {took:?}:\n{out}");
}

/// The fault campaign against a user's driver: qwmini survives a lost
/// interrupt, but ignores the device's NEEDS_RESET, so its blocked reader
/// never gets the error the scenario demands, and the campaign says so.
#[test]
fn fault_campaign_runs_against_a_user_driver() {
    lab();
    let faults = workspace_root().join("faults");
    let (code, out) = run(vdevlab_command()
        .args(["faults", "--cell", "qemu-tcg", "--driver"])
        .arg(example())
        .arg(faults.join("10-lost-interrupt-rx.toml"))
        .arg(faults.join("90-needs-reset-rx.toml")));
    assert_eq!(code, 1, "needs-reset-rx must fail against qwmini:\n{out}");
    assert!(out.contains("against qwmini.ko"), "{out}");
    let rep = report(&runs_dir().join("faults/report-trixie-qwmini-qemu-tcg.json"));
    let s = rep["scenarios"].as_array().unwrap();
    let verdict = |name: &str| {
        s.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{name} not in {rep:#}"))["pass"]
            .clone()
    };
    assert_eq!(verdict("lost-interrupt-rx"), true, "{rep:#}");
    assert_eq!(verdict("needs-reset-rx"), false, "{rep:#}");
    let console = s[0]["console"].as_str().unwrap();
    let records: Vec<_> = read_all()
        .unwrap()
        .into_iter()
        .filter(|r| r.console.as_deref() == Some(Path::new(console)))
        .collect();
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.driver.as_deref() == Some("qwmini")));
}

/// `vdevlab up` driven through a pipe: the guest shell runs the commands,
/// the control plane answers from outside while the guest is up, and
/// leaving the shell tears everything down.
fn interactive_lab_shell_and_control_plane(cell: Cell) {
    lab();
    let mut child = vdevlab_command()
        .args(["up", "--cell", cell.name()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vdevlab up starts");
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(line);
        }
    });
    let mut stdout = child.stdout.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut ctl = None;
    let mut run_folder = None;
    let mut log = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no shell within 180 s:\n{}", log.join("\n")));
        if let Some(p) = line.strip_prefix("[vdevlab] control socket: ") {
            ctl = Some(PathBuf::from(p));
        }
        if let Some((_, p)) = line.split_once("; run folder ") {
            run_folder = Some(PathBuf::from(p));
        }
        let ready = line.contains("the guest shell is ready");
        log.push(line);
        if ready {
            break;
        }
    }
    let ctl = ctl.expect("the control socket is printed");
    let run_folder = run_folder.expect("the run folder is printed");
    // The run folder links to the socket, which lives in a short private
    // folder (the run folder may be too deep for a socket path).
    assert_eq!(
        std::fs::read_link(run_folder.join("ctl.sock")).unwrap(),
        ctl
    );
    // The control plane, from another "terminal", while the guest is up.
    let (code, text) = run(vdevlab_command().args(["device", "-c"]).arg(&ctl).args([
        "inject",
        "--text",
        "from-the-host",
    ]));
    assert_eq!(code, 0, "{text}");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(
            b"head -c 13 /dev/qw0; echo\ncat /sys/class/vdevlab_qw/qw0/rx_bytes\n\
              echo sum=$((40 + 2))\nexit\n",
        )
        .unwrap();
    drop(stdin);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vdevlab up did not end after the shell's exit");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = out.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        status.success(),
        "vdevlab up failed: {}\n{console}",
        rest.join("\n")
    );
    // The device's bytes reached the shell's reader, the driver counted them,
    // and the shell ran what it was given.
    assert!(console.contains("\nfrom-the-host"), "{console}");
    assert!(console.lines().any(|l| l.trim() == "13"), "{console}");
    assert!(console.contains("sum=42"), "{console}");
    assert!(
        rest.iter().any(|l| l.contains("the guest powered off")),
        "{rest:?}"
    );
    // Torn down: no socket left, nobody listening, the private folder gone.
    assert!(!ctl.exists(), "{} is left behind", ctl.display());
    let sockets = ctl.parent().unwrap();
    assert!(!sockets.exists(), "{} is left behind", sockets.display());
    let dir = run_folder.as_path();
    let socks: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
        .collect();
    assert!(socks.is_empty(), "sockets left: {socks:?}");
    let rec = read_all()
        .unwrap()
        .into_iter()
        .rev()
        .find(|r| r.scenario == "up" && r.console.as_deref().is_some_and(|c| c.starts_with(dir)))
        .expect("the session is recorded");
    assert_eq!(rec.result, Verdict::Pass, "{rec:?}");
}

/// `vdevlab new device NAME` makes a project that builds and passes as
/// generated: the device's unit tests, then device, driver and scenarios
/// in a real guest (`vdevlab user-test`).
#[test]
fn scaffolded_device_builds_and_passes() {
    lab();
    let tmp = std::env::temp_dir().join(format!("vdevlab-scaffold-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let (code, out) = run(vdevlab_command()
        .args(["new", "device", "scaff", "--dir"])
        .arg(&tmp));
    assert_eq!(code, 0, "vdevlab new failed:\n{out}");
    let project = tmp.join("scaff");
    // The device's build is kept between runs (it is the slow part: the
    // framework and its crates), beside the lab's own.
    let shared = vdevlab_lab::env::target_dir().join("scaffold-device-target");
    std::fs::create_dir_all(&shared).unwrap();
    std::os::unix::fs::symlink(&shared, project.join("device/target")).unwrap();
    let (code, out) = run(
        Command::new(std::env::var_os("CARGO").unwrap_or("cargo".into()))
            .args(["test", "--manifest-path"])
            .arg(project.join("device/Cargo.toml"))
            .env_remove("CARGO_TARGET_DIR"),
    );
    assert_eq!(code, 0, "the generated device's unit tests failed:\n{out}");
    assert!(out.contains("test result: ok. 5 passed"), "{out}");
    let (code, out) = run(vdevlab_command()
        .args(["user-test", "--cell", "qemu-tcg"])
        .arg(&project));
    assert_eq!(code, 0, "the generated project failed in the lab:\n{out}");
    let rep = report(&runs_dir().join("user/scaff/report-trixie-qemu-tcg.json"));
    let s = rep["scenarios"].as_array().unwrap();
    let names: Vec<&str> = s.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, ["write-to-host", "host-to-reader", "counters"]);
    assert!(s.iter().all(|v| v["pass"] == true), "{rep:#}");
    std::fs::remove_dir_all(&tmp).ok();
}

vdevlab_tests::cell_tests!(
    user_project_passes_its_scenarios,
    interactive_lab_shell_and_control_plane,
);
