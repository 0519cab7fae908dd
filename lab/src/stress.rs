//! The concurrency stress, as data for the one engine: the guest's
//! `stress` program (`guest-programs/src/scenarios/stress.rs`: readers and
//! writers in every I/O model at once, open/close churn, flush and reset
//! ioctls, signals, lock holders, config reads, then an unbind while all
//! of it runs) and the host's side: a [`Step::Pump`] that keeps
//! sequence-numbered records flowing both ways while it changes the
//! interrupt modes (which the config space shows) and pauses now and then,
//! so readers and writers run dry and sleep.
//!
//! [`scenario`] builds it for a seed and a duration; [`check`] settles the
//! accounts the guest cannot see (the transmit side against the host's
//! capture, the device's counters, the config values against the order
//! the host set them). The contract it holds the driver to is
//! `docs/device-spec.md`, "Several readers and writers".

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use vdevlab_guest::scenarios::stress::records::{check_tx, Rng};
use vdevlab_qw::control::Request;
use vdevlab_qw::device::Stats;
use vdevlab_qw::irq::IrqMode;

use crate::cell::Cell;
use crate::engine;
use crate::env::Kernel;
use crate::guest::{BootSpec, Placement};
use crate::scenario::{Checker, Expect, Outcome, Scenario, Step};
use crate::Lab;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stress {
    /// Seed of everything random, both sides.
    pub seed: u64,
    /// How long the threads run before the unbind.
    pub seconds: u64,
    /// Reader threads.
    pub readers: usize,
    /// Writer threads.
    pub writers: usize,
}

impl Stress {
    /// A run of `seconds` with seed `seed`: seven readers (one per reader
    /// model) and five writers (one per writer model).
    pub fn new(seed: u64, seconds: u64) -> Self {
        Self {
            seed,
            seconds,
            readers: 7,
            writers: 5,
        }
    }
}

/// The interrupt-mode changes of a run: each with its time from the
/// start of the pump. Seeded, about three a second.
pub fn controls(st: &Stress) -> Vec<(Duration, Request)> {
    let mut rng = Rng::new(st.seed, 0x686f_7374);
    let mut out = Vec::new();
    let mut t = 0u64;
    loop {
        t += rng.range(100, 600);
        if t > st.seconds * 1000 {
            break;
        }
        let irq = match rng.range(0, 2) {
            0 => IrqMode::Immediate,
            1 => IrqMode::Coalesce {
                count: rng.range(1, 16) as u32,
                usecs: rng.range(100, 4000),
            },
            _ => IrqMode::Delay {
                usecs: rng.range(50, 2000),
                jitter_usecs: rng.range(0, 1000),
                seed: rng.next_u64() >> 1,
            },
        };
        let queue = ["rx", "tx", "all"][rng.range(0, 2) as usize];
        out.push((
            Duration::from_millis(t),
            Request::InterruptMode {
                queue: queue.into(),
                irq,
            },
        ));
    }
    out
}

/// The config space's `irq_modes` word after each of `controls`, starting
/// from a fresh device's (both queues immediate), repeats left out.
pub fn irq_words(controls: &[(Duration, Request)]) -> Vec<u32> {
    let code = |m: &IrqMode| match m {
        IrqMode::Immediate => 0u32,
        IrqMode::Coalesce { .. } => 1,
        IrqMode::Delay { .. } => 2,
    };
    let (mut rx, mut tx) = (0u32, 0u32);
    let mut words = vec![0u32];
    for (_, r) in controls {
        if let Request::InterruptMode { queue, irq } = r {
            match queue.as_str() {
                "rx" => rx = code(irq),
                "tx" => tx = code(irq),
                _ => (rx, tx) = (code(irq), code(irq)),
            }
        }
        let w = rx | tx << 4;
        if words.last() != Some(&w) {
            words.push(w);
        }
    }
    words
}

/// Pauses of the pump (start, length): one every 2 to 3 s, of 0.3 to
/// 0.9 s.
pub fn pauses(st: &Stress) -> Vec<(Duration, Duration)> {
    let mut rng = Rng::new(st.seed, 0x7061_7573);
    let mut out = Vec::new();
    let mut t = 0u64;
    loop {
        t += rng.range(2000, 3000);
        if t + 1000 > st.seconds * 1000 {
            break;
        }
        let len = rng.range(300, 900);
        out.push((Duration::from_millis(t), Duration::from_millis(len)));
        t += len;
    }
    out
}

