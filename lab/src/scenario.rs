//! What a scenario is: data. A guest command, the host's steps while it
//! runs, and what must hold at the end ([`Scenario`], [`Step`],
//! [`Expect`]). The one engine that runs scenarios is [`crate::engine`];
//! the suite, the fault campaign ([`crate::campaign`]), user projects
//! ([`crate::project`]), the sensor ([`crate::sensor`]) and the bench all
//! go through it. Stream cases ([`StreamCase`]: an I/O model moving a
//! seeded stream one way or both) are built here as scenarios too.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vdevlab_qw::control::Request;
use vdevlab_qw::device::Stats;
use vdevlab_qw::irq::IrqMode;

use crate::cell::Cell;
use crate::env::Kernel;
use crate::guest::{accel_name, Vmm};
use crate::record::{self, RunRecord, Verdict};
use crate::Lab;

/// Budget for one TCG boot plus scenario; generous, since CI machines are
/// slow. A guest that needs longer has hung.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The seeded stream the guest programs use (shared code, so both sides
/// agree byte for byte).
pub use vdevlab_guest::pattern;

/// One scenario: a guest command, the host's steps, the expectations.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name for its run record (and reports).
    pub name: String,
    /// The name the guest command announces itself with in its
    /// `VDEVLAB-READY` and `VDEVLAB-RESULT` lines.
    pub marker: String,
    /// The guest command: arguments of the guest programs' binary, or a
    /// program path and its arguments.
    pub command: Vec<String>,
    /// The device instance (`/dev/qw<instance>`) whose control socket the
    /// steps use; a boot gets as many instances as its scenarios name.
    pub instance: usize,
    /// What the host does, in order.
    pub steps: Vec<Step>,
    /// What must hold.
    pub expect: Expect,
    /// Budget for the steps and the result, from the first `Ready`.
    pub budget: Duration,
    /// The guest kills the command after this long (its exit status then
    /// says 143 or 137): for the verdict's wording.
    pub guest_timeout: Option<Duration>,
    /// Read the device's counters at the end (the shipped devices answer
    /// `stats`; a user's backend may not speak the control protocol).
    pub counters: bool,
    /// SHA-256 of what the host sent or expects, hex (stream cases), for
    /// the outcome.
    pub host_sha256: Option<String>,
}

impl Scenario {
    /// A guest program of the guest programs' binary, with its arguments:
    /// record name and marker are the program's name; no steps yet; the
    /// program must report `"ok": true`.
    pub fn program(name: &str, args: &[&str]) -> Self {
        let mut command = vec![name.to_string()];
        command.extend(args.iter().map(|a| a.to_string()));
        Self {
            name: name.to_string(),
            marker: name.to_string(),
            command,
            instance: 0,
            steps: Vec::new(),
            expect: Expect::default(),
            budget: BOOT_TIMEOUT,
            guest_timeout: None,
            counters: true,
            host_sha256: None,
        }
    }

    /// The same, with `steps`.
    pub fn with_steps(mut self, steps: Vec<Step>) -> Self {
        self.steps = steps;
        self
    }
}

