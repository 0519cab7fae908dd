//! Multi-core guests: where an SMP guest runs its programs and takes the
//! device's interrupts, and the proof from its console that the
//! interrupts went where they were sent.
//!
//! On one CPU the interrupt handler, the reader and the writer never run
//! at the same time, so a wake-up racing a sleeper or a ring touched
//! without its lock cannot show. An SMP cell ([`crate::cell`]) boots
//! several vCPUs, and by default ([`Placement::Split`]) init.sh routes
//! every virtio interrupt to the last CPU and pins the guest programs to
//! CPU 0: each completion is handled on one CPU and wakes a task on
//! another. init.sh prints each virtio interrupt's `/proc/interrupts` line
//! after routing (`VDEVLAB-IRQ start ...`) and at the end
//! (`VDEVLAB-IRQ end ...`); [`irq_deltas`] sums the per-CPU columns in
//! between, and the run record keeps them (`irqs_per_cpu`).

use serde::{Deserialize, Serialize};

/// Where an SMP guest's work goes (one-vCPU guests ignore it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// The device's interrupts on the last CPU, the guest programs pinned
    /// to CPU 0: every wake-up crosses CPUs.
    #[default]
    Split,
    /// The device's interrupts on the last CPU, the programs free on every
    /// CPU (a stress run whose threads should run everywhere at once).
    IrqOnly,
    /// Nothing routed or pinned: the kernel's own choice.
    Free,
}

impl Placement {
    /// The `vdevlab.*` words for init.sh on a guest of `vcpus` CPUs
    /// (none on one CPU).
    pub fn cmdline_words(self, vcpus: u8) -> String {
        if vcpus < 2 {
            return String::new();
        }
        let irq_cpu = vcpus - 1;
        match self {
            Placement::Split => format!(" vdevlab.irq_cpu={irq_cpu} vdevlab.pin_cpu=0"),
            Placement::IrqOnly => format!(" vdevlab.irq_cpu={irq_cpu}"),
            Placement::Free => String::new(),
        }
    }

    /// The CPU the device's interrupts go to on `vcpus` CPUs, if routed.
    pub fn irq_cpu(self, vcpus: u8) -> Option<u8> {
        (vcpus > 1 && self != Placement::Free).then(|| vcpus - 1)
    }
}

/// Where a boot's routed device interrupts landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqDeltas {
    /// Per CPU, the interrupts taken between routing and the end of the
    /// boot.
    pub per_cpu: Vec<u64>,
    /// The interrupt lines counted (present at both ends).
    pub lines: u32,
}

/// The virtio interrupts taken between routing and the end of the boot,
/// summed over the interrupts routed at the start (an interrupt line made
/// later, say by a re-probe after a PCI rescan, is not counted: it was
/// never routed). `None` when the console has no start or no end report.
///
/// An IO-APIC line (QEMU's generic vhost-user device has no MSI-X, so its
/// one line is one) moves lazily: x86 applies a new affinity while
/// handling the line's next interrupt on its old CPU, so each line may
/// show one interrupt on the CPU it left.
pub fn irq_deltas(console: &str, vcpus: u8) -> Option<IrqDeltas> {
    let start = irq_lines(console, "start", vcpus);
    let end = irq_lines(console, "end", vcpus);
    if start.is_empty() || end.is_empty() {
        return None;
    }
    let mut d = IrqDeltas {
        per_cpu: vec![0u64; usize::from(vcpus)],
        lines: 0,
    };
    for (irq, before) in &start {
        let Some((_, after)) = end.iter().find(|(i, _)| i == irq) else {
            continue;
        };
        d.lines += 1;
        for (cpu, total) in d.per_cpu.iter_mut().enumerate() {
            // A line that went away and came back restarts at zero.
            *total += after[cpu].saturating_sub(before[cpu]);
        }
    }
    Some(d)
}

/// The `VDEVLAB-IRQ <stage>` lines: the interrupt's number and its
/// per-CPU counts. A line garbled by a kernel message printed into it is
/// skipped.
fn irq_lines(console: &str, stage: &str, vcpus: u8) -> Vec<(String, Vec<u64>)> {
    let tag = format!("VDEVLAB-IRQ {stage} ");
    console
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find(&tag)? + tag.len()..];
            let mut words = rest.split_whitespace();
            let irq = words.next()?.strip_suffix(':')?.to_string();
            let counts: Vec<u64> = words
                .take(usize::from(vcpus))
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            (counts.len() == usize::from(vcpus)).then_some((irq, counts))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_words() {
        assert_eq!(Placement::Split.cmdline_words(1), "");
        assert_eq!(
            Placement::Split.cmdline_words(2),
            " vdevlab.irq_cpu=1 vdevlab.pin_cpu=0"
        );
        assert_eq!(Placement::IrqOnly.cmdline_words(4), " vdevlab.irq_cpu=3");
        assert_eq!(Placement::Free.cmdline_words(4), "");
        assert_eq!(Placement::Split.irq_cpu(2), Some(1));
        assert_eq!(Placement::Split.irq_cpu(1), None);
        assert_eq!(Placement::Free.irq_cpu(2), None);
    }

    #[test]
    fn deltas_sum_the_routed_lines() {
        let console = "\
VDEVLAB-SMP cpus=2 irq_cpu=1 pin_cpu=0 irqs=3
VDEVLAB-IRQ start 24:          3          0  PCI-MSIX-0000:00:03.0   0-edge      virtio0-config
VDEVLAB-IRQ start 25:          1          0  PCI-MSIX-0000:00:03.0   1-edge      virtio0-rx
VDEVLAB-IRQ start 26:          0          0  PCI-MSIX-0000:00:03.0   2-edge      virtio0-tx
[    5.1] some kernel line
VDEVLAB-IRQ end 24:          3          2  PCI-MSIX-0000:00:03.0   0-edge      virtio0-config
VDEVLAB-IRQ end 25:          1        140  PCI-MSIX-0000:00:03.0   1-edge      virtio0-rx
VDEVLAB-IRQ end 26:    [ 9.0] garbled
VDEVLAB-IRQ end 27:          9          0  PCI-MSIX-0000:00:03.0   3-edge      virtio1-rx
VDEVLAB-EXIT 0
";
        assert_eq!(
            irq_deltas(console, 2),
            Some(IrqDeltas {
                per_cpu: vec![0, 142],
                lines: 2
            })
        );
        assert_eq!(irq_deltas("VDEVLAB-EXIT 0\n", 2), None);
        let no_end = console.replace("VDEVLAB-IRQ end", "x");
        assert_eq!(irq_deltas(&no_end, 2), None);
    }
}