/// The stress scenario for `st`.
pub fn scenario(st: &Stress) -> Scenario {
    let args: Vec<String> = [
        "--seconds".to_string(),
        st.seconds.to_string(),
        "--seed".into(),
        st.seed.to_string(),
        "--readers".into(),
        st.readers.to_string(),
        "--writers".into(),
        st.writers.to_string(),
    ]
    .into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let controls = controls(st)
        .into_iter()
        .map(|(t, r)| (t, serde_json::to_value(r).unwrap_or_default()))
        .collect();
    Scenario {
        expect: Expect {
            check: Some(Checker(check)),
            ..Expect::default()
        },
        // The run, the unbind and the threads' 30 s to end, with room.
        budget: Duration::from_secs(st.seconds + 120),
        ..Scenario::program("stress", &args).with_steps(vec![
            Step::Ready("stress".into()),
            Step::Pump {
                seed: st.seed,
                controls,
                pauses: pauses(st),
                until: "stress-2".into(),
            },
        ])
    }
}

/// The host's half of the verdict ([`Expect::check`]): the capture holds
/// exactly the records the writers wrote minus those the driver dropped
/// (resets, the unbind), counted to the byte; the device delivered
/// exactly the bytes the driver received and took exactly what was
/// captured; the config values the guest read are ones the host set, in
/// the order it set them.
pub fn check(v: &Value, captured: &[u8], stats: Option<&Stats>) -> Vec<String> {
    let mut problems = Vec::new();
    let num = |k: &str| v.get(k).and_then(Value::as_u64);
    let (Some(seed), Some(seconds), Some(queued), Some(records)) = (
        num("seed"),
        num("seconds"),
        num("tx_queued_bytes"),
        num("rx_records"),
    ) else {
        return vec!["the result lacks the stress fields".into()];
    };
    let written: Vec<u64> = v
        .get("tx_written")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    match check_tx(seed, captured, &written, queued) {
        Ok(_) => {}
        Err(e) => problems.push(format!("transmit stream: {e}")),
    }
    if let Some(s) = stats {
        let rx = records * 16;
        if s.rx_bytes != rx {
            problems.push(format!(
                "the device delivered {} bytes, the driver received {rx}",
                s.rx_bytes
            ));
        }
        if s.tx_bytes != captured.len() as u64 {
            problems.push(format!(
                "the device took {} bytes, the host captured {}",
                s.tx_bytes,
                captured.len()
            ));
        }
    } else {
        problems.push("no device counters at the end".into());
    }
    if v.get("config") == Some(&Value::Bool(true)) {
        let st = Stress {
            seed,
            seconds,
            readers: 0,
            writers: 0,
        };
        let set = irq_words(&controls(&st));
        let seen: Vec<u32> = v
            .get("config_modes")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect()
            })
            .unwrap_or_default();
        let mut it = set.iter();
        for w in &seen {
            if !it.any(|s| s == w) {
                problems.push(format!(
                    "config reads gave irq_modes {seen:x?}: not in the order the host set {set:x?}"
                ));
                break;
            }
        }
    }
    problems
}