/// What the host does during a scenario. Adding a kind of step touches
/// this enum and [`crate::engine`] only.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Wait for `VDEVLAB-READY <marker>` (a scenario's program may announce
    /// several stages, `name`, `name-2`, ...). If the scenario's result
    /// comes first, the program ended early: the steps stop there and its
    /// result is judged.
    Ready(String),
    /// Wait until a console line contains this text.
    WaitFor(String),
    /// Wait this long.
    Sleep(Duration),
    /// Inject `inject` into the device (waiting for FIFO room) while
    /// capturing what the driver sends until it is exactly `capture`:
    /// both at once, so a reader and a writer can run together.
    Stream {
        /// Bytes for the driver to receive.
        inject: Vec<u8>,
        /// Bytes the driver must send.
        capture: Vec<u8>,
    },
    /// A control request (one JSON object with `op`), sent as it is; the
    /// reply must be `ok` and have these fields (a dotted name looks
    /// inside objects: `stats.tx_bytes`).
    Control {
        /// The request.
        request: Value,
        /// Fields the reply must have, with these values.
        reply: Vec<(String, Value)>,
    },
    /// A host command (`sh -c`, in `dir`) that must exit 0. It gets
    /// `VDEVLAB_CONTROL` (the control socket), `VDEVLAB_SOCKET` (the
    /// vhost-user socket) and `VDEVLAB_RUN_DIR`.
    Host {
        /// The command.
        command: String,
        /// Its working folder.
        dir: PathBuf,
    },
    /// Wait until a device counter has reached a value.
    Counter {
        /// The counter (`rx_bytes`, ...).
        name: String,
        /// The value it must reach.
        at_least: u64,
    },
    /// Kill the device backend (SIGKILL); the VMM keeps running.
    KillBackend,
    /// The program must not report for this long, and the VMM must keep
    /// running (a reader stays blocked on a device gone quiet).
    Quiet(Duration),
    /// Keep data moving both ways until the program announces `until`:
    /// inject the sequence-numbered receive records of `seed`
    /// (`vdevlab_guest::scenarios::stress::records`: 0, 1, 2, ...) as
    /// fast as the FIFO takes them, through the device's data port
    /// (instance 0's; raw bytes, back-pressure instead of refusal), take
    /// everything the driver sends
    /// (into [`Outcome::captured`], for [`Expect::check`]), and send each
    /// of `controls` once its time since the step began has come. In the
    /// `pauses` (start since the step began, length) the host neither
    /// injects nor captures, so readers and writers run dry and block.
    /// After `until`, what is left in the capture is taken too.
    Pump {
        /// Seed of the receive records.
        seed: u64,
        /// Control requests (their replies must be `ok`), by time.
        controls: Vec<(Duration, Value)>,
        /// Windows without injection or capture.
        pauses: Vec<(Duration, Duration)>,
        /// The READY marker that ends the step.
        until: String,
    },
}

impl Step {
    /// Inject these bytes.
    pub fn inject(data: Vec<u8>) -> Self {
        Step::Stream {
            inject: data,
            capture: Vec::new(),
        }
    }

    /// Capture exactly these bytes.
    pub fn capture(data: Vec<u8>) -> Self {
        Step::Stream {
            inject: Vec::new(),
            capture: data,
        }
    }

    /// A control request whose reply must be `ok`.
    pub fn control(request: Value) -> Self {
        Step::Control {
            request,
            reply: Vec::new(),
        }
    }

    /// A request of the qw device's control protocol.
    pub fn request(req: &Request) -> Self {
        Step::control(serde_json::to_value(req).unwrap_or_default())
    }

    /// A `fault` control request (`docs/device-spec.md`, "Injected
    /// faults"), checked against the qw device's vocabulary.
    pub fn fault(fault: Value) -> Result<Self> {
        fault_request(fault).map(Step::control)
    }

    /// A short description for messages: the step as JSON-ish text.
    pub fn describe(&self) -> String {
        let short = |b: &[u8]| match std::str::from_utf8(b) {
            Ok(s) if b.len() <= 64 => format!("{s:?}"),
            _ => format!("{} bytes", b.len()),
        };
        match self {
            Step::Ready(m) => format!("ready {m}"),
            Step::WaitFor(t) => format!("wait_for {t:?}"),
            Step::Sleep(d) => format!("sleep {d:?}"),
            Step::Stream { inject, capture } if capture.is_empty() => {
                format!("inject {}", short(inject))
            }
            Step::Stream { inject, capture } if inject.is_empty() => {
                format!("capture {}", short(capture))
            }
            Step::Stream { inject, capture } => {
                format!(
                    "inject {} bytes, capture {} bytes",
                    inject.len(),
                    capture.len()
                )
            }
            Step::Control { request, .. } => format!("control {request}"),
            Step::Host { command, .. } => format!("host {command:?}"),
            Step::Counter { name, at_least } => format!("counter {name} >= {at_least}"),
            Step::KillBackend => "kill the backend".into(),
            Step::Quiet(d) => format!("quiet for {d:?}"),
            Step::Pump {
                controls, until, ..
            } => format!(
                "pump records with {} control requests until ready {until}",
                controls.len()
            ),
        }
    }
}

