//! The one scenario engine: boot a guest for a list of [`Scenario`]s, and
//! for each one wait for its markers, run the host's [`Step`]s, collect
//! its result and judge it against its [`Expect`]; then finish the guest
//! (or stop it when a scenario left it unusable), scan its console for
//! kernel splats, and give every scenario a run record.
//!
//! [`run`] does all of that; [`Session`] is the same engine in parts, for
//! a caller that measures between the markers (the bench) instead of
//! running data-driven steps.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use vdevlab_guest::protocol;
use vdevlab_qw::device::Stats;

use crate::artifacts::Artifacts;
use crate::cell::Cell;
use crate::env::Kernel;
use crate::guest::{accel_name, BootSpec, Guest};
use crate::record::{self, RunRecord, Verdict};
use crate::scenario::{
    pattern, vmm_version, Expect, Outcome, Scenario, Step, StreamCase, BOOT_TIMEOUT,
};
use crate::Lab;

/// How long the guest gets to power off after its last program.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a step that waits on the device looks again.
const POLL: Duration = Duration::from_millis(2);
/// The least time a result is waited for after the steps, however much of
/// the budget they used.
const RESULT_GRACE: Duration = Duration::from_secs(5);

/// Boot `kernel` in `cell` once for `scenarios` (the boot adjusted by
/// `tune`), run them in order and record each. A scenario that leaves the
/// guest unusable (a wait that failed, a program left waiting) ends the
/// boot: those after it are recorded as not run, with the reason.
pub fn run(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[Scenario],
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Vec<Outcome>> {
    run_labelled(lab, kernel, cell, scenarios, None, tune)
}

/// [`run`], with the records naming `driver` as the driver under test
/// (e.g. `vdevlab_qw+<seed>` for a seeded copy of the reference driver,
/// [`crate::seeded`], which loads under the reference module's name).
pub fn run_labelled(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    scenarios: &[Scenario],
    driver: Option<&str>,
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Vec<Outcome>> {
    let name = match scenarios {
        [one] => one.name.replace('/', "-"),
        _ => "batch".to_string(),
    };
    let mut spec = BootSpec::new(&name, scenarios.iter().map(|s| s.command.clone()).collect())
        .on_kernel(&kernel.name);
    spec.instances = scenarios.iter().map(|s| s.instance + 1).max().unwrap_or(1);
    tune(&mut spec);
    let mut session = Session::boot(lab, &lab.artifacts, kernel, cell, spec)?;
    if let Some(d) = driver {
        session.driver = Some(d.to_string());
    }
    let mut driven = Vec::new();
    let mut ends_boot: Option<String> = None;
    for s in scenarios {
        let d = match &ends_boot {
            Some(why) => Driven::not_run(why),
            None => session.drive(s),
        };
        if ends_boot.is_none() {
            ends_boot = d.ends_boot.clone();
        }
        driven.push(d);
    }
    let ended = match ends_boot {
        Some(_) => session.abort(),
        None => session.finish(FINISH_TIMEOUT),
    };
    // A program that runs more than once in a boot: each run's output is
    // the part after the earlier runs' results.
    scenarios
        .iter()
        .enumerate()
        .zip(driven)
        .map(|((i, s), d)| {
            let earlier = scenarios[..i]
                .iter()
                .filter(|p| p.marker == s.marker)
                .count();
            ended.outcome(s, d, earlier)
        })
        .collect()
}

/// Run stream cases in one boot of `kernel`, in order.
pub fn run_streams(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    cases: &[StreamCase],
) -> Result<Vec<Outcome>> {
    run_streams_tuned(lab, kernel, cell, cases, |_| {})
}

/// [`run_streams`] with the boot adjusted by `tune` (e.g. driver parameters).
pub fn run_streams_tuned(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    cases: &[StreamCase],
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Vec<Outcome>> {
    let scenarios: Vec<Scenario> = cases
        .iter()
        .map(|c| c.scenario(None))
        .collect::<Result<_>>()?;
    run(lab, kernel, cell, &scenarios, tune)
}

/// `blocking-rx`: the guest's blocking `read()` sleeps in the driver; the
/// host injects `payload` through the control plane once the reader is
/// waiting; the guest must receive exactly those bytes. Boots `kernel`.
pub fn blocking_rx(lab: &Lab, kernel: &Kernel, cell: Cell, payload: &[u8]) -> Result<Outcome> {
    let case = StreamCase::new("blocking-rx", payload.len(), 0);
    let mut outs = run(lab, kernel, cell, &[case.scenario(Some(payload))?], |_| {})?;
    outs.pop().context("the run gave no outcome")
}

/// `backend-crash-rx`: the device model crashes (SIGKILL) mid-stream while
/// QEMU keeps running, and what the guest sees is checked.
///
/// QEMU 11.1's `vhost-user-test-device-pci` cannot reconnect: started with
/// the chardev's `reconnect-ms` it fails to realize ("Failed to set msg
/// fds": the generic device does not wait for the socket to connect), and
/// without it a closed socket stays closed. So a crash is final for the
/// device, and the contract for the guest is: data delivered before the
/// crash is read intact; then the device goes quiet, and the reader simply
/// blocks (no error, no invented byte, no kernel splat) until the VM is
/// torn down. The guest's blocking reader waits for `2 * half` bytes; the
/// host delivers `half`, kills the backend, and checks that the reader is
/// still waiting and the VM still running 5 s later.
pub fn backend_crash_rx(lab: &Lab, kernel: &Kernel, half: usize) -> Result<Outcome> {
    let total = (2 * half).to_string();
    let scenario = Scenario {
        name: "backend-crash-rx".into(),
        expect: Expect {
            result: false,
            ..Expect::default()
        },
        ..Scenario::program("blocking-rx", &["--bytes", &total, "--chunk", "4000"]).with_steps(
            vec![
                Step::Ready("blocking-rx".into()),
                Step::inject(pattern(0x7e57, half)),
                // Delivered into the driver's buffers, not just queued.
                Step::Counter {
                    name: "rx_bytes".into(),
                    at_least: half as u64,
                },
                Step::KillBackend,
                Step::Quiet(Duration::from_secs(5)),
            ],
        )
    };
    let mut outs = run(lab, kernel, Cell::QEMU_TCG, &[scenario], |spec| {
        // The driver must not read config space here: QEMU 11.1's generic
        // vhost-user device forwards every config read to the backend, and
        // once it has handled the backend's disconnect such a read fails
        // an assertion (vhost_dev_get_config: `hdev->vhost_ops`) and aborts
        // QEMU. With the default config_status=1 the driver's status-word
        // poll does that within 500 ms of the crash.
        spec.driver_params = vec!["config_status=0".into()];
    })?;
    outs.pop().context("the run gave no outcome")
}

/// How a scenario's program started.
#[derive(Debug)]
pub enum Start {
    /// It announced itself ready.
    Ready,
    /// It ended first: its result line's JSON.
    Ended(Value),
}

/// Wait for `VDEVLAB-READY <ready>`, or for `scenario`'s result line if
/// that comes first (the program failed before getting ready).
pub fn wait_start(
    guest: &mut Guest,
    ready: &str,
    scenario: &str,
    timeout: Duration,
) -> Result<Start> {
    let result = protocol::result_prefix(scenario);
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Any marker is looked at; an error names the one wanted.
        let line = guest.wait_for(protocol::PREFIX, left).map_err(|e| {
            let named = format!("'{}'", protocol::ready_line(ready));
            anyhow::anyhow!(format!("{e:#}").replace(&format!("'{}'", protocol::PREFIX), &named))
        })?;
        if protocol::is_ready(&line, ready) {
            return Ok(Start::Ready);
        }
        if line.starts_with(&result) {
            return Ok(Start::Ended(result_value(&line)?));
        }
    }
}

/// The JSON object of a result line (from its marker on).
fn result_value(line: &str) -> Result<Value> {
    let json = protocol::result_json(line).unwrap_or_default();
    crate::guest::first_json(json).with_context(|| format!("bad result line: {line}"))
}

/// What driving one scenario gave, before the boot ended.
#[derive(Debug, Default)]
pub struct Driven {
    /// Its result line's JSON, if it came.
    pub result: Option<Value>,
    /// What went wrong.
    pub problems: Vec<String>,
    /// The device's counters when last read.
    pub stats: Option<Stats>,
    /// Why the boot cannot go on after this scenario, if so.
    pub ends_boot: Option<String>,
    /// What its [`Step::Pump`]s captured.
    pub captured: Vec<u8>,
}

impl Driven {
    fn not_run(why: &str) -> Self {
        Self {
            problems: vec![format!("not run: {why}")],
            ..Self::default()
        }
    }
}

/// A step that did not work out: a check that failed (the scenario fails,
/// the engine still waits for its result), or a wait on the guest that
/// failed (the guest is no longer usable).
enum StepError {
    Check(anyhow::Error),
    Fatal(anyhow::Error),
}

/// What a step left: go on, or the program has already reported.
enum Next {
    Go,
    Ended(Value),
}

/// A booted guest running scenarios; ends in [`Ended`].
#[derive(Debug)]
pub struct Session<'l> {
    lab: &'l Lab,
    kernel: Kernel,
    cell: Cell,
    driver: Option<String>,
    vcpus: u8,
    placement: crate::smp::Placement,
    t0: Instant,
    /// What the current scenario's pumps captured.
    captured: Vec<u8>,
    /// The guest.
    pub guest: Guest,
}

impl<'l> Session<'l> {
    /// Boot `spec` in `cell` with `art` (the lab's artifacts, or others).
    pub fn boot(
        lab: &'l Lab,
        art: &Artifacts,
        kernel: &Kernel,
        cell: Cell,
        mut spec: BootSpec,
    ) -> Result<Self> {
        spec.vmm = cell.vmm;
        spec.accel = cell.accel;
        let vcpus = match spec.vcpus {
            Some(n) => n,
            None => cell.vcpus()?,
        };
        spec.vcpus = Some(vcpus);
        let t0 = Instant::now();
        let guest = Guest::boot(&lab.env, art, &spec)?;
        Ok(Self {
            lab,
            kernel: kernel.clone(),
            cell,
            driver: spec.driver.as_ref().map(|d| d.module.clone()),
            vcpus,
            placement: spec.placement,
            t0,
            captured: Vec::new(),
            guest,
        })
    }

    /// Run one scenario: its steps, its result, its checks.
    pub fn drive(&mut self, s: &Scenario) -> Driven {
        let mut d = Driven::default();
        self.captured.clear();
        let mut deadline: Option<Instant> = None;
        let mut ended = None;
        for (i, step) in s.steps.iter().enumerate() {
            let what = format!("step {} ({})", i + 1, step.describe());
            match self.step(s, step, &mut deadline, &mut d.stats) {
                Ok(Next::Go) => {}
                Ok(Next::Ended(v)) => {
                    // Ending before its first READY is the program's own
                    // failure (its result says why); skipping a later one
                    // leaves host steps undone, which the verdict says.
                    if s.steps[..i].iter().any(|p| matches!(p, Step::Ready(_))) {
                        d.problems
                            .push(format!("{what}: the program ended before it"));
                    }
                    ended = Some(v);
                    break;
                }
                Err(StepError::Check(e)) => {
                    d.problems.push(format!("{what}: {e:#}"));
                    break;
                }
                Err(StepError::Fatal(e)) => {
                    let why = format!("{what}: {e:#}");
                    d.problems.push(why.clone());
                    d.ends_boot = Some(format!("an earlier scenario ({}) failed: {why}", s.name));
                    return d;
                }
            }
        }
        let result = match ended {
            Some(v) => Some(v),
            None if !s.expect.result => {
                d.ends_boot = Some(format!("{} leaves its program waiting", s.name));
                None
            }
            None => {
                let left =
                    deadline.map_or(s.budget, |t| t.saturating_duration_since(Instant::now()));
                let timeout = s.expect.within.unwrap_or(left.max(RESULT_GRACE));
                match self.guest.wait_result(&s.marker, timeout) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        let why = format!("{e:#}");
                        d.problems.push(why.clone());
                        d.ends_boot =
                            Some(format!("an earlier scenario ({}) failed: {why}", s.name));
                        return d;
                    }
                }
            }
        };
        if let Some(v) = &result {
            d.problems.extend(judge(s, v));
        }
        if s.counters || !s.expect.counters_at_least.is_empty() {
            self.check_counters(s, &mut d);
        }
        d.captured = std::mem::take(&mut self.captured);
        if let (Some(check), Some(v)) = (s.expect.check, &result) {
            d.problems
                .extend((check.0)(v, &d.captured, d.stats.as_ref()));
        }
        d.result = result;
        d
    }

    fn step(
        &mut self,
        s: &Scenario,
        step: &Step,
        deadline: &mut Option<Instant>,
        stats: &mut Option<Stats>,
    ) -> Result<Next, StepError> {
        let left = |d: &Option<Instant>| {
            d.map_or(BOOT_TIMEOUT, |t| {
                t.saturating_duration_since(Instant::now())
            })
        };
        let check = StepError::Check;
        let fatal = StepError::Fatal;
        match step {
            Step::Ready(m) => {
                let start = wait_start(&mut self.guest, m, &s.marker, left(deadline));
                deadline.get_or_insert_with(|| Instant::now() + s.budget);
                if let Start::Ended(v) = start.map_err(fatal)? {
                    return Ok(Next::Ended(v));
                }
            }
            Step::WaitFor(text) => {
                self.guest.wait_for(text, left(deadline)).map_err(fatal)?;
            }
            Step::Sleep(d) => std::thread::sleep(*d),
            Step::Stream { inject, capture } => {
                self.stream(s.instance, inject, capture, left(deadline))
                    .map_err(check)?;
            }
            Step::Control { request, reply } => {
                self.control(s.instance, request, reply).map_err(check)?;
            }
            Step::Host { command, dir } => self.host(command, dir).map_err(check)?,
            Step::Counter { name, at_least } => {
                let got = self.wait_counter(s.instance, name, *at_least, left(deadline));
                *stats = got.as_ref().ok().and_then(|(_, s)| *s);
                got.map_err(check)?;
            }
            Step::KillBackend => self.guest.kill_backend(),
            Step::Quiet(d) => {
                match self.guest.wait_for(&protocol::result_prefix(&s.marker), *d) {
                    Ok(line) => {
                        return Err(check(anyhow::anyhow!(
                            "the program reported instead of waiting: {line}"
                        )))
                    }
                    Err(e) if format!("{e}").contains("within") => {}
                    Err(e) => return Err(fatal(e)),
                }
                if !self.guest.vmm_running() {
                    return Err(check(anyhow::anyhow!("the VMM exited")));
                }
            }
            Step::Pump {
                seed,
                controls,
                pauses,
                until,
            } => return self.pump(s, *seed, controls, pauses, until, left(deadline)),
        }
        Ok(Next::Go)
    }

    /// [`Step::Pump`], through the device's data port (raw bytes both
    /// ways, no hex), with the control plane for the requests and for
    /// what is left in the capture at the end.
    fn pump(
        &mut self,
        s: &Scenario,
        seed: u64,
        controls: &[(Duration, Value)],
        pauses: &[(Duration, Duration)],
        until: &str,
        budget: Duration,
    ) -> Result<Next, StepError> {
        use std::io::{ErrorKind, Read, Write};
        use vdevlab_guest::scenarios::stress::records::rx_records;
        const BATCH: u64 = 4096;
        let check = StepError::Check;
        if s.instance != 0 {
            return Err(check(anyhow::anyhow!(
                "a pump uses instance 0's data port, not instance {}",
                s.instance
            )));
        }
        let mut ctl = self.guest.control_of(s.instance).map_err(check)?;
        let mut port = std::os::unix::net::UnixStream::connect(&self.guest.data_path)
            .with_context(|| format!("connecting to {}", self.guest.data_path.display()))
            .map_err(check)?;
        port.set_nonblocking(true).map_err(|e| check(e.into()))?;
        let result = protocol::result_prefix(&s.marker);
        let start = Instant::now();
        let (mut next, mut pending, mut off, mut sent) = (0u64, Vec::new(), 0usize, 0usize);
        let mut buf = vec![0u8; 1 << 20];
        let mut drain = |port: &mut std::os::unix::net::UnixStream, captured: &mut Vec<u8>| {
            let mut moved = 0;
            loop {
                match port.read(&mut buf) {
                    Ok(0) => return Err(anyhow::anyhow!("the data port closed")),
                    Ok(n) => {
                        captured.extend_from_slice(&buf[..n]);
                        moved += n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(moved),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(anyhow::Error::from(e).context("reading the data port")),
                }
            }
        };
        loop {
            match self
                .guest
                .wait_for(protocol::PREFIX, Duration::from_millis(1))
            {
                Ok(line) if protocol::is_ready(&line, until) => break,
                Ok(line) if line.starts_with(&result) => {
                    return result_value(&line)
                        .map(Next::Ended)
                        .map_err(StepError::Fatal)
                }
                Ok(_) => continue,
                Err(e) if format!("{e}").contains("within") => {}
                Err(e) => return Err(StepError::Fatal(e)),
            }
            let t = start.elapsed();
            if t > budget {
                return Err(check(anyhow::anyhow!(
                    "no ready {until} within {budget:?} of pumping"
                )));
            }
            while sent < controls.len() && controls[sent].0 <= t {
                self.control(s.instance, &controls[sent].1, &[])
                    .map_err(check)?;
                sent += 1;
            }
            if pauses.iter().any(|&(at, len)| t >= at && t < at + len) {
                std::thread::sleep(POLL);
                continue;
            }
            if off == pending.len() {
                pending = rx_records(seed, next, BATCH);
                next += BATCH;
                off = 0;
            }
            let wrote = match port.write(&pending[off..]) {
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => 0,
                Err(e) => {
                    return Err(check(
                        anyhow::Error::from(e).context("writing the data port"),
                    ))
                }
            };
            off += wrote;
            let got = drain(&mut port, &mut self.captured).map_err(check)?;
            if wrote == 0 && got == 0 {
                std::thread::sleep(POLL);
            }
        }
        // What the port still sends, then what waits in the capture.
        let quiet = Instant::now() + Duration::from_millis(200);
        while Instant::now() < quiet {
            if drain(&mut port, &mut self.captured).map_err(check)? == 0 {
                std::thread::sleep(POLL);
            }
        }
        loop {
            let got = ctl.capture(None).context("capturing").map_err(check)?;
            if got.is_empty() {
                break;
            }
            self.captured.extend_from_slice(&got);
        }
        drain(&mut port, &mut self.captured).map_err(check)?;
        Ok(Next::Go)
    }

    /// Inject `rx` (all of it, waiting for FIFO room) and capture `tx`,
    /// interleaved, so a reader and a writer in the guest run at once.
    fn stream(&self, instance: usize, rx: &[u8], tx: &[u8], budget: Duration) -> Result<()> {
        let mut ctl = self.guest.control_of(instance)?;
        let deadline = Instant::now() + budget;
        let (mut sent, mut got) = (0, Vec::with_capacity(tx.len()));
        while sent < rx.len() || got.len() < tx.len() {
            let mut moved = 0;
            if sent < rx.len() {
                let n = ctl.inject(&rx[sent..]).context("injecting")?;
                sent += n;
                moved += n;
            }
            if got.len() < tx.len() {
                let chunk = ctl
                    .capture(Some(tx.len() - got.len()))
                    .context("capturing")?;
                moved += chunk.len();
                got.extend_from_slice(&chunk);
            }
            if moved == 0 {
                if Instant::now() > deadline {
                    bail!(
                        "stalled: injected {sent} of {}, captured {} of {} bytes",
                        rx.len(),
                        got.len(),
                        tx.len()
                    );
                }
                // FIFO full or capture empty: the driver has not caught up.
                std::thread::sleep(POLL);
            }
        }
        if got != tx {
            let at = got.iter().zip(tx).position(|(a, b)| a != b).unwrap_or(0);
            match std::str::from_utf8(tx) {
                Ok(want) if tx.len() <= 64 => bail!(
                    "captured {:?}, expected {want:?}",
                    String::from_utf8_lossy(&got)
                ),
                _ => bail!("the captured stream differs from the expected one at byte {at}"),
            }
        }
        Ok(())
    }

    /// Send a request as it is (a user's device has requests the shipped
    /// ones do not know); the reply must be `ok` and have `reply`'s fields.
    fn control(&self, instance: usize, request: &Value, reply: &[(String, Value)]) -> Result<()> {
        let resp: Value = self.guest.control_of(instance)?.core().call(request)?;
        if resp["ok"] != true {
            bail!(
                "control request {request} failed: {}",
                resp["error"].as_str().unwrap_or("no reason given")
            );
        }
        for (k, want) in reply {
            let got = k.split('.').try_fold(&resp, |o, part| o.get(part));
            if got != Some(want) {
                bail!(
                    "{request}: reply field {k} is {}, expected {want}",
                    got.map_or("absent".to_string(), |g| g.to_string())
                );
            }
        }
        Ok(())
    }

    fn host(&self, cmd: &str, dir: &PathBuf) -> Result<()> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(dir)
            .env("VDEVLAB_CONTROL", &self.guest.control_path)
            .env("VDEVLAB_SOCKET", self.guest.vu_socket())
            .env("VDEVLAB_RUN_DIR", &self.guest.run_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {cmd}"))?;
        if !out.status.success() {
            bail!(
                "`{cmd}` failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The device's counters, by name (and as the qw device's [`Stats`]
    /// when they are its).
    fn counters(&self, instance: usize) -> Result<(serde_json::Map<String, Value>, Option<Stats>)> {
        let fields = self.guest.control_of(instance)?.core().stats_fields()?;
        let stats = serde_json::from_value(Value::Object(fields.clone())).ok();
        Ok((fields, stats))
    }

    fn wait_counter(
        &self,
        instance: usize,
        name: &str,
        at_least: u64,
        budget: Duration,
    ) -> Result<(u64, Option<Stats>)> {
        let deadline = Instant::now() + budget;
        loop {
            let (fields, stats) = self.counters(instance)?;
            let got = fields.get(name).and_then(Value::as_u64).unwrap_or(0);
            if got >= at_least {
                return Ok((got, stats));
            }
            if Instant::now() > deadline {
                bail!("device counter {name} stayed at {got}, below {at_least}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_counters(&self, s: &Scenario, d: &mut Driven) {
        let seen = self.counters(s.instance).ok();
        if let Some((_, Some(stats))) = &seen {
            d.stats = Some(*stats);
        }
        for (name, min) in &s.expect.counters_at_least {
            let got = seen
                .as_ref()
                .and_then(|(f, _)| f.get(name))
                .and_then(Value::as_u64);
            if got.is_none_or(|g| g < *min) {
                d.problems.push(format!(
                    "device counter {name} is {got:?}, expected at least {min}"
                ));
            }
        }
    }

    /// Wait for the guest to power off after its last program, and scan
    /// its console.
    pub fn finish(self, timeout: Duration) -> Ended {
        let console = self.guest.console_path.clone();
        let times = (self.guest.boot_ms, self.guest.driver_ready_ms);
        let (splats, failed, text) = match self.guest.finish(timeout) {
            Ok(f) => (f.splats, None, f.console),
            Err(e) => (
                Vec::new(),
                Some(format!("{e:#}")),
                std::fs::read_to_string(&console).unwrap_or_default(),
            ),
        };
        let mut ended = Ended::new(self.lab, &self.kernel, self.cell, self.t0, times, console);
        ended.driver(self.driver);
        ended.problems = splat_problems(&splats);
        ended.problems.extend(failed);
        ended.splats = splats;
        ended.cpus(self.vcpus, self.placement, &text);
        ended.console = text;
        ended
    }

    /// Stop the guest now (a program still waits, or the guest is no
    /// longer usable), and scan its console.
    pub fn abort(self) -> Ended {
        let console = self.guest.console_path.clone();
        let times = (self.guest.boot_ms, self.guest.driver_ready_ms);
        let f = self.guest.abort();
        let mut ended = Ended::new(self.lab, &self.kernel, self.cell, self.t0, times, console);
        ended.driver(self.driver);
        ended.problems = splat_problems(&f.splats);
        ended.splats = f.splats;
        ended.cpus(self.vcpus, self.placement, &f.console);
        ended.console = f.console;
        ended
    }
}

fn splat_problems(splats: &[crate::splat::Splat]) -> Vec<String> {
    splats
        .iter()
        .map(|s| format!("kernel {}: {}", s.kind, s.line.trim()))
        .collect()
}

/// The result line against the expectations.
fn judge(s: &Scenario, v: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let ok = v.get("ok") == Some(&Value::Bool(true));
    if ok && !s.expect.ok {
        problems.push("the guest program succeeded, but it was expected to fail".into());
    }
    if !ok && s.expect.ok {
        problems.push(format!(
            "guest program failed: {}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error given")
        ));
    }
    if ok != s.expect.ok {
        // Its other fields say nothing more.
        return problems;
    }
    for (field, want) in &s.expect.fields {
        if v.get(field) != Some(want) {
            let got = v.get(field).map_or("absent".into(), |g| g.to_string());
            problems.push(format!("{field} is {got}, expected {want}"));
        }
    }
    for (field, min) in &s.expect.fields_at_least {
        let got = field.split('.').try_fold(v, |o, part| o.get(part));
        match got.and_then(Value::as_f64) {
            Some(g) if g >= *min => {}
            Some(g) => problems.push(format!("{field} is {g}, expected at least {min}")),
            None => problems.push(format!(
                "{field} is {}, expected a number of at least {min}",
                got.map_or("absent".into(), |g| g.to_string())
            )),
        }
    }
    for (field, bad) in &s.expect.fields_not {
        if v.get(field) == Some(bad) {
            problems.push(format!("{field} is {bad}, which it must not be"));
        }
    }
    if let Some(want) = s.expect.status {
        match v.get("status").and_then(Value::as_i64) {
            None => problems.push(format!("no status in the result: {v}")),
            Some(st) if st != want => {
                let note = match s.guest_timeout {
                    Some(t) if st == 143 || st == 137 => {
                        format!(" (killed by the {} s timeout)", t.as_secs())
                    }
                    _ => String::new(),
                };
                problems.push(format!("exit status {st}{note}, expected {want}"));
            }
            Some(_) => {}
        }
    }
    problems
}

/// A boot that has ended: what every scenario's record shares.
#[derive(Debug)]
pub struct Ended {
    base: RunRecord,
    /// Problems of the whole boot (kernel splats, a VMM that failed).
    pub problems: Vec<String>,
    /// The kernel splats on the console.
    pub splats: Vec<crate::splat::Splat>,
    /// The whole console.
    pub console: String,
}

impl Ended {
    fn new(
        lab: &Lab,
        kernel: &Kernel,
        cell: Cell,
        t0: Instant,
        (boot_ms, driver_ready_ms): (Option<u64>, Option<u64>),
        console_path: PathBuf,
    ) -> Self {
        let mut base = RunRecord::new(
            "",
            cell.vmm.name(),
            accel_name(cell.accel),
            &kernel.release,
            Verdict::Fail,
        );
        base.kernel_name = Some(kernel.name.clone());
        base.vmm_version = vmm_version(lab, cell.vmm);
        base.boot_ms = boot_ms;
        base.driver_ready_ms = driver_ready_ms;
        base.console = Some(console_path);
        base.duration_ms = Some(t0.elapsed().as_millis() as u64);
        Self {
            base,
            problems: Vec::new(),
            splats: Vec::new(),
            console: String::new(),
        }
    }

    /// The driver module under test, for the records.
    pub fn driver(&mut self, module: Option<String>) {
        self.base.driver = module;
    }

    /// The guest's CPUs, for the records: how many, and on an SMP guest
    /// where its device interrupts were sent and where they landed.
    pub fn cpus(&mut self, vcpus: u8, placement: crate::smp::Placement, console: &str) {
        self.base.vcpus = Some(vcpus);
        self.base.irq_cpu = placement.irq_cpu(vcpus);
        if self.base.irq_cpu.is_some() {
            if let Some(d) = crate::smp::irq_deltas(console, vcpus) {
                self.base.irqs_per_cpu = Some(d.per_cpu);
                self.base.irq_lines = Some(d.lines);
            }
        }
    }

    /// Append the record of `name`: it passed if neither it nor the boot
    /// had a problem.
    pub fn record(&self, name: &str, mut problems: Vec<String>) -> Result<RunRecord> {
        problems.extend(self.problems.iter().cloned());
        let mut rec = self.base.clone();
        rec.scenario = name.to_string();
        if problems.is_empty() {
            rec.result = Verdict::Pass;
        } else {
            rec.reason = Some(problems.join("; "));
        }
        record::append(&rec)?;
        Ok(rec)
    }

    fn outcome(&self, s: &Scenario, mut d: Driven, earlier: usize) -> Result<Outcome> {
        let output = scenario_output_after(&self.console, &s.marker, earlier);
        if d.result.is_some() {
            for want in &s.expect.output {
                if !output.contains(want.as_str()) {
                    d.problems.push(format!("output lacks {want:?}"));
                }
            }
        }
        let ran = d.result.is_some() || !s.expect.result;
        if !ran && d.problems.is_empty() {
            d.problems.push("no result".into());
        }
        let record = self.record(&s.name, d.problems)?;
        let guest = d
            .result
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok());
        Ok(Outcome {
            record,
            guest,
            result: d.result,
            host_sha256: s.host_sha256.clone(),
            stats: d.stats,
            captured: d.captured,
            output,
        })
    }
}

/// The console lines between `marker`'s READY and its result.
pub fn scenario_output(console: &str, marker: &str) -> String {
    scenario_output_after(console, marker, 0)
}

/// [`scenario_output`] of the run of `marker` after `earlier` runs of it
/// (their result lines) in the same console.
pub fn scenario_output_after(console: &str, marker: &str, earlier: usize) -> String {
    let end = protocol::result_prefix(marker);
    let mut rest = console;
    for _ in 0..earlier {
        let Some(at) = rest.find(&end) else {
            return String::new();
        };
        rest = &rest[at + end.len()..];
    }
    scenario_output_one(rest, marker)
}

fn scenario_output_one(console: &str, marker: &str) -> String {
    let end = protocol::result_prefix(marker);
    let mut out = Vec::new();
    let mut inside = false;
    for line in console.lines() {
        if line.contains(&end) {
            break;
        }
        if inside {
            out.push(line.trim_end_matches('\r'));
        }
        if !inside {
            inside = line
                .find(protocol::READY)
                .is_some_and(|i| protocol::is_ready(&line[i..], marker));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Expect;

    #[test]
    fn output_is_cut_between_the_markers() {
        let console = "boot\nVDEVLAB-READY a\nhello\n[ 1.0] kmsg\nVDEVLAB-RESULT {\"scenario\":\"a\",\"ok\":true,\"status\":0}\nVDEVLAB-READY b\nbye\n";
        assert_eq!(scenario_output(console, "a"), "hello\n[ 1.0] kmsg");
        assert_eq!(scenario_output(console, "b"), "bye");
        let staged = "VDEVLAB-READY a-2\nno\nVDEVLAB-READY a\nyes\n";
        assert_eq!(scenario_output(staged, "a"), "yes");
        let twice = format!(
            "{console}VDEVLAB-READY a\nagain\nVDEVLAB-RESULT {{\"scenario\":\"a\",\"ok\":true}}\n"
        );
        assert_eq!(scenario_output_after(&twice, "a", 0), "hello\n[ 1.0] kmsg");
        assert_eq!(scenario_output_after(&twice, "a", 1), "again");
        assert_eq!(scenario_output_after(&twice, "a", 2), "");
    }

    fn judged(expect: Expect, result: &str) -> Vec<String> {
        let s = Scenario {
            expect,
            guest_timeout: Some(Duration::from_secs(9)),
            ..Scenario::program("x", &[])
        };
        judge(&s, &serde_json::from_str(result).unwrap())
    }

    #[test]
    fn results_are_judged_against_the_expectations() {
        assert!(judged(Expect::default(), r#"{"ok":true}"#).is_empty());
        assert_eq!(
            judged(Expect::default(), r#"{"ok":false,"error":"EIO"}"#),
            ["guest program failed: EIO"]
        );
        let must_fail = Expect {
            ok: false,
            ..Expect::default()
        };
        assert!(judged(must_fail.clone(), r#"{"ok":false}"#).is_empty());
        assert_eq!(
            judged(must_fail, r#"{"ok":true}"#),
            ["the guest program succeeded, but it was expected to fail"]
        );
        let fields = Expect {
            fields: vec![("bytes".into(), Value::from(3))],
            fields_not: vec![("sha256".into(), Value::from("aa"))],
            status: Some(0),
            ..Expect::default()
        };
        assert_eq!(
            judged(
                fields,
                r#"{"ok":true,"bytes":2,"sha256":"aa","status":143}"#
            ),
            [
                "bytes is 2, expected 3",
                "sha256 is \"aa\", which it must not be",
                "exit status 143 (killed by the 9 s timeout), expected 0"
            ]
        );
        let evidence = Expect {
            fields_at_least: vec![
                ("blocked_ms".into(), 1000.0),
                ("aio.late_ms".into(), 5.0),
                ("polls".into(), 1.0),
            ],
            ..Expect::default()
        };
        assert_eq!(
            judged(
                evidence,
                r#"{"ok":true,"blocked_ms":999,"aio":{"late_ms":7.5},"polls":"x"}"#
            ),
            [
                "blocked_ms is 999, expected at least 1000",
                "polls is \"x\", expected a number of at least 1"
            ]
        );
    }
}