/// Boot `kernel` in `cell` and run the stress. On an SMP cell the
/// device's interrupts go to the last CPU and the threads run on every
/// CPU ([`Placement::IrqOnly`]); `tune` adjusts the boot after that.
pub fn run(
    lab: &Lab,
    kernel: &Kernel,
    cell: Cell,
    st: &Stress,
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Outcome> {
    let mut outs = engine::run(lab, kernel, cell, &[scenario(st)], |spec| {
        spec.placement = Placement::IrqOnly;
        tune(spec);
    })?;
    outs.pop().context("the run gave no outcome")
}

/// The sensor's stress (`sensor-stress`): its readers, alarm taker,
/// controllers and config reader at once, then an unbind; the host
/// changes the samples and events queues' interrupt modes meanwhile.
pub fn sensor_scenario(st: &Stress) -> Scenario {
    let args: Vec<String> = vec![
        "--seconds".into(),
        st.seconds.to_string(),
        "--seed".into(),
        st.seed.to_string(),
        "--readers".into(),
        st.readers.to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut steps = vec![Step::Ready("sensor-stress".into())];
    let mut at = Duration::ZERO;
    for (t, r) in controls(st) {
        if let Request::InterruptMode { queue, irq } = r {
            let queue = match queue.as_str() {
                "rx" => "samples",
                "tx" => "events",
                _ => "all",
            };
            steps.push(Step::Sleep(t.saturating_sub(at)));
            steps.push(Step::control(serde_json::json!({
                "op": "interrupt_mode",
                "queue": queue,
                "irq": irq,
            })));
            at = t;
        }
    }
    Scenario {
        budget: Duration::from_secs(st.seconds + 120),
        // The sensor's counters are not the qw device's.
        counters: false,
        ..Scenario::program("sensor-stress", &args).with_steps(steps)
    }
}

/// Boot `kernel` with the sensor in `cell` and run its stress (the
/// threads on every CPU of an SMP cell, as for qw).
pub fn run_sensor(
    lab: &Lab,
    art: &crate::sensor::SensorArtifacts,
    kernel: &Kernel,
    cell: Cell,
    st: &Stress,
    tune: impl FnOnce(&mut BootSpec),
) -> Result<Outcome> {
    let boot = crate::sensor::SensorBoot::new(art, kernel, &[])?;
    let mut outs = engine::run(lab, kernel, cell, &[sensor_scenario(st)], |spec| {
        boot.apply(spec);
        spec.placement = Placement::IrqOnly;
        tune(spec);
    })?;
    outs.pop().context("the run gave no outcome")
}

/// The sensor stress's result fields that prove its contended paths were
/// reached.
pub const SENSOR_CONTENDED: &[&str] = &[
    "samples_read",
    "alarms",
    "ctrl_requests",
    "config_changes_seen",
    "eagain",
    "eintr",
    "signals_to_driver_sleepers",
];

/// The result fields that prove the contended paths were reached (each
/// must be above 0 in a run that reaches them).
pub const CONTENDED: &[&str] = &[
    "eagain",
    "eintr",
    "signals_to_driver_sleepers",
    "config_changes_seen",
    "flushes",
    "resets",
    "rx_flushed",
];

/// The contended paths the locker reaches: it needs userfaultfd in the
/// guest kernel (the result's `uffd`; Debian's kernels have it, the
/// trimmed lab kernel has not).
pub const LOCKER_CONTENDED: &[&str] = &[
    "eagain_busy_read_lock",
    "eagain_busy_write_lock",
    "eintr_on_lock",
    "restarts_on_lock",
    "signals_to_lock_sleepers",
    "signals_to_wq_sleepers",
];

/// The contended paths a qw stress result should show reached: all of
/// [`CONTENDED`], and [`LOCKER_CONTENDED`] where the kernel has
/// userfaultfd.
pub fn expected_paths(result: &Value) -> Vec<&'static str> {
    let mut paths = CONTENDED.to_vec();
    if result.get("uffd") == Some(&Value::Bool(true)) {
        paths.extend_from_slice(LOCKER_CONTENDED);
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_seeded_and_sized() {
        let st = Stress::new(5, 12);
        let c = controls(&st);
        assert!(c.len() >= 12, "{}", c.len());
        assert!(c.last().unwrap().0 <= Duration::from_secs(12));
        assert_eq!(c, controls(&st), "the same seed gives the same run");
        assert_ne!(c, controls(&Stress::new(6, 12)));
        let p = pauses(&st);
        assert!(!p.is_empty());
        let s = scenario(&st);
        assert_eq!(s.command[0], "stress");
        assert!(matches!(&s.steps[1], Step::Pump { controls, .. } if controls.len() == c.len()));
        let words = irq_words(&c);
        assert_eq!(words[0], 0);
        assert!(words.iter().all(|w| w & 0xf <= 2 && w >> 4 <= 2));
    }

    #[test]
    fn the_check_settles_the_transmit_accounts() {
        use vdevlab_guest::scenarios::stress::records::tx_record;
        let cap = [tx_record(1, 0, 0), tx_record(1, 1, 0)].concat();
        let v = serde_json::json!({
            "seed": 1, "seconds": 1, "rx_records": 2,
            "tx_written": [1, 1], "tx_queued_bytes": cap.len(),
            "config": true, "config_modes": [0],
        });
        let stats = Stats {
            rx_bytes: 32,
            tx_bytes: cap.len() as u64,
            ..Stats::default()
        };
        assert!(check(&v, &cap, Some(&stats)).is_empty());
        let short = check(&v, &cap[..cap.len() - 1], Some(&stats));
        assert_eq!(short.len(), 2, "{short:?}");
        let mut bad = v.clone();
        bad["config_modes"] = serde_json::json!([0, 0x99]);
        assert_eq!(check(&bad, &cap, Some(&stats)).len(), 1);
    }
}