/// What must hold at the end of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// The program reports a result line. `false`: it must still be
    /// waiting when the steps end (the run is then ended by the host).
    pub result: bool,
    /// The program reports `"ok": true` (`false`: it must fail, e.g. with
    /// EIO under an injected fault; its error is then not a problem).
    pub ok: bool,
    /// Result fields that must have these values.
    pub fields: Vec<(String, Value)>,
    /// Result fields that must NOT have these values (a SHA-256 that
    /// injected corruption must have changed).
    pub fields_not: Vec<(String, Value)>,
    /// The exit status the command must end with (its result's `status`).
    pub status: Option<i64>,
    /// Texts that must each appear in what the command printed.
    pub output: Vec<String>,
    /// Device counters that must be at least these values at the end.
    pub counters_at_least: Vec<(String, u64)>,
    /// The result must come within this long after the last step (no task
    /// blocked longer).
    pub within: Option<Duration>,
    /// A check of the result line against what the host captured and the
    /// device's counters at the end (the stress scenario's accounts).
    pub check: Option<Checker>,
    /// Numeric result fields that must be at least these values (a dotted
    /// name looks inside objects: `evidence.blocked_ms`): a program's
    /// evidence that it really waited.
    pub fields_at_least: Vec<(String, f64)>,
}

/// A check of a result line, the captured bytes and the device's counters
/// at the end: the problems it found.
#[derive(Debug, Clone, Copy)]
pub struct Checker(pub fn(&Value, &[u8], Option<&Stats>) -> Vec<String>);

impl PartialEq for Checker {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::fn_addr_eq(self.0, other.0)
    }
}

impl Default for Expect {
    fn default() -> Self {
        Self {
            result: true,
            ok: true,
            fields: Vec::new(),
            fields_not: Vec::new(),
            status: None,
            output: Vec::new(),
            counters_at_least: Vec::new(),
            within: None,
            check: None,
            fields_at_least: Vec::new(),
        }
    }
}

/// What a guest program reported (`VDEVLAB-RESULT {...}`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GuestResult {
    /// Scenario name as the guest saw it.
    #[serde(default)]
    pub scenario: String,
    /// Whether the program itself succeeded.
    pub ok: bool,
    /// Its error, if not.
    #[serde(default)]
    pub error: Option<String>,
    /// Bytes moved.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// read() calls it took (rx).
    #[serde(default)]
    pub reads: Option<u64>,
    /// write() calls it took (tx).
    #[serde(default)]
    pub writes: Option<u64>,
    /// SHA-256 of the stream, hex.
    #[serde(default)]
    pub sha256: Option<String>,
    /// `mixed`: bytes read.
    #[serde(default)]
    pub rx_bytes: Option<u64>,
    /// `mixed`: SHA-256 of what was read.
    #[serde(default)]
    pub rx_sha256: Option<String>,
    /// `mixed`: bytes written.
    #[serde(default)]
    pub tx_bytes: Option<u64>,
    /// `mixed`: SHA-256 of what was written.
    #[serde(default)]
    pub tx_sha256: Option<String>,
    /// Every other field of the result line (scripted scenarios check them).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// The outcome of one scenario run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The record that was appended to `runs.jsonl`.
    pub record: RunRecord,
    /// What the guest program reported, if it got that far.
    pub guest: Option<GuestResult>,
    /// Its result line's JSON object, as it came.
    pub result: Option<Value>,
    /// SHA-256 of what the host sent or expected, hex.
    pub host_sha256: Option<String>,
    /// The device's counters at the end (or when last read).
    pub stats: Option<Stats>,
    /// What the host captured in [`Step::Pump`]s.
    pub captured: Vec<u8>,
    /// What the command printed: the console lines between its READY and
    /// its RESULT, kernel messages included.
    pub output: String,
}

impl Outcome {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.record.result == Verdict::Pass
    }
}

/// Parse a control request of the qw device's vocabulary.
pub fn control_request(json: &str) -> Result<Request> {
    serde_json::from_str(json).with_context(|| format!("bad control request {json}"))
}

/// The `fault` control request of `fault` (an object of the qw device's
/// fault vocabulary, checked).
pub fn fault_request(fault: Value) -> Result<Value> {
    let request = serde_json::json!({ "op": "fault", "fault": fault });
    control_request(&request.to_string())?;
    Ok(request)
}

/// The version line of the VMM a run used, for its record.
pub fn vmm_version(lab: &Lab, vmm: Vmm) -> Option<String> {
    match vmm {
        Vmm::Qemu => Some(lab.env.qemu_version.clone()),
        Vmm::CloudHypervisor => crate::env::cloud_hypervisor().ok().map(|(_, v)| v),
    }
}

/// Record a scenario that cannot run here in a cell (VMM and accelerator)
/// on one of the lab's kernels, with the reason.
pub fn record_skip(
    lab: &Lab,
    kernel: &Kernel,
    scenario: &str,
    cell: Cell,
    reason: &str,
) -> Result<RunRecord> {
    record_unrun(lab, kernel, scenario, cell, Verdict::Skip, reason)
}

/// Record a scenario that did not boot, as `verdict` (a skip, or a failure
/// when the cell was asked for and cannot run), with the reason.
pub fn record_unrun(
    lab: &Lab,
    kernel: &Kernel,
    scenario: &str,
    cell: Cell,
    verdict: Verdict,
    reason: &str,
) -> Result<RunRecord> {
    lab.env.kernel(&kernel.name)?;
    let mut rec = RunRecord::new(
        scenario,
        cell.vmm.name(),
        accel_name(cell.accel),
        &kernel.release,
        verdict,
    );
    rec.kernel_name = Some(kernel.name.clone());
    // A bad SMP_VCPUS value is itself the reason this run did not happen.
    rec.vcpus = cell.vcpus().ok();
    rec.reason = Some(reason.to_string());
    record::append(&rec)?;
    Ok(rec)
}

/// Which way a stream scenario moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device to driver: the host injects, the guest reads.
    Rx,
    /// Driver to device: the guest writes, the host captures.
    Tx,
    /// Both at once (`mixed`): the host injects and captures concurrently.
    Both,
}

/// A stream case: an I/O model's program (`<model>-rx`, `<model>-tx` or
/// `mixed`) moving a seeded stream; [`StreamCase::scenario`] makes it a
/// [`Scenario`].
#[derive(Debug, Clone)]
pub struct StreamCase {
    /// Scenario name, e.g. `epoll-et-rx`.
    pub scenario: String,
    /// Bytes to move (each way, for `mixed`).
    pub bytes: usize,
    /// Seed of the pseudo-random stream.
    pub seed: u64,
    /// Bytes per read()/write() in the guest program.
    pub chunk: usize,
    /// Interrupt mode for both queues during this case (default: immediate).
    pub irq: Option<IrqMode>,
    /// Which device instance (`/dev/qw<instance>`).
    pub instance: usize,
}

impl StreamCase {
    /// A case with the lab's defaults (4000-byte chunks, so calls straddle
    /// the driver's page-sized buffers).
    pub fn new(scenario: &str, bytes: usize, seed: u64) -> Self {
        Self {
            scenario: scenario.to_string(),
            bytes,
            seed,
            chunk: 4000,
            irq: None,
            instance: 0,
        }
    }

    /// The direction, from the name's suffix.
    pub fn direction(&self) -> Result<Direction> {
        if self.scenario.ends_with("-rx") {
            Ok(Direction::Rx)
        } else if self.scenario.ends_with("-tx") {
            Ok(Direction::Tx)
        } else if self.scenario == "mixed" {
            Ok(Direction::Both)
        } else {
            bail!("scenario {} is neither -rx, -tx nor mixed", self.scenario)
        }
    }

    /// The scenario: the program with its arguments; the host waits for
    /// it, sets the interrupt mode, moves the stream (the pattern of the
    /// seed, or `payload` for a receive case), and expects the guest to
    /// have moved exactly those bytes.
    pub fn scenario(&self, payload: Option<&[u8]>) -> Result<Scenario> {
        let dir = self.direction()?;
        let (rx, tx) = match (dir, payload) {
            (Direction::Rx, Some(p)) => (p.to_vec(), Vec::new()),
            (Direction::Rx, None) => (pattern(self.seed, self.bytes), Vec::new()),
            (Direction::Tx, _) => (Vec::new(), pattern(self.seed, self.bytes)),
            // The host injects its own stream while the guest writes the
            // pattern of its --seed (pattern() sets the seed's low bit:
            // derive a seed that differs elsewhere, so the two differ).
            (Direction::Both, _) => (
                pattern(self.seed ^ 0x9e37_79b9_7f4a_7c00, self.bytes),
                pattern(self.seed, self.bytes),
            ),
        };
        let sha = |b: &[u8]| hex::encode(Sha256::digest(b));
        let (fields, host_sha) = match dir {
            Direction::Rx => (stream_fields("", &rx), sha(&rx)),
            Direction::Tx => (stream_fields("", &tx), sha(&tx)),
            Direction::Both => {
                let mut f = stream_fields("rx_", &rx);
                f.extend(stream_fields("tx_", &tx));
                (f, format!("{}/{}", sha(&rx), sha(&tx)))
            }
        };
        let mut args = vec![
            "--bytes".to_string(),
            self.bytes.to_string(),
            "--chunk".into(),
            self.chunk.to_string(),
        ];
        if self.instance > 0 {
            args.extend(["--device".into(), format!("/dev/qw{}", self.instance)]);
        }
        if dir != Direction::Rx {
            args.extend(["--seed".into(), self.seed.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let irq = Request::InterruptMode {
            queue: "all".into(),
            irq: self.irq.unwrap_or_default(),
        };
        Ok(Scenario {
            instance: self.instance,
            expect: Expect {
                fields,
                ..Expect::default()
            },
            host_sha256: Some(host_sha),
            ..Scenario::program(&self.scenario, &args).with_steps(vec![
                Step::Ready(self.scenario.clone()),
                Step::request(&irq),
                Step::Stream {
                    inject: rx,
                    capture: tx,
                },
            ])
        })
    }
}

/// The result fields a stream of `data` must have given: its length and
/// SHA-256 (`prefix` `rx_`/`tx_` for `mixed`).
fn stream_fields(prefix: &str, data: &[u8]) -> Vec<(String, Value)> {
    vec![
        (format!("{prefix}bytes"), Value::from(data.len() as u64)),
        (
            format!("{prefix}sha256"),
            Value::String(hex::encode(Sha256::digest(data))),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_tolerate_a_kernel_message_after_them() {
        let v: Value =
            crate::guest::first_json(r#"{"scenario":"x","ok":true}[   26.9] vdevlab_qw: bound"#)
                .unwrap();
        assert_eq!(v["ok"], true);
        assert!(crate::guest::first_json::<Value>("garbage").is_err());
    }

    #[test]
    fn control_steps_parse_as_requests() {
        assert_eq!(
            control_request(r#"{"op":"needs_reset"}"#).unwrap(),
            Request::NeedsReset {}
        );
        assert_eq!(
            control_request(r#"{"op":"capture","max":3}"#).unwrap(),
            Request::Capture { max: Some(3) }
        );
        let err = format!(
            "{:#}",
            control_request(r#"{"op":"frobnicate"}"#).unwrap_err()
        );
        assert!(err.contains("bad control request"), "{err}");
        assert!(control_request("not json").is_err());
        assert!(Step::fault(serde_json::json!({"kind": "melt"})).is_err());
    }

    #[test]
    fn stream_cases_become_scenarios() {
        let s = StreamCase::new("poll-tx", 10, 7).scenario(None).unwrap();
        assert_eq!(
            s.command,
            ["poll-tx", "--bytes", "10", "--chunk", "4000", "--seed", "7"]
        );
        assert_eq!(s.steps[0], Step::Ready("poll-tx".into()));
        assert_eq!(s.steps[2], Step::capture(pattern(7, 10)));
        assert_eq!(s.expect.fields[0], ("bytes".into(), Value::from(10)));
        let mut rx = StreamCase::new("blocking-rx", 5, 1);
        rx.instance = 2;
        let s = rx.scenario(Some(b"hello")).unwrap();
        assert_eq!(s.command[5..], ["--device", "/dev/qw2"]);
        assert_eq!(s.instance, 2);
        assert_eq!(s.steps[2], Step::inject(b"hello".to_vec()));
        let m = StreamCase::new("mixed", 8, 3).scenario(None).unwrap();
        let Step::Stream { inject, capture } = &m.steps[2] else {
            panic!("{:?}", m.steps[2]);
        };
        assert_ne!(
            inject, capture,
            "the two directions carry different streams"
        );
        let names: Vec<&str> = m.expect.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["rx_bytes", "rx_sha256", "tx_bytes", "tx_sha256"]);
        assert!(StreamCase::new("nope", 1, 1).scenario(None).is_err());
    }
}
